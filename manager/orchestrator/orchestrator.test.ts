import { describe, expect, it, vi } from 'vitest';
import {
  NodeAvailability,
  NodeState,
  NodeRole,
  Node,
  RestartCondition,
  Service,
  ServiceMode,
  Task,
  TaskState,
  UpdateFailureAction,
  UpdateOrder,
  UpdateState,
  HealthState,
} from '../../gen/flotilla/v1/objects.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import { testNode, testService } from '../../testing/testutil.js';
import { ReplicatedOrchestrator } from './replicated.js';
import { GlobalOrchestrator } from './global.js';
import { Updater } from './update.js';
import { createLogger } from '../../common/log.js';

const log = createLogger('test');
log.level = 'silent';

function setup() {
  const store = new MemoryStore();
  store.setProposer(new MemoryProposer(store));
  const repl = new ReplicatedOrchestrator(store, log);
  const glob = new GlobalOrchestrator(store, log);
  const upd = new Updater(store, log);
  return { store, repl, glob, upd };
}

async function put(store: MemoryStore, table: 'service' | 'node', obj: Service | Node): Promise<void> {
  await store.update((tx) => tx.create(table, obj));
}

/** What an agent would report: move a task to a state. */
async function report(store: MemoryStore, id: string, state: TaskState, extra: Partial<Task['status']> = {}): Promise<void> {
  await store.update((tx) => {
    const t = tx.get('task', id)!;
    tx.update('task', { ...t, status: { ...t.status!, state, timestamp: Date.now(), ...extra } });
  });
}

/** Assign pending tasks round robin and report them running (a stand-in for scheduler + agents). */
async function runAll(store: MemoryStore, nodes: Node[]): Promise<void> {
  let i = 0;
  await store.update((tx) => {
    for (const t0 of store.listTasks()) {
      const t = tx.get('task', t0.id)!;
      if (t.desiredState !== TaskState.TASK_STATE_RUNNING) continue;
      if (t.status!.state === TaskState.TASK_STATE_PENDING) {
        const nodeId = t.nodeId || nodes[i++ % nodes.length]!.id;
        tx.update('task', { ...t, nodeId, status: { ...t.status!, state: TaskState.TASK_STATE_RUNNING, timestamp: Date.now() } });
      }
    }
  });
}

/** A replicated service of `replicas` tasks (tweak changes its spec first), all running on one node 'a'. */
async function runningOnOneNode(name: string, replicas: number, tweak: (s: Service) => void = () => undefined) {
  const env = setup();
  const n = testNode('a');
  await put(env.store, 'node', n);
  const svc = testService(name, replicas);
  tweak(svc);
  await put(env.store, 'service', svc);
  await env.store.update((tx) => env.repl.reconcileService(tx, svc.id));
  await runAll(env.store, [n]);
  return { ...env, n, svc };
}

async function stopShutdown(store: MemoryStore): Promise<void> {
  await store.update((tx) => {
    for (const t0 of store.listTasks()) {
      const t = tx.get('task', t0.id)!;
      if (t.desiredState > TaskState.TASK_STATE_RUNNING && t.status!.state < TaskState.TASK_STATE_COMPLETE && t.desiredState !== TaskState.TASK_STATE_COMPLETE)
        tx.update('task', { ...t, status: { ...t.status!, state: TaskState.TASK_STATE_SHUTDOWN, timestamp: Date.now() } });
    }
  });
}

const live = (store: MemoryStore, sid: string) => store.tasksOfService(sid).filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING);

