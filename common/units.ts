import { checkDuration } from './durations.js';
import { invalidArgument } from './errors.js';

const BYTE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1024,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1024 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1024 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tb: 1024 ** 4,
  tib: 1024 ** 4,
};

/** Parses Docker-style sizes: "64m", "1g", "512k", "1024" (bytes). Binary multiples, as Docker. */
export function parseBytes(field: string, value: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(value);
  if (!m) throw invalidArgument(field, value, 'expected a size such as 64m, 1g or 512k');
  const unit = BYTE_UNITS[(m[2] ?? '').toLowerCase()];
  if (unit === undefined) throw invalidArgument(field, value, `unknown unit "${m[2]}" (use b, k, m, g or t)`);
  const n = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(n)) throw invalidArgument(field, value, 'too large');
  return n;
}

/** Parses a decimal CPU count ("0.5", "2") into nano CPUs (1e9 per CPU). */
export function parseCpus(field: string, value: string): number {
  if (!/^\s*\d+(?:\.\d+)?\s*$/.test(value)) throw invalidArgument(field, value, 'expected a decimal number of CPUs such as 0.5 or 2');
  const n = Math.round(Number(value) * 1e9);
  if (n <= 0) throw invalidArgument(field, value, 'must be greater than 0');
  return n;
}

const DURATION_UNITS: Record<string, number> = { ns: 1e-6, us: 1e-3, 'µs': 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/**
 * Parses Go-style durations ("1m30s", "500ms", "10s", "0") into milliseconds, and checks them against
 * the field's range (common/durations.ts: the flag name, such as --restart-delay, picks it).
 */
export function parseDuration(field: string, value: string): number {
  const v = value.trim();
  if (v === '0') return checkDuration(field, 0, value);
  const re = /(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)/gy;
  let total = 0;
  let pos = 0;
  let m: RegExpExecArray | null;
  while ((m = re.exec(v)) !== null) {
    total += Number(m[1]) * (DURATION_UNITS[m[2] ?? ''] ?? 0);
    pos = re.lastIndex;
  }
  if (pos === 0 || pos !== v.length) throw invalidArgument(field, value, 'expected a duration such as 10s, 500ms or 1m30s');
  return checkDuration(field, Math.round(total), value);
}

export function formatBytes(n: number): string {
  if (n >= 1024 ** 3) return `${(n / 1024 ** 3).toFixed(1)}GiB`;
  if (n >= 1024 ** 2) return `${(n / 1024 ** 2).toFixed(1)}MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)}KiB`;
  return `${n}B`;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms}ms`;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} seconds`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m} minutes`;
  return `${Math.round(m / 60)} hours`;
}

/** Parses a positive or zero integer flag. */
export function parseUint(field: string, value: string): number {
  if (!/^\s*\d+\s*$/.test(value)) throw invalidArgument(field, value, 'expected a non-negative integer');
  const n = Number(value);
  if (!Number.isSafeInteger(n)) throw invalidArgument(field, value, 'too large');
  return n;
}

/** Parses K=V. */
export function parseKeyValue(field: string, value: string): [string, string] {
  const i = value.indexOf('=');
  if (i <= 0) throw invalidArgument(field, value, 'expected KEY=VALUE');
  return [value.slice(0, i), value.slice(i + 1)];
}
