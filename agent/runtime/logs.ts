/**
 * Reading the container logs conmon writes in the k8s-file format, one record per line:
 *
 *   2026-01-02T15:04:05.123456789+00:00 stdout F a full line
 *   2026-01-02T15:04:05.123456789+00:00 stderr P the first part of a longer line
 *
 * "P" marks a partial line continued by the next record of the same stream. conmon rotates the file at
 * --log-size-max by writing a fresh file and renaming it over the old one (the old content is dropped),
 * so a follower notices the inode change and continues with the new file from its start.
 */
import fs from 'node:fs/promises';
import type { LogEntry } from './types.js';
import { sleep } from '../../common/sleep.js';

const TS_RE = /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/;

/** Parses an RFC 3339 timestamp with up to nanosecond precision into Unix ms (fractional). */
export function parseTimestamp(ts: string): number {
  const m = TS_RE.exec(ts);
  if (!m) return NaN;
  const frac = m[7] ? Number(`0.${m[7]}`) * 1000 : 0;
  let t = Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])) + frac;
  const tz = m[8]!;
  if (tz !== 'Z') {
    const sign = tz.startsWith('-') ? -1 : 1;
    t -= sign * (Number(tz.slice(1, 3)) * 60 + Number(tz.slice(4, 6))) * 60_000;
  }
  return t;
}

export interface RawRecord {
  time: number;
  stream: 'stdout' | 'stderr';
  partial: boolean;
  content: string;
}

export function parseRecord(line: string): RawRecord | undefined {
  const a = line.indexOf(' ');
  const b = a < 0 ? -1 : line.indexOf(' ', a + 1);
  if (b < 0) return undefined;
  const stream = line.slice(a + 1, b);
  if (stream !== 'stdout' && stream !== 'stderr') return undefined;
  const c = line.indexOf(' ', b + 1);
  const tag = c < 0 ? line.slice(b + 1) : line.slice(b + 1, c);
  const content = c < 0 ? '' : line.slice(c + 1);
  return { time: parseTimestamp(line.slice(0, a)), stream, partial: tag.split(':').includes('P'), content };
}

/** Joins partial records into entries, per stream. Keeps unfinished partials in `pending`. */
export class LogAssembler {
  private pending: Partial<Record<'stdout' | 'stderr', { time: number; parts: string[] }>> = {};

  push(rec: RawRecord, out: LogEntry[]): void {
    const p = this.pending[rec.stream];
    if (rec.partial) {
      if (p) p.parts.push(rec.content);
      else this.pending[rec.stream] = { time: rec.time, parts: [rec.content] };
      return;
    }
    if (p) {
      p.parts.push(rec.content);
      out.push({ time: p.time, stream: rec.stream, line: p.parts.join('') });
      delete this.pending[rec.stream];
    } else out.push({ time: rec.time, stream: rec.stream, line: rec.content });
  }

  /** Emits what is left (the log ended in the middle of a line). */
  flush(out: LogEntry[]): void {
    for (const s of ['stdout', 'stderr'] as const) {
      const p = this.pending[s];
      if (p) out.push({ time: p.time, stream: s, line: p.parts.join('') });
    }
    this.pending = {};
  }
}

export interface ReadLogsOptions {
  follow?: boolean;
  /** only the last N entries of what is there now */
  tail?: number;
  signal?: AbortSignal;
  /** follow ends once this resolves true and the file is drained (the container exited) */
  done?: () => Promise<boolean>;
  pollMs?: number;
}

/** Reads (and with follow, tails) a k8s-file log. A missing file reads as empty. */
export async function* readLogs(file: string, opts: ReadLogsOptions = {}): AsyncGenerator<LogEntry> {
  const asm = new LogAssembler();
  let fh: fs.FileHandle | undefined;
  let ino = -1;
  let pos = 0;
  let carry = '';
  const buf = Buffer.alloc(256 * 1024);

  const open = async (): Promise<boolean> => {
    try {
      fh = await fs.open(file, 'r');
      ino = (await fh.stat()).ino;
      pos = 0;
      carry = '';
      return true;
    } catch {
      fh = undefined;
      return false;
    }
  };
  const readMore = async (out: LogEntry[]): Promise<number> => {
    if (!fh) return 0;
    let total = 0;
    while (true) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      pos += bytesRead;
      total += bytesRead;
      const text = carry + buf.toString('utf8', 0, bytesRead);
      const lines = text.split('\n');
      carry = lines.pop() ?? '';
      for (const l of lines) {
        const rec = parseRecord(l);
        if (rec) asm.push(rec, out);
      }
    }
    return total;
  };
  const rotated = async (): Promise<boolean> => {
    try {
      const st = await fs.stat(file);
      return st.ino !== ino || st.size < pos;
    } catch {
      return false;
    }
  };

  try {
    await open();
    const first: LogEntry[] = [];
    await readMore(first);
    if (!opts.follow) asm.flush(first);
    const start = opts.tail !== undefined ? Math.max(0, first.length - opts.tail) : 0;
    for (let i = start; i < first.length; i++) yield first[i]!;
    if (!opts.follow) return;

    let idle = 0;
    while (!opts.signal?.aborted) {
      const out: LogEntry[] = [];
      let n = await readMore(out);
      if (n === 0 && (await rotated())) {
        await fh?.close();
        await open();
        n = await readMore(out);
      } else if (n === 0 && !fh) {
        await open();
        n = await readMore(out);
      }
      for (const e of out) yield e;
      if (n > 0) {
        idle = 0;
        continue;
      }
      if (opts.done && (await opts.done())) {
        // the monitor writes the exit file after draining the container's output: read what is left
        const rest: LogEntry[] = [];
        await readMore(rest);
        if (await rotated()) {
          await fh?.close();
          await open();
          await readMore(rest);
        }
        asm.flush(rest);
        for (const e of rest) yield e;
        return;
      }
      idle++;
      await sleep(Math.min(opts.pollMs ?? 100, 10 * idle), opts.signal);
    }
  } finally {
    await fh?.close().catch(() => undefined);
  }
}
