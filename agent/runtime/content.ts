/**
 * The content store: immutable blobs addressed by their sha256 digest.
 *
 *   <data>/content/blobs/sha256/<hex>     committed blobs (read-only, 0444)
 *   <data>/content/ingest/<pid>-<random>  writes in progress
 *
 * A write streams into an ingest file while hashing, is checked against the expected size and digest
 * (when given), fsynced, then renamed into place and the directory fsynced. A crash mid-write leaves only
 * an ingest file, never a visible blob; ingest files whose writer process is gone are removed on open.
 */
import { createHash } from 'node:crypto';
import { fsyncDir, tempName } from '../../common/fsutil.js';
import { createReadStream, type ReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { FlotillaError, invalidArgument, notFound } from '../../common/errors.js';

const DIGEST_RE = /^sha256:([a-f0-9]{64})$/;

export interface BlobInfo {
  /** "sha256:<hex>" */
  digest: string;
  size: number;
}

export interface Expected {
  digest?: string;
  size?: number;
}

export function isDigest(value: string): boolean {
  return DIGEST_RE.test(value);
}

/** Returns the hex part of a "sha256:<hex>" digest, or throws INVALID_ARGUMENT naming the field. */
export function digestHex(digest: string, field = 'digest'): string {
  const m = DIGEST_RE.exec(digest);
  if (!m?.[1]) throw invalidArgument(field, digest, 'expected "sha256:" followed by 64 lowercase hex digits');
  return m[1];
}

export function sha256Digest(data: Uint8Array | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

function isPidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export { fsyncDir, tempName };

/** Removes "<pid>-..." entries in dir whose process no longer runs (stale writes of a crashed process). */
export async function cleanStale(dir: string, prefix = ''): Promise<void> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(name.slice(prefix.length).split('-')[0]);
    if (Number.isInteger(pid) && pid > 0 && (pid === process.pid || isPidAlive(pid))) continue;
    await fs.rm(path.join(dir, name), { recursive: true, force: true });
  }
}


export class ContentStore {
  readonly root: string;
  readonly blobsDir: string;
  readonly ingestDir: string;

  private constructor(dataDir: string) {
    this.root = path.join(dataDir, 'content');
    this.blobsDir = path.join(this.root, 'blobs', 'sha256');
    this.ingestDir = path.join(this.root, 'ingest');
  }

  /** Opens (creating if needed) the store under <dataDir>/content and removes stale ingest files. */
  static async open(dataDir: string): Promise<ContentStore> {
    const store = new ContentStore(path.resolve(dataDir));
    await fs.mkdir(store.blobsDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(store.ingestDir, { recursive: true, mode: 0o700 });
    await cleanStale(store.ingestDir);
    return store;
  }

  /** The path of a blob (whether or not it exists). Throws INVALID_ARGUMENT on a malformed digest. */
  path(digest: string): string {
    return path.join(this.blobsDir, digestHex(digest));
  }

  async has(digest: string): Promise<boolean> {
    try {
      return (await fs.stat(this.path(digest))).isFile();
    } catch (err) {
      if (err instanceof FlotillaError) throw err;
      return false;
    }
  }

  /** Size of a committed blob; NOT_FOUND when absent. */
  async info(digest: string): Promise<BlobInfo> {
    try {
      const st = await fs.stat(this.path(digest));
      return { digest, size: st.size };
    } catch (err) {
      if (err instanceof FlotillaError) throw err;
      throw notFound('blob', digest);
    }
  }

  /**
   * Streams data into the store. With expected.size and/or expected.digest the data is verified before it
   * becomes visible; a mismatch throws INVALID_ARGUMENT and leaves nothing behind. Returns what was written.
   * If the blob already exists the new copy is discarded (content addressed: it is the same).
   */
  async ingest(source: Readable | Iterable<Uint8Array> | AsyncIterable<Uint8Array>, expected: Expected = {}): Promise<BlobInfo> {
    if (expected.digest !== undefined) digestHex(expected.digest, 'expected digest');
    const tmp = path.join(this.ingestDir, tempName());
    const hash = createHash('sha256');
    let size = 0;
    const fh = await fs.open(tmp, 'wx', 0o444);
    let committed = false;
    try {
      for await (const chunk of source as AsyncIterable<Uint8Array | string>) {
        const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
        size += buf.length;
        if (expected.size !== undefined && size > expected.size) {
          throw new FlotillaError(
            'INVALID_ARGUMENT',
            `content size mismatch${expected.digest ? ` for ${expected.digest}` : ''}: more than the expected ${expected.size} bytes`,
          );
        }
        hash.update(buf);
        let off = 0;
        while (off < buf.length) {
          const { bytesWritten } = await fh.write(buf, off, buf.length - off);
          off += bytesWritten;
        }
      }
      const digest = `sha256:${hash.digest('hex')}`;
      if (expected.size !== undefined && size !== expected.size) {
        throw new FlotillaError(
          'INVALID_ARGUMENT',
          `content size mismatch${expected.digest ? ` for ${expected.digest}` : ''}: got ${size} bytes, expected ${expected.size}`,
        );
      }
      if (expected.digest !== undefined && digest !== expected.digest) {
        throw new FlotillaError('INVALID_ARGUMENT', `content digest mismatch: got ${digest}, expected ${expected.digest}`);
      }
      await fh.sync();
      await fh.close();
      const dest = this.path(digest);
      if (await this.has(digest)) {
        await fs.rm(tmp, { force: true });
      } else {
        await fs.rename(tmp, dest);
        await fsyncDir(this.blobsDir);
      }
      committed = true;
      return { digest, size };
    } finally {
      if (!committed) {
        await fh.close().catch(() => undefined);
        await fs.rm(tmp, { force: true });
      }
    }
  }

  /** Alias of ingest for stream sources. */
  writeStream(source: Readable | AsyncIterable<Uint8Array>, expected?: Expected): Promise<BlobInfo> {
    return this.ingest(source, expected);
  }

  async writeBytes(data: Uint8Array | string, expected?: Expected): Promise<BlobInfo> {
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    return this.ingest([buf], expected);
  }

  /** Copies a file into the store, verifying it against expected. */
  async writeFile(file: string, expected?: Expected): Promise<BlobInfo> {
    return this.ingest(createReadStream(file), expected);
  }

  async readBytes(digest: string): Promise<Buffer> {
    try {
      return await fs.readFile(this.path(digest));
    } catch (err) {
      if (err instanceof FlotillaError) throw err;
      throw notFound('blob', digest);
    }
  }

  /** A read stream over a blob; NOT_FOUND if absent. */
  async openRead(digest: string): Promise<ReadStream> {
    if (!(await this.has(digest))) throw notFound('blob', digest);
    return createReadStream(this.path(digest));
  }

  /** Removes a blob; returns whether it existed. */
  async delete(digest: string): Promise<boolean> {
    try {
      await fs.unlink(this.path(digest));
      return true;
    } catch (err) {
      if (err instanceof FlotillaError) throw err;
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  }

  /** All committed blob digests. */
  async list(): Promise<string[]> {
    const names = await fs.readdir(this.blobsDir);
    return names.filter((n) => /^[a-f0-9]{64}$/.test(n)).map((n) => `sha256:${n}`);
  }
}
