/**
 * Parsing and validation of the container options Docker's `service create` / `run` take beyond the
 * basics: --mount / -v, --cap-add/--cap-drop, --ulimit, --sysctl, --stop-signal, --hostname templates,
 * --dns*, --host (extra hosts), --group, --env-file. Shared by the CLI (flags), the control API
 * (validateServiceSpec), the agent (templates) and the runtime (spec), so a value is judged the same way
 * everywhere. Pure except readEnvFile. Errors are INVALID_ARGUMENT naming the flag and the value.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { invalidArgument } from './errors.js';
import { parseBytes } from './units.js';

// ------------------------------------------------------------------------------------------------ mounts

export type MountType = 'volume' | 'bind' | 'tmpfs';

/** A mount as the spec (proto Mount) and the runtime carry it. */
export interface MountOpt {
  type: string;
  source: string;
  target: string;
  readonly: boolean;
  volumeOpts: Record<string, string>;
  volumeLabels: Record<string, string>;
  tmpfsSizeBytes: number;
  tmpfsMode: number;
  volumeNocopy: boolean;
}

/** Volume names as Docker's local driver accepts them. */
export const VOLUME_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$/;

/** Local-driver options a volume may have (Docker's: the file system to mount, its device and options). */
export const VOLUME_OPT_KEYS = ['type', 'device', 'o'];

function parseBool(flag: string, key: string, v: string | undefined): boolean {
  if (v === undefined || v === '' || v === 'true' || v === '1') return true;
  if (v === 'false' || v === '0') return false;
  throw invalidArgument(flag, `${key}=${v}`, `${key} takes true or false`);
}

/** Splits Docker's CSV mount syntax: commas separate fields; a field may be quoted ("a,b"). */
function csvFields(v: string): string[] {
  const out: string[] = [];
  let cur = '';
  let q = false;
  for (const ch of v) {
    if (ch === '"') q = !q;
    else if (ch === ',' && !q) {
      out.push(cur);
      cur = '';
    } else cur += ch;
  }
  out.push(cur);
  return out.map((f) => f.trim()).filter((f) => f !== '');
}

function kv(flag: string, field: string): [string, string] {
  const i = field.indexOf('=');
  if (i <= 0) throw invalidArgument(flag, field, 'expected KEY=VALUE');
  return [field.slice(0, i), field.slice(i + 1)];
}

export function emptyMount(): MountOpt {
  return { type: '', source: '', target: '', readonly: false, volumeOpts: {}, volumeLabels: {}, tmpfsSizeBytes: 0, tmpfsMode: 0, volumeNocopy: false };
}

/**
 * Docker's --mount: type=volume|bind|tmpfs, source|src, target|destination|dst, readonly|ro,
 * volume-opt=K=V, volume-label=K=V, volume-nocopy, tmpfs-size, tmpfs-mode (octal).
 */
export function parseMount(flag: string, v: string): MountOpt {
  const m = emptyMount();
  m.type = 'volume';
  for (const field of csvFields(v)) {
    const i = field.indexOf('=');
    const key = (i < 0 ? field : field.slice(0, i)).toLowerCase();
    const val = i < 0 ? undefined : field.slice(i + 1);
    const need = (): string => {
      if (val === undefined) throw invalidArgument(flag, field, `${key} needs a value (${key}=...)`);
      return val;
    };
    switch (key) {
      case 'type':
        m.type = need();
        break;
      case 'source':
      case 'src':
        m.source = need();
        break;
      case 'target':
      case 'destination':
      case 'dst':
        m.target = need();
        break;
      case 'readonly':
      case 'ro':
        m.readonly = parseBool(flag, key, val);
        break;
      case 'volume-opt': {
        const [k, x] = kv(flag, need());
        m.volumeOpts[k] = x;
        break;
      }
      case 'volume-label': {
        const [k, x] = kv(flag, need());
        m.volumeLabels[k] = x;
        break;
      }
      case 'volume-nocopy':
        m.volumeNocopy = parseBool(flag, key, val);
        break;
      case 'tmpfs-size':
        m.tmpfsSizeBytes = parseBytes(`${flag} tmpfs-size`, need());
        break;
      case 'tmpfs-mode': {
        const s = need();
        if (!/^0?[0-7]{1,4}$/.test(s)) throw invalidArgument(flag, field, 'tmpfs-mode is octal permission bits, e.g. 1770');
        m.tmpfsMode = parseInt(s, 8);
        break;
      }
      case 'bind-propagation':
      case 'consistency':
        throw invalidArgument(flag, field, `${key} is not supported`);
      default:
        throw invalidArgument(flag, field, 'unknown mount option (type, source, target, readonly, volume-opt, volume-label, volume-nocopy, tmpfs-size, tmpfs-mode)');
    }
  }
  validateMount(flag, m);
  return m;
}

