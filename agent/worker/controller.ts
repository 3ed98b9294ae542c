/**
 * A task controller: runs one task's container through a ContainerRuntime (prepare, start, wait,
 * shutdown, terminate, remove). It knows nothing of task states or the dispatcher: the worker drives
 * it and turns its results and errors (TaskError) into status reports.
 */
import { errorMessage, isCode } from '../../common/errors.js';
import { shortId } from '../../common/ids.js';
import { TaskState, type ContainerSpec, type RegistryAuth, type Task } from '../../gen/flotilla/v1/objects.js';
import { expandTemplate } from '../../common/containeropts.js';
import type { ContainerCreateOptions, ContainerFile, ContainerInfo, ContainerRuntime, ExitInfo } from '../runtime/types.js';
import type { TaskNetwork } from '../network/node-network.js';

export const LABEL_TASK_ID = 'flotilla.task.id';
export const LABEL_SERVICE_ID = 'flotilla.service.id';
export const LABEL_SERVICE_NAME = 'flotilla.service.name';
export const LABEL_SLOT = 'flotilla.slot';
export const LABEL_NODE_ID = 'flotilla.node.id';

export const DEFAULT_STOP_GRACE_MS = 10_000;
const MAX_NAME = 63;

/** A failure that decides the task's terminal state (REJECTED before the container ran, FAILED after). */
export class TaskError extends Error {
  constructor(
    readonly state: TaskState.TASK_STATE_REJECTED | TaskState.TASK_STATE_FAILED,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'TaskError';
  }
}

/** `<serviceName>.<slot or node id prefix>.<taskId>`, the service name shortened to fit 63 characters. */
export function containerName(task: Task): string {
  const middle = task.slot > 0 ? String(task.slot) : shortId(task.nodeId || 'node');
  const tail = `.${middle}.${task.id}`;
  let svc = (task.serviceName || 'task').replace(/[^a-zA-Z0-9_.-]/g, '-');
  if (!/^[a-zA-Z0-9]/.test(svc)) svc = `t${svc}`;
  svc = svc.slice(0, Math.max(1, MAX_NAME - tail.length));
  return `${svc}${tail}`;
}

/** The overlay networks a task is attached to on its node (none with host or none networking). */
export function overlayAttachments(task: Task): Task['networks'] {
  const mode = task.spec?.container?.networkMode ?? '';
  if (mode === 'host' || mode === 'none') return [];
  return task.networks.filter((n) => n.networkId !== '' && n.addresses.length > 0);
}

/** Task.Name as Swarm's templates give it: SERVICE.SLOT.TASKID (SERVICE.NODEID.TASKID for global tasks). */
export function taskFullName(task: Task): string {
  return `${task.serviceName}.${task.slot > 0 ? task.slot : task.nodeId}.${task.id}`;
}

/**
 * The runtime's create options for a task (files: its secrets and configs, see Worker.filesOf;
 * nodeHostname: for {{.Node.Hostname}} in a --hostname template).
 */
export function createOptions(task: Task, files?: ContainerFile[], nodeHostname = ''): ContainerCreateOptions {
  const c = task.spec?.container;
  const limits = task.spec?.resources?.limits;
  const labels: Record<string, string> = {
    ...(c?.labels ?? {}),
    [LABEL_TASK_ID]: task.id,
    [LABEL_SERVICE_ID]: task.serviceId,
    [LABEL_SERVICE_NAME]: task.serviceName,
    [LABEL_SLOT]: String(task.slot),
  };
  if (task.nodeId) labels[LABEL_NODE_ID] = task.nodeId;
  return {
    name: containerName(task),
    image: c?.image ?? '',
    // ContainerSpec.command overrides the image's entrypoint; args override its Cmd (Docker's semantics)
    entrypoint: c && c.command.length > 0 ? [...c.command] : undefined,
    command: c && c.args.length > 0 ? [...c.args] : undefined,
    env: c?.env.length ? [...c.env] : undefined,
    workdir: c?.workdir || undefined,
    user: c?.user || undefined,
    // dot-free by default (the short task id, as Docker uses the short container id): a hostname with dots
    // (the container name SERVICE.SLOT.TASKID) makes resolvers treat its tail as a search domain, so a
    // short service name would be asked as NAME.SLOT.TASKID (docs/networking.md)
    hostname: c?.hostname
      ? expandTemplate(c.hostname, {
          serviceId: task.serviceId,
          serviceName: task.serviceName,
          taskId: task.id,
          taskName: taskFullName(task),
          taskSlot: String(task.slot),
          nodeId: task.nodeId,
          nodeHostname,
        })
      : shortId(task.id),
    memoryBytes: limits?.memoryBytes || undefined,
    nanoCpus: limits?.nanoCpus || undefined,
    pidsLimit: limits?.pids || undefined,
    network: c?.networkMode || undefined,
    labels,
    ...(files && files.length > 0 ? { files } : {}),
    ...(c ? containerOptions(c) : {}),
  };
}

