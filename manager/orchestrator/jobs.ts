/**
 * The job orchestrator: services in replicated-job and global-job mode run to completion
 * (docs/task-model.md, "Jobs"), as Swarm's jobs do.
 *
 * - A task that exits 0 is COMPLETE: its desired state becomes COMPLETE and it is never restarted.
 * - A task that fails (or is rejected) follows the restart policy (the CLI's default for jobs is
 *   on-failure): a new task in the same slot after the delay, or, once the policy says no, the
 *   slot is given up (desired COMPLETE with a failed state: the job does not complete).
 * - A task whose node went down, or was drained, is replaced (replicated) or stopped (global).
 * - replicated-job: `replicas` is the total number of completions wanted; at most `max_concurrent`
 *   (0: all of them) tasks run at once; slots 1..replicas each complete once.
 * - global-job: one task per eligible node (nodes joining later get one too), each completing once.
 * - Every service update (`service update --force` included) starts a new job iteration
 *   (service.job_status.job_iteration): tasks of earlier iterations still running are shut down and
 *   the job runs again from scratch.
 *
 * Like the other orchestrators it keeps no state: every pass derives what to do from the store.
 */
import { Node, NodeAvailability, Service, ServiceMode, Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { matchConstraint, parseConstraint } from '../scheduler/constraints.js';
import type { Tx } from '../store/store.js';
import { ServiceLoop } from './service-loop.js';
import { isActive, isTerminal, newTask, nodeIsReady, restartDecision, withDesired, withStatus } from './tasks.js';

export function isJobService(s: Service | undefined): boolean {
  const m = s?.spec?.mode;
  return m === ServiceMode.SERVICE_MODE_REPLICATED_JOB || m === ServiceMode.SERVICE_MODE_GLOBAL_JOB;
}

/** A job's progress, for `service ls` and the CLI's wait. */
export function jobProgress(s: Service, tasks: Task[]): { running: number; completed: number; failed: number; total: number } {
  const iter = s.jobStatus?.jobIteration ?? 0;
  const cur = tasks.filter((t) => t.jobIteration === iter);
  const completed = cur.filter((t) => t.status?.state === TaskState.TASK_STATE_COMPLETE).length;
  const running = cur.filter((t) => isActive(t) && t.status?.state === TaskState.TASK_STATE_RUNNING).length;
  // slots given up: ended for good without completing
  const failed = cur.filter((t) => t.desiredState === TaskState.TASK_STATE_COMPLETE && t.status?.state !== TaskState.TASK_STATE_COMPLETE).length;
  const total = s.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB ? new Set(cur.map((t) => t.nodeId).filter(Boolean)).size : (s.spec?.replicas ?? 0);
  return { running, completed, failed, total };
}

export class JobOrchestrator extends ServiceLoop {
  protected wants(s: Service): boolean {
    return isJobService(s);
  }

  protected taskMatters(t: Task, old: Task | undefined, kind: 'create' | 'update' | 'delete'): boolean {
    return kind !== 'update' || isTerminal(t.status?.state ?? 0) !== isTerminal(old?.status?.state ?? 0) || t.desiredState !== old?.desiredState;
  }

  reconcileService(tx: Tx, serviceId: string): void {
    const service = tx.get('service', serviceId);
    if (!service || !isJobService(service)) return;
    const iter = service.jobStatus?.jobIteration ?? 0;
    const now = Date.now();
    const current: Task[] = [];
    for (const t0 of this.store.tasksOfService(serviceId)) {
      const t = tx.get('task', t0.id) ?? t0;
      if (t.jobIteration === iter) current.push(t);
      // an earlier run of the job: what still runs of it stops
      else if (isActive(t)) tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
    }
    if (service.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB) this.global(tx, service, current, now);
    else this.replicated(tx, service, current, now);
  }

  private replicated(tx: Tx, service: Service, tasks: Task[], now: number): void {
    const total = service.spec?.replicas ?? 0;
    const maxConcurrent = service.spec?.maxConcurrent || total;
    const bySlot = new Map<number, Task[]>();
    for (const t of tasks) {
      let l = bySlot.get(t.slot);
      if (!l) bySlot.set(t.slot, (l = []));
      l.push(t);
    }
    let running = 0;
    const free: number[] = [];
    for (let slot = 1; slot <= total; slot++) {
      const list = bySlot.get(slot) ?? [];
      if (list.some((t) => t.desiredState === TaskState.TASK_STATE_COMPLETE)) continue; // done (or given up)
      const active = list.filter(isActive).sort((a, b) => (b.meta?.createdAt ?? 0) - (a.meta?.createdAt ?? 0));
      const cur = active[0];
      if (!cur) {
        free.push(slot);
        continue;
      }
      if (this.lost(cur)) {
        tx.together(() => {
          tx.update('task', withDesired(withStatus(cur, TaskState.TASK_STATE_ORPHANED, 'node is down or drained', 'node is down or drained'), TaskState.TASK_STATE_SHUTDOWN));
          tx.create('task', newTask(service, slot));
        });
        running++;
        continue;
      }
      if (this.supervise(tx, cur, list, now, () => newTask(service, slot))) running++;
    }
    // start slots up to the concurrency limit, lowest first
    for (const slot of free) {
      if (running >= maxConcurrent) break;
      tx.create('task', newTask(service, slot));
      running++;
    }
  }

  private global(tx: Tx, service: Service, tasks: Task[], now: number): void {
    const constraints = (service.spec?.task?.placement?.constraints ?? []).map(parseConstraint);
    const byNode = new Map<string, Task[]>();
    for (const t of tasks) {
      let l = byNode.get(t.nodeId);
      if (!l) byNode.set(t.nodeId, (l = []));
      l.push(t);
    }
    for (const node of this.store.listNodes()) {
      const list = byNode.get(node.id) ?? [];
      if (list.some((t) => t.desiredState === TaskState.TASK_STATE_COMPLETE)) continue;
      const active = list.filter(isActive).sort((a, b) => (b.meta?.createdAt ?? 0) - (a.meta?.createdAt ?? 0));
      const cur = active[0];
      if (!cur) {
        if (this.eligible(node, constraints, false)) tx.create('task', newTask(service, 0, node.id));
        continue;
      }
      if (!this.eligible(node, constraints, true) && !isTerminal(cur.status?.state ?? 0)) {
        // the node went away (or no longer matches): its task stops; the job no longer waits for it
        const down = !nodeIsReady(node);
        tx.update('task', withDesired(down ? withStatus(cur, TaskState.TASK_STATE_ORPHANED, 'node is down', 'node is down') : cur, TaskState.TASK_STATE_SHUTDOWN));
        continue;
      }
      this.supervise(tx, cur, list, now, () => newTask(service, 0, node.id));
    }
    // tasks on nodes that are gone from the store
    for (const [nodeId, list] of byNode) {
      if (this.store.getNode(nodeId)) continue;
      for (const t of list) if (isActive(t)) tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
    }
  }

  /**
   * A slot's current task: done when it completed; restarted per the policy when it failed.
   * Returns whether the slot still counts against the concurrency (it has not ended for good).
   */
  private supervise(tx: Tx, t: Task, history: Task[], now: number, replacement: () => Task): boolean {
    const state = t.status?.state ?? 0;
    if (!isTerminal(state)) return true;
    if (state === TaskState.TASK_STATE_COMPLETE) {
      tx.update('task', withDesired(t, TaskState.TASK_STATE_COMPLETE));
      return false;
    }
    const at = restartDecision(t, history, now);
    if (at === undefined) {
      // given up (restart condition none, or max attempts reached): the slot ends failed
      tx.update('task', withDesired(t, TaskState.TASK_STATE_COMPLETE));
      return false;
    }
    if (at > now) {
      this.wakeAt(at);
      return true;
    }
    tx.together(() => {
      tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
      tx.create('task', replacement());
    });
    return true;
  }

  private lost(t: Task): boolean {
    const state = t.status?.state ?? 0;
    if (!t.nodeId || state < TaskState.TASK_STATE_ASSIGNED || isTerminal(state)) return false;
    const node = this.store.getNode(t.nodeId);
    return !node || !nodeIsReady(node) || node.spec?.availability === NodeAvailability.NODE_AVAILABILITY_DRAIN;
  }

  /** keepExisting: a paused node keeps the task it has but gets no new one. */
  private eligible(node: Node, constraints: ReturnType<typeof parseConstraint>[], keepExisting: boolean): boolean {
    if (!nodeIsReady(node)) return false;
    const av = node.spec?.availability ?? NodeAvailability.NODE_AVAILABILITY_ACTIVE;
    if (av === NodeAvailability.NODE_AVAILABILITY_DRAIN) return false;
    if (av === NodeAvailability.NODE_AVAILABILITY_PAUSE && !keepExisting) return false;
    return constraints.every((c) => matchConstraint(c, node));
  }
}
