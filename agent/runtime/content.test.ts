import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ContentStore, sha256Digest } from './content.js';

describe('content store', () => {
  let dir: string;
  let store: ContentStore;
  beforeEach(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-content-'));
    store = await ContentStore.open(dir);
  });
  afterEach(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('writes, verifies, reads and deletes blobs by digest', async () => {
    const data = Buffer.from('hello flotilla');
    const digest = sha256Digest(data);
    expect(await store.has(digest)).toBe(false);
    const info = await store.writeBytes(data, { digest, size: data.length });
    expect(info).toEqual({ digest, size: data.length });
    expect(store.path(digest)).toBe(path.join(dir, 'content/blobs/sha256', digest.slice(7)));
    expect(await store.has(digest)).toBe(true);
    expect((await store.readBytes(digest)).toString()).toBe('hello flotilla');
    // streams, and writing the same content again is fine
    const again = await store.ingest(Readable.from([Buffer.from('hello '), Buffer.from('flotilla')]));
    expect(again.digest).toBe(digest);
    expect(await store.list()).toEqual([digest]);
    expect(await store.delete(digest)).toBe(true);
    expect(await store.delete(digest)).toBe(false);
    await expect(store.readBytes(digest)).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('rejects a wrong digest or size and leaves no blob and no ingest file', async () => {
    const data = Buffer.from('some bytes');
    const wrong = sha256Digest('other bytes');
    await expect(store.writeBytes(data, { digest: wrong })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
      message: expect.stringMatching(/content digest mismatch: got sha256:[a-f0-9]{64}, expected sha256:/),
    });
    await expect(store.writeBytes(data, { size: 3 })).rejects.toThrow(/content size mismatch: more than the expected 3 bytes/);
    await expect(store.writeBytes(data, { size: 30 })).rejects.toThrow(/got 10 bytes, expected 30/);
    expect(await store.has(wrong)).toBe(false);
    expect(await store.has(sha256Digest(data))).toBe(false);
    expect(await fs.readdir(store.blobsDir)).toEqual([]);
    expect(await fs.readdir(store.ingestDir)).toEqual([]);
  });

  it('leaves nothing when the source stream fails mid-write', async () => {
    async function* failing(): AsyncGenerator<Buffer> {
      yield Buffer.from('part');
      throw new Error('connection reset');
    }
    await expect(store.ingest(failing())).rejects.toThrow('connection reset');
    expect(await fs.readdir(store.blobsDir)).toEqual([]);
    expect(await fs.readdir(store.ingestDir)).toEqual([]);
  });

  it('rejects malformed digests with INVALID_ARGUMENT', async () => {
    expect(() => store.path('sha256:xyz')).toThrow(/invalid digest "sha256:xyz"/);
    await expect(store.has('md5:abc')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await expect(store.writeBytes('x', { digest: 'sha256:ABC' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });

  it('cleans stale ingest files of dead writers on open, keeps live ones', async () => {
    await fs.writeFile(path.join(store.ingestDir, '999999999-deadbeef'), 'partial');
    await fs.writeFile(path.join(store.ingestDir, `${process.pid}-live`), 'partial');
    await ContentStore.open(dir);
    expect(await fs.readdir(store.ingestDir)).toEqual([`${process.pid}-live`]);
  });
});
