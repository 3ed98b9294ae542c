/**
 * The registry client against a real registry (Debian's docker-registry on loopback, test/helpers/
 * registry.ts): once with htpasswd basic auth and once with token auth (a test token issuer), plus skopeo
 * as an independent client. Pull of single- and multi-platform images, resume after a cut transfer, a
 * corrupted blob refused, push (monolithic and chunked), skopeo both ways, layers skipped when present,
 * and the CLI's one-line errors, login/logout and the credentials file.
 */
import { execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { gunzipSync } from 'node:zlib';
import * as tar from 'tar';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageStore } from '../agent/runtime/images.js';
import { MEDIA_TYPES, RegistryClient, loadCredentials, parseReference, pull, push, resolve, type ProgressEvent } from '../agent/runtime/registry/index.js';
import { CLI, cli, isRoot } from './helpers/procs.js';
import { startCutProxy, startRegistry, type CutProxy, type TestRegistry } from './helpers/registry.js';
import { freePort } from './helpers/wait.js';

const execFileP = promisify(execFile);
const sha = (b: Buffer | string): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

interface Blob {
  bytes: Buffer;
  digest: string;
}
interface Layer extends Blob {
  diffId: string;
}
interface TestImage {
  layers: Layer[];
  config: Blob;
  manifest: Blob;
}

/** A gzip layer holding these files (random contents make it incompressible). */
async function makeLayer(work: string, files: Record<string, Buffer | string>): Promise<Layer> {
  const dir = await fs.mkdtemp(path.join(work, 'layer-'));
  for (const [name, data] of Object.entries(files)) {
    await fs.mkdir(path.dirname(path.join(dir, name)), { recursive: true });
    await fs.writeFile(path.join(dir, name), data);
  }
  const file = `${dir}.tgz`;
  await tar.c({ cwd: dir, file, gzip: true, portable: true }, ['.']);
  const bytes = await fs.readFile(file);
  await fs.rm(dir, { recursive: true });
  await fs.rm(file);
  return { bytes, digest: sha(bytes), diffId: sha(gunzipSync(bytes)) };
}

function makeImage(layers: Layer[], arch = 'amd64', cmd = ['sh']): TestImage {
  const config = Buffer.from(
    JSON.stringify({ created: '2025-01-01T00:00:00Z', architecture: arch, os: 'linux', config: { Cmd: cmd, Env: ['PATH=/bin'] }, rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) } }),
  );
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.ociManifest,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha(config), size: config.length },
      layers: layers.map((l) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: l.digest, size: l.bytes.length })),
    }),
  );
  return { layers, config: { bytes: config, digest: sha(config) }, manifest: { bytes: manifest, digest: sha(manifest) } };
}

/** Writes an OCI image layout with one image tagged `tag`. */
async function writeLayout(dir: string, img: TestImage, tag: string): Promise<void> {
  await fs.mkdir(path.join(dir, 'blobs/sha256'), { recursive: true });
  for (const b of [...img.layers, img.config, img.manifest]) await fs.writeFile(path.join(dir, 'blobs/sha256', b.digest.slice(7)), b.bytes);
  await fs.writeFile(path.join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
  await fs.writeFile(
    path.join(dir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: MEDIA_TYPES.ociManifest, digest: img.manifest.digest, size: img.manifest.bytes.length, annotations: { 'org.opencontainers.image.ref.name': tag } }],
    }),
  );
}

/** Uploads an image's blobs and manifest with the client (tag or by digest). */
async function uploadImage(c: RegistryClient, repo: string, img: TestImage, reference: string): Promise<void> {
  for (const b of [...img.layers, img.config]) {
    if (await c.hasBlob(repo, b.digest)) continue;
    await c.uploadBlob(repo, b.digest, b.bytes.length, (s, e) => Readable.from([b.bytes.subarray(s, e)]));
  }
  await c.putManifest(repo, reference, img.manifest.bytes, MEDIA_TYPES.ociManifest);
}

