import { Command } from 'commander';
import {
  CreateServiceResponse,
  GetServiceResponse,
  ListNodesResponse,
  ListServicesResponse,
  ListNetworksResponse,
  ListTasksResponse,
  LogLine,
  UpdateServiceResponse,
} from '../../gen/flotilla/v1/control.js';
import { Node, Service, ServiceMode, Task, TaskState, type RegistryAuth } from '../../gen/flotilla/v1/objects.js';
import { shortId } from '../../common/ids.js';
import { parseDuration, parseUint } from '../../common/units.js';
import { invalidArgument } from '../../common/errors.js';
import { withControl } from '../client.js';
import { buildServiceSpec, ServiceFlags } from '../servicespec.js';
import { addContainerCreateFlags, addContainerUpdateFlags } from '../containerflags.js';
import { waitForService } from '../progress.js';
import { applyUpdate, waitForUpdate, type UpdateFlags } from '../update.js';
import { formatPorts } from '../../manager/allocator/ports.js';
import { diffSpecs } from '../../manager/controlapi/diff.js';
import { isUp } from '../../manager/orchestrator/update.js';
import { imageCell, renderTemplate, serviceJson, serviceModeName, taskJson, taskName, taskStateName, updateStateName, healthName } from '../format.js';
import { action, checkFormat, checkFormatOrTemplate, collect, printJson, table, timeAgo, ExitError } from '../util.js';
import { isJobService, jobProgress } from '../../manager/orchestrator/jobs.js';
import { serviceFilter, taskFilter } from '../filters.js';
import { parseTime } from './events.js';

export function hostOption(cmd: Command): Command {
  return cmd.option('-H, --host <host>', 'manager address: unix:///path or HOST:PORT (env FLOTILLA_HOST)');
}

interface ImageFlags {
  /** false with --no-resolve-image */
  resolveImage?: boolean;
  withRegistryAuth?: boolean;
}

/** This client's credentials for the registry of an image (--with-registry-auth); one line when there are none. */
async function registryAuthFor(image: string): Promise<RegistryAuth> {
  const r = await import('../../agent/runtime/registry/index.js');
  const registry = r.parseReference(image, 'image').registry;
  const creds = await r.loadCredentials(registry);
  if (!creds) throw new ExitError(1, `--with-registry-auth: no credentials for registry ${registry} (run flotilla image login ${registry})`);
  return { registry, username: creds.username, password: creds.password };
}

/**
 * create and update keep Docker's meaning of --host (an extra /etc/hosts entry, HOST:IP): there the
 * manager address is given with -H only (or FLOTILLA_HOST).
 */
function shortHostOption(cmd: Command): Command {
  return cmd.option('-H <host>', 'manager address: unix:///path or HOST:PORT (env FLOTILLA_HOST; --host is an extra hosts entry here, as in Docker)');
}

