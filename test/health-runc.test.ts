/**
 * Health checks on real runc: a one-node cluster (manager with its in-process agent) running busybox
 * containers. A passing check makes a task healthy (reported RUNNING with health starting, then
 * healthy, and shown by `service ps`); a check that starts failing gets the task stopped and replaced;
 * the image's own HEALTHCHECK (a docker-archive import) is honoured unless --no-healthcheck; an update
 * to a failing check with --update-failure-action rollback rolls back and the CLI exits non-zero.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import * as tar from 'tar';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, isRoot, waitFor } from './helpers/procs.js';
import type { TaskJson } from '../cli/format.js';
import { buildBusyboxRootfs, importBusybox } from './helpers/busybox.js';
import { processAlive } from './helpers/runtime-debris.js';
import { Control, hostTarget } from '../cli/client.js';
import type { GetServiceResponse, ListTasksResponse } from '../gen/flotilla/v1/control.js';
import { HealthState, TaskState } from '../gen/flotilla/v1/objects.js';

type TaskJ = TaskJson;
interface ServiceJ {
  version: number;
  updateStatus: { state: string; message: string } | null;
  spec: { task: { container: { healthcheck?: { test: string[] } } } };
}

const sha = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

/** A docker-archive (docker save format) of the busybox root file system whose config has a HEALTHCHECK. */
async function writeHealthcheckArchive(file: string): Promise<void> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-hc-img-'));
  try {
    const rootfs = path.join(work, 'rootfs');
    await buildBusyboxRootfs(rootfs);
    const layerFile = path.join(work, 'layer.tar');
    await tar.c({ cwd: rootfs, file: layerFile, portable: false }, ['.']);
    const layer = await fs.readFile(layerFile);
    await fs.rm(layerFile);
    await fs.rm(rootfs, { recursive: true });
    const arch = path.join(work, 'archive');
    const layerId = sha('layer0');
    await fs.mkdir(path.join(arch, layerId), { recursive: true });
    await fs.writeFile(path.join(arch, layerId, 'layer.tar'), layer);
    const config = Buffer.from(
      JSON.stringify({
        architecture: process.arch === 'arm64' ? 'arm64' : 'amd64',
        os: 'linux',
        config: {
          Cmd: ['sh'],
          Env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin'],
          // Docker's durations are nanoseconds
          Healthcheck: { Test: ['CMD-SHELL', 'test -e /tmp/ok'], Interval: 200_000_000, Timeout: 2_000_000_000, Retries: 2 },
        },
        rootfs: { type: 'layers', diff_ids: [`sha256:${sha(layer)}`] },
      }),
    );
    const cfgName = `${sha(config)}.json`;
    await fs.writeFile(path.join(arch, cfgName), config);
    await fs.writeFile(path.join(arch, 'manifest.json'), JSON.stringify([{ Config: cfgName, RepoTags: ['hcimg:1'], Layers: [`${layerId}/layer.tar`] }]));
    await tar.c({ cwd: arch, file, portable: true }, await fs.readdir(arch));
  } finally {
    await fs.rm(work, { recursive: true, force: true });
  }
}

const skip = !isRoot() || !builtCli();
if (skip) console.warn('health-runc tests skipped: they need root (runc) and a built CLI (npm run build)');

