/**
 * npm run bench:network — the overlay data plane against the underlay, in one run on the test bed.
 *
 * Two test bed hosts (network namespaces on one underlay bridge). On each, agent/network's NodeNetwork
 * builds an overlay network (bridge + VXLAN device) and attaches one task namespace through the CNI
 * plugins, exactly as for a container (runc joins that same namespace). Measured, in alternating rounds:
 *   - TCP throughput task→task over the overlay, and host→host over the underlay (the physical limit
 *     here), with a small Node TCP tool (bulk send of BYTES, one connection) and with iperf3 when installed;
 *   - TCP round-trip latency (4-byte request/answer on one connection), p50 and p99.
 * Target: overlay throughput >= 80% of the underlay's.
 * Then, on a second bed with real containers (runc, busybox; 1 manager, 3 agents), discovery convergence:
 *   (2) from a task reported running (its status timestamp) to its address in `tasks.a` as answered by the
 *       network's resolver to a client container on another host, over BENCH_TASKS (50) tasks added in
 *       steps of 10 (service scale);
 *   (3) from the scale-down command returning (the task told to stop) to its address leaving `tasks.a` and
 *       the client container's VIP table (nft table ip flotilla), over the same tasks removed in steps.
 *   Targets: p99 <= 1 s. The client side is probed from the client container's namespace every ~10 ms.
 * BENCH_PARTS=throughput|discovery runs one part only.
 *
 * iperf3's CPU use (both ends' processes) gives MB per CPU-second per path: the data path's cost, much
 * steadier than MB/s when other work shares the cores.
 *
 * Options (environment): BENCH_MB (default 128) bytes per throughput round, BENCH_ROUNDS (5),
 * BENCH_RTT (2000) round trips; experiments: BENCH_OFFLOAD ("gro on ...": ethtool -K on every device),
 * BENCH_BRNF (0|1: br_netfilter's calls in the two hosts' namespaces); BENCH_KERNEL=0 skips the floor;
 * BENCH_LINK (e.g. 10gbit: each host's eth0 shaped to that rate with tc tbf, an underlay that is a link
 * as between separate machines, not the two shared CPUs).
 *
 * The floor, after the rounds (with iperf3): bench/vxlan-floor.sh builds the same shape (underlay bridge,
 * two hosts, a bridge + VXLAN device and one container namespace each) by hand, without flotilla, and
 * measures the same two paths the same way: where the kernel's own overlay path stands on this machine.
 * Besides the rate ratio, both print the overlay's CPU per byte relative to their underlay: steadier
 * than rates when other work shares the cores (bench/nf-profile.sh splits that CPU further, netfilter apart).
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { NodeNetwork } from '../agent/network/node-network.js';
import { AssignmentsType } from '../gen/flotilla/v1/dispatcher.js';
import { handView, inNs, mtuOf, tcpRtt, tcpSend, tcpServer, type HandNetwork } from '../test/helpers/overlay.js';
import { Testbed, run, type TestbedHost } from '../test/helpers/testbed.js';
import { buildBusyboxRootfs } from '../test/helpers/busybox.js';
import { ImageStore } from '../agent/runtime/images.js';
import { spawn } from 'node:child_process';

const MB = Number(process.env.BENCH_MB ?? 128);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const RTT = Number(process.env.BENCH_RTT ?? 2000);

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
}
const median = (xs: number[]): number => quantile(xs, 0.5);

/** iperf3's throughput (MB/s) and the CPU both ends' processes used (sum of iperf3's host and remote cpu_utilization, %). */
async function iperf(serverNs: string, clientNs: string, ip: string): Promise<{ mbs: number; cpu: number } | undefined> {
  if (!existsSync('/usr/bin/iperf3')) return undefined;
  const srv = run('nsenter', [`--net=${serverNs}`, '--', 'iperf3', '-s', '-1', '-p', '7201'], { timeoutMs: 30_000 });
  await new Promise((r) => setTimeout(r, 300));
  const r = await inNs(clientNs, ['iperf3', '-c', ip, '-p', '7201', '-t', '3', '-J'], 30_000);
  await srv;
  if (r.code !== 0) return undefined;
  const j = JSON.parse(r.stdout) as { end: { sum_received: { bits_per_second: number }; cpu_utilization_percent?: { host_total: number; remote_total: number } } };
  const c = j.end.cpu_utilization_percent;
  return { mbs: j.end.sum_received.bits_per_second / 8 / 1e6, cpu: c ? c.host_total + c.remote_total : NaN };
}

