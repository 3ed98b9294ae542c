/**
 * Progress of `image pull` / `image push`, like Docker's: one line per layer, rewritten in place on a
 * terminal ("3f4ca61aafcd: Downloading [=====>      ]  12.3MB/40.1MB"), and on anything else one plain
 * line each time a layer changes state (no byte counts), so logs stay short.
 */
import type { ProgressEvent } from '../agent/runtime/registry/index.js';
import { formatBytes } from '../common/units.js';

const LABEL: Record<ProgressEvent['status'], string> = {
  resolved: 'Resolved',
  waiting: 'Waiting',
  exists: 'Already exists',
  downloading: 'Downloading',
  verifying: 'Verifying Checksum',
  extracting: 'Extracting',
  complete: 'Pull complete',
  pushing: 'Pushing',
  pushed: 'Pushed',
  done: 'Done',
};

function bar(current: number, total: number): string {
  const width = 40;
  const filled = total > 0 ? Math.min(width, Math.floor((current / total) * width)) : 0;
  return `[${'='.repeat(Math.max(0, filled - 1))}${filled > 0 ? '>' : ''}${' '.repeat(width - filled)}]`;
}

export class ProgressDisplay {
  private readonly order: string[] = [];
  private readonly lines = new Map<string, string>();
  private readonly states = new Map<string, string>();

  constructor(
    private readonly out: NodeJS.WriteStream = process.stdout,
    private readonly tty = out.isTTY === true,
    private readonly pushing = false,
  ) {}

  /** The onProgress callback for pull/push. */
  readonly onProgress = (e: ProgressEvent): void => {
    if (e.kind === 'manifest' || e.kind === 'config') return;
    const id = e.id.replace(/^sha256:/, '').slice(0, 12);
    let text = LABEL[e.status];
    if (this.pushing && e.status === 'exists') text = 'Layer already exists';
    if (this.pushing && e.status === 'waiting') text = 'Preparing';
    if ((e.status === 'downloading' || e.status === 'pushing') && e.total) {
      text = `${text} ${bar(e.current ?? 0, e.total)} ${formatBytes(e.current ?? 0)}/${formatBytes(e.total)}`;
    }
    const line = `${id}: ${text}`;
    if (!this.tty) {
      // one line per change of state
      if (this.states.get(id) === e.status) return;
      this.states.set(id, e.status);
      this.out.write(`${line}\n`);
      return;
    }
    const idx = this.order.indexOf(id);
    if (idx < 0) {
      this.order.push(id);
      this.lines.set(id, line);
      this.out.write(`${line}\n`);
      return;
    }
    if (this.lines.get(id) === line) return;
    this.lines.set(id, line);
    const up = this.order.length - idx;
    this.out.write(`\x1b[${up}A\r\x1b[K${line}\x1b[${up}B\r`);
  };
}
