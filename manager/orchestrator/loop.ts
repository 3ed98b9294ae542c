/**
 * The shape shared by every reconciler: a watch loop over the store. A full pass at start, then one
 * pass per batch of events it cares about (coalesced: events that arrive during a pass cause one
 * more pass), plus wake-ups it asks for (restart delays, update delays). Writes go back through the
 * store. Ends when the signal aborts.
 */
import type { Logger } from '../../common/log.js';
import { sleep } from '../../common/sleep.js';
import { setLongTimeout, type LongTimeout } from '../../common/timers.js';
import type { MemoryStore, StoreEvent } from '../store/store.js';

export abstract class ReconcileLoop {
  private timer: LongTimeout | undefined;
  private timerAt = Infinity;
  private kick: (() => void) | undefined;
  private dirty = true;

  constructor(
    protected readonly store: MemoryStore,
    protected readonly log: Logger,
  ) {}

  /** Whether an event should cause a pass. */
  protected abstract interested(ev: StoreEvent): boolean;
  /** One reconciliation pass over the current state. */
  protected abstract reconcile(signal: AbortSignal): Promise<void>;

  /**
   * Ask for a pass at (or soon after) the given time. Any distance is safe: the timer is chained
   * past Node's limit (common/timers.ts), so a far-off wake-up never fires early.
   */
  protected wakeAt(at: number): void {
    if (at >= this.timerAt) return;
    this.timer?.clear();
    this.timerAt = at;
    this.timer = setLongTimeout(
      () => {
        this.timer = undefined;
        this.timerAt = Infinity;
        this.dirty = true;
        this.onWake();
        this.kick?.();
      },
      Math.max(0, at - Date.now()),
    );
  }

  /** Called when a wake-up asked for with wakeAt() is due, before the pass it causes. */
  protected onWake(): void {}

  /** Ask for another pass right away. */
  protected poke(): void {
    this.dirty = true;
    this.kick?.();
  }

  async run(signal: AbortSignal): Promise<void> {
    const events = this.store.watch(signal);
    const onAbort = (): void => this.kick?.();
    signal.addEventListener('abort', onAbort, { once: true });
    // consume events in the background, marking dirty
    const consumer = (async () => {
      for await (const evs of events) {
        // every event is shown to interested() (no short cut): it may record what each one touched
        let any = false;
        for (const e of evs) if (this.interested(e)) any = true;
        if (any) {
          this.dirty = true;
          this.kick?.();
        }
      }
    })();
    try {
      while (!signal.aborted) {
        if (!this.dirty) {
          await new Promise<void>((resolve) => (this.kick = resolve));
          this.kick = undefined;
          continue;
        }
        this.dirty = false;
        try {
          await this.reconcile(signal);
        } catch (err) {
          if (signal.aborted) break;
          this.log.warn({ err: (err as Error).message }, `${this.constructor.name} pass failed; retrying`);
          this.dirty = true;
          await sleep(200, signal);
        }
      }
    } finally {
      signal.removeEventListener('abort', onAbort);
      this.timer?.clear();
      this.kick?.();
      await consumer;
    }
  }
}
