import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FlotillaError } from '../../common/errors.js';
import { Wal } from './wal.js';
import type { Entry, Snapshot } from './types.js';

const dirs: string[] = [];
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-wal-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

const ent = (index: number, term: number, s = `e${index}`): Entry => ({ index, term, type: 0, data: Buffer.from(s) });
const range = (lo: number, hi: number, term: number): Entry[] => Array.from({ length: hi - lo + 1 }, (_, i) => ent(lo + i, term));
const allEntries = (w: Wal): Entry[] => (w.storage.lastIndex() >= w.storage.firstIndex() ? w.storage.entries(w.storage.firstIndex(), w.storage.lastIndex() + 1, Infinity) : []);
const snap = (index: number, term: number, data: string): Snapshot => ({ data: Buffer.from(data), metadata: { index, term, confState: { voters: [1, 2, 3], learners: [] } } });

describe('raft WAL', () => {
  it('round-trips entries and hard state, overwriting a conflicting suffix', () => {
    const dir = tmp();
    const w = Wal.open({ dir });
    w.save({ term: 1, vote: 1, commit: 0 }, range(1, 10, 1));
    w.save({ term: 2, vote: 2, commit: 5 }, [ent(8, 2, 'x8'), ent(9, 2, 'x9')]);
    w.save({ term: 2, vote: 2, commit: 9 }, []);
    w.close();
    const r = Wal.open({ dir });
    expect(r.storage.initialState().hardState).toEqual({ term: 2, vote: 2, commit: 9 });
    const ents = allEntries(r);
    expect(ents.map((e) => e.index)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(ents[7]!.data.toString()).toBe('x8');
    expect(ents[7]!.term).toBe(2);
    // appending after reopen continues the same log
    r.save({ term: 2, vote: 2, commit: 10 }, [ent(10, 2)]);
    r.close();
    const r2 = Wal.open({ dir });
    expect(r2.storage.lastIndex()).toBe(10);
    expect(r2.stats.fsyncs).toBe(0);
    r2.close();
  });

  it('truncates a torn tail (partial or checksum-failing last record) with the prefix intact', () => {
    const dir = tmp();
    const w = Wal.open({ dir });
    w.save({ term: 1, vote: 1, commit: 3 }, range(1, 5, 1));
    w.save(undefined, [ent(6, 1, 'y'.repeat(100))]);
    const file = w.segmentFiles()[0]!;
    w.close();
    // partial last record
    const size = fs.statSync(file).size;
    fs.truncateSync(file, size - 30);
    let r = Wal.open({ dir });
    expect(r.storage.lastIndex()).toBe(5);
    expect(fs.statSync(file).size).toBeLessThan(size - 30);
    r.save(undefined, [ent(6, 1, 'z'.repeat(100))]);
    r.close();
    // checksum-failing last record: flip a byte in its payload
    const buf = fs.readFileSync(file);
    buf[buf.length - 5]! ^= 0xff;
    fs.writeFileSync(file, buf);
    r = Wal.open({ dir });
    expect(r.storage.lastIndex()).toBe(5);
    expect(r.storage.initialState().hardState.commit).toBe(3);
    r.close();
  });

  it('stops with a clear error on corruption before the tail', () => {
    const dir = tmp();
    const w = Wal.open({ dir });
    for (let i = 1; i <= 20; i++) w.save({ term: 1, vote: 1, commit: i - 1 }, [ent(i, 1, `value-${i}`)]);
    const file = w.segmentFiles()[0]!;
    w.close();
    const buf = fs.readFileSync(file);
    const at = buf.indexOf('value-7');
    buf[at + 2]! ^= 0x01;
    fs.writeFileSync(file, buf);
    let err: unknown;
    try {
      Wal.open({ dir });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(FlotillaError);
    expect((err as FlotillaError).code).toBe('INTERNAL');
    expect((err as Error).message).toContain(file);
    expect((err as Error).message).toMatch(/corrupt at offset \d+/);
    // the file was not truncated
    expect(fs.statSync(file).size).toBe(buf.length);
  });

  it('an error in a segment other than the last is fatal even at its end', () => {
    const dir = tmp();
    const w = Wal.open({ dir, segmentBytes: 200 });
    for (let i = 1; i <= 30; i++) w.save({ term: 1, vote: 1, commit: i - 1 }, [ent(i, 1, 'x'.repeat(40))]);
    const files = w.segmentFiles();
    expect(files.length).toBeGreaterThan(3);
    w.close();
    fs.truncateSync(files[1]!, fs.statSync(files[1]!).size - 3);
    expect(() => Wal.open({ dir })).toThrow(/corrupt at offset/);
  });

  it('saves snapshots, releases old segments, and replays snapshot + tail', () => {
    const dir = tmp();
    const w = Wal.open({ dir, segmentBytes: 1000 });
    for (let i = 1; i <= 200; i++) w.save({ term: 1, vote: 1, commit: i - 1 }, [ent(i, 1, 'v'.repeat(30))]);
    const before = w.segmentFiles().length;
    expect(before).toBeGreaterThan(5);
    w.saveSnapshot(snap(150, 1, 'state@150'));
    const released = w.releaseTo(150);
    expect(released).toBeGreaterThan(0);
    expect(w.segmentFiles().length).toBe(before - released);
    w.save({ term: 1, vote: 1, commit: 200 }, []);
    w.close();
    const r = Wal.open({ dir });
    expect(r.storage.snapshot().metadata?.index).toBe(150);
    expect(r.storage.snapshot().data.toString()).toBe('state@150');
    expect(r.storage.firstIndex()).toBe(151);
    expect(r.storage.lastIndex()).toBe(200);
    expect(r.storage.initialState().hardState.commit).toBe(200);
    expect(r.storage.initialState().confState.voters).toEqual([1, 2, 3]);
    // a second and third snapshot: only two files are kept
    r.saveSnapshot(snap(180, 1, 'state@180'));
    r.saveSnapshot(snap(200, 1, 'state@200'));
    expect(fs.readdirSync(path.join(dir, 'snap')).sort()).toEqual([
      `${(1).toString(16).padStart(16, '0')}-${(180).toString(16).padStart(16, '0')}.snap`,
      `${(1).toString(16).padStart(16, '0')}-${(200).toString(16).padStart(16, '0')}.snap`,
    ]);
    r.close();
  });

  it('an installed snapshot replaces a diverging log on replay', () => {
    const dir = tmp();
    const w = Wal.open({ dir });
    w.save({ term: 1, vote: 1, commit: 3 }, range(1, 10, 1)); // 4..10 uncommitted, term 1
    w.saveSnapshot(snap(50, 3, 'leader state')); // the leader's snapshot at term 3
    w.save({ term: 3, vote: 0, commit: 52 }, range(51, 52, 3));
    w.close();
    const r = Wal.open({ dir });
    expect(r.storage.firstIndex()).toBe(51);
    expect(allEntries(r).map((e) => [e.index, e.term])).toEqual([[51, 3], [52, 3]]);
    r.close();
  });

  it('a damaged snapshot file stops with a clear error', () => {
    const dir = tmp();
    const w = Wal.open({ dir });
    w.save({ term: 1, vote: 1, commit: 5 }, range(1, 5, 1));
    w.saveSnapshot(snap(5, 1, 'some state'));
    w.close();
    const [name] = fs.readdirSync(path.join(dir, 'snap'));
    const file = path.join(dir, 'snap', name!);
    const buf = fs.readFileSync(file);
    buf[buf.length - 2]! ^= 0x10;
    fs.writeFileSync(file, buf);
    expect(() => Wal.open({ dir })).toThrow(/raft snapshot .* is corrupt \(checksum mismatch\)/);
  });

  it('resetTo keeps the state in a snapshot and drops the log (force-new-cluster)', () => {
    const dir = tmp();
    const w = Wal.open({ dir, segmentBytes: 300 });
    for (let i = 1; i <= 40; i++) w.save({ term: 2, vote: 1, commit: i }, [ent(i, 2)]);
    w.resetTo({ data: Buffer.from('all'), metadata: { index: 40, term: 2, confState: { voters: [1], learners: [] } } }, { term: 2, vote: 0, commit: 40 });
    w.save({ term: 3, vote: 1, commit: 41 }, [ent(41, 3)]);
    w.close();
    const r = Wal.open({ dir });
    expect(r.segmentFiles().length).toBe(1);
    expect(r.storage.initialState().confState.voters).toEqual([1]);
    expect(r.storage.firstIndex()).toBe(41);
    expect(r.storage.lastIndex()).toBe(41);
    expect(r.storage.initialState().hardState).toEqual({ term: 3, vote: 1, commit: 41 });
    r.close();
  });

  it('survives crashes simulated by truncating the last segment at random offsets', () => {
    const dir = tmp();
    const w = Wal.open({ dir, segmentBytes: 4096 });
    let commit = 0;
    for (let i = 1; i <= 300; i++) {
      commit = i - 1;
      w.save({ term: 1, vote: 1, commit }, [ent(i, 1, `payload-${i}-${'p'.repeat(i % 17)}`)]);
    }
    const files = w.segmentFiles();
    w.close();
    const last = files[files.length - 1]!;
    const original = fs.readFileSync(last);
    let seed = 12345;
    const rnd = (): number => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
    let lastIndexSeen = Infinity;
    for (let round = 0; round < 25; round++) {
      fs.writeFileSync(last, original);
      const cut = Math.floor(rnd() * original.length);
      fs.truncateSync(last, cut);
      const r = Wal.open({ dir });
      const ents = allEntries(r);
      // a prefix of what was written: contiguous, each the right payload
      ents.forEach((e, i) => {
        expect(e.index).toBe(i + 1);
        expect(e.data.toString()).toBe(`payload-${i + 1}-${'p'.repeat((i + 1) % 17)}`);
      });
      expect(r.storage.initialState().hardState.commit).toBeLessThanOrEqual(r.storage.lastIndex());
      // the earlier segments are intact, so the log is at least as long as they are
      expect(r.storage.lastIndex()).toBeGreaterThanOrEqual(parseInt(path.basename(last).split('-')[1]!, 16) - 1);
      lastIndexSeen = Math.min(lastIndexSeen, r.storage.lastIndex());
      // the log goes on after the repair
      const next = r.storage.lastIndex() + 1;
      r.save({ term: 1, vote: 1, commit: r.storage.initialState().hardState.commit }, [ent(next, 1, `payload-${next}-${'p'.repeat(next % 17)}`)]);
      r.close();
      const again = Wal.open({ dir });
      expect(again.storage.lastIndex()).toBe(next);
      again.close();
    }
    expect(lastIndexSeen).toBeLessThan(300);
  });
  it('preallocates segments with zeros and replays over the zero tail (torn records in it too)', () => {
    const dir = tmp();
    const w = Wal.open({ dir, preallocBytes: 64 * 1024, segmentBytes: 16 * 1024 });
    w.save({ term: 1, vote: 1, commit: 0 }, range(1, 50, 1));
    const first = w.segmentFiles()[0]!;
    expect(fs.statSync(first).size).toBeGreaterThanOrEqual(64 * 1024);
    // enough to roll over a few segments, each with a zero tail
    for (let i = 51; i <= 2000; i += 50) w.save({ term: 1, vote: 1, commit: i - 1 }, range(i, i + 49, 1));
    expect(w.segmentFiles().length).toBeGreaterThan(2);
    w.close();
    // reopened without preallocation: appends go after the last record, not after the zeros
    let r = Wal.open({ dir });
    expect(r.storage.lastIndex()).toBe(2000);
    expect(allEntries(r).map((e) => e.index)).toEqual(Array.from({ length: 2000 }, (_, i) => i + 1));
    expect(r.storage.initialState().hardState).toEqual({ term: 1, vote: 1, commit: 1950 });
    r.save({ term: 1, vote: 1, commit: 2001 }, [ent(2001, 1, 'after')]);
    r.close();
    r = Wal.open({ dir, preallocBytes: 64 * 1024, segmentBytes: 16 * 1024 });
    expect(r.storage.lastIndex()).toBe(2001);
    expect(r.storage.entries(2001, 2002, Infinity)[0]!.data.toString()).toBe('after');
    r.save(undefined, [ent(2002, 1, 'y'.repeat(100))]);
    const last = r.segmentFiles()[r.segmentFiles().length - 1]!;
    r.close();
    // a torn last record followed by preallocated zeros: the record is dropped, the prefix kept
    const buf = fs.readFileSync(last);
    const end = buf.lastIndexOf(Buffer.from('y'.repeat(100))) + 100;
    fs.writeFileSync(last, Buffer.concat([buf.subarray(0, end - 40), Buffer.alloc(buf.length - end + 40)]));
    r = Wal.open({ dir, preallocBytes: 64 * 1024, segmentBytes: 16 * 1024 });
    expect(r.storage.lastIndex()).toBe(2001);
    r.save(undefined, [ent(2002, 1, 'again')]);
    r.close();
    r = Wal.open({ dir });
    expect(r.storage.lastIndex()).toBe(2002);
    expect(r.storage.entries(2002, 2003, Infinity)[0]!.data.toString()).toBe('again');
    r.close();
  });
});
