/**
 * Thin wrappers over the runc and conmon binaries.
 *
 * runc keeps its state under its own root (--root <data>/runc), so `runc list` shows exactly the
 * containers of one flotilla data dir. conmon (the podman/cri-o monitor) runs `runc create` for us, holds
 * the container's stdio (written to a k8s-file log with timestamps, rotated at --log-size-max), reaps the
 * container's init as a subreaper and writes its exit code to <exit-dir>/<id> and <persist-dir>/exit, and an
 * empty <persist-dir>/oom file on an OOM kill in the container's memory cgroup. It daemonises (double fork,
 * setsid), so containers outlive the process that created them.
 */
import { accessSync, constants } from 'node:fs';
import { lstat, open, readFile, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError } from '../../common/errors.js';
import { execInWorker, spawnMonitor } from './spawner.js';

export interface RuncState {
  id: string;
  pid: number;
  status: 'creating' | 'created' | 'running' | 'paused' | 'stopped' | string;
  bundle: string;
  created?: string;
}

const SEARCH_DIRS = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin', '/usr/libexec/podman', '/usr/lib/podman'];

/** Finds an executable in $PATH (and the usual sbin/libexec places); undefined when missing. */
export function findBinary(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(':').filter((d) => d !== ''), ...SEARCH_DIRS];
  for (const d of dirs) {
    const p = path.join(d, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  return undefined;
}

function errText(stderr: string): string {
  // runc prints logrus lines: time="..." level=error msg="..."; keep the msg parts
  const msgs = [...stderr.matchAll(/level=(?:error|fatal) msg="((?:[^"\\]|\\.)*)"/g)].map((m) => (m[1] ?? '').replace(/\\"/g, '"'));
  const text = msgs.length > 0 ? msgs.join('; ') : stderr.trim();
  return text.split('\n').filter((l) => l.trim() !== '').slice(-3).join('; ');
}

export class RuncError extends FlotillaError {
  constructor(
    readonly args: string[],
    readonly stderr: string,
    readonly exitCode: number | null,
  ) {
    super('INTERNAL', `runc ${args.join(' ')}: ${errText(stderr) || `exit code ${exitCode}`}`);
  }
  get notExist(): boolean {
    return /container does not exist|not exist/.test(this.stderr);
  }
  get notRunning(): boolean {
    return /not running|process already finished|container not running/.test(this.stderr);
  }
}

const CHILD_ENV = { PATH: process.env.PATH ?? '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' };

export class Runc {
  constructor(
    readonly bin: string,
    readonly root: string,
  ) {}

  /** Runs `runc --root R ...args` (spawned off the main thread); resolves stdout, rejects with RuncError. */
  async run(args: string[], timeoutMs = 30_000): Promise<string> {
    const full = ['--root', this.root, ...args];
    const r = await execInWorker(this.bin, full, { timeoutMs, maxBuffer: 16 * 1024 * 1024, env: CHILD_ENV });
    if (r.error !== undefined) throw new RuncError(args, r.stderr || r.error, r.code);
    return r.stdout;
  }

  /**
   * Starts a created container. `runc start` does nothing but open the container's exec.fifo in runc's
   * state dir, read the init's "0" and remove the fifo (that is how runc tells created from running).
   * Doing the same here saves a Go process start (~8 ms); when the fifo is not there (another runc
   * version, another layout) we run `runc start`.
   */
  async start(id: string): Promise<void> {
    const fifo = path.join(this.root, id, 'exec.fifo');
    let fh: FileHandle | undefined;
    try {
      const st = await lstat(fifo);
      if (!st.isFIFO()) throw new Error('not a fifo');
      fh = await open(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
    } catch {
      await this.run(['start', id]);
      return;
    }
    try {
      // The init opens the fifo for writing and writes "0". It may not have opened it yet, so read
      // until its byte arrived (EOF only counts after the byte).
      const buf = Buffer.alloc(16);
      let got = 0;
      for (let i = 0; got === 0; i++) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, null).catch((err: NodeJS.ErrnoException) => {
          if (err.code === 'EAGAIN') return { bytesRead: -1 };
          throw err;
        });
        if (bytesRead > 0) got += bytesRead;
        else if (i > 2000) throw new FlotillaError('DEADLINE_EXCEEDED', `container ${id} did not start (its init never signalled)`);
        else await new Promise((r) => setTimeout(r, i < 20 ? 1 : 10));
      }
      await rm(fifo, { force: true });
    } finally {
      await fh.close();
    }
  }

  async kill(id: string, signal: string, all = false): Promise<void> {
    await this.run(['kill', ...(all ? ['--all'] : []), id, signal]);
  }

  async delete(id: string, force: boolean): Promise<void> {
    await this.run(['delete', ...(force ? ['--force'] : []), id]);
  }

  /** The runc state of a container, or undefined when runc does not know it. */
  async state(id: string): Promise<RuncState | undefined> {
    try {
      return JSON.parse(await this.run(['state', id])) as RuncState;
    } catch (err) {
      if (err instanceof RuncError && err.notExist) return undefined;
      throw err;
    }
  }

  async list(): Promise<RuncState[]> {
    const out = await this.run(['list', '--format', 'json']);
    const parsed = JSON.parse(out.trim() || 'null') as RuncState[] | null;
    return parsed ?? [];
  }
}

