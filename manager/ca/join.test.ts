/**
 * Join certificates on a real 'require' TLS listener: a certificate signed by a token's derived join
 * CA gets a joining node to NodeCA and nowhere else, whatever its subject claims; rotating the token
 * (replacing the join CA) makes the handshake fail.
 */
import { webcrypto } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import * as x509 from '@peculiar/x509';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NodeCAClient, NodeCAService } from '../../gen/flotilla/v1/ca.js';
import { JoinRaftResponse, LeaveRaftResponse, RaftClient, RaftService, type RaftServer } from '../../gen/flotilla/v1/raft.js';
import { RAFT_POLICY } from '../raft/transport.js';
import { type AuthzOptions, authorize } from './authz.js';
import { ServerTrust, TLS_CHANNEL_OPTIONS, TlsSource, serverCredentials } from './credentials.js';
import { joinCaFor, joinCaKeys, joinerCertificate } from './join.js';
import { type CaBackend, joinCluster, nodeCaHandlers } from './service.js';
import { formatToken, newTokenSecret } from './token.js';
import { RootCA, createRootCA, issuerNames, newSerial } from './x509.js';

let ca: RootCA;
let server: grpc.Server;
let addr = '';
let trust: ServerTrust;
let tokens: { worker: string; manager: string };
let joinIssuers = new Map<string, 'worker' | 'manager'>();
const admitted: string[] = [];

async function setTokens(t: { worker: string; manager: string }): Promise<void> {
  tokens = t;
  const [w, m] = await Promise.all([joinCaFor(t.worker), joinCaFor(t.manager)]);
  joinIssuers = new Map([
    [w.issuer, 'worker'],
    [m.issuer, 'manager'],
  ]);
  trust.setExtra(w.certPem + m.certPem);
}

function creds(m: { certPem: string; keyPem: string }): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(null, Buffer.from(m.keyPem), Buffer.from(m.certPem), { rejectUnauthorized: false });
}

function code(p: Promise<unknown>): Promise<number> {
  return p.then(
    () => grpc.status.OK,
    (err: grpc.ServiceError) => err.code,
  );
}

function propose(m: { certPem: string; keyPem: string }): Promise<unknown> {
  const c = new RaftClient(addr, creds(m), TLS_CHANNEL_OPTIONS);
  return new Promise((resolve, reject) => c.propose({ data: Buffer.from('x') }, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err, r) => (err ? reject(err) : resolve(r)))).finally(() => c.close());
}

function rootCa(m: { certPem: string; keyPem: string }): Promise<unknown> {
  const c = new NodeCAClient(addr, creds(m), TLS_CHANNEL_OPTIONS);
  return new Promise((resolve, reject) => c.getRootCa({}, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err, r) => (err ? reject(err) : resolve(r)))).finally(() => c.close());
}

beforeAll(async () => {
  ca = await RootCA.load(await createRootCA({ clusterId: 'c1' }));
  const mgr = new TlsSource({ trustPem: ca.certPem, ...(await ca.issueWithNewKey({ nodeId: 'mgr1', role: 'manager', addresses: ['127.0.0.1'] })) });
  trust = new ServerTrust(mgr);
  await setTokens({ worker: formatToken(ca.certPem, newTokenSecret()), manager: formatToken(ca.certPem, newTokenSecret()) });
  const authz: AuthzOptions = { clusterId: 'c1', trustedIssuers: () => issuerNames(mgr.current.trustPem), joinIssuers: () => joinIssuers };
  const backend: CaBackend = {
    signingCA: async () => ca,
    trustBundle: () => ca.certPem,
    joinTokens: () => tokens,
    certExpiryMs: () => 3600_000,
    admitNode: async (role) => {
      const id = `n${admitted.length}aaaaaaaaaaaaaaaaaaaaaaa`.slice(0, 25);
      admitted.push(`${id}:${role}`);
      return id;
    },
    nodeRole: () => 'worker',
  };
  const raft: RaftServer = {
    stream: (_c, cb) => cb(null, {}),
    join: (_c, cb) => cb(null, JoinRaftResponse.fromPartial({})),
    propose: (_c, cb) => cb(null, {}),
    readIndex: (_c, cb) => cb(null, { index: 1 }),
    leave: (_c, cb) => cb(null, LeaveRaftResponse.fromPartial({})),
  };
  server = new grpc.Server();
  server.addService(NodeCAService, nodeCaHandlers(backend, authz));
  server.addService(RaftService, authorize(RaftService, raft, RAFT_POLICY, authz));
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', serverCredentials(mgr, 'require', trust), (e, p) => (e ? reject(e) : resolve(p))));
  addr = `127.0.0.1:${port}`;
});

afterAll(() => server?.forceShutdown());

describe('join certificates', () => {
  it('a token derives the same join CA every time, and different tokens different ones', async () => {
    const a = await joinCaKeys(tokens.worker);
    const b = await joinCaKeys(tokens.worker);
    expect(a.issuer).toBe(b.issuer);
    expect((await joinCaKeys(tokens.manager)).issuer).not.toBe(a.issuer);
  });

  it('a join certificate reaches NodeCA and gets a node certificate with the token\'s role, without sending the token', async () => {
    const res = await joinCluster(addr, tokens.manager);
    expect(res.role).toBe('manager');
    expect(admitted.at(-1)).toBe(`${res.nodeId}:manager`);
    expect((await joinCluster(addr, tokens.worker)).role).toBe('worker');
  });

  it('a join certificate is refused by every other service, even one whose subject claims OU=manager', async () => {
    expect(await code(rootCa(await joinerCertificate(tokens.manager)))).toBe(grpc.status.OK);
    expect(await code(propose(await joinerCertificate(tokens.manager)))).toBe(grpc.status.PERMISSION_DENIED);
    // a token holder signs itself a "manager" certificate under the join CA
    const { keys: jca, issuer } = await joinCaKeys(tokens.manager);
    const keys = (await webcrypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
    const forged = await x509.X509CertificateGenerator.create({
      serialNumber: newSerial(),
      subject: 'CN=mgr1, OU=manager, O=c1',
      issuer: `CN=${issuer}`,
      notBefore: new Date(Date.now() - 60_000),
      notAfter: new Date(Date.now() + 600_000),
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      publicKey: keys.publicKey,
      signingKey: jca.privateKey,
      extensions: [await x509.AuthorityKeyIdentifierExtension.create(jca.publicKey)],
    });
    const pk = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)).toString('base64');
    const keyPem = `-----BEGIN PRIVATE KEY-----\n${pk.replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END PRIVATE KEY-----\n`;
    expect(await code(propose({ certPem: forged.toString('pem'), keyPem }))).toBe(grpc.status.PERMISSION_DENIED);
  });

  it('after a token rotation the old token\'s join certificate fails the handshake; the new one works', async () => {
    const old = tokens.worker;
    await setTokens({ ...tokens, worker: formatToken(ca.certPem, newTokenSecret()) });
    expect(await code(rootCa(await joinerCertificate(old)))).toBe(grpc.status.UNAVAILABLE);
    await expect(joinCluster(addr, old)).rejects.toThrow(/refused this node's join certificate at the TLS handshake/);
    expect((await joinCluster(addr, tokens.worker)).role).toBe('worker');
  });
});
