import type { Command } from 'commander';
import { GetClusterResponse, GetNodeResponse, ListNodesResponse, ListTasksResponse, UpdateNodeResponse } from '../../gen/flotilla/v1/control.js';
import { NodeAvailability, NodeRole, Task } from '../../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../../common/errors.js';
import { shortId } from '../../common/ids.js';
import { parseKeyValue } from '../../common/units.js';
import { withControl } from '../client.js';
import { availabilityName, nodeJson, nodeStateName, renderTemplate } from '../format.js';
import { action, checkFormat, checkFormatOrTemplate, collect, printJson, table, ExitError } from '../util.js';
import { hostOption, nodeMap, printTasks, type TaskListOpts } from './service.js';
import { taskFilter } from '../filters.js';

function availability(v: string): NodeAvailability {
  switch (v) {
    case 'active':
      return NodeAvailability.NODE_AVAILABILITY_ACTIVE;
    case 'pause':
      return NodeAvailability.NODE_AVAILABILITY_PAUSE;
    case 'drain':
      return NodeAvailability.NODE_AVAILABILITY_DRAIN;
  }
  throw invalidArgument('--availability', v, 'must be active, pause or drain');
}

export function register(program: Command): void {
  const node = program.command('node').description('Manage nodes');

  hostOption(node.command('ls').description('List nodes').option('--format <format>', 'table or json').option('-q, --quiet', 'only ids')).action(
    action(async (opts: { host?: string; format?: string; quiet?: boolean }) => {
      const format = checkFormat(opts.format);
      await withControl(opts.host, async (c) => {
        const { nodes } = await c.call<unknown, ListNodesResponse>('listNodes', {});
        const { leaderAddr } = await c.call<unknown, GetClusterResponse>('getCluster', {});
        nodes.sort((a, b) => (a.description?.hostname ?? '').localeCompare(b.description?.hostname ?? '') || a.id.localeCompare(b.id));
        if (opts.quiet) return void process.stdout.write(nodes.map((n) => n.id + '\n').join(''));
        const json = nodes.map((n) => nodeJson(n, leaderAddr));
        if (format === 'json') return printJson(json);
        process.stdout.write(
          table(
            ['ID', 'HOSTNAME', 'STATUS', 'AVAILABILITY', 'MANAGER STATUS', 'RUNTIME'],
            nodes.map((n, i) => {
              const ms = json[i]!.managerStatus as { leader: boolean; reachability: string } | null;
              return [
                shortId(n.id),
                n.description?.hostname ?? '',
                cap(nodeStateName(n.status?.state)),
                cap(availabilityName(n.spec?.availability)),
                ms ? (ms.leader ? 'Leader' : cap(ms.reachability)) : '',
                n.description?.runtime === 'sim' ? 'sim (simulated)' : n.description?.runtime || 'none (no agent)',
              ];
            }),
          ),
        );
      });
    }),
  );

  hostOption(
    node
      .command('ps')
      .description('List the tasks running on one or more nodes (default: the node of the manager asked)')
      .argument('[node...]', 'node hostnames or ids, or "self"')
      .option('--format <format>', 'table, json, or a template such as {{.Name}} {{.Node}}')
      .option('-q, --quiet', 'only task ids')
      .option('--no-trunc', 'do not truncate output')
      .option('-f, --filter <filter>', 'desired-state=running|shutdown|accepted|complete, name=TASK, id=PREFIX, service=NAME (repeatable)', collect),
  ).action(
    action(async (refs: string[], opts: TaskListOpts) => {
      await withControl(opts.host, async (c) => {
        const nodes = await nodeMap(c);
        const keep = taskFilter(opts.filter ?? [], nodes);
        const wanted = refs.length ? refs : ['self'];
        const tasks: Task[] = [];
        for (const ref of wanted) {
          let nodeId = ref;
          if (ref === 'self') {
            const { selfNodeId } = await c.call<unknown, GetClusterResponse>('getCluster', {});
            if (!selfNodeId) throw new ExitError(1, 'this manager does not know its own node; name a node');
            nodeId = selfNodeId;
          }
          tasks.push(...(await c.call<unknown, ListTasksResponse>('listTasks', { serviceId: '', nodeId, desiredRunning: false })).tasks);
        }
        printTasks(tasks.filter(keep), nodes, opts);
      });
    }),
  );

  hostOption(
    node.command('inspect').description('Display detailed information on nodes').argument('<node...>').option('-f, --format <format>', 'json (default), or a template such as {{.Hostname}}'),
  ).action(
    action(async (refs: string[], opts: { host?: string; format?: string }) => {
      const format = opts.format === undefined ? 'json' : checkFormatOrTemplate(opts.format);
      if (format === 'table') throw new ExitError(2, 'invalid --format "table" for inspect: use json or a template');
      await withControl(opts.host, async (c) => {
        const { leaderAddr } = await c.call<unknown, GetClusterResponse>('getCluster', {});
        const out = [];
        for (const r of refs) {
          const { node: n } = await c.call<unknown, GetNodeResponse>('getNode', { nodeId: r });
          out.push(nodeJson(n!, leaderAddr));
        }
        if (typeof format === 'object') return void process.stdout.write(out.map((o) => renderTemplate(format.template, o) + '\n').join(''));
        printJson(out);
      });
    }),
  );

  hostOption(
    node
      .command('update')
      .description('Update a node')
      .argument('<node>')
      .option('--availability <availability>', 'active, pause or drain')
      .option('--label-add <K=V>', 'add or update a node label (repeatable)', collect)
      .option('--label-rm <K>', 'remove a node label (repeatable)', collect),
  ).action(
    action(async (ref: string, opts: { host?: string; availability?: string; labelAdd?: string[]; labelRm?: string[] }) => {
      const av = opts.availability !== undefined ? availability(opts.availability) : undefined;
      const adds = (opts.labelAdd ?? []).map((l) => (l.includes('=') ? parseKeyValue('--label-add', l) : ([l, ''] as [string, string])));
      await withControl(opts.host, async (c) => {
        const { node: n } = await c.call<unknown, GetNodeResponse>('getNode', { nodeId: ref });
        const labels = { ...(n!.spec?.labels ?? {}) };
        for (const [k, v] of adds) labels[k] = v;
        for (const k of opts.labelRm ?? []) {
          if (!(k in labels)) throw new ExitError(1, `invalid --label-rm ${JSON.stringify(k)}: node ${ref} has no such label`);
          delete labels[k];
        }
        const spec = { ...n!.spec!, labels, availability: av ?? n!.spec!.availability };
        await c.call<unknown, UpdateNodeResponse>('updateNode', { nodeId: n!.id, version: n!.meta?.version ?? 0, spec, force: false });
        process.stdout.write(`${ref}\n`);
      });
    }),
  );

  for (const [name, desc] of [
    ['promote', 'Promote a node to manager'],
    ['demote', 'Demote a manager to worker (leaves the Raft membership)'],
  ] as const) {
    hostOption(node.command(name).description(desc).argument('<node...>').option('-f, --force', 'demote even if the remaining managers would lose quorum')).action(
      action(async (refs: string[], opts: { host?: string; force?: boolean }) => {
        await withControl(opts.host, async (c) => {
          for (const r of refs) {
            const { node: n } = await c.call<unknown, GetNodeResponse>('getNode', { nodeId: r });
            const desiredRole = name === 'promote' ? NodeRole.NODE_ROLE_MANAGER : NodeRole.NODE_ROLE_WORKER;
            if (n!.role === desiredRole) {
              process.stdout.write(`node ${r} is already a ${name === 'promote' ? 'manager' : 'worker'}\n`);
              continue;
            }
            await c.call<unknown, UpdateNodeResponse>('updateNode', { nodeId: n!.id, version: 0, spec: { ...n!.spec!, desiredRole }, force: !!opts.force });
            if (name === 'promote') {
              // the node's manager process joins the managers by itself: wait for it
              const t0 = Date.now();
              for (;;) {
                const { node: now } = await c.call<unknown, GetNodeResponse>('getNode', { nodeId: n!.id });
                if (now?.role === NodeRole.NODE_ROLE_MANAGER) break;
                if (Date.now() - t0 > 30_000) throw new ExitError(1, `node ${r} did not join the managers within 30 s`);
                await new Promise((res) => setTimeout(res, 200));
              }
            }
            process.stdout.write(`node ${r} ${name}d\n`);
          }
        });
      }),
    );
  }

  hostOption(node.command('rm').alias('remove').description('Remove one or more nodes from the cluster').argument('<node...>').option('-f, --force', 'force remove a node')).action(
    action(async (refs: string[], opts: { host?: string; force?: boolean }) => {
      await withControl(opts.host, async (c) => {
        for (const r of refs) {
          await c.call('removeNode', { nodeId: r, force: !!opts.force });
          process.stdout.write(`${r}\n`);
        }
      });
    }),
  );
}

function cap(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}
