/**
 * The proposer of a single manager without Raft: a durable local log. Proposals are group-committed
 * (one write and one fsync for everything proposed in the same turn of the event loop), then applied
 * in order. On open, the store is rebuilt from the last snapshot plus the log; a torn tail from a
 * crash is truncated, a checksum failure before the tail stops the manager with a clear error.
 */
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { StoreBatch, StoreSnapshot } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError } from '../../common/errors.js';
import type { MemoryStore, Proposer } from './store.js';

const HEADER = 8; // u32 length, u32 crc32
const SNAPSHOT_EVERY = 20_000;

interface Pending {
  batch: StoreBatch;
  bytes: Uint8Array;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class LocalProposer implements Proposer {
  private fd: number;
  private index: number;
  private sinceSnapshot = 0;
  private queue: Pending[] = [];
  private scheduled = false;
  private closed = false;

  private constructor(
    private readonly dir: string,
    private readonly store: MemoryStore,
    fd: number,
    index: number,
    sinceSnapshot: number,
  ) {
    this.fd = fd;
    this.index = index;
    this.sinceSnapshot = sinceSnapshot;
  }

  /** Opens (or creates) the log under dir and replays it into store. */
  static open(dir: string, store: MemoryStore): LocalProposer {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const snapPath = path.join(dir, 'store.snap');
    const logPath = path.join(dir, 'store.log');
    let index = 0;
    if (fs.existsSync(snapPath)) {
      const buf = fs.readFileSync(snapPath);
      const rec = readRecord(buf, 0);
      if (!rec || rec.end !== buf.length || buf.length < HEADER + 8) throw new FlotillaError('INTERNAL', `store snapshot ${snapPath} is corrupt (checksum mismatch); refusing to start`);
      const view = Buffer.from(rec.payload);
      index = Number(view.readBigUInt64BE(0));
      store.restore(StoreSnapshot.decode(view.subarray(8)), index);
    }
    let sinceSnapshot = 0;
    if (fs.existsSync(logPath)) {
      const buf = fs.readFileSync(logPath);
      let off = 0;
      while (off < buf.length) {
        const rec = readRecord(buf, off);
        if (!rec) {
          // only a torn tail may be dropped: nothing valid may follow it
          if (hasValidRecordAfter(buf, off)) throw new FlotillaError('INTERNAL', `store log ${logPath} is corrupt at offset ${off}; refusing to start`);
          fs.truncateSync(logPath, off);
          break;
        }
        const view = Buffer.from(rec.payload);
        const i = Number(view.readBigUInt64BE(0));
        if (i > index) {
          try {
            store.applyBatch(StoreBatch.decode(view.subarray(8)), i);
          } catch {
            // a batch rejected when first applied is rejected again: same outcome as then
            store.appliedIndex = i;
          }
          index = i;
        }
        sinceSnapshot++;
        off = rec.end;
      }
    }
    const fd = fs.openSync(logPath, 'a', 0o600);
    return new LocalProposer(dir, store, fd, index, sinceSnapshot);
  }

  propose(batch: StoreBatch, signal?: AbortSignal): Promise<void> {
    if (this.closed) return Promise.reject(new FlotillaError('UNAVAILABLE', 'store is closed'));
    signal?.throwIfAborted();
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ batch, bytes: StoreBatch.encode(batch).finish(), resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.scheduled = false;
    const items = this.queue;
    this.queue = [];
    if (items.length === 0) return;
    const bufs: Buffer[] = [];
    const indexes: number[] = [];
    for (const it of items) {
      const i = ++this.index;
      indexes.push(i);
      const payload = Buffer.alloc(8 + it.bytes.length);
      payload.writeBigUInt64BE(BigInt(i), 0);
      payload.set(it.bytes, 8);
      bufs.push(frame(payload));
    }
    try {
      fs.writeSync(this.fd, Buffer.concat(bufs));
      fs.fsyncSync(this.fd);
    } catch (err) {
      this.index -= items.length;
      const e = new FlotillaError('UNAVAILABLE', `cannot write the store log: ${(err as Error).message}`);
      for (const it of items) it.reject(e);
      return;
    }
    items.forEach((it, k) => {
      try {
        this.store.applyBatch(it.batch, indexes[k] ?? 0);
        it.resolve();
      } catch (err) {
        it.reject(err);
      }
    });
    this.sinceSnapshot += items.length;
    if (this.sinceSnapshot >= SNAPSHOT_EVERY) this.snapshot();
  }

  /** Writes a snapshot of the store and truncates the log. */
  snapshot(): void {
    const snap = StoreSnapshot.encode(this.store.snapshot()).finish();
    const payload = Buffer.alloc(8 + snap.length);
    payload.writeBigUInt64BE(BigInt(this.index), 0);
    payload.set(snap, 8);
    const tmp = path.join(this.dir, 'store.snap.tmp');
    const fd = fs.openSync(tmp, 'w', 0o600);
    fs.writeSync(fd, frame(payload));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, path.join(this.dir, 'store.snap'));
    fs.ftruncateSync(this.fd, 0);
    fs.fsyncSync(this.fd);
    this.sinceSnapshot = 0;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.queue.length) this.flush();
    fs.closeSync(this.fd);
  }
}

function frame(payload: Buffer): Buffer {
  const b = Buffer.alloc(HEADER + payload.length);
  b.writeUInt32BE(payload.length, 0);
  b.writeUInt32BE(zlib.crc32(payload), 4);
  payload.copy(b, HEADER);
  return b;
}

function readRecord(buf: Buffer, off: number): { payload: Buffer; end: number } | undefined {
  if (off + HEADER > buf.length) return undefined;
  const len = buf.readUInt32BE(off);
  const crc = buf.readUInt32BE(off + 4);
  const end = off + HEADER + len;
  if (end > buf.length) return undefined;
  const payload = buf.subarray(off + HEADER, end);
  if (zlib.crc32(payload) !== crc) return undefined;
  return { payload, end };
}

function hasValidRecordAfter(buf: Buffer, off: number): boolean {
  // a bad record followed by a good one is corruption, not a torn write
  const len = off + HEADER <= buf.length ? buf.readUInt32BE(off) : 0;
  const next = off + HEADER + len;
  return next < buf.length && readRecord(buf, next) !== undefined;
}
