/**
 * The cluster's X.509 PKI: the root CA, node certificates issued from CSRs, and parsing of the
 * identity a certificate carries. ECDSA P-256 with SHA-256 throughout, on Node's WebCrypto through
 * @peculiar/x509.
 *
 * A node certificate's subject says who the node is, and nothing in a request body can override it:
 *   CN = node id, OU = role (manager | worker | admin), O = cluster id.
 * The CA, not the CSR, decides those three: a CSR only contributes its public key (and proves
 * possession of the private key by its signature).
 */
import { createHash, randomBytes, webcrypto, X509Certificate as NodeX509 } from 'node:crypto';
import { isIP } from 'node:net';
import type { PeerCertificate } from 'node:tls';
import * as x509 from '@peculiar/x509';

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;
import { FlotillaError } from '../../common/errors.js';

x509.cryptoProvider.set(webcrypto as never);
const subtle = webcrypto.subtle;

/**
 * 'joiner': a node's short-lived join certificate, signed by a join CA derived from a token
 * (manager/ca/join.ts); it can only fetch the root and ask for its node certificate.
 */
export type Role = 'manager' | 'worker' | 'admin' | 'joiner';
export const ROLES: readonly Role[] = ['manager', 'worker', 'admin', 'joiner'];

const EC = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const SIGN = { name: 'ECDSA', hash: 'SHA-256' } as const;

export const DAY_MS = 24 * 3600 * 1000;
/** Default node certificate lifetime (Swarm's default too). */
export const DEFAULT_CERT_EXPIRY_MS = 90 * DAY_MS;
/** Shortest accepted --cert-expiry: tests use minutes; below this renewal would thrash. */
export const MIN_CERT_EXPIRY_MS = 30 * 1000;
/** Root CA lifetime. */
export const ROOT_CA_EXPIRY_MS = 20 * 365 * DAY_MS;
/** Certificates start this much in the past, so a peer whose clock is a little behind accepts them. */
const BACKDATE_MS = 5 * 60 * 1000;

/** A PEM certificate with its PEM (PKCS#8) private key. */
export interface KeyPair {
  certPem: string;
  keyPem: string;
}

/** What a node certificate says about its holder. */
export interface CertIdentity {
  nodeId: string;
  role: Role;
  clusterId: string;
  /** hex serial, lowercase, no leading zeros */
  serial: string;
  notBefore: Date;
  notAfter: Date;
  /** the issuing root's CN (unique per root: see createRootCA) */
  issuer: string;
}

// ---------- PEM and keys ----------

function toPem(der: ArrayBuffer | Uint8Array, label: string): string {
  const b64 = Buffer.from(der instanceof Uint8Array ? der : new Uint8Array(der)).toString('base64');
  return `-----BEGIN ${label}-----\n${b64.replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END ${label}-----\n`;
}

/** The DER bytes of the first PEM block with this label. */
export function pemToDer(pem: string, label: string): Buffer {
  const m = new RegExp(`-----BEGIN ${label}-----([^-]+)-----END ${label}-----`).exec(pem);
  if (!m?.[1]) throw new FlotillaError('INVALID_ARGUMENT', `not a PEM ${label.toLowerCase()}`);
  return Buffer.from(m[1].replace(/\s+/g, ''), 'base64');
}

/** Every PEM certificate in a bundle (a trust bundle holds two roots during a CA rotation). */
export function splitPemBundle(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----\n?/g)?.map((s) => (s.endsWith('\n') ? s : s + '\n')) ?? [];
}

async function newKeys(): Promise<CryptoKeyPair> {
  return (await subtle.generateKey(EC, true, ['sign', 'verify'])) as CryptoKeyPair;
}

async function exportKeyPem(key: CryptoKey): Promise<string> {
  return toPem(await subtle.exportKey('pkcs8', key), 'PRIVATE KEY');
}

async function importSigningKey(keyPem: string): Promise<CryptoKey> {
  try {
    return await subtle.importKey('pkcs8', pemToDer(keyPem, 'PRIVATE KEY'), EC, false, ['sign']);
  } catch (err) {
    throw new FlotillaError('INVALID_ARGUMENT', 'not an ECDSA P-256 private key in PKCS#8 PEM', { cause: err });
  }
}

/** A positive random 128-bit serial, as lowercase hex without leading zeros. */
export function newSerial(): string {
  const b = randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x01; // positive, and 16 significant bytes
  return b.toString('hex');
}

/** sha256 of the certificate's DER, lowercase hex: what join tokens pin. */
export function caDigest(certPem: string): string {
  return createHash('sha256').update(pemToDer(certPem, 'CERTIFICATE')).digest('hex');
}

// ---------- the root CA ----------

