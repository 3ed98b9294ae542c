import { describe, expect, it } from 'vitest';
import { NodeAvailability, RestartCondition, ServiceMode, ServiceSpec, Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { createLogger } from '../../common/log.js';
import { testNode, testSpec } from '../../testing/testutil.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import { ControlApi } from '../controlapi/server.js';
import type { Dispatcher } from '../dispatcher/dispatcher.js';
import { JobOrchestrator, jobProgress } from './jobs.js';
import { TaskReaper } from './reaper.js';

const log = createLogger('test');
log.level = 'silent';

function setup() {
  const store = new MemoryStore(log);
  store.setProposer(new MemoryProposer(store));
  const api = new ControlApi({ store, dispatcher: undefined as unknown as Dispatcher, leaderAddr: () => '', readBarrier: async () => {} });
  const jobs = new JobOrchestrator(store, log);
  return { store, api, jobs };
}

function jobSpec(name: string, mode: ServiceMode, replicas: number, maxConcurrent: number, condition = RestartCondition.RESTART_CONDITION_ON_FAILURE): ServiceSpec {
  const s = testSpec(name, mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB ? 0 : replicas);
  s.mode = mode;
  s.maxConcurrent = maxConcurrent;
  s.task!.restart = { condition, delayMs: 0, maxAttempts: 0, windowMs: 0 };
  return s;
}

/** The stand-in for scheduler and agent: pending tasks go to a node and run. */
async function runPending(store: MemoryStore, nodeId: string): Promise<void> {
  await store.update((tx) => {
    for (const t0 of store.listTasks()) {
      const t = tx.get('task', t0.id)!;
      if (t.desiredState === TaskState.TASK_STATE_RUNNING && t.status!.state === TaskState.TASK_STATE_PENDING)
        tx.update('task', { ...t, nodeId: t.nodeId || nodeId, status: { ...t.status!, state: TaskState.TASK_STATE_RUNNING, timestamp: Date.now() } });
    }
  });
}

async function end(store: MemoryStore, id: string, state: TaskState, exitCode: number): Promise<void> {
  await store.update((tx) => {
    const t = tx.get('task', id)!;
    tx.update('task', { ...t, status: { ...t.status!, state, exitCode, timestamp: Date.now() } });
  });
}

const live = (store: MemoryStore, sid: string): Task[] => store.tasksOfService(sid).filter((t) => t.desiredState === TaskState.TASK_STATE_RUNNING);

describe('replicated jobs', () => {
  it('run to completion, max-concurrent at a time; failures follow the restart policy; --force runs it again', async () => {
    const { store, api, jobs } = setup();
    const node = testNode('a');
    await store.update((tx) => tx.create('node', node));
    const { service } = await api.createService({ spec: jobSpec('batch', ServiceMode.SERVICE_MODE_REPLICATED_JOB, 5, 2, RestartCondition.RESTART_CONDITION_ANY), noResolveImage: false });
    const sid = service!.id;
    expect(service!.jobStatus?.jobIteration).toBe(1);
    const pass = (): Promise<void> => store.update((tx) => jobs.reconcileService(tx, sid));
    await pass();
    expect(live(store, sid)).toHaveLength(2);
    await runPending(store, node.id);
    const [a, b] = live(store, sid);
    await end(store, a!.id, TaskState.TASK_STATE_COMPLETE, 0);
    await end(store, b!.id, TaskState.TASK_STATE_FAILED, 1);
    await pass();
    // the completed one is done for good; the failed one is replaced in its slot; one more slot starts
    expect(store.getTask(a!.id)!.desiredState).toBe(TaskState.TASK_STATE_COMPLETE);
    expect(store.getTask(b!.id)!.desiredState).toBe(TaskState.TASK_STATE_SHUTDOWN);
    const now = live(store, sid);
    expect(now).toHaveLength(2);
    expect(now.map((t) => t.slot).sort()).toEqual([b!.slot, 3].sort());
    // complete everything
    for (let round = 0; round < 10 && jobProgress(store.getService(sid)!, store.tasksOfService(sid)).completed < 5; round++) {
      await runPending(store, node.id);
      for (const t of live(store, sid)) await end(store, t.id, TaskState.TASK_STATE_COMPLETE, 0);
      await pass();
      expect(live(store, sid).length).toBeLessThanOrEqual(2);
    }
    const p = jobProgress(store.getService(sid)!, store.tasksOfService(sid));
    expect(p).toEqual({ running: 0, completed: 5, failed: 0, total: 5 });
    await pass();
    expect(live(store, sid)).toHaveLength(0);
    // a completed slot is never restarted, even with restart condition any
    const slots = store.tasksOfService(sid).filter((t) => t.status?.state === TaskState.TASK_STATE_COMPLETE).map((t) => t.slot);
    expect(new Set(slots).size).toBe(5);

    // service update --force: a new iteration runs all 5 again
    const cur = store.getService(sid)!;
    const spec = structuredClone(cur.spec!);
    spec.task!.forceUpdate++;
    await api.updateService({ serviceId: sid, spec, version: 0, rollback: '', toVersion: 0, dryRun: false, noResolveImage: false });
    expect(store.getService(sid)!.jobStatus?.jobIteration).toBe(2);
    await pass();
    expect(live(store, sid)).toHaveLength(2);
    expect(live(store, sid).every((t) => t.jobIteration === 2)).toBe(true);
    expect(jobProgress(store.getService(sid)!, store.tasksOfService(sid)).completed).toBe(0);
  });

  it('a new iteration stops the tasks of the previous one still running', async () => {
    const { store, api, jobs } = setup();
    const node = testNode('a');
    await store.update((tx) => tx.create('node', node));
    const { service } = await api.createService({ spec: jobSpec('slow', ServiceMode.SERVICE_MODE_REPLICATED_JOB, 2, 0), noResolveImage: false });
    const sid = service!.id;
    await store.update((tx) => jobs.reconcileService(tx, sid));
    await runPending(store, node.id);
    const first = live(store, sid).map((t) => t.id);
    expect(first).toHaveLength(2);
    const spec = structuredClone(store.getService(sid)!.spec!);
    spec.task!.forceUpdate++;
    await api.updateService({ serviceId: sid, spec, version: 0, rollback: '', toVersion: 0, dryRun: false, noResolveImage: false });
    await store.update((tx) => jobs.reconcileService(tx, sid));
    for (const id of first) expect(store.getTask(id)!.desiredState).toBe(TaskState.TASK_STATE_SHUTDOWN);
    expect(live(store, sid).map((t) => t.jobIteration)).toEqual([2, 2]);
  });

  it('restart condition none: a failed task is not restarted and the job reports it failed', async () => {
    const { store, api, jobs } = setup();
    const node = testNode('a');
    await store.update((tx) => tx.create('node', node));
    const { service } = await api.createService({ spec: jobSpec('once', ServiceMode.SERVICE_MODE_REPLICATED_JOB, 1, 0, RestartCondition.RESTART_CONDITION_NONE), noResolveImage: false });
    const sid = service!.id;
    await store.update((tx) => jobs.reconcileService(tx, sid));
    await runPending(store, node.id);
    await end(store, live(store, sid)[0]!.id, TaskState.TASK_STATE_FAILED, 3);
    await store.update((tx) => jobs.reconcileService(tx, sid));
    await store.update((tx) => jobs.reconcileService(tx, sid));
    expect(store.tasksOfService(sid)).toHaveLength(1);
    expect(jobProgress(store.getService(sid)!, store.tasksOfService(sid))).toMatchObject({ completed: 0, failed: 1, total: 1 });
  });

  it('the reaper keeps completed tasks of the current iteration and prunes earlier ones past the history limit', async () => {
    const { store, api, jobs } = setup();
    const node = testNode('a');
    await store.update((tx) => tx.create('node', node));
    const { service } = await api.createService({ spec: jobSpec('hist', ServiceMode.SERVICE_MODE_REPLICATED_JOB, 1, 0), noResolveImage: false });
    const sid = service!.id;
    for (let i = 0; i < 8; i++) {
      await store.update((tx) => jobs.reconcileService(tx, sid));
      await runPending(store, node.id);
      for (const t of live(store, sid)) await end(store, t.id, TaskState.TASK_STATE_COMPLETE, 0);
      await store.update((tx) => jobs.reconcileService(tx, sid));
      const spec = structuredClone(store.getService(sid)!.spec!);
      spec.task!.forceUpdate++;
      await api.updateService({ serviceId: sid, spec, version: 0, rollback: '', toVersion: 0, dryRun: false, noResolveImage: false });
    }
    const ac = new AbortController();
    const run = new TaskReaper(store, log).run(ac.signal);
    try {
      const deadline = Date.now() + 5000;
      while (store.tasksOfService(sid).length > 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    } finally {
      ac.abort();
      await run;
    }
    expect(store.tasksOfService(sid)).toHaveLength(5);
  });
});

describe('global jobs', () => {
  it('one task per active node, completed once; a node that joins later gets one; drained nodes none', async () => {
    const { store, api, jobs } = setup();
    const a = testNode('a');
    const b = testNode('b');
    const c = testNode('c', { availability: NodeAvailability.NODE_AVAILABILITY_DRAIN });
    await store.update((tx) => [a, b, c].forEach((n) => tx.create('node', n)));
    const { service } = await api.createService({ spec: jobSpec('everywhere', ServiceMode.SERVICE_MODE_GLOBAL_JOB, 0, 0), noResolveImage: false });
    const sid = service!.id;
    const pass = (): Promise<void> => store.update((tx) => jobs.reconcileService(tx, sid));
    await pass();
    expect(live(store, sid).map((t) => t.nodeId).sort()).toEqual([a.id, b.id].sort());
    await runPending(store, '');
    for (const t of live(store, sid)) await end(store, t.id, TaskState.TASK_STATE_COMPLETE, 0);
    await pass();
    await pass();
    expect(live(store, sid)).toHaveLength(0);
    expect(store.tasksOfService(sid)).toHaveLength(2);
    const d = testNode('d');
    await store.update((tx) => tx.create('node', d));
    await pass();
    expect(live(store, sid).map((t) => t.nodeId)).toEqual([d.id]);
    expect(jobProgress(store.getService(sid)!, store.tasksOfService(sid))).toMatchObject({ completed: 2, total: 3 });
  });

  it('refuses --max-concurrent outside replicated-job and replicas on a global job', async () => {
    const { api } = setup();
    await expect(api.createService({ spec: jobSpec('x1', ServiceMode.SERVICE_MODE_REPLICATED, 2, 1), noResolveImage: false })).rejects.toThrow(/invalid max-concurrent 1: only for --mode replicated-job/);
    const g = jobSpec('x2', ServiceMode.SERVICE_MODE_GLOBAL_JOB, 0, 0);
    g.replicas = 2;
    await expect(api.createService({ spec: g, noResolveImage: false })).rejects.toThrow(/invalid spec.replicas 2/);
  });
});
