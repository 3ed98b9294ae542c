/**
 * The Ready handler: what a driver does with one Ready of the core, in the order that keeps every
 * acknowledged write durable. Shared by the production driver (node.ts, with the WAL and the gRPC
 * transport) and the deterministic simulator (testing/raft/sim.ts, with a simulated disk and
 * network), so the simulator checks the very ordering that runs in production.
 *
 * A Ready is handled in two steps around the fsync:
 *
 *   begin(rd):  soft state; a leader's early send (its appends and heartbeats go out before its own
 *               write is durable, Raft thesis 10.2.1, unless the term or vote changed or a snapshot
 *               is installed); persist (snapshot, then entries + hard state written, not yet
 *               durable); start the fsync; apply the committed entries that are already durable
 *               here (written and synced by an earlier Ready) while the fsync runs.
 *   (the fsync completes: the driver awaits it, the simulator lets simulated time pass)
 *   finish():   the core's storage takes the now-durable entries and hard state; the other
 *               messages are sent (after the fsync: votes and acks are only sent once durable);
 *               the snapshot and the remaining committed entries are applied (a lone voter
 *               commits on append: its own entries wait for the fsync); read states; advance.
 *
 * Only one Ready is handled at a time; whatever is stepped into the core during the fsync lands
 * in the next Ready and shares its fsync (group commit).
 */
import { MessageType, type Message } from '../../gen/flotilla/v1/raft.js';
import type { Entry, HardState, ReadState, Ready, Snapshot } from './types.js';
import type { MemoryStorage } from './memory-storage.js';

/** Where a Ready is persisted. S is what startSync() returns (a Promise in production). */
export interface ReadyDisk<S> {
  /** the log the core reads; the runner adds entries and hard state to it once they are durable */
  readonly storage: MemoryStorage;
  /** persist a snapshot (the runner then installs it in storage) */
  saveSnapshot(snap: Snapshot): void;
  /** write entries and hard state; not durable until a sync completes */
  write(hardState: HardState | undefined, entries: Entry[]): void;
  /** start making everything written so far durable */
  startSync(): S;
}

/** What the driver does with the Ready's outputs. */
export interface ReadyHost {
  onSoftState(lead: number, isLeader: boolean): void;
  send(msgs: Message[]): void;
  restoreSnapshot(snap: Snapshot): void;
  /** apply one committed entry (entries at or below the applied index are the host's to skip) */
  applyEntry(e: Entry): void;
  /** some entries were applied (wake whoever waits for the applied index) */
  afterApply(): void;
  readState(rs: ReadState): void;
  /** the core's advance(rd) */
  advance(rd: Ready): void;
}

/** One Ready between begin() and finish(). */
export interface ReadyStep<S> {
  readonly rd: Ready;
  /** the messages were sent before the fsync */
  readonly early: boolean;
  /** the fsync, when the Ready must be synced */
  readonly sync: S | undefined;
  /** an entry applied during the fsync threw: the driver waits for the fsync and fails */
  readonly error: unknown;
  /** committed entries applied so far */
  applied: number;
}

/**
 * A follower that took several appends in one Ready answers each of them; an accepting answer
 * implies every earlier accepting answer of the same term to the same leader (the leader keeps the
 * highest index it heard), so only the last one is sent. Rejections and other messages pass.
 */
export function coalesceAcks(msgs: Message[]): Message[] {
  if (msgs.length < 2) return msgs;
  let last: Map<number, Message> | undefined;
  for (const m of msgs) {
    if (m.type === MessageType.MESSAGE_TYPE_APP_RESP && !m.reject) (last ??= new Map()).set(m.to, m);
  }
  if (!last) return msgs;
  const out: Message[] = [];
  for (const m of msgs) {
    if (m.type === MessageType.MESSAGE_TYPE_APP_RESP && !m.reject) {
      const l = last.get(m.to)!;
      if (l !== m && l.term === m.term && l.index >= m.index) continue;
    }
    out.push(m);
  }
  return out;
}

/**
 * A leader's Ready often holds two appends for the same follower: one with the new entries, and an
 * empty one that only carries the commit index (sent when an acknowledgement advanced the commit).
 * Under load that is every other append, and each is a message the follower decodes and answers.
 * When a follower has an append with entries in the Ready, its empty appends are dropped and the
 * highest commit index among its appends is put on the ones kept: a follower takes
 * min(commit, last new index) from any accepted append, so it learns the same commit index, one
 * message sooner. Only appends of the same term are merged; every other message passes unchanged.
 */
export function coalesceAppends(msgs: Message[]): Message[] {
  if (msgs.length < 2) return msgs;
  const APP = MessageType.MESSAGE_TYPE_APP;
  let per: Map<number, { n: number; term: number; mixed: boolean; commit: number; full: boolean }> | undefined;
  for (const m of msgs) {
    if (m.type !== APP) continue;
    per ??= new Map();
    const p = per.get(m.to);
    if (!p) per.set(m.to, { n: 1, term: m.term, mixed: false, commit: m.commit, full: m.entries.length > 0 });
    else {
      p.n++;
      if (p.term !== m.term) p.mixed = true;
      if (m.commit > p.commit) p.commit = m.commit;
      if (m.entries.length > 0) p.full = true;
    }
  }
  if (!per || ![...per.values()].some((p) => p.n > 1 && p.full && !p.mixed)) return msgs;
  const out: Message[] = [];
  for (const m of msgs) {
    const p = m.type === APP ? per.get(m.to) : undefined;
    if (!p || p.n < 2 || !p.full || p.mixed) {
      out.push(m);
      continue;
    }
    if (m.entries.length === 0) continue;
    out.push(m.commit < p.commit ? { ...m, commit: p.commit } : m);
  }
  return out;
}

