/**
 * The scheduler: a pure function from a read-only snapshot (nodes, tasks, optionally services) to a
 * plan (task -> node, or task -> the reason it fits nowhere). No store, no I/O, no clock: the same
 * input always gives the same plan, whatever the order of the input arrays. See docs/scheduler.md.
 *
 * Cost: O(N log N) to index the nodes, O(T) to count load and group the pending tasks. Then a group
 * of P interchangeable tasks (same service, same placement-relevant spec) costs O(N * constraints)
 * for the filters plus O(P log N) through a binary heap of the eligible nodes keyed by (tasks of this
 * service, tasks overall, node id); a small group (P <= SCAN_MAX_TASKS) instead scans nodes in
 * (tasks overall, id) order and stops at the first that fits, so many tiny groups do not each pay O(N).
 */
import { Node, NodeAvailability, NodeState, Service, Task, TaskSpec, TaskState } from '../../gen/flotilla/v1/objects.js';
import { errorMessage } from '../../common/errors.js';
import { formatBytes } from '../../common/units.js';
import { type Constraint, type Spread, matchConstraint, parseConstraint, parseSpread, spreadValue } from './constraints.js';
import { networksAllocated, WAITING_FOR_NETWORK } from '../allocator/networks.js';
import { hostPortKeys } from '../allocator/ports.js';

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
  /**
   * Per service, nodes where its tasks failed repeatedly of late (the loop decides what "repeatedly"
   * is): they rank after every other node, so a service's tasks go there only when nothing else fits.
   */
  avoid?: ReadonlyMap<string, ReadonlySet<string>>;
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
/** a host-mode published port of the task is in use on the node (by a task of any service) */
const PORT_TAKEN = 9;
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
  /** The constraints as written in the spec. */
  raw: string[];
  constraints: Constraint[];
  /** Spread preferences, in order (placed one task at a time: see placeSpread). */
  rawPrefs: string[];
  prefs: Spread[];
  /** Set when a constraint does not parse: every task with this spec is unassigned with it. */
  invalid: string;
  /** host-mode published ports ("8080/tcp") of the service: a node holding one already is unsuitable */
  ports: string[];
}

interface ServiceLoad {
  /** Node indices holding tasks of the service, and how many (parallel arrays). */
  hosts: number[];
  counts: number[];
}

function newLoad(loads: Map<string, ServiceLoad>, id: string): ServiceLoad {
  const l: ServiceLoad = { hosts: [], counts: [] };
  loads.set(id, l);
  return l;
}

interface Group {
  placement: Placement;
  tasks: Task[];
}

const PENDING = TaskState.TASK_STATE_PENDING;
const RUNNING = TaskState.TASK_STATE_RUNNING;
const COMPLETE = TaskState.TASK_STATE_COMPLETE;

const cmp = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/**
 * Groups of at most this many tasks are placed by scanning nodes in load order (cheap when there are
 * many small groups); larger groups by filtering every node once and a heap. Both give the same plan.
 */
export const SCAN_MAX_TASKS = 32;

export interface ScheduleOptions {
  /** Force one placement strategy (tests and benchmarks); the plan is the same either way. */
  strategy?: 'auto' | 'heap' | 'scan';
}

