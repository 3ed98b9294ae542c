/**
 * The network flags of `service create|update`: --network (repeatable; `host` and `none` are the
 * container's network mode as in Docker, any other value an overlay network by name or id, with
 * optional aliases: `--network name=NET,alias=A`), --network-add/--network-rm (update) and
 * --endpoint-mode vip|dnsrr. Names are resolved to ids by the manager.
 */
import { EndpointMode, type Network, type NetworkAttachmentConfig, type ServiceSpec } from '../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../common/errors.js';

export interface NetworkFlags {
  network?: string[];
  networkAdd?: string[];
  networkRm?: string[];
  endpointMode?: string;
}

const MODES = new Set(['host', 'none']);

/** `NET` or `name=NET[,alias=A]...` */
export function parseNetworkFlag(flag: string, v: string): NetworkAttachmentConfig {
  if (!v.includes('=')) {
    if (!v) throw invalidArgument(flag, v, 'empty network name');
    return { target: v, aliases: [] };
  }
  let target = '';
  const aliases: string[] = [];
  for (const part of v.split(',')) {
    const i = part.indexOf('=');
    const k = i < 0 ? part : part.slice(0, i);
    const val = i < 0 ? '' : part.slice(i + 1);
    if (k === 'name' || k === 'target') target = val;
    else if (k === 'alias') aliases.push(val);
    else throw invalidArgument(flag, v, `unknown key ${JSON.stringify(k)} (expected name=NET,alias=A)`);
  }
  if (!target) throw invalidArgument(flag, v, 'missing name=NET');
  return { target, aliases };
}

export function parseEndpointMode(v: string): EndpointMode {
  if (v === 'vip') return EndpointMode.ENDPOINT_MODE_VIP;
  if (v === 'dnsrr') return EndpointMode.ENDPOINT_MODE_DNSRR;
  throw invalidArgument('--endpoint-mode', v, 'must be vip or dnsrr');
}

/** Sets the spec's network mode or overlay networks from --network values (replacing both). */
function setNetworks(spec: ServiceSpec, values: string[]): void {
  const task = spec.task!;
  const modes = values.filter((v) => MODES.has(v));
  if (modes.length > 0 && values.length > 1)
    throw invalidArgument('--network', modes[0], 'host and none cannot be combined with other networks');
  if (modes.length === 1) {
    task.container!.networkMode = modes[0]!;
    task.networks = [];
    return;
  }
  task.container!.networkMode = '';
  task.networks = values.map((v) => parseNetworkFlag('--network', v));
}

export function applyCreateNetworkFlags(spec: ServiceSpec, f: NetworkFlags): void {
  if (f.network?.length) setNetworks(spec, f.network);
  if (f.endpointMode !== undefined) spec.endpoint = { mode: parseEndpointMode(f.endpointMode), ports: [] };
}

/**
 * Applies update flags; `known` (the cluster's networks) maps names to the ids the current spec
 * holds, so that --network-rm NAME finds the attachment.
 */
export function applyUpdateNetworkFlags(spec: ServiceSpec, f: NetworkFlags, known: Network[]): void {
  const task = spec.task!;
  if (f.network?.length) {
    if (f.networkAdd?.length || f.networkRm?.length) throw invalidArgument('--network', f.network[0], 'cannot be combined with --network-add/--network-rm');
    setNetworks(spec, f.network);
  }
  const idOf = (ref: string): string => known.find((n) => n.spec?.name === ref)?.id ?? ref;
  for (const ref of f.networkRm ?? []) {
    const id = idOf(ref);
    const before = task.networks.length;
    task.networks = task.networks.filter((a) => a.target !== id && a.target !== ref);
    if (task.networks.length === before) throw invalidArgument('--network-rm', ref, 'the service is not on this network');
  }
  for (const v of f.networkAdd ?? []) {
    const a = parseNetworkFlag('--network-add', v);
    if (MODES.has(a.target)) throw invalidArgument('--network-add', v, 'host and none are network modes: use --network');
    const id = idOf(a.target);
    if (task.networks.some((x) => x.target === id || x.target === a.target)) throw invalidArgument('--network-add', v, 'the service is already on this network');
    task.networks.push(a);
  }
  if (f.endpointMode !== undefined) spec.endpoint = { mode: parseEndpointMode(f.endpointMode), ports: spec.endpoint?.ports ?? [] };
}
