/**
 * The control API: what the CLI talks to. Every spec is validated before it reaches the store;
 * errors carry the right gRPC status (INVALID_ARGUMENT naming the field, NOT_FOUND, ALREADY_EXISTS,
 * ABORTED for stale versions, FAILED_PRECONDITION).
 */
import * as grpc from '@grpc/grpc-js';
import {
  ControlServer,
  CreateConfigRequest,
  CreateSecretRequest,
  ControlService,
  CreateServiceRequest,
  GetConfigRequest,
  GetSecretRequest,
  RemoveConfigRequest,
  RemoveSecretRequest,
  CreateServiceResponse,
  GetClusterResponse,
  ListTasksRequest,
  LogLine,
  RemoveNodeRequest,
  ServiceLogsRequest,
  UpdateClusterRequest,
  UpdateClusterResponse,
  UpdateNodeRequest,
  UpdateServiceRequest,
  UpdateServiceResponse,
} from '../../gen/flotilla/v1/control.js';
import { Node, NodeAvailability, NodeRole, NodeState, Service, ServiceMode, ServiceSpec, Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError, invalidArgument, notFound } from '../../common/errors.js';
import { newId } from '../../common/ids.js';
import { sleep } from '../../common/sleep.js';
import { Tx, type MemoryStore } from '../store/store.js';
import type { Dispatcher } from '../dispatcher/dispatcher.js';
import { isAgentless, unary } from '../dispatcher/dispatcher.js';
import { grpcError } from '../grpc.js';
import { labelBytes, MAX_NODE_LABEL_BYTES, tooLarge, validateServiceSpec } from './validate.js';
import { diffSpecs, taskSpecEqual, tasksToReplace } from './diff.js';
import { newUnlockKey } from '../keys/keys.js';
import { UpdateState } from '../../gen/flotilla/v1/objects.js';
import { followIngress, stripIngress } from './ingress.js';
import { allocatePorts } from '../allocator/ports.js';
import { createNetwork, removeNetwork, requireNetworks, resolveNetwork, resolveServiceNetworks } from './networks.js';
import type { CreateNetworkRequest } from '../../gen/flotilla/v1/control.js';
import { createObject, redact, removeObject, resolveObject, resolveReferences } from './secrets.js';
import { pinImage, redactService, redactSpec, redactTask, validateRegistryAuth, type PinContext } from './images.js';

import { StoreHistory } from '../store/history.js';
import { serveWatch } from './events.js';
import { type AuthzOptions, type Policy, authorize } from '../ca/authz.js';

export const DEFAULT_SERVICE_HISTORY = 10;

export interface ControlContext {
  store: MemoryStore;
  dispatcher: Dispatcher;
  leaderAddr(): string;
  /** linearizable read barrier (Raft ReadIndex); a no-op on a single manager */
  readBarrier(): Promise<void>;
  /** Raft membership of manager nodes */
  removeManager?(node: Node, force: boolean): Promise<void>;
  managerStatus?(node: Node): import('../../gen/flotilla/v1/objects.js').ManagerStatus | undefined;
  /** the Raft members with their ids, addresses and reachability */
  managers?(): import('../../gen/flotilla/v1/objects.js').ManagerStatus[];
  /** a new admin client certificate (PEM CA bundle, certificate, key) */
  issueClientCertificate?(expiryMs: number): Promise<{ caPem: string; certPem: string; keyPem: string }>;
  /** replaces one role's join token; returns the new one */
  rotateJoinToken?(role: 'worker' | 'manager'): Promise<string>;
  /** starts a root CA rotation (start) and/or reports on it */
  rotateRootCa?(start: boolean): Promise<{ inProgress: boolean; root: string; pendingNodes: string[]; nodes: number }>;
  /** the node id of this manager */
  selfNodeId?(): string;
  /** the registry's digest for a reference (default: the registry client; tests) */
  resolveImage?(ref: string, auth: import('../../gen/flotilla/v1/objects.js').RegistryAuth | undefined): Promise<string>;
  /** a follower: serve a logs request by relaying it from the leader */
  relayLogs?(call: grpc.ServerWritableStream<ServiceLogsRequest, LogLine>): void;
  /** the managers' store, for `cluster info`: "raft" or "etcd <endpoints> <prefix>" */
  storeKind?(): string;
}

