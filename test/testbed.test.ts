/**
 * The multi-host test bed (test/helpers/testbed.ts) on real runc: 1 manager host and 2 agent hosts, each
 * a network namespace on an underlay that never touches the root namespace; a replicated service spreads
 * over them with each container inside its host; destroy() leaves nothing; a failed or aborted create()
 * cleans up after itself.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Testbed, type TestbedHost } from './helpers/testbed.js';
import { builtCli, isRoot, waitFor } from './helpers/procs.js';
import { buildBusyboxRootfs } from './helpers/busybox.js';
import { flotillaCgroups, processAlive } from './helpers/runtime-debris.js';
import { ImageStore } from '../agent/runtime/images.js';

interface TaskJ {
  id: string;
  nodeId: string;
  node?: string;
  state: string;
  desiredState: string;
  containerId: string;
  error: string;
}
interface NodeJ {
  id: string;
  hostname: string;
  status: string;
  addr: string;
}

const skip = !isRoot() || !builtCli();
if (skip) process.stderr.write(`test bed tests skipped: they need root and a built CLI (npx tsc -p tsconfig.json)${isRoot() ? '' : '; not root'}\n`);

const netnsInode = (name: string): number => fs.statSync(`/run/netns/${name}`).ino;
const netns = (): string[] => {
  try {
    return fs.readdirSync('/run/netns');
  } catch {
    return [];
  }
};

/** One busybox root file system, imported into each host's own data dir before its daemon starts. */
let rootfs = '';
async function importInto(h: TestbedHost): Promise<void> {
  const store = await ImageStore.open(h.dataDir);
  await store.import('busybox:latest', rootfs, { config: { cmd: ['sh'] } });
}

