/**
 * The node data plane of overlay networks: the one place that owns a node's bridges, VXLAN devices,
 * forwarding and neighbour entries, task network namespaces and CNI calls (docs/networking.md, "Data
 * plane on each node").
 *
 * Per network with a task on this node (VXLAN id N):
 *   fl-br-N  a Linux bridge holding the network's gateway address, MTU = the overlay MTU
 *   fl-vx-N  a kernel VXLAN device (id N, UDP 4789, local = this node's underlay address, nolearning),
 *            a port of fl-br-N with neigh_suppress on: the bridge answers ARP for remote tasks from its
 *            neighbour table and never sends ARP for its own (gateway) address over the overlay, so the
 *            gateway, which every node's bridge holds, is answered by the local bridge only
 *   static entries, from the NetworkViews the manager sends (there is no gossip):
 *     bridge fdb 00:00:00:00:00:00 dev fl-vx-N dst NODE     per remote node (broadcasts, unknown unicast)
 *     bridge fdb MAC dev fl-vx-N dst NODE                   per remote task
 *     ip neigh IP lladdr MAC dev fl-br-N nud permanent      per task, local ones too (the node never
 *                                                          ARPs for them: such a request would be
 *                                                          flooded to every node's tasks)
 *   where MAC = macOf(IP) (02:42:<IPv4 bytes>), the MAC each node gives its own task interfaces.
 *
 * Per task: a network namespace bind-mounted at <stateDir>/netns/<task id> (runc joins it by path), CNI
 * ADD of `loopback` on lo and of `bridge` (static IPAM with the task's address, the deterministic MAC as
 * runtimeConfig.mac) on eth0, eth1... per network; a record <stateDir>/tasks/<task id>.json of what was
 * attached (with each ADD result, for DEL and CHECK). Removal: CNI DEL, unmount and remove the netns, and
 * when a network's last task on the node goes, its bridge and VXLAN device.
 *
 * Nothing is torn down on open(): after an agent restart the devices, namespaces and records are
 * adopted, and the next COMPLETE assignments message rebuilds the forwarding and neighbour entries
 * (entries not in the view are removed, missing ones added).
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { AssignmentsType, type AssignmentsMessage, type NetworkView } from '../../gen/flotilla/v1/dispatcher.js';
import type { NetworkAttachment } from '../../gen/flotilla/v1/objects.js';
import { unmount } from '../runtime/mount.js';
import type { Discovery } from './discovery.js';
import { execInWorker } from '../runtime/spawner.js';
import { CNI_VERSION, DEFAULT_CNI_PATH, cniAdd, cniCheck, cniDel, type CniNetworkList, type CniOptions, type CniResult } from './cni.js';
import { PORTS_TABLE, type PortRule, portRules, publishesAny, renderPorts } from './ports.js';
import { VXLAN_PORT, bridgeMac, bridgeName, hostOfAddr, macOf, overlayMtu, parseCidr, parseIp, vniOf, vxlanName } from './names.js';

export interface NodeNetworkOptions {
  /** where netns files and attachment records live (volatile: under the run root) */
  stateDir: string;
  /** this node's underlay address: the VXLAN devices' local address; peers at it are local */
  localAddr: string;
  /** this node's id once known (peers on it are local too) */
  nodeId?: () => string;
  /** CNI plugin directories; default /usr/lib/cni */
  cniPath?: string[];
  /**
   * run every command (ip, bridge, CNI plugins) inside this network namespace (nsenter --net=PATH): the
   * node's namespace when it is not the process's own (tests driving several test bed hosts from one process)
   */
  hostNetns?: string;
  /** service discovery (resolver + VIP tables, agent/network/discovery.ts): follows the views and the tasks */
  discovery?: Discovery;
  log?: Logger;
}

/** One network of one task, as attached. */
export interface NetAttachRecord {
  networkId: string;
  networkName: string;
  vni: number;
  /** CIDR */
  address: string;
  gateway: string;
  mac: string;
  ifname: string;
  mtu: number;
  /** the bridge plugin's ADD result (for DEL and CHECK) */
  result?: CniResult;
  /** the ingress network: the task's default route goes through the node (published ports' replies) */
  ingress?: boolean;
}

export interface TaskNetRecord {
  taskId: string;
  netns: string;
  networks: NetAttachRecord[];
}

/** What a task container needs from the data plane (the worker's seam; the sim runtime has none). */
export interface TaskNetwork {
  /** applies an assignments message's networks and views (COMPLETE replaces, INCREMENTAL updates) */
  applyAssignments(msg: Pick<AssignmentsMessage, 'type' | 'networks' | 'removeNetworks' | 'networkViews'>): Promise<void>;
  /** creates the task's netns and attaches it to its networks; resolves the netns path */
  attach(taskId: string, networks: NetworkAttachment[]): Promise<string>;
  /** detaches the task (idempotent) */
  detach(taskId: string): Promise<void>;
  /** the tasks with a record */
  attachedTasks(): string[];
  /** the /etc/resolv.conf of an attached task (its networks' resolvers), when service discovery runs */
  resolvConf?(taskId: string): string | undefined;
}

