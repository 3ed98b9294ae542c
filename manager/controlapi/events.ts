/**
 * Watch: the store's changes as a stream of events (`flotilla events`), served by any manager from
 * its own replicated store (manager/store/history.ts). Admin callers only (CONTROL_POLICY).
 *
 * Where the stream starts: after (since_revision, since_index) when resume is set (OUT_OF_RANGE when
 * the manager no longer keeps it); else at since_ms in the kept history; else from now. Events
 * already sent are never sent again on the same stream (each is sent once, in (revision, index)
 * order); a client resumes after the last one it got. A snapshot restore under a live stream ends it
 * with ABORTED (the client's resume then fails with OUT_OF_RANGE: it lost nothing silently).
 */
import * as grpc from '@grpc/grpc-js';
import type { WatchEvent, WatchRequest } from '../../gen/flotilla/v1/control.js';
import { FlotillaError, invalidArgument } from '../../common/errors.js';
import { grpcError } from '../grpc.js';
import type { HistoryEvent, StoreHistory } from '../store/history.js';

export const EVENT_TYPES = ['node', 'service', 'task', 'network', 'secret', 'config', 'cluster'] as const;
export const EVENT_ACTIONS = ['create', 'update', 'remove'] as const;
/** a client this many events behind is cut off (it resumes from where it got to) */
const MAX_BUFFERED = 10_000;
const PROGRESS_MS = 2_000;
/** since_index meaning "all of since_revision" */
export const WHOLE_REVISION = 0xffffffff;

export function toWatchEvent(h: HistoryEvent): WatchEvent {
  const e = h.event;
  return {
    revision: h.revision,
    index: h.index,
    timeMs: h.time,
    type: e.table,
    action: e.kind === 'delete' ? 'remove' : e.kind,
    id: e.id,
    name: e.name,
    serviceId: e.serviceId,
    serviceName: e.serviceName,
    nodeId: e.nodeId,
    state: e.state,
    progress: false,
  };
}

export function validateWatch(req: WatchRequest): void {
  for (const t of req.types) if (!(EVENT_TYPES as readonly string[]).includes(t)) throw invalidArgument('type', t, `must be one of ${EVENT_TYPES.join(', ')}`);
  for (const a of req.actions) if (!(EVENT_ACTIONS as readonly string[]).includes(a)) throw invalidArgument('event', a, `must be one of ${EVENT_ACTIONS.join(', ')}`);
  if (req.untilMs && req.sinceMs && req.untilMs < req.sinceMs) throw invalidArgument('until', req.untilMs, 'is before --since');
}

/** Whether an event passes the request's filters. */
export function matches(req: WatchRequest, ev: WatchEvent): boolean {
  if (req.types.length && !req.types.includes(ev.type)) return false;
  if (req.actions.length && !req.actions.includes(ev.action)) return false;
  if (req.services.length) {
    if (!ev.serviceId) return false;
    if (!req.services.some((s) => s === ev.serviceName || s === ev.serviceId || (s.length >= 6 && ev.serviceId.startsWith(s)))) return false;
  }
  return true;
}

export function serveWatch(history: StoreHistory, call: grpc.ServerWritableStream<WatchRequest, WatchEvent>): void {
  const req = call.request;
  let lastRev = 0;
  let lastIdx = 0;
  let done = false;
  let unsubscribe = (): void => {};
  let progress: NodeJS.Timeout | undefined;
  let until: NodeJS.Timeout | undefined;
  const finish = (err?: unknown): void => {
    if (done) return;
    done = true;
    unsubscribe();
    clearInterval(progress);
    clearTimeout(until);
    if (err) call.emit('error', grpcError(err));
    else call.end();
  };
  call.on('cancelled', () => finish());
  const send = (evs: HistoryEvent[]): void => {
    for (const h of evs) {
      if (done) return;
      // each event once, in order (history and live can overlap by a batch)
      if (h.revision < lastRev || (h.revision === lastRev && h.index <= lastIdx)) continue;
      lastRev = h.revision;
      lastIdx = h.index;
      if (req.untilMs && h.time > req.untilMs) return finish();
      const ev = toWatchEvent(h);
      if (matches(req, ev)) call.write(ev);
    }
    if (call.writableLength > MAX_BUFFERED)
      finish(new FlotillaError('RESOURCE_EXHAUSTED', `the client is over ${MAX_BUFFERED} events behind; resume after revision ${lastRev}.${lastIdx}`));
  };
  try {
    validateWatch(req);
    let backlog: HistoryEvent[];
    const resume = req.resume || req.sinceRevision > 0;
    if (resume) {
      if (req.sinceRevision < history.floor)
        throw new FlotillaError(
          'OUT_OF_RANGE',
          `revision ${req.sinceRevision} is no longer kept by this manager (it keeps revisions after ${history.floor}); events since then may be lost: start again without a revision`,
        );
      backlog = history.after(req.sinceRevision, req.sinceIndex);
      lastRev = req.sinceRevision;
      lastIdx = req.sinceIndex;
    } else if (req.sinceMs) {
      backlog = history.since(req.sinceMs);
    } else {
      backlog = [];
      lastRev = history.last;
      lastIdx = WHOLE_REVISION;
    }
    // live events queue behind the backlog (no await in between: nothing slips through)
    unsubscribe = history.subscribe(
      (evs) => send(evs),
      () => finish(new FlotillaError('ABORTED', `the manager replaced its state from a snapshot at revision ${history.floor}; resume from there`)),
    );
    send(backlog);
    if (done) return;
    // everything the manager had applied has been considered: the position is at least there
    if (history.last > lastRev) {
      lastRev = history.last;
      lastIdx = WHOLE_REVISION;
    }
    if (req.untilMs) {
      const left = req.untilMs - Date.now();
      if (left <= 0) return finish();
      until = setTimeout(() => finish(), Math.min(left, 2 ** 31 - 1));
    }
    // keep-alives carry the position the stream has reached (a client resumes after it): one at
    // once, so a client that asked for "from now" knows where now was
    const keepAlive = (first = false): void => {
      if (done || (!first && call.writableLength > 0)) return;
      call.write({ revision: lastRev, index: lastIdx, timeMs: Date.now(), type: '', action: '', id: '', name: '', serviceId: '', serviceName: '', nodeId: '', state: '', progress: true });
    };
    keepAlive(true);
    progress = setInterval(keepAlive, PROGRESS_MS);
  } catch (err) {
    finish(err);
  }
}
