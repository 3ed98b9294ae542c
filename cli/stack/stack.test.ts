/** The Compose reader and translator of `stack deploy`: interpolation, merge, every mapped key, warnings, errors. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { EndpointMode, PortProtocol, PublishMode, RestartCondition, ServiceMode, UpdateFailureAction, UpdateOrder } from '../../gen/flotilla/v1/objects.js';
import { ComposeError, interpolate, loadCompose, mergeFiles, parseYaml } from './compose.js';
import { IMAGE_LABEL, PENDING_SERVICE_KEYS, STACK_LABEL, parseEnvFile, parsePorts, shellSplit, translateStack, type StackPlan } from './translate.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-stack-unit-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function write(name: string, text: string): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, text);
  return f;
}

/** Loads the given YAML texts as -c files and translates them for stack "st". */
function plan(texts: string[], env: Record<string, string | undefined> = {}): StackPlan & { unset: string[] } {
  const files = texts.map((t, i) => write(`c${i}-${Math.random().toString(36).slice(2)}.yml`, t));
  const { doc, unset } = loadCompose(files, env);
  return { ...translateStack('st', doc, { baseDir: dir, env }), unset };
}

function error(texts: string[], env: Record<string, string | undefined> = {}): string {
  try {
    plan(texts, env);
  } catch (err) {
    expect(err).toBeInstanceOf(ComposeError);
    const msg = (err as Error).message;
    expect(msg.split('\n')).toHaveLength(1);
    return msg;
  }
  throw new Error('no error');
}

const svc = (p: StackPlan, key: string) => {
  const s = p.services.find((x) => x.key === key);
  if (!s) throw new Error(`no service ${key}`);
  return s.spec;
};

describe('interpolation', () => {
  const env = { A: 'a', EMPTY: '', N: '3' };
  const run = (s: string) => {
    const unset = new Set<string>();
    return { out: interpolate(s, env, 'k', unset), unset: [...unset] };
  };
  it('substitutes $VAR and ${VAR}, $$ is a literal $', () => {
    expect(run('x-$A-${A}-$$A-$${A}').out).toBe('x-a-a-$A-${A}');
    expect(run('cost: 5$').out).toBe('cost: 5$');
  });
  it('defaults: ${VAR:-d} for unset or empty, ${VAR-d} for unset only, nested', () => {
    expect(run('${EMPTY:-d}|${EMPTY-d}|${NOPE-d}|${NOPE:-d}|${A:-d}').out).toBe('d||d|d|a');
    expect(run('${NOPE:-${A}x}').out).toBe('ax');
  });
  it('alternatives: ${VAR:+alt}, ${VAR+alt}', () => {
    expect(run('${A:+y}|${EMPTY:+y}|${EMPTY+y}|${NOPE+y}').out).toBe('y||y|');
  });
  it('an unset variable becomes "" and is reported', () => {
    expect(run('a${NOPE}b$NOPE2')).toEqual({ out: 'ab', unset: ['NOPE', 'NOPE2'] });
  });
  it('${VAR:?err} and ${VAR?err} fail with the message, naming the key', () => {
    expect(() => run('${NOPE:?give it}')).toThrow('k: required variable NOPE is missing a value: give it');
    expect(() => run('${EMPTY:?}')).toThrow('k: required variable EMPTY is missing a value');
    expect(run('${EMPTY?x}').out).toBe('');
  });
  it('refuses broken syntax', () => {
    expect(() => run('${A')).toThrow(/missing "}"/);
    expect(() => run('${1A}')).toThrow(/does not start with a variable name/);
    expect(() => run('${A:x}')).toThrow(/unexpected ":x"/);
  });
  it('applies to values (with their key path), not keys; typed fields accept interpolated numbers', () => {
    const p = plan(['services:\n  web:\n    image: busybox:${TAG:-1.36}\n    deploy: {replicas: "${N}"}\n    labels: {$A: v}\n'], env);
    expect(svc(p, 'web').task!.container!.image).toBe('busybox:1.36');
    expect(svc(p, 'web').replicas).toBe(3);
    expect(svc(p, 'web').task!.container!.labels).toHaveProperty('$A', 'v');
    expect(error(['services:\n  web:\n    image: ${IMG:?set IMG}\n'])).toBe('services.web.image: required variable IMG is missing a value: set IMG');
  });
  it('reads no .env file (as docker stack deploy)', () => {
    write('.env', 'TAG=fromdotenv\n');
    const p = plan(['services:\n  web: {image: "busybox:${TAG:-latest}"}\n']);
    expect(svc(p, 'web').task!.container!.image).toBe('busybox:latest');
  });
});