/** The options of issue 15 (mounts, capabilities, ...): only those the spec sets. */
function containerOptions(c: ContainerSpec): Partial<ContainerCreateOptions> {
  const o: Partial<ContainerCreateOptions> = {};
  if (c.mounts.length > 0) o.mounts = c.mounts.map((m) => ({ ...m, volumeOpts: { ...m.volumeOpts }, volumeLabels: { ...m.volumeLabels } }));
  if (c.capAdd.length > 0) o.capAdd = [...c.capAdd];
  if (c.capDrop.length > 0) o.capDrop = [...c.capDrop];
  if (c.readOnly) o.readonlyRootfs = true;
  if (c.init) o.init = true;
  if (c.ulimits.length > 0) o.ulimits = c.ulimits.map((u) => ({ name: u.name, soft: u.soft, hard: u.hard }));
  if (Object.keys(c.sysctls).length > 0) o.sysctls = { ...c.sysctls };
  if (c.stopSignal) o.stopSignal = c.stopSignal;
  if (c.dnsConfig) o.dns = { nameservers: [...c.dnsConfig.nameservers], search: [...c.dnsConfig.search], options: [...c.dnsConfig.options] };
  if (c.hosts.length > 0) o.extraHosts = [...c.hosts];
  if (c.groups.length > 0) o.groups = [...c.groups];
  if (c.tty) o.tty = true;
  return o;
}

/** Gets images a task needs onto the node (from another node of the cluster, or a registry). */
export interface ImageProvider {
  ensure(ref: string, opts: { signal?: AbortSignal; onProgress?: (message: string) => void; auth?: RegistryAuth }): Promise<void>;
}

export class TaskController {
  /** the container's id once prepared (or adopted) */
  containerId: string | undefined;

  constructor(
    readonly runtime: ContainerRuntime,
    public task: Task,
    readonly hostname: string,
    /** the task's secret and config files (throws TaskError REJECTED when one is missing) */
    private readonly files: (task: Task) => ContainerFile[] = () => [],
    /** the node's overlay data plane (absent with the sim runtime) */
    readonly network?: TaskNetwork,
    /** where a missing image comes from (absent: it must be imported on this node) */
    readonly images?: ImageProvider,
  ) {}

  /**
   * Gets the task's image onto the node when it is missing (PREPARING; progress lines go to
   * onProgress). Errors are TaskError(REJECTED) with the reason.
   */
  async pullImage(signal: AbortSignal, onProgress: (message: string) => void): Promise<void> {
    const image = this.task.spec?.container?.image ?? '';
    if (!image || !this.images) return;
    try {
      if (await this.runtime.hasImage(image)) return;
      const auth = this.task.spec?.container?.registryAuth;
      await this.images.ensure(image, { signal, onProgress, ...(auth ? { auth } : {}) });
    } catch (err) {
      if (signal.aborted) throw err;
      throw new TaskError(TaskState.TASK_STATE_REJECTED, `image ${JSON.stringify(image)} not available on node ${this.hostname}: ${errorMessage(err)}`, { cause: err });
    }
  }

  /** Takes over a container that already exists for this task (after an agent restart). */
  adopt(info: ContainerInfo): void {
    this.containerId = info.id;
  }

