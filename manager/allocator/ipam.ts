/**
 * IP address management, pure: IPv4 CIDR parsing, subnets carved from the cluster's default pool,
 * overlap checks, VXLAN ids, and the address set of one network (a bitmap over its host addresses).
 * No store, no clock: the allocator (allocator.ts) and the control API feed it what the store holds.
 */
import { invalidArgument } from '../../common/errors.js';
import type { Network } from '../../gen/flotilla/v1/objects.js';

export const DEFAULT_ADDR_POOL = '10.0.0.0/8';
export const DEFAULT_POOL_MASK_LENGTH = 24;
/** Swarm's first overlay VNI; below it are ids Docker keeps for other uses. */
export const FIRST_VNI = 4096;
/** 24-bit VXLAN network identifiers */
export const MAX_VNI = (1 << 24) - 1;
/** the largest MTU a network may ask for (jumbo frames) */
export const MAX_MTU = 9216;
/** the smallest (IPv4's minimum datagram a link must carry) */
export const MIN_MTU = 576;

export interface Cidr {
  /** the network address, as an unsigned 32-bit number */
  base: number;
  prefix: number;
}

export function ipToNum(ip: string): number | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(ip);
  if (!m) return undefined;
  let n = 0;
  for (let i = 1; i <= 4; i++) {
    const part = m[i]!;
    if (part.length > 1 && part.startsWith('0')) return undefined;
    const b = Number(part);
    if (b > 255) return undefined;
    n = n * 256 + b;
  }
  return n;
}

export function numToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

function sizeOf(prefix: number): number {
  return 2 ** (32 - prefix);
}

/** Parses "A.B.C.D/N"; undefined when it is not one. With strict, host bits must be zero. */
export function parseCidr(s: string, strict = true): Cidr | undefined {
  const m = /^([0-9.]+)\/(\d{1,2})$/.exec(s);
  if (!m) return undefined;
  const ip = ipToNum(m[1]!);
  const prefix = Number(m[2]);
  if (ip === undefined || prefix > 32) return undefined;
  const size = sizeOf(prefix);
  const base = ip - (ip % size);
  if (strict && base !== ip) return undefined;
  return { base, prefix };
}

export function formatCidr(c: Cidr): string {
  return `${numToIp(c.base)}/${c.prefix}`;
}

export function overlaps(a: Cidr, b: Cidr): boolean {
  const aEnd = a.base + sizeOf(a.prefix);
  const bEnd = b.base + sizeOf(b.prefix);
  return a.base < bEnd && b.base < aEnd;
}

export function contains(c: Cidr, ip: number): boolean {
  return ip >= c.base && ip < c.base + sizeOf(c.prefix);
}

/** The usable host addresses of a subnet: all but the network and broadcast addresses. */
export function hostRange(c: Cidr): { first: number; last: number } {
  const size = sizeOf(c.prefix);
  if (size <= 2) return { first: c.base, last: c.base + size - 1 }; // /31, /32: no network/broadcast
  return { first: c.base + 1, last: c.base + size - 2 };
}

/** The smallest subnet a network may have: a /29 (6 host addresses). /30 leaves one task address. */
export const MAX_PREFIX = 29;
/** The largest: a /8 (more is a pool, not a network). */
export const MIN_PREFIX = 8;

/** Checks a user's subnet, naming the flag. */
export function checkSubnet(flag: string, s: string): Cidr {
  const c = parseCidr(s, false);
  if (!c) throw invalidArgument(flag, s, 'not an IPv4 CIDR (e.g. 10.1.0.0/24)');
  if (formatCidr(c) !== s) throw invalidArgument(flag, s, `host bits set: the subnet is ${formatCidr(c)}`);
  if (c.prefix < MIN_PREFIX || c.prefix > MAX_PREFIX) throw invalidArgument(flag, s, `prefix length must be between /${MIN_PREFIX} and /${MAX_PREFIX}`);
  return c;
}

/** Checks a gateway against its subnet: a host address of it. */
export function checkGateway(flag: string, gw: string, subnet: Cidr): number {
  const n = ipToNum(gw);
  if (n === undefined) throw invalidArgument(flag, gw, 'not an IPv4 address');
  const r = hostRange(subnet);
  if (n < r.first || n > r.last) throw invalidArgument(flag, gw, `not a host address of subnet ${formatCidr(subnet)}`);
  return n;
}

/** Parses a driver's mtu option: empty/absent = 0 (decided on each node). */
export function parseMtu(v: string | undefined): number {
  if (v === undefined || v === '') return 0;
  if (!/^\d+$/.test(v)) throw invalidArgument('--opt mtu', v, 'not a number');
  const n = Number(v);
  if (n < MIN_MTU || n > MAX_MTU) throw invalidArgument('--opt mtu', v, `must be between ${MIN_MTU} and ${MAX_MTU}`);
  return n;
}

export interface Pool {
  pool: Cidr;
  maskLength: number;
}

