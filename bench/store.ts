/**
 * Store write benchmark: transactions/s with 1 and 64 concurrent writers through our store
 * (MemoryStore.update: read the object, write a modified copy, wait until applied locally)
 *
 *   - on etcd (manager/etcd: compares + puts in one etcd transaction, applied to the local store from
 *     etcd's answer; store transactions proposed in the same event-loop turn that commute share one
 *     etcd transaction), and the same with that off (mergeWrites: false, one etcd transaction per
 *     store transaction),
 *   - beside raw etcd3 requests of the same size to the same etcd: a plain put, and the transaction
 *     a hand-written GuaranteedUpdate sends (compare the mod revision, put) — the target: our store
 *     adds at most 20% over that raw transaction,
 *   - and on our Raft (a one-member RaftNode, WAL with fsync, in this process).
 *
 *   npm run build && npm run bench:store     (BENCH_SECONDS=4 per variant, BENCH_ROUNDS=4,
 *                                            BENCH_VALUE_BYTES=1024, BENCH_ETCD_MEMBERS=1)
 *
 * For profiling and A/B runs: BENCH_WRITERS=64 (only these writer counts), BENCH_VARIANTS=store,txn
 * (of store,store1,txn,put,raft), BENCH_AB=/abs/path/to/an/older/dist/manager/etcd/backend.js (that
 * backend module runs beside, on its own prefix, as variant "B").
 *
 * The machine may be shared: each variant's time is cut into BENCH_ROUNDS slices, run in rounds that
 * alternate the variants (the order reversed every other round), so a burst of outside load hits
 * every variant alike instead of whichever phase ran during it. Every variant gets a short warm-up
 * slice first (not counted).
 *
 * Starts a local etcd (/usr/bin/etcd, client TLS, in a temp dir) and removes everything afterwards.
 * Bounded in time; never fails on a missed target.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Task } from '../gen/flotilla/v1/objects.js';
import { StoreBatch, StoreSnapshot } from '../gen/flotilla/v1/objects.js';
import { createLogger } from '../common/log.js';
import { MemoryStore } from '../manager/store/store.js';
import { EtcdBackend } from '../manager/etcd/backend.js';
import { RaftNode } from '../manager/raft/node.js';
import { EtcdCluster, haveEtcd } from '../test/helpers/etcd.js';
import { waitFor } from '../test/helpers/wait.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const VALUE_BYTES = Number(process.env.BENCH_VALUE_BYTES ?? 1024);
const MEMBERS = Number(process.env.BENCH_ETCD_MEMBERS ?? 1);
const ROUNDS = Math.max(1, Number(process.env.BENCH_ROUNDS ?? 4));
/** for profiling: only these writer counts (e.g. "64") and variants (of "store,store1,txn,put,raft") */
const WRITERS = (process.env.BENCH_WRITERS ?? '1,64').split(',').map(Number);
const ONLY = new Set((process.env.BENCH_VARIANTS ?? 'store,store1,txn,put,raft').split(','));
const log = createLogger('bench-store');
log.level = 'warn';

interface Result {
  rate: number;
  p50: number;
  p99: number;
  errors: number;
  /** the rate of each round (see Variant.rounds) */
  rounds: number[];
  /** CPU time per transaction (µs) of this process and of the etcd members */
  cpuUs: number;
  etcdCpuUs: number;
}

