/**
 * Spec validation and defaults: every spec is checked here before it reaches the store. Errors are
 * INVALID_ARGUMENT naming the field and the value. Sizes are bounded (SPEC_LIMITS) so that a task,
 * and a service with its kept history, stay far below the store's batch limit (MAX_BATCH_BYTES,
 * 2 MiB) and Raft's proposal cap (8 MiB); durations are bounded by common/durations.ts.
 */
import {
  type ContainerSpec,
  HealthConfig,
  RestartCondition,
  RestartPolicy,
  ServiceMode,
  ServiceSpec,
  UpdateConfig,
  UpdateFailureAction,
  UpdateOrder,
} from '../../gen/flotilla/v1/objects.js';
import { checkDuration } from '../../common/durations.js';
import { FlotillaError, invalidArgument } from '../../common/errors.js';
import { isValidName } from '../../common/ids.js';
import { parseReference } from '../../common/imageref.js';
import { parseConstraint } from '../scheduler/constraints.js';
import {
  normaliseCap,
  normaliseSignal,
  validateDnsOption,
  validateGroup,
  validateHostsEntry,
  validateMounts,
  validateNameserver,
  validateSearchDomain,
  validateSysctl,
  validateTemplate,
  validateUlimit,
} from '../../common/containeropts.js';

export const DEFAULT_STOP_GRACE_MS = 10_000;
export const MAX_REPLICAS = 100_000;

const KiB = 1024;
/**
 * Size limits, in bytes (UTF-8). A service object holds its spec, the previous spec and up to 10
 * (serviceHistoryLimit) kept versions: 12 x 128 KiB = 1.5 MiB at most, under the 2 MiB store batch;
 * a task holds one task spec (under 128 KiB), so every batch holds at least 15 tasks.
 */
export const SPEC_LIMITS = {
  /** the whole encoded ServiceSpec */
  spec: 128 * KiB,
  /** --env: all KEY=VALUE entries together */
  env: 64 * KiB,
  /** the command and its arguments together */
  args: 64 * KiB,
  /** --label: the service's labels, keys and values together (the container's labels likewise) */
  labels: 16 * KiB,
  /** --constraint: all placement constraints together */
  constraints: 16 * KiB,
  /** the health check command */
  healthCmd: 16 * KiB,
} as const;

/** The labels of a node (node update --label-add), keys and values together. */
export const MAX_NODE_LABEL_BYTES = 16 * KiB;

function bytes(strings: Iterable<string>): number {
  let n = 0;
  for (const s of strings) n += Buffer.byteLength(s) + 1;
  return n;
}

export function labelBytes(labels: Record<string, string>): number {
  return bytes(Object.entries(labels).flat());
}

/** INVALID_ARGUMENT for a field over its size limit, naming the field, its size and the limit. */
export function tooLarge(field: string, size: number, limit: number): FlotillaError {
  return new FlotillaError('INVALID_ARGUMENT', `invalid ${field}: ${size} bytes, over the limit of ${limit} bytes (${limit / KiB} KiB)`);
}

function checkSize(field: string, size: number, limit: number): void {
  if (size > limit) throw tooLarge(field, size, limit);
}

export function defaultUpdateConfig(): UpdateConfig {
  return {
    parallelism: 1,
    delayMs: 0,
    failureAction: UpdateFailureAction.UPDATE_FAILURE_ACTION_PAUSE,
    monitorMs: 5000,
    maxFailureRatio: 0,
    order: UpdateOrder.UPDATE_ORDER_STOP_FIRST,
  };
}

export function defaultRestartPolicy(): RestartPolicy {
  return { condition: RestartCondition.RESTART_CONDITION_ANY, delayMs: 5000, maxAttempts: 0, windowMs: 0 };
}

/** An image: a reference by Docker's rules (common/imageref.ts: registry host:port, tag, @digest) or a digest (prefix). */
function validImage(s: string): boolean {
  if (/^sha256:[a-f0-9]{6,64}$/.test(s)) return true;
  try {
    parseReference(s);
    return true;
  } catch {
    return false;
  }
}
const ENV_RE = /^[^=\s][^=]*(=.*)?$/s;