/** Over TCP (mutual TLS): admin certificates, and managers (their own calls to each other). */
const ADMIN_OR_MANAGER = ['admin', 'manager'] as const;
export const CONTROL_POLICY: Policy<ControlServer> = {
  getCluster: ADMIN_OR_MANAGER,
  listNodes: ADMIN_OR_MANAGER,
  getNode: ADMIN_OR_MANAGER,
  updateNode: ADMIN_OR_MANAGER,
  removeNode: ADMIN_OR_MANAGER,
  createService: ADMIN_OR_MANAGER,
  getService: ADMIN_OR_MANAGER,
  listServices: ADMIN_OR_MANAGER,
  updateService: ADMIN_OR_MANAGER,
  removeService: ADMIN_OR_MANAGER,
  listTasks: ADMIN_OR_MANAGER,
  serviceLogs: ADMIN_OR_MANAGER,
  issueClientCertificate: ['admin'],
  rotateJoinToken: ADMIN_OR_MANAGER,
  rotateRootCa: ['admin'],
  createNetwork: ADMIN_OR_MANAGER,
  getNetwork: ADMIN_OR_MANAGER,
  listNetworks: ADMIN_OR_MANAGER,
  removeNetwork: ADMIN_OR_MANAGER,
  createSecret: ADMIN_OR_MANAGER,
  getSecret: ADMIN_OR_MANAGER,
  listSecrets: ADMIN_OR_MANAGER,
  removeSecret: ADMIN_OR_MANAGER,
  createConfig: ADMIN_OR_MANAGER,
  getConfig: ADMIN_OR_MANAGER,
  listConfigs: ADMIN_OR_MANAGER,
  removeConfig: ADMIN_OR_MANAGER,
  // the unlock key and autolock: admins only (a manager never needs them from another)
  updateCluster: ['admin'],
  getUnlockKey: ['admin'],
  // over TCP a manager is never locked (a locked one does not listen): this only ever answers "not locked"
  unlockManager: ADMIN_OR_MANAGER,
  // the cluster's change stream: admin (client) certificates only; managers never need it
  watch: ['admin'],
};

export function isJob(mode: ServiceMode | undefined): boolean {
  return mode === ServiceMode.SERVICE_MODE_REPLICATED_JOB || mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB;
}

export function resolveService(store: MemoryStore, ref: string): Service {
  if (!ref) throw invalidArgument('service', ref, 'required');
  const byId = store.getService(ref);
  if (byId) return byId;
  const byName = store.serviceByName(ref);
  if (byName) return byName;
  const matches = store.listServices().filter((s) => s.id.startsWith(ref));
  if (matches.length === 1) return matches[0]!;
  if (matches.length > 1) throw new FlotillaError('FAILED_PRECONDITION', `service ${JSON.stringify(ref)} is ambiguous (${matches.length} matches)`);
  throw notFound('service', ref);
}

export function resolveTask(store: MemoryStore, ref: string): Task {
  const byId = store.getTask(ref);
  if (byId) return byId;
  const matches = ref.length >= 4 ? store.listTasks().filter((t) => t.id.startsWith(ref)) : [];
  if (matches.length === 1) return matches[0]!;
  if (matches.length > 1) throw new FlotillaError('FAILED_PRECONDITION', `task ${JSON.stringify(ref)} is ambiguous (${matches.length} matches)`);
  throw notFound('task', ref);
}

export function resolveNode(store: MemoryStore, ref: string): Node {
  if (!ref) throw invalidArgument('node', ref, 'required');
  const byId = store.getNode(ref);
  if (byId) return byId;
  const byName = store.listNodes().filter((n) => n.description?.hostname === ref);
  if (byName.length === 1) return byName[0]!;
  const matches = store.listNodes().filter((n) => n.id.startsWith(ref));
  if (matches.length === 1) return matches[0]!;
  if (matches.length > 1 || byName.length > 1) throw new FlotillaError('FAILED_PRECONDITION', `node ${JSON.stringify(ref)} is ambiguous`);
  throw notFound('node', ref);
}

