/**
 * The HTTP side of the OCI distribution API for one registry, over Node's built-in fetch (undici):
 * authentication (bearer tokens answering WWW-Authenticate, anonymous or with credentials; basic auth),
 * manifests, blob downloads that resume with HTTP Range after an interrupted transfer, blob existence
 * checks and uploads (monolithic or chunked). Digests are checked by the callers (index.ts) as the
 * bytes are stored.
 *
 * HTTPS verifies against Node's trust store (bundled roots plus NODE_EXTRA_CA_CERTS; the OS store with
 * `node --use-openssl-ca`, see docs/images.md). Plain HTTP is used only for registries the caller marks
 * insecure (--insecure-registry), and for loopback registries (localhost, 127.0.0.0/8, [::1]) whose port
 * answers a TLS handshake with plain HTTP (HTTPS is tried first; a certificate error is not a reason to
 * fall back).
 */
import { Readable } from 'node:stream';
import { FlotillaError, errorMessage } from '../../../common/errors.js';
import type { Credentials } from './credentials.js';
import { apiHost, isLoopbackRegistry } from './reference.js';

export const MEDIA_TYPES = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerV1Signed: 'application/vnd.docker.distribution.manifest.v1+prettyjws',
  dockerV1: 'application/vnd.docker.distribution.manifest.v1+json',
} as const;

export const MANIFEST_ACCEPT = [MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerList, MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest].join(', ');

/** Blob bytes are handed to the content store in chunks of at least this size. */
const COALESCE_BYTES = 1 << 20;

/** Largest manifest or index accepted (the registry's own limit is 4 MiB). */
export const MAX_MANIFEST_BYTES = 4 << 20;

export interface ClientOptions {
  /** credentials for this registry (none: anonymous) */
  auth?: Credentials;
  /** plain HTTP for this registry: true, or the list of --insecure-registry names it must be in */
  insecure?: boolean | string[];
  signal?: AbortSignal;
  /** attempts per blob transfer after interruptions (default 5) */
  retries?: number;
}

interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

/** Parses a WWW-Authenticate header (one challenge: `Bearer realm="...",service="...",scope="..."`). */
export function parseChallenge(header: string | null): Challenge | undefined {
  if (!header) return undefined;
  const m = /^\s*([A-Za-z]+)\s*(.*)$/s.exec(header);
  if (!m?.[1]) return undefined;
  const params: Record<string, string> = {};
  const re = /([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))\s*,?\s*/g;
  let p;
  while ((p = re.exec(m[2] ?? '')) !== null) params[(p[1] ?? '').toLowerCase()] = (p[2] ?? p[3] ?? '').replace(/\\(.)/g, '$1');
  return { scheme: m[1].toLowerCase(), params };
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason as Error);
    const t = setTimeout(resolve, ms);
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(t);
        reject(signal.reason as Error);
      },
      { once: true },
    );
  });
}

/** The text of a registry's error body ({"errors":[{"code","message"}]}), or the HTTP status. */
async function registryReason(res: Response): Promise<string> {
  let text = '';
  try {
    text = (await res.text()).slice(0, 4096);
  } catch {
    // body unreadable
  }
  try {
    const body = JSON.parse(text) as { errors?: { code?: string; message?: string }[] };
    const parts = (body.errors ?? []).map((e) => [e.code, e.message].filter(Boolean).join(': '));
    if (parts.length > 0) return parts.join('; ');
  } catch {
    // not JSON
  }
  return `HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''}`;
}

/** The root cause of a fetch failure ("connect ECONNREFUSED 127.0.0.1:5999", "getaddrinfo ENOTFOUND x"). */
export function networkReason(err: unknown): string {
  let e: unknown = err;
  for (let i = 0; i < 4 && e instanceof Error && e.cause !== undefined; i++) e = e.cause;
  return errorMessage(e);
}

/** The error of a TLS handshake with a server that speaks plain HTTP. */
function isPlainHttpServer(err: unknown): boolean {
  let e: unknown = err;
  for (let i = 0; i < 5 && e instanceof Error; i++) {
    if ((e as NodeJS.ErrnoException).code === 'ERR_SSL_WRONG_VERSION_NUMBER') return true;
    e = e.cause;
  }
  return false;
}

