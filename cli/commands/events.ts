/**
 * `flotilla events`: the cluster's changes as they happen (the control API's Watch; admin only).
 * Like `docker events`: --since/--until (a duration such as 10m, an RFC 3339 time, or Unix seconds),
 * --filter type=|event=|service=, --format json. -H may name several managers (comma-separated): when
 * the stream breaks (a manager stops, a leader changes) the CLI reconnects, to the next one, and
 * resumes after the last event it printed, so no event is lost or printed twice
 * (docs/controlapi.md, "Events").
 */
import type { Command } from 'commander';
import * as grpc from '@grpc/grpc-js';
import type { WatchEvent, WatchRequest } from '../../gen/flotilla/v1/control.js';
import { invalidArgument } from '../../common/errors.js';
import { parseDuration } from '../../common/units.js';
import { Control, hostTarget } from '../client.js';
import { action, collect, ExitError } from '../util.js';
import { EVENT_ACTIONS, EVENT_TYPES } from '../../manager/controlapi/events.js';

/** How long the CLI keeps trying to reconnect before it gives up. */
const RECONNECT_FOR_MS = 60_000;

/** A time for --since/--until: a duration ago, an RFC 3339 time, or Unix seconds. */
export function parseTime(flag: string, v: string, now = Date.now()): number {
  if (/^\d+(\.\d+)?$/.test(v)) return Math.round(Number(v) * 1000);
  if (/^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$/.test(v)) return now - parseDuration(flag, v);
  const t = Date.parse(v);
  if (Number.isNaN(t)) throw invalidArgument(flag, v, 'expected a duration such as 10m, an RFC 3339 time such as 2026-01-02T15:04:05Z, or Unix seconds');
  return t;
}

export function parseEventFilters(filters: string[]): Pick<WatchRequest, 'types' | 'actions' | 'services'> {
  const out = { types: [] as string[], actions: [] as string[], services: [] as string[] };
  for (const f of filters) {
    const i = f.indexOf('=');
    const k = i < 0 ? f : f.slice(0, i);
    const v = i < 0 ? '' : f.slice(i + 1);
    if (!v) throw invalidArgument('--filter', f, 'expected KEY=VALUE (type=, event= or service=)');
    if (k === 'type') {
      if (!(EVENT_TYPES as readonly string[]).includes(v)) throw invalidArgument('--filter type', v, `must be one of ${EVENT_TYPES.join(', ')}`);
      out.types.push(v);
    } else if (k === 'event') {
      if (!(EVENT_ACTIONS as readonly string[]).includes(v)) throw invalidArgument('--filter event', v, `must be one of ${EVENT_ACTIONS.join(', ')}`);
      out.actions.push(v);
    } else if (k === 'service') out.services.push(v);
    else throw invalidArgument('--filter', f, 'supported keys: type, event, service');
  }
  return out;
}

function line(ev: WatchEvent, json: boolean): string {
  const time = new Date(ev.timeMs).toISOString();
  if (json)
    return JSON.stringify({
      revision: ev.revision,
      index: ev.index,
      time,
      type: ev.type,
      action: ev.action,
      id: ev.id,
      name: ev.name,
      ...(ev.serviceId ? { serviceId: ev.serviceId, service: ev.serviceName } : {}),
      ...(ev.nodeId ? { nodeId: ev.nodeId } : {}),
      ...(ev.state ? { state: ev.state } : {}),
    });
  const attrs = [`name=${ev.name}`];
  if (ev.type === 'task') attrs.push(`service=${ev.serviceName}`, `node=${ev.nodeId}`, `state=${ev.state}`);
  return `${time} ${ev.type} ${ev.action} ${ev.id} (${attrs.join(', ')})`;
}

export function register(program: Command): void {
  program
    .command('events')
    .description("Get the cluster's events (store changes) as they happen")
    .option('-H, --host <hosts>', 'manager address(es): unix:///path or HOST:PORT, comma-separated to fail over (env FLOTILLA_HOST)')
    .option('--since <time>', 'show events since a time (10m, RFC 3339, Unix seconds) from what the manager keeps')
    .option('--until <time>', 'stream events until this time')
    .option('-f, --filter <filter>', 'type=node|service|task|network|secret|config|cluster, event=create|update|remove, service=NAME (repeatable)', collect)
    .option('--format <format>', 'json: one JSON object per line')
    .action(
      action(async (opts: { host?: string; since?: string; until?: string; filter?: string[]; format?: string }) => {
        if (opts.format !== undefined && opts.format !== 'json' && opts.format !== 'table') throw new ExitError(2, `invalid --format "${opts.format}": use json`);
        const json = opts.format === 'json';
        const now = Date.now();
        const sinceMs = opts.since !== undefined ? parseTime('--since', opts.since, now) : 0;
        const untilMs = opts.until !== undefined ? parseTime('--until', opts.until, now) : 0;
        if (untilMs && sinceMs && untilMs < sinceMs) throw invalidArgument('--until', opts.until, 'is before --since');
        const filters = parseEventFilters(opts.filter ?? []);
        const hosts = (opts.host ?? process.env.FLOTILLA_HOST ?? '').split(',').filter(Boolean);
        if (hosts.length === 0) hosts.push('');
        // the position after which to resume: the last event printed (or the last keep-alive)
        let pos: { revision: number; index: number } | undefined;
        let attempt = 0;
        let brokenSince = 0;
        const stop = new AbortController();
        process.once('SIGINT', () => stop.abort());
        while (!stop.signal.aborted) {
          const target = hostTarget(hosts[attempt % hosts.length] || undefined);
          const c = new Control(target);
          const req: WatchRequest = {
            sinceRevision: pos?.revision ?? 0,
            sinceIndex: pos?.index ?? 0,
            resume: pos !== undefined,
            sinceMs: pos ? 0 : sinceMs,
            untilMs,
            ...filters,
          };
          const outcome = await new Promise<'end' | 'retry' | grpc.ServiceError>((resolve) => {
            const call = c.raw.watch(req);
            const onAbort = (): void => call.cancel();
            stop.signal.addEventListener('abort', onAbort, { once: true });
            call.on('data', (ev: WatchEvent) => {
              brokenSince = 0;
              if (!ev.progress) process.stdout.write(line(ev, json) + '\n');
              if (!pos || ev.revision > pos.revision || (ev.revision === pos.revision && ev.index > pos.index)) pos = { revision: ev.revision, index: ev.index };
            });
            call.on('end', () => resolve('end'));
            call.on('error', (err: grpc.ServiceError) => {
              stop.signal.removeEventListener('abort', onAbort);
              if (err.code === grpc.status.CANCELLED && stop.signal.aborted) return resolve('end');
              // a manager that stopped, restarted from a snapshot, or is unreachable: go on elsewhere
              if ([grpc.status.UNAVAILABLE, grpc.status.CANCELLED, grpc.status.ABORTED, grpc.status.INTERNAL, grpc.status.UNKNOWN, grpc.status.DEADLINE_EXCEEDED].includes(err.code))
                return resolve('retry');
              resolve(err);
            });
          });
          c.close();
          if (outcome === 'end') return;
          if (outcome !== 'retry') throw new ExitError(1, outcome.details || outcome.message);
          if (untilMs && Date.now() > untilMs && !pos) return;
          brokenSince ||= Date.now();
          if (Date.now() - brokenSince > RECONNECT_FOR_MS) throw new ExitError(1, `lost the event stream and could not resume it within ${RECONNECT_FOR_MS / 1000}s (tried ${hosts.join(', ') || 'the default socket'})`);
          attempt++;
          await new Promise((r) => setTimeout(r, 300));
        }
      }),
    );
}
