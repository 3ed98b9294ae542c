/**
 * Networks in the manager, in process on a real store: network creation (pool subnets, VNIs,
 * overlaps), the allocator (VIPs, task addresses, freeing, exhaustion, a new leader's allocator),
 * the scheduler's wait for addresses, and the control API's refusals.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { EndpointMode, RestartCondition, type ServiceSpec, type Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { createLogger } from '../../common/log.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import { testNode, testSpec } from '../../testing/testutil.js';
import { ReplicatedOrchestrator } from '../orchestrator/replicated.js';
import { SchedulerLoop } from '../scheduler/loop.js';
import { Allocator } from './allocator.js';
import { WAITING_FOR_NETWORK } from './networks.js';
import { createNetwork, removeNetwork, resolveServiceNetworks } from '../controlapi/networks.js';
import { NetworkSpec } from '../../gen/flotilla/v1/objects.js';
import { newId } from '../../common/ids.js';
import { FlotillaError } from '../../common/errors.js';

const log = createLogger('test');
log.level = 'silent';

const ctls: AbortController[] = [];
const runs: Promise<void>[] = [];
afterEach(async () => {
  for (const c of ctls.splice(0)) c.abort();
  await Promise.allSettled(runs.splice(0));
});

async function setup(pool?: { pool: string; mask: number }) {
  const store = new MemoryStore();
  store.setProposer(new MemoryProposer(store));
  const nodes = [testNode('n1'), testNode('n2')];
  await store.update((tx) => {
    for (const n of nodes) tx.create('node', n);
    tx.create('cluster', {
      id: newId(),
      meta: undefined,
      spec: { name: 'default', heartbeatPeriodMs: 5000, taskHistoryLimit: 5, serviceHistoryLimit: 10, defaultAddrPool: pool?.pool ?? '', defaultAddrPoolMaskLength: pool?.mask ?? 0, autolock: false },
      tokens: { worker: 'w', manager: 'm' },
      unlockKey: '',
      ca: undefined,
    });
  });
  return { store, nodes };
}

/** Starts leader loops; each returns its own controller so a test can stop one (a leader change). */
function start(...loops: Array<{ run(signal: AbortSignal): Promise<void> }>): AbortController {
  const ctl = new AbortController();
  ctls.push(ctl);
  for (const l of loops) runs.push(l.run(ctl.signal));
  return ctl;
}

const net = (name: string, over: Partial<NetworkSpec> = {}) => NetworkSpec.fromPartial({ name, ...over });

async function addService(store: MemoryStore, name: string, replicas: number, networks: string[], over: Partial<ServiceSpec> = {}): Promise<string> {
  const spec = resolveServiceNetworks(store, testSpec(name, replicas, over));
  spec.task!.networks = networks.length ? resolveServiceNetworks(store, { ...spec, task: { ...spec.task!, networks: networks.map((target) => ({ target, aliases: [] })) } }).task!.networks : [];
  spec.task!.restart = { condition: RestartCondition.RESTART_CONDITION_ANY, delayMs: 0, maxAttempts: 0, windowMs: 0 };
  const id = newId();
  await store.update((tx) =>
    tx.create('service', { id, meta: undefined, spec, specVersion: 1, previousSpec: undefined, updateStatus: undefined, history: [], endpoint: undefined }),
  );
  return id;
}

async function until<T>(what: string, fn: () => T | undefined | false, ms = 5000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** What agents would do: report assigned tasks running. */
async function runAssigned(store: MemoryStore): Promise<void> {
  await store.update((tx) => {
    for (const t0 of store.listTasks()) {
      const t = tx.get('task', t0.id)!;
      if (t.status?.state === TaskState.TASK_STATE_ASSIGNED)
        tx.update('task', { ...t, status: { ...t.status, state: TaskState.TASK_STATE_RUNNING, timestamp: Date.now() } });
    }
  });
}

const live = (store: MemoryStore, sid: string): Task[] => store.tasksOfService(sid).filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING);
const addrOf = (t: Task): string => t.networks[0]?.addresses[0] ?? '';

