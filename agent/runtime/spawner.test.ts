import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mainThreadSpawned } from '../../testing/spawns.js';
import { closeSpawner, execInWorker, runInWorker, setSpawnOnMainThread, spawnerState, spawnerStats, spawnMonitor } from './spawner.js';

const SH = '/bin/sh';
let dir: string;
const pids: number[] = []; // detached children to kill afterwards

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The session id of a process (field 6 of /proc/<pid>/stat). */
async function sessionOf(pid: number): Promise<number> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[3]);
}

/** What Node's execFile itself reports for the same command (the reference behaviour). */
function execFileRef(file: string, args: string[], opts: { timeout?: number; maxBuffer?: number } = {}): Promise<{ code: number | null; message?: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(file, args, opts, (err, _stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : null) : 0;
      resolve({ code, message: err?.message, stderr: String(stderr) });
    });
  });
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-spawner-'));
});

afterEach(() => {
  setSpawnOnMainThread(false);
  for (const pid of pids.splice(0)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
});

afterAll(async () => {
  await closeSpawner();
  await fs.rm(dir, { recursive: true, force: true });
});

describe.each([
  ['worker thread', false],
  ['main thread fallback', true],
])('execInWorker (%s)', (_name, onMain) => {
  it('returns stdout, stderr and the exit code like execFile', async () => {
    setSpawnOnMainThread(onMain);
    const ok = await execInWorker(SH, ['-c', 'echo out; echo err >&2']);
    expect(ok).toEqual({ code: 0, signal: null, stdout: 'out\n', stderr: 'err\n' });
    expect(spawnerState()).toBe(onMain ? 'main' : 'thread');

    const args = ['-c', 'echo bad >&2; exit 3'];
    const bad = await execInWorker(SH, args);
    const ref = await execFileRef(SH, args);
    expect(bad).toMatchObject({ code: 3, signal: null, stdout: '', stderr: 'bad\n' });
    expect(bad.error).toBe(ref.message);
  });

  it('reports a missing binary like execFile', async () => {
    setSpawnOnMainThread(onMain);
    const r = await execInWorker(path.join(dir, 'nope'), ['x']);
    expect(r.code).toBeNull();
    expect(r.error).toBe(`spawn ${path.join(dir, 'nope')} ENOENT`);
  });

  it('kills the child on timeout', async () => {
    setSpawnOnMainThread(onMain);
    const t0 = Date.now();
    const r = await execInWorker(SH, ['-c', 'exec sleep 10'], { timeoutMs: 200 });
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(r).toMatchObject({ code: null, signal: 'SIGTERM' });
    expect(r.error).toMatch(/^Command failed: \/bin\/sh -c exec sleep 10/);
  });

  it('passes cwd, env and maxBuffer', async () => {
    setSpawnOnMainThread(onMain);
    const r = await execInWorker(SH, ['-c', 'pwd; echo "$FOO"'], { cwd: dir, env: { FOO: 'bar', PATH: '/usr/bin:/bin' } });
    expect(r.stdout).toBe(`${await fs.realpath(dir)}\nbar\n`);
    const big = await execInWorker(SH, ['-c', 'head -c 5000 /dev/zero'], { maxBuffer: 1000 });
    expect(big.error).toBe((await execFileRef(SH, ['-c', 'head -c 5000 /dev/zero'], { maxBuffer: 1000 })).message);
    expect(big.error).toMatch(/maxBuffer/);
  });

  it('runs 32 requests at once and matches each answer to its request', async () => {
    setSpawnOnMainThread(onMain);
    const t0 = Date.now();
    const rs = await Promise.all(
      Array.from({ length: 32 }, (_, i) => execInWorker(SH, ['-c', `sleep 0.3; echo $0; exit $(( $0 % 5 ))`, String(i)])),
    );
    // serially this would take 32 x 0.3 s
    expect(Date.now() - t0).toBeLessThan(6000);
    rs.forEach((r, i) => expect(r).toMatchObject({ code: i % 5, stdout: `${i}\n` }));
  });
});

describe.each([
  ['worker thread', false],
  ['main thread fallback', true],
])('spawnMonitor (%s)', (_name, onMain) => {
  it('returns the first line of fd 3 and leaves the child running detached', async () => {
    setSpawnOnMainThread(onMain);
    const script = 'echo starting; echo "{\\"data\\": $$}" >&3; exec 3>&-; exec sleep 30';
    const r = await spawnMonitor(SH, ['-c', script], { cwd: dir, env: { PATH: '/usr/bin:/bin' } });
    expect(r.error).toBeUndefined();
    const pid = (JSON.parse(r.syncLine!) as { data: number }).data;
    pids.push(pid);
    expect(r.output).toContain('starting');
    expect(alive(pid)).toBe(true);
    expect(await sessionOf(pid)).toBe(pid); // detached: its own session
    expect(process.getActiveResourcesInfo()).not.toContain('ChildProcess');
    await new Promise((res) => setTimeout(res, 100));
    expect(alive(pid)).toBe(true);
  });

  it('returns no line when fd 3 ends without one, with the output so far', async () => {
    setSpawnOnMainThread(onMain);
    const r = await spawnMonitor(SH, ['-c', 'echo oops >&2; printf partial >&3; exit 1']);
    expect(r).toEqual({ output: 'oops\n' });
    const r2 = await spawnMonitor(SH, ['-c', 'echo closing; exec 3>&-; sleep 0.2']);
    expect(r2.syncLine).toBeUndefined();
    expect(r2.output).toBe('closing\n');
  });

  it('times out when nothing arrives on fd 3', async () => {
    setSpawnOnMainThread(onMain);
    const pidFile = path.join(dir, `pid-${String(onMain)}`);
    const t0 = Date.now();
    const r = await spawnMonitor(SH, ['-c', `echo $$ > ${pidFile}; exec sleep 30`], { timeoutMs: 300 });
    pids.push(Number(await fs.readFile(pidFile, 'utf8')));
    expect(r.timedOut).toBe(true);
    expect(r.syncLine).toBeUndefined();
    expect(Date.now() - t0).toBeLessThan(3000);
  });

  it('reports a binary that cannot run', async () => {
    setSpawnOnMainThread(onMain);
    const r = await spawnMonitor(path.join(dir, 'nope'), []);
    expect(r.error).toBe(`spawn ${path.join(dir, 'nope')} ENOENT`);
  });
});

describe.each([
  ['worker thread', false],
  ['main thread fallback', true],
])('runInWorker (%s)', (_name, onMain) => {
  it('streams stdout and stderr as they come and returns both in order, with the exit code', async () => {
    setSpawnOnMainThread(onMain);
    const out: string[] = [];
    const err: string[] = [];
    const before = spawnerStats();
    const { value: r, sawChild } = await mainThreadSpawned(
      () =>
        runInWorker(SH, ['-c', 'echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; exit 4'], {
          onStdout: (d) => out.push(d.toString()),
          onStderr: (d) => err.push(d.toString()),
        }).result,
    );
    expect(r).toEqual({ code: 4, signal: null, output: 'one\ntwo\nthree\n' });
    expect(out.join('')).toBe('one\nthree\n');
    expect(err.join('')).toBe('two\n');
    // where it ran: counted there, and a child handle on the main thread only in the fallback
    const after = spawnerStats();
    expect(after.thread - before.thread).toBe(onMain ? 0 : 1);
    expect(after.main - before.main).toBe(onMain ? 1 : 0);
    expect(sawChild).toBe(onMain);
  });

  it('kills the child on request and reports the signal; keeps only maxOutput bytes', async () => {
    setSpawnOnMainThread(onMain);
    const t0 = Date.now();
    const run = runInWorker(SH, ['-c', 'echo started; exec sleep 10']);
    await new Promise((res) => setTimeout(res, 200));
    run.kill('SIGKILL');
    expect(await run.result).toEqual({ code: null, signal: 'SIGKILL', output: 'started\n' });
    expect(Date.now() - t0).toBeLessThan(3000);
    run.kill('SIGKILL'); // after the exit: nothing happens
    const big = await runInWorker(SH, ['-c', 'head -c 100000 /dev/zero | tr "\\0" x'], { maxOutput: 10 }).result;
    expect(big.code).toBe(0);
    expect(big.output.length).toBeGreaterThanOrEqual(10);
    expect(big.output.length).toBeLessThan(100000);
  });

  it('reports a binary that cannot run', async () => {
    setSpawnOnMainThread(onMain);
    const r = await runInWorker(path.join(dir, 'nope'), []).result;
    expect(r).toEqual({ code: null, signal: null, output: '', error: `spawn ${path.join(dir, 'nope')} ENOENT` });
  });
});

describe('the spawner thread', () => {
  it('does not keep the process alive while idle', async () => {
    await execInWorker('/bin/true', []);
    expect(spawnerState()).toBe('thread');
    expect(process.getActiveResourcesInfo()).not.toContain('MessagePort');
  });

  it('is started again after closeSpawner, and in-flight requests get an error', async () => {
    await execInWorker('/bin/true', []);
    const inFlight = execInWorker(SH, ['-c', 'sleep 0.5']);
    await new Promise((res) => setTimeout(res, 100));
    await closeSpawner();
    expect(spawnerState()).toBe('idle');
    const r = await inFlight;
    expect(r.code).toBeNull();
    expect(r.error).toMatch(/^spawner thread exited/);
    expect(await execInWorker(SH, ['-c', 'echo again'])).toMatchObject({ code: 0, stdout: 'again\n' });
    expect(spawnerState()).toBe('thread');
  });

  it('leaves a monitor running when the thread is stopped', async () => {
    const r = await spawnMonitor(SH, ['-c', 'echo $$ >&3; exec sleep 30']);
    const pid = Number(r.syncLine);
    pids.push(pid);
    await closeSpawner();
    await new Promise((res) => setTimeout(res, 100));
    expect(alive(pid)).toBe(true);
  });
});
