/**
 * Mutual TLS and certificate authorization on real daemons (issue 11): every attack listed at the
 * top of the issue, repeated against a running cluster over real TLS, must fail.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../gen/flotilla/v1/control.js';
import { DispatcherClient, type RegisterResponse } from '../gen/flotilla/v1/dispatcher.js';
import { MessageType, RaftClient, RaftEnvelope } from '../gen/flotilla/v1/raft.js';
import { TaskState, TaskStatus } from '../gen/flotilla/v1/objects.js';
import { TLS_CHANNEL_OPTIONS, type TlsMaterial, TlsSource, clientCredentials } from '../manager/ca/credentials.js';
import { joinCluster } from '../manager/ca/service.js';
import { loadNodeTls, readClientTls } from '../manager/ca/certstore.js';
import { parseCertificate } from '../manager/ca/x509.js';
import { TestCluster, builtCli, cli, cliJson, waitFor } from './helpers/procs.js';

const describeIf = builtCli() ? describe : describe.skip;

type Unary<Req, Res> = (req: Req, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: Res) => void) => unknown;

function call<Req, Res>(client: grpc.Client, method: string, req: Req, timeoutMs = 5000): Promise<Res> {
  const fn = (client as unknown as Record<string, Unary<Req, Res>>)[method]!.bind(client);
  return new Promise((resolve, reject) => fn(req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res))));
}

async function failure(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as grpc.ServiceError;
  }
  throw new Error('the call succeeded');
}

/** TLS without a client certificate, not checking the server (an outsider on the network). */
const noCert = (): grpc.ChannelCredentials => grpc.credentials.createSsl(null, null, null, { rejectUnauthorized: false });
/** A client certificate (possibly another cluster's), not checking the server. */
const withCert = (m: TlsMaterial): grpc.ChannelCredentials =>
  grpc.credentials.createSsl(null, Buffer.from(m.keyPem), Buffer.from(m.certPem), { rejectUnauthorized: false });

interface Node {
  id: string;
  hostname: string;
  status: string;
  certificateExpiry: string;
}