export interface MonitorOptions {
  conmon: string;
  runc: Runc;
  id: string;
  name: string;
  /** bundle dir (config.json inside); also conmon's working and persist dir */
  bundle: string;
  pidFile: string;
  conmonPidFile: string;
  logPath: string;
  logSizeMax: number;
  exitDir: string;
  timeoutMs?: number;
  /** the container has a terminal (process.terminal): conmon takes its console and logs from it */
  terminal?: boolean;
}

export interface MonitorStarted {
  /** the container's init pid (in the host pid namespace) */
  pid: number;
  conmonPid: number;
}

/**
 * Starts conmon, which runs `runc create` and stays behind as the container's monitor. Resolves once the
 * container is created (its init waits for `runc start`), with the pids. The sync pipe (_OCI_SYNCPIPE,
 * conmon API version 1) carries {"data": pid} or {"data": -1, "message": runc's stderr}.
 */
export async function startMonitor(o: MonitorOptions): Promise<MonitorStarted> {
  const args = [
    '--api-version',
    '1',
    '-c',
    o.id,
    '-u',
    o.id,
    '-n',
    o.name,
    '-r',
    o.runc.bin,
    '--runtime-arg',
    '--root',
    '--runtime-arg',
    o.runc.root,
    '-b',
    o.bundle,
    '-p',
    o.pidFile,
    '-P',
    o.conmonPidFile,
    '-l',
    `k8s-file:${o.logPath}`,
    '--log-size-max',
    String(o.logSizeMax),
    '--exit-dir',
    o.exitDir,
    '--persist-dir',
    o.bundle,
    '--full-attach',
    '--socket-dir-path',
    o.bundle,
    '--no-sync-log',
    ...(o.terminal ? ['-t'] : []),
  ];
  // spawned off the main thread (spawner.ts); the worker reads the first line of the sync pipe
  const r = await spawnMonitor(o.conmon, args, { cwd: o.bundle, env: { ...CHILD_ENV, _OCI_SYNCPIPE: '3' }, timeoutMs: o.timeoutMs ?? 60_000 });
  if (r.error !== undefined) throw new FlotillaError('INTERNAL', `cannot run conmon: ${r.error}`);
  if (r.timedOut) throw new FlotillaError('DEADLINE_EXCEEDED', `conmon did not report the creation of container ${o.id} in time`);
  if (r.syncLine === undefined) {
    // conmon exited (or closed the pipe) without reporting a pid
    throw new FlotillaError('INTERNAL', `conmon failed to create the container${r.output.trim() ? `: ${r.output.trim()}` : ''}`);
  }
  let msg: { data?: number; message?: string };
  try {
    msg = JSON.parse(r.syncLine) as { data?: number; message?: string };
  } catch {
    throw new FlotillaError('INTERNAL', `conmon sent an unreadable message: ${r.syncLine}`);
  }
  if (typeof msg.data === 'number' && msg.data > 0) return { pid: msg.data, conmonPid: await readConmonPid(o.conmonPidFile) };
  const text = errText(msg.message ?? '') || 'unknown error';
  throw new FlotillaError('INTERNAL', text.startsWith('runc create failed') ? text : `runc create failed: ${text}`);
}

/** conmon's parent writes this file right after forking the monitor; allow it a moment. */
async function readConmonPid(file: string): Promise<number> {
  for (let i = 0; i < 50; i++) {
    try {
      const n = Number((await readFile(file, 'utf8')).trim());
      if (n > 0) return n;
    } catch {
      // not yet
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  return 0;
}
