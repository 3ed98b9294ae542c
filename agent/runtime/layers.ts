/**
 * Layers: each layer blob is unpacked once, into <data>/snapshots/layers/<hex>/fs, and shared read-only
 * by every container that uses it (as an overlay lowerdir).
 *
 * Unpacking is done entry by entry over node-tar's Parser, so that we control every file system call:
 * - OCI whiteouts become overlayfs whiteouts: ".wh.NAME" -> a 0:0 character device NAME;
 *   ".wh..wh..opq" -> the directory gets the xattr trusted.overlay.opaque=y.
 * - Entries that would land outside the layer are refused: absolute paths, ".." components, writing
 *   through a symlink (any symlink, since its meaning depends on lower layers), hardlinks whose target is
 *   absolute, escapes, or is not already in the layer. Symlinks themselves may point anywhere: they are
 *   resolved inside the container's root at run time, never followed while unpacking.
 * - Ownership, modes (with setuid/setgid/sticky), mtimes, symlinks, hardlinks, devices and FIFOs are
 *   kept (we run as root). PAX xattrs (e.g. file capabilities) are not applied.
 * A layer is unpacked into a temporary directory (stage) and renamed into place only when complete and
 * synced to disk (commit: one syncfs per batch of layers), so a failure or crash leaves nothing
 * half-unpacked behind.
 */
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { constants as fsc } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import zlib from 'node:zlib';
import type { ReadEntry } from 'tar';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { type ContentStore, cleanStale, digestHex, fsyncDir, tempName } from './content.js';
import { execInWorker, type ExecResult } from './spawner.js';

/** Runs a helper (python3, setfattr, mknod, sync) on the spawner thread; throws with its stderr when it fails. */
async function helper(file: string, args: string[]): Promise<string> {
  const r: ExecResult = await execInWorker(file, args);
  if (r.error === undefined) return r.stdout;
  throw Object.assign(new Error((r.stderr || r.error).trim()), { code: r.errno ?? r.code });
}

export interface UnpackResult {
  /** sha256 of the uncompressed tar stream ("diff id") */
  diffId: string;
  /** uncompressed size in bytes */
  size: number;
}

export interface LayerInfo extends UnpackResult {
  /** the layer blob digest */
  digest: string;
  /** the unpacked file system, <data>/snapshots/layers/<hex>/fs */
  path: string;
}

/** A layer unpacked into a temp directory of the store, not yet visible (LayerStore.stage/commit). */
export interface StagedLayer extends UnpackResult {
  digest: string;
  tmp: string;
}

/**
 * syncfs(2) of the file system holding dir (coreutils' `sync -f`), so that everything written there is
 * durable. Falls back to a global sync(1) where `sync -f` is missing (busybox); never skipped silently.
 */
export async function syncFs(dir: string): Promise<void> {
  try {
    await helper('sync', ['-f', dir]);
  } catch {
    await helper('sync', []);
  }
}

export type Compression = 'gzip' | 'zstd' | 'bzip2' | 'xz' | 'none';

/** Detects the compression of a blob by its first bytes. */
export function detectCompression(head: Uint8Array): Compression {
  if (head[0] === 0x1f && head[1] === 0x8b) return 'gzip';
  if (head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd) return 'zstd';
  if (head[0] === 0x42 && head[1] === 0x5a && head[2] === 0x68) return 'bzip2';
  if (head[0] === 0xfd && head[1] === 0x37 && head[2] === 0x7a && head[3] === 0x58) return 'xz';
  return 'none';
}

async function* prepend(first: Buffer, rest: AsyncIterator<Buffer>): AsyncGenerator<Buffer> {
  try {
    yield first;
    while (true) {
      const r = await rest.next();
      if (r.done) return;
      yield r.value;
    }
  } finally {
    await rest.return?.();
  }
}

