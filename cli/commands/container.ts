/**
 * `flotilla container ...`: containers on this node, straight through the runc runtime (no manager).
 */
import type { Command } from 'commander';
import { RuncRuntime, parseSignal, type RuncCreateOptions } from '../../agent/runtime/containers.js';
import type { ContainerInfo } from '../../agent/runtime/types.js';
import { errorMessage, invalidArgument } from '../../common/errors.js';
import { isValidName } from '../../common/ids.js';
import { resolveDataDir } from '../../common/paths.js';
import { parseBytes, parseCpus, parseUint } from '../../common/units.js';
import { ExitError, action, checkFormat, collect, printJson, table, timeAgo } from '../util.js';
import { setSpawnOnMainThread } from '../../agent/runtime/spawner.js';
import {
  normaliseCap,
  normaliseSignal,
  parseExtraHost,
  parseMount,
  parseSysctl,
  parseUlimit,
  parseVolumeShort,
  readEnvFile,
  validateDnsOption,
  validateGroup,
  validateMounts,
  validateNameserver,
  validateSearchDomain,
} from '../../common/containeropts.js';

interface DataDirOpts {
  dataDir?: string;
}

interface RunOpts extends DataDirOpts {
  detach?: boolean;
  name?: string;
  memory?: string;
  cpus?: string;
  pidsLimit?: string;
  env?: string[];
  workdir?: string;
  user?: string;
  network?: string;
  hostname?: string;
  entrypoint?: string;
  logMaxSize?: string;
  label?: string[];
  rm?: boolean;
  securityOpt?: string[];
  mount?: string[];
  volume?: string[];
  capAdd?: string[];
  capDrop?: string[];
  readOnly?: boolean;
  init?: boolean;
  ulimit?: string[];
  sysctl?: string[];
  stopSignal?: string;
  dns?: string[];
  dnsSearch?: string[];
  dnsOption?: string[];
  addHost?: string[];
  groupAdd?: string[];
  tty?: boolean;
  envFile?: string[];
}

const DATA_DIR_HELP = 'node data directory (default: $FLOTILLA_DATA_DIR or /var/lib/flotilla)';

function openRuntime(opts: DataDirOpts): Promise<RuncRuntime> {
  // one command at a time: spawning from this thread is quicker than starting the spawner's thread
  setSpawnOnMainThread(true);
  return RuncRuntime.open(resolveDataDir(opts.dataDir));
}

/** Turns the run flags into create options; throws INVALID_ARGUMENT before anything is created. */
export function runOptions(image: string, command: string[], o: RunOpts): RuncCreateOptions {
  const name = o.name ?? `c-${Math.random().toString(36).slice(2, 10)}`;
  if (!isValidName(name)) throw invalidArgument('--name', name, 'use 1-63 letters, digits, "_", "." or "-", starting with a letter or digit');
  const env: string[] = [...(o.envFile ?? []).flatMap((f) => readEnvFile('--env-file', f))];
  for (const e of o.env ?? []) {
    if (e.startsWith('=') || e === '') throw invalidArgument('--env', e, 'expected KEY=VALUE');
    if (e.includes('=')) env.push(e);
    else if (process.env[e] !== undefined) env.push(`${e}=${process.env[e]}`);
  }
  const labels: Record<string, string> = {};
  for (const l of o.label ?? []) {
    const i = l.indexOf('=');
    if (i === 0) throw invalidArgument('--label', l, 'expected KEY=VALUE');
    if (i < 0) labels[l] = '';
    else labels[l.slice(0, i)] = l.slice(i + 1);
  }
  if (o.network !== undefined && !['host', 'none', '', 'private', 'bridge', 'default'].includes(o.network)) {
    throw invalidArgument('--network', o.network, 'use host or none');
  }
  const opts: RuncCreateOptions = { name, image, env, labels };
  if (command.length > 0) opts.command = command;
  if (o.entrypoint !== undefined) opts.entrypoint = o.entrypoint === '' ? [] : [o.entrypoint];
  if (o.memory !== undefined) opts.memoryBytes = parseBytes('--memory', o.memory);
  if (o.cpus !== undefined) opts.nanoCpus = parseCpus('--cpus', o.cpus);
  if (o.pidsLimit !== undefined) opts.pidsLimit = parseUint('--pids-limit', o.pidsLimit);
  if (o.workdir !== undefined) opts.workdir = o.workdir;
  if (o.user !== undefined) opts.user = o.user;
  if (o.network !== undefined) opts.network = o.network;
  if (o.hostname !== undefined) opts.hostname = o.hostname;
  if (o.logMaxSize !== undefined) opts.logSizeMax = parseBytes('--log-max-size', o.logMaxSize);
  const mounts = [...(o.volume ?? []).map((v) => parseVolumeShort('--volume', v)), ...(o.mount ?? []).map((v) => parseMount('--mount', v))];
  validateMounts('--mount', mounts);
  if (mounts.length > 0) opts.mounts = mounts;
  if (o.capAdd?.length) opts.capAdd = o.capAdd.map((c) => normaliseCap('--cap-add', c));
  if (o.capDrop?.length) opts.capDrop = o.capDrop.map((c) => normaliseCap('--cap-drop', c));
  if (o.readOnly) opts.readonlyRootfs = true;
  if (o.init) opts.init = true;
  if (o.tty) opts.tty = true;
  if (o.ulimit?.length) opts.ulimits = o.ulimit.map((u) => parseUlimit('--ulimit', u));
  if (o.sysctl?.length) opts.sysctls = Object.fromEntries(o.sysctl.map((x) => parseSysctl('--sysctl', x)));
  if (o.stopSignal !== undefined) opts.stopSignal = normaliseSignal('--stop-signal', o.stopSignal);
  for (const d of o.dns ?? []) validateNameserver('--dns', d);
  for (const d of o.dnsSearch ?? []) validateSearchDomain('--dns-search', d);
  for (const d of o.dnsOption ?? []) validateDnsOption('--dns-option', d);
  if (o.dns?.length || o.dnsSearch?.length || o.dnsOption?.length) opts.dns = { nameservers: o.dns ?? [], search: o.dnsSearch ?? [], options: o.dnsOption ?? [] };
  if (o.addHost?.length) opts.extraHosts = o.addHost.map((h) => parseExtraHost('--add-host', h));
  for (const g of o.groupAdd ?? []) validateGroup('--group-add', g);
  if (o.groupAdd?.length) opts.groups = o.groupAdd;
  for (const so of o.securityOpt ?? []) {
    // Docker's spelling; only the seccomp choice exists here (a profile file is not supported)
    const m = /^seccomp[=:](default|unconfined)$/.exec(so);
    if (!m) throw invalidArgument('--security-opt', so, 'supported: seccomp=unconfined, seccomp=default');
    opts.seccomp = m[1]!;
  }
  return opts;
}

