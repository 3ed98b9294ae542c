/**
 * The updater: replaces tasks whose spec is out of date (a rolling update or a rollback), and tasks
 * on drained nodes, following the service's update policy:
 *
 * - parallelism: at most N slots in flight at once (0 = all); a slot is in flight from the moment its
 *   replacement is created until the replacement runs (and is healthy, when it has a check);
 * - order: stop-first shuts the old task down and holds the new one (desired state PENDING: the
 *   scheduler leaves it alone) until the old one has stopped; start-first starts the new one and only
 *   stops the old one once the new one runs, so the number of running tasks never drops;
 * - delay: a slot whose replacement came up keeps its place in the parallelism for the delay (so
 *   with parallelism N, each of N "lanes" waits the delay between its slots); monitor: the update
 *   completes only when every updated task runs, and the last one has run for the monitor period;
 * - failures: an updated task that fails (or is rejected) at any point before the update completes
 *   counts; when failures / slots exceeds the max failure ratio the failure action applies: pause,
 *   continue, or rollback (the service's previous spec becomes its spec, rolled out with the rollback
 *   policy of the spec it leaves).
 *
 * The updater keeps no state of its own: every pass derives progress from the store, so a new leader
 * carries on where the old one stopped.
 */
import {
  Node,
  NodeAvailability,
  Service,
  ServiceMode,
  Task,
  TaskState,
  UpdateConfig,
  UpdateFailureAction,
  UpdateOrder,
  UpdateState,
  HealthState,
} from '../../gen/flotilla/v1/objects.js';
import type { Tx } from '../store/store.js';
import { taskSpecEqual } from '../controlapi/diff.js';
import { defaultUpdateConfig } from '../controlapi/validate.js';
import { ServiceLoop } from './service-loop.js';
import { isJobService } from './jobs.js';
import { isActive, isTerminal, newTask, nodeIsReady, withDesired } from './tasks.js';

const HELD = TaskState.TASK_STATE_PENDING;

export function isUpdating(s: Service): boolean {
  const st = s.updateStatus?.state;
  return st === UpdateState.UPDATE_STATE_UPDATING || st === UpdateState.UPDATE_STATE_ROLLBACK_STARTED;
}

function isPaused(s: Service): boolean {
  const st = s.updateStatus?.state;
  return st === UpdateState.UPDATE_STATE_PAUSED || st === UpdateState.UPDATE_STATE_ROLLBACK_PAUSED;
}

/** Running, and healthy when the task has a health check. */
export function isUp(t: Task): boolean {
  if (t.status?.state !== TaskState.TASK_STATE_RUNNING) return false;
  const h = t.status.health;
  return h === HealthState.HEALTH_STATE_NONE || h === HealthState.HEALTH_STATE_HEALTHY;
}

function isFailure(t: Task): boolean {
  const s = t.status?.state ?? 0;
  return s === TaskState.TASK_STATE_FAILED || s === TaskState.TASK_STATE_REJECTED;
}

export class Updater extends ServiceLoop {
  private anyDrained = false;

  protected taskMatters(t: Task, old: Task | undefined, kind: 'create' | 'update' | 'delete'): boolean {
    return kind !== 'update' || t.status?.state !== old?.status?.state || t.status?.health !== old?.status?.health || t.desiredState !== old?.desiredState;
  }

  protected override beginPass(): void {
    // a drained node without tasks (an agentless manager is always drained) has none to move: it must
    // not cost every pass a look at every task of every service touched
    this.anyDrained = this.store.listNodes().some((n) => n.spec?.availability === NodeAvailability.NODE_AVAILABILITY_DRAIN && this.store.nodeHasTasks(n.id));
  }

  /** An update in progress; otherwise only drained nodes, or held tasks of a paused update. */
  protected wants(s: Service): boolean {
    // jobs are not rolled: an update starts a new iteration (manager/orchestrator/jobs.ts)
    if (isJobService(s)) return false;
    if (isUpdating(s)) return true;
    if (!this.anyDrained && !isPaused(s)) return false;
    return this.store.tasksOfService(s.id).some((t) => (isActive(t) && this.onDrainedNode(t)) || t.desiredState === HELD);
  }

