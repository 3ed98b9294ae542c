/**
 * Image pinning on the manager (docs/images.md): `service create|update` turns NAME[:TAG] into
 * NAME:TAG@sha256:..., so every node runs the same image and a moved tag rolls out only through an
 * update that names it again.
 *
 *  1. a reference with a digest, or --no-resolve-image: kept as given;
 *  2. an image imported (not pulled) on nodes of the cluster under that name, as their heartbeats
 *     report it: pinned to that digest (no registry involved: nodes fetch it from each other);
 *  3. no node with an image store (simulated nodes only, or no node yet): kept;
 *  4. else the registry: the tag's digest (an index's for a multi-platform image), with the
 *     credentials sent with --with-registry-auth. A registry that cannot be reached, or does not know
 *     the tag, fails the command with one line.
 *
 * Registry credentials travel in ContainerSpec.registry_auth: kept in the store (encrypted at rest
 * like everything else), sent only with the tasks to the nodes that run them, and removed from every
 * control API answer (redactService, redactTask).
 */
import { FlotillaError, errorMessage, invalidArgument } from '../../common/errors.js';
import type { RegistryAuth, Service, ServiceSpec, Task } from '../../gen/flotilla/v1/objects.js';

export interface PinContext {
  /** the manifest digests of images imported under name on connected nodes (from their heartbeats) */
  localDigests(name: string): Set<string>;
  /** whether no node of the cluster has an image store (all simulated, or none registered) */
  simulatedOnly(): boolean;
  /** the registry's digest for a reference (tests inject nothing: the real client runs) */
  resolve?(ref: string, auth: RegistryAuth | undefined): Promise<string>;
}

/** Registries reached over plain HTTP besides loopback ones: $FLOTILLA_INSECURE_REGISTRIES (comma separated). */
export function insecureRegistries(): string[] {
  return (process.env.FLOTILLA_INSECURE_REGISTRIES ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
}

async function registryDigest(ref: string, auth: RegistryAuth | undefined): Promise<string> {
  const r = await import('../../agent/runtime/registry/index.js');
  const res = await r.resolve(ref, {
    ...(auth?.username ? { auth: { username: auth.username, password: auth.password } } : {}),
    insecure: insecureRegistries(),
    signal: AbortSignal.timeout(20_000),
  });
  return res.digest;
}

/** The image reference to store in the spec (see the file comment). */
export async function pinImage(image: string, noResolve: boolean, auth: RegistryAuth | undefined, ctx: PinContext): Promise<string> {
  if (noResolve) return image;
  const { parseReference, familiarName, familiarString } = await import('../../common/imageref.js');
  const ref = parseReference(image, 'spec.task.container.image');
  if (ref.digest) return image;
  // no node with an image store (simulated only): nothing to pin against, and no node reports images
  if (ctx.simulatedOnly()) return image;
  const name = `${familiarName(ref)}:${ref.tag ?? 'latest'}`;
  const local = ctx.localDigests(name);
  if (local.size === 1) return `${name}@${[...local][0]!}`;
  if (local.size > 1) {
    throw new FlotillaError(
      'FAILED_PRECONDITION',
      `image ${JSON.stringify(image)}: nodes hold ${local.size} different images of that name (imported separately): give NAME@DIGEST, or --no-resolve-image`,
    );
  }
  let digest: string;
  try {
    digest = await (ctx.resolve ?? registryDigest)(familiarString(ref), auth);
  } catch (err) {
    const why = errorMessage(err).replace(/\s+/g, ' ');
    throw new FlotillaError('FAILED_PRECONDITION', `cannot resolve image ${JSON.stringify(image)} to a digest: ${why} (--no-resolve-image deploys it unpinned)`);
  }
  return `${name}@${digest}`;
}

/** Checks the credentials given with a service (one line naming the field). */
export function validateRegistryAuth(auth: RegistryAuth | undefined): void {
  if (!auth) return;
  if (!auth.registry) throw invalidArgument('spec.task.container.registry_auth.registry', auth.registry, 'required with credentials');
  if (auth.username.length > 1024 || auth.password.length > 16384) throw invalidArgument('spec.task.container.registry_auth', '(hidden)', 'too long');
}

/** A spec without registry credentials. */
export function redactSpec(spec: ServiceSpec | undefined): ServiceSpec | undefined {
  if (!spec?.task?.container?.registryAuth) return spec;
  return { ...spec, task: { ...spec.task, container: { ...spec.task.container, registryAuth: undefined } } };
}

/** A service as the control API shows it: no registry credentials in its spec, previous spec or history. */
export function redactService(s: Service | undefined): Service | undefined {
  if (!s) return s;
  return {
    ...s,
    spec: redactSpec(s.spec),
    previousSpec: redactSpec(s.previousSpec),
    history: s.history.map((h) => ({ ...h, spec: redactSpec(h.spec) })),
  };
}

/** A task as the control API shows it. */
export function redactTask(t: Task): Task {
  if (!t.spec?.container?.registryAuth) return t;
  return { ...t, spec: { ...t.spec, container: { ...t.spec.container, registryAuth: undefined } } };
}