/** How often a demotion tries to record the worker role after the member left Raft (250 ms apart). */
const DEMOTE_WRITE_ATTEMPTS = 40;

export class ControlApi {
  /** the store's recent changes, for Watch (created with the API, before it serves) */
  readonly history: StoreHistory;
  constructor(private readonly ctx: ControlContext) {
    this.history = new StoreHistory(ctx.store);
  }

  private get store(): MemoryStore {
    return this.ctx.store;
  }

  async getCluster(): Promise<GetClusterResponse> {
    await this.ctx.readBarrier();
    const cluster = this.store.getCluster();
    if (!cluster) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
    return {
      // neither the unlock key (shown only by GetUnlockKey) nor the CA's private key leaves the store through the API
      cluster: { ...cluster, unlockKey: '', ...(cluster.ca ? { ca: { ...cluster.ca, rootKeyPem: '' } } : {}) },
      leaderAddr: this.ctx.leaderAddr(),
      nodes: this.store.nodes.size,
      services: this.store.services.size,
      tasks: this.store.tasks.size,
      managers: this.ctx.managers?.() ?? [],
      selfNodeId: this.ctx.selfNodeId?.() ?? '',
      store: this.ctx.storeKind?.() ?? 'raft',
    };
  }

  /**
   * Autolock on/off and unlock key rotation. Turning autolock on makes a new unlock key (kept when
   * it is already on); off clears it. Each manager re-encrypts its data key when it applies the
   * change (Manager.followKeys).
   */
  async updateCluster(req: UpdateClusterRequest): Promise<UpdateClusterResponse> {
    if (req.autolock !== '' && req.autolock !== 'true' && req.autolock !== 'false') throw invalidArgument('autolock', req.autolock, 'must be true or false');
    return this.store.update((tx) => {
      const id = this.store.getCluster()?.id;
      const cur = id ? tx.get('cluster', id) : undefined;
      if (!cur?.spec) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
      const autolock = req.autolock === '' ? cur.spec.autolock : req.autolock === 'true';
      if (req.rotateUnlockKey && !autolock) throw new FlotillaError('FAILED_PRECONDITION', 'autolock is off: there is no unlock key to rotate (flotilla cluster update --autolock=true)');
      const unlockKey = !autolock ? '' : req.rotateUnlockKey || !cur.unlockKey ? newUnlockKey() : cur.unlockKey;
      if (autolock !== cur.spec.autolock || unlockKey !== cur.unlockKey) tx.update('cluster', { ...cur, spec: { ...cur.spec, autolock }, unlockKey });
      return { unlockKey };
    });
  }

  /** Where images are pinned from (manager/controlapi/images.ts); tests may replace the registry lookup. */
  pinContext(): PinContext {
    return {
      localDigests: (name) => this.ctx.dispatcher.localImageDigests(name),
      simulatedOnly: () => {
        const nodes = this.store.listNodes().filter((n) => !isAgentless(n));
        // no node with an image store (simulated nodes only, or none registered yet: a node that
        // joined but never registered has no description): nothing to pin against
        return nodes.every((n) => !n.description || n.description.runtime === 'sim');
      },
      ...(this.ctx.resolveImage ? { resolve: this.ctx.resolveImage } : {}),
    };
  }

  /** The spec with its image pinned (unless noResolve) and its registry credentials checked. */
  private async pinned(spec: ServiceSpec, noResolve: boolean): Promise<ServiceSpec> {
    const c = spec.task?.container;
    if (!c) return spec;
    validateRegistryAuth(c.registryAuth);
    const image = await pinImage(c.image, noResolve, c.registryAuth, this.pinContext());
    return image === c.image ? spec : { ...spec, task: { ...spec.task!, container: { ...c, image } } };
  }