describe('replicated orchestrator', () => {
  it('fills slots 1..N, and scaling down shuts the highest slots', async () => {
    const { store, repl } = setup();
    const svc = testService('web', 3);
    await put(store, 'service', svc);
    await store.update((tx) => repl.reconcileService(tx, svc.id));
    expect(live(store, svc.id).map((t) => t.slot).sort()).toEqual([1, 2, 3]);
    // idempotent
    await store.update((tx) => repl.reconcileService(tx, svc.id));
    expect(store.tasksOfService(svc.id)).toHaveLength(3);
    await store.update((tx) => {
      const s = tx.get('service', svc.id)!;
      tx.update('service', { ...s, spec: { ...s.spec!, replicas: 1 } });
    });
    await store.update((tx) => repl.reconcileService(tx, svc.id));
    expect(live(store, svc.id).map((t) => t.slot)).toEqual([1]);
  });

  it('restarts a failed task in the same slot after the delay, and honours on-failure and max attempts', async () => {
    const { store, repl, n, svc } = await runningOnOneNode('job', 1, (s) => {
      s.spec!.task!.restart = { condition: RestartCondition.RESTART_CONDITION_ON_FAILURE, delayMs: 0, maxAttempts: 2, windowMs: 0 };
    });
    for (let attempt = 0; attempt < 3; attempt++) {
      const [t] = live(store, svc.id);
      await report(store, t!.id, TaskState.TASK_STATE_FAILED, { exitCode: 1 });
      await store.update((tx) => repl.reconcileService(tx, svc.id));
      await runAll(store, [n]);
    }
    // 1 original + 2 restarts, then it gives up: the last failed task keeps the slot
    const all = store.tasksOfService(svc.id);
    expect(all).toHaveLength(3);
    expect(all.every((t) => t.slot === 1)).toBe(true);
    expect(all.filter((t) => t.desiredState === TaskState.TASK_STATE_COMPLETE)).toHaveLength(1);

    // on-failure: a task that completes is not restarted
    const svc2 = testService('once', 1);
    svc2.spec!.task!.restart = { condition: RestartCondition.RESTART_CONDITION_ON_FAILURE, delayMs: 0, maxAttempts: 0, windowMs: 0 };
    await put(store, 'service', svc2);
    await store.update((tx) => repl.reconcileService(tx, svc2.id));
    await runAll(store, [n]);
    await report(store, live(store, svc2.id)[0]!.id, TaskState.TASK_STATE_COMPLETE);
    await store.update((tx) => repl.reconcileService(tx, svc2.id));
    expect(store.tasksOfService(svc2.id)).toHaveLength(1);
  });

  it('waits for the restart delay', async () => {
    const { store, repl, svc } = await runningOnOneNode('web', 1, (s) => {
      s.spec!.task!.restart!.delayMs = 60_000;
    });
    await report(store, live(store, svc.id)[0]!.id, TaskState.TASK_STATE_FAILED);
    await store.update((tx) => repl.reconcileService(tx, svc.id));
    expect(store.tasksOfService(svc.id)).toHaveLength(1); // not yet
  });

  it('orphans the tasks of a node that went down and replaces them', async () => {
    const { store, repl } = setup();
    const a = testNode('a');
    const b = testNode('b');
    await put(store, 'node', a);
    await put(store, 'node', b);
    const svc = testService('web', 2);
    await put(store, 'service', svc);
    await store.update((tx) => repl.reconcileService(tx, svc.id));
    await runAll(store, [a, b]);
    await store.update((tx) => {
      const n = tx.get('node', a.id)!;
      tx.update('node', { ...n, status: { ...n.status!, state: NodeState.NODE_STATE_DOWN } });
    });
    await store.update((tx) => repl.reconcileService(tx, svc.id));
    const orphaned = store.tasksOfService(svc.id).filter((t) => t.status!.state === TaskState.TASK_STATE_ORPHANED);
    expect(orphaned).toHaveLength(1);
    expect(orphaned[0]!.nodeId).toBe(a.id);
    const l = live(store, svc.id);
    expect(l).toHaveLength(2);
    expect(l.filter((t) => t.status!.state === TaskState.TASK_STATE_PENDING)).toHaveLength(1);
  });
});

