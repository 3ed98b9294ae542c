/**
 * Scheduler throughput: plan 100,000 pending tasks (100 services x 1,000 replicas, some with
 * constraints, reservations or a max per node) over 1,000 nodes with the pure schedule() function.
 *
 *   npm run build && npm run bench:scheduler        (BENCH_RUNS=7, BENCH_NODES, BENCH_SERVICES, BENCH_REPLICAS)
 *
 * Prints each run and the median beside swarmkit's published micro-benchmark figure for the same
 * size (22.6 s; quoted, not run here) and our target (<= 1 s). Then checks the plan: every task
 * assigned, every constraint / reservation / max-per-node honoured, each service spread evenly
 * (max - min <= 1 over the nodes it may use). Exits non-zero only when the plan is wrong, never on
 * a missed time target.
 */
import { Node, NodeAvailability, NodeRole, NodeState, Task, TaskSpec, TaskState } from '../gen/flotilla/v1/objects.js';
import { matchAll, parseConstraint } from '../manager/scheduler/constraints.js';
import { schedule, type Plan } from '../manager/scheduler/plan.js';

const RUNS = Number(process.env.BENCH_RUNS ?? 7);
const NODES = Number(process.env.BENCH_NODES ?? 1000);
const SERVICES = Number(process.env.BENCH_SERVICES ?? 100);
const REPLICAS = Number(process.env.BENCH_REPLICAS ?? 1000);
const SWARMKIT_S = 22.6;
const TARGET_MS = 1000;
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const ZONES = ['a', 'b', 'c', 'd'];

function makeNodes(): Node[] {
  const nodes: Node[] = [];
  for (let i = 0; i < NODES; i++) {
    const id = `node${String(i).padStart(5, '0')}`;
    nodes.push({
      id,
      meta: undefined,
      spec: { labels: { zone: ZONES[i % ZONES.length]! }, desiredRole: NodeRole.NODE_ROLE_WORKER, availability: NodeAvailability.NODE_AVAILABILITY_ACTIVE },
      description: { hostname: `host-${i}`, resources: { nanoCpus: 32e9, memoryBytes: 128 * GiB, pids: 0 }, engineLabels: { disk: i % 2 ? 'ssd' : 'hdd' }, os: 'linux', arch: 'x64', runtime: 'sim', managerAddr: '' },
      status: { state: NodeState.NODE_STATE_READY, message: '', addr: '', lastHeartbeat: 0 },
      managerStatus: undefined,
      certificateExpiryMs: 0,
      certificateIssuer: '',
      role: NodeRole.NODE_ROLE_WORKER,
    });
  }
  return nodes;
}

interface ServiceShape {
  id: string;
  constraints: string[];
  cpu: number;
  memory: number;
  maxPerNode: number;
}

function shapes(): ServiceShape[] {
  return Array.from({ length: SERVICES }, (_, k) => ({
    id: `svc${String(k).padStart(4, '0')}`,
    // every 10th service: one zone of four; every 10th + 5: ssd nodes only
    constraints: k % 10 === 0 ? ['node.labels.zone==a'] : k % 10 === 5 ? ['engine.labels.disk == ssd', 'node.role!=manager'] : [],
    // every 5th (+1): reservations
    cpu: k % 5 === 1 ? 0.25e9 : 0,
    memory: k % 5 === 1 ? 256 * MiB : 0,
    // every 20th (+3): at most 2 per node
    maxPerNode: k % 20 === 3 ? 2 : 0,
  }));
}

/** Each task gets its own spec object, as decoded from the store. */
function makeTasks(svcs: ServiceShape[]): Task[] {
  const tasks: Task[] = [];
  for (const s of svcs) {
    for (let r = 1; r <= REPLICAS; r++) {
      const spec: TaskSpec = TaskSpec.fromPartial({
        container: { image: 'busybox:latest', args: ['sleep', '1000'] },
        resources: { reservations: { nanoCpus: s.cpu, memoryBytes: s.memory } },
        placement: { constraints: [...s.constraints], maxReplicasPerNode: s.maxPerNode },
      });
      tasks.push(
        Task.fromPartial({
          id: `${s.id}.${r}`,
          serviceId: s.id,
          serviceName: s.id,
          slot: r,
          spec,
          specVersion: 1,
          status: { state: TaskState.TASK_STATE_PENDING, message: 'pending task scheduling' },
          desiredState: TaskState.TASK_STATE_RUNNING,
        }),
      );
    }
  }
  return tasks;
}