describe('YAML', () => {
  it('reads YAML 1.1 octal modes, anchors and merge keys', () => {
    const d = parseYaml('a: 0440\nb: 440\nx: &x {k: 1}\ny: {<<: *x, j: 2}\n', 'f');
    expect(d).toEqual({ a: 0o440, b: 440, x: { k: 1 }, y: { k: 1, j: 2 } });
  });
  it('one line for bad YAML, a duplicate key, a non-mapping, an empty file', () => {
    expect(() => parseYaml('a: [1\n', 'f.yml')).toThrow(/^f\.yml:\d+:\d+: invalid YAML/);
    expect(() => parseYaml('a: 1\na: 2\n', 'f.yml')).toThrow(/^f\.yml:2:1: invalid YAML: Map keys must be unique$/);
    expect(() => parseYaml('- a\n', 'f.yml')).toThrow('f.yml: the top level must be a mapping');
    expect(() => parseYaml('', 'f.yml')).toThrow('f.yml: empty file');
    expect(() => loadCompose([path.join(dir, 'nope.yml')], {})).toThrow(/nope\.yml: no such file/);
  });
});

describe('merge of -c files in order', () => {
  it('overrides scalars, merges mappings by key, lists by their identity', () => {
    const base = YAML.parse(`
services:
  web:
    image: a:1
    command: [x, y]
    environment: [A=1, B=2]
    labels: {l1: a}
    secrets: [s1, {source: s2, target: t}]
    ports: ["80:80"]
    cap_add: [NET_ADMIN]
    deploy: {replicas: 1, placement: {constraints: [node.role==worker]}, labels: [d=1]}
  db: {image: db}
networks: {n: {driver_opts: {mtu: "1400"}}}
`) as Record<string, unknown>;
    const over = YAML.parse(`
services:
  web:
    image: a:2
    command: [z]
    environment: {B: 3, C: 4}
    labels: [l2=b]
    secrets: [{source: s2, target: t2}, s3]
    ports: ["81:81"]
    cap_add: [NET_ADMIN, SYS_TIME]
    deploy: {placement: {constraints: [node.labels.z==a]}, labels: {e: 2}}
  new: {image: n}
networks: {n: {attachable: true}}
`) as Record<string, unknown>;
    const m = mergeFiles([base, over]) as { services: Record<string, Record<string, unknown>>; networks: unknown };
    const web = m.services.web!;
    expect(web.image).toBe('a:2');
    expect(web.command).toEqual(['z']);
    expect(web.environment).toEqual({ A: '1', B: 3, C: 4 });
    expect(web.labels).toEqual({ l1: 'a', l2: 'b' });
    expect(web.secrets).toEqual(['s1', { source: 's2', target: 't2' }, 's3']);
    expect(web.ports).toEqual(['80:80', '81:81']);
    expect(web.cap_add).toEqual(['NET_ADMIN', 'SYS_TIME']);
    expect(web.deploy).toEqual({ replicas: 1, placement: { constraints: ['node.role==worker', 'node.labels.z==a'] }, labels: { d: '1', e: 2 } });
    expect(Object.keys(m.services)).toEqual(['web', 'db', 'new']);
    expect(m.networks).toEqual({ n: { driver_opts: { mtu: '1400' }, attachable: true } });
  });
  it('end to end through files: the override changes the image and one variable only', () => {
    const p = plan([
      'services:\n  web: {image: "busybox:1", environment: {A: "1", B: "2"}, deploy: {replicas: 2}}\n',
      'services:\n  web: {image: "busybox:2", environment: [B=3]}\n',
    ]);
    const w = svc(p, 'web');
    expect(w.task!.container!.image).toBe('busybox:2');
    expect(w.task!.container!.env).toEqual(['A=1', 'B=3']);
    expect(w.replicas).toBe(2);
  });
});