interface Link {
  ifname: string;
  mtu?: number;
  master?: string;
  operstate?: string;
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

/** One lock per key: calls with the same key run one after another. */
class KeyedLock {
  private readonly tails = new Map<string, Promise<unknown>>();
  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    const p = prev.then(fn, fn);
    const tail = p.catch(() => undefined);
    this.tails.set(key, tail);
    try {
      return await p;
    } finally {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    }
  }
}

const NET_LOCK = 'net:';
const TASK_LOCK = 'task:';
const ISOLATION_LOCK = 'isolation';

/** The node's one nftables table isolating its overlay networks (renderIsolation()). */
export const ISOLATION_TABLE = 'flotilla-isolation';

/**
 * The nft script replacing the isolation table (one transaction; with no bridge, it only deletes it).
 * `isolated`: the overlay bridges nothing is routed into or out of; `ingress`: the ingress network's
 * bridge, into and out of which only the published ports' connections (DNAT'ed by table ip
 * flotilla-ports) and their replies are routed.
 *
 * Where br_netfilter is on (bridge-nf-call-iptables=1, the default in every namespace once the module is
 * loaded) every bridged frame of every overlay, task to task, runs this chain (seen as bridge to the same
 * bridge): it is the data path's only netfilter cost, so such frames leave after the first rule, one set
 * lookup whatever the number of networks, and interfaces are matched by index (iface_index, resolved when
 * the table is loaded: the bridges exist then). A table per network with `iifname` rules cost ~2% of the
 * overlay's CPU with one network and ~7% more with ten (docs/benchmarks.md, "bench:network: what our
 * overlay costs more than the hand-built one"). Kept out of the chain while there is no ingress bridge:
 * `ct` rules, which would turn conntrack on for all the host's traffic.
 */
export function renderIsolation(isolated: string[], ingress: string[]): string {
  const t = ISOLATION_TABLE;
  const lines = [`table inet ${t}`, `delete table inet ${t}`];
  const all = [...isolated, ...ingress].sort();
  if (all.length === 0) return lines.join('\n') + '\n';
  const q = (names: string[]): string => names.map((n) => `"${n}"`).join(', ');
  lines.push(`table inet ${t} {`);
  lines.push('  set same {', '    type iface_index . iface_index', `    elements = { ${all.map((n) => `"${n}" . "${n}"`).join(', ')} }`, '  }');
  if (isolated.length > 0) lines.push('  set isolated {', '    type iface_index', `    elements = { ${q([...isolated].sort())} }`, '  }');
  if (ingress.length > 0) lines.push('  set ingress {', '    type iface_index', `    elements = { ${q([...ingress].sort())} }`, '  }');
  lines.push('  chain forward {', '    type filter hook forward priority filter - 10; policy accept;');
  // within one bridge (bridged frames under br_netfilter; a task routing to its own subnet)
  lines.push('    meta iif . meta oif @same accept');
  if (isolated.length > 0) lines.push('    meta iif @isolated drop', '    meta oif @isolated drop');
  if (ingress.length > 0) {
    lines.push('    meta iif @ingress ct status dnat accept', '    meta oif @ingress ct status dnat accept');
    lines.push('    meta iif @ingress drop', '    meta oif @ingress drop');
  }
  lines.push('  }', '}');
  return lines.join('\n') + '\n';
}

export class NodeNetwork implements TaskNetwork {
  private readonly views = new Map<string, NetworkView>();
  private readonly records = new Map<string, TaskNetRecord>();
  private readonly lock = new KeyedLock();
  private readonly log: Logger | undefined;
  private underlayMtu: number | undefined;
  /** networks whose devices this process made or checked completely (by VXLAN id, with their MTU) */
  private readonly ensured = new Map<number, number>();
  /** the view each network's entries were last made from */
  private readonly synced = new Map<number, NetworkView | undefined>();
  private batchSeq = 0;
  /** the ingress network's VXLAN id while ports are published (its devices stay without local tasks) */
  private ingressVni: number | undefined;
  /** the ingress bridge set up for ports by this process: "vni address" (skips the checks next time) */
  private ingressReady = '';
  /** UDP backends per published port in the table last applied ("5353" -> addresses) */
  private udpBackends = new Map<number, string[]>();
  /** the task addresses in the ingress view last applied (undefined: none seen yet) */
  private ingressPeers: Set<string> | undefined;
  /** networks whose bridge is the ingress network's (for the isolation table; the views say so too) */
  private readonly ingressVnis = new Set<number>();
  /** the published-ports table last applied ('' = none) */
  private portsApplied = 'unknown: an earlier agent process may have left one';

  private constructor(readonly opts: NodeNetworkOptions) {
    this.log = opts.log;
  }

  /** Opens the state dir and adopts the records of attached tasks (nothing is torn down). */
  static async open(opts: NodeNetworkOptions): Promise<NodeNetwork> {
    parseIp(opts.localAddr, 'node address');
    const n = new NodeNetwork(opts);
    await fs.mkdir(path.join(opts.stateDir, 'netns'), { recursive: true, mode: 0o700 });
    await fs.mkdir(path.join(opts.stateDir, 'tasks'), { recursive: true, mode: 0o700 });
    for (const f of await fs.readdir(path.join(opts.stateDir, 'tasks'))) {
      if (!f.endsWith('.json')) continue;
      try {
        const rec = JSON.parse(await fs.readFile(path.join(opts.stateDir, 'tasks', f), 'utf8')) as TaskNetRecord;
        n.records.set(rec.taskId, rec);
        opts.discovery?.adoptTask(rec.taskId, rec.netns, rec.networks.map((a) => a.networkId));
      } catch (err) {
        n.log?.warn({ file: f, err: errorMessage(err) }, 'ignoring an unreadable network record');
      }
    }
    return n;
  }