/**
 * Docker's -v short form: NAME:/path[:ro|rw] (a named volume), /host/path:/path[:ro|rw] (a bind),
 * /path (an anonymous volume).
 */
export function parseVolumeShort(flag: string, v: string): MountOpt {
  const parts = v.split(':');
  const m = emptyMount();
  if (parts.length === 1) {
    m.type = 'volume';
    m.target = parts[0]!;
  } else if (parts.length === 2 || parts.length === 3) {
    m.source = parts[0]!;
    m.target = parts[1]!;
    m.type = m.source.startsWith('/') ? 'bind' : 'volume';
    const mode = parts[2];
    if (mode !== undefined) {
      for (const o of mode.split(',')) {
        if (o === 'ro') m.readonly = true;
        else if (o === 'rw') m.readonly = false;
        else if (o === 'nocopy' && m.type === 'volume') m.volumeNocopy = true;
        else throw invalidArgument(flag, v, `unknown mode ${JSON.stringify(o)} (use ro or rw)`);
      }
    }
  } else throw invalidArgument(flag, v, 'expected [SOURCE:]TARGET[:ro]');
  validateMount(flag, m);
  return m;
}

/** Checks one mount; `field` names it in errors. */
export function validateMount(field: string, m: MountOpt): void {
  const show = `type=${m.type},source=${m.source},target=${m.target}`;
  if (m.type !== 'volume' && m.type !== 'bind' && m.type !== 'tmpfs') throw invalidArgument(field, m.type, 'mount type must be volume, bind or tmpfs');
  if (!m.target) throw invalidArgument(field, show, 'a target (the path in the container) is required');
  if (!path.isAbsolute(m.target) || m.target.includes('\0')) throw invalidArgument(field, m.target, 'the target must be an absolute path');
  if (path.posix.normalize(m.target) === '/') throw invalidArgument(field, m.target, 'cannot mount over the root file system');
  if (m.type === 'bind') {
    if (!m.source) throw invalidArgument(field, show, 'a bind mount needs a source (an absolute host path)');
    if (!path.isAbsolute(m.source) || m.source.includes('\0')) throw invalidArgument(field, m.source, 'the source of a bind mount must be an absolute host path');
  }
  if (m.type === 'volume' && m.source !== '' && !VOLUME_NAME.test(m.source)) {
    throw invalidArgument(field, m.source, 'a volume name is 1-255 letters, digits, "_", "." or "-", starting with a letter or digit');
  }
  if (m.type === 'tmpfs' && m.source !== '') throw invalidArgument(field, m.source, 'a tmpfs mount takes no source');
  if (m.type !== 'volume' && (Object.keys(m.volumeOpts).length > 0 || Object.keys(m.volumeLabels).length > 0 || m.volumeNocopy)) {
    throw invalidArgument(field, show, 'volume-opt, volume-label and volume-nocopy are for type=volume');
  }
  if (m.type !== 'tmpfs' && (m.tmpfsSizeBytes !== 0 || m.tmpfsMode !== 0)) throw invalidArgument(field, show, 'tmpfs-size and tmpfs-mode are for type=tmpfs');
  if (!Number.isSafeInteger(m.tmpfsSizeBytes) || m.tmpfsSizeBytes < 0) throw invalidArgument(field, m.tmpfsSizeBytes, 'tmpfs-size must be a positive size');
  if (!Number.isInteger(m.tmpfsMode) || m.tmpfsMode < 0 || m.tmpfsMode > 0o7777) throw invalidArgument(field, m.tmpfsMode, 'tmpfs-mode must be permission bits (at most 7777 octal)');
  for (const k of Object.keys(m.volumeOpts)) {
    if (!VOLUME_OPT_KEYS.includes(k)) throw invalidArgument(field, `volume-opt=${k}`, `the local driver takes ${VOLUME_OPT_KEYS.join(', ')}`);
  }
}

