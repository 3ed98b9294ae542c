/** Builders for tests of the manager's components. */
import { Node, NodeAvailability, NodeRole, NodeState, Service, ServiceMode, ServiceSpec } from '../gen/flotilla/v1/objects.js';
import { newId } from '../common/ids.js';
import { validateServiceSpec } from '../manager/controlapi/validate.js';

export function testSpec(name: string, replicas: number, over: Partial<ServiceSpec> = {}): ServiceSpec {
  return validateServiceSpec(
    ServiceSpec.fromPartial({
      name,
      replicas,
      mode: ServiceMode.SERVICE_MODE_REPLICATED,
      task: { container: { image: 'busybox:latest', args: ['sleep', '1000'] } },
      ...over,
    }),
  );
}

export function testService(name: string, replicas: number, over: Partial<ServiceSpec> = {}): Service {
  const spec = testSpec(name, replicas, over);
  return { id: newId(), meta: undefined, spec, specVersion: 1, previousSpec: undefined, updateStatus: undefined, endpoint: undefined,
    history: [{ version: 1, spec, createdAt: Date.now() }], jobStatus: undefined };
}

export function testNode(hostname: string, over: { labels?: Record<string, string>; availability?: NodeAvailability; state?: NodeState; cpus?: number; memory?: number; role?: NodeRole } = {}): Node {
  return {
    id: newId(),
    meta: undefined,
    spec: { labels: over.labels ?? {}, desiredRole: over.role ?? NodeRole.NODE_ROLE_WORKER, availability: over.availability ?? NodeAvailability.NODE_AVAILABILITY_ACTIVE },
    description: {
      hostname,
      resources: { nanoCpus: (over.cpus ?? 4) * 1e9, memoryBytes: over.memory ?? 8 * 1024 ** 3, pids: 0 },
      engineLabels: {},
      os: 'linux',
      arch: 'x64',
      runtime: 'sim', managerAddr: '',
    },
    status: { state: over.state ?? NodeState.NODE_STATE_READY, message: '', addr: '127.0.0.1', lastHeartbeat: 0 },
    managerStatus: undefined,
    certificateExpiryMs: 0,
    certificateIssuer: '',
    role: over.role ?? NodeRole.NODE_ROLE_WORKER,
  };
}