/** Everything wrong with the plan ([] when it is right). */
function check(plan: Plan, nodes: Node[], svcs: ServiceShape[], tasks: Task[]): { problems: string[]; totals: number[] } {
  const problems: string[] = [];
  if (plan.unassigned.length) problems.push(`${plan.unassigned.length} tasks unassigned, e.g. ${plan.unassigned[0]!.taskId}: ${plan.unassigned[0]!.reason}`);
  if (plan.assignments.length !== tasks.length) problems.push(`${plan.assignments.length} assignments for ${tasks.length} tasks`);
  const nodeIdx = new Map(nodes.map((n, i) => [n.id, i] as const));
  const svcIdx = new Map(svcs.map((s, i) => [s.id, i] as const));
  const counts = svcs.map(() => new Int32Array(nodes.length));
  const cpu = new Float64Array(nodes.length);
  const mem = new Float64Array(nodes.length);
  const seen = new Set<string>();
  for (const a of plan.assignments) {
    if (seen.has(a.taskId)) problems.push(`task ${a.taskId} assigned twice`);
    seen.add(a.taskId);
    const i = nodeIdx.get(a.nodeId);
    const k = svcIdx.get(a.taskId.split('.')[0]!);
    if (i === undefined || k === undefined) {
      problems.push(`bad assignment ${a.taskId} -> ${a.nodeId}`);
      continue;
    }
    counts[k]![i]!++;
    cpu[i]! += svcs[k]!.cpu;
    mem[i]! += svcs[k]!.memory;
  }
  for (let i = 0; i < nodes.length; i++) {
    const res = nodes[i]!.description!.resources!;
    if (cpu[i]! > res.nanoCpus || mem[i]! > res.memoryBytes) problems.push(`node ${nodes[i]!.id} over capacity`);
  }
  for (let k = 0; k < svcs.length; k++) {
    const s = svcs[k]!;
    const cs = s.constraints.map(parseConstraint);
    let min = Infinity;
    let max = -Infinity;
    for (let i = 0; i < nodes.length; i++) {
      const c = counts[k]![i]!;
      const ok = matchAll(cs, nodes[i]!);
      if (!ok) {
        if (c) problems.push(`service ${s.id}: ${c} tasks on ${nodes[i]!.id}, which fails its constraints`);
        continue;
      }
      if (s.maxPerNode && c > s.maxPerNode) problems.push(`service ${s.id}: ${c} tasks on ${nodes[i]!.id} (max ${s.maxPerNode})`);
      min = Math.min(min, c);
      max = Math.max(max, c);
    }
    if (max - min > 1) problems.push(`service ${s.id}: uneven spread, ${min}..${max} tasks per eligible node`);
  }
  const totals = Array.from({ length: nodes.length }, (_, i) => counts.reduce((sum, c) => sum + c[i]!, 0));
  return { problems, totals };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function main(): void {
  const nodes = makeNodes();
  const svcs = shapes();
  const tasks = makeTasks(svcs);
  const constrained = svcs.filter((s) => s.constraints.length).length;
  const reserving = svcs.filter((s) => s.cpu || s.memory).length;
  const capped = svcs.filter((s) => s.maxPerNode).length;
  console.log(`scheduler: ${tasks.length} pending tasks over ${nodes.length} nodes`);
  console.log(`  ${SERVICES} services x ${REPLICAS} replicas: ${constrained} with constraints, ${reserving} with reservations (0.25 CPU, 256MiB), ${capped} with max 2 per node`);

  const times: number[] = [];
  let plan: Plan | undefined;
  for (let r = 0; r < RUNS; r++) {
    const t0 = performance.now();
    plan = schedule({ nodes, tasks });
    times.push(performance.now() - t0);
  }
  const med = median(times);
  console.log(`  runs (ms): ${times.map((t) => t.toFixed(0)).join(', ')}  (the first runs include JIT warm-up)`);
  console.log('');
  console.log(`  flotilla schedule() median     ${(med / 1000).toFixed(3)} s   (${Math.round(tasks.length / (med / 1000)).toLocaleString('en-US')} tasks/s)`);
  console.log(`  flotilla schedule() fastest    ${(Math.min(...times) / 1000).toFixed(3)} s`);
  console.log(`  swarmkit (published, not run)  ${SWARMKIT_S.toFixed(3)} s   -> flotilla ${(SWARMKIT_S * 1000 / med).toFixed(0)}x faster`);
  console.log(`  target                         <= ${(TARGET_MS / 1000).toFixed(3)} s  ${med <= TARGET_MS ? 'met' : 'MISSED'}`);

  // steady state: the planned tasks now run where they were placed; one more small service arrives
  const placed = new Map(plan!.assignments.map((a) => [a.taskId, a.nodeId] as const));
  const runningTasks = tasks.map((t) => ({ ...t, nodeId: placed.get(t.id) ?? '', status: { ...t.status!, state: TaskState.TASK_STATE_RUNNING } }));
  const extra = makeTasks([{ id: 'svcnew', constraints: [], cpu: 0, memory: 0, maxPerNode: 0 }]).slice(0, 10);
  const steady: number[] = [];
  for (let r = 0; r < RUNS; r++) {
    const t0 = performance.now();
    const p = schedule({ nodes, tasks: [...runningTasks, ...extra] });
    steady.push(performance.now() - t0);
    if (p.assignments.length !== extra.length) {
      console.log(`  steady state: PLAN WRONG (${p.assignments.length} of ${extra.length} assigned)`);
      process.exitCode = 1;
    }
  }
  console.log(`  steady state (${runningTasks.length} running + ${extra.length} pending): median ${median(steady).toFixed(1)} ms`);

  const { problems, totals } = check(plan!, nodes, svcs, tasks);
  console.log('');
  console.log(`  plan: ${plan!.assignments.length} assigned, ${plan!.unassigned.length} unassigned; tasks per node ${Math.min(...totals)}..${Math.max(...totals)}`);
  if (problems.length) {
    console.log(`  PLAN WRONG (${problems.length} problems):`);
    for (const p of problems.slice(0, 20)) console.log(`    ${p}`);
    process.exitCode = 1;
  } else {
    console.log('  plan check: every task assigned; constraints, reservations and max per node honoured; every service spread max-min <= 1');
  }
}

main();
