/**
 * Raft messages between managers over gRPC (the `Raft` service of proto/flotilla/v1/raft.proto).
 *
 * Outbound: one client stream (Raft.Stream) per peer carrying RaftEnvelope{message}. Each peer has
 * a bounded queue (default 4096 messages); when the peer is slow or unreachable the queue fills and
 * further messages are DROPPED (Raft retransmits), and onUnreachable(id) tells the driver, which
 * calls rawNode.reportUnreachable(id). After a stream fails, the peer is in backoff (100 ms doubling
 * to 2 s) during which its messages are dropped without trying. Snapshots go on a stream of their
 * own, in chunks (SnapshotChunk, default 1 MiB); when the receiver has answered the stream,
 * onSnapshotStatus(id, true) fires (false on any failure).
 *
 * Inbound: addRaftService(server, handlers) registers the service on a grpc.Server owned by the
 * caller (the manager serves raft, dispatcher and control on one port). Chunks are reassembled
 * per stream into one Message with its snapshot.
 */
import * as grpc from '@grpc/grpc-js';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { grpcError } from '../grpc.js';
import { createHash } from 'node:crypto';
import { type AuthzOptions, type Policy, authorize, callerOf } from '../ca/authz.js';
import {
  RaftClient,
  RaftService,
  type JoinRaftRequest,
  type JoinRaftResponse,
  type LeaveRaftRequest,
  type Message,
  type RaftEnvelope,
  type RaftServer,
} from '../../gen/flotilla/v1/raft.js';

export const DEFAULT_QUEUE = 4096;
export const DEFAULT_CHUNK = 1024 * 1024;
const BACKOFF_MIN = 100;
const BACKOFF_MAX = 2000;
/** a snapshot larger than this is refused by the receiver */
const MAX_SNAPSHOT = 2 * 1024 * 1024 * 1024 - 1;

export const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
  'grpc.keepalive_time_ms': 5000,
  'grpc.keepalive_timeout_ms': 3000,
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 2000,
  // TLS: a fixed server name (peers are checked by certificate role, not host name); ignored by
  // plain-text channels (tests of the Raft layer alone)
  'grpc.ssl_target_name_override': 'flotilla',
};

/** What the server side of the Raft service calls into (the RaftNode). */
export interface RaftServiceHandlers {
  /** a message from a peer (a chunked snapshot arrives reassembled) */
  onMessage(m: Message): void;
  join(req: JoinRaftRequest, signal: AbortSignal): Promise<JoinRaftResponse>;
  propose(data: Buffer, signal: AbortSignal): Promise<void>;
  /** the read index for a linearizable read (served by the leader) */
  readIndex(signal: AbortSignal): Promise<number>;
  leave(req: LeaveRaftRequest, signal: AbortSignal): Promise<void>;
}

function unary<Req, Res>(fn: (req: Req, signal: AbortSignal) => Promise<Res>): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    const ac = new AbortController();
    call.on('cancelled', () => ac.abort());
    fn(call.request, ac.signal).then(
      (res) => callback(null, res),
      (err: unknown) => callback(grpcError(err)),
    );
  };
}

