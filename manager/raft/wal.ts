/**
 * Durable Raft storage: a segmented write-ahead log plus snapshot files, under one directory (the
 * manager's <data>/raft/).
 *
 *   <dir>/wal/<seq>-<firstIndex>.wal   segments (16 hex digits each), records appended in order
 *   <dir>/snap/<term>-<index>.snap     snapshots (16 hex digits each), checksummed
 *
 * A record is framed as: u32 LE payload length, u32 LE crc32 (zlib) of type byte + payload,
 * u8 type, payload. Types: ENTRY (an encoded Entry), HARD_STATE (an encoded HardState),
 * SNAPSHOT (an encoded SnapshotMetadata: "the log was cut at index/term here").
 *
 * Encryption at rest (WalOptions.dek, docs/security.md): with a data key, what one write() (one
 * Ready) appends is one SEALED record (type 0x84) whose payload is AES-256-GCM (12-byte random
 * nonce || ciphertext || 16-byte tag, the type byte as associated data) of the plaintext records
 * framed as above: one cipher setup per Ready, not per entry. The outer CRC covers the sealed
 * bytes, so a torn tail is still found by its checksum, and a record whose checksum holds but whose
 * tag does not (altered, or another key) stops replay with an error. Snapshot files are FLSNAP02
 * with a sealed body. A WAL opened with a key refuses plaintext records and vice versa.
 *
 * Writes are synchronous (fs.writeSync + fs.fdatasyncSync): one write and one fsync per save(),
 * and the driver calls save() once per Ready, so everything a Ready asks to persist shares one
 * fsync (group commit). On open, segments are replayed into a MemoryStorage. A torn tail (an
 * incomplete or checksum-failing record at the end of the last segment, with nothing valid after
 * it) is truncated with a warning; a bad record anywhere else stops with a FlotillaError naming
 * the file and offset.
 */
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { FlotillaError } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { seal, unseal } from '../keys/keys.js';
import { Entry as EntryCodec, HardState as HardStateCodec, Snapshot as SnapshotCodec, SnapshotMetadata } from '../../gen/flotilla/v1/raft.js';
import { MemoryStorage, snapIndex, snapTerm } from './memory-storage.js';
import type { Entry, HardState, Snapshot } from './types.js';

export const RECORD_ENTRY = 1;
export const RECORD_HARD_STATE = 2;
export const RECORD_SNAPSHOT = 3;
/** a record whose payload is plaintext records sealed with the data key */
export const RECORD_SEALED = 0x84;

const HEADER = 9;
const MAX_RECORD = 512 * 1024 * 1024;
/** how far past a bad record open() looks for a valid one before calling the bad record a torn tail */
const TAIL_SCAN = 1024 * 1024;
const SNAP_MAGIC = Buffer.from('FLSNAP01');
const SNAP_MAGIC_ENCRYPTED = Buffer.from('FLSNAP02');
const SNAP_AAD = Buffer.from('flotilla raft snapshot v2');
const SEALED_AAD = Buffer.of(RECORD_SEALED);
export const DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024;

export interface WalOptions {
  dir: string;
  /** roll to a new segment once the current one exceeds this (default 64 MiB) */
  segmentBytes?: number;
  /** snapshot files kept (default 2) */
  keepSnapshots?: number;
  /**
   * extend the current segment with zeros this many bytes ahead of the write offset (default 0:
   * off). An fdatasync of records written over preallocated zeros has no file size to commit, so
   * it costs about half of one that grows the file (no journal commit on ext4). Replay treats an
   * all-zero tail of a segment as its end.
   */
  preallocBytes?: number;
  log?: Logger;
  /**
   * the data-encryption key (32 bytes): records and snapshots are sealed with it (AES-256-GCM);
   * without it they are written in clear (tests and the simulator only; a manager always has one)
   */
  dek?: Uint8Array;
}

interface Segment {
  seq: number;
  firstIndex: number;
  file: string;
}

const hex16 = (n: number): string => n.toString(16).padStart(16, '0');

function crcOf(type: number, payload: Uint8Array): number {
  return zlib.crc32(payload, zlib.crc32(Buffer.of(type)));
}

/** Frame one record into `out` at `off`; returns the new offset. */
function writeRecord(out: Buffer, off: number, type: number, payload: Uint8Array): number {
  out.writeUInt32LE(payload.length, off);
  out.writeUInt32LE(crcOf(type, payload), off + 4);
  out.writeUInt8(type, off + 8);
  out.set(payload, off + HEADER);
  return off + HEADER + payload.length;
}

