/**
 * An in-memory LogStorage (etcd's MemoryStorage in spirit). ents[0] is a dummy entry at the
 * compaction point: its index and term are those of the last entry folded into the snapshot.
 * The durable WAL (wal.ts) builds on the same shape; the simulator uses this class as "the disk".
 */
import { FlotillaError } from '../../common/errors.js';
import type { ConfState, Entry, HardState, LogStorage, Snapshot } from './types.js';

/** The requested index is below the compaction point. */
export class CompactedError extends FlotillaError {
  constructor(index: number, firstIndex: number) {
    super('FAILED_PRECONDITION', `raft log index ${index} is compacted (first index ${firstIndex})`);
    this.name = 'CompactedError';
  }
}

/** The requested index is beyond the last index. */
export class UnavailableError extends FlotillaError {
  constructor(index: number, lastIndex: number) {
    super('UNAVAILABLE', `raft log index ${index} is unavailable (last index ${lastIndex})`);
    this.name = 'UnavailableError';
  }
}

/** A snapshot older than (or as old as) the current one. */
export class SnapshotOutOfDateError extends FlotillaError {
  constructor(index: number, current: number) {
    super('FAILED_PRECONDITION', `raft snapshot at index ${index} is out of date (have ${current})`);
    this.name = 'SnapshotOutOfDateError';
  }
}

export const EMPTY_BUFFER: Buffer = Buffer.alloc(0);

export function emptySnapshot(): Snapshot {
  return { data: EMPTY_BUFFER, metadata: { index: 0, term: 0, confState: { voters: [], learners: [] } } };
}

export function snapIndex(s: Snapshot | undefined): number {
  return s?.metadata?.index ?? 0;
}

export function snapTerm(s: Snapshot | undefined): number {
  return s?.metadata?.term ?? 0;
}

/** Approximate encoded size of an entry (data plus a small header). */
export function entrySize(e: Entry): number {
  return e.data.length + 16;
}

/**
 * Take entries from the front of `ents` until their total size exceeds maxSize (always at least
 * one entry). Returns `ents` itself when nothing is cut.
 */
export function limitSize(ents: Entry[], maxSize: number): Entry[] {
  if (ents.length === 0) return ents;
  let size = entrySize(ents[0]!);
  let n = 1;
  for (; n < ents.length; n++) {
    size += entrySize(ents[n]!);
    if (size > maxSize) break;
  }
  return n === ents.length ? ents : ents.slice(0, n);
}

export class MemoryStorage implements LogStorage {
  private hardState: HardState = { term: 0, vote: 0, commit: 0 };
  private snap: Snapshot = emptySnapshot();
  /** ents[0] is the dummy entry at the snapshot point */
  private ents: Entry[] = [{ term: 0, index: 0, type: 0, data: EMPTY_BUFFER }];

  initialState(): { hardState: HardState; confState: ConfState } {
    const cs = this.snap.metadata?.confState ?? { voters: [], learners: [] };
    return {
      hardState: { ...this.hardState },
      confState: { voters: [...cs.voters], learners: [...cs.learners] },
    };
  }

  setHardState(hs: HardState): void {
    this.hardState = { term: hs.term, vote: hs.vote, commit: hs.commit };
  }

  private offset(): number {
    return this.ents[0]!.index;
  }

  firstIndex(): number {
    return this.offset() + 1;
  }

  lastIndex(): number {
    return this.offset() + this.ents.length - 1;
  }

  term(i: number): number {
    const offset = this.offset();
    if (i < offset) throw new CompactedError(i, offset + 1);
    const e = this.ents[i - offset];
    if (e === undefined) throw new UnavailableError(i, this.lastIndex());
    return e.term;
  }

  entries(lo: number, hi: number, maxSize: number): Entry[] {
    const offset = this.offset();
    if (lo <= offset) throw new CompactedError(lo, offset + 1);
    if (hi > this.lastIndex() + 1) throw new UnavailableError(hi - 1, this.lastIndex());
    if (lo >= hi) return [];
    // Only copy what maxSize admits.
    const out: Entry[] = [];
    let size = 0;
    for (let i = lo; i < hi; i++) {
      const e = this.ents[i - offset]!;
      size += entrySize(e);
      if (out.length > 0 && size > maxSize) break;
      out.push(e);
    }
    return out;
  }

  snapshot(): Snapshot {
    return this.snap;
  }

  /** Replace the whole log with a snapshot (a follower installing the leader's snapshot). */
  applySnapshot(snap: Snapshot): void {
    const idx = snapIndex(snap);
    const cur = snapIndex(this.snap);
    if (idx <= cur) throw new SnapshotOutOfDateError(idx, cur);
    this.snap = snap;
    this.ents = [{ term: snapTerm(snap), index: idx, type: 0, data: EMPTY_BUFFER }];
  }

  /**
   * Record a snapshot of the state machine at `index` (which must be applied, hence <= lastIndex).
   * Does not compact: call compact() to drop the entries it covers.
   */
  createSnapshot(index: number, confState: ConfState, data: Uint8Array): Snapshot {
    const cur = snapIndex(this.snap);
    if (index <= cur) throw new SnapshotOutOfDateError(index, cur);
    if (index > this.lastIndex()) throw new UnavailableError(index, this.lastIndex());
    const term = this.term(index);
    this.snap = {
      data: Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength),
      metadata: { index, term, confState: { voters: [...confState.voters], learners: [...confState.learners] } },
    };
    return this.snap;
  }

  /** Discard entries up to and including `index` (which becomes the dummy entry). */
  compact(index: number): void {
    const offset = this.offset();
    if (index <= offset) throw new CompactedError(index, offset + 1);
    if (index > this.lastIndex()) throw new UnavailableError(index, this.lastIndex());
    const first = this.ents[index - offset]!;
    const rest = this.ents.slice(index - offset + 1);
    this.ents = [{ term: first.term, index: first.index, type: 0, data: EMPTY_BUFFER }, ...rest];
  }

  /**
   * Append entries, overwriting any conflicting suffix. Entries must be contiguous and start at or
   * below lastIndex()+1; entries at or below the compaction point are ignored.
   */
  append(entries: Entry[]): void {
    if (entries.length === 0) return;
    const first = this.firstIndex();
    const lastNew = entries[entries.length - 1]!.index;
    if (lastNew < first) return;
    let ents = entries;
    if (first > ents[0]!.index) ents = ents.slice(first - ents[0]!.index);
    const start = ents[0]!.index;
    const offset = this.offset();
    const last = this.lastIndex();
    if (start > last + 1) {
      throw new FlotillaError('INTERNAL', `raft storage: missing log entries [last ${last}, append at ${start}]`);
    }
    if (start <= last) this.ents.length = start - offset; // truncate the conflicting suffix
    for (const e of ents) this.ents.push(e);
  }
}
