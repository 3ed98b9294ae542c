/**
 * Shared pieces of the control-plane benchmarks (converge, update, scale): child processes with a time
 * bound, quantiles, RSS, a control client on a manager's socket, a task-state timeline recorded by
 * polling ListTasks, and Docker Swarm as the anchor when a local dockerd answers.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Control } from '../cli/client.js';
import type { ListNodesResponse, ListServicesResponse, ListTasksResponse } from '../gen/flotilla/v1/control.js';
import { NodeState, TaskState, type Task } from '../gen/flotilla/v1/objects.js';
import { findBinary } from '../agent/runtime/runc.js';
import { waitFor } from '../test/helpers/wait.js';
import { removeRunRoots } from '../test/helpers/runtime-debris.js';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

/**
 * Runs a command to completion, killed (SIGKILL) after timeoutMs; never rejects. quiet: no pipes at
 * all (needed for `runc run -d`, whose container would inherit them and hold them open).
 */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; input?: string; quiet?: boolean } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const t = performance.now();
    const child = spawn(cmd, args, { stdio: opts.quiet ? 'ignore' : [opts.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      stderr += `\n(killed after ${opts.timeoutMs} ms)`;
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 120_000);
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    child.on('error', (err) => {
      clearTimeout(timer);
      resolve({ code: -1, stdout, stderr: err.message, ms: performance.now() - t });
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr, ms: performance.now() - t });
    });
  });
}

/** A shell pipeline (for `tar | docker import`). */
export function sh(script: string, timeoutMs = 120_000): Promise<RunResult> {
  return run('/bin/sh', ['-c', script], { timeoutMs });
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}
export const median = (xs: number[]): number => quantile(xs, 0.5);

/** "1.234 s" or "n/a" */
export const secs = (ms: number): string => (Number.isFinite(ms) ? `${(ms / 1000).toFixed(3)} s` : 'n/a');

export function rssKb(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : NaN;
  } catch {
    return NaN;
  }
}
export const mib = (kb: number): string => (Number.isFinite(kb) ? `${(kb / 1024).toFixed(0)} MiB` : 'n/a');

export function loadAvg(): string {
  try {
    return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  } catch {
    return 'n/a';
  }
}

/** Polls until fn returns a value other than undefined/false, or throws after timeoutMs (the tests' waitFor). */
export const until: <T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs: number, everyMs?: number) => Promise<T> = waitFor;

export function control(socket: string): Control {
  return new Control(`unix:${socket}`);
}

export async function waitNodesReady(c: Control, n: number, timeoutMs: number): Promise<void> {
  await until(
    `${n} ready nodes`,
    // nodes with an agent (a --no-agent manager is a node too, without a runtime)
    async () => (await c.call<unknown, ListNodesResponse>('listNodes', {})).nodes.filter((x) => !!x.description?.runtime && x.status?.state === NodeState.NODE_STATE_READY).length >= n,
    timeoutMs,
    200,
  );
}

export async function listTasks(c: Control, serviceId: string, desiredRunning = true, timeoutMs = 30_000): Promise<Task[]> {
  return (await c.call<unknown, ListTasksResponse>('listTasks', { serviceId, nodeId: '', desiredRunning }, timeoutMs)).tasks;
}

/**
 * Per task, the wall-clock time (Date.now()) a poll first saw it at or past each state, plus the
 * task's own timestamps (meta.createdAt; status.timestamp of its RUNNING report, set by the agent).
 */
export class Timeline {
  readonly seen = new Map<string, { created: number; firstSeen: number; assigned?: number; running?: number; runningReported?: number; node: string }>();

  observe(tasks: Task[], now: number): void {
    for (const t of tasks) {
      let e = this.seen.get(t.id);
      if (!e) {
        e = { created: t.meta?.createdAt ?? now, firstSeen: now, node: t.nodeId };
        this.seen.set(t.id, e);
      }
      const st = t.status?.state ?? TaskState.TASK_STATE_NEW;
      if (e.assigned === undefined && (st >= TaskState.TASK_STATE_ASSIGNED || t.nodeId)) e.assigned = now;
      if (e.running === undefined && st === TaskState.TASK_STATE_RUNNING) {
        e.running = now;
        e.runningReported = t.status?.timestamp || now;
      }
      e.node = t.nodeId;
    }
  }

