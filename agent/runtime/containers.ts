/**
 * The runc runtime: containers as runc + conmon over overlay snapshots of local images.
 *
 * Per-container state is volatile and lives in the run root (tmpfs, see run-root.ts), like runc's own
 * /run/runc; only what must outlive a reboot or can grow is on the data dir's disk:
 *
 *   <run>/containers/<id>/state.json   our record (records.ts)
 *   <run>/containers/<id>/config.json  the OCI bundle's spec; the bundle dir is the container dir
 *   <run>/containers/<id>/rootfs       the root's mount point: runc mounts the snapshot's overlay there in the
 *                                      container's mount namespace (config.json's "/" mount), so the host
 *                                      has no mount to leave behind; only images with too many layers for
 *                                      one page of overlay options are mounted here from create to remove
 *   <run>/containers/<id>/exit, oom    written by conmon (persist dir): exit code, OOM marker
 *   <run>/containers/<id>/hosts ...    /etc/hosts, /etc/resolv.conf, /etc/hostname (bind-mounted)
 *   <run>/containers/<id>/files/<n>    secrets and configs (files.ts; bind-mounted; deleted when it stops)
 *   <run>/exits/<id>                   conmon's exit file (one directory to watch for all containers)
 *   <run>/names/<name>                 name reservation (created O_EXCL: unique across processes)
 *   <run>/runc/                        runc's state root (runc --root)
 *   <data>/logs/<id>/ctr.log           stdout/stderr, k8s-file format, written by conmon
 *   <data>/snapshots/containers/<id>   the container's overlay upper and work dirs (snapshots.ts)
 *
 * Every operation reads the record from disk, so several processes (agent, CLI) can share a data dir.
 * Containers outlive this process: conmon holds them. open() reconciles records with the exit files and
 * runc's state, and cleans up half-created or half-removed containers of crashed processes.
 *
 * The parts: run-root.ts (where the volatile state lives), records.ts (records and names),
 * exit-watcher.ts (exit files, the exits-dir watch, monitor liveness), exec.ts (runc exec); this file
 * holds the container lifecycle over them.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { FlotillaError, errorMessage, invalidArgument, isCode, notFound } from '../../common/errors.js';
import { execInWorker } from './spawner.js';
import { isValidName, newId } from '../../common/ids.js';
import { sleep } from '../../common/sleep.js';
import { cgroupPaths, inCgroup, oomKills, removeCgroups } from './cgroups.js';
import { removeFiles, validateFiles, writeFiles } from './files.js';
import { runcExec, type ExecOptions } from './exec.js';
import { ExitWatcher, isAlive, isMonitor } from './exit-watcher.js';
import { readLogs } from './logs.js';
import { mountAll, overlayFitsInSpec, unmount } from './mount.js';
import { buildSpec, envValue, mergeEnv, mergeResolvConf, processArgs, specJson, DEFAULT_CAPABILITIES, DEFAULT_PATH, INIT_PATH, type NetworkMode, type OciMount, type OciSpec } from './oci.js';
import { VolumeStore } from './volumes.js';
import {
  ULIMITS,
  effectiveCaps,
  normaliseCap,
  validateDnsOption,
  validateGroup,
  validateHostsEntry,
  validateMounts,
  validateNameserver,
  validateSearchDomain,
  validateSysctl,
  validateUlimit,
} from '../../common/containeropts.js';
import { CONTAINER_ID, Records, newRecord, type ContainerRecord } from './records.js';
import { findExecutable, resolveGroups, resolveInRoot, resolveUser } from './rootfs.js';
import { Runc, RuncError, findBinary, startMonitor } from './runc.js';
import { RUN_ROOT_FILE, ownDir, runRootOf } from './run-root.js';
import type {
  ContainerCreateOptions,
  ContainerInfo,
  ContainerRuntime,
  ContainerStatus,
  ExecResult,
  ExitInfo,
  ImageConfig,
  ImageRecord,
  LogEntry,
  MountSpec,
} from './types.js';
import { defaultSeccomp } from './seccomp.js';
import { setLongTimeout } from '../../common/timers.js';

export { runRootOf } from './run-root.js';

/** What the runtime needs of the image half (ImageStore and Snapshotter satisfy it). */
export interface ImageSource {
  get(ref: string): Promise<ImageRecord>;
}
export interface SnapshotSource {
  prepare(key: string, image: ImageRecord): Promise<MountSpec[]>;
  remove(key: string): Promise<void>;
  withImageView<T>(image: ImageRecord, fn: (root: string) => Promise<T>): Promise<T>;
}

export interface RuncRuntimeOptions {
  /** default: ImageStore.open(dataDir) and its snapshotter */
  images?: ImageSource;
  snapshots?: SnapshotSource;
  /** default log size limit per container (bytes); default 10 MiB */
  logSizeMax?: number;
  /** paths of the binaries; default: found in $PATH */
  runc?: string;
  conmon?: string;
}

export interface RuncCreateOptions extends ContainerCreateOptions {
  /** rotate the log at this size (bytes) */
  logSizeMax?: number;
}

export const DEFAULT_LOG_SIZE_MAX = 10 * 1024 * 1024;
const MIN_MEMORY = 6 * 1024 * 1024;
const MIN_NANO_CPUS = 10_000_000; // 0.01 CPU

const TRACE = process.env.FLOTILLA_TRACE === '1';
function tracer(label: string): (step: string) => void {
  if (!TRACE) return () => undefined;
  let last = performance.now();
  return (step) => {
    const now = performance.now();
    process.stderr.write(`[trace] ${label} ${step} ${(now - last).toFixed(1)}ms\n`);
    last = now;
  };
}

