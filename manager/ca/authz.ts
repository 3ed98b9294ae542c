/**
 * Authorization by certificate. Each service declares, in one place, which roles may call each of
 * its methods; `authorize` wraps the service's handler map so a call reaches its handler only when
 * the caller's TLS certificate (verified against the cluster's roots during the handshake) allows it.
 *
 *   server.addService(RaftService, authorize(RaftService, raftHandlers, RAFT_POLICY, authz));
 *
 * Answers: UNAUTHENTICATED without a verified certificate (or an expired one), PERMISSION_DENIED
 * for another cluster, a revoked node, or a role the method does not allow.
 *
 * Only TLS calls carry an identity. The local admin path (the 0600 unix socket) must be served by
 * its own grpc.Server with the unwrapped handlers: inside one server, a plain-text call cannot be
 * told apart reliably from a TLS call whose certificate failed verification.
 */
import { type PeerCertificate, TLSSocket } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { errorMessage } from '../../common/errors.js';
import { type CertIdentity, type Role, identityFromPeer } from './x509.js';

/** 'anonymous': any TLS client, with or without a certificate (NodeCA's join methods only). */
export type Access = Role | 'anonymous';

/** For every method of a service, the roles allowed to call it. Missing methods do not compile. */
export type Policy<H> = { readonly [K in keyof H]: readonly Access[] };

export interface Revocations {
  isRevoked(id: CertIdentity): boolean;
}

/** Revoked node ids and certificate serials (the store's removed nodes feed it). */
export class RevocationList implements Revocations {
  readonly nodeIds = new Set<string>();
  readonly serials = new Set<string>();
  revokeNode(nodeId: string): void {
    this.nodeIds.add(nodeId);
  }
  revokeSerial(serial: string): void {
    this.serials.add(serial.toLowerCase().replace(/^0+(?=.)/, ''));
  }
  isRevoked(id: CertIdentity): boolean {
    return this.nodeIds.has(id.nodeId) || this.serials.has(id.serial);
  }
}

export interface AuthzOptions {
  /** the cluster id callers must belong to */
  clusterId: string | (() => string);
  revocations?: Revocations;
  /**
   * Subject CNs of the roots trusted now (issuerNames(trustPem)); when set, a certificate from a
   * root that was dropped by a CA rotation is refused even on a connection opened before.
   */
  trustedIssuers?: () => readonly string[];
  /**
   * An exception to trustedIssuers for a connection opened before a CA rotation ended: true when
   * the certificate's node has renewed onto a trusted root since (its sessions, opened with
   * the old certificate, go on; a new connection with the old certificate fails the handshake).
   */
  renewedSince?: (identity: CertIdentity) => boolean;
  /**
   * Issuer CN -> role of the current join CAs (one per join token, manager/ca/join.ts). A
   * certificate from one of them is a 'joiner', whatever its subject says; a 'joiner' from any
   * other issuer is refused.
   */
  joinIssuers?: () => ReadonlyMap<string, 'worker' | 'manager'>;
  /**
   * Let calls through on a connection whose certificate expired after the connection was opened
   * (the handshake checked the dates). The daemons set it: a node renews its certificate long
   * before expiry, and its sessions must survive the renewal (new connections present the new
   * certificate). Revocation and CA rotation are still checked on every call.
   */
  allowExpiredOnOpenConnections?: boolean;
  now?: () => number;
}

export interface Caller {
  /** absent only for 'anonymous' calls without a certificate */
  identity?: CertIdentity;
  /** for a 'joiner': the role its join token grants */
  joinRole?: 'worker' | 'manager';
}

const callers = new WeakMap<object, Caller>();

/** The caller of a call that went through `authorize` (handlers bind node ids to this). */
export function callerOf(call: object): Caller | undefined {
  return callers.get(call);
}

/**
 * The TLS socket a server call arrived on, when grpc-js's internals are where 1.14 keeps them
 * (ServerUnaryCallImpl.call -> [ServerInterceptingCall.nextCall ->] BaseServerInterceptingCall
 * .stream.session.socket); undefined otherwise, and the identity is then read from the call.
 */
function tlsSocketOf(call: object): object | undefined {
  let c = (call as { call?: unknown }).call as { nextCall?: unknown; stream?: { session?: { socket?: unknown } } } | undefined;
  for (let i = 0; i < 4 && c && !c.stream; i++) c = c.nextCall as typeof c;
  const sock = c?.stream?.session?.socket;
  return sock instanceof TLSSocket ? sock : undefined;
}

/**
 * Identities read from each connection's certificate. grpc-js's getAuthContext() converts the
 * peer certificate to a JS object on every call (~60 µs: subject, issuer, key, three fingerprints);
 * a connection's certificate is fixed once its handshake verified it, so it is read once per
 * connection. Every per-call check (cluster, expiry, CA rotation, revocation, role) still runs on
 * each call.
 */
const socketIdentities = new WeakMap<object, CertIdentity | null>();
/** How often the per-connection identity was reused (tests). */
export const peerIdentityStats = { reads: 0, reused: 0 };

/** The verified identity of a call's caller, if its TLS certificate verified. */
export function peerIdentity(call: { getAuthContext(): AuthContextLike | null }): CertIdentity | undefined {
  const sock = tlsSocketOf(call);
  if (sock) {
    const known = socketIdentities.get(sock);
    if (known !== undefined) {
      peerIdentityStats.reused++;
      return known ?? undefined;
    }
  }
  const ctx = call.getAuthContext();
  peerIdentityStats.reads++;
  // grpc-js fills sslPeerCertificate only for an authorized (chain-verified) TLS socket
  const id = ctx?.transportSecurityType !== 'ssl' || !ctx.sslPeerCertificate ? undefined : identityFromPeer(ctx.sslPeerCertificate);
  if (sock) socketIdentities.set(sock, id ?? null);
  return id;
}