  /** "label: median X, last Y" lines for each stage, relative to t0 (ms, wall clock). */
  summary(t0: number): string[] {
    const es = [...this.seen.values()];
    const stage = (label: string, xs: Array<number | undefined>): string => {
      const v = xs.filter((x): x is number => x !== undefined).map((x) => x - t0);
      if (v.length === 0) return `    ${label.padEnd(46)} n/a`;
      return `    ${label.padEnd(46)} first ${secs(Math.min(...v)).padStart(8)}   median ${secs(median(v)).padStart(8)}   last ${secs(Math.max(...v)).padStart(8)}`;
    };
    return [
      stage('task created (meta.createdAt)', es.map((e) => e.created)),
      stage('assigned to a node (seen by poll)', es.map((e) => e.assigned)),
      stage('running reported by agent (status.timestamp)', es.map((e) => e.runningReported)),
      stage('running in the store (seen by poll)', es.map((e) => e.running)),
    ];
  }
}

// ------------------------------------------------------------------------------------------ Docker Swarm

/** Whether a dockerd answers here (`docker info` exits 0 within 10 s). */
export async function dockerAvailable(): Promise<boolean> {
  const r = await run('docker', ['info', '--format', '{{.ServerVersion}}'], { timeoutMs: 10_000 });
  return r.code === 0 && r.stdout.trim() !== '';
}

/** Makes sure this dockerd is a swarm manager; returns whether we initialised it (then leave afterwards). */
export async function ensureSwarm(): Promise<boolean> {
  const st = await run('docker', ['info', '--format', '{{.Swarm.LocalNodeState}}'], { timeoutMs: 10_000 });
  if (st.stdout.trim() === 'active') return false;
  const r = await run('docker', ['swarm', 'init', '--advertise-addr', '127.0.0.1'], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`docker swarm init failed: ${r.stderr.trim()}`);
  return true;
}

/** Imports a busybox root file system as a docker image (the same files flotilla's busybox has). */
export async function dockerImportRootfs(rootfs: string, name: string): Promise<void> {
  const r = await sh(`tar -C '${rootfs}' -c . | docker import - ${name}`);
  if (r.code !== 0) throw new Error(`docker import failed: ${r.stderr.trim()}`);
}

/** Running tasks of a swarm service (desired running, current state Running). */
export async function swarmRunning(name: string): Promise<number> {
  const r = await run('docker', ['service', 'ps', '--filter', 'desired-state=running', '--format', '{{.CurrentState}}', name], { timeoutMs: 30_000 });
  if (r.code !== 0) return 0;
  return r.stdout.split('\n').filter((l) => l.startsWith('Running')).length;
}

/** Removes a swarm service and waits until its containers are gone. */
export async function swarmRemove(name: string, timeoutMs = 90_000): Promise<void> {
  await run('docker', ['service', 'rm', name], { timeoutMs: 30_000 });
  await until(
    `swarm containers of ${name} gone`,
    async () => (await run('docker', ['ps', '-aq', '--filter', `label=com.docker.swarm.service.name=${name}`], { timeoutMs: 30_000 })).stdout.trim() === '',
    timeoutMs,
    250,
  ).catch(() => undefined);
}

/** Removes every swarm service whose name starts with prefix (cleanup after a failure). */
export async function swarmRemoveAll(prefix: string): Promise<void> {
  const r = await run('docker', ['service', 'ls', '--format', '{{.Name}}'], { timeoutMs: 30_000 });
  for (const n of r.stdout.split('\n').filter((x) => x.startsWith(prefix))) await swarmRemove(n);
}

// ------------------------------------------------------------------------------------------ flotilla processes

