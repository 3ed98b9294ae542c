/**
 * Raft across real processes (dist/test/helpers/raft-kv.js): writes keep flowing while the leader
 * is killed with SIGKILL, a follower is frozen with SIGSTOP, members are added and removed, keys are
 * overwritten and everyone is killed with SIGKILL and restarts; at the end every acknowledged write is on
 * every node with its last acknowledged value.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { builtRaftKv, dump, findLeader, killKv, put, spawnKv, status, type KvProc } from './helpers/raft-kv-procs.js';
import { waitFor } from './helpers/wait.js';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-raftproc-'));
const procs = new Set<KvProc>();

afterAll(async () => {
  try {
    await Promise.all([...procs].map((p) => killKv(p, 'SIGKILL')));
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

async function start(name: string, opts: Parameters<typeof spawnKv>[2] = {}): Promise<KvProc> {
  const p = await spawnKv(name, path.join(root, name), { tickMs: 100, ...opts });
  procs.add(p);
  return p;
}

async function restart(p: KvProc): Promise<KvProc> {
  procs.delete(p);
  return start(p.name, { raftPort: p.raftPort, httpPort: p.httpPort });
}

const alive = (p: KvProc): boolean => p.child.exitCode === null && p.child.signalCode === null;

describe.skipIf(!builtRaftKv())('raft across processes (needs npm run build)', () => {
  it('keeps every acknowledged write through kill -9, SIGSTOP, membership changes and restarts', async () => {
    const a = await start('a');
    await waitFor('a leads', async () => (await status(a))?.leader);
    const b = await start('b', { join: a.addr });
    const c = await start('c', { join: a.addr });
    let nodes: KvProc[] = [a, b, c];
    await waitFor('3 voters', async () => (await status(a))?.members.filter((m) => !m.learner).length === 3);

    // writers: each sends sequential puts to the node it thinks leads, re-finding it on failure
    /** every acknowledged key with the value it must have */
    const acked = new Map<string, string>();
    let stopWriters = false;
    let lastAck = Date.now();
    let target: KvProc | undefined = a;
    const writer = async (w: number): Promise<void> => {
      for (let i = 0; !stopWriters; i++) {
        const key = `w${w}-${i}`;
        const value = `v${w}.${i}.${'x'.repeat(i % 40)}`;
        for (;;) {
          if (stopWriters) return;
          const t = target;
          if (t && alive(t) && (await put(t, key, value))) {
            acked.set(key, value);
            lastAck = Date.now();
            break;
          }
          target = await findLeader(nodes.filter(alive));
          if (!target) await new Promise((r) => setTimeout(r, 50));
        }
      }
    };
    const writers = [0, 1, 2, 3].map((w) => writer(w));
    try {
      await waitFor('some writes', () => acked.size > 200, 20_000);

      // 1. kill -9 the leader under writes; a survivor accepts writes again within a few seconds
      const leader = (await findLeader(nodes))!;
      const killedAt = Date.now();
      await killKv(leader, 'SIGKILL');
      await waitFor('writes after the kill', () => lastAck > killedAt, 10_000, 10);
      const failoverMs = lastAck - killedAt;
      expect(failoverMs).toBeLessThan(5000);
      console.log(`raft processes: kill -9 of the leader -> next acknowledged write in ${failoverMs} ms`);
      const restarted = await restart(leader);
      nodes = nodes.map((n) => (n === leader ? restarted : n));
      const n1 = acked.size;
      await waitFor('writes continue', () => acked.size > n1 + 200, 20_000);

      // 2. freeze a follower for 2 s, then thaw it
      const cur = (await findLeader(nodes))!;
      const frozen = nodes.find((n) => n !== cur)!;
      frozen.child.kill('SIGSTOP');
      const n2 = acked.size;
      await waitFor('writes while frozen', () => acked.size > n2 + 100, 20_000);
      await new Promise((r) => setTimeout(r, 1000));
      frozen.child.kill('SIGCONT');

      // 3. add a fourth member, then remove one of the first three
      const d = await start('d', { join: nodes[1]!.addr });
      nodes.push(d);
      await waitFor('d is a voter', async () => (await status((await findLeader(nodes))!))?.members.some((m) => m.raftId === d.id && !m.learner));
      const l3 = (await findLeader(nodes))!;
      const victim = nodes.find((n) => n !== l3 && n !== d)!;
      await waitFor('victim removed', async () => {
        const l = await findLeader(nodes);
        if (!l) return false;
        const r = await fetch(`http://127.0.0.1:${l.httpPort}/members/${victim.id}`, { method: 'DELETE' });
        return r.status === 204 || r.status === 404;
      });
      await killKv(victim, 'SIGKILL');
      procs.delete(victim);
      nodes = nodes.filter((n) => n !== victim);
      const n3 = acked.size;
      await waitFor('writes after the membership change', () => acked.size > n3 + 100, 20_000);
    } finally {
      stopWriters = true;
      await Promise.all(writers);
    }

    const tOver = Date.now();
    // 4. overwrite some keys (one acknowledged write at a time): the last value must win everywhere
    let l = await findLeader(nodes.filter(alive));
    for (const key of [...acked.keys()].filter((_, i) => i % 10 === 0).slice(0, 100)) {
      const value = `over-${key}`;
      await waitFor(`overwrite ${key}`, async () => {
        if (l && (await put(l, key, value))) return true;
        l = await findLeader(nodes.filter(alive));
        return false;
      }, 20_000, 20);
      acked.set(key, value);
    }

    const tKill = Date.now();
    // 5. kill -9 everyone at once and restart from disk: what was acknowledged was synced
    await Promise.all(nodes.map((n) => killKv(n, 'SIGKILL')));
    const again: KvProc[] = [];
    for (const n of nodes) again.push(await restart(n));
    await waitFor('a leader after the full restart', () => findLeader(again), 20_000);
    const tUp = Date.now();
    expect(acked.size).toBeGreaterThan(500);
    console.log(`raft processes: ${acked.size} acknowledged writes (values) checked on ${again.length} nodes`);
    for (const n of again) {
      const st = await waitFor(`${n.name} dump`, async () => dump(n), 20_000);
      const missing = [...acked.keys()].filter((k) => st[k] === undefined);
      expect(missing.slice(0, 10), `${n.name} misses ${missing.length} acknowledged writes`).toEqual([]);
      const wrong = [...acked].filter(([k, v]) => st[k] !== v).map(([k, v]) => `${k}: ${st[k]} != ${v}`);
      expect(wrong.slice(0, 10), `${n.name} has ${wrong.length} wrong values`).toEqual([]);
      const members = (await status(n))!.members.map((m) => m.raftId).sort();
      expect(members).toEqual(again.map((x) => x.id).sort());
    }
    console.log(`raft processes: overwrites ${tKill - tOver} ms, kill -9 all + restart + election ${tUp - tKill} ms, checks ${Date.now() - tUp} ms`);
  }, 90_000);
});
