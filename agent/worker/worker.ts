/**
 * The worker: reconciles the node's assignment set with one task controller per task.
 *
 *  - a COMPLETE set replaces what the worker knows (tasks absent from it are removed); an INCREMENTAL
 *    message adds or updates tasks and removes the listed ones;
 *  - a task with desired state RUNNING is run: ACCEPTED → PREPARING → STARTING → RUNNING → COMPLETE
 *    (exit 0) | FAILED (non-zero exit) | REJECTED (could not be prepared);
 *  - a task whose desired state is past RUNNING is stopped (stop grace period) and reported SHUTDOWN;
 *  - a task no longer assigned has its container removed;
 *  - containers found at start (label flotilla.task.id) are adopted, not started again; those whose
 *    task is no longer assigned are removed; one that exited meanwhile is reported with its exit code.
 *
 * Secrets and configs arrive with the assignments (only those this node's tasks need): the worker
 * keeps them in memory, never on disk, hands a task's files to the runtime when it creates the
 * task's container (the runtime puts them on a tmpfs and mounts them read-only), and forgets them
 * when the manager says no task here needs them any more (remove_secrets, remove_configs).
 *
 * Reported states only move forward. Reports go through a StatusQueue (coalesced, batched). Work on
 * containers runs concurrently, at most `concurrency` create/start/stop/remove operations at once.
 * close() detaches from the containers (they keep running) and does not stop them.
 */
import type { Logger } from '../../common/log.js';
import { errorMessage } from '../../common/errors.js';
import { sleep } from '../../common/sleep.js';
import { AssignmentsType, type AssignmentsMessage } from '../../gen/flotilla/v1/dispatcher.js';
import { HealthState, TaskState, type Config, type FileTarget, type Secret, type Task, type TaskStatus } from '../../gen/flotilla/v1/objects.js';
import { DEFAULT_FILE_MODE, defaultTarget, targetPath } from '../../common/secrets.js';
import type { ContainerFile, ContainerInfo, ContainerRuntime, ExitInfo, ImageConfig } from '../runtime/types.js';
import { healthSettings, monitorHealth } from './health.js';
import { type ImageProvider, LABEL_TASK_ID, TaskController, TaskError, overlayAttachments } from './controller.js';
import { StatusQueue, type StatusQueueOptions, type StatusSender } from './status.js';
import type { TaskNetwork } from '../network/node-network.js';

export interface WorkerOptions {
  runtime: ContainerRuntime;
  /** the node's hostname, for messages */
  hostname: string;
  log?: Logger;
  /** container operations (create+start, remove) in flight at once; default 16 (stops: 4 times as many) */
  concurrency?: number;
  /** status batching */
  status?: StatusQueueOptions;
  /** how long close() waits for operations in flight; default 2000 ms */
  closeTimeoutMs?: number;
  /** the node's overlay data plane: follows the messages' network views, attaches task containers */
  network?: TaskNetwork;
  /** where missing images come from (agent/worker/distribution.ts); absent: they must be imported */
  images?: ImageProvider;
  /**
   * How long a ready task on an overlay network keeps running, out of every node's load-balancer
   * tables already, before it is sent its stop signal; default DEFAULT_DRAIN_DELAY_MS (0: none)
   */
  drainDelayMs?: number;
}

/**
 * The drain delay (docs/networking.md, "Rolling updates without a failed request"): the manager takes
 * a task it stops out of the network views in the same commit that tells its node to stop it, and the
 * nodes apply the views within a few hundred ms of each other; this long after, no node sends it a new
 * connection any more, and only then does it get SIGTERM.
 */
export const DEFAULT_DRAIN_DELAY_MS = 1000;

/**
 * A counting semaphore. Waiters queue in order, except urgent ones, which go to the front: a
 * container that is already created starts before the next one is created, so tasks reach running
 * as they are prepared rather than all at the end of a large batch.
 */
