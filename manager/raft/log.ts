/**
 * The core's view of the log: what stable storage holds (LogStorage, read only) plus the
 * "unstable" tail not yet persisted (entries appended since the last Ready, or an incoming snapshot).
 */
import { FlotillaError } from '../../common/errors.js';
import { CompactedError, UnavailableError, limitSize, snapIndex, snapTerm } from './memory-storage.js';
import type { Entry, LogStorage, Snapshot } from './types.js';

class Unstable {
  snapshot: Snapshot | undefined;
  snapshotInProgress = false;
  entries: Entry[] = [];
  /** index of entries[0] */
  offset: number;
  /** entries below this index were handed out in a Ready and await advance() */
  offsetInProgress: number;

  constructor(offset: number) {
    this.offset = offset;
    this.offsetInProgress = offset;
  }

  maybeFirstIndex(): number | undefined {
    return this.snapshot ? snapIndex(this.snapshot) + 1 : undefined;
  }

  maybeLastIndex(): number | undefined {
    if (this.entries.length > 0) return this.offset + this.entries.length - 1;
    return this.snapshot ? snapIndex(this.snapshot) : undefined;
  }

  maybeTerm(i: number): number | undefined {
    if (i < this.offset) {
      if (this.snapshot && snapIndex(this.snapshot) === i) return snapTerm(this.snapshot);
      return undefined;
    }
    const e = this.entries[i - this.offset];
    return e?.term;
  }

  /** entries not yet handed out in a Ready */
  nextEntries(): Entry[] {
    const start = this.offsetInProgress - this.offset;
    if (start >= this.entries.length) return [];
    return start === 0 ? this.entries.slice() : this.entries.slice(start);
  }

  acceptInProgress(): void {
    if (this.entries.length > 0) this.offsetInProgress = this.offset + this.entries.length;
    if (this.snapshot) this.snapshotInProgress = true;
  }

  stableTo(i: number, t: number): void {
    const gt = this.maybeTerm(i);
    if (gt === undefined || gt !== t || i < this.offset) return; // superseded meanwhile
    const n = i + 1 - this.offset;
    this.entries = n >= this.entries.length ? [] : this.entries.slice(n);
    this.offset = i + 1;
    if (this.offsetInProgress < this.offset) this.offsetInProgress = this.offset;
  }

  stableSnapTo(i: number): void {
    if (this.snapshot && snapIndex(this.snapshot) === i) {
      this.snapshot = undefined;
      this.snapshotInProgress = false;
    }
  }

  restore(s: Snapshot): void {
    this.offset = snapIndex(s) + 1;
    this.offsetInProgress = this.offset;
    this.entries = [];
    this.snapshot = s;
    this.snapshotInProgress = false;
  }

  truncateAndAppend(ents: Entry[]): void {
    const from = ents[0]!.index;
    if (from === this.offset + this.entries.length) {
      for (const e of ents) this.entries.push(e);
    } else if (from <= this.offset) {
      this.entries = ents.slice();
      this.offset = from;
      this.offsetInProgress = from;
    } else {
      this.entries = this.entries.slice(0, from - this.offset);
      for (const e of ents) this.entries.push(e);
      if (this.offsetInProgress > from) this.offsetInProgress = from;
    }
  }

  slice(lo: number, hi: number): Entry[] {
    return this.entries.slice(lo - this.offset, hi - this.offset);
  }
}

export class RaftLog {
  readonly storage: LogStorage;
  readonly unstable: Unstable;
  committed: number;
  /** highest index handed to the application in a Ready (applying), and acknowledged (applied) */
  applying: number;
  applied: number;
  readonly maxApplyingSize: number;

  constructor(storage: LogStorage, maxApplyingSize: number) {
    this.storage = storage;
    this.maxApplyingSize = maxApplyingSize;
    const first = storage.firstIndex();
    const last = storage.lastIndex();
    this.unstable = new Unstable(last + 1);
    this.committed = first - 1;
    this.applying = first - 1;
    this.applied = first - 1;
  }

  firstIndex(): number {
    return this.unstable.maybeFirstIndex() ?? this.storage.firstIndex();
  }

  lastIndex(): number {
    return this.unstable.maybeLastIndex() ?? this.storage.lastIndex();
  }

  lastTerm(): number {
    return this.term(this.lastIndex());
  }

  /** term of entry i; 0 past the end; throws CompactedError below the compaction point */
  term(i: number): number {
    const u = this.unstable.maybeTerm(i);
    if (u !== undefined) return u;
    const dummy = this.firstIndex() - 1;
    if (i < dummy) throw new CompactedError(i, dummy + 1);
    if (i > this.lastIndex()) return 0;
    try {
      return this.storage.term(i);
    } catch (err) {
      if (err instanceof UnavailableError) return 0;
      throw err;
    }
  }

  /** term of i, or undefined when compacted */
  termOrUndefined(i: number): number | undefined {
    try {
      return this.term(i);
    } catch (err) {
      if (err instanceof CompactedError) return undefined;
      throw err;
    }
  }

