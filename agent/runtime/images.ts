/**
 * The image store. An image is a manifest (its digest is the image's identity), a config and layers, all
 * kept as blobs in the content store; the store's own metadata is one JSON file per name under
 * <data>/images/ (an ImageRecord), written atomically (temp file, fsync, rename).
 *
 * Images come in with import(name, source), where source is an OCI image layout (directory or tar), a
 * docker-archive (what `docker save` writes, directory or tar, optionally gzip-compressed) or a plain root
 * file system directory (packed into one gzip layer with a generated config). Every layer is unpacked
 * (layers.ts) during import, which also checks it against the config's diff ids.
 */
import { createHash } from 'node:crypto';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import { FlotillaError, errorMessage, invalidArgument, notFound } from '../../common/errors.js';
import { ContentStore, cleanStale, digestHex, fsyncDir, isDigest, sha256Digest, tempName } from './content.js';
import { LayerStore } from './layers.js';
import { Snapshotter } from './snapshots.js';
import type { ImageConfig, ImageRecord } from './types.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import { familiarName, parseReference, storeName } from './registry/reference.js';

export const MEDIA_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const MEDIA_OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const MEDIA_OCI_LAYER = 'application/vnd.oci.image.layer.v1.tar';
export const MEDIA_OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
const MEDIA_DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
const MEDIA_DOCKER_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';

export const DEFAULT_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

// ---------------------------------------------------------------------------------------------------------
// names

/**
 * Splits "[registry/]name[:tag]" into its parts (tag defaults to "latest"; the repository is in the
 * familiar form, "busybox" not "docker.io/library/busybox"); INVALID_ARGUMENT when malformed. A digest
 * ("name@sha256:...") is accepted, its tag is then the one given or "latest". Grammar: registry/reference.ts.
 */
export function parseImageName(ref: string, field = 'image name'): { repository: string; tag: string } {
  const r = parseReference(ref, field);
  return { repository: familiarName(r), tag: r.tag ?? 'latest' };
}

/**
 * The name the store keeps an image under: "busybox" -> "busybox:latest",
 * "docker.io/library/busybox:1" -> "busybox:1", "127.0.0.1:5000/app" -> "127.0.0.1:5000/app:latest",
 * "app:1@sha256:..." -> "app@sha256:..." (a digest names one image; the tag beside it is informative).
 */
export function normalizeImageName(ref: string, field = 'image name'): string {
  return storeName(parseReference(ref, field));
}

// ---------------------------------------------------------------------------------------------------------
// OCI / Docker JSON shapes (the parts we read)

export interface Descriptor {
  mediaType?: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { os?: string; architecture?: string; variant?: string };
}
export interface Manifest {
  schemaVersion?: number;
  mediaType?: string;
  config: Descriptor;
  layers: Descriptor[];
}
interface Index {
  schemaVersion?: number;
  mediaType?: string;
  manifests: Descriptor[];
}
interface DockerHealthcheck {
  Test?: string[];
  Interval?: number;
  Timeout?: number;
  StartPeriod?: number;
  Retries?: number;
}
export interface OciConfig {
  created?: string;
  architecture?: string;
  os?: string;
  config?: {
    Entrypoint?: string[] | null;
    Cmd?: string[] | null;
    Env?: string[] | null;
    WorkingDir?: string;
    User?: string;
    Healthcheck?: DockerHealthcheck;
  };
  rootfs?: { type?: string; diff_ids?: string[] };
  history?: unknown[];
}

function goArch(): string {
  const map: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  return map[process.arch] ?? process.arch;
}

function bad(source: string, why: string): FlotillaError {
  return new FlotillaError('INVALID_ARGUMENT', `image source ${JSON.stringify(source)}: ${why}`);
}

function parseJson<T>(bytes: Buffer | string, source: string, what: string): T {
  try {
    return JSON.parse(bytes.toString()) as T;
  } catch (err) {
    throw bad(source, `${what} is not valid JSON: ${errorMessage(err)}`);
  }
}

function strings(v: unknown): string[] {
  return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];
}

