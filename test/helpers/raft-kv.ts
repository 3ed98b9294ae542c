/**
 * A tiny replicated KV server over RaftNode, for process-level Raft tests and the raft benchmark
 * (compiled to dist/test/helpers/raft-kv.js). The state machine is a Map; the API is HTTP/1.1 on
 * loopback:
 *
 *   PUT    /kv/<key>          body = value      -> 204 once committed and applied here
 *   GET    /kv/<key>[?stale=1]                  -> 200 value | 404 (linearizable unless stale)
 *   POST   /bulk?n=N&size=S&prefix=P            -> 204 after N puts of S-byte values (1,000 per entry)
 *   GET    /dump[?stale=1]                      -> {"key": "value", ...}
 *   GET    /status                              -> {id, addr, leader, leaderId, leaderAddr, applied, members, size}
 *   POST   /members  body = raft addr           -> {raftId, members}
 *   DELETE /members/<raftId>[?force=1]          -> 204
 *   POST   /transfer                            -> {leader}
 *
 * Errors answer {"code", "message"} with 503 for UNAVAILABLE/DEADLINE_EXCEEDED (retry), 4xx/500
 * otherwise. Usage:
 *
 *   node dist/test/helpers/raft-kv.js --dir D --listen 127.0.0.1:P --http 127.0.0.1:H
 *        [--join ADDR] [--tls node-tls.json] [--tick-ms 100] [--snapshot-every N (default 100,000)] [--compact-keep N] [--force-new-cluster]
 *
 * Prints one line "READY {json}" on stdout once serving. SIGTERM/SIGINT stop it cleanly.
 */
import http from 'node:http';
import fs from 'node:fs';
import { type TlsMaterial, TlsSource, clientCredentials, serverCredentials } from '../../manager/ca/credentials.js';
import { issuerNames } from '../../manager/ca/x509.js';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { createLogger } from '../../common/log.js';
import { DataKeys, openKeys } from '../../manager/keys/keys.js';
import { RaftNode, type StateMachine } from '../../manager/raft/node.js';

export class KvStateMachine implements StateMachine {
  map = new Map<string, string>();
  apply(data: Uint8Array): void {
    const op = JSON.parse(Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString()) as { k?: string; v?: string; puts?: [string, string][] };
    if (op.puts) for (const [k, v] of op.puts) this.map.set(k, v);
    else if (op.k !== undefined) this.map.set(op.k, op.v ?? '');
  }
  snapshot(): Uint8Array {
    return Buffer.from(JSON.stringify([...this.map]));
  }
  restore(data: Uint8Array): void {
    this.map = new Map(JSON.parse(Buffer.from(data).toString()) as [string, string][]);
  }
}

const STATUS: Record<string, number> = {
  INVALID_ARGUMENT: 400,
  NOT_FOUND: 404,
  PERMISSION_DENIED: 403,
  FAILED_PRECONDITION: 409,
  ALREADY_EXISTS: 409,
  UNAVAILABLE: 503,
  DEADLINE_EXCEEDED: 503,
  ABORTED: 503,
};

