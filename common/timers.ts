/**
 * Timers for any length of time. Node's setTimeout holds at most 2^31-1 ms (about 24.8 days): a
 * longer delay fires after 1 ms instead, with a TimeoutOverflowWarning. setLongTimeout chains
 * timers of at most that length until the deadline, so a delay read from a spec can never turn into
 * a busy loop.
 */

/** The longest delay Node's setTimeout honours, in milliseconds. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

export interface LongTimeout {
  /** Cancels the timer (idempotent). */
  clear(): void;
}

/**
 * Calls fn once after ms milliseconds (ms < 0 or NaN counts as 0; Infinity never fires). Delays
 * longer than MAX_TIMER_MS are chained against a fixed deadline.
 */
export function setLongTimeout(fn: () => void, ms: number): LongTimeout {
  const delay = Number.isNaN(ms) ? 0 : Math.max(0, ms);
  let timer: NodeJS.Timeout | undefined;
  let cleared = false;
  const deadline = Date.now() + delay;
  const arm = (left: number): void => {
    timer = setTimeout(step, Math.min(MAX_TIMER_MS, Math.max(0, left)));
  };
  function step(): void {
    timer = undefined;
    if (cleared) return;
    const left = deadline - Date.now();
    if (left > 0) return arm(left);
    cleared = true;
    fn();
  }
  if (delay !== Infinity) arm(delay);
  return {
    clear(): void {
      cleared = true;
      if (timer) clearTimeout(timer);
      timer = undefined;
    },
  };
}
