/**
 * `flotilla secret ...` and `flotilla config ...` (one implementation, two kinds), and the parsing of
 * the service flags that reference them (--secret, --secret-add, --config, ...).
 */
import fs from 'node:fs';
import type { Command } from 'commander';
import type { ControlClient } from '../gen/flotilla/v1/control.js';
import type { Config, ConfigReference, FileTarget, Secret, SecretReference } from '../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../common/errors.js';
import { shortId } from '../common/ids.js';
import { DEFAULT_FILE_MODE, MAX_SECRET_BYTES, SECRET_NAME_RE, type FileKind } from '../common/secrets.js';
import { parseKeyValue, parseUint } from '../common/units.js';
import { withControl } from './client.js';
import { action, checkFormat, collect, ExitError, printJson, table, timeAgo } from './util.js';

/** A reference as the CLI sends it: the name (the manager resolves it to an id) and the file. */
export interface FileRef {
  name: string;
  file: FileTarget;
}

function parseMode(flag: string, v: string): number {
  const m = /^(?:0o?)?([0-7]{1,4})$/.exec(v);
  const n = m ? parseInt(m[1]!, 8) : NaN;
  if (!(n >= 0 && n <= 0o777)) throw invalidArgument(flag, v, 'expected an octal mode such as 0400 (at most 0777)');
  return n;
}

/**
 * Parses `[source=]NAME[,target=PATH][,uid=N][,gid=N][,mode=OCTAL]`. The target defaults (on the
 * manager) to NAME under /run/secrets for a secret, /NAME for a config; the mode to 0444.
 */
export function parseFileRef(kind: FileKind, flag: string, v: string): FileRef {
  let name = '';
  const file: FileTarget = { name: '', uid: 0, gid: 0, mode: DEFAULT_FILE_MODE };
  const parts = v.split(',');
  for (const [i, part] of parts.entries()) {
    const eq = part.indexOf('=');
    if (eq < 0) {
      if (i !== 0 || !part) throw invalidArgument(flag, v, 'expected [source=]NAME[,target=PATH][,uid=N][,gid=N][,mode=OCTAL]');
      name = part;
      continue;
    }
    const key = part.slice(0, eq).trim().toLowerCase();
    const val = part.slice(eq + 1);
    switch (key) {
      case 'source':
      case 'src':
        name = val;
        break;
      case 'target':
      case 'dst':
      case 'destination':
        if (!val) throw invalidArgument(`${flag} target`, val, 'must not be empty');
        file.name = val;
        break;
      case 'uid':
        file.uid = parseUint(`${flag} uid`, val);
        break;
      case 'gid':
        file.gid = parseUint(`${flag} gid`, val);
        break;
      case 'mode':
        file.mode = parseMode(`${flag} mode`, val);
        break;
      default:
        throw invalidArgument(flag, v, `unknown field ${JSON.stringify(key)} (use source, target, uid, gid, mode)`);
    }
  }
  if (!name) throw invalidArgument(flag, v, `the ${kind} name (source) is required`);
  if (!SECRET_NAME_RE.test(name)) throw invalidArgument(`${flag} source`, name, `not a valid ${kind} name`);
  return { name, file };
}

export function secretRef(r: FileRef): SecretReference {
  return { secretId: '', secretName: r.name, file: r.file };
}

export function configRef(r: FileRef): ConfigReference {
  return { configId: '', configName: r.name, file: r.file };
}

