/**
 * Registry client: pull and push images over the OCI distribution API into and out of the node's image
 * store (agent/runtime/images.ts). No maintained TypeScript client for the distribution API exists, so
 * the protocol is written here (client.ts) over Node's built-in fetch.
 *
 * Interface (stable; used by the CLI and by the agent's pull-before-start):
 *
 *   parseReference(s)                      -> Reference {registry, repository, tag?, digest?}   (common/imageref.ts)
 *   familiarString(ref), formatReference(ref), storeName(ref)
 *   resolve(ref, opts)                     -> Resolved: the digest the tag points to (pin this: an index's
 *                                             digest for a multi-platform image), its media type, and the
 *                                             manifest chosen for the platform (manifestDigest, manifest)
 *   pull(ref, store, opts)                 -> PullResult {record, digest, manifestDigest}: the image is in
 *                                             the store under storeName(ref) (or opts.name), layers unpacked
 *   push(ref, store, opts)                 -> PushResult {digest, uploaded}: pushes the local image named ref
 *   login(registry, creds, opts)           checks credentials against the registry (GET /v2/ + challenge)
 *   hostPlatform(), parsePlatform("linux/arm64/v8"), choosePlatform(index entries, platform)
 *   loadCredentials(registry) / saveCredentials(registry, creds) / removeCredentials(registry)
 *                                             (credentials.ts; Docker's config.json layout, 0600)
 *   RegistryClient                         the HTTP layer (auth, manifests, blobs), for tests and tools
 *
 * opts (all optional): auth {username,password} (else anonymous; the CLI loads them with loadCredentials),
 * insecure (true, or the --insecure-registry list: plain HTTP; loopback registries try HTTPS, then HTTP),
 * platform {os, architecture, variant} (default: this node's), onProgress(event), signal (AbortSignal),
 * concurrency (layers transferred at once, default 3), retries (per interrupted blob, default 5);
 * pull also takes name (the store name), push chunkSize (PATCH uploads).
 * Downloads of one blob are shared by concurrent pulls in one process (per content store).
 *
 * Errors are FlotillaErrors with one-line messages naming the registry: NOT_FOUND (no such tag,
 * repository or platform), PERMISSION_DENIED (401/403: login needed or wrong password), UNAVAILABLE
 * (registry unreachable, transfer failed after retries), INVALID_ARGUMENT (bad reference, digest or size
 * mismatch, unsupported manifest or layer type).
 *
 * What is verified: every manifest's sha256 against the digest it was asked for (by digest or via the
 * index) and against the registry's Docker-Content-Digest header; the config and every layer blob against
 * their descriptor's digest and size as they are written (nothing unverified becomes visible in the
 * content store); every unpacked layer against the config's diff id (ImageStore.importStaged). Layers
 * are unpacked while their blob streams in and made visible only if the blob matched (fetchAndStage).
 */
import { once } from 'node:events';
import { createReadStream } from 'node:fs';
import { PassThrough } from 'node:stream';
import { FlotillaError, errorMessage, invalidArgument } from '../../../common/errors.js';
import { sha256Digest } from '../content.js';
import type { Descriptor, ImageStore, Manifest, OciConfig } from '../images.js';
import type { StagedLayer } from '../layers.js';
import type { ImageRecord } from '../types.js';
import { MEDIA_TYPES, RegistryClient, type ClientOptions } from './client.js';
import type { Credentials } from './credentials.js';
import { familiarName, familiarString, parseReference, storeName, type Reference } from './reference.js';

export * from './reference.js';
export * from './credentials.js';
export { RegistryClient, MEDIA_TYPES, parseChallenge } from './client.js';

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

/** What a pull or push reports as it goes; id is a blob digest (or the reference for 'resolved'/'done'). */
export interface ProgressEvent {
  id: string;
  kind: 'manifest' | 'config' | 'layer';
  status: 'resolved' | 'waiting' | 'exists' | 'downloading' | 'verifying' | 'extracting' | 'complete' | 'pushing' | 'pushed' | 'done';
  /** bytes so far and in all, for downloading/pushing */
  current?: number;
  total?: number;
}

