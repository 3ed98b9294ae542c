/** Spread placement preferences (--placement-pref spread=...), on the real scheduler (plan.ts). */
import { describe, expect, it } from 'vitest';
import { Node, NodeAvailability, NodeRole, NodeState, Task, TaskSpec, TaskState } from '../../gen/flotilla/v1/objects.js';
import { parsePlacementPref, parseSpread } from './constraints.js';
import { schedule, type Plan } from './plan.js';

function node(id: string, labels: Record<string, string> = {}, o: { state?: NodeState; cpus?: number } = {}): Node {
  return {
    id,
    meta: undefined,
    spec: { labels, desiredRole: NodeRole.NODE_ROLE_WORKER, availability: NodeAvailability.NODE_AVAILABILITY_ACTIVE },
    description: { hostname: `host-${id}`, resources: { nanoCpus: (o.cpus ?? 4) * 1e9, memoryBytes: 8 * 1024 ** 3, pids: 0 }, engineLabels: {}, os: 'linux', arch: 'x64', runtime: 'sim', managerAddr: '' },
    status: { state: o.state ?? NodeState.NODE_STATE_READY, message: '', addr: '', lastHeartbeat: 0 },
    managerStatus: undefined,
    certificateExpiryMs: 0,
    certificateIssuer: '',
    role: NodeRole.NODE_ROLE_WORKER,
  };
}

function spec(prefs: string[], o: { constraints?: string[]; cpus?: number; maxPerNode?: number } = {}): TaskSpec {
  return TaskSpec.fromPartial({
    container: { image: 'busybox' },
    resources: { reservations: { nanoCpus: (o.cpus ?? 0) * 1e9 } },
    placement: { constraints: o.constraints ?? [], maxReplicasPerNode: o.maxPerNode ?? 0, preferences: prefs.map((spread) => ({ spread })) },
  });
}

function pending(svc: string, n: number, s: TaskSpec, from = 1): Task[] {
  return Array.from({ length: n }, (_, i) =>
    Task.fromPartial({ id: `${svc}.${from + i}`, serviceId: svc, serviceName: svc, slot: from + i, spec: s, status: { state: TaskState.TASK_STATE_PENDING }, desiredState: TaskState.TASK_STATE_RUNNING }),
  );
}

function running(id: string, svc: string, nodeId: string, s: TaskSpec): Task {
  return Task.fromPartial({ id, serviceId: svc, serviceName: svc, slot: 1, nodeId, spec: s, status: { state: TaskState.TASK_STATE_RUNNING }, desiredState: TaskState.TASK_STATE_RUNNING });
}

/** Tasks per value of a node label, over the plan's assignments (plus already running tasks). */
function byLabel(plan: Plan, nodes: Node[], key: string, extra: Task[] = []): Record<string, number> {
  const out: Record<string, number> = {};
  const of = new Map(nodes.map((n) => [n.id, n.spec!.labels[key] ?? '(none)']));
  for (const a of plan.assignments) out[of.get(a.nodeId)!] = (out[of.get(a.nodeId)!] ?? 0) + 1;
  for (const t of extra) out[of.get(t.nodeId)!] = (out[of.get(t.nodeId)!] ?? 0) + 1;
  return out;
}

