/**
 * Service convergence on one node with real runc: the time from `service create --replicas N busybox
 * sleep 100000` to N tasks running, through the control API (CreateService, then ListTasks polled every
 * ~15 ms) and as the wall time of the CLI `service create` (without --detach: it waits for convergence).
 * Docker Swarm beside it when a local dockerd answers (`docker info`), measured in the same run,
 * interleaved; otherwise the anchor from docs/design (13.2 s for 50, 2.0 s for 10), marked as such.
 *
 *   npm run build && npm run bench:converge       (root; BENCH_RUNS=3, BENCH_SIZES=50,10, BENCH_SWARM=0 to skip Swarm;
 *                                                 `-- --store etcd`: the same run again on a local etcd, side by side)
 *
 * Each size runs BENCH_RUNS times per method; between runs the service is removed and we wait until
 * all its containers are gone. For a missed target it prints where the time goes: per stage (task
 * created, assigned, container created and started by the runtime, running reported by the agent,
 * running in the store) the first, median and last task. Services use --stop-grace-period 1s (busybox
 * sleep ignores SIGTERM) so removal between runs is quick; it does not touch creation. Cleans up
 * everything (services, containers, processes, temp dirs, swarm services) even on failure; a hard time
 * bound (BENCH_BUDGET_S, default 900) ends it. Exits 0 unless something is functionally wrong.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Control } from '../cli/client.js';
import { buildServiceSpec } from '../cli/servicespec.js';
import { findBinary } from '../agent/runtime/runc.js';
import { buildSpec } from '../agent/runtime/oci.js';
import { defaultSeccomp } from '../agent/runtime/seccomp.js';
import { removeCgroups } from '../agent/runtime/cgroups.js';
import type { CreateServiceResponse } from '../gen/flotilla/v1/control.js';
import { TaskState } from '../gen/flotilla/v1/objects.js';
import { buildBusyboxRootfs, importBusybox } from '../test/helpers/busybox.js';
import {
  BenchCluster,
  runcBenchBlocked,
  Timeline,
  flotilla,
  cpuMs,
  control,
  dockerAvailable,
  dockerImportRootfs,
  ensureSwarm,
  listTasks,
  loadAvg,
  median,
  mib,
  rssKb,
  run,
  secs,
  sleep,
  swarmRemove,
  swarmTeardown,
  teardown,
  containersOf,
  swarmRunning,
  until,
  waitNodesReady,
  benchStores,
  withStore,
} from './common.js';

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const SIZES = (process.env.BENCH_SIZES ?? '50,10').split(',').map(Number).filter((n) => n > 0);
const BUDGET_MS = Number(process.env.BENCH_BUDGET_S ?? 900) * 1000;
const TARGET_50_MS = 1300;
const ANCHOR_S: Record<number, number> = { 50: 13.2, 10: 2.0 };
const SWARM_IMAGE = 'flotilla-bb';
const SWARM_PREFIX = 'flbench-conv-';
const CONVERGE_TIMEOUT_MS = 120_000;
const TRACE = process.env.BENCH_TRACE === '1';
let traceOf: { err: string[] } | undefined;

/** Sums FLOTILLA_TRACE lines ("[trace] create NAME STEP 12.3ms") per step: count, median, total. */
function traceSummary(p: { err: string[] }): string[] {
  const steps = new Map<string, number[]>();
  for (const line of p.err.join('').split('\n')) {
    const m = /^\[trace\] (\S+) \S+ (.+) ([\d.]+)ms$/.exec(line);
    if (!m) continue;
    const k = `${m[1]} ${m[2]}`;
    let xs = steps.get(k);
    if (!xs) steps.set(k, (xs = []));
    xs.push(Number(m[3]));
  }
  return [...steps].map(([k, xs]) => `    ${k.padEnd(40)} n=${String(xs.length).padStart(4)}   median ${xs.length ? median(xs).toFixed(1) : 'n/a'} ms   total ${(xs.reduce((a, b) => a + b, 0) / 1000).toFixed(2)} s`);
}

let deadline = Date.now() + BUDGET_MS;
const left = (): number => Math.max(1000, deadline - Date.now());

interface Sample {
  ms: number;
  detail?: string[];
}

async function removeService(ctl: Control, dataDir: string, name: string): Promise<void> {
  await ctl.call('removeService', { serviceId: name }).catch(() => undefined);
  await until('all containers gone', async () => (await containersOf(dataDir)).length === 0, Math.min(90_000, left()), 200);
}