/** Checks a list of mounts: each valid, no two at one target. */
export function validateMounts(field: string, mounts: MountOpt[]): void {
  const seen = new Set<string>();
  for (const m of mounts) {
    validateMount(field, m);
    const t = path.posix.normalize(m.target).replace(/\/$/, '');
    if (seen.has(t)) throw invalidArgument(field, m.target, 'two mounts have this target');
    seen.add(t);
  }
}

// ------------------------------------------------------------------------------------------------ capabilities

/** The capabilities the kernel knows (linux/capability.h), without the CAP_ prefix. */
export const ALL_CAPABILITIES = [
  'CHOWN', 'DAC_OVERRIDE', 'DAC_READ_SEARCH', 'FOWNER', 'FSETID', 'KILL', 'SETGID', 'SETUID', 'SETPCAP', 'LINUX_IMMUTABLE',
  'NET_BIND_SERVICE', 'NET_BROADCAST', 'NET_ADMIN', 'NET_RAW', 'IPC_LOCK', 'IPC_OWNER', 'SYS_MODULE', 'SYS_RAWIO', 'SYS_CHROOT',
  'SYS_PTRACE', 'SYS_PACCT', 'SYS_ADMIN', 'SYS_BOOT', 'SYS_NICE', 'SYS_RESOURCE', 'SYS_TIME', 'SYS_TTY_CONFIG', 'MKNOD', 'LEASE',
  'AUDIT_WRITE', 'AUDIT_CONTROL', 'SETFCAP', 'MAC_OVERRIDE', 'MAC_ADMIN', 'SYSLOG', 'WAKE_ALARM', 'BLOCK_SUSPEND', 'AUDIT_READ',
  'PERFMON', 'BPF', 'CHECKPOINT_RESTORE',
].map((c) => `CAP_${c}`);

/** Normalises a capability name ("net_admin", "CAP_NET_ADMIN" → "CAP_NET_ADMIN"; "all" → "ALL"). */
export function normaliseCap(field: string, c: string): string {
  const u = c.trim().toUpperCase();
  if (u === 'ALL') return 'ALL';
  const name = u.startsWith('CAP_') ? u : `CAP_${u}`;
  if (!ALL_CAPABILITIES.includes(name)) throw invalidArgument(field, c, 'unknown capability (e.g. NET_ADMIN, SYS_TIME, ALL)');
  return name;
}

/** Docker's rule: start from the defaults (or none when ALL is dropped), drop, then add (ALL adds every one). */
export function effectiveCaps(defaults: string[], add: string[], drop: string[]): string[] {
  const a = add.map((c) => normaliseCap('cap-add', c));
  const d = drop.map((c) => normaliseCap('cap-drop', c));
  let caps = d.includes('ALL') ? [] : defaults.filter((c) => !d.includes(c));
  if (a.includes('ALL')) caps = [...ALL_CAPABILITIES];
  for (const c of a) if (c !== 'ALL' && !caps.includes(c)) caps.push(c);
  return caps;
}

// ------------------------------------------------------------------------------------------------ ulimits

/** Docker's ulimit names → the OCI rlimit types. */
export const ULIMITS: Record<string, string> = {
  core: 'RLIMIT_CORE',
  cpu: 'RLIMIT_CPU',
  data: 'RLIMIT_DATA',
  fsize: 'RLIMIT_FSIZE',
  locks: 'RLIMIT_LOCKS',
  memlock: 'RLIMIT_MEMLOCK',
  msgqueue: 'RLIMIT_MSGQUEUE',
  nice: 'RLIMIT_NICE',
  nofile: 'RLIMIT_NOFILE',
  nproc: 'RLIMIT_NPROC',
  rss: 'RLIMIT_RSS',
  rtprio: 'RLIMIT_RTPRIO',
  rttime: 'RLIMIT_RTTIME',
  sigpending: 'RLIMIT_SIGPENDING',
  stack: 'RLIMIT_STACK',
};

export interface UlimitOpt {
  name: string;
  soft: number;
  hard: number;
}

