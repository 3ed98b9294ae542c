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
  networks?: { networkId: string; addresses: string[] }[];
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

    // From here two loops sample, against the kernel's clock (/proc/uptime, the same in every
    // namespace), what tasks.a answers inside b's container and which backends the VIP table in b's
    // network namespace holds: removal is measured to ~50 ms, not to a CLI round trip per poll.
    // Each loop is bounded by time, so it runs from well before the fault to well after it.
    const LEAD_MS = 6000;
    const uptime = (): number => Number(fs.readFileSync('/proc/uptime', 'utf8').split(' ')[0]);
    // A loop ends 3 s after its answer last changed (once it has changed), or after 30 s.
    const loop = (probe: string) =>
      `start=$(cut -d' ' -f1 /proc/uptime | tr -d .); last=$start; prev=; changed=0; while :; do u=$(cut -d' ' -f1 /proc/uptime); c=$(echo $u | tr -d .); ` +
      `d=$(${probe} 2>/dev/null | grep -o '10\\.79\\.1\\.[0-9]*' | sort -u | tr '\\n' ,); echo "$u $d"; ` +
      `if [ "$d" != "$prev" ]; then [ -n "$prev" ] && changed=1; prev=$d; last=$c; fi; ` +
      `if [ $changed = 1 ] && [ $((c - last)) -gt 300 ]; then break; fi; if [ $((c - start)) -gt 3000 ]; then break; fi; done`;
    const bNetns = fs.readdirSync('/dev/shm/flotilla').map((r) => `/dev/shm/flotilla/${r}/network/netns/${bt!.id}`).find((p) => fs.existsSync(p));
    expect(bNetns, "b's network namespace").toBeDefined();
    const sample = () => ({
      dns: inB(['sh', '-c', loop("nslookup tasks.a | grep -v ':53'")]),
      vip: host.exec(['sh', '-c', loop(`nsenter --net=${bNetns} nft list table ip flotilla`)], { timeoutMs: 60_000 }),
    });
    /** seconds from t0 until the samples stopped holding any gone address for good; samples that held one before t0 */
    const dropTime = (out: string, t0: number, goneIps: string[]) => {
      let last = 0;
      let after = 0;
      let seenBefore = 0;
      for (const line of out.trim().split('\n')) {
        const [u, d = ''] = line.split(' ');
        const at = Number(u) - t0;
        const holds = d.split(',').some((ip) => goneIps.includes(ip));
        if (at < 0) {
          if (holds) seenBefore++;
          continue;
        }
        after++;
        if (holds) last = at;
      }
      return { last, after, seenBefore };
    };
    const ip4 = (t: TaskJ): string => (t.networks?.[0]?.addresses[0] ?? '').split('/')[0]!;
    const measure = async (what: string, s: ReturnType<typeof sample>, t0: number, goneIps: string[], note: string) => {
      const dns = dropTime((await s.dns).stdout, t0, goneIps);
      const vipT = dropTime((await s.vip).stdout, t0, goneIps);
      console.log(`${what}: left tasks.a ${(dns.last * 1000).toFixed(0)} ms, the VIP's backends ${(vipT.last * 1000).toFixed(0)} ms ${note} ` +
        `(samples holding it before: ${dns.seenBefore} DNS, ${vipT.seenBefore} VIP; after: ${dns.after}, ${vipT.after})`);
      // the samplers saw the gone tasks before (else they prove nothing) and sampled long after
      expect(dns.seenBefore, `${what}: DNS samples holding the gone tasks before`).toBeGreaterThan(3);
      expect(vipT.seenBefore, `${what}: VIP samples holding the gone tasks before`).toBeGreaterThan(3);
      expect(dns.after).toBeGreaterThan(5);
      expect(vipT.after).toBeGreaterThan(5);
      expect(dns.last).toBeLessThanOrEqual(1.0);
      expect(vipT.last).toBeLessThanOrEqual(1.0);
    };

    // (1) a task killed (SIGKILL of its process, as a crash): it leaves DNS and the VIP within 1 s
    const victim = as[0]!;
    const victimHost = bed.hosts.find((h) => h.name === nodes.get(victim.nodeId))!;
    const cs = JSON.parse((await victimHost.cli(['container', 'ls', '--format', 'json'])).stdout) as { id: string; pid?: number }[];
    const pid = cs.find((c) => c.id === victim.containerId)?.pid;
    expect(pid, 'the victim container pid').toBeGreaterThan(0);
    const s1 = sample();
    // the samplers start through `container exec` and nsenter: on a busy machine the first sample can
    // come seconds later, and samples from before the fault are asserted below
    await new Promise((r) => setTimeout(r, LEAD_MS));
    const k0 = uptime();
    process.kill(pid!, 'SIGKILL');
    await measure('killed task', s1, k0, [ip4(victim)], 'after the kill');
    const as3 = await running('a', 3);

    // (2) scale 3 -> 1: the two gone tasks leave DNS and the VIP within 1 s of the scale being accepted
    const s2 = sample();
    await new Promise((r) => setTimeout(r, LEAD_MS));
    const c0 = uptime();
    const sc = await bed.cli(['service', 'scale', '-d', 'a=1']);
    const s0 = uptime();
    expect(sc.code, sc.stderr).toBe(0);
    console.log(`scale: the CLI took ${((s0 - c0) * 1000).toFixed(0)} ms from its start to the accepted update`);
    const left = await running('a', 1);
    const gone = as3.filter((t) => !left.some((l) => l.id === t.id));
    expect(gone.length).toBe(2);
    await measure('scale 3 -> 1', s2, s0, gone.map(ip4), 'after the scale was accepted');
    expect(addrs((await inB(['nslookup', 'tasks.a'])).stdout)).toEqual([ip4(left[0]!)]);

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
