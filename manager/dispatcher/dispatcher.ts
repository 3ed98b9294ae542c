/**
 * The dispatcher: agents register with a join token and hold a session; heartbeats at a period the
 * manager sets (a node that misses 3 is marked down); an assignment stream per session sends the
 * node's full task set, then increments; task status reports are batched into store writes and only
 * ever move a task forward. Leader-only: start() runs it, its signal ending stops it.
 */
import * as grpc from '@grpc/grpc-js';
import {
  AssignmentsMessage,
  AssignmentsRequest,
  AssignmentsType,
  DispatcherServer,
  DispatcherService,
  HeartbeatRequest,
  HeartbeatResponse,
  ImageSourcesRequest,
  ImageSourcesResponse,
  type ImageSource,
  LogChunk,
  LogRequest,
  RegisterRequest,
  RegisterResponse,
  UpdateTaskStatusRequest,
  UpdateTaskStatusResponse,
} from '../../gen/flotilla/v1/dispatcher.js';
import { LogLine } from '../../gen/flotilla/v1/control.js';
import { type Node, NodeAvailability, NodeRole, NodeState, Task, TaskState, TaskStatus } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError } from '../../common/errors.js';
import { newId, secretMatches } from '../../common/ids.js';
import type { Logger } from '../../common/log.js';
import type { MemoryStore, StoreEvent } from '../store/store.js';
import { grpcError } from '../grpc.js';
import { sleep } from '../../common/sleep.js';
import { NetworkViews } from './netviews.js';
import { hasReferences, needsDependencies, noDependencies, syncDependencies, type SentDependencies } from './dependencies.js';
import { type AuthzOptions, type Policy, authorize, callerOf } from '../ca/authz.js';
import type { CertIdentity } from '../ca/x509.js';

export const DEFAULT_HEARTBEAT_MS = 5000;
const MISSED_HEARTBEATS = 3;
const STATUS_FLUSH_MS = 5;
const STATUS_CHUNK = 1000;

interface Session {
  id: string;
  nodeId: string;
  lastSeen: number;
  streams: Set<grpc.ServerWritableStream<AssignmentsRequest, AssignmentsMessage>>;
  logStream?: grpc.ServerDuplexStream<LogChunk, LogRequest>;
  /** the secrets and configs sent to the node (dependencies.ts) */
  deps: SentDependencies;
  /** what the node's last heartbeat said it holds, and where its blob server listens (docs/images.md) */
  images: { name: string; digest: string; repoDigests: string[] }[];
  contentAddr: string;
}

/** At most this many images of a node are kept from its heartbeats. */
const MAX_NODE_IMAGES = 1000;

export interface LogSink {
  lines(lines: LogLine[]): void;
  done(error?: string): void;
}

export class Dispatcher {
  private readonly sessions = new Map<string, Session>();
  private running = false;
  private pending = new Map<string, { nodeId: string; status: TaskStatus }>();
  private flushTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> = Promise.resolve();
  private readonly logSinks = new Map<string, LogSink>();
  private unsubscribe: (() => void) | undefined;
  /** the network views each node is sent (docs/networking.md); built when the dispatcher starts */
  private netViews: NetworkViews | undefined;

  constructor(
    private readonly store: MemoryStore,
    private readonly log: Logger,
    private readonly opts: { managers: () => string[]; heartbeatMs?: number; trustBundle?: () => string },
  ) {}

  private heartbeatMs(): number {
    return Number(this.store.getCluster()?.spec?.heartbeatPeriodMs || this.opts.heartbeatMs || DEFAULT_HEARTBEAT_MS);
  }

