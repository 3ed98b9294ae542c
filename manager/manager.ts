/**
 * The manager daemon: the store and its proposer, the gRPC server (control, dispatcher, raft), and
 * the leadership handler, the one place where leader-only components start and stop.
 */
import { setMaxListeners } from 'node:events';
import * as grpc from '@grpc/grpc-js';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ControlClient, ControlService, type GetNodeResponse, type LogLine } from '../gen/flotilla/v1/control.js';
import { grpcError } from './grpc.js';
import { DispatcherService } from '../gen/flotilla/v1/dispatcher.js';
import { Cluster, ManagerStatus, Node, NodeAvailability, type NodeDescription, NodeRole, NodeState, StoreBatch, StoreSnapshot } from '../gen/flotilla/v1/objects.js';
import { FlotillaError, errorMessage } from '../common/errors.js';
import { newId } from '../common/ids.js';
import type { Logger } from '../common/log.js';
import { MemoryStore } from './store/store.js';
import { RaftNode } from './raft/node.js';
import { Dispatcher, DEFAULT_HEARTBEAT_MS, isAgentless } from './dispatcher/dispatcher.js';
import { ControlApi } from './controlapi/server.js';
import { ReplicatedOrchestrator } from './orchestrator/replicated.js';
import { GlobalOrchestrator } from './orchestrator/global.js';
import { JobOrchestrator } from './orchestrator/jobs.js';
import { TaskReaper } from './orchestrator/reaper.js';
import { Updater } from './orchestrator/update.js';
import { sleep } from '../common/sleep.js';
import { writeFileAtomicSync } from '../common/fsutil.js';
import { nodeDescription } from '../agent/agent.js';
import { Allocator } from './allocator/allocator.js';
import { SchedulerLoop } from './scheduler/loop.js';
import { DEFAULT_TASK_HISTORY } from './orchestrator/tasks.js';
import { DEFAULT_SERVICE_HISTORY } from './controlapi/server.js';
import { DataKeys, LockedKeys, newUnlockKey, openKeys, seal, unseal } from './keys/keys.js';
import { NodeCAService } from '../gen/flotilla/v1/ca.js';
import type { ClusterCA } from '../gen/flotilla/v1/ca.js';
import type { AuthzOptions } from './ca/authz.js';
import { ServerTrust, TLS_CHANNEL_OPTIONS, TlsSource, clientCredentials, serverCredentials } from './ca/credentials.js';
import { NODE_TLS_FILE, loadNodeTls, saveNodeTls } from './ca/certstore.js';
import { type JoinTokens, bootstrapCluster, caRotationStatus, certExpiryMs, finishCaRotation, rotateToken, signingCA, startCaRotation, trustBundle } from './ca/cluster.js';
import { joinCaFor } from './ca/join.js';
import { type CaBackend, joinCluster, nodeCaHandlers, renewCertificate, runRenewal } from './ca/service.js';
import { issuerNames, parseCertificate } from './ca/x509.js';
import { Wal } from './raft/wal.js';
import { EtcdBackend } from './etcd/backend.js';
import { type EtcdMode, checkStoreKind, loadStoreKey, saveStoreKey } from './etcd/mode.js';

export interface ManagerOptions {
  dataDir: string;
  hostname?: string;
  listenAddr: string;
  advertiseAddr?: string;
  /** unix socket path for the control API ("" to disable) */
  controlSocket: string;
  heartbeatMs?: number;
  /** a new cluster's default address pool for overlay subnets (CIDR) and their prefix length */
  defaultAddrPool?: string;
  defaultAddrPoolMaskLength?: number;
  /** join an existing cluster through this manager (HOST:PORT), with the manager join token */
  join?: string;
  token?: string;
  /** restart a lone survivor as a new one-manager cluster with all its state */
  forceNewCluster?: boolean;
  /**
   * register this manager's node itself (set when no agent runs in this process): every manager is
   * a node, shown by `node ls` with its manager status; such a node runs no tasks (drained, no runtime)
   */
  registerNode?: boolean;
  /** raft tick (default 100 ms: elections after 1-2 s) */
  raftTickMs?: number;
  /** a brand-new cluster starts with autolock on (docs/security.md) */
  autolock?: boolean;
  /** called when this manager finds itself locked (autolock) and waits for `flotilla cluster unlock` */
  onLocked?: () => void;
  /** node certificate lifetime for a new cluster (--cert-expiry; default 90 days) */
  certExpiryMs?: number;
  /** --store etcd: the store on an etcd cluster instead of our Raft (docs/store.md) */
  etcd?: EtcdMode;
  log: Logger;
  signal: AbortSignal;
}

/** A new cluster's CA and tokens, kept on the first manager's disk until the Cluster object exists. */
interface PendingBootstrap {
  clusterId: string;
  ca: ClusterCA;
  tokens: JoinTokens;
}
const BOOTSTRAP_FILE = path.join('certificates', 'bootstrap.json');
/** additional authenticated data of the sealed bootstrap file (a sealed blob cannot be swapped for another kind) */
const BOOTSTRAP_AAD = Buffer.from('flotilla bootstrap v1');

