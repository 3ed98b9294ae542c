/**
 * Distribution inside the cluster, in one process with real pieces: two image stores (real import,
 * real layer unpacking), the content server over mutual TLS with node certificates of a real root CA,
 * and the fetcher. Only the dispatcher's answer (who has the image) is given by the test; the
 * multi-host test (test/images-cluster.test.ts) runs the whole path with the real dispatcher.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageStore } from '../runtime/images.js';
import { ContentServer, ImageFetcher, splitRef } from './distribution.js';
import { TlsSource } from '../../manager/ca/credentials.js';
import { type Role, RootCA, createRootCA } from '../../manager/ca/x509.js';
import type { ImageSource } from '../../gen/flotilla/v1/dispatcher.js';

const root = process.getuid?.() === 0;
if (!root) process.stderr.write('distribution tests skipped: unpacking layers needs root\n');

async function node(ca: RootCA, nodeId: string, role: Role): Promise<TlsSource> {
  return new TlsSource({ trustPem: ca.certPem, ...(await ca.issueWithNewKey({ nodeId, role, addresses: ['127.0.0.1'] })) });
}

describe.skipIf(!root)('images fetched from another node (content server + fetcher)', () => {
  let tmp = '';
  let ca: RootCA;
  let a: ImageStore;
  let server: ContentServer;
  let tlsA: TlsSource;
  let image = '';

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-dist-'));
    ca = await RootCA.load(await createRootCA({ clusterId: 'c1' }));
    tlsA = await node(ca, 'node-a', 'worker');
    a = await ImageStore.open(path.join(tmp, 'a'));
    // an image of two layers (a rootfs import is one layer: import twice, the second on top is not
    // possible, so a rootfs with a 2 MiB file makes the one layer big enough to stream in chunks)
    const rootfs = path.join(tmp, 'rootfs');
    fs.mkdirSync(path.join(rootfs, 'data'), { recursive: true });
    fs.writeFileSync(path.join(rootfs, 'data', 'blob'), Buffer.alloc(2 * 1024 * 1024, 7));
    fs.writeFileSync(path.join(rootfs, 'data', 'hello'), 'hello\n');
    image = (await a.import('app:1', rootfs, { config: { cmd: ['sh'] } })).digest;
    server = new ContentServer(a, tlsA);
    await server.listen('127.0.0.1');
  });
  afterAll(() => {
    server?.close();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const source = (): ImageSource => ({ nodeId: 'node-a', hostname: 'a', contentAddr: server.addr, name: 'app:1', digest: image });

  it('fetches a missing image once for concurrent callers, verified, and commits it under its name', async () => {
    const b = await ImageStore.open(path.join(tmp, 'b'));
    let asked = 0;
    const fetcher = new ImageFetcher(b, { imageSources: async () => (asked++, [source()]) }, await node(ca, 'node-b', 'worker'), { hostname: 'b', registry: false });
    const progress: string[] = [];
    await Promise.all(Array.from({ length: 5 }, () => fetcher.ensure('app:1', { onProgress: (m) => progress.push(m) })));
    expect(asked).toBe(1);
    // manifest, config, one layer: each fetched once
    expect(fetcher.stats).toMatchObject({ images: 1, blobs: 3 });
    const img = await b.get('app:1');
    expect(img.digest).toBe(image);
    expect(fs.readFileSync(path.join((await b.layerPaths('app:1'))[0]!, 'data', 'hello'), 'utf8')).toBe('hello\n');
    expect(progress.some((m) => /^fetching from a: [01]\/1 layers, /.test(m))).toBe(true);
    // by digest, and pinned name@digest, it is there now: no new fetch
    await fetcher.ensure(`app:1@${image}`);
    await fetcher.ensure(image);
    expect(fetcher.stats.images).toBe(1);
  });

  it('refuses a blob whose content does not match its digest, and keeps nothing of it', async () => {
    const b = await ImageStore.open(path.join(tmp, 'c'));
    const layer = (await a.get('app:1')).layers[0]!;
    const file = a.content.path(layer);
    const good = fs.readFileSync(file);
    fs.chmodSync(file, 0o644);
    const bad = Buffer.from(good);
    bad[bad.length - 10] = bad[bad.length - 10]! ^ 0xff;
    fs.writeFileSync(file, bad);
    try {
      const fetcher = new ImageFetcher(b, { imageSources: async () => [source()] }, await node(ca, 'node-c', 'worker'), { hostname: 'c', registry: false });
      await expect(fetcher.ensure('app:1')).rejects.toThrow(/content digest mismatch/);
      expect(await b.has('app:1')).toBe(false);
      expect(await b.content.has(layer)).toBe(false);
      expect(fs.readdirSync(b.content.ingestDir)).toEqual([]);
    } finally {
      fs.writeFileSync(file, good);
    }
  });

  it('serves only nodes of this cluster, and fetches only from the node the manager named', async () => {
    const other = await RootCA.load(await createRootCA({ clusterId: 'c2' }));
    const stranger = new ImageFetcher(await ImageStore.open(path.join(tmp, 'd')), { imageSources: async () => [source()] }, await node(other, 'node-d', 'worker'), {
      hostname: 'd',
      registry: false,
    });
    await expect(stranger.ensure('app:1')).rejects.toThrow(/^from node a: /);
    // the manager says node-x has it, but the server at that address is node-a: refused by the client
    const misled = new ImageFetcher(
      await ImageStore.open(path.join(tmp, 'e')),
      { imageSources: async () => [{ ...source(), nodeId: 'node-x' }] },
      await node(ca, 'node-e', 'worker'),
      { hostname: 'e', registry: false },
    );
    await expect(misled.ensure('app:1')).rejects.toThrow(/^from node a: .*node-x/);
  });

  it('says which image is on no node', async () => {
    const fetcher = new ImageFetcher(await ImageStore.open(path.join(tmp, 'f')), { imageSources: async () => [] }, await node(ca, 'node-f', 'worker'), {
      hostname: 'f',
      sourcesTimeoutMs: 300,
      registry: false,
    });
    await expect(fetcher.ensure('nothere:1')).rejects.toThrow('image "nothere:1" is on no node of the cluster (import or pull it on one node)');
  });

  it('splits references', () => {
    expect(splitRef('a:1')).toEqual({ name: 'a:1', digest: '' });
    expect(splitRef(`a:1@sha256:${'0'.repeat(64)}`)).toEqual({ name: 'a:1', digest: `sha256:${'0'.repeat(64)}` });
    expect(splitRef(`sha256:${'0'.repeat(64)}`)).toEqual({ name: '', digest: `sha256:${'0'.repeat(64)}` });
  });
});
