/**
 * Root CA rotation on real daemons (issue 11, "Rotation"): `flotilla cluster ca --rotate` moves every
 * node to a new root while a service keeps running, then certificates from the old root are refused
 * at the TLS handshake. Three managers (the first with its in-process agent) and two workers, sim runtime:
 * the managers' Raft connections and the workers' sessions all cross the rotation.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../gen/flotilla/v1/control.js';
import { DispatcherClient } from '../gen/flotilla/v1/dispatcher.js';
import { TLS_CHANNEL_OPTIONS, type TlsMaterial } from '../manager/ca/credentials.js';
import { readClientTls } from '../manager/ca/certstore.js';
import { parseCertificate } from '../manager/ca/x509.js';
import { TestCluster, builtCli, cli, cliJson, waitFor } from './helpers/procs.js';

const describeIf = builtCli() ? describe : describe.skip;

type Unary = (req: unknown, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: unknown) => void) => unknown;

/** One call with a client certificate (the server is not checked): the gRPC status code, 0 for success. */
async function callCode(ctor: typeof ControlClient | typeof DispatcherClient, addr: string, m: Pick<TlsMaterial, 'certPem' | 'keyPem'>, method: string, req: unknown): Promise<number> {
  const creds = grpc.credentials.createSsl(null, Buffer.from(m.keyPem), Buffer.from(m.certPem), { rejectUnauthorized: false });
  const client = new ctor(addr, creds, TLS_CHANNEL_OPTIONS);
  try {
    const fn = (client as unknown as Record<string, Unary>)[method]!.bind(client);
    return await new Promise<number>((resolve) => fn(req, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err) => resolve(err ? err.code : 0)));
  } finally {
    client.close();
  }
}

interface Node {
  id: string;
  hostname: string;
  status: string;
}
type T = { id: string; state: string; node: string };

