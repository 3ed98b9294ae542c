/**
 * Raft benchmark: three raft-kv processes (test/helpers/raft-kv.ts) on loopback, fsync on.
 *
 *   npm run build && npm run bench:raft          (BENCH_SECONDS=4 per throughput phase)
 *
 * After a warm-up (BENCH_WARMUP_SECONDS=8 at 64 clients: the members' JIT settles), measures
 * committed writes/s (256-byte puts over HTTP keep-alive to the leader) with 1 and 64
 * concurrent clients, leader failover after kill -9 (from the kill to the first write a survivor
 * accepts), and the catch-up time of a new member from a snapshot of 100,000 objects. Prints our
 * figures beside the anchors of /work/shared/design/ANCHORS.md (etcd 3.4, 3 members, measured on
 * a machine like this one). If `etcd` is on PATH it is not measured here (left to a later run).
 * Bounded in time; never fails on a missed target.
 *
 * Against an older build (issue 11: "within 15% of the commit before mutual TLS"):
 *
 *   git worktree add --detach /tmp/base f93cc1e && ln -s "$PWD/node_modules" /tmp/base/node_modules
 *   (cd /tmp/base && npx tsc -p tsconfig.json)
 *   BENCH_RAFT_BASELINE=/tmp/base npm run bench:raft     (BENCH_AB_ROUNDS=8, BENCH_AB_ONLY=1 skips the rest)
 *
 * starts a second 3-member cluster from that build (as it runs: plaintext if it predates TLS) beside
 * ours, both idle but for the round being measured, and runs the 64- and 1-client phases in paired
 * rounds, the order of the two builds alternating each round, so load from outside hits both alike.
 * Prints each round's rates, the median of the per-round ratios, and CPU µs per write of each
 * cluster's three members (from /proc).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { RootCA, createRootCA } from '../manager/ca/x509.js';
import * as kvprocs from '../test/helpers/raft-kv-procs.js';
import { builtRaftKv, findLeader, killKv, request, spawnKv, status, type KvProc } from '../test/helpers/raft-kv-procs.js';
import { waitFor } from '../test/helpers/wait.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const WARMUP_SECONDS = Number(process.env.BENCH_WARMUP_SECONDS ?? 8);
const VALUE = 'v'.repeat(256);
const ANCHOR = { etcd1: 735, etcd64: 3345, etcdFailover: 1.21 };

const quantile = (xs: number[], q: number): number => {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
};

/** The raft-kv helpers of a build (ours, or BENCH_RAFT_BASELINE's: the same exports since f93cc1e). */
type KvModule = Pick<typeof kvprocs, 'KvConnection' | 'spawnKv' | 'status' | 'killKv'>;

async function throughput(leader: KvProc, clients: number, seconds: number, tag: string, mod: KvModule = kvprocs): Promise<{ rate: number; p50: number; p99: number; errors: number }> {
  const lat: number[] = [];
  let errors = 0;
  const end = Date.now() + seconds * 1000;
  const t0 = Date.now();
  await Promise.all(
    Array.from({ length: clients }, async (_, c) => {
      // one keep-alive connection per client, one request at a time: each write is one acknowledged PUT
      const conn = new mod.KvConnection(leader.httpPort);
      try {
        for (let i = 0; Date.now() < end; i++) {
          const s = performance.now();
          try {
            const r = await conn.request('PUT', `/kv/${tag}-${c}-${i}`, VALUE);
            if (r.status === 204) lat.push(performance.now() - s);
            else errors++;
          } catch {
            errors++;
          }
        }
      } finally {
        conn.close();
      }
    }),
  );
  const secs = (Date.now() - t0) / 1000;
  return { rate: lat.length / secs, p50: quantile(lat, 0.5), p99: quantile(lat, 0.99), errors };
}

/** CPU seconds (user + system) a process has used so far. */
function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return 0;
  try {
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(f[11]) + Number(f[12])) / 100; // clock ticks (USER_HZ 100 on Linux)
  } catch {
    return 0;
  }
}

interface AbRound {
  rate: number;
  /** CPU µs per write, the three members together */
  cpuUs: number;
}

