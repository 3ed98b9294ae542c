/**
 * The node's resolver for containers on overlay networks (docs/networking.md, "Service discovery").
 *
 * The agent, in the host's network namespace, answers DNS (UDP and TCP, port 53) on the gateway address of
 * every network this node has a bridge for. A container's /etc/resolv.conf names the gateways of its
 * networks (resolvConf below), so a query reaches the resolver through the container's own network: a
 * container that is not on network B has no path to B's gateway and never sees B's names.
 *
 * The answer set of a query is the networks the asking task is on: the query's source address is looked up
 * among the peers of the network whose gateway it arrived on, and every network that task has an address on
 * is searched (the arrival network first). A source that is not a known peer sees the arrival network only.
 *
 * Names, from the NetworkViews the manager sends (answers follow the store, not gossip):
 *   SERVICE / service alias       -> the VIP, or with dnsrr the addresses of its ready tasks
 *   tasks.SERVICE / tasks.ALIAS   -> the addresses of its ready tasks (running and, with a health check, healthy)
 *   task name (SERVICE.SLOT.TASKID), task alias -> the task's address
 *   reverse (in-addr.arpa) of a VIP or task address -> the service or task name
 * A known name asked for another type than A gets an empty NOERROR answer; anything else is forwarded to
 * the host's resolvers and relayed; with none configured or none answering, SERVFAIL.
 *
 * TTL: 2 s (DEFAULT_TTL). Answers change as soon as a view does (a task stops, turns unhealthy, scales
 * away); a short TTL makes clients that cache ask again soon, so they never keep a removed address for long.
 * Swarm's 600 s lets clients keep using gone tasks for minutes.
 */
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import dnsPacket from 'dns-packet';
import type { Answer, Packet, Question } from 'dns-packet';
import type { NetworkView } from '../../gen/flotilla/v1/dispatcher.js';
import { EndpointMode } from '../../gen/flotilla/v1/objects.js';

export const DEFAULT_TTL = 2;
const RCODE_SERVFAIL = 2;
const RCODE_NXDOMAIN = 3;
const RCODE_FORMERR = 1;
const RCODE_REFUSED = 5;
/** queries being forwarded at once, over all gateways; more get SERVFAIL at once */
const MAX_FORWARDS = 256;
/** open TCP connections per gateway; more are closed at once */
const MAX_TCP = 128;

export interface Upstream {
  host: string;
  port: number;
}

export interface ResolverOptions {
  /** forwarding targets; default: the nameservers of the host's /etc/resolv.conf (hostUpstreams) */
  upstreams?: Upstream[];
  /** port to listen on at each gateway; default 53 */
  port?: number;
  /** TTL of our answers in seconds; default DEFAULT_TTL */
  ttl?: number;
  /** how long one upstream gets to answer; default 2000 ms */
  upstreamTimeoutMs?: number;
  /** how often a gateway that could not be bound yet (its bridge not up: EADDRNOTAVAIL) is tried again; default 200 ms */
  rebindMs?: number;
  /** warnings (bind failures other than a missing address) */
  log?: (msg: string) => void;
}

/** One network's names. */
interface Zone {
  networkId: string;
  /** the network's subnet as [base, mask] (IPv4), when known */
  subnet?: [number, number];
  /** lower-case name -> addresses (A records) */
  names: Map<string, string[]>;
  /** source address -> task id of the peer with that address */
  peerByAddr: Map<string, string>;
  /** address -> name for PTR */
  reverse: Map<string, string>;
}

interface Listener {
  addr: string;
  udp?: dgram.Socket;
  tcp?: net.Server;
  sockets: Set<net.Socket>;
  /** bound on both protocols */
  bound: boolean;
  binding: boolean;
  lastError?: string;
}

/** Strips the prefix length of a CIDR address ("10.0.1.5/24" -> "10.0.1.5"). */
export function ipOf(cidr: string): string {
  const slash = cidr.indexOf('/');
  return slash < 0 ? cidr : cidr.slice(0, slash);
}

/**
 * The nameservers of a resolv.conf text as upstreams (port 53). Loopback nameservers (a local stub such as
 * systemd-resolved on 127.0.0.53) are kept: the agent forwards from the host's network namespace, where
 * they answer (Docker must skip them because it forwards from inside the container).
 */