export class Manager {
  readonly store = new MemoryStore();
  readonly dispatcher: Dispatcher;
  readonly control: ControlApi;
  raft: RaftNode | undefined;
  /** --store etcd: the store's proposer, membership and leadership (instead of raft) */
  etcd: EtcdBackend | undefined;
  /** --store etcd: the key that seals values before they reach etcd */
  private storeKey: Buffer | undefined;
  /**
   * this manager's data key (manager/keys), set by start() once unlocked: it seals the Raft WAL and
   * snapshots, and is the `dek` to give saveNodeTls/loadNodeTls
   */
  keys: DataKeys | undefined;
  private keysTimer: NodeJS.Timeout | undefined;
  private removed = false;
  /** set while a promoted manager rejoins, until its node is marked a manager again */
  private promoting = false;
  private readonly server = new grpc.Server({ 'grpc.max_receive_message_length': 64 * 1024 * 1024, 'grpc.max_send_message_length': 64 * 1024 * 1024 });
  /** the local admin path (the 0600 unix socket): its own server, plain handlers, no TLS */
  private readonly unixServer = new grpc.Server({ 'grpc.max_receive_message_length': 64 * 1024 * 1024, 'grpc.max_send_message_length': 64 * 1024 * 1024 });
  /** this manager's certificate, key and trust bundle (renewed in place) */
  tls: TlsSource | undefined;
  private serverTrust: ServerTrust | undefined;
  private bootstrap: PendingBootstrap | undefined;
  private joinIssuers: ReadonlyMap<string, 'worker' | 'manager'> = new Map();
  private joinKey = '';
  private issuerCache: { pem: string; names: string[] } = { pem: '', names: [] };
  /** how every TLS service of this manager authorizes callers */
  readonly authz: AuthzOptions = {
    clusterId: () => this.requireTls().identity.clusterId,
    trustedIssuers: () => {
      const pem = this.requireTls().current.trustPem;
      if (this.issuerCache.pem !== pem) this.issuerCache = { pem, names: issuerNames(pem) };
      return this.issuerCache.names;
    },
    joinIssuers: () => this.joinIssuers,
    // a node's sessions opened before a CA rotation ended survive it once the node holds a
    // certificate from a trusted root (no re-registration, no node marked down)
    renewedSince: (id) => {
      if (id.role === 'admin') return false;
      const issuer = this.store.getNode(id.nodeId)?.certificateIssuer;
      return !!issuer && this.authz.trustedIssuers!().includes(issuer);
    },
    // sessions survive renewal: a connection opened with the previous certificate stays usable
    allowExpiredOnOpenConnections: true,
    // `node rm` revokes: a node certificate whose node is gone from the store no longer gets in
    revocations: { isRevoked: (id) => id.role !== 'admin' && !!this.store.getCluster() && !this.store.getNode(id.nodeId) },
  };
  private leaderCtl: AbortController | undefined;
  private leaderRuns: Promise<unknown> | undefined;
  private failure: Error | undefined;
  private onFailure: ((err: Error) => void) | undefined;
  /**
   * Resolves with the error once the manager cannot go on (a fatal Raft or storage error, e.g. the
   * WAL hit ENOSPC): its Raft member has stopped; the owner must stop the manager and exit non-zero
   * so that a supervisor restarts it and its agents fail over to another manager.
   */
  readonly failed: Promise<Error> = new Promise((resolve) => (this.onFailure = resolve));
  boundAddr = '';

  constructor(readonly opts: ManagerOptions) {
    this.dispatcher = new Dispatcher(this.store, opts.log.child({ component: 'dispatcher' }), {
      managers: () => (this.etcd ?? this.raft)?.members().filter((m) => !m.learner).map((m) => m.addr) ?? [this.advertiseAddr()],
      heartbeatMs: opts.heartbeatMs,
      trustBundle: () => {
        const ca = this.store.getCluster()?.ca;
        return ca ? trustBundle(ca) : '';
      },
    });
    this.control = new ControlApi({
      store: this.store,
      dispatcher: this.dispatcher,
      leaderAddr: () => (this.etcd ?? this.raft)?.leaderAddr() ?? '',
      readBarrier: async () => {
        if (this.removed) throw new FlotillaError('UNAVAILABLE', 'this manager was removed from the cluster; ask another manager');
        const cons = this.etcd ?? this.raft;
        if (!cons) throw new FlotillaError('UNAVAILABLE', 'the manager is starting');
        await cons.readIndex();
      },
      storeKind: () => (this.opts.etcd ? `etcd ${this.opts.etcd.endpoints.join(',')} ${this.opts.etcd.prefix}` : 'raft'),
      managerStatus: (n) => this.managerStatus(n),
      selfNodeId: () => {
        try {
          return this.requireTls().identity.nodeId;
        } catch {
          return '';
        }
      },
      managers: () =>
        ((this.etcd ?? this.raft)?.members() ?? [])
          .filter((m) => !m.learner)
          .map((m) => ({ raftId: m.raftId, addr: m.addr, leader: m.leader, reachability: m.reachable || m.leader ? 'reachable' : 'unreachable' })),
      removeManager: (n, force) => this.removeManager(n, force),
      issueClientCertificate: async (expiryMs) => {
        const ca = this.clusterCA();
        const pair = await (await signingCA(ca)).issueWithNewKey({ nodeId: `admin-${newId()}`, role: 'admin', expiryMs: expiryMs || certExpiryMs(ca) });
        return { caPem: trustBundle(ca), certPem: pair.certPem, keyPem: pair.keyPem };
      },
      relayLogs: (call) => {
        const leader = (this.etcd ?? this.raft)?.leaderAddr();
        if (!leader) return void call.emit('error', grpcError(new FlotillaError('UNAVAILABLE', 'no leader to serve the logs')));
        const client = new ControlClient(leader, clientCredentials(this.requireTls()), TLS_CHANNEL_OPTIONS);
        const up = client.serviceLogs(call.request);
        call.on('cancelled', () => up.cancel());
        up.on('data', (line: LogLine) => call.write(line));
        up.on('error', (err: grpc.ServiceError) => {
          client.close();
          if (err.code !== grpc.status.CANCELLED) call.emit('error', err);
        });
        up.on('end', () => {
          client.close();
          call.end();
        });
      },
      rotateJoinToken: async (role) => {
        let token = '';
        await this.store.update((tx) => {
          const c = this.store.getCluster();
          if (!c?.ca || !c.tokens) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
          const cur = tx.get('cluster', c.id);
          if (!cur?.ca || !cur.tokens) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
          const tokens = rotateToken(cur.ca, cur.tokens, role);
          token = tokens[role];
          tx.update('cluster', { ...cur, tokens });
        });
        await this.refreshJoinCas();
        this.opts.log.info({ role }, 'join token rotated');
        return token;
      },
      rotateRootCa: async (start) => {
        if (start) {
          const c = this.store.getCluster();
          if (!c?.ca || !c.tokens) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
          if (c.ca.previousRootCertPem) throw new FlotillaError('FAILED_PRECONDITION', 'a CA rotation is already in progress');
          const next = await startCaRotation(c.ca, c.tokens, c.id);
          await this.store.update((tx) => {
            const cur = tx.get('cluster', c.id);
            if (!cur?.ca || cur.ca.rootCertPem !== c.ca?.rootCertPem) throw new FlotillaError('FAILED_PRECONDITION', 'a CA rotation is already in progress');
            tx.update('cluster', { ...cur, ca: next.ca, tokens: next.tokens });
          });
          await this.refreshJoinCas();
          this.opts.log.info({ root: issuerNames(next.ca.rootCertPem)[0] }, 'CA rotation started: nodes trust both roots and renew from the new one');
        }
        return caRotationStatus(this.clusterCA(), this.store.listNodes());
      },
    });
  }

