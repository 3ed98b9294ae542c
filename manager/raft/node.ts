/**
 * RaftNode: the driver around the pure Raft core (core.ts). It owns a RawNode, the durable storage
 * (wal.ts), the gRPC transport (transport.ts) and a ticker, and runs the Ready loop, one Ready at
 * a time through the Ready handler (ready.ts, shared with the simulator):
 *
 *   persist (snapshot file, WAL write; a leader sends first) -> fsync (committed entries already
 *   durable are applied meanwhile) -> send -> apply the snapshot and the rest -> advance
 *
 * Whatever arrives while a Ready's fsync runs lands in the next Ready and shares its fsync (group
 * commit).
 *
 * Proposals carry a random request id; propose() resolves when the entry carrying it is applied
 * locally. A proposal on a follower is forwarded to the leader by the core. When the known leader
 * changes, pending proposals and reads are rejected with a retryable UNAVAILABLE error (the entry
 * may or may not have been committed). Waiting requests live in one registry (waiters.ts).
 *
 * The other seams: the log and snapshot encodings (encoding.ts), membership and joining
 * (membership.ts), the gRPC service (service.ts), force-new-cluster (force-new-cluster.ts).
 */
import * as grpc from '@grpc/grpc-js';
import { randomBytes, randomInt } from 'node:crypto';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { ConfChangeType, EntryType, type JoinRaftRequest, type JoinRaftResponse, type LeaveRaftRequest, type RaftClient } from '../../gen/flotilla/v1/raft.js';
import { RawNode, decodeConfChange } from './core.js';
import { MAX_PROPOSAL, encodeContext, newRid, parseContext, unwrapProposal, unwrapSnapshot, wrapProposal, wrapSnapshot } from './encoding.js';
import { forceNewCluster } from './force-new-cluster.js';
import { MemberBook, checkRemovalQuorum, joinCluster, learnerToPromote, transferTarget, writeMembersFile } from './membership.js';
import { snapIndex } from './memory-storage.js';
import { HeldEmptyAppends, ReadyRunner } from './ready.js';

/**
 * How long a leader's commit-only append waits for an append that can carry its commit index
 * (HeldEmptyAppends): a follower's commit index may lag the leader's by this much when writes stop.
 */
const HOLD_EMPTY_APPEND_MS = 5;
import { attachRaftService, type ServiceRef } from './service.js';
import { CHANNEL_OPTIONS, RAFT_ID_GENERATIONS, RaftTransport, callUnary, raftIdForNode, raftIdsOfNode } from './transport.js';
import type { AuthzOptions } from '../ca/authz.js';
import type { Entry, Ready, Snapshot } from './types.js';
import { DEFAULT_SEGMENT_BYTES, Wal } from './wal.js';
import { Waiters } from './waiters.js';
import { sleep } from '../../common/sleep.js';
import { writeFileAtomicSync } from '../../common/fsutil.js';

export { coalesceAcks } from './ready.js';

export interface StateMachine {
  /** apply a committed entry (deterministically, the same on every manager); a throw is logged and rejects the local proposer */
  apply(data: Uint8Array, index: number): void;
  /** the whole state, for a snapshot */
  snapshot(): Uint8Array;
  /** replace the whole state with a snapshot's (index: the snapshot's last index) */
  restore(data: Uint8Array, index: number): void;
}

