/**
 * Service discovery and VIPs on real network namespaces (needs root, ip, nft, nsenter, conntrack).
 *
 * The test builds its own "node": two bridges in the host netns (networks A and B, gateway addresses on
 * them) and network namespaces acting as containers, each with a veth on its bridge and a long-lived Node
 * helper process inside (nsenter --net) that runs DNS queries, TCP servers and TCP clients on request.
 * The Resolver and VipBalancer are the real modules, driven by hand-made NetworkViews.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import dgram from 'node:dgram';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import dnsPacket from 'dns-packet';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NetworkPeer, NetworkView, ServiceEndpoint } from '../../gen/flotilla/v1/dispatcher.js';
import { EndpointMode } from '../../gen/flotilla/v1/objects.js';
import { closeSpawner } from '../runtime/spawner.js';
import { Discovery } from './discovery.js';
import { Resolver, resolvConf } from './resolver.js';
import { renderRuleset, TABLE, VipBalancer } from './vip.js';

const isRoot = process.getuid?.() === 0;
const haveTools = (() => {
  try {
    execFileSync('sh', ['-c', 'command -v ip && command -v nft && command -v nsenter && command -v conntrack'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();
if (!isRoot || !haveTools) console.warn('discovery.test.ts: skipped (needs root and ip, nft, nsenter, conntrack: apt-get install nftables conntrack)');

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const K = (process.pid % 200) + 20;
const TAG = `fd${process.pid % 100000}`;
const NET_A = { id: 'netA', subnet: `172.30.${K}.0/24`, gw: `172.30.${K}.1`, bridge: `${TAG}a` };
const NET_B = { id: 'netB', subnet: `172.31.${K}.0/24`, gw: `172.31.${K}.1`, bridge: `${TAG}b` };
const NET_C = { id: 'netC', subnet: `172.29.${K}.0/24`, gw: `172.29.${K}.1`, bridge: `${TAG}c` };
const a = (n: number): string => `172.30.${K}.${n}`;
const VIP_A = a(2);

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}
function tryRun(cmd: string, args: string[]): void {
  try {
    sh(cmd, args);
  } catch {
    /* best effort in cleanup */
  }
}
/** Whether the root namespace has iptables' `ip filter` table (iptables-nft makes it on first use). */
function hasFilterTable(): boolean {
  try {
    sh('nft', ['list', 'table', 'ip', 'filter']);
    return true;
  } catch {
    return false;
  }
}
/** The `ip filter` table holds no rule (only its table and chain lines). */
function filterTableEmpty(): boolean {
  try {
    return sh('nft', ['list', 'table', 'ip', 'filter'])
      .split('\n')
      .map((l) => l.trim())
      .every((l) => l === '' || l === '}' || l.startsWith('table ') || l.startsWith('chain ') || l.startsWith('type '));
  } catch {
    return false;
  }
}