  attachedTasks(): string[] {
    return [...this.records.keys()];
  }

  record(taskId: string): TaskNetRecord | undefined {
    const r = this.records.get(taskId);
    return r ? structuredClone(r) : undefined;
  }

  view(networkId: string): NetworkView | undefined {
    return this.views.get(networkId);
  }

  netnsPath(taskId: string): string {
    return path.join(this.opts.stateDir, 'netns', taskId);
  }

  private recordPath(taskId: string): string {
    return path.join(this.opts.stateDir, 'tasks', `${taskId}.json`);
  }

  private cniOpts(): CniOptions {
    return { cniPath: this.opts.cniPath ?? [DEFAULT_CNI_PATH], hostNetns: this.opts.hostNetns };
  }

  // ---------------------------------------------------------------------------------------------- commands

  /** Runs ip/bridge/... in the node's namespace; rejects with the command's stderr. */
  private async cmd(file: string, args: string[], allowFail = false): Promise<string> {
    const f = this.opts.hostNetns ? 'nsenter' : file;
    const a = this.opts.hostNetns ? [`--net=${this.opts.hostNetns}`, '--', file, ...args] : args;
    const r = await execInWorker(f, a, { timeoutMs: 30_000, maxBuffer: 16 * 1024 * 1024 });
    if (r.code !== 0 && !allowFail) {
      throw new FlotillaError('INTERNAL', `${file} ${args.join(' ')}: ${r.stderr.trim() || r.error || `exit ${r.code}`}`);
    }
    return r.stdout;
  }

  /** Runs a batch of `ip` or `bridge` commands (-force: the rest run when one fails; errors are logged). */
  private async batch(tool: 'ip' | 'bridge', lines: string[]): Promise<void> {
    if (lines.length === 0) return;
    const file = path.join(this.opts.stateDir, `batch-${process.pid}-${this.batchSeq++}`);
    await fs.writeFile(file, lines.join('\n') + '\n');
    try {
      const f = this.opts.hostNetns ? 'nsenter' : tool;
      const a = this.opts.hostNetns ? [`--net=${this.opts.hostNetns}`, '--', tool, '-force', '-batch', file] : ['-force', '-batch', file];
      const r = await execInWorker(f, a, { timeoutMs: 60_000 });
      if (r.code !== 0) this.log?.warn({ tool, err: r.stderr.trim().slice(0, 2000) }, 'some forwarding entries could not be programmed');
    } finally {
      await fs.rm(file, { force: true });
    }
  }

  private async links(): Promise<Link[]> {
    return JSON.parse((await this.cmd('ip', ['-j', 'addr', 'show'])) || '[]') as Link[];
  }

  private async getUnderlayMtu(): Promise<number> {
    if (this.underlayMtu) return this.underlayMtu;
    const dev = (await this.links()).find((l) => l.addr_info?.some((a) => a.family === 'inet' && a.local === this.opts.localAddr));
    if (!dev?.mtu) throw new FlotillaError('FAILED_PRECONDITION', `no interface of this node holds its address ${this.opts.localAddr}: cannot build the overlay`);
    this.underlayMtu = dev.mtu;
    return dev.mtu;
  }

  resolvConf(taskId: string): string | undefined {
    const rec = this.records.get(taskId);
    return rec && this.opts.discovery ? this.opts.discovery.resolvConf(rec.networks.map((a) => a.networkId)) : undefined;
  }

  // ---------------------------------------------------------------------------------------------- views

  async applyAssignments(msg: Pick<AssignmentsMessage, 'type' | 'networks' | 'removeNetworks' | 'networkViews'>): Promise<void> {
    const complete = msg.type === AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE;
    if (complete) this.views.clear();
    for (const id of msg.removeNetworks) this.views.delete(id);
    const changed = new Set<string>();
    for (const v of msg.networkViews) {
      if (!v.network?.id) continue;
      this.views.set(v.network.id, v);
      changed.add(v.network.id);
    }
    // program the entries of every network that has devices here (after a COMPLETE: all of them)
    const present = await this.presentNetworks();
    for (const [vni] of present) {
      const view = [...this.views.values()].find((v) => v.network?.allocation?.vni === vni);
      if (view && (complete || changed.has(view.network!.id))) {
        await this.lock.run(NET_LOCK + vni, () => this.sync(vni, view));
      } else if (!view && (complete || msg.removeNetworks.length > 0)) {
        // no view: no remote peer is known any more; devices stay while local tasks use them
        await this.lock.run(NET_LOCK + vni, () => (this.inUse(vni) ? this.sync(vni, undefined) : this.removeDevices(vni)));
      }
    }
    // DNS answers and the VIP tables of the tasks here follow the same views
    // (not the ingress network's: it carries published ports only, no names, no VIPs)
    const failed = (await this.opts.discovery?.setViews([...this.views.values()].filter((v) => !v.network?.spec?.ingress))) ?? [];
    for (const f of failed) this.log?.warn({ err: f }, 'updating the VIP tables');
    await this.syncPorts().catch((err: unknown) => this.log?.warn({ err: errorMessage(err) }, 'programming the published ports'));
  }

