/**
 * Conformance of the Raft core to the Raft paper, section 5 (one test per claim, after the checklist
 * of etcd's raft_paper_test.go), plus pre-vote, check-quorum, leadership transfer, ReadIndex,
 * flow control, snapshots and membership changes.
 */
import { describe, expect, it } from 'vitest';
import { ConfChangeType, EntryType, MessageType as T } from '../../gen/flotilla/v1/raft.js';
import { ProposalDroppedError, RawNode, decodeConfChange, newMessage } from './core.js';
import { MemoryStorage } from './memory-storage.js';
import { mulberry32 } from '../../testing/raft/prng.js';
import { TestNet } from '../../testing/raft/testnet.js';
import type { Entry, HardState, Message, ReadState } from './types.js';

const E = Buffer.alloc(0);

/** entries with the given terms, at indexes 1.. */
function ents(...terms: number[]): Entry[] {
  return terms.map((term, i) => ({ term, index: i + 1, type: EntryType.ENTRY_TYPE_NORMAL, data: Buffer.from(`e${i + 1}t${term}`) }));
}

function storageWith(entries: Entry[], hs?: Partial<HardState>): MemoryStorage {
  const s = new MemoryStorage();
  s.append(entries);
  if (hs) s.setHardState({ term: hs.term ?? 0, vote: hs.vote ?? 0, commit: hs.commit ?? 0 });
  return s;
}

interface Harness {
  raw: RawNode;
  storage: MemoryStorage;
  applied: Entry[];
  readStates: ReadState[];
}

function mk(
  id: number,
  peers: number[],
  opts: { storage?: MemoryStorage; electionTick?: number; heartbeatTick?: number; preVote?: boolean; checkQuorum?: boolean; maxSizePerMsg?: number; maxInflightMsgs?: number; seed?: number } = {},
): Harness {
  const storage = opts.storage ?? new MemoryStorage();
  const raw = new RawNode({
    id,
    peers,
    storage,
    electionTick: opts.electionTick ?? 10,
    heartbeatTick: opts.heartbeatTick ?? 1,
    preVote: opts.preVote,
    checkQuorum: opts.checkQuorum,
    maxSizePerMsg: opts.maxSizePerMsg,
    maxInflightMsgs: opts.maxInflightMsgs,
    random: mulberry32(opts.seed ?? id),
  });
  const h: Harness = { raw, storage, applied: [], readStates: [] };
  drain(h);
  return h;
}

/** handle all Readys (persist, apply conf changes) and return the messages */
function drain(h: Harness): Message[] {
  const out: Message[] = [];
  while (h.raw.hasReady()) {
    const rd = h.raw.ready();
    if (rd.snapshot) h.storage.applySnapshot(rd.snapshot);
    h.storage.append(rd.entries);
    if (rd.hardState) h.storage.setHardState(rd.hardState);
    out.push(...rd.messages);
    for (const e of rd.committedEntries) {
      if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) h.raw.applyConfChange(decodeConfChange(e.data));
      h.applied.push(e);
    }
    h.readStates.push(...rd.readStates);
    h.raw.advance(rd);
  }
  return out;
}

function step(h: Harness, m: Partial<Message> & { type: T }): Message[] {
  h.raw.step(newMessage({ to: h.raw.id, ...m }));
  return drain(h);
}

function tick(h: Harness, n: number): Message[] {
  const out: Message[] = [];
  for (let i = 0; i < n; i++) {
    h.raw.tick();
    out.push(...drain(h));
  }
  return out;
}

/** make h the leader of `peers` by granting votes */
function elect(h: Harness): Message[] {
  h.raw.campaign();
  let msgs = drain(h);
  const term = h.raw.status().term;
  for (const p of h.raw.confState().voters) {
    if (p === h.raw.id || h.raw.status().role === 'leader') continue;
    msgs = step(h, { type: T.MESSAGE_TYPE_VOTE_RESP, from: p, term });
  }
  expect(h.raw.status().role).toBe('leader');
  return msgs;
}

const st = (h: Harness) => h.raw.status();
const ofType = (ms: Message[], t: T) => ms.filter((m) => m.type === t);
const logTerms = (h: Harness) => {
  const out: number[] = [];
  for (let i = h.raw.log.firstIndex(); i <= h.raw.log.lastIndex(); i++) out.push(h.raw.log.term(i));
  return out;
};

// ============================================================================ 5.1 basics

describe('Raft paper 5.1: terms', () => {
  for (const role of ['follower', 'candidate', 'leader'] as const) {
    it(`a ${role} updates its term from a higher-term message and becomes follower`, () => {
      const h = mk(1, [1, 2, 3]);
      if (role === 'candidate') h.raw.campaign();
      if (role === 'leader') elect(h);
      drain(h);
      const term = st(h).term;
      step(h, { type: T.MESSAGE_TYPE_APP, from: 2, term: term + 5, index: 0, logTerm: 0 });
      expect(st(h).term).toBe(term + 5);
      expect(st(h).role).toBe('follower');
      expect(st(h).lead).toBe(2);
    });
  }

  it('rejects (ignores) messages from a stale term', () => {
    const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 2), { term: 2 }) });
    const before = { ...st(h) };
    const out = step(h, { type: T.MESSAGE_TYPE_APP, from: 2, term: 1, index: 2, logTerm: 2, entries: [{ term: 1, index: 3, type: 0, data: E }] });
    expect(out).toEqual([]);
    expect(st(h).term).toBe(before.term);
    expect(h.raw.log.lastIndex()).toBe(2);
    // with check-quorum the stale leader is told the new term
    const h2 = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 2), { term: 2 }), checkQuorum: true });
    const out2 = step(h2, { type: T.MESSAGE_TYPE_HEARTBEAT, from: 2, term: 1 });
    expect(out2).toHaveLength(1);
    expect(out2[0]).toMatchObject({ type: T.MESSAGE_TYPE_APP_RESP, to: 2, term: 2 });
  });

  it('ignores vote responses from an older term', () => {
    const h = mk(1, [1, 2, 3]);
    h.raw.campaign();
    drain(h);
    h.raw.campaign(); // a second campaign, term + 1
    drain(h);
    const term = st(h).term;
    step(h, { type: T.MESSAGE_TYPE_VOTE_RESP, from: 2, term: term - 1 });
    expect(st(h).role).toBe('candidate');
    step(h, { type: T.MESSAGE_TYPE_VOTE_RESP, from: 2, term });
    expect(st(h).role).toBe('leader');
  });
});