/** Docker's --ulimit NAME=SOFT[:HARD] (-1 for unlimited). */
export function parseUlimit(flag: string, v: string): UlimitOpt {
  const m = /^([a-z]+)=(-?\d+)(?::(-?\d+))?$/.exec(v.trim());
  if (!m) throw invalidArgument(flag, v, 'expected NAME=SOFT[:HARD], e.g. nofile=1024:2048');
  const u = { name: m[1]!, soft: Number(m[2]), hard: Number(m[3] ?? m[2]) };
  validateUlimit(flag, u);
  return u;
}

export function validateUlimit(field: string, u: UlimitOpt): void {
  const show = `${u.name}=${u.soft}:${u.hard}`;
  if (ULIMITS[u.name] === undefined) throw invalidArgument(field, u.name, `unknown ulimit (${Object.keys(ULIMITS).join(', ')})`);
  for (const n of [u.soft, u.hard]) if (!Number.isSafeInteger(n) || n < -1) throw invalidArgument(field, show, 'limits are whole numbers (-1: unlimited)');
  const big = (n: number): number => (n === -1 ? Number.MAX_SAFE_INTEGER : n);
  if (big(u.soft) > big(u.hard)) throw invalidArgument(field, show, 'the soft limit cannot be above the hard limit');
}

// ------------------------------------------------------------------------------------------------ sysctls

/**
 * Whether a sysctl is namespaced (so setting it in a container touches only that container), as Docker
 * allows them: IPC (kernel.msg*, kernel.sem, kernel.shm*, fs.mqueue.*), UTS (kernel.hostname and
 * kernel.domainname are set otherwise) and network (net.*, not with the host's network).
 */
export function sysctlNamespace(key: string): 'ipc' | 'net' | undefined {
  if (/^kernel\.(msgmax|msgmnb|msgmni|sem|shmall|shmmax|shmmni|shm_rmid_forced)$/.test(key) || /^fs\.mqueue\.[a-z_]+$/.test(key)) return 'ipc';
  if (/^net\.[a-zA-Z0-9_.-]+$/.test(key)) return 'net';
  return undefined;
}

export function validateSysctl(field: string, key: string, value: string, hostNetwork = false): void {
  const ns = sysctlNamespace(key);
  if (!ns) throw invalidArgument(field, key, 'not a namespaced sysctl (allowed: net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*)');
  if (ns === 'net' && hostNetwork) throw invalidArgument(field, key, 'net.* sysctls cannot be set with the host network');
  if (value === '' || /[\n\0]/.test(value) || value.length > 256) throw invalidArgument(field, `${key}=${value}`, 'expected a value');
}

export function parseSysctl(flag: string, v: string): [string, string] {
  const i = v.indexOf('=');
  if (i <= 0) throw invalidArgument(flag, v, 'expected KEY=VALUE, e.g. net.core.somaxconn=1024');
  const k = v.slice(0, i).trim();
  const val = v.slice(i + 1).trim();
  validateSysctl(flag, k, val);
  return [k, val];
}

// ------------------------------------------------------------------------------------------------ signals

const SIGNALS = os.constants.signals as Record<string, number>;

/** A signal ("TERM", "SIGTERM", "15") as its canonical name, e.g. "SIGTERM". */
export function normaliseSignal(field: string, sig: string): string {
  const s = sig.trim().toUpperCase();
  if (/^\d+$/.test(s)) {
    const n = Number(s);
    const name = Object.keys(SIGNALS).find((k) => SIGNALS[k] === n);
    if (!name) throw invalidArgument(field, sig, 'unknown signal number');
    return name;
  }
  const name = s.startsWith('SIG') ? s : `SIG${s}`;
  if (SIGNALS[name] === undefined) throw invalidArgument(field, sig, 'unknown signal (use e.g. SIGTERM, SIGINT, SIGQUIT or a number)');
  return name;
}

// ------------------------------------------------------------------------------------------------ hostname templates

/** The values a --hostname template may use (Swarm's). */
export interface TemplateContext {
  serviceId: string;
  serviceName: string;
  taskId: string;
  taskName: string;
  taskSlot: string;
  nodeId: string;
  nodeHostname: string;
}

const TEMPLATE_FIELDS: Record<string, keyof TemplateContext> = {
  'Service.ID': 'serviceId',
  'Service.Name': 'serviceName',
  'Task.ID': 'taskId',
  'Task.Name': 'taskName',
  'Task.Slot': 'taskSlot',
  'Node.ID': 'nodeId',
  'Node.Hostname': 'nodeHostname',
};

