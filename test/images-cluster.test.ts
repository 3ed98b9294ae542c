/**
 * Images in the cluster on the multi-host test bed (real daemons, real runc, one network namespace
 * per host): busybox and a larger image are imported on h1 only; services of them converge on every
 * node, each agent fetching the blobs from h1 over the cluster's mutual TLS (no registry anywhere); a
 * task waiting for its image shows PREPARING with progress; an image no node has rejects the task
 * with the reason. Then with real registries (Debian's docker-registry inside h1's namespace, one open,
 * one with htpasswd auth): tags pinned to digests on the manager (and --no-resolve-image), a moved tag
 * rolled out by an update, an unreachable registry failing the command with one line, and registry
 * credentials reaching only the node that runs the service's tasks.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, Testbed, run, type TestbedHost } from './helpers/testbed.js';
import { startRegistry, type TestRegistry } from './helpers/registry.js';
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
  // the registries live in h1's namespace on its underlay address: every host reaches them over the bed
  const subnet = `198.18.${100 + Math.floor(Math.random() * 150)}`;
  const h1ip = `${subnet}.11`;
  const openPort = 35_000 + Math.floor(Math.random() * 10_000);
  const authPort = openPort + 1;
  let open: TestRegistry | undefined;
  let locked: TestRegistry | undefined;
  const password = `pw-${randomBytes(16).toString('hex')}`;
  const savedInsecure = process.env.FLOTILLA_INSECURE_REGISTRIES;

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
    // plain HTTP to them (daemons and CLIs inherit the environment)
    process.env.FLOTILLA_INSECURE_REGISTRIES = `${h1ip}:${openPort},${h1ip}:${authPort}`;
    bed = await Testbed.create({
      managers: 1,
      agents: 2,
      subnet,
      // only h1 has the images
      prepareHost: async (h: TestbedHost) => {
        if (h.name !== 'h1') return;
        const store = await ImageStore.open(h.dataDir);
        digests.busybox = (await store.import('busybox:latest', rootfs, { config: { cmd: ['sh'] } })).digest;
        digests.big = (await store.import('big:1', big, { config: { cmd: ['sh'] } })).digest;
      },
    });
    control = new Control(`unix:${bed.socket}`);
    open = await startRegistry({ netns: bed.hosts[0]!.netns, listenHost: h1ip, port: openPort });
    locked = await startRegistry({ netns: bed.hosts[0]!.netns, listenHost: h1ip, port: authPort, auth: 'htpasswd', users: { alice: password } });
  }, 240_000);
  afterAll(async () => {
    control?.close();
    await open?.stop();
    await locked?.stop();
    if (savedInsecure === undefined) delete process.env.FLOTILLA_INSECURE_REGISTRIES;
    else process.env.FLOTILLA_INSECURE_REGISTRIES = savedInsecure;
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
    expect([...seen].some((m) => /^fetching from h1: (manifest|\d\/1 layers, [\d.]+\s?\w+\/[\d.]+\s?\w+)$|^fetched from h1: committing 1 layers$/.test(m)), JSON.stringify([...seen])).toBe(true);
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

  // ---- with registries

  const h1 = (): TestbedHost => bed.hosts[0]!;
  const cfg = (): string => path.join(tmp, 'client-config');
  /** the CLI on h1 (its data dir, the registries' network) with the test's credentials store */
  const onH1 = (args: string[]): ReturnType<TestbedHost['cli']> => h1().cli(args, { FLOTILLA_CONFIG: cfg() });
  const must = async (args: string[]): Promise<string> => {
    const r = await onH1(args);
    if (r.code !== 0) throw new Error(`flotilla ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
    return r.stdout;
  };
  /** Imports a busybox variant (one marker file) on h1, pushes it as ref and removes it from h1: only the registry has it. */
  const pushVariant = async (ref: string, marker: string): Promise<string> => {
    const dir = path.join(tmp, `variant-${marker}`);
    if (!fs.existsSync(dir)) {
      await buildBusyboxRootfs(dir);
      fs.writeFileSync(path.join(dir, 'marker'), `${marker}\n`);
    }
    await must(['image', 'import', `local-${marker}:1`, dir, '--cmd', 'sh']);
    await must(['image', 'tag', `local-${marker}:1`, ref]);
    const digest = (await must(['image', 'push', '-q', ref])).trim();
    await must(['image', 'rm', ref, `local-${marker}:1`]);
    return digest;
  };
  interface SvcJ {
    spec?: { task?: { container?: { image?: string } } };
  }
  const imageOf = async (name: string): Promise<string> => (await bed.cliJson<SvcJ[]>(['service', 'inspect', name]))[0]?.spec?.task?.container?.image ?? '';
  const runningImages = async (name: string): Promise<string[]> =>
    (await bed.cliJson<Array<TaskJ & { image: string }>>(['service', 'ps', name])).filter((t) => t.desiredState === 'running' && t.state === 'running').map((t) => t.image);

  it('pins the tag to its digest on the manager (service ps and inspect show it), unless --no-resolve-image', async () => {
    const reg = open!.host;
    const d1 = await pushVariant(`${reg}/app:1`, 'one');
    expect(d1).toMatch(/^sha256:[a-f0-9]{64}$/);
    const r = await bed.cli(['service', 'create', '-d', '--name', 'pinned', '--constraint', 'node.hostname==h2', '--network', 'host', '--stop-grace-period', '1s', `${reg}/app:1`, 'sleep', '1000']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await imageOf('pinned')).toBe(`${reg}/app:1@${d1}`);
    // h2 pulled it from the registry (no node had it) and runs it
    await waitFor('pinned running', async () => (await runningImages('pinned')).length === 1, 60_000);
    expect(await runningImages('pinned')).toEqual([`${reg}/app:1@${d1}`]);
    expect((await (await ImageStore.open(bed.hosts[1]!.dataDir)).get(`${reg}/app:1@${d1}`)).repoDigests).toContain(`${reg}/app@${d1}`);
    const ps = await bed.cli(['service', 'ps', 'pinned', '--no-trunc']);
    expect(ps.stdout).toContain(`${reg}/app:1@${d1}`);
    const u = await bed.cli(['service', 'create', '-d', '--name', 'unpinned', '--no-resolve-image', '--replicas', '0', `${reg}/app:1`, 'sleep', '1000']);
    expect(u.code).toBe(0);
    expect(await imageOf('unpinned')).toBe(`${reg}/app:1`);
  });

  it('rolls out a tag moved in the registry when the update names it again', async () => {
    const reg = open!.host;
    const d1 = await pushVariant(`${reg}/app:mv`, 'one');
    const c = await bed.cli(['service', 'create', '-d', '--name', 'mover', '--replicas', '2', '--network', 'host', '--stop-grace-period', '1s', `${reg}/app:mv`, 'sleep', '1000']);
    expect(c.code).toBe(0);
    expect(await imageOf('mover')).toBe(`${reg}/app:mv@${d1}`);
    await waitFor('mover running', async () => (await runningImages('mover')).length === 2, 60_000);
    const d2 = await pushVariant(`${reg}/app:mv`, 'two');
    expect(d2).not.toBe(d1);
    // a scale keeps the pin; naming the tag again resolves it again
    expect((await bed.cli(['service', 'scale', 'mover=2'])).code).toBe(0);
    expect(await imageOf('mover')).toBe(`${reg}/app:mv@${d1}`);
    const up = await bed.cli(['service', 'update', '--image', `${reg}/app:mv`, '--update-parallelism', '2', 'mover']);
    expect(up.stderr).toBe('');
    expect(up.code).toBe(0);
    expect(await imageOf('mover')).toBe(`${reg}/app:mv@${d2}`);
    await waitFor('mover on the new digest', async () => {
      const imgs = await runningImages('mover');
      return imgs.length === 2 && imgs.every((i) => i === `${reg}/app:mv@${d2}`);
    }, 60_000);
  });

  it('fails service create with one line when the registry cannot be reached', async () => {
    const r = await bed.cli(['service', 'create', '-d', '--name', 'down', `${h1ip}:1/app:1`, 'true']);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(new RegExp(`cannot resolve image "${h1ip}:1/app:1" to a digest: .*\\(--no-resolve-image deploys it unpinned\\)`));
    expect((await bed.cli(['service', 'inspect', 'down'])).code).not.toBe(0);
  });

  it('sends registry credentials (--with-registry-auth) only to the node that runs the tasks, and never shows them', async () => {
    const reg = locked!.host;
    const login = await run('nsenter', [`--net=/run/netns/${h1().netns}`, '--', process.execPath, CLI, 'image', 'login', reg, '-u', 'alice', '--password-stdin'], {
      env: { ...process.env, FLOTILLA_CONFIG: cfg(), FLOTILLA_DATA_DIR: h1().dataDir },
      input: password,
    });
    expect(login.code, login.stderr).toBe(0);
    await pushVariant(`${reg}/priv:1`, 'priv');
    const r = await onH1(['service', 'create', '-d', '--name', 'priv', '--with-registry-auth', '--constraint', 'node.hostname==h3', '--network', 'host', '--stop-grace-period', '1s', `${reg}/priv:1`, 'sleep', '1000']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await waitFor('priv running on h3', async () => (await runningImages('priv')).length === 1, 60_000);
    // without credentials the manager cannot resolve the tag: one line. (Asked only now: pushVariant
    // imported the image under that name on a node and removed it, and until that node's next
    // heartbeat the manager may still see it there and pin to it without asking the registry.)
    const anon = await onH1(['service', 'create', '-d', '--name', 'priv0', `${reg}/priv:1`, 'true']);
    expect(anon.code).not.toBe(0);
    expect(anon.stderr.trim().split('\n')).toHaveLength(1);
    expect(anon.stderr).toMatch(/cannot resolve image .*priv:1.* to a digest/);
    // never shown: inspect, ps, history
    for (const args of [['service', 'inspect', 'priv'], ['service', 'ps', 'priv', '--format', 'json'], ['service', 'history', 'priv']]) {
      const out = await bed.cli(args);
      expect(out.stdout + out.stderr).not.toContain(password);
      expect(out.stdout).not.toMatch(/registryAuth|alice/);
    }
    // nor through the control API itself (every service and task answer)
    const svc = await control.call<object, { service: unknown }>('getService', { serviceId: 'priv' });
    const services = await control.call<object, { services: unknown[] }>('listServices', {});
    for (const answer of [svc, services, await tasksOf('priv')]) expect(JSON.stringify(answer)).not.toContain(password);
    // in memory: h3's agent has them (it pulled with them), h2's never received them
    const inMemory = (pid: number): boolean => processMemoryContains(pid, Buffer.from(password));
    expect(inMemory(bed.hosts[2]!.pid)).toBe(true);
    expect(inMemory(bed.hosts[1]!.pid)).toBe(false);
  });
});

/** Whether a process's writable memory holds these bytes (its heap: what it received and kept). */
function processMemoryContains(pid: number, needle: Buffer): boolean {
  const maps = fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n');
  const fd = fs.openSync(`/proc/${pid}/mem`, 'r');
  try {
    for (const line of maps) {
      const m = /^([0-9a-f]+)-([0-9a-f]+) rw/.exec(line);
      if (!m) continue;
      const start = parseInt(m[1]!, 16);
      const end = parseInt(m[2]!, 16);
      if (end - start > 512 * 1024 * 1024) continue;
      for (let off = start; off < end; off += 16 * 1024 * 1024) {
        const len = Math.min(16 * 1024 * 1024 + needle.length, end - off);
        const buf = Buffer.alloc(len);
        let n = 0;
        try {
          n = fs.readSync(fd, buf, 0, len, off);
        } catch {
          break;
        }
        if (buf.subarray(0, n).includes(needle)) return true;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return false;
}
