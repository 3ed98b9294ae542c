/**
 * The store's change history, for the control API's Watch (docs/controlapi.md, "Events").
 *
 * Every manager applies the same Raft entries in the same order, so an event is named the same way
 * on all of them: (revision, index) = (the Raft index of the entry that made the change, the change's
 * place among the entry's changes), and its time is the batch's proposed_at (set by the proposer,
 * carried in the entry). A client that saw events up to (r, i) on one manager can resume after
 * (r, i) on any other without losing or repeating one.
 *
 * Each manager keeps the last MAX_EVENTS changes in memory. `floor` is the revision from which the
 * history is complete: a resume from a revision below it fails (the caller gets OUT_OF_RANGE). A
 * snapshot restore (a manager starting from its snapshot, or a follower catching up by one) clears
 * the history: its floor becomes the snapshot's index.
 */
import { Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import type { MemoryStore, ObjectEvent, StoreEvent, Table } from './store.js';

export const MAX_EVENTS = 20_000;

/**
 * What is kept of a change: a few names, never the object itself (holding 20,000 old versions of
 * tasks with 128 KiB specs would hold gigabytes).
 */
export interface ChangeSummary {
  table: Table;
  kind: 'create' | 'update' | 'delete';
  id: string;
  name: string;
  serviceId: string;
  serviceName: string;
  nodeId: string;
  /** tasks: the state, lower case (running, complete...) */
  state: string;
}

export interface HistoryEvent {
  revision: number;
  index: number;
  time: number;
  event: ChangeSummary;
}

export function summarize(e: ObjectEvent): ChangeSummary {
  const o = e.object as { id: string; spec?: { name?: string } };
  const out: ChangeSummary = { table: e.table, kind: e.kind, id: o.id, name: '', serviceId: '', serviceName: '', nodeId: '', state: '' };
  if (e.table === 'node') out.name = e.object.description?.hostname ?? '';
  else if (e.table === 'task') {
    const t = e.object as Task;
    out.serviceId = t.serviceId;
    out.serviceName = t.serviceName;
    out.nodeId = t.nodeId;
    out.name = `${t.serviceName}.${t.slot || t.nodeId}`;
    out.state = (TaskState[t.status?.state ?? 0] ?? '').replace(/^TASK_STATE_/, '').toLowerCase();
  } else out.name = o.spec?.name ?? '';
  if (e.table === 'service') {
    out.serviceId = o.id;
    out.serviceName = out.name;
  }
  return out;
}

export type HistoryListener = (evs: HistoryEvent[]) => void;

export class StoreHistory {
  private events: HistoryEvent[] = [];
  /** events of revisions > floor are all kept */
  floor: number;
  private readonly listeners = new Set<HistoryListener>();
  private readonly resetListeners = new Set<() => void>();
  private readonly unsubscribe: () => void;

  constructor(
    store: MemoryStore,
    private readonly max = MAX_EVENTS,
  ) {
    this.floor = store.appliedIndex;
    this.unsubscribe = store.subscribe((evs) => this.onApply(evs));
  }

  close(): void {
    this.unsubscribe();
    this.listeners.clear();
    this.resetListeners.clear();
  }

  /** The revision of the last change applied (or the floor when none is kept). */
  get last(): number {
    return this.events.at(-1)?.revision ?? this.floor;
  }

  private onApply(evs: StoreEvent[]): void {
    const commit = evs.at(-1);
    if (!commit || commit.kind !== 'commit') return;
    if (commit.restored) {
      this.events = [];
      this.floor = commit.index;
      for (const r of this.resetListeners) r();
      return;
    }
    const out: HistoryEvent[] = [];
    let i = 0;
    for (const e of evs) {
      if (e.kind === 'commit') continue;
      out.push({ revision: commit.index, index: i++, time: commit.time ?? 0, event: summarize(e) });
    }
    if (out.length === 0) return;
    this.events.push(...out);
    if (this.events.length > this.max) {
      // drop whole revisions, so the floor stays a revision boundary
      let cut = this.events.length - this.max;
      const rev = this.events[cut - 1]!.revision;
      while (cut < this.events.length && this.events[cut]!.revision === rev) cut++;
      this.floor = rev;
      this.events = this.events.slice(cut);
    }
    for (const l of this.listeners) l(out);
  }

  /** Kept events after (revision, index), in order. */
  after(revision: number, index: number): HistoryEvent[] {
    // binary search for the first event past the position
    let lo = 0;
    let hi = this.events.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const e = this.events[mid]!;
      if (e.revision < revision || (e.revision === revision && e.index <= index)) lo = mid + 1;
      else hi = mid;
    }
    return this.events.slice(lo);
  }

  /** Kept events at or after a time. */
  since(timeMs: number): HistoryEvent[] {
    return this.events.filter((e) => e.time >= timeMs);
  }

  /** l gets each applied entry's events; onReset is called when a snapshot replaced the state. */
  subscribe(l: HistoryListener, onReset?: () => void): () => void {
    this.listeners.add(l);
    if (onReset) this.resetListeners.add(onReset);
    return () => {
      this.listeners.delete(l);
      if (onReset) this.resetListeners.delete(onReset);
    };
  }
}
