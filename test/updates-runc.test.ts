/**
 * A rolling update and a drain on real runc: a manager with its in-process agent (m1) and a second agent
 * (n2), both running busybox containers. What is checked is what the kernel says, not flotilla's own
 * report: the old containers' processes are gone, the new ones run with the new environment
 * (/proc/<pid>/environ) in the cgroups inspect names, and while a node is drained under a start-first
 * policy the number of live container processes of the service never drops below the replicas.
 */
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, isRoot, waitFor } from './helpers/procs.js';
import type { TaskJson } from '../cli/format.js';
import { importBusybox } from './helpers/busybox.js';
import { cgroupMismatches, processAlive, processEnv } from './helpers/runtime-debris.js';

type TaskJ = TaskJson;
interface ContainerJ {
  state: string;
  pid: number;
  cgroupPaths: Record<string, string>;
}

const skip = !isRoot() || !builtCli();
if (skip) console.warn('updates-runc tests skipped: they need root (runc) and a built CLI (npm run build)');

/** A marker unique to this run, put in every container's environment to find its processes in /proc. */
const MARK = `FLOTILLA_TEST_RUN=${process.pid}-${Date.now()}`;

/** The container ids (their /flotilla/<id> cgroup, v1 or v2) of the live processes whose environment holds MARK and svc. */
function liveContainers(svc: string): Set<string> {
  const out = new Set<string>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const env = readFileSync(`/proc/${e}/environ`, 'utf8').split('\0');
      if (!env.includes(MARK) || !env.includes(`SVC=${svc}`)) continue;
      if (!processAlive(Number(e))) continue;
      const cg = /^\d+:[^:]*:.*\/flotilla\/([^/\n]+)$/m.exec(readFileSync(`/proc/${e}/cgroup`, 'utf8'));
      if (cg) out.add(cg[1]!);
    } catch {
      // the process is gone
    }
  }
  return out;
}

