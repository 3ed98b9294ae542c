/**
 * The image half of the node runtime against the real kernel: imports of the three source formats,
 * lookups, shared layers, overlay snapshots mounted with mountAll, whiteouts, removal rules.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import * as tar from 'tar';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { RuncRuntime } from '../agent/runtime/containers.js';
import { ImageStore } from '../agent/runtime/images.js';
import { isMounted, mountAll, unmount } from '../agent/runtime/mount.js';
import { buildBusyboxRootfs, importBusybox } from './helpers/busybox.js';
import { rawTar } from './helpers/rawtar.js';
import { mountsUnder, removeRunRoots } from './helpers/runtime-debris.js';

const isRoot = process.getuid?.() === 0;
const sha = (b: Buffer | string): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const HEALTHCHECK = { Test: ['CMD-SHELL', 'test -e /tmp/ok'], Interval: 5_000_000_000, Timeout: 2_000_000_000, StartPeriod: 1_500_000_000, Retries: 4 };
const CONFIG = {
  Entrypoint: ['/bin/sh', '-c'],
  Cmd: ['echo hi'],
  Env: ['PATH=/bin', 'GREETING=hello world'],
  WorkingDir: '/tmp',
  User: 'nobody',
  Healthcheck: HEALTHCHECK,
};

interface Layer {
  bytes: Buffer;
  diffId: string;
}

async function tarDir(dir: string, gzip: boolean): Promise<Layer> {
  const file = `${dir}.layer.tar`;
  await tar.c({ cwd: dir, file, gzip, portable: false }, ['.']);
  const bytes = await fs.readFile(file);
  await fs.rm(file);
  return { bytes, diffId: sha(gzip ? gunzipSync(bytes) : bytes) };
}

function configJson(layers: Layer[]): Buffer {
  return Buffer.from(
    JSON.stringify({
      created: '2024-05-01T12:00:00Z',
      architecture: 'amd64',
      os: 'linux',
      config: CONFIG,
      rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
    }),
  );
}

/** Writes an OCI image layout of these layers into dir; returns the manifest digest. */
async function writeOciLayout(dir: string, layers: Layer[], tag: string): Promise<string> {
  await fs.mkdir(path.join(dir, 'blobs/sha256'), { recursive: true });
  const put = async (b: Buffer): Promise<{ digest: string; size: number }> => {
    const digest = sha(b);
    await fs.writeFile(path.join(dir, 'blobs/sha256', digest.slice(7)), b);
    return { digest, size: b.length };
  };
  const cfg = await put(configJson(layers));
  const descs = [];
  for (const l of layers) descs.push({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...(await put(l.bytes)) });
  const manifest = Buffer.from(
    JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg }, layers: descs }),
  );
  const m = await put(manifest);
  await fs.writeFile(path.join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  await fs.writeFile(
    path.join(dir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...m, annotations: { 'org.opencontainers.image.ref.name': tag } }],
    }),
  );
  return m.digest;
}

/** Writes a docker-archive (docker save format, layers as <id>/layer.tar) into dir. */
async function writeDockerArchive(dir: string, layers: Layer[], repoTag: string): Promise<string> {
  await fs.mkdir(dir, { recursive: true });
  const cfg = configJson(layers);
  const cfgName = `${sha(cfg).slice(7)}.json`;
  await fs.writeFile(path.join(dir, cfgName), cfg);
  const names = [];
  for (const [i, l] of layers.entries()) {
    const id = sha(`layer${i}`).slice(7);
    await fs.mkdir(path.join(dir, id));
    await fs.writeFile(path.join(dir, id, 'layer.tar'), l.bytes);
    names.push(`${id}/layer.tar`);
  }
  await fs.writeFile(path.join(dir, 'manifest.json'), JSON.stringify([{ Config: cfgName, RepoTags: [repoTag], Layers: names }]));
  return sha(cfg);
}

async function tarUp(dir: string, file: string): Promise<void> {
  await tar.c({ cwd: dir, file, portable: true }, await fs.readdir(dir));
}