/** dist/cli/main.js beside this compiled file (dist/bench/…), or FLOTILLA_CLI. */
export const CLI = process.env.FLOTILLA_CLI ?? path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../cli/main.js');

export interface Proc {
  child: ChildProcess;
  err: string[];
  out: string[];
  exited: Promise<number | null>;
}

/** Starts a Node.js process (a flotilla command, or another script) with its output kept. */
export function startNode(script: string, args: string[], env: NodeJS.ProcessEnv = {}, nodeArgs: string[] = [], keepChunks = 200): Proc {
  const child = spawn(process.execPath, [...nodeArgs, script, ...args], { env: { ...process.env, FLOTILLA_LOG_LEVEL: 'warn', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const p: Proc = { child, out: [], err: [], exited: new Promise((resolve) => child.on('exit', (code) => resolve(code))) };
  const keep = (arr: string[]) => (d: string) => {
    arr.push(d);
    if (arr.length > keepChunks) arr.splice(0, arr.length - keepChunks);
  };
  child.stdout!.setEncoding('utf8').on('data', keep(p.out));
  child.stderr!.setEncoding('utf8').on('data', keep(p.err));
  return p;
}

/** Runs the flotilla CLI to completion. */
export function flotilla(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 60_000): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args], { timeoutMs, env: { ...process.env, ...env } });
}

/** One manager (and whatever else is started with track()) under one temp root; stop() ends them all. */
export class BenchCluster {
  readonly procs: Proc[] = [];
  socket = '';
  addr = '';
  manager: Proc | undefined;
  constructor(readonly root: string) {}

  get env(): NodeJS.ProcessEnv {
    return { FLOTILLA_HOST: `unix://${this.socket}` };
  }

  track(p: Proc): Proc {
    this.procs.push(p);
    return p;
  }

  async startManager(opts: { agent: boolean; runtime: 'runc' | 'sim'; heartbeat?: string; nodeArgs?: string[]; dataDir?: string; env?: NodeJS.ProcessEnv; keep?: number; extra?: string[] }): Promise<Proc> {
    const dir = opts.dataDir ?? path.join(this.root, 'm1');
    this.socket = path.join(this.root, 'm1.sock');
    const args = ['manager', '--data-dir', dir, '--hostname', 'm1', '--listen-addr', '127.0.0.1:0', '--control-socket', this.socket, '--heartbeat-period', opts.heartbeat ?? '5s', '--runtime', opts.runtime, ...(opts.extra ?? [])];
    if (!opts.agent) args.push('--no-agent');
    const p = this.track(startNode(CLI, args, opts.env ?? {}, opts.nodeArgs ?? [], opts.keep));
    this.manager = p;
    this.addr = await until(
      'the manager to listen',
      async () => {
        if (p.child.exitCode !== null) throw new Error(`manager exited: ${p.err.join('')}`);
        return /listening on (\S+?)[,\s]/.exec(p.out.join(''))?.[1];
      },
      30_000,
      50,
    ).catch((err: Error) => {
      throw new Error(`${err.message}\n${p.err.join('')}`);
    });
    return p;
  }

  /** SIGTERM to every process, SIGKILL after graceMs. */
  async stop(graceMs = 10_000): Promise<void> {
    await Promise.all(
      this.procs.map(async (p) => {
        if (p.child.exitCode !== null || p.child.signalCode !== null) return;
        p.child.kill('SIGTERM');
        const t = setTimeout(() => p.child.kill('SIGKILL'), graceMs);
        await p.exited;
        clearTimeout(t);
      }),
    );
  }
}

/** CPU time (user + system) a process has used so far, in ms, from /proc/PID/stat. */
export function cpuMs(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // fields after the command: state(3) ... utime(14) stime(15) → indexes 11, 12 here
    return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
  } catch {
    return NaN;
  }
}

// ------------------------------------------------------------------------------------------ cleanup

export interface ContainerJson {
  id: string;
  state: string;
  created: number;
  started: number;
  labels: Record<string, string>;
}

