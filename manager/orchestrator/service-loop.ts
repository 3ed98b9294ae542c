/**
 * The shape both task orchestrators share: a watch loop that reconciles one service at a time, in
 * its own transaction, and only the services events touched (all of them at start, and when nodes
 * change).
 */
import { Service, ServiceMode, Task } from '../../gen/flotilla/v1/objects.js';
import type { StoreEvent, Tx } from '../store/store.js';
import { ReconcileLoop } from './loop.js';
import { isTerminal } from './tasks.js';

export abstract class ServiceOrchestrator extends ReconcileLoop {
  protected abstract readonly mode: ServiceMode;
  private touched = new Set<string>();
  private all = true;

  /** One service's pass, inside a transaction. */
  abstract reconcileService(tx: Tx, serviceId: string): void;

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
    const old = ev.old as Task | undefined;
    // what matters of a task: it appeared or went, ended, or its desired state changed
    const matters = ev.kind !== 'update' || isTerminal(t.status?.state ?? 0) !== isTerminal(old?.status?.state ?? 0) || t.desiredState !== old?.desiredState;
    if (matters) this.touched.add(t.serviceId);
    return matters;
  }

  protected async reconcile(signal: AbortSignal): Promise<void> {
    const ids = this.all ? this.store.listServices().map((s) => s.id) : [...this.touched];
    this.all = false;
    this.touched = new Set();
    for (const id of ids) {
      if (signal.aborted) return;
      const s: Service | undefined = this.store.getService(id);
      if (s?.spec?.mode !== this.mode) continue;
      try {
        await this.store.update((tx) => this.reconcileService(tx, id), signal);
      } catch (err) {
        this.touched.add(id); // try again on the next pass
        throw err;
      }
    }
  }

  /** A wake-up (a restart delay ran out): reconcile everything on this pass. */
  protected override onWake(): void {
    this.all = true;
  }
}