/** What create looks up in the image before runc runs: USER, and that the command exists. */
interface Lookup {
  user: string;
  cmd: string;
  /** $PATH of the container's environment */
  path: string;
  cwd: string;
  /** --group-add: names or GIDs */
  groups: string[];
}

interface ProcessUser {
  uid: number;
  gid: number;
  additionalGids: number[];
}

async function lookupIn(root: string, l: Lookup): Promise<ProcessUser> {
  const [user, , groups] = await Promise.all([
    l.user === '' || l.user === 'root' || l.user === '0' ? { uid: 0, gid: 0, additionalGids: [] } : resolveUser(root, l.user),
    findExecutable(root, l.cmd, l.path, l.cwd),
    resolveGroups(root, l.groups),
  ]);
  return { uid: user.uid, gid: user.gid, additionalGids: [...new Set([...user.additionalGids, ...groups])] };
}

/** Entries kept in the per-image lookup cache before it starts over. */
const LOOKUP_CACHE_MAX = 512;

const hostFiles = new Map<string, { at: number; text: Promise<string> }>();
/** A host file (/etc/hosts, /etc/resolv.conf), re-read at most once a second. */
function hostFile(file: string): Promise<string> {
  const c = hostFiles.get(file);
  if (c && Date.now() - c.at < 1000) return c.text;
  const text = fs.readFile(file, 'utf8').catch(() => '');
  hostFiles.set(file, { at: Date.now(), text });
  return text;
}

const SIGNALS = os.constants.signals as Record<string, number>;

/** Validates a signal ("TERM", "SIGTERM", "15") and returns its canonical name without SIG. */
export function parseSignal(sig: string): string {
  const s = sig.trim().toUpperCase();
  if (/^\d+$/.test(s)) {
    const n = Number(s);
    const name = Object.keys(SIGNALS).find((k) => SIGNALS[k] === n);
    if (!name) throw invalidArgument('signal', sig, 'unknown signal number');
    return name.slice(3);
  }
  const name = s.startsWith('SIG') ? s : `SIG${s}`;
  if (SIGNALS[name] === undefined) throw invalidArgument('signal', sig, 'unknown signal (use e.g. TERM, KILL, HUP or a number)');
  return name.slice(3);
}

export function checkRoot(): void {
  if (process.getuid?.() !== 0) {
    throw new FlotillaError('PERMISSION_DENIED', 'the container runtime needs root (runc, mounts and cgroups): run as root');
  }
}

export class RuncRuntime implements ContainerRuntime {
  readonly kind = 'runc' as const;
  readonly records: Records;
  /** the node's named volumes (volumes.ts), in the data dir */
  readonly volumes: VolumeStore;
  private readonly exits: ExitWatcher;
  private readonly locks = new Map<string, Promise<unknown>>();
  /** lookupInImage's answers (or lookups under way) */
  private readonly lookups = new Map<string, Promise<ProcessUser>>();

  private constructor(
    readonly dataDir: string,
    /** volatile per-container state (runRootOf) */
    readonly runRoot: string,
    readonly runc: Runc,
    readonly conmon: string,
    readonly images: ImageSource,
    readonly snapshots: SnapshotSource,
    readonly logSizeMax: number,
  ) {
    this.records = new Records(runRoot, dataDir);
    this.volumes = new VolumeStore(dataDir, () => this.volumeUsers());
    this.exits = new ExitWatcher(this.records.exitsDir);
  }

  /**
   * Opens the runtime over a data dir: checks root, runc and conmon, creates the directories and
   * reconciles the records with what survived (exit files, runc state).
   */
  static async open(dataDir: string, opts: RuncRuntimeOptions = {}): Promise<RuncRuntime> {
    checkRoot();
    const runcBin = opts.runc ?? findBinary('runc');
    if (!runcBin) throw new FlotillaError('FAILED_PRECONDITION', 'runc not found in $PATH: install runc (Debian: apt-get install runc)');
    const conmonBin = opts.conmon ?? findBinary('conmon');
    if (!conmonBin) throw new FlotillaError('FAILED_PRECONDITION', 'conmon not found in $PATH: install conmon (Debian: apt-get install conmon)');
    const abs = path.resolve(dataDir);
    await fs.mkdir(abs, { recursive: true, mode: 0o700 });
    const runRoot = await runRootOf(abs);
    const recordFile = path.join(abs, RUN_ROOT_FILE);
    if (!existsSync(recordFile)) await fs.writeFile(recordFile, `${runRoot}\n`);
    const runc = new Runc(runcBin, path.join(runRoot, 'runc'));
    const dirs = [...['containers', 'exits', 'names', 'runc'].map((d) => path.join(runRoot, d)), path.join(abs, 'logs')];
    // the image store opens while our directories are checked and reconciled
    const [store] = await Promise.all([
      opts.images && opts.snapshots ? undefined : import('./images.js').then(({ ImageStore }) => ImageStore.open(abs)),
      (async () => {
        await ownDir(runRoot);
        const owner = path.join(runRoot, 'data-dir');
        if (!existsSync(owner)) await fs.writeFile(owner, `${abs}\n`);
        for (const d of dirs) await fs.mkdir(d, { recursive: true, mode: 0o700 });
        await RuncRuntime.reconcileDir(abs, runRoot, runc, conmonBin);
      })(),
    ]);
    const images = opts.images ?? store!;
    const snapshots = opts.snapshots ?? store!.snapshots;
    return new RuncRuntime(abs, runRoot, runc, conmonBin, images, snapshots, opts.logSizeMax ?? DEFAULT_LOG_SIZE_MAX);
  }

