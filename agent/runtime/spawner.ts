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
  /** written to the child's stdin, which is then closed (default: stdin left open and unused) */
  input?: string;
}

/** The outcome of execFile: `error` (execFile's error message) is set when it failed. */
export interface ExecResult {
  /** exit code; null when killed by a signal or not started */
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  error?: string;
  /** the error's code when it is a name (ENOENT: the file could not be run) */
  errno?: string;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** each chunk of the child's stdout / stderr as it arrives */
  onStdout?: (data: Buffer) => void;
  onStderr?: (data: Buffer) => void;
  /** bytes of output kept for RunResult.output (the rest still goes to onStdout/onStderr); default 16 MiB */
  maxOutput?: number;
}

export interface RunResult {
  /** exit code; null when killed by a signal or not started */
  code: number | null;
  signal: string | null;
  /** stdout and stderr in the order they arrived, up to maxOutput bytes */
  output: string;
  /** the child could not be started (spawn error message) */
  error?: string;
}

/** A child started by runInWorker. */
export interface Running {
  /** resolves when the child exited and its output ended; never rejects */
  result: Promise<RunResult>;
  /** signals the child (nothing when it has exited) */
  kill(signal?: NodeJS.Signals): void;
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
  | { id: number; op: 'exec'; file: string; args: string[]; opts: childProcess.ExecFileOptions; input?: string }
  | { id: number; op: 'monitor'; file: string; args: string[]; opts: childProcess.SpawnOptions; timeoutMs: number }
  | { id: number; op: 'run'; file: string; args: string[]; opts: childProcess.SpawnOptions; stream: boolean; limit: number }
  | { id: number; op: 'kill'; target: number; signal: string };
/** a Request before it got its id */
type Unsent = Request extends infer R ? (R extends unknown ? Omit<R, 'id'> : never) : never;
/** output of a streamed run, sent before its final reply */
interface Chunk {
  id: number;
  chunk: true;
  fd: 1 | 2;
  data: Uint8Array;
}
type Reply = ((ExecResult | MonitorResult | RunResult) & { id: number }) | Chunk;
type Handler = (m: Request, reply: (r: Reply) => void) => void;

/**
 * Makes the request handler (plain JavaScript: it runs in the worker; `cp` is node:child_process).
 * exec = execFile; monitor = spawn detached with a pipe on fd 3, answer with the first line read from it
 * (or, 20 ms after fd 3 ended, without one), then let the child go; run = spawn with stdout and stderr
 * piped, send each chunk as it comes when `stream` is set, answer when it closed with the output (both
 * streams as they came, up to `limit` bytes); kill = signal a run that is still going (by its request id).
 */
const HANDLER = `(cp) => {
  const live = new Map();
  return (m, reply) => {
    try {
      if (m.op === 'kill') {
        const child = live.get(m.target);
        if (child) child.kill(m.signal);
        reply({ id: m.id, output: '' });
        return;
      }
      if (m.op === 'exec') {
        const child = cp.execFile(m.file, m.args, m.opts, (err, stdout, stderr) => reply({
          id: m.id, stdout: String(stdout), stderr: String(stderr),
          code: err ? (typeof err.code === 'number' ? err.code : null) : 0,
          signal: (err && err.signal) || null,
          ...(err ? { error: err.message } : {}),
          ...(err && typeof err.code === 'string' ? { errno: err.code } : {}),
        }));
        if (typeof m.input === 'string' && child.stdin) {
          child.stdin.on('error', () => undefined);
          child.stdin.end(m.input);
        }
        return;
      }
      if (m.op === 'run') {
        const child = cp.spawn(m.file, m.args, { ...m.opts, stdio: ['ignore', 'pipe', 'pipe'] });
        live.set(m.id, child);
        const chunks = [];
        let size = 0, error, done = false;
        const finish = (r) => {
          if (done) return;
          done = true;
          live.delete(m.id);
          reply({ id: m.id, ...r, ...(error !== undefined ? { error } : {}) });
        };
        const onData = (fd) => (d) => {
          if (m.stream) reply({ id: m.id, chunk: true, fd, data: d });
          if (size < m.limit) chunks.push(d);
          size += d.length;
        };
        child.stdout.on('data', onData(1));
        child.stderr.on('data', onData(2));
        child.on('error', (err) => {
          error = err.message;
          if (child.pid === undefined) finish({ code: null, signal: null, output: '' }); // never started
        });
        child.on('close', (code, signal) => finish({ code, signal, output: Buffer.concat(chunks).toString('utf8') }));
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
  };
}`;

const WORKER_CODE = `
const { parentPort } = require('node:worker_threads');
const handle = (${HANDLER})(require('node:child_process'));
parentPort.on('message', (m) => handle(m, (r) => parentPort.postMessage(r)));
parentPort.postMessage({ ready: true });
`;

interface Pending {
  msg: Request;
  resolve: (r: Reply) => void;
  onChunk?: (c: Chunk) => void;
}

interface Thread {
  w: Worker;
  pending: Map<number, Pending>;
}

let thread: Thread | undefined;
let fellBack = false; // set once a worker could not be started
let forceMain = false;
let nextId = 1;
const started = { thread: 0, main: 0 };

let compiled: Handler | undefined;
function runOnMainThread(p: Pending): void {
  if (p.msg.op !== 'kill') started.main++;
  compiled ??= (vm.runInThisContext(`(${HANDLER})`) as (cp: typeof childProcess) => Handler)(childProcess);
  compiled(p.msg, (r) => deliver(p, r));
}

/** Passes a reply to its request: chunks to onChunk, the final reply to resolve. */
function deliver(p: Pending, r: Reply): boolean {
  if ('chunk' in r) {
    p.onChunk?.(r);
    return false;
  }
  p.resolve(r);
  return true;
}

function failure(msg: Request, error: string): Reply {
  if (msg.op === 'exec') return { id: msg.id, code: null, signal: null, stdout: '', stderr: '', error };
  if (msg.op === 'run') return { id: msg.id, code: null, signal: null, output: '', error };
  return { id: msg.id, output: '', error };
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
    if (!p || !deliver(p, r)) return;
    t.pending.delete(r.id);
    if (t.pending.size === 0) w.unref();
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
      for (const p of left) {
        if (p.msg.op !== 'kill') started.thread--;
        runOnMainThread(p);
      }
    } else {
      // they may or may not have started; the next request starts a new worker
      const why = `spawner thread exited (code ${code}${lastError instanceof Error ? `: ${lastError.message}` : ''})`;
      for (const p of left) p.resolve(failure(p.msg, why));
    }
  });
  w.unref(); // after adding the 'message' listener, which refs the port again
  return t;
}