  /** Leader-only: serve sessions and watch heartbeats until signal aborts. */
  async run(signal: AbortSignal): Promise<void> {
    this.running = true;
    const started = Date.now();
    this.netViews = new NetworkViews(this.store);
    this.unsubscribe = this.store.subscribe((evs) => this.route(evs));
    try {
      while (!signal.aborted) {
        await sleep(Math.max(100, Math.floor(this.heartbeatMs() / 2)), signal);
        if (signal.aborted) break;
        await this.checkHeartbeats(started, signal).catch((err: unknown) =>
          this.log.warn({ err: (err as Error).message }, 'heartbeat check failed'),
        );
      }
    } finally {
      this.running = false;
      this.unsubscribe?.();
      for (const s of this.sessions.values()) {
        for (const st of s.streams) st.emit('error', grpcError(new FlotillaError('UNAVAILABLE', 'manager is no longer the leader')));
        s.logStream?.end();
      }
      this.sessions.clear();
      this.netViews = undefined;
      if (this.flushTimer) clearTimeout(this.flushTimer);
      this.flushTimer = undefined;
      await this.flushing;
      this.pending.clear();
    }
  }

  private async checkHeartbeats(started: number, signal: AbortSignal): Promise<void> {
    const now = Date.now();
    const deadline = this.heartbeatMs() * MISSED_HEARTBEATS;
    const down: string[] = [];
    for (const n of this.store.listNodes()) {
      if (n.status?.state !== NodeState.NODE_STATE_READY || isAgentless(n)) continue;
      const s = this.sessions.get(n.id);
      const last = s ? s.lastSeen : started;
      if (now - last > deadline) down.push(n.id);
    }
    if (down.length === 0) return;
    for (const id of down) {
      const s = this.sessions.get(id);
      if (s) this.endSession(s, 'heartbeat failure');
    }
    await this.store.update((tx) => {
      for (const id of down) {
        const n = tx.get('node', id);
        if (!n || n.status?.state !== NodeState.NODE_STATE_READY) continue;
        tx.update('node', { ...n, status: { ...n.status, state: NodeState.NODE_STATE_DOWN, message: 'heartbeat failure' } });
      }
    }, signal);
    this.log.warn({ nodes: down }, 'nodes missed heartbeats: marked down');
  }

  private endSession(s: Session, why: string): void {
    this.sessions.delete(s.nodeId);
    this.netViews?.forget(s.nodeId);
    for (const st of s.streams) st.emit('error', grpcError(new FlotillaError('UNAVAILABLE', `session ended: ${why}`)));
    s.logStream?.end();
  }

  private requireRunning(): void {
    if (!this.running) throw new FlotillaError('UNAVAILABLE', 'this manager is not the leader');
  }

  private session(nodeId: string, sessionId: string): Session {
    this.requireRunning();
    const s = this.sessions.get(nodeId);
    if (!s || s.id !== sessionId) throw new FlotillaError('NOT_FOUND', 'session not found: register again');
    return s;
  }

