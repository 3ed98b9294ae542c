/** Turns `service create` flags into a ServiceSpec. Parsing errors name the flag and the value. */
import {
  RestartCondition,
  ServiceMode,
  ServiceSpec,
  UpdateConfig,
  UpdateFailureAction,
  UpdateOrder,
} from '../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../common/errors.js';
import { parseBytes, parseCpus, parseDuration, parseKeyValue, parseUint } from '../common/units.js';
import { parseConstraint, parsePlacementPref } from '../manager/scheduler/constraints.js';
import { defaultUpdateConfig } from '../manager/controlapi/validate.js';
import { applyCreateNetworkFlags } from './networkflags.js';
import { applyCreatePortFlags } from './portflags.js';
import { configRef, parseFileRef, secretRef } from './secrets.js';
import { applyContainerCreateFlags, type ContainerFlags } from './containerflags.js';
import { splitArgs } from './util.js';

export interface ServiceFlags extends ContainerFlags {
  name?: string;
  replicas?: string;
  mode?: string;
  constraint?: string[];
  placementPref?: string[];
  maxConcurrent?: string;
  replicasMaxPerNode?: string;
  reserveCpu?: string;
  reserveMemory?: string;
  limitCpu?: string;
  limitMemory?: string;
  limitPids?: string;
  env?: string[];
  label?: string[];
  workdir?: string;
  user?: string;
  network?: string[];
  networkAdd?: string[];
  networkRm?: string[];
  endpointMode?: string;
  publish?: string[];
  publishAdd?: string[];
  publishRm?: string[];
  entrypoint?: string;
  restartCondition?: string;
  restartDelay?: string;
  restartMaxAttempts?: string;
  restartWindow?: string;
  stopGracePeriod?: string;
  healthCmd?: string;
  healthInterval?: string;
  healthTimeout?: string;
  healthRetries?: string;
  healthStartPeriod?: string;
  healthcheck?: boolean; // commander: --no-healthcheck sets false
  secret?: string[];
  config?: string[];
  [k: string]: unknown;
}

export const SERVICE_MODES: Record<string, ServiceMode | undefined> = {
  replicated: ServiceMode.SERVICE_MODE_REPLICATED,
  global: ServiceMode.SERVICE_MODE_GLOBAL,
  'replicated-job': ServiceMode.SERVICE_MODE_REPLICATED_JOB,
  'global-job': ServiceMode.SERVICE_MODE_GLOBAL_JOB,
};

export function isJobMode(m: ServiceMode | undefined): boolean {
  return m === ServiceMode.SERVICE_MODE_REPLICATED_JOB || m === ServiceMode.SERVICE_MODE_GLOBAL_JOB;
}

export function restartCondition(v: string): RestartCondition {
  switch (v) {
    case 'any':
      return RestartCondition.RESTART_CONDITION_ANY;
    case 'on-failure':
      return RestartCondition.RESTART_CONDITION_ON_FAILURE;
    case 'none':
      return RestartCondition.RESTART_CONDITION_NONE;
  }
  throw invalidArgument('--restart-condition', v, 'must be any, on-failure or none');
}

export function failureAction(flag: string, v: string): UpdateFailureAction {
  switch (v) {
    case 'pause':
      return UpdateFailureAction.UPDATE_FAILURE_ACTION_PAUSE;
    case 'continue':
      return UpdateFailureAction.UPDATE_FAILURE_ACTION_CONTINUE;
    case 'rollback':
      return UpdateFailureAction.UPDATE_FAILURE_ACTION_ROLLBACK;
  }
  throw invalidArgument(flag, v, 'must be pause, continue or rollback');
}

export function updateOrder(flag: string, v: string): UpdateOrder {
  if (v === 'stop-first') return UpdateOrder.UPDATE_ORDER_STOP_FIRST;
  if (v === 'start-first') return UpdateOrder.UPDATE_ORDER_START_FIRST;
  throw invalidArgument(flag, v, 'must be stop-first or start-first');
}

/** Applies --update-* or --rollback-* flags onto a config. */
export function applyUpdateFlags(prefix: 'update' | 'rollback', flags: Record<string, unknown>, base: UpdateConfig): UpdateConfig {
  const u = { ...base };
  const get = (k: string): string | undefined => flags[`${prefix}${k}`] as string | undefined;
  const p = get('Parallelism');
  if (p !== undefined) u.parallelism = parseUint(`--${prefix}-parallelism`, p);
  const d = get('Delay');
  if (d !== undefined) u.delayMs = parseDuration(`--${prefix}-delay`, d);
  const fa = get('FailureAction');
  if (fa !== undefined) u.failureAction = failureAction(`--${prefix}-failure-action`, fa);
  const m = get('Monitor');
  if (m !== undefined) u.monitorMs = parseDuration(`--${prefix}-monitor`, m);
  const r = get('MaxFailureRatio');
  if (r !== undefined) {
    const n = Number(r);
    if (!/^\d*\.?\d+$/.test(r) || !(n >= 0 && n <= 1)) throw invalidArgument(`--${prefix}-max-failure-ratio`, r, 'must be a number between 0 and 1');
    u.maxFailureRatio = n;
  }
  const o = get('Order');
  if (o !== undefined) u.order = updateOrder(`--${prefix}-order`, o);
  return u;
}

export function parseHealthCmd(cmd: string): string[] {
  return ['CMD-SHELL', cmd];
}

