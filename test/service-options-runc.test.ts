/**
 * Docker's container options of `service create|update` on real runc, one node (manager with its
 * in-process agent). Each option is checked in the running container, not only in the spec:
 *  capabilities (CapEff bits in /proc/self/status), a read-only root (a write fails), tini as PID 1, the
 *  ulimit (`ulimit -n`), the sysctl (/proc/sys), the stop signal (seen by the process when an update
 *  replaces it), the hostname template's result, resolv.conf, the /etc/hosts extra entry, the
 *  supplementary group, the tty, --env-file, the container labels, -w, a tmpfs's size; then the update
 *  flags (-add/-rm) reach the new container, `service inspect` shows the options, --entrypoint is split
 *  the same on create and update, and bad values get one clear line and create nothing.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TestCluster, builtCli, cli, cliJson, isRoot, waitFor, type CliResult, startRuncNode } from './helpers/procs.js';
import type { TaskJson } from '../cli/format.js';

type TaskJ = TaskJson;

const skip = !isRoot() || !builtCli();

/** Docker's default capability set as a CapEff mask: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP */
const DEFAULT_CAPS = 0xa80425fbn;
const CAP_CHOWN = 1n << 0n;
const CAP_NET_ADMIN = 1n << 12n;
const CAP_SYS_TIME = 1n << 25n;