/** CreateService through the API, then ListTasks every ~15 ms until n run. */
async function convergeApi(ctl: Control, dataDir: string, name: string, n: number, explain: boolean): Promise<Sample> {
  const spec = buildServiceSpec({ name, replicas: String(n), stopGracePeriod: '1s' }, 'busybox:latest', ['sleep', '100000']);
  const tl = new Timeline();
  const t0 = Date.now();
  const p0 = performance.now();
  const { service } = await ctl.call<unknown, CreateServiceResponse>('createService', { spec });
  const stop = Date.now() + Math.min(CONVERGE_TIMEOUT_MS, left());
  let ms = NaN;
  while (Date.now() < stop) {
    const tasks = await listTasks(ctl, service!.id);
    const now = Date.now();
    tl.observe(tasks, now);
    if (tasks.filter((t) => t.status?.state === TaskState.TASK_STATE_RUNNING).length === n) {
      ms = performance.now() - p0;
      break;
    }
    await sleep(15);
  }
  if (!Number.isFinite(ms)) throw new Error(`${name}: ${n} tasks not running within ${CONVERGE_TIMEOUT_MS} ms`);
  let detail: string[] | undefined;
  if (explain) {
    detail = tl.summary(t0);
    // the runtime's own times: container created and started (labels link containers to tasks)
    const cs = (await containersOf(dataDir)).filter((c) => tl.seen.has(c.labels['flotilla.task.id'] ?? ''));
    const rel = (xs: number[]): string => {
      const v = xs.filter((x) => x > 0).map((x) => x - t0);
      return v.length ? `first ${secs(Math.min(...v)).padStart(8)}   median ${secs(median(v)).padStart(8)}   last ${secs(Math.max(...v)).padStart(8)}` : 'n/a';
    };
    detail.splice(2, 0, `    ${'container created (runtime)'.padEnd(46)} ${rel(cs.map((c) => c.created))}`, `    ${'container started (runtime)'.padEnd(46)} ${rel(cs.map((c) => c.started))}`);
  }
  return { ms, detail };
}

async function convergeCli(env: NodeJS.ProcessEnv, name: string, n: number): Promise<Sample> {
  const t = performance.now();
  const r = await flotilla(['service', 'create', '--name', name, '--replicas', String(n), '--stop-grace-period', '1s', '-q', 'busybox:latest', 'sleep', '100000'], env, Math.min(CONVERGE_TIMEOUT_MS, left()));
  const ms = performance.now() - t;
  if (r.code !== 0) throw new Error(`flotilla service create ${name} failed (${r.code}): ${r.stderr.trim()}`);
  return { ms };
}

/**
 * The floor under any orchestrator here: n raw `runc run -d` of the same rootfs and default spec,
 * CONCURRENCY at a time (the worker's default), no conmon, no image/snapshot work.
 */
const CONCURRENCY = 16;
async function rawFloor(base: string, rootfs: string, n: number, seq: number): Promise<Sample> {
  const runc = findBinary('runc')!;
  const root = path.join(base, 'runc-raw');
  const ids = Array.from({ length: n }, (_, i) => `flbench-raw-${process.pid}-${seq}-${i}`);
  for (const id of ids) {
    const bundle = path.join(base, 'bundles', id);
    await fs.mkdir(bundle, { recursive: true });
    const spec = buildSpec({ args: ['sleep', '100000'], env: ['PATH=/bin'], cwd: '/', uid: 0, gid: 0, hostname: id, rootfs, cgroupsPath: `/flotilla-bench/${id}`, network: 'private', seccomp: defaultSeccomp() });
    await fs.writeFile(path.join(bundle, 'config.json'), JSON.stringify(spec));
  }
  const t = performance.now();
  let next = 0;
  let failed = '';
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < ids.length) {
        const id = ids[next++]!;
        const r = await run(runc, ['--root', root, 'run', '-d', '--bundle', path.join(base, 'bundles', id), id], { timeoutMs: 60_000, quiet: true });
        if (r.code !== 0) failed ||= `runc run -d ${id} exited with ${r.code}`;
      }
    }),
  );
  const ms = performance.now() - t;
  await removeRaw(base, ids);
  if (failed) throw new Error(failed);
  return { ms };
}

async function removeRaw(base: string, ids: string[]): Promise<void> {
  const runc = findBinary('runc')!;
  const root = path.join(base, 'runc-raw');
  await Promise.all(
    ids.map(async (id) => {
      await run(runc, ['--root', root, 'delete', '--force', id], { timeoutMs: 30_000 });
      await removeCgroups(`/flotilla-bench/${id}`).catch(() => undefined);
      await fs.rm(path.join(base, 'bundles', id), { recursive: true, force: true });
    }),
  );
}

/** Removes raw runc containers a failed run left (every id under our --root). */
async function removeAllRaw(base: string): Promise<void> {
  const runc = findBinary('runc');
  if (!runc || !existsSync(path.join(base, 'runc-raw'))) return;
  const r = await run(runc, ['--root', path.join(base, 'runc-raw'), 'list', '-q'], { timeoutMs: 30_000 });
  await removeRaw(base, r.stdout.split('\n').filter(Boolean));
}