export function buildServiceSpec(flags: ServiceFlags, image: string, args: string[]): ServiceSpec {
  const mode = flags.mode ?? 'replicated';
  const modeValue = SERVICE_MODES[mode];
  if (modeValue === undefined) throw invalidArgument('--mode', mode, 'must be replicated, global, replicated-job or global-job');
  let replicas = 1;
  if (mode === 'global' || mode === 'global-job') {
    if (flags.replicas !== undefined) throw invalidArgument('--replicas', flags.replicas, `cannot be used with --mode ${mode}`);
    replicas = 0;
  } else if (flags.replicas !== undefined) replicas = parseUint('--replicas', flags.replicas);
  let maxConcurrent = 0;
  if (flags.maxConcurrent !== undefined) {
    if (mode !== 'replicated-job') throw invalidArgument('--max-concurrent', flags.maxConcurrent, 'only for --mode replicated-job');
    maxConcurrent = parseUint('--max-concurrent', flags.maxConcurrent);
  }
  // a job's tasks are not restarted once they exit 0 (Swarm's default for jobs: on-failure)
  const job = mode === 'replicated-job' || mode === 'global-job';
  const env = (flags.env ?? []).map((e) => {
    if (!e.includes('=') && process.env[e] !== undefined) return `${e}=${process.env[e]}`;
    return e;
  });
  const labels = Object.fromEntries((flags.label ?? []).map((l) => (l.includes('=') ? parseKeyValue('--label', l) : [l, ''])));
  for (const c of flags.constraint ?? []) parseConstraint(c);
  const name = flags.name ?? `${(image.split('/').pop() ?? 'svc').split(':')[0]}-${Math.random().toString(36).slice(2, 7)}`;
  const spec: ServiceSpec = {
    name,
    labels,
    mode: modeValue,
    replicas,
    maxConcurrent,
    task: {
      container: {
        image,
        secrets: (flags.secret ?? []).map((v) => secretRef(parseFileRef('secret', '--secret', v))),
        configs: (flags.config ?? []).map((v) => configRef(parseFileRef('config', '--config', v))),
        // split like a shell line, the same on create and update (Docker's --entrypoint)
        command: flags.entrypoint ? splitArgs(flags.entrypoint) : [],
        args,
        env,
        workdir: flags.workdir ?? '',
        user: flags.user ?? '',
        hostname: '',
        registryAuth: undefined,
        stopGracePeriodMs: flags.stopGracePeriod !== undefined ? parseDuration('--stop-grace-period', flags.stopGracePeriod) : 10_000,
        healthcheck: undefined,
        noHealthcheck: flags.healthcheck === false,
        labels: {},
        networkMode: '',
        mounts: [],
        capAdd: [],
        capDrop: [],
        readOnly: false,
        init: false,
        ulimits: [],
        sysctls: {},
        stopSignal: '',
        dnsConfig: undefined,
        hosts: [],
        groups: [],
        tty: false,
      },
      resources: {
        limits: {
          nanoCpus: flags.limitCpu ? parseCpus('--limit-cpu', flags.limitCpu) : 0,
          memoryBytes: flags.limitMemory ? parseBytes('--limit-memory', flags.limitMemory) : 0,
          pids: flags.limitPids ? parseUint('--limit-pids', flags.limitPids) : 0,
        },
        reservations: {
          nanoCpus: flags.reserveCpu ? parseCpus('--reserve-cpu', flags.reserveCpu) : 0,
          memoryBytes: flags.reserveMemory ? parseBytes('--reserve-memory', flags.reserveMemory) : 0,
          pids: 0,
        },
      },
      restart: {
        condition: restartCondition(flags.restartCondition ?? (job ? 'on-failure' : 'any')),
        delayMs: flags.restartDelay !== undefined ? parseDuration('--restart-delay', flags.restartDelay) : 5000,
        maxAttempts: flags.restartMaxAttempts !== undefined ? parseUint('--restart-max-attempts', flags.restartMaxAttempts) : 0,
        windowMs: flags.restartWindow !== undefined ? parseDuration('--restart-window', flags.restartWindow) : 0,
      },
      networks: [],
      placement: {
        constraints: flags.constraint ?? [],
        maxReplicasPerNode: flags.replicasMaxPerNode !== undefined ? parseUint('--replicas-max-per-node', flags.replicasMaxPerNode) : 0,
        preferences: (flags.placementPref ?? []).map((v) => ({ spread: parsePlacementPref('--placement-pref', v) })),
      },
      forceUpdate: 0,
    },
    update: applyUpdateFlags('update', flags, defaultUpdateConfig()),
    rollback: applyUpdateFlags('rollback', flags, defaultUpdateConfig()),
    endpoint: undefined,
  };
  applyCreateNetworkFlags(spec, flags);
  applyContainerCreateFlags(spec.task!.container!, flags);
  applyCreatePortFlags(spec, flags);
  if (flags.healthCmd !== undefined || flags.healthInterval || flags.healthTimeout || flags.healthRetries || flags.healthStartPeriod) {
    spec.task!.container!.healthcheck = {
      test: flags.healthCmd !== undefined ? parseHealthCmd(flags.healthCmd) : [],
      intervalMs: flags.healthInterval ? parseDuration('--health-interval', flags.healthInterval) : 0,
      timeoutMs: flags.healthTimeout ? parseDuration('--health-timeout', flags.healthTimeout) : 0,
      startPeriodMs: flags.healthStartPeriod ? parseDuration('--health-start-period', flags.healthStartPeriod) : 0,
      retries: flags.healthRetries ? parseUint('--health-retries', flags.healthRetries) : 0,
    };
  }
  return spec;
}