  async createService(req: CreateServiceRequest): Promise<CreateServiceResponse> {
    const given = validateServiceSpec(req.spec);
    stripIngress(this.store, given);
    const resolved = resolveServiceNetworks(this.store, given);
    const id = newId();
    // what would refuse the service is checked before a registry is asked for the image's digest and
    // before the ingress network is made for it: its name, secrets and configs, a published port
    // another service holds
    if (this.store.serviceByName(resolved.name)) throw new FlotillaError('ALREADY_EXISTS', `service ${JSON.stringify(resolved.name)} already exists`);
    resolveReferences(new Tx(this.store), structuredClone(resolved));
    allocatePorts(id, resolved.endpoint, [], this.store.listServices());
    const spec = await this.pinned(resolved, req.noResolveImage);
    await followIngress(this.store, spec);
    const now = Date.now();
    await this.store.update((tx) => {
      if (this.store.serviceByName(spec.name)) throw new FlotillaError('ALREADY_EXISTS', `service ${JSON.stringify(spec.name)} already exists`);
      requireNetworks((id) => tx.get('network', id), spec);
      resolveReferences(tx, spec);
      // again inside the write: the services this transaction applies to
      const ports = allocatePorts(id, spec.endpoint, [], this.store.listServices());
      tx.create('service', {
        id,
        meta: undefined,
        spec,
        specVersion: 1,
        previousSpec: undefined,
        updateStatus: undefined,
        history: [{ version: 1, spec, createdAt: now }],
        endpoint: ports.length > 0 ? { spec: spec.endpoint, ports, virtualIps: [] } : undefined,
        jobStatus: isJob(spec.mode) ? { jobIteration: 1, lastExecution: now } : undefined,
      });
    });
    return { service: redactService(this.store.getService(id)) };
  }

