/**
 * From a merged Compose document to flotilla objects: the stack's networks, secrets, configs and
 * service specs, each named STACK_KEY and labelled com.docker.stack.namespace=STACK (Docker's label,
 * so that tooling reading Docker's stacks reads ours). Pure except for reading `file:` and `env_file:`
 * files. Every key is either mapped, or named in a warning (not supported), or refused as unknown;
 * an invalid value throws one ComposeError line naming the key path. docs/stacks.md lists the keys.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  EndpointMode,
  NetworkSpec,
  PortProtocol,
  PublishMode,
  RestartCondition,
  ServiceMode,
  UpdateFailureAction,
  UpdateOrder,
  type ConfigReference,
  type ContainerSpec,
  type Ulimit,
  type HealthConfig,
  type NetworkAttachmentConfig,
  type Placement,
  type PortConfig,
  type ResourceRequirements,
  type RestartPolicy,
  type SecretReference,
  type ServiceSpec,
  type UpdateConfig,
} from '../../gen/flotilla/v1/objects.js';
import { FlotillaError } from '../../common/errors.js';
import { isValidName } from '../../common/ids.js';
import { MAX_SECRET_BYTES, SECRET_NAME_RE } from '../../common/secrets.js';
import { parseBytes, parseCpus, parseDuration } from '../../common/units.js';
import { parseConstraint, parseSpread } from '../../manager/scheduler/constraints.js';
import {
  emptyMount,
  normaliseCap,
  normaliseSignal,
  parseExtraHost,
  parseVolumeShort,
  VOLUME_NAME,
  VOLUME_OPT_KEYS,
  type MountOpt,
} from '../../common/containeropts.js';
import { defaultUpdateConfig, DEFAULT_STOP_GRACE_MS, validateServiceSpec } from '../../manager/controlapi/validate.js';
import { KNOWN_DRIVER_OPTS, validateNetworkSpec } from '../../manager/allocator/networks.js';
import { validatePorts } from '../../manager/allocator/ports.js';
import { checkGateway, checkSubnet, parseMtu } from '../../manager/allocator/ipam.js';
import { ComposeError, isObj, type Obj } from './compose.js';

/** Docker's stack label, on every object of a stack (and on the service's containers). */
export const STACK_LABEL = 'com.docker.stack.namespace';
/** Docker's label with the image as the stack file names it, on each service. */
export const IMAGE_LABEL = 'com.docker.stack.image';

/**
 * Compose keys whose flotilla feature is not there yet: named in a warning and ignored. When the
 * feature lands, its key moves to the mapped ones (see docs/stacks.md).
 */
export const PENDING_SERVICE_KEYS: Record<string, string> = {};

/** Compose keys `docker stack deploy` ignores too (or that make no sense on a cluster): warned about, ignored. */
export const UNSUPPORTED_SERVICE_KEYS = [
  'annotations', 'attach', 'blkio_config', 'build', 'cgroup', 'cgroup_parent', 'container_name', 'cpu_count', 'cpu_percent',
  'cpu_period', 'cpu_quota', 'cpu_rt_period', 'cpu_rt_runtime', 'cpu_shares', 'cpus', 'cpuset', 'credential_spec',
  'depends_on', 'develop', 'device_cgroup_rules', 'devices', 'domainname', 'expose', 'external_links', 'gpus', 'ipc',
  'isolation', 'label_file', 'links', 'logging', 'mac_address', 'mem_limit', 'mem_reservation', 'mem_swappiness',
  'memswap_limit', 'network_mode', 'oom_kill_disable', 'oom_score_adj', 'pid', 'pids_limit', 'platform', 'post_start',
  'pre_stop', 'privileged', 'profiles', 'pull_policy', 'restart', 'runtime', 'scale', 'security_opt', 'shm_size',
  'stdin_open', 'storage_opt', 'userns_mode', 'uts', 'volumes_from', 'models', 'provider', 'use_api_socket', 'extends',
];


export interface StackNetwork {
  key: string;
  name: string;
  external: boolean;
  spec?: NetworkSpec;
}

export interface StackFileObject {
  key: string;
  name: string;
  external: boolean;
  labels: Record<string, string>;
  data?: Buffer;
}

/** A named volume of the file: created on demand on each node a task needs it (docs/volumes.md). */
export interface StackVolume {
  key: string;
  name: string;
  external: boolean;
  opts: Record<string, string>;
  labels: Record<string, string>;
}

export interface StackService {
  key: string;
  spec: ServiceSpec;
}

export interface StackPlan {
  networks: StackNetwork[];
  secrets: StackFileObject[];
  configs: StackFileObject[];
  services: StackService[];
  warnings: string[];
}

export interface TranslateOptions {
  /** relative `file:` and `env_file:` paths are resolved from here (the first compose file's folder) */
  baseDir: string;
  /** for `environment: [KEY]` and env files' `KEY` lines without a value */
  env: Record<string, string | undefined>;
}

/** A stack name: used as the prefix of every object name. */
export const STACK_NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/;

// ---- small checked readers; each names its key path in errors

const show = (v: unknown): string => (typeof v === 'string' ? JSON.stringify(v) : Array.isArray(v) ? 'a list' : isObj(v) ? 'a mapping' : String(v));

function fail(p: string, why: string): never {
  throw new ComposeError(`${p}: ${why}`);
}

/** Runs a flotilla parser and turns its `invalid FIELD "v": why` into `path: why, got "v"`. */
function wrap<T>(p: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (err instanceof ComposeError) throw err;
    const msg = err instanceof Error ? err.message : String(err);
    const m = /^invalid .+? ("(?:[^"\\]|\\.)*"|-?[\d.]+|true|false|null): (.*)$/s.exec(msg);
    throw new ComposeError(m ? `${p}: ${m[2]}, got ${m[1]}` : `${p}: ${msg}`);
  }
}

function str(p: string, v: unknown): string {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  fail(p, `must be a string, got ${show(v)}`);
}

function strictStr(p: string, v: unknown): string {
  if (typeof v !== 'string') fail(p, `must be a string, got ${show(v)}`);
  return v;
}

function uint(p: string, v: unknown): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^\s*\d+\s*$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < 0) fail(p, `must be a non-negative integer, got ${show(v)}`);
  return n;
}

function bool(p: string, v: unknown): boolean {
  if (typeof v === 'boolean') return v;
  if (v === 'true' || v === 'false') return v === 'true';
  fail(p, `must be true or false, got ${show(v)}`);
}

function duration(p: string, v: unknown, flag: string): number {
  if (typeof v !== 'string') fail(p, `must be a duration such as 10s or 1m30s, got ${show(v)}`);
  return wrap(p, () => parseDuration(flag, v));
}

function obj(p: string, v: unknown): Obj {
  if (v === null || v === undefined) return {};
  if (!isObj(v)) fail(p, `must be a mapping, got ${show(v)}`);
  return v;
}

