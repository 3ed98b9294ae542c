/**
 * What the manager, the agent and the CLI share about secrets and configs (docs/security.md).
 */

/** The largest secret or config value, in bytes: 500 KiB, Swarm's limit. */
export const MAX_SECRET_BYTES = 500 * 1024;
/** Names: as Docker's, a letter or digit first, then letters, digits, "_", "." or "-"; at most 64. */
export const SECRET_NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$/;
/** Where a secret's file goes when its target is a plain name. */
export const SECRETS_DIR = '/run/secrets';
/** A file's mode when none is given: readable by all, as Docker's default. */
export const DEFAULT_FILE_MODE = 0o444;

export type FileKind = 'secret' | 'config';

/**
 * The absolute path of a secret's or config's file inside the container. A secret's target is a
 * name under /run/secrets (default: the secret's name) or an absolute path; a config's is an
 * absolute path (default: /<config name>).
 */
export function targetPath(kind: FileKind, target: string): string {
  if (kind === 'secret' && !target.startsWith('/')) return `${SECRETS_DIR}/${target}`;
  return target;
}

/** The default target of a reference to the object called name. */
export function defaultTarget(kind: FileKind, name: string): string {
  return kind === 'secret' ? name : `/${name}`;
}
