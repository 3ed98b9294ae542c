/**
 * Starts child processes (runc, conmon, mount) on a worker thread, so the agent's main event loop never
 * waits for fork/exec. libuv's spawn returns only once the child has exec'd; with a busy process on busy
 * cores that blocks the calling thread for several ms per child.
 *
 * One worker thread serves the whole process. It is started on first use, unref'd while idle (it never
 * keeps the process alive; ref'd while a request is in flight, so an awaited spawn does), started again
 * after it died, and if a worker cannot be started at all the same code runs on the main thread. Each
 * request carries an id; any number may be in flight.
 *
 * The worker's code is a string (`eval: true`): the TypeScript sources also run under vitest, where no
 * compiled sibling file exists. The request handler (HANDLER) is shared by the worker and the fallback.
 */
import * as childProcess from 'node:child_process';
import vm from 'node:vm';
import { SHARE_ENV, Worker } from 'node:worker_threads';

export interface ExecOptions {
  cwd?: string;
  /** default: the process's environment */
  env?: NodeJS.ProcessEnv;
  /** the child gets SIGTERM after this long (as execFile's `timeout`); default none */
  timeoutMs?: number;
  /** bytes of stdout or stderr before the child is killed (execFile's `maxBuffer`, default 1 MiB) */
  maxBuffer?: number;
}

/** The outcome of execFile: `error` (execFile's error message) is set when it failed. */
export interface ExecResult {
  /** exit code; null when killed by a signal or not started */
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  error?: string;
}

export interface MonitorSpawnOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** give up waiting for fd 3 after this long (the child keeps running); default 60 s */
  timeoutMs?: number;
}

export interface MonitorResult {
  /** the first newline-terminated line from fd 3, without the newline; absent when fd 3 ended without one */
  syncLine?: string;
  /** stdout and stderr received so far */
  output: string;
  /** the child could not be started (spawn error message) */
  error?: string;
  /** nothing arrived on fd 3 within timeoutMs */
  timedOut?: boolean;
}

type Request =
  | { id: number; op: 'exec'; file: string; args: string[]; opts: childProcess.ExecFileOptions }
  | { id: number; op: 'monitor'; file: string; args: string[]; opts: childProcess.SpawnOptions; timeoutMs: number };
/** a Request before it got its id */
type Unsent = Request extends infer R ? (R extends unknown ? Omit<R, 'id'> : never) : never;
type Reply = (ExecResult | MonitorResult) & { id: number };
type Handler = (cp: typeof childProcess, m: Request, reply: (r: Reply) => void) => void;

/**
 * Handles one request (plain JavaScript: it runs in the worker). exec = execFile; monitor = spawn detached
 * with a pipe on fd 3, answer with the first line read from it (or, 20 ms after fd 3 ended, without one),
 * then let the child go.
 */
const HANDLER = `(cp, m, reply) => {
  try {
    if (m.op === 'exec') {
      cp.execFile(m.file, m.args, m.opts, (err, stdout, stderr) => reply({
        id: m.id, stdout: String(stdout), stderr: String(stderr),
        code: err ? (typeof err.code === 'number' ? err.code : null) : 0,
        signal: (err && err.signal) || null,
        ...(err ? { error: err.message } : {}),
      }));
      return;
    }
    const child = cp.spawn(m.file, m.args, { ...m.opts, detached: true, stdio: ['ignore', 'pipe', 'pipe', 'pipe'] });
    const sp = child.stdio[3];
    let done = false, sync = '', output = '';
    const finish = (r) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sp.destroy(); child.stdout.destroy(); child.stderr.destroy();
      child.unref();
      reply({ id: m.id, output, ...r });
    };
    const timer = setTimeout(() => finish({ timedOut: true }), m.timeoutMs);
    child.stdout.on('data', (d) => (output += d.toString()));
    child.stderr.on('data', (d) => (output += d.toString()));
    child.on('error', (err) => finish({ error: err.message }));
    sp.on('error', () => undefined);
    sp.on('data', (d) => {
      sync += d.toString();
      const nl = sync.indexOf('\\n');
      if (nl >= 0) finish({ syncLine: sync.slice(0, nl) });
    });
    sp.on('end', () => setTimeout(() => finish({}), 20));
  } catch (err) {
    reply({ id: m.id, code: null, signal: null, stdout: '', stderr: '', output: '', error: String(err && err.message) });
  }
}`;

const WORKER_CODE = `
const { parentPort } = require('node:worker_threads');
const cp = require('node:child_process');
const handle = ${HANDLER};
parentPort.on('message', (m) => handle(cp, m, (r) => parentPort.postMessage(r)));
parentPort.postMessage({ ready: true });
`;

interface Pending {
  msg: Request;
  resolve: (r: Reply) => void;
}

interface Thread {
  w: Worker;
  pending: Map<number, Pending>;
}

