/**
 * Jobs, spread preferences and "seeing the cluster" end to end: a manager with a runc agent (jobs
 * really exit) and three sim agents labelled by zone (placement). Covers `--mode replicated-job`
 * with --max-concurrent to completion and again after `service update --force`, a failing job,
 * `--placement-pref` (add/rm on update), `service ls|ps --filter`, `node ps`, `service logs` of a
 * task with --raw/--no-task-ids/--tail/--since, and `service inspect --pretty|--format`.
 */
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, isRoot, waitFor } from './helpers/procs.js';
import type { TaskJson } from '../cli/format.js';
import { importBusybox } from './helpers/busybox.js';

type TaskJ = TaskJson;

const skip = !isRoot() || !builtCli();

describe.skipIf(skip)('jobs, spread and cluster views (runc manager + 3 sim agents; needs root)', () => {
  const c = new TestCluster('flotilla-jobs-');
  const dataDir = path.join(c.root, 'm1');
  const ok = async (args: string[]): Promise<string> => {
    const r = await cli(args, c.env, 120_000);
    if (r.code !== 0) throw new Error(`flotilla ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
    return r.stdout;
  };

  beforeAll(async () => {
    await importBusybox(dataDir);
    await c.startManager({ agent: true, runtime: 'runc' });
    for (const h of ['za1', 'za2', 'zb1']) await c.startAgent(h);
    await waitFor('4 ready nodes', async () => (await cliJson<Array<{ status: string }>>(['node', 'ls', '--format', 'json'], c.env)).filter((n) => n.status === 'ready').length === 4, 30_000);
    for (const [h, z] of [
      ['za1', 'a'],
      ['za2', 'a'],
      ['zb1', 'b'],
    ] as const)
      await ok(['node', 'update', '--label-add', `zone=${z}`, h]);
  }, 120_000);
  afterAll(async () => {
    await cli(['service', 'rm', 'batch', 'broken', 'spread'], c.env);
    await waitFor('containers gone', async () => (await cliJson<TaskJ[]>(['node', 'ps', '--format', 'json'], c.env).catch(() => [])).length === 0, 30_000).catch(() => undefined);
    await c.cleanup();
  });

  it('a replicated job runs to completion, max-concurrent at a time; service ls/ps show it; --force runs it again', async () => {
    const out = await ok(['service', 'create', '--name', 'batch', '--mode', 'replicated-job', '--replicas', '4', '--max-concurrent', '2', '--constraint', 'node.hostname==m1', '--timeout', '90s', 'busybox:latest', 'sh', '-c', 'echo done-$$; sleep 0.3']);
    expect(out).toMatch(/verify: Job complete/);
    const tasks = await cliJson<TaskJ[]>(['service', 'ps', 'batch', '--format', 'json'], c.env);
    expect(tasks).toHaveLength(4);
    expect(tasks.every((t) => t.state === 'complete' && t.desiredState === 'complete' && t.exitCode === 0 && t.jobIteration === 1)).toBe(true);
    expect(new Set(tasks.map((t) => t.slot))).toEqual(new Set([1, 2, 3, 4]));
    // the table: Docker's "running/wanted (completed/total completed)"
    const ls = await ok(['service', 'ls', '--filter', 'name=bat']);
    expect(ls).toMatch(/batch\s+replicated job\s+0\/0 \(4\/4 completed\)\s+busybox:latest/);
    expect(await ok(['service', 'ls', '--filter', 'mode=replicated-job', '--format', '{{.Name}} {{.Mode}}'])).toBe('batch replicated job\n');
    expect((await ok(['service', 'ps', 'batch', '--filter', 'desired-state=complete', '-q'])).trim().split('\n').sort()).toEqual(tasks.map((t) => t.id).sort());
    expect(await ok(['service', 'ps', 'batch', '--filter', 'desired-state=running', '-q'])).toBe('');
    // service update --force: a new iteration, 4 more completions; the first run stays in the history
    expect(await ok(['service', 'update', '--force', '--timeout', '90s', 'batch'])).toMatch(/verify: Job complete/);
    const again = await cliJson<TaskJ[]>(['service', 'ps', 'batch', '--format', 'json'], c.env);
    expect(again.filter((t) => t.jobIteration === 2 && t.state === 'complete')).toHaveLength(4);
    expect(again.filter((t) => t.jobIteration === 1)).toHaveLength(4);
    // node ps (self: the manager's node runs the job) and its filters
    const self = await cliJson<TaskJ[]>(['node', 'ps', '--format', 'json', '--filter', 'service=batch'], c.env);
    expect(self).toHaveLength(8);
    expect(self.every((t) => t.node === 'm1')).toBe(true);
    expect((await cliJson<TaskJ[]>(['node', 'ps', 'm1', '--format', 'json', '--filter', 'name=batch.2'], c.env)).map((t) => t.slot)).toEqual([2, 2]);
  });

  it('a global job runs once on each eligible node', async () => {
    expect(await ok(['service', 'create', '--name', 'once', '--mode', 'global-job', '--constraint', 'node.hostname==m1', '--timeout', '60s', 'busybox:latest', 'true'])).toMatch(/verify: Job complete/);
    const tasks = await cliJson<TaskJ[]>(['service', 'ps', 'once', '--format', 'json'], c.env);
    expect(tasks.map((t) => [t.node, t.state, t.desiredState])).toEqual([['m1', 'complete', 'complete']]);
    expect(await ok(['service', 'ls', '--filter', 'mode=global-job'])).toMatch(/once\s+global job\s+0\/0 \(1\/1 completed\)/);
    const scale = await cli(['service', 'scale', 'once=3'], c.env);
    expect(scale.stderr).toMatch(/scale can only be used with replicated or replicated-job mode: once is global-job/);
    await ok(['service', 'rm', 'once']);
  });

  it('a failing job task follows the restart policy and the job reports the failure', async () => {
    const r = await cli(['service', 'create', '--name', 'broken', '--mode', 'replicated-job', '--restart-condition', 'none', '--constraint', 'node.hostname==m1', '--timeout', '60s', 'busybox:latest', 'sh', '-c', 'exit 3'], c.env, 90_000);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/job failed: 1 of 1 tasks failed for good/);
    const tasks = await cliJson<TaskJ[]>(['service', 'ps', 'broken', '--format', 'json'], c.env);
    expect(tasks).toHaveLength(1);
    expect(tasks[0]).toMatchObject({ state: 'failed', exitCode: 3 });
    expect(await ok(['service', 'ls', '--filter', 'name=broken'])).toMatch(/0\/0 \(0\/1 completed, 1 failed\)/);
  });

  it('service logs of a service and of one task, with --raw, --no-task-ids, --tail and --since', async () => {
    const all = await ok(['service', 'logs', 'batch']);
    expect((all.match(/^batch\.\d\.\w+@m1 +\| done-\d+$/gm) ?? []).length).toBe(8);
    const [t] = await cliJson<TaskJ[]>(['service', 'ps', 'batch', '--format', 'json', '--filter', 'name=batch.3'], c.env);
    const raw = await ok(['service', 'logs', '--raw', t!.id]);
    expect(raw).toMatch(/^done-\d+\n$/);
    expect(await ok(['service', 'logs', '--no-task-ids', t!.id.slice(0, 8)])).toMatch(/^batch\.3@m1 +\| done-\d+\n$/);
    expect((await ok(['service', 'logs', '--tail', '1', '--raw', 'batch'])).trim().split('\n')).toHaveLength(8); // one per task
    expect(await ok(['service', 'logs', '--since', new Date(Date.now() + 60_000).toISOString(), 'batch'])).toBe('');
    expect((await ok(['service', 'logs', '--since', '10m', '--raw', 'batch'])).trim().split('\n')).toHaveLength(8);
    const bad = await cli(['service', 'logs', 'no-such-thing'], c.env);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/no such service or task: no-such-thing/);
  });

  it('--placement-pref spread=node.labels.zone spreads over zones; --placement-pref-rm/-add change it; inspect --pretty and --format show it', async () => {
    await ok(['service', 'create', '--name', 'spread', '--replicas', '6', '--placement-pref', 'spread=node.labels.zone', '--constraint', 'node.hostname!=m1', 'busybox:latest', 'sleep', '1000']);
    const tasks = await cliJson<TaskJ[]>(['service', 'ps', 'spread', '--format', 'json', '--filter', 'desired-state=running'], c.env);
    const per: Record<string, number> = {};
    for (const t of tasks) per[t.node] = (per[t.node] ?? 0) + 1;
    // zone a (2 nodes) and zone b (1 node) get 3 each
    expect(per).toEqual({ za1: expect.any(Number), za2: expect.any(Number), zb1: 3 });
    expect(per.za1! + per.za2!).toBe(3);
    // node ps of several nodes with a filter
    expect(await cliJson<TaskJ[]>(['node', 'ps', 'zb1', 'za1', '--format', 'json', '--filter', 'desired-state=running'], c.env)).toHaveLength(3 + per.za1!);
    const pretty = await ok(['service', 'inspect', '--pretty', 'spread']);
    expect(pretty).toMatch(/^Name:\s+spread$/m);
    expect(pretty).toMatch(/^ Preferences:\s+\[spread=node\.labels\.zone\]$/m);
    expect(pretty).toMatch(/^ Constraints:\s+\[node\.hostname!=m1\]$/m);
    expect(await ok(['service', 'inspect', '--format', '{{.Spec.Name}} {{json .Spec.Task.Placement.Preferences}}', 'spread'])).toBe('spread [{"spread":"node.labels.zone"}]\n');
    expect(await ok(['service', 'inspect', '--pretty', 'batch'])).toMatch(/^Service Mode:\s+Replicated Job\n Max Concurrent:\s+2\n Total Completions:\s+4$/m);
    await ok(['service', 'update', '-d', '--placement-pref-rm', 'spread=node.labels.zone', 'spread']);
    expect(await ok(['service', 'inspect', '--format', '{{json .Spec.Task.Placement.Preferences}}', 'spread'])).toBe('[]\n');
    await ok(['service', 'update', '-d', '--placement-pref-add', 'spread=node.labels.zone', '--placement-pref-add', 'spread=node.hostname', 'spread']);
    expect(await ok(['service', 'inspect', '--format', '{{json .Spec.Task.Placement.Preferences}}', 'spread'])).toBe('[{"spread":"node.labels.zone"},{"spread":"node.hostname"}]\n');
    const bad = await cli(['service', 'update', '--placement-pref-add', 'binpack=node.labels.zone', 'spread'], c.env);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/invalid --placement-pref-add "binpack=node.labels.zone": expected spread=node.labels.KEY/);
    const badTpl = await cli(['service', 'inspect', '--format', '{{.Spec.Nope}}', 'spread'], c.env);
    expect(badTpl.code).not.toBe(0);
    expect(badTpl.stderr).toMatch(/no field "Nope"/);
    const badFilter = await cli(['service', 'ls', '--filter', 'colour=red'], c.env);
    expect(badFilter.code).not.toBe(0);
    expect(badFilter.stderr).toMatch(/invalid --filter "colour=red": supported keys: name, id, label, mode/);
  });
});
