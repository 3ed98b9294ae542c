/**
 * VolumeStore removal against a container create that races it: the create writes its record (naming
 * the volume) before it takes the volume, so a record that appears between `volume rm`'s check and the
 * removal is seen once the volume is renamed away, and the volume is put back with its data.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeStore } from './volumes.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** A store whose users are none at the first question and `later` from the second on (a racing create). */
function racing(later: string[]): { store: VolumeStore; dir: string; asked: () => number } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-vol-unit-'));
  dirs.push(dir);
  let n = 0;
  const store = new VolumeStore(dir, async () => {
    n++;
    return new Map(n === 1 ? [] : [['data', later]]);
  });
  return { store, dir, asked: () => n };
}

describe('VolumeStore remove and prune', () => {
  it('a container that took the volume between the check and the removal keeps it, data and all', async () => {
    const { store, dir, asked } = racing(['web.1']);
    const { volume } = await store.create('data');
    fs.writeFileSync(path.join(volume.mountpoint, 'keep'), 'x');
    await expect(store.remove('data')).rejects.toThrow('volume data is in use by container web.1: remove the container first');
    expect(asked()).toBe(2);
    expect(fs.readFileSync(path.join(volume.mountpoint, 'keep'), 'utf8')).toBe('x');
    expect(fs.readdirSync(path.join(dir, 'volumes'))).toEqual(['data']);
  });

  it('prune skips a volume taken meanwhile; remove works once nobody uses it, leaving nothing', async () => {
    const { store, dir } = racing(['job.1']);
    await store.create('data', { anonymous: true });
    expect(await store.prune()).toEqual([]);
    expect(store.exists('data')).toBe(true);
    const free = new VolumeStore(dir);
    await free.remove('data');
    expect(store.exists('data')).toBe(false);
    expect(fs.readdirSync(path.join(dir, 'volumes'))).toEqual([]);
  });

  it('force removes a volume in use', async () => {
    const { store, dir } = racing(['web.1']);
    await store.create('data');
    await store.remove('data', true);
    expect(fs.readdirSync(path.join(dir, 'volumes'))).toEqual([]);
  });
});
