/**
 * Secrets and configs end to end on real runc, with two nodes: a manager with its in-process agent
 * (m1) and a separate agent process (w2), each with its own data dir and run root.
 *
 *  - bad input (bad name, too big, unknown secret in --secret, bad --secret field): one clear line,
 *    nothing created;
 *  - the content, owner and mode inside the container (`container exec` cat/stat), read-only;
 *  - not present on a node without a task using it, and on no disk of any node (every file under each
 *    data dir is read and searched for the value; the run root, where the files live, is a tmpfs);
 *  - gone from the node when the task ends (the container still exists, stopped);
 *  - `service update --secret-rm a --secret-add b,target=same` swaps the content;
 *  - `secret rm` refused while a service uses it, naming the service;
 *  - nothing left anywhere once the services are removed.
 *
 * The disk check covers every file of every data dir, the manager's Raft log included (it is encrypted
 * at rest, see docs/security.md).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, TestCluster, builtCli, cli, cliJson, isRoot, waitFor, type CliResult } from './helpers/procs.js';
import type { TaskJson } from '../cli/format.js';
import { importBusybox } from './helpers/busybox.js';

type TaskJ = TaskJson;

const TMPFS_MAGIC = 0x01021994;
const skip = !isRoot() || !builtCli();

/** Runs the CLI with `input` on its standard input. */
function cliStdin(args: string[], env: NodeJS.ProcessEnv, input: string | Buffer): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, stdout, stderr });
    });
    child.stdin.on('error', () => {});
    child.stdin.end(input);
  });
}

/** Every regular file under dir (symlinks not followed) whose bytes contain needle. */
function filesContaining(dir: string, needle: string, skipDirs: string[] = []): string[] {
  const hits: string[] = [];
  const want = Buffer.from(needle);
  const walk = (d: string): void => {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(d, { withFileTypes: true });
    } catch {
      return; // removed meanwhile
    }
    for (const e of entries) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) {
        if (!skipDirs.includes(p)) walk(p);
      } else if (e.isFile()) {
        try {
          if (fs.readFileSync(p).includes(want)) hits.push(p);
        } catch {
          // removed meanwhile
        }
      }
    }
  };
  walk(dir);
  return hits;
}

