import { setLongTimeout } from './timers.js';

/**
 * Resolves after ms, or at once when the signal aborts (never rejects). Any length is safe: delays
 * over Node's timer limit (about 24.8 days) are chained (common/timers.ts), not cut to 1 ms.
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setLongTimeout(done, ms);
    function done(): void {
      t.clear();
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}
