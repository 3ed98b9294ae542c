/**
 * The etcd proposer against a real etcd (three members on loopback, client TLS): transactions,
 * watch events and commit markers, conflicts, unique names, the request limit, relist after
 * compaction, sealed values, and fencing of a deposed leader's writes.
 */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NodeAvailability, NodeRole, NodeState, Service, StoreActionKind, Task } from '../../gen/flotilla/v1/objects.js';
import { createLogger } from '../../common/log.js';
import { FlotillaError } from '../../common/errors.js';
import { EtcdCluster, haveEtcd } from '../../test/helpers/etcd.js';
import { waitFor } from '../../test/helpers/wait.js';
import { MemoryStore, type StoreEvent } from '../store/store.js';
import { EtcdBackend, etcdClient } from './backend.js';

const log = createLogger('etcd-test');

function svc(id: string, name: string, labels: Record<string, string> = {}): Service {
  return Service.fromPartial({ id, spec: { name, labels } });
}

describe.skipIf(!haveEtcd())('etcd store backend (real etcd, 3 members, client TLS)', () => {
  const etcd = new EtcdCluster();
  const backends: EtcdBackend[] = [];
  const key = EtcdBackend.newSealKey();
  let n = 0;

  async function open(prefix: string, ttl = 2): Promise<{ store: MemoryStore; be: EtcdBackend; events: StoreEvent[][] }> {
    const store = new MemoryStore(log);
    const events: StoreEvent[][] = [];
    store.subscribe((e) => events.push(e));
    const be = new EtcdBackend(store, { endpoints: etcd.endpoints, prefix, ...etcd.tls(), leaseTtlS: ttl }, key, { nodeId: `m${n++}`, addr: `127.0.0.1:${1000 + n}` }, log);
    backends.push(be);
    store.setProposer(be);
    if (!(await EtcdBackend.inspect(be.client, prefix, key))) await EtcdBackend.claim(be.client, prefix, key);
    await be.start();
    return { store, be, events };
  }

  beforeAll(async () => {
    await etcd.start(3);
  }, 60_000);
  afterAll(async () => {
    await Promise.allSettled(backends.map((b) => b.stop()));
    await etcd.stop();
  });

  it('a write reaches every store as one event per object, then one commit marker per etcd revision', async () => {
    const a = await open('/t/events');
    const b = await open('/t/events');
    await a.store.update((tx) => {
      tx.create('service', svc('s1', 'web'));
      tx.create('service', svc('s2', 'db'));
    });
    expect(a.store.getService('s1')?.meta?.version).toBe(1);
    await waitFor('b sees both', () => b.store.services.size === 2);
    const last = b.events.filter((e) => e.some((x) => x.kind !== 'commit')).at(-1)!;
    expect(last.map((e) => e.kind)).toEqual(['create', 'create', 'commit']);
    const commit = last.at(-1) as { index: number };
    expect(commit.index).toBe(b.store.appliedIndex);
    // an update through b, seen by a with its old object
    await b.store.update((tx) => tx.update('service', { ...tx.get('service', 's1')!, spec: { ...tx.get('service', 's1')!.spec!, labels: { x: 'y' } } }));
    await waitFor('a sees the update', () => a.store.getService('s1')?.spec?.labels.x === 'y');
    const up = a.events.at(-1)!;
    expect(up[0]).toMatchObject({ kind: 'update', table: 'service' });
    expect(a.store.getService('s1')?.meta?.version).toBe(2);
  });

  it("a manager's own writes apply from the transactions' answers, in revision order, each revision once; a revision made by another waits for the watch", async () => {
    const a = await open('/t/own');
    const b = await open('/t/own');
    // both registered and campaigning: no more revisions but the test's own
    const candidates = (x: { be: EtcdBackend }): number => (x.be as unknown as { candidates: Map<string, unknown> }).candidates.size;
    await waitFor('both campaign', () => candidates(a) === 2 && candidates(b) === 2 && a.be.members().length === 2, 10_000);
    await a.store.update((tx) => tx.create('service', svc('o0', 'own')));
    await waitFor('b has o0', () => b.store.getService('o0') && b.store.appliedIndex === a.store.appliedIndex);
    // a's watch stops: its own writes still apply, from the transactions' answers
    const be = a.be as unknown as { cancelWatch(): void; watchFrom(r: number): Promise<void> };
    be.cancelWatch();
    const from = a.events.length;
    const t0 = Date.now();
    // 20 creates proposed in one event-loop turn commute (each compares only its own key): the
    // first goes at once (nothing else on its way), the 19 others as one etcd transaction, one
    // revision, one commit marker after the 19 events. Both transactions are in flight together, so
    // etcd may order either first: the store applies them in etcd's order
    await Promise.all(Array.from({ length: 20 }, (_, i) => a.store.update((tx) => tx.create('task', Task.fromPartial({ id: `o${i}`, serviceId: 'o', slot: i + 1 })))));
    expect(a.store.tasks.size).toBe(20);
    // then 10 more, one after another: one revision each, in order
    for (let i = 20; i < 30; i++) await a.store.update((tx) => tx.create('task', Task.fromPartial({ id: `o${i}`, serviceId: 'o', slot: i + 1 })));
    expect(a.store.tasks.size).toBe(30);
    const mine = a.events.slice(from);
    const single = ['create', 'commit'];
    const joint = [...Array.from({ length: 19 }, () => 'create'), 'commit'];
    const kinds = mine.map((e) => e.map((x) => x.kind));
    expect(kinds.slice(0, 2)).toEqual(kinds[0]!.length === 2 ? [single, joint] : [joint, single]);
    expect(kinds.slice(2)).toEqual(Array.from({ length: 10 }, () => single));
    expect(mine.flat().flatMap((x) => (x.kind === 'create' ? [x.object.id] : [])).sort()).toEqual(Array.from({ length: 30 }, (_, i) => `o${i}`).sort());
    const idx = mine.map((e) => (e.at(-1) as { index: number }).index);
    expect(idx).toEqual(idx.map((_, i) => idx[0]! + i));
    for (const e of mine) expect((e.at(-1) as { time?: number }).time).toBeGreaterThanOrEqual(t0);
    // b gets the same revisions through its watch: the same objects, commit indices and proposal times
    await waitFor('b has the 30 tasks', () => b.store.tasks.size === 30);
    const theirs = b.events.filter((e) => e.some((x) => x.kind === 'create' && x.table === 'task'));
    expect(theirs.map((e) => e.map((x) => (x.kind === 'commit' ? `${x.index}@${x.time}` : `${x.kind} ${x.object.id} v${x.object.meta?.version}`)))).toEqual(
      mine.map((e) => e.map((x) => (x.kind === 'commit' ? `${x.index}@${x.time}` : `${x.kind} ${x.object.id} v${x.object.meta?.version}`))),
    );
    // a revision made by b comes before a's next one: a's write waits for the watch to bring b's first
    await b.store.update((tx) => tx.create('service', svc('o1', 'by-b')));
    let done = false;
    const next = a.store.update((tx) => tx.create('service', svc('o2', 'by-a'))).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 300));
    expect(done).toBe(false);
    expect(a.store.getService('o1')).toBeUndefined();
    await be.watchFrom(a.store.appliedIndex + 1);
    await next;
    const tail = a.events.slice(-2).map((e) => e.map((x) => (x.kind === 'commit' ? 'commit' : x.object.id)));
    expect(tail).toEqual([
      ['o1', 'commit'],
      ['o2', 'commit'],
    ]);
  });

  it('values in etcd are sealed: no name or label in clear', async () => {
    const a = await open('/t/sealed');
    await a.store.update((tx) => tx.create('service', svc('s9', 'very-secret-name')));
    const c = await etcd.client();
    try {
      const all = await c.getAll().prefix('/t/sealed/store/').buffers();
      expect(Object.keys(all)).toEqual(['/t/sealed/store/service/s9']);
      for (const v of Object.values(all)) expect(v.toString('latin1')).not.toContain('very-secret-name');
    } finally {
      c.close();
    }
  });

  it('a stale version is ABORTED by etcd; update() re-runs on fresh state; names stay unique across managers', async () => {
    const a = await open('/t/conflict');
    const b = await open('/t/conflict');
    await a.store.update((tx) => tx.create('service', svc('c1', 'one')));
    await waitFor('b has c1', () => b.store.getService('c1'));
    // a raw proposal with the version b read, after a changed it: refused by the etcd compare
    const stale = b.store.getService('c1')!;
    await a.store.update((tx) => tx.update('service', { ...tx.get('service', 'c1')!, spec: { ...stale.spec!, labels: { by: 'a' } } }));
    const err = await b.be
      .propose({ proposalId: 'x', actions: [{ kind: 2, service: { ...stale, spec: { ...stale.spec!, labels: { by: 'b' } } } } as never], proposedAt: 0 })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FlotillaError);
    expect((err as FlotillaError).code).toBe('ABORTED');
    // 20 concurrent increments from two managers: none lost
    await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        (i % 2 ? a : b).store.update((tx) => {
          const s = tx.get('service', 'c1')!;
          tx.update('service', { ...s, spec: { ...s.spec!, labels: { n: String(Number(s.spec!.labels.n ?? 0) + 1) } } });
        }),
      ),
    );
    await waitFor('both at 20', () => a.store.getService('c1')?.spec?.labels.n === '20' && b.store.getService('c1')?.spec?.labels.n === '20');
    // the same name created on both at once: exactly one wins
    const r = await Promise.allSettled([a.store.update((tx) => tx.create('service', svc('d1', 'dup'))), b.store.update((tx) => tx.create('service', svc('d2', 'dup')))]);
    expect(r.filter((x) => x.status === 'fulfilled')).toHaveLength(1);
    const rej = r.find((x) => x.status === 'rejected') as PromiseRejectedResult;
    expect((rej.reason as FlotillaError).code).toBe('ALREADY_EXISTS');
  });

  it('writes of one turn share a transaction only when they commute; a failed joint transaction answers each write on its own', async () => {
    const a = await open('/t/merge');
    const b = await open('/t/merge');
    await a.store.update((tx) => tx.create('service', svc('m1', 'm1')));
    await waitFor('b has m1', () => b.store.getService('m1'));
    // b's watch pauses, so b still holds m1's first version when a updates it
    const be = b.be as unknown as { cancelWatch(): void; watchFrom(r: number): Promise<void> };
    be.cancelWatch();
    const stale = b.store.getService('m1')!;
    await a.store.update((tx) => tx.update('service', { ...tx.get('service', 'm1')!, spec: { ...stale.spec!, labels: { by: 'a' } } }));
    // the etcd transactions b sends: how many store objects each compares
    const kv = b.be.client.kv as unknown as { txn(req: { compare: Array<{ key: Buffer }> }): Promise<unknown> };
    const txn = kv.txn.bind(kv);
    const sent: number[] = [];
    kv.txn = (req) => {
      sent.push(req.compare.filter((c) => c.key.toString().includes('/store/')).length);
      return txn(req);
    };
    // b, in one turn: a create of m0 (nothing on its way to etcd: it goes at once), then a stale
    // update of m1 (its compare fails) and a create of m2, which commute, so they go as one
    // transaction, which etcd refuses; each is then sent again on its own
    const before = b.store.appliedIndex;
    const first = b.be.propose({ proposalId: 'w', actions: [{ kind: StoreActionKind.STORE_ACTION_KIND_CREATE, service: svc('m0', 'm0') } as never], proposedAt: 0 });
    const both = Promise.allSettled([
      b.be.propose({ proposalId: 'x', actions: [{ kind: StoreActionKind.STORE_ACTION_KIND_UPDATE, service: { ...stale, spec: { ...stale.spec!, labels: { by: 'b' } } } } as never], proposedAt: 0 }),
      b.be.propose({ proposalId: 'y', actions: [{ kind: StoreActionKind.STORE_ACTION_KIND_CREATE, service: svc('m2', 'm2') } as never], proposedAt: 0 }),
    ]);
    await waitFor('four transactions sent', () => sent.length === 4);
    await be.watchFrom(b.store.appliedIndex + 1);
    await first;
    const [stl, fresh] = await both;
    expect(sent).toEqual([1, 2, 1, 1]);
    expect(stl.status === 'rejected' && (stl.reason as FlotillaError).code).toBe('ABORTED');
    expect(fresh.status === 'rejected' ? String(fresh.reason) : 'fulfilled').toBe('fulfilled');
    expect(b.store.getService('m2')?.meta?.version).toBe(1);
    expect(b.store.getService('m1')?.spec?.labels.by).toBe('a');
    // two updates of one object in one turn never share a transaction: one commits, the other
    // conflicts and update() runs it again
    const bump = (): Promise<void> =>
      b.store.update((tx) => {
        const s = tx.get('service', 'm2')!;
        tx.update('service', { ...s, spec: { ...s.spec!, labels: { n: String(Number(s.spec!.labels.n ?? 0) + 1) } } });
      });
    await Promise.all([bump(), bump(), bump()]);
    expect(b.store.getService('m2')?.spec?.labels.n).toBe('3');
    expect(b.store.appliedIndex).toBeGreaterThan(before);
    await waitFor('a sees n=3', () => a.store.getService('m2')?.spec?.labels.n === '3');
  });

  it("refuses an object over etcd's request limit with a clear message", async () => {
    const a = await open('/t/big');
    const big = svc('b1', 'big', { x: 'y'.repeat(1_600_000) });
    const err = await a.store.update((tx) => tx.create('service', big)).catch((e: unknown) => e);
    expect((err as FlotillaError).code).toBe('RESOURCE_EXHAUSTED');
    expect((err as Error).message).toMatch(/^a store write of \d+ bytes is over etcd's request limit of 1572864 bytes \(--max-request-bytes\): make the object smaller$/);
    expect(a.store.getService('b1')).toBeUndefined();
  });

  it("many changes: updateBatched splits under etcd's per-transaction operation cap; one update() over it is refused", async () => {
    const a = await open('/t/many');
    const b = await open('/t/many');
    await a.store.updateBatched((tx) => {
      for (let i = 0; i < 300; i++) tx.create('task', Task.fromPartial({ id: `t${i}`, serviceId: 's', slot: i + 1 }));
    });
    expect(a.store.tasks.size).toBe(300);
    await waitFor('b has all 300', () => b.store.tasks.size === 300);
    const err = await a.store
      .update((tx) => {
        for (let i = 0; i < 300; i++) tx.create('task', Task.fromPartial({ id: `u${i}`, serviceId: 's', slot: i + 1 }));
      })
      .catch((e: unknown) => e);
    expect((err as FlotillaError).code).toBe('RESOURCE_EXHAUSTED');
    expect(a.store.tasks.size).toBe(300);
  });

  it('relists cleanly when its watch revision was compacted while it was away', async () => {
    const a = await open('/t/compact');
    await a.store.update((tx) => tx.create('node', { id: 'n1', meta: undefined, spec: { labels: {}, desiredRole: NodeRole.NODE_ROLE_WORKER, availability: NodeAvailability.NODE_AVAILABILITY_ACTIVE }, description: undefined, status: { state: NodeState.NODE_STATE_READY, message: '', addr: '', lastHeartbeat: 0 }, managerStatus: undefined, role: NodeRole.NODE_ROLE_WORKER, certificateExpiryMs: 0, certificateIssuer: '' }));
    const b = await open('/t/compact');
    await waitFor('b has n1', () => b.store.getNode('n1'));
    // b goes away (its watch stops), a writes, etcd compacts past b's revision, b comes back
    (b.be as unknown as { cancelWatch(): void }).cancelWatch();
    const from = b.store.appliedIndex;
    await a.store.update((tx) => tx.delete('node', 'n1'));
    await a.store.update((tx) => tx.create('service', svc('after', 'after')));
    const c = await etcd.client();
    try {
      const rev = (await c.get('/t/compact/rev').exec()).header.revision;
      await c.kv.compact({ revision: rev, physical: true });
    } finally {
      c.close();
    }
    // b watches from its old revision again: etcd says compacted, b relists
    await (b.be as unknown as { watchFrom(r: number): Promise<void> }).watchFrom(from + 1);
    await waitFor('b relisted', () => b.store.getService('after') && !b.store.getNode('n1'));
    const evs = b.events.flat();
    expect(evs.some((e) => e.kind === 'delete' && e.table === 'node')).toBe(true);
  });

  it("fencing: a deposed leader's late write fails, and it steps down", async () => {
    const a = await open('/t/fence');
    await waitFor('a leads', () => a.be.isLeader(), 10_000);
    await a.store.update((tx) => tx.create('service', svc('f1', 'f')));
    const transitions: boolean[] = [];
    a.be.onLeadershipChange((l) => transitions.push(l));
    // a write from the leader loops' context, made after its election key is gone
    const c = await etcd.client();
    const late = a.be.fenced(async () => {
      await c.delete().prefix('/t/fence/election/').exec();
      const s = a.store.getService('f1')!;
      return a.store.update((tx) => tx.update('service', { ...s, spec: { ...s.spec!, labels: { late: '1' } } }));
    });
    const err = await late.catch((e: unknown) => e);
    c.close();
    expect((err as FlotillaError).code).toBe('FAILED_PRECONDITION');
    expect(a.store.getService('f1')?.spec?.labels.late).toBeUndefined();
    expect(transitions[0]).toBe(false);
    // it campaigns again and leads again
    await waitFor('a leads again', () => a.be.isLeader(), 10_000);
  });

  it('a member that never answers is given up for the next one: the watch resumes there', async () => {
    // a TCP listener that accepts and never speaks: a blackholed etcd endpoint
    const sockets: net.Socket[] = [];
    const silent = net.createServer((c) => sockets.push(c));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const dead = `https://127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
    try {
      const a = await open('/t/silent');
      const b = await open('/t/silent');
      // b's watch breaks, and the next endpoint it tries is the silent one (etcd3's own calls keep
      // the live members: only the watch's endpoint list is changed)
      const bb = b.be as unknown as { opts: { endpoints: string[] }; watchClients: Map<number, unknown>; watchEndpoint: number; cancelWatch(): void; rewatch(): void };
      bb.opts = { ...bb.opts, endpoints: [dead, ...etcd.endpoints] };
      bb.watchClients.clear();
      bb.watchEndpoint = -1;
      const t0 = Date.now();
      bb.cancelWatch();
      bb.rewatch();
      await a.store.update((tx) => tx.create('service', svc('s1', 'silent')));
      await waitFor('b sees the write through a live member', () => b.store.getService('s1'), 15_000);
      // given up after the creation timeout (5 s), not hung
      expect(Date.now() - t0).toBeGreaterThanOrEqual(4_500);
      expect(bb.watchEndpoint % 4).not.toBe(0);
    } finally {
      for (const c of sockets) c.destroy();
      silent.close();
    }
  }, 30_000);

  it("etcd3's own calls to a member that never answers end at their deadline and go on through a live one", async () => {
    const sockets: net.Socket[] = [];
    const silent = net.createServer((c) => sockets.push(c));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const dead = `https://127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
    const client = etcdClient({ endpoints: [dead, etcd.endpoints[0]!], prefix: '/t/deadline', ...etcd.tls(), callTimeoutMs: 1000 });
    try {
      // etcd3 picks a member at random per call: call until one went to the silent member (bounded)
      const took: number[] = [];
      for (let i = 0; i < 40 && (i === 0 || sockets.length === 0); i++) {
        const t0 = Date.now();
        // a call may also fail when etcd3's retries all land on the silent member: it must end either way
        await (i === 0 ? client.put('/t/deadline/k').value('v') : client.get('/t/deadline/k').string()).catch(() => undefined);
        took.push(Date.now() - t0);
      }
      expect(sockets.length, 'a call went to the silent member').toBeGreaterThan(0);
      // it ended at its deadline (1 s, up to 3 attempts), not never; afterwards the live member answers
      expect(Math.max(...took)).toBeLessThan(3 * 1000 + 2000);
      expect(Math.max(...took)).toBeGreaterThanOrEqual(900);
      await waitFor('a later call answered', async () => (await client.get('/t/deadline/k').string()) === 'v', 15_000, 0);
    } finally {
      client.close();
      for (const c of sockets) c.destroy();
      silent.close();
    }
  }, 30_000);

  it('large stores and responses: a relist reads in pages at one revision; a watch response etcd splits into fragments is put back together', async () => {
    const a = await open('/t/large');
    const b = await open('/t/large');
    // b's watch pauses; a writes 3 revisions of 3 tasks of ~400 KB each: b's catch-up response
    // (~3.6 MB) is over what etcd sends at once (its request limit plus 512 KiB), so etcd sends it in
    // fragments, and the first boundary falls inside the second revision
    (b.be as unknown as { cancelWatch(): void }).cancelWatch();
    const big = (id: string, slot: number): Task => Task.fromPartial({ id, serviceId: 'large', slot, serviceName: `${id}-`.padEnd(400_000, 'x') });
    for (let r = 0; r < 3; r++) await a.store.update((tx) => [0, 1, 2].forEach((k) => tx.create('task', big(`big${r}-${k}`, r * 3 + k + 1))));
    const from = b.store.appliedIndex;
    const commits: number[] = [];
    b.store.subscribe((evs) => {
      for (const e of evs) if (e.kind === 'commit') commits.push(e.index);
    });
    await (b.be as unknown as { watchFrom(r: number): Promise<void> }).watchFrom(from + 1);
    await waitFor('b has the 9 large tasks', () => b.store.tasks.size === 9, 15_000);
    for (const t of b.store.tasks.values()) expect(t.serviceName).toBe(`${t.id}-`.padEnd(400_000, 'x'));
    // each revision whole, once: 3 commits, in order
    expect(commits).toHaveLength(3);
    expect(commits).toEqual([...commits].sort((x, y) => x - y));
    // a new manager lists 9 large and 100 small tasks: pages of 40 keys, at one revision
    await a.store.updateBatched((tx) => {
      for (let i = 0; i < 100; i++) tx.create('task', Task.fromPartial({ id: `small${i}`, serviceId: 'large', slot: 100 + i }));
    });
    const store = new MemoryStore(log);
    const be = new EtcdBackend(store, { endpoints: etcd.endpoints, prefix: '/t/large', ...etcd.tls(), leaseTtlS: 2 }, key, { nodeId: `m${n++}`, addr: '127.0.0.1:1998' }, log);
    backends.push(be);
    store.setProposer(be);
    const kv = be.client.kv as unknown as { range(req: { revision?: number }): Promise<unknown> };
    const range = kv.range.bind(kv);
    const revisions: Array<number | undefined> = [];
    kv.range = (req) => {
      revisions.push(req.revision);
      return range(req);
    };
    await be.start();
    expect(store.tasks.size).toBe(109);
    expect(store.appliedIndex).toBe(a.store.appliedIndex);
    // at least 3 pages (109 store keys, plus names, managers, the election and the marker), the
    // first at the current revision, every later one at the first one's
    const pages = revisions.slice(0, revisions.indexOf(undefined, 1) === -1 ? undefined : revisions.indexOf(undefined, 1));
    expect(pages.length).toBeGreaterThanOrEqual(3);
    expect(pages[0]).toBeUndefined();
    expect(new Set(pages.slice(1)).size).toBe(1);
    expect(pages[1]).toBeGreaterThan(0);
  }, 60_000);

  // last: it kills an etcd member
  it('a broken watch stream resumes from the next revision on another member, without a relist', async () => {
    const a = await open('/t/resume');
    const b = await open('/t/resume');
    await a.store.update((tx) => tx.create('service', svc('r0', 'r0')));
    await waitFor('b has r0', () => b.store.getService('r0'));
    const bb = b.be as unknown as { watchEndpoint: number; doRelist(): Promise<void> };
    let relists = 0;
    const doRelist = bb.doRelist.bind(bb);
    bb.doRelist = () => {
      relists++;
      return doRelist();
    };
    const on = bb.watchEndpoint % 3;
    await etcd.kill(on);
    try {
      // a's writes go on through the other members (etcd3 fails over; a write may fail while it does)
      for (let i = 1; i <= 20; i++) {
        const id = `r${i}`;
        await waitFor(`a writes ${id}`, async () => {
          await a.store.update((tx) => tx.create('task', Task.fromPartial({ id, serviceId: 'r0', slot: i }))).catch(() => undefined);
          return a.store.getTask(id);
        }, 20_000);
      }
      await waitFor('b has the 20 tasks', () => b.store.tasks.size === 20, 20_000);
      expect(bb.watchEndpoint % 3).not.toBe(on);
      expect(relists).toBe(0);
      // each task reached b once, as a create, in a's order
      const created = b.events.flat().flatMap((e) => (e.kind === 'create' && e.table === 'task' ? [e.object.id] : []));
      expect(created).toEqual(Array.from({ length: 20 }, (_, i) => `r${i + 1}`));
      expect(b.store.appliedIndex).toBe(a.store.appliedIndex);
    } finally {
      etcd.startMember(on);
    }
  });
});
