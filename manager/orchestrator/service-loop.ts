/**
 * The shape the orchestrators and the updater share: a watch loop that reconciles one service at a
 * time, in its own transaction, and only the services events touched (all of them at start, after a
 * node change, and on a wake-up it asked for).
 */
import { Service, ServiceMode, Task } from '../../gen/flotilla/v1/objects.js';
import type { StoreEvent, Tx } from '../store/store.js';
import { errorMessage } from '../../common/errors.js';
import { ReconcileLoop } from './loop.js';
import { isTerminal } from './tasks.js';

export abstract class ServiceLoop extends ReconcileLoop {
  private touched = new Set<string>();
  private all = true;

  /** One service's pass, inside a transaction. */
  abstract reconcileService(tx: Tx, serviceId: string): void;
  /** Whether a change of this task is worth a pass over its service. */
  protected abstract taskMatters(t: Task, old: Task | undefined, kind: 'create' | 'update' | 'delete'): boolean;
  /** Whether this service needs a pass at all (read before its transaction). */
  protected abstract wants(s: Service): boolean;
  /** Called once before each pass over the services. */
  protected beginPass(): void {}

  protected interested(ev: StoreEvent): boolean {
    if (ev.kind === 'commit') return false;
    if (ev.table === 'node') {
      this.all = true;
      return true;
    }
    if (ev.table === 'service') {
      this.touched.add(ev.object.id);
      return true;
    }
    if (ev.table !== 'task') return false;
    const t = ev.object as Task;
    const matters = this.taskMatters(t, ev.old as Task | undefined, ev.kind);
    if (matters) this.touched.add(t.serviceId);
    return matters;
  }

  /**
   * One pass over the services touched. A service's writes are split into batches that fit under
   * the store's batch limit (updateBatched), and a service whose pass fails does not hold up the
   * others: it is retried on the next pass, after the rest have had theirs.
   */
  protected async reconcile(signal: AbortSignal): Promise<void> {
    const ids = this.all ? this.store.listServices().map((s) => s.id) : [...this.touched];
    this.all = false;
    this.touched = new Set();
    this.beginPass();
    let failed: unknown;
    for (const id of ids) {
      if (signal.aborted) return;
      const s: Service | undefined = this.store.getService(id);
      if (!s || !this.wants(s)) continue;
      try {
        await this.store.updateBatched((tx) => this.reconcileService(tx, id), signal);
      } catch (err) {
        if (signal.aborted) return;
        this.touched.add(id); // try again on the next pass
        this.log.warn({ service: s.spec?.name ?? id, err: errorMessage(err) }, `${this.constructor.name}: service pass failed`);
        failed ??= err;
      }
    }
    if (failed !== undefined) throw failed;
  }

  /** A wake-up (a delay ran out): look at every service on this pass. */
  protected override onWake(): void {
    this.all = true;
  }
}

/** The replicated and global orchestrators: services of one mode. */
export abstract class ServiceOrchestrator extends ServiceLoop {
  protected abstract readonly mode: ServiceMode;

  protected wants(s: Service): boolean {
    return s.spec?.mode === this.mode;
  }

  /** What matters of a task: it appeared or went, ended, or its desired state changed. */
  protected taskMatters(t: Task, old: Task | undefined, kind: 'create' | 'update' | 'delete'): boolean {
    return kind !== 'update' || isTerminal(t.status?.state ?? 0) !== isTerminal(old?.status?.state ?? 0) || t.desiredState !== old?.desiredState;
  }
}