export class RegistryClient {
  private scheme: 'https' | 'http';
  /** a loopback registry not named insecure: HTTPS first, HTTP when its port speaks plain HTTP (as Docker) */
  private probing: boolean;
  private readonly tokens = new Map<string, string>();
  private basicAuth = false;

  constructor(
    readonly registry: string,
    private readonly opts: ClientOptions = {},
  ) {
    const insecure = opts.insecure === true || (Array.isArray(opts.insecure) && opts.insecure.includes(registry));
    this.probing = !insecure && isLoopbackRegistry(registry);
    this.scheme = insecure ? 'http' : 'https';
  }

  /** "https://host:port" (or http: for insecure and plain-HTTP loopback registries) */
  get base(): string {
    return `${this.scheme}://${apiHost(this.registry)}`;
  }

  get signal(): AbortSignal | undefined {
    return this.opts.signal;
  }

  private fail(code: FlotillaError['code'], why: string): FlotillaError {
    return new FlotillaError(code, `registry ${this.registry}: ${why}`);
  }

  private authorization(scope: string): string | undefined {
    const t = this.tokens.get(scope);
    if (t) return `Bearer ${t}`;
    if (this.basicAuth && this.opts.auth) return `Basic ${Buffer.from(`${this.opts.auth.username}:${this.opts.auth.password}`).toString('base64')}`;
    return undefined;
  }

  private async send(url: string, init: RequestInit, scope: string): Promise<Response> {
    const headers = new Headers(init.headers);
    const auth = this.authorization(scope);
    if (auth) headers.set('authorization', auth);
    headers.set('user-agent', 'flotilla');
    try {
      const res = await fetch(url, { ...init, headers, signal: this.opts.signal ?? null, redirect: 'follow' });
      if (url.startsWith(`${this.base}/`)) this.probing = false;
      return res;
    } catch (err) {
      if (this.opts.signal?.aborted) throw err;
      if (this.probing && this.scheme === 'https' && url.startsWith(`${this.base}/`) && isPlainHttpServer(err)) {
        this.probing = false;
        this.scheme = 'http';
        return this.send(`http://${url.slice('https://'.length)}`, init, scope);
      }
      throw this.fail('UNAVAILABLE', `cannot reach ${new URL(url).host}: ${networkReason(err)}`);
    }
  }

  /**
   * One request to the registry; on 401 answers the challenge (bearer token for scope, or basic auth)
   * and retries once. A body that is a stream cannot be replayed: make an authenticated request in the
   * same scope first (uploads start with a POST).
   */
  async request(pathOrUrl: string, init: RequestInit, scope: string): Promise<Response> {
    // built again for the retry: the first send may have settled a loopback registry on plain HTTP
    const url = (): string => (pathOrUrl.startsWith('http') ? pathOrUrl : `${this.base}${pathOrUrl}`);
    let res = await this.send(url(), init, scope);
    if (res.status !== 401) return res;
    const challenge = parseChallenge(res.headers.get('www-authenticate'));
    await res.body?.cancel().catch(() => undefined);
    if (!challenge) throw this.fail('PERMISSION_DENIED', 'unauthorized (401) without an authentication challenge');
    if (challenge.scheme === 'basic') {
      if (!this.opts.auth) throw this.fail('PERMISSION_DENIED', `authentication required (run: flotilla image login ${this.registry})`);
      if (this.basicAuth) throw this.fail('PERMISSION_DENIED', 'incorrect username or password');
      this.basicAuth = true;
    } else if (challenge.scheme === 'bearer') {
      this.tokens.set(scope, await this.fetchToken(challenge, scope));
    } else {
      throw this.fail('PERMISSION_DENIED', `unsupported authentication scheme ${JSON.stringify(challenge.scheme)}`);
    }
    res = await this.send(url(), init, scope);
    if (res.status === 401) {
      await res.body?.cancel().catch(() => undefined);
      if (!this.opts.auth) throw this.fail('PERMISSION_DENIED', `authentication required (run: flotilla image login ${this.registry})`);
      throw this.fail('PERMISSION_DENIED', challenge.scheme === 'basic' ? 'incorrect username or password' : `access denied${scope ? ` (${scope})` : ''}`);
    }
    return res;
  }

