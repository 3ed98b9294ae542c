/** Stable JSON shapes and table cells for nodes, services and tasks (`--format json`). */
import {
  HealthState,
  Node,
  NodeAvailability,
  NodeRole,
  NodeState,
  type PortConfig,
  PublishMode,
  Service,
  ServiceMode,
  Task,
  TaskState,
  UpdateState,
} from '../gen/flotilla/v1/objects.js';
import { shortId } from '../common/ids.js';
import { protocolName } from '../manager/allocator/ports.js';

export const taskStateName = (s: TaskState): string => TaskState[s]?.replace('TASK_STATE_', '').toLowerCase() ?? String(s);
export const availabilityName = (a: NodeAvailability | undefined): string =>
  NodeAvailability[a ?? 0]?.replace('NODE_AVAILABILITY_', '').toLowerCase() ?? '';
export const nodeStateName = (s: NodeState | undefined): string => NodeState[s ?? 0]?.replace('NODE_STATE_', '').toLowerCase() ?? '';
export const roleName = (r: NodeRole | undefined): string => (r === NodeRole.NODE_ROLE_MANAGER ? 'manager' : 'worker');
export const healthName = (h: HealthState | undefined): string => (h ? (HealthState[h]?.replace('HEALTH_STATE_', '').toLowerCase() ?? '') : '');
export const updateStateName = (u: UpdateState | undefined): string =>
  u ? (UpdateState[u]?.replace('UPDATE_STATE_', '').toLowerCase() ?? '') : '';

export function nodeJson(n: Node, leaderAddr?: string): Record<string, unknown> {
  const ms = n.managerStatus;
  return {
    id: n.id,
    hostname: n.description?.hostname ?? '',
    role: roleName(n.role),
    availability: availabilityName(n.spec?.availability),
    status: nodeStateName(n.status?.state),
    statusMessage: n.status?.message ?? '',
    addr: n.status?.addr ?? '',
    managerStatus: ms
      ? { leader: ms.leader, reachability: ms.reachability, addr: ms.addr, raftId: ms.raftId }
      : n.role === NodeRole.NODE_ROLE_MANAGER
        ? { leader: leaderAddr !== undefined && n.status?.addr === leaderAddr, reachability: 'reachable', addr: n.status?.addr ?? '' }
        : null,
    labels: n.spec?.labels ?? {},
    engineLabels: n.description?.engineLabels ?? {},
    resources: { nanoCpus: n.description?.resources?.nanoCpus ?? 0, memoryBytes: n.description?.resources?.memoryBytes ?? 0 },
    runtime: n.description?.runtime ?? '',
    // the node's TLS certificate (renewed automatically at 50-80% of its life)
    certificateExpiry: n.certificateExpiryMs ? new Date(n.certificateExpiryMs).toISOString() : '',
    version: n.meta?.version ?? 0,
    createdAt: iso(n.meta?.createdAt),
    updatedAt: iso(n.meta?.updatedAt),
  };
}

export function taskJson(t: Task, nodes: Map<string, Node>): Record<string, unknown> {
  return {
    id: t.id,
    name: taskName(t, nodes),
    serviceId: t.serviceId,
    service: t.serviceName,
    slot: t.slot,
    nodeId: t.nodeId,
    node: nodes.get(t.nodeId)?.description?.hostname ?? '',
    image: t.spec?.container?.image ?? '',
    state: taskStateName(t.status?.state ?? 0),
    desiredState: taskStateName(t.desiredState),
    message: t.status?.message ?? '',
    error: t.status?.err ?? '',
    exitCode: t.status?.exitCode ?? 0,
    oomKilled: t.status?.oomKilled ?? false,
    health: healthName(t.status?.health),
    containerId: t.status?.containerId ?? '',
    specVersion: t.specVersion,
    // the task's address on each of its networks (the allocator's)
    networks: t.networks.map((a) => ({ networkId: a.networkId, addresses: a.addresses, aliases: a.aliases })),
    stateSince: iso(t.status?.timestamp),
    createdAt: iso(t.meta?.createdAt),
  };
}

export function taskName(t: Task, nodes: Map<string, Node>): string {
  return t.slot ? `${t.serviceName}.${t.slot}` : `${t.serviceName}.${shortId(t.nodeId || '')}${nodes.size ? '' : ''}`;
}

export function serviceJson(s: Service, running?: number): Record<string, unknown> {
  const spec = s.spec!;
  return {
    id: s.id,
    name: spec.name,
    mode: spec.mode === ServiceMode.SERVICE_MODE_GLOBAL ? 'global' : 'replicated',
    replicas: spec.mode === ServiceMode.SERVICE_MODE_GLOBAL ? null : spec.replicas,
    running: running ?? null,
    image: spec.task?.container?.image ?? '',
    version: s.specVersion,
    updateStatus: s.updateStatus
      ? { state: updateStateName(s.updateStatus.state), message: s.updateStatus.message, startedAt: iso(s.updateStatus.startedAt), completedAt: iso(s.updateStatus.completedAt) }
      : null,
    spec,
    previousSpec: s.previousSpec ?? null,
    // what the allocator gave the service: a virtual IP per network (VIP endpoint mode)
    endpoint: s.endpoint ?? null,
    // published ports, readable: as the spec gives them (published 0: allocated) and as allocated
    ports: { spec: (spec.endpoint?.ports ?? []).map(portJson), allocated: (s.endpoint?.ports ?? []).map(portJson) },
    createdAt: iso(s.meta?.createdAt),
    updatedAt: iso(s.meta?.updatedAt),
  };
}

function portJson(p: PortConfig): Record<string, unknown> {
  return {
    protocol: protocolName(p.protocol),
    targetPort: p.targetPort,
    publishedPort: p.publishedPort,
    publishMode: p.publishMode === PublishMode.PUBLISH_MODE_HOST ? 'host' : 'ingress',
    trafficPolicy: p.localOnly ? 'local' : 'cluster',
  };
}

function iso(ms: number | undefined): string {
  return ms ? new Date(ms).toISOString() : '';
}