export interface RaftNodeOptions {
  /** this node's raft id for a brand-new cluster (default: random; a joiner gets its id from the leader) */
  id?: number;
  /** where the WAL and snapshots live (the manager passes <data>/raft) */
  dataDir: string;
  /** address to bind when no `server` is given (e.g. "127.0.0.1:0") */
  listenAddr?: string;
  /** the address peers reach this node at (default: the bound listen address) */
  advertiseAddr?: string;
  /** register the Raft service on this server (the caller binds and shuts it down) */
  server?: grpc.Server;
  /** static bootstrap of a brand-new cluster: every founding member, this one included */
  peers?: { id: number; addr: string }[];
  /** address of a member of an existing cluster to join (brand-new nodes only) */
  join?: string;
  /** the token sent with Join; when set, Join requests to this node must carry it too */
  joinToken?: string;
  /** extra check of Join requests (throw a FlotillaError to refuse) */
  validateJoin?: (req: JoinRaftRequest) => void | Promise<void>;
  stateMachine: StateMachine;
  signal: AbortSignal;
  tickMs?: number;
  electionTick?: number;
  heartbeatTick?: number;
  /** take a snapshot (and compact the log) every N applied entries (default 10,000) */
  snapshotEvery?: number;
  /** entries kept in memory behind a snapshot for slow followers (default 1,000) */
  compactKeep?: number;
  /** restart from the local state as a one-member cluster (quorum loss recovery) */
  forceNewCluster?: boolean;
  /** proposals and reads not done within this are rejected (default 15 s) */
  requestTimeoutMs?: number;
  segmentBytes?: number;
  /** the data-encryption key: WAL records and snapshots are sealed with it (manager/keys); none: plaintext (tests) */
  dek?: Uint8Array;
  /** WAL segments are extended with zeros this far ahead of the last record (default 4 MiB, at most segmentBytes; 0: off) */
  preallocBytes?: number;
  queueSize?: number;
  chunkBytes?: number;
  credentials?: grpc.ChannelCredentials;
  serverCredentials?: grpc.ServerCredentials;
  /**
   * Mutual TLS: authorize the Raft service by certificate (managers only), drop messages whose
   * sender is not the certificate's node, and give members raft ids derived from their node ids
   * (raftIdForNode; `nodeId` is this member's).
   */
  authz?: AuthzOptions;
  nodeId?: string;
  log?: Logger;
}

export interface RaftMemberInfo {
  raftId: number;
  addr: string;
  reachable: boolean;
  leader: boolean;
  learner: boolean;
}

function retryable(why: string): FlotillaError {
  return new FlotillaError('UNAVAILABLE', why);
}

function walPrealloc(opts: RaftNodeOptions): number {
  return Math.min(opts.preallocBytes ?? 4 * 1024 * 1024, opts.segmentBytes ?? DEFAULT_SEGMENT_BYTES);
}

function openWal(opts: RaftNodeOptions): Wal {
  return Wal.open({ dir: opts.dataDir, segmentBytes: opts.segmentBytes, preallocBytes: walPrealloc(opts), log: opts.log, dek: opts.dek });
}

export class RaftNode {
  /** this node's raft id */
  readonly id: number;
  /** the address peers reach this node at */
  readonly addr: string;
  private raw!: RawNode;
  private readonly wal: Wal;
  private readonly transport: RaftTransport;
  private readonly sm: StateMachine;
  private readonly log: Logger | undefined;
  private readonly events = new EventEmitter();
  private readonly book: MemberBook;
  /** proposals, conf changes, reads, waits for the applied index */
  private readonly waiters: Waiters;
  private ticker: NodeJS.Timeout | undefined;
  private readyScheduled = false;
  private readyAgain = false;
  private loop: Promise<void> | undefined;
  private applied = 0;
  private lastSnapshotIndex = 0;
  private runner!: ReadyRunner<Promise<void>>;
  /** a leader's commit-only appends wait a moment for an append that can carry them (ready.ts) */
  private readonly heldApps = new HeldEmptyAppends((msgs) => this.transport.send(msgs), HOLD_EMPTY_APPEND_MS);
  private syncStart = 0;
  private lead = 0;
  private leader = false;
  private stopped = false;
  private stopping: Promise<void> | undefined;
  private removed = false;
  private fatal: unknown;
  private readonly ownServer: grpc.Server | undefined;
  private readonly tickMs: number;
  private readonly electionTick: number;
  private readonly snapshotEvery: number;
  private readonly compactKeep: number;
  private readonly requestTimeoutMs: number;
  private readonly ac = new AbortController();
  /** counters for benchmarks and tests */
  readonly stats = { readies: 0, syncs: 0, entries: 0, committed: 0, messagesOut: 0, messagesIn: 0, proposals: 0, syncMs: 0 };