class Limiter {
  private active = 0;
  private readonly queue: Array<() => void> = [];
  constructor(private readonly max: number) {}

  async run<T>(fn: () => Promise<T>, urgent = false): Promise<T> {
    if (this.active >= this.max) await new Promise<void>((resolve) => (urgent ? this.queue.unshift(resolve) : this.queue.push(resolve)));
    else this.active++;
    try {
      return await fn();
    } finally {
      const next = this.queue.shift();
      if (next) next();
      else this.active--;
    }
  }
}

interface Runner {
  task: Task;
  /** the newest state known: reported by us, or the manager's */
  state: TaskState;
  /** the last status we reported (fields carried forward: container id, pid) */
  status: TaskStatus;
  ctl: TaskController;
  /** the container found at adoption, if any */
  adopted?: ContainerInfo;
  /** aborts the lifecycle's wait (shutdown, removal, close) */
  abort: AbortController;
  life?: Promise<void>;
  stopping?: Promise<void>;
  removing?: Promise<void>;
  /** resolves a prepared task held back (desired state below running) once it may start */
  release?: () => void;
  /** when the last progress line of a PREPARING task was reported */
  progressAt?: number;
}

const TERMINAL = TaskState.TASK_STATE_COMPLETE;

export class Worker {
  readonly runtime: ContainerRuntime;
  readonly statuses: StatusQueue;
  private readonly log: Logger | undefined;
  private readonly runners = new Map<string, Runner>();
  /** tasks whose container is being removed, by task id */
  private readonly removing = new Map<string, Promise<void>>();
  /** container operations in flight (idle() waits for these) */
  private readonly ops = new Set<Promise<unknown>>();
  /** task lifecycles (they include waiting for the container to exit) */
  private readonly lives = new Set<Promise<unknown>>();
  private readonly limit: Limiter;
  /** stops wait out grace periods: they get their own, wider limit */
  private readonly stopLimit: Limiter;
  private applying: Promise<void> = Promise.resolve();
  private closed = false;
  /** aborted by close(): ends the waits that are not a runner's own (the drain delay) */
  private readonly closing = new AbortController();
  /** the secrets and configs the manager sent for this node's tasks, by id (memory only) */
  private readonly secrets = new Map<string, Secret>();
  private readonly configs = new Map<string, Config>();

  constructor(private readonly opts: WorkerOptions) {
    this.runtime = opts.runtime;
    this.log = opts.log;
    this.limit = new Limiter(Math.max(1, opts.concurrency ?? 16));
    this.stopLimit = new Limiter(Math.max(1, (opts.concurrency ?? 16) * 4));
    this.statuses = new StatusQueue({ log: opts.log, ...opts.status });
  }

  /** Attaches the function that sends status batches (the session); undefined while disconnected. */
  setSender(sender: StatusSender | undefined): void {
    this.statuses.setSender(sender);
  }

  /** Applies an assignments message. Messages are applied in the order of the calls. */
  assign(msg: AssignmentsMessage): Promise<void> {
    const p = this.applying.then(() => this.apply(msg));
    this.applying = p.catch((err: unknown) => this.log?.error({ err: errorMessage(err) }, 'applying assignments failed'));
    return p;
  }

  /** The task ids the worker holds. */
  taskIds(): string[] {
    return [...this.runners.keys()];
  }

  /** The last status the worker reported (or learnt from the manager) for a task. */
  taskStatus(taskId: string): TaskStatus | undefined {
    const r = this.runners.get(taskId);
    return r ? { ...r.status } : undefined;
  }

  /** The container of a task, if the worker knows it. */
  containerOf(taskId: string): string | undefined {
    return this.runners.get(taskId)?.ctl.containerId;
  }

  /** Resolves when no container operation is in flight (lifecycles waiting on exits excepted). */
  async idle(): Promise<void> {
    await this.applying;
    while (true) {
      const busy = [...this.ops];
      if (busy.length === 0) return;
      await Promise.all(busy);
    }
  }