async function convergeSwarm(name: string, n: number): Promise<Sample> {
  const t = performance.now();
  const r = await run('docker', ['service', 'create', '--detach', '--name', name, '--replicas', String(n), '--stop-grace-period', '1s', SWARM_IMAGE, 'sleep', '100000'], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`docker service create failed: ${r.stderr.trim()}`);
  await until(`${n} swarm tasks running`, async () => (await swarmRunning(name)) === n, Math.min(CONVERGE_TIMEOUT_MS, left()), 20);
  return { ms: performance.now() - t };
}

/** key figures of each store's run, printed side by side at the end */
const summary: string[] = [];

async function main(store: 'raft' | 'etcd', storeArgs: string[]): Promise<number> {
  const blocked = runcBenchBlocked('bench:converge');
  if (blocked !== undefined) return blocked;
  const c = new BenchCluster(await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-bench-conv-')));
  const dataDir = path.join(c.root, 'm1');
  let ctl: Control | undefined;
  let swarm = false;
  let swarmInit = false;
  let swarmImage = false;
  let swarmNote = '';
  const onSignal = (): void => {
    console.log('\ninterrupted: cleaning up');
    process.exitCode = 130;
    deadline = Date.now();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const load0 = loadAvg();
  let exit = 0;
  try {
    await importBusybox(dataDir);
    // BENCH_TRACE=1: the runtime's per-step times (FLOTILLA_TRACE) summed up at the end;
    // BENCH_CPU_PROF=DIR: a V8 CPU profile of the manager (written when it exits)
    const mgr = await c.startManager({
      agent: true,
      runtime: 'runc',
      heartbeat: '5s',
      dataDir,
      env: TRACE ? { FLOTILLA_TRACE: '1' } : {},
      keep: TRACE ? 1e7 : 200,
      nodeArgs: process.env.BENCH_CPU_PROF ? ['--cpu-prof', '--cpu-prof-dir', path.resolve(process.env.BENCH_CPU_PROF)] : [],
      extra: storeArgs,
    });
    console.log(`\n== store: ${store}${store === 'etcd' ? ' (a local etcd, one member, client TLS)' : ''}`);
    traceOf = mgr;
    ctl = control(c.socket);
    await waitNodesReady(ctl, 1, 30_000);

    const rootfs = path.join(c.root, 'bb-rootfs');
    await buildBusyboxRootfs(rootfs);
    if (process.env.BENCH_SWARM !== '0' && (await dockerAvailable())) {
      try {
        swarmInit = await ensureSwarm();
        await dockerImportRootfs(rootfs, SWARM_IMAGE);
        swarmImage = true;
        swarm = true;
      } catch (err) {
        swarmNote = `Swarm not measured: ${(err as Error).message}`;
      }
    } else swarmNote = process.env.BENCH_SWARM === '0' ? 'Swarm skipped (BENCH_SWARM=0)' : 'no dockerd here (`docker info` failed)';

    // warm-up (page cache, first layer mount, JIT): 5 replicas each way, not counted
    let seq = 0;
    await convergeApi(ctl, dataDir, `warm-${seq}`, 5, false);
    await removeService(ctl, dataDir, `warm-${seq++}`);
    if (swarm) {
      await convergeSwarm(`${SWARM_PREFIX}warm`, 5);
      await swarmRemove(`${SWARM_PREFIX}warm`);
    }

    await rawFloor(c.root, rootfs, 5, seq++);

    const results: Array<{ n: number; api: Sample[]; cli: Sample[]; swarm: Sample[]; raw: Sample[]; cpu: number[] }> = [];
    for (const n of SIZES) {
      const r = { n, api: [] as Sample[], cli: [] as Sample[], swarm: [] as Sample[], raw: [] as Sample[], cpu: [] as number[] };
      results.push(r);
      for (let i = 0; i < RUNS; i++) {
        r.raw.push(await rawFloor(c.root, rootfs, n, seq++));
        const a = `conv-${n}-api-${i}`;
        const cpu0 = cpuMs(mgr.child.pid);
        r.api.push(await convergeApi(ctl, dataDir, a, n, true));
        r.cpu.push(cpuMs(mgr.child.pid) - cpu0);
        process.stdout.write(`  ${n} replicas, run ${i + 1}: raw runc ${secs(r.raw.at(-1)!.ms)}, API ${secs(r.api.at(-1)!.ms)}`);
        await removeService(ctl, dataDir, a);
        const b = `conv-${n}-cli-${i}`;
        r.cli.push(await convergeCli(c.env, b, n));
        process.stdout.write(`, CLI ${secs(r.cli.at(-1)!.ms)}`);
        await removeService(ctl, dataDir, b);
        if (swarm) {
          const s = `${SWARM_PREFIX}${n}-${i}`;
          r.swarm.push(await convergeSwarm(s, n));
          process.stdout.write(`, Swarm ${secs(r.swarm.at(-1)!.ms)}`);
          await swarmRemove(s);
        }
        process.stdout.write('\n');
      }
    }
    const mgrRss = rssKb(mgr.child.pid);

    console.log(`\nservice convergence on one node, real runc (busybox, sleep 100000), ${os.availableParallelism()} CPUs, median of ${RUNS}`);
    console.log(`load average before: ${load0}, after: ${loadAvg()} (other work on this machine adds noise)\n`);
    for (const r of results) {
      const api = median(r.api.map((s) => s.ms));
      const cliMs = median(r.cli.map((s) => s.ms));
      const sw = median(r.swarm.map((s) => s.ms));
      const anchor = swarm ? `Docker Swarm (same run) ${secs(sw)}` : `Docker Swarm ${ANCHOR_S[r.n] !== undefined ? `${ANCHOR_S[r.n]!.toFixed(1)} s` : 'n/a'} (published/measured earlier, not this run)`;
      const ref = swarm ? sw : (ANCHOR_S[r.n] ?? NaN) * 1000;
      console.log(`${String(r.n).padStart(3)} replicas: flotilla API ${secs(api)}   CLI service create ${secs(cliMs)}   ${anchor}   ${Number.isFinite(ref) ? `(${(ref / api).toFixed(1)}x faster)` : ''}`);
      console.log(`             runs: API ${r.api.map((s) => secs(s.ms)).join(', ')}; CLI ${r.cli.map((s) => secs(s.ms)).join(', ')}${swarm ? `; Swarm ${r.swarm.map((s) => secs(s.ms)).join(', ')}` : ''}`);
      console.log(`             floor: ${r.n} raw \`runc run -d\`, ${CONCURRENCY} at a time, same rootfs and spec: ${secs(median(r.raw.map((s) => s.ms)))} (flotilla API ${(api / median(r.raw.map((s) => s.ms))).toFixed(2)}x that)`);
      console.log(`             manager process CPU (user+sys, its in-process agent included; runc/conmon not) during an API run: ${secs(median(r.cpu))}`);
      summary.push(`${store.padEnd(5)} ${String(r.n).padStart(3)} replicas: API ${secs(api)}, CLI ${secs(cliMs)} (runs: ${r.api.map((x) => secs(x.ms)).join(', ')}); manager CPU ${secs(median(r.cpu))}`);
    }
    if (!swarm) console.log(`(${swarmNote})`);
    console.log(`manager RSS (with its in-process agent) at the end: ${mib(mgrRss)}`);
    const r50 = results.find((r) => r.n === 50);
    if (r50) {
      const api = median(r50.api.map((s) => s.ms));
      const met = api <= TARGET_50_MS;
      console.log(`target: 50 replicas in at most ${secs(TARGET_50_MS)}: ${met ? 'met' : 'missed'} (${secs(api)})`);
    }
    // where the time goes: the median run of each size, per stage, relative to CreateService
    for (const r of results) {
      const sorted = [...r.api].sort((x, y) => x.ms - y.ms);
      const mid = sorted[Math.floor((sorted.length - 1) / 2)];
      if (!mid?.detail) continue;
      console.log(`\nwhere the time goes, ${r.n} replicas (median API run, ${secs(mid.ms)}; times since CreateService was sent):`);
      for (const l of mid.detail) console.log(l);
    }
    if (TRACE && traceOf) {
      console.log('\nruntime steps over all runs (FLOTILLA_TRACE in the manager):');
      for (const l of traceSummary(traceOf)) console.log(l);
    }
  } catch (err) {
    console.error(`bench:converge failed: ${(err as Error).stack ?? String(err)}`);
    exit = 1;
  } finally {
    await removeAllRaw(c.root).catch(() => undefined);
    await teardown(c, ctl, dataDir);
    if (swarmInit || swarmImage) await swarmTeardown(SWARM_PREFIX, { init: swarmInit, image: swarmImage ? SWARM_IMAGE : '' });
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  return exit;
}

let code = 0;
for (const store of benchStores()) {
  const c = await withStore(store, (args) => main(store, args)).catch((err: unknown) => {
    console.error(`bench:converge (${store} store) failed: ${(err as Error).message}`);
    return 1;
  });
  code ||= c;
  if (process.exitCode === 130) break;
}
if (summary.length > 0 && benchStores().length > 1) {
  console.log('\nside by side (same run, same machine):');
  for (const l of summary) console.log(`  ${l}`);
}
process.exit(process.exitCode && process.exitCode !== 0 ? process.exitCode : code);