  private constructor(
    private readonly opts: RaftNodeOptions,
    init: { id: number; addr: string; wal: Wal; server: grpc.Server | undefined; members: Map<number, string> },
  ) {
    this.id = init.id;
    this.addr = init.addr;
    this.wal = init.wal;
    this.ownServer = init.server;
    this.sm = opts.stateMachine;
    this.log = opts.log;
    this.tickMs = opts.tickMs ?? 100;
    this.electionTick = opts.electionTick ?? 10;
    this.snapshotEvery = opts.snapshotEvery ?? 10_000;
    this.compactKeep = opts.compactKeep ?? 1000;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 15_000;
    this.book = new MemberBook(this.id, path.join(opts.dataDir, 'members.json'), init.members);
    this.waiters = new Waiters(this.requestTimeoutMs);
    this.events.setMaxListeners(0);
    this.transport = new RaftTransport({
      id: this.id,
      signal: this.ac.signal,
      queueSize: opts.queueSize,
      chunkBytes: opts.chunkBytes,
      credentials: opts.credentials,
      log: opts.log,
      onUnreachable: (peer) => {
        if (this.stopped) return;
        this.raw.reportUnreachable(peer);
        this.scheduleReady();
      },
      onSnapshotStatus: (peer, ok) => {
        if (this.stopped) return;
        this.raw.reportSnapshot(peer, ok);
        this.scheduleReady();
      },
    });
  }

  /** Open (or create, or join) a raft node. Resolves once the node runs (not necessarily with a leader). */
  static async open(opts: RaftNodeOptions): Promise<RaftNode> {
    opts.signal.throwIfAborted();
    fs.mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
    const log = opts.log;
    const idFile = path.join(opts.dataDir, 'node.json');
    const membersFile = path.join(opts.dataDir, 'members.json');
    const existing = Wal.exists(opts.dataDir);

    // the server first: a joiner must be reachable as soon as the leader adds it
    let server: grpc.Server | undefined;
    let addr = opts.advertiseAddr ?? '';
    let handlers: ServiceRef;
    if (opts.server) {
      handlers = attachRaftService(opts.server, log, opts.authz);
      if (!addr) throw new FlotillaError('INVALID_ARGUMENT', 'raft: advertiseAddr is required when the server is given');
    } else {
      if (!opts.listenAddr) throw new FlotillaError('INVALID_ARGUMENT', 'raft: listenAddr or server is required');
      server = new grpc.Server(CHANNEL_OPTIONS);
      handlers = attachRaftService(server, log);
      const srv = server;
      const port = await new Promise<number>((resolve, reject) =>
        srv.bindAsync(opts.listenAddr!, opts.serverCredentials ?? grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(new FlotillaError('UNAVAILABLE', `raft: cannot listen on ${opts.listenAddr}: ${err.message}`)) : resolve(p))),
      );
      const host = opts.listenAddr.replace(/:\d+$/, '');
      if (!addr) addr = `${host === '0.0.0.0' || host === '[::]' ? '127.0.0.1' : host}:${port}`;
      else if (/:0$/.test(addr)) addr = addr.replace(/:0$/, `:${port}`);
    }

