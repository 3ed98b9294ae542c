/**
 * The run root: where a data dir's volatile container state lives (records, bundles, exit files, name
 * reservations, runc's state). See runRootOf for how it is chosen.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError } from '../../common/errors.js';

/** <data>/run-root: the run root the first open chose, used by every later one */
export const RUN_ROOT_FILE = 'run-root';

const TMPFS_MAGIC = 0x01021994;

export async function onTmpfs(dir: string): Promise<boolean> {
  try {
    return (await fs.statfs(dir)).type === TMPFS_MAGIC;
  } catch {
    return false;
  }
}

/**
 * Where a data dir's volatile container state lives. The first open chooses it and records it in
 * <data>/run-root, so every process opening the data dir (agent, CLI) uses the same one whatever its
 * environment says (a CLI that chose another would take the agent's snapshots for orphans). The choice:
 * <base>/<16 hex of sha256(data dir)>, where the base is $FLOTILLA_RUN_ROOT, else /run/flotilla when /run
 * is a tmpfs, else /dev/shm/flotilla when that is one, else <data dir>/run. The state is tiny, but a
 * container writes a dozen files in it on create and again on rm: on ext4 right after many removals those
 * inode allocations cost ~10 ms of kernel time per container; on tmpfs almost nothing.
 */
export async function runRootOf(dataDir: string): Promise<string> {
  const abs = path.resolve(dataDir);
  const recorded = (await fs.readFile(path.join(abs, RUN_ROOT_FILE), 'utf8').catch(() => '')).trim();
  if (path.isAbsolute(recorded)) return recorded;
  let base = process.env.FLOTILLA_RUN_ROOT;
  if (!base) {
    if (await onTmpfs('/run')) base = '/run/flotilla';
    else if (await onTmpfs('/dev/shm')) base = '/dev/shm/flotilla';
    else return path.join(abs, 'run');
  }
  return path.join(path.resolve(base), createHash('sha256').update(abs).digest('hex').slice(0, 16));
}

/** Creates dir (0700) and refuses one that is a symlink or not ours (the base may sit in world-writable /dev/shm). */
export async function ownDir(dir: string): Promise<void> {
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const st = await fs.lstat(dir);
  const uid = process.getuid?.() ?? 0;
  if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o022) !== 0) {
    throw new FlotillaError('FAILED_PRECONDITION', `run directory ${dir} must be a directory owned by uid ${uid} and not writable by others`);
  }
}