describe.skipIf(skip)('secrets and configs on real runc, two nodes (needs root)', () => {
  const c = new TestCluster('flotilla-secrets-');
  const m1 = path.join(c.root, 'm1');
  const w2 = path.join(c.root, 'w2');
  const runRoot = (dataDir: string) => fs.readFileSync(path.join(dataDir, 'run-root'), 'utf8').trim();
  const V1 = `s1-${randomBytes(16).toString('hex')}`;
  const V2 = `s2-${randomBytes(16).toString('hex')}`;
  const CONF = `listen=${randomBytes(8).toString('hex')}\n`;
  const exec = (dataDir: string, id: string, args: string[]) => cli(['container', 'exec', '--data-dir', dataDir, id, ...args]);
  const tasks = async (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);
  const runningTask = (svc: string) =>
    waitFor(`a running task of ${svc}`, async () => (await tasks(svc)).find((t) => t.desiredState === 'running' && t.state === 'running'), 60_000);
  /** The value's hits on a node: its data dir (but a manager's Raft dir) and its run root. */
  const onNode = (dataDir: string, value: string) => [...filesContaining(dataDir, value), ...filesContaining(runRoot(dataDir), value)];
  const oneLine = (r: CliResult) => {
    expect(r.code).not.toBe(0);
    expect(r.stdout).toBe('');
    expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
    return r.stderr.trim();
  };

  beforeAll(async () => {
    await importBusybox(m1);
    await importBusybox(w2);
    await c.startManager({ agent: true, runtime: 'runc' });
    await c.startAgent('w2', { runtime: 'runc' });
    await waitFor('both nodes ready', async () => (await cliJson<Array<{ status: string }>>(['node', 'ls'], c.env)).filter((n) => n.status === 'ready').length === 2, 30_000);
  }, 90_000);

  afterAll(async () => {
    try {
      await cli(['service', 'rm', 'app', 'app2'], c.env);
      for (const d of [m1, w2]) await waitFor('containers removed', async () => (await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', d])).length === 0, 20_000).catch(() => {});
      await c.stopAll();
      // what the agents did not remove, the runtime removes itself (mounts, cgroups, files)
      for (const d of [m1, w2])
        for (const ct of await cliJson<Array<{ id: string }>>(['container', 'ls', '-a', '--data-dir', d]).catch(() => [])) await cli(['container', 'rm', '-f', '--data-dir', d, ct.id]);
    } finally {
      await c.cleanup();
    }
  }, 180_000);

  it('refuses bad input with one clear line and creates nothing', async () => {
    expect(oneLine(await cliStdin(['secret', 'create', 'bad name', '-'], c.env, 'x'))).toBe(
      'flotilla: invalid secret name "bad name": use 1-64 letters, digits, "_", "." or "-", starting with a letter or digit',
    );
    const big = path.join(c.root, 'big');
    fs.writeFileSync(big, Buffer.alloc(500 * 1024 + 1, 'b'));
    expect(oneLine(await cli(['secret', 'create', 'big', big], c.env))).toBe('flotilla: invalid secret data: 512001 bytes, over the limit of 512000 bytes (500 KiB)');
    expect(oneLine(await cliStdin(['config', 'create', 'big', '-'], c.env, Buffer.alloc(600 * 1024, 'b')))).toBe('flotilla: invalid config data: over the limit of 512000 bytes (500 KiB)');
    expect(oneLine(await cliStdin(['secret', 'create', 'empty', '-'], c.env, ''))).toMatch(/^flotilla: invalid secret data: empty/);
    expect(oneLine(await cli(['secret', 'create', 'nofile', path.join(c.root, 'nope')], c.env))).toMatch(/^flotilla: invalid file ".*nope": no such file$/);
    expect(oneLine(await cli(['service', 'create', '--name', 'bad', '-d', '--secret', 'nope', 'busybox:latest', 'sleep', '100'], c.env))).toBe(
      'flotilla: invalid secret "nope": secret not found (create it with flotilla secret create)',
    );
    expect(oneLine(await cli(['service', 'create', '--name', 'bad', '-d', '--secret', 'source=x,colour=red', 'busybox:latest', 'sleep', '100'], c.env))).toBe(
      'flotilla: invalid --secret "source=x,colour=red": unknown field "colour" (use source, target, uid, gid, mode)',
    );
    expect(oneLine(await cli(['service', 'create', '--name', 'bad', '-d', '--secret', 'x,mode=999', 'busybox:latest', 'sleep', '100'], c.env))).toMatch(/^flotilla: invalid --secret mode "999": expected an octal mode/);
    expect(await cliJson<unknown[]>(['secret', 'ls'], c.env)).toEqual([]);
    expect(await cliJson<unknown[]>(['config', 'ls'], c.env)).toEqual([]);
    expect(await cliJson<unknown[]>(['service', 'ls'], c.env)).toEqual([]);
  });

  it('mounts a secret and a config read-only from a tmpfs, with their owner and mode', async () => {
    const s1 = await cliStdin(['secret', 'create', 's1', '-', '--label', 'team=a'], c.env, V1);
    expect(s1.stderr).toBe('');
    expect(s1.code).toBe(0);
    const conf = path.join(c.root, 'app.conf');
    fs.writeFileSync(conf, CONF);
    expect((await cli(['config', 'create', 'c1', conf], c.env)).code).toBe(0);
    fs.rmSync(conf);
    const r = await cli(
      ['service', 'create', '--name', 'app', '--constraint', 'node.hostname==m1', '--secret', 'source=s1,target=app.key,uid=65534,gid=65534,mode=0400', '--config', 'source=c1,target=/etc/app/app.conf,mode=0440', 'busybox:latest', 'sleep', '1000'],
      c.env,
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const t = await runningTask('app');
    expect((await exec(m1, t.containerId, ['cat', '/run/secrets/app.key'])).stdout).toBe(V1);
    expect((await exec(m1, t.containerId, ['stat', '-c', '%a %u %g', '/run/secrets/app.key'])).stdout.trim()).toBe('400 65534 65534');
    expect((await exec(m1, t.containerId, ['cat', '/etc/app/app.conf'])).stdout).toBe(CONF);
    expect((await exec(m1, t.containerId, ['stat', '-c', '%a %u %g', '/etc/app/app.conf'])).stdout.trim()).toBe('440 0 0');
    // read-only, even for root in the container
    const write = await exec(m1, t.containerId, ['sh', '-c', 'echo x >> /run/secrets/app.key']);
    expect(write.code).not.toBe(0);
    expect((await exec(m1, t.containerId, ['cat', '/run/secrets/app.key'])).stdout).toBe(V1);
    // on the host, the files are in the container's directory of the run root, a tmpfs
    const hits = filesContaining(runRoot(m1), V1);
    expect(hits).toHaveLength(1);
    expect(hits[0]).toMatch(new RegExp(`/containers/${t.containerId}/files/0$`));
    expect(fs.statfsSync(hits[0]!).type).toBe(TMPFS_MAGIC);
    // inspect never shows a secret's value; a config's, base64
    const insp = await cli(['secret', 'inspect', 's1'], c.env);
    expect(insp.stdout).not.toContain(V1);
    expect(insp.stdout).not.toContain(Buffer.from(V1).toString('base64'));
    expect(JSON.parse(insp.stdout)[0]).toMatchObject({ name: 's1', labels: { team: 'a' } });
    expect(JSON.parse((await cli(['config', 'inspect', 'c1'], c.env)).stdout)[0].data).toBe(Buffer.from(CONF).toString('base64'));
    expect((await cli(['secret', 'ls'], c.env)).stdout).toMatch(/^ID\s+NAME\s+CREATED\s+UPDATED\n\S+\s+s1\s+/);
  });

  it('is on no node without a task using it, and on no disk of any node', async () => {
    expect(onNode(w2, V1)).toEqual([]);
    expect(onNode(w2, CONF)).toEqual([]);
    // m1: only the mounted files on its tmpfs run root (and, until encryption at rest, its Raft log)
    const t = (await tasks('app')).find((x) => x.state === 'running')!;
    expect(onNode(m1, V1)).toEqual([path.join(runRoot(m1), 'containers', t.containerId, 'files', '0')]);
    expect(filesContaining(m1, V1)).toEqual([]);
    // no daemon printed it
    for (const p of c.procs) expect([...p.out, ...p.err].join('')).not.toContain(V1);
  });

  it('reaches the other node only with a task there, and is gone from it when the task ends', async () => {
    const r = await cli(
      ['service', 'create', '--name', 'app2', '--constraint', 'node.hostname==w2', '--restart-condition', 'none', '--secret', 's1', 'busybox:latest', 'sh', '-c', 'while [ ! -e /tmp/stop ]; do sleep 0.1; done'],
      c.env,
    );
    expect(r.code).toBe(0);
    const t = await runningTask('app2');
    expect(t.node).toBe('w2');
    expect((await exec(w2, t.containerId, ['cat', '/run/secrets/s1'])).stdout).toBe(V1);
    expect((await exec(w2, t.containerId, ['stat', '-c', '%a %u %g', '/run/secrets/s1'])).stdout.trim()).toBe('444 0 0');
    expect(onNode(w2, V1)).toEqual([path.join(runRoot(w2), 'containers', t.containerId, 'files', '0')]);
    // the task ends (exit 0, no restart): its container stays, stopped, without the file
    expect((await exec(w2, t.containerId, ['touch', '/tmp/stop'])).code).toBe(0);
    await waitFor('app2 complete', async () => (await tasks('app2')).find((x) => x.id === t.id)?.state === 'complete', 30_000);
    expect(onNode(w2, V1)).toEqual([]);
    const ctrs = await cliJson<Array<{ id: string; state: string }>>(['container', 'ls', '-a', '--data-dir', w2]);
    expect(ctrs.find((x) => x.id === t.containerId)?.state).not.toBe('running');
  });

  it('refuses secret rm while a service uses it, naming the service', async () => {
    expect(oneLine(await cli(['secret', 'rm', 's1'], c.env))).toBe(
      'flotilla: secret "s1" is in use by services app, app2: remove it from them first (service update --secret-rm s1)',
    );
    expect(oneLine(await cli(['config', 'rm', 'c1'], c.env))).toMatch(/^flotilla: config "c1" is in use by service app:/);
    expect((await cliJson<unknown[]>(['secret', 'ls'], c.env)).length).toBe(1);
  });

  it('swaps the content with one update: --secret-rm old --secret-add new,target=same', async () => {
    expect((await cliStdin(['secret', 'create', 's2', '-'], c.env, V2)).code).toBe(0);
    const old = await runningTask('app');
    const r = await cli(['service', 'update', 'app', '-q', '--secret-rm', 's1', '--secret-add', 's2,target=app.key,uid=65534,gid=65534,mode=0400'], c.env, 120_000);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const t = await runningTask('app');
    expect(t.id).not.toBe(old.id);
    expect((await exec(m1, t.containerId, ['cat', '/run/secrets/app.key'])).stdout).toBe(V2);
    expect((await exec(m1, t.containerId, ['stat', '-c', '%a %u %g', '/run/secrets/app.key'])).stdout.trim()).toBe('400 65534 65534');
    // the old value is gone from the node with the old task
    await waitFor('the old secret gone from m1', () => onNode(m1, V1).length === 0, 30_000);
    expect(onNode(w2, V2)).toEqual([]);
    // s1 is still named by app2 (ended, but the service still uses it); once app2 goes, s1 can go
    expect(oneLine(await cli(['secret', 'rm', 's1'], c.env))).toMatch(/in use by service app2:/);
    expect((await cli(['service', 'rm', 'app2'], c.env)).code).toBe(0);
    const rm = await cli(['secret', 'rm', 's1'], c.env);
    expect(rm.stderr).toBe('');
    expect(rm.stdout).toBe('s1\n');
  });

  it('leaves nothing on any node once the service is removed', async () => {
    expect((await cli(['service', 'rm', 'app'], c.env)).code).toBe(0);
    await waitFor('containers removed', async () => (await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', m1])).length === 0, 30_000);
    for (const d of [m1, w2]) for (const v of [V1, V2, CONF]) expect(onNode(d, v)).toEqual([]);
    expect(oneLine(await cli(['secret', 'rm', 's1'], c.env))).toBe('flotilla: secret "s1" not found');
    expect((await cli(['secret', 'rm', 's2'], c.env)).code).toBe(0);
    expect((await cli(['config', 'rm', 'c1'], c.env)).code).toBe(0);
  });
});
