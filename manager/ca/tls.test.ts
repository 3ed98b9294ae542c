/**
 * Real TLS, real grpc-js servers and clients on loopback: mutual TLS, the authorizer, joins,
 * revocation and certificate hot-swap.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient, ControlService, type ControlServer, type LogLine } from '../../gen/flotilla/v1/control.js';
import { NodeCAClient, NodeCAService } from '../../gen/flotilla/v1/ca.js';
import { JoinRaftResponse, LeaveRaftResponse, RaftClient, type RaftEnvelope, RaftService, type RaftServer } from '../../gen/flotilla/v1/raft.js';
import { newId } from '../../common/ids.js';
import { type AuthzOptions, type Policy, RevocationList, authorize, callerOf, peerIdentityStats } from './authz.js';
import { TLS_CHANNEL_OPTIONS, TlsSource, clientCredentials, serverCredentials, staticClientCredentials, untrustedClientCredentials } from './credentials.js';
import { type CaBackend, joinCluster, nodeCaHandlers, renewCertificate } from './service.js';
import { formatToken, newTokenSecret } from './token.js';
import { type KeyPair, type Role, RootCA, createRootCA, issuerNames, parseCertificate } from './x509.js';
import { NODE_TLS_FILE, loadNodeTls, readClientTls, saveNodeTls, writeClientTlsDir } from './certstore.js';

const RAFT_POLICY: Policy<RaftServer> = { stream: ['manager'], join: ['manager'], propose: ['manager'], readIndex: ['manager'], leave: ['manager'] };
const LOGS_POLICY: Policy<Pick<ControlServer, 'serviceLogs'>> = { serviceLogs: ['admin', 'manager'] };

interface Fixture {
  ca: RootCA;
  foreign: RootCA;
  mgr: TlsSource;
  revocations: RevocationList;
  authz: AuthzOptions & { nowOffset: number };
  tokens: { worker: string; manager: string };
  admitted: string[];
  handled: { propose: string[]; envelopes: number };
  servers: grpc.Server[];
  optionalAddr: string;
  requireAddr: string;
}

let f: Fixture;

async function material(ca: RootCA, nodeId: string, role: Role, expiryMs?: number): Promise<KeyPair & { trustPem: string }> {
  return { trustPem: ca.certPem, ...(await ca.issueWithNewKey({ nodeId, role, addresses: ['127.0.0.1'], expiryMs })) };
}

function raftHandlers(handled: Fixture['handled']): RaftServer {
  return {
    stream: (call, cb) => {
      call.on('data', (_e: RaftEnvelope) => handled.envelopes++);
      call.on('end', () => cb(null, {}));
    },
    join: (_c, cb) => cb(null, JoinRaftResponse.fromPartial({})),
    propose: (call, cb) => {
      handled.propose.push(callerOf(call)?.identity?.serial ?? '?');
      cb(null, {});
    },
    readIndex: (_c, cb) => cb(null, { index: 7 }),
    leave: (_c, cb) => cb(null, LeaveRaftResponse.fromPartial({})),
  };
}

function listen(server: grpc.Server, creds: grpc.ServerCredentials): Promise<string> {
  return new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0', creds, (err, port) => (err ? reject(err) : resolve(`127.0.0.1:${port}`))));
}

function propose(addr: string, creds: grpc.ChannelCredentials): Promise<void> {
  const c = new RaftClient(addr, creds, TLS_CHANNEL_OPTIONS);
  return new Promise<void>((resolve, reject) => {
    c.propose({ data: Buffer.from('x') }, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err) => (err ? reject(err) : resolve()));
  }).finally(() => c.close());
}

/** A client with another cluster's certificate that trusts our CA and does not check the server. */
function alienCredentials(m: KeyPair): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(Buffer.from(f.ca.certPem), Buffer.from(m.keyPem), Buffer.from(m.certPem), { checkServerIdentity: () => undefined });
}

