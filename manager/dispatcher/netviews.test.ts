/**
 * Network views on a real store: which node gets which network, and that each commit that changes a
 * peer (placed, running, healthy, stopped, failed, its node down or removed) or an endpoint updates
 * exactly the nodes holding that network.
 */
import { describe, expect, it } from 'vitest';
import { HealthState, NodeState, type Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { MemoryStore, type StoreEvent } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import { testNode, testService } from '../../testing/testutil.js';
import { newTask } from '../orchestrator/tasks.js';
import { createNetwork } from '../controlapi/networks.js';
import { NetworkSpec } from '../../gen/flotilla/v1/objects.js';
import { NetworkViews, type NodeNetworkUpdate } from './netviews.js';

async function setup() {
  const store = new MemoryStore();
  store.setProposer(new MemoryProposer(store));
  const [n1, n2, n3] = [testNode('n1'), testNode('n2'), testNode('n3')];
  n1!.status!.addr = '192.168.50.1';
  n2!.status!.addr = '192.168.50.2:4242';
  n3!.status!.addr = '192.168.50.3';
  const web = testService('web', 3);
  const db = testService('db', 1);
  db.spec!.task!.container!.healthcheck = { test: ['CMD-SHELL', 'true'], intervalMs: 1000, timeoutMs: 1000, startPeriodMs: 0, retries: 1 };
  await store.update((tx) => {
    for (const n of [n1!, n2!, n3!]) tx.create('node', n);
  });
  const a = await createNetwork(store, NetworkSpec.fromPartial({ name: 'a' }));
  const b = await createNetwork(store, NetworkSpec.fromPartial({ name: 'b' }));
  web.spec!.task!.networks = [{ target: a.id, aliases: [] }];
  db.spec!.task!.networks = [{ target: b.id, aliases: ['database'] }];
  web.endpoint = { spec: undefined, ports: [], virtualIps: [{ networkId: a.id, addresses: ['10.0.0.2/24'], aliases: [] }] };
  await store.update((tx) => {
    tx.create('service', web);
    tx.create('service', db);
  });
  const task = (svc: typeof web, slot: number, nodeId: string, addr: string, netId: string): Task => ({
    ...newTask(svc, slot, nodeId),
    networks: [{ networkId: netId, addresses: [addr], aliases: [] }],
    status: { ...newTask(svc, slot).status!, state: TaskState.TASK_STATE_ASSIGNED },
  });
  const t1 = task(web, 1, n1!.id, '10.0.0.3/24', a.id);
  const t2 = task(web, 2, n1!.id, '10.0.0.4/24', a.id);
  const t3 = task(web, 3, n2!.id, '10.0.0.5/24', a.id);
  const d1 = task(db, 1, n3!.id, '10.0.1.2/24', b.id);
  await store.update((tx) => {
    for (const t of [t1, t2, t3, d1]) tx.create('task', t);
  });
  const views = new NetworkViews(store);
  const nodes = [n1!.id, n2!.id, n3!.id];
  // the dispatcher's wiring: one apply per committed batch
  const updates: Array<Map<string, NodeNetworkUpdate>> = [];
  store.subscribe((evs: StoreEvent[]) => updates.push(views.apply(evs, nodes)));
  const setTask = async (id: string, f: (t: Task) => Task): Promise<Map<string, NodeNetworkUpdate>> => {
    updates.length = 0;
    await store.update((tx) => tx.update('task', f(tx.get('task', id)!)));
    expect(updates).toHaveLength(1);
    return updates[0]!;
  };
  const state = (st: TaskState, health = HealthState.HEALTH_STATE_NONE) => (t: Task): Task => ({ ...t, status: { ...t.status!, state: st, health } });
  return { store, views, n1: n1!, n2: n2!, n3: n3!, a, b, t1, t2, t3, d1, updates, setTask, state, nodes };
}

describe('network views', () => {
  it('gives each node the networks its tasks are on, with every peer and the service endpoints', async () => {
    const { views, n1, n2, n3, a, b } = await setup();
    const v1 = views.complete(n1.id);
    expect(v1.map((v) => v.network!.id)).toEqual([a.id]);
    expect(views.complete(n2.id).map((v) => v.network!.id)).toEqual([a.id]);
    const v3 = views.complete(n3.id);
    expect(v3.map((v) => v.network!.id)).toEqual([b.id]);
    const peers = v1[0]!.peers;
    expect(peers.map((p) => p.address).sort()).toEqual(['10.0.0.3/24', '10.0.0.4/24', '10.0.0.5/24']);
    // the tunnel endpoint is the node's host address (a port in the status addr is dropped)
    expect(peers.find((p) => p.address === '10.0.0.5/24')).toMatchObject({ nodeId: n2.id, nodeAddr: '192.168.50.2', ready: false, serviceName: 'web' });
    expect(v1[0]!.endpoints).toEqual([expect.objectContaining({ serviceName: 'web', vip: '10.0.0.2/24' })]);
    expect(v3[0]!.endpoints).toEqual([expect.objectContaining({ serviceName: 'db', vip: '', aliases: ['database'] })]);
  });

  it('sends a changed view only to the nodes on that network, once per commit, and nothing when nothing changed', async () => {
    const s = await setup();
    for (const n of s.nodes) s.views.complete(n);
    const u = await s.setTask(s.t3.id, s.state(TaskState.TASK_STATE_RUNNING));
    expect([...u.keys()].sort()).toEqual([s.n1.id, s.n2.id].sort());
    expect(u.get(s.n1.id)!.views[0]!.peers.find((p) => p.taskId === s.t3.id)!.ready).toBe(true);
    // a status message change changes no view: no message
    const quiet = await s.setTask(s.t3.id, (t) => ({ ...t, status: { ...t.status!, message: 'still running' } }));
    expect(quiet.size).toBe(0);
  });

  it('a health check gates ready; turning unhealthy, stopping or failing leaves the views; the last task gone removes the network', async () => {
    const s = await setup();
    for (const n of s.nodes) s.views.complete(n);
    const peerOf = (u: Map<string, NodeNetworkUpdate>, node: string, task: string) => u.get(node)?.views[0]?.peers.find((p) => p.taskId === task);
    // db has a health check: running is not enough (its peer stays not ready: the view is unchanged, nothing is sent)
    expect((await s.setTask(s.d1.id, s.state(TaskState.TASK_STATE_RUNNING, HealthState.HEALTH_STATE_STARTING))).has(s.n3.id)).toBe(false);
    expect(peerOf(await s.setTask(s.d1.id, s.state(TaskState.TASK_STATE_RUNNING, HealthState.HEALTH_STATE_HEALTHY)), s.n3.id, s.d1.id)?.ready).toBe(true);
    expect(peerOf(await s.setTask(s.d1.id, s.state(TaskState.TASK_STATE_RUNNING, HealthState.HEALTH_STATE_UNHEALTHY)), s.n3.id, s.d1.id)?.ready).toBe(false);
    // scale down: t2 (on n1) is told to stop: not ready at once (it drains), though still a peer
    await s.setTask(s.t2.id, s.state(TaskState.TASK_STATE_RUNNING));
    const told = await s.setTask(s.t2.id, (t) => ({ ...t, desiredState: TaskState.TASK_STATE_SHUTDOWN }));
    for (const n of [s.n1.id, s.n2.id]) expect(peerOf(told, n, s.t2.id)?.ready).toBe(false);
    // then it stops: n1 still has t1 on a, n2 sees t2 go
    const down = await s.setTask(s.t2.id, s.state(TaskState.TASK_STATE_SHUTDOWN));
    expect([...down.keys()].sort()).toEqual([s.n1.id, s.n2.id].sort());
    for (const n of [s.n1.id, s.n2.id]) expect(peerOf(down, n, s.t2.id)).toBeUndefined();
    expect(down.get(s.n1.id)!.views[0]!.peers.map((p) => p.taskId).sort()).toEqual([s.t1.id, s.t3.id].sort());
    // t3, n2's only task on a, fails: n2 is told to drop a, n1 sees the peer go
    const failed = await s.setTask(s.t3.id, s.state(TaskState.TASK_STATE_FAILED));
    expect(failed.get(s.n2.id)).toEqual({ views: [], remove: [s.a.id] });
    expect(failed.get(s.n1.id)!.views[0]!.peers.map((p) => p.taskId)).toEqual([s.t1.id]);
    expect(failed.has(s.n3.id)).toBe(false);
  });

  it('a node that goes down or is removed leaves every other node\'s views', async () => {
    const s = await setup();
    for (const n of s.nodes) s.views.complete(n);
    s.updates.length = 0;
    await s.store.update((tx) => {
      const n = tx.get('node', s.n2.id)!;
      tx.update('node', { ...n, status: { ...n.status!, state: NodeState.NODE_STATE_DOWN } });
    });
    const u = s.updates[0]!;
    expect(u.get(s.n1.id)!.views[0]!.peers.map((p) => p.nodeId)).not.toContain(s.n2.id);
    await s.store.update((tx) => {
      const n = tx.get('node', s.n2.id)!;
      tx.update('node', { ...n, status: { ...n.status!, state: NodeState.NODE_STATE_READY } });
    });
    expect(s.updates[1]!.get(s.n1.id)!.views[0]!.peers.map((p) => p.nodeId)).toContain(s.n2.id);
    await s.store.update((tx) => tx.delete('node', s.n2.id));
    expect(s.updates[2]!.get(s.n1.id)!.views[0]!.peers.map((p) => p.nodeId)).not.toContain(s.n2.id);
  });

  it('a service update (VIP, aliases) reaches the nodes on its networks', async () => {
    const s = await setup();
    for (const n of s.nodes) s.views.complete(n);
    s.updates.length = 0;
    const web = [...s.store.services.values()].find((x) => x.spec?.name === 'web')!;
    await s.store.update((tx) => {
      const w = tx.get('service', web.id)!;
      tx.update('service', { ...w, endpoint: { ...w.endpoint!, virtualIps: [{ networkId: s.a.id, addresses: ['10.0.0.9/24'], aliases: [] }] } });
    });
    const u = s.updates[0]!;
    expect([...u.keys()].sort()).toEqual([s.n1.id, s.n2.id].sort());
    expect(u.get(s.n1.id)!.views[0]!.endpoints[0]!.vip).toBe('10.0.0.9/24');
  });
});
