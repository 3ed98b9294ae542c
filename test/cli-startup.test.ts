/**
 * The CLI's start-up loads only what the command needs: commands that never talk to a manager (`image
 * ls`, `image pull`, `--version`) must not load gRPC or the X.509 code, which was about half of their
 * start-up (docs/benchmarks.md, bench:pull). A module-resolution hook (module.register) run with the
 * built CLI lists every module it resolves.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { builtCli, CLI } from './helpers/procs.js';

const HOOKS = `export async function resolve(spec, ctx, next) {
  const r = await next(spec, ctx);
  process.stderr.write('RESOLVED ' + r.url + '\\n');
  return r;
}`;
const REGISTER = `import { register } from 'node:module';
register(${JSON.stringify(`data:text/javascript,${encodeURIComponent(HOOKS)}`)});`;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-cli-startup-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Runs the built CLI with args; returns the URLs of the modules it resolved. */
function resolvedBy(args: string[]): { code: number | null; urls: string[]; stderr: string } {
  const r = spawnSync(process.execPath, ['--no-warnings', '--import', `data:text/javascript,${encodeURIComponent(REGISTER)}`, CLI, ...args], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  const urls = r.stderr
    .split('\n')
    .filter((l) => l.startsWith('RESOLVED '))
    .map((l) => l.slice('RESOLVED '.length));
  return { code: r.status, urls, stderr: r.stderr.split('\n').filter((l) => !l.startsWith('RESOLVED ')).join('\n') };
}

const heavy = (urls: string[]): string[] => urls.filter((u) => /@grpc\/grpc-js|@peculiar\/x509|\/cli\/client\.js$/.test(u));

describe.skipIf(!builtCli())('CLI start-up', () => {
  it('image ls and --version load neither gRPC nor the X.509 code; a manager command does', () => {
    const ls = resolvedBy(['image', 'ls', '--data-dir', path.join(tmp, 'data')]);
    expect(ls.stderr.trim()).toBe('');
    expect(ls.code).toBe(0);
    // the hook works: the CLI's own modules are listed
    expect(ls.urls.some((u) => u.endsWith('/cli/commands/image.js'))).toBe(true);
    expect(heavy(ls.urls)).toEqual([]);
    const version = resolvedBy(['--version']);
    expect(version.code).toBe(0);
    expect(heavy(version.urls)).toEqual([]);
    // the control: a command that talks to a manager loads them (it fails: no manager at this socket)
    const svc = resolvedBy(['service', 'ls', '--host', `unix://${path.join(tmp, 'none.sock')}`]);
    expect(heavy(svc.urls).length).toBeGreaterThan(0);
  });
});
