/**
 * Deterministic simulation of a Raft cluster built from RawNode and driven by the production Ready
 * handler (manager/raft/ready.ts, the one node.ts uses): a seeded PRNG drives a simulated clock and
 * network (loss, delay, duplication, reordering, partitions), crashes and restarts, log compaction
 * with snapshot transfer, leader transfers, membership changes, and a key-value workload whose
 * history is checked for linearizability.
 *
 * The fault model of the disk: every node has a SimDisk with separate write and sync steps, as a
 * WAL in the page cache and its fsync. A Ready's snapshot, entries and hard state are written in
 * begin(); the fsync takes 0-3 time units, during which the node keeps stepping messages and ticks
 * into its core (group commit), a leader's early send is already on the wire and committed entries
 * that were durable before are applied. A crash drops whatever was written and not synced (except
 * that, half of the time, a prefix of it had already reached the platter, as a kernel may have
 * written back some pages), and the node restarts from what was synced, like a driver re-reading
 * its WAL. Crash points: any time unit (in or out of an fsync), right after begin() of a Ready
 * that wrote something (after the early send, before the fsync), and right after the fsync
 * (persisted, nothing else sent or applied).
 *
 * Invariants checked as the run goes: at most one leader per term; a new leader holds every
 * committed entry; every node applies the same entry at each index, contiguously; the durable
 * commit index never points past the durable log.
 */
import { createHash } from 'node:crypto';
import { ConfChangeType, EntryType, MessageType } from '../../gen/flotilla/v1/raft.js';
import { ProposalDroppedError, RawNode, decodeConfChange } from '../../manager/raft/core.js';
import { checkOperations, kvModel, type KvInput, type KvOutput, type Operation } from './linearizability.js';
import { MemoryStorage, snapIndex } from '../../manager/raft/memory-storage.js';
import { ReadyRunner, type ReadyStep } from '../../manager/raft/ready.js';
import { Rng, mulberry32 } from './prng.js';
import type { Entry, HardState, Message, Snapshot } from '../../manager/raft/types.js';

export interface SimOptions {
  seed: number;
  /** simulated time units; a node ticks every TICK units */
  duration?: number;
  /** founding voters (3 or 5 when unset) */
  nodes?: number;
  clients?: number;
  keys?: number;
  /** force features on/off (default: chosen from the seed) */
  compaction?: boolean;
  membership?: boolean;
  faults?: boolean;
}

export interface SimStats {
  seed: number;
  nodes: number;
  committed: number;
  elections: number;
  crashes: number;
  /** crashes that dropped data written but not yet synced */
  crashesLostUnsynced: number;
  /** crashes between a leader's early send and the fsync of the same Ready */
  crashesAfterEarlySend: number;
  partitions: number;
  snapshotsSent: number;
  snapshotsInstalled: number;
  /** membership changes proposed, and committed */
  confChanges: number;
  confChangesCommitted: number;
  /** leader transfers asked for, and done (the target became leader) */
  transfers: number;
  transfersDone: number;
  ops: number;
  reads: number;
  writes: number;
  /** writes whose client gave up; resolved from the committed log at the end (see resolveAbandoned) */
  unknownWrites: number;
  /** of those, the ones that took effect */
  unknownWritesCommitted: number;
  linearizable: 'ok' | 'unknown';
  /** 1 when the linearizability check decided (ok), 0 when it gave up at its step limit */
  linearizabilityDecided: number;
  features: string;
  /** a hash of the committed history and the client history: equal runs have equal fingerprints */
  fingerprint: string;
}

export class SimFailure extends Error {
  constructor(
    readonly seed: number,
    what: string,
  ) {
    super(`raft simulation seed ${seed} failed: ${what} (reproduce: RAFT_SEED=${seed} npx vitest run manager/raft/sim.test.ts)`);
    this.name = 'SimFailure';
  }
}

const TICK = 10;
const ELECTION_TICK = 10;
const HEARTBEAT_TICK = 2;
const CLIENT_TIMEOUT = 600;

