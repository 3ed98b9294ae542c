/**
 * Published ports end to end on the test bed (1 manager that runs no task, 3 agents, real runc): the
 * routing mesh (ingress mode) answers on every host and reaches tasks on other hosts; traffic-policy
 * local lands only on the receiving host's task and the container sees the client's real address;
 * host mode binds only where a task runs, keeps the client address, and a second service wanting the
 * same host port stays pending on that node with a reason naming the port; UDP; bad input at the CLI;
 * removing a port or the services leaves no rule on any host.
 *
 * The client is the manager host's network namespace (h1, address known); the servers are socat
 * (Debian's, copied into the busybox image with its libraries) printing the container's hostname (the
 * short task id) and SOCAT_PEERADDR, the client address as the container sees it.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Testbed, type TestbedHost } from './helpers/testbed.js';
import { builtCli, isRoot, waitFor } from './helpers/procs.js';
import { buildBusyboxRootfs } from './helpers/busybox.js';
import { ImageStore } from '../agent/runtime/images.js';

interface TaskJ {
  id: string;
  nodeId: string;
  state: string;
  desiredState: string;
  containerId: string;
  error: string;
}
interface NodeJ {
  id: string;
  hostname: string;
}

const SOCAT = '/usr/bin/socat';
const skip = !isRoot() || !builtCli() || !fs.existsSync('/usr/lib/cni/bridge') || !fs.existsSync(SOCAT);
if (skip) console.warn('published-ports skipped: needs root, a built CLI, the CNI plugins and socat (apt-get install socat)');

/** busybox plus socat and the shared libraries it loads, at their own paths. */
async function buildRootfs(dir: string): Promise<void> {
  await buildBusyboxRootfs(dir);
  const libs = execFileSync('ldd', [SOCAT], { encoding: 'utf8' })
    .split('\n')
    .map((l) => /(\/\S+)/.exec(l.includes('=>') ? l.split('=>')[1]! : l)?.[1])
    .filter((p): p is string => !!p);
  for (const f of [SOCAT, ...libs]) {
    const to = path.join(dir, f);
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.copyFileSync(fs.realpathSync(f), to);
    fs.chmodSync(to, 0o755);
  }
}

const REPLY = `SYSTEM:'echo $(hostname) $SOCAT_PEERADDR'`;
const TCP_SERVER = `socat TCP-LISTEN:80,fork,reuseaddr ${REPLY}`;
const UDP_SERVER = `socat UDP-RECVFROM:53,fork ${REPLY}`;