function list(p: string, v: unknown): unknown[] {
  if (v === null || v === undefined) return [];
  if (!Array.isArray(v)) fail(p, `must be a list, got ${show(v)}`);
  return v;
}

function strList(p: string, v: unknown): string[] {
  return list(p, v).map((x, i) => str(`${p}[${i}]`, x));
}

/** `K=V` list or `K: V` mapping to a map; a key without a value is null. */
function kvMap(p: string, v: unknown): Record<string, string | null> {
  const out: Record<string, string | null> = {};
  if (v === null || v === undefined) return out;
  if (Array.isArray(v)) {
    for (const [i, e] of v.entries()) {
      const s = str(`${p}[${i}]`, e);
      const j = s.indexOf('=');
      const k = j < 0 ? s : s.slice(0, j);
      if (!k) fail(`${p}[${i}]`, `expected KEY=VALUE, got ${show(s)}`);
      out[k] = j < 0 ? null : s.slice(j + 1);
    }
    return out;
  }
  if (!isObj(v)) fail(p, `must be a mapping or a list of KEY=VALUE, got ${show(v)}`);
  for (const [k, x] of Object.entries(v)) out[k] = x === null || x === undefined ? null : str(`${p}.${k}`, x);
  return out;
}

function labelMap(p: string, v: unknown): Record<string, string> {
  return Object.fromEntries(Object.entries(kvMap(p, v)).map(([k, x]) => [k, x ?? '']));
}

function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++)
    for (let j = 1; j <= b.length; j++)
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
  return d[a.length]![b.length]!;
}

interface KeySet {
  mapped: string[];
  pending?: Record<string, string>;
  unsupported?: string[];
}

/**
 * Checks the keys of one mapping: mapped ones pass, pending and unsupported ones are warned about
 * (and the caller ignores them), `x-*` extension keys are ignored as Compose says, others are an error.
 */
function checkKeys(p: string, o: Obj, ks: KeySet, warn: (w: string) => void): void {
  for (const k of Object.keys(o)) {
    if (k.startsWith('x-') || ks.mapped.includes(k)) continue;
    const kp = p ? `${p}.${k}` : k;
    const pending = ks.pending?.[k];
    if (pending !== undefined) warn(`${kp}: not supported yet (${pending}), ignored`);
    else if (ks.unsupported?.includes(k)) warn(`${kp}: not supported by flotilla stacks, ignored`);
    else {
      const all = [...ks.mapped, ...Object.keys(ks.pending ?? {}), ...(ks.unsupported ?? [])];
      const near = all.filter((x) => distance(x, k) <= 2).sort((a, b) => distance(a, k) - distance(b, k))[0];
      fail(kp, `unknown key${near ? ` (did you mean ${near}?)` : ''}`);
    }
  }
}

/** Splits a command string as a POSIX shell would split words (quotes, backslashes; no expansion). */
export function shellSplit(p: string, s: string): string[] {
  const out: string[] = [];
  let cur = '';
  let inWord = false;
  let quote: '"' | "'" | '' = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (quote === "'") {
      if (c === "'") quote = '';
      else cur += c;
    } else if (quote === '"') {
      if (c === '"') quote = '';
      else if (c === '\\' && i + 1 < s.length && '"\\$`\n'.includes(s[i + 1]!)) cur += s[++i];
      else cur += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      inWord = true;
    } else if (c === '\\' && i + 1 < s.length) {
      cur += s[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) out.push(cur);
      cur = '';
      inWord = false;
    } else {
      cur += c;
      inWord = true;
    }
  }
  if (quote) fail(p, `unterminated ${quote === '"' ? 'double' : 'single'} quote in ${JSON.stringify(s)}`);
  if (inWord) out.push(cur);
  return out;
}

function commandOf(p: string, v: unknown): string[] {
  if (v === null || v === undefined) return [];
  if (typeof v === 'string') return shellSplit(p, v);
  return strList(p, v);
}

/** Docker's env file format (`docker run --env-file`): KEY=VALUE lines taken as written, # comments, KEY alone from the environment. */
export function parseEnvFile(p: string, file: string, text: string, env: Record<string, string | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [n, raw] of text.replace(/^\uFEFF/, '').split(/\r?\n/).entries()) {
    const line = raw.replace(/^\s+/, '');
    if (!line || line.startsWith('#')) continue;
    const i = line.indexOf('=');
    const k = i < 0 ? line.trimEnd() : line.slice(0, i);
    if (!k || /\s/.test(k)) fail(p, `${file}:${n + 1}: invalid variable name ${JSON.stringify(k)}`);
    if (i >= 0) out[k] = line.slice(i + 1);
    else if (env[k] !== undefined) out[k] = env[k]!;
  }
  return out;
}

