/**
 * The manager's store: typed objects (nodes, services, tasks, clusters, networks, secrets, configs)
 * with transactional updates.
 *
 * Every write goes through the proposer seam: update() runs a transaction function against the
 * current state, turns what it changed into a StoreBatch, and hands that to the proposer (Raft in a
 * manager, even a lone one; MemoryProposer in tests). State changes only when the proposer applies
 * the batch (applyBatch), the same way on every manager. Optimistic concurrency: an update carries
 * the version it read; applying a batch whose object versions moved on rejects the whole batch on
 * every manager alike, and update() re-runs the transaction on fresh state.
 *
 * One batch is one Raft proposal, so it must stay under the proposal cap: update() refuses a batch
 * over MAX_BATCH_BYTES (RESOURCE_EXHAUSTED), and updateBatched() splits what one transaction changed
 * into batches that fit, for writers (orchestrators, scheduler, reaper) that change many objects.
 *
 * Each applied batch publishes one event per changed object, then a commit marker.
 */
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import { Cluster, Config, Network, Node, Secret, Service, StoreAction, StoreActionKind, StoreBatch, StoreSnapshot, Task } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { newId } from '../../common/ids.js';
import { createLogger, type Logger } from '../../common/log.js';

/** What each table holds. */
export interface Tables {
  node: Node;
  service: Service;
  task: Task;
  cluster: Cluster;
  network: Network;
  secret: Secret;
  config: Config;
}
export type Table = keyof Tables;
export type StoreObject = Tables[Table];

/**
 * The largest batch (encoded StoreBatch) the store proposes: a quarter of Raft's proposal cap
 * (MAX_PROPOSAL, 8 MiB, in manager/raft/node.ts), leaving room for the entry envelope and for the
 * message and snapshot limits. The control API's spec limits (manager/controlapi/validate.ts) keep
 * a single task or service far below it.
 */
export const MAX_BATCH_BYTES = 2 * 1024 * 1024;

/** One object's change; `table` narrows `object` to the table's type. */
export type ObjectEvent = {
  [K in Table]: {
    kind: 'create' | 'update' | 'delete';
    table: K;
    /** the object after the change (for delete: as it was) */
    object: Tables[K];
    /** the object before the change, for updates */
    old?: Tables[K];
  };
}[Table];
export interface CommitEvent {
  kind: 'commit';
  /** the proposer's index for this batch */
  index: number;
  /** when the batch was proposed (ms; the same on every manager); 0 for a snapshot restore */
  time?: number;
  /** a snapshot replaced the whole state (no object events precede it) */
  restored?: boolean;
}
export type StoreEvent = ObjectEvent | CommitEvent;

/** The proposer seam: how a batch reaches every manager's store. */
export interface Proposer {
  /**
   * Resolves once the batch has been applied to the local store (rejects with the apply error).
   * `encoded` gives the batch's encoding, the same bytes as StoreBatch.encode(batch), from the
   * actions' encodings the store already made to measure the batch: a proposer that sends bytes
   * calls it instead of encoding again; one that does not (etcd) pays nothing.
   */
  propose(batch: StoreBatch, signal?: AbortSignal, encoded?: () => Uint8Array): Promise<void>;
  /** the largest batch this proposer takes (default MAX_BATCH_BYTES; etcd's request limit is lower) */
  readonly maxBatchBytes?: number;
  /** the most changes one batch may hold (default: no limit; etcd caps operations per transaction) */
  readonly maxBatchActions?: number;
  /**
   * The proposer measures what it sends and refuses a batch over its limit itself (RESOURCE_EXHAUSTED,
   * nothing written), and never asks for `encoded`: update() then does not encode the actions just
   * to measure them (etcd: each object is encoded and sealed on its own there anyway).
   */
  readonly measuresBatches?: boolean;
}

/** One object's new state as a proposer that is not Raft delivers it (etcd's watch): undefined = deleted. */
export interface ObjectChange {
  table: Table;
  id: string;
  object: StoreObject | undefined;
}

type Listener = (events: StoreEvent[]) => void;

const MAX_TX_RETRIES = 20;
/** StoreBatch framing besides its actions: the proposal id (field tag, length, 32 hex characters) */
const BATCH_OVERHEAD = 64;

