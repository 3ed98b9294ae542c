/**
 * Virtual IPs (docs/networking.md, "Virtual IPs"): connections to a service's VIP are balanced over its
 * ready tasks by nftables inside each container's own network namespace.
 *
 * Every container on an overlay network gets a table `ip flotilla` in its netns:
 *
 *   map services { type ipv4_addr : verdict }      VIP -> jump svc_N
 *   chain output (nat, output hook): ip daddr vmap @services
 *   chain svc_N: dnat to numgen random mod K map { 0 : task1, 1 : task2, ... }
 *   chain reject_out (filter, output hook; only while there are such VIPs): VIPs with no ready task get a
 *     TCP reset / ICMP unreachable
 *
 * Why in the client's netns, and why nftables:
 * - The DNAT happens where the connection starts, so no SNAT is needed: the backend sees the client's real
 *   address, and conntrack in the client's netns reverses the replies. (Swarm's routing mesh and its
 *   IPVS load-balancer namespace SNAT, which is why the address is lost: moby#25526.)
 * - A whole table is replaced in one `nft -f` transaction (flush and re-add), so a view change is atomic:
 *   a connection sees either the old or the new backend set, never a half-built one. IPVS keeps per-service
 *   kernel state edited one destination at a time and needs iptables marks beside it (kube-proxy's nftables
 *   mode made the same choice).
 * - The VIP balances every port of the address (as Swarm's fwmark-based VIP does): the destination port is
 *   kept, only the address is rewritten. ServiceEndpoint.ports are not needed for that.
 *
 * Timeouts: a DNAT'ed connection lives as long as its conntrack entry, whose idle limit is the netns'
 * net.netfilter.nf_conntrack_tcp_timeout_established (kernel default 432000 s = 5 days; Swarm's IPVS cuts
 * idle connections after 900 s: moby#31208). VipOptions.tcpEstablishedTimeoutSec sets it per container.
 *
 * nft runs through the spawner thread (agent/runtime/spawner.ts) as `nsenter --net=NETNS nft -f FILE`.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { NetworkView } from '../../gen/flotilla/v1/dispatcher.js';
import { EndpointMode } from '../../gen/flotilla/v1/objects.js';
import { execInWorker } from '../runtime/spawner.js';
import { ipOf } from './resolver.js';

export const TABLE = 'flotilla';

export interface VipOptions {
  /** idle limit of established TCP connections in each container netns (s); default: the kernel's (432000) */
  tcpEstablishedTimeoutSec?: number;
  /** directory for the rule files handed to nft; default os.tmpdir() */
  tmpDir?: string;
  log?: (msg: string) => void;
}

/** One VIP and the addresses it balances over. */
export interface VipEntry {
  vip: string;
  backends: string[];
}

interface Attached {
  netns: string;
  networkIds: Set<string>;
  /** the ruleset last applied */
  applied?: string;
  /** a render is running / another is wanted after it */
  running?: Promise<void>;
  again: boolean;
}

/** The VIPs (with their ready backends) of the given networks. */
export function vipEntries(views: NetworkView[], networkIds: Set<string>): VipEntry[] {
  const out = new Map<string, VipEntry>();
  for (const v of views) {
    if (!v.network || !networkIds.has(v.network.id)) continue;
    for (const ep of v.endpoints) {
      if (ep.mode !== EndpointMode.ENDPOINT_MODE_VIP || !ep.vip) continue;
      const vip = ipOf(ep.vip);
      const backends = v.peers.filter((p) => p.serviceId === ep.serviceId && p.ready && p.address).map((p) => ipOf(p.address));
      const e = out.get(vip) ?? { vip, backends: [] };
      for (const b of backends) if (!e.backends.includes(b)) e.backends.push(b);
      out.set(vip, e);
    }
  }
  return [...out.values()].map((e) => ({ vip: e.vip, backends: [...e.backends].sort() })).sort((a, b) => (a.vip < b.vip ? -1 : 1));
}

/**
 * The nft script replacing table `ip flotilla` in one transaction. The first line makes sure the table
 * exists so that the delete cannot fail; the whole file is one atomic commit.
 */
export function renderRuleset(entries: VipEntry[]): string {
  const lines = [`table ip ${TABLE}`, `delete table ip ${TABLE}`, `table ip ${TABLE} {`];
  const withBackends = entries.filter((e) => e.backends.length > 0);
  const empty = entries.filter((e) => e.backends.length === 0);
  lines.push('  map services {', '    type ipv4_addr : verdict');
  if (withBackends.length > 0) lines.push(`    elements = { ${withBackends.map((e, i) => `${e.vip} : jump svc_${i}`).join(', ')} }`);
  lines.push('  }');
  lines.push('  chain output {', '    type nat hook output priority -100; policy accept;', '    ip daddr vmap @services', '  }');
  withBackends.forEach((e, i) => {
    const map = e.backends.map((b, j) => `${j} : ${b}`).join(', ');
    lines.push(`  chain svc_${i} {`, `    dnat to numgen random mod ${e.backends.length} map { ${map} }`, '  }');
  });
  // only while some VIP has no ready task: a base chain costs every packet the container sends a
  // netfilter hook call, even when empty (docs/benchmarks.md, "Network")
  if (empty.length > 0) {
    const set = empty.map((e) => e.vip).join(', ');
    lines.push('  chain reject_out {', '    type filter hook output priority 0; policy accept;');
    lines.push(`    ip daddr { ${set} } meta l4proto tcp reject with tcp reset`, `    ip daddr { ${set} } reject`, '  }');
  }
  lines.push('}');
  return lines.join('\n') + '\n';
}

