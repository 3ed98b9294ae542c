/**
 * The scheduler: a pure function from a read-only snapshot (nodes, tasks, optionally services) to a
 * plan (task -> node, or task -> the reason it fits nowhere). No store, no I/O, no clock: the same
 * input always gives the same plan, whatever the order of the input arrays. See docs/scheduler.md.
 *
 * Cost: O(N log N) to index the nodes, O(T) to count load and group the pending tasks, then per group
 * O(N * constraints) for the filters plus O(P log N) to place its P tasks through a binary heap of the
 * eligible nodes keyed by (tasks of this service, tasks overall, node id).
 */
import { Node, NodeAvailability, NodeState, Service, Task, TaskSpec, TaskState } from '../../gen/flotilla/v1/objects.js';
import { errorMessage } from '../../common/errors.js';
import { formatBytes } from '../../common/units.js';
import { type Constraint, matchConstraint, parseConstraint } from './constraints.js';

export interface Assignment {
  taskId: string;
  nodeId: string;
}

export interface Unassigned {
  taskId: string;
  reason: string;
}

export interface Plan {
  assignments: Assignment[];
  unassigned: Unassigned[];
}

export interface ScheduleInput {
  nodes: Node[];
  /** The tasks the store holds; terminal ones and ones desired past running are ignored. */
  tasks: Task[];
  /** Used for a task's spec only when the task carries none. */
  services?: Map<string, Service>;
}

// Why a node cannot take a task, in the order the filters run and the reasons list them.
const OK = 0;
const DRAINED = 1;
const PAUSED = 2;
const DOWN = 3;
const DISCONNECTED = 4;
const NOT_READY = 5;
const LACK_CPU = 6;
const LACK_MEMORY = 7;
const AT_MAX = 8;
/** Codes >= CONSTRAINT name the failing constraint: CONSTRAINT + its index in the spec. */
const CONSTRAINT = 16;

const STATIC_TEXT: Record<number, string> = {
  [DRAINED]: 'drained',
  [PAUSED]: 'paused',
  [DOWN]: 'down',
  [DISCONNECTED]: 'disconnected',
  [NOT_READY]: 'not ready',
};

/** What placement needs to know of a task's spec; shared by all tasks with the same one. */
interface Placement {
  key: string;
  serviceId: string;
  cpu: number;
  memory: number;
  maxPerNode: number;
  constraints: Constraint[];
  /** Set when a constraint does not parse: every task with this spec is unassigned with it. */
  invalid: string;
}

interface Group {
  placement: Placement;
  tasks: Task[];
}

const PENDING = TaskState.TASK_STATE_PENDING;
const RUNNING = TaskState.TASK_STATE_RUNNING;
const COMPLETE = TaskState.TASK_STATE_COMPLETE;

const cmp = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