export function parseResolvConf(text: string): Upstream[] {
  const out: Upstream[] = [];
  for (const line of text.split('\n')) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (m?.[1] !== undefined && net.isIP(m[1]) !== 0) out.push({ host: m[1], port: 53 });
  }
  return out;
}

/** The host's resolvers (/etc/resolv.conf); none when it cannot be read. */
export function hostUpstreams(file = '/etc/resolv.conf'): Upstream[] {
  try {
    return parseResolvConf(fs.readFileSync(file, 'utf8'));
  } catch {
    return [];
  }
}

/**
 * The /etc/resolv.conf for a container on the given networks: one nameserver line per network gateway
 * (at most 3 are used by libc), no search domain, and ndots:0 so a short name is asked as it is.
 */
export function resolvConf(views: NetworkView[]): string {
  const lines = ['# written by flotilla: the node resolver on each network gateway'];
  for (const v of views) {
    const gw = v.network?.allocation?.gateway;
    if (gw) lines.push(`nameserver ${ipOf(gw)}`);
  }
  lines.push('options ndots:0');
  return lines.join('\n') + '\n';
}

function norm(name: string): string {
  return name.toLowerCase().replace(/\.$/, '');
}

function add(m: Map<string, string[]>, name: string, addr: string): void {
  if (!name) return;
  const k = norm(name);
  const list = m.get(k);
  if (list === undefined) m.set(k, [addr]);
  else if (!list.includes(addr)) list.push(addr);
}

/** Builds the names of one network from its view. */
export function buildZone(v: NetworkView): Zone {
  const names = new Map<string, string[]>();
  const peerByAddr = new Map<string, string>();
  const reverse = new Map<string, string>();
  const readyBySvc = new Map<string, string[]>();
  for (const p of v.peers) {
    const addr = ipOf(p.address);
    if (!addr) continue;
    peerByAddr.set(addr, p.taskId);
    if (p.taskName) {
      add(names, p.taskName, addr);
      reverse.set(addr, norm(p.taskName));
    }
    if (!p.ready) continue;
    const list = readyBySvc.get(p.serviceId) ?? [];
    list.push(addr);
    readyBySvc.set(p.serviceId, list);
    for (const a of p.aliases) add(names, a, addr);
  }
  for (const ep of v.endpoints) {
    const ready = readyBySvc.get(ep.serviceId) ?? [];
    const vip = ep.mode === EndpointMode.ENDPOINT_MODE_VIP ? ipOf(ep.vip) : '';
    for (const n of [ep.serviceName, ...ep.aliases]) {
      if (!n) continue;
      const k = norm(n);
      // an entry with no ready task still exists (NOERROR, no data) rather than being forwarded
      if (!names.has(k)) names.set(k, []);
      const tk = `tasks.${k}`;
      if (!names.has(tk)) names.set(tk, []);
      for (const a of ready) add(names, tk, a);
      if (vip) add(names, k, vip);
      else for (const a of ready) add(names, k, a);
    }
    if (vip) reverse.set(vip, norm(ep.serviceName));
  }
  const subnet = v.network?.allocation?.subnet ? parseCidr(v.network.allocation.subnet) : undefined;
  return { networkId: v.network?.id ?? '', ...(subnet ? { subnet } : {}), names, peerByAddr, reverse };
}

function ip4(s: string): number | undefined {
  const p = s.split('.').map(Number);
  if (p.length !== 4 || p.some((x) => !Number.isInteger(x) || x < 0 || x > 255)) return undefined;
  return ((p[0]! << 24) | (p[1]! << 16) | (p[2]! << 8) | p[3]!) >>> 0;
}

function parseCidr(cidr: string): [number, number] | undefined {
  const [a, l] = cidr.split('/');
  const base = ip4(a ?? '');
  const len = Number(l ?? '32');
  if (base === undefined || !Number.isInteger(len) || len < 0 || len > 32) return undefined;
  const mask = len === 0 ? 0 : (~0 << (32 - len)) >>> 0;
  return [(base & mask) >>> 0, mask];
}

function inSubnet(addr: string, subnet: [number, number]): boolean {
  const a = ip4(addr);
  return a !== undefined && ((a & subnet[1]) >>> 0) === subnet[0];
}

/**
 * The resolver. setViews() gives it the node's current NetworkViews (every network this node has a bridge
 * for); it then listens on each view's gateway and answers from the new views at once.
 */
