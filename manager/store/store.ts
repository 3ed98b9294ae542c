/**
 * The manager's store: typed objects (nodes, services, tasks, clusters) with transactional updates.
 *
 * Every write goes through the proposer seam: update() runs a transaction function against the
 * current state, turns what it changed into a StoreBatch, and hands that to the proposer (a local
 * durable log on a single manager, Raft on several). State changes only when the proposer applies
 * the batch (applyBatch), the same way on every manager. Optimistic concurrency: an update carries
 * the version it read; applying a batch whose object versions moved on rejects the whole batch on
 * every manager alike, and update() re-runs the transaction on fresh state.
 *
 * Each applied batch publishes one event per changed object, then a commit marker.
 */
import { Cluster, Node, Service, StoreAction, StoreActionKind, StoreBatch, StoreSnapshot, Task } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError } from '../../common/errors.js';
import { newId } from '../../common/ids.js';

export type Table = 'node' | 'service' | 'task' | 'cluster';
export type StoreObject = Node | Service | Task | Cluster;

export interface ObjectEvent {
  kind: 'create' | 'update' | 'delete';
  table: Table;
  /** the object after the change (for delete: as it was) */
  object: StoreObject;
  /** the object before the change, for updates */
  old?: StoreObject;
}
export interface CommitEvent {
  kind: 'commit';
  /** the proposer's index for this batch */
  index: number;
}
export type StoreEvent = ObjectEvent | CommitEvent;

/** The proposer seam: how a batch reaches every manager's store. */
export interface Proposer {
  /** Resolves once the batch has been applied to the local store (rejects with the apply error). */
  propose(batch: StoreBatch, signal?: AbortSignal): Promise<void>;
}

type Listener = (events: StoreEvent[]) => void;

const MAX_TX_RETRIES = 20;

export class MemoryStore {
  readonly nodes = new Map<string, Node>();
  readonly services = new Map<string, Service>();
  readonly tasks = new Map<string, Task>();
  readonly clusters = new Map<string, Cluster>();
  /** index of the last applied batch */
  appliedIndex = 0;
  private proposer: Proposer | undefined;
  private readonly listeners = new Set<Listener>();
  /** tasks by service id and by node id, kept in step with tasks */
  private readonly tasksByService = new Map<string, Set<string>>();
  private readonly tasksByNode = new Map<string, Set<string>>();

  setProposer(p: Proposer): void {
    this.proposer = p;
  }

  // ---- reads (synchronous: a run of reads without an await in between sees one consistent state)

  getNode(id: string): Node | undefined {
    return this.nodes.get(id);
  }
  getService(id: string): Service | undefined {
    return this.services.get(id);
  }
  getTask(id: string): Task | undefined {
    return this.tasks.get(id);
  }
  getCluster(): Cluster | undefined {
    for (const c of this.clusters.values()) return c;
    return undefined;
  }
  listNodes(): Node[] {
    return [...this.nodes.values()];
  }
  listServices(): Service[] {
    return [...this.services.values()];
  }
  listTasks(): Task[] {
    return [...this.tasks.values()];
  }
  tasksOfService(serviceId: string): Task[] {
    return this.tasksIn(this.tasksByService.get(serviceId));
  }
  tasksOfNode(nodeId: string): Task[] {
    return this.tasksIn(this.tasksByNode.get(nodeId));
  }
  private tasksIn(ids: Set<string> | undefined): Task[] {
    const out: Task[] = [];
    for (const id of ids ?? []) {
      const t = this.tasks.get(id);
      if (t) out.push(t);
    }
    return out;
  }
  serviceByName(name: string): Service | undefined {
    for (const s of this.services.values()) if (s.spec?.name === name) return s;
    return undefined;
  }

  // ---- writes

  /**
   * Runs fn in a transaction and proposes what it changed. Retries on version conflicts (fn must
   * only read the store through tx). Returns fn's result.
   */
  async update<T>(fn: (tx: Tx) => T, signal?: AbortSignal): Promise<T> {
    if (!this.proposer) throw new FlotillaError('UNAVAILABLE', 'store has no proposer');
    for (let attempt = 0; ; attempt++) {
      const tx = new Tx(this);
      const result = fn(tx);
      const actions = tx.actions();
      if (actions.length === 0) return result;
      try {
        await this.proposer.propose({ actions, proposalId: newId() }, signal);
        return result;
      } catch (err) {
        if (err instanceof FlotillaError && err.code === 'ABORTED' && attempt < MAX_TX_RETRIES && !signal?.aborted) continue;
        throw err;
      }
    }
  }