describe.skipIf(skip)('rolling update and drain on runc (needs root)', () => {
  const c = new TestCluster('flotilla-updrunc-');
  const dirOf = (node: string) => path.join(c.root, node);
  const flotilla = (...args: string[]) => cli(args, c.env);
  const ps = (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);
  const inspectCtr = async (node: string, id: string) => cliJson<ContainerJ>(['container', 'inspect', id, '--data-dir', dirOf(node)]).then((x) => (Array.isArray(x) ? (x[0] as ContainerJ) : x));
  const running = async (svc: string) => (await ps(svc)).filter((t) => t.desiredState === 'running' && t.state === 'running');
  // sh as PID 1 exits on SIGTERM through the trap: stops are quick
  const cmd = (svc: string) => ['sh', '-c', `trap "exit 0" TERM; echo ${svc}; sleep 1000 & wait`];
  const services: string[] = [];

  beforeAll(async () => {
    await importBusybox(dirOf('m1'));
    await importBusybox(dirOf('n2'));
    await c.startManager({ agent: true, runtime: 'runc' });
    await c.startAgent('n2', { runtime: 'runc' });
    await waitFor('2 ready nodes', async () => (await cliJson<Array<{ status: string }>>(['node', 'ls'], c.env)).filter((n) => n.status === 'ready').length === 2, 30_000);
  });
  afterAll(async () => {
    try {
      if (services.length) expect((await flotilla('service', 'rm', ...services)).code).toBe(0);
      await waitFor('no containers left', async () => {
        for (const n of ['m1', 'n2']) if ((await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', dirOf(n)])).length) return false;
        return true;
      }, 30_000);
    } finally {
      await c.cleanup({ expectEmpty: true });
    }
  });

  it('a rolling update replaces every container: old processes gone, new ones run the new env in their cgroups', async () => {
    services.push('roll');
    const r = await flotilla('service', 'create', '--name', 'roll', '--replicas', '3', '--stop-grace-period', '2s', '-e', MARK, '-e', 'SVC=roll', '-e', 'V=1', 'busybox:latest', ...cmd('roll'));
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const before = await running('roll');
    expect(before).toHaveLength(3);
    const oldPids: number[] = [];
    for (const t of before) {
      const i = await inspectCtr(t.node, t.containerId);
      expect(i.state).toBe('running');
      expect(processEnv(i.pid)).toContain('V=1');
      expect(cgroupMismatches(i.pid, i.cgroupPaths)).toEqual([]);
      oldPids.push(i.pid);
    }
    expect(liveContainers('roll')).toEqual(new Set(before.map((t) => t.containerId)));

    const u = await flotilla('service', 'update', '--env-add', 'V=2', '--update-parallelism', '1', '--update-monitor', '300ms', 'roll');
    expect(u.stderr).toBe('');
    expect(u.code).toBe(0);
    const after = await running('roll');
    expect(after).toHaveLength(3);
    expect(after.map((t) => t.containerId).filter((id) => before.some((b) => b.containerId === id))).toEqual([]);
    for (const pid of oldPids) expect(processAlive(pid), `old pid ${pid}`).toBe(false);
    for (const t of after) {
      const i = await inspectCtr(t.node, t.containerId);
      expect(i.state).toBe('running');
      expect(processEnv(i.pid)).toContain('V=2');
      expect(processEnv(i.pid)).not.toContain('V=1');
      expect(cgroupMismatches(i.pid, i.cgroupPaths)).toEqual([]);
    }
    // the kernel's view: exactly the three new containers have processes of the service
    expect(liveContainers('roll')).toEqual(new Set(after.map((t) => t.containerId)));
  });

  it('draining a node moves its tasks off with a start-first policy and never fewer live containers than replicas', async () => {
    services.push('dr');
    const r = await flotilla(
      'service', 'create', '--name', 'dr', '--replicas', '2', '--update-order', 'start-first', '--update-monitor', '200ms',
      '--health-cmd', 'true', '--health-interval', '200ms', '--stop-grace-period', '2s', '-e', MARK, '-e', 'SVC=dr', 'busybox:latest', ...cmd('dr'),
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await waitFor('dr healthy on both nodes', async () => (await running('dr')).filter((t) => t.health === 'healthy').length === 2);
    const before = await running('dr');
    const onN2 = before.filter((t) => t.node === 'n2');
    expect(onN2.length).toBe(1); // spread over the two nodes
    const n2Pids = await Promise.all(onN2.map(async (t) => (await inspectCtr('n2', t.containerId)).pid));

    let minLive = Infinity;
    let samples = 0;
    let stop = false;
    const sampler = (async () => {
      while (!stop) {
        minLive = Math.min(minLive, liveContainers('dr').size);
        samples++;
        await new Promise((res) => setTimeout(res, 30));
      }
    })();
    const t0 = Date.now();
    try {
      expect((await flotilla('node', 'update', '--availability', 'drain', 'n2')).code).toBe(0);
      await waitFor('every task off n2 and two healthy on m1', async () => {
        const now = await ps('dr');
        const cur = now.filter((t) => t.desiredState === 'running');
        return cur.length === 2 && cur.every((t) => t.node === 'm1' && t.state === 'running' && t.health === 'healthy') && n2Pids.every((p) => !processAlive(p));
      }, 30_000);
    } finally {
      stop = true;
      await sampler;
    }
    console.log(`drain on runc: done in ${Date.now() - t0} ms; ${samples} samples of /proc, fewest live containers ${minLive}`);
    expect(samples).toBeGreaterThan(5);
    expect(minLive).toBeGreaterThanOrEqual(2);
    for (const pid of n2Pids) expect(processAlive(pid)).toBe(false);
    const now = await running('dr');
    expect(liveContainers('dr')).toEqual(new Set(now.map((t) => t.containerId)));
    for (const t of now) {
      const i = await inspectCtr('m1', t.containerId);
      expect(cgroupMismatches(i.pid, i.cgroupPaths)).toEqual([]);
    }
    // nothing of the service is left on n2
    expect(await cliJson<Array<{ state: string }>>(['container', 'ls', '--data-dir', dirOf('n2')])).toEqual([]);
    expect((await flotilla('node', 'update', '--availability', 'active', 'n2')).code).toBe(0);
  });
});