export function schedule(input: ScheduleInput, options: ScheduleOptions = {}): Plan {
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

  // Tasks of each service per node, kept sparse (a service often sits on few of many nodes): the
  // nodes holding some and how many. The service being placed has its counts in the dense `svc`.
  const loads = new Map<string, ServiceLoad>();
  const svc = new Int32Array(N);
  let current: ServiceLoad | undefined;
  const enter = (serviceId: string): ServiceLoad | undefined => {
    const next = serviceId ? loads.get(serviceId) ?? newLoad(loads, serviceId) : undefined;
    if (next === current) return current;
    if (current) {
      const { hosts, counts } = current;
      for (let k = 0; k < hosts.length; k++) {
        counts[k] = svc[hosts[k]!]!;
        svc[hosts[k]!] = 0;
      }
    }
    current = next;
    if (current) {
      const { hosts, counts } = current;
      for (let k = 0; k < hosts.length; k++) svc[hosts[k]!] = counts[k]!;
    }
    return current;
  };

  // ---- placements (parsed once per distinct spec) ----
  const byKey = new Map<string, Placement>();
  const bySpec = new Map<TaskSpec, string>();
  const lastOfService = new Map<string, Placement>();
  const placementOf = (t: Task): Placement => {
    const spec = t.spec ?? input.services?.get(t.serviceId)?.spec?.task;
    // fast path: the same placement as the previous task of this service (no string building)
    const last = lastOfService.get(t.serviceId);
    if (last && samePlacement(last, spec)) return last;
    let fp = spec ? bySpec.get(spec) : '';
    if (fp === undefined && spec) {
      const r = spec.resources?.reservations;
      fp = `${r?.nanoCpus ?? 0}\u0001${r?.memoryBytes ?? 0}\u0001${spec.placement?.maxReplicasPerNode ?? 0}\u0001${(spec.placement?.constraints ?? []).join('\u0001')}\u0002${(spec.placement?.preferences ?? []).map((x) => x.spread).join('\u0001')}`;
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
        raw: spec?.placement?.constraints ?? [],
        constraints: [],
        rawPrefs: (spec?.placement?.preferences ?? []).map((x) => x.spread),
        prefs: [],
        invalid: '',
        ports: hostPortKeys(input.services?.get(t.serviceId)),
      };
      try {
        p.constraints = (spec?.placement?.constraints ?? []).map(parseConstraint);
        p.prefs = p.rawPrefs.map((d) => parseSpread(d));
      } catch (err) {
        p.invalid = errorMessage(err);
      }
      byKey.set(key, p);
    }
    lastOfService.set(t.serviceId, p);
    return p;
  };

  // ---- load on each node, and the tasks to place ----
  const pinned: Task[] = [];
  const groups = new Map<Placement, Group>();
  const serviceLoad = new Map<string, Map<number, number>>();
  let lastSid = '';
  let lastMap: Map<number, number> | undefined;
  for (const t of input.tasks) {
    const s = t.status?.state ?? TaskState.TASK_STATE_NEW;
    if (s >= COMPLETE || t.desiredState > RUNNING) continue;
    if (s === PENDING) {
      // a task waits for its network addresses (the allocator's) before it is placed; the reason
      // the allocator wrote (a full network) is kept
      if (!networksAllocated(t)) {
        const err = t.status?.err ?? '';
        plan.unassigned.push({ taskId: t.id, reason: err.startsWith('network ') ? err : WAITING_FOR_NETWORK });
        continue;
      }
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
    if (t.serviceId) {
      if (t.serviceId !== lastSid) {
        lastSid = t.serviceId;
        lastMap = serviceLoad.get(lastSid);
        if (!lastMap) serviceLoad.set(lastSid, (lastMap = new Map()));
      }
      lastMap!.set(i, (lastMap!.get(i) ?? 0) + 1);
    }
  }
  for (const [id, m] of serviceLoad) loads.set(id, { hosts: [...m.keys()], counts: [...m.values()] });

  // host-mode published ports held on each node: by every task placed there and not yet terminal,
  // including tasks being stopped (the port is free once the task has ended)
  const portsUsed = new Map<number, Set<string>>();
  if (input.services) {
    // each service's host ports worked out once per plan, not once per task (this loop sees every task)
    const keysOf = new Map<string, string[]>();
    for (const t of input.tasks) {
      const st = t.status?.state ?? TaskState.TASK_STATE_NEW;
      if (!t.nodeId || st <= PENDING || st >= COMPLETE) continue;
      let keys = keysOf.get(t.serviceId);
      if (!keys) keysOf.set(t.serviceId, (keys = hostPortKeys(input.services.get(t.serviceId))));
      if (keys.length === 0) continue;
      const i = index.get(t.nodeId);
      if (i === undefined) continue;
      let set = portsUsed.get(i);
      if (!set) portsUsed.set(i, (set = new Set()));
      for (const k of keys) set.add(k);
    }
  }
  const portClash = (i: number, p: Placement): string | undefined => {
    const used = portsUsed.get(i);
    return used ? p.ports.find((k) => used.has(k)) : undefined;
  };

  // the first dynamic filter a node fails for this placement, or OK
  const dynamic = (i: number, p: Placement): number => {
    if (p.cpu > 0 && cpuFree[i]! < p.cpu) return LACK_CPU;
    if (p.memory > 0 && memFree[i]! < p.memory) return LACK_MEMORY;
    if (p.maxPerNode > 0 && svc[i]! >= p.maxPerNode) return AT_MAX;
    if (p.ports.length > 0 && portClash(i, p) !== undefined) return PORT_TAKEN;
    return OK;
  };
  const staticCheck = (i: number, p: Placement): number => {
    if (state[i] !== OK) return state[i]!;
    const n = nodes[i]!;
    for (let c = 0; c < p.constraints.length; c++) if (!matchConstraint(p.constraints[c]!, n)) return CONSTRAINT + c;
    return OK;
  };
  const assign = (t: Task, i: number, p: Placement): void => {
    plan.assignments.push({ taskId: t.id, nodeId: nodes[i]!.id });
    cpuFree[i]! -= p.cpu;
    memFree[i]! -= p.memory;
    total[i]!++;
    if (p.ports.length > 0) {
      let set = portsUsed.get(i);
      if (!set) portsUsed.set(i, (set = new Set()));
      for (const k of p.ports) set.add(k);
    }
    if (current && svc[i]!++ === 0) {
      current.hosts.push(i);
      current.counts.push(0); // written back when another service is entered
    }
  };

  // ---- tasks already bound to a node (global services): validate that node ----
  // They go first: they have no other choice, the replicated tasks after them do.
  pinned.sort((a, b) => cmp(a.serviceId, b.serviceId) || cmp(a.nodeId, b.nodeId) || cmp(a.id, b.id));
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
    enter(p.serviceId);
    let why = staticCheck(i, p);
    if (why === OK) why = dynamic(i, p);
    if (why === OK) assign(t, i, p);
    else plan.unassigned.push({ taskId: t.id, reason: `node ${nodeName(nodes[i]!)} ${single(why, p, cpuFree[i]!, memFree[i]!)}` });
  }

  // ---- groups of interchangeable tasks, in a fixed order ----
  const ordered = [...groups.values()].sort((a, b) => cmp(a.placement.key, b.placement.key));
  const heap = new Int32Array(N);
  const why = new Int32Array(N);
  const bad = new Uint8Array(N);
  // scan strategy: ready+active nodes in buckets by tasks overall, each bucket in id order
  let buckets: number[][] = [];
  let bucketsStale = true;
  const stamp = new Int32Array(N).fill(-1);
  const stat = new Int32Array(N);
  const strategy = options.strategy ?? 'auto';
  for (let gi = 0; gi < ordered.length; gi++) {
    const g = ordered[gi]!;
    const p = g.placement;
    const tasks = g.tasks.sort((a, b) => a.slot - b.slot || cmp(a.id, b.id));
    if (p.invalid) {
      for (const t of tasks) plan.unassigned.push({ taskId: t.id, reason: p.invalid });
      continue;
    }
    const load = enter(p.serviceId);
    const avoided: number[] = [];
    for (const id of input.avoid?.get(p.serviceId) ?? []) {
      const i = index.get(id);
      if (i !== undefined) {
        bad[i] = 1;
        avoided.push(i);
      }
    }
    const less = (a: number, b: number): boolean => {
      if (bad[a] !== bad[b]) return bad[a]! < bad[b]!;
      const sa = svc[a]!;
      const sb = svc[b]!;
      if (sa !== sb) return sa < sb;
      const ta = total[a]!;
      const tb = total[b]!;
      if (ta !== tb) return ta < tb;
      return a < b;
    };
    let next = 0;

    if (p.prefs.length > 0) {
      // Spread preferences: one task at a time, down the tree of preference values. At each level
      // the nodes that can take the task are grouped by their value (nodes without it form one more
      // group); the group holding the fewest tasks of the service (counted over every node that
      // passes the static filters, in that group) wins, ties to the smaller value; then the next
      // level inside it; at the end the usual ranking picks the node. O(P * N * preferences).
      bucketsStale = true;
      const eligible: number[] = [];
      for (let i = 0; i < N; i++) {
        const w = staticCheck(i, p);
        why[i] = w;
        if (w === OK) eligible.push(i);
      }
      const values = p.prefs.map((sp) => eligible.map((i) => spreadValue(sp, nodes[i]!) ?? NO_VALUE));
      for (; next < tasks.length; next++) {
        // positions (in eligible) of the nodes still in the running
        let cand: number[] = [];
        for (let k = 0; k < eligible.length; k++) if (dynamic(eligible[k]!, p) === OK) cand.push(k);
        if (cand.length === 0) break;
        let within: number[] = eligible.map((_, k) => k);
        for (const vals of values) {
          const count = new Map<string, number>();
          for (const k of within) count.set(vals[k]!, (count.get(vals[k]!) ?? 0) + svc[eligible[k]!]!);
          let best: string | undefined;
          for (const k of cand) {
            const v = vals[k]!;
            if (best === undefined) best = v;
            else {
              const cv = count.get(v)!;
              const cb = count.get(best)!;
              if (cv < cb || (cv === cb && v < best)) best = v;
            }
          }
          cand = cand.filter((k) => vals[k] === best);
          within = within.filter((k) => vals[k] === best);
        }
        let bi = -1;
        for (const k of cand) if (bi < 0 || less(eligible[k]!, bi)) bi = eligible[k]!;
        assign(tasks[next]!, bi, p);
      }
    } else if (avoided.length === 0 && (strategy === 'scan' || (strategy === 'auto' && tasks.length <= SCAN_MAX_TASKS))) {
      // Few tasks: no O(nodes) pass. The best node is the first in (tasks overall, id) order
      // holding no task of this service that passes the filters; only when there is none, the
      // best of the nodes that hold some.
      if (bucketsStale) {
        buckets = [];
        for (let i = 0; i < N; i++) {
          if (state[i] !== OK) continue;
          const t = total[i]!;
          while (buckets.length <= t) buckets.push([]);
          buckets[t]!.push(i);
        }
        bucketsStale = false;
      }
      const fits = (i: number): boolean => {
        if (stamp[i] !== gi) {
          stamp[i] = gi;
          stat[i] = staticCheck(i, p);
        }
        return stat[i] === OK && dynamic(i, p) === OK;
      };
      const hs = load?.hosts ?? [];
      for (; next < tasks.length; next++) {
        let best = -1;
        scan: for (const b of buckets) {
          for (const i of b) {
            if (svc[i] === 0 && fits(i)) {
              best = i;
              break scan;
            }
          }
        }
        if (best < 0) for (const i of hs) if (state[i] === OK && fits(i) && (best < 0 || less(i, best))) best = i;
        if (best < 0) break;
        const t = total[best]!;
        assign(tasks[next]!, best, p);
        // move the node from bucket t to bucket t+1, keeping id order
        const from = buckets[t]!;
        from.splice(lowerBound(from, best), 1);
        if (buckets.length <= t + 1) buckets.push([]);
        const to = buckets[t + 1]!;
        to.splice(lowerBound(to, best), 0, best);
      }
      if (next < tasks.length) for (let i = 0; i < N; i++) why[i] = staticCheck(i, p);
    } else {
      // Many tasks: filters once per node, then a heap of the eligible nodes.
      bucketsStale = true;
      let size = 0;
      for (let i = 0; i < N; i++) {
        const w = staticCheck(i, p);
        why[i] = w;
        if (w === OK) heap[size++] = i;
      }
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
      while (next < tasks.length && size > 0) {
        const i = heap[0]!;
        // capacity and max-per-node only shrink while a group is placed: a node that fails now is done
        if (dynamic(i, p) !== OK) {
          heap[0] = heap[--size]!;
          if (size > 0) siftDown(0);
          continue;
        }
        assign(tasks[next++]!, i, p);
        siftDown(0);
      }
    }
    if (next < tasks.length) {
      for (let i = 0; i < N; i++) if (why[i] === OK) why[i] = dynamic(i, p);
      const reason = explain(why, N, p);
      for (; next < tasks.length; next++) plan.unassigned.push({ taskId: tasks[next]!.id, reason });
    }
    for (const i of avoided) bad[i] = 0;
  }
  return plan;
}