interface PendingOp {
  client: number;
  seq: number;
  input: KvInput;
  call: number;
  deadline: number;
  done: boolean;
  readIndex?: number;
}

interface Command {
  c: number;
  s: number;
  i: KvInput;
}

interface KvState {
  kv: Map<string, string>;
  /** last applied sequence number per client (sessions: a duplicated proposal applies once) */
  sessions: Map<number, number>;
}

function encodeState(st: KvState): Buffer {
  return Buffer.from(JSON.stringify({ kv: [...st.kv], s: [...st.sessions] }));
}

function decodeState(data: Buffer): KvState {
  if (data.length === 0) return { kv: new Map(), sessions: new Map() };
  const o = JSON.parse(data.toString()) as { kv: [string, string][]; s: [number, number][] };
  return { kv: new Map(o.kv), sessions: new Map(o.s) };
}

type DiskWrite = { snap: Snapshot } | { entries: Entry[] } | { hardState: HardState };

/** A node's disk: writes land in a volatile buffer; sync() moves them to the platter, which survives crashes. */
class SimDisk {
  readonly platter = new MemoryStorage();
  pending: DiskWrite[] = [];

  saveSnapshot(snap: Snapshot): void {
    this.pending.push({ snap });
  }

  write(hardState: HardState | undefined, entries: Entry[]): void {
    // the WAL's record order: entries, then the hard state
    if (entries.length > 0) this.pending.push({ entries });
    if (hardState) this.pending.push({ hardState });
  }

  sync(): void {
    for (const w of this.pending) this.commit(w);
    this.pending = [];
  }

  /** Power loss: the first `keep` writes had reached the platter, the rest are gone. Returns whether anything was lost. */
  crash(keep: number): boolean {
    const lost = this.pending.length > keep;
    for (const w of this.pending.slice(0, keep)) this.commit(w);
    this.pending = [];
    return lost;
  }

  private commit(w: DiskWrite): void {
    if ('snap' in w) this.platter.applySnapshot(w.snap);
    else if ('entries' in w) this.platter.append(w.entries);
    else this.platter.setHardState(w.hardState);
  }

  /** The storage a restarted node reads: what the platter holds (a driver re-reading its WAL). */
  load(): MemoryStorage {
    const p = this.platter;
    const s = new MemoryStorage();
    const snap = p.snapshot();
    if (snapIndex(snap) > 0) s.applySnapshot(snap);
    if (p.lastIndex() >= p.firstIndex()) s.append(p.entries(p.firstIndex(), p.lastIndex() + 1, Number.MAX_SAFE_INTEGER));
    s.setHardState(p.initialState().hardState);
    return s;
  }
}

type CrashPoint = 'none' | 'beforeSync' | 'afterSync';

class SimNode {
  raw: RawNode | null = null;
  readonly disk = new SimDisk();
  /** the log the core reads (rebuilt from the disk at each start) */
  storage = new MemoryStorage();
  runner: ReadyRunner<true> | null = null;
  /** the Ready whose fsync is running, and when it completes */
  inflight: ReadyStep<true> | null = null;
  syncAt = 0;
  state: KvState = { kv: new Map(), sessions: new Map() };
  applied = 0;
  removed = false;
  crashPoint: CrashPoint = 'none';
  restartAt = 0;
  readonly pendingWrites = new Map<string, PendingOp>();
  readonly pendingReads = new Map<string, PendingOp>();
  constructor(
    readonly id: number,
    readonly peers: number[],
    readonly phase: number,
  ) {}
}

interface Flight {
  m: Message;
}

interface Client {
  id: number;
  seq: number;
  busy: PendingOp | null;
  nextAt: number;
}

export function runSimulation(opts: SimOptions): SimStats {
  const sim = new Simulation(opts);
  return sim.run();
}