/** Creates a self-signed root CA for a cluster. The key goes into the replicated store. */
export async function createRootCA(opts: { clusterId: string; expiryMs?: number; now?: Date }): Promise<KeyPair> {
  const now = opts.now ?? new Date();
  const keys = await newKeys();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: newSerial(),
    // a fresh CN per root, so the two roots present during a rotation never share a subject
    name: [{ CN: [`flotilla root CA ${randomBytes(4).toString('hex')}`] }, { O: [opts.clusterId] }],
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: new Date(now.getTime() + (opts.expiryMs ?? ROOT_CA_EXPIRY_MS)),
    signingAlgorithm: SIGN,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.digitalSignature, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certPem: cert.toString('pem') + '\n', keyPem: await exportKeyPem(keys.privateKey) };
}

export interface IssueRequest {
  /** PEM PKCS#10 request; only its public key is used, after its signature is checked */
  csrPem: string;
  nodeId: string;
  role: Role;
  /** manager addresses (host or host:port): IP or DNS subject alternative names */
  addresses?: string[];
  /** default DEFAULT_CERT_EXPIRY_MS */
  expiryMs?: number;
  now?: Date;
}

/** A loaded root CA that signs node certificates. */
export class RootCA {
  readonly clusterId: string;
  readonly digest: string;
  private constructor(
    readonly certPem: string,
    private readonly cert: x509.X509Certificate,
    private readonly key: CryptoKey,
  ) {
    this.digest = caDigest(certPem);
    this.clusterId = cert.subjectName.getField('O')[0] ?? '';
  }

  static async load(pair: KeyPair): Promise<RootCA> {
    let cert: x509.X509Certificate;
    try {
      cert = new x509.X509Certificate(pemToDer(pair.certPem, 'CERTIFICATE'));
    } catch (err) {
      throw new FlotillaError('INVALID_ARGUMENT', 'root CA: not a PEM certificate', { cause: err });
    }
    const key = await importSigningKey(pair.keyPem);
    // the key must be the certificate's: sign and verify a probe
    const probe = randomBytes(32);
    const sig = await subtle.sign(SIGN, key, probe);
    const pub = await cert.publicKey.export(EC, ['verify']);
    if (!(await subtle.verify(SIGN, pub, sig, probe))) throw new FlotillaError('INVALID_ARGUMENT', 'root CA: the private key does not match the certificate');
    return new RootCA(pair.certPem, cert, key);
  }

  get notAfter(): Date {
    return this.cert.notAfter;
  }

  /** Signs a node certificate for the public key in a CSR; the subject is the CA's decision. */
  async issue(req: IssueRequest): Promise<string> {
    if (!ROLES.includes(req.role) || req.role === 'joiner') throw new FlotillaError('INVALID_ARGUMENT', `invalid role ${JSON.stringify(req.role)}`);
    if (!/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$/.test(req.nodeId)) throw new FlotillaError('INVALID_ARGUMENT', `invalid node id ${JSON.stringify(req.nodeId)}`);
    const expiry = req.expiryMs ?? DEFAULT_CERT_EXPIRY_MS;
    if (!Number.isFinite(expiry) || expiry < MIN_CERT_EXPIRY_MS) {
      throw new FlotillaError('INVALID_ARGUMENT', `invalid certificate expiry ${expiry} ms: at least ${MIN_CERT_EXPIRY_MS / 1000} s`);
    }
    const csr = await verifyCsr(req.csrPem);
    const now = req.now ?? new Date();
    const notAfter = new Date(Math.min(now.getTime() + expiry, this.cert.notAfter.getTime()));
    const sans: x509.JsonGeneralName[] = [];
    for (const a of req.addresses ?? []) {
      const host = hostOf(a);
      if (!host) continue;
      sans.push({ type: isIP(host) ? 'ip' : 'dns', value: host });
    }
    const extensions: x509.Extension[] = [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
      // every node is both a TLS client and (managers) a server; admin certs are clients only
      new x509.ExtendedKeyUsageExtension(
        req.role === 'admin' ? [x509.ExtendedKeyUsage.clientAuth] : [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth],
        false,
      ),
      await x509.SubjectKeyIdentifierExtension.create(csr.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(this.cert.publicKey),
    ];
    if (sans.length > 0) extensions.push(new x509.SubjectAlternativeNameExtension(sans, false));
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: newSerial(),
      subject: [{ CN: [req.nodeId] }, { OU: [req.role] }, { O: [this.clusterId] }],
      issuer: this.cert.subjectName.toString(),
      // backdated for clock skew, but never by more than the lifetime: renewal (at 50-80% of the
      // validity period) must not fall before the issue time of a short-lived certificate
      notBefore: new Date(now.getTime() - Math.min(BACKDATE_MS, expiry)),
      notAfter,
      signingAlgorithm: SIGN,
      publicKey: csr.publicKey,
      signingKey: this.key,
      extensions,
    });
    return cert.toString('pem') + '\n';
  }

  /** Issues a certificate with a fresh key here (the manager's own first cert; admin client certs). */
  async issueWithNewKey(req: Omit<IssueRequest, 'csrPem'>): Promise<KeyPair> {
    const { keyPem, csrPem } = await createCsr(req.nodeId);
    return { certPem: await this.issue({ ...req, csrPem }), keyPem };
  }

  /** Whether a certificate was signed by this root (signature check only; no dates). */
  async signed(certPem: string): Promise<boolean> {
    try {
      const c = new x509.X509Certificate(pemToDer(certPem, 'CERTIFICATE'));
      return await c.verify({ publicKey: this.cert.publicKey, signatureOnly: true });
    } catch {
      return false;
    }
  }
}

