/**
 * The control API's network calls (create, get, list, remove) and the resolution of the networks a
 * service spec names (names or ids) to network ids, done on the manager so that tasks carry ids.
 */
import { EndpointMode, Network, ServiceSpec, TaskState } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError, invalidArgument, notFound } from '../../common/errors.js';
import { newId, isValidName } from '../../common/ids.js';
import type { MemoryStore } from '../store/store.js';
import { allocateNetwork, serviceNetworkIds, validateNetworkSpec } from '../allocator/networks.js';
import type { NetworkSpec } from '../../gen/flotilla/v1/objects.js';
import { validatePorts } from '../allocator/ports.js';

export function networkByName(store: MemoryStore, name: string): Network | undefined {
  for (const n of store.networks.values()) if (n.spec?.name === name) return n;
  return undefined;
}

/** A network by id, name or unique id prefix; undefined when none. */
export function findNetwork(store: MemoryStore, ref: string): Network | undefined {
  if (!ref) return undefined;
  const byId = store.networks.get(ref);
  if (byId) return byId;
  const byName = networkByName(store, ref);
  if (byName) return byName;
  const matches = [...store.networks.values()].filter((n) => n.id.startsWith(ref));
  if (matches.length > 1) throw new FlotillaError('FAILED_PRECONDITION', `network ${JSON.stringify(ref)} is ambiguous (${matches.length} matches)`);
  return matches[0];
}

export function resolveNetwork(store: MemoryStore, ref: string): Network {
  if (!ref) throw invalidArgument('network', ref, 'required');
  const n = findNetwork(store, ref);
  if (!n) throw notFound('network', ref);
  return n;
}

/**
 * Checks the networks and endpoint of a (validated) service spec and rewrites each network target to
 * the network's id. Unknown network: INVALID_ARGUMENT naming it.
 */
export function resolveServiceNetworks(store: MemoryStore, spec: ServiceSpec): ServiceSpec {
  const task = spec.task;
  if (!task) return spec;
  const attachments = task.networks ?? [];
  if (attachments.length > 0 && task.container?.networkMode)
    throw invalidArgument('network', task.container.networkMode, `--network ${task.container.networkMode} cannot be combined with overlay networks`);
  const seen = new Set<string>();
  task.networks = attachments.map((a) => {
    const n = findNetwork(store, a.target);
    if (!n) throw invalidArgument('network', a.target, 'no such network');
    if (seen.has(n.id)) throw invalidArgument('network', a.target, 'given twice');
    seen.add(n.id);
    for (const al of a.aliases) if (!isValidName(al)) throw invalidArgument('network alias', al, 'must be a valid DNS name');
    return { target: n.id, aliases: a.aliases };
  });
  const ep = spec.endpoint;
  if (ep) {
    if (ep.mode !== EndpointMode.ENDPOINT_MODE_VIP && ep.mode !== EndpointMode.ENDPOINT_MODE_DNSRR)
      throw invalidArgument('endpoint-mode', ep.mode, 'must be vip or dnsrr');
    validatePorts(ep);
  }
  return spec;
}

export async function createNetwork(store: MemoryStore, given: NetworkSpec | undefined): Promise<Network> {
  const spec = validateNetworkSpec(given);
  const id = newId();
  await store.update((tx) => {
    const others = [...store.networks.values()];
    if (others.some((n) => n.spec?.name === spec.name)) throw new FlotillaError('ALREADY_EXISTS', `network ${JSON.stringify(spec.name)} already exists`);
    const allocation = allocateNetwork(spec, others, store.getCluster());
    tx.create('network', { id, meta: undefined, spec, allocation });
  });
  return store.networks.get(id)!;
}

/** Refused while a service uses the network, naming the service(s). */
export async function removeNetwork(store: MemoryStore, ref: string): Promise<void> {
  const n = resolveNetwork(store, ref);
  const users = store
    .listServices()
    .filter((s) => serviceNetworkIds(s).includes(n.id))
    .map((s) => s.spec?.name ?? s.id);
  if (users.length > 0)
    throw new FlotillaError(
      'FAILED_PRECONDITION',
      `network ${n.spec?.name} is in use by service${users.length > 1 ? 's' : ''} ${users.sort().join(', ')}: remove ${users.length > 1 ? 'them' : 'it'} or update ${users.length > 1 ? 'them' : 'it'} with --network-rm ${n.spec?.name} first`,
    );
  // tasks of removed services that still hold an address on it (stopping): the data plane needs the
  // network until they are gone
  const holders = store.listTasks().filter((t) => (t.status?.state ?? 0) < TaskState.TASK_STATE_COMPLETE && t.networks.some((a) => a.networkId === n.id));
  if (holders.length > 0)
    throw new FlotillaError('FAILED_PRECONDITION', `network ${n.spec?.name} still has ${holders.length} task(s) attached that are stopping: retry shortly`);
  await store.update((tx) => {
    // checked again against the state this write applies to (a service created meanwhile)
    const late = store.listServices().find((s) => serviceNetworkIds(s).includes(n.id));
    if (late) throw new FlotillaError('FAILED_PRECONDITION', `network ${n.spec?.name} is in use by service ${late.spec?.name}`);
    tx.delete('network', n.id);
  });
}

/** Inside a service write: every network the spec names still exists (a removal raced the call). */
export function requireNetworks(get: (id: string) => Network | undefined, spec: ServiceSpec): void {
  for (const a of spec.task?.networks ?? []) if (!get(a.target)) throw invalidArgument('network', a.target, 'no such network (removed meanwhile)');
}
