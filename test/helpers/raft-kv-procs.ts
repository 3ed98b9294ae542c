/**
 * Spawning and talking to raft-kv processes (test/helpers/raft-kv.ts, run from dist/), for
 * test/raft-processes.test.ts and bench/raft.ts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { stopProc } from './procs.js';
import { freePort } from './wait.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
/** the repository root, from test/helpers/ (vitest) or dist/test/helpers/ (compiled) */
const ROOT = path.resolve(HERE, path.basename(path.resolve(HERE, '../..')) === 'dist' ? '../../..' : '../..');
export const RAFT_KV = path.join(ROOT, 'dist/test/helpers/raft-kv.js');

export function builtRaftKv(): boolean {
  return fs.existsSync(RAFT_KV);
}

export interface KvProc {
  name: string;
  dir: string;
  raftPort: number;
  httpPort: number;
  child: ChildProcess;
  id: number;
  addr: string;
  exited: Promise<number | null>;
  err: string[];
}

export interface SpawnOptions {
  /** mutual TLS: a node-tls.json file (trust bundle, manager certificate, key) */
  tlsFile?: string;
  join?: string;
  tickMs?: number;
  snapshotEvery?: number;
  compactKeep?: number;
  forceNewCluster?: boolean;
  raftPort?: number;
  httpPort?: number;
}

/** Start a raft-kv process and wait for its READY line. */
export async function spawnKv(name: string, dir: string, opts: SpawnOptions = {}, timeoutMs = 30_000): Promise<KvProc> {
  const raftPort = opts.raftPort ?? (await freePort());
  const httpPort = opts.httpPort ?? (await freePort());
  const args = [RAFT_KV, '--dir', dir, '--listen', `127.0.0.1:${raftPort}`, '--http', `127.0.0.1:${httpPort}`];
  if (opts.join) args.push('--join', opts.join);
  if (opts.tickMs) args.push('--tick-ms', String(opts.tickMs));
  if (opts.snapshotEvery) args.push('--snapshot-every', String(opts.snapshotEvery));
  if (opts.compactKeep !== undefined) args.push('--compact-keep', String(opts.compactKeep));
  if (opts.forceNewCluster) args.push('--force-new-cluster');
  if (opts.tlsFile) args.push('--tls', opts.tlsFile);
  const nodeArgs = (process.env.RAFT_KV_NODE_ARGS ?? '').split(' ').filter(Boolean); // e.g. --cpu-prof
  const child = spawn(process.execPath, [...nodeArgs, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, FLOTILLA_LOG_LEVEL: process.env.FLOTILLA_LOG_LEVEL ?? 'warn' } });
  const err: string[] = [];
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    err.push(d);
    if (err.length > 200) err.shift();
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code, signal) => resolve(code ?? (signal ? -1 : null))));
  const ready = await new Promise<{ id: number; addr: string }>((resolve, reject) => {
    let buf = '';
    const t = setTimeout(() => reject(new Error(`${name}: no READY within ${timeoutMs} ms: ${err.join('')}`)), timeoutMs);
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      buf += d;
      const m = /READY (\{.*\})\n/.exec(buf);
      if (m) {
        clearTimeout(t);
        resolve(JSON.parse(m[1]!) as { id: number; addr: string });
      }
    });
    void exited.then((code) => {
      clearTimeout(t);
      reject(new Error(`${name} exited (${code}) before READY: ${err.join('')}`));
    });
  });
  return { name, dir, raftPort, httpPort, child, id: ready.id, addr: ready.addr, exited, err };
}

/** Stops a raft-kv process (SIGKILL after 5 s when another signal does not end it). */
export async function killKv(p: KvProc, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
  await stopProc(p, signal, 5000);
}

export const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

export interface HttpResult {
  status: number;
  body: string;
}