// ============================================================================ 5.2 election

describe('Raft paper 5.2: leader election', () => {
  it('starts as a follower', () => {
    const h = mk(1, [1, 2, 3]);
    expect(st(h).role).toBe('follower');
    expect(st(h).lead).toBe(0);
  });

  it('a leader sends heartbeats every heartbeat timeout, carrying min(match, commit)', () => {
    const h = mk(1, [1, 2, 3], { heartbeatTick: 2 });
    elect(h);
    drain(h);
    expect(ofType(tick(h, 1), T.MESSAGE_TYPE_HEARTBEAT)).toHaveLength(0);
    const hb = ofType(tick(h, 1), T.MESSAGE_TYPE_HEARTBEAT);
    expect(hb.map((m) => m.to).sort()).toEqual([2, 3]);
    for (const m of hb) expect(m).toMatchObject({ term: st(h).term, commit: 0 }); // followers matched nothing yet
  });

  for (const role of ['follower', 'candidate'] as const) {
    it(`a ${role} starts an election when the election timeout elapses`, () => {
      const h = mk(1, [1, 2, 3]);
      if (role === 'candidate') {
        h.raw.campaign();
        drain(h);
      }
      const term = st(h).term;
      const msgs = tick(h, 20); // 2 * electionTick covers any randomized timeout
      expect(st(h).role).toBe('candidate');
      expect(st(h).term).toBe(term + 1);
      expect(st(h).vote).toBe(1);
      const votes = ofType(msgs, T.MESSAGE_TYPE_VOTE).filter((m) => m.term === term + 1);
      expect(votes.map((m) => m.to).sort()).toEqual([2, 3]);
      for (const v of votes) expect(v).toMatchObject({ index: h.raw.log.lastIndex(), logTerm: h.raw.log.lastTerm() });
    });
  }

  it('a candidate wins with a majority, loses on a majority of rejections, else waits', () => {
    const cases: { size: number; grant: number[]; reject: number[]; role: string }[] = [
      { size: 1, grant: [], reject: [], role: 'leader' },
      { size: 3, grant: [2], reject: [], role: 'leader' },
      { size: 3, grant: [2, 3], reject: [], role: 'leader' },
      { size: 3, grant: [], reject: [], role: 'candidate' },
      { size: 5, grant: [2], reject: [], role: 'candidate' },
      { size: 5, grant: [2, 3], reject: [], role: 'leader' },
      { size: 5, grant: [2], reject: [3, 4], role: 'candidate' },
      { size: 5, grant: [], reject: [2, 3, 4], role: 'follower' },
      { size: 3, grant: [], reject: [2, 3], role: 'follower' },
    ];
    for (const c of cases) {
      const peers = Array.from({ length: c.size }, (_, i) => i + 1);
      const h = mk(1, peers);
      h.raw.campaign();
      drain(h);
      const term = st(h).term;
      for (const g of c.grant) step(h, { type: T.MESSAGE_TYPE_VOTE_RESP, from: g, term });
      for (const r of c.reject) step(h, { type: T.MESSAGE_TYPE_VOTE_RESP, from: r, term, reject: true });
      expect(st(h).role, JSON.stringify(c)).toBe(c.role);
      expect(st(h).term).toBe(term);
    }
  });

  it('votes at most once per term (first come, first served)', () => {
    const cases: { vote: number; from: number; reject: boolean }[] = [
      { vote: 0, from: 2, reject: false },
      { vote: 0, from: 3, reject: false },
      { vote: 2, from: 2, reject: false }, // repeated request from the same candidate
      { vote: 3, from: 3, reject: false },
      { vote: 2, from: 3, reject: true },
      { vote: 3, from: 2, reject: true },
    ];
    for (const c of cases) {
      const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1), { term: 1, vote: c.vote }) });
      const out = step(h, { type: T.MESSAGE_TYPE_VOTE, from: c.from, term: 1, index: 1, logTerm: 1 });
      expect(out).toHaveLength(1);
      expect(out[0]).toMatchObject({ type: T.MESSAGE_TYPE_VOTE_RESP, to: c.from, reject: c.reject });
      expect(st(h).vote).toBe(c.reject ? c.vote : c.from);
      expect(h.storage.initialState().hardState.vote).toBe(c.reject ? c.vote : c.from); // the vote is persisted
    }
  });

  it('a candidate steps down for a leader of its term or a higher one', () => {
    for (const delta of [0, 1]) {
      const h = mk(1, [1, 2, 3]);
      h.raw.campaign();
      drain(h);
      const term = st(h).term;
      step(h, { type: T.MESSAGE_TYPE_APP, from: 2, term: term + delta, index: 0, logTerm: 0 });
      expect(st(h)).toMatchObject({ role: 'follower', term: term + delta, lead: 2 });
    }
  });

  it('randomized election timeouts are in [electionTick, 2*electionTick) and differ between nodes', () => {
    const timeouts = new Set<number>();
    for (let id = 1; id <= 30; id++) {
      const h = mk(1, [1, 2, 3], { seed: id * 13 });
      let n = 0;
      while (st(h).role === 'follower') {
        h.raw.tick();
        drain(h);
        n++;
      }
      expect(n).toBeGreaterThanOrEqual(10);
      expect(n).toBeLessThan(20);
      timeouts.add(n);
    }
    expect(timeouts.size).toBeGreaterThan(3);
  });

  it('a split vote leaves candidates waiting; a new election (new term) resolves it', () => {
    const net = new TestNet([1, 2, 3, 4], { seed: 3 });
    // 1 and 2 campaign at the same time; 3 votes for 1, 4 votes for 2
    net.filter = (m) =>
      !(m.type === T.MESSAGE_TYPE_VOTE && ((m.from === 1 && m.to === 4) || (m.from === 2 && m.to === 3) || (m.from === 1 && m.to === 2) || (m.from === 2 && m.to === 1)));
    const m1 = net.handleReady(1);
    const m2 = net.handleReady(2);
    net.node(1).raw.campaign();
    net.node(2).raw.campaign();
    net.deliver([...m1, ...m2, ...net.handleReady(1), ...net.handleReady(2)]);
    expect(net.node(1).raw.status().role).toBe('candidate');
    expect(net.node(2).raw.status().role).toBe('candidate');
    const term = net.node(1).raw.status().term;
    net.filter = undefined;
    for (let i = 0; i < 40 && net.leader() === 0; i++) net.tickAll();
    expect(net.leader()).not.toBe(0);
    expect(net.node(net.leader()).raw.status().term).toBeGreaterThan(term);
  });

  it('is deterministic: the same seed and inputs give the same messages', () => {
    const run = () => {
      const net = new TestNet([1, 2, 3], { seed: 99 });
      net.tickAll(25);
      net.propose(net.leader(), 'x');
      return net.trace.map((m) => `${m.type}:${m.from}>${m.to}@${m.term}/${m.index}/${m.entries.length}`).join(',');
    };
    expect(run()).toBe(run());
  });
});

