/**
 * Helpers for data-plane tests and the network benchmark: NetworkViews built by hand (what the
 * manager's allocator sends), commands inside a namespace, link counters, a TCP echo/throughput peer.
 */
import { spawn } from 'node:child_process';
import type { NetworkView, NetworkPeer } from '../../gen/flotilla/v1/dispatcher.js';
import { run } from './testbed.js';

export interface HandNetwork {
  id: string;
  name: string;
  vni: number;
  subnet: string;
  gateway: string;
  mtu?: number;
}

export interface HandTask {
  taskId: string;
  nodeId: string;
  nodeAddr: string;
  /** CIDR */
  address: string;
}

export function handView(n: HandNetwork, tasks: HandTask[]): NetworkView {
  const peers: NetworkPeer[] = tasks.map((t) => ({
    taskId: t.taskId,
    nodeId: t.nodeId,
    nodeAddr: t.nodeAddr,
    address: t.address,
    serviceId: 'svc',
    serviceName: 'svc',
    ready: true,
    aliases: [],
    nodeAddress: false,
    taskName: `svc.1.${t.taskId}`,
  }));
  return {
    network: {
      id: n.id,
      meta: undefined,
      spec: { name: n.name, labels: {}, driver: 'overlay', ipam: { subnet: n.subnet, gateway: n.gateway }, driverOpts: {}, ingress: false, internal: false, attachable: false },
      allocation: { subnet: n.subnet, gateway: n.gateway, vni: n.vni, mtu: n.mtu ?? 0, nodeAddresses: {} },
    },
    peers,
    endpoints: [],
  };
}

/** Runs a command in a network namespace given by path (nsenter --net). */
export function inNs(netns: string, cmd: string[], timeoutMs = 20_000): ReturnType<typeof run> {
  return run('nsenter', [`--net=${netns}`, '--', ...cmd], { timeoutMs });
}

/** A link's packet counters in a namespace. */
export async function counters(netns: string, dev: string): Promise<{ rx: number; tx: number; rxBytes: number; txBytes: number }> {
  const r = await inNs(netns, ['ip', '-j', '-s', 'link', 'show', dev]);
  if (r.code !== 0) throw new Error(`ip -s link show ${dev}: ${r.stderr}`);
  const l = (JSON.parse(r.stdout) as { stats64: { rx: { packets: number; bytes: number }; tx: { packets: number; bytes: number } } }[])[0]!;
  return { rx: l.stats64.rx.packets, tx: l.stats64.tx.packets, rxBytes: l.stats64.rx.bytes, txBytes: l.stats64.tx.bytes };
}

export async function linkNames(netns: string): Promise<string[]> {
  const r = await inNs(netns, ['ip', '-j', 'link', 'show']);
  return (JSON.parse(r.stdout || '[]') as { ifname: string }[]).map((l) => l.ifname);
}

export async function mtuOf(netns: string, dev: string): Promise<number> {
  const r = await inNs(netns, ['ip', '-j', 'link', 'show', dev]);
  return (JSON.parse(r.stdout) as { mtu: number }[])[0]!.mtu;
}

/** ICMP echo requests a namespace has received (/proc/net/snmp read from inside it). */
export async function icmpInEchos(netns: string): Promise<number> {
  const lines = (await inNs(netns, ['cat', '/proc/net/snmp'])).stdout.split('\n').filter((l) => l.startsWith('Icmp:'));
  const names = lines[0]!.split(/\s+/);
  const values = lines[1]!.split(/\s+/);
  return Number(values[names.indexOf('InEchos')]);
}

/** busybox ping: true when every one of `count` echo requests was answered. */
export async function ping(netns: string, ip: string, count = 2): Promise<boolean> {
  const r = await inNs(netns, ['busybox', 'ping', '-c', String(count), '-W', '1', ip]);
  return r.code === 0;
}

