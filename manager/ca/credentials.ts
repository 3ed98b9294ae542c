/**
 * The one place every gRPC server and client gets its TLS credentials.
 *
 * A TlsSource holds a node's current material (trust bundle, certificate, key) and is a grpc-js
 * CertificateProvider, so credentials built from it follow updates: after `source.update(...)`
 *   - a server calls setSecureContext on its TLS server: new handshakes present the new certificate
 *     and trust the new bundle; established connections (and every stream on them) stay up;
 *   - a client builds each new connection's secure context from the latest material; established
 *     channels keep their connection until it closes.
 * That is how renewal and CA rotation happen without dropping sessions.
 *
 * Peers are checked by what their certificate says (role, cluster id), never by host name: nodes
 * are addressed by IP and the certificate's SANs are informational.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import type { PeerCertificate } from 'node:tls';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { type CertIdentity, type Role, identityFromPeer, parseCertificate, splitPemBundle } from './x509.js';

export interface TlsMaterial {
  /** PEM bundle of the root CA certificates this node trusts (two during a CA rotation) */
  trustPem: string;
  certPem: string;
  keyPem: string;
}

type CaListener = grpc.experimental.CaCertificateUpdateListener;
type IdListener = grpc.experimental.IdentityCertificateUpdateListener;

/**
 * A node's live TLS material. One per process; every credential below is built from it, and
 * `update` swaps the material for all of them at once (renewal, CA rotation).
 */
export class TlsSource implements grpc.experimental.CertificateProvider {
  private material: TlsMaterial;
  private id: CertIdentity;
  private readonly caListeners = new Set<CaListener>();
  private readonly idListeners = new Set<IdListener>();
  private readonly changeListeners = new Set<(id: CertIdentity) => void>();

  constructor(material: TlsMaterial) {
    this.id = TlsSource.check(material);
    this.material = material;
  }

  /**
   * Refuses material grpc-js would fail on later (a server then drops every new connection): the
   * key must be the certificate's, and the certificate must come from a root in the bundle.
   */
  private static check(m: TlsMaterial): CertIdentity {
    const roots = splitPemBundle(m.trustPem);
    if (roots.length === 0) throw new FlotillaError('INVALID_ARGUMENT', 'tls: the trust bundle holds no certificate');
    const id = parseCertificate(m.certPem);
    let key;
    try {
      key = createPrivateKey(m.keyPem);
    } catch (err) {
      throw new FlotillaError('INVALID_ARGUMENT', `tls: not a PEM private key (${errorMessage(err)})`);
    }
    const cert = new X509Certificate(m.certPem);
    if (!cert.checkPrivateKey(key)) throw new FlotillaError('INVALID_ARGUMENT', `tls: the private key is not the key of node ${id.nodeId}'s certificate`);
    const issued = roots.some((pem) => {
      const root = new X509Certificate(pem);
      return cert.checkIssued(root) && cert.verify(root.publicKey);
    });
    if (!issued) throw new FlotillaError('INVALID_ARGUMENT', `tls: node ${id.nodeId}'s certificate is not signed by a root in the trust bundle`);
    return id;
  }

  /** Replaces some or all of the material; every server and client built from this source follows. */
  update(m: Partial<TlsMaterial>): void {
    const next = { ...this.material, ...m };
    this.id = TlsSource.check(next);
    this.material = next;
    const ca = { caCertificate: Buffer.from(next.trustPem) };
    const ident = { certificate: Buffer.from(next.certPem), privateKey: Buffer.from(next.keyPem) };
    for (const l of this.caListeners) l(ca);
    for (const l of this.idListeners) l(ident);
    for (const l of this.changeListeners) l(this.id);
  }

  get current(): Readonly<TlsMaterial> {
    return this.material;
  }

  /** What this node's own certificate says. */
  get identity(): CertIdentity {
    return this.id;
  }