export function frameRecord(type: number, payload: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(HEADER + payload.length);
  writeRecord(out, 0, type, payload);
  return out;
}

interface ParsedRecord {
  type: number;
  payload: Buffer;
  end: number;
}

/** Parse the record at off, or undefined if it is incomplete or fails its checksum. */
export function parseRecord(buf: Buffer, off: number): ParsedRecord | undefined {
  if (off + HEADER > buf.length) return undefined;
  const len = buf.readUInt32LE(off);
  const crc = buf.readUInt32LE(off + 4);
  const type = buf.readUInt8(off + 8);
  if ((type < RECORD_ENTRY || type > RECORD_SNAPSHOT) && type !== RECORD_SEALED) return undefined;
  if (len > MAX_RECORD || off + HEADER + len > buf.length) return undefined;
  const payload = buf.subarray(off + HEADER, off + HEADER + len);
  if (crcOf(type, payload) !== crc) return undefined;
  return { type, payload, end: off + HEADER + len };
}

function hasValidRecordAfter(buf: Buffer, off: number): boolean {
  // the bad record's own length field, if plausible, points at the next record
  if (off + HEADER <= buf.length) {
    const next = off + HEADER + buf.readUInt32LE(off);
    if (next < buf.length && parseRecord(buf, next)) return true;
  }
  const limit = Math.min(buf.length - HEADER, off + TAIL_SCAN);
  for (let i = off + 1; i <= limit; i++) if (parseRecord(buf, i)) return true;
  return false;
}

const ZEROS = Buffer.alloc(64 * 1024);

/** True when buf[off..] is all zero bytes (a preallocated, never written tail). */
function zeroTail(buf: Buffer, off: number): boolean {
  for (let i = off; i < buf.length; i += ZEROS.length) {
    const end = Math.min(buf.length, i + ZEROS.length);
    if (buf.compare(ZEROS, 0, end - i, i, end) !== 0) return false;
  }
  return true;
}

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function listSegments(walDir: string): Segment[] {
  const segs: Segment[] = [];
  for (const name of fs.readdirSync(walDir)) {
    const m = /^([0-9a-f]{16})-([0-9a-f]{16})\.wal$/.exec(name);
    if (!m) continue;
    segs.push({ seq: parseInt(m[1]!, 16), firstIndex: parseInt(m[2]!, 16), file: path.join(walDir, name) });
  }
  return segs.sort((a, b) => a.seq - b.seq);
}

interface SnapFile {
  term: number;
  index: number;
  file: string;
}

function listSnapshots(snapDir: string): SnapFile[] {
  const out: SnapFile[] = [];
  for (const name of fs.readdirSync(snapDir)) {
    const m = /^([0-9a-f]{16})-([0-9a-f]{16})\.snap$/.exec(name);
    if (!m) continue;
    out.push({ term: parseInt(m[1]!, 16), index: parseInt(m[2]!, 16), file: path.join(snapDir, name) });
  }
  return out.sort((a, b) => a.index - b.index || a.term - b.term);
}

/**
 * Read and verify a snapshot file: magic, u32 crc32 of the body, u32 body length, body. With a data
 * key the magic is FLSNAP02 and the body is sealed (a plaintext FLSNAP01 file is refused, and the
 * other way round).
 */
export function readSnapshotFile(file: string, dek?: Uint8Array): Snapshot {
  const buf = fs.readFileSync(file);
  const bad = (why: string): FlotillaError =>
    new FlotillaError('INTERNAL', `raft snapshot ${file} is corrupt (${why}); refusing to start (restore it or remove it together with the raft dir)`);
  if (buf.length < 16) throw bad('bad header');
  const magic = buf.subarray(0, 8);
  const encrypted = magic.equals(SNAP_MAGIC_ENCRYPTED);
  if (!encrypted && !magic.equals(SNAP_MAGIC)) throw bad('bad header');
  const crc = buf.readUInt32LE(8);
  const len = buf.readUInt32LE(12);
  if (16 + len !== buf.length) throw bad(`length ${buf.length - 16}, header says ${len}`);
  const body = buf.subarray(16);
  if (zlib.crc32(body) !== crc) throw bad('checksum mismatch');
  if (encrypted !== !!dek) {
    throw new FlotillaError(
      'FAILED_PRECONDITION',
      encrypted ? `raft snapshot ${file} is encrypted and no data key was given; refusing to start` : `raft snapshot ${file} is not encrypted (written before encryption at rest); refusing to start`,
    );
  }
  if (!dek) return SnapshotCodec.decode(body);
  let plain: Buffer;
  try {
    plain = unseal(dek, body, SNAP_AAD);
  } catch {
    throw bad('it does not decrypt with this manager\'s data key: altered, or from another manager');
  }
  return SnapshotCodec.decode(plain);
}

