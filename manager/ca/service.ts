/**
 * NodeCA: the manager side (handlers over a CaBackend the manager implements on its store) and the
 * node side (join: fetch the root, check it against the token, send a CSR; renewal loop).
 */
import { X509Certificate as NodeX509 } from 'node:crypto';
import * as tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import {
  type GetRootCAResponse,
  type IssueNodeCertificateRequest,
  type IssueNodeCertificateResponse,
  type RenewNodeCertificateRequest,
  NodeCAClient,
  type NodeCAServer,
  NodeCAService,
} from '../../gen/flotilla/v1/ca.js';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { sleep } from '../../common/sleep.js';
import { grpcError } from '../grpc.js';
import { type AuthzOptions, type Policy, authorize, callerOf } from './authz.js';
import { TLS_CHANNEL_OPTIONS, TLS_SERVER_NAME, type TlsMaterial, type TlsSource, clientCredentials, joinerClientCredentials, untrustedClientCredentials } from './credentials.js';
import { joinerCertificate } from './join.js';
import { parseToken, tokenMatches, verifyCaAgainstToken } from './token.js';
import { type Role, type RootCA, createCsr, parseCertificate, renewalTime, splitPemBundle } from './x509.js';

/** What the manager provides to the CA service (backed by the replicated store). */
export interface CaBackend {
  /** the root that signs now (its key from the store) */
  signingCA(): Promise<RootCA>;
  /** PEM roots nodes must trust: the signing root, plus the previous one during a rotation */
  trustBundle(): string;
  /** current join tokens; a token not listed here is refused (rotation = replace) */
  joinTokens(): { worker: string; manager: string };
  /** --cert-expiry */
  certExpiryMs(): number;
  /**
   * Records a newly joined node (a store write through Raft; may refuse, e.g. not the leader) and
   * returns its id. Called before the certificate is signed.
   */
  admitNode(role: 'manager' | 'worker', addresses: string[]): Promise<string>;
  /** the role the store gives a node now (promote/demote), or undefined when the node is gone */
  nodeRole(nodeId: string): 'manager' | 'worker' | undefined;
  /** told of every certificate issued to a node (join and renewal), e.g. to show its expiry */
  onIssued?(nodeId: string, certPem: string): void;
  /** etcd store mode: the store key, handed to joining managers only (docs/store.md) */
  storeKey?(): Uint8Array | undefined;
}

/** Who may call what on NodeCA. */
export const NODE_CA_POLICY: Policy<NodeCAServer> = {
  getRootCa: ['anonymous'],
  issueNodeCertificate: ['anonymous'],
  renewNodeCertificate: ['manager', 'worker'],
};

function unary<Req, Res>(fn: (req: Req, call: grpc.ServerUnaryCall<Req, Res>) => Promise<Res>): grpc.handleUnaryCall<Req, Res> {
  return (call, cb) => {
    fn(call.request, call).then(
      (res) => cb(null, res),
      (err: unknown) => cb(grpcError(err), null),
    );
  };
}

/** NodeCA handlers, already wrapped with NODE_CA_POLICY: pass straight to server.addService(NodeCAService, ...). */
export function nodeCaHandlers(backend: CaBackend, authz: AuthzOptions): NodeCAServer {
  const handlers: NodeCAServer = {
    getRootCa: unary(async (): Promise<GetRootCAResponse> => {
      const ca = await backend.signingCA();
      return { rootCaPem: ca.certPem, trustBundlePem: backend.trustBundle() };
    }),
    issueNodeCertificate: unary(async (req: IssueNodeCertificateRequest, call): Promise<IssueNodeCertificateResponse> => {
      // a join certificate (derived from a current token) says the role; the token then stays home
      let role: 'manager' | 'worker' | undefined = callerOf(call)?.joinRole;
      if (!role) {
        parseToken(req.token); // shape first, for a clear INVALID_ARGUMENT
        const tokens = backend.joinTokens();
        // compare against both, always, so timing does not tell which role a token nearly matched
        const isWorker = tokenMatches(req.token, tokens.worker);
        const isManager = tokenMatches(req.token, tokens.manager);
        role = isManager ? 'manager' : isWorker ? 'worker' : undefined;
      }
      if (!role) throw new FlotillaError('PERMISSION_DENIED', 'join token refused: it is not a current join token of this cluster (rotated?)');
      const ca = await backend.signingCA();
      const nodeId = await backend.admitNode(role, req.addresses);
      const certPem = await ca.issue({ csrPem: req.csrPem, nodeId, role, addresses: req.addresses, expiryMs: backend.certExpiryMs() });
      backend.onIssued?.(nodeId, certPem);
      const storeKey = role === 'manager' ? Buffer.from(backend.storeKey?.() ?? []) : Buffer.alloc(0);
      return { nodeId, role, certPem, trustBundlePem: backend.trustBundle(), storeKey };
    }),
    renewNodeCertificate: unary(async (req: RenewNodeCertificateRequest, call): Promise<IssueNodeCertificateResponse> => {
      const id = callerOf(call)?.identity;
      if (!id) throw new FlotillaError('PERMISSION_DENIED', 'renewal needs the node certificate');
      const role = backend.nodeRole(id.nodeId);
      if (!role) throw new FlotillaError('PERMISSION_DENIED', `node ${id.nodeId} is not a member of the cluster`);
      const ca = await backend.signingCA();
      const certPem = await ca.issue({ csrPem: req.csrPem, nodeId: id.nodeId, role, addresses: req.addresses, expiryMs: backend.certExpiryMs() });
      backend.onIssued?.(id.nodeId, certPem);
      return { nodeId: id.nodeId, role, certPem, trustBundlePem: backend.trustBundle(), storeKey: Buffer.alloc(0) };
    }),
  };
  return authorize(NodeCAService, handlers, NODE_CA_POLICY, authz);
}