describe('translation: every mapped key', () => {
  write('secret.txt', 'hunter2\n');
  write('app.conf', 'listen 80\n');
  write('web.env', '# comment\nFROM_FILE=1\n  SPACED=a b \nOVERRIDDEN=file\nPASSED\nexport_NOT=x\n');
  const full = `
version: "3.9"
x-common: &common {restart: always}
services:
  web:
    image: busybox:latest
    entrypoint: ["/bin/sh", "-c"]
    command: 'echo "hello world" && sleep 1000'
    environment:
      OVERRIDDEN: env
      NUM: 5
      FROM_SHELL:
    env_file: web.env
    labels: {c.label: one}
    user: "1000:1000"
    working_dir: /srv
    hostname: webhost
    stop_grace_period: 3s
    healthcheck: {test: "wget -q localhost || exit 1", interval: 2s, timeout: 1s, retries: 4, start_period: 5s}
    networks:
      front: {aliases: [www]}
      back:
    secrets: [db_pw, {source: api_key, target: key.txt, uid: "100", gid: 101, mode: 0400}]
    configs: [{source: app_conf, target: /etc/app.conf, mode: 0o440}, app_conf2]
    x-note: ignored
    deploy:
      mode: replicated
      replicas: 3
      labels: [tier=front]
      endpoint_mode: dnsrr
      placement: {constraints: ["node.role==worker"], max_replicas_per_node: 2, preferences: [{spread: node.labels.zone}, {spread: node.id}]}
      resources: {limits: {cpus: "0.5", memory: 64M, pids: 100}, reservations: {cpus: 0.25, memory: 32m}}
      restart_policy: {condition: on-failure, delay: 2s, max_attempts: 3, window: 1m}
      update_config: {parallelism: 2, delay: 1s, failure_action: rollback, monitor: 10s, max_failure_ratio: 0.25, order: start-first}
      rollback_config: {parallelism: 0, failure_action: continue, order: stop-first}
  agent:
    image: busybox
    command: [sleep, "1000"]
    healthcheck: {disable: true}
    deploy: {mode: global}
networks:
  front: {driver: overlay, attachable: true, labels: {n: l}, driver_opts: {mtu: 1400}, ipam: {config: [{subnet: 10.77.0.0/24, gateway: 10.77.0.254}]}}
  back: {external: true, name: shared-back}
  unused: {}
secrets:
  db_pw: {file: ./secret.txt, labels: [k=v]}
  api_key: {external: true}
configs:
  app_conf: {file: app.conf, name: app-conf-v1}
  app_conf2: {external: {name: other}}
`;
  const p = plan([full], { FROM_SHELL: 'shell', PASSED: 'passed' });
  const web = svc(p, 'web');
  const c = web.task!.container!;

  it('names objects STACK_KEY (unless name: or external) and labels them with the stack', () => {
    expect(p.services.map((s) => s.spec.name)).toEqual(['st_web', 'st_agent']);
    expect(p.networks.map((n) => [n.key, n.name, n.external])).toEqual([
      ['front', 'st_front', false],
      ['back', 'shared-back', true],
      ['default', 'st_default', false],
    ]);
    expect(p.secrets.map((n) => [n.name, n.external])).toEqual([
      ['st_db_pw', false],
      ['api_key', true],
    ]);
    expect(p.configs.map((n) => [n.name, n.external])).toEqual([
      ['app-conf-v1', false],
      ['other', true],
    ]);
    expect(web.labels).toEqual({ tier: 'front', [STACK_LABEL]: 'st', [IMAGE_LABEL]: 'busybox:latest' });
    expect(c.labels).toEqual({ 'c.label': 'one', [STACK_LABEL]: 'st' });
    expect(p.networks[0]!.spec!.labels).toEqual({ n: 'l', [STACK_LABEL]: 'st' });
    expect(p.secrets[0]!.labels).toEqual({ k: 'v', [STACK_LABEL]: 'st' });
    expect(p.secrets[0]!.data!.toString()).toBe('hunter2\n');
    expect(p.configs[0]!.data!.toString()).toBe('listen 80\n');
  });
  it('maps image, entrypoint, command (shell words), environment with env_file, user, working_dir, hostname, stop_grace_period', () => {
    expect(c.image).toBe('busybox:latest');
    expect(c.command).toEqual(['/bin/sh', '-c']);
    expect(c.args).toEqual(['echo', 'hello world', '&&', 'sleep', '1000']);
    expect(c.env).toEqual(['FROM_FILE=1', 'FROM_SHELL=shell', 'NUM=5', 'OVERRIDDEN=env', 'PASSED=passed', 'SPACED=a b ', 'export_NOT=x']);
    expect(c.user).toBe('1000:1000');
    expect(c.workdir).toBe('/srv');
    expect(c.hostname).toBe('webhost');
    expect(c.stopGracePeriodMs).toBe(3000);
  });
  it('maps healthcheck (string test is CMD-SHELL; disable)', () => {
    expect(c.healthcheck).toEqual({ test: ['CMD-SHELL', 'wget -q localhost || exit 1'], intervalMs: 2000, timeoutMs: 1000, retries: 4, startPeriodMs: 5000 });
    expect(svc(p, 'agent').task!.container!.noHealthcheck).toBe(true);
  });
  it('maps networks with the service key as an alias; a service without networks joins STACK_default', () => {
    expect(web.task!.networks).toEqual([
      { target: 'st_front', aliases: ['web', 'www'] },
      { target: 'shared-back', aliases: ['web'] },
    ]);
    expect(svc(p, 'agent').task!.networks).toEqual([{ target: 'st_default', aliases: ['agent'] }]);
    const front = p.networks[0]!.spec!;
    expect(front.attachable).toBe(true);
    expect(front.driverOpts).toEqual({ mtu: '1400' });
    expect(front.ipam).toEqual({ subnet: '10.77.0.0/24', gateway: '10.77.0.254' });
  });
  it('maps secrets and configs, short and long, with Docker default targets', () => {
    expect(c.secrets).toEqual([
      { secretId: '', secretName: 'st_db_pw', file: { name: 'db_pw', uid: 0, gid: 0, mode: 0o444 } },
      { secretId: '', secretName: 'api_key', file: { name: 'key.txt', uid: 100, gid: 101, mode: 0o400 } },
    ]);
    expect(c.configs).toEqual([
      { configId: '', configName: 'app-conf-v1', file: { name: '/etc/app.conf', uid: 0, gid: 0, mode: 0o440 } },
      { configId: '', configName: 'other', file: { name: '/app_conf2', uid: 0, gid: 0, mode: 0o444 } },
    ]);
  });
  it('maps deploy: mode, replicas, placement, resources, restart, update and rollback config, endpoint mode', () => {
    expect(web.mode).toBe(ServiceMode.SERVICE_MODE_REPLICATED);
    expect(web.replicas).toBe(3);
    expect(svc(p, 'agent').mode).toBe(ServiceMode.SERVICE_MODE_GLOBAL);
    expect(svc(p, 'agent').replicas).toBe(0);
    // jobs: run to completion, restarted only on failure unless the file says otherwise
    const jobs = plan(['services:\n  once: {image: busybox, deploy: {mode: replicated-job, replicas: 3}}\n  each: {image: busybox, deploy: {mode: global-job, restart_policy: {condition: none}}}\n']);
    expect([svc(jobs, 'once').mode, svc(jobs, 'once').replicas, svc(jobs, 'once').task!.restart!.condition]).toEqual([ServiceMode.SERVICE_MODE_REPLICATED_JOB, 3, RestartCondition.RESTART_CONDITION_ON_FAILURE]);
    expect([svc(jobs, 'each').mode, svc(jobs, 'each').replicas, svc(jobs, 'each').task!.restart!.condition]).toEqual([ServiceMode.SERVICE_MODE_GLOBAL_JOB, 0, RestartCondition.RESTART_CONDITION_NONE]);
    expect(web.task!.placement).toEqual({ constraints: ['node.role==worker'], maxReplicasPerNode: 2, preferences: [{ spread: 'node.labels.zone' }, { spread: 'node.id' }] });
    expect(web.task!.resources).toEqual({ limits: { nanoCpus: 5e8, memoryBytes: 64 * 1024 * 1024, pids: 100 }, reservations: { nanoCpus: 2.5e8, memoryBytes: 32 * 1024 * 1024, pids: 0 } });
    expect(web.task!.restart).toEqual({ condition: RestartCondition.RESTART_CONDITION_ON_FAILURE, delayMs: 2000, maxAttempts: 3, windowMs: 60_000 });
    expect(web.update).toEqual({ parallelism: 2, delayMs: 1000, failureAction: UpdateFailureAction.UPDATE_FAILURE_ACTION_ROLLBACK, monitorMs: 10_000, maxFailureRatio: 0.25, order: UpdateOrder.UPDATE_ORDER_START_FIRST });
    expect(web.rollback).toMatchObject({ parallelism: 0, failureAction: UpdateFailureAction.UPDATE_FAILURE_ACTION_CONTINUE, order: UpdateOrder.UPDATE_ORDER_STOP_FIRST });
    expect(web.endpoint).toEqual({ mode: EndpointMode.ENDPOINT_MODE_DNSRR, ports: [] });
    // ports (the parsing is tested below): the endpoint, in VIP mode by default
    const pp = svc(plan(['services:\n  a: {image: busybox, ports: ["8080:80", {target: 53, published: 5353, protocol: udp, mode: host}]}\n']), 'a');
    expect(pp.endpoint).toEqual({
      mode: EndpointMode.ENDPOINT_MODE_VIP,
      ports: [
        { name: '', protocol: PortProtocol.PORT_PROTOCOL_TCP, targetPort: 80, publishedPort: 8080, publishMode: PublishMode.PUBLISH_MODE_INGRESS, localOnly: false },
        { name: '', protocol: PortProtocol.PORT_PROTOCOL_UDP, targetPort: 53, publishedPort: 5353, publishMode: PublishMode.PUBLISH_MODE_HOST, localOnly: false },
      ],
    });
  });
  it('defaults as docker stack deploy: 1 replica, restart any after 5s, 10s grace, no endpoint', () => {
    const d = svc(plan(['services:\n  a: {image: busybox}\n']), 'a');
    expect(d.replicas).toBe(1);
    expect(d.task!.restart).toEqual({ condition: RestartCondition.RESTART_CONDITION_ANY, delayMs: 5000, maxAttempts: 0, windowMs: 0 });
    expect(d.task!.container!.stopGracePeriodMs).toBe(10_000);
    expect(d.endpoint).toBeUndefined();
    expect(d.update).toMatchObject({ parallelism: 1, order: UpdateOrder.UPDATE_ORDER_STOP_FIRST });
  });
  it('warns about x- keys never, and about nothing in this file', () => {
    expect(p.warnings).toEqual([]);
  });
  it('only the networks a service uses are created', () => {
    expect(p.networks.find((n) => n.key === 'unused')).toBeUndefined();
  });
});