export class Resolver {
  private readonly ttl: number;
  private readonly port: number;
  private readonly upstreams: Upstream[];
  private readonly upstreamTimeoutMs: number;
  private readonly rebindMs: number;
  private readonly log: (msg: string) => void;
  /** gateway ip -> network id */
  private gateways = new Map<string, string>();
  /** network id -> zone */
  private zones = new Map<string, Zone>();
  private readonly listeners = new Map<string, Listener>();
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private forwarding = 0;

  constructor(o: ResolverOptions = {}) {
    this.ttl = o.ttl ?? DEFAULT_TTL;
    this.port = o.port ?? 53;
    this.upstreams = o.upstreams ?? hostUpstreams();
    this.upstreamTimeoutMs = o.upstreamTimeoutMs ?? 2000;
    this.rebindMs = o.rebindMs ?? 200;
    this.log = o.log ?? (() => undefined);
  }

  /**
   * Replaces the node's views: answers come from these from now on, and the resolver listens on exactly
   * the gateways they name (new ones bound, gone ones closed). A gateway whose address is not on the host
   * yet is bound as soon as it appears.
   */
  setViews(views: NetworkView[]): void {
    if (this.closed) return;
    const gateways = new Map<string, string>();
    const zones = new Map<string, Zone>();
    for (const v of views) {
      const id = v.network?.id;
      const gw = v.network?.allocation?.gateway;
      if (!id) continue;
      zones.set(id, buildZone(v));
      if (gw) gateways.set(ipOf(gw), id);
    }
    this.gateways = gateways;
    this.zones = zones;
    for (const addr of this.listeners.keys()) if (!gateways.has(addr)) void this.unlisten(addr);
    for (const addr of gateways.keys()) if (!this.listeners.has(addr)) this.listen(addr);
  }

  /** The gateway addresses it is answering on now (bound on UDP and TCP). */
  listening(): string[] {
    return [...this.listeners.values()].filter((l) => l.bound).map((l) => l.addr).sort();
  }

  /** Stops listening everywhere; pending answers are dropped. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    await Promise.all([...this.listeners.keys()].map((a) => this.unlisten(a)));
  }

  /** Answers one query (wire format) that arrived on gateway `local` from `source`. */
  async answer(query: Buffer, local: string, source: string, tcp: boolean): Promise<Buffer | undefined> {
    try {
      return await this.answerOrThrow(query, local, source, tcp);
    } catch (err) {
      this.log(`resolver: cannot answer a query from ${source}: ${(err as Error).message}`);
      return undefined;
    }
  }

  private async answerOrThrow(query: Buffer, local: string, source: string, tcp: boolean): Promise<Buffer | undefined> {
    let q: Packet;
    try {
      q = dnsPacket.decode(query);
    } catch {
      if (query.length < 2) return undefined;
      return reply({ id: query.readUInt16BE(0), questions: [] }, RCODE_FORMERR, []);
    }
    const question = q.questions?.[0];
    if (q.type === 'response' || question === undefined) return reply(q, RCODE_FORMERR, []);
    const local4 = local.replace(/^::ffff:/, '');
    const networkId = this.gateways.get(local4);
    const src = source.replace(/^::ffff:/, '');
    // the host routes between its bridges, so a container on another network could send to this gateway
    // through its own: answer only sources inside the network the gateway belongs to
    const subnet = networkId !== undefined ? this.zones.get(networkId)?.subnet : undefined;
    if (networkId === undefined || (subnet !== undefined && !inSubnet(src, subnet))) return reply(q, RCODE_REFUSED, []);
    const found = this.lookup(question, networkId, src);
    if (found !== undefined) return tcp ? reply(q, 0, found) : fitUdp(q, found);
    return this.forward(q, query, tcp);
  }

  /** The zones searched for a query from `source` arriving on `networkId`: its own first. */
  private zonesFor(networkId: string, source: string): Zone[] {
    const arrival = this.zones.get(networkId);
    if (arrival === undefined) return [];
    const taskId = arrival.peerByAddr.get(source);
    const out = [arrival];
    if (taskId === undefined) return out;
    for (const z of this.zones.values()) {
      if (z !== arrival && [...z.peerByAddr.values()].includes(taskId)) out.push(z);
    }
    return out;
  }