/** Connects to addr:port from the calling process's network namespace; true when it connected within ms. */
function canConnect(host: string, port: number, ms = 1_000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(ms, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

describe.skipIf(skip)('multi-host test bed on runc (needs root)', () => {
  let bed: Testbed;

  beforeAll(async () => {
    rootfs = fs.mkdtempSync('/tmp/flotilla-testbed-busybox-');
    await buildBusyboxRootfs(rootfs);
    bed = await Testbed.create({ managers: 1, agents: 2, prepareHost: importInto });
  });
  afterAll(async () => {
    await bed?.destroy();
    if (rootfs) fs.rmSync(rootfs, { recursive: true, force: true });
  });

  it('gives each host its own namespace, address and daemon, registered with its underlay address', async () => {
    expect(bed.hosts.map((h) => [h.name, h.role])).toEqual([
      ['h1', 'manager'],
      ['h2', 'agent'],
      ['h3', 'agent'],
    ]);
    const inodes = new Set(bed.hosts.map((h) => netnsInode(h.netns)));
    expect(inodes.size).toBe(3);
    expect(inodes.has(fs.statSync('/proc/self/ns/net').ino)).toBe(false);
    for (const h of bed.hosts) {
      // the daemon runs inside its host's network namespace
      expect(h.pid).toBeGreaterThan(0);
      expect(fs.statSync(`/proc/${h.pid}/ns/net`).ino).toBe(netnsInode(h.netns));
      const addr = await h.exec(['ip', '-4', '-o', 'addr', 'show', 'dev', 'eth0']);
      expect(addr.stdout).toContain(` ${h.ip}/24 `);
    }
    const nodes = await bed.cliJson<NodeJ[]>(['node', 'ls']);
    const byName = new Map(nodes.map((n) => [n.hostname, n]));
    expect([...byName.keys()].sort()).toEqual(['h1', 'h2', 'h3']);
    for (const h of bed.hosts) {
      expect(byName.get(h.name)!.status).toBe('ready');
      // an agent reports its underlay address (the only non-loopback one it sees), a manager its HOST:PORT
      expect(byName.get(h.name)!.addr).toBe(h.role === 'manager' ? h.addr : h.ip);
    }
  });

  it('spreads a replicated service over the hosts, each container running inside its host', async () => {
    const r = await bed.cli(['service', 'create', '-d', '--name', 'web', '--replicas', '3', '--network', 'host', '--stop-grace-period', '1s', 'busybox:latest', 'sleep', '1000']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const nodes = new Map((await bed.cliJson<NodeJ[]>(['node', 'ls'])).map((n) => [n.id, n.hostname]));
    let last: TaskJ[] = [];
    const tasks = await waitFor('3 running tasks', async () => {
      last = await bed.cliJson<TaskJ[]>(['service', 'ps', 'web']);
      const ts = last.filter((t) => t.desiredState === 'running' && t.state === 'running');
      return ts.length === 3 ? ts : undefined;
    }, 20_000).catch((err: Error) => {
      throw new Error(`${err.message}; tasks: ${JSON.stringify(last.map((t) => [t.state, t.error]))}`);
    });
    expect(new Set(tasks.map((t) => nodes.get(t.nodeId))).size).toBe(3);
    for (const t of tasks) {
      const host = bed.hosts.find((h) => h.name === nodes.get(t.nodeId))!;
      const insp = JSON.parse((await host.cli(['container', 'inspect', t.containerId])).stdout) as { state: string; pid: number };
      expect(insp.state).toBe('running');
      // the container's process shares its host's network namespace, not the machine's or another host's
      expect(fs.statSync(`/proc/${insp.pid}/ns/net`).ino).toBe(netnsInode(host.netns));
      // and only that host's runtime knows it
      for (const other of bed.hosts.filter((h) => h !== host)) {
        const ls = JSON.parse((await other.cli(['container', 'ls', '-a', '--format', 'json'])).stdout) as Array<{ id: string }>;
        expect(ls.map((c) => c.id)).not.toContain(t.containerId);
      }
    }
  });

  it('connects the hosts over the underlay, which the root namespace cannot reach', async () => {
    const [h1, h2, h3] = bed.hosts as [TestbedHost, TestbedHost, TestbedHost];
    for (const [a, b] of [
      [h1, h2],
      [h2, h3],
      [h3, h1],
    ] as const) {
      const ping = await a.exec(['/bin/busybox', 'ping', '-c', '1', '-W', '2', b.ip]);
      expect(ping.stdout, `${a.name} -> ${b.name}: ${ping.stderr}`).toContain('1 packets received');
    }
    // a listener in h1 that reports every connection it accepts: one from h3 arrives, one from the root
    // namespace does not (it leaves by the machine's default route, where no test host is; on some
    // virtual networks the gateway itself accepts any connection, so only the listener's view counts)
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    const server = `const s=require('net').createServer((c)=>{console.log('from '+c.remoteAddress);c.destroy()}).listen(${port},'${h1.ip}',()=>console.log('listening'));setTimeout(()=>s.close(),4000).unref()`;
    const listener = spawn('nsenter', [`--net=/run/netns/${h1.netns}`, '--', process.execPath, '-e', server], { stdio: ['ignore', 'pipe', 'inherit'] });
    let seen = '';
    listener.stdout.setEncoding('utf8').on('data', (d: string) => (seen += d));
    const exited = new Promise((r) => listener.once('exit', r));
    try {
      await waitFor('the listener', () => seen.includes('listening'));
      const probe = `require('net').connect({host:'${h1.ip}',port:${port}}).on('connect',()=>process.exit(0)).on('error',()=>process.exit(1)).setTimeout(2000,()=>process.exit(2))`;
      expect((await h3.exec([process.execPath, '-e', probe])).code).toBe(0);
      await waitFor('h3 seen', () => seen.includes(`from ${h3.ip}`));
      await canConnect(h1.ip, port);
      await new Promise((r) => setTimeout(r, 300));
      expect(seen.trim().split('\n')).toEqual(['listening', `from ${h3.ip}`]);
    } finally {
      listener.kill('SIGKILL');
      await exited;
    }
    // nothing of the underlay is in the root namespace: no address of the subnet, no link of the bed,
    // and the route to a host's address is the machine's ordinary one (not a link of the bed)
    const rootAddrs = execFileSync('ip', ['-4', '-o', 'addr'], { encoding: 'utf8' });
    expect(rootAddrs).not.toContain(`${bed.state.subnet}.`);
    expect(fs.readdirSync('/sys/class/net').filter((l) => l.includes(`fl${bed.runId}`))).toEqual([]);
    const route = execFileSync('ip', ['route', 'get', h2.ip], { encoding: 'utf8' });
    expect(route).not.toMatch(new RegExp(`fl${bed.runId}|${bed.state.bridge}`));
    // and no host has a way out: no default route, so test traffic never leaves through the machine's interface
    const out = await h2.exec(['ip', 'route', 'get', '1.1.1.1']);
    expect(out.code).not.toBe(0);
    expect(out.stderr).toMatch(/unreachable/i);
  });

  it('stops and restarts an agent host: its node goes down and comes back, its container outlives the daemon', async () => {
    const node = async (name: string): Promise<NodeJ> => (await bed.cliJson<NodeJ[]>(['node', 'ls'])).find((n) => n.hostname === name)!;
    const h2 = bed.hosts[1]!;
    const [ctr] = JSON.parse((await h2.cli(['container', 'ls', '--format', 'json'])).stdout) as Array<{ id: string; pid: number }>;
    expect(ctr).toBeDefined();
    const daemon = h2.pid;
    await bed.stopAgent(1);
    expect(h2.pid).toBe(0);
    // a stopped daemon may linger as a zombie until its parent reaps it: that counts as gone
    expect(processAlive(daemon)).toBe(false);
    expect(processAlive(ctr!.pid)).toBe(true);
    await waitFor('h2 down', async () => (await node('h2')).status === 'down');
    await bed.startAgent(1);
    expect((await node('h2')).status).toBe('ready');
    expect(h2.pid).not.toBe(daemon);
    expect(fs.statSync(`/proc/${h2.pid}/ns/net`).ino).toBe(netnsInode(h2.netns));
    await expect(bed.startAgent(0)).rejects.toThrow('host 0 is not an agent host');
    await expect(bed.startAgent(1)).rejects.toThrow(/h2 is running already/);
  });

  it('destroy() removes every namespace, process, container, cgroup, mount and directory', async () => {
    const containers: Array<{ id: string; pid: number }> = [];
    for (const h of bed.hosts) {
      const ls = JSON.parse((await h.cli(['container', 'ls', '--format', 'json'])).stdout) as Array<{ id: string; pid: number }>;
      containers.push(...ls);
    }
    expect(containers.length).toBeGreaterThanOrEqual(3);
    const daemons = bed.hosts.map((h) => h.pid);
    const names = [bed.state.underlay, ...bed.hosts.map((h) => h.netns)];
    expect(flotillaCgroups(containers.map((c) => c.id)).length).toBeGreaterThan(0);
    const problems = await bed.destroy();
    expect(problems).toEqual([]);
    expect(bed.leftovers()).toEqual([]);
    // the same, checked independently of the helper
    expect(netns().filter((n) => names.includes(n))).toEqual([]);
    for (const pid of [...daemons, ...containers.map((c) => c.pid)]) expect(fs.existsSync(`/proc/${pid}`), `pid ${pid}`).toBe(false);
    expect(flotillaCgroups(containers.map((c) => c.id))).toEqual([]);
    expect(fs.existsSync(bed.root)).toBe(false);
    expect(fs.readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(bed.root);
    expect(Testbed.runs()).not.toContain(bed.runId);
    expect(await bed.destroy()).toEqual([]); // twice is harmless
  });
});

describe.skipIf(skip)('test bed creation that fails half-way (needs root)', () => {
  it('cleans up when a host daemon fails to start', async () => {
    const runId = Math.floor(Math.random() * 0xffffff).toString(16);
    const logged: string[] = [];
    // h3's agent refuses its arguments: by then the namespaces, the manager and h2's agent exist
    const err = await Testbed.create({
      managers: 1,
      agents: 2,
      runId,
      extraArgs: (h) => (h.name === 'h3' ? ['--label', 'no-equals-sign'] : []),
      log: (m) => logged.push(m),
    }).then(
      async (bed) => {
        await bed.destroy();
        return undefined;
      },
      (e: Error) => e,
    );
    expect(err?.message).toMatch(/^h3 \(agent\) exited: .*--label/);
    expect(logged.join('\n')).toContain('create failed, cleaning up');
    expect(Testbed.leftovers(runId)).toEqual([]);
    expect(netns().filter((n) => n.startsWith(`fl-${runId}-`))).toEqual([]);
  });

  it('cleans up when aborted while building', async () => {
    const runId = Math.floor(Math.random() * 0xffffff).toString(16);
    const ctl = new AbortController();
    const err = await Testbed.create({
      managers: 1,
      agents: 1,
      runId,
      signal: ctl.signal,
      log: () => {},
      // aborted as h2's agent starts: the manager runs and the agent is spawned
      extraArgs: (h) => {
        if (h.name === 'h2') ctl.abort(new Error('stop here'));
        return [];
      },
    }).then(
      async (bed) => {
        await bed.destroy();
        return undefined;
      },
      (e: Error) => e,
    );
    expect(err?.message).toBe('stop here');
    expect(Testbed.leftovers(runId)).toEqual([]);
    expect(netns().filter((n) => n.startsWith(`fl-${runId}-`))).toEqual([]);
  });

  it('Testbed.sweep() (run by every create()) removes the bed of a test process that died', async () => {
    const compiled = new URL('../dist/test/helpers/testbed.js', import.meta.url).pathname;
    if (!fs.existsSync(compiled)) throw new Error(`${compiled} missing: npx tsc -p tsconfig.json`);
    const runId = Math.floor(Math.random() * 0xffffff).toString(16);
    // a process makes a bed (a manager with a sim agent) and is SIGKILLed: nothing of its own cleans up
    const script = `const { Testbed } = await import(${JSON.stringify(compiled)}); await Testbed.create({ runId: '${runId}', runtime: 'sim' }); process.kill(process.pid, 'SIGKILL');`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: 'ignore' });
    const status = await new Promise<NodeJS.Signals | null>((r) => child.once('exit', (_code, sig) => r(sig)));
    expect(status).toBe('SIGKILL');
    const before = Testbed.leftovers(runId);
    expect(before).toContain(`netns fl-${runId}-h1`);
    expect(before.some((l) => l.startsWith('process '))).toBe(true); // its manager outlives it
    const logged: string[] = [];
    await Testbed.sweep((m) => logged.push(m));
    expect(logged.join('\n')).toContain(`test bed ${runId}: sweeping a test bed left by process ${child.pid}`);
    expect(Testbed.leftovers(runId)).toEqual([]);
  });
});