export function schedule(input: ScheduleInput): Plan {
  const plan: Plan = { assignments: [], unassigned: [] };

  // ---- nodes, indexed in id order (the index is the final tiebreak) ----
  const nodes: Node[] = [];
  {
    const seen = new Set<string>();
    for (const n of input.nodes) {
      if (seen.has(n.id)) continue;
      seen.add(n.id);
      nodes.push(n);
    }
    nodes.sort((a, b) => cmp(a.id, b.id));
  }
  const N = nodes.length;
  const index = new Map<string, number>();
  const cpuFree = new Float64Array(N);
  const memFree = new Float64Array(N);
  const total = new Int32Array(N);
  const state = new Uint8Array(N);
  for (let i = 0; i < N; i++) {
    const n = nodes[i]!;
    index.set(n.id, i);
    cpuFree[i] = n.description?.resources?.nanoCpus ?? 0;
    memFree[i] = n.description?.resources?.memoryBytes ?? 0;
    state[i] = nodeState(n);
  }
  const perService = new Map<string, Int32Array>();
  const noService = new Int32Array(N);
  const countsOf = (serviceId: string): Int32Array => {
    if (!serviceId) return noService;
    let c = perService.get(serviceId);
    if (!c) perService.set(serviceId, (c = new Int32Array(N)));
    return c;
  };

  // ---- placements (parsed once per distinct spec) ----
  const byKey = new Map<string, Placement>();
  const bySpec = new Map<TaskSpec, string>();
  const placementOf = (t: Task): Placement => {
    const spec = t.spec ?? input.services?.get(t.serviceId)?.spec?.task;
    let fp = spec ? bySpec.get(spec) : '';
    if (fp === undefined && spec) {
      const r = spec.resources?.reservations;
      fp = `${r?.nanoCpus ?? 0}\u0001${r?.memoryBytes ?? 0}\u0001${spec.placement?.maxReplicasPerNode ?? 0}\u0001${(spec.placement?.constraints ?? []).join('\u0001')}`;
      bySpec.set(spec, fp);
    }
    const key = `${t.serviceId}\u0000${fp}`;
    let p = byKey.get(key);
    if (!p) {
      const r = spec?.resources?.reservations;
      p = {
        key,
        serviceId: t.serviceId,
        cpu: Math.max(0, r?.nanoCpus ?? 0),
        memory: Math.max(0, r?.memoryBytes ?? 0),
        maxPerNode: spec?.placement?.maxReplicasPerNode ?? 0,
        constraints: [],
        invalid: '',
      };
      try {
        p.constraints = (spec?.placement?.constraints ?? []).map(parseConstraint);
      } catch (err) {
        p.invalid = errorMessage(err);
      }
      byKey.set(key, p);
    }
    return p;
  };

  // ---- load on each node, and the tasks to place ----
  const pinned: Task[] = [];
  const groups = new Map<Placement, Group>();
  for (const t of input.tasks) {
    const s = t.status?.state ?? TaskState.TASK_STATE_NEW;
    if (s >= COMPLETE || t.desiredState > RUNNING) continue;
    if (s === PENDING) {
      if (t.nodeId) {
        pinned.push(t);
      } else {
        const p = placementOf(t);
        let g = groups.get(p);
        if (!g) groups.set(p, (g = { placement: p, tasks: [] }));
        g.tasks.push(t);
      }
      continue;
    }
    if (!t.nodeId) continue;
    const i = index.get(t.nodeId);
    if (i === undefined) continue;
    const spec = t.spec ?? input.services?.get(t.serviceId)?.spec?.task;
    const r = spec?.resources?.reservations;
    cpuFree[i]! -= Math.max(0, r?.nanoCpus ?? 0);
    memFree[i]! -= Math.max(0, r?.memoryBytes ?? 0);
    total[i]!++;
    if (t.serviceId) countsOf(t.serviceId)[i]!++;
  }

  // the first dynamic filter a node fails for this placement, or OK
  const dynamic = (i: number, p: Placement, svc: Int32Array): number => {
    if (p.cpu > 0 && cpuFree[i]! < p.cpu) return LACK_CPU;
    if (p.memory > 0 && memFree[i]! < p.memory) return LACK_MEMORY;
    if (p.maxPerNode > 0 && svc[i]! >= p.maxPerNode) return AT_MAX;
    return OK;
  };
  const staticCheck = (i: number, p: Placement): number => {
    if (state[i] !== OK) return state[i]!;
    const n = nodes[i]!;
    for (let c = 0; c < p.constraints.length; c++) if (!matchConstraint(p.constraints[c]!, n)) return CONSTRAINT + c;
    return OK;
  };
  const assign = (t: Task, i: number, p: Placement, svc: Int32Array): void => {
    plan.assignments.push({ taskId: t.id, nodeId: nodes[i]!.id });
    cpuFree[i]! -= p.cpu;
    memFree[i]! -= p.memory;
    total[i]!++;
    if (svc !== noService) svc[i]!++;
  };

  // ---- tasks already bound to a node (global services): validate that node ----
  // They go first: they have no other choice, the replicated tasks after them do.
  pinned.sort((a, b) => cmp(a.nodeId, b.nodeId) || cmp(a.id, b.id));
  for (const t of pinned) {
    const p = placementOf(t);
    if (p.invalid) {
      plan.unassigned.push({ taskId: t.id, reason: p.invalid });
      continue;
    }
    const i = index.get(t.nodeId);
    if (i === undefined) {
      plan.unassigned.push({ taskId: t.id, reason: `node ${t.nodeId} not found` });
      continue;
    }
    const svc = countsOf(p.serviceId);
    let why = staticCheck(i, p);
    if (why === OK) why = dynamic(i, p, svc);
    if (why === OK) assign(t, i, p, svc);
    else plan.unassigned.push({ taskId: t.id, reason: `node ${nodeName(nodes[i]!)} ${single(why, p, cpuFree[i]!, memFree[i]!)}` });
  }

  // ---- groups of interchangeable tasks, in a fixed order ----
  const ordered = [...groups.values()].sort((a, b) => cmp(a.placement.key, b.placement.key));
  const heap = new Int32Array(N);
  const why = new Int32Array(N);
  for (const g of ordered) {
    const p = g.placement;
    const tasks = g.tasks.sort((a, b) => a.slot - b.slot || cmp(a.id, b.id));
    if (p.invalid) {
      for (const t of tasks) plan.unassigned.push({ taskId: t.id, reason: p.invalid });
      continue;
    }
    const svc = countsOf(p.serviceId);
    // static filters, once per node for the whole group
    let size = 0;
    for (let i = 0; i < N; i++) {
      const w = staticCheck(i, p);
      why[i] = w;
      if (w === OK) heap[size++] = i;
    }
    const less = (a: number, b: number): boolean => {
      const sa = svc[a]!;
      const sb = svc[b]!;
      if (sa !== sb) return sa < sb;
      const ta = total[a]!;
      const tb = total[b]!;
      if (ta !== tb) return ta < tb;
      return a < b;
    };
    const siftDown = (pos: number): void => {
      const x = heap[pos]!;
      for (;;) {
        let c = 2 * pos + 1;
        if (c >= size) break;
        if (c + 1 < size && less(heap[c + 1]!, heap[c]!)) c++;
        if (!less(heap[c]!, x)) break;
        heap[pos] = heap[c]!;
        pos = c;
      }
      heap[pos] = x;
    };
    for (let pos = (size >> 1) - 1; pos >= 0; pos--) siftDown(pos);

    let next = 0;
    while (next < tasks.length && size > 0) {
      const i = heap[0]!;
      // capacity and max-per-node only shrink while a group is placed: a node that fails now is done
      if (dynamic(i, p, svc) !== OK) {
        heap[0] = heap[--size]!;
        if (size > 0) siftDown(0);
        continue;
      }
      assign(tasks[next++]!, i, p, svc);
      siftDown(0);
    }
    if (next < tasks.length) {
      for (let i = 0; i < N; i++) if (why[i] === OK) why[i] = dynamic(i, p, svc);
      const reason = explain(why, N, p);
      for (; next < tasks.length; next++) plan.unassigned.push({ taskId: tasks[next]!.id, reason });
    }
  }
  return plan;
}

