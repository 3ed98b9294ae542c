/**
 * The one registry of requests waiting on the Raft loop: proposals and conf changes (settled when
 * the entry carrying their request id is applied here), read-index requests (settled with the
 * read index when the core reports it), and waits for the applied index. Every wait has the
 * request deadline and follows its caller's AbortSignal.
 */
import { FlotillaError } from '../../common/errors.js';

interface Waiter {
  resolve: (v: unknown) => void;
  reject: (err: unknown) => void;
}

export class Waiters {
  private readonly byKey = new Map<string, Waiter>();
  /** waits for the applied index to reach an index */
  private applied: { index: number; resolve: () => void }[] = [];

  constructor(private readonly timeoutMs: number) {}

  /**
   * Register `key`, then run `submit` (which hands the request to the core; a throw rejects the
   * wait, mapped by mapError). Resolves with what settle() passes.
   */
  wait<T>(key: string, signal: AbortSignal | undefined, submit: () => void, mapError?: (err: unknown) => unknown): Promise<T> {
    return this.withDeadline<T>(signal, (resolve, reject) => {
      this.byKey.set(key, { resolve: resolve as (v: unknown) => void, reject });
      try {
        submit();
      } catch (err) {
        this.byKey.delete(key);
        reject(mapError ? mapError(err) : err);
        return () => {};
      }
      return () => this.byKey.delete(key);
    });
  }

  has(key: string): boolean {
    return this.byKey.has(key);
  }

  /** Settle the wait for key (if any): rejected with failure when given, else resolved with value. */
  settle(key: string, value: unknown, failure?: unknown): void {
    const w = this.byKey.get(key);
    if (!w) return;
    this.byKey.delete(key);
    if (failure !== undefined) w.reject(failure);
    else w.resolve(value);
  }

  /** Reject every keyed wait (leader change, stop). */
  rejectAll(err: unknown): void {
    if (this.byKey.size === 0) return;
    const ws = [...this.byKey.values()];
    this.byKey.clear();
    for (const w of ws) w.reject(err);
  }

  /** Resolves once wakeApplied() reports an applied index >= index. */
  waitApplied(index: number, signal: AbortSignal | undefined): Promise<void> {
    return this.withDeadline<void>(signal, (resolve) => {
      const w = { index, resolve };
      this.applied.push(w);
      return () => {
        this.applied = this.applied.filter((x) => x !== w);
      };
    });
  }

  wakeApplied(applied: number): void {
    if (this.applied.length === 0) return;
    const ready = this.applied.filter((w) => w.index <= applied);
    if (ready.length === 0) return;
    this.applied = this.applied.filter((w) => w.index > applied);
    for (const w of ready) w.resolve();
  }

  /** Release every applied-index wait (the node stops; its callers then see it stopped). */
  releaseApplied(): void {
    const ws = this.applied;
    this.applied = [];
    for (const w of ws) w.resolve();
  }

  /** Runs register with a request deadline: rejects with DEADLINE_EXCEEDED or the signal's reason. */
  private withDeadline<T>(signal: AbortSignal | undefined, register: (resolve: (v: T) => void, reject: (e: unknown) => void) => () => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let unregister: () => void = () => {};
      const done = (): void => {
        clearTimeout(t);
        signal?.removeEventListener('abort', onAbortSig);
      };
      const onAbortSig = (): void => {
        done();
        unregister();
        reject(signal!.reason);
      };
      const t = setTimeout(() => {
        done();
        unregister();
        reject(new FlotillaError('DEADLINE_EXCEEDED', `raft request not done within ${this.timeoutMs} ms; it may or may not have been committed: retry`));
      }, this.timeoutMs);
      signal?.addEventListener('abort', onAbortSig, { once: true });
      unregister = register(
        (v) => {
          done();
          resolve(v);
        },
        (e) => {
          done();
          reject(e);
        },
      );
    });
  }
}
