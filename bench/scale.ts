/**
 * The control plane at scale: BENCH_AGENTS (500) simulated agents and BENCH_SERVICES x BENCH_REPLICAS
 * (10 x 5,000 = 50,000) tasks through one real manager process (`flotilla manager --no-agent`) and its
 * dispatcher. The agents run the sim runtime, BENCH_PROCS (4) host processes of agents each
 * (dist/bench/sim-agents.js). Times: all agents ready; from the first CreateService to every task
 * running. Prints a timeline (tasks per state every poll), the manager's RSS (end and peak, sampled
 * every 250 ms) and CPU time, the agent processes' RSS.
 *
 *   npm run build && npm run bench:scale [-- --store etcd]   (etcd: the same run again on a local etcd,
 *                                           figures side by side at the end; BENCH_AGENTS, BENCH_PROCS, BENCH_SERVICES, BENCH_REPLICAS,
 *                                           BENCH_TIMEOUT_S=300 for convergence, BENCH_CPU_PROF=DIR for
 *                                           a V8 profile of the manager)
 *
 * Anchors (published, not run here): swarmkit's scheduler micro-benchmark, 100,000 tasks over 1,000
 * nodes in 22.6 s; Nomad C1M, 3,750 containers/s with 5 servers. Exits 0 when the tasks converge or
 * the time bound is hit (the figures say how far it got); non-zero only when something breaks (the
 * manager or an agent process dies). Kills every process it started and removes its temp dir.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Control } from '../cli/client.js';
import { buildServiceSpec } from '../cli/servicespec.js';
import type { CreateServiceResponse, GetClusterResponse, ListNodesResponse } from '../gen/flotilla/v1/control.js';
import { NodeRole, NodeState, TaskState } from '../gen/flotilla/v1/objects.js';
import { BenchCluster, CLI, benchStores, control, withStore, cpuMs, listTasks, loadAvg, mib, rssKb, secs, sleep, startNode, teardown, type Proc } from './common.js';

const AGENTS = Number(process.env.BENCH_AGENTS ?? 500);
const PROCS = Math.max(1, Number(process.env.BENCH_PROCS ?? 4));
const SERVICES = Number(process.env.BENCH_SERVICES ?? 10);
const REPLICAS = Number(process.env.BENCH_REPLICAS ?? 5000);
const JOIN_TIMEOUT_S = Number(process.env.BENCH_JOIN_TIMEOUT_S ?? 300);
const TIMEOUT_MS = Number(process.env.BENCH_TIMEOUT_S ?? 300) * 1000;
const POLL_MS = Number(process.env.BENCH_POLL_MS ?? 1000);
const SIM_AGENTS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), 'sim-agents.js');

const stateName = (s: TaskState): string => TaskState[s]?.replace('TASK_STATE_', '').toLowerCase() ?? String(s);

/** key figures of each store's run, printed side by side at the end */
const summary: string[] = [];

