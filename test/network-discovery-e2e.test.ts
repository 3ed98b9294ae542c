/**
 * Service discovery end to end on the test bed (3 hosts, real runc, real managers and agents): a service
 * `a` with 3 replicas on an overlay network; from a container of `b`: `a` resolves to the VIP, TCP to it
 * reaches every replica, `tasks.a` lists the 3 task addresses; scaling 3 -> 1 removes the gone tasks.
 *
 * Needs the allocator (network create, views) and the node data plane (agent/network/node-network.ts)
 * with the discovery hooks: it skips until the data plane exists in the tree. The manager runs no tasks
 * here (its in-process agent has no overlay data plane yet).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Testbed, type TestbedHost } from './helpers/testbed.js';
import { builtCli, isRoot, waitFor } from './helpers/procs.js';
import { buildBusyboxRootfs } from './helpers/busybox.js';
import { ImageStore } from '../agent/runtime/images.js';

interface TaskJ {
  id: string;
  nodeId: string;
  state: string;
  desiredState: string;
  containerId: string;
  error: string;
}
interface NodeJ {
  id: string;
  hostname: string;
}

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dataPlane = fs.existsSync(path.join(ROOT, 'agent/network/node-network.ts'));
const skip = !isRoot() || !builtCli() || !fs.existsSync('/usr/lib/cni/bridge') || !dataPlane;
if (skip) console.warn(`network-discovery-e2e skipped: needs root, a built CLI, the CNI plugins and the node data plane (agent/network/node-network.ts${dataPlane ? '' : ': not in this tree yet'})`);
let rootfs = '';
async function importInto(h: TestbedHost): Promise<void> {
  const store = await ImageStore.open(h.dataDir);
  await store.import('busybox:latest', rootfs, { config: { cmd: ['sh'] } });
}

describe.skipIf(skip)('service discovery on the test bed (needs root, CNI plugins)', () => {
  let bed: Testbed;
  beforeAll(async () => {
    rootfs = fs.mkdtempSync('/tmp/flotilla-dns-busybox-');
    await buildBusyboxRootfs(rootfs);
    bed = await Testbed.create({ managers: 1, agents: 3, managerAgent: false, prepareHost: importInto });
  }, 120_000);
  afterAll(async () => {
    if (bed) expect(await bed.destroy()).toEqual([]);
    if (rootfs) fs.rmSync(rootfs, { recursive: true, force: true });
  }, 120_000);

  const running = (svc: string, n: number) =>
    waitFor(`${n} running tasks of ${svc}`, async () => {
      const ts = (await bed.cliJson<TaskJ[]>(['service', 'ps', svc])).filter((t) => t.desiredState === 'running' && t.state === 'running');
      return ts.length === n ? ts : undefined;
    }, 60_000);

  it('a resolves to the VIP from another host, TCP reaches every replica, tasks.a lists exactly the 3; scale 3 -> 1', async () => {
    const nodes = new Map((await bed.cliJson<NodeJ[]>(['node', 'ls'])).map((n) => [n.id, n.hostname]));
    const net = await bed.cli(['network', 'create', '--subnet', '10.79.1.0/24', 'n1']);
    expect(net.stderr).toBe('');
    let r = await bed.cli(['service', 'create', '-d', '--name', 'a', '--replicas', '3', '--network', 'n1', '--stop-grace-period', '1s', 'busybox:latest', 'sh', '-c', 'while true; do hostname | nc -l -p 8080; done']);
    expect(r.stderr).toBe('');
    r = await bed.cli(['service', 'create', '-d', '--name', 'b', '--replicas', '1', '--network', 'n1', '--stop-grace-period', '1s', 'busybox:latest', 'sleep', '1000']);
    expect(r.stderr).toBe('');
    const as = await running('a', 3);
    const [bt] = await running('b', 1);
    const host = bed.hosts.find((h) => h.name === nodes.get(bt!.nodeId))!;
    const inB = (cmd: string[]) => host.cli(['container', 'exec', bt!.containerId, ...cmd]);
    expect((await inB(['cat', '/etc/resolv.conf'])).stdout).toContain('nameserver 10.79.1.1\n');
    const look = await inB(['nslookup', 'a']);
    console.log('nslookup a', look.stdout, look.stderr);
    const tasksA = await inB(['nslookup', 'tasks.a']);
    console.log('nslookup tasks.a', tasksA.stdout, tasksA.stderr);
    const addrs = (out: string) => [...out.matchAll(/Address:\s*(10\.79\.1\.\d+)\s*$/gm)].map((m) => m[1]!);
    const vip = addrs(look.stdout);
    expect(vip.length).toBe(1);
    expect(addrs(tasksA.stdout).length).toBe(3);
    const seen = new Set<string>();
    console.log('hosts', as.map((t) => [t.id.slice(0, 12), nodes.get(t.nodeId)]), 'b on', host.name);
    // each replica answers one connection per nc -l round (a connection between rounds is refused: skip it)
    for (let i = 0; i < 20 && seen.size < 3; i++) {
      const c = await inB(['sh', '-c', `nc -w 2 ${vip[0]} 8080 </dev/null`]);
      if (c.stdout.trim()) seen.add(c.stdout.trim());
    }
    console.log('vip reached', [...seen], 'tasks', as.map((t) => t.id.slice(0, 12)));
    expect([...seen].sort()).toEqual(as.map((t) => t.id.slice(0, 12)).sort());

    const t0 = Date.now();
    await bed.cli(['service', 'scale', 'a=1']);
    let took = -1;
    for (;;) {
      const l = await inB(['nslookup', 'tasks.a']);
      if (addrs(l.stdout).length === 1) {
        took = Date.now() - t0;
        break;
      }
      if (Date.now() - t0 > 20_000) break;
    }
    console.log(`scale 3 -> 1: tasks.a has one address ${took} ms after the scale command`);
    expect(took).toBeGreaterThanOrEqual(0);
    // measured 0.7-1.1 s on the bed (2 shared cores); bounded loosely here, the figure is logged
    expect(took).toBeLessThan(2500);

    // everything removed: no container, namespace or device left for the bed to find
    await bed.cli(['service', 'rm', 'a', 'b']);
    for (const h of bed.hosts.slice(1)) {
      await waitFor(`no containers on ${h.name}`, async () => {
        const ls = JSON.parse((await h.cli(['container', 'ls', '-a', '--format', 'json'])).stdout) as unknown[];
        return ls.length === 0 ? true : undefined;
      }, 30_000);
    }
    await bed.cli(['network', 'rm', 'n1']);
  }, 120_000);
});
