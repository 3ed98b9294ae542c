/**
 * npm run bench:ingress — short TCP request/response exchanges through the routing mesh against a direct
 * connection, in one run on the test bed.
 *
 * Bed: 1 manager + 2 agents (3 hosts that run tasks, real runc) and one outside client namespace on the
 * underlay. One Redis task (deploy/images/redis.sh) on h2, on an overlay network, published in ingress
 * mode. A load generator (this file with --client, ioredis) runs inside the client namespace: CONNS
 * connections, each sending PING and waiting for PONG (no pipelining) for SECONDS, and reports the
 * exchanges per second and the latency quantiles. Paths, in alternating rounds:
 *   (a) direct: the client to the task's overlay address, routed through h2 (a route in the client's
 *       namespace via h2's underlay address; no NAT, no balancing): the anchor;
 *   (b) the mesh landing on the task's node: the client to h2's address and the published port;
 *   (c) the mesh landing on another node: the client to h3's address and the published port (h3 carries
 *       the connection over the ingress overlay to h2).
 * The order of the paths rotates each round (a b c, b c a, c a b). Besides the rate, the CPU time of the
 * load generator's process and of redis-server per exchange (the kernel's work on the path runs mostly in
 * their context): on a busy machine the rate swings with the load, the CPU per exchange much less.
 * Target: (b) and (c) >= 80% of (a)'s exchanges per second. Docker Swarm's routing mesh beside ours needs
 * dockerd, which this machine does not have: the output says so when it is absent.
 *
 * Options (environment): BENCH_CONNS (8), BENCH_SECONDS (5), BENCH_ROUNDS (3).
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import { Testbed, run, type TestbedHost } from '../test/helpers/testbed.js';

const CONNS = Number(process.env.BENCH_CONNS ?? 8);
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const PUBLISHED = 16379;
const NET_SUBNET = '10.79.14.0/24';
const NET_GATEWAY = '10.79.14.1'; // the subnet's first host address: the default gateway
const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, path.basename(path.resolve(HERE, '..')) === 'dist' ? '../..' : '..');

interface Load {
  exchanges: number;
  errors: number;
  ms: number;
  p50: number;
  p99: number;
  /** CPU time of the load generator's process during the measured window (µs, user + system) */
  cpuUs?: number;
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
}
const median = (xs: number[]): number => quantile(xs, 0.5);

/** The load generator (runs inside the client namespace): CONNS connections of PING/PONG for SECONDS. */
async function client(host: string, port: number, conns: number, seconds: number): Promise<void> {
  const redis = Array.from({ length: conns }, () => new Redis({ host, port, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, enableOfflineQueue: false }));
  for (const r of redis) r.on('error', () => {}); // the command that failed counts as an error
  await Promise.all(redis.map((r) => r.connect()));
  for (const r of redis) await r.ping(); // warm
  const lat: number[] = [];
  let errors = 0;
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  const until = t0 + seconds * 1000;
  await Promise.all(
    redis.map(async (r) => {
      while (performance.now() < until) {
        const s = performance.now();
        try {
          await r.ping();
          lat.push(performance.now() - s);
        } catch {
          errors++;
          if (errors > 100) return;
        }
      }
    }),
  );
  const ms = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  for (const r of redis) r.disconnect();
  const out: Load = { exchanges: lat.length, errors, ms, p50: quantile(lat, 0.5), p99: quantile(lat, 0.99), cpuUs: cpu.user + cpu.system };
  process.stdout.write(JSON.stringify(out) + '\n');
}

/**
 * Makes (a) possible: an overlay is closed to the outside by design (no forwarding between the underlay and
 * its bridge, no route out of a task), so the bench opens exactly one path, client <-> task, on the bed
 * only: a route to the task in the client's namespace via the task's node, forwarding on that node with
 * an accept rule for the pair ahead of the overlay's isolation rules, and a route back to the client in
 * the task's namespace via the network's gateway. No NAT, no balancing: the anchor.
 */