/** The helper run inside each netns: JSON line requests on stdin, JSON line replies on stdout. */
const HELPER = String.raw`
import dnsPacket from 'dns-packet';
import dgram from 'node:dgram';
import net from 'node:net';
import readline from 'node:readline';
const held = new Map();
const name = process.argv[1];
function lineOf(sock) {
  return new Promise((resolve, reject) => {
    let buf = '';
    const onData = (d) => { buf += d; const i = buf.indexOf('\n'); if (i >= 0) { sock.off('data', onData); resolve(buf.slice(0, i)); } };
    sock.on('data', onData);
    sock.once('error', reject);
    sock.once('close', () => reject(new Error('closed')));
  });
}
function connect(host, port) {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port });
    s.setEncoding('utf8');
    const t = setTimeout(() => { s.destroy(); reject(new Error('timeout')); }, 3000);
    s.once('connect', () => { clearTimeout(t); resolve(s); });
    s.once('error', (e) => { clearTimeout(t); reject(e); });
  });
}
async function once(host, port) {
  const s = await connect(host, port);
  try { s.write('hi\n'); return await lineOf(s); } finally { s.destroy(); }
}
const ops = {
  serve: ({ port }) => new Promise((resolve) => {
    net.createServer((sock) => {
      sock.setEncoding('utf8');
      sock.on('error', () => undefined);
      let buf = '';
      sock.on('data', (d) => { buf += d; let i; while ((i = buf.indexOf('\n')) >= 0) { buf = buf.slice(i + 1); sock.write(name + ' ' + sock.remoteAddress + '\n'); } });
    }).listen(port, '0.0.0.0', () => resolve({}));
  }),
  tcp: async ({ host, port }) => ({ data: await once(host, port) }),
  loop: async ({ host, port, ms, gap }) => {
    const out = []; const end = Date.now() + ms;
    while (Date.now() < end) {
      const t = Date.now();
      try { out.push({ t, r: await once(host, port) }); } catch (e) { out.push({ t, r: 'ERR ' + e.message }); }
      await new Promise((r) => setTimeout(r, gap));
    }
    return { out };
  },
  hold: async ({ host, port, key }) => { const s = await connect(host, port); s.on('error', () => undefined); held.set(key, s); s.write('hi\n'); return { data: await lineOf(s), local: s.localAddress + ':' + s.localPort }; },
  send: async ({ key }) => { const s = held.get(key); s.write('again\n'); return { data: await lineOf(s) }; },
  close: async ({ key }) => { held.get(key)?.destroy(); held.delete(key); return {}; },
  dns: ({ server, port, qname, qtype, tcp }) => new Promise((resolve) => {
    const q = dnsPacket.encode({ type: 'query', id: 4242, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: qtype || 'A', name: qname }] });
    const done = (buf) => { clearTimeout(t); try { s.destroy ? s.destroy() : s.close(); } catch {} ;
      if (!buf) return resolve({ rcode: 'TIMEOUT', answers: [] });
      const p = dnsPacket.decode(buf);
      resolve({ rcode: p.rcode, tc: (p.flags & dnsPacket.TRUNCATED_RESPONSE) !== 0, size: buf.length, answers: p.answers.map((x) => x.data), ttls: p.answers.map((x) => x.ttl) }); };
    const t = setTimeout(() => done(undefined), 3000);
    let s;
    if (tcp) {
      s = net.connect({ host: server, port: port || 53 });
      let buf = Buffer.alloc(0);
      s.on('error', () => done(undefined));
      s.on('connect', () => { const l = Buffer.alloc(2); l.writeUInt16BE(q.length); s.write(Buffer.concat([l, q])); });
      s.on('data', (d) => { buf = Buffer.concat([buf, d]); if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) done(buf.subarray(2, 2 + buf.readUInt16BE(0))); });
    } else {
      s = dgram.createSocket('udp4');
      s.on('error', () => done(undefined));
      s.on('message', (m) => done(m));
      s.send(q, port || 53, server);
    }
  }),
};
readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  const m = JSON.parse(line);
  let r;
  try { r = await ops[m.op](m); } catch (e) { r = { error: String(e && e.message) }; }
  process.stdout.write(JSON.stringify({ id: m.id, ...r }) + '\n');
});
process.stdout.write(JSON.stringify({ id: 0 }) + '\n');
`;

interface Reply {
  id: number;
  error?: string;
  data?: string;
  local?: string;
  rcode?: string;
  answers?: string[];
  ttls?: number[];
  tc?: boolean;
  size?: number;
  out?: { t: number; r: string }[];
}

/** A netns "container" with its address on a bridge and a helper process inside. */
class Box {
  proc?: ChildProcess;
  private next = 1;
  private readonly waiting = new Map<number, (r: Reply) => void>();
  readonly netns: string;
  constructor(
    readonly name: string,
    readonly addr: string,
    readonly net: { bridge: string; gw: string; subnet: string },
  ) {
    this.netns = `/run/netns/${TAG}-${name}`;
  }

