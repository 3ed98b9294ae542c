/**
 * The agent: a worker over a container runtime, driven by a dispatcher session. runAgent() runs until
 * its signal aborts (then it disconnects; containers keep running and are adopted at the next start)
 * or until the managers refuse its token (then it rejects). It never exits the process, so the manager
 * can run an agent in its own process.
 */
import { setMaxListeners } from 'node:events';
import os from 'node:os';
import path from 'node:path';
import { FlotillaError, errorMessage } from '../common/errors.js';
import { createLogger, type Logger } from '../common/log.js';
import type { RegisterResponse } from '../gen/flotilla/v1/dispatcher.js';
import type { NodeDescription } from '../gen/flotilla/v1/objects.js';
import type { ContainerRuntime } from './runtime/types.js';
import { runRootOf } from './runtime/run-root.js';
import { Discovery } from './network/discovery.js';
import { NodeNetwork } from './network/node-network.js';
import { DEVICE_PREFIX, hostOfAddr } from './network/names.js';
import { Session } from './worker/session.js';
import { SimRuntime } from './worker/sim.js';
import { Worker, type WorkerOptions } from './worker/worker.js';
import { TlsSource } from '../manager/ca/credentials.js';
import { loadNodeTls, saveNodeTls } from '../manager/ca/certstore.js';
import { joinCluster, renewCertificate, runRenewal } from '../manager/ca/service.js';
import { sleep } from '../common/sleep.js';
import { ImageStore } from './runtime/images.js';
import { ContentServer, ImageFetcher } from './worker/distribution.js';

export interface AgentOptions {
  /** the node's data dir (the runtime's, and <dataDir>/agent/node.json) */
  dataDir: string;
  /** HOST:PORT of the managers */
  managers: string[];
  /** the cluster's worker (or manager) join token (used once, to get the node's certificate) */
  token: string;
  /**
   * the node's certificate: given when the agent runs inside a manager (the manager's own);
   * otherwise loaded from <dataDir>/certificates/node-tls.json, or obtained by joining with the token
   */
  tls?: TlsSource;
  /** plain-text sessions with the token, no certificate (tests of the dispatcher alone) */
  insecure?: boolean;
  /** default: os.hostname() */
  hostname?: string;
  /** engine labels */
  labels?: Record<string, string>;
  runtime: 'runc' | 'sim';
  signal: AbortSignal;
  log?: Logger;
  /** use this runtime instead of opening one (tests, simulations sharing a process) */
  runtimeInstance?: ContainerRuntime;
  /** the address reported to the manager; default: the first non-internal IPv4 address */
  addr?: string;
  /** set when the agent runs inside a manager process: that manager's address */
  managerAddr?: string;
  /** resources reported; default: os.cpus() and os.totalmem() */
  resources?: { nanoCpus: number; memoryBytes: number };
  /** worker tuning (concurrency, status batching) */
  worker?: Omit<WorkerOptions, 'runtime' | 'hostname' | 'log'>;
  /** the port of the node's blob server (distribution inside the cluster); default 0: any free port */
  contentPort?: number;
  /** no overlay data plane even with the runc runtime (tests); the sim runtime never has one */
  noNetwork?: boolean;
  /** reconnect backoff (default 100 ms → 5 s) */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /** called after each successful registration (tests, embedding) */
  onRegistered?: (info: RegisterResponse & { manager: string }) => void;
  /** receives the worker and session once they exist (tests, embedding) */
  onStarted?: (agent: { worker: Worker; session: Session; runtime: ContainerRuntime }) => void;
}