/**
 * A leader's empty appends, held back for a moment (production driver only). The core sends one
 * to every follower whenever an acknowledgement advances the commit index, so with one client
 * every write cost each follower two appends and two answers: the entry's, and the commit's. The
 * commit index is only news to the follower (the leader answers its client from its own apply),
 * and the next append carries it anyway. So an empty append waits up to `delayMs`: an append to
 * the same follower sent meanwhile takes its commit index (as in coalesceAppends) and it is
 * dropped; otherwise it is sent when the time is up. A later empty append replaces a held one of
 * the same follower (it carries the leader's newer view). Messages are never reordered otherwise;
 * Raft tolerates the delay (a follower's commit index may lag, never run ahead), and linearizable
 * reads are unaffected (ReadIndex heartbeats carry the commit index and are not held).
 */
export class HeldEmptyAppends {
  private readonly held = new Map<number, Message>();
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly out: (msgs: Message[]) => void,
    private readonly delayMs: number,
  ) {}

  /** how many empty appends were dropped because a later append carried their commit index */
  merged = 0;

  send(msgs: Message[]): void {
    const APP = MessageType.MESSAGE_TYPE_APP;
    let out: Message[] | undefined;
    for (const m of msgs) {
      if (m.type !== APP) {
        (out ??= []).push(m);
        continue;
      }
      const h = this.held.get(m.to);
      if (m.entries.length === 0) {
        this.held.set(m.to, h && h.term === m.term && h.commit > m.commit ? { ...m, commit: h.commit } : m);
        continue;
      }
      let send = m;
      if (h) {
        this.held.delete(m.to);
        if (h.term === m.term) {
          this.merged++;
          if (h.commit > m.commit) send = { ...m, commit: h.commit };
        }
      }
      (out ??= []).push(send);
    }
    if (out) this.out(out);
    if (this.held.size > 0 && this.timer === undefined) this.timer = setTimeout(() => this.flush(), this.delayMs);
  }

  /** Send what is held now. */
  flush(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.held.size === 0) return;
    const msgs = [...this.held.values()];
    this.held.clear();
    this.out(msgs);
  }

  /** Forget what is held (the node stops). */
  clear(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.held.clear();
  }
}

export class ReadyRunner<S> {
  /** this node is the leader (from the last soft state) */
  leader = false;

  constructor(
    private readonly disk: ReadyDisk<S>,
    private readonly host: ReadyHost,
  ) {}

  /** Everything up to the fsync: soft state, early send, persist, start the fsync, apply what is already durable. */
  begin(rd: Ready): ReadyStep<S> {
    const host = this.host;
    if (rd.softState) {
      this.leader = rd.softState.role === 'leader';
      host.onSoftState(rd.softState.lead, this.leader);
    }
    const disk = this.disk;
    const storage = disk.storage;
    // A leader may send before its own write is durable: it has counted itself towards a commit,
    // but the commit only takes effect (is applied, or sent on) after this Ready's fsync. Not when
    // the term or vote changed: those must be durable before anyone hears of them.
    const prev = storage.initialState().hardState;
    const termOrVote = rd.hardState !== undefined && (rd.hardState.term !== prev.term || rd.hardState.vote !== prev.vote);
    const early = this.leader && !termOrVote && !rd.snapshot;
    if (early && rd.messages.length > 0) host.send(coalesceAppends(rd.messages));
    if (rd.snapshot) {
      disk.saveSnapshot(rd.snapshot);
      storage.applySnapshot(rd.snapshot);
    }
    disk.write(rd.hardState, rd.entries);
    const sync = rd.mustSync ? disk.startSync() : undefined;
    // Committed entries already durable here are applied while the fsync runs: a write is
    // acknowledged one fsync sooner. Those of this very Ready wait for the fsync.
    const committed = rd.committedEntries;
    let ci = 0;
    let error: unknown;
    if (!rd.snapshot && committed.length > 0) {
      const durable = storage.lastIndex();
      try {
        while (ci < committed.length && committed[ci]!.index <= durable) host.applyEntry(committed[ci++]!);
      } catch (err) {
        error = err;
      }
      if (ci > 0 && error === undefined) host.afterApply();
    }
    return { rd, early, sync, error, applied: ci };
  }

  /** Everything after the fsync: storage, send, apply, read states, advance. */
  finish(step: ReadyStep<S>): void {
    const { rd } = step;
    const host = this.host;
    const storage = this.disk.storage;
    if (rd.hardState) storage.setHardState(rd.hardState);
    storage.append(rd.entries);
    if (!step.early && rd.messages.length > 0) host.send(coalesceAppends(coalesceAcks(rd.messages)));
    if (rd.snapshot) host.restoreSnapshot(rd.snapshot);
    const committed = rd.committedEntries;
    for (; step.applied < committed.length; step.applied++) host.applyEntry(committed[step.applied]!);
    for (const rs of rd.readStates) host.readState(rs);
    host.advance(rd);
    host.afterApply();
  }
}