function nodeState(n: Node): number {
  const av = n.spec?.availability ?? NodeAvailability.NODE_AVAILABILITY_ACTIVE;
  if (av === NodeAvailability.NODE_AVAILABILITY_DRAIN) return DRAINED;
  if (av === NodeAvailability.NODE_AVAILABILITY_PAUSE) return PAUSED;
  switch (n.status?.state ?? NodeState.NODE_STATE_UNKNOWN) {
    case NodeState.NODE_STATE_READY:
      return OK;
    case NodeState.NODE_STATE_DOWN:
      return DOWN;
    case NodeState.NODE_STATE_DISCONNECTED:
      return DISCONNECTED;
    default:
      return NOT_READY;
  }
}

function nodeName(n: Node): string {
  return n.description?.hostname || n.id;
}

/** 500000000 -> "0.5 CPUs", 1e9 -> "1 CPU". */
export function formatCpus(nano: number): string {
  const n = nano / 1e9;
  const s = n.toFixed(3).replace(/\.?0+$/, '');
  return `${s} ${s === '1' ? 'CPU' : 'CPUs'}`;
}

/** The reason one given node cannot take a task (global tasks). */
function single(why: number, p: Placement, cpuFree: number, memFree: number): string {
  if (why >= CONSTRAINT) return `fails constraint ${p.constraints[why - CONSTRAINT]!.text}`;
  switch (why) {
    case LACK_CPU:
      return `lacks CPU (reserve ${formatCpus(p.cpu)}, ${formatCpus(Math.max(0, cpuFree))} free)`;
    case LACK_MEMORY:
      return `lacks memory (reserve ${formatBytes(p.memory)}, ${formatBytes(Math.max(0, memFree))} free)`;
    case AT_MAX:
      return `is at max replicas per node (${p.maxPerNode})`;
    default:
      return `is ${STATIC_TEXT[why] ?? 'unavailable'}`;
  }
}

/** "no suitable node (2 nodes drained, 1 node fails constraint ..., 3 nodes lack memory (reserve 1.0GiB))" */
function explain(why: Int32Array, n: number, p: Placement): string {
  if (n === 0) return 'no suitable node (no nodes in the cluster)';
  const counts = new Map<number, number>();
  for (let i = 0; i < n; i++) counts.set(why[i]!, (counts.get(why[i]!) ?? 0) + 1);
  const order = [DRAINED, PAUSED, DOWN, DISCONNECTED, NOT_READY, ...p.constraints.map((_, c) => CONSTRAINT + c), LACK_CPU, LACK_MEMORY, AT_MAX];
  const parts: string[] = [];
  for (const w of order) {
    const k = counts.get(w);
    if (!k) continue;
    const nodes = `${k} ${k === 1 ? 'node' : 'nodes'}`;
    const s = k === 1 ? 's' : '';
    if (w >= CONSTRAINT) parts.push(`${nodes} fail${s} constraint ${p.constraints[w - CONSTRAINT]!.text}`);
    else if (w === LACK_CPU) parts.push(`${nodes} lack${s} CPU (reserve ${formatCpus(p.cpu)})`);
    else if (w === LACK_MEMORY) parts.push(`${nodes} lack${s} memory (reserve ${formatBytes(p.memory)})`);
    else if (w === AT_MAX) parts.push(`${nodes} at max replicas per node (${p.maxPerNode})`);
    else parts.push(`${nodes} ${STATIC_TEXT[w]}`);
  }
  return `no suitable node (${parts.join(', ')})`;
}