export function request(port: number, method: string, p: string, body?: string, timeoutMs = 10_000): Promise<HttpResult> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: p, agent, timeout: timeoutMs }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (data += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: data }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${p} timed out`)));
    req.on('error', reject);
    req.end(body);
  });
}

export interface KvStatus {
  term?: number;
  id: number;
  addr: string;
  leader: boolean;
  leaderId: number;
  leaderAddr?: string;
  applied: number;
  size: number;
  members: { raftId: number; addr: string; reachable: boolean; leader: boolean; learner: boolean }[];
}

export async function status(p: KvProc): Promise<KvStatus | undefined> {
  try {
    const r = await request(p.httpPort, 'GET', '/status', undefined, 2000);
    return r.status === 200 ? (JSON.parse(r.body) as KvStatus) : undefined;
  } catch {
    return undefined;
  }
}

/** The process that says it leads (among the live ones). */
export async function findLeader(ps: KvProc[]): Promise<KvProc | undefined> {
  for (const p of ps) {
    if (p.child.exitCode !== null || p.child.signalCode !== null) continue;
    const s = await status(p);
    if (s?.leader) return p;
  }
  return undefined;
}

export async function put(p: KvProc, key: string, value: string): Promise<boolean> {
  try {
    const r = await request(p.httpPort, 'PUT', `/kv/${encodeURIComponent(key)}`, value, 5000);
    return r.status === 204;
  } catch {
    return false;
  }
}

export async function dump(p: KvProc, stale = false): Promise<Record<string, string>> {
  const r = await request(p.httpPort, 'GET', `/dump${stale ? '?stale=1' : ''}`, undefined, 15_000);
  if (r.status !== 200) throw new Error(`${p.name}: dump: ${r.status} ${r.body}`);
  return JSON.parse(r.body) as Record<string, string>;
}

/**
 * One keep-alive HTTP/1.1 connection doing one request at a time (no pipelining), for the
 * benchmark: Node's http.Agent/ClientRequest machinery costs the client several times more CPU
 * per request than the server's own handling, so on a 2-core machine the stock client would be
 * what the write rate measures. Each request still waits for its full response (status line,
 * headers, Content-Length or chunked body) before the next one is written.
 */
export class KvConnection {
  private socket: net.Socket | undefined;
  private buf: Buffer = Buffer.alloc(0);
  private pending: { resolve: (r: HttpResult) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | undefined;

  constructor(readonly port: number) {}

  private connect(): net.Socket {
    if (this.socket && !this.socket.destroyed) return this.socket;
    const s = net.connect({ host: '127.0.0.1', port: this.port, noDelay: true });
    this.buf = Buffer.alloc(0);
    s.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.parse();
    });
    const fail = (err: Error): void => {
      if (this.socket === s) this.socket = undefined;
      const p = this.pending;
      this.pending = undefined;
      if (p) {
        clearTimeout(p.timer);
        p.reject(err);
      }
    };
    s.on('error', fail);
    s.on('close', () => fail(new Error('connection closed')));
    this.socket = s;
    return s;
  }

  private parse(): void {
    const p = this.pending;
    if (!p) return;
    const buf = this.buf;
    const headEnd = buf.indexOf('\r\n\r\n');
    if (headEnd < 0) return;
    const head = buf.subarray(0, headEnd).toString('latin1');
    const status = Number(head.slice(9, 12));
    const lower = head.toLowerCase();
    let bodyStart = headEnd + 4;
    let body: string;
    let end: number;
    const cl = /\r\ncontent-length: *(\d+)/.exec(lower);
    if (cl) {
      end = bodyStart + Number(cl[1]);
      if (buf.length < end) return;
      body = buf.subarray(bodyStart, end).toString();
    } else if (lower.includes('\r\ntransfer-encoding: chunked')) {
      const parts: Buffer[] = [];
      for (;;) {
        const le = buf.indexOf('\r\n', bodyStart);
        if (le < 0) return;
        const n = parseInt(buf.subarray(bodyStart, le).toString('latin1'), 16);
        if (buf.length < le + 2 + n + 2) return;
        if (n === 0) {
          end = le + 4;
          break;
        }
        parts.push(buf.subarray(le + 2, le + 2 + n));
        bodyStart = le + 2 + n + 2;
      }
      body = Buffer.concat(parts).toString();
    } else {
      end = bodyStart; // 204/304 or no body
      body = '';
    }
    this.buf = end >= buf.length ? Buffer.alloc(0) : buf.subarray(end);
    this.pending = undefined;
    clearTimeout(p.timer);
    if (/\r\nconnection: *close/.test(lower)) this.close();
    p.resolve({ status, body });
  }

  request(method: string, p: string, body = '', timeoutMs = 10_000): Promise<HttpResult> {
    if (this.pending) return Promise.reject(new Error('KvConnection: one request at a time'));
    const s = this.connect();
    return new Promise<HttpResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending = undefined;
        this.close();
        reject(new Error(`${method} ${p} timed out`));
      }, timeoutMs);
      this.pending = { resolve, reject, timer };
      s.write(`${method} ${p} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    });
  }

  close(): void {
    this.socket?.destroy();
    this.socket = undefined;
  }
}
