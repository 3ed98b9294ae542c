/**
 * The published-port flags of `service create|update` (Docker's): -p/--publish (repeatable) in the
 * long form `published=8080,target=80[,protocol=tcp|udp][,mode=ingress|host][,traffic-policy=cluster|local]`
 * or the short form `8080:80[/udp]` (`80` alone: target only, the published port is allocated), and
 * on update --publish-add (same forms) and --publish-rm (`8080` or `8080/udp`: by published port).
 */
import { type EndpointSpec, EndpointMode, type PortConfig, PortProtocol, PublishMode, type ServiceSpec } from '../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../common/errors.js';
import { portKey } from '../manager/allocator/ports.js';

export interface PortFlags {
  publish?: string[];
  publishAdd?: string[];
  publishRm?: string[];
}

function port(flag: string, what: string, v: string, raw: string): number {
  if (!/^\d{1,5}$/.test(v)) throw invalidArgument(flag, raw, `${what} port ${JSON.stringify(v)} is not a number`);
  const n = Number(v);
  if (n < 1 || n > 65535) throw invalidArgument(flag, raw, `${what} port ${n} is out of range (1-65535)`);
  return n;
}

function protocol(flag: string, v: string, raw: string): PortProtocol {
  if (v === 'tcp') return PortProtocol.PORT_PROTOCOL_TCP;
  if (v === 'udp') return PortProtocol.PORT_PROTOCOL_UDP;
  throw invalidArgument(flag, raw, `protocol ${JSON.stringify(v)} must be tcp or udp`);
}

/** One -p value. */
export function parsePublish(flag: string, raw: string): PortConfig {
  const v = raw.trim();
  const p: PortConfig = { name: '', protocol: PortProtocol.PORT_PROTOCOL_TCP, targetPort: 0, publishedPort: 0, publishMode: PublishMode.PUBLISH_MODE_INGRESS, localOnly: false };
  if (!v) throw invalidArgument(flag, raw, 'empty');
  if (v.includes('=')) {
    for (const part of v.split(',')) {
      const i = part.indexOf('=');
      if (i < 0) throw invalidArgument(flag, raw, `expected KEY=VALUE, got ${JSON.stringify(part)}`);
      const k = part.slice(0, i).trim();
      const val = part.slice(i + 1).trim();
      switch (k) {
        case 'published':
          p.publishedPort = port(flag, 'published', val, raw);
          break;
        case 'target':
          p.targetPort = port(flag, 'target', val, raw);
          break;
        case 'protocol':
          p.protocol = protocol(flag, val, raw);
          break;
        case 'mode':
          if (val === 'ingress') p.publishMode = PublishMode.PUBLISH_MODE_INGRESS;
          else if (val === 'host') p.publishMode = PublishMode.PUBLISH_MODE_HOST;
          else throw invalidArgument(flag, raw, `mode ${JSON.stringify(val)} must be ingress or host`);
          break;
        case 'traffic-policy':
          if (val === 'local') p.localOnly = true;
          else if (val !== 'cluster') throw invalidArgument(flag, raw, `traffic-policy ${JSON.stringify(val)} must be cluster or local`);
          break;
        default:
          throw invalidArgument(flag, raw, `unknown key ${JSON.stringify(k)} (expected published, target, protocol, mode, traffic-policy)`);
      }
    }
    if (!p.targetPort) throw invalidArgument(flag, raw, 'missing target=PORT');
  } else {
    const m = /^(?:([^:/]*):)?([^:/]*)(?:\/(.*))?$/.exec(v);
    if (!m) throw invalidArgument(flag, raw, 'expected PUBLISHED:TARGET[/PROTOCOL], TARGET or published=P,target=T,...');
    if (m[1] !== undefined) p.publishedPort = port(flag, 'published', m[1], raw);
    p.targetPort = port(flag, 'target', m[2] ?? '', raw);
    if (m[3] !== undefined) p.protocol = protocol(flag, m[3], raw);
  }
  if (p.localOnly && p.publishMode === PublishMode.PUBLISH_MODE_HOST)
    throw invalidArgument(flag, raw, 'traffic-policy=local applies to mode=ingress (a host-mode port always reaches the local task)');
  return p;
}

function endpointOf(spec: ServiceSpec): EndpointSpec {
  return (spec.endpoint ??= { mode: EndpointMode.ENDPOINT_MODE_VIP, ports: [] });
}

function addPorts(flag: string, ep: EndpointSpec, values: string[]): void {
  for (const v of values) {
    const p = parsePublish(flag, v);
    if (p.publishedPort && ep.ports.some((q) => q.publishedPort === p.publishedPort && q.protocol === p.protocol))
      throw invalidArgument(flag, v, `published port ${portKey(p.publishedPort, p.protocol)} given twice`);
    ep.ports.push(p);
  }
}

export function applyCreatePortFlags(spec: ServiceSpec, f: PortFlags): void {
  if (!f.publish?.length) return;
  addPorts('--publish', endpointOf(spec), f.publish);
}

/**
 * Update: --publish replaces the ports; --publish-rm (by published port, `8080` or `8080/udp`,
 * matched against the ports the service was given, `allocated`) then --publish-add.
 */
export function applyUpdatePortFlags(spec: ServiceSpec, f: PortFlags, allocated: PortConfig[] = []): void {
  if (!f.publish?.length && !f.publishAdd?.length && !f.publishRm?.length) return;
  const ep = endpointOf(spec);
  if (f.publish?.length) {
    if (f.publishAdd?.length || f.publishRm?.length) throw invalidArgument('--publish', f.publish[0], 'cannot be combined with --publish-add/--publish-rm');
    ep.ports = [];
    addPorts('--publish', ep, f.publish);
    return;
  }
  for (const raw of f.publishRm ?? []) {
    const m = /^(\d{1,5})(?:\/(tcp|udp))?$/.exec(raw.trim());
    if (!m) throw invalidArgument('--publish-rm', raw, 'expected PUBLISHED[/PROTOCOL], e.g. 8080 or 8080/udp');
    const num = Number(m[1]);
    const proto = m[2] === 'udp' ? PortProtocol.PORT_PROTOCOL_UDP : m[2] === 'tcp' ? PortProtocol.PORT_PROTOCOL_TCP : undefined;
    const match = (p: PortConfig, published: number): boolean => published === num && (proto === undefined || p.protocol === proto);
    const before = ep.ports.length;
    // a port given as 0 in the spec is found through the port it was allocated
    ep.ports = ep.ports.filter((p) => {
      if (match(p, p.publishedPort)) return false;
      if (p.publishedPort === 0 && allocated.some((a) => match(a, a.publishedPort) && a.targetPort === p.targetPort && a.protocol === p.protocol)) return false;
      return true;
    });
    if (ep.ports.length === before) throw invalidArgument('--publish-rm', raw, 'the service does not publish this port');
  }
  addPorts('--publish-add', ep, f.publishAdd ?? []);
}