/** The containers of a node's data dir, read by the runtime itself (`flotilla container ls -a`). */
export async function containersOf(dataDir: string): Promise<ContainerJson[]> {
  const r = await flotilla(['container', 'ls', '-a', '--format', 'json', '--data-dir', dataDir]);
  if (r.code !== 0) throw new Error(`container ls failed: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as ContainerJson[];
}

/**
 * Removes every service (and, with a runc data dir, waits up to 30 s for their containers to go), stops
 * every process, removes the containers the agent left with `flotilla container rm -f`, then the root.
 */
export async function teardown(c: BenchCluster, ctl: Control | undefined, runcDataDir?: string): Promise<void> {
  if (ctl) {
    try {
      const { services } = await ctl.call<unknown, ListServicesResponse>('listServices', {}, 5000);
      for (const sv of services) await ctl.call('removeService', { serviceId: sv.id }, 5000).catch(() => undefined);
      if (runcDataDir) await until('containers gone', async () => (await containersOf(runcDataDir)).length === 0, 30_000, 250).catch(() => undefined);
    } catch {
      // the manager may be gone; the runtime removes what is left below
    }
    ctl.close();
  }
  await c.stop();
  if (runcDataDir) {
    for (const ct of await containersOf(runcDataDir).catch(() => [])) await flotilla(['container', 'rm', '-f', ct.id, '--data-dir', runcDataDir]);
  }
  await fs.rm(c.root, { recursive: true, force: true });
  removeRunRoots(c.root);
}

/** Removes our swarm services and image; leaves the swarm if we initialised it. */
export async function swarmTeardown(prefix: string, s: { init: boolean; image: string }): Promise<void> {
  await swarmRemoveAll(prefix);
  if (s.image) await run('docker', ['image', 'rm', '-f', s.image], { timeoutMs: 30_000 });
  if (s.init) await run('docker', ['swarm', 'leave', '--force'], { timeoutMs: 60_000 });
}

/**
 * What a benchmark on real runc needs: root, runc and conmon (else it is skipped: exit 0) and the built
 * CLI (else exit 1). Returns the exit code to end with, or undefined to go on.
 */
export function runcBenchBlocked(name: string): number | undefined {
  if (process.getuid?.() !== 0) {
    console.log(`${name} needs root (runc, mounts, cgroups); skipped`);
    return 0;
  }
  if (!findBinary('runc') || !findBinary('conmon')) {
    console.log(`${name} needs runc and conmon in $PATH; skipped`);
    return 0;
  }
  if (!existsSync(CLI)) {
    console.log(`${name} needs ${CLI} (npm run build)`);
    return 1;
  }
  return undefined;
}

/** The stores a benchmark runs on: our Raft, and with `--store etcd` on its command line, a local etcd too (same run). */
export function benchStores(): Array<'raft' | 'etcd'> {
  const i = process.argv.indexOf('--store');
  const v = i >= 0 ? process.argv[i + 1] : process.argv.find((a) => a.startsWith('--store='))?.slice(8);
  if (v === undefined || v === 'raft') return ['raft'];
  if (v !== 'etcd') throw new Error(`invalid --store ${JSON.stringify(v)}: raft or etcd`);
  return ['raft', 'etcd'];
}

/**
 * Runs fn with the manager flags of a store: none for our Raft; for etcd, a local etcd (one member of
 * /usr/bin/etcd on loopback with client TLS, in a temp dir) started before and removed after.
 */
export async function withStore<T>(store: 'raft' | 'etcd', fn: (managerArgs: string[]) => Promise<T>): Promise<T> {
  if (store === 'raft') return fn([]);
  const { EtcdCluster, haveEtcd } = await import('../test/helpers/etcd.js');
  if (!haveEtcd()) throw new Error('--store etcd needs /usr/bin/etcd (Debian: etcd-server)');
  const etcd = new EtcdCluster('flotilla-bench-etcd-');
  try {
    await etcd.start(Number(process.env.BENCH_ETCD_MEMBERS ?? 1));
    return await fn(etcd.managerFlags('/flotilla/bench'));
  } finally {
    await etcd.stop();
  }
}