class Simulation {
  private readonly seed: number;
  private readonly rng: Rng;
  private readonly duration: number;
  private readonly nodes = new Map<number, SimNode>();
  private readonly clients: Client[] = [];
  private readonly keys: string[];
  private readonly lossRate: number;
  private readonly dupRate: number;
  private readonly maxDelay: number;
  private readonly preVote: boolean;
  private readonly checkQuorum: boolean;
  private readonly compaction: boolean;
  private readonly membership: boolean;
  private readonly faults: boolean;
  private readonly compactEvery: number;
  private readonly crashRate: number;
  private readonly maxSizePerMsg: number;
  private readonly maxInflight: number;
  private readonly initialPeers: number[];
  private nextId: number;
  private time = 0;
  private evClock = 0;
  /** the target of the last leader transfer asked for */
  private transferTo = 0;
  /** writes whose client gave up waiting */
  private readonly abandoned: PendingOp[] = [];
  /** "client:seq" -> when the write first took effect (on the first node to apply it) and its output */
  private readonly effects = new Map<string, { at: number; output: KvOutput }>();
  private readonly flights = new Map<number, Flight[]>();
  /** nodes to process at the end of this time unit */
  private readonly dirty = new Set<SimNode>();
  /** partition group per node id; nodes in different groups cannot talk */
  private group = new Map<number, number>();
  private healAt = 0;
  private readonly leaders = new Map<number, number>();
  /** the committed history: index -> entry, as first applied by any node */
  private readonly global: (Entry | undefined)[] = [];
  private globalMax = 0;
  private readonly history: Operation<KvInput, KvOutput>[] = [];
  private quiet = false;
  private readonly stats: SimStats;

  constructor(opts: SimOptions) {
    this.seed = opts.seed;
    this.rng = new Rng(opts.seed);
    const r = this.rng;
    this.duration = opts.duration ?? 3000;
    // a lone voter commits on its own append: the case where applying before the fsync loses writes
    const shape = r.float();
    const n = opts.nodes ?? (shape < 0.1 ? 1 : shape < 0.7 ? 3 : 5);
    this.keys = Array.from({ length: opts.keys ?? 1 + r.int(4) }, (_, i) => `k${i}`);
    this.faults = opts.faults ?? true;
    this.lossRate = this.faults ? r.float() * 0.1 : 0;
    this.dupRate = this.faults ? r.float() * 0.05 : 0;
    this.maxDelay = this.faults ? 2 + r.int(30) : 2;
    this.preVote = r.chance(0.6);
    this.checkQuorum = r.chance(0.6);
    this.compaction = opts.compaction ?? r.chance(0.5);
    this.membership = opts.membership ?? r.chance(0.3);
    this.compactEvery = 10 + r.int(40);
    this.crashRate = 0.0005 + r.float() * 0.004;
    this.maxSizePerMsg = r.pick([1, 1, 256, 4096, 1 << 20]);
    this.maxInflight = r.pick([1, 2, 4, 64]);
    this.initialPeers = Array.from({ length: n }, (_, i) => i + 1);
    this.nextId = n + 1;
    for (const id of this.initialPeers) this.nodes.set(id, new SimNode(id, this.initialPeers, r.int(TICK)));
    const nc = opts.clients ?? 2 + r.int(7);
    for (let c = 1; c <= nc; c++) this.clients.push({ id: c, seq: 0, busy: null, nextAt: r.int(100) });
    this.stats = {
      seed: this.seed,
      nodes: n,
      committed: 0,
      elections: 0,
      crashes: 0,
      crashesLostUnsynced: 0,
      crashesAfterEarlySend: 0,
      partitions: 0,
      snapshotsSent: 0,
      snapshotsInstalled: 0,
      confChanges: 0,
      confChangesCommitted: 0,
      transfers: 0,
      transfersDone: 0,
      ops: 0,
      reads: 0,
      writes: 0,
      unknownWrites: 0,
      unknownWritesCommitted: 0,
      linearizable: 'ok',
      linearizabilityDecided: 0,
      fingerprint: '',
      features: [
        `loss=${this.lossRate.toFixed(3)}`,
        `dup=${this.dupRate.toFixed(3)}`,
        `delay<=${this.maxDelay}`,
        this.preVote ? 'prevote' : '',
        this.checkQuorum ? 'checkquorum' : '',
        this.compaction ? `compaction/${this.compactEvery}` : '',
        this.membership ? 'membership' : '',
        `msg<=${this.maxSizePerMsg}B inflight<=${this.maxInflight} crash=${this.crashRate.toFixed(4)}`,
      ]
        .filter(Boolean)
        .join(' '),
    };
  }

