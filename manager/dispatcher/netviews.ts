/**
 * Network views for the dispatcher: for each node, the full view (network, peers, service
 * endpoints) of every network its live tasks are attached to. Built from the store on demand for a
 * node's COMPLETE message, and after each applied batch for the networks that batch touched, sent
 * only to nodes holding the network and only when the view differs from what that node was sent
 * last (so one commit gives at most one message per node). No timer, no heartbeat: a task that
 * stops, fails its health check or is removed leaves every view in the commit that says so.
 *
 * A peer is a task with an address on the network, placed on a node (assigned or later), not
 * terminal, whose node is known and not down; ready = running, still wanted (desired state running)
 * and, with a health check, healthy.
 * A node that is removed or goes down drops its peers from every view.
 */
import { HealthState, type Network, NodeState, type Service, type Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { NetworkPeer, NetworkView, ServiceEndpoint } from '../../gen/flotilla/v1/dispatcher.js';
import type { MemoryStore, StoreEvent } from '../store/store.js';
import { serviceNetworkIds, usesVip } from '../allocator/networks.js';

export interface NodeNetworkUpdate {
  views: NetworkView[];
  remove: string[];
}

/** A task that is on a node and holds its addresses there (placed, not yet terminal). */
function placed(t: Task): boolean {
  const st = t.status?.state ?? TaskState.TASK_STATE_NEW;
  return !!t.nodeId && st >= TaskState.TASK_STATE_ASSIGNED && st < TaskState.TASK_STATE_COMPLETE;
}

export function peerReady(t: Task): boolean {
  if (t.status?.state !== TaskState.TASK_STATE_RUNNING) return false;
  // the manager decided to stop it (scale down, update, removal): out of DNS and the VIP at once,
  // while it still drains (it stays a peer, reachable, until it is terminal)
  if (t.desiredState > TaskState.TASK_STATE_RUNNING) return false;
  // a health check (the spec's or the image's): healthy; STARTING and UNHEALTHY are not ready
  const h = t.status.health;
  return h === HealthState.HEALTH_STATE_NONE || h === HealthState.HEALTH_STATE_HEALTHY;
}

export class NetworkViews {
  /** networkId -> ids of tasks with an address on it (any state; filtered when a view is built) */
  private readonly members = new Map<string, Set<string>>();
  /** nodeId -> networkId -> the encoded view last sent to that node */
  private readonly sent = new Map<string, Map<string, string>>();

  constructor(private readonly store: MemoryStore) {
    for (const t of store.tasks.values()) this.index(t);
  }

  private index(t: Task): void {
    for (const a of t.networks) {
      let s = this.members.get(a.networkId);
      if (!s) this.members.set(a.networkId, (s = new Set()));
      s.add(t.id);
    }
  }

  private unindex(t: Task): void {
    for (const a of t.networks) this.members.get(a.networkId)?.delete(t.id);
  }

  /**
   * The networks a node needs: those its placed tasks have an address on, and the ingress network
   * (every node answers on the published ports: docs/networking.md, "Published ports").
   */
  networksOfNode(nodeId: string): Set<string> {
    const out = new Set<string>();
    for (const n of this.store.networks.values()) if (n.spec?.ingress) out.add(n.id);
    for (const t of this.store.tasksOfNode(nodeId)) if (placed(t)) for (const a of t.networks) if (this.store.networks.has(a.networkId)) out.add(a.networkId);
    return out;
  }

  /** The current view of a network, or undefined when it no longer exists. */
  view(networkId: string): NetworkView | undefined {
    const network: Network | undefined = this.store.networks.get(networkId);
    if (!network) return undefined;
    const peers: NetworkPeer[] = [];
    for (const id of this.members.get(networkId) ?? []) {
      const t = this.store.tasks.get(id);
      if (!t || !placed(t)) continue;
      const node = this.store.getNode(t.nodeId);
      if (!node || node.status?.state === NodeState.NODE_STATE_DOWN) continue;
      const a = t.networks.find((x) => x.networkId === networkId);
      if (!a || a.addresses.length === 0) continue;
      peers.push({
        taskId: t.id,
        nodeId: t.nodeId,
        nodeAddr: hostOf(node.status?.addr ?? ''),
        address: a.addresses[0]!,
        serviceId: t.serviceId,
        serviceName: t.serviceName,
        ready: peerReady(t),
        aliases: a.aliases,
        taskName: `${t.serviceName}.${t.slot || t.nodeId}.${t.id}`,
        nodeAddress: false,
      });
    }
    if (network.spec?.ingress) {
      for (const [nodeId, address] of Object.entries(network.allocation?.nodeAddresses ?? {})) {
        const node = this.store.getNode(nodeId);
        if (!node || node.status?.state === NodeState.NODE_STATE_DOWN || !node.status?.addr) continue;
        peers.push({ taskId: '', nodeId, nodeAddr: hostOf(node.status.addr), address, serviceId: '', serviceName: '', ready: false, aliases: [], taskName: '', nodeAddress: true });
      }
    }
    peers.sort((x, y) => (x.taskId < y.taskId ? -1 : x.taskId > y.taskId ? 1 : x.nodeId < y.nodeId ? -1 : x.nodeId > y.nodeId ? 1 : 0));
    const endpoints: ServiceEndpoint[] = [];
    for (const s of this.store.listServices()) {
      const att = s.spec?.task?.networks.find((n) => n.target === networkId);
      if (!att) continue;
      endpoints.push(endpointOf(s, networkId, att.aliases));
    }
    endpoints.sort((x, y) => (x.serviceName < y.serviceName ? -1 : x.serviceName > y.serviceName ? 1 : 0));
    return { network, peers, endpoints };
  }

  /** Everything a node needs now, for its COMPLETE message; remembers it as sent. */
  complete(nodeId: string): NetworkView[] {
    const views: NetworkView[] = [];
    const sent = new Map<string, string>();
    for (const nid of this.networksOfNode(nodeId)) {
      const v = this.view(nid);
      if (!v) continue;
      views.push(v);
      sent.set(nid, encode(v));
    }
    this.sent.set(nodeId, sent);
    return views;
  }

  /** Forgets a node's sent state (its session ended). */
  forget(nodeId: string): void {
    this.sent.delete(nodeId);
  }

  /**
   * Takes one applied batch; returns, per connected node, the views that changed for it and the
   * networks it no longer needs.
   */
  apply(evs: StoreEvent[], connected: Iterable<string>): Map<string, NodeNetworkUpdate> {
    const touched = new Set<string>();
    const nodesTouched = new Set<string>();
    let all = false;
    if (evs.length > 0 && evs.every((e) => e.kind === 'commit')) {
      // a snapshot was installed: every object may have changed
      this.members.clear();
      for (const t of this.store.tasks.values()) this.index(t);
      all = true;
    }
    for (const ev of evs) {
      if (ev.kind === 'commit') continue;
      if (ev.table === 'task') {
        const t = ev.object as Task;
        const old = ev.old as Task | undefined;
        if (old) this.unindex(old);
        if (ev.kind !== 'delete') this.index(t);
        else this.unindex(t);
        for (const a of t.networks) touched.add(a.networkId);
        for (const a of old?.networks ?? []) touched.add(a.networkId);
        // a task on no network changes no node's set of networks (the common case: no cost)
        if (t.networks.length === 0 && (old?.networks.length ?? 0) === 0) continue;
        if (t.nodeId) nodesTouched.add(t.nodeId);
        if (old?.nodeId) nodesTouched.add(old.nodeId);
      } else if (ev.table === 'service') {
        const s = ev.object as Service;
        for (const id of serviceNetworkIds(s)) touched.add(id);
        for (const id of serviceNetworkIds((ev.old as Service | undefined) ?? s)) touched.add(id);
      } else if (ev.table === 'network') {
        touched.add((ev.object as Network).id);
        if (ev.kind === 'delete') this.members.delete((ev.object as Network).id);
        all = true;
      } else if (ev.table === 'node') {
        // address or state (down, removed): every network with peers on that node
        const id = (ev.object as { id: string }).id;
        // its address on the ingress network is in the ingress view of every node
        for (const n of this.store.networks.values()) if (n.spec?.ingress) touched.add(n.id);
        for (const t of this.store.tasksOfNode(id)) for (const a of t.networks) touched.add(a.networkId);
      }
    }
    const out = new Map<string, NodeNetworkUpdate>();
    if (touched.size === 0 && nodesTouched.size === 0 && !all) return out;
    const built = new Map<string, { view: NetworkView; enc: string } | undefined>();
    const get = (nid: string): { view: NetworkView; enc: string } | undefined => {
      if (!built.has(nid)) {
        const v = this.view(nid);
        built.set(nid, v ? { view: v, enc: encode(v) } : undefined);
      }
      return built.get(nid);
    };
    for (const nodeId of connected) {
      const sent = this.sent.get(nodeId);
      if (!sent) continue; // no COMPLETE yet: it will carry everything
      // a node's set of networks changes only through its own tasks (or a network's removal)
      const sentIds = [...sent.keys()];
      const relevant = sentIds.some((n) => touched.has(n)) || nodesTouched.has(nodeId) || all;
      if (!relevant) continue;
      const want = nodesTouched.has(nodeId) || all ? this.networksOfNode(nodeId) : new Set(sentIds);
      const upd: NodeNetworkUpdate = { views: [], remove: [] };
      for (const nid of want) {
        if (sent.has(nid) && !touched.has(nid)) continue;
        const v = get(nid);
        if (!v) continue;
        if (sent.get(nid) === v.enc) continue;
        sent.set(nid, v.enc);
        upd.views.push(v.view);
      }
      for (const nid of sentIds) {
        if (want.has(nid) && this.store.networks.has(nid)) continue;
        sent.delete(nid);
        upd.remove.push(nid);
      }
      if (upd.views.length > 0 || upd.remove.length > 0) out.set(nodeId, upd);
    }
    return out;
  }
}

function endpointOf(s: Service, networkId: string, aliases: string[]): ServiceEndpoint {
  const vip = usesVip(s) ? (s.endpoint?.virtualIps.find((v) => v.networkId === networkId)?.addresses[0] ?? '') : '';
  return {
    serviceId: s.id,
    serviceName: s.spec?.name ?? '',
    vip,
    mode: s.spec?.endpoint?.mode ?? 0,
    ports: s.endpoint?.ports ?? [],
    aliases,
  };
}

/** A node's status addr may carry a port (a manager's HOST:PORT); the tunnel endpoint is the host. */
export function hostOf(addr: string): string {
  if (!addr.startsWith('[') && addr.indexOf(':') !== addr.lastIndexOf(':')) return addr; // bare IPv6
  const m = /^\[?([^\]]+?)\]?:\d+$/.exec(addr);
  return m ? m[1]! : addr;
}

function encode(v: NetworkView): string {
  return Buffer.from(NetworkView.encode(v).finish()).toString('base64');
}