function readFileChecked(p: string, file: string, limit?: number): Buffer {
  try {
    const st = fs.statSync(file);
    if (st.isDirectory()) fail(p, `${JSON.stringify(file)} is a directory`);
    if (limit !== undefined && st.size > limit) fail(p, `${JSON.stringify(file)} is ${st.size} bytes, over the limit of ${limit} bytes (${limit / 1024} KiB)`);
    return fs.readFileSync(file);
  } catch (err) {
    if (err instanceof ComposeError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    fail(p, code === 'ENOENT' ? `no such file ${JSON.stringify(file)}` : `cannot read ${JSON.stringify(file)}: ${(err as Error).message}`);
  }
}

// ---- top level

const TOP_KEYS: KeySet = { mapped: ['version', 'services', 'networks', 'volumes', 'secrets', 'configs'], unsupported: ['name', 'include', 'models'] };

export function translateStack(stack: string, doc: Obj, opts: TranslateOptions): StackPlan {
  if (!STACK_NAME_RE.test(stack)) throw new ComposeError(`stack name ${JSON.stringify(stack)}: use letters, digits, "_", "." or "-", starting with a letter or digit`);
  const warnings: string[] = [];
  const warn = (w: string): void => void warnings.push(w);
  checkKeys('', doc, TOP_KEYS, warn);
  if (doc.version !== undefined && typeof doc.version !== 'string' && typeof doc.version !== 'number') fail('version', `must be a string, got ${show(doc.version)}`);
  const services = obj('services', doc.services);
  if (Object.keys(services).filter((k) => !k.startsWith('x-')).length === 0) fail('services', 'the file defines no service');

  const nsLabel = { [STACK_LABEL]: stack };
  const scoped = (key: string): string => `${stack}_${key}`;

  // networks: declared ones, then what the services use (the default network when they name none)
  const declaredNets = obj('networks', doc.networks);
  const netDefs = new Map<string, StackNetwork>();
  for (const [key, raw] of Object.entries(declaredNets)) {
    if (key.startsWith('x-')) continue;
    netDefs.set(key, translateNetwork(`networks.${key}`, key, raw, scoped, nsLabel, warn));
  }
  const fileObjects = (kind: 'secrets' | 'configs'): Map<string, StackFileObject> => {
    const m = new Map<string, StackFileObject>();
    for (const [key, raw] of Object.entries(obj(kind, doc[kind]))) {
      if (key.startsWith('x-')) continue;
      m.set(key, translateFileObject(kind, key, raw, scoped, nsLabel, opts, warn));
    }
    return m;
  };
  const volumes = new Map<string, StackVolume>();
  for (const [key, raw] of Object.entries(obj('volumes', doc.volumes))) {
    if (key.startsWith('x-')) continue;
    volumes.set(key, translateVolume(`volumes.${key}`, key, raw, scoped, nsLabel, warn));
  }
  const secrets = fileObjects('secrets');
  const configs = fileObjects('configs');

  const used = new Set<string>();
  const out: StackService[] = [];
  for (const [key, raw] of Object.entries(services)) {
    if (key.startsWith('x-')) continue;
    const spec = translateService(stack, key, raw, { stack, volumes, netDefs, secrets, configs, used, opts, warn });
    out.push({ key, spec });
  }
  if (used.has('default') && !netDefs.has('default')) {
    netDefs.set('default', {
      key: 'default',
      name: scoped('default'),
      external: false,
      spec: NetworkSpec.fromPartial({ name: scoped('default'), driver: 'overlay', labels: { ...nsLabel }, ipam: { subnet: '', gateway: '' } }),
    });
  }
  // as Docker, only the networks some service uses are created
  const networks = [...netDefs.values()].filter((n) => used.has(n.key));
  for (const n of networks) if (n.spec) wrap(`networks.${n.key}`, () => validateNetworkSpec(structuredClone(n.spec)));
  return { networks, secrets: [...secrets.values()], configs: [...configs.values()], services: out, warnings };
}

function externalName(p: string, raw: Obj): { external: boolean; name?: string } {
  const ext = raw.external;
  if (ext === undefined || ext === null) return { external: false };
  if (isObj(ext)) {
    checkKeys(`${p}.external`, ext, { mapped: ['name'] }, () => {});
    return { external: true, name: ext.name !== undefined ? strictStr(`${p}.external.name`, ext.name) : undefined };
  }
  return { external: bool(`${p}.external`, ext) };
}

function translateNetwork(p: string, key: string, rawv: unknown, scoped: (k: string) => string, ns: Record<string, string>, warn: (w: string) => void): StackNetwork {
  const raw = obj(p, rawv);
  checkKeys(p, raw, { mapped: ['driver', 'driver_opts', 'ipam', 'external', 'name', 'labels', 'attachable'], unsupported: ['internal', 'enable_ipv6', 'enable_ipv4'] }, warn);
  const ext = externalName(p, raw);
  const given = raw.name !== undefined ? strictStr(`${p}.name`, raw.name) : undefined;
  if (ext.external) {
    for (const k of ['driver', 'driver_opts', 'ipam', 'labels', 'attachable']) if (raw[k] !== undefined) fail(`${p}.${k}`, 'cannot be set on an external network');
    return { key, name: given ?? ext.name ?? key, external: true };
  }
  const name = given ?? scoped(key);
  if (!isValidName(name)) fail(p, `the network name ${JSON.stringify(name)} is not valid (1-63 letters, digits, "_", "." or "-")`);
  const driver = raw.driver === undefined ? 'overlay' : strictStr(`${p}.driver`, raw.driver);
  if (driver !== 'overlay') fail(`${p}.driver`, `only overlay is supported, got ${JSON.stringify(driver)}`);
  const driverOpts = Object.fromEntries(Object.entries(obj(`${p}.driver_opts`, raw.driver_opts)).map(([k, v]) => [k, str(`${p}.driver_opts.${k}`, v)]));
  for (const [k, v] of Object.entries(driverOpts)) {
    if (!KNOWN_DRIVER_OPTS.includes(k)) fail(`${p}.driver_opts.${k}`, `unknown option (known: ${KNOWN_DRIVER_OPTS.join(', ')})`);
    if (k === 'mtu') wrap(`${p}.driver_opts.mtu`, () => parseMtu(v));
  }
  const ipam = obj(`${p}.ipam`, raw.ipam);
  checkKeys(`${p}.ipam`, ipam, { mapped: ['driver', 'config'], unsupported: ['options'] }, warn);
  if (ipam.driver !== undefined && ipam.driver !== 'default') fail(`${p}.ipam.driver`, `only the default IPAM driver is supported, got ${show(ipam.driver)}`);
  const cfgs = list(`${p}.ipam.config`, ipam.config);
  if (cfgs.length > 1) fail(`${p}.ipam.config`, `at most one subnet per network is supported, got ${cfgs.length}`);
  let subnet = '';
  let gateway = '';
  if (cfgs[0] !== undefined) {
    const c = obj(`${p}.ipam.config[0]`, cfgs[0]);
    checkKeys(`${p}.ipam.config[0]`, c, { mapped: ['subnet', 'gateway'], unsupported: ['ip_range', 'aux_addresses'] }, warn);
    if (c.subnet !== undefined) subnet = strictStr(`${p}.ipam.config[0].subnet`, c.subnet);
    if (c.gateway !== undefined) gateway = strictStr(`${p}.ipam.config[0].gateway`, c.gateway);
    if (gateway && !subnet) fail(`${p}.ipam.config[0].gateway`, 'needs a subnet');
    const cidr = subnet ? wrap(`${p}.ipam.config[0].subnet`, () => checkSubnet('subnet', subnet)) : undefined;
    if (cidr && gateway) wrap(`${p}.ipam.config[0].gateway`, () => checkGateway('gateway', gateway, cidr));
  }
  const spec = NetworkSpec.fromPartial({
    name,
    driver: 'overlay',
    labels: { ...labelMap(`${p}.labels`, raw.labels), ...ns },
    driverOpts,
    ipam: { subnet, gateway },
    attachable: raw.attachable !== undefined ? bool(`${p}.attachable`, raw.attachable) : false,
  });
  return { key, name, external: false, spec };
}

function translateFileObject(
  kind: 'secrets' | 'configs',
  key: string,
  rawv: unknown,
  scoped: (k: string) => string,
  ns: Record<string, string>,
  opts: TranslateOptions,
  warn: (w: string) => void,
): StackFileObject {
  const p = `${kind}.${key}`;
  const raw = obj(p, rawv);
  checkKeys(p, raw, { mapped: ['file', 'external', 'name', 'labels'], unsupported: ['environment', 'content', 'template_driver', 'driver', 'driver_opts'] }, warn);
  const ext = externalName(p, raw);
  const given = raw.name !== undefined ? strictStr(`${p}.name`, raw.name) : undefined;
  const labels = { ...labelMap(`${p}.labels`, raw.labels), ...ns };
  const one = kind === 'secrets' ? 'secret' : 'config';
  if (ext.external) {
    if (raw.file !== undefined) fail(`${p}.file`, `cannot be set on an external ${one}`);
    return { key, name: given ?? ext.name ?? key, external: true, labels };
  }
  if (raw.file === undefined) fail(p, `needs file: (or external: true)`);
  const file = path.resolve(opts.baseDir, strictStr(`${p}.file`, raw.file));
  const name = given ?? scoped(key);
  if (!SECRET_NAME_RE.test(name)) fail(p, `the ${one} name ${JSON.stringify(name)} is not valid (1-64 letters, digits, "_", "." or "-")`);
  const data = readFileChecked(`${p}.file`, file, MAX_SECRET_BYTES);
  if (data.length === 0) fail(`${p}.file`, `${JSON.stringify(file)} is empty (a ${one} needs 1 to ${MAX_SECRET_BYTES} bytes)`);
  return { key, name, external: false, labels, data };
}

// ---- services

interface ServiceCtx {
  stack: string;
  volumes: Map<string, StackVolume>;
  netDefs: Map<string, StackNetwork>;
  secrets: Map<string, StackFileObject>;
  configs: Map<string, StackFileObject>;
  used: Set<string>;
  opts: TranslateOptions;
  warn: (w: string) => void;
}

const SERVICE_KEYS: KeySet = {
  mapped: [
    'image', 'command', 'entrypoint', 'environment', 'env_file', 'labels', 'user', 'working_dir', 'hostname', 'healthcheck', 'stop_grace_period',
    'networks', 'secrets', 'configs', 'deploy', 'volumes', 'tmpfs', 'cap_add', 'cap_drop', 'read_only', 'init', 'ulimits', 'sysctls', 'stop_signal',
    'dns', 'dns_search', 'dns_opt', 'extra_hosts', 'tty', 'group_add', 'ports',
  ],
  pending: PENDING_SERVICE_KEYS,
  unsupported: UNSUPPORTED_SERVICE_KEYS,
};

/** Which compose key a flotilla validation field comes from (validateServiceSpec errors). */
const FIELD_KEYS: Record<string, string> = {
  image: 'image',
  env: 'environment',
  args: 'command',
  user: 'user',
  workdir: 'working_dir',
  labels: 'deploy.labels',
  'container-label': 'labels',
  'health-cmd': 'healthcheck.test',
  'limit-memory': 'deploy.resources.limits.memory',
  constraint: 'deploy.placement.constraints',
  'network alias': 'networks',
  mount: 'volumes',
  'cap-add': 'cap_add',
  'cap-drop': 'cap_drop',
  ulimit: 'ulimits',
  sysctl: 'sysctls',
  'stop-signal': 'stop_signal',
  hostname: 'hostname',
  dns: 'dns',
  'dns-search': 'dns_search',
  'dns-option': 'dns_opt',
  host: 'extra_hosts',
  group: 'group_add',
};

function translateService(stack: string, key: string, rawv: unknown, ctx: ServiceCtx): ServiceSpec {
  const p = `services.${key}`;
  const raw = obj(p, rawv);
  const { warn } = ctx;
  checkKeys(p, raw, SERVICE_KEYS, warn);
  const name = `${stack}_${key}`;
  if (!isValidName(name)) fail(p, `the service name ${JSON.stringify(name)} is not valid (1-63 letters, digits, "_", "." or "-")`);
  if (raw.image === undefined) fail(`${p}.image`, 'required (stack deploy builds no images)');
  const image = strictStr(`${p}.image`, raw.image);

  // environment: the env files in order, then `environment`, which wins; sorted for stable specs
  const env: Record<string, string> = {};
  const envFiles = raw.env_file === undefined ? [] : typeof raw.env_file === 'string' ? [raw.env_file] : list(`${p}.env_file`, raw.env_file);
  for (const [i, ef] of envFiles.entries()) {
    const ep = `${p}.env_file[${i}]`;
    let file: string;
    let required = true;
    if (isObj(ef)) {
      checkKeys(ep, ef, { mapped: ['path', 'required'], unsupported: ['format'] }, warn);
      file = strictStr(`${ep}.path`, ef.path);
      if (ef.required !== undefined) required = bool(`${ep}.required`, ef.required);
    } else file = strictStr(ep, ef);
    const abs = path.resolve(ctx.opts.baseDir, file);
    if (!required && !fs.existsSync(abs)) continue;
    Object.assign(env, parseEnvFile(ep, file, readFileChecked(ep, abs).toString('utf8'), ctx.opts.env));
  }
  for (const [k, v] of Object.entries(kvMap(`${p}.environment`, raw.environment))) {
    if (v !== null) env[k] = v;
    else if (ctx.opts.env[k] !== undefined) env[k] = ctx.opts.env[k]!;
    else delete env[k];
  }

  const deploy = obj(`${p}.deploy`, raw.deploy);
  checkKeys(`${p}.deploy`, deploy, {
    mapped: ['mode', 'replicas', 'placement', 'resources', 'restart_policy', 'update_config', 'rollback_config', 'endpoint_mode', 'labels'],
  }, warn);
  const modeName = deploy.mode === undefined ? 'replicated' : strictStr(`${p}.deploy.mode`, deploy.mode);
  const MODES: Record<string, ServiceMode> = {
    replicated: ServiceMode.SERVICE_MODE_REPLICATED,
    global: ServiceMode.SERVICE_MODE_GLOBAL,
    'replicated-job': ServiceMode.SERVICE_MODE_REPLICATED_JOB,
    'global-job': ServiceMode.SERVICE_MODE_GLOBAL_JOB,
  };
  const mode = MODES[modeName];
  if (mode === undefined) fail(`${p}.deploy.mode`, `must be replicated, global, replicated-job or global-job, got ${JSON.stringify(modeName)}`);
  const global = modeName === 'global' || modeName === 'global-job';
  const job = modeName.endsWith('-job');
  let replicas = global ? 0 : 1;
  if (deploy.replicas !== undefined && deploy.replicas !== null) {
    if (global) fail(`${p}.deploy.replicas`, `cannot be set with mode: ${modeName}`);
    replicas = uint(`${p}.deploy.replicas`, deploy.replicas);
  }

  const labels = { ...labelMap(`${p}.labels`, raw.labels), [STACK_LABEL]: stack };
  const serviceLabels = { ...labelMap(`${p}.deploy.labels`, deploy.labels), [STACK_LABEL]: stack, [IMAGE_LABEL]: image };

  // Swarm's templates ({{.Service.Name}}, {{.Task.Slot}}, {{.Node.Hostname}}...) are expanded by the agent
  const hostname = raw.hostname !== undefined && raw.hostname !== null ? strictStr(`${p}.hostname`, raw.hostname) : '';

  const spec: ServiceSpec = {
    name,
    labels: serviceLabels,
    mode,
    replicas,
    maxConcurrent: 0,
    task: {
      container: {
        image,
        registryAuth: undefined,
        command: commandOf(`${p}.entrypoint`, raw.entrypoint),
        args: commandOf(`${p}.command`, raw.command),
        env: Object.keys(env)
          .sort()
          .map((k) => `${k}=${env[k]}`),
        workdir: raw.working_dir !== undefined && raw.working_dir !== null ? strictStr(`${p}.working_dir`, raw.working_dir) : '',
        user: raw.user !== undefined && raw.user !== null ? str(`${p}.user`, raw.user) : '',
        hostname,
        stopGracePeriodMs: raw.stop_grace_period !== undefined ? duration(`${p}.stop_grace_period`, raw.stop_grace_period, '--stop-grace-period') : DEFAULT_STOP_GRACE_MS,
        healthcheck: undefined,
        noHealthcheck: false,
        labels,
        networkMode: '',
        secrets: fileRefs('secrets', p, raw.secrets, ctx.secrets, warn) as SecretReference[],
        configs: fileRefs('configs', p, raw.configs, ctx.configs, warn) as ConfigReference[],
        ...containerOptions(p, raw, ctx),
      },
      resources: resources(`${p}.deploy.resources`, deploy.resources, warn),
      restart: restartPolicy(`${p}.deploy.restart_policy`, deploy.restart_policy, job, warn),
      networks: serviceNetworks(p, key, raw.networks, ctx),
      placement: placement(`${p}.deploy.placement`, deploy.placement, warn),
      forceUpdate: 0,
    },
    update: updateConfig(`${p}.deploy.update_config`, deploy.update_config, true, warn),
    rollback: updateConfig(`${p}.deploy.rollback_config`, deploy.rollback_config, false, warn),
    endpoint: undefined,
  };
  const h = healthcheck(`${p}.healthcheck`, raw.healthcheck, warn);
  if (h === 'none') spec.task!.container!.noHealthcheck = true;
  else spec.task!.container!.healthcheck = h;
  if (deploy.endpoint_mode !== undefined) {
    const m = strictStr(`${p}.deploy.endpoint_mode`, deploy.endpoint_mode);
    if (m !== 'vip' && m !== 'dnsrr') fail(`${p}.deploy.endpoint_mode`, `must be vip or dnsrr, got ${JSON.stringify(m)}`);
    spec.endpoint = { mode: m === 'vip' ? EndpointMode.ENDPOINT_MODE_VIP : EndpointMode.ENDPOINT_MODE_DNSRR, ports: [] };
  }
  const ports = parsePorts(`${p}.ports`, raw.ports, warn);
  if (ports.length > 0) {
    spec.endpoint = { mode: spec.endpoint?.mode ?? EndpointMode.ENDPOINT_MODE_VIP, ports };
    wrap(`${p}.ports`, () => validatePorts(spec.endpoint));
  }
  // the manager's own checks, here, so that nothing is created when one fails
  try {
    validateServiceSpec(structuredClone(spec));
  } catch (err) {
    if (!(err instanceof FlotillaError)) throw err;
    const field = /^invalid (\S+(?: alias)?)/.exec(err.message)?.[1] ?? '';
    wrap(FIELD_KEYS[field] ? `${p}.${FIELD_KEYS[field]}` : p, () => {
      throw err;
    });
  }
  return spec;
}

function fileRefs(kind: 'secrets' | 'configs', sp: string, v: unknown, declared: Map<string, StackFileObject>, warn: (w: string) => void): Array<SecretReference | ConfigReference> {
  const p = `${sp}.${kind}`;
  const one = kind === 'secrets' ? 'secret' : 'config';
  const seen = new Set<string>();
  return list(p, v).map((e, i) => {
    const ep = `${p}[${i}]`;
    let source: string;
    let target = '';
    let uid = 0;
    let gid = 0;
    let mode = 0o444;
    if (isObj(e)) {
      checkKeys(ep, e, { mapped: ['source', 'target', 'uid', 'gid', 'mode'] }, warn);
      source = strictStr(`${ep}.source`, e.source);
      if (e.target !== undefined) target = strictStr(`${ep}.target`, e.target);
      if (e.uid !== undefined) uid = uint(`${ep}.uid`, e.uid);
      if (e.gid !== undefined) gid = uint(`${ep}.gid`, e.gid);
      if (e.mode !== undefined) {
        const m = e.mode;
        mode = typeof m === 'number' ? m : typeof m === 'string' && /^0?o?[0-7]{1,4}$/.test(m) ? parseInt(m.replace(/^0?o/, ''), 8) : NaN;
        if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) fail(`${ep}.mode`, `must be an octal file mode such as 0440 (at most 0777), got ${show(m)}`);
      }
    } else source = strictStr(ep, e);
    const obj = declared.get(source);
    if (!obj) fail(ep, `${one} ${JSON.stringify(source)} is not declared in the top-level ${kind}`);
    if (seen.has(source)) fail(ep, `${one} ${JSON.stringify(source)} is given twice`);
    seen.add(source);
    // as Docker: a secret's file is /run/secrets/KEY, a config's /KEY, unless target says otherwise
    const file = { name: target || (kind === 'secrets' ? source : `/${source}`), uid, gid, mode };
    return kind === 'secrets' ? { secretId: '', secretName: obj.name, file } : { configId: '', configName: obj.name, file };
  });
}

