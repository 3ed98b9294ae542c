/**
 * The dispatcher session: the agent's one connection to the managers.
 *
 *   Register(token, node id, description) → node id, session id, heartbeat period, managers
 *   Heartbeat every period (the manager may change the period in its answer)
 *   Assignments stream → worker.assign (COMPLETE first, then INCREMENTAL)
 *   UpdateTaskStatus ← the worker's status queue (batched)
 *   Logs stream: the manager asks (LogRequest), the agent answers with LogChunks from runtime.logs()
 *
 * Any failure ends the session; the agent then registers again (same node id) after an exponential
 * backoff with jitter, trying the next manager of the list each time. A refused token (or a
 * description the manager rejects) is fatal: run() rejects with a FlotillaError PERMISSION_DENIED
 * (INVALID_ARGUMENT) and does not retry.
 */
import * as grpc from '@grpc/grpc-js';
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { LogLine } from '../../gen/flotilla/v1/control.js';
import {
  AssignmentsMessage,
  DispatcherClient,
  LogChunk,
  LogRequest,
  RegisterResponse,
  type ImageSource,
  type NodeImage,
  type TaskStatusUpdate,
} from '../../gen/flotilla/v1/dispatcher.js';
import type { NodeDescription } from '../../gen/flotilla/v1/objects.js';
import { LABEL_SLOT, LABEL_TASK_ID } from './controller.js';
import type { Worker } from './worker.js';
import { sleep } from '../../common/sleep.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import { TLS_CHANNEL_OPTIONS, type TlsSource, clientCredentials } from '../../manager/ca/credentials.js';

export interface SessionOptions {
  /** HOST:PORT of the managers to try, in order */
  managers: string[];
  token: string;
  /**
   * the node's certificate (mutual TLS): the node id is the certificate's, and every connection
   * presents it; without one (tests of the dispatcher alone) plain text with the token
   */
  tls?: TlsSource;
  /** the node's data dir: the node id is kept in <dataDir>/agent/node.json */
  dataDir: string;
  description: NodeDescription;
  /** the address the node reports */
  addr: string;
  worker: Worker;
  log: Logger;
  /** reconnect backoff: first delay and cap; default 100 ms and 5 s */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /** deadline of unary calls; default 10 s */
  rpcTimeoutMs?: number;
  /** called after each successful registration */
  onRegistered?: (info: RegisterResponse & { manager: string }) => void;
  /** called with the cluster's trust bundle from each heartbeat (a CA rotation: see agent.ts) */
  onTrustBundle?: (pem: string) => void;
  /**
   * what each heartbeat reports of the node's images and where its blob server listens (the
   * dispatcher answers other nodes' ImageSources from it; docs/images.md)
   */
  images?: () => Promise<{ images: NodeImage[]; contentAddr: string }>;
}

interface NodeFile {
  nodeId: string;
}

const FATAL_REGISTER = new Set<number>([grpc.status.PERMISSION_DENIED, grpc.status.UNAUTHENTICATED, grpc.status.INVALID_ARGUMENT]);
const LOG_BATCH_LINES = 200;
const LOG_FLUSH_MS = 50;

type GrpcError = Error & { code?: number; details?: string };

function grpcMessage(err: unknown): string {
  const e = err as GrpcError;
  return e?.details || errorMessage(err);
}