async function codeOf(p: Promise<unknown>): Promise<{ code: number; details: string }> {
  try {
    await p;
  } catch (e) {
    const err = e as grpc.ServiceError;
    return { code: err.code, details: err.details };
  }
  return { code: grpc.status.OK, details: '' };
}

beforeAll(async () => {
  const ca = await RootCA.load(await createRootCA({ clusterId: 'c1' }));
  const foreign = await RootCA.load(await createRootCA({ clusterId: 'c2' }));
  const mgr = new TlsSource(await material(ca, 'mgr1', 'manager'));
  const revocations = new RevocationList();
  const authz = { clusterId: 'c1', revocations, nowOffset: 0, now: () => Date.now() + f.authz.nowOffset };
  const tokens = { worker: formatToken(ca.certPem, newTokenSecret()), manager: formatToken(ca.certPem, newTokenSecret()) };
  const admitted: string[] = [];
  const handled = { propose: [] as string[], envelopes: 0 };
  const backend: CaBackend = {
    signingCA: () => Promise.resolve(ca),
    trustBundle: () => ca.certPem,
    joinTokens: () => f.tokens,
    certExpiryMs: () => 90 * 24 * 3600_000,
    admitNode: (role) => {
      const id = newId();
      admitted.push(`${id}:${role}`);
      return Promise.resolve(id);
    },
    nodeRole: (id) => (id === 'mgr1' || admitted.includes(`${id}:manager`) ? 'manager' : admitted.includes(`${id}:worker`) || id.startsWith('w') ? 'worker' : undefined),
  };
  const logs: Pick<ControlServer, 'serviceLogs'> = {
    serviceLogs: (call) => {
      const line: LogLine = { taskId: 't', nodeId: callerOf(call)?.identity?.nodeId ?? '', slot: 1, stream: 'stdout', timestamp: 0, line: 'hello' };
      call.write(line);
      call.end();
    },
  };
  // one listener that lets certificate-less clients through to anonymous methods (joins), one that requires a certificate
  const optional = new grpc.Server();
  optional.addService(NodeCAService, nodeCaHandlers(backend, authz));
  optional.addService(RaftService, authorize(RaftService, raftHandlers(handled), RAFT_POLICY, authz));
  optional.addService(ControlService, authorize(ControlService, logs, LOGS_POLICY, authz) as unknown as grpc.UntypedServiceImplementation);
  const required = new grpc.Server();
  required.addService(RaftService, authorize(RaftService, raftHandlers(handled), RAFT_POLICY, authz));
  f = {
    ca, foreign, mgr, revocations, authz, tokens, admitted, handled,
    servers: [optional, required],
    optionalAddr: await listen(optional, serverCredentials(mgr, 'optional')),
    requireAddr: await listen(required, serverCredentials(mgr, 'require')),
  };
}, 30_000);

afterAll(() => {
  for (const s of f?.servers ?? []) s.forceShutdown();
});