  // ---------------------------------------------------------------------------------------------- published ports

  private ingressView(): NetworkView | undefined {
    for (const v of this.views.values()) if (v.network?.spec?.ingress) return v;
    return undefined;
  }

  /**
   * Published ports (agent/network/ports.ts): while the ingress view publishes any port, this node
   * keeps the ingress bridge and VXLAN device (with or without local tasks), holds its own ingress
   * address on the bridge, forwards IPv4, and has table ip flotilla-ports made from the view; when
   * no port is published any more the table goes, and the devices too unless local tasks use them.
   */
  private async syncPorts(): Promise<void> {
    const view = this.ingressView();
    const vni = view?.network?.allocation?.vni;
    if (!view || !vni || !publishesAny(view)) {
      // the first time after start, what an earlier agent process may have left goes too
      const old = this.ingressVni ?? (this.portsApplied !== '' ? vni : undefined);
      this.ingressVni = undefined;
      if (this.portsApplied !== '') {
        await this.cmd('nft', ['delete', 'table', 'ip', PORTS_TABLE], true);
        this.portsApplied = '';
        await this.forgetUdpBackends([]);
        this.log?.info('published ports removed from this node');
      }
      if (old !== undefined) await this.lock.run(NET_LOCK + old, async () => (this.inUse(old) ? undefined : this.removeDevices(old)));
      return;
    }
    this.ingressVni = vni;
    const self = this.opts.nodeId?.() ?? '';
    const mine = self ? view.network!.allocation!.nodeAddresses[self] : undefined;
    const br = bridgeName(vni);
    await this.lock.run(NET_LOCK + vni, async () => {
      const ready = `${vni} ${mine ?? ''}`;
      // done by this process already, devices still checked: only the entries may need the new view
      if (this.ingressReady === ready && this.ensured.has(vni)) {
        if (this.synced.get(vni) !== view) await this.sync(vni, view);
        return;
      }
      await this.ensureDevices(view);
      if (this.synced.get(vni) !== view) await this.sync(vni, view);
      if (mine) {
        const ip = parseCidr(mine, 'node ingress address');
        const links = await this.links();
        if (!links.find((l) => l.ifname === br)?.addr_info?.some((a) => a.family === 'inet' && a.local === ip.ip)) {
          await this.cmd('ip', ['addr', 'replace', `${ip.ip}/${ip.prefix}`, 'dev', br]);
        }
      }
      // forwarding to the tasks, and DNAT of connections to 127.0.0.1 out of the bridge
      await this.cmd('sysctl', ['-qw', 'net.ipv4.ip_forward=1', `net.ipv4.conf.${br}.route_localnet=1`], true);
      this.ingressReady = ready;
    });
    await this.forgetGoneBackends(view);
    const { rules, remote } = portRules(view, (p) => this.isLocal(p), !!mine);
    const text = renderPorts(rules, remote, br, mine ? parseCidr(mine, 'node ingress address').ip : undefined);
    if (text === this.portsApplied) return;
    const f = this.opts.hostNetns ? 'nsenter' : 'nft';
    const a = this.opts.hostNetns ? [`--net=${this.opts.hostNetns}`, '--', 'nft', '-f', '-'] : ['-f', '-'];
    const r = await execInWorker(f, a, { input: text, timeoutMs: 30_000 });
    if (r.code !== 0) throw new FlotillaError('INTERNAL', `nft: published ports: ${r.stderr.trim() || r.error}`);
    this.portsApplied = text;
    await this.forgetUdpBackends(rules);
    this.log?.debug({ ports: rules.map((x) => `${x.published}/${x.protocol}->${x.target} (${x.backends.length})`) }, 'published ports programmed');
  }

  /**
   * UDP has no connection end: conntrack keeps sending a client's datagrams (same source port) to the
   * backend it chose until the entry expires (30 s, 120 s once answered). Entries towards a backend
   * that left a port are deleted, so the next datagram picks a live one (as kube-proxy does).
   */
  private async forgetUdpBackends(rules: PortRule[]): Promise<void> {
    const now = new Map(rules.filter((r) => r.protocol === 'udp').map((r) => [r.published, r.backends] as const));
    for (const [published, before] of this.udpBackends) {
      const still = new Set(now.get(published) ?? []);
      for (const b of before) {
        if (still.has(b)) continue;
        // exit 1 when no entry matched: nothing to do
        await this.cmd('conntrack', ['-D', '-p', 'udp', '--orig-port-dst', String(published), '--reply-src', b], true);
      }
    }
    this.udpBackends = now;
  }

  /**
   * A task that left the ingress view altogether (stopped, failed, its node down) has no connection to
   * serve any more: this node's conntrack entries towards its address are deleted, so that a client
   * still sending on such a connection gets a reset (its next packet is a new connection to a live
   * backend, which has no such socket) instead of retransmitting into nothing for minutes. A task that
   * only left the port rules (stopping, unhealthy) keeps its connections: they drain.
   */
  private async forgetGoneBackends(view: NetworkView): Promise<void> {
    const now = new Set<string>();
    for (const p of view.peers) if (!p.nodeAddress && p.address) now.add(p.address.split('/')[0]!);
    const before = this.ingressPeers;
    this.ingressPeers = now;
    if (!before) return; // first view after start: nothing known to have left
    for (const ip of before) {
      if (now.has(ip)) continue;
      // exit 1 when no entry matched: nothing to do
      await this.cmd('conntrack', ['-D', '-p', 'tcp', '--reply-src', ip], true);
    }
  }

