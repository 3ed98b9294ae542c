/**
 * The Ready handler's ordering (ready.ts), on a real core with a recording disk: what goes out or
 * is applied before the fsync, and what waits for it. The simulation (sim.test.ts) checks the
 * consequences under faults; these pin the rules down one by one.
 */
import { describe, expect, it, vi } from 'vitest';
import { EntryType, MessageType as T } from '../../gen/flotilla/v1/raft.js';
import { RawNode, newMessage } from './core.js';
import { MemoryStorage } from './memory-storage.js';
import { HeldEmptyAppends, ReadyRunner, coalesceAppends, type ReadyStep } from './ready.js';
import { mulberry32 } from '../../testing/raft/prng.js';
import type { Message } from './types.js';

interface Harness {
  raw: RawNode;
  runner: ReadyRunner<true>;
  /** what happened, in order: write, sync, send:<type>, apply:<index> */
  log: string[];
  sent: Message[];
}

function mk(id: number, peers: number[]): Harness {
  const storage = new MemoryStorage();
  const raw = new RawNode({ id, peers, storage, electionTick: 10, heartbeatTick: 1, random: mulberry32(id) });
  const log: string[] = [];
  const sent: Message[] = [];
  const runner = new ReadyRunner<true>(
    {
      storage,
      saveSnapshot: () => log.push('snapshot'),
      write: (hs, ents) => {
        if (hs || ents.length > 0) log.push('write');
      },
      startSync: () => {
        log.push('sync');
        return true;
      },
    },
    {
      onSoftState: () => {},
      send: (msgs) => {
        for (const m of msgs) {
          log.push(`send:${T[m.type]}`);
          sent.push(m);
        }
      },
      restoreSnapshot: () => {},
      applyEntry: (e) => {
        if (e.type === EntryType.ENTRY_TYPE_NORMAL && e.data.length > 0) log.push(`apply:${e.index}`);
      },
      afterApply: () => {},
      readState: () => {},
      advance: (rd) => raw.advance(rd),
    },
  );
  const h = { raw, runner, log, sent };
  drain(h);
  return h;
}

function drain(h: Harness): void {
  while (h.raw.hasReady()) h.runner.finish(h.runner.begin(h.raw.ready()));
}

/** begin() one Ready and return what happened before its fsync completed, and the step. */
function beginOne(h: Harness): { before: string[]; step: ReadyStep<true> } {
  h.log.length = 0;
  const step = h.runner.begin(h.raw.ready());
  return { before: [...h.log], step };
}

function leaderOfThree(): Harness {
  const h = mk(1, [1, 2, 3]);
  h.raw.campaign();
  drain(h);
  const term = h.raw.basicStatus().term;
  h.raw.step(newMessage({ type: T.MESSAGE_TYPE_VOTE_RESP, from: 2, to: 1, term }));
  drain(h);
  expect(h.raw.basicStatus().role).toBe('leader');
  // follower 2 takes the leader's first entry: its progress replicates (not paused in probe)
  h.raw.step(newMessage({ type: T.MESSAGE_TYPE_APP_RESP, from: 2, to: 1, term, index: h.raw.log.lastIndex() }));
  drain(h);
  return h;
}

