/**
 * The ingress network (docs/networking.md, "Published ports"): the overlay the routing mesh carries
 * published connections over. The manager creates it the first time a service publishes a port
 * (like Swarm's `ingress`: 10.255.0.0/16 unless that overlaps another network, then a subnet of the
 * default pool) and attaches every task of a service that publishes ports to it, last (after the
 * user's networks, so their interfaces keep their names). The attachment lives in the service's task
 * spec, so publishing the first port or removing the last one rolls the tasks (they gain or lose the
 * interface); the user never names it (--network ingress is ignored and recomputed).
 */
import { FlotillaError } from '../../common/errors.js';
import { newId } from '../../common/ids.js';
import type { Network, NetworkSpec, ServiceSpec } from '../../gen/flotilla/v1/objects.js';
import { allocateNetwork } from '../allocator/networks.js';
import { publishesPorts } from '../allocator/ports.js';
import type { MemoryStore } from '../store/store.js';

export const INGRESS_NAME = 'ingress';
export const INGRESS_SUBNET = '10.255.0.0/16';

export function ingressNetwork(store: MemoryStore): Network | undefined {
  for (const n of store.networks.values()) if (n.spec?.ingress) return n;
  return undefined;
}

/** The ingress network, created when missing. */
export async function ensureIngressNetwork(store: MemoryStore): Promise<Network> {
  const have = ingressNetwork(store);
  if (have) return have;
  const id = newId();
  await store.update((tx) => {
    if (ingressNetwork(store)) return;
    const others = [...store.networks.values()];
    const name = others.some((n) => n.spec?.name === INGRESS_NAME) ? `flotilla-${INGRESS_NAME}` : INGRESS_NAME;
    const spec: NetworkSpec = { name, labels: {}, driver: 'overlay', ipam: { subnet: INGRESS_SUBNET, gateway: '' }, driverOpts: {}, ingress: true, internal: false, attachable: false };
    let allocation;
    try {
      allocation = allocateNetwork(spec, others, store.getCluster());
    } catch (err) {
      if (!(err instanceof FlotillaError) || err.code !== 'FAILED_PRECONDITION') throw err;
      // 10.255.0.0/16 is taken by a user's network: a subnet of the default pool instead
      spec.ipam = { subnet: '', gateway: '' };
      allocation = allocateNetwork(spec, others, store.getCluster());
    }
    tx.create('network', { id, meta: undefined, spec, allocation });
  });
  const n = ingressNetwork(store);
  if (!n) throw new FlotillaError('INTERNAL', 'the ingress network could not be created');
  return n;
}

/** Removes any attachment to the ingress network (by id or by its name) from the spec. */
export function stripIngress(store: MemoryStore, spec: ServiceSpec): void {
  const ing = ingressNetwork(store);
  const task = spec.task;
  if (!task) return;
  task.networks = task.networks.filter((a) => !(ing && (a.target === ing.id || a.target === ing.spec?.name)) && a.target !== INGRESS_NAME);
}

/**
 * Makes the spec's attachment to the ingress network follow its published ports (the spec's networks
 * already resolved to ids). Creates the network when the first port is published.
 */
export async function followIngress(store: MemoryStore, spec: ServiceSpec, dryRun = false): Promise<void> {
  const task = spec.task;
  if (!task || !publishesPorts(spec.endpoint)) return;
  if (task.container?.networkMode) throw new FlotillaError('INVALID_ARGUMENT', `invalid publish: published ports need the task's own network namespace, not --network ${task.container.networkMode}`);
  // a dry run creates nothing (the attachment is shown when the network exists already)
  const ing = dryRun ? ingressNetwork(store) : await ensureIngressNetwork(store);
  if (!ing) return;
  task.networks.push({ target: ing.id, aliases: [] });
}
