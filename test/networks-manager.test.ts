/**
 * The manager side of overlay networks, as processes: a real manager driven through the CLI, and
 * nodes that speak the dispatcher protocol from this test (register, heartbeat, report task states,
 * read the assignment stream), so that what each node is sent, and when, can be measured. No data
 * plane is involved.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AssignmentsMessage, DispatcherClient, type NetworkView, type RegisterRequest, type RegisterResponse } from '../gen/flotilla/v1/dispatcher.js';
import { HealthState, TaskState, type Task, type TaskStatus } from '../gen/flotilla/v1/objects.js';
import { TestCluster, builtCli, cli, cliJson, waitFor } from './helpers/procs.js';
import { TLS_CHANNEL_OPTIONS, TlsSource, clientCredentials } from '../manager/ca/credentials.js';
import { joinCluster } from '../manager/ca/service.js';

/** A node played by the test: it keeps the last view of each network it was sent, and when. */
class FakeNode {
  client!: DispatcherClient;
  nodeId = '';
  sessionId = '';
  readonly tasks = new Map<string, Task>();
  readonly views = new Map<string, NetworkView>();
  readonly log: Array<{ at: number; msg: AssignmentsMessage }> = [];
  private timer: NodeJS.Timeout | undefined;
  private stream: grpc.ClientReadableStream<AssignmentsMessage> | undefined;

  constructor(
    readonly hostname: string,
    readonly addr: string,
    readonly manager: string,
  ) {}

  private call<Req, Res>(fn: (req: Req, cb: (err: grpc.ServiceError | null, res: Res) => void) => unknown, req: Req): Promise<Res> {
    return new Promise((resolve, reject) => fn.call(this.client, req, (err, res) => (err ? reject(err) : resolve(res))));
  }

  async start(token: string): Promise<void> {
    // joins as an agent does (mutual TLS: the token gets a worker certificate, which the dispatcher binds the node id to)
    const tls = new TlsSource(await joinCluster(this.manager, token));
    this.client = new DispatcherClient(this.manager, clientCredentials(tls), TLS_CHANNEL_OPTIONS);
    const reg = await this.call<RegisterRequest, RegisterResponse>(this.client.register, {
      token,
      nodeId: '',
      addr: this.addr,
      images: [],
      contentAddr: '',
      description: {
        hostname: this.hostname,
        resources: { nanoCpus: 4e9, memoryBytes: 8 * 1024 ** 3, pids: 0 },
        engineLabels: {},
        os: 'linux',
        arch: 'x64',
        runtime: 'sim',
        managerAddr: '',
      },
    });
    this.nodeId = reg.nodeId;
    this.sessionId = reg.sessionId;
    this.timer = setInterval(() => {
      this.client.heartbeat({ nodeId: this.nodeId, sessionId: this.sessionId, images: [], contentAddr: '' }, () => {});
    }, 150);
    this.stream = this.client.assignments({ nodeId: this.nodeId, sessionId: this.sessionId });
    this.stream.on('data', (msg: AssignmentsMessage) => {
      this.log.push({ at: Date.now(), msg });
      for (const t of msg.update) this.tasks.set(t.id, t);
      for (const id of msg.remove) this.tasks.delete(id);
      for (const v of msg.networkViews) this.views.set(v.network!.id, v);
      for (const id of msg.removeNetworks) this.views.delete(id);
      // an obliging agent: assigned tasks run
      const run = msg.update.filter((t) => t.status?.state === TaskState.TASK_STATE_ASSIGNED && t.desiredState === TaskState.TASK_STATE_RUNNING);
      if (run.length) void this.report(run.map((t) => t.id), TaskState.TASK_STATE_RUNNING).catch(() => {});
      const stop = msg.update.filter((t) => t.desiredState > TaskState.TASK_STATE_RUNNING && (t.status?.state ?? 0) < TaskState.TASK_STATE_COMPLETE);
      if (stop.length) void this.report(stop.map((t) => t.id), TaskState.TASK_STATE_SHUTDOWN).catch(() => {});
    });
    this.stream.on('error', () => {});
  }