  reconcileService(tx: Tx, serviceId: string): void {
    this.reconcileAt(tx, serviceId, Date.now());
  }

  private onDrainedNode(t: Task): boolean {
    if (!t.nodeId) return false;
    const n = this.store.getNode(t.nodeId);
    return n?.spec?.availability === NodeAvailability.NODE_AVAILABILITY_DRAIN;
  }

  private lost(t: Task): boolean {
    if (!t.nodeId) return false;
    const n: Node | undefined = this.store.getNode(t.nodeId);
    return !n || !nodeIsReady(n);
  }

  /** One service's pass at a given time (tests drive the clock). */
  reconcileAt(tx: Tx, serviceId: string, now: number): void {
    const service = tx.get('service', serviceId);
    if (!service?.spec?.task) return;
    const spec = service.spec;
    const global = spec.mode === ServiceMode.SERVICE_MODE_GLOBAL;
    const updating = isUpdating(service);
    const rollingBack = service.updateStatus?.state === UpdateState.UPDATE_STATE_ROLLBACK_STARTED;
    // a rollback follows the rollback policy of the spec it leaves (the one just given with --rollback-*)
    const cfg: UpdateConfig = (rollingBack ? (service.previousSpec?.rollback ?? spec.rollback) : spec.update) ?? defaultUpdateConfig();
    const startedAt = service.updateStatus?.startedAt ?? 0;

    const slots = new Map<string, Task[]>();
    const all: Task[] = [];
    for (const t0 of this.store.tasksOfService(serviceId)) {
      const t = tx.get('task', t0.id) ?? t0;
      all.push(t);
      if (!global && t.slot > spec.replicas) continue;
      const key = global ? t.nodeId : String(t.slot);
      let list = slots.get(key);
      if (!list) slots.set(key, (list = []));
      list.push(t);
    }

    // A task is current when it runs the service's spec and is not on a drained node.
    const current = (t: Task): boolean => taskSpecEqual(t.spec, spec.task) && !this.onDrainedNode(t);
    const dirty: Array<{ key: string; stale: Task[] }> = [];
    let busy = 0;
    let lastUp = 0;
    // slots whose replacement came up less than --update-delay ago keep their place in the parallelism
    let cooling = 0;
    let coolUntil = Infinity;
    for (const [key, list] of slots) {
      const active = list.filter(isActive).sort((a, b) => (b.meta?.createdAt ?? 0) - (a.meta?.createdAt ?? 0));
      if (active.length === 0) continue;
      const fresh = active.filter(current);
      const stale = active.filter((t) => !current(t));
      const n = fresh[0];
      if (n && n.desiredState === HELD) {
        // stop-first: release the new task once every other task of the slot has stopped (or its node is gone)
        const stopping = list.filter((t) => t !== n && !isTerminal(t.status?.state ?? 0) && (t.status?.state ?? 0) >= TaskState.TASK_STATE_ASSIGNED && !this.lost(t));
        for (const t of stale) tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
        if (stopping.length === 0) tx.update('task', withDesired(n, TaskState.TASK_STATE_RUNNING));
        busy++;
        continue;
      }
      if (n && isUp(n)) {
        // start-first: the new one runs, so the old ones may stop now
        for (const t of stale) tx.update('task', withDesired(t, TaskState.TASK_STATE_SHUTDOWN));
        const upAt = n.status?.timestamp ?? 0;
        lastUp = Math.max(lastUp, upAt);
        if (updating && cfg.delayMs > 0 && (n.meta?.createdAt ?? 0) >= startedAt && now < upAt + cfg.delayMs) {
          cooling++;
          coolUntil = Math.min(coolUntil, upAt + cfg.delayMs);
        }
        continue;
      }
      // a replacement on its way counts against the parallelism
      if (n && !isTerminal(n.status?.state ?? 0) && ((n.meta?.createdAt ?? 0) >= startedAt || stale.length > 0)) busy++;
      // a global service's task on a drained node is not replaced: the global orchestrator stops it
      if (global && stale.some((t) => this.onDrainedNode(t))) continue;
      // while not updating (or paused), only tasks on drained nodes are replaced
      if (!updating && !stale.some((t) => this.onDrainedNode(t))) continue;
      if (!n && stale.length) dirty.push({ key, stale });
    }

    if (updating) {
      // failures of updated tasks at any point before completion
      const updated = all.filter((t) => taskSpecEqual(t.spec, spec.task) && (t.meta?.createdAt ?? 0) >= startedAt);
      const failed = updated.filter(isFailure);
      const total = Math.max(1, global ? slots.size : spec.replicas);
      if (failed.length > 0 && failed.length / total > cfg.maxFailureRatio && cfg.failureAction !== UpdateFailureAction.UPDATE_FAILURE_ACTION_CONTINUE) {
        const f = failed[0]!;
        const why = `task ${f.id.slice(0, 12)} ${f.status?.state === TaskState.TASK_STATE_REJECTED ? 'was rejected' : 'failed'}: ${f.status?.err || f.status?.message || 'unknown error'}`;
        if (cfg.failureAction === UpdateFailureAction.UPDATE_FAILURE_ACTION_ROLLBACK && !rollingBack && service.previousSpec) {
          const version = service.specVersion + 1;
          const prev = service.previousSpec;
          tx.update('service', {
            ...service,
            spec: prev,
            previousSpec: spec,
            specVersion: version,
            history: [...service.history, { version, spec: prev, createdAt: now }].slice(-Number(this.store.getCluster()?.spec?.serviceHistoryLimit || 10)),
            updateStatus: { state: UpdateState.UPDATE_STATE_ROLLBACK_STARTED, startedAt: now, completedAt: 0, message: `update rolled back: ${why}` },
          });
          return;
        }
        tx.update('service', {
          ...service,
          updateStatus: {
            ...service.updateStatus!,
            state: rollingBack ? UpdateState.UPDATE_STATE_ROLLBACK_PAUSED : UpdateState.UPDATE_STATE_PAUSED,
            message: `${rollingBack ? 'rollback' : 'update'} paused: ${why}`,
          },
        });
        return;
      }
    } else if (isPaused(service) && dirty.every((d) => !d.stale.some((t) => this.onDrainedNode(t)))) {
      return;
    }

    // start the next batch
    const parallelism = cfg.parallelism > 0 ? cfg.parallelism : Infinity;
    if (dirty.length > 0 && busy + cooling >= parallelism && cooling > 0) this.wakeAt(coolUntil);
    if (dirty.length > 0 && busy + cooling < parallelism) {
      dirty.sort((a, b) => (global ? a.key.localeCompare(b.key) : Number(a.key) - Number(b.key)));
      for (const d of dirty.slice(0, parallelism - busy - cooling)) {
        const t = newTask(service, global ? 0 : Number(d.key), global ? d.key : '');
        if (cfg.order === UpdateOrder.UPDATE_ORDER_START_FIRST) {
          tx.create('task', t);
        } else {
          // the old tasks' shutdown and the held replacement land in one batch
          const stopped = d.stale.every((s) => isTerminal(s.status?.state ?? 0) || this.lost(s));
          tx.together(() => {
            for (const s of d.stale) tx.update('task', withDesired(s, TaskState.TASK_STATE_SHUTDOWN));
            tx.create('task', stopped ? t : { ...t, desiredState: HELD });
          });
        }
      }
      return;
    }

    // completion: nothing left to replace, every updated task up, and the monitor period has passed
    if (updating && dirty.length === 0 && busy === 0) {
      const wanted = [...slots.values()].map((l) => l.filter(isActive));
      const allUp = wanted.every((a) => a.length === 0 || a.some((t) => current(t) && isUp(t)));
      if (!allUp) return;
      const until = Math.max(lastUp, startedAt) + cfg.monitorMs;
      if (now < until) {
        this.wakeAt(until);
        return;
      }
      tx.update('service', {
        ...service,
        updateStatus: {
          state: rollingBack ? UpdateState.UPDATE_STATE_ROLLBACK_COMPLETED : UpdateState.UPDATE_STATE_COMPLETED,
          startedAt,
          completedAt: now,
          // a rollback keeps saying why it happened
          message: rollingBack ? `rollback completed${service.updateStatus?.message ? ` (${service.updateStatus.message})` : ''}` : 'update completed',
        },
      });
    }
  }
}