describe('network creation (IPAM in the store)', () => {
  it('takes subnets from the default pool, VNIs from 4096, the first address as gateway', async () => {
    const { store } = await setup();
    const a = await createNetwork(store, net('a'));
    const b = await createNetwork(store, net('b', { driverOpts: { mtu: '1400' } }));
    expect(a.allocation).toEqual({ subnet: '10.0.0.0/24', gateway: '10.0.0.1', vni: 4096, mtu: 0 });
    expect(b.allocation).toEqual({ subnet: '10.0.1.0/24', gateway: '10.0.1.1', vni: 4097, mtu: 1400 });
    // a user's subnet and gateway; the pool then skips it
    const c = await createNetwork(store, net('c', { ipam: { subnet: '10.0.2.0/23', gateway: '10.0.3.254' } }));
    expect(c.allocation).toMatchObject({ subnet: '10.0.2.0/23', gateway: '10.0.3.254', vni: 4098 });
    expect((await createNetwork(store, net('d'))).allocation?.subnet).toBe('10.0.4.0/24');
    // a freed VNI and subnet are taken again
    await removeNetwork(store, 'a');
    expect((await createNetwork(store, net('e'))).allocation).toMatchObject({ subnet: '10.0.0.0/24', vni: 4096 });
  });

  it('refuses an overlapping subnet naming the network that holds it, and bad specs with one line', async () => {
    const { store } = await setup();
    await createNetwork(store, net('back', { ipam: { subnet: '10.1.0.0/16', gateway: '' } }));
    await expect(createNetwork(store, net('front', { ipam: { subnet: '10.1.128.0/24', gateway: '' } }))).rejects.toThrow(
      'subnet 10.1.128.0/24 overlaps subnet 10.1.0.0/16 of network back',
    );
    await expect(createNetwork(store, net('wide', { ipam: { subnet: '10.0.0.0/8', gateway: '' } }))).rejects.toThrow(/overlaps subnet 10.1.0.0\/16 of network back/);
    await expect(createNetwork(store, net('back'))).rejects.toThrow('network "back" already exists');
    await expect(createNetwork(store, net('bad name'))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^invalid name "bad name"/) as unknown });
    await expect(createNetwork(store, net('host'))).rejects.toThrow(/invalid name "host": is reserved/);
    await expect(createNetwork(store, net('x', { driver: 'bridge' }))).rejects.toThrow('invalid --driver "bridge": only overlay is supported');
    await expect(createNetwork(store, net('x', { driverOpts: { mtu: '70000' } }))).rejects.toThrow(/invalid --opt mtu "70000"/);
    await expect(createNetwork(store, net('x', { ipam: { subnet: '10.9.0.0/24', gateway: '10.8.0.1' } }))).rejects.toThrow(/invalid --gateway "10.8.0.1"/);
    expect([...store.networks.values()].map((n) => n.spec?.name)).toEqual(['back']);
  });

  it('uses the cluster\'s own default pool and subnet size', async () => {
    const { store } = await setup({ pool: '172.20.0.0/16', mask: 26 });
    expect((await createNetwork(store, net('a'))).allocation?.subnet).toBe('172.20.0.0/26');
    expect((await createNetwork(store, net('b'))).allocation?.subnet).toBe('172.20.0.64/26');
  });
});

