import { readFileSync, readlinkSync, existsSync, statSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { RuncRuntime, runRootOf } from '../agent/runtime/containers.js';
import { inCgroup } from '../agent/runtime/cgroups.js';
import { FlotillaError } from '../common/errors.js';
import { importBusybox } from './helpers/busybox.js';
import { flotillaCgroups, mountsUnder, removeRunRoots } from './helpers/runtime-debris.js';
import { waitFor } from './helpers/wait.js';

/** The container ids in every run root on the host but ours. */
async function otherRunRootIds(ours: string): Promise<Set<string>> {
  const out = new Set<string>();
  for (const base of [process.env.FLOTILLA_RUN_ROOT, '/run/flotilla', '/dev/shm/flotilla'].filter((b): b is string => !!b)) {
    for (const e of await fs.readdir(base).catch(() => [] as string[])) {
      const root = path.join(base, e);
      if (root === path.resolve(ours)) continue;
      for (const id of await fs.readdir(path.join(root, 'containers')).catch(() => [] as string[])) out.add(id);
    }
  }
  return out;
}

const isRoot = process.getuid?.() === 0;

describe.skipIf(!isRoot)('runc runtime: containers (needs root, runc, conmon)', () => {
  let dataDir: string;
  let rt: RuncRuntime;
  const ids: string[] = [];

  beforeAll(async () => {
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-ctr-'));
    await importBusybox(dataDir);
    rt = await RuncRuntime.open(dataDir);
  });

  afterEach(async () => {
    for (const c of await rt.list()) await rt.remove(c.id, true);
  });

  afterAll(async () => {
    if (!rt) return;
    try {
      // every container removed (errors fail the suite) before its data dir goes; then nothing is left
      for (const c of await rt.list()) await rt.remove(c.id, true);
      expect(mountsUnder(dataDir)).toEqual([]);
      expect(mountsUnder(rt.runRoot)).toEqual([]);
      expect(flotillaCgroups(ids)).toEqual([]);
    } finally {
      rt.close();
      await fs.rm(dataDir, { recursive: true, force: true });
      removeRunRoots(dataDir);
    }
  });

  async function run(name: string, command: string[], extra: Record<string, unknown> = {}) {
    const info = await rt.create({ name, image: 'busybox', command, ...extra });
    ids.push(info.id);
    await rt.start(info.id);
    return rt.inspect(info.id);
  }

  it('puts the process in its own pid, mount, uts, ipc and network namespaces; host network shares the netns', async () => {
    const c = await run('ns', ['sleep', '100']);
    expect(c.status).toBe('running');
    expect(c.pid).toBeGreaterThan(0);
    // stop signals the init directly only when it is verifiably in the container's cgroup
    expect(await inCgroup(c.pid, `/flotilla/${c.id}`)).toBe(true);
    expect(await inCgroup(c.pid, '/flotilla/someone-else')).toBe(false);
    expect(await inCgroup(process.pid, `/flotilla/${c.id}`)).toBe(false);
    for (const ns of ['pid', 'mnt', 'uts', 'ipc', 'net']) {
      expect(readlinkSync(`/proc/${c.pid}/ns/${ns}`), ns).not.toBe(readlinkSync(`/proc/self/ns/${ns}`));
    }
    // loopback is up in the fresh network namespace; hostname is the container name
    const lo = await rt.exec('ns', ['ip', 'addr', 'show', 'lo']);
    expect(lo.output).toContain('127.0.0.1');
    expect(lo.output).toMatch(/<[^>]*\bUP\b/);
    expect((await rt.exec('ns', ['hostname'])).output.trim()).toBe('ns');
    expect((await rt.exec('ns', ['cat', '/etc/hostname'])).output.trim()).toBe('ns');

    const h = await run('hostnet', ['sleep', '100'], { network: 'host' });
    expect(readlinkSync(`/proc/${h.pid}/ns/net`)).toBe(readlinkSync('/proc/self/ns/net'));
    expect(readlinkSync(`/proc/${h.pid}/ns/pid`)).not.toBe(readlinkSync('/proc/self/ns/pid'));
    const none = await run('nonet', ['sleep', '100'], { network: 'none' });
    expect(readlinkSync(`/proc/${none.pid}/ns/net`)).not.toBe(readlinkSync('/proc/self/ns/net'));
  });

  it('writes the given resolv.conf (the node resolver for overlay tasks) instead of the host one', async () => {
    const text = 'nameserver 10.9.9.1\noptions ndots:0\n';
    await run('dnsconf', ['sleep', '100'], { resolvConf: text });
    expect((await rt.exec('dnsconf', ['cat', '/etc/resolv.conf'])).output).toBe(text);
  });

  it('applies memory, cpu and pids limits in the cgroups, and a secure default spec', async () => {
    const c = await run('limits', ['sleep', '100'], { memoryBytes: 64 * 1024 * 1024, nanoCpus: 500_000_000, pidsLimit: 20 });
    const cg = c.cgroupPaths;
    expect(cg.memory).toBe(`/sys/fs/cgroup/memory/flotilla/${c.id}`);
    expect(readFileSync(path.join(cg.memory!, 'memory.limit_in_bytes'), 'utf8').trim()).toBe(String(64 * 1024 * 1024));
    expect(readFileSync(path.join(cg.cpu!, 'cpu.cfs_quota_us'), 'utf8').trim()).toBe('50000');
    expect(readFileSync(path.join(cg.cpu!, 'cpu.cfs_period_us'), 'utf8').trim()).toBe('100000');
    expect(readFileSync(path.join(cg.pids!, 'pids.max'), 'utf8').trim()).toBe('20');
    expect(readFileSync(path.join(cg.memory!, 'cgroup.procs'), 'utf8').trim().split('\n')).toContain(String(c.pid));
    // no new privileges, reduced capability set, masked /proc/kcore, read-only /proc/sys and /sys
    const status = (await rt.exec('limits', ['cat', '/proc/self/status'])).output;
    expect(status).toMatch(/NoNewPrivs:\s+1/);
    const capBnd = /CapBnd:\s+([0-9a-f]+)/.exec(status)?.[1];
    expect(capBnd).toBe('00000000a80425fb');
    const masked = ['/proc/kcore', '/proc/keys', '/proc/timer_list', '/proc/sched_debug'].find((p) => existsSync(p));
    if (masked) expect((await rt.exec('limits', ['sh', '-c', `wc -c < ${masked}`])).output.trim()).toBe('0');
    expect((await rt.exec('limits', ['sh', '-c', 'echo 1 > /proc/sys/kernel/domainname'])).exitCode).not.toBe(0);
    expect((await rt.exec('limits', ['touch', '/sys/x'])).exitCode).not.toBe(0);
    expect((await rt.exec('limits', ['ls', '/dev'])).output.split(/\s+/).filter(Boolean).sort()).toEqual(
      expect.arrayContaining(['full', 'null', 'random', 'tty', 'urandom', 'zero', 'pts', 'shm', 'mqueue']),
    );
  });

  it('reports an OOM kill (oomKilled, exit 137)', async () => {
    const c = await rt.create({ name: 'oom', image: 'busybox', command: ['tail', '/dev/zero'], memoryBytes: 16 * 1024 * 1024 });
    ids.push(c.id);
    await rt.start(c.id);
    const exit = await rt.wait(c.id);
    expect(exit).toEqual({ exitCode: 137, oomKilled: true });
    const info = await rt.inspect('oom');
    expect(info.oomKilled).toBe(true);
    expect(info.status).toBe('stopped');
  });

  it('gives each container its own writable layer over shared image layers', async () => {
    await run('w1', ['sleep', '100']);
    await run('w2', ['sleep', '100']);
    expect((await rt.exec('w1', ['sh', '-c', 'echo secret > /tmp/x && rm /bin/ls && cat /tmp/x'])).output).toBe('secret\n');
    expect((await rt.exec('w1', ['sh', '-c', 'test -e /bin/ls'])).exitCode).toBe(1);
    expect((await rt.exec('w2', ['sh', '-c', 'test -e /tmp/x'])).exitCode).toBe(1);
    expect((await rt.exec('w2', ['sh', '-c', 'test -e /bin/ls'])).exitCode).toBe(0);
  });

  it('applies the default seccomp filter: no new namespaces, no setns; seccomp=unconfined lifts it', async () => {
    const logsOf = async (id: string): Promise<string> => {
      const out: string[] = [];
      for await (const l of rt.logs(id)) out.push(l.line);
      return out.join('\n');
    };
    const script = 'unshare -U true; echo unshare=$?; nsenter -t 1 -m true; echo setns=$?; grep Seccomp: /proc/self/status; echo ok > /tmp/f; cat /tmp/f';
    const confined = await run('sc-default', ['sh', '-c', script]);
    expect(await rt.wait(confined.id)).toEqual({ exitCode: 0, oomKilled: false });
    const a = await logsOf(confined.id);
    expect(a).toMatch(/unshare=1/);
    expect(a).toMatch(/Operation not permitted/);
    expect(a).toMatch(/setns=1/);
    expect(a).toMatch(/Seccomp:\s+2/); // filter mode
    expect(a).toMatch(/^ok$/m); // ordinary work is unaffected
    const free = await run('sc-unconfined', ['sh', '-c', script], { seccomp: 'unconfined' });
    expect(await rt.wait(free.id)).toEqual({ exitCode: 0, oomKilled: false });
    const b = await logsOf(free.id);
    expect(b).toMatch(/unshare=0/);
    expect(b).toMatch(/Seccomp:\s+0/);
    await expect(rt.create({ name: 'sc-bad', image: 'busybox', command: ['true'], seccomp: 'strict' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });

  it('reports exit codes, env, workdir and user', async () => {
    const c = await rt.create({
      name: 'codes',
      image: 'busybox',
      command: ['sh', '-c', 'echo "$FOO $HOSTNAME $(pwd) $(id -u):$(id -g)"; exit 42'],
      env: ['FOO=bar'],
      workdir: '/work/dir',
      user: 'nobody',
    });
    ids.push(c.id);
    await rt.start(c.id);
    expect(await rt.wait(c.id)).toEqual({ exitCode: 42, oomKilled: false });
    const lines: string[] = [];
    for await (const e of rt.logs(c.id, {})) lines.push(e.line);
    expect(lines).toEqual(['bar codes /work/dir 65534:65534']);
    const info = await rt.inspect(c.id);
    expect(info.exitCode).toBe(42);
    expect(info.finished).toBeGreaterThan(0);
    const r = await rt.exec(await run('ex', ['sleep', '100']).then((i) => i.id), ['sh', '-c', 'echo out; echo err >&2; exit 3']);
    expect(r.exitCode).toBe(3);
    expect(r.output).toContain('out\n');
    expect(r.output).toContain('err\n');
    await expect(rt.exec('ex', ['sleep', '10'], { timeoutMs: 300 })).rejects.toMatchObject({ code: 'DEADLINE_EXCEEDED' });
  });

  it('stop: SIGTERM, then SIGKILL after the grace period', async () => {
    await run('trapper', ['sh', '-c', 'trap "" TERM; while true; do sleep 0.1; done']);
    await run('polite', ['sh', '-c', 'trap "exit 0" TERM; while true; do sleep 0.1; done']);
    await new Promise((r) => setTimeout(r, 200)); // let the shells install their traps
    let t = Date.now();
    await rt.stop('trapper', 1000);
    const trapped = Date.now() - t;
    expect(trapped).toBeGreaterThanOrEqual(950);
    expect(trapped).toBeLessThan(5000);
    expect((await rt.inspect('trapper')).exitCode).toBe(137);
    t = Date.now();
    await rt.stop('polite', 10_000);
    expect(Date.now() - t).toBeLessThan(2000);
    expect((await rt.inspect('polite')).exitCode).toBe(0);
    // stopping a stopped container is a no-op; kill on it is an error
    await rt.stop('polite', 1000);
    await expect(rt.kill('polite', 'TERM')).rejects.toMatchObject({ code: 'FAILED_PRECONDITION' });
  });

  it('captures logs with timestamps, follows them, and rotates at the size limit', async () => {
    const before = Date.now();
    const c = await rt.create({ name: 'logger', image: 'busybox', command: ['sh', '-c', 'for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done; echo bye >&2'] });
    ids.push(c.id);
    await rt.start(c.id);
    const got: { line: string; stream: string; time: number }[] = [];
    for await (const e of rt.logs(c.id, { follow: true })) got.push(e);
    expect(got.map((e) => e.line)).toEqual(['line1', 'line2', 'line3', 'line4', 'line5', 'bye']);
    expect(got[5]!.stream).toBe('stderr');
    for (const e of got) {
      expect(e.time).toBeGreaterThanOrEqual(before - 1000);
      expect(e.time).toBeLessThanOrEqual(Date.now() + 1000);
    }
    expect(got[4]!.time - got[0]!.time).toBeGreaterThanOrEqual(300);
    const tail: string[] = [];
    for await (const e of rt.logs('logger', { tail: 2 })) tail.push(e.line);
    expect(tail).toEqual(['line5', 'bye']);

    const r = await rt.create({ name: 'rotate', image: 'busybox', command: ['sh', '-c', 'i=0; while [ $i -lt 3000 ]; do echo "line $i"; i=$((i+1)); done'], logSizeMax: 8192 });
    ids.push(r.id);
    await rt.start(r.id);
    await rt.wait(r.id);
    const logFile = path.join(dataDir, 'logs', r.id, 'ctr.log');
    expect(statSync(logFile).size).toBeLessThanOrEqual(8192);
    const lines: string[] = [];
    for await (const e of rt.logs('rotate', {})) lines.push(e.line);
    expect(lines.length).toBeGreaterThan(10);
    expect(lines.length).toBeLessThan(3000);
    expect(lines.at(-1)).toBe('line 2999');
  });

  it('survives a restart of the runtime: running containers keep running, exits are picked up', async () => {
    const long = await rt.create({ name: 'long', image: 'busybox', command: ['sh', '-c', 'sleep 1.5; exit 42'] });
    const quick = await rt.create({ name: 'quick', image: 'busybox', command: ['sh', '-c', 'exit 3'] });
    ids.push(long.id, quick.id);
    await rt.start(long.id);
    await rt.start(quick.id);
    rt.close();
    await new Promise((r) => setTimeout(r, 300));
    // a new runtime (as after an agent restart) over the same data dir
    const rt2 = await RuncRuntime.open(dataDir);
    const listed = await rt2.list();
    expect(listed.map((c) => c.name).sort()).toEqual(['long', 'quick']);
    expect(listed.find((c) => c.name === 'quick')).toMatchObject({ status: 'stopped', exitCode: 3 });
    expect(listed.find((c) => c.name === 'long')).toMatchObject({ status: 'running' });
    expect(await rt2.wait('long')).toEqual({ exitCode: 42, oomKilled: false });
    rt2.close();
  });

  it('keeps one run root per data dir, recorded in it, whatever the environment of a later process says', async () => {
    expect(rt.runRoot.startsWith(os.tmpdir()) || rt.runRoot.startsWith('/run/') || rt.runRoot.startsWith('/dev/shm/')).toBe(true);
    expect(readFileSync(path.join(dataDir, 'run-root'), 'utf8').trim()).toBe(rt.runRoot);
    expect(readFileSync(path.join(rt.runRoot, 'data-dir'), 'utf8').trim()).toBe(path.resolve(dataDir));
    const before = process.env.FLOTILLA_RUN_ROOT;
    process.env.FLOTILLA_RUN_ROOT = path.join(os.tmpdir(), 'flotilla-elsewhere');
    try {
      expect(await runRootOf(dataDir)).toBe(rt.runRoot);
      const rt2 = await RuncRuntime.open(dataDir);
      rt2.close();
      expect(rt2.runRoot).toBe(rt.runRoot);
    } finally {
      if (before === undefined) delete process.env.FLOTILLA_RUN_ROOT;
      else process.env.FLOTILLA_RUN_ROOT = before;
    }
  });

  it('after its volatile state is lost (a reboot), open removes the logs and snapshot of that container, and nothing else', async () => {
    const keep = await run('keep', ['sleep', '100']);
    const lost = await run('lost', ['sleep', '100']);
    // what a reboot does to "lost": its processes and everything in the run root are gone
    await rt.runc.delete(lost.id, true);
    for (let i = 0; i < 100 && existsSync(`/proc/${lost.pid}`); i++) await new Promise((r) => setTimeout(r, 20));
    await fs.rm(path.join(rt.runRoot, 'containers', lost.id), { recursive: true, force: true });
    await fs.rm(path.join(rt.runRoot, 'exits', lost.id), { force: true });
    await fs.rm(path.join(rt.runRoot, 'names', 'lost'), { force: true });
    expect(existsSync(path.join(dataDir, 'logs', lost.id))).toBe(true);
    expect(existsSync(path.join(dataDir, 'snapshots', 'containers', lost.id))).toBe(true);
    const rt2 = await RuncRuntime.open(dataDir);
    rt2.close();
    expect(existsSync(path.join(dataDir, 'logs', lost.id))).toBe(false);
    expect(existsSync(path.join(dataDir, 'snapshots', 'containers', lost.id))).toBe(false);
    expect(flotillaCgroups([lost.id])).toEqual([]);
    // the other container is untouched and still runs
    expect(existsSync(path.join(dataDir, 'logs', keep.id))).toBe(true);
    expect(existsSync(path.join(dataDir, 'snapshots', 'containers', keep.id))).toBe(true);
    expect((await rt.inspect('keep')).status).toBe('running');
  });

  it('cleans up a container left half-created by a crashed process', async () => {
    const c = await rt.create({ name: 'crashed', image: 'busybox', command: ['sleep', '100'] });
    ids.push(c.id);
    const stateFile = path.join(rt.runRoot, 'containers', c.id, 'state.json');
    const rec = JSON.parse(readFileSync(stateFile, 'utf8')) as Record<string, unknown>;
    await fs.writeFile(stateFile, JSON.stringify({ ...rec, state: 'creating', ownerPid: 2 ** 22 + 1 }));
    expect(existsSync(path.join(rt.runRoot, 'runc', c.id))).toBe(true);
    expect(existsSync(`/proc/${c.pid}`)).toBe(true);
    const rt2 = await RuncRuntime.open(dataDir);
    rt2.close();
    expect(existsSync(path.join(rt.runRoot, 'containers', c.id))).toBe(false);
    expect(existsSync(path.join(rt.runRoot, 'runc', c.id))).toBe(false);
    expect(existsSync(path.join(dataDir, 'snapshots', 'containers', c.id))).toBe(false);
    expect(mountsUnder(dataDir)).toEqual([]);
    expect(flotillaCgroups([c.id])).toEqual([]);
    expect(existsSync(path.join(rt.runRoot, 'names', 'crashed'))).toBe(false);
    await expect(rt.inspect('crashed')).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('rm leaves no mount, cgroup, runc state or file behind; force kills a running container', async () => {
    const c = await run('gone', ['sleep', '100']);
    expect(flotillaCgroups([c.id]).length).toBeGreaterThan(0);
    await expect(rt.remove('gone', false)).rejects.toMatchObject({ code: 'FAILED_PRECONDITION' });
    await rt.remove('gone', true);
    expect(mountsUnder(dataDir)).toEqual([]);
    expect(flotillaCgroups([c.id])).toEqual([]);
    expect(existsSync(path.join(rt.runRoot, 'containers', c.id))).toBe(false);
    expect(existsSync(path.join(rt.runRoot, 'runc', c.id))).toBe(false);
    expect(existsSync(path.join(rt.runRoot, 'exits', c.id))).toBe(false);
    expect(existsSync(path.join(dataDir, 'snapshots', 'containers', c.id))).toBe(false);
    // the name is free again
    await run('gone', ['true']);
  });

  it('rejects bad input with a clear error and leaves nothing behind', async () => {
    const cases: [Record<string, unknown>, string, RegExp][] = [
      [{ name: 'x1', image: 'nosuch' }, 'NOT_FOUND', /image "nosuch" not found/],
      [{ name: 'x2', image: 'busybox', command: ['nosuchcmd'] }, 'INVALID_ARGUMENT', /executable file not found: nosuchcmd/],
      [{ name: 'x3', image: 'busybox', command: ['true'], memoryBytes: 100 }, 'INVALID_ARGUMENT', /memory/],
      [{ name: 'bad name', image: 'busybox' }, 'INVALID_ARGUMENT', /container name/],
      [{ name: 'x4', image: 'busybox', network: 'bridge0' }, 'INVALID_ARGUMENT', /network/],
      [{ name: 'x5', image: 'busybox', command: ['true'], user: 'nosuchuser' }, 'INVALID_ARGUMENT', /nosuchuser/],
      [{ name: 'x6', image: 'busybox', nanoCpus: 1000 }, 'INVALID_ARGUMENT', /cpus/],
    ];
    // every flotilla cgroup on the host before the bad inputs (other test runs may come and go meanwhile)
    const cgroupsBefore = new Set(flotillaCgroups());
    for (const [opts, code, msg] of cases) {
      const err = await rt.create(opts as never).catch((e: unknown) => e);
      expect(err, JSON.stringify(opts)).toBeInstanceOf(FlotillaError);
      expect((err as FlotillaError).code).toBe(code);
      expect((err as FlotillaError).message).toMatch(msg);
    }
    const first = await run('dup', ['sleep', '100']);
    await expect(rt.create({ name: 'dup', image: 'busybox', command: ['true'] })).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
    expect(await fs.readdir(path.join(rt.runRoot, 'containers'))).toEqual([first.id]);
    expect(await fs.readdir(path.join(dataDir, 'snapshots', 'containers'))).toEqual([first.id]);
    // runc mounts the rootfs inside the container's mount namespace: nothing on the host
    expect(mountsUnder(dataDir)).toEqual([]);
    // no cgroup left by the rejected creates: a new one is ours unless another run root owns it (a
    // concurrent test run); one of someone else's that is being removed may linger a moment
    const leaked = async (): Promise<string[]> => {
      const others = await otherRunRootIds(rt.runRoot);
      return flotillaCgroups().filter((p) => !cgroupsBefore.has(p) && path.basename(p) !== first.id && !others.has(path.basename(p)));
    };
    await waitFor('no leaked cgroup', async () => (await leaked()).length === 0, 3000).catch(() => undefined);
    expect(await leaked()).toEqual([]);
    await expect(rt.inspect('nosuch')).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('handles 50 containers created, started, waited and removed concurrently', async () => {
    const n = 50;
    const names = Array.from({ length: n }, (_, i) => `many-${i}`);
    const infos = await Promise.all(names.map((name, i) => rt.create({ name, image: 'busybox', command: ['sh', '-c', `sleep 0.5; exit ${i % 7}`] })));
    ids.push(...infos.map((i) => i.id));
    await Promise.all(infos.map((i) => rt.start(i.id)));
    const exits = await Promise.all(infos.map((i) => rt.wait(i.id)));
    expect(exits.map((e) => e.exitCode)).toEqual(names.map((_, i) => i % 7));
    expect((await rt.list()).length).toBe(n);
    await Promise.all(infos.map((i) => rt.remove(i.id, false)));
    expect(await rt.list()).toEqual([]);
    expect(mountsUnder(dataDir)).toEqual([]);
    expect(flotillaCgroups(infos.map((i) => i.id))).toEqual([]);
  });
});