  /** The networks whose bridge or VXLAN device exists on this node, by VXLAN id. */
  private async presentNetworks(): Promise<Map<number, Set<'br' | 'vx'>>> {
    const out = new Map<number, Set<'br' | 'vx'>>();
    for (const l of await this.links()) {
      const v = vniOf(l.ifname);
      if (!v) continue;
      let s = out.get(v.vni);
      if (!s) out.set(v.vni, (s = new Set()));
      s.add(v.kind);
    }
    return out;
  }

  private inUse(vni: number): boolean {
    if (vni === this.ingressVni) return true;
    for (const r of this.records.values()) if (r.networks.some((n) => n.vni === vni)) return true;
    return false;
  }

  private isLocal(p: { nodeId: string; nodeAddr: string }): boolean {
    const self = this.opts.nodeId?.() ?? '';
    return (self !== '' && p.nodeId === self) || hostOfAddr(p.nodeAddr) === this.opts.localAddr;
  }

  /** Makes fl-vx-<vni>'s forwarding entries and fl-br-<vni>'s neighbour entries exactly the view's. */
  private async sync(vni: number, view: NetworkView | undefined): Promise<void> {
    this.synced.set(vni, view);
    const vx = vxlanName(vni);
    const br = bridgeName(vni);
    const wantFdb = new Map<string, string>(); // "mac dst" -> command
    const wantNeigh = new Map<string, string>(); // ip -> mac
    const nodes = new Set<string>();
    for (const p of view?.peers ?? []) {
      if (p.address && !p.nodeAddress && this.isLocal(p)) {
        // a local task: its neighbour entry too (its MAC follows from its address), so that the node
        // never ARPs for it: such a request ("who has X, tell GATEWAY") is flooded over the VXLAN
        // device to every node's tasks, as the bridge does not know X yet
        try {
          const ip = parseCidr(p.address, 'peer address').ip;
          wantNeigh.set(ip, macOf(ip));
        } catch {
          // ignored below as well
        }
        continue;
      }
      if (!p.address || !p.nodeAddr || this.isLocal(p)) continue;
      let ip: string;
      let dst: string;
      try {
        ip = parseCidr(p.address, 'peer address').ip;
        dst = parseIp(hostOfAddr(p.nodeAddr), 'peer node address');
      } catch (err) {
        this.log?.warn({ task: p.taskId, err: errorMessage(err) }, 'ignoring a peer with a bad address');
        continue;
      }
      nodes.add(dst);
      // a node's own ingress address sits on its bridge: the bridge's MAC
      const mac = p.nodeAddress ? bridgeMac(dst, vni) : macOf(ip);
      wantFdb.set(`${mac} ${dst}`, `fdb replace ${mac} dev ${vx} dst ${dst} self permanent`);
      // and in the bridge's own table: known behind the VXLAN port from the start (no unknown-unicast
      // flood; neigh_suppress answers ARP only for MACs the bridge knows)
      wantFdb.set(`${mac} master`, `fdb replace ${mac} dev ${vx} master static`);
      wantNeigh.set(ip, mac);
    }
    for (const dst of nodes) wantFdb.set(`00:00:00:00:00:00 ${dst}`, `fdb append 00:00:00:00:00:00 dev ${vx} dst ${dst} self permanent`);

    const fdb = JSON.parse((await this.cmd('bridge', ['-j', 'fdb', 'show', 'dev', vx], true)) || '[]') as { mac: string; dst?: string; master?: string; state?: string }[];
    const have = new Set<string>();
    const bridgeCmds: string[] = [];
    for (const e of fdb) {
      if (e.master) {
        // the bridge's entries on the VXLAN port: ours (static) and learned ones of tasks no longer there
        const key = `${e.mac} master`;
        if ((e.state === 'static' || e.mac.startsWith('02:42:')) && !wantFdb.has(key)) bridgeCmds.push(`fdb del ${e.mac} dev ${vx} master`);
        else if (e.state === 'static') have.add(key);
        continue;
      }
      if (!e.dst) continue;
      const key = `${e.mac} ${e.dst}`;
      have.add(key);
      if (!wantFdb.has(key)) bridgeCmds.push(`fdb del ${e.mac} dev ${vx} dst ${e.dst} self`);
    }
    for (const [key, c] of wantFdb) if (!have.has(key)) bridgeCmds.push(c);

    const neigh = JSON.parse((await this.cmd('ip', ['-j', 'neigh', 'show', 'dev', br, 'nud', 'permanent'], true)) || '[]') as { dst: string; lladdr?: string }[];
    const ipCmds: string[] = [];
    const haveNeigh = new Map(neigh.map((n) => [n.dst, n.lladdr ?? '']));
    for (const [ip] of haveNeigh) if (!wantNeigh.has(ip)) ipCmds.push(`neigh del ${ip} dev ${br}`);
    for (const [ip, mac] of wantNeigh) if (haveNeigh.get(ip) !== mac) ipCmds.push(`neigh replace ${ip} lladdr ${mac} dev ${br} nud permanent`);
    await this.batch('bridge', bridgeCmds);
    await this.batch('ip', ipCmds);
    if (bridgeCmds.length + ipCmds.length > 0) this.log?.debug({ vni, fdb: bridgeCmds.length, neigh: ipCmds.length }, 'overlay entries programmed');
  }