describe('orchestrator watch loop', () => {
  it('reacts to every service an event batch touched, not only the first', async () => {
    const { store, repl } = setup();
    const n = testNode('a');
    await put(store, 'node', n);
    const svcs = [testService('one', 1), testService('two', 1)];
    for (const s of svcs) {
      s.spec!.task!.restart!.condition = RestartCondition.RESTART_CONDITION_NONE;
      await put(store, 'service', s);
    }
    const ctl = new AbortController();
    const running = repl.run(ctl.signal);
    try {
      const deadline = Date.now() + 2000;
      while (store.listTasks().length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      await runAll(store, [n]);
      // both tasks fail in one transaction: one batch of events for two services
      await store.update((tx) => {
        for (const t of store.listTasks()) tx.update('task', { ...t, status: { ...t.status!, state: TaskState.TASK_STATE_FAILED, timestamp: Date.now() } });
      });
      while (store.listTasks().some((t) => t.desiredState !== TaskState.TASK_STATE_COMPLETE) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      expect(store.listTasks().map((t) => t.desiredState)).toEqual([TaskState.TASK_STATE_COMPLETE, TaskState.TASK_STATE_COMPLETE]);
    } finally {
      ctl.abort();
      await running;
    }
  });
});

describe('updater watch loop and drained nodes', () => {
  it('a drained node without tasks (an agentless manager) costs no look at the tasks; a drained node with tasks still has them moved', async () => {
    const { store, repl, upd } = setup();
    // an agentless manager: always drained, never holds a task
    const mgr = testNode('mgr', { availability: NodeAvailability.NODE_AVAILABILITY_DRAIN, role: NodeRole.NODE_ROLE_MANAGER });
    mgr.description = { ...mgr.description!, runtime: '', managerAddr: '127.0.0.1:4242' };
    const a = testNode('a');
    const b = testNode('b');
    for (const n of [mgr, a, b]) await put(store, 'node', n);
    const svc = testService('web', 4);
    await put(store, 'service', svc);
    await store.update((tx) => repl.reconcileService(tx, svc.id));
    await runAll(store, [a, b]);
    const ctl = new AbortController();
    const running = upd.run(ctl.signal);
    const scans = vi.spyOn(store, 'tasksOfService');
    try {
      // task events the updater watches (state changes) make passes over the service
      for (let i = 0; i < 4; i++) {
        await store.update((tx) => {
          for (const t of store.tasksOfService(svc.id)) tx.update('task', { ...t, status: { ...t.status!, state: i % 2 ? TaskState.TASK_STATE_RUNNING : TaskState.TASK_STATE_STARTING, timestamp: Date.now() } });
        });
        await new Promise((r) => setTimeout(r, 30));
      }
      const ours = scans.mock.calls.length - 4; // the four calls above are the test's own
      expect(ours).toBe(0);
      // drain b, which holds tasks: the updater takes them off it
      const onB = store.tasksOfService(svc.id).filter((t) => t.nodeId === b.id);
      expect(onB.length).toBeGreaterThan(0);
      await store.update((tx) => {
        const n = tx.get('node', b.id)!;
        tx.update('node', { ...n, spec: { ...n.spec!, availability: NodeAvailability.NODE_AVAILABILITY_DRAIN } });
      });
      const deadline = Date.now() + 3000;
      // stop-first (the default): each slot on b is stopped and gets a replacement, held until it has
      const moved = () => store.tasksOfService(svc.id).length > 4 || onB.some((t) => (store.getTask(t.id)?.desiredState ?? 0) > TaskState.TASK_STATE_RUNNING);
      while (!moved() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      expect(moved()).toBe(true);
    } finally {
      scans.mockRestore();
      ctl.abort();
      await running;
    }
  });
});

describe('global orchestrator', () => {
  it('runs one task per eligible node, following nodes as they come, pause and drain', async () => {
    const { store, glob } = setup();
    const a = testNode('a', { labels: { zone: 'x' } });
    const b = testNode('b', { labels: { zone: 'y' } });
    await put(store, 'node', a);
    await put(store, 'node', b);
    const svc = testService('agent', 0, { mode: ServiceMode.SERVICE_MODE_GLOBAL });
    await put(store, 'service', svc);
    await store.update((tx) => glob.reconcileService(tx, svc.id));
    expect(live(store, svc.id).map((t) => t.nodeId).sort()).toEqual([a.id, b.id].sort());
    const c = testNode('c', { availability: NodeAvailability.NODE_AVAILABILITY_PAUSE });
    await put(store, 'node', c);
    await store.update((tx) => glob.reconcileService(tx, svc.id));
    expect(live(store, svc.id)).toHaveLength(2); // paused node takes no new task
    await store.update((tx) => {
      const n = tx.get('node', b.id)!;
      tx.update('node', { ...n, spec: { ...n.spec!, availability: NodeAvailability.NODE_AVAILABILITY_DRAIN } });
    });
    await store.update((tx) => glob.reconcileService(tx, svc.id));
    expect(live(store, svc.id).map((t) => t.nodeId)).toEqual([a.id]);

    const zoned = testService('zoned', 0, { mode: ServiceMode.SERVICE_MODE_GLOBAL });
    zoned.spec!.task!.placement!.constraints = ['node.labels.zone==x'];
    await put(store, 'service', zoned);
    await store.update((tx) => glob.reconcileService(tx, zoned.id));
    expect(live(store, zoned.id).map((t) => t.nodeId)).toEqual([a.id]);
  });
});

describe('updater', () => {
  async function updatedService(store: MemoryStore, svc: Service, order: UpdateOrder, parallelism: number, extra: Partial<NonNullable<Service['spec']>['update']> = {}) {
    await store.update((tx) => {
      const s = tx.get('service', svc.id)!;
      const spec = structuredClone(s.spec!);
      spec.task!.container!.env = ['V=2'];
      spec.update = { ...spec.update!, order, parallelism, monitorMs: 0, ...extra };
      tx.update('service', {
        ...s,
        spec,
        previousSpec: s.spec,
        specVersion: s.specVersion + 1,
        updateStatus: { state: UpdateState.UPDATE_STATE_UPDATING, startedAt: Date.now(), completedAt: 0, message: '' },
      });
    });
  }

  async function drive(store: MemoryStore, repl: ReplicatedOrchestrator, upd: Updater, svcId: string, nodes: Node[], onStep: () => void, steps = 40) {
    for (let i = 0; i < steps; i++) {
      await store.update((tx) => upd.reconcileAt(tx, svcId, Date.now()));
      await store.update((tx) => repl.reconcileService(tx, svcId));
      onStep();
      await stopShutdown(store);
      onStep();
      await runAll(store, nodes);
      onStep();
      const st = store.getService(svcId)!.updateStatus?.state;
      if (st !== UpdateState.UPDATE_STATE_UPDATING && st !== UpdateState.UPDATE_STATE_ROLLBACK_STARTED) return;
    }
  }

  it('stop-first never takes down more than the parallelism at once, and completes', async () => {
    const { store, repl, upd, n, svc } = await runningOnOneNode('web', 6);
    await updatedService(store, svc, UpdateOrder.UPDATE_ORDER_STOP_FIRST, 2);
    let minRunning = Infinity;
    let maxNewAtOnce = 0;
    await drive(store, repl, upd, svc.id, [n], () => {
      const running = store.tasksOfService(svc.id).filter((t) => t.status!.state === TaskState.TASK_STATE_RUNNING && t.desiredState === TaskState.TASK_STATE_RUNNING).length;
      minRunning = Math.min(minRunning, running);
      const inflight = store.tasksOfService(svc.id).filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING && t.status!.state !== TaskState.TASK_STATE_RUNNING).length;
      maxNewAtOnce = Math.max(maxNewAtOnce, inflight);
      // stop-first: a slot never has its old and new task on a node at the same time
      for (const slot of [1, 2, 3, 4, 5, 6]) {
        const onNode = store.tasksOfService(svc.id).filter((t) => t.slot === slot && t.status!.state >= TaskState.TASK_STATE_ASSIGNED && t.status!.state < TaskState.TASK_STATE_COMPLETE);
        expect(onNode.length, `slot ${slot}`).toBeLessThanOrEqual(1);
      }
    });
    expect(store.getService(svc.id)!.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_COMPLETED);
    expect(minRunning).toBeGreaterThanOrEqual(4);
    expect(maxNewAtOnce).toBeLessThanOrEqual(2);
    expect(maxNewAtOnce).toBe(2);
    expect(live(store, svc.id).every((t) => t.spec!.container!.env[0] === 'V=2')).toBe(true);
    // a held stop-first task is never handed to a node before the old one stopped: checked by the order of states
  });

  it('start-first never lets the running count drop below the desired count', async () => {
    const { store, repl, upd, n, svc } = await runningOnOneNode('web', 4);
    await updatedService(store, svc, UpdateOrder.UPDATE_ORDER_START_FIRST, 2);
    let minRunning = Infinity;
    let overlap = 0;
    await drive(store, repl, upd, svc.id, [n], () => {
      const running = store.tasksOfService(svc.id).filter((t) => t.status!.state === TaskState.TASK_STATE_RUNNING).length;
      minRunning = Math.min(minRunning, running);
      // start-first: old and new run side by side for a while
      overlap = Math.max(overlap, running - 4);
    });
    expect(overlap).toBeGreaterThan(0);
    expect(store.getService(svc.id)!.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_COMPLETED);
    expect(minRunning).toBeGreaterThanOrEqual(4);
  });

  it('pauses on a failed task, or rolls back when so configured', async () => {
    for (const action of [UpdateFailureAction.UPDATE_FAILURE_ACTION_PAUSE, UpdateFailureAction.UPDATE_FAILURE_ACTION_ROLLBACK]) {
      const { store, repl, upd, n, svc } = await runningOnOneNode('web', 3, (s) => {
        s.spec!.rollback!.monitorMs = 0;
      });
      await updatedService(store, svc, UpdateOrder.UPDATE_ORDER_STOP_FIRST, 1, { failureAction: action });
      await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
      await stopShutdown(store);
      await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
      const fresh = live(store, svc.id).find((t) => t.spec!.container!.env[0] === 'V=2')!;
      await report(store, fresh.id, TaskState.TASK_STATE_FAILED, { err: 'task: non-zero exit (3)' });
      await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
      const s = store.getService(svc.id)!;
      if (action === UpdateFailureAction.UPDATE_FAILURE_ACTION_PAUSE) {
        expect(s.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_PAUSED);
        expect(s.updateStatus!.message).toMatch(/non-zero exit \(3\)/);
      } else {
        expect(s.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_ROLLBACK_STARTED);
        expect(s.spec!.task!.container!.env).toEqual([]);
        await drive(store, repl, upd, svc.id, [n], () => {});
        expect(store.getService(svc.id)!.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_ROLLBACK_COMPLETED);
        expect(live(store, svc.id).filter((t) => t.desiredState === TaskState.TASK_STATE_RUNNING).every((t) => t.spec!.container!.env.length === 0)).toBe(true);
      }
    }
  });

  it('counts a task that fails after the monitor window but before completion', async () => {
    const { store, upd, n, svc } = await runningOnOneNode('web', 2);
    await updatedService(store, svc, UpdateOrder.UPDATE_ORDER_STOP_FIRST, 1, { monitorMs: 0 });
    // first slot updated and running; second not yet done
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    await stopShutdown(store);
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    await runAll(store, [n]);
    const first = live(store, svc.id).find((t) => t.spec!.container!.env[0] === 'V=2' && t.status!.state === TaskState.TASK_STATE_RUNNING)!;
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now() + 60_000)); // long after its monitor window
    await report(store, first.id, TaskState.TASK_STATE_FAILED, { err: 'late crash' });
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now() + 60_000));
    expect(store.getService(svc.id)!.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_PAUSED);
  });

  it('does not complete while an updated task is running but unhealthy', async () => {
    const { store, upd, svc } = await runningOnOneNode('web', 1);
    await updatedService(store, svc, UpdateOrder.UPDATE_ORDER_START_FIRST, 1);
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    const fresh = live(store, svc.id).find((t) => t.spec!.container!.env[0] === 'V=2')!;
    await report(store, fresh.id, TaskState.TASK_STATE_RUNNING, { health: HealthState.HEALTH_STATE_STARTING });
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    expect(store.getService(svc.id)!.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_UPDATING);
    // the old task still runs: start-first keeps it until the new one is healthy
    expect(live(store, svc.id)).toHaveLength(2);
    await report(store, fresh.id, TaskState.TASK_STATE_RUNNING, { health: HealthState.HEALTH_STATE_HEALTHY });
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    expect(live(store, svc.id)).toHaveLength(1);
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    expect(store.getService(svc.id)!.updateStatus!.state).toBe(UpdateState.UPDATE_STATE_COMPLETED);
  });

  it('global start-first: the global orchestrator leaves the old task to the updater; a drained node gets no replacement', async () => {
    const { store, glob, upd } = setup();
    const a = testNode('a');
    const b = testNode('b');
    await put(store, 'node', a);
    await put(store, 'node', b);
    const svc = testService('agent', 0, { mode: ServiceMode.SERVICE_MODE_GLOBAL });
    await put(store, 'service', svc);
    await store.update((tx) => glob.reconcileService(tx, svc.id));
    await runAll(store, [a, b]);
    await updatedService(store, svc, UpdateOrder.UPDATE_ORDER_START_FIRST, 0);
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    await store.update((tx) => glob.reconcileService(tx, svc.id));
    // both nodes run old and new side by side until the new ones are up
    expect(live(store, svc.id)).toHaveLength(4);
    await runAll(store, [a, b]);
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    expect(live(store, svc.id).map((t) => t.spec!.container!.env[0])).toEqual(['V=2', 'V=2']);
    // drain b: its task stops; neither the orchestrator nor the updater puts a new one there
    const onB = store.tasksOfService(svc.id).filter((t) => t.nodeId === b.id).length;
    await store.update((tx) => {
      const n = tx.get('node', b.id)!;
      tx.update('node', { ...n, spec: { ...n.spec!, availability: NodeAvailability.NODE_AVAILABILITY_DRAIN } });
    });
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    await store.update((tx) => glob.reconcileService(tx, svc.id));
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    expect(live(store, svc.id).map((t) => t.nodeId)).toEqual([a.id]);
    expect(store.tasksOfService(svc.id).filter((t) => t.nodeId === b.id)).toHaveLength(onB);
  });

  it('--update-delay: a slot whose replacement came up keeps its place in the parallelism for the delay', async () => {
    const { store, upd, n, svc } = await runningOnOneNode('web', 4);
    await updatedService(store, svc, UpdateOrder.UPDATE_ORDER_STOP_FIRST, 2, { delayMs: 10_000 });
    const fresh = () => store.tasksOfService(svc.id).filter((t) => t.spec!.container!.env[0] === 'V=2');
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    await stopShutdown(store);
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    expect(fresh()).toHaveLength(2);
    // slot 1's replacement comes up; slot 2's is still on its way
    const first = fresh().find((t) => t.slot === 1)!;
    await store.update((tx) => {
      const t = tx.get('task', first.id)!;
      tx.update('task', { ...t, nodeId: n.id, status: { ...t.status!, state: TaskState.TASK_STATE_RUNNING, timestamp: Date.now() } });
    });
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now()));
    expect(fresh()).toHaveLength(2); // slot 1 waits out the delay: no third replacement yet
    await store.update((tx) => upd.reconcileAt(tx, svc.id, Date.now() + 11_000));
    expect(fresh()).toHaveLength(3);
    expect(fresh().map((t) => t.slot).sort()).toEqual([1, 2, 3]);
  });
});