describe('translation: volumes and container options', () => {
  const p = plan([
    `
services:
  db:
    image: busybox
    volumes:
      - data:/data
      - ./conf:/conf:ro
      - /var/log:/host-log
      - /anon
      - {type: volume, source: shared, target: /shared, read_only: true, volume: {nocopy: true}}
      - {type: tmpfs, target: /scratch, tmpfs: {size: 64m, mode: 01777}}
    tmpfs: /run/x
    cap_add: [net_admin, CAP_SYS_TIME]
    cap_drop: [ALL]
    read_only: true
    init: true
    ulimits: {nproc: 512, nofile: {soft: 1024, hard: 2048}}
    sysctls: [net.core.somaxconn=1024]
    stop_signal: INT
    hostname: "{{.Service.Name}}-{{.Task.Slot}}"
    dns: 10.0.0.2
    dns_search: [example.org]
    dns_opt: [ndots:2]
    extra_hosts: ["db.local:10.1.2.3", "v6=::1"]
    tty: true
    group_add: [wheel, 1001]
volumes:
  data: {driver: local, driver_opts: {type: tmpfs, device: tmpfs, o: size=10m}, labels: [keep=yes]}
  shared: {external: true, name: the-shared-one}
`,
  ]);
  const c = p.services[0]!.spec.task!.container!;
  it('maps volumes: named ones as STACK_KEY with their driver options and labels, binds from the file folder, anonymous, tmpfs', () => {
    const base = { volumeOpts: {}, volumeLabels: {}, tmpfsSizeBytes: 0, tmpfsMode: 0, volumeNocopy: false, readonly: false };
    expect(c.mounts).toEqual([
      { ...base, type: 'volume', source: 'st_data', target: '/data', volumeOpts: { type: 'tmpfs', device: 'tmpfs', o: 'size=10m' }, volumeLabels: { keep: 'yes', [STACK_LABEL]: 'st' } },
      { ...base, type: 'bind', source: path.join(dir, 'conf'), target: '/conf', readonly: true },
      { ...base, type: 'bind', source: '/var/log', target: '/host-log' },
      { ...base, type: 'volume', source: '', target: '/anon' },
      { ...base, type: 'volume', source: 'the-shared-one', target: '/shared', readonly: true, volumeNocopy: true },
      { ...base, type: 'tmpfs', source: '', target: '/scratch', tmpfsSizeBytes: 64 * 1024 * 1024, tmpfsMode: 0o1777 },
      { ...base, type: 'tmpfs', source: '', target: '/run/x' },
    ]);
    expect(p.warnings).toEqual([]);
  });
  it('maps cap_add/cap_drop, read_only, init, ulimits, sysctls, stop_signal, hostname templates, dns, extra_hosts, tty, group_add', () => {
    expect(c.capAdd).toEqual(['CAP_NET_ADMIN', 'CAP_SYS_TIME']);
    expect(c.capDrop).toEqual(['ALL']);
    expect([c.readOnly, c.init, c.tty]).toEqual([true, true, true]);
    expect(c.ulimits).toEqual([
      { name: 'nofile', soft: 1024, hard: 2048 },
      { name: 'nproc', soft: 512, hard: 512 },
    ]);
    expect(c.sysctls).toEqual({ 'net.core.somaxconn': '1024' });
    expect(c.stopSignal).toBe('SIGINT');
    expect(c.hostname).toBe('{{.Service.Name}}-{{.Task.Slot}}');
    expect(c.dnsConfig).toEqual({ nameservers: ['10.0.0.2'], search: ['example.org'], options: ['ndots:2'] });
    expect(c.hosts).toEqual(['10.1.2.3 db.local', '::1 v6']);
    expect(c.groups).toEqual(['wheel', '1001']);
  });
  it('refuses bad values, naming the key', () => {
    const one = (svcYaml: string, extra = '') => error([`services:\n  a:\n    image: busybox\n${svcYaml}${extra}`]);
    expect(one('    volumes: [nope:/x]\n')).toBe('services.a.volumes[0]: volume "nope" is not declared in the top-level volumes');
    expect(one('    volumes: ["v:rel"]\nvolumes: {v: {}}\n')).toBe('services.a.volumes[0]: the target must be an absolute path, got "rel"');
    expect(one('    volumes: [{type: nfs, target: /x}]\n')).toBe('services.a.volumes[0].type: must be volume, bind or tmpfs, got "nfs"');
    expect(one('    volumes: ["/a:/x", "/b:/x"]\n')).toBe('services.a.volumes: two mounts have this target, got "/x"');
    expect(one('    cap_add: [FLY]\n')).toBe('services.a.cap_add[0]: unknown capability (e.g. NET_ADMIN, SYS_TIME, ALL), got "FLY"');
    expect(one('    ulimits: {nofile: {soft: 10, hard: 5}}\n')).toBe('services.a.ulimits: the soft limit cannot be above the hard limit, got "nofile=10:5"');
    expect(one('    ulimits: {nofile: lots}\n')).toBe('services.a.ulimits.nofile: must be a whole number (-1: unlimited), got "lots"');
    expect(one('    sysctls: {kernel.panic: 1}\n')).toContain('services.a.sysctls: not a namespaced sysctl');
    expect(one('    stop_signal: SIGNOPE\n')).toContain('services.a.stop_signal: unknown signal');
    expect(one('    hostname: "{{.Nope}}"\n')).toContain('services.a.hostname: unknown template field .Nope');
    expect(one('    dns: [not-an-ip]\n')).toBe('services.a.dns: a name server is an IP address, got "not-an-ip"');
    expect(one('    extra_hosts: [nocolon]\n')).toBe('services.a.extra_hosts[0]: expected HOST:IP, got "nocolon"');
    expect(one('    read_only: maybe\n')).toBe('services.a.read_only: must be true or false, got "maybe"');
    expect(one('', 'volumes: {v: {driver: nfs}}\n')).toBe('volumes.v.driver: only the local driver is supported, got "nfs"');
    expect(one('', 'volumes: {v: {driver_opts: {size: 1}}}\n')).toBe('volumes.v.driver_opts.size: unknown option (the local driver takes type, device, o)');
  });
});

