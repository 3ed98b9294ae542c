/**
 * The control plane end to end, as real processes on loopback: one manager, several agents with the
 * sim runtime (many nodes on one machine), driven through the CLI. Every case runs against both
 * stores: our Raft and an etcd cluster (three real etcd members with client TLS).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, waitFor } from './helpers/procs.js';
import { EtcdCluster, haveEtcd } from './helpers/etcd.js';

interface TaskJ {
  id: string;
  slot: number;
  node: string;
  nodeId: string;
  state: string;
  desiredState: string;
  error: string;
  containerId: string;
}
interface NodeJ {
  id: string;
  hostname: string;
  role: string;
  availability: string;
  status: string;
  managerStatus: unknown;
}

for (const store of ['raft', 'etcd'] as const)
describe.skipIf(!builtCli() || (store === 'etcd' && !haveEtcd()))(`control plane (manager + sim agents as processes, ${store} store)`, () => {
  const c = new TestCluster();
  const etcd = store === 'etcd' ? new EtcdCluster() : undefined;
  const storeFlags = (): string[] => (etcd ? [...etcd.managerFlags('/flotilla/cp'), '--etcd-lease-ttl', '2'] : []);
  const ps = (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);
  const running = async (svc: string) => (await ps(svc)).filter((t) => t.desiredState === 'running' && t.state === 'running');
  const nodes = () => cliJson<NodeJ[]>(['node', 'ls'], c.env);

  beforeAll(async () => {
    await etcd?.start(3);
    await c.startManager({ extra: storeFlags() });
    expect((await cliJson<{ store: string }>(['cluster', 'info'], c.env)).store).toMatch(store === 'etcd' ? /^etcd https:\/\/127\.0\.0\.1:\d+,.* \/flotilla\/cp$/ : /^raft$/);
    for (const h of ['n1', 'n2', 'n3']) await c.startAgent(h, { labels: [`zone=${h === 'n3' ? 'b' : 'a'}`] });
    await waitFor('3 ready workers', async () => (await nodes()).filter((n) => n.role === 'worker' && n.status === 'ready').length === 3);
  });
  afterAll(async () => {
    try {
      await c.cleanup();
    } finally {
      await etcd?.stop();
    }
  });

  it('lists nodes with stable fields', async () => {
    const all = await nodes();
    // the manager (--no-agent) is a node too: drained, it runs no tasks
    expect(all.find((n) => n.hostname === 'm1')).toMatchObject({ role: 'manager', availability: 'drain', status: 'ready' });
    const ns = all.filter((n) => n.role === 'worker');
    expect(ns.map((n) => n.hostname).sort()).toEqual(['n1', 'n2', 'n3']);
    for (const n of ns) {
      expect(n).toMatchObject({ role: 'worker', availability: 'active', status: 'ready' });
      expect(n.id).toMatch(/^[a-z0-9]{25}$/);
    }
  });

  it('creates a service, spreads it over the nodes and waits until it converges', async () => {
    const r = await cli(['service', 'create', '--name', 'web', '--replicas', '6', 'busybox:latest', 'sleep', '1000'], c.env);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/overall progress: 6 out of 6 tasks/);
    const tasks = await running('web');
    expect(tasks).toHaveLength(6);
    expect(tasks.map((t) => t.slot).sort((a, b) => a - b)).toEqual([1, 2, 3, 4, 5, 6]);
    const perNode = new Map<string, number>();
    for (const t of tasks) perNode.set(t.node, (perNode.get(t.node) ?? 0) + 1);
    expect([...perNode.values()]).toEqual([2, 2, 2]);
    for (const t of tasks) expect(t.containerId).not.toBe('');
    const ls = await cli(['service', 'ls'], c.env);
    expect(ls.stdout).toMatch(/web\s+replicated\s+6\/6\s+busybox:latest/);
  });

  it('scales up and down', async () => {
    expect((await cli(['service', 'scale', 'web=9'], c.env)).code).toBe(0);
    expect(await running('web')).toHaveLength(9);
    expect((await cli(['service', 'scale', 'web=3'], c.env)).code).toBe(0);
    await waitFor('3 running', async () => (await running('web')).length === 3 && (await ps('web')).filter((t) => t.desiredState === 'running').length === 3);
    expect((await running('web')).map((t) => t.slot).sort()).toEqual([1, 2, 3]);
  });

  it('pause keeps tasks, drain moves them away', async () => {
    const before = await running('web');
    const victim = before[0]!.node;
    expect((await cli(['node', 'update', '--availability', 'pause', victim], c.env)).code).toBe(0);
    await new Promise((r) => setTimeout(r, 500));
    expect((await running('web')).filter((t) => t.node === victim)).toHaveLength(before.filter((t) => t.node === victim).length);
    expect((await cli(['node', 'update', '--availability', 'drain', victim], c.env)).code).toBe(0);
    await waitFor('tasks moved off the drained node', async () => {
      const r = await running('web');
      return r.length === 3 && r.every((t) => t.node !== victim);
    });
    expect((await cli(['node', 'update', '--availability', 'active', victim], c.env)).code).toBe(0);
  });

  it('keeps a task pending with the reason when it fits nowhere, and create exits non-zero with it', async () => {
    const r = await cli(['service', 'create', '--name', 'picky', '--constraint', 'node.labels.zone==c', '--timeout', '2s', 'busybox', 'sleep', '1'], c.env);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/no suitable node/);
    expect(r.stderr).toMatch(/node\.labels\.zone==c/);
    const t = (await ps('picky'))[0]!;
    expect(t.state).toBe('pending');
    expect(t.error).toMatch(/3 nodes? fails? constraint node\.labels\.zone==c/);
    // a constraint on an engine label (agent --label) and one on a node label (node update --label-add)
    const ok = await cli(['service', 'create', '--name', 'zoned', '--replicas', '2', '--constraint', 'engine.labels.zone==b', 'busybox', 'sleep', '1000'], c.env);
    expect(ok.code).toBe(0);
    expect((await running('zoned')).every((x) => x.node === 'n3')).toBe(true);
    expect((await cli(['node', 'update', '--label-add', 'zone=c', 'n2'], c.env)).code).toBe(0);
    await waitFor('picky placed on n2', async () => (await running('picky')).map((x) => x.node).join() === 'n2');
    expect((await cli(['node', 'update', '--label-rm', 'zone', 'n2'], c.env)).code).toBe(0);
    expect((await cli(['service', 'rm', 'picky', 'zoned'], c.env)).code).toBe(0);
  });

  it('rejects bad input with one clear line and changes nothing', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['service', 'create', '--name', 'bad', '--limit-memory', '12xb', 'busybox'], /--limit-memory.*12xb/],
      [['service', 'create', '--name', 'bad', '--replicas', '-1', 'busybox'], /replicas/],
      [['service', 'create', '--name', 'bad', '--constraint', 'node.colour=red', 'busybox'], /constraint.*node\.colour=red/],
      [['service', 'create', '--name', 'bad', '--restart-delay', '5 parsecs', 'busybox'], /--restart-delay/],
      [['service', 'create', '--name', 'bad name!', 'busybox'], /name/],
      [['service', 'create', '--name', 'web', 'busybox'], /already exists/],
      [['service', 'scale', 'nosuch=3'], /not found/],
      [['node', 'update', '--availability', 'sleepy', 'n1'], /--availability.*sleepy/],
      [['node', 'inspect', 'nosuchnode'], /not found/],
      [['node', 'promote', 'n1'], /runs no manager process/],
      [['node', 'rm', 'n1'], /is not down/],
    ];
    const before = await cliJson<unknown[]>(['service', 'ls'], c.env);
    for (const [args, re] of cases) {
      const r = await cli(args, c.env);
      expect(r.code, args.join(' ')).not.toBe(0);
      expect(r.stderr, args.join(' ')).toMatch(re);
      expect(r.stderr.trim().split('\n').length, args.join(' ')).toBeLessThanOrEqual(2);
    }
    expect(await cliJson<unknown[]>(['service', 'ls'], c.env)).toHaveLength(before.length);
  });

  it('refuses an agent with a wrong token and never lists it', async () => {
    const p = await c.startAgent('intruder', { token: 'FLTTKN-1-nope-wnope' });
    const code = await p.exited;
    expect(code).not.toBe(0);
    expect(p.err.join('')).toMatch(/token/i);
    expect((await nodes()).map((n) => n.hostname)).not.toContain('intruder');
  });

  it('marks a killed agent down and moves its tasks', async () => {
    const r = await running('web');
    const victimHost = r[0]!.node;
    const proc = c.procs.find((p) => p.child.spawnargs.includes(victimHost) && p.child.spawnargs.includes('agent'))!;
    await c.kill(proc, 'SIGKILL');
    await waitFor('node down', async () => (await nodes()).find((n) => n.hostname === victimHost)?.status === 'down', 10_000);
    await waitFor('tasks moved', async () => {
      const now = await running('web');
      return now.length === 3 && now.every((t) => t.node !== victimHost);
    });
    const orphaned = (await ps('web')).filter((t) => t.node === victimHost && t.desiredState === 'shutdown');
    expect(orphaned.length).toBeGreaterThan(0);
  });

  it('a restarted manager keeps its state', async () => {
    const svcBefore = await cliJson<Array<{ id: string; name: string }>>(['service', 'ls'], c.env);
    const m = c.procs[0]!;
    await c.kill(m, 'SIGKILL');
    c.procs.splice(0, 1);
    await c.startManager({ extra: storeFlags() });
    const svcAfter = await cliJson<Array<{ id: string; name: string }>>(['service', 'ls'], c.env);
    expect(svcAfter.map((s) => s.id).sort()).toEqual(svcBefore.map((s) => s.id).sort());
    // agents reconnect and the service is still whole
    await waitFor('web running again after manager restart', async () => (await running('web')).length === 3, 20_000);
  });
});