// ============================================================================ 5.3 replication

describe('Raft paper 5.3: log replication', () => {
  it('the leader appends a proposal to its log and sends it to every follower', () => {
    const h = mk(1, [1, 2, 3]);
    elect(h);
    // followers acknowledge the election entry so the leader replicates optimistically
    const li = h.raw.log.lastIndex();
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term: st(h).term, index: li });
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 3, term: st(h).term, index: li });
    h.raw.propose(Buffer.from('some data'));
    const msgs = ofType(drain(h), T.MESSAGE_TYPE_APP);
    expect(h.raw.log.lastIndex()).toBe(li + 1);
    expect(msgs.map((m) => m.to).sort()).toEqual([2, 3]);
    for (const m of msgs) {
      expect(m).toMatchObject({ index: li, logTerm: st(h).term, commit: li });
      expect(m.entries.map((e) => e.data.toString())).toEqual(['some data']);
    }
  });

  it('commits an entry once a majority stores it, and tells followers in the next append', () => {
    const h = mk(1, [1, 2, 3, 4, 5]);
    elect(h);
    const li = h.raw.log.lastIndex();
    const term = st(h).term;
    expect(st(h).commit).toBeLessThan(li);
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term, index: li });
    expect(st(h).commit).toBeLessThan(li); // 2 of 5
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 3, term, index: li });
    expect(st(h).commit).toBe(li); // 3 of 5
    expect(h.applied[h.applied.length - 1]!.index).toBe(li);
    h.raw.propose(Buffer.from('x'));
    for (const m of ofType(drain(h), T.MESSAGE_TYPE_APP)) expect(m.commit).toBe(li);
  });

  it('acknowledgements: commit needs a majority, counted per follower', () => {
    const cases = [
      { size: 1, acks: [] as number[], commit: true },
      { size: 3, acks: [], commit: false },
      { size: 3, acks: [2], commit: true },
      { size: 5, acks: [2], commit: false },
      { size: 5, acks: [2, 2, 2], commit: false }, // duplicates count once
      { size: 5, acks: [2, 3], commit: true },
    ];
    for (const c of cases) {
      const h = mk(1, Array.from({ length: c.size }, (_, i) => i + 1));
      elect(h);
      const li = h.raw.log.lastIndex();
      for (const a of c.acks) step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: a, term: st(h).term, index: li });
      expect(st(h).commit === li, JSON.stringify(c)).toBe(c.commit);
    }
  });

  it('committing an entry commits all preceding entries, including earlier terms', () => {
    const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 2, 2, 3), { term: 3 }) });
    elect(h);
    const li = h.raw.log.lastIndex();
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term: st(h).term, index: li });
    expect(st(h).commit).toBe(li);
    expect(h.applied.map((e) => e.index)).toEqual([1, 2, 3, 4, 5]);
  });

  it('a follower commits up to leaderCommit (bounded by what it has)', () => {
    const cases = [
      { leaderCommit: 1, want: 1 },
      { leaderCommit: 2, want: 2 },
      { leaderCommit: 9, want: 3 },
    ];
    for (const c of cases) {
      const h = mk(1, [1, 2, 3], { storage: storageWith([], { term: 1 }) });
      step(h, { type: T.MESSAGE_TYPE_APP, from: 2, term: 1, index: 0, logTerm: 0, commit: c.leaderCommit, entries: ents(1, 1, 1) });
      expect(st(h).commit).toBe(c.want);
      expect(h.applied.map((e) => e.index)).toEqual(Array.from({ length: c.want }, (_, i) => i + 1));
    }
  });

  it('a follower rejects an append whose previous entry does not match, with a hint', () => {
    const cases = [
      { index: 0, logTerm: 0, reject: false },
      { index: 1, logTerm: 1, reject: false },
      { index: 2, logTerm: 2, reject: false },
      { index: 1, logTerm: 2, reject: true, hint: 1, hintTerm: 1 },
      { index: 3, logTerm: 3, reject: true, hint: 2, hintTerm: 2 }, // past the end
    ];
    for (const c of cases) {
      const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 2), { term: 2, commit: 1 }) });
      const out = step(h, { type: T.MESSAGE_TYPE_APP, from: 2, term: 2, index: c.index, logTerm: c.logTerm, commit: 1 });
      expect(out).toHaveLength(1);
      expect(out[0]!.reject, JSON.stringify(c)).toBe(c.reject);
      if (c.reject) expect(out[0]).toMatchObject({ index: c.index, rejectHint: c.hint, logTerm: c.hintTerm });
    }
  });

  it('a follower deletes a conflicting suffix and appends the new entries', () => {
    const cases = [
      { index: 2, logTerm: 2, entries: [{ term: 3, index: 3 }], want: [1, 2, 3] },
      { index: 1, logTerm: 1, entries: [{ term: 3, index: 2 }, { term: 4, index: 3 }], want: [1, 3, 4] },
      { index: 0, logTerm: 0, entries: [{ term: 1, index: 1 }], want: [1, 2] }, // no conflict: nothing deleted
      { index: 0, logTerm: 0, entries: [{ term: 3, index: 1 }], want: [3] },
    ];
    for (const c of cases) {
      const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 2), { term: 2 }) });
      step(h, { type: T.MESSAGE_TYPE_APP, from: 2, term: 4, index: c.index, logTerm: c.logTerm, entries: c.entries.map((e) => ({ ...e, type: 0, data: E })) });
      expect(logTerms(h), JSON.stringify(c)).toEqual(c.want);
      expect(h.storage.lastIndex()).toBe(c.want.length); // persisted, conflicting suffix overwritten
    }
  });

  // Figure 7: leader's log (term 8 after election) and followers (a)-(f).
  const leaderLog = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
  const fig7: Record<string, number[]> = {
    a: [1, 1, 1, 4, 4, 5, 5, 6, 6],
    b: [1, 1, 1, 4],
    c: [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    d: [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    e: [1, 1, 1, 4, 4, 4, 4],
    f: [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
  };
  for (const [name, follower] of Object.entries(fig7)) {
    it(`Figure 7 (${name}): the leader brings the follower's log in line with its own`, () => {
      const storages = new Map<number, MemoryStorage>([
        [1, storageWith(ents(...leaderLog), { term: 8 })],
        [2, storageWith(ents(...follower), { term: 8 })],
        [3, storageWith(ents(...leaderLog), { term: 8 })], // a third voter that agrees with the leader
      ]);
      const net = new TestNet([1, 2, 3], { storage: (id) => storages.get(id) });
      const leaderBefore = ents(...leaderLog);
      net.campaign(1);
      expect(net.leader()).toBe(1);
      net.propose(1, 'after');
      const l = net.node(1).raw.log;
      const f = net.node(2).raw.log;
      expect(f.lastIndex()).toBe(l.lastIndex());
      for (let i = 1; i <= l.lastIndex(); i++) expect(f.term(i), `index ${i}`).toBe(l.term(i));
      // the leader is append-only: none of its own entries was changed or deleted
      const mine = net.node(1).storage.entries(1, leaderLog.length + 1, Infinity);
      expect(mine.map((e) => [e.term, e.data.toString()])).toEqual(leaderBefore.map((e) => [e.term, e.data.toString()]));
      expect(net.appliedData(2)).toEqual(net.appliedData(1));
    });
  }

  it('conflict back-off skips whole terms: few probes for a long divergent suffix', () => {
    const follower = [1, ...Array<number>(100).fill(2)];
    const leader = [1, ...Array<number>(100).fill(3)];
    const storages = new Map<number, MemoryStorage>([
      [1, storageWith(ents(...leader), { term: 3 })],
      [2, storageWith(ents(...follower), { term: 3 })],
      [3, storageWith(ents(...leader), { term: 3 })],
    ]);
    const net = new TestNet([1, 2, 3], { storage: (id) => storages.get(id) });
    net.campaign(1);
    const rejects = net.trace.filter((m) => m.type === T.MESSAGE_TYPE_APP_RESP && m.from === 2 && m.reject);
    expect(rejects.length).toBeLessThanOrEqual(2);
    expect(net.node(2).raw.log.lastTerm()).toBe(net.node(1).raw.status().term);
  });

  it('a candidate sends its last log index and term in vote requests', () => {
    const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 2, 2), { term: 2 }) });
    h.raw.campaign();
    for (const m of ofType(drain(h), T.MESSAGE_TYPE_VOTE)) expect(m).toMatchObject({ index: 3, logTerm: 2, term: 3 });
  });

  it('votes only for candidates whose log is at least as up to date (5.4.1)', () => {
    // voter log: terms [1, 2] (last index 2, last term 2)
    const cases = [
      { index: 2, logTerm: 2, reject: false }, // same
      { index: 3, logTerm: 2, reject: false }, // longer, same last term
      { index: 1, logTerm: 3, reject: false }, // shorter, higher last term
      { index: 1, logTerm: 2, reject: true }, // shorter, same last term
      { index: 5, logTerm: 1, reject: true }, // longer, lower last term
    ];
    for (const c of cases) {
      const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 2), { term: 2 }) });
      const out = step(h, { type: T.MESSAGE_TYPE_VOTE, from: 2, term: 3, index: c.index, logTerm: c.logTerm });
      expect(out[0], JSON.stringify(c)).toMatchObject({ type: T.MESSAGE_TYPE_VOTE_RESP, reject: c.reject });
    }
  });

  it('Figure 8: a leader never commits an entry of a previous term by counting replicas', () => {
    // Leader 1 in term 4 (after election: term 5) holds index 2 from term 2 that is on a majority.
    const h = mk(1, [1, 2, 3, 4, 5], { storage: storageWith(ents(1, 2), { term: 4 }) });
    elect(h);
    const term = st(h).term;
    expect(h.raw.log.lastIndex()).toBe(3); // the new term's empty entry
    // followers 2 and 3 store index 2 (term 2) but not yet the new entry
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term, index: 2 });
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 3, term, index: 2 });
    expect(st(h).commit).toBe(0); // 3 of 5 hold index 2, but it is from term 2
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term, index: 3 });
    expect(st(h).commit).toBe(0);
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 3, term, index: 3 });
    expect(st(h).commit).toBe(3); // a current-term entry on a majority commits everything before it
  });

  it('the leader never overwrites or deletes its own entries, whatever it receives', () => {
    const h = mk(1, [1, 2, 3], { storage: storageWith(ents(1, 1, 2), { term: 2 }) });
    elect(h);
    const before = logTerms(h);
    const term = st(h).term;
    // a rejection with a bogus hint, and a stale append from an old leader
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term, index: 3, reject: true, rejectHint: 0, logTerm: 9 });
    step(h, { type: T.MESSAGE_TYPE_APP, from: 3, term: term - 1, index: 1, logTerm: 1, entries: [{ term: 2, index: 2, type: 0, data: E }] });
    expect(logTerms(h)).toEqual(before);
  });
});