  private requireTls(): TlsSource {
    if (!this.tls) throw new FlotillaError('UNAVAILABLE', 'the manager is starting');
    return this.tls;
  }

  private requireKeys(): DataKeys {
    if (!this.keys) throw new FlotillaError('UNAVAILABLE', 'the manager is starting (its data key is not open yet)');
    return this.keys;
  }

  private clusterCA(): ClusterCA {
    const ca = this.store.getCluster()?.ca;
    if (!ca) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
    return ca;
  }

  /**
   * This manager's certificate: saved from before, or a new cluster's CA (first start of the first
   * manager), or a certificate from the cluster it joins. A data dir from before mutual TLS (raft
   * state, no certificate) is refused with one line.
   */
  private async prepareTls(): Promise<TlsSource> {
    const dir = this.opts.dataDir;
    // the node key is sealed with this manager's data key (docs/security.md, encryption at rest)
    const dek = this.requireKeys().dek;
    const existing = loadNodeTls(dir, { dek });
    if (!existing && Wal.exists(path.join(dir, 'raft'))) {
      throw new FlotillaError(
        'FAILED_PRECONDITION',
        `${dir} holds a cluster created by a flotilla without mutual TLS (raft state but no ${NODE_TLS_FILE}); it cannot be upgraded in place: move ${dir} aside and create the cluster again (or --join this manager afresh)`,
      );
    }
    const bootFile = path.join(dir, BOOTSTRAP_FILE);
    if (existing) {
      if (fs.existsSync(bootFile)) this.bootstrap = JSON.parse(unseal(dek, fs.readFileSync(bootFile), BOOTSTRAP_AAD).toString('utf8')) as PendingBootstrap;
      return new TlsSource(existing);
    }
    const host = (this.opts.advertiseAddr || this.opts.listenAddr).replace(/:\d+$/, '');
    const addresses = host && host !== '0.0.0.0' ? [host] : [];
    if (this.opts.join) {
      const res = await joinCluster(this.opts.join, this.opts.token ?? '', { addresses });
      if (res.role !== 'manager') {
        throw new FlotillaError('PERMISSION_DENIED', 'the join token is a worker token: a manager joins with the manager token (flotilla cluster join-token manager -q)');
      }
      if (this.opts.etcd) {
        if (!res.storeKey?.length) throw new FlotillaError('FAILED_PRECONDITION', `the cluster of ${this.opts.join} does not use an etcd store: join it without --store etcd`);
        saveStoreKey(dir, dek, res.storeKey);
      }
      const { storeKey: _sk, ...material } = res;
      await saveNodeTls(dir, material, { dek });
      this.opts.log.info({ nodeId: res.nodeId }, 'joined: received this manager\'s certificate');
      return new TlsSource(res);
    }
    const clusterId = newId();
    const b = await bootstrapCluster({ clusterId, nodeId: newId(), addresses, certExpiryMs: this.opts.certExpiryMs });
    this.bootstrap = { clusterId, ca: b.ca, tokens: b.tokens };
    fs.mkdirSync(path.dirname(bootFile), { recursive: true, mode: 0o700 });
    // the pending CA key and tokens, until the first leader writes them into the (encrypted) store: sealed too
    writeFileAtomicSync(bootFile, seal(dek, Buffer.from(JSON.stringify(this.bootstrap)), BOOTSTRAP_AAD), { mode: 0o600 });
    await saveNodeTls(dir, b.node, { dek });
    this.opts.log.info({ clusterId }, 'created the cluster root CA and this manager\'s certificate');
    return new TlsSource(b.node);
  }

  /** The join CAs of the current tokens are what the TLS listener accepts joiners from. */
  private async refreshJoinCas(): Promise<void> {
    const tokens = this.store.getCluster()?.tokens ?? this.bootstrap?.tokens;
    if (!tokens?.worker || !tokens.manager) return;
    const key = `${tokens.worker}\n${tokens.manager}`;
    if (key === this.joinKey) return;
    this.joinKey = key;
    const [w, m] = await Promise.all([joinCaFor(tokens.worker), joinCaFor(tokens.manager)]);
    if (this.joinKey !== key) return; // a newer rotation won
    this.joinIssuers = new Map([
      [w.issuer, 'worker'],
      [m.issuer, 'manager'],
    ]);
    this.serverTrust?.setExtra(w.certPem + m.certPem);
  }

  /** NodeCA on the store: the CA key and tokens are replicated, so any manager can sign. */
  private caBackend(): CaBackend {
    return {
      signingCA: () => signingCA(this.clusterCA()),
      trustBundle: () => trustBundle(this.clusterCA()),
      joinTokens: () => {
        const t = this.store.getCluster()?.tokens;
        if (!t) throw new FlotillaError('UNAVAILABLE', 'cluster not initialised');
        return t;
      },
      certExpiryMs: () => certExpiryMs(this.clusterCA()),
      admitNode: async (role, addresses) => {
        // the node exists from its join on (the revocation check: a node not in the store is refused)
        const id = newId();
        const r = role === 'manager' ? NodeRole.NODE_ROLE_MANAGER : NodeRole.NODE_ROLE_WORKER;
        await this.store.update((tx) =>
          tx.create('node', {
            id,
            meta: undefined,
            spec: { labels: {}, desiredRole: r, availability: NodeAvailability.NODE_AVAILABILITY_ACTIVE },
            description: undefined,
            status: { state: NodeState.NODE_STATE_UNKNOWN, message: 'joined: waiting for its agent to register', addr: addresses[0] ?? '', lastHeartbeat: 0 },
            managerStatus: undefined,
            role: r,
            certificateExpiryMs: 0,
            certificateIssuer: '',
          }),
        );
        return id;
      },
      storeKey: () => this.storeKey,
      nodeRole: (nodeId) => {
        const n = this.store.getNode(nodeId);
        if (!n) return undefined;
        return n.role === NodeRole.NODE_ROLE_MANAGER ? 'manager' : 'worker';
      },
      onIssued: (nodeId, certPem) => {
        const { notAfter: na, issuer } = parseCertificate(certPem);
        const notAfter = na.getTime();
        this.store
          .update((tx) => {
            const n = tx.get('node', nodeId);
            if (n && (n.certificateExpiryMs !== notAfter || n.certificateIssuer !== issuer)) tx.update('node', { ...n, certificateExpiryMs: notAfter, certificateIssuer: issuer });
          })
          .catch((err: unknown) => this.opts.log.warn({ err: errorMessage(err), nodeId }, 'recording a certificate expiry failed'));
      },
    };
  }

