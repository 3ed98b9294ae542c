import { describe, expect, it } from 'vitest';
import { Node, NodeState, PortProtocol, PublishMode, Service, ServiceSpec, Task, TaskSpec, TaskState } from '../../gen/flotilla/v1/objects.js';
import { parsePublish, applyUpdatePortFlags } from '../../cli/portflags.js';
import { allocatePorts, formatPorts, validatePorts, PUBLISHED_PORT_MIN } from './ports.js';
import { schedule } from '../scheduler/plan.js';

const tcp = PortProtocol.PORT_PROTOCOL_TCP;
const udp = PortProtocol.PORT_PROTOCOL_UDP;
const INGRESS = PublishMode.PUBLISH_MODE_INGRESS;
const HOST = PublishMode.PUBLISH_MODE_HOST;

function svc(id: string, name: string, ports: Array<[number, number, PortProtocol?, PublishMode?]>): Service {
  const pc = ports.map(([published, target, protocol, mode]) => ({ name: '', protocol: protocol ?? tcp, targetPort: target, publishedPort: published, publishMode: mode ?? INGRESS, localOnly: false }));
  return Service.fromPartial({ id, spec: { name, endpoint: { mode: 0, ports: pc } }, endpoint: { ports: pc } });
}

describe('-p parsing', () => {
  it('short and long forms', () => {
    expect(parsePublish('--publish', '8080:80')).toMatchObject({ publishedPort: 8080, targetPort: 80, protocol: tcp, publishMode: INGRESS, localOnly: false });
    expect(parsePublish('--publish', '53:5353/udp')).toMatchObject({ publishedPort: 53, targetPort: 5353, protocol: udp });
    expect(parsePublish('--publish', '80')).toMatchObject({ publishedPort: 0, targetPort: 80 });
    expect(parsePublish('--publish', 'published=8080,target=80,protocol=udp,mode=ingress,traffic-policy=local')).toMatchObject({
      publishedPort: 8080,
      targetPort: 80,
      protocol: udp,
      localOnly: true,
    });
    expect(parsePublish('--publish', 'target=80,mode=host')).toMatchObject({ publishedPort: 0, publishMode: HOST });
  });
  it('bad input: one line naming the flag and the value', () => {
    expect(() => parsePublish('--publish', '70000:80')).toThrow('invalid --publish "70000:80": published port 70000 is out of range (1-65535)');
    expect(() => parsePublish('--publish', 'abc')).toThrow('invalid --publish "abc": target port "abc" is not a number');
    expect(() => parsePublish('--publish', '80:0')).toThrow(/target port 0 is out of range/);
    expect(() => parsePublish('--publish', '80:80/sctp')).toThrow(/protocol "sctp" must be tcp or udp/);
    expect(() => parsePublish('--publish', 'published=80')).toThrow(/missing target=PORT/);
    expect(() => parsePublish('--publish', 'target=80,mode=host,traffic-policy=local')).toThrow(/applies to mode=ingress/);
    expect(() => parsePublish('--publish', 'target=80,color=red')).toThrow(/unknown key "color"/);
  });
  it('--publish-rm by published port, also an allocated one', () => {
    const spec = ServiceSpec.fromPartial({ endpoint: { ports: [parsePublish('-p', '8080:80'), parsePublish('-p', '53:53/udp'), parsePublish('-p', '90')] } });
    applyUpdatePortFlags(spec, { publishRm: ['53/udp', '30000'], publishAdd: ['9090:90'] }, [
      { name: '', protocol: tcp, targetPort: 90, publishedPort: 30000, publishMode: INGRESS, localOnly: false },
    ]);
    expect(spec.endpoint!.ports.map((p) => `${p.publishedPort}:${p.targetPort}`)).toEqual(['8080:80', '9090:90']);
    expect(() => applyUpdatePortFlags(spec, { publishRm: ['1234'] })).toThrow('invalid --publish-rm "1234": the service does not publish this port');
  });
});

describe('validation and allocation', () => {
  it('refuses a duplicate published port in one spec', () => {
    const ep = { mode: 0, ports: [parsePublish('-p', '8080:80'), parsePublish('-p', '8080:81')] };
    expect(() => validatePorts(ep)).toThrow('invalid publish "8080/tcp": published port given twice');
    // the same number with another protocol is another port
    validatePorts({ mode: 0, ports: [parsePublish('-p', '8080:80'), parsePublish('-p', '8080:80/udp')] });
  });
  it('allocates omitted ports from the range, keeps them across updates, refuses a held port naming its service', () => {
    const others = [svc('a', 'web', [[PUBLISHED_PORT_MIN, 80]]), svc('b', 'dns', [[53, 53, udp]])];
    const ep = { mode: 0, ports: [parsePublish('-p', '80'), parsePublish('-p', '53:53')] };
    const got = allocatePorts('c', ep, [], others);
    expect(got.map((p) => p.publishedPort)).toEqual([PUBLISHED_PORT_MIN + 1, 53]);
    // an update keeps the port given before
    const again = allocatePorts('c', ep, [{ ...got[0]!, publishedPort: 31000 }], others);
    expect(again[0]!.publishedPort).toBe(31000);
    expect(() => allocatePorts('c', { mode: 0, ports: [parsePublish('-p', '53:53/udp')] }, [], others)).toThrow('published port 53/udp is already used by service dns');
    // host mode beside host mode: allowed (the scheduler keeps them apart); beside ingress: refused
    const hostSvc = [svc('h', 'h1', [[7000, 80, tcp, HOST]])];
    expect(allocatePorts('c', { mode: 0, ports: [parsePublish('-p', 'published=7000,target=80,mode=host')] }, [], hostSvc)[0]!.publishedPort).toBe(7000);
    expect(() => allocatePorts('c', { mode: 0, ports: [parsePublish('-p', '7000:80')] }, [], hostSvc)).toThrow(/already used by service h1/);
    expect(formatPorts(got)).toBe(`*:${PUBLISHED_PORT_MIN + 1}->80/tcp, *:53->53/tcp`);
  });
});

describe('scheduler: host-mode ports', () => {
  const node = (id: string): Node =>
    Node.fromPartial({ id, spec: { availability: 0 }, description: { hostname: id, resources: { nanoCpus: 4e9, memoryBytes: 8e9 } }, status: { state: NodeState.NODE_STATE_READY } });
  const task = (id: string, serviceId: string, nodeId: string, state: TaskState): Task =>
    Task.fromPartial({ id, serviceId, nodeId, slot: 1, spec: TaskSpec.fromPartial({ container: { image: 'busybox' } }), status: { state }, desiredState: TaskState.TASK_STATE_RUNNING });
  it('a node whose host port is taken by another service is unsuitable, and the reason names the port', () => {
    const services = new Map([
      ['s1', svc('s1', 'one', [[8080, 80, tcp, HOST]])],
      ['s2', svc('s2', 'two', [[8080, 80, tcp, HOST]])],
    ]);
    const nodes = [node('n1'), node('n2')];
    const running = task('t1', 's1', 'n1', TaskState.TASK_STATE_RUNNING);
    const plan = schedule({ nodes, services, tasks: [running, task('t2', 's2', '', TaskState.TASK_STATE_PENDING), task('t3', 's2', '', TaskState.TASK_STATE_PENDING)] });
    expect(plan.assignments).toEqual([{ taskId: 't2', nodeId: 'n2' }]);
    expect(plan.unassigned).toEqual([{ taskId: 't3', reason: 'no suitable node (2 nodes have host port 8080/tcp in use)' }]);
  });
});
