/**
 * A multi-host test bed on one machine: N "hosts", each a network namespace with its own address on a
 * shared underlay, each running its own real `flotilla manager` or `flotilla agent` process (real runc)
 * with its own data dir.
 *
 *   const bed = await Testbed.create({ managers: 1, agents: 2, prepareHost: (h) => importBusybox(h.dataDir) });
 *   try {
 *     await bed.cli(['service', 'create', ...]);          // CLI against the leader's control socket
 *     await bed.hosts[1]!.exec(['ip', 'addr']);           // a command in host 1's network namespace
 *   } finally {
 *     await bed.destroy();
 *     expect(bed.leftovers()).toEqual([]);
 *   }
 *
 * Layout of run <id> (6 hex digits, unique per run so parallel and leftover runs never collide):
 *   - netns fl-<id>-ul: the underlay. A bridge fl<id>br (no address) and one veth end fl<id>h<N> per host.
 *     The underlay has no link to the root namespace: no test address is ever routed through the
 *     machine's own interfaces, and the root namespace's firewall (a FORWARD policy of DROP left by dockerd,
 *     br_netfilter) does not apply to it. A fresh namespace has empty iptables/nftables rule sets, so the
 *     bed depends on no policy a previous program left behind and adds no firewall rule anywhere.
 *   - netns fl-<id>-h<N>: host N. Loopback and eth0 (the other veth end) with <subnet>.<10+N>/24, no
 *     default route. Hosts 1..managers are managers, the rest agents.
 *   - netns fl-<id>-c<N> (option clients): an outside client, a machine on the underlay that is no node
 *     of the cluster (no daemon), eth0 with <subnet>.<200+N>/24: where traffic to published ports comes from.
 *   - <tmp>/flotilla-testbed-<id>/: testbed.json (the state, for `down` and for sweeping runs whose owner
 *     died), h<N>/ (data dir), h<N>.sock (a manager's control socket), h<N>.log (daemon output).
 *
 * Daemons are started with `nsenter --net=/run/netns/NAME`: only the network namespace is entered.
 * (`ip netns exec` also remounts /sys in a new mount namespace, which drops the cgroup mounts, and runc
 * then fails with "no cgroup mount found in mountinfo".)
 *
 * destroy() stops the daemons (SIGTERM, SIGKILL after a deadline), removes their containers with the
 * runtime's own `container rm -f` (then `runc delete --force` on what is left), kills any process still
 * inside a host namespace, deletes the namespaces (which takes the veths and the bridge with them), the
 * run roots and the directory, and logs each thing it could not remove. leftovers() lists what remains.
 */
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { CliResult } from './procs.js';
import { flotillaCgroups, processAlive } from './runtime-debris.js';

export type HostRole = 'manager' | 'agent';

export interface TestbedOptions {
  /** manager hosts (default 1); the first initialises the cluster, the others join it */
  managers?: number;
  /** agent hosts (default 0) */
  agents?: number;
  /** managers also run tasks (their in-process agent; default true) */
  managerAgent?: boolean;
  /** container runtime of every agent (default runc) */
  runtime?: 'runc' | 'sim';
  /** agent heartbeat period of the new cluster (default 500ms) */
  heartbeat?: string;
  /** the first three octets of the underlay /24 (default 198.18.<random>: RFC 2544's benchmarking range) */
  subnet?: string;
  /** outside clients on the underlay (default 0): network namespaces without a daemon (TestbedClient) */
  clients?: number;
  /** default: 6 random hex digits */
  runId?: string;
  /** aborts create() (which then cleans up what it made) */
  signal?: AbortSignal;
  /** runs for each host after its namespace and data dir exist, before its daemon starts (e.g. import images) */
  prepareHost?: (h: TestbedHost) => Promise<unknown>;
  /** extra arguments of a host's daemon */
  extraArgs?: (h: TestbedHost) => string[];
  /** how long a daemon may take to be ready (default 20 s) */
  readyTimeoutMs?: number;
  /** keep the bed when the creating process exits (deploy/testbed.sh): no sweep removes it */
  manual?: boolean;
  /** where the bed reports what it does and what it could not clean up (default: stderr) */
  log?: (msg: string) => void;
}

interface HostState {
  index: number;
  name: string;
  role: HostRole;
  netns: string;
  ip: string;
  dataDir: string;
  socket: string;
  logFile: string;
  pid: number;
}

interface ClientState {
  name: string;
  netns: string;
  ip: string;
}