  /** GET realm?service&scope (with basic credentials when we have them) -> the bearer token. */
  private async fetchToken(ch: Challenge, scope: string): Promise<string> {
    const realm = ch.params.realm;
    if (!realm) throw this.fail('PERMISSION_DENIED', 'bearer challenge without a realm');
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw this.fail('PERMISSION_DENIED', `bearer challenge with an invalid realm ${JSON.stringify(realm)}`);
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') throw this.fail('PERMISSION_DENIED', `token realm ${realm} is not http(s)`);
    if (url.protocol === 'http:' && this.opts.auth && this.base.startsWith('https:') && !isLoopbackRegistry(url.host)) {
      throw this.fail('PERMISSION_DENIED', `refusing to send credentials to a plain-HTTP token service ${url.host}`);
    }
    if (ch.params.service) url.searchParams.set('service', ch.params.service);
    const scopes = new Set<string>();
    if (scope) scopes.add(scope);
    if (ch.params.scope) for (const s of ch.params.scope.split(' ')) if (s) scopes.add(s);
    for (const s of scopes) url.searchParams.append('scope', s);
    const headers = new Headers({ 'user-agent': 'flotilla' });
    if (this.opts.auth) headers.set('authorization', `Basic ${Buffer.from(`${this.opts.auth.username}:${this.opts.auth.password}`).toString('base64')}`);
    let res: Response;
    try {
      res = await fetch(url, { headers, signal: this.opts.signal ?? null });
    } catch (err) {
      if (this.opts.signal?.aborted) throw err;
      throw this.fail('UNAVAILABLE', `cannot reach the token service ${url.host}: ${networkReason(err)}`);
    }
    if (res.status === 401 || res.status === 403) {
      await res.body?.cancel().catch(() => undefined);
      throw this.fail('PERMISSION_DENIED', this.opts.auth ? 'incorrect username or password' : `authentication required (run: flotilla image login ${this.registry})`);
    }
    if (!res.ok) throw this.fail('UNAVAILABLE', `token service ${url.host}: ${await registryReason(res)}`);
    let body: { token?: string; access_token?: string };
    try {
      body = (await res.json()) as typeof body;
    } catch (err) {
      throw this.fail('UNAVAILABLE', `token service ${url.host} sent invalid JSON: ${errorMessage(err)}`);
    }
    const token = body.token ?? body.access_token;
    if (typeof token !== 'string' || token === '') throw this.fail('UNAVAILABLE', `token service ${url.host} sent no token`);
    return token;
  }

  /** Throws the registry's reason for a failed response, with a code matching the status. */
  async failed(res: Response, what: string): Promise<never> {
    const reason = await registryReason(res);
    const code = res.status === 404 ? 'NOT_FOUND' : res.status === 403 || res.status === 401 ? 'PERMISSION_DENIED' : res.status === 400 ? 'INVALID_ARGUMENT' : 'UNAVAILABLE';
    throw this.fail(code, `${what}: ${reason}`);
  }

  /** Checks that the registry answers the v2 API with these credentials (`image login`). */
  async ping(): Promise<void> {
    const res = await this.request('/v2/', { method: 'GET' }, '');
    if (!res.ok) await this.failed(res, 'GET /v2/');
    await res.body?.cancel().catch(() => undefined);
  }

