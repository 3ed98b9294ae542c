/**
 * Network allocations across a leader change, with real processes: three managers (each with a sim
 * agent), a network and a service on it, kill -9 of the leader, then a scale up under the new
 * leader. The network, the VIP and every address come from the replicated store; the new leader's
 * allocator gives no address twice.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { builtCli, cli, cliJson, start, waitFor, type Proc } from './helpers/procs.js';

interface Mgr {
  name: string;
  dir: string;
  sock: string;
  addr: string;
  proc?: Proc;
}
interface TaskJ {
  state: string;
  desiredState: string;
  networks: Array<{ networkId: string; addresses: string[] }>;
}

describe.skipIf(!builtCli())('networks across a leader change (3 managers as processes)', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-netha-'));
  const mgrs: Mgr[] = ['m1', 'm2', 'm3'].map((name) => ({ name, dir: path.join(root, name), sock: path.join(root, `${name}.sock`), addr: '' }));
  const env = (m: Mgr) => ({ FLOTILLA_HOST: `unix://${m.sock}` });

  async function launch(m: Mgr, extra: string[] = []): Promise<void> {
    const args = ['manager', '--data-dir', m.dir, '--hostname', m.name, '--listen-addr', m.addr || '127.0.0.1:0', '--control-socket', m.sock, '--runtime', 'sim', '--heartbeat-period', '500ms', ...extra];
    const p = start(args, { FLOTILLA_LOG_LEVEL: 'warn' });
    m.proc = p;
    m.addr = await waitFor(`${m.name} ready`, () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 40_000, 50);
  }
  async function kill(m: Mgr, sig: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = m.proc;
    if (!p) return;
    if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill(sig);
    await p.exited;
    m.proc = undefined;
  }
  async function leaderName(m: Mgr): Promise<string> {
    const nodes = await cliJson<Array<{ hostname: string; managerStatus: { leader: boolean } | null }>>(['node', 'ls'], env(m));
    return nodes.find((n) => n.managerStatus?.leader)?.hostname ?? '';
  }

  beforeAll(async () => {
    await launch(mgrs[0]!, ['--default-addr-pool', '10.200.0.0/16', '--default-addr-pool-mask-length', '28']);
    const token = (await cli(['cluster', 'join-token', 'manager', '-q'], env(mgrs[0]!))).stdout.trim();
    await launch(mgrs[1]!, ['--join', mgrs[0]!.addr, '--token', token]);
    await launch(mgrs[2]!, ['--join', mgrs[0]!.addr, '--token', token]);
  }, 120_000);
  afterAll(async () => {
    await Promise.all(mgrs.map((m) => kill(m, 'SIGTERM')));
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('keeps the network, VIP and addresses, and allocates without duplicates under the new leader', async () => {
    const m1 = mgrs[0]!;
    await waitFor('3 ready nodes', async () => (await cliJson<Array<{ status: string }>>(['node', 'ls'], env(m1))).filter((n) => n.status === 'ready').length === 3, 30_000);
    expect((await cli(['network', 'create', 'app'], env(m1))).stderr).toBe('');
    // a /28 from the cluster's pool: 14 host addresses (gateway + VIP + 12 tasks)
    const create = await cli(['service', 'create', '-d', '--name', 'web', '--replicas', '4', '--network', 'app', 'busybox:latest', 'sleep', '1000'], env(m1));
    expect(create.stderr).toBe('');
    const running = async (m: Mgr) => (await cliJson<TaskJ[]>(['service', 'ps', 'web'], env(m))).filter((t) => t.desiredState === 'running' && t.state === 'running');
    await waitFor('4 running', async () => (await running(m1)).length === 4, 30_000);
    const before = (await running(m1)).map((t) => t.networks[0]!.addresses[0]!);
    const vipOf = async (m: Mgr) => (await cliJson<Array<{ endpoint: { virtualIps: Array<{ addresses: string[] }> } }>>(['service', 'inspect', 'web'], env(m)))[0]!.endpoint.virtualIps[0]!.addresses[0]!;
    const vip = await vipOf(m1);

    const old = mgrs.find((m) => m.name === 'm1')!;
    expect(await leaderName(old)).toBe('m1');
    await kill(old);
    const survivors = mgrs.filter((m) => m.proc);
    await waitFor('a new leader', async () => ['m2', 'm3'].includes(await leaderName(survivors[0]!).catch(() => '')), 30_000, 200);
    const s = survivors[0]!;
    const [net] = await cliJson<Array<{ ipam: { subnet: string }; vni: number }>>(['network', 'inspect', 'app'], env(s));
    expect(net).toMatchObject({ ipam: { subnet: '10.200.0.0/28' }, vni: 4096 });
    expect(await vipOf(s)).toBe(vip);
    // scale up to 10 under the new leader (the old leader's node is down: its tasks move, taking new
    // addresses, and their old ones are freed when they are orphaned)
    expect((await cli(['service', 'scale', '-d', 'web=10'], env(s))).stderr).toBe('');
    await waitFor('10 running', async () => (await running(s)).length === 10, 60_000, 200);
    const after = (await running(s)).map((t) => t.networks[0]!.addresses[0]!);
    expect(new Set([...after, vip]).size).toBe(11);
    expect(after).not.toContain('10.200.0.1/28');
    for (const a of after) expect(a).toMatch(/^10\.200\.0\.([2-9]|1[0-4])\/28$/);
    // tasks that kept running (on the surviving nodes) kept their addresses
    expect(after.filter((a) => before.includes(a)).length).toBeGreaterThan(0);
  });
});
