/**
 * The node data plane (agent/network) on the real multi-host test bed, driven by hand-built
 * NetworkViews (what the manager's allocator sends): one NodeNetwork per test bed host, running its
 * commands inside that host's network namespace; "tasks" are plain network namespaces attached with the
 * real CNI plugins, exactly as a container's namespace is.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AssignmentsType, type NetworkView } from '../gen/flotilla/v1/dispatcher.js';
import { NodeNetwork } from '../agent/network/node-network.js';
import { Testbed, type TestbedHost } from './helpers/testbed.js';
import { counters, handView, icmpInEchos, inNs, linkNames, mtuOf, ping, tcpSend, tcpServer, type HandNetwork, type HandTask } from './helpers/overlay.js';

const root = process.getuid?.() === 0;
const cni = fs.existsSync('/usr/lib/cni/bridge') && fs.existsSync('/usr/lib/cni/static') && fs.existsSync('/usr/lib/cni/loopback');
const why = !root ? 'needs root' : !cni ? 'needs the CNI plugins (apt-get install containernetworking-plugins)' : '';
if (why) console.warn(`skipping the data-plane tests: ${why}`);

const A: HandNetwork = { id: 'netA', name: 'alpha', vni: 4101, subnet: '10.77.1.0/24', gateway: '10.77.1.1' };
const B: HandNetwork = { id: 'netB', name: 'beta', vni: 4102, subnet: '10.77.2.0/24', gateway: '10.77.2.1', mtu: 1400 };

const complete = (views: NetworkView[]) => ({ type: AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE, networks: [], removeNetworks: [], networkViews: views });
const incremental = (views: NetworkView[], remove: string[] = []) => ({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL, networks: [], removeNetworks: remove, networkViews: views });

describe.skipIf(why !== '')('overlay data plane on the test bed', () => {
  let bed: Testbed;
  let dir: string;
  const nets: NodeNetwork[] = [];
  let hosts: TestbedHost[] = [];
  const hostNs = (i: number) => `/run/netns/${hosts[i]!.netns}`;
  // t1 (h1, A), t2 (h2, A), t3 (h3, A), t4 (h3, B only), t5 (h2, B)
  let tasks: (HandTask & { host: number; net: HandNetwork })[] = [];
  const viewOf = (n: HandNetwork, without: string[] = []) =>
    handView(
      n,
      tasks.filter((t) => t.net === n && !without.includes(t.taskId)),
    );
  const nsOf = (taskId: string) => nets[tasks.find((t) => t.taskId === taskId)!.host]!.netnsPath(taskId);

  beforeAll(async () => {
    bed = await Testbed.create({ managers: 1, agents: 2, runtime: 'sim' });
    hosts = bed.hosts;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-netdp-'));
    for (const [i, h] of hosts.entries()) {
      nets.push(await NodeNetwork.open({ stateDir: path.join(dir, h.name), localAddr: h.ip, hostNetns: hostNs(i) }));
    }
    const t = (taskId: string, host: number, net: HandNetwork, last: number) => ({
      taskId,
      host,
      net,
      nodeId: `node-${hosts[host]!.name}`,
      nodeAddr: hosts[host]!.ip,
      address: `${net.subnet.split('.').slice(0, 3).join('.')}.${last}/24`,
    });
    tasks = [t('t1', 0, A, 11), t('t2', 1, A, 12), t('t3', 2, A, 13), t('t4', 2, B, 14), t('t5', 1, B, 15)];
    const views = [viewOf(A), viewOf(B)];
    for (const n of nets) await n.applyAssignments(complete(views));
    for (const task of tasks) {
      await nets[task.host]!.attach(task.taskId, [{ networkId: task.net.id, addresses: [task.address], aliases: [] }]);
    }
  }, 120_000);

  afterAll(async () => {
    for (const n of nets) await n.teardown().catch(() => undefined);
    const problems = bed ? await bed.destroy() : [];
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
    expect(problems).toEqual([]);
  }, 60_000);

  it('builds one bridge and one VXLAN device per network on the hosts that have its tasks, with the overlay MTU', async () => {
    expect((await linkNames(hostNs(0))).filter((l) => l.startsWith('fl-')).sort()).toEqual(['fl-br-4101', 'fl-vx-4101']);
    expect((await linkNames(hostNs(2))).filter((l) => l.startsWith('fl-')).sort()).toEqual(['fl-br-4101', 'fl-br-4102', 'fl-vx-4101', 'fl-vx-4102']);
    // underlay 1500: 1450 on A; B says mtu 1400
    expect(await mtuOf(hostNs(0), 'fl-vx-4101')).toBe(1450);
    expect(await mtuOf(nsOf('t1'), 'eth0')).toBe(1450);
    expect(await mtuOf(hostNs(2), 'fl-vx-4102')).toBe(1400);
    expect(await mtuOf(nsOf('t4'), 'eth0')).toBe(1400);
    const vx = JSON.parse((await inNs(hostNs(0), ['ip', '-j', '-d', 'link', 'show', 'fl-vx-4101'])).stdout)[0].linkinfo.info_data;
    expect(vx).toMatchObject({ id: 4101, port: 4789, local: hosts[0]!.ip, learning: false });
    // the task interface carries the MAC every other node derives from its address
    const eth = JSON.parse((await inNs(nsOf('t1'), ['ip', '-j', 'addr', 'show', 'eth0'])).stdout)[0];
    expect(eth.address).toBe('02:42:0a:4d:01:0b');
    expect(eth.addr_info.map((a: { local: string }) => a.local)).toContain('10.77.1.11');
    // CNI CHECK (with the ADD's result) passes, and fails once the interface lost its address
    await nets[0]!.check('t1');
    await inNs(nsOf('t1'), ['ip', 'addr', 'del', '10.77.1.11/24', 'dev', 'eth0']);
    try {
      await expect(nets[0]!.check('t1')).rejects.toThrow(/CNI bridge CHECK/);
    } finally {
      await inNs(nsOf('t1'), ['ip', 'addr', 'add', '10.77.1.11/24', 'dev', 'eth0']);
    }
  });

  it('carries ping and TCP between tasks on different hosts over VXLAN only', async () => {
    const before = await counters(hostNs(0), 'fl-vx-4101');
    expect(await ping(nsOf('t1'), '10.77.1.12')).toBe(true);
    expect(await ping(nsOf('t1'), '10.77.1.13')).toBe(true);
    expect(await ping(nsOf('t5'), '10.77.2.14')).toBe(true);
    const srv = await tcpServer(nsOf('t3'), 7000);
    try {
      const r = await tcpSend(nsOf('t1'), '10.77.1.13', 7000, 4 * 1024 * 1024);
      expect(r.bytes).toBe(4 * 1024 * 1024);
    } finally {
      srv.kill();
    }
    const after = await counters(hostNs(0), 'fl-vx-4101');
    // 4 echo requests + >= 4 MiB of TCP left h1 through its VXLAN device
    expect(after.tx - before.tx).toBeGreaterThanOrEqual(4);
    expect(after.txBytes - before.txBytes).toBeGreaterThan(4 * 1024 * 1024);
    // the hosts' underlay carries it as UDP 4789: the task namespaces have no route but their overlay
    const routes = (await inNs(nsOf('t1'), ['ip', 'route'])).stdout.trim().split('\n');
    expect(routes).toEqual([expect.stringMatching(/^10\.77\.1\.0\/24 dev eth0/)]);
  });

  it('answers the gateway from the local bridge only, without ARP over the overlay', async () => {
    const before = await counters(hostNs(1), 'fl-vx-4101');
    await inNs(nsOf('t2'), ['ip', 'neigh', 'flush', 'all']);
    expect(await ping(nsOf('t2'), '10.77.1.1', 3)).toBe(true);
    const after = await counters(hostNs(1), 'fl-vx-4101');
    expect({ tx: after.tx - before.tx, rx: after.rx - before.rx }).toEqual({ tx: 0, rx: 0 });
    const brMac = JSON.parse((await inNs(hostNs(1), ['ip', '-j', 'link', 'show', 'fl-br-4101'])).stdout)[0].address;
    const neigh = JSON.parse((await inNs(nsOf('t2'), ['ip', '-j', 'neigh', 'show', '10.77.1.1'])).stdout) as { lladdr: string }[];
    expect(neigh.map((n) => n.lladdr)).toEqual([brMac]);
    // h1 ARPs for an address its bridge does not know: "who has 10.77.1.99, tell 10.77.1.1" from h1's
    // bridge MAC, flooded over the overlay to t2 on h2; t2's gateway entry must not move to h1 (its
    // replies routed through the gateway would leave through the wrong node: docs/networking.md)
    await new Promise((r) => setTimeout(r, 1100)); // past the neighbour entry's locktime (1 s)
    await ping(hostNs(0), '10.77.1.99', 1);
    const pinned = JSON.parse((await inNs(nsOf('t2'), ['ip', '-j', 'neigh', 'show', '10.77.1.1'])).stdout) as { lladdr: string; state: string[] }[];
    expect(pinned).toEqual([expect.objectContaining({ lladdr: brMac, state: ['PERMANENT'] })]);
  });

  it('isolates networks: a task on A cannot reach one only on B', async () => {
    // one isolation table for both networks of host 2 (one chain on the forward hook, not one per network)
    expect((await inNs(hostNs(2), ['nft', 'list', 'tables'])).stdout.trim().split('\n').filter((l) => l.includes('flotilla'))).toEqual(['table inet flotilla-isolation']);
    expect(await ping(nsOf('t1'), '10.77.2.14', 1)).toBe(false);
    // not even through its gateway (the host neither routes between overlays nor into them)
    expect((await inNs(nsOf('t3'), ['ip', 'route', 'add', '10.77.2.0/24', 'via', '10.77.1.1'])).code).toBe(0);
    try {
      await inNs(hostNs(2), ['sysctl', '-w', 'net.ipv4.ip_forward=1']);
      const before = await icmpInEchos(nsOf('t4'));
      expect(await ping(nsOf('t3'), '10.77.2.14', 2)).toBe(false);
      // not even one way: no echo request arrived at t4
      expect((await icmpInEchos(nsOf('t4'))) - before).toBe(0);
    } finally {
      await inNs(nsOf('t3'), ['ip', 'route', 'del', '10.77.2.0/24']);
      await inNs(hostNs(2), ['sysctl', '-w', 'net.ipv4.ip_forward=0']);
    }
  });

  it('removes the entries of a peer that leaves the view, and rebuilds lost entries from a COMPLETE view', async () => {
    const fdb = async (i: number) => (await inNs(hostNs(i), ['bridge', 'fdb', 'show', 'dev', 'fl-vx-4101'])).stdout;
    const neigh = async (i: number) => (await inNs(hostNs(i), ['ip', 'neigh', 'show', 'dev', 'fl-br-4101'])).stdout;
    expect(await fdb(0)).toContain(`02:42:0a:4d:01:0d dst ${hosts[2]!.ip}`);
    expect(await fdb(0)).toContain(`00:00:00:00:00:00 dst ${hosts[2]!.ip}`);
    expect(await neigh(0)).toContain('10.77.1.13 lladdr 02:42:0a:4d:01:0d PERMANENT');
    await nets[0]!.applyAssignments(incremental([viewOf(A, ['t3'])]));
    expect(await fdb(0)).not.toContain(hosts[2]!.ip);
    expect(await neigh(0)).not.toContain('10.77.1.13');
    expect(await ping(nsOf('t1'), '10.77.1.13', 1)).toBe(false);
    expect(await ping(nsOf('t1'), '10.77.1.12', 1)).toBe(true);
    // an agent restart: a new NodeNetwork over the same state adopts the task and the devices, and
    // the next COMPLETE message puts back what is missing (here: t3's entries, and one deleted by hand)
    await inNs(hostNs(0), ['bridge', 'fdb', 'del', '02:42:0a:4d:01:0c', 'dev', 'fl-vx-4101', 'dst', hosts[1]!.ip]);
    const again = await NodeNetwork.open({ stateDir: path.join(dir, hosts[0]!.name), localAddr: hosts[0]!.ip, hostNetns: hostNs(0) });
    expect(again.attachedTasks()).toEqual(['t1']);
    nets[0] = again;
    await again.applyAssignments(complete([viewOf(A), viewOf(B)]));
    expect(await fdb(0)).toContain(`02:42:0a:4d:01:0c dst ${hosts[1]!.ip}`);
    expect(await ping(nsOf('t1'), '10.77.1.13', 1)).toBe(true);
    expect(await ping(nsOf('t1'), '10.77.1.12', 1)).toBe(true);
  });

  it('attaches and detaches many tasks of a new network at once', async () => {
    const C: HandNetwork = { id: 'netC', name: 'gamma', vni: 4103, subnet: '10.77.3.0/24', gateway: '10.77.3.1' };
    await nets[1]!.applyAssignments(incremental([handView(C, [])]));
    const ids = Array.from({ length: 8 }, (_, i) => `p${i}`);
    await Promise.all(ids.map((id, i) => nets[1]!.attach(id, [{ networkId: C.id, addresses: [`10.77.3.${100 + i}/24`], aliases: [] }])));
    const results = await Promise.all(ids.map((id) => ping(nets[1]!.netnsPath(id), '10.77.3.100', 1)));
    expect(results).toEqual(ids.map(() => true));
    const ports = JSON.parse((await inNs(hostNs(1), ['ip', '-j', 'link', 'show', 'master', 'fl-br-4103'])).stdout) as unknown[];
    expect(ports.length).toBe(1 + ids.length); // the VXLAN port and the eight
    await Promise.all(ids.map((id) => nets[1]!.detach(id)));
    expect((await linkNames(hostNs(1))).filter((l) => l.startsWith('fl-')).sort()).toEqual(['fl-br-4101', 'fl-br-4102', 'fl-vx-4101', 'fl-vx-4102']);
    expect(await ping(nsOf('t2'), '10.77.1.11', 1)).toBe(true);
  });

  it('detaches idempotently; the last task of a network takes its devices; teardown leaves nothing', async () => {
    const t4ns = nsOf('t4');
    await nets[2]!.detach('t4');
    await nets[2]!.detach('t4'); // DEL is idempotent
    expect(fs.existsSync(t4ns)).toBe(false);
    expect((await linkNames(hostNs(2))).filter((l) => l.startsWith('fl-')).sort()).toEqual(['fl-br-4101', 'fl-vx-4101']);
    for (const n of nets) await n.teardown();
    for (const i of hosts.keys()) {
      expect((await linkNames(hostNs(i))).filter((l) => l.startsWith('fl-') || l.startsWith('veth'))).toEqual([]);
      expect(fs.readdirSync(path.join(dir, hosts[i]!.name, 'netns'))).toEqual([]);
      expect(fs.readdirSync(path.join(dir, hosts[i]!.name, 'tasks'))).toEqual([]);
      expect((await inNs(hostNs(i), ['bridge', 'fdb', 'show'])).stdout).not.toContain('dst');
      expect((await inNs(hostNs(i), ['nft', 'list', 'tables'])).stdout).not.toContain('flotilla');
    }
    const mounts = fs.readFileSync('/proc/self/mountinfo', 'utf8');
    expect(mounts).not.toContain(dir);
  });
});
