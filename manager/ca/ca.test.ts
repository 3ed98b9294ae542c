import { X509Certificate } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { FlotillaError } from '../../common/errors.js';
import { bootstrapCluster, certExpiryMs, finishCaRotation, rotateToken, signingCA, startCaRotation, trustBundle } from './cluster.js';
import { TlsSource } from './credentials.js';
import { runRenewal } from './service.js';
import { formatToken, newTokenSecret, parseToken, redactToken, tokenMatches, verifyCaAgainstToken } from './token.js';
import { DAY_MS, RootCA, caDigest, createCsr, createRootCA, parseCertificate, renewalTime, verifyCsr } from './x509.js';

describe('root CA', () => {
  it('is a self-signed, long-lived P-256 CA naming the cluster', async () => {
    const pair = await createRootCA({ clusterId: 'cluster1' });
    const c = new X509Certificate(pair.certPem);
    expect(c.ca).toBe(true);
    expect(c.verify(c.publicKey)).toBe(true);
    expect(c.checkIssued(c)).toBe(true);
    expect(c.publicKey.asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
    expect(c.subject).toContain('O=cluster1');
    const years = (new Date(c.validTo).getTime() - Date.now()) / (365 * DAY_MS);
    expect(years).toBeGreaterThan(19.9);
    expect(pair.keyPem).toContain('BEGIN PRIVATE KEY');
    const ca = await RootCA.load(pair);
    expect(ca.clusterId).toBe('cluster1');
    expect(ca.digest).toBe(caDigest(pair.certPem));
    expect(ca.digest).toMatch(/^[0-9a-f]{64}$/);
  });

  it('refuses a key that is not the certificate\'s', async () => {
    const a = await createRootCA({ clusterId: 'c' });
    const b = await createRootCA({ clusterId: 'c' });
    await expect(RootCA.load({ certPem: a.certPem, keyPem: b.keyPem })).rejects.toThrow(/does not match/);
  });
});

describe('node certificates', () => {
  it('are issued from a CSR with the CA\'s choice of id, role, cluster, SANs and a 90-day default life', async () => {
    const ca = await RootCA.load(await createRootCA({ clusterId: 'cl-9' }));
    const { keyPem, csrPem } = await createCsr('whatever-the-node-asks');
    const certPem = await ca.issue({ csrPem, nodeId: 'node1', role: 'manager', addresses: ['10.0.0.5:4242', 'mgr.example:4242', '[fd00::1]:4242'] });
    const c = new X509Certificate(certPem);
    const root = new X509Certificate(ca.certPem);
    expect(c.verify(root.publicKey)).toBe(true);
    expect(c.checkIssued(root)).toBe(true);
    expect(c.checkPrivateKey((await import('node:crypto')).createPrivateKey(keyPem))).toBe(true);
    expect(c.ca).toBe(false);
    expect(c.subjectAltName).toContain('IP Address:10.0.0.5');
    expect(c.subjectAltName).toContain('DNS:mgr.example');
    expect(c.subjectAltName).toContain('IP Address:FD00:0:0:0:0:0:0:1');
    expect(c.keyUsage).toEqual(expect.arrayContaining(['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2']));
    const id = parseCertificate(certPem);
    expect(id).toMatchObject({ nodeId: 'node1', role: 'manager', clusterId: 'cl-9' });
    const days = (id.notAfter.getTime() - Date.now()) / DAY_MS;
    expect(days).toBeGreaterThan(89.9);
    expect(days).toBeLessThanOrEqual(90);
    expect(id.serial).toBe(c.serialNumber.toLowerCase().replace(/^0+/, ''));
    // serials differ
    const again = parseCertificate(await ca.issue({ csrPem, nodeId: 'node1', role: 'manager' }));
    expect(again.serial).not.toBe(id.serial);
  });

  it('takes a configured expiry and refuses a too short one', async () => {
    const ca = await RootCA.load(await createRootCA({ clusterId: 'c' }));
    const { csrPem } = await createCsr();
    const id = parseCertificate(await ca.issue({ csrPem, nodeId: 'w1', role: 'worker', expiryMs: 5 * 60_000 }));
    expect(id.notAfter.getTime() - Date.now()).toBeGreaterThan(4.9 * 60_000);
    expect(id.notAfter.getTime() - Date.now()).toBeLessThanOrEqual(5 * 60_000);
    await expect(ca.issue({ csrPem, nodeId: 'w1', role: 'worker', expiryMs: 1000 })).rejects.toThrow(/invalid certificate expiry/);
    await expect(ca.issue({ csrPem, nodeId: 'w1', role: 'root' as never })).rejects.toThrow(/invalid role/);
    await expect(ca.issue({ csrPem, nodeId: 'bad id/..', role: 'worker' })).rejects.toThrow(/invalid node id/);
  });

  it('refuses a CSR whose signature does not verify (the requester must hold the key)', async () => {
    const { csrPem } = await createCsr('n');
    await expect(verifyCsr(csrPem)).resolves.toBeDefined();
    // flip one bit in the signature (the last bytes of the DER)
    const b64 = csrPem.replace(/-----[A-Z ]+-----/g, '').replace(/\s+/g, '');
    const der = Buffer.from(b64, 'base64');
    der[der.length - 3]! ^= 0x01;
    const bad = `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString('base64')}\n-----END CERTIFICATE REQUEST-----\n`;
    await expect(verifyCsr(bad)).rejects.toThrow(/csr: bad signature/);
    await expect(verifyCsr('hello')).rejects.toThrow(/not a PEM certificate request/);
  });

  it('certificates from another CA do not verify against this one', async () => {
    const a = await RootCA.load(await createRootCA({ clusterId: 'c' }));
    const b = await RootCA.load(await createRootCA({ clusterId: 'c' }));
    const { csrPem } = await createCsr();
    const fromB = await b.issue({ csrPem, nodeId: 'n', role: 'worker' });
    expect(await a.signed(fromB)).toBe(false);
    expect(await b.signed(fromB)).toBe(true);
  });
});

describe('join tokens', () => {
  it('carry the CA digest and a secret; parse and compare', async () => {
    const root = await createRootCA({ clusterId: 'c' });
    const secret = newTokenSecret();
    expect(secret).toMatch(/^[0-9a-z]{32}$/);
    const token = formatToken(root.certPem, secret);
    expect(token).toMatch(/^FLTKN-1-[0-9a-f]{64}-[0-9a-z]{32}$/);
    expect(parseToken(token)).toEqual({ caDigest: caDigest(root.certPem), secret });
    expect(tokenMatches(token, token)).toBe(true);
    expect(tokenMatches(formatToken(root.certPem, newTokenSecret()), token)).toBe(false);
    expect(tokenMatches(token.slice(0, -1), token)).toBe(false);
    expect(redactToken(token)).not.toContain(secret);
    expect(() => verifyCaAgainstToken(token, root.certPem)).not.toThrow();
  });

  it('with the wrong CA digest are refused with a clear message', async () => {
    const mine = await createRootCA({ clusterId: 'c' });
    const theirs = await createRootCA({ clusterId: 'c' });
    const token = formatToken(mine.certPem, newTokenSecret());
    let err: unknown;
    try {
      verifyCaAgainstToken(token, theirs.certPem);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(FlotillaError);
    expect((err as FlotillaError).code).toBe('PERMISSION_DENIED');
    expect((err as Error).message).toMatch(/does not match the join token's CA digest.*man in the middle/);
  });

  it('that are malformed say what is wrong without echoing the secret', () => {
    expect(() => parseToken('SWMTKN-1-abc-def')).toThrow(/must start with FLTKN-1-/);
    expect(() => parseToken('FLTKN-2-abc-def')).toThrow(/unsupported token version "2"/);
    expect(() => parseToken(`FLTKN-1-${'a'.repeat(63)}-verysecretvalue`)).toThrow(/expected FLTKN-1-<64 hex CA digest>/);
    try {
      parseToken(`FLTKN-1-${'a'.repeat(63)}-verysecretvalue`);
    } catch (e) {
      expect((e as Error).message).not.toContain('verysecretvalue');
    }
  });
});

describe('renewal timing', () => {
  it('is a random point between 50% and 80% of the certificate life', () => {
    const notBefore = new Date('2026-01-01T00:00:00Z');
    const notAfter = new Date(notBefore.getTime() + 100_000);
    expect(renewalTime({ notBefore, notAfter }, 0).getTime() - notBefore.getTime()).toBe(50_000);
    expect(renewalTime({ notBefore, notAfter }, 0.999999).getTime() - notBefore.getTime()).toBeCloseTo(80_000, -1);
    const seen: number[] = [];
    for (let i = 0; i < 2000; i++) {
      const t = renewalTime({ notBefore, notAfter }).getTime() - notBefore.getTime();
      expect(t).toBeGreaterThanOrEqual(50_000);
      expect(t).toBeLessThanOrEqual(80_000);
      seen.push(t);
    }
    // spread over the window, not a constant
    expect(Math.min(...seen)).toBeLessThan(53_000);
    expect(Math.max(...seen)).toBeGreaterThan(77_000);
  });

  it('the renewal loop renews when due, then re-arms on the new certificate', async () => {
    const ca = await RootCA.load(await createRootCA({ clusterId: 'c' }));
    // a certificate issued an hour ago for 70 minutes: its renewal window is already past
    const old = await ca.issueWithNewKey({ nodeId: 'n1', role: 'worker', expiryMs: 70 * 60_000, now: new Date(Date.now() - 3600_000) });
    const source = new TlsSource({ trustPem: ca.certPem, ...old });
    let renewals = 0;
    const ac = new AbortController();
    const loop = runRenewal(
      source,
      async () => {
        renewals++;
        source.update(await ca.issueWithNewKey({ nodeId: 'n1', role: 'worker', expiryMs: 70 * 60_000 }));
      },
      ac.signal,
    );
    try {
      const deadline = Date.now() + 5000;
      while (renewals === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      expect(renewals).toBe(1);
      await new Promise((r) => setTimeout(r, 300));
      expect(renewals).toBe(1); // the fresh certificate is not due for 35+ minutes
      expect(source.identity.notAfter.getTime()).toBeGreaterThan(Date.now() + 60 * 60_000);
    } finally {
      ac.abort();
      await loop;
    }
  });
});

describe('cluster PKI state', () => {
  it('bootstraps a CA, tokens pinning it, and the first manager\'s certificate', async () => {
    const b = await bootstrapCluster({ clusterId: 'cid', nodeId: 'm1', addresses: ['10.1.2.3:4242'] });
    const id = parseCertificate(b.node.certPem);
    expect(id).toMatchObject({ nodeId: 'm1', role: 'manager', clusterId: 'cid' });
    expect(await (await signingCA(b.ca)).signed(b.node.certPem)).toBe(true);
    expect(() => verifyCaAgainstToken(b.tokens.worker, b.ca.rootCertPem)).not.toThrow();
    expect(b.tokens.worker).not.toBe(b.tokens.manager);
    expect(trustBundle(b.ca)).toBe(b.ca.rootCertPem);
    expect(certExpiryMs(b.ca)).toBe(90 * DAY_MS);
    const r = rotateToken(b.ca, b.tokens, 'worker');
    expect(r.manager).toBe(b.tokens.manager);
    expect(r.worker).not.toBe(b.tokens.worker);
  });

  it('a CA rotation trusts both roots until finished, and re-pins the tokens to the new root', async () => {
    const b = await bootstrapCluster({ clusterId: 'cid', nodeId: 'm1', addresses: [] });
    const { ca, tokens } = await startCaRotation(b.ca, b.tokens, 'cid');
    expect(ca.previousRootCertPem).toBe(b.ca.rootCertPem);
    expect(trustBundle(ca)).toBe(ca.rootCertPem + b.ca.rootCertPem);
    expect(parseToken(tokens.worker).secret).toBe(parseToken(b.tokens.worker).secret);
    expect(() => verifyCaAgainstToken(tokens.worker, ca.rootCertPem)).not.toThrow();
    expect(() => verifyCaAgainstToken(b.tokens.worker, ca.rootCertPem)).toThrow(/does not match/);
    await expect(startCaRotation(ca, tokens, 'cid')).rejects.toThrow(/already in progress/);
    expect(trustBundle(finishCaRotation(ca))).toBe(ca.rootCertPem);
    const signer = await signingCA(ca);
    const { csrPem } = await createCsr();
    expect(await signer.signed(await signer.issue({ csrPem, nodeId: 'x', role: 'worker' }))).toBe(true);
    expect(signer.certPem).toBe(ca.rootCertPem);
  });
});

describe('TlsSource', () => {
  it('refuses material grpc-js would choke on, and keeps the old material', async () => {
    const ca = await RootCA.load(await createRootCA({ clusterId: 'c' }));
    const other = await RootCA.load(await createRootCA({ clusterId: 'c' }));
    const a = await ca.issueWithNewKey({ nodeId: 'n1', role: 'worker' });
    const b = await ca.issueWithNewKey({ nodeId: 'n1', role: 'worker' });
    const alien = await other.issueWithNewKey({ nodeId: 'n1', role: 'worker' });
    const source = new TlsSource({ trustPem: ca.certPem, ...a });
    expect(() => source.update({ keyPem: b.keyPem })).toThrow(/private key is not the key of node n1's certificate/);
    expect(() => source.update(alien)).toThrow(/not signed by a root in the trust bundle/);
    expect(() => source.update({ trustPem: other.certPem })).toThrow(/not signed by a root in the trust bundle/);
    expect(source.current.certPem).toBe(a.certPem);
    source.update({ trustPem: other.certPem + ca.certPem, ...b });
    expect(source.current.keyPem).toBe(b.keyPem);
  });
});
