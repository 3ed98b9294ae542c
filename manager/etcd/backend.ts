/**
 * The store on an etcd cluster (docs/store.md, "etcd mode"): the proposer behind the store seam
 * when a manager runs with `--store etcd`.
 *
 * - Writes: each proposed StoreBatch becomes ONE etcd transaction that compares the mod revision of
 *   every object it updates or deletes with the revision this manager's store holds for it (created
 *   keys must be absent), and writes all it changes (Kubernetes' GuaranteedUpdate pattern). A failed
 *   compare waits until the local store has caught up with etcd and answers ABORTED: the store
 *   re-runs the transaction on fresh state, as under Raft. A batch proposed while nothing is on its
 *   way to etcd goes at once; batches proposed meanwhile in the same event-loop turn that commute
 *   (each compares only keys it writes, none shared, same fence) share one etcd transaction
 *   (flush()); if etcd refuses it, each is sent again on its own.
 * - Reads: every manager keeps its MemoryStore by a list of the prefix then a watch from that
 *   revision; each etcd revision becomes one applyChanges() call (one event per object, then a
 *   commit marker whose index is the revision). The watch is a gRPC stream of this module's own
 *   (etcdserverpb.Watch, decoded by the code generated from proto/etcd/watch.proto), not etcd3's
 *   watcher: that one turns every event into plain objects with BigNumber revisions, about a tenth
 *   of a lone writer's rate. A broken stream resumes from the next revision on another endpoint; a
 *   compacted revision relists.
 * - Leadership: an etcd election (etcd3's Campaign) on a lease. Writes made inside fenced() (the
 *   leader-only loops) carry a compare on the create revision of this manager's election key, so a
 *   deposed leader's late write fails.
 * - Values are sealed (AES-256-GCM, manager/keys) with the cluster's store key before they reach
 *   etcd; the key (path) is the additional authenticated data.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { createHmac, randomBytes } from 'node:crypto';
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import * as grpc from '@grpc/grpc-js';
import { Etcd3, type Campaign, type IOptions, type Lease } from 'etcd3';
import type { ICompare, IKeyValue, IRangeResponse, IRequestOp, ITxnResponse } from 'etcd3/lib/rpc.js';
import { Event_EventType, WatchClient, type WatchRequest, type WatchResponse } from '../../gen/etcd/watch.js';
import { Cluster, Config, Network, Node, Secret, Service, StoreActionKind, type StoreBatch, Task } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { sleep } from '../../common/sleep.js';
import { seal, unseal } from '../keys/keys.js';
import { type MemoryStore, type ObjectChange, type Proposer, type StoreObject, type Table, nextMeta, unpack } from '../store/store.js';

/** etcd's default request limit (--max-request-bytes, 1.5 MiB) */
export const ETCD_MAX_REQUEST_BYTES = 1.5 * 1024 * 1024;
/** the largest batch the store hands this proposer: room under the request limit for keys, seals and compares */
export const ETCD_MAX_BATCH_BYTES = ETCD_MAX_REQUEST_BYTES - 128 * 1024;
/** etcd's default cap on the operations of one transaction's branch (--max-txn-ops) */
export const ETCD_MAX_TXN_OPS = 128;
/** the most changes the store packs into one batch: each is a compare and a put, plus room for names and the revision marker */
export const ETCD_MAX_BATCH_ACTIONS = 60;
export const DEFAULT_LEASE_TTL_S = 10;
/** the sealed bytes of one etcd transaction: room under the request limit for keys and compares */
const MAX_WRITE_BYTES = ETCD_MAX_REQUEST_BYTES - 64 * 1024;
export const STORE_KIND_VALUE = 'flotilla-store-etcd-v1';

export interface EtcdStoreOptions {
  endpoints: string[];
  /** key prefix of this cluster, without a trailing slash (default /flotilla/default) */
  prefix: string;
  /** PEM contents (not paths) of the CA bundle, client certificate and key */
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  /** election lease TTL, seconds (default 10) */
  leaseTtlS?: number;
  /** writes proposed in the same event-loop turn that commute share one etcd transaction (default true; flush()) */
  mergeWrites?: boolean;
  /** deadline of each unary etcd call, ms (default 10 s); streams (watch, lease keepalive) have none */
  callTimeoutMs?: number;
}

/** What a manager needs of its consensus layer (RaftNode has the same shape). */
export interface MemberInfo {
  raftId: number;
  addr: string;
  reachable: boolean;
  leader: boolean;
  learner: boolean;
}

const CODECS: { [K in Table]: { encode(o: never): { finish(): Uint8Array }; decode(b: Uint8Array): StoreObject } } = {
  node: Node as never,
  service: Service as never,
  task: Task as never,
  cluster: Cluster as never,
  network: Network as never,
  secret: Secret as never,
  config: Config as never,
};
const TABLES = Object.keys(CODECS) as Table[];

/** One of this manager's committed transactions: its store changes in order (key -> object, undefined = deleted), and its proposal time. */
interface OwnWrite {
  changes: Array<ObjectChange & { key: string }>;
  time: number;
}

/** A write on its way to etcd: its compares and operations, and how to settle its propose(). */
interface PendingWrite {
  compare: ICompare[];
  success: IRequestOp[];
  /** every key it compares or changes (not the fence) */
  keys: string[];
  /** compares only keys it changes itself: may share an etcd transaction with others (flush) */
  mergeable: boolean;
  bytes: number;
  changes: OwnWrite['changes'];
  /** sealed values by key, with the objects they seal (inflight) */
  sent: Array<[string, { value: Buffer; object: StoreObject }]>;
  fence: Fence | undefined;
  time: number;
  resolve(o: { rev: number; committed: boolean }): void;
  reject(err: unknown): void;
}

