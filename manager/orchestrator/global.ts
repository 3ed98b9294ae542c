/**
 * The global orchestrator: one task per eligible node for every global service, following nodes as
 * they come, go, pause and drain; restart policy as for replicated tasks.
 */
import { Node, NodeAvailability, ServiceMode, Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { matchConstraint, parseConstraint } from '../scheduler/constraints.js';
import type { Tx } from '../store/store.js';
import { ServiceOrchestrator } from './service-loop.js';
import { isActive, isTerminal, newTask, nodeIsReady, restartDecision, withDesired, withStatus } from './tasks.js';

export class GlobalOrchestrator extends ServiceOrchestrator {
  protected readonly mode = ServiceMode.SERVICE_MODE_GLOBAL;

  reconcileService(tx: Tx, serviceId: string): void {
    const service = tx.get('service', serviceId);
    if (!service || service.spec?.mode !== ServiceMode.SERVICE_MODE_GLOBAL) return;
    const now = Date.now();
    const constraints = (service.spec.task?.placement?.constraints ?? []).map(parseConstraint);
    const byNode = new Map<string, Task[]>();
    for (const t0 of this.store.tasksOfService(serviceId)) {
      const t = tx.get('task', t0.id) ?? t0;
      let list = byNode.get(t.nodeId);
      if (!list) byNode.set(t.nodeId, (list = []));
      list.push(t);
    }
    const nodes = new Map(this.store.listNodes().map((n) => [n.id, n] as const));
    // tasks on nodes that are gone, down, drained or no longer match
    for (const [nodeId, list] of byNode) {
      const node = nodes.get(nodeId);
      const keep = node && this.eligible(node, constraints, true);
      for (const t of list) {
        if (!isActive(t)) continue;
        if (!keep) {
          const down = !node || !nodeIsReady(node);
          const next = down && !isTerminal(t.status?.state ?? 0) ? withStatus(t, TaskState.TASK_STATE_ORPHANED, 'node is down', 'node is down') : t;
          tx.update('task', withDesired(next, TaskState.TASK_STATE_SHUTDOWN));
        }
      }
    }
    for (const node of nodes.values()) {
      if (!this.eligible(node, constraints, false)) continue;
      const list = byNode.get(node.id) ?? [];
      const active = list.filter(isActive);
      if (active.length === 0) {
        if (list.some((t) => t.desiredState === TaskState.TASK_STATE_COMPLETE)) continue;
        tx.create('task', newTask(service, 0, node.id));
        continue;
      }
      // Several active tasks on a node happen only during a rolling update (start-first, or a new task
      // held until the old one stops): the updater settles those. The newest is the node's.
      active.sort((a, b) => (b.meta?.createdAt ?? 0) - (a.meta?.createdAt ?? 0));
      const cur = active[0]!;
      if (!isTerminal(cur.status?.state ?? 0)) continue;
      const at = restartDecision(cur, list, now);
      if (at === undefined) {
        tx.update('task', withDesired(cur, TaskState.TASK_STATE_COMPLETE));
      } else if (at > now) {
        this.wakeAt(at);
      } else {
        tx.together(() => {
          tx.update('task', withDesired(cur, TaskState.TASK_STATE_SHUTDOWN));
          tx.create('task', newTask(service, 0, node.id));
        });
      }
    }
  }

  /** keepExisting: a paused node keeps its tasks but takes no new ones. */
  private eligible(node: Node, constraints: ReturnType<typeof parseConstraint>[], keepExisting: boolean): boolean {
    if (!nodeIsReady(node)) return false;
    const av = node.spec?.availability ?? NodeAvailability.NODE_AVAILABILITY_ACTIVE;
    if (av === NodeAvailability.NODE_AVAILABILITY_DRAIN) return false;
    if (av === NodeAvailability.NODE_AVAILABILITY_PAUSE && !keepExisting) return false;
    return constraints.every((c) => matchConstraint(c, node));
  }
}
