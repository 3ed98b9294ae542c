/**
 * The cluster-level PKI state (ClusterCA, kept in the store) and its transitions: bootstrap on the
 * first manager's first start, the trust bundle, CA rotation and token rotation. Pure functions of
 * the stored state, so the manager applies each result in one store transaction.
 */
import type { ClusterCA } from '../../gen/flotilla/v1/ca.js';
import type { TlsMaterial } from './credentials.js';
import { formatToken, newTokenSecret, parseToken } from './token.js';
import { DEFAULT_CERT_EXPIRY_MS, RootCA, createRootCA, issuerNames } from './x509.js';

export interface JoinTokens {
  worker: string;
  manager: string;
}

export interface Bootstrap {
  /** goes into the store with the new Cluster object */
  ca: ClusterCA;
  tokens: JoinTokens;
  /** this manager's own certificate: saved with saveNodeTls, fed to a TlsSource */
  node: TlsMaterial;
}

/**
 * A new cluster's CA, join tokens and the first manager's certificate. Runs before Raft and the
 * TLS listener start (they need the certificate); the manager writes `ca` and `tokens` into the
 * store when it creates the Cluster object.
 */
export async function bootstrapCluster(opts: { clusterId: string; nodeId: string; addresses: string[]; certExpiryMs?: number }): Promise<Bootstrap> {
  const root = await createRootCA({ clusterId: opts.clusterId });
  const ca: ClusterCA = { rootCertPem: root.certPem, rootKeyPem: root.keyPem, previousRootCertPem: '', nodeCertExpiryMs: opts.certExpiryMs ?? 0 };
  const signer = await signingCA(ca);
  const pair = await signer.issueWithNewKey({ nodeId: opts.nodeId, role: 'manager', addresses: opts.addresses, expiryMs: certExpiryMs(ca) });
  return {
    ca,
    tokens: { worker: formatToken(root.certPem, newTokenSecret()), manager: formatToken(root.certPem, newTokenSecret()) },
    node: { trustPem: trustBundle(ca), ...pair },
  };
}

/** The roots every node must trust now: the signing root, and the previous one during a rotation. */
export function trustBundle(ca: ClusterCA): string {
  return ca.rootCertPem + (ca.previousRootCertPem || '');
}

export function certExpiryMs(ca: ClusterCA): number {
  return ca.nodeCertExpiryMs || DEFAULT_CERT_EXPIRY_MS;
}

const loaded = new Map<string, Promise<RootCA>>();

/** The signing CA for the stored state (loaded once per root). */
export function signingCA(ca: ClusterCA): Promise<RootCA> {
  let p = loaded.get(ca.rootCertPem);
  if (!p) {
    p = RootCA.load({ certPem: ca.rootCertPem, keyPem: ca.rootKeyPem });
    p.catch(() => loaded.delete(ca.rootCertPem));
    loaded.set(ca.rootCertPem, p);
  }
  return p;
}

/**
 * Phase 1 of `cluster ca --rotate`: a new signing root; the old one stays trusted. Tokens keep their
 * secrets but carry the new root's digest (a node joining with an old token would see a digest
 * mismatch, so the old tokens stop working for joins, as in Swarm). Refused while a rotation is
 * still in progress.
 */
export async function startCaRotation(ca: ClusterCA, tokens: JoinTokens, clusterId: string): Promise<{ ca: ClusterCA; tokens: JoinTokens }> {
  if (ca.previousRootCertPem) throw new Error('a CA rotation is already in progress');
  const root = await createRootCA({ clusterId });
  return {
    ca: { ...ca, rootCertPem: root.certPem, rootKeyPem: root.keyPem, previousRootCertPem: ca.rootCertPem },
    tokens: { worker: formatToken(root.certPem, parseToken(tokens.worker).secret), manager: formatToken(root.certPem, parseToken(tokens.manager).secret) },
  };
}

/** Phase 3: every node holds a certificate from the new root; stop trusting the old one. */
export function finishCaRotation(ca: ClusterCA): ClusterCA {
  return { ...ca, previousRootCertPem: '' };
}

/** Where a CA rotation stands: the nodes whose certificate is not from the signing root yet. */
export function caRotationStatus(ca: ClusterCA, nodes: ReadonlyArray<{ id: string; certificateIssuer: string }>): { inProgress: boolean; root: string; pendingNodes: string[]; nodes: number } {
  const root = issuerNames(ca.rootCertPem)[0] ?? '';
  return { inProgress: !!ca.previousRootCertPem, root, pendingNodes: nodes.filter((n) => n.certificateIssuer !== root).map((n) => n.id), nodes: nodes.length };
}

/** `cluster join-token --rotate worker|manager`: a new secret for one role. */
export function rotateToken(ca: ClusterCA, tokens: JoinTokens, role: 'worker' | 'manager'): JoinTokens {
  return { ...tokens, [role]: formatToken(ca.rootCertPem, newTokenSecret()) };
}