async function storeFiles(dataDir: string): Promise<string[]> {
  return (await fs.readdir(path.join(dataDir, 'content/blobs/sha256'))).sort();
}

/** Runs the CLI with stdin (for --password-stdin). */
function cliStdin(args: string[], input: string, env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolveP) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const t = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('close', (code) => {
      clearTimeout(t);
      resolveP({ code: code ?? 1, stdout, stderr });
    });
    child.stdin.end(input);
  });
}

const USER = 'alice';
const PASSWORD = `pw-${randomBytes(6).toString('hex')}`;

describe.skipIf(!isRoot())('registry client against docker-registry (needs root for layer unpacking)', () => {
  let work: string;
  let basic: TestRegistry;
  let token: TestRegistry;
  let proxy: CutProxy;
  let base: Layer;
  let big: Layer;
  let mid: Layer;
  let appA: TestImage;
  let appB: TestImage;
  let srcStore: ImageStore;
  const auth = { username: USER, password: PASSWORD };
  const env = (): NodeJS.ProcessEnv => ({ FLOTILLA_CONFIG: path.join(work, 'userconf') });

  beforeAll(async () => {
    work = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-regtest-'));
    [basic, token] = await Promise.all([startRegistry({ auth: 'htpasswd', users: { [USER]: PASSWORD } }), startRegistry({ auth: 'token', users: { [USER]: PASSWORD } })]);
    proxy = await startCutProxy(basic.host);
    base = await makeLayer(work, { 'bin/tool': randomBytes(300_000), 'etc/os-release': 'NAME=test\n' });
    big = await makeLayer(work, { 'data/big': randomBytes(2_000_000) });
    mid = await makeLayer(work, { 'data/mid': randomBytes(700_000) });
    appA = makeImage([base, big, await makeLayer(work, { 'app/a.txt': 'A\n' })]);
    appB = makeImage([base, mid, await makeLayer(work, { 'app/b.txt': 'B\n' })]);
    // the source store: both images imported from OCI layouts, then pushed by flotilla
    srcStore = await ImageStore.open(path.join(work, 'src'));
    for (const [name, img] of [['app-a:1', appA], ['app-b:1', appB]] as const) {
      const layout = path.join(work, `layout-${name.replace(':', '-')}`);
      await writeLayout(layout, img, '1');
      const rec = await srcStore.import(name, layout);
      expect(rec.digest).toBe(img.manifest.digest);
    }
  }, 60_000);

  afterAll(async () => {
    await proxy?.stop();
    await Promise.all([basic?.stop(), token?.stop()]);
    if (work) await fs.rm(work, { recursive: true, force: true });
  });

  it('pushes to a basic-auth registry (monolithic), skopeo reads it back byte for byte', async () => {
    await srcStore.tag('app-a:1', `${basic.host}/team/app:1`);
    const events: ProgressEvent[] = [];
    const r = await push(`${basic.host}/team/app:1`, srcStore, { auth, onProgress: (e) => events.push(e) });
    expect(r.digest).toBe(appA.manifest.digest);
    expect(r.uploaded).toBe(appA.layers.reduce((n, l) => n + l.bytes.length, 0) + appA.config.bytes.length);
    expect(events.filter((e) => e.status === 'pushed').length).toBe(4);
    const out = path.join(work, 'skopeo-out');
    await execFileP('skopeo', ['copy', '--src-tls-verify=false', '--src-creds', `${USER}:${PASSWORD}`, `docker://${basic.host}/team/app:1`, `dir:${out}`]);
    const m = await fs.readFile(path.join(out, 'manifest.json'));
    expect(sha(m)).toBe(appA.manifest.digest);
    expect(sha(await fs.readFile(path.join(out, big.digest.slice(7))))).toBe(big.digest);
    // a second push uploads nothing: every blob is there (HEAD)
    const again = await push(`${basic.host}/team/app:1`, srcStore, { auth });
    expect(again.uploaded).toBe(0);
  });

  it('pulls through a proxy that cuts the big layer mid-transfer: resumed with Range, verified, unpacked', async () => {
    proxy.cut(big.digest, 700_000);
    const dataDir = path.join(work, 'n1');
    const store = await ImageStore.open(dataDir);
    const res = await pull(`${proxy.host}/team/app:1`, store, { auth });
    expect(res.record.digest).toBe(appA.manifest.digest);
    expect(res.record.name).toBe(`${proxy.host}/team/app:1`);
    const bigReqs = proxy.requests.filter((q) => q.digest === big.digest);
    expect(bigReqs.length).toBe(2);
    expect(bigReqs[1]?.range).toMatch(/^bytes=\d+-$/);
    expect(Number(/=(\d+)-/.exec(bigReqs[1]!.range!)![1])).toBeGreaterThan(0);
    const paths = await store.layerPaths(res.record.name);
    expect((await fs.stat(path.join(paths[1]!, 'data/big'))).size).toBe(2_000_000);
    expect(await fs.readFile(path.join(paths[2]!, 'app/a.txt'), 'utf8')).toBe('A\n');
    // by digest, the same store: nothing is fetched, the image is found under name@digest
    const before = proxy.requests.length;
    const byDigest = await pull(`${proxy.host}/team/app@${appA.manifest.digest}`, store, { auth });
    expect(byDigest.record.name).toBe(`${proxy.host}/team/app@${appA.manifest.digest}`);
    expect(proxy.requests.length).toBe(before);
    expect((await store.get(`${proxy.host}/team/app:1@${appA.manifest.digest}`)).digest).toBe(appA.manifest.digest);
  });

  it('skips layers already present: pulling app-b after app-a fetches only its own layers', async () => {
    await srcStore.tag('app-b:1', `${basic.host}/team/app:2`);
    const pushed = await push(`${basic.host}/team/app:2`, srcStore, { auth, chunkSize: 256 * 1024 });
    // base was already there; mid went up in PATCH chunks
    expect(pushed.uploaded).toBe(mid.bytes.length + appB.layers[2]!.bytes.length + appB.config.bytes.length);
    const store = await ImageStore.open(path.join(work, 'n1'));
    const before = proxy.requests.length;
    const events: ProgressEvent[] = [];
    const res = await pull(`${proxy.host}/team/app:2`, store, { auth, onProgress: (e) => events.push(e) });
    expect(res.record.digest).toBe(appB.manifest.digest);
    const fetched = proxy.requests.slice(before).map((q) => q.digest);
    expect(fetched).not.toContain(base.digest);
    expect(fetched).toContain(mid.digest);
    expect(events.find((e) => e.id === base.digest && e.status === 'exists')).toBeDefined();
    expect(events.find((e) => e.id === mid.digest && e.status === 'complete')).toBeDefined();
  });

  it('refuses a corrupted blob: one clear error, nothing of it left in the store', async () => {
    const dataDir = path.join(work, 'n-corrupt');
    const store = await ImageStore.open(dataDir);
    proxy.corrupt(mid.digest);
    await expect(pull(`${proxy.host}/team/app:2`, store, { auth })).rejects.toThrow(/blob sha256:[a-f0-9]{64} of team\/app refused: content digest mismatch/);
    expect(await store.list()).toEqual([]);
    expect(await storeFiles(dataDir)).not.toContain(mid.digest.slice(7));
    expect(await store.content.has(mid.digest)).toBe(false);
  });

  it('a corrupted blob unpacked while it streams in: the finished unpack is discarded, no layer dir, temp dir or blob left', async () => {
    // an uncompressed tar layer: the flipped byte lands in file data, so the unpack itself succeeds and
    // only the blob digest check (at the end of the stream) can refuse it
    const dir = await fs.mkdtemp(path.join(work, 'plain-'));
    await fs.mkdir(path.join(dir, 'data'));
    await fs.writeFile(path.join(dir, 'data/plain'), randomBytes(600_000));
    const file = `${dir}.tar`;
    await tar.c({ cwd: dir, file, portable: true }, ['.']);
    const bytes = await fs.readFile(file);
    const plain: Layer = { bytes, digest: sha(bytes), diffId: sha(bytes) };
    const img = makeImage([plain]);
    await uploadImage(new RegistryClient(basic.host, { auth }), 'team/plain', img, '1');
    const dataDir = path.join(work, 'n-corrupt-plain');
    const store = await ImageStore.open(dataDir);
    proxy.corrupt(plain.digest);
    await expect(pull(`${proxy.host}/team/plain:1`, store, { auth })).rejects.toThrow(/blob sha256:[a-f0-9]{64} of team\/plain refused: content digest mismatch/);
    expect(await store.list()).toEqual([]);
    expect(await store.layers.has(plain.digest)).toBe(false);
    expect(await fs.readdir(store.layers.root)).toEqual([]);
    expect(await fs.readdir(store.content.ingestDir)).toEqual([]);
    expect(await store.content.has(plain.digest)).toBe(false);
  });

  it('a layer that is not a tar archive (digest right): refused, nothing of it left behind', async () => {
    const junk = Buffer.concat([Buffer.from([0x1f, 0x8b]), randomBytes(4000)]);
    const img = makeImage([{ bytes: junk, digest: sha(junk), diffId: sha(junk) }]);
    await uploadImage(new RegistryClient(basic.host, { auth }), 'team/junk', img, '1');
    const dataDir = path.join(work, 'n-junk');
    const store = await ImageStore.open(dataDir);
    await expect(pull(`${basic.host}/team/junk:1`, store, { auth })).rejects.toThrow(/layer sha256:[a-f0-9]{64}: corrupt gzip data/);
    expect(await store.list()).toEqual([]);
    expect(await fs.readdir(store.layers.root)).toEqual([]);
    expect(await fs.readdir(store.content.ingestDir)).toEqual([]);
    expect(await storeFiles(dataDir)).toEqual([]);
  });

  it('multi-platform: an index built here is pushed to the token registry; each platform pulls its own manifest', async () => {
    const arm = makeImage([base, await makeLayer(work, { 'arch.txt': 'arm64\n' })], 'arm64');
    const amd = makeImage([base, await makeLayer(work, { 'arch.txt': 'amd64\n' })], 'amd64');
    const c = new RegistryClient(token.host, { auth });
    await uploadImage(c, 'multi', arm, arm.manifest.digest);
    await uploadImage(c, 'multi', amd, amd.manifest.digest);
    const index = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA_TYPES.ociIndex,
        manifests: [
          { mediaType: MEDIA_TYPES.ociManifest, digest: arm.manifest.digest, size: arm.manifest.bytes.length, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
          { mediaType: MEDIA_TYPES.ociManifest, digest: amd.manifest.digest, size: amd.manifest.bytes.length, platform: { os: 'linux', architecture: 'amd64' } },
        ],
      }),
    );
    await c.putManifest('multi', 'v1', index, MEDIA_TYPES.ociIndex);
    // the client got bearer tokens from the issuer, with credentials, for push
    expect(token.tokenRequests.some((t) => t.user === USER && t.scope === 'repository:multi:pull,push')).toBe(true);

    const r = await resolve(`${token.host}/multi:v1`, { auth, platform: { os: 'linux', architecture: 'arm64' } });
    expect(r.digest).toBe(sha(index));
    expect(r.manifestDigest).toBe(arm.manifest.digest);
    const store = await ImageStore.open(path.join(work, 'n-multi'));
    const a = await pull(`${token.host}/multi:v1`, store, { auth, platform: { os: 'linux', architecture: 'amd64' } });
    expect(a.digest).toBe(sha(index));
    expect(a.record.digest).toBe(amd.manifest.digest);
    expect(a.record.repoDigests).toEqual([`${token.host}/multi@${sha(index)}`]);
    const paths = await store.layerPaths(a.record.name);
    expect(await fs.readFile(path.join(paths[1]!, 'arch.txt'), 'utf8')).toBe('amd64\n');
    // the pinned reference (tag@index digest) finds the pulled image
    expect((await store.get(`${token.host}/multi:v1@${sha(index)}`)).digest).toBe(amd.manifest.digest);
    const b = await pull(`${token.host}/multi:v1`, store, { auth, name: `${token.host}/multi:arm`, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } });
    expect(b.record.digest).toBe(arm.manifest.digest);
    await expect(resolve(`${token.host}/multi:v1`, { auth, platform: { os: 'linux', architecture: 's390x' } })).rejects.toThrow(
      /has no manifest for linux\/s390x \(it has: linux\/arm64\/v8, linux\/amd64\)/,
    );
  });

  it('token auth: anonymous pull of a public repository; private ones need credentials', async () => {
    await srcStore.tag('app-a:1', `${token.host}/public/app:1`);
    await push(`${token.host}/public/app:1`, srcStore, { auth });
    const store = await ImageStore.open(path.join(work, 'n-anon'));
    const n = token.tokenRequests.length;
    const res = await pull(`${token.host}/public/app:1`, store);
    expect(res.record.digest).toBe(appA.manifest.digest);
    expect(token.tokenRequests.slice(n).every((t) => t.user === '')).toBe(true);
    await expect(pull(`${token.host}/multi:v1`, store)).rejects.toThrow(`registry ${token.host}: authentication required (run: flotilla image login ${token.host})`);
    await expect(pull(`${token.host}/multi:v1`, store, { auth: { username: USER, password: 'wrong' } })).rejects.toThrow(`registry ${token.host}: incorrect username or password`);
  });

  it('skopeo pushes an OCI layout, flotilla pulls it', async () => {
    const img = makeImage([base, await makeLayer(work, { 'from-skopeo': 'yes\n' })]);
    const layout = path.join(work, 'layout-skopeo');
    await writeLayout(layout, img, 'x');
    await execFileP('skopeo', ['copy', '--dest-tls-verify=false', '--dest-creds', `${USER}:${PASSWORD}`, `oci:${layout}:x`, `docker://${basic.host}/from/skopeo:x`]);
    const store = await ImageStore.open(path.join(work, 'n-skopeo'));
    const res = await pull(`${basic.host}/from/skopeo:x`, store, { auth });
    // skopeo may rewrite the manifest (e.g. annotations); the layers and config are what they were
    expect(res.record.layers).toEqual(img.layers.map((l) => l.digest));
    expect(res.record.configDigest).toBe(img.config.digest);
  });

  it('CLI: login (password on stdin) stores 0600 credentials, pull/push/tag use them, logout removes them', async () => {
    const dataDir = path.join(work, 'n-cli');
    const bad = await cliStdin(['image', 'login', '-u', USER, '--password-stdin', basic.host], 'nope\n', env());
    expect(bad.code).not.toBe(0);
    expect(bad.stderr.trim()).toBe(`flotilla: registry ${basic.host}: incorrect username or password`);
    const denied = await cli(['image', 'pull', '--data-dir', dataDir, `${basic.host}/team/app:1`], env());
    expect(denied.code).not.toBe(0);
    expect(denied.stderr.trim()).toBe(`flotilla: registry ${basic.host}: authentication required (run: flotilla image login ${basic.host})`);

    const ok = await cliStdin(['image', 'login', '-u', USER, '--password-stdin', basic.host], `${PASSWORD}\n`, env());
    expect(ok.stderr).toBe('');
    expect(ok.stdout).toBe('Login Succeeded\n');
    const file = path.join(work, 'userconf', 'config.json');
    expect((await fs.stat(file)).mode & 0o777).toBe(0o600);
    const saved = JSON.parse(await fs.readFile(file, 'utf8')) as { auths: Record<string, { auth: string }> };
    expect(Buffer.from(saved.auths[basic.host]!.auth, 'base64').toString()).toBe(`${USER}:${PASSWORD}`);
    expect(await loadCredentials(basic.host, file)).toEqual({ username: USER, password: PASSWORD });

    const pulled = await cli(['image', 'pull', '--data-dir', dataDir, `${basic.host}/team/app:1`], env());
    expect(pulled.stderr).toBe('');
    expect(pulled.code).toBe(0);
    expect(pulled.stdout).toContain(`Digest: ${appA.manifest.digest}`);
    expect(pulled.stdout).toContain(`${big.digest.slice(7, 19)}: Pull complete`);
    expect(pulled.stdout).not.toContain(PASSWORD);
    const tagged = await cli(['image', 'tag', '--data-dir', dataDir, `${basic.host}/team/app:1`, `${basic.host}/team/app:7`], env());
    expect(tagged.code).toBe(0);
    const pushed = await cli(['image', 'push', '--data-dir', dataDir, `${basic.host}/team/app:7`], env());
    expect(pushed.stderr).toBe('');
    expect(pushed.stdout).toContain(`${big.digest.slice(7, 19)}: Layer already exists`);
    expect(pushed.stdout).toContain(`7: digest: ${appA.manifest.digest}`);

    const out = await cli(['image', 'logout', basic.host], env());
    expect(out.stdout).toBe(`Removing login credentials for ${basic.host}\n`);
    expect(await loadCredentials(basic.host, file)).toBeUndefined();
  });

  it('CLI: a loopback registry on HTTPS is spoken to over TLS, trusting only a known CA', async () => {
    const tls = await startRegistry({ tls: true });
    try {
      const dataDir = path.join(work, 'n-cli');
      const trusted = { ...env(), NODE_EXTRA_CA_CERTS: tls.caFile! };
      expect((await cli(['image', 'tag', '--data-dir', dataDir, `${basic.host}/team/app:1`, `${tls.host}/app:1`], trusted)).code).toBe(0);
      const pushed = await cli(['image', 'push', '-q', '--data-dir', dataDir, `${tls.host}/app:1`], trusted);
      expect(pushed.stderr).toBe('');
      expect(pushed.stdout.trim()).toBe(appA.manifest.digest);
      const pulled = await cli(['image', 'pull', '-q', '--data-dir', path.join(work, 'n-tls'), `${tls.host}/app:1`], trusted);
      expect(pulled.stderr).toBe('');
      expect(pulled.code).toBe(0);
      // an untrusted certificate is an error, never a reason to fall back to plain HTTP
      const untrusted = await cli(['image', 'pull', '-q', '--data-dir', path.join(work, 'n-tls2'), `${tls.host}/app:1`], env());
      expect(untrusted.code).not.toBe(0);
      expect(untrusted.stderr.trim()).toBe(`flotilla: registry ${tls.host}: cannot reach ${tls.host}: self-signed certificate`);
    } finally {
      await tls.stop();
    }
  });

  it('CLI: a bad reference, an unknown registry, an unknown tag each give one clear line', async () => {
    const dataDir = path.join(work, 'n-err');
    const badRef = await cli(['image', 'pull', '--data-dir', dataDir, 'Team/App:1'], env());
    expect(badRef.code).not.toBe(0);
    expect(badRef.stderr.trim().split('\n')).toHaveLength(1);
    expect(badRef.stderr).toMatch(/^flotilla: invalid image reference "Team\/App:1": the name must be lowercase/);
    const port = await freePort();
    const down = await cli(['image', 'pull', '--data-dir', dataDir, `127.0.0.1:${port}/app:1`], env());
    expect(down.code).not.toBe(0);
    expect(down.stderr.trim()).toBe(`flotilla: registry 127.0.0.1:${port}: cannot reach 127.0.0.1:${port}: connect ECONNREFUSED 127.0.0.1:${port}`);
    const missing = await cli(['image', 'pull', '--data-dir', dataDir, `${token.host}/public/app:nope`], env());
    expect(missing.code).not.toBe(0);
    expect(missing.stderr.trim()).toBe(`flotilla: registry ${token.host}: manifest public/app:nope not found`);
    expect(parseReference('localhost:5000/a/b:c')).toEqual({ registry: 'localhost:5000', repository: 'a/b', tag: 'c' });
    expect(parseReference('busybox')).toEqual({ registry: 'docker.io', repository: 'library/busybox', tag: 'latest' });
  });
});