export interface RegistryOptions {
  auth?: Credentials;
  insecure?: boolean | string[];
  platform?: Platform;
  signal?: AbortSignal;
  onProgress?: (e: ProgressEvent) => void;
  /** blobs transferred at once (default 3) */
  concurrency?: number;
  /** retries of an interrupted blob transfer (default 5) */
  retries?: number;
}

export interface PullOptions extends RegistryOptions {
  /** the store name (default storeName(ref): "name:tag", or "name@digest" for a pull by digest) */
  name?: string;
}

export interface PushOptions extends RegistryOptions {
  /** upload blobs in PATCH chunks of this many bytes (default: one monolithic PUT per blob) */
  chunkSize?: number;
}

export interface Resolved {
  ref: Reference;
  /** the digest the reference points to in the registry (an index's, for a multi-platform image) */
  digest: string;
  mediaType: string;
  /** the platform manifest chosen (equal to digest for a single-platform image) */
  manifestDigest: string;
  manifestMediaType: string;
  manifest: Manifest;
  manifestBytes: Buffer;
  /** the platform entry chosen from the index, when there was one */
  platform?: Platform;
}

export interface PullResult {
  record: ImageRecord;
  /** as Resolved.digest: what to pin */
  digest: string;
  manifestDigest: string;
}

export interface PushResult {
  digest: string;
  /** bytes of blobs uploaded (0 when the registry had them all) */
  uploaded: number;
}

/** This node's platform in OCI terms (linux/amd64, linux/arm64/v8, linux/arm/v7). */
export function hostPlatform(): Platform {
  const map: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  const architecture = map[process.arch] ?? process.arch;
  const os = process.platform === 'win32' ? 'windows' : process.platform;
  if (architecture === 'arm64') return { os, architecture, variant: 'v8' };
  if (architecture === 'arm') {
    const v = (process.config.variables as unknown as Record<string, unknown>).arm_version;
    return { os, architecture, variant: `v${typeof v === 'string' || typeof v === 'number' ? v : '7'}` };
  }
  return { os, architecture };
}

/** Parses "linux/arm64[/v8]" (`--platform`). */
export function parsePlatform(s: string, field = '--platform'): Platform {
  const parts = s.trim().split('/');
  if (parts.length < 2 || parts.length > 3 || parts.some((p) => !/^[a-z0-9_.-]+$/.test(p))) throw invalidArgument(field, s, 'expected os/architecture[/variant], e.g. linux/arm64');
  return { os: parts[0]!, architecture: parts[1]!, ...(parts[2] ? { variant: parts[2] } : {}) };
}

export function platformString(p: { os?: string; architecture?: string; variant?: string }): string {
  return [p.os ?? '?', p.architecture ?? '?', ...(p.variant ? [p.variant] : [])].join('/');
}

/** Chooses the entry of an index for a platform: same os and architecture; the variant if one is wanted. */
export function choosePlatform(entries: Descriptor[], want: Platform): Descriptor | undefined {
  const candidates = entries.filter((d) => d.platform?.os === want.os && d.platform.architecture === want.architecture);
  if (candidates.length === 0) return undefined;
  if (!want.variant) return candidates.find((d) => !d.platform?.variant) ?? candidates[0];
  const defaultVariant = want.architecture === 'arm64' ? 'v8' : undefined;
  return (
    candidates.find((d) => d.platform?.variant === want.variant) ??
    candidates.find((d) => !d.platform?.variant && want.variant === defaultVariant) ??
    (want.variant === defaultVariant ? candidates[0] : undefined)
  );
}

function clientFor(ref: Reference, opts: RegistryOptions): RegistryClient {
  const c: ClientOptions = {};
  if (opts.auth) c.auth = opts.auth;
  if (opts.insecure !== undefined) c.insecure = opts.insecure;
  if (opts.signal) c.signal = opts.signal;
  if (opts.retries !== undefined) c.retries = opts.retries;
  return new RegistryClient(ref.registry, c);
}

function asRef(ref: string | Reference): Reference {
  return typeof ref === 'string' ? parseReference(ref) : ref;
}

function isIndexType(mt: string): boolean {
  return mt === MEDIA_TYPES.ociIndex || mt === MEDIA_TYPES.dockerList;
}

