/**
 * The status queue: task status reports are coalesced per task (the newest wins) and sent in batches,
 * every flushMs or at once when maxBatch are pending, one UpdateTaskStatus call in flight at a time.
 * While no sender is attached (no session) reports wait; a failed send puts back the reports that
 * were not superseded meanwhile and retries later.
 */
import type { Logger } from '../../common/log.js';
import { errorMessage } from '../../common/errors.js';
import type { TaskStatusUpdate } from '../../gen/flotilla/v1/dispatcher.js';
import type { TaskStatus } from '../../gen/flotilla/v1/objects.js';

export type StatusSender = (updates: TaskStatusUpdate[]) => Promise<void>;

export interface StatusQueueOptions {
  /** delay before a batch is sent; default 10 ms (more batch up while a call is in flight) */
  flushMs?: number;
  /** send at once when this many tasks have pending reports; also the most sent in one call; default 256 */
  maxBatch?: number;
  /** delay before retrying a failed send; default 500 ms */
  retryMs?: number;
  log?: Logger;
}

export class StatusQueue {
  private pending = new Map<string, TaskStatus>();
  private sender: StatusSender | undefined;
  private timer: NodeJS.Timeout | undefined;
  private sending: Promise<void> | undefined;
  private retryAt = 0;
  private closed = false;
  readonly flushMs: number;
  readonly maxBatch: number;
  readonly retryMs: number;
  /** counters, for tests and diagnostics */
  readonly stats = { pushed: 0, sent: 0, calls: 0, failures: 0 };

  constructor(private readonly opts: StatusQueueOptions = {}) {
    this.flushMs = opts.flushMs ?? 10;
    this.maxBatch = Math.max(1, opts.maxBatch ?? 256);
    this.retryMs = opts.retryMs ?? 500;
  }

  /** Attaches (or, with undefined, detaches) the function that sends a batch. */
  setSender(sender: StatusSender | undefined): void {
    this.sender = sender;
    this.retryAt = 0;
    this.schedule();
  }

  push(taskId: string, status: TaskStatus): void {
    if (this.closed) return;
    this.stats.pushed++;
    this.pending.set(taskId, status);
    this.schedule();
  }

  /** Forgets pending reports of a task (it is no longer assigned). */
  drop(taskId: string): void {
    this.pending.delete(taskId);
  }

  get size(): number {
    return this.pending.size;
  }

  private schedule(): void {
    if (this.sending || !this.sender || this.pending.size === 0) return;
    let delay = this.pending.size >= this.maxBatch ? 0 : this.flushMs;
    delay = Math.max(delay, this.retryAt - Date.now());
    if (this.timer) {
      if (delay > 0) return; // a flush is already due
      clearTimeout(this.timer);
    }
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.sendBatch();
    }, delay);
  }

  private sendBatch(): void {
    const sender = this.sender;
    if (this.sending || !sender || this.pending.size === 0) return;
    const batch: TaskStatusUpdate[] = [];
    for (const [taskId, status] of this.pending) {
      batch.push({ taskId, status });
      if (batch.length >= this.maxBatch) break;
    }
    for (const u of batch) this.pending.delete(u.taskId);
    this.stats.calls++;
    this.sending = sender(batch).then(
      () => {
        this.stats.sent += batch.length;
        this.retryAt = 0;
      },
      (err: unknown) => {
        this.stats.failures++;
        // put back what was not superseded by a newer report meanwhile
        for (const u of batch) if (!this.pending.has(u.taskId) && u.status) this.pending.set(u.taskId, u.status);
        this.retryAt = Date.now() + this.retryMs;
        this.opts.log?.debug({ err: errorMessage(err), updates: batch.length }, 'sending task status failed; will retry');
      },
    );
    void this.sending.finally(() => {
      this.sending = undefined;
      if (!this.closed) this.schedule();
    });
  }

  /** Sends everything pending now (one attempt per batch); resolves when done or when sending fails. */
  async flush(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    while (true) {
      if (this.sending) await this.sending;
      if (!this.sender || this.pending.size === 0) return;
      const before = this.stats.failures;
      this.retryAt = 0;
      this.sendBatch();
      if (this.sending) await this.sending;
      if (this.stats.failures !== before) return;
    }
  }

  /** Stops the timer; pending reports are dropped after a last flush attempt bounded by timeoutMs. */
  async close(timeoutMs = 1000): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.flush(), new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)))]);
    clearTimeout(timer);
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }
}