/** The flags `service create` and `service update` share. */
export function addSpecFlags(cmd: Command): Command {
  return cmd
    .option('--no-resolve-image', 'do not resolve the image tag to a digest (the reference is kept as given)')
    .option('--with-registry-auth', "send this client's credentials for the image's registry (flotilla image login) to the nodes that run the tasks")
    .option('--constraint <expr>', 'placement constraint, e.g. node.labels.zone==a (repeatable)', collect)
    .option('--replicas-max-per-node <n>', 'maximum replicas per node (0 = unlimited)')
    .option('--max-concurrent <n>', 'replicated jobs: how many tasks run at once (default: --replicas)')
    .option('--reserve-cpu <cpus>', 'reserve CPUs')
    .option('--reserve-memory <bytes>', 'reserve memory, e.g. 64m')
    .option('--limit-cpu <cpus>', 'limit CPUs')
    .option('--limit-memory <bytes>', 'limit memory, e.g. 64m')
    .option('--limit-pids <n>', 'limit the number of processes')
    .option('-w, --workdir <dir>', 'working directory inside the container')
    .option('-u, --user <user>', 'username or UID[:GID]')
    .option('--entrypoint <cmd>', 'override the image entrypoint (split like a shell line; "" on update: back to the image\'s)')
    .option('--network <net>', 'overlay network (name or id; name=NET,alias=A for aliases; repeatable), or host or none (the container\'s network mode)', collect)
    .option('-p, --publish <spec>', 'publish a port: PUBLISHED:TARGET[/udp], TARGET (published port allocated), or published=P,target=T[,protocol=tcp|udp][,mode=ingress|host][,traffic-policy=cluster|local] (repeatable)', collect)
    .option('--endpoint-mode <mode>', 'vip (a virtual IP balanced over the tasks) or dnsrr (DNS round robin over the task addresses)')
    .option('--restart-condition <cond>', 'any, on-failure or none')
    .option('--restart-delay <duration>', 'delay between restart attempts (default 5s)')
    .option('--restart-max-attempts <n>', 'maximum restarts before giving up (0 = unlimited)')
    .option('--restart-window <duration>', 'window used to evaluate the restart policy')
    .option('--stop-grace-period <duration>', 'time to wait before force-killing a container (default 10s)')
    .option('--health-cmd <cmd>', 'command to run to check health')
    .option('--health-interval <duration>', 'time between running the check')
    .option('--health-timeout <duration>', 'maximum time to allow one check to run')
    .option('--health-retries <n>', 'consecutive failures needed to report unhealthy')
    .option('--health-start-period <duration>', 'start period for the container to initialise')
    .option('--no-healthcheck', "disable any container-specified HEALTHCHECK")
    .option('--update-parallelism <n>', 'maximum number of tasks updated simultaneously (0 to update all at once)')
    .option('--update-delay <duration>', 'delay between updates')
    .option('--update-failure-action <action>', 'action on update failure: pause, continue or rollback')
    .option('--update-monitor <duration>', 'duration after each task update to monitor for failure')
    .option('--update-max-failure-ratio <ratio>', 'failure rate to tolerate during an update')
    .option('--update-order <order>', 'update order: start-first or stop-first')
    .option('--rollback-parallelism <n>', 'maximum number of tasks rolled back simultaneously')
    .option('--rollback-delay <duration>', 'delay between task rollbacks')
    .option('--rollback-failure-action <action>', 'action on rollback failure: pause or continue')
    .option('--rollback-monitor <duration>', 'duration after each task rollback to monitor for failure')
    .option('--rollback-max-failure-ratio <ratio>', 'failure rate to tolerate during a rollback')
    .option('--rollback-order <order>', 'rollback order: start-first or stop-first');
}

export interface TaskListOpts {
  host?: string;
  format?: string;
  quiet?: boolean;
  trunc?: boolean;
  filter?: string[];
}

/** The task table of `service ps` and `node ps` (Docker's columns), or json, or a template. */
export function printTasks(tasks: Task[], nodes: Map<string, Node>, opts: TaskListOpts): void {
  const format = checkFormatOrTemplate(opts.format);
  tasks.sort((a, b) => a.serviceName.localeCompare(b.serviceName) || a.slot - b.slot || a.nodeId.localeCompare(b.nodeId) || (b.meta?.createdAt ?? 0) - (a.meta?.createdAt ?? 0));
  if (opts.quiet) return void process.stdout.write(tasks.map((t) => t.id + '\n').join(''));
  if (format === 'json') return printJson(tasks.map((t) => taskJson(t, nodes)));
  const trunc = opts.trunc !== false;
  let prevSlot = '';
  const rows = tasks.map((t) => {
    const name = taskName(t, nodes);
    const shown = name === prevSlot ? ` \\_ ${name}` : name;
    prevSlot = name;
    const err = t.status?.err ?? '';
    return {
      ID: trunc ? shortId(t.id) : t.id,
      Name: shown,
      Image: imageCell(t.spec?.container?.image ?? '', trunc, 'short'),
      Node: nodes.get(t.nodeId)?.description?.hostname ?? '',
      DesiredState: cap(taskStateName(t.desiredState)),
      // a task getting its image shows the progress (e.g. "Preparing (fetching from h1: 1/3 layers, 12.0MiB/40.0MiB) 2 seconds ago")
      CurrentState: `${cap(taskStateName(t.status?.state ?? 0))}${t.status?.state === TaskState.TASK_STATE_PREPARING && t.status.message && t.status.message !== 'preparing' ? ` (${t.status.message})` : ''} ${timeAgo(t.status?.timestamp ?? 0)}`,
      Health: healthName(t.status?.health),
      Error: trunc && err.length > 80 ? `"${err.slice(0, 77)}…"` : err ? `"${err}"` : '',
    };
  });
  if (typeof format === 'object') return void process.stdout.write(rows.map((r) => renderTemplate(format.template, r) + '\n').join(''));
  process.stdout.write(
    table(
      ['ID', 'NAME', 'IMAGE', 'NODE', 'DESIRED STATE', 'CURRENT STATE', 'HEALTH', 'ERROR'],
      rows.map((r) => [r.ID, r.Name, r.Image, r.Node, r.DesiredState, r.CurrentState, r.Health, r.Error]),
    ),
  );
}