  /**
   * Applies a batch: all of it or none of it. Called by the proposer, on every manager, in log order.
   * Throws FlotillaError ABORTED (version conflict) or ALREADY_EXISTS; the state is then unchanged.
   */
  applyBatch(batch: StoreBatch, index: number): void {
    // validate first, so a rejected batch changes nothing
    const names = new Map<string, string>();
    for (const a of batch.actions) {
      const { table, obj } = unpack(a);
      const map = this.mapOf(table);
      const cur = map.get(obj.id);
      if (a.kind === StoreActionKind.STORE_ACTION_KIND_CREATE) {
        if (cur) throw new FlotillaError('ALREADY_EXISTS', `${table} ${obj.id} already exists`);
        if (table === 'service') {
          const name = (obj as Service).spec?.name ?? '';
          const other = this.serviceByName(name);
          if ((other && other.id !== obj.id) || (names.has(name) && names.get(name) !== obj.id))
            throw new FlotillaError('ALREADY_EXISTS', `service ${JSON.stringify(name)} already exists`);
          names.set(name, obj.id);
        }
      } else {
        if (!cur) throw new FlotillaError('ABORTED', `${table} ${obj.id} no longer exists`);
        if ((cur.meta?.version ?? 0) !== (obj.meta?.version ?? 0))
          throw new FlotillaError('ABORTED', `update out of sequence for ${table} ${obj.id}`);
        if (table === 'service' && a.kind === StoreActionKind.STORE_ACTION_KIND_UPDATE) {
          const name = (obj as Service).spec?.name ?? '';
          const other = this.serviceByName(name);
          if (other && other.id !== obj.id) throw new FlotillaError('ALREADY_EXISTS', `service ${JSON.stringify(name)} already exists`);
        }
      }
    }
    const events: StoreEvent[] = [];
    for (const a of batch.actions) {
      const { table, obj } = unpack(a);
      const map = this.mapOf(table) as Map<string, StoreObject>;
      const cur = map.get(obj.id);
      if (a.kind === StoreActionKind.STORE_ACTION_KIND_DELETE) {
        if (!cur) continue;
        map.delete(obj.id);
        if (table === 'task') this.unindexTask(cur as Task);
        events.push({ kind: 'delete', table, object: cur });
        continue;
      }
      const meta = { ...(obj.meta ?? { version: 0, createdAt: 0, updatedAt: 0 }) };
      meta.version = (cur?.meta?.version ?? 0) + 1;
      const next = { ...obj, meta } as StoreObject;
      map.set(obj.id, next);
      if (table === 'task') {
        if (cur) this.unindexTask(cur as Task);
        this.indexTask(next as Task);
      }
      events.push(cur ? { kind: 'update', table, object: next, old: cur } : { kind: 'create', table, object: next });
    }
    this.appliedIndex = index;
    events.push({ kind: 'commit', index });
    for (const l of this.listeners) {
      try {
        l(events);
      } catch {
        // listeners must not break apply
      }
    }
  }

