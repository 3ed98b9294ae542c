/**
 * One big object must not stall the cluster: the control API refuses specs over the documented
 * limits, and the orchestrators write a large-but-valid service's tasks in batches under the store's
 * batch limit, while other services keep converging.
 */
import { describe, expect, it } from 'vitest';
import { ServiceMode, ServiceSpec, StoreBatch, TaskState } from '../../gen/flotilla/v1/objects.js';
import { FlotillaError } from '../../common/errors.js';
import { createLogger } from '../../common/log.js';
import { MAX_BATCH_BYTES, MemoryStore, type Proposer } from '../store/store.js';
import { ControlApi } from '../controlapi/server.js';
import { SPEC_LIMITS } from '../controlapi/validate.js';
import type { Dispatcher } from '../dispatcher/dispatcher.js';
import { testNode, testService, testSpec } from '../../testing/testutil.js';
import { waitFor } from '../../test/helpers/procs.js';
import { ReplicatedOrchestrator } from './replicated.js';
import { TaskReaper } from './reaper.js';

const log = createLogger('test');
log.level = 'silent';

/** Applies each batch on the next turn, as MemoryProposer does, and records its encoded size. */
class MeasuringProposer implements Proposer {
  private index = 0;
  readonly sizes: number[] = [];
  constructor(private readonly store: MemoryStore) {}
  async propose(batch: StoreBatch): Promise<void> {
    this.sizes.push(StoreBatch.encode(batch).finish().length);
    await Promise.resolve();
    this.store.applyBatch(batch, ++this.index);
  }
}

function setup(): { store: MemoryStore; proposer: MeasuringProposer; api: ControlApi } {
  const store = new MemoryStore(log);
  const proposer = new MeasuringProposer(store);
  store.setProposer(proposer);
  // createService, updateService and removeService use neither the dispatcher nor the barrier
  const api = new ControlApi({ store, dispatcher: undefined as unknown as Dispatcher, leaderAddr: () => '', readBarrier: async () => {} });
  return { store, proposer, api };
}

/** A valid spec close to the limits: env just under 64 KiB, so each task is about 64 KiB. */
function bigSpec(name: string, replicas: number): ServiceSpec {
  const value = 'x'.repeat(SPEC_LIMITS.env - 100);
  return testSpec(name, replicas, {
    task: { container: { image: 'busybox:latest', args: ['sleep', '1000'], env: [`BIG=${value}`] } } as ServiceSpec['task'],
  });
}

async function refused(p: Promise<unknown>): Promise<FlotillaError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(FlotillaError);
  return err as FlotillaError;
}

const live = (store: MemoryStore, sid: string) => store.tasksOfService(sid).filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING);

