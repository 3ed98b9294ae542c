/**
 * The leader's view of each follower: match/next indexes and the flow-control state machine
 * (probe: one append in flight until answered; replicate: up to maxInflight appends in flight,
 * optimistically advancing next; snapshot: nothing sent until the snapshot is reported).
 */

export type ProgressState = 'probe' | 'replicate' | 'snapshot';

/** A ring buffer of the last index carried by each in-flight append message. */
export class Inflights {
  private start = 0;
  count = 0;
  private readonly buf: number[];

  constructor(readonly size: number) {
    this.buf = new Array<number>(size).fill(0);
  }

  add(index: number): void {
    if (this.full()) throw new Error('raft: inflights overflow');
    this.buf[(this.start + this.count) % this.size] = index;
    this.count++;
  }

  /** free all in-flight messages whose last index is <= to */
  freeLE(to: number): void {
    while (this.count > 0 && this.buf[this.start]! <= to) {
      this.start = (this.start + 1) % this.size;
      this.count--;
    }
    if (this.count === 0) this.start = 0;
  }

  freeFirstOne(): void {
    if (this.count === 0) return;
    this.start = (this.start + 1) % this.size;
    this.count--;
  }

  full(): boolean {
    return this.count >= this.size;
  }

  reset(): void {
    this.start = 0;
    this.count = 0;
  }
}

export class Progress {
  match = 0;
  next: number;
  state: ProgressState = 'probe';
  /** snapshot index being sent (snapshot state) */
  pendingSnapshot = 0;
  /** heard from within the current election timeout (check-quorum) */
  recentActive = false;
  /** probe state: an append is in flight; pause until it (or a heartbeat) is answered */
  probeSent = false;
  readonly inflights: Inflights;
  isLearner: boolean;

  constructor(next: number, maxInflight: number, isLearner: boolean) {
    this.next = next;
    this.inflights = new Inflights(maxInflight);
    this.isLearner = isLearner;
  }

  private reset(state: ProgressState): void {
    this.probeSent = false;
    this.pendingSnapshot = 0;
    this.state = state;
    this.inflights.reset();
  }

  becomeProbe(): void {
    if (this.state === 'snapshot') {
      const pending = this.pendingSnapshot;
      this.reset('probe');
      this.next = Math.max(this.match + 1, pending + 1);
    } else {
      this.reset('probe');
      this.next = this.match + 1;
    }
  }

  becomeReplicate(): void {
    this.reset('replicate');
    this.next = this.match + 1;
  }

  becomeSnapshot(snapshotIndex: number): void {
    this.reset('snapshot');
    this.pendingSnapshot = snapshotIndex;
  }

  /** an append up to `last` was sent */
  sentEntries(last: number, hadEntries: boolean): void {
    if (this.state === 'replicate') {
      if (hadEntries) {
        this.next = last + 1;
        this.inflights.add(last);
      }
    } else if (this.state === 'probe') {
      this.probeSent = true;
    }
  }

  /** a successful append response for index n; returns whether match advanced */
  maybeUpdate(n: number): boolean {
    let updated = false;
    if (this.match < n) {
      this.match = n;
      updated = true;
      this.probeSent = false;
    }
    if (this.next < n + 1) this.next = n + 1;
    return updated;
  }

  /**
   * A rejected append of index `rejected`, with the follower's hint `matchHint`. Returns false
   * when the rejection is stale (already superseded).
   */
  maybeDecrTo(rejected: number, matchHint: number): boolean {
    if (this.state === 'replicate') {
      if (rejected <= this.match) return false;
      this.next = this.match + 1;
      return true;
    }
    if (this.next - 1 !== rejected) return false;
    this.next = Math.max(Math.min(rejected, matchHint + 1), this.match + 1);
    this.probeSent = false;
    return true;
  }

  isPaused(): boolean {
    switch (this.state) {
      case 'probe':
        return this.probeSent;
      case 'replicate':
        return this.inflights.full();
      case 'snapshot':
        return true;
    }
  }
}
