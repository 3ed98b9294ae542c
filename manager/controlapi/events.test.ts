/**
 * Watch (flotilla events) on a real gRPC server over real mutual TLS, on a MemoryStore: order,
 * resume without loss or repeats, filters, --since/--until, the bounded history's clear error, and
 * the admin-only policy (CONTROL_POLICY). The 3-manager leader change is test/events-ha.test.ts.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient, ControlService, type WatchEvent, type WatchRequest } from '../../gen/flotilla/v1/control.js';
import { createLogger } from '../../common/log.js';
import { testNode, testSpec } from '../../testing/testutil.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import type { Dispatcher } from '../dispatcher/dispatcher.js';
import { RevocationList } from '../ca/authz.js';
import { TLS_CHANNEL_OPTIONS, TlsSource, clientCredentials, serverCredentials, staticClientCredentials } from '../ca/credentials.js';
import { type Role, RootCA, createRootCA } from '../ca/x509.js';
import { ControlApi } from './server.js';
import { StoreHistory } from '../store/history.js';
import { WHOLE_REVISION } from './events.js';

const log = createLogger('test');
log.level = 'silent';

let store: MemoryStore;
let api: ControlApi;
let server: grpc.Server;
let addr = '';
let ca: RootCA;
let admin: grpc.ChannelCredentials;

async function creds(role: Role, id: string): Promise<grpc.ChannelCredentials> {
  const m = await ca.issueWithNewKey({ nodeId: id, role, addresses: ['127.0.0.1'] });
  const material = { trustPem: ca.certPem, ...m };
  return role === 'admin' ? staticClientCredentials(material) : clientCredentials(new TlsSource(material));
}

beforeAll(async () => {
  store = new MemoryStore(log);
  store.setProposer(new MemoryProposer(store));
  api = new ControlApi({ store, dispatcher: undefined as unknown as Dispatcher, leaderAddr: () => '', readBarrier: async () => {} });
  ca = await RootCA.load(await createRootCA({ clusterId: 'c1' }));
  const mgr = new TlsSource({ trustPem: ca.certPem, ...(await ca.issueWithNewKey({ nodeId: 'mgr1', role: 'manager', addresses: ['127.0.0.1'] })) });
  server = new grpc.Server();
  server.addService(ControlService, api.server({ clusterId: 'c1', revocations: new RevocationList() }) as unknown as grpc.UntypedServiceImplementation);
  addr = await new Promise<string>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', serverCredentials(mgr, 'require'), (err, port) => (err ? reject(err) : resolve(`127.0.0.1:${port}`))),
  );
  admin = await creds('admin', 'admin-cli');
}, 30_000);

afterAll(() => {
  server?.forceShutdown();
  api?.history.close();
});

function req(over: Partial<WatchRequest> = {}): WatchRequest {
  return { sinceRevision: 0, sinceIndex: 0, sinceMs: 0, untilMs: 0, types: [], actions: [], services: [], resume: false, ...over };
}

/** Opens a watch; collects events (not keep-alives) until `until` says stop, or the stream ends. */
function watch(
  r: WatchRequest,
  until: (evs: WatchEvent[]) => boolean,
  c: grpc.ChannelCredentials = admin,
  timeoutMs = 10_000,
  onStart?: () => void,
): Promise<{ events: WatchEvent[]; progress: WatchEvent[]; err?: grpc.ServiceError }> {
  const client = new ControlClient(addr, c, TLS_CHANNEL_OPTIONS);
  const events: WatchEvent[] = [];
  const progress: WatchEvent[] = [];
  return new Promise((resolve) => {
    const call = client.watch(r);
    const timer = setTimeout(() => finish(new Error('timed out') as grpc.ServiceError), timeoutMs);
    const finish = (err?: grpc.ServiceError): void => {
      clearTimeout(timer);
      call.cancel();
      client.close();
      resolve({ events, progress, err });
    };
    call.on('data', (e: WatchEvent) => {
      (e.progress ? progress : events).push(e);
      if (e.progress && progress.length === 1) onStart?.();
      if (until(events)) finish();
    });
    call.on('error', (err: grpc.ServiceError) => finish(err.code === grpc.status.CANCELLED ? undefined : err));
    call.on('end', () => finish());
  });
}

const key = (e: WatchEvent): string => `${e.revision}.${e.index}`;

