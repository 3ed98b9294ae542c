/**
 * Manager high availability with real processes on loopback: three managers (each with a sim agent),
 * kill -9 of the leader under a stream of writes, everyone restarted at once, a follower and then the
 * leader frozen (SIGSTOP) under writes that must keep being acknowledged,
 * demotion with the quorum guard, and --force-new-cluster after quorum loss. At every check, every
 * write the API acknowledged is present on every manager.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Control } from '../cli/client.js';
import { ServiceSpec } from '../gen/flotilla/v1/objects.js';
import type { ListServicesResponse, ListNodesResponse } from '../gen/flotilla/v1/control.js';
import { builtCli, cli, start, stopProc, waitFor, type Proc } from './helpers/procs.js';

interface Mgr {
  name: string;
  dir: string;
  sock: string;
  addr: string;
  proc?: Proc;
}

const spec = (name: string) =>
  ServiceSpec.fromPartial({ name, replicas: 0, task: { container: { image: 'busybox:latest', args: ['sleep', '1000'] } } });

describe.skipIf(!builtCli())('manager high availability (3 managers as processes)', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-ha-'));
  const mgrs: Mgr[] = ['m1', 'm2', 'm3'].map((name) => ({ name, dir: path.join(root, name), sock: path.join(root, `${name}.sock`), addr: '' }));
  const acked = new Set<string>();
  let token = '';
  let seq = 0;

  async function launch(m: Mgr, extra: string[] = []): Promise<void> {
    const args = ['manager', '--data-dir', m.dir, '--hostname', m.name, '--listen-addr', m.addr || '127.0.0.1:0', '--control-socket', m.sock, '--runtime', 'sim', '--heartbeat-period', '500ms', ...extra];
    const p = start(args, { FLOTILLA_LOG_LEVEL: process.env.HA_LOG_LEVEL ?? 'warn' });
    m.proc = p;
    m.addr = await waitFor(`${m.name} ready`, () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 40_000, 50).catch((err: unknown) => {
      if (process.env.HA_LOG_LEVEL) fs.writeFileSync(`/tmp/ha-fail-${m.name}.log`, p.err.join(''));
      throw err;
    });
  }
  async function kill(m: Mgr, sig: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = m.proc;
    if (!p) return;
    await stopProc(p, sig); // SIGKILL after a deadline
    m.proc = undefined;
  }
  const env = (m: Mgr) => ({ FLOTILLA_HOST: `unix://${m.sock}` });
  async function services(m: Mgr): Promise<Set<string>> {
    const c = new Control(`unix:${m.sock}`);
    try {
      const r = await c.call<unknown, ListServicesResponse>('listServices', {}, 10_000);
      return new Set(r.services.map((s) => s.spec!.name));
    } finally {
      c.close();
    }
  }
  async function leader(m: Mgr): Promise<string> {
    const c = new Control(`unix:${m.sock}`);
    try {
      const r = await c.call<unknown, ListNodesResponse>('listNodes', {}, 10_000);
      return r.nodes.find((n) => n.managerStatus?.leader)?.description?.hostname ?? '';
    } finally {
      c.close();
    }
  }
  /** Writes (creates services) through the given managers until stop; records acknowledged names. */
  async function writer(targets: () => Mgr[], until: () => boolean): Promise<number> {
    let errors = 0;
    let i = 0;
    while (!until()) {
      const live = targets().filter((m) => m.proc);
      const m = live[i++ % Math.max(1, live.length)];
      if (!m) break;
      const name = `w${seq++}`;
      const c = new Control(`unix:${m.sock}`);
      try {
        await c.call('createService', { spec: spec(name) }, 5000);
        acked.add(name);
      } catch {
        errors++;
        await new Promise((r) => setTimeout(r, 50));
      } finally {
        c.close();
      }
    }
    return errors;
  }
  async function allHaveAcked(ms: Mgr[]): Promise<void> {
    for (const m of ms) {
      await waitFor(`${m.name} has every acknowledged write`, async () => {
        const have = await services(m);
        return [...acked].every((n) => have.has(n));
      }, 20_000);
    }
  }

  beforeAll(async () => {
    await launch(mgrs[0]!);
    const r = await cli(['cluster', 'join-token', 'manager', '-q'], env(mgrs[0]!));
    token = r.stdout.trim();
    expect(token).toMatch(/^FLTKN-1-[0-9a-f]{64}-[0-9a-z]{32}$/);
    await launch(mgrs[1]!, ['--join', mgrs[0]!.addr, '--token', token]);
    await launch(mgrs[2]!, ['--join', mgrs[0]!.addr, '--token', token]);
  });
  afterEach((ctx) => {
    // a failure shows what each manager logged (warnings and errors unless HA_LOG_LEVEL says more)
    if (ctx.task.result?.state !== 'fail') return;
    for (const m of mgrs) {
      const log = m.proc?.err.join('') ?? '';
      if (process.env.HA_LOG_LEVEL) fs.writeFileSync(`/tmp/ha-${m.name}.log`, log);
      console.log(`--- ${m.name} (${m.proc ? 'running' : 'stopped'}), last of its log:\n${log.slice(-4000)}`);
    }
  });
  afterAll(async () => {
    try {
      await Promise.all(mgrs.map((m) => kill(m, 'SIGTERM')));
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  it('lists three managers, one of them the leader', async () => {
    await waitFor('3 reachable managers', async () => {
      const r = await cli(['node', 'ls', '--format', 'json'], env(mgrs[1]!));
      const nodes = JSON.parse(r.stdout) as Array<{ hostname: string; role: string; managerStatus: { leader: boolean; reachability: string } | null }>;
      return nodes.length === 3 && nodes.every((n) => n.role === 'manager' && n.managerStatus?.reachability === 'reachable') && nodes.filter((n) => n.managerStatus?.leader).length === 1;
    });
    const table = await cli(['node', 'ls'], env(mgrs[2]!));
    expect(table.stdout).toMatch(/Leader/);
  });

  it('refuses a manager join with a wrong token', async () => {
    const bad: Mgr = { name: 'intruder', dir: path.join(root, 'intruder'), sock: path.join(root, 'intruder.sock'), addr: '' };
    const p = start(['manager', '--data-dir', bad.dir, '--hostname', 'intruder', '--listen-addr', '127.0.0.1:0', '--control-socket', bad.sock, '--no-agent', '--join', mgrs[0]!.addr, '--token', 'FLTTKN-1-x-mbad']);
    expect(await p.exited).not.toBe(0);
    expect(p.err.join('')).toMatch(/token/i);
  });

  it('survives kill -9 of the leader under a stream of writes, losing no acknowledged write', async () => {
    let stop = false;
    const w = writer(() => mgrs, () => stop);
    await waitFor('some writes', () => acked.size >= 20);
    const lead = await leader(mgrs[0]!);
    const victim = mgrs.find((m) => m.name === lead)!;
    const before = acked.size;
    const t0 = Date.now();
    await kill(victim);
    await waitFor('writes accepted again', () => acked.size > before + 5, 15_000, 20);
    const failover = Date.now() - t0;
    stop = true;
    await w;
    expect(failover).toBeLessThan(10_000);
    const survivors = mgrs.filter((m) => m.proc);
    await allHaveAcked(survivors);
    // the agents found the new leader: a new service converges on the surviving nodes
    const r = await cli(['service', 'create', '--name', 'after-failover', '--replicas', '4', '--timeout', '30s', 'busybox', 'sleep', '1000'], env(survivors[0]!));
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    // logs through any manager: a follower sends the CLI on to the leader
    for (const m of survivors) {
      const logs = await cli(['service', 'logs', 'after-failover'], env(m));
      expect(logs.stderr, m.name).toBe('');
      expect((logs.stdout.match(/after-failover\.\d\./g) ?? []).length, m.name).toBeGreaterThanOrEqual(4);
    }
    await launch(victim);
    await allHaveAcked(mgrs);
  });

  it('comes back with every write after all managers restart at once', async () => {
    await Promise.all(mgrs.map((m) => kill(m)));
    await Promise.all(mgrs.map((m) => launch(m)));
    await allHaveAcked(mgrs);
    await waitFor('a leader', async () => (await leader(mgrs[0]!)) !== '');
  });

  /** Writes through targets while one manager is frozen; returns what was acknowledged meanwhile and the errors. */
  async function writesWhileFrozen(targets: Mgr[], enough: number, timeoutMs: number, alsoWaitFor?: () => Promise<boolean>): Promise<{ acked: string[]; errors: number }> {
    const before = new Set(acked);
    let stop = false;
    const w = writer(() => targets, () => stop);
    try {
      await waitFor(`${enough} acknowledged writes while frozen`, async () => [...acked].filter((n) => !before.has(n)).length >= enough && (!alsoWaitFor || (await alsoWaitFor())), timeoutMs, 50);
    } finally {
      stop = true;
    }
    const errors = await w;
    return { acked: [...acked].filter((n) => !before.has(n)), errors };
  }

  it('keeps working with one follower frozen, which catches up when it thaws', async () => {
    const lead = await waitFor('a leader', async () => (await leader(mgrs[0]!)) || undefined);
    const frozen = mgrs.find((m) => m.name !== lead)!;
    frozen.proc!.child.kill('SIGSTOP');
    let during: { acked: string[]; errors: number };
    try {
      during = await writesWhileFrozen(mgrs.filter((m) => m !== frozen), 30, 20_000);
    } finally {
      frozen.proc!.child.kill('SIGCONT');
    }
    console.log(`HA: follower ${frozen.name} frozen: ${during.acked.length} writes acknowledged, ${during.errors} errors`);
    expect(during.acked.length).toBeGreaterThanOrEqual(30);
    // the leader kept its quorum: no write failed
    expect(during.errors).toBe(0);
    await allHaveAcked(mgrs);
    const have = await services(frozen);
    expect(during.acked.filter((n) => !have.has(n))).toEqual([]);
  });

  it('keeps working with the leader frozen: a new leader takes over; thawed, the old one follows and catches up', async () => {
    const lead = await waitFor('a leader', async () => (await leader(mgrs[0]!)) || undefined);
    const frozen = mgrs.find((m) => m.name === lead)!;
    const others = mgrs.filter((m) => m !== frozen);
    frozen.proc!.child.kill('SIGSTOP');
    let during: { acked: string[]; errors: number };
    let newLeader = '';
    try {
      during = await writesWhileFrozen(others, 30, 30_000, async () => {
        newLeader = await leader(others[0]!).catch(() => '');
        return newLeader !== '' && newLeader !== frozen.name;
      });
    } finally {
      frozen.proc!.child.kill('SIGCONT');
    }
    console.log(`HA: leader ${frozen.name} frozen: ${newLeader} took over, ${during.acked.length} writes acknowledged, ${during.errors} errors`);
    expect(others.map((m) => m.name)).toContain(newLeader);
    expect(during.acked.length).toBeGreaterThanOrEqual(30);
    // the thawed manager follows the new leader and has every write
    await waitFor(`${frozen.name} follows ${newLeader}`, async () => (await leader(frozen)) === newLeader, 20_000);
    await allHaveAcked(mgrs);
    const have = await services(frozen);
    expect(during.acked.filter((n) => !have.has(n))).toEqual([]);
    // and writes through it reach the new leader
    const c = new Control(`unix:${frozen.sock}`);
    try {
      await c.call('createService', { spec: spec('via-thawed') }, 10_000);
    } finally {
      c.close();
    }
    acked.add('via-thawed');
    await allHaveAcked(mgrs);
  });

  it('refuses a demotion that would lose quorum, allows one that keeps it', async () => {
    // m2 down: demoting m3 would leave m1 and an unreachable m2 (no quorum): refused
    await kill(mgrs[1]!);
    await waitFor('a leader among m1 and m3', async () => ['m1', 'm3'].includes(await leader(mgrs[0]!)), 20_000);
    const refused = await cli(['node', 'demote', 'm3'], env(mgrs[0]!));
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/quorum/i);
    // with m2 back, demoting m3 keeps a quorum of 2
    await launch(mgrs[1]!);
    await allHaveAcked(mgrs);
    await waitFor('m3 demoted', async () => {
      const r = await cli(['node', 'demote', 'm3'], env(mgrs[0]!));
      return r.code === 0;
    }, 20_000);
    // as in Swarm, the demotion is accepted as the desired role; the node's role follows once m3 has
    // left the Raft membership (a moment later)
    await waitFor('m3 listed as a worker', async () => {
      const ls = JSON.parse((await cli(['node', 'ls', '--format', 'json'], env(mgrs[0]!))).stdout) as Array<{ hostname: string; role: string }>;
      return ls.find((n) => n.hostname === 'm3')?.role === 'worker';
    }, 10_000);
  });

  it('promotes the demoted manager again: it rejoins and catches up', async () => {
    const r = await cli(['node', 'promote', 'm3'], env(mgrs[0]!));
    if (r.code !== 0 && process.env.HA_LOG_LEVEL) for (const m of mgrs) fs.writeFileSync(`/tmp/ha-${m.name}.log`, m.proc?.err.join('') ?? '');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await waitFor('3 reachable managers again', async () => {
      const nodes = JSON.parse((await cli(['node', 'ls', '--format', 'json'], env(mgrs[0]!))).stdout) as Array<{ role: string; managerStatus: { reachability: string } | null }>;
      return nodes.filter((n) => n.role === 'manager' && n.managerStatus?.reachability === 'reachable').length === 3;
    }, 30_000);
    await allHaveAcked(mgrs);
    // (a node without a manager process cannot be promoted: test/control-plane.test.ts checks the refusal)
    expect((await cli(['node', 'demote', 'm3'], env(mgrs[0]!))).code).toBe(0);
    await kill(mgrs[1]!);
  });

  it('recovers from quorum loss with --force-new-cluster, keeping all state', async () => {
    // m1 is alone now (m2 killed, m3 demoted): no quorum, no writes
    const c0 = new Control(`unix:${mgrs[0]!.sock}`);
    await expect(c0.call('createService', { spec: spec('no-quorum') }, 3000)).rejects.toThrow();
    c0.close();
    await kill(mgrs[0]!);
    await launch(mgrs[0]!, ['--force-new-cluster']);
    await allHaveAcked([mgrs[0]!]);
    const c = new Control(`unix:${mgrs[0]!.sock}`);
    try {
      await c.call('createService', { spec: spec('after-recovery') }, 10_000);
    } finally {
      c.close();
    }
    expect((await services(mgrs[0]!)).has('after-recovery')).toBe(true);
    const info = await cli(['cluster', 'info', '--format', 'json'], env(mgrs[0]!));
    expect(JSON.parse(info.stdout).leader).toBe(mgrs[0]!.addr);
  });
});
