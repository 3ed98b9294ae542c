/**
 * The one way flotilla replaces a file: write a temp file beside it, optionally fsync it, rename it
 * over the target, then fsync the directory so the rename itself survives a crash.
 *
 * `durable: false` is for files on tmpfs (the run root), where fsync buys nothing: the write is still
 * atomic (readers see the old or the new file, never a torn one).
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';

export interface WriteFileOptions {
  /** fsync the file and its directory (default true). */
  durable?: boolean;
  /** Mode of the new file (default 0o600). */
  mode?: number;
}

/** Temp files of writeFileAtomic are named TEMP_PREFIX + tempName(): cleanStale(dir, TEMP_PREFIX) finds a crashed writer's. */
export const TEMP_PREFIX = '.tmp-';

/** A unique temp-file suffix: pid plus random bytes, so concurrent writers never share a temp file. */
export function tempName(): string {
  return `${process.pid}-${randomBytes(8).toString('hex')}`;
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export function fsyncDirSync(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Atomically replaces file with data: write temp, fsync, rename, fsync dir. Removes the temp on failure. */
export async function writeFileAtomic(file: string, data: string | Uint8Array, opts: WriteFileOptions = {}): Promise<void> {
  const durable = opts.durable ?? true;
  const dir = path.dirname(file);
  const tmp = path.join(dir, `${TEMP_PREFIX}${tempName()}`);
  let renamed = false;
  try {
    const fh = await fsp.open(tmp, 'wx', opts.mode ?? 0o600);
    try {
      await fh.writeFile(data);
      if (durable) await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, file);
    renamed = true;
    if (durable) await fsyncDir(dir);
  } finally {
    if (!renamed) await fsp.rm(tmp, { force: true }).catch(() => undefined);
  }
}

/** Synchronous twin of writeFileAtomic, for start-up paths that run before the event loop matters. */
export function writeFileAtomicSync(file: string, data: string | Uint8Array, opts: WriteFileOptions = {}): void {
  const durable = opts.durable ?? true;
  const dir = path.dirname(file);
  const tmp = path.join(dir, `${TEMP_PREFIX}${tempName()}`);
  let renamed = false;
  try {
    const fd = fs.openSync(tmp, 'wx', opts.mode ?? 0o600);
    try {
      fs.writeFileSync(fd, data);
      if (durable) fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    renamed = true;
    if (durable) fsyncDirSync(dir);
  } finally {
    if (!renamed) fs.rmSync(tmp, { force: true });
  }
}