  /**
   * Registers a node. With mutual TLS `cert` is the caller's certificate: the node is the one it
   * names (ids in the request are ignored) and the token is not needed; without (tests of the
   * dispatcher alone) the token says the role.
   */
  async register(req: RegisterRequest, cert?: { nodeId: string; role: string; notAfter: Date; issuer?: string }): Promise<RegisterResponse> {
    this.requireRunning();
    const cluster = this.store.getCluster();
    if (!cluster?.tokens) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
    const role = cert
      ? cert.role === 'manager'
        ? NodeRole.NODE_ROLE_MANAGER
        : NodeRole.NODE_ROLE_WORKER
      : secretMatches(req.token, cluster.tokens.manager)
        ? NodeRole.NODE_ROLE_MANAGER
        : secretMatches(req.token, cluster.tokens.worker)
          ? NodeRole.NODE_ROLE_WORKER
          : undefined;
    if (role === undefined) throw new FlotillaError('PERMISSION_DENIED', 'invalid join token');
    const desc = req.description;
    if (!desc?.hostname) throw new FlotillaError('INVALID_ARGUMENT', 'invalid description.hostname "": required');
    const wantId = cert ? cert.nodeId : req.nodeId;
    const existing = wantId ? this.store.getNode(wantId) : undefined;
    const nodeId = cert ? cert.nodeId : (existing?.id ?? newId());
    // a connection opened before a renewal still presents the previous certificate: the newer wins
    const newer = !!cert && cert.notAfter.getTime() >= (existing?.certificateExpiryMs ?? 0);
    const certificateExpiryMs = newer ? cert.notAfter.getTime() : (existing?.certificateExpiryMs ?? 0);
    const certificateIssuer = (newer ? cert.issuer : undefined) ?? existing?.certificateIssuer ?? '';
    const old = this.sessions.get(nodeId);
    if (old) this.endSession(old, 'replaced by a new session');
    await this.store.update((tx) => {
      const n = tx.get('node', nodeId);
      const status = { state: NodeState.NODE_STATE_READY, message: '', addr: req.addr, lastHeartbeat: Date.now() };
      if (n) {
        tx.update('node', { ...n, description: desc, status, certificateExpiryMs, certificateIssuer });
      } else {
        tx.create('node', {
          id: nodeId,
          meta: undefined,
          spec: { labels: {}, desiredRole: role, availability: NodeAvailability.NODE_AVAILABILITY_ACTIVE },
          description: desc,
          status,
          managerStatus: undefined,
          role,
          certificateExpiryMs,
          certificateIssuer,
        });
      }
    });
    const s: Session = { id: newId(), nodeId, lastSeen: Date.now(), streams: new Set(), deps: noDependencies(), images: [], contentAddr: req.contentAddr };
    s.images = req.images.slice(0, MAX_NODE_IMAGES).map((i) => ({ name: i.name, digest: i.digest, repoDigests: i.repoDigests.slice(0, 16) }));
    this.sessions.set(nodeId, s);
    this.log.info({ nodeId, hostname: desc.hostname }, 'node registered');
    return { nodeId, sessionId: s.id, heartbeatPeriodMs: this.heartbeatMs(), managers: this.opts.managers() };
  }

  heartbeat(req: HeartbeatRequest): HeartbeatResponse {
    const s = this.session(req.nodeId, req.sessionId);
    s.lastSeen = Date.now();
    s.images = req.images.slice(0, MAX_NODE_IMAGES).map((i) => ({ name: i.name, digest: i.digest, repoDigests: i.repoDigests.slice(0, 16) }));
    s.contentAddr = req.contentAddr;
    return { periodMs: this.heartbeatMs(), managers: this.opts.managers(), trustBundlePem: this.opts.trustBundle?.() ?? '' };
  }

  assignments(call: grpc.ServerWritableStream<AssignmentsRequest, AssignmentsMessage>): void {
    let s: Session;
    try {
      s = this.session(call.request.nodeId, call.request.sessionId);
    } catch (err) {
      call.emit('error', grpcError(err));
      return;
    }
    s.streams.add(call);
    call.on('cancelled', () => s.streams.delete(call));
    call.on('close', () => s.streams.delete(call));
    const tasks = this.store.tasksOfNode(s.nodeId).filter(assignable);
    const views = this.netViews?.complete(s.nodeId) ?? [];
    const msg = AssignmentsMessage.fromPartial({
      type: AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE,
      update: tasks,
      networks: views.map((v) => v.network!),
      networkViews: views,
    });
    // the whole set of secrets and configs the node's tasks need, and nothing else
    s.deps = noDependencies();
    syncDependencies(this.store, tasks, s.deps, msg);
    call.write(msg);
  }

