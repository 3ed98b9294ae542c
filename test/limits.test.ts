/**
 * One big object must not stall the cluster, end to end: a real manager (Raft, WAL) and sim agents
 * as processes, driven through the CLI. A large-but-valid service whose tasks together exceed
 * Raft's 8 MiB proposal cap converges while another service scales; an oversized spec and an
 * out-of-range duration are refused in one line naming the flag or field.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, waitFor } from './helpers/procs.js';

interface TaskJ {
  slot: number;
  state: string;
  desiredState: string;
}

describe.skipIf(!builtCli())('size limits and durations (manager + sim agents as processes)', () => {
  const c = new TestCluster('flotilla-limits-');
  const ps = (svc: string) => cliJson<TaskJ[]>(['service', 'ps', svc], c.env);
  const running = async (svc: string) => (await ps(svc)).filter((t) => t.desiredState === 'running' && t.state === 'running').length;

  beforeAll(async () => {
    await c.startManager();
    for (const h of ['n1', 'n2', 'n3']) await c.startAgent(h);
    // the manager is a node too (managers are nodes): count the three workers
    await waitFor('3 ready workers', async () => (await cliJson<Array<{ role: string; status: string }>>(['node', 'ls'], c.env)).filter((n) => n.role === 'worker' && n.status === 'ready').length === 3);
  });
  afterAll(async () => {
    await c.cleanup();
  });

  it('refuses an oversized environment in one line naming the field', async () => {
    const r = await cli(['service', 'create', '--name', 'huge', '--env', `BIG=${'x'.repeat(100 * 1024)}`, 'busybox:latest'], c.env);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/invalid env: \d+ bytes, over the limit of 65536 bytes/);
    expect((await cli(['service', 'inspect', 'huge'], c.env)).code).not.toBe(0);
  });

  it('refuses durations out of range in one line naming the flag and value', async () => {
    for (const [flag, value, range] of [
      ['--restart-delay', '9999999h', '0 and 168h'],
      ['--stop-grace-period', '99999h', '0 and 24h'],
      ['--update-delay', '25h', '0 and 24h'],
      ['--health-interval', '9999999999999999999h', '0 and 24h'],
    ] as const) {
      const r = await cli(['service', 'create', '--name', 'd', flag, value, 'busybox:latest'], c.env);
      expect(r.code, flag).not.toBe(0);
      expect(r.stderr.trim().split('\n'), flag).toHaveLength(1);
      expect(r.stderr, flag).toContain(`invalid ${flag} "${value}": must be between ${range}`);
    }
  });

  it('a service whose tasks exceed the Raft proposal cap converges while another one scales', { timeout: 120_000 }, async () => {
    // env just under the 64 KiB limit: 150 tasks of about 64 KiB are about 9.6 MB, over Raft's 8 MiB
    const replicas = 150;
    const env = `BIG=${'x'.repeat(60 * 1024)}`;
    let r = await cli(['service', 'create', '--name', 'big', '--replicas', String(replicas), '--env', env, '--detach', 'busybox:latest', 'sleep', '1000'], c.env);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    r = await cli(['service', 'create', '--name', 'small', '--replicas', '1', '--detach', 'busybox:latest', 'sleep', '1000'], c.env);
    expect(r.code).toBe(0);
    r = await cli(['service', 'scale', 'small=3'], c.env);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await running('small')).toBe(3);
    await waitFor(`big at ${replicas}`, async () => (await running('big')) === replicas, 60_000, 500);
    const slots = new Set((await ps('big')).filter((t) => t.desiredState === 'running').map((t) => t.slot));
    expect(slots.size).toBe(replicas);
    expect((await cli(['service', 'rm', 'big', 'small'], c.env)).code).toBe(0);
  });
});