async function directPath(bed: Testbed, host: TestbedHost, clientIp: string, taskIp: string, gateway: string, taskId: string): Promise<number> {
  const must = async (what: string, p: Promise<{ code: number; stderr: string; stdout: string }>): Promise<string> => {
    const r = await p;
    if (r.code !== 0) throw new Error(`${what}: ${r.stderr.trim()}`);
    return r.stdout;
  };
  await must('route to the task', bed.clients[0]!.exec(['ip', 'route', 'add', `${taskIp}/32`, 'via', host.ip]));
  await must('forwarding on the task node', host.exec(['sysctl', '-qw', 'net.ipv4.ip_forward=1']));
  const rules = JSON.parse(await must('nft list ruleset', host.exec(['nft', '-j', 'list', 'ruleset']))) as { nftables: Array<{ chain?: { family: string; table: string; name: string; hook?: string } }> };
  for (const ch of rules.nftables.map((e) => e.chain).filter((x) => x?.hook === 'forward')) {
    for (const [src, dst] of [[clientIp, taskIp], [taskIp, clientIp]]) {
      await must(`nft insert rule ${ch!.table}`, host.exec(['nft', 'insert', 'rule', ch!.family, ch!.table, ch!.name, 'ip', 'saddr', src!, 'ip', 'daddr', dst!, 'accept']));
    }
  }
  const cs = JSON.parse(await must('container ls', host.cli(['container', 'ls', '--format', 'json']))) as Array<{ id: string; pid: number; name?: string; labels?: Record<string, string> }>;
  const ct = cs.find((x) => JSON.stringify(x).includes(taskId)) ?? (cs.length === 1 ? cs[0] : undefined);
  if (!ct?.pid) throw new Error(`no container of task ${taskId} on ${host.name}`);
  const inTask = (cmd: string[]) => run('nsenter', [`--net=/proc/${ct.pid}/ns/net`, '--', ...cmd]);
  if ((await inTask(['ip', 'route', 'get', clientIp])).code !== 0) {
    await must('route back to the client', inTask(['ip', 'route', 'add', `${clientIp}/32`, 'via', gateway]));
  }
  return ct.pid;
}

/** CPU time (µs, user + system) of a process so far, from /proc/PID/stat (clock ticks of 10 ms). */
async function procCpuUs(pid: number): Promise<number> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) * 10_000; // fields 14 and 15 (utime, stime) after pid and comm
  } catch {
    return NaN;
  }
}

