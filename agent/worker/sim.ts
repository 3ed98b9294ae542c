/**
 * A simulated container runtime: containers without processes, kept in memory (and, with a data dir,
 * in one JSON file so a restarted agent can adopt them). Behind the same ContainerRuntime seam as the
 * runc runtime, so one machine can simulate hundreds of nodes with ~100 containers each. It always
 * shows itself as simulated: kind 'sim', and the node description's runtime is "sim".
 *
 * A simulated process runs until it is stopped or killed, unless the container's env says otherwise:
 *   FLOTILLA_SIM_EXIT_CODE=N       the process exits by itself with code N ...
 *   FLOTILLA_SIM_EXIT_AFTER_MS=T   ... T ms after it started (default 0)
 *   FLOTILLA_SIM_OOM=1             ... and reports it was OOM-killed
 *   FLOTILLA_SIM_EXEC_EXIT_CODE=N  exec (so health checks) exits with N instead of 0
 *   FLOTILLA_SIM_STOP_MS=T         a stop takes T ms (at most the grace period) before the exit
 * Every image exists unless the hasImage option says otherwise (or, for a whole process, the env var
 * FLOTILLA_SIM_MISSING_IMAGES, a comma-separated list of substrings of image names that are missing).
 */
import { createHash } from 'node:crypto';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { FlotillaError, alreadyExists, invalidArgument, notFound } from '../../common/errors.js';
import { isValidName, newId } from '../../common/ids.js';
import type {
  ContainerCreateOptions,
  ContainerInfo,
  ContainerRuntime,
  ContainerStatus,
  ExecResult,
  ExitInfo,
  ImageConfig,
  LogEntry,
} from '../runtime/types.js';
import { writeFileAtomic } from '../../common/fsutil.js';

export interface SimRuntimeOptions {
  /** keep the containers in <dataDir>/sim/containers.json (adoption after a restart); default: memory only */
  dataDir?: string;
  /** whether an image exists; default: every image (minus FLOTILLA_SIM_MISSING_IMAGES) */
  hasImage?: (ref: string) => boolean;
  /** the config every image reports; default: sh, PATH set */
  imageConfig?: (ref: string) => ImageConfig;
}

interface SimContainer {
  id: string;
  name: string;
  image: string;
  imageDigest: string;
  status: ContainerStatus;
  pid: number;
  exitCode: number | null;
  oomKilled: boolean;
  created: number;
  started: number;
  finished: number;
  labels: Record<string, string>;
  env: string[];
  args: string[];
}

interface SimFile {
  version: 1;
  nextPid: number;
  containers: SimContainer[];
}

const SIGNALS = os.constants.signals as Record<string, number>;
/** signals whose default action is to ignore (or continue): the simulated process keeps running */
const HARMLESS = new Set(['SIGCHLD', 'SIGWINCH', 'SIGURG', 'SIGCONT']);

function signalNumber(sig: string): { name: string; num: number } {
  const s = sig.trim().toUpperCase();
  if (/^\d+$/.test(s)) {
    const n = Number(s);
    const name = Object.keys(SIGNALS).find((k) => SIGNALS[k] === n);
    if (!name) throw invalidArgument('signal', sig, 'unknown signal number');
    return { name, num: n };
  }
  const name = s.startsWith('SIG') ? s : `SIG${s}`;
  const num = SIGNALS[name];
  if (num === undefined) throw invalidArgument('signal', sig, 'unknown signal (use e.g. TERM, KILL, HUP or a number)');
  return { name, num };
}

function envValue(env: string[], key: string): string | undefined {
  for (let i = env.length - 1; i >= 0; i--) {
    const e = env[i]!;
    if (e.startsWith(`${key}=`)) return e.slice(key.length + 1);
  }
  return undefined;
}

