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
 *
 * Options (environment): BENCH_MB (default 128) bytes per throughput round, BENCH_ROUNDS (5),
 * BENCH_RTT (2000) round trips.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NodeNetwork } from '../agent/network/node-network.js';
import { AssignmentsType } from '../gen/flotilla/v1/dispatcher.js';
import { handView, inNs, mtuOf, tcpRtt, tcpSend, tcpServer, type HandNetwork } from '../test/helpers/overlay.js';
import { Testbed, run } from '../test/helpers/testbed.js';

const MB = Number(process.env.BENCH_MB ?? 128);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const RTT = Number(process.env.BENCH_RTT ?? 2000);

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
}
const median = (xs: number[]): number => quantile(xs, 0.5);

async function iperf(serverNs: string, clientNs: string, ip: string): Promise<number | undefined> {
  if (!existsSync('/usr/bin/iperf3')) return undefined;
  const srv = run('nsenter', [`--net=${serverNs}`, '--', 'iperf3', '-s', '-1', '-p', '7201'], { timeoutMs: 30_000 });
  await new Promise((r) => setTimeout(r, 300));
  const r = await inNs(clientNs, ['iperf3', '-c', ip, '-p', '7201', '-t', '3', '-J'], 30_000);
  await srv;
  if (r.code !== 0) return undefined;
  const j = JSON.parse(r.stdout) as { end: { sum_received: { bits_per_second: number } } };
  return j.end.sum_received.bits_per_second / 8 / 1e6;
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench:network needs root (network namespaces, bridges, VXLAN)');
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
    const bytes = MB * 1024 * 1024;
    const tput: Record<'underlay' | 'overlay', number[]> = { underlay: [], overlay: [] };
    const ip3: Record<'underlay' | 'overlay', number[]> = { underlay: [], overlay: [] };
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
        if (i !== undefined) ip3[kind].push(i);
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
    say(`  rtt overhead p50: +${(quantile(rtt.overlay, 0.5) - quantile(rtt.underlay, 0.5)).toFixed(3)} ms`);
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