  report(ids: string[], state: TaskState, health = HealthState.HEALTH_STATE_NONE): Promise<unknown> {
    const status = (id: string): TaskStatus => ({
      state,
      timestamp: Date.now(),
      message: '',
      err: '',
      exitCode: state === TaskState.TASK_STATE_FAILED ? 1 : 0,
      containerId: `c-${id}`,
      pid: 1,
      health,
      oomKilled: false,
    });
    return this.call(this.client.updateTaskStatus, { nodeId: this.nodeId, sessionId: this.sessionId, updates: ids.map((taskId) => ({ taskId, status: status(taskId) })) });
  }

  /** Stops heartbeats and the stream: the node dies. */
  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.stream?.cancel();
    this.client.close();
  }

  viewByName(name: string): NetworkView | undefined {
    return [...this.views.values()].find((v) => v.network?.spec?.name === name);
  }

  readyPeers(name: string): string[] {
    return (this.viewByName(name)?.peers ?? []).filter((p) => p.ready).map((p) => p.taskId).sort();
  }
}

interface TaskJ {
  id: string;
  slot: number;
  nodeId: string;
  state: string;
  desiredState: string;
  error: string;
  networks: Array<{ networkId: string; addresses: string[] }>;
}

/** The bound a view change must reach every node within (the issue asks for well under 1 s). */
const BOUND_MS = 500;

