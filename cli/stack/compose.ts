/**
 * Reading Compose files for `stack deploy`: YAML (the `yaml` library), variable interpolation from
 * the environment, and the merge of several files (-c base.yml -c override.yml) in order.
 *
 * As `docker stack deploy`, no `.env` file is read: variables come from the environment of the
 * command only. Errors are ComposeError, one line naming the file or key path and the problem.
 */
import fs from 'node:fs';
import YAML from 'yaml';

export type Obj = Record<string, unknown>;

/** An invalid Compose file: the message is one line, "key.path: problem". */
export class ComposeError extends Error {
  override name = 'ComposeError';
}

export const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

/** YAML 1.1 octal (`mode: 0440`), which Compose files use and YAML 1.2's core schema reads as decimal. */
const octalInt = {
  identify: (v: unknown) => typeof v === 'number',
  default: true,
  tag: 'tag:yaml.org,2002:int',
  test: /^0[0-7]+$/,
  resolve: (s: string) => parseInt(s, 8),
};

/** Parses one Compose file's text (no interpolation yet). `where` names it in errors. */
export function parseYaml(text: string, where: string): Obj {
  const docs = YAML.parseAllDocuments(text, { merge: true, uniqueKeys: true, customTags: (tags) => [octalInt, ...tags] });
  const list = Array.isArray(docs) ? docs : [docs];
  if (list.length > 1) throw new ComposeError(`${where}: expected one YAML document, found ${list.length}`);
  const doc = list[0];
  if (!doc) throw new ComposeError(`${where}: empty file`);
  const err = doc.errors[0];
  if (err) {
    const line = err.linePos?.[0];
    const first = err.message.split('\n')[0] ?? err.message;
    throw new ComposeError(`${where}${line ? `:${line.line}:${line.col}` : ''}: invalid YAML: ${first.replace(/ at line \d+, column \d+:?$/, '')}`);
  }
  const v: unknown = doc.toJS({ maxAliasCount: 1000 });
  if (v === null || v === undefined) throw new ComposeError(`${where}: empty file`);
  if (!isObj(v)) throw new ComposeError(`${where}: the top level must be a mapping (services:, networks:, ...)`);
  return v;
}

export function readComposeFile(file: string): Obj {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ComposeError(`${file}: ${code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'is a directory' : (err as Error).message}`);
  }
  return parseYaml(text, file);
}

// ---- interpolation

const NAME = /^[A-Za-z_][A-Za-z0-9_]*/;

/**
 * Interpolates one string: `$$` is a literal `$`; `$VAR`, `${VAR}`; `${VAR:-default}` (unset or
 * empty), `${VAR-default}` (unset); `${VAR:?err}`, `${VAR?err}` (fail); `${VAR:+alt}`, `${VAR+alt}`.
 * A default may itself hold variables. Unset variables without a default become "" and are reported
 * through `unset`, as Docker warns about them.
 */
export function interpolate(s: string, env: Record<string, string | undefined>, path: string, unset: Set<string>): string {
  let out = '';
  let i = 0;
  while (i < s.length) {
    const ch = s[i]!;
    if (ch !== '$') {
      out += ch;
      i++;
      continue;
    }
    const next = s[i + 1];
    if (next === '$') {
      out += '$';
      i += 2;
      continue;
    }
    if (next === '{') {
      // find the matching brace (defaults may nest ${...})
      let depth = 1;
      let j = i + 2;
      for (; j < s.length && depth > 0; j++) {
        if (s[j] === '{') depth++;
        else if (s[j] === '}') depth--;
      }
      if (depth !== 0) throw new ComposeError(`${path}: invalid interpolation format in ${JSON.stringify(s)}: missing "}"`);
      const body = s.slice(i + 2, j - 1);
      out += expand(body, env, path, unset, s);
      i = j;
      continue;
    }
    const m = NAME.exec(s.slice(i + 1));
    if (m) {
      out += lookup(m[0], env, unset);
      i += 1 + m[0].length;
      continue;
    }
    // a lone "$" (end of string, or before a character no name starts with) stays as it is
    out += '$';
    i++;
  }
  return out;
}

function lookup(name: string, env: Record<string, string | undefined>, unset: Set<string>): string {
  const v = env[name];
  if (v === undefined) {
    unset.add(name);
    return '';
  }
  return v;
}

