/**
 * Running a command in a running container: `runc exec` with the container's own process settings
 * (user, environment, working directory, capabilities) and the given arguments. runc is started on the
 * spawner thread (spawner.ts) like every other runc and conmon process of the runtime: a health check
 * runs one per interval per container, and each spawn on the main thread would stall the agent's event
 * loop for several ms.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { FlotillaError } from '../../common/errors.js';
import { envValue, DEFAULT_PATH, type OciSpec } from './oci.js';
import { findExecutable } from './rootfs.js';
import type { Runc } from './runc.js';
import { runInWorker } from './spawner.js';
import type { ExecResult } from './types.js';
import { setLongTimeout } from '../../common/timers.js';

export interface ExecOptions {
  /** the command is SIGKILLed after this long (DEADLINE_EXCEEDED) */
  timeoutMs?: number;
  /** aborting SIGKILLs the command (ABORTED) */
  signal?: AbortSignal;
  /** where the command's output goes as it comes (it is also returned, up to 16 MiB) */
  stdout?: NodeJS.WritableStream;
  stderr?: NodeJS.WritableStream;
}

/** The running container to exec in: its id, name (for messages), init pid and bundle directory. */
export interface ExecTarget {
  id: string;
  name: string;
  pid: number;
  bundle: string;
}

const SIGNALS = os.constants.signals as Record<string, number>;

/** Runs cmd in the container (validated: cmd[0] must exist in the container's root). */
export async function runcExec(runc: Runc, c: ExecTarget, cmd: string[], opts: ExecOptions = {}): Promise<ExecResult> {
  const spec = JSON.parse(await fs.readFile(path.join(c.bundle, 'config.json'), 'utf8')) as OciSpec;
  await findExecutable(`/proc/${c.pid}/root`, cmd[0]!, envValue(spec.process.env, 'PATH') ?? DEFAULT_PATH, spec.process.cwd);
  const tag = `${process.pid}-${Math.random().toString(36).slice(2)}`;
  const procFile = path.join(c.bundle, `exec-${tag}.json`);
  const pidFile = path.join(c.bundle, `exec-${tag}.pid`);
  await fs.writeFile(procFile, JSON.stringify({ ...spec.process, args: cmd, terminal: false }));
  try {
    const { stdout, stderr } = opts;
    const child = runInWorker(runc.bin, ['--root', runc.root, 'exec', '--process', procFile, '--pid-file', pidFile, c.id], {
      onStdout: stdout ? (d) => stdout.write(d) : undefined,
      onStderr: stderr ? (d) => stderr.write(d) : undefined,
    });
    let killedWhy: string | undefined;
    // the command itself (its pid is in the pid file once runc started it), else runc
    const killProcess = (why: string): void => {
      killedWhy ??= why;
      void fs
        .readFile(pidFile, 'utf8')
        .then((p) => {
          const pid = Number(p.trim());
          if (!(pid > 0)) throw new Error('no pid yet');
          process.kill(pid, 'SIGKILL');
        })
        .catch(() => child.kill('SIGKILL'));
    };
    const timer = opts.timeoutMs ? setLongTimeout(() => killProcess('timeout'), opts.timeoutMs) : undefined;
    const onAbort = (): void => killProcess('aborted');
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    let r;
    try {
      r = await child.result;
    } finally {
      timer?.clear();
      opts.signal?.removeEventListener('abort', onAbort);
    }
    if (killedWhy === 'timeout') throw new FlotillaError('DEADLINE_EXCEEDED', `exec in container ${c.name} timed out after ${opts.timeoutMs}ms`);
    if (killedWhy === 'aborted') throw new FlotillaError('ABORTED', `exec in container ${c.name} aborted`);
    if (r.error !== undefined && r.code === null && r.signal === null) throw new FlotillaError('INTERNAL', `cannot run runc exec: ${r.error}`);
    return { exitCode: r.code ?? 128 + (r.signal ? (SIGNALS[r.signal] ?? 0) : 0), output: r.output };
  } finally {
    await Promise.all([fs.rm(procFile, { force: true }), fs.rm(pidFile, { force: true })]);
  }
}