describe.skipIf(skip)('published ports on the test bed (needs root, CNI plugins, socat)', () => {
  let bed: Testbed;
  let rootfs = '';
  let client: TestbedHost;
  let agents: TestbedHost[] = [];
  const nodeName = new Map<string, string>();

  beforeAll(async () => {
    rootfs = fs.mkdtempSync('/tmp/flotilla-ports-rootfs-');
    await buildRootfs(rootfs);
    bed = await Testbed.create({
      managers: 1,
      agents: 3,
      managerAgent: false,
      prepareHost: async (h) => (await ImageStore.open(h.dataDir)).import('socat:latest', rootfs, { config: { cmd: ['sh'] } }),
    });
    client = bed.hosts[0]!;
    agents = bed.agents;
    for (const n of await bed.cliJson<NodeJ[]>(['node', 'ls'])) nodeName.set(n.id, n.hostname);
  }, 120_000);
  afterAll(async () => {
    if (bed) expect(await bed.destroy()).toEqual([]);
    if (rootfs) fs.rmSync(rootfs, { recursive: true, force: true });
  }, 120_000);

  const running = (svc: string, n: number): Promise<TaskJ[]> =>
    waitFor(
      `${n} running tasks of ${svc}`,
      async () => {
        const ts = (await bed.cliJson<TaskJ[]>(['service', 'ps', svc])).filter((t) => t.desiredState === 'running' && t.state === 'running');
        return ts.length === n ? ts : undefined;
      },
      60_000,
    );
  const hostOf = (t: TaskJ): TestbedHost => agents.find((h) => h.name === nodeName.get(t.nodeId))!;
  /** one TCP exchange from the client host: "<task hostname> <peer address as the container saw it>" or '' */
  const tcp = async (ip: string, port: number, from = client): Promise<string> => (await from.exec(['socat', '-T2', '-', `TCP:${ip}:${port},connect-timeout=2`], { timeoutMs: 5000 })).stdout.trim();
  /** n TCP exchanges in a row from one shell on the client host (cheaper than a process per exchange) */
  const tcpMany = async (ip: string, port: number, n: number): Promise<string[]> => {
    const r = await client.exec(['sh', '-c', `for i in $(seq ${n}); do socat -T2 - TCP:${ip}:${port},connect-timeout=2 </dev/null; echo; done`], { timeoutMs: 5000 * n });
    return r.stdout.split('\n').map((l) => l.trim()).filter(Boolean);
  };
  const udp = async (ip: string, port: number): Promise<string> =>
    (await client.exec(['sh', '-c', `echo x | socat -T2 - UDP:${ip}:${port}`], { timeoutMs: 5000 })).stdout.trim();
  const rulesOn = async (h: TestbedHost): Promise<string> => (await h.exec(['nft', 'list', 'ruleset'])).stdout;

  it('bad input: one line naming the field and value, nothing created', async () => {
    const bad: Array<[string[], RegExp]> = [
      [['-p', '70000:80'], /^flotilla: invalid --publish "70000:80": published port 70000 is out of range \(1-65535\)$/],
      [['-p', 'abc'], /^flotilla: invalid --publish "abc": target port "abc" is not a number$/],
      [['-p', '8080:80', '-p', '8080:81'], /^flotilla: invalid --publish "8080:81": published port 8080\/tcp given twice$/],
      [['-p', 'published=8080,target=80,traffic-policy=nearest'], /traffic-policy "nearest" must be cluster or local$/],
    ];
    const results = await Promise.all(bad.map(([flags]) => bed.cli(['service', 'create', '-d', '--name', 'bad', ...flags, 'socat:latest', 'sleep', '100'])));
    for (const [i, [flags, want]] of bad.entries()) {
      const r = results[i]!;
      expect(r.code, flags.join(' ')).not.toBe(0);
      expect(r.stderr.trim().split('\n'), flags.join(' ')).toHaveLength(1);
      expect(r.stderr.trim()).toMatch(want);
    }
    expect((await bed.cliJson<unknown[]>(['service', 'ls'])).length).toBe(0);
    expect((await bed.cliJson<Array<{ name: string }>>(['network', 'ls'])).map((n) => n.name)).not.toContain('ingress');
  }, 30_000);

  it('ingress mode: the port answers on every host, reaches tasks on other hosts; TCP and UDP; a taken port is refused naming the service', async () => {
    // the services of the next tests too, so that their tasks start meanwhile
    const created = await Promise.all([
      bed.cli([
        'service', 'create', '-d', '--name', 'web', '--replicas', '2', '--replicas-max-per-node', '1', '--stop-grace-period', '1s',
        '-p', '8080:80', '-p', '5353:53/udp', '-p', '80',
        'socat:latest', 'sh', '-c', `${UDP_SERVER} & ${TCP_SERVER}`,
      ]),
      bed.cli([
        'service', 'create', '-d', '--name', 'loc', '--mode', 'global', '--stop-grace-period', '1s',
        '-p', 'published=8081,target=80,traffic-policy=local', 'socat:latest', 'sh', '-c', TCP_SERVER,
      ]),
      bed.cli([
        'service', 'create', '-d', '--name', 'hm', '--replicas', '1', '--stop-grace-period', '1s',
        '-p', 'published=8082,target=80,mode=host', 'socat:latest', 'sh', '-c', TCP_SERVER,
      ]),
    ]);
    for (const c of created) expect(c.stderr).toBe('');
    let r: Awaited<ReturnType<typeof bed.cli>>;
    const tasks = await running('web', 2);
    const ids = tasks.map((t) => t.id.slice(0, 12)).sort();
    const withTask = tasks.map(hostOf);
    const without = agents.find((h) => !withTask.includes(h))!;

    // PORTS column and inspect (the omitted published port allocated from 30000-32767)
    const ls = await bed.cli(['service', 'ls']);
    expect(ls.stdout).toMatch(/PORTS/);
    expect(ls.stdout).toContain('*:8080->80/tcp, *:5353->53/udp, *:30000->80/tcp');
    const [insp] = await bed.cliJson<Array<{ ports: { allocated: Array<{ publishedPort: number; protocol: string; publishMode: string }> } }>>(['service', 'inspect', 'web']);
    expect(insp!.ports.allocated.map((p) => `${p.publishedPort}/${p.protocol}/${p.publishMode}`)).toEqual(['8080/tcp/ingress', '5353/udp/ingress', '30000/tcp/ingress']);

    // another service cannot take 8080
    r = await bed.cli(['service', 'create', '-d', '--name', 'thief', '-p', '8080:80', 'socat:latest', 'sleep', '100']);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim()).toBe('flotilla: published port 8080/tcp is already used by service web');

    // every host answers, each task is reached; the host without a task reaches both over the mesh
    const seen = new Map<string, Set<string>>();
    for (const h of agents) {
      const got = new Set<string>();
      await waitFor(`${h.name}:8080 reaches both tasks`, async () => {
        const line = await tcp(h.ip, 8080);
        if (line) got.add(line.split(' ')[0]!);
        return got.size === 2 ? true : undefined;
      }, 20_000);
      seen.set(h.name, got);
      // a task on another host sees the receiving host's ingress address (10.255.0.0/16), never the client's
      const lines = await tcpMany(h.ip, 8080, 6);
      expect(lines.length).toBe(6);
      for (const line of lines) {
        const [task, peer] = line.split(' ');
        const local = tasks.some((t) => t.id.startsWith(task ?? '?') && hostOf(t) === h);
        if (local) expect(peer).toBe(client.ip);
        else expect(peer).toMatch(/^10\.255\./);
      }
    }
    for (const got of seen.values()) expect([...got].sort()).toEqual(ids);
    // the allocated port and UDP, through the host without a task; localhost on a host
    expect(ids).toContain((await tcp(without.ip, 30000)).split(' ')[0]);
    expect(ids).toContain((await udp(without.ip, 5353)).split(' ')[0]);
    expect(ids).toContain((await tcp('127.0.0.1', 8080, without)).split(' ')[0]);
    const rules = await rulesOn(without);
    expect(rules).toContain('table ip flotilla-ports');
    expect(rules).toMatch(/udp \. 5353/);

    // --publish-rm: the UDP port leaves every host's rules
    r = await bed.cli(['service', 'update', '-d', 'web', '--publish-rm', '5353/udp']);
    expect(r.stderr).toBe('');
    for (const h of agents) await waitFor(`${h.name}: no rule for 5353/udp`, async () => (/5353/.test(await rulesOn(h)) ? undefined : true), 10_000);
  }, 90_000);

  it('traffic-policy local: each host sends only to its own task, which sees the client address', async () => {
    const tasks = await running('loc', 3);
    for (const t of tasks) {
      const h = hostOf(t);
      await waitFor(`${h.name}:8081 answers`, async () => (await tcp(h.ip, 8081)) || undefined, 10_000);
      expect(await tcpMany(h.ip, 8081, 4)).toEqual(Array(4).fill(`${t.id.slice(0, 12)} ${client.ip}`));
    }
  }, 60_000);

  it('host mode: bound only where a task runs, keeps the client address; a second service wanting the port is pending on that host', async () => {
    const [t] = await running('hm', 1);
    const h = hostOf(t!);
    const line = await waitFor(`${h.name}:8082 answers`, async () => (await tcp(h.ip, 8082)) || undefined, 10_000);
    expect(line).toBe(`${t!.id.slice(0, 12)} ${client.ip}`);
    for (const other of agents.filter((x) => x !== h)) expect(await tcp(other.ip, 8082)).toBe('');

    const r = await bed.cli([
      'service', 'create', '-d', '--name', 'hm2', '--mode', 'global', '--stop-grace-period', '1s',
      '-p', 'published=8082,target=80,mode=host', 'socat:latest', 'sh', '-c', TCP_SERVER,
    ]);
    expect(r.stderr).toBe('');
    await running('hm2', 2);
    const pending = await waitFor('hm2 pending on the taken host', async () => {
      const ts = await bed.cliJson<TaskJ[]>(['service', 'ps', 'hm2']);
      return ts.find((x) => x.state === 'pending' && x.error);
    }, 20_000);
    expect(pending.error).toBe(`node ${h.name} has host port 8082/tcp in use`);
    const ps = await bed.cli(['service', 'ps', 'hm2']);
    expect(ps.stdout).toContain('host port 8082/tcp in use');
  }, 60_000);

  it('removing the services leaves no published-port rule on any host', async () => {
    const r = await bed.cli(['service', 'rm', 'web', 'loc', 'hm', 'hm2']);
    expect(r.code).toBe(0);
    for (const h of agents) {
      await waitFor(
        `${h.name}: no flotilla-ports table, no ingress devices`,
        async () => {
          const rules = await rulesOn(h);
          const links = (await h.exec(['ip', '-o', 'link'])).stdout;
          return !rules.includes('flotilla') && !/808[0-2]|30000/.test(rules) && !/fl-br-|fl-vx-/.test(links) ? true : undefined;
        },
        30_000,
      );
    }
  }, 60_000);
});
