/**
 * The scheduler's watch loop: on changes to pending tasks or nodes it takes a snapshot, asks the
 * pure schedule() function for a plan, and is the one applier that writes plans (assignments, and
 * the reasons a task fits nowhere) back through the store in chunks.
 */
import { Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import type { StoreEvent } from '../store/store.js';
import { ReconcileLoop } from '../orchestrator/loop.js';
import { schedule } from './plan.js';

const CHUNK = 1000;

export class SchedulerLoop extends ReconcileLoop {
  protected interested(ev: StoreEvent): boolean {
    if (ev.kind === 'commit') return false;
    if (ev.table === 'node') return true;
    if (ev.table !== 'task') return false;
    const t = ev.object as Task;
    if (ev.kind === 'create') return t.status?.state === TaskState.TASK_STATE_PENDING;
    const old = ev.old as Task | undefined;
    // a held task released by the updater
    if (t.status?.state === TaskState.TASK_STATE_PENDING && t.desiredState !== old?.desiredState) return true;
    // a task that ended or stopped frees room
    return (t.status?.state ?? 0) !== (old?.status?.state ?? 0) && (t.status?.state ?? 0) >= TaskState.TASK_STATE_COMPLETE;
  }

  protected async reconcile(signal: AbortSignal): Promise<void> {
    // snapshot (synchronous reads: one consistent state)
    // Tasks held back by a stop-first update (desired state below running) are placed too: their
    // agent prepares the container and starts it once the updater releases the task.
    const tasks = this.store.listTasks();
    if (!tasks.some((t) => t.status?.state === TaskState.TASK_STATE_PENDING && t.desiredState <= TaskState.TASK_STATE_RUNNING)) return;
    const nodes = this.store.listNodes();
    const plan = schedule({ nodes, tasks });
    const reasons = new Map(plan.unassigned.map((u) => [u.taskId, u.reason] as const));
    const writes: Array<{ taskId: string; nodeId?: string; reason?: string }> = [
      ...plan.assignments.map((a) => ({ taskId: a.taskId, nodeId: a.nodeId })),
      ...[...reasons].map(([taskId, reason]) => ({ taskId, reason })),
    ];
    for (let i = 0; i < writes.length && !signal.aborted; i += CHUNK) {
      const chunk = writes.slice(i, i + CHUNK);
      await this.store.update((tx) => {
        for (const w of chunk) {
          const t = tx.get<Task>('task', w.taskId);
          if (!t || t.status?.state !== TaskState.TASK_STATE_PENDING || t.desiredState > TaskState.TASK_STATE_RUNNING) continue;
          if (w.nodeId) {
            tx.update('task', {
              ...t,
              nodeId: w.nodeId,
              status: { ...t.status, state: TaskState.TASK_STATE_ASSIGNED, message: 'scheduler assigned task to node', err: '', timestamp: Date.now() },
            });
          } else if (w.reason && t.status.err !== w.reason) {
            tx.update('task', { ...t, status: { ...t.status, message: 'pending task scheduling', err: w.reason, timestamp: Date.now() } });
          }
        }
      }, signal);
    }
  }
}