/** Reads a value from a file or stdin ("-"), refusing one over the limit before sending it. */
export function readValue(kind: FileKind, source: string): Buffer {
  const tooBig = (n?: number): ExitError =>
    new ExitError(1, `invalid ${kind} data: ${n !== undefined ? `${n} bytes, ` : ''}over the limit of ${MAX_SECRET_BYTES} bytes (${MAX_SECRET_BYTES / 1024} KiB)`);
  let fd: number;
  try {
    fd = source === '-' ? 0 : fs.openSync(source, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ExitError(1, `invalid file ${JSON.stringify(source)}: ${code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'is a directory' : (err as Error).message}`);
  }
  try {
    if (source !== '-') {
      const st = fs.fstatSync(fd);
      if (st.isDirectory()) throw new ExitError(1, `invalid file ${JSON.stringify(source)}: is a directory`);
      if (st.isFile() && st.size > MAX_SECRET_BYTES) throw tooBig(st.size);
    }
    // read at most one byte past the limit (stdin or a device may be endless)
    const buf = Buffer.alloc(MAX_SECRET_BYTES + 1);
    let n = 0;
    while (n < buf.length) {
      let got: number;
      try {
        got = fs.readSync(fd, buf, n, buf.length - n, null);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') continue;
        if ((err as NodeJS.ErrnoException).code === 'EOF') break;
        throw err;
      }
      if (got === 0) break;
      n += got;
    }
    if (n > MAX_SECRET_BYTES) throw tooBig();
    if (n === 0) throw new ExitError(1, `invalid ${kind} data: empty (a ${kind} needs 1 to ${MAX_SECRET_BYTES} bytes)`);
    return Buffer.from(buf.subarray(0, n));
  } finally {
    if (fd !== 0) fs.closeSync(fd);
  }
}

/** The stable JSON shape of a secret or config (`--format json`, inspect); data only for configs on inspect. */
export function objectJson(o: Secret | Config, withData = false): Record<string, unknown> {
  const out: Record<string, unknown> = {
    id: o.id,
    name: o.spec?.name ?? '',
    labels: o.spec?.labels ?? {},
    version: o.meta?.version ?? 0,
    createdAt: o.meta?.createdAt ? new Date(o.meta.createdAt).toISOString() : '',
    updatedAt: o.meta?.updatedAt ? new Date(o.meta.updatedAt).toISOString() : '',
  };
  if (withData) out.data = Buffer.from(o.spec?.data ?? new Uint8Array()).toString('base64');
  return out;
}

const cap = (s: string): string => s.charAt(0).toUpperCase() + s.slice(1);

/** Registers `flotilla <kind> create|ls|inspect|rm`. */
export function registerObjectCommands(program: Command, kind: FileKind, hostOption: (c: Command) => Command): void {
  const plural = `${kind}s`;
  const Kind = cap(kind);
  const grp = program.command(kind).description(kind === 'secret' ? 'Manage secrets (sensitive data mounted into service containers)' : 'Manage configs (files mounted into service containers)');
  const rpc = {
    create: `create${Kind}` as keyof ControlClient,
    get: `get${Kind}` as keyof ControlClient,
    list: `list${Kind}s` as keyof ControlClient,
    remove: `remove${Kind}` as keyof ControlClient,
  };
  const idField = `${kind}Id`;

  hostOption(
    grp
      .command('create')
      .description(`Create a ${kind} from a file or standard input ("-"), at most ${MAX_SECRET_BYTES / 1024} KiB`)
      .argument('<name>', `${kind} name`)
      .argument('<file>', 'file to read the value from, or - for standard input')
      .option('-l, --label <K=V>', `${kind} label (repeatable)`, collect),
  ).action(
    action(async (name: string, file: string, opts: { host?: string; label?: string[] }) => {
      if (!SECRET_NAME_RE.test(name))
        throw invalidArgument(`${kind} name`, name.length > 100 ? `${name.slice(0, 100)}…` : name, 'use 1-64 letters, digits, "_", "." or "-", starting with a letter or digit');
      const labels = Object.fromEntries((opts.label ?? []).map((l) => (l.includes('=') ? parseKeyValue('--label', l) : [l, ''])));
      const data = readValue(kind, file);
      await withControl(opts.host, async (c) => {
        const res = await c.call<unknown, Record<string, Secret | Config>>(rpc.create, { spec: { name, labels, data } });
        process.stdout.write(`${res[kind]!.id}\n`);
      });
    }),
  );

  hostOption(grp.command('ls').alias('list').description(`List ${plural}`).option('--format <format>', 'table or json').option('-q, --quiet', 'only ids')).action(
    action(async (opts: { host?: string; format?: string; quiet?: boolean }) => {
      const format = checkFormat(opts.format);
      await withControl(opts.host, async (c) => {
        const res = await c.call<unknown, Record<string, Array<Secret | Config>>>(rpc.list, {});
        const all = [...(res[plural] ?? [])].sort((a, b) => (a.spec?.name ?? '').localeCompare(b.spec?.name ?? ''));
        if (opts.quiet) return void process.stdout.write(all.map((o) => `${o.id}\n`).join(''));
        if (format === 'json') return printJson(all.map((o) => objectJson(o)));
        process.stdout.write(
          table(
            ['ID', 'NAME', 'CREATED', 'UPDATED'],
            all.map((o) => [shortId(o.id), o.spec?.name ?? '', timeAgo(o.meta?.createdAt ?? 0), timeAgo(o.meta?.updatedAt ?? 0)]),
          ),
        );
      });
    }),
  );

  hostOption(
    grp
      .command('inspect')
      .description(kind === 'secret' ? 'Display detailed information on secrets (never their data)' : 'Display detailed information on configs, with their data (base64)')
      .argument(`<${kind}...>`)
      .option('--format <format>', 'json (default)'),
  ).action(
    action(async (refs: string[], opts: { host?: string; format?: string }) => {
      if (opts.format !== undefined && opts.format !== 'json') throw new ExitError(2, `invalid --format "${opts.format}": use json`);
      await withControl(opts.host, async (c) => {
        const out = [];
        for (const r of refs) {
          const res = await c.call<unknown, Record<string, Secret | Config>>(rpc.get, { [idField]: r });
          out.push(objectJson(res[kind]!, kind === 'config'));
        }
        printJson(out);
      });
    }),
  );

  hostOption(grp.command('rm').alias('remove').description(`Remove one or more ${plural} (refused while a service uses one)`).argument(`<${kind}...>`)).action(
    action(async (refs: string[], opts: { host?: string }) => {
      await withControl(opts.host, async (c) => {
        let failed = 0;
        for (const r of refs) {
          try {
            await c.call(rpc.remove, { [idField]: r });
            process.stdout.write(`${r}\n`);
          } catch (err) {
            failed++;
            process.stderr.write(`flotilla: ${(err as Error).message}\n`);
          }
        }
        if (failed) throw new ExitError(1);
      });
    }),
  );
}
