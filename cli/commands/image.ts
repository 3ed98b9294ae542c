import type { Command } from 'commander';
import { ImageStore } from '../../agent/runtime/images.js';
import { invalidArgument } from '../../common/errors.js';
import { resolveDataDir } from '../../common/paths.js';
import { formatBytes } from '../../common/units.js';
import { action, checkFormat, collect, printJson, table, timeAgo } from '../util.js';

interface DataDirOpts {
  dataDir?: string;
}

/** "--cmd" values: a JSON array, or words separated by spaces. */
function words(field: string, value: string): string[] {
  const v = value.trim();
  if (v.startsWith('[')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(v);
    } catch {
      throw invalidArgument(field, value, 'not a valid JSON array');
    }
    if (!Array.isArray(parsed) || !parsed.every((x) => typeof x === 'string')) throw invalidArgument(field, value, 'expected a JSON array of strings');
    return parsed;
  }
  return v === '' ? [] : v.split(/\s+/);
}

export function register(program: Command): void {
  const image = program.command('image').description('Manage images on this node');

  image
    .command('import')
    .description('Import an image from an OCI layout (dir or tar), a docker-archive tar, or a root file system directory; prints its digest')
    .argument('<name>', 'image name[:tag]')
    .argument('<source>', 'OCI layout, docker-archive or root file system directory')
    .option('--data-dir <dir>', 'node data directory (default: $FLOTILLA_DATA_DIR or /var/lib/flotilla)')
    .option('--cmd <cmd>', 'rootfs import: the image Cmd (JSON array or words)')
    .option('--entrypoint <cmd>', 'rootfs import: the image Entrypoint (JSON array or words)')
    .option('-e, --env <KEY=VALUE>', 'rootfs import: an environment variable (repeatable)', collect)
    .option('-w, --workdir <dir>', 'rootfs import: the working directory')
    .option('-u, --user <user>', 'rootfs import: the user')
    .action(
      action(async (name: string, source: string, opts: DataDirOpts & { cmd?: string; entrypoint?: string; env?: string[]; workdir?: string; user?: string }) => {
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        const config: Record<string, unknown> = {};
        if (opts.cmd !== undefined) config.cmd = words('--cmd', opts.cmd);
        if (opts.entrypoint !== undefined) config.entrypoint = words('--entrypoint', opts.entrypoint);
        if (opts.env !== undefined) {
          for (const e of opts.env) if (!/^[^=]+=/.test(e)) throw invalidArgument('--env', e, 'expected KEY=VALUE');
          config.env = opts.env;
        }
        if (opts.workdir !== undefined) config.workingDir = opts.workdir;
        if (opts.user !== undefined) config.user = opts.user;
        const rec = await store.import(name, source, Object.keys(config).length > 0 ? { config } : {});
        process.stdout.write(`${rec.digest}\n`);
      }),
    );

  image
    .command('ls')
    .alias('list')
    .description('List images')
    .option('--data-dir <dir>', 'node data directory')
    .option('--format <format>', 'table or json', 'table')
    .action(
      action(async (opts: DataDirOpts & { format?: string }) => {
        const format = checkFormat(opts.format);
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        const images = await store.list();
        if (format === 'json') {
          printJson(images);
          return;
        }
        const rows = images.map((i) => {
          const colon = i.name.lastIndexOf(':');
          return [i.name.slice(0, colon), i.name.slice(colon + 1), i.digest.slice(7, 19), formatBytes(i.size), timeAgo(i.created)];
        });
        process.stdout.write(table(['NAME', 'TAG', 'DIGEST', 'SIZE', 'CREATED'], rows));
      }),
    );

  image
    .command('inspect')
    .description('Show images as JSON (by name[:tag], digest or digest prefix)')
    .argument('<ref...>', 'image name[:tag] or digest')
    .option('--data-dir <dir>', 'node data directory')
    .option('--format <format>', 'json', 'json')
    .action(
      action(async (refs: string[], opts: DataDirOpts & { format?: string }) => {
        if (opts.format !== 'json') throw invalidArgument('--format', opts.format, 'image inspect supports json only');
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        const out = [];
        for (const r of refs) out.push(await store.get(r));
        printJson(out);
      }),
    );

  image
    .command('rm')
    .alias('remove')
    .description('Remove images (refused while a container uses them)')
    .argument('<ref...>', 'image name[:tag] or digest')
    .option('--data-dir <dir>', 'node data directory')
    .action(
      action(async (refs: string[], opts: DataDirOpts) => {
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        for (const r of refs) {
          const removed = await store.remove(r);
          for (const img of removed) process.stdout.write(`Untagged: ${img.name}\n`);
          const digest = removed[0]?.digest;
          if (digest && !(await store.has(digest))) process.stdout.write(`Deleted: ${digest}\n`);
        }
      }),
    );
  image
    .command('prune')
    .description('Remove unused image data: blobs and unpacked layers no image uses; with -a, also every image no container uses')
    .option('-a, --all', 'remove every image no container (running or stopped) uses, not only unreferenced data')
    .option('-f, --force', 'do not prompt for confirmation (flotilla never prompts; accepted as Docker does)')
    .option('--format <format>', 'table or json', 'table')
    .option('--data-dir <dir>', 'node data directory')
    .action(
      action(async (opts: DataDirOpts & { all?: boolean; format: string }) => {
        const format = checkFormat(opts.format);
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        const sizes = new Map<string, number>();
        for (const b of await store.content.list()) sizes.set(b, (await store.content.info(b).catch(() => ({ size: 0 }))).size);
        const res = await store.pruneImages({ all: opts.all === true });
        const reclaimed = res.blobs.reduce((n, b) => n + (sizes.get(b) ?? 0), 0);
        if (format === 'json') {
          return printJson({ images: res.images.map((i) => ({ name: i.name, digest: i.digest })), blobs: res.blobs, layers: res.layers, reclaimedBytes: reclaimed });
        }
        if (res.images.length > 0) {
          process.stdout.write('Deleted Images:\n');
          for (const i of res.images) process.stdout.write(`untagged: ${i.name}\n`);
          const gone = new Set(res.blobs);
          for (const d of new Set(res.images.map((i) => i.digest))) if (gone.has(d)) process.stdout.write(`deleted: ${d}\n`);
          process.stdout.write('\n');
        }
        process.stdout.write(`Deleted ${res.blobs.length} blobs and ${res.layers.length} unpacked layers\nTotal reclaimed space: ${formatBytes(reclaimed)}\n`);
      }),
    );
}