/** Picks the parts of an image config flotilla honours; Docker healthcheck durations go from ns to ms. */
export function imageConfigFrom(config: OciConfig): ImageConfig {
  const c = config.config ?? {};
  const out: ImageConfig = {
    entrypoint: strings(c.Entrypoint),
    cmd: strings(c.Cmd),
    env: strings(c.Env),
    workingDir: typeof c.WorkingDir === 'string' ? c.WorkingDir : '',
    user: typeof c.User === 'string' ? c.User : '',
  };
  const hc = c.Healthcheck;
  const test = strings(hc?.Test);
  if (hc && test.length > 0 && test[0] !== 'NONE') {
    const ms = (ns: unknown): number => (typeof ns === 'number' && ns > 0 ? Math.round(ns / 1e6) : 0);
    out.healthcheck = {
      test,
      intervalMs: ms(hc.Interval),
      timeoutMs: ms(hc.Timeout),
      startPeriodMs: ms(hc.StartPeriod),
      retries: typeof hc.Retries === 'number' && hc.Retries > 0 ? hc.Retries : 0,
    };
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// the store

export interface ImportOptions {
  /**
   * Only for a root file system directory: the generated config's Entrypoint, Cmd, Env (default: a
   * standard PATH), WorkingDir and User.
   */
  config?: Partial<Omit<ImageConfig, 'healthcheck'>>;
  /** Only for a directory: clamp file times to this (seconds) and use it as the image's time (default: env SOURCE_DATE_EPOCH). */
  sourceDateEpoch?: number;
}

export interface RemoveOptions {
  /** Whether a container uses the image with this manifest digest; such images are not removed. */
  inUse?: (digest: string) => boolean | Promise<boolean>;
}

/** What a source resolves to before it is committed (see ImageStore.importStaged). */
export interface StagedImage {
  /** the manifest, its config and its layers must be in the content store */
  manifestDigest: string;
  configDigest: string;
  layers: Descriptor[];
  config: OciConfig;
  /** see ImageRecord.repoDigests */
  repoDigests?: string[];
}
type Staged = StagedImage;

export class ImageStore {
  readonly imagesDir: string;
  readonly tmpDir: string;
  private lock: Promise<unknown> = Promise.resolve();
  /** digests (blobs and layers) that imports in progress have written: never garbage collected */
  private readonly pins = new Map<string, number>();

  private constructor(
    readonly dataDir: string,
    readonly content: ContentStore,
    readonly layers: LayerStore,
    readonly snapshots: Snapshotter,
  ) {
    this.imagesDir = path.join(dataDir, 'images');
    this.tmpDir = path.join(dataDir, 'tmp');
  }

  /** Opens the node's image store (and its content store, layer store and snapshotter). */
  static async open(dataDir: string): Promise<ImageStore> {
    const abs = path.resolve(dataDir);
    const content = await ContentStore.open(abs);
    const layers = await LayerStore.open(abs, content);
    const snapshots = await Snapshotter.open(abs, layers);
    const s = new ImageStore(abs, content, layers, snapshots);
    await fs.mkdir(s.imagesDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(s.tmpDir, { recursive: true, mode: 0o700 });
    await cleanStale(s.imagesDir, '.tmp-');
    await cleanStale(s.tmpDir);
    return s;
  }

  /** Runs fn with the store's write lock held (in this process). */
  private locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  private recordPath(name: string): string {
    return path.join(this.imagesDir, `${encodeURIComponent(name)}.json`);
  }

  // ------------------------------------------------------------------------------------------------ reads

  async list(): Promise<ImageRecord[]> {
    const out: ImageRecord[] = [];
    for (const f of (await fs.readdir(this.imagesDir)).sort()) {
      if (!f.endsWith('.json') || f.startsWith('.')) continue;
      try {
        out.push(JSON.parse(await fs.readFile(path.join(this.imagesDir, f), 'utf8')) as ImageRecord);
      } catch {
        // removed meanwhile
      }
    }
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Like get, but undefined instead of NOT_FOUND. */
  async find(ref: string): Promise<ImageRecord | undefined> {
    try {
      return await this.get(ref);
    } catch (err) {
      if (err instanceof FlotillaError && err.code === 'NOT_FOUND') return undefined;
      throw err;
    }
  }

  /**
   * Looks an image up by name[:tag], by full digest "sha256:<hex>" (manifest digest, or config digest as
   * docker's image id) or by a unique prefix of the manifest digest (with or without "sha256:").
   */
  async get(ref: string): Promise<ImageRecord> {
    const r = ref.trim();
    if (isDigest(r)) {
      const all = await this.list();
      const hit = all.find((i) => i.digest === r) ?? all.find((i) => i.configDigest === r);
      if (hit) return hit;
      throw notFound('image', ref);
    }
    let validName = true;
    try {
      const name = normalizeImageName(r, 'image reference');
      try {
        return JSON.parse(await fs.readFile(this.recordPath(name), 'utf8')) as ImageRecord;
      } catch {
        // maybe a digest prefix
      }
      const at = name.indexOf('@');
      if (at > 0) {
        // "name[:tag]@sha256:..": any image with that manifest digest, or pulled from a tag that pointed
        // at that digest (an index's), preferring one of the same repository
        const repo = name.slice(0, at);
        const d = name.slice(at + 1);
        const all = await this.list();
        const sameRepo = (i: ImageRecord): boolean => i.name.startsWith(`${repo}:`) || i.name.startsWith(`${repo}@`);
        const byDigest = (i: ImageRecord): boolean => i.digest === d || (i.repoDigests ?? []).some((rd) => rd.endsWith(`@${d}`));
        const hit = all.find((i) => byDigest(i) && sameRepo(i)) ?? all.find(byDigest);
        if (hit) return hit;
        throw notFound('image', ref);
      }
    } catch (err) {
      if (err instanceof FlotillaError && err.code === 'NOT_FOUND') throw err;
      validName = false;
      if (!/^(sha256:)?[a-f0-9]+$/.test(r)) throw err;
    }
    const m = /^(?:sha256:)?([a-f0-9]{1,64})$/.exec(r);
    if (m?.[1]) {
      const prefix = `sha256:${m[1]}`;
      const hits = (await this.list()).filter((i) => i.digest.startsWith(prefix));
      const digests = new Set(hits.map((h) => h.digest));
      if (digests.size > 1) {
        throw new FlotillaError('INVALID_ARGUMENT', `image reference ${JSON.stringify(ref)} is ambiguous: it matches ${digests.size} image digests`);
      }
      if (hits[0]) return hits[0];
    }
    if (!validName) throw invalidArgument('image reference', ref, 'not a name[:tag] or digest');
    throw notFound('image', ref);
  }

  async has(ref: string): Promise<boolean> {
    return (await this.find(ref)) !== undefined;
  }

  /** The manifest JSON of an image. */
  async manifest(ref: string): Promise<Manifest> {
    const img = await this.get(ref);
    return JSON.parse((await this.content.readBytes(img.digest)).toString()) as Manifest;
  }

  /** Unpacked layer directories of an image, lowest first (unpacking any that are missing). */
  async layerPaths(ref: string): Promise<string[]> {
    const img = await this.get(ref);
    const out: string[] = [];
    for (const l of img.layers) out.push((await this.layers.prepare(l)).path);
    return out;
  }

  // ------------------------------------------------------------------------------------------------ import

  /**
   * Imports source as name (normalised, "busybox" -> "busybox:latest"), replacing an existing image of
   * that name. Returns the new record; its digest is the manifest digest. On any failure nothing new is
   * left behind (blobs and unpacked layers the import added are removed again).
   */
  async import(name: string, source: string, opts: ImportOptions = {}): Promise<ImageRecord> {
    const ref = normalizeImageName(name);
    const src = path.resolve(source);
    let st;
    try {
      st = await fs.stat(src);
    } catch {
      throw bad(source, 'no such file or directory');
    }
    let extracted: string | undefined;
    try {
      return await this.importStaged(
        ref,
        async (pin) => {
          let dir = src;
          if (st.isFile()) {
            extracted = path.join(this.tmpDir, tempName());
            await fs.mkdir(extracted, { mode: 0o700 });
            try {
              // node-tar loads on first use: opening the store (every CLI command, agent start) does not need it
              const tar = await import('tar');
              await tar.x({ file: src, cwd: extracted, strict: true, preserveOwner: false });
            } catch (err) {
              throw bad(source, `not a readable tar archive: ${errorMessage(err).replace(/^TAR_\w+: /, '')}`);
            }
            dir = extracted;
          } else if (!st.isDirectory()) {
            throw bad(source, 'neither a directory nor a tar file');
          }
          const kind = await detectSource(dir);
          if (st.isFile() && kind === 'rootfs') throw bad(source, 'the tar is neither an OCI image layout (oci-layout, index.json) nor a docker-archive (manifest.json)');
          if (kind !== 'rootfs' && opts.config) throw bad(source, 'config options only apply to the import of a root file system directory');
          return kind === 'oci'
            ? await this.stageOci(dir, source, ref, pin)
            : kind === 'docker'
              ? await this.stageDocker(dir, source, ref, pin)
              : await this.stageRootfs(dir, opts.config ?? {}, pin, opts.sourceDateEpoch);
        },
        source,
      );
    } finally {
      if (extracted) await fs.rm(extracted, { recursive: true, force: true });
    }
  }

  /**
   * The common end of every way an image comes in (import, registry pull, a copy from another node):
   * stage(pin) puts the manifest, config and layer blobs into the content store (calling pin(digest) for
   * each before writing it, which keeps prune/GC off it until the record is written) and returns what it
   * staged. Then every layer is unpacked (if not already) and checked against the config's diff ids, and
   * the record is written under name (replacing an image of that name). On any failure the blobs and
   * unpacked layers this call added, and no image references, are removed. label names the source in
   * error messages.
   */
  async importStaged(name: string, stage: (pin: (digest: string) => void) => Promise<StagedImage>, label = name): Promise<ImageRecord> {
    const ref = normalizeImageName(name);
    const mine = new Set<string>();
    const pin = (d: string): void => {
      if (mine.has(d)) return;
      mine.add(d);
      this.pins.set(d, (this.pins.get(d) ?? 0) + 1);
    };
    const unpin = (): void => {
      for (const d of mine) {
        const n = (this.pins.get(d) ?? 1) - 1;
        if (n > 0) this.pins.set(d, n);
        else this.pins.delete(d);
      }
    };
    try {
      const staged = await stage(pin);
      const diffIds = strings(staged.config.rootfs?.diff_ids);
      if (diffIds.length !== staged.layers.length) {
        throw bad(label, `the config lists ${diffIds.length} layer diff ids but the manifest has ${staged.layers.length} layers`);
      }
      if (staged.layers.length === 0) throw bad(label, 'the image has no layers');
      for (const [i, l] of staged.layers.entries()) {
        const info = await this.layers.prepare(l.digest);
        if (info.diffId !== diffIds[i]) {
          throw bad(label, `layer ${i} (${l.digest}) unpacks to diff id ${info.diffId}, but the config says ${diffIds[i]}`);
        }
      }
      const created = Date.parse(staged.config.created ?? '');
      const record: ImageRecord = {
        name: ref,
        digest: staged.manifestDigest,
        configDigest: staged.configDigest,
        layers: staged.layers.map((l) => l.digest),
        diffIds,
        config: imageConfigFrom(staged.config),
        size: staged.layers.reduce((n, l) => n + l.size, 0),
        created: Number.isFinite(created) ? created : Date.now(),
      };
      await this.locked(async () => {
        const old = await this.find(ref);
        const repoDigests = new Set([...(old && old.digest === record.digest ? (old.repoDigests ?? []) : []), ...(staged.repoDigests ?? [])]);
        if (repoDigests.size > 0) record.repoDigests = [...repoDigests].sort();
        await this.writeRecord(record);
        unpin();
        if (old && old.digest !== record.digest) await this.gc([old]);
      });
      return record;
    } catch (err) {
      await this.locked(async () => {
        unpin();
        const referenced = await this.referenced();
        for (const d of mine) {
          if (referenced.blobs.has(d) || this.pins.has(d)) continue;
          await this.content.delete(d);
          if (!referenced.layers.has(d)) await this.layers.remove(d);
        }
      });
      throw err;
    }
  }

  /**
   * Gives an image a further name (`image tag SRC DST`); replaces an image that had the name DST.
   * Returns the new record.
   */
  async tag(source: string, target: string): Promise<ImageRecord> {
    const name = normalizeImageName(target, 'target image name');
    if (name.includes('@')) throw invalidArgument('target image name', target, 'a tag cannot contain a digest');
    const img = await this.get(source);
    return this.locked(async () => {
      const old = await this.find(name);
      const record: ImageRecord = { ...img, name };
      delete record.repoDigests;
      if (old && old.digest === img.digest && old.repoDigests) record.repoDigests = old.repoDigests;
      await this.writeRecord(record);
      if (old && old.digest !== img.digest) await this.gc([old]);
      return record;
    });
  }

  /**
   * Protects digests (blobs being fetched, their layers) from prune and gc until the returned function
   * is called (once). Whoever fetches an image's blobs before commit() pins them first.
   */
  pin(digests: Iterable<string>): () => void {
    const mine = [...new Set(digests)];
    for (const d of mine) this.pins.set(d, (this.pins.get(d) ?? 0) + 1);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      for (const d of mine) {
        const n = (this.pins.get(d) ?? 1) - 1;
        if (n > 0) this.pins.set(d, n);
        else this.pins.delete(d);
      }
    };
  }

  /**
   * Records name for an image whose manifest, config and layer blobs are in the content store already
   * (fetched from another node, each verified against its digest on the way in), through importStaged.
   * The manifest must be an image manifest. repoDigests: NAME@DIGEST references the image is known by
   * (a pinned index digest).
   */
  async commit(name: string, manifestDigest: string, repoDigests?: string[]): Promise<ImageRecord> {
    const label = `${name}@${manifestDigest}`;
    return this.importStaged(
      name,
      async (pin) => {
        pin(manifestDigest);
        const manifest = parseJson<Manifest>(await this.content.readBytes(manifestDigest), label, `manifest ${manifestDigest}`);
        if (!manifest.config || !Array.isArray(manifest.layers)) throw bad(label, `manifest ${manifestDigest} lacks config or layers`);
        pin(manifest.config.digest);
        const config = parseJson<OciConfig>(await this.content.readBytes(manifest.config.digest), label, `config ${manifest.config.digest}`);
        for (const l of manifest.layers) {
          pin(l.digest);
          if (!(await this.content.has(l.digest))) throw bad(label, `layer ${l.digest} is missing from the content store`);
        }
        return { manifestDigest, configDigest: manifest.config.digest, layers: manifest.layers, config, ...(repoDigests?.length ? { repoDigests } : {}) };
      },
      label,
    );
  }

  /**
   * Removes the images no container uses (opts.inUse, and the snapshots prepared from them): every one
   * with all, else none (flotilla keeps no untagged images: a replaced image's content is what a plain
   * prune collects), then deletes every blob and unpacked layer nothing references any more.
   */
  async pruneImages(opts: { all?: boolean; inUse?: (digest: string) => boolean | Promise<boolean> } = {}): Promise<{ images: ImageRecord[]; blobs: string[]; layers: string[] }> {
    const images: ImageRecord[] = [];
    if (opts.all) {
      for (const img of await this.list()) {
        if ((await this.snapshots.usersOf(img.digest)).length > 0) continue;
        if (opts.inUse && (await opts.inUse(img.digest))) continue;
        await this.locked(async () => {
          await fs.rm(this.recordPath(img.name), { force: true });
          await fsyncDir(this.imagesDir);
        });
        images.push(img);
      }
    }
    const { blobs, layers } = await this.prune();
    return { images, blobs, layers };
  }

  private async writeRecord(record: ImageRecord): Promise<void> {
    await writeFileAtomic(this.recordPath(record.name), JSON.stringify(record, null, 2) + '\n');
  }

  /** Copies a blob of a layout/archive into the content store, verified against its descriptor. */
  private async ingestFrom(dir: string, rel: string, source: string, expected?: { digest?: string; size?: number }): Promise<{ digest: string; size: number }> {
    const file = await insideFile(dir, rel, source);
    try {
      return await this.content.writeFile(file, expected);
    } catch (err) {
      if (err instanceof FlotillaError) throw bad(source, `${rel}: ${err.message}`);
      throw err;
    }
  }

  private async stageOci(dir: string, source: string, ref: string, pin: (d: string) => void): Promise<Staged> {
    const blobRel = (d: string): string => `blobs/sha256/${digestHex(d, 'descriptor digest')}`;
    const readBlob = async (d: Descriptor): Promise<Buffer> => {
      const b = await fs.readFile(await insideFile(dir, blobRel(d.digest), source));
      if (sha256Digest(b) !== d.digest) throw bad(source, `blob ${d.digest} does not match its digest`);
      if (typeof d.size === 'number' && b.length !== d.size) throw bad(source, `blob ${d.digest} is ${b.length} bytes, its descriptor says ${d.size}`);
      return b;
    };
    const index = parseJson<Index>(await fs.readFile(await insideFile(dir, 'index.json', source)), source, 'index.json');
    if (!Array.isArray(index.manifests) || index.manifests.length === 0) throw bad(source, 'index.json lists no manifests');
    const isIndex = (d: Descriptor): boolean => d.mediaType === MEDIA_OCI_INDEX || d.mediaType === MEDIA_DOCKER_LIST;
    const { repository, tag } = parseImageName(ref);
    let candidates = index.manifests;
    if (candidates.length > 1) {
      const named = candidates.filter((d) => {
        const a = d.annotations ?? {};
        const r = a['org.opencontainers.image.ref.name'];
        const c = a['io.containerd.image.name'];
        return r === tag || r === ref || c === ref || c?.endsWith(`/${repository}:${tag}`) === true;
      });
      if (named.length > 0) candidates = named;
    }
    let desc = pickPlatform(candidates);
    if (!desc) throw bad(source, `index.json has ${candidates.length} manifests and none is named ${JSON.stringify(tag)} or for linux/${goArch()}`);
    const manifestDescs: Descriptor[] = [];
    for (let depth = 0; isIndex(desc); depth++) {
      if (depth > 4) throw bad(source, 'image indexes nested too deeply');
      const inner = parseJson<Index>(await readBlob(desc), source, `index ${desc.digest}`);
      const picked = pickPlatform(inner.manifests ?? []);
      if (!picked) throw bad(source, `index ${desc.digest} has no manifest for linux/${goArch()}`);
      manifestDescs.push(desc);
      desc = picked;
    }
    const manifestBytes = await readBlob(desc);
    const manifest = parseJson<Manifest>(manifestBytes, source, `manifest ${desc.digest}`);
    if (!manifest.config || !Array.isArray(manifest.layers)) throw bad(source, `manifest ${desc.digest} lacks config or layers`);
    for (const l of manifest.layers) {
      const mt = l.mediaType ?? '';
      if (mt.includes('zstd')) throw bad(source, `layer ${l.digest} is zstd-compressed (${mt}); only gzip or uncompressed layers are supported`);
    }
    const configBytes = await readBlob(manifest.config);
    const config = parseJson<OciConfig>(configBytes, source, `config ${manifest.config.digest}`);
    pin(desc.digest);
    await this.content.writeBytes(manifestBytes, { digest: desc.digest });
    pin(manifest.config.digest);
    await this.content.writeBytes(configBytes, { digest: manifest.config.digest, size: manifest.config.size });
    for (const l of manifest.layers) {
      pin(l.digest);
      await this.ingestFrom(dir, blobRel(l.digest), source, { digest: l.digest, size: l.size });
    }
    return { manifestDigest: desc.digest, configDigest: manifest.config.digest, layers: manifest.layers, config };
  }

  private async stageDocker(dir: string, source: string, ref: string, pin: (d: string) => void): Promise<Staged> {
    interface DockerEntry {
      Config?: string;
      RepoTags?: string[] | null;
      Layers?: string[];
    }
    const entries = parseJson<DockerEntry[]>(await fs.readFile(await insideFile(dir, 'manifest.json', source)), source, 'manifest.json');
    if (!Array.isArray(entries) || entries.length === 0) throw bad(source, 'manifest.json lists no images');
    let entry = entries.length === 1 ? entries[0] : undefined;
    if (!entry) {
      entry = entries.find((e) =>
        (e.RepoTags ?? []).some((t) => {
          try {
            const n = normalizeImageName(t);
            return n === ref || n.endsWith(`/${ref}`);
          } catch {
            return false;
          }
        }),
      );
    }
    if (!entry) throw bad(source, `manifest.json has ${entries.length} images and none is tagged ${ref}`);
    if (typeof entry.Config !== 'string' || !Array.isArray(entry.Layers)) throw bad(source, 'manifest.json entry lacks Config or Layers');
    const configFile = await insideFile(dir, entry.Config, source);
    const configBytes = await fs.readFile(configFile);
    const config = parseJson<OciConfig>(configBytes, source, entry.Config);
    pin(sha256Digest(configBytes));
    const cfg = await this.content.writeBytes(configBytes);
    const layers: Descriptor[] = [];
    for (const rel of entry.Layers) {
      const blob = await this.ingestFrom(dir, rel, source);
      pin(blob.digest);
      const fh = await fs.open(this.content.path(blob.digest), 'r');
      const head = Buffer.alloc(2);
      try {
        await fh.read(head, 0, 2, 0);
      } finally {
        await fh.close();
      }
      const gz = head[0] === 0x1f && head[1] === 0x8b;
      layers.push({ mediaType: gz ? MEDIA_OCI_LAYER_GZIP : MEDIA_OCI_LAYER, digest: blob.digest, size: blob.size });
    }
    return this.writeManifest(cfg, layers, config, pin);
  }

  /** Writes the OCI manifest of a staged config and its layers (pinned against GC) and returns the result. */
  private async writeManifest(cfg: { digest: string; size: number }, layers: Descriptor[], config: OciConfig, pin: (d: string) => void): Promise<Staged> {
    const manifest: Manifest = {
      schemaVersion: 2,
      mediaType: MEDIA_OCI_MANIFEST,
      config: { mediaType: MEDIA_OCI_CONFIG, digest: cfg.digest, size: cfg.size },
      layers,
    };
    const manifestBytes = JSON.stringify(manifest);
    pin(sha256Digest(manifestBytes));
    const m = await this.content.writeBytes(manifestBytes);
    return { manifestDigest: m.digest, configDigest: cfg.digest, layers, config };
  }

  private async stageRootfs(dir: string, overrides: Partial<Omit<ImageConfig, 'healthcheck'>>, pin: (d: string) => void, sourceEpoch?: number): Promise<Staged> {
    const hash = createHash('sha256');
    const hasher = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        cb(null, chunk);
      },
    });
    const gzip = zlib.createGzip();
    // GNU tar packs every file type (devices, FIFOs, hardlinks) with numeric owners; sockets are skipped.
    // POSIX (pax) format: node-tar reads device numbers only from POSIX headers.
    // (node-tar's Pack stalls or throws on device files, so it is not used here.)
    // The one spawn of the runtime not on the spawner thread, on purpose: its stdout streams into gzip
    // with backpressure, and only `flotilla image import` (a one-shot CLI process) imports a directory;
    // no daemon calls ImageStore.import.
    // Reproducible: the same directory gives the same layer and image digest on every node (so an
    // image imported on each node pins to one digest): no pid, atime or ctime in the pax headers, and
    // with SOURCE_DATE_EPOCH (the reproducible-builds convention) file times are clamped to it.
    const epoch = sourceEpoch ?? sourceDateEpoch();
    const child = spawn(
      'tar',
      ['-C', dir, '--format=posix', '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime', '--numeric-owner', '--sort=name',
        ...(epoch !== undefined ? [`--mtime=@${epoch}`, '--clamp-mtime'] : []), '-cf', '-', '.'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code) => resolve(code ?? 1));
    });
    const [layer, , code] = await Promise.all([this.content.ingest(gzip), pipeline(child.stdout, hasher, gzip), exited]);
    pin(layer.digest);
    if (code !== 0) throw bad(dir, `packing the directory failed: tar: ${stderr.trim().split('\n').slice(-3).join('; ')}`);
    const diffId = `sha256:${hash.digest('hex')}`;
    // the image's creation time: SOURCE_DATE_EPOCH, else the directory's own modification time
    const now = (epoch !== undefined ? new Date(epoch * 1000) : (await fs.stat(dir)).mtime).toISOString();
    const config = {
      created: now,
      architecture: goArch(),
      os: 'linux',
      config: {
        Env: overrides.env ?? [DEFAULT_PATH],
        ...(overrides.entrypoint ? { Entrypoint: overrides.entrypoint } : {}),
        Cmd: overrides.cmd ?? null,
        WorkingDir: overrides.workingDir ?? '',
        User: overrides.user ?? '',
      },
      rootfs: { type: 'layers', diff_ids: [diffId] },
      history: [{ created: now, created_by: 'flotilla image import (root file system directory)' }],
    };
    const configBytes = JSON.stringify(config);
    pin(sha256Digest(configBytes));
    const cfg = await this.content.writeBytes(configBytes);
    const layers: Descriptor[] = [{ mediaType: MEDIA_OCI_LAYER_GZIP, digest: layer.digest, size: layer.size }];
    return this.writeManifest(cfg, layers, config, pin);
  }

  // ------------------------------------------------------------------------------------------------ remove

  /**
   * Removes an image. By name: that name only; the image's content goes when no other name refers to it.
   * By digest (or prefix): every name of that image. Refused with FAILED_PRECONDITION while a container
   * uses it (a snapshot was prepared from it, or opts.inUse says so). Blobs and unpacked layers no
   * remaining image or snapshot references are deleted. Returns the removed records.
   */
  async remove(ref: string, opts: RemoveOptions = {}): Promise<ImageRecord[]> {
    const img = await this.get(ref);
    return this.locked(async () => {
      const all = await this.list();
      const byName = all.some((i) => i.name === normalizeOrEmpty(ref)) && !isDigest(ref.trim());
      const doomed = byName ? all.filter((i) => i.name === img.name) : all.filter((i) => i.digest === img.digest);
      const remaining = all.filter((i) => !doomed.includes(i));
      const stillNamed = remaining.some((i) => i.digest === img.digest);
      if (!stillNamed) {
        const users = await this.snapshots.usersOf(img.digest);
        if (users.length > 0 || (opts.inUse && (await opts.inUse(img.digest)))) {
          const who = users.length > 0 ? ` (snapshot ${users.slice(0, 3).join(', ')}${users.length > 3 ? ', ...' : ''})` : '';
          throw new FlotillaError('FAILED_PRECONDITION', `image ${img.name} (${img.digest.slice(7, 19)}) is in use by a container${who}`);
        }
      }
      for (const d of doomed) await fs.rm(this.recordPath(d.name), { force: true });
      await fsyncDir(this.imagesDir);
      await this.gc(doomed);
      return doomed;
    });
  }

  /**
   * Deletes every blob and unpacked layer that no image and no snapshot references (e.g. the layers of a
   * replaced image once its last container is gone). Returns what was deleted. Safe against imports in
   * this process; do not run it while another process imports into the same data dir.
   */
  async prune(): Promise<{ blobs: string[]; layers: string[] }> {
    return this.locked(async () => {
      const ref = await this.referenced();
      const blobs: string[] = [];
      const layers: string[] = [];
      for (const b of await this.content.list()) {
        if (!ref.blobs.has(b) && !this.pins.has(b)) {
          await this.content.delete(b);
          blobs.push(b);
        }
      }
      for (const l of await this.layers.list()) {
        if (!ref.layers.has(l) && !this.pins.has(l)) {
          await this.layers.remove(l);
          layers.push(l);
        }
      }
      return { blobs, layers };
    });
  }

  /** What remaining images and snapshots reference. */
  private async referenced(): Promise<{ blobs: Set<string>; layers: Set<string> }> {
    const blobs = new Set<string>();
    const layers = new Set<string>();
    for (const i of await this.list()) {
      blobs.add(i.digest);
      blobs.add(i.configDigest);
      for (const l of i.layers) {
        blobs.add(l);
        layers.add(l);
      }
    }
    for (const s of await this.snapshots.list()) for (const l of s.layers) layers.add(l);
    for (const d of this.pins.keys()) {
      blobs.add(d);
      layers.add(d);
    }
    return { blobs, layers };
  }

  /** Deletes the blobs and unpacked layers of these (removed) images that nothing references any more. */
  private async gc(removed: ImageRecord[]): Promise<void> {
    const ref = await this.referenced();
    for (const img of removed) {
      for (const b of [img.digest, img.configDigest, ...img.layers]) if (!ref.blobs.has(b) && !this.pins.has(b)) await this.content.delete(b);
      for (const l of img.layers) if (!ref.layers.has(l) && !this.pins.has(l)) await this.layers.remove(l);
    }
  }
}

