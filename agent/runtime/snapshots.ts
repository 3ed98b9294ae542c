/**
 * The snapshotter: one writable snapshot per container over an image's shared, read-only layers.
 *
 *   <data>/snapshots/containers/<key>/upper         the container's private writes (overlay upperdir)
 *   <data>/snapshots/containers/<key>/work          overlay workdir
 *   <data>/snapshots/containers/<key>/snapshot.json the image digest and layers the snapshot uses
 *
 * prepare() returns MountSpec descriptions; it never mounts (mount.ts does).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError, alreadyExists, invalidArgument, notFound } from '../../common/errors.js';
import { cleanStale, tempName } from './content.js';
import type { LayerStore } from './layers.js';
import { mountOne, unmount } from './mount.js';
import type { ImageRecord, MountSpec } from './types.js';

const KEY_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$/;

export interface SnapshotInfo {
  key: string;
  /** the image's manifest digest */
  image: string;
  imageName: string;
  /** layer blob digests, lowest first */
  layers: string[];
  /** Unix ms */
  created: number;
}

export class Snapshotter {
  readonly root: string;

  private constructor(
    dataDir: string,
    readonly layers: LayerStore,
  ) {
    this.root = path.join(dataDir, 'snapshots', 'containers');
  }

  static async open(dataDir: string, layers: LayerStore): Promise<Snapshotter> {
    const abs = path.resolve(dataDir);
    if (/[,:]/.test(abs)) throw invalidArgument('data dir', abs, 'must not contain "," or ":" (they separate overlay mount options)');
    const s = new Snapshotter(abs, layers);
    await fs.mkdir(s.root, { recursive: true, mode: 0o700 });
    // an image view left mounted by a crash must be unmounted before its directory can go
    for (const name of await fs.readdir(s.root)) if (name.startsWith('.tmp-view-')) await unmount(path.join(s.root, name)).catch(() => undefined);
    await cleanStale(s.root, '.tmp-');
    return s;
  }

  private dir(key: string): string {
    if (!KEY_RE.test(key)) throw invalidArgument('snapshot key', key, 'use 1-128 letters, digits, "_", "." or "-"');
    return path.join(this.root, key);
  }

  /** Where the snapshot can be mounted on the host (mountAll creates it; containers do not use it). */
  mountpoint(key: string): string {
    return path.join(this.dir(key), 'rootfs');
  }

  /**
   * Creates the snapshot for key over image (unpacking its layers first if needed) and returns the mounts
   * that make up the container's root file system: one overlay with lowerdir = the image's layers,
   * topmost first. ALREADY_EXISTS if key is taken.
   */
  async prepare(key: string, image: ImageRecord): Promise<MountSpec[]> {
    const dir = this.dir(key);
    if (image.layers.length === 0) throw new FlotillaError('FAILED_PRECONDITION', `image ${image.name} has no layers`);
    for (const l of image.layers) await this.layers.prepare(l);
    // Built in a temp dir and renamed into place, so a snapshot is either complete or absent. No fsync:
    // a snapshot lost in a crash belongs to a container that reconcile removes anyway.
    const tmp = path.join(this.root, `.tmp-${tempName()}`);
    try {
      await fs.mkdir(tmp, { mode: 0o700 });
      await Promise.all(['upper', 'work'].map((d) => fs.mkdir(path.join(tmp, d), { mode: 0o755 })));
      const info: SnapshotInfo = { key, image: image.digest, imageName: image.name, layers: [...image.layers], created: Date.now() };
      await fs.writeFile(path.join(tmp, 'snapshot.json'), JSON.stringify(info, null, 2) + '\n');
      try {
        await fs.rename(tmp, dir);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOTEMPTY' || code === 'EEXIST') throw alreadyExists('snapshot', key);
        throw err;
      }
    } catch (err) {
      await fs.rm(tmp, { recursive: true, force: true });
      throw err;
    }
    return this.mounts(key);
  }

  /**
   * Runs fn with a read-only view of the image's file system (its layers merged, as a container would
   * first see them): the layer directory itself for a one-layer image, otherwise a temporary read-only
   * overlay of the layers, unmounted and removed when fn settles. Used to look up USER and the command
   * before a container exists.
   */
  async withImageView<T>(image: ImageRecord, fn: (root: string) => Promise<T>): Promise<T> {
    if (image.layers.length === 0) throw new FlotillaError('FAILED_PRECONDITION', `image ${image.name} has no layers`);
    for (const l of image.layers) await this.layers.prepare(l);
    if (image.layers.length === 1) return fn(this.layers.fsPath(image.layers[0]!));
    const view = path.join(this.root, `.tmp-view-${tempName()}`);
    await fs.mkdir(view, { mode: 0o700 });
    try {
      const lower = [...image.layers].reverse().map((l) => this.layers.fsPath(l));
      await mountOne({ type: 'overlay', source: 'overlay', options: [`lowerdir=${lower.join(':')}`, 'ro'] }, view);
      try {
        return await fn(view);
      } finally {
        await unmount(view);
      }
    } finally {
      await fs.rm(view, { recursive: true, force: true });
    }
  }

  async info(key: string): Promise<SnapshotInfo> {
    try {
      return JSON.parse(await fs.readFile(path.join(this.dir(key), 'snapshot.json'), 'utf8')) as SnapshotInfo;
    } catch (err) {
      if (err instanceof FlotillaError) throw err;
      throw notFound('snapshot', key);
    }
  }

  /** The mounts of an existing snapshot (e.g. to remount after the agent restarted). */
  async mounts(key: string): Promise<MountSpec[]> {
    const info = await this.info(key);
    const dir = this.dir(key);
    const lower = [...info.layers].reverse().map((l) => this.layers.fsPath(l));
    return [
      {
        type: 'overlay',
        source: 'overlay',
        options: [`lowerdir=${lower.join(':')}`, `upperdir=${path.join(dir, 'upper')}`, `workdir=${path.join(dir, 'work')}`],
      },
    ];
  }

  /** Unmounts the rootfs if still mounted and removes the snapshot. Idempotent. */
  async remove(key: string): Promise<void> {
    const dir = this.dir(key);
    try {
      await fs.access(dir);
    } catch {
      return;
    }
    await unmount(path.join(dir, 'rootfs'));
    const doomed = path.join(this.root, `.tmp-${tempName()}`);
    await fs.rename(dir, doomed);
    await fs.rm(doomed, { recursive: true, force: true });
  }

  async list(): Promise<SnapshotInfo[]> {
    const out: SnapshotInfo[] = [];
    for (const name of await fs.readdir(this.root)) {
      if (!KEY_RE.test(name)) continue;
      try {
        out.push(await this.info(name));
      } catch {
        // a snapshot being created or removed
      }
    }
    return out;
  }

  /** Keys of snapshots made from the image with this manifest digest. */
  async usersOf(imageDigest: string): Promise<string[]> {
    return (await this.list()).filter((s) => s.image === imageDigest).map((s) => s.key);
  }
}
