/**
 * Images inside the cluster without a registry (docs/images.md).
 *
 *  - ContentServer: every agent serves the blobs of its content store (Content.ReadBlob) on its own
 *    port, over mutual TLS with its node certificate; only nodes of this cluster (a worker or manager
 *    certificate from a trusted root) get in.
 *  - Each heartbeat reports the node's images (names and manifest digests) and that port; the
 *    dispatcher answers ImageSources(ref) from those reports: which other nodes hold the image.
 *  - ImageFetcher: before a task starts on a node that lacks its image, the agent asks the dispatcher
 *    who has it and fetches the manifest, the config and the missing layers from that node directly
 *    (peer to peer; the manager only says who has what), each verified against its digest as it is
 *    written, then commits the image (layers unpacked and checked against the config's diff ids).
 *    One fetch per image and one per blob on a node, however many tasks wait for it.
 */
import * as grpc from '@grpc/grpc-js';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { sleep } from '../../common/sleep.js';
import { formatBytes } from '../../common/units.js';
import { BlobChunk, ContentClient, ContentService, type ContentServer as ContentHandlers, type ReadBlobRequest } from '../../gen/flotilla/v1/content.js';
import type { ImageSource, NodeImage } from '../../gen/flotilla/v1/dispatcher.js';
import { type AuthzOptions, type Policy, authorize } from '../../manager/ca/authz.js';
import { TLS_CHANNEL_OPTIONS, type TlsSource, clientCredentials, serverCredentials } from '../../manager/ca/credentials.js';
import { issuerNames } from '../../manager/ca/x509.js';
import { grpcError } from '../../manager/grpc.js';
import { isDigest } from '../runtime/content.js';
import type { RegistryAuth } from '../../gen/flotilla/v1/objects.js';
import { insecureRegistries } from '../../manager/controlapi/images.js';
import type { ImageStore, Manifest } from '../runtime/images.js';
import { normalizeImageName } from '../runtime/images.js';

/** Any node of the cluster may read blobs. */
export const CONTENT_POLICY: Policy<ContentHandlers> = {
  readBlob: ['worker', 'manager'],
};

const CHUNK = 256 * 1024;
/** a manifest or config larger than this is refused (they are small JSON documents) */
const MAX_JSON_BLOB = 4 * 1024 * 1024;
/** layers fetched at once per image */
const LAYER_CONCURRENCY = 3;

/** The agent's blob server. */
export class ContentServer {
  private server: grpc.Server | undefined;
  /** HOST:PORT it listens on ('' until listen) */
  addr = '';

  constructor(
    private readonly store: ImageStore,
    private readonly tls: TlsSource,
    private readonly log?: Logger,
  ) {}

  /** Listens on host (port 0: any free port); returns HOST:PORT. */
  async listen(host: string, port = 0): Promise<string> {
    const server = new grpc.Server({ 'grpc.max_send_message_length': 4 * CHUNK });
    let issuerCache = { pem: '', names: [] as string[] };
    const authz: AuthzOptions = {
      clusterId: () => this.tls.identity.clusterId,
      trustedIssuers: () => {
        const pem = this.tls.current.trustPem;
        if (issuerCache.pem !== pem) issuerCache = { pem, names: issuerNames(pem) };
        return issuerCache.names;
      },
      allowExpiredOnOpenConnections: true,
    };
    const handlers: ContentHandlers = { readBlob: (call) => void this.readBlob(call) };
    server.addService(ContentService, authorize(ContentService, handlers, CONTENT_POLICY, authz));
    const bound = await new Promise<number>((resolve, reject) =>
      server.bindAsync(`${host}:${port}`, serverCredentials(this.tls, 'require'), (err, p) =>
        err ? reject(new FlotillaError('UNAVAILABLE', `content server: cannot listen on ${host}:${port}: ${err.message}`)) : resolve(p),
      ),
    );
    this.server = server;
    this.addr = `${host}:${bound}`;
    return this.addr;
  }

