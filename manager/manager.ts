/**
 * The manager daemon: the store and its proposer, the gRPC server (control, dispatcher, raft), and
 * the leadership handler, the one place where leader-only components start and stop.
 */
import * as grpc from '@grpc/grpc-js';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { ControlService } from '../gen/flotilla/v1/control.js';
import { DispatcherService } from '../gen/flotilla/v1/dispatcher.js';
import { Cluster } from '../gen/flotilla/v1/objects.js';
import { FlotillaError } from '../common/errors.js';
import { newId } from '../common/ids.js';
import type { Logger } from '../common/log.js';
import { MemoryStore } from './store/store.js';
import { LocalProposer } from './store/local-proposer.js';
import { Dispatcher, DEFAULT_HEARTBEAT_MS } from './dispatcher/dispatcher.js';
import { ControlApi } from './controlapi/server.js';
import { ReplicatedOrchestrator } from './orchestrator/replicated.js';
import { GlobalOrchestrator } from './orchestrator/global.js';
import { TaskReaper } from './orchestrator/reaper.js';
import { Updater } from './orchestrator/update.js';
import { SchedulerLoop } from './scheduler/loop.js';
import { DEFAULT_TASK_HISTORY } from './orchestrator/tasks.js';
import { DEFAULT_SERVICE_HISTORY } from './controlapi/server.js';

export interface ManagerOptions {
  dataDir: string;
  hostname?: string;
  listenAddr: string;
  advertiseAddr?: string;
  /** unix socket path for the control API ("" to disable) */
  controlSocket: string;
  heartbeatMs?: number;
  log: Logger;
  signal: AbortSignal;
}

export function makeToken(kind: 'worker' | 'manager', clusterSecret: string): string {
  return `FLTTKN-1-${clusterSecret}-${kind === 'worker' ? 'w' : 'm'}${randomBytes(16).toString('hex')}`;
}

export class Manager {
  readonly store = new MemoryStore();
  readonly dispatcher: Dispatcher;
  readonly control: ControlApi;
  private proposer: LocalProposer | undefined;
  private readonly server = new grpc.Server({ 'grpc.max_receive_message_length': 64 * 1024 * 1024, 'grpc.max_send_message_length': 64 * 1024 * 1024 });
  private leaderCtl: AbortController | undefined;
  private leaderRuns: Promise<unknown> | undefined;
  boundAddr = '';

  constructor(readonly opts: ManagerOptions) {
    this.dispatcher = new Dispatcher(this.store, opts.log.child({ component: 'dispatcher' }), {
      managers: () => [this.advertiseAddr()],
      heartbeatMs: opts.heartbeatMs,
    });
    this.control = new ControlApi({
      store: this.store,
      dispatcher: this.dispatcher,
      leaderAddr: () => this.advertiseAddr(),
      readBarrier: async () => {},
    });
  }

  advertiseAddr(): string {
    return this.opts.advertiseAddr || this.boundAddr || this.opts.listenAddr;
  }

  async start(): Promise<void> {
    const dir = path.join(this.opts.dataDir, 'manager');
    this.proposer = LocalProposer.open(dir, this.store);
    this.store.setProposer(this.proposer);
    if (!this.store.getCluster()) await this.initCluster();
    this.server.addService(ControlService, this.control.server());
    this.server.addService(DispatcherService, this.dispatcher.server());
    const port = await bind(this.server, this.opts.listenAddr, grpc.ServerCredentials.createInsecure());
    const host = this.opts.listenAddr.slice(0, this.opts.listenAddr.lastIndexOf(':'));
    this.boundAddr = `${host === '0.0.0.0' || host === '' ? '127.0.0.1' : host}:${port}`;
    if (this.opts.controlSocket) {
      fs.mkdirSync(path.dirname(this.opts.controlSocket), { recursive: true, mode: 0o755 });
      fs.rmSync(this.opts.controlSocket, { force: true });
      await bind(this.server, `unix://${this.opts.controlSocket}`, grpc.ServerCredentials.createInsecure());
      fs.chmodSync(this.opts.controlSocket, 0o600);
    }
    // A single manager is always the leader.
    this.onLeadershipChange(true);
  }

  private async initCluster(): Promise<void> {
    const secret = randomBytes(12).toString('hex');
    const cluster: Cluster = {
      id: newId(),
      meta: undefined,
      spec: {
        name: 'default',
        heartbeatPeriodMs: this.opts.heartbeatMs ?? DEFAULT_HEARTBEAT_MS,
        taskHistoryLimit: DEFAULT_TASK_HISTORY,
        serviceHistoryLimit: DEFAULT_SERVICE_HISTORY,
      },
      tokens: { worker: makeToken('worker', secret), manager: makeToken('manager', secret) },
    };
    await this.store.update((tx) => tx.create('cluster', cluster));
    this.opts.log.info({ clusterId: cluster.id }, 'created a new cluster');
  }

  /** The leadership handler: the one place leader-only components start and stop. */
  onLeadershipChange(isLeader: boolean): void {
    if (isLeader && !this.leaderCtl) {
      const ctl = new AbortController();
      this.leaderCtl = ctl;
      const log = this.opts.log;
      const loops = [
        this.dispatcher.run(ctl.signal),
        new ReplicatedOrchestrator(this.store, log.child({ component: 'replicated' })).run(ctl.signal),
        new GlobalOrchestrator(this.store, log.child({ component: 'global' })).run(ctl.signal),
        new SchedulerLoop(this.store, log.child({ component: 'scheduler' })).run(ctl.signal),
        new TaskReaper(this.store, log.child({ component: 'reaper' })).run(ctl.signal),
        new Updater(this.store, log.child({ component: 'updater' })).run(ctl.signal),
      ];
      this.leaderRuns = Promise.allSettled(loops).then((results) => {
        for (const r of results) if (r.status === 'rejected') log.error({ err: String(r.reason) }, 'leader component failed');
      });
      log.info('became leader: orchestrators, scheduler and dispatcher started');
    } else if (!isLeader && this.leaderCtl) {
      this.leaderCtl.abort();
      this.leaderCtl = undefined;
      this.opts.log.info('lost leadership: leader components stopped');
    }
  }

  workerToken(): string {
    const t = this.store.getCluster()?.tokens?.worker;
    if (!t) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
    return t;
  }

  managerToken(): string {
    const t = this.store.getCluster()?.tokens?.manager;
    if (!t) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
    return t;
  }

  async stop(): Promise<void> {
    this.onLeadershipChange(false);
    await this.leaderRuns;
    await new Promise<void>((resolve) => this.server.tryShutdown(() => resolve()));
    this.server.forceShutdown();
    this.proposer?.close();
    if (this.opts.controlSocket) fs.rmSync(this.opts.controlSocket, { force: true });
  }
}

export function bind(server: grpc.Server, addr: string, creds: grpc.ServerCredentials): Promise<number> {
  return new Promise((resolve, reject) =>
    server.bindAsync(addr, creds, (err, port) => (err ? reject(new FlotillaError('UNAVAILABLE', `cannot listen on ${addr}: ${err.message}`)) : resolve(port))),
  );
}

export function defaultHostname(): string {
  return os.hostname();
}