/** Checks a default address pool (and its subnet length), naming the flags. */
export function checkPool(pool: string, maskLength: number): Pool {
  const c = parseCidr(pool, false);
  if (!c) throw invalidArgument('--default-addr-pool', pool, 'not an IPv4 CIDR (e.g. 10.0.0.0/8)');
  if (formatCidr(c) !== pool) throw invalidArgument('--default-addr-pool', pool, `host bits set: the pool is ${formatCidr(c)}`);
  if (!Number.isInteger(maskLength) || maskLength < c.prefix || maskLength > MAX_PREFIX || maskLength < MIN_PREFIX)
    throw invalidArgument('--default-addr-pool-mask-length', maskLength, `must be between /${Math.max(c.prefix, MIN_PREFIX)} and /${MAX_PREFIX} for pool ${pool}`);
  return { pool: c, maskLength };
}

/**
 * The first subnet of the pool (in order) that overlaps no taken subnet; undefined when the pool is
 * full. Skips over a taken subnet in one step, so a pool with many networks is cheap to search.
 */
export function nextPoolSubnet(p: Pool, taken: Cidr[]): Cidr | undefined {
  const step = sizeOf(p.maskLength);
  const end = p.pool.base + sizeOf(p.pool.prefix);
  const sorted = [...taken].sort((a, b) => a.base - b.base);
  let cand = p.pool.base;
  while (cand + step <= end) {
    const c = { base: cand, prefix: p.maskLength };
    const hit = sorted.find((t) => overlaps(t, c));
    if (!hit) return c;
    // past the taken subnet, aligned to the pool's step
    const past = Math.max(cand + step, hit.base + sizeOf(hit.prefix));
    cand = Math.ceil((past - p.pool.base) / step) * step + p.pool.base;
  }
  return undefined;
}

/** The lowest free VXLAN id from FIRST_VNI. */
export function nextVni(taken: Iterable<number>): number | undefined {
  const set = new Set(taken);
  for (let v = FIRST_VNI; v <= MAX_VNI; v++) if (!set.has(v)) return v;
  return undefined;
}

/** The network whose allocated subnet overlaps c, if any. */
export function overlapping(c: Cidr, networks: Iterable<Network>, exceptId = ''): Network | undefined {
  for (const n of networks) {
    if (n.id === exceptId) continue;
    const s = n.allocation?.subnet ? parseCidr(n.allocation.subnet) : undefined;
    if (s && overlaps(s, c)) return n;
  }
  return undefined;
}

/**
 * The addresses of one network as a bitmap over its host range. The gateway is taken at creation.
 * Allocation goes round from the last address handed out (not the lowest free), so that a freed
 * address is not given again at once while caches elsewhere may still point at it.
 */
export class AddressSet {
  readonly subnet: Cidr;
  private readonly first: number;
  private readonly size: number;
  private readonly bits: Uint8Array;
  private used = 0;
  private cursor = 0;

  constructor(subnet: string, gateway: string) {
    const c = parseCidr(subnet);
    if (!c) throw new Error(`bad subnet ${subnet}`);
    this.subnet = c;
    const r = hostRange(c);
    this.first = r.first;
    this.size = r.last - r.first + 1;
    this.bits = new Uint8Array(this.size);
    const gw = ipToNum(gateway);
    if (gw !== undefined) this.take(gw);
    this.cursor = gw !== undefined ? gw - this.first : 0;
  }

  /** Marks an address (number or "A.B.C.D[/N]") in use; false if outside or already taken. */
  take(ip: number | string): boolean {
    const n = typeof ip === 'number' ? ip : ipToNum(ip.split('/')[0]!);
    if (n === undefined) return false;
    const i = n - this.first;
    if (i < 0 || i >= this.size || this.bits[i]) return false;
    this.bits[i] = 1;
    this.used++;
    return true;
  }

  release(ip: string): void {
    const n = ipToNum(ip.split('/')[0]!);
    if (n === undefined) return;
    const i = n - this.first;
    if (i < 0 || i >= this.size || !this.bits[i]) return;
    this.bits[i] = 0;
    this.used--;
  }

  /** The next free address as CIDR ("10.0.1.5/24"), or undefined when the network is full. */
  allocate(): string | undefined {
    if (this.used >= this.size) return undefined;
    for (let k = 1; k <= this.size; k++) {
      const i = (this.cursor + k) % this.size;
      if (!this.bits[i]) {
        this.bits[i] = 1;
        this.used++;
        this.cursor = i;
        return `${numToIp(this.first + i)}/${this.subnet.prefix}`;
      }
    }
    return undefined;
  }

  inUse(): number {
    return this.used;
  }

  /** The last address handed out (or the start point): allocation goes on after it. */
  get last(): number {
    return this.first + this.cursor;
  }

  /** Goes on after address n (a number from `last`, or the highest in use): ignored outside the range. */
  continueAfter(n: number): void {
    const i = n - this.first;
    if (i >= 0 && i < this.size) this.cursor = i;
  }

  /** The highest address in use (the gateway included), or undefined. */
  highestInUse(): number | undefined {
    for (let i = this.size - 1; i >= 0; i--) if (this.bits[i]) return this.first + i;
    return undefined;
  }

  capacity(): number {
    return this.size;
  }
}
