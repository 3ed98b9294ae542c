import { describe, expect, it } from 'vitest';
import { RestartCondition, Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { createLogger } from '../../common/log.js';
import { sleep } from '../../common/sleep.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import { testNode, testService } from '../../testing/testutil.js';
import { ReplicatedOrchestrator } from '../orchestrator/replicated.js';
import { FAILURES_TO_AVOID, SchedulerLoop } from './loop.js';

const log = createLogger('test');
log.level = 'silent';

describe('scheduler loop', () => {
  it('stops placing a service on a node where its tasks keep failing', async () => {
    const store = new MemoryStore();
    store.setProposer(new MemoryProposer(store));
    const good = testNode('good');
    const bad = testNode('bad');
    const other = testService('other', 2);
    const web = testService('web', 2);
    web.spec!.task!.restart = { condition: RestartCondition.RESTART_CONDITION_ANY, delayMs: 0, maxAttempts: 0, windowMs: 0 };
    await store.update((tx) => {
      tx.create('node', good);
      tx.create('node', bad);
      tx.create('service', web);
      tx.create('service', other);
    });
    const ctl = new AbortController();
    const loops = [new ReplicatedOrchestrator(store, log).run(ctl.signal), new SchedulerLoop(store, log).run(ctl.signal)];
    try {
      // the node "bad" rejects every task of web (say its image is missing there); the rest run
      const live = (sid: string): Task[] => store.tasksOfService(sid).filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING);
      const settled = (): boolean =>
        [web.id, other.id].every((sid) => live(sid).length === 2 && live(sid).every((t) => t.status?.state === TaskState.TASK_STATE_RUNNING));
      for (let i = 0; i < 500 && !settled(); i++) {
        await store.update((tx) => {
          for (const t of store.listTasks()) {
            if (t.status?.state !== TaskState.TASK_STATE_ASSIGNED) continue;
            const reject = t.nodeId === bad.id && t.serviceId === web.id;
            const state = reject ? TaskState.TASK_STATE_REJECTED : TaskState.TASK_STATE_RUNNING;
            tx.update('task', { ...t, status: { ...t.status, state, err: reject ? 'image missing' : '', timestamp: Date.now() } });
          }
        });
        await sleep(5);
      }

      expect(settled()).toBe(true);
      // web ran on "good" after exactly the failures it takes; "other" still spreads over both
      expect(live(web.id).map((t) => t.nodeId)).toEqual([good.id, good.id]);
      const rejected = store.tasksOfService(web.id).filter((t) => t.status?.state === TaskState.TASK_STATE_REJECTED);
      expect(rejected.length).toBe(FAILURES_TO_AVOID);
      expect(rejected.every((t) => t.nodeId === bad.id)).toBe(true);
      expect(new Set(live(other.id).map((t) => t.nodeId))).toEqual(new Set([good.id, bad.id]));
    } finally {
      ctl.abort();
      await Promise.all(loops);
    }
  });
});
