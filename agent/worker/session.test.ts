/**
 * The dispatcher session against a small in-process gRPC Dispatcher (a test server implementing just
 * enough: token check, sessions, heartbeats, assignments, status, logs), in plain text.
 */
import * as grpc from '@grpc/grpc-js';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { newId } from '../../common/ids.js';
import { isCode } from '../../common/errors.js';
import {
  AssignmentsMessage,
  AssignmentsRequest,
  AssignmentsType,
  DispatcherService,
  type DispatcherServer,
  LogChunk,
  LogRequest,
  RegisterRequest,
  type TaskStatusUpdate,
} from '../../gen/flotilla/v1/dispatcher.js';
import { NO_DEPS } from '../../testing/assignments.js';
import { Task, TaskState } from '../../gen/flotilla/v1/objects.js';
import { runAgent, type AgentOptions } from '../agent.js';
import type { Session } from './session.js';
import { SimRuntime } from './sim.js';
import { waitFor as poll } from '../../test/helpers/wait.js';

const waitFor = (what: string, fn: () => boolean | Promise<boolean>, ms = 8000): Promise<boolean> => poll(what, fn, ms, 10);

const log = pino({ level: 'silent' });
const TOKEN = 'FLTTKN-1-test-token';

class TestDispatcher {
  server: grpc.Server | undefined;
  port = 0;
  periodMs = 100;
  registers: RegisterRequest[] = [];
  heartbeats: Array<{ at: number; nodeId: string }> = [];
  statuses: TaskStatusUpdate[] = [];
  sessions = new Map<string, string>();
  streams: grpc.ServerWritableStream<AssignmentsRequest, AssignmentsMessage>[] = [];
  logStream: grpc.ServerDuplexStream<LogChunk, LogRequest> | undefined;
  chunks: LogChunk[] = [];
  tasks: Task[] = [];
  managers: string[] = [];