describe('Watch', () => {
  it('streams changes in order from now, each once, with create/update/remove of every type', async () => {
    let started!: () => void;
    const ready = new Promise<void>((r) => (started = r));
    const stream = watch(req(), (evs) => evs.some((e) => e.type === 'service' && e.action === 'remove'), admin, 10_000, () => started());
    // the first keep-alive says the stream is open (and where "now" is)
    await ready;
    const node = testNode('n1');
    await store.update((tx) => tx.create('node', node));
    const { service } = await api.createService({ spec: testSpec('web', 1), noResolveImage: false });
    await api.updateService({ serviceId: service!.id, spec: { ...testSpec('web', 3) }, version: 0, rollback: '', toVersion: 0, dryRun: false, noResolveImage: false });
    await api.removeService(service!.id);
    const { events, err } = await stream;
    expect(err).toBeUndefined();
    expect(events.map((e) => `${e.type} ${e.action} ${e.name}`)).toEqual(['node create n1', 'service create web', 'service update web', 'service remove web']);
    // strictly increasing positions, times from the batches
    for (let i = 1; i < events.length; i++) expect(events[i]!.revision > events[i - 1]!.revision || events[i]!.index > events[i - 1]!.index).toBe(true);
    expect(events.every((e) => Math.abs(e.timeMs - Date.now()) < 60_000)).toBe(true);
  });

  it('resumes after a position without losing or repeating an event, and filters by type, event and service', async () => {
    const start = api.history.last;
    const { service: a } = await api.createService({ spec: testSpec('alpha', 0), noResolveImage: false });
    const { service: b } = await api.createService({ spec: testSpec('beta', 0), noResolveImage: false });
    // one batch with several changes: the resume point may fall inside it
    await store.update((tx) => {
      tx.create('node', testNode('n2'));
      tx.create('node', testNode('n3'));
      tx.create('node', testNode('n4'));
    });
    await api.removeService(a!.id);
    const all = await watch(req({ sinceRevision: start, sinceIndex: WHOLE_REVISION, resume: true }), (evs) => evs.length >= 6);
    expect(all.events.map((e) => `${e.type} ${e.action} ${e.name}`)).toEqual(['service create alpha', 'service create beta', 'node create n2', 'node create n3', 'node create n4', 'service remove alpha']);
    // cut after the second node of the batch, resume: the rest, once
    const cut = all.events[3]!;
    expect(all.events[2]!.revision).toBe(cut.revision);
    const rest = await watch(req({ sinceRevision: cut.revision, sinceIndex: cut.index, resume: true }), (evs) => evs.length >= 2);
    expect(rest.events.map(key)).toEqual(all.events.slice(4).map(key));
    // filters
    const services = await watch(req({ sinceRevision: start, sinceIndex: WHOLE_REVISION, resume: true, services: ['beta'] }), (evs) => evs.length >= 1, admin, 1500);
    expect(services.events.map((e) => `${e.type} ${e.action} ${e.name}`)).toEqual(['service create beta']);
    const removes = await watch(req({ sinceRevision: start, sinceIndex: WHOLE_REVISION, resume: true, actions: ['remove'], types: ['service'] }), () => false, admin, 1500);
    expect(removes.events.map((e) => e.name)).toEqual(['alpha']);
    const nodes = await watch(req({ sinceRevision: start, sinceIndex: WHOLE_REVISION, resume: true, types: ['node'] }), () => false, admin, 1500);
    expect(nodes.events.map((e) => e.name)).toEqual(['n2', 'n3', 'n4']);
    // keep-alives carry the position reached, even when every event was filtered out
    expect(nodes.progress.at(-1)!.revision).toBeGreaterThanOrEqual(all.events.at(-1)!.revision);
    void b;
  });

  it('--since and --until select by the batch time; an until in the past ends the stream', async () => {
    const t0 = Date.now();
    await new Promise((r) => setTimeout(r, 20));
    await api.createService({ spec: testSpec('gamma', 0), noResolveImage: false });
    await new Promise((r) => setTimeout(r, 20));
    const t1 = Date.now();
    await new Promise((r) => setTimeout(r, 20));
    await api.createService({ spec: testSpec('delta', 0), noResolveImage: false });
    const r = await watch(req({ sinceMs: t0, untilMs: t1, types: ['service'] }), () => false);
    expect(r.err).toBeUndefined();
    expect(r.events.map((e) => e.name)).toEqual(['gamma']);
    const later = await watch(req({ sinceMs: t1, untilMs: Date.now() + 300, types: ['service'] }), () => false);
    expect(later.events.map((e) => e.name)).toEqual(['delta']);
  });

  it('a revision older than the kept history is refused with OUT_OF_RANGE and a clear message', async () => {
    const small = new StoreHistory(store, 3);
    try {
      const floor = small.floor;
      for (let i = 0; i < 3; i++) await store.update((tx) => tx.create('node', testNode(`h${i}`)));
      await store.update((tx) => tx.create('node', testNode('h3')));
      expect(small.floor).toBeGreaterThan(floor);
      expect(small.after(small.floor, WHOLE_REVISION).length).toBeLessThanOrEqual(3);
    } finally {
      small.close();
    }
    // the API's own history: refuse a revision below its floor
    const floor = api.history.floor;
    if (floor > 0) {
      const r = await watch(req({ sinceRevision: floor - 1, resume: true }), () => false);
      expect(r.err?.code).toBe(grpc.status.OUT_OF_RANGE);
    }
    // force a floor: a snapshot restore clears the history
    store.restore(store.snapshot(), store.appliedIndex + 5);
    const r = await watch(req({ sinceRevision: 1, resume: true }), () => false);
    expect(r.err?.code).toBe(grpc.status.OUT_OF_RANGE);
    expect(r.err?.details).toMatch(/revision 1 is no longer kept by this manager \(it keeps revisions after \d+\)/);
  });

  it('bad filters are INVALID_ARGUMENT naming the value; manager and worker certificates are refused (admin only)', async () => {
    const bad = await watch(req({ types: ['volume'] }), () => false);
    expect(bad.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(bad.err?.details).toMatch(/invalid type "volume"/);
    for (const [role, id] of [
      ['manager', 'mgr2'],
      ['worker', 'w1'],
    ] as const) {
      const r = await watch(req(), () => false, await creds(role, id), 3000);
      expect(r.err?.code, role).toBe(grpc.status.PERMISSION_DENIED);
    }
  });
});
