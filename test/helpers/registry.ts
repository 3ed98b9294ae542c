/**
 * A real registry for tests and benchmarks: Debian's docker-registry (distribution 2.8) on loopback with
 * its own config file in a temp dir, over HTTP (or HTTPS with a throwaway certificate: tls), and optionally
 *   - htpasswd basic auth (bcrypt entries made with python3's crypt, the password passed on stdin), or
 *   - token auth: a small token issuer here (HTTP on loopback) that signs ES256 JWTs with a throwaway key
 *     whose self-signed certificate is the registry's rootcertbundle; it stands in for Docker Hub's auth
 *     server, the registry itself is real. Anonymous callers get pull access to repositories under
 *     "public/" only; users get pull and push everywhere.
 *
 *   const reg = await startRegistry({ auth: 'htpasswd', users: { alice: 'pw' } });
 *   reg.host  // "127.0.0.1:PORT"
 *   await reg.stop();  // kills the registry (and issuer), removes the temp dir
 *
 * startCutProxy puts an HTTP proxy in front of a registry that misbehaves on chosen blobs (cuts the first
 * response mid-body, or corrupts every response), to test resume and verification.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createSign, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { freePort, waitFor } from './wait.js';

const execFileP = promisify(execFile);

export const REGISTRY_BIN = process.env.FLOTILLA_REGISTRY_BIN ?? '/usr/bin/docker-registry';

export interface RegistryOptions {
  auth?: 'none' | 'htpasswd' | 'token';
  users?: Record<string, string>;
  /**
   * run inside this network namespace (/run/netns/NAME, e.g. a test bed host's), listening on
   * listenHost:port there; not with token auth (its issuer listens on the root namespace's loopback)
   */
  netns?: string;
  listenHost?: string;
  port?: number;
  /** serve HTTPS with a fresh self-signed certificate for 127.0.0.1 (TestRegistry.caFile) */
  tls?: boolean;
}

export interface TestRegistry {
  host: string;
  port: number;
  dir: string;
  /** token auth only: the token requests the issuer answered ({user, scope}) */
  tokenRequests: { user: string; scope: string }[];
  /** tls only: the certificate to trust (e.g. NODE_EXTRA_CA_CERTS for a CLI process) */
  caFile?: string;
  stop(): Promise<void>;
}

/** A bcrypt htpasswd line for user (python3's crypt with libxcrypt; the password goes over stdin). */
export async function htpasswdLine(user: string, password: string): Promise<string> {
  const py = 'import crypt,sys\npw=sys.stdin.read()\nprint(crypt.crypt(pw, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))';
  const child = spawn('python3', ['-W', 'ignore', '-c', py], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  child.stdin.end(password);
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  const hash = out.trim();
  if (code !== 0 || !hash.startsWith('$2')) throw new Error(`bcrypt via python3 crypt failed: ${err.trim() || hash}`);
  return `${user}:${hash}`;
}

const b64url = (b: Buffer | string): string => Buffer.from(b).toString('base64url');

/** The token issuer: GET /token?service&scope with optional basic auth -> {token} (ES256 JWT with x5c). */
async function startIssuer(dir: string, users: Record<string, string>, log: { user: string; scope: string }[]): Promise<{ port: number; certFile: string; server: http.Server }> {
  const keyFile = path.join(dir, 'issuer.key');
  const certFile = path.join(dir, 'issuer.crt');
  await execFileP('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', keyFile, '-out', certFile, '-days', '1', '-subj', '/CN=flotilla-test-issuer']);
  const key = await fs.readFile(keyFile, 'utf8');
  const der = Buffer.from((await fs.readFile(certFile, 'utf8')).replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    let user = '';
    const auth = req.headers.authorization;
    if (auth?.startsWith('Basic ')) {
      const plain = Buffer.from(auth.slice(6), 'base64').toString();
      const i = plain.indexOf(':');
      const u = plain.slice(0, i);
      if (i <= 0 || users[u] !== plain.slice(i + 1)) {
        res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"incorrect username or password"}');
        return;
      }
      user = u;
    }
    const access: { type: string; name: string; actions: string[] }[] = [];
    for (const scope of url.searchParams.getAll('scope')) {
      log.push({ user, scope });
      const m = /^repository:([^:]+):(.+)$/.exec(scope);
      if (!m?.[1] || !m[2]) continue;
      const wanted = m[2].split(',');
      const allowed = user ? wanted : m[1].startsWith('public/') ? wanted.filter((a) => a === 'pull') : [];
      if (allowed.length > 0) access.push({ type: 'repository', name: m[1], actions: allowed });
    }
    const now = Math.floor(Date.now() / 1000);
    const header = { alg: 'ES256', typ: 'JWT', x5c: [der.toString('base64')] };
    const claims = {
      iss: 'flotilla-test-issuer',
      sub: user,
      aud: url.searchParams.get('service') ?? '',
      exp: now + 300,
      nbf: now - 10,
      iat: now,
      jti: randomBytes(8).toString('hex'),
      access,
    };
    const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    const sig = createSign('SHA256').update(signingInput).sign({ key, dsaEncoding: 'ieee-p1363' });
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: `${signingInput}.${b64url(sig)}`, expires_in: 300 }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as { port: number }).port, certFile, server };
}