type StatusError = grpc.ServiceError;

/** grpc-js's AuthContext (not exported from its index in 1.14). */
export interface AuthContextLike {
  transportSecurityType?: string;
  sslPeerCertificate?: PeerCertificate;
}

function denied(code: grpc.status, details: string): StatusError {
  return Object.assign(new Error(details), { code, details, metadata: new grpc.Metadata() }) as StatusError;
}

/** Decides a call; returns the caller, or the status error to answer with. */
export function check(call: { getAuthContext(): AuthContextLike | null }, method: string, allowed: readonly Access[], opts: AuthzOptions): Caller | StatusError {
  let identity: CertIdentity | undefined;
  try {
    identity = peerIdentity(call);
  } catch (err) {
    return denied(grpc.status.PERMISSION_DENIED, `${method}: ${errorMessage(err)}`);
  }
  if (!identity) {
    if (allowed.includes('anonymous')) return {};
    return denied(grpc.status.UNAUTHENTICATED, `${method}: a client certificate from this cluster's CA is required`);
  }
  // a join certificate: recognised by its issuer (one of the current join CAs), never its subject
  const joinRole = opts.joinIssuers?.().get(identity.issuer);
  if (joinRole || identity.role === 'joiner') {
    if (!joinRole) return denied(grpc.status.PERMISSION_DENIED, `${method}: a join certificate from an unknown join CA (rotated token?)`);
    if (identity.notAfter.getTime() <= (opts.now?.() ?? Date.now())) return denied(grpc.status.UNAUTHENTICATED, `${method}: join certificate expired`);
    if (!allowed.includes('joiner') && !allowed.includes('anonymous')) {
      return denied(grpc.status.PERMISSION_DENIED, `${method}: needs a ${allowed.join(' or ')} certificate; a joining node (join certificate) can only ask for its node certificate`);
    }
    return { identity: { ...identity, role: 'joiner' }, joinRole };
  }
  const clusterId = typeof opts.clusterId === 'function' ? opts.clusterId() : opts.clusterId;
  if (identity.clusterId !== clusterId) {
    return denied(grpc.status.PERMISSION_DENIED, `${method}: certificate of node ${identity.nodeId} is for cluster ${identity.clusterId}, not ${clusterId}`);
  }
  // TLS checks dates at the handshake only; a long-lived connection outlives its certificate
  if (!opts.allowExpiredOnOpenConnections && identity.notAfter.getTime() <= (opts.now?.() ?? Date.now())) {
    return denied(grpc.status.UNAUTHENTICATED, `${method}: certificate of node ${identity.nodeId} expired at ${identity.notAfter.toISOString()}`);
  }
  if (opts.trustedIssuers && !opts.trustedIssuers().includes(identity.issuer) && !opts.renewedSince?.(identity)) {
    return denied(grpc.status.UNAUTHENTICATED, `${method}: certificate of node ${identity.nodeId} is from a root CA that is no longer trusted (CA rotated); renew it`);
  }
  if (opts.revocations?.isRevoked(identity)) {
    return denied(grpc.status.PERMISSION_DENIED, `${method}: node ${identity.nodeId} has been removed from the cluster (certificate revoked)`);
  }
  if (!allowed.includes(identity.role) && !allowed.includes('anonymous')) {
    return denied(grpc.status.PERMISSION_DENIED, `${method}: needs a ${allowed.join(' or ')} certificate; node ${identity.nodeId} has a ${identity.role} certificate`);
  }
  return { identity };
}

type AnyHandler = (call: never, callback?: never) => unknown;

/**
 * Wraps a service's handler map with a per-method role policy. `service` is the generated service
 * definition (it says which methods stream, so a refusal is sent the right way).
 */
export function authorize<H extends object>(service: grpc.ServiceDefinition, handlers: H, policy: Policy<H>, opts: AuthzOptions): H {
  const out: Record<string, unknown> = {};
  for (const [name, handler] of Object.entries(handlers) as [string, AnyHandler][]) {
    const def = service[name];
    const allowed = (policy as Record<string, readonly Access[] | undefined>)[name];
    if (!def) throw new Error(`authorize: ${name} is not a method of the service`);
    // fail closed: a method without a policy entry is refused to everyone
    const roles = allowed ?? [];
    const method = def.path;
    const h = handler as (call: grpc.ServerUnaryCall<unknown, unknown>, cb?: grpc.sendUnaryData<unknown>) => unknown;
    if (!def.responseStream) {
      // unary and client-streaming: answer through the callback
      out[name] = (call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const r = check(call, method, roles, opts);
        if (r instanceof Error) return cb(r, null);
        callers.set(call, r);
        return h(call, cb);
      };
    } else {
      // server-streaming and bidi: end the stream with the status
      out[name] = (call: grpc.ServerWritableStream<unknown, unknown>) => {
        const r = check(call, method, roles, opts);
        if (r instanceof Error) {
          call.emit('error', r);
          return;
        }
        callers.set(call, r);
        return h(call as unknown as grpc.ServerUnaryCall<unknown, unknown>);
      };
    }
  }
  return out as H;
}