function defaultMissing(): (ref: string) => boolean {
  const parts = (process.env.FLOTILLA_SIM_MISSING_IMAGES ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  return (ref) => !parts.some((p) => ref.includes(p));
}

const DEFAULT_IMAGE_CONFIG: ImageConfig = {
  entrypoint: [],
  cmd: ['sh'],
  env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
  workingDir: '',
  user: '',
};

export class SimRuntime implements ContainerRuntime {
  readonly kind = 'sim' as const;
  private readonly containers = new Map<string, SimContainer>();
  private readonly names = new Map<string, string>();
  private readonly waiters = new Map<string, Set<() => void>>();
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private nextPid = 100_000;
  private readonly file: string | undefined;
  private dirty = false;
  private writing: Promise<void> | undefined;
  /** the last error writing the state file, if any (the sim never fails an operation for it) */
  lastPersistError: Error | undefined;
  private readonly imageFilter: (ref: string) => boolean;
  private readonly imageCfg: (ref: string) => ImageConfig;
  private closed = false;

  protected constructor(opts: SimRuntimeOptions) {
    this.file = opts.dataDir ? path.join(path.resolve(opts.dataDir), 'sim', 'containers.json') : undefined;
    this.imageFilter = opts.hasImage ?? defaultMissing();
    this.imageCfg = opts.imageConfig ?? (() => structuredClone(DEFAULT_IMAGE_CONFIG));
  }

  /** A runtime in memory only. */
  static memory(opts: Omit<SimRuntimeOptions, 'dataDir'> = {}): SimRuntime {
    return new SimRuntime(opts);
  }

  /** A runtime whose containers survive a restart in <dataDir>/sim/containers.json. */
  static async open(dataDir: string, opts: Omit<SimRuntimeOptions, 'dataDir'> = {}): Promise<SimRuntime> {
    const rt = new SimRuntime({ ...opts, dataDir });
    await rt.load();
    return rt;
  }

  private async load(): Promise<void> {
    if (!this.file) return;
    await fsp.mkdir(path.dirname(this.file), { recursive: true, mode: 0o700 });
    let data: SimFile | undefined;
    try {
      data = JSON.parse(await fsp.readFile(this.file, 'utf8')) as SimFile;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new FlotillaError('INTERNAL', `cannot read the simulated runtime's state ${this.file}: ${(err as Error).message}`);
      }
    }
    if (!data) return;
    this.nextPid = data.nextPid || this.nextPid;
    for (const c of data.containers ?? []) {
      this.containers.set(c.id, c);
      this.names.set(c.name, c.id);
      if (c.status === 'running') this.planExit(c);
    }
  }

  /** Writes the state file (coalesced: at most one write in flight, one more queued). */
  private persist(): void {
    if (!this.file) return;
    this.dirty = true;
    if (this.writing) return;
    const file = this.file;
    const loop = async (): Promise<void> => {
      while (this.dirty) {
        this.dirty = false;
        const data: SimFile = { version: 1, nextPid: this.nextPid, containers: [...this.containers.values()] };
        try {
          // simulated containers: atomic is enough, a crash may lose the last state like a real one would
          await writeFileAtomic(file, JSON.stringify(data), { durable: false });
          this.lastPersistError = undefined;
        } catch (err) {
          this.lastPersistError = err as Error;
        }
      }
    };
    this.writing = loop().finally(() => {
      this.writing = undefined;
    });
  }

  /** Waits for pending state writes. */
  async flush(): Promise<void> {
    while (this.writing) await this.writing;
  }

  /** Stops the exit timers and writes the state; containers are kept (as if their monitors held them). */
  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    await this.flush();
  }

  private get(idOrName: string): SimContainer {
    const ref = idOrName.trim();
    const byName = this.names.get(ref);
    const c = (byName && this.containers.get(byName)) ?? this.containers.get(ref);
    if (c) return c;
    if (/^[a-z0-9]{3,}$/.test(ref)) {
      const hits = [...this.containers.keys()].filter((id) => id.startsWith(ref));
      if (hits.length === 1) return this.containers.get(hits[0]!)!;
      if (hits.length > 1) {
        throw new FlotillaError('INVALID_ARGUMENT', `container id prefix ${JSON.stringify(ref)} is ambiguous: it matches ${hits.length} containers`);
      }
    }
    throw notFound('container', idOrName);
  }

  private info(c: SimContainer): ContainerInfo {
    return {
      id: c.id,
      name: c.name,
      image: c.image,
      imageDigest: c.imageDigest,
      status: c.status,
      pid: c.status === 'stopped' ? 0 : c.pid,
      exitCode: c.exitCode,
      oomKilled: c.oomKilled,
      rootfs: '',
      cgroupPaths: {},
      labels: { ...c.labels },
      created: c.created,
      started: c.started,
      finished: c.finished,
    };
  }

  /** The simulated process exits (also usable by tests: "the process died"). */
  exit(idOrName: string, exitCode: number, oomKilled = false): void {
    const c = this.get(idOrName);
    if (c.status === 'stopped') return;
    c.status = 'stopped';
    c.exitCode = exitCode;
    c.oomKilled = oomKilled;
    c.finished = Date.now();
    const t = this.timers.get(c.id);
    if (t) clearTimeout(t);
    this.timers.delete(c.id);
    this.persist();
    const ws = this.waiters.get(c.id);
    this.waiters.delete(c.id);
    for (const w of ws ?? []) w();
  }

  private planExit(c: SimContainer): void {
    if (this.closed) return;
    const code = envValue(c.env, 'FLOTILLA_SIM_EXIT_CODE');
    if (code === undefined || !/^-?\d+$/.test(code.trim())) return;
    const after = Number(envValue(c.env, 'FLOTILLA_SIM_EXIT_AFTER_MS') ?? '0') || 0;
    const oom = envValue(c.env, 'FLOTILLA_SIM_OOM') === '1';
    const delay = Math.max(0, c.started + after - Date.now());
    const t = setTimeout(() => {
      this.timers.delete(c.id);
      if (this.containers.get(c.id) === c) this.exit(c.id, Number(code), oom);
    }, delay);
    t.unref();
    this.timers.set(c.id, t);
  }

  // ---------------------------------------------------------------------------------------------- ContainerRuntime

  async create(opts: ContainerCreateOptions): Promise<ContainerInfo> {
    if (typeof opts.name !== 'string' || !isValidName(opts.name)) {
      throw invalidArgument('container name', opts.name, 'use 1-63 letters, digits, "_", "." or "-", starting with a letter or digit');
    }
    if (typeof opts.image !== 'string' || opts.image.trim() === '') throw invalidArgument('image', opts.image, 'an image name or digest is required');
    if (this.names.has(opts.name)) throw alreadyExists('container', opts.name);
    if (!(await this.hasImage(opts.image))) {
      throw new FlotillaError('NOT_FOUND', `image ${JSON.stringify(opts.image)} not found: import it first (flotilla image import)`);
    }
    const cfg = await this.imageConfig(opts.image);
    const ep = opts.entrypoint ?? cfg.entrypoint;
    const cmd = opts.command && opts.command.length > 0 ? opts.command : opts.entrypoint !== undefined ? [] : cfg.cmd;
    const c: SimContainer = {
      id: newId(),
      name: opts.name,
      image: opts.image,
      imageDigest: `sha256:${createHash('sha256').update(opts.image).digest('hex')}`,
      status: 'created',
      pid: 0,
      exitCode: null,
      oomKilled: false,
      created: Date.now(),
      started: 0,
      finished: 0,
      labels: { ...(opts.labels ?? {}) },
      env: [...cfg.env, ...(opts.env ?? [])],
      args: [...ep, ...cmd],
    };
    this.containers.set(c.id, c);
    this.names.set(c.name, c.id);
    this.persist();
    return this.info(c);
  }

  async start(idOrName: string): Promise<void> {
    const c = this.get(idOrName);
    if (c.status === 'running') throw new FlotillaError('FAILED_PRECONDITION', `container ${c.name} is already running`);
    if (c.status !== 'created') throw new FlotillaError('FAILED_PRECONDITION', `container ${c.name} has exited and cannot be started again (create a new one)`);
    c.status = 'running';
    c.pid = this.nextPid++;
    c.started = Date.now();
    this.persist();
    this.planExit(c);
  }

  async wait(idOrName: string, signal?: AbortSignal): Promise<ExitInfo> {
    const c = this.get(idOrName);
    if (c.status === 'stopped') return { exitCode: c.exitCode ?? -1, oomKilled: c.oomKilled };
    if (signal?.aborted) throw new FlotillaError('ABORTED', `wait for container ${idOrName} aborted`);
    await new Promise<void>((resolve, reject) => {
      let ws = this.waiters.get(c.id);
      if (!ws) this.waiters.set(c.id, (ws = new Set()));
      const onAbort = (): void => {
        ws.delete(done);
        reject(new FlotillaError('ABORTED', `wait for container ${idOrName} aborted`));
      };
      const done = (): void => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      };
      ws.add(done);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
    if (!this.containers.has(c.id)) throw new FlotillaError('NOT_FOUND', `container ${JSON.stringify(idOrName)} was removed while waiting for it`);
    return { exitCode: c.exitCode ?? -1, oomKilled: c.oomKilled };
  }

  /** The simulated process exits on TERM at once (143), whatever the grace period. */
  async stop(idOrName: string, graceMs: number): Promise<void> {
    const c = this.get(idOrName);
    if (c.status === 'stopped') return;
    // a process that takes a while to exit on SIGTERM (at most the grace period)
    const stopMs = Math.min(graceMs, Number(envValue(c.env, 'FLOTILLA_SIM_STOP_MS') ?? '0') || 0);
    if (stopMs > 0 && c.status === 'running') await new Promise((r) => setTimeout(r, stopMs));
    if (this.get(idOrName).status === 'stopped') return;
    this.exit(c.id, c.status === 'created' ? 137 : 143);
  }

  async kill(idOrName: string, signal: string): Promise<void> {
    const { name, num } = signalNumber(signal);
    const c = this.get(idOrName);
    if (c.status === 'stopped') throw new FlotillaError('FAILED_PRECONDITION', `container ${c.name} is not running`);
    if (HARMLESS.has(name)) return;
    this.exit(c.id, 128 + num);
  }

  async remove(idOrName: string, force: boolean): Promise<void> {
    const c = this.get(idOrName);
    if (c.status !== 'stopped') {
      if (!force) {
        throw new FlotillaError(
          'FAILED_PRECONDITION',
          `container ${c.name} is ${c.status === 'running' ? 'running' : 'created but not stopped'}: stop it first or force the removal`,
        );
      }
      this.exit(c.id, 137);
    }
    this.containers.delete(c.id);
    this.names.delete(c.name);
    this.persist();
  }

  async inspect(idOrName: string): Promise<ContainerInfo> {
    return this.info(this.get(idOrName));
  }

  async list(): Promise<ContainerInfo[]> {
    return [...this.containers.values()].map((c) => this.info(c));
  }

  async exec(idOrName: string, cmd: string[], _opts?: { timeoutMs?: number; signal?: AbortSignal }): Promise<ExecResult> {
    const c = this.get(idOrName);
    if (c.status !== 'running') throw new FlotillaError('FAILED_PRECONDITION', `container ${c.name} is not running`);
    if (cmd.length === 0 || cmd[0] === '') throw invalidArgument('command', cmd, 'a command is required');
    const code = Number(envValue(c.env, 'FLOTILLA_SIM_EXEC_EXIT_CODE') ?? '0') || 0;
    return { exitCode: code, output: '' };
  }

  private lines(c: SimContainer): LogEntry[] {
    const out: LogEntry[] = [{ time: c.created, stream: 'stdout', line: `sim: container ${c.name} created from ${c.image}` }];
    if (c.started) out.push({ time: c.started, stream: 'stdout', line: `sim: started ${JSON.stringify(c.args)}` });
    if (c.status === 'stopped' && c.started) out.push({ time: c.finished, stream: 'stderr', line: `sim: exited with code ${c.exitCode}` });
    return out;
  }

  async *logs(idOrName: string, opts: { follow?: boolean; tail?: number; signal?: AbortSignal } = {}): AsyncIterable<LogEntry> {
    const c = this.get(idOrName);
    let all = this.lines(c);
    if (opts.tail !== undefined && opts.tail >= 0) all = opts.tail === 0 ? [] : all.slice(-opts.tail);
    let sent = all.length > 0 ? all[all.length - 1]!.time : 0;
    const seen = new Set(all.map((l) => l.line));
    yield* all;
    if (!opts.follow || c.status === 'stopped' || opts.signal?.aborted) return;
    try {
      await this.wait(c.id, opts.signal);
    } catch {
      return; // aborted or removed
    }
    for (const l of this.lines(c)) {
      if (seen.has(l.line) || l.time < sent) continue;
      sent = l.time;
      yield l;
    }
  }

  async hasImage(ref: string): Promise<boolean> {
    return ref.trim() !== '' && this.imageFilter(ref);
  }

  async imageConfig(ref: string): Promise<ImageConfig> {
    if (!(await this.hasImage(ref))) throw new FlotillaError('NOT_FOUND', `image ${JSON.stringify(ref)} not found: import it first (flotilla image import)`);
    return this.imageCfg(ref);
  }

  /** For tests and tools: the number of containers held. */
  get size(): number {
    return this.containers.size;
  }
}
