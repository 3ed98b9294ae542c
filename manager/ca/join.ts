/**
 * Join certificates: how a node with no certificate yet passes a TLS listener that requires one.
 *
 * Each join token's secret deterministically derives a "join CA" key pair (HKDF-SHA256 over the
 * secret, reduced to a P-256 scalar). The manager puts a self-signed join CA certificate for each
 * current token into the trust bundle its TLS server accepts client certificates from (never into
 * what its clients trust). A joining node derives the same key and signs itself a short-lived
 * leaf (fresh key, OU=joiner) under that join CA's subject, and presents it. The authorizer treats
 * any certificate issued by a join CA as a 'joiner' (whatever its subject claims) and lets it call
 * only NodeCA's GetRootCA and IssueNodeCertificate; the join CA that signed it says the role.
 * The token's secret itself never crosses the wire; rotating a token replaces its join CA, so an
 * old token fails at the TLS handshake.
 */
import { createECDH, createHash, hkdfSync, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';
import { newSerial } from './x509.js';
import { parseToken } from './token.js';

x509.cryptoProvider.set(webcrypto as never);
const subtle = webcrypto.subtle;
const EC = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const SIGN = { name: 'ECDSA', hash: 'SHA-256' } as const;
/** order of the P-256 group */
const N = BigInt('0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551');
const JOINER_LIFE_MS = 10 * 60 * 1000;
const BACKDATE_MS = 5 * 60 * 1000;
/** the subject CN prefix of every join CA (the authorizer recognises joiners by their issuer) */
export const JOIN_CA_PREFIX = 'flotilla join CA ';
/** the OU of a joiner's leaf */
export const JOINER_OU = 'joiner';

export interface JoinCA {
  /** the join CA's subject CN: what a joiner leaf's issuer CN is */
  issuer: string;
  certPem: string;
}

interface Derived {
  keys: webcrypto.CryptoKeyPair;
  issuer: string;
}

const b64u = (b: Buffer): string => b.toString('base64url');

const derivedCache = new Map<string, Promise<Derived>>();

/** The join CA key pair and subject a token secret derives (the same on every node). */
function derive(secret: string): Promise<Derived> {
  let p = derivedCache.get(secret);
  if (!p) {
    p = (async () => {
      const okm = Buffer.from(hkdfSync('sha256', Buffer.from(secret, 'utf8'), Buffer.from('flotilla-join-ca-v1'), Buffer.from('p256 scalar'), 48));
      const d = (BigInt('0x' + okm.toString('hex')) % (N - 1n)) + 1n;
      const dBuf = Buffer.from(d.toString(16).padStart(64, '0'), 'hex');
      const ecdh = createECDH('prime256v1');
      ecdh.setPrivateKey(dBuf);
      const pub = ecdh.getPublicKey(); // 0x04 || X || Y
      const x = b64u(pub.subarray(1, 33));
      const y = b64u(pub.subarray(33, 65));
      const privateKey = await subtle.importKey('jwk', { kty: 'EC', crv: 'P-256', x, y, d: b64u(dBuf) }, EC, true, ['sign']);
      const publicKey = await subtle.importKey('jwk', { kty: 'EC', crv: 'P-256', x, y }, EC, true, ['verify']);
      const issuer = JOIN_CA_PREFIX + createHash('sha256').update(pub).digest('hex').slice(0, 32);
      return { keys: { privateKey, publicKey }, issuer };
    })();
    derivedCache.set(secret, p);
  }
  return p;
}

const caCache = new Map<string, Promise<JoinCA>>();

/** The join CA certificate of a token (the manager adds it to its server's client trust). */
export function joinCaFor(token: string): Promise<JoinCA> {
  const { secret } = parseToken(token);
  let p = caCache.get(secret);
  if (!p) {
    p = (async () => {
      const { keys, issuer } = await derive(secret);
      const now = Date.now();
      const cert = await x509.X509CertificateGenerator.createSelfSigned({
        serialNumber: newSerial(),
        name: [{ CN: [issuer] }],
        notBefore: new Date(now - BACKDATE_MS),
        notAfter: new Date(now + 20 * 365 * 24 * 3600 * 1000),
        signingAlgorithm: SIGN,
        keys,
        extensions: [
          new x509.BasicConstraintsExtension(true, 0, true),
          new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.digitalSignature, true),
          await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
        ],
      });
      return { issuer, certPem: cert.toString('pem') + '\n' };
    })();
    caCache.set(secret, p);
  }
  return p;
}

/** The derived join CA key pair and issuer CN of a token (tests: forging certificates under it). */
export async function joinCaKeys(token: string): Promise<{ keys: webcrypto.CryptoKeyPair; issuer: string }> {
  return derive(parseToken(token).secret);
}

/** The issuer CN a token's join CA has (cheap after the first call). */
export async function joinIssuerFor(token: string): Promise<string> {
  return (await derive(parseToken(token).secret)).issuer;
}

/** A joining node's short-lived client certificate, signed by the token's derived join CA. */
export async function joinerCertificate(token: string): Promise<{ certPem: string; keyPem: string }> {
  const { keys: ca, issuer } = await derive(parseToken(token).secret);
  const keys = (await subtle.generateKey(EC, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: newSerial(),
    subject: [{ CN: ['joining-node'] }, { OU: [JOINER_OU] }, { O: ['joining'] }],
    issuer: `CN=${issuer}`,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + JOINER_LIFE_MS),
    signingAlgorithm: SIGN,
    publicKey: keys.publicKey,
    signingKey: ca.privateKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth], false),
      await x509.AuthorityKeyIdentifierExtension.create(ca.publicKey),
    ],
  });
  const pkcs8 = Buffer.from(await subtle.exportKey('pkcs8', keys.privateKey)).toString('base64');
  const keyPem = `-----BEGIN PRIVATE KEY-----\n${pkcs8.replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END PRIVATE KEY-----\n`;
  return { certPem: cert.toString('pem') + '\n', keyPem };
}
