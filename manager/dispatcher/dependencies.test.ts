/**
 * The dispatcher sends a secret or config only to the nodes that run a task needing it (real
 * Dispatcher, real gRPC streams): with the task that needs it, in the COMPLETE set on (re)connect,
 * and remove_* once no task on the node needs it (ended, or told to stop).
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AssignmentsMessage, AssignmentsType, DispatcherClient, DispatcherService } from '../../gen/flotilla/v1/dispatcher.js';
import { ContainerSpec, Task, TaskState, type TaskSpec } from '../../gen/flotilla/v1/objects.js';
import { createLogger } from '../../common/log.js';
import { newId } from '../../common/ids.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import { waitFor } from '../../test/helpers/procs.js';
import { Dispatcher } from './dispatcher.js';

const log = createLogger('test');
log.level = 'silent';
const TOKEN = 'SWMTKN-test-worker';

interface Conn {
  nodeId: string;
  sessionId: string;
  msgs: AssignmentsMessage[];
  stream: grpc.ClientReadableStream<AssignmentsMessage>;
}

describe('dispatcher: secrets and configs go only where they are needed', () => {
  const store = new MemoryStore(log);
  store.setProposer(new MemoryProposer(store));
  const dispatcher = new Dispatcher(store, log, { managers: () => [], heartbeatMs: 60_000 });
  const ac = new AbortController();
  let running: Promise<void>;
  const server = new grpc.Server();
  let client: DispatcherClient;
  const ids = { s1: newId(), s2: newId(), c1: newId() };
  const conns: Record<'a' | 'b', Conn> = {} as never;

  function open(nodeId: string, sessionId: string): Conn {
    const msgs: AssignmentsMessage[] = [];
    const stream = client.assignments({ nodeId, sessionId });
    stream.on('data', (m: AssignmentsMessage) => msgs.push(m));
    stream.on('error', () => {});
    return { nodeId, sessionId, msgs, stream };
  }

  async function register(hostname: string): Promise<Conn> {
    const res = await new Promise<{ nodeId: string; sessionId: string }>((resolve, reject) =>
      client.register({ token: TOKEN, nodeId: '', description: { hostname, resources: undefined, engineLabels: {}, os: 'linux', arch: 'x64', runtime: 'sim', managerAddr: '' }, addr: '', images: [], contentAddr: '' }, (err, r) =>
        err ? reject(err) : resolve(r),
      ),
    );
    const c = open(res.nodeId, res.sessionId);
    await waitFor('the COMPLETE set', () => c.msgs.length === 1);
    return c;
  }

  function spec(secrets: string[], configs: string[] = []): TaskSpec {
    return {
      container: {
        ...ContainerSpec.fromPartial({}),
        image: 'busybox:latest',
        registryAuth: undefined,
        command: [],
        args: [],
        env: [],
        workdir: '',
        user: '',
        hostname: '',
        labels: {},
        stopGracePeriodMs: 0,
        healthcheck: undefined,
        noHealthcheck: false,
        networkMode: '',
        secrets: secrets.map((id) => ({ secretId: id, secretName: id, file: undefined })),
        configs: configs.map((id) => ({ configId: id, configName: id, file: undefined })),
      },
      resources: undefined,
      restart: undefined,
      placement: undefined,
      networks: [],
      forceUpdate: 0,
    } as TaskSpec;
  }

  async function addTask(node: Conn, secrets: string[], configs: string[] = []): Promise<string> {
    const id = newId();
    await store.update((tx) =>
      tx.create(
        'task',
        Task.fromPartial({ id, serviceId: 'svc', serviceName: 'svc', slot: 1, nodeId: node.nodeId, spec: spec(secrets, configs), desiredState: TaskState.TASK_STATE_RUNNING, status: { state: TaskState.TASK_STATE_ASSIGNED } }),
      ),
    );
    return id;
  }

  async function setTask(id: string, change: (t: Task) => Task): Promise<void> {
    await store.update((tx) => tx.update('task', change(tx.get('task', id)!)));
  }

  /** Waits for the next message on c after n messages and returns it. */
  async function next(c: Conn, n: number): Promise<AssignmentsMessage> {
    await waitFor('an assignments message', () => c.msgs.length > n);
    return c.msgs[n]!;
  }

  const secretIds = (msgs: AssignmentsMessage[]) => msgs.flatMap((m) => m.secrets.map((s) => s.id));
  const configIds = (msgs: AssignmentsMessage[]) => msgs.flatMap((m) => m.configs.map((s) => s.id));

  beforeAll(async () => {
    await store.update((tx) => {
      tx.create('cluster', { id: 'c', meta: undefined, spec: undefined, tokens: { worker: TOKEN, manager: 'SWMTKN-test-manager' }, unlockKey: '', ca: undefined });
      tx.create('secret', { id: ids.s1, meta: undefined, spec: { name: 's1', labels: {}, data: Buffer.from('value-of-s1') } });
      tx.create('secret', { id: ids.s2, meta: undefined, spec: { name: 's2', labels: {}, data: Buffer.from('value-of-s2') } });
      tx.create('config', { id: ids.c1, meta: undefined, spec: { name: 'c1', labels: {}, data: Buffer.from('value-of-c1') } });
    });
    running = dispatcher.run(ac.signal);
    server.addService(DispatcherService, dispatcher.server());
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    client = new DispatcherClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
    conns.a = await register('a');
    conns.b = await register('b');
  });
  afterAll(async () => {
    ac.abort();
    await running;
    for (const c of Object.values(conns)) c.stream.cancel();
    client.close();
    server.forceShutdown();
  });

  it('sends nothing to a node whose tasks need nothing', () => {
    for (const c of Object.values(conns)) {
      expect(c.msgs[0]!.type).toBe(AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE);
      expect(c.msgs[0]!.secrets).toEqual([]);
      expect(c.msgs[0]!.configs).toEqual([]);
    }
  });

  it('sends a secret with the task that needs it, to that node only, once', async () => {
    const { a, b } = conns;
    const t1 = await addTask(a, [ids.s1], [ids.c1]);
    const m = await next(a, 1);
    expect(m.type).toBe(AssignmentsType.ASSIGNMENTS_TYPE_INCREMENTAL);
    expect(m.update.map((t) => t.id)).toEqual([t1]);
    expect(m.secrets.map((s) => [s.id, Buffer.from(s.spec!.data).toString()])).toEqual([[ids.s1, 'value-of-s1']]);
    expect(m.configs.map((s) => [s.id, Buffer.from(s.spec!.data).toString()])).toEqual([[ids.c1, 'value-of-c1']]);
    // a second task needing it: the node has it already
    const t2 = await addTask(a, [ids.s1]);
    const m2 = await next(a, 2);
    expect(m2.update.map((t) => t.id)).toEqual([t2]);
    expect(m2.secrets).toEqual([]);
    // running changes nothing; completing t1 drops the config (t2 still needs s1)
    await setTask(t1, (t) => ({ ...t, status: { ...t.status!, state: TaskState.TASK_STATE_RUNNING } }));
    await setTask(t1, (t) => ({ ...t, status: { ...t.status!, state: TaskState.TASK_STATE_COMPLETE } }));
    const m3 = await next(a, 2 + 1);
    expect(m3.removeConfigs).toEqual([ids.c1]);
    expect(m3.removeSecrets).toEqual([]);
    // telling t2 to stop drops s1 (its container has its file already)
    await setTask(t2, (t) => ({ ...t, desiredState: TaskState.TASK_STATE_SHUTDOWN }));
    await waitFor('remove_secrets', () => a.msgs.some((x) => x.removeSecrets.includes(ids.s1)));
    expect(b.msgs).toHaveLength(1);
  });

  it('sends the whole set needed in the COMPLETE message of a new stream, and nothing else', async () => {
    const { a, b } = conns;
    const t3 = await addTask(b, [ids.s2]);
    const m = await next(b, 1);
    expect(m.update.map((t) => t.id)).toEqual([t3]);
    expect(secretIds([m])).toEqual([ids.s2]);
    // b reconnects its stream (same session): the COMPLETE set carries s2 again, and only s2
    b.stream.cancel();
    conns.b = open(b.nodeId, b.sessionId);
    const full = await next(conns.b, 0);
    expect(full.type).toBe(AssignmentsType.ASSIGNMENTS_TYPE_COMPLETE);
    expect(secretIds([full])).toEqual([ids.s2]);
    expect(configIds([full])).toEqual([]);
    // a task of b being deleted from the store (task history cleanup) drops s2 there
    await store.update((tx) => tx.delete('task', t3));
    await waitFor('remove_secrets on b', () => conns.b.msgs.some((x) => x.removeSecrets.includes(ids.s2)));
    // a never saw s2, b never saw s1 or c1
    expect(secretIds(a.msgs)).not.toContain(ids.s2);
    expect(secretIds([...b.msgs, ...conns.b.msgs])).not.toContain(ids.s1);
    expect(configIds([...b.msgs, ...conns.b.msgs])).toEqual([]);
  });
});
