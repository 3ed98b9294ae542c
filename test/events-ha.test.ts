/**
 * `flotilla events` across a leader change, with real manager processes on loopback: the CLI
 * watches through the leader's control socket (with the two others named for failover), the leader
 * is killed (-9) under a stream of writes, and the CLI resumes on another manager. Every
 * acknowledged write shows up exactly once, in log order. Also --since/--until and a bad filter.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Control } from '../cli/client.js';
import { ServiceSpec } from '../gen/flotilla/v1/objects.js';
import type { ListNodesResponse } from '../gen/flotilla/v1/control.js';
import { builtCli, cli, start, stopProc, waitFor, type Proc } from './helpers/procs.js';

interface Mgr {
  name: string;
  dir: string;
  sock: string;
  addr: string;
  proc?: Proc;
}

interface Ev {
  revision: number;
  index: number;
  time: string;
  type: string;
  action: string;
  name: string;
}

const spec = (name: string) => ServiceSpec.fromPartial({ name, replicas: 0, task: { container: { image: 'busybox:latest', args: ['sleep', '1000'] } } });

describe.skipIf(!builtCli())('events across a leader change (3 managers as processes)', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-events-'));
  const mgrs: Mgr[] = ['e1', 'e2', 'e3'].map((name) => ({ name, dir: path.join(root, name), sock: path.join(root, `${name}.sock`), addr: '' }));
  const acked: string[] = [];
  let watcher: Proc | undefined;
  let leaderName = '';

  async function launch(m: Mgr, extra: string[] = []): Promise<void> {
    const args = ['manager', '--data-dir', m.dir, '--hostname', m.name, '--listen-addr', '127.0.0.1:0', '--control-socket', m.sock, '--no-agent', '--heartbeat-period', '500ms', ...extra];
    const p = start(args);
    m.proc = p;
    m.addr = await waitFor(`${m.name} ready`, () => p.out.join('').match(/listening on (\S+?)[,\s]/)?.[1] ?? (p.child.exitCode !== null ? Promise.reject(new Error(p.err.join(''))) : undefined), 40_000, 50);
  }
  async function leader(): Promise<string> {
    for (const m of mgrs.filter((x) => x.proc)) {
      const c = new Control(`unix:${m.sock}`);
      try {
        const r = await c.call<unknown, ListNodesResponse>('listNodes', {}, 5000);
        const l = r.nodes.find((n) => n.managerStatus?.leader)?.description?.hostname;
        if (l) return l;
      } catch {
        // try the next
      } finally {
        c.close();
      }
    }
    return '';
  }
  async function write(name: string): Promise<boolean> {
    for (const m of mgrs.filter((x) => x.proc)) {
      const c = new Control(`unix:${m.sock}`);
      try {
        await c.call('createService', { spec: spec(name) }, 5000);
        acked.push(name);
        return true;
      } catch {
        // another manager
      } finally {
        c.close();
      }
    }
    return false;
  }
  const printed = (p: Proc): Ev[] =>
    p.out
      .join('')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Ev);

  beforeAll(async () => {
    await launch(mgrs[0]!);
    const r = await cli(['cluster', 'join-token', 'manager', '-q'], { FLOTILLA_HOST: `unix://${mgrs[0]!.sock}` });
    const token = r.stdout.trim();
    await launch(mgrs[1]!, ['--join', mgrs[0]!.addr, '--token', token]);
    await launch(mgrs[2]!, ['--join', mgrs[0]!.addr, '--token', token]);
    await waitFor('a leader', async () => (leaderName = await leader()) !== '', 20_000);
  }, 120_000);
  afterAll(async () => {
    try {
      if (watcher) await stopProc(watcher, 'SIGKILL');
      await Promise.all(mgrs.map((m) => (m.proc ? stopProc(m.proc, 'SIGTERM') : Promise.resolve())));
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  it('resumes on another manager after the leader is killed: every write once, in order', async () => {
    const lead = mgrs.find((m) => m.name === leaderName)!;
    // the leader first, then the others: the CLI fails over in that order
    const hosts = [lead, ...mgrs.filter((m) => m !== lead)].map((m) => `unix://${m.sock}`).join(',');
    watcher = start(['events', '--format', 'json', '--filter', 'type=service', '--filter', 'event=create', '-H', hosts]);
    // the stream is open once the CLI sees the first event: write until one shows
    await waitFor('the watcher prints', async () => {
      await write(`ev${acked.length}`);
      return printed(watcher!).length > 0;
    }, 20_000, 100);
    // writes acknowledged before the stream opened are not expected (the CLI starts "from now")
    const from = acked.indexOf(printed(watcher).at(0)!.name);
    expect(from).toBeGreaterThanOrEqual(0);
    for (let i = 0; i < 10; i++) await write(`ev${acked.length}`);
    const t0 = Date.now();
    await stopProc(lead.proc!, 'SIGKILL');
    lead.proc = undefined;
    // writes go on through the survivors (once a new leader is elected)
    let n = 0;
    const deadline = Date.now() + 30_000;
    while (n < 15 && Date.now() < deadline) if (await write(`ev${acked.length}`)) n++;
    expect(n).toBe(15);
    const failover = Date.now() - t0;
    await waitFor('every acknowledged write printed', () => {
      const names = new Set(printed(watcher!).map((e) => e.name));
      return acked.slice(from).every((a) => names.has(a));
    }, 30_000, 100).catch((err: unknown) => {
      const got = new Set(printed(watcher!).map((e) => e.name));
      throw new Error(`${String(err)}; printed ${[...got].join(" ")}; missing ${acked.slice(from).filter((a) => !got.has(a)).join(' ')}; watcher exit ${watcher!.child.exitCode}, stderr: ${watcher!.err.join('')}`);
    });
    const evs = printed(watcher!);
    const names = evs.map((e) => e.name);
    // exactly once each, in the order they were written (a write whose answer was lost in the kill
    // may have applied too: it shows up, in its place)
    expect(new Set(names).size).toBe(names.length);
    const seq = names.map((x) => Number(x.slice(2)));
    for (let i = 1; i < seq.length; i++) expect(seq[i]).toBeGreaterThan(seq[i - 1]!);
    expect(names.length).toBeGreaterThanOrEqual(26);
    expect(names[0]).toBe(acked[from]);
    for (let i = 1; i < evs.length; i++) {
      const a = evs[i - 1]!;
      const b = evs[i]!;
      expect(b.revision > a.revision || (b.revision === a.revision && b.index > a.index)).toBe(true);
    }
    expect(watcher!.child.exitCode).toBeNull();
    expect(failover).toBeLessThan(30_000);
    await stopProc(watcher!, 'SIGTERM', 2000);
    watcher = undefined;
  });

  it('--since/--until print what a manager keeps and exit; a bad filter exits non-zero naming it', async () => {
    const m = mgrs.find((x) => x.proc)!;
    const until = new Date(Date.now()).toISOString();
    const r = await cli(['events', '--since', '10m', '--until', until, '--filter', 'type=service', '--filter', 'event=create', '--format', 'json'], { FLOTILLA_HOST: `unix://${m.sock}` }, 30_000);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const names = r.stdout.split('\n').filter(Boolean).map((l) => (JSON.parse(l) as Ev).name);
    expect(new Set(names).size).toBe(names.length);
    for (const a of acked) expect(names).toContain(a);
    const text = await cli(['events', '--since', '10m', '--until', until, '--filter', `service=${acked[0]}`], { FLOTILLA_HOST: `unix://${m.sock}` }, 30_000);
    expect(text.stdout.trim()).toMatch(new RegExp(`^\\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z service create \\w+ \\(name=${acked[0]}\\)$`));
    const bad = await cli(['events', '--filter', 'type=volume'], { FLOTILLA_HOST: `unix://${m.sock}` }, 30_000);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/invalid --filter type "volume": must be one of node, service/);
    const badTime = await cli(['events', '--since', 'yesterday'], { FLOTILLA_HOST: `unix://${m.sock}` }, 30_000);
    expect(badTime.code).not.toBe(0);
    expect(badTime.stderr).toMatch(/invalid --since "yesterday"/);
  });
});
