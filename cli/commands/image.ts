import type { Command } from 'commander';
import { ImageStore } from '../../agent/runtime/images.js';
import { invalidArgument } from '../../common/errors.js';
import { resolveDataDir } from '../../common/paths.js';
import { formatBytes } from '../../common/units.js';
import { ExitError, action, checkFormat, collect, printJson, readSecretLine, table, timeAgo } from '../util.js';
import { ProgressDisplay } from '../pullprogress.js';

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
          const at = i.name.indexOf('@');
          const colon = i.name.lastIndexOf(':');
          const [repo, tag] = at > 0 ? [i.name.slice(0, at), '<none>'] : [i.name.slice(0, colon), i.name.slice(colon + 1)];
          return [repo, tag, i.digest.slice(7, 19), formatBytes(i.size), timeAgo(i.created)];
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

  registerRegistryCommands(image);
}

interface RegistryFlags extends DataDirOpts {
  insecureRegistry?: string[];
  quiet?: boolean;
}

/** --insecure-registry flags plus $FLOTILLA_INSECURE_REGISTRIES (comma separated). */
function insecureList(opts: RegistryFlags): string[] {
  const env = (process.env.FLOTILLA_INSECURE_REGISTRIES ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  return [...env, ...(opts.insecureRegistry ?? [])];
}

/** Reads all of stdin (for --password-stdin): the trailing newline is dropped. */
async function readStdin(): Promise<string> {
  const parts: Buffer[] = [];
  for await (const chunk of process.stdin) parts.push(chunk as Buffer);
  return Buffer.concat(parts).toString('utf8').replace(/\r?\n$/, '');
}

async function readLine(prompt: string): Promise<string> {
  const readline = await import('node:readline/promises');
  const rl = readline.createInterface({ input: process.stdin, output: process.stderr });
  try {
    return (await rl.question(prompt)).trim();
  } finally {
    rl.close();
  }
}

function registerRegistryCommands(image: Command): void {
  // The registry client loads on first use: `image ls` and the other store commands do not need it.
  const reg = (): Promise<typeof import('../../agent/runtime/registry/index.js')> => import('../../agent/runtime/registry/index.js');
  const insecureFlag = ['--insecure-registry <host:port>', 'use plain HTTP for this registry (repeatable; loopback registries always use HTTP)'] as const;

  image
    .command('pull')
    .description('Pull an image from a registry into this node\'s image store')
    .argument('<ref>', 'image reference: [registry[:port]/]name[:tag][@sha256:digest]')
    .option('--data-dir <dir>', 'node data directory')
    .option('--platform <os/arch[/variant]>', "the platform to pull from a multi-platform image (default: this node's)")
    .option(...insecureFlag, collect)
    .option('-q, --quiet', 'print only the image reference')
    .action(
      action(async (refStr: string, opts: RegistryFlags & { platform?: string }) => {
        const r = await reg();
        const ref = r.parseReference(refStr);
        const platform = opts.platform !== undefined ? r.parsePlatform(opts.platform) : undefined;
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        const auth = await r.loadCredentials(ref.registry);
        const display = new ProgressDisplay(process.stdout);
        if (!opts.quiet) process.stdout.write(`${ref.tag ?? ref.digest}: Pulling from ${r.familiarName(ref)}\n`);
        const before = await store.find(r.storeName(ref));
        const res = await r.pull(ref, store, {
          insecure: insecureList(opts),
          ...(auth ? { auth } : {}),
          ...(platform ? { platform } : {}),
          ...(opts.quiet ? {} : { onProgress: display.onProgress }),
        });
        if (!opts.quiet) {
          process.stdout.write(`Digest: ${res.digest}\n`);
          const fresh = before?.digest !== res.record.digest;
          process.stdout.write(`Status: ${fresh ? 'Downloaded newer image' : 'Image is up to date'} for ${r.familiarString(ref)}\n`);
        }
        process.stdout.write(`${r.formatReference(ref)}\n`);
      }),
    );

  image
    .command('push')
    .description('Push an image of this node\'s image store to a registry')
    .argument('<ref>', 'image name: [registry[:port]/]name[:tag] (tag it first with image tag)')
    .option('--data-dir <dir>', 'node data directory')
    .option(...insecureFlag, collect)
    .option('--chunk-size <bytes>', 'upload blobs in chunks of this many bytes (default: one request per blob)')
    .option('-q, --quiet', 'print only the digest')
    .action(
      action(async (refStr: string, opts: RegistryFlags & { chunkSize?: string }) => {
        const r = await reg();
        const ref = r.parseReference(refStr);
        let chunkSize: number | undefined;
        if (opts.chunkSize !== undefined) {
          chunkSize = Number(opts.chunkSize);
          if (!Number.isInteger(chunkSize) || chunkSize < 1024) throw invalidArgument('--chunk-size', opts.chunkSize, 'expected a whole number of bytes, at least 1024');
        }
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        const auth = await r.loadCredentials(ref.registry);
        const display = new ProgressDisplay(process.stdout, process.stdout.isTTY === true, true);
        if (!opts.quiet) process.stdout.write(`The push refers to repository [${r.familiarName(ref)}]\n`);
        const res = await r.push(ref, store, {
          insecure: insecureList(opts),
          ...(auth ? { auth } : {}),
          ...(chunkSize ? { chunkSize } : {}),
          ...(opts.quiet ? {} : { onProgress: display.onProgress }),
        });
        if (!opts.quiet) {
          const img = await store.get(r.storeName(ref));
          process.stdout.write(`${ref.tag ?? 'latest'}: digest: ${res.digest} size: ${img.size}\n`);
        } else {
          process.stdout.write(`${res.digest}\n`);
        }
      }),
    );

  image
    .command('tag')
    .description('Give an image another name (e.g. a registry name to push it under)')
    .argument('<source>', 'image name[:tag] or digest')
    .argument('<target>', 'new name: [registry[:port]/]name[:tag]')
    .option('--data-dir <dir>', 'node data directory')
    .action(
      action(async (source: string, target: string, opts: DataDirOpts) => {
        const store = await ImageStore.open(resolveDataDir(opts.dataDir));
        await store.tag(source, target);
      }),
    );

  image
    .command('login')
    .description('Log in to a registry: the credentials are checked, then kept in ~/.flotilla/config.json (mode 0600)')
    .argument('[registry]', 'registry host[:port] (default: Docker Hub)')
    .option('-u, --username <user>', 'user name')
    .option('--password-stdin', 'read the password from stdin (it is never taken from the command line)')
    .option(...insecureFlag, collect)
    .action(
      action(async (registryArg: string | undefined, opts: RegistryFlags & { username?: string; passwordStdin?: boolean }) => {
        const r = await reg();
        const registry = r.parseRegistryName(registryArg ?? 'docker.io');
        let username = opts.username;
        if (username === undefined) {
          if (!process.stdin.isTTY || opts.passwordStdin) throw new ExitError(2, 'a user name is required: use -u USER');
          username = await readLine('Username: ');
        }
        if (!username) throw new ExitError(2, 'a user name is required: use -u USER');
        const password = opts.passwordStdin ? await readStdin() : await readSecretLine('Password: ');
        if (!password) throw new ExitError(2, 'a password is required (on stdin with --password-stdin, or typed at the prompt)');
        await r.login(registry, { username, password }, { insecure: insecureList(opts) });
        await r.saveCredentials(registry, { username, password });
        process.stdout.write('Login Succeeded\n');
      }),
    );

  image
    .command('logout')
    .description('Remove the stored credentials of a registry')
    .argument('[registry]', 'registry host[:port] (default: Docker Hub)')
    .action(
      action(async (registryArg: string | undefined) => {
        const r = await reg();
        const registry = r.parseRegistryName(registryArg ?? 'docker.io');
        if (await r.removeCredentials(registry)) process.stdout.write(`Removing login credentials for ${registry}\n`);
        else process.stdout.write(`Not logged in to ${registry}\n`);
      }),
    );
}
