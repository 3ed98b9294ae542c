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
import { familiarName, parseReference } from '../common/imageref.js';

/**
 * The IMAGE cell of the tables. A pinned "name:tag@sha256:<64 hex>" is long: `service ls` shows
 * "name:tag" as Docker's does; `service ps` (digest: 'short') keeps the pin visible with the digest's
 * first 12 hex digits, as IDs are shortened. --no-trunc, --format json and inspect show it whole.
 */
export function imageCell(image: string, trunc = true, digest: 'none' | 'short' = 'none'): string {
  if (!trunc) return image;
  try {
    const ref = parseReference(image);
    if (ref.tag === undefined || ref.digest === undefined) return image;
    return `${familiarName(ref)}:${ref.tag}${digest === 'short' ? `@${ref.digest.slice(0, 19)}` : ''}`;
  } catch {
    return image;
  }
}

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

/** A task as `service ps/node ps/stack ps --format json` print it. */
export interface TaskJson {
  id: string;
  name: string;
  serviceId: string;
  service: string;
  slot: number;
  nodeId: string;
  node: string;
  image: string;
  state: string;
  desiredState: string;
  message: string;
  error: string;
  exitCode: number;
  oomKilled: boolean;
  health: string;
  containerId: string;
  specVersion: number;
  jobIteration: number;
  networks: Array<{ networkId: string; addresses: string[]; aliases: string[] }>;
  stateSince: string;
  createdAt: string;
}

export function taskJson(t: Task, nodes: Map<string, Node>): TaskJson {
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
    // jobs: the run of the job the task belongs to (service update --force starts a new one)
    jobIteration: t.jobIteration,
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
    mode: serviceModeName(spec.mode),
    replicas: spec.mode === ServiceMode.SERVICE_MODE_GLOBAL || spec.mode === ServiceMode.SERVICE_MODE_GLOBAL_JOB ? null : spec.replicas,
    maxConcurrent: spec.mode === ServiceMode.SERVICE_MODE_REPLICATED_JOB ? spec.maxConcurrent || spec.replicas : null,
    jobIteration: s.jobStatus?.jobIteration ?? null,
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

/**
 * `--format` with a Go-template-like text: `{{.Spec.Name}}` (a path into the object; each name
 * matched as written, or with its first letter lower-cased, or case-insensitively, so Docker's
 * `.Spec.Name` finds our `spec.name`), `{{json .Spec}}` / `{{json .}}` (JSON), `{{index .Labels "k"}}`;
 * `\t` and `\n` escapes as in Docker. Anything else between braces is an error naming it.
 */
export function renderTemplate(tpl: string, obj: unknown): string {
  const text = tpl.replace(/\\t/g, '\t').replace(/\\n/g, '\n');
  return text.replace(/\{\{\s*(.*?)\s*\}\}/g, (_m, expr: string) => {
    const json = /^json\s+(\S+)$/.exec(expr);
    if (json) return JSON.stringify(lookup(obj, json[1]!, expr));
    const index = /^index\s+(\S+)\s+"([^"]*)"$/.exec(expr);
    if (index) return show((lookup(obj, index[1]!, expr) as Record<string, unknown> | undefined)?.[index[2]!]);
    if (expr.startsWith('.')) return show(lookup(obj, expr, expr));
    throw new Error(`invalid --format template: cannot evaluate {{${expr}}} (use {{.Path.To.Field}}, {{json .Field}} or {{index .Map "key"}})`);
  });
}

function lookup(obj: unknown, path: string, expr: string): unknown {
  if (path === '.') return obj;
  if (!path.startsWith('.')) throw new Error(`invalid --format template: {{${expr}}}: expected a path starting with "."`);
  let cur: unknown = obj;
  for (const part of path.slice(1).split('.')) {
    if (cur === null || cur === undefined || typeof cur !== 'object') return undefined;
    const o = cur as Record<string, unknown>;
    const lower = part.charAt(0).toLowerCase() + part.slice(1);
    const key = part in o ? part : lower in o ? lower : Object.keys(o).find((k) => k.toLowerCase() === part.toLowerCase());
    if (key === undefined) throw new Error(`invalid --format template: {{${expr}}}: no field ${JSON.stringify(part)}`);
    cur = o[key];
  }
  return cur;
}

function show(v: unknown): string {
  if (v === undefined || v === null) return '<no value>';
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

export function serviceModeName(m: ServiceMode | undefined): string {
  switch (m) {
    case ServiceMode.SERVICE_MODE_GLOBAL:
      return 'global';
    case ServiceMode.SERVICE_MODE_REPLICATED_JOB:
      return 'replicated-job';
    case ServiceMode.SERVICE_MODE_GLOBAL_JOB:
      return 'global-job';
    default:
      return 'replicated';
  }
}