describe('spread preferences', () => {
  it('spreads evenly over the values of a label, not over the nodes (zone a has 4 nodes, b 1)', () => {
    const nodes = [node('a1', { zone: 'a' }), node('a2', { zone: 'a' }), node('a3', { zone: 'a' }), node('a4', { zone: 'a' }), node('b1', { zone: 'b' })];
    const plan = schedule({ nodes, tasks: pending('web', 6, spec(['node.labels.zone'])) });
    expect(plan.unassigned).toEqual([]);
    expect(byLabel(plan, nodes, 'zone')).toEqual({ a: 3, b: 3 });
    // inside zone a the usual ranking spreads over the nodes
    const perNode: Record<string, number> = {};
    for (const a of plan.assignments) perNode[a.nodeId] = (perNode[a.nodeId] ?? 0) + 1;
    expect(perNode.b1).toBe(3);
    expect(Math.max(perNode.a1 ?? 0, perNode.a2 ?? 0, perNode.a3 ?? 0, perNode.a4 ?? 0)).toBe(1);
    // without the preference, the 5 nodes share the tasks: b gets 1 or 2
    const plain = schedule({ nodes, tasks: pending('web', 6, spec([])) });
    expect(byLabel(plain, nodes, 'zone').b).toBeLessThanOrEqual(2);
  });

  it('nodes without the label form their own group', () => {
    const nodes = [node('a1', { zone: 'a' }), node('b1', { zone: 'b' }), node('n1'), node('n2')];
    const plan = schedule({ nodes, tasks: pending('web', 6, spec(['node.labels.zone'])) });
    expect(byLabel(plan, nodes, 'zone')).toEqual({ a: 2, b: 2, '(none)': 2 });
  });

  it('counts the tasks already running in each group', () => {
    const nodes = [node('a1', { zone: 'a' }), node('a2', { zone: 'a' }), node('b1', { zone: 'b' })];
    const s = spec(['node.labels.zone']);
    const existing = [running('web.x', 'web', 'a1', s), running('web.y', 'web', 'a2', s)];
    const plan = schedule({ nodes, tasks: [...existing, ...pending('web', 2, s, 3)] });
    // zone a has 2 already: both new ones go to b
    expect(byLabel(plan, nodes, 'zone')).toEqual({ b: 2 });
  });

  it('several preferences apply in order: zone first, then rack inside the zone', () => {
    const nodes = [
      node('a-r1-1', { zone: 'a', rack: 'r1' }),
      node('a-r1-2', { zone: 'a', rack: 'r1' }),
      node('a-r1-3', { zone: 'a', rack: 'r1' }),
      node('a-r2-1', { zone: 'a', rack: 'r2' }),
      node('b-r3-1', { zone: 'b', rack: 'r3' }),
    ];
    const plan = schedule({ nodes, tasks: pending('db', 4, spec(['node.labels.zone', 'node.labels.rack'])) });
    expect(byLabel(plan, nodes, 'zone')).toEqual({ a: 2, b: 2 });
    expect(byLabel(plan, nodes, 'rack')).toEqual({ r1: 1, r2: 1, r3: 2 });
  });

  it('a group whose nodes cannot take more (constraints, capacity) gives way to the others', () => {
    const nodes = [node('a1', { zone: 'a' }, { cpus: 1 }), node('b1', { zone: 'b' }), node('c1', { zone: 'c', pool: 'x' })];
    const plan = schedule({ nodes, tasks: pending('w', 5, spec(['node.labels.zone'], { cpus: 1, constraints: ['node.labels.zone!=c'] })) });
    // a1 fits one task, c is excluded by the constraint: b (4 CPUs) takes the rest
    expect(byLabel(plan, nodes, 'zone')).toEqual({ a: 1, b: 4 });
    expect(plan.unassigned).toEqual([]);
  });

  it('is deterministic whatever the input order', () => {
    const nodes = [node('a1', { zone: 'a' }), node('a2', { zone: 'a' }), node('b1', { zone: 'b' }), node('c1', { zone: 'c' }), node('n')];
    const tasks = pending('web', 11, spec(['node.labels.zone']));
    const one = schedule({ nodes, tasks });
    const two = schedule({ nodes: [...nodes].reverse(), tasks: [...tasks].reverse() });
    const key = (p: Plan) => p.assignments.map((a) => `${a.taskId}>${a.nodeId}`).sort();
    expect(key(two)).toEqual(key(one));
  });

  it('parses the CLI form and refuses anything else, naming the flag', () => {
    expect(parsePlacementPref('--placement-pref', 'spread=node.labels.zone')).toBe('node.labels.zone');
    expect(parseSpread('engine.labels.disk')).toMatchObject({ field: 'engine.labels', label: 'disk' });
    expect(() => parsePlacementPref('--placement-pref', 'binpack=node.labels.zone')).toThrow(/invalid --placement-pref "binpack=node.labels.zone": expected spread=node.labels.KEY/);
    expect(() => parsePlacementPref('--placement-pref', 'spread=zone')).toThrow(/unknown key "zone"/);
    expect(() => parsePlacementPref('--placement-pref-add', 'spread=node.labels.')).toThrow(/invalid --placement-pref-add/);
  });
});
