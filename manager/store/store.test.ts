import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { MemoryStore, StoreEvent } from './store.js';
import { MemoryProposer } from './memory-proposer.js';
import { LocalProposer } from './local-proposer.js';
import { newTask } from '../orchestrator/tasks.js';
import { testService } from '../testutil.js';

const dirs: string[] = [];
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-store-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

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
        const s = tx.get<typeof svc>('service', svc.id)!;
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

describe('LocalProposer', () => {
  it('comes back with the same state after a restart, and truncates a torn tail', async () => {
    const dir = tmp();
    const s1 = new MemoryStore();
    const p1 = LocalProposer.open(dir, s1);
    s1.setProposer(p1);
    const svc = testService('web', 3);
    await s1.update((tx) => tx.create('service', svc));
    const tasks: Task[] = [1, 2, 3].map((i) => newTask(svc, i));
    await Promise.all(tasks.map((t) => s1.update((tx) => tx.create('task', t))));
    await s1.update((tx) => {
      const t = tx.get<Task>('task', tasks[0]!.id)!;
      tx.update('task', { ...t, desiredState: TaskState.TASK_STATE_SHUTDOWN });
    });
    p1.close();
    // a torn write at the end
    fs.appendFileSync(path.join(dir, 'store.log'), Buffer.from([0, 0, 1, 0, 9, 9]));
    const s2 = new MemoryStore();
    const p2 = LocalProposer.open(dir, s2);
    expect(s2.services.size).toBe(1);
    expect(s2.tasks.size).toBe(3);
    expect(s2.getTask(tasks[0]!.id)!.desiredState).toBe(TaskState.TASK_STATE_SHUTDOWN);
    // a snapshot then more writes, then reopen
    s2.setProposer(p2);
    p2.snapshot();
    await s2.update((tx) => tx.delete('task', tasks[1]!.id));
    p2.close();
    const s3 = new MemoryStore();
    LocalProposer.open(dir, s3).close();
    expect(s3.tasks.size).toBe(2);
    expect(s3.getService(svc.id)!.spec!.name).toBe('web');
  });

  it('stops with a clear error when committed data is corrupt', async () => {
    const dir = tmp();
    const s1 = new MemoryStore();
    const p1 = LocalProposer.open(dir, s1);
    s1.setProposer(p1);
    await s1.update((tx) => tx.create('service', testService('a', 1)));
    await s1.update((tx) => tx.create('service', testService('b', 1)));
    p1.close();
    const f = path.join(dir, 'store.log');
    const buf = fs.readFileSync(f);
    buf[12] = buf[12]! ^ 0xff; // inside the first record
    fs.writeFileSync(f, buf);
    expect(() => LocalProposer.open(dir, new MemoryStore())).toThrow(/corrupt/);
  });
});