const TASKS = Number(process.env.BENCH_TASKS ?? 50);
const PARTS = process.env.BENCH_PARTS ?? 'throughput,discovery';

interface TaskJ {
  id: string;
  nodeId: string;
  state: string;
  desiredState: string;
  stateSince: string;
  networks: { addresses: string[] }[];
}

/**
 * Probes, from inside a network namespace, what the resolver answers for tasks.NAME and which task
 * addresses the namespace's VIP table holds, every ~10 ms; records when each address first/last appears.
 */
function probe(netnsPath: string, server: string, name: string): { seen: Map<string, number>; gone: Map<string, number>; vipGone: Map<string, number>; vipSeen: Map<string, number>; stop: () => void } {
  const code = `
const dns = require('node:dns').promises; const { execFileSync } = require('node:child_process');
const r = new dns.Resolver({ timeout: 500, tries: 1 }); r.setServers([${JSON.stringify(server)}]);
let last = ''; let lastV = '';
(async () => { for (;;) {
  let a = []; try { a = (await r.resolve4(${JSON.stringify(name)})).sort(); } catch (e) { if (e.code !== 'ENOTFOUND' && e.code !== 'ENODATA') { await new Promise((x) => setTimeout(x, 10)); continue; } }
  const k = a.join(','); if (k !== last) { last = k; process.stdout.write('D ' + Date.now() + ' ' + k + '\\n'); }
  let v = ''; try { v = [...new Set(execFileSync('nft', ['list', 'table', 'ip', 'flotilla'], { encoding: 'utf8' }).match(/10\\.\\d+\\.\\d+\\.\\d+/g) || [])].sort().join(','); } catch {}
  if (v !== lastV) { lastV = v; process.stdout.write('V ' + Date.now() + ' ' + v + '\\n'); }
  await new Promise((x) => setTimeout(x, 10));
} })();`;
  const child = spawn('nsenter', [`--net=${netnsPath}`, '--', process.execPath, '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  const seen = new Map<string, number>();
  const gone = new Map<string, number>();
  const vipSeen = new Map<string, number>();
  const vipGone = new Map<string, number>();
  let prevD = new Set<string>();
  let prevV = new Set<string>();
  let buf = '';
  child.stdout.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const [kind, ts, list = ''] = buf.slice(0, i).split(' ');
      buf = buf.slice(i + 1);
      const now = new Set(list ? list.split(',') : []);
      const at = Number(ts);
      const [prev, s1, g1] = kind === 'D' ? [prevD, seen, gone] : [prevV, vipSeen, vipGone];
      for (const a of now) if (!prev.has(a) && !s1.has(a)) s1.set(a, at);
      for (const a of prev) if (!now.has(a) && !g1.has(a)) g1.set(a, at);
      if (kind === 'D') prevD = now;
      else prevV = now;
    }
  });
  return { seen, gone, vipSeen, vipGone, stop: () => child.kill('SIGKILL') };
}