// ============================================================================ flow control

describe('flow control', () => {
  it('probe state sends one append at a time; replicate state pipelines up to maxInflight', () => {
    const h = mk(1, [1, 2], { maxInflightMsgs: 3, maxSizePerMsg: 1 });
    elect(h);
    const term = st(h).term;
    // in probe state, proposals do not send more appends to 2 until it answers
    h.raw.propose(Buffer.from('a'));
    h.raw.propose(Buffer.from('b'));
    expect(ofType(drain(h), T.MESSAGE_TYPE_APP)).toHaveLength(0);
    // 2 answers the probe: replicate state, one entry per message (maxSizePerMsg 1), at most 3 in flight
    const out = step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term, index: 3 });
    const apps = ofType(out, T.MESSAGE_TYPE_APP);
    expect(apps.length).toBeLessThanOrEqual(3);
    for (const m of apps) expect(m.entries.length).toBeLessThanOrEqual(1);
    expect(st(h).progress[2]!.state).toBe('replicate');
    for (let i = 0; i < 5; i++) h.raw.propose(Buffer.from(`p${i}`));
    expect(ofType(drain(h), T.MESSAGE_TYPE_APP).length + apps.length).toBe(3); // inflight window full
  });

  it('batches many entries into one append up to maxSizePerMsg', () => {
    const net = new TestNet([1, 2, 3], { maxSizePerMsg: 64 * 1024 });
    net.campaign(1);
    const n = net.node(1);
    for (let i = 0; i < 200; i++) n.raw.propose(Buffer.from(`v${i}`));
    const msgs = net.handleReady(1);
    const apps = ofType(msgs, T.MESSAGE_TYPE_APP);
    expect(apps).toHaveLength(2);
    expect(apps[0]!.entries).toHaveLength(200);
    net.deliver(msgs);
    expect(net.appliedData(3)).toHaveLength(200);
  });
});

