/**
 * Rolling update on one node with real runc: 30 replicas of busybox (`sleep 100000`, stop grace 1 s),
 * update parallelism 10, delay 0, monitor 1 s, stop-first, triggered by adding an env var (R=<run>).
 * Timed two ways: through the control API (UpdateService, then GetService polled every ~15 ms until
 * updateStatus is completed) and as the wall time of the CLI `service update --env-add R=..
 * --update-parallelism 10 --update-delay 0s --update-monitor 1s` (without --detach: it exits 0 when the
 * update completed). Docker Swarm beside it when a local dockerd answers (the same flags; `--detach`
 * then polling UpdateStatus.State, and the CLI's wall time without --detach), else the anchor 12.5 s.
 *
 *   npm run build && npm run bench:update       (root; BENCH_RUNS=3, BENCH_REPLICAS=30, BENCH_SWARM=0 to skip Swarm)
 *
 * busybox `sleep` as PID 1 ignores SIGTERM, so every stop costs the 1 s grace period: three batches of
 * 10 cost at least 3 x (1 s stop + start) plus the 1 s monitor of the last batch, for Swarm alike.
 * Prints where the time goes per batch (old tasks shut down, new ones created and running). Cleans up
 * everything even on failure, bounded by BENCH_BUDGET_S (default 900). Exits 0 unless something is
 * functionally wrong (an update that does not complete).
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Control } from '../cli/client.js';
import { buildServiceSpec } from '../cli/servicespec.js';
import { applyUpdate } from '../cli/update.js';
import type { CreateServiceResponse, GetServiceResponse } from '../gen/flotilla/v1/control.js';
import { TaskState, UpdateState, type Task } from '../gen/flotilla/v1/objects.js';
import { buildBusyboxRootfs, importBusybox } from '../test/helpers/busybox.js';
import {
  BenchCluster,
  runcBenchBlocked,
  control,
  dockerAvailable,
  dockerImportRootfs,
  ensureSwarm,
  flotilla,
  listTasks,
  loadAvg,
  median,
  mib,
  rssKb,
  run,
  secs,
  sleep,
  swarmRemove,
  swarmRunning,
  swarmTeardown,
  teardown,
  until,
  waitNodesReady,
} from './common.js';

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const N = Number(process.env.BENCH_REPLICAS ?? 30);
const BUDGET_MS = Number(process.env.BENCH_BUDGET_S ?? 900) * 1000;
const TARGET_MS = 5000;
const ANCHOR_S = 12.5;
const SWARM_IMAGE = 'flotilla-bb';
const SWARM_PREFIX = 'flbench-upd-';
const UPDATE_FLAGS = ['--update-parallelism', '10', '--update-delay', '0s', '--update-monitor', '1s'];
const WAIT_MS = 120_000;

let deadline = Date.now() + BUDGET_MS;
const left = (): number => Math.max(1000, deadline - Date.now());

interface Sample {
  ms: number;
  detail?: string[];
}

async function getService(ctl: Control, id: string): Promise<NonNullable<GetServiceResponse['service']>> {
  return (await ctl.call<unknown, GetServiceResponse>('getService', { serviceId: id })).service!;
}

async function createAndConverge(ctl: Control, name: string): Promise<string> {
  const spec = buildServiceSpec(
    { name, replicas: String(N), stopGracePeriod: '1s', updateParallelism: '10', updateDelay: '0s', updateMonitor: '1s', updateOrder: 'stop-first' },
    'busybox:latest',
    ['sleep', '100000'],
  );
  const { service } = await ctl.call<unknown, CreateServiceResponse>('createService', { spec });
  await until(`${N} tasks running`, async () => (await listTasks(ctl, service!.id)).filter((t) => t.status?.state === TaskState.TASK_STATE_RUNNING).length === N, Math.min(WAIT_MS, left()), 50);
  return service!.id;
}

/**
 * Per batch of new tasks (in creation order, 10 each): when the old tasks of the same slots stopped
 * (status.timestamp of their SHUTDOWN report, set by the agent), when the new ones were created and
 * reported running; all since t0 (UpdateService sent).
 */