/** Yields the uncompressed bytes of a (possibly gzip-compressed) tar stream. */
async function* uncompressed(source: Readable | Iterable<Buffer> | AsyncIterable<Buffer>, label: string): AsyncGenerator<Buffer> {
  const it = (async function* () {
    yield* source as AsyncIterable<Buffer>;
  })();
  let first: Buffer = Buffer.alloc(0);
  // gather at least 4 bytes for the magic
  while (first.length < 4) {
    const r = await it.next();
    if (r.done) break;
    first = Buffer.concat([first, Buffer.from(r.value)]);
  }
  const kind = detectCompression(first);
  if (kind === 'zstd' || kind === 'bzip2' || kind === 'xz') {
    await it.return?.();
    throw new FlotillaError('INVALID_ARGUMENT', `layer ${label}: ${kind}-compressed layers are not supported (use gzip or an uncompressed tar)`);
  }
  const all = prepend(first, it);
  if (kind === 'none') {
    yield* all;
    return;
  }
  // 256 KiB output chunks: fewer, larger writes of file data (the default 16 KiB makes unpacking write-bound)
  const gunzip = zlib.createGunzip({ chunkSize: 256 * 1024 });
  const stop = new AbortController();
  const feed = (async () => {
    try {
      for await (const chunk of all) {
        if (stop.signal.aborted) break;
        if (!gunzip.write(chunk)) await once(gunzip, 'drain', { signal: stop.signal });
      }
      gunzip.end();
    } catch (err) {
      if (!stop.signal.aborted) gunzip.destroy(err as Error);
    }
  })();
  try {
    for await (const chunk of gunzip as AsyncIterable<Buffer>) yield chunk;
  } catch (err) {
    throw new FlotillaError('INVALID_ARGUMENT', `layer ${label}: corrupt gzip data: ${errorMessage(err)}`, { cause: err });
  } finally {
    stop.abort();
    gunzip.destroy();
    await feed;
  }
}

function unsafe(label: string, entry: string, why: string): FlotillaError {
  return new FlotillaError('INVALID_ARGUMENT', `layer ${label}: refusing entry ${JSON.stringify(entry)}: ${why}`);
}

/** Turns an archive path into a safe relative path ('' is the root), or throws naming the entry. */
function safeRelative(label: string, raw: string, what = 'path', entry = raw): string {
  if (raw.startsWith('/')) throw unsafe(label, entry, `absolute ${what} ${what === 'path' ? '' : JSON.stringify(raw)}`.trim());
  const parts = raw.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw unsafe(label, entry, `${what} ${what === 'path' ? '' : JSON.stringify(raw) + ' '}has a ".." component`);
  return parts.join('/');
}

/** Sets one xattr on many paths (python3's os.setxattr, else setfattr(1)). */
export async function setXattr(paths: string[], name: string, value: string): Promise<void> {
  if (paths.length === 0) return;
  const py = 'import os,sys\nn=sys.argv[1].encode();v=sys.argv[2].encode()\nfor p in sys.argv[3:]: os.setxattr(p,n,v,follow_symlinks=False)';
  try {
    await helper('python3', ['-c', py, name, value, ...paths]);
    return;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new FlotillaError('INTERNAL', `setting xattr ${name}: ${errorMessage(err)}`);
  }
  try {
    for (const p of paths) await helper('setfattr', ['-h', '-n', name, '-v', value, p]);
  } catch (err) {
    throw new FlotillaError('INTERNAL', `setting xattr ${name} needs python3 or setfattr (package attr): ${errorMessage(err)}`);
  }
}

/** Reads an xattr (or undefined); used by tests and diagnostics. */
export async function getXattr(p: string, name: string): Promise<string | undefined> {
  const py = 'import os,sys\ntry: sys.stdout.write(os.getxattr(sys.argv[1],sys.argv[2],follow_symlinks=False).decode())\nexcept OSError: sys.exit(3)';
  try {
    return await helper('python3', ['-c', py, p, name]);
  } catch {
    return undefined;
  }
}

async function mknod(p: string, kind: 'c' | 'b' | 'p', mode: number, major = 0, minor = 0): Promise<void> {
  const args = ['-m', (mode & 0o7777).toString(8), p, kind];
  if (kind !== 'p') args.push(String(major), String(minor));
  try {
    await helper('mknod', args);
  } catch (err) {
    throw new FlotillaError('INTERNAL', `mknod ${args.join(' ')}: ${errorMessage(err)}`);
  }
}