  /** Called after each update (the renewal loop re-arms on it). Returns an unsubscribe. */
  onChange(fn: (id: CertIdentity) => void): () => void {
    this.changeListeners.add(fn);
    return () => this.changeListeners.delete(fn);
  }

  // grpc-js CertificateProvider. The current value is delivered on the next tick, as grpc-js's own
  // FileWatcherCertificateProvider does: its server registers the watcher after adding listeners.
  addCaCertificateListener(l: CaListener): void {
    this.caListeners.add(l);
    process.nextTick(() => {
      if (this.caListeners.has(l)) l({ caCertificate: Buffer.from(this.material.trustPem) });
    });
  }
  removeCaCertificateListener(l: CaListener): void {
    this.caListeners.delete(l);
  }
  addIdentityCertificateListener(l: IdListener): void {
    this.idListeners.add(l);
    process.nextTick(() => {
      if (this.idListeners.has(l)) l({ certificate: Buffer.from(this.material.certPem), privateKey: Buffer.from(this.material.keyPem) });
    });
  }
  removeIdentityCertificateListener(l: IdListener): void {
    this.idListeners.delete(l);
  }
}

/**
 * How a server treats clients without a valid certificate:
 *  - 'require': the TLS handshake fails without a certificate from the trusted roots (Raft-only
 *    listeners; any listener that serves no anonymous method);
 *  - 'optional': the handshake succeeds without one (as Swarm's VerifyClientCertIfGiven), and the
 *    authorizer answers UNAUTHENTICATED to every method not marked 'anonymous'. The listener that
 *    serves NodeCA (joins) must be 'optional', since a joining node has no certificate yet.
 *    Note: Node's TLS cannot fail the handshake only for a *bad* certificate while allowing none,
 *    so here a certificate from another CA is also let through the handshake and then refused
 *    per call (UNAUTHENTICATED), exactly like no certificate.
 */
export type ClientCertMode = 'require' | 'optional';

/**
 * What a server accepts client certificates from: the node's trust bundle plus extra roots that
 * only the server trusts (the join CAs of the current join tokens, manager/ca/join.ts). The node's
 * own clients never trust those. Follows updates of both.
 */
export class ServerTrust implements grpc.experimental.CertificateProvider {
  private extra = '';
  private readonly listeners = new Set<CaListener>();
  constructor(private readonly source: TlsSource) {
    source.onChange(() => this.emit());
  }
  /** Replaces the extra client roots (PEM bundle); new handshakes use them at once. */
  setExtra(pem: string): void {
    if (pem === this.extra) return;
    this.extra = pem;
    this.emit();
  }
  private value(): { caCertificate: Buffer } {
    return { caCertificate: Buffer.from(this.source.current.trustPem + this.extra) };
  }
  private emit(): void {
    for (const l of this.listeners) l(this.value());
  }
  addCaCertificateListener(l: CaListener): void {
    this.listeners.add(l);
    process.nextTick(() => {
      if (this.listeners.has(l)) l(this.value());
    });
  }
  removeCaCertificateListener(l: CaListener): void {
    this.listeners.delete(l);
  }
  addIdentityCertificateListener(l: IdListener): void {
    this.source.addIdentityCertificateListener(l);
  }
  removeIdentityCertificateListener(l: IdListener): void {
    this.source.removeIdentityCertificateListener(l);
  }
}

/** Server credentials for a gRPC server (control API on TCP, dispatcher, Raft, NodeCA). */
export function serverCredentials(source: TlsSource, clientCerts: ClientCertMode = 'require', trust: grpc.experimental.CertificateProvider = source): grpc.ServerCredentials {
  // grpc-js 1.14's createCertificateProviderServerCredentials(a, b) hands a to the constructor's
  // identity parameter and b to its CA parameter (swapped names): identity first, then CA.
  return grpc.experimental.createCertificateProviderServerCredentials(source, trust, clientCerts === 'require');
}

/** A TLS name that is never a host name: gRPC's SNI and default host check do not apply to us. */
export const TLS_SERVER_NAME = 'flotilla';