describe('size limits', () => {
  it('refuses a spec over a limit with INVALID_ARGUMENT naming the field', async () => {
    const { api, store } = setup();
    const base = (): ServiceSpec =>
      ServiceSpec.fromPartial({ name: 'big', replicas: 20, mode: ServiceMode.SERVICE_MODE_REPLICATED, task: { container: { image: 'busybox:latest', args: ['sleep', '1000'] } } });
    // the case: a 1 MB environment and 20 replicas
    const cases: Array<[string, (s: ServiceSpec) => void, RegExp]> = [
      ['env', (s) => (s.task!.container!.env = [`BIG=${'x'.repeat(1024 * 1024)}`]), /^invalid env: \d+ bytes, over the limit of 65536 bytes/],
      ['args', (s) => (s.task!.container!.args = Array.from({ length: 100 }, () => 'y'.repeat(1000))), /^invalid args: /],
      ['labels', (s) => (s.labels = { note: 'z'.repeat(20_000) }), /^invalid labels: /],
      ['constraint', (s) => (s.task!.placement = { constraints: Array.from({ length: 2000 }, (_, i) => `node.labels.k${i}==v`), maxReplicasPerNode: 0, preferences: [] }), /^invalid constraint: /],
      [
        'spec',
        (s) => {
          // each part within its own limit, the whole over 128 KiB
          s.task!.container!.env = [`A=${'x'.repeat(60_000)}`];
          s.task!.container!.args = ['y'.repeat(60_000)];
          s.labels = { a: 'z'.repeat(15_000) };
        },
        /^invalid spec: \d+ bytes, over the limit of 131072 bytes/,
      ],
    ];
    for (const [field, mutate, msg] of cases) {
      const spec = base();
      mutate(spec);
      const err = await refused(api.createService({ spec , noResolveImage: true }));
      expect(err.code, field).toBe('INVALID_ARGUMENT');
      expect(err.message, field).toMatch(msg);
    }
    expect(store.services.size).toBe(0);
    // an update is held to the same limits
    const { service } = await api.createService({ spec: base() , noResolveImage: true });
    const next = base();
    next.task!.container!.env = [`BIG=${'x'.repeat(1024 * 1024)}`];
    const err = await refused(api.updateService({ serviceId: service!.id, spec: next, version: 0, rollback: '', toVersion: 0, dryRun: false, noResolveImage: true }));
    expect(err.code).toBe('INVALID_ARGUMENT');
    expect(err.message).toMatch(/^invalid env: /);
  });

  it('refuses durations out of range, naming the field', async () => {
    const { api } = setup();
    const cases: Array<[string, (s: ServiceSpec) => void]> = [
      ['restart-delay', (s) => (s.task!.restart = { condition: 0, delayMs: 9999999 * 3_600_000, maxAttempts: 0, windowMs: 0 })],
      ['stop-grace-period', (s) => (s.task!.container!.stopGracePeriodMs = 30 * 24 * 3_600_000)],
      ['update-delay', (s) => (s.update = { parallelism: 1, delayMs: 2 ** 40, failureAction: 0, monitorMs: 0, maxFailureRatio: 0, order: 0 })],
      ['rollback-monitor', (s) => (s.rollback = { parallelism: 1, delayMs: 0, failureAction: 0, monitorMs: -1, maxFailureRatio: 0, order: 0 })],
      ['health-interval', (s) => (s.task!.container!.healthcheck = { test: ['CMD', 'true'], intervalMs: 2 ** 31, timeoutMs: 0, startPeriodMs: 0, retries: 0 })],
    ];
    for (const [field, mutate] of cases) {
      const spec = ServiceSpec.fromPartial({ name: 'd', replicas: 1, mode: ServiceMode.SERVICE_MODE_REPLICATED, task: { container: { image: 'busybox:latest' } } });
      mutate(spec);
      const err = await refused(api.createService({ spec , noResolveImage: true }));
      expect(err.code, field).toBe('INVALID_ARGUMENT');
      expect(err.message, field).toMatch(new RegExp(`^invalid ${field} -?\\d+: must be between`));
    }
  });
});

describe('node labels', () => {
  it('refuses node labels over 16 KiB with INVALID_ARGUMENT naming the field', async () => {
    const { api, store } = setup();
    const n = testNode('n1');
    await store.update((tx) => tx.create('node', n));
    const err = await refused(api.updateNode({ nodeId: n.id, version: 0, force: false, spec: { ...n.spec!, labels: { big: 'x'.repeat(20_000) } } }));
    expect(err.code).toBe('INVALID_ARGUMENT');
    expect(err.message).toMatch(/^invalid label: \d+ bytes, over the limit of 16384 bytes/);
  });
});