function statusText(c: ContainerInfo): string {
  if (c.status === 'running') return `Up ${timeAgo(c.started).replace(/ ago$/, '')}`;
  if (c.status === 'created') return 'Created';
  return `Exited (${c.exitCode ?? '?'})${c.oomKilled ? ' OOMKilled' : ''} ${timeAgo(c.finished)}`;
}

function inspectJson(c: ContainerInfo): Record<string, unknown> {
  return {
    id: c.id,
    name: c.name,
    image: c.image,
    imageDigest: c.imageDigest,
    state: c.status,
    pid: c.pid,
    exitCode: c.exitCode,
    oomKilled: c.oomKilled,
    rootfs: c.rootfs,
    cgroupPaths: c.cgroupPaths,
    labels: c.labels,
    created: c.created,
    started: c.started,
    finished: c.finished,
  };
}

/** The exit code the CLI reports for a container: 137 when the kernel OOM-killed it. */
export function cliExitCode(exit: { exitCode: number; oomKilled: boolean }): number {
  if (exit.oomKilled) return 137;
  if (exit.exitCode < 0) return 125;
  return exit.exitCode & 0xff;
}

/** Streams a container's output to ours until it exits (run without -d, logs -f). */
async function streamLogs(rt: RuncRuntime, id: string, opts: { follow: boolean; tail?: number; timestamps?: boolean; signal?: AbortSignal }): Promise<void> {
  for await (const e of rt.logs(id, { follow: opts.follow, tail: opts.tail, signal: opts.signal })) {
    const line = opts.timestamps ? `${new Date(e.time).toISOString()} ${e.line}\n` : `${e.line}\n`;
    if (e.stream === 'stderr') process.stderr.write(line);
    else process.stdout.write(line);
  }
}

/**
 * A verb over several containers (`<names...>`, --data-dir): flags checked by `prepare` before the runtime
 * opens, then `act` on each name in turn, printing the name (or what act returns); each failure is printed
 * and the command exits non-zero if any failed.
 */
function eachContainer<O extends object, P>(
  cmd: Command,
  act: (rt: RuncRuntime, name: string, p: P) => Promise<string | void>,
  prepare: (o: O) => P = () => undefined as P,
): void {
  cmd
    .argument('<names...>', 'container names or ids')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (names: string[], o: O & DataDirOpts) => {
        const p = prepare(o);
        const rt = await openRuntime(o);
        let failed = 0;
        for (const n of names) {
          try {
            process.stdout.write(`${(await act(rt, n, p)) ?? n}\n`);
          } catch (err) {
            failed++;
            process.stderr.write(`flotilla: ${errorMessage(err)}\n`);
          }
        }
        if (failed > 0) throw new ExitError(1);
      }),
    );
}

