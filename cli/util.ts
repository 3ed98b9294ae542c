import fs from 'node:fs';
import { errorMessage } from '../common/errors.js';

/** Thrown by commands to exit with a given code after printing a message (if any). */
export class ExitError extends Error {
  constructor(
    readonly exitCode: number,
    message = '',
  ) {
    super(message);
  }
}

/**
 * Wraps a command action: errors become one clear line on stderr and a non-zero exit code.
 * Commander passes the parsed arguments through.
 */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void> | void): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      await fn(...args);
    } catch (err) {
      if (err instanceof ExitError) {
        if (err.message) process.stderr.write(`flotilla: ${err.message}\n`);
        process.exitCode = err.exitCode;
        return;
      }
      const grpcDetails = (err as { details?: string }).details;
      process.stderr.write(`flotilla: ${grpcDetails ?? errorMessage(err)}\n`);
      if (process.env.FLOTILLA_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
      process.exitCode = 1;
    }
  };
}

/** Renders rows as a left-aligned table with a header, like docker's. */
export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd((widths[i] ?? 0) + 3)))
      .join('')
      .trimEnd();
  return [line(headers), ...rows.map(line)].join('\n') + '\n';
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

/** Collects repeated flags (-e A=1 -e B=2). */
export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

export function timeAgo(ms: number, now = Date.now()): string {
  if (!ms) return '';
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} seconds ago`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m} minute${m === 1 ? '' : 's'} ago`;
  const h = Math.round(m / 60);
  if (h < 48) return `${h} hour${h === 1 ? '' : 's'} ago`;
  return `${Math.round(h / 24)} days ago`;
}

export function checkFormat(format: string | undefined): 'table' | 'json' {
  if (format === undefined || format === 'table') return 'table';
  if (format === 'json') return 'json';
  throw new ExitError(2, `invalid --format "${format}": use table or json`);
}

/**
 * The join token of `flotilla agent` and `flotilla manager --join`: --token-file PATH (read once,
 * surrounding whitespace trimmed), else --token (visible to every user in `ps`: avoid it), else the
 * environment variable FLOTILLA_TOKEN. Returns '' when none is given.
 */
export function resolveToken(opts: { token?: string; tokenFile?: string }): string {
  if (opts.token !== undefined && opts.tokenFile !== undefined) throw new ExitError(2, 'use either --token or --token-file, not both');
  if (opts.tokenFile !== undefined) {
    let text: string;
    try {
      text = fs.readFileSync(opts.tokenFile, 'utf8');
    } catch (err) {
      throw new ExitError(2, `invalid --token-file ${JSON.stringify(opts.tokenFile)}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : errorMessage(err)}`);
    }
    const token = text.trim();
    if (!token || /\s/.test(token)) throw new ExitError(2, `invalid --token-file ${JSON.stringify(opts.tokenFile)}: expected one join token in the file`);
    return token;
  }
  return opts.token ?? process.env.FLOTILLA_TOKEN ?? '';
}

/**
 * One secret line: from the terminal with a prompt and no echo, or the first line of stdin when it
 * is not a terminal (so that `flotilla cluster unlock < keyfile` works). Never from argv.
 */
export async function readSecretLine(prompt: string): Promise<string> {
  const stdin = process.stdin;
  if (!stdin.isTTY) {
    const parts: Buffer[] = [];
    for await (const chunk of stdin) parts.push(chunk as Buffer);
    return (Buffer.concat(parts).toString('utf8').split(/\r?\n/)[0] ?? '').trim();
  }
  process.stderr.write(prompt);
  stdin.setRawMode(true);
  stdin.resume();
  try {
    return await new Promise<string>((resolve, reject) => {
      let line = '';
      const onData = (d: Buffer): void => {
        for (const ch of d.toString('utf8')) {
          if (ch === '\r' || ch === '\n') {
            stdin.off('data', onData);
            process.stderr.write('\n');
            return resolve(line.trim());
          }
          if (ch === '\u0003') {
            stdin.off('data', onData);
            return reject(new ExitError(130, 'interrupted'));
          }
          if (ch === '\u007f') line = line.slice(0, -1);
          else line += ch;
        }
      };
      stdin.on('data', onData);
    });
  } finally {
    stdin.setRawMode(false);
    stdin.pause();
  }
}

/** Splits a command line (--args, --entrypoint) like a shell would for simple quoting. */
export function splitArgs(s: string): string[] {
  const out: string[] = [];
  const re = /"((?:\\.|[^"])*)"|'([^']*)'|(\S+)/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(s)) !== null) out.push(m[1] !== undefined ? m[1].replace(/\\(.)/g, '$1') : (m[2] ?? m[3] ?? ''));
  return out;
}