  async updateService(req: UpdateServiceRequest): Promise<UpdateServiceResponse> {
    const cur = resolveService(this.store, req.serviceId);
    if (req.version && req.version !== cur.specVersion)
      throw new FlotillaError('ABORTED', `update out of sequence: service ${cur.spec?.name} is at version ${cur.specVersion}, not ${req.version}`);
    let next: ServiceSpec;
    if (req.rollback) {
      next = this.rollbackTarget(cur, req.rollback, req.toVersion);
    } else {
      next = validateServiceSpec(req.spec);
      // credentials are never shown, so a spec read back has none: keep the service's unless new ones came
      const auth = next.task?.container?.registryAuth ?? cur.spec?.task?.container?.registryAuth;
      if (next.task?.container && auth) next = { ...next, task: { ...next.task, container: { ...next.task.container, registryAuth: auth } } };
      // a new image reference (or the same tag named again, which differs from the pinned one) is
      // resolved again: a moved tag rolls out; a spec sent back unchanged (scale, env) keeps its pin
      const same = next.task?.container?.image === cur.spec?.task?.container?.image;
      next = await this.pinned(next, req.noResolveImage || same);
    }
    // network names to ids (a rolled-back spec's networks must still exist); the ingress network
    // follows the published ports
    stripIngress(this.store, next);
    next = resolveServiceNetworks(this.store, next);
    allocatePorts(cur.id, next.endpoint, cur.endpoint?.ports ?? [], this.store.listServices());
    await followIngress(this.store, next, req.dryRun);
    if (next.name !== cur.spec?.name) throw invalidArgument('spec.name', next.name, 'a service cannot be renamed');
    if (next.mode !== cur.spec?.mode) throw invalidArgument('spec.mode', next.mode, 'the mode of a service cannot change');
    // secrets and configs by name -> id (again inside the write, where a removal cannot slip between)
    resolveReferences(new Tx(this.store), next);
    const diff = diffSpecs(redactSpec(cur.spec), redactSpec(next));
    const authOf = (x: ServiceSpec | undefined): string => JSON.stringify(x?.task?.container?.registryAuth ?? null);
    if (authOf(cur.spec) !== authOf(next)) diff.push('~ task.container.registryAuth: (credentials changed)');
    const replaced = tasksToReplace(this.store.tasksOfService(cur.id), next);
    if (req.dryRun) return { service: redactService(cur), replacedTasks: replaced.map((t) => t.id), diff };
    const limit = Number(this.store.getCluster()?.spec?.serviceHistoryLimit || DEFAULT_SERVICE_HISTORY);
    await this.store.update((tx) => {
      const s = tx.get('service', cur.id);
      if (!s) throw notFound('service', req.serviceId);
      if (s.specVersion !== cur.specVersion) throw new FlotillaError('ABORTED', `update out of sequence: service ${cur.spec?.name} changed meanwhile`);
      requireNetworks((id) => tx.get('network', id), next);
      resolveReferences(tx, next);
      const version = s.specVersion + 1;
      const now = Date.now();
      const history = [...s.history, { version, spec: next, createdAt: now }].slice(-limit);
      // a change of the task spec starts a rolling update (or a rollback); scaling does not. Any update
      // of a paused service resumes it (as a new update).
      const paused = s.updateStatus?.state === UpdateState.UPDATE_STATE_PAUSED || s.updateStatus?.state === UpdateState.UPDATE_STATE_ROLLBACK_PAUSED;
      if (isJob(next.mode)) {
        // a job is not rolled: any update (e.g. --force) runs it again as a new iteration, as in Swarm
        const jobStatus = { jobIteration: (s.jobStatus?.jobIteration ?? 0) + 1, lastExecution: now };
        tx.update('service', { ...s, spec: next, specVersion: version, previousSpec: s.spec, history, jobStatus });
        return;
      }
      const rolling = !taskSpecEqual(s.spec?.task, next.task) || paused;
      const updateStatus = req.rollback
        ? {
            state: UpdateState.UPDATE_STATE_ROLLBACK_STARTED,
            startedAt: now,
            completedAt: 0,
            message: `manually requested rollback to version ${this.rollbackVersion(s, req)}`,
          }
        : rolling
          ? { state: UpdateState.UPDATE_STATE_UPDATING, startedAt: now, completedAt: 0, message: 'update in progress' }
          : s.updateStatus;
      const ports = allocatePorts(s.id, next.endpoint, s.endpoint?.ports ?? [], this.store.listServices());
      const endpoint = s.endpoint || ports.length > 0 ? { spec: next.endpoint, virtualIps: s.endpoint?.virtualIps ?? [], ports } : undefined;
      tx.update('service', { ...s, spec: next, specVersion: version, previousSpec: s.spec, history, updateStatus, endpoint });
    });
    return { service: redactService(this.store.getService(cur.id)), replacedTasks: replaced.map((t) => t.id), diff };
  }

  private rollbackVersion(s: Service, req: UpdateServiceRequest): number {
    if (req.rollback === 'version') return req.toVersion;
    return s.history.length >= 2 ? (s.history[s.history.length - 2]?.version ?? 0) : 0;
  }

  private rollbackTarget(cur: Service, how: string, toVersion: number): ServiceSpec {
    if (how === 'previous') {
      if (!cur.previousSpec) throw new FlotillaError('FAILED_PRECONDITION', `service ${cur.spec?.name} has no previous version to roll back to`);
      return structuredClone(cur.previousSpec);
    }
    if (how === 'version') {
      const v = cur.history.find((h) => h.version === toVersion);
      if (!v?.spec) {
        const kept = cur.history.map((h) => h.version).join(', ');
        throw invalidArgument('to-version', toVersion, `version not kept (kept: ${kept})`);
      }
      if (toVersion === cur.specVersion) throw invalidArgument('to-version', toVersion, 'is the current version');
      return structuredClone(v.spec);
    }
    throw invalidArgument('rollback', how, 'must be previous or version');
  }

  async removeService(ref: string): Promise<void> {
    const s = resolveService(this.store, ref);
    // in batches that fit the store's limit (a service may have many tasks): the service goes in the
    // first, so no orchestrator replaces the tasks stopped meanwhile; the reaper stops any task of a
    // removed service that a removal cut short left running
    await this.store.updateBatched((tx) => {
      tx.delete('service', s.id);
      for (const t of this.store.tasksOfService(s.id)) {
        const cur = tx.get('task', t.id);
        if (cur && cur.desiredState <= TaskState.TASK_STATE_RUNNING) tx.update('task', { ...cur, desiredState: TaskState.TASK_STATE_SHUTDOWN });
      }
    });
  }

