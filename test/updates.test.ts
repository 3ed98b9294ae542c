/**
 * Rolling updates, rollback, version history and drain, end to end: one manager and four sim agents
 * as processes, driven through the CLI. While an update runs, a sampler reads the service's tasks
 * through the control API every ~50 ms and records how many slots are being replaced at once, how
 * many are down, and whether a slot ever ran its old and new task together.
 *
 * Node n4 lacks every image whose name contains "flaky"; no node has images containing "missing".
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, waitFor } from './helpers/procs.js';
import { EtcdCluster, haveEtcd } from './helpers/etcd.js';
import { Control, hostTarget } from '../cli/client.js';
import type { GetServiceResponse, ListTasksResponse } from '../gen/flotilla/v1/control.js';
import { HealthState, TaskState, UpdateState, type Service, type Task } from '../gen/flotilla/v1/objects.js';
import { taskSpecEqual } from '../manager/controlapi/diff.js';

interface TaskJ {
  id: string;
  slot: number;
  node: string;
  image: string;
  state: string;
  desiredState: string;
  error: string;
  health: string;
  specVersion: number;
}
interface ServiceJ {
  id: string;
  name: string;
  version: number;
  image: string;
  updateStatus: { state: string; message: string; startedAt: string; completedAt: string } | null;
  spec: Record<string, unknown> & { labels: Record<string, string>; task: { container: { image: string; env: string[] } } };
  previousSpec: unknown;
}

const up = (t: Task): boolean =>
  t.status?.state === TaskState.TASK_STATE_RUNNING && (t.status.health === HealthState.HEALTH_STATE_NONE || t.status.health === HealthState.HEALTH_STATE_HEALTHY);
const active = (t: Task): boolean => t.desiredState <= TaskState.TASK_STATE_RUNNING;
const ended = (t: Task): boolean => (t.status?.state ?? 0) >= TaskState.TASK_STATE_COMPLETE;

interface Sample {
  at: number;
  service: Service;
  tasks: Task[];
}

/** What a series of samples says about an update from `from` (the old spec) to the service's spec. */
interface Observed {
  samples: number;
  /** slots being replaced at once: some task of the slot was touched and no new task is up yet */
  maxReplacing: number;
  /** slots with no task up */
  maxDown: number;
  /** the fewest tasks up (of slots 1..replicas) */
  minUp: number;
  /** a slot ran (RUNNING) its old and its new task at the same time */
  overlap: boolean;
  /** an old task was told to stop while its slot had no new task up */
  stoppedEarly: boolean;
}

/** replicas: slots 1..N of a replicated service; or the node ids of a global service */
function observe(samples: Sample[], isNew: (t: Task) => boolean, replicas: number | string[]): Observed {
  const o: Observed = { samples: samples.length, maxReplacing: 0, maxDown: 0, minUp: Infinity, overlap: false, stoppedEarly: false };
  const keys = typeof replicas === 'number' ? Array.from({ length: replicas }, (_, i) => String(i + 1)) : replicas;
  for (const s of samples) {
    const slots = new Map<string, Task[]>();
    for (const t of s.tasks) {
      const key = t.slot > 0 ? String(t.slot) : t.nodeId;
      if (!keys.includes(key)) continue;
      const l = slots.get(key) ?? [];
      l.push(t);
      slots.set(key, l);
    }
    let replacing = 0;
    let down = 0;
    let nUp = 0;
    for (const key of keys) {
      const l = slots.get(key) ?? [];
      const fresh = l.filter(isNew);
      const old = l.filter((t) => !isNew(t));
      const freshUp = fresh.some(up);
      const touched = fresh.some((t) => active(t) || ended(t)) || old.some((t) => !active(t) && !ended(t));
      if (touched && !freshUp) replacing++;
      if (!l.some((t) => up(t))) down++;
      if (l.some((t) => up(t) && active(t))) nUp++;
      if (old.some((t) => t.status?.state === TaskState.TASK_STATE_RUNNING) && fresh.some((t) => t.status?.state === TaskState.TASK_STATE_RUNNING)) o.overlap = true;
      if (old.some((t) => !active(t) && !ended(t)) && !freshUp) o.stoppedEarly = true;
    }
    o.maxReplacing = Math.max(o.maxReplacing, replacing);
    o.maxDown = Math.max(o.maxDown, down);
    o.minUp = Math.min(o.minUp, nUp);
  }
  return o;
}