  /** Reconciles a data dir before the image store is open (cleanup of crashed creates needs the snapshotter lazily). */
  private static async reconcileDir(abs: string, runRoot: string, runc: Runc, conmonBin: string): Promise<void> {
    let store: Promise<SnapshotSource> | undefined;
    const lazySnapshots: SnapshotSource = {
      prepare: () => Promise.reject(new Error('not available during reconcile')),
      withImageView: () => Promise.reject(new Error('not available during reconcile')),
      remove: async (key) => {
        store ??= import('./images.js').then(async ({ ImageStore }) => (await ImageStore.open(abs)).snapshots);
        await (await store).remove(key);
      },
    };
    const lazyImages: ImageSource = { get: () => Promise.reject(new Error('not available during reconcile')) };
    await new RuncRuntime(abs, runRoot, runc, conmonBin, lazyImages, lazySnapshots, DEFAULT_LOG_SIZE_MAX).reconcile();
  }

  /** Stops the exit watcher (pending wait() calls keep polling). Containers keep running. */
  close(): void {
    this.exits.close();
  }

  // ---------------------------------------------------------------------------------------------- records

  /** Serialises mutations of one container within this process. */
  private locked<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(id) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.locks.set(id, tail);
    void tail.then(() => {
      if (this.locks.get(id) === tail) this.locks.delete(id);
    });
    return run;
  }

  /** Resolves a container id, name or unique id prefix to its id. */
  resolve(idOrName: string): Promise<string> {
    return this.records.resolve(idOrName);
  }

  private async load(idOrName: string): Promise<ContainerRecord> {
    const id = await this.resolve(idOrName);
    const rec = await this.records.read(id);
    if (!rec || rec.state === 'removing' || rec.state === 'creating') throw notFound('container', idOrName);
    return this.refresh(rec);
  }

  /**
   * Brings a created/running record up to date with the monitor: an exit file means it stopped; a dead
   * monitor without an exit file means it stopped with an unknown code (-1).
   */
  private async refresh(rec: ContainerRecord): Promise<ContainerRecord> {
    if (rec.state !== 'created' && rec.state !== 'running') return rec;
    const code = await this.records.exitCodeOf(rec.id);
    if (code !== undefined) return this.markStopped(rec, code);
    if (rec.conmonPid && !(await isMonitor(rec.conmonPid, rec.id))) {
      // re-check: the monitor writes the exit file just before it exits
      const again = await this.records.exitCodeOf(rec.id);
      if (again !== undefined) return this.markStopped(rec, again);
      const st = await this.runc.state(rec.id).catch(() => undefined);
      if (!st || st.status === 'stopped') return this.markStopped(rec, -1);
    }
    return rec;
  }

  private async markStopped(rec: ContainerRecord, code: number): Promise<ContainerRecord> {
    let finished = Date.now();
    try {
      finished = (await fs.stat(this.records.exitFile(rec.id))).mtimeMs;
    } catch {
      // no exit file
    }
    const oom = existsSync(path.join(this.records.dir(rec.id), 'oom')) || (await oomKills(rec.cgroupsPath)) > 0;
    const next: ContainerRecord = { ...rec, state: 'stopped', exitCode: code, oomKilled: oom, finished: Math.max(Math.round(finished), rec.started) };
    // a stopped container never runs again: its secrets and configs go at once
    await removeFiles(this.records.dir(rec.id)).catch(() => undefined);
    // another process may be removing it meanwhile: only write over a record that is still there
    if (existsSync(this.records.statePath(rec.id))) await this.records.write(next).catch(() => undefined);
    return next;
  }

  private info(rec: ContainerRecord): ContainerInfo {
    const status: ContainerStatus = rec.state === 'created' ? 'created' : rec.state === 'running' ? 'running' : 'stopped';
    return {
      id: rec.id,
      name: rec.name,
      image: rec.image,
      imageDigest: rec.imageDigest,
      status,
      pid: status === 'stopped' ? 0 : rec.pid,
      exitCode: rec.exitCode,
      oomKilled: rec.oomKilled,
      // the overlay is mounted in the container's own mount namespace: seen from the host through its init
      rootfs: status === 'stopped' || rec.pid <= 0 ? '' : `/proc/${rec.pid}/root`,
      cgroupPaths: cgroupPaths(rec.cgroupsPath),
      labels: rec.labels,
      created: rec.created,
      started: rec.started,
      finished: rec.finished,
    };
  }

  // ---------------------------------------------------------------------------------------------- create

  private validate(o: RuncCreateOptions): NetworkMode {
    if (typeof o.name !== 'string' || !isValidName(o.name)) {
      throw invalidArgument('container name', o.name, 'use 1-63 letters, digits, "_", "." or "-", starting with a letter or digit');
    }
    if (typeof o.image !== 'string' || o.image.trim() === '') throw invalidArgument('image', o.image, 'an image name or digest is required');
    if (o.hostname !== undefined && !/^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,62})$/.test(o.hostname)) throw invalidArgument('hostname', o.hostname, 'not a valid host name');
    if (o.memoryBytes !== undefined && o.memoryBytes !== 0) {
      if (!Number.isSafeInteger(o.memoryBytes) || o.memoryBytes < 0) throw invalidArgument('memory', o.memoryBytes, 'must be a whole number of bytes');
      if (o.memoryBytes < MIN_MEMORY) throw invalidArgument('memory', o.memoryBytes, 'the minimum memory limit is 6MiB');
    }
    if (o.nanoCpus !== undefined && o.nanoCpus !== 0) {
      const max = os.availableParallelism() * 1e9;
      if (!Number.isSafeInteger(o.nanoCpus) || o.nanoCpus < MIN_NANO_CPUS || o.nanoCpus > max) {
        throw invalidArgument('cpus', o.nanoCpus / 1e9, `the range of CPUs is 0.01 to ${os.availableParallelism()}`);
      }
    }
    if (o.pidsLimit !== undefined && (!Number.isSafeInteger(o.pidsLimit) || o.pidsLimit < 0)) throw invalidArgument('pids limit', o.pidsLimit, 'must be a non-negative integer');
    if (o.logSizeMax !== undefined && (!Number.isSafeInteger(o.logSizeMax) || o.logSizeMax < 1024)) throw invalidArgument('log size max', o.logSizeMax, 'must be at least 1024 bytes');
    for (const e of o.env ?? []) {
      if (typeof e !== 'string' || e.startsWith('=') || e === '' || e.includes('\0')) throw invalidArgument('env', e, 'expected KEY=VALUE');
    }
    for (const a of [...(o.command ?? []), ...(o.entrypoint ?? [])]) if (typeof a !== 'string' || a.includes('\0')) throw invalidArgument('command', a, 'arguments must be strings without NUL');
    if (o.workdir !== undefined && o.workdir !== '' && !o.workdir.startsWith('/')) throw invalidArgument('workdir', o.workdir, 'must be an absolute path');
    if (o.seccomp !== undefined && o.seccomp !== '' && o.seccomp !== 'default' && o.seccomp !== 'unconfined') throw invalidArgument('seccomp', o.seccomp, 'use default or unconfined');
    validateFiles(o.files);
    const net = o.network ?? '';
    validateMounts('mount', o.mounts ?? []);
    for (const c of o.capAdd ?? []) normaliseCap('cap-add', c);
    for (const c of o.capDrop ?? []) normaliseCap('cap-drop', c);
    for (const u of o.ulimits ?? []) validateUlimit('ulimit', u);
    for (const [k, v] of Object.entries(o.sysctls ?? {})) validateSysctl('sysctl', k, v, net === 'host');
    if (o.stopSignal !== undefined && o.stopSignal !== '') parseSignal(o.stopSignal);
    for (const d of o.dns?.nameservers ?? []) validateNameserver('dns', d);
    for (const d of o.dns?.search ?? []) validateSearchDomain('dns-search', d);
    for (const d of o.dns?.options ?? []) validateDnsOption('dns-option', d);
    for (const h of o.extraHosts ?? []) validateHostsEntry('host', h);
    for (const g of o.groups ?? []) validateGroup('group', g);
    if (o.init && !findBinary('tini-static')) {
      throw new FlotillaError('FAILED_PRECONDITION', 'init: tini-static not found in $PATH on this node (Debian: apt-get install tini)');
    }
    if (o.netns !== undefined && o.netns !== '') {
      if (!path.isAbsolute(o.netns)) throw invalidArgument('netns', o.netns, 'must be an absolute path');
      if (net === 'host' || net === 'none') throw invalidArgument('network', net, 'a container joining a network namespace cannot also use host or none');
    }
    if (net === '' || net === 'private' || net === 'bridge' || net === 'default') return 'private';
    if (net === 'host' || net === 'none') return net;
    throw invalidArgument('network', net, 'use host or none (or leave it empty for a private network namespace)');
  }

  private async getImage(ref: string): Promise<ImageRecord> {
    try {
      return await this.images.get(ref);
    } catch (err) {
      if (isCode(err, 'NOT_FOUND')) {
        throw new FlotillaError('NOT_FOUND', `image ${JSON.stringify(ref)} not found: import it first (flotilla image import)`, { cause: err });
      }
      throw err;
    }
  }

  async create(opts: RuncCreateOptions): Promise<ContainerInfo> {
    const tr = tracer(`create ${opts.name}`);
    const network = this.validate(opts);
    const image = await this.getImage(opts.image.trim());
    tr('image');
    const id = newId();
    const dir = this.records.dir(id);
    const hostname = opts.hostname || opts.name;
    const rec = newRecord(id, 'creating', {
      name: opts.name,
      image: image.name,
      imageDigest: image.digest,
      created: Date.now(),
      labels: { ...(opts.labels ?? {}) },
      logSizeMax: opts.logSizeMax ?? this.logSizeMax,
    });
    // volumes are in the record from the start: `volume rm` refuses them while this create runs
    const userMounts = (opts.mounts ?? []).map((m) => (m.type === 'volume' && m.source === '' ? { ...m, source: `anon-${newId()}`, anonymous: true } : { ...m, anonymous: false }));
    rec.volumes = [...new Set(userMounts.filter((m) => m.type === 'volume').map((m) => m.source))];
    rec.anonVolumes = userMounts.filter((m) => m.anonymous).map((m) => m.source);
    if (opts.stopSignal) rec.stopSignal = parseSignal(opts.stopSignal);
    const createdVolumes: string[] = [];
    let nameTaken = false;
    let snapshot = false;
    let monitor = false;
    await fs.mkdir(dir, { mode: 0o700 });
    try {
      await this.records.write(rec);
      await this.records.reserveName(opts.name, id);
      nameTaken = true;
      tr('record+name');
      snapshot = true;
      const rootfs = this.records.rootfs(id);
      const cfg: ImageConfig = image.config;
      const env = mergeEnv(hostname, cfg.env ?? [], opts.env ?? []);
      const args = processArgs(cfg, opts.command, opts.entrypoint);
      if (args.length === 0) throw new FlotillaError('INVALID_ARGUMENT', `no command: image ${image.name} has no Entrypoint or Cmd and none was given`);
      const userSpec = opts.user ?? cfg.user ?? '';
      const cwd = opts.workdir || cfg.workingDir || '/';
      // a bind of a host path that is not there is refused before anything else is made
      for (const m of userMounts) {
        if (m.type === 'bind' && !existsSync(m.source)) {
          throw new FlotillaError('INVALID_ARGUMENT', `invalid mount config for type "bind": bind source path does not exist: ${m.source}`);
        }
      }
      const initBin = opts.init ? findBinary('tini-static') : undefined;
      // the volumes, created on demand (and made mounted when they have a file system of their own)
      const volumePaths = new Map<string, string>();
      for (const m of userMounts) {
        if (m.type !== 'volume' || volumePaths.has(m.source)) continue;
        const r = await this.volumes.acquire(m.source, { options: m.volumeOpts, labels: m.volumeLabels, anonymous: m.anonymous });
        if (r.created) createdVolumes.push(m.source);
        volumePaths.set(m.source, r.volume.mountpoint);
      }
      tr('volumes');
      rec.args = opts.init ? [INIT_PATH, '--', ...args] : args;
      // the /etc files do not need the rootfs: write them while the snapshot is prepared
      const [etc, files, , prepared] = await Promise.all([
        this.writeEtcFiles(dir, hostname, network, opts.resolvConf, opts.dns, opts.extraHosts),
        writeFiles(dir, opts.files),
        fs.mkdir(path.dirname(this.records.logPath(id)), { recursive: true, mode: 0o700 }),
        (async () => {
          const mounts = await this.snapshots.prepare(id, image);
          tr('snapshot');
          // Normally runc mounts the overlay itself, as the container's "/" mount, inside the container's
          // mount namespace: no mount(8) here, nothing mounted on the host, nothing to unmount at rm.
          // Only an image with so many layers that the options pass the kernel's page limit gets the old
          // way: mounted here (with relative lowerdirs) onto the bundle's rootfs.
          const rootMount = mounts.length === 1 && overlayFitsInSpec(mounts[0]!) ? mounts[0]! : undefined;
          if (rootMount) await fs.mkdir(rootfs, { mode: 0o755 });
          else {
            await mountAll(mounts, rootfs);
            tr('mount');
          }
          const lookup = { user: userSpec, cmd: args[0]!, path: envValue(env, 'PATH') ?? DEFAULT_PATH, cwd, groups: opts.groups ?? [] };
          const user = rootMount ? await this.lookupInImage(image, lookup) : await lookupIn(rootfs, lookup);
          return { user, rootMount };
        })(),
      ]);
      const { user, rootMount } = prepared;
      tr('lookups');
      // a new, empty volume gets the image's files at its target (Docker's copy; volume-nocopy skips it)
      const fresh = userMounts.filter((m) => m.type === 'volume' && createdVolumes.includes(m.source) && !m.volumeNocopy);
      if (fresh.length > 0) {
        await this.snapshots.withImageView(image, async (root) => {
          for (const m of fresh) await copyUp(root, m.target, volumePaths.get(m.source)!);
        });
        tr('copy-up');
      }
      const ociMounts: OciMount[] = userMounts.map((m) => {
        const ro = m.readonly ? 'ro' : 'rw';
        if (m.type === 'bind') return { destination: m.target, type: 'bind', source: m.source, options: ['rbind', 'rprivate', ro] };
        if (m.type === 'volume') return { destination: m.target, type: 'bind', source: volumePaths.get(m.source)!, options: ['rbind', 'rprivate', 'nosuid', 'nodev', ro] };
        const o = ['nosuid', 'nodev', `mode=${(m.tmpfsMode || 0o1777).toString(8)}`];
        if (m.tmpfsSizeBytes > 0) o.push(`size=${m.tmpfsSizeBytes}`);
        if (m.readonly) o.push('ro');
        return { destination: m.target, type: 'tmpfs', source: 'tmpfs', options: o };
      });
      if (initBin) ociMounts.push({ destination: INIT_PATH, type: 'bind', source: initBin, options: ['rbind', 'ro', 'nosuid', 'nodev'] });

      const spec: OciSpec = buildSpec({
        args,
        env,
        cwd,
        uid: user.uid,
        gid: user.gid,
        additionalGids: user.additionalGids,
        hostname,
        rootfs: 'rootfs',
        cgroupsPath: rec.cgroupsPath,
        network,
        netnsPath: opts.netns || undefined,
        memoryBytes: opts.memoryBytes,
        nanoCpus: opts.nanoCpus,
        pidsLimit: opts.pidsLimit,
        etc,
        files,
        annotations: { 'io.flotilla.container.name': opts.name },
        rootMount,
        seccomp: opts.seccomp === 'unconfined' ? undefined : defaultSeccomp(),
        mounts: ociMounts,
        capabilities: effectiveCaps(DEFAULT_CAPABILITIES, opts.capAdd ?? [], opts.capDrop ?? []),
        readonlyRoot: !!opts.readonlyRootfs,
        rlimits: (opts.ulimits ?? []).map((u) => ({ type: ULIMITS[u.name]!, soft: u.soft, hard: u.hard })),
        sysctl: opts.sysctls,
        terminal: !!opts.tty,
      });
      if (opts.init) spec.process.args = [INIT_PATH, '--', ...spec.process.args];
      await fs.writeFile(path.join(dir, 'config.json'), specJson(spec));
      tr('spec');

      monitor = true;
      const started = await startMonitor({
        conmon: this.conmon,
        runc: this.runc,
        id,
        name: opts.name,
        bundle: dir,
        pidFile: path.join(dir, 'pidfile'),
        conmonPidFile: path.join(dir, 'conmon.pid'),
        logPath: this.records.logPath(id),
        logSizeMax: rec.logSizeMax,
        exitDir: this.records.exitsDir,
        terminal: !!opts.tty,
      });
      tr('conmon+runc create');
      rec.pid = started.pid;
      rec.conmonPid = started.conmonPid;
      rec.state = 'created';
      await this.records.write(rec);
      tr('record');
      return this.info(rec);
    } catch (err) {
      await this.cleanup(rec, { monitor, snapshot, name: nameTaken }).catch(() => undefined);
      // volumes this create made (and nobody else has started using since) go too: nothing half-made stays
      for (const v of createdVolumes) await this.volumes.remove(v).catch(() => undefined);
      throw err;
    }
  }

  /**
   * lookupIn over the image's file system. Images are immutable, so the answer is cached by image digest
   * and inputs: a service's replicas look up once, not once per container (the first one reads a view of
   * the image's layers; concurrent creates share that one lookup). Failures are not cached.
   */
  private lookupInImage(image: ImageRecord, l: Lookup): Promise<ProcessUser> {
    const key = JSON.stringify([image.digest, l.user, l.cmd, l.path, l.cwd, l.groups]);
    let p = this.lookups.get(key);
    if (!p) {
      if (this.lookups.size >= LOOKUP_CACHE_MAX) this.lookups.clear();
      p = this.snapshots.withImageView(image, (root) => lookupIn(root, l));
      this.lookups.set(key, p);
      p.catch(() => this.lookups.delete(key));
    }
    return p;
  }

  private async writeEtcFiles(
    dir: string,
    hostname: string,
    network: NetworkMode,
    resolvText?: string,
    dns?: RuncCreateOptions['dns'],
    extraHosts?: string[],
  ): Promise<{ hosts: string; resolvConf: string; hostname: string }> {
    const hosts = path.join(dir, 'hosts');
    const resolvConf = path.join(dir, 'resolv.conf');
    const hostnameFile = path.join(dir, 'hostname');
    let hostsText = `127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t${hostname}\n`;
    if (network === 'host') hostsText = (await hostFile('/etc/hosts')) || hostsText;
    if (extraHosts?.length) hostsText = `${hostsText.replace(/\n?$/, '\n')}${extraHosts.map((e) => e.trim().split(/\s+/).join('\t')).join('\n')}\n`;
    // an overlay task's resolv.conf names its networks' resolvers: they stay first
    const resolv = mergeResolvConf(resolvText ?? (network === 'none' ? '' : await hostFile('/etc/resolv.conf')), dns, resolvText !== undefined);
    await Promise.all([fs.writeFile(hosts, hostsText, { mode: 0o644 }), fs.writeFile(resolvConf, resolv, { mode: 0o644 }), fs.writeFile(hostnameFile, `${hostname}\n`, { mode: 0o644 })]);
    return { hosts, resolvConf, hostname: hostnameFile };
  }

  /**
   * Removes everything a container has, whatever state it got to: its runc container (killing it), the
   * monitor, the rootfs mount, the snapshot, the cgroups, the exit file, the directory and the name.
   */
  private async cleanup(rec: ContainerRecord, what: { monitor: boolean; snapshot: boolean; name: boolean }): Promise<void> {
    const errors: string[] = [];
    const step = async (label: string, fn: () => Promise<unknown>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        errors.push(`${label}: ${errorMessage(err)}`);
      }
    };
    if (what.monitor) {
      await step('runc delete', async () => {
        try {
          await this.runc.delete(rec.id, true);
        } catch (err) {
          if (!(err instanceof RuncError && err.notExist)) throw err;
        }
      });
      await step('monitor', () => this.waitMonitorGone(rec));
    }
    await step('unmount', () => unmount(this.records.rootfs(rec.id)));
    if (what.snapshot) await step('snapshot', () => this.snapshots.remove(rec.id));
    await step('cgroups', async () => {
      const left = await removeCgroups(rec.cgroupsPath);
      if (left.length > 0) throw new Error(`could not remove ${left.join(', ')}`);
    });
    await step('files', () => removeFiles(this.records.dir(rec.id)));
    await step('exit file', () => fs.rm(this.records.exitFile(rec.id), { force: true }));
    await step('directory', () => fs.rm(this.records.dir(rec.id), { recursive: true, force: true, maxRetries: 3 }));
    await step('logs', () => fs.rm(path.join(this.records.logsDir, rec.id), { recursive: true, force: true, maxRetries: 3 }));
    for (const v of rec.anonVolumes ?? []) {
      await step(`volume ${v}`, async () => {
        try {
          await this.volumes.remove(v);
        } catch (err) {
          if (!isCode(err, 'NOT_FOUND')) throw err;
        }
      });
    }
    if (what.name) {
      await step('name', () => this.records.releaseName(rec.name, rec.id));
    }
    if (errors.length > 0) throw new FlotillaError('INTERNAL', `removing container ${rec.name} (${rec.id}) left debris: ${errors.join('; ')}`);
  }

  /** Waits (briefly) for the container's conmon to exit, killing it if it lingers. */
  private async waitMonitorGone(rec: ContainerRecord): Promise<void> {
    let pid = rec.conmonPid;
    if (!pid) pid = Number((await fs.readFile(path.join(this.records.dir(rec.id), 'conmon.pid'), 'utf8').catch(() => '0')).trim()) || 0;
    if (!pid) return;
    for (let i = 0; i < 200 && (await isMonitor(pid, rec.id)); i++) {
      if (i === 100) process.kill(pid, 'SIGKILL');
      await sleep(i < 20 ? 5 : 25);
    }
  }

  // ---------------------------------------------------------------------------------------------- lifecycle

  async start(idOrName: string): Promise<void> {
    const id = await this.resolve(idOrName);
    await this.locked(id, async () => {
      const rec = await this.load(id);
      if (rec.state === 'running') throw new FlotillaError('FAILED_PRECONDITION', `container ${rec.name} is already running`);
      if (rec.state !== 'created') throw new FlotillaError('FAILED_PRECONDITION', `container ${rec.name} has exited and cannot be started again (create a new one)`);
      const t = Date.now();
      await this.runc.start(id);
      rec.state = 'running';
      rec.started = t;
      await this.records.write(rec);
    });
  }

  async wait(idOrName: string, signal?: AbortSignal): Promise<ExitInfo> {
    const id = await this.resolve(idOrName);
    while (true) {
      if (signal?.aborted) throw new FlotillaError('ABORTED', `wait for container ${idOrName} aborted`);
      const rec = await this.load(id).catch((err: unknown) => {
        if (isCode(err, 'NOT_FOUND')) throw new FlotillaError('NOT_FOUND', `container ${JSON.stringify(idOrName)} was removed while waiting for it`);
        throw err;
      });
      if (rec.state === 'stopped') return { exitCode: rec.exitCode ?? -1, oomKilled: rec.oomKilled };
      await this.exits.next(id, signal);
    }
  }

  async stop(idOrName: string, graceMs: number): Promise<void> {
    const id = await this.resolve(idOrName);
    const rec = await this.load(id);
    if (rec.state === 'stopped') return;
    if (rec.state === 'created') {
      // never started: nothing to signal gracefully
      await this.signal(rec, 'KILL');
      await this.waitExited(id, 10_000);
      return;
    }
    await this.signal(rec, rec.stopSignal || 'TERM');
    if (await this.waitExited(id, Math.max(0, graceMs))) return;
    await this.signal(rec, 'KILL', true);
    if (!(await this.waitExited(id, 10_000))) throw new FlotillaError('DEADLINE_EXCEEDED', `container ${rec.name} did not exit after SIGKILL`);
  }

  /**
   * Signals the container's init. When the init pid is verifiably still this container's (it sits in the
   * container's cgroup) the signal goes straight to it, which saves starting a runc process per signal;
   * a SIGKILL to the init of a pid namespace takes every process in it down, so `all` needs nothing more.
   * Otherwise `runc kill`.
   */
  private async signal(rec: ContainerRecord, sig: string, all = false): Promise<void> {
    if (rec.pid > 0 && (await inCgroup(rec.pid, rec.cgroupsPath))) {
      try {
        process.kill(rec.pid, `SIG${sig}` as NodeJS.Signals);
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ESRCH') return;
        // anything else: let runc try
      }
    }
    try {
      await this.runc.kill(rec.id, sig, all);
    } catch (err) {
      if (err instanceof RuncError && (err.notRunning || err.notExist)) return;
      throw err;
    }
  }

  /** true when the container stopped within ms. */
  private async waitExited(id: string, ms: number): Promise<boolean> {
    const ac = new AbortController();
    // ms is a stop grace period from a spec: chained past Node's timer limit
    const timer = setLongTimeout(() => ac.abort(), ms);
    try {
      await this.wait(id, ac.signal);
      return true;
    } catch (err) {
      if (isCode(err, 'ABORTED')) return false;
      throw err;
    } finally {
      timer.clear();
    }
  }

  async kill(idOrName: string, signal: string): Promise<void> {
    const sig = parseSignal(signal);
    const rec = await this.load(idOrName);
    if (rec.state !== 'running' && rec.state !== 'created') throw new FlotillaError('FAILED_PRECONDITION', `container ${rec.name} is not running`);
    try {
      await this.runc.kill(rec.id, sig);
    } catch (err) {
      if (err instanceof RuncError && (err.notRunning || err.notExist)) throw new FlotillaError('FAILED_PRECONDITION', `container ${rec.name} is not running`);
      throw err;
    }
  }

  async remove(idOrName: string, force: boolean): Promise<void> {
    const id = await this.resolve(idOrName);
    await this.locked(id, async () => {
      let rec = await this.load(id);
      if (rec.state === 'running' || rec.state === 'created') {
        if (!force) throw new FlotillaError('FAILED_PRECONDITION', `container ${rec.name} is ${rec.state === 'running' ? 'running' : 'created but not stopped'}: stop it first or force the removal`);
        await this.signal(rec, 'KILL', true);
        if (rec.state === 'created') {
          await this.runc.delete(id, true).catch(() => undefined);
        }
        await this.waitExited(id, 10_000);
        rec = (await this.records.read(id)) ?? rec;
      }
      rec.state = 'removing';
      rec.ownerPid = process.pid;
      await this.records.write(rec);
      await this.cleanup(rec, { monitor: true, snapshot: true, name: true });
    });
  }

  async inspect(idOrName: string): Promise<ContainerInfo> {
    return this.info(await this.load(idOrName));
  }

  async list(): Promise<ContainerInfo[]> {
    const ids = await fs.readdir(this.records.containersDir);
    const recs = await Promise.all(
      ids.map(async (id) => {
        const rec = await this.records.read(id);
        if (!rec || rec.state === 'creating' || rec.state === 'removing') return undefined;
        return this.refresh(rec).catch(() => rec);
      }),
    );
    return recs
      .filter((r): r is ContainerRecord => r !== undefined)
      .sort((a, b) => b.created - a.created)
      .map((r) => this.info(r));
  }

  // ---------------------------------------------------------------------------------------------- exec, logs

  /** Runs cmd in the running container (exec.ts); opts.stdout/stderr get its output as it comes. */
  async exec(idOrName: string, cmd: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const rec = await this.load(idOrName);
    if (rec.state !== 'running') throw new FlotillaError('FAILED_PRECONDITION', `container ${rec.name} is not running`);
    if (cmd.length === 0 || cmd[0] === '') throw invalidArgument('command', cmd, 'a command is required');
    return runcExec(this.runc, { id: rec.id, name: rec.name, pid: rec.pid, bundle: this.records.dir(rec.id) }, cmd, opts);
  }

  async *logs(idOrName: string, opts: { follow?: boolean; tail?: number; signal?: AbortSignal } = {}): AsyncIterable<LogEntry> {
    const rec = await this.load(idOrName);
    const id = rec.id;
    yield* readLogs(this.records.logPath(id), {
      follow: opts.follow,
      tail: opts.tail,
      signal: opts.signal,
      done: async () => (await this.records.exitCodeOf(id)) !== undefined || !existsSync(this.records.statePath(id)),
    });
  }

  // ---------------------------------------------------------------------------------------------- images

  async hasImage(ref: string): Promise<boolean> {
    try {
      await this.images.get(ref);
      return true;
    } catch (err) {
      if (isCode(err, 'NOT_FOUND') || isCode(err, 'INVALID_ARGUMENT')) return false;
      throw err;
    }
  }

  async imageConfig(ref: string): Promise<ImageConfig> {
    return (await this.getImage(ref)).config;
  }

  // ---------------------------------------------------------------------------------------------- volumes

  /** volume name → the containers (any state but being removed) whose records reference it */
  private async volumeUsers(): Promise<Map<string, string[]>> {
    const m = new Map<string, string[]>();
    for (const id of await fs.readdir(this.records.containersDir).catch(() => [] as string[])) {
      const rec = await this.records.read(id);
      if (!rec || rec.state === 'removing') continue;
      for (const v of rec.volumes ?? []) m.set(v, [...(m.get(v) ?? []), rec.name || id]);
    }
    return m;
  }

  // ---------------------------------------------------------------------------------------------- reconcile

  /**
   * Brings the data dir to a consistent state after a crash or restart:
   *  - running/created records whose exit file exists (or whose monitor died) become stopped;
   *  - records left in creating/removing by a process that no longer runs are cleaned up completely;
   *  - runc containers, name reservations and exit files without a record are removed.
   */
  async reconcile(): Promise<void> {
    const ids = await fs.readdir(this.records.containersDir);
    const known = new Set<string>();
    await Promise.all(
      ids.map(async (id) => {
        const rec = await this.records.read(id);
        if (!rec) {
          // a directory without a record: a create that crashed before writing it (or not ours)
          if (CONTAINER_ID.test(id)) {
            const st = await fs.stat(this.records.dir(id)).catch(() => undefined);
            if (st && Date.now() - st.mtimeMs > 60_000) {
              await this.cleanup(newRecord(id, 'removing'), { monitor: true, snapshot: true, name: false }).catch(() => undefined);
              return;
            }
          }
          known.add(id);
          return;
        }
        known.add(id);
        if ((rec.state === 'creating' || rec.state === 'removing') && !isAlive(rec.ownerPid)) {
          await this.cleanup(rec, { monitor: true, snapshot: true, name: true }).catch(() => undefined);
          known.delete(id);
          return;
        }
        await this.refresh(rec).catch(() => undefined);
      }),
    );
    // runc containers without a record (crash between runc create and our cleanup)
    const runcIds = await fs.readdir(this.runc.root).catch(() => [] as string[]);
    for (const rid of runcIds) {
      if (known.has(rid) || !CONTAINER_ID.test(rid)) continue;
      await this.runc.delete(rid, true).catch(() => undefined);
      await removeCgroups(`/flotilla/${rid}`).catch(() => undefined);
    }
    await this.records.dropStaleNames();
    await this.volumes.reconcile().catch(() => undefined);
    for (const f of await fs.readdir(this.records.exitsDir)) {
      if (CONTAINER_ID.test(f) && !existsSync(this.records.dir(f))) await fs.rm(path.join(this.records.exitsDir, f), { force: true });
    }
    // The disk parts of containers whose volatile state is gone (a reboot empties the run root). A create
    // in another process makes its container dir before its snapshot and log dir, so it is not touched.
    for (const id of await fs.readdir(this.records.logsDir).catch(() => [] as string[])) {
      if (CONTAINER_ID.test(id) && !existsSync(this.records.dir(id))) await fs.rm(path.join(this.records.logsDir, id), { recursive: true, force: true });
    }
    for (const id of await fs.readdir(path.join(this.dataDir, 'snapshots', 'containers')).catch(() => [] as string[])) {
      if (CONTAINER_ID.test(id) && !existsSync(this.records.dir(id))) await this.snapshots.remove(id).catch(() => undefined);
    }
  }
}

/**
 * Copies what the image has at `target` (resolved inside the image's root) into a new volume's directory,
 * owners, modes and times included (cp -a), and gives the volume's root the directory's owner and mode.
 */
async function copyUp(root: string, target: string, dest: string): Promise<void> {
  const src = await resolveInRoot(root, target);
  const st = await fs.stat(src).catch(() => undefined);
  if (!st?.isDirectory()) return;
  // on the spawner thread, as every child of the runtime (agent/runtime/spawner.ts)
  const r = await execInWorker('cp', ['-a', '--', `${src}/.`, `${dest}/`], { timeoutMs: 600_000 });
  if (r.code !== 0) throw new FlotillaError('INTERNAL', `copying the image's ${target} into the volume: ${r.stderr.trim() || r.error || `exit ${r.code}`}`);
  await fs.chown(dest, st.uid, st.gid);
  await fs.chmod(dest, st.mode & 0o7777);
}
