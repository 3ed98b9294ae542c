import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { AssignmentsType, type AssignmentsMessage, type TaskStatusUpdate } from '../../gen/flotilla/v1/dispatcher.js';
import { NO_DEPS } from '../../testing/assignments.js';
import { HealthState, Task, TaskState, type TaskStatus } from '../../gen/flotilla/v1/objects.js';
import { newId } from '../../common/ids.js';
import type { ContainerCreateOptions, ContainerInfo } from '../runtime/types.js';
import { LABEL_SERVICE_ID, LABEL_SERVICE_NAME, LABEL_SLOT, LABEL_TASK_ID, containerName, createOptions } from './controller.js';
import { SimRuntime, type SimRuntimeOptions } from './sim.js';
import { StatusQueue } from './status.js';
import { Worker } from './worker.js';
import type { TaskNetwork } from '../network/node-network.js';
import { waitFor as poll } from '../../test/helpers/wait.js';

const waitFor = (what: string, fn: () => boolean | Promise<boolean>, ms = 5000): Promise<boolean> => poll(what, fn, ms, 10);

const log = pino({ level: 'silent' });
const S = TaskState;

function task(over: { slot?: number; image?: string; env?: string[]; desired?: TaskState; status?: TaskState; service?: string; grace?: number } = {}): Task {
  const id = newId();
  return Task.fromPartial({
    id,
    serviceId: 'svc1',
    serviceName: over.service ?? 'web',
    slot: over.slot ?? 1,
    nodeId: 'node1node1node1node1node1',
    spec: {
      container: { image: over.image ?? 'busybox:latest', args: ['sleep', '1000'], env: over.env ?? [], stopGracePeriodMs: over.grace ?? 0 },
      resources: { limits: { memoryBytes: 64 * 1024 * 1024, nanoCpus: 5e8, pids: 100 } },
    },
    status: { state: over.status ?? S.TASK_STATE_ASSIGNED },
    desiredState: over.desired ?? S.TASK_STATE_RUNNING,
  });
}

const complete = (tasks: Task[]): AssignmentsMessage => ({ type: AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE, update: tasks, remove: [], ...NO_DEPS });
const incremental = (update: Task[], remove: string[] = []): AssignmentsMessage => ({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL, update, remove, ...NO_DEPS });

/** A fake dispatcher end: records every batch and every status per task, in order. */
class Recorder {
  calls: TaskStatusUpdate[][] = [];
  byTask = new Map<string, TaskStatus[]>();
  fail = false;
  send = async (updates: TaskStatusUpdate[]): Promise<void> => {
    if (this.fail) throw new Error('manager unavailable');
    this.calls.push(updates);
    for (const u of updates) {
      let l = this.byTask.get(u.taskId);
      if (!l) this.byTask.set(u.taskId, (l = []));
      l.push(u.status!);
    }
  };
  last(id: string): TaskStatus | undefined {
    return this.byTask.get(id)?.at(-1);
  }
  states(id: string): TaskState[] {
    return (this.byTask.get(id) ?? []).map((s) => s.state);
  }
}

function newWorker(rt: SimRuntime, rec: Recorder, over: Partial<ConstructorParameters<typeof Worker>[0]> = {}): Worker {
  const w = new Worker({ runtime: rt, hostname: 'host1', log, status: { flushMs: 20 }, ...over });
  w.setSender(rec.send);
  return w;
}