describe('allocator', () => {
  it('gives the service a VIP and each task an address before the scheduler places it', async () => {
    const { store } = await setup();
    await createNetwork(store, net('a'));
    const sid = await addService(store, 'web', 3, ['a']);
    // orchestrator and scheduler, no allocator: the tasks wait, with the reason
    const first = start(new ReplicatedOrchestrator(store, log), new SchedulerLoop(store, log));
    await until('3 tasks waiting', () => live(store, sid).length === 3 && live(store, sid).every((t) => t.status?.err === WAITING_FOR_NETWORK));
    await new Promise((r) => setTimeout(r, 100));
    expect(live(store, sid).map((t) => t.status?.state)).toEqual([TaskState.TASK_STATE_PENDING, TaskState.TASK_STATE_PENDING, TaskState.TASK_STATE_PENDING]);
    first.abort();
    // with the allocator: addresses, then placement
    const assignedWithout: string[] = [];
    const unsub = store.subscribe((evs) => {
      for (const e of evs) if (e.kind !== 'commit' && e.table === 'task' && (e.object as Task).status?.state === TaskState.TASK_STATE_ASSIGNED && (e.object as Task).networks.length === 0) assignedWithout.push((e.object as Task).id);
    });
    start(new ReplicatedOrchestrator(store, log), new SchedulerLoop(store, log), new Allocator(store, log));
    await until('3 assigned', () => live(store, sid).every((t) => t.status?.state === TaskState.TASK_STATE_ASSIGNED));
    unsub();
    expect(assignedWithout).toEqual([]);
    const vip = store.getService(sid)!.endpoint!.virtualIps;
    expect(vip).toHaveLength(1);
    const addrs = live(store, sid).map(addrOf);
    expect(new Set([...addrs, vip[0]!.addresses[0]]).size).toBe(4);
    for (const a of [...addrs, vip[0]!.addresses[0]!]) expect(a).toMatch(/^10\.0\.0\.([2-9]|\d\d+)\/24$/);
    for (const t of live(store, sid)) expect(t.status?.err).toBe('');
  });

  it('keeps a task pending with the exact reason when the network is full, and places it once an address is freed', async () => {
    const { store } = await setup();
    await createNetwork(store, net('small', { ipam: { subnet: '10.9.0.0/29', gateway: '' } }));
    // /29: 6 host addresses; gateway + VIP + 4 tasks fill it
    const sid = await addService(store, 'web', 5, ['small']);
    start(new ReplicatedOrchestrator(store, log), new SchedulerLoop(store, log), new Allocator(store, log));
    const reason = 'network small has no free address (subnet /29, 6 in use)';
    const stuck = await until('a task stuck on the full network', () => live(store, sid).find((t) => t.status?.err === reason));
    await until('4 placed', () => live(store, sid).filter((t) => t.status?.state === TaskState.TASK_STATE_ASSIGNED).length === 4);
    await runAssigned(store);
    await new Promise((r) => setTimeout(r, 100));
    expect(store.getTask(stuck.id)).toMatchObject({ status: { state: TaskState.TASK_STATE_PENDING, err: reason }, networks: [] });
    // one task fails: its address is free once it is terminal, and the waiting task takes it
    const victim = live(store, sid).find((t) => t.status?.state === TaskState.TASK_STATE_RUNNING)!;
    await store.update((tx) => {
      const t = tx.get('task', victim.id)!;
      tx.update('task', { ...t, status: { ...t.status!, state: TaskState.TASK_STATE_FAILED, err: 'exit 1' } });
    });
    await until('the stuck task placed', () => store.getTask(stuck.id)?.status?.state === TaskState.TASK_STATE_ASSIGNED);
    expect(addrOf(store.getTask(stuck.id)!)).toBe(addrOf(victim));
  });

  it('does not give a replaced task\'s address to its replacement: allocation goes on after the last address handed out', async () => {
    const { store } = await setup();
    await createNetwork(store, net('a'));
    const sid = await addService(store, 'web', 2, ['a']);
    start(new ReplicatedOrchestrator(store, log), new SchedulerLoop(store, log), new Allocator(store, log));
    await until('2 assigned', () => live(store, sid).filter((t) => t.status?.state === TaskState.TASK_STATE_ASSIGNED).length === 2);
    await runAssigned(store);
    const seen = new Set(live(store, sid).map(addrOf));
    // fail a task three times over: each replacement gets an address never handed out before
    for (let round = 0; round < 3; round++) {
      const victim = live(store, sid).find((t) => t.status?.state === TaskState.TASK_STATE_RUNNING)!;
      await store.update((tx) => {
        const t = tx.get('task', victim.id)!;
        tx.update('task', { ...t, status: { ...t.status!, state: TaskState.TASK_STATE_FAILED, err: 'exit 1' } });
      });
      const repl = await until('the replacement placed', () => live(store, sid).find((t) => t.status?.state === TaskState.TASK_STATE_ASSIGNED));
      expect(seen.has(addrOf(repl)), `replacement got ${addrOf(repl)}, already handed out: ${[...seen].join(' ')}`).toBe(false);
      seen.add(addrOf(repl));
      await runAssigned(store);
    }
  });

  it('a new leader\'s allocator rebuilds from the store: no address given twice', async () => {
    const { store } = await setup();
    await createNetwork(store, net('a'));
    const sid = await addService(store, 'web', 4, ['a']);
    const repl = new ReplicatedOrchestrator(store, log);
    const sched = new SchedulerLoop(store, log);
    const leader1 = start(new Allocator(store, log));
    start(repl, sched);
    await until('4 assigned', () => live(store, sid).filter((t) => t.status?.state === TaskState.TASK_STATE_ASSIGNED).length === 4);
    await runAssigned(store);
    leader1.abort();
    // scale up under a new allocator (a fresh object: what a new leader starts)
    start(new Allocator(store, log));
    await store.update((tx) => {
      const s = tx.get('service', sid)!;
      tx.update('service', { ...s, spec: { ...s.spec!, replicas: 8 } });
    });
    await until('8 assigned', () => live(store, sid).filter((t) => (t.status?.state ?? 0) >= TaskState.TASK_STATE_ASSIGNED).length === 8);
    const all = [...live(store, sid).map(addrOf), store.getService(sid)!.endpoint!.virtualIps[0]!.addresses[0]!];
    expect(new Set(all).size).toBe(9);
    expect(all).not.toContain('10.0.0.1/24');
  });

  it('frees a VIP when the service leaves the network or turns to dnsrr; dnsrr services get none', async () => {
    const { store } = await setup();
    await createNetwork(store, net('a'));
    await createNetwork(store, net('b'));
    const sid = await addService(store, 'web', 1, ['a', 'b']);
    const rr = await addService(store, 'rr', 1, ['a'], { endpoint: { mode: EndpointMode.ENDPOINT_MODE_DNSRR, ports: [] } });
    start(new ReplicatedOrchestrator(store, log), new SchedulerLoop(store, log), new Allocator(store, log));
    await until('2 VIPs', () => store.getService(sid)?.endpoint?.virtualIps.length === 2);
    await until('rr placed', () => live(store, rr)[0]?.status?.state === TaskState.TASK_STATE_ASSIGNED);
    expect(store.getService(rr)!.endpoint?.virtualIps ?? []).toEqual([]);
    const bId = [...store.networks.values()].find((n) => n.spec?.name === 'b')!.id;
    await store.update((tx) => {
      const s = tx.get('service', sid)!;
      tx.update('service', { ...s, spec: { ...s.spec!, task: { ...s.spec!.task!, networks: s.spec!.task!.networks.filter((n) => n.target !== bId) } } });
    });
    await until('VIP on b freed', () => store.getService(sid)?.endpoint?.virtualIps.length === 1);
    expect(store.getService(sid)!.endpoint!.virtualIps[0]!.networkId).not.toBe(bId);
    await store.update((tx) => {
      const s = tx.get('service', sid)!;
      tx.update('service', { ...s, spec: { ...s.spec!, endpoint: { mode: EndpointMode.ENDPOINT_MODE_DNSRR, ports: [] } } });
    });
    await until('no VIP in dnsrr', () => store.getService(sid)?.endpoint?.virtualIps.length === 0);
  });
});

describe('control API refusals', () => {
  it('refuses to remove a network a service uses, naming the service; unknown networks name themselves', async () => {
    const { store } = await setup();
    await createNetwork(store, net('a'));
    await addService(store, 'web', 1, ['a']);
    await addService(store, 'api', 1, ['a']);
    await expect(removeNetwork(store, 'a')).rejects.toThrow(/^network a is in use by services api, web: /);
    expect(() => resolveServiceNetworks(store, { ...testSpec('x', 1), task: { ...testSpec('x', 1).task!, networks: [{ target: 'nope', aliases: [] }] } })).toThrow(
      'invalid network "nope": no such network',
    );
    const mixed = testSpec('y', 1);
    mixed.task!.container!.networkMode = 'host';
    mixed.task!.networks = [{ target: 'a', aliases: [] }];
    try {
      resolveServiceNetworks(store, mixed);
      expect.unreachable();
    } catch (err) {
      expect((err as FlotillaError).code).toBe('INVALID_ARGUMENT');
      expect((err as Error).message).toBe('invalid network "host": --network host cannot be combined with overlay networks');
    }
    await expect(removeNetwork(store, 'nope')).rejects.toThrow('network "nope" not found');
  });
});