/** CPU seconds (user + system) the etcd members used so far, from /proc (0 where unreadable) */
let etcdPids: number[] = [];
function etcdCpuS(): number {
  let t = 0;
  for (const pid of etcdPids) {
    try {
      const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      t += (Number(f[11]) + Number(f[12])) / 100; // utime + stime, in USER_HZ (100 on Linux)
    } catch {
      // gone
    }
  }
  return t;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

const quantile = (xs: number[], q: number): number => {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
};

interface Variant {
  name: string;
  op: (w: number, i: number) => Promise<void>;
  lat: number[];
  /** writes acknowledged within the counted windows, and those windows' length */
  done: number;
  ms: number;
  cpuUs: number;
  etcdCpuS: number;
  errors: number;
  n: number;
  /** the rate of each counted slice, in round order (paired with the other variants' same round) */
  rounds: number[];
}

/**
 * Runs v.op(writer, i) from `writers` concurrent loops for `seconds`; each op is one acknowledged
 * write. The rate counts the writes acknowledged within the window over the window; the writes
 * still in flight at its end finish before the next slice starts (their latency and CPU count, their
 * drain time does not), so a slice boundary costs no variant more than another.
 */
async function slice(writers: number, v: Variant, seconds: number, count: boolean): Promise<void> {
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  const cpu0 = process.cpuUsage();
  const e0 = etcdCpuS();
  const done0 = v.done;
  await Promise.all(
    Array.from({ length: writers }, async (_, w) => {
      while (performance.now() < end) {
        const s = performance.now();
        try {
          await v.op(w, v.n++);
          const t = performance.now();
          if (count) {
            v.lat.push(t - s);
            if (t <= end) v.done++;
          }
        } catch {
          if (count) v.errors++;
          if (v.errors > 1000) return;
        }
      }
    }),
  );
  if (count) {
    v.rounds.push((v.done - done0) / seconds);
    v.ms += seconds * 1000;
    const cpu = process.cpuUsage(cpu0);
    v.cpuUs += cpu.user + cpu.system;
    v.etcdCpuS += etcdCpuS() - e0;
  }
}

/** Every variant for SECONDS in all, in ROUNDS alternating rounds, after a warm-up slice each. */
async function interleaved(writers: number, variants: Variant[]): Promise<Map<string, Result>> {
  const warm = Math.min(1, SECONDS / ROUNDS);
  for (const v of variants) await slice(writers, v, warm, false);
  for (let r = 0; r < ROUNDS; r++) {
    for (const v of r % 2 ? [...variants].reverse() : variants) await slice(writers, v, SECONDS / ROUNDS, true);
  }
  return new Map(variants.map((v) => [v.name, { rate: v.done / (v.ms / 1000), p50: quantile(v.lat, 0.5), p99: quantile(v.lat, 0.99), errors: v.errors, rounds: v.rounds, cpuUs: v.cpuUs / v.lat.length, etcdCpuUs: (v.etcdCpuS * 1e6) / v.lat.length }]));
}

const variant = (name: string, op: Variant['op']): Variant => ({ name, op, lat: [], done: 0, ms: 0, cpuUs: 0, etcdCpuS: 0, errors: 0, n: 0, rounds: [] });
const SHORT = ['store', 'store1', 'txn', 'put', 'raft'];

const pct = (x: number): string => `${Math.abs(x).toFixed(1)}% ${x >= 0 ? 'more' : 'less'}`;
const fmt = (r: Result): string => `${Math.round(r.rate).toString().padStart(6)} tx/s  p50 ${r.p50.toFixed(2)} ms  p99 ${r.p99.toFixed(2)} ms  CPU/tx ${Math.round(r.cpuUs)} µs here + ${Math.round(r.etcdCpuUs)} µs etcd${r.errors ? `  (${r.errors} errors)` : ''}`;

function task(id: string, i: number): Task {
  return Task.fromPartial({ id, serviceId: 'bench', slot: i, nodeId: '', serviceName: 'x'.repeat(VALUE_BYTES) });
}

/** the store's transaction: read the object, write a modified copy */
async function storeWrite(store: MemoryStore, id: string, i: number): Promise<void> {
  await store.update((tx) => {
    const t = tx.get('task', id)!;
    tx.update('task', { ...t, slot: i });
  });
}

async function seed(store: MemoryStore, writers: number, tag: string): Promise<void> {
  await store.updateBatched((tx) => {
    for (let w = 0; w < writers; w++) tx.create('task', task(`${tag}-${w}`, 0));
  });
}

async function main(): Promise<void> {
  if (!haveEtcd()) {
    console.log('bench:store needs /usr/bin/etcd (Debian: etcd-server)');
    return;
  }
  const etcd = new EtcdCluster('flotilla-bench-store-');
  const raftDir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-bench-raft-'));
  const ac = new AbortController();
  let backend: EtcdBackend | undefined;
  let raft: RaftNode | undefined;
  let abStop: (() => Promise<void>) | undefined;
  let stop1: (() => Promise<void>) | undefined;
  const raw = await (async () => {
    await etcd.start(MEMBERS);
    etcdPids = etcd.members.flatMap((m) => (m.proc?.pid ? [m.proc.pid] : []));
    return etcd.client();
  })();
  try {
    const results: Array<[string, number, Result]> = [];
    const load0 = os.loadavg();
    // -- our store on etcd
    const store = new MemoryStore(log);
    const key = EtcdBackend.newSealKey();
    backend = new EtcdBackend(store, { endpoints: etcd.endpoints, prefix: '/bench', ...etcd.tls() }, key, { nodeId: 'bench', addr: '127.0.0.1:1' }, log);
    await EtcdBackend.claim(backend.client, '/bench', key);
    store.setProposer(backend);
    await backend.start();
    // the same store with one etcd transaction per store transaction (no joint transactions)
    const store1 = new MemoryStore(log);
    const backend1 = new EtcdBackend(store1, { endpoints: etcd.endpoints, prefix: '/bench1', ...etcd.tls(), mergeWrites: false }, key, { nodeId: 'bench1', addr: '127.0.0.1:3' }, log);
    stop1 = () => backend1.stop();
    await EtcdBackend.claim(backend1.client, '/bench1', key);
    store1.setProposer(backend1);
    await backend1.start();
    const size = Task.encode(task('x', 0)).finish().length;
    // A/B: an older backend module beside (not committed)
    let storeB: MemoryStore | undefined;
    if (process.env.BENCH_AB) {
      const mod = (await import(process.env.BENCH_AB)) as { EtcdBackend: typeof EtcdBackend };
      storeB = new MemoryStore(log);
      const bb = new mod.EtcdBackend(storeB, { endpoints: etcd.endpoints, prefix: '/benchb', ...etcd.tls() }, key, { nodeId: 'benchb', addr: '127.0.0.1:2' }, log);
      await mod.EtcdBackend.claim(bb.client, '/benchb', key);
      storeB.setProposer(bb);
      await bb.start();
      abStop = () => bb.stop();
    }
    // -- our Raft, one member
    const rstore = new MemoryStore(log);
    raft = await RaftNode.open({
      dataDir: raftDir,
      listenAddr: '127.0.0.1:0',
      signal: ac.signal,
      log,
      stateMachine: {
        apply: (data, index) => rstore.applyBatch(StoreBatch.decode(data), index),
        snapshot: () => StoreSnapshot.encode(rstore.snapshot()).finish(),
        restore: (data) => rstore.restore(StoreSnapshot.decode(data), rstore.appliedIndex),
      },
    });
    const r = raft;
    rstore.setProposer({ propose: (batch, signal) => r.propose(StoreBatch.encode(batch).finish(), signal) });
    await waitFor('raft leader', () => r.isLeader(), 10_000);

    for (const writers of WRITERS) {
      const tag = `w${writers}`;
      await seed(store, writers, tag);
      await seed(store1, writers, tag);
      if (storeB) await seed(storeB, writers, tag);
      // raw etcd3, same size (the sealed value our store writes: object + 28 bytes)
      const value = Buffer.alloc(size + 28, 1);
      const revs = new Map<number, string>();
      for (let w = 0; w < writers; w++) revs.set(w, (await raw.put(`/raw/${tag}/${w}`).value(value).exec()).header.revision);
      await seed(rstore, writers, tag);
      const variants = [
        variant('flotilla store on etcd (store.update; writes of one turn that commute share one etcd txn; applied from the answer)', (w, i) => storeWrite(store, `${tag}-${w}`, i)),
        variant('flotilla store on etcd, one etcd txn per store transaction (mergeWrites off)', (w, i) => storeWrite(store1, `${tag}-${w}`, i)),
        variant('raw etcd3 txn (compare mod revision, put; the hand-written GuaranteedUpdate)', async (w) => {
          const k = Buffer.from(`/raw/${tag}/${w}`);
          const res = await raw.kv.txn({ compare: [{ key: k, target: 'Mod', result: 'Equal', mod_revision: revs.get(w)! }], success: [{ request_put: { key: k, value } }] });
          if (!res.succeeded) throw new Error('conflict');
          revs.set(w, res.header.revision);
        }),
        variant('raw etcd3 put', async (w, i) => void (await raw.put(`/rawput/${tag}/${w}/${i % 16}`).value(value).exec())),
        variant('flotilla store on our Raft (one member, fsync)', (w, i) => storeWrite(rstore, `${tag}-${w}`, i)),
      ].filter((_, i) => ONLY.has(SHORT[i]!));
      const sb = storeB;
      if (sb) variants.push(variant('B: the other backend', (w, i) => storeWrite(sb, `${tag}-${w}`, i)));
      for (const [name, res] of await interleaved(writers, variants)) results.push([name, writers, res]);
    }

    console.log(`\nstore writes: a ${size}-byte task per transaction, ${SECONDS} s per variant in ${ROUNDS} alternating rounds, ${os.availableParallelism()} CPUs, load (1/5/15 min) ${load0.map((x) => x.toFixed(2)).join(' ')} at the start, ${os.loadavg().map((x) => x.toFixed(2)).join(' ')} at the end`);
    console.log(`etcd: ${MEMBERS} member(s) of /usr/bin/etcd on loopback, client TLS; our Raft: one member in this process\n`);
    for (const writers of WRITERS) {
      console.log(`${writers} writer${writers === 1 ? '' : 's'}:`);
      for (const [name, w, res] of results) if (w === writers) console.log(`  ${fmt(res)}   ${name}`);
      const bres = results.find(([n, w]) => w === writers && n.startsWith('B:'))?.[2];
      const ares = results.find(([n, w]) => w === writers && n.startsWith('flotilla store on etcd ('))?.[2];
      if (bres && ares) console.log(`  A/B: CPU/tx here ${Math.round(ares.cpuUs)} vs ${Math.round(bres.cpuUs)} µs, etcd ${Math.round(ares.etcdCpuUs)} vs ${Math.round(bres.etcdCpuUs)} µs; rate ${Math.round(ares.rate)} vs ${Math.round(bres.rate)}; median per-round rate ratio A/B ${median(ares.rounds.map((r, i) => r / bres.rounds[i]!)).toFixed(3)}`);
      const ours = results.find(([n, w]) => w === writers && n.startsWith('flotilla store on etcd ('))?.[2];
      const one = results.find(([n, w]) => w === writers && n.startsWith('flotilla store on etcd, one'))?.[2];
      const rawTxn = results.find(([n, w]) => w === writers && n.startsWith('raw etcd3 txn'))?.[2];
      if (!ours || !rawTxn) continue;
      const overhead = (rawTxn.rate / ours.rate - 1) * 100;
      // each round's slices of the variants ran back to back: the median of the per-round ratios is
      // what a burst of outside load or one long GC moves least
      const perRound = ours.rounds.map((r, i) => (rawTxn.rounds[i]! / r - 1) * 100);
      const med = median(perRound);
      console.log(`  overhead of our store over the raw etcd transaction: ${overhead.toFixed(1)}% over the run; median of the ${perRound.length} per-round ratios ${med.toFixed(1)}% (${perRound.map((x) => x.toFixed(0)).join(', ')}) (target at most 20%: ${med <= 20 ? 'met' : 'missed'}${med < 0 ? '; negative: ours is faster' : ''})`);
      const cpuOurs = ours.cpuUs + ours.etcdCpuUs;
      const cpuRaw = rawTxn.cpuUs + rawTxn.etcdCpuUs;
      console.log(`  CPU per transaction (this process + etcd): ours ${Math.round(cpuOurs)} µs, raw txn ${Math.round(cpuRaw)} µs (${pct((cpuOurs / cpuRaw - 1) * 100)})`);
      if (one) {
        const cpuOne = one.cpuUs + one.etcdCpuUs;
        console.log(`  without joint transactions: overhead ${((rawTxn.rate / one.rate - 1) * 100).toFixed(1)}%, CPU per transaction ${Math.round(cpuOne)} µs (${pct((cpuOne / cpuRaw - 1) * 100)} than raw)`);
      }
      console.log('');
    }
  } finally {
    await backend?.stop().catch(() => undefined);
    await abStop?.().catch(() => undefined);
    await stop1?.().catch(() => undefined);
    ac.abort();
    await raft?.stop().catch(() => undefined);
    raw.close();
    await etcd.stop();
    fs.rmSync(raftDir, { recursive: true, force: true });
  }
}

await main();
process.exit(0);