    try {
      let id: number;
      let peers: number[] | undefined;
      const members = new Map<number, string>();
      if (existing) {
        if (!fs.existsSync(idFile)) throw new FlotillaError('INTERNAL', `raft: ${opts.dataDir} holds a log but no node.json (raft id); refusing to start`);
        id = (JSON.parse(fs.readFileSync(idFile, 'utf8')) as { id: number }).id;
        if (fs.existsSync(membersFile)) {
          for (const m of JSON.parse(fs.readFileSync(membersFile, 'utf8')) as { id: number; addr: string }[]) members.set(m.id, m.addr);
        }
      } else if (opts.join) {
        const res = await joinCluster({ ...opts, join: opts.join }, addr);
        id = res.raftId;
        for (const m of res.members) members.set(m.raftId, m.addr);
        writeMembersFile(membersFile, members);
        writeFileAtomicSync(idFile, JSON.stringify({ id }, null, 1));
      } else {
        if (opts.peers && opts.peers.length > 0) {
          if (opts.id === undefined || !opts.peers.some((p) => p.id === opts.id)) {
            throw new FlotillaError('INVALID_ARGUMENT', `raft: id ${JSON.stringify(opts.id)} must be one of the peers`);
          }
          id = opts.id;
          peers = opts.peers.map((p) => p.id);
          for (const p of opts.peers) members.set(p.id, p.id === id ? addr : p.addr);
        } else {
          id = opts.id ?? (opts.nodeId ? raftIdForNode(opts.nodeId) : randomInt(1, 2 ** 47));
          peers = [id];
          members.set(id, addr);
        }
        writeMembersFile(membersFile, members);
        writeFileAtomicSync(idFile, JSON.stringify({ id }, null, 1));
      }
      members.set(id, addr);

      let wal = openWal(opts);
      if (existing && opts.forceNewCluster) {
        wal = forceNewCluster(wal, opts, id, addr, members, () => openWal(opts));
      }
      const node = new RaftNode(opts, { id, addr, wal, server, members });
      node.start(peers);
      handlers.node = node;
      return node;
    } catch (err) {
      server?.forceShutdown();
      throw err;
    }
  }

  private start(peers: number[] | undefined): void {
    const storage = this.wal.storage;
    const snap = storage.snapshot();
    if (snapIndex(snap) > 0) this.restoreSnapshot(snap);
    this.raw = new RawNode({
      id: this.id,
      peers,
      storage,
      applied: this.applied,
      electionTick: this.electionTick,
      heartbeatTick: this.opts.heartbeatTick ?? 1,
      preVote: true,
      checkQuorum: true,
      maxSizePerMsg: 1024 * 1024,
      maxInflightMsgs: 256,
    });
    const wal = this.wal;
    this.runner = new ReadyRunner<Promise<void>>(
      {
        storage,
        saveSnapshot: (snap) => {
          wal.saveSnapshot(snap);
          this.lastSnapshotIndex = snapIndex(snap);
        },
        write: (hs, entries) => wal.write(hs, entries),
        startSync: () => {
          this.syncStart = performance.now();
          return wal.syncAsync();
        },
      },
      {
        onSoftState: (lead, isLeader) => this.onSoftState(lead, isLeader),
        send: (msgs) => this.heldApps.send(msgs),
        restoreSnapshot: (snap) => this.restoreSnapshot(snap),
        applyEntry: (e) => this.applyEntry(e),
        afterApply: () => this.wakeApplied(),
        readState: (rs) => this.waiters.settle(readKey(rs.context), rs.index),
        advance: (rd) => this.raw.advance(rd),
      },
    );
    this.book.connect(this.transport);
    this.ticker = setInterval(() => this.tick(), this.tickMs);
    this.opts.signal.addEventListener('abort', this.onAbort, { once: true });
    // a lone voter need not wait for an election timeout
    const cs = this.raw.confState();
    if (cs.voters.length === 1 && cs.voters[0] === this.id) this.raw.campaign();
    else if (peers && peers.length === 1 && peers[0] === this.id) this.raw.campaign();
    this.scheduleReady();
  }

  private readonly onAbort = (): void => {
    this.stop().catch((err: unknown) => this.log?.error({ err: errorMessage(err) }, 'raft: stop failed'));
  };

  // ------------------------------------------------------------------ the loop

  private tick(): void {
    if (this.stopped) return;
    this.raw.tick();
    if (this.leader) this.promoteLearners();
    this.scheduleReady();
  }

  private scheduleReady(): void {
    if (this.readyScheduled || this.stopped) return;
    this.readyScheduled = true;
    setImmediate(() => this.processReady());
  }

  private processReady(): void {
    this.readyScheduled = false;
    if (this.stopped) return;
    if (this.loop) {
      this.readyAgain = true;
      return;
    }
    this.loop = this.runReadyLoop().finally(() => {
      this.loop = undefined;
      if (this.readyAgain || (!this.stopped && this.raw.hasReady())) {
        this.readyAgain = false;
        this.scheduleReady();
      }
    });
  }

  /**
   * One Ready at a time. While a Ready's fsync runs (on the thread pool), messages and proposals
   * keep being stepped into the core; they form the next Ready and share its fsync.
   */
  private async runReadyLoop(): Promise<void> {
    try {
      for (let i = 0; i < 64 && !this.stopped && this.raw.hasReady(); i++) await this.handleReady(this.raw.ready());
      if (!this.stopped) this.maybeSnapshot();
    } catch (err) {
      this.fail(err);
    }
  }

  private async handleReady(rd: Ready): Promise<void> {
    const stats = this.stats;
    stats.readies++;
    stats.entries += rd.entries.length;
    stats.committed += rd.committedEntries.length;
    stats.messagesOut += rd.messages.length;
    if (rd.mustSync) stats.syncs++;
    const step = this.runner.begin(rd);
    if (step.error !== undefined) {
      await step.sync?.catch(() => {});
      throw step.error;
    }
    if (step.sync) {
      await step.sync;
      stats.syncMs += performance.now() - this.syncStart;
    }
    if (this.stopped) return;
    this.runner.finish(step);
  }

  private onSoftState(lead: number, isLeader: boolean): void {
    if (lead !== this.lead) {
      const prev = this.lead;
      this.lead = lead;
      if (prev !== 0) {
        const err = retryable(`raft leader changed (${prev} -> ${lead || 'none'}) while the request was in flight; it may or may not have been committed: retry`);
        this.rejectAll(err);
      }
      this.events.emit('leader', lead);
    }
    if (isLeader !== this.leader) {
      this.leader = isLeader;
      this.log?.info({ id: this.id, leader: isLeader, lead }, isLeader ? 'raft: became leader' : 'raft: lost leadership');
      this.events.emit('leadership', isLeader);
    }
  }

  private rejectAll(err: unknown): void {
    this.waiters.rejectAll(err);
  }

  private restoreSnapshot(snap: Snapshot): void {
    const { members, state } = unwrapSnapshot(snap.data);
    this.sm.restore(state, snapIndex(snap));
    this.applied = snapIndex(snap);
    this.lastSnapshotIndex = Math.max(this.lastSnapshotIndex, this.applied);
    this.book.restore(members, snap.metadata?.confState);
  }

  private applyEntry(e: Entry): void {
    if (e.index <= this.applied) return;
    if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) {
      const cc = decodeConfChange(e.data);
      this.raw.applyConfChange(cc);
      const ctx = parseContext(cc.context);
      if (this.book.apply(cc, ctx)) {
        this.removed = true;
        this.log?.warn({ id: this.id }, 'raft: this node was removed from the cluster');
        this.events.emit('removed');
      }
      this.applied = e.index;
      if (ctx.rid) this.waiters.settle(ctx.rid, undefined);
      return;
    }
    this.applied = e.index;
    if (e.data.length === 0) return;
    const { rid, payload } = unwrapProposal(e.data);
    let failure: unknown;
    try {
      this.sm.apply(payload, e.index);
    } catch (err) {
      failure = err;
      if (!rid || !this.waiters.has(rid)) this.log?.warn({ index: e.index, err: errorMessage(err) }, 'raft: applying an entry failed');
    }
    if (rid) this.waiters.settle(rid, undefined, failure);
  }

  private wakeApplied(): void {
    this.waiters.wakeApplied(this.applied);
  }

  private maybeSnapshot(): void {
    if (this.applied - this.lastSnapshotIndex < this.snapshotEvery) return;
    const storage = this.wal.storage;
    const index = this.applied;
    const t0 = Date.now();
    const data = wrapSnapshot(this.book.addrs, this.sm.snapshot());
    const snap = storage.createSnapshot(index, this.raw.confState(), data);
    this.wal.saveSnapshot(snap);
    this.lastSnapshotIndex = index;
    const compactTo = index - this.compactKeep;
    if (compactTo >= storage.firstIndex()) storage.compact(compactTo);
    const released = this.wal.releaseTo(index);
    this.log?.info({ index, bytes: data.length, ms: Date.now() - t0, released }, 'raft: snapshot saved');
  }

  /** Leader only: promote a learner that has caught up (one conf change at a time). */
  private promoteLearners(): void {
    const st = this.raw.status();
    if (st.confState.learners.length === 0) return;
    const l = learnerToPromote(st);
    if (l === undefined) return;
    try {
      this.raw.proposeConfChange({ type: ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, nodeId: l, context: encodeContext({ addr: this.book.addr(l) }) });
      this.log?.info({ id: l }, 'raft: promoting a caught-up learner to voter');
    } catch {}
  }

  private fail(err: unknown): void {
    if (this.fatal) return;
    this.fatal = err;
    this.log?.error({ err: errorMessage(err) }, 'raft: fatal error in the Ready loop; stopping');
    this.events.emit('fatal', err);
    this.stop().catch(() => {});
  }

  // ------------------------------------------------------------------ incoming

  /** @internal the transport's server side */
  handleMessage(m: RaftEnvelopeMessage): void {
    if (this.stopped) return;
    this.stats.messagesIn++;
    this.transport.heardFrom(m.from);
    try {
      this.raw.step(m);
    } catch (err) {
      this.log?.warn({ err: errorMessage(err), from: m.from, type: m.type }, 'raft: step failed');
    }
    this.scheduleReady();
  }

  // ------------------------------------------------------------------ public API

  isLeader(): boolean {
    return this.leader && !this.stopped;
  }

  /** the current leader's raft id, 0 if none is known */
  leaderId(): number {
    return this.lead;
  }

  leaderAddr(): string | undefined {
    return this.lead ? this.book.addr(this.lead) : undefined;
  }

  /** index of the last entry applied to the state machine */
  appliedIndex(): number {
    return this.applied;
  }

  isRemoved(): boolean {
    return this.removed;
  }

  /** Members of the current configuration with their address and reachability. */
  members(): RaftMemberInfo[] {
    const st = this.raw.status();
    const out: RaftMemberInfo[] = [];
    const add = (id: number, learner: boolean): void => {
      let reachable: boolean;
      if (id === this.id) reachable = !this.stopped;
      else if (this.leader) reachable = st.progress[id]?.recentActive === true && this.transport.isReachable(id);
      else reachable = this.transport.isReachable(id);
      out.push({ raftId: id, addr: this.book.addr(id) ?? '', reachable, leader: id === this.lead, learner });
    };
    for (const v of st.confState.voters) add(v, false);
    for (const l of st.confState.learners) add(l, true);
    return out;
  }

  /** Transport counters per peer (queued, dropped, sent). */
  peerStatus(): ReturnType<RaftTransport['status']> {
    return this.transport.status();
  }

  walStats(): Wal['stats'] {
    return this.wal.stats;
  }

  /** Subscribe to leadership changes of this node; returns an unsubscribe function. */
  onLeadershipChange(cb: (isLeader: boolean) => void): () => void {
    this.events.on('leadership', cb);
    return () => this.events.off('leadership', cb);
  }

  /** Subscribe to this node's removal from the cluster (the owner should stop it). */
  onRemoved(cb: () => void): () => void {
    this.events.on('removed', cb);
    return () => this.events.off('removed', cb);
  }

  /** Subscribe to a fatal error (the node has stopped). */
  onFatal(cb: (err: unknown) => void): () => void {
    this.events.on('fatal', cb);
    return () => this.events.off('fatal', cb);
  }

  private check(signal?: AbortSignal): void {
    if (this.stopped) throw retryable(this.fatal ? `raft node stopped: ${errorMessage(this.fatal)}` : 'raft node is stopped');
    signal?.throwIfAborted();
  }

  /** Wait until some leader is known (up to the request timeout). */
  async waitForLeader(signal?: AbortSignal, timeoutMs = this.requestTimeoutMs): Promise<number> {
    this.check(signal);
    if (this.lead !== 0) return this.lead;
    return new Promise<number>((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(t);
        this.events.off('leader', onLeader);
        this.events.off('stopped', onStop);
        signal?.removeEventListener('abort', onAbortSig);
      };
      const onLeader = (lead: number): void => {
        if (lead === 0) return;
        cleanup();
        resolve(lead);
      };
      const onStop = (): void => {
        cleanup();
        reject(retryable('raft node is stopped'));
      };
      const onAbortSig = (): void => {
        cleanup();
        reject(signal!.reason);
      };
      const t = setTimeout(() => {
        cleanup();
        reject(retryable(`no raft leader after ${timeoutMs} ms`));
      }, timeoutMs);
      this.events.on('leader', onLeader);
      this.events.on('stopped', onStop);
      signal?.addEventListener('abort', onAbortSig, { once: true });
    });
  }

  /**
   * Propose data; resolves once it is committed and applied locally (rejects with the state
   * machine's error if its apply threw). Rejects with UNAVAILABLE (retryable) when there is no
   * leader, the leader changes meanwhile, or the node stops.
   */
  async propose(data: Uint8Array, signal?: AbortSignal): Promise<void> {
    this.check(signal);
    if (data.length > MAX_PROPOSAL) throw new FlotillaError('INVALID_ARGUMENT', `raft proposal of ${data.length} bytes: larger than ${MAX_PROPOSAL}`);
    await this.waitForLeader(signal);
    this.check(signal);
    this.stats.proposals++;
    const ridBuf = newRid();
    const rid = ridBuf.toString('hex');
    const entry = wrapProposal(ridBuf, data);
    return this.waiters.wait<void>(rid, signal, () => {
      this.raw.propose(entry);
      this.scheduleReady();
    });
  }

  /** The read index (commit index confirmed by a quorum), without waiting for it to be applied. */
  async readIndexRaw(signal?: AbortSignal): Promise<number> {
    this.check(signal);
    await this.waitForLeader(signal);
    this.check(signal);
    const ctx = randomBytes(8);
    return this.waiters.wait<number>(readKey(ctx), signal, () => {
      this.raw.readIndex(ctx);
      this.scheduleReady();
    });
  }

  /** Linearizable read barrier: resolves when this node has applied everything committed before the call. */
  async readIndex(signal?: AbortSignal): Promise<void> {
    const index = await this.readIndexRaw(signal);
    await this.waitApplied(index, signal);
  }

  /** Resolves once applied >= index. */
  async waitApplied(index: number, signal?: AbortSignal): Promise<void> {
    this.check(signal);
    if (this.applied >= index) return;
    return this.waiters.waitApplied(index, signal);
  }

  private leaderClient(): RaftClient {
    const c = this.lead ? this.transport.client(this.lead) : undefined;
    if (!c) throw retryable('no raft leader known');
    return c;
  }

  /** Propose a conf change on the leader and wait until it is applied here. */
  private async confChange(type: ConfChangeType, nodeId: number, addr: string | undefined, signal?: AbortSignal): Promise<void> {
    const rid = randomBytes(8).toString('hex');
    const cc = { type, nodeId, context: encodeContext({ addr, rid }) };
    return this.waiters.wait<void>(
      rid,
      signal,
      () => {
        this.raw.proposeConfChange(cc);
        this.scheduleReady();
      },
      (err) => (err instanceof FlotillaError && err.code === 'UNAVAILABLE' ? new FlotillaError('FAILED_PRECONDITION', `${err.message}: one membership change at a time`) : err),
    );
  }

  /**
   * Add a member at addr (as a learner; the leader promotes it once caught up). Returns its raft
   * id and the member list. On a follower, forwards a Join to the leader.
   */
  async addMember(addr: string, signal?: AbortSignal, nodeId = ''): Promise<JoinRaftResponse> {
    this.check(signal);
    if (!addr || !/^[^\s]+:\d+$/.test(addr)) throw new FlotillaError('INVALID_ARGUMENT', `invalid member address ${JSON.stringify(addr)}: expected host:port`);
    await this.waitForLeader(signal);
    if (!this.leader) {
      return callUnary<JoinRaftRequest, JoinRaftResponse>(this.leaderClient(), 'join', { token: this.opts.joinToken ?? '', addr, hostname: '', nodeId }, signal, this.requestTimeoutMs);
    }
    const st = this.raw.status();
    const inConf = new Set([...st.confState.voters, ...st.confState.learners]);
    // a joiner retrying after its first Join was committed gets the same id back
    const known = this.book.idOf(addr, inConf);
    if (known !== undefined) return this.book.joinResponse(known);
    let id: number;
    if (nodeId) {
      // with mutual TLS the id follows the node id, so messages can be checked against certificates
      const mine = raftIdsOfNode(nodeId);
      const held = [...inConf].find((x) => mine.has(x));
      if (held !== undefined) throw new FlotillaError('ALREADY_EXISTS', `node ${nodeId} is already a raft member (raft id ${held.toString(16)}) at ${this.book.addr(held) ?? '?'}`);
      id = raftIdForNode(nodeId, randomInt(0, RAFT_ID_GENERATIONS));
    } else {
      id = randomInt(1, 2 ** 47);
      while (inConf.has(id)) id = randomInt(1, 2 ** 47);
    }
    await this.confChange(ConfChangeType.CONF_CHANGE_TYPE_ADD_LEARNER, id, addr, signal);
    return this.book.joinResponse(id);
  }

  /** @internal the service's Join: checks the token and the caller's validation, then adds the member */
  async handleJoin(req: JoinRaftRequest, signal: AbortSignal): Promise<JoinRaftResponse> {
    const token = this.opts.joinToken;
    if (token && req.token !== token) throw new FlotillaError('PERMISSION_DENIED', 'invalid join token');
    await this.opts.validateJoin?.(req);
    return this.addMember(req.addr, signal, req.nodeId);
  }

  /**
   * Remove a member. Refused (FAILED_PRECONDITION) when the remaining voters that are reachable
   * would not make a quorum, unless force. On a follower, forwards a Leave to the leader.
   */
  async removeMember(id: number, opts: { force?: boolean; signal?: AbortSignal } = {}): Promise<void> {
    const signal = opts.signal;
    this.check(signal);
    await this.waitForLeader(signal);
    if (!this.leader) {
      await callUnary<LeaveRaftRequest, object>(this.leaderClient(), 'leave', { raftId: id, force: opts.force ?? false }, signal, this.requestTimeoutMs);
      return;
    }
    const st = this.raw.status();
    const isVoter = st.confState.voters.includes(id);
    if (!isVoter && !st.confState.learners.includes(id)) throw new FlotillaError('NOT_FOUND', `raft member ${id} not found`);
    if (isVoter && !opts.force) checkRemovalQuorum(st, this.id, id, (v) => this.transport.isReachable(v));
    await this.confChange(ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE, id, undefined, signal);
  }

  /** Hand leadership to the most up-to-date reachable voter; resolves when it took over. */
  async transferLeadership(signal?: AbortSignal): Promise<number> {
    this.check(signal);
    if (!this.leader) throw new FlotillaError('FAILED_PRECONDITION', 'this node is not the raft leader');
    const st = this.raw.status();
    const best = transferTarget(st, this.id);
    if (!best) throw new FlotillaError('FAILED_PRECONDITION', 'no reachable voter to transfer raft leadership to');
    this.raw.transferLeader(best);
    this.scheduleReady();
    const deadline = Date.now() + this.tickMs * this.electionTick * 3;
    while (Date.now() < deadline) {
      this.check(signal);
      if (this.lead !== 0 && this.lead !== this.id) return this.lead;
      await sleep(this.tickMs / 2, signal);
    }
    throw new FlotillaError('DEADLINE_EXCEEDED', `raft leadership transfer to ${best} did not complete`);
  }

  /** Raft status of the core plus the applied index. */
  status(): ReturnType<RawNode['status']> {
    return this.raw.status();
  }

  /** Stop ticking, reject pending requests, close the transport and the WAL. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    this.stopped = true;
    this.opts.signal.removeEventListener('abort', this.onAbort);
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = undefined;
    this.rejectAll(retryable('raft node stopped'));
    this.waiters.releaseApplied();
    this.events.emit('stopped');
    if (this.leader) {
      this.leader = false;
      this.events.emit('leadership', false);
    }
    await this.loop;
    this.heldApps.clear();
    this.ac.abort();
    this.transport.stop();
    await this.transport.drain();
    if (this.ownServer) {
      const srv = this.ownServer;
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          srv.forceShutdown();
          resolve();
        }, 500);
        srv.tryShutdown(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    this.wal.close();
  }
}

type RaftEnvelopeMessage = Parameters<RawNode['step']>[0];

/** The key of a read-index request in the waiter registry (apart from the proposals' request ids). */
function readKey(ctx: Uint8Array): string {
  return 'r' + Buffer.from(ctx.buffer, ctx.byteOffset, ctx.byteLength).toString('hex');
}
