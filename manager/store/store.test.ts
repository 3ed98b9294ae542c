import { describe, expect, it } from 'vitest';
import { MemoryStore, StoreEvent } from './store.js';
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
      store.applyBatch({ proposalId: 'x', actions: [{ kind: 1, service: { ...stale, spec: { ...stale.spec!, replicas: 9 } }, node: undefined, task: undefined, cluster: undefined }] }, 99),
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