  /** Detaches: aborts waits, lets operations in flight finish (bounded), flushes statuses. Containers keep running. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.closing.abort();
    await this.applying;
    for (const r of this.runners.values()) r.abort.abort();
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((r) => (timer = setTimeout(r, this.opts.closeTimeoutMs ?? 2000)));
    await Promise.race([Promise.all([...this.ops, ...this.lives]), timeout]);
    clearTimeout(timer);
    await this.statuses.close();
  }

  // ---------------------------------------------------------------------------------------------- reconcile

  /** Tracks a promise that never rejects (errors are logged) in a set until it settles. */
  private track(p: Promise<void>, set: Set<Promise<unknown>> = this.ops): Promise<void> {
    const q = p.catch((err: unknown) => this.log?.error({ err: errorMessage(err) }, 'task operation failed'));
    set.add(q);
    void q.finally(() => set.delete(q));
    return q;
  }

  /** Runs a container operation: at most `concurrency` at once (urgent ones first), counted by idle(). */
  private op<T>(fn: () => Promise<T>, urgent = false): Promise<T> {
    const p = this.limit.run(fn, urgent);
    const q = p.then(
      () => undefined,
      () => undefined,
    );
    this.ops.add(q);
    void q.finally(() => this.ops.delete(q));
    return p;
  }

  private async apply(msg: AssignmentsMessage): Promise<void> {
    if (this.closed) return;
    const complete = msg.type === AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE;
    // dependencies first: the tasks of this message may need them
    if (complete) {
      this.secrets.clear();
      this.configs.clear();
    }
    for (const x of msg.secrets) this.secrets.set(x.id, x);
    for (const x of msg.configs) this.configs.set(x.id, x);
    // networks first: a task's container is attached from the views of this very message
    const network = this.opts.network;
    if (network && (complete || msg.networkViews.length > 0 || msg.removeNetworks.length > 0 || msg.networks.length > 0)) {
      try {
        await network.applyAssignments(msg);
      } catch (err) {
        this.log?.error({ err: errorMessage(err) }, 'programming the overlay networks failed');
      }
    }
    // the runtime's containers of tasks, for adoption (a COMPLETE set reconciles with them)
    const found = new Map<string, ContainerInfo[]>();
    if (complete || !this.listedOnce) {
      this.listedOnce = true;
      for (const c of await this.runtime.list()) {
        const id = c.labels[LABEL_TASK_ID];
        if (!id) continue; // not ours (flotilla container run)
        let l = found.get(id);
        if (!l) found.set(id, (l = []));
        l.push(c);
      }
    }
    if (complete) {
      const keep = new Set(msg.update.map((t) => t.id));
      for (const [id, r] of this.runners) if (!keep.has(id)) this.remove(r);
    }
    for (const t of msg.update) this.upsert(t, found.get(t.id));
    for (const id of msg.remove) {
      const r = this.runners.get(id);
      if (r) this.remove(r);
    }
    for (const id of msg.removeSecrets) this.secrets.delete(id);
    for (const id of msg.removeConfigs) this.configs.delete(id);
    // containers of tasks that are not (or no longer) assigned, and duplicates of adopted ones
    for (const [taskId, list] of found) {
      const r = this.runners.get(taskId);
      for (const c of list) {
        if (r && (r.ctl.containerId === c.id || r.ctl.containerId === undefined)) continue;
        if (!r && (!complete || this.removing.has(taskId))) continue;
        this.log?.info({ taskId, container: c.name }, 'removing the container of a task no longer assigned');
        void this.track(this.op(() => this.removeContainer(c.id, r ? undefined : taskId)));
      }
    }
    // network attachments left by tasks that are gone (no runner, no container): detach them
    if (complete && network) {
      for (const taskId of network.attachedTasks()) {
        if (this.runners.has(taskId) || this.removing.has(taskId) || found.has(taskId)) continue;
        this.log?.info({ taskId }, 'detaching the network namespace of a task no longer assigned');
        void this.track(this.op(() => network.detach(taskId)));
      }
    }
  }

