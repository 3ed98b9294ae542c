/**
 * Published ports on a node (docs/networking.md, "Published ports"): one nftables table
 * `ip flotilla-ports` in the node's network namespace, rendered whole from the ingress network's view
 * and replaced in one `nft -f` transaction (as the VIP tables are: agent/network/vip.ts).
 *
 *   map ports { inet_proto . inet_service : verdict }   tcp . 8080 -> goto port_N
 *   chain prerouting (nat, dstnat)   connections from outside to any local address of the node
 *   chain output (nat, -100)         connections made on the node itself (localhost included)
 *   chain port_N                     dnat to numgen random mod K map { 0 : TASK, ... } : TARGET
 *   chain postrouting (nat, srcnat)  snat to the node's ingress address for backends on other nodes
 *                                    (and for connections from 127.0.0.0/8, which cannot leave the node)
 *
 * Backends per port: ingress mode, traffic-policy cluster: every ready task of the service on any node
 * (their ingress addresses; a remote one is reached over the ingress overlay, SNAT'ed so that its reply
 * comes back through this node); ingress mode, traffic-policy local: the ready tasks on this node only,
 * no SNAT; host mode: the ready tasks on this node only, no SNAT, and no rule at all on a node without
 * one. A port with no backend has no rule here (the node answers with a reset / ICMP unreachable, as
 * for any closed port). Only the kernel touches packets: conntrack keeps each connection on its backend.
 */
import type { NetworkPeer, NetworkView } from '../../gen/flotilla/v1/dispatcher.js';
import { PortProtocol, PublishMode } from '../../gen/flotilla/v1/objects.js';
import { ipOf } from './resolver.js';

export const PORTS_TABLE = 'flotilla-ports';

export interface PortRule {
  protocol: 'tcp' | 'udp';
  published: number;
  target: number;
  backends: string[];
  /** true: only tasks on this node, never SNAT'ed (traffic-policy local, host mode) */
  local: boolean;
}

/** Whether the view publishes any port (the node then keeps the ingress devices and table). */
export function publishesAny(view: NetworkView | undefined): boolean {
  return !!view?.endpoints.some((e) => e.ports.some((p) => p.publishedPort > 0));
}

/**
 * The port rules of this node from the ingress view; `isLocal` tells the peers on this node;
 * `canSnat` false (no ingress address for this node yet) keeps every port to the local tasks.
 */
export function portRules(view: NetworkView, isLocal: (p: NetworkPeer) => boolean, canSnat = true): { rules: PortRule[]; remote: string[] } {
  const rules: PortRule[] = [];
  const remote = new Set<string>();
  for (const ep of view.endpoints) {
    const peers = view.peers.filter((p) => !p.nodeAddress && p.serviceId === ep.serviceId && p.ready && p.address);
    for (const port of ep.ports) {
      if (!port.publishedPort || !port.targetPort) continue;
      const host = port.publishMode === PublishMode.PUBLISH_MODE_HOST;
      const local = host || port.localOnly;
      // without this node's ingress address (not allocated yet) a remote task's reply could not come back
      const chosen = local || !canSnat ? peers.filter(isLocal) : peers;
      if (host && chosen.length === 0) continue;
      const backends = [...new Set(chosen.map((p) => ipOf(p.address)))].sort();
      if (!local) for (const p of chosen) if (!isLocal(p)) remote.add(ipOf(p.address));
      rules.push({ protocol: port.protocol === PortProtocol.PORT_PROTOCOL_UDP ? 'udp' : 'tcp', published: port.publishedPort, target: port.targetPort, backends, local });
    }
  }
  rules.sort((a, b) => a.protocol.localeCompare(b.protocol) || a.published - b.published);
  // one rule per port and protocol (the manager never gives one port to two ingress services)
  const seen = new Set<string>();
  return {
    rules: rules.filter((r) => {
      const k = `${r.protocol}/${r.published}`;
      if (seen.has(k)) return false;
      seen.add(k);
      return true;
    }),
    remote: [...remote].sort(),
  };
}

/** The nft script replacing the table (one transaction); `bridge` is the ingress bridge. */
export function renderPorts(rules: PortRule[], remote: string[], bridge: string, nodeAddr: string | undefined): string {
  const t = PORTS_TABLE;
  const lines = [`table ip ${t}`, `delete table ip ${t}`, `table ip ${t} {`];
  const live = rules.filter((r) => r.backends.length > 0);
  lines.push('  map ports {', '    type inet_proto . inet_service : verdict');
  if (live.length > 0) lines.push(`    elements = { ${live.map((r, i) => `${r.protocol} . ${r.published} : goto port_${i}`).join(', ')} }`);
  lines.push('  }');
  lines.push('  set remote {', '    type ipv4_addr');
  if (remote.length > 0) lines.push(`    elements = { ${remote.join(', ')} }`);
  lines.push('  }');
  // not from the ingress bridge itself: a task connecting to its gateway's port is not hairpinned
  lines.push('  chain prerouting {', '    type nat hook prerouting priority dstnat; policy accept;', `    iifname != "${bridge}" fib daddr type local meta l4proto . th dport vmap @ports`, '  }');
  lines.push('  chain output {', '    type nat hook output priority -100; policy accept;', '    fib daddr type local meta l4proto . th dport vmap @ports', '  }');
  live.forEach((r, i) => {
    const to = r.backends.length === 1 ? r.backends[0]! : `numgen random mod ${r.backends.length} map { ${r.backends.map((b, j) => `${j} : ${b}`).join(', ')} }`;
    lines.push(`  chain port_${i} {`, `    meta l4proto ${r.protocol} dnat to ${to} : ${r.target}`, '  }');
  });
  lines.push('  chain postrouting {', '    type nat hook postrouting priority srcnat; policy accept;');
  if (nodeAddr) {
    lines.push(`    oifname "${bridge}" ct status dnat ip daddr @remote snat to ${nodeAddr}`);
    lines.push(`    oifname "${bridge}" ct status dnat ip saddr 127.0.0.0/8 snat to ${nodeAddr}`);
  }
  lines.push('  }', '}');
  return lines.join('\n') + '\n';
}
