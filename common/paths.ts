import path from 'node:path';

/** The node's data dir: --data-dir, then FLOTILLA_DATA_DIR, then /var/lib/flotilla. */
export function resolveDataDir(flag?: string): string {
  return path.resolve(flag ?? process.env.FLOTILLA_DATA_DIR ?? '/var/lib/flotilla');
}
