/**
 * A synchronous in-process network of RawNodes for tests (etcd's raft_test.go "network" in spirit):
 * each node has a MemoryStorage as its disk; messages are delivered until the network is quiet.
 */
import { EntryType } from '../../gen/flotilla/v1/raft.js';
import { RawNode, decodeConfChange } from '../../manager/raft/core.js';
import { MemoryStorage } from '../../manager/raft/memory-storage.js';
import { mulberry32 } from './prng.js';
import type { Entry, Message, RaftConfig, ReadState, Ready } from '../../manager/raft/types.js';

export interface TestNode {
  id: number;
  raw: RawNode;
  storage: MemoryStorage;
  applied: Entry[];
  readStates: ReadState[];
}

export interface TestNetOptions {
  electionTick?: number;
  heartbeatTick?: number;
  preVote?: boolean;
  checkQuorum?: boolean;
  seed?: number;
  maxSizePerMsg?: number;
  maxInflightMsgs?: number;
  /** a pre-filled storage for a node (default: empty, bootstrapped from the peers) */
  storage?: (id: number) => MemoryStorage | undefined;
}

export class TestNet {
  readonly nodes = new Map<number, TestNode>();
  /** "from->to" pairs whose messages are dropped */
  private readonly cut = new Set<string>();
  /** every message delivered, for assertions */
  readonly trace: Message[] = [];
  /** optional filter: return false to drop */
  filter: ((m: Message) => boolean) | undefined;
  private readonly opts: TestNetOptions;
  private seedCounter: number;

  constructor(ids: number[], opts: TestNetOptions = {}) {
    this.opts = opts;
    this.seedCounter = opts.seed ?? 1;
    for (const id of ids) this.addNode(id, ids);
  }

  config(id: number, storage: MemoryStorage, peers: number[]): RaftConfig {
    return {
      id,
      peers,
      storage,
      electionTick: this.opts.electionTick ?? 10,
      heartbeatTick: this.opts.heartbeatTick ?? 1,
      preVote: this.opts.preVote ?? false,
      checkQuorum: this.opts.checkQuorum ?? false,
      maxSizePerMsg: this.opts.maxSizePerMsg,
      maxInflightMsgs: this.opts.maxInflightMsgs,
      random: mulberry32(this.seedCounter++ * 7919 + id),
    };
  }

  /** Add a node; peers empty means "joining an existing cluster". */
  addNode(id: number, peers: number[]): TestNode {
    const storage = (peers.length > 0 ? this.opts.storage?.(id) : undefined) ?? new MemoryStorage();
    const raw = new RawNode(this.config(id, storage, peers));
    const n: TestNode = { id, raw, storage, applied: [], readStates: [] };
    this.nodes.set(id, n);
    this.process(id);
    return n;
  }

  node(id: number): TestNode {
    const n = this.nodes.get(id);
    if (!n) throw new Error(`no node ${id}`);
    return n;
  }

  /** Handle every pending Ready of node id; returns the messages to send. */
  handleReady(id: number): Message[] {
    const n = this.node(id);
    const out: Message[] = [];
    while (n.raw.hasReady()) {
      const rd: Ready = n.raw.ready();
      if (rd.snapshot) n.storage.applySnapshot(rd.snapshot);
      n.storage.append(rd.entries);
      if (rd.hardState) n.storage.setHardState(rd.hardState);
      out.push(...rd.messages);
      if (rd.snapshot) n.applied = [];
      for (const e of rd.committedEntries) {
        if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) n.raw.applyConfChange(decodeConfChange(e.data));
        n.applied.push(e);
      }
      n.readStates.push(...rd.readStates);
      n.raw.advance(rd);
    }
    return out;
  }

  private process(id: number): void {
    this.deliver(this.handleReady(id));
  }

  isolate(id: number): void {
    for (const other of this.nodes.keys()) {
      if (other === id) continue;
      this.cut.add(`${id}->${other}`);
      this.cut.add(`${other}->${id}`);
    }
  }

  cutLink(a: number, b: number): void {
    this.cut.add(`${a}->${b}`);
    this.cut.add(`${b}->${a}`);
  }

  heal(): void {
    this.cut.clear();
  }

  /** Deliver messages, and everything they cause, until the network is quiet. */
  deliver(msgs: Message[]): void {
    const queue = [...msgs];
    for (let i = 0; i < queue.length; i++) {
      const m = queue[i]!;
      if (this.cut.has(`${m.from}->${m.to}`)) continue;
      if (this.filter && !this.filter(m)) continue;
      const n = this.nodes.get(m.to);
      if (!n) continue;
      this.trace.push(m);
      n.raw.step(m);
      queue.push(...this.handleReady(m.to));
    }
  }

  tick(id: number, times = 1): void {
    for (let i = 0; i < times; i++) {
      this.node(id).raw.tick();
      this.process(id);
    }
  }

  tickAll(times = 1): void {
    for (let i = 0; i < times; i++) {
      for (const id of [...this.nodes.keys()]) {
        this.node(id).raw.tick();
        this.process(id);
      }
    }
  }

  campaign(id: number): void {
    this.node(id).raw.campaign();
    this.process(id);
  }

  propose(id: number, data: string): void {
    this.node(id).raw.propose(Buffer.from(data));
    this.process(id);
  }

  /** run an action on a node's RawNode and deliver what it produced */
  act(id: number, f: (raw: RawNode) => void): void {
    f(this.node(id).raw);
    this.process(id);
  }

  leader(): number {
    let lead = 0;
    for (const n of this.nodes.values()) if (n.raw.status().role === 'leader') lead = n.id;
    return lead;
  }

  appliedData(id: number): string[] {
    return this.node(id)
      .applied.filter((e) => e.type === EntryType.ENTRY_TYPE_NORMAL && e.data.length > 0)
      .map((e) => e.data.toString());
  }
}
