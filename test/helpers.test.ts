/**
 * The test helpers' own guarantees: a stop never waits forever (SIGKILL after the deadline, a frozen
 * process is stopped too), and waitFor fails with the reason when the condition never holds.
 */
import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { stopProc, type Proc } from './helpers/procs.js';
import { freePort, waitFor } from './helpers/wait.js';

/** A node process that ignores SIGTERM, as a Proc. */
function stubborn(): Proc {
  const child = spawn(process.execPath, ['-e', "process.on('SIGTERM', () => {}); console.log('up'); setInterval(() => {}, 1000)"], { stdio: ['ignore', 'pipe', 'pipe'] });
  const p: Proc = { child, out: [], err: [], exited: new Promise((resolve) => child.on('exit', (code) => resolve(code))) };
  child.stdout!.setEncoding('utf8').on('data', (d: string) => p.out.push(d));
  return p;
}

describe('test helpers', () => {
  it('stopProc SIGKILLs a process that ignores SIGTERM once the deadline passes', async () => {
    const p = stubborn();
    await waitFor('up', () => p.out.join('').includes('up'), 10_000, 20);
    const t0 = Date.now();
    try {
      await Promise.race([stopProc(p, 'SIGTERM', 500), new Promise((r) => setTimeout(r, 5000))]);
      expect(p.child.signalCode).toBe('SIGKILL');
      expect(Date.now() - t0).toBeLessThan(5000);
    } finally {
      p.child.kill('SIGKILL');
    }
  });

  it('stopProc stops a frozen (SIGSTOP) process', async () => {
    const p = stubborn();
    await waitFor('up', () => p.out.join('').includes('up'), 10_000, 20);
    p.child.kill('SIGSTOP');
    try {
      await Promise.race([stopProc(p, 'SIGTERM', 500), new Promise((r) => setTimeout(r, 5000))]);
      expect(p.child.exitCode !== null || p.child.signalCode !== null).toBe(true);
    } finally {
      p.child.kill('SIGKILL');
    }
  });

  it('waitFor returns the value, or fails naming what it waited for and the last error', async () => {
    let n = 0;
    expect(await waitFor('three', () => (++n >= 3 ? n : undefined), 2000, 1)).toBe(3);
    await expect(
      waitFor('never', () => {
        throw new Error('not yet');
      }, 100, 10),
    ).rejects.toThrow(/timed out after 100 ms waiting for never: not yet/);
    expect(await freePort()).toBeGreaterThan(0);
  });
});
