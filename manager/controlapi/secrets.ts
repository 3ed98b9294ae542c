/**
 * Secrets and configs in the control API: validation of their specs, create/get/list/remove, and the
 * resolution of a service spec's references (by name or id) to the objects they name.
 *
 * A secret's data is never returned by the API and never appears in an error message or a log line;
 * a config's data is returned by GetConfig only (as Docker's `config inspect` shows it). Both are
 * immutable once created (rotation is create + `service update --secret-rm old --secret-add new`).
 */
import path from 'node:path';
import {
  Config,
  ConfigReference,
  ConfigSpec,
  FileTarget,
  Secret,
  SecretReference,
  SecretSpec,
  Service,
  ServiceSpec,
} from '../../gen/flotilla/v1/objects.js';
import { FlotillaError, invalidArgument, notFound } from '../../common/errors.js';
import { newId } from '../../common/ids.js';
import { DEFAULT_FILE_MODE, defaultTarget, MAX_SECRET_BYTES, SECRET_NAME_RE, SECRETS_DIR, targetPath, type FileKind } from '../../common/secrets.js';
import type { MemoryStore, Tx } from '../store/store.js';
import { labelBytes, SPEC_LIMITS, tooLarge } from './validate.js';

export type Kind = FileKind;

/** Container paths a secret or config may not be mounted at (or under). */
const FORBIDDEN_TARGETS = ['/proc', '/sys', '/dev'];

function validateSpec(kind: Kind, spec: SecretSpec | ConfigSpec | undefined): SecretSpec {
  if (!spec) throw invalidArgument('spec', null, 'required');
  if (!SECRET_NAME_RE.test(spec.name))
    throw invalidArgument(`${kind} name`, spec.name.length > 100 ? `${spec.name.slice(0, 100)}…` : spec.name, 'use 1-64 letters, digits, "_", "." or "-", starting with a letter or digit');
  for (const k of Object.keys(spec.labels)) if (!k || /\s/.test(k)) throw invalidArgument('label', k, 'invalid key');
  if (labelBytes(spec.labels) > SPEC_LIMITS.labels) throw tooLarge('labels', labelBytes(spec.labels), SPEC_LIMITS.labels);
  // never echo the value itself
  if (spec.data.length === 0) throw new FlotillaError('INVALID_ARGUMENT', `invalid ${kind} data: empty (a ${kind} needs 1 to ${MAX_SECRET_BYTES} bytes)`);
  if (spec.data.length > MAX_SECRET_BYTES) throw tooLarge(`${kind} data`, spec.data.length, MAX_SECRET_BYTES);
  return { name: spec.name, labels: { ...spec.labels }, data: Buffer.from(spec.data) };
}

function table(kind: Kind): 'secret' | 'config' {
  return kind;
}

function list(store: MemoryStore, kind: Kind): Array<Secret | Config> {
  return [...store.table(table(kind)).values()];
}

/** A secret or config by id, unique id prefix or name (NOT_FOUND, or FAILED_PRECONDITION when ambiguous). */
export function resolveObject(store: MemoryStore, kind: Kind, ref: string): Secret | Config {
  if (!ref) throw invalidArgument(kind, ref, 'required');
  const byId = store.table(table(kind)).get(ref);
  if (byId) return byId;
  const all = list(store, kind);
  const byName = all.find((o) => o.spec?.name === ref);
  if (byName) return byName;
  const matches = all.filter((o) => o.id.startsWith(ref));
  if (matches.length === 1) return matches[0]!;
  if (matches.length > 1) throw new FlotillaError('FAILED_PRECONDITION', `${kind} ${JSON.stringify(ref)} is ambiguous (${matches.length} matches)`);
  throw notFound(kind, ref);
}

/** The object as the API shows it: a secret never with its data; a config with it only when asked. */
export function redact<T extends Secret | Config>(o: T, withData = false): T {
  if (withData) return o;
  return { ...o, spec: o.spec ? { ...o.spec, data: Buffer.alloc(0) } : undefined };
}

export async function createObject(store: MemoryStore, kind: Kind, given: SecretSpec | ConfigSpec | undefined): Promise<Secret | Config> {
  const spec = validateSpec(kind, given);
  const id = newId();
  await store.update((tx) => {
    if (list(store, kind).some((o) => o.spec?.name === spec.name)) throw new FlotillaError('ALREADY_EXISTS', `${kind} ${JSON.stringify(spec.name)} already exists`);
    tx.create(table(kind), { id, meta: undefined, spec });
  });
  return redact(store.table(table(kind)).get(id)!);
}

/** The services whose current spec references the object. */
export function servicesUsing(store: MemoryStore, kind: Kind, id: string): Service[] {
  return store.listServices().filter((s) => refsOf(s.spec, kind).some((r) => refId(r) === id));
}