  matchTerm(i: number, t: number): boolean {
    return this.termOrUndefined(i) === t;
  }

  isUpToDate(lasti: number, term: number): boolean {
    const lt = this.lastTerm();
    return term > lt || (term === lt && lasti >= this.lastIndex());
  }

  /**
   * Follower side of AppendEntries. Returns the index of the last new entry, or undefined when the
   * log does not contain an entry at `index` with term `logTerm`.
   */
  maybeAppend(index: number, logTerm: number, committed: number, ents: Entry[]): number | undefined {
    if (!this.matchTerm(index, logTerm)) return undefined;
    const lastNew = index + ents.length;
    const ci = this.findConflict(ents);
    if (ci !== 0) {
      if (ci <= this.committed) {
        throw new FlotillaError('INTERNAL', `raft: entry ${ci} conflicts with committed entry (committed ${this.committed})`);
      }
      this.append(ci === ents[0]!.index ? ents : ents.slice(ci - ents[0]!.index));
    }
    this.commitTo(Math.min(committed, lastNew));
    return lastNew;
  }

  /** index of the first entry of ents that is not in the log with the same term, or 0 */
  findConflict(ents: Entry[]): number {
    const last = this.lastIndex();
    for (const e of ents) {
      if (e.index > last) return e.index;
      const t = this.termOrUndefined(e.index);
      if (t === undefined) continue; // compacted: committed, hence matching
      if (t !== e.term) return e.index;
    }
    return 0;
  }

  /**
   * The largest index <= `index` whose term is <= `term` (the fast back-off of AppendEntries
   * rejections). Returns the compaction point when it walks into it.
   */
  findConflictByTerm(index: number, term: number): { index: number; term: number } {
    let i = Math.min(index, this.lastIndex());
    for (; i > 0; i--) {
      const t = this.termOrUndefined(i);
      if (t === undefined) return { index: i, term: 0 };
      if (t <= term) return { index: i, term: t };
    }
    return { index: 0, term: 0 };
  }

  append(ents: Entry[]): number {
    if (ents.length === 0) return this.lastIndex();
    const after = ents[0]!.index - 1;
    if (after < this.committed) {
      throw new FlotillaError('INTERNAL', `raft: append after ${after} is below committed ${this.committed}`);
    }
    this.unstable.truncateAndAppend(ents);
    return this.lastIndex();
  }

  commitTo(i: number): void {
    if (i <= this.committed) return;
    if (i > this.lastIndex()) {
      throw new FlotillaError('INTERNAL', `raft: commit ${i} is out of range (last index ${this.lastIndex()})`);
    }
    this.committed = i;
  }

  maybeCommit(maxIndex: number, term: number): boolean {
    if (maxIndex > this.committed && this.termOrUndefined(maxIndex) === term) {
      this.commitTo(maxIndex);
      return true;
    }
    return false;
  }

  appliedTo(i: number): void {
    if (i === 0) return;
    if (i > this.committed) {
      throw new FlotillaError('INTERNAL', `raft: applied ${i} is above committed ${this.committed}`);
    }
    if (i > this.applied) this.applied = i;
    if (i > this.applying) this.applying = i;
  }

  hasNextCommittedEnts(): boolean {
    if (this.unstable.snapshot) return false; // apply the snapshot first
    const lo = Math.max(this.applying + 1, this.firstIndex());
    return this.committed + 1 > lo;
  }

  nextCommittedEnts(): Entry[] {
    if (!this.hasNextCommittedEnts()) return [];
    const lo = Math.max(this.applying + 1, this.firstIndex());
    return this.slice(lo, this.committed + 1, this.maxApplyingSize);
  }

  snapshot(): Snapshot {
    return this.unstable.snapshot ?? this.storage.snapshot();
  }

  /** entries [lo, hi) limited to maxSize bytes (at least one) */
  slice(lo: number, hi: number, maxSize: number): Entry[] {
    if (lo >= hi) return [];
    const first = this.firstIndex();
    if (lo < first) throw new CompactedError(lo, first);
    const last = this.lastIndex();
    if (hi > last + 1) throw new UnavailableError(hi - 1, last);
    const uoff = this.unstable.offset;
    let ents: Entry[] = [];
    if (lo < uoff) {
      ents = this.storage.entries(lo, Math.min(hi, uoff), maxSize);
      if (ents.length < Math.min(hi, uoff) - lo) return ents; // size limit hit
    }
    if (hi > uoff) {
      const u = this.unstable.slice(Math.max(lo, uoff), hi);
      ents = ents.length > 0 ? ents.concat(u) : u;
    }
    return limitSize(ents, maxSize);
  }

  entriesFrom(i: number, maxSize: number): Entry[] {
    const last = this.lastIndex();
    if (i > last) return [];
    return this.slice(i, last + 1, maxSize);
  }

  restore(s: Snapshot): void {
    this.committed = snapIndex(s);
    this.unstable.restore(s);
  }

  stableTo(i: number, t: number): void {
    this.unstable.stableTo(i, t);
  }

  stableSnapTo(i: number): void {
    this.unstable.stableSnapTo(i);
  }
}