describe.skipIf(!isRoot)('runtime images and snapshots (needs root: overlayfs, mknod, chown)', () => {
  let work: string;
  let rootfs: string;
  let busyboxLayer: Layer;
  let upperLayer: Layer;

  beforeAll(async () => {
    work = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-img-src-'));
    rootfs = path.join(work, 'rootfs');
    await buildBusyboxRootfs(rootfs);
    await fs.mkdir(path.join(rootfs, 'data'));
    await fs.writeFile(path.join(rootfs, 'data/keep'), 'lower');
    await fs.mkdir(path.join(rootfs, 'opq'));
    await fs.writeFile(path.join(rootfs, 'opq/a'), 'a');
    await fs.writeFile(path.join(rootfs, 'opq/b'), 'b');
    busyboxLayer = await tarDir(rootfs, true);
    const upper = rawTar([
      { path: 'data/', type: 'Directory' },
      { path: 'data/.wh.keep' },
      { path: 'opq/', type: 'Directory' },
      { path: 'opq/.wh..wh..opq' },
      { path: 'opq/c', body: 'c' },
    ]);
    upperLayer = { bytes: upper, diffId: sha(upper) };
  });
  afterAll(async () => {
    await fs.rm(work, { recursive: true, force: true });
  });

  let dataDir: string;
  let store: ImageStore;
  const mounted: string[] = [];
  beforeEach(async () => {
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-img-'));
    store = await ImageStore.open(dataDir);
  });
  afterEach(async () => {
    for (const m of mounted.splice(0)) await unmount(m);
    await fs.rm(dataDir, { recursive: true, force: true });
    removeRunRoots(dataDir);
  });

  async function mountSnapshot(key: string, ref: string): Promise<string> {
    const mounts = await store.snapshots.prepare(key, await store.get(ref));
    const target = store.snapshots.mountpoint(key);
    await mountAll(mounts, target);
    mounted.push(target);
    return target;
  }

  function expectConfig(cfg: Awaited<ReturnType<ImageStore['get']>>['config']): void {
    expect(cfg).toEqual({
      entrypoint: ['/bin/sh', '-c'],
      cmd: ['echo hi'],
      env: ['PATH=/bin', 'GREETING=hello world'],
      workingDir: '/tmp',
      user: 'nobody',
      healthcheck: { test: ['CMD-SHELL', 'test -e /tmp/ok'], intervalMs: 5000, timeoutMs: 2000, startPeriodMs: 1500, retries: 4 },
    });
  }

  it('imports an OCI layout (directory and tar) and honours its config', async () => {
    const layout = path.join(work, 'oci');
    await fs.rm(layout, { recursive: true, force: true });
    const digest = await writeOciLayout(layout, [busyboxLayer], 'v1');
    const img = await store.import('test/oci:v1', layout);
    expect(img.digest).toBe(digest);
    expect(img.name).toBe('test/oci:v1');
    expect(img.layers).toEqual([sha(busyboxLayer.bytes)]);
    expect(img.diffIds).toEqual([busyboxLayer.diffId]);
    expect(img.size).toBe(busyboxLayer.bytes.length);
    expect(img.created).toBe(Date.parse('2024-05-01T12:00:00Z'));
    expectConfig(img.config);
    expect(await store.content.has(digest)).toBe(true);
    expect(await store.content.has(img.configDigest)).toBe(true);

    const file = path.join(work, 'oci.tar');
    await tarUp(layout, file);
    const fromTar = await store.import('test/oci-tar', file);
    expect(fromTar.digest).toBe(digest);
    expect(fromTar.name).toBe('test/oci-tar:latest');
    expect(await fs.readdir(path.join(dataDir, 'tmp'))).toEqual([]);
  });

  it('imports a docker-archive (tar, two layers) with its config and healthcheck, and whiteouts apply', async () => {
    const archive = path.join(work, 'docker');
    await fs.rm(archive, { recursive: true, force: true });
    const configDigest = await writeDockerArchive(archive, [busyboxLayer, upperLayer], 'test/docker:v2');
    const file = path.join(work, 'docker.tar');
    await tarUp(archive, file);
    const img = await store.import('test/docker:v2', file);
    expect(img.configDigest).toBe(configDigest);
    expect(img.layers).toEqual([sha(busyboxLayer.bytes), sha(upperLayer.bytes)]);
    expectConfig(img.config);
    // the image id (config digest) works as a reference too
    expect((await store.get(configDigest)).digest).toBe(img.digest);

    const root = await mountSnapshot('multi', 'test/docker:v2');
    expect((await fs.stat(path.join(root, 'bin/busybox'))).isFile()).toBe(true);
    await expect(fs.lstat(path.join(root, 'data/keep'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect((await fs.readdir(path.join(root, 'opq'))).sort()).toEqual(['c']);
    // the lower layer still has them
    const lower = store.layers.fsPath(img.layers[0]!);
    expect(await fs.readFile(path.join(lower, 'data/keep'), 'utf8')).toBe('lower');
    expect((await fs.readdir(path.join(lower, 'opq'))).sort()).toEqual(['a', 'b']);
  });

  it('imports a newer docker-archive (layers under blobs/sha256, gzip-compressed tar, shared layer symlinked)', async () => {
    const archive = path.join(work, 'docker-blobs');
    await fs.rm(archive, { recursive: true, force: true });
    await fs.mkdir(path.join(archive, 'blobs/sha256'), { recursive: true });
    const cfg = configJson([busyboxLayer, upperLayer]);
    await fs.writeFile(path.join(archive, 'blobs/sha256', sha(cfg).slice(7)), cfg);
    const names = [];
    for (const l of [busyboxLayer, upperLayer]) {
      await fs.writeFile(path.join(archive, 'blobs/sha256', sha(l.bytes).slice(7)), l.bytes);
      names.push(`blobs/sha256/${sha(l.bytes).slice(7)}`);
    }
    // docker save links a layer shared by two images
    await fs.mkdir(path.join(archive, 'shared'));
    await fs.symlink(`../${names[1]}`, path.join(archive, 'shared/layer.tar'));
    names[1] = 'shared/layer.tar';
    await fs.writeFile(
      path.join(archive, 'manifest.json'),
      JSON.stringify([
        { Config: `blobs/sha256/${sha(cfg).slice(7)}`, RepoTags: ['other:1'], Layers: names.slice(0, 1) },
        { Config: `blobs/sha256/${sha(cfg).slice(7)}`, RepoTags: ['test/new:v3'], Layers: names },
      ]),
    );
    const file = path.join(work, 'docker-blobs.tar.gz');
    await tar.c({ cwd: archive, file, gzip: true }, await fs.readdir(archive));
    const img = await store.import('test/new:v3', file);
    expect(img.configDigest).toBe(sha(cfg));
    expect(img.layers).toEqual([sha(busyboxLayer.bytes), sha(upperLayer.bytes)]);
    expectConfig(img.config);
    // a symlink pointing out of the archive is refused
    await fs.rm(path.join(archive, 'shared/layer.tar'));
    await fs.symlink('/etc/passwd', path.join(archive, 'shared/layer.tar'));
    await expect(store.import('test/new:v3', archive)).rejects.toThrow(/shared\/layer\.tar points outside the archive/);
  });

  it('imports a root file system directory (one layer, generated config)', async () => {
    const img = await store.import('busybox', rootfs, { config: { cmd: ['sh'] } });
    expect(img.name).toBe('busybox:latest');
    expect(img.layers).toHaveLength(1);
    expect(img.config).toEqual({ entrypoint: [], cmd: ['sh'], env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], workingDir: '', user: '' });
    const manifest = await store.manifest('busybox');
    expect(manifest.layers[0]?.mediaType).toBe('application/vnd.oci.image.layer.v1.tar+gzip');
    const lower = store.layers.fsPath(img.layers[0]!);
    expect((await fs.lstat(path.join(lower, 'tmp'))).mode & 0o7777).toBe(0o1777);
    expect(await fs.readlink(path.join(lower, 'bin/sh'))).toBe('busybox');
    expect(await fs.readFile(path.join(lower, 'etc/passwd'), 'utf8')).toContain('nobody:x:65534:65534');
  });

  it('a root file system import is reproducible: the same directory gives the same digest in another store, later', async () => {
    const img = await store.import('busybox', rootfs, { config: { cmd: ['sh'] } });
    await new Promise((r) => setTimeout(r, 1100)); // a second later: no time of the import itself may enter it
    const otherDir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-img-repro-'));
    const other = await ImageStore.open(otherDir);
    try {
      const again = await other.import('busybox', rootfs, { config: { cmd: ['sh'] } });
      expect(again.digest).toBe(img.digest);
      // a copy of the tree made at another time differs, unless SOURCE_DATE_EPOCH clamps the times
      const copy = path.join(work, 'copy');
      execFileSync('cp', ['-a', rootfs, copy]);
      execFileSync('touch', [copy, path.join(copy, 'etc/passwd')]);
      expect((await other.import('bb-copy', copy, { config: { cmd: ['sh'] } })).digest).not.toBe(img.digest);
      process.env.SOURCE_DATE_EPOCH = '1000000000';
      try {
        const a = await other.import('bb-a', rootfs, { config: { cmd: ['sh'] } });
        const b = await other.import('bb-b', copy, { config: { cmd: ['sh'] } });
        expect(b.digest).toBe(a.digest);
      } finally {
        delete process.env.SOURCE_DATE_EPOCH;
        await fs.rm(copy, { recursive: true, force: true });
      }
    } finally {
      await fs.rm(otherDir, { recursive: true, force: true }).catch(() => undefined);
    }
  });

  it('a root file system import keeps devices, fifos and hardlinks (sockets are skipped)', async () => {
    const dir = path.join(work, 'special');
    await fs.rm(dir, { recursive: true, force: true });
    await fs.mkdir(path.join(dir, 'dev'), { recursive: true });
    execFileSync('mknod', ['-m', '666', path.join(dir, 'dev/null'), 'c', '1', '3']);
    execFileSync('mknod', [path.join(dir, 'fifo'), 'p']);
    execFileSync('python3', ['-c', `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(path.join(dir, 'sock'))})`]);
    await fs.writeFile(path.join(dir, 'f'), 'f');
    await fs.link(path.join(dir, 'f'), path.join(dir, 'f2'));
    await fs.chown(path.join(dir, 'f'), 123, 456);
    const img = await store.import('special', dir);
    const lower = store.layers.fsPath(img.layers[0]!);
    const dev = await fs.lstat(path.join(lower, 'dev/null'));
    expect(dev.isCharacterDevice() && dev.rdev === 0x103).toBe(true);
    expect((await fs.lstat(path.join(lower, 'fifo'))).isFIFO()).toBe(true);
    const f = await fs.lstat(path.join(lower, 'f'));
    expect([f.uid, f.gid]).toEqual([123, 456]);
    expect((await fs.lstat(path.join(lower, 'f2'))).ino).toBe(f.ino);
    await expect(fs.lstat(path.join(lower, 'sock'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('finds images by name, full digest and unique digest prefix; validates names', async () => {
    const img = await importBusybox(dataDir);
    expect((await store.get('busybox')).digest).toBe(img.digest);
    expect((await store.get('busybox:latest')).digest).toBe(img.digest);
    expect((await store.get(img.digest)).name).toBe('busybox:latest');
    expect((await store.get(img.digest.slice(7, 19))).name).toBe('busybox:latest');
    expect((await store.get(img.digest.slice(0, 19))).name).toBe('busybox:latest');
    expect((await store.list()).map((i) => i.name)).toEqual(['busybox:latest']);
    await expect(store.get('nope')).rejects.toMatchObject({ code: 'NOT_FOUND', message: 'image "nope" not found' });
    await expect(store.get(`sha256:${'0'.repeat(64)}`)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    for (const bad of ['BusyBox', 'busy box', 'a:b:c', '-x', 'x/', 'x:', 'x:-bad']) {
      await expect(store.import(bad, rootfs)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringContaining(`invalid image name ${JSON.stringify(bad)}`) });
    }
    await expect(store.import('ok', path.join(work, 'missing'))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/no such file/) });
  });

  it('two snapshots share one unpacked layer; writes and deletes stay private', async () => {
    const img = await importBusybox(dataDir);
    const a = await mountSnapshot('a', 'busybox');
    const b = await mountSnapshot('b', 'busybox');
    expect(await store.layers.list()).toEqual(img.layers);
    expect((await fs.readdir(store.layers.root)).filter((n) => !n.startsWith('.'))).toHaveLength(1);
    const lower = store.layers.fsPath(img.layers[0]!);
    const ino = (await fs.stat(path.join(lower, 'bin/busybox'))).ino;
    expect((await fs.stat(path.join(a, 'bin/busybox'))).ino).toBe(ino);
    expect((await fs.stat(path.join(b, 'bin/busybox'))).ino).toBe(ino);

    await fs.writeFile(path.join(a, 'tmp/private'), 'mine');
    await fs.writeFile(path.join(a, 'etc/passwd'), 'changed');
    await expect(fs.access(path.join(b, 'tmp/private'))).rejects.toThrow();
    await expect(fs.access(path.join(lower, 'tmp/private'))).rejects.toThrow();
    expect(await fs.readFile(path.join(b, 'etc/passwd'), 'utf8')).toContain('root:x:0:0');
    expect(await fs.readFile(path.join(lower, 'etc/passwd'), 'utf8')).toContain('root:x:0:0');
    expect(await fs.readFile(path.join(dataDir, 'snapshots/containers/a/upper/tmp/private'), 'utf8')).toBe('mine');

    // deleting a lower-layer file inside a mounted rootfs leaves a whiteout in that snapshot's upper dir
    await fs.rm(path.join(a, 'bin/ls'));
    await expect(fs.lstat(path.join(a, 'bin/ls'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect((await fs.lstat(path.join(b, 'bin/ls'))).isSymbolicLink()).toBe(true);
    expect((await fs.lstat(path.join(lower, 'bin/ls'))).isSymbolicLink()).toBe(true);
    const wh = await fs.lstat(path.join(dataDir, 'snapshots/containers/a/upper/bin/ls'));
    expect(wh.isCharacterDevice() && wh.rdev === 0).toBe(true);

    await expect(store.snapshots.prepare('a', img)).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
    // remove unmounts as needed and is idempotent
    await store.snapshots.remove('a');
    expect(await isMounted(a)).toBe(false);
    await store.snapshots.remove('a');
    expect((await store.snapshots.list()).map((s) => s.key)).toEqual(['b']);
  });

  it('image rm is refused while in use, then removes blobs and layers no other image uses', async () => {
    const img = await importBusybox(dataDir);
    await store.snapshots.prepare('user', img);
    await expect(store.remove('busybox')).rejects.toMatchObject({ code: 'FAILED_PRECONDITION', message: expect.stringMatching(/in use by a container \(snapshot user\)/) });
    await store.snapshots.remove('user');
    await expect(store.remove('busybox', { inUse: (d) => d === img.digest })).rejects.toMatchObject({ code: 'FAILED_PRECONDITION' });

    // a second name for the same content: removing one name keeps the content
    const again = await store.import('other:v1', rootfs, { config: { cmd: ['sh'] } });
    const removed = await store.remove('busybox', { inUse: () => false });
    expect(removed.map((r) => r.name)).toEqual(['busybox:latest']);
    await expect(store.get('busybox')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    // everything of busybox that 'other' does not share is gone
    const left = new Set(await store.content.list());
    expect(left.has(img.digest)).toBe(false);
    expect(left.has(again.digest)).toBe(true);
    for (const l of again.layers) expect(left.has(l)).toBe(true);
    await store.remove(again.digest);
    expect(await store.content.list()).toEqual([]);
    expect(await store.layers.list()).toEqual([]);
    expect(await store.list()).toEqual([]);
  });

  it('re-importing a name keeps what a snapshot of the old image uses until prune', async () => {
    const old = await importBusybox(dataDir);
    await store.snapshots.prepare('old-user', old);
    const fresh = await store.import('busybox', rootfs, { config: { cmd: ['sh'] } });
    expect(fresh.digest).not.toBe(old.digest);
    expect((await store.get('busybox')).digest).toBe(fresh.digest);
    // the old image is gone as a record, its unpacked layer stays for the snapshot
    expect(await store.layers.has(old.layers[0]!)).toBe(true);
    expect(await store.content.has(old.digest)).toBe(false);
    expect(await store.prune()).toEqual({ blobs: [], layers: [] });
    await store.snapshots.remove('old-user');
    expect(await store.prune()).toEqual({ blobs: [], layers: [old.layers[0]] });
    expect(await store.layers.list()).toEqual(fresh.layers);
  });

  it('a corrupt or malicious archive gives a clear error and leaves nothing behind', async () => {
    const corrupt = path.join(work, 'corrupt.tar');
    await fs.writeFile(corrupt, Buffer.from('garbage, not a tar '.repeat(100)));
    await expect(store.import('bad', corrupt)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/image source .*corrupt\.tar.*not a readable tar archive/) });

    const evil = rawTar([{ path: 'ok', body: 'ok' }, { path: '../escape', body: 'evil' }], { gzip: true });
    const layout = path.join(work, 'evil-oci');
    await fs.rm(layout, { recursive: true, force: true });
    await writeOciLayout(layout, [{ bytes: evil, diffId: sha(gunzipSync(evil)) }], 'latest');
    await expect(store.import('evil', layout)).rejects.toThrow(/refusing entry "\.\.\/escape"/);

    // a layer whose content does not match its digest in the layout
    const tampered = path.join(work, 'tampered-oci');
    await fs.rm(tampered, { recursive: true, force: true });
    await writeOciLayout(tampered, [busyboxLayer], 'latest');
    const blob = path.join(tampered, 'blobs/sha256', sha(busyboxLayer.bytes).slice(7));
    await fs.appendFile(blob, 'x');
    await expect(store.import('tampered', tampered)).rejects.toThrow(/content size mismatch|digest mismatch/);

    expect(await store.list()).toEqual([]);
    expect(await store.content.list()).toEqual([]);
    expect(await store.layers.list()).toEqual([]);
    expect((await fs.readdir(store.layers.root)).length).toBe(0);
    expect(await fs.readdir(path.join(dataDir, 'tmp'))).toEqual([]);
    expect(await fs.readdir(path.join(dataDir, 'content/ingest'))).toEqual([]);
  });

  it('mounts an image with many layers (options over a page use relative lowerdirs)', async () => {
    const layers: Layer[] = [busyboxLayer];
    for (let i = 0; i < 50; i++) {
      const t = rawTar([{ path: `layer${i}`, body: String(i) }]);
      layers.push({ bytes: t, diffId: sha(t) });
    }
    const layout = path.join(work, 'many');
    await fs.rm(layout, { recursive: true, force: true });
    await writeOciLayout(layout, layers, 'latest');
    await store.import('many', layout);
    const mounts = await store.snapshots.prepare('many', await store.get('many'));
    expect(mounts[0]!.options.join(',').length).toBeGreaterThan(4096);
    const target = store.snapshots.mountpoint('many');
    await mountAll(mounts, target);
    mounted.push(target);
    expect(await fs.readFile(path.join(target, 'layer49'), 'utf8')).toBe('49');
    expect(await fs.readFile(path.join(target, 'layer0'), 'utf8')).toBe('0');
    await unmount(target);
    await unmount(target);
    expect(await isMounted(target)).toBe(false);
  });
  it('runs containers from layered images: USER and the command are found across layers; runc mounts the root', async () => {
    // top layer: a user of its own and a script; busybox (with /bin/sh) only in the bottom layer
    const app = rawTar([
      { path: 'etc/', type: 'Directory' },
      { path: 'etc/passwd', body: 'root:x:0:0:root:/root:/bin/sh\napp:x:1234:4321:app:/home/app:/bin/sh\n' },
      { path: 'etc/group', body: 'root:x:0:\napp:x:4321:\nextra:x:777:app\n' },
      { path: 'app/', type: 'Directory' },
      { path: 'app/hello', body: '#!/bin/sh\necho "hello $(id -u):$(id -g) $(id -G)"; cat /data/keep 2>&1; ls /opq\n', mode: 0o755 },
    ]);
    const layered = path.join(work, 'layered');
    await fs.rm(layered, { recursive: true, force: true });
    await writeOciLayout(layered, [busyboxLayer, upperLayer, { bytes: app, diffId: sha(app) }], 'latest');
    await store.import('layered', layered);
    // many layers: the overlay options do not fit in a page, so this one is mounted on the host
    const many: Layer[] = [busyboxLayer];
    for (let i = 0; i < 45; i++) {
      const t = rawTar([{ path: `layer${i}`, body: String(i) }]);
      many.push({ bytes: t, diffId: sha(t) });
    }
    const manyDir = path.join(work, 'many60');
    await fs.rm(manyDir, { recursive: true, force: true });
    await writeOciLayout(manyDir, many, 'latest');
    await store.import('many60', manyDir);

    const rt = await RuncRuntime.open(dataDir);
    try {
      const runIt = async (name: string, image: string, command: string[], user?: string) => {
        const c = await rt.create({ name, image, entrypoint: command, user, workdir: '/work/dir' });
        await rt.start(c.id);
        const exit = await rt.wait(c.id);
        const logs: string[] = [];
        for await (const l of rt.logs(c.id)) logs.push(l.line);
        return { c, exit, out: logs.join('\n') };
      };
      const a = await runIt('layered-a', 'layered', ['/app/hello'], 'app');
      expect(a.exit.exitCode).toBe(0);
      expect(a.out).toContain('hello 1234:4321 4321 777');
      expect(a.out).toMatch(/No such file/); // data/keep whited out by the middle layer
      expect(a.out).toContain('c');
      // a second container of the same image and inputs takes the cached lookups; a wrong user still fails
      expect((await runIt('layered-b', 'layered', ['/app/hello'], 'app')).exit.exitCode).toBe(0);
      await expect(rt.create({ name: 'layered-c', image: 'layered', entrypoint: ['/app/hello'], user: 'nobody' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
      await expect(rt.create({ name: 'layered-d', image: 'layered', entrypoint: ['nosuch'], user: 'root' })).rejects.toThrow(/executable file not found: nosuch/);
      // runc made the root mount inside the container: nothing mounted on the host (the image view is gone too)
      const sleeper = await rt.create({ name: 'layered-e', image: 'layered', entrypoint: ['sleep', '100'], user: '0' });
      await rt.start(sleeper.id);
      expect((await rt.inspect(sleeper.id)).rootfs).toBe(`/proc/${sleeper.pid}/root`);
      expect(await fs.readFile(`/proc/${sleeper.pid}/root/app/hello`, 'utf8')).toContain('hello');
      expect(mountsUnder(dataDir)).toEqual([]);

      const m = await rt.create({ name: 'many', image: 'many60', entrypoint: ['sh', '-c', 'cat /layer0 /layer44'], user: 'nobody' });
      expect(mountsUnder(rt.runRoot)).toEqual([path.join(rt.runRoot, 'containers', m.id, 'rootfs')]);
      await rt.start(m.id);
      expect((await rt.wait(m.id)).exitCode).toBe(0);
      const out: string[] = [];
      for await (const l of rt.logs(m.id)) out.push(l.line);
      expect(out.join('')).toBe('044');
      for (const c of await rt.list()) await rt.remove(c.id, true);
      expect(mountsUnder(dataDir)).toEqual([]);
      expect(mountsUnder(rt.runRoot)).toEqual([]);
      expect(await fs.readdir(store.snapshots.root)).toEqual([]);
    } finally {
      for (const c of await rt.list()) await rt.remove(c.id, true).catch(() => undefined);
      rt.close();
    }
  });
});
