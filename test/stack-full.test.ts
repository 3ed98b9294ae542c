/**
 * Issue 15's stack test, on the multi-host test bed (1 manager that runs no task, 2 agents, real runc):
 * a web service with a published port, a Redis service with a named volume, a secret, a config and a
 * health check, and a one-off job that writes into Redis; everything converges; the data in the volume
 * survives a forced update; a redeploy with the web image changed updates only web (Redis' and the
 * job's task ids unchanged); `stack rm` leaves no service, network, secret, config or container behind
 * on any host, and the volume stays (as in Swarm).
 *
 * The image is busybox plus Debian's redis-server, redis-cli and socat with their libraries, imported
 * as app:v1 and app:v2 (the same files: the change of reference is what the redeploy rolls out).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Testbed, type TestbedHost } from './helpers/testbed.js';
import { builtCli, isRoot, waitFor } from './helpers/procs.js';
import { buildBusyboxRootfs } from './helpers/busybox.js';
import { ImageStore } from '../agent/runtime/images.js';

interface TaskJ {
  id: string;
  service: string;
  nodeId: string;
  node: string;
  state: string;
  desiredState: string;
  containerId: string;
  health: string;
  exitCode: number;
}

const BINARIES = ['/usr/bin/redis-server', '/usr/bin/redis-cli', '/usr/bin/socat'];
const skip = !isRoot() || !builtCli() || !fs.existsSync('/usr/lib/cni/bridge') || !BINARIES.every((b) => fs.existsSync(b));
if (skip) console.warn('stack-full skipped: needs root, a built CLI, the CNI plugins, redis-server, redis-cli and socat');

/** busybox plus the binaries and the shared libraries they load, at their own paths. */
async function buildRootfs(dir: string): Promise<void> {
  await buildBusyboxRootfs(dir);
  const libs = BINARIES.flatMap((b) =>
    execFileSync('ldd', [b], { encoding: 'utf8' })
      .split('\n')
      .map((l) => /(\/\S+)/.exec(l.includes('=>') ? l.split('=>')[1]! : l)?.[1])
      .filter((p): p is string => !!p),
  );
  for (const f of new Set([...BINARIES, ...libs])) {
    const to = path.join(dir, f);
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.copyFileSync(fs.realpathSync(f), to);
    fs.chmodSync(to, 0o755);
  }
}

const STACK = (image: string) => `
services:
  web:
    image: ${image}
    command: ["socat", "TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo web-ok"]
    ports: ["8080:80"]
    stop_grace_period: 1s
    deploy:
      replicas: 2
  redis:
    image: app:v1
    command: sh -c 'exec redis-server /etc/redis.conf --requirepass "$$(cat /run/secrets/redis_pass)"'
    volumes: [data:/data]
    secrets: [redis_pass]
    configs: [{source: redis_conf, target: /etc/redis.conf}]
    stop_grace_period: 2s
    healthcheck:
      test: redis-cli -a "$$(cat /run/secrets/redis_pass)" --no-auth-warning ping | grep -q PONG
      interval: 1s
      timeout: 2s
      retries: 3
    deploy:
      placement: {constraints: [node.hostname==h2]}
  seed:
    image: app:v1
    command: sh -c 'until redis-cli -h redis -a "$$(cat /run/secrets/redis_pass)" --no-auth-warning set greeting hello | grep -q OK; do sleep 0.5; done'
    secrets: [redis_pass]
    deploy:
      mode: replicated-job
volumes:
  data: {}
secrets:
  redis_pass: {file: ./redis_pass.txt}
configs:
  redis_conf: {file: ./redis.conf}
`;