describe('controller', () => {
  it('names containers <service>.<slot|node prefix>.<task id> within 63 characters and maps the spec', () => {
    const t = task({ slot: 3 });
    expect(containerName(t)).toBe(`web.3.${t.id}`);
    const g = Task.fromPartial({ ...t, slot: 0 });
    expect(containerName(g)).toBe(`web.node1node1no.${t.id}`);
    const long = Task.fromPartial({ ...t, serviceName: 'x'.repeat(60) });
    expect(containerName(long).length).toBeLessThanOrEqual(63);
    expect(containerName(long).endsWith(`.3.${t.id}`)).toBe(true);
    const withCmd = Task.fromPartial({ ...t, spec: { ...t.spec, container: { ...t.spec!.container!, command: ['/bin/sh', '-c'], args: ['echo hi'], networkMode: 'host', user: 'nobody', workdir: '/tmp' } } });
    const o = createOptions(withCmd);
    expect(o).toMatchObject({
      image: 'busybox:latest',
      entrypoint: ['/bin/sh', '-c'],
      command: ['echo hi'],
      memoryBytes: 64 * 1024 * 1024,
      nanoCpus: 5e8,
      pidsLimit: 100,
      network: 'host',
      user: 'nobody',
      workdir: '/tmp',
    });
    expect(o.labels).toMatchObject({ [LABEL_TASK_ID]: t.id, [LABEL_SERVICE_ID]: 'svc1', [LABEL_SERVICE_NAME]: 'web', [LABEL_SLOT]: '3' });
    expect(createOptions(t).entrypoint).toBeUndefined();
  });

  it('gives containers a dot-free hostname unless the spec sets one (a dotted one becomes a search domain)', () => {
    const t = task({ slot: 3 });
    const h = createOptions(t).hostname!;
    expect(h).toBe(t.id.slice(0, 12));
    expect(h).not.toContain('.');
    const named = Task.fromPartial({ ...t, spec: { ...t.spec, container: { ...t.spec!.container!, hostname: 'db.example' } } });
    expect(createOptions(named).hostname).toBe('db.example');
  });
});