describe('unsupported keys are named in warnings, never dropped silently', () => {
  it('keys of features not there yet, Docker-ignored keys, nested ones', () => {
    const p = plan([
      `
name: proj
services:
  web:
    image: busybox
    build: .
    restart: always
    ports: [{target: 80, host_ip: 127.0.0.1}]
    volumes: [{type: bind, source: /srv, target: /srv, bind: {propagation: rshared}}]
    healthcheck: {test: [CMD, "true"], start_interval: 1s}
    networks: {default: {ipv4_address: 10.0.0.5}}
    deploy: {resources: {reservations: {generic_resources: []}}}
networks:
  default: {internal: true}
`,
    ]);
    expect([...p.warnings].sort()).toEqual(
      [
      'name: not supported by flotilla stacks, ignored',
      'networks.default.internal: not supported by flotilla stacks, ignored',
      'services.web.build: not supported by flotilla stacks, ignored',
      'services.web.restart: not supported by flotilla stacks, ignored',
      'services.web.ports[0].host_ip: not supported by flotilla stacks, ignored',
      'services.web.deploy.resources.reservations.generic_resources: not supported by flotilla stacks, ignored',
      'services.web.networks.default.ipv4_address: not supported by flotilla stacks, ignored',
      'services.web.volumes[0].bind.propagation: not supported by flotilla stacks, ignored',
      'services.web.healthcheck.start_interval: not supported by flotilla stacks, ignored',
    ].sort());
    expect(svc(p, 'web').task!.container!.healthcheck?.test).toEqual(['CMD', 'true']);
    expect(PENDING_SERVICE_KEYS).toEqual({});
  });
  it('an unknown key is an error, with a suggestion', () => {
    expect(error(['services:\n  web: {imgae: busybox}\n'])).toBe('services.web.imgae: unknown key (did you mean image?)');
    expect(error(['services:\n  web: {image: busybox, deploy: {replica: 2}}\n'])).toBe('services.web.deploy.replica: unknown key (did you mean replicas?)');
    expect(error(['servics: {}\n'])).toBe('servics: unknown key (did you mean services?)');
  });
});