interface BedState {
  runId: string;
  ownerPid: number;
  manual: boolean;
  root: string;
  subnet: string;
  underlay: string;
  bridge: string;
  port: number;
  hosts: HostState[];
  /** outside clients (absent in state files of older beds) */
  clients?: ClientState[];
  /** network namespace inodes (to find processes still inside one) */
  netnsInodes: number[];
  /** the hosts' run roots (see runRootOf), recorded before they are removed */
  runRoots: string[];
}

/** dist/cli/main.js, whether this file runs from test/helpers (vitest) or dist/test/helpers (deploy/testbed.sh) */
const HERE = path.dirname(fileURLToPath(import.meta.url));
const UP2 = path.resolve(HERE, '../..');
export const CLI = path.basename(UP2) === 'dist' ? path.join(UP2, 'cli/main.js') : path.join(UP2, 'dist/cli/main.js');

const NETNS_DIR = '/run/netns';
const ROOT_PREFIX = 'flotilla-testbed-';
const PORT = 4242;
const STOP_DEADLINE_MS = 5_000;

/** Runs a program; never rejects (a spawn failure is code 127). */
export function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number; input?: string } = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { env: opts.env ?? process.env, timeout: opts.timeoutMs ?? 60_000, maxBuffer: 64 * 1024 * 1024, killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: unknown }) | null;
      const code = e ? (typeof e.code === 'number' ? e.code : e.code === 'ENOENT' ? 127 : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: e && !stderr ? e.message : String(stderr) });
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

async function must(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** A live process (a zombie is dead). */
function alive(pid: number): boolean {
  return pid > 0 && processAlive(pid);
}

function cmdline(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
  } catch {
    return '';
  }
}

function pids(): number[] {
  return fs
    .readdirSync('/proc')
    .filter((e) => /^\d+$/.test(e))
    .map(Number)
    .filter((p) => p !== process.pid);
}

function netInode(pid: number | 'self'): number {
  try {
    return fs.statSync(`/proc/${pid}/ns/net`).ino;
  } catch {
    return 0;
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Sends SIGTERM, waits up to deadlineMs, then SIGKILL (told to onKill); true when the process is gone. */
async function stopPid(pid: number, deadlineMs = STOP_DEADLINE_MS, onKill?: () => void): Promise<boolean> {
  if (!alive(pid)) return true;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return !alive(pid);
  }
  const until = Date.now() + deadlineMs;
  while (alive(pid) && Date.now() < until) await sleep(50);
  if (!alive(pid)) return true;
  onKill?.();
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    /* gone meanwhile */
  }
  const killUntil = Date.now() + 2_000;
  while (alive(pid) && Date.now() < killUntil) await sleep(20);
  return !alive(pid);
}