  /** Routes committed task changes to the sessions of their nodes. */
  private route(evs: StoreEvent[]): void {
    // network views first: the index follows every batch, connected or not
    const netUpdates = this.netViews?.apply(evs, this.sessions.keys());
    if (this.sessions.size === 0) return;
    const perNode = new Map<string, AssignmentsMessage>();
    const msgFor = (nodeId: string): AssignmentsMessage => {
      let m = perNode.get(nodeId);
      if (!m) perNode.set(nodeId, (m = AssignmentsMessage.fromPartial({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL })));
      return m;
    };
    // nodes whose tasks' need of secrets and configs may have changed
    const depNodes = new Set<string>();
    for (const ev of evs) {
      if (ev.kind === 'commit' || ev.table !== 'task') continue;
      const t = ev.object as Task;
      for (const n of [t.nodeId, (ev.old as Task | undefined)?.nodeId]) {
        const s = n ? this.sessions.get(n) : undefined;
        if (s && (s.deps.secrets.size > 0 || s.deps.configs.size > 0 || (hasReferences(t) && needsDependencies(t)))) depNodes.add(n!);
      }
      if (!t.nodeId || !this.sessions.has(t.nodeId)) continue;
      if (ev.kind === 'delete') {
        if (assignable(t)) msgFor(t.nodeId).remove.push(t.id);
        continue;
      }
      if (!assignable(t)) continue;
      const old = ev.old as Task | undefined;
      const changed =
        !old || !assignable(old) || old.nodeId !== t.nodeId || old.desiredState !== t.desiredState || old.specVersion !== t.specVersion;
      if (changed) msgFor(t.nodeId).update.push(t);
    }
    for (const [nodeId, u] of netUpdates ?? []) {
      const m = msgFor(nodeId);
      m.networkViews.push(...u.views);
      m.networks.push(...u.views.map((v) => v.network!));
      m.removeNetworks.push(...u.remove);
    }
    for (const nodeId of depNodes) {
      const m = perNode.get(nodeId) ?? AssignmentsMessage.fromPartial({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL });
      if (syncDependencies(this.store, this.store.tasksOfNode(nodeId).filter(assignable), this.sessions.get(nodeId)!.deps, m)) perNode.set(nodeId, m);
    }
    for (const [nodeId, m] of perNode) {
      const s = this.sessions.get(nodeId);
      if (!s) continue;
      for (const st of s.streams) st.write(m);
    }
  }

  updateTaskStatus(req: UpdateTaskStatusRequest): UpdateTaskStatusResponse {
    const s = this.session(req.nodeId, req.sessionId);
    s.lastSeen = Date.now();
    for (const u of req.updates) {
      const t = this.store.getTask(u.taskId);
      if (t && t.nodeId !== s.nodeId) throw new FlotillaError('PERMISSION_DENIED', `task ${u.taskId} is not assigned to node ${s.nodeId}: refusing its status report`);
    }
    for (const u of req.updates) {
      if (!u.status) continue;
      this.pending.set(u.taskId, { nodeId: s.nodeId, status: u.status });
    }
    if (!this.flushTimer && this.pending.size > 0) this.flushTimer = setTimeout(() => this.flush(), STATUS_FLUSH_MS);
    return {};
  }

  private flush(): void {
    this.flushTimer = undefined;
    const batch = [...this.pending];
    this.pending = new Map();
    this.flushing = this.flushing.then(async () => {
      for (let i = 0; i < batch.length; i += STATUS_CHUNK) {
        const chunk = batch.slice(i, i + STATUS_CHUNK);
        try {
          await this.store.updateBatched((tx) => {
            for (const [taskId, u] of chunk) {
              const t = tx.get('task', taskId);
              if (!t || t.nodeId !== u.nodeId) continue;
              const cur = t.status?.state ?? TaskState.TASK_STATE_NEW;
              if (u.status.state < cur) continue; // task state only moves forward
              const st = t.status;
              if (
                st &&
                u.status.state === cur &&
                st.message === u.status.message &&
                st.err === u.status.err &&
                st.health === u.status.health &&
                st.containerId === u.status.containerId
              )
                continue;
              tx.update('task', { ...t, status: { ...u.status, timestamp: u.status.timestamp || Date.now() } });
            }
          });
        } catch (err) {
          this.log.warn({ err: (err as Error).message }, 'writing task status failed');
        }
      }
    });
  }