/**
 * Device numbers of an entry. node-tar decodes them (and uname) only from POSIX ustar headers; GNU tar's
 * default format has them too but node-tar leaves them 0. A 0:0 character device would silently turn into
 * an overlay whiteout, so such an entry is refused rather than guessed.
 */
function deviceNumbers(label: string, e: ReadEntry): { major: number; minor: number } {
  const major = e.header.devmaj ?? 0;
  const minor = e.header.devmin ?? 0;
  if (major === 0 && minor === 0 && e.header.uname === undefined) {
    throw unsafe(label, e.path, 'device numbers are not readable from this (GNU format) tar header; repack the layer in POSIX/pax format');
  }
  return { major, minor };
}

class Unpacker {
  private readonly okDirs = new Set<string>(['']);
  private readonly dirTimes: { abs: string; mtime: Date }[] = [];
  readonly opaque: string[] = [];
  /** set when the unpack failed elsewhere (the source): entry() stops at its next chunk */
  stopped = false;

  constructor(
    private readonly root: string,
    private readonly label: string,
  ) {}

  private abs(rel: string): string {
    return rel === '' ? this.root : path.join(this.root, rel);
  }

  /** Makes sure every parent of rel is a real directory inside the root (creating missing ones). */
  private async ensureParents(raw: string, rel: string, create = true): Promise<void> {
    const parts = rel.split('/');
    parts.pop();
    let cur = '';
    for (const part of parts) {
      cur = cur ? `${cur}/${part}` : part;
      if (this.okDirs.has(cur)) continue;
      let st;
      try {
        st = await fs.lstat(this.abs(cur));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
        if (!create) throw unsafe(this.label, raw, `"${cur}" does not exist in the layer`);
        await fs.mkdir(this.abs(cur), { mode: 0o755 });
        this.okDirs.add(cur);
        continue;
      }
      if (st.isSymbolicLink()) throw unsafe(this.label, raw, `"${cur}" is a symlink; refusing to write through it`);
      if (!st.isDirectory()) throw unsafe(this.label, raw, `"${cur}" is not a directory`);
      this.okDirs.add(cur);
    }
  }

  /** Removes whatever is at rel, unless it is a directory and keepDir is set. Returns whether a dir remains. */
  private async clear(rel: string, keepDir: boolean): Promise<boolean> {
    const abs = this.abs(rel);
    let st;
    try {
      st = await fs.lstat(abs);
    } catch {
      return false;
    }
    if (st.isDirectory()) {
      if (keepDir) return true;
      await fs.rm(abs, { recursive: true, force: true });
      for (const d of this.okDirs) if (d === rel || d.startsWith(rel + '/')) this.okDirs.delete(d);
      return false;
    }
    await fs.unlink(abs);
    return false;
  }