function mountPoints(): string[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => (l.split(' ')[4] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter(Boolean);
}

const RUN_ROOT_BASES = (): string[] => [process.env.FLOTILLA_RUN_ROOT, '/run/flotilla', '/dev/shm/flotilla'].filter((b): b is string => !!b);

/** Run roots (see runRootOf) whose data dir lies under root. */
function runRootsUnder(root: string): string[] {
  const out: string[] = [];
  for (const base of RUN_ROOT_BASES()) {
    let entries: string[] = [];
    try {
      entries = fs.readdirSync(base);
    } catch {
      continue;
    }
    for (const e of entries) {
      let owner = '';
      try {
        owner = fs.readFileSync(path.join(base, e, 'data-dir'), 'utf8').trim();
      } catch {
        continue;
      }
      if (owner === root || owner.startsWith(root + '/')) out.push(path.join(base, e));
    }
  }
  return out;
}

/** The lines of a daemon's output that say why it failed (an error and its first stack line), else its last lines. */
function summary(out: string): string {
  const lines = out.split('\n').map((l) => l.trim()).filter(Boolean);
  const i = lines.findIndex((l) => /^(\w*Error\b|flotilla: )|"level":[56]0/.test(l));
  return (i >= 0 ? lines.slice(i, i + 2) : lines.slice(-3)).join(' | ').slice(0, 600);
}

/** Container ids per run, remembered across destroy() for the cgroup check of leftovers(). */
const containerIds = new Map<string, Set<string>>();

export class TestbedHost {
  constructor(
    private readonly bed: Testbed,
    readonly state: HostState,
  ) {}

  get index(): number {
    return this.state.index;
  }
  /** h1, h2, ...: also the node's hostname */
  get name(): string {
    return this.state.name;
  }
  get role(): HostRole {
    return this.state.role;
  }
  /** network namespace name (/run/netns/<netns>) */
  get netns(): string {
    return this.state.netns;
  }
  /** underlay address */
  get ip(): string {
    return this.state.ip;
  }
  get dataDir(): string {
    return this.state.dataDir;
  }
  /** a manager's control socket ('' for an agent) */
  get socket(): string {
    return this.state.socket;
  }
  /** a manager's HOST:PORT on the underlay ('' for an agent) */
  get addr(): string {
    return this.state.role === 'manager' ? `${this.state.ip}:${this.bed.state.port}` : '';
  }
  /** the daemon's pid (0 when stopped) */
  get pid(): number {
    return alive(this.state.pid) ? this.state.pid : 0;
  }
  /** what the daemon printed */
  output(): string {
    try {
      return fs.readFileSync(this.state.logFile, 'utf8');
    } catch {
      return '';
    }
  }

  /** Runs a command in this host's network namespace (only that namespace: mounts and cgroups stay the machine's). */
  exec(cmd: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliResult> {
    return run('nsenter', [`--net=${path.join(NETNS_DIR, this.netns)}`, '--', ...cmd], opts);
  }

  /** The flotilla CLI in this host's namespace, with its data dir (node-local commands) and the leader's socket. */
  cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
    return this.exec([process.execPath, CLI, ...args], { env: { ...process.env, FLOTILLA_DATA_DIR: this.dataDir, FLOTILLA_HOST: `unix://${this.bed.socket}`, ...env } });
  }
}

/** An outside client of the bed: a network namespace on the underlay that is no node of the cluster. */
export class TestbedClient {
  constructor(readonly state: ClientState) {}

  /** c1, c2, ... */
  get name(): string {
    return this.state.name;
  }
  get netns(): string {
    return this.state.netns;
  }
  /** underlay address */
  get ip(): string {
    return this.state.ip;
  }
  /** Runs a command in this client's network namespace. */
  exec(cmd: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliResult> {
    return run('nsenter', [`--net=${path.join(NETNS_DIR, this.netns)}`, '--', ...cmd], opts);
  }
}

export class Testbed {
  readonly hosts: TestbedHost[];
  /** outside clients (option clients) */
  readonly clients: TestbedClient[];
  private readonly log: (msg: string) => void;

  private constructor(
    readonly state: BedState,
    private readonly opts: TestbedOptions,
  ) {
    this.hosts = state.hosts.map((h) => new TestbedHost(this, h));
    this.clients = (state.clients ?? []).map((c) => new TestbedClient(c));
    this.log = opts.log ?? ((m) => process.stderr.write(`testbed ${state.runId}: ${m}\n`));
  }

  get runId(): string {
    return this.state.runId;
  }
  /** the run's directory (data dirs, sockets, logs) */
  get root(): string {
    return this.state.root;
  }
  get managers(): TestbedHost[] {
    return this.hosts.filter((h) => h.role === 'manager');
  }
  get agents(): TestbedHost[] {
    return this.hosts.filter((h) => h.role === 'agent');
  }
  /** the control socket the CLI talks to: the first manager's */
  get socket(): string {
    return this.managers[0]?.socket ?? '';
  }
  /** FLOTILLA_HOST for the CLI */
  get env(): NodeJS.ProcessEnv {
    return { FLOTILLA_HOST: `unix://${this.socket}` };
  }

  /** The flotilla CLI (from the root namespace) against the first manager's control socket. */
  cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
    return run(process.execPath, [CLI, ...args], { env: { ...process.env, ...this.env, ...env } });
  }

  async cliJson<T = unknown>(args: string[]): Promise<T> {
    const r = await this.cli([...args, '--format', 'json']);
    if (r.code !== 0) throw new Error(`flotilla ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
    return JSON.parse(r.stdout) as T;
  }

  /**
   * Builds the bed: namespaces, underlay, data dirs, daemons; returns once every node is ready. On any
   * failure (or abort) it destroys what it made and rethrows.
   */
  static async create(opts: TestbedOptions = {}): Promise<Testbed> {
    if (process.getuid?.() !== 0) throw new Error('the test bed needs root (network namespaces, runc)');
    const managers = opts.managers ?? 1;
    const agents = opts.agents ?? 0;
    if (managers < 1 || managers + agents > 200) throw new Error(`invalid test bed size: ${managers} managers, ${agents} agents`);
    if ((opts.clients ?? 0) < 0 || (opts.clients ?? 0) > 50) throw new Error(`invalid number of clients: ${opts.clients} (0 to 50)`);
    await Testbed.sweep(opts.log);
    const runId = opts.runId ?? randomBytes(3).toString('hex');
    if (!/^[0-9a-f]{1,6}$/.test(runId)) throw new Error(`invalid runId ${JSON.stringify(runId)}: 1-6 hex digits`);
    if (fs.existsSync(path.join(NETNS_DIR, `fl-${runId}-ul`))) throw new Error(`test bed ${runId} exists already`);
    const subnet = opts.subnet ?? `198.18.${randomBytes(1)[0]!}`;
    const root = path.join(os.tmpdir(), `${ROOT_PREFIX}${runId}`);
    fs.mkdirSync(root, { mode: 0o700 });
    const hosts: HostState[] = [];
    for (let i = 0; i < managers + agents; i++) {
      const name = `h${i + 1}`;
      const role: HostRole = i < managers ? 'manager' : 'agent';
      hosts.push({
        index: i,
        name,
        role,
        netns: `fl-${runId}-${name}`,
        ip: `${subnet}.${10 + i + 1}`,
        dataDir: path.join(root, name),
        socket: role === 'manager' ? path.join(root, `${name}.sock`) : '',
        logFile: path.join(root, `${name}.log`),
        pid: 0,
      });
    }
    const clients: ClientState[] = [];
    for (let i = 0; i < (opts.clients ?? 0); i++) clients.push({ name: `c${i + 1}`, netns: `fl-${runId}-c${i + 1}`, ip: `${subnet}.${200 + i + 1}` });
    const state: BedState = {
      runId,
      ownerPid: opts.manual ? 0 : process.pid,
      manual: !!opts.manual,
      root,
      subnet,
      underlay: `fl-${runId}-ul`,
      bridge: `fl${runId}br`,
      port: PORT,
      hosts,
      clients,
      netnsInodes: [],
      runRoots: [],
    };
    const bed = new Testbed(state, opts);
    bed.save();
    try {
      await bed.build();
      return bed;
    } catch (err) {
      bed.log(`create failed, cleaning up: ${(err as Error).message}`);
      await bed.destroy();
      throw err;
    }
  }

  /** Reattaches to a bed made by another process (deploy/testbed.sh down). */
  static attach(runId: string, opts: Pick<TestbedOptions, 'log'> = {}): Testbed {
    const file = path.join(os.tmpdir(), `${ROOT_PREFIX}${runId}`, 'testbed.json');
    const state = JSON.parse(fs.readFileSync(file, 'utf8')) as BedState;
    return new Testbed(state, opts);
  }

  /** Run ids of beds whose directory or namespaces exist on this machine. */
  static runs(): string[] {
    const ids = new Set<string>();
    for (const e of fs.readdirSync(os.tmpdir())) if (e.startsWith(ROOT_PREFIX)) ids.add(e.slice(ROOT_PREFIX.length));
    let ns: string[] = [];
    try {
      ns = fs.readdirSync(NETNS_DIR);
    } catch {
      /* none */
    }
    for (const n of ns) {
      const m = /^fl-([0-9a-f]{1,6})-(ul|h\d+|c\d+)$/.exec(n);
      if (m) ids.add(m[1]!);
    }
    return [...ids].sort();
  }

  /**
   * Destroys beds left by a test process that died (not manual ones, not ones whose owner still runs;
   * with all, manual ones too).
   */
  static async sweep(log?: (msg: string) => void, opts: { manual?: boolean } = {}): Promise<void> {
    for (const id of Testbed.runs()) {
      let state: BedState | undefined;
      try {
        state = JSON.parse(fs.readFileSync(path.join(os.tmpdir(), `${ROOT_PREFIX}${id}`, 'testbed.json'), 'utf8')) as BedState;
      } catch {
        state = undefined;
      }
      if (state && ((state.manual && !opts.manual) || (!state.manual && alive(state.ownerPid)))) continue;
      if (!state) {
        // namespaces without a state file (which create() writes before making any): a destroy that
        // failed half-way; remove them unless a process is still inside
        let names: string[] = [];
        try {
          names = fs.readdirSync(NETNS_DIR).filter((n) => n.startsWith(`fl-${id}-`));
        } catch {
          continue;
        }
        const inodes = new Set(names.map((n) => fs.statSync(path.join(NETNS_DIR, n)).ino));
        const self = netInode('self');
        const busy = pids().filter((p) => {
          const ino = netInode(p);
          return ino !== self && inodes.has(ino);
        });
        if (busy.length) {
          log?.(`test bed ${id}: namespaces ${names.join(', ')} have no state file and processes ${busy.join(', ')} inside: left alone`);
          continue;
        }
        for (const n of names) {
          const r = await run('ip', ['netns', 'delete', n]);
          log?.(`test bed ${id}: removed namespace ${n} left without a state file${r.code ? ` (failed: ${r.stderr.trim()})` : ''}`);
        }
        continue;
      }
      const bed = new Testbed(state, { log: log && ((m) => log(`test bed ${id}: ${m}`)) });
      bed.log(state.manual ? 'destroying a manual test bed' : `sweeping a test bed left by process ${state.ownerPid}`);
      await bed.destroy();
    }
  }

  private save(): void {
    const file = path.join(this.state.root, 'testbed.json');
    fs.writeFileSync(`${file}.tmp`, JSON.stringify(this.state, null, 2));
    fs.renameSync(`${file}.tmp`, file);
  }

  private checkAbort(): void {
    this.opts.signal?.throwIfAborted();
  }

  private async build(): Promise<void> {
    const s = this.state;
    // the underlay: a namespace holding only a bridge
    await must('ip', ['netns', 'add', s.underlay]);
    s.netnsInodes.push(fs.statSync(path.join(NETNS_DIR, s.underlay)).ino);
    this.save();
    await must('ip', ['-n', s.underlay, 'link', 'set', 'lo', 'up']);
    await must('ip', ['-n', s.underlay, 'link', 'add', s.bridge, 'type', 'bridge']);
    await must('ip', ['-n', s.underlay, 'link', 'set', s.bridge, 'up']);
    for (const h of s.hosts) {
      this.checkAbort();
      await must('ip', ['netns', 'add', h.netns]);
      s.netnsInodes.push(fs.statSync(path.join(NETNS_DIR, h.netns)).ino);
      this.save();
      const port = `fl${s.runId}${h.name}`;
      // both ends are made inside namespaces: nothing of the bed ever exists in the root namespace
      await must('ip', ['-n', s.underlay, 'link', 'add', port, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', h.netns]);
      await must('ip', ['-n', s.underlay, 'link', 'set', port, 'master', s.bridge]);
      await must('ip', ['-n', s.underlay, 'link', 'set', port, 'up']);
      await must('ip', ['-n', h.netns, 'link', 'set', 'lo', 'up']);
      await must('ip', ['-n', h.netns, 'addr', 'add', `${h.ip}/24`, 'dev', 'eth0']);
      await must('ip', ['-n', h.netns, 'link', 'set', 'eth0', 'up']);
      fs.mkdirSync(h.dataDir, { mode: 0o700 });
      if (this.opts.prepareHost) await this.opts.prepareHost(this.hosts[h.index]!);
    }
    for (const c of s.clients ?? []) {
      this.checkAbort();
      await must('ip', ['netns', 'add', c.netns]);
      s.netnsInodes.push(fs.statSync(path.join(NETNS_DIR, c.netns)).ino);
      this.save();
      const port = `fl${s.runId}${c.name}`;
      await must('ip', ['-n', s.underlay, 'link', 'add', port, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', c.netns]);
      await must('ip', ['-n', s.underlay, 'link', 'set', port, 'master', s.bridge]);
      await must('ip', ['-n', s.underlay, 'link', 'set', port, 'up']);
      await must('ip', ['-n', c.netns, 'link', 'set', 'lo', 'up']);
      await must('ip', ['-n', c.netns, 'addr', 'add', `${c.ip}/24`, 'dev', 'eth0']);
      await must('ip', ['-n', c.netns, 'link', 'set', 'eth0', 'up']);
    }
    this.checkAbort();
    const first = this.hosts[0]!;
    await this.startHost(0);
    this.checkAbort();
    const managerToken = s.hosts.length > 1 && this.managers.length > 1 ? (await this.must(['cluster', 'join-token', 'manager', '-q'])).trim() : '';
    for (const h of this.managers.slice(1)) {
      this.checkAbort();
      await this.startHost(h.index, { join: first.addr, token: managerToken });
    }
    if (this.agents.length) {
      const token = (await this.must(['cluster', 'join-token', 'worker', '-q'])).trim();
      for (const h of this.agents) {
        this.checkAbort();
        await this.startHost(h.index, { token });
      }
    }
    await this.waitReady();
    this.checkAbort();
  }

  private async must(args: string[]): Promise<string> {
    const r = await this.cli(args);
    if (r.code !== 0) throw new Error(`flotilla ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
    return r.stdout;
  }

  private daemonArgs(h: HostState, join: { join?: string; token?: string }): string[] {
    const runtime = this.opts.runtime ?? 'runc';
    if (h.role === 'manager') {
      const args = ['manager', '--data-dir', h.dataDir, '--hostname', h.name, '--listen-addr', `${h.ip}:${this.state.port}`, '--advertise-addr', `${h.ip}:${this.state.port}`];
      args.push('--control-socket', h.socket, '--heartbeat-period', this.opts.heartbeat ?? '500ms', '--runtime', runtime);
      if (this.opts.managerAgent === false) args.push('--no-agent');
      if (join.join) args.push('--join', join.join, '--token', join.token ?? '');
      return args;
    }
    const managers = this.managers.map((m) => m.addr).join(',');
    return ['agent', '--data-dir', h.dataDir, '--hostname', h.name, '--manager', managers, '--token', join.token ?? '', '--runtime', runtime];
  }

  /** Starts host i's daemon inside its namespace and waits until it listens (a manager) or is started (an agent). */
  async startHost(i: number, join: { join?: string; token?: string } = {}): Promise<void> {
    const host = this.hosts[i];
    if (!host) throw new Error(`no host ${i}`);
    const h = host.state;
    if (alive(h.pid)) throw new Error(`${h.name} is running already (pid ${h.pid})`);
    if (h.role === 'agent' && !join.token) join = { token: (await this.must(['cluster', 'join-token', 'worker', '-q'])).trim() };
    const args = [...this.daemonArgs(h, join), ...(this.opts.extraArgs?.(host) ?? [])];
    const fd = fs.openSync(h.logFile, 'a');
    const child = spawn('nsenter', [`--net=${path.join(NETNS_DIR, h.netns)}`, '--', process.execPath, CLI, ...args], {
      env: { ...process.env, FLOTILLA_LOG_LEVEL: process.env.FLOTILLA_LOG_LEVEL ?? 'warn' },
      stdio: ['ignore', fd, fd],
      detached: true,
    });
    fs.closeSync(fd);
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.once('error', () => {});
    child.unref();
    h.pid = child.pid ?? 0;
    this.save();
    const start = fs.statSync(h.logFile).size;
    let done = false;
    void exited.then(() => (done = true));
    // a manager is up once it listens; an agent's readiness is its node's (waitReady)
    if (h.role === 'agent') return;
    const timeout = this.opts.readyTimeoutMs ?? 20_000;
    const until = Date.now() + timeout;
    for (;;) {
      const out = host.output().slice(start);
      if (/listening on /.test(out)) return;
      const tail = summary(out);
      if (done || !alive(h.pid)) throw new Error(`${h.name} (${h.role}) exited: ${tail}`);
      if (Date.now() > until) throw new Error(`${h.name} (${h.role}) not ready after ${timeout} ms: ${tail}`);
      this.checkAbort();
      await sleep(50);
    }
  }

  /** Stops host i's daemon (SIGTERM, SIGKILL after the deadline); its containers keep running. */
  async stopHost(i: number, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const h = this.hosts[i]?.state;
    if (!h) throw new Error(`no host ${i}`);
    if (signal === 'SIGKILL' && alive(h.pid)) process.kill(h.pid, 'SIGKILL');
    const slow = (): void => this.log(`${h.name}: daemon pid ${h.pid} still running ${STOP_DEADLINE_MS} ms after SIGTERM: SIGKILL`);
    if (!(await stopPid(h.pid, STOP_DEADLINE_MS, slow))) throw new Error(`${h.name}: daemon ${h.pid} does not die`);
    h.pid = 0;
    this.save();
  }

  async stopAgent(i: number, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.hosts[i]?.role !== 'agent') throw new Error(`host ${i} is not an agent host`);
    await this.stopHost(i, signal);
  }

  async startAgent(i: number): Promise<void> {
    if (this.hosts[i]?.role !== 'agent') throw new Error(`host ${i} is not an agent host`);
    await this.startHost(i);
    await this.waitReady();
  }

  /** Waits until every running host's node is ready in the cluster. */
  async waitReady(timeoutMs = this.opts.readyTimeoutMs ?? 20_000): Promise<void> {
    const want = this.hosts.filter((h) => h.pid && (h.role === 'agent' || this.opts.managerAgent !== false)).map((h) => h.name);
    const until = Date.now() + timeoutMs;
    let last = '';
    for (;;) {
      this.checkAbort();
      const r = await this.cli(['node', 'ls', '--format', 'json']);
      if (r.code === 0) {
        const nodes = JSON.parse(r.stdout) as Array<{ hostname: string; status: string }>;
        const ready = new Set(nodes.filter((n) => n.status === 'ready').map((n) => n.hostname));
        const missing = want.filter((n) => !ready.has(n));
        if (missing.length === 0) return;
        last = `not ready: ${missing.join(', ')}`;
      } else last = r.stderr.trim();
      for (const h of this.hosts) {
        if (h.state.pid && !alive(h.state.pid)) throw new Error(`${h.name} (${h.role}) exited: ${summary(h.output())}`);
      }
      if (Date.now() > until) throw new Error(`test bed not ready after ${timeoutMs} ms: ${last}`);
      this.checkAbort();
      await sleep(100);
    }
  }

  /**
   * Removes everything the bed made; logs and returns what it could not remove (also in leftovers()).
   * Never throws. Safe to call twice, and on a bed whose create failed half-way.
   */
  async destroy(): Promise<string[]> {
    const s = this.state;
    const problems: string[] = [];
    const note = (m: string): void => {
      problems.push(m);
      this.log(`cleanup: ${m}`);
    };
    const t0 = Date.now();
    const step = (what: string): void => {
      if (process.env.FLOTILLA_TESTBED_DEBUG) this.log(`destroy: ${what} after ${Date.now() - t0} ms`);
    };
    // 1. daemons: agents first, so they do not chase a stopped manager; in parallel within each role
    for (const role of ['agent', 'manager'] as const) {
      await Promise.all(
        s.hosts
          .filter((h) => h.role === role)
          .map(async (h) => {
            const slow = (): void => this.log(`${h.name}: daemon pid ${h.pid} still running ${STOP_DEADLINE_MS} ms after SIGTERM: SIGKILL`);
            if (h.pid && !(await stopPid(h.pid, STOP_DEADLINE_MS, slow))) note(`${h.name}: daemon pid ${h.pid} survived SIGKILL`);
            h.pid = 0;
          }),
      );
    }
    step('daemons stopped');
    // 2. containers, by the runtime's own removal, then runc for what is left (hosts in parallel)
    const ids = containerIds.get(s.runId) ?? new Set<string>();
    containerIds.set(s.runId, ids);
    await Promise.all(this.hosts.map((host) => this.removeContainers(host, ids, note)));
    step('containers removed');
    // 3. any process still inside a host namespace or naming the run's directory (conmon, a stray exec)
    for (let round = 0; round < 2; round++) {
      const stray = this.processes();
      if (stray.length === 0) break;
      for (const p of stray) {
        if (round === 0) note(`process ${p.pid} (${p.cmd.slice(0, 120)}) still there: killing it`);
        try {
          process.kill(p.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
      await sleep(200);
    }
    // 4. namespaces: deleting one destroys its veth end, and the underlay's deletion the bridge
    for (const ns of [...s.hosts.map((h) => h.netns), ...(s.clients ?? []).map((c) => c.netns), s.underlay]) {
      if (!fs.existsSync(path.join(NETNS_DIR, ns))) continue;
      const r = await run('ip', ['netns', 'delete', ns]);
      if (r.code !== 0) note(`ip netns delete ${ns} failed: ${r.stderr.trim()}`);
    }
    // 5. mounts left under the directory (a crashed container's rootfs), run roots, the directory
    const under = (m: string): boolean => [s.root, ...s.runRoots].some((d) => m === d || m.startsWith(d + '/'));
    for (const mp of mountPoints().filter(under).reverse()) {
      const r = await run('umount', ['-l', mp]);
      if (r.code !== 0) note(`umount ${mp} failed: ${r.stderr.trim()}`);
      else note(`mount ${mp} was left: unmounted`);
    }
    for (const rr of new Set([...s.runRoots, ...runRootsUnder(s.root)])) fs.rmSync(rr, { recursive: true, force: true });
    try {
      fs.rmSync(s.root, { recursive: true, force: true });
    } catch (err) {
      note(`removing ${s.root} failed: ${(err as Error).message}`);
    }
    step('namespaces and directories removed');
    for (const l of this.leftovers()) note(`left behind: ${l}`);
    return problems;
  }

  private async removeContainers(host: TestbedHost, ids: Set<string>, note: (m: string) => void): Promise<void> {
    const s = this.state;
    const h = host.state;
    if (!fs.existsSync(path.join(h.dataDir, 'run-root'))) return;
    const ls = await host.cli(['container', 'ls', '-a', '--format', 'json']);
    let list: Array<{ id: string }> = [];
    try {
      list = ls.code === 0 ? (JSON.parse(ls.stdout) as Array<{ id: string }>) : [];
    } catch {
      list = [];
    }
    if (ls.code !== 0) note(`${h.name}: container ls failed: ${ls.stderr.trim()}`);
    for (const c of list) ids.add(c.id);
    if (list.length) {
      const rm = await host.cli(['container', 'rm', '-f', ...list.map((c) => c.id)]);
      if (rm.code !== 0) note(`${h.name}: container rm -f failed: ${rm.stderr.trim()}`);
    }
    let runRoot = '';
    try {
      runRoot = fs.readFileSync(path.join(h.dataDir, 'run-root'), 'utf8').trim();
    } catch {
      /* none */
    }
    if (runRoot && !s.runRoots.includes(runRoot)) s.runRoots.push(runRoot);
    const runcRoot = path.join(runRoot, 'runc');
    if (runRoot && fs.existsSync(runcRoot)) {
      const r = await run('runc', ['--root', runcRoot, 'list', '-q']);
      for (const id of r.stdout.split('\n').filter(Boolean)) {
        ids.add(id);
        note(`${h.name}: container ${id} survived container rm: runc delete --force`);
        const d = await run('runc', ['--root', runcRoot, 'delete', '--force', id]);
        if (d.code !== 0) note(`${h.name}: runc delete --force ${id} failed: ${d.stderr.trim()}`);
      }
    }
  }

  /**
   * Processes inside one of the run's network namespaces, or programs of the bed (node, conmon, runc,
   * nsenter) naming its directory or run roots; not, say, a shell that reads a log of the bed.
   */
  private processes(): Array<{ pid: number; cmd: string }> {
    const inodes = new Set(this.state.netnsInodes);
    const self = netInode('self');
    const dirs = [this.state.root, ...this.state.runRoots];
    const out: Array<{ pid: number; cmd: string }> = [];
    for (const pid of pids()) {
      const cmd = cmdline(pid);
      const ino = netInode(pid);
      const ours = /^(node|conmon|runc|nsenter)$/.test(path.basename(cmd.split(' ')[0] ?? '')) && dirs.some((d) => cmd.includes(d + '/') || cmd.includes(d + ' '));
      if (((ino && ino !== self && inodes.has(ino)) || ours) && alive(pid)) out.push({ pid, cmd });
    }
    return out;
  }

  /**
   * What exists of run runId, from its names alone (for a bed whose create() failed, so no instance was
   * returned): namespaces, root-namespace links, processes naming its directory, mounts, run roots, the
   * directory, and cgroups of containers this process saw in it.
   */
  static leftovers(runId: string): string[] {
    const root = path.join(os.tmpdir(), `${ROOT_PREFIX}${runId}`);
    let state: BedState | undefined;
    try {
      state = JSON.parse(fs.readFileSync(path.join(root, 'testbed.json'), 'utf8')) as BedState;
    } catch {
      state = undefined;
    }
    let ns: string[] = [];
    try {
      ns = fs.readdirSync(NETNS_DIR).filter((n) => n.startsWith(`fl-${runId}-`));
    } catch {
      /* none */
    }
    const base: BedState = state ?? { runId, ownerPid: 0, manual: false, root, subnet: '', underlay: `fl-${runId}-ul`, bridge: '', port: PORT, hosts: [], netnsInodes: [], runRoots: [] };
    const out = new Testbed(base, {}).leftovers();
    for (const n of ns) if (!out.includes(`netns ${n}`)) out.push(`netns ${n}`);
    return out;
  }

  /** What of this bed exists on the machine: one line per thing (empty after a clean destroy()). */
  leftovers(): string[] {
    const s = this.state;
    const out: string[] = [];
    for (const ns of [s.underlay, ...s.hosts.map((h) => h.netns), ...(s.clients ?? []).map((c) => c.netns)]) if (fs.existsSync(path.join(NETNS_DIR, ns))) out.push(`netns ${ns}`);
    for (const p of this.processes()) out.push(`process ${p.pid}: ${p.cmd.slice(0, 120)}`);
    // no device of the bed is ever made in the root namespace; check that none is there
    const links = fs.readdirSync('/sys/class/net').filter((l) => l.includes(`fl${s.runId}`));
    for (const l of links) out.push(`link ${l}`);
    for (const m of mountPoints()) {
      if ([s.root, ...s.runRoots].some((d) => m === d || m.startsWith(d + '/')) || m.startsWith(`${NETNS_DIR}/fl-${s.runId}-`)) out.push(`mount ${m}`);
    }
    for (const c of flotillaCgroups([...(containerIds.get(s.runId) ?? [])])) out.push(`cgroup ${c}`);
    for (const rr of new Set([...s.runRoots.filter((r) => fs.existsSync(r)), ...runRootsUnder(s.root)])) out.push(`run root ${rr}`);
    if (fs.existsSync(s.root)) out.push(`directory ${s.root}`);
    return out;
  }
}