function serviceNetworks(sp: string, key: string, v: unknown, ctx: ServiceCtx): NetworkAttachmentConfig[] {
  const p = `${sp}.networks`;
  let entries: Array<[string, unknown]>;
  if (v === undefined || v === null) entries = [['default', null]];
  else if (Array.isArray(v)) entries = v.map((n, i) => [strictStr(`${p}[${i}]`, n), null]);
  else entries = Object.entries(obj(p, v));
  const out: NetworkAttachmentConfig[] = [];
  for (const [net, cfgv] of entries) {
    const np = `${p}.${net}`;
    if (!ctx.netDefs.has(net) && net !== 'default') fail(np, `network ${JSON.stringify(net)} is not declared in the top-level networks`);
    const cfg = obj(np, cfgv);
    checkKeys(np, cfg, { mapped: ['aliases'], unsupported: ['ipv4_address', 'ipv6_address', 'link_local_ips', 'priority', 'mac_address', 'driver_opts', 'gw_priority', 'interface_name'] }, ctx.warn);
    ctx.used.add(net);
    const target = ctx.netDefs.get(net)?.name ?? `${ctx.stack}_default`;
    // as Docker: the service's key is an alias on each of its networks (other services find it by it)
    const aliases = [key, ...strList(`${np}.aliases`, cfg.aliases).filter((a) => a !== key)];
    out.push({ target, aliases });
  }
  return out;
}