  async entry(e: ReadEntry): Promise<void> {
    const raw = e.path;
    const rel = safeRelative(this.label, raw);
    const base = path.posix.basename(rel);
    const uid = e.uid ?? 0;
    const gid = e.gid ?? 0;
    const mode = (e.mode ?? 0o644) & 0o7777;
    const mtime = e.mtime ?? new Date(0);

    // OCI whiteouts
    if (base.startsWith('.wh.')) {
      e.resume();
      await this.ensureParents(raw, rel);
      const parentRel = path.posix.dirname(rel) === '.' ? '' : path.posix.dirname(rel);
      if (base === '.wh..wh..opq') {
        this.opaque.push(this.abs(parentRel));
      } else if (!base.startsWith('.wh..wh.')) {
        const name = base.slice(4);
        if (name === '' || name === '.' || name === '..') throw unsafe(this.label, raw, 'bad whiteout name');
        const targetRel = parentRel ? `${parentRel}/${name}` : name;
        await this.clear(targetRel, false);
        await mknod(this.abs(targetRel), 'c', 0o000, 0, 0);
      }
      return;
    }

    const abs = this.abs(rel);
    switch (e.type) {
      case 'Directory': {
        e.resume();
        if (rel !== '') {
          await this.ensureParents(raw, rel);
          if (!(await this.clear(rel, true))) await fs.mkdir(abs, { mode: 0o700 });
          this.okDirs.add(rel);
        }
        await fs.lchown(abs, uid, gid);
        await fs.chmod(abs, mode);
        this.dirTimes.push({ abs, mtime });
        return;
      }
      case 'File':
      case 'OldFile':
      case 'ContiguousFile': {
        if (rel === '') throw unsafe(this.label, raw, 'a file at the layer root');
        await this.ensureParents(raw, rel);
        await this.clear(rel, false);
        const fh = await fs.open(abs, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
        try {
          for await (const chunk of e as AsyncIterable<Buffer>) {
            let off = 0;
            while (off < chunk.length) off += (await fh.write(chunk, off, chunk.length - off)).bytesWritten;
            // the source failed meanwhile: the rest of this entry will never come (and an entry destroyed
            // while no read was pending does not end a later one), so stop here
            if (this.stopped) throw new FlotillaError('INVALID_ARGUMENT', `layer ${this.label}: unpacking stopped`);
          }
          await fh.chown(uid, gid);
          await fh.chmod(mode);
          await fh.utimes(mtime, mtime);
        } finally {
          await fh.close();
        }
        return;
      }
      case 'SymbolicLink': {
        e.resume();
        if (rel === '') throw unsafe(this.label, raw, 'a symlink at the layer root');
        await this.ensureParents(raw, rel);
        await this.clear(rel, false);
        await fs.symlink(e.linkpath ?? '', abs);
        await fs.lchown(abs, uid, gid);
        await fs.lutimes(abs, mtime, mtime);
        return;
      }
      case 'Link': {
        e.resume();
        if (rel === '') throw unsafe(this.label, raw, 'a hardlink at the layer root');
        const targetRel = safeRelative(this.label, e.linkpath ?? '', 'hardlink target', raw);
        if (targetRel === '') throw unsafe(this.label, raw, 'hardlink to the layer root');
        if (targetRel === rel) return;
        await this.ensureParents(e.linkpath ?? '', targetRel, false).catch((err: unknown) => {
          throw unsafe(this.label, raw, `hardlink target ${JSON.stringify(e.linkpath)}: ${errorMessage(err).replace(/^.*?: /, '')}`);
        });
        let st;
        try {
          st = await fs.lstat(this.abs(targetRel));
        } catch {
          throw unsafe(this.label, raw, `hardlink target ${JSON.stringify(e.linkpath)} is not in the layer`);
        }
        if (st.isDirectory()) throw unsafe(this.label, raw, `hardlink target ${JSON.stringify(e.linkpath)} is a directory`);
        await this.ensureParents(raw, rel);
        await this.clear(rel, false);
        await fs.link(this.abs(targetRel), abs);
        return;
      }
      case 'CharacterDevice':
      case 'BlockDevice':
      case 'FIFO': {
        e.resume();
        if (rel === '') throw unsafe(this.label, raw, 'a device at the layer root');
        await this.ensureParents(raw, rel);
        await this.clear(rel, false);
        const kind = e.type === 'FIFO' ? 'p' : e.type === 'CharacterDevice' ? 'c' : 'b';
        const { major, minor } = kind === 'p' ? { major: 0, minor: 0 } : deviceNumbers(this.label, e);
        await mknod(abs, kind, mode, major, minor);
        await fs.lchown(abs, uid, gid);
        await fs.chmod(abs, mode);
        await fs.lutimes(abs, mtime, mtime);
        return;
      }
      default:
        e.resume();
        throw unsafe(this.label, raw, `unsupported tar entry type ${e.type}`);
    }
  }

  async finish(): Promise<void> {
    await setXattr(this.opaque, 'trusted.overlay.opaque', 'y');
    // deepest first, so setting a child's mtime does not disturb its parent's
    for (const d of [...this.dirTimes].reverse()) await fs.utimes(d.abs, d.mtime, d.mtime);
  }
}

/**
 * Unpacks a tar stream (gzip-compressed or not, detected by magic bytes) into target, which must be an
 * existing empty directory. Throws INVALID_ARGUMENT naming the entry on unsafe or corrupt archives; the
 * caller removes target on failure.
 */
export async function unpackTar(source: Readable | Iterable<Buffer> | AsyncIterable<Buffer>, target: string, label = 'archive'): Promise<UnpackResult> {
  const root = path.resolve(target);
  const unpacker = new Unpacker(root, label);
  const { Parser } = await import('tar'); // loaded on first unpack, not by every CLI start
  const parser = new Parser({ strict: true });
  const hash = createHash('sha256');
  let size = 0;
  let failure: unknown;
  let sawEntry = false;
  let chain: Promise<void> = Promise.resolve();
  /** the entry being written: destroyed when the source fails mid-entry, else its data never ends */
  let current: ReadEntry | undefined;
  let rejectFailed: (err: unknown) => void = () => undefined;
  const failed = new Promise<never>((_, reject) => (rejectFailed = reject));
  failed.catch(() => undefined);
  const fail = (err: unknown): void => {
    if (failure === undefined) {
      failure = err;
      rejectFailed(err);
    }
  };

  parser.on('entry', (e: ReadEntry) => {
    sawEntry = true;
    chain = chain.then(async () => {
      if (failure !== undefined) {
        e.resume();
        return;
      }
      try {
        current = e;
        await unpacker.entry(e);
      } catch (err) {
        e.resume();
        fail(err);
      } finally {
        current = undefined;
      }
    });
  });
  parser.on('error', (err: Error) =>
    fail(new FlotillaError('INVALID_ARGUMENT', `layer ${label}: corrupt tar archive: ${err.message.replace(/^TAR_\w+: /, '')}`, { cause: err })),
  );
  const ended = once(parser, 'end');
  ended.catch(() => undefined);

  try {
    for await (const chunk of uncompressed(source, label)) {
      if (failure !== undefined) break;
      hash.update(chunk);
      size += chunk.length;
      if (!parser.write(chunk)) await Promise.race([once(parser, 'drain'), failed]);
    }
    if (failure === undefined) {
      parser.end();
      await Promise.race([ended, failed]);
      await chain;
    }
    if (failure !== undefined) throw failure;
    if (!sawEntry && size > 0) throw new FlotillaError('INVALID_ARGUMENT', `layer ${label}: not a tar archive`);
    await unpacker.finish();
  } catch (err) {
    fail(err);
    unpacker.stopped = true;
    current?.destroy();
    await chain.catch(() => undefined);
    throw failure;
  }
  return { diffId: `sha256:${hash.digest('hex')}`, size };
}

/** Unpacked layers under <data>/snapshots/layers, one directory per layer blob digest. */
export class LayerStore {
  readonly root: string;
  private readonly inflight = new Map<string, Promise<LayerInfo>>();

