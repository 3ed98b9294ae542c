/**
 * The OCI runtime spec (config.json) flotilla gives runc: a secure default (Docker's capability set,
 * no new privileges, masked and read-only /proc and /sys paths, default devices only, its own
 * namespaces) plus the options of one container. Pure: no I/O here.
 */
import type { ImageConfig } from './types.js';
import type { OciSeccomp } from './seccomp.js';

export const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** Docker's default capability set. */
export const DEFAULT_CAPABILITIES = [
  'CAP_CHOWN',
  'CAP_DAC_OVERRIDE',
  'CAP_FSETID',
  'CAP_FOWNER',
  'CAP_MKNOD',
  'CAP_NET_RAW',
  'CAP_SETGID',
  'CAP_SETUID',
  'CAP_SETFCAP',
  'CAP_SETPCAP',
  'CAP_NET_BIND_SERVICE',
  'CAP_SYS_CHROOT',
  'CAP_KILL',
  'CAP_AUDIT_WRITE',
];

export const MASKED_PATHS = [
  '/proc/asound',
  '/proc/acpi',
  '/proc/kcore',
  '/proc/keys',
  '/proc/latency_stats',
  '/proc/timer_list',
  '/proc/timer_stats',
  '/proc/sched_debug',
  '/proc/scsi',
  '/sys/firmware',
  '/sys/devices/virtual/powercap',
];

export const READONLY_PATHS = ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'];

export const CPU_PERIOD_US = 100_000;

export type NetworkMode = 'private' | 'host' | 'none';

export interface OciMount {
  destination: string;
  type: string;
  source: string;
  options: string[];
}

export interface OciProcess {
  terminal: boolean;
  user: { uid: number; gid: number; additionalGids?: number[] };
  args: string[];
  env: string[];
  cwd: string;
  capabilities: { bounding: string[]; effective: string[]; permitted: string[]; inheritable: string[]; ambient: string[] };
  rlimits: { type: string; hard: number; soft: number }[];
  noNewPrivileges: boolean;
  oomScoreAdj?: number;
}

export interface OciSpec {
  ociVersion: string;
  process: OciProcess;
  root: { path: string; readonly: boolean };
  hostname: string;
  mounts: OciMount[];
  linux: {
    cgroupsPath: string;
    namespaces: { type: string; path?: string }[];
    resources: {
      devices: { allow: boolean; access: string; type?: string; major?: number; minor?: number }[];
      memory?: { limit: number; swap?: number };
      cpu?: { quota: number; period: number };
      pids?: { limit: number };
    };
    maskedPaths: string[];
    readonlyPaths: string[];
    seccomp?: OciSeccomp;
    sysctl?: Record<string, string>;
  };
  annotations?: Record<string, string>;
}

export interface SpecOptions {
  args: string[];
  env: string[];
  cwd: string;
  uid: number;
  gid: number;
  additionalGids?: number[];
  hostname: string;
  /** root file system path, relative to the bundle or absolute */
  rootfs: string;
  cgroupsPath: string;
  network: NetworkMode;
  /** with network 'private': join this network namespace (made by agent/network) instead of a new one */
  netnsPath?: string;
  memoryBytes?: number;
  nanoCpus?: number;
  pidsLimit?: number;
  /**
   * the root file system as a mount runc makes itself (an overlay onto the empty `rootfs` directory) in
   * the container's mount namespace; absent when rootfs is already mounted
   */
  rootMount?: { type: string; source: string; options: string[] };
  /** the seccomp filter; none when undefined (`--security-opt seccomp=unconfined`) */
  seccomp?: OciSeccomp;
  /** host files bind-mounted read-only at /etc/hosts, /etc/resolv.conf, /etc/hostname */
  etc?: { hosts?: string; resolvConf?: string; hostname?: string };
  /** host files (secrets, configs) bind-mounted read-only at their destination, after the /etc files */
  files?: { destination: string; source: string }[];
  annotations?: Record<string, string>;
  /** the process's capabilities (bounding = effective = permitted); default DEFAULT_CAPABILITIES */
  capabilities?: string[];
  readonlyRoot?: boolean;
  /** rlimits by OCI type (RLIMIT_NOFILE ...), over the default RLIMIT_NOFILE 1024 */
  rlimits?: { type: string; soft: number; hard: number }[];
  sysctl?: Record<string, string>;
  terminal?: boolean;
  /** the user's mounts (volumes, binds, tmpfs), last: over everything else */
  mounts?: OciMount[];
}