describe('Ready handler ordering', () => {
  it('a lone voter applies its own new entry only after the fsync', () => {
    const h = mk(1, [1]);
    h.raw.campaign();
    drain(h);
    expect(h.raw.basicStatus().role).toBe('leader');
    h.raw.propose(Buffer.from('x'));
    const { before, step } = beginOne(h);
    const index = step.rd.entries[0]!.index;
    expect(step.rd.committedEntries.map((e) => e.index)).toContain(index); // committed on append
    expect(before).toEqual(['write', 'sync']);
    h.runner.finish(step);
    expect(h.log).toContain(`apply:${index}`);
  });

  it('committed entries durable before are applied during the fsync', () => {
    const h = leaderOfThree();
    h.raw.propose(Buffer.from('a'));
    drain(h); // a is written and synced
    const a = h.raw.log.lastIndex();
    h.raw.step(newMessage({ type: T.MESSAGE_TYPE_APP_RESP, from: 2, to: 1, term: h.raw.basicStatus().term, index: a })); // a commits
    h.raw.propose(Buffer.from('b'));
    const { before, step } = beginOne(h);
    expect(step.rd.entries.map((e) => e.index)).toEqual([a + 1]);
    expect(step.rd.committedEntries.map((e) => e.index)).toEqual([a]);
    expect(before.slice(-3)).toEqual(['write', 'sync', `apply:${a}`]);
    h.runner.finish(step);
    expect(h.log.filter((x) => x === `apply:${a}`)).toHaveLength(1);
  });

  it('a leader sends its appends before its own fsync', () => {
    const h = leaderOfThree();
    h.raw.propose(Buffer.from('x'));
    const { before, step } = beginOne(h);
    expect(step.early).toBe(true);
    expect(before[0]).toBe('send:MESSAGE_TYPE_APP');
    expect(before).toContain('sync');
    h.runner.finish(step);
  });

  it('a follower acknowledges an append only after the fsync', () => {
    const h = mk(1, [1, 2, 3]);
    const term = h.raw.basicStatus().term + 1;
    const last = h.raw.log.lastIndex();
    const logTerm = h.raw.log.termOrUndefined(last) ?? 0;
    h.raw.step(newMessage({ type: T.MESSAGE_TYPE_APP, from: 2, to: 1, term, index: last, logTerm, entries: [{ term, index: last + 1, type: EntryType.ENTRY_TYPE_NORMAL, data: Buffer.from('x') }] }));
    drain(h); // the new term (hard state) is handled; now the append alone
    h.raw.step(newMessage({ type: T.MESSAGE_TYPE_APP, from: 2, to: 1, term, index: last + 1, logTerm: term, entries: [{ term, index: last + 2, type: EntryType.ENTRY_TYPE_NORMAL, data: Buffer.from('y') }] }));
    const { before, step } = beginOne(h);
    expect(step.rd.entries).toHaveLength(1);
    expect(before).toEqual(['write', 'sync']);
    h.runner.finish(step);
    expect(h.log).toContain('send:MESSAGE_TYPE_APP_RESP');
  });

  it('a vote is granted only after the vote is synced', () => {
    const h = mk(1, [1, 2, 3]);
    const term = h.raw.basicStatus().term + 1;
    const last = h.raw.log.lastIndex();
    h.raw.step(newMessage({ type: T.MESSAGE_TYPE_VOTE, from: 2, to: 1, term, index: last, logTerm: h.raw.log.termOrUndefined(last) ?? 0 }));
    const { before, step } = beginOne(h);
    expect(step.rd.hardState?.vote).toBe(2);
    expect(before).toEqual(['write', 'sync']);
    h.runner.finish(step);
    const resp = h.sent.find((m) => m.type === T.MESSAGE_TYPE_VOTE_RESP);
    expect(resp?.reject).toBe(false);
  });

  it('a leader whose term changed sends nothing before the fsync', () => {
    const h = mk(1, [1, 2, 3]);
    const term = h.raw.basicStatus().term;
    h.raw.campaign();
    const { before, step } = beginOne(h);
    expect(step.rd.hardState?.term).toBe(term + 1);
    expect(before).toEqual(['write', 'sync']);
    h.runner.finish(step);
    expect(h.log).toContain('send:MESSAGE_TYPE_VOTE');
  });

  it('an acknowledgement and a proposal in one Ready: one append per follower, carrying the new commit', () => {
    const h = leaderOfThree();
    const term = h.raw.basicStatus().term;
    h.raw.step(newMessage({ type: T.MESSAGE_TYPE_APP_RESP, from: 3, to: 1, term, index: h.raw.log.lastIndex() }));
    drain(h);
    h.raw.propose(Buffer.from('a'));
    drain(h);
    const a = h.raw.log.lastIndex();
    // follower 2 acknowledges a (a commits: the core queues commit-only appends), then b is proposed
    h.raw.step(newMessage({ type: T.MESSAGE_TYPE_APP_RESP, from: 2, to: 1, term, index: a }));
    h.raw.propose(Buffer.from('b'));
    const rd = h.raw.ready();
    const apps = rd.messages.filter((m) => m.type === T.MESSAGE_TYPE_APP);
    expect(apps.some((m) => m.entries.length === 0 && m.commit === a)).toBe(true); // what the core produced
    h.sent.length = 0;
    h.runner.finish(h.runner.begin(rd));
    const out = h.sent.filter((m) => m.type === T.MESSAGE_TYPE_APP);
    expect(out.map((m) => m.to).sort()).toEqual([2, 3]);
    for (const m of out) {
      expect(m.entries.map((e) => e.index)).toEqual([a + 1]);
      expect(m.commit).toBe(a);
    }
  });
});

