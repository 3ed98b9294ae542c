/**
 * `flotilla image prune [-a]` on a node's data dir (the built CLI against a real image store): a plain
 * prune collects the blobs and unpacked layers no image uses; -a also removes every image no container
 * uses; a layer shared with a remaining image stays.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageStore } from '../agent/runtime/images.js';
import { rawTar } from './helpers/rawtar.js';
import { CLI } from './helpers/testbed.js';

const root = process.getuid?.() === 0;
const built = fs.existsSync(CLI);
if (!root || !built) process.stderr.write(`image prune tests skipped: they need root and a built CLI${root ? '' : ' (not root)'}\n`);

const sha = (b: Buffer | string): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { timeout: 30_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }),
    );
  });
}

/** An OCI layout with images a:1 (layer L) and b:1 (layers L and M): L is shared. */
function layout(dir: string): { shared: string; own: string } {
  const blobs = path.join(dir, 'blobs', 'sha256');
  fs.mkdirSync(blobs, { recursive: true });
  const put = (b: Buffer | string): { digest: string; size: number } => {
    const buf = Buffer.from(b);
    const d = sha(buf);
    fs.writeFileSync(path.join(blobs, d.slice(7)), buf);
    return { digest: d, size: buf.length };
  };
  const layer = (name: string, body: string): { desc: { mediaType: string; digest: string; size: number }; diffId: string } => {
    const t = rawTar([{ path: name, body }]);
    return { desc: { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...put(gzipSync(t)) }, diffId: sha(t) };
  };
  const L = layer('shared.txt', 'shared\n');
  const M = layer('own.txt', 'own\n');
  const image = (ref: string, layers: (typeof L)[]): Record<string, unknown> => {
    const cfg = put(JSON.stringify({ architecture: 'amd64', os: 'linux', config: { Cmd: ['sh'] }, rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) } }));
    const m = put(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg },
        layers: layers.map((l) => l.desc),
      }),
    );
    return { mediaType: 'application/vnd.oci.image.manifest.v1+json', ...m, annotations: { 'org.opencontainers.image.ref.name': ref } };
  };
  fs.writeFileSync(path.join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  fs.writeFileSync(path.join(dir, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: [image('a:1', [L]), image('b:1', [L, M])] }));
  return { shared: L.desc.digest, own: M.desc.digest };
}

describe.skipIf(!root || !built)('image prune (CLI)', () => {
  let tmp = '';
  let data = '';
  let src = '';
  let layers: { shared: string; own: string };

  beforeAll(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-prune-'));
    data = path.join(tmp, 'data');
    src = path.join(tmp, 'layout');
    layers = layout(src);
  });
  afterAll(() => {
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const unpacked = (d: string): boolean => fs.existsSync(path.join(data, 'snapshots', 'layers', d.slice(7)));
  const blob = (d: string): boolean => fs.existsSync(path.join(data, 'content', 'blobs', 'sha256', d.slice(7)));

  it('-a removes the images no container uses; a layer shared with a remaining image stays', async () => {
    for (const ref of ['a:1', 'b:1']) expect((await cli(['image', 'import', '--data-dir', data, ref, src])).code).toBe(0);
    // a container's snapshot uses a:1
    const store = await ImageStore.open(data);
    await store.snapshots.prepare('ctr1', await store.get('a:1'));

    // plain prune: every image is named, nothing is unreferenced
    const plain = await cli(['image', 'prune', '--data-dir', data, '--format', 'json']);
    expect(plain.code).toBe(0);
    expect(JSON.parse(plain.stdout)).toMatchObject({ images: [], blobs: [], layers: [] });

    const all = await cli(['image', 'prune', '-a', '-f', '--data-dir', data]);
    expect(all.stderr).toBe('');
    expect(all.code).toBe(0);
    expect(all.stdout).toContain('untagged: b:1');
    expect(all.stdout).not.toContain('a:1');
    expect(all.stdout).toMatch(/Total reclaimed space: \d/);
    const names = JSON.parse((await cli(['image', 'ls', '--data-dir', data, '--format', 'json'])).stdout) as Array<{ name?: string; repository?: string }>;
    expect(names).toHaveLength(1);
    // b's own layer went (blob and unpacked), the shared one stayed
    expect(blob(layers.own)).toBe(false);
    expect(unpacked(layers.own)).toBe(false);
    expect(blob(layers.shared)).toBe(true);
    expect(unpacked(layers.shared)).toBe(true);

    // once the container is gone, a:1 is unused: -a removes it and its layer
    await store.snapshots.remove('ctr1');
    const last = await cli(['image', 'prune', '-a', '--data-dir', data, '--format', 'json']);
    expect(last.code).toBe(0);
    expect((JSON.parse(last.stdout) as { images: Array<{ name: string }> }).images.map((i) => i.name)).toEqual(['a:1']);
    expect(blob(layers.shared)).toBe(false);
    expect(unpacked(layers.shared)).toBe(false);
    expect(fs.readdirSync(path.join(data, 'content', 'blobs', 'sha256'))).toEqual([]);
  });

  it('a plain prune collects the layers of a replaced image once its last container is gone', async () => {
    expect((await cli(['image', 'import', '--data-dir', data, 'b:1', src])).code).toBe(0);
    const store = await ImageStore.open(data);
    await store.snapshots.prepare('ctr2', await store.get('b:1'));
    // b:1 replaced by another image (a's content under b's name): b's layers stay for the snapshot
    const other = path.join(tmp, 'other');
    fs.mkdirSync(other);
    fs.writeFileSync(path.join(other, 'x'), 'x\n');
    expect((await cli(['image', 'import', '--data-dir', data, 'b:1', other])).code).toBe(0);
    expect(unpacked(layers.own)).toBe(true);
    await store.snapshots.remove('ctr2');
    const r = await cli(['image', 'prune', '--data-dir', data, '--format', 'json']);
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as { images: unknown[]; layers: string[] };
    expect(out.images).toEqual([]);
    expect(out.layers.sort()).toEqual([layers.own, layers.shared].sort());
    expect(unpacked(layers.own)).toBe(false);
    expect((await store.list()).map((i) => i.name)).toEqual(['b:1']);
  });
});