function explain(t0: number, before: Set<string>, all: Map<string, Task>): string[] {
  const fresh = [...all.values()].filter((t) => !before.has(t.id) && (t.meta?.createdAt ?? 0) >= t0 - 5).sort((a, b) => (a.meta?.createdAt ?? 0) - (b.meta?.createdAt ?? 0));
  const old = [...all.values()].filter((t) => before.has(t.id));
  const lines: string[] = [];
  const span = (xs: number[]): string => (xs.length ? `${secs(Math.min(...xs) - t0)} .. ${secs(Math.max(...xs) - t0)}` : 'n/a');
  for (let b = 0; b * 10 < fresh.length; b++) {
    const batch = fresh.slice(b * 10, b * 10 + 10);
    const slots = new Set(batch.map((t) => t.slot));
    const stopped = old.filter((t) => slots.has(t.slot) && (t.status?.state ?? 0) > TaskState.TASK_STATE_RUNNING).map((t) => t.status!.timestamp);
    const running = batch.filter((t) => t.status?.state === TaskState.TASK_STATE_RUNNING).map((t) => t.status!.timestamp);
    lines.push(`    batch ${b + 1}: new tasks created ${span(batch.map((t) => t.meta?.createdAt ?? 0))}   old ones stopped ${span(stopped)}   new ones running ${span(running)}`);
  }
  return lines;
}

async function updateApi(ctl: Control, id: string, run: number): Promise<Sample> {
  const cur = await getService(ctl, id);
  const before = new Set((await listTasks(ctl, id)).map((t) => t.id));
  const spec = applyUpdate(cur.spec!, { envAdd: [`R=${run}`], updateParallelism: '10', updateDelay: '0s', updateMonitor: '1s', updateOrder: 'stop-first' });
  const seen = new Map<string, Task>();
  const t0 = Date.now();
  const p0 = performance.now();
  await ctl.call('updateService', { serviceId: id, version: cur.specVersion, spec, rollback: '', toVersion: 0, dryRun: false });
  const stop = Date.now() + Math.min(WAIT_MS, left());
  let ms = NaN;
  let completedAt = 0;
  while (Date.now() < stop) {
    const s = await getService(ctl, id);
    const st = s.updateStatus?.state;
    if (st === UpdateState.UPDATE_STATE_COMPLETED && s.specVersion > cur.specVersion) {
      ms = performance.now() - p0;
      completedAt = s.updateStatus?.completedAt ?? 0;
      break;
    }
    if (st === UpdateState.UPDATE_STATE_PAUSED || st === UpdateState.UPDATE_STATE_ROLLBACK_STARTED) throw new Error(`update ${run} did not complete: ${UpdateState[st]} ${s.updateStatus?.message ?? ''}`);
    await sleep(15);
  }
  // the last word on every task of this update (new ones, and the old ones they replaced)
  for (const t of await listTasks(ctl, id, false)) if (before.has(t.id) || (t.meta?.createdAt ?? 0) >= t0 - 5) seen.set(t.id, t);
  if (!Number.isFinite(ms)) throw new Error(`update ${run} did not complete within ${WAIT_MS} ms`);
  const detail = explain(t0, before, seen);
  detail.push(`    updateStatus.completedAt ${secs(completedAt - t0)} after UpdateService was sent`);
  return { ms, detail };
}

async function updateCli(env: NodeJS.ProcessEnv, name: string, run: number): Promise<Sample> {
  const r = await flotilla(['service', 'update', '-q', '--env-add', `R=${run}`, ...UPDATE_FLAGS, name], env, Math.min(WAIT_MS, left()));
  if (r.code !== 0) throw new Error(`flotilla service update failed (${r.code}): ${r.stderr.trim()}`);
  return { ms: r.ms };
}

async function swarmCreate(name: string): Promise<void> {
  const r = await run('docker', ['service', 'create', '--detach', '--name', name, '--replicas', String(N), '--stop-grace-period', '1s', SWARM_IMAGE, 'sleep', '100000'], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`docker service create failed: ${r.stderr.trim()}`);
  await until(`${N} swarm tasks running`, async () => (await swarmRunning(name)) === N, Math.min(WAIT_MS, left()), 100);
}

async function swarmUpdate(name: string, run_: number, detach: boolean): Promise<Sample> {
  const t = performance.now();
  const r = await run('docker', ['service', 'update', ...(detach ? ['--detach'] : ['--quiet']), ...UPDATE_FLAGS, '--env-add', `R=${run_}`, name], { timeoutMs: Math.min(WAIT_MS, left()) });
  if (r.code !== 0) throw new Error(`docker service update failed: ${r.stderr.trim()}`);
  if (detach) {
    await until(
      'swarm update completed',
      async () => (await run('docker', ['service', 'inspect', '--format', '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}', name], { timeoutMs: 30_000 })).stdout.trim() === 'completed',
      Math.min(WAIT_MS, left()),
      20,
    );
  }
  return { ms: performance.now() - t };
}