  /** Our answers for a question, or undefined when the name is not ours (forward it). */
  private lookup(question: Question, networkId: string, source: string): Answer[] | undefined {
    const name = norm(question.name);
    for (const z of this.zonesFor(networkId, source)) {
      if (name.endsWith('.in-addr.arpa')) {
        const ip = name.slice(0, -'.in-addr.arpa'.length).split('.').reverse().join('.');
        const target = z.reverse.get(ip);
        if (target === undefined) continue;
        if (question.type !== 'PTR' && (question.type as string) !== 'ANY') return [];
        return [{ type: 'PTR', name: question.name, ttl: this.ttl, class: 'IN', data: target }];
      }
      const addrs = z.names.get(name);
      if (addrs === undefined) continue;
      if (question.type !== 'A' && (question.type as string) !== 'ANY') return [];
      return addrs.map((a) => ({ type: 'A' as const, name: question.name, ttl: this.ttl, class: 'IN' as const, data: a }));
    }
    return undefined;
  }

  /** Relays the query to the host's resolvers in turn; SERVFAIL when none answers. */
  private async forward(q: Packet, query: Buffer, tcp: boolean): Promise<Buffer> {
    // a container flooding unknown names must not take every socket of the agent
    if (this.forwarding >= MAX_FORWARDS) return reply(q, RCODE_SERVFAIL, []);
    this.forwarding++;
    try {
      for (const up of this.upstreams) {
        const r = tcp ? await this.askTcp(up, query) : await this.askUdp(up, query);
        if (r !== undefined) return r;
      }
      return reply(q, RCODE_SERVFAIL, []);
    } finally {
      this.forwarding--;
    }
  }

  private askUdp(up: Upstream, query: Buffer): Promise<Buffer | undefined> {
    return new Promise((resolve) => {
      const s = dgram.createSocket(net.isIPv6(up.host) ? 'udp6' : 'udp4');
      const id = query.readUInt16BE(0);
      const done = (r: Buffer | undefined): void => {
        clearTimeout(t);
        s.close();
        resolve(r);
      };
      const t = setTimeout(() => done(undefined), this.upstreamTimeoutMs);
      s.on('error', () => done(undefined));
      s.on('message', (m) => {
        if (m.length >= 2 && m.readUInt16BE(0) === id) done(m);
      });
      s.send(query, up.port, up.host);
    });
  }

