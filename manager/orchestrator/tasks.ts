/** Task helpers shared by the orchestrators. */
import { Node, NodeAvailability, NodeState, Service, Task, TaskState, RestartCondition } from '../../gen/flotilla/v1/objects.js';
import { newId } from '../../common/ids.js';

export const DEFAULT_TASK_HISTORY = 5;

export function isTerminal(state: TaskState): boolean {
  return state >= TaskState.TASK_STATE_COMPLETE;
}

/** A task the orchestrator still wants (desired running or earlier). */
export function isActive(t: Task): boolean {
  return t.desiredState <= TaskState.TASK_STATE_RUNNING;
}

export function newTask(service: Service, slot: number, nodeId = ''): Task {
  const now = Date.now();
  return {
    id: newId(),
    meta: { version: 0, createdAt: now, updatedAt: now },
    serviceId: service.id,
    serviceName: service.spec?.name ?? '',
    slot,
    nodeId,
    spec: service.spec?.task,
    specVersion: service.specVersion,
    status: {
      state: TaskState.TASK_STATE_PENDING,
      timestamp: now,
      message: 'pending task scheduling',
      err: '',
      exitCode: 0,
      containerId: '',
      pid: 0,
      health: 0,
      oomKilled: false,
    },
    desiredState: TaskState.TASK_STATE_RUNNING,
    restartAt: 0,
    networks: [],
    jobIteration: service.jobStatus?.jobIteration ?? 0,
  };
}

export function withDesired(t: Task, desired: TaskState): Task {
  return { ...t, desiredState: desired };
}

export function withStatus(t: Task, state: TaskState, message: string, err = ''): Task {
  return { ...t, status: { ...t.status!, state, message, err, timestamp: Date.now() } };
}

export function nodeIsReady(n: Node | undefined): boolean {
  return !!n && n.status?.state === NodeState.NODE_STATE_READY;
}

export function nodeIsDrained(n: Node | undefined): boolean {
  return !!n && n.spec?.availability === NodeAvailability.NODE_AVAILABILITY_DRAIN;
}

/**
 * The restart policy's verdict on a task that ended while still desired running.
 * Returns the time the replacement may start, or undefined when it must not be restarted.
 */
export function restartDecision(t: Task, slotHistory: Task[], now: number): number | undefined {
  const policy = t.spec?.restart;
  const cond = policy?.condition ?? RestartCondition.RESTART_CONDITION_ANY;
  const state = t.status?.state ?? TaskState.TASK_STATE_NEW;
  // A task shut down or orphaned by the system (node down, drain) is always replaced.
  if (state === TaskState.TASK_STATE_ORPHANED) return now;
  if (cond === RestartCondition.RESTART_CONDITION_NONE) return undefined;
  if (cond === RestartCondition.RESTART_CONDITION_ON_FAILURE && state === TaskState.TASK_STATE_COMPLETE) return undefined;
  const max = policy?.maxAttempts ?? 0;
  if (max > 0) {
    const window = policy?.windowMs ?? 0;
    const since = window > 0 ? now - window : -Infinity;
    // restarts so far = tasks of this slot (same spec version) that ended, created inside the window
    const ended = slotHistory.filter(
      (h) => h.specVersion === t.specVersion && isTerminal(h.status?.state ?? 0) && (h.meta?.createdAt ?? 0) >= since,
    ).length;
    if (ended > max) return undefined;
  }
  const delay = policy?.delayMs ?? 5000;
  return (t.status?.timestamp ?? now) + delay;
}
