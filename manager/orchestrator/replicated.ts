/**
 * The replicated orchestrator: keeps slots 1..N of every replicated service filled with one task
 * desired running, applies the restart policy to tasks that ended, replaces tasks on nodes that went
 * down, and shuts down the highest slots when scaling down.
 *
 * Rolling updates of tasks whose spec is out of date, and moving tasks off drained nodes, are the
 * updater's job (manager/orchestrator/update.ts): both follow the service's update parallelism and order.
 */
import { Service, ServiceMode, Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import type { Tx } from '../store/store.js';
import { ServiceOrchestrator } from './service-loop.js';
import { isActive, isTerminal, newTask, nodeIsReady, restartDecision, withDesired, withStatus } from './tasks.js';

export class ReplicatedOrchestrator extends ServiceOrchestrator {
  protected readonly mode = ServiceMode.SERVICE_MODE_REPLICATED;

  reconcileService(tx: Tx, serviceId: string): void {
    const service = tx.get('service', serviceId);
    if (!service || service.spec?.mode !== ServiceMode.SERVICE_MODE_REPLICATED) return;
    const now = Date.now();
    const want = service.spec.replicas;
    const slots = new Map<number, Task[]>();
    for (const t0 of this.store.tasksOfService(serviceId)) {
      const t = tx.get('task', t0.id) ?? t0;
      let list = slots.get(t.slot);
      if (!list) slots.set(t.slot, (list = []));
      list.push(t);
    }
    let occupied = 0;
    for (const [slot, list] of slots) {
      if (slot > want) {
        // scale down: everything in slots above N stops
        for (const t of list) if (isActive(t)) tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
        continue;
      }
      let active = list.filter(isActive);
      // tasks on nodes that are gone or down are orphaned; the slot gets a new task
      const orphaned = active.filter((t) => this.onLostNode(t));
      for (const t of orphaned)
        tx.update('task', withDesired(withStatus(t, TaskState.TASK_STATE_ORPHANED, 'node is down', 'node is down'), TaskState.TASK_STATE_SHUTDOWN));
      if (orphaned.length) active = active.filter((t) => !orphaned.includes(t));
      if (active.length === 0) {
        // a slot whose task finished for good (restart policy said no) stays occupied
        if (orphaned.length === 0 && list.some((t) => t.desiredState === TaskState.TASK_STATE_COMPLETE)) occupied++;
        continue;
      }
      occupied++;
      // Several active tasks in a slot happen only during a rolling update (start-first, or a new
      // task held until the old one stops): the updater settles those. The newest is the slot's.
      active.sort((a, b) => (b.meta?.createdAt ?? 0) - (a.meta?.createdAt ?? 0));
      const cur = active[0]!;
      this.superviseTask(tx, service, cur, list, now);
    }
    // fill empty slots 1..N
    for (let slot = 1; slot <= want && occupied < want; slot++) {
      const list = slots.get(slot);
      if (list && list.some((t) => (isActive(t) && !this.onLostNode(t)) || t.desiredState === TaskState.TASK_STATE_COMPLETE)) continue;
      tx.create('task', newTask(service, slot));
      occupied++;
    }
  }

  private onLostNode(t: Task): boolean {
    const state = t.status?.state ?? 0;
    if (!t.nodeId || state < TaskState.TASK_STATE_ASSIGNED || isTerminal(state)) return false;
    const node = this.store.getNode(t.nodeId);
    return !node || !nodeIsReady(node);
  }

  /** The restart policy for the slot's current task. */
  private superviseTask(tx: Tx, service: Service, t: Task, history: Task[], now: number): void {
    const state = t.status?.state ?? 0;
    if (!isTerminal(state)) return;
    const at = restartDecision(t, history, now);
    if (at === undefined) {
      // finished for good: keep the slot, mark it
      tx.update('task', withDesired(t, TaskState.TASK_STATE_COMPLETE));
      return;
    }
    if (at > now) {
      this.wakeAt(at);
      return;
    }
    tx.together(() => {
      tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
      tx.create('task', newTask(service, t.slot));
    });
  }
}
