import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { rawTar } from '../../test/helpers/rawtar.js';
import { ContentStore, sha256Digest } from './content.js';
import { LayerStore, getXattr, unpackTar } from './layers.js';

const isRoot = process.getuid?.() === 0;

describe.skipIf(!isRoot)('layers (needs root: chown, mknod, trusted xattrs)', () => {
  let dir: string;
  let content: ContentStore;
  let layers: LayerStore;

  beforeEach(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-layers-'));
    content = await ContentStore.open(dir);
    layers = await LayerStore.open(dir, content);
  });
  afterEach(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  async function layerOf(buf: Buffer): Promise<string> {
    return (await content.writeBytes(buf)).digest;
  }

  it('unpacks files, modes, owners, symlinks, hardlinks, devices and fifos', async () => {
    const buf = rawTar([
      { path: './', type: 'Directory', mode: 0o755 },
      { path: './bin/', type: 'Directory', mode: 0o711 },
      { path: './bin/tool', body: 'hello', mode: 0o4755, uid: 1000, gid: 1001 },
      { path: './bin/alias', type: 'SymbolicLink', linkpath: '/bin/tool' },
      { path: './bin/hard', type: 'Link', linkpath: './bin/tool' },
      { path: './dev/null', type: 'CharacterDevice', devmaj: 1, devmin: 3, mode: 0o666 },
      { path: './run/fifo', type: 'FIFO', mode: 0o600 },
      { path: 'implicit/dir/file', body: 'x' },
    ]);
    const info = await layers.prepare(await layerOf(buf));
    const fsRoot = info.path;
    expect(info.diffId).toBe(sha256Digest(buf));
    const tool = await fs.lstat(path.join(fsRoot, 'bin/tool'));
    expect(tool.mode & 0o7777).toBe(0o4755);
    expect([tool.uid, tool.gid]).toEqual([1000, 1001]);
    expect(await fs.readFile(path.join(fsRoot, 'bin/tool'), 'utf8')).toBe('hello');
    expect((await fs.lstat(path.join(fsRoot, 'bin'))).mode & 0o7777).toBe(0o711);
    expect(await fs.readlink(path.join(fsRoot, 'bin/alias'))).toBe('/bin/tool');
    expect((await fs.lstat(path.join(fsRoot, 'bin/hard'))).ino).toBe(tool.ino);
    const dev = await fs.lstat(path.join(fsRoot, 'dev/null'));
    expect(dev.isCharacterDevice()).toBe(true);
    expect(dev.rdev).toBe(0x103);
    expect((await fs.lstat(path.join(fsRoot, 'run/fifo'))).isFIFO()).toBe(true);
    expect(await fs.readFile(path.join(fsRoot, 'implicit/dir/file'), 'utf8')).toBe('x');
    // mtimes are kept, directories included
    expect((await fs.lstat(path.join(fsRoot, 'bin'))).mtimeMs).toBe(1_700_000_000_000);
  });

  it('computes the same diff id for a gzip-compressed layer and unpacks it', async () => {
    const entries = [{ path: 'a.txt', body: 'A' }];
    const plain = rawTar(entries);
    const info = await layers.prepare(await layerOf(rawTar(entries, { gzip: true })));
    expect(info.diffId).toBe(sha256Digest(plain));
    expect(await fs.readFile(path.join(info.path, 'a.txt'), 'utf8')).toBe('A');
  });

  it('turns OCI whiteouts into overlay whiteouts and opaque directories', async () => {
    const info = await layers.prepare(
      await layerOf(
        rawTar([
          { path: 'etc/', type: 'Directory' },
          { path: 'etc/.wh.passwd' },
          { path: 'var/cache/', type: 'Directory' },
          { path: 'var/cache/.wh..wh..opq' },
          { path: 'var/cache/new', body: 'n' },
        ]),
      ),
    );
    const wh = await fs.lstat(path.join(info.path, 'etc/passwd'));
    expect(wh.isCharacterDevice()).toBe(true);
    expect(wh.rdev).toBe(0);
    await expect(fs.lstat(path.join(info.path, 'etc/.wh.passwd'))).rejects.toThrow();
    expect(await getXattr(path.join(info.path, 'var/cache'), 'trusted.overlay.opaque')).toBe('y');
    await expect(fs.lstat(path.join(info.path, 'var/cache/.wh..wh..opq'))).rejects.toThrow();
  });

  it('shares one unpack between concurrent prepares', async () => {
    const digest = await layerOf(rawTar([{ path: 'f', body: 'f' }]));
    const [a, b] = await Promise.all([layers.prepare(digest), layers.prepare(digest)]);
    expect(a.path).toBe(b.path);
    expect(await layers.list()).toEqual([digest]);
    expect((await fs.readdir(layers.root)).filter((n) => n.startsWith('.tmp'))).toEqual([]);
  });

  describe('refuses archives that escape the layer, leaving nothing behind', () => {
    let outside: string;
    beforeEach(async () => {
      outside = path.join(dir, 'outside');
      await fs.mkdir(outside);
      await fs.writeFile(path.join(outside, 'secret'), 'secret');
    });

    const cases: [string, () => Parameters<typeof rawTar>[0], RegExp][] = [
      ['a ".." path', () => [{ path: 'ok', body: 'ok' }, { path: '../x', body: 'evil' }], /refusing entry "\.\.\/x": path has a "\.\." component/],
      ['an absolute path', () => [{ path: '/etc/x', body: 'evil' }], /refusing entry "\/etc\/x": absolute path/],
      [
        'a file written through a symlink to outside',
        () => [
          { path: 'evil', type: 'SymbolicLink', linkpath: outside },
          { path: 'evil/x', body: 'evil' },
        ],
        /refusing entry "evil\/x": "evil" is a symlink/,
      ],
      [
        'a file written through a relative symlink',
        () => [
          { path: 'up', type: 'SymbolicLink', linkpath: '../../../..' },
          { path: 'up/tmp/x', body: 'evil' },
        ],
        /refusing entry "up\/tmp\/x": "up" is a symlink/,
      ],
      ['a hardlink to an absolute path', () => [{ path: 'h', type: 'Link', linkpath: path.join(outside, 'secret') }], /refusing entry "h": absolute hardlink target ".*outside\/secret"/],
      ['a hardlink escaping with ..', () => [{ path: 'h', type: 'Link', linkpath: '../../outside/secret' }], /refusing entry "h": hardlink target "\.\.\/\.\.\/outside\/secret" has a "\.\." component/],
      [
        'a hardlink through a symlink',
        () => [
          { path: 'l', type: 'SymbolicLink', linkpath: outside },
          { path: 'h', type: 'Link', linkpath: 'l/secret' },
        ],
        /refusing entry "h": hardlink target "l\/secret": .*symlink/,
      ],
    ];
    for (const [what, entries, message] of cases) {
      it(what, async () => {
        const digest = await layerOf(rawTar(entries()));
        await expect(layers.prepare(digest)).rejects.toThrow(message);
        expect(await fs.readdir(layers.root)).toEqual([]);
        expect((await fs.readdir(outside)).sort()).toEqual(['secret']);
        expect(await fs.readFile(path.join(outside, 'secret'), 'utf8')).toBe('secret');
        await expect(fs.lstat(path.join(dir, 'x'))).rejects.toThrow();
      });
    }
  });

  it('stops promptly on a bad entry at the start of a large gzip layer', async () => {
    const big = rawTar([{ path: '../x', body: 'evil' }, { path: 'big', body: randomBytes(8 * 1024 * 1024) }], { gzip: true });
    const digest = await layerOf(big);
    await expect(layers.prepare(digest)).rejects.toThrow(/refusing entry "\.\.\/x"/);
    expect(await fs.readdir(layers.root)).toEqual([]);
  });

  it('gives a clear error for a corrupt archive and leaves nothing behind', async () => {
    const good = rawTar([{ path: 'f', body: 'x'.repeat(5000) }]);
    const garbage = Buffer.from('this is not a tar archive at all, just some text. '.repeat(30));
    await expect(layers.prepare(await layerOf(garbage))).rejects.toThrow(/corrupt tar archive|not a tar archive/);
    const truncatedGzip = rawTar([{ path: 'f', body: 'x'.repeat(5000) }], { gzip: true }).subarray(0, 30);
    await expect(layers.prepare(await layerOf(truncatedGzip))).rejects.toThrow(/corrupt gzip data|corrupt tar/);
    const truncated = good.subarray(0, 1024);
    await expect(layers.prepare(await layerOf(truncated))).rejects.toThrow(/corrupt tar archive/);
    expect(await fs.readdir(layers.root)).toEqual([]);
  });

  it('a gzip stream that breaks in the middle of a file: refused promptly, the staged layer removed', async () => {
    // the failure comes from the source (gunzip) while an entry is being written: the entry must be
    // ended, or the unpack waits forever for the rest of its data
    const gz = rawTar([{ path: 'big', body: randomBytes(2 * 1024 * 1024) }], { gzip: true });
    const bad = Buffer.from(gz);
    bad[64 * 1024] = (bad[64 * 1024] ?? 0) ^ 0xff;
    const digest = sha256Digest(gz);
    // small chunks (the error while a read of the entry is pending) and big ones (while it is written)
    for (const size of [16 * 1024, 4 * 1024 * 1024]) {
      const chunks = (async function* () {
        for (let o = 0; o < bad.length; o += size) yield bad.subarray(o, o + size);
      })();
      const t = Date.now();
      await expect(layers.stage(digest, chunks)).rejects.toThrow(/corrupt gzip data/);
      expect(Date.now() - t).toBeLessThan(5000);
      expect(await fs.readdir(layers.root)).toEqual([]);
      expect(await layers.has(digest)).toBe(false);
    }
  });

  it('stage + commit: invisible until committed, discard removes it', async () => {
    const buf = rawTar([{ path: 'f', body: 'staged' }]);
    const digest = sha256Digest(buf);
    const staged = await layers.stage(digest, [buf]);
    expect(await layers.has(digest)).toBe(false);
    expect(await layers.list()).toEqual([]);
    await layers.commit([staged]);
    expect(await layers.has(digest)).toBe(true);
    expect(await fs.readFile(path.join(layers.fsPath(digest), 'f'), 'utf8')).toBe('staged');
    await layers.discard([staged]); // a no-op once committed
    expect(await layers.has(digest)).toBe(true);
    const other = rawTar([{ path: 'g', body: 'dropped' }]);
    const dropped = await layers.stage(sha256Digest(other), [other]);
    await layers.discard([dropped]);
    expect((await fs.readdir(layers.root)).sort()).toEqual([digest.slice(7)]);
  });

  it('refuses a GNU-format device entry rather than turning it into a whiteout', async () => {
    const src = path.join(dir, 'src');
    await fs.mkdir(path.join(src, 'dev'), { recursive: true });
    execFileSync('mknod', [path.join(src, 'dev/null'), 'c', '1', '3']);
    const gnu = execFileSync('tar', ['-C', src, '--format=gnu', '-cf', '-', 'dev']);
    await expect(layers.prepare(await layerOf(gnu))).rejects.toThrow(/refusing entry "dev\/null": device numbers are not readable/);
    const posix = execFileSync('tar', ['-C', src, '--format=posix', '-cf', '-', 'dev']);
    const info = await layers.prepare(await layerOf(posix));
    expect((await fs.lstat(path.join(info.path, 'dev/null'))).rdev).toBe(0x103);
  });

  it('unpackTar refuses zstd layers by magic', async () => {
    const target = path.join(dir, 't');
    await fs.mkdir(target);
    const zstd = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]);
    await expect(unpackTar([zstd], target, 'z')).rejects.toThrow(/zstd-compressed layers are not supported/);
  });
});