function nonNegative(field: string, v: number): void {
  if (!Number.isFinite(v) || v < 0) throw invalidArgument(field, v, 'must not be negative');
}

/** Validates a service spec in place and fills defaults. Returns the spec. */
export function validateServiceSpec(spec: ServiceSpec | undefined): ServiceSpec {
  if (!spec) throw invalidArgument('spec', null, 'required');
  if (!isValidName(spec.name)) throw invalidArgument('spec.name', spec.name, 'use 1-63 letters, digits, "_", "." or "-", starting with a letter or digit');
  if (spec.mode !== ServiceMode.SERVICE_MODE_REPLICATED && spec.mode !== ServiceMode.SERVICE_MODE_GLOBAL)
    throw invalidArgument('spec.mode', spec.mode, 'must be replicated or global');
  if (spec.mode === ServiceMode.SERVICE_MODE_GLOBAL && spec.replicas !== 0)
    throw invalidArgument('spec.replicas', spec.replicas, 'replicas cannot be set for a global service');
  if (!Number.isSafeInteger(spec.replicas) || spec.replicas < 0 || spec.replicas > MAX_REPLICAS)
    throw invalidArgument('spec.replicas', spec.replicas, `must be between 0 and ${MAX_REPLICAS}`);
  const task = spec.task;
  if (!task?.container) throw invalidArgument('spec.task.container', null, 'required');
  const c = task.container;
  if (!c.image || !validImage(c.image)) throw invalidArgument('image', c.image, 'expected [REGISTRY[:PORT]/]NAME[:TAG][@sha256:DIGEST] or sha256:DIGEST');
  // sizes first: a huge field is named as such (and not echoed back whole in an error)
  checkSize('env', bytes(c.env), SPEC_LIMITS.env);
  checkSize('args', bytes([...c.command, ...c.args]), SPEC_LIMITS.args);
  checkSize('labels', labelBytes(spec.labels), SPEC_LIMITS.labels);
  checkSize('container-label', labelBytes(c.labels), SPEC_LIMITS.labels);
  checkSize('constraint', bytes(task.placement?.constraints ?? []), SPEC_LIMITS.constraints);
  if (c.healthcheck) checkSize('health-cmd', bytes(c.healthcheck.test), SPEC_LIMITS.healthCmd);
  for (const e of c.env) if (!ENV_RE.test(e)) throw invalidArgument('env', e, 'expected KEY=VALUE');
  if (c.networkMode !== '' && c.networkMode !== 'host' && c.networkMode !== 'none')
    throw invalidArgument('network', c.networkMode, 'must be host or none (or empty for a private network namespace)');
  if (c.user && !/^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$/.test(c.user)) throw invalidArgument('user', c.user, 'expected USER[:GROUP] or UID[:GID]');
  if (c.workdir && !c.workdir.startsWith('/')) throw invalidArgument('workdir', c.workdir, 'must be an absolute path');
  checkDuration('stop-grace-period', c.stopGracePeriodMs);
  if (c.stopGracePeriodMs === 0) c.stopGracePeriodMs = DEFAULT_STOP_GRACE_MS;
  if (c.healthcheck) validateHealth(c.healthcheck);
  validateContainerOptions(c);
  const lim = task.resources?.limits;
  const res = task.resources?.reservations;
  for (const [name, r] of [
    ['limit', lim],
    ['reserve', res],
  ] as const) {
    if (!r) continue;
    nonNegative(`${name}-cpu`, r.nanoCpus);
    nonNegative(`${name}-memory`, r.memoryBytes);
    nonNegative(`${name}-pids`, r.pids);
  }
  if (lim && lim.memoryBytes > 0 && lim.memoryBytes < 4 * 1024 * 1024)
    throw invalidArgument('limit-memory', lim.memoryBytes, 'must be at least 4MiB');
  if (!task.restart) task.restart = defaultRestartPolicy();
  const r = task.restart;
  if (![RestartCondition.RESTART_CONDITION_ANY, RestartCondition.RESTART_CONDITION_ON_FAILURE, RestartCondition.RESTART_CONDITION_NONE].includes(r.condition))
    throw invalidArgument('restart-condition', r.condition, 'must be any, on-failure or none');
  checkDuration('restart-delay', r.delayMs);
  checkDuration('restart-window', r.windowMs);
  nonNegative('restart-max-attempts', r.maxAttempts);
  if (!task.placement) task.placement = { constraints: [], maxReplicasPerNode: 0 };
  for (const expr of task.placement.constraints) parseConstraint(expr);
  nonNegative('replicas-max-per-node', task.placement.maxReplicasPerNode);
  spec.update = validateUpdateConfig('update', spec.update);
  spec.rollback = validateUpdateConfig('rollback', spec.rollback);
  for (const k of Object.keys(spec.labels)) if (!k) throw invalidArgument('label', k, 'empty key');
  // everything else (mounts, image, ...) counts against the whole spec's limit
  checkSize('spec', ServiceSpec.encode(spec).finish().length, SPEC_LIMITS.spec);
  return spec;
}

