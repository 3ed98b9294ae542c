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

/**
 * Where the kernel says process pid is, against the cgroup directories a runtime reports for it (by
 * hierarchy key, as `inspect` gives them): for each reported directory, the line of /proc/<pid>/cgroup
 * of that hierarchy must name the same directory and cgroup.procs in it must list pid. Returns the
 * differences (empty when they agree).
 */
export function cgroupMismatches(pid: number, reported: Record<string, string>): string[] {
  const out: string[] = [];
  const byKey = new Map<string, string>();
  for (const line of readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n')) {
    const m = /^\d+:([^:]*):(.*)$/.exec(line);
    if (!m) continue;
    const ctrls = m[1]!.split(',').map((c) => c.replace(/^name=/, ''));
    byKey.set(ctrls.length === 1 && ctrls[0] === '' ? 'unified' : ctrls.join(','), m[2]!);
  }
  if (Object.keys(reported).length === 0) out.push('no cgroup directories reported');
  for (const [key, dir] of Object.entries(reported)) {
    const mountpoint = path.join('/sys/fs/cgroup', key);
    const inProc = byKey.get(key) ?? [...byKey.entries()].find(([k]) => k.split(',').sort().join(',') === key.split(',').sort().join(','))?.[1];
    if (inProc === undefined) {
      out.push(`${key}: no line in /proc/${pid}/cgroup`);
      continue;
    }
    const actual = path.join(mountpoint, inProc);
    if (actual !== path.resolve(dir)) out.push(`${key}: reported ${dir}, /proc/${pid}/cgroup says ${actual}`);
    let procs: string[] = [];
    try {
      procs = readFileSync(path.join(dir, 'cgroup.procs'), 'utf8').split('\n');
    } catch (err) {
      out.push(`${key}: ${(err as Error).message}`);
      continue;
    }
    if (!procs.includes(String(pid))) out.push(`${key}: ${dir}/cgroup.procs does not list ${pid}`);
  }
  return out;
}

/** Whether a process with this pid exists and is not a zombie. */
export function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) [ZX] /s.test(stat);
  } catch {
    return false;
  }
}

/** The environment of process pid (from /proc/<pid>/environ), as NAME=value strings. */
export function processEnv(pid: number): string[] {
  return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').filter(Boolean);
}
