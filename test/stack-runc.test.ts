/**
 * `flotilla stack` end to end on real runc: a one-node cluster (one test bed host, so that the stack's
 * overlay networks live in the host's own network namespace), a stack of two services, a secret, a
 * config and a network (and the default network of the service that names none):
 *
 *  - an invalid file: one line naming the key, nothing created; an unsupported key: a warning;
 *  - deploy: objects named STACK_KEY, labelled com.docker.stack.namespace; the secret, config and
 *    interpolated variable inside the running containers; stack ls/services/ps;
 *  - a redeploy of the same file changes nothing (every task kept); a redeploy with one variable
 *    changed updates that service only (the other's task ids unchanged); a changed config is refused
 *    before anything changes;
 *  - --prune removes the service the file no longer names; a failure midway (a published port another
 *    service holds) names the step and what was done before it;
 *  - stack rm leaves no service, network, secret, config or container.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { builtCli, isRoot, waitFor, type CliResult } from './helpers/procs.js';
import { importBusybox } from './helpers/busybox.js';
import { Testbed } from './helpers/testbed.js';

interface TaskJ {
  id: string;
  service: string;
  state: string;
  desiredState: string;
  containerId: string;
}
interface Named {
  id: string;
  name: string;
  labels: Record<string, string>;
}

const skip = !isRoot() || !builtCli() || !fs.existsSync('/usr/lib/cni/bridge');
if (skip) console.warn('stack-runc skipped: needs root, a built CLI (npx tsc) and the CNI plugins');

const STACK = `
services:
  web:
    image: busybox:latest
    command: ["sh", "-c", "echo GREETING=$$GREETING; exec sleep 1000"]
    environment:
      GREETING: \${GREETING:-hello}
    stop_grace_period: 500ms
    networks: [back]
    secrets: [token]
    configs: [{source: app, target: /etc/app.conf, mode: 0440}]
    deploy:
      replicas: 2
      labels: {tier: front}
      update_config: {parallelism: 2, monitor: 500ms}
  worker:
    image: busybox:latest
    command: sleep 1000
    stop_grace_period: 500ms
    restart: always
networks:
  back: {}
secrets:
  token: {file: ./token.txt}
configs:
  app: {file: ./app.conf}
`;

describe.skipIf(skip)('stack deploy on real runc (needs root)', () => {
  let bed: Testbed;
  let dir = '';
  const file = (name: string, text: string): string => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, text);
    return f;
  };
  const cli = (args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> => bed.cli(args, env);
  const json = <T>(args: string[]): Promise<T> => bed.cliJson<T>(args);
  const running = async (): Promise<TaskJ[]> => (await json<TaskJ[]>(['stack', 'ps', 'st'])).filter((t) => t.desiredState === 'running' && t.state === 'running');
  const ids = (ts: TaskJ[], svc: string): string[] => ts.filter((t) => t.service === svc).map((t) => t.id).sort();
  const exec = (id: string, cmd: string[]) => bed.hosts[0]!.cli(['container', 'exec', id, ...cmd]);
  const everything = async () => ({
    services: (await json<Named[]>(['service', 'ls'])).map((s) => s.name),
    // the routing mesh's network (made with the first published port) is the cluster's, not a stack's
    networks: (await json<Named[]>(['network', 'ls'])).map((n) => n.name).filter((n) => n !== 'ingress'),
    secrets: (await json<Named[]>(['secret', 'ls'])).map((n) => n.name),
    configs: (await json<Named[]>(['config', 'ls'])).map((n) => n.name),
  });
  const converged = (web: number, worker: number) =>
    waitFor(`st_web ${web}, st_worker ${worker} running`, async () => {
      const r = await running();
      return r.filter((t) => t.service === 'st_web').length === web && r.filter((t) => t.service === 'st_worker').length === worker ? r : undefined;
    }, 40_000);

  beforeAll(async () => {
    bed = await Testbed.create({ managers: 1, agents: 0, prepareHost: (h) => importBusybox(h.dataDir) });
    dir = path.join(bed.root, 'stackfiles');
    fs.mkdirSync(dir);
    file('token.txt', 's3cr3t-token\n');
    file('app.conf', 'listen=8080\n');
  }, 60_000);

  afterAll(async () => {
    if (!bed) return;
    const problems = await bed.destroy();
    expect(problems).toEqual([]);
  }, 60_000);

  it('an invalid file gets one line naming the key, and nothing is created', async () => {
    const bad = file('bad.yml', STACK.replace('replicas: 2', 'replicas: two'));
    const r = await cli(['stack', 'deploy', '-c', bad, 'st']);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n').filter((l) => !l.startsWith('warning:'))).toEqual(['flotilla: services.web.deploy.replicas: must be a non-negative integer, got "two"']);
    // the secret of an unknown variable: refused before anything exists
    const req = file('req.yml', STACK.replace('${GREETING:-hello}', '${GREETING:?set GREETING}'));
    const r2 = await cli(['stack', 'deploy', '-c', req, 'st'], { GREETING: '' });
    expect(r2.stderr).toContain('flotilla: services.web.environment.GREETING: required variable GREETING is missing a value: set GREETING');
    expect(await everything()).toEqual({ services: [], networks: [], secrets: [], configs: [] });
  });

  it('deploys: networks, secret, config, then services, named and labelled by the stack', async () => {
    const f = file('stack.yml', STACK);
    const r = await cli(['stack', 'deploy', '-c', f, 'st']);
    expect(r.stderr).toBe('warning: services.worker.restart: not supported by flotilla stacks, ignored\n');
    expect(r.code).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual([
      'Creating network st_back',
      'Creating network st_default',
      'Creating secret st_token',
      'Creating config st_app',
      'Creating service st_web',
      'Creating service st_worker',
    ]);
    expect(await everything()).toEqual({ services: ['st_web', 'st_worker'], networks: ['st_back', 'st_default'], secrets: ['st_token'], configs: ['st_app'] });
    for (const kind of ['network', 'secret', 'config', 'service']) for (const o of await json<Named[]>([kind, 'ls'])) expect(o.labels ?? (o as { spec?: { labels: Record<string, string> } }).spec?.labels).toMatchObject({ 'com.docker.stack.namespace': 'st' });
    const [web] = await json<Array<{ spec: { labels: Record<string, string>; task: { container: { labels: Record<string, string> } } } }>>(['service', 'inspect', 'st_web']);
    expect(web!.spec.labels).toEqual({ tier: 'front', 'com.docker.stack.namespace': 'st', 'com.docker.stack.image': 'busybox:latest' });
    expect(web!.spec.task.container.labels).toEqual({ 'com.docker.stack.namespace': 'st' });

    const tasks = await converged(2, 1);
    const w = tasks.find((t) => t.service === 'st_web')!;
    expect((await exec(w.containerId, ['cat', '/run/secrets/token'])).stdout).toBe('s3cr3t-token\n');
    expect((await exec(w.containerId, ['cat', '/etc/app.conf'])).stdout).toBe('listen=8080\n');
    expect((await exec(w.containerId, ['stat', '-c', '%a', '/etc/app.conf'])).stdout.trim()).toBe('440');
    expect((await exec(w.containerId, ['sh', '-c', 'echo $GREETING'])).stdout).toBe('hello\n');
  });

  it('stack ls, services and ps, as tables and as JSON', async () => {
    expect(await json<unknown[]>(['stack', 'ls'])).toEqual([{ name: 'st', services: 2 }]);
    const ls = await cli(['stack', 'ls']);
    expect(ls.stdout.split('\n')[0]).toMatch(/^NAME\s+SERVICES$/);
    expect(ls.stdout).toMatch(/^st\s+2$/m);
    const svcs = await json<Array<{ name: string; replicas: number; running: number }>>(['stack', 'services', 'st']);
    expect(svcs.map((s) => [s.name, s.replicas, s.running])).toEqual([
      ['st_web', 2, 2],
      ['st_worker', 1, 1],
    ]);
    const table = await cli(['stack', 'services', 'st']);
    expect(table.stdout.split('\n')[0]).toMatch(/^ID\s+NAME\s+MODE\s+REPLICAS\s+IMAGE\s+PORTS$/);
    expect(table.stdout).toMatch(/st_web\s+replicated\s+2\/2\s+busybox:latest/);
    const ps = await cli(['stack', 'ps', 'st']);
    expect(ps.stdout.split('\n')[0]).toMatch(/^ID\s+NAME\s+IMAGE\s+NODE\s+DESIRED STATE\s+CURRENT STATE\s+HEALTH\s+ERROR$/);
    expect(ps.stdout.match(/Running/g)?.length).toBeGreaterThanOrEqual(3);
    const none = await cli(['stack', 'ps', 'nope']);
    expect([none.code, none.stderr]).toEqual([1, 'flotilla: nothing found in stack: nope\n']);
  });

  it('a redeploy changes only the service whose spec changed', async () => {
    const f = path.join(dir, 'stack.yml');
    const before = await running();
    const same = await cli(['stack', 'deploy', '-c', f, 'st']);
    expect(same.code).toBe(0);
    expect(same.stdout.trim().split('\n')).toEqual(['Service st_web unchanged', 'Service st_worker unchanged']);
    expect((await running()).map((t) => t.id).sort()).toEqual(before.map((t) => t.id).sort());

    const upd = await cli(['stack', 'deploy', '-c', f, 'st'], { GREETING: 'changed' });
    expect(upd.code).toBe(0);
    expect(upd.stdout.trim().split('\n')).toEqual([expect.stringMatching(/^Updating service st_web \(id: \w+\): task\.container\.env$/), 'Service st_worker unchanged']);
    const after = await waitFor('st_web replaced', async () => {
      const r = await running();
      const web = ids(r, 'st_web');
      return web.length === 2 && web.every((id) => !ids(before, 'st_web').includes(id)) ? r : undefined;
    }, 40_000);
    expect(ids(after, 'st_worker')).toEqual(ids(before, 'st_worker'));
    const w = after.find((t) => t.service === 'st_web')!;
    expect((await exec(w.containerId, ['sh', '-c', 'echo $GREETING'])).stdout).toBe('changed\n');
  });

  it('a config whose content changed is refused before anything changes', async () => {
    const before = (await running()).map((t) => t.id).sort();
    fs.writeFileSync(path.join(dir, 'app.conf'), 'listen=9090\n');
    try {
      const r = await cli(['stack', 'deploy', '-c', path.join(dir, 'stack.yml'), 'st']);
      expect(r.code).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr).toContain('flotilla: configs.app: config "st_app" exists with other content, and a config cannot change');
    } finally {
      fs.writeFileSync(path.join(dir, 'app.conf'), 'listen=8080\n');
    }
    expect((await running()).map((t) => t.id).sort()).toEqual(before);
  });

  it('--prune removes the services the files no longer name (an override file drops none)', async () => {
    const base = path.join(dir, 'stack.yml');
    const webOnly = file('web-only.yml', STACK.replace(/ {2}worker:\n( {4}.*\n)+/, ''));
    const keep = await cli(['stack', 'deploy', '-c', webOnly, 'st'], { GREETING: 'changed' });
    expect(keep.stdout).toBe('Service st_web unchanged\n');
    expect((await everything()).services).toEqual(['st_web', 'st_worker']);
    // an override file (-c base -c override) with one change for the worker: the merge keeps both
    const over = file('override.yml', 'services:\n  worker:\n    environment: [MODE=busy]\n');
    const both = await cli(['stack', 'deploy', '-c', base, '-c', over, 'st'], { GREETING: 'changed' });
    expect(both.stdout.trim().split('\n')).toEqual(['Service st_web unchanged', expect.stringMatching(/^Updating service st_worker \(id: \w+\): task\.container\.env$/)]);
    const pruned = await cli(['stack', 'deploy', '--prune', '-c', webOnly, 'st'], { GREETING: 'changed' });
    expect(pruned.code).toBe(0);
    expect(pruned.stdout.trim().split('\n')).toEqual(['Service st_web unchanged', 'Removing service st_worker']);
    expect((await everything()).services).toEqual(['st_web']);
    // the default network stays until the stack goes (as in Docker)
    expect(await json<unknown[]>(['stack', 'ls'])).toEqual([{ name: 'st', services: 1 }]);
  });

  it('a failure midway names the step and what was done before it', async () => {
    const holder = await cli(['service', 'create', '-d', '--name', 'holder', '--stop-grace-period', '500ms', '-p', '8080:80', 'busybox:latest', 'sleep', '1000']);
    expect(holder.code).toBe(0);
    try {
      const f = file('clash.yml', 'services:\n  a: {image: "busybox:latest", command: sleep 1000, stop_grace_period: 500ms}\n  b: {image: "busybox:latest", command: sleep 1000, ports: ["8080:80"]}\n');
      const r = await cli(['stack', 'deploy', '-c', f, 'other']);
      expect(r.code).toBe(1);
      expect(r.stdout).toBe('Creating network other_default\nCreating service other_a\nCreating service other_b\n');
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^flotilla: stack deploy stopped at service other_b: .*8080.*; done before the failure: network other_default created, service other_a created \(fix the file and deploy again, or remove the stack with flotilla stack rm other\)\n$/);
    } finally {
      expect((await cli(['stack', 'rm', 'other'])).code).toBe(0);
      expect((await cli(['service', 'rm', 'holder'])).code).toBe(0);
    }
    expect((await everything()).services).toEqual(['st_web']);
  });

  it('stack rm leaves no service, network, secret, config or container behind', async () => {
    const r = await cli(['stack', 'rm', 'st']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual(['Removing service st_web', 'Removing secret st_token', 'Removing config st_app', 'Removing network st_back', 'Removing network st_default']);
    expect(await everything()).toEqual({ services: [], networks: [], secrets: [], configs: [] });
    await waitFor('no container left', async () => (await json<unknown[]>(['container', 'ls', '-a', '--data-dir', bed.hosts[0]!.dataDir])).length === 0, 30_000);
    expect(await json<unknown[]>(['stack', 'ls'])).toEqual([]);
    const again = await cli(['stack', 'rm', 'st']);
    expect([again.code, again.stderr]).toEqual([0, 'Nothing found in stack: st\n']);
  });
});