  private fail(what: string): never {
    throw new SimFailure(this.seed, `${what} at t=${this.time} [${this.stats.features}]`);
  }

  run(): SimStats {
    for (const node of this.nodes.values()) this.start(node);
    const end = this.duration;
    const quietEnd = end + 1000;
    for (this.time = 0; this.time < quietEnd; this.time++) {
      if (this.time === end) this.enterQuiet();
      if (!this.quiet && this.faults) this.injectFaults();
      this.deliverDue();
      for (const node of this.nodes.values()) {
        if (!node.raw && !node.removed && node.restartAt > 0 && this.time >= node.restartAt) this.start(node);
        if (node.raw && node.inflight && this.time >= node.syncAt) this.syncDone(node);
        if (node.raw && (this.time + node.phase) % TICK === 0) {
          node.raw.tick();
          this.process(node);
        }
      }
      if (!this.quiet) this.runClients();
      for (const node of this.dirty) this.process(node);
      this.dirty.clear();
      this.expireClients();
    }
    // abandon whatever is still outstanding
    for (const c of this.clients) if (c.busy) this.abandon(c);
    this.resolveAbandoned();
    this.stats.committed = this.globalMax;
    this.stats.ops = this.history.length;
    const report = checkOperations(kvModel, this.history, 2_000_000);
    if (report.result === 'illegal') {
      const ops = (report.failedOps ?? []).map((o) => JSON.stringify(o)).join('\n  ');
      this.fail(`history is not linearizable; partition ops:\n  ${ops}`);
    }
    this.stats.linearizable = report.result === 'ok' ? 'ok' : 'unknown';
    this.stats.linearizabilityDecided = report.result === 'ok' ? 1 : 0;
    const h = createHash('sha256');
    for (let i = 1; i <= this.globalMax; i++) {
      const e = this.global[i]!;
      h.update(`${e.index}/${e.term}/${e.type}/`).update(e.data);
    }
    h.update(JSON.stringify(this.history));
    this.stats.fingerprint = h.digest('hex').slice(0, 16);
    return this.stats;
  }

  // ---------------------------------------------------------------- nodes

  private start(node: SimNode): void {
    node.storage = node.disk.load();
    const snap = node.storage.snapshot();
    const raw = new RawNode({
      id: node.id,
      peers: node.peers,
      storage: node.storage,
      applied: snapIndex(snap),
      electionTick: ELECTION_TICK,
      heartbeatTick: HEARTBEAT_TICK,
      preVote: this.preVote,
      checkQuorum: this.checkQuorum,
      maxSizePerMsg: this.maxSizePerMsg,
      maxInflightMsgs: this.maxInflight,
      random: mulberry32(this.rng.int(2 ** 31)),
    });
    node.raw = raw;
    const disk = node.disk;
    node.runner = new ReadyRunner<true>(
      {
        storage: node.storage,
        saveSnapshot: (sn) => disk.saveSnapshot(sn),
        write: (hs, ents) => disk.write(hs, ents),
        startSync: () => true,
      },
      {
        onSoftState: (_lead, isLeader) => {
          if (isLeader) this.checkNewLeader(node, raw);
        },
        send: (msgs) => {
          for (const m of msgs) this.send(m);
        },
        restoreSnapshot: (sn) => {
          node.state = decodeState(sn.data);
          node.applied = snapIndex(sn);
          this.stats.snapshotsInstalled++;
        },
        applyEntry: (e) => this.apply(node, raw, e),
        afterApply: () => this.serveReads(node),
        readState: (rs) => {
          const op = node.pendingReads.get(rs.context.toString());
          if (op) op.readIndex = rs.index;
        },
        advance: (rd) => raw.advance(rd),
      },
    );
    node.inflight = null;
    node.state = decodeState(snap.data);
    node.applied = snapIndex(snap);
    node.crashPoint = 'none';
    node.restartAt = 0;
    this.process(node);
  }