/** Register the Raft service on a server the caller owns (and binds). */
export function addRaftService(server: grpc.Server, handlers: RaftServiceHandlers, log?: Logger, authz?: AuthzOptions): void {
  const impl: RaftServer = {
    stream(call, callback) {
      // with mutual TLS: the caller's certificate says who it is, and a message claiming to come
      // from another member is dropped
      const caller = authz ? callerOf(call)?.identity?.nodeId : undefined;
      const want = caller !== undefined ? raftIdsOfNode(caller) : undefined;
      let warned = false;
      const forged = (m: Message | undefined): boolean => {
        if (want === undefined || !m || want.has(m.from)) return false;
        if (!warned) log?.warn({ node: caller, claimed: m.from }, 'raft: dropping messages whose sender is not the certificate\'s node');
        warned = true;
        return true;
      };
      let header: Message | undefined;
      let parts: Buffer[] = [];
      let size = 0;
      let failed = false;
      const fail = (why: string): void => {
        if (failed) return;
        failed = true;
        callback(grpcError(new FlotillaError('INVALID_ARGUMENT', `raft stream: ${why}`)));
      };
      call.on('data', (env: RaftEnvelope) => {
        if (failed) return;
        try {
          if (env.message && !forged(env.message)) handlers.onMessage(env.message);
          const c = env.chunk;
          if (!c) return;
          if (!c.header) return fail('snapshot chunk without a header');
          if (forged(c.header)) return fail('snapshot from a sender that is not the certificate\'s node');
          if (c.offset !== size) return fail(`snapshot chunk at offset ${c.offset}, expected ${size}`);
          header ??= c.header;
          size += c.data.length;
          if (size > MAX_SNAPSHOT) return fail(`snapshot larger than ${MAX_SNAPSHOT} bytes`);
          parts.push(c.data);
          if (c.last) {
            const data = parts.length === 1 ? parts[0]! : Buffer.concat(parts, size);
            const m: Message = { ...header, snapshot: { data, metadata: header.snapshot?.metadata } };
            header = undefined;
            parts = [];
            size = 0;
            handlers.onMessage(m);
          }
        } catch (err) {
          log?.warn({ err: errorMessage(err) }, 'raft: handling an incoming message failed');
        }
      });
      call.on('end', () => {
        if (!failed) callback(null, {});
      });
      call.on('error', () => {
        failed = true;
      });
    },
    join: (call, cb) =>
      unary((req: JoinRaftRequest, signal) => {
        // the joiner is the caller (or a manager forwarding a joiner's request with its node id)
        const id = authz ? callerOf(call)?.identity?.nodeId : undefined;
        return handlers.join(id !== undefined && !req.nodeId ? { ...req, nodeId: id } : req, signal);
      })(call, cb),
    propose: unary(async (req: { data: Buffer }, signal) => {
      await handlers.propose(req.data, signal);
      return {};
    }),
    readIndex: unary(async (_req: object, signal) => ({ index: await handlers.readIndex(signal) })),
    leave: unary(async (req: LeaveRaftRequest, signal) => {
      await handlers.leave(req, signal);
      return {};
    }),
  };
  server.addService(RaftService, authz ? authorize(RaftService, impl, RAFT_POLICY, authz) : impl);
}

/** Only managers reach Raft (with mutual TLS). */
export const RAFT_POLICY: Policy<RaftServer> = { stream: ['manager'], join: ['manager'], propose: ['manager'], readIndex: ['manager'], leave: ['manager'] };

/**
 * A manager's raft ids are derived from its node id (its certificate's CN), so that a message's
 * sender can be checked against the certificate of the connection it arrives on: the id of
 * generation g is a hash of (node id, g), 1 .. 2^44. The leader picks a random generation at each
 * join, since a member removed (demoted) and added again (promoted) must not reuse its old raft id.
 */
export const RAFT_ID_GENERATIONS = 1024;
export function raftIdForNode(nodeId: string, generation = 0): number {
  return parseInt(createHash('sha256').update(`${nodeId}/${generation}`).digest('hex').slice(0, 11), 16) + 1;
}

const idSets = new Map<string, ReadonlySet<number>>();
/** Every raft id a node may hold. */
export function raftIdsOfNode(nodeId: string): ReadonlySet<number> {
  let s = idSets.get(nodeId);
  if (!s) {
    const ids = new Set<number>();
    for (let g = 0; g < RAFT_ID_GENERATIONS; g++) ids.add(raftIdForNode(nodeId, g));
    s = ids;
    if (idSets.size > 1000) idSets.clear();
    idSets.set(nodeId, s);
  }
  return s;
}

export interface TransportOptions {
  /** this node's raft id */
  id: number;
  signal: AbortSignal;
  /** messages queued per peer before dropping (default 4096) */
  queueSize?: number;
  /** snapshot chunk size (default 1 MiB) */
  chunkBytes?: number;
  credentials?: grpc.ChannelCredentials;
  onUnreachable(id: number): void;
  onSnapshotStatus(id: number, ok: boolean): void;
  log?: Logger;
}

export interface PeerStatus {
  id: number;
  addr: string;
  reachable: boolean;
  queued: number;
  dropped: number;
  sent: number;
}

class Peer {
  readonly client: RaftClient;
  private call: grpc.ClientWritableStream<RaftEnvelope> | undefined;
  private queue: Message[] = [];
  private blocked = false;
  private backoff = 0;
  private backoffUntil = 0;
  reachable = true;
  dropped = 0;
  sent = 0;
  snapshotInFlight = false;
  private stopped = false;