  async start(port = 0): Promise<string> {
    const server = new grpc.Server();
    server.addService(DispatcherService, this.impl());
    this.port = await new Promise<number>((resolve, reject) =>
      server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    this.server = server;
    return this.addr();
  }

  addr(): string {
    return `127.0.0.1:${this.port}`;
  }

  stop(): void {
    this.server?.forceShutdown();
    this.server = undefined;
    this.streams = [];
    this.logStream = undefined;
    this.sessions.clear();
  }

  last(taskId: string): TaskState | undefined {
    return this.statuses.filter((u) => u.taskId === taskId).at(-1)?.status?.state;
  }

  push(msg: AssignmentsMessage): void {
    for (const s of this.streams) s.write(msg);
  }

  private check(nodeId: string, sessionId: string): boolean {
    return this.sessions.get(nodeId) === sessionId;
  }

  impl(): DispatcherServer {
    const notFound = (): grpc.ServiceError =>
      Object.assign(new Error('session not found: register again'), { code: grpc.status.NOT_FOUND, details: 'session not found: register again', metadata: new grpc.Metadata() });
    return {
      imageSources: (_call, cb) => cb(null, { sources: [] }),
      register: (call, cb) => {
        this.registers.push(call.request);
        if (call.request.token !== TOKEN) {
          cb(Object.assign(new Error('invalid join token'), { code: grpc.status.PERMISSION_DENIED, details: 'invalid join token', metadata: new grpc.Metadata() }));
          return;
        }
        const nodeId = call.request.nodeId || newId();
        const sessionId = newId();
        this.sessions.set(nodeId, sessionId);
        cb(null, { nodeId, sessionId, heartbeatPeriodMs: this.periodMs, managers: this.managers.length ? this.managers : [this.addr()] });
      },
      heartbeat: (call, cb) => {
        if (!this.check(call.request.nodeId, call.request.sessionId)) return cb(notFound());
        this.heartbeats.push({ at: Date.now(), nodeId: call.request.nodeId });
        cb(null, { periodMs: this.periodMs, managers: this.managers, trustBundlePem: '' });
      },
      assignments: (call) => {
        if (!this.check(call.request.nodeId, call.request.sessionId)) {
          call.destroy(notFound());
          return;
        }
        this.streams.push(call);
        call.on('cancelled', () => (this.streams = this.streams.filter((s) => s !== call)));
        call.write({ type: AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE, update: this.tasks, remove: [], ...NO_DEPS });
      },
      updateTaskStatus: (call, cb) => {
        if (!this.check(call.request.nodeId, call.request.sessionId)) return cb(notFound());
        this.statuses.push(...call.request.updates);
        for (const u of call.request.updates) {
          const t = this.tasks.find((x) => x.id === u.taskId);
          if (t) t.status = u.status;
        }
        cb(null, {});
      },
      logs: (call) => {
        call.on('data', (c: LogChunk) => {
          if (!c.requestId) {
            this.logStream = call;
            return;
          }
          this.chunks.push(c);
        });
        call.on('error', () => {});
        call.on('end', () => call.end());
      },
    };
  }
}

function task(slot: number): Task {
  return Task.fromPartial({
    id: newId(),
    serviceId: 'svc1',
    serviceName: 'web',
    slot,
    spec: { container: { image: 'busybox:latest', args: ['sleep', '1000'] } },
    status: { state: TaskState.TASK_STATE_ASSIGNED },
    desiredState: TaskState.TASK_STATE_RUNNING,
  });
}

describe('dispatcher session', () => {
  let dir: string;
  let disp: TestDispatcher;
  let rt: SimRuntime;
  let ctl: AbortController;
  let run: Promise<void> | undefined;

  beforeEach(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-session-'));
    disp = new TestDispatcher();
    rt = SimRuntime.memory();
    ctl = new AbortController();
    run = undefined;
  });
  afterEach(async () => {
    ctl.abort();
    await run?.catch(() => undefined);
    disp.stop();
    await rt.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  const start = (addrs: string[], over: Partial<AgentOptions> = {}): Promise<void> =>
    (run = runAgent({
      dataDir: dir,
      managers: addrs,
      token: TOKEN,
      hostname: 'node-a',
      labels: { zone: 'z1' },
      runtime: 'sim',
      runtimeInstance: rt,
      signal: ctl.signal,
      log,
      backoffInitialMs: 50,
      backoffMaxMs: 300,
      // this test dispatcher is plain text with a token check: the session protocol alone (mutual
      // TLS and certificate-bound node ids are tested in test/security.test.ts)
      insecure: true,
      ...over,
    }));

  it('refuses a wrong token: runAgent rejects once with a clear PERMISSION_DENIED', async () => {
    const addr = await disp.start();
    const t0 = Date.now();
    const err = await start([addr], { token: 'wrong' }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isCode(err, 'PERMISSION_DENIED')).toBe(true);
    expect((err as Error).message).toBe(`manager ${addr} refused the join token: invalid join token (check --token or FLOTILLA_TOKEN)`);
    expect(disp.registers.length).toBe(1);
    expect(Date.now() - t0).toBeLessThan(3000);
  });

  it('registers, heartbeats at the period, runs assignments, reports status and serves logs', async () => {
    const addr = await disp.start();
    const tasks = [task(1), task(2)];
    disp.tasks = tasks;
    void start([addr]);
    await waitFor('registered', () => disp.registers.length === 1);
    const reg = disp.registers[0]!;
    expect(reg.token).toBe(TOKEN);
    expect(reg.nodeId).toBe('');
    expect(reg.description).toMatchObject({
      hostname: 'node-a',
      runtime: 'sim',
      engineLabels: { zone: 'z1' },
      os: process.platform,
      arch: process.arch,
      resources: { nanoCpus: os.cpus().length * 1e9, memoryBytes: os.totalmem() },
    });
    await waitFor('tasks running', () => tasks.every((t) => disp.last(t.id) === TaskState.TASK_STATE_RUNNING));
    const nodeId = [...disp.sessions.keys()][0]!;
    const saved = JSON.parse(await fs.readFile(path.join(dir, 'agent', 'node.json'), 'utf8')) as { nodeId: string };
    expect(saved.nodeId).toBe(nodeId);

    // heartbeats: one per 100 ms period
    const from = disp.heartbeats.length;
    await new Promise((r) => setTimeout(r, 1000));
    const n = disp.heartbeats.length - from;
    expect(n).toBeGreaterThanOrEqual(5);
    expect(n).toBeLessThanOrEqual(11);
    // the manager changes the period: the agent follows
    disp.periodMs = 300;
    await new Promise((r) => setTimeout(r, 250));
    const from2 = disp.heartbeats.length;
    await new Promise((r) => setTimeout(r, 1200));
    const n2 = disp.heartbeats.length - from2;
    expect(n2).toBeGreaterThanOrEqual(2);
    expect(n2).toBeLessThanOrEqual(5);

    // an increment: shut one task down
    disp.push({ type: AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL, update: [{ ...tasks[0]!, desiredState: TaskState.TASK_STATE_SHUTDOWN }], remove: [], ...NO_DEPS });
    await waitFor('shutdown', () => disp.last(tasks[0]!.id) === TaskState.TASK_STATE_SHUTDOWN);

    // logs of the other task, through the logs stream
    await waitFor('log stream', () => disp.logStream !== undefined);
    disp.logStream!.write({ requestId: 'r1', taskId: tasks[1]!.id, containerId: '', follow: false, tail: 0, cancel: false });
    await waitFor('log done', () => disp.chunks.some((c) => c.requestId === 'r1' && c.done));
    const lines = disp.chunks.filter((c) => c.requestId === 'r1').flatMap((c) => c.lines);
    expect(lines.length).toBeGreaterThanOrEqual(2);
    expect(lines[0]).toMatchObject({ taskId: tasks[1]!.id, nodeId, slot: 2, stream: 'stdout' });
    expect(lines.map((l) => l.line).join('\n')).toMatch(/sim: started/);
    // an unknown task: done with an error
    disp.logStream!.write({ requestId: 'r2', taskId: 'nosuchtask', containerId: '', follow: false, tail: 0, cancel: false });
    await waitFor('log error', () => disp.chunks.some((c) => c.requestId === 'r2' && c.done));
    expect(disp.chunks.find((c) => c.requestId === 'r2')!.error).toMatch(/no container for task nosuchtask on node node-a/);
    // a followed log can be cancelled
    disp.logStream!.write({ requestId: 'r3', taskId: tasks[1]!.id, containerId: '', follow: true, tail: 1, cancel: false });
    await waitFor('follow lines', () => disp.chunks.some((c) => c.requestId === 'r3' && c.lines.length > 0));
    disp.logStream!.write({ requestId: 'r3', taskId: tasks[1]!.id, containerId: '', follow: true, tail: 1, cancel: true });
    await waitFor('follow done', () => disp.chunks.some((c) => c.requestId === 'r3' && c.done));

    // stopping the agent leaves the containers running
    ctl.abort();
    await run;
    expect((await rt.list()).filter((c) => c.status === 'running').length).toBe(1);
  });

  it('reconnects after the manager restarts: same node id, adopts instead of restarting', async () => {
    const addr = await disp.start();
    const tasks = [task(1), task(2), task(3)];
    disp.tasks = tasks;
    void start([addr]);
    await waitFor('tasks running', () => tasks.every((t) => disp.last(t.id) === TaskState.TASK_STATE_RUNNING));
    const nodeId = [...disp.sessions.keys()][0]!;
    const containers = (await rt.list()).map((c) => c.id).sort();
    const port = disp.port;
    disp.stop();
    await new Promise((r) => setTimeout(r, 300));
    // a new manager process on the same address, which knows the tasks (as RUNNING)
    const disp2 = new TestDispatcher();
    disp2.tasks = disp.tasks.map((t) => ({ ...t }));
    try {
      await disp2.start(port);
      await waitFor('re-registered', () => disp2.registers.length >= 1 && disp2.streams.length > 0);
      expect(disp2.registers[0]!.nodeId).toBe(nodeId);
      await waitFor('heartbeats resume', () => disp2.heartbeats.length >= 2);
      expect((await rt.list()).map((c) => c.id).sort()).toEqual(containers);
      expect(disp2.statuses.length).toBe(0); // nothing changed: nothing to report
    } finally {
      disp2.stop();
    }
  });

  it('registers again with the same node id when the manager forgets the session', async () => {
    const addr = await disp.start();
    void start([addr]);
    await waitFor('registered', () => disp.sessions.size === 1);
    const nodeId = [...disp.sessions.keys()][0]!;
    disp.sessions.clear(); // e.g. a new leader: heartbeats now fail with NOT_FOUND
    await waitFor('re-registered', () => disp.registers.length >= 2 && disp.sessions.size === 1);
    expect(disp.registers[1]!.nodeId).toBe(nodeId);
    await waitFor('heartbeats', () => disp.heartbeats.length >= 2);
  });

  it('cycles through the manager list and learns the managers from the registration', async () => {
    // a port with nobody listening
    const dead = new TestDispatcher();
    await dead.start();
    const deadAddr = dead.addr();
    dead.stop();
    const addr = await disp.start();
    disp.managers = [addr, '127.0.0.1:1'];
    let managers: string[] = [];
    let session: Session | undefined;
    void start([deadAddr, addr], { onRegistered: (r) => (managers = r.managers), onStarted: (a) => (session = a.session) });
    await waitFor('registered', () => managers.length > 0);
    expect(managers).toEqual([addr, '127.0.0.1:1']);
    // the agent's list: the managers' own list first, then the flag list
    expect(session!.managers).toEqual([addr, '127.0.0.1:1', deadAddr]);
    expect(disp.registers.length).toBe(1);
  });

  it('learns managers that joined later from heartbeats and fails over to them when its manager goes', async () => {
    const addr = await disp.start();
    disp.managers = [addr];
    let session: Session | undefined;
    void start([addr], { onStarted: (a) => (session = a.session) });
    await waitFor('registered', () => disp.sessions.size === 1);
    const nodeId = [...disp.sessions.keys()][0]!;
    // a second manager joins after the agent registered; the first one's heartbeats now name both
    const other = new TestDispatcher();
    try {
      const otherAddr = await other.start();
      disp.managers = [addr, otherAddr];
      await waitFor('the new manager known', () => session!.managers.includes(otherAddr));
      disp.stop();
      await waitFor('registered with the other manager', () => other.sessions.size === 1);
      expect(other.registers[0]!.nodeId).toBe(nodeId);
    } finally {
      other.stop();
    }
  });
});