function hostOf(addr: string): string {
  const a = addr.trim();
  if (a.startsWith('[')) return a.slice(1, a.indexOf(']'));
  if (isIP(a)) return a;
  const i = a.lastIndexOf(':');
  return i > 0 && /^\d+$/.test(a.slice(i + 1)) ? a.slice(0, i) : a;
}

// ---------- node side ----------

/** A fresh P-256 key and a CSR for it (the node keeps the key; the CSR goes to the CA). */
export async function createCsr(nodeId = 'flotilla-node'): Promise<{ keyPem: string; csrPem: string }> {
  const keys = await newKeys();
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({ name: [{ CN: [nodeId] }], keys, signingAlgorithm: SIGN });
  return { keyPem: await exportKeyPem(keys.privateKey), csrPem: csr.toString('pem') + '\n' };
}

/** Parses a CSR and checks its self-signature (proof that the requester holds the key). */
export async function verifyCsr(csrPem: string): Promise<x509.Pkcs10CertificateRequest> {
  let csr: x509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(pemToDer(csrPem, 'CERTIFICATE REQUEST'));
  } catch (err) {
    throw new FlotillaError('INVALID_ARGUMENT', 'csr: not a PEM certificate request', { cause: err });
  }
  const alg = csr.publicKey.algorithm as webcrypto.EcKeyAlgorithm;
  if (alg.name !== 'ECDSA' || alg.namedCurve !== 'P-256') throw new FlotillaError('INVALID_ARGUMENT', `csr: key must be ECDSA P-256, not ${alg.name} ${alg.namedCurve ?? ''}`.trim());
  let ok = false;
  try {
    ok = await csr.verify();
  } catch {
    ok = false;
  }
  if (!ok) throw new FlotillaError('INVALID_ARGUMENT', 'csr: bad signature');
  return csr;
}

// ---------- parsing identities ----------

function identityFrom(fields: { CN?: string; OU?: string; O?: string }, issuer: string, serial: string, notBefore: Date, notAfter: Date): CertIdentity {
  const role = fields.OU as Role | undefined;
  if (!fields.CN || !role || !ROLES.includes(role) || !fields.O) {
    throw new FlotillaError('PERMISSION_DENIED', 'certificate is not a flotilla node certificate (CN, OU=role, O=cluster)');
  }
  return { nodeId: fields.CN, role, clusterId: fields.O, serial: normSerial(serial), notBefore, notAfter, issuer };
}

function normSerial(s: string): string {
  return s.replace(/[^0-9a-fA-F]/g, '').toLowerCase().replace(/^0+(?=.)/, '');
}

function dnField(dn: string, key: string): string | undefined {
  // node's X509Certificate.subject: one "KEY=value" per line
  for (const line of dn.split('\n')) if (line.startsWith(`${key}=`)) return line.slice(key.length + 1);
  return undefined;
}

/** The identity in a PEM or DER certificate. */
export function parseCertificate(cert: string | Buffer): CertIdentity {
  let c: NodeX509;
  try {
    c = new NodeX509(cert);
  } catch (err) {
    throw new FlotillaError('INVALID_ARGUMENT', 'not a certificate', { cause: err });
  }
  return identityFrom({ CN: dnField(c.subject, 'CN'), OU: dnField(c.subject, 'OU'), O: dnField(c.subject, 'O') }, dnField(c.issuer, 'CN') ?? '', c.serialNumber, new Date(c.validFrom), new Date(c.validTo));
}

/** The identity in a TLS peer certificate (tls getPeerCertificate, grpc-js getAuthContext().sslPeerCertificate). */
export function identityFromPeer(peer: PeerCertificate): CertIdentity {
  const one = (v: string | string[] | undefined): string | undefined => (Array.isArray(v) ? v[0] : v);
  return identityFrom(
    { CN: one(peer.subject?.CN), OU: one(peer.subject?.OU), O: one(peer.subject?.O) },
    one(peer.issuer?.CN) ?? '',
    peer.serialNumber ?? '',
    new Date(peer.valid_from),
    new Date(peer.valid_to),
  );
}

/** The subject CNs of the roots in a trust bundle (for AuthzOptions.trustedIssuers). */
export function issuerNames(trustPem: string): string[] {
  return splitPemBundle(trustPem).map((pem) => dnField(new NodeX509(pem).subject, 'CN') ?? '');
}

/**
 * When to renew a certificate: a uniformly random point between 50% and 80% of its life
 * (so a cluster's nodes do not all renew at once). `rand` in [0,1) is for tests.
 */
export function renewalTime(id: Pick<CertIdentity, 'notBefore' | 'notAfter'>, rand: number = Math.random()): Date {
  const from = id.notBefore.getTime();
  const life = id.notAfter.getTime() - from;
  return new Date(from + life * (0.5 + 0.3 * Math.min(Math.max(rand, 0), 1)));
}