function expand(body: string, env: Record<string, string | undefined>, path: string, unset: Set<string>, whole: string): string {
  const m = NAME.exec(body);
  if (!m) throw new ComposeError(`${path}: invalid interpolation format in ${JSON.stringify(whole)}: "\${${body}}" does not start with a variable name`);
  const name = m[0];
  const rest = body.slice(name.length);
  const v = env[name];
  if (rest === '') return lookup(name, env, unset);
  const op = /^(:?[-?+])/.exec(rest)?.[1];
  if (!op) throw new ComposeError(`${path}: invalid interpolation format in ${JSON.stringify(whole)}: unexpected ${JSON.stringify(rest)} after ${name}`);
  const arg = rest.slice(op.length);
  const emptyCounts = op.startsWith(':');
  const missing = v === undefined || (emptyCounts && v === '');
  switch (op.replace(':', '')) {
    case '-':
      return missing ? interpolate(arg, env, path, unset) : v!;
    case '+':
      return missing ? '' : interpolate(arg, env, path, unset);
    default: {
      // "?": required
      if (!missing) return v!;
      const why = interpolate(arg, env, path, unset);
      throw new ComposeError(`${path}: required variable ${name} is missing a value${why ? `: ${why}` : ''}`);
    }
  }
}

/** Interpolates every string value (not the keys) of a parsed file, in place of a copy. */
export function interpolateAll(v: unknown, env: Record<string, string | undefined>, path: string, unset: Set<string>): unknown {
  if (typeof v === 'string') return interpolate(v, env, path, unset);
  if (Array.isArray(v)) return v.map((x, i) => interpolateAll(x, env, `${path}[${i}]`, unset));
  if (isObj(v)) {
    const out: Obj = {};
    for (const [k, x] of Object.entries(v)) out[k] = interpolateAll(x, env, path ? `${path}.${k}` : k, unset);
    return out;
  }
  return v;
}

// ---- merge (-c base -c override), as Docker's compose merge does for the common keys

/** `K=V` list or mapping to a mapping; other shapes are left for validation to refuse. */
function toMap(v: unknown, sep = '='): unknown {
  if (!Array.isArray(v)) return v;
  if (!v.every((x) => typeof x === 'string' && !x.startsWith(sep))) return v;
  const out: Obj = {};
  for (const e of v as string[]) {
    const i = e.indexOf(sep);
    if (i < 0) out[e] = null;
    else out[e.slice(0, i)] = e.slice(i + 1);
  }
  return out;
}

/** `[a, b]` network list to `{a: null, b: null}`. */
function networksToMap(v: unknown): unknown {
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) return v;
  return Object.fromEntries((v as string[]).map((n) => [n, null]));
}

/** Sequences merged by a key: entries of the override replace the base's with the same key, others are appended. */
function mergeByKey(base: unknown[], over: unknown[], key: (x: unknown) => string): unknown[] {
  const out = [...base];
  for (const o of over) {
    const k = key(o);
    const i = out.findIndex((b) => key(b) === k);
    if (i >= 0) out[i] = o;
    else out.push(o);
  }
  return out;
}

const unionStrings = (a: unknown[], b: unknown[]): unknown[] => [...a, ...b.filter((x) => !a.some((y) => JSON.stringify(y) === JSON.stringify(x)))];

function portKey(p: unknown): string {
  if (isObj(p)) return `${String(p.published ?? '')}:${String(p.target ?? '')}/${String(p.protocol ?? 'tcp')}/${String(p.mode ?? 'ingress')}`;
  const s = String(p);
  return s.includes('/') ? s : `${s}/tcp`;
}
function volumeKey(v: unknown): string {
  if (isObj(v)) return String(v.target ?? '');
  const parts = String(v).split(':');
  return parts.length === 1 ? parts[0]! : (parts[1] ?? '');
}
function fileRefKey(v: unknown): string {
  return isObj(v) ? String(v.source ?? '') : String(v);
}

/** How each sequence key of a service merges; keys not listed are replaced as a whole. */
const SERVICE_SEQ_MERGE: Record<string, (a: unknown[], b: unknown[]) => unknown[]> = {
  ports: (a, b) => mergeByKey(a, b, portKey),
  volumes: (a, b) => mergeByKey(a, b, volumeKey),
  secrets: (a, b) => mergeByKey(a, b, fileRefKey),
  configs: (a, b) => mergeByKey(a, b, fileRefKey),
  cap_add: unionStrings,
  cap_drop: unionStrings,
  dns: unionStrings,
  dns_search: unionStrings,
  dns_opt: unionStrings,
  extra_hosts: unionStrings,
  env_file: unionStrings,
  expose: unionStrings,
  group_add: unionStrings,
  tmpfs: unionStrings,
};