describe('mutual TLS and roles', () => {
  it('a manager certificate reaches Raft; a worker certificate gets PERMISSION_DENIED and the handler never runs', async () => {
    const manager = new TlsSource(await material(f.ca, 'mgr2', 'manager'));
    const worker = new TlsSource(await material(f.ca, 'w1', 'worker'));
    for (const addr of [f.optionalAddr, f.requireAddr]) {
      const before = f.handled.propose.length;
      await propose(addr, clientCredentials(manager));
      expect(f.handled.propose.length).toBe(before + 1);
      const r = await codeOf(propose(addr, clientCredentials(worker)));
      expect(r.code).toBe(grpc.status.PERMISSION_DENIED);
      expect(r.details).toMatch(/Propose: needs a manager certificate; node w1 has a worker certificate/);
      expect(f.handled.propose.length).toBe(before + 1);
    }
  });

  it('a client-streaming Raft call from a worker is refused; from a manager it delivers', async () => {
    const run = async (src: TlsSource): Promise<{ code: number; details: string }> => {
      const c = new RaftClient(f.requireAddr, clientCredentials(src), TLS_CHANNEL_OPTIONS);
      try {
        return await codeOf(
          new Promise<void>((resolve, reject) => {
            const s = c.stream((err) => (err ? reject(err) : resolve()));
            s.write({ message: undefined, chunk: undefined });
            s.end();
          }),
        );
      } finally {
        c.close();
      }
    };
    const before = f.handled.envelopes;
    expect((await run(new TlsSource(await material(f.ca, 'w2', 'worker')))).code).toBe(grpc.status.PERMISSION_DENIED);
    expect(f.handled.envelopes).toBe(before);
    expect((await run(f.mgr)).code).toBe(grpc.status.OK);
    expect(f.handled.envelopes).toBe(before + 1);
  });

  it('a server-streaming call is refused to a worker and served to an admin certificate (CLI credentials)', async () => {
    const read = async (creds: grpc.ChannelCredentials): Promise<{ code: number; lines: LogLine[] }> => {
      const c = new ControlClient(f.optionalAddr, creds, TLS_CHANNEL_OPTIONS);
      const lines: LogLine[] = [];
      try {
        const r = await codeOf(
          new Promise<void>((resolve, reject) => {
            const s = c.serviceLogs({ serviceId: 's', follow: false, tail: 0, taskId: '', sinceMs: 0 });
            s.on('data', (l: LogLine) => lines.push(l));
            s.on('error', reject);
            s.on('end', () => resolve());
          }),
        );
        return { code: r.code, lines };
      } finally {
        c.close();
      }
    };
    const worker = await read(clientCredentials(new TlsSource(await material(f.ca, 'w3', 'worker'))));
    expect(worker.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(worker.lines).toEqual([]);
    const admin = await read(staticClientCredentials(await material(f.ca, 'admin-cli', 'admin')));
    expect(admin.code).toBe(grpc.status.OK);
    expect(admin.lines.map((l) => [l.line, l.nodeId])).toEqual([['hello', 'admin-cli']]);
  });

  it('without a client certificate, or with one from another CA, the TLS handshake fails on a require listener', async () => {
    const noCert = grpc.credentials.createSsl(Buffer.from(f.ca.certPem), null, null, { checkServerIdentity: () => undefined });
    const r1 = await codeOf(propose(f.requireAddr, noCert));
    expect(r1.code).toBe(grpc.status.UNAVAILABLE);
    // a perfectly good manager certificate of another cluster, trusting our CA for the server side
    const alien = await material(f.foreign, 'mgr1', 'manager');
    const r2 = await codeOf(propose(f.requireAddr, alienCredentials(alien)));
    expect(r2.code).toBe(grpc.status.UNAVAILABLE);
    expect(r2.details).not.toMatch(/tls: server/); // refused by the server, not by our client check
    // and the handler never ran for either
    expect(f.handled.propose.every((s) => s !== parseCertificate(alien.certPem).serial)).toBe(true);
  });

  it('on an optional listener the same clients get UNAUTHENTICATED for everything but the anonymous CA methods', async () => {
    const noCert = grpc.credentials.createSsl(Buffer.from(f.ca.certPem), null, null, { checkServerIdentity: () => undefined });
    const r1 = await codeOf(propose(f.optionalAddr, noCert));
    expect(r1.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(r1.details).toMatch(/client certificate from this cluster's CA is required/);
    const alien = await material(f.foreign, 'mgr1', 'manager');
    const r2 = await codeOf(propose(f.optionalAddr, alienCredentials(alien)));
    expect(r2.code).toBe(grpc.status.UNAUTHENTICATED);
    const c = new NodeCAClient(f.optionalAddr, untrustedClientCredentials(), TLS_CHANNEL_OPTIONS);
    try {
      const root = await new Promise<{ rootCaPem: string }>((resolve, reject) => c.getRootCa({}, (err, res) => (err ? reject(err) : resolve(res))));
      expect(root.rootCaPem).toBe(f.ca.certPem);
    } finally {
      c.close();
    }
  });

  it('a client refuses a server that is not a manager of its cluster', async () => {
    // our CA, but the server holds a worker certificate
    const fake = new grpc.Server();
    fake.addService(RaftService, authorize(RaftService, raftHandlers({ propose: [], envelopes: 0 }), RAFT_POLICY, f.authz));
    try {
      const addr = await listen(fake, serverCredentials(new TlsSource(await material(f.ca, 'w9', 'worker')), 'require'));
      const r = await codeOf(propose(addr, clientCredentials(f.mgr)));
      expect(r.code).toBe(grpc.status.UNAVAILABLE);
      expect(r.details).toMatch(/server w9 is a worker, expected manager/);
    } finally {
      fake.forceShutdown();
    }
  });

  it('an expired certificate on a live connection is refused per call', async () => {
    const manager = new TlsSource(await material(f.ca, 'mgr3', 'manager', 10 * 60_000));
    const creds = clientCredentials(manager);
    const c = new RaftClient(f.requireAddr, creds, TLS_CHANNEL_OPTIONS);
    const call = (): Promise<void> => new Promise((resolve, reject) => c.propose({ data: Buffer.alloc(0) }, (err) => (err ? reject(err) : resolve())));
    try {
      await call();
      f.authz.nowOffset = 11 * 60_000;
      const r = await codeOf(call());
      expect(r.code).toBe(grpc.status.UNAUTHENTICATED);
      expect(r.details).toMatch(/certificate of node mgr3 expired/);
    } finally {
      f.authz.nowOffset = 0;
      c.close();
    }
  });
});

describe('join (token sent over an optional listener; the daemons use join certificates instead, test/security.test.ts)', () => {
  it('a worker token yields a worker certificate with a CA-chosen id, which cannot reach Raft', async () => {
    const res = await joinCluster(f.optionalAddr, f.tokens.worker, { addresses: ['127.0.0.1:9999'], sendToken: true });
    expect(res.role).toBe('worker');
    expect(res.nodeId).toMatch(/^[0-9a-z]{25}$/);
    expect(f.admitted).toContain(`${res.nodeId}:worker`);
    expect(parseCertificate(res.certPem)).toMatchObject({ nodeId: res.nodeId, role: 'worker', clusterId: 'c1' });
    const src = new TlsSource(res);
    const r = await codeOf(propose(f.requireAddr, clientCredentials(src)));
    expect(r.code).toBe(grpc.status.PERMISSION_DENIED);
  });

  it('a manager token yields a manager certificate that reaches Raft', async () => {
    const res = await joinCluster(f.optionalAddr, f.tokens.manager, { sendToken: true });
    expect(res.role).toBe('manager');
    await propose(f.requireAddr, clientCredentials(new TlsSource(res)));
  });

  it('a token with the wrong CA digest is refused before the token is ever sent', async () => {
    const before = f.admitted.length;
    const other = await createRootCA({ clusterId: 'c1' });
    const token = formatToken(other.certPem, f.tokens.worker.slice(-32));
    await expect(joinCluster(f.optionalAddr, token)).rejects.toThrow(/does not match the join token's CA digest \(.*\): possible man in the middle/);
    expect(f.admitted.length).toBe(before);
  });

  it('a rotated (no longer current) token with the right digest is refused', async () => {
    const old = f.tokens.worker;
    f.tokens = { ...f.tokens, worker: formatToken(f.ca.certPem, newTokenSecret()) };
    const before = f.admitted.length;
    const err = (await joinCluster(f.optionalAddr, old, { sendToken: true }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(err.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(err.details).toMatch(/not a current join token/);
    expect(f.admitted.length).toBe(before);
    await expect(joinCluster(f.optionalAddr, f.tokens.worker, { sendToken: true })).resolves.toMatchObject({ role: 'worker' });
  });
});

describe('revocation', () => {
  it('a revoked node is refused even with an unexpired certificate', async () => {
    const manager = new TlsSource(await material(f.ca, 'mgr-gone', 'manager'));
    await propose(f.requireAddr, clientCredentials(manager));
    f.revocations.revokeNode('mgr-gone');
    const r = await codeOf(propose(f.requireAddr, clientCredentials(manager)));
    expect(r.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(r.details).toMatch(/node mgr-gone has been removed from the cluster/);
    // by serial too
    const other = new TlsSource(await material(f.ca, 'mgr4', 'manager'));
    f.revocations.revokeSerial(other.identity.serial);
    expect((await codeOf(propose(f.requireAddr, clientCredentials(other)))).code).toBe(grpc.status.PERMISSION_DENIED);
  });

  it('the certificate is read once per connection, and a node revoked while connected is refused on its next call', async () => {
    const manager = new TlsSource(await material(f.ca, 'mgr-live', 'manager'));
    const c = new RaftClient(f.requireAddr, clientCredentials(manager), TLS_CHANNEL_OPTIONS);
    const call = (): Promise<void> => new Promise((resolve, reject) => c.propose({ data: Buffer.alloc(0) }, (err) => (err ? reject(err) : resolve())));
    try {
      await call();
      const before = { ...peerIdentityStats };
      for (let i = 0; i < 5; i++) await call();
      expect(peerIdentityStats.reads - before.reads).toBe(0); // the same connection: no new read
      expect(peerIdentityStats.reused - before.reused).toBe(5);
      f.revocations.revokeNode('mgr-live');
      const r = await codeOf(call());
      expect(r.code).toBe(grpc.status.PERMISSION_DENIED);
      expect(r.details).toMatch(/node mgr-live has been removed from the cluster/);
    } finally {
      c.close();
    }
  });
});

describe('hot swap', () => {
  it('a renewed certificate is used for new connections while an open stream keeps going', async () => {
    const worker = new TlsSource(await material(f.ca, 'w-renew', 'worker'));
    const manager = new TlsSource(await material(f.ca, 'mgr-renew', 'manager'));
    // a long-lived client-streaming Raft session from the manager
    const c = new RaftClient(f.requireAddr, clientCredentials(manager), TLS_CHANNEL_OPTIONS);
    const before = f.handled.envelopes;
    const done = new Promise<void>((resolve, reject) => {
      const s = c.stream((err) => (err ? reject(err) : resolve()));
      s.write({ message: undefined, chunk: undefined });
      void (async () => {
        // renew both sides mid-stream: the worker through NodeCA, the server's own certificate by update
        const oldSerial = worker.identity.serial;
        await renewCertificate(f.optionalAddr, worker);
        expect(worker.identity.serial).not.toBe(oldSerial);
        expect(worker.identity.nodeId).toBe('w-renew');
        f.mgr.update(await f.ca.issueWithNewKey({ nodeId: 'mgr1', role: 'manager' }));
        manager.update(await f.ca.issueWithNewKey({ nodeId: 'mgr-renew', role: 'manager' }));
        s.write({ message: undefined, chunk: undefined });
        s.end();
      })().catch(reject);
    });
    try {
      await done;
      expect(f.handled.envelopes).toBe(before + 2);
      // new handshakes see the server's new certificate
      const served = await new Promise<string>((resolve, reject) => {
        const [host, port] = f.requireAddr.split(':');
        const m = manager.current;
        const sock = tls.connect({ host, port: Number(port), ca: m.trustPem, cert: m.certPem, key: m.keyPem, servername: 'flotilla', ALPNProtocols: ['h2'], checkServerIdentity: () => undefined }, () => {
          resolve(sock.getPeerCertificate().serialNumber);
          sock.end();
        });
        sock.on('error', reject);
      });
      expect(served.toLowerCase().replace(/^0+/, '')).toBe(f.mgr.identity.serial);
      // and the client's new certificate is what the server sees on a new connection
      await propose(f.requireAddr, clientCredentials(manager));
      expect(f.handled.propose.at(-1)).toBe(manager.identity.serial);
    } finally {
      c.close();
    }
  });
});

describe('CA rotation', () => {
  it('moves a server and its clients to a new root without refusing anyone mid-way; the old root is refused afterwards', async () => {
    const oldCa = await RootCA.load(await createRootCA({ clusterId: 'rot' }));
    const newCa = await RootCA.load(await createRootCA({ clusterId: 'rot' }));
    const server = new TlsSource(await material(oldCa, 'm1', 'manager'));
    const node = new TlsSource(await material(oldCa, 'm2', 'manager'));
    const authz: AuthzOptions = { clusterId: 'rot', trustedIssuers: () => issuerNames(server.current.trustPem) };
    const srv = new grpc.Server();
    srv.addService(RaftService, authorize(RaftService, raftHandlers({ propose: [], envelopes: 0 }), RAFT_POLICY, authz));
    try {
      const addr = await listen(srv, serverCredentials(server, 'require'));
      // a long-lived channel opened under the old root
      const live = new RaftClient(addr, clientCredentials(node), TLS_CHANNEL_OPTIONS);
      const liveCall = (): Promise<void> => new Promise((resolve, reject) => live.propose({ data: Buffer.alloc(0) }, (err) => (err ? reject(err) : resolve())));
      try {
        await liveCall();
        // 1. everyone trusts both roots
        const both = oldCa.certPem + newCa.certPem;
        server.update({ trustPem: both });
        node.update({ trustPem: both });
        await propose(addr, clientCredentials(node));
        // 2. certificates move to the new root one by one; old and new interoperate
        server.update(await newCa.issueWithNewKey({ nodeId: 'm1', role: 'manager' }));
        await propose(addr, clientCredentials(node)); // old cert -> new server cert
        const fresh = new TlsSource({ trustPem: both, ...(await newCa.issueWithNewKey({ nodeId: 'm3', role: 'manager' })) });
        await propose(addr, clientCredentials(fresh));
        await liveCall();
        // 3. the old root is dropped: its certificates are refused, on new handshakes and on live connections
        server.update({ trustPem: newCa.certPem });
        const r = await codeOf(propose(addr, clientCredentials(node)));
        expect(r.code).toBe(grpc.status.UNAVAILABLE);
        const r2 = await codeOf(liveCall());
        expect(r2.code).toBe(grpc.status.UNAUTHENTICATED);
        expect(r2.details).toMatch(/no longer trusted \(CA rotated\)/);
        node.update({ trustPem: newCa.certPem, ...(await newCa.issueWithNewKey({ nodeId: 'm2', role: 'manager' })) });
        await propose(addr, clientCredentials(node));
      } finally {
        live.close();
      }
    } finally {
      srv.forceShutdown();
    }
  });
});

describe('certificate files', () => {
  it('node material round-trips through one 0600 file; client dirs are read by flag with clear errors', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-pki-'));
    try {
      expect(loadNodeTls(dir)).toBeUndefined();
      await saveNodeTls(dir, f.mgr.current);
      expect(loadNodeTls(dir)).toEqual(f.mgr.current);
      expect(fs.statSync(path.join(dir, NODE_TLS_FILE)).mode & 0o777).toBe(0o600);
      fs.writeFileSync(path.join(dir, NODE_TLS_FILE), '{');
      expect(() => loadNodeTls(dir)).toThrow(/unreadable node certificate/);
      const admin = await material(f.ca, 'admin', 'admin');
      await writeClientTlsDir(path.join(dir, 'cli'), admin);
      expect(fs.statSync(path.join(dir, 'cli', 'key.pem')).mode & 0o777).toBe(0o600);
      expect(readClientTls({ dir: path.join(dir, 'cli') })).toEqual(admin);
      expect(() => readClientTls({ ca: '/nonexistent/ca.pem', dir: path.join(dir, 'cli') })).toThrow(/invalid --tlscacert "\/nonexistent\/ca.pem"/);
      expect(() => readClientTls({})).toThrow(/--tlscacert is required/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