  // ---------------------------------------------------------------------------------------------- devices

  /** Creates (or adopts) the network's bridge and VXLAN device. Resolves the overlay MTU. */
  private async ensureDevices(view: NetworkView): Promise<number> {
    const net = view.network!;
    const alloc = net.allocation;
    if (!alloc || !alloc.vni || !alloc.subnet || !alloc.gateway) {
      throw new FlotillaError('FAILED_PRECONDITION', `network ${net.spec?.name || net.id} has no allocation (subnet, gateway, VXLAN id) yet`);
    }
    const vni = alloc.vni;
    const subnet = parseCidr(alloc.subnet, 'subnet');
    const gw = parseIp(alloc.gateway.split('/')[0]!, 'gateway');
    const mtu = overlayMtu(alloc.mtu, await this.getUnderlayMtu());
    const br = bridgeName(vni);
    const vx = vxlanName(vni);
    const links = await this.links();
    const brLink = links.find((l) => l.ifname === br);
    const vxLink = links.find((l) => l.ifname === vx);
    // done already by this process and still there: nothing to check again
    if (this.ensured.get(vni) === mtu && brLink && vxLink?.master === br) return mtu;
    this.ensured.delete(vni);
    this.synced.delete(vni); // devices (re)made or checked: their entries are made again too
    if (!brLink) {
      // a fixed MAC: a bridge otherwise takes its lowest port's, and each change of it flushes the
      // neighbour table (our permanent entries included)
      await this.cmd('ip', ['link', 'add', br, 'address', bridgeMac(this.opts.localAddr, vni), 'mtu', String(mtu), 'type', 'bridge']);
      this.log?.info({ network: net.spec?.name, bridge: br, mtu }, 'overlay bridge created');
    }
    if (!brLink?.addr_info?.some((a) => a.family === 'inet' && a.local === gw)) {
      await this.cmd('ip', ['addr', 'replace', `${gw}/${subnet.prefix}`, 'dev', br]);
    }
    if (!vxLink) {
      await this.cmd('ip', ['link', 'add', vx, 'mtu', String(mtu), 'type', 'vxlan', 'id', String(vni), 'dstport', String(VXLAN_PORT), 'local', this.opts.localAddr, 'nolearning']);
    }
    // IPv4 only: no IPv6 link-local chatter (router solicitations, MLD) flooded to every node
    await this.cmd('sysctl', ['-qw', `net.ipv6.conf.${br}.disable_ipv6=1`, `net.ipv6.conf.${vx}.disable_ipv6=1`], true);
    if (vxLink?.master !== br) await this.cmd('ip', ['link', 'set', vx, 'master', br]);
    // ARP for remote tasks answered from the bridge's neighbour table; none for local addresses over the overlay
    await this.cmd('bridge', ['link', 'set', 'dev', vx, 'neigh_suppress', 'on']);
    // a table per network from an earlier version goes (one table for all of them now)
    await this.cmd('nft', ['delete', 'table', 'inet', `flotilla-${vni}`], true);
    if (net.spec?.ingress) this.ingressVnis.add(vni);
    await this.isolate();
    if (vxLink?.operstate !== 'UNKNOWN' && vxLink?.operstate !== 'UP') await this.cmd('ip', ['link', 'set', vx, 'up']);
    if (brLink?.operstate !== 'UP') await this.cmd('ip', ['link', 'set', br, 'up']);
    this.ensured.set(vni, mtu);
    return mtu;
  }

  /**
   * The host never routes into or out of an overlay network: a task reaches only the tasks of its own
   * networks, even where the host forwards IPv4 and a task has a route through its gateway. One table
   * for all the node's overlay bridges (ISOLATION_TABLE, renderIsolation()), made again whole from the
   * bridges present (serialised: the last render sees every bridge made or removed before it).
   */
  private async isolate(): Promise<void> {
    await this.lock.run(ISOLATION_LOCK, async () => {
      const vnis = [...(await this.presentNetworks()).entries()].filter(([, k]) => k.has('br')).map(([v]) => v);
      const ingress = (v: number): boolean =>
        this.ingressVnis.has(v) || [...this.views.values()].some((x) => x.network?.allocation?.vni === v && !!x.network.spec?.ingress);
      const text = renderIsolation(
        vnis.filter((v) => !ingress(v)).map(bridgeName),
        vnis.filter(ingress).map(bridgeName),
      );
      const f = this.opts.hostNetns ? 'nsenter' : 'nft';
      const a = this.opts.hostNetns ? [`--net=${this.opts.hostNetns}`, '--', 'nft', '-f', '-'] : ['-f', '-'];
      const r = await execInWorker(f, a, { input: text, timeoutMs: 30_000 });
      if (r.code !== 0) throw new FlotillaError('INTERNAL', `nft: isolating the overlay networks: ${r.stderr.trim() || r.error}`);
    });
  }