let thread: Thread | undefined;
let fellBack = false; // set once a worker could not be started
let forceMain = false;
let nextId = 1;

let compiled: Handler | undefined;
function runOnMainThread(msg: Request, resolve: (r: Reply) => void): void {
  compiled ??= vm.runInThisContext(`(${HANDLER})`) as Handler;
  compiled(childProcess, msg, resolve);
}

function failure(msg: Request, error: string): Reply {
  return msg.op === 'exec' ? { id: msg.id, code: null, signal: null, stdout: '', stderr: '', error } : { id: msg.id, output: '', error };
}

function useMainThread(err: unknown): void {
  if (fellBack) return;
  fellBack = true;
  process.emitWarning(`cannot start the spawner thread (${err instanceof Error ? err.message : String(err)}); spawning on the main thread`);
}

function startThread(): Thread | undefined {
  let w: Worker;
  try {
    w = new Worker(WORKER_CODE, { eval: true, env: SHARE_ENV, name: 'flotilla-spawner' });
  } catch (err) {
    useMainThread(err);
    return undefined;
  }
  const t: Thread = { w, pending: new Map() };
  let ready = false;
  let lastError: unknown;
  w.on('message', (r: Reply | { ready: true }) => {
    if ('ready' in r) {
      ready = true;
      return;
    }
    const p = t.pending.get(r.id);
    if (!p) return;
    t.pending.delete(r.id);
    if (t.pending.size === 0) w.unref();
    p.resolve(r);
  });
  w.on('error', (err) => (lastError = err));
  w.on('exit', (code) => {
    const stopped = thread !== t; // closeSpawner() let go of it
    if (!stopped) thread = undefined;
    const left = [...t.pending.values()];
    t.pending.clear();
    if (!ready) {
      // it never ran a request: run them here (and from now on, unless it was stopped on purpose)
      if (!stopped) useMainThread(lastError ?? new Error(`exit code ${code}`));
      for (const p of left) runOnMainThread(p.msg, p.resolve);
    } else {
      // they may or may not have started; the next request starts a new worker
      const why = `spawner thread exited (code ${code}${lastError instanceof Error ? `: ${lastError.message}` : ''})`;
      for (const p of left) p.resolve(failure(p.msg, why));
    }
  });
  w.unref(); // after adding the 'message' listener, which refs the port again
  return t;
}

function call(msg: Unsent): Promise<Reply> {
  const req = { ...msg, id: nextId++ } as Request;
  return new Promise((resolve) => {
    if (!fellBack && !forceMain) thread ??= startThread();
    if (!thread || fellBack || forceMain) {
      runOnMainThread(req, resolve);
      return;
    }
    thread.pending.set(req.id, { msg: req, resolve });
    thread.w.ref();
    thread.w.postMessage(req);
  });
}

function defined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** execFile on the spawner thread: resolves with the exit code and output, never rejects. */
export async function execInWorker(file: string, args: string[], o: ExecOptions = {}): Promise<ExecResult> {
  const opts = defined({ cwd: o.cwd, env: o.env, timeout: o.timeoutMs, maxBuffer: o.maxBuffer });
  const { id: _id, ...r } = (await call({ op: 'exec', file, args, opts })) as ExecResult & { id: number };
  return r;
}

/**
 * Starts a monitor-style child on the spawner thread: detached, stdio ['ignore', 'pipe', 'pipe', 'pipe'],
 * resolves with the first line it writes to fd 3 (see MonitorResult). The child is then unref'd and its
 * pipes closed; it keeps running and never keeps this process alive.
 */
export async function spawnMonitor(file: string, args: string[], o: MonitorSpawnOptions = {}): Promise<MonitorResult> {
  const opts = defined({ cwd: o.cwd, env: o.env });
  const { id: _id, ...r } = (await call({ op: 'monitor', file, args, opts, timeoutMs: o.timeoutMs ?? 60_000 })) as MonitorResult & { id: number };
  return r;
}

/** Where spawns run now: 'thread' (a worker is up), 'main' (fallback) or 'idle' (no worker started yet). */
export function spawnerState(): 'thread' | 'main' | 'idle' {
  if (fellBack || forceMain) return 'main';
  return thread ? 'thread' : 'idle';
}

/** Stops the worker thread (optional: it is unref'd). Requests in flight resolve with an error. */
export async function closeSpawner(): Promise<void> {
  const t = thread;
  thread = undefined;
  if (t) await t.w.terminate();
}

/**
 * Spawn on the main thread (true) or on the worker (false). A short-lived process that does one thing
 * at a time (the CLI's container commands) has no event loop to protect and would only pay the thread's
 * start-up (~25 ms); tests and measurements use it too.
 */
export function setSpawnOnMainThread(on: boolean): void {
  forceMain = on;
}
