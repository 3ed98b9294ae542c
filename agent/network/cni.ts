/**
 * Calls CNI plugins as the CNI spec (1.0.0) has a runtime do it: the plugin named by `type` is run from
 * CNI_PATH with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH in its
 * environment and the network configuration as JSON on stdin; ADD answers with a result on stdout, a
 * failure with an error object ({code, msg, details}) and a non-zero exit. A network configuration list
 * runs its plugins in order for ADD (each gets the previous one's result as `prevResult`) and in
 * reverse order for DEL; `runtimeConfig` carries the capability arguments (e.g. `mac`) a plugin declares
 * in `capabilities`. Callers serialise calls per container (NodeNetwork holds a lock per task).
 *
 * Children start through the spawner thread (agent/runtime/spawner.ts), never on the daemon's main thread.
 */
import path from 'node:path';
import { FlotillaError } from '../../common/errors.js';
import { execInWorker } from '../runtime/spawner.js';

export const CNI_VERSION = '1.0.0';
export const DEFAULT_CNI_PATH = '/usr/lib/cni';

export interface CniPlugin {
  type: string;
  /** capability arguments this plugin accepts through runtimeConfig */
  capabilities?: Record<string, boolean>;
  [key: string]: unknown;
}

export interface CniNetworkList {
  cniVersion: string;
  name: string;
  plugins: CniPlugin[];
}

export interface CniRuntime {
  containerId: string;
  /** path of the container's network namespace */
  netns: string;
  ifname: string;
  /** CNI_ARGS pairs */
  args?: Record<string, string>;
  /** capability arguments (runtimeConfig), given to the plugins that declare them */
  capabilityArgs?: Record<string, unknown>;
}

export interface CniOptions {
  /** directories of the plugin binaries (CNI_PATH); default /usr/lib/cni */
  cniPath?: string[];
  /** run the plugins inside this network namespace (nsenter --net=PATH): the "host" side; default ours */
  hostNetns?: string;
  timeoutMs?: number;
}

export type CniResult = Record<string, unknown> & { ips?: { address: string; gateway?: string; interface?: number }[]; interfaces?: { name: string; mac?: string; sandbox?: string }[] };

export class CniError extends FlotillaError {
  constructor(
    readonly plugin: string,
    readonly command: string,
    readonly cniCode: number | undefined,
    message: string,
  ) {
    super('INTERNAL', message);
    this.name = 'CniError';
  }
}

/** Runs one plugin once; resolves its parsed stdout (empty object when it printed nothing). */
export async function invokePlugin(command: 'ADD' | 'DEL' | 'CHECK' | 'VERSION', conf: Record<string, unknown>, rt: CniRuntime, o: CniOptions = {}): Promise<CniResult> {
  const type = String(conf.type ?? '');
  if (!/^[a-zA-Z0-9_.-]+$/.test(type)) throw new FlotillaError('INVALID_ARGUMENT', `invalid CNI plugin type ${JSON.stringify(type)}`);
  const dirs = o.cniPath ?? [DEFAULT_CNI_PATH];
  const bin = path.join(dirs[0]!, type);
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    CNI_COMMAND: command,
    CNI_CONTAINERID: rt.containerId,
    CNI_NETNS: rt.netns,
    CNI_IFNAME: rt.ifname,
    CNI_PATH: dirs.join(':'),
  };
  const args = Object.entries(rt.args ?? {});
  if (args.length > 0) env.CNI_ARGS = args.map(([k, v]) => `${k}=${v}`).join(';');
  const file = o.hostNetns ? 'nsenter' : bin;
  const argv = o.hostNetns ? [`--net=${o.hostNetns}`, '--', bin] : [];
  const r = await execInWorker(file, argv, { env, input: JSON.stringify(conf), timeoutMs: o.timeoutMs ?? 30_000 });
  const out = r.stdout.trim();
  let parsed: Record<string, unknown> = {};
  if (out) {
    try {
      parsed = JSON.parse(out) as Record<string, unknown>;
    } catch {
      parsed = { msg: out };
    }
  }
  if (r.code !== 0) {
    const msg = typeof parsed.msg === 'string' ? parsed.msg : r.stderr.trim() || r.error || `exit ${r.code}`;
    const details = typeof parsed.details === 'string' && parsed.details ? ` (${parsed.details})` : '';
    throw new CniError(type, command, typeof parsed.code === 'number' ? parsed.code : undefined, `CNI ${type} ${command} for ${rt.ifname} of ${rt.containerId}: ${msg}${details}`);
  }
  return parsed as CniResult;
}

/** The configuration one plugin of a list is given: its own keys, the list's name and version, runtimeConfig, prevResult. */
function pluginConf(list: CniNetworkList, p: CniPlugin, rt: CniRuntime, prevResult: CniResult | undefined): Record<string, unknown> {
  const conf: Record<string, unknown> = { ...p, cniVersion: list.cniVersion, name: list.name };
  const caps = Object.entries(p.capabilities ?? {}).filter(([k, on]) => on && rt.capabilityArgs?.[k] !== undefined);
  if (caps.length > 0) conf.runtimeConfig = Object.fromEntries(caps.map(([k]) => [k, rt.capabilityArgs![k]]));
  delete conf.capabilities;
  if (prevResult) conf.prevResult = prevResult;
  return conf;
}

/** ADD of a configuration list: each plugin in order, chaining results; resolves the last result. */
export async function cniAdd(list: CniNetworkList, rt: CniRuntime, o: CniOptions = {}): Promise<CniResult> {
  let prev: CniResult | undefined;
  for (const p of list.plugins) prev = await invokePlugin('ADD', pluginConf(list, p, rt, prev), rt, o);
  return prev ?? {};
}

/**
 * DEL of a configuration list: each plugin in reverse order, with the ADD's result when known. Every
 * plugin is called even when one fails (the first error is thrown after); plugins make DEL idempotent.
 */
export async function cniDel(list: CniNetworkList, rt: CniRuntime, prevResult: CniResult | undefined, o: CniOptions = {}): Promise<void> {
  let first: unknown;
  for (const p of [...list.plugins].reverse()) {
    try {
      await invokePlugin('DEL', pluginConf(list, p, rt, prevResult), rt, o);
    } catch (err) {
      first ??= err;
    }
  }
  if (first !== undefined) throw first;
}

/** CHECK of a configuration list (the ADD's result is required): each plugin in order. */
export async function cniCheck(list: CniNetworkList, rt: CniRuntime, prevResult: CniResult, o: CniOptions = {}): Promise<void> {
  for (const p of list.plugins) await invokePlugin('CHECK', pluginConf(list, p, rt, prevResult), rt, o);
}