export async function nodeMap(c: import('../client.js').Control): Promise<Map<string, Node>> {
  const { nodes } = await c.call<unknown, ListNodesResponse>('listNodes', {});
  return new Map(nodes.map((n) => [n.id, n] as const));
}

function timeoutMs(v: string | undefined): number {
  return v === undefined ? 120_000 : parseDuration('--timeout', v);
}

export function register(program: Command): void {
  const service = program.command('service').description('Manage services');

  addContainerCreateFlags(addSpecFlags(
    shortHostOption(
      service
        .command('create')
        .description('Create a new service')
        .argument('<image>', 'image name[:tag] or digest')
        .argument('[command...]', 'command and arguments')
        .option('--name <name>', 'service name')
        .option('--replicas <n>', 'number of tasks')
        .option('--mode <mode>', 'replicated, global, replicated-job or global-job', 'replicated')
        .option('--placement-pref <pref>', 'placement preference: spread=node.labels.KEY (repeatable, in order)', collect)
        .option('-e, --env <K=V>', 'set an environment variable (repeatable)', collect)
        .option('-l, --label <K=V>', 'service label (repeatable)', collect)
        .option('--secret <spec>', 'give the tasks a secret: [source=]NAME[,target=NAME|PATH][,uid=N][,gid=N][,mode=0444] (under /run/secrets; repeatable)', collect)
        .option('--config <spec>', 'give the tasks a config: [source=]NAME[,target=PATH][,uid=N][,gid=N][,mode=0444] (default /NAME; repeatable)', collect)
        .option('-d, --detach', 'exit immediately instead of waiting for the service to converge')
        .option('-q, --quiet', 'suppress progress output')
        .option('--timeout <duration>', 'how long to wait for convergence (default 2m)')
        .passThroughOptions(),
    ),
  )).action(
    action(async (image: string, args: string[], opts: ServiceFlags & ImageFlags & { H?: string; detach?: boolean; quiet?: boolean; timeout?: string }) => {
      const spec = buildServiceSpec(opts, image, args);
      if (opts.withRegistryAuth && spec.task?.container) spec.task.container.registryAuth = await registryAuthFor(spec.task.container.image);
      const wait = timeoutMs(opts.timeout);
      await withControl(opts.H, async (c) => {
        const { service: s } = await c.call<unknown, CreateServiceResponse>('createService', { spec, noResolveImage: opts.resolveImage === false });
        process.stdout.write(`${s!.id}\n`);
        if (!opts.detach) await waitForService(c, s!.id, wait, opts.quiet);
      });
    }),
  );

  hostOption(
    service
      .command('ls')
      .description('List services')
      .option('--format <format>', 'table, json, or a template such as {{.Name}}')
      .option('-q, --quiet', 'only ids')
      .option('-f, --filter <filter>', 'name=PREFIX, id=PREFIX, label=KEY[=VALUE], mode=replicated|global|replicated-job|global-job (repeatable)', collect),
  ).action(
    action(async (opts: { host?: string; format?: string; quiet?: boolean; filter?: string[] }) => {
      const format = checkFormatOrTemplate(opts.format);
      const keep = serviceFilter(opts.filter ?? []);
      await withControl(opts.host, async (c) => {
        let { services } = await c.call<unknown, ListServicesResponse>('listServices', {});
        services = services.filter(keep);
        const { tasks } = await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: '', nodeId: '', desiredRunning: false });
        const byService = new Map<string, Task[]>();
        for (const t of tasks) {
          let l = byService.get(t.serviceId);
          if (!l) byService.set(t.serviceId, (l = []));
          l.push(t);
        }
        const rows = services.map((s) => {
          const ts = byService.get(s.id) ?? [];
          const live = ts.filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING);
          // a task with a health check counts as running once healthy
          const running = live.filter(isUp).length;
          let replicas: string;
          if (isJobService(s)) {
            // like Docker: running/wanted now (completed/total completed)
            const p = jobProgress(s, ts);
            const wantNow = s.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB ? live.filter((t) => t.desiredState === TaskState.TASK_STATE_RUNNING).length : Math.min(s.spec?.maxConcurrent || p.total, Math.max(0, p.total - p.completed - p.failed));
            replicas = `${p.running}/${Math.max(wantNow, p.running)} (${p.completed}/${p.total} completed${p.failed ? `, ${p.failed} failed` : ''})`;
          } else {
            const global = s.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL;
            const want = global ? live.filter((t) => t.desiredState === TaskState.TASK_STATE_RUNNING).length : (s.spec?.replicas ?? 0);
            replicas = `${running}/${want}`;
          }
          return { s, running, replicas };
        });
        rows.sort((a, b) => (a.s.spec?.name ?? '').localeCompare(b.s.spec?.name ?? ''));
        if (opts.quiet) return void process.stdout.write(rows.map((r) => r.s.id + '\n').join(''));
        if (format === 'json') return printJson(rows.map((r) => ({ ...serviceJson(r.s, r.running), replicasText: r.replicas })));
        const cells = rows.map((r) => ({
          ID: shortId(r.s.id),
          Name: r.s.spec?.name ?? '',
          Mode: serviceModeName(r.s.spec?.mode).replace('-', ' '),
          Replicas: r.replicas,
          Image: imageCell(r.s.spec?.task?.container?.image ?? ''),
          Ports: formatPorts(r.s.endpoint?.ports ?? []),
          UpdateStatus: r.s.updateStatus ? updateStateName(r.s.updateStatus.state) : '',
        }));
        if (typeof format === 'object') return void process.stdout.write(cells.map((c) => renderTemplate(format.template, c) + '\n').join(''));
        process.stdout.write(table(['ID', 'NAME', 'MODE', 'REPLICAS', 'IMAGE', 'PORTS', 'UPDATE STATUS'], cells.map((c) => [c.ID, c.Name, c.Mode, c.Replicas, c.Image, c.Ports, c.UpdateStatus])));
      });
    }),
  );

  hostOption(
    service
      .command('ps')
      .description("List the tasks of one or more services (completed job tasks included)")
      .argument('<service...>', 'service names or ids')
      .option('--format <format>', 'table, json, or a template such as {{.Name}} {{.CurrentState}}')
      .option('-q, --quiet', 'only task ids')
      .option('--no-trunc', 'do not truncate output')
      .option('-f, --filter <filter>', 'desired-state=running|shutdown|accepted|complete, node=NODE, name=TASK, id=PREFIX (repeatable)', collect),
  ).action(
    action(async (refs: string[], opts: TaskListOpts) => {
      await withControl(opts.host, async (c) => {
        const nodes = await nodeMap(c);
        const keep = taskFilter(opts.filter ?? [], nodes);
        const tasks: Task[] = [];
        for (const ref of refs) tasks.push(...(await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: ref, nodeId: '', desiredRunning: false })).tasks);
        printTasks(tasks.filter(keep), nodes, opts);
      });
    }),
  );

  hostOption(
    service
      .command('inspect')
      .description('Display detailed information on services')
      .argument('<service...>')
      .option('-f, --format <format>', 'json (default), or a template such as {{.Spec.Name}} or {{json .Spec.Task}}')
      .option('--pretty', 'print the information in a human friendly format'),
  ).action(
    action(async (refs: string[], opts: { host?: string; format?: string; pretty?: boolean }) => {
      if (opts.pretty && opts.format !== undefined) throw new ExitError(2, '--format and --pretty cannot be used together');
      const format = opts.format === undefined ? 'json' : checkFormatOrTemplate(opts.format);
      if (format === 'table') throw new ExitError(2, 'invalid --format "table" for inspect: use json or a template');
      await withControl(opts.host, async (c) => {
        const out = [];
        for (const r of refs) {
          const { service: s } = await c.call<unknown, GetServiceResponse>('getService', { serviceId: r });
          const { tasks } = await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: s!.id, nodeId: '', desiredRunning: false });
          out.push({ s: s!, json: serviceJson(s!, tasks.filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING && isUp(t)).length) });
        }
        if (opts.pretty) return void process.stdout.write(out.map((o) => prettyService(o.s)).join('\n'));
        if (typeof format === 'object') return void process.stdout.write(out.map((o) => renderTemplate(format.template, o.json) + '\n').join(''));
        printJson(out.map((o) => o.json));
      });
    }),
  );

  hostOption(
    service
      .command('scale')
      .description('Scale one or multiple replicated services')
      .argument('<service=replicas...>')
      .option('-d, --detach', 'exit immediately instead of waiting for the services to converge')
      .option('--timeout <duration>', 'how long to wait for convergence (default 2m)'),
  ).action(
    action(async (pairs: string[], opts: { host?: string; detach?: boolean; timeout?: string }) => {
      const wanted = pairs.map((p) => {
        const i = p.lastIndexOf('=');
        if (i <= 0) throw invalidArgument('scale', p, 'expected SERVICE=REPLICAS');
        return { ref: p.slice(0, i), replicas: parseUint(`replicas of ${p.slice(0, i)}`, p.slice(i + 1)) };
      });
      const wait = timeoutMs(opts.timeout);
      await withControl(opts.host, async (c) => {
        const ids: string[] = [];
        for (const w of wanted) {
          const { service: s } = await c.call<unknown, GetServiceResponse>('getService', { serviceId: w.ref });
          if (s!.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL || s!.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB)
            throw new ExitError(1, `scale can only be used with replicated or replicated-job mode: ${w.ref} is ${serviceModeName(s!.spec?.mode)}`);
          const spec = { ...s!.spec!, replicas: w.replicas };
          await c.call<unknown, UpdateServiceResponse>('updateService', { serviceId: s!.id, version: s!.specVersion, spec, rollback: '', toVersion: 0, dryRun: false });
          process.stdout.write(`${s!.spec?.name} scaled to ${w.replicas}\n`);
          ids.push(s!.id);
        }
        if (!opts.detach) for (const id of ids) await waitForService(c, id, wait);
      });
    }),
  );

  hostOption(service.command('rm').alias('remove').description('Remove one or more services').argument('<service...>')).action(
    action(async (refs: string[], opts: { host?: string }) => {
      await withControl(opts.host, async (c) => {
        let failed = 0;
        for (const r of refs) {
          try {
            await c.call('removeService', { serviceId: r });
            process.stdout.write(`${r}\n`);
          } catch (err) {
            failed++;
            process.stderr.write(`flotilla: ${(err as Error).message}\n`);
          }
        }
        if (failed) throw new ExitError(1);
      });
    }),
  );

  hostOption(
    service
      .command('logs')
      .description('Fetch the logs of a service or a task')
      .argument('<service|task>', 'service name or id, or task id')
      .option('-f, --follow', 'follow log output')
      .option('-n, --tail <n>', 'number of lines to show from the end of the logs (per task)')
      .option('--since <time>', 'show logs since a time (a duration such as 10m, RFC 3339, or Unix seconds)')
      .option('-t, --timestamps', 'show timestamps')
      .option('--raw', 'do not neatly format logs (no task prefix)')
      .option('--no-task-ids', 'do not include task IDs in output'),
  ).action(
    action(async (ref: string, opts: { host?: string; follow?: boolean; tail?: string; since?: string; timestamps?: boolean; raw?: boolean; taskIds?: boolean }) => {
      const tail = opts.tail !== undefined && opts.tail !== 'all' ? parseUint('--tail', opts.tail) : 0;
      const sinceMs = opts.since !== undefined ? parseTime('--since', opts.since) : 0;
      const stream = (host: string | undefined): Promise<void> =>
        withControl(host, async (c) => {
          // a service by name, id or prefix; else a task by id or prefix
          let serviceId = '';
          let taskId = '';
          let name = '';
          try {
            const { service: s } = await c.call<unknown, GetServiceResponse>('getService', { serviceId: ref });
            serviceId = s!.id;
            name = s!.spec?.name ?? '';
          } catch (err) {
            if (!/not found/.test((err as Error).message)) throw err;
            const { tasks } = await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: '', nodeId: '', desiredRunning: false });
            const hits = tasks.filter((t) => t.id === ref || (ref.length >= 4 && t.id.startsWith(ref)));
            if (hits.length !== 1) throw new ExitError(1, hits.length ? `task ${JSON.stringify(ref)} is ambiguous` : `no such service or task: ${ref}`);
            taskId = hits[0]!.id;
            name = hits[0]!.serviceName;
          }
          const nodes = await nodeMap(c);
          await new Promise<void>((resolve, reject) => {
            const call = c.raw.serviceLogs({ serviceId, follow: !!opts.follow, tail, taskId, sinceMs });
            call.on('data', (l: LogLine) => {
              const ts = opts.timestamps ? `${new Date(l.timestamp).toISOString()} ` : '';
              let prefix = '';
              if (!opts.raw) {
                const host = nodes.get(l.nodeId)?.description?.hostname ?? shortId(l.nodeId);
                prefix = `${name}.${l.slot || shortId(l.nodeId)}${opts.taskIds === false ? '' : `.${shortId(l.taskId)}`}@${host}    | `;
              }
              (l.stream === 'stderr' ? process.stderr : process.stdout).write(`${prefix}${ts}${l.line}\n`);
            });
            call.on('end', () => resolve());
            call.on('error', (err: Error & { details?: string }) => reject(new Error(err.details || err.message)));
            process.once('SIGINT', () => {
              call.cancel();
              resolve();
            });
          });
        });
      try {
        await stream(opts.host);
      } catch (err) {
        // logs come from the leader's dispatcher: a follower names the leader, so ask it there once
        const leader = /retry with --host (\S+:\d+)/.exec((err as Error).message)?.[1];
        if (!leader) throw err;
        await stream(leader);
      }
    }),
  );
  addContainerUpdateFlags(addSpecFlags(
    shortHostOption(
      service
        .command('update')
        .description('Update a service (a rolling update when the task spec changes)')
        .argument('<service>')
        .option('--image <image>', 'service image')
        .option('--args <command>', 'service command arguments')
        .option('--replicas <n>', 'number of tasks')
        .option('--env-add <K=V>', 'add or update an environment variable (repeatable)', collect)
        .option('--env-rm <K>', 'remove an environment variable (repeatable)', collect)
        .option('--constraint-add <expr>', 'add a placement constraint (repeatable)', collect)
        .option('--constraint-rm <expr>', 'remove a placement constraint (repeatable)', collect)
        .option('--placement-pref-add <pref>', 'add a placement preference: spread=node.labels.KEY (repeatable)', collect)
        .option('--placement-pref-rm <pref>', 'remove a placement preference (repeatable)', collect)
        .option('--label-add <K=V>', 'add or update a service label (repeatable)', collect)
        .option('--label-rm <K>', 'remove a service label (repeatable)', collect)
        .option('--container-label-add <K=V>', 'add or update a container label (repeatable)', collect)
        .option('--container-label-rm <K>', 'remove a container label (repeatable)', collect)
        .option('--publish-add <spec>', 'publish a port (as --publish; repeatable)', collect)
        .option('--publish-rm <port>', 'stop publishing a port: PUBLISHED[/PROTOCOL] (repeatable; applied before --publish-add)', collect)
        .option('--network-add <net>', 'attach the service to a network (repeatable)', collect)
        .option('--network-rm <net>', 'detach the service from a network (repeatable)', collect)
        .option('--secret-add <spec>', 'add a secret: [source=]NAME[,target=...][,uid=N][,gid=N][,mode=0444] (repeatable)', collect)
        .option('--secret-rm <name>', 'remove a secret (repeatable; applied before --secret-add)', collect)
        .option('--config-add <spec>', 'add a config: [source=]NAME[,target=PATH][,uid=N][,gid=N][,mode=0444] (repeatable)', collect)
        .option('--config-rm <name>', 'remove a config (repeatable; applied before --config-add)', collect)
        .option('--force', 'replace tasks even if no changes require it')
        .option('--rollback', 'roll back to the previous specification')
        .option('--dry-run', 'show what would change and which tasks would be replaced; change nothing')
        .option('-d, --detach', 'exit immediately instead of waiting for the update to finish')
        .option('-q, --quiet', 'suppress progress output')
        .option('--timeout <duration>', 'how long to wait (default 10m)'),
    ),
  )).action(
    action(async (ref: string, opts: UpdateFlags & ImageFlags & { H?: string; rollback?: boolean; dryRun?: boolean; detach?: boolean; quiet?: boolean; timeout?: string }) => {
      const wait = opts.timeout === undefined ? 600_000 : parseDuration('--timeout', opts.timeout);
      await withControl(opts.H, async (c) => {
        const { service: s } = await c.call<unknown, GetServiceResponse>('getService', { serviceId: ref });
        const known = opts.networkRm?.length || opts.networkAdd?.length ? (await c.call<unknown, ListNetworksResponse>('listNetworks', {})).networks : [];
        const spec = opts.rollback ? undefined : applyUpdate(s!.spec!, opts, known, s!.endpoint?.ports ?? []);
        if (spec?.task?.container && opts.withRegistryAuth) spec.task.container.registryAuth = await registryAuthFor(spec.task.container.image);
        const res = await c.call<unknown, UpdateServiceResponse>('updateService', {
          serviceId: s!.id,
          version: s!.specVersion,
          spec,
          rollback: opts.rollback ? 'previous' : '',
          toVersion: 0,
          dryRun: !!opts.dryRun,
          noResolveImage: opts.resolveImage === false,
        });
        if (opts.dryRun) return printDryRun(res);
        process.stdout.write(`${s!.spec?.name}\n`);
        // only a change of the task spec, a rollback, or resuming a paused update starts a rolling
        // update (a new update status); a scale just converges
        const rolling = !!opts.rollback || res.service?.updateStatus?.startedAt !== s!.updateStatus?.startedAt;
        // a job is not rolled: the update runs it again, and the wait is for the new run to finish
        if (!opts.detach && isJobService(res.service)) await waitForService(c, s!.id, wait, opts.quiet);
        else if (!opts.detach) await waitForUpdate(c, s!.id, wait, !!opts.rollback, opts.quiet, rolling);
      });
    }),
  );

  hostOption(
    service
      .command('rollback')
      .description("Revert a service to a previous version of its spec")
      .argument('<service>')
      .option('--to-version <n>', 'roll back to this kept version (see service history)')
      .option('--dry-run', 'show what would change; change nothing')
      .option('-d, --detach', 'exit immediately instead of waiting for the rollback to finish')
      .option('-q, --quiet', 'suppress progress output')
      .option('--timeout <duration>', 'how long to wait (default 10m)'),
  ).action(
    action(async (ref: string, opts: { host?: string; toVersion?: string; dryRun?: boolean; detach?: boolean; quiet?: boolean; timeout?: string }) => {
      const wait = opts.timeout === undefined ? 600_000 : parseDuration('--timeout', opts.timeout);
      const toVersion = opts.toVersion !== undefined ? parseUint('--to-version', opts.toVersion) : 0;
      await withControl(opts.host, async (c) => {
        const { service: s } = await c.call<unknown, GetServiceResponse>('getService', { serviceId: ref });
        const res = await c.call<unknown, UpdateServiceResponse>('updateService', {
          serviceId: s!.id,
          version: s!.specVersion,
          spec: undefined,
          rollback: opts.toVersion !== undefined ? 'version' : 'previous',
          toVersion,
          dryRun: !!opts.dryRun,
        });
        if (opts.dryRun) return printDryRun(res);
        process.stdout.write(`${s!.spec?.name}\n`);
        if (!opts.detach) await waitForUpdate(c, s!.id, wait, true, opts.quiet);
      });
    }),
  );

  hostOption(service.command('history').description('List the kept versions of a service and what changed between them').argument('<service>').option('--format <format>', 'table or json')).action(
    action(async (ref: string, opts: { host?: string; format?: string }) => {
      const format = checkFormat(opts.format);
      await withControl(opts.host, async (c) => {
        const { service: s } = await c.call<unknown, GetServiceResponse>('getService', { serviceId: ref });
        const rows = s!.history.map((h, i) => ({
          version: h.version,
          current: h.version === s!.specVersion,
          createdAt: new Date(h.createdAt).toISOString(),
          image: h.spec?.task?.container?.image ?? '',
          changes: i === 0 ? ['(first kept version)'] : diffSpecs(s!.history[i - 1]!.spec, h.spec),
        }));
        if (format === 'json') return printJson(rows);
        process.stdout.write(
          table(
            ['VERSION', 'CREATED', 'IMAGE', 'CHANGES'],
            rows.map((r) => [`${r.version}${r.current ? ' (current)' : ''}`, timeAgo(Date.parse(r.createdAt)), r.image, r.changes.join('; ') || '(no change)']),
          ),
        );
      });
    }),
  );
}

