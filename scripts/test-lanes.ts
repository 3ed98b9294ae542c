/**
 * npm test (built to dist/scripts/test-lanes.js): the whole suite in two lanes at once, each one file
 * at a time (vitest.config.ts names them as projects): "host" (runc, mounts, cgroups, network
 * namespaces, nftables) and "loopback" (unit tests and processes on 127.0.0.1 with the sim runtime or
 * etcd). Most of a test's time is waiting on processes,
 * so the lanes overlap well on two cores. Each lane's lines are printed as they come, prefixed with
 * its name; a failing lane's summary is printed again at the end. Exits non-zero if either lane fails.
 *
 * With arguments (`npm test -- test/x.test.ts`), runs one `vitest run` with them instead.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
const vitest = path.join(path.dirname(require.resolve('vitest/package.json')), 'vitest.mjs');
const args = process.argv.slice(2);
const children = new Set<ChildProcess>();
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    // the lanes' afterAll hooks remove what the tests made: let them run
    for (const c of children) c.kill(sig);
  });
}

interface LaneResult {
  lane: string | undefined;
  code: number;
  seconds: number;
  lines: string[];
}

function run(lane: string | undefined, vitestArgs: string[]): Promise<LaneResult> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const child = spawn(process.execPath, [vitest, 'run', ...vitestArgs], { stdio: lane ? ['ignore', 'pipe', 'pipe'] : 'inherit' });
    children.add(child);
    const lines: string[] = [];
    if (lane) {
      for (const stream of [child.stdout!, child.stderr!]) {
        let rest = '';
        stream.setEncoding('utf8');
        stream.on('data', (d: string) => {
          const parts = (rest + d).split('\n');
          rest = parts.pop() ?? '';
          for (const l of parts) {
            lines.push(l);
            process.stdout.write(`[${lane}] ${l}\n`);
          }
        });
        stream.on('end', () => {
          if (rest) {
            lines.push(rest);
            process.stdout.write(`[${lane}] ${rest}\n`);
          }
        });
      }
    }
    child.on('close', (code, signal) => {
      children.delete(child);
      resolve({ lane, code: code ?? (signal ? 128 : 1), seconds: Math.round((Date.now() - t0) / 1000), lines });
    });
  });
}

if (args.length > 0) {
  const r = await run(undefined, args);
  process.exit(r.code);
}

const results = await Promise.all([run('host', ['--project', 'host']), run('loopback', ['--project', 'loopback'])]);
let failed = false;
for (const r of results) {
  if (r.code === 0) continue;
  failed = true;
  // the failures again, together, after both lanes' interleaved lines
  const from = r.lines.findIndex((l) => l.includes('Failed Tests') || l.includes('Failed Suites'));
  process.stdout.write(`\n=== lane ${r.lane} failed (exit ${r.code}):\n${(from >= 0 ? r.lines.slice(from) : r.lines.slice(-60)).join('\n')}\n`);
}
process.stdout.write(`\n${results.map((r) => `lane ${r.lane}: ${r.code === 0 ? 'passed' : `FAILED (exit ${r.code})`} in ${r.seconds} s`).join('; ')}\n`);
process.exit(failed ? 1 : 0);