  private async readBlob(call: grpc.ServerWritableStream<ReadBlobRequest, BlobChunk>): Promise<void> {
    const { digest, offset } = call.request;
    try {
      if (!isDigest(digest)) throw new FlotillaError('INVALID_ARGUMENT', `invalid digest ${JSON.stringify(digest)}: expected sha256:<64 hex digits>`);
      const { size } = await this.store.content.info(digest);
      if (offset > size) throw new FlotillaError('INVALID_ARGUMENT', `offset ${offset} is past the end of blob ${digest} (${size} bytes)`);
      const stream = await this.store.content.openRead(digest);
      // the stream reads from the start; skip to offset
      let pos = 0;
      let first = true;
      const cancelled = (): boolean => call.cancelled || call.destroyed;
      try {
        for await (const raw of stream) {
          let buf = raw as Buffer;
          if (pos + buf.length <= offset) {
            pos += buf.length;
            continue;
          }
          if (pos < offset) buf = buf.subarray(offset - pos);
          pos += (raw as Buffer).length;
          for (let i = 0; i < buf.length; i += CHUNK) {
            if (cancelled()) return;
            const ok = call.write(BlobChunk.fromPartial({ data: buf.subarray(i, i + CHUNK), size: first ? size : 0 }));
            first = false;
            if (!ok) await new Promise<void>((resolve) => call.once('drain', resolve));
          }
        }
      } finally {
        stream.destroy();
      }
      if (first) call.write(BlobChunk.fromPartial({ data: Buffer.alloc(0), size }));
      call.end();
    } catch (err) {
      if (!(err instanceof FlotillaError)) this.log?.warn({ digest, err: errorMessage(err) }, 'serving a blob failed');
      call.emit('error', grpcError(err));
    }
  }

  close(): void {
    this.server?.forceShutdown();
    this.server = undefined;
  }
}

/** What the fetcher needs of the dispatcher session. */
export interface SourceFinder {
  imageSources(ref: string, signal?: AbortSignal): Promise<ImageSource[]>;
}

export interface EnsureOptions {
  signal?: AbortSignal;
  /** credentials for the image's registry (a service's --with-registry-auth); used only for that registry */
  auth?: RegistryAuth;
  /** progress lines ("fetching from h1: 2/4 blobs, 1.2 MB/3.4 MB") */
  onProgress?: (message: string) => void;
}

interface Flight {
  promise: Promise<void>;
  listeners: Set<(message: string) => void>;
  last: string;
}

/** The parts of a reference: the name to record and the digest to fetch, if pinned. */
export function splitRef(ref: string): { name: string; digest: string } {
  const r = ref.trim();
  if (isDigest(r)) return { name: '', digest: r };
  const at = r.indexOf('@');
  if (at > 0) return { name: r.slice(0, at), digest: r.slice(at + 1) };
  return { name: r, digest: '' };
}

/** "host:5000/app:1" -> "host:5000/app" */
function repoOf(name: string): string {
  const colon = name.lastIndexOf(':');
  return colon > name.lastIndexOf('/') ? name.slice(0, colon) : name;
}

export class ImageFetcher {
  private readonly flights = new Map<string, Flight>();
  private readonly blobs = new Map<string, Promise<void>>();
  /** fetches completed, and blobs fetched (tests and diagnostics) */
  readonly stats = { images: 0, blobs: 0, bytes: 0 };

  constructor(
    private readonly store: ImageStore,
    private readonly finder: SourceFinder,
    private readonly tls: TlsSource,
    private readonly opts: { hostname: string; log?: Logger; sourcesTimeoutMs?: number; registry?: boolean } = { hostname: '' },
  ) {}

  /** The node's images, for the heartbeat. */
  async held(): Promise<NodeImage[]> {
    return (await this.store.list()).slice(0, 1000).map((i) => ({ name: i.name, digest: i.digest, repoDigests: i.repoDigests ?? [] }));
  }

  /** Makes sure the image is in the node's store, fetching it from another node if needed. */
  async ensure(ref: string, opts: EnsureOptions = {}): Promise<void> {
    if (await this.store.has(ref)) return;
    let f = this.flights.get(ref);
    if (!f) {
      const flight: Flight = { promise: Promise.resolve(), listeners: new Set(), last: '' };
      const report = (m: string): void => {
        flight.last = m;
        for (const l of flight.listeners) l(m);
      };
      flight.promise = this.fetch(ref, report, opts.auth).finally(() => this.flights.delete(ref));
      this.flights.set(ref, flight);
      f = flight;
    }
    const listener = opts.onProgress;
    if (listener) {
      f.listeners.add(listener);
      if (f.last) listener(f.last);
    }
    try {
      if (!opts.signal) return await f.promise;
      const sig = opts.signal;
      await Promise.race([
        f.promise,
        new Promise<never>((_, reject) => {
          if (sig.aborted) reject(new FlotillaError('ABORTED', 'aborted'));
          sig.addEventListener('abort', () => reject(new FlotillaError('ABORTED', 'aborted')), { once: true });
        }),
      ]);
    } finally {
      if (listener) f.listeners.delete(listener);
    }
  }