/** The first non-internal IPv4 address (not on an overlay bridge of ours, fl-*), else 127.0.0.1. */
export function defaultAddr(): string {
  for (const [name, list] of Object.entries(os.networkInterfaces())) {
    if (name.startsWith(DEVICE_PREFIX)) continue; // a gateway address every node holds
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  return '127.0.0.1';
}

/** Opens the runtime an agent uses: sim (in <dataDir>/sim) or runc (the real one, loaded on demand). */
export async function openRuntime(kind: 'runc' | 'sim', dataDir: string): Promise<ContainerRuntime & { close?: () => unknown }> {
  if (kind === 'sim') return SimRuntime.open(dataDir);
  if (kind !== 'runc') throw new FlotillaError('INVALID_ARGUMENT', `invalid runtime ${JSON.stringify(kind)}: must be runc or sim`);
  const { RuncRuntime } = await import('./runtime/containers.js');
  return RuncRuntime.open(dataDir);
}

export function nodeDescription(opts: Pick<AgentOptions, 'hostname' | 'labels' | 'resources' | 'managerAddr'>, runtime: 'runc' | 'sim'): NodeDescription {
  return {
    hostname: opts.hostname ?? os.hostname(),
    resources: {
      nanoCpus: opts.resources?.nanoCpus ?? Math.max(1, os.cpus().length) * 1e9,
      memoryBytes: opts.resources?.memoryBytes ?? os.totalmem(),
      pids: 0,
    },
    engineLabels: { ...(opts.labels ?? {}) },
    os: process.platform,
    arch: process.arch,
    // a sim node always shows itself as simulated
    runtime,
    managerAddr: opts.managerAddr ?? '',
  };
}

/**
 * The node's certificate: saved from an earlier run, or obtained now by joining with the token
 * (trying each manager; a refusal that is not about reachability is fatal).
 */
async function nodeTls(dataDir: string, opts: AgentOptions, log: Logger): Promise<TlsSource> {
  const saved = loadNodeTls(dataDir);
  if (saved) return new TlsSource(saved);
  if (!opts.token) throw new FlotillaError('INVALID_ARGUMENT', 'invalid --token "": a join token is required to join (--token-file or FLOTILLA_TOKEN)');
  for (let attempt = 0; ; attempt++) {
    for (const addr of opts.managers) {
      if (opts.signal.aborted) throw new FlotillaError('ABORTED', 'stopped before joining');
      try {
        const res = await joinCluster(addr, opts.token);
        await saveNodeTls(dataDir, res);
        log.info({ nodeId: res.nodeId, role: res.role, manager: addr }, 'joined the cluster: received the node certificate');
        return new TlsSource(res);
      } catch (err) {
        const code = err instanceof FlotillaError ? err.code : 'UNAVAILABLE';
        if (code !== 'UNAVAILABLE' || attempt >= 5) throw err;
        log.warn({ manager: addr, err: errorMessage(err) }, 'joining failed; retrying');
      }
    }
    await sleep(Math.min(5000, 200 * 2 ** attempt), opts.signal);
  }
}

export async function runAgent(opts: AgentOptions): Promise<void> {
  const log = opts.log ?? createLogger('agent');
  if (opts.signal.aborted) return;
  if (opts.managers.length === 0) throw new FlotillaError('INVALID_ARGUMENT', 'invalid --manager []: at least one manager address is required');
  const dataDir = path.resolve(opts.dataDir);
  const own = opts.insecure ? undefined : (opts.tls ?? (await nodeTls(dataDir, opts, log)));
  if (!own && !opts.token) throw new FlotillaError('INVALID_ARGUMENT', 'invalid --token "": a join token is required (--token or FLOTILLA_TOKEN)');
  if (opts.signal.aborted) return;
  const owned = opts.runtimeInstance === undefined;
  const runtime: ContainerRuntime & { close?: () => unknown } = opts.runtimeInstance ?? (await openRuntime(opts.runtime, dataDir));
  const description = nodeDescription(opts, runtime.kind);
  const addr = opts.addr ?? defaultAddr();
  // the overlay data plane (agent/network): real containers only; it adopts what a previous run left
  const current: { session?: Session } = {};
  let network: NodeNetwork | undefined;
  let discovery: Discovery | undefined;
  if (runtime.kind === 'runc' && !opts.noNetwork) {
    discovery = new Discovery({ log: (m) => log.warn({ component: 'discovery' }, m) });
    try {
      network = await NodeNetwork.open({
        stateDir: path.join(await runRootOf(dataDir), 'network'),
        localAddr: hostOfAddr(addr),
        nodeId: () => current.session?.nodeId ?? '',
        log: log.child({ component: 'network' }),
        discovery,
      });
    } catch (err) {
      log.warn({ err: errorMessage(err), addr }, 'overlay networks unavailable on this node');
    }
  }
  // distribution inside the cluster (docs/images.md): this node serves its blobs to the others and
  // fetches the images its tasks lack from them (mutual TLS with the node certificate)
  let content: ContentServer | undefined;
  let fetcher: ImageFetcher | undefined;
  const store = (runtime as { images?: unknown }).images;
  if (own && runtime.kind === 'runc' && store instanceof ImageStore) {
    try {
      content = new ContentServer(store, own, log.child({ component: 'content' }));
      await content.listen(hostOfAddr(addr), opts.contentPort ?? 0);
      fetcher = new ImageFetcher(
        store,
        { imageSources: (ref, signal) => (current.session ? current.session.imageSources(ref, signal) : Promise.reject(new FlotillaError('UNAVAILABLE', 'no session'))) },
        own,
        { hostname: description.hostname, log: log.child({ component: 'images' }) },
      );
    } catch (err) {
      content?.close();
      content = undefined;
      log.warn({ err: errorMessage(err) }, 'image distribution inside the cluster unavailable on this node');
    }
  }
  const worker = new Worker({ ...opts.worker, runtime, hostname: description.hostname, log: log.child({ component: 'worker' }), network, images: fetcher });
  let renewNow: ((pem: string) => void) | undefined;
  const session = new Session({
    managers: opts.managers,
    token: own ? '' : opts.token,
    tls: own,
    dataDir,
    description,
    addr,
    worker,
    log: log.child({ component: 'session' }),
    backoffInitialMs: opts.backoffInitialMs,
    backoffMaxMs: opts.backoffMaxMs,
    onRegistered: opts.onRegistered,
    onTrustBundle: (pem) => renewNow?.(pem),
    images: fetcher && content ? async () => ({ images: await fetcher.held(), contentAddr: content.addr }) : undefined,
  });
  current.session = session;
  opts.onStarted?.({ worker, session, runtime });
  log.info({ hostname: description.hostname, runtime: runtime.kind, managers: opts.managers }, 'agent starting');

  // The session lives a little longer than the caller's signal: the worker's last reports go out first.
  const sessionCtl = new AbortController();
  // one signal ends every loop of the daemon: many listeners on it are expected
  setMaxListeners(0, sessionCtl.signal);
  const stopped = new Promise<void>((resolve) => {
    if (opts.signal.aborted) return resolve();
    opts.signal.addEventListener('abort', () => resolve(), { once: true });
  });
  // a standalone agent renews its own certificate (the manager's in-process agent shares the manager's)
  if (own && !opts.tls) {
    const source = own;
    const renew = async (): Promise<void> => {
        let last: unknown;
        for (const addr of session.managers) {
          try {
            const res = await renewCertificate(addr, source);
            await saveNodeTls(dataDir, res);
            log.info({ notAfter: source.identity.notAfter.toISOString() }, 'renewed the node certificate');
            return;
          } catch (err) {
            last = err;
          }
        }
        throw last ?? new Error('no manager to renew with');
    };
    // a CA rotation: the heartbeat's trust bundle differs from this node's, so renew at once (the
    // answer carries a certificate from the new root and the new bundle)
    let renewing = false;
    renewNow = (pem) => {
      if (renewing || pem === source.current.trustPem) return;
      renewing = true;
      log.info('the cluster trust bundle changed (CA rotation): renewing the node certificate now');
      // trust the new bundle first (it came over a session that verified the manager): managers
      // that renewed already present certificates from the new root
      try {
        source.update({ trustPem: pem });
      } catch (err) {
        log.warn({ err: errorMessage(err) }, 'the new trust bundle does not cover this node\'s certificate yet; renewing first');
      }
      renew()
        .catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'renewing onto the new trust bundle failed; retrying at the next heartbeat'))
        .finally(() => (renewing = false));
    };
    runRenewal(
      source,
      renew,
      sessionCtl.signal,
      { retryMs: 5000, onError: (err) => log.warn({ err: errorMessage(err) }, 'certificate renewal failed; retrying') },
    ).catch((err: unknown) => log.error({ err: errorMessage(err) }, 'certificate renewal loop failed'));
  }
  const sessionRun = session.run(sessionCtl.signal).then(
    () => undefined,
    (err: unknown) => err,
  );
  const outcome = await Promise.race([stopped.then(() => 'stopped' as const), sessionRun.then((err) => ({ err }))]);
  try {
    await worker.close();
  } finally {
    sessionCtl.abort();
    await sessionRun;
    // the resolver stops answering; VIP tables stay in the containers, which keep running
    await discovery?.close();
    content?.close();
    if (owned) {
      try {
        await runtime.close?.();
      } catch (err) {
        log.warn({ err: errorMessage(err) }, 'closing the runtime failed');
      }
    }
  }
  // a fatal session error (token refused): the caller reports it (the CLI prints one line)
  if (outcome !== 'stopped' && outcome.err !== undefined) throw outcome.err;
  log.info('agent stopped: disconnected (containers keep running)');
}