// ---------- node side ----------

function call<Req, Res>(fn: (req: Req, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: Res) => void) => unknown, req: Req, timeoutMs: number): Promise<Res> {
  return new Promise((resolve, reject) => {
    fn(req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

export interface JoinResult extends TlsMaterial {
  nodeId: string;
  role: Role;
  /** etcd store mode, a joining manager: the cluster's store key */
  storeKey?: Uint8Array;
}

/**
 * Joins a cluster through a manager: fetches the root CA over unverified TLS, refuses it unless it
 * matches the token's digest, then sends a fresh CSR with the token over a channel that verifies
 * the manager against that root. The token never goes over an unverified channel.
 */
export async function joinCluster(addr: string, token: string, opts: { addresses?: string[]; timeoutMs?: number; sendToken?: boolean } = {}): Promise<JoinResult> {
  parseToken(token);
  const timeoutMs = opts.timeoutMs ?? 10_000;
  // a short-lived client certificate signed by the token's derived join CA: it gets us through a
  // listener that requires client certificates, and tells the CA our role without the token
  const joiner = await joinerCertificate(token);
  const untrusted = new NodeCAClient(addr, untrustedClientCredentials(joiner), TLS_CHANNEL_OPTIONS);
  let root: GetRootCAResponse;
  try {
    root = await call(untrusted.getRootCa.bind(untrusted), {}, timeoutMs);
  } catch (err) {
    const e = err as grpc.ServiceError;
    // grpc-js reports a refused handshake like a manager that is down: ask TLS itself
    if (e.code === grpc.status.UNAVAILABLE && (await handshakeRefused(addr, joiner))) {
      throw new FlotillaError(
        'PERMISSION_DENIED',
        `join: the manager at ${addr} refused this node's join certificate at the TLS handshake: the join token is not current (rotated?) or is from another cluster; get the current one with \`flotilla cluster join-token worker|manager -q\``,
      );
    }
    throw new FlotillaError(e.code === grpc.status.PERMISSION_DENIED ? 'PERMISSION_DENIED' : 'UNAVAILABLE', `join: cannot fetch the root CA from ${addr}: ${errorMessage(err)}`, { cause: err });
  } finally {
    untrusted.close();
  }
  verifyCaAgainstToken(token, root.rootCaPem);
  // trust only the root the token pins (the bundle may carry a second root we cannot check yet)
  const clusterId = parseCaCluster(root.rootCaPem);
  const { keyPem, csrPem } = await createCsr();
  const client = new NodeCAClient(addr, joinerClientCredentials(root.rootCaPem, clusterId, joiner), TLS_CHANNEL_OPTIONS);
  try {
    const res = await call(client.issueNodeCertificate.bind(client), { token: opts.sendToken ? token : '', csrPem, addresses: opts.addresses ?? [] }, timeoutMs);
    return { ...checkIssued(res, keyPem, res.trustBundlePem || root.rootCaPem), ...(res.storeKey.length ? { storeKey: res.storeKey } : {}) };
  } finally {
    client.close();
  }
}

/**
 * Whether a manager that answers TLS refuses this client certificate (a TLS alert about the
 * certificate), as opposed to being unreachable.
 */
function handshakeRefused(addr: string, client: { certPem: string; keyPem: string }): Promise<boolean> {
  const i = addr.lastIndexOf(':');
  const host = addr.slice(0, i).replace(/^\[|\]$/g, '');
  const port = Number(addr.slice(i + 1));
  return new Promise((resolve) => {
    let done = false;
    const finish = (v: boolean): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      resolve(v);
    };
    const sock = tls.connect({ host, port, cert: client.certPem, key: client.keyPem, rejectUnauthorized: false, servername: TLS_SERVER_NAME, ALPNProtocols: ['h2'] });
    // TLS 1.3: the server checks the client certificate after the client's Finished, so the alert
    // arrives just after 'secureConnect'
    const timer = setTimeout(() => finish(false), 2000);
    // (grpc-js's server just closes the connection): a server that accepted us answers the HTTP/2
    // preface with its SETTINGS; one that refused closes without a byte
    let secured = false;
    sock.on('error', (err: Error) => finish(secured || /alert|certificate|unknown ca/i.test(err.message)));
    sock.on('secureConnect', () => {
      secured = true;
      sock.write(Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'));
    });
    sock.on('data', () => finish(false));
    sock.on('close', () => finish(secured));
  });
}

function parseCaCluster(caPem: string): string {
  const first = splitPemBundle(caPem)[0];
  if (!first) throw new FlotillaError('INVALID_ARGUMENT', 'join: the manager sent no root CA certificate');
  const subject = new NodeX509(first).subject;
  for (const line of subject.split('\n')) if (line.startsWith('O=')) return line.slice(2);
  throw new FlotillaError('INVALID_ARGUMENT', 'join: the root CA names no cluster (O=)');
}

function checkIssued(res: IssueNodeCertificateResponse, keyPem: string, trustPem: string): JoinResult {
  const id = parseCertificate(res.certPem);
  if (id.nodeId !== res.nodeId || id.role !== res.role) throw new FlotillaError('INTERNAL', 'the CA answered a certificate that does not match its own answer');
  return { nodeId: id.nodeId, role: id.role, certPem: res.certPem, keyPem, trustPem };
}

/** Renews this node's certificate through a manager, and swaps it into the source (no session drops). */
export async function renewCertificate(addr: string, source: TlsSource, opts: { addresses?: string[]; timeoutMs?: number } = {}): Promise<JoinResult> {
  const { keyPem, csrPem } = await createCsr(source.identity.nodeId);
  const client = new NodeCAClient(addr, clientCredentials(source), TLS_CHANNEL_OPTIONS);
  try {
    const res = await call(client.renewNodeCertificate.bind(client), { csrPem, addresses: opts.addresses ?? [] }, opts.timeoutMs ?? 10_000);
    const out = checkIssued(res, keyPem, res.trustBundlePem || source.current.trustPem);
    if (out.nodeId !== source.identity.nodeId) throw new FlotillaError('INTERNAL', `renewal returned a certificate for ${out.nodeId}`);
    source.update({ certPem: out.certPem, keyPem: out.keyPem, trustPem: out.trustPem });
    return out;
  } finally {
    client.close();
  }
}

/**
 * Keeps a node's certificate fresh until the signal aborts: sleeps until a random point between
 * 50% and 80% of the certificate's life, renews, repeats; on failure retries every retryMs (and at
 * once after any external update of the source, e.g. a CA rotation pushed by the manager).
 */
export async function runRenewal(source: TlsSource, renew: () => Promise<unknown>, signal: AbortSignal, opts: { retryMs?: number; onError?: (err: unknown) => void; rand?: () => number } = {}): Promise<void> {
  const retryMs = opts.retryMs ?? 10_000;
  while (!signal.aborted) {
    const at = renewalTime(source.identity, opts.rand?.() ?? Math.random()).getTime();
    const wake = new AbortController();
    const onAbort = (): void => wake.abort();
    signal.addEventListener('abort', onAbort, { once: true });
    const off = source.onChange(() => wake.abort());
    try {
      await sleep(Math.max(0, at - Date.now()), wake.signal);
    } finally {
      off();
      signal.removeEventListener('abort', onAbort);
    }
    if (signal.aborted) return;
    if (wake.signal.aborted) continue; // the certificate changed under us: re-arm
    try {
      await renew();
    } catch (err) {
      opts.onError?.(err);
      await sleep(retryMs, signal);
    }
  }
}
