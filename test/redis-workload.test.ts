/**
 * A real workload on the test bed: Redis (Debian's redis-server, image from deploy/images/redis.sh,
 * imported on every host by the script itself) and ioredis in the test process, on 3 hosts (1 manager
 * that runs tasks, 2 agents, real runc) plus one outside client namespace on the underlay (not a node).
 *
 * The test process cannot route to the bed (the underlay has no link to the root namespace), so its
 * ioredis clients connect through NetnsForward: a forwarder inside the client namespace opens one TCP
 * connection from the client's underlay address per ioredis connection (test/helpers/netns-forward.ts).
 *
 *   1. a 1-replica Redis published in ingress mode: 10,000 keys written with pipelining through each
 *      host's address in turn, read back through another host;
 *   2. 3 independent instances (one per node): 30 new connections through the mesh reach >= 2 of them
 *      (INFO server run_id); with traffic-policy=local each lands on the receiving node's instance and
 *      the instance sees the client's real address (CLIENT INFO);
 *   3. a client service reaches Redis by service name over an overlay network (redis-cli -h redis PING);
 *   4. rolling update: a steady, bounded stream of commands through the mesh while `service update
 *      --force` replaces a start-first, health-checked 2-replica service: no command fails (ioredis
 *      reconnects allowed, counted and printed with the longest stall), and every task's gateway
 *      neighbour entry is permanent with its own node's bridge MAC (docs/networking.md, "Rolling updates
 *      without a failed command").
 *
 * 1, 2 and 4 need published ports (the routing mesh); they skip while the tree has no --publish or no node
 * side of it (agent/network/ports.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { Redis, type RedisOptions } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Testbed, run, type TestbedClient, type TestbedHost } from './helpers/testbed.js';
import { NetnsForward } from './helpers/netns-forward.js';
import { ROOT, builtCli, isRoot, waitFor } from './helpers/procs.js';

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

const SCRIPT = path.join(ROOT, 'deploy/images/redis.sh');
const tools = ['/usr/bin/redis-server', '/usr/bin/redis-cli', '/bin/busybox', '/usr/lib/cni/bridge'].filter((f) => !fs.existsSync(f));
const skip = !isRoot() || !builtCli() || tools.length > 0;
if (skip) console.warn(`redis-workload skipped: needs root, a built CLI (npm run build) and ${tools.join(', ') || 'nothing else'}`);

// the published ports of the tests (one per service, so the tests do not depend on each other)
const P1 = 18080;
const P2 = 18081;
const P2_LOCAL = 18082;
const P4 = 18083;

describe.skipIf(skip)('Redis with ioredis on the test bed (needs root, runc, CNI plugins)', () => {
  let bed: Testbed;
  let client: TestbedClient;
  let fwd: NetnsForward | undefined;
  let mesh = false;
  let nodes = new Map<string, string>();
  const open: Redis[] = [];

  beforeAll(async () => {
    bed = await Testbed.create({
      managers: 1,
      agents: 2,
      clients: 1,
      prepareHost: async (h) => {
        const r = await run('bash', [SCRIPT, '--data-dir', h.dataDir], { timeoutMs: 60_000 });
        if (r.code !== 0) throw new Error(`deploy/images/redis.sh on ${h.name}: ${r.stderr.trim()}`);
      },
    });
    client = bed.clients[0]!;
    nodes = new Map((await bed.cliJson<NodeJ[]>(['node', 'ls'])).map((n) => [n.id, n.hostname]));
    // published ports need the manager's side (--publish) and the nodes' (the port rules, agent/network/ports.ts)
    mesh = (await bed.cli(['service', 'create', '--help'])).stdout.includes('--publish') && fs.existsSync(path.join(ROOT, 'agent/network/ports.ts'));
    if (!mesh) console.warn('redis-workload: no routing mesh in this tree yet (service create --publish and agent/network/ports.ts): tests 1, 2 and 4 skip');
    const targets = bed.hosts.flatMap((h) => [P1, P2, P2_LOCAL, P4].map((port) => ({ host: h.ip, port })));
    fwd = await NetnsForward.start(`/run/netns/${client.netns}`, targets);
  }, 120_000);

  afterAll(async () => {
    for (const r of open) r.disconnect();
    await fwd?.stop();
    if (!bed) return;
    // every service removed (by the tests, or here after a failure): wait for the agents to remove their
    // containers and task namespaces, so that the bed finds nothing left behind
    const svcs = await bed.cliJson<Array<{ name: string }>>(['service', 'ls']).catch(() => []);
    if (svcs.length) await bed.cli(['service', 'rm', ...svcs.map((x) => x.name)]);
    for (const h of bed.hosts) {
      await waitFor(`no containers on ${h.name}`, async () => {
        const ls = await h.cli(['container', 'ls', '-a', '--format', 'json']);
        return ls.code === 0 && (JSON.parse(ls.stdout) as unknown[]).length === 0 ? true : undefined;
      }, 30_000, 200).catch((err: unknown) => console.warn((err as Error).message));
    }
    expect(await bed.destroy()).toEqual([]);
  }, 120_000);

  const ok = async (args: string[]): Promise<string> => {
    const r = await bed.cli(args);
    if (r.code !== 0) throw new Error(`flotilla ${args.join(' ')}: ${r.stderr.trim()}`);
    return r.stdout;
  };
  const running = (svc: string, n: number, timeoutMs = 60_000): Promise<TaskJ[]> =>
    waitFor(`${n} running tasks of ${svc}`, async () => {
      const ts = (await bed.cliJson<TaskJ[]>(['service', 'ps', svc])).filter((t) => t.desiredState === 'running' && t.state === 'running');
      return ts.length === n ? ts : undefined;
    }, timeoutMs);
  const hostOf = (t: TaskJ): TestbedHost => bed.hosts.find((h) => h.name === nodes.get(t.nodeId))!;
  /** an ioredis client whose TCP connection starts at the outside client and goes to host:port */
  const redisVia = (h: TestbedHost, port: number, opts: RedisOptions = {}): Redis => {
    const r = new Redis({ path: fwd!.path(h.ip, port), lazyConnect: true, maxRetriesPerRequest: 3, retryStrategy: (n) => (n > 20 ? null : 100), ...opts });
    r.on('error', () => {}); // counted where it matters; a reset during an update is expected
    open.push(r);
    return r;
  };
  /** one new connection through host:port: the answer of INFO server's run_id and CLIENT INFO's addr */
  const probe = async (h: TestbedHost, port: number): Promise<{ runId: string; addr: string }> => {
    const r = redisVia(h, port, { retryStrategy: () => null, maxRetriesPerRequest: 0 });
    try {
      await r.connect();
      const info = await r.info('server');
      const ci = (await r.call('CLIENT', 'INFO')) as string;
      return { runId: /run_id:(\w+)/.exec(info)?.[1] ?? '', addr: /\baddr=(\S+)/.exec(ci)?.[1] ?? '' };
    } finally {
      r.disconnect();
    }
  };
  /** waits until every host answers PING on port (the mesh converged) */
  const answering = async (port: number): Promise<void> => {
    for (const h of bed.hosts) {
      await waitFor(`PING through ${h.name}:${port}`, async () => {
        try {
          return (await probe(h, port)).runId || undefined;
        } catch {
          return undefined;
        }
      }, 30_000, 200);
    }
  };
  /** run_id of the Redis in a task's container, asked inside the container */
  const runIdOf = async (t: TaskJ): Promise<string> => {
    const r = await hostOf(t).cli(['container', 'exec', t.containerId, 'redis-cli', 'INFO', 'server']);
    const id = /run_id:(\w+)/.exec(r.stdout)?.[1];
    if (!id) throw new Error(`no run_id from task ${t.id} on ${hostOf(t).name}: ${r.stdout} ${r.stderr}`);
    return id;
  };

  it('3. a client service reaches Redis by service name over an overlay network', async () => {
    await ok(['network', 'create', '--subnet', '10.79.13.0/24', 'app']);
    await ok(['service', 'create', '-d', '--name', 'redis', '--network', 'app', '--stop-grace-period', '1s', 'redis:latest']);
    await ok(['service', 'create', '-d', '--name', 'cli', '--network', 'app', '--stop-grace-period', '1s', 'redis:latest', 'sleep', '100000']);
    const [rt] = await running('redis', 1);
    const [ct] = await running('cli', 1);
    const inCli = (cmd: string[]) => hostOf(ct!).cli(['container', 'exec', ct!.containerId, ...cmd]);
    // the name resolves through the network's resolver; the redis-cli of the image is dynamically linked (glibc)
    const ping = await waitFor('redis-cli -h redis PING from the client service', async () => {
      const r = await inCli(['redis-cli', '-h', 'redis', 'PING']);
      return r.stdout.trim() === 'PONG' ? r : undefined;
    }, 20_000, 250);
    expect(ping.stdout.trim()).toBe('PONG');
    expect((await inCli(['redis-cli', '-h', 'redis', 'SET', 'from', `cli-on-${hostOf(ct!).name}`])).stdout.trim()).toBe('OK');
    // the value is in the Redis of the service's task: asked inside that container
    const got = await hostOf(rt!).cli(['container', 'exec', rt!.containerId, 'redis-cli', 'GET', 'from']);
    expect(got.stdout.trim()).toBe(`cli-on-${hostOf(ct!).name}`);
    console.log(`redis on ${hostOf(rt!).name}, client on ${hostOf(ct!).name}: PING -> PONG by service name`);
    await ok(['service', 'rm', 'redis', 'cli']);
  }, 90_000);

  it('1. 1-replica Redis in ingress mode: 10,000 keys written through each host, read back through another', async (ctx) => {
    if (!mesh) ctx.skip();
    await ok(['service', 'create', '-d', '--name', 'r1', '-p', `published=${P1},target=6379,mode=ingress`, '--stop-grace-period', '1s', 'redis:latest']);
    const [t] = await running('r1', 1);
    await answering(P1);
    const hosts = bed.hosts;
    for (let i = 0; i < hosts.length; i++) {
      const w = redisVia(hosts[i]!, P1);
      const rd = redisVia(hosts[(i + 1) % hosts.length]!, P1);
      await w.connect();
      await rd.connect();
      const t0 = Date.now();
      const pw = w.pipeline();
      for (let k = 0; k < 10_000; k++) pw.set(`k${i}:${k}`, `v${i}:${k}`);
      const res = (await pw.exec())!;
      expect(res.filter(([err, v]) => err || v !== 'OK').length).toBe(0);
      const pr = rd.pipeline();
      for (let k = 0; k < 10_000; k++) pr.get(`k${i}:${k}`);
      const back = (await pr.exec())!;
      const wrong = back.filter(([err, v], k) => err || v !== `v${i}:${k}`).length;
      console.log(`10,000 keys written through ${hosts[i]!.name}, read through ${hosts[(i + 1) % hosts.length]!.name} (task on ${hostOf(t!).name}): ${Date.now() - t0} ms, ${wrong} wrong`);
      expect(wrong).toBe(0);
      w.disconnect();
      rd.disconnect();
    }
    const n = await probe(hosts[2]!, P1);
    expect(n.runId).toBe(await runIdOf(t!));
    await ok(['service', 'rm', 'r1']);
  }, 90_000);

  it('2. 3 instances: new connections through the mesh reach several; traffic-policy=local lands locally and keeps the client address', async (ctx) => {
    if (!mesh) ctx.skip();
    await ok(['service', 'create', '-d', '--name', 'r3', '--replicas', '3', '--replicas-max-per-node', '1', '-p', `published=${P2},target=6379`, '-p', `published=${P2_LOCAL},target=6379,traffic-policy=local`, '--stop-grace-period', '1s', 'redis:latest']);
    const ts = await running('r3', 3);
    const local = new Map<string, string>(); // host name -> run_id of the instance on it
    for (const t of ts) local.set(hostOf(t).name, await runIdOf(t));
    expect(local.size).toBe(3);
    await answering(P2);
    await answering(P2_LOCAL);
    // cluster policy: 30 new connections, 10 through each host
    const seen = new Map<string, number>();
    const addrs = new Set<string>();
    for (let i = 0; i < 30; i++) {
      const p = await probe(bed.hosts[i % 3]!, P2);
      seen.set(p.runId, (seen.get(p.runId) ?? 0) + 1);
      addrs.add(p.addr.replace(/:\d+$/, ''));
    }
    console.log(`cluster policy: 30 connections reached ${seen.size} instances (${[...seen.values()].join('/')}); the instances saw the client as ${[...addrs].join(', ')}`);
    expect(seen.size).toBeGreaterThanOrEqual(2);
    for (const id of seen.keys()) expect([...local.values()]).toContain(id);
    // local policy: every connection lands on the receiving node's instance, which sees the client's address
    for (let i = 0; i < 30; i++) {
      const h = bed.hosts[i % 3]!;
      const p = await probe(h, P2_LOCAL);
      expect(p.runId, `connection ${i} through ${h.name}`).toBe(local.get(h.name));
      expect(p.addr.replace(/:\d+$/, ''), `client address seen through ${h.name}`).toBe(client.ip);
    }
    // CLIENT LIST of an instance (asked inside its container) lists a connection from the client's address
    const keep = redisVia(bed.hosts[1]!, P2_LOCAL);
    await keep.connect();
    await keep.client('SETNAME', 'outside');
    const t1 = ts.find((t) => hostOf(t).name === bed.hosts[1]!.name)!;
    const list = await hostOf(t1).cli(['container', 'exec', t1.containerId, 'redis-cli', 'CLIENT', 'LIST']);
    expect(list.stdout).toMatch(new RegExp(`addr=${client.ip.replace(/\./g, '\\.')}:\\d+ .*name=outside`));
    keep.disconnect();
    await ok(['service', 'rm', 'r3']);
  }, 90_000);

  it('4. rolling update through the mesh (start-first, health-checked): no command fails', async (ctx) => {
    if (!mesh) ctx.skip();
    await ok([
      'service', 'create', '-d', '--name', 'r4', '--replicas', '2', '-p', `published=${P4},target=6379`,
      '--update-order', 'start-first', '--update-parallelism', '1', '--update-delay', '0s', '--update-monitor', '1s',
      '--health-cmd', 'redis-cli ping', '--health-interval', '500ms', '--health-timeout', '2s', '--health-retries', '3',
      '--stop-grace-period', '2s', 'redis:latest',
    ]);
    const before = await running('r4', 2);
    await answering(P4);
    // 3 long-lived connections (one through each host) and a new connection every 250 ms
    let failed = 0;
    let retries = 0;
    let done = 0;
    let stall = 0;
    const errors: string[] = [];
    const t00 = Date.now();
    let tUpd = 0;
    const events: string[] = [];
    const ev = (m: string): void => void events.push(`${((Date.now() - (tUpd || t00)) / 1000).toFixed(2)}s ${m}`);
    const slow: string[] = [];
    const clients = bed.hosts.map((h) => {
      const r = redisVia(h, P4, { retryStrategy: (n: number) => (n > 50 ? null : 50), connectTimeout: 3000, commandTimeout: 3000 });
      r.on('reconnecting', () => (retries++, ev(`long-lived via ${h.name}: reconnecting`)));
      r.on('close', () => ev(`long-lived via ${h.name}: close`));
      r.on('ready', () => ev(`long-lived via ${h.name}: ready`));
      r.on('error', (e: Error) => ev(`long-lived via ${h.name}: error ${e.message}`));
      return r;
    });
    for (const c of clients) await c.connect();
    let stop = false;
    // bounded whatever happens; a command or connection stuck for 3 s (commandTimeout, connectTimeout) fails
    const until = Date.now() + 40_000;
    const steady = clients.map(async (c, ci) => {
      for (let i = 0; !stop && Date.now() < until && i < 20_000; i++) {
        const t0 = Date.now();
        try {
          const v = await c.echo(`${ci}:${i}`);
          if (v !== `${ci}:${i}`) throw new Error(`echo ${ci}:${i} answered ${v}`);
          done++;
        } catch (err) {
          failed++;
          if (errors.length < 5) errors.push(`${(err as Error).message}`);
        }
        stall = Math.max(stall, Date.now() - t0);
        if (Date.now() - t0 > 500) slow.push(`echo ${ci}:${i} via ${bed.hosts[ci]!.name} at ${((t0 - (tUpd || t00)) / 1000).toFixed(2)}s took ${Date.now() - t0} ms`);
        await new Promise((r) => setTimeout(r, 10));
      }
    });
    let fresh = 0;
    const churn = (async () => {
      for (let i = 0; !stop && Date.now() < until && i < 400; i++) {
        const h = bed.hosts[i % 3]!;
        const r = redisVia(h, P4, { retryStrategy: (n: number) => (n > 50 ? null : 50), connectTimeout: 3000, commandTimeout: 3000 });
        r.on('reconnecting', () => (retries++, ev(`new connection ${i} via ${h.name}: reconnecting`)));
        r.on('error', (e: Error) => ev(`new connection ${i} via ${h.name}: error ${e.message}`));
        const t0 = Date.now();
        try {
          await r.connect();
          if ((await r.ping()) !== 'PONG') throw new Error('no PONG');
          fresh++;
        } catch (err) {
          failed++;
          if (errors.length < 5) errors.push(`new connection through ${h.name}: ${(err as Error).message}`);
        } finally {
          r.disconnect();
        }
        stall = Math.max(stall, Date.now() - t0);
        if (Date.now() - t0 > 500) slow.push(`new connection ${i} via ${h.name} at ${((t0 - (tUpd || t00)) / 1000).toFixed(2)}s took ${Date.now() - t0} ms`);
        await new Promise((res) => setTimeout(res, 250));
      }
    })();
    await new Promise((r) => setTimeout(r, 1000));
    const t0 = Date.now();
    tUpd = t0;
    const upd = await bed.cli(['service', 'update', '--force', '--quiet', 'r4']);
    ev('update returned');
    const took = Date.now() - t0;
    await new Promise((r) => setTimeout(r, 1000));
    stop = true;
    await Promise.all([...steady, churn]);
    expect(upd.stderr).toBe('');
    expect(upd.code).toBe(0);
    const after = await running('r4', 2);
    console.log(
      `rolling update of 2 replicas in ${took} ms under load: ${done} commands and ${fresh} new connections answered, ${failed} failed, ${retries} ioredis reconnects, longest stall ${stall} ms${errors.length ? `; errors: ${errors.join(' | ')}` : ''}`,
    );
    if (slow.length || failed) console.log(`slow or failed (times from the update command):\n  ${slow.join('\n  ')}\nevents:\n  ${events.join('\n  ')}`);
    console.log('tasks before', before.map((t) => `${t.id.slice(0, 8)}@${hostOf(t).name}`).join(' '), 'after', after.map((t) => `${t.id.slice(0, 8)}@${hostOf(t).name}`).join(' '));
    expect(after.map((t) => t.id).filter((id) => before.some((b) => b.id === id))).toEqual([]);
    // a task's replies to a client the mesh did not SNAT go through its gateway, which every node's
    // bridge holds: the entry must be its own node's bridge (permanent: ARP floods from other nodes,
    // "who has X tell GATEWAY", must not move it), or those connections stall
    for (const t of after) {
      const arp = (await hostOf(t).cli(['container', 'exec', t.containerId, 'cat', '/proc/net/arp'])).stdout;
      const gw = /^10\.255\.0\.1\s+\S+\s+(\S+)\s+(\S+)/m.exec(arp);
      const hostBytes = hostOf(t).ip.split('.').map((b) => Number(b).toString(16).padStart(2, '0')).join(':');
      expect(gw?.[1], `gateway entry of ${t.id} on ${hostOf(t).name}: ${arp}`).toBe('0x6'); // complete, permanent
      expect(gw?.[2], `gateway entry of ${t.id} on ${hostOf(t).name}`).toMatch(new RegExp(`^0a:[0-9a-f]{2}:${hostBytes}$`));
    }
    expect(done).toBeGreaterThan(100);
    expect(failed, `${failed} failed of ${done + failed + fresh}`).toBe(0);
    for (const c of clients) c.disconnect();
    await ok(['service', 'rm', 'r4']);
  }, 120_000);
});