// ============================================================================ pre-vote, check-quorum

describe('pre-vote and check-quorum', () => {
  it('pre-vote: a partitioned node does not raise its term, and rejoining does not disrupt the leader', () => {
    const net = new TestNet([1, 2, 3], { preVote: true });
    net.campaign(1);
    const term = net.node(1).raw.status().term;
    net.isolate(3);
    net.tickAll(100);
    expect(net.node(3).raw.status().term).toBe(term);
    expect(net.node(3).raw.status().role).not.toBe('leader');
    net.heal();
    net.tickAll(5);
    expect(net.leader()).toBe(1);
    expect(net.node(1).raw.status().term).toBe(term);
    expect(net.node(3).raw.status().lead).toBe(1);
  });

  it('without pre-vote the same rejoin disrupts the leader (the control case)', () => {
    const net = new TestNet([1, 2, 3], { preVote: false });
    net.campaign(1);
    const term = net.node(1).raw.status().term;
    net.isolate(3);
    net.tickAll(100);
    expect(net.node(3).raw.status().term).toBeGreaterThan(term);
    net.heal();
    net.tickAll(30);
    expect(net.node(net.leader()).raw.status().term).toBeGreaterThan(term);
  });

  it('check-quorum: an isolated leader steps down within an election timeout', () => {
    const net = new TestNet([1, 2, 3], { checkQuorum: true });
    net.campaign(1);
    net.isolate(1);
    net.tick(1, 10);
    net.tick(1, 10);
    expect(net.node(1).raw.status().role).toBe('follower');
    expect(() => net.node(1).raw.propose(Buffer.from('x'))).toThrow(ProposalDroppedError);
  });

  it('check-quorum: a leader that hears from a majority stays', () => {
    const net = new TestNet([1, 2, 3], { checkQuorum: true });
    net.campaign(1);
    net.isolate(3);
    net.tickAll(50);
    expect(net.leader()).toBe(1);
  });

  it('check-quorum lease: a follower with a live leader ignores vote requests from a higher term', () => {
    const h = mk(2, [1, 2, 3], { checkQuorum: true });
    step(h, { type: T.MESSAGE_TYPE_HEARTBEAT, from: 1, term: 2 });
    const out = step(h, { type: T.MESSAGE_TYPE_VOTE, from: 3, term: 5, index: 99, logTerm: 4 });
    expect(out).toEqual([]);
    expect(st(h)).toMatchObject({ term: 2, lead: 1 });
    // once the lease is over (no heartbeat for an election timeout) it votes
    tick(h, 10);
    const out2 = step(h, { type: T.MESSAGE_TYPE_VOTE, from: 3, term: 5, index: 99, logTerm: 4 });
    expect(ofType(out2, T.MESSAGE_TYPE_VOTE_RESP)[0]).toMatchObject({ reject: false, term: 5 });
  });
});