describe('invalid files: one line naming the key path and the problem', () => {
  const cases: Array<[string, string]> = [
    ['services:\n  web: {image: busybox, deploy: {replicas: x}}\n', 'services.web.deploy.replicas: must be a non-negative integer, got "x"'],
    ['services:\n  web: {image: busybox, deploy: {replicas: -1}}\n', 'services.web.deploy.replicas: must be a non-negative integer, got -1'],
    ['services:\n  web: {image: busybox, deploy: {mode: global, replicas: 2}}\n', 'services.web.deploy.replicas: cannot be set with mode: global'],
    ['services:\n  web: {image: busybox, deploy: {mode: global-job, replicas: 1}}\n', 'services.web.deploy.replicas: cannot be set with mode: global-job'],
    ['services:\n  web: {image: busybox, deploy: {mode: lots}}\n', 'services.web.deploy.mode: must be replicated, global, replicated-job or global-job, got "lots"'],
    ['services:\n  web: {image: busybox, deploy: {placement: {preferences: [{spread: node.zone}]}}}\n', 'services.web.deploy.placement.preferences[0].spread: unknown key "node.zone"'],
    ['services:\n  web: {image: busybox, deploy: {placement: {preferences: [{pack: node.id}]}}}\n', 'services.web.deploy.placement.preferences[0].pack: unknown key'],
    ['services:\n  web: {command: x}\n', 'services.web.image: required (stack deploy builds no images)'],
    ['services:\n  web: {image: "Bad Image"}\n', 'services.web.image: expected [REGISTRY[:PORT]/]NAME[:TAG][@sha256:DIGEST] or sha256:DIGEST, got "Bad Image"'],
    ['services:\n  web: {image: busybox, stop_grace_period: soon}\n', 'services.web.stop_grace_period: expected a duration such as 10s, 500ms or 1m30s, got "soon"'],
    ['services:\n  web: {image: busybox, stop_grace_period: 10}\n', 'services.web.stop_grace_period: must be a duration such as 10s or 1m30s, got 10'],
    ['services:\n  web: {image: busybox, stop_grace_period: 2d}\n', 'services.web.stop_grace_period: expected a duration such as 10s, 500ms or 1m30s, got "2d"'],
    ['services:\n  web: {image: busybox, deploy: {resources: {limits: {memory: lots}}}}\n', 'services.web.deploy.resources.limits.memory: expected a size such as 64m, 1g or 512k, got "lots"'],
    ['services:\n  web: {image: busybox, deploy: {resources: {limits: {memory: 1k}}}}\n', 'services.web.deploy.resources.limits.memory: must be at least 4MiB, got 1024'],
    ['services:\n  web: {image: busybox, deploy: {resources: {limits: {cpus: "-1"}}}}\n', 'services.web.deploy.resources.limits.cpus: expected a decimal number of CPUs such as 0.5 or 2, got "-1"'],
    ['services:\n  web: {image: busybox, deploy: {placement: {constraints: ["node.zone=a"]}}}\n', 'services.web.deploy.placement.constraints[0]: expected KEY==VALUE or KEY!=VALUE, got "node.zone=a"'],
    ['services:\n  web: {image: busybox, deploy: {restart_policy: {condition: always}}}\n', 'services.web.deploy.restart_policy.condition: must be none, on-failure or any, got "always"'],
    ['services:\n  web: {image: busybox, deploy: {rollback_config: {failure_action: rollback}}}\n', 'services.web.deploy.rollback_config.failure_action: must be pause or continue, got "rollback"'],
    ['services:\n  web: {image: busybox, deploy: {update_config: {max_failure_ratio: 2}}}\n', 'services.web.deploy.update_config.max_failure_ratio: must be a number between 0 and 1, got 2'],
    ['services:\n  web: {image: busybox, deploy: {endpoint_mode: rr}}\n', 'services.web.deploy.endpoint_mode: must be vip or dnsrr, got "rr"'],
    ['services:\n  web: {image: busybox, networks: [nope]}\n', 'services.web.networks.nope: network "nope" is not declared in the top-level networks'],
    ['services:\n  web: {image: busybox, secrets: [nope]}\n', 'services.web.secrets[0]: secret "nope" is not declared in the top-level secrets'],
    ['services:\n  web: {image: busybox, configs: [{source: c, mode: 999}]}\nconfigs:\n  c: {external: true}\n', 'services.web.configs[0].mode: must be an octal file mode such as 0440 (at most 0777), got 999'],
    ['services:\n  web: {image: busybox, environment: 5}\n', 'services.web.environment: must be a mapping or a list of KEY=VALUE, got 5'],
    ['services:\n  web: {image: busybox, environment: ["=x"]}\n', 'services.web.environment[0]: expected KEY=VALUE, got "=x"'],
    ['services:\n  web: {image: busybox, env_file: missing.env}\n', `services.web.env_file[0]: no such file "${path.join(dir, 'missing.env')}"`],
    ['services:\n  web: {image: busybox, working_dir: rel}\n', 'services.web.working_dir: must be an absolute path, got "rel"'],
    ['services:\n  web: {image: busybox, command: "sh -c \'x"}\n', `services.web.command: unterminated single quote in "sh -c 'x"`],
    ['services:\n  web: {image: busybox, healthcheck: {test: [sh, x]}}\n', 'services.web.healthcheck.test: a list must start with CMD, CMD-SHELL or NONE, got "sh"'],
    ['services:\n  web: {image: busybox, ports: ["80:99999"]}\n', 'services.web.ports[0]: must be a port number between 1 and 65535, got "99999"'],
    ['services:\n  web: {image: busybox, ports: ["8080:80", "8080:81"]}\n', 'services.web.ports: published port given twice, got "8080/tcp"'],
    ['services:\n  web: {image: busybox, ports: ["1.2.3.4:80:80"]}\n', 'services.web.ports[0]: expected [PUBLISHED:]TARGET[/PROTOCOL] (host addresses are not supported in a stack), got "1.2.3.4:80:80"'],
    ['services:\n  web: {image: busybox}\nsecrets:\n  s: {}\n', 'secrets.s: needs file: (or external: true)'],
    ['services:\n  web: {image: busybox}\nsecrets:\n  s: {file: nope.txt}\n', `secrets.s.file: no such file "${path.join(dir, 'nope.txt')}"`],
    ['services:\n  web: {image: busybox, networks: [n]}\nnetworks:\n  n: {driver: bridge}\n', 'networks.n.driver: only overlay is supported, got "bridge"'],
    ['services:\n  web: {image: busybox, networks: [n]}\nnetworks:\n  n: {external: true, driver: overlay}\n', 'networks.n.driver: cannot be set on an external network'],
    ['services:\n  web: {image: busybox, networks: [n]}\nnetworks:\n  n: {ipam: {config: [{subnet: 10.0.0.0/33}]}}\n', 'networks.n.ipam.config[0].subnet: not an IPv4 CIDR (e.g. 10.1.0.0/24), got "10.0.0.0/33"'],
    ['services:\n  web: {image: busybox, networks: [n]}\nnetworks:\n  n: {ipam: {config: [{subnet: 10.0.0.0/24, gateway: 10.0.1.1}]}}\n', 'networks.n.ipam.config[0].gateway: '],
    ['services:\n  web: {image: busybox, networks: [n]}\nnetworks:\n  n: {driver_opts: {mtu: 10}}\n', 'networks.n.driver_opts.mtu: '],
    ['services:\n  web: {image: busybox, user: "a b"}\n', 'services.web.user: expected USER[:GROUP] or UID[:GID], got "a b"'],
    ['services:\n  web: {image: busybox, networks: [n]}\nnetworks:\n  n: {driver_opts: {color: red}}\n', 'networks.n.driver_opts.color: unknown option (known: mtu)'],
    ['services: {}\n', 'services: the file defines no service'],
    ['services:\n  this-is-a-very-long-service-name-that-does-not-fit-in-sixty-three-characters: {image: busybox}\n', 'services.this-is-a-very-long-service-name-that-does-not-fit-in-sixty-three-characters: the service name'],
  ];
  for (const [text, want] of cases)
    it(want, () => {
      expect(error([text])).toContain(want);
    });
  it('the stack name itself', () => {
    expect(() => translateStack('bad name', { services: { a: { image: 'busybox' } } }, { baseDir: dir, env: {} })).toThrow(/stack name "bad name"/);
  });
});