interface Fetched {
  bytes: Buffer;
  digest: string;
  mediaType: string;
  json: Record<string, unknown>;
}

/** GET a manifest and verify it: sha256 against the digest asked for, and the registry's header. */
async function fetchManifest(client: RegistryClient, ref: Reference, reference: string): Promise<Fetched> {
  const what = `${familiarName(ref)}${reference.startsWith('sha256:') ? '@' : ':'}${reference}`;
  const got = await client.getManifest(ref.repository, reference);
  const digest = sha256Digest(got.bytes);
  if (reference.startsWith('sha256:') && digest !== reference) {
    throw new FlotillaError('INVALID_ARGUMENT', `registry ${ref.registry}: manifest ${what} does not match its digest (got ${digest})`);
  }
  if (got.headerDigest && got.headerDigest.startsWith('sha256:') && got.headerDigest !== digest) {
    throw new FlotillaError('INVALID_ARGUMENT', `registry ${ref.registry}: manifest ${what} is ${digest} but the registry says ${got.headerDigest}`);
  }
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(got.bytes.toString('utf8')) as Record<string, unknown>;
  } catch (err) {
    throw new FlotillaError('INVALID_ARGUMENT', `registry ${ref.registry}: manifest ${what} is not valid JSON: ${errorMessage(err)}`);
  }
  let mediaType = typeof json.mediaType === 'string' ? json.mediaType : got.mediaType;
  if (!mediaType || mediaType === 'application/json') mediaType = Array.isArray(json.manifests) ? MEDIA_TYPES.ociIndex : MEDIA_TYPES.ociManifest;
  if (mediaType === MEDIA_TYPES.dockerV1Signed || mediaType === MEDIA_TYPES.dockerV1 || json.schemaVersion === 1) {
    throw new FlotillaError('INVALID_ARGUMENT', `registry ${ref.registry}: ${what} is a Docker schema 1 manifest, which is not supported (push it again with a current client)`);
  }
  if (!isIndexType(mediaType) && mediaType !== MEDIA_TYPES.ociManifest && mediaType !== MEDIA_TYPES.dockerManifest) {
    throw new FlotillaError('INVALID_ARGUMENT', `registry ${ref.registry}: ${what} has the unsupported media type ${mediaType}`);
  }
  return { bytes: got.bytes, digest, mediaType, json };
}

async function resolveWith(client: RegistryClient, ref: Reference, opts: RegistryOptions): Promise<Resolved> {
  const top = await fetchManifest(client, ref, ref.digest ?? ref.tag ?? 'latest');
  let chosen = top;
  let platform: Platform | undefined;
  if (isIndexType(top.mediaType)) {
    const want = opts.platform ?? hostPlatform();
    const entries = (Array.isArray(top.json.manifests) ? top.json.manifests : []) as Descriptor[];
    const pick = choosePlatform(entries, want);
    if (!pick) {
      const have = entries.map((d) => platformString(d.platform ?? {})).join(', ');
      throw new FlotillaError('NOT_FOUND', `image ${familiarString(ref)} has no manifest for ${platformString(want)} (it has: ${have || 'none'})`);
    }
    chosen = await fetchManifest(client, ref, pick.digest);
    if (isIndexType(chosen.mediaType)) throw new FlotillaError('INVALID_ARGUMENT', `image ${familiarString(ref)}: nested indexes are not supported`);
    platform = { os: pick.platform?.os ?? '', architecture: pick.platform?.architecture ?? '', ...(pick.platform?.variant ? { variant: pick.platform.variant } : {}) };
  }
  const manifest = chosen.json as unknown as Manifest;
  if (!manifest.config || typeof manifest.config.digest !== 'string' || !Array.isArray(manifest.layers)) {
    throw new FlotillaError('INVALID_ARGUMENT', `image ${familiarString(ref)}: manifest ${chosen.digest} lacks config or layers`);
  }
  return {
    ref,
    digest: top.digest,
    mediaType: top.mediaType,
    manifestDigest: chosen.digest,
    manifestMediaType: chosen.mediaType,
    manifest,
    manifestBytes: chosen.bytes,
    ...(platform ? { platform } : {}),
  };
}

