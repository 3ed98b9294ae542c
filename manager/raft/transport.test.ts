/**
 * The Raft transport on loopback with real grpc-js and mutual TLS: the sender coalesces what is
 * queued for a peer into one envelope (RaftEnvelope.batch), the receiver delivers every message of
 * a batch in order, and the forged-sender check applies to each message of a batch.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Message, MessageType, RaftClient, RaftEnvelope, RaftService, type RaftServer } from '../../gen/flotilla/v1/raft.js';
import { RootCA, createRootCA } from '../ca/x509.js';
import { TLS_CHANNEL_OPTIONS, TlsSource, clientCredentials, serverCredentials } from '../ca/credentials.js';
import { waitFor } from '../../test/helpers/wait.js';
import { RaftTransport, addRaftService, raftIdForNode } from './transport.js';

const A = raftIdForNode('mgr-a');
const B = raftIdForNode('mgr-b');

interface Bed {
  ca: RootCA;
  a: TlsSource;
  b: TlsSource;
  /** B's addRaftService: what reached its node */
  got: Message[];
  addr: string;
  /** a bare Raft service (no authz) that records envelopes as they arrive */
  envelopes: RaftEnvelope[];
  rawAddr: string;
  servers: grpc.Server[];
}
let bed: Bed;

function listen(server: grpc.Server, creds: grpc.ServerCredentials): Promise<string> {
  return new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0', creds, (err, port) => (err ? reject(err) : resolve(`127.0.0.1:${port}`))));
}

function msg(from: number, to: number, index: number): Message {
  return {
    type: MessageType.MESSAGE_TYPE_APP,
    to,
    from,
    term: 3,
    logTerm: 3,
    index,
    entries: [{ term: 3, index: index + 1, type: 0, data: Buffer.from(`e${index}`) }],
    commit: 0,
    snapshot: undefined,
    reject: false,
    rejectHint: 0,
    context: Buffer.alloc(0),
  } as unknown as Message;
}

/** Write envelopes on one Raft.Stream as the given manager and wait for the server's answer. */
async function stream(src: TlsSource, envs: Partial<RaftEnvelope>[]): Promise<void> {
  const c = new RaftClient(bed.addr, clientCredentials(src), TLS_CHANNEL_OPTIONS);
  try {
    await new Promise<void>((resolve, reject) => {
      const s = c.stream((err) => (err ? reject(err) : resolve()));
      for (const e of envs) s.write(RaftEnvelope.fromPartial(e));
      s.end();
    });
  } finally {
    c.close();
  }
}

beforeAll(async () => {
  const ca = await RootCA.load(await createRootCA({ clusterId: 'c1' }));
  const mat = async (nodeId: string): Promise<TlsSource> =>
    new TlsSource({ trustPem: ca.certPem, ...(await ca.issueWithNewKey({ nodeId, role: 'manager', addresses: ['127.0.0.1'] })) });
  const a = await mat('mgr-a');
  const b = await mat('mgr-b');
  const got: Message[] = [];
  const server = new grpc.Server();
  addRaftService(
    server,
    {
      onMessage: (m) => got.push(m),
      join: () => Promise.reject(new Error('unused')),
      propose: () => Promise.reject(new Error('unused')),
      readIndex: () => Promise.reject(new Error('unused')),
      leave: () => Promise.reject(new Error('unused')),
    },
    undefined,
    { clusterId: 'c1' },
  );
  const envelopes: RaftEnvelope[] = [];
  const raw = new grpc.Server();
  const rawImpl: Pick<RaftServer, 'stream'> = {
    stream: (call, cb) => {
      call.on('data', (e: RaftEnvelope) => envelopes.push(e));
      call.on('end', () => cb(null, {}));
    },
  };
  raw.addService(RaftService, rawImpl as unknown as grpc.UntypedServiceImplementation);
  bed = {
    ca, a, b, got, envelopes,
    addr: await listen(server, serverCredentials(b)),
    rawAddr: await listen(raw, serverCredentials(b)),
    servers: [server, raw],
  };
}, 30_000);

afterAll(() => {
  for (const s of bed?.servers ?? []) s.forceShutdown();
});

describe('raft transport batching', () => {
  it('a batch envelope delivers every message, in order, after a single message sent before it', async () => {
    bed.got.length = 0;
    const batch = [1, 2, 3, 4, 5].map((i) => msg(A, B, i));
    await stream(bed.a, [{ message: msg(A, B, 0) }, { batch }, { message: msg(A, B, 6) }]);
    expect(bed.got.map((m) => m.index)).toEqual([0, 1, 2, 3, 4, 5, 6]);
    expect(bed.got.map((m) => m.entries[0]?.data.toString())).toEqual(['e0', 'e1', 'e2', 'e3', 'e4', 'e5', 'e6']);
  });

  it('a message of a batch whose sender is not the certificate\'s node is dropped; the others are delivered', async () => {
    bed.got.length = 0;
    // mgr-a claims to be mgr-b in the middle of a batch; a batch entirely forged delivers nothing
    await stream(bed.a, [{ batch: [msg(A, B, 10), msg(B, B, 11), msg(A, B, 12)] }, { batch: [msg(B, B, 13), msg(B, B, 14)] }]);
    expect(bed.got.map((m) => [m.from, m.index])).toEqual([
      [A, 10],
      [A, 12],
    ]);
  });

  it('the sender puts the messages of one send() to a peer in one envelope, in order', async () => {
    const ac = new AbortController();
    const t = new RaftTransport({ id: A, signal: ac.signal, credentials: clientCredentials(bed.a), onUnreachable: () => {}, onSnapshotStatus: () => {} });
    try {
      t.setPeer(B, bed.rawAddr);
      bed.envelopes.length = 0;
      t.send([msg(A, B, 100)]);
      await waitFor('the first envelope', () => bed.envelopes.length === 1, 10_000);
      expect(bed.envelopes[0]!.message?.index).toBe(100);
      // one Ready's worth of messages: one envelope on the (now open) stream
      t.send([101, 102, 103, 104].map((i) => msg(A, B, i)));
      await waitFor('the second envelope', () => bed.envelopes.length >= 2, 10_000);
      expect(bed.envelopes.length).toBe(2);
      expect(bed.envelopes[1]!.batch.map((m) => m.index)).toEqual([101, 102, 103, 104]);
      expect(t.status()[0]).toMatchObject({ id: B, sent: 5, dropped: 0, queued: 0 });
    } finally {
      ac.abort();
    }
  });
});
