/**
 * Published ports (docs/networking.md, "Published ports"): validation of a service's EndpointSpec
 * ports, the allocation of the published ports a spec leaves out (0) from PUBLISHED_PORT_RANGE, and
 * the refusal of a published port another service holds.
 *
 * The allocation runs on the manager inside the store transaction that writes the service (control
 * API), so two services can never be given the same port, and it is persisted with the service
 * (Service.endpoint.ports), like a network's allocation. A port is free again when its service is
 * removed or the port leaves the spec (--publish-rm): the allocated set is always recomputed from the
 * services in the store, nothing is kept elsewhere.
 *
 * Rules: an ingress port is bound on every node, so its published port (per protocol) belongs to one
 * service cluster-wide; a host-mode port is bound only on the nodes running a task, so several
 * services may publish the same host-mode port (the scheduler keeps them on different nodes), but not
 * one that an ingress port uses.
 */
import { type EndpointSpec, type PortConfig, PortProtocol, PublishMode, type Service } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError, invalidArgument } from '../../common/errors.js';

export const PUBLISHED_PORT_MIN = 30000;
export const PUBLISHED_PORT_MAX = 32767;
export const MAX_PORTS = 100;

export function protocolName(p: PortProtocol): string {
  return p === PortProtocol.PORT_PROTOCOL_UDP ? 'udp' : 'tcp';
}

export function portKey(published: number, p: PortProtocol): string {
  return `${published}/${protocolName(p)}`;
}

/** Checks the ports of an endpoint spec (the user's, before allocation). Errors name the field and value. */
export function validatePorts(ep: EndpointSpec | undefined): void {
  const ports = ep?.ports ?? [];
  if (ports.length > MAX_PORTS) throw invalidArgument('publish', `${ports.length} ports`, `at most ${MAX_PORTS} ports may be published`);
  const seen = new Set<string>();
  for (const p of ports) {
    if (!Number.isInteger(p.targetPort) || p.targetPort < 1 || p.targetPort > 65535) throw invalidArgument('publish target', p.targetPort, 'must be a port between 1 and 65535');
    if (!Number.isInteger(p.publishedPort) || p.publishedPort < 0 || p.publishedPort > 65535)
      throw invalidArgument('publish published', p.publishedPort, 'must be a port between 1 and 65535 (or omitted: allocated)');
    if (p.protocol !== PortProtocol.PORT_PROTOCOL_TCP && p.protocol !== PortProtocol.PORT_PROTOCOL_UDP) throw invalidArgument('publish protocol', p.protocol, 'must be tcp or udp');
    if (p.publishMode !== PublishMode.PUBLISH_MODE_INGRESS && p.publishMode !== PublishMode.PUBLISH_MODE_HOST) throw invalidArgument('publish mode', p.publishMode, 'must be ingress or host');
    if (p.localOnly && p.publishMode !== PublishMode.PUBLISH_MODE_INGRESS)
      throw invalidArgument('publish traffic-policy', 'local', 'applies to mode=ingress only (a host-mode port always reaches the local task)');
    if (p.publishedPort === 0) continue;
    const k = portKey(p.publishedPort, p.protocol);
    if (seen.has(k)) throw invalidArgument('publish', k, 'published port given twice');
    seen.add(k);
  }
}

/** The ports a service holds now (allocated), from the store. */
function heldPorts(s: Service): PortConfig[] {
  return s.endpoint?.ports ?? [];
}

/**
 * The service's ports with every published port set: the spec's own, or for a 0 the port this
 * service was given before for the same target and protocol, or the lowest free one of the range.
 * Refuses (FAILED_PRECONDITION naming the other service) a port another service holds.
 */
export function allocatePorts(serviceId: string, ep: EndpointSpec | undefined, previous: PortConfig[], others: Service[]): PortConfig[] {
  const wanted = ep?.ports ?? [];
  if (wanted.length === 0) return [];
  // port/proto -> [service name, mode] of the other services
  const taken = new Map<string, { name: string; mode: PublishMode }>();
  for (const s of others) {
    if (s.id === serviceId) continue;
    for (const p of heldPorts(s)) if (p.publishedPort) taken.set(portKey(p.publishedPort, p.protocol), { name: s.spec?.name ?? s.id, mode: p.publishMode });
  }
  const out: PortConfig[] = [];
  const mine = new Set<string>();
  for (const p of wanted) {
    if (!p.publishedPort) continue;
    const k = portKey(p.publishedPort, p.protocol);
    const other = taken.get(k);
    // two host-mode ports may share a number (different nodes); anything with an ingress port may not
    if (other && (other.mode === PublishMode.PUBLISH_MODE_INGRESS || p.publishMode === PublishMode.PUBLISH_MODE_INGRESS))
      throw new FlotillaError('FAILED_PRECONDITION', `published port ${k} is already used by service ${other.name}`);
    mine.add(k);
  }
  for (const p of wanted) {
    if (p.publishedPort) {
      out.push({ ...p });
      continue;
    }
    const again = previous.find(
      (q) => q.targetPort === p.targetPort && q.protocol === p.protocol && q.publishedPort >= PUBLISHED_PORT_MIN && q.publishedPort <= PUBLISHED_PORT_MAX,
    );
    let port = 0;
    if (again && !taken.has(portKey(again.publishedPort, p.protocol)) && !mine.has(portKey(again.publishedPort, p.protocol))) port = again.publishedPort;
    for (let x = PUBLISHED_PORT_MIN; !port && x <= PUBLISHED_PORT_MAX; x++) {
      const k = portKey(x, p.protocol);
      if (!taken.has(k) && !mine.has(k)) port = x;
    }
    if (!port) throw new FlotillaError('RESOURCE_EXHAUSTED', `no free published port left in ${PUBLISHED_PORT_MIN}-${PUBLISHED_PORT_MAX} (${protocolName(p.protocol)})`);
    mine.add(portKey(port, p.protocol));
    out.push({ ...p, publishedPort: port });
  }
  return out;
}

/** Whether a service publishes ports (its tasks then join the ingress network). */
export function publishesPorts(ep: EndpointSpec | undefined): boolean {
  return (ep?.ports.length ?? 0) > 0;
}

/** The host-mode ports of a service as "PORT/PROTO" keys (the scheduler's port filter). */
export function hostPortKeys(s: Service | undefined): string[] {
  return (s?.endpoint?.ports ?? []).filter((p) => p.publishMode === PublishMode.PUBLISH_MODE_HOST && p.publishedPort).map((p) => portKey(p.publishedPort, p.protocol));
}

/** Docker's PORTS column: `*:8080->80/tcp`, host mode `*:8080->80/tcp (host)`. */
export function formatPorts(ports: PortConfig[]): string {
  return ports
    .map((p) => {
      let s = `*:${p.publishedPort || '?'}->${p.targetPort}/${protocolName(p.protocol)}`;
      if (p.publishMode === PublishMode.PUBLISH_MODE_HOST) s += ' (host)';
      else if (p.localOnly) s += ' (local)';
      return s;
    })
    .join(', ');
}
