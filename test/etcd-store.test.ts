/**
 * The etcd store with real processes: three real etcd members (loopback, client TLS) and three
 * flotilla managers (--store etcd, no agents, a 2 s election lease). Faults: kill -9 of the etcd
 * leader under a bounded stream of service writes; kill -9 of the flotilla leader; a manager frozen
 * (SIGSTOP) past its lease; compaction while a manager is down, which then comes back with its
 * data dir wiped but for its certificates. At every check, every write the API acknowledged is on
 * every manager.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Control } from '../cli/client.js';
import { ServiceSpec } from '../gen/flotilla/v1/objects.js';
import type { GetClusterResponse, ListServicesResponse, ListNodesResponse } from '../gen/flotilla/v1/control.js';
import { builtCli, cli, start, stopProc, waitFor, type Proc } from './helpers/procs.js';
import { EtcdCluster, haveEtcd } from './helpers/etcd.js';

interface Mgr {
  name: string;
  dir: string;
  sock: string;
  addr: string;
  proc?: Proc;
}

const TTL_S = 2;
const spec = (name: string) => ServiceSpec.fromPartial({ name, replicas: 0, task: { container: { image: 'busybox:latest', args: ['sleep', '1000'] } } });

describe.skipIf(!builtCli() || !haveEtcd())('etcd store: 3 managers on a 3-member etcd (processes, faults)', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-etcdstore-'));
  const etcd = new EtcdCluster();
  const mgrs: Mgr[] = ['m1', 'm2', 'm3'].map((name) => ({ name, dir: path.join(root, name), sock: path.join(root, `${name}.sock`), addr: '' }));
  const acked = new Set<string>();
  /** managers stopped with SIGSTOP: the writer leaves them alone */
  const frozen = new Set<Mgr>();
  let token = '';
  let seq = 0;
  const flags = () => [...etcd.managerFlags('/flotilla/faults'), '--etcd-lease-ttl', String(TTL_S)];

  async function launch(m: Mgr, extra: string[] = []): Promise<void> {
    const args = ['manager', '--data-dir', m.dir, '--hostname', m.name, '--listen-addr', m.addr || '127.0.0.1:0', '--control-socket', m.sock, '--no-agent', '--heartbeat-period', '500ms', ...flags(), ...extra];
    const p = start(args, { FLOTILLA_LOG_LEVEL: 'info' });
    m.proc = p;
    m.addr = await waitFor(`${m.name} ready`, () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join('').slice(-2000))) : undefined), 40_000, 50);
  }
  async function kill(m: Mgr, sig: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (!m.proc) return;
    await stopProc(m.proc, sig);
    m.proc = undefined;
  }
  async function call<T>(m: Mgr, method: Parameters<Control["call"]>[0], req: unknown = {}, ms = 10_000): Promise<T> {
    const c = new Control(`unix:${m.sock}`);
    try {
      return await c.call<unknown, T>(method, req, ms);
    } finally {
      c.close();
    }
  }
  const services = async (m: Mgr) => new Set((await call<ListServicesResponse>(m, 'listServices')).services.map((s) => s.spec!.name));
  const leaderOf = async (m: Mgr) => (await call<ListNodesResponse>(m, 'listNodes')).nodes.find((n) => n.managerStatus?.leader)?.description?.hostname ?? '';
  /** how many "became leader" lines a manager logged */
  const terms = (m: Mgr) => (m.proc?.err.join('') ?? '').split('\n').filter((l) => l.includes('became leader')).length;
  const steppedDown = (m: Mgr) => (m.proc?.err.join('') ?? '').includes('lost leadership');

  /** Creates services through the live managers, one after another, while !until(); bounded by count and time. */
  async function writer(until: () => boolean, max = 400, deadlineMs = 30_000): Promise<number> {
    let errors = 0;
    const t0 = Date.now();
    for (let i = 0; i < max && !until() && Date.now() - t0 < deadlineMs; i++) {
      const live = mgrs.filter((m) => m.proc && !frozen.has(m));
      const m = live[i % live.length]!;
      const name = `w${seq++}`;
      try {
        await call(m, 'createService', { spec: spec(name) }, 5000);
        acked.add(name);
      } catch {
        errors++;
      }
    }
    return errors;
  }
  async function allAckedEverywhere(): Promise<void> {
    for (const m of mgrs.filter((x) => x.proc)) {
      await waitFor(`${m.name} has every acknowledged write`, async () => {
        const have = await services(m);
        return [...acked].every((n) => have.has(n));
      }, 15_000);
    }
  }

  beforeAll(async () => {
    await etcd.start(3);
    await launch(mgrs[0]!);
    const r = await cli(['cluster', 'join-token', 'manager', '-q'], { FLOTILLA_HOST: `unix://${mgrs[0]!.sock}` });
    token = r.stdout.trim();
    for (const m of mgrs.slice(1)) await launch(m, ['--join', mgrs[0]!.addr, '--token', token]);
  }, 120_000);
  afterAll(async () => {
    try {
      await Promise.all(mgrs.map((m) => kill(m, 'SIGTERM')));
    } finally {
      await etcd.stop();
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  it('three managers share the store and one leader; the store kind is enforced per data dir', async () => {
    const info = await call<GetClusterResponse>(mgrs[1]!, 'getCluster');
    expect(info.store).toMatch(/^etcd https:\/\/127\.0\.0\.1:\d+(,https:\/\/127\.0\.0\.1:\d+){2} \/flotilla\/faults$/);
    expect(info.managers).toHaveLength(3);
    expect(info.managers.filter((m) => m.leader)).toHaveLength(1);
    await call(mgrs[2]!, 'createService', { spec: spec('hello') });
    acked.add('hello');
    await allAckedEverywhere();
    // a secret (and the CA key, the join tokens) never reach etcd in clear
    const secretData = `etcd-secret-${Date.now()}-payload`;
    await call(mgrs[1]!, 'createSecret', { spec: { name: 'db-password', labels: {}, data: Buffer.from(secretData) } });
    const ec = await etcd.client();
    try {
      const all = await ec.getAll().prefix('/flotilla/faults/').buffers();
      expect(Object.keys(all).some((k) => k.startsWith('/flotilla/faults/store/secret/'))).toBe(true);
      for (const [k, v] of Object.entries(all)) {
        expect(k).not.toContain('db-password');
        const text = v.toString('latin1');
        expect(text, k).not.toContain(secretData);
        expect(text, k).not.toContain('db-password');
        expect(text, k).not.toContain('PRIVATE KEY');
        expect(text, k).not.toContain(token);
      }
    } finally {
      ec.close();
    }
    // the same data dir without --store etcd: refused with one line, nothing started
    const other = path.join(root, 'other');
    fs.cpSync(mgrs[1]!.dir, other, { recursive: true });
    const r = await cli(['manager', '--data-dir', other, '--listen-addr', '127.0.0.1:0', '--control-socket', '', '--no-agent'], {}, 20_000);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/uses the etcd store \(prefix \/flotilla\/faults\), not flotilla's own Raft store/);
    expect(fs.existsSync(path.join(other, 'raft'))).toBe(false);
    // bad flags: one line naming the flag and value, non-zero exit
    const bad: Array<[string[], RegExp]> = [
      [['--store', 'zookeeper'], /--store.*zookeeper.*raft or etcd/],
      [['--store', 'etcd'], /--etcd-endpoints.*required/],
      [['--store', 'etcd', '--etcd-endpoints', 'h1:2379'], /--etcd-endpoints.*h1:2379.*http\(s\):\/\/HOST:PORT/],
      [['--store', 'etcd', '--etcd-endpoints', 'https://h1:2379'], /--etcd-cacert.*required for https/],
      [['--etcd-prefix', '/x'], /--etcd-prefix.*only with --store etcd/],
    ];
    for (const [args, re] of bad) {
      const b = await cli(['manager', '--data-dir', path.join(root, 'bad'), '--control-socket', '', '--no-agent', ...args], {}, 20_000);
      expect(b.code, args.join(' ')).not.toBe(0);
      expect(b.stderr, args.join(' ')).toMatch(re);
      expect(b.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
    }
    expect(fs.existsSync(path.join(root, 'bad'))).toBe(false);
    // a Raft data dir with --store etcd: refused with one line
    const raftDir = path.join(root, 'raftdir');
    fs.mkdirSync(path.join(raftDir, 'raft'), { recursive: true });
    const r2 = await cli(['manager', '--data-dir', raftDir, '--listen-addr', '127.0.0.1:0', '--control-socket', '', '--no-agent', ...flags()], {}, 20_000);
    expect(r2.code).not.toBe(0);
    expect(r2.stderr.trim().split('\n')).toHaveLength(1);
    expect(r2.stderr).toMatch(/uses flotilla's own Raft store, not the etcd store \(prefix \/flotilla\/faults\)/);
    // a new first manager on a prefix that holds a cluster: told to join it
    const r3 = await cli(['manager', '--data-dir', path.join(root, 'fresh'), '--listen-addr', '127.0.0.1:0', '--control-socket', '', '--no-agent', ...flags()], {}, 30_000);
    expect(r3.code).not.toBe(0);
    expect(r3.stderr).toMatch(/the etcd prefix \/flotilla\/faults already holds a flotilla cluster: join it/);
    expect((await call<GetClusterResponse>(mgrs[0]!, 'getCluster')).cluster?.id).toBe(info.cluster?.id);
  });

  it('kill -9 of the etcd leader under a stream of writes: no acknowledged write lost, the cluster carries on', async () => {
    const victim = await etcd.leaderIndex();
    expect(victim).toBeGreaterThanOrEqual(0);
    let killed = false;
    const before = acked.size;
    const w = writer(() => killed && acked.size >= before + 60, 400, 40_000);
    await waitFor('some writes before the kill', () => acked.size >= before + 20, 20_000, 20);
    await etcd.kill(victim);
    killed = true;
    const errors = await w;
    expect(acked.size).toBeGreaterThanOrEqual(before + 60);
    await allAckedEverywhere();
    // the member comes back and catches up; the cluster is whole again
    etcd.startMember(victim);
    await waitFor('etcd leader', async () => (await etcd.leaderIndex()) >= 0, 20_000);
    console.log(`etcd leader kill: ${acked.size - before} writes acknowledged, ${errors} refused during the failover`);
  }, 90_000);

  it(`kill -9 of the flotilla leader: another manager leads within 2 s of the lease (${TTL_S} s) expiring`, async () => {
    const name = await leaderOf(mgrs[0]!);
    const old = mgrs.find((m) => m.name === name)!;
    const rest = mgrs.filter((m) => m !== old);
    const t0 = Date.now();
    // leadership may have moved during the earlier faults: count only what follows this kill
    const termsBefore = new Map(rest.map((m) => [m.name, terms(m)]));
    await kill(old, 'SIGKILL');
    const next = await waitFor('a new leader', async () => {
      const l = await leaderOf(rest[0]!).catch(() => '');
      return l && l !== name ? l : undefined;
    }, 15_000, 50);
    const took = Date.now() - t0;
    console.log(`flotilla leader ${name} killed: ${next} leads after ${took} ms`);
    expect(took).toBeLessThan(TTL_S * 1000 + 2000);
    // its leader loops start once its store has caught up with the election's revision
    const nm = mgrs.find((m) => m.name === next)!;
    const before = termsBefore.get(nm.name) ?? 0;
    await waitFor(`${next} started its leader loops`, () => terms(nm) >= before + 1, 5000, 50);
    expect(terms(nm) - before).toBe(1);
    await writer(() => false, 10);
    await launch(old);
    await allAckedEverywhere();
  }, 60_000);

  it('a manager frozen past its lease: another leads meanwhile; on resuming it steps down and does not lead again', async () => {
    const name = await leaderOf(mgrs[0]!);
    const old = mgrs.find((m) => m.name === name)!;
    const rest = mgrs.filter((m) => m !== old);
    old.proc!.child.kill('SIGSTOP');
    frozen.add(old);
    try {
      const next = await waitFor('a new leader while it is frozen', async () => {
        const l = await leaderOf(rest[0]!).catch(() => '');
        return l && l !== name ? l : undefined;
      }, 15_000, 50);
      // writes go on meanwhile
      await writer(() => false, 10);
      old.proc!.child.kill('SIGCONT');
      frozen.delete(old);
      await waitFor('the frozen leader stepped down', () => steppedDown(old), 10_000);
      // every manager agrees on the one new leader; the old one did not lead again
      for (const m of mgrs) expect(await leaderOf(m)).toBe(next);
      expect(terms(mgrs.find((m) => m.name === next)!)).toBeGreaterThanOrEqual(1);
      const err = old.proc!.err.join('');
      const after = err.slice(err.lastIndexOf('lost leadership'));
      expect(after).not.toContain('became leader');
    } finally {
      old.proc?.child.kill('SIGCONT');
      frozen.delete(old);
    }
    await writer(() => false, 10);
    await allAckedEverywhere();
  }, 60_000);

  it('compaction while a manager is down: wiped but for its certificates, it starts again and catches up', async () => {
    const m = mgrs[2]!;
    const wasLeader = (await leaderOf(mgrs[0]!)) === m.name;
    await kill(m, 'SIGKILL');
    await writer(() => false, 15);
    await call(mgrs[0]!, 'removeService', { serviceId: 'hello' });
    acked.delete('hello');
    const c = await etcd.client();
    try {
      const rev = (await c.get('/flotilla/faults/rev').exec()).header.revision;
      await c.kv.compact({ revision: rev, physical: true });
    } finally {
      c.close();
    }
    // stateless but for its certificates (and the data key that seals them)
    for (const f of fs.readdirSync(m.dir)) if (f !== 'certificates' && f !== 'keys.json') fs.rmSync(path.join(m.dir, f), { recursive: true, force: true });
    await launch(m);
    const have = await services(m);
    expect([...acked].every((n) => have.has(n))).toBe(true);
    expect(have.has('hello')).toBe(false);
    if (wasLeader) await waitFor('a leader', async () => (await leaderOf(mgrs[0]!)) !== '', 10_000);
    await allAckedEverywhere();
  }, 60_000);
});
