/**
 * Waiting for a service to converge, with progress like `docker service create`: a line per change
 * (rewritten in place on a terminal), and on timeout the reasons tasks are not running.
 */
import { ListTasksResponse, GetServiceResponse } from '../gen/flotilla/v1/control.js';
import { ServiceMode, Task, TaskState } from '../gen/flotilla/v1/objects.js';
import type { Control } from './client.js';
import { ExitError } from './util.js';
import { healthName, taskStateName } from './format.js';
import { taskSpecEqual } from '../manager/controlapi/diff.js';
import { isUp } from '../manager/orchestrator/update.js';
import { isJobService, jobProgress } from '../manager/orchestrator/jobs.js';

export interface Convergence {
  running: number;
  desired: number;
  done: boolean;
  tasks: Task[];
  /** for jobs: the iteration's progress (running counts completed tasks) */
  job?: ReturnType<typeof jobProgress>;
}

export async function convergence(c: Control, serviceId: string): Promise<Convergence> {
  const { service } = await c.call<unknown, GetServiceResponse>('getService', { serviceId });
  if (isJobService(service)) {
    // a job is done when every task of this iteration completed (or its slot gave up: failed)
    const { tasks } = await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: service!.id, nodeId: '', desiredRunning: false });
    const p = jobProgress(service!, tasks);
    const total = p.total || (service!.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB ? 0 : 1);
    return { running: p.completed, desired: p.total, done: p.completed + p.failed >= total && total > 0, tasks, job: p };
  }
  const { tasks } = await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: service!.id, nodeId: '', desiredRunning: true });
  const current = tasks.filter((t) => t.desiredState === TaskState.TASK_STATE_RUNNING);
  // a task with a health check counts as running only once healthy
  const running = current.filter((t) => isUp(t) && taskSpecEqual(t.spec, service!.spec?.task)).length;
  const global = service!.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL;
  const desired = global ? current.length : (service!.spec?.replicas ?? 0);
  // done when every wanted slot runs the current spec, and nothing old is still up
  const done = running === desired && current.length === desired;
  return { running, desired, done, tasks };
}

export async function waitForService(c: Control, serviceId: string, timeoutMs: number, quiet = false): Promise<void> {
  const tty = process.stdout.isTTY && !quiet;
  const start = Date.now();
  let last = '';
  let conv: Convergence | undefined;
  while (Date.now() - start < timeoutMs) {
    conv = await convergence(c, serviceId);
    const line = conv.job ? `job progress: ${conv.job.completed} out of ${conv.job.total} complete, ${conv.job.running} running` : `overall progress: ${conv.running} out of ${conv.desired} tasks`;
    if (!quiet && line !== last) {
      if (tty) process.stdout.write(`\r\x1b[K${line}`);
      else process.stdout.write(`${line}\n`);
      last = line;
    }
    if (conv.done && conv.job) {
      if (tty) process.stdout.write('\n');
      if (conv.job.failed) throw new ExitError(1, `job failed: ${conv.job.failed} of ${conv.job.total} tasks failed for good`);
      if (!quiet) process.stdout.write('verify: Job complete\n');
      return;
    }
    if (conv.done) {
      if (tty) process.stdout.write('\n');
      if (!quiet) process.stdout.write('verify: Service converged\n');
      return;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  if (tty) process.stdout.write('\n');
  const reasons = new Map<string, number>();
  for (const t of conv?.tasks ?? []) {
    if (isUp(t)) continue;
    const why =
      t.status?.state === TaskState.TASK_STATE_RUNNING
        ? `running, health ${healthName(t.status.health)}`
        : `${taskStateName(t.status?.state ?? 0)}: ${t.status?.err || t.status?.message || ''}`;
    reasons.set(why, (reasons.get(why) ?? 0) + 1);
  }
  const detail = [...reasons].map(([why, n]) => `${n} task${n === 1 ? '' : 's'} ${why}`).join('; ');
  throw new ExitError(1, `service did not converge within ${Math.round(timeoutMs / 1000)}s (${conv?.running ?? 0}/${conv?.desired ?? 0} running)${detail ? `: ${detail}` : ''}`);
}
