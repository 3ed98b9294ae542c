/**
 * Encryption at rest and autolock with real manager processes (docs/security.md):
 *  - nothing secret on disk: after a service with a recognisable env value is created and the join
 *    tokens exist, no file under the manager's data dir (raw bytes, recursively) holds the value,
 *    a token, the unlock key or "PRIVATE KEY";
 *  - autolock: a restarted manager stays locked (control calls answer FAILED_PRECONDITION "locked"
 *    with the hint), a wrong key is refused, the right one unlocks it with its state intact;
 *  - unlock-key --rotate: the old key is refused afterwards; autolock off: no longer locked.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, describe, expect, it } from 'vitest';
import { ControlClient, type ListServicesResponse, type ListTasksResponse } from '../gen/flotilla/v1/control.js';
import { Control } from '../cli/client.js';
import { CLI, builtCli, cli, start, waitFor, type CliResult, type Proc } from './helpers/procs.js';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-atrest-'));
const procs: Proc[] = [];

async function stop(p: Proc | undefined, sig: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (!p) return;
  if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill(sig);
  const t = setTimeout(() => p.child.kill('SIGKILL'), 15_000);
  await p.exited;
  clearTimeout(t);
}

afterAll(async () => {
  await Promise.all(procs.map((p) => stop(p)));
  fs.rmSync(root, { recursive: true, force: true });
}, 60_000);

interface Mgr {
  dir: string;
  sock: string;
  env: NodeJS.ProcessEnv;
  proc?: Proc;
}

function mgr(name: string): Mgr {
  const sock = path.join(root, `${name}.sock`);
  return { dir: path.join(root, name), sock, env: { FLOTILLA_HOST: `unix://${sock}` } };
}

/** Starts a manager and waits for "listening on" (or, with locked, for the "locked" line). */
async function launch(m: Mgr, extra: string[], locked = false): Promise<Proc> {
  const p = start(['manager', '--data-dir', m.dir, '--hostname', path.basename(m.dir), '--listen-addr', '127.0.0.1:0', '--control-socket', m.sock, '--heartbeat-period', '500ms', ...extra]);
  procs.push(p);
  m.proc = p;
  const want = locked ? /flotilla manager locked/ : /listening on /;
  await waitFor(locked ? 'manager locked' : 'manager ready', () => want.test(p.out.join('')) || (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 40_000, 50);
  return p;
}

/** `flotilla cluster unlock` with the key on stdin (never on the command line). */
function unlock(m: Mgr, key: string): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, 'cluster', 'unlock'], { env: { ...process.env, ...m.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const t = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('exit', (code) => {
      clearTimeout(t);
      resolve({ code: code ?? 1, stdout, stderr });
    });
    child.stdin.end(`${key}\n`);
  });
}

function filesUnder(dir: string): string[] {
  return fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((d) => d.isFile())
    .map((d) => path.join(d.parentPath, d.name));
}

/** Every file under dir holding one of the needles, as "file: needle". */
function inClear(dir: string, needles: string[]): string[] {
  const hits: string[] = [];
  for (const f of filesUnder(dir)) {
    const buf = fs.readFileSync(f);
    for (const n of needles) if (buf.includes(n)) hits.push(`${path.relative(dir, f)}: ${n.slice(0, 24)}`);
  }
  return hits;
}

async function serviceNames(m: Mgr): Promise<string[]> {
  const c = new Control(`unix:${m.sock}`);
  try {
    return (await c.call<unknown, ListServicesResponse>('listServices', {}, 10_000)).services.map((s) => s.spec!.name).sort();
  } finally {
    c.close();
  }
}

async function ok(r: Promise<CliResult>): Promise<string> {
  const res = await r;
  if (res.code !== 0) throw new Error(`exit ${res.code}: ${res.stderr}`);
  return res.stdout;
}