async function main(): Promise<number> {
  const blocked = runcBenchBlocked('bench:update');
  if (blocked !== undefined) return blocked;
  const c = new BenchCluster(await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-bench-upd-')));
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
    const mgr = await c.startManager({ agent: true, runtime: 'runc', heartbeat: '5s', dataDir });
    ctl = control(c.socket);
    await waitNodesReady(ctl, 1, 30_000);
    if (process.env.BENCH_SWARM !== '0' && (await dockerAvailable())) {
      try {
        swarmInit = await ensureSwarm();
        const rootfs = path.join(c.root, 'bb-rootfs');
        await buildBusyboxRootfs(rootfs);
        await dockerImportRootfs(rootfs, SWARM_IMAGE);
        swarmImage = true;
        swarm = true;
      } catch (err) {
        swarmNote = `Swarm not measured: ${(err as Error).message}`;
      }
    } else swarmNote = process.env.BENCH_SWARM === '0' ? 'Swarm skipped (BENCH_SWARM=0)' : 'no dockerd here (`docker info` failed)';

    const name = 'upd';
    const id = await createAndConverge(ctl, name);
    const swarmName = `${SWARM_PREFIX}svc`;
    if (swarm) await swarmCreate(swarmName);

    const api: Sample[] = [];
    const cliS: Sample[] = [];
    const swApi: Sample[] = [];
    const swCli: Sample[] = [];
    let r = 0;
    for (let i = 0; i < RUNS; i++) {
      api.push(await updateApi(ctl, id, ++r));
      process.stdout.write(`  run ${i + 1}: API ${secs(api.at(-1)!.ms)}`);
      cliS.push(await updateCli(c.env, name, ++r));
      process.stdout.write(`, CLI ${secs(cliS.at(-1)!.ms)}`);
      if (swarm) {
        swApi.push(await swarmUpdate(swarmName, ++r, true));
        swCli.push(await swarmUpdate(swarmName, ++r, false));
        process.stdout.write(`, Swarm ${secs(swApi.at(-1)!.ms)} (CLI ${secs(swCli.at(-1)!.ms)})`);
      }
      process.stdout.write('\n');
    }
    const mgrRss = rssKb(mgr.child.pid);
    if (swarm) await swarmRemove(swarmName);

    const ours = median(api.map((s) => s.ms));
    console.log(`\nrolling update on one node, real runc: ${N} replicas of busybox (sleep 100000, stop grace 1s), parallelism 10, delay 0, monitor 1s, stop-first; ${os.availableParallelism()} CPUs, median of ${RUNS}`);
    console.log(`load average before: ${load0}, after: ${loadAvg()} (other work on this machine adds noise)\n`);
    console.log(`flotilla: API (UpdateService → updateStatus completed) ${secs(ours)}   CLI service update ${secs(median(cliS.map((s) => s.ms)))}`);
    console.log(`          runs: API ${api.map((s) => secs(s.ms)).join(', ')}; CLI ${cliS.map((s) => secs(s.ms)).join(', ')}`);
    if (swarm) {
      const sw = median(swApi.map((s) => s.ms));
      console.log(`Docker Swarm (same run): update → UpdateStatus completed ${secs(sw)}   CLI without --detach ${secs(median(swCli.map((s) => s.ms)))}   (${(sw / ours).toFixed(1)}x our time)`);
      console.log(`          runs: ${swApi.map((s) => secs(s.ms)).join(', ')}; CLI ${swCli.map((s) => secs(s.ms)).join(', ')}`);
    } else {
      console.log(`Docker Swarm ${ANCHOR_S.toFixed(1)} s (published/measured earlier, not this run; ${swarmNote})   (${((ANCHOR_S * 1000) / ours).toFixed(1)}x our time)`);
    }
    console.log(`manager RSS (with its in-process agent) at the end: ${mib(mgrRss)}`);
    console.log(`target: at most ${secs(TARGET_MS)}: ${ours <= TARGET_MS ? 'met' : 'missed'} (${secs(ours)}); floor: 3 batches x 1 s stop grace + the 1 s monitor = 4 s plus 3 starts of 10 containers`);
    const sorted = [...api].sort((x, y) => x.ms - y.ms);
    const mid = sorted[Math.floor((sorted.length - 1) / 2)];
    if (mid?.detail) {
      console.log(`\nwhere the time goes (median API run, ${secs(mid.ms)}; times since UpdateService was sent):`);
      for (const l of mid.detail) console.log(l);
    }
  } catch (err) {
    console.error(`bench:update failed: ${(err as Error).stack ?? String(err)}`);
    exit = 1;
  } finally {
    await teardown(c, ctl, dataDir);
    if (swarmInit || swarmImage) await swarmTeardown(SWARM_PREFIX, { init: swarmInit, image: swarmImage ? SWARM_IMAGE : '' });
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  return exit;
}

const code = await main();
process.exit(process.exitCode && process.exitCode !== 0 ? process.exitCode : code);
