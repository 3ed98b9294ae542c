/**
 * Image pull from a local registry: `flotilla image pull` (a CLI process into a fresh data dir: download,
 * verify, unpack every layer) beside `skopeo copy docker://... dir:...` (download, verify, write and fsync
 * each blob; no unpacking) of the same image, interleaved in the same run so that machine noise hits both
 * alike.
 *
 *   npm run build && npm run bench:pull        (root: layers are unpacked with their owners; BENCH_N rounds, default 3)
 *
 * The image (about 200 MB: BENCH_LAYERS layers, default 6, of random incompressible data) is generated
 * once per run and uploaded to a docker-registry on loopback (test/helpers/registry.ts). Prints the
 * medians and the ratio flotilla/skopeo (target: at most 1.0). Never fails on a missed target.
 *
 * Part 2 (BENCH_CLUSTER=0 skips it): a global service on a 5-host test bed needing that image: time until
 * it runs on every host pulling from a registry, and with the image on one host only and no registry.
 */
import { spawn } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { MEDIA_TYPES, RegistryClient } from '../agent/runtime/registry/index.js';
import { startRegistry, type TestRegistry } from '../test/helpers/registry.js';

const N = Number(process.env.BENCH_N ?? 3);
const LAYERS = Number(process.env.BENCH_LAYERS ?? 6);
const TOTAL_MB = Number(process.env.BENCH_MB ?? 200);
const HERE = path.dirname(fileURLToPath(import.meta.url));
const CLI = process.env.FLOTILLA_CLI ?? path.resolve(HERE, '../cli/main.js');
/**
 * BENCH_VARIANT="NAME=VALUE ...": also run flotilla with these environment variables in every round (an
 * A/B in one run); FLOTILLA_CLI=PATH among them runs another build's CLI as the variant.
 */
const VARIANT = (process.env.BENCH_VARIANT ?? '').split(' ').filter(Boolean);

function run(cmd: string, args: string[], timeoutMs = 300_000, env?: NodeJS.ProcessEnv): Promise<{ code: number; stderr: string; ms: number }> {
  return new Promise((resolve) => {
    const t = performance.now();
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], ...(env ? { env } : {}) });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (err) => resolve({ code: -1, stderr: err.message, ms: performance.now() - t }));
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stderr, ms: performance.now() - t });
    });
  });
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return `sha256:${h.digest('hex')}`;
}

/** Writes LAYERS gzip layers of random data (one file each) and uploads them with a manifest. */
async function seed(reg: TestRegistry, work: string): Promise<{ ref: string; bytes: number }> {
  const c = new RegistryClient(reg.host);
  const per = Math.floor((TOTAL_MB * 1024 * 1024) / LAYERS);
  const layers: { digest: string; size: number; diffId: string }[] = [];
  for (let i = 0; i < LAYERS; i++) {
    const dir = path.join(work, `l${i}`);
    await fs.mkdir(path.join(dir, 'data'), { recursive: true });
    const buf = Buffer.allocUnsafe(per);
    randomFillSync(buf);
    await fs.writeFile(path.join(dir, 'data', `blob${i}`), buf);
    const plain = path.join(work, `l${i}.tar`);
    const gz = path.join(work, `l${i}.tgz`);
    const packed = await run('/bin/sh', ['-c', `tar -C "${dir}" --numeric-owner -cf "${plain}" . && gzip -1 -c "${plain}" > "${gz}"`]);
    if (packed.code !== 0) throw new Error(`packing layer ${i}: ${packed.stderr.trim()}`);
    await fs.rm(dir, { recursive: true });
    const diffId = await sha256File(plain);
    await fs.rm(plain);
    const digest = await sha256File(gz);
    const size = (await fs.stat(gz)).size;
    await c.uploadBlob('bench/big', digest, size, (s, e) => createReadStream(gz, { start: s, end: e - 1 }));
    await fs.rm(gz);
    layers.push({ digest, size, diffId });
  }
  const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', config: { Cmd: ['sh'] }, rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) } }));
  const configDigest = `sha256:${createHash('sha256').update(config).digest('hex')}`;
  await c.uploadBlob('bench/big', configDigest, config.length, () => Readable.from([config]));
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: layers.map((l) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: l.digest, size: l.size })),
    }),
  );
  await c.putManifest('bench/big', '1', manifest, MEDIA_TYPES.ociManifest);
  return { ref: `${reg.host}/bench/big:1`, bytes: layers.reduce((n, l) => n + l.size, 0) };
}

/**
 * The in-cluster part (issue 14): a global service on the 5 hosts of a test bed (1 manager, 4 agents,
 * real runc) needing the image. (a) from a registry: time from `service create` until the image is on
 * every host, each host pulling from a docker-registry inside h1's namespace; (b) without a registry:
 * the image is on h1 only and the registry is stopped; the other 4 hosts fetch it from h1 over the
 * cluster's mutual TLS. The image is copied into the bed's registry with skopeo (from the loopback one).
 */
