import type { Command } from 'commander';
import { CreateNetworkResponse, GetNetworkResponse, ListNetworksResponse } from '../../gen/flotilla/v1/control.js';
import type { Network } from '../../gen/flotilla/v1/objects.js';
import { NetworkSpec } from '../../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../../common/errors.js';
import { shortId } from '../../common/ids.js';
import { parseKeyValue } from '../../common/units.js';
import { withControl } from '../client.js';
import { action, checkFormat, collect, printJson, table, ExitError } from '../util.js';
import { hostOption } from './service.js';
import { checkGateway, checkSubnet, parseMtu } from '../../manager/allocator/ipam.js';

export function networkJson(n: Network): Record<string, unknown> {
  return {
    id: n.id,
    name: n.spec?.name ?? '',
    driver: n.spec?.driver || 'overlay',
    scope: 'swarm',
    attachable: !!n.spec?.attachable,
    labels: n.spec?.labels ?? {},
    options: n.spec?.driverOpts ?? {},
    ipam: { subnet: n.allocation?.subnet ?? '', gateway: n.allocation?.gateway ?? '' },
    vni: n.allocation?.vni ?? 0,
    // 0: the node's underlay MTU minus the VXLAN overhead (50 bytes), decided on each node
    mtu: n.allocation?.mtu ?? 0,
    createdAt: n.meta?.createdAt ? new Date(n.meta.createdAt).toISOString() : '',
  };
}

/** Builds a network spec from `network create` flags, checked here for one clear line early. */
export function buildNetworkSpec(
  name: string,
  o: { driver?: string; subnet?: string; gateway?: string; opt?: string[]; label?: string[]; attachable?: boolean },
): NetworkSpec {
  const driverOpts: Record<string, string> = {};
  for (const kv of o.opt ?? []) {
    const [k, v] = parseKeyValue('--opt', kv);
    driverOpts[k] = v;
  }
  if (driverOpts.mtu !== undefined) parseMtu(driverOpts.mtu);
  if (o.driver !== undefined && o.driver !== 'overlay') throw invalidArgument('--driver', o.driver, 'only overlay is supported');
  if (o.gateway !== undefined && o.subnet === undefined) throw invalidArgument('--gateway', o.gateway, 'needs --subnet');
  if (o.subnet !== undefined) {
    const c = checkSubnet('--subnet', o.subnet);
    if (o.gateway !== undefined) checkGateway('--gateway', o.gateway, c);
  }
  const labels = Object.fromEntries((o.label ?? []).map((l) => (l.includes('=') ? parseKeyValue('--label', l) : [l, ''])));
  return NetworkSpec.fromPartial({
    name,
    driver: o.driver ?? 'overlay',
    labels,
    driverOpts,
    ipam: { subnet: o.subnet ?? '', gateway: o.gateway ?? '' },
    attachable: !!o.attachable,
  });
}

export function register(program: Command): void {
  const network = program.command('network').description('Manage overlay networks');

  hostOption(
    network
      .command('create')
      .description('Create an overlay network')
      .argument('<name>')
      .option('-d, --driver <driver>', 'network driver (overlay)')
      .option('--subnet <cidr>', 'subnet in CIDR form (default: the next free one of the cluster\'s address pool)')
      .option('--gateway <ip>', 'gateway address (default: the first address of the subnet)')
      .option('-o, --opt <K=V>', 'driver option: mtu=N (default: each node\'s underlay MTU minus 50)', collect)
      .option('--label <K=V>', 'network label (repeatable)', collect)
      .option('--attachable', 'allow standalone containers to attach'),
  ).action(
    action(async (name: string, opts: { host?: string; driver?: string; subnet?: string; gateway?: string; opt?: string[]; label?: string[]; attachable?: boolean }) => {
      const spec = buildNetworkSpec(name, opts);
      await withControl(opts.host, async (c) => {
        const { network: n } = await c.call<unknown, CreateNetworkResponse>('createNetwork', { spec });
        process.stdout.write(`${n!.id}\n`);
      });
    }),
  );

  hostOption(network.command('ls').alias('list').description('List networks').option('--format <format>', 'table or json').option('-q, --quiet', 'only ids')).action(
    action(async (opts: { host?: string; format?: string; quiet?: boolean }) => {
      const format = checkFormat(opts.format);
      await withControl(opts.host, async (c) => {
        const { networks } = await c.call<unknown, ListNetworksResponse>('listNetworks', {});
        networks.sort((a, b) => (a.spec?.name ?? '').localeCompare(b.spec?.name ?? ''));
        if (opts.quiet) return void process.stdout.write(networks.map((n) => n.id + '\n').join(''));
        if (format === 'json') return printJson(networks.map(networkJson));
        process.stdout.write(
          table(
            ['NETWORK ID', 'NAME', 'DRIVER', 'SCOPE', 'SUBNET', 'GATEWAY', 'VNI'],
            networks.map((n) => [
              shortId(n.id),
              n.spec?.name ?? '',
              n.spec?.driver || 'overlay',
              'swarm',
              n.allocation?.subnet ?? '',
              n.allocation?.gateway ?? '',
              String(n.allocation?.vni ?? ''),
            ]),
          ),
        );
      });
    }),
  );

  hostOption(network.command('inspect').description('Display detailed information on networks').argument('<network...>').option('--format <format>', 'json (default)')).action(
    action(async (refs: string[], opts: { host?: string; format?: string }) => {
      if (opts.format !== undefined && opts.format !== 'json') throw new ExitError(2, `invalid --format "${opts.format}": use json`);
      await withControl(opts.host, async (c) => {
        const out = [];
        for (const r of refs) {
          const { network: n } = await c.call<unknown, GetNetworkResponse>('getNetwork', { networkId: r });
          out.push(networkJson(n!));
        }
        printJson(out);
      });
    }),
  );

  hostOption(network.command('rm').alias('remove').description('Remove one or more networks').argument('<network...>')).action(
    action(async (refs: string[], opts: { host?: string }) => {
      await withControl(opts.host, async (c) => {
        let failed = 0;
        for (const r of refs) {
          try {
            await c.call('removeNetwork', { networkId: r });
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
}
