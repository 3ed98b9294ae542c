/**
 * A node's dependencies: the secrets and configs its tasks need, sent to that node only.
 *
 * A task needs its secrets and configs from the moment it is assigned until it has started and
 * either ended or been told to stop (its state or desired state is past RUNNING): once its container
 * runs, the files are already in place, and once it has ended nothing will read them again. The
 * dispatcher keeps, per session, the set it has sent; the COMPLETE message carries the whole set,
 * INCREMENTAL messages carry what was added (with the data) and the ids no longer needed (remove_*).
 */
import type { AssignmentsMessage } from '../../gen/flotilla/v1/dispatcher.js';
import { TaskState, type Task } from '../../gen/flotilla/v1/objects.js';
import type { MemoryStore } from '../store/store.js';

/** What a session has sent its node. */
export interface SentDependencies {
  secrets: Set<string>;
  configs: Set<string>;
}

export function noDependencies(): SentDependencies {
  return { secrets: new Set(), configs: new Set() };
}

/** Whether a task (assigned to a node) still needs its secrets and configs on that node. */
export function needsDependencies(t: Task): boolean {
  const state = t.status?.state ?? TaskState.TASK_STATE_NEW;
  return !!t.nodeId && state >= TaskState.TASK_STATE_ASSIGNED && state <= TaskState.TASK_STATE_RUNNING && t.desiredState <= TaskState.TASK_STATE_RUNNING;
}

/** Whether a task references any secret or config at all. */
export function hasReferences(t: Task): boolean {
  const c = t.spec?.container;
  return !!c && (c.secrets.length > 0 || c.configs.length > 0);
}

function needed(tasks: Task[]): SentDependencies {
  const out = noDependencies();
  for (const t of tasks) {
    if (!needsDependencies(t)) continue;
    for (const r of t.spec?.container?.secrets ?? []) out.secrets.add(r.secretId);
    for (const r of t.spec?.container?.configs ?? []) out.configs.add(r.configId);
  }
  return out;
}

/**
 * Brings what a node has been sent in line with what its tasks need now: adds the new secrets and
 * configs (with their data, read from the store) and the ids no longer needed to msg, and records
 * the new set in sent. An object gone from the store is not sent (the agent then rejects the task
 * that needs it, naming it). Returns whether msg changed.
 */
export function syncDependencies(store: MemoryStore, tasks: Task[], sent: SentDependencies, msg: AssignmentsMessage): boolean {
  const want = needed(tasks);
  let changed = false;
  for (const id of want.secrets) {
    if (sent.secrets.has(id)) continue;
    const s = store.secrets.get(id);
    if (!s) continue;
    msg.secrets.push(s);
    sent.secrets.add(id);
    changed = true;
  }
  for (const id of sent.secrets) {
    if (want.secrets.has(id)) continue;
    msg.removeSecrets.push(id);
    sent.secrets.delete(id);
    changed = true;
  }
  for (const id of want.configs) {
    if (sent.configs.has(id)) continue;
    const c = store.configs.get(id);
    if (!c) continue;
    msg.configs.push(c);
    sent.configs.add(id);
    changed = true;
  }
  for (const id of sent.configs) {
    if (want.configs.has(id)) continue;
    msg.removeConfigs.push(id);
    sent.configs.delete(id);
    changed = true;
  }
  return changed;
}