// ============================================================================ leadership transfer

describe('leadership transfer', () => {
  it('transfers to an up-to-date follower with TimeoutNow', () => {
    const net = new TestNet([1, 2, 3], { checkQuorum: true, preVote: true });
    net.campaign(1);
    net.propose(1, 'a');
    net.act(1, (r) => r.transferLeader(2));
    expect(net.leader()).toBe(2);
    expect(net.trace.some((m) => m.type === T.MESSAGE_TYPE_TIMEOUT_NOW && m.to === 2)).toBe(true);
    net.propose(2, 'b');
    expect(net.appliedData(1)).toEqual(['a', 'b']);
  });

  it('catches a lagging transferee up first, and drops proposals during the transfer', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.isolate(3);
    net.propose(1, 'a');
    const before = net.trace.length;
    net.heal();
    net.cutLink(1, 3); // messages to 3 are held back for now
    net.act(1, (r) => r.transferLeader(3));
    expect(net.node(1).raw.status().leadTransferee).toBe(3);
    expect(() => net.node(1).raw.propose(Buffer.from('x'))).toThrow(ProposalDroppedError);
    net.heal();
    net.tick(1, 1); // heartbeat -> response -> append -> caught up -> TimeoutNow
    expect(net.leader()).toBe(3);
    expect(net.trace.slice(before).some((m) => m.type === T.MESSAGE_TYPE_TIMEOUT_NOW)).toBe(true);
    expect(net.appliedData(3)).toEqual(['a']);
  });

  it('aborts a transfer that does not finish within an election timeout', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.isolate(3);
    net.act(1, (r) => r.transferLeader(3));
    expect(net.node(1).raw.status().leadTransferee).toBe(3);
    net.tick(1, 10);
    expect(net.node(1).raw.status().leadTransferee).toBe(0);
    expect(net.leader()).toBe(1);
    net.propose(1, 'ok');
  });

  it('a follower forwards a transfer request to the leader; transfer to self is a no-op', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.act(2, (r) => r.transferLeader(2));
    expect(net.leader()).toBe(2);
    net.act(2, (r) => r.transferLeader(2));
    expect(net.leader()).toBe(2);
  });
});

// ============================================================================ ReadIndex