  // ---- logs: the agent holds a stream; the control API asks through it

  logs(call: grpc.ServerDuplexStream<LogChunk, LogRequest>, boundNodeId?: string): void {
    let s: Session | undefined;
    call.on('data', (chunk: LogChunk) => {
      if (!s) {
        try {
          s = this.session(boundNodeId ?? chunk.nodeId, chunk.sessionId);
          s.logStream = call;
        } catch (err) {
          call.emit('error', grpcError(err));
          return;
        }
        if (!chunk.requestId) return; // the hello
      }
      const sink = this.logSinks.get(chunk.requestId);
      if (!sink) return;
      if (chunk.lines.length) sink.lines(chunk.lines);
      if (chunk.done) {
        this.logSinks.delete(chunk.requestId);
        sink.done(chunk.error || undefined);
      }
    });
    call.on('error', () => {});
    call.on('end', () => call.end());
  }

  /** Asks a node's agent for a task's logs. Returns a cancel function. */
  requestLogs(nodeId: string, req: Omit<LogRequest, 'requestId' | 'cancel'>, sink: LogSink): () => void {
    const s = this.sessions.get(nodeId);
    if (!s?.logStream) {
      sink.done(`node ${nodeId} is not connected`);
      return () => {};
    }
    const requestId = newId();
    this.logSinks.set(requestId, sink);
    s.logStream.write({ ...req, requestId, cancel: false });
    return () => {
      if (this.logSinks.delete(requestId)) s.logStream?.write({ ...req, requestId, cancel: true });
    };
  }

  /**
   * The connected nodes (other than the caller) whose last heartbeat listed an image matching ref: by
   * digest for "sha256:<hex>" and "name[:tag]@sha256:<hex>", else by normalised name:tag. Nodes that
   * serve no blobs (no content address) are left out; ready nodes first, in a random order so that
   * fetches spread over the holders.
   */
  imageSources(req: ImageSourcesRequest): ImageSourcesResponse {
    this.session(req.nodeId, req.sessionId);
    const ref = req.ref.trim();
    const at = ref.indexOf('@');
    const digest = /^sha256:[a-f0-9]{64}$/.test(ref) ? ref : at > 0 ? ref.slice(at + 1) : '';
    const name = digest ? '' : normalizeRef(ref);
    if (!digest && !name) throw new FlotillaError('INVALID_ARGUMENT', `invalid image reference ${JSON.stringify(req.ref)}`);
    const sources: ImageSource[] = [];
    for (const s of this.sessions.values()) {
      if (s.nodeId === req.nodeId || !s.contentAddr) continue;
      const hit = s.images.find((i) => (digest ? i.digest === digest || i.repoDigests.some((rd) => rd.endsWith(`@${digest}`)) : i.name === name));
      if (!hit) continue;
      const node = this.store.getNode(s.nodeId);
      if (node?.status?.state !== NodeState.NODE_STATE_READY) continue;
      sources.push({ nodeId: s.nodeId, hostname: node.description?.hostname ?? '', contentAddr: s.contentAddr, name: hit.name, digest: hit.digest });
    }
    for (let i = sources.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [sources[i], sources[j]] = [sources[j]!, sources[i]!];
    }
    return { sources };
  }

  /** The manifest digests of images imported (not pulled: no repo digests) under name on connected nodes. */
  localImageDigests(name: string): Set<string> {
    const out = new Set<string>();
    for (const s of this.sessions.values()) for (const i of s.images) if (i.name === name && i.repoDigests.length === 0) out.add(i.digest);
    return out;
  }

  /** Whether this manager's dispatcher serves agents (it is the leader's). */
  isRunning(): boolean {
    return this.running;
  }

  isConnected(nodeId: string): boolean {
    return this.sessions.has(nodeId);
  }