  async listTasks(req: ListTasksRequest): Promise<Task[]> {
    await this.ctx.readBarrier();
    let tasks: Task[];
    if (req.serviceId) tasks = this.store.tasksOfService(resolveService(this.store, req.serviceId).id);
    else if (req.nodeId) tasks = this.store.tasksOfNode(resolveNode(this.store, req.nodeId).id);
    else tasks = this.store.listTasks();
    if (req.serviceId && req.nodeId) {
      const n = resolveNode(this.store, req.nodeId);
      tasks = tasks.filter((t) => t.nodeId === n.id);
    }
    if (req.desiredRunning) tasks = tasks.filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING);
    return tasks.map(redactTask);
  }

  async updateNode(req: UpdateNodeRequest): Promise<Node> {
    const cur = resolveNode(this.store, req.nodeId);
    if (!req.spec) throw invalidArgument('spec', null, 'required');
    if (req.version && req.version !== cur.meta?.version) throw new FlotillaError('ABORTED', `update out of sequence for node ${req.nodeId}`);
    if (![NodeAvailability.NODE_AVAILABILITY_ACTIVE, NodeAvailability.NODE_AVAILABILITY_PAUSE, NodeAvailability.NODE_AVAILABILITY_DRAIN].includes(req.spec.availability))
      throw invalidArgument('availability', req.spec.availability, 'must be active, pause or drain');
    for (const k of Object.keys(req.spec.labels)) if (!k || /\s/.test(k)) throw invalidArgument('label', k, 'invalid key');
    if (labelBytes(req.spec.labels) > MAX_NODE_LABEL_BYTES) throw tooLarge('label', labelBytes(req.spec.labels), MAX_NODE_LABEL_BYTES);
    if (isAgentless(cur) && req.spec.availability !== NodeAvailability.NODE_AVAILABILITY_DRAIN)
      throw new FlotillaError(
        'FAILED_PRECONDITION',
        `node ${cur.description?.hostname ?? cur.id} is a manager without an agent (--no-agent): it cannot run tasks and stays drained; restart its manager without --no-agent first`,
      );
    const wantRole = req.spec.desiredRole;
    let role = cur.role;
    if (wantRole !== cur.role) {
      if (wantRole === NodeRole.NODE_ROLE_MANAGER) {
        // promote: only a node whose agent runs inside a (demoted) manager process can become one;
        // that process sees the desired role and joins the managers, then marks the node a manager
        if (!cur.description?.managerAddr)
          throw new FlotillaError(
            'FAILED_PRECONDITION',
            `node ${cur.description?.hostname ?? cur.id} runs no manager process: start \`flotilla manager --join <manager> --token <manager token>\` on that host instead`,
          );
      } else {
        // demote: leave the Raft membership first (refused when the rest would lose quorum, unless forced)
        if (this.ctx.removeManager) await this.ctx.removeManager(cur, req.force);
        role = NodeRole.NODE_ROLE_WORKER;
      }
    }
    const write = () =>
      this.store.update((tx) => {
        const n = tx.get('node', cur.id);
        if (!n) throw notFound('node', req.nodeId);
        tx.update('node', { ...n, role, spec: { ...req.spec!, desiredRole: wantRole === NodeRole.NODE_ROLE_MANAGER ? wantRole : role } });
      });
    if (role === NodeRole.NODE_ROLE_WORKER && cur.role !== role) {
      // the member is gone from Raft already: record the worker role even through the election that
      // removing a leader causes (the write is idempotent, so a retry after an unknown outcome is safe)
      for (let attempt = 1; ; attempt++) {
        try {
          await write();
          break;
        } catch (err) {
          if (!(err instanceof FlotillaError && err.code === 'UNAVAILABLE') || attempt >= DEMOTE_WRITE_ATTEMPTS) throw err;
          await sleep(250);
        }
      }
    } else {
      await write();
    }
    return this.withManagerStatus(this.store.getNode(cur.id)!);
  }

  async removeNode(req: RemoveNodeRequest): Promise<void> {
    const n = resolveNode(this.store, req.nodeId);
    if (n.status?.state === NodeState.NODE_STATE_READY && !req.force)
      throw new FlotillaError('FAILED_PRECONDITION', `node ${n.description?.hostname ?? n.id} is not down and can't be removed (use --force)`);
    if (n.role === NodeRole.NODE_ROLE_MANAGER)
      throw new FlotillaError('FAILED_PRECONDITION', `node ${n.description?.hostname ?? n.id} is a manager: demote it first (flotilla node demote)`);
    await this.store.update((tx) => tx.delete('node', n.id));
  }

  private withManagerStatus(n: Node): Node {
    const ms = this.ctx.managerStatus?.(n);
    return ms ? { ...n, managerStatus: ms } : n;
  }

  serviceLogs(call: grpc.ServerWritableStream<ServiceLogsRequest, LogLine>): void {
    let tasks: Task[];
    try {
      // the agents' log streams end at the leader's dispatcher: a follower relays the stream from
      // the leader with its own manager certificate (a CLI on its unix socket has none)
      if (!this.ctx.dispatcher.isRunning() && this.ctx.relayLogs && this.ctx.leaderAddr()) {
        this.ctx.relayLogs(call);
        return;
      }
      if (!this.ctx.dispatcher.isRunning())
        throw new FlotillaError('UNAVAILABLE', `logs are served by the leader manager; retry with --host ${this.ctx.leaderAddr() || '<leader>'}`);
      if (call.request.sinceMs < 0) throw invalidArgument('since', call.request.sinceMs, 'must not be negative');
      // one task (by id or unique id prefix), or every task of a service
      tasks = call.request.taskId ? [resolveTask(this.store, call.request.taskId)] : this.store.tasksOfService(resolveService(this.store, call.request.serviceId).id);
    } catch (err) {
      call.emit('error', grpcError(err));
      return;
    }
    tasks = tasks.filter((t) => t.nodeId && t.status?.containerId);
    const since = call.request.sinceMs;
    if (tasks.length === 0) {
      call.end();
      return;
    }
    let open = tasks.length;
    const cancels: Array<() => void> = [];
    call.on('cancelled', () => cancels.forEach((c) => c()));
    for (const t of tasks) {
      cancels.push(
        this.ctx.dispatcher.requestLogs(
          t.nodeId,
          { taskId: t.id, containerId: t.status!.containerId, follow: call.request.follow, tail: call.request.tail },
          {
            lines: (lines) => {
              // --since: lines older than the time are dropped here (after the agent's --tail)
              for (const l of lines) if (!since || l.timestamp >= since) call.write({ ...l, taskId: t.id, nodeId: t.nodeId, slot: t.slot });
            },
            done: () => {
              if (--open === 0) call.end();
            },
          },
        ),
      );
    }
  }

  /** The handlers; with `authz` (the TCP listener) wrapped with CONTROL_POLICY. */
  server(authz?: AuthzOptions): ControlServer {
    const handlers = this.handlers();
    return authz ? authorize(ControlService, handlers, CONTROL_POLICY, authz) : handlers;
  }

  private handlers(): ControlServer {
    return {
      getCluster: unary(() => this.getCluster()),
      listNodes: unary(async () => {
        await this.ctx.readBarrier();
        return { nodes: this.store.listNodes().map((n) => this.withManagerStatus(n)) };
      }),
      getNode: unary(async (req: { nodeId: string }) => {
        await this.ctx.readBarrier();
        return { node: this.withManagerStatus(resolveNode(this.store, req.nodeId)) };
      }),
      updateNode: unary(async (req: UpdateNodeRequest) => ({ node: await this.updateNode(req) })),
      removeNode: unary(async (req: RemoveNodeRequest) => {
        await this.removeNode(req);
        return {};
      }),
      createService: unary((req: CreateServiceRequest) => this.createService(req)),
      getService: unary(async (req: { serviceId: string }) => {
        await this.ctx.readBarrier();
        return { service: redactService(resolveService(this.store, req.serviceId)) };
      }),
      listServices: unary(async () => {
        await this.ctx.readBarrier();
        return { services: this.store.listServices().map((x) => redactService(x)!) };
      }),
      updateService: unary((req: UpdateServiceRequest) => this.updateService(req)),
      removeService: unary(async (req: { serviceId: string }) => {
        await this.removeService(req.serviceId);
        return {};
      }),
      listTasks: unary(async (req: ListTasksRequest) => ({ tasks: await this.listTasks(req) })),
      serviceLogs: (call) => this.serviceLogs(call),
      watch: (call) => serveWatch(this.history, call),
      createNetwork: unary(async (req: CreateNetworkRequest) => ({ network: await createNetwork(this.store, req.spec) })),
      getNetwork: unary(async (req: { networkId: string }) => {
        await this.ctx.readBarrier();
        return { network: resolveNetwork(this.store, req.networkId) };
      }),
      listNetworks: unary(async () => {
        await this.ctx.readBarrier();
        return { networks: [...this.store.networks.values()] };
      }),
      removeNetwork: unary(async (req: { networkId: string }) => {
        await removeNetwork(this.store, req.networkId);
        return {};
      }),
      createSecret: unary(async (req: CreateSecretRequest) => ({ secret: await createObject(this.store, 'secret', req.spec) })),
      getSecret: unary(async (req: GetSecretRequest) => {
        await this.ctx.readBarrier();
        return { secret: redact(resolveObject(this.store, 'secret', req.secretId)) };
      }),
      listSecrets: unary(async () => {
        await this.ctx.readBarrier();
        return { secrets: [...this.store.secrets.values()].map((x) => redact(x)) };
      }),
      removeSecret: unary(async (req: RemoveSecretRequest) => {
        await removeObject(this.store, 'secret', req.secretId);
        return {};
      }),
      createConfig: unary(async (req: CreateConfigRequest) => ({ config: await createObject(this.store, 'config', req.spec) })),
      getConfig: unary(async (req: GetConfigRequest) => {
        await this.ctx.readBarrier();
        return { config: resolveObject(this.store, 'config', req.configId) };
      }),
      listConfigs: unary(async () => {
        await this.ctx.readBarrier();
        return { configs: [...this.store.configs.values()].map((x) => redact(x)) };
      }),
      removeConfig: unary(async (req: RemoveConfigRequest) => {
        await removeObject(this.store, 'config', req.configId);
        return {};
      }),
      updateCluster: unary((req: UpdateClusterRequest) => this.updateCluster(req)),
      getUnlockKey: unary(async () => {
        await this.ctx.readBarrier();
        const c = this.store.getCluster();
        if (!c) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
        return { unlockKey: c.spec?.autolock ? c.unlockKey : '' };
      }),
      unlockManager: unary(() => Promise.reject(new FlotillaError('FAILED_PRECONDITION', 'this manager is not locked'))),
      issueClientCertificate: unary(async (req: { expiryMs: number }) => {
        if (!this.ctx.issueClientCertificate) throw new FlotillaError('FAILED_PRECONDITION', 'this manager has no CA');
        if (req.expiryMs < 0) throw invalidArgument('expiry_ms', req.expiryMs, 'must not be negative');
        return this.ctx.issueClientCertificate(req.expiryMs);
      }),
      rotateJoinToken: unary(async (req: { role: string }) => {
        if (req.role !== 'worker' && req.role !== 'manager') throw invalidArgument('role', req.role, 'must be worker or manager');
        if (!this.ctx.rotateJoinToken) throw new FlotillaError('FAILED_PRECONDITION', 'this manager has no CA');
        return { token: await this.ctx.rotateJoinToken(req.role) };
      }),
      rotateRootCa: unary(async (req: { start: boolean }) => {
        if (!this.ctx.rotateRootCa) throw new FlotillaError('FAILED_PRECONDITION', 'this manager has no CA');
        return this.ctx.rotateRootCa(req.start);
      }),
    };
  }
}
