/**
 * Deterministic simulation of whole clusters (see sim.ts). Every seed checks the safety invariants
 * as it runs and the linearizability of its client history at the end.
 *
 *   RAFT_SEED=N        run one seed (reproduce a failure)
 *   RAFT_SEEDS=N       how many seeds (default 2000; 20000 with SOAK=1)
 *   RAFT_SEED_START=N  first seed (default 1)
 *   RAFT_DURATION=N    simulated time units per seed (default 8000; 30000 with SOAK=1)
 *   SOAK=1             long run (npm run soak:raft)
 */
import { describe, expect, it } from 'vitest';
import { runSimulation, type SimStats } from '../../testing/raft/sim.js';

const soak = process.env.SOAK === '1';
const one = process.env.RAFT_SEED !== undefined ? Number(process.env.RAFT_SEED) : undefined;
const seeds = Number(process.env.RAFT_SEEDS ?? (soak ? 20000 : 2000));
const start = Number(process.env.RAFT_SEED_START ?? 1);
const duration = Number(process.env.RAFT_DURATION ?? (soak ? 30000 : 8000));
const timeout = soak ? 24 * 3600 * 1000 : 120_000;

type Totals = Record<'committed' | 'elections' | 'crashes' | 'partitions' | 'snapshotsInstalled' | 'confChanges' | 'transfers' | 'ops' | 'unknownWrites', number>;

function runRange(first: number, count: number, extra: { compaction?: boolean; membership?: boolean } = {}): Totals {
  const totals: Totals = { committed: 0, elections: 0, crashes: 0, partitions: 0, snapshotsInstalled: 0, confChanges: 0, transfers: 0, ops: 0, unknownWrites: 0 };
  for (let seed = first; seed < first + count; seed++) {
    const st: SimStats = runSimulation({ seed, duration, ...extra });
    for (const k of Object.keys(totals) as (keyof Totals)[]) totals[k] += st[k];
  }
  return totals;
}

describe.runIf(one !== undefined)('raft simulation: one seed', () => {
  it(`seed ${one}`, () => {
    const st = runSimulation({ seed: one!, duration });
    console.log(JSON.stringify(st, null, 2));
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
  });

  const chunks = 4;
  const per = Math.ceil(seeds / chunks);
  for (let c = 0; c < chunks; c++) {
    const first = start + c * per;
    const count = Math.max(0, Math.min(per, start + seeds - first));
    if (count === 0) continue;
    it(`seeds ${first}..${first + count - 1} (random features, ${duration} time units each)`, () => {
      const t0 = Date.now();
      const totals = runRange(first, count);
      console.log(`raft sim seeds ${first}..${first + count - 1}: ${Date.now() - t0} ms`, JSON.stringify(totals));
      // the runs must actually exercise the faults and features
      expect(totals.elections).toBeGreaterThan(count);
      expect(totals.crashes).toBeGreaterThan(0);
      if (count >= 100) {
        expect(totals.snapshotsInstalled).toBeGreaterThan(0);
        expect(totals.confChanges).toBeGreaterThan(0);
      }
    }, timeout);
  }

  it('compaction and membership changes in every run', () => {
    const n = soak ? 2000 : 200;
    const totals = runRange(1_000_000, n, { compaction: true, membership: true });
    console.log(`raft sim compaction+membership x${n}`, JSON.stringify(totals));
    expect(totals.snapshotsInstalled).toBeGreaterThan(n / 4);
    expect(totals.confChanges).toBeGreaterThan(n / 4);
  }, timeout);
});