function normalizeOrEmpty(ref: string): string {
  try {
    return normalizeImageName(ref.trim());
  } catch {
    return '';
  }
}

function pickPlatform(descs: Descriptor[]): Descriptor | undefined {
  if (descs.length === 1) return descs[0];
  const arch = goArch();
  return (
    descs.find((d) => d.platform?.os === 'linux' && d.platform.architecture === arch) ??
    descs.find((d) => !d.platform && (d.mediaType === MEDIA_OCI_MANIFEST || d.mediaType === MEDIA_DOCKER_MANIFEST))
  );
}

/** Resolves rel inside dir (following symlinks, which docker save uses for shared layers) or throws. */
async function insideFile(dir: string, rel: string, source: string): Promise<string> {
  if (path.isAbsolute(rel) || rel.split('/').includes('..')) throw bad(source, `path ${JSON.stringify(rel)} leaves the archive`);
  const root = await fs.realpath(dir);
  let real;
  try {
    real = await fs.realpath(path.join(dir, rel));
  } catch {
    throw bad(source, `${rel} is missing`);
  }
  if (real !== root && !real.startsWith(root + '/')) throw bad(source, `${rel} points outside the archive`);
  const st = await fs.stat(real);
  if (!st.isFile()) throw bad(source, `${rel} is not a file`);
  return real;
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.access(p);
    return true;
  } catch {
    return false;
  }
}

/** What kind of image source a directory is. */
export async function detectSource(dir: string): Promise<'oci' | 'docker' | 'rootfs'> {
  if ((await exists(path.join(dir, 'oci-layout'))) && (await exists(path.join(dir, 'index.json')))) return 'oci';
  if (await exists(path.join(dir, 'manifest.json'))) return 'docker';
  if ((await exists(path.join(dir, 'index.json'))) && (await exists(path.join(dir, 'blobs')))) return 'oci';
  return 'rootfs';
}

/** SOURCE_DATE_EPOCH (seconds) when set to a plain number: file times and the image time for imports. */
function sourceDateEpoch(): number | undefined {
  const v = process.env.SOURCE_DATE_EPOCH;
  return v && /^\d{1,12}$/.test(v) ? Number(v) : undefined;
}
