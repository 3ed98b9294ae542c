/**
 * `flotilla container ...` end to end: a real CLI process per command (dist/cli/main.js, built by
 * `npm run build`; FLOTILLA_CLI overrides the entry point).
 */
import { execFile, execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBusybox } from './helpers/busybox.js';
import { flotillaCgroups, mountsUnder, removeRunRoots } from './helpers/runtime-debris.js';
import { runRootOf } from '../agent/runtime/containers.js';

const isRoot = process.getuid?.() === 0;
const ROOT = path.resolve(import.meta.dirname, '..');
const CLI = process.env.FLOTILLA_CLI ?? path.join(ROOT, 'dist/cli/main.js');

interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

describe.skipIf(!isRoot)('flotilla container CLI (needs root, runc, conmon; runs dist/cli/main.js)', () => {
  let dataDir: string;

  // --data-dir right after the subcommand: after IMAGE it would belong to the container's command
  const cli = (sub: string, ...args: string[]): Promise<Result> =>
    new Promise((resolve) => {
      execFile(process.execPath, [CLI, 'container', sub, '--data-dir', dataDir, ...args], { timeout: 30_000 }, (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      });
    });

  beforeAll(async () => {
    if (!process.env.FLOTILLA_CLI) {
      try {
        execFileSync('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: ROOT, stdio: 'ignore', timeout: 120_000 });
      } catch {
        // other parts of the tree may not compile yet; the CLI may still have been emitted
      }
    }
    if (!existsSync(CLI)) throw new Error(`${CLI} missing: run npm run build`);
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-cli-'));
    await importBusybox(dataDir);
  }, 180_000);

  afterAll(async () => {
    if (!dataDir) return;
    try {
      const ls = await cli('ls', '-a', '-q');
      const ids = ls.stdout.split('\n').filter(Boolean);
      if (ids.length > 0) expect((await cli('rm', '-f', ...ids)).code).toBe(0);
      expect(mountsUnder(dataDir)).toEqual([]);
    } finally {
      await fs.rm(dataDir, { recursive: true, force: true });
      removeRunRoots(dataDir);
    }
  });

  it('runs in the foreground: streams output, exits with the exit code, passes the command its flags', async () => {
    const r = await cli('run', '--name', 'fg', '-e', 'A=1', 'busybox', 'sh', '-c', 'echo out $A; echo err >&2; exit 7');
    expect(r).toMatchObject({ code: 7, stdout: 'out 1\n', stderr: 'err\n' });
    const ls = await cli('run', '--rm', 'busybox', 'ls', '-a', '-1', '/etc');
    expect(ls.code).toBe(0);
    expect(ls.stdout.split('\n')).toEqual(expect.arrayContaining(['.', '..', 'passwd', 'hosts']));
    // the first container is kept (no --rm), the second is gone
    const all = JSON.parse((await cli('ls', '-a', '--format', 'json')).stdout) as { name: string; state: string; exitCode: number }[];
    expect(all.map((c) => c.name)).toEqual(['fg']);
    expect(all[0]).toMatchObject({ state: 'stopped', exitCode: 7 });
  });

  it('exits 137 when the container is OOM-killed', async () => {
    const r = await cli('run', '--rm', '--memory', '16m', 'busybox', 'tail', '/dev/zero');
    expect(r.code).toBe(137);
    expect(r.stderr).toMatch(/out of memory/);
  });

  it('runs detached; ls, inspect, exec, logs, stop and rm from separate processes', async () => {
    const r = await cli('run', '-d', '--name', 'bg', '--memory', '32m', '--cpus', '0.5', '--pids-limit', '50', 'busybox', 'sh', '-c', 'trap "exit 0" TERM; while true; do echo tick; sleep 0.2; done');
    expect(r.code).toBe(0);
    const id = r.stdout.trim();
    expect(id).toMatch(/^[a-z0-9]{25}$/);
    const info = JSON.parse((await cli('inspect', 'bg', '--format', 'json')).stdout) as Record<string, unknown>;
    expect(info).toMatchObject({ id, name: 'bg', image: 'busybox:latest', state: 'running', exitCode: null, oomKilled: false });
    for (const k of ['imageDigest', 'pid', 'rootfs', 'cgroupPaths', 'created', 'started', 'finished']) expect(info, k).toHaveProperty(k);
    expect((await cli('ls')).stdout).toMatch(/bg\s+busybox:latest/);
    expect(await cli('exec', 'bg', 'sh', '-c', 'echo in; exit 3')).toMatchObject({ code: 3, stdout: 'in\n' });
    await new Promise((res) => setTimeout(res, 500));
    const logs = await cli('logs', '--tail', '1', '-t', 'bg');
    expect(logs.stdout).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z tick\n$/);
    const t = Date.now();
    expect((await cli('stop', '-t', '5', 'bg')).code).toBe(0);
    expect(Date.now() - t).toBeLessThan(4000);
    expect(JSON.parse((await cli('inspect', 'bg')).stdout)).toMatchObject({ state: 'stopped', exitCode: 0 });
    expect((await cli('rm', 'bg')).code).toBe(0);
    const run = await runRootOf(dataDir);
    expect(mountsUnder(run)).toEqual([]);
    expect(existsSync(path.join(run, 'containers', id))).toBe(false);
    expect(existsSync(path.join(dataDir, 'logs', id))).toBe(false);
    expect(flotillaCgroups([id])).toEqual([]);
  });

  it('rejects bad input with one clear line and creates nothing', async () => {
    const containersDir = path.join(await runRootOf(dataDir), 'containers');
    const before = await fs.readdir(containersDir);
    const cases: [string[], RegExp][] = [
      [['run', '--memory', '12q', 'busybox', 'true'], /invalid --memory "12q"/],
      [['run', '--cpus', 'lots', 'busybox', 'true'], /invalid --cpus "lots"/],
      [['run', '--name', 'no/slash', 'busybox', 'true'], /invalid --name "no\/slash"/],
      [['run', 'nosuchimage', 'true'], /image "nosuchimage" not found/],
      [['run', 'busybox', 'nosuchcommand'], /executable file not found: nosuchcommand/],
      [['inspect', 'nosuch'], /container "nosuch" not found/],
      [['kill', '-s', 'NOPE', 'x'], /invalid signal "NOPE"/],
      [['run', '--security-opt', 'apparmor=x', 'busybox', 'true'], /invalid --security-opt "apparmor=x"/],
    ];
    for (const [args, msg] of cases) {
      const r = await cli(args[0]!, ...args.slice(1));
      expect(r.code, args.join(' ')).not.toBe(0);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(r.stderr).toMatch(msg);
    }
    expect(await fs.readdir(containersDir)).toEqual(before);
  });
});