  /** Who has the image: asks the dispatcher until a holder is known or the time is up. */
  private async sources(ref: string): Promise<ImageSource[]> {
    const until = Date.now() + (this.opts.sourcesTimeoutMs ?? 5000);
    let last: unknown;
    for (;;) {
      try {
        const found = await this.finder.imageSources(ref);
        if (found.length > 0) return found;
        last = undefined;
      } catch (err) {
        last = err;
      }
      if (Date.now() >= until) break;
      await sleep(250);
    }
    if (last) throw new FlotillaError('UNAVAILABLE', `cannot ask the managers where image ${JSON.stringify(ref)} is: ${errorMessage(last)}`);
    throw new FlotillaError('NOT_FOUND', `image ${JSON.stringify(ref)} is on no node of the cluster (import or pull it on one node)`);
  }

  private async fetch(ref: string, report: (m: string) => void, auth: RegistryAuth | undefined): Promise<void> {
    const want = splitRef(ref);
    if (want.name) normalizeImageName(want.name, 'image');
    const errors: string[] = [];
    const tried = new Set<string>();
    const fromPeers = async (sources: ImageSource[]): Promise<boolean> => {
      for (const src of sources) {
        if (tried.has(src.nodeId)) continue;
        tried.add(src.nodeId);
        try {
          await this.fetchFrom(src, want.name || src.name, src.digest, report, want.digest && want.digest !== src.digest ? [`${repoOf(want.name || src.name)}@${want.digest}`] : undefined);
          this.stats.images++;
          return true;
        } catch (err) {
          this.opts.log?.warn({ ref, from: src.hostname, err: errorMessage(err) }, 'fetching an image from another node failed');
          errors.push(`from node ${src.hostname || src.nodeId}: ${errorMessage(err)}`);
        }
      }
      return false;
    };
    // 1. another node of the cluster (by digest when pinned)
    const first = await this.finder.imageSources(ref).catch(() => [] as ImageSource[]);
    if (await fromPeers(first)) return;
    // 2. the registry
    if (this.opts.registry !== false) {
      try {
        await this.pullFromRegistry(ref, want, report, auth);
        this.stats.images++;
        return;
      } catch (err) {
        this.opts.log?.warn({ ref, err: errorMessage(err) }, 'pulling an image from its registry failed');
        errors.push(errorMessage(err));
      }
    }
    // 3. a node that reported it meanwhile (heartbeats after an import)
    if (first.length === 0) {
      try {
        if (await fromPeers(await this.sources(ref))) return;
      } catch (err) {
        errors.unshift(errorMessage(err));
      }
    }
    throw new FlotillaError('UNAVAILABLE', errors.join('; ') || `image ${JSON.stringify(ref)} is on no node of the cluster`);
  }

  private async pullFromRegistry(ref: string, want: { name: string; digest: string }, report: (m: string) => void, auth: RegistryAuth | undefined): Promise<void> {
    const r = await import('../runtime/registry/index.js');
    const parsed = r.parseReference(ref);
    const name = want.name ? normalizeImageName(want.name.includes(':') && want.name.lastIndexOf(':') > want.name.lastIndexOf('/') ? want.name : `${want.name}:latest`) : undefined;
    const sizes = new Map<string, { current: number; total: number; done: boolean }>();
    let lastReport = 0;
    const line = (): string => {
      let done = 0;
      let cur = 0;
      let total = 0;
      for (const l of sizes.values()) {
        if (l.done) done++;
        cur += l.current;
        total += l.total;
      }
      return `pulling from ${parsed.registry}: ${done}/${sizes.size} layers, ${formatBytes(cur)}/${formatBytes(total)}`;
    };
    report(`pulling from ${parsed.registry}: manifest`);
    await r.pull(parsed, this.store, {
      ...(name && parsed.digest ? { name } : {}),
      ...(auth?.username && auth.registry === parsed.registry ? { auth: { username: auth.username, password: auth.password } } : {}),
      insecure: insecureRegistries(),
      onProgress: (e) => {
        if (e.kind !== 'layer') return;
        const l = sizes.get(e.id) ?? { current: 0, total: e.total ?? 0, done: false };
        if (e.total) l.total = e.total;
        if (e.status === 'downloading' && e.current !== undefined) l.current = e.current;
        if (e.status === 'exists' || e.status === 'complete') {
          l.done = true;
          l.current = l.total;
        }
        sizes.set(e.id, l);
        const now = Date.now();
        if (now - lastReport >= 500 || l.done) {
          lastReport = now;
          report(line());
        }
      },
    });
  }

