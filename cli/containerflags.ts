/**
 * The container options of `service create|update` beyond the basics, with Docker's names:
 * --mount (update: --mount-add/--mount-rm by target), --cap-add/--cap-drop, --read-only, --init,
 * --ulimit (update: -add/-rm), --sysctl (-add/-rm), --stop-signal, --hostname (Swarm templates),
 * --dns/--dns-search/--dns-option (-add/-rm), --host HOST:IP (-add/-rm; the daemon address is -H),
 * --group (-add/-rm), -t/--tty, --env-file, --container-label (update: -add/-rm, in update.ts).
 * Values are parsed and checked by common/containeropts.ts (the control API checks them again).
 */
import type { Command } from 'commander';
import type { ContainerSpec, Mount } from '../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../common/errors.js';
import {
  hostsEntryName,
  normaliseCap,
  normaliseSignal,
  parseExtraHost,
  parseMount,
  parseSysctl,
  parseUlimit,
  readEnvFile,
  validateDnsOption,
  validateGroup,
  validateMounts,
  validateNameserver,
  validateSearchDomain,
  validateTemplate,
} from '../common/containeropts.js';
import { collect } from './util.js';

export interface ContainerFlags {
  mount?: string[];
  mountAdd?: string[];
  mountRm?: string[];
  capAdd?: string[];
  capDrop?: string[];
  readOnly?: boolean;
  init?: boolean;
  ulimit?: string[];
  ulimitAdd?: string[];
  ulimitRm?: string[];
  sysctl?: string[];
  sysctlAdd?: string[];
  sysctlRm?: string[];
  stopSignal?: string;
  hostname?: string;
  dns?: string[];
  dnsAdd?: string[];
  dnsRm?: string[];
  dnsSearch?: string[];
  dnsSearchAdd?: string[];
  dnsSearchRm?: string[];
  dnsOption?: string[];
  dnsOptionAdd?: string[];
  dnsOptionRm?: string[];
  /** --host HOST:IP (extra /etc/hosts entries); the manager address is -H */
  host?: string[];
  hostAdd?: string[];
  hostRm?: string[];
  group?: string[];
  groupAdd?: string[];
  groupRm?: string[];
  tty?: boolean;
  envFile?: string[];
  containerLabel?: string[];
}

/** Flags both create and update take. */
export function addContainerFlags(cmd: Command): Command {
  return cmd
    .option('--cap-add <cap>', 'add a Linux capability, e.g. NET_ADMIN (ALL: every one; repeatable)', collect)
    .option('--cap-drop <cap>', 'drop a Linux capability, e.g. CHOWN (ALL: every one; repeatable)', collect)
    .option('--read-only', "mount the container's root file system read-only")
    .option('--init', 'run an init (tini) as PID 1 that forwards signals and reaps processes')
    .option('--stop-signal <signal>', 'signal that stops the container (default SIGTERM)')
    .option('--hostname <name>', 'container host name; templates: {{.Service.Name}}, {{.Task.Slot}}, {{.Task.Name}}, {{.Node.Hostname}}, {{.Node.ID}}, {{.Service.ID}}')
    .option('-t, --tty', 'allocate a pseudo-TTY');
}

/** Flags only create takes (update has -add/-rm forms). */
export function addContainerCreateFlags(cmd: Command): Command {
  return addContainerFlags(cmd)
    .option('--mount <spec>', 'attach a mount: type=volume|bind|tmpfs,source=...,target=...[,readonly][,volume-opt=K=V][,tmpfs-size=64m][,tmpfs-mode=1770] (repeatable)', collect)
    .option('--ulimit <name=soft[:hard]>', 'ulimit, e.g. nofile=1024:2048 (repeatable)', collect)
    .option('--sysctl <k=v>', 'namespaced kernel parameter, e.g. net.core.somaxconn=1024 (repeatable)', collect)
    .option('--dns <ip>', 'custom DNS server (repeatable)', collect)
    .option('--dns-search <domain>', 'custom DNS search domain (repeatable)', collect)
    .option('--dns-option <opt>', 'DNS resolver option, e.g. ndots:2 (repeatable)', collect)
    .option('--host <host:ip>', 'add a host-to-IP mapping to /etc/hosts (repeatable; the manager address is -H)', collect)
    .option('--group <group>', 'add a supplementary group for the process (repeatable)', collect)
    .option('--env-file <file>', 'read environment variables from a file (repeatable)', collect)
    .option('--container-label <K=V>', 'container label (repeatable)', collect);
}

