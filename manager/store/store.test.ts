import { describe, expect, it } from 'vitest';
import { MAX_BATCH_BYTES, MemoryStore, StoreEvent } from './store.js';
import { StoreBatch, TaskState } from '../../gen/flotilla/v1/objects.js';
import { MemoryProposer } from './memory-proposer.js';
import { newTask } from '../orchestrator/tasks.js';
import { testService } from '../../testing/testutil.js';


describe('MemoryStore', () => {
  it('changes state only when a batch is applied, with one event per object and a commit marker', async () => {
    const store = new MemoryStore();
    store.setProposer(new MemoryProposer(store));
    const seen: StoreEvent[][] = [];
    store.subscribe((evs) => seen.push(evs));
    const svc = testService('web', 2);
    const p = store.update((tx) => {
      tx.create('service', svc);
      tx.create('task', newTask(svc, 1));
      tx.create('task', newTask(svc, 2));
    });
    expect(store.services.size).toBe(0); // not applied yet
    await p;
    expect(store.services.size).toBe(1);
    expect(store.tasks.size).toBe(2);
    expect(seen).toHaveLength(1);
    expect(seen[0]!.map((e) => e.kind)).toEqual(['create', 'create', 'create', 'commit']);
    expect(store.tasksOfService(svc.id)).toHaveLength(2);
  });

  it('rejects a stale update (optimistic concurrency) and retries the transaction on fresh state', async () => {
    const store = new MemoryStore();
    store.setProposer(new MemoryProposer(store));
    const svc = testService('web', 1);
    await store.update((tx) => tx.create('service', svc));
    const stale = store.getService(svc.id)!;
    await store.update((tx) => tx.update('service', { ...tx.get('service', svc.id)!, spec: { ...stale.spec!, replicas: 5 } }));
    // a batch carrying the old version is refused as a whole
    expect(() =>
      store.applyBatch({ proposalId: 'x', proposedAt: 0, actions: [{ kind: 1, service: { ...stale, spec: { ...stale.spec!, replicas: 9 } }, node: undefined, task: undefined, cluster: undefined, network: undefined, secret: undefined, config: undefined }] }, 99),
    ).toThrow(/out of sequence/);
    expect(store.getService(svc.id)!.spec!.replicas).toBe(5);
    // update() re-runs fn on conflict: two concurrent increments both land
    const inc = () =>
      store.update((tx) => {
        const s = tx.get('service', svc.id)!;
        tx.update('service', { ...s, spec: { ...s.spec!, replicas: s.spec!.replicas + 1 } });
      });
    await Promise.all([inc(), inc()]);
    expect(store.getService(svc.id)!.spec!.replicas).toBe(7);
  });

  it('refuses duplicate service names at apply time', async () => {
    const store = new MemoryStore();
    store.setProposer(new MemoryProposer(store));
    await store.update((tx) => tx.create('service', testService('web', 1)));
    await expect(store.update((tx) => tx.create('service', testService('web', 1)))).rejects.toThrow(/already exists/);
    expect(store.services.size).toBe(1);
  });
});


describe('MemoryStore.updateBatched', () => {
  it('splits a transaction into batches under the limit, keeping together() groups in one batch', async () => {
    const store = new MemoryStore();
    const batches: StoreBatch[] = [];
    const inner = new MemoryProposer(store);
    store.setProposer({ propose: (b) => (batches.push(b), inner.propose(b)) });
    // tasks of about 300 KiB each (a store test may exceed the API's spec limits): 6 per 2 MiB batch
    const svc = testService('web', 1);
    const fat = { ...svc.spec!.task!, container: { ...svc.spec!.task!.container!, env: [`X=${'x'.repeat(300 * 1024)}`] } };
    const big = { ...svc, spec: { ...svc.spec!, task: fat } };
    await store.update((tx) => tx.create('service', svc));
    const first = newTask(big, 1);
    await store.update((tx) => tx.create('task', first));
    batches.length = 0;
    await store.updateBatched((tx) => {
      for (let slot = 2; slot <= 12; slot++) tx.create('task', newTask(big, slot));
      // the old task's shutdown and its replacement: one group
      tx.together(() => {
        tx.update('task', { ...tx.get('task', first.id)!, desiredState: TaskState.TASK_STATE_SHUTDOWN });
        tx.create('task', newTask(big, 1));
      });
    });
    expect(store.tasks.size).toBe(13);
    expect(batches.length).toBeGreaterThanOrEqual(3);
    for (const b of batches) expect(StoreBatch.encode(b).finish().length).toBeLessThanOrEqual(MAX_BATCH_BYTES);
    const withShutdown = batches.find((b) => b.actions.some((a) => a.task?.id === first.id))!;
    expect(withShutdown.actions.filter((a) => a.task?.slot === 1)).toHaveLength(2);
  });
});

describe('MemoryStore: the encoded batch handed to the proposer', () => {
  it('is exactly StoreBatch.encode(batch), for update() and for every batch of updateBatched(), also after an action the encoder refused', async () => {
    const store = new MemoryStore();
    const inner = new MemoryProposer(store);
    const seen: Array<{ batch: StoreBatch; encoded: Uint8Array | undefined }> = [];
    store.setProposer({ propose: (batch, _signal, encoded) => (seen.push({ batch, encoded: encoded?.() }), inner.propose(batch)) });
    const svc = testService('web', 1);
    await store.update((tx) => tx.create('service', svc));
    // fat tasks (about 300 KiB each), so updateBatched needs several batches
    const fat = { ...svc, spec: { ...svc.spec!, task: { ...svc.spec!.task!, container: { ...svc.spec!.task!.container!, env: [`X=${'x'.repeat(300 * 1024)}`] } } } };
    await store.updateBatched((tx) => {
      for (let slot = 1; slot <= 12; slot++) tx.create('task', newTask(fat, slot));
    });
    // an action whose encoding fails half-way (an int32 field out of range) must not leave bytes behind
    const t99 = newTask(svc, 99);
    const bad = { ...t99, status: { ...t99.status!, exitCode: 2 ** 40 } };
    await expect(store.update((tx) => tx.create('task', bad))).rejects.toThrow();
    await store.update((tx) => {
      tx.create('task', newTask(svc, 13));
      tx.update('service', { ...tx.get('service', svc.id)!, specVersion: 2 });
    });
    // the service, two batches of six fat tasks, the last update (the refused one never reached the proposer)
    expect(seen.map((s) => s.batch.actions.length)).toEqual([1, 6, 6, 2]);
    for (const { batch, encoded } of seen) {
      expect(encoded).toBeDefined();
      expect(Buffer.from(encoded!).equals(Buffer.from(StoreBatch.encode(batch).finish()))).toBe(true);
      // and it decodes to the same batch
      expect(StoreBatch.decode(encoded!).actions.map((a) => a.task?.id ?? a.service?.id)).toEqual(batch.actions.map((a) => a.task?.id ?? a.service?.id));
    }
  });
});