  /** Checks the image and creates the container. Errors are TaskError(REJECTED). */
  async prepare(): Promise<ContainerInfo> {
    const image = this.task.spec?.container?.image ?? '';
    if (!image) throw new TaskError(TaskState.TASK_STATE_REJECTED, 'task has no image');
    let present: boolean;
    try {
      present = await this.runtime.hasImage(image);
    } catch (err) {
      throw new TaskError(TaskState.TASK_STATE_REJECTED, errorMessage(err), { cause: err });
    }
    if (!present) {
      throw new TaskError(
        TaskState.TASK_STATE_REJECTED,
        `image ${JSON.stringify(image)} not found on node ${this.hostname} (import it with flotilla image import)`,
      );
    }
    const files = this.files(this.task);
    // the task's network namespace, attached to its overlay networks, before the container that joins it
    const nets = this.network ? overlayAttachments(this.task) : [];
    let netns: string | undefined;
    if (nets.length > 0) {
      try {
        netns = await this.network!.attach(this.task.id, nets);
      } catch (err) {
        throw new TaskError(TaskState.TASK_STATE_REJECTED, `network: ${errorMessage(err)}`, { cause: err });
      }
    }
    try {
      const resolvConf = netns ? this.network!.resolvConf?.(this.task.id) : undefined;
      const info = await this.runtime.create({ ...createOptions(this.task, files, this.hostname), ...(netns ? { netns } : {}), ...(resolvConf !== undefined ? { resolvConf } : {}) });
      this.containerId = info.id;
      return info;
    } catch (err) {
      if (netns) await this.network!.detach(this.task.id).catch(() => undefined);
      throw new TaskError(TaskState.TASK_STATE_REJECTED, errorMessage(err), { cause: err });
    }
  }

  private id(): string {
    if (!this.containerId) throw new TaskError(TaskState.TASK_STATE_FAILED, `task ${this.task.id} has no container`);
    return this.containerId;
  }

  /** Starts the container; returns its state after the start (pid). Errors are TaskError(FAILED). */
  async start(): Promise<ContainerInfo> {
    const id = this.id();
    try {
      await this.runtime.start(id);
      return await this.runtime.inspect(id);
    } catch (err) {
      throw new TaskError(TaskState.TASK_STATE_FAILED, errorMessage(err), { cause: err });
    }
  }

  /** Resolves when the container's process exits; rejects (ABORTED) when signal aborts. */
  wait(signal?: AbortSignal): Promise<ExitInfo> {
    return this.runtime.wait(this.id(), signal);
  }

  async inspect(): Promise<ContainerInfo | undefined> {
    if (!this.containerId) return undefined;
    try {
      return await this.runtime.inspect(this.containerId);
    } catch (err) {
      if (isCode(err, 'NOT_FOUND')) return undefined;
      throw err;
    }
  }

  /** Stops the container: SIGTERM, SIGKILL after the task's stop grace period (default 10 s). */
  async shutdown(): Promise<void> {
    if (!this.containerId) return;
    const grace = this.task.spec?.container?.stopGracePeriodMs || DEFAULT_STOP_GRACE_MS;
    try {
      await this.runtime.stop(this.containerId, grace);
    } catch (err) {
      if (!isCode(err, 'NOT_FOUND')) throw err;
    }
  }

  /** Kills the container at once. */
  async terminate(): Promise<void> {
    if (!this.containerId) return;
    try {
      await this.runtime.kill(this.containerId, 'KILL');
    } catch (err) {
      if (!isCode(err, 'NOT_FOUND') && !isCode(err, 'FAILED_PRECONDITION')) throw err;
    }
  }

  /**
   * Detaches the task from its overlay networks (CNI DEL, its namespace; the network's devices when it
   * was the last task here). Done as soon as the container has stopped for good: the manager may give
   * its addresses to new tasks. Idempotent.
   */
  async releaseNetwork(): Promise<void> {
    if (this.network && overlayAttachments(this.task).length > 0) await this.network.detach(this.task.id);
  }

  /** Removes the container (forcibly: a running one is killed), then its network attachments. */
  async remove(): Promise<void> {
    if (this.containerId) {
      try {
        await this.runtime.remove(this.containerId, true);
      } catch (err) {
        if (!isCode(err, 'NOT_FOUND')) throw err;
      }
      this.containerId = undefined;
    }
    // CNI DEL, the namespace, and the network's devices when this was its last task here (idempotent)
    await this.releaseNetwork();
  }
}
