/**
 * The valid range of every duration a user can give, as a flag (CLI) or a spec field (control
 * API). One table serves both ends, so the CLI refuses what the API would refuse, naming the flag.
 * Every maximum is below Node's timer limit (about 24.8 days) except where the value never feeds a
 * timer (restart window); timers are chained anyway (common/timers.ts).
 */
import { invalidArgument } from './errors.js';

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

export interface DurationRange {
  min: number;
  max: number;
}

/** By flag name (without the leading "--"); the API names spec fields the same way. Milliseconds. */
export const DURATION_RANGES: Readonly<Record<string, DurationRange>> = {
  'stop-grace-period': { min: 0, max: 1 * DAY },
  'restart-delay': { min: 0, max: 7 * DAY },
  'restart-window': { min: 0, max: 30 * DAY },
  'update-delay': { min: 0, max: 1 * DAY },
  'update-monitor': { min: 0, max: 1 * DAY },
  'rollback-delay': { min: 0, max: 1 * DAY },
  'rollback-monitor': { min: 0, max: 1 * DAY },
  'health-interval': { min: 0, max: 1 * DAY },
  'health-timeout': { min: 0, max: 1 * DAY },
  'health-start-period': { min: 0, max: 1 * DAY },
  'heartbeat-period': { min: 100, max: 1 * HOUR },
  timeout: { min: 0, max: 7 * DAY },
};

/** For a duration not in the table: anything Node's timers hold. */
export const DEFAULT_DURATION_RANGE: DurationRange = { min: 0, max: 2 ** 31 - 1 };

export function durationRange(field: string): DurationRange {
  return DURATION_RANGES[field.replace(/^-+/, '')] ?? DEFAULT_DURATION_RANGE;
}

/** A short human form of a limit: 7d, 24h, 1h, 100ms. */
export function formatLimit(ms: number): string {
  if (ms === 0) return '0';
  if (ms % HOUR === 0 && ms >= HOUR) return `${ms / HOUR}h`;
  if (ms % MINUTE === 0 && ms >= MINUTE) return `${ms / MINUTE}m`;
  if (ms % SECOND === 0 && ms >= SECOND) return `${ms / SECOND}s`;
  return `${ms}ms`;
}

/**
 * Checks a duration in milliseconds against its field's range; throws INVALID_ARGUMENT naming the
 * field and the value. `shown` is the value as the user wrote it, when there is one.
 */
export function checkDuration(field: string, ms: number, shown?: string): number {
  const r = durationRange(field);
  if (!Number.isFinite(ms) || ms < r.min || ms > r.max)
    throw invalidArgument(field, shown ?? ms, `must be between ${formatLimit(r.min)} and ${formatLimit(r.max)}`);
  return ms;
}