async function abRound(nodes: KvProc[], leader: KvProc, clients: number, tag: string, mod: KvModule): Promise<AbRound> {
  const pids = nodes.map((n) => n.child.pid);
  const c0 = pids.map(cpuSeconds);
  const r = await throughput(leader, clients, SECONDS, tag, mod);
  const used = pids.map(cpuSeconds).reduce((sum, v, i) => sum + v - c0[i]!, 0);
  const writes = r.rate * SECONDS;
  return { rate: r.rate, cpuUs: writes > 0 ? (used * 1e6) / writes : NaN };
}

/**
 * Paired rounds against the build at BENCH_RAFT_BASELINE (see the header): both clusters up, the
 * order alternating each round. Returns the summary lines.
 */
async function compareWithBaseline(baseDir: string, ours: KvProc[], root: string, procs: KvProc[]): Promise<string[]> {
  const modPath = path.join(path.resolve(baseDir), 'dist/test/helpers/raft-kv-procs.js');
  if (!fs.existsSync(modPath)) throw new Error(`BENCH_RAFT_BASELINE=${baseDir}: ${modPath} is missing (build that checkout first)`);
  const base = (await import(modPath)) as KvModule;
  const rounds = Math.max(2, Number(process.env.BENCH_AB_ROUNDS ?? 8));
  const b0 = await base.spawnKv('base-a', path.join(root, 'base-a'));
  procs.push(b0);
  await waitFor('baseline a leads', async () => (await base.status(b0))?.leader, 20_000);
  const b1 = await base.spawnKv('base-b', path.join(root, 'base-b'), { join: b0.addr });
  procs.push(b1);
  const b2 = await base.spawnKv('base-c', path.join(root, 'base-c'), { join: b0.addr });
  procs.push(b2);
  await waitFor('baseline: 3 voters', async () => (await base.status(b0))?.members.filter((m) => !m.learner).length === 3, 30_000);
  const baseNodes = [b0, b1, b2];
  const ourLeader = (await findLeader(ours))!;
  // both builds warmed the same way (ours was warmed in main(), just before)
  await throughput(b0, 64, WARMUP_SECONDS, 'base-warm', base);
  const lines: string[] = [];
  for (const clients of [64, 1]) {
    const res = { ours: [] as AbRound[], base: [] as AbRound[] };
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? (['base', 'ours'] as const) : (['ours', 'base'] as const);
      for (const which of order) {
        const x = which === 'ours' ? await abRound(ours, ourLeader, clients, `ab${clients}-${r}`, kvprocs) : await abRound(baseNodes, b0, clients, `ab${clients}-${r}`, base);
        res[which].push(x);
        console.log(`  paired round ${r + 1}/${rounds}, ${clients} client(s), ${which === 'ours' ? 'this build' : 'baseline  '}: ${x.rate.toFixed(0).padStart(6)} writes/s, ${x.cpuUs.toFixed(0)} µs CPU/write (3 members)   load ${os.loadavg()[0]!.toFixed(2)}`);
      }
    }
    const ratios = res.ours.map((o, i) => o.rate / res.base[i]!.rate);
    const med = (xs: number[]): number => quantile(xs, 0.5);
    lines.push(
      `vs baseline (${path.basename(path.resolve(baseDir))}), ${clients} client(s), ${rounds} paired rounds: this build median ${med(res.ours.map((x) => x.rate)).toFixed(0)} writes/s (${med(res.ours.map((x) => x.cpuUs)).toFixed(0)} µs CPU/write), baseline ${med(res.base.map((x) => x.rate)).toFixed(0)} (${med(res.base.map((x) => x.cpuUs)).toFixed(0)} µs CPU/write); per-round ratios ${ratios.map((x) => x.toFixed(2)).join(' ')}, median ${med(ratios).toFixed(3)}${clients === 64 ? '   target >= 0.85' : ''}`,
    );
    console.log(lines[lines.length - 1]);
  }
  for (const p of baseNodes) await base.killKv(p, 'SIGTERM');
  return lines;
}