describeIf('mutual TLS on every connection (real daemons)', () => {
  // made in beforeAll, so that a run filtered to other tests (-t) leaves no directory behind
  let c: TestCluster;
  let other: TestCluster;
  let workerTls: TlsMaterial;
  let otherAdmin: TlsMaterial;
  let adminDir = '';

  beforeAll(async () => {
    c = new TestCluster('flotilla-sec-');
    other = new TestCluster('flotilla-sec2-');
    await c.startManager({ agent: true, runtime: 'sim' });
    const w = await c.startAgent('w1');
    await waitFor('w1 ready', async () => (await cliJson<Node[]>(['node', 'ls'], c.env)).some((n) => n.hostname === 'w1' && n.status === 'ready'), 30_000);
    expect(w.child.exitCode).toBeNull();
    workerTls = loadNodeTls(path.join(c.root, 'w1'))!;
    adminDir = path.join(c.root, 'admin');
    const r = await cli(['cluster', 'client-cert', '--out', adminDir], c.env);
    expect(r.code, r.stderr).toBe(0);
    await other.startManager({ runtime: 'sim' });
    const o = await cli(['cluster', 'client-cert', '--out', path.join(other.root, 'admin')], other.env);
    expect(o.code, o.stderr).toBe(0);
    otherAdmin = readClientTls({ dir: path.join(other.root, 'admin') });
  }, 90_000);

  afterAll(async () => {
    await c?.cleanup();
    await other?.cleanup();
  });

  it('without a certificate, or with another cluster\'s, the control API, dispatcher and Raft refuse the TLS handshake', async () => {
    for (const creds of [noCert(), withCert(otherAdmin)]) {
      const clients: Array<[grpc.Client, string, unknown]> = [
        [new ControlClient(c.managerAddr, creds, TLS_CHANNEL_OPTIONS), 'getCluster', {}],
        [new DispatcherClient(c.managerAddr, creds, TLS_CHANNEL_OPTIONS), 'register', { token: '', nodeId: '', description: undefined, addr: '', images: [], contentAddr: '' }],
        [new RaftClient(c.managerAddr, creds, TLS_CHANNEL_OPTIONS), 'propose', { data: Buffer.from('x') }],
      ];
      for (const [client, method, req] of clients) {
        try {
          const err = await failure(call(client, method, req));
          // the handshake fails: the call never reaches a handler (that would be PERMISSION_DENIED or UNAUTHENTICATED)
          expect(err.code, `${method}: ${err.details}`).toBe(grpc.status.UNAVAILABLE);
        } finally {
          client.close();
        }
      }
    }
  });

  it('the CLI over TCP: no join token and no service without an admin certificate; with one it works', async () => {
    const tcp = { FLOTILLA_HOST: c.managerAddr };
    const tok = await cli(['cluster', 'join-token', 'manager', '-q'], tcp);
    expect(tok.code).not.toBe(0);
    expect(tok.stdout).not.toMatch(/FLTKN/);
    expect(tok.stderr).toMatch(/needs a client certificate over TCP/);
    const svc = await cli(['service', 'create', '--name', 'evil', '--mode', 'global', 'busybox', 'sh', '-c', 'id'], tcp);
    expect(svc.code).not.toBe(0);
    // another cluster's admin certificate fails the handshake
    const alien = await cli(['--tlsdir', path.join(other.root, 'admin'), 'service', 'create', '--name', 'evil', 'busybox', 'sleep', '1'], tcp);
    expect(alien.code).not.toBe(0);
    expect((await cliJson<unknown[]>(['service', 'ls'], c.env)).length).toBe(0);
    // this cluster's admin certificate
    const ok = await cli(['--tlsdir', adminDir, 'cluster', 'join-token', 'worker', '-q'], tcp);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/^FLTKN-1-[0-9a-f]{64}-[0-9a-z]{32}\n$/);
  });

  it('a worker certificate gets PERMISSION_DENIED from Control and from every Raft method (propose, heartbeat, snapshot, leave)', async () => {
    const creds = clientCredentials(new TlsSource(workerTls));
    const ctl = new ControlClient(c.managerAddr, creds, TLS_CHANNEL_OPTIONS);
    const raft = new RaftClient(c.managerAddr, creds, TLS_CHANNEL_OPTIONS);
    try {
      expect((await failure(call(ctl, 'getCluster', {}))).code).toBe(grpc.status.PERMISSION_DENIED);
      expect((await failure(call(ctl, 'createService', { spec: undefined }))).code).toBe(grpc.status.PERMISSION_DENIED);
      expect((await failure(call(raft, 'propose', { data: Buffer.from('forged') }))).code).toBe(grpc.status.PERMISSION_DENIED);
      expect((await failure(call(raft, 'leave', { raftId: 1, force: true }))).code).toBe(grpc.status.PERMISSION_DENIED);
      expect((await failure(call(raft, 'join', { token: '', addr: '127.0.0.1:1', hostname: 'x', nodeId: '' }))).code).toBe(grpc.status.PERMISSION_DENIED);
      const streamed = (envelope: { message?: { type: MessageType; to: number; from: number; term: number }; chunk?: { header: { type: MessageType; to: number; from: number; term: number }; data: Buffer; offset: number; last: boolean } }): Promise<grpc.ServiceError> =>
        new Promise((resolve, reject) => {
          const s = raft.stream((err) => (err ? resolve(err) : reject(new Error('stream accepted'))));
          s.write(RaftEnvelope.fromPartial(envelope));
          s.end();
        });
      const heartbeat = { message: { type: MessageType.MESSAGE_TYPE_HEARTBEAT, to: 1, from: 2, term: 1_000_000 } };
      expect((await streamed(heartbeat)).code).toBe(grpc.status.PERMISSION_DENIED);
      const snap = { chunk: { header: { ...heartbeat.message, type: MessageType.MESSAGE_TYPE_SNAP }, data: Buffer.from('forged store'), offset: 0, last: true } };
      expect((await streamed(snap)).code).toBe(grpc.status.PERMISSION_DENIED);
    } finally {
      ctl.close();
      raft.close();
    }
    // the cluster is intact
    expect((await cli(['service', 'create', '--name', 'after-raft', '--detach', 'busybox', 'sleep', '1000'], c.env)).code).toBe(0);
  });

  it('a Raft message from a manager certificate claiming another sender is dropped', async () => {
    const mtok = (await cli(['cluster', 'join-token', 'manager', '-q'], c.env)).stdout.trim();
    const rogue = await joinCluster(c.managerAddr, mtok);
    expect(rogue.role).toBe('manager');
    const info = await cliJson<{ managers: Array<{ raftId: string; leader: boolean }> }>(['cluster', 'info'], c.env);
    const leaderId = parseInt(info.managers.find((m) => m.leader)!.raftId, 16);
    const raft = new RaftClient(c.managerAddr, clientCredentials(new TlsSource(rogue)), TLS_CHANNEL_OPTIONS);
    try {
      await new Promise<void>((resolve, reject) => {
        const s = raft.stream((err) => (err ? reject(err) : resolve()));
        // a higher-term heartbeat in the leader's own name: a follower would step down for it
        s.write(RaftEnvelope.fromPartial({ message: { type: MessageType.MESSAGE_TYPE_HEARTBEAT, to: leaderId, from: leaderId + 1, term: 1_000_000 } }));
        s.end();
      });
    } finally {
      raft.close();
    }
    await waitFor('the drop logged', () => c.procs[0]!.err.join('').includes("sender is not the certificate's node"), 5000);
    const after = await cliJson<{ managers: Array<{ raftId: string; leader: boolean }> }>(['cluster', 'info'], c.env);
    expect(after.managers.find((m) => m.leader)?.raftId).toBe(info.managers.find((m) => m.leader)!.raftId);
  });

  it('a worker certificate registering under another node id (the manager\'s) gets its own id; it cannot report another node\'s task', async () => {
    const nodes = await cliJson<Node[]>(['node', 'ls'], c.env);
    const m1 = nodes.find((n) => n.hostname === 'm1')!;
    const w1 = nodes.find((n) => n.hostname === 'w1')!;
    expect(parseCertificate(workerTls.certPem).nodeId).toBe(w1.id);
    // a task on m1
    const r = await cli(['service', 'create', '--name', 'on-m1', '--constraint', 'node.hostname==m1', '--detach', 'busybox', 'sleep', '1000'], c.env);
    expect(r.code, r.stderr).toBe(0);
    const task = await waitFor('on-m1 running', async () => (await cliJson<Array<{ id: string; node: string; state: string }>>(['service', 'ps', 'on-m1'], c.env)).find((t) => t.state === 'running'), 30_000);
    const disp = new DispatcherClient(c.managerAddr, clientCredentials(new TlsSource(workerTls)), TLS_CHANNEL_OPTIONS);
    try {
      const reg = await call<unknown, RegisterResponse>(disp, 'register', { token: '', nodeId: m1.id, description: { hostname: 'w1', resources: undefined, engineLabels: {}, os: 'linux', arch: 'x64', runtime: 'sim', managerAddr: '' }, addr: '127.0.0.1', images: [], contentAddr: '' });
      expect(reg.nodeId).toBe(w1.id);
      const err = await failure(
        call(disp, 'updateTaskStatus', { nodeId: m1.id, sessionId: reg.sessionId, updates: [{ taskId: task.id, status: TaskStatus.fromPartial({ state: TaskState.TASK_STATE_FAILED, message: 'forged', err: 'forged', timestamp: Date.now() }) }] }),
      );
      expect(err.code).toBe(grpc.status.PERMISSION_DENIED);
      expect(err.details).toMatch(/not assigned to node/);
    } finally {
      disp.close();
    }
    await new Promise((res) => setTimeout(res, 500));
    const still = (await cliJson<Array<{ id: string; state: string }>>(['service', 'ps', 'on-m1'], c.env)).find((t) => t.id === task.id);
    expect(still?.state).toBe('running');
  });

  it('a token with the wrong CA digest fails to join with a clear message', async () => {
    const tok = (await c.token()).replace(/^FLTKN-1-[0-9a-f]{64}-/, `FLTKN-1-${'0'.repeat(64)}-`);
    const p = await c.startAgent('mitm', { token: tok });
    expect(await p.exited).not.toBe(0);
    expect(p.err.join('')).toMatch(/does not match the join token's CA digest/);
    expect((await cliJson<Node[]>(['node', 'ls'], c.env)).some((n) => n.hostname === 'mitm')).toBe(false);
  });

  it('a rotated token is refused for new joins; joined nodes are unaffected; the new token works', async () => {
    const old = await c.token();
    const rot = await cli(['cluster', 'join-token', '--rotate', 'worker', '-q'], c.env);
    expect(rot.code, rot.stderr).toBe(0);
    const fresh = rot.stdout.trim();
    expect(fresh).not.toBe(old);
    const p = await c.startAgent('late-old', { token: old });
    expect(await p.exited).not.toBe(0);
    expect(p.err.join('')).toMatch(/refused this node's join certificate at the TLS handshake: the join token is not current/);
    const q = await c.startAgent('late-new', { token: fresh });
    await waitFor('late-new ready', async () => (await cliJson<Node[]>(['node', 'ls'], c.env)).some((n) => n.hostname === 'late-new' && n.status === 'ready'), 30_000);
    expect((await cliJson<Node[]>(['node', 'ls'], c.env)).find((n) => n.hostname === 'w1')?.status).toBe('ready');
    await c.kill(q, 'SIGTERM');
  });

  it('node rm revokes: the removed node\'s certificate no longer gets in', async () => {
    const p = await c.startAgent('doomed');
    const id = await waitFor('doomed ready', async () => (await cliJson<Node[]>(['node', 'ls'], c.env)).find((n) => n.hostname === 'doomed' && n.status === 'ready')?.id, 30_000);
    const tls = loadNodeTls(path.join(c.root, 'doomed'))!;
    await c.kill(p);
    const rm = await cli(['node', 'rm', '--force', id], c.env);
    expect(rm.code, rm.stderr).toBe(0);
    const disp = new DispatcherClient(c.managerAddr, clientCredentials(new TlsSource(tls)), TLS_CHANNEL_OPTIONS);
    try {
      const err = await failure(call(disp, 'register', { token: '', nodeId: '', description: { hostname: 'doomed', resources: undefined, engineLabels: {}, os: 'linux', arch: 'x64', runtime: 'sim', managerAddr: '' }, addr: '', images: [], contentAddr: '' }));
      expect(err.code).toBe(grpc.status.PERMISSION_DENIED);
      expect(err.details).toMatch(/removed from the cluster/);
    } finally {
      disp.close();
    }
    // the agent restarted with its old certificate is refused too, and says so
    const again = await c.startAgent('doomed');
    expect(await again.exited).not.toBe(0);
    expect(again.err.join('')).toMatch(/removed from the cluster/);
  });
});

describeIf('certificate renewal under a running service (30 s certificates)', () => {
  const cleanupLater = (x: TestCluster): void => {
    c = x;
  };
  let c: TestCluster | undefined;
  afterAll(async () => {
    await c?.cleanup();
  });

  it('every node renews before expiry; no session drops, no task restarts; node inspect shows the expiry', async () => {
    const c = new TestCluster('flotilla-renew-');
    cleanupLater(c);
    await c.startManager({ agent: true, runtime: 'sim', extra: ['--cert-expiry', '30s'] });
    await c.startAgent('w1');
    await waitFor('w1 ready', async () => (await cliJson<Node[]>(['node', 'ls'], c.env)).some((n) => n.hostname === 'w1' && n.status === 'ready'), 30_000);
    expect((await cli(['service', 'create', '--name', 'steady', '--replicas', '2', '--detach', 'busybox', 'sleep', '100000'], c.env)).code).toBe(0);
    type T = { id: string; state: string; node: string };
    const running = await waitFor('2 running', async () => {
      const ts = (await cliJson<T[]>(['service', 'ps', 'steady'], c.env)).filter((t) => t.state === 'running');
      return ts.length === 2 ? ts : undefined;
    }, 30_000);
    const inspect = async (): Promise<Node[]> => cliJson<Node[]>(['node', 'inspect', 'm1', 'w1'], c.env);
    const first = await inspect();
    for (const n of first) expect(Date.parse(n.certificateExpiry) - Date.now()).toBeLessThanOrEqual(30_000);
    const certOf = (name: string): string => JSON.parse(fs.readFileSync(path.join(c.root, name, 'certificates', 'node-tls.json'), 'utf8')).certPem;
    const before = { m1: certOf('m1'), w1: certOf('w1') };
    // renewal happens at 50-80% of the life: within 24 s; wait past the first certificates' expiry
    await waitFor('both renewed', () => certOf('m1') !== before.m1 && certOf('w1') !== before.w1, 40_000, 500);
    await new Promise((r) => setTimeout(r, Math.max(0, Math.max(...first.map((n) => Date.parse(n.certificateExpiry))) - Date.now() + 3000)));
    const later = await inspect();
    for (const n of later) {
      expect(Date.parse(n.certificateExpiry)).toBeGreaterThan(Date.now());
      expect(n.status).toBe('ready');
    }
    const now = (await cliJson<T[]>(['service', 'ps', 'steady'], c.env)).filter((t) => t.state === 'running');
    expect(now.map((t) => t.id).sort()).toEqual(running.map((t) => t.id).sort());
    // the sessions never dropped: each process logged no reconnect
    for (const p of c.procs) expect(p.err.join('')).not.toMatch(/session failed; reconnecting/);
  }, 150_000);
});