describe('coalesceAppends', () => {
  const app = (to: number, commit: number, ents: number[], term = 5): Message =>
    newMessage({ type: T.MESSAGE_TYPE_APP, from: 1, to, term, index: ents.length ? ents[0]! - 1 : 9, commit, entries: ents.map((index) => ({ term, index, type: EntryType.ENTRY_TYPE_NORMAL, data: Buffer.from('x') })) });
  const hb = (to: number): Message => newMessage({ type: T.MESSAGE_TYPE_HEARTBEAT, from: 1, to, term: 5, commit: 3 });
  const show = (ms: Message[]): string[] => ms.map((m) => `${T[m.type]!.replace('MESSAGE_TYPE_', '')}>${m.to} c${m.commit} [${m.entries.map((e) => e.index).join(',')}]`);

  it('drops a follower\'s empty appends when it has one with entries, keeping the highest commit', () => {
    const msgs = [app(2, 7, [10, 11]), hb(3), app(2, 9, []), app(3, 9, []), app(2, 9, [12])];
    expect(show(coalesceAppends(msgs))).toEqual(['APP>2 c9 [10,11]', 'HEARTBEAT>3 c3 []', 'APP>3 c9 []', 'APP>2 c9 [12]']);
  });

  it('leaves lone appends, empty-only followers and mixed terms alone', () => {
    const lone = [app(2, 7, []), app(3, 7, [10])];
    expect(coalesceAppends(lone)).toBe(lone);
    const empties = [app(2, 7, []), app(2, 8, [])];
    expect(coalesceAppends(empties)).toBe(empties);
    const mixed = [app(2, 7, [], 4), app(2, 8, [10], 5)];
    expect(coalesceAppends(mixed)).toBe(mixed);
  });
});

describe('HeldEmptyAppends (a leader\'s commit-only appends wait for an append to carry them)', () => {
  const app = (to: number, commit: number, ents: number[], term = 5): Message =>
    newMessage({ type: T.MESSAGE_TYPE_APP, from: 1, to, term, index: ents.length ? ents[0]! - 1 : 9, commit, entries: ents.map((index) => ({ term, index, type: EntryType.ENTRY_TYPE_NORMAL, data: Buffer.from('x') })) });
  const show = (ms: Message[]): string[] => ms.map((m) => `${T[m.type]!.replace('MESSAGE_TYPE_', '')}>${m.to} t${m.term} c${m.commit} [${m.entries.map((e) => e.index).join(',')}]`);

  it('an append sent within the delay carries the held commit; otherwise the empty append goes out when the time is up', () => {
    vi.useFakeTimers();
    try {
      const sent: Message[] = [];
      const h = new HeldEmptyAppends((ms) => sent.push(...ms), 5);
      h.send([app(2, 7, []), app(3, 7, []), newMessage({ type: T.MESSAGE_TYPE_HEARTBEAT, from: 1, to: 2, term: 5, commit: 6 })]);
      expect(show(sent)).toEqual(['HEARTBEAT>2 t5 c6 []']); // only the empty appends wait
      h.send([app(2, 6, [10])]);
      expect(show(sent.splice(0))).toEqual(['HEARTBEAT>2 t5 c6 []', 'APP>2 t5 c7 [10]']);
      expect(h.merged).toBe(1);
      vi.advanceTimersByTime(4);
      expect(sent).toHaveLength(0);
      vi.advanceTimersByTime(1);
      expect(show(sent.splice(0))).toEqual(['APP>3 t5 c7 []']);
      // a later empty append replaces the held one; one of a new term is never merged into an old one
      h.send([app(2, 8, [])]);
      h.send([app(2, 9, [])]);
      h.send([app(2, 9, [11], 6)]);
      expect(show(sent.splice(0))).toEqual(['APP>2 t6 c9 [11]']);
      expect(h.merged).toBe(1);
      h.send([app(3, 9, [])]);
      h.clear();
      vi.advanceTimersByTime(10);
      expect(sent).toHaveLength(0);
    } finally {
      vi.useRealTimers();
    }
  });
});
