/**
 * Test helpers that run flotilla as real processes: managers, agents and CLI commands, each with
 * its own data dir under one temp root, all cleaned up by stopAll().
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { removeRunRoots } from './runtime-debris.js';

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

export async function waitFor<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 20_000, everyMs = 100): Promise<T> {
  const start = Date.now();
  let lastErr: unknown;
  while (Date.now() - start < timeoutMs) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      lastErr = err;
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastErr ? `: ${(lastErr as Error).message}` : ''}`);
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

export class TestCluster {
  readonly root: string;
  readonly procs: Proc[] = [];
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
    const p = start([...args, ...(opts.extra ?? [])]);
    this.procs.push(p);
    const line = await waitFor('manager ready', () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 20_000, 50);
    this.managerAddr = line;
    return p;
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
    const p = start(args, opts.env);
    this.procs.push(p);
    return p;
  }

  async kill(p: Proc, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill(signal);
    await p.exited;
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.procs.map((p) => this.kill(p, 'SIGTERM')));
  }

  async cleanup(): Promise<void> {
    await this.stopAll();
    fs.rmSync(this.root, { recursive: true, force: true });
    removeRunRoots(this.root);
  }
}