  private async removeDevices(vni: number): Promise<void> {
    this.ensured.delete(vni);
    if (this.ingressReady.startsWith(`${vni} `)) this.ingressReady = '';
    this.synced.delete(vni);
    await this.cmd('nft', ['delete', 'table', 'inet', `flotilla-${vni}`], true);
    await this.cmd('ip', ['link', 'del', vxlanName(vni)], true);
    await this.cmd('ip', ['link', 'del', bridgeName(vni)], true);
    this.ingressVnis.delete(vni);
    // the isolation table without this bridge (deleted with the last one)
    await this.isolate().catch((err: unknown) => this.log?.warn({ vni, err: errorMessage(err) }, 'updating the isolation table'));
    this.log?.info({ vni }, 'overlay devices removed (no task of the network left on this node)');
  }

  // ---------------------------------------------------------------------------------------------- tasks

  private cniList(a: NetAttachRecord): CniNetworkList {
    return {
      cniVersion: CNI_VERSION,
      name: `flotilla-${a.networkId}`,
      plugins: [
        {
          type: 'bridge',
          bridge: bridgeName(a.vni),
          isGateway: false,
          isDefaultGateway: false,
          ipMasq: false,
          hairpinMode: false,
          mtu: a.mtu,
          capabilities: { mac: true },
          ipam: {
            type: 'static',
            addresses: [{ address: a.address, gateway: a.gateway }],
            // replies to the clients of published ports leave through the node (which un-NATs them)
            ...(a.ingress ? { routes: [{ dst: '0.0.0.0/0', gw: a.gateway }] } : {}),
          },
        },
      ],
    };
  }

  private loopbackList(): CniNetworkList {
    return { cniVersion: CNI_VERSION, name: 'flotilla-loopback', plugins: [{ type: 'loopback' }] };
  }

  private async writeRecord(rec: TaskNetRecord): Promise<void> {
    const file = this.recordPath(rec.taskId);
    await fs.writeFile(`${file}.tmp`, JSON.stringify(rec));
    await fs.rename(`${file}.tmp`, file);
    this.records.set(rec.taskId, rec);
  }

  async attach(taskId: string, networks: NetworkAttachment[]): Promise<string> {
    if (!/^[a-zA-Z0-9_.-]{1,128}$/.test(taskId)) throw new FlotillaError('INVALID_ARGUMENT', `invalid task id ${JSON.stringify(taskId)}`);
    return this.lock.run(TASK_LOCK + taskId, async () => {
      if (this.records.has(taskId)) await this.detachLocked(taskId);
      const plan: NetAttachRecord[] = [];
      for (const [i, na] of networks.entries()) {
        const view = this.views.get(na.networkId);
        if (!view?.network) throw new FlotillaError('FAILED_PRECONDITION', `network ${na.networkId} is not known on this node (no view of it from the manager)`);
        const addr = na.addresses[0];
        if (!addr) throw new FlotillaError('FAILED_PRECONDITION', `task ${taskId} has no address on network ${view.network.spec?.name || na.networkId}`);
        const c = parseCidr(addr, 'task address');
        const alloc = view.network.allocation!;
        plan.push({
          networkId: na.networkId,
          networkName: view.network.spec?.name ?? '',
          vni: alloc?.vni ?? 0,
          address: `${c.ip}/${c.prefix}`,
          gateway: (alloc?.gateway ?? '').split('/')[0]!,
          mac: macOf(c.ip),
          ifname: `eth${i}`,
          mtu: 0,
          ingress: !!view.network.spec?.ingress,
        });
      }
      const netns = this.netnsPath(taskId);
      const rec: TaskNetRecord = { taskId, netns, networks: [] };
      // the record first: a crash from here on leaves something detach() (or the next COMPLETE) cleans up
      await this.writeRecord(rec);
      try {
        await fs.writeFile(netns, '', { flag: 'a' });
        const r = await execInWorker('unshare', [`--net=${netns}`, 'true'], { timeoutMs: 10_000 });
        if (r.code !== 0) throw new FlotillaError('INTERNAL', `creating the network namespace ${netns}: ${r.stderr.trim() || r.error}`);
        // interfaces made in it from now on (eth0...) get no IPv6: the overlay is IPv4 (lo keeps ::1)
        const v6 = await execInWorker('nsenter', [`--net=${netns}`, '--', 'sysctl', '-qw', 'net.ipv6.conf.default.disable_ipv6=1'], { timeoutMs: 10_000 });
        if (v6.code !== 0) this.log?.debug({ taskId, err: v6.stderr.trim() }, 'could not turn IPv6 off in the task namespace');
        await cniAdd(this.loopbackList(), { containerId: taskId, netns, ifname: 'lo' }, this.cniOpts());
        for (const a of plan) {
          const view = this.views.get(a.networkId)!;
          await this.lock.run(NET_LOCK + a.vni, async () => {
            a.mtu = await this.ensureDevices(view);
            rec.networks.push(a);
            await this.writeRecord(rec);
            // the entries follow the views as they come; a network attached first here needs them now
            if (this.synced.get(a.vni) !== view || !this.synced.has(a.vni)) await this.sync(a.vni, view);
          });
          a.result = await cniAdd(this.cniList(a), { containerId: taskId, netns, ifname: a.ifname, capabilityArgs: { mac: a.mac } }, this.cniOpts());
          await this.writeRecord(rec);
          await this.pinGateway(netns, a);
        }
        // the VIP table in the task's namespace, before its container runs
        await this.opts.discovery?.attachTask(taskId, netns, plan.map((a) => a.networkId));
        this.log?.debug({ taskId, networks: plan.map((a) => `${a.networkName}:${a.address}`) }, 'task attached');
        return netns;
      } catch (err) {
        await this.detachLocked(taskId).catch((e: unknown) => this.log?.warn({ taskId, err: errorMessage(e) }, 'cleaning up a failed attach'));
        throw err;
      }
    });
  }