interface Fence {
  key: Buffer;
  /** key as a string */
  name: string;
  createRevision: string;
}

/**
 * The channel options of the etcd3 client and of the watch stream: the same options and credentials
 * let grpc-js carry both on one HTTP/2 connection per endpoint. Keepalive pings find a dead
 * connection (etcd allows one per 5 s by default).
 */
const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
};

/**
 * Keys per page of a list (the store's relist): a value is at most etcd's request limit (1.5 MiB), so
 * a page always fits the channel's 64 MiB message limit.
 */
const LIST_PAGE = 40;

/** the default deadline of a unary etcd call (a transaction, a range, a lease grant) */
const ETCD_CALL_TIMEOUT_MS = 10_000;

/** how long a new watch stream may take to be created by etcd before another member is tried */
const WATCH_CREATE_TIMEOUT_MS = 5_000;

/** A watch stream that etcd refused or ended: compacted when its start revision is gone. */
class WatchEnded extends Error {
  constructor(
    message: string,
    readonly compacted: boolean,
  ) {
    super(message);
  }
}

export function etcdClient(opts: EtcdStoreOptions): Etcd3 {
  // a member that accepts connections and never answers (blackholed, frozen) would hold a call with
  // no deadline forever; past the deadline etcd3 retries the call on another member
  const callTimeoutMs = opts.callTimeoutMs ?? ETCD_CALL_TIMEOUT_MS;
  const o: IOptions = {
    hosts: opts.endpoints,
    dialTimeout: 5000,
    grpcOptions: CHANNEL_OPTIONS,
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + callTimeoutMs }),
  };
  if (opts.ca || opts.cert || opts.key) {
    if (!opts.ca) throw new FlotillaError('INVALID_ARGUMENT', 'invalid --etcd-cacert "": required with --etcd-cert/--etcd-key');
    o.credentials = { rootCertificate: opts.ca, ...(opts.cert && opts.key ? { certChain: opts.cert, privateKey: opts.key } : {}) };
  }
  return new Etcd3(o);
}

export class EtcdBackend implements Proposer {
  readonly maxBatchBytes = ETCD_MAX_BATCH_BYTES;
  readonly maxBatchActions = ETCD_MAX_BATCH_ACTIONS;
  /** prepare() measures the sealed values against etcd's request limit */
  readonly measuresBatches = true;
  readonly client: Etcd3;
  private readonly p: string;
  /** mod revision of each store key this manager's store holds */
  private readonly revs = new Map<string, number>();
  /** election keys (key -> create revision, value) and registered managers (node id -> addr) */
  private readonly candidates = new Map<string, { createRevision: number; value: string }>();
  private readonly managerAddrs = new Map<string, string>();
  /** the etcd revision the local store has reached */
  private applied = 0;
  /**
   * This manager's own committed writes by revision, not yet applied: the whole of each such
   * revision (one etcd revision is one transaction), so the store applies it from here as soon as it
   * is the next revision, without waiting for the watch (which then skips it) or decoding it.
   */
  private readonly ownWrites = new Map<number, OwnWrite>();
  /**
   * The sealed values of this manager's transactions in flight, by key, with the objects they seal:
   * the watch may bring such a revision before etcd's answer does, and a value equal byte for byte
   * to one sent here is that object (values are sealed with a random nonce), so it is not opened.
   */
  private readonly inflight = new Map<string, Array<{ value: Buffer; object: StoreObject }>>();
  /** writes proposed since the last flush (one event-loop turn) */
  private queue: PendingWrite[] = [];
  /** etcd transactions sent and not answered yet */
  private sending = 0;
  private appliedWaiters: Array<{ rev: number; resolve: () => void }> = [];
  /** the watch stream in use (watchFrom), and a client per endpoint for it */
  private watchCall: grpc.ClientDuplexStream<WatchRequest, WatchResponse> | undefined;
  private readonly watchClients = new Map<number, WatchClient>();
  private watchEndpoint = 0;
  private rewatching: Promise<void> | undefined;
  private relisting: Promise<void> | undefined;
  private stopped = false;
  private readonly fenceCtx = new AsyncLocalStorage<Fence>();
  private campaign: Campaign | undefined;
  private fence: Fence | undefined;
  private leader = false;
  private leaderCbs = new Set<(leader: boolean) => void>();
  private regLease: Lease | undefined;
  private leaseTimer: NodeJS.Timeout | undefined;
  private readonly ttl: number;

  constructor(
    private readonly store: MemoryStore,
    private readonly opts: EtcdStoreOptions,
    private readonly sealKey: Buffer,
    private readonly self: { nodeId: string; addr: string },
    private readonly log: Logger,
  ) {
    this.client = etcdClient(opts);
    this.p = opts.prefix.replace(/\/+$/, '');
    this.ttl = opts.leaseTtlS ?? DEFAULT_LEASE_TTL_S;
  }

  // ---- key layout

  private storeKey(table: Table, id: string): string {
    return `${this.p}/store/${table}/${id}`;
  }
  /** names are keyed by an HMAC under the store key: etcd sees no service, secret or config name */
  private nameKey(table: Table, name: string): string {
    return `${this.p}/names/${table}/${createHmac('sha256', this.sealKey).update(`${table}/${name}`).digest('hex')}`;
  }
  private get revKey(): string {
    return `${this.p}/rev`;
  }
  private get electionPrefix(): string {
    return `${this.p}/election/leader/`;
  }
  private get managersPrefix(): string {
    return `${this.p}/managers/`;
  }

