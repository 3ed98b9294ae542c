import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { Wal } from './wal.js';
import type { Entry, Snapshot } from './types.js';

const dirs: string[] = [];
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-walcrypt-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

const MARK = 'recognisable-plaintext-4711';
const ent = (index: number, term: number, s = `${MARK}-${index}`): Entry => ({ index, term, type: 0, data: Buffer.from(s) });
const range = (lo: number, hi: number, term: number): Entry[] => Array.from({ length: hi - lo + 1 }, (_, i) => ent(lo + i, term));
const snap = (index: number, term: number): Snapshot => ({ data: Buffer.from(`${MARK}-snapshot`), metadata: { index, term, confState: { voters: [1], learners: [] } } });

function filesUnder(dir: string): string[] {
  return fs.readdirSync(dir, { recursive: true, withFileTypes: true }).filter((d) => d.isFile()).map((d) => path.join(d.parentPath, d.name));
}

/** Offsets of the records of a segment: [start, payload length]. */
function records(buf: Buffer): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let off = 0; off + 9 <= buf.length; ) {
    const len = buf.readUInt32LE(off);
    if (len === 0 && buf.readUInt32LE(off + 4) === 0) break; // preallocated zeros
    out.push([off, len]);
    off += 9 + len;
  }
  return out;
}

/** Flip a bit inside a record's payload and give it a valid checksum again: only the GCM tag can tell. */
function tamper(file: string, which: number): void {
  const buf = fs.readFileSync(file);
  const [off, len] = records(buf)[which]!;
  buf[off + 9 + Math.floor(len / 2)]! ^= 0x01;
  const type = buf.readUInt8(off + 8);
  buf.writeUInt32LE(zlib.crc32(buf.subarray(off + 9, off + 9 + len), zlib.crc32(Buffer.of(type))), off + 4);
  fs.writeFileSync(file, buf);
}

describe('raft WAL encryption at rest', () => {
  it('round-trips entries, hard state and snapshots, and no payload is on disk in clear', () => {
    const dir = tmp();
    const dek = randomBytes(32);
    const w = Wal.open({ dir, dek, preallocBytes: 64 * 1024 });
    w.save({ term: 1, vote: 1, commit: 5 }, range(1, 10, 1));
    w.saveSnapshot(snap(5, 1));
    w.save({ term: 2, vote: 1, commit: 11 }, [ent(11, 2)]);
    w.close();
    for (const f of filesUnder(dir)) expect(fs.readFileSync(f).includes(MARK), f).toBe(false);
    const r = Wal.open({ dir, dek });
    expect(r.storage.initialState().hardState).toEqual({ term: 2, vote: 1, commit: 11 });
    expect(Buffer.from(r.storage.snapshot().data).toString()).toBe(`${MARK}-snapshot`);
    const ents = r.storage.entries(6, 12, Infinity);
    expect(ents.map((e) => Buffer.from(e.data).toString())).toEqual([6, 7, 8, 9, 10, 11].map((i) => `${MARK}-${i}`));
    r.close();
  });

  it('refuses another key, no key, and a plaintext log opened with a key', () => {
    const dir = tmp();
    const dek = randomBytes(32);
    const w = Wal.open({ dir, dek });
    w.save({ term: 1, vote: 1, commit: 3 }, range(1, 3, 1));
    w.close();
    expect(() => Wal.open({ dir, dek: randomBytes(32) })).toThrow(/fails authentication \(altered on disk, or written with another data key\)/);
    expect(() => Wal.open({ dir })).toThrow(/encrypted and no data key was given/);
    const plain = tmp();
    const p = Wal.open({ dir: plain });
    p.save({ term: 1, vote: 1, commit: 1 }, range(1, 1, 1));
    p.close();
    expect(() => Wal.open({ dir: plain, dek })).toThrow(/unencrypted record \(written before encryption at rest\)/);
  });

  it('a tampered record with a valid checksum stops replay (middle and last record alike)', () => {
    for (const which of ['middle', 'last'] as const) {
      const dir = tmp();
      const dek = randomBytes(32);
      const w = Wal.open({ dir, dek });
      // one sealed record per write: the segment's head, then one per save
      w.save({ term: 1, vote: 1, commit: 2 }, range(1, 2, 1));
      w.save({ term: 1, vote: 1, commit: 4 }, range(3, 4, 1));
      w.save({ term: 1, vote: 1, commit: 5 }, range(5, 5, 1));
      const file = w.segmentFiles()[0]!;
      w.close();
      const n = records(fs.readFileSync(file)).length;
      expect(n).toBe(4);
      tamper(file, which === 'middle' ? 2 : n - 1);
      const size = fs.statSync(file).size;
      expect(() => Wal.open({ dir, dek }), which).toThrow(/offset \d+: a record fails authentication/);
      // nothing was truncated away as if it were a torn tail
      expect(fs.statSync(file).size).toBe(size);
    }
  });

  it('a torn tail of an encrypted log is still truncated', () => {
    const dir = tmp();
    const dek = randomBytes(32);
    const w = Wal.open({ dir, dek });
    w.save({ term: 1, vote: 1, commit: 3 }, range(1, 5, 1));
    w.save(undefined, [ent(6, 1, 'y'.repeat(100))]);
    const file = w.segmentFiles()[0]!;
    w.close();
    fs.truncateSync(file, fs.statSync(file).size - 30);
    const r = Wal.open({ dir, dek });
    expect(r.storage.lastIndex()).toBe(5);
    r.close();
  });

  it('a tampered snapshot body with a valid checksum is refused', () => {
    const dir = tmp();
    const dek = randomBytes(32);
    const w = Wal.open({ dir, dek });
    w.save({ term: 1, vote: 1, commit: 5 }, range(1, 5, 1));
    w.saveSnapshot(snap(5, 1));
    w.close();
    const [name] = fs.readdirSync(path.join(dir, 'snap'));
    const file = path.join(dir, 'snap', name!);
    const buf = fs.readFileSync(file);
    expect(buf.subarray(0, 8).toString()).toBe('FLSNAP02');
    buf[buf.length - 20]! ^= 0x01;
    buf.writeUInt32LE(zlib.crc32(buf.subarray(16)), 8);
    fs.writeFileSync(file, buf);
    expect(() => Wal.open({ dir, dek })).toThrow(/raft snapshot .* is corrupt \(it does not decrypt with this manager's data key/);
  });
});