  private client(src: ImageSource): ContentClient {
    return new ContentClient(src.contentAddr, clientCredentials(this.tls, { roles: ['worker', 'manager'], nodeId: src.nodeId }), {
      ...TLS_CHANNEL_OPTIONS,
      'grpc.max_receive_message_length': 4 * CHUNK,
    });
  }

  private async fetchFrom(src: ImageSource, name: string, digest: string, report: (m: string) => void, repoDigests?: string[]): Promise<void> {
    const client = this.client(src);
    const from = src.hostname || src.nodeId;
    // everything fetched stays pinned against prune until the image is committed
    const pins: (() => void)[] = [];
    try {
      pins.push(this.store.pin([digest]));
      report(`fetching from ${from}: manifest`);
      await this.blob(client, digest, MAX_JSON_BLOB);
      const manifest = JSON.parse((await this.store.content.readBytes(digest)).toString()) as Manifest;
      if (!manifest.config?.digest || !Array.isArray(manifest.layers)) throw new FlotillaError('INVALID_ARGUMENT', `blob ${digest} is not an image manifest`);
      const layers = manifest.layers;
      pins.push(this.store.pin([manifest.config.digest, ...layers.map((l) => l.digest)]));
      await this.blob(client, manifest.config.digest, MAX_JSON_BLOB, manifest.config.size);
      const total = layers.reduce((n, l) => n + (l.size || 0), 0);
      let done = 0;
      let bytes = 0;
      const line = (): string => `fetching from ${from}: ${done}/${layers.length} layers, ${formatBytes(bytes)}/${formatBytes(total)}`;
      let lastReport = 0;
      const tick = (force = false): void => {
        const now = Date.now();
        if (!force && now - lastReport < 500) return;
        lastReport = now;
        report(line());
      };
      tick(true);
      let next = 0;
      const worker = async (): Promise<void> => {
        while (next < layers.length) {
          const l = layers[next++]!;
          let counted = 0;
          await this.blob(client, l.digest, Number.MAX_SAFE_INTEGER, l.size, (n) => {
            counted += n;
            bytes += n;
            tick();
          });
          // a layer present already counts whole
          if (counted === 0) bytes += l.size || 0;
          // unpacked as soon as it is in, while other layers are still coming (commit finds it ready)
          await this.store.layers.prepare(l.digest);
          done++;
          tick(true);
        }
      };
      await Promise.all(Array.from({ length: Math.min(LAYER_CONCURRENCY, layers.length) }, worker));
      report(`fetched from ${from}: committing ${layers.length} layers`);
      await this.store.commit(name, digest, repoDigests);
    } finally {
      for (const p of pins) p();
      client.close();
    }
  }

  /** Fetches one blob unless present, once per node however many callers want it; verified by digest. */
  private blob(client: ContentClient, digest: string, max: number, size?: number, onBytes?: (n: number) => void): Promise<void> {
    const running = this.blobs.get(digest);
    if (running) return running;
    const p = (async () => {
      if (await this.store.content.has(digest)) return;
      const call = client.readBlob({ digest, offset: 0 }, { deadline: Date.now() + 30 * 60_000 });
      let seen = 0;
      async function* chunks(): AsyncGenerator<Uint8Array> {
        for await (const c of call as AsyncIterable<BlobChunk>) {
          if (c.size && c.size > max) throw new FlotillaError('INVALID_ARGUMENT', `blob ${digest} is ${c.size} bytes: more than the ${max} allowed`);
          seen += c.data.length;
          if (seen > max) throw new FlotillaError('INVALID_ARGUMENT', `blob ${digest} exceeds ${max} bytes`);
          onBytes?.(c.data.length);
          yield c.data;
        }
      }
      try {
        await this.store.content.ingest(chunks(), { digest, ...(size ? { size } : {}) });
      } catch (err) {
        call.cancel();
        throw err;
      }
      this.stats.blobs++;
      this.stats.bytes += seen;
    })().finally(() => this.blobs.delete(digest));
    this.blobs.set(digest, p);
    return p;
  }
}