describeIf('root CA rotation (real daemons)', () => {
  let c: TestCluster | undefined;
  afterAll(async () => {
    await c?.cleanup();
  });

  it('cluster ca --rotate moves every node to a new root with no task restart; then old-root certificates are refused at the handshake', async () => {
    c = new TestCluster('flotilla-carot-');
    const cl = c;
    await cl.startManager({ agent: true, runtime: 'sim' });
    const m2 = await cl.startJoiningManager('m2');
    const m3 = await cl.startJoiningManager('m3');
    await cl.startAgent('w1');
    await cl.startAgent('w2');
    await waitFor('5 nodes ready', async () => (await cliJson<Node[]>(['node', 'ls'], cl.env)).filter((n) => n.status === 'ready').length === 5, 30_000);
    const managerAddrs = [cl.managerAddr, m2.addr, m3.addr];
    expect((await cli(['service', 'create', '--name', 'steady', '--replicas', '3', '--detach', 'busybox', 'sleep', '100000'], cl.env)).code).toBe(0);
    const running = await waitFor('3 running', async () => {
      const ts = (await cliJson<T[]>(['service', 'ps', 'steady'], cl.env)).filter((t) => t.state === 'running');
      return ts.length === 3 ? ts : undefined;
    }, 30_000);

    // material from the old root: an admin client certificate, and the worker w1's node certificate
    const oldDir = path.join(cl.root, 'admin-old');
    expect((await cli(['cluster', 'client-cert', '--out', oldDir], cl.env)).code).toBe(0);
    const oldAdmin = readClientTls({ dir: oldDir });
    const certOf = (name: string): string => (JSON.parse(fs.readFileSync(path.join(cl.root, name, 'certificates', 'node-tls.json'), 'utf8')) as { certPem: string }).certPem;
    const oldWorker = JSON.parse(fs.readFileSync(path.join(cl.root, 'w1', 'certificates', 'node-tls.json'), 'utf8')) as TlsMaterial;
    const oldRoot = parseCertificate(oldAdmin.certPem).issuer;
    const tcp = { FLOTILLA_HOST: cl.managerAddr };
    expect((await cli(['--tlsdir', oldDir, 'cluster', 'join-token', 'worker', '-q'], tcp)).code).toBe(0);
    expect(await callCode(ControlClient, cl.managerAddr, oldAdmin, 'getCluster', {})).toBe(0);

    const rot = await cli(['cluster', 'ca', '--rotate', '--timeout', '60s'], cl.env, 90_000);
    if (rot.code !== 0) for (const p of cl.procs) console.log(p.err.join('').split('\n').filter((l) => /renew|rotation|trust|warn|error/i.test(l)).join('\n'));
    expect(rot.code, rot.stderr + rot.stdout).toBe(0);
    expect(rot.stdout).toMatch(/CA rotation started: new root flotilla root CA [0-9a-f]{8}/);
    expect(rot.stdout).toMatch(/\d\/5 nodes hold a certificate from the new root/);
    expect(rot.stdout).toMatch(/CA rotation complete/);
    const newRoot = rot.stdout.match(/new root (flotilla root CA [0-9a-f]{8})/)![1]!;
    expect(newRoot).not.toBe(oldRoot);
    const status = await cli(['cluster', 'ca'], cl.env);
    expect(status.stdout).toBe(`root CA: ${newRoot}\nno rotation in progress\n`);

    // every node holds a certificate from the new root (as saved on disk) and trusts only the new root
    for (const name of ['m1', 'm2', 'm3', 'w1', 'w2']) {
      await waitFor(`${name} on the new root only`, () => {
        const saved = JSON.parse(fs.readFileSync(path.join(cl.root, name, 'certificates', 'node-tls.json'), 'utf8')) as { trustPem: string };
        return parseCertificate(certOf(name)).issuer === newRoot && saved.trustPem.split('BEGIN CERTIFICATE').length === 2;
      }, 10_000, 200);
    }
    // the service never noticed: same tasks, still running; every node ready; no session dropped
    const now = (await cliJson<T[]>(['service', 'ps', 'steady'], cl.env)).filter((t) => t.state === 'running');
    if (now.map((t) => t.id).sort().join() !== running.map((t) => t.id).sort().join()) {
      console.log(JSON.stringify(await cliJson<T[]>(['service', 'ps', 'steady'], cl.env)));
      for (const p of cl.procs) console.log(p.err.join('').split('\n').filter((l) => /level":(40|50)|task|down/i.test(l)).slice(-15).join('\n'));
    }
    expect(now.map((t) => t.id).sort()).toEqual(running.map((t) => t.id).sort());
    expect((await cliJson<Node[]>(['node', 'ls'], cl.env)).map((n) => n.status)).toEqual(['ready', 'ready', 'ready', 'ready', 'ready']);
    // the Raft group crossed it too: every manager still reachable, one leader, the others followers
    const mgrs = (await cliJson<{ managerStatus?: { leader?: boolean; reachability?: string } }[]>(['node', 'ls'], cl.env)).filter((n) => n.managerStatus);
    expect(mgrs.length).toBe(3);
    expect(mgrs.filter((n) => n.managerStatus?.leader).length).toBe(1);
    expect(mgrs.every((n) => n.managerStatus?.leader || n.managerStatus?.reachability === 'reachable'), JSON.stringify(mgrs)).toBe(true);
    for (const p of cl.procs) expect(p.err.join('')).not.toMatch(/session failed; reconnecting/);

    // old-root certificates fail the TLS handshake (UNAVAILABLE: the call never reaches a handler);
    // the manager's trust follows the store within a moment of the rotation's end
    const reg = { token: '', nodeId: '', description: { hostname: 'w1', resources: undefined, engineLabels: {}, os: 'linux', arch: 'x64', runtime: 'sim', managerAddr: '' }, addr: '', images: [], contentAddr: '' };
    for (const addr of managerAddrs) {
      await waitFor(`old admin certificate refused by ${addr}`, async () => (await callCode(ControlClient, addr, oldAdmin, 'getCluster', {})) === grpc.status.UNAVAILABLE, 5000, 200);
      expect(await callCode(DispatcherClient, addr, oldWorker, 'register', reg)).toBe(grpc.status.UNAVAILABLE);
    }
    const old = await cli(['--tlsdir', oldDir, 'cluster', 'join-token', 'worker', '-q'], tcp);
    expect(old.code).not.toBe(0);
    // a client certificate made now (from the new root) works over TCP
    const newDir = path.join(cl.root, 'admin-new');
    expect((await cli(['cluster', 'client-cert', '--out', newDir], cl.env)).code).toBe(0);
    expect(parseCertificate(readClientTls({ dir: newDir }).certPem).issuer).toBe(newRoot);
    const ok = await cli(['--tlsdir', newDir, 'cluster', 'join-token', 'worker', '-q'], tcp);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/^FLTKN-1-/);

    // a second rotation works too (the CLI waits again), and the tasks still do not move
    const again = await cli(['cluster', 'ca', '--rotate', '--timeout', '60s'], cl.env, 90_000);
    expect(again.code, again.stderr + again.stdout).toBe(0);
    const after = (await cliJson<T[]>(['service', 'ps', 'steady'], cl.env)).filter((t) => t.state === 'running');
    if (after.map((t) => t.id).sort().join() !== running.map((t) => t.id).sort().join()) {
      console.log(JSON.stringify(await cliJson<T[]>(['service', 'ps', 'steady'], cl.env)));
      for (const p of cl.procs) console.log(p.err.join('').split('\n').filter((l) => /level":(40|50)|task|down/i.test(l)).slice(-15).join('\n'));
    }
    expect(after.map((t) => t.id).sort()).toEqual(running.map((t) => t.id).sort());
  }, 180_000);
});