  private listedOnce = false;

  /** The ids of the secrets and configs the worker holds (for tests; never their data). */
  dependencyIds(): { secrets: string[]; configs: string[] } {
    return { secrets: [...this.secrets.keys()], configs: [...this.configs.keys()] };
  }

  /** A task's secret and config files, from what the manager sent; REJECTED when one is missing. */
  private filesOf(t: Task): ContainerFile[] {
    const c = t.spec?.container;
    if (!c) return [];
    const out: ContainerFile[] = [];
    const add = (kind: 'secret' | 'config', id: string, name: string, obj: Secret | Config | undefined, file: FileTarget | undefined): void => {
      if (!obj?.spec) throw new TaskError(TaskState.TASK_STATE_REJECTED, `${kind} ${JSON.stringify(name)} (${id}) is not available on node ${this.opts.hostname}`);
      out.push({
        target: targetPath(kind, file?.name || defaultTarget(kind, name)),
        data: obj.spec.data,
        uid: file?.uid ?? 0,
        gid: file?.gid ?? 0,
        mode: file ? file.mode : DEFAULT_FILE_MODE,
      });
    };
    for (const r of c.secrets) add('secret', r.secretId, r.secretName, this.secrets.get(r.secretId), r.file);
    for (const r of c.configs) add('config', r.configId, r.configName, this.configs.get(r.configId), r.file);
    return out;
  }

  /** Removes a container; with taskId (a task no longer assigned), that task's network attachments too. */
  private async removeContainer(id: string, taskId?: string): Promise<void> {
    try {
      await this.runtime.remove(id, true);
    } catch (err) {
      if ((err as { code?: string }).code !== 'NOT_FOUND') throw err;
    }
    if (taskId) await this.opts.network?.detach(taskId);
  }

  private upsert(t: Task, containers: ContainerInfo[] | undefined): void {
    let r = this.runners.get(t.id);
    const managerState = t.status?.state ?? TaskState.TASK_STATE_ASSIGNED;
    if (!r) {
      if (this.removing.has(t.id)) {
        this.log?.warn({ taskId: t.id }, 'task assigned again while its container is being removed: ignored');
        return;
      }
      const ctl = new TaskController(this.runtime, t, this.opts.hostname, (task) => this.filesOf(task), this.opts.network, this.opts.images);
      r = {
        task: t,
        state: managerState,
        status: t.status ? { ...t.status } : emptyStatus(managerState),
        ctl,
        abort: new AbortController(),
      };
      const adopted = pickContainer(containers);
      if (adopted) {
        r.adopted = adopted;
        ctl.adopt(adopted);
      }
      this.runners.set(t.id, r);
    } else {
      r.task = t;
      r.ctl.task = t;
      if (managerState > r.state) r.state = managerState;
    }
    this.drive(r);
  }

  private drive(r: Runner): void {
    if (r.removing || r.stopping || this.closed) return;
    if (r.state >= TERMINAL) {
      // terminal already (e.g. the manager marked it orphaned): make sure nothing of it still runs
      const live = r.life !== undefined || (r.adopted !== undefined && r.adopted.status !== 'stopped');
      if (live) void this.shutdown(r);
      return;
    }
    if (r.task.desiredState > TaskState.TASK_STATE_RUNNING) {
      void this.shutdown(r);
      return;
    }
    // A task held by a stop-first update (desired state below running) is prepared, not started,
    // so that its container is ready the moment the old task has stopped.
    if (!r.life) r.life = this.track(this.lifecycle(r), this.lives);
    if (r.task.desiredState === TaskState.TASK_STATE_RUNNING) r.release?.();
  }