export async function startRegistry(opts: RegistryOptions = {}): Promise<TestRegistry> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-registry-'));
  if (opts.netns && opts.auth === 'token') throw new Error('startRegistry: token auth is not available inside a network namespace');
  const port = opts.port ?? (await freePort());
  const listenHost = opts.listenHost ?? '127.0.0.1';
  const users = opts.users ?? {};
  const tokenRequests: { user: string; scope: string }[] = [];
  let issuer: http.Server | undefined;
  let child: ChildProcess | undefined;
  const stop = async (): Promise<void> => {
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child!.once('exit', resolve));
      child.kill('SIGTERM');
      const t = setTimeout(() => child!.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(t);
    }
    if (issuer) await new Promise((resolve) => issuer!.close(resolve));
    await fs.rm(dir, { recursive: true, force: true });
  };
  try {
    let auth = '';
    if (opts.auth === 'htpasswd') {
      const lines = await Promise.all(Object.entries(users).map(([u, p]) => htpasswdLine(u, p)));
      await fs.writeFile(path.join(dir, 'htpasswd'), lines.join('\n') + '\n', { mode: 0o600 });
      auth = `auth:\n  htpasswd:\n    realm: flotilla-test\n    path: ${path.join(dir, 'htpasswd')}\n`;
    } else if (opts.auth === 'token') {
      const iss = await startIssuer(dir, users, tokenRequests);
      issuer = iss.server;
      auth =
        `auth:\n  token:\n    realm: http://127.0.0.1:${iss.port}/token\n    service: flotilla-test-registry\n` +
        `    issuer: flotilla-test-issuer\n    rootcertbundle: ${iss.certFile}\n`;
    }
    let tls = '';
    let caFile: string | undefined;
    if (opts.tls) {
      caFile = path.join(dir, 'tls.crt');
      const keyFile = path.join(dir, 'tls.key');
      await execFileP('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', keyFile, '-out', caFile, '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1']);
      tls = `  tls:\n    certificate: ${caFile}\n    key: ${keyFile}\n`;
    }
    const config =
      `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${path.join(dir, 'data')}\n` +
      `  delete:\n    enabled: true\nhttp:\n  addr: ${listenHost}:${port}\n  secret: ${randomBytes(16).toString('hex')}\n${tls}${auth}`;
    const configFile = path.join(dir, 'config.yml');
    await fs.writeFile(configFile, config, { mode: 0o600 });
    const inNetns = (cmd: string[]): string[] => (opts.netns ? ['nsenter', `--net=/run/netns/${opts.netns}`, '--', ...cmd] : cmd);
    const [bin, ...args] = inNetns([REGISTRY_BIN, 'serve', configFile]);
    const proc = spawn(bin!, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    child = proc;
    let stderr = '';
    proc.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
    await waitFor(
      'docker-registry to answer /v2/',
      async () => {
        if (proc.exitCode !== null) throw new Error(`docker-registry exited ${proc.exitCode}: ${stderr.trim()}`);
        if (opts.netns) {
          // probed from inside the namespace (the root namespace has no route there)
          const probe = `fetch('http://${listenHost}:${port}/v2/').then((r)=>process.exit(r.status===200||r.status===401?0:1),()=>process.exit(1))`;
          const [pb, ...pa] = inNetns([process.execPath, '-e', probe]);
          return execFileP(pb!, pa, { timeout: 10_000 }).then(
            () => true,
            () => false,
          );
        }
        if (opts.tls) {
          // this process does not trust the certificate: wait for the port
          return await new Promise<boolean>((resolve) => {
            const sock = net.connect(port, '127.0.0.1', () => {
              sock.destroy();
              resolve(true);
            });
            sock.on('error', () => resolve(false));
          });
        }
        const res = await fetch(`http://127.0.0.1:${port}/v2/`);
        await res.body?.cancel();
        return res.status === 200 || res.status === 401;
      },
      opts.netns ? 30_000 : 15_000,
      50,
    );
    return { host: `${listenHost}:${port}`, port, dir, tokenRequests, ...(caFile ? { caFile } : {}), stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

export interface CutProxy {
  host: string;
  /** every blob GET seen: digest and Range header */
  requests: { digest: string; range?: string }[];
  /** cut the first response for this digest after this many bytes */
  cut(digest: string, afterBytes: number): void;
  /** flip a byte in every response for this digest */
  corrupt(digest: string): void;
  stop(): Promise<void>;
}

/** An HTTP proxy on loopback in front of target ("127.0.0.1:PORT") that can cut or corrupt blob bodies. */
export async function startCutProxy(target: string): Promise<CutProxy> {
  const cuts = new Map<string, number>();
  const corrupt = new Set<string>();
  const requests: { digest: string; range?: string }[] = [];
  const [thost, tport] = target.split(':');
  const server = http.createServer((req, res) => {
    const digest = /\/blobs\/(sha256:[a-f0-9]{64})$/.exec(req.url ?? '')?.[1];
    if (digest && req.method === 'GET') requests.push({ digest, ...(req.headers.range ? { range: req.headers.range } : {}) });
    const up = http.request({ host: thost, port: Number(tport), method: req.method, path: req.url, headers: req.headers }, (ur) => {
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      const cutAt = digest && req.method === 'GET' && ur.statusCode === 200 ? cuts.get(digest) : undefined;
      if (cutAt !== undefined) cuts.delete(digest!);
      const bad = digest !== undefined && req.method === 'GET' && corrupt.has(digest);
      let sent = 0;
      let flipped = false;
      ur.on('data', (chunk: Buffer) => {
        let c = chunk;
        if (bad && !flipped && c.length > 0) {
          c = Buffer.from(c);
          c[c.length - 1] = (c[c.length - 1] ?? 0) ^ 0xff;
          flipped = true;
        }
        if (cutAt !== undefined && sent + c.length >= cutAt) {
          res.write(c.subarray(0, Math.max(0, cutAt - sent)));
          ur.destroy();
          res.socket?.destroy();
          return;
        }
        sent += c.length;
        res.write(c);
      });
      ur.on('end', () => res.end());
      ur.on('error', () => res.destroy());
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  return {
    host: `127.0.0.1:${port}`,
    requests,
    cut: (d, n) => cuts.set(d, n),
    corrupt: (d) => corrupt.add(d),
    stop: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