const PLACEHOLDER = /\{\{\s*\.([A-Za-z.]+)\s*\}\}/g;

/** Checks a template: every {{...}} names a known field and no stray braces remain. */
export function validateTemplate(field: string, t: string): void {
  const rest = t.replace(PLACEHOLDER, (_all, name: string) => {
    if (TEMPLATE_FIELDS[name] === undefined) throw invalidArgument(field, t, `unknown template field .${name} (known: ${Object.keys(TEMPLATE_FIELDS).map((k) => `{{.${k}}}`).join(', ')})`);
    return 'x';
  });
  if (rest.includes('{{') || rest.includes('}}')) throw invalidArgument(field, t, 'malformed template (expected e.g. {{.Service.Name}}-{{.Task.Slot}})');
  if (rest.length > 253 || /[\s\0/]/.test(rest)) throw invalidArgument(field, t, 'not a valid host name');
}

export function expandTemplate(t: string, ctx: TemplateContext): string {
  return t.replace(PLACEHOLDER, (_all, name: string) => {
    const k = TEMPLATE_FIELDS[name];
    return k === undefined ? '' : ctx[k];
  });
}

// ------------------------------------------------------------------------------------------------ dns, hosts, groups

export function validateNameserver(field: string, v: string): void {
  if (net.isIP(v) === 0) throw invalidArgument(field, v, 'a name server is an IP address');
}

export function validateSearchDomain(field: string, v: string): void {
  if (!/^[a-zA-Z0-9.-]{1,253}$/.test(v) && v !== '.') throw invalidArgument(field, v, 'not a valid search domain');
}

export function validateDnsOption(field: string, v: string): void {
  if (!/^[a-z0-9_-]+(:[0-9]+)?$/i.test(v)) throw invalidArgument(field, v, 'expected a resolv.conf option, e.g. ndots:2, timeout:1, use-vc');
}

/** Docker's --host HOST:IP (or HOST=IP) → the spec's "IP HOST" form. IPv6 addresses keep their colons. */
export function parseExtraHost(flag: string, v: string): string {
  const i = v.search(/[:=]/);
  if (i <= 0) throw invalidArgument(flag, v, 'expected HOST:IP');
  const host = v.slice(0, i);
  const ip = v.slice(i + 1).replace(/^\[(.*)\]$/, '$1');
  const entry = `${ip} ${host}`;
  validateHostsEntry(flag, entry);
  return entry;
}

/** A spec hosts entry: "IP HOST [ALIAS...]". */
export function validateHostsEntry(field: string, e: string): void {
  const parts = e.trim().split(/\s+/);
  if (parts.length < 2 || net.isIP(parts[0]!) === 0) throw invalidArgument(field, e, 'expected an IP address and a host name');
  for (const h of parts.slice(1)) if (!/^[a-zA-Z0-9_]([a-zA-Z0-9_.-]{0,252})$/.test(h)) throw invalidArgument(field, h, 'not a valid host name');
}

/** The host name of a hosts entry (what --host-rm matches). */
export function hostsEntryName(e: string): string {
  return e.trim().split(/\s+/)[1] ?? '';
}

export function validateGroup(field: string, g: string): void {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$/.test(g)) throw invalidArgument(field, g, 'expected a group name or GID');
}

// ------------------------------------------------------------------------------------------------ env files

/** Docker's --env-file: KEY=VALUE lines; # comments and blank lines skipped; a bare KEY takes our environment's value. */
export function readEnvFile(flag: string, file: string): string[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw invalidArgument(flag, file, (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : `cannot read it: ${(err as Error).message}`);
  }
  const out: string[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.replace(/^\s+/, '');
    if (line === '' || line.startsWith('#')) return;
    const eq = line.indexOf('=');
    const key = eq < 0 ? line.trimEnd() : line.slice(0, eq);
    if (key === '' || /\s/.test(key)) throw invalidArgument(flag, `${file}:${i + 1}`, `bad variable name ${JSON.stringify(key)}`);
    if (eq >= 0) out.push(line);
    else if (process.env[key] !== undefined) out.push(`${key}=${process.env[key]}`);
  });
  return out;
}