function validateUpdateConfig(prefix: string, u: UpdateConfig | undefined): UpdateConfig {
  if (!u) return defaultUpdateConfig();
  nonNegative(`${prefix}-parallelism`, u.parallelism);
  checkDuration(`${prefix}-delay`, u.delayMs);
  checkDuration(`${prefix}-monitor`, u.monitorMs);
  if (!(u.maxFailureRatio >= 0 && u.maxFailureRatio <= 1)) throw invalidArgument(`${prefix}-max-failure-ratio`, u.maxFailureRatio, 'must be between 0 and 1');
  if (![0, 1, 2].includes(u.failureAction)) throw invalidArgument(`${prefix}-failure-action`, u.failureAction, 'must be pause, continue or rollback');
  if (![0, 1].includes(u.order)) throw invalidArgument(`${prefix}-order`, u.order, 'must be stop-first or start-first');
  return u;
}

function validateHealth(h: HealthConfig): void {
  const kind = h.test[0];
  if (h.test.length > 0 && kind !== 'CMD' && kind !== 'CMD-SHELL' && kind !== 'NONE')
    throw invalidArgument('health-cmd', h.test.join(' '), 'test must start with CMD, CMD-SHELL or NONE');
  checkDuration('health-interval', h.intervalMs);
  checkDuration('health-timeout', h.timeoutMs);
  checkDuration('health-start-period', h.startPeriodMs);
  nonNegative('health-retries', h.retries);
}

/** The mounts and the container options of issue 15 (common/containeropts.ts judges each value). */
function validateContainerOptions(c: ContainerSpec): void {
  validateMounts('mount', c.mounts);
  for (const m of c.mounts) {
    if (m.type === 'volume' && m.source === '' && Object.keys(m.volumeOpts).length > 0) throw invalidArgument('mount', m.target, 'an anonymous volume takes no volume-opt');
  }
  c.capAdd = c.capAdd.map((x) => normaliseCap('cap-add', x));
  c.capDrop = c.capDrop.map((x) => normaliseCap('cap-drop', x));
  const names = new Set<string>();
  for (const u of c.ulimits) {
    validateUlimit('ulimit', u);
    if (names.has(u.name)) throw invalidArgument('ulimit', u.name, 'given twice');
    names.add(u.name);
  }
  for (const [k, v] of Object.entries(c.sysctls)) validateSysctl('sysctl', k, v, c.networkMode === 'host');
  if (c.stopSignal) c.stopSignal = normaliseSignal('stop-signal', c.stopSignal);
  if (c.hostname) validateTemplate('hostname', c.hostname);
  if (c.dnsConfig) {
    for (const d of c.dnsConfig.nameservers) validateNameserver('dns', d);
    for (const d of c.dnsConfig.search) validateSearchDomain('dns-search', d);
    for (const d of c.dnsConfig.options) validateDnsOption('dns-option', d);
    if (c.dnsConfig.search.length > 6) throw invalidArgument('dns-search', c.dnsConfig.search.length, 'at most 6 search domains');
  }
  for (const h of c.hosts) validateHostsEntry('host', h);
  for (const g of c.groups) validateGroup('group', g);
}