/** Sends a request (to the worker, or runs it here); `reply` resolves with its final reply. */
function call(msg: Unsent, onChunk?: (c: Chunk) => void): { id: number; reply: Promise<Reply> } {
  const req = { ...msg, id: nextId++ } as Request;
  const reply = new Promise<Reply>((resolve) => {
    const p: Pending = { msg: req, resolve, onChunk };
    if (!fellBack && !forceMain) thread ??= startThread();
    if (!thread || fellBack || forceMain) {
      runOnMainThread(p);
      return;
    }
    if (req.op !== 'kill') started.thread++;
    thread.pending.set(req.id, p);
    thread.w.ref();
    thread.w.postMessage(req);
  });
  return { id: req.id, reply };
}

function defined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** execFile on the spawner thread: resolves with the exit code and output, never rejects. */
export async function execInWorker(file: string, args: string[], o: ExecOptions = {}): Promise<ExecResult> {
  const opts = defined({ cwd: o.cwd, env: o.env, timeout: o.timeoutMs, maxBuffer: o.maxBuffer });
  const { id: _id, ...r } = (await call({ op: 'exec', file, args, opts, ...(o.input !== undefined ? { input: o.input } : {}) }).reply) as ExecResult & { id: number };
  return r;
}

/**
 * Starts a monitor-style child on the spawner thread: detached, stdio ['ignore', 'pipe', 'pipe', 'pipe'],
 * resolves with the first line it writes to fd 3 (see MonitorResult). The child is then unref'd and its
 * pipes closed; it keeps running and never keeps this process alive.
 */
export async function spawnMonitor(file: string, args: string[], o: MonitorSpawnOptions = {}): Promise<MonitorResult> {
  const opts = defined({ cwd: o.cwd, env: o.env });
  const { id: _id, ...r } = (await call({ op: 'monitor', file, args, opts, timeoutMs: o.timeoutMs ?? 60_000 }).reply) as MonitorResult & { id: number };
  return r;
}

/**
 * Spawns a child on the spawner thread with stdout and stderr piped (stdin ignored), streaming its output
 * to onStdout/onStderr. For children that run a while and whose output matters as it comes (runc exec).
 */
export function runInWorker(file: string, args: string[], o: RunOptions = {}): Running {
  const opts = defined({ cwd: o.cwd, env: o.env });
  const stream = o.onStdout !== undefined || o.onStderr !== undefined;
  const onChunk = (c: Chunk): void => {
    const b = Buffer.from(c.data.buffer, c.data.byteOffset, c.data.byteLength);
    (c.fd === 1 ? o.onStdout : o.onStderr)?.(b);
  };
  const { id, reply } = call({ op: 'run', file, args, opts, stream, limit: o.maxOutput ?? 16 * 1024 * 1024 }, stream ? onChunk : undefined);
  return {
    result: reply.then((r) => {
      const { id: _id, ...rest } = r as RunResult & { id: number };
      return rest;
    }),
    kill: (signal = 'SIGTERM') => void call({ op: 'kill', target: id, signal }).reply,
  };
}

/**
 * How many children the spawner started, on the worker thread and on the main thread (the fallback, or
 * setSpawnOnMainThread). Tests use it to check that a path spawns through here.
 */
export function spawnerStats(): { thread: number; main: number } {
  return { ...started };
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