  /**
   * Leader only: ends a CA rotation (drops the old root from the trust bundle) once every node in
   * the store holds a certificate from the new root.
   */
  private async caRotationLoop(signal: AbortSignal, log: Logger): Promise<void> {
    while (!signal.aborted) {
      await sleep(500, signal);
      if (signal.aborted) return;
      const c = this.store.getCluster();
      if (!c?.ca?.previousRootCertPem) continue;
      const st = caRotationStatus(c.ca, this.store.listNodes());
      if (st.pendingNodes.length > 0) continue;
      try {
        await this.store.update((tx) => {
          const cur = tx.get('cluster', c.id);
          if (!cur?.ca || cur.ca.rootCertPem !== c.ca?.rootCertPem) return;
          tx.update('cluster', { ...cur, ca: finishCaRotation(cur.ca) });
        }, signal);
        log.info({ root: st.root, nodes: st.nodes }, 'CA rotation finished: every node holds a certificate from the new root; the old root is no longer trusted');
      } catch (err) {
        log.warn({ err: errorMessage(err) }, 'finishing the CA rotation failed; retrying');
      }
    }
  }

  /**
   * Every manager: its trust follows the cluster's trust bundle. When the bundle changes (a CA
   * rotation started or finished), it renews at once through its own NodeCA: the answer carries a
   * certificate from the signing root and the new bundle.
   */
  private async followTrustLoop(): Promise<void> {
    const signal = this.opts.signal;
    const tls = this.requireTls();
    while (!signal.aborted) {
      await sleep(300, signal);
      if (signal.aborted) return;
      const ca = this.store.getCluster()?.ca;
      if (!ca || trustBundle(ca) === tls.current.trustPem) continue;
      try {
        // trust the new bundle at once (peers that renewed first present new-root certificates)
        try {
          tls.update({ trustPem: trustBundle(ca) });
        } catch {
          // this manager's certificate is not from a root in the bundle: the renewal fixes both
        }
        const res = await renewCertificate(this.advertiseAddr(), tls);
        await saveNodeTls(this.opts.dataDir, res, { dek: this.requireKeys().dek });
        this.opts.log.info({ issuer: tls.identity.issuer, roots: issuerNames(tls.current.trustPem) }, 'the cluster trust bundle changed: renewed this manager\'s certificate');
      } catch (err) {
        this.opts.log.warn({ err: errorMessage(err) }, 'renewing onto the new trust bundle failed; retrying');
        await sleep(1000, signal);
      }
    }
  }

  /** Renews this manager's certificate through its own NodeCA, before it expires. */
  private async renewLoop(): Promise<void> {
    const tls = this.requireTls();
    await runRenewal(
      tls,
      async () => {
        const res = await renewCertificate(this.advertiseAddr(), tls);
        await saveNodeTls(this.opts.dataDir, res, { dek: this.requireKeys().dek });
        this.opts.log.info({ notAfter: tls.identity.notAfter.toISOString() }, 'renewed this manager\'s certificate');
      },
      this.opts.signal,
      { retryMs: 5000, onError: (err) => this.opts.log.warn({ err: errorMessage(err) }, 'certificate renewal failed; retrying') },
    );
  }

  advertiseAddr(): string {
    return this.opts.advertiseAddr || this.boundAddr || this.opts.listenAddr;
  }

  /** Starts the manager; on failure nothing stays listening. */
  async start(): Promise<void> {
    try {
      const keys = openKeys(this.opts.dataDir);
      this.keys = keys instanceof LockedKeys ? await this.waitForUnlock(keys) : keys;
      await this.startInner();
    } catch (err) {
      this.onLeadershipChange(false);
      await this.raft?.stop().catch(() => {});
      await this.etcd?.stop().catch(() => {});
      this.server.forceShutdown();
      this.unixServer.forceShutdown();
      if (this.opts.controlSocket) fs.rmSync(this.opts.controlSocket, { force: true });
      throw err;
    }
  }