describe('worker over the sim runtime', () => {
  let rt: SimRuntime;
  let rec: Recorder;
  let worker: Worker | undefined;
  beforeEach(() => {
    rt = SimRuntime.memory();
    rec = new Recorder();
  });
  afterEach(async () => {
    await worker?.close();
    worker = undefined;
    await rt.close();
  });

  it('holds a task whose desired state is below running created but not started, prepared or adopted, until it is raised', async () => {
    worker = newWorker(rt, rec);
    const fresh = task({ slot: 1, desired: S.TASK_STATE_PREPARING });
    const adopted = task({ slot: 2, desired: S.TASK_STATE_PREPARING });
    const pre = await rt.create(createOptions(adopted));
    await worker.assign(complete([fresh, adopted]));
    await waitFor('fresh prepared', async () => rec.last(fresh.id)?.state === S.TASK_STATE_PREPARING && (await rt.list()).length === 2);
    await new Promise((res) => setTimeout(res, 200));
    for (const c of await rt.list()) expect(c.status).toBe('created');
    for (const t of [fresh, adopted]) expect(rec.states(t.id)).not.toContain(S.TASK_STATE_STARTING);
    await worker.assign(incremental([fresh, adopted].map((t) => ({ ...t, desiredState: S.TASK_STATE_RUNNING }))));
    await waitFor('both running', () => [fresh, adopted].every((t) => rec.last(t.id)?.state === S.TASK_STATE_RUNNING));
    expect(rec.last(adopted.id)?.containerId).toBe(pre.id);
    for (const c of await rt.list()) expect(c.status).toBe('running');
  });

  it('starts 50 tasks concurrently; statuses only move forward, batched into few calls', async () => {
    worker = newWorker(rt, rec);
    const tasks = Array.from({ length: 50 }, (_, i) => task({ slot: i + 1 }));
    const t0 = Date.now();
    await worker.assign(complete(tasks));
    await waitFor('all running', () => tasks.every((t) => rec.last(t.id)?.state === S.TASK_STATE_RUNNING));
    expect(Date.now() - t0).toBeLessThan(2000);
    for (const t of tasks) {
      const states = rec.states(t.id);
      for (let i = 1; i < states.length; i++) expect(states[i]!).toBeGreaterThan(states[i - 1]!);
      const st = rec.last(t.id)!;
      expect(st.containerId).toMatch(/^[a-z0-9]{25}$/);
      expect(st.pid).toBeGreaterThan(0);
      expect(st.timestamp).toBeGreaterThan(0);
      const info = await rt.inspect(st.containerId);
      expect(info.status).toBe('running');
      expect(info.name).toBe(`web.${t.slot}.${t.id}`);
      expect(info.labels[LABEL_TASK_ID]).toBe(t.id);
    }
    // 50 tasks × 4 states = 200 reports, coalesced into a handful of calls
    expect(worker.statuses.stats.pushed).toBe(200);
    expect(rec.calls.length).toBeLessThan(20);
    expect(rt.size).toBe(50);
  });

  it('does not serialize container creation (bounded concurrency)', async () => {
    class SlowSim extends SimRuntime {
      static make(): SlowSim {
        return new SlowSim({});
      }
      override async create(o: ContainerCreateOptions): Promise<ContainerInfo> {
        await new Promise((r) => setTimeout(r, 40));
        return super.create(o);
      }
    }
    const slow = SlowSim.make();
    const w = newWorker(slow, rec, { concurrency: 16 });
    try {
      const tasks = Array.from({ length: 50 }, (_, i) => task({ slot: i + 1 }));
      const t0 = Date.now();
      await w.assign(complete(tasks));
      await waitFor('all running', () => tasks.every((t) => rec.last(t.id)?.state === S.TASK_STATE_RUNNING));
      // serialized: 50 × 40 ms = 2 s; 16 at once: 4 rounds ≈ 160 ms
      expect(Date.now() - t0).toBeLessThan(1000);
    } finally {
      await w.close();
      await slow.close();
    }
  });

  it('starts a created container before creating the next ones (tasks run as they are prepared)', async () => {
    class SlowSim extends SimRuntime {
      readonly order: string[] = [];
      static make(): SlowSim {
        return new SlowSim({});
      }
      override async create(o: ContainerCreateOptions): Promise<ContainerInfo> {
        await new Promise((r) => setTimeout(r, 10));
        this.order.push('create');
        return super.create(o);
      }
      override async start(id: string): Promise<void> {
        this.order.push('start');
        return super.start(id);
      }
    }
    const slow = SlowSim.make();
    const w = newWorker(slow, rec, { concurrency: 2 });
    try {
      const tasks = Array.from({ length: 20 }, (_, i) => task({ slot: i + 1 }));
      await w.assign(complete(tasks));
      await waitFor('all running', () => tasks.every((t) => rec.last(t.id)?.state === S.TASK_STATE_RUNNING));
      // with a FIFO queue every start would wait behind all 20 creates
      const firstStart = slow.order.indexOf('start');
      expect(firstStart).toBeGreaterThan(0);
      expect(firstStart).toBeLessThanOrEqual(3);
      expect(slow.order.filter((o) => o === 'start')).toHaveLength(20);
    } finally {
      await w.close();
      await slow.close();
    }
  });

  it('reports COMPLETE on exit 0 and FAILED with the exit code (and OOM) otherwise', async () => {
    worker = newWorker(rt, rec);
    const ok = task({ env: ['FLOTILLA_SIM_EXIT_CODE=0', 'FLOTILLA_SIM_EXIT_AFTER_MS=20'] });
    const bad = task({ env: ['FLOTILLA_SIM_EXIT_CODE=3'] });
    const oom = task({ env: ['FLOTILLA_SIM_EXIT_CODE=137', 'FLOTILLA_SIM_OOM=1'] });
    await worker.assign(complete([ok, bad, oom]));
    await waitFor('exits', () => [ok, bad, oom].every((t) => (rec.last(t.id)?.state ?? 0) >= S.TASK_STATE_COMPLETE));
    expect(rec.last(ok.id)).toMatchObject({ state: S.TASK_STATE_COMPLETE, exitCode: 0, err: '' });
    expect(rec.last(bad.id)).toMatchObject({ state: S.TASK_STATE_FAILED, exitCode: 3, err: 'task: non-zero exit (3)' });
    expect(rec.last(oom.id)).toMatchObject({ state: S.TASK_STATE_FAILED, exitCode: 137, oomKilled: true });
    expect(rec.last(bad.id)!.containerId).toMatch(/^[a-z0-9]{25}$/);
    // a terminal task is never reported again, even when its desired state changes
    const calls = rec.calls.length;
    await worker.assign(incremental([{ ...bad, desiredState: S.TASK_STATE_SHUTDOWN }]));
    await worker.idle();
    await worker.statuses.flush();
    expect(rec.calls.length).toBe(calls);
  });

  it('shuts down tasks whose desired state is past RUNNING, then removes them when unassigned', async () => {
    worker = newWorker(rt, rec);
    const a = task({ slot: 1, grace: 5000 });
    const b = task({ slot: 2 });
    const c = task({ slot: 3 });
    await worker.assign(complete([a, b, c]));
    await waitFor('running', () => [a, b, c].every((t) => rec.last(t.id)?.state === S.TASK_STATE_RUNNING));
    const cidA = rec.last(a.id)!.containerId;
    const cidC = rec.last(c.id)!.containerId;

    await worker.assign(incremental([{ ...a, desiredState: S.TASK_STATE_SHUTDOWN }]));
    await waitFor('a shut down', () => rec.last(a.id)?.state === S.TASK_STATE_SHUTDOWN);
    expect(rec.last(a.id)).toMatchObject({ containerId: cidA, exitCode: 143, pid: 0 });
    // the container stays (for logs) until the task is removed
    expect((await rt.inspect(cidA)).status).toBe('stopped');

    await worker.assign(incremental([], [a.id]));
    await worker.idle();
    await expect(rt.inspect(cidA)).rejects.toThrow(/not found/);
    expect(worker.taskIds()).not.toContain(a.id);

    // a COMPLETE set without c: c's container is stopped and removed, not reported
    await worker.assign(complete([b]));
    await worker.idle();
    await expect(rt.inspect(cidC)).rejects.toThrow(/not found/);
    expect(rec.states(c.id)).not.toContain(S.TASK_STATE_SHUTDOWN);
    expect(worker.taskIds()).toEqual([b.id]);
    expect(rt.size).toBe(1);
  });

  it('drains a ready task on an overlay network before its stop signal: views applied first, SIGTERM after the drain delay', async () => {
    // the node's data plane seen from the worker: which views it applied, and when
    const applied: Array<{ at: number; views: number }> = [];
    const network: TaskNetwork = {
      applyAssignments: async (m) => void applied.push({ at: Date.now(), views: m.networkViews.length }),
      attach: async (id) => `/nonexistent/netns/${id}`,
      detach: async () => undefined,
      attachedTasks: () => [],
    };
    const stops = new Map<string, number>();
    const stop = rt.stop.bind(rt);
    rt.stop = async (id: string, grace: number) => {
      stops.set(id, Date.now());
      return stop(id, grace);
    };
    worker = newWorker(rt, rec, { network, drainDelayMs: 400 });
    const net = [{ networkId: 'ingress1', addresses: ['10.255.0.5/16'] }];
    const a = Task.fromPartial({ ...task({ slot: 1 }), networks: net });
    const b = task({ slot: 2 }); // no overlay network: nothing to drain
    const c = Task.fromPartial({ ...task({ slot: 3 }), networks: net });
    await worker.assign(complete([a, b, c]));
    await waitFor('running', () => [a, b, c].every((t) => rec.last(t.id)?.state === S.TASK_STATE_RUNNING));
    const view = { network: { id: 'ingress1' }, peers: [], endpoints: [] } as unknown as AssignmentsMessage['networkViews'][number];
    const t0 = Date.now();
    await worker.assign({ ...incremental([{ ...a, desiredState: S.TASK_STATE_SHUTDOWN }, { ...b, desiredState: S.TASK_STATE_SHUTDOWN }]), networkViews: [view] });
    await waitFor('a and b shut down', () => [a, b].every((t) => rec.last(t.id)?.state === S.TASK_STATE_SHUTDOWN));
    const viewAt = applied.find((x) => x.views === 1)!.at;
    expect(viewAt).toBeLessThanOrEqual(stops.get(rec.last(a.id)!.containerId)!);
    expect(stops.get(rec.last(a.id)!.containerId)! - t0).toBeGreaterThanOrEqual(400);
    expect(stops.get(rec.last(b.id)!.containerId)! - t0).toBeLessThan(400);
    // removed outright (service rm): no drain
    const t1 = Date.now();
    await worker.assign(incremental([], [c.id]));
    await worker.idle();
    expect(Date.now() - t1).toBeLessThan(400);
  });

  it('reports SHUTDOWN for a task stopped before it started', async () => {
    worker = newWorker(rt, rec);
    const t = task({ desired: S.TASK_STATE_SHUTDOWN });
    await worker.assign(complete([t]));
    await waitFor('shutdown', () => rec.last(t.id)?.state === S.TASK_STATE_SHUTDOWN);
    expect(rt.size).toBe(0);
  });

  it('rejects a task whose image is missing, naming the image and the node', async () => {
    const missing = SimRuntime.memory({ hasImage: (ref) => !ref.startsWith('nothere') });
    const w = newWorker(missing, rec);
    try {
      const t = task({ image: 'nothere:1.0' });
      await w.assign(complete([t]));
      await waitFor('rejected', () => rec.last(t.id)?.state === S.TASK_STATE_REJECTED);
      expect(rec.last(t.id)!.err).toBe('image "nothere:1.0" not found on node host1 (import it with flotilla image import)');
      const states = rec.states(t.id);
      for (let i = 1; i < states.length; i++) expect(states[i]!).toBeGreaterThan(states[i - 1]!);
      expect(missing.size).toBe(0);
    } finally {
      await w.close();
      await missing.close();
    }
  });

  it('rejects a task whose container cannot be created, with the error text', async () => {
    worker = newWorker(rt, rec);
    const t = task();
    await rt.create({ name: containerName(t), image: 'busybox' }); // name taken by a foreign container
    await worker.assign(complete([t]));
    await waitFor('rejected', () => rec.last(t.id)?.state === S.TASK_STATE_REJECTED);
    expect(rec.last(t.id)!.err).toMatch(/already exists/);
  });

  it('adopts its containers after a restart instead of starting copies', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-worker-'));
    try {
      const rt1 = await SimRuntime.open(dir);
      const w1 = newWorker(rt1, rec);
      const keep = task({ slot: 1 });
      const dies = task({ slot: 2 });
      const gone = task({ slot: 3 });
      const created = task({ slot: 4 });
      await w1.assign(complete([keep, dies, gone]));
      await waitFor('running', () => [keep, dies, gone].every((t) => rec.last(t.id)?.state === S.TASK_STATE_RUNNING));
      const ids = new Map([keep, dies, gone].map((t) => [t.id, rec.last(t.id)!.containerId]));
      await w1.close();
      // while the agent is down: one process exits, and a container was created but never started
      rt1.exit(ids.get(dies.id)!, 3);
      const cCreated = await rt1.create(createOptions(created));
      await rt1.close();

      // a new agent process: the runtime's state comes back from its file
      const rt2 = await SimRuntime.open(dir);
      expect(rt2.size).toBe(4);
      const rec2 = new Recorder();
      const w2 = newWorker(rt2, rec2);
      try {
        const asManagerSees = (t: Task, state: TaskState): Task => ({ ...t, status: { ...rec.last(t.id)!, state } });
        await w2.assign(
          complete([
            asManagerSees(keep, S.TASK_STATE_RUNNING),
            asManagerSees(dies, S.TASK_STATE_RUNNING),
            { ...created, status: { ...created.status!, state: S.TASK_STATE_PREPARING } },
          ]),
        );
        await waitFor('exit reported', () => rec2.last(dies.id)?.state === S.TASK_STATE_FAILED);
        await waitFor('created one started', () => rec2.last(created.id)?.state === S.TASK_STATE_RUNNING);
        await w2.idle();
        expect(rec2.last(dies.id)).toMatchObject({ exitCode: 3, err: 'task: non-zero exit (3)', containerId: ids.get(dies.id) });
        expect(rec2.last(created.id)!.containerId).toBe(cCreated.id);
        // the running one is adopted silently: same container, no new report, no copy
        expect(rec2.byTask.has(keep.id)).toBe(false);
        expect(w2.containerOf(keep.id)).toBe(ids.get(keep.id));
        expect((await rt2.inspect(ids.get(keep.id)!)).status).toBe('running');
        // the unassigned task's container is removed
        await expect(rt2.inspect(ids.get(gone.id)!)).rejects.toThrow(/not found/);
        expect(rt2.size).toBe(3);
        // the adopted task can still be shut down
        await w2.assign(incremental([{ ...keep, desiredState: S.TASK_STATE_SHUTDOWN, status: { ...rec.last(keep.id)! } }]));
        await waitFor('shutdown', () => rec2.last(keep.id)?.state === S.TASK_STATE_SHUTDOWN);
      } finally {
        await w2.close();
        await rt2.close();
      }
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  it('fails (does not restart) a task the manager saw running whose container is gone', async () => {
    worker = newWorker(rt, rec);
    const t = task({ status: S.TASK_STATE_RUNNING });
    await worker.assign(complete([t]));
    await waitFor('failed', () => rec.last(t.id)?.state === S.TASK_STATE_FAILED);
    expect(rec.last(t.id)!.err).toMatch(/container is gone/);
    expect(rt.size).toBe(0);
  });

  it('keeps reports while disconnected and sends them on reconnect', async () => {
    worker = new Worker({ runtime: rt, hostname: 'host1', log, status: { flushMs: 10, retryMs: 30 } });
    const t = task();
    await worker.assign(complete([t]));
    await worker.idle();
    await new Promise((r) => setTimeout(r, 50));
    expect(rec.calls.length).toBe(0);
    rec.fail = true;
    worker.setSender(rec.send);
    await new Promise((r) => setTimeout(r, 80));
    expect(worker.statuses.stats.failures).toBeGreaterThan(0);
    rec.fail = false;
    await waitFor('sent after failures', () => rec.last(t.id)?.state === S.TASK_STATE_RUNNING);
    // coalesced: only the newest status of the task went out
    expect(rec.states(t.id)).toEqual([S.TASK_STATE_RUNNING]);
  });
});

describe('health checks', () => {
  class FlakySim extends SimRuntime {
    execCode = 0;
    execs = 0;
    static make(opts: SimRuntimeOptions = {}): FlakySim {
      return new FlakySim(opts);
    }
    override async exec(id: string, cmd: string[]): Promise<{ exitCode: number; output: string }> {
      await super.exec(id, cmd);
      this.execs++;
      return { exitCode: this.execCode, output: this.execCode ? 'boom' : 'ok' };
    }
  }
  const withHealth = (t: Task, test: string[], over: Partial<{ retries: number; startPeriodMs: number }> = {}): Task =>
    Task.fromPartial({
      ...t,
      spec: { ...t.spec, container: { ...t.spec!.container!, healthcheck: { test, intervalMs: 20, timeoutMs: 1000, retries: over.retries ?? 2, startPeriodMs: over.startPeriodMs ?? 0 } } },
    });

  it('reports STARTING then HEALTHY with RUNNING; an unhealthy container is stopped and its task FAILED', async () => {
    const rt = FlakySim.make();
    const rec = new Recorder();
    const w = newWorker(rt, rec);
    try {
      const t = withHealth(task(), ['CMD', 'true']);
      await w.assign(complete([t]));
      await waitFor('healthy', () => rec.last(t.id)?.health === HealthState.HEALTH_STATE_HEALTHY);
      expect(rec.last(t.id)!.state).toBe(S.TASK_STATE_RUNNING);
      const cid = rec.last(t.id)!.containerId;
      rt.execCode = 1;
      await waitFor('failed', () => rec.last(t.id)?.state === S.TASK_STATE_FAILED);
      expect(rec.last(t.id)).toMatchObject({ err: 'task: container unhealthy', health: HealthState.HEALTH_STATE_UNHEALTHY, exitCode: 143 });
      expect((await rt.inspect(cid)).status).toBe('stopped');
    } finally {
      await w.close();
      await rt.close();
    }
  });

  it("inherits the image's HEALTHCHECK unless the task disables it", async () => {
    const rt = FlakySim.make({
      imageConfig: () => ({ entrypoint: [], cmd: ['sh'], env: [], workingDir: '', user: '', healthcheck: { test: ['CMD-SHELL', 'true'], intervalMs: 20, timeoutMs: 100, startPeriodMs: 0, retries: 1 } }),
    });
    const rec = new Recorder();
    const w = newWorker(rt, rec);
    try {
      const inherits = task({ slot: 1 });
      const disabled = Task.fromPartial({ ...task({ slot: 2 }) });
      disabled.spec!.container!.noHealthcheck = true;
      await w.assign(complete([inherits, disabled]));
      await waitFor('healthy', () => rec.last(inherits.id)?.health === HealthState.HEALTH_STATE_HEALTHY);
      await waitFor('running', () => rec.last(disabled.id)?.state === S.TASK_STATE_RUNNING);
      await new Promise((r) => setTimeout(r, 100));
      expect(rec.last(disabled.id)!.health).toBe(HealthState.HEALTH_STATE_NONE);
    } finally {
      await w.close();
      await rt.close();
    }
  });

  it('does not count failures during the start period', async () => {
    const rt = FlakySim.make();
    rt.execCode = 1;
    const rec = new Recorder();
    const w = newWorker(rt, rec);
    try {
      const t = withHealth(task(), ['CMD', 'check'], { retries: 1, startPeriodMs: 300 });
      await w.assign(complete([t]));
      await waitFor('checked a few times', () => rt.execs >= 3);
      expect(rec.last(t.id)).toMatchObject({ state: S.TASK_STATE_RUNNING, health: HealthState.HEALTH_STATE_STARTING });
      await waitFor('failed after the start period', () => rec.last(t.id)?.state === S.TASK_STATE_FAILED);
    } finally {
      await w.close();
      await rt.close();
    }
  });
});

describe('status queue', () => {
  it('coalesces per task and flushes in batches of at most maxBatch', async () => {
    const rec = new Recorder();
    const q = new StatusQueue({ flushMs: 30, maxBatch: 4 });
    const st = (state: TaskState): TaskStatus => ({ state, timestamp: Date.now(), message: '', err: '', exitCode: 0, containerId: '', pid: 0, health: 0, oomKilled: false });
    for (let i = 0; i < 3; i++) for (const s of [S.TASK_STATE_ACCEPTED, S.TASK_STATE_PREPARING, S.TASK_STATE_RUNNING]) q.push(`t${i}`, st(s));
    q.setSender(rec.send);
    await waitFor('sent', () => rec.calls.length > 0);
    expect(rec.calls.length).toBe(1);
    expect(rec.calls[0]!.map((u) => [u.taskId, u.status!.state])).toEqual([
      ['t0', S.TASK_STATE_RUNNING],
      ['t1', S.TASK_STATE_RUNNING],
      ['t2', S.TASK_STATE_RUNNING],
    ]);
    // 10 tasks at once: flushed at once (>= maxBatch), 4 per call
    for (let i = 0; i < 10; i++) q.push(`u${i}`, st(S.TASK_STATE_RUNNING));
    await q.flush();
    expect(rec.calls.slice(1).map((c) => c.length)).toEqual([4, 4, 2]);
    q.drop('x');
    await q.close();
  });
});

describe('secrets and configs in the worker', () => {
  /** The sim runtime, keeping the files each create was given (it ignores them otherwise). */
  class FilesSim extends SimRuntime {
    constructor() {
      super({});
    }
    files = new Map<string, ContainerCreateOptions['files']>();
    override async create(opts: ContainerCreateOptions): Promise<ContainerInfo> {
      this.files.set(opts.labels?.[LABEL_TASK_ID] ?? '', opts.files);
      return super.create(opts);
    }
  }
  const secret = (id: string, name: string, data: string) => ({ id, meta: undefined, spec: { name, labels: {}, data: Buffer.from(data) } });
  const withRefs = (t: Task, secrets: Array<{ id: string; name: string; file?: { name: string; uid: number; gid: number; mode: number } }>, configs: Array<{ id: string; name: string }> = []): Task => {
    const c = t.spec!.container!;
    c.secrets = secrets.map((s) => ({ secretId: s.id, secretName: s.name, file: s.file }));
    c.configs = configs.map((x) => ({ configId: x.id, configName: x.name, file: undefined }));
    return t;
  };

  it('hands a task its files from what the manager sent, keeps them in memory, forgets them on remove_*', async () => {
    const rt = new FilesSim();
    const rec = new Recorder();
    const w = newWorker(rt, rec);
    try {
      const t = withRefs(task({ slot: 1 }), [{ id: 'sec1', name: 'db', file: { name: 'db.key', uid: 33, gid: 34, mode: 0o400 } }, { id: 'sec1', name: 'db' }], [{ id: 'cfg1', name: 'app.conf' }]);
      await w.assign({ ...complete([t]), secrets: [secret('sec1', 'db', 'pw')], configs: [secret('cfg1', 'app.conf', 'port=1')] });
      await waitFor('running', () => rec.last(t.id)?.state === S.TASK_STATE_RUNNING);
      const files = rt.files.get(t.id)!;
      expect(files.map((f) => [f.target, Buffer.from(f.data).toString(), f.uid, f.gid, f.mode])).toEqual([
        ['/run/secrets/db.key', 'pw', 33, 34, 0o400],
        ['/run/secrets/db', 'pw', 0, 0, 0o444],
        ['/app.conf', 'port=1', 0, 0, 0o444],
      ]);
      expect(w.dependencyIds()).toEqual({ secrets: ['sec1'], configs: ['cfg1'] });
      await w.assign({ ...incremental([]), removeSecrets: ['sec1'], removeConfigs: ['cfg1'] });
      expect(w.dependencyIds()).toEqual({ secrets: [], configs: [] });
      // a COMPLETE set replaces what the worker held
      await w.assign({ ...complete([t]), secrets: [secret('sec2', 'other', 'x')] });
      expect(w.dependencyIds()).toEqual({ secrets: ['sec2'], configs: [] });
    } finally {
      await w.close();
      await rt.close();
    }
  });

  it('rejects a task whose secret did not arrive, naming it', async () => {
    const rt = new FilesSim();
    const rec = new Recorder();
    const w = newWorker(rt, rec);
    try {
      const t = withRefs(task({ slot: 1 }), [{ id: 'sec9', name: 'missing' }]);
      await w.assign(complete([t]));
      await waitFor('rejected', () => rec.last(t.id)?.state === S.TASK_STATE_REJECTED);
      expect(rec.last(t.id)?.err).toBe('secret "missing" (sec9) is not available on node host1');
      expect(await rt.list()).toEqual([]);
    } finally {
      await w.close();
      await rt.close();
    }
  });
});
