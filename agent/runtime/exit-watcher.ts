/**
 * Knowing when a container exited: conmon writes its exit code to <run>/exits/<id> (and to the bundle's
 * `exit` file) and then exits itself. ExitWatcher watches the exits directory for the wait() calls of
 * one runtime; isMonitor tells whether a container's conmon still runs.
 */
import { watch, type FSWatcher } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';

/** How often a wait reloads a record when no exit event came: with the exit-dir watch, and without. */
const EXIT_POLL_WATCHED_MS = 10_000;
const EXIT_POLL_MS = 1000;

export function isAlive(pid: number): boolean {
  if (!pid || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Whether pid is the conmon monitoring container id (guards against pid reuse). */
export async function isMonitor(pid: number, id: string): Promise<boolean> {
  if (!isAlive(pid)) return false;
  try {
    const cmd = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8');
    return cmd.includes('conmon') && cmd.includes(id);
  } catch {
    return false;
  }
}

/** The exit code in a conmon exit file, or undefined when there is none (yet). */
export async function readExitCode(file: string): Promise<number | undefined> {
  try {
    const t = (await fs.readFile(file, 'utf8')).trim();
    if (t === '') return undefined;
    const n = Number(t);
    return Number.isInteger(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

/** One fs.watch of the exits directory, shared by every wait of a runtime, running only while one waits. */
export class ExitWatcher {
  private readonly waiters = new Map<string, Set<() => void>>();
  private watcher: FSWatcher | undefined;

  constructor(readonly exitsDir: string) {}

  /**
   * Resolves when an exit file for id appears, or on abort, or after a while: the caller then reloads
   * the record, which also notices a monitor that died without writing one. With the directory watch
   * running that is every 10 s (a second per container would cost an idle agent with 50 containers
   * ~6 % of a core in file reads); if the watch cannot run, every second.
   */
  next(id: string, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      let set = this.waiters.get(id);
      if (!set) this.waiters.set(id, (set = new Set()));
      const done = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', done);
        const s = this.waiters.get(id);
        s?.delete(done);
        if (s && s.size === 0) this.waiters.delete(id);
        if (this.waiters.size === 0) this.close();
        resolve();
      };
      set.add(done);
      this.start();
      const timer = setTimeout(done, this.watcher ? EXIT_POLL_WATCHED_MS : EXIT_POLL_MS);
      signal?.addEventListener('abort', done, { once: true });
      // the exit may have come between the caller's read of the record and the watch
      fs.access(path.join(this.exitsDir, id)).then(done, () => undefined);
    });
  }

  private start(): void {
    if (this.watcher) return;
    try {
      this.watcher = watch(this.exitsDir, { persistent: true }, (_event, file) => {
        const name = file?.toString();
        if (!name) return;
        const id = name.split('.')[0] ?? name;
        for (const fn of [...(this.waiters.get(id) ?? [])]) fn();
      });
      this.watcher.on('error', () => this.close());
    } catch {
      this.watcher = undefined; // polling (the waits' timeouts) still works
    }
  }

  /** Stops the watch (pending waits keep polling). */
  close(): void {
    this.watcher?.close();
    this.watcher = undefined;
  }
}