export function register(program: Command): void {
  // `container run IMAGE CMD --flag`: the command's flags must reach the command, not the root program
  program.enablePositionalOptions();
  const container = program.command('container').description('Run and manage containers on this node (runc + conmon)').enablePositionalOptions();

  container
    .command('run')
    .description('Create and start a container; without -d, stream its output and exit with its exit code')
    .argument('<image>', 'image name[:tag] or digest')
    .argument('[command...]', 'command and arguments (override the image Cmd)')
    .option('-d, --detach', 'run in the background and print the container id')
    .option('--name <name>', 'container name (default: generated)')
    .option('-m, --memory <size>', 'memory limit, e.g. 64m, 1g')
    .option('--cpus <n>', 'CPU limit, e.g. 0.5')
    .option('--pids-limit <n>', 'maximum number of processes')
    .option('-e, --env <KEY=VALUE>', 'environment variable (repeatable)', collect)
    .option('-w, --workdir <dir>', 'working directory inside the container')
    .option('-u, --user <user>', 'user: name, uid, name:group or uid:gid')
    .option('--network <mode>', 'host, or none (default: own network namespace with loopback)')
    .option('--hostname <name>', 'host name (default: the container name)')
    .option('--entrypoint <cmd>', 'override the image Entrypoint')
    .option('-l, --label <KEY=VALUE>', 'label (repeatable)', collect)
    .option('--log-max-size <size>', 'rotate the container log at this size (default 10m)')
    .option('--rm', 'remove the container when it exits (without -d)')
    .option('--security-opt <opt>', 'seccomp=unconfined to run without the default seccomp filter', collect)
    .option('-v, --volume <spec>', 'mount: NAME:/path[:ro] (a named volume), /host/path:/path[:ro] (a bind) or /path (an anonymous volume) (repeatable)', collect)
    .option('--mount <spec>', 'mount: type=volume|bind|tmpfs,source=...,target=...[,readonly][,volume-opt=K=V][,tmpfs-size=..][,tmpfs-mode=..] (repeatable)', collect)
    .option('--cap-add <cap>', 'add a Linux capability (repeatable)', collect)
    .option('--cap-drop <cap>', 'drop a Linux capability (repeatable)', collect)
    .option('--read-only', 'mount the root file system read-only')
    .option('--init', 'run tini as PID 1 (signals, reaping)')
    .option('--ulimit <name=soft[:hard]>', 'ulimit, e.g. nofile=1024:2048 (repeatable)', collect)
    .option('--sysctl <k=v>', 'namespaced kernel parameter (repeatable)', collect)
    .option('--stop-signal <signal>', 'signal that stops the container (default SIGTERM)')
    .option('--dns <ip>', 'DNS server (repeatable)', collect)
    .option('--dns-search <domain>', 'DNS search domain (repeatable)', collect)
    .option('--dns-option <opt>', 'DNS option (repeatable)', collect)
    .option('--add-host <host:ip>', 'add a host-to-IP mapping to /etc/hosts (repeatable)', collect)
    .option('--group-add <group>', 'additional group (repeatable)', collect)
    .option('-t, --tty', 'allocate a pseudo-TTY')
    .option('--env-file <file>', 'read environment variables from a file (repeatable)', collect)
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .passThroughOptions()
    .action(
      action(async (image: string, command: string[], o: RunOpts) => {
        const opts = runOptions(image, command, o);
        const rt = await openRuntime(o);
        const info = await rt.create(opts);
        try {
          await rt.start(info.id);
        } catch (err) {
          await rt.remove(info.id, true).catch(() => undefined);
          throw err;
        }
        if (o.detach) {
          process.stdout.write(`${info.id}\n`);
          return;
        }
        let signalled = 0;
        const forward = (sig: NodeJS.Signals): void => {
          signalled++;
          void rt.kill(info.id, signalled > 2 ? 'KILL' : sig).catch(() => undefined);
        };
        process.on('SIGINT', forward);
        process.on('SIGTERM', forward);
        try {
          await streamLogs(rt, info.id, { follow: true });
          const exit = await rt.wait(info.id);
          if (o.rm) await rt.remove(info.id, true);
          const code = cliExitCode(exit);
          if (code !== 0) throw new ExitError(code, exit.oomKilled ? `container ${info.name} was killed: out of memory` : '');
        } finally {
          process.off('SIGINT', forward);
          process.off('SIGTERM', forward);
        }
      }),
    );

  container
    .command('ls')
    .alias('list')
    .alias('ps')
    .description('List containers (running ones; -a for all)')
    .option('-a, --all', 'include created and exited containers')
    .option('-q, --quiet', 'only ids')
    .option('--format <format>', 'table or json', 'table')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (o: DataDirOpts & { all?: boolean; quiet?: boolean; format?: string }) => {
        const format = checkFormat(o.format);
        const rt = await openRuntime(o);
        const list = (await rt.list()).filter((c) => o.all || c.status === 'running');
        if (o.quiet) {
          process.stdout.write(list.map((c) => `${c.id}\n`).join(''));
          return;
        }
        if (format === 'json') {
          printJson(list.map(inspectJson));
          return;
        }
        process.stdout.write(
          table(
            ['CONTAINER ID', 'NAME', 'IMAGE', 'CREATED', 'STATUS', 'PID'],
            list.map((c) => [c.id.slice(0, 12), c.name, c.image, timeAgo(c.created), statusText(c), c.pid ? String(c.pid) : '']),
          ),
        );
      }),
    );

  container
    .command('inspect')
    .description('Show a container (JSON by default)')
    .argument('<name>', 'container name or id')
    .option('--format <format>', 'json or table', 'json')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (name: string, o: DataDirOpts & { format?: string }) => {
        const format = checkFormat(o.format);
        const rt = await openRuntime(o);
        const info = inspectJson(await rt.inspect(name));
        if (format === 'json') {
          printJson(info);
          return;
        }
        const rows = Object.entries(info).map(([k, v]) => [k, typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)]);
        process.stdout.write(table(['FIELD', 'VALUE'], rows));
      }),
    );

  container
    .command('logs')
    .description("Print a container's output (stdout to stdout, stderr to stderr)")
    .argument('<name>', 'container name or id')
    .option('-f, --follow', 'keep printing new output until the container exits')
    .option('--tail <n>', 'only the last N lines')
    .option('-t, --timestamps', 'prefix each line with its time')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (name: string, o: DataDirOpts & { follow?: boolean; tail?: string; timestamps?: boolean }) => {
        const tail = o.tail === undefined || o.tail === 'all' ? undefined : parseUint('--tail', o.tail);
        const rt = await openRuntime(o);
        const ac = new AbortController();
        const onSig = (): void => ac.abort();
        process.once('SIGINT', onSig);
        try {
          await streamLogs(rt, name, { follow: !!o.follow, tail, timestamps: o.timestamps, signal: ac.signal });
        } finally {
          process.off('SIGINT', onSig);
        }
      }),
    );

  eachContainer(container.command('start').description('Start created containers'), (rt, n) => rt.start(n));

  eachContainer(
    container
      .command('stop')
      .description('Stop containers: SIGTERM, then SIGKILL after the grace period')
      .option('-t, --time <secs>', 'seconds to wait before SIGKILL', '10'),
    (rt, n, graceMs) => rt.stop(n, graceMs),
    (o: { time: string }) => parseUint('--time', o.time) * 1000,
  );

  eachContainer(
    container
      .command('rm')
      .alias('remove')
      .description('Remove containers and everything they had (mounts, cgroups, files)')
      .option('-f, --force', 'kill running containers first'),
    (rt, n, force) => rt.remove(n, force),
    (o: { force?: boolean }) => !!o.force,
  );

  container
    .command('exec')
    .description('Run a command in a running container; exits with its exit code')
    .argument('<name>', 'container name or id')
    .argument('<command...>', 'command and arguments')
    .option('--timeout <secs>', 'kill the command after this many seconds')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .passThroughOptions()
    .action(
      action(async (name: string, command: string[], o: DataDirOpts & { timeout?: string }) => {
        const timeoutMs = o.timeout === undefined ? undefined : parseUint('--timeout', o.timeout) * 1000;
        const rt = await openRuntime(o);
        const res = await rt.exec(name, command, { timeoutMs, stdout: process.stdout, stderr: process.stderr });
        if (res.exitCode !== 0) throw new ExitError(res.exitCode);
      }),
    );

  eachContainer(
    container
      .command('kill')
      .description('Send a signal to a container (default KILL)')
      .option('-s, --signal <sig>', 'signal name or number', 'KILL'),
    (rt, n, sig) => rt.kill(n, sig),
    (o: { signal: string }) => parseSignal(o.signal),
  );

  eachContainer(container.command('wait').description('Wait for containers to exit and print their exit codes'), async (rt, n) => {
    const exit = await rt.wait(n);
    return `${exit.exitCode}${exit.oomKilled ? ' (OOM killed)' : ''}`;
  });

}