/** Resolves a reference to the digest it points to and the manifest for the platform (no blobs fetched). */
export async function resolve(refIn: string | Reference, opts: RegistryOptions = {}): Promise<Resolved> {
  const ref = asRef(refIn);
  return resolveWith(clientFor(ref, opts), ref, opts);
}

/** Runs fn over items with at most n at once; the first failure aborts the rest (via the returned error). */
async function mapLimit<T, R>(items: T[], n: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  let failed: unknown;
  const worker = async (): Promise<void> => {
    while (failed === undefined && next < items.length) {
      const i = next++;
      try {
        out[i] = await fn(items[i]!, i);
      } catch (err) {
        failed ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(n, items.length)) }, worker));
  if (failed !== undefined) throw failed;
  return out;
}

/** Downloads in progress per content store: one download per blob however many pulls want it. */
const inflight = new WeakMap<object, Map<string, Promise<void>>>();

/** Fetches a blob into the content store unless present; verified against digest and size. */
function fetchBlob(
  client: RegistryClient,
  store: ImageStore,
  repository: string,
  desc: Descriptor,
  kind: ProgressEvent['kind'],
  onProgress?: (e: ProgressEvent) => void,
): Promise<'exists' | 'fetched'> {
  return fetchAndStage(client, store, repository, desc, kind, onProgress, false).then((r) => (r === 'exists' ? 'exists' : 'fetched'));
}

/**
 * Fetches a blob into the content store unless present. With unpack set (a layer), the bytes are also
 * streamed as they arrive into an unpack of the layer into a temp directory (LayerStore.stage): the blob
 * is hashed and the layer unpacked at once instead of one after the other. The staged layer is returned
 * only if the blob's digest and size matched; on any failure of either side both are stopped and nothing
 * stays behind (no blob, no temp directory). The caller commits the staged layer (LayerStore.commit).
 * Returns 'exists' if the blob was present, 'fetched' if another pull downloaded it meanwhile.
 */
async function fetchAndStage(
  client: RegistryClient,
  store: ImageStore,
  repository: string,
  desc: Descriptor,
  kind: ProgressEvent['kind'],
  onProgress: ((e: ProgressEvent) => void) | undefined,
  unpack: boolean,
): Promise<'exists' | 'fetched' | StagedLayer> {
  if (await store.content.has(desc.digest)) return 'exists';
  let map = inflight.get(store.content);
  if (!map) inflight.set(store.content, (map = new Map()));
  const running = map.get(desc.digest);
  if (running) {
    await running;
    return 'fetched';
  }
  let staged: StagedLayer | undefined;
  const p = (async () => {
    let last = 0;
    const stream = client.blob(repository, desc.digest, desc.size, (n) => {
      const now = Date.now();
      if (now - last >= 100 || n === desc.size) {
        last = now;
        onProgress?.({ id: desc.digest, kind, status: 'downloading', current: n, total: desc.size });
      }
    });
    let source: AsyncIterable<Buffer> = stream;
    let unpacking: Promise<StagedLayer> | undefined;
    if (unpack) {
      // the unpacker reads from side; the content store from source. Chunks go to both; a full side
      // buffer holds the download back (both run at the pace of the slower).
      // object mode: the unpacker gets the download's (1 MiB) chunks as they are, never concatenated
      const side = new PassThrough({ objectMode: true, highWaterMark: 8 });
      let unpackFailed: unknown;
      unpacking = store.layers.stage(desc.digest, side);
      const settled = unpacking.then(
        () => undefined,
        (err: unknown) => {
          unpackFailed = err;
        },
      );
      source = (async function* () {
        let ended = false;
        try {
          for await (const chunk of stream) {
            // after a failed unpack the download still goes on to the end: if the blob does not match its
            // digest, that (not the broken archive it made) is the error to report
            if (unpackFailed === undefined && !side.destroyed && !side.write(chunk)) await Promise.race([once(side, 'drain'), settled]);
            yield chunk;
          }
          side.end();
          ended = true;
        } finally {
          if (!ended) side.destroy(new Error('the blob download stopped'));
        }
      })();
    }
    let ingestErr: unknown;
    try {
      await store.content.ingest(source, { digest: desc.digest, size: desc.size });
    } catch (err) {
      ingestErr = err instanceof FlotillaError && err.code === 'INVALID_ARGUMENT'
        ? new FlotillaError('INVALID_ARGUMENT', `registry ${client.registry}: blob ${desc.digest} of ${repository} refused: ${err.message}`)
        : err;
    }
    if (unpacking) {
      try {
        staged = await unpacking;
      } catch (err) {
        // the download's failure is the cause if there was one; else the layer itself is bad (the blob,
        // committed by now, is removed by the caller's cleanup like any other blob of a failed pull)
        throw ingestErr ?? err;
      }
      if (ingestErr !== undefined) {
        await store.layers.discard([staged]);
        staged = undefined;
      }
    }
    if (ingestErr !== undefined) throw ingestErr;
  })().finally(() => map.delete(desc.digest));
  map.set(desc.digest, p);
  await p;
  return staged ?? 'fetched';
}