  constructor(
    readonly id: number,
    readonly addr: string,
    private readonly t: RaftTransport,
    private readonly opts: TransportOptions,
  ) {
    this.client = new RaftClient(addr, opts.credentials ?? grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  }

  queued(): number {
    return this.queue.length;
  }

  send(m: Message): void {
    if (this.stopped) return;
    if (Date.now() < this.backoffUntil) {
      this.drop(1);
      return;
    }
    if (this.queue.length >= (this.opts.queueSize ?? DEFAULT_QUEUE)) {
      this.drop(1);
      return;
    }
    this.queue.push(m);
    this.pump();
  }

  private drop(n: number): void {
    this.dropped += n;
    this.opts.onUnreachable(this.id);
  }

  private ensureCall(): grpc.ClientWritableStream<RaftEnvelope> {
    if (this.call) return this.call;
    const call = this.client.stream((err) => {
      if (this.call === call) {
        this.call = undefined;
        this.blocked = false;
      }
      if (err && !this.stopped) this.failed(err);
    });
    call.on('error', () => {});
    this.call = call;
    return call;
  }

  private failed(err: unknown): void {
    this.reachable = false;
    this.backoff = this.backoff === 0 ? BACKOFF_MIN : Math.min(BACKOFF_MAX, this.backoff * 2);
    this.backoffUntil = Date.now() + this.backoff;
    const n = this.queue.length;
    this.queue = [];
    this.dropped += n;
    this.opts.log?.debug({ peer: this.id, addr: this.addr, err: errorMessage(err), backoffMs: this.backoff }, 'raft: peer stream failed');
    this.opts.onUnreachable(this.id);
  }

  private pump(): void {
    if (this.blocked || this.stopped) return;
    const call = this.ensureCall();
    while (this.queue.length > 0) {
      const m = this.queue.shift()!;
      this.sent++;
      const ok = call.write({ message: m, chunk: undefined });
      if (!ok) {
        this.blocked = true;
        call.once('drain', () => {
          if (this.call !== call) return;
          this.blocked = false;
          this.markHealthy();
          this.pump();
        });
        return;
      }
    }
  }

  /** A write went through the flow control window: the peer reads what we send. */
  markHealthy(): void {
    this.reachable = true;
    this.backoff = 0;
    this.backoffUntil = 0;
  }

  async sendSnapshot(m: Message): Promise<void> {
    const chunk = this.opts.chunkBytes ?? DEFAULT_CHUNK;
    const data = m.snapshot?.data ?? Buffer.alloc(0);
    const header: Message = { ...m, snapshot: { data: Buffer.alloc(0), metadata: m.snapshot?.metadata } };
    const signal = this.opts.signal;
    this.snapshotInFlight = true;
    try {
      await new Promise<void>((resolve, reject) => {
        const call = this.client.stream((err) => (err ? reject(err) : resolve()));
        call.on('error', () => {});
        const onAbort = (): void => call.cancel();
        signal.addEventListener('abort', onAbort, { once: true });
        const write = async (): Promise<void> => {
          let off = 0;
          do {
            const end = Math.min(data.length, off + chunk);
            const ok = call.write({ message: undefined, chunk: { header, data: data.subarray(off, end), offset: off, last: end === data.length } });
            off = end;
            if (!ok) await new Promise<void>((r) => call.once('drain', () => r()));
            if (signal.aborted) throw signal.reason;
          } while (off < data.length);
          call.end();
        };
        write().then(
          () => signal.removeEventListener('abort', onAbort),
          (err: unknown) => {
            signal.removeEventListener('abort', onAbort);
            call.cancel();
            reject(err instanceof Error ? err : new Error(String(err)));
          },
        );
      });
      this.markHealthy();
      this.opts.onSnapshotStatus(this.id, true);
    } catch (err) {
      this.opts.log?.warn({ peer: this.id, addr: this.addr, err: errorMessage(err) }, 'raft: sending a snapshot failed');
      if (!this.stopped) {
        this.opts.onUnreachable(this.id);
        this.opts.onSnapshotStatus(this.id, false);
      }
    } finally {
      this.snapshotInFlight = false;
    }
  }

  close(): void {
    this.stopped = true;
    this.queue = [];
    try {
      this.call?.cancel();
    } catch {}
    this.call = undefined;
    this.client.close();
  }
}

export class RaftTransport {
  private readonly peers = new Map<number, Peer>();
  private readonly snapshotSends = new Set<Promise<void>>();
  private stopped = false;

  constructor(readonly opts: TransportOptions) {
    opts.signal.addEventListener('abort', () => this.stop(), { once: true });
  }