describe.skipIf(skip)('health checks on runc (needs root)', () => {
  const c = new TestCluster('flotilla-health-');
  const dataDir = path.join(c.root, 'm1');
  const flotilla = (...args: string[]) => cli(args, c.env);
  const ps = (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);
  const inspect = async (svc: string) => (await cliJson<ServiceJ[]>(['service', 'inspect', svc], c.env))[0]!;
  const current = async (svc: string) => (await ps(svc)).filter((t) => t.desiredState === 'running');
  // sleep as PID 1 ignores SIGTERM: a short grace period keeps stops quick
  const common = ['--stop-grace-period', '300ms', '--restart-delay', '200ms'];
  const services: string[] = [];

  beforeAll(async () => {
    await importBusybox(dataDir);
    const archive = path.join(c.root, 'hcimg.tar');
    await writeHealthcheckArchive(archive);
    const imp = await cli(['image', 'import', 'hcimg:1', archive, '--data-dir', dataDir]);
    expect(imp.stderr).toBe('');
    await c.startManager({ agent: true, runtime: 'runc' });
    await waitFor('the node is ready', async () => (await cliJson<Array<{ status: string }>>(['node', 'ls'], c.env))[0]?.status === 'ready');
  });
  afterAll(async () => {
    try {
      if (services.length) expect((await flotilla('service', 'rm', ...services)).code).toBe(0);
      await waitFor('containers removed', async () => (await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', dataDir])).length === 0, 30_000);
    } finally {
      // stops the daemon (SIGKILL after a deadline) and removes what is left before the data dir
      await c.cleanup();
    }
  });

  it('a passing --health-cmd: RUNNING with health starting, then healthy, shown by service ps', async () => {
    services.push('ok');
    const r = await flotilla('service', 'create', '--detach', '--name', 'ok', ...common, '--health-cmd', 'test -e /bin/sh', '--health-interval', '1s', 'busybox', 'sleep', '1000');
    expect(r.code).toBe(0);
    // watched through the API (a CLI process per look can be slower than the 1 s 'starting' window)
    const seen = new Set<HealthState>();
    const control = new Control(hostTarget(c.env.FLOTILLA_HOST));
    try {
      const { service } = await control.call<unknown, GetServiceResponse>('getService', { serviceId: 'ok' });
      await waitFor(
        'ok healthy',
        async () => {
          const { tasks } = await control.call<unknown, ListTasksResponse>('listTasks', { serviceId: service!.id, nodeId: '', desiredRunning: true });
          const t = tasks[0];
          if (t?.status?.state === TaskState.TASK_STATE_RUNNING) seen.add(t.status.health);
          return t?.status?.state === TaskState.TASK_STATE_RUNNING && t.status.health === HealthState.HEALTH_STATE_HEALTHY;
        },
        20_000,
        20,
      );
    } finally {
      control.close();
    }
    expect(seen).toContain(HealthState.HEALTH_STATE_STARTING);
    const table = await flotilla('service', 'ps', 'ok');
    expect(table.stdout).toMatch(/HEALTH/);
    expect(table.stdout).toMatch(/ok\.1\s+busybox\S*\s+\S+\s+Running\s+Running .*\s+healthy/);
  });

  it('a check that starts failing makes the task unhealthy; it is stopped and replaced', async () => {
    services.push('sick');
    // healthy until the test creates /tmp/bad in the container; then the check fails
    const r = await flotilla(
      'service', 'create', '--name', 'sick', ...common, '--restart-delay', '3s', '--health-cmd', 'test ! -e /tmp/bad', '--health-interval', '200ms', '--health-retries', '2',
      'busybox', 'sleep', '1000',
    );
    expect(r.code).toBe(0);
    const first = await waitFor('sick healthy', async () => (await current('sick')).find((t) => t.health === 'healthy'));
    const firstPid = (JSON.parse((await cli(['container', 'inspect', first.containerId, '--data-dir', dataDir])).stdout) as { pid: number }).pid;
    expect(processAlive(firstPid)).toBe(true);
    const touch = await cli(['container', 'exec', '--data-dir', dataDir, first.containerId, 'touch', '/tmp/bad']);
    expect(touch.stderr).toBe('');
    expect(touch.code).toBe(0);
    const failed = await waitFor('sick unhealthy', async () => (await ps('sick')).find((t) => t.id === first.id && t.state === 'failed'), 15_000);
    expect(failed.health).toBe('unhealthy');
    expect(failed.error).toMatch(/unhealthy/);
    // replaced in the same slot under the restart policy (after the 3 s restart delay)
    const next = await waitFor('a replacement', async () => (await current('sick')).find((t) => t.id !== first.id && t.slot === first.slot && t.state === 'running'), 15_000);
    expect(next.containerId).not.toBe(first.containerId);
    expect((await ps('sick')).find((t) => t.id === first.id)!.desiredState).toBe('shutdown');
    // the unhealthy container was stopped: its process is gone (the kernel's word, not flotilla's)
    expect(processAlive(firstPid), `pid ${firstPid}`).toBe(false);
    const insp = await cli(['container', 'inspect', failed.containerId, '--data-dir', dataDir]);
    if (insp.code === 0) expect((JSON.parse(insp.stdout) as { state: string }).state).not.toBe('running');
    else expect(insp.stderr).toMatch(/not found/i);
    expect((await flotilla('service', 'rm', 'sick')).code).toBe(0);
    services.splice(services.indexOf('sick'), 1);
  });

  it('--health-start-period: failures while the container initialises do not count', async () => {
    services.push('slow');
    // the check fails until /tmp/ready exists (~1 s); one failure would be enough without the start period
    const r = await flotilla(
      'service', 'create', '--detach', '--name', 'slow', ...common, '--health-cmd', 'test -e /tmp/ready', '--health-interval', '200ms', '--health-retries', '1', '--health-start-period', '5s',
      'busybox', 'sh', '-c', '(sleep 1; touch /tmp/ready) & exec sleep 1000',
    );
    expect(r.code).toBe(0);
    const t = await waitFor('slow healthy', async () => (await current('slow')).find((x) => x.health === 'healthy'), 15_000);
    expect((await ps('slow')).filter((x) => x.id !== t.id)).toEqual([]); // never failed, never replaced
    expect((await flotilla('service', 'rm', 'slow')).code).toBe(0);
    services.splice(services.indexOf('slow'), 1);
  });

  it("honours the image's HEALTHCHECK (docker-archive), and --no-healthcheck disables it", async () => {
    services.push('img', 'noimg');
    const r = await flotilla('service', 'create', '--name', 'img', ...common, 'hcimg:1', 'sh', '-c', 'touch /tmp/ok; exec sleep 1000');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await waitFor('img healthy by the image check', async () => (await current('img'))[0]?.health === 'healthy', 15_000);
    const n = await flotilla('service', 'create', '--name', 'noimg', ...common, '--no-healthcheck', 'hcimg:1', 'sleep', '1000');
    expect(n.code).toBe(0);
    await new Promise((res) => setTimeout(res, 800));
    const t = (await current('noimg'))[0]!;
    expect(t.state).toBe('running');
    expect(t.health).toBe(''); // no check: neither starting nor unhealthy though /tmp/ok is absent
  });

  it('an update to a failing health check with --update-failure-action rollback rolls back; the CLI exits non-zero', async () => {
    services.push('web');
    const r = await flotilla('service', 'create', '--name', 'web', '--replicas', '2', ...common, '--health-cmd', 'true', '--health-interval', '200ms', 'busybox', 'sleep', '1000');
    expect(r.code).toBe(0);
    await waitFor('web healthy', async () => (await current('web')).filter((t) => t.health === 'healthy').length === 2);
    const before = await inspect('web');
    const u = await flotilla(
      'service', 'update', '--health-cmd', 'exit 1', '--health-retries', '1', '--update-failure-action', 'rollback', '--update-monitor', '500ms', '--rollback-monitor', '500ms', 'web',
    );
    expect(u.code).toBe(1);
    expect(u.stderr).toMatch(/update rolled back: task \w+ failed: task: container unhealthy/);
    expect(u.stdout).toMatch(/rollback/);
    const after = await inspect('web');
    expect(after.updateStatus!.state).toBe('rollback_completed');
    expect(after.spec).toEqual(before.spec);
    expect(after.spec.task.container.healthcheck!.test).toEqual(['CMD-SHELL', 'true']);
    const tasks = await current('web');
    expect(tasks).toHaveLength(2);
    expect(tasks.every((t) => t.state === 'running' && t.health === 'healthy')).toBe(true);
    const failed = (await ps('web')).filter((t) => t.state === 'failed');
    expect(failed.length).toBeGreaterThanOrEqual(1);
    expect(failed.every((t) => t.health === 'unhealthy')).toBe(true);
  });
});