/** Flags only update takes. */
export function addContainerUpdateFlags(cmd: Command): Command {
  return addContainerFlags(cmd)
    .option('--no-read-only', 'mount the root file system read-write again')
    .option('--no-init', 'run the command as PID 1 again')
    .option('--no-tty', 'do not allocate a pseudo-TTY')
    .option('--mount-add <spec>', 'add or replace (by target) a mount (repeatable)', collect)
    .option('--mount-rm <target>', 'remove the mount at this target (repeatable)', collect)
    .option('--ulimit-add <name=soft[:hard]>', 'add or replace a ulimit (repeatable)', collect)
    .option('--ulimit-rm <name>', 'remove a ulimit (repeatable)', collect)
    .option('--sysctl-add <k=v>', 'add or replace a sysctl (repeatable)', collect)
    .option('--sysctl-rm <k>', 'remove a sysctl (repeatable)', collect)
    .option('--dns-add <ip>', 'add a DNS server (repeatable)', collect)
    .option('--dns-rm <ip>', 'remove a DNS server (repeatable)', collect)
    .option('--dns-search-add <domain>', 'add a DNS search domain (repeatable)', collect)
    .option('--dns-search-rm <domain>', 'remove a DNS search domain (repeatable)', collect)
    .option('--dns-option-add <opt>', 'add a DNS option (repeatable)', collect)
    .option('--dns-option-rm <opt>', 'remove a DNS option (repeatable)', collect)
    .option('--host-add <host:ip>', 'add a host-to-IP mapping (repeatable)', collect)
    .option('--host-rm <host>', 'remove the mappings of a host (HOST or HOST:IP; repeatable)', collect)
    .option('--group-add <group>', 'add a supplementary group (repeatable)', collect)
    .option('--group-rm <group>', 'remove a supplementary group (repeatable)', collect);
}

function toMount(m: ReturnType<typeof parseMount>): Mount {
  return { ...m };
}

function uniq(list: string[]): string[] {
  return [...new Set(list)];
}

/** Fills a new container spec from the create flags. */
export function applyContainerCreateFlags(c: ContainerSpec, f: ContainerFlags): void {
  c.mounts = (f.mount ?? []).map((v) => toMount(parseMount('--mount', v)));
  validateMounts('--mount', c.mounts);
  c.capAdd = uniq((f.capAdd ?? []).map((x) => normaliseCap('--cap-add', x)));
  c.capDrop = uniq((f.capDrop ?? []).map((x) => normaliseCap('--cap-drop', x)));
  c.readOnly = !!f.readOnly;
  c.init = !!f.init;
  const ulimits = new Map<string, { name: string; soft: number; hard: number }>();
  for (const v of f.ulimit ?? []) {
    const u = parseUlimit('--ulimit', v);
    ulimits.set(u.name, u);
  }
  c.ulimits = [...ulimits.values()];
  c.sysctls = Object.fromEntries((f.sysctl ?? []).map((v) => parseSysctl('--sysctl', v)));
  c.stopSignal = f.stopSignal !== undefined ? normaliseSignal('--stop-signal', f.stopSignal) : '';
  if (f.hostname !== undefined) {
    validateTemplate('--hostname', f.hostname);
    c.hostname = f.hostname;
  }
  for (const d of f.dns ?? []) validateNameserver('--dns', d);
  for (const d of f.dnsSearch ?? []) validateSearchDomain('--dns-search', d);
  for (const d of f.dnsOption ?? []) validateDnsOption('--dns-option', d);
  c.dnsConfig = f.dns?.length || f.dnsSearch?.length || f.dnsOption?.length ? { nameservers: uniq(f.dns ?? []), search: uniq(f.dnsSearch ?? []), options: uniq(f.dnsOption ?? []) } : undefined;
  c.hosts = (f.host ?? []).map((v) => parseExtraHost('--host', v));
  for (const g of f.group ?? []) validateGroup('--group', g);
  c.groups = uniq(f.group ?? []);
  c.tty = !!f.tty;
  // --env-file first, then -e: a variable given on the command line wins (as in Docker)
  const fromFiles = (f.envFile ?? []).flatMap((file) => readEnvFile('--env-file', file));
  if (fromFiles.length > 0) c.env = [...fromFiles, ...c.env];
  for (const l of f.containerLabel ?? []) {
    const i = l.indexOf('=');
    if (i === 0) throw invalidArgument('--container-label', l, 'expected KEY=VALUE');
    c.labels[i < 0 ? l : l.slice(0, i)] = i < 0 ? '' : l.slice(i + 1);
  }
}

function listEdit(field: string, cur: string[], rm: string[] | undefined, add: string[] | undefined, check: (flag: string, v: string) => void): string[] {
  let out = cur.filter((x) => !(rm ?? []).includes(x));
  for (const a of add ?? []) {
    check(`--${field}-add`, a);
    if (!out.includes(a)) out = [...out, a];
  }
  return out;
}