describe('the README example', () => {
  it('is a valid stack file with the mappings it claims', () => {
    const readme = fs.readFileSync(path.join(path.dirname(new URL(import.meta.url).pathname), '../../README.md'), 'utf8');
    const section = readme.slice(readme.indexOf('## Stacks (Compose files)'));
    const yml = /cat > stack\.yml <<'EOF'\n([\s\S]*?)\nEOF\n/.exec(section)?.[1];
    expect(yml).toBeDefined();
    write('db_password.txt', 's3cr3t');
    const hi = plan([yml!], { GREETING: 'hi' });
    expect(hi.warnings).toEqual([]);
    expect(hi.services.map((s) => s.spec.name)).toEqual(['st_api', 'st_client']);
    expect(svc(hi, 'api').task!.container!.args).toEqual(['sh', '-c', 'echo "greeting=$GREETING"; exec sleep 100000']);
    expect(svc(hi, 'api').task!.container!.env).toEqual(['GREETING=hi']);
    expect(svc(plan([yml!]), 'api').task!.container!.env).toEqual(['GREETING=hello']);
    expect(hi.networks.map((n) => n.name)).toEqual(['st_default']);
    expect(hi.secrets.map((n) => n.name)).toEqual(['st_db_password']);
  });
});

describe('helpers', () => {
  it('shellSplit splits as a shell would', () => {
    expect(shellSplit('k', `a "b c" 'd "e"' f\\ g "h\\"i" ''`)).toEqual(['a', 'b c', 'd "e"', 'f g', 'h"i', '']);
  });
  it('parseEnvFile: Docker format (values as written, KEY alone from the environment)', () => {
    expect(parseEnvFile('k', 'f', 'A="q"\n#c\n\nB\nC\n', { B: 'b' })).toEqual({ A: '"q"', B: 'b' });
    expect(() => parseEnvFile('k', 'f', 'A B=1\n', {})).toThrow('k: f:1: invalid variable name "A B"');
  });
  it('parsePorts: short and long syntax, ranges, protocols, modes', () => {
    const tcp = PortProtocol.PORT_PROTOCOL_TCP;
    const ingress = PublishMode.PUBLISH_MODE_INGRESS;
    expect(parsePorts('p', ['80', '8080:80', '53:53/udp', '9000-9001:90-91', { target: 6379, published: 7000, mode: 'host', protocol: 'tcp' }])).toEqual([
      { name: '', protocol: tcp, targetPort: 80, publishedPort: 0, publishMode: ingress, localOnly: false },
      { name: '', protocol: tcp, targetPort: 80, publishedPort: 8080, publishMode: ingress, localOnly: false },
      { name: '', protocol: PortProtocol.PORT_PROTOCOL_UDP, targetPort: 53, publishedPort: 53, publishMode: ingress, localOnly: false },
      { name: '', protocol: tcp, targetPort: 90, publishedPort: 9000, publishMode: ingress, localOnly: false },
      { name: '', protocol: tcp, targetPort: 91, publishedPort: 9001, publishMode: ingress, localOnly: false },
      { name: '', protocol: tcp, targetPort: 6379, publishedPort: 7000, publishMode: PublishMode.PUBLISH_MODE_HOST, localOnly: false },
    ]);
    expect(() => parsePorts('p', ['9000-9002:90-91'])).toThrow('p[0]: the published and target ranges must have the same length');
  });
});
