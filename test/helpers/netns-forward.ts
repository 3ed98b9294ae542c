/**
 * Lets the test process talk TCP from inside a network namespace it cannot route to (the test bed's
 * underlay has no link to the root namespace): a small forwarder runs in the namespace (nsenter --net),
 * listens on one unix socket per target, and for every connection accepted there opens a new TCP
 * connection to the target from inside the namespace. A unix socket is a file, so the test process
 * reaches it from the root namespace; clients that speak TCP (ioredis: option `path`) connect to it.
 *
 *   const fwd = await NetnsForward.start('/run/netns/fl-abc123-c1', [{ host: '198.18.7.11', port: 8080 }]);
 *   const redis = new Redis({ path: fwd.path('198.18.7.11', 8080) });
 *   ...
 *   await fwd.stop();
 *
 * One unix connection is one TCP connection, both ways: when the TCP side closes or is reset, the unix
 * side is closed (destroyed on a reset), and the other way round. The TCP source address seen by the
 * server is the namespace's own (e.g. a bed client's underlay address).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface ForwardTarget {
  host: string;
  port: number;
}

const FORWARDER = `
const net = require('node:net');
const fs = require('node:fs');
const targets = JSON.parse(process.argv[1]);
const trace = process.argv[2] === 'trace';
let pending = targets.length;
for (const t of targets) {
  try { fs.unlinkSync(t.path); } catch {}
  const srv = net.createServer({ allowHalfOpen: false }, (u) => {
    const c = net.connect({ host: t.host, port: t.port, noDelay: true });
    if (trace) {
      const t0 = Date.now();
      let lp = 0;
      c.on('connect', () => { lp = c.localPort; process.stdout.write('T ' + Date.now() + ' open ' + lp + ' ' + t.host + ':' + t.port + '\\n'); });
      c.on('end', () => process.stdout.write('T ' + Date.now() + ' fin-from-server ' + lp + '\\n'));
      c.on('error', (e) => process.stdout.write('T ' + Date.now() + ' error ' + lp + ' ' + t.host + ' ' + e.code + ' after ' + (Date.now() - t0) + ' ms\\n'));
      u.on('end', () => process.stdout.write('T ' + Date.now() + ' client-closed ' + lp + '\\n'));
    }
    u.setNoDelay?.(true);
    u.pipe(c);
    c.pipe(u);
    c.on('error', () => u.destroy());
    u.on('error', () => c.destroy());
    c.on('close', (hadError) => (hadError ? u.destroy() : u.end()));
    u.on('close', () => c.destroy());
  });
  srv.listen(t.path, () => {
    fs.chmodSync(t.path, 0o600);
    if (--pending === 0) process.stdout.write('ready\\n');
  });
}
process.on('SIGTERM', () => process.exit(0));
`;

export class NetnsForward {
  private constructor(
    private readonly child: ChildProcess,
    private readonly dir: string,
    private readonly paths: Map<string, string>,
  ) {}

  /**
   * Starts the forwarder inside netnsPath (e.g. /run/netns/NAME) for the given targets; resolves once it
   * listens. With onTrace, every TCP connection's events (open with its local port, FIN from the server,
   * error, client's close) are reported as lines `<epoch ms> <event> <local port> ...`.
   */
  static async start(netnsPath: string, targets: ForwardTarget[], timeoutMs = 10_000, onTrace?: (line: string) => void): Promise<NetnsForward> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-fwd-'));
    const paths = new Map<string, string>();
    const spec = targets.map((t, i) => {
      const p = path.join(dir, `${i}.sock`);
      paths.set(`${t.host}:${t.port}`, p);
      return { ...t, path: p };
    });
    const child = spawn('nsenter', [`--net=${netnsPath}`, '--', process.execPath, '-e', FORWARDER, JSON.stringify(spec), onTrace ? 'trace' : ''], { stdio: ['ignore', 'pipe', 'pipe'] });
    const fwd = new NetnsForward(child, dir, paths);
    let err = '';
    child.stderr?.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-2000)));
    let buf = '';
    const ok = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      child.stdout?.on('data', (d: Buffer) => {
        buf += d.toString();
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          if (line.startsWith('T ')) onTrace?.(line.slice(2));
        }
        if (d.toString().includes('ready')) {
          clearTimeout(timer);
          resolve(true);
        }
      });
      child.once('exit', () => {
        clearTimeout(timer);
        resolve(false);
      });
    });
    if (!ok) {
      await fwd.stop();
      throw new Error(`forwarder in ${netnsPath} did not start: ${err.trim()}`);
    }
    return fwd;
  }

  /** The unix socket that leads to host:port. */
  path(host: string, port: number): string {
    const p = this.paths.get(`${host}:${port}`);
    if (!p) throw new Error(`no forward to ${host}:${port}`);
    return p;
  }

  /** Stops the forwarder (SIGTERM, SIGKILL after 2 s) and removes its sockets. */
  async stop(): Promise<void> {
    const c = this.child;
    if (c.exitCode === null && c.signalCode === null) {
      const exited = new Promise<void>((r) => c.once('exit', () => r()));
      c.kill('SIGTERM');
      const t = setTimeout(() => c.kill('SIGKILL'), 2_000);
      await exited;
      clearTimeout(t);
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