function resources(p: string, v: unknown, warn: (w: string) => void): ResourceRequirements {
  const r = obj(p, v);
  checkKeys(p, r, { mapped: ['limits', 'reservations'] }, warn);
  const lim = obj(`${p}.limits`, r.limits);
  checkKeys(`${p}.limits`, lim, { mapped: ['cpus', 'memory', 'pids'], unsupported: ['devices'] }, warn);
  const res = obj(`${p}.reservations`, r.reservations);
  checkKeys(`${p}.reservations`, res, { mapped: ['cpus', 'memory'], unsupported: ['generic_resources', 'devices', 'pids'] }, warn);
  const cpus = (q: string, x: unknown): number => (x === undefined ? 0 : wrap(q, () => parseCpus('cpus', str(q, x))));
  const mem = (q: string, x: unknown): number => (x === undefined ? 0 : wrap(q, () => parseBytes('memory', str(q, x))));
  return {
    limits: { nanoCpus: cpus(`${p}.limits.cpus`, lim.cpus), memoryBytes: mem(`${p}.limits.memory`, lim.memory), pids: lim.pids === undefined ? 0 : uint(`${p}.limits.pids`, lim.pids) },
    reservations: { nanoCpus: cpus(`${p}.reservations.cpus`, res.cpus), memoryBytes: mem(`${p}.reservations.memory`, res.memory), pids: 0 },
  };
}

