/**
 * Volumes and mounts on real runc, one node (manager with its in-process agent):
 *  - a service's named volume is created on demand on the node; its data outlives the task through a
 *    forced update, a crash (restart policy) and a kill + restart of the daemon;
 *  - `volume rm` is refused (one line naming the container) while a container uses it, and works once
 *    the service is gone (the volume itself stays after `service rm`, as in Swarm);
 *  - a bind of a host path that does not exist rejects the task, the reason visible in `service ps`,
 *    and leaves no container or volume;
 *  - `container run -v`: an anonymous volume goes with its container; a new volume gets the image's
 *    files and mode at its target; a volume with local-driver options (tmpfs) is mounted with them.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, isRoot, waitFor, startRuncNode } from './helpers/procs.js';
import type { TaskJson } from '../cli/format.js';
import { mountsUnder } from './helpers/runtime-debris.js';

type TaskJ = TaskJson;

const skip = !isRoot() || !builtCli();

describe.skipIf(skip)('volumes and mounts on real runc (needs root)', () => {
  const c = new TestCluster('flotilla-vol-');
  const dataDir = path.join(c.root, 'm1');
  const vol = (args: string[]) => cli(['volume', ...args, '--data-dir', dataDir]);
  const ctr = (args: string[]) => cli(['container', ...args, '--data-dir', dataDir]);
  // run's options end at the image: --data-dir goes first
  const run = (args: string[]) => cli(['container', 'run', '--data-dir', dataDir, ...args]);
  const tasks = (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);
  const runningTask = (svc: string, not?: string) =>
    waitFor(`a running task of ${svc}`, async () => (await tasks(svc)).find((t) => t.desiredState === 'running' && t.state === 'running' && t.containerId !== not), 40_000);
  const logFile = () => path.join(dataDir, 'volumes', 'data', '_data', 'log');
  const lines = () => (fs.existsSync(logFile()) ? fs.readFileSync(logFile(), 'utf8').trim().split('\n').length : 0);

  beforeAll(async () => {
    await startRuncNode(c);
  }, 60_000);
  afterAll(async () => {
    await cli(['service', 'rm', 'db', 'badbind'], c.env).catch(() => undefined);
    await waitFor('containers removed', async () => (await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', dataDir])).length === 0, 20_000).catch(() => undefined);
    await c.cleanup({ expectEmpty: true });
  });

  it('keeps a volume created on demand through a forced update, a crash and a daemon restart', async () => {
    const r = await cli(
      [
        'service', 'create', '--name', 'db', '--stop-grace-period', '1s', '--restart-delay', '100ms',
        '--mount', 'type=volume,source=data,target=/data,volume-label=app=db',
        'busybox:latest', 'sh', '-c', 'echo "start $(hostname)" >> /data/log; exec sleep 100000',
      ],
      c.env,
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const t1 = await runningTask('db');
    const [info] = await cliJson<Array<{ name: string; labels: Record<string, string>; mountpoint: string }>>(['volume', 'inspect', 'data', '--data-dir', dataDir]);
    expect(info).toMatchObject({ name: 'data', labels: { app: 'db' }, mountpoint: path.join(dataDir, 'volumes', 'data', '_data') });
    await waitFor('the first line', () => lines() === 1);

    // in use: refused, with one line naming the container
    const rm = await vol(['rm', 'data']);
    expect(rm.code).not.toBe(0);
    expect(rm.stderr.trim().split('\n')).toHaveLength(1);
    expect(rm.stderr).toMatch(/volume data is in use by container db\.1\./);

    // a forced update replaces the task: the new container finds the data
    expect((await cli(['service', 'update', '--force', 'db'], c.env)).code).toBe(0);
    const t2 = await runningTask('db', t1.containerId);
    await waitFor('the second line', () => lines() === 2);

    // a crash: the restart policy starts a new task on this node, which finds the data
    expect((await ctr(['kill', t2.containerId])).code).toBe(0);
    const t3 = await runningTask('db', t2.containerId);
    await waitFor('the third line', () => lines() === 3);

    // the daemon killed and restarted: the volume is still there, and a new task finds the data
    await c.kill(c.procs[0]!, 'SIGKILL');
    c.procs.splice(0, 1);
    await c.startManager({ agent: true, runtime: 'runc' });
    await waitFor('the task adopted', async () => (await tasks('db')).some((t) => t.containerId === t3.containerId && t.state === 'running'), 40_000);
    expect((await cli(['service', 'update', '--force', 'db'], c.env)).code).toBe(0);
    await runningTask('db', t3.containerId);
    await waitFor('the fourth line', () => lines() === 4);
    expect(fs.readFileSync(logFile(), 'utf8')).toMatch(/^(start \w+\n){4}$/);
  }, 150_000);

  it('rejects a task whose bind source does not exist, with the reason in service ps', async () => {
    const missing = path.join(c.root, 'no-such-dir');
    const r = await cli(['service', 'create', '-d', '--name', 'badbind', '--mount', `type=bind,source=${missing},target=/x`, 'busybox:latest', 'sleep', '1000'], c.env);
    expect(r.code).toBe(0);
    const t = await waitFor('a rejected task', async () => (await tasks('badbind')).find((x) => x.state === 'rejected'), 30_000);
    expect(t.error).toBe(`invalid mount config for type "bind": bind source path does not exist: ${missing}`);
    const table = await cli(['service', 'ps', '--no-trunc', 'badbind'], c.env);
    expect(table.stdout).toMatch(/Rejected .*bind source path does not exist/);
    // nothing was left of the rejected creates
    const names = (await cliJson<Array<{ name: string }>>(['container', 'ls', '-a', '--data-dir', dataDir])).map((x) => x.name);
    expect(names.filter((n) => n.startsWith('badbind.'))).toEqual([]);
    expect((await cli(['service', 'rm', 'badbind'], c.env)).code).toBe(0);
  }, 60_000);

  it('container run -v: anonymous volumes go with the container, new volumes get the image files, driver options mount', async () => {
    // an anonymous volume, removed with its container
    const id = (await run(['-d', '--name', 'anon', '-v', '/cache', 'busybox:latest', 'sleep', '1000'])).stdout.trim();
    expect(id).toMatch(/^[a-z0-9]{25}$/);
    const anon = (await vol(['ls', '-q'])).stdout.split('\n').filter((n) => n.startsWith('anon-'));
    expect(anon).toHaveLength(1);
    expect((await ctr(['rm', '-f', 'anon'])).code).toBe(0);
    expect((await vol(['ls', '-q'])).stdout).not.toMatch(/anon-/);

    // a new named volume at /root gets the image's directory (mode 0700); bind read-only
    const home = await run(['--rm', '-v', 'home:/root', '-v', `${c.root}:/host:ro`, 'busybox:latest', 'sh', '-c', 'stat -c %a /root; touch /host/x 2>&1; true']);
    expect(home.stdout).toMatch(/^700\n.*Read-only file system/s);
    expect(fs.statSync(path.join(dataDir, 'volumes', 'home', '_data')).mode & 0o777).toBe(0o700);

    // local driver options: a tmpfs of 1 MiB, mounted when used, unmounted at rm
    expect((await vol(['create', '--opt', 'type=tmpfs', '--opt', 'device=tmpfs', '--opt', 'o=size=1m', 'tv'])).code).toBe(0);
    const df = await run(['--rm', '-v', 'tv:/t', 'busybox:latest', 'df', '-k', '/t']);
    expect(df.stdout).toMatch(/tmpfs\s+1024\s/);
    expect((await vol(['rm', 'tv', 'home'])).code).toBe(0);
    expect(mountsUnder(path.join(dataDir, 'volumes'))).toEqual([]);
  }, 60_000);

  it('a volume stays after service rm and can be removed then', async () => {
    expect((await cli(['service', 'rm', 'db'], c.env)).code).toBe(0);
    await waitFor('containers removed', async () => (await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', dataDir])).length === 0, 30_000);
    expect((await vol(['ls', '-q'])).stdout).toBe('data\n');
    expect((await vol(['prune'])).stdout).toMatch(/No volumes removed/);
    const rm = await vol(['rm', 'data']);
    expect(rm.stderr).toBe('');
    expect(rm.code).toBe(0);
    expect((await vol(['ls', '-q'])).stdout).toBe('');
    expect(fs.existsSync(path.join(dataDir, 'volumes', 'data'))).toBe(false);
  }, 60_000);
});