/**
 * Pulls an image into the store: resolves the reference (choosing the platform of an index), fetches the
 * config and the layers the store does not have yet (opts.concurrency at once, each verified, resumed
 * after interruptions), unpacks each layer as soon as it is in, checks the diff ids, and names the image
 * storeName(ref) (or opts.name).
 */
export async function pull(refIn: string | Reference, store: ImageStore, opts: PullOptions = {}): Promise<PullResult> {
  const ref = asRef(refIn);
  const client = clientFor(ref, opts);
  const resolved = await resolveWith(client, ref, opts);
  const { manifest } = resolved;
  const progress = opts.onProgress;
  progress?.({ id: familiarString(ref), kind: 'manifest', status: 'resolved' });
  for (const l of manifest.layers) {
    const mt = l.mediaType ?? '';
    if (typeof l.digest !== 'string' || typeof l.size !== 'number') throw new FlotillaError('INVALID_ARGUMENT', `image ${familiarString(ref)}: a layer descriptor lacks digest or size`);
    if (mt.includes('zstd')) throw new FlotillaError('INVALID_ARGUMENT', `image ${familiarString(ref)}: layer ${l.digest} is zstd-compressed (${mt}); only gzip or uncompressed layers are supported`);
    if (mt.includes('foreign') || mt.includes('nondistributable')) throw new FlotillaError('INVALID_ARGUMENT', `image ${familiarString(ref)}: layer ${l.digest} is non-distributable (${mt})`);
  }
  const name = opts.name ?? storeName(ref);
  const repoDigest = `${familiarName(ref)}@${resolved.digest}`;
  const record = await store.importStaged(
    name,
    async (pin) => {
      pin(manifest.config.digest);
      await fetchBlob(client, store, ref.repository, manifest.config, 'config');
      let config: OciConfig;
      try {
        config = JSON.parse((await store.content.readBytes(manifest.config.digest)).toString('utf8')) as OciConfig;
      } catch (err) {
        throw new FlotillaError('INVALID_ARGUMENT', `image ${familiarString(ref)}: config ${manifest.config.digest} is not valid JSON: ${errorMessage(err)}`);
      }
      for (const l of manifest.layers) progress?.({ id: l.digest, kind: 'layer', status: 'waiting', current: 0, total: l.size });
      // layers are downloaded and unpacked at once (opts.concurrency of them at a time); the unpacked
      // layers are made durable and visible together at the end, with one file system sync
      const staged: StagedLayer[] = [];
      try {
        await mapLimit(manifest.layers, opts.concurrency ?? 3, async (l) => {
          pin(l.digest);
          const how = await fetchAndStage(client, store, ref.repository, l, 'layer', progress, !(await store.layers.has(l.digest)));
          if (typeof how === 'object') {
            staged.push(how);
            progress?.({ id: l.digest, kind: 'layer', status: 'extracting', total: l.size });
            return;
          }
          if (how === 'exists' && (await store.layers.has(l.digest))) {
            progress?.({ id: l.digest, kind: 'layer', status: 'exists', total: l.size });
            return;
          }
          // the blob was here (or fetched by a concurrent pull) but not unpacked
          progress?.({ id: l.digest, kind: 'layer', status: 'extracting', total: l.size });
          await store.layers.prepare(l.digest);
          progress?.({ id: l.digest, kind: 'layer', status: 'complete', total: l.size });
        });
        await store.layers.commit(staged);
      } finally {
        await store.layers.discard(staged);
      }
      for (const l of manifest.layers) if (staged.some((s) => s.digest === l.digest)) progress?.({ id: l.digest, kind: 'layer', status: 'complete', total: l.size });
      pin(resolved.manifestDigest);
      await store.content.writeBytes(resolved.manifestBytes, { digest: resolved.manifestDigest });
      return { manifestDigest: resolved.manifestDigest, configDigest: manifest.config.digest, layers: manifest.layers, config, repoDigests: [repoDigest] };
    },
    familiarString(ref),
  );
  progress?.({ id: familiarString(ref), kind: 'manifest', status: 'done' });
  return { record, digest: resolved.digest, manifestDigest: resolved.manifestDigest };
}