  /** Subscribes to applied changes; returns the unsubscribe function. */
  subscribe(l: Listener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  /**
   * A watch queue: events after the call, as an async iterable, until signal aborts.
   * Take the initial full scan synchronously right after calling watch() to miss nothing.
   */
  watch(signal: AbortSignal): AsyncIterable<StoreEvent[]> {
    const queue: StoreEvent[][] = [];
    let wake: (() => void) | undefined;
    const unsubscribe = this.subscribe((evs) => {
      queue.push(evs);
      wake?.();
    });
    const onAbort = (): void => wake?.();
    signal.addEventListener('abort', onAbort, { once: true });
    return {
      [Symbol.asyncIterator]: async function* () {
        try {
          while (!signal.aborted) {
            if (queue.length === 0) {
              await new Promise<void>((resolve) => (wake = resolve));
              wake = undefined;
              continue;
            }
            // coalesce everything queued into one delivery
            const all = queue.splice(0, queue.length).flat();
            yield all;
          }
        } finally {
          unsubscribe();
          signal.removeEventListener('abort', onAbort);
        }
      },
    };
  }

  snapshot(): StoreSnapshot {
    return {
      nodes: this.listNodes(),
      services: this.listServices(),
      tasks: this.listTasks(),
      clusters: [...this.clusters.values()],
    };
  }

  restore(snap: StoreSnapshot, index: number): void {
    this.nodes.clear();
    this.services.clear();
    this.tasks.clear();
    this.clusters.clear();
    this.tasksByNode.clear();
    this.tasksByService.clear();
    for (const n of snap.nodes) this.nodes.set(n.id, n);
    for (const s of snap.services) this.services.set(s.id, s);
    for (const t of snap.tasks) {
      this.tasks.set(t.id, t);
      this.indexTask(t);
    }
    for (const c of snap.clusters) this.clusters.set(c.id, c);
    this.appliedIndex = index;
    const events: StoreEvent[] = [{ kind: 'commit', index }];
    for (const l of this.listeners) l(events);
  }

  private mapOf(table: Table): Map<string, StoreObject> {
    switch (table) {
      case 'node':
        return this.nodes;
      case 'service':
        return this.services;
      case 'task':
        return this.tasks;
      case 'cluster':
        return this.clusters;
    }
  }

  private indexTask(t: Task): void {
    addTo(this.tasksByService, t.serviceId, t.id);
    if (t.nodeId) addTo(this.tasksByNode, t.nodeId, t.id);
  }
  private unindexTask(t: Task): void {
    this.tasksByService.get(t.serviceId)?.delete(t.id);
    if (t.nodeId) this.tasksByNode.get(t.nodeId)?.delete(t.id);
  }
}

function addTo(m: Map<string, Set<string>>, k: string, v: string): void {
  let s = m.get(k);
  if (!s) m.set(k, (s = new Set()));
  s.add(v);
}

function unpack(a: StoreAction): { table: Table; obj: StoreObject } {
  if (a.node) return { table: 'node', obj: a.node };
  if (a.service) return { table: 'service', obj: a.service };
  if (a.task) return { table: 'task', obj: a.task };
  if (a.cluster) return { table: 'cluster', obj: a.cluster };
  throw new FlotillaError('INTERNAL', 'store action without an object');
}

function pack(kind: StoreActionKind, table: Table, obj: StoreObject): StoreAction {
  const a: StoreAction = { kind, node: undefined, service: undefined, task: undefined, cluster: undefined };
  a[table] = obj as never;
  return a;
}

/**
 * A transaction: reads see the store plus this transaction's own changes. Objects handed out are
 * the store's own; never mutate them: pass a modified copy to update().
 */
export class Tx {
  private readonly changes = new Map<string, { kind: StoreActionKind; table: Table; obj: StoreObject }>();
  constructor(readonly store: MemoryStore) {}

  private key(table: Table, id: string): string {
    return `${table}/${id}`;
  }

  get<T extends StoreObject>(table: Table, id: string): T | undefined {
    const c = this.changes.get(this.key(table, id));
    if (c) return c.kind === StoreActionKind.STORE_ACTION_KIND_DELETE ? undefined : (c.obj as T);
    const m = table === 'node' ? this.store.nodes : table === 'service' ? this.store.services : table === 'task' ? this.store.tasks : this.store.clusters;
    return m.get(id) as T | undefined;
  }

  create(table: Table, obj: StoreObject): void {
    if (this.get(table, obj.id)) throw new FlotillaError('ALREADY_EXISTS', `${table} ${obj.id} already exists`);
    const now = Date.now();
    const o = { ...obj, meta: { version: 0, createdAt: now, updatedAt: now } };
    this.changes.set(this.key(table, obj.id), { kind: StoreActionKind.STORE_ACTION_KIND_CREATE, table, obj: o });
  }

  /** obj must carry the meta.version it was read with. */
  update(table: Table, obj: StoreObject): void {
    const k = this.key(table, obj.id);
    const prior = this.changes.get(k);
    const o = { ...obj, meta: { ...(obj.meta ?? { version: 0, createdAt: 0 }), updatedAt: Date.now() } } as StoreObject;
    if (prior && prior.kind === StoreActionKind.STORE_ACTION_KIND_CREATE) {
      this.changes.set(k, { ...prior, obj: o });
      return;
    }
    if (!prior && !this.get(table, obj.id)) throw new FlotillaError('NOT_FOUND', `${table} ${obj.id} not found`);
    this.changes.set(k, { kind: StoreActionKind.STORE_ACTION_KIND_UPDATE, table, obj: o });
  }

  delete(table: Table, id: string): void {
    const k = this.key(table, id);
    const prior = this.changes.get(k);
    if (prior && prior.kind === StoreActionKind.STORE_ACTION_KIND_CREATE) {
      this.changes.delete(k);
      return;
    }
    const cur = this.get(table, id);
    if (!cur) return;
    this.changes.set(k, { kind: StoreActionKind.STORE_ACTION_KIND_DELETE, table, obj: cur });
  }

  actions(): StoreAction[] {
    return [...this.changes.values()].map((c) => pack(c.kind, c.table, c.obj));
  }

  get size(): number {
    return this.changes.size;
  }
}