/** Applies the update flags onto a copy of the current container spec. Removals go before additions. */
export function applyContainerUpdateFlags(c: ContainerSpec, f: ContainerFlags): void {
  const createOnly: [keyof ContainerFlags, string][] = [
    ['mount', '--mount-add and --mount-rm'],
    ['ulimit', '--ulimit-add and --ulimit-rm'],
    ['sysctl', '--sysctl-add and --sysctl-rm'],
    ['dns', '--dns-add and --dns-rm'],
    ['dnsSearch', '--dns-search-add and --dns-search-rm'],
    ['dnsOption', '--dns-option-add and --dns-option-rm'],
    ['host', '--host-add and --host-rm'],
    ['group', '--group-add and --group-rm'],
  ];
  for (const [k, use] of createOnly) {
    const v = f[k];
    if (Array.isArray(v) && v.length > 0) throw invalidArgument(`--${k.replace(/[A-Z]/g, (x) => `-${x.toLowerCase()}`)}`, v[0], `service update takes ${use}`);
  }
  // mounts: --mount-rm by target, then --mount-add replaces a mount at the same target
  const norm = (t: string): string => t.replace(/\/+$/, '') || '/';
  for (const t of f.mountRm ?? []) {
    if (!c.mounts.some((m) => norm(m.target) === norm(t))) throw invalidArgument('--mount-rm', t, 'the service has no mount at this target');
    c.mounts = c.mounts.filter((m) => norm(m.target) !== norm(t));
  }
  for (const v of f.mountAdd ?? []) {
    const m = toMount(parseMount('--mount-add', v));
    c.mounts = [...c.mounts.filter((x) => norm(x.target) !== norm(m.target)), m];
  }
  validateMounts('--mount-add', c.mounts);
  // capabilities: Docker's update semantics — --cap-add takes a capability off the drop list and
  // --cap-drop off the add list
  for (const x of f.capDrop ?? []) {
    const cap = normaliseCap('--cap-drop', x);
    c.capAdd = c.capAdd.filter((y) => y !== cap);
    if (!c.capDrop.includes(cap)) c.capDrop.push(cap);
  }
  for (const x of f.capAdd ?? []) {
    const cap = normaliseCap('--cap-add', x);
    c.capDrop = c.capDrop.filter((y) => y !== cap);
    if (!c.capAdd.includes(cap)) c.capAdd.push(cap);
  }
  if (f.readOnly !== undefined) c.readOnly = f.readOnly;
  if (f.init !== undefined) c.init = f.init;
  if (f.tty !== undefined) c.tty = f.tty;
  for (const n of f.ulimitRm ?? []) c.ulimits = c.ulimits.filter((u) => u.name !== n);
  for (const v of f.ulimitAdd ?? []) {
    const u = parseUlimit('--ulimit-add', v);
    c.ulimits = [...c.ulimits.filter((x) => x.name !== u.name), u];
  }
  for (const k of f.sysctlRm ?? []) delete c.sysctls[k];
  for (const v of f.sysctlAdd ?? []) {
    const [k, x] = parseSysctl('--sysctl-add', v);
    c.sysctls[k] = x;
  }
  if (f.stopSignal !== undefined) c.stopSignal = f.stopSignal === '' ? '' : normaliseSignal('--stop-signal', f.stopSignal);
  if (f.hostname !== undefined) {
    if (f.hostname !== '') validateTemplate('--hostname', f.hostname);
    c.hostname = f.hostname;
  }
  if (f.dnsAdd || f.dnsRm || f.dnsSearchAdd || f.dnsSearchRm || f.dnsOptionAdd || f.dnsOptionRm) {
    const d = c.dnsConfig ?? { nameservers: [], search: [], options: [] };
    d.nameservers = listEdit('dns', d.nameservers, f.dnsRm, f.dnsAdd, validateNameserver);
    d.search = listEdit('dns-search', d.search, f.dnsSearchRm, f.dnsSearchAdd, validateSearchDomain);
    d.options = listEdit('dns-option', d.options, f.dnsOptionRm, f.dnsOptionAdd, validateDnsOption);
    c.dnsConfig = d.nameservers.length || d.search.length || d.options.length ? d : undefined;
  }
  for (const h of f.hostRm ?? []) {
    // HOST removes every entry of the host; HOST:IP only that one
    const one = /[:=]/.test(h) ? parseExtraHost('--host-rm', h) : undefined;
    c.hosts = c.hosts.filter((e) => (one ? e !== one : hostsEntryName(e) !== h));
  }
  for (const v of f.hostAdd ?? []) {
    const e = parseExtraHost('--host-add', v);
    if (!c.hosts.includes(e)) c.hosts.push(e);
  }
  c.groups = listEdit('group', c.groups, f.groupRm, f.groupAdd, validateGroup);
}