/**
 * Channel options every TLS client must pass (merge into the existing options): a fixed SNI, so
 * Node does not warn about IP addresses as server names; the peer check itself is ours.
 */
export const TLS_CHANNEL_OPTIONS: grpc.ChannelOptions = { 'grpc.ssl_target_name_override': TLS_SERVER_NAME };

export interface ServerCheck {
  /** roles the server may have (default: manager) */
  roles?: readonly Role[];
  /** the cluster id the server must belong to (default: the client's own) */
  clusterId?: string;
  /** a specific node id the server must be (a Raft peer by id), if known */
  nodeId?: string;
}

/** Checks the server's certificate: a node of our cluster with an expected role. */
export function checkPeerCertificate(cert: PeerCertificate, want: { roles: readonly Role[]; clusterId: string; nodeId?: string }): Error | undefined {
  let id: CertIdentity;
  try {
    id = identityFromPeer(cert);
  } catch (err) {
    return new Error(`tls: server certificate: ${errorMessage(err)}`);
  }
  if (id.clusterId !== want.clusterId) return new Error(`tls: server belongs to cluster ${id.clusterId}, not ${want.clusterId}`);
  if (!want.roles.includes(id.role)) return new Error(`tls: server ${id.nodeId} is a ${id.role}, expected ${want.roles.join(' or ')}`);
  if (want.nodeId && id.nodeId !== want.nodeId) return new Error(`tls: server is node ${id.nodeId}, expected ${want.nodeId}`);
  return undefined;
}

/** Client credentials with this node's certificate, checking the server is a manager of our cluster. */
export function clientCredentials(source: TlsSource, check: ServerCheck = {}): grpc.ChannelCredentials {
  const roles = check.roles ?? ['manager'];
  return grpc.experimental.createCertificateProviderChannelCredentials(source, source, {
    checkServerIdentity: (_host, cert) => checkPeerCertificate(cert, { roles, clusterId: check.clusterId ?? source.identity.clusterId, nodeId: check.nodeId }),
  });
}

/**
 * Client credentials from fixed PEM material (the CLI: --tlscacert/--tlscert/--tlskey). The
 * server must be a manager of the cluster the client certificate names.
 */
export function staticClientCredentials(m: TlsMaterial): grpc.ChannelCredentials {
  const clusterId = parseCertificate(m.certPem).clusterId;
  return grpc.credentials.createSsl(Buffer.from(m.trustPem), Buffer.from(m.keyPem), Buffer.from(m.certPem), {
    checkServerIdentity: (_host, cert) => checkPeerCertificate(cert, { roles: ['manager'], clusterId }),
  });
}

/**
 * For a joining node that has a trusted root (its digest checked against the token) but no
 * certificate yet: verifies the server is a manager under that root, presents no certificate.
 */
export function anonymousClientCredentials(trustPem: string, clusterId: string): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(Buffer.from(trustPem), null, null, {
    checkServerIdentity: (_host, cert) => checkPeerCertificate(cert, { roles: ['manager'], clusterId }),
  });
}

/**
 * Only for fetching the root CA before any trust exists: TLS without verifying the server. The
 * answer must be checked against the join token's digest (verifyCaAgainstToken) before use, and
 * nothing secret (the token) may be sent over such a channel.
 */
export function untrustedClientCredentials(client?: { certPem: string; keyPem: string }): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(null, client ? Buffer.from(client.keyPem) : null, client ? Buffer.from(client.certPem) : null, { rejectUnauthorized: false });
}

/**
 * A joining node's channel once it trusts the root (digest checked against the token): verifies
 * the server is a manager under that root, and presents the node's join certificate.
 */
export function joinerClientCredentials(trustPem: string, clusterId: string, client: { certPem: string; keyPem: string }): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(Buffer.from(trustPem), Buffer.from(client.keyPem), Buffer.from(client.certPem), {
    checkServerIdentity: (_host, cert) => checkPeerCertificate(cert, { roles: ['manager'], clusterId }),
  });
}
