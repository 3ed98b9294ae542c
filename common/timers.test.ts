import { afterEach, describe, expect, it, vi } from 'vitest';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { MAX_TIMER_MS, setLongTimeout } from './timers.js';
import { sleep } from './sleep.js';
import { parseDuration } from './units.js';
import { DURATION_RANGES } from './durations.js';
import { ReconcileLoop } from '../manager/orchestrator/loop.js';
import { MemoryStore, type StoreEvent } from '../manager/store/store.js';
import { MemoryProposer } from '../manager/store/memory-proposer.js';
import { createLogger } from './log.js';
import { testService } from '../testing/testutil.js';

const DAY = 24 * 3_600_000;

describe('setLongTimeout', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('does not fire early for a delay over Node’s timer limit', async () => {
    let fired = 0;
    const t = setLongTimeout(() => fired++, 30 * DAY);
    try {
      await new Promise((r) => setTimeout(r, 50));
      expect(fired).toBe(0);
    } finally {
      t.clear();
    }
  });

  it('chains timers up to the deadline, then fires once', () => {
    vi.useFakeTimers();
    let fired = 0;
    setLongTimeout(() => fired++, 60 * DAY);
    vi.advanceTimersByTime(MAX_TIMER_MS + 1);
    expect(fired).toBe(0);
    vi.advanceTimersByTime(59 * DAY - MAX_TIMER_MS);
    expect(fired).toBe(0);
    vi.advanceTimersByTime(DAY);
    expect(fired).toBe(1);
    vi.advanceTimersByTime(100 * DAY);
    expect(fired).toBe(1);
  });

  it('can be cleared between links of the chain', () => {
    vi.useFakeTimers();
    let fired = 0;
    const t = setLongTimeout(() => fired++, 40 * DAY);
    vi.advanceTimersByTime(30 * DAY);
    t.clear();
    vi.advanceTimersByTime(30 * DAY);
    expect(fired).toBe(0);
  });

  it('sleep: a long sleep waits, and the signal ends it', async () => {
    const ac = new AbortController();
    let done = false;
    const p = sleep(9999999 * 3_600_000, ac.signal).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(done).toBe(false);
    ac.abort();
    await p;
    expect(done).toBe(true);
  });
});

class CountingLoop extends ReconcileLoop {
  passes = 0;
  wakeIn = 0;
  protected interested(): boolean {
    return false;
  }
  protected async reconcile(): Promise<void> {
    this.passes++;
    if (this.wakeIn) this.wakeAt(Date.now() + this.wakeIn);
  }
}

describe('reconcile loop wake-ups', () => {
  it('a wake-up months away does not spin the loop', async () => {
    const log = createLogger('test');
    log.level = 'silent';
    const store = new MemoryStore(log);
    const loop = new CountingLoop(store, log);
    loop.wakeIn = 9999999 * 3_600_000; // --restart-delay 9999999h
    const ac = new AbortController();
    const run = loop.run(ac.signal);
    try {
      await new Promise((r) => setTimeout(r, 200));
      // the first pass only: an overflowing timer fires every millisecond (hundreds of passes)
      expect(loop.passes).toBe(1);
    } finally {
      ac.abort();
      await run;
    }
  });
});

describe('duration flags', () => {
  it('refuses a duration out of its range in one line naming the flag and the value', () => {
    expect(() => parseDuration('--restart-delay', '9999999h')).toThrow(/^invalid --restart-delay "9999999h": must be between 0 and 168h$/);
    expect(() => parseDuration('--stop-grace-period', '25h')).toThrow(/^invalid --stop-grace-period "25h": must be between 0 and 24h$/);
    expect(() => parseDuration('--update-monitor', '99999999999999999999h')).toThrow(/^invalid --update-monitor .*: must be between 0 and 24h$/);
    expect(() => parseDuration('--heartbeat-period', '10ms')).toThrow(/^invalid --heartbeat-period "10ms": must be between 100ms and 1h$/);
    expect(parseDuration('--restart-delay', '168h')).toBe(7 * DAY);
    expect(parseDuration('--restart-window', '720h')).toBe(30 * DAY);
    expect(parseDuration('--health-interval', '1m30s')).toBe(90_000);
  });

  it('every range fits in Node’s timers, except the restart window (never a timer)', () => {
    for (const [name, r] of Object.entries(DURATION_RANGES)) {
      if (name === 'restart-window') continue;
      expect(r.max, name).toBeLessThanOrEqual(MAX_TIMER_MS);
    }
  });
});

describe('store listeners', () => {
  it('a listener that throws is logged and does not break apply', async () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        lines.push(chunk.toString());
        cb();
      },
    });
    const store = new MemoryStore(pino({ level: 'info' }, sink));
    store.setProposer(new MemoryProposer(store));
    const seen: StoreEvent[][] = [];
    store.subscribe(() => {
      throw new Error('listener boom');
    });
    store.subscribe((evs) => seen.push(evs));
    await store.update((tx) => tx.create('service', testService('web', 1)));
    expect(store.services.size).toBe(1);
    expect(seen).toHaveLength(1);
    await new Promise((r) => setImmediate(r));
    const logged = lines.map((l) => JSON.parse(l) as { msg: string; err: string; level: number });
    expect(logged).toEqual([expect.objectContaining({ msg: 'store listener failed', err: 'listener boom', level: 50 })]);
  });
});
