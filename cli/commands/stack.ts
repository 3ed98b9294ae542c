/**
 * `flotilla stack deploy|ls|ps|services|rm`: Docker's stacks, done in the CLI as Docker does. A stack
 * is the set of objects labelled com.docker.stack.namespace=STACK, each named STACK_KEY. The file is
 * read, interpolated, merged and checked completely before anything is created (cli/stack/), then
 * networks, secrets, configs and services are created in this order; a service that exists is updated
 * only when its spec changed (the manager's own diff, through a dry-run update). docs/stacks.md.
 */
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Command } from 'commander';
import { CreateServiceRequest } from '../../gen/flotilla/v1/control.js';
import type {
  CreateServiceResponse,
  GetConfigResponse,
  ListConfigsResponse,
  ListNetworksResponse,
  ListSecretsResponse,
  ListServicesResponse,
  ListTasksResponse,
  UpdateServiceResponse,
} from '../../gen/flotilla/v1/control.js';
import { ServiceMode, TaskState, type Service } from '../../gen/flotilla/v1/objects.js';
import { shortId } from '../../common/ids.js';
import { parseDuration } from '../../common/units.js';
import { isUp } from '../../manager/orchestrator/update.js';
import { formatPorts } from '../../manager/allocator/ports.js';
import { withControl, type Control } from '../client.js';
import { imageCell, serviceJson } from '../format.js';
import { ComposeError, loadCompose } from '../stack/compose.js';
import { STACK_LABEL, STACK_NAME_RE, translateStack, type StackPlan } from '../stack/translate.js';
import { action, checkFormat, collect, ExitError, printJson, table } from '../util.js';
import { hostOption, nodeMap, printTasks, type TaskListOpts } from './service.js';

const inStack = (stack: string) => (o: { spec?: { labels: Record<string, string> } }) => o.spec?.labels[STACK_LABEL] === stack;

function checkStackName(name: string): void {
  if (!STACK_NAME_RE.test(name)) throw new ExitError(1, `invalid stack name ${JSON.stringify(name)}: use letters, digits, "_", "." or "-", starting with a letter or digit`);
}

/** Reads and checks the files: the plan, or one line naming the key and the problem. */
export function planStack(stack: string, files: string[], env: Record<string, string | undefined>): { plan: StackPlan; unset: string[] } {
  const { doc, unset } = loadCompose(files, env);
  const plan = translateStack(stack, doc, { baseDir: path.dirname(path.resolve(files[0]!)), env });
  return { plan, unset };
}

async function stackServices(c: Control, stack: string): Promise<Service[]> {
  const { services } = await c.call<unknown, ListServicesResponse>('listServices', {});
  return services.filter(inStack(stack)).sort((a, b) => (a.spec?.name ?? '').localeCompare(b.spec?.name ?? ''));
}

interface DeployFlags {
  host?: string;
  composeFile: string[];
  prune?: boolean;
  resolveImage?: string;
}

