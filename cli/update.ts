/** `service update` flags applied onto the current spec, and waiting for an update to settle. */
import { GetServiceResponse } from '../gen/flotilla/v1/control.js';
import { type Network, ServiceMode, ServiceSpec, TaskState, UpdateState } from '../gen/flotilla/v1/objects.js';
import { applyUpdateNetworkFlags } from './networkflags.js';
import { invalidArgument } from '../common/errors.js';
import { parseBytes, parseCpus, parseDuration, parseKeyValue, parseUint } from '../common/units.js';
import { parseConstraint } from '../manager/scheduler/constraints.js';
import type { Control } from './client.js';
import { applyUpdateFlags, parseHealthCmd, restartCondition, type ServiceFlags } from './servicespec.js';
import { configRef, parseFileRef, secretRef } from './secrets.js';
import { updateStateName } from './format.js';
import { ExitError, splitArgs } from './util.js';
import { applyContainerUpdateFlags } from './containerflags.js';
import { convergence } from './progress.js';

export interface UpdateFlags extends ServiceFlags {
  image?: string;
  args?: string;
  force?: boolean;
  envAdd?: string[];
  envRm?: string[];
  constraintAdd?: string[];
  constraintRm?: string[];
  labelAdd?: string[];
  labelRm?: string[];
  containerLabelAdd?: string[];
  containerLabelRm?: string[];
  secretAdd?: string[];
  secretRm?: string[];
  configAdd?: string[];
  configRm?: string[];
}

function envKey(e: string): string {
  const i = e.indexOf('=');
  return i < 0 ? e : e.slice(0, i);
}

export { splitArgs } from './util.js';

export function applyUpdate(cur: ServiceSpec, f: UpdateFlags, known: Network[] = []): ServiceSpec {
  const spec: ServiceSpec = structuredClone(cur);
  const task = spec.task!;
  const c = task.container!;
  if (f.image !== undefined) c.image = f.image;
  if (f.args !== undefined) c.args = splitArgs(f.args);
  if (f.entrypoint !== undefined) c.command = f.entrypoint ? splitArgs(f.entrypoint) : [];
  if (f.replicas !== undefined) {
    if (spec.mode === ServiceMode.SERVICE_MODE_GLOBAL) throw invalidArgument('--replicas', f.replicas, 'cannot be used with a global service');
    spec.replicas = parseUint('--replicas', f.replicas);
  }
  for (const k of f.envRm ?? []) c.env = c.env.filter((e) => envKey(e) !== k);
  for (const e of f.envAdd ?? []) {
    if (!e.includes('=')) throw invalidArgument('--env-add', e, 'expected KEY=VALUE');
    c.env = [...c.env.filter((x) => envKey(x) !== envKey(e)), e];
  }
  // the create-only forms of list flags would silently do nothing here: say which flags to use
  if (f.constraint?.length) throw invalidArgument('--constraint', f.constraint[0], 'service update takes --constraint-add and --constraint-rm');
  task.placement ??= { constraints: [], maxReplicasPerNode: 0 };
  for (const x of f.constraintRm ?? []) task.placement.constraints = task.placement.constraints.filter((y) => y.replace(/\s/g, '') !== x.replace(/\s/g, ''));
  for (const x of f.constraintAdd ?? []) {
    parseConstraint(x);
    if (!task.placement.constraints.includes(x)) task.placement.constraints.push(x);
  }
  if (f.replicasMaxPerNode !== undefined) task.placement.maxReplicasPerNode = parseUint('--replicas-max-per-node', f.replicasMaxPerNode);
  for (const k of f.labelRm ?? []) delete spec.labels[k];
  for (const l of f.labelAdd ?? []) {
    const [k, v] = l.includes('=') ? parseKeyValue('--label-add', l) : [l, ''];
    spec.labels[k] = v;
  }
  for (const k of f.containerLabelRm ?? []) delete c.labels[k];
  for (const l of f.containerLabelAdd ?? []) {
    const [k, v] = l.includes('=') ? parseKeyValue('--container-label-add', l) : [l, ''];
    c.labels[k] = v;
  }
  // secrets and configs: removals first, so `--secret-rm old --secret-add new,target=same` swaps one file
  for (const n of f.secretRm ?? []) {
    if (!c.secrets.some((r) => r.secretName === n || r.secretId === n)) throw invalidArgument('--secret-rm', n, 'the service does not use this secret');
    c.secrets = c.secrets.filter((r) => r.secretName !== n && r.secretId !== n);
  }
  for (const v of f.secretAdd ?? []) c.secrets.push(secretRef(parseFileRef('secret', '--secret-add', v)));
  for (const n of f.configRm ?? []) {
    if (!c.configs.some((r) => r.configName === n || r.configId === n)) throw invalidArgument('--config-rm', n, 'the service does not use this config');
    c.configs = c.configs.filter((r) => r.configName !== n && r.configId !== n);
  }
  for (const v of f.configAdd ?? []) c.configs.push(configRef(parseFileRef('config', '--config-add', v)));
  task.resources ??= { limits: undefined, reservations: undefined };
  const lim = (task.resources.limits ??= { nanoCpus: 0, memoryBytes: 0, pids: 0 });
  const res = (task.resources.reservations ??= { nanoCpus: 0, memoryBytes: 0, pids: 0 });
  if (f.limitCpu !== undefined) lim.nanoCpus = f.limitCpu === '0' ? 0 : parseCpus('--limit-cpu', f.limitCpu);
  if (f.limitMemory !== undefined) lim.memoryBytes = f.limitMemory === '0' ? 0 : parseBytes('--limit-memory', f.limitMemory);
  if (f.limitPids !== undefined) lim.pids = parseUint('--limit-pids', f.limitPids);
  if (f.reserveCpu !== undefined) res.nanoCpus = f.reserveCpu === '0' ? 0 : parseCpus('--reserve-cpu', f.reserveCpu);
  if (f.reserveMemory !== undefined) res.memoryBytes = f.reserveMemory === '0' ? 0 : parseBytes('--reserve-memory', f.reserveMemory);
  if (f.workdir !== undefined) c.workdir = f.workdir;
  if (f.user !== undefined) c.user = f.user;
  applyUpdateNetworkFlags(spec, f, known);
  applyContainerUpdateFlags(c, f);
  if (f.stopGracePeriod !== undefined) c.stopGracePeriodMs = parseDuration('--stop-grace-period', f.stopGracePeriod);
  task.restart ??= { condition: 0, delayMs: 5000, maxAttempts: 0, windowMs: 0 };
  if (f.restartCondition !== undefined) task.restart.condition = restartCondition(f.restartCondition);
  if (f.restartDelay !== undefined) task.restart.delayMs = parseDuration('--restart-delay', f.restartDelay);
  if (f.restartMaxAttempts !== undefined) task.restart.maxAttempts = parseUint('--restart-max-attempts', f.restartMaxAttempts);
  if (f.restartWindow !== undefined) task.restart.windowMs = parseDuration('--restart-window', f.restartWindow);
  if (f.healthcheck === false) {
    c.noHealthcheck = true;
    c.healthcheck = undefined;
  }
  if (f.healthCmd !== undefined || f.healthInterval || f.healthTimeout || f.healthRetries || f.healthStartPeriod) {
    const h = (c.healthcheck ??= { test: [], intervalMs: 0, timeoutMs: 0, startPeriodMs: 0, retries: 0 });
    c.noHealthcheck = false;
    if (f.healthCmd !== undefined) h.test = parseHealthCmd(f.healthCmd);
    if (f.healthInterval) h.intervalMs = parseDuration('--health-interval', f.healthInterval);
    if (f.healthTimeout) h.timeoutMs = parseDuration('--health-timeout', f.healthTimeout);
    if (f.healthRetries) h.retries = parseUint('--health-retries', f.healthRetries);
    if (f.healthStartPeriod) h.startPeriodMs = parseDuration('--health-start-period', f.healthStartPeriod);
  }
  spec.update = applyUpdateFlags('update', f, spec.update!);
  spec.rollback = applyUpdateFlags('rollback', f, spec.rollback!);
  if (f.force) task.forceUpdate = (task.forceUpdate ?? 0) + 1;
  return spec;
}