  // ---- the store kind of a prefix, and the store key check

  /**
   * Reads <prefix>/meta/kind and <prefix>/meta/keycheck: undefined when the prefix is empty (a new
   * cluster), else whether sealKey opens the prefix's values.
   */
  static async inspect(client: Etcd3, prefix: string, sealKey: Buffer | undefined): Promise<{ kind: string; keyOk: boolean } | undefined> {
    const p = prefix.replace(/\/+$/, '');
    const kind = await client.get(`${p}/meta/kind`).string();
    if (kind === null) return undefined;
    const check = await client.get(`${p}/meta/keycheck`).buffer();
    let keyOk = false;
    if (check && sealKey) {
      try {
        keyOk = unseal(sealKey, check, Buffer.from(`${p}/meta/keycheck`)).toString() === STORE_KIND_VALUE;
      } catch {
        keyOk = false;
      }
    }
    return { kind, keyOk };
  }

  /** Claims an empty prefix for a new cluster (fails if another manager claimed it first). */
  static async claim(client: Etcd3, prefix: string, sealKey: Buffer): Promise<boolean> {
    const p = prefix.replace(/\/+$/, '');
    const res = await client
      .if(`${p}/meta/kind`, 'Create', '==', 0)
      .then(client.put(`${p}/meta/kind`).value(STORE_KIND_VALUE), client.put(`${p}/meta/keycheck`).value(seal(sealKey, Buffer.from(STORE_KIND_VALUE), Buffer.from(`${p}/meta/keycheck`))))
      .commit();
    return res.succeeded;
  }

  static newSealKey(): Buffer {
    return randomBytes(32);
  }

  // ---- list then watch

  /** Lists the prefix into the store and starts the watch; resolves once the store holds the listed state. */
  async start(): Promise<void> {
    await this.relist();
    await this.register();
  }

  private decode(table: Table, key: Uint8Array, value: Uint8Array): StoreObject {
    const plain = unseal(this.sealKey, value, key);
    return CODECS[table].decode(plain);
  }

  private parseStoreKey(key: string): { table: Table; id: string } | undefined {
    const rest = key.startsWith(`${this.p}/store/`) ? key.slice(this.p.length + 7) : undefined;
    if (rest === undefined) return undefined;
    const i = rest.indexOf('/');
    const table = rest.slice(0, i) as Table;
    if (!TABLES.includes(table)) return undefined;
    return { table, id: rest.slice(i + 1) };
  }

  /** A full list of the prefix: the store becomes exactly what etcd holds (events for the difference). */
  private relist(): Promise<void> {
    if (!this.relisting) {
      this.relisting = this.doRelist().finally(() => (this.relisting = undefined));
    }
    return this.relisting;
  }

  private async doRelist(): Promise<void> {
    for (let attempt = 0; !this.stopped; attempt++) {
      try {
        this.cancelWatch();
        const { rev, kvs } = await this.listPrefix();
        const seen = new Set<string>();
        const changes: ObjectChange[] = [];
        this.candidates.clear();
        this.managerAddrs.clear();
        for (const kv of kvs) {
          const key = kv.key.toString();
          const sk = this.parseStoreKey(key);
          if (sk) {
            seen.add(key);
            const modRevision = Number(kv.mod_revision);
            if (this.revs.get(key) !== modRevision) changes.push({ ...sk, object: this.decode(sk.table, kv.key, kv.value) });
            this.revs.set(key, modRevision);
          } else this.noteOther(key, kv.value, Number(kv.create_revision), false);
        }
        for (const key of [...this.revs.keys()]) {
          if (seen.has(key)) continue;
          const sk = this.parseStoreKey(key);
          this.revs.delete(key);
          if (sk) changes.push({ ...sk, object: undefined });
        }
        this.store.applyChanges(changes, rev);
        this.advance(rev);
        this.log.info({ revision: rev, objects: seen.size, changed: changes.length }, 'etcd: listed the store');
        await this.watchFrom(rev + 1);
        if (this.stopped) this.cancelWatch();
        this.checkLeaderKey();
        return;
      } catch (err) {
        if (this.stopped) return;
        this.watchEndpoint++; // the watch (if that failed) tries another member next
        if (attempt % 10 === 0) this.log.warn({ err: errorMessage(err) }, 'etcd: listing the store failed; retrying');
        await sleep(Math.min(1000, 100 * (attempt + 1)));
      }
    }
  }

  /**
   * Every key of the prefix at one revision (that of the first page), in pages of LIST_PAGE keys: one
   * range of a large store would pass gRPC's message limit. A revision compacted meanwhile fails the
   * list (the caller lists again).
   */
  private async listPrefix(): Promise<{ rev: number; kvs: IKeyValue[] }> {
    const prefix = Buffer.from(`${this.p}/`);
    const end = rangeEnd(prefix);
    const kvs: IKeyValue[] = [];
    let key = prefix;
    let rev = 0;
    for (;;) {
      const res: IRangeResponse = await this.client.kv.range({ key, range_end: end, limit: LIST_PAGE, ...(rev ? { revision: rev } : {}) });
      if (rev === 0) rev = Number(res.header.revision);
      for (const kv of res.kvs) kvs.push(kv);
      const last = res.kvs.at(-1);
      if (!res.more || !last) return { rev, kvs };
      key = Buffer.concat([last.key, Buffer.from([0])]);
    }
  }

