/**
 * The task reaper: keeps each slot's history to the cluster's task history limit, stops the tasks
 * of removed services (a removal is written in several batches and may be cut short) and deletes
 * them once they have stopped, and ends tasks that were shut down before any node took them.
 */
import { Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import type { StoreEvent } from '../store/store.js';
import { ReconcileLoop } from './loop.js';
import { DEFAULT_TASK_HISTORY, isActive, isTerminal, nodeIsReady, withDesired, withStatus } from './tasks.js';

const CHUNK = 500;

export class TaskReaper extends ReconcileLoop {
  protected interested(ev: StoreEvent): boolean {
    if (ev.kind === 'commit') return false;
    if (ev.table === 'service') return ev.kind === 'delete';
    if (ev.table === 'node') return true;
    if (ev.table !== 'task') return false;
    const t = ev.object as Task;
    return !isActive(t) || ev.kind === 'delete';
  }

  protected async reconcile(signal: AbortSignal): Promise<void> {
    const limit = Number(this.store.getCluster()?.spec?.taskHistoryLimit || DEFAULT_TASK_HISTORY);
    const toDelete: string[] = [];
    const toEnd: Task[] = [];
    const toStop: Task[] = [];
    const slots = new Map<string, Task[]>();
    for (const t of this.store.listTasks()) {
      const service = this.store.getService(t.serviceId);
      const state = t.status?.state ?? 0;
      if (!isActive(t) && state <= TaskState.TASK_STATE_PENDING) {
        toEnd.push(t);
        continue;
      }
      if (!service) {
        if (isActive(t)) {
          toStop.push(t);
          continue;
        }
        // a removed service's tasks go once stopped, or at once when their node is gone or down
        const node = t.nodeId ? this.store.getNode(t.nodeId) : undefined;
        if (isTerminal(state) || !t.nodeId || !nodeIsReady(node)) toDelete.push(t.id);
        continue;
      }
      const key = `${t.serviceId}/${t.slot || t.nodeId}`;
      let list = slots.get(key);
      if (!list) slots.set(key, (list = []));
      list.push(t);
    }
    for (const list of slots.values()) {
      // a job's tasks of earlier iterations are history even when they completed
      const iter = this.store.getService(list[0]!.serviceId)?.jobStatus?.jobIteration ?? 0;
      const old = list.filter(
        (t) => !isActive(t) && (t.desiredState !== TaskState.TASK_STATE_COMPLETE || t.jobIteration < iter) && isTerminal(t.status?.state ?? 0),
      );
      const keep = Math.max(0, limit - (list.length - old.length));
      if (old.length <= keep) continue;
      old.sort((a, b) => (a.meta?.createdAt ?? 0) - (b.meta?.createdAt ?? 0));
      for (const t of old.slice(0, old.length - keep)) toDelete.push(t.id);
    }
    for (let i = 0; i < toEnd.length && !signal.aborted; i += CHUNK) {
      const chunk = toEnd.slice(i, i + CHUNK);
      await this.store.updateBatched((tx) => {
        for (const t0 of chunk) {
          const t = tx.get('task', t0.id);
          if (t && !isActive(t) && (t.status?.state ?? 0) <= TaskState.TASK_STATE_PENDING)
            tx.update('task', withStatus(t, TaskState.TASK_STATE_SHUTDOWN, 'shut down before it was assigned'));
        }
      }, signal);
    }
    if (toStop.length > 0 && !signal.aborted) {
      await this.store.updateBatched((tx) => {
        for (const t0 of toStop) {
          const t = tx.get('task', t0.id);
          if (t && isActive(t) && !this.store.getService(t.serviceId)) tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
        }
      }, signal);
    }
    for (let i = 0; i < toDelete.length && !signal.aborted; i += CHUNK) {
      const chunk = toDelete.slice(i, i + CHUNK);
      await this.store.updateBatched((tx) => {
        for (const id of chunk) tx.delete('task', id);
      }, signal);
    }
  }
}