function restartPolicy(p: string, v: unknown, job: boolean, warn: (w: string) => void): RestartPolicy {
  const r = obj(p, v);
  checkKeys(p, r, { mapped: ['condition', 'delay', 'max_attempts', 'window'] }, warn);
  // a job's task is not restarted once it exits 0 (Swarm's default for jobs)
  let condition = job ? RestartCondition.RESTART_CONDITION_ON_FAILURE : RestartCondition.RESTART_CONDITION_ANY;
  if (r.condition !== undefined) {
    const c = strictStr(`${p}.condition`, r.condition);
    const m: Record<string, RestartCondition> = { any: RestartCondition.RESTART_CONDITION_ANY, 'on-failure': RestartCondition.RESTART_CONDITION_ON_FAILURE, none: RestartCondition.RESTART_CONDITION_NONE };
    if (m[c] === undefined) fail(`${p}.condition`, `must be none, on-failure or any, got ${JSON.stringify(c)}`);
    condition = m[c];
  }
  return {
    condition,
    delayMs: r.delay !== undefined ? duration(`${p}.delay`, r.delay, '--restart-delay') : 5000,
    maxAttempts: r.max_attempts !== undefined ? uint(`${p}.max_attempts`, r.max_attempts) : 0,
    windowMs: r.window !== undefined ? duration(`${p}.window`, r.window, '--restart-window') : 0,
  };
}

function placement(p: string, v: unknown, warn: (w: string) => void): Placement {
  const pl = obj(p, v);
  checkKeys(p, pl, { mapped: ['constraints', 'max_replicas_per_node', 'preferences'] }, warn);
  const constraints = strList(`${p}.constraints`, pl.constraints);
  for (const [i, c] of constraints.entries()) wrap(`${p}.constraints[${i}]`, () => parseConstraint(c));
  // [{spread: node.labels.zone}, ...], in order
  const preferences = list(`${p}.preferences`, pl.preferences).map((e, i) => {
    const ep = `${p}.preferences[${i}]`;
    const o = obj(ep, e);
    checkKeys(ep, o, { mapped: ['spread'] }, warn);
    if (o.spread === undefined) fail(`${ep}.spread`, 'required (e.g. spread: node.labels.zone)');
    const d = strictStr(`${ep}.spread`, o.spread);
    return { spread: wrap(`${ep}.spread`, () => parseSpread(d, 'spread').descriptor) };
  });
  return { constraints, maxReplicasPerNode: pl.max_replicas_per_node !== undefined ? uint(`${p}.max_replicas_per_node`, pl.max_replicas_per_node) : 0, preferences };
}

function updateConfig(p: string, v: unknown, isUpdate: boolean, warn: (w: string) => void): UpdateConfig {
  const u = obj(p, v);
  checkKeys(p, u, { mapped: ['parallelism', 'delay', 'failure_action', 'monitor', 'max_failure_ratio', 'order'] }, warn);
  const out = defaultUpdateConfig();
  const flag = isUpdate ? 'update' : 'rollback';
  if (u.parallelism !== undefined) out.parallelism = uint(`${p}.parallelism`, u.parallelism);
  if (u.delay !== undefined) out.delayMs = duration(`${p}.delay`, u.delay, `--${flag}-delay`);
  if (u.monitor !== undefined) out.monitorMs = duration(`${p}.monitor`, u.monitor, `--${flag}-monitor`);
  if (u.failure_action !== undefined) {
    const a = strictStr(`${p}.failure_action`, u.failure_action);
    const m: Record<string, UpdateFailureAction> = { pause: UpdateFailureAction.UPDATE_FAILURE_ACTION_PAUSE, continue: UpdateFailureAction.UPDATE_FAILURE_ACTION_CONTINUE };
    if (isUpdate) m.rollback = UpdateFailureAction.UPDATE_FAILURE_ACTION_ROLLBACK;
    if (m[a] === undefined) fail(`${p}.failure_action`, `must be ${isUpdate ? 'pause, continue or rollback' : 'pause or continue'}, got ${JSON.stringify(a)}`);
    out.failureAction = m[a];
  }
  if (u.max_failure_ratio !== undefined) {
    const x = u.max_failure_ratio;
    const n = typeof x === 'number' ? x : typeof x === 'string' && /^\d*\.?\d+$/.test(x) ? Number(x) : NaN;
    if (!(n >= 0 && n <= 1)) fail(`${p}.max_failure_ratio`, `must be a number between 0 and 1, got ${show(x)}`);
    out.maxFailureRatio = n;
  }
  if (u.order !== undefined) {
    const o = strictStr(`${p}.order`, u.order);
    if (o !== 'stop-first' && o !== 'start-first') fail(`${p}.order`, `must be stop-first or start-first, got ${JSON.stringify(o)}`);
    out.order = o === 'stop-first' ? UpdateOrder.UPDATE_ORDER_STOP_FIRST : UpdateOrder.UPDATE_ORDER_START_FIRST;
  }
  return out;
}

function healthcheck(p: string, v: unknown, warn: (w: string) => void): HealthConfig | undefined | 'none' {
  if (v === undefined || v === null) return undefined;
  const h = obj(p, v);
  checkKeys(p, h, { mapped: ['test', 'interval', 'timeout', 'retries', 'start_period', 'disable'], unsupported: ['start_interval'] }, warn);
  if (h.disable !== undefined && bool(`${p}.disable`, h.disable)) return 'none';
  let test: string[] = [];
  if (typeof h.test === 'string') test = ['CMD-SHELL', h.test];
  else if (h.test !== undefined) {
    test = strList(`${p}.test`, h.test);
    if (test.length > 0 && !['CMD', 'CMD-SHELL', 'NONE'].includes(test[0]!)) fail(`${p}.test`, `a list must start with CMD, CMD-SHELL or NONE, got ${JSON.stringify(test[0])}`);
    if (test[0] === 'NONE') return 'none';
  }
  return {
    test,
    intervalMs: h.interval !== undefined ? duration(`${p}.interval`, h.interval, '--health-interval') : 0,
    timeoutMs: h.timeout !== undefined ? duration(`${p}.timeout`, h.timeout, '--health-timeout') : 0,
    startPeriodMs: h.start_period !== undefined ? duration(`${p}.start_period`, h.start_period, '--health-start-period') : 0,
    retries: h.retries !== undefined ? uint(`${p}.retries`, h.retries) : 0,
  };
}

