/**
 * Named local volumes of a node (Docker's "local" driver): a directory per volume on the data dir's
 * disk, so the data outlives containers, tasks, agent restarts and reboots.
 *
 *   <data>/volumes/<name>/volume.json   metadata: name, driver, labels, options, created, anonymous
 *   <data>/volumes/<name>/_data         the data; what containers mount
 *
 * A volume is created by `volume create` or on demand when a container mounts a name that does not exist
 * yet. Creation is atomic (a temp directory renamed into place), so a crash leaves either no volume or
 * a whole one; concurrent creates of one name agree on one volume. Options follow the local driver:
 * `type`, `device` and `o` mount that file system at _data (e.g. type=tmpfs,device=tmpfs,o=size=64m)
 * when a container first needs it; without them the volume is a plain directory.
 *
 * Which containers use a volume is in their records (ContainerRecord.volumes): `rm` and `prune` refuse
 * or skip a volume that any container (running or not) still references.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError, invalidArgument, notFound } from '../../common/errors.js';
import { TEMP_PREFIX, tempName, writeFileAtomic } from '../../common/fsutil.js';
import { VOLUME_NAME, VOLUME_OPT_KEYS } from '../../common/containeropts.js';
import { newId } from '../../common/ids.js';
import { isMounted, mountOne, unmount } from './mount.js';
import { isAlive } from './exit-watcher.js';

export interface VolumeInfo {
  name: string;
  driver: 'local';
  /** the directory containers mount */
  mountpoint: string;
  labels: Record<string, string>;
  options: Record<string, string>;
  /** Unix ms */
  createdAt: number;
  /** made for one container without a name; removed with it */
  anonymous: boolean;
}

interface VolumeMeta {
  version: 1;
  name: string;
  labels: Record<string, string>;
  options: Record<string, string>;
  createdAt: number;
  anonymous: boolean;
}

export interface VolumeCreateOptions {
  labels?: Record<string, string>;
  options?: Record<string, string>;
  anonymous?: boolean;
}

/** Who uses which volume: the runtime answers from its container records. */
export type VolumeUsers = () => Promise<Map<string, string[]>>;

function inUse(name: string, users: string[]): FlotillaError {
  return new FlotillaError('FAILED_PRECONDITION', `volume ${name} is in use by container ${users.join(', ')}: remove the container first`);
}

export class VolumeStore {
  readonly dir: string;

  constructor(
    dataDir: string,
    /** volume name → names of the containers that reference it */
    private readonly users: VolumeUsers = async () => new Map(),
  ) {
    this.dir = path.join(dataDir, 'volumes');
  }

  private volDir(name: string): string {
    return path.join(this.dir, name);
  }

  private checkName(name: string): void {
    if (typeof name !== 'string' || !VOLUME_NAME.test(name)) {
      throw invalidArgument('volume name', name, 'use 1-255 letters, digits, "_", "." or "-", starting with a letter or digit');
    }
  }

  private info(meta: VolumeMeta): VolumeInfo {
    return {
      name: meta.name,
      driver: 'local',
      mountpoint: path.join(this.volDir(meta.name), '_data'),
      labels: meta.labels,
      options: meta.options,
      createdAt: meta.createdAt,
      anonymous: meta.anonymous,
    };
  }

  private async readMeta(name: string): Promise<VolumeMeta | undefined> {
    try {
      return JSON.parse(await fs.readFile(path.join(this.volDir(name), 'volume.json'), 'utf8')) as VolumeMeta;
    } catch {
      return undefined;
    }
  }

  /** A volume's metadata; NOT_FOUND when it does not exist. */
  async inspect(name: string): Promise<VolumeInfo> {
    this.checkName(name);
    const meta = await this.readMeta(name);
    if (!meta) throw notFound('volume', name);
    return this.info(meta);
  }

  async list(): Promise<VolumeInfo[]> {
    const names = await fs.readdir(this.dir).catch(() => [] as string[]);
    const out: VolumeInfo[] = [];
    for (const n of names.sort()) {
      if (n.startsWith(TEMP_PREFIX)) continue;
      const meta = await this.readMeta(n);
      if (meta) out.push(this.info(meta));
    }
    return out;
  }