async function clusterPart(ref: string, work: string): Promise<void> {
  const { Testbed, run: bedRun } = await import('../test/helpers/testbed.js');
  const subnet = `198.18.${100 + Math.floor(Math.random() * 150)}`;
  const h1ip = `${subnet}.11`;
  const port = 5000;
  const saved = process.env.FLOTILLA_INSECURE_REGISTRIES;
  process.env.FLOTILLA_INSECURE_REGISTRIES = `${h1ip}:${port}`;
  const bed = await Testbed.create({ managers: 1, agents: 4, subnet, readyTimeoutMs: 60_000 });
  let reg: TestRegistry | undefined;
  try {
    const h1 = bed.hosts[0]!;
    reg = await startRegistry({ netns: h1.netns, listenHost: h1ip, port });
    const dir = path.join(work, 'cluster-copy');
    const c1 = await run('skopeo', ['copy', '-q', '--src-tls-verify=false', `docker://${ref}`, `dir:${dir}`]);
    if (c1.code !== 0) throw new Error(`skopeo copy failed: ${c1.stderr.trim()}`);
    const bedRef = `${h1ip}:${port}/bench/big:1`;
    const c2 = await bedRun('nsenter', [`--net=/run/netns/${h1.netns}`, '--', 'skopeo', 'copy', '-q', '--dest-tls-verify=false', `dir:${dir}`, `docker://${bedRef}`], { timeoutMs: 300_000 });
    if (c2.code !== 0) throw new Error(`skopeo copy into the bed's registry failed: ${c2.stderr.trim()}`);
    await fs.rm(dir, { recursive: true, force: true });
    // the image holds random data only (no command to run): what counts is when every host has it
    const { ImageStore } = await import('../agent/runtime/images.js');
    const converge = async (name: string, image: string): Promise<number> => {
      const t = performance.now();
      const r = await bed.cli(['service', 'create', '-d', '--name', name, '--mode', 'global', '--network', 'host', '--restart-condition', 'none', image, 'true']);
      if (r.code !== 0) throw new Error(`service create failed: ${r.stderr.trim()}`);
      for (const until = Date.now() + 600_000; ; ) {
        let have = 0;
        for (const h of bed.hosts) if (await (await ImageStore.open(h.dataDir)).has(image)) have++;
        if (have === bed.hosts.length) return performance.now() - t;
        const ts = await bed.cliJson<Array<{ state: string; error: string }>>(['service', 'ps', name]);
        const bad = ts.find((x) => x.state === 'rejected' && /not available on node/.test(x.error));
        if (bad) throw new Error(`a task of ${name} could not get the image: ${bad.error}`);
        if (Date.now() > until) throw new Error(`${name}: the image is not on every host after 10 minutes`);
        await new Promise((res) => setTimeout(res, 200));
      }
    };
    const fromRegistry = await converge('pull-reg', bedRef);
    process.stdout.write(`\n5 hosts, global service of ${bedRef}:\n  (a) every host pulls it from the registry: on all hosts after ${(fromRegistry / 1000).toFixed(2)} s\n`);
    // (b) only h1 keeps the image; the registry goes away
    const digest = JSON.parse((await h1.cli(['image', 'inspect', bedRef])).stdout)[0].digest as string;
    const rm = await bed.cli(['service', 'rm', 'pull-reg']);
    if (rm.code !== 0) throw new Error(`service rm failed: ${rm.stderr.trim()}`);
    for (const h of bed.hosts.slice(1)) {
      for (const until = Date.now() + 120_000; ; ) {
        const r = await h.cli(['image', 'rm', bedRef]);
        if (r.code === 0) break;
        if (Date.now() > until) throw new Error(`image rm on ${h.name}: ${r.stderr.trim()}`);
        await new Promise((res) => setTimeout(res, 500));
      }
      await h.cli(['image', 'prune']);
    }
    await reg.stop();
    reg = undefined;
    const fromPeer = await converge('pull-peer', `${bedRef}@${digest}`);
    process.stdout.write(`  (b) no registry, the image on h1 only, 4 hosts fetch it from h1: on all hosts after ${(fromPeer / 1000).toFixed(2)} s\n`);
  } finally {
    await reg?.stop();
    await bed.destroy();
    if (saved === undefined) delete process.env.FLOTILLA_INSECURE_REGISTRIES;
    else process.env.FLOTILLA_INSECURE_REGISTRIES = saved;
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) {
    process.stdout.write('bench:pull needs root (layers are unpacked with their owners)\n');
    return;
  }
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-bench-pull-'));
  let reg: TestRegistry | undefined;
  try {
    reg = await startRegistry();
    const t0 = performance.now();
    const { ref, bytes } = await seed(reg, path.join(work, 'seed'));
    process.stdout.write(`image ${ref}: ${LAYERS} layers, ${(bytes / 1e6).toFixed(1)} MB compressed (generated and pushed in ${((performance.now() - t0) / 1000).toFixed(1)} s)\n`);
    const ours: number[] = [];
    const theirs: number[] = [];
    const theirsUnpacked: number[] = [];
    const variant: number[] = [];
    for (let i = 0; i < N; i++) {
      const dataDir = path.join(work, `flotilla-${i}`);
      const outDir = path.join(work, `skopeo-${i}`);
      // alternate who goes first
      const order = i % 2 === 0 ? ['flotilla', 'skopeo'] : ['skopeo', 'flotilla'];
      if (VARIANT.length > 0) order.splice(i % 3, 0, 'variant');
      for (const who of order) {
        if (who === 'variant') {
          const env = { ...process.env, ...Object.fromEntries(VARIANT.map((kv) => [kv.split('=')[0]!, kv.split('=').slice(1).join('=')])) };
          const vdir = path.join(work, `variant-${i}`);
          // FLOTILLA_CLI in the variant runs another build (e.g. the one before a change)
          const r = await run(process.execPath, [env.FLOTILLA_CLI ?? CLI, 'image', 'pull', '-q', '--data-dir', vdir, ref], 300_000, env);
          if (r.code !== 0) throw new Error(`flotilla image pull (${VARIANT.join(' ')}) failed: ${r.stderr.trim()}`);
          variant.push(r.ms);
          await fs.rm(vdir, { recursive: true, force: true });
        } else if (who === 'flotilla') {
          // BENCH_NODE_ARGS: extra node flags for the CLI, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof"
          const nodeArgs = (process.env.BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
          const r = await run(process.execPath, [...nodeArgs, CLI, 'image', 'pull', '-q', '--data-dir', dataDir, ref]);
          if (r.code !== 0) throw new Error(`flotilla image pull failed: ${r.stderr.trim()}`);
          ours.push(r.ms);
        } else {
          const r = await run('skopeo', ['copy', '-q', '--src-tls-verify=false', `docker://${ref}`, `dir:${outDir}`]);
          if (r.code !== 0) throw new Error(`skopeo copy failed: ${r.stderr.trim()}`);
          theirs.push(r.ms);
          // the second anchor: skopeo's copy plus GNU tar unpacking every layer (what a pull that leaves
          // runnable layers behind must also do), 3 layers at once like flotilla
          const manifest = JSON.parse(await fs.readFile(path.join(outDir, 'manifest.json'), 'utf8')) as { layers: { digest: string }[] };
          const t = performance.now();
          const queue = manifest.layers.map((l, k) => ({ blob: path.join(outDir, l.digest.slice(7)), dest: path.join(outDir, `unpacked-${k}`) }));
          await Promise.all(
            [0, 1, 2].map(async () => {
              for (let job = queue.shift(); job; job = queue.shift()) {
                await fs.mkdir(job.dest);
                const u = await run('tar', ['-xzf', job.blob, '-C', job.dest]);
                if (u.code !== 0) throw new Error(`tar -x failed: ${u.stderr.trim()}`);
              }
            }),
          );
          const s = await run('sync', ['-f', outDir]);
          if (s.code !== 0) throw new Error(`sync failed: ${s.stderr.trim()}`);
          theirsUnpacked.push(r.ms + (performance.now() - t));
        }
      }
      process.stdout.write(
        `round ${i + 1}: flotilla image pull ${(ours[i]! / 1000).toFixed(2)} s, ${VARIANT.length > 0 ? `flotilla with ${VARIANT.join(' ')} ${(variant[i]! / 1000).toFixed(2)} s, ` : ''}skopeo copy ${(theirs[i]! / 1000).toFixed(2)} s, skopeo copy + tar -x of the layers ${(theirsUnpacked[i]! / 1000).toFixed(2)} s\n`,
      );
      await fs.rm(dataDir, { recursive: true, force: true });
      await fs.rm(outDir, { recursive: true, force: true });
    }
    const a = median(ours);
    const b = median(theirs);
    process.stdout.write(
      `\nmedian of ${N}: flotilla image pull ${(a / 1000).toFixed(2)} s (${(bytes / 1e6 / (a / 1000)).toFixed(0)} MB/s, includes unpacking), ` +
        `skopeo copy to dir: ${(b / 1000).toFixed(2)} s; ratio flotilla/skopeo ${(a / b).toFixed(2)} (target <= 1.0)\n` +
        `skopeo copy + tar -x of every layer: ${(median(theirsUnpacked) / 1000).toFixed(2)} s; ratio flotilla/(skopeo + tar) ${(a / median(theirsUnpacked)).toFixed(2)}\n`,
    );
    if (VARIANT.length > 0) process.stdout.write(`flotilla image pull with ${VARIANT.join(' ')}: ${(median(variant) / 1000).toFixed(2)} s
`);
    if (process.env.BENCH_CLUSTER !== '0') await clusterPart(ref, work);
  } finally {
    await reg?.stop();
    await fs.rm(work, { recursive: true, force: true });
  }
}

await main();