/** The group of nodes without the preference's label (sorts after every real value). */
const NO_VALUE = '\uffff';

function samePlacement(p: Placement, spec: TaskSpec | undefined): boolean {
  const ps = spec?.placement?.preferences ?? [];
  if (ps.length !== p.rawPrefs.length) return false;
  for (let k = 0; k < ps.length; k++) if (ps[k]!.spread !== p.rawPrefs[k]) return false;
  const r = spec?.resources?.reservations;
  if (Math.max(0, r?.nanoCpus ?? 0) !== p.cpu || Math.max(0, r?.memoryBytes ?? 0) !== p.memory) return false;
  if ((spec?.placement?.maxReplicasPerNode ?? 0) !== p.maxPerNode) return false;
  const cs = spec?.placement?.constraints ?? [];
  if (cs.length !== p.raw.length) return false;
  for (let k = 0; k < cs.length; k++) if (cs[k] !== p.raw[k]) return false;
  return true;
}

/** The first position in the ascending array xs whose value is >= x. */
function lowerBound(xs: number[], x: number): number {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
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
    case PORT_TAKEN:
      return `has host port ${p.ports.join(', ')} in use`;
    default:
      return `is ${STATIC_TEXT[why] ?? 'unavailable'}`;
  }
}

/** "no suitable node (2 nodes drained, 1 node fails constraint ..., 3 nodes lack memory (reserve 1.0GiB))" */
function explain(why: Int32Array, n: number, p: Placement): string {
  if (n === 0) return 'no suitable node (no nodes in the cluster)';
  const counts = new Map<number, number>();
  for (let i = 0; i < n; i++) counts.set(why[i]!, (counts.get(why[i]!) ?? 0) + 1);
  const order = [DRAINED, PAUSED, DOWN, DISCONNECTED, NOT_READY, ...p.constraints.map((_, c) => CONSTRAINT + c), LACK_CPU, LACK_MEMORY, AT_MAX, PORT_TAKEN];
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
    else if (w === PORT_TAKEN) parts.push(`${nodes} ${k === 1 ? 'has' : 'have'} host port ${p.ports.join(', ')} in use`);
    else parts.push(`${nodes} ${STATIC_TEXT[w]}`);
  }
  return parts.length ? `no suitable node (${parts.join(', ')})` : 'no suitable node';
}