async function main(store: 'raft' | 'etcd', storeArgs: string[]): Promise<number> {
  if (!existsSync(CLI) || !existsSync(SIM_AGENTS)) {
    console.log(`bench:scale needs ${CLI} and ${SIM_AGENTS} (npm run build)`);
    return 1;
  }
  const c = new BenchCluster(await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-bench-scale-')));
  const ctlAbort = new AbortController();
  const onSignal = (): void => {
    console.log('\ninterrupted: cleaning up');
    process.exitCode = 130;
    ctlAbort.abort();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let ctl: Control | undefined;
  let sampler: NodeJS.Timeout | undefined;
  let ticker: NodeJS.Timeout | undefined;
  const agentProcs: Proc[] = [];
  let exit = 0;
  const load0 = loadAvg();
  try {
    const prof = process.env.BENCH_CPU_PROF ? ['--cpu-prof', '--cpu-prof-dir', path.resolve(process.env.BENCH_CPU_PROF)] : [];
    const mgr = await c.startManager({ agent: false, runtime: 'sim', heartbeat: '5s', nodeArgs: prof, extra: storeArgs });
    console.log(`\n== store: ${store}${store === 'etcd' ? ' (a local etcd, one member, client TLS)' : ''}`);
    const mgrPid = mgr.child.pid;
    let peakRss = rssKb(mgrPid);
    const agentPeak = new Map<number, number>();
    sampler = setInterval(() => {
      const r = rssKb(mgrPid);
      if (r > peakRss) peakRss = r;
      for (const p of agentProcs) {
        const a = rssKb(p.child.pid);
        if (p.child.pid && (agentPeak.get(p.child.pid) ?? 0) < a) agentPeak.set(p.child.pid, a);
      }
    }, 250);
    ctl = control(c.socket);
    const token = (await ctl.call<unknown, GetClusterResponse>('getCluster', {})).cluster?.tokens?.worker ?? '';
    const alive = (): void => {
      if (mgr.child.exitCode !== null || mgr.child.signalCode !== null) throw new Error(`the manager died (${mgr.child.exitCode ?? mgr.child.signalCode}): ${mgr.err.join('').slice(-2000)}`);
      for (const p of agentProcs) if (p.child.exitCode !== null || p.child.signalCode !== null) throw new Error(`an agent process died (${p.child.exitCode ?? p.child.signalCode}): ${p.err.join('').slice(-2000)}`);
      if (ctlAbort.signal.aborted) throw new Error('interrupted');
    };

    // agents: PROCS processes, AGENTS spread over them; each reports its running containers
    const tJoin = performance.now();
    const onAgents = new Array<number>(PROCS).fill(0);
    let allOnAgentsAt = NaN; // Date.now() when the agents first ran every task
    let expect = Infinity;
    for (let i = 0; i < PROCS; i++) {
      const n = Math.floor(AGENTS / PROCS) + (i < AGENTS % PROCS ? 1 : 0);
      const p = c.track(startNode(SIM_AGENTS, ['--manager', c.addr, '--token', token, '--count', String(n), '--prefix', `sim${i}-`, '--data-dir', path.join(c.root, `agents-${i}`)]));
      let buf = '';
      p.child.stdout!.on('data', (d: string) => {
        buf += d;
        const lines = buf.split('\n');
        buf = lines.pop() ?? '';
        for (const l of lines) {
          const m = /^running (\d+) (\d+)$/.exec(l);
          if (!m) continue;
          onAgents[i] = Number(m[2]);
          if (Number.isNaN(allOnAgentsAt) && onAgents.reduce((a, b) => a + b, 0) >= expect) allOnAgentsAt = Number(m[1]);
        }
      });
      agentProcs.push(p);
    }
    // a loop of our own (not until()): a dead process ends the wait at once
    for (let ready = 0; ready < AGENTS; ) {
      alive();
      if (performance.now() - tJoin > JOIN_TIMEOUT_S * 1000) throw new Error(`only ${ready} of ${AGENTS} agents ready after ${JOIN_TIMEOUT_S} s`);
      const { nodes } = await ctl.call<unknown, ListNodesResponse>('listNodes', {}, 30_000);
      ready = nodes.filter((x) => x.role === NodeRole.NODE_ROLE_WORKER && x.status?.state === NodeState.NODE_STATE_READY).length;
      if (ready < AGENTS) await sleep(250);
    }
    const joinMs = performance.now() - tJoin;
    console.log(`${AGENTS} agents in ${PROCS} processes ready in ${secs(joinMs)}; manager RSS ${mib(rssKb(mgrPid))}`);

    // services
    const total = SERVICES * REPLICAS;
    expect = total;
    const cpu0 = cpuMs(mgrPid);
    const t0 = performance.now();
    const t0Wall = Date.now();
    // a line a second: tasks running on the agents (their count), in the store (last poll), the
    // manager's RSS and CPU use over that second
    let storeRunning = 0;
    let storeStates = '(no poll yet)';
    let lastCpu = cpu0;
    console.log('     time   on agents   in the store (last poll done)                               manager RSS   manager CPU');
    ticker = setInterval(() => {
      const cpuNow = cpuMs(mgrPid);
      const agents = onAgents.reduce((a, b) => a + b, 0);
      console.log(`${secs(performance.now() - t0).padStart(9)} ${String(agents).padStart(11)}   ${`${storeRunning} running; ${storeStates}`.padEnd(60)} ${mib(rssKb(mgrPid)).padStart(9)}   ${(((cpuNow - lastCpu) / 1000) * 100).toFixed(0).padStart(4)} %`);
      lastCpu = cpuNow;
    }, 1000);
    const ids: string[] = [];
    for (let s = 0; s < SERVICES; s++) {
      const spec = buildServiceSpec({ name: `scale-${s}`, replicas: String(REPLICAS) }, 'busybox:latest', ['sleep', '100000']);
      ids.push((await ctl.call<unknown, CreateServiceResponse>('createService', { spec }, 60_000)).service!.id);
    }
    const createMs = performance.now() - t0;
    console.log(`  (${SERVICES} services x ${REPLICAS} replicas created in ${secs(createMs)}; polling ListTasks per service every ${POLL_MS} ms)`);
    const done = new Map<string, number>();
    const pollTimes: number[] = [];
    const counts = new Map<string, Map<TaskState, number>>();
    let doneMs = NaN;
    while (performance.now() - t0 < TIMEOUT_MS) {
      alive();
      const tp = performance.now();
      for (const id of ids) {
        if (done.has(id)) continue;
        const m = new Map<TaskState, number>();
        for (const t of await listTasks(ctl, id, true, 120_000)) {
          const st = t.status?.state ?? TaskState.TASK_STATE_NEW;
          m.set(st, (m.get(st) ?? 0) + 1);
        }
        counts.set(id, m);
        if ((m.get(TaskState.TASK_STATE_RUNNING) ?? 0) >= REPLICAS) done.set(id, performance.now() - t0);
      }
      const pollMs = performance.now() - tp;
      const all = new Map<TaskState, number>();
      for (const m of counts.values()) for (const [k, v] of m) all.set(k, (all.get(k) ?? 0) + v);
      const running = all.get(TaskState.TASK_STATE_RUNNING) ?? 0;
      const states = [...all].sort((a, b) => a[0] - b[0]).map(([k, v]) => `${stateName(k)} ${v}`).join(', ');
      storeRunning = running;
      storeStates = `${states} (poll ${secs(pollMs)})`;
      pollTimes.push(pollMs);
      if (done.size === ids.length) {
        doneMs = Math.max(...done.values());
        break;
      }
      await sleep(POLL_MS);
    }
    clearInterval(ticker);
    const cpu = cpuMs(mgrPid) - cpu0;
    const endRss = rssKb(mgrPid);
    const converged = Number.isFinite(doneMs);

    console.log(`\ncontrol plane at scale: ${AGENTS} simulated agents (${PROCS} processes), ${SERVICES} x ${REPLICAS} = ${total} tasks, ${os.availableParallelism()} CPUs`);
    console.log(`load average before: ${load0}, after: ${loadAvg()} (other work on this machine adds noise)\n`);
    if (converged) {
      console.log(`all ${total} tasks running after ${secs(doneMs)} (${Math.round(total / (doneMs / 1000))} tasks/s); services done at ${[...done.values()].sort((a, b) => a - b).map(secs).join(', ')}`);
    } else {
      let running = 0;
      for (const m of counts.values()) running += m.get(TaskState.TASK_STATE_RUNNING) ?? 0;
      console.log(`NOT converged within ${secs(TIMEOUT_MS)}: ${running} of ${total} running (${done.size} of ${SERVICES} services done)`);
    }
    console.log(`all ${total} running on the agents (their own count, every 250 ms) after ${Number.isNaN(allOnAgentsAt) ? 'n/a' : secs(allOnAgentsAt - t0Wall)}`);
    console.log(`agents ready after ${secs(joinMs)}; CreateService x ${SERVICES} took ${secs(createMs)}; a poll (ListTasks of every unfinished service) took ${pollTimes.map(secs).join(', ')}`);
    console.log(`manager: RSS at the end ${mib(endRss)}, peak ${mib(peakRss)}; CPU (user+sys) from the first create to the end ${secs(cpu)}`);
    console.log(`agent processes: RSS ${agentProcs.map((p) => mib(rssKb(p.child.pid))).join(', ')} (peak ${agentProcs.map((p) => mib(agentPeak.get(p.child.pid ?? 0) ?? NaN)).join(', ')}); CPU ${agentProcs.map((p) => secs(cpuMs(p.child.pid))).join(', ')}`);
    summary.push(
      `${store.padEnd(5)} ${converged ? `${secs(doneMs)} to all ${total} running (${Math.round(total / (doneMs / 1000))} tasks/s)` : `NOT converged in ${secs(TIMEOUT_MS)}`}; agents ready ${secs(joinMs)}; create ${secs(createMs)}; manager RSS end ${mib(endRss)} peak ${mib(peakRss)}, CPU ${secs(cpu)}`,
    );
    console.log('anchors (published, not run here): swarmkit scheduler micro-benchmark 100,000 tasks / 1,000 nodes in 22.6 s; Nomad C1M 3,750 containers/s (5 servers)');
  } catch (err) {
    console.error(`bench:scale failed: ${(err as Error).stack ?? String(err)}`);
    exit = 1;
  } finally {
    if (sampler) clearInterval(sampler);
    if (ticker) clearInterval(ticker);
    // no service removal: 50,000 tasks would take a while; the processes just stop
    ctl?.close();
    await teardown(c, undefined);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  return exit;
}

let code = 0;
for (const store of benchStores()) {
  const c = await withStore(store, (args) => main(store, args)).catch((err: unknown) => {
    console.error(`bench:scale (${store} store) failed: ${(err as Error).message}`);
    return 1;
  });
  code ||= c;
  if (process.exitCode === 130) break;
}
if (summary.length > 1) {
  console.log('\nside by side (same run, same machine):');
  for (const l of summary) console.log(`  ${l}`);
}
process.exit(process.exitCode && process.exitCode !== 0 ? process.exitCode : code);