describe.skipIf(skip)('service container options on real runc (needs root)', () => {
  const c = new TestCluster('flotilla-opts-');
  const dataDir = path.join(c.root, 'm1');
  const out = path.join(c.root, 'out');
  const envFile = path.join(c.root, 'app.env');
  const exec = (id: string, script: string) => cli(['container', 'exec', '--data-dir', dataDir, id, 'sh', '-c', script]);
  const running = async (svc: string) => (await cliJson<TaskJ[]>(['service', 'ps', svc], c.env)).filter((t) => t.desiredState === 'running' && t.state === 'running');
  const oneLine = (r: CliResult): string => {
    expect(r.code).not.toBe(0);
    expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
    return r.stderr.trim();
  };
  const capEff = (status: string): bigint => BigInt(`0x${/CapEff:\s*([0-9a-f]+)/.exec(status)![1]}`);

  beforeAll(async () => {
    fs.mkdirSync(out, { mode: 0o777 });
    fs.writeFileSync(envFile, '# app settings\nFROM_FILE=yes\n\nOVERRIDDEN=file\n');
    await startRuncNode(c);
  }, 60_000);
  afterAll(async () => {
    await cli(['service', 'rm', 'opts'], c.env).catch(() => undefined);
    await waitFor('containers removed', async () => (await cliJson<unknown[]>(['container', 'ls', '-a', '--data-dir', dataDir])).length === 0, 20_000).catch(() => undefined);
    await c.cleanup({ expectEmpty: true });
  });

  let first = '';

  it('creates a service whose container has every option', async () => {
    // the process records what it sees of its stdio and environment, and the signal that stops it
    const script = [
      'tty > /out/tty',
      'env > /out/env',
      'pwd > /out/pwd',
      'trap "echo USR1 > /out/signal; exit 0" USR1',
      'trap "echo TERM > /out/signal; exit 0" TERM',
      'while true; do sleep 0.1; done',
    ].join('; ');
    const r = await cli(
      [
        'service', 'create', '--name', 'opts', '--stop-grace-period', '5s',
        '--cap-add', 'net_admin', '--cap-drop', 'CAP_CHOWN', '--read-only', '--init',
        '--ulimit', 'nofile=123:456', '--sysctl', 'net.core.somaxconn=321', '--stop-signal', 'USR1',
        '--hostname', '{{.Service.Name}}-{{.Task.Slot}}-{{.Node.Hostname}}',
        '--dns', '192.0.2.53', '--dns-search', 'example.test', '--dns-option', 'ndots:2', '--dns-option', 'timeout:1',
        '--host', 'db.local:10.9.8.7', '--group', 'nogroup', '-t', '--env-file', envFile, '-e', 'OVERRIDDEN=flag',
        '--container-label', 'tier=backend', '-u', '0', '-w', '/tmp',
        '--mount', `type=bind,source=${out},target=/out`, '--mount', 'type=tmpfs,target=/scratch,tmpfs-size=2m,tmpfs-mode=1770',
        '--entrypoint', 'sh -c', 'busybox:latest', script,
      ],
      c.env,
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const [t] = await waitFor('a running task', async () => ((await running('opts')).length === 1 ? running('opts') : undefined), 30_000);
    first = t!.containerId;

    // capabilities: Docker's defaults, less CHOWN, plus NET_ADMIN (the exec'd process and the init alike)
    const self = await exec(first, 'cat /proc/self/status');
    expect(capEff(self.stdout)).toBe((DEFAULT_CAPS & ~CAP_CHOWN) | CAP_NET_ADMIN);
    const pid = (JSON.parse((await cli(['container', 'inspect', '--data-dir', dataDir, first])).stdout) as { pid: number; labels: Record<string, string> }).pid;
    expect(capEff(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))).toBe((DEFAULT_CAPS & ~CAP_CHOWN) | CAP_NET_ADMIN);

    // a read-only root; the bind and the tmpfs stay writable
    const ro = await exec(first, 'touch /probe; echo rc=$?; touch /out/probe /scratch/probe && echo writable');
    expect(ro.stdout + ro.stderr).toMatch(/Read-only file system/);
    expect(ro.stdout).toMatch(/rc=1/);
    expect(ro.stdout).toMatch(/writable/);

    // tini is PID 1 and runs the command as its child
    const init = await exec(first, 'tr "\\0" " " < /proc/1/cmdline');
    expect(init.stdout).toMatch(/^\/sbin\/docker-init -- sh -c tty/);

    const probe = await exec(
      first,
      'echo "n=$(ulimit -n) hn=$(ulimit -Hn)"; echo "somaxconn=$(cat /proc/sys/net/core/somaxconn)"; echo "host=$(hostname)"; echo "groups=$(id -G)"; grep " /scratch " /proc/mounts',
    );
    expect(probe.stdout).toMatch(/n=123 hn=456/);
    expect(probe.stdout).toMatch(/somaxconn=321/);
    // the template: service name, slot, node host name
    expect(probe.stdout).toMatch(/host=opts-1-m1\n/);
    // nogroup is 65534 in the image's /etc/group
    expect(probe.stdout).toMatch(/groups=0 65534\n/);
    expect(probe.stdout).toMatch(/tmpfs \/scratch tmpfs rw,nosuid,nodev,.*size=2048k,mode=1770/);

    const resolv = (await exec(first, 'cat /etc/resolv.conf')).stdout;
    expect(resolv).toMatch(/^nameserver 192\.0\.2\.53$/m);
    expect(resolv).toMatch(/^search example\.test$/m);
    expect(resolv).toMatch(/^options .*ndots:2/m);
    expect(resolv).toMatch(/^options .*timeout:1/m);
    expect((await exec(first, 'cat /etc/hosts')).stdout).toMatch(/^10\.9\.8\.7\tdb\.local$/m);

    // what the process itself saw at start: a terminal, the env file (-e wins), -w
    await waitFor('the process wrote its probes', () => fs.existsSync(path.join(out, 'pwd')));
    expect(fs.readFileSync(path.join(out, 'tty'), 'utf8')).toMatch(/^\/dev\/pts\/\d+/);
    const env = fs.readFileSync(path.join(out, 'env'), 'utf8');
    expect(env).toMatch(/^FROM_FILE=yes$/m);
    expect(env).toMatch(/^OVERRIDDEN=flag$/m);
    expect(fs.readFileSync(path.join(out, 'pwd'), 'utf8').trim()).toBe('/tmp');

    const labels = (JSON.parse((await cli(['container', 'inspect', '--data-dir', dataDir, first])).stdout) as { labels: Record<string, string> }).labels;
    expect(labels.tier).toBe('backend');
  }, 60_000);

  it('service inspect shows the options', async () => {
    const [s] = await cliJson<Array<{ spec: { task: { container: Record<string, unknown> } } }>>(['service', 'inspect', 'opts'], c.env);
    expect(s!.spec.task.container).toMatchObject({
      command: ['sh', '-c'],
      user: '0',
      workdir: '/tmp',
      hostname: '{{.Service.Name}}-{{.Task.Slot}}-{{.Node.Hostname}}',
      capAdd: ['CAP_NET_ADMIN'],
      capDrop: ['CAP_CHOWN'],
      readOnly: true,
      init: true,
      tty: true,
      ulimits: [{ name: 'nofile', soft: 123, hard: 456 }],
      sysctls: { 'net.core.somaxconn': '321' },
      stopSignal: 'SIGUSR1',
      dnsConfig: { nameservers: ['192.0.2.53'], search: ['example.test'], options: ['ndots:2', 'timeout:1'] },
      hosts: ['10.9.8.7 db.local'],
      groups: ['nogroup'],
      labels: { tier: 'backend' },
    });
    expect(s!.spec.task.container.mounts).toEqual([
      expect.objectContaining({ type: 'bind', source: out, target: '/out' }),
      expect.objectContaining({ type: 'tmpfs', target: '/scratch', tmpfsSizeBytes: 2 * 1024 * 1024, tmpfsMode: 0o1770 }),
    ]);
  });

  it('--entrypoint is split the same way on create and update', async () => {
    const r = await cli(['service', 'update', '--dry-run', '--entrypoint', 'sh -c', 'opts'], c.env);
    expect(r.code).toBe(0);
    expect(r.stdout).not.toMatch(/container\.command/);
    expect(r.stdout).toMatch(/Tasks that would be replaced \(0\)/);
  });

  it('update flags reach the new container; the old one was stopped with the stop signal', async () => {
    const r = await cli(
      [
        'service', 'update', '--cap-add', 'SYS_TIME', '--cap-drop', 'NET_ADMIN', '--ulimit-rm', 'nofile', '--ulimit-add', 'nofile=77',
        '--sysctl-rm', 'net.core.somaxconn', '--sysctl-add', 'net.ipv4.ip_forward=1', '--dns-rm', '192.0.2.53', '--dns-add', '192.0.2.54',
        '--host-add', 'cache.local:10.9.8.8', '--host-rm', 'db.local', '--group-rm', 'nogroup', '--group-add', '65533', '--no-read-only',
        '--hostname', 'fixed-name', '--container-label-add', 'tier=front', '--mount-rm', '/scratch', '--stop-signal', 'TERM', 'opts',
      ],
      c.env,
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    // the old container got SIGUSR1 (through tini) and wrote it down
    expect(fs.readFileSync(path.join(out, 'signal'), 'utf8').trim()).toBe('USR1');
    const [t] = await running('opts');
    expect(t!.containerId).not.toBe(first);
    const id = t!.containerId;
    expect(capEff((await exec(id, 'cat /proc/self/status')).stdout)).toBe((DEFAULT_CAPS & ~CAP_CHOWN) | CAP_SYS_TIME);
    const probe = await exec(
      id,
      'echo "n=$(ulimit -n)"; echo "fwd=$(cat /proc/sys/net/ipv4/ip_forward) somaxconn=$(cat /proc/sys/net/core/somaxconn)"; echo "host=$(hostname)"; echo "groups=$(id -G)"; cat /etc/resolv.conf /etc/hosts; touch /probe && echo rw; grep -c " /scratch " /proc/mounts',
    );
    expect(probe.stdout).toMatch(/n=77\n/);
    expect(probe.stdout).toMatch(/fwd=1 somaxconn=4096\n|fwd=1 somaxconn=128\n/);
    expect(probe.stdout).toMatch(/host=fixed-name\n/);
    expect(probe.stdout).toMatch(/groups=0 65533\n/);
    expect(probe.stdout).toMatch(/^nameserver 192\.0\.2\.54$/m);
    expect(probe.stdout).not.toMatch(/192\.0\.2\.53|db\.local/);
    expect(probe.stdout).toMatch(/^10\.9\.8\.8\tcache\.local$/m);
    expect(probe.stdout).toMatch(/^rw$/m);
    expect(probe.stdout).toMatch(/^0$/m);
  }, 60_000);

  it('rejects bad values with one line naming the field and value, and creates nothing', async () => {
    // the CLI's one line for a few (every parser's messages: cli/containerflags.test.ts, without processes)
    const cases: [string[], RegExp][] = [
      [['--sysctl', 'kernel.hostname=x'], /--sysctl "kernel\.hostname": not a namespaced sysctl/],
      [['--cap-add', 'NOPE'], /--cap-add "NOPE": unknown capability/],
      [['--hostname', '{{.Service.Nom}}'], /--hostname .*unknown template field \.Service\.Nom/],
      [['--mount', 'type=bind,target=/x'], /--mount .*a bind mount needs a source/],
    ];
    for (const [flags, want] of cases) {
      const r = await cli(['service', 'create', '-d', '--name', 'bad', ...flags, 'busybox:latest', 'true'], c.env);
      expect(oneLine(r), flags.join(' ')).toMatch(want);
    }
    const up = await cli(['service', 'update', '--mount-rm', '/nowhere', 'opts'], c.env);
    expect(oneLine(up)).toMatch(/--mount-rm "\/nowhere": the service has no mount at this target/);
    const ls = await cliJson<Array<{ name: string }>>(['service', 'ls'], c.env);
    expect(ls.map((s) => s.name)).toEqual(['opts']);
  }, 60_000);
});
