import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { RaftNode, type StateMachine } from './node.js';
import { freePort, waitFor as poll } from '../../test/helpers/wait.js';

class Kv implements StateMachine {
  map = new Map<string, string>();
  apply(data: Uint8Array): void {
    const { k, v } = JSON.parse(Buffer.from(data).toString()) as { k: string; v: string };
    if (k === 'boom') throw new Error('the state machine refused boom');
    this.map.set(k, v);
  }
  snapshot(): Uint8Array {
    return Buffer.from(JSON.stringify([...this.map]));
  }
  restore(data: Uint8Array): void {
    this.map = new Map(JSON.parse(Buffer.from(data).toString()) as [string, string][]);
  }
}

const put = (k: string, v: string): Buffer => Buffer.from(JSON.stringify({ k, v }));

const waitFor = <T>(what: string, fn: () => T | undefined | false, timeoutMs = 10_000): Promise<T> => poll(what, fn, timeoutMs, 20);

interface Member {
  node: RaftNode;
  kv: Kv;
  dir: string;
  port: number;
  ac: AbortController;
}

const roots: string[] = [];
const running = new Set<Member>();

afterEach(async () => {
  for (const m of running) {
    m.ac.abort();
    await m.node.stop();
  }
  running.clear();
  for (const r of roots.splice(0)) fs.rmSync(r, { recursive: true, force: true });
});

function root(): string {
  const r = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-raftnode-'));
  roots.push(r);
  return r;
}

async function startMember(dir: string, opts: { port?: number; join?: string; snapshotEvery?: number; compactKeep?: number; forceNewCluster?: boolean; queueSize?: number } = {}): Promise<Member> {
  const port = opts.port ?? (await freePort());
  const kv = new Kv();
  const ac = new AbortController();
  const node = await RaftNode.open({
    dataDir: dir,
    listenAddr: `127.0.0.1:${port}`,
    join: opts.join,
    joinToken: 'secret',
    stateMachine: kv,
    signal: ac.signal,
    tickMs: 50,
    snapshotEvery: opts.snapshotEvery,
    compactKeep: opts.compactKeep,
    forceNewCluster: opts.forceNewCluster,
    queueSize: opts.queueSize,
  });
  const m = { node, kv, dir, port, ac };
  running.add(m);
  return m;
}

async function stopMember(m: Member): Promise<void> {
  running.delete(m);
  m.ac.abort();
  await m.node.stop();
}

const leaderOf = (ms: Member[]): Member | undefined => ms.find((m) => running.has(m) && m.node.isLeader());

async function cluster3(r: string, extra: Parameters<typeof startMember>[1] = {}): Promise<Member[]> {
  const a = await startMember(path.join(r, 'a'), extra);
  await waitFor('a leads', () => a.node.isLeader());
  const b = await startMember(path.join(r, 'b'), { ...extra, join: a.node.addr });
  const c = await startMember(path.join(r, 'c'), { ...extra, join: a.node.addr });
  await waitFor('3 voters', () => a.node.members().filter((m) => !m.learner).length === 3);
  return [a, b, c];
}