/** Ensures the replayed entries continue a snapshot at (index, term): drop what it covers. */
function cutAt(ents: Entry[], index: number, term: number): Entry[] {
  if (ents.length === 0) return ents;
  const first = ents[0]!.index;
  const last = first + ents.length - 1;
  if (index < first - 1) return ents; // nothing covered (a gap is checked by the caller)
  if (index > last) return [];
  if (index === first - 1) return ents;
  const e = ents[index - first]!;
  // the log at the snapshot point disagrees with it: the snapshot replaced the whole log
  if (e.term !== term) return [];
  return ents.slice(index - first + 1);
}

export class Wal {
  readonly storage: MemoryStorage;
  private readonly walDir: string;
  private readonly snapDir: string;
  private readonly segmentBytes: number;
  private readonly keepSnapshots: number;
  private readonly log: Logger | undefined;
  private readonly dek: Uint8Array | undefined;
  private segments: Segment[];
  private fd = -1;
  /** write offset in the current segment: the end of its records */
  private size = 0;
  /** file size of the current segment (>= size; zeros past size) */
  private allocated = 0;
  private readonly preallocBytes: number;
  /** index of the last entry written (the next segment starts after it) */
  private lastIndex: number;
  private hardState: HardState;
  private closed = false;
  /** counters for benchmarks and tests */
  readonly stats = { writes: 0, fsyncs: 0, bytes: 0 };

  private constructor(opts: WalOptions, storage: MemoryStorage, segments: Segment[], hardState: HardState) {
    this.walDir = path.join(opts.dir, 'wal');
    this.snapDir = path.join(opts.dir, 'snap');
    this.segmentBytes = opts.segmentBytes ?? DEFAULT_SEGMENT_BYTES;
    this.keepSnapshots = Math.max(1, opts.keepSnapshots ?? 2);
    this.preallocBytes = Math.max(0, opts.preallocBytes ?? 0);
    this.log = opts.log;
    this.dek = opts.dek;
    this.storage = storage;
    this.segments = segments;
    this.lastIndex = storage.lastIndex();
    this.hardState = hardState;
  }

  /** True when dir holds raft state (a segment or a snapshot). */
  static exists(dir: string): boolean {
    try {
      const segs = listSegments(path.join(dir, 'wal'));
      if (segs.length > 0) return true;
    } catch {}
    try {
      return listSnapshots(path.join(dir, 'snap')).length > 0;
    } catch {
      return false;
    }
  }