function readBody(req: http.IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    req.on('data', (d: Buffer) => parts.push(d));
    req.on('end', () => resolve(Buffer.concat(parts)));
    req.on('error', reject);
  });
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      dir: { type: 'string' },
      listen: { type: 'string' },
      advertise: { type: 'string' },
      http: { type: 'string' },
      join: { type: 'string' },
      'tick-ms': { type: 'string' },
      'snapshot-every': { type: 'string' },
      'compact-keep': { type: 'string' },
      'force-new-cluster': { type: 'boolean' },
      // mutual TLS as the managers use it: a node-tls.json file (trust bundle, manager cert, key)
      tls: { type: 'string' },
    },
  });
  if (!values.dir || !values.listen || !values.http) throw new FlotillaError('INVALID_ARGUMENT', 'usage: raft-kv --dir D --listen HOST:PORT --http HOST:PORT [--join ADDR]');
  const log = createLogger('raft-kv');
  const ac = new AbortController();
  for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => ac.abort());
  const kv = new KvStateMachine();
  // encrypted at rest like a manager's log (keys.json beside wal/ and snap/; never autolocked here)
  const keys = openKeys(values.dir, { raftDir: values.dir });
  if (!(keys instanceof DataKeys)) throw new FlotillaError('FAILED_PRECONDITION', `${values.dir}: autolocked keys are not supported by raft-kv`);
  const material = values.tls ? (JSON.parse(fs.readFileSync(values.tls, 'utf8')) as TlsMaterial) : undefined;
  const tls = material ? new TlsSource(material) : undefined;
  const node = await RaftNode.open({
    dataDir: values.dir,
    dek: keys.dek,
    listenAddr: values.listen,
    advertiseAddr: values.advertise,
    join: values.join,
    joinToken: tls ? undefined : 'raft-kv',
    ...(tls
      ? {
          credentials: clientCredentials(tls),
          serverCredentials: serverCredentials(tls, 'require'),
          nodeId: tls.identity.nodeId,
          authz: { clusterId: tls.identity.clusterId, trustedIssuers: () => issuerNames(tls.current.trustPem), allowExpiredOnOpenConnections: true },
        }
      : {}),
    stateMachine: kv,
    signal: ac.signal,
    tickMs: values['tick-ms'] ? Number(values['tick-ms']) : 100,
    // etcd's default snapshot count (100,000); the driver's own default (10,000) suits the
    // manager's store, whose entries are larger than this KV's
    snapshotEvery: values['snapshot-every'] ? Number(values['snapshot-every']) : 100_000,
    compactKeep: values['compact-keep'] ? Number(values['compact-keep']) : undefined,
    forceNewCluster: values['force-new-cluster'],
    log,
  });

  const server = http.createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      const code = err instanceof FlotillaError ? err.code : 'INTERNAL';
      if (!res.headersSent) res.writeHead(STATUS[code] ?? 500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ code, message: errorMessage(err) }));
    });
  });
  server.keepAliveTimeout = 60_000;

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const raw = req.url ?? '/';
    const q = raw.indexOf('?');
    const p = q < 0 ? raw : raw.slice(0, q);
    const url = { searchParams: new URLSearchParams(q < 0 ? '' : raw.slice(q + 1)) };
    const stale = url.searchParams.get('stale') === '1';
    const json = (v: unknown): void => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(v));
    };
    if (p.startsWith('/kv/') && req.method === 'PUT') {
      const v = (await readBody(req)).toString();
      await node.propose(Buffer.from(JSON.stringify({ k: decodeURIComponent(p.slice(4)), v })));
      res.writeHead(204).end();
    } else if (p.startsWith('/kv/') && req.method === 'GET') {
      if (!stale) await node.readIndex();
      const v = kv.map.get(decodeURIComponent(p.slice(4)));
      if (v === undefined) res.writeHead(404).end();
      else res.writeHead(200).end(v);
    } else if (p === '/bulk' && req.method === 'POST') {
      const n = Number(url.searchParams.get('n') ?? '0');
      const size = Number(url.searchParams.get('size') ?? '100');
      const prefix = url.searchParams.get('prefix') ?? 'bulk';
      const value = 'x'.repeat(size);
      for (let i = 0; i < n; i += 1000) {
        const puts: [string, string][] = [];
        for (let j = i; j < Math.min(n, i + 1000); j++) puts.push([`${prefix}${j}`, value]);
        await node.propose(Buffer.from(JSON.stringify({ puts })));
      }
      res.writeHead(204).end();
    } else if (p === '/dump' && req.method === 'GET') {
      if (!stale) await node.readIndex();
      json(Object.fromEntries(kv.map));
    } else if (p === '/status' && req.method === 'GET') {
      json({ id: node.id, addr: node.addr, term: node.status().term, leader: node.isLeader(), leaderId: node.leaderId(), leaderAddr: node.leaderAddr(), applied: node.appliedIndex(), members: node.members(), size: kv.map.size, stats: node.stats, wal: node.walStats() });
    } else if (p === '/members' && req.method === 'POST') {
      json(await node.addMember((await readBody(req)).toString().trim()));
    } else if (p.startsWith('/members/') && req.method === 'DELETE') {
      await node.removeMember(Number(p.slice('/members/'.length)), { force: url.searchParams.get('force') === '1' });
      res.writeHead(204).end();
    } else if (p === '/transfer' && req.method === 'POST') {
      json({ leader: await node.transferLeadership() });
    } else {
      res.writeHead(404).end();
    }
  }

  const [host, port] = [values.http.replace(/:\d+$/, ''), Number(/:(\d+)$/.exec(values.http)?.[1] ?? '0')];
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const httpPort = (server.address() as { port: number }).port;
  process.stdout.write(`READY ${JSON.stringify({ id: node.id, addr: node.addr, http: `${host}:${httpPort}` })}\n`);

  await new Promise<void>((resolve) => {
    if (ac.signal.aborted) resolve();
    ac.signal.addEventListener('abort', () => resolve(), { once: true });
    node.onFatal(() => ac.abort());
  });
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  await node.stop();
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`raft-kv: ${errorMessage(err)}\n`);
    process.exit(1);
  });
}