  async start(): Promise<void> {
    const ns = `${TAG}-${this.name}`;
    const host = `${TAG}${this.name}h`.slice(0, 15);
    sh('ip', ['netns', 'add', ns]);
    sh('ip', ['link', 'add', host, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns]);
    sh('ip', ['link', 'set', host, 'master', this.net.bridge, 'up']);
    const len = this.net.subnet.split('/')[1]!;
    sh('ip', ['-n', ns, 'addr', 'add', `${this.addr}/${len}`, 'dev', 'eth0']);
    sh('ip', ['-n', ns, 'link', 'set', 'eth0', 'up']);
    sh('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    sh('ip', ['-n', ns, 'route', 'add', 'default', 'via', this.net.gw]);
    const p = spawn('nsenter', [`--net=${this.netns}`, process.execPath, '--input-type=module', '-e', HELPER, this.name], { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'] });
    this.proc = p;
    const ready = new Promise<void>((resolve) => this.waiting.set(0, () => resolve()));
    readline.createInterface({ input: p.stdout! }).on('line', (line) => {
      const r = JSON.parse(line) as Reply;
      this.waiting.get(r.id)?.(r);
      this.waiting.delete(r.id);
    });
    await ready;
  }

  call(op: string, args: Record<string, unknown> = {}): Promise<Reply> {
    const id = this.next++;
    return new Promise((resolve) => {
      this.waiting.set(id, resolve);
      this.proc!.stdin!.write(JSON.stringify({ id, op, ...args }) + '\n');
    });
  }

  dns(server: string, qname: string, o: { qtype?: string; tcp?: boolean; port?: number } = {}): Promise<Reply> {
    return this.call('dns', { server, qname, ...o });
  }

  stop(): void {
    this.proc?.kill('SIGKILL');
    tryRun('ip', ['netns', 'del', `${TAG}-${this.name}`]);
    tryRun('ip', ['link', 'del', `${TAG}${this.name}h`.slice(0, 15)]);
  }
}

function peer(taskId: string, addr: string, serviceId: string, serviceName: string, slot: number, ready = true, aliases: string[] = []): NetworkPeer {
  return { taskId, nodeId: 'n1', nodeAddr: '192.0.2.1', address: `${addr}/24`, serviceId, serviceName, ready, aliases, taskName: `${serviceName}.${slot}.${taskId}`, nodeAddress: false };
}
function endpoint(serviceId: string, serviceName: string, vip: string, aliases: string[] = []): ServiceEndpoint {
  return { serviceId, serviceName, vip: vip ? `${vip}/24` : '', mode: vip ? EndpointMode.ENDPOINT_MODE_VIP : EndpointMode.ENDPOINT_MODE_DNSRR, ports: [], aliases };
}
function view(n: { id: string; subnet: string; gw: string }, peers: NetworkPeer[], endpoints: ServiceEndpoint[]): NetworkView {
  return {
    network: { id: n.id, meta: undefined, spec: undefined, allocation: { subnet: n.subnet, gateway: `${n.gw}/24`, vni: 4096, mtu: 1450, nodeAddresses: {} } },
    peers,
    endpoints,
  };
}

/** The views of the test: service a (VIP, 3 tasks on c1..c3), b (client c0), d (dnsrr, addresses only in DNS); e on B. */
function views(readyA: Record<string, boolean> = {}): NetworkView[] {
  const r = (t: string): boolean => readyA[t] ?? true;
  return [
    view(
      NET_A,
      [
        peer('t1', a(11), 'sa', 'a', 1, r('t1')),
        peer('t2', a(12), 'sa', 'a', 2, r('t2')),
        peer('t3', a(13), 'sa', 'a', 3, r('t3')),
        peer('t0', a(10), 'sb', 'b', 1),
        peer('td1', a(21), 'sd', 'd', 1, true, ['dee']),
        peer('td2', a(22), 'sd', 'd', 2, false),
        ...Array.from({ length: 60 }, (_, i) => peer(`tbig${i}`, a(100 + i), 'sbig', 'big', i + 1)),
      ],
      [endpoint('sa', 'a', VIP_A, ['alpha']), endpoint('sb', 'b', a(3)), endpoint('sd', 'd', ''), endpoint('sbig', 'big', '')],
    ),
    view(NET_B, [peer('te', `172.31.${K}.10`, 'se', 'e', 1)], [endpoint('se', 'e', `172.31.${K}.2`)]),
  ];
}

describe.skipIf(!isRoot || !haveTools)('service discovery and VIPs on real netns (needs root)', () => {
  const boxes: Box[] = [];
  const c0 = new Box('c0', a(10), NET_A);
  const c1 = new Box('c1', a(11), NET_A);
  const c2 = new Box('c2', a(12), NET_A);
  const c3 = new Box('c3', a(13), NET_A);
  const cb = new Box('cb', `172.31.${K}.10`, NET_B);
  let upstream: dgram.Socket;
  let upstreamPort = 0;
  let resolver: Resolver;
  let vip: VipBalancer;
  /** iptables below makes the root namespace's `ip filter` table when it is not there: removed after */
  const hadFilterTable = hasFilterTable();

  beforeAll(async () => {
    try {
      for (const n of [NET_A, NET_B]) {
        sh('ip', ['link', 'add', n.bridge, 'type', 'bridge']);
        sh('ip', ['addr', 'add', `${n.gw}/24`, 'dev', n.bridge]);
        sh('ip', ['link', 'set', n.bridge, 'up']);
        // a FORWARD policy of DROP (left by dockerd) would filter bridged frames (ANCHORS)
        sh('iptables', ['-I', 'FORWARD', '-i', n.bridge, '-o', n.bridge, '-j', 'ACCEPT']);
      }
      for (const b of [c0, c1, c2, c3, cb]) {
        boxes.push(b);
        await b.start();
      }
      for (const b of [c1, c2, c3]) await b.call('serve', { port: 8080 });
      // a stand-in for the host's resolver: up.example -> 192.0.2.7, anything else NXDOMAIN
      upstream = dgram.createSocket('udp4');
      upstream.on('message', (m, rinfo) => {
        const q = dnsPacket.decode(m);
        const qq = q.questions![0]!;
        const found = qq.name === 'up.example';
        const r = dnsPacket.encode({
          type: 'response',
          id: q.id ?? 0,
          flags: found ? 0 : 3,
          questions: q.questions ?? [],
          answers: found ? [{ type: 'A', name: qq.name, ttl: 60, data: '192.0.2.7' }] : [],
        });
        upstream.send(r, rinfo.port, rinfo.address);
      });
      await new Promise<void>((r) => upstream.bind(0, '127.0.0.1', () => r()));
      upstreamPort = upstream.address().port;
      resolver = new Resolver({ upstreams: [{ host: '127.0.0.1', port: upstreamPort }] });
      vip = new VipBalancer({ tcpEstablishedTimeoutSec: 7200 });
    } catch (err) {
      await cleanup();
      throw err;
    }
  }, 120_000);

  async function cleanup(): Promise<void> {
    await resolver?.close();
    for (const b of boxes) b.stop();
    upstream?.close();
    for (const n of [NET_A, NET_B, NET_C]) {
      tryRun('iptables', ['-D', 'FORWARD', '-i', n.bridge, '-o', n.bridge, '-j', 'ACCEPT']);
      tryRun('ip', ['link', 'del', n.bridge]);
    }
    // the table (and FORWARD chain) iptables made for the rules above, unless something else uses it
    if (!hadFilterTable && filterTableEmpty()) tryRun('nft', ['delete', 'table', 'ip', 'filter']);
    await closeSpawner();
  }

  afterAll(async () => {
    await cleanup();
    // nothing left: no netns, bridge, veth, listener on port 53
    const netns = sh('ip', ['netns', 'list']);
    expect(netns.split('\n').filter((l) => l.startsWith(`${TAG}-`))).toEqual([]);
    const links = sh('ip', ['-o', 'link', 'show']);
    expect(links.split('\n').filter((l) => l.includes(TAG))).toEqual([]);
    const ss = sh('ss', ['-Hlntu']);
    expect(ss.split('\n').filter((l) => l.includes(`.${K}.1:53 `))).toEqual([]);
    // nor the root namespace's iptables table, if it was not there before
    if (!hadFilterTable) expect(hasFilterTable()).toBe(false);
  }, 60_000);

  it('resolv.conf names each network gateway and no search domain', () => {
    const text = resolvConf(views());
    expect(text).toContain(`nameserver ${NET_A.gw}\n`);
    expect(text).toContain(`nameserver ${NET_B.gw}\n`);
    expect(text).not.toMatch(/^search/m);
  });

  it('answers SERVICE with the VIP, dnsrr with ready tasks, tasks.SERVICE with exactly the ready tasks, task names and aliases (UDP and TCP)', async () => {
    resolver.setViews(views());
    await waitFor(() => resolver.listening().length === 2, 5000);
    expect(resolver.listening()).toEqual([NET_A.gw, NET_B.gw].sort());

    const svc = await c0.dns(NET_A.gw, 'a');
    expect(svc.rcode).toBe('NOERROR');
    expect(svc.answers).toEqual([VIP_A]);
    expect(svc.ttls).toEqual([2]);
    expect((await c0.dns(NET_A.gw, 'alpha')).answers).toEqual([VIP_A]);
    expect((await c0.dns(NET_A.gw, 'A.')).answers).toEqual([VIP_A]);
    expect((await c0.dns(NET_A.gw, 'tasks.a')).answers?.sort()).toEqual([a(11), a(12), a(13)]);
    expect((await c0.dns(NET_A.gw, 'tasks.a', { tcp: true })).answers?.sort()).toEqual([a(11), a(12), a(13)]);
    // dnsrr: the ready tasks only (td2 is not ready)
    expect((await c0.dns(NET_A.gw, 'd')).answers).toEqual([a(21)]);
    expect((await c0.dns(NET_A.gw, 'tasks.d')).answers).toEqual([a(21)]);
    expect((await c0.dns(NET_A.gw, 'dee')).answers).toEqual([a(21)]);
    expect((await c0.dns(NET_A.gw, 'a.2.t2')).answers).toEqual([a(12)]);
    // a known name asked for AAAA: empty answer, not forwarded
    const aaaa = await c0.dns(NET_A.gw, 'a', { qtype: 'AAAA' });
    expect([aaaa.rcode, aaaa.answers]).toEqual(['NOERROR', []]);
    // reverse lookups
    expect((await c0.dns(NET_A.gw, `13.${K}.30.172.in-addr.arpa`, { qtype: 'PTR' })).answers).toEqual(['a.3.t3']);
  });

  it('a UDP answer too big for 512 bytes is truncated with TC set; TCP gives the whole set', async () => {
    resolver.setViews(views());
    const udp = await c0.dns(NET_A.gw, 'tasks.big');
    expect(udp.rcode).toBe('NOERROR');
    expect(udp.tc).toBe(true);
    expect(udp.size).toBeLessThanOrEqual(512);
    expect(udp.answers!.length).toBeGreaterThan(5);
    expect(udp.answers!.length).toBeLessThan(60);
    const tcp = await c0.dns(NET_A.gw, 'tasks.big', { tcp: true });
    expect(tcp.tc).toBe(false);
    expect(new Set(tcp.answers)).toEqual(new Set(Array.from({ length: 60 }, (_, i) => a(100 + i))));
  });

  it('forwards other names to the host resolvers, and SERVFAILs without one', async () => {
    resolver.setViews(views());
    const up = await c0.dns(NET_A.gw, 'up.example');
    expect([up.rcode, up.answers]).toEqual(['NOERROR', ['192.0.2.7']]);
    const nx = await c0.dns(NET_A.gw, 'nosuch.example');
    expect(nx.rcode).toBe('NXDOMAIN');
    const none = new Resolver({ upstreams: [], port: 10053 });
    try {
      none.setViews(views());
      await waitFor(() => none.listening().length === 2, 5000);
      const r = await c0.dns(NET_A.gw, 'up.example', { port: 10053 });
      expect(r.rcode).toBe('SERVFAIL');
      // its own names still answer
      expect((await c0.dns(NET_A.gw, 'a', { port: 10053 })).answers).toEqual([VIP_A]);
    } finally {
      await none.close();
    }
  });

  it('caps the queries forwarded at once: a flood of unknown names gets SERVFAIL at once past 256', async () => {
    const hole = dgram.createSocket('udp4'); // an upstream that never answers
    await new Promise<void>((r) => hole.bind(0, '127.0.0.1', () => r()));
    const r = new Resolver({ upstreams: [{ host: '127.0.0.1', port: hole.address().port }], port: 10056, upstreamTimeoutMs: 1500 });
    try {
      r.setViews(views());
      const t0 = performance.now();
      const fast: number[] = [];
      const all = Array.from({ length: 300 }, (_, i) => {
        const q = dnsPacket.encode({ type: 'query', id: i, questions: [{ type: 'A', name: `n${i}.example` }] });
        return r.answer(q, NET_A.gw, a(10), false).then((buf) => {
          if (performance.now() - t0 < 1000) fast.push(i);
          return (dnsPacket.decode(buf!) as { rcode?: string }).rcode;
        });
      });
      const rcodes = await Promise.all(all);
      expect(fast.length).toBe(300 - 256);
      expect(rcodes.every((c) => c === 'SERVFAIL')).toBe(true);
    } finally {
      await r.close();
      hole.close();
    }
  });

  it('isolates networks: a container on B sees only B, even when it sends to A’s gateway', async () => {
    resolver.setViews(views());
    const e = await cb.dns(NET_B.gw, 'e');
    expect(e.answers).toEqual([`172.31.${K}.2`]);
    // A's service name asked on B's gateway: not ours there, forwarded upstream -> NXDOMAIN
    const onB = await cb.dns(NET_B.gw, 'a');
    expect(onB.rcode).toBe('NXDOMAIN');
    // routed through B's gateway to A's gateway address: refused, no answer from A
    const cross = await cb.dns(NET_A.gw, 'tasks.a');
    expect(cross.answers).toEqual([]);
    expect(cross.rcode).toBe('REFUSED');
    // and a container on A does not see B's names
    expect((await c0.dns(NET_A.gw, 'e')).rcode).toBe('NXDOMAIN');
  });

  it('a task on two networks gets the names of both from either gateway (its own network first)', async () => {
    const vs = views();
    // cb's task te also has an address on A (its second interface; not wired here, DNS only)
    vs[0]!.peers.push(peer('te', a(30), 'se', 'e', 1));
    resolver.setViews(vs);
    expect((await cb.dns(NET_B.gw, 'a')).answers).toEqual([VIP_A]);
    expect((await cb.dns(NET_B.gw, 'tasks.a')).answers?.sort()).toEqual([a(11), a(12), a(13)]);
    // e is on both networks: asked on B, B's record comes first (its VIP on B)
    expect((await cb.dns(NET_B.gw, 'e')).answers).toEqual([`172.31.${K}.2`]);
    // c0 (only on A) still does not see e's VIP on B, only e's task name on A
    expect((await c0.dns(NET_A.gw, 'e')).rcode).toBe('NXDOMAIN');
    expect((await c0.dns(NET_A.gw, 'e.1.te')).answers).toEqual([a(30)]);
  });

  it('a task marked not ready leaves DNS at once; the time from update to effect is measured', async () => {
    resolver.setViews(views());
    expect((await c0.dns(NET_A.gw, 'tasks.a')).answers?.sort()).toEqual([a(11), a(12), a(13)]);
    const t0 = performance.now();
    resolver.setViews(views({ t3: false }));
    let took = -1;
    for (;;) {
      const r = await c0.dns(NET_A.gw, 'tasks.a');
      if (!r.answers?.includes(a(13))) {
        took = performance.now() - t0;
        expect(r.answers?.sort()).toEqual([a(11), a(12)]);
        break;
      }
      if (performance.now() - t0 > 2000) break;
    }
    console.log(`dns removal: ${took.toFixed(1)} ms from setViews to the first answer without the task (one query round trip)`);
    expect(took).toBeGreaterThanOrEqual(0);
    expect(took).toBeLessThan(1000);
  });

  it('binds a gateway that appears later (EADDRNOTAVAIL, then rebind)', async () => {
    const vs = [...views(), view(NET_C, [], [endpoint('sx', 'x', `172.29.${K}.2`)])];
    resolver.setViews(vs);
    await new Promise((r) => setTimeout(r, 300));
    expect(resolver.listening()).not.toContain(NET_C.gw);
    sh('ip', ['link', 'add', NET_C.bridge, 'type', 'bridge']);
    sh('ip', ['addr', 'add', `${NET_C.gw}/24`, 'dev', NET_C.bridge]);
    sh('ip', ['link', 'set', NET_C.bridge, 'up']);
    const t0 = performance.now();
    await waitFor(() => resolver.listening().includes(NET_C.gw), 3000);
    console.log(`resolver bound the new gateway ${(performance.now() - t0).toFixed(0)} ms after its address appeared`);
    resolver.setViews(views());
    await waitFor(() => !resolver.listening().includes(NET_C.gw), 3000);
    tryRun('ip', ['link', 'del', NET_C.bridge]);
  });

  it('the VIP balances TCP over every ready task, the backend sees the client address, and conntrack keeps the configured timeout', async () => {
    await vip.attach('c0', c0.netns, [NET_A.id], views());
    const tables = sh('nsenter', [`--net=${c0.netns}`, 'nft', 'list', 'tables']);
    expect(tables).toContain(`table ip ${TABLE}`);
    const seen = new Map<string, number>();
    for (let i = 0; i < 30; i++) {
      const r = await c0.call('tcp', { host: VIP_A, port: 8080 });
      expect(r.error).toBeUndefined();
      const [name, client] = r.data!.split(' ');
      expect(client).toBe(a(10)); // no SNAT: the backend sees c0's own address
      seen.set(name!, (seen.get(name!) ?? 0) + 1);
    }
    console.log(`vip spread over 30 connections: ${JSON.stringify(Object.fromEntries(seen))}`);
    expect([...seen.keys()].sort()).toEqual(['c1', 'c2', 'c3']);

    // idle connections: the netns' established timeout is the configured 7200 s (IPVS in Swarm: 900 s)
    const sysctl = sh('nsenter', [`--net=${c0.netns}`, 'cat', '/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established']).trim();
    expect(sysctl).toBe('7200');
    const held = await c0.call('hold', { host: VIP_A, port: 8080, key: 'h' });
    expect(held.error).toBeUndefined();
    const backend = held.data!.split(' ')[0];
    await new Promise((r) => setTimeout(r, 3000));
    const sport = held.local!.split(':')[1]!;
    const ct = sh('nsenter', [`--net=${c0.netns}`, 'conntrack', '-L', '-p', 'tcp', '--dst', VIP_A, '--sport', sport]);
    // "tcp      6 7196 ESTABLISHED src=... dst=VIP ... src=BACKEND dst=CLIENT": the reply tuple shows the DNAT
    const m = /^tcp\s+6\s+(\d+)\s+ESTABLISHED/m.exec(ct);
    expect(m, ct).not.toBeNull();
    const left = Number(m![1]);
    console.log(`conntrack entry of a connection idle 3 s: ${left} s left (configured 7200)`);
    expect(left).toBeGreaterThan(7200 - 60);
    expect(left).toBeLessThanOrEqual(7200);
    const again = await c0.call('send', { key: 'h' });
    expect(again.data!.split(' ')[0]).toBe(backend);
    await c0.call('close', { key: 'h' });
  });

  it('a task marked not ready gets no new connection within 1 s of the update (measured), and comes back', async () => {
    await vip.update(views());
    const loop = c0.call('loop', { host: VIP_A, port: 8080, ms: 3500, gap: 10 });
    await new Promise((r) => setTimeout(r, 1200));
    const t0 = Date.now();
    await vip.update(views({ t3: false }));
    const t1 = Date.now();
    const { out } = await loop;
    console.log(`vip removal: update applied in ${t1 - t0} ms (nft transaction in the client netns); ${out!.length} connections in the loop`);
    expect(t1 - t0).toBeLessThan(1000);
    expect(out!.filter((o) => o.r.startsWith('ERR'))).toEqual([]);
    const before = out!.filter((o) => o.t < t0).map((o) => o.r.split(' ')[0]);
    expect(new Set(before)).toContain('c3');
    const after = out!.filter((o) => o.t > t1).map((o) => o.r.split(' ')[0]);
    expect(after.length).toBeGreaterThan(10);
    expect(after).not.toContain('c3');
    expect(new Set(after)).toEqual(new Set(['c1', 'c2']));
    // no ready task at all: connections are reset at once instead of hanging
    await vip.update(views({ t1: false, t2: false, t3: false }));
    const none = await c0.call('tcp', { host: VIP_A, port: 8080 });
    expect(none.error).toMatch(/ECONNREFUSED|ECONNRESET/);
    await vip.update(views());
    const names = new Set<string>();
    for (let i = 0; i < 30 && names.size < 3; i++) names.add((await c0.call('tcp', { host: VIP_A, port: 8080 })).data!.split(' ')[0]!);
    expect([...names].sort()).toEqual(['c1', 'c2', 'c3']);
  });

  it('detach removes the table from the container netns', async () => {
    await vip.detach('c0');
    const tables = sh('nsenter', [`--net=${c0.netns}`, 'nft', 'list', 'tables']);
    expect(tables).not.toContain(TABLE);
    // the VIP no longer answers
    const r = await c0.call('tcp', { host: VIP_A, port: 8080 });
    expect(r.error).toBeDefined();
  });

  it('Discovery drives both: resolv.conf of the task networks, VIP table on attach, updates, detach', async () => {
    const logs: string[] = [];
    const d = new Discovery({ resolver: { port: 10055, upstreams: [] }, log: (m) => logs.push(m) });
    try {
      expect(await d.setViews(views())).toEqual([]);
      expect(d.resolvConf([NET_A.id])).toBe(`# written by flotilla: the node resolver on each network gateway\nnameserver ${NET_A.gw}\noptions ndots:0\n`);
      await d.attachTask('c0', c0.netns, [NET_A.id]);
      expect((await c0.call('tcp', { host: VIP_A, port: 8080 })).data).toMatch(/^c[123] /);
      await waitFor(() => d.resolver.listening().length === 2, 5000);
      expect((await c0.dns(NET_A.gw, 'a', { port: 10055 })).answers).toEqual([VIP_A]);
      expect(await d.setViews(views({ t1: false, t2: false, t3: false }))).toEqual([]);
      expect((await c0.call('tcp', { host: VIP_A, port: 8080 })).error).toMatch(/ECONNREFUSED|ECONNRESET/);
      expect((await c0.dns(NET_A.gw, 'tasks.a', { port: 10055 })).answers).toEqual([]);
      // an agent restart: a new Discovery adopts the task; the table stays until the first views
      const d2 = new Discovery({ resolver: { port: 10057, upstreams: [] } });
      try {
        d2.adoptTask('c0', c0.netns, [NET_A.id]);
        expect(sh('nsenter', [`--net=${c0.netns}`, 'nft', 'list', 'tables'])).toContain(TABLE);
        expect((await c0.call('tcp', { host: VIP_A, port: 8080 })).error).toMatch(/ECONNREFUSED|ECONNRESET/);
        await d2.setViews(views());
        expect((await c0.call('tcp', { host: VIP_A, port: 8080 })).data).toMatch(/^c[123] /);
      } finally {
        await d2.close();
      }
      await d.detachTask('c0');
      expect(sh('nsenter', [`--net=${c0.netns}`, 'nft', 'list', 'tables'])).not.toContain(TABLE);
    } finally {
      await d.close();
    }
    expect(d.resolver.listening()).toEqual([]);
  });
});

describe('VIP ruleset rendering', () => {
  it('one map from VIP to a chain per service; empty services reject', () => {
    const text = renderRuleset([
      { vip: '10.0.1.2', backends: ['10.0.1.5', '10.0.1.6'] },
      { vip: '10.0.1.3', backends: [] },
    ]);
    expect(text).toContain('elements = { 10.0.1.2 : jump svc_0 }');
    expect(text).toContain('dnat to numgen random mod 2 map { 0 : 10.0.1.5, 1 : 10.0.1.6 }');
    expect(text).toContain('ip daddr { 10.0.1.3 } meta l4proto tcp reject with tcp reset');
    expect(text.split('\n').slice(0, 2)).toEqual(['table ip flotilla', 'delete table ip flotilla']);
    // no filter hook at all while every VIP has a task (each packet sent would pay for the call)
    expect(renderRuleset([{ vip: '10.0.1.2', backends: ['10.0.1.5'] }])).not.toContain('hook output priority 0');
  });
});

async function waitFor(cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 20));
  }
}

