/**
 * The seams between the parts of the node runtime, and between the runtime and the agent's worker.
 * Implementations: images.ts/content.ts/snapshots.ts (images and layers), containers.ts (runc + conmon),
 * and agent/worker/sim.ts (a simulated runtime for scale work, same ContainerRuntime interface).
 */

import type { MountOpt } from '../../common/containeropts.js';

/** The parts of an OCI/Docker image config that flotilla honours. */
export interface ImageConfig {
  entrypoint: string[];
  cmd: string[];
  env: string[];
  workingDir: string;
  user: string;
  /** Docker HEALTHCHECK, when the image carries one (docker-archive imports). Durations in ms. */
  healthcheck?: { test: string[]; intervalMs: number; timeoutMs: number; startPeriodMs: number; retries: number };
}

export interface ImageRecord {
  /** normalised reference, "name:tag" */
  name: string;
  /** digest of the manifest, "sha256:<hex>": the image's identity */
  digest: string;
  configDigest: string;
  /** layer blob digests, lowest first */
  layers: string[];
  /** uncompressed layer digests (diff ids), lowest first */
  diffIds: string[];
  config: ImageConfig;
  /** total size of the layer blobs in bytes */
  size: number;
  /** Unix ms */
  created: number;
  /**
   * "familiar-name@sha256:..." of the registry manifest (or index) each pull of this image resolved to,
   * like Docker's RepoDigests (an index digest differs from `digest`, the platform manifest's)
   */
  repoDigests?: string[];
}

/** A mount description: the snapshotter returns these and one place (mount.ts) performs them. */
export interface MountSpec {
  type: string;
  source: string;
  options: string[];
}

export interface ContainerCreateOptions {
  /** unique container name; also its hostname unless hostname is given */
  name: string;
  /** image name[:tag] or digest */
  image: string;
  /** overrides the image's Cmd; entrypoint overrides the image's Entrypoint */
  command?: string[];
  entrypoint?: string[];
  env?: string[];
  workdir?: string;
  user?: string;
  hostname?: string;
  /** bytes; 0 or undefined means no limit */
  memoryBytes?: number;
  /** 1e9 per CPU */
  nanoCpus?: number;
  pidsLimit?: number;
  /** "" or undefined: own network namespace with loopback up; "host"; "none" */
  network?: string;
  /**
   * path of an existing network namespace the container joins (an overlay task's, prepared by
   * agent/network); only with the default (private) network
   */
  netns?: string;
  labels?: Record<string, string>;
  /** "default" or undefined: the default seccomp filter (seccomp.ts); "unconfined": none */
  seccomp?: string;
  /** the content of the container's /etc/resolv.conf (overlay tasks: the node resolver on each network's
   *  gateway, agent/network/resolver.ts); default: the host's, or empty with network "none" */
  resolvConf?: string;
  /**
   * files made from secrets and configs: written on a tmpfs (never the data dir's disk) and
   * bind-mounted read-only into the container; deleted once the container stops
   */
  files?: ContainerFile[];
  /**
   * mounts (common/containeropts.ts MountOpt): named volumes of this node (created on demand,
   * volumes.ts; an empty source is an anonymous volume removed with the container), bind mounts of host
   * paths that must exist, and tmpfs
   */
  mounts?: MountOpt[];
  /** added to / dropped from Docker's default capability set ("ALL" allowed) */
  capAdd?: string[];
  capDrop?: string[];
  /** the root file system read-only */
  readonlyRootfs?: boolean;
  /** run tini (tini-static, bind-mounted at /sbin/docker-init) as PID 1 */
  init?: boolean;
  ulimits?: { name: string; soft: number; hard: number }[];
  /** namespaced sysctls */
  sysctls?: Record<string, string>;
  /** the signal `stop` sends first (default SIGTERM) */
  stopSignal?: string;
  /** merged into /etc/resolv.conf: own name servers, search domains, options */
  dns?: { nameservers?: string[]; search?: string[]; options?: string[] };
  /** extra /etc/hosts entries, "IP HOST [ALIAS...]" */
  extraHosts?: string[];
  /** supplementary groups: names in the image's /etc/group, or GIDs */
  groups?: string[];
  /** a pseudo-terminal as the process's stdio */
  tty?: boolean;
}

/** A file put into a container (secrets, configs). */
export interface ContainerFile {
  /** absolute, normalised path inside the container */
  target: string;
  data: Uint8Array;
  uid: number;
  gid: number;
  /** permission bits, at most 0o777 */
  mode: number;
}

export type ContainerStatus = 'created' | 'running' | 'stopped';

export interface ContainerInfo {
  id: string;
  name: string;
  image: string;
  imageDigest: string;
  status: ContainerStatus;
  pid: number;
  exitCode: number | null;
  oomKilled: boolean;
  /** the container's root file system as the host sees it (/proc/<pid>/root); '' once stopped */
  rootfs: string;
  cgroupPaths: Record<string, string>;
  labels: Record<string, string>;
  /** Unix ms; 0 when not yet */
  created: number;
  started: number;
  finished: number;
}

export interface ExitInfo {
  exitCode: number;
  oomKilled: boolean;
}

export interface LogEntry {
  time: number;
  stream: 'stdout' | 'stderr';
  line: string;
}

export interface ExecResult {
  exitCode: number;
  output: string;
}

/** What the agent's task controllers use. Errors are FlotillaError with a code. */
export interface ContainerRuntime {
  readonly kind: 'runc' | 'sim';
  /** Creates the container (rootfs, spec, runc create under the monitor) without starting it. */
  create(opts: ContainerCreateOptions): Promise<ContainerInfo>;
  start(idOrName: string): Promise<void>;
  /** Resolves when the container's main process exits (at once if it already has). */
  wait(idOrName: string, signal?: AbortSignal): Promise<ExitInfo>;
  /** SIGTERM, then SIGKILL after graceMs. */
  stop(idOrName: string, graceMs: number): Promise<void>;
  kill(idOrName: string, signal: string): Promise<void>;
  /** Removes everything the container had (mounts, cgroups, directories). */
  remove(idOrName: string, force: boolean): Promise<void>;
  inspect(idOrName: string): Promise<ContainerInfo>;
  list(): Promise<ContainerInfo[]>;
  exec(idOrName: string, cmd: string[], opts?: { timeoutMs?: number; signal?: AbortSignal }): Promise<ExecResult>;
  logs(idOrName: string, opts: { follow?: boolean; tail?: number; signal?: AbortSignal }): AsyncIterable<LogEntry>;
  /** Whether an image is present locally, by name or digest. */
  hasImage(ref: string): Promise<boolean>;
  imageConfig(ref: string): Promise<ImageConfig>;
}
