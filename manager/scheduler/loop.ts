/**
 * The scheduler's watch loop: on changes to pending tasks or nodes it takes a snapshot, asks the
 * pure schedule() function for a plan, and is the one applier that writes plans (assignments, and
 * the reasons a task fits nowhere) back through the store in chunks. It remembers where each service's
 * tasks failed of late, and has the plan rank those nodes last for that service (docs/scheduler.md).
 */
import { Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import type { StoreEvent } from '../store/store.js';
import { ReconcileLoop } from '../orchestrator/loop.js';
import { schedule } from './plan.js';
import { networksAllocated, WAITING_FOR_NETWORK } from '../allocator/networks.js';

const CHUNK = 1000;

/** Like swarmkit: this many failures of a service's tasks on a node within the window... */
export const FAILURES_TO_AVOID = 5;
/** ...make the scheduler place that service elsewhere while it can. */
export const FAILURE_WINDOW_MS = 5 * 60_000;

export class SchedulerLoop extends ReconcileLoop {
  /** serviceId -> nodeId -> times its tasks failed or were rejected there (this leader's memory) */
  private readonly failures = new Map<string, Map<string, number[]>>();

  private noteFailure(t: Task, now: number): void {
    let byNode = this.failures.get(t.serviceId);
    if (!byNode) this.failures.set(t.serviceId, (byNode = new Map()));
    const times = byNode.get(t.nodeId) ?? [];
    times.push(now);
    if (times.length > FAILURES_TO_AVOID) times.shift();
    byNode.set(t.nodeId, times);
  }

  /** The nodes each service is to avoid now; forgets failures older than the window. */
  private avoid(now: number): Map<string, Set<string>> {
    const out = new Map<string, Set<string>>();
    for (const [sid, byNode] of this.failures) {
      for (const [nid, times] of byNode) {
        while (times.length > 0 && times[0]! < now - FAILURE_WINDOW_MS) times.shift();
        if (times.length === 0) byNode.delete(nid);
        else if (times.length >= FAILURES_TO_AVOID) {
          let set = out.get(sid);
          if (!set) out.set(sid, (set = new Set()));
          set.add(nid);
        }
      }
      if (byNode.size === 0) this.failures.delete(sid);
    }
    return out;
  }

  protected interested(ev: StoreEvent): boolean {
    if (ev.kind === 'commit') return false;
    if (ev.table === 'node') return true;
    if (ev.table === 'service' && ev.kind === 'delete') this.failures.delete((ev.object as { id: string }).id);
    if (ev.table !== 'task') return false;
    const t = ev.object as Task;
    const st = t.status?.state ?? 0;
    if ((st === TaskState.TASK_STATE_FAILED || st === TaskState.TASK_STATE_REJECTED) && t.nodeId && t.serviceId && (ev.old as Task | undefined)?.status?.state !== st) {
      this.noteFailure(t, Date.now());
    }
    if (ev.kind === 'create') return t.status?.state === TaskState.TASK_STATE_PENDING;
    const old = ev.old as Task | undefined;
    // a held task released by the updater
    if (t.status?.state === TaskState.TASK_STATE_PENDING && t.desiredState !== old?.desiredState) return true;
    // a task the allocator just gave its network addresses
    if (t.status?.state === TaskState.TASK_STATE_PENDING && old && networksAllocated(t) !== networksAllocated(old)) return true;
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
    const plan = schedule({ nodes, tasks, services: this.store.services, avoid: this.avoid(Date.now()) });
    const reasons = new Map(plan.unassigned.map((u) => [u.taskId, u.reason] as const));
    const writes: Array<{ taskId: string; nodeId?: string; reason?: string }> = [
      ...plan.assignments.map((a) => ({ taskId: a.taskId, nodeId: a.nodeId })),
      ...[...reasons].map(([taskId, reason]) => ({ taskId, reason })),
    ];
    for (let i = 0; i < writes.length && !signal.aborted; i += CHUNK) {
      const chunk = writes.slice(i, i + CHUNK);
      await this.store.updateBatched((tx) => {
        for (const w of chunk) {
          const t = tx.get('task', w.taskId);
          if (!t || t.status?.state !== TaskState.TASK_STATE_PENDING || t.desiredState > TaskState.TASK_STATE_RUNNING) continue;
          if (w.nodeId) {
            tx.update('task', {
              ...t,
              nodeId: w.nodeId,
              status: { ...t.status, state: TaskState.TASK_STATE_ASSIGNED, message: 'scheduler assigned task to node', err: '', timestamp: Date.now() },
            });
          } else if (w.reason === WAITING_FOR_NETWORK && (networksAllocated(t) || t.status.err.startsWith('network '))) {
            // the allocator got there meanwhile (addresses, or the reason a network is full): keep its word
            continue;
          } else if (w.reason && t.status.err !== w.reason) {
            tx.update('task', { ...t, status: { ...t.status, message: 'pending task scheduling', err: w.reason, timestamp: Date.now() } });
          }
        }
      }, signal);
    }
  }
}