describe('ReadIndex', () => {
  it('the leader returns its commit index only after a heartbeat round confirms a quorum', () => {
    const h = mk(1, [1, 2, 3]);
    elect(h);
    const term = st(h).term;
    const li = h.raw.log.lastIndex();
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term, index: li });
    h.raw.readIndex(Buffer.from('r1'));
    const hb = ofType(drain(h), T.MESSAGE_TYPE_HEARTBEAT);
    expect(hb).toHaveLength(2);
    expect(hb[0]!.context.toString()).toBe('r1');
    expect(h.readStates).toEqual([]);
    step(h, { type: T.MESSAGE_TYPE_HEARTBEAT_RESP, from: 3, term, context: Buffer.from('r1') });
    expect(h.readStates).toHaveLength(1);
    expect(h.readStates[0]!.index).toBe(li);
    expect(h.readStates[0]!.context.toString()).toBe('r1');
  });

  it('a new leader answers reads only once an entry of its term is committed', () => {
    const h = mk(1, [1, 2, 3]);
    elect(h);
    const term = st(h).term;
    h.raw.readIndex(Buffer.from('early'));
    drain(h);
    step(h, { type: T.MESSAGE_TYPE_HEARTBEAT_RESP, from: 2, term, context: Buffer.from('early') });
    expect(h.readStates).toEqual([]);
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term, index: h.raw.log.lastIndex() }); // commit
    const hb = ofType(drain(h), T.MESSAGE_TYPE_HEARTBEAT);
    step(h, { type: T.MESSAGE_TYPE_HEARTBEAT_RESP, from: 2, term, context: hb[0]?.context ?? Buffer.from('early') });
    expect(h.readStates.map((r) => r.context.toString())).toEqual(['early']);
    expect(h.readStates[0]!.index).toBe(st(h).commit);
  });

  it('a stale (partitioned) leader cannot serve a read', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.isolate(1);
    net.tickAll(30); // 2 and 3 elect a new leader and may commit more
    expect(net.node(1).raw.status().role).toBe('leader'); // it still believes it leads
    net.act(1, (r) => r.readIndex(Buffer.from('stale')));
    net.tickAll(20);
    expect(net.node(1).readStates).toEqual([]);
  });

  it('a follower forwards the read to the leader and serves it at the returned index', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.propose(1, 'a');
    net.act(3, (r) => r.readIndex(Buffer.from('f')));
    const rs = net.node(3).readStates;
    expect(rs).toHaveLength(1);
    expect(rs[0]!.index).toBe(net.node(1).raw.status().commit);
    expect(() => new TestNet([1, 2, 3]).node(2).raw.readIndex(Buffer.from('x'))).toThrow(ProposalDroppedError); // no leader
  });

  it('a single-voter cluster answers at once', () => {
    const h = mk(1, [1]);
    h.raw.campaign();
    drain(h);
    h.raw.readIndex(Buffer.from('solo'));
    drain(h);
    expect(h.readStates).toHaveLength(1);
  });
});

// ============================================================================ snapshots

describe('snapshots', () => {
  it('a follower behind the compaction point receives and installs a snapshot, then catches up', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.isolate(3);
    for (let i = 0; i < 20; i++) net.propose(1, `v${i}`);
    const l = net.node(1);
    const applied = l.raw.status().applied;
    l.storage.createSnapshot(applied, l.raw.confState(), Buffer.from('state-at-' + applied));
    l.storage.compact(applied);
    net.propose(1, 'after');
    net.heal();
    net.tickAll(3);
    expect(net.trace.some((m) => m.type === T.MESSAGE_TYPE_SNAP && m.to === 3)).toBe(true);
    const f = net.node(3);
    expect(f.storage.snapshot().metadata?.index).toBe(applied);
    expect(f.storage.snapshot().data.toString()).toBe('state-at-' + applied);
    net.act(1, (r) => r.reportSnapshot(3, true));
    net.tickAll(3);
    expect(f.raw.status().commit).toBe(l.raw.status().commit);
    expect(net.appliedData(3)).toEqual(['after']); // entries after the snapshot are applied normally
    expect(f.raw.confState()).toEqual({ voters: [1, 2, 3], learners: [] });
    expect(l.raw.status().progress[3]!.state).toBe('replicate');
  });

  it('a failed snapshot send returns the follower to probing and is retried', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.isolate(3);
    for (let i = 0; i < 5; i++) net.propose(1, `v${i}`);
    const l = net.node(1);
    l.storage.createSnapshot(l.raw.status().applied, l.raw.confState(), Buffer.from('s'));
    l.storage.compact(l.raw.status().applied);
    net.heal();
    net.filter = (m) => m.type !== T.MESSAGE_TYPE_SNAP;
    net.tickAll(2);
    expect(l.raw.status().progress[3]!.state).toBe('snapshot');
    net.act(1, (r) => r.reportSnapshot(3, false));
    expect(l.raw.status().progress[3]!.state).toBe('probe');
    net.filter = undefined;
    net.tickAll(3);
    net.act(1, (r) => r.reportSnapshot(3, true));
    net.tickAll(2);
    expect(net.node(3).raw.status().commit).toBe(l.raw.status().commit);
  });

  it('MemoryStorage: compaction, snapshots and errors', async () => {
    const { CompactedError, UnavailableError, SnapshotOutOfDateError } = await import('./memory-storage.js');
    const s = storageWith(ents(1, 1, 2, 3, 3));
    expect(s.firstIndex()).toBe(1);
    expect(s.lastIndex()).toBe(5);
    s.createSnapshot(3, { voters: [1], learners: [] }, Buffer.from('x'));
    s.compact(3);
    expect(s.firstIndex()).toBe(4);
    expect(s.term(3)).toBe(2);
    expect(() => s.term(2)).toThrow(CompactedError);
    expect(() => s.term(6)).toThrow(UnavailableError);
    expect(() => s.entries(3, 5, Infinity)).toThrow(CompactedError);
    expect(s.entries(4, 6, 1).map((e) => e.index)).toEqual([4]); // size limit keeps at least one
    expect(() => s.createSnapshot(2, { voters: [], learners: [] }, E)).toThrow(SnapshotOutOfDateError);
    s.append([{ term: 4, index: 5, type: 0, data: E }]);
    expect(s.lastIndex()).toBe(5);
    expect(s.term(5)).toBe(4);
    s.applySnapshot({ data: E, metadata: { index: 10, term: 5, confState: { voters: [1, 2], learners: [] } } });
    expect([s.firstIndex(), s.lastIndex(), s.term(10)]).toEqual([11, 10, 5]);
    expect(s.initialState().confState.voters).toEqual([1, 2]);
  });
});

// ============================================================================ membership