  private constructor(
    dataDir: string,
    readonly content: ContentStore,
  ) {
    this.root = path.join(dataDir, 'snapshots', 'layers');
  }

  /** Opens the layer store and removes temp directories left by crashed unpacks. */
  static async open(dataDir: string, content: ContentStore): Promise<LayerStore> {
    const s = new LayerStore(path.resolve(dataDir), content);
    await fs.mkdir(s.root, { recursive: true, mode: 0o700 });
    await cleanStale(s.root, '.tmp-');
    return s;
  }

  dir(digest: string): string {
    return path.join(this.root, digestHex(digest, 'layer digest'));
  }

  /** The unpacked file system of a layer (an overlay lowerdir). */
  fsPath(digest: string): string {
    return path.join(this.dir(digest), 'fs');
  }

  /** The layer's metadata if it is unpacked, else undefined. */
  async info(digest: string): Promise<LayerInfo | undefined> {
    try {
      const meta = JSON.parse(await fs.readFile(path.join(this.dir(digest), 'layer.json'), 'utf8')) as UnpackResult;
      return { digest, diffId: meta.diffId, size: meta.size, path: this.fsPath(digest) };
    } catch (err) {
      if (err instanceof FlotillaError) throw err;
      return undefined;
    }
  }

  async has(digest: string): Promise<boolean> {
    return (await this.info(digest)) !== undefined;
  }

