/**
 * A real etcd cluster for tests and benchmarks: Debian's /usr/bin/etcd, N members on loopback in a
 * temp dir, client TLS with client certificates (a throwaway CA made with manager/ca/x509), peers
 * in plain text on loopback. stop() kills every member (SIGKILL after a deadline) and removes the dir.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { RootCA, createRootCA } from '../../manager/ca/x509.js';
import { freePort, waitFor } from './wait.js';

export const ETCD_BIN = '/usr/bin/etcd';

export function haveEtcd(): boolean {
  return fs.existsSync(ETCD_BIN);
}

export interface EtcdMember {
  name: string;
  clientUrl: string;
  peerUrl: string;
  dataDir: string;
  proc: ChildProcess | undefined;
  exited: Promise<void>;
  log: string[];
}

export class EtcdCluster {
  /** the temp dir, made by start() (a skipped suite that constructs one leaves nothing behind) */
  root = '';
  readonly members: EtcdMember[] = [];
  caFile = '';
  certFile = '';
  keyFile = '';
  private args: string[][] = [];

  constructor(private readonly prefix = 'flotilla-etcd-') {}

  get endpoints(): string[] {
    return this.members.map((m) => m.clientUrl);
  }

  /** The manager flags that reach this cluster. */
  managerFlags(prefix?: string): string[] {
    return ['--store', 'etcd', '--etcd-endpoints', this.endpoints.join(','), '--etcd-cacert', this.caFile, '--etcd-cert', this.certFile, '--etcd-key', this.keyFile, ...(prefix ? ['--etcd-prefix', prefix] : [])];
  }

  /** Starts n members and waits until the cluster answers. */
  async start(n = 3, opts: { quotaBytes?: number } = {}): Promise<void> {
    this.root = fs.mkdtempSync(path.join(os.tmpdir(), this.prefix));
    const ca = await createRootCA({ clusterId: 'etcd-test' });
    const root = await RootCA.load(ca);
    const server = await root.issueWithNewKey({ nodeId: 'etcd', role: 'manager', addresses: ['127.0.0.1', 'localhost'] });
    const tls = path.join(this.root, 'tls');
    fs.mkdirSync(tls, { mode: 0o700 });
    this.caFile = path.join(tls, 'ca.pem');
    this.certFile = path.join(tls, 'cert.pem');
    this.keyFile = path.join(tls, 'key.pem');
    fs.writeFileSync(this.caFile, ca.certPem);
    fs.writeFileSync(this.certFile, server.certPem);
    fs.writeFileSync(this.keyFile, server.keyPem, { mode: 0o600 });
    const ports: Array<[number, number]> = [];
    for (let i = 0; i < n; i++) ports.push([await freePort(), await freePort()]);
    const initial = ports.map(([, p], i) => `e${i}=http://127.0.0.1:${p}`).join(',');
    for (let i = 0; i < n; i++) {
      const [cp, pp] = ports[i]!;
      const m: EtcdMember = {
        name: `e${i}`,
        clientUrl: `https://127.0.0.1:${cp}`,
        peerUrl: `http://127.0.0.1:${pp}`,
        dataDir: path.join(this.root, `e${i}`),
        proc: undefined,
        exited: Promise.resolve(),
        log: [],
      };
      this.members.push(m);
      this.args.push([
        '--name', m.name,
        '--data-dir', m.dataDir,
        '--listen-client-urls', m.clientUrl,
        '--advertise-client-urls', m.clientUrl,
        '--listen-peer-urls', m.peerUrl,
        '--initial-advertise-peer-urls', m.peerUrl,
        '--initial-cluster', initial,
        '--initial-cluster-state', 'new',
        '--initial-cluster-token', path.basename(this.root),
        '--cert-file', this.certFile,
        '--key-file', this.keyFile,
        '--trusted-ca-file', this.caFile,
        '--client-cert-auth',
        // fast elections on loopback
        '--heartbeat-interval', '50',
        '--election-timeout', '500',
        ...(opts.quotaBytes ? ['--quota-backend-bytes', String(opts.quotaBytes)] : []),
      ]);
    }
    for (let i = 0; i < n; i++) this.startMember(i);
    await waitFor('etcd cluster healthy', async () => (await this.leaderIndex()) >= 0, 30_000, 200);
  }

  /** (Re)starts member i with its data dir. */
  startMember(i: number): void {
    const m = this.members[i]!;
    const child = spawn(ETCD_BIN, this.args[i]!, { stdio: ['ignore', 'ignore', 'pipe'] });
    m.log = [];
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      m.log.push(d);
      if (m.log.length > 200) m.log.shift();
    });
    m.proc = child;
    m.exited = new Promise((resolve) => child.on('exit', () => resolve()));
  }

  /** kill -9 member i and wait for it to be gone. */
  async kill(i: number): Promise<void> {
    const m = this.members[i]!;
    if (!m.proc || m.proc.exitCode !== null || m.proc.signalCode !== null) return;
    m.proc.kill('SIGKILL');
    await m.exited;
  }

  /** The index of the member that is the Raft leader (by each member's own status), or -1. */
  async leaderIndex(): Promise<number> {
    const { Etcd3 } = await import('etcd3');
    for (let i = 0; i < this.members.length; i++) {
      const m = this.members[i]!;
      if (!m.proc || m.proc.exitCode !== null || m.proc.signalCode !== null) continue;
      const c = new Etcd3({ hosts: m.clientUrl, credentials: this.credentials(), dialTimeout: 1000 });
      try {
        const st = await c.maintenance.status({ deadline: Date.now() + 1000 });
        if (st.leader !== '0' && st.leader === st.header.member_id) return i;
      } catch {
        // down or not ready
      } finally {
        c.close();
      }
    }
    return -1;
  }

  credentials(): { rootCertificate: Buffer; certChain: Buffer; privateKey: Buffer } {
    return { rootCertificate: fs.readFileSync(this.caFile), certChain: fs.readFileSync(this.certFile), privateKey: fs.readFileSync(this.keyFile) };
  }

  /** The TLS material as EtcdStoreOptions takes it. */
  tls(): { ca: Buffer; cert: Buffer; key: Buffer } {
    const c = this.credentials();
    return { ca: c.rootCertificate, cert: c.certChain, key: c.privateKey };
  }

  /** A client of the whole cluster (close it after use). */
  async client(): Promise<import('etcd3').Etcd3> {
    const { Etcd3 } = await import('etcd3');
    return new Etcd3({ hosts: this.endpoints, credentials: this.credentials() });
  }

  /** Kills every member (SIGKILL) and removes the temp dir. */
  async stop(): Promise<void> {
    await Promise.all(this.members.map((_, i) => this.kill(i)));
    if (this.root) fs.rmSync(this.root, { recursive: true, force: true });
  }
}