describe('membership changes (one server at a time)', () => {
  const cc = (type: ConfChangeType, nodeId: number) => ({ type, nodeId, context: E });

  it('adds a node: it learns the log (including the founding membership) and becomes a voter', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.propose(1, 'a');
    net.addNode(4, []);
    net.act(1, (r) => r.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, 4)));
    net.tickAll(3);
    expect(net.node(1).raw.confState().voters).toEqual([1, 2, 3, 4]);
    expect(net.node(4).raw.confState().voters).toEqual([1, 2, 3, 4]);
    expect(net.appliedData(4)).toEqual(['a']);
    // the new voter counts: with 2 and 3 down, 1 and 4 are not a majority of 4
    net.isolate(2);
    net.isolate(3);
    net.propose(1, 'b');
    expect(net.node(1).raw.status().commit).toBeLessThan(net.node(1).raw.log.lastIndex());
  });

  it('refuses a second conf change while one is pending, and before the first entry of the term commits', () => {
    const h = mk(1, [1, 2, 3]);
    elect(h);
    expect(() => h.raw.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, 4))).toThrow(ProposalDroppedError);
    step(h, { type: T.MESSAGE_TYPE_APP_RESP, from: 2, term: st(h).term, index: h.raw.log.lastIndex() });
    h.raw.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, 4));
    drain(h);
    expect(() => h.raw.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, 5))).toThrow(ProposalDroppedError);
  });

  it('removes a follower: the quorum shrinks', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.act(1, (r) => r.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE, 3)));
    expect(net.node(1).raw.confState().voters).toEqual([1, 2]);
    net.isolate(3);
    net.propose(1, 'x');
    expect(net.appliedData(2)).toEqual(['x']);
    expect(net.node(1).raw.status().progress[3]).toBeUndefined();
  });

  it('removes the leader: it steps down once the entry commits and the others elect a new leader', () => {
    const net = new TestNet([1, 2, 3], { checkQuorum: true, preVote: true });
    net.campaign(1);
    net.propose(1, 'a');
    net.act(1, (r) => r.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE, 1)));
    expect(net.node(1).raw.status().role).toBe('follower');
    expect(net.node(1).raw.confState().voters).toEqual([2, 3]);
    net.tickAll(30);
    const lead = net.leader();
    expect([2, 3]).toContain(lead);
    net.propose(lead, 'b');
    expect(net.appliedData(2)).toEqual(['a', 'b']);
    expect(net.appliedData(3)).toEqual(['a', 'b']);
    // the removed node never campaigns again
    net.isolate(1);
    net.tick(1, 50);
    expect(net.node(1).raw.status().role).toBe('follower');
  });

  it('a learner receives the log but neither votes nor counts toward commitment', () => {
    const net = new TestNet([1, 2]);
    net.campaign(1);
    net.addNode(3, []);
    net.act(1, (r) => r.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_ADD_LEARNER, 3)));
    net.propose(1, 'a');
    net.tickAll(2);
    expect(net.appliedData(3)).toEqual(['a']);
    expect(net.node(1).raw.confState()).toEqual({ voters: [1, 2], learners: [3] });
    net.isolate(2);
    net.propose(1, 'b'); // 1 + learner 3 is not a majority of {1, 2}
    expect(net.appliedData(1)).toEqual(['a']);
    net.tick(3, 50);
    expect(net.node(3).raw.status().role).toBe('follower'); // a learner never campaigns
    net.heal();
    net.tickAll(2);
    // promote the learner
    net.act(1, (r) => r.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, 3)));
    net.tickAll(2);
    expect(net.node(1).raw.confState()).toEqual({ voters: [1, 2, 3], learners: [] });
  });

  it('restarts from storage with the same membership (replaying applied conf changes)', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    net.addNode(4, []);
    net.act(1, (r) => r.proposeConfChange(cc(ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, 4)));
    net.tickAll(2);
    const n2 = net.node(2);
    const applied = n2.raw.status().applied;
    const restarted = new RawNode({ id: 2, peers: [1, 2, 3], storage: n2.storage, applied, electionTick: 10, heartbeatTick: 1 });
    expect(restarted.confState().voters).toEqual([1, 2, 3, 4]);
    expect(restarted.status()).toMatchObject({ term: n2.raw.status().term, commit: n2.raw.status().commit, applied });
  });
});

describe('proposals', () => {
  it('are dropped without a leader and forwarded by followers', () => {
    const net = new TestNet([1, 2, 3]);
    expect(() => net.node(2).raw.propose(Buffer.from('x'))).toThrow(ProposalDroppedError);
    net.campaign(1);
    net.propose(3, 'from-follower');
    expect(net.appliedData(1)).toEqual(['from-follower']);
  });

  it('rejects bad configuration', () => {
    const storage = new MemoryStorage();
    expect(() => new RawNode({ id: 0, storage, electionTick: 10, heartbeatTick: 1 })).toThrow(/raft id/);
    expect(() => new RawNode({ id: 1, storage, electionTick: 1, heartbeatTick: 1 })).toThrow(/electionTick/);
  });
});

describe('bootstrap', () => {
  it('a brand-new single-voter cluster can campaign before its first Ready is handled', () => {
    const storage = new MemoryStorage();
    const raw = new RawNode({ id: 1, peers: [1], storage, electionTick: 10, heartbeatTick: 1 });
    raw.campaign();
    expect(raw.status().role).toBe('leader');
    const rd = raw.ready();
    expect(rd.entries.map((e) => e.type)).toEqual([EntryType.ENTRY_TYPE_CONF_CHANGE, EntryType.ENTRY_TYPE_NORMAL]);
    expect(rd.hardState).toMatchObject({ term: 2, vote: 1 });
  });
});
