/**
 * Test helpers that run flotilla as real processes: managers, agents and CLI commands, each with
 * its own data dir under one temp root, all cleaned up by stopAll().
 */
import { spawn, spawnSync, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { mountsUnder, removeRunRoots } from './runtime-debris.js';
import { waitFor } from './wait.js';

export { waitFor };

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CLI = path.join(ROOT, 'dist/cli/main.js');

export function isRoot(): boolean {
  return process.getuid?.() === 0;
}

export function builtCli(): boolean {
  return fs.existsSync(CLI);
}

export interface Proc {
  child: ChildProcess;
  out: string[];
  err: string[];
  exited: Promise<number | null>;
}

export function start(args: string[], env: NodeJS.ProcessEnv = {}): Proc {
  const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, FLOTILLA_LOG_LEVEL: 'warn', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const p: Proc = {
    child,
    out: [],
    err: [],
    exited: new Promise((resolve) => child.on('exit', (code) => resolve(code))),
  };
  child.stdout!.setEncoding('utf8').on('data', (d: string) => p.out.push(d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => p.err.push(d));
  return p;
}

/** How long a stop waits after SIGTERM before it sends SIGKILL. */
export const STOP_GRACE_MS = 10_000;

/**
 * Stops p with signal (after a SIGCONT, so a frozen process can act on it) and waits for it to exit;
 * SIGKILL when it has not exited after graceMs. Never waits forever: a test's cleanup must end.
 */
export async function stopProc(p: Pick<Proc, 'child' | 'exited'>, signal: NodeJS.Signals = 'SIGTERM', graceMs = STOP_GRACE_MS): Promise<void> {
  if (p.child.exitCode !== null || p.child.signalCode !== null) return;
  if (signal !== 'SIGKILL') p.child.kill('SIGCONT');
  p.child.kill(signal);
  const t = setTimeout(() => p.child.kill('SIGKILL'), graceMs);
  try {
    await p.exited;
  } finally {
    clearTimeout(t);
  }
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function cli(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 60_000): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

export async function cliJson<T = unknown>(args: string[], env: NodeJS.ProcessEnv = {}): Promise<T> {
  const r = await cli([...args, '--format', 'json'], env);
  if (r.code !== 0) throw new Error(`flotilla ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/**
 * Removes (force) every container of a runc node's data dir, with the daemon stopped; returns the ids it
 * found. Throws when a container is still there afterwards.
 */
export async function removeContainers(dataDir: string): Promise<string[]> {
  if (!fs.existsSync(dataDir)) return [];
  const ls = () => cliJson<Array<{ id: string }>>(['container', 'ls', '-a', '--data-dir', dataDir]);
  const found = (await ls()).map((c) => c.id);
  for (const id of found) {
    const r = await cli(['container', 'rm', '-f', id, '--data-dir', dataDir]);
    if (r.code !== 0) throw new Error(`container rm -f ${id}: ${r.stderr.trim()}`);
  }
  const still = (await ls()).map((c) => c.id);
  if (still.length) throw new Error(`containers still there after rm -f: ${still.join(', ')}`);
  return found;
}

export class TestCluster {
  readonly root: string;
  readonly procs: Proc[] = [];
  /** data dirs of the nodes that run the runc runtime: their containers are removed before the dirs */
  readonly runcDirs = new Set<string>();
  managerAddr = '';
  socket = '';
  constructor(prefix = 'flotilla-it-') {
    this.root = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  }

  get env(): NodeJS.ProcessEnv {
    return { FLOTILLA_HOST: `unix://${this.socket}` };
  }

  /** Starts a manager (default: no in-process agent) and waits until it listens. */
  async startManager(opts: { name?: string; agent?: boolean; runtime?: string; heartbeat?: string; extra?: string[] } = {}): Promise<Proc> {
    const name = opts.name ?? 'm1';
    const dir = path.join(this.root, name);
    this.socket = path.join(this.root, `${name}.sock`);
    const args = ['manager', '--data-dir', dir, '--hostname', name, '--listen-addr', this.managerAddr || '127.0.0.1:0', '--control-socket', this.socket, '--heartbeat-period', opts.heartbeat ?? '500ms'];
    if (!opts.agent) args.push('--no-agent');
    if (opts.runtime) args.push('--runtime', opts.runtime);
    if (opts.agent && opts.runtime === 'runc') this.runcDirs.add(dir);
    const p = start([...args, ...(opts.extra ?? [])]);
    this.procs.push(p);
    const line = await waitFor('manager ready', () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 20_000, 50);
    this.managerAddr = line;
    return p;
  }

  /**
   * Starts a manager that joins the cluster of the first one (manager token fetched from it) and waits
   * until it listens. The CLI keeps talking to the first manager's socket.
   */
  async startJoiningManager(name: string, opts: { agent?: boolean; runtime?: string; heartbeat?: string; extra?: string[] } = {}): Promise<{ proc: Proc; addr: string; socket: string }> {
    if (!this.managerAddr) throw new Error('startJoiningManager: start the first manager before');
    const r = await cli(['cluster', 'join-token', 'manager', '-q'], this.env);
    if (r.code !== 0) throw new Error(r.stderr);
    const dir = path.join(this.root, name);
    const socket = path.join(this.root, `${name}.sock`);
    const args = ['manager', '--data-dir', dir, '--hostname', name, '--listen-addr', '127.0.0.1:0', '--control-socket', socket, '--heartbeat-period', opts.heartbeat ?? '500ms', '--join', this.managerAddr, '--token', r.stdout.trim()];
    if (!opts.agent) args.push('--no-agent');
    if (opts.runtime) args.push('--runtime', opts.runtime);
    if (opts.agent && opts.runtime === 'runc') this.runcDirs.add(dir);
    const p = start([...args, ...(opts.extra ?? [])]);
    this.procs.push(p);
    const addr = await waitFor(`${name} ready`, () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 40_000, 50);
    return { proc: p, addr, socket };
  }

  async token(): Promise<string> {
    const r = await cli(['cluster', 'join-token', 'worker', '-q'], this.env);
    if (r.code !== 0) throw new Error(r.stderr);
    return r.stdout.trim();
  }

  async startAgent(hostname: string, opts: { runtime?: string; labels?: string[]; token?: string; env?: NodeJS.ProcessEnv } = {}): Promise<Proc> {
    const token = opts.token ?? (await this.token());
    const args = ['agent', '--data-dir', path.join(this.root, hostname), '--manager', this.managerAddr, '--token', token, '--hostname', hostname, '--runtime', opts.runtime ?? 'sim'];
    for (const l of opts.labels ?? []) args.push('--label', l);
    if (opts.runtime === 'runc') this.runcDirs.add(path.join(this.root, hostname));
    const p = start(args, opts.env);
    this.procs.push(p);
    return p;
  }

  /** Sends signal (SIGCONT first, so a frozen process can act on it) and waits for the exit: SIGKILL after graceMs. */
  async kill(p: Proc, signal: NodeJS.Signals = 'SIGKILL', graceMs = STOP_GRACE_MS): Promise<void> {
    await stopProc(p, signal, graceMs);
  }

  /** SIGTERM to every process, SIGKILL to any still running after graceMs. */
  async stopAll(graceMs = STOP_GRACE_MS): Promise<void> {
    await Promise.all(this.procs.map((p) => stopProc(p, 'SIGTERM', graceMs)));
  }

  /**
   * Leaves nothing: stops every process (SIGKILL after a deadline), removes the containers of every
   * runc node (they outlive their daemon) before their data dir, unmounts anything still mounted under
   * the root, removes the root and the run roots. Throws at the end, after cleaning, when a container
   * or a mount had to be removed here that the test should have removed itself (reported as leaks),
   * or when any step failed.
   */
  async cleanup(opts: { expectEmpty?: boolean } = {}): Promise<void> {
    const problems: string[] = [];
    await this.stopAll().catch((err: unknown) => problems.push(`stop: ${(err as Error).message}`));
    for (const dir of this.runcDirs) {
      const left = await removeContainers(dir).catch((err: unknown) => {
        problems.push(`removing the containers of ${dir}: ${(err as Error).message}`);
        return [];
      });
      if (left.length && opts.expectEmpty) problems.push(`${dir}: containers left behind: ${left.join(', ')}`);
    }
    const mounts = mountsUnder(this.root);
    for (const mp of mounts.reverse()) spawnSync('umount', ['-l', mp]);
    if (mounts.length) problems.push(`mounts left under ${this.root}: ${mounts.join(', ')}`);
    fs.rmSync(this.root, { recursive: true, force: true });
    removeRunRoots(this.root);
    if (problems.length) throw new Error(`cleanup: ${problems.join('; ')}`);
  }
}

/** Waits until `n` nodes of the cluster are ready (`node ls`). */
export async function waitNodesReady(c: TestCluster, n: number, timeoutMs = 30_000): Promise<void> {
  await waitFor(`${n} ready node(s)`, async () => (await cliJson<Array<{ status: string }>>(['node', 'ls', '--format', 'json'], c.env)).filter((x) => x.status === 'ready').length >= n, timeoutMs);
}

/**
 * A one-node cluster on real runc: busybox:latest imported into the node's data dir, the manager with
 * its in-process agent started, the node ready. Returns the data dir (for `--data-dir` commands).
 */
export async function startRuncNode(c: TestCluster, name = 'm1'): Promise<string> {
  const dataDir = path.join(c.root, name);
  const { importBusybox } = await import('./busybox.js');
  await importBusybox(dataDir);
  await c.startManager({ name, agent: true, runtime: 'runc' });
  await waitNodesReady(c, 1);
  return dataDir;
}