async function main(): Promise<void> {
  if (!builtRaftKv()) {
    console.error('bench:raft: run `npm run build` first (dist/test/helpers/raft-kv.js is missing)');
    process.exitCode = 1;
    return;
  }
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-bench-raft-'));
  const procs: KvProc[] = [];
  // mutual TLS between the members, as between managers: one root, a manager certificate each
  const ca = await RootCA.load(await createRootCA({ clusterId: 'bench' }));
  const spawn = async (name: string, opts: Parameters<typeof spawnKv>[2] = {}): Promise<KvProc> => {
    const tlsFile = path.join(root, `${name}-tls.json`);
    if (!fs.existsSync(tlsFile)) {
      const pair = await ca.issueWithNewKey({ nodeId: `kv-${name}`, role: 'manager', addresses: ['127.0.0.1'] });
      fs.writeFileSync(tlsFile, JSON.stringify({ trustPem: ca.certPem, ...pair }), { mode: 0o600 });
    }
    const p = await spawnKv(name, path.join(root, name), { tlsFile, ...opts });
    procs.push(p);
    return p;
  };
  const results: string[] = [];
  try {
    console.log(`flotilla raft benchmark: 3 processes on loopback, mutual TLS, fsync per Ready, tick 100 ms, election 10 ticks; ${SECONDS} s per phase; ${os.cpus().length} CPUs`);
    const a = await spawn('a');
    await waitFor('a leads', async () => (await status(a))?.leader, 20_000);
    const b = await spawn('b', { join: a.addr });
    const c = await spawn('c', { join: a.addr });
    await waitFor('3 voters', async () => (await status(a))?.members.filter((m) => !m.learner).length === 3, 30_000);
    let nodes = [a, b, c];
    // warm-up: V8 is still compiling the hot paths for the first seconds under load (perf showed
    // ~27% of a fresh member's CPU in the optimizing compiler in its first 4 s, ~1.5% after 12 s)
    await throughput(a, 64, WARMUP_SECONDS, 'warm');

    const baseline = process.env.BENCH_RAFT_BASELINE;
    if (baseline) {
      results.push(...(await compareWithBaseline(baseline, nodes, root, procs)));
      if (process.env.BENCH_AB_ONLY === '1') {
        console.log('\nsummary');
        for (const line of results) console.log(`  ${line}`);
        return;
      }
    }

    const one = await throughput(a, 1, SECONDS, 'one');
    const many = await throughput(a, 64, SECONDS, 'many');
    results.push(
      `writes/s, 1 client:    ${one.rate.toFixed(0).padStart(7)}  (p50 ${one.p50.toFixed(2)} ms, p99 ${one.p99.toFixed(2)} ms)   etcd 3.4 anchor: ${ANCHOR.etcd1}/s   ratio ${(one.rate / ANCHOR.etcd1).toFixed(2)}x`,
      `writes/s, 64 clients:  ${many.rate.toFixed(0).padStart(7)}  (p50 ${many.p50.toFixed(2)} ms, p99 ${many.p99.toFixed(2)} ms)   etcd 3.4 anchor: ${ANCHOR.etcd64}/s  ratio ${(many.rate / ANCHOR.etcd64).toFixed(2)}x   target >= 10,000/s`,
    );
    console.log(results.slice(-2).join('\n'));

    // failover: 8 writers; kill -9 the leader; time to the first write a survivor accepts
    const failovers: number[] = [];
    for (let round = 0; round < 2; round++) {
      const leader = (await findLeader(nodes))!;
      const survivors = nodes.filter((n) => n !== leader);
      let firstAfter = 0;
      let killedAt = 0;
      let stop = false;
      const writers = Array.from({ length: 8 }, async (_, w) => {
        for (let i = 0; !stop; i++) {
          for (const s of killedAt ? survivors : [leader]) {
            try {
              const r = await request(s.httpPort, 'PUT', `/kv/fo${round}-${w}-${i}`, VALUE, 3000);
              if (r.status === 204) {
                // only a survivor's answer counts (not a late answer of the killed leader)
                if (killedAt && !firstAfter && s !== leader) firstAfter = Date.now();
                break;
              }
            } catch {}
          }
          if (killedAt && !firstAfter) await new Promise((r) => setTimeout(r, 5));
        }
      });
      await new Promise((r) => setTimeout(r, 500));
      killedAt = Date.now();
      await killKv(leader, 'SIGKILL');
      await waitFor('a write after the kill', () => firstAfter > 0, 15_000, 5).catch(() => {});
      stop = true;
      await Promise.all(writers);
      if (firstAfter) failovers.push((firstAfter - killedAt) / 1000);
      // bring the killed one back from its disk
      const back = await spawnKv(leader.name, leader.dir, { raftPort: leader.raftPort, httpPort: leader.httpPort, tlsFile: path.join(root, `${leader.name}-tls.json`) });
      procs.push(back);
      nodes = nodes.map((n) => (n === leader ? back : n));
      await waitFor('3 reachable', async () => {
        const l = await findLeader(nodes);
        const s = l && (await status(l));
        return s && s.members.filter((m) => m.reachable).length === 3;
      }, 20_000);
    }
    results.push(
      `failover (kill -9 -> first write accepted): ${failovers.map((f) => `${f.toFixed(2)} s`).join(', ') || 'n/a'}   etcd 3.4 anchor: ${ANCHOR.etcdFailover} s   target <= 2 s`,
    );
    console.log(results[results.length - 1]);
    // idle stability: no election storms while nothing happens (RAFT_IDLE_SECONDS, default 600 = 10 minutes)
    const idleS = Number(process.env.RAFT_IDLE_SECONDS ?? 600);
    if (idleS > 0) {
      const terms0 = await Promise.all(nodes.map(async (n) => (await status(n))?.term ?? -1));
      const leader0 = (await findLeader(nodes))?.name;
      console.log(`idle: watching terms for ${idleS} s (RAFT_IDLE_SECONDS to change)...`);
      let changes = 0;
      let last = terms0;
      const until = Date.now() + idleS * 1000;
      while (Date.now() < until) {
        await new Promise((r) => setTimeout(r, Math.min(5000, Math.max(0, until - Date.now()))));
        const now = await Promise.all(nodes.map(async (n) => (await status(n))?.term ?? -1));
        if (now.some((t, i) => t !== last[i])) changes++;
        last = now;
      }
      const leader1 = (await findLeader(nodes))?.name;
      results.push(
        `idle ${idleS} s: terms ${terms0.join('/')} -> ${last.join('/')}, ${changes} term change(s), leader ${leader0} -> ${leader1}   target: no elections`,
      );
      console.log(results[results.length - 1]);
    }
    for (const n of nodes) await killKv(n, 'SIGTERM');

    // catch-up: one member with 100,000 objects compacted into a snapshot; a new member joins
    const s1 = await spawn('s1', { snapshotEvery: 50, compactKeep: 10 });
    await waitFor('s1 leads', async () => (await status(s1))?.leader, 20_000);
    const tl = Date.now();
    const r = await request(s1.httpPort, 'POST', '/bulk?n=100000&size=100&prefix=obj', undefined, 120_000);
    if (r.status !== 204) throw new Error(`bulk load: ${r.status} ${r.body}`);
    const loadMs = Date.now() - tl;
    const snapBytes = fs.readdirSync(path.join(s1.dir, 'snap')).map((f) => fs.statSync(path.join(s1.dir, 'snap', f)).size).sort((x, y) => y - x)[0] ?? 0;
    const tc = Date.now();
    const s2 = await spawn('s2', { join: s1.addr, snapshotEvery: 50, compactKeep: 10 });
    await waitFor('s2 has 100,000 objects', async () => ((await status(s2))?.size ?? 0) >= 100_000, 120_000, 20);
    const catchup = (Date.now() - tc) / 1000;
    results.push(`catch-up of a new member from a snapshot of 100,000 objects (${(snapBytes / 1e6).toFixed(1)} MB): ${catchup.toFixed(2)} s (spawn + join + snapshot transfer + restore; bulk load took ${(loadMs / 1000).toFixed(2)} s)`);
    console.log(results[results.length - 1]);

    console.log('\nsummary');
    for (const line of results) console.log(`  ${line}`);
  } finally {
    for (const p of procs) await killKv(p, 'SIGKILL');
    fs.rmSync(root, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(`bench:raft: ${(err as Error).stack ?? String(err)}`);
  process.exitCode = 1;
});