  /** Waits until the task may start (its desired state is running), or the signal aborts. */
  private released(r: Runner, sig: AbortSignal): Promise<void> {
    if (r.task.desiredState >= TaskState.TASK_STATE_RUNNING || sig.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = (): void => {
        r.release = undefined;
        sig.removeEventListener('abort', done);
        resolve();
      };
      r.release = done;
      sig.addEventListener('abort', done, { once: true });
    });
  }

  // ---------------------------------------------------------------------------------------------- reports

  /** Reports a state if it moves the task forward; carries the container id and pid along. */
  private report(r: Runner, state: TaskState, fields: Partial<TaskStatus> = {}): void {
    if (r.removing || r.state >= TERMINAL || state <= r.state) return;
    const status: TaskStatus = {
      ...r.status,
      message: '',
      err: '',
      ...fields,
      state,
      timestamp: Date.now(),
    };
    if (fields.health === undefined) status.health = r.status.health;
    if (r.ctl.containerId && !status.containerId) status.containerId = r.ctl.containerId;
    r.state = state;
    r.status = status;
    if (!this.closed) this.statuses.push(r.task.id, status);
  }

  private reportExit(r: Runner, exit: ExitInfo): void {
    if (exit.exitCode === 0) {
      this.report(r, TaskState.TASK_STATE_COMPLETE, { message: 'finished', exitCode: 0, pid: 0, oomKilled: exit.oomKilled });
    } else {
      this.report(r, TaskState.TASK_STATE_FAILED, {
        message: 'started',
        err: `task: non-zero exit (${exit.exitCode})`,
        exitCode: exit.exitCode,
        pid: 0,
        oomKilled: exit.oomKilled,
      });
    }
  }

  // ---------------------------------------------------------------------------------------------- lifecycle

  private async lifecycle(r: Runner): Promise<void> {
    const sig = r.abort.signal;
    const id = r.task.id;
    try {
      let info = r.adopted;
      let started = false;
      if (!info) {
        if (r.state >= TaskState.TASK_STATE_STARTING) {
          // the manager saw it start here, but its container is gone (data dir lost?): do not start a copy
          this.report(r, TaskState.TASK_STATE_FAILED, { err: `task: its container is gone from node ${this.opts.hostname}` });
          return;
        }
        this.report(r, TaskState.TASK_STATE_ACCEPTED, { message: 'accepted' });
        // a missing image is fetched first, outside the concurrency limit (a long pull holds no slot)
        if (this.opts.images) {
          this.report(r, TaskState.TASK_STATE_PREPARING, { message: 'preparing' });
          await r.ctl.pullImage(sig, (m) => this.reportProgress(r, m));
          if (sig.aborted) return;
        }
        // prepare, then (for a held task) wait outside the concurrency limit, then start
        const created = await this.op(async () => {
          if (sig.aborted) return undefined;
          this.report(r, TaskState.TASK_STATE_PREPARING, { message: 'preparing' });
          return r.ctl.prepare();
        });
        if (!created || sig.aborted) return;
        info = await this.startContainer(r, created, sig);
        if (!info || sig.aborted) return;
        started = true;
      } else if (info.status === 'created') {
        info = await this.startContainer(r, info, sig);
        if (!info || sig.aborted) return;
        started = true;
      }
      if (started || info.status === 'running') {
        this.report(r, TaskState.TASK_STATE_RUNNING, { message: 'started', containerId: info.id, pid: info.pid });
      }
      this.log?.debug({ taskId: id, container: info.name }, started ? 'task started' : 'task adopted');
      const health = started || info.status === 'running' ? await this.watchHealth(r, info.id, sig) : undefined;
      let exit: ExitInfo;
      try {
        exit = await r.ctl.wait(sig);
      } finally {
        health?.stop();
      }
      if (health && (await health.done) === 'unhealthy') return; // reported FAILED by the health watch
      if (sig.aborted) return;
      this.reportExit(r, exit);
      await this.releaseNetwork(r);
    } catch (err) {
      if (sig.aborted) return; // shutdown, removal or close took over
      const state = err instanceof TaskError ? err.state : TaskState.TASK_STATE_FAILED;
      this.log?.warn({ taskId: id, err: errorMessage(err) }, state === TaskState.TASK_STATE_REJECTED ? 'task rejected' : 'task failed');
      this.report(r, state, { err: errorMessage(err) });
    }
  }

  /**
   * The start step of a created container (just prepared, or adopted in state created): waits until the
   * task may start (outside the concurrency limit), then reports STARTING and starts it under the limit.
   * Resolves the started container's info, or undefined when aborted before it started.
   */
  private async startContainer(r: Runner, created: ContainerInfo, sig: AbortSignal): Promise<ContainerInfo | undefined> {
    if (r.task.desiredState < TaskState.TASK_STATE_RUNNING) {
      r.status = { ...r.status, containerId: created.id };
      await this.released(r, sig);
    }
    if (sig.aborted) return undefined;
    return this.op(async () => {
      if (sig.aborted) return undefined;
      this.report(r, TaskState.TASK_STATE_STARTING, { message: 'starting', containerId: created.id });
      return r.ctl.start();
    }, true);
  }

  /**
   * Starts the container's health checks, if it has any: health changes are reported with RUNNING;
   * an unhealthy container is stopped and its task reported FAILED ("task: container unhealthy").
   */
  private async watchHealth(
    r: Runner,
    containerId: string,
    sig: AbortSignal,
  ): Promise<{ stop: () => void; done: Promise<'unhealthy' | undefined> } | undefined> {
    const spec = r.task.spec?.container;
    if (!spec || spec.noHealthcheck) return undefined;
    let image: ImageConfig['healthcheck'];
    try {
      image = (await this.runtime.imageConfig(spec.image)).healthcheck;
    } catch {
      image = undefined; // the image went away: only the task's own check applies
    }
    const settings = healthSettings(spec, image);
    if (!settings) return undefined;
    const ctl = new AbortController();
    const onAbort = (): void => ctl.abort();
    sig.addEventListener('abort', onAbort, { once: true });
    const done = monitorHealth(this.runtime, containerId, settings, ctl.signal, (h) => this.reportHealth(r, h), r.status.health).then(
      async (res) => {
        if (res !== 'unhealthy' || sig.aborted) return undefined;
        this.log?.warn({ taskId: r.task.id }, 'container unhealthy: stopping it');
        try {
          await this.stopLimit.run(() => r.ctl.shutdown());
        } catch (err) {
          this.log?.warn({ taskId: r.task.id, err: errorMessage(err) }, 'stopping an unhealthy container failed');
        }
        const after = await r.ctl.inspect().catch(() => undefined);
        this.report(r, TaskState.TASK_STATE_FAILED, {
          message: 'started',
          err: 'task: container unhealthy',
          exitCode: after?.exitCode ?? 0,
          pid: 0,
          health: HealthState.HEALTH_STATE_UNHEALTHY,
        });
        await this.releaseNetwork(r);
        return 'unhealthy' as const;
      },
    );
    return {
      stop: () => {
        sig.removeEventListener('abort', onAbort);
        ctl.abort();
      },
      done,
    };
  }

  /** Reports the progress of a PREPARING task (same state, new message), at most every 500 ms. */
  private reportProgress(r: Runner, message: string): void {
    if (r.removing || r.state !== TaskState.TASK_STATE_PREPARING || r.status.message === message) return;
    const now = Date.now();
    if (now - (r.progressAt ?? 0) < 500) return;
    r.progressAt = now;
    const status: TaskStatus = { ...r.status, message, timestamp: now };
    r.status = status;
    if (!this.closed) this.statuses.push(r.task.id, status);
  }

  /** Reports a change of health of a RUNNING task (same state, new health). */
  private reportHealth(r: Runner, health: HealthState): void {
    if (r.removing || r.state !== TaskState.TASK_STATE_RUNNING || r.status.health === health) return;
    const status: TaskStatus = { ...r.status, health, timestamp: Date.now() };
    r.status = status;
    if (!this.closed) this.statuses.push(r.task.id, status);
  }

  /** A task whose container stopped for good leaves its overlay networks (errors are logged). */
  private async releaseNetwork(r: Runner): Promise<void> {
    try {
      await r.ctl.releaseNetwork();
    } catch (err) {
      this.log?.warn({ taskId: r.task.id, err: errorMessage(err) }, 'detaching a stopped task from its networks failed');
    }
  }

  /**
   * A ready task on an overlay network that the manager stops (update, scale down: desired state
   * SHUTDOWN) left every node's load-balancer tables in the same commit: it keeps serving for the drain
   * delay, so that no node still sends it a new connection when it gets SIGTERM. Not for tasks removed
   * outright (service rm), nor ones that were not ready (not in the tables), nor when the worker closes.
   */
  private async drain(r: Runner): Promise<void> {
    const ms = this.opts.drainDelayMs ?? DEFAULT_DRAIN_DELAY_MS;
    if (ms <= 0 || !this.opts.network || this.closed || r.removing) return;
    if (overlayAttachments(r.task).length === 0 || r.task.desiredState !== TaskState.TASK_STATE_SHUTDOWN) return;
    if (r.state !== TaskState.TASK_STATE_RUNNING) return;
    const h = r.status.health;
    if (h !== HealthState.HEALTH_STATE_NONE && h !== HealthState.HEALTH_STATE_HEALTHY) return;
    this.log?.debug({ taskId: r.task.id, ms }, 'draining before the stop signal');
    await sleep(ms, this.closing.signal);
  }

  private shutdown(r: Runner): Promise<void> {
    if (r.stopping) return r.stopping;
    r.abort.abort();
    r.stopping = this.track(
      (async () => {
        await r.life;
        const before = await r.ctl.inspect();
        if (before?.status === 'stopped' && r.state < TERMINAL && r.state >= TaskState.TASK_STATE_RUNNING) {
          // it exited by itself before we stopped it
          this.reportExit(r, { exitCode: before.exitCode ?? -1, oomKilled: before.oomKilled });
          await this.releaseNetwork(r);
          return;
        }
        if (before && before.status !== 'stopped') {
          await this.drain(r);
          try {
            await this.stopLimit.run(() => r.ctl.shutdown());
          } catch (err) {
            this.report(r, TaskState.TASK_STATE_FAILED, { err: `task: shutdown failed: ${errorMessage(err)}` });
            return;
          }
        }
        const after = await r.ctl.inspect();
        this.report(r, TaskState.TASK_STATE_SHUTDOWN, {
          message: 'shutdown',
          pid: 0,
          exitCode: after?.exitCode ?? 0,
          oomKilled: after?.oomKilled ?? false,
        });
        await this.releaseNetwork(r);
      })(),
    );
    return r.stopping;
  }

  private remove(r: Runner): void {
    if (r.removing) return;
    const id = r.task.id;
    this.runners.delete(id);
    this.statuses.drop(id);
    r.abort.abort();
    r.removing = this.track(
      (async () => {
        await r.life;
        await r.stopping;
        await this.op(() => r.ctl.remove());
      })().finally(() => this.removing.delete(id)),
    );
    this.removing.set(id, r.removing);
  }
}

function emptyStatus(state: TaskState): TaskStatus {
  return {
    state,
    timestamp: 0,
    message: '',
    err: '',
    exitCode: 0,
    containerId: '',
    pid: 0,
    health: HealthState.HEALTH_STATE_NONE,
    oomKilled: false,
  };
}

/** Of several containers of one task (should not happen), the running one, else the newest. */
function pickContainer(list: ContainerInfo[] | undefined): ContainerInfo | undefined {
  if (!list || list.length === 0) return undefined;
  return [...list].sort((a, b) => Number(b.status === 'running') - Number(a.status === 'running') || b.created - a.created)[0];
}