  /**
   * The gRPC handlers. With `authz` (mutual TLS) only worker and manager certificates get in, and
   * every call is bound to the certificate's node id: node ids in request bodies are replaced by it.
   */
  server(authz?: AuthzOptions): DispatcherServer {
    if (!authz) {
      return {
        register: unary((req: RegisterRequest) => this.register(req)),
        heartbeat: unary(async (req: HeartbeatRequest) => this.heartbeat(req)),
        updateTaskStatus: unary(async (req: UpdateTaskStatusRequest) => this.updateTaskStatus(req)),
        assignments: (call) => this.assignments(call),
        logs: (call) => this.logs(call),
        imageSources: unary(async (req: ImageSourcesRequest) => this.imageSources(req)),
      };
    }
    const idOf = (call: object): CertIdentity => {
      const id = callerOf(call)?.identity;
      if (!id) throw new FlotillaError('PERMISSION_DENIED', 'a node certificate is required');
      return id;
    };
    const bound = <Req extends { nodeId: string }, Res>(fn: (req: Req, id: CertIdentity) => Promise<Res>): grpc.handleUnaryCall<Req, Res> =>
      (call, callback) => {
        Promise.resolve()
          .then(() => {
            const id = idOf(call);
            return fn({ ...call.request, nodeId: id.nodeId }, id);
          })
          .then(
            (res) => callback(null, res),
            (err: unknown) => callback(grpcError(err)),
          );
      };
    const handlers: DispatcherServer = {
      register: bound((req: RegisterRequest, id) => this.register(req, id)),
      heartbeat: bound(async (req: HeartbeatRequest) => this.heartbeat(req)),
      updateTaskStatus: bound(async (req: UpdateTaskStatusRequest) => this.updateTaskStatus(req)),
      imageSources: bound(async (req: ImageSourcesRequest) => this.imageSources(req)),
      assignments: (call) => {
        const id = callerOf(call)?.identity;
        if (!id) return void call.emit('error', grpcError(new FlotillaError('PERMISSION_DENIED', 'a node certificate is required')));
        call.request = { ...call.request, nodeId: id.nodeId };
        this.assignments(call);
      },
      logs: (call) => {
        const id = callerOf(call)?.identity;
        if (!id) return void call.emit('error', grpcError(new FlotillaError('PERMISSION_DENIED', 'a node certificate is required')));
        this.logs(call, id.nodeId);
      },
    };
    return authorize(DispatcherService, handlers, DISPATCHER_POLICY, authz);
  }
}

/** Workers and managers (their agents), each only as itself. */
export const DISPATCHER_POLICY: Policy<DispatcherServer> = {
  register: ['worker', 'manager'],
  heartbeat: ['worker', 'manager'],
  assignments: ['worker', 'manager'],
  updateTaskStatus: ['worker', 'manager'],
  logs: ['worker', 'manager'],
  // any node of the cluster (its session) may ask where an image is
  imageSources: ['worker', 'manager'],
};

/** "busybox" -> "busybox:latest" (the image store's normalisation, without its validation); '' when empty. */
function normalizeRef(ref: string): string {
  if (!ref) return '';
  const colon = ref.lastIndexOf(':');
  return colon > ref.lastIndexOf('/') ? ref : `${ref}:latest`;
}

/** A manager's node registered by the manager itself (no agent, no runtime): it has no session. */
export function isAgentless(n: Node): boolean {
  return !n.description?.runtime && !!n.description?.managerAddr;
}

function assignable(t: Task): boolean {
  return !!t.nodeId && (t.status?.state ?? 0) >= TaskState.TASK_STATE_ASSIGNED;
}


export function unary<Req, Res>(fn: (req: Req) => Promise<Res>): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    fn(call.request).then(
      (res) => callback(null, res),
      (err: unknown) => callback(grpcError(err)),
    );
  };
}