function printDryRun(res: UpdateServiceResponse): void {
  process.stdout.write(`Dry run: nothing was changed.\n\nSpec changes:\n`);
  process.stdout.write(res.diff.length ? res.diff.map((d) => `  ${d}\n`).join('') : '  (none)\n');
  process.stdout.write(`\nTasks that would be replaced (${res.replacedTasks.length}):\n`);
  process.stdout.write(res.replacedTasks.map((t) => `  ${t}\n`).join(''));
}

/** `service inspect --pretty`, laid out as Docker's. */
export function prettyService(s: Service): string {
  const spec = s.spec!;
  const t = spec.task;
  const c = t?.container;
  const lines: string[] = [];
  const kv = (k: string, v: string | number, indent = 0): void => void lines.push(`${' '.repeat(indent)}${`${k}:`.padEnd(20 - indent)}${v}`);
  kv('ID', s.id);
  kv('Name', spec.name);
  if (Object.keys(spec.labels).length) {
    lines.push('Labels:');
    for (const [k, v] of Object.entries(spec.labels)) lines.push(` ${k}=${v}`);
  }
  const mode = serviceModeName(spec.mode);
  kv('Service Mode', mode.replace(/(^|-)(\w)/g, (_m, d: string, ch: string) => (d ? ' ' : '') + ch.toUpperCase()));
  if (spec.mode === ServiceMode.SERVICE_MODE_REPLICATED) kv('Replicas', spec.replicas, 1);
  if (spec.mode === ServiceMode.SERVICE_MODE_REPLICATED_JOB) {
    kv('Max Concurrent', spec.maxConcurrent || spec.replicas, 1);
    kv('Total Completions', spec.replicas, 1);
  }
  if (s.jobStatus) kv('Job Iteration', s.jobStatus.jobIteration, 1);
  if (s.updateStatus) {
    lines.push('UpdateStatus:');
    kv('State', updateStateName(s.updateStatus.state), 1);
    if (s.updateStatus.startedAt) kv('Started', new Date(s.updateStatus.startedAt).toISOString(), 1);
    if (s.updateStatus.message) kv('Message', s.updateStatus.message, 1);
  }
  const pl = t?.placement;
  if (pl && (pl.constraints.length || pl.preferences.length || pl.maxReplicasPerNode)) {
    lines.push('Placement:');
    if (pl.constraints.length) kv('Constraints', `[${pl.constraints.join(' ')}]`, 1);
    if (pl.preferences.length) kv('Preferences', `[${pl.preferences.map((p) => `spread=${p.spread}`).join(' ')}]`, 1);
    if (pl.maxReplicasPerNode) kv('Max Replicas Per Node', pl.maxReplicasPerNode, 1);
  }
  const up = spec.update;
  if (up) {
    lines.push('UpdateConfig:');
    kv('Parallelism', up.parallelism, 1);
    if (up.delayMs) kv('Delay', `${up.delayMs}ms`, 1);
    kv('On failure', ['pause', 'continue', 'rollback'][up.failureAction] ?? '', 1);
    kv('Monitoring Period', `${up.monitorMs}ms`, 1);
    kv('Max failure ratio', up.maxFailureRatio, 1);
    kv('Update order', up.order ? 'start-first' : 'stop-first', 1);
  }
  lines.push('ContainerSpec:');
  kv('Image', c?.image ?? '', 1);
  if (c?.command.length) kv('Command', c.command.join(' '), 1);
  if (c?.args.length) kv('Args', c.args.join(' '), 1);
  if (c?.env.length) kv('Env', c.env.join(' '), 1);
  if (c?.user) kv('User', c.user, 1);
  if (c?.workdir) kv('Dir', c.workdir, 1);
  const r = t?.resources;
  if (r && (r.limits?.nanoCpus || r.limits?.memoryBytes || r.reservations?.nanoCpus || r.reservations?.memoryBytes)) {
    lines.push('Resources:');
    if (r.reservations?.nanoCpus || r.reservations?.memoryBytes) {
      lines.push(' Reservations:');
      if (r.reservations.nanoCpus) kv('CPU', r.reservations.nanoCpus / 1e9, 2);
      if (r.reservations.memoryBytes) kv('Memory', r.reservations.memoryBytes, 2);
    }
    if (r.limits?.nanoCpus || r.limits?.memoryBytes) {
      lines.push(' Limits:');
      if (r.limits.nanoCpus) kv('CPU', r.limits.nanoCpus / 1e9, 2);
      if (r.limits.memoryBytes) kv('Memory', r.limits.memoryBytes, 2);
    }
  }
  if (t?.networks.length) kv('Networks', t.networks.map((n) => n.target).join(' '));
  kv('Endpoint Mode', spec.endpoint?.mode === 1 ? 'dnsrr' : 'vip');
  for (const p of s.endpoint?.ports ?? []) lines.push(` PublishedPort = ${p.publishedPort}, TargetPort = ${p.targetPort}, Protocol = ${p.protocol ? 'udp' : 'tcp'}`);
  return lines.join('\n') + '\n';
}

function cap(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}