  /** Open (or create) the storage under opts.dir and replay it. */
  static open(opts: WalOptions): Wal {
    const walDir = path.join(opts.dir, 'wal');
    const snapDir = path.join(opts.dir, 'snap');
    fs.mkdirSync(walDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(snapDir, { recursive: true, mode: 0o700 });
    for (const name of fs.readdirSync(snapDir)) if (name.endsWith('.tmp')) fs.rmSync(path.join(snapDir, name), { force: true });

    // 1. the newest snapshot (a damaged newest snapshot is an error, not a silent fallback)
    let snapshot: Snapshot | undefined;
    const snaps = listSnapshots(snapDir);
    const newest = snaps[snaps.length - 1];
    if (newest) {
      snapshot = readSnapshotFile(newest.file, opts.dek);
      if (snapIndex(snapshot) !== newest.index || snapTerm(snapshot) !== newest.term) {
        throw new FlotillaError('INTERNAL', `raft snapshot ${newest.file} holds index ${snapIndex(snapshot)} term ${snapTerm(snapshot)}, not what its name says; refusing to start`);
      }
    }

    // 2. replay the segments in order
    const segments = listSegments(walDir);
    let ents: Entry[] = [];
    let hs: HardState = { term: 0, vote: 0, commit: 0 };
    let markerMax = 0;
    let tailEnd = 0;
    const replayRecord = (type: number, payload: Uint8Array, where: () => string): void => {
      try {
        if (type === RECORD_ENTRY) {
          const e = EntryCodec.decode(payload);
          if (ents.length === 0) ents = [e];
          else {
            const first = ents[0]!.index;
            const last = first + ents.length - 1;
            if (e.index > last + 1) throw new FlotillaError('INTERNAL', `raft WAL ${where()}: entry ${e.index} follows entry ${last} (missing entries)`);
            if (e.index < first) ents = [e];
            else {
              ents.length = e.index - first;
              ents.push(e);
            }
          }
        } else if (type === RECORD_HARD_STATE) {
          hs = HardStateCodec.decode(payload);
        } else {
          const md = SnapshotMetadata.decode(payload);
          markerMax = Math.max(markerMax, md.index);
          ents = cutAt(ents, md.index, md.term);
        }
      } catch (err) {
        if (err instanceof FlotillaError) throw err;
        throw new FlotillaError('INTERNAL', `raft WAL ${where()}: undecodable record (${(err as Error).message}); refusing to start`, { cause: err });
      }
    };
    for (let si = 0; si < segments.length; si++) {
      const seg = segments[si]!;
      const buf = fs.readFileSync(seg.file);
      let off = 0;
      while (off < buf.length) {
        const rec = parseRecord(buf, off);
        if (!rec) {
          if (zeroTail(buf, off)) break; // preallocated, never written
          const isLast = si === segments.length - 1;
          if (isLast && !hasValidRecordAfter(buf, off)) {
            opts.log?.warn({ file: seg.file, offset: off, dropped: buf.length - off }, 'raft WAL: truncating a torn tail');
            fs.truncateSync(seg.file, off);
            break;
          }
          throw new FlotillaError(
            'INTERNAL',
            `raft WAL ${seg.file} is corrupt at offset ${off} (a bad record before the end of the log); refusing to start rather than lose committed entries`,
          );
        }
        const where = (): string => `${seg.file} offset ${off}`;
        if (rec.type === RECORD_SEALED) {
          if (!opts.dek) throw new FlotillaError('FAILED_PRECONDITION', `raft WAL ${where()}: the record is encrypted and no data key was given; refusing to start`);
          let plain: Buffer;
          try {
            plain = unseal(opts.dek, rec.payload, SEALED_AAD);
          } catch {
            throw new FlotillaError(
              'INTERNAL',
              `raft WAL ${where()}: a record fails authentication (altered on disk, or written with another data key); refusing to start`,
            );
          }
          for (let ioff = 0; ioff < plain.length; ) {
            const inner = parseRecord(plain, ioff);
            if (!inner || inner.type === RECORD_SEALED) throw new FlotillaError('INTERNAL', `raft WAL ${where()}: a sealed record holds a bad record at ${ioff}; refusing to start`);
            replayRecord(inner.type, inner.payload, where);
            ioff = inner.end;
          }
        } else if (opts.dek) {
          throw new FlotillaError('FAILED_PRECONDITION', `raft WAL ${where()}: an unencrypted record (written before encryption at rest); refusing to start`);
        } else {
          replayRecord(rec.type, rec.payload, where);
        }
        off = rec.end;
      }
      tailEnd = off;
    }

    // 3. assemble
    const storage = new MemoryStorage();
    const si = snapIndex(snapshot);
    if (markerMax > si) {
      throw new FlotillaError('INTERNAL', `raft WAL records a snapshot at index ${markerMax} but the newest snapshot file in ${snapDir} is at ${si}; refusing to start`);
    }
    if (snapshot && si > 0) {
      storage.applySnapshot(snapshot);
      ents = cutAt(ents, si, snapTerm(snapshot));
    }
    if (ents.length > 0 && ents[0]!.index > si + 1) {
      throw new FlotillaError('INTERNAL', `raft WAL in ${walDir} starts at entry ${ents[0]!.index} but the snapshot ends at ${si}: entries are missing; refusing to start`);
    }
    storage.append(ents);
    if (hs.commit < si) hs = { ...hs, commit: si };
    if (snapshot && hs.term < snapTerm(snapshot)) hs = { ...hs, term: snapTerm(snapshot) };
    if (hs.commit > storage.lastIndex()) {
      throw new FlotillaError('INTERNAL', `raft WAL in ${walDir}: hard state commit ${hs.commit} is beyond the last entry ${storage.lastIndex()}; refusing to start`);
    }
    if (hs.term !== 0 || hs.vote !== 0 || hs.commit !== 0) storage.setHardState(hs);

    const wal = new Wal(opts, storage, segments, hs);
    wal.openTail(tailEnd);
    return wal;
  }

  /** Open the last segment for writing at `end` (the end of its valid records). */
  private openTail(end: number): void {
    const last = this.segments[this.segments.length - 1];
    if (last) {
      // not O_APPEND: records are written at this.size, over a preallocated zero tail if any
      this.fd = fs.openSync(last.file, 'r+', 0o600);
      this.size = end;
      this.allocated = Math.max(end, fs.fstatSync(this.fd).size);
    } else {
      this.createSegment(1);
    }
  }

  private createSegment(seq: number): void {
    const seg: Segment = { seq, firstIndex: this.lastIndex + 1, file: path.join(this.walDir, `${hex16(seq)}-${hex16(this.lastIndex + 1)}.wal`) };
    const fd = fs.openSync(seg.file, 'wx', 0o600);
    // every segment starts with the current hard state, so that older segments can be released
    const head = this.frame(RECORD_HARD_STATE, HardStateCodec.encode(this.hardState).finish());
    fs.writeSync(fd, head, 0, head.length, 0);
    this.segments.push(seg);
    this.fd = fd;
    this.size = head.length;
    this.allocated = head.length;
    this.preallocate(head.length);
    fs.fdatasyncSync(fd);
    fsyncDir(this.walDir);
  }

  /**
   * Keep at least half of preallocBytes of zeros ahead of `end`: write preallocBytes of zeros at
   * the allocated end (never over records: allocated >= size). The next fdatasync makes the new
   * size durable; the ones after it no longer change the file's size.
   */
  private preallocate(end: number): void {
    const chunk = this.preallocBytes;
    if (chunk <= 0 || end + chunk / 2 <= this.allocated) return;
    const target = Math.max(this.allocated, end) + chunk;
    let pos = this.allocated;
    while (pos < target) pos += fs.writeSync(this.fd, ZEROS, 0, Math.min(ZEROS.length, target - pos), pos);
    this.allocated = target;
  }

  /** Framed records as written: with a data key, wrapped in one SEALED record. */
  private sealRecords(records: Buffer): Buffer {
    if (!this.dek) return records;
    return frameRecord(RECORD_SEALED, seal(this.dek, records, SEALED_AAD));
  }

  private frame(type: number, payload: Uint8Array): Buffer {
    return this.sealRecords(frameRecord(type, payload));
  }

  private roll(): void {
    fs.fdatasyncSync(this.fd);
    fs.closeSync(this.fd);
    this.fd = -1;
    const seq = (this.segments[this.segments.length - 1]?.seq ?? 0) + 1;
    this.createSegment(seq);
  }

  private check(): void {
    if (this.closed) throw new FlotillaError('UNAVAILABLE', 'raft WAL is closed');
  }

  /**
   * Append entries and a hard state (either may be empty) and fsync: one write, one fsync. The
   * entries are written before the hard state, so a torn write never leaves a commit index
   * pointing past the entries on disk. With sync=false (a Ready that only moved the commit index)
   * the write is not fsynced: the next fsync covers it, and a lost commit index is recomputed.
   */
  save(hardState: HardState | undefined, entries: Entry[], sync = true): void {
    this.write(hardState, entries);
    if (sync) this.sync();
  }

  /** fdatasync what was written (synchronously). */
  sync(): void {
    this.check();
    fs.fdatasyncSync(this.fd);
    this.stats.fsyncs++;
  }

  /** fdatasync what was written, on the thread pool: the event loop keeps running meanwhile. */
  syncAsync(): Promise<void> {
    this.check();
    const fd = this.fd;
    return new Promise<void>((resolve, reject) =>
      fs.fdatasync(fd, (err) => {
        if (err) reject(new FlotillaError('INTERNAL', `raft WAL: fsync failed: ${err.message}`, { cause: err }));
        else {
          this.stats.fsyncs++;
          resolve();
        }
      }),
    );
  }

  /** Append records without fsync (save() = write() + sync()). */
  write(hardState: HardState | undefined, entries: Entry[]): void {
    this.check();
    if (!hardState && entries.length === 0) return;
    if (this.size >= this.segmentBytes) this.roll();
    const payloads: Uint8Array[] = [];
    let total = 0;
    for (const e of entries) {
      const p = EntryCodec.encode(e).finish();
      payloads.push(p);
      total += HEADER + p.length;
    }
    let hsPayload: Uint8Array | undefined;
    if (hardState) {
      hsPayload = HardStateCodec.encode(hardState).finish();
      total += HEADER + hsPayload.length;
    }
    const out = Buffer.allocUnsafe(total);
    let off = 0;
    for (const p of payloads) off = writeRecord(out, off, RECORD_ENTRY, p);
    if (hsPayload) off = writeRecord(out, off, RECORD_HARD_STATE, hsPayload);
    this.writeAll(this.sealRecords(out));
    if (entries.length > 0) this.lastIndex = entries[entries.length - 1]!.index;
    if (hardState) this.hardState = { term: hardState.term, vote: hardState.vote, commit: hardState.commit };
  }

  private writeAll(buf: Buffer): void {
    this.preallocate(this.size + buf.length);
    let off = 0;
    while (off < buf.length) off += fs.writeSync(this.fd, buf, off, buf.length - off, this.size + off);
    this.size += buf.length;
    if (this.size > this.allocated) this.allocated = this.size;
    this.stats.writes++;
    this.stats.bytes += buf.length;
  }

  /**
   * Persist a snapshot: the file first (temp name, fsync, rename, fsync dir), then a SNAPSHOT
   * record in the log (fsynced). Older snapshot files beyond keepSnapshots are removed. Does not
   * release segments: call releaseTo() once the snapshot is in place.
   */
  saveSnapshot(snap: Snapshot): void {
    this.check();
    const index = snapIndex(snap);
    const term = snapTerm(snap);
    const plain = SnapshotCodec.encode(snap).finish();
    const body = this.dek ? seal(this.dek, plain, SNAP_AAD) : Buffer.from(plain);
    const head = Buffer.alloc(16);
    (this.dek ? SNAP_MAGIC_ENCRYPTED : SNAP_MAGIC).copy(head, 0);
    head.writeUInt32LE(zlib.crc32(body), 8);
    head.writeUInt32LE(body.length, 12);
    const name = `${hex16(term)}-${hex16(index)}.snap`;
    const final = path.join(this.snapDir, name);
    const tmp = `${final}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, head);
      let off = 0;
      while (off < body.length) off += fs.writeSync(fd, body, off, body.length - off);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, final);
    fsyncDir(this.snapDir);
    // the log records where it was cut, so that replay drops entries the snapshot replaced
    const md = SnapshotMetadata.encode(snap.metadata ?? { index, term, confState: undefined }).finish();
    this.writeAll(this.frame(RECORD_SNAPSHOT, md));
    fs.fdatasyncSync(this.fd);
    this.stats.fsyncs++;
    if (index > this.lastIndex) this.lastIndex = index;
    const snaps = listSnapshots(this.snapDir);
    for (const s of snaps.slice(0, Math.max(0, snaps.length - this.keepSnapshots))) fs.rmSync(s.file, { force: true });
  }

  /**
   * Release segments whose entries are all covered by a snapshot at `index`, keeping one such
   * segment as a margin. The current segment is never released.
   */
  releaseTo(index: number): number {
    this.check();
    let n = 0;
    // segment i holds entries < segments[i+1].firstIndex
    while (this.segments.length > 2) {
      const after2 = this.segments[2]!;
      if (after2.firstIndex - 1 > index) break;
      const seg = this.segments.shift()!;
      fs.rmSync(seg.file, { force: true });
      n++;
    }
    if (n > 0) fsyncDir(this.walDir);
    return n;
  }

  /**
   * Replace the whole log with a snapshot and a hard state (force-new-cluster): the snapshot file
   * is written first, then a fresh segment holding the SNAPSHOT record and the hard state, then
   * the old segments are removed.
   */
  resetTo(snap: Snapshot, hardState: HardState): void {
    this.check();
    this.saveSnapshot(snap);
    fs.closeSync(this.fd);
    this.fd = -1;
    const old = this.segments;
    this.segments = [];
    this.lastIndex = snapIndex(snap);
    this.hardState = { term: hardState.term, vote: hardState.vote, commit: hardState.commit };
    this.createSegment((old[old.length - 1]?.seq ?? 0) + 1);
    const md = SnapshotMetadata.encode(snap.metadata ?? { index: 0, term: 0, confState: undefined }).finish();
    this.writeAll(this.frame(RECORD_SNAPSHOT, md));
    fs.fdatasyncSync(this.fd);
    for (const s of old) fs.rmSync(s.file, { force: true });
    fsyncDir(this.walDir);
  }

  segmentFiles(): string[] {
    return this.segments.map((s) => s.file);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.fd >= 0) {
      try {
        fs.fdatasyncSync(this.fd);
      } catch {}
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }
}
