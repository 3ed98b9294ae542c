/**
 * Running the daemons like services, with real processes on loopback:
 *  - every manager is a node, even with --no-agent (drained, no runtime), and `cluster info` lists
 *    the Raft members with their addresses and reachability;
 *  - join tokens from --token-file or FLOTILLA_TOKEN stay out of the process's command line;
 *  - a fatal storage error (the leader's WAL hits ENOSPC on a full tmpfs) ends the manager process
 *    with one line and a non-zero code; its agent fails over to another manager (learned from the
 *    dispatcher after it registered); no acknowledged write is lost;
 *  - the systemd units in deploy/systemd pass `systemd-analyze verify`.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Control } from '../cli/client.js';
import { ServiceSpec } from '../gen/flotilla/v1/objects.js';
import type { ListServicesResponse } from '../gen/flotilla/v1/control.js';
import { builtCli, cli, cliJson, isRoot, ROOT, start, TestCluster, waitFor, type Proc } from './helpers/procs.js';

interface NodeJ {
  id: string;
  hostname: string;
  role: string;
  availability: string;
  status: string;
  runtime: string;
  managerStatus: { leader: boolean; reachability: string; addr: string } | null;
}
interface ClusterJ {
  managers: Array<{ raftId: string; addr: string; hostname: string; leader: boolean; reachability: string }>;
}
interface TaskJ {
  node: string;
  state: string;
  desiredState: string;
}

function cmdline(p: Proc): string {
  return fs.readFileSync(`/proc/${p.child.pid}/cmdline`, 'utf8').split('\0').join(' ');
}

describe.skipIf(!builtCli())('every manager is a node; join tokens out of ps', () => {
  // created in beforeAll: a describe whose tests are all filtered out runs no hooks
  let c: TestCluster;
  const nodes = () => cliJson<NodeJ[]>(['node', 'ls'], c.env);

  beforeAll(async () => {
    c = new TestCluster('flotilla-daemons-');
    await c.startManager(); // --no-agent
  });
  afterAll(async () => {
    await c?.cleanup();
  });

  it('lists a --no-agent manager as a drained manager node, and its Raft membership in cluster info', async () => {
    const m1 = await waitFor('the manager node', async () => (await nodes()).find((n) => n.hostname === 'm1'));
    expect(m1).toMatchObject({ role: 'manager', availability: 'drain', status: 'ready', runtime: '' });
    expect(m1.managerStatus).toMatchObject({ leader: true, reachability: 'reachable', addr: c.managerAddr });
    const table = await cli(['node', 'ls'], c.env);
    expect(table.stdout).toMatch(/m1\s+Ready\s+Drain\s+Leader\s+none \(no agent\)/);
    const info = await cliJson<ClusterJ>(['cluster', 'info'], c.env);
    expect(info.managers).toEqual([expect.objectContaining({ addr: c.managerAddr, hostname: 'm1', leader: true, reachability: 'reachable' })]);
    expect(info.managers[0]!.raftId).toMatch(/^[0-9a-f]+$/);
    const text = await cli(['cluster', 'info'], c.env);
    expect(text.stdout).toMatch(new RegExp(`${info.managers[0]!.raftId}\\s+${c.managerAddr.replace(/\./g, '\\.')}\\s+m1\\s+Leader`));
    // it cannot run tasks: activating it is refused with one line
    const r = await cli(['node', 'update', '--availability', 'active', 'm1'], c.env);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/m1 is a manager without an agent/);
  });

  it('takes the join token from --token-file or FLOTILLA_TOKEN, never showing it in the command line', async () => {
    const token = await c.token();
    const file = path.join(c.root, 'token');
    fs.writeFileSync(file, `${token}\n`, { mode: 0o600 });
    const byFile = start(['agent', '--data-dir', path.join(c.root, 'n1'), '--manager', c.managerAddr, '--token-file', file, '--hostname', 'n1', '--runtime', 'sim']);
    c.procs.push(byFile);
    const byEnv = start(['agent', '--data-dir', path.join(c.root, 'n2'), '--manager', c.managerAddr, '--hostname', 'n2', '--runtime', 'sim'], { FLOTILLA_TOKEN: token });
    c.procs.push(byEnv);
    await waitFor('n1 and n2 ready', async () => (await nodes()).filter((n) => ['n1', 'n2'].includes(n.hostname) && n.status === 'ready').length === 2);
    for (const p of [byFile, byEnv]) expect(cmdline(p)).not.toContain(token);
    // tasks land on the agents, never on the drained manager node
    const s = await cli(['service', 'create', '--name', 'web', '--replicas', '4', '--timeout', '30s', 'busybox', 'sleep', '1000'], c.env);
    expect(s.code, s.stderr).toBe(0);
    const tasks = await cliJson<TaskJ[]>(['service', 'ps', 'web'], c.env);
    expect(tasks.filter((t) => t.state === 'running').map((t) => t.node).sort()).toEqual(['n1', 'n1', 'n2', 'n2']);
  });

  it('refuses a missing or empty token file with one line naming the flag', async () => {
    const empty = path.join(c.root, 'empty');
    fs.writeFileSync(empty, '\n');
    for (const [f, re] of [
      [path.join(c.root, 'nosuch'), /invalid --token-file ".*nosuch": no such file/],
      [empty, /invalid --token-file ".*empty": expected one join token/],
    ] as const) {
      const r = await cli(['agent', '--data-dir', path.join(c.root, 'bad'), '--manager', c.managerAddr, '--token-file', f, '--runtime', 'sim']);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(re);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    const both = await cli(['manager', '--data-dir', path.join(c.root, 'bad'), '--join', c.managerAddr, '--token', 'x', '--token-file', empty]);
    expect(both.code).not.toBe(0);
    expect(both.stderr).toMatch(/either --token or --token-file/);
  });
});

describe.skipIf(!builtCli() || !isRoot())('a fatal storage error ends the manager; its agent fails over (3 managers)', () => {
  let root = '';
  let disk = '';
  let tokenFile = '';
  let workerTokenFile = '';
  const procs: Proc[] = [];
  const addrs: Record<string, string> = {};
  const sock = (name: string) => path.join(root, `${name}.sock`);
  const env = (name: string) => ({ FLOTILLA_HOST: `unix://${sock(name)}` });
  let mounted = false;

  async function launch(name: string, dir: string, extra: string[] = []): Promise<Proc> {
    const args = ['manager', '--data-dir', dir, '--hostname', name, '--listen-addr', '127.0.0.1:0', '--control-socket', sock(name), '--no-agent', '--heartbeat-period', '500ms', ...extra];
    const p = start(args);
    procs.push(p);
    addrs[name] = await waitFor(`${name} ready`, () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 40_000, 50);
    return p;
  }

  beforeAll(() => {
    // created here: a describe whose tests are all filtered out runs no hooks
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-enospc-'));
    disk = path.join(root, 'disk');
    tokenFile = path.join(root, 'manager-token');
    workerTokenFile = path.join(root, 'worker-token');
    fs.mkdirSync(disk);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'flotilla-test-enospc', disk]);
    mounted = true;
  });
  afterAll(async () => {
    for (const p of procs) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
    await Promise.all(procs.map((p) => p.exited));
    if (mounted) spawnSync('umount', ['-l', disk]);
    if (root) fs.rmSync(root, { recursive: true, force: true });
  });

  it('exits non-zero with one line when the WAL hits ENOSPC, loses no acknowledged write, and the agent moves on', async () => {
    const m1 = await launch('m1', path.join(disk, 'm1'));
    const token = (await cli(['cluster', 'join-token', 'manager', '-q'], env('m1'))).stdout.trim();
    expect(token).toMatch(/^FLTKN-1-[0-9a-f]{64}-[0-9a-z]{32}$/);
    fs.writeFileSync(tokenFile, token, { mode: 0o600 });
    fs.writeFileSync(workerTokenFile, (await cli(['cluster', 'join-token', 'worker', '-q'], env('m1'))).stdout.trim(), { mode: 0o600 });
    // the agent knows only m1: it learns of m2 and m3 from the dispatcher after they join
    const agent = start(['agent', '--data-dir', path.join(root, 'w1'), '--manager', addrs.m1!, '--token-file', workerTokenFile, '--hostname', 'w1', '--runtime', 'sim']);
    procs.push(agent);
    await waitFor('w1 ready', async () => (await cliJson<NodeJ[]>(['node', 'ls'], env('m1'))).find((n) => n.hostname === 'w1')?.status === 'ready');
    const m2 = await launch('m2', path.join(root, 'm2'), ['--join', addrs.m1!, '--token-file', tokenFile]);
    await launch('m3', path.join(root, 'm3'), ['--join', addrs.m1!, '--token-file', tokenFile]);
    expect(cmdline(m2)).not.toContain(token);
    // every manager is a node with its manager status; cluster info lists the three members
    await waitFor('3 manager nodes and w1', async () => {
      const ns = await cliJson<NodeJ[]>(['node', 'ls'], env('m2'));
      const ms = ns.filter((n) => n.role === 'manager');
      return ns.length === 4 && ms.length === 3 && ms.every((n) => n.managerStatus?.reachability === 'reachable' && n.status === 'ready') && ms.find((n) => n.managerStatus?.leader)?.hostname === 'm1';
    });
    const info = await cliJson<ClusterJ>(['cluster', 'info'], env('m3'));
    expect(info.managers.map((m) => `${m.hostname} ${m.addr} ${m.reachability}`).sort()).toEqual(['m1', 'm2', 'm3'].map((h) => `${h} ${addrs[h]} reachable`));
    const before = await cli(['service', 'create', '--name', 'before', '--replicas', '2', '--timeout', '30s', 'busybox', 'sleep', '1000'], env('m1'));
    expect(before.code, before.stderr).toBe(0);
    // give the agent a few heartbeats to hear of m2 and m3
    await new Promise((r) => setTimeout(r, 1500));

    // fill the disk, then write through the leader (m1) until its WAL cannot grow
    const filler = fs.openSync(path.join(disk, 'filler'), 'w');
    try {
      const chunk = Buffer.alloc(256 * 1024, 1);
      for (;;) fs.writeSync(filler, chunk);
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
    } finally {
      fs.closeSync(filler);
    }
    const acked: string[] = [];
    const big = Array.from({ length: 16 }, (_, i) => `K${i}=${'x'.repeat(2000)}`);
    for (let i = 0; m1.child.exitCode === null && i < 2000; i++) {
      const c = new Control(`unix:${sock('m1')}`);
      try {
        const name = `big${i}`;
        await c.call('createService', { spec: ServiceSpec.fromPartial({ name, replicas: 0, task: { container: { image: 'busybox', args: ['true'], env: big } } }) }, 5000);
        acked.push(name);
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      } finally {
        c.close();
      }
    }
    const code = await Promise.race([m1.exited, new Promise<string>((r) => setTimeout(() => r('still running'), 30_000))]);
    expect(code, 'm1 exit code').not.toBe('still running');
    expect(code).not.toBe(0);
    expect(acked.length).toBeGreaterThan(0);
    // one clear line (the daemon's JSON log lines aside)
    const lines = m1.err.join('').split('\n').filter((l) => l.startsWith('flotilla:'));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^flotilla: fatal raft\/storage error in .*m1\/raft: .*(ENOSPC|no space left on device).*: exiting$/);

    // the survivors have every acknowledged write
    for (const m of ['m2', 'm3']) {
      await waitFor(`${m} has every acknowledged write`, async () => {
        const c = new Control(`unix:${sock(m)}`);
        try {
          const have = new Set((await c.call<unknown, ListServicesResponse>('listServices', {}, 10_000)).services.map((s) => s.spec!.name));
          return acked.every((n) => have.has(n)) && have.has('before');
        } finally {
          c.close();
        }
      }, 30_000);
    }
    // the agent registered with the new leader: a new service runs on w1, the old one still does
    expect(agent.child.exitCode).toBeNull();
    await waitFor('w1 ready again through another manager', async () => (await cliJson<NodeJ[]>(['node', 'ls'], env('m2'))).find((n) => n.hostname === 'w1')?.status === 'ready', 60_000);
    const after = await cli(['service', 'create', '--name', 'after', '--replicas', '2', '--timeout', '30s', 'busybox', 'sleep', '1000'], env('m2'));
    expect(after.code, after.stderr).toBe(0);
    const running = (await cliJson<TaskJ[]>(['service', 'ps', 'before'], env('m3'))).filter((t) => t.desiredState === 'running' && t.state === 'running');
    expect(running.map((t) => t.node)).toEqual(['w1', 'w1']);
    // the operator sees the dead manager
    await waitFor('m1 unreachable and down', async () => {
      const n = (await cliJson<NodeJ[]>(['node', 'ls'], env('m2'))).find((x) => x.hostname === 'm1');
      return n?.managerStatus?.reachability === 'unreachable' && n.status === 'down';
    });
    const info2 = await cliJson<ClusterJ>(['cluster', 'info'], env('m2'));
    expect(info2.managers.find((m) => m.hostname === 'm1')).toMatchObject({ reachability: 'unreachable', leader: false });
  }, 180_000);
});

const analyze = spawnSync('systemd-analyze', ['--version']).status === 0;
describe('deploy/systemd units', () => {
  it.skipIf(!analyze)('pass systemd-analyze verify', () => {
    const dir = path.join(ROOT, 'deploy/systemd');
    const units = fs.readdirSync(dir).filter((f) => f.endsWith('.service'));
    expect(units.sort()).toEqual(['flotilla-agent.service', 'flotilla-manager.service']);
    // the units name /usr/local/bin/flotilla (install.sh's link): verify against a stand-in for it
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-units-'));
    try {
      for (const u of units) {
        const text = fs.readFileSync(path.join(dir, u), 'utf8').replaceAll('/usr/local/bin/flotilla', process.execPath);
        fs.writeFileSync(path.join(tmp, u), text);
      }
      const r = spawnSync('systemd-analyze', ['verify', ...units.map((u) => path.join(tmp, u))], { encoding: 'utf8' });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
  it.skipIf(analyze)('skipped: systemd-analyze is not installed (Debian: apt-get install systemd)', () => {
    console.warn('deploy/systemd units not verified: systemd-analyze is not installed (Debian package systemd)');
  });
});