/** Node code for a TCP peer: `server PORT` answers each connection's bytes with their count then closes;
 * `client IP PORT BYTES` sends BYTES and prints {bytes, ms}; `rtt IP PORT N` prints N round-trip times (ms). */
export const TCP_TOOL = String.raw`
const net = require('node:net');
const [mode, a, b, c] = process.argv.slice(1);
if (mode === 'server') {
  const srv = net.createServer({ noDelay: true }, (s) => {
    let n = 0, first = true;
    s.on('data', (d) => {
      if (d[0] === 0x50 && d.length <= 64 && n === 0 && d.toString().startsWith('PING')) { s.write(d); return; }
      n += d.length;
    });
    s.on('end', () => { s.end(String(n)); });
    s.on('error', () => undefined);
  });
  srv.listen(Number(a), '0.0.0.0', () => process.stdout.write('listening\n'));
} else if (mode === 'client') {
  const total = Number(c); const chunk = Buffer.alloc(256 * 1024, 120);
  const t0 = process.hrtime.bigint(); let sent = 0, reply = '';
  const s = net.connect(Number(b), a, () => {
    const pump = () => { while (sent < total) { const n = Math.min(chunk.length, total - sent); sent += n; if (!s.write(n === chunk.length ? chunk : chunk.subarray(0, n))) { s.once('drain', pump); return; } } s.end(); };
    pump();
  });
  s.on('data', (d) => (reply += d));
  s.on('end', () => { const ms = Number(process.hrtime.bigint() - t0) / 1e6; process.stdout.write(JSON.stringify({ bytes: Number(reply), ms }) + '\n'); });
  s.on('error', (e) => { process.stderr.write(String(e) + '\n'); process.exit(1); });
} else if (mode === 'rtt') {
  const n = Number(c); const times = []; let t0;
  const s = net.connect({ port: Number(b), host: a, noDelay: true }, () => { t0 = process.hrtime.bigint(); s.write('PING'); });
  s.on('data', () => { times.push(Number(process.hrtime.bigint() - t0) / 1e6); if (times.length >= n) { process.stdout.write(JSON.stringify(times) + '\n'); s.destroy(); return; } t0 = process.hrtime.bigint(); s.write('PING'); });
  s.on('error', (e) => { process.stderr.write(String(e) + '\n'); process.exit(1); });
}
`;

/** Starts the TCP tool's server in a namespace; resolves once it listens. kill() ends it. */
export async function tcpServer(netns: string, port: number): Promise<{ kill: () => void }> {
  const child = spawn('nsenter', [`--net=${netns}`, '--', process.execPath, '-e', TCP_TOOL, 'server', String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('tcp server did not start')), 10_000);
    child.stdout.on('data', (d: Buffer) => {
      if (d.toString().includes('listening')) {
        clearTimeout(t);
        resolve();
      }
    });
    child.on('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`tcp server exited (${code})`));
    });
  });
  return { kill: () => child.kill('SIGKILL') };
}

/** Sends `bytes` over TCP from a namespace; resolves what the server counted and the time taken. */
export async function tcpSend(netns: string, ip: string, port: number, bytes: number, timeoutMs = 60_000): Promise<{ bytes: number; ms: number }> {
  const r = await run('nsenter', [`--net=${netns}`, '--', process.execPath, '-e', TCP_TOOL, 'client', ip, String(port), String(bytes)], { timeoutMs });
  if (r.code !== 0) throw new Error(`tcp client to ${ip}:${port} failed (${r.code}): ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as { bytes: number; ms: number };
}

/** Round-trip times (ms) of n 4-byte request/answer exchanges on one TCP connection. */
export async function tcpRtt(netns: string, ip: string, port: number, n: number): Promise<number[]> {
  const r = await run('nsenter', [`--net=${netns}`, '--', process.execPath, '-e', TCP_TOOL, 'rtt', ip, String(port), String(n)], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`tcp rtt to ${ip}:${port} failed (${r.code}): ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as number[];
}
