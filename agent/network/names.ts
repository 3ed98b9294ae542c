/**
 * Pure helpers of the node data plane: device names, the deterministic MAC of a task address, CIDR
 * parsing, the overlay MTU. No I/O here.
 */
import { FlotillaError } from '../../common/errors.js';

/** VXLAN's encapsulation: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) bytes. */
export const VXLAN_OVERHEAD = 50;
export const VXLAN_PORT = 4789;
/** every device the data plane makes starts with this (and nothing else on a node does) */
export const DEVICE_PREFIX = 'fl-';

/** The bridge of the network with this VXLAN id: `fl-br-<vni>` (at most 14 characters, under IFNAMSIZ). */
export function bridgeName(vni: number): string {
  return `${DEVICE_PREFIX}br-${vni}`;
}

/** The VXLAN device of the network with this VXLAN id: `fl-vx-<vni>`. */
export function vxlanName(vni: number): string {
  return `${DEVICE_PREFIX}vx-${vni}`;
}

/** The VXLAN id a device name of ours carries, or undefined. */
export function vniOf(device: string): { kind: 'br' | 'vx'; vni: number } | undefined {
  const m = /^fl-(br|vx)-(\d{1,8})$/.exec(device);
  return m ? { kind: m[1] as 'br' | 'vx', vni: Number(m[2]) } : undefined;
}

export interface Cidr {
  /** the address, e.g. 10.0.1.5 */
  ip: string;
  prefix: number;
  /** the four bytes */
  bytes: [number, number, number, number];
}

/** Parses an IPv4 address with a prefix length ("10.0.1.5/24"); `field` names it in the error. */
export function parseCidr(s: string, field = 'address'): Cidr {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(s.trim());
  const bytes = m ? [Number(m[1]), Number(m[2]), Number(m[3]), Number(m[4])] : [];
  const prefix = m ? Number(m[5]) : -1;
  if (!m || bytes.some((b) => b > 255) || prefix > 32 || prefix < 1) {
    throw new FlotillaError('INVALID_ARGUMENT', `invalid ${field} ${JSON.stringify(s)}: expected an IPv4 address with a prefix length, e.g. 10.0.1.5/24`);
  }
  return { ip: bytes.join('.'), prefix, bytes: bytes as Cidr['bytes'] };
}

/** The IPv4 host of an address that may carry a port ("198.18.0.11:4242" -> "198.18.0.11"). */
export function hostOfAddr(addr: string): string {
  return addr.trim().replace(/:\d+$/, '');
}

/** Parses a plain IPv4 address. */
export function parseIp(s: string, field = 'address'): string {
  return parseCidr(`${s.trim()}/32`, field).ip;
}

/**
 * The MAC address of the interface holding this IPv4 address on an overlay: 02:42 (locally
 * administered, unicast) then the four address bytes. Every node computes it from the address the
 * manager sent, so a node programs the forwarding entries of remote tasks without asking anyone.
 */
export function macOf(ip: string): string {
  const c = parseCidr(ip.includes('/') ? ip : `${ip}/32`);
  return ['02', '42', ...c.bytes.map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

/**
 * The MAC of a network's bridge on a node: 0a (locally administered, unicast; never 02:42 as tasks'),
 * the VXLAN id's low byte, the node's underlay IPv4 bytes. Fixed, so adding ports never changes it.
 */
export function bridgeMac(nodeIp: string, vni: number): string {
  const c = parseCidr(`${nodeIp}/32`, 'node address');
  return ['0a', vni & 0xff, ...c.bytes].map((b) => (typeof b === 'number' ? b.toString(16).padStart(2, '0') : b)).join(':');
}

/** The MTU of a network's VXLAN device and container interfaces: the network's own, else underlay − 50. */
export function overlayMtu(networkMtu: number | undefined, underlayMtu: number): number {
  if (networkMtu && networkMtu > 0) return networkMtu;
  return Math.max(576, underlayMtu - VXLAN_OVERHEAD);
}
