/**
 * End to end on real runc: a one-node cluster (manager with its in-process agent), a service of the
 * busybox image whose containers carry the asked limits, adoption of running containers across a
 * restart of the whole daemon, logs, and removal leaving nothing behind.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, isRoot, waitFor, startRuncNode } from './helpers/procs.js';
import type { TaskJson } from '../cli/format.js';
import { cgroupMismatches, flotillaCgroups, mountsUnder, processAlive } from './helpers/runtime-debris.js';
import { runRootOf } from '../agent/runtime/containers.js';

type TaskJ = TaskJson;

const skip = !isRoot() || !builtCli();

describe.skipIf(skip)('e2e on runc (needs root)', () => {
  const c = new TestCluster('flotilla-e2e-');
  const dataDir = path.join(c.root, 'm1');
  const ctr = (args: string[]) => cli(['container', ...args, '--data-dir', dataDir]);
  const running = async (svc: string) => (await cliJson<TaskJ[]>(['service', 'ps', svc], c.env)).filter((t) => t.desiredState === 'running' && t.state === 'running');

  beforeAll(async () => {
    await startRuncNode(c);
  });
  afterAll(async () => {
    // stops the daemon (SIGKILL after a deadline), removes any container the tests left before the data dir
    await c.cleanup({ expectEmpty: true });
  });

  it('runs a service whose containers carry the asked limits', async () => {
    const r = await cli(
      ['service', 'create', '--name', 'limited', '--replicas', '3', '--stop-grace-period', '500ms', '--limit-memory', '64m', '--limit-pids', '50', '--limit-cpu', '0.5', '-e', 'GREETING=hi', 'busybox:latest', 'sh', '-c', 'echo $GREETING from $(hostname); exec sleep 1000'],
      c.env,
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const tasks = await running('limited');
    expect(tasks).toHaveLength(3);
    for (const t of tasks) {
      const insp = JSON.parse((await ctr(['inspect', t.containerId])).stdout) as { state: string; pid: number; cgroupPaths: Record<string, string> };
      expect(insp.state).toBe('running');
      const mem = Object.entries(insp.cgroupPaths).find(([k]) => k.split(',').includes('memory'))![1];
      const pids = Object.entries(insp.cgroupPaths).find(([k]) => k.split(',').includes('pids'))![1];
      const cpu = Object.entries(insp.cgroupPaths).find(([k]) => k.split(',').includes('cpu'))![1];
      expect(fs.readFileSync(path.join(mem, 'memory.limit_in_bytes'), 'utf8').trim()).toBe(String(64 * 1024 * 1024));
      expect(fs.readFileSync(path.join(pids, 'pids.max'), 'utf8').trim()).toBe('50');
      expect(Number(fs.readFileSync(path.join(cpu, 'cpu.cfs_quota_us'), 'utf8')) / Number(fs.readFileSync(path.join(cpu, 'cpu.cfs_period_us'), 'utf8'))).toBeCloseTo(0.5);
      // the kernel puts the process in the cgroups inspect names
      expect(cgroupMismatches(insp.pid, insp.cgroupPaths)).toEqual([]);
      // its own pid namespace
      expect(fs.readlinkSync(`/proc/${insp.pid}/ns/pid`)).not.toBe(fs.readlinkSync('/proc/self/ns/pid'));
    }
  });

  it('shows the service logs', async () => {
    await waitFor('log lines', async () => {
      const r = await cli(['service', 'logs', 'limited'], c.env);
      return (r.stdout.match(/hi from /g) ?? []).length === 3;
    });
  });

  it('adopts running containers after the daemon is killed and restarted', async () => {
    const before = (await running('limited')).map((t) => t.containerId).sort();
    await c.kill(c.procs[0]!, 'SIGKILL');
    c.procs.splice(0, 1);
    // the containers outlive the daemon
    const ls = await cliJson<Array<{ id: string; state: string }>>(['container', 'ls', '--data-dir', dataDir]);
    expect(ls.filter((x) => x.state === 'running').map((x) => x.id).sort()).toEqual(before);
    await c.startManager({ agent: true, runtime: 'runc' });
    await waitFor('service running again', async () => (await running('limited')).length === 3, 30_000);
    const after = (await running('limited')).map((t) => t.containerId).sort();
    expect(after).toEqual(before);
    const all = await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', dataDir]);
    expect(all).toHaveLength(3); // no copies started
  });

  it('service rm leaves no process, mount, cgroup, run-root entry or snapshot behind', async () => {
    const tasks = await running('limited');
    expect(tasks).toHaveLength(3);
    const ids = tasks.map((t) => t.containerId);
    const pids: number[] = [];
    for (const id of ids) pids.push((JSON.parse((await ctr(['inspect', id])).stdout) as { pid: number }).pid);
    const runRoot = await runRootOf(dataDir);
    expect(flotillaCgroups(ids).length).toBeGreaterThan(0);
    for (const id of ids) expect(fs.existsSync(path.join(runRoot, 'containers', id)), id).toBe(true);
    const r = await cli(['service', 'rm', 'limited'], c.env);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await waitFor('containers removed', async () => (await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', dataDir])).length === 0, 30_000);
    // a container being removed is no longer listed: give its removal a bounded time to finish
    const debris = (): string[] => [
      ...pids.filter(processAlive).map((p) => `process ${p}`),
      ...mountsUnder(dataDir),
      ...mountsUnder(runRoot),
      ...flotillaCgroups(ids),
      ...ids.flatMap((id) => [...['containers', 'runc', 'exits'].map((sub) => path.join(runRoot, sub, id)), path.join(dataDir, 'snapshots', 'containers', id)].filter((f) => fs.existsSync(f))),
    ];
    await waitFor('nothing left of the removed containers', () => debris().length === 0, 15_000).catch(() => undefined);
    expect(debris()).toEqual([]);
  });
});