/** Compose ports, short ("8080:80", "80", "8000-8001:80-81/udp") and long ({target, published, protocol, mode}). */
export function parsePorts(p: string, v: unknown, warn: (w: string) => void = () => {}): PortConfig[] {
  const out: PortConfig[] = [];
  const port = (q: string, x: unknown, allowZero = false): number => {
    const n = uint(q, x);
    if (n > 65535 || (!allowZero && n === 0)) fail(q, `must be a port number between 1 and 65535, got ${show(x)}`);
    return n;
  };
  for (const [i, e] of list(p, v).entries()) {
    const ep = `${p}[${i}]`;
    if (isObj(e)) {
      checkKeys(ep, e, { mapped: ['target', 'published', 'protocol', 'mode', 'name'], unsupported: ['host_ip', 'app_protocol'] }, warn);
      const protocol = e.protocol === undefined ? 'tcp' : strictStr(`${ep}.protocol`, e.protocol);
      if (protocol !== 'tcp' && protocol !== 'udp') fail(`${ep}.protocol`, `must be tcp or udp, got ${JSON.stringify(protocol)}`);
      const mode = e.mode === undefined ? 'ingress' : strictStr(`${ep}.mode`, e.mode);
      if (mode !== 'ingress' && mode !== 'host') fail(`${ep}.mode`, `must be ingress or host, got ${JSON.stringify(mode)}`);
      if (e.target === undefined) fail(`${ep}.target`, 'required');
      out.push({
        name: e.name !== undefined ? strictStr(`${ep}.name`, e.name) : '',
        protocol: protocol === 'udp' ? PortProtocol.PORT_PROTOCOL_UDP : PortProtocol.PORT_PROTOCOL_TCP,
        targetPort: port(`${ep}.target`, e.target),
        publishedPort: e.published === undefined ? 0 : port(`${ep}.published`, e.published),
        publishMode: mode === 'host' ? PublishMode.PUBLISH_MODE_HOST : PublishMode.PUBLISH_MODE_INGRESS,
        localOnly: false,
      });
      continue;
    }
    const s = str(ep, e);
    const m = /^(?:(\d+)(?:-(\d+))?:)?(\d+)(?:-(\d+))?(?:\/(tcp|udp))?$/.exec(s);
    if (!m) fail(ep, `expected [PUBLISHED:]TARGET[/PROTOCOL] (host addresses are not supported in a stack), got ${JSON.stringify(s)}`);
    const tFrom = port(ep, m[3]);
    const tTo = m[4] !== undefined ? port(ep, m[4]) : tFrom;
    const pFrom = m[1] !== undefined ? port(ep, m[1]) : 0;
    const pTo = m[2] !== undefined ? port(ep, m[2]) : pFrom;
    if (tTo < tFrom || pTo < pFrom || (pFrom && pTo - pFrom !== tTo - tFrom)) fail(ep, `the published and target ranges must have the same length, got ${JSON.stringify(s)}`);
    for (let k = 0; k <= tTo - tFrom; k++)
      out.push({
        name: '',
        protocol: m[5] === 'udp' ? PortProtocol.PORT_PROTOCOL_UDP : PortProtocol.PORT_PROTOCOL_TCP,
        targetPort: tFrom + k,
        publishedPort: pFrom ? pFrom + k : 0,
        publishMode: PublishMode.PUBLISH_MODE_INGRESS,
        localOnly: false,
      });
  }
  return out;
}

// ---- volumes and the container options (docs/volumes.md)

function translateVolume(p: string, key: string, rawv: unknown, scoped: (k: string) => string, ns: Record<string, string>, warn: (w: string) => void): StackVolume {
  const raw = obj(p, rawv);
  checkKeys(p, raw, { mapped: ['driver', 'driver_opts', 'external', 'name', 'labels'] }, warn);
  const ext = externalName(p, raw);
  const given = raw.name !== undefined ? strictStr(`${p}.name`, raw.name) : undefined;
  if (ext.external) {
    for (const k of ['driver', 'driver_opts', 'labels']) if (raw[k] !== undefined) fail(`${p}.${k}`, 'cannot be set on an external volume');
    return { key, name: given ?? ext.name ?? key, external: true, opts: {}, labels: {} };
  }
  const name = given ?? scoped(key);
  if (!VOLUME_NAME.test(name)) fail(p, `the volume name ${JSON.stringify(name)} is not valid (1-255 letters, digits, "_", "." or "-")`);
  if (raw.driver !== undefined && raw.driver !== 'local') fail(`${p}.driver`, `only the local driver is supported, got ${show(raw.driver)}`);
  const opts: Record<string, string> = {};
  for (const [k, v] of Object.entries(obj(`${p}.driver_opts`, raw.driver_opts))) {
    if (!VOLUME_OPT_KEYS.includes(k)) fail(`${p}.driver_opts.${k}`, `unknown option (the local driver takes ${VOLUME_OPT_KEYS.join(', ')})`);
    opts[k] = str(`${p}.driver_opts.${k}`, v);
  }
  return { key, name, external: false, opts, labels: { ...labelMap(`${p}.labels`, raw.labels), ...ns } };
}

/** A named volume of a mount: declared in the top-level volumes, named and configured from there. */
function namedVolume(p: string, m: MountOpt, ctx: ServiceCtx): void {
  if (m.type !== 'volume' || m.source === '') return;
  const v = ctx.volumes.get(m.source);
  if (!v) fail(p, `volume ${JSON.stringify(m.source)} is not declared in the top-level volumes`);
  m.source = v.name;
  if (!v.external) {
    m.volumeOpts = { ...v.opts };
    m.volumeLabels = { ...v.labels };
  }
}