/** The in-container path the init binary is bind-mounted at (Docker's). */
export const INIT_PATH = '/sbin/docker-init';

/** Converts nano CPUs (1e9 per CPU) into a CFS quota for CPU_PERIOD_US. */
export function cpuQuota(nanoCpus: number): number {
  return Math.max(1000, Math.round((nanoCpus * CPU_PERIOD_US) / 1e9));
}

export function buildSpec(o: SpecOptions): OciSpec {
  const namespaces: { type: string; path?: string }[] = [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }];
  // A fresh network namespace (private or none): runc brings its loopback up itself. An overlay task
  // joins the namespace its node's data plane prepared (interfaces attached by CNI, loopback included).
  if (o.network === 'private' && o.netnsPath) namespaces.push({ type: 'network', path: o.netnsPath });
  else if (o.network !== 'host') namespaces.push({ type: 'network' });

  const mounts: OciMount[] = [
    ...(o.rootMount ? [{ destination: '/', type: o.rootMount.type, source: o.rootMount.source, options: [...o.rootMount.options] }] : []),
    { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
    { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
    { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'] },
    { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
    { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
    { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
  ];
  const bind = (destination: string, source: string | undefined): void => {
    if (source) mounts.push({ destination, type: 'bind', source, options: ['rbind', 'ro', 'nosuid', 'nodev', 'noexec'] });
  };
  bind('/etc/hosts', o.etc?.hosts);
  bind('/etc/resolv.conf', o.etc?.resolvConf);
  bind('/etc/hostname', o.etc?.hostname);
  for (const f of o.files ?? []) bind(f.destination, f.source);
  for (const m of o.mounts ?? []) mounts.push({ ...m, options: [...m.options] });

  const resources: OciSpec['linux']['resources'] = { devices: [{ allow: false, access: 'rwm' }] };
  if (o.memoryBytes && o.memoryBytes > 0) resources.memory = { limit: o.memoryBytes };
  if (o.nanoCpus && o.nanoCpus > 0) resources.cpu = { quota: cpuQuota(o.nanoCpus), period: CPU_PERIOD_US };
  if (o.pidsLimit && o.pidsLimit > 0) resources.pids = { limit: o.pidsLimit };

  const caps = [...(o.capabilities ?? DEFAULT_CAPABILITIES)];
  const rlimits = new Map<string, { type: string; hard: number; soft: number }>([['RLIMIT_NOFILE', { type: 'RLIMIT_NOFILE', hard: 1024, soft: 1024 }]]);
  // -1 ("unlimited") stays -1 here: specJson writes it as RLIM_INFINITY, which a JS number cannot hold
  for (const r of o.rlimits ?? []) rlimits.set(r.type, { type: r.type, hard: r.hard, soft: r.soft });
  const spec: OciSpec = {
    ociVersion: '1.0.2',
    process: {
      terminal: !!o.terminal,
      user: { uid: o.uid, gid: o.gid, ...(o.additionalGids && o.additionalGids.length > 0 ? { additionalGids: o.additionalGids } : {}) },
      args: o.args,
      env: o.env,
      cwd: o.cwd || '/',
      capabilities: { bounding: caps, effective: caps, permitted: caps, inheritable: [], ambient: [] },
      rlimits: [...rlimits.values()],
      noNewPrivileges: true,
      oomScoreAdj: 0,
    },
    root: { path: o.rootfs, readonly: !!o.readonlyRoot },
    hostname: o.hostname,
    mounts,
    linux: {
      cgroupsPath: o.cgroupsPath,
      namespaces,
      resources,
      maskedPaths: [...MASKED_PATHS],
      readonlyPaths: [...READONLY_PATHS],
      ...(o.seccomp ? { seccomp: o.seccomp } : {}),
      ...(o.sysctl && Object.keys(o.sysctl).length > 0 ? { sysctl: { ...o.sysctl } } : {}),
    },
  };
  if (o.annotations && Object.keys(o.annotations).length > 0) spec.annotations = { ...o.annotations };
  return spec;
}

const envKey = (kv: string): string => {
  const i = kv.indexOf('=');
  return i < 0 ? kv : kv.slice(0, i);
};

/**
 * Merges environment lists, later ones overriding earlier ones by key, keeping first-seen order;
 * adds PATH when absent and HOSTNAME (first, as Docker does).
 */
export function mergeEnv(hostname: string, ...lists: string[][]): string[] {
  const map = new Map<string, string>();
  map.set('HOSTNAME', `HOSTNAME=${hostname}`);
  for (const list of lists) for (const kv of list) map.set(envKey(kv), kv.includes('=') ? kv : `${kv}=`);
  if (!map.has('PATH')) map.set('PATH', `PATH=${DEFAULT_PATH}`);
  return [...map.values()];
}

export function envValue(env: string[], key: string): string | undefined {
  for (let i = env.length - 1; i >= 0; i--) {
    const kv = env[i]!;
    if (envKey(kv) === key) return kv.slice(key.length + 1);
  }
  return undefined;
}

/** Entrypoint + Cmd as Docker combines them: a given entrypoint drops the image's Cmd unless a command is given too. */
export function processArgs(image: ImageConfig, command?: string[], entrypoint?: string[]): string[] {
  const ep = entrypoint ?? image.entrypoint ?? [];
  const cmd = command && command.length > 0 ? command : entrypoint !== undefined ? [] : (image.cmd ?? []);
  return [...ep, ...cmd];
}

/**
 * The container's /etc/resolv.conf from a base (the host's, or the overlay networks' resolvers) and the
 * user's DNS options: own name servers replace the base's (an overlay task keeps its network resolvers
 * first, so service names still resolve), search domains replace the base's, options override the base's
 * of the same name.
 */
export function mergeResolvConf(base: string, dns: { nameservers?: string[]; search?: string[]; options?: string[] } | undefined, keepNameservers: boolean): string {
  if (!dns || (!dns.nameservers?.length && !dns.search?.length && !dns.options?.length)) return base;
  const lines = base.split('\n').filter((l) => l.trim() !== '');
  const ns = lines.filter((l) => /^\s*nameserver\s/.test(l));
  const search = lines.filter((l) => /^\s*(search|domain)\s/.test(l));
  const opts = lines.flatMap((l) => (/^\s*options\s/.test(l) ? l.trim().split(/\s+/).slice(1) : []));
  const comments = lines.filter((l) => l.trim().startsWith('#'));
  const outNs = dns.nameservers?.length ? [...(keepNameservers ? ns : []), ...dns.nameservers.map((n) => `nameserver ${n}`)] : ns;
  const outSearch = dns.search?.length ? [`search ${dns.search.join(' ')}`] : search;
  const optName = (x: string): string => x.split(':')[0]!;
  const userOpts = dns.options ?? [];
  const outOpts = [...opts.filter((x) => !userOpts.some((u) => optName(u) === optName(x))), ...userOpts];
  return [...comments, ...outNs, ...outSearch, ...(outOpts.length ? [`options ${outOpts.join(' ')}`] : [])].join('\n') + '\n';
}

/** config.json's text: an rlimit of -1 becomes RLIM_INFINITY (2^64-1, beyond a JS number's precision). */
export function specJson(spec: OciSpec): string {
  return JSON.stringify(spec).replace(/"(hard|soft)":-1([,}])/g, '"$1":18446744073709551615$2');
}
