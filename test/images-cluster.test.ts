/**
 * Images inside the cluster on the multi-host test bed (real daemons, real runc, one network namespace
 * per host): busybox and a larger image are imported on h1 only; services of them converge on every
 * node, each agent fetching the blobs from h1 over the cluster's mutual TLS (no registry anywhere); a
 * task waiting for its image shows PREPARING with progress; an image no node has rejects the task
 * with the reason.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Testbed, type TestbedHost } from './helpers/testbed.js';
import { builtCli, isRoot, waitFor } from './helpers/procs.js';
import { buildBusyboxRootfs } from './helpers/busybox.js';
import { ImageStore } from '../agent/runtime/images.js';
import { Control } from '../cli/client.js';
import { TaskState, type Task } from '../gen/flotilla/v1/objects.js';
import type { ListTasksResponse } from '../gen/flotilla/v1/control.js';

interface TaskJ {
  nodeId: string;
  node: string;
  state: string;
  desiredState: string;
  error: string;
}

const skip = !isRoot() || !builtCli();
if (skip) process.stderr.write(`cluster image tests skipped: they need root and a built CLI${isRoot() ? '' : ' (not root)'}\n`);

describe.skipIf(skip)('images inside the cluster, without a registry (test bed, runc)', () => {
  let bed: Testbed;
  let tmp = '';
  let control: Control;
  const digests: Record<string, string> = {};

  beforeAll(async () => {
    tmp = fs.mkdtempSync('/tmp/flotilla-imgclu-');
    const rootfs = path.join(tmp, 'busybox');
    await buildBusyboxRootfs(rootfs);
    // a larger image: busybox plus 48 MiB that does not compress, so the fetch takes long enough to watch
    const big = path.join(tmp, 'big');
    await buildBusyboxRootfs(big);
    fs.mkdirSync(path.join(big, 'data'));
    const fh = fs.openSync(path.join(big, 'data', 'noise'), 'w');
    for (let i = 0; i < 48; i++) fs.writeSync(fh, randomBytes(1024 * 1024));
    fs.closeSync(fh);
    bed = await Testbed.create({
      managers: 1,
      agents: 2,
      // only h1 has the images
      prepareHost: async (h: TestbedHost) => {
        if (h.name !== 'h1') return;
        const store = await ImageStore.open(h.dataDir);
        digests.busybox = (await store.import('busybox:latest', rootfs, { config: { cmd: ['sh'] } })).digest;
        digests.big = (await store.import('big:1', big, { config: { cmd: ['sh'] } })).digest;
      },
    });
    control = new Control(`unix:${bed.socket}`);
  }, 180_000);
  afterAll(async () => {
    control?.close();
    await bed?.destroy();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const tasksOf = async (service: string): Promise<Task[]> =>
    (await control.call<object, ListTasksResponse>('listTasks', { serviceId: '', nodeId: '', desiredRunning: false })).tasks.filter((t) => t.serviceName === service && t.desiredState <= TaskState.TASK_STATE_RUNNING);

  it('runs a service whose image was imported on one node only on every node', async () => {
    for (const h of bed.hosts.slice(1)) expect((await h.cli(['image', 'ls', '--format', 'json'])).stdout.trim()).toBe('[]');
    const r = await bed.cli(['service', 'create', '-d', '--name', 'web', '--replicas', '3', '--network', 'host', '--stop-grace-period', '1s', 'busybox:latest', 'sleep', '1000']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    let last: TaskJ[] = [];
    const running = await waitFor(
      '3 running tasks of web',
      async () => {
        last = await bed.cliJson<TaskJ[]>(['service', 'ps', 'web']);
        const ts = last.filter((t) => t.desiredState === 'running' && t.state === 'running');
        return ts.length === 3 ? ts : undefined;
      },
      60_000,
    ).catch((err: Error) => {
      throw new Error(`${err.message}; tasks: ${JSON.stringify(last.map((t) => [t.node, t.state, t.error]))}`);
    });
    expect(new Set(running.map((t) => t.node))).toEqual(new Set(['h1', 'h2', 'h3']));
    // every node has the image now, the very one of h1 (same manifest digest)
    for (const h of bed.hosts) {
      const store = await ImageStore.open(h.dataDir);
      expect((await store.get('busybox:latest')).digest).toBe(digests.busybox);
    }
  });

  it('shows a task PREPARING with progress while its image is fetched, once for the tasks of a node', async () => {
    const r = await bed.cli(['service', 'create', '-d', '--name', 'big', '--replicas', '2', '--constraint', 'node.hostname==h3', '--network', 'host', '--stop-grace-period', '1s', 'big:1', 'sleep', '1000']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const seen = new Set<string>();
    const until = Date.now() + 60_000;
    let ts: Task[] = [];
    for (;;) {
      ts = await tasksOf('big');
      for (const t of ts) if (t.status?.state === TaskState.TASK_STATE_PREPARING) seen.add(t.status.message);
      if (ts.length === 2 && ts.every((t) => t.status?.state === TaskState.TASK_STATE_RUNNING)) break;
      if (ts.some((t) => (t.status?.state ?? 0) > TaskState.TASK_STATE_RUNNING)) throw new Error(`a task of big ended: ${JSON.stringify(ts.map((t) => t.status))}`);
      if (Date.now() > until) throw new Error(`big not running after 60 s: ${JSON.stringify(ts.map((t) => t.status))}`);
      await new Promise((res) => setTimeout(res, 50));
    }
    // progress lines: which node it comes from, layers and bytes
    expect([...seen].some((m) => /^fetching from h1: (manifest|\d\/1 layers, [\d.]+\s?\w+\/[\d.]+\s?\w+)$|^fetched from h1: unpacking 1 layers$/.test(m)), JSON.stringify([...seen])).toBe(true);
    const h3 = await ImageStore.open(bed.hosts[2]!.dataDir);
    expect((await h3.get('big:1')).digest).toBe(digests.big);
    // h2 never needed it
    expect(await (await ImageStore.open(bed.hosts[1]!.dataDir)).has('big:1')).toBe(false);
  });

  it('rejects a task whose image is on no node, with the reason', async () => {
    const r = await bed.cli(['service', 'create', '-d', '--name', 'ghost', '--replicas', '1', '--network', 'host', '--no-resolve-image', 'ghost:1', 'true']);
    expect(r.code).toBe(0);
    const t = await waitFor(
      'a rejected task of ghost',
      async () => (await bed.cliJson<TaskJ[]>(['service', 'ps', 'ghost'])).find((x) => x.state === 'rejected'),
      60_000,
    );
    expect(t.error).toMatch(/image "ghost:1" not available on node h\d: image "ghost:1" is on no node of the cluster \(import or pull it on one node\)/);
    expect((await bed.cli(['service', 'rm', 'ghost'])).code).toBe(0);
  });
});