function serviceMounts(sp: string, raw: Obj, ctx: ServiceCtx): MountOpt[] {
  const p = `${sp}.volumes`;
  const out: MountOpt[] = [];
  for (const [i, e] of list(p, raw.volumes).entries()) {
    const ep = `${p}[${i}]`;
    let m: MountOpt;
    if (isObj(e)) {
      checkKeys(ep, e, { mapped: ['type', 'source', 'target', 'read_only', 'volume', 'tmpfs', 'bind'], unsupported: ['consistency', 'image'] }, ctx.warn);
      m = emptyMount();
      m.type = e.type === undefined ? 'volume' : strictStr(`${ep}.type`, e.type);
      if (m.type !== 'volume' && m.type !== 'bind' && m.type !== 'tmpfs') fail(`${ep}.type`, `must be volume, bind or tmpfs, got ${JSON.stringify(m.type)}`);
      if (e.source !== undefined && e.source !== null) m.source = strictStr(`${ep}.source`, e.source);
      if (e.target === undefined) fail(`${ep}.target`, 'required');
      m.target = strictStr(`${ep}.target`, e.target);
      if (e.read_only !== undefined) m.readonly = bool(`${ep}.read_only`, e.read_only);
      const vol = obj(`${ep}.volume`, e.volume);
      checkKeys(`${ep}.volume`, vol, { mapped: ['nocopy'], unsupported: ['subpath'] }, ctx.warn);
      if (vol.nocopy !== undefined) m.volumeNocopy = bool(`${ep}.volume.nocopy`, vol.nocopy);
      const tmp = obj(`${ep}.tmpfs`, e.tmpfs);
      checkKeys(`${ep}.tmpfs`, tmp, { mapped: ['size', 'mode'] }, ctx.warn);
      if (tmp.size !== undefined) m.tmpfsSizeBytes = wrap(`${ep}.tmpfs.size`, () => parseBytes('size', str(`${ep}.tmpfs.size`, tmp.size)));
      if (tmp.mode !== undefined) m.tmpfsMode = fileMode(`${ep}.tmpfs.mode`, tmp.mode, 0o7777);
      const bind = obj(`${ep}.bind`, e.bind);
      checkKeys(`${ep}.bind`, bind, { mapped: [], unsupported: ['propagation', 'create_host_path', 'selinux', 'recursive'] }, ctx.warn);
      if (m.type === 'bind' && m.source) m.source = hostPath(m.source, ctx.opts.baseDir);
    } else {
      const s = strictStr(ep, e);
      // as Compose: a relative or ~ host path is a bind mount from the file's folder or the home
      const parts = s.split(':');
      if (parts.length >= 2 && /^(\.|~)/.test(parts[0]!)) parts[0] = hostPath(parts[0]!, ctx.opts.baseDir);
      m = wrap(ep, () => parseVolumeShort('volume', parts.join(':')));
    }
    namedVolume(ep, m, ctx);
    out.push(m);
  }
  // the tmpfs key: paths (no options in a stack, as Docker)
  const tmpfs = raw.tmpfs === undefined || raw.tmpfs === null ? [] : typeof raw.tmpfs === 'string' ? [raw.tmpfs] : strList(`${sp}.tmpfs`, raw.tmpfs);
  for (const [i, t] of tmpfs.entries()) {
    if (t.includes(':')) fail(`${sp}.tmpfs[${i}]`, `options are not supported here (use a volumes entry of type tmpfs with tmpfs.size), got ${JSON.stringify(t)}`);
    out.push({ ...emptyMount(), type: 'tmpfs', target: t });
  }
  return out;
}

function hostPath(s: string, baseDir: string): string {
  if (s.startsWith('~')) return path.join(process.env.HOME ?? '/', s.slice(1));
  return path.resolve(baseDir, s);
}

function fileMode(p: string, v: unknown, max: number): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^0?o?[0-7]{1,5}$/.test(v) ? parseInt(v.replace(/^0?o/, ''), 8) : NaN;
  if (!Number.isInteger(n) || n < 0 || n > max) fail(p, `must be an octal file mode such as 0440 (at most 0${max.toString(8)}), got ${show(v)}`);
  return n;
}

/** One string or a list of strings. */
function oneOrList(p: string, v: unknown): string[] {
  if (v === undefined || v === null) return [];
  if (typeof v === 'string') return [v];
  return strList(p, v);
}

function containerOptions(sp: string, raw: Obj, ctx: ServiceCtx): Pick<
  ContainerSpec,
  'mounts' | 'capAdd' | 'capDrop' | 'readOnly' | 'init' | 'ulimits' | 'sysctls' | 'stopSignal' | 'dnsConfig' | 'hosts' | 'groups' | 'tty'
> {
  const caps = (k: string): string[] => [...new Set(strList(`${sp}.${k}`, raw[k]).map((c, i) => wrap(`${sp}.${k}[${i}]`, () => normaliseCap(k, c))))];
  const ulimits: Ulimit[] = [];
  for (const [name, v] of Object.entries(obj(`${sp}.ulimits`, raw.ulimits))) {
    const up = `${sp}.ulimits.${name}`;
    let soft: number;
    let hard: number;
    if (isObj(v)) {
      checkKeys(up, v, { mapped: ['soft', 'hard'] }, ctx.warn);
      soft = limit(`${up}.soft`, v.soft);
      hard = limit(`${up}.hard`, v.hard);
    } else soft = hard = limit(up, v);
    ulimits.push({ name, soft, hard });
  }
  ulimits.sort((a, b) => a.name.localeCompare(b.name));
  const sysctls = Object.fromEntries(
    Object.entries(kvMap(`${sp}.sysctls`, raw.sysctls))
      .map(([k, v]) => [k, v ?? ''] as const)
      .sort(([a], [b]) => a.localeCompare(b)),
  );
  const dns = { nameservers: oneOrList(`${sp}.dns`, raw.dns), search: oneOrList(`${sp}.dns_search`, raw.dns_search), options: oneOrList(`${sp}.dns_opt`, raw.dns_opt) };
  let hosts: string[] = [];
  if (isObj(raw.extra_hosts)) hosts = Object.entries(raw.extra_hosts).map(([h, ip]) => wrap(`${sp}.extra_hosts.${h}`, () => parseExtraHost('extra_hosts', `${h}=${str(`${sp}.extra_hosts.${h}`, ip)}`)));
  else hosts = strList(`${sp}.extra_hosts`, raw.extra_hosts).map((e, i) => wrap(`${sp}.extra_hosts[${i}]`, () => parseExtraHost('extra_hosts', e)));
  return {
    mounts: serviceMounts(sp, raw, ctx),
    capAdd: caps('cap_add'),
    capDrop: caps('cap_drop'),
    readOnly: raw.read_only !== undefined ? bool(`${sp}.read_only`, raw.read_only) : false,
    init: raw.init !== undefined ? bool(`${sp}.init`, raw.init) : false,
    ulimits,
    sysctls,
    stopSignal: raw.stop_signal !== undefined ? wrap(`${sp}.stop_signal`, () => normaliseSignal('stop_signal', strictStr(`${sp}.stop_signal`, raw.stop_signal))) : '',
    dnsConfig: dns.nameservers.length || dns.search.length || dns.options.length ? dns : undefined,
    hosts,
    groups: strList(`${sp}.group_add`, raw.group_add),
    tty: raw.tty !== undefined ? bool(`${sp}.tty`, raw.tty) : false,
  };
}

function limit(p: string, v: unknown): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^-?\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < -1) fail(p, `must be a whole number (-1: unlimited), got ${show(v)}`);
  return n;
}