/**
 * Pushes the local image named ref (by its store name) to the registry under ref's tag: each blob the
 * registry lacks (HEAD) is uploaded (opts.concurrency at once), then the manifest. Returns the manifest digest.
 */
export async function push(refIn: string | Reference, store: ImageStore, opts: PushOptions = {}): Promise<PushResult> {
  const ref = asRef(refIn);
  if (ref.digest !== undefined) throw invalidArgument('image reference', familiarString(ref), 'push takes name[:tag], not a digest');
  const img = await store.get(storeName(ref));
  const client = clientFor(ref, opts);
  const manifestBytes = await store.content.readBytes(img.digest);
  if (sha256Digest(manifestBytes) !== img.digest) throw new FlotillaError('INTERNAL', `the stored manifest of ${img.name} does not match its digest ${img.digest}`);
  const manifest = JSON.parse(manifestBytes.toString('utf8')) as Manifest;
  const mediaType = manifest.mediaType ?? MEDIA_TYPES.ociManifest;
  const progress = opts.onProgress;
  let uploaded = 0;
  const blobs: { desc: Descriptor; kind: ProgressEvent['kind'] }[] = [
    ...manifest.layers.map((desc) => ({ desc, kind: 'layer' as const })),
    { desc: manifest.config, kind: 'config' as const },
  ];
  for (const b of blobs) if (b.kind === 'layer') progress?.({ id: b.desc.digest, kind: 'layer', status: 'waiting', current: 0, total: b.desc.size });
  // one authenticated request before the uploads: streamed bodies cannot be replayed after a 401
  await client.hasBlob(ref.repository, manifest.config.digest);
  await mapLimit(blobs, opts.concurrency ?? 3, async ({ desc, kind }) => {
    if (await client.hasBlob(ref.repository, desc.digest)) {
      progress?.({ id: desc.digest, kind, status: 'exists', total: desc.size });
      return;
    }
    const file = store.content.path(desc.digest);
    let last = 0;
    await client.uploadBlob(ref.repository, desc.digest, desc.size, (start, end) => createReadStream(file, { start, end: end - 1 }), {
      ...(opts.chunkSize ? { chunkSize: opts.chunkSize } : {}),
      onBytes: (n) => {
        const now = Date.now();
        if (now - last >= 100 || n === desc.size) {
          last = now;
          progress?.({ id: desc.digest, kind, status: 'pushing', current: n, total: desc.size });
        }
      },
    });
    uploaded += desc.size;
    progress?.({ id: desc.digest, kind, status: 'pushed', total: desc.size });
  });
  const tag = ref.tag ?? 'latest';
  const said = await client.putManifest(ref.repository, tag, manifestBytes, mediaType);
  if (said && said !== img.digest) throw new FlotillaError('INTERNAL', `registry ${ref.registry}: stored the manifest as ${said}, expected ${img.digest}`);
  progress?.({ id: familiarString(ref), kind: 'manifest', status: 'done' });
  return { digest: img.digest, uploaded };
}

/** Checks credentials against a registry (GET /v2/, answering its challenge). */
export async function login(registry: string, auth: Credentials, opts: { insecure?: boolean | string[]; signal?: AbortSignal } = {}): Promise<void> {
  const c: ClientOptions = { auth };
  if (opts.insecure !== undefined) c.insecure = opts.insecure;
  if (opts.signal) c.signal = opts.signal;
  await new RegistryClient(registry, c).ping();
}