describe.skipIf(!builtCli())('networks: manager, allocator and dispatcher views (processes)', () => {
  const c = new TestCluster('flotilla-netmgr-');
  const nodes: FakeNode[] = [];
  const ps = (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);

  beforeAll(async () => {
    await c.startManager({ extra: ['--default-addr-pool', '10.128.0.0/16', '--default-addr-pool-mask-length', '26'] });
    const token = await c.token();
    for (let i = 1; i <= 3; i++) {
      const n = new FakeNode(`h${i}`, `192.168.77.${i}`, c.managerAddr);
      await n.start(token);
      nodes.push(n);
    }
  });
  afterAll(async () => {
    for (const n of nodes) n.stop();
    await c.cleanup();
  });

  it('network create/ls/inspect/rm with the cluster pool; bad input is one line and exit 1', async () => {
    const r = await cli(['network', 'create', 'app'], c.env);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const [app] = await cliJson<Array<{ ipam: { subnet: string; gateway: string }; vni: number; mtu: number; driver: string }>>(['network', 'inspect', 'app'], c.env);
    expect(app).toMatchObject({ ipam: { subnet: '10.128.0.0/26', gateway: '10.128.0.1' }, vni: 4096, mtu: 0, driver: 'overlay' });
    expect((await cli(['network', 'create', '--subnet', '10.40.0.0/24', '--opt', 'mtu=1400', '--label', 'team=x', 'other'], c.env)).code).toBe(0);
    const ls = await cli(['network', 'ls'], c.env);
    expect(ls.stdout).toMatch(/^NETWORK ID\s+NAME\s+DRIVER\s+SCOPE\s+SUBNET\s+GATEWAY\s+VNI\n/);
    expect(ls.stdout).toMatch(/\sother\s+overlay\s+swarm\s+10\.40\.0\.0\/24\s+10\.40\.0\.1\s+4097\n/);
    const bad: Array<[string[], string]> = [
      [['--subnet', '10.40.0.0/25', 'x'], 'flotilla: subnet 10.40.0.0/25 overlaps subnet 10.40.0.0/24 of network other\n'],
      [['--subnet', '10.50.0.1/24', 'x'], 'flotilla: invalid --subnet "10.50.0.1/24": host bits set: the subnet is 10.50.0.0/24\n'],
      [['--subnet', '10.50.0.0/24', '--gateway', '10.51.0.1', 'x'], 'flotilla: invalid --gateway "10.51.0.1": not a host address of subnet 10.50.0.0/24\n'],
      [['--opt', 'mtu=big', 'x'], 'flotilla: invalid --opt mtu "big": not a number\n'],
      [['bad/name'], 'flotilla: invalid name "bad/name": must be 1-63 characters: letters, digits, "_", "." and "-", starting with a letter or digit\n'],
      [['app'], 'flotilla: network "app" already exists\n'],
    ];
    for (const [args, err] of bad) {
      const b = await cli(['network', 'create', ...args], c.env);
      expect({ args, stderr: b.stderr, code: b.code }).toEqual({ args, stderr: err, code: 1 });
    }
    const unknown = await cli(['service', 'create', '-d', '--name', 'u', '--network', 'nope', 'busybox:latest'], c.env);
    expect(unknown).toMatchObject({ code: 1, stderr: 'flotilla: invalid network "nope": no such network\n' });
    const mixed = await cli(['service', 'create', '-d', '--name', 'u', '--network', 'host', '--network', 'app', 'busybox:latest'], c.env);
    expect(mixed).toMatchObject({ code: 1, stderr: 'flotilla: invalid --network "host": host and none cannot be combined with other networks\n' });
    const adv = await cli(['agent', '--manager', c.managerAddr, '--token', 'x', '--data-dir', `${c.root}/adv`, '--advertise-addr', '10.0.0.1:4789'], c.env);
    expect(adv).toMatchObject({ code: 1, stderr: 'flotilla: invalid --advertise-addr "10.0.0.1:4789": expected an IPv4 address (no port)\n' });
    const pool = await cli(['manager', '--data-dir', `${c.root}/pool`, '--default-addr-pool', '10.0.0.0/33'], c.env);
    expect(pool).toMatchObject({ code: 1, stderr: 'flotilla: invalid --default-addr-pool "10.0.0.0/33": not an IPv4 CIDR (e.g. 10.0.0.0/8)\n' });
    expect((await cli(['network', 'rm', 'other'], c.env)).code).toBe(0);
  });

  it('views go to the nodes with tasks on the network, with every peer; network rm is refused while used', async () => {
    const r = await cli(['service', 'create', '-d', '--name', 'a', '--replicas', '2', '--replicas-max-per-node', '1', '--constraint', 'node.hostname!=h3', '--network', 'app', 'busybox:latest', 'sleep', '1000'], c.env);
    expect(r.stderr).toBe('');
    const [h1, h2, h3] = nodes as [FakeNode, FakeNode, FakeNode];
    await waitFor('both nodes see 2 ready peers', () => h1.readyPeers('app').length === 2 && h2.readyPeers('app').length === 2, 10_000, 20);
    expect(h3.viewByName('app')).toBeUndefined();
    const view = h1.viewByName('app')!;
    expect(view.peers.map((p) => p.nodeAddr).sort()).toEqual(['192.168.77.1', '192.168.77.2']);
    for (const p of view.peers) expect(p.address).toMatch(/^10\.128\.0\.\d+\/26$/);
    expect(view.endpoints).toEqual([expect.objectContaining({ serviceName: 'a', vip: expect.stringMatching(/^10\.128\.0\.\d+\/26$/) as unknown })]);
    expect(view.network?.allocation?.vni).toBe(4096);
    const rm = await cli(['network', 'rm', 'app'], c.env);
    expect(rm.code).toBe(1);
    expect(rm.stderr).toMatch(/^flotilla: network app is in use by service a: /);
  });

  it('a failed task, an unhealthy one and a scale down leave every view within the bound', async () => {
    const [h1, h2] = nodes as [FakeNode, FakeNode];
    const onH1 = [...h1.tasks.values()].find((t) => t.serviceName === 'a')!;
    // unhealthy on h1: h2 sees the peer not ready
    let t0 = Date.now();
    await h1.report([onH1.id], TaskState.TASK_STATE_RUNNING, HealthState.HEALTH_STATE_UNHEALTHY);
    await waitFor('unhealthy peer not ready on h2', () => !h2.readyPeers('app').includes(onH1.id), 5000, 5);
    const unhealthyMs = Date.now() - t0;
    // failure: the peer leaves the views (the node that ran it drops the network, having no task on it)
    t0 = Date.now();
    await h1.report([onH1.id], TaskState.TASK_STATE_FAILED);
    await waitFor('failed peer gone on h2', () => !h2.viewByName('app')?.peers.some((p) => p.taskId === onH1.id), 5000, 5);
    const failedMs = Date.now() - t0;
    // its replacement comes back on h1 (h3 is excluded by the constraint)
    await waitFor('2 ready again', () => h2.readyPeers('app').length === 2, 10_000, 20);
    // scale down to 1: the stopped task leaves the ready set at once (desired shutdown). Measured from
    // the moment its own node is told to stop it (the commit reaching the dispatcher) to the other
    // node's view without it as a ready peer.
    const from = new Map([h1, h2].map((n) => [n, n.log.length] as const));
    const s = await cli(['service', 'scale', '-d', 'a=1'], c.env);
    expect(s.stderr).toBe('');
    const stopped = await waitFor('a task told to stop', () => {
      for (const n of [h1, h2])
        for (const e of n.log.slice(from.get(n))) for (const t of e.msg.update) if (t.serviceName === 'a' && t.desiredState > TaskState.TASK_STATE_RUNNING) return { n, t, at: e.at };
      return undefined;
    }, 5000, 5);
    const other = stopped.n === h1 ? h2 : h1;
    const dropped = (e: { msg: AssignmentsMessage }): boolean => e.msg.networkViews.some((v) => !v.peers.some((p) => p.taskId === stopped.t.id && p.ready));
    await waitFor('the other node drops the stopped peer from its ready set', () => other.log.slice(from.get(other)).some(dropped), 5000, 5);
    const seen = other.log.slice(from.get(other)).find(dropped);
    expect(seen).toBeDefined();
    const scaleMs = Math.abs(seen!.at - stopped.at);
    console.log(`view latency: unhealthy ${unhealthyMs} ms, failed ${failedMs} ms, scale down ${scaleMs} ms (between the stop order to one node and the view change on the other)`);
    expect(unhealthyMs).toBeLessThan(BOUND_MS);
    expect(failedMs).toBeLessThan(BOUND_MS);
    expect(scaleMs).toBeLessThan(BOUND_MS);
  });

  it('a full network keeps the task pending with the reason in service ps; addresses come back when tasks end', async () => {
    expect((await cli(['network', 'create', '--subnet', '10.60.0.0/29', 'tiny'], c.env)).code).toBe(0);
    expect((await cli(['service', 'create', '-d', '--name', 'big', '--replicas', '5', '--network', 'tiny', 'busybox:latest', 'sleep', '1000'], c.env)).stderr).toBe('');
    const reason = 'network tiny has no free address (subnet /29, 6 in use)';
    await waitFor('a task pending on the full network', async () => (await ps('big')).some((t) => t.state === 'pending' && t.error === reason), 10_000);
    const table = await cli(['service', 'ps', 'big'], c.env);
    expect(table.stdout).toContain(`Pending`);
    expect(table.stdout).toContain(`"${reason}"`);
    const tasks = await ps('big');
    const addrs = tasks.filter((t) => t.networks.length).map((t) => t.networks[0]!.addresses[0]);
    expect(new Set(addrs).size).toBe(4);
    // scale to 3: freed addresses, nothing pending
    expect((await cli(['service', 'scale', '-d', 'big=3'], c.env)).code).toBe(0);
    await waitFor('3 running, none pending', async () => {
      const all = (await ps('big')).filter((t) => t.desiredState === 'running');
      return all.length === 3 && all.every((t) => t.state === 'running');
    }, 10_000);
    // rm: the network can go once the service is gone and its tasks ended
    expect((await cli(['service', 'rm', 'big'], c.env)).code).toBe(0);
    await waitFor('network tiny removable', async () => (await cli(['network', 'rm', 'tiny'], c.env)).code === 0, 10_000, 200);
  });

  it('service update --network-add/--network-rm/--endpoint-mode: VIPs follow, names resolve to ids', async () => {
    expect((await cli(['network', 'create', 'side'], c.env)).code).toBe(0);
    const inspect = async () => (await cliJson<Array<{ spec: { task: { networks: Array<{ target: string }> }; endpoint?: { mode: number } }; endpoint: { virtualIps: Array<{ networkId: string }> } | null }>>(['service', 'inspect', 'a'], c.env))[0]!;
    const nets = await cliJson<Array<{ id: string; name: string }>>(['network', 'ls'], c.env);
    const id = (name: string) => nets.find((n) => n.name === name)!.id;
    const add = await cli(['service', 'update', '-d', '--network-add', 'side', 'a'], c.env);
    expect(add.stderr).toBe('');
    await waitFor('2 VIPs', async () => (await inspect()).endpoint?.virtualIps.length === 2, 10_000, 100);
    expect((await inspect()).spec.task.networks.map((n) => n.target).sort()).toEqual([id('app'), id('side')].sort());
    const rm = await cli(['service', 'update', '-d', '--network-rm', 'app', 'a'], c.env);
    expect(rm.stderr).toBe('');
    await waitFor('VIP on app freed', async () => {
      const v = (await inspect()).endpoint?.virtualIps ?? [];
      return v.length === 1 && v[0]!.networkId === id('side');
    }, 10_000, 100);
    const notOn = await cli(['service', 'update', '-d', '--network-rm', 'app', 'a'], c.env);
    expect(notOn).toMatchObject({ code: 1, stderr: 'flotilla: invalid --network-rm "app": the service is not on this network\n' });
    const badMode = await cli(['service', 'update', '-d', '--endpoint-mode', 'rr', 'a'], c.env);
    expect(badMode).toMatchObject({ code: 1, stderr: 'flotilla: invalid --endpoint-mode "rr": must be vip or dnsrr\n' });
    expect((await cli(['service', 'update', '-d', '--endpoint-mode', 'dnsrr', 'a'], c.env)).stderr).toBe('');
    await waitFor('no VIP in dnsrr', async () => (await inspect()).endpoint?.virtualIps.length === 0, 10_000, 100);
    // back on app for the next test
    expect((await cli(['service', 'update', '-d', '--network-add', 'app', '--endpoint-mode', 'vip', 'a'], c.env)).stderr).toBe('');
    await waitFor('2 VIPs again', async () => (await inspect()).endpoint?.virtualIps.length === 2, 10_000, 100);
  });

  it('a node that dies leaves every other node\'s views', async () => {
    const [h1, h2, h3] = nodes as [FakeNode, FakeNode, FakeNode];
    // a service on all three nodes
    expect((await cli(['service', 'create', '-d', '--name', 'g', '--mode', 'global', '--network', 'app', 'busybox:latest', 'sleep', '1000'], c.env)).stderr).toBe('');
    await waitFor('3 peers of g on h1', () => (h1.viewByName('app')?.peers ?? []).filter((p) => p.serviceName === 'g' && p.ready).length === 3, 10_000, 20);
    h3.stop();
    // 3 missed heartbeats of 500 ms, then the node is down: its peers leave h1's and h2's views
    await waitFor('h3 peers gone', () => [h1, h2].every((n) => !(n.viewByName('app')?.peers ?? []).some((p) => p.nodeAddr === '192.168.77.3')), 10_000, 20);
    expect((await cli(['node', 'rm', 'h3'], c.env)).code).toBe(0);
    expect(h1.viewByName('app')!.peers.some((p) => p.nodeAddr === '192.168.77.3')).toBe(false);
  });
});