async function deploy(stack: string, opts: DeployFlags): Promise<void> {
  checkStackName(stack);
  if (!opts.composeFile?.length) throw new ExitError(1, 'please specify a Compose file (--compose-file)');
  if (opts.resolveImage !== undefined && !['always', 'changed', 'never'].includes(opts.resolveImage))
    throw new ExitError(1, `invalid --resolve-image ${JSON.stringify(opts.resolveImage)}: must be always, changed or never`);
  let planned: ReturnType<typeof planStack>;
  try {
    planned = planStack(stack, opts.composeFile, process.env);
  } catch (err) {
    if (err instanceof ComposeError) throw new ExitError(1, err.message);
    throw err;
  }
  const { plan, unset } = planned;
  const warn = (w: string): boolean => process.stderr.write(`warning: ${w}\n`);
  for (const v of unset) warn(`the ${JSON.stringify(v)} variable is not set, defaulting to a blank string`);
  for (const w of plan.warnings) warn(w);
  // image pinning (tag -> digest on the manager): never keeps the references as written; always and
  // changed resolve them (an unchanged tag keeps its pin on update, so both behave as Docker's changed)
  const noResolveImage = opts.resolveImage === 'never';
  const canPin = 'noResolveImage' in CreateServiceRequest.fromPartial({});
  if (!canPin && opts.resolveImage !== undefined && opts.resolveImage !== 'never')
    warn(`--resolve-image ${opts.resolveImage}: not supported by this build (no image pinning), images are used as the file names them`);

  await withControl(opts.host, async (c) => {
    // ---- checks against the cluster, before anything is created
    const [{ networks }, { secrets }, { configs }, { services }] = await Promise.all([
      c.call<unknown, ListNetworksResponse>('listNetworks', {}),
      c.call<unknown, ListSecretsResponse>('listSecrets', {}),
      c.call<unknown, ListConfigsResponse>('listConfigs', {}),
      c.call<unknown, ListServicesResponse>('listServices', {}),
    ]);
    const netNames = new Set(networks.map((n) => n.spec?.name));
    const secretNames = new Set(secrets.map((s) => s.spec?.name));
    const configByName = new Map(configs.map((x) => [x.spec?.name ?? '', x] as const));
    for (const n of plan.networks)
      if (n.external && !netNames.has(n.name)) throw new ExitError(1, `networks.${n.key}: network ${JSON.stringify(n.name)} is declared as external, but could not be found (create it with flotilla network create)`);
    for (const s of plan.secrets)
      if (s.external && !secretNames.has(s.name)) throw new ExitError(1, `secrets.${s.key}: secret ${JSON.stringify(s.name)} is declared as external, but could not be found`);
    for (const x of plan.configs) {
      const have = configByName.get(x.name);
      if (x.external && !have) throw new ExitError(1, `configs.${x.key}: config ${JSON.stringify(x.name)} is declared as external, but could not be found`);
      if (!x.external && have) {
        const { config } = await c.call<unknown, GetConfigResponse>('getConfig', { configId: have.id });
        if (!Buffer.from(config?.spec?.data ?? new Uint8Array()).equals(x.data!))
          throw new ExitError(1, `configs.${x.key}: config ${JSON.stringify(x.name)} exists with other content, and a config cannot change: give the new content a new name (name: ...)`);
      }
    }
    const existing = new Map(services.map((s) => [s.spec?.name ?? '', s] as const));
    for (const s of plan.services) {
      const cur = existing.get(s.spec.name);
      if (cur && cur.spec?.mode !== s.spec.mode) {
        const mode = (m: ServiceMode | undefined) => MODE_NAMES[m ?? 0] ?? String(m);
        throw new ExitError(1, `services.${s.key}.deploy.mode: service ${s.spec.name} is ${mode(cur.spec?.mode)}, the file asks for ${mode(s.spec.mode)}; a service's mode cannot change (remove the service first)`);
      }
    }

    // ---- creation: networks, secrets, configs, then services
    const created: string[] = [];
    const step = async (what: string, fn: () => Promise<void>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        const msg = (err as Error).message;
        const done = created.length ? `; done before the failure: ${created.join(', ')}` : '; nothing was created or changed';
        throw new ExitError(1, `stack deploy stopped at ${what}: ${msg}${done} (fix the file and deploy again, or remove the stack with flotilla stack rm ${stack})`);
      }
    };
    for (const n of plan.networks) {
      if (n.external || netNames.has(n.name)) continue;
      await step(`network ${n.name}`, async () => {
        process.stdout.write(`Creating network ${n.name}\n`);
        await c.call('createNetwork', { spec: n.spec });
        created.push(`network ${n.name} created`);
      });
    }
    for (const [kind, list, have] of [
      ['secret', plan.secrets, secretNames],
      ['config', plan.configs, new Set(configByName.keys())],
    ] as const) {
      for (const o of list) {
        if (o.external) continue;
        if (have.has(o.name)) {
          // a secret's data is never read back: an existing one is kept as it is (docs/stacks.md)
          if (kind === 'secret') warn(`secrets.${o.key}: secret ${o.name} exists and is kept as it is (a secret cannot change: give new content a new name)`);
          continue;
        }
        await step(`${kind} ${o.name}`, async () => {
          process.stdout.write(`Creating ${kind} ${o.name}\n`);
          await c.call(kind === 'secret' ? 'createSecret' : 'createConfig', { spec: { name: o.name, labels: o.labels, data: o.data } });
          created.push(`${kind} ${o.name} created`);
        });
      }
    }
    for (const s of plan.services) {
      const cur = existing.get(s.spec.name);
      await step(`service ${s.spec.name}`, async () => {
        if (!cur) {
          process.stdout.write(`Creating service ${s.spec.name}\n`);
          await c.call<unknown, CreateServiceResponse>('createService', { spec: s.spec, noResolveImage });
          created.push(`service ${s.spec.name} created`);
          return;
        }
        // as Docker: a stack file has no --force, so the service's force counter is kept (else a
        // service once updated with --force would be replaced by every redeploy)
        const spec = { ...s.spec, task: { ...s.spec.task!, forceUpdate: cur.spec?.task?.forceUpdate ?? 0 } };
        const req = { serviceId: cur.id, version: cur.specVersion, spec, rollback: '', toVersion: 0, noResolveImage };
        const dry = await c.call<unknown, UpdateServiceResponse>('updateService', { ...req, dryRun: true });
        if (dry.diff.length === 0) {
          process.stdout.write(`Service ${s.spec.name} unchanged\n`);
          return;
        }
        const fields = [...new Set(dry.diff.map((d) => /^[~+-] ([^:]+):/.exec(d)?.[1] ?? d))];
        process.stdout.write(`Updating service ${s.spec.name} (id: ${shortId(cur.id)}): ${fields.join(', ')}\n`);
        await c.call<unknown, UpdateServiceResponse>('updateService', { ...req, dryRun: false });
        created.push(`service ${s.spec.name} updated`);
      });
    }
    if (opts.prune) {
      const wanted = new Set(plan.services.map((s) => s.spec.name));
      for (const s of services.filter(inStack(stack))) {
        if (wanted.has(s.spec?.name ?? '')) continue;
        await step(`removing service ${s.spec?.name}`, async () => {
          process.stdout.write(`Removing service ${s.spec?.name}\n`);
          await c.call('removeService', { serviceId: s.id });
          created.push(`service ${s.spec?.name} removed`);
        });
      }
    }
  });
}

