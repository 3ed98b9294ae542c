/**
 * Networks as the manager sees them: spec validation, the allocation a network gets when it is
 * created (subnet, gateway, VXLAN id, MTU; in the same store transaction as its creation, so that an
 * overlap is refused to the caller), and what tasks and services hold on networks.
 */
import { type Cluster, type Network, type NetworkAllocation, type NetworkSpec, type Service, type Task, TaskState, EndpointMode } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError, invalidArgument } from '../../common/errors.js';
import { isValidName } from '../../common/ids.js';
import {
  checkGateway,
  checkPool,
  checkSubnet,
  DEFAULT_ADDR_POOL,
  DEFAULT_POOL_MASK_LENGTH,
  formatCidr,
  hostRange,
  nextPoolSubnet,
  nextVni,
  numToIp,
  overlapping,
  parseCidr,
  parseMtu,
  type Cidr,
} from './ipam.js';

/** Names that mean a network mode, not a network (`--network host`, `--network none`). */
export const RESERVED_NETWORK_NAMES = new Set(['host', 'none', 'bridge', 'default']);
export const KNOWN_DRIVER_OPTS = ['mtu'];
const MAX_LABEL_BYTES = 16 * 1024;

/** Validates a user's network spec and fills defaults (driver overlay). */
export function validateNetworkSpec(spec: NetworkSpec | undefined): NetworkSpec {
  if (!spec) throw invalidArgument('spec', null, 'required');
  if (!isValidName(spec.name)) throw invalidArgument('name', spec.name, 'must be 1-63 characters: letters, digits, "_", "." and "-", starting with a letter or digit');
  if (RESERVED_NETWORK_NAMES.has(spec.name)) throw invalidArgument('name', spec.name, 'is reserved (--network host and --network none are network modes)');
  const driver = spec.driver || 'overlay';
  if (driver !== 'overlay') throw invalidArgument('--driver', spec.driver, 'only overlay is supported');
  if (spec.ingress) throw invalidArgument('--ingress', true, 'ingress networks (the routing mesh) are not supported');
  for (const k of Object.keys(spec.driverOpts)) if (!KNOWN_DRIVER_OPTS.includes(k)) throw invalidArgument('--opt', k, `unknown option (known: ${KNOWN_DRIVER_OPTS.join(', ')})`);
  parseMtu(spec.driverOpts.mtu);
  let bytes = 0;
  for (const [k, v] of Object.entries(spec.labels)) {
    if (!k || /\s/.test(k)) throw invalidArgument('--label', k, 'invalid key');
    bytes += Buffer.byteLength(k) + Buffer.byteLength(v) + 2;
  }
  if (bytes > MAX_LABEL_BYTES) throw invalidArgument('--label', `${bytes} bytes`, `labels may hold at most ${MAX_LABEL_BYTES} bytes`);
  const ipam = spec.ipam ?? { subnet: '', gateway: '' };
  if (ipam.gateway && !ipam.subnet) throw invalidArgument('--gateway', ipam.gateway, 'needs --subnet');
  if (ipam.subnet) {
    const c = checkSubnet('--subnet', ipam.subnet);
    if (ipam.gateway) checkGateway('--gateway', ipam.gateway, c);
  }
  return { ...spec, driver, ipam: { subnet: ipam.subnet, gateway: ipam.gateway } };
}

/** The cluster's default pool (ClusterSpec, set at cluster creation), checked. */
export function clusterPool(cluster: Cluster | undefined): { pool: Cidr; maskLength: number } {
  const pool = cluster?.spec?.defaultAddrPool || DEFAULT_ADDR_POOL;
  const mask = cluster?.spec?.defaultAddrPoolMaskLength || DEFAULT_POOL_MASK_LENGTH;
  return checkPool(pool, mask);
}

/**
 * The allocation of a new network given every other network: the user's subnet (refused when it
 * overlaps another network's, naming it) or the pool's first free one; the first host address as
 * the gateway unless given; the lowest free VNI from 4096; the mtu option (0: decided per node).
 */
export function allocateNetwork(spec: NetworkSpec, others: Network[], cluster: Cluster | undefined): NetworkAllocation {
  let subnet: Cidr;
  if (spec.ipam?.subnet) {
    subnet = checkSubnet('--subnet', spec.ipam.subnet);
    const hit = overlapping(subnet, others);
    if (hit)
      throw new FlotillaError(
        'FAILED_PRECONDITION',
        `subnet ${spec.ipam.subnet} overlaps subnet ${hit.allocation?.subnet} of network ${hit.spec?.name ?? hit.id}`,
      );
  } else {
    const pool = clusterPool(cluster);
    const taken = others.map((n) => (n.allocation?.subnet ? parseCidr(n.allocation.subnet) : undefined)).filter((c): c is Cidr => !!c);
    const c = nextPoolSubnet(pool, taken);
    if (!c) throw new FlotillaError('RESOURCE_EXHAUSTED', `the default address pool ${formatCidr(pool.pool)} has no free /${pool.maskLength} subnet left`);
    subnet = c;
  }
  const gateway = spec.ipam?.gateway || numToIp(hostRange(subnet).first);
  const vni = nextVni(others.map((n) => n.allocation?.vni ?? 0));
  if (vni === undefined) throw new FlotillaError('RESOURCE_EXHAUSTED', 'no free VXLAN id left');
  return { subnet: formatCidr(subnet), gateway, vni, mtu: parseMtu(spec.driverOpts.mtu), nodeAddresses: {} };
}

/** Network ids a task's spec attaches it to (targets are ids once the control API resolved them). */
export function taskNetworkIds(t: Task): string[] {
  return (t.spec?.networks ?? []).map((n) => n.target);
}

/** Whether the task has an address on every network its spec names. */
export function networksAllocated(t: Task): boolean {
  const want = t.spec?.networks ?? [];
  if (want.length === 0) return true;
  return want.every((w) => t.networks.some((a) => a.networkId === w.target && a.addresses.length > 0));
}

/** Whether a task's addresses are held: until it reaches a terminal state (stopped, failed...). */
export function holdsAddresses(t: Task): boolean {
  return t.networks.length > 0 && (t.status?.state ?? TaskState.TASK_STATE_NEW) < TaskState.TASK_STATE_COMPLETE;
}

export function serviceNetworkIds(s: Service): string[] {
  return (s.spec?.task?.networks ?? []).map((n) => n.target);
}

export function usesVip(s: Service): boolean {
  return (s.spec?.endpoint?.mode ?? EndpointMode.ENDPOINT_MODE_VIP) === EndpointMode.ENDPOINT_MODE_VIP;
}

/** The reason a task waits for its network addresses, shown in `service ps`. */
export function exhaustedReason(n: Network, inUse: number): string {
  const prefix = n.allocation?.subnet.split('/')[1] ?? '?';
  return `network ${n.spec?.name ?? n.id} has no free address (subnet /${prefix}, ${inUse} in use)`;
}

export const WAITING_FOR_NETWORK = 'waiting for network addresses';