  /**
   * Autolock: the data key is sealed under the cluster's unlock key, which only the (encrypted)
   * store knows. Until `flotilla cluster unlock` gives the key, this manager serves only the
   * control socket, where every call but UnlockManager answers FAILED_PRECONDITION "locked"; it
   * does not listen on its TCP address (no Raft, no agents) meanwhile.
   */
  private async waitForUnlock(locked: LockedKeys): Promise<DataKeys> {
    const sock = this.opts.controlSocket;
    if (!sock) throw new FlotillaError('FAILED_PRECONDITION', 'this manager is locked (autolock) and has no control socket to unlock it on: start it with --control-socket');
    const signal = this.opts.signal;
    const server = new grpc.Server();
    const lockedErr = grpcError(
      new FlotillaError('FAILED_PRECONDITION', 'this manager is locked (autolock): run `flotilla cluster unlock` on its host and enter the unlock key'),
    );
    let done: (k: DataKeys) => void = () => {};
    const unlocked = new Promise<DataKeys>((resolve) => (done = resolve));
    const handlers: Record<string, grpc.UntypedHandleCall> = {};
    for (const [name, def] of Object.entries(ControlService)) {
      handlers[name] = def.responseStream
        ? (call: grpc.ServerWritableStream<unknown, unknown>) => call.emit('error', lockedErr)
        : (_call: unknown, cb: grpc.sendUnaryData<unknown>) => cb(lockedErr);
    }
    handlers.unlockManager = (call: grpc.ServerUnaryCall<{ unlockKey: string }, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      try {
        const keys = locked.unlock(call.request.unlockKey);
        cb(null, {});
        this.opts.log.info('unlocked: starting');
        done(keys);
      } catch (err) {
        this.opts.log.warn({ err: errorMessage(err) }, 'unlock refused');
        cb(grpcError(err));
      }
    };
    server.addService(ControlService, handlers as unknown as grpc.UntypedServiceImplementation);
    fs.mkdirSync(path.dirname(sock), { recursive: true, mode: 0o755 });
    fs.rmSync(sock, { force: true });
    await bind(server, `unix://${sock}`, grpc.ServerCredentials.createInsecure());
    fs.chmodSync(sock, 0o600);
    this.opts.log.warn({ controlSocket: sock }, 'this manager is locked (autolock): waiting for `flotilla cluster unlock`');
    this.opts.onLocked?.();
    let onAbort = (): void => {};
    try {
      return await Promise.race([
        unlocked,
        new Promise<never>((_, reject) => {
          onAbort = () => reject(new FlotillaError('UNAVAILABLE', 'stopped while locked'));
          if (signal.aborted) onAbort();
          else signal.addEventListener('abort', onAbort, { once: true });
        }),
      ]);
    } finally {
      signal.removeEventListener('abort', onAbort);
      // let the UnlockManager answer go out before the socket closes
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, 2000);
        server.tryShutdown(() => {
          clearTimeout(t);
          resolve();
        });
      });
      fs.rmSync(sock, { force: true });
    }
  }

  /**
   * Keeps keys.json in line with the cluster's autolock setting and unlock key (a change re-seals
   * the data key). Checked on every apply (cheap), done a moment later (once replay settles), and on
   * stop.
   */
  private watchKeys(): void {
    if (this.keysTimer || !this.keys) return;
    const c = this.store.getCluster();
    if (!c) return;
    if (this.keys.wrappedUnder(c.spec?.autolock ? c.unlockKey : '')) return;
    this.keysTimer = setTimeout(() => {
      this.keysTimer = undefined;
      this.followKeys();
    }, 100);
  }

  private followKeys(): void {
    const c = this.store.getCluster();
    if (!c || !this.keys) return;
    const autolock = !!c.spec?.autolock;
    try {
      if (this.keys.follow(autolock ? c.unlockKey : '')) {
        this.opts.log.info({ autolock }, autolock ? 'data key re-encrypted under the cluster unlock key (autolock)' : 'data key re-encrypted under a stored key (autolock off)');
      }
    } catch (err) {
      this.opts.log.error({ err: errorMessage(err) }, 'cannot re-encrypt the data key');
    }
  }

  private async startInner(): Promise<void> {
    checkStoreKind(this.opts.dataDir, this.opts.etcd?.prefix);
    const tls = await this.prepareTls();
    this.tls = tls;
    this.serverTrust = new ServerTrust(tls);
    this.store.subscribe(() => void this.refreshJoinCas().catch((err: unknown) => this.opts.log.error({ err: errorMessage(err) }, 'loading the join CAs failed')));
    await this.refreshJoinCas();
    // TCP: mutual TLS, client certificates required (a joining node presents a join certificate)
    this.server.addService(ControlService, this.control.server(this.authz));
    this.server.addService(DispatcherService, this.dispatcher.server(this.authz));
    this.server.addService(NodeCAService, nodeCaHandlers(this.caBackend(), this.authz));
    const port = await bind(this.server, this.opts.listenAddr, serverCredentials(tls, 'require', this.serverTrust));
    const host = this.opts.listenAddr.slice(0, this.opts.listenAddr.lastIndexOf(':'));
    this.boundAddr = `${host === '0.0.0.0' || host === '' ? '127.0.0.1' : host}:${port}`;
    const raft = this.opts.etcd ? undefined : await this.openRaft(this.opts.join, this.opts.forceNewCluster);
    if (this.opts.etcd) await this.openEtcd(this.opts.etcd);
    if (this.opts.controlSocket) {
      // its own server with the plain handlers: inside one server a plain-text call could not be
      // told apart from a TLS call whose certificate failed
      this.unixServer.addService(ControlService, this.control.server());
      fs.mkdirSync(path.dirname(this.opts.controlSocket), { recursive: true, mode: 0o755 });
      fs.rmSync(this.opts.controlSocket, { force: true });
      await bind(this.unixServer, `unix://${this.opts.controlSocket}`, grpc.ServerCredentials.createInsecure());
      fs.chmodSync(this.opts.controlSocket, 0o600);
    }
    if (raft) await this.raftStarted(raft);
    // joining: wait until the cluster object has arrived through the log
    const t0 = Date.now();
    while (!this.store.getCluster() && Date.now() - t0 < 30_000 && !this.opts.signal.aborted) await sleep(50, this.opts.signal);
    if (!this.store.getCluster()) throw new FlotillaError('UNAVAILABLE', 'the cluster state did not arrive within 30 s');
    if ((this.etcd ?? raft)?.isLeader()) this.onLeadershipChange(true);
    if (this.opts.registerNode) {
      this.registerOwnNode().catch((err: unknown) => this.opts.log.error({ err: errorMessage(err) }, 'registering this manager as a node failed'));
    }
    if (raft) this.watchMembership().catch((err: unknown) => this.opts.log.error({ err: (err as Error).message }, 'membership watch failed'));
    this.renewLoop().catch((err: unknown) => this.opts.log.error({ err: errorMessage(err) }, 'certificate renewal loop failed'));
    this.followTrustLoop().catch((err: unknown) => this.opts.log.error({ err: errorMessage(err) }, 'trust bundle loop failed'));
  }

  /**
   * --store etcd: the store key (this manager's, or a new cluster's), the prefix's kind checked or
   * claimed, the store listed and watched, and a new cluster's object created.
   */
  private async openEtcd(mode: EtcdMode): Promise<void> {
    const dek = this.requireKeys().dek;
    const tls = this.requireTls();
    let key = loadStoreKey(this.opts.dataDir, dek);
    const backend = new EtcdBackend(this.store, mode, key ?? Buffer.alloc(32), { nodeId: tls.identity.nodeId, addr: this.advertiseAddr() }, this.opts.log.child({ component: 'etcd' }));
    this.etcd = backend;
    let found;
    try {
      found = await EtcdBackend.inspect(backend.client, mode.prefix, key);
    } catch (err) {
      throw new FlotillaError('UNAVAILABLE', `etcd at ${mode.endpoints.join(',')}: ${errorMessage(err)}`, { cause: err });
    }
    if (!found) {
      if (this.opts.join || !this.bootstrap) {
        throw new FlotillaError('FAILED_PRECONDITION', `the etcd prefix ${mode.prefix} holds no flotilla cluster (wrong --etcd-prefix or --etcd-endpoints?)`);
      }
      key = EtcdBackend.newSealKey();
      saveStoreKey(this.opts.dataDir, dek, key);
      if (!(await EtcdBackend.claim(backend.client, mode.prefix, key))) throw new FlotillaError('FAILED_PRECONDITION', `another manager created a cluster in the etcd prefix ${mode.prefix} at the same time: join it with --join`);
      await backend.stop();
      this.etcd = new EtcdBackend(this.store, mode, key, { nodeId: tls.identity.nodeId, addr: this.advertiseAddr() }, this.opts.log.child({ component: 'etcd' }));
    } else if (!key) {
      throw new FlotillaError('FAILED_PRECONDITION', `the etcd prefix ${mode.prefix} already holds a flotilla cluster: join it (--join HOST:PORT of one of its managers, with the manager token), or pick another --etcd-prefix`);
    } else if (!found.keyOk) {
      throw new FlotillaError('FAILED_PRECONDITION', `the etcd prefix ${mode.prefix} holds another flotilla cluster (this manager's store key does not open it): pick the right --etcd-prefix`);
    }
    this.storeKey = key;
    const etcd = this.etcd;
    this.store.setProposer(etcd);
    etcd.onLeadershipChange((leader) => this.onLeadershipChange(leader));
    await etcd.start();
    const cluster = this.store.getCluster();
    if (cluster && cluster.id !== tls.identity.clusterId) {
      throw new FlotillaError('FAILED_PRECONDITION', `the etcd prefix ${mode.prefix} holds cluster ${cluster.id}, not this manager's cluster ${tls.identity.clusterId}`);
    }
    if (!cluster && !this.opts.join) await this.initCluster();
  }

  /** Raft: waits for a leader, and a brand-new cluster's first leader creates the cluster object. */
  private async raftStarted(raft: RaftNode): Promise<void> {
    try {
      await raft.waitForLeader(this.opts.signal, 30_000);
    } catch (err) {
      if (this.opts.signal.aborted) throw err;
      // most often quorum loss: say who is missing and the way back
      const voters = raft.members().filter((m) => !m.learner);
      const up = voters.filter((m) => m.reachable);
      const quorum = Math.floor(voters.length / 2) + 1;
      const missing = voters.filter((m) => !m.reachable).map((m) => m.addr || String(m.raftId));
      throw new FlotillaError(
        'UNAVAILABLE',
        voters.length > 1 && up.length < quorum
          ? `no raft leader after 30 s: ${up.length} of ${voters.length} managers reachable, a quorum needs ${quorum} (unreachable: ${missing.join(', ')}); ` +
              'start the missing managers, or if they are gone for good restart this one with --force-new-cluster (it keeps the state and becomes a one-manager cluster)'
          : `no raft leader after 30 s (${voters.length} voting manager${voters.length === 1 ? '' : 's'}, ${up.length} reachable)`,
        { cause: err },
      );
    }
    // a brand-new cluster: its first leader creates the cluster object
    if (!this.opts.join) {
      await raft.readIndex(this.opts.signal);
      if (!this.store.getCluster() && raft.isLeader()) await this.initCluster();
    }
  }

  /**
   * A manager without an agent registers its own node (as an agent would, with the same node id file
   * <dataDir>/agent/node.json, so an agent started here later takes the node over). A new node is
   * drained: it has no runtime and runs no tasks. Retries until it is written or the manager stops.
   */
  private async registerOwnNode(): Promise<void> {
    const signal = this.opts.signal;
    const file = path.join(this.opts.dataDir, 'agent', 'node.json');
    // the node is the one this manager's certificate names
    let nodeId = this.requireTls().identity.nodeId;
    const expiry = this.requireTls().identity.notAfter.getTime();
    const issuer = this.requireTls().identity.issuer;
    const addr = this.advertiseAddr();
    const description: NodeDescription = {
      ...nodeDescription({ hostname: this.opts.hostname ?? defaultHostname(), managerAddr: addr }, 'runc'),
      // no agent: no runtime
      runtime: '',
    };
    // the id is saved first and used for every attempt: a proposal that timed out (or a crash) may
    // still have committed the node, and a second one must not appear
    if (!nodeId) {
      nodeId = newId();
      fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
      writeFileAtomicSync(file, JSON.stringify({ nodeId }) + '\n');
    }
    const id = nodeId;
    for (let attempt = 0; !signal.aborted && !this.failure; attempt++) {
      try {
        await this.store.update((tx) => {
          const status = { state: NodeState.NODE_STATE_READY, message: '', addr, lastHeartbeat: Date.now() };
          const n = tx.get('node', id);
          if (n) {
            // it may have run an agent before: without one it can run no tasks, so they move away
            const spec = n.spec ? { ...n.spec, availability: NodeAvailability.NODE_AVAILABILITY_DRAIN } : n.spec;
            tx.update('node', { ...n, spec, description, status, certificateExpiryMs: expiry, certificateIssuer: issuer });
            return;
          }
          tx.create('node', {
            id,
            meta: undefined,
            spec: { labels: {}, desiredRole: NodeRole.NODE_ROLE_MANAGER, availability: NodeAvailability.NODE_AVAILABILITY_DRAIN },
            description,
            status,
            managerStatus: undefined,
            role: NodeRole.NODE_ROLE_MANAGER,
            certificateExpiryMs: expiry,
            certificateIssuer: issuer,
          });
        }, signal);
        this.opts.log.info({ nodeId: id, hostname: description.hostname }, 'this manager is registered as a node (no agent: it runs no tasks)');
        return;
      } catch (err) {
        if (signal.aborted) return;
        if (attempt % 10 === 0) this.opts.log.info({ err: errorMessage(err) }, 'registering this manager as a node: retrying');
        await sleep(500, signal);
      }
    }
  }

  /**
   * Leader only: the status of agentless manager nodes follows their Raft reachability (they have
   * no agent session, so the dispatcher's heartbeat check leaves them alone).
   */
  private async watchManagerNodes(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      await sleep(1000, signal);
      const cons = this.etcd ?? this.raft;
      if (signal.aborted || !cons) break;
      const members = cons.members();
      const changes: Array<[string, NodeState]> = [];
      for (const n of this.store.listNodes()) {
        if (!isAgentless(n)) continue;
        const m = members.find((x) => x.addr === n.status?.addr);
        // under etcd, a manager is a member while its registration lease lives
        if (!m && !this.etcd) continue;
        const want = m && (m.reachable || m.leader) ? NodeState.NODE_STATE_READY : NodeState.NODE_STATE_DOWN;
        if (n.status?.state !== want) changes.push([n.id, want]);
      }
      if (changes.length === 0) continue;
      await this.store
        .update((tx) => {
          for (const [id, state] of changes) {
            const n = tx.get('node', id);
            if (!n?.status) continue;
            tx.update('node', { ...n, status: { ...n.status, state, message: state === NodeState.NODE_STATE_DOWN ? 'manager unreachable' : '' } });
          }
        }, signal)
        .catch((err: unknown) => this.opts.log.warn({ err: errorMessage(err) }, 'updating manager node status failed'));
    }
  }

  /** Opens this manager's Raft member (new, restarted or joining) and wires it to the store. */
  private async openRaft(join: string | undefined, forceNewCluster?: boolean): Promise<RaftNode> {
    const store = this.store;
    const tls = this.requireTls();
    const raft = await RaftNode.open({
      dataDir: path.join(this.opts.dataDir, 'raft'),
      server: this.server,
      advertiseAddr: this.advertiseAddr(),
      join,
      dek: this.keys?.dek,
      // mutual TLS: only manager certificates reach Raft; raft ids follow node ids
      credentials: clientCredentials(tls),
      authz: this.authz,
      nodeId: tls.identity.nodeId,
      forceNewCluster,
      tickMs: this.opts.raftTickMs,
      signal: this.opts.signal,
      log: this.opts.log.child({ component: 'raft' }),
      stateMachine: {
        // a rejected batch (version conflict) throws the same way on every manager; the proposer sees the error
        apply: (data, index) => {
          store.applyBatch(StoreBatch.decode(data), index);
          this.watchKeys();
        },
        snapshot: () => StoreSnapshot.encode(store.snapshot()).finish(),
        restore: (data, index) => {
          store.restore(StoreSnapshot.decode(data), index);
          this.watchKeys();
        },
      },
    });
    this.raft = raft;
    this.removed = false;
    this.store.setProposer({ propose: (batch, signal, encoded) => raft.propose(encoded ? encoded() : StoreBatch.encode(batch).finish(), signal) });
    raft.onLeadershipChange((leader) => this.onLeadershipChange(leader));
    raft.onRemoved(() => this.leaveRaft(raft));
    raft.onFatal((err) => {
      if (this.failure) return;
      this.failure = new FlotillaError('INTERNAL', `fatal raft/storage error in ${path.join(this.opts.dataDir, 'raft')}: ${errorMessage(err)}`, { cause: err });
      this.onLeadershipChange(false);
      // stop answering at once: agents and clients move on to another manager
      this.server.forceShutdown();
      this.onFailure?.(this.failure);
    });
    return raft;
  }

  /** This manager is no longer a member (demoted): stop its Raft member and wait for a promotion. */
  private leaveRaft(raft: RaftNode): void {
    if (this.removed || this.raft !== raft) return;
    this.removed = true;
    this.opts.log.warn('this manager was removed from the cluster (demoted): stopping its raft member');
    this.onLeadershipChange(false);
    const peers = raft.members().filter((m) => m.raftId !== raft.id).map((m) => m.addr);
    void raft.stop().then(() => this.watchForPromotion(peers));
  }

  /**
   * A removed member usually never hears of its removal (the leader stops talking to it), so each
   * follower asks another manager every second whether its node was demoted.
   */
  private async watchMembership(): Promise<void> {
    const signal = this.opts.signal;
    let i = 0;
    while (!signal.aborted) {
      await sleep(1000, signal);
      const raft = this.raft;
      if (!raft || this.removed || !this.opts.hostname) continue;
      const peers = raft.members().filter((m) => m.raftId !== raft.id && !m.learner);
      const peer = peers[i++ % Math.max(1, peers.length)];
      if (!peer) continue;
      const client = new ControlClient(peer.addr, clientCredentials(this.requireTls()), TLS_CHANNEL_OPTIONS);
      try {
        const res = await new Promise<GetNodeResponse>((resolve, reject) =>
          client.getNode({ nodeId: this.opts.hostname! }, new grpc.Metadata(), { deadline: Date.now() + 3000 }, (err, r) => (err ? reject(err) : resolve(r))),
        );
        const n = res.node;
        // demoted (even if a promotion was asked for since: it rejoins afresh after leaving)
        if (n && !this.promoting && n.description?.managerAddr === this.advertiseAddr() && n.role === NodeRole.NODE_ROLE_WORKER) {
          this.leaveRaft(raft);
        }
      } catch {
        // that manager is down or has no leader: ask another next time
      } finally {
        client.close();
      }
    }
  }

  /**
   * A demoted manager keeps running (its agent goes on as a worker) and asks the other managers
   * every second whether its node was promoted again; then it joins afresh with its old data moved
   * aside, and marks its node a manager once it is a member.
   */
  private async watchForPromotion(peers: string[]): Promise<void> {
    const signal = this.opts.signal;
    const hostname = this.opts.hostname ?? '';
    while (!signal.aborted && this.removed) {
      await sleep(1000, signal);
      for (const addr of peers) {
        if (signal.aborted || !this.removed) return;
        const client = new ControlClient(addr, clientCredentials(this.requireTls()), TLS_CHANNEL_OPTIONS);
        try {
          const res = await new Promise<GetNodeResponse>((resolve, reject) =>
            client.getNode({ nodeId: hostname }, new grpc.Metadata(), { deadline: Date.now() + 3000 }, (err, r) => (err ? reject(err) : resolve(r))),
          );
          // promoted: recorded as a worker and asked to be a manager. A demotion that removed this
          // member but has not yet recorded the worker role still reads manager/manager: not a promotion
          const node = res.node;
          if (node?.spec?.desiredRole !== NodeRole.NODE_ROLE_MANAGER || node.role !== NodeRole.NODE_ROLE_WORKER) break;
          this.opts.log.info({ via: addr }, 'this node was promoted: joining the managers again');
          this.promoting = true;
          const dir = path.join(this.opts.dataDir, 'raft');
          if (fs.existsSync(dir)) fs.renameSync(dir, `${dir}.demoted-${Date.now()}`);
          // the state comes again from the leader (log or snapshot): start from nothing
          this.store.restore({ nodes: [], services: [], tasks: [], clusters: [], networks: [], secrets: [], configs: [] }, 0);
          const raft = await this.openRaft(addr);
          await raft.waitForLeader(signal, 30_000);
          const nodeId = node.id;
          // wait until this manager's store has caught up with the cluster, then mark the node
          for (let tries = 0; tries < 300 && !signal.aborted; tries++) {
            await raft.readIndex(signal).catch(() => {});
            if (this.store.getNode(nodeId)) break;
            await sleep(100, signal);
          }
          await this.store.update((tx) => {
            const n = tx.get('node', nodeId);
            if (n) tx.update('node', { ...n, role: NodeRole.NODE_ROLE_MANAGER });
          }, signal);
          this.opts.log.info('promoted: this manager is a member again');
          this.promoting = false;
          return;
        } catch (err) {
          this.promoting = false;
          this.opts.log.info({ via: addr, err: (err as Error).message }, 'promotion check failed');
        } finally {
          client.close();
        }
      }
    }
  }

  private managerStatus(n: Node): ManagerStatus | undefined {
    const cons = this.etcd ?? this.raft;
    if (n.role !== NodeRole.NODE_ROLE_MANAGER || !cons) return undefined;
    const m = cons.members().find((x) => x.addr === n.status?.addr);
    if (!m) return { raftId: 0, addr: n.status?.addr ?? '', leader: false, reachability: 'unreachable' };
    return { raftId: m.raftId, addr: m.addr, leader: m.leader, reachability: m.reachable || m.leader ? 'reachable' : 'unreachable' };
  }

  private async removeManager(n: Node, force: boolean): Promise<void> {
    // under etcd a manager is no consensus member: nothing to remove
    if (this.etcd) return;
    if (!this.raft) throw new FlotillaError('UNAVAILABLE', 'the manager is starting');
    const m = this.raft.members().find((x) => x.addr === n.status?.addr);
    if (!m) return;
    await this.raft.removeMember(m.raftId, { force });
  }

  private async initCluster(): Promise<void> {
    const boot = this.bootstrap;
    if (!boot) throw new FlotillaError('FAILED_PRECONDITION', `no cluster state and no pending ${BOOTSTRAP_FILE} in ${this.opts.dataDir}: move the data dir aside and start again`);
    const autolock = !!this.opts.autolock;
    const cluster: Cluster = {
      id: boot.clusterId,
      meta: undefined,
      spec: {
        name: 'default',
        heartbeatPeriodMs: this.opts.heartbeatMs ?? DEFAULT_HEARTBEAT_MS,
        taskHistoryLimit: DEFAULT_TASK_HISTORY,
        serviceHistoryLimit: DEFAULT_SERVICE_HISTORY,
        defaultAddrPool: this.opts.defaultAddrPool ?? '',
        defaultAddrPoolMaskLength: this.opts.defaultAddrPoolMaskLength ?? 0,
        autolock,
      },
      tokens: boot.tokens,
      ca: boot.ca,
      unlockKey: autolock ? newUnlockKey() : '',
    };
    const tls = this.requireTls();
    const self = tls.identity.nodeId;
    await this.store.update((tx) => {
      tx.create('cluster', cluster);
      // this manager's node exists from the start (its certificate names it; see revocation)
      if (!tx.get('node', self)) {
        tx.create('node', {
          id: self,
          meta: undefined,
          spec: { labels: {}, desiredRole: NodeRole.NODE_ROLE_MANAGER, availability: NodeAvailability.NODE_AVAILABILITY_ACTIVE },
          description: undefined,
          status: { state: NodeState.NODE_STATE_UNKNOWN, message: '', addr: this.advertiseAddr(), lastHeartbeat: 0 },
          managerStatus: undefined,
          role: NodeRole.NODE_ROLE_MANAGER,
          certificateExpiryMs: tls.identity.notAfter.getTime(),
          certificateIssuer: tls.identity.issuer,
        });
      }
    });
    fs.rmSync(path.join(this.opts.dataDir, BOOTSTRAP_FILE), { force: true });
    this.bootstrap = undefined;
    this.opts.log.info({ clusterId: cluster.id }, 'created a new cluster');
  }

  /** The leadership handler: the one place leader-only components start and stop. */
  onLeadershipChange(isLeader: boolean): void {
    if (isLeader && !this.leaderCtl) {
      if (!this.store.getCluster()) return; // start() calls again once the cluster exists
      const ctl = new AbortController();
      // one signal ends every loop of the daemon: many listeners on it are expected
      setMaxListeners(0, ctl.signal);
      this.leaderCtl = ctl;
      const log = this.opts.log;
      const raft = this.etcd ?? this.raft;
      const etcd = this.etcd;
      this.leaderRuns = (async () => {
        // never act on a store that has not applied everything committed before this term
        while (raft && !ctl.signal.aborted) {
          try {
            await raft.readIndex(ctl.signal);
            break;
          } catch {
            await sleep(50, ctl.signal);
          }
        }
        if (ctl.signal.aborted) return;
        // under etcd, the leader loops' writes are fenced by this manager's election key
        await (etcd ? etcd.fenced(() => this.runLeaderLoops(ctl, log)) : this.runLeaderLoops(ctl, log));
      })();
      return;
    }
    if (!isLeader && this.leaderCtl) {
      this.leaderCtl.abort();
      this.leaderCtl = undefined;
      this.opts.log.info('lost leadership: leader components stopped');
    }
  }

  private async runLeaderLoops(ctl: AbortController, log: Logger): Promise<void> {
    {
      const loops = [
        this.dispatcher.run(ctl.signal),
        new ReplicatedOrchestrator(this.store, log.child({ component: 'replicated' })).run(ctl.signal),
        new GlobalOrchestrator(this.store, log.child({ component: 'global' })).run(ctl.signal),
        new JobOrchestrator(this.store, log.child({ component: 'jobs' })).run(ctl.signal),
        new SchedulerLoop(this.store, log.child({ component: 'scheduler' })).run(ctl.signal),
        new TaskReaper(this.store, log.child({ component: 'reaper' })).run(ctl.signal),
        new Updater(this.store, log.child({ component: 'updater' })).run(ctl.signal),
        new Allocator(this.store, log.child({ component: 'allocator' })).run(ctl.signal),
        this.watchManagerNodes(ctl.signal),
        this.caRotationLoop(ctl.signal, log.child({ component: 'ca-rotation' })),
      ];
      log.info('became leader: orchestrators, scheduler and dispatcher started');
      const results = await Promise.allSettled(loops);
      for (const r of results) if (r.status === 'rejected') log.error({ err: String(r.reason) }, 'leader component failed');
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
    if (!this.failure) await new Promise<void>((resolve) => this.server.tryShutdown(() => resolve()));
    await this.raft?.stop();
    await this.etcd?.stop();
    if (this.keysTimer) {
      clearTimeout(this.keysTimer);
      this.keysTimer = undefined;
    }
    this.followKeys();
    this.server.forceShutdown();
    this.unixServer.forceShutdown();
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