  /** GET a manifest by tag or digest: the raw bytes (at most 4 MiB) and the media type the registry gave. */
  async getManifest(repository: string, reference: string): Promise<{ bytes: Buffer; mediaType: string; headerDigest?: string }> {
    const res = await this.request(`/v2/${repository}/manifests/${reference}`, { method: 'GET', headers: { accept: MANIFEST_ACCEPT } }, `repository:${repository}:pull`);
    if (res.status === 404) {
      await res.body?.cancel().catch(() => undefined);
      throw this.fail('NOT_FOUND', `manifest ${repository}:${reference} not found`);
    }
    if (!res.ok) await this.failed(res, `manifest ${repository}:${reference}`);
    const len = Number(res.headers.get('content-length') ?? '0');
    if (len > MAX_MANIFEST_BYTES) {
      await res.body?.cancel().catch(() => undefined);
      throw this.fail('INVALID_ARGUMENT', `manifest ${repository}:${reference} is larger than ${MAX_MANIFEST_BYTES} bytes`);
    }
    const chunks: Buffer[] = [];
    let n = 0;
    for await (const c of res.body ?? []) {
      n += (c as Uint8Array).length;
      if (n > MAX_MANIFEST_BYTES) throw this.fail('INVALID_ARGUMENT', `manifest ${repository}:${reference} is larger than ${MAX_MANIFEST_BYTES} bytes`);
      chunks.push(Buffer.from(c as Uint8Array));
    }
    const mediaType = (res.headers.get('content-type') ?? '').split(';')[0]?.trim() ?? '';
    const headerDigest = res.headers.get('docker-content-digest') ?? undefined;
    return { bytes: Buffer.concat(chunks), mediaType, ...(headerDigest ? { headerDigest } : {}) };
  }

  /**
   * The bytes of a blob, as a stream of chunks. An interrupted transfer is resumed where it stopped with a
   * Range request (a server that ignores Range sends the whole blob again; the bytes already received are
   * skipped), up to opts.retries times. onBytes reports the bytes received so far. The caller verifies the
   * digest and size of what it receives.
   */
  async *blob(repository: string, digest: string, size: number, onBytes?: (n: number) => void): AsyncGenerator<Buffer> {
    const scope = `repository:${repository}:pull`;
    const maxRetries = this.opts.retries ?? 5;
    let got = 0;
    let failures = 0;
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    for (;;) {
      const headers: Record<string, string> = {};
      if (got > 0) headers.range = `bytes=${got}-`;
      let res: Response;
      try {
        res = await this.request(`/v2/${repository}/blobs/${digest}`, { method: 'GET', headers }, scope);
      } catch (err) {
        // the manifest came from this registry a moment ago: a failed connection is worth retrying
        if (err instanceof FlotillaError && err.code === 'UNAVAILABLE' && failures < maxRetries) {
          failures++;
          await sleep(200 * failures, this.opts.signal);
          continue;
        }
        throw err;
      }
      if (res.status === 404) {
        await res.body?.cancel().catch(() => undefined);
        throw this.fail('NOT_FOUND', `blob ${digest} not found in ${repository}`);
      }
      if (res.status >= 500 && failures < maxRetries) {
        await res.body?.cancel().catch(() => undefined);
        failures++;
        await sleep(200 * failures, this.opts.signal);
        continue;
      }
      if (!res.ok) await this.failed(res, `blob ${digest}`);
      let skip = 0;
      if (got > 0) {
        if (res.status === 206) {
          const start = Number(/bytes\s+(\d+)-/.exec(res.headers.get('content-range') ?? '')?.[1] ?? -1);
          if (start !== got) {
            await res.body?.cancel().catch(() => undefined);
            throw this.fail('UNAVAILABLE', `blob ${digest}: resumed at byte ${start}, expected ${got}`);
          }
        } else {
          skip = got; // the whole blob again
        }
      }
      try {
        for await (const chunk of (res.body ?? []) as AsyncIterable<Uint8Array>) {
          let buf = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
          if (skip > 0) {
            if (buf.length <= skip) {
              skip -= buf.length;
              continue;
            }
            buf = buf.subarray(skip);
            skip = 0;
          }
          got += buf.length;
          onBytes?.(got);
          // hand on chunks of at least 1 MiB: far fewer write calls into the content store than
          // fetch's small chunks (the writes, not the network, bound a pull on a busy machine)
          pending.push(buf);
          pendingBytes += buf.length;
          if (pendingBytes >= COALESCE_BYTES) {
            const out = Buffer.concat(pending, pendingBytes);
            pending = [];
            pendingBytes = 0;
            yield out;
          }
        }
        if (got >= size) {
          if (pendingBytes > 0) yield Buffer.concat(pending, pendingBytes);
          return;
        }
        throw new Error(`connection closed after ${got} of ${size} bytes`);
      } catch (err) {
        if (this.opts.signal?.aborted) throw err;
        if (err instanceof FlotillaError) throw err;
        failures++;
        if (failures > maxRetries) throw this.fail('UNAVAILABLE', `transfer of blob ${digest} failed ${failures} times, last: ${networkReason(err)}`);
        await sleep(100 * failures, this.opts.signal);
      }
    }
  }

