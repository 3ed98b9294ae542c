/**
 * Deterministic simulation of whole clusters (see testing/raft/sim.ts), driven by the production
 * Ready handler (ready.ts). Every seed checks the safety invariants as it runs and the
 * linearizability of its client history at the end; a check that gives up (the step limit) fails.
 * Every chunk of seeds prints a summary and fails unless it exercised each fault: crashes that
 * dropped unsynced data, crashes between a leader's early send and its fsync, partitions, leader
 * transfers, snapshots sent, membership changes; and unless every linearizability check decided.
 *
 *   RAFT_SEED=N        run one seed (reproduce a failure)
 *   RAFT_SEEDS=N       how many seeds (default 5000; 20000 with SOAK=1)
 *   RAFT_SEED_START=N  first seed (default 1)
 *   RAFT_DURATION=N    simulated time units per seed (default 2500; 30000 with SOAK=1)
 *   SOAK=1             long run (npm run soak:raft)
 */
import { describe, expect, it } from 'vitest';
import { runSimulation, type SimStats } from '../../testing/raft/sim.js';

const soak = process.env.SOAK === '1';
const one = process.env.RAFT_SEED !== undefined ? Number(process.env.RAFT_SEED) : undefined;
const seeds = Number(process.env.RAFT_SEEDS ?? (soak ? 20000 : 5000));
const start = Number(process.env.RAFT_SEED_START ?? 1);
const duration = Number(process.env.RAFT_DURATION ?? (soak ? 30000 : 2500));
const timeout = soak ? 24 * 3600 * 1000 : 300_000;

const COUNTED = [
  'committed',
  'elections',
  'crashes',
  'crashesLostUnsynced',
  'crashesAfterEarlySend',
  'partitions',
  'transfers',
  'transfersDone',
  'snapshotsSent',
  'snapshotsInstalled',
  'confChanges',
  'confChangesCommitted',
  'ops',
  'unknownWrites',
  'unknownWritesCommitted',
  'linearizabilityDecided',
] as const;
type Totals = Record<(typeof COUNTED)[number], number> & { seeds: number; gaveUp: number[] };

function runRange(first: number, count: number, extra: { compaction?: boolean; membership?: boolean; duration?: number } = {}): Totals {
  const totals = { seeds: count, gaveUp: [] as number[] } as unknown as Totals;
  for (const k of COUNTED) totals[k] = 0;
  for (let seed = first; seed < first + count; seed++) {
    const st: SimStats = runSimulation({ seed, duration, ...extra });
    for (const k of COUNTED) totals[k] += st[k];
    if (st.linearizable !== 'ok') totals.gaveUp.push(seed);
  }
  return totals;
}

function summary(what: string, t: Totals, ms: number): string {
  return (
    `raft sim ${what} (${t.seeds} seeds, ${(ms / 1000).toFixed(1)} s): ` +
    `crashes ${t.crashes} (dropped unsynced data: ${t.crashesLostUnsynced}; between an early send and its fsync: ${t.crashesAfterEarlySend}), ` +
    `partitions ${t.partitions}, leader transfers ${t.transfersDone} done of ${t.transfers}, ` +
    `snapshots sent ${t.snapshotsSent} (installed ${t.snapshotsInstalled}), membership changes ${t.confChangesCommitted} committed of ${t.confChanges}, ` +
    `linearizability checks decided ${t.linearizabilityDecided}/${t.seeds}` +
    (t.gaveUp.length > 0 ? ` (gave up: seeds ${t.gaveUp.join(', ')})` : '') +
    `; ${t.committed} entries committed, ${t.ops} client operations, ${t.unknownWrites} writes abandoned (${t.unknownWritesCommitted} took effect), ${t.elections} elections`
  );
}

/** A run of seeds that did not exercise a fault, or whose checker gave up, proves nothing. */
function expectExercised(t: Totals): void {
  expect(t.gaveUp, 'linearizability checks that gave up at the step limit').toEqual([]);
  expect(t.linearizabilityDecided).toBe(t.seeds);
  expect(t.crashesLostUnsynced, 'crashes that dropped unsynced data').toBeGreaterThan(0);
  expect(t.crashesAfterEarlySend, 'crashes between an early send and the fsync').toBeGreaterThan(0);
  expect(t.partitions, 'partitions').toBeGreaterThan(0);
  expect(t.transfersDone, 'leader transfers done').toBeGreaterThan(0);
  expect(t.snapshotsSent, 'snapshots sent').toBeGreaterThan(0);
  expect(t.snapshotsInstalled, 'snapshots installed').toBeGreaterThan(0);
  expect(t.confChangesCommitted, 'membership changes committed').toBeGreaterThan(0);
}

describe.runIf(one !== undefined)('raft simulation: one seed', () => {
  it(`seed ${one}`, () => {
    const st = runSimulation({ seed: one!, duration });
    console.log(JSON.stringify(st, null, 2));
    expect(st.linearizable, 'the linearizability check decided').toBe('ok');
  }, timeout);
});

describe.skipIf(one !== undefined)('raft simulation', () => {
  it('is deterministic: the same seed gives the same run', () => {
    for (const seed of [1, 2, 3, 42]) {
      const a = runSimulation({ seed, duration: 3000 });
      const b = runSimulation({ seed, duration: 3000 });
      expect(a).toEqual(b);
    }
    expect(runSimulation({ seed: 5, duration: 3000 }).fingerprint).not.toBe(runSimulation({ seed: 6, duration: 3000 }).fingerprint);
  });

  it('makes progress without faults', () => {
    const st = runSimulation({ seed: 7, duration: 5000, faults: false, nodes: 3 });
    expect(st.committed).toBeGreaterThan(100);
    expect(st.elections).toBe(1);
    expect(st.unknownWrites).toBe(0);
    expect(st.crashes).toBe(0);
  });

  const chunks = soak ? 10 : 5;
  const per = Math.ceil(seeds / chunks);
  for (let c = 0; c < chunks; c++) {
    const first = start + c * per;
    const count = Math.max(0, Math.min(per, start + seeds - first));
    if (count === 0) continue;
    it(`seeds ${first}..${first + count - 1} (random features, ${duration} time units each)`, () => {
      const t0 = Date.now();
      const totals = runRange(first, count);
      console.log(summary(`seeds ${first}..${first + count - 1}`, totals, Date.now() - t0));
      expect(totals.elections).toBeGreaterThan(count);
      expectExercised(totals);
    }, timeout);
  }

  it('compaction and membership changes in every run', () => {
    const n = soak ? 2000 : 150;
    const t0 = Date.now();
    const totals = runRange(1_000_000, n, { compaction: true, membership: true, duration: soak ? duration : 6000 });
    console.log(summary(`compaction+membership`, totals, Date.now() - t0));
    expectExercised(totals);
    expect(totals.snapshotsInstalled).toBeGreaterThan(n / 4);
    expect(totals.confChangesCommitted).toBeGreaterThan(n / 4);
  }, timeout);
});