interface TaskJ {
  id: string;
  nodeId: string;
  state: string;
  desiredState: string;
  networks: { networkId?: string; addresses: string[] }[];
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench:ingress needs root (network namespaces, runc)');
  const load0 = os.loadavg().map((x) => x.toFixed(1)).join(' ');
  const dockerd = existsSync('/usr/bin/dockerd') || existsSync('/usr/sbin/dockerd');
  const bed = await Testbed.create({
    managers: 1,
    agents: 2,
    clients: 1,
    prepareHost: async (h) => {
      const r = await run('bash', [path.join(REPO, 'deploy/images/redis.sh'), '--data-dir', h.dataDir], { timeoutMs: 60_000 });
      if (r.code !== 0) throw new Error(`deploy/images/redis.sh on ${h.name}: ${r.stderr.trim()}`);
    },
  });
  try {
    const ok = async (args: string[]): Promise<string> => {
      const r = await bed.cli(args);
      if (r.code !== 0) throw new Error(`flotilla ${args.join(' ')}: ${r.stderr.trim()}`);
      return r.stdout;
    };
    const [, h2, h3] = bed.hosts;
    const c = bed.clients[0]!;
    const mesh = (await bed.cli(['service', 'create', '--help'])).stdout.includes('--publish') && existsSync(path.join(REPO, 'dist/agent/network/ports.js'));
    await ok(['network', 'create', '--subnet', NET_SUBNET, 'nb']);
    const publish = mesh ? ['-p', `published=${PUBLISHED},target=6379,mode=ingress`] : [];
    await ok(['service', 'create', '-d', '--name', 'kv', '--network', 'nb', ...publish, '--constraint', `node.hostname==${h2!.name}`, '--stop-grace-period', '1s', 'redis:latest']);
    const until = Date.now() + 120_000;
    let task: TaskJ | undefined;
    while (!task) {
      task = (await bed.cliJson<TaskJ[]>(['service', 'ps', 'kv'])).find((t) => t.desiredState === 'running' && t.state === 'running');
      if (!task && Date.now() > until) throw new Error('kv not running after 120 s');
      if (!task) await new Promise((r) => setTimeout(r, 200));
    }
    const nb = (await bed.cliJson<Array<{ id: string; name: string }>>(['network', 'ls'])).find((n) => n.name === 'nb')!;
    const addr = (task.networks.find((n) => n.networkId === nb.id) ?? task.networks[0])?.addresses[0]?.split('/')[0];
    if (!addr) throw new Error(`task ${task.id} has no overlay address`);
    const serverPid = await directPath(bed, h2!, c.ip, addr, NET_GATEWAY, task.id);
    const paths: Array<{ key: string; what: string; host: string; port: number }> = [
      { key: 'a', what: `direct to the task ${addr}:6379 (routed via ${h2!.name})`, host: addr, port: 6379 },
    ];
    if (mesh) {
      paths.push({ key: 'b', what: `mesh, ${h2!.name}:${PUBLISHED} (task on the receiving node)`, host: h2!.ip, port: PUBLISHED });
      paths.push({ key: 'c', what: `mesh, ${h3!.name}:${PUBLISHED} (task on another node)`, host: h3!.ip, port: PUBLISHED });
    }
    const me = fileURLToPath(import.meta.url);
    const load = async (host: string, port: number): Promise<Load & { serverCpuUs: number }> => {
      // the mesh may take a moment after the task runs: retry the first round's connection for up to 20 s
      const deadline = Date.now() + 20_000;
      for (;;) {
        const s0 = await procCpuUs(serverPid);
        const r = await c.exec([process.execPath, me, '--client', host, String(port), String(CONNS), String(SECONDS)], { timeoutMs: SECONDS * 1000 + 30_000 });
        // the server's CPU over the whole client run (connect and warm-up included: a few exchanges)
        if (r.code === 0) return { ...(JSON.parse(r.stdout.trim().split('\n').pop()!) as Load), serverCpuUs: (await procCpuUs(serverPid)) - s0 };
        if (Date.now() > deadline) throw new Error(`load generator to ${host}:${port} failed: ${r.stderr.trim().split('\n').slice(-3).join(' | ')}`);
        await new Promise((res) => setTimeout(res, 500));
      }
    };
    const results = new Map<string, Array<Load & { serverCpuUs: number }>>(paths.map((p) => [p.key, []]));
    for (let round = 0; round < ROUNDS; round++) {
      // the order rotates each round (a b c, b c a, c a b): no path always runs first or last
      for (let k = 0; k < paths.length; k++) {
        const p = paths[(k + round) % paths.length]!;
        results.get(p.key)!.push(await load(p.host, p.port));
      }
    }
    const rps = (l: Load): number => (l.exchanges / l.ms) * 1000;
    const a = median(results.get('a')!.map(rps));
    console.log(`bench:ingress — Redis PING/PONG via ioredis, ${CONNS} connections x ${SECONDS} s, ${ROUNDS} rounds per path (median round shown)`);
    console.log(`  bed: 1 manager + 2 agents (real runc), the task on ${h2!.name}, the client outside the cluster (${c.ip})`);
    for (const p of paths) {
      const ls = results.get(p.key)!;
      const r = median(ls.map(rps));
      const errs = ls.reduce((s, l) => s + l.errors, 0);
      const ratio = p.key === 'a' ? '(anchor)' : `${((r / a) * 100).toFixed(0)}% of (a) (target >= 80%)`;
      console.log(`  (${p.key}) ${p.what.padEnd(58)} ${r.toFixed(0).padStart(7)} req/s  p50 ${median(ls.map((l) => l.p50)).toFixed(3)} ms  p99 ${median(ls.map((l) => l.p99)).toFixed(3)} ms  ${ratio}${errs ? `  ${errs} errors` : ''}`);
    }
    // CPU per exchange (the load generator's process + redis-server): the kernel's work on the path runs mostly
    // in these two processes' context, so this is much less exposed to a busy machine than req/s
    const cpuPer = (l: Load & { serverCpuUs: number }): number => ((l.cpuUs ?? NaN) + l.serverCpuUs) / Math.max(1, l.exchanges);
    const ca = median(results.get('a')!.map(cpuPer));
    console.log(
      '  CPU per exchange (client process + redis-server, median round): ' +
        paths.map((p) => {
          const v = median(results.get(p.key)!.map(cpuPer));
          return `(${p.key}) ${v.toFixed(1)} µs` + (p.key === 'a' ? '' : ` (${v >= ca ? '+' : ''}${(v - ca).toFixed(1)})`);
        }).join(', '),
    );
    console.log(`  load average: ${os.loadavg().map((x) => x.toFixed(1)).join(' ')} on ${os.cpus().length} CPUs at the end (${load0} at the start)`);
    if (!mesh) console.log('  (b), (c): not measured: this build has no routing mesh (`service create --publish` and agent/network/ports.ts)');
    console.log(dockerd ? '  Docker Swarm: dockerd is installed but the Swarm side of this bench is not written yet' : '  Docker Swarm: not measured (dockerd is not installed on this machine)');
    // the task's network namespace goes with its task: wait for it before the bed stops the agents
    await bed.cli(['service', 'rm', 'kv']);
    for (const end = Date.now() + 20_000; Date.now() < end; await new Promise((r) => setTimeout(r, 200))) {
      const ls = await h2!.cli(['container', 'ls', '-a', '--format', 'json']);
      if (ls.code === 0 && (JSON.parse(ls.stdout) as unknown[]).length === 0) break;
    }
  } finally {
    const problems = await bed.destroy();
    const left = bed.leftovers();
    if (problems.length || left.length) console.error(`test bed cleanup: ${[...problems, ...left].join('; ')}`);
  }
}

if (process.argv[2] === '--client') {
  const [host, port, conns, seconds] = process.argv.slice(3);
  client(host!, Number(port), Number(conns), Number(seconds)).catch((err: unknown) => {
    process.stderr.write(`${(err as Error).message}\n`);
    process.exit(1);
  });
} else {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