let seq = 0;

/**
 * Keeps the VIP tables of the containers on this node in step with the node's NetworkViews.
 * attach() when a container's netns is on its networks, update() on every view change, detach() before
 * the netns goes away. Renders per container are serialised and coalesced (the latest views win).
 */
export class VipBalancer {
  private views: NetworkView[] = [];
  private readonly attached = new Map<string, Attached>();
  private readonly tmpDir: string;
  private readonly log: (msg: string) => void;

  constructor(private readonly o: VipOptions = {}) {
    this.tmpDir = o.tmpDir ?? os.tmpdir();
    this.log = o.log ?? (() => undefined);
  }

  /**
   * Installs the table in a container's netns (path such as /proc/PID/ns/net or /run/netns/NAME) for the
   * networks it is on, and sets its conntrack timeout if configured. Resolves when the rules are in.
   */
  async attach(id: string, netns: string, networkIds: string[], views?: NetworkView[]): Promise<void> {
    if (views) this.views = views;
    const a: Attached = { netns, networkIds: new Set(networkIds), again: false };
    this.attached.set(id, a);
    if (this.o.tcpEstablishedTimeoutSec !== undefined) {
      const n = Math.floor(this.o.tcpEstablishedTimeoutSec);
      const r = await execInWorker('nsenter', [`--net=${netns}`, 'sysctl', '-q', '-w', `net.netfilter.nf_conntrack_tcp_timeout_established=${n}`], { timeoutMs: 10_000 });
      if (r.code !== 0) throw new Error(`vip: cannot set the conntrack timeout in ${netns}: ${(r.stderr || r.error || '').trim()}`);
    }
    await this.render(id, a);
  }

  /**
   * Registers a container whose table an earlier agent process installed (agent restart), without
   * touching it: the table stays as it is until the next update() brings the current views.
   */
  adopt(id: string, netns: string, networkIds: string[]): void {
    if (!this.attached.has(id)) this.attached.set(id, { netns, networkIds: new Set(networkIds), again: false });
  }

  /** Takes the node's new views and re-renders every attached container whose VIPs changed. */
  async update(views: NetworkView[]): Promise<void> {
    this.views = views;
    const results = await Promise.allSettled([...this.attached.entries()].map(([id, a]) => this.render(id, a)));
    const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => (r.reason as Error).message);
    if (failed.length > 0) throw new Error(failed.join('; '));
  }

  /** Removes the table from the container's netns (nothing when the netns is already gone). */
  async detach(id: string): Promise<void> {
    const a = this.attached.get(id);
    if (a === undefined) return;
    this.attached.delete(id);
    await a.running?.catch(() => undefined);
    const r = await this.nft(a.netns, `table ip ${TABLE}\ndelete table ip ${TABLE}\n`);
    if (r !== undefined && !/No such file|Invalid argument|cannot open/i.test(r)) this.log(`vip detach ${id}: ${r}`);
  }

  /** The entries currently wanted for a container (for inspection and tests). */
  entries(id: string): VipEntry[] {
    const a = this.attached.get(id);
    return a ? vipEntries(this.views, a.networkIds) : [];
  }

  /** Applies the current views to one container; a call while one runs makes one more run after it. */
  private render(id: string, a: Attached): Promise<void> {
    if (a.running) {
      a.again = true;
      return a.running;
    }
    const run = async (): Promise<void> => {
      do {
        a.again = false;
        if (this.attached.get(id) !== a) return;
        const text = renderRuleset(vipEntries(this.views, a.networkIds));
        if (text === a.applied) continue;
        const err = await this.nft(a.netns, text);
        if (err !== undefined) throw new Error(`vip: nft in ${a.netns}: ${err}`);
        a.applied = text;
      } while (a.again);
    };
    a.running = run().finally(() => {
      a.running = undefined;
    });
    return a.running;
  }

  /** Runs an nft script in a netns; undefined on success, else the error text. */
  private async nft(netns: string, script: string): Promise<string | undefined> {
    const file = path.join(this.tmpDir, `flotilla-nft-${process.pid}-${++seq}.nft`);
    await fs.writeFile(file, script);
    try {
      const r = await execInWorker('nsenter', [`--net=${netns}`, 'nft', '-f', file], { timeoutMs: 10_000 });
      return r.code === 0 ? undefined : (r.stderr || r.error || `exit ${r.code}`).trim();
    } finally {
      await fs.rm(file, { force: true });
    }
  }
}