describe('RaftNode over gRPC on loopback', () => {
  it('a single node elects itself, applies proposals, and rejects a failing apply to its proposer', async () => {
    const a = await startMember(path.join(root(), 'a'));
    await waitFor('leader', () => a.node.isLeader());
    await a.node.propose(put('x', '1'));
    expect(a.kv.map.get('x')).toBe('1');
    await expect(a.node.propose(put('boom', '1'))).rejects.toThrow(/refused boom/);
    await a.node.readIndex();
    expect(a.node.members()).toEqual([{ raftId: a.node.id, addr: a.node.addr, reachable: true, leader: true, learner: false }]);
  });

  it('three nodes: join, replicate, propose from a follower, fail over within ~2 s, restart from disk', async () => {
    const r = root();
    const ms = await cluster3(r);
    const [a, b, c] = ms as [Member, Member, Member];
    const changes: boolean[] = [];
    b.node.onLeadershipChange((l) => changes.push(l));
    for (let i = 0; i < 50; i++) await a.node.propose(put(`k${i}`, `v${i}`));
    await b.node.propose(put('from-b', 'yes')); // forwarded to the leader, resolves once applied on b
    expect(b.kv.map.get('from-b')).toBe('yes');
    await c.node.readIndex();
    expect(c.kv.map.get('k49')).toBe('v49');
    expect(c.kv.map.get('from-b')).toBe('yes');
    expect(b.node.leaderId()).toBe(a.node.id);
    expect(b.node.leaderAddr()).toBe(a.node.addr);

    // kill the leader: a new one within ~2 s (tick 50 ms here, election 10 ticks: 0.5-1 s)
    const t0 = Date.now();
    await stopMember(a);
    const nl = await waitFor('new leader', () => leaderOf([b, c]), 5000);
    const failover = Date.now() - t0;
    expect(failover).toBeLessThan(2500);
    await nl.node.propose(put('after', 'failover'));
    const members = nl.node.members();
    expect(members.find((m) => m.raftId === a.node.id)?.reachable).toBe(false);

    // restart everyone from disk: same state
    const ports = [a.port, b.port, c.port];
    await stopMember(b);
    await stopMember(c);
    const a2 = await startMember(a.dir, { port: ports[0] });
    const b2 = await startMember(b.dir, { port: ports[1] });
    const c2 = await startMember(c.dir, { port: ports[2] });
    expect(a2.node.id).toBe(a.node.id);
    const l2 = await waitFor('leader after restart', () => leaderOf([a2, b2, c2]), 8000);
    await l2.node.propose(put('after', 'restart'));
    for (const m of [a2, b2, c2]) {
      await m.node.readIndex();
      expect(m.kv.map.get('k0')).toBe('v0');
      expect(m.kv.map.get('k49')).toBe('v49');
      expect(m.kv.map.get('after')).toBe('restart');
    }
  });

  it('adds and removes members, refusing a removal that loses quorum unless forced', async () => {
    const r = root();
    const [a, b, c] = (await cluster3(r)) as [Member, Member, Member];
    await a.node.propose(put('x', '1'));
    await stopMember(c);
    await waitFor('c unreachable', () => a.node.members().find((m) => m.raftId === c.node.id)?.reachable === false);
    // removing b would leave a and c, of which only a is up: refused
    await expect(a.node.removeMember(b.node.id)).rejects.toThrow(/short of a quorum/);
    // removing c (down) leaves a and b, both up: fine (also from a follower, forwarded)
    await b.node.removeMember(c.node.id);
    await waitFor('2 voters', () => a.node.members().length === 2 && b.node.members().length === 2);
    await a.node.propose(put('y', '2'));
    // a fourth member joins through a follower
    const d = await startMember(path.join(r, 'd'), { join: b.node.addr });
    await waitFor('d is a voter', () => a.node.members().some((m) => m.raftId === d.node.id && !m.learner));
    await d.node.readIndex();
    expect(d.kv.map.get('y')).toBe('2');
    // joining with a wrong token is refused
    await expect(
      RaftNode.open({ dataDir: path.join(r, 'e'), listenAddr: '127.0.0.1:0', join: a.node.addr, joinToken: 'wrong', stateMachine: new Kv(), signal: new AbortController().signal }),
    ).rejects.toThrow(/invalid join token/);
  });

  it('a new member catches up from a snapshot after compaction', async () => {
    const r = root();
    const a = await startMember(path.join(r, 'a'), { snapshotEvery: 200, compactKeep: 10 });
    await waitFor('leader', () => a.node.isLeader());
    const batch: Promise<void>[] = [];
    for (let i = 0; i < 1000; i++) batch.push(a.node.propose(put(`k${i}`, `v${i}`)));
    await Promise.all(batch);
    expect(a.node.status().progress[a.node.id]).toBeDefined();
    const snaps = fs.readdirSync(path.join(a.dir, 'snap'));
    expect(snaps.length).toBeGreaterThan(0);
    const b = await startMember(path.join(r, 'b'), { join: a.node.addr, snapshotEvery: 200, compactKeep: 10 });
    await waitFor('b caught up', () => b.kv.map.size === 1000, 10_000);
    expect(fs.readdirSync(path.join(b.dir, 'snap')).length).toBeGreaterThan(0);
    await waitFor('b is a voter', () => a.node.members().some((m) => m.raftId === b.node.id && !m.learner));
    await b.node.propose(put('late', 'x'));
    expect(a.kv.map.get('late')).toBe('x');
  });

  it('drops messages to a down peer (bounded queue) and recovers with --force-new-cluster', async () => {
    const r = root();
    const [a, b, c] = (await cluster3(r, { queueSize: 64 })) as [Member, Member, Member];
    await stopMember(c);
    for (let i = 0; i < 300; i++) await a.node.propose(put(`k${i}`, 'v'));
    const st = a.node.peerStatus().find((p) => p.id === c.node.id)!;
    expect(st.queued).toBeLessThanOrEqual(64);
    expect(st.dropped).toBeGreaterThan(0);
    // lose quorum: b goes too; a can no longer commit
    await stopMember(b);
    await waitFor('a steps down', () => !a.node.isLeader(), 5000);
    await stopMember(a);
    const a2 = await startMember(a.dir, { port: a.port, forceNewCluster: true });
    await waitFor('a2 leads alone', () => a2.node.isLeader());
    expect(a2.kv.map.get('k299')).toBe('v');
    expect(a2.node.members().map((m) => m.raftId)).toEqual([a.node.id]);
    await a2.node.propose(put('alone', 'yes'));
    // and again from disk, without the flag
    await stopMember(a2);
    const a3 = await startMember(a.dir, { port: a.port });
    await waitFor('a3 leads', () => a3.node.isLeader());
    await a3.node.readIndex();
    expect(a3.kv.map.get('alone')).toBe('yes');
    expect(a3.kv.map.size).toBe(301);
  });
});