describe('batched orchestrator writes', () => {
  it('a large-but-valid service converges in batches under the limit while another service scales', async () => {
    const { store, proposer, api } = setup();
    const ac = new AbortController();
    const repl = new ReplicatedOrchestrator(store, log);
    const reaper = new TaskReaper(store, log);
    const runs = [repl.run(ac.signal), reaper.run(ac.signal)];
    try {
      await store.update((tx) => tx.create('node', testNode('n1')));
      // created first, so a pass that gave up on it would never reach the small one
      const replicas = 100; // about 6.4 MB of tasks: over the 2 MiB batch limit and Raft's 8 MiB cap
      const { service: big } = await api.createService({ spec: bigSpec('big', replicas) , noResolveImage: true });
      const { service: small } = await api.createService({ spec: testSpec('small', 1) , noResolveImage: true });
      await waitFor('small at 1', () => live(store, small!.id).length === 1, 10_000);
      // scale the small one while the big one is (or would be) converging
      const cur = store.getService(small!.id)!;
      await api.updateService({ serviceId: small!.id, spec: { ...cur.spec!, replicas: 3 }, version: 0, rollback: '', toVersion: 0, dryRun: false, noResolveImage: true });
      await waitFor('small at 3', () => live(store, small!.id).length === 3, 10_000);
      await waitFor(`big at ${replicas}`, () => live(store, big!.id).length === replicas, 20_000);
      expect(new Set(live(store, big!.id).map((t) => t.slot)).size).toBe(replicas);
      // every proposal fitted, and the big service's tasks took several
      expect(Math.max(...proposer.sizes)).toBeLessThanOrEqual(MAX_BATCH_BYTES);
      expect(proposer.sizes.filter((s) => s > MAX_BATCH_BYTES / 2).length).toBeGreaterThanOrEqual(3);
      // removing it shuts all its tasks down, in batches too
      const before = proposer.sizes.length;
      await api.removeService(big!.id);
      expect(live(store, big!.id)).toHaveLength(0);
      expect(store.getService(big!.id)).toBeUndefined();
      expect(Math.max(...proposer.sizes.slice(before))).toBeLessThanOrEqual(MAX_BATCH_BYTES);
      expect(proposer.sizes.length - before).toBeGreaterThanOrEqual(3);
    } finally {
      ac.abort();
      await Promise.all(runs);
    }
  });

  it('refuses one transaction over the batch limit with RESOURCE_EXHAUSTED and splits it with updateBatched', async () => {
    const { store, proposer } = setup();
    const svc = testService('big', 40, { task: bigSpec('big', 40).task });
    await store.update((tx) => tx.create('service', svc));
    const { newTask } = await import('./tasks.js');
    const err = await refused(store.update((tx) => {
      for (let slot = 1; slot <= 40; slot++) tx.create('task', newTask(svc, slot));
    }));
    expect(err.code).toBe('RESOURCE_EXHAUSTED');
    expect(store.tasks.size).toBe(0);
    const before = proposer.sizes.length;
    await store.updateBatched((tx) => {
      for (let slot = 1; slot <= 40; slot++) tx.create('task', newTask(svc, slot));
    });
    expect(store.tasks.size).toBe(40);
    const sizes = proposer.sizes.slice(before);
    expect(sizes.length).toBeGreaterThanOrEqual(2);
    expect(Math.max(...sizes)).toBeLessThanOrEqual(MAX_BATCH_BYTES);
  });

  it('the reaper stops the tasks of a removed service that a removal cut short left running', async () => {
    const { store } = setup();
    const svc = testService('web', 3);
    const { newTask } = await import('./tasks.js');
    await store.update((tx) => {
      tx.create('service', svc);
      for (let slot = 1; slot <= 3; slot++) tx.create('task', newTask(svc, slot));
    });
    // only the first batch of a removal applied: the service is gone, its tasks still desired running
    await store.update((tx) => tx.delete('service', svc.id));
    expect(live(store, svc.id)).toHaveLength(3);
    const ac = new AbortController();
    const run = new TaskReaper(store, log).run(ac.signal);
    try {
      await waitFor('tasks stopped', () => live(store, svc.id).length === 0, 5_000);
    } finally {
      ac.abort();
      await run;
    }
  });
});
