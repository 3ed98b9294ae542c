/**
 * Container health checks, with Docker's semantics: the task's health config over the image's
 * HEALTHCHECK (spec fields win, zero means "inherit or default"), ["NONE"] or no_healthcheck disables
 * it. The test runs in the container (runtime.exec) every interval; failures during the start period
 * do not count until a check has succeeded once; `retries` consecutive failures make it unhealthy.
 */
import { isCode } from '../../common/errors.js';
import { HealthState, type ContainerSpec } from '../../gen/flotilla/v1/objects.js';
import type { ContainerRuntime, ImageConfig } from '../runtime/types.js';
import { sleep } from '../../common/sleep.js';

export const DEFAULT_HEALTH_INTERVAL_MS = 30_000;
export const DEFAULT_HEALTH_TIMEOUT_MS = 30_000;
export const DEFAULT_HEALTH_RETRIES = 3;

export interface HealthSettings {
  /** the command run in the container */
  command: string[];
  intervalMs: number;
  timeoutMs: number;
  startPeriodMs: number;
  retries: number;
}

/** The effective health check of a container, or undefined when it has none. */
export function healthSettings(spec: ContainerSpec | undefined, image: ImageConfig['healthcheck'] | undefined): HealthSettings | undefined {
  if (!spec || spec.noHealthcheck) return undefined;
  const s = spec.healthcheck;
  const test = s && s.test.length > 0 ? s.test : (image?.test ?? []);
  const command = healthCommand(test);
  if (!command) return undefined;
  return {
    command,
    intervalMs: s?.intervalMs || image?.intervalMs || DEFAULT_HEALTH_INTERVAL_MS,
    timeoutMs: s?.timeoutMs || image?.timeoutMs || DEFAULT_HEALTH_TIMEOUT_MS,
    startPeriodMs: s?.startPeriodMs || image?.startPeriodMs || 0,
    retries: s?.retries || image?.retries || DEFAULT_HEALTH_RETRIES,
  };
}

/** ["CMD", args...] → args; ["CMD-SHELL", cmd] → sh -c cmd; ["NONE"] or [] → undefined. */
export function healthCommand(test: string[]): string[] | undefined {
  const [kind, ...rest] = test;
  if (kind === 'CMD' && rest.length > 0) return rest;
  if (kind === 'CMD-SHELL' && rest.length > 0) return ['/bin/sh', '-c', rest.join(' ')];
  return undefined;
}


/**
 * Runs the checks until signal aborts, the container stops, or it turns unhealthy. onChange gets
 * STARTING at once (unless `initial` is already that), then each change. Resolves 'unhealthy' in that case, else undefined. Never rejects.
 */
export async function monitorHealth(
  runtime: ContainerRuntime,
  containerId: string,
  h: HealthSettings,
  signal: AbortSignal,
  onChange: (state: HealthState, output: string) => void,
  /** the state known before (an adopted container): HEALTHY skips the start period */
  initial: HealthState = HealthState.HEALTH_STATE_NONE,
): Promise<'unhealthy' | undefined> {
  const started = Date.now();
  let state = initial === HealthState.HEALTH_STATE_HEALTHY ? initial : HealthState.HEALTH_STATE_STARTING;
  let failures = 0;
  if (state !== initial) onChange(state, '');
  while (!signal.aborted) {
    await sleep(h.intervalMs, signal);
    if (signal.aborted) return undefined;
    let ok = false;
    let output = '';
    try {
      const res = await runtime.exec(containerId, h.command, { timeoutMs: h.timeoutMs, signal });
      ok = res.exitCode === 0;
      output = res.output.trim().slice(0, 200);
    } catch (err) {
      if (signal.aborted) return undefined;
      // the container is gone or stopped: its exit decides the task's fate
      if (isCode(err, 'NOT_FOUND') || isCode(err, 'FAILED_PRECONDITION')) return undefined;
      output = (err as Error).message;
    }
    if (ok) {
      failures = 0;
      if (state !== HealthState.HEALTH_STATE_HEALTHY) onChange((state = HealthState.HEALTH_STATE_HEALTHY), output);
      continue;
    }
    const inStartPeriod = state === HealthState.HEALTH_STATE_STARTING && Date.now() - started < h.startPeriodMs;
    if (inStartPeriod) continue;
    failures++;
    if (failures >= h.retries) {
      onChange(HealthState.HEALTH_STATE_UNHEALTHY, output);
      return 'unhealthy';
    }
  }
  return undefined;
}