/**
 * Waits until an update or rollback settles. Exit codes: 0 completed; 1 paused or rolled back (the
 * message says why); 1 on timeout. `rolling` false (the task spec did not change: a scale, a label)
 * means no rolling update was started, so the update status (maybe left from an earlier update) is not
 * this command's: it waits until the desired number of tasks run.
 */
export async function waitForUpdate(c: Control, serviceId: string, timeoutMs: number, rollback: boolean, quiet = false, rolling = true): Promise<void> {
  const start = Date.now();
  const tty = process.stdout.isTTY && !quiet;
  let last = '';
  while (Date.now() - start < timeoutMs) {
    const { service } = await c.call<unknown, GetServiceResponse>('getService', { serviceId });
    const conv = await convergence(c, serviceId);
    const st = rolling ? (service!.updateStatus?.state ?? UpdateState.UPDATE_STATE_UNKNOWN) : UpdateState.UPDATE_STATE_UNKNOWN;
    if (!rolling) {
      // whatever spec they run: a paused update may leave old tasks in some slots
      const up = conv.tasks.filter((t) => t.desiredState === TaskState.TASK_STATE_RUNNING && t.status?.state === TaskState.TASK_STATE_RUNNING).length;
      conv.running = up;
      conv.done = up === conv.desired && conv.tasks.length === conv.desired;
    }
    const line = `${rollback || st >= UpdateState.UPDATE_STATE_ROLLBACK_STARTED ? 'rollback' : 'update'}: ${updateStateName(st) || 'pending'}, ${conv.running} out of ${conv.desired} tasks running`;
    if (!quiet && line !== last) {
      process.stdout.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
      last = line;
    }
    const msg = service!.updateStatus?.message ?? '';
    const done = (): void => {
      if (tty) process.stdout.write('\n');
    };
    switch (st) {
      case UpdateState.UPDATE_STATE_COMPLETED:
        if (!rollback) {
          done();
          if (!quiet) process.stdout.write('verify: Service converged\n');
          return;
        }
        break;
      case UpdateState.UPDATE_STATE_ROLLBACK_COMPLETED:
        done();
        if (rollback) {
          if (!quiet) process.stdout.write('rollback: rollback completed\n');
          return;
        }
        // "rollback completed (update rolled back: task … failed: …)": say why it was rolled back
        throw new ExitError(1, /update rolled back: /.test(msg) ? msg.slice(msg.indexOf('update rolled back: ')).replace(/\)$/, '') : `update rolled back: ${msg}`);
      case UpdateState.UPDATE_STATE_PAUSED:
        done();
        throw new ExitError(1, msg || 'update paused');
      case UpdateState.UPDATE_STATE_ROLLBACK_PAUSED:
        done();
        throw new ExitError(1, msg || 'rollback paused');
      case UpdateState.UPDATE_STATE_UNKNOWN:
        // no rolling update (e.g. only replicas changed): wait for convergence
        if (conv.done) {
          done();
          if (!quiet) process.stdout.write('verify: Service converged\n');
          return;
        }
        break;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  if (tty) process.stdout.write('\n');
  throw new ExitError(1, `${rollback ? 'rollback' : 'update'} did not finish within ${Math.round(timeoutMs / 1000)}s`);
}
