/**
 * Files put into a container from secrets and configs.
 *
 * They live in <run>/containers/<id>/files/<n>, one file each, and each is bind-mounted read-only
 * (nosuid, nodev, noexec) at its target in the container by runc (oci.ts). The run root is normally
 * on a tmpfs (run-root.ts: /run/flotilla or /dev/shm/flotilla), so nothing reaches a disk. When it
 * is not (FLOTILLA_RUN_ROOT on a disk, or neither /run nor /dev/shm a tmpfs, where the run root falls
 * back to <data>/run), the files directory gets a small tmpfs of its own, mounted here and unmounted
 * by removeFiles: a secret is never written to a disk either way.
 *
 * The files are deleted as soon as the container stops (the runtime calls removeFiles when it sees
 * the exit; a stopped container never starts again), and with the container's directory when it is
 * removed, or by the runtime's reconcile after a restart for containers that are gone.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError, invalidArgument } from '../../common/errors.js';
import { mountOne, unmount } from './mount.js';
import { onTmpfs } from './run-root.js';
import type { ContainerFile } from './types.js';

export const FILES_DIR = 'files';
/** At most this many files per container, and this many bytes in all (the manager caps each at 500 KiB). */
export const MAX_FILES = 256;
export const MAX_FILES_BYTES = 64 * 1024 * 1024;

/** Checks the files of a create: absolute normalised targets, each once, sane owner and mode. */
export function validateFiles(files: ContainerFile[] | undefined): void {
  if (!files || files.length === 0) return;
  if (files.length > MAX_FILES) throw invalidArgument('files', files.length, `at most ${MAX_FILES} secret and config files per container`);
  const seen = new Set<string>();
  let total = 0;
  for (const f of files) {
    if (typeof f.target !== 'string' || !f.target.startsWith('/') || f.target.includes('\0') || path.posix.normalize(f.target) !== f.target || f.target === '/' || f.target.endsWith('/'))
      throw invalidArgument('file target', f.target, 'must be an absolute, normalised path to a file');
    if (seen.has(f.target)) throw invalidArgument('file target', f.target, 'given twice');
    seen.add(f.target);
    if (!Number.isInteger(f.uid) || f.uid < 0 || f.uid > 0xfffffffe) throw invalidArgument(`uid of ${f.target}`, f.uid, 'must be a user id');
    if (!Number.isInteger(f.gid) || f.gid < 0 || f.gid > 0xfffffffe) throw invalidArgument(`gid of ${f.target}`, f.gid, 'must be a group id');
    if (!Number.isInteger(f.mode) || f.mode < 0 || f.mode > 0o777) throw invalidArgument(`mode of ${f.target}`, f.mode, 'must be at most 0777');
    total += f.data.length;
  }
  if (total > MAX_FILES_BYTES) throw invalidArgument('files', total, `at most ${MAX_FILES_BYTES} bytes of secrets and configs per container`);
}

/**
 * Writes the files into <containerDir>/files (on a tmpfs: the run root's, or one mounted for it) and
 * returns the bind mounts that put them into the container.
 */
export async function writeFiles(containerDir: string, files: ContainerFile[] | undefined): Promise<{ destination: string; source: string }[]> {
  if (!files || files.length === 0) return [];
  const dir = path.join(containerDir, FILES_DIR);
  await fs.mkdir(dir, { mode: 0o700 });
  if (!(await onTmpfs(containerDir))) {
    // a few KiB per file for the inode and the page rounding, plus the data
    const size = files.reduce((n, f) => n + f.data.length + 8192, 64 * 1024);
    await mountOne({ type: 'tmpfs', source: 'tmpfs', options: [`size=${size}`, 'mode=0700', 'nosuid', 'nodev', 'noexec'] }, dir);
    if (!(await onTmpfs(dir))) throw new FlotillaError('INTERNAL', `could not put a tmpfs on ${dir} for secret files`);
  }
  const mounts: { destination: string; source: string }[] = [];
  for (const [i, f] of files.entries()) {
    const source = path.join(dir, String(i));
    const h = await fs.open(source, 'wx', 0o600);
    try {
      await h.writeFile(f.data);
      await h.chown(f.uid, f.gid);
      await h.chmod(f.mode);
    } finally {
      await h.close();
    }
    mounts.push({ destination: f.target, source });
  }
  return mounts;
}

/** Deletes a container's files (and unmounts their tmpfs, if it has its own). Idempotent. */
export async function removeFiles(containerDir: string): Promise<void> {
  const dir = path.join(containerDir, FILES_DIR);
  if (!existsSync(dir)) return;
  if (!(await onTmpfs(containerDir))) await unmount(dir);
  await fs.rm(dir, { recursive: true, force: true, maxRetries: 3 });
}