/** Reads the service and its tasks every ~50 ms until stopped. */
function sampler(control: Control, service: string): { stop: () => Promise<Sample[]> } {
  const samples: Sample[] = [];
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      const { service: s } = await control.call<unknown, GetServiceResponse>('getService', { serviceId: service });
      const { tasks } = await control.call<unknown, ListTasksResponse>('listTasks', { serviceId: s!.id, nodeId: '', desiredRunning: false });
      samples.push({ at: Date.now(), service: s!, tasks });
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
      return samples;
    },
  };
}

// the core cases run against both stores (our Raft, and three real etcd members with client TLS);
// the rest against Raft only, to keep the suite's run time in budget
for (const store of ['raft', 'etcd'] as const)
describe.skipIf(!builtCli() || (store === 'etcd' && !haveEtcd()))(`rolling updates, rollback, history and drain (manager + 4 sim agents, ${store} store)`, () => {
  const c = new TestCluster('flotilla-upd-');
  const etcd = store === 'etcd' ? new EtcdCluster() : undefined;
  const storeFlags = (): string[] => (etcd ? [...etcd.managerFlags('/flotilla/upd'), '--etcd-lease-ttl', '2'] : []);
  /** a case beyond the core: Raft only */
  const more = store === 'raft' ? it : it.skip;
  let control: Control;
  const flotilla = (...args: string[]) => cli(args, c.env);
  const inspect = async (svc: string) => (await cliJson<ServiceJ[]>(['service', 'inspect', svc], c.env))[0]!;
  const ps = (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);
  const tasksOf = async (svc: string): Promise<{ service: Service; tasks: Task[] }> => {
    const { service } = await control.call<unknown, GetServiceResponse>('getService', { serviceId: svc });
    const { tasks } = await control.call<unknown, ListTasksResponse>('listTasks', { serviceId: service!.id, nodeId: '', desiredRunning: false });
    return { service: service!, tasks };
  };
  /** runs a CLI command while sampling the service; returns the result and what was observed */
  const during = async (svc: string, args: string[]) => {
    const { service: before } = await tasksOf(svc);
    const smp = sampler(control, svc);
    const r = await flotilla(...args);
    const samples = await smp.stop();
    return { r, samples, before };
  };
  const create = async (name: string, replicas: number, extra: string[] = []) => {
    const r = await flotilla('service', 'create', '--name', name, '--replicas', String(replicas), ...extra, 'busybox:1', 'sleep', '1000');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await waitFor(`${name}: ${replicas} tasks up`, async () => (await tasksOf(name)).tasks.filter((t) => active(t) && up(t)).length === replicas);
  };

  beforeAll(async () => {
    await etcd?.start(3);
    await c.startManager({ extra: storeFlags() });
    for (const h of ['n1', 'n2', 'n3', 'n4'])
      await c.startAgent(h, { env: { FLOTILLA_SIM_MISSING_IMAGES: h === 'n4' ? 'missing,flaky' : 'missing' } });
    control = new Control(hostTarget(c.env.FLOTILLA_HOST));
    await waitFor('4 ready workers', async () => (await cliJson<Array<{ status: string; role: string }>>(['node', 'ls'], c.env)).filter((n) => n.role === 'worker' && n.status === 'ready').length === 4);
  });
  afterAll(async () => {
    const m = c.procs[0];
    if (m && m.child.exitCode !== null) console.error(`manager exited (${m.child.exitCode}):`, m.err.join('').slice(-5000));
    control?.close();
    try {
      await c.cleanup();
    } finally {
      await etcd?.stop();
    }
  });

  it("service update applies add/remove forms and the update policy; Swarm's defaults", async () => {
    const r0 = await flotilla('service', 'create', '--name', 'flags', '-e', 'A=1', '-e', 'B=2', '--constraint', 'node.hostname!=nope', '-l', 'x=1', 'busybox:1', 'sleep', '1000');
    expect(r0.code, r0.stderr).toBe(0);
    expect((await flotilla('service', 'update', '--detach', '--container-label-add', 'c=1', 'flags')).code).toBe(0);
    const s0 = await inspect('flags');
    expect((s0.spec.task.container as unknown as { labels: Record<string, string> }).labels).toEqual({ c: '1' });
    // Swarm's defaults: parallelism 1, delay 0, monitor 5 s, pause, stop-first, ratio 0 (the same for rollback)
    for (const k of ['update', 'rollback'])
      expect(s0.spec[k]).toEqual({ parallelism: 1, delayMs: 0, failureAction: 0 /* pause */, monitorMs: 5000, maxFailureRatio: 0, order: 0 /* stop-first */ });
    const r = await flotilla(
      'service', 'update', '--detach', 'flags',
      '--env-rm', 'A', '--env-add', 'B=3', '--env-add', 'C=4',
      '--constraint-rm', 'node.hostname!=nope', '--constraint-add', 'node.hostname!=other',
      '--label-rm', 'x', '--label-add', 'y=2', '--container-label-rm', 'c', '--container-label-add', 'd=2',
      '--args', 'sleep 2000', '--force',
      '--update-parallelism', '0', '--update-delay', '1s', '--update-failure-action', 'rollback', '--update-monitor', '300ms', '--update-max-failure-ratio', '0.25', '--update-order', 'start-first',
      '--rollback-parallelism', '3', '--rollback-delay', '2s', '--rollback-failure-action', 'continue', '--rollback-monitor', '1s', '--rollback-max-failure-ratio', '0.5', '--rollback-order', 'start-first',
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const s1 = await inspect('flags');
    const ct = s1.spec.task.container as unknown as { env: string[]; args: string[]; labels: Record<string, string> };
    expect(ct.env).toEqual(['B=3', 'C=4']);
    expect(ct.args).toEqual(['sleep', '2000']);
    expect(ct.labels).toEqual({ d: '2' });
    expect((s1.spec.task as unknown as { placement: { constraints: string[] } }).placement.constraints).toEqual(['node.hostname!=other']);
    expect((s1.spec.task as unknown as { forceUpdate: number }).forceUpdate).toBe(1);
    expect(s1.spec.labels).toEqual({ y: '2' });
    expect(s1.spec.update).toEqual({ parallelism: 0, delayMs: 1000, failureAction: 2 /* rollback */, monitorMs: 300, maxFailureRatio: 0.25, order: 1 /* start-first */ });
    expect(s1.spec.rollback).toEqual({ parallelism: 3, delayMs: 2000, failureAction: 1 /* continue */, monitorMs: 1000, maxFailureRatio: 0.5, order: 1 /* start-first */ });
    // bad values name the flag and change nothing
    const bads: Array<Promise<void>> = [];
    for (const [args, re] of [
      [['--update-parallelism', '-1'], /--update-parallelism/],
      [['--update-failure-action', 'explode'], /--update-failure-action.*explode/],
      [['--update-order', 'random'], /--update-order.*random/],
      [['--update-max-failure-ratio', '1.5'], /--update-max-failure-ratio.*1\.5/],
      [['--rollback-monitor', 'soon'], /--rollback-monitor/],
      [['--env-add', 'NOEQUALS'], /--env-add.*NOEQUALS/],
      [['--constraint-add', 'node.colour==red'], /node\.colour==red/],
      [['--constraint', 'node.hostname==a'], /--constraint.*--constraint-add/],
    ] as Array<[string[], RegExp]>) {
      bads.push(flotilla('service', 'update', '--detach', 'flags', ...args).then((bad) => {
        expect(bad.code, args.join(' ')).not.toBe(0);
        expect(bad.stderr, args.join(' ')).toMatch(re);
      }));
    }
    await Promise.all(bads);
    expect((await inspect('flags')).version).toBe(s1.version);
    expect((await flotilla('service', 'rm', 'flags')).code).toBe(0);
  });

  it('stop-first: never more than the parallelism replaced (or down) at once, old stops before new starts; exit 0 on completion', async () => {
    // old tasks take 300 ms to stop, so the held replacements are seen by the sampler
    await create('sf', 8, ['--update-parallelism', '2', '--update-monitor', '300ms', '--health-cmd', 'true', '--health-interval', '150ms', '-e', 'FLOTILLA_SIM_STOP_MS=300']);
    const { r, samples, before } = await during('sf', ['service', 'update', '--image', 'busybox:2', 'sf']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/update: completed/);
    const svc = await inspect('sf');
    const o = observe(samples, (t) => t.specVersion > before.specVersion, 8);
    console.log('stop-first parallelism 2:', o);
    expect(o.samples).toBeGreaterThan(5);
    expect(o.maxReplacing).toBeLessThanOrEqual(2);
    expect(o.maxReplacing).toBeGreaterThanOrEqual(1);
    expect(o.maxDown).toBeLessThanOrEqual(2);
    expect(o.overlap).toBe(false);
    expect(svc.updateStatus).toMatchObject({ state: 'completed', message: 'update completed' });
    const tasks = await ps('sf');
    const running = tasks.filter((t) => t.desiredState === 'running');
    expect(running).toHaveLength(8);
    expect(running.every((t) => t.image === 'busybox:2' && t.state === 'running' && t.health === 'healthy')).toBe(true);
    // stop-first holds the new task (desired state pending) until the old one has stopped
    const held = samples.filter((x) => x.tasks.some((t) => t.specVersion > before.specVersion && t.desiredState === TaskState.TASK_STATE_PENDING)).length;
    console.log(`stop-first: a held task seen in ${held} of ${samples.length} samples`);
    expect(held).toBeGreaterThan(0);
    const ls = await flotilla('service', 'ls');
    expect(ls.stdout).toMatch(/sf\s+replicated\s+8\/8\s+busybox:2\s+completed/);
  });

  it('start-first: the number of healthy tasks never drops below the replicas, and old tasks stop only once their replacement is up', async () => {
    await create('st', 6, ['--update-parallelism', '2', '--update-order', 'start-first', '--update-monitor', '300ms', '--health-cmd', 'true', '--health-interval', '150ms']);
    const { r, samples, before } = await during('st', ['service', 'update', '--env-add', 'V=2', 'st']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const o = observe(samples, (t) => t.specVersion > before.specVersion, 6);
    console.log('start-first parallelism 2:', o);
    expect(o.maxReplacing).toBeLessThanOrEqual(2);
    expect(o.maxReplacing).toBeGreaterThanOrEqual(1);
    expect(o.minUp).toBe(6);
    expect(o.maxDown).toBe(0);
    expect(o.stoppedEarly).toBe(false);
    expect(o.overlap).toBe(true);
  });

  more('parallelism 0 replaces every task at once', async () => {
    await create('all', 6, ['--update-parallelism', '0', '--update-monitor', '300ms', '--health-cmd', 'true', '--health-interval', '300ms']);
    const { r, samples, before } = await during('all', ['service', 'update', '--force', 'all']);
    expect(r.code).toBe(0);
    const o = observe(samples, (t) => t.specVersion > before.specVersion, 6);
    console.log('parallelism 0:', o);
    expect(o.maxReplacing).toBe(6);
  });

  it('a bad image pauses the update (exit 1, saying which task and why); paused shows in ls and inspect', async () => {
    await create('bad', 4, ['--update-monitor', '300ms', '--rollback-monitor', '300ms']);
    const r = await flotilla('service', 'update', '--image', 'busybox:missing', 'bad');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/update paused: task \w+ was rejected: image "busybox:missing" not found/);
    const svc = await inspect('bad');
    expect(svc.updateStatus!.state).toBe('paused');
    expect(svc.updateStatus!.message).toMatch(/not found/);
    expect((await flotilla('service', 'ls')).stdout).toMatch(/bad\s+replicated\s+\d\/4\s+busybox:missing\s+paused/);
    // paused: no further slot is touched (stop-first, parallelism 1: one slot down at most)
    await new Promise((res) => setTimeout(res, 500));
    const { tasks } = await tasksOf('bad');
    expect(tasks.filter((t) => active(t) && up(t) && t.spec?.container?.image === 'busybox:1').length).toBeGreaterThanOrEqual(3);
    // a rollback from paused brings back the previous spec and completes: exit 0
    const rb = await flotilla('service', 'rollback', 'bad');
    expect(rb.stderr).toBe('');
    expect(rb.code).toBe(0);
    expect(rb.stdout).toMatch(/rollback: rollback completed/);
    expect((await inspect('bad')).updateStatus!.state).toBe('rollback_completed');
    const after = (await ps('bad')).filter((t) => t.desiredState === 'running');
    expect(after.map((t) => `${t.image}:${t.state}`)).toEqual(Array(4).fill('busybox:1:running'));
  });

  it('a failing health check with --update-failure-action rollback rolls back to the exact previous spec (exit 1)', async () => {
    await create('hb', 4, ['--update-parallelism', '2', '--update-monitor', '300ms', '--health-cmd', 'true', '--health-interval', '100ms', '--health-retries', '1']);
    const before = await inspect('hb');
    const r = await flotilla('service', 'update', '--env-add', 'FLOTILLA_SIM_EXEC_EXIT_CODE=1', '--update-failure-action', 'rollback', '--rollback-monitor', '300ms', 'hb');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/update rolled back: .*task \w+ failed: task: container unhealthy/);
    const after = await inspect('hb');
    expect(after.updateStatus!.state).toBe('rollback_completed');
    expect(after.spec).toEqual(before.spec);
    expect(after.version).toBe(before.version + 2);
    const tasks = (await ps('hb')).filter((t) => t.desiredState === 'running');
    expect(tasks).toHaveLength(4);
    expect(tasks.every((t) => t.health === 'healthy' && t.state === 'running')).toBe(true);
    const { service, tasks: raw } = await tasksOf('hb');
    expect(raw.filter(active).every((t) => taskSpecEqual(t.spec, service.spec!.task))).toBe(true);
    // the rollback followed the --rollback-* policy given with the update it undid (monitor 300ms, not 5s)
    expect(Date.parse(after.updateStatus!.completedAt) - Date.parse(after.updateStatus!.startedAt)).toBeLessThan(4000);
    // a later scale is not an update: it converges and exits 0 although the last update was rolled back
    const scale = await flotilla('service', 'update', '--replicas', '5', 'hb');
    expect(scale.stderr).toBe('');
    expect(scale.code).toBe(0);
    expect((await inspect('hb')).updateStatus!.state).toBe('rollback_completed');
  });

  more('the max failure ratio: 1 failed of 4 pauses an update allowing 0.2, not one allowing 0.3; continue ignores failures', async () => {
    // global services (one task per node, no restarts): n4 lacks "flaky" images, so exactly 1 of 4 new tasks is rejected
    const opts = ['--mode', 'global', '--restart-condition', 'none', '--update-parallelism', '0', '--update-monitor', '300ms'];
    const created = await Promise.all(['r20', 'r30', 'rc'].map((name) => flotilla('service', 'create', '--name', name, ...opts, 'busybox:1', 'sleep', '1000')));
    for (const r of created) expect(r.code, r.stderr).toBe(0);
    const [a, b, d] = await Promise.all([
      flotilla('service', 'update', '--image', 'busybox:flaky', '--update-max-failure-ratio', '0.2', 'r20'),
      flotilla('service', 'update', '--image', 'busybox:flaky', '--update-max-failure-ratio', '0.3', 'r30'),
      flotilla('service', 'update', '--image', 'busybox:flaky', '--update-failure-action', 'continue', 'rc'),
    ]);
    expect(a.code).toBe(1);
    expect(a.stderr).toMatch(/update paused: .*was rejected: .*not found on node n4/);
    expect(b.stderr).toBe('');
    expect(b.code).toBe(0);
    expect(d.stderr).toBe('');
    expect(d.code).toBe(0);
    expect((await inspect('r20')).updateStatus!.state).toBe('paused');
    expect((await inspect('r30')).updateStatus!.state).toBe('completed');
    expect((await inspect('rc')).updateStatus!.state).toBe('completed');
    for (const svc of ['r30', 'rc']) {
      const ts = await ps(svc);
      expect(ts.filter((t) => t.state === 'rejected').map((t) => `${t.image}@${t.node}`)).toEqual(['busybox:flaky@n4']);
      expect(ts.filter((t) => t.state === 'running' && t.desiredState === 'running' && t.image === 'busybox:flaky').map((t) => t.node).sort()).toEqual(['n1', 'n2', 'n3']);
    }
    expect((await flotilla('service', 'rm', 'r20', 'r30', 'rc')).code).toBe(0);
  });

  more('a task failing after the monitor window but before the update completes still fails the update', async () => {
    await create('late', 4, ['--update-monitor', '300ms', '--update-delay', '400ms']);
    const t0 = Date.now();
    const r = await flotilla('service', 'update', '--env-add', 'FLOTILLA_SIM_EXIT_CODE=3', '--env-add', 'FLOTILLA_SIM_EXIT_AFTER_MS=1200', 'late');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/update paused: task \w+ failed/);
    const { tasks } = await tasksOf('late');
    const failed = tasks.filter((t) => t.status?.state === TaskState.TASK_STATE_FAILED);
    expect(failed.length).toBeGreaterThanOrEqual(1);
    // it ran well past the monitor window before failing
    const f = failed[0]!;
    expect(f.status!.exitCode).toBe(3);
    expect(f.status!.timestamp - f.meta!.createdAt).toBeGreaterThan(1000);
    expect(Date.now() - t0).toBeGreaterThan(1200);
    expect((await inspect('late')).updateStatus!.state).toBe('paused');
  });

  it('history keeps versions with what changed; rollback and --to-version restore specs exactly; dry run changes nothing', async () => {
    await create('h', 2, ['--update-monitor', '200ms', '--update-parallelism', '0', '--rollback-monitor', '200ms', '--rollback-parallelism', '0']);
    const v1 = await inspect('h');
    expect((await flotilla('service', 'update', '--image', 'busybox:2', 'h')).code).toBe(0);
    const v2 = await inspect('h');
    expect((await flotilla('service', 'update', '--env-add', 'A=1', '--label-add', 'team=x', 'h')).code).toBe(0);
    const v3 = await inspect('h');
    expect(v3.version).toBe(3);
    const hist = await cliJson<Array<{ version: number; current: boolean; image: string; changes: string[] }>>(['service', 'history', 'h'], c.env);
    expect(hist.map((x) => x.version)).toEqual([1, 2, 3]);
    expect(hist[2]!.current).toBe(true);
    expect(hist[1]!.changes).toContain('~ task.container.image: "busybox:1" -> "busybox:2"');
    expect(hist[2]!.changes).toEqual(expect.arrayContaining(['~ task.container.env: [] -> ["A=1"]', '+ labels.team: "x"']));
    expect((await flotilla('service', 'history', 'h')).stdout).toMatch(/3 \(current\)/);

    // dry run: prints the diff and the tasks that would be replaced, changes nothing
    const tasksBefore = (await tasksOf('h')).tasks.map((t) => `${t.id}:${t.desiredState}`).sort();
    const dry = await flotilla('service', 'update', '--dry-run', '--image', 'busybox:9', '--env-rm', 'A', 'h');
    expect(dry.code).toBe(0);
    expect(dry.stdout).toMatch(/Dry run: nothing was changed/);
    expect(dry.stdout).toMatch(/task\.container\.image: "busybox:2" -> "busybox:9"/);
    const running = (await ps('h')).filter((t) => t.desiredState === 'running').map((t) => t.id);
    expect(dry.stdout).toMatch(/Tasks that would be replaced \(2\)/);
    for (const id of running) expect(dry.stdout).toContain(id);
    const dryRb = await flotilla('service', 'rollback', '--dry-run', 'h');
    expect(dryRb.code).toBe(0);
    expect(dryRb.stdout).toMatch(/- labels\.team: "x"/);
    await new Promise((res) => setTimeout(res, 300));
    const same = await inspect('h');
    expect(same.version).toBe(3);
    expect(same.spec).toEqual(v3.spec);
    expect(same.updateStatus).toEqual(v3.updateStatus);
    expect((await tasksOf('h')).tasks.map((t) => `${t.id}:${t.desiredState}`).sort()).toEqual(tasksBefore);

    // rollback: back to v2's spec exactly
    const rb = await flotilla('service', 'rollback', 'h');
    expect(rb.code).toBe(0);
    const r1 = await inspect('h');
    expect(r1.spec).toEqual(v2.spec);
    expect(r1.version).toBe(4);
    // --to-version 1: v1's spec exactly, and its tasks run it
    const rb1 = await flotilla('service', 'rollback', '--to-version', '1', 'h');
    expect(rb1.stderr).toBe('');
    expect(rb1.code).toBe(0);
    const r2 = await inspect('h');
    expect(r2.spec).toEqual(v1.spec);
    expect(r2.updateStatus!.message).toMatch(/rollback/);
    expect((await ps('h')).filter((t) => t.desiredState === 'running').every((t) => t.image === 'busybox:1' && t.state === 'running')).toBe(true);
    // a version not kept
    const bad = await flotilla('service', 'rollback', '--to-version', '99', 'h');
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/to-version.*99.*not kept/);
    // the history is capped at 10 versions
    for (let i = 0; i < 6; i++) {
      const { service: cur } = await tasksOf('h');
      const spec = { ...cur.spec!, labels: { ...cur.spec!.labels, n: String(i) } };
      await control.call('updateService', { serviceId: cur.id, version: cur.specVersion, spec, rollback: '', toVersion: 0, dryRun: false });
    }
    const capped = await cliJson<Array<{ version: number }>>(['service', 'history', 'h'], c.env);
    expect(capped.map((x) => x.version)).toEqual([2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
  });

  more('a rollback that fails pauses (rollback_paused) and `service rollback` exits 1', async () => {
    await create('rp', 2, ['--update-monitor', '200ms', '--rollback-monitor', '200ms']);
    // v2: a missing image (the update pauses), v3: a good one
    expect((await flotilla('service', 'update', '--image', 'busybox:missing', 'rp')).code).toBe(1);
    expect((await flotilla('service', 'update', '--image', 'busybox:3', 'rp')).code).toBe(0);
    const r = await flotilla('service', 'rollback', '--to-version', '2', 'rp');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/rollback paused: task \w+ was rejected/);
    expect((await inspect('rp')).updateStatus!.state).toBe('rollback_paused');
  });

  more('draining a node never leaves a start-first service short of healthy tasks', async () => {
    await create('dr', 3, ['--update-order', 'start-first', '--update-monitor', '200ms', '--health-cmd', 'true', '--health-interval', '150ms', '--replicas-max-per-node', '1']);
    const { tasks } = await tasksOf('dr');
    const nodes = await cliJson<Array<{ id: string; hostname: string }>>(['node', 'ls'], c.env);
    const victim = nodes.find((n) => n.id === tasks.find((t) => active(t))!.nodeId)!.hostname;
    const smp = sampler(control, 'dr');
    expect((await flotilla('node', 'update', '--availability', 'drain', victim)).code).toBe(0);
    try {
      await waitFor('tasks off the drained node', async () => {
        const now = await ps('dr');
        return now.every((t) => t.node !== victim || t.state === 'shutdown') && now.filter((t) => t.desiredState === 'running' && t.health === 'healthy').length === 3;
      });
    } finally {
      const samples = await smp.stop();
      const o = observe(samples, (t) => t.nodeId !== nodes.find((n) => n.hostname === victim)!.id, 3);
      console.log('drain, start-first:', o);
      expect(o.minUp).toBe(3);
      expect(o.overlap).toBe(true);
      expect((await flotilla('node', 'update', '--availability', 'active', victim)).code).toBe(0);
    }
  });

  more('global services: the parallelism holds per node, and a drained node just loses its task', async () => {
    const r0 = await flotilla('service', 'create', '--name', 'g', '--mode', 'global', '--update-monitor', '200ms', '--health-cmd', 'true', '--health-interval', '150ms', 'busybox:1', 'sleep', '1000');
    expect(r0.code, r0.stderr).toBe(0);
    const nodes = (await cliJson<Array<{ id: string; hostname: string; role: string }>>(['node', 'ls'], c.env)).filter((n) => n.role === 'worker');
    await waitFor('g up on 4 nodes', async () => (await tasksOf('g')).tasks.filter((t) => active(t) && up(t)).length === 4);
    const { r, samples, before } = await during('g', ['service', 'update', '--env-add', 'V=2', 'g']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const o = observe(samples, (t) => t.specVersion > before.specVersion, nodes.map((n) => n.id));
    console.log('global, parallelism 1:', o);
    expect(o.maxReplacing).toBe(1);
    expect(o.maxDown).toBeLessThanOrEqual(1);
    // start-first on a global service: each node keeps its old task until the new one is up
    const sf = await during('g', ['service', 'update', '--env-add', 'V=3', '--update-order', 'start-first', '--update-parallelism', '2', 'g']);
    expect(sf.r.stderr).toBe('');
    expect(sf.r.code).toBe(0);
    const o2 = observe(sf.samples, (t) => t.specVersion > sf.before.specVersion, nodes.map((n) => n.id));
    console.log('global, start-first, parallelism 2:', o2);
    expect(o2.maxReplacing).toBeLessThanOrEqual(2);
    expect(o2.stoppedEarly).toBe(false);
    expect(o2.minUp).toBe(4);
    // drain n2: its task stops and no replacement lands on it
    const n2 = nodes.find((n) => n.hostname === 'n2')!.id;
    const t0 = Date.now();
    expect((await flotilla('node', 'update', '--availability', 'drain', 'n2')).code).toBe(0);
    await waitFor('g off n2', async () => (await tasksOf('g')).tasks.filter((t) => t.nodeId === n2 && !ended(t)).length === 0);
    await new Promise((res) => setTimeout(res, 500));
    const { tasks } = await tasksOf('g');
    expect(tasks.filter((t) => t.nodeId === n2 && (t.meta?.createdAt ?? 0) >= t0)).toEqual([]);
    expect(tasks.filter((t) => active(t) && up(t)).map((t) => t.nodeId).sort()).toEqual(nodes.filter((n) => n.id !== n2).map((n) => n.id).sort());
    expect((await flotilla('node', 'update', '--availability', 'active', 'n2')).code).toBe(0);
    await waitFor('g back on n2', async () => (await tasksOf('g')).tasks.some((t) => t.nodeId === n2 && active(t) && up(t)));
    expect((await flotilla('service', 'rm', 'g')).code).toBe(0);
  });

  more('a paused update resumes with the next `service update` once the cause is fixed', async () => {
    for (const n of ['n3', 'n4']) expect((await flotilla('node', 'update', '--label-add', 'pool=a', n)).code).toBe(0);
    await create('res', 2, ['--constraint', 'node.labels.pool==a', '--replicas-max-per-node', '1', '--restart-delay', '200ms', '--update-monitor', '200ms']);
    // n4 lacks "flaky" images: the update pauses when it reaches the slot on n4
    const u = await flotilla('service', 'update', '--image', 'busybox:flaky', 'res');
    expect(u.code).toBe(1);
    expect(u.stderr).toMatch(/update paused: .*not found on node n4/);
    // the fix: the pool moves from n4 to n2; the paused update stays paused
    expect((await flotilla('node', 'update', '--label-rm', 'pool', 'n4')).code).toBe(0);
    expect((await flotilla('node', 'update', '--label-add', 'pool=a', 'n2')).code).toBe(0);
    await new Promise((res) => setTimeout(res, 300));
    expect((await inspect('res')).updateStatus!.state).toBe('paused');
    // `service update` without changes resumes it, and it completes
    const again = await flotilla('service', 'update', 'res');
    expect(again.stderr).toBe('');
    expect(again.code).toBe(0);
    expect((await inspect('res')).updateStatus!.state).toBe('completed');
    const run = (await ps('res')).filter((t) => t.desiredState === 'running');
    expect(run.map((t) => `${t.image}@${t.state}`)).toEqual(['busybox:flaky@running', 'busybox:flaky@running']);
    expect(run.map((t) => t.node).sort()).toEqual(['n2', 'n3']);
    for (const n of ['n2', 'n3']) expect((await flotilla('node', 'update', '--label-rm', 'pool', n)).code).toBe(0);
    expect((await flotilla('service', 'rm', 'res')).code).toBe(0);
  });

  it('a manager killed in the middle of an update carries on where it stopped after a restart', async () => {
    await create('mid', 6, ['--update-monitor', '200ms', '--update-delay', '300ms']);
    const { service: before } = await tasksOf('mid');
    expect((await flotilla('service', 'update', '--detach', '--image', 'busybox:2', 'mid')).code).toBe(0);
    await waitFor('two slots replaced', async () => (await tasksOf('mid')).tasks.filter((t) => t.specVersion > before.specVersion && up(t)).length >= 2, 20_000, 50);
    const mid = await tasksOf('mid');
    expect(mid.service.updateStatus?.state).toBe(UpdateState.UPDATE_STATE_UPDATING);
    expect(mid.tasks.filter((t) => t.specVersion === before.specVersion && active(t)).length).toBeGreaterThan(0);
    const m = c.procs[0]!;
    await c.kill(m, 'SIGKILL');
    c.procs.splice(0, 1);
    control.close();
    await c.startManager({ extra: storeFlags() });
    control = new Control(hostTarget(c.env.FLOTILLA_HOST));
    await waitFor(
      'the update completed',
      async () => (await inspect('mid')).updateStatus?.state === 'completed',
      30_000,
    );
    const tasks = (await ps('mid')).filter((t) => t.desiredState === 'running');
    expect(tasks.map((t) => `${t.image}@${t.state}`)).toEqual(Array(6).fill('busybox:2@running'));
  });
});