/** Runs a unary call with a deadline, cancelled when signal aborts. */
function unary<Req, Res>(
  fn: (req: Req, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: Res) => void) => grpc.ClientUnaryCall,
  req: Req,
  timeoutMs: number,
  signal: AbortSignal,
): Promise<Res> {
  return new Promise<Res>((resolve, reject) => {
    if (signal.aborted) return reject(new FlotillaError('ABORTED', 'call aborted'));
    const onAbort = (): void => call.cancel();
    const call = fn(req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => {
      signal.removeEventListener('abort', onAbort);
      if (err) reject(err);
      else resolve(res);
    });
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

export class Session {
  /** the node id (from node.json, then from the manager) */
  nodeId = '';
  sessionId = '';
  /** where the agent connects: the flag list, extended with the managers' own list */
  managers: string[];
  /** successful heartbeats and registrations, for tests and diagnostics */
  heartbeats = 0;
  registrations = 0;
  isConnected = false;
  private readonly initial: string[];
  private readonly log: Logger;
  /** the live session's client and ids (ImageSources goes through it) */
  private live: { client: DispatcherClient; nodeId: string; sessionId: string; signal: AbortSignal } | undefined;

  constructor(private readonly opts: SessionOptions) {
    if (opts.managers.length === 0) throw new FlotillaError('INVALID_ARGUMENT', 'invalid --manager []: at least one manager address is required');
    this.initial = [...opts.managers];
    this.managers = [...opts.managers];
    this.log = opts.log;
  }

  private nodeFile(): string {
    return path.join(this.opts.dataDir, 'agent', 'node.json');
  }

  private async loadNodeId(): Promise<void> {
    try {
      const f = JSON.parse(await fs.readFile(this.nodeFile(), 'utf8')) as NodeFile;
      if (typeof f.nodeId === 'string') this.nodeId = f.nodeId;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.log.warn({ err: errorMessage(err) }, `ignoring unreadable ${this.nodeFile()}`);
    }
  }

  private async saveNodeId(): Promise<void> {
    const file = this.nodeFile();
    await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    await writeFileAtomic(file, JSON.stringify({ nodeId: this.nodeId } satisfies NodeFile) + '\n');
  }

  private backoff(attempt: number): number {
    const initial = this.opts.backoffInitialMs ?? 100;
    const max = this.opts.backoffMaxMs ?? 5000;
    const base = Math.min(max, initial * 2 ** Math.min(attempt, 20));
    return Math.round(base / 2 + (Math.random() * base) / 2);
  }

  /** Keeps a session up until signal aborts. Rejects only on a fatal registration error. */
  async run(signal: AbortSignal): Promise<void> {
    await this.loadNodeId();
    // with a certificate, the node is the one it names (the manager ignores any other id)
    if (this.opts.tls && this.nodeId !== this.opts.tls.identity.nodeId) {
      this.nodeId = this.opts.tls.identity.nodeId;
      await this.saveNodeId();
    }
    let attempt = 0;
    let idx = 0;
    while (!signal.aborted) {
      const addr = this.managers[idx % this.managers.length]!;
      const client = new DispatcherClient(addr, this.opts.tls ? clientCredentials(this.opts.tls) : grpc.credentials.createInsecure(), {
        ...(this.opts.tls ? TLS_CHANNEL_OPTIONS : {}),
        'grpc.max_receive_message_length': 64 * 1024 * 1024,
        'grpc.max_send_message_length': 64 * 1024 * 1024,
        'grpc.initial_reconnect_backoff_ms': 100,
        'grpc.max_reconnect_backoff_ms': 1000,
      });
      let upSince = 0;
      let periodMs = 0;
      try {
        const reg = await this.register(client, addr, signal);
        upSince = Date.now();
        periodMs = reg.heartbeatPeriodMs;
        await this.connected(client, addr, reg, signal);
      } catch (err) {
        if (err instanceof FlotillaError && (err.code === 'PERMISSION_DENIED' || err.code === 'INVALID_ARGUMENT')) throw err;
        if (!signal.aborted) this.log.warn({ manager: addr, err: grpcMessage(err) }, 'dispatcher session failed; reconnecting');
      } finally {
        this.isConnected = false;
        client.close();
      }
      if (signal.aborted) break;
      // a session that lived at least a heartbeat period resets the backoff
      if (upSince && Date.now() - upSince >= Math.max(1000, periodMs)) attempt = 0;
      // the next manager after the one that failed (the list may have changed meanwhile)
      const at = this.managers.indexOf(addr);
      idx = ((at >= 0 ? at : idx) + 1) % this.managers.length;
      await sleep(this.backoff(attempt++), signal);
    }
  }

  private async register(client: DispatcherClient, addr: string, signal: AbortSignal): Promise<RegisterResponse> {
    let reg: RegisterResponse;
    const held = (await this.opts.images?.().catch(() => undefined)) ?? { images: [], contentAddr: '' };
    try {
      reg = await unary(
        client.register.bind(client),
        { token: this.opts.token, nodeId: this.nodeId, description: this.opts.description, addr: this.opts.addr, images: held.images, contentAddr: held.contentAddr },
        this.opts.rpcTimeoutMs ?? 10_000,
        signal,
      );
    } catch (err) {
      const code = (err as GrpcError).code;
      if (code !== undefined && FATAL_REGISTER.has(code)) {
        const why = grpcMessage(err);
        throw new FlotillaError(
          code === grpc.status.INVALID_ARGUMENT ? 'INVALID_ARGUMENT' : 'PERMISSION_DENIED',
          code === grpc.status.INVALID_ARGUMENT
            ? `manager ${addr} refused the node's registration: ${why}`
            : this.opts.tls
              ? `manager ${addr} refused node ${this.nodeId}: ${why}`
              : `manager ${addr} refused the join token: ${why} (check --token or FLOTILLA_TOKEN)`,
        );
      }
      throw err;
    }
    if (reg.nodeId !== this.nodeId) {
      this.nodeId = reg.nodeId;
      await this.saveNodeId();
    }
    this.sessionId = reg.sessionId;
    this.registrations++;
    this.learnManagers(reg.managers, addr);
    this.log.info({ manager: addr, nodeId: reg.nodeId, heartbeatMs: reg.heartbeatPeriodMs }, 'registered with the dispatcher');
    this.opts.onRegistered?.({ ...reg, manager: addr });
    return reg;
  }

  /**
   * The managers to fail over to: the list the dispatcher sent (at registration and with every
   * heartbeat, so managers that joined later are known too), then the flag list; the current one is kept.
   */
  private learnManagers(fromManager: string[], current: string): void {
    const seen = new Set<string>();
    const next = [...fromManager, ...this.initial].filter((m) => m && !seen.has(m) && (seen.add(m), true));
    if (!next.includes(current)) next.unshift(current);
    if (next.join() !== this.managers.join()) this.log.info({ managers: next }, 'managers known for failover');
    this.managers = next;
  }

  /** One live session: resolves when signal aborts, rejects when any part of the session fails. */
  private async connected(client: DispatcherClient, addr: string, reg: RegisterResponse, signal: AbortSignal): Promise<void> {
    const ctl = new AbortController();
    const { nodeId, sessionId } = reg;
    let failure: unknown;
    const fail = (err: unknown): void => {
      if (ctl.signal.aborted) return;
      failure = err;
      ctl.abort();
    };
    const onOuterAbort = (): void => ctl.abort();
    signal.addEventListener('abort', onOuterAbort, { once: true });
    const ended = new Promise<void>((resolve) => ctl.signal.addEventListener('abort', () => resolve(), { once: true }));
    const timeout = this.opts.rpcTimeoutMs ?? 10_000;
    const worker = this.opts.worker;

    // assignments: applied in order by the worker
    const assignments = client.assignments({ nodeId, sessionId });
    assignments.on('data', (msg: AssignmentsMessage) => {
      worker.assign(msg).catch((err: unknown) => this.log.error({ err: errorMessage(err) }, 'applying assignments failed'));
    });
    assignments.on('error', (err: Error) => fail(err));
    assignments.on('end', () => fail(new FlotillaError('UNAVAILABLE', 'the assignments stream ended')));

    // logs: the manager asks, the agent answers
    const logs = client.logs();
    const logRequests = new Map<string, AbortController>();
    const logOps = new Set<Promise<void>>();
    logs.on('data', (req: LogRequest) => {
      if (req.cancel) {
        logRequests.get(req.requestId)?.abort();
        return;
      }
      const ac = new AbortController();
      logRequests.set(req.requestId, ac);
      const op = this.serveLogs(logs, req, ac.signal).finally(() => {
        logRequests.delete(req.requestId);
        logOps.delete(op);
      });
      logOps.add(op);
    });
    logs.on('error', (err: Error) => fail(err));
    logs.on('end', () => fail(new FlotillaError('UNAVAILABLE', 'the logs stream ended')));
    logs.write({ requestId: '', nodeId, sessionId, lines: [], done: false, error: '' });

    // task status: the worker's queue sends through this session while it lives
    worker.setSender(async (updates: TaskStatusUpdate[]) => {
      try {
        await unary(client.updateTaskStatus.bind(client), { nodeId, sessionId, updates }, timeout, ctl.signal);
      } catch (err) {
        const code = (err as GrpcError).code;
        if (code === grpc.status.NOT_FOUND || code === grpc.status.UNAVAILABLE) fail(err);
        throw err;
      }
    });
    this.isConnected = true;
    this.live = { client, nodeId, sessionId, signal: ctl.signal };

    // heartbeats at the period the manager sets
    const heartbeats = (async () => {
      let period = reg.heartbeatPeriodMs > 0 ? reg.heartbeatPeriodMs : 5000;
      while (!ctl.signal.aborted) {
        await sleep(period, ctl.signal);
        if (ctl.signal.aborted) break;
        try {
          const held = (await this.opts.images?.().catch((err: unknown) => {
            this.log.warn({ err: errorMessage(err) }, 'listing the node\'s images failed');
            return undefined;
          })) ?? { images: [], contentAddr: '' };
          const res = await unary(
            client.heartbeat.bind(client),
            { nodeId, sessionId, images: held.images, contentAddr: held.contentAddr },
            Math.max(1000, Math.min(timeout, period * 2)),
            ctl.signal,
          );
          this.heartbeats++;
          if (res.periodMs > 0) period = res.periodMs;
          if (res.managers.length > 0) this.learnManagers(res.managers, addr);
          if (res.trustBundlePem) this.opts.onTrustBundle?.(res.trustBundlePem);
        } catch (err) {
          fail(err);
        }
      }
    })();

    await ended;
    signal.removeEventListener('abort', onOuterAbort);
    this.isConnected = false;
    this.live = undefined;
    worker.setSender(undefined);
    for (const ac of logRequests.values()) ac.abort();
    assignments.cancel();
    logs.cancel();
    await heartbeats;
    await Promise.all([...logOps]);
    if (failure !== undefined && !signal.aborted) throw failure;
  }

  /** Asks the dispatcher which other nodes hold an image (UNAVAILABLE while disconnected). */
  async imageSources(ref: string, signal?: AbortSignal): Promise<ImageSource[]> {
    const live = this.live;
    if (!live) throw new FlotillaError('UNAVAILABLE', 'not connected to a manager');
    const sig = signal ? AbortSignal.any([signal, live.signal]) : live.signal;
    const res = await unary(live.client.imageSources.bind(live.client), { nodeId: live.nodeId, sessionId: live.sessionId, ref }, this.opts.rpcTimeoutMs ?? 10_000, sig);
    return res.sources;
  }

  /** Streams a task's logs to the manager in chunks; the last chunk has done (and error, if any). */
  private async serveLogs(stream: grpc.ClientDuplexStream<LogChunk, LogRequest>, req: LogRequest, signal: AbortSignal): Promise<void> {
    const write = (chunk: Partial<LogChunk>): void => {
      if (stream.writable && !stream.destroyed) stream.write(LogChunk.fromPartial({ requestId: req.requestId, ...chunk }));
    };
    const rt = this.opts.worker.runtime;
    let slot = 0;
    let buf: LogLine[] = [];
    let timer: NodeJS.Timeout | undefined;
    const flush = (): void => {
      if (timer) clearTimeout(timer);
      timer = undefined;
      if (buf.length === 0) return;
      write({ lines: buf });
      buf = [];
    };
    try {
      let container = req.containerId || this.opts.worker.containerOf(req.taskId) || '';
      if (!container || req.taskId) {
        const found = (await rt.list()).find((c) => (container ? c.id === container : c.labels[LABEL_TASK_ID] === req.taskId));
        if (found) {
          container = found.id;
          slot = Number(found.labels[LABEL_SLOT] ?? 0) || 0;
        } else if (!container) {
          throw new FlotillaError('NOT_FOUND', `no container for task ${req.taskId} on node ${this.opts.description.hostname}`);
        }
      }
      for await (const e of rt.logs(container, { follow: req.follow, tail: req.tail > 0 ? req.tail : undefined, signal })) {
        buf.push({ taskId: req.taskId, nodeId: this.nodeId, slot, stream: e.stream, timestamp: Math.floor(e.time), line: e.line });
        if (buf.length >= LOG_BATCH_LINES) flush();
        else timer ??= setTimeout(flush, LOG_FLUSH_MS);
        if (signal.aborted) break;
      }
      flush();
      write({ done: true });
    } catch (err) {
      flush();
      write({ done: true, error: signal.aborted ? '' : errorMessage(err) });
    } finally {
      if (timer) clearTimeout(timer);
    }
  }
}
