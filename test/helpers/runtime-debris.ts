/**
 * What a container runtime test checks at the end: no mounts under the data dir, no cgroup directories
 * of its containers, no runc state.
 */
import { readFileSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';

/** Mount points under dir, from /proc/self/mountinfo. */
export function mountsUnder(dir: string): string[] {
  const root = path.resolve(dir);
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => (l.split(' ')[4] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((mp) => mp === root || mp.startsWith(root + '/'));
}

/** Cgroup directories /sys/fs/cgroup/<hierarchy>/flotilla/<id> for the given ids (all ids when omitted). */
export function flotillaCgroups(ids?: string[]): string[] {
  const out: string[] = [];
  let hierarchies: string[] = [];
  try {
    hierarchies = readdirSync('/sys/fs/cgroup');
  } catch {
    return out;
  }
  for (const h of hierarchies) {
    const dir = path.join('/sys/fs/cgroup', h, 'flotilla');
    let entries: string[] = [];
    try {
      entries = readdirSync(dir, { withFileTypes: true })
        .filter((e) => e.isDirectory())
        .map((e) => e.name);
    } catch {
      continue;
    }
    for (const e of entries) if (!ids || ids.includes(e)) out.push(path.join(dir, e));
  }
  return out;
}

/**
 * Removes the run roots (volatile container state, see runRootOf) of every data dir at or under `under`,
 * found through their `data-dir` files: what a test does after removing its data dir.
 */
export function removeRunRoots(under: string): void {
  const root = path.resolve(under);
  const bases = [process.env.FLOTILLA_RUN_ROOT, '/run/flotilla', '/dev/shm/flotilla'].filter((b): b is string => !!b);
  for (const base of bases) {
    let entries: string[] = [];
    try {
      entries = readdirSync(base);
    } catch {
      continue;
    }
    for (const e of entries) {
      let owner = '';
      try {
        owner = readFileSync(path.join(base, e, 'data-dir'), 'utf8').trim();
      } catch {
        continue;
      }
      if (owner === root || owner.startsWith(root + '/')) rmSync(path.join(base, e), { recursive: true, force: true });
    }
  }
}