/** Normalises the shapes that merge by key (list forms of environment, labels, networks...). */
export function normaliseService(svc: unknown): unknown {
  if (!isObj(svc)) return svc;
  const s: Obj = { ...svc };
  for (const k of ['environment', 'labels', 'sysctls']) if (k in s) s[k] = toMap(s[k]);
  if ('networks' in s) s.networks = networksToMap(s.networks);
  if (typeof s.env_file === 'string') s.env_file = [s.env_file];
  if (isObj(s.deploy) && 'labels' in s.deploy) s.deploy = { ...s.deploy, labels: toMap(s.deploy.labels) };
  return s;
}

/** Recursive merge of mappings: the override wins per key; `null` in the override keeps the base's value. */
function mergeValues(base: unknown, over: unknown, seqMerge?: Record<string, (a: unknown[], b: unknown[]) => unknown[]>, key?: string): unknown {
  if (over === undefined) return base;
  if (key && seqMerge?.[key] && Array.isArray(base) && Array.isArray(over)) return seqMerge[key](base, over);
  if (isObj(base) && isObj(over)) {
    const out: Obj = { ...base };
    for (const [k, v] of Object.entries(over)) out[k] = k in base ? mergeValues(base[k], v, undefined, k) : v;
    return out;
  }
  return over;
}

function mergeService(base: unknown, over: unknown): unknown {
  const b = normaliseService(base);
  const o = normaliseService(over);
  if (!isObj(b) || !isObj(o)) return o;
  const out: Obj = { ...b };
  for (const [k, v] of Object.entries(o)) {
    if (!(k in b)) out[k] = v;
    else if (SERVICE_SEQ_MERGE[k] && Array.isArray(b[k]) && Array.isArray(v)) out[k] = SERVICE_SEQ_MERGE[k](b[k] as unknown[], v);
    // deploy.placement.constraints and .preferences accumulate; the rest of deploy merges by key
    else if (k === 'deploy' && isObj(b[k]) && isObj(v)) out[k] = mergeDeploy(b[k], v);
    else out[k] = mergeValues(b[k], v);
  }
  return out;
}

function mergeDeploy(b: Obj, o: Obj): Obj {
  const out = mergeValues(b, o) as Obj;
  if (isObj(b.placement) && isObj(o.placement)) {
    const p: Obj = mergeValues(b.placement, o.placement) as Obj;
    for (const k of ['constraints', 'preferences'])
      if (Array.isArray(b.placement[k]) && Array.isArray(o.placement[k])) p[k] = unionStrings(b.placement[k] as unknown[], o.placement[k] as unknown[]);
    out.placement = p;
  }
  return out;
}

/** Merges parsed (interpolated) files in order: services per service, the other sections per entry. */
export function mergeFiles(files: Obj[]): Obj {
  const out: Obj = {};
  for (const f of files) {
    for (const [k, v] of Object.entries(f)) {
      if (k === 'services' && isObj(out.services) && isObj(v)) {
        const svcs: Obj = { ...out.services };
        for (const [name, s] of Object.entries(v)) svcs[name] = name in svcs ? mergeService(svcs[name], s) : normaliseService(s);
        out.services = svcs;
      } else if (k === 'services' && isObj(v)) {
        out.services = Object.fromEntries(Object.entries(v).map(([name, s]) => [name, normaliseService(s)]));
      } else if (isObj(out[k]) && isObj(v)) {
        // networks, volumes, secrets, configs: an entry of a later file replaces the earlier one's keys
        const sec: Obj = { ...(out[k] as Obj) };
        for (const [name, e] of Object.entries(v)) sec[name] = name in sec ? mergeValues(sec[name], e) : e;
        out[k] = sec;
      } else out[k] = v;
    }
  }
  return out;
}

/**
 * Loads, interpolates and merges the files in order. `unset` gathers the variables used without a
 * value (Docker warns about each and uses "").
 */
export function loadCompose(files: string[], env: Record<string, string | undefined>): { doc: Obj; unset: string[] } {
  const unset = new Set<string>();
  const parsed = files.map((f) => interpolateAll(readComposeFile(f), env, '', unset) as Obj);
  return { doc: mergeFiles(parsed), unset: [...unset].sort() };
}
