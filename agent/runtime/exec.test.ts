/**
 * runc exec (and so every health check) spawns on the spawner thread, never on the daemon's main
 * thread: checked on real runc containers by sampling the main thread's handles for a child process while
 * the exec runs, and by the spawner's own count. Also the exec semantics: exit code, output as it comes,
 * timeout and abort.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HealthState } from '../../gen/flotilla/v1/objects.js';
import { mainThreadSpawned } from '../../testing/spawns.js';
import { importBusybox } from '../../test/helpers/busybox.js';
import { flotillaCgroups, mountsUnder, removeRunRoots } from '../../test/helpers/runtime-debris.js';
import { monitorHealth } from '../worker/health.js';
import { RuncRuntime } from './containers.js';
import { spawnerStats } from './spawner.js';

const isRoot = process.getuid?.() === 0;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

describe('the spawn rule', () => {
  it('no daemon code outside spawner.ts imports node:child_process (images.ts: the CLI-only directory import)', async () => {
    const allowed = new Set(['agent/runtime/spawner.ts', 'agent/runtime/images.ts']);
    const offenders: string[] = [];
    for (const top of ['agent', 'manager', 'common']) {
      for (const f of await fs.readdir(path.join(ROOT, top), { recursive: true })) {
        const rel = path.join(top, f);
        if (!rel.endsWith('.ts') || rel.endsWith('.test.ts') || allowed.has(rel)) continue;
        const text = await fs.readFile(path.join(ROOT, rel), 'utf8');
        if (/from ['"](node:)?child_process['"]|import\(['"](node:)?child_process['"]\)|require\(['"](node:)?child_process['"]\)/.test(text)) offenders.push(rel);
      }
    }
    expect(offenders).toEqual([]);
  });
});

describe.skipIf(!isRoot)('runc exec on the spawner thread (needs root, runc, conmon)', () => {
  let dataDir: string;
  let rt: RuncRuntime;
  const ids: string[] = [];

  beforeAll(async () => {
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-exec-'));
    await importBusybox(dataDir);
    rt = await RuncRuntime.open(dataDir);
    const c = await rt.create({ name: 'ex', image: 'busybox', command: ['sleep', '1000'] });
    ids.push(c.id);
    await rt.start(c.id);
  });

  afterAll(async () => {
    if (!rt) return;
    for (const c of await rt.list()) await rt.remove(c.id, true).catch(() => undefined);
    rt.close();
    expect(mountsUnder(dataDir)).toEqual([]);
    expect(flotillaCgroups(ids)).toEqual([]);
    await fs.rm(dataDir, { recursive: true, force: true });
    removeRunRoots(dataDir);
  });

  it('runs the command off the main thread and returns its exit code and output, streaming it as it comes', async () => {
    const out = new PassThrough();
    const err = new PassThrough();
    const seen: string[] = [];
    out.on('data', (d: Buffer) => seen.push(`out:${d.toString()}`));
    err.on('data', (d: Buffer) => seen.push(`err:${d.toString()}`));
    const before = spawnerStats();
    const { value: r, sawChild } = await mainThreadSpawned(() =>
      rt.exec('ex', ['sh', '-c', 'echo one; sleep 0.2; echo two >&2; sleep 0.2; exit 3'], { stdout: out, stderr: err }),
    );
    expect(r).toEqual({ exitCode: 3, output: 'one\ntwo\n' });
    expect(seen).toEqual(['out:one\n', 'err:two\n']);
    expect(sawChild).toBe(false);
    const after = spawnerStats();
    expect(after.thread - before.thread).toBe(1);
    expect(after.main - before.main).toBe(0);
  });

  it('kills the command on timeout (DEADLINE_EXCEEDED) and on abort (ABORTED)', async () => {
    const t0 = Date.now();
    await expect(rt.exec('ex', ['sleep', '30'], { timeoutMs: 300 })).rejects.toMatchObject({ code: 'DEADLINE_EXCEEDED' });
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 300);
    await expect(rt.exec('ex', ['sleep', '31'], { signal: ac.signal })).rejects.toMatchObject({ code: 'ABORTED' });
    expect(Date.now() - t0).toBeLessThan(10_000);
    // the commands were killed, not left running in the container
    const ps = await rt.exec('ex', ['ps', '-o', 'args']);
    expect(ps.output).not.toMatch(/sleep 3[01]/);
  });

  it('a health check runs its command on the spawner thread', async () => {
    const ac = new AbortController();
    const states: HealthState[] = [];
    const before = spawnerStats();
    const { sawChild } = await mainThreadSpawned(() =>
      monitorHealth(rt, 'ex', { command: ['true'], intervalMs: 50, timeoutMs: 5000, startPeriodMs: 0, retries: 1 }, ac.signal, (s) => {
        states.push(s);
        if (s === HealthState.HEALTH_STATE_HEALTHY) ac.abort();
      }),
    );
    expect(states).toEqual([HealthState.HEALTH_STATE_STARTING, HealthState.HEALTH_STATE_HEALTHY]);
    expect(sawChild).toBe(false);
    const after = spawnerStats();
    expect(after.thread - before.thread).toBeGreaterThanOrEqual(1);
    expect(after.main - before.main).toBe(0);
  });
});