/** As Docker's MODE column. */
const MODE_NAMES: Record<number, string> = {
  [ServiceMode.SERVICE_MODE_REPLICATED]: 'replicated',
  [ServiceMode.SERVICE_MODE_GLOBAL]: 'global',
  [ServiceMode.SERVICE_MODE_REPLICATED_JOB]: 'replicated job',
  [ServiceMode.SERVICE_MODE_GLOBAL_JOB]: 'global job',
};

function portsCell(s: Service): string {
  return formatPorts(s.endpoint?.ports ?? []);
}

export function register(program: Command): void {
  const stack = program.command('stack').description('Manage stacks (groups of services from a Compose file)');

  hostOption(
    stack
      .command('deploy')
      .alias('up')
      .description('Deploy a new stack or update an existing stack')
      .argument('<stack>', 'stack name')
      .option('-c, --compose-file <file>', 'path to a Compose file (repeatable: later files override earlier ones)', collect)
      .option('--prune', 'remove the services of the stack that the files no longer name')
      .option('--resolve-image <when>', 'always, changed or never (image pinning is not supported yet)'),
  ).action(action(async (name: string, opts: DeployFlags) => deploy(name, opts)));

  hostOption(stack.command('ls').alias('list').description('List stacks').option('--format <format>', 'table or json')).action(
    action(async (opts: { host?: string; format?: string }) => {
      const format = checkFormat(opts.format);
      await withControl(opts.host, async (c) => {
        const { services } = await c.call<unknown, ListServicesResponse>('listServices', {});
        const count = new Map<string, number>();
        for (const s of services) {
          const ns = s.spec?.labels[STACK_LABEL];
          if (ns !== undefined) count.set(ns, (count.get(ns) ?? 0) + 1);
        }
        const rows = [...count.entries()].sort(([a], [b]) => a.localeCompare(b));
        if (format === 'json') return printJson(rows.map(([n, k]) => ({ name: n, services: k })));
        process.stdout.write(table(['NAME', 'SERVICES'], rows.map(([n, k]) => [n, String(k)])));
      });
    }),
  );

  hostOption(
    stack
      .command('services')
      .description('List the services in the stack')
      .argument('<stack>')
      .option('--format <format>', 'table or json')
      .option('-q, --quiet', 'only ids'),
  ).action(
    action(async (name: string, opts: { host?: string; format?: string; quiet?: boolean }) => {
      const format = checkFormat(opts.format);
      checkStackName(name);
      await withControl(opts.host, async (c) => {
        const services = await stackServices(c, name);
        if (services.length === 0) {
          if (format === 'json') printJson([]);
          return void process.stderr.write(`Nothing found in stack: ${name}\n`);
        }
        const { tasks } = await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: '', nodeId: '', desiredRunning: true });
        const running = new Map<string, number>();
        const desired = new Map<string, number>();
        for (const t of tasks) {
          if (isUp(t)) running.set(t.serviceId, (running.get(t.serviceId) ?? 0) + 1);
          if (t.desiredState === TaskState.TASK_STATE_RUNNING) desired.set(t.serviceId, (desired.get(t.serviceId) ?? 0) + 1);
        }
        if (opts.quiet) return void process.stdout.write(services.map((s) => `${s.id}\n`).join(''));
        if (format === 'json') return printJson(services.map((s) => serviceJson(s, running.get(s.id) ?? 0)));
        process.stdout.write(
          table(
            ['ID', 'NAME', 'MODE', 'REPLICAS', 'IMAGE', 'PORTS'],
            services.map((s) => {
              const global = s.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL || s.spec?.mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB;
              const want = global ? (desired.get(s.id) ?? 0) : (s.spec?.replicas ?? 0);
              return [shortId(s.id), s.spec?.name ?? '', MODE_NAMES[s.spec?.mode ?? 0] ?? '', `${running.get(s.id) ?? 0}/${want}`, imageCell(s.spec?.task?.container?.image ?? ''), portsCell(s)];
            }),
          ),
        );
      });
    }),
  );

  hostOption(
    stack
      .command('ps')
      .description('List the tasks in the stack')
      .argument('<stack>')
      .option('--format <format>', 'table, json or a template')
      .option('-q, --quiet', 'only task ids')
      .option('--no-trunc', 'do not truncate output'),
  ).action(
    action(async (name: string, opts: TaskListOpts) => {
      checkStackName(name);
      await withControl(opts.host, async (c) => {
        const services = await stackServices(c, name);
        if (services.length === 0) throw new ExitError(1, `nothing found in stack: ${name}`);
        const ids = new Set(services.map((s) => s.id));
        const { tasks: all } = await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: '', nodeId: '', desiredRunning: false });
        printTasks(all.filter((t) => ids.has(t.serviceId)), await nodeMap(c), opts);
      });
    }),
  );

  hostOption(
    stack
      .command('rm')
      .alias('remove')
      .alias('down')
      .description('Remove one or more stacks')
      .argument('<stack...>')
      .option('--timeout <duration>', "how long to wait for the services' tasks to leave the stack's networks (default 2m)"),
  ).action(
    action(async (names: string[], opts: { host?: string; timeout?: string }) => {
      for (const n of names) checkStackName(n);
      const timeout = opts.timeout === undefined ? 120_000 : parseDuration('--timeout', opts.timeout);
      await withControl(opts.host, async (c) => {
        let failed = 0;
        for (const name of names) {
          const [services, { networks }, { secrets }, { configs }] = await Promise.all([
            stackServices(c, name),
            c.call<unknown, ListNetworksResponse>('listNetworks', {}),
            c.call<unknown, ListSecretsResponse>('listSecrets', {}),
            c.call<unknown, ListConfigsResponse>('listConfigs', {}),
          ]);
          const mine = <T extends { spec?: { name: string; labels: Record<string, string> } }>(l: T[]): T[] =>
            l.filter(inStack(name)).sort((a, b) => (a.spec?.name ?? '').localeCompare(b.spec?.name ?? ''));
          // as Docker: services first (they hold the others), then secrets, configs, networks
          const steps: Array<[string, string, string, string]> = [
            ...services.map((s) => ['service', s.spec?.name ?? '', 'removeService', s.id] as [string, string, string, string]),
            ...mine(secrets).map((s) => ['secret', s.spec?.name ?? '', 'removeSecret', s.id] as [string, string, string, string]),
            ...mine(configs).map((s) => ['config', s.spec?.name ?? '', 'removeConfig', s.id] as [string, string, string, string]),
            ...mine(networks).map((s) => ['network', s.spec?.name ?? '', 'removeNetwork', s.id] as [string, string, string, string]),
          ];
          if (steps.length === 0) {
            process.stderr.write(`Nothing found in stack: ${name}\n`);
            continue;
          }
          // a network is refused while the tasks of the removed services still stop on it: retried
          // until they have stopped (their stop grace period), within a bound
          const deadline = Date.now() + timeout;
          for (const [kind, objName, rpc, id] of steps) {
            process.stdout.write(`Removing ${kind} ${objName}\n`);
            for (;;) {
              try {
                await c.call(rpc as 'removeService', { serviceId: id, secretId: id, configId: id, networkId: id });
              } catch (err) {
                const msg = (err as Error).message;
                if (kind === 'network' && /attached that are stopping/.test(msg) && Date.now() < deadline) {
                  await sleep(250);
                  continue;
                }
                failed++;
                process.stderr.write(`flotilla: failed to remove ${kind} ${objName}: ${msg}\n`);
              }
              break;
            }
          }
        }
        if (failed) throw new ExitError(1);
      });
    }),
  );
}