  private crash(node: SimNode, afterEarlySend = node.inflight !== null && node.inflight.early && node.inflight.rd.messages.length > 0): void {
    node.raw = null;
    node.runner = null;
    node.inflight = null;
    node.pendingReads.clear();
    node.pendingWrites.clear();
    node.state = { kv: new Map(), sessions: new Map() };
    node.restartAt = this.time + 50 + this.rng.int(500);
    const pending = node.disk.pending.length;
    const keep = pending > 0 && this.rng.chance(0.5) ? this.rng.int(pending + 1) : 0;
    if (node.disk.crash(keep)) this.stats.crashesLostUnsynced++;
    if (afterEarlySend) this.stats.crashesAfterEarlySend++;
    this.stats.crashes++;
  }

  /** Handle Readies until one waits for its fsync (or none is left). */
  private process(node: SimNode): void {
    const raw = node.raw;
    if (!raw) return;
    while (!node.inflight && node.raw === raw && raw.hasReady()) {
      const step = node.runner!.begin(raw.ready());
      if (step.error !== undefined) throw step.error;
      if (node.crashPoint === 'beforeSync' && node.disk.pending.length > 0) {
        // written, maybe sent early and partly applied, not synced
        this.crash(node, step.early && step.rd.messages.length > 0);
        return;
      }
      if (step.sync === undefined) {
        this.finish(node, raw, step);
        continue;
      }
      node.inflight = step;
      const d = this.rng.int(4);
      node.syncAt = this.time + d;
      if (d === 0) this.syncDone(node);
    }
  }

  /** The running fsync completes. */
  private syncDone(node: SimNode): void {
    const step = node.inflight!;
    const raw = node.raw!;
    node.disk.sync();
    const hs = node.disk.platter.initialState().hardState;
    if (hs.commit > node.disk.platter.lastIndex()) this.fail(`node ${node.id} durable commit ${hs.commit} > durable last index ${node.disk.platter.lastIndex()}`);
    if (node.crashPoint === 'afterSync') {
      this.crash(node); // persisted; nothing more sent or applied
      return;
    }
    node.inflight = null;
    this.finish(node, raw, step);
    this.process(node);
  }

  private finish(node: SimNode, raw: RawNode, step: ReadyStep<true>): void {
    node.runner!.finish(step);
    if (node.raw !== raw) return;
    this.maybeCompact(node, raw);
  }

  private checkNewLeader(node: SimNode, raw: RawNode): void {
    const { term } = raw.basicStatus();
    const prev = this.leaders.get(term);
    if (prev !== undefined && prev !== node.id) this.fail(`two leaders in term ${term}: ${prev} and ${node.id}`);
    this.leaders.set(term, node.id);
    this.stats.elections++;
    if (this.transferTo === node.id) {
      this.stats.transfersDone++;
      this.transferTo = 0;
    }
    // Leader completeness: the new leader's log holds every entry known committed.
    const last = raw.log.lastIndex();
    if (last < this.globalMax) this.fail(`leader ${node.id} (term ${term}) lacks committed entries: last ${last} < ${this.globalMax}`);
    const from = Math.max(raw.log.firstIndex(), this.globalMax - 200, 1);
    for (let i = from; i <= this.globalMax; i++) {
      const t = raw.log.termOrUndefined(i);
      if (t !== undefined && t !== this.global[i]!.term) this.fail(`leader ${node.id} (term ${term}) has term ${t} at committed index ${i}, not ${this.global[i]!.term}`);
    }
  }