export class MemoryStore {
  private readonly tables: { readonly [K in Table]: Map<string, Tables[K]> } = {
    node: new Map(),
    service: new Map(),
    task: new Map(),
    cluster: new Map(),
    network: new Map(),
    secret: new Map(),
    config: new Map(),
  };
  readonly nodes = this.tables.node;
  readonly services = this.tables.service;
  readonly tasks = this.tables.task;
  readonly clusters = this.tables.cluster;
  readonly networks = this.tables.network;
  readonly secrets = this.tables.secret;
  readonly configs = this.tables.config;
  /** index of the last applied batch */
  appliedIndex = 0;
  private proposer: Proposer | undefined;
  private readonly listeners = new Set<Listener>();
  /** tasks by service id and by node id, kept in step with tasks */
  private readonly tasksByService = new Map<string, Set<string>>();
  private readonly tasksByNode = new Map<string, Set<string>>();

  constructor(private readonly log: Logger = createLogger('store')) {}

  setProposer(p: Proposer): void {
    this.proposer = p;
  }

  /** The map behind a table (the one table-to-map lookup). */
  table<K extends Table>(table: K): Map<string, Tables[K]> {
    return this.tables[table];
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
  /** Whether any task (in any state) is on this node, without listing them. */
  nodeHasTasks(nodeId: string): boolean {
    return (this.tasksByNode.get(nodeId)?.size ?? 0) > 0;
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
   * Runs fn in a transaction and proposes what it changed, as one batch: all of it or none of it.
   * Retries on version conflicts (fn must only read the store through tx). Returns fn's result.
   * A batch over MAX_BATCH_BYTES is refused with RESOURCE_EXHAUSTED (see updateBatched).
   */
  async update<T>(fn: (tx: Tx) => T, signal?: AbortSignal): Promise<T> {
    const proposer = this.requireProposer();
    for (let attempt = 0; ; attempt++) {
      const tx = new Tx(this);
      const result = fn(tx);
      const actions = tx.actions();
      if (actions.length === 0) return result;
      // each action is encoded once: for its size here, and then as part of the proposal's bytes
      // (not for a proposer that measures what it sends itself)
      const encoded = proposer.measuresBatches ? undefined : actions.map(encodeAction);
      if (encoded) {
        const size = encoded.reduce((n, e) => n + framedSize(e), BATCH_OVERHEAD);
        const max = proposer.maxBatchBytes ?? MAX_BATCH_BYTES;
        if (size > max)
          throw new FlotillaError('RESOURCE_EXHAUSTED', `a store batch of ${size} bytes (${actions.length} changes) is over the limit of ${max} bytes`);
      }
      if (proposer.maxBatchActions !== undefined && actions.length > proposer.maxBatchActions)
        throw new FlotillaError('RESOURCE_EXHAUSTED', `a store batch of ${actions.length} changes is over the store's limit of ${proposer.maxBatchActions} changes per transaction`);
      try {
        const batch: StoreBatch = { actions, proposalId: newId(), proposedAt: Date.now() };
        await proposer.propose(batch, signal, encoded ? () => encodeBatch(batch, encoded) : undefined);
        return result;
      } catch (err) {
        if (isConflict(err) && attempt < MAX_TX_RETRIES && !signal?.aborted) continue;
        throw err;
      }
    }
  }

  /**
   * Like update(), but what fn changed is proposed in as many batches as it takes to keep each under
   * MAX_BATCH_BYTES, in order; changes made inside one tx.together() call stay in one batch. Not
   * atomic as a whole: for reconcilers, which carry on from whatever was applied. On a version
   * conflict, fn runs again on fresh state (and sees the batches already applied). Returns fn's
   * result (of its last run).
   */
  async updateBatched<T>(fn: (tx: Tx) => T, signal?: AbortSignal): Promise<T> {
    const proposer = this.requireProposer();
    for (let attempt = 0; ; attempt++) {
      const tx = new Tx(this);
      const result = fn(tx);
      try {
        for (const { actions, encoded } of splitEncoded(tx.groups(), (proposer.maxBatchBytes ?? MAX_BATCH_BYTES) - BATCH_OVERHEAD, proposer.maxBatchActions)) {
          if (signal?.aborted) return result;
          const batch: StoreBatch = { actions, proposalId: newId(), proposedAt: Date.now() };
          await proposer.propose(batch, signal, () => encodeBatch(batch, encoded));
        }
        return result;
      } catch (err) {
        if (isConflict(err) && attempt < MAX_TX_RETRIES && !signal?.aborted) continue;
        throw err;
      }
    }
  }

  private requireProposer(): Proposer {
    if (!this.proposer) throw new FlotillaError('UNAVAILABLE', 'store has no proposer');
    return this.proposer;
  }

  /**
   * Applies a batch: all of it or none of it. Called by the proposer, on every manager, in log order.
   * Throws FlotillaError ABORTED (version conflict) or ALREADY_EXISTS; the state is then unchanged.
   */
  applyBatch(batch: StoreBatch, index: number): void {
    // validate first, so a rejected batch changes nothing
    this.validateBatch(batch);
    const events: StoreEvent[] = [];
    for (const a of batch.actions) {
      const { table, obj } = unpack(a);
      const map = this.table(table) as Map<string, StoreObject>;
      const cur = map.get(obj.id);
      if (a.kind === StoreActionKind.STORE_ACTION_KIND_DELETE) {
        if (!cur) continue;
        map.delete(obj.id);
        if (table === 'task') this.unindexTask(cur as Task);
        events.push({ kind: 'delete', table, object: cur } as ObjectEvent);
        continue;
      }
      const next = { ...obj, meta: nextMeta(obj, cur) } as StoreObject;
      this.setObject(table, next, cur, events);
    }
    this.appliedIndex = index;
    events.push({ kind: 'commit', index, time: batch.proposedAt });
    this.publish(events);
  }

  /**
   * Applies object states decided elsewhere (etcd: one revision of its watch), without validation:
   * they are already committed. Publishes one event per change, then a commit marker with index.
   */
  applyChanges(changes: ObjectChange[], index: number, time?: number): void {
    const events: StoreEvent[] = [];
    for (const c of changes) {
      const map = this.table(c.table) as Map<string, StoreObject>;
      const cur = map.get(c.id);
      if (!c.object) {
        if (!cur) continue;
        map.delete(c.id);
        if (c.table === 'task') this.unindexTask(cur as Task);
        events.push({ kind: 'delete', table: c.table, object: cur } as ObjectEvent);
        continue;
      }
      this.setObject(c.table, c.object, cur, events);
    }
    this.appliedIndex = index;
    events.push({ kind: 'commit', index, time });
    this.publish(events);
  }

  private setObject(table: Table, next: StoreObject, cur: StoreObject | undefined, events: StoreEvent[]): void {
    (this.table(table) as Map<string, StoreObject>).set(next.id, next);
    if (table === 'task') {
      if (cur) this.unindexTask(cur as Task);
      this.indexTask(next as Task);
    }
    events.push((cur ? { kind: 'update', table, object: next, old: cur } : { kind: 'create', table, object: next }) as ObjectEvent);
  }

  /**
   * The checks applyBatch makes before it changes anything (versions, existence, unique names,
   * references), against the current state: throws ABORTED, ALREADY_EXISTS, INVALID_ARGUMENT or
   * FAILED_PRECONDITION.
   */
  validateBatch(batch: StoreBatch): void {
    const names = new Map<string, string>();
    for (const a of batch.actions) {
      const { table, obj } = unpack(a);
      const cur = this.table(table).get(obj.id);
      if (a.kind === StoreActionKind.STORE_ACTION_KIND_CREATE) {
        if (cur) throw new FlotillaError('ALREADY_EXISTS', `${table} ${obj.id} already exists`);
        if (table === 'service') {
          const name = (obj as Service).spec?.name ?? '';
          const other = this.serviceByName(name);
          if ((other && other.id !== obj.id) || (names.has(name) && names.get(name) !== obj.id))
            throw new FlotillaError('ALREADY_EXISTS', `service ${JSON.stringify(name)} already exists`);
          names.set(name, obj.id);
        }
        if (table === 'secret' || table === 'config') {
          // names are unique per table (two creates racing on the leader both passed their own check)
          const name = (obj as Secret | Config).spec?.name ?? '';
          const key = `${table}/${name}`;
          for (const o of this.table(table).values())
            if (o.spec?.name === name) throw new FlotillaError('ALREADY_EXISTS', `${table} ${JSON.stringify(name)} already exists`);
          if (names.has(key)) throw new FlotillaError('ALREADY_EXISTS', `${table} ${JSON.stringify(name)} already exists`);
          names.set(key, obj.id);
        }
        if (table === 'service') this.checkReferences(obj as Service, undefined, batch);
      } else {
        if (!cur) throw new FlotillaError('ABORTED', `${table} ${obj.id} no longer exists`);
        if ((cur.meta?.version ?? 0) !== (obj.meta?.version ?? 0))
          throw new FlotillaError('ABORTED', `update out of sequence for ${table} ${obj.id}`);
        if (table === 'service' && a.kind === StoreActionKind.STORE_ACTION_KIND_UPDATE) this.checkReferences(obj as Service, cur as Service, batch);
        if ((table === 'secret' || table === 'config') && a.kind === StoreActionKind.STORE_ACTION_KIND_DELETE) this.checkUnused(table, cur as Secret | Config, batch);
        if (table === 'service' && a.kind === StoreActionKind.STORE_ACTION_KIND_UPDATE) {
          const name = (obj as Service).spec?.name ?? '';
          const other = this.serviceByName(name);
          if (other && other.id !== obj.id) throw new FlotillaError('ALREADY_EXISTS', `service ${JSON.stringify(name)} already exists`);
        }
      }
    }
  }

  /**
   * A service may only name secrets and configs that exist, and one that is in use may not be
   * deleted: the control API checks both in its transactions, and this check at apply time (the same
   * on every manager) closes the race between two concurrent calls. Only references a batch adds are
   * checked, so writers that do not change a spec (orchestrators) are never refused.
   */
  private checkReferences(s: Service, before: Service | undefined, batch: StoreBatch): void {
    const c = s.spec?.task?.container;
    if (!c) return;
    const had = new Set([...(before?.spec?.task?.container?.secrets ?? []).map((r) => r.secretId), ...(before?.spec?.task?.container?.configs ?? []).map((r) => r.configId)]);
    const created = (table: 'secret' | 'config', id: string): boolean =>
      batch.actions.some((a) => a.kind === StoreActionKind.STORE_ACTION_KIND_CREATE && a[table]?.id === id);
    for (const r of c.secrets)
      if (!had.has(r.secretId) && !this.secrets.has(r.secretId) && !created('secret', r.secretId))
        throw new FlotillaError('INVALID_ARGUMENT', `invalid secret ${JSON.stringify(r.secretName)}: secret not found (it was removed)`);
    for (const r of c.configs)
      if (!had.has(r.configId) && !this.configs.has(r.configId) && !created('config', r.configId))
        throw new FlotillaError('INVALID_ARGUMENT', `invalid config ${JSON.stringify(r.configName)}: config not found (it was removed)`);
  }

  private checkUnused(table: 'secret' | 'config', o: Secret | Config, batch: StoreBatch): void {
    const inBatch = new Map(batch.actions.filter((a) => a.service).map((a) => [a.service!.id, a]));
    for (const s of this.services.values()) {
      const a = inBatch.get(s.id);
      if (a?.kind === StoreActionKind.STORE_ACTION_KIND_DELETE) continue;
      const c = (a?.service ?? s).spec?.task?.container;
      const uses = table === 'secret' ? c?.secrets.some((r) => r.secretId === o.id) : c?.configs.some((r) => r.configId === o.id);
      if (uses) throw new FlotillaError('FAILED_PRECONDITION', `${table} ${JSON.stringify(o.spec?.name)} is in use by service ${s.spec?.name ?? s.id}`);
    }
  }

  /** Hands events to every listener; a listener that throws is logged and does not break apply. */
  private publish(events: StoreEvent[]): void {
    for (const l of this.listeners) {
      try {
        l(events);
      } catch (err) {
        this.log.error({ err: errorMessage(err), index: this.appliedIndex }, 'store listener failed');
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
      networks: [...this.networks.values()],
      secrets: [...this.secrets.values()],
      configs: [...this.configs.values()],
    };
  }

  restore(snap: StoreSnapshot, index: number): void {
    this.nodes.clear();
    this.services.clear();
    this.tasks.clear();
    this.clusters.clear();
    this.networks.clear();
    this.secrets.clear();
    this.configs.clear();
    this.tasksByNode.clear();
    this.tasksByService.clear();
    for (const n of snap.nodes) this.nodes.set(n.id, n);
    for (const s of snap.services) this.services.set(s.id, s);
    for (const t of snap.tasks) {
      this.tasks.set(t.id, t);
      this.indexTask(t);
    }
    for (const c of snap.clusters) this.clusters.set(c.id, c);
    for (const n of snap.networks) this.networks.set(n.id, n);
    for (const x of snap.secrets) this.secrets.set(x.id, x);
    for (const x of snap.configs) this.configs.set(x.id, x);
    this.appliedIndex = index;
    this.publish([{ kind: 'commit', index, restored: true }]);
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

/** The meta an applied create or update gets: the version one past the current object's. */
export function nextMeta(obj: StoreObject, cur: StoreObject | undefined): NonNullable<StoreObject['meta']> {
  return { ...(obj.meta ?? { version: 0, createdAt: 0, updatedAt: 0 }), version: (cur?.meta?.version ?? 0) + 1 };
}

export function unpack(a: StoreAction): { table: Table; obj: StoreObject } {
  if (a.node) return { table: 'node', obj: a.node };
  if (a.service) return { table: 'service', obj: a.service };
  if (a.task) return { table: 'task', obj: a.task };
  if (a.cluster) return { table: 'cluster', obj: a.cluster };
  if (a.network) return { table: 'network', obj: a.network };
  if (a.secret) return { table: 'secret', obj: a.secret };
  if (a.config) return { table: 'config', obj: a.config };
  throw new FlotillaError('INTERNAL', 'store action without an object');
}

function isConflict(err: unknown): boolean {
  return err instanceof FlotillaError && err.code === 'ABORTED';
}

/** One writer for every action: finish() copies the bytes out and keeps the buffer for the next. */
const actionWriter = new BinaryWriter();

function encodeAction(a: StoreAction): Uint8Array {
  try {
    return StoreAction.encode(a, actionWriter).finish();
  } catch (err) {
    actionWriter.finish(); // a value the encoder refused: start the next action on an empty writer
    throw err;
  }
}

/** An encoded action's size inside an encoded StoreBatch (its bytes, field tag and length prefix). */
function framedSize(e: Uint8Array): number {
  return e.length + 1 + varintSize(e.length);
}

/**
 * A batch's encoding from its actions' encodings (in batch.actions' order): the same bytes as
 * StoreBatch.encode(batch), without encoding every action a second time.
 */
export function encodeBatch(batch: StoreBatch, encoded: readonly Uint8Array[]): Uint8Array {
  const w = new BinaryWriter();
  // field 1 (actions), length-delimited: what StoreBatch.encode writes for each action
  for (const e of encoded) w.uint32(10).bytes(e);
  return StoreBatch.encode({ ...batch, actions: [] }, w).finish();
}

function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    size++;
  }
  return size;
}

/**
 * Packs groups of actions, in order, into batches of at most maxBytes and maxActions each (a group
 * never spans two batches; a group over a limit gets a batch of its own, which the proposer then refuses).
 */
export function splitBatches(groups: StoreAction[][], maxBytes: number, maxActions = Infinity): StoreAction[][] {
  return splitEncoded(groups, maxBytes, maxActions).map((b) => b.actions);
}

/** splitBatches, with each batch's actions' encodings (made once, to measure them) alongside. */
function splitEncoded(groups: StoreAction[][], maxBytes: number, maxActions = Infinity): Array<{ actions: StoreAction[]; encoded: Uint8Array[] }> {
  const out: Array<{ actions: StoreAction[]; encoded: Uint8Array[] }> = [];
  let cur: StoreAction[] = [];
  let enc: Uint8Array[] = [];
  let size = 0;
  for (const g of groups) {
    if (g.length === 0) continue;
    const ge = g.map(encodeAction);
    const gs = ge.reduce((n, e) => n + framedSize(e), 0);
    if (cur.length > 0 && (size + gs > maxBytes || cur.length + g.length > maxActions)) {
      out.push({ actions: cur, encoded: enc });
      cur = [];
      enc = [];
      size = 0;
    }
    cur.push(...g);
    enc.push(...ge);
    size += gs;
  }
  if (cur.length > 0) out.push({ actions: cur, encoded: enc });
  return out;
}

function pack(kind: StoreActionKind, table: Table, obj: StoreObject): StoreAction {
  const a: StoreAction = { kind, node: undefined, service: undefined, task: undefined, cluster: undefined, network: undefined, secret: undefined, config: undefined };
  a[table] = obj as never;
  return a;
}

/**
 * A transaction: reads see the store plus this transaction's own changes. Objects handed out are
 * the store's own; never mutate them: pass a modified copy to update().
 */
export class Tx {
  private readonly changes = new Map<string, Change>();
  /** the together() group being built, if any */
  private group = 0;
  private nextGroup = 1;
  constructor(readonly store: MemoryStore) {}

  private key(table: Table, id: string): string {
    return `${table}/${id}`;
  }

  get<K extends Table>(table: K, id: string): Tables[K] | undefined {
    const c = this.changes.get(this.key(table, id));
    if (c) return c.kind === StoreActionKind.STORE_ACTION_KIND_DELETE ? undefined : (c.obj as Tables[K]);
    return this.store.table(table).get(id);
  }

  create<K extends Table>(table: K, obj: Tables[K]): void {
    if (this.get(table, obj.id)) throw new FlotillaError('ALREADY_EXISTS', `${table} ${obj.id} already exists`);
    const now = Date.now();
    const o = { ...obj, meta: { version: 0, createdAt: now, updatedAt: now } };
    this.record(this.key(table, obj.id), { kind: StoreActionKind.STORE_ACTION_KIND_CREATE, table, obj: o, group: 0 });
  }

  /** obj must carry the meta.version it was read with. */
  update<K extends Table>(table: K, obj: Tables[K]): void {
    const k = this.key(table, obj.id);
    const prior = this.changes.get(k);
    const o = { ...obj, meta: { ...(obj.meta ?? { version: 0, createdAt: 0 }), updatedAt: Date.now() } } as StoreObject;
    if (prior && prior.kind === StoreActionKind.STORE_ACTION_KIND_CREATE) {
      this.record(k, { ...prior, obj: o });
      return;
    }
    if (!prior && !this.get(table, obj.id)) throw new FlotillaError('NOT_FOUND', `${table} ${obj.id} not found`);
    this.record(k, { kind: StoreActionKind.STORE_ACTION_KIND_UPDATE, table, obj: o, group: 0 });
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
    this.record(k, { kind: StoreActionKind.STORE_ACTION_KIND_DELETE, table, obj: cur, group: 0 });
  }

  /**
   * Runs fn; the changes it makes (and earlier changes of the same objects) go into one batch when
   * the store splits this transaction (updateBatched). update() keeps a whole transaction in one batch.
   */
  together<T>(fn: () => T): T {
    if (this.group) return fn();
    this.group = this.nextGroup++;
    try {
      return fn();
    } finally {
      this.group = 0;
    }
  }

  /** Records a change: in the current together() group (merging groups it touches), else alone. */
  private record(k: string, c: Change): void {
    const prior = this.changes.get(k);
    let group = this.group || prior?.group || this.nextGroup++;
    if (this.group && prior && prior.group !== this.group) {
      // this object was changed in another group before: that group joins this one
      const from = prior.group;
      for (const other of this.changes.values()) if (other.group === from) other.group = this.group;
      group = this.group;
    }
    this.changes.set(k, { ...c, group });
  }

  actions(): StoreAction[] {
    return [...this.changes.values()].map((c) => pack(c.kind, c.table, c.obj));
  }

  /** The actions in groups that must land in one batch, in the order each group began. */
  groups(): StoreAction[][] {
    const out = new Map<number, StoreAction[]>();
    for (const c of this.changes.values()) {
      let g = out.get(c.group);
      if (!g) out.set(c.group, (g = []));
      g.push(pack(c.kind, c.table, c.obj));
    }
    return [...out.values()];
  }

  get size(): number {
    return this.changes.size;
  }
}

interface Change {
  kind: StoreActionKind;
  table: Table;
  obj: StoreObject;
  /** changes of one group go into one batch when the transaction is split */
  group: number;
}
