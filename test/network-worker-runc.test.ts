/**
 * The overlay data plane wired into the agent's worker, with real runc containers on two test bed
 * hosts: the worker takes the network views of its assignments, the task controller attaches each
 * task's namespace before its container is created (runc joins it), a restarted agent adopts the
 * containers and their networks, and removal leaves no device, namespace or record.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AssignmentsType, type AssignmentsMessage, type NetworkView, type TaskStatusUpdate } from '../gen/flotilla/v1/dispatcher.js';
import { Task, TaskState, type TaskStatus } from '../gen/flotilla/v1/objects.js';
import { NO_DEPS } from '../testing/assignments.js';
import { NodeNetwork } from '../agent/network/node-network.js';
import type { RuncRuntime } from '../agent/runtime/containers.js';
import { Worker } from '../agent/worker/worker.js';
import { importBusybox } from './helpers/busybox.js';
import { handView, linkNames, type HandNetwork } from './helpers/overlay.js';
import { waitFor } from './helpers/procs.js';
import { removeRunRoots } from './helpers/runtime-debris.js';
import { Testbed } from './helpers/testbed.js';

const log = pino({ level: 'silent' });
const S = TaskState;
const why = process.getuid?.() !== 0 ? 'needs root' : !fs.existsSync('/usr/lib/cni/bridge') ? 'needs the CNI plugins (containernetworking-plugins)' : '';
if (why) console.warn(`skipping the worker overlay test: ${why}`);

const A: HandNetwork = { id: 'netA', name: 'alpha', vni: 4201, subnet: '10.78.1.0/24', gateway: '10.78.1.1' };

function task(id: string, nodeId: string, address: string): Task {
  return Task.fromPartial({
    id,
    serviceId: 'svc1',
    serviceName: 'web',
    slot: Number(id.slice(-1)),
    nodeId,
    spec: { container: { image: 'busybox:latest', args: ['sleep', '1000'], stopGracePeriodMs: 500 } },
    status: { state: S.TASK_STATE_ASSIGNED },
    desiredState: S.TASK_STATE_RUNNING,
    networks: [{ networkId: A.id, addresses: [address], aliases: [] }],
  });
}

interface Node {
  dir: string;
  rt: RuncRuntime;
  net: NodeNetwork;
  worker: Worker;
  last: Map<string, TaskStatus>;
}

describe.skipIf(why !== '')('overlay networks through the worker, real runc on the test bed', () => {
  let bed: Testbed;
  const nodes: Node[] = [];
  let view: NetworkView;
  const tasks: Task[] = [];

  const open = async (i: number, dir: string): Promise<Node> => {
    const h = bed.hosts[i + 1]!;
    const { RuncRuntime } = await import('../agent/runtime/containers.js');
    const rt = await RuncRuntime.open(dir);
    const net = await NodeNetwork.open({ stateDir: path.join(dir, 'net-state'), localAddr: h.ip, hostNetns: `/run/netns/${h.netns}`, log });
    const worker = new Worker({ runtime: rt, hostname: h.name, log, status: { flushMs: 20 }, network: net });
    const last = new Map<string, TaskStatus>();
    worker.setSender(async (u: TaskStatusUpdate[]) => {
      for (const x of u) last.set(x.taskId, x.status!);
    });
    return { dir, rt, net, worker, last };
  };
  const msg = (ts: Task[], views: NetworkView[]): AssignmentsMessage => ({ type: AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE, update: ts, remove: [], ...NO_DEPS, networkViews: views });
  const running = (n: Node, id: string) => waitFor(`${id} running`, async () => (n.last.get(id)?.state === S.TASK_STATE_RUNNING ? true : undefined), 30_000, 50);

  beforeAll(async () => {
    bed = await Testbed.create({ managers: 1, agents: 2, runtime: 'sim' });
    for (const i of [0, 1]) {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-netw-'));
      await importBusybox(dir);
      nodes.push(await open(i, dir));
    }
    tasks.push(task('task1', 'n1', '10.78.1.21/24'), task('task2', 'n2', '10.78.1.22/24'));
    view = handView(
      A,
      tasks.map((t, i) => ({ taskId: t.id, nodeId: t.nodeId, nodeAddr: bed.hosts[i + 1]!.ip, address: t.networks[0]!.addresses[0]! })),
    );
  }, 120_000);

  afterAll(async () => {
    for (const n of nodes) {
      await n.worker.close().catch(() => undefined);
      for (const c of await n.rt.list().catch(() => [])) await n.rt.remove(c.id, true).catch(() => undefined);
      await n.net.teardown().catch(() => undefined);
      n.rt.close();
      fs.rmSync(n.dir, { recursive: true, force: true });
      removeRunRoots(n.dir);
    }
    if (bed) expect(await bed.destroy()).toEqual([]);
  }, 60_000);

  it('runs tasks attached to the overlay; they reach each other across hosts, also after an agent restart; removal cleans up', async () => {
    await nodes[0]!.worker.assign(msg([tasks[0]!], [view]));
    await nodes[1]!.worker.assign(msg([tasks[1]!], [view]));
    await running(nodes[0]!, 'task1');
    await running(nodes[1]!, 'task2');
    const c1 = nodes[0]!.worker.containerOf('task1')!;
    const ping = (n: Node, c: string, ip: string) => n.rt.exec(c, ['ping', '-c', '2', '-W', '1', ip], { timeoutMs: 10_000 });
    expect((await ping(nodes[0]!, c1, '10.78.1.22')).exitCode).toBe(0);
    expect((await nodes[0]!.rt.exec(c1, ['cat', '/sys/class/net/eth0/mtu'])).output.trim()).toBe('1450');
    expect((await nodes[0]!.rt.exec(c1, ['cat', '/sys/class/net/eth0/address'])).output.trim()).toBe('02:42:0a:4e:01:15');

    // the agent on h2 restarts: new runtime, data plane and worker over the same state adopt everything
    await nodes[0]!.worker.close();
    nodes[0]!.rt.close();
    nodes[0] = await open(0, nodes[0]!.dir);
    await nodes[0].worker.assign(msg([{ ...tasks[0]!, status: { ...tasks[0]!.status!, state: S.TASK_STATE_RUNNING } }], [view]));
    await nodes[0].worker.idle();
    expect(nodes[0].worker.containerOf('task1')).toBe(c1);
    expect((await ping(nodes[0], c1, '10.78.1.22')).exitCode).toBe(0);

    // task2 is shut down: its container stays (task history) but it leaves the network at once (the
    // manager may reuse its address): namespace gone and, as the network's last task on h3, the devices
    await nodes[1]!.worker.assign(msg([{ ...tasks[1]!, desiredState: S.TASK_STATE_SHUTDOWN, status: { ...tasks[1]!.status!, state: S.TASK_STATE_RUNNING } }], [view]));
    await waitFor('task2 shut down', async () => (nodes[1]!.last.get('task2')?.state === S.TASK_STATE_SHUTDOWN ? true : undefined), 20_000, 50);
    await nodes[1]!.worker.idle();
    expect((await nodes[1]!.rt.list()).map((c) => c.status)).toEqual(['stopped']);
    expect(fs.readdirSync(path.join(nodes[1]!.dir, 'net-state', 'netns'))).toEqual([]);
    expect((await linkNames(`/run/netns/${bed.hosts[2]!.netns}`)).filter((l) => l.startsWith('fl-') || l.startsWith('veth'))).toEqual([]);
    // then it goes: its container too
    await nodes[1]!.worker.assign(msg([], []));
    await nodes[1]!.worker.idle();
    expect(await nodes[1]!.rt.list()).toEqual([]);
    expect((await linkNames(`/run/netns/${bed.hosts[2]!.netns}`)).filter((l) => l.startsWith('fl-') || l.startsWith('veth'))).toEqual([]);
    expect(fs.readdirSync(path.join(nodes[1]!.dir, 'net-state', 'netns'))).toEqual([]);
    // and h2 forgets it once its view says so
    const alone = handView(A, [{ taskId: 'task1', nodeId: 'n1', nodeAddr: bed.hosts[1]!.ip, address: '10.78.1.21/24' }]);
    await nodes[0].worker.assign({ ...msg([], []), type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL, networkViews: [alone] });
    await nodes[0].worker.idle();
    const fdb = await import('./helpers/testbed.js').then((m) => m.run('nsenter', [`--net=/run/netns/${bed.hosts[1]!.netns}`, 'bridge', 'fdb', 'show', 'dev', 'fl-vx-4201']));
    expect(fdb.stdout).not.toContain('dst');
    await nodes[0].worker.assign(msg([], []));
    await nodes[0].worker.idle();
    expect((await linkNames(`/run/netns/${bed.hosts[1]!.netns}`)).filter((l) => l.startsWith('fl-') || l.startsWith('veth'))).toEqual([]);
    expect(nodes[0].net.attachedTasks()).toEqual([]);
  });
});