  /**
   * Makes sure the layer blob (which must be in the content store) is unpacked; returns where. Concurrent
   * calls for one digest share one unpack. If another process wins the final rename, its copy is used.
   */
  prepare(digest: string): Promise<LayerInfo> {
    digestHex(digest, 'layer digest');
    const running = this.inflight.get(digest);
    if (running) return running;
    const p = this.doPrepare(digest).finally(() => this.inflight.delete(digest));
    this.inflight.set(digest, p);
    return p;
  }

  private async doPrepare(digest: string): Promise<LayerInfo> {
    const existing = await this.info(digest);
    if (existing) return existing;
    const staged = await this.stage(digest, await this.content.openRead(digest));
    await this.commit([staged]);
    const info = await this.info(digest);
    if (!info) throw new FlotillaError('INTERNAL', `layer ${digest} vanished after unpacking`);
    return info;
  }

  /**
   * Unpacks a layer's bytes (the blob, compressed or not) into a temp directory of the store, invisible
   * until commit(); on failure nothing stays behind. The source need not be verified yet: a registry pull
   * streams the blob here while it is downloaded and hashed, and commits the layer only once the blob's
   * digest matched (discard() otherwise). Unpacked data is not synced here: commit() does that once for
   * a batch of layers.
   */
  async stage(digest: string, source: Readable | Iterable<Buffer> | AsyncIterable<Buffer>): Promise<StagedLayer> {
    digestHex(digest, 'layer digest');
    const tmp = path.join(this.root, `.tmp-${tempName()}`);
    await fs.mkdir(path.join(tmp, 'fs'), { recursive: true, mode: 0o700 });
    try {
      await fs.chmod(path.join(tmp, 'fs'), 0o755);
      const result = await unpackTar(source, path.join(tmp, 'fs'), digest);
      await fs.writeFile(path.join(tmp, 'layer.json'), JSON.stringify({ digest, ...result }) + '\n');
      return { digest, tmp, ...result };
    } catch (err) {
      if (typeof (source as Readable).destroy === 'function') (source as Readable).destroy();
      await fs.rm(tmp, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * Makes staged layers durable and visible: one syncfs(2) of the store's file system for the whole batch
   * (cheaper than an fsync per file, and per layer), then each is renamed into place and the directory
   * synced. A layer is thus never visible before its data is on disk. If another unpack of the same
   * digest won the rename, its copy is kept. Staged layers not committed are removed on failure.
   */
  async commit(staged: StagedLayer[]): Promise<void> {
    if (staged.length === 0) return;
    try {
      await syncFs(this.root);
      for (const s of staged) {
        try {
          await fs.rename(s.tmp, this.dir(s.digest));
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
          await fs.rm(s.tmp, { recursive: true, force: true });
        }
      }
      await fsyncDir(this.root);
    } catch (err) {
      await this.discard(staged);
      throw err;
    }
  }

  /** Removes staged layers that will not be committed (a no-op for those already committed). */
  async discard(staged: StagedLayer[]): Promise<void> {
    for (const s of staged) await fs.rm(s.tmp, { recursive: true, force: true });
  }

  /** Removes an unpacked layer (the caller makes sure no image or snapshot uses it). */
  async remove(digest: string): Promise<void> {
    const dir = this.dir(digest);
    const doomed = path.join(this.root, `.tmp-${tempName()}`);
    try {
      await fs.rename(dir, doomed); // atomic: the layer disappears at once
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    await fs.rm(doomed, { recursive: true, force: true });
  }

  /** Digests of all unpacked layers. */
  async list(): Promise<string[]> {
    const names = await fs.readdir(this.root);
    return names.filter((n) => /^[a-f0-9]{64}$/.test(n)).map((n) => `sha256:${n}`);
  }
}