  /** Add or update a peer's address (a changed address replaces the connection). */
  setPeer(id: number, addr: string): void {
    if (this.stopped || id === this.opts.id || !addr) return;
    const cur = this.peers.get(id);
    if (cur?.addr === addr) return;
    cur?.close();
    this.peers.set(id, new Peer(id, addr, this, this.opts));
  }

  removePeer(id: number): void {
    this.peers.get(id)?.close();
    this.peers.delete(id);
  }

  peerAddr(id: number): string | undefined {
    return this.peers.get(id)?.addr;
  }

  /** A client for unary calls to a peer (Join/Propose/ReadIndex/Leave forwarding). */
  client(id: number): RaftClient | undefined {
    return this.peers.get(id)?.client;
  }

  status(): PeerStatus[] {
    return [...this.peers.values()].map((p) => ({ id: p.id, addr: p.addr, reachable: p.reachable, queued: p.queued(), dropped: p.dropped, sent: p.sent }));
  }

  /** A message from the peer arrived: it is reachable (ends its backoff). */
  heardFrom(id: number): void {
    this.peers.get(id)?.markHealthy();
  }

  isReachable(id: number): boolean {
    return this.peers.get(id)?.reachable ?? false;
  }

  /** Send messages (after the Ready that produced them was persisted). Never blocks. */
  send(msgs: Message[]): void {
    if (this.stopped) return;
    for (const m of msgs) {
      const p = this.peers.get(m.to);
      if (!p) {
        this.opts.log?.debug({ to: m.to, type: m.type }, 'raft: no address for peer; message dropped');
        this.opts.onUnreachable(m.to);
        continue;
      }
      if (m.snapshot && m.snapshot.metadata && m.snapshot.metadata.index > 0) {
        if (p.snapshotInFlight) continue;
        const pr = p.sendSnapshot(m).finally(() => this.snapshotSends.delete(pr));
        this.snapshotSends.add(pr);
        continue;
      }
      p.send(m);
    }
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    for (const p of this.peers.values()) p.close();
    this.peers.clear();
  }

  /** Wait for snapshot sends to settle (they end on stop() via the signal). */
  async drain(): Promise<void> {
    await Promise.allSettled([...this.snapshotSends]);
  }
}

/** Promise wrapper of a unary RaftClient call with an AbortSignal and a deadline. */
export function callUnary<Req, Res>(
  client: RaftClient,
  method: 'join' | 'propose' | 'readIndex' | 'leave',
  req: Req,
  signal: AbortSignal | undefined,
  timeoutMs: number,
): Promise<Res> {
  return new Promise<Res>((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason instanceof Error ? signal.reason : new FlotillaError('ABORTED', 'aborted'));
      return;
    }
    const fn = client[method] as unknown as (
      req: Req,
      md: grpc.Metadata,
      opts: Partial<grpc.CallOptions>,
      cb: (err: grpc.ServiceError | null, res: Res) => void,
    ) => grpc.ClientUnaryCall;
    const onAbort = (): void => call.cancel();
    const call = fn.call(client, req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => {
      signal?.removeEventListener('abort', onAbort);
      if (err) reject(fromGrpcError(err));
      else resolve(res);
    });
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

const FROM_GRPC: Partial<Record<number, FlotillaError['code']>> = {
  [grpc.status.INVALID_ARGUMENT]: 'INVALID_ARGUMENT',
  [grpc.status.NOT_FOUND]: 'NOT_FOUND',
  [grpc.status.ALREADY_EXISTS]: 'ALREADY_EXISTS',
  [grpc.status.FAILED_PRECONDITION]: 'FAILED_PRECONDITION',
  [grpc.status.PERMISSION_DENIED]: 'PERMISSION_DENIED',
  [grpc.status.RESOURCE_EXHAUSTED]: 'RESOURCE_EXHAUSTED',
  [grpc.status.ABORTED]: 'ABORTED',
  [grpc.status.DEADLINE_EXCEEDED]: 'DEADLINE_EXCEEDED',
  [grpc.status.CANCELLED]: 'ABORTED',
  [grpc.status.INTERNAL]: 'INTERNAL',
};

export function fromGrpcError(err: grpc.ServiceError): FlotillaError {
  return new FlotillaError(FROM_GRPC[err.code] ?? 'UNAVAILABLE', err.details || err.message, { cause: err });
}