async function discovery(): Promise<void> {
  const rootfs = await fs.mkdtemp('/tmp/flotilla-bench-busybox-');
  await buildBusyboxRootfs(rootfs);
  const importInto = async (h: TestbedHost): Promise<void> => {
    const store = await ImageStore.open(h.dataDir);
    await store.import('busybox:latest', rootfs, { config: { cmd: ['sh'] } });
  };
  const bed = await Testbed.create({ managers: 1, agents: 3, managerAgent: false, prepareHost: importInto });
  let pr: ReturnType<typeof probe> | undefined;
  try {
    const ok = async (args: string[]): Promise<void> => {
      const r = await bed.cli(args);
      if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr.trim()}`);
    };
    const waitRunning = async (svc: string, n: number): Promise<TaskJ[]> => {
      const until = Date.now() + 180_000;
      for (;;) {
        const ts = (await bed.cliJson<TaskJ[]>(['service', 'ps', svc])).filter((t) => t.desiredState === 'running' && t.state === 'running');
        if (ts.length === n) return ts;
        if (Date.now() > until) throw new Error(`${svc}: ${ts.length} of ${n} running after 180 s`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    const client = bed.hosts.find((h) => h.role === 'agent')!;
    await ok(['network', 'create', '--subnet', '10.79.3.0/24', 'nb']);
    await ok(['service', 'create', '-d', '--name', 'b', '--network', 'nb', '--constraint', `node.hostname==${client.name}`, '--stop-grace-period', '1s', 'busybox:latest', 'sleep', '100000']);
    await ok(['service', 'create', '-d', '--name', 'a', '--replicas', '0', '--network', 'nb', '--constraint', `node.hostname!=${client.name}`, '--stop-grace-period', '1s', 'busybox:latest', 'sleep', '100000']);
    await waitRunning('b', 1);
    const ls = JSON.parse((await client.cli(['container', 'ls', '--format', 'json'])).stdout) as { pid: number }[];
    const pid = ls.find((c) => c.pid)?.pid;
    if (!pid) throw new Error('no client container pid');
    pr = probe(`/proc/${pid}/ns/net`, '10.79.3.1', 'tasks.a');
    const ip = (t: TaskJ): string => (t.networks[0]?.addresses[0] ?? '').split('/')[0]!;
    const upMs: number[] = [];
    const vipUpMs: number[] = [];
    const runningAt = new Map<string, number>();
    const step = 10;
    for (let n = step; n <= TASKS; n += step) {
      await ok(['service', 'scale', `a=${n}`]);
      const ts = await waitRunning('a', n);
      for (const t of ts) runningAt.set(ip(t), Date.parse(t.stateSince));
      const until = Date.now() + 10_000;
      while ([...runningAt.keys()].some((a) => !pr!.seen.has(a) || !pr!.vipSeen.has(a)) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    }
    for (const [a, at] of runningAt) {
      const s = pr.seen.get(a);
      const v = pr.vipSeen.get(a);
      upMs.push(s === undefined ? Infinity : s - at);
      vipUpMs.push(v === undefined ? Infinity : v - at);
    }
    const downMs: number[] = [];
    const vipDownMs: number[] = [];
    for (let n = TASKS - step; n >= 0; n -= step) {
      const before = new Set((await waitRunning('a', n + step)).map(ip));
      const t0 = Date.now();
      await ok(['service', 'scale', `a=${n}`]);
      const told = Date.now();
      const after = new Set((await bed.cliJson<TaskJ[]>(['service', 'ps', 'a'])).filter((t) => t.desiredState === 'running').map(ip));
      const stopped = [...before].filter((a) => !after.has(a));
      const until = Date.now() + 10_000;
      while (stopped.some((a) => !pr!.gone.has(a) || !pr!.vipGone.has(a)) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
      for (const a of stopped) {
        downMs.push((pr.gone.get(a) ?? Infinity) - told);
        vipDownMs.push((pr.vipGone.get(a) ?? Infinity) - told);
      }
      void t0;
    }
    const f = (xs: number[]): string => `p50 ${quantile(xs, 0.5).toFixed(0)} ms p99 ${quantile(xs, 0.99).toFixed(0)} ms max ${Math.max(...xs).toFixed(0)} ms (n=${xs.length})`;
    console.log(`bench:network discovery — 1 manager + 3 agents (runc, busybox), client container on ${client.name}, service a scaled 0 -> ${TASKS} -> 0 in steps of ${step}`);
    console.log(`  (2) running -> in tasks.a on another host: ${f(upMs)}  (target p99 <= 1000 ms)`);
    console.log(`      running -> in the client's VIP table:   ${f(vipUpMs)}`);
    console.log(`  (3) scale-down returned -> out of tasks.a:   ${f(downMs)}  (target p99 <= 1000 ms)`);
    console.log(`      scale-down returned -> out of VIP table:  ${f(vipDownMs)}  (target p99 <= 1000 ms)`);
    await ok(['service', 'rm', 'a', 'b']);
    await new Promise((r) => setTimeout(r, 3000));
  } finally {
    pr?.stop();
    const problems = await bed.destroy();
    await fs.rm(rootfs, { recursive: true, force: true });
    if (problems.length > 0) console.error(`cleanup notes: ${problems.join('; ')}`);
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench:network needs root (network namespaces, bridges, VXLAN)');
  if (PARTS.includes('throughput')) await throughput();
  if (PARTS.includes('discovery')) await discovery();
}

async function throughput(): Promise<void> {
  const bed = await Testbed.create({ managers: 1, agents: 2, runtime: 'sim', managerAgent: false });
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-bench-net-'));
  const nets: NodeNetwork[] = [];
  try {
    const [h2, h3] = [bed.hosts[1]!, bed.hosts[2]!];
    const ns2 = `/run/netns/${h2.netns}`;
    const ns3 = `/run/netns/${h3.netns}`;
    const net: HandNetwork = { id: 'bench', name: 'bench', vni: 4301, subnet: '10.79.1.0/24', gateway: '10.79.1.1' };
    const view = handView(net, [
      { taskId: 'b1', nodeId: 'n2', nodeAddr: h2.ip, address: '10.79.1.21/24' },
      { taskId: 'b2', nodeId: 'n3', nodeAddr: h3.ip, address: '10.79.1.22/24' },
    ]);
    const attachMs: number[] = [];
    for (const [i, h] of [h2, h3].entries()) {
      const n = await NodeNetwork.open({ stateDir: path.join(dir, h.name), localAddr: h.ip, hostNetns: `/run/netns/${h.netns}` });
      nets.push(n);
      await n.applyAssignments({ type: AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE, networks: [], removeNetworks: [], networkViews: [view] });
      const t0 = performance.now();
      await n.attach(`b${i + 1}`, [{ networkId: 'bench', addresses: [`10.79.1.2${i + 1}/24`], aliases: [] }]);
      attachMs.push(performance.now() - t0);
    }
    // a further task on a network the node already has: namespace + CNI calls only
    for (let k = 0; k < 5; k++) {
      const t0 = performance.now();
      await nets[0]!.attach(`x${k}`, [{ networkId: 'bench', addresses: [`10.79.1.${100 + k}/24`], aliases: [] }]);
      attachMs.push(performance.now() - t0);
    }
    const detachT0 = performance.now();
    for (let k = 0; k < 5; k++) await nets[0]!.detach(`x${k}`);
    const detachMs = (performance.now() - detachT0) / 5;
    const t1 = nets[0]!.netnsPath('b1');
    const t2 = nets[1]!.netnsPath('b2');
    const paths = {
      underlay: { client: ns2, server: ns3, ip: h3.ip },
      overlay: { client: t1, server: t2, ip: '10.79.1.22' },
    };
    // BENCH_OFFLOAD="gro on tso on ..." applies `ethtool -K DEV SETTINGS` to every device of both hosts'
    // and both tasks' namespaces (an experiment: the data plane sets no offloads itself)
    const offload = process.env.BENCH_OFFLOAD;
    if (offload) {
      for (const ns of [ns2, ns3, t1, t2]) {
        const devs = (await inNs(ns, ['ip', '-o', 'link', 'show'], 10_000)).stdout.split('\n').map((l) => l.split(': ')[1]?.split('@')[0] ?? '').filter((d) => d && d !== 'lo');
        for (const d of devs) await inNs(ns, ['ethtool', '-K', d, ...offload.split(' ')], 10_000);
      }
      console.log(`offload settings applied: ethtool -K DEV ${offload}`);
    }
    // BENCH_BRNF=0 sets net.bridge.bridge-nf-call-{iptables,ip6tables,arptables}=0 in both hosts' namespaces
    // (an experiment: a host where br_netfilter is not loaded; the agent never changes these host-wide settings)
    const brnf = process.env.BENCH_BRNF;
    if (brnf === '0' || brnf === '1') {
      for (const ns of [ns2, ns3]) {
        await inNs(ns, ['sysctl', '-qw', `net.bridge.bridge-nf-call-iptables=${brnf}`, `net.bridge.bridge-nf-call-ip6tables=${brnf}`, `net.bridge.bridge-nf-call-arptables=${brnf}`], 10_000);
      }
      console.log(`br_netfilter calls set to ${brnf} in both hosts' namespaces`);
    }
    // BENCH_LINK=10gbit gives each host's eth0 the egress rate of a NIC (tc tbf; large burst, so GSO
    // packets pass whole): the underlay is then a link, as between separate machines, instead of the
    // CPU the two "hosts" share here. Both paths leave through eth0, so both are limited alike.
    const link = process.env.BENCH_LINK;
    if (link) {
      if (!/^\d+(\.\d+)?[kmg]bit$/.test(link)) throw new Error(`invalid BENCH_LINK "${link}": expected a tc rate such as 10gbit`);
      for (const ns of [ns2, ns3]) await inNs(ns, ['tc', 'qdisc', 'replace', 'dev', 'eth0', 'root', 'tbf', 'rate', link, 'burst', '4mb', 'latency', '20ms'], 10_000);
      console.log(`each host's eth0 limited to ${link} (tc tbf)`);
    }
    const bytes = MB * 1024 * 1024;
    const tput: Record<'underlay' | 'overlay', number[]> = { underlay: [], overlay: [] };
    const ip3: Record<'underlay' | 'overlay', number[]> = { underlay: [], overlay: [] };
    // iperf3 MB per CPU-second of both ends' processes (the kernel's network work runs mostly in their
    // context): the data path's cost, much less exposed to a busy machine than MB/s
    const eff: Record<'underlay' | 'overlay', number[]> = { underlay: [], overlay: [] };
    const rtt: Record<'underlay' | 'overlay', number[]> = { underlay: [], overlay: [] };
    for (let round = 0; round < ROUNDS; round++) {
      for (const kind of ['underlay', 'overlay'] as const) {
        const p = paths[kind];
        const srv = await tcpServer(p.server, 7100);
        try {
          const r = await tcpSend(p.client, p.ip, 7100, bytes, 120_000);
          if (r.bytes !== bytes) throw new Error(`${kind}: the server counted ${r.bytes} of ${bytes} bytes`);
          tput[kind].push(bytes / 1e6 / (r.ms / 1000));
          if (round === 0) rtt[kind] = await tcpRtt(p.client, p.ip, 7100, RTT);
        } finally {
          srv.kill();
        }
        const i = await iperf(p.server, p.client, p.ip);
        if (i !== undefined) {
          ip3[kind].push(i.mbs);
          if (i.cpu > 0) eff[kind].push(i.mbs / (i.cpu / 100));
        }
      }
    }
    const lines: string[] = [];
    const say = (s: string): void => {
      lines.push(s);
      console.log(s);
    };
    const mtu = await mtuOf(t1, 'eth0');
    say(`bench:network — 2 test bed hosts, overlay MTU ${mtu}, ${ROUNDS} rounds of ${MB} MiB per path (alternating), ${RTT} round trips`);
    for (const kind of ['underlay', 'overlay'] as const) {
      say(
        `  ${kind.padEnd(8)} node-tcp ${median(tput[kind]).toFixed(0)} MB/s (runs ${tput[kind].map((x) => x.toFixed(0)).join(', ')})` +
          (ip3[kind].length ? `  iperf3 ${median(ip3[kind]).toFixed(0)} MB/s (runs ${ip3[kind].map((x) => x.toFixed(0)).join(', ')})` : '  iperf3 not installed') +
          `  rtt p50 ${quantile(rtt[kind], 0.5).toFixed(3)} ms p99 ${quantile(rtt[kind], 0.99).toFixed(3)} ms`,
      );
    }
    say(`  attach (netns + CNI loopback and bridge): first task of the network on a node ${attachMs.slice(0, 2).map((x) => x.toFixed(0)).join(' / ')} ms (devices made), further tasks median ${median(attachMs.slice(2)).toFixed(0)} ms; detach ${detachMs.toFixed(0)} ms`);
    const ratio = median(tput.overlay) / median(tput.underlay);
    say(`  overlay/underlay throughput: node-tcp ${(ratio * 100).toFixed(0)}%` + (ip3.overlay.length ? `, iperf3 ${((median(ip3.overlay) / median(ip3.underlay)) * 100).toFixed(0)}%` : '') + ` (target >= 80%)`);
    // rounds alternate underlay/overlay: the ratio within each round is less exposed to the machine's drifting load
    const paired = (xs: number[], ys: number[]): string => median(xs.map((x, i) => x / ys[i]!)).toFixed(2);
    say(`  per-round overlay/underlay ratio, median: node-tcp ${paired(tput.overlay, tput.underlay)}` + (ip3.overlay.length ? `, iperf3 ${paired(ip3.overlay, ip3.underlay)}` : '') + ` (load average at start ${os.loadavg()[0]!.toFixed(1)} on ${os.cpus().length} CPUs)`);
    if (eff.overlay.length && eff.underlay.length) {
      say(
        `  iperf3 CPU cost: underlay ${median(eff.underlay).toFixed(0)} MB per CPU-second (runs ${eff.underlay.map((x) => x.toFixed(0)).join(', ')}), overlay ${median(eff.overlay).toFixed(0)} (runs ${eff.overlay.map((x) => x.toFixed(0)).join(', ')}): ` +
          `the overlay costs ${(median(eff.underlay) / median(eff.overlay)).toFixed(2)}x the CPU per byte (per-round median ${median(eff.underlay.map((u, i) => u / eff.overlay[i]!)).toFixed(2)}x)`,
      );
    }
    say(`  rtt overhead p50: +${(quantile(rtt.overlay, 0.5) - quantile(rtt.underlay, 0.5)).toFixed(3)} ms`);
    if (ip3.overlay.length && process.env.BENCH_KERNEL !== '0') {
      // the floor: the same devices built by hand, without flotilla (bench/vxlan-floor.sh), same iperf3
      const script = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../bench/vxlan-floor.sh');
      const k = await run('bash', [script, String(ROUNDS)], { timeoutMs: ROUNDS * 20_000 + 30_000 });
      const m = k.stdout.match(/median ratio ([0-9.]+)/);
      const c = k.stdout.match(/median CPU per byte overlay\/underlay ([0-9.]+)x/);
      const ours = eff.overlay.length && eff.underlay.length ? median(eff.underlay.map((u, i) => u / eff.overlay[i]!)).toFixed(2) : '?';
      if (k.code !== 0 || !m) say(`  kernel floor (bench/vxlan-floor.sh): failed: ${k.stderr.trim().split('\n').pop() ?? ''}`);
      else {
        say(`  kernel floor: the same VXLAN + bridge path built by hand without flotilla (bench/vxlan-floor.sh), iperf3 per-round median ${m[1]} of its underlay (ours ${paired(ip3.overlay, ip3.underlay)})`);
        // the steadier comparison under load: what a byte costs on the overlay relative to the underlay
        if (c) say(`  CPU per byte overlay/underlay, per-round median: floor ${c[1]}x, ours ${ours}x`);
      }
    }
    process.exitCode = 0;
  } finally {
    for (const n of nets) await n.teardown().catch(() => undefined);
    const problems = await bed.destroy();
    await fs.rm(dir, { recursive: true, force: true });
    if (problems.length > 0) console.error(`cleanup problems: ${problems.join('; ')}`);
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : String(err));
  process.exit(1);
});
