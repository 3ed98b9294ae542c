/**
 * The worker over the real runc runtime: tasks run, exit codes are reported, shutdown honours the
 * stop signal, removal cleans up, and a new worker (a restarted agent) adopts the running containers.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { newId } from '../../common/ids.js';
import { AssignmentsType, type AssignmentsMessage, type TaskStatusUpdate } from '../../gen/flotilla/v1/dispatcher.js';
import { NO_DEPS } from '../../testing/assignments.js';
import { HealthState, Task, TaskState, type TaskStatus } from '../../gen/flotilla/v1/objects.js';
import { importBusybox } from '../../test/helpers/busybox.js';
import type { RuncRuntime } from '../runtime/containers.js';
import { Worker } from './worker.js';
import { cgroupMismatches, processAlive, removeRunRoots } from '../../test/helpers/runtime-debris.js';
import { waitFor as poll } from '../../test/helpers/wait.js';

const waitFor = (what: string, fn: () => boolean | Promise<boolean>, ms = 20_000): Promise<boolean> => poll(what, fn, ms, 25);

const log = pino({ level: 'silent' });
const S = TaskState;

function task(slot: number, args: string[], over: { grace?: number; image?: string; health?: string[] } = {}): Task {
  return Task.fromPartial({
    id: newId(),
    serviceId: 'svc1',
    serviceName: 'rt',
    slot,
    spec: {
      container: {
        image: over.image ?? 'busybox:latest',
        args,
        stopGracePeriodMs: over.grace ?? 2000,
        healthcheck: over.health ? { test: over.health, intervalMs: 300, timeoutMs: 5000, startPeriodMs: 0, retries: 2 } : undefined,
      },
      resources: { limits: { memoryBytes: 32 * 1024 * 1024 } },
    },
    status: { state: S.TASK_STATE_ASSIGNED },
    desiredState: S.TASK_STATE_RUNNING,
  });
}

const complete = (tasks: Task[]): AssignmentsMessage => ({ type: AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE, update: tasks, remove: [], ...NO_DEPS });

describe.skipIf(process.getuid?.() !== 0)('worker over runc (needs root: runc, mounts, cgroups)', () => {
  let dir: string;
  let rt: RuncRuntime;
  const last = new Map<string, TaskStatus>();
  const send = async (updates: TaskStatusUpdate[]): Promise<void> => {
    for (const u of updates) last.set(u.taskId, u.status!);
  };

  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-worker-runc-'));
    await importBusybox(dir);
    const { RuncRuntime } = await import('../runtime/containers.js');
    rt = await RuncRuntime.open(dir);
  });
  afterAll(async () => {
    try {
      // every container removed (errors fail the suite) before its data dir goes
      if (rt) for (const c of await rt.list()) await rt.remove(c.id, true);
    } finally {
      rt?.close();
      if (dir) {
        await fs.rm(dir, { recursive: true, force: true });
        removeRunRoots(dir);
      }
    }
  });

  it('runs, reports exits, shuts down, removes and adopts after a restart', async () => {
    const w1 = new Worker({ runtime: rt, hostname: 'host1', log, status: { flushMs: 20 } });
    w1.setSender(send);
    const sleeper = task(1, ['sleep', '1000'], { health: ['CMD-SHELL', 'test -d /proc/1'] });
    const failer = task(2, ['sh', '-c', 'exit 3']);
    const stopper = task(3, ['sleep', '1000']);
    const missing = task(4, ['true'], { image: 'nosuchimage:1' });
    await w1.assign(complete([sleeper, failer, stopper, missing]));
    await waitFor('started', () => last.get(sleeper.id)?.state === S.TASK_STATE_RUNNING && last.get(stopper.id)?.state === S.TASK_STATE_RUNNING);
    await waitFor('failer exited', () => last.get(failer.id)?.state === S.TASK_STATE_FAILED);
    expect(last.get(failer.id)).toMatchObject({ exitCode: 3, err: 'task: non-zero exit (3)' });
    await waitFor('rejected', () => last.get(missing.id)?.state === S.TASK_STATE_REJECTED);
    expect(last.get(missing.id)!.err).toBe('image "nosuchimage:1" not found on node host1 (import it with flotilla image import)');
    const info = await rt.inspect(last.get(sleeper.id)!.containerId);
    expect(info.name).toBe(`rt.1.${sleeper.id}`);
    expect(info.pid).toBe(last.get(sleeper.id)!.pid);
    // the kernel agrees: the reported process runs in the cgroups inspect names
    expect(processAlive(info.pid)).toBe(true);
    expect(cgroupMismatches(info.pid, info.cgroupPaths)).toEqual([]);
    const stopperPid = last.get(stopper.id)!.pid;
    expect(processAlive(stopperPid)).toBe(true);
    // the health check runs in the container
    await waitFor('healthy', () => last.get(sleeper.id)?.health === HealthState.HEALTH_STATE_HEALTHY);

    // shutdown: sleep (pid 1) ignores TERM, so it is killed after the 2 s grace period
    const t0 = Date.now();
    await w1.assign({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL, update: [{ ...stopper, desiredState: S.TASK_STATE_SHUTDOWN }], remove: [], ...NO_DEPS });
    await waitFor('shut down', () => last.get(stopper.id)?.state === S.TASK_STATE_SHUTDOWN);
    expect(Date.now() - t0).toBeLessThan(8000);
    expect(processAlive(stopperPid), `stopper pid ${stopperPid}`).toBe(false);

    // the agent restarts: a new worker over a reopened runtime adopts the running container
    await w1.close();
    rt.close();
    const { RuncRuntime } = await import('../runtime/containers.js');
    rt = await RuncRuntime.open(dir);
    const w2 = new Worker({ runtime: rt, hostname: 'host1', log, status: { flushMs: 20 } });
    const after = new Map<string, TaskStatus>();
    w2.setSender(async (updates) => {
      for (const u of updates) after.set(u.taskId, u.status!);
    });
    const sleeperId = last.get(sleeper.id)!.containerId;
    await w2.assign(complete([{ ...sleeper, status: last.get(sleeper.id) }]));
    await w2.idle();
    expect(w2.containerOf(sleeper.id)).toBe(sleeperId);
    expect((await rt.inspect(sleeperId)).status).toBe('running');
    await new Promise((r) => setTimeout(r, 700)); // two health checks: still healthy, nothing to report
    expect(after.has(sleeper.id)).toBe(false);
    // the other tasks are no longer assigned: their containers are gone
    const names = (await rt.list()).map((c) => c.name);
    expect(names).toEqual([`rt.1.${sleeper.id}`]);
    // and the adopted task can be stopped and removed
    await w2.assign({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL, update: [{ ...sleeper, desiredState: S.TASK_STATE_SHUTDOWN, status: last.get(sleeper.id) }], remove: [], ...NO_DEPS });
    await waitFor('adopted shut down', () => after.get(sleeper.id)?.state === S.TASK_STATE_SHUTDOWN);
    expect(processAlive(info.pid), `adopted sleeper pid ${info.pid}`).toBe(false);
    await w2.assign({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL, update: [], remove: [sleeper.id], ...NO_DEPS });
    await w2.idle();
    expect(await rt.list()).toEqual([]);
    await w2.close();
  });
});