  private apply(node: SimNode, raw: RawNode, e: Entry): void {
    if (e.index !== node.applied + 1) this.fail(`node ${node.id} applies ${e.index} after ${node.applied}`);
    const g = this.global[e.index];
    if (g) {
      if (g.term !== e.term || g.type !== e.type || !g.data.equals(e.data)) {
        this.fail(`node ${node.id} applies a different entry at ${e.index}: term ${e.term} vs committed term ${g.term}`);
      }
    } else {
      if (e.index !== this.globalMax + 1) this.fail(`committed history has a gap: ${e.index} after ${this.globalMax}`);
      this.global[e.index] = e;
      this.globalMax = e.index;
      if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) {
        // not the founding members' entries of the bootstrap
        const cc = decodeConfChange(e.data);
        if (cc.type === ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE || !this.initialPeers.includes(cc.nodeId)) this.stats.confChangesCommitted++;
      }
    }
    node.applied = e.index;
    if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) {
      const cc = decodeConfChange(e.data);
      raw.applyConfChange(cc);
      if (!this.nodes.has(cc.nodeId) && cc.type !== ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE) {
        this.fail(`conf change adds unknown node ${cc.nodeId}`);
      }
      if (cc.type === ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE && cc.nodeId === node.id) node.removed = true;
      return;
    }
    if (e.data.length === 0) return;
    const cmd = JSON.parse(e.data.toString()) as Command;
    const last = node.state.sessions.get(cmd.c) ?? 0;
    if (cmd.s <= last) return; // duplicate or superseded proposal
    node.state.sessions.set(cmd.c, cmd.s);
    const kv = node.state.kv;
    let out: KvOutput = {};
    const inp = cmd.i;
    if (inp.op === 'put') {
      kv.set(inp.key, inp.value);
    } else if (inp.op === 'cas') {
      const cur = kv.get(inp.key) ?? null;
      const ok = cur === inp.expected;
      if (ok) kv.set(inp.key, inp.value);
      out = { ok };
    }
    const key = `${cmd.c}:${cmd.s}`;
    if (!g) this.effects.set(key, { at: ++this.evClock, output: out });
    const op = node.pendingWrites.get(key);
    if (op) {
      node.pendingWrites.delete(key);
      this.respond(op, out);
    }
  }

  private serveReads(node: SimNode): void {
    for (const [ctx, op] of node.pendingReads) {
      if (op.readIndex !== undefined && op.readIndex <= node.applied) {
        node.pendingReads.delete(ctx);
        if (op.input.op === 'get') this.respond(op, { value: node.state.kv.get(op.input.key) ?? null });
      }
    }
  }

  /** A state machine snapshot and log compaction; durable at once (the WAL fsyncs the snapshot file). */
  private maybeCompact(node: SimNode, raw: RawNode): void {
    if (!this.compaction) return;
    const storage = node.storage;
    const platter = node.disk.platter;
    const first = storage.firstIndex();
    if (node.applied - first + 1 < this.compactEvery) return;
    if (node.applied <= snapIndex(storage.snapshot())) return;
    const data = encodeState(node.state);
    storage.createSnapshot(node.applied, raw.confState(), data);
    platter.createSnapshot(node.applied, raw.confState(), data);
    const keep = this.rng.int(5);
    const to = node.applied - keep;
    if (to >= first) storage.compact(to);
    if (to >= platter.firstIndex()) platter.compact(to);
  }

  // ---------------------------------------------------------------- network

  private partitioned(a: number, b: number): boolean {
    return (this.group.get(a) ?? 0) !== (this.group.get(b) ?? 0);
  }

  private send(m: Message): void {
    if (m.type === MessageType.MESSAGE_TYPE_SNAP) this.stats.snapshotsSent++;
    if (this.partitioned(m.from, m.to) || this.rng.chance(this.lossRate)) {
      if (m.type === MessageType.MESSAGE_TYPE_SNAP) this.afterSnapshot(m, false);
      else if (this.rng.chance(0.2)) this.nodes.get(m.from)?.raw?.reportUnreachable(m.to);
      return;
    }
    this.schedule(m);
    if (this.rng.chance(this.dupRate)) this.schedule(m);
  }

  private schedule(m: Message): void {
    let delay = 1 + this.rng.int(this.maxDelay);
    if (this.faults && this.rng.chance(0.02)) delay += this.rng.int(200);
    const at = this.time + delay;
    let l = this.flights.get(at);
    if (!l) this.flights.set(at, (l = []));
    l.push({ m });
  }

  private afterSnapshot(m: Message, ok: boolean): void {
    const sender = this.nodes.get(m.from);
    if (sender?.raw) {
      // reported asynchronously, as the transport does: the sender may be in the middle of a Ready
      sender.raw.reportSnapshot(m.to, ok);
      this.dirty.add(sender);
    }
  }

  private deliverDue(): void {
    const l = this.flights.get(this.time);
    if (!l) return;
    this.flights.delete(this.time);
    for (const { m } of l) {
      const node = this.nodes.get(m.to);
      if (!node?.raw || this.partitioned(m.from, m.to)) {
        if (m.type === MessageType.MESSAGE_TYPE_SNAP) this.afterSnapshot(m, false);
        continue;
      }
      node.raw.step(m);
      this.process(node);
      if (m.type === MessageType.MESSAGE_TYPE_SNAP) this.afterSnapshot(m, true);
    }
  }

  // ---------------------------------------------------------------- faults

  private liveNodes(): SimNode[] {
    return [...this.nodes.values()].filter((n) => n.raw && !n.removed);
  }

  private injectFaults(): void {
    const r = this.rng;
    if (this.healAt > 0 && this.time >= this.healAt) {
      this.group = new Map();
      this.healAt = 0;
    } else if (this.healAt === 0 && r.chance(0.002)) {
      const ids = [...this.nodes.keys()];
      this.group = new Map();
      if (r.chance(0.5)) {
        this.group.set(r.pick(ids), 1); // isolate one node
      } else {
        for (const id of ids) this.group.set(id, r.int(2));
      }
      this.healAt = this.time + 100 + r.int(900);
      this.stats.partitions++;
    }
    if (r.chance(this.crashRate)) {
      const live = this.liveNodes();
      if (live.length > 0) {
        // favour the leader: leader changes with half-replicated entries are the interesting cases
        const leader = live.find((n) => n.raw!.basicStatus().role === 'leader');
        const victim = leader && r.chance(0.6) ? leader : r.pick(live);
        const k = r.float();
        if (k < 0.35) victim.crashPoint = 'beforeSync';
        else if (k < 0.55) victim.crashPoint = 'afterSync';
        else this.crash(victim);
      }
    }
    if (this.membership && r.chance(0.002)) this.changeMembership();
    if (r.chance(0.001)) {
      const leader = this.liveNodes().find((n) => n.raw!.basicStatus().role === 'leader');
      if (leader) {
        const target = r.pick(leader.raw!.confState().voters);
        leader.raw!.transferLeader(target);
        if (target !== leader.id) {
          this.transferTo = target;
          this.stats.transfers++;
        }
        this.process(leader);
      }
    }
  }

  private changeMembership(): void {
    const leader = this.liveNodes().find((n) => n.raw!.basicStatus().role === 'leader');
    if (!leader) return;
    const raw = leader.raw!;
    const voters = raw.confState().voters;
    const r = this.rng;
    try {
      if (voters.length < 5 && this.nextId <= 12 && (voters.length <= 3 || r.chance(0.5))) {
        const id = this.nextId++;
        const node = new SimNode(id, [], r.int(TICK));
        this.nodes.set(id, node);
        this.start(node);
        raw.proposeConfChange({ type: ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, nodeId: id, context: Buffer.alloc(0) });
      } else if (voters.length > 3) {
        const victim = r.pick(voters);
        raw.proposeConfChange({ type: ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE, nodeId: victim, context: Buffer.alloc(0) });
      } else {
        return;
      }
      this.stats.confChanges++;
    } catch (err) {
      if (!(err instanceof ProposalDroppedError)) throw err;
    }
    this.process(leader);
  }

  private enterQuiet(): void {
    this.quiet = true;
    this.group = new Map();
    this.healAt = 0;
    for (const n of this.nodes.values()) {
      n.crashPoint = 'none';
      if (!n.raw && !n.removed) this.start(n);
    }
  }

  // ---------------------------------------------------------------- clients

  private runClients(): void {
    const r = this.rng;
    for (const c of this.clients) {
      if (c.busy || this.time < c.nextAt) continue;
      const live = this.liveNodes();
      if (live.length === 0) continue;
      let node = r.pick(live);
      const lead = node.raw!.basicStatus().lead;
      const ln = this.nodes.get(lead);
      if (lead !== 0 && ln?.raw && !ln.removed && r.chance(0.7)) node = ln;
      const raw = node.raw!;
      c.seq++;
      const key = r.pick(this.keys);
      const value = `${c.id}.${c.seq}`;
      const k = r.float();
      const input: KvInput =
        k < 0.45
          ? { op: 'get', key }
          : k < 0.8
            ? { op: 'put', key, value }
            : { op: 'cas', key, expected: r.chance(0.5) ? null : `${1 + r.int(this.clients.length)}.${Math.max(1, c.seq - r.int(3))}`, value };
      const op: PendingOp = { client: c.id, seq: c.seq, input, call: ++this.evClock, deadline: this.time + CLIENT_TIMEOUT, done: false };
      const ctx = `${c.id}:${c.seq}`;
      try {
        if (input.op === 'get') {
          node.pendingReads.set(ctx, op);
          raw.readIndex(Buffer.from(ctx));
        } else {
          node.pendingWrites.set(ctx, op);
          raw.propose(Buffer.from(JSON.stringify({ c: c.id, s: c.seq, i: input } satisfies Command)));
        }
      } catch (err) {
        if (!(err instanceof ProposalDroppedError)) throw err;
        node.pendingReads.delete(ctx);
        node.pendingWrites.delete(ctx);
        c.nextAt = this.time + 10 + r.int(40); // refused outright: no effect, not in the history
        continue;
      }
      c.busy = op;
      this.process(node);
    }
  }

  private respond(op: PendingOp, output: KvOutput): void {
    if (op.done) return;
    op.done = true;
    const c = this.clients[op.client - 1]!;
    this.history.push({ clientId: op.client, input: op.input, output, call: op.call, ret: ++this.evClock });
    if (op.input.op === 'get') this.stats.reads++;
    else this.stats.writes++;
    if (c.busy === op) {
      c.busy = null;
      c.nextAt = this.time + 1 + this.rng.int(30);
    }
  }

  private abandon(c: Client): void {
    const op = c.busy!;
    op.done = true;
    c.busy = null;
    c.nextAt = this.time + 1 + this.rng.int(30);
    if (op.input.op === 'get') return; // a read that never returned has no effect
    this.abandoned.push(op);
    this.stats.unknownWrites++;
  }

  /**
   * A write whose client gave up has an unknown outcome to the client; left open (returning at
   * infinity) such writes make the search exponential. The simulator knows better: a write that
   * never reached the committed log had no effect (it is dropped from the history, like a read
   * that never returned); one that did took effect no later than when the first node applied it,
   * with the output every node computed (the committed log is checked to be the same on every
   * node). Both are facts of the run, and the second is a stronger claim for the checker to test.
   */
  private resolveAbandoned(): void {
    for (const op of this.abandoned) {
      const eff = this.effects.get(`${op.client}:${op.seq}`);
      if (!eff) continue;
      this.history.push({ clientId: op.client, input: op.input, output: eff.output, call: op.call, ret: eff.at });
      this.stats.unknownWritesCommitted++;
    }
  }

  private expireClients(): void {
    for (const c of this.clients) if (c.busy && this.time >= c.busy.deadline) this.abandon(c);
  }
}
