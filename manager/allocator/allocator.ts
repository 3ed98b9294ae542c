/**
 * The allocator: a leader-only watch loop (like the orchestrators) that gives each service a virtual
 * IP on each of its networks (VIP endpoint mode) and each new task an address on each of its
 * networks, writing them into the store before the scheduler places the task (the scheduler leaves
 * a task whose addresses are missing pending: manager/scheduler/plan.ts).
 *
 * The store is the only truth: each pass that has work rebuilds every network's address bitmap from
 * it (gateway, the VIPs of services still on the network, the addresses of tasks not yet terminal).
 * An address is thus free again once its task is terminal or removed, a VIP once its service is
 * removed or leaves the network (or turns to dnsrr). The one thing kept across passes is a hint: where
 * each network's allocation stopped, so that the next address handed out is the one after it and a
 * just-freed address (a replaced task's) is not given again at once while neighbour caches and DNS
 * answers elsewhere may still hold it. A new leader starts after the highest address in use.
 * When a network is full the task stays pending with the reason in its status (`service ps`).
 */
import { Network, NetworkAttachment, Service, Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import type { StoreEvent } from '../store/store.js';
import { ReconcileLoop } from '../orchestrator/loop.js';
import { AddressSet } from './ipam.js';
import { exhaustedReason, holdsAddresses, networksAllocated, serviceNetworkIds, usesVip, WAITING_FOR_NETWORK } from './networks.js';

const CHUNK = 500;

export class Allocator extends ReconcileLoop {
  /** network id -> the last address handed out (a hint, see above) */
  private readonly cursors = new Map<string, number>();

  protected interested(ev: StoreEvent): boolean {
    if (ev.kind === 'commit') return false;
    if (ev.table === 'network' || ev.table === 'service') return true;
    if (ev.table !== 'task') return false;
    const t = ev.object as Task;
    const old = ev.old as Task | undefined;
    if ((t.spec?.networks.length ?? 0) === 0 && t.networks.length === 0) return false;
    if (ev.kind !== 'update') return true;
    // a task reaching a terminal state frees its addresses: a waiting task may fit now
    return (t.status?.state ?? 0) !== (old?.status?.state ?? 0) || t.desiredState !== old?.desiredState;
  }

  protected async reconcile(signal: AbortSignal): Promise<void> {
    const services = this.store.listServices();
    const tasks = this.store.listTasks();
    const networks = new Map([...this.store.networks.values()].map((n) => [n.id, n] as const));
    const waiting = tasks.filter(needsAddresses);
    const vipWork = services.filter((s) => !sameVips(s, wantedVipNets(s, networks)));
    if (waiting.length === 0 && vipWork.length === 0) return;

    // ---- the address bitmaps, from the store ----
    const sets = new Map<string, AddressSet>();
    for (const n of networks.values()) {
      if (!n.allocation?.subnet) continue;
      sets.set(n.id, new AddressSet(n.allocation.subnet, n.allocation.gateway));
    }
    for (const s of services) {
      const want = wantedVipNets(s, networks);
      for (const v of s.endpoint?.virtualIps ?? []) if (want.has(v.networkId)) for (const a of v.addresses) sets.get(v.networkId)?.take(a);
    }
    for (const t of tasks) if (holdsAddresses(t)) for (const a of t.networks) for (const ip of a.addresses) sets.get(a.networkId)?.take(ip);
    for (const [id, set] of sets) {
      const at = this.cursors.get(id) ?? set.highestInUse();
      if (at !== undefined) set.continueAfter(at);
    }
    for (const id of [...this.cursors.keys()]) if (!sets.has(id)) this.cursors.delete(id);
    const saveCursors = (): void => {
      for (const [id, set] of sets) this.cursors.set(id, set.last);
    };

    // ---- service VIPs (first: a service's VIP is taken before its tasks' addresses) ----
    const vipWrites: Array<{ id: string; vips: NetworkAttachment[] }> = [];
    for (const s of vipWork) {
      const want = wantedVipNets(s, networks);
      const kept = (s.endpoint?.virtualIps ?? []).filter((v) => want.has(v.networkId) && v.addresses.length > 0);
      const vips = [...kept];
      for (const nid of want) {
        if (kept.some((v) => v.networkId === nid)) continue;
        const addr = sets.get(nid)?.allocate();
        if (!addr) {
          this.log.warn({ service: s.spec?.name, network: networks.get(nid)?.spec?.name }, 'no free address for the service VIP');
          continue;
        }
        vips.push({ networkId: nid, addresses: [addr], aliases: [] });
      }
      vipWrites.push({ id: s.id, vips });
    }
    saveCursors();
    if (vipWrites.length > 0) {
      await this.store.updateBatched((tx) => {
        for (const w of vipWrites) {
          const s = tx.get('service', w.id);
          if (!s) continue;
          // unchanged (e.g. a VIP still cannot be had): no write, so no pass caused by our own write
          if (JSON.stringify(s.endpoint?.virtualIps ?? []) === JSON.stringify(w.vips) && (s.endpoint?.spec?.mode ?? 0) === (s.spec?.endpoint?.mode ?? 0)) continue;
          tx.update('service', {
            ...s,
            endpoint: { spec: s.spec?.endpoint, ports: s.endpoint?.ports ?? [], virtualIps: w.vips },
          });
        }
      }, signal);
    }

    // ---- task addresses ----
    waiting.sort((a, b) => (a.meta?.createdAt ?? 0) - (b.meta?.createdAt ?? 0) || a.slot - b.slot);
    const writes: Array<{ id: string; networks?: NetworkAttachment[]; reason?: string }> = [];
    for (const t of waiting) {
      const got: NetworkAttachment[] = [];
      let reason = '';
      for (const want of t.spec?.networks ?? []) {
        const n = networks.get(want.target);
        const set = sets.get(want.target);
        if (!n || !set) {
          reason = `network ${want.target} not found`;
          break;
        }
        const addr = set.allocate();
        if (!addr) {
          reason = exhaustedReason(n, set.inUse());
          break;
        }
        got.push({ networkId: n.id, addresses: [addr], aliases: want.aliases });
      }
      if (reason) {
        for (const a of got) for (const ip of a.addresses) sets.get(a.networkId)?.release(ip);
        if (t.status?.err !== reason) writes.push({ id: t.id, reason });
      } else writes.push({ id: t.id, networks: got });
    }
    saveCursors();
    for (let i = 0; i < writes.length && !signal.aborted; i += CHUNK) {
      const chunk = writes.slice(i, i + CHUNK);
      await this.store.updateBatched((tx) => {
        for (const w of chunk) {
          const t = tx.get('task', w.id);
          if (!t || !needsAddresses(t)) continue;
          if (w.networks) {
            const err = t.status?.err.startsWith('network ') || t.status?.err === WAITING_FOR_NETWORK ? '' : (t.status?.err ?? '');
            tx.update('task', { ...t, networks: w.networks, status: { ...t.status!, err } });
          } else if (w.reason) {
            tx.update('task', { ...t, status: { ...t.status!, message: 'pending network allocation', err: w.reason, timestamp: Date.now() } });
          }
        }
      }, signal);
    }
  }
}

/** A task not yet placed (pending), still wanted, without an address on every network it names. */
export function needsAddresses(t: Task): boolean {
  const st = t.status?.state ?? TaskState.TASK_STATE_NEW;
  return st <= TaskState.TASK_STATE_PENDING && t.desiredState <= TaskState.TASK_STATE_RUNNING && !networksAllocated(t);
}

/** The networks (existing and allocated) a service should have a VIP on. */
function wantedVipNets(s: Service, networks: Map<string, Network>): Set<string> {
  if (!usesVip(s)) return new Set();
  return new Set(serviceNetworkIds(s).filter((id) => !!networks.get(id)?.allocation?.subnet));
}

function sameVips(s: Service, want: Set<string>): boolean {
  const have = (s.endpoint?.virtualIps ?? []).filter((v) => v.addresses.length > 0);
  if (have.length !== want.size) return false;
  if ((s.endpoint?.spec?.mode ?? 0) !== (s.spec?.endpoint?.mode ?? 0)) return false;
  return have.every((v) => want.has(v.networkId));
}
