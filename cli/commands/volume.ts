/**
 * `flotilla volume ...`: the named local volumes of this node (agent/runtime/volumes.ts), straight
 * through the node's data dir like `flotilla container` (no manager: volumes are local to a node, as
 * with Swarm's local driver).
 */
import type { Command } from 'commander';
import { RuncRuntime } from '../../agent/runtime/containers.js';
import type { VolumeInfo } from '../../agent/runtime/volumes.js';
import { setSpawnOnMainThread } from '../../agent/runtime/spawner.js';
import { errorMessage, invalidArgument } from '../../common/errors.js';
import { resolveDataDir } from '../../common/paths.js';
import { ExitError, action, checkFormat, collect, printJson, table, timeAgo } from '../util.js';

const DATA_DIR_HELP = 'node data directory (default: $FLOTILLA_DATA_DIR or /var/lib/flotilla)';

function openRuntime(dataDir?: string): Promise<RuncRuntime> {
  setSpawnOnMainThread(true);
  return RuncRuntime.open(resolveDataDir(dataDir));
}

function kvList(flag: string, list: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const l of list ?? []) {
    const i = l.indexOf('=');
    if (i === 0) throw invalidArgument(flag, l, 'expected KEY=VALUE');
    out[i < 0 ? l : l.slice(0, i)] = i < 0 ? '' : l.slice(i + 1);
  }
  return out;
}

function json(v: VolumeInfo): Record<string, unknown> {
  return {
    name: v.name,
    driver: v.driver,
    mountpoint: v.mountpoint,
    labels: v.labels,
    options: v.options,
    scope: 'local',
    anonymous: v.anonymous,
    createdAt: new Date(v.createdAt).toISOString(),
  };
}

export function register(program: Command): void {
  const volume = program.command('volume').description("Manage this node's local volumes");

  volume
    .command('create')
    .description('Create a volume (an existing one of that name is left as it is)')
    .argument('[name]', 'volume name (default: generated)')
    .option('-d, --driver <driver>', 'volume driver (only local)', 'local')
    .option('-o, --opt <K=V>', "local driver option: type, device, o (e.g. type=tmpfs,device=tmpfs,o=size=64m; repeatable)", collect)
    .option('--label <K=V>', 'volume label (repeatable)', collect)
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (name: string | undefined, o: { driver: string; opt?: string[]; label?: string[]; dataDir?: string }) => {
        if (o.driver !== 'local') throw invalidArgument('--driver', o.driver, 'only the local driver exists');
        const options = kvList('--opt', o.opt);
        const labels = kvList('--label', o.label);
        const rt = await openRuntime(o.dataDir);
        const { volume: v } = await rt.volumes.create(name ?? '', { options, labels, anonymous: false });
        process.stdout.write(`${v.name}\n`);
      }),
    );

  volume
    .command('ls')
    .alias('list')
    .description('List volumes')
    .option('-q, --quiet', 'only names')
    .option('--format <format>', 'table or json')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (o: { quiet?: boolean; format?: string; dataDir?: string }) => {
        const format = checkFormat(o.format);
        const rt = await openRuntime(o.dataDir);
        const vols = await rt.volumes.list();
        if (o.quiet) return void process.stdout.write(vols.map((v) => `${v.name}\n`).join(''));
        if (format === 'json') return printJson(vols.map(json));
        process.stdout.write(table(['DRIVER', 'VOLUME NAME', 'CREATED'], vols.map((v) => [v.driver, v.name, timeAgo(v.createdAt)])));
      }),
    );

  volume
    .command('inspect')
    .description('Display detailed information on volumes')
    .argument('<names...>')
    .option('--format <format>', 'json (default)')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (names: string[], o: { format?: string; dataDir?: string }) => {
        checkFormat(o.format);
        const rt = await openRuntime(o.dataDir);
        const out: Record<string, unknown>[] = [];
        let failed = 0;
        for (const n of names) {
          try {
            out.push(json(await rt.volumes.inspect(n)));
          } catch (err) {
            failed++;
            process.stderr.write(`flotilla: ${errorMessage(err)}\n`);
          }
        }
        printJson(out);
        if (failed) throw new ExitError(1);
      }),
    );

  volume
    .command('rm')
    .alias('remove')
    .description('Remove volumes (refused while a container uses one)')
    .argument('<names...>')
    .option('-f, --force', 'remove even when a container still references it')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (names: string[], o: { force?: boolean; dataDir?: string }) => {
        const rt = await openRuntime(o.dataDir);
        let failed = 0;
        for (const n of names) {
          try {
            await rt.volumes.remove(n, !!o.force);
            process.stdout.write(`${n}\n`);
          } catch (err) {
            failed++;
            process.stderr.write(`flotilla: ${errorMessage(err)}\n`);
          }
        }
        if (failed) throw new ExitError(1);
      }),
    );

  volume
    .command('prune')
    .description('Remove the volumes no container uses (anonymous ones; with -a, named ones too)')
    .option('-a, --all', 'remove unused named volumes too')
    .option('-f, --force', 'do not ask (there is no prompt: accepted for Docker compatibility)')
    .option('--data-dir <dir>', DATA_DIR_HELP)
    .action(
      action(async (o: { all?: boolean; dataDir?: string }) => {
        const rt = await openRuntime(o.dataDir);
        const gone = await rt.volumes.prune(!!o.all);
        process.stdout.write(gone.length ? `Deleted Volumes:\n${gone.map((n) => `${n}\n`).join('')}` : 'No volumes removed\n');
      }),
    );
}