  /** The watch's gRPC client for the current endpoint (credentials as etcd3 makes them). */
  private watchClient(): WatchClient {
    const i = this.watchEndpoint % this.opts.endpoints.length;
    let c = this.watchClients.get(i);
    if (!c) {
      const ep = this.opts.endpoints[i]!;
      const { ca, cert, key } = this.opts;
      // like etcd3: TLS with the given CA (and client certificate), or with the system's CAs for an
      // https endpoint; an http:// endpoint (an operator's choice, refused by nothing) is plaintext
      const creds = ca ? grpc.credentials.createSsl(ca, cert && key ? key : null, cert && key ? cert : null) : ep.startsWith('https://') ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
      c = new WatchClient(ep.replace(/^https?:\/\//, ''), creds, CHANNEL_OPTIONS);
      this.watchClients.set(i, c);
    }
    return c;
  }

  private cancelWatch(): void {
    const call = this.watchCall;
    this.watchCall = undefined;
    call?.cancel(); // its 'error' (CANCELLED) is ignored: it is no longer this.watchCall
  }

  /**
   * Watches the prefix from revision rev on one stream; resolves once etcd created the watch,
   * rejects (WatchEnded) if the stream fails first. Afterwards a broken stream resumes (rewatch) and
   * a compacted revision relists.
   */
  private watchFrom(rev: number): Promise<void> {
    this.cancelWatch();
    const md = new grpc.Metadata();
    // etcd cancels the watch when its member loses the cluster's leader (then another is tried)
    md.set('hasleader', 'true');
    const endpoint = this.opts.endpoints[this.watchEndpoint % this.opts.endpoints.length];
    const call = this.watchClient().watch(md);
    this.watchCall = call;
    const prefix = Buffer.from(`${this.p}/`);
    return new Promise<void>((resolve, reject) => {
      let created = false;
      // a member that does not answer (unreachable, blackholed) is given up for the next one
      const timer = setTimeout(() => ended(new WatchEnded(`no answer from ${endpoint} within ${WATCH_CREATE_TIMEOUT_MS} ms`, false)), WATCH_CREATE_TIMEOUT_MS);
      const ended = (err: WatchEnded): void => {
        clearTimeout(timer);
        if (!created) reject(err); // also when cancelled here before etcd created it: the caller looks at why
        if (this.watchCall !== call) return; // cancelled here, or replaced
        this.watchCall = undefined;
        call.cancel();
        if (!created || this.stopped) return;
        if (err.compacted) {
          this.log.warn({ err: err.message }, 'etcd: the watch revision was compacted: relisting');
          void this.relist();
        } else {
          this.log.warn({ err: err.message }, 'etcd: the watch stream broke: resuming it');
          this.rewatch();
        }
      };
      // a large response comes in fragments (asked for below: each within etcd's request limit)
      let fragments: WatchResponse['events'] = [];
      call.on('data', (res: WatchResponse) => {
        if (this.watchCall !== call) return;
        if (res.fragment) {
          for (const ev of res.events) fragments.push(ev);
          return;
        }
        if (fragments.length > 0) {
          res.events = [...fragments, ...res.events];
          fragments = [];
        }
        if (res.created && !created) {
          created = true;
          clearTimeout(timer);
          resolve();
        }
        if (res.compactRevision > 0) return ended(new WatchEnded(`revision ${rev} was compacted (oldest kept: ${res.compactRevision})`, true));
        if (res.canceled) return ended(new WatchEnded(`etcd cancelled the watch: ${res.cancelReason || 'no reason given'}`, false));
        if (res.events.length === 0) return;
        try {
          this.onWatch(res);
        } catch (err) {
          // never the process: the store is made whole again from a fresh list
          this.log.error({ err: errorMessage(err) }, 'etcd: applying a watch response failed: relisting');
          void this.relist();
        }
      });
      call.on('error', (err: Error) => ended(new WatchEnded(errorMessage(err), false)));
      call.on('end', () => ended(new WatchEnded('etcd ended the watch stream', false)));
      call.write({ createRequest: { key: prefix, rangeEnd: rangeEnd(prefix), startRevision: rev, progressNotify: false, prevKv: false, watchId: 0, fragment: true } });
    });
  }

  /** After a broken watch stream: watch again from the next revision, on the next endpoint. */
  private rewatch(): void {
    if (this.stopped || this.rewatching || this.relisting) return;
    this.rewatching = (async () => {
      for (let attempt = 0; !this.stopped && !this.relisting; attempt++) {
        this.watchEndpoint++;
        try {
          await this.watchFrom(this.applied + 1);
          if (this.stopped) this.cancelWatch();
          this.log.info({ revision: this.applied + 1 }, 'etcd: the watch resumed');
          return;
        } catch (err) {
          if (this.stopped || this.relisting) return;
          if (err instanceof WatchEnded && err.compacted) {
            void this.relist();
            return;
          }
          if (attempt % 10 === 0) this.log.warn({ err: errorMessage(err) }, 'etcd: resuming the watch failed; retrying');
          await sleep(Math.min(1000, 100 * (attempt + 1)));
        }
      }
    })().finally(() => (this.rewatching = undefined));
  }

  private onWatch(res: WatchResponse): void {
    // one applyChanges per revision: one event per object, then the commit marker
    let rev = 0;
    let changes: ObjectChange[] = [];
    let storeTouched = false;
    let time: number | undefined;
    const flush = (): void => {
      if (rev === 0) return;
      if (rev > this.applied) {
        if (storeTouched) this.store.applyChanges(changes, rev, time);
        this.advance(rev);
      }
      changes = [];
      storeTouched = false;
      time = undefined;
    };
    for (const ev of res.events) {
      const kv = ev.kv;
      if (!kv) continue;
      const r = kv.modRevision;
      if (r !== rev) {
        flush();
        rev = r;
      }
      if (r <= this.applied) continue;
      const key = kv.key.toString();
      const sk = this.parseStoreKey(key);
      if (sk) {
        storeTouched = true;
        if (ev.type === Event_EventType.DELETE) {
          this.revs.delete(key);
          changes.push({ ...sk, object: undefined });
        } else {
          this.revs.set(key, r);
          const own = this.ownWrites.get(r)?.changes.find((c) => c.key === key)?.object ?? this.inflight.get(key)?.find((w) => w.value.equals(kv.value))?.object;
          if (own) {
            changes.push({ ...sk, object: own });
            continue;
          }
          try {
            changes.push({ ...sk, object: this.decode(sk.table, kv.key, kv.value) });
          } catch (err) {
            this.log.error({ key, err: errorMessage(err) }, 'etcd: a value does not open with the store key: ignored');
          }
        }
      } else {
        if (key === this.revKey) {
          storeTouched = true;
          time = Number(kv.value.toString()) || undefined;
        }
        this.noteOther(key, kv.value, kv.createRevision, ev.type === Event_EventType.DELETE);
      }
    }
    flush();
    this.checkLeaderKey();
  }

  /** Election candidates and registered managers, from the list or the watch. */
  private noteOther(key: string, value: Buffer, createRevision: number, deleted: boolean): void {
    if (key.startsWith(this.electionPrefix)) {
      if (deleted) this.candidates.delete(key);
      else this.candidates.set(key, { createRevision, value: value.toString() });
    } else if (key.startsWith(this.managersPrefix)) {
      const id = key.slice(this.managersPrefix.length);
      if (deleted) this.managerAddrs.delete(id);
      else this.managerAddrs.set(id, value.toString());
    }
  }

  private advance(rev: number): void {
    if (rev > this.applied) this.applied = rev;
    if (this.ownWrites.size > 0) {
      for (const r of this.ownWrites.keys()) if (r <= this.applied) this.ownWrites.delete(r);
      this.applyOwn();
    }
    if (this.appliedWaiters.length === 0) return;
    const waiting: typeof this.appliedWaiters = [];
    const ready: Array<() => void> = [];
    for (const w of this.appliedWaiters) {
      if (w.rev <= this.applied) ready.push(w.resolve);
      else waiting.push(w);
    }
    this.appliedWaiters = waiting;
    for (const resolve of ready) resolve();
  }

  /**
   * Applies this manager's own committed transactions while the next revision is one of them: an
   * etcd revision is exactly one transaction, so its changes are all known here and the local store
   * need not wait for the watch to bring it back (the watch skips what is applied). Revisions made by
   * others still come only from the watch, in order. Not during a relist (its list may predate them).
   */
  private applyOwn(): void {
    if (this.relisting) return;
    for (let own = this.ownWrites.get(this.applied + 1); own; own = this.ownWrites.get(this.applied + 1)) {
      const rev = this.applied + 1;
      this.ownWrites.delete(rev);
      for (const c of own.changes) {
        if (c.object) this.revs.set(c.key, rev);
        else this.revs.delete(c.key);
      }
      this.store.applyChanges(own.changes, rev, own.time);
      this.applied = rev;
    }
  }

  /** Resolves once the local store has applied etcd revision rev (or rejects at the deadline). */
  async waitApplied(rev: number, signal?: AbortSignal, timeoutMs = 30_000): Promise<void> {
    if (this.applied >= rev) return;
    let timer: NodeJS.Timeout | undefined;
    let onAbort = (): void => {};
    try {
      await new Promise<void>((resolve, reject) => {
        this.appliedWaiters.push({ rev, resolve });
        timer = setTimeout(() => reject(new FlotillaError('UNAVAILABLE', `etcd: the store did not reach revision ${rev} within ${timeoutMs / 1000} s (watch behind)`)), timeoutMs);
        onAbort = () => reject(new FlotillaError('UNAVAILABLE', 'cancelled'));
        signal?.addEventListener('abort', onAbort, { once: true });
      });
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /** The read barrier (Raft's ReadIndex): the local store has applied every store write committed before the call. */
  async readIndex(signal?: AbortSignal): Promise<void> {
    let res;
    try {
      res = await this.client.get(this.revKey).exec();
    } catch (err) {
      throw new FlotillaError('UNAVAILABLE', `etcd unreachable: ${errorMessage(err)}`, { cause: err });
    }
    const kv = res.kvs[0];
    await this.waitApplied(kv ? Number(kv.mod_revision) : 0, signal);
  }

  // ---- writes

  /** Runs fn with this manager's leadership as the fence of the store writes it makes. */
  fenced<T>(fn: () => T): T {
    const f = this.fence;
    if (!f) return fn();
    return this.fenceCtx.run(f, fn);
  }

  async propose(batch: StoreBatch, signal?: AbortSignal): Promise<void> {
    if (this.stopped) throw new FlotillaError('UNAVAILABLE', 'the manager is stopping');
    // the same checks as under Raft, against this manager's store
    this.store.validateBatch(batch);
    const w = this.prepare(batch);
    const outcome = await new Promise<{ rev: number; committed: boolean }>((resolve, reject) => {
      w.resolve = resolve;
      w.reject = reject;
      // nothing on its way to etcd: no reason to wait for company (a lone writer pays no turn)
      if (!w.mergeable || this.opts.mergeWrites === false || (this.sending === 0 && this.queue.length === 0)) {
        this.send([w]);
        return;
      }
      this.queue.push(w);
      if (this.queue.length === 1) setImmediate(() => this.flush());
    });
    if (!outcome.committed) {
      // someone else wrote first: catch up, then the store re-runs the transaction on fresh state
      await this.waitApplied(outcome.rev, signal).catch(() => {});
      throw new FlotillaError('ABORTED', 'update out of sequence (etcd compare failed)');
    }
    // committed: read-your-writes, as under Raft
    await this.waitApplied(outcome.rev, signal);
  }

  /** A batch's compares and operations (without the fence and the revision marker, which send() adds). */
  private prepare(batch: StoreBatch): PendingWrite {
    const compare: ICompare[] = [];
    const success: IRequestOp[] = [];
    const keys: string[] = [];
    let mergeable = true;
    let bytes = 0;
    const touchedNames = new Set<string>();
    const changes: OwnWrite['changes'] = [];
    const sent: PendingWrite['sent'] = [];
    for (const a of batch.actions) {
      const { table, obj } = unpack(a);
      const key = this.storeKey(table, obj.id);
      const kb = Buffer.from(key);
      keys.push(key);
      const cur = this.store.table(table).get(obj.id) as StoreObject | undefined;
      const name = table === 'service' || table === 'secret' || table === 'config' ? ((obj as Service | Secret | Config).spec?.name ?? '') : undefined;
      if (a.kind === StoreActionKind.STORE_ACTION_KIND_CREATE) {
        compare.push({ key: kb, target: 'Create', result: 'Equal', create_revision: 0 });
      } else {
        const rev = this.revs.get(key);
        if (!rev) throw new FlotillaError('ABORTED', `${table} ${obj.id} no longer exists`);
        compare.push({ key: kb, target: 'Mod', result: 'Equal', mod_revision: rev });
      }
      if (a.kind === StoreActionKind.STORE_ACTION_KIND_DELETE) {
        changes.push({ key, table, id: obj.id, object: undefined });
        success.push({ request_delete_range: { key: kb } });
        const old = cur as Service | Secret | Config | undefined;
        if (name !== undefined && old?.spec?.name !== undefined) {
          const nk = this.nameKey(table, old.spec.name);
          keys.push(nk);
          success.push({ request_delete_range: { key: Buffer.from(nk) } });
        }
        if (table === 'secret' || table === 'config') {
          // no service may have started to use it since this manager's store last saw the services
          const from = Buffer.from(`${this.p}/store/service/`);
          compare.push({ key: from, range_end: rangeEnd(from), target: 'Mod', result: 'Less', mod_revision: this.applied + 1 });
          mergeable = false;
        }
        continue;
      }
      const next = { ...obj, meta: nextMeta(obj, cur) } as StoreObject;
      changes.push({ key, table, id: obj.id, object: next });
      const value = seal(this.sealKey, encodeObject(table, next), kb);
      bytes += value.length + kb.length + 32;
      success.push({ request_put: { key: kb, value } });
      sent.push([key, { value, object: next }]);
      // unique names: a name key per service, secret and config
      const oldName = (cur as Service | Secret | Config | undefined)?.spec?.name;
      if (name !== undefined && name !== oldName && !touchedNames.has(name)) {
        touchedNames.add(name);
        const nk = this.nameKey(table, name);
        const nkb = Buffer.from(nk);
        keys.push(nk);
        compare.push({ key: nkb, target: 'Create', result: 'Equal', create_revision: 0 });
        success.push({ request_put: { key: nkb, value: Buffer.from(obj.id) } });
        if (oldName !== undefined && cur) {
          const ok = this.nameKey(table, oldName);
          keys.push(ok);
          success.push({ request_delete_range: { key: Buffer.from(ok) } });
        }
      }
      // references a service adds must still exist
      if (table === 'service') {
        const before = cur as Service | undefined;
        const had = new Set([...(before?.spec?.task?.container?.secrets ?? []).map((r) => `secret/${r.secretId}`), ...(before?.spec?.task?.container?.configs ?? []).map((r) => `config/${r.configId}`)]);
        const c = (obj as Service).spec?.task?.container;
        const refs = [...(c?.secrets ?? []).map((r) => ['secret', r.secretId] as const), ...(c?.configs ?? []).map((r) => ['config', r.configId] as const)];
        for (const [t, id] of refs) {
          if (had.has(`${t}/${id}`)) continue;
          if (batch.actions.some((x) => x.kind === StoreActionKind.STORE_ACTION_KIND_CREATE && x[t]?.id === id)) continue;
          compare.push({ key: Buffer.from(this.storeKey(t, id)), target: 'Version', result: 'Greater', version: 0 });
          mergeable = false;
        }
      }
    }
    if (bytes > MAX_WRITE_BYTES) {
      throw new FlotillaError('RESOURCE_EXHAUSTED', `a store write of ${bytes} bytes is over etcd's request limit of ${ETCD_MAX_REQUEST_BYTES} bytes (--max-request-bytes): make the object smaller`);
    }
    // one more compare for the fence, one more put for the revision marker
    if (compare.length + 1 > ETCD_MAX_TXN_OPS || success.length + 1 > ETCD_MAX_TXN_OPS) {
      throw new FlotillaError('RESOURCE_EXHAUSTED', `a store write of ${batch.actions.length} changes needs ${Math.max(compare.length, success.length) + 1} etcd operations, over etcd's limit of ${ETCD_MAX_TXN_OPS} per transaction (--max-txn-ops)`);
    }
    const noop = (): void => {};
    return { compare, success, keys, mergeable, bytes, changes, sent, fence: this.fenceCtx.getStore(), time: batch.proposedAt || Date.now(), resolve: noop, reject: noop };
  }

  /**
   * Sends the writes queued since the last flush: writes that compare only keys they write themselves
   * (no reference or range compares), under the same fence, with no key in common, go as ONE etcd
   * transaction (one revision), up to etcd's operation and request limits. Such writes commute: each
   * compares and changes only its own keys, so the joint transaction has the effect of running them
   * one after another, in any order, and it commits all of them or none.
   */
  private flush(): void {
    const queue = this.queue;
    this.queue = [];
    const groups: Array<{ ws: PendingWrite[]; keys: Set<string>; compares: number; ops: number; bytes: number }> = [];
    for (const w of queue) {
      const g = groups.find(
        (x) =>
          x.ws[0]!.fence === w.fence &&
          x.compares + w.compare.length < ETCD_MAX_TXN_OPS &&
          x.ops + w.success.length < ETCD_MAX_TXN_OPS &&
          x.bytes + w.bytes <= MAX_WRITE_BYTES &&
          !w.keys.some((k) => x.keys.has(k)),
      );
      if (g) {
        g.ws.push(w);
        g.compares += w.compare.length;
        g.ops += w.success.length;
        g.bytes += w.bytes;
        for (const k of w.keys) g.keys.add(k);
      } else {
        // a write whose own keys repeat (it cannot, but then it goes alone and etcd refuses it) still goes
        groups.push({ ws: [w], keys: new Set(w.keys), compares: w.compare.length, ops: w.success.length, bytes: w.bytes });
      }
    }
    for (const g of groups) this.send(g.ws);
  }

  /**
   * One etcd transaction for these writes (one or several, see flush); settles each write. Never
   * rejects: whatever fails after the transaction (applying it here) fails the writes, not the
   * process (an unsettled write or an unhandled rejection).
   */
  private send(ws: PendingWrite[]): void {
    this.transact(ws).catch((err: unknown) => {
      for (const w of ws) w.reject(err); // no-op for a write already settled
    });
  }

  private async transact(ws: PendingWrite[]): Promise<void> {
    const fence = ws[0]!.fence;
    const compare: ICompare[] = fence ? [{ key: fence.key, target: 'Create', result: 'Equal', create_revision: fence.createRevision }] : [];
    const success: IRequestOp[] = [];
    for (const w of ws) {
      for (const c of w.compare) compare.push(c);
      for (const o of w.success) success.push(o);
    }
    // the marker carries the proposal time: every manager times this revision's events the same way
    const time = ws[0]!.time;
    success.push({ request_put: { key: Buffer.from(this.revKey), value: Buffer.from(String(time)) } });
    for (const w of ws) {
      for (const [k, v] of w.sent) {
        const l = this.inflight.get(k);
        if (l) l.push(v);
        else this.inflight.set(k, [v]);
      }
    }
    let res: ITxnResponse;
    this.sending++;
    try {
      res = await this.client.kv.txn({ compare, success, failure: fence ? [{ request_range: { key: fence.key } }] : [] });
    } catch (err) {
      const e = new FlotillaError('UNAVAILABLE', `etcd: ${errorMessage(err)}`, { cause: err });
      for (const w of ws) w.reject(e);
      return;
    } finally {
      this.sending--;
      for (const w of ws) {
        for (const [k, v] of w.sent) {
          const l = this.inflight.get(k);
          if (l && l.length > 1) l.splice(l.indexOf(v), 1);
          else this.inflight.delete(k);
        }
      }
    }
    const rev = Number(res.header.revision);
    if (!res.succeeded) {
      if (fence) {
        const kv = res.responses[0]?.response_range?.kvs[0];
        if (!kv || kv.create_revision !== fence.createRevision) {
          if (this.fence === fence) this.lostLeadership('a fenced write found another leader');
          const e = new FlotillaError('FAILED_PRECONDITION', 'this manager is no longer the leader (its election key is gone): write refused');
          for (const w of ws) w.reject(e);
          return;
        }
      }
      // a joint transaction changed nothing: each write again on its own, for its own answer
      if (ws.length > 1) {
        for (const w of ws) this.send([w]);
        return;
      }
      ws[0]!.resolve({ rev, committed: false });
      return;
    }
    // committed: the store applies this revision from here once it is the next one (else the watch
    // brings the revisions before it first)
    if (rev > this.applied) {
      this.ownWrites.set(rev, { changes: ws.length === 1 ? ws[0]!.changes : ws.flatMap((w) => w.changes), time });
      this.advance(this.applied);
    }
    for (const w of ws) w.resolve({ rev, committed: true });
  }

  // ---- members and leadership

  /** Registers this manager under <prefix>/managers/<node id> on a lease, and campaigns. */
  private async register(): Promise<void> {
    const lease = this.client.lease(this.ttl);
    this.regLease = lease;
    lease.on('lost', (err) => {
      if (this.stopped) return;
      this.log.warn({ err: errorMessage(err) }, 'etcd: the registration lease was lost: registering again');
      void sleep(500).then(() => (this.stopped ? undefined : this.register()));
    });
    await lease.put(this.managersPrefix + this.self.nodeId).value(this.self.addr).exec().catch((err: unknown) => this.log.warn({ err: errorMessage(err) }, 'etcd: registering this manager failed'));
    this.startCampaign();
  }

  private startCampaign(): void {
    if (this.stopped || this.campaign) return;
    // keys <prefix>/election/leader/<lease id>, the lowest create revision leads
    const campaign = this.client.namespace(`${this.p}/`).election('leader', this.ttl).campaign(`${this.self.nodeId}\t${this.self.addr}`);
    this.campaign = campaign;
    const lease = (campaign as unknown as { lease: Lease }).lease;
    // the lease is alive at etcd for ttl after the last keepalive it received; this manager counts
    // from when it sent the last keepalive that succeeded, and steps down before the lease can expire
    let sent = Date.now();
    let lastOk = sent;
    lease.on('keepaliveFired', () => (sent = Date.now()));
    lease.on('keepaliveSucceeded', () => (lastOk = sent));
    clearInterval(this.leaseTimer);
    this.leaseTimer = setInterval(() => {
      if (this.campaign !== campaign || !this.leader) return;
      if (Date.now() - lastOk > this.ttl * 1000 - 500) this.lostLeadership(`no lease keepalive for ${Date.now() - lastOk} ms`);
    }, 100);
    campaign.on('elected', () => {
      if (this.campaign !== campaign) return;
      void (async () => {
        try {
          const key = Buffer.from(await campaign.getCampaignKey());
          const r = await this.client.get(key.toString()).exec();
          const kv = r.kvs[0];
          if (!kv || this.campaign !== campaign) throw new Error('the election key vanished');
          this.fence = { key, name: key.toString(), createRevision: kv.create_revision };
          // never act on a store that has not applied everything committed before the election
          await this.waitApplied(Number(r.header.revision));
          if (this.campaign !== campaign) return;
          this.leader = true;
          this.log.info({ key: key.toString() }, 'etcd: elected leader');
          for (const cb of this.leaderCbs) cb(true);
        } catch (err) {
          this.lostLeadership(`after the election: ${errorMessage(err)}`);
        }
      })();
    });
    campaign.on('error', (err) => {
      if (this.campaign !== campaign) return;
      this.lostLeadership(`campaign: ${errorMessage(err)}`);
    });
  }

  /** Steps down (leader loops stop through the handlers) and campaigns again. */
  private lostLeadership(why: string): void {
    const campaign = this.campaign;
    if (!campaign) return; // already stepped down; a new campaign is on its way
    this.campaign = undefined;
    this.fence = undefined;
    const was = this.leader;
    this.leader = false;
    if (was) {
      this.log.warn({ why }, 'etcd: lost leadership');
      for (const cb of this.leaderCbs) cb(false);
    }
    void campaign?.resign().catch(() => {});
    if (!this.stopped) setTimeout(() => this.startCampaign(), 200);
  }

  /** Called once the leader key was deleted by someone else (e.g. its lease expired while this process was stopped). */
  private checkLeaderKey(): void {
    const f = this.fence;
    if (!f || !this.leader) return;
    const c = this.candidates.get(f.name);
    if (!c || String(c.createRevision) !== f.createRevision) this.lostLeadership('the election key is gone');
  }

  onLeadershipChange(cb: (leader: boolean) => void): () => void {
    this.leaderCbs.add(cb);
    return () => this.leaderCbs.delete(cb);
  }

  isLeader(): boolean {
    return this.leader;
  }

  private leaderCandidate(): { nodeId: string; addr: string } | undefined {
    let best: { createRevision: number; value: string } | undefined;
    for (const c of this.candidates.values()) if (!best || c.createRevision < best.createRevision) best = c;
    if (!best) return undefined;
    const [nodeId = '', addr = ''] = best.value.split('\t');
    return { nodeId, addr };
  }

  leaderAddr(): string | undefined {
    return this.leaderCandidate()?.addr || undefined;
  }

  members(): MemberInfo[] {
    const lead = this.leaderCandidate()?.nodeId;
    return [...this.managerAddrs.entries()].map(([id, addr]) => ({ raftId: 0, addr, reachable: true, leader: id === lead, learner: false }));
  }

  get appliedRevision(): number {
    return this.applied;
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.leaseTimer);
    if (this.leader) {
      this.leader = false;
      for (const cb of this.leaderCbs) cb(false);
    }
    this.cancelWatch();
    await Promise.allSettled([this.campaign?.resign(), this.regLease?.revoke()]);
    for (const c of this.watchClients.values()) c.close();
    for (const waiter of this.appliedWaiters) waiter.resolve();
    this.appliedWaiters = [];
    this.client.close();
  }
}

const writer = new BinaryWriter();

/** An object's protobuf encoding (one writer, reused: it keeps the buffer it grew). */
function encodeObject(table: Table, o: StoreObject): Uint8Array {
  try {
    return (CODECS[table] as unknown as { encode(o: StoreObject, w: BinaryWriter): BinaryWriter }).encode(o, writer).finish();
  } catch (err) {
    writer.finish(); // a value the encoder refused: start the next one on an empty writer
    throw err;
  }
}

function rangeEnd(prefix: Buffer): Buffer {
  const end = Buffer.from(prefix);
  end[end.length - 1]! += 1;
  return end;
}