describe.skipIf(skip)('a stack on the multi-host test bed (needs root, CNI plugins, redis, socat)', () => {
  let bed: Testbed;
  let rootfs = '';
  let dir = '';
  let agents: TestbedHost[] = [];
  const stackFile = (image: string): string => {
    const f = path.join(dir, 'stack.yml');
    fs.writeFileSync(f, STACK(image));
    return f;
  };
  const tasks = (): Promise<TaskJ[]> => bed.cliJson<TaskJ[]>(['stack', 'ps', 'st']);
  const live = (ts: TaskJ[], svc: string): TaskJ[] => ts.filter((t) => t.service === svc && t.desiredState === 'running' && t.state === 'running');
  const hostOf = (t: TaskJ): TestbedHost => agents.find((h) => h.name === t.node)!;
  const redisGet = async (t: TaskJ): Promise<string> =>
    (await hostOf(t).cli(['container', 'exec', t.containerId, 'sh', '-c', 'redis-cli -a "$(cat /run/secrets/redis_pass)" --no-auth-warning get greeting'])).stdout.trim();
  const converged = (): Promise<TaskJ[]> =>
    waitFor(
      'web 2 running, redis healthy, the seed job complete',
      async () => {
        const ts = await tasks();
        const redis = live(ts, 'st_redis');
        const seedDone = ts.some((t) => t.service === 'st_seed' && t.state === 'complete' && t.exitCode === 0);
        return live(ts, 'st_web').length === 2 && redis.length === 1 && redis[0]!.health === 'healthy' && seedDone ? ts : undefined;
      },
      90_000,
    );

  beforeAll(async () => {
    rootfs = fs.mkdtempSync('/tmp/flotilla-stack-rootfs-');
    await buildRootfs(rootfs);
    bed = await Testbed.create({
      managers: 1,
      agents: 2,
      managerAgent: false,
      prepareHost: async (h) => {
        const store = await ImageStore.open(h.dataDir);
        for (const ref of ['app:v1', 'app:v2']) await store.import(ref, rootfs, { config: { cmd: ['sh'] } });
      },
    });
    agents = bed.agents;
    dir = path.join(bed.root, 'stackfiles');
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'redis_pass.txt'), 'pw-0f3c9a');
    fs.writeFileSync(path.join(dir, 'redis.conf'), 'dir /data\nappendonly yes\nappendfsync always\nport 6379\n');
  }, 120_000);

  afterAll(async () => {
    if (bed) expect(await bed.destroy()).toEqual([]);
    if (rootfs) fs.rmSync(rootfs, { recursive: true, force: true });
  }, 120_000);

  it('deploys and converges: the published port answers on every host, the job wrote into Redis', async () => {
    const r = await bed.cli(['stack', 'deploy', '-c', stackFile('app:v1'), 'st']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const ts = await converged();
    for (const h of agents) {
      const got = await waitFor(`web on ${h.name}:8080`, async () => {
        const out = (await bed.hosts[0]!.exec(['socat', '-T2', '-', `TCP:${h.ip}:8080,connect-timeout=2`], { timeoutMs: 5000 })).stdout.trim();
        return out || undefined;
      }, 30_000);
      expect(got).toBe('web-ok');
    }
    const redis = live(ts, 'st_redis')[0]!;
    expect(redis.node).toBe('h2');
    expect(await redisGet(redis)).toBe('hello');
  }, 150_000);

  it('the data in the volume survives a forced update', async () => {
    const before = live(await tasks(), 'st_redis')[0]!;
    const r = await bed.cli(['service', 'update', '--force', '-d', 'st_redis']);
    expect(r.code).toBe(0);
    const after = await waitFor('a new healthy redis task', async () => {
      const t = live(await tasks(), 'st_redis')[0];
      return t && t.id !== before.id && t.health === 'healthy' ? t : undefined;
    }, 60_000);
    expect(await redisGet(after)).toBe('hello');
  }, 90_000);

  it('a redeploy with the web image changed updates only web', async () => {
    const before = await tasks();
    const keep = (ts: TaskJ[]) => ts.filter((t) => t.service !== 'st_web' && t.desiredState !== 'shutdown').map((t) => t.id).sort();
    const r = await bed.cli(['stack', 'deploy', '-c', stackFile('app:v2'), 'st']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual([
      expect.stringMatching(/^Updating service st_web \(id: \w+\): .*task\.container\.image/),
      'Service st_redis unchanged',
      'Service st_seed unchanged',
    ]);
    const after = await waitFor('web on app:v2', async () => {
      const ts = await tasks();
      const web = live(ts, 'st_web');
      return web.length === 2 && web.every((t) => !before.some((b) => b.id === t.id)) ? ts : undefined;
    }, 60_000);
    expect(keep(after)).toEqual(keep(before));
  }, 90_000);

  it('stack rm leaves no service, network, secret, config or container; the volume stays', async () => {
    const r = await bed.cli(['stack', 'rm', 'st']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect((await bed.cliJson<unknown[]>(['service', 'ls'])).length).toBe(0);
    expect((await bed.cliJson<Array<{ name: string }>>(['network', 'ls'])).map((n) => n.name).filter((n) => n.startsWith('st_'))).toEqual([]);
    expect(await bed.cliJson<unknown[]>(['secret', 'ls'])).toEqual([]);
    expect(await bed.cliJson<unknown[]>(['config', 'ls'])).toEqual([]);
    for (const h of agents)
      await waitFor(`no container on ${h.name}`, async () => JSON.parse((await h.cli(['container', 'ls', '-a', '--format', 'json'])).stdout || '[]').length === 0, 30_000);
    const vols = JSON.parse((await agents.find((h) => h.name === 'h2')!.cli(['volume', 'ls', '--format', 'json'])).stdout) as Array<{ name: string }>;
    expect(vols.map((v) => v.name)).toContain('st_data');
  }, 90_000);
});