export async function removeObject(store: MemoryStore, kind: Kind, ref: string): Promise<void> {
  const o = resolveObject(store, kind, ref);
  await store.update((tx) => {
    const users = servicesUsing(store, kind, o.id);
    if (users.length > 0) {
      const names = users.map((s) => s.spec?.name ?? s.id).sort();
      throw new FlotillaError(
        'FAILED_PRECONDITION',
        `${kind} ${JSON.stringify(o.spec?.name)} is in use by service${names.length > 1 ? 's' : ''} ${names.join(', ')}: remove it from ${names.length > 1 ? 'them' : 'it'} first (service update --${kind}-rm ${o.spec?.name})`,
      );
    }
    tx.delete(table(kind), o.id);
  });
}

// ---- references in service specs

type Ref = SecretReference | ConfigReference;

function refsOf(spec: ServiceSpec | undefined, kind: Kind): Ref[] {
  const c = spec?.task?.container;
  if (!c) return [];
  return kind === 'secret' ? c.secrets : c.configs;
}

function refId(r: Ref): string {
  return 'secretId' in r ? r.secretId : r.configId;
}

function refName(r: Ref): string {
  return 'secretName' in r ? r.secretName : r.configName;
}

function validateTarget(kind: Kind, name: string, file: FileTarget): void {
  const t = file.name;
  const field = `--${kind} ${name} target`;
  if (t.includes('\0') || t.length > 1024) throw invalidArgument(field, t.slice(0, 100), 'not a valid path');
  if (kind === 'config' && !t.startsWith('/')) throw invalidArgument(field, t, 'must be an absolute path');
  if (kind === 'secret' && !t.startsWith('/') && t.split('/').some((p) => p === '' || p === '.' || p === '..'))
    throw invalidArgument(field, t, `must be a file name under ${SECRETS_DIR}/ (no "..", no empty parts) or an absolute path`);
  const abs = targetPath(kind, t);
  if (path.posix.normalize(abs) !== abs || abs.endsWith('/') || abs === '/') throw invalidArgument(field, t, 'must be a normalised path to a file (no "..", "." or "//")');
  if (FORBIDDEN_TARGETS.some((f) => abs === f || abs.startsWith(`${f}/`))) throw invalidArgument(field, t, `cannot be under ${FORBIDDEN_TARGETS.join(', ')}`);
  if (!Number.isInteger(file.mode) || file.mode < 0 || file.mode > 0o777) throw invalidArgument(`--${kind} ${name} mode`, file.mode.toString(8), 'must be an octal mode of at most 0777');
}

/**
 * Resolves the secret and config references of a service spec in place: each names its object by
 * name (from the CLI) or id (a spec read back); both are filled in from the store. Unknown names,
 * duplicate targets and bad targets are INVALID_ARGUMENT naming them. Targets and modes get their
 * defaults. Call inside the transaction that writes the spec (tx), so a removal cannot slip between.
 */
export function resolveReferences(tx: Tx, spec: ServiceSpec): void {
  const c = spec.task?.container;
  if (!c) return;
  const targets = new Map<string, string>();
  for (const kind of ['secret', 'config'] as const) {
    const refs = kind === 'secret' ? c.secrets : c.configs;
    const resolved: Ref[] = [];
    for (const r of refs) {
      const id = refId(r);
      const name = refName(r);
      let obj: Secret | Config | undefined;
      if (id) {
        obj = tx.get(table(kind), id);
        if (!obj) throw invalidArgument(kind, name || id, `${kind} not found (it was removed)`);
      } else {
        if (!name) throw invalidArgument(kind, name, 'a name is required');
        obj = list(tx.store, kind).find((o) => o.spec?.name === name);
        if (!obj) throw invalidArgument(kind, name, `${kind} not found (create it with flotilla ${kind} create)`);
      }
      const objName = obj.spec?.name ?? '';
      const file: FileTarget = r.file ? { ...r.file } : { name: '', uid: 0, gid: 0, mode: 0 };
      if (!file.name) file.name = defaultTarget(kind, objName);
      if (!r.file) file.mode = DEFAULT_FILE_MODE;
      validateTarget(kind, objName, file);
      const abs = targetPath(kind, file.name);
      const other = targets.get(abs);
      if (other) throw invalidArgument(`--${kind} ${objName} target`, abs, `is already the target of ${other}`);
      targets.set(abs, `${kind} ${objName}`);
      resolved.push(kind === 'secret' ? { secretId: obj.id, secretName: objName, file } : { configId: obj.id, configName: objName, file });
    }
    if (kind === 'secret') c.secrets = resolved as SecretReference[];
    else c.configs = resolved as ConfigReference[];
  }
}