  private askTcp(up: Upstream, query: Buffer): Promise<Buffer | undefined> {
    return new Promise((resolve) => {
      let buf = Buffer.alloc(0);
      let settled = false;
      const s = net.connect({ host: up.host, port: up.port });
      const done = (r: Buffer | undefined): void => {
        if (settled) return;
        settled = true;
        clearTimeout(t);
        s.destroy();
        resolve(r);
      };
      const t = setTimeout(() => done(undefined), this.upstreamTimeoutMs);
      s.on('error', () => done(undefined));
      s.on('close', () => done(undefined));
      s.on('connect', () => {
        const len = Buffer.alloc(2);
        len.writeUInt16BE(query.length);
        s.write(Buffer.concat([len, query]));
      });
      s.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) done(buf.subarray(2, 2 + buf.readUInt16BE(0)));
      });
    });
  }

  private listen(addr: string): void {
    const l: Listener = { addr, sockets: new Set(), bound: false, binding: false };
    this.listeners.set(addr, l);
    void this.bind(l);
  }

  /** Binds UDP and TCP on the gateway; on EADDRNOTAVAIL (the bridge is not up yet) tries again later. */
  private async bind(l: Listener): Promise<void> {
    if (l.bound || l.binding || this.closed || this.listeners.get(l.addr) !== l) return;
    l.binding = true;
    try {
      if (l.udp === undefined) {
        const udp = dgram.createSocket('udp4');
        udp.on('message', (msg, rinfo) => {
          void this.answer(msg, l.addr, rinfo.address, false).then((r) => {
            if (r !== undefined && this.listeners.get(l.addr) === l) udp.send(r, rinfo.port, rinfo.address, () => undefined);
          });
        });
        try {
          await new Promise<void>((resolve, reject) => {
            udp.once('error', reject);
            udp.bind({ address: l.addr, port: this.port, exclusive: true }, () => {
              udp.off('error', reject);
              resolve();
            });
          });
        } catch (err) {
          try { udp.close(); } catch { /* never bound */ }
          throw err;
        }
        udp.on('error', (err) => this.log(`resolver udp ${l.addr}: ${err.message}`));
        l.udp = udp;
      }
      if (l.tcp === undefined) {
        const tcp = net.createServer((sock) => this.serveTcp(l, sock));
        await new Promise<void>((resolve, reject) => {
          tcp.once('error', reject);
          tcp.listen({ host: l.addr, port: this.port, exclusive: true }, () => {
            tcp.off('error', reject);
            resolve();
          });
        });
        tcp.on('error', (err) => this.log(`resolver tcp ${l.addr}: ${err.message}`));
        l.tcp = tcp;
      }
      if (this.listeners.get(l.addr) !== l || this.closed) {
        void closeListener(l);
        return;
      }
      l.bound = true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // logged once per listener and error (the retry runs every rebindMs)
      const msg = (err as Error).message;
      if (code !== 'EADDRNOTAVAIL' && l.lastError !== msg) this.log(`resolver cannot listen on ${l.addr}:${this.port}: ${msg}; retrying`);
      l.lastError = msg;
      this.scheduleRebind();
    } finally {
      l.binding = false;
    }
  }

  private scheduleRebind(): void {
    if (this.timer || this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      for (const l of this.listeners.values()) void this.bind(l);
    }, this.rebindMs);
    this.timer.unref();
  }

  private serveTcp(l: Listener, sock: net.Socket): void {
    if (l.sockets.size >= MAX_TCP) {
      sock.destroy();
      return;
    }
    l.sockets.add(sock);
    sock.setTimeout(10_000, () => sock.destroy());
    sock.on('close', () => l.sockets.delete(sock));
    sock.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
        const msg = buf.subarray(2, 2 + buf.readUInt16BE(0));
        buf = buf.subarray(2 + msg.length);
        void this.answer(msg, l.addr, sock.remoteAddress ?? '', true).then((r) => {
          if (r === undefined || sock.destroyed) return;
          const len = Buffer.alloc(2);
          len.writeUInt16BE(r.length);
          sock.write(Buffer.concat([len, r]));
        });
      }
    });
  }

  private async unlisten(addr: string): Promise<void> {
    const l = this.listeners.get(addr);
    if (l === undefined) return;
    this.listeners.delete(addr);
    await closeListener(l);
  }
}

async function closeListener(l: Listener): Promise<void> {
  l.bound = false;
  for (const s of l.sockets) s.destroy();
  const waits: Promise<void>[] = [];
  if (l.udp) {
    const u = l.udp;
    waits.push(new Promise((r) => u.close(() => r())));
  }
  if (l.tcp) {
    const t = l.tcp;
    waits.push(new Promise((r) => t.close(() => r())));
  }
  l.udp = undefined;
  l.tcp = undefined;
  await Promise.all(waits);
}

/**
 * A UDP answer must fit the client's buffer: 512 bytes, or the EDNS payload size it advertised (at most
 * 4096). When all records do not fit, as many as fit are sent with the TC bit set, and the client asks
 * again over TCP, where the whole set goes (a service with many tasks).
 */
function fitUdp(q: Packet, answers: Answer[]): Buffer {
  const opt = (q.additionals ?? []).find((r) => r.type === 'OPT');
  const limit = Math.min(4096, Math.max(512, opt !== undefined && 'udpPayloadSize' in opt ? opt.udpPayloadSize : 512));
  const full = reply(q, 0, answers);
  if (full.length <= limit) return full;
  let lo = 0;
  let hi = answers.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (reply(q, 0, answers.slice(0, mid), true).length <= limit) lo = mid;
    else hi = mid - 1;
  }
  return reply(q, 0, answers.slice(0, lo), true);
}

function reply(q: Packet, rcode: number, answers: Answer[], truncated = false): Buffer {
  const rd = (q.flags ?? 0) & dnsPacket.RECURSION_DESIRED;
  const aa = rcode === 0 || rcode === RCODE_NXDOMAIN ? dnsPacket.AUTHORITATIVE_ANSWER : 0;
  return dnsPacket.encode({
    type: 'response',
    id: q.id ?? 0,
    flags: rd | dnsPacket.RECURSION_AVAILABLE | aa | (truncated ? dnsPacket.TRUNCATED_RESPONSE : 0) | rcode,
    questions: q.questions ?? [],
    answers,
  });
}