  /**
   * The task's neighbour entry for its gateway, permanent, with this node's bridge MAC. Every node's
   * bridge holds the gateway address, and a node that ARPs for an address its bridge does not know yet
   * (its own new task, say) sends "who has X, tell GATEWAY" from its own bridge MAC, flooded over the
   * VXLAN device to every node's tasks; a task that learned that MAC sent its replies to the other
   * node, where no conntrack entry un-NATs them: connections the mesh sent to a task on the receiving
   * node (no SNAT) stalled (a lost SYN-ACK, a FIN that never arrived). A permanent entry is never
   * replaced by ARP.
   */
  private async pinGateway(netns: string, a: NetAttachRecord): Promise<void> {
    if (!a.gateway) return;
    const mac = bridgeMac(this.opts.localAddr, a.vni);
    const r = await execInWorker('nsenter', [`--net=${netns}`, '--', 'ip', 'neigh', 'replace', a.gateway, 'lladdr', mac, 'dev', a.ifname, 'nud', 'permanent'], { timeoutMs: 10_000 });
    if (r.code !== 0) throw new FlotillaError('INTERNAL', `pinning the gateway ${a.gateway} of ${a.ifname}: ${r.stderr.trim() || r.error}`);
  }

  /** CNI CHECK of every network of the task (the plugins verify the interface and its addresses). */
  async check(taskId: string): Promise<void> {
    await this.lock.run(TASK_LOCK + taskId, async () => {
      const rec = this.records.get(taskId);
      if (!rec) throw new FlotillaError('NOT_FOUND', `task ${taskId} has no network attachment on this node`);
      for (const a of rec.networks) {
        if (!a.result) throw new FlotillaError('FAILED_PRECONDITION', `task ${taskId} on ${a.networkName}: attach did not finish`);
        await cniCheck(this.cniList(a), { containerId: taskId, netns: rec.netns, ifname: a.ifname, capabilityArgs: { mac: a.mac } }, a.result, this.cniOpts());
      }
    });
  }

  detach(taskId: string): Promise<void> {
    return this.lock.run(TASK_LOCK + taskId, () => this.detachLocked(taskId));
  }

  private async detachLocked(taskId: string): Promise<void> {
    await this.opts.discovery?.detachTask(taskId).catch((err: unknown) => this.log?.debug({ taskId, err: errorMessage(err) }, 'removing the VIP table'));
    const rec = this.records.get(taskId);
    const netns = rec?.netns ?? this.netnsPath(taskId);
    const errors: string[] = [];
    const nsLive = existsSync(netns);
    for (const a of [...(rec?.networks ?? [])].reverse()) {
      try {
        // DEL is idempotent; with the namespace gone the plugin only cleans the host side
        await cniDel(this.cniList(a), { containerId: taskId, netns: nsLive ? netns : '', ifname: a.ifname, capabilityArgs: { mac: a.mac } }, a.result, this.cniOpts());
      } catch (err) {
        errors.push(errorMessage(err));
      }
    }
    if (nsLive) {
      await cniDel(this.loopbackList(), { containerId: taskId, netns, ifname: 'lo' }, undefined, this.cniOpts()).catch(() => undefined);
      try {
        await unmount(netns);
        await fs.rm(netns, { force: true });
      } catch (err) {
        errors.push(`netns ${netns}: ${errorMessage(err)}`);
      }
    }
    this.records.delete(taskId);
    await fs.rm(this.recordPath(taskId), { force: true });
    // the last task of a network on this node takes the network's devices with it
    for (const vni of new Set((rec?.networks ?? []).map((a) => a.vni))) {
      await this.lock.run(NET_LOCK + vni, async () => {
        if (!this.inUse(vni)) await this.removeDevices(vni);
      });
    }
    if (errors.length > 0) throw new FlotillaError('INTERNAL', `detaching task ${taskId} from its networks: ${errors.join('; ')}`);
  }

  /** Removes every task attachment and every overlay device of this node (tests, node leaving). */
  async teardown(): Promise<void> {
    await this.cmd('nft', ['delete', 'table', 'ip', PORTS_TABLE], true);
    this.portsApplied = '';
    this.ingressVni = undefined;
    for (const id of [...this.records.keys()]) await this.detach(id).catch((err: unknown) => this.log?.warn({ taskId: id, err: errorMessage(err) }, 'detach failed'));
    for (const [vni] of await this.presentNetworks()) await this.lock.run(NET_LOCK + vni, () => this.removeDevices(vni));
  }
}