  /** Whether the repository has the blob (HEAD). */
  async hasBlob(repository: string, digest: string, scope = `repository:${repository}:pull,push`): Promise<boolean> {
    const res = await this.request(`/v2/${repository}/blobs/${digest}`, { method: 'HEAD' }, scope);
    await res.body?.cancel().catch(() => undefined);
    if (res.status === 200) return true;
    if (res.status === 404) return false;
    return this.failed(res, `HEAD blob ${digest}`);
  }

  private location(res: Response, what: string): string {
    const loc = res.headers.get('location');
    if (!loc) throw this.fail('UNAVAILABLE', `${what}: the registry sent no Location`);
    return new URL(loc, this.base).toString();
  }

  /**
   * Uploads a blob. open(start) returns its bytes from offset start. Monolithic (one PUT) unless
   * chunkSize is given, then PATCH chunks of that size and a final PUT. The registry checks the digest.
   */
  async uploadBlob(
    repository: string,
    digest: string,
    size: number,
    open: (start: number, end: number) => Readable,
    opts: { chunkSize?: number; onBytes?: (n: number) => void } = {},
  ): Promise<void> {
    const scope = `repository:${repository}:pull,push`;
    const start = await this.request(`/v2/${repository}/blobs/uploads/`, { method: 'POST' }, scope);
    if (start.status !== 202) await this.failed(start, `starting the upload of ${digest}`);
    await start.body?.cancel().catch(() => undefined);
    let loc = this.location(start, `starting the upload of ${digest}`);
    const withDigest = (u: string): string => {
      const url = new URL(u);
      url.searchParams.set('digest', digest);
      return url.toString();
    };
    if (!opts.chunkSize || size <= opts.chunkSize) {
      let sent = 0;
      const body = open(0, size);
      body.on('data', (c: Buffer) => opts.onBytes?.((sent += c.length)));
      const res = await this.request(
        withDigest(loc),
        {
          method: 'PUT',
          headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) },
          body: Readable.toWeb(body) as ReadableStream,
          duplex: 'half',
        } as RequestInit,
        scope,
      );
      if (res.status !== 201) await this.failed(res, `uploading ${digest}`);
      await res.body?.cancel().catch(() => undefined);
      return;
    }
    for (let off = 0; off < size; off += opts.chunkSize) {
      const end = Math.min(size, off + opts.chunkSize);
      const parts: Buffer[] = [];
      for await (const c of open(off, end)) parts.push(c as Buffer);
      const chunk = Buffer.concat(parts);
      if (chunk.length !== end - off) throw this.fail('INTERNAL', `blob ${digest}: read ${chunk.length} bytes at ${off}, expected ${end - off}`);
      const res = await this.request(
        loc,
        { method: 'PATCH', headers: { 'content-type': 'application/octet-stream', 'content-range': `${off}-${end - 1}` }, body: chunk },
        scope,
      );
      if (res.status !== 202) await this.failed(res, `uploading ${digest} (bytes ${off}-${end - 1})`);
      await res.body?.cancel().catch(() => undefined);
      loc = this.location(res, `uploading ${digest}`);
      opts.onBytes?.(end);
    }
    const res = await this.request(withDigest(loc), { method: 'PUT', headers: { 'content-length': '0' } }, scope);
    if (res.status !== 201) await this.failed(res, `finishing the upload of ${digest}`);
    await res.body?.cancel().catch(() => undefined);
  }

  /** PUT a manifest (or index) under a tag or digest; returns the digest the registry reports. */
  async putManifest(repository: string, reference: string, bytes: Uint8Array, mediaType: string): Promise<string | undefined> {
    const res = await this.request(
      `/v2/${repository}/manifests/${reference}`,
      { method: 'PUT', headers: { 'content-type': mediaType }, body: bytes },
      `repository:${repository}:pull,push`,
    );
    if (res.status !== 201) await this.failed(res, `putting manifest ${repository}:${reference}`);
    await res.body?.cancel().catch(() => undefined);
    return res.headers.get('docker-content-digest') ?? undefined;
  }
}