  /**
   * Creates a volume. `name` empty: an anonymous volume with a generated name. An existing volume of that
   * name is returned as it is (Docker's behaviour) with created=false; its options must not conflict.
   */
  async create(name: string, o: VolumeCreateOptions = {}): Promise<{ volume: VolumeInfo; created: boolean }> {
    const anonymous = name === '' || !!o.anonymous;
    const n = name === '' ? `anon-${newId()}` : name;
    this.checkName(n);
    const options = { ...(o.options ?? {}) };
    for (const k of Object.keys(options)) if (!VOLUME_OPT_KEYS.includes(k)) throw invalidArgument('volume option', k, `the local driver takes ${VOLUME_OPT_KEYS.join(', ')}`);
    if ((options.type !== undefined || options.device !== undefined) && (options.type === undefined || options.device === undefined)) {
      throw invalidArgument('volume option', JSON.stringify(options), 'type and device go together (e.g. type=tmpfs,device=tmpfs,o=size=64m)');
    }
    if (options.o !== undefined && options.type === undefined) throw invalidArgument('volume option', `o=${options.o}`, 'o needs type and device');
    const existing = await this.readMeta(n);
    if (existing) {
      if (Object.keys(options).length > 0 && JSON.stringify(existing.options) !== JSON.stringify(options)) {
        throw new FlotillaError('ALREADY_EXISTS', `volume ${n} already exists with other options (${JSON.stringify(existing.options)})`);
      }
      return { volume: this.info(existing), created: false };
    }
    await fs.mkdir(this.dir, { recursive: true, mode: 0o701 });
    const tmp = path.join(this.dir, `${TEMP_PREFIX}${tempName()}`);
    const meta: VolumeMeta = { version: 1, name: n, labels: { ...(o.labels ?? {}) }, options, createdAt: Date.now(), anonymous };
    try {
      await fs.mkdir(tmp, { mode: 0o701 });
      // _data is 0755 root-owned like Docker's; a copy of the image's directory may change that
      await fs.mkdir(path.join(tmp, '_data'), { mode: 0o755 });
      await writeFileAtomic(path.join(tmp, 'volume.json'), JSON.stringify(meta), { mode: 0o600 });
      await fs.rename(tmp, this.volDir(n));
    } catch (err) {
      await fs.rm(tmp, { recursive: true, force: true }).catch(() => undefined);
      const code = (err as NodeJS.ErrnoException).code;
      // another process created it meanwhile: theirs is the volume
      if (code === 'ENOTEMPTY' || code === 'EEXIST') {
        const now = await this.readMeta(n);
        if (now) return { volume: this.info(now), created: false };
      }
      throw err;
    }
    return { volume: this.info(meta), created: true };
  }

  /**
   * The host path a container mounts for the volume, creating the volume when absent (created tells
   * whether this call made it) and mounting its file system when it has one.
   */
  async acquire(name: string, o: VolumeCreateOptions = {}): Promise<{ volume: VolumeInfo; created: boolean }> {
    const r = await this.create(name, o);
    const meta = r.volume;
    if (meta.options.type !== undefined && !(await isMounted(meta.mountpoint))) {
      try {
        await mountOne({ type: meta.options.type, source: meta.options.device ?? meta.options.type, options: meta.options.o ? meta.options.o.split(',') : [] }, meta.mountpoint);
      } catch (err) {
        if (r.created) await this.destroy(meta.name).catch(() => undefined);
        throw new FlotillaError('FAILED_PRECONDITION', `volume ${meta.name}: cannot mount ${meta.options.type} ${meta.options.device}: ${(err as Error).message}`, { cause: err });
      }
    }
    return r;
  }

  /**
   * Removes the volume's directory and unmounts its file system. The directory is renamed away first, so
   * a half-removed volume is never seen as a volume. With `checkUsers`, who uses the volume is asked
   * again once it is renamed away: a container create writes its record (naming its volumes) before it
   * takes the volume, so a create that raced past the caller's first check is seen here, and the volume
   * is put back (FAILED_PRECONDITION). A create that comes after the rename finds no volume and makes a
   * new one, as if it came after the removal.
   */
  private async destroy(name: string, checkUsers = false): Promise<void> {
    const dir = this.volDir(name);
    const gone = path.join(this.dir, `${TEMP_PREFIX}${tempName()}`);
    await fs.rename(dir, gone);
    if (checkUsers) {
      const users = (await this.users()).get(name) ?? [];
      if (users.length > 0) {
        const back = await fs.rename(gone, dir).then(
          () => true,
          () => false, // that create made a new volume after the rename: this one goes, as if removed first
        );
        if (back) throw inUse(name, users);
      }
    }
    await unmount(path.join(gone, '_data'));
    await fs.rm(gone, { recursive: true, force: true, maxRetries: 3 });
  }

  /** Removes a volume; FAILED_PRECONDITION while a container references it (unless force). */
  async remove(name: string, force = false): Promise<void> {
    this.checkName(name);
    if (!(await this.readMeta(name))) throw notFound('volume', name);
    const users = (await this.users()).get(name) ?? [];
    if (users.length > 0 && !force) throw inUse(name, users);
    await this.destroy(name, !force);
  }

  /** Removes the volumes no container references (anonymous ones only unless all); returns their names. */
  async prune(all = false): Promise<string[]> {
    const users = await this.users();
    const out: string[] = [];
    for (const v of await this.list()) {
      if ((users.get(v.name) ?? []).length > 0) continue;
      if (!all && !v.anonymous) continue;
      try {
        await this.destroy(v.name, true);
      } catch (err) {
        // taken by a container created meanwhile: not unused any more
        if (err instanceof FlotillaError && err.code === 'FAILED_PRECONDITION') continue;
        throw err;
      }
      out.push(v.name);
    }
    return out;
  }

  /** Removes what crashed creates and removals left (temp directories). */
  async reconcile(): Promise<void> {
    for (const n of await fs.readdir(this.dir).catch(() => [] as string[])) {
      if (!n.startsWith(TEMP_PREFIX)) continue;
      // a temp dir is named after its process: one still at work is left alone
      const pid = Number(n.slice(TEMP_PREFIX.length).split('-')[0]);
      if (pid > 0 && isAlive(pid)) continue;
      const p = path.join(this.dir, n);
      await unmount(path.join(p, '_data')).catch(() => undefined);
      await fs.rm(p, { recursive: true, force: true }).catch(() => undefined);
    }
  }

  exists(name: string): boolean {
    return existsSync(path.join(this.volDir(name), 'volume.json'));
  }
}