describe.skipIf(!builtCli())('encryption at rest and autolock (manager processes)', () => {
  it('no secret value, token or private key is on a manager disk in clear', async () => {
    const m = mgr('plain');
    // the manager's own state only: an in-process agent's runtime keeps its containers' config
    // (env included) on the node's disk, as Docker does (docs/security.md)
    await launch(m, ['--no-agent']);
    const value = `atrest-env-${randomBytes(8).toString('hex')}`;
    await ok(cli(['service', 'create', '--detach', '--name', 'web', '--env', `SECRET_VALUE=${value}`, '--replicas', '1', 'busybox:latest', 'sleep', '1000'], m.env));
    const managerToken = (await ok(cli(['cluster', 'join-token', 'manager', '-q'], m.env))).trim();
    const workerToken = (await ok(cli(['cluster', 'join-token', 'worker', '-q'], m.env))).trim();
    // FLTKN-1-<CA digest>-<secret>: the secret part is what must never be on disk
    expect(managerToken).toMatch(/^FLTKN-1-[0-9a-f]{64}-[0-9a-z]+$/);
    // the orchestrator made the task (a second copy of the spec in the log)
    await waitFor(
      'task created',
      async () => {
        const c = new Control(`unix:${m.sock}`);
        try {
          return (await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: 'web', nodeId: '', desiredRunning: false }, 5000)).tasks.length > 0;
        } finally {
          c.close();
        }
      },
      30_000,
    );
    const needles = [value, managerToken, workerToken, managerToken.split('-')[3]!, workerToken.split('-')[3]!, 'PRIVATE KEY'];
    // the state is on disk (the needles would be found in a plaintext log), encrypted
    expect(filesUnder(m.dir).some((f) => f.endsWith('.wal'))).toBe(true);
    expect(fs.existsSync(path.join(m.dir, 'keys.json'))).toBe(true);
    expect(inClear(m.dir, needles)).toEqual([]);
    // also after a clean stop (final fsyncs, key file follow-up) and a restart that replays the log
    await stop(m.proc);
    expect(inClear(m.dir, needles)).toEqual([]);
    await launch(m, ['--no-agent']);
    expect(await serviceNames(m)).toEqual(['web']);
    const spec = JSON.parse(await ok(cli(['service', 'inspect', 'web'], m.env))) as unknown;
    expect(JSON.stringify(spec)).toContain(value);
    await stop(m.proc);
    expect(inClear(m.dir, needles)).toEqual([]);
  }, 180_000);

  it('autolock: a restarted manager stays locked until unlocked; wrong and rotated keys are refused', async () => {
    const m = mgr('locked');
    await launch(m, ['--no-agent', '--autolock']);
    await ok(cli(['service', 'create', '--name', 'before-lock', '--replicas', '0', 'busybox:latest'], m.env));
    const key = (await ok(cli(['cluster', 'unlock-key', '-q'], m.env))).trim();
    expect(key).toMatch(/^FLTKEY-1-[A-Za-z0-9_-]{43}$/);
    // GetCluster does not show it
    expect(await ok(cli(['cluster', 'info', '--format', 'json'], m.env))).not.toContain(key);
    // unlocking a manager that is not locked
    const notLocked = await unlock(m, key);
    expect(notLocked.code).not.toBe(0);
    expect(notLocked.stderr).toMatch(/not locked/);

    await stop(m.proc);
    expect(inClear(m.dir, [key, key.slice('FLTKEY-1-'.length)])).toEqual([]);
    expect(JSON.parse(fs.readFileSync(path.join(m.dir, 'keys.json'), 'utf8'))).not.toHaveProperty('kek');

    await launch(m, ['--no-agent', '--autolock'], true);
    // control calls answer "locked" with the way out
    const info = await cli(['service', 'ls'], m.env);
    expect(info.code).not.toBe(0);
    expect(info.stderr).toMatch(/this manager is locked \(autolock\): run `flotilla cluster unlock`/);
    expect(info.stderr.trim().split('\n')).toHaveLength(1);
    const raw = new ControlClient(`unix:${m.sock}`, grpc.credentials.createInsecure());
    try {
      const err = await new Promise<grpc.ServiceError | null>((resolve) => raw.listServices({}, (e) => resolve(e)));
      expect(err?.code).toBe(grpc.status.FAILED_PRECONDITION);
    } finally {
      raw.close();
    }
    // a locked manager does not serve its TCP address (no raft, no agents) meanwhile
    expect(m.proc!.out.join('')).not.toMatch(/listening on/);

    // wrong keys: one clear line, still locked
    const wrong = await unlock(m, `FLTKEY-1-${randomBytes(32).toString('base64url')}`);
    expect(wrong.code).not.toBe(0);
    expect(wrong.stderr).toBe('flotilla: wrong unlock key: this manager stays locked\n');
    const junk = await unlock(m, 'not-a-key');
    expect(junk.code).not.toBe(0);
    expect(junk.stderr).toMatch(/^flotilla: invalid unlock key: expected FLTKEY-1- /);
    expect(junk.stderr).not.toContain('not-a-key');
    expect((await cli(['service', 'ls'], m.env)).stderr).toMatch(/locked/);

    // the right key: it starts, with its state
    const good = await unlock(m, key);
    expect(good.stderr).toBe('');
    expect(good.stdout).toBe('manager unlocked\n');
    await waitFor('listening after unlock', () => /listening on /.test(m.proc!.out.join('')), 40_000, 50);
    expect(await serviceNames(m)).toEqual(['before-lock']);

    // rotation: the old key no longer unlocks it, the new one does
    const key2 = (await ok(cli(['cluster', 'unlock-key', '--rotate', '-q'], m.env))).trim();
    expect(key2).toMatch(/^FLTKEY-1-/);
    expect(key2).not.toBe(key);
    expect((await ok(cli(['cluster', 'unlock-key', '-q'], m.env))).trim()).toBe(key2);
    await ok(cli(['service', 'create', '--name', 'after-rotate', '--replicas', '0', 'busybox:latest'], m.env));
    await stop(m.proc);
    expect(inClear(m.dir, [key, key2])).toEqual([]);
    await launch(m, ['--no-agent'], true);
    const old = await unlock(m, key);
    expect(old.stderr).toBe('flotilla: wrong unlock key: this manager stays locked\n');
    expect((await unlock(m, key2)).code).toBe(0);
    await waitFor('listening after unlock', () => /listening on /.test(m.proc!.out.join('')), 40_000, 50);
    expect(await serviceNames(m)).toEqual(['after-rotate', 'before-lock']);

    // autolock off: the next restart is not locked
    expect(await ok(cli(['cluster', 'update', '--autolock=false'], m.env))).toBe('autolock is off\n');
    const none = await cli(['cluster', 'unlock-key'], m.env);
    expect(none.code).not.toBe(0);
    expect(none.stderr).toMatch(/autolock is off/);
    await stop(m.proc);
    await launch(m, ['--no-agent']);
    expect(await serviceNames(m)).toEqual(['after-rotate', 'before-lock']);
    await stop(m.proc);
  }, 240_000);
});
