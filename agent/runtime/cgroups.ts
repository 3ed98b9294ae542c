/**
 * Where a container's cgroups are, what they say about OOM kills, and removing what runc left behind.
 *
 * runc creates the cgroups itself from linux.cgroupsPath (flotilla uses "/flotilla/<id>"), in every v1
 * hierarchy and, on a hybrid host, in the unified (v2) one too, and removes them on `runc delete`.
 * This module only finds them (from /proc/self/mountinfo) and cleans up after a crash.
 */
import { readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';

export interface Hierarchy {
  /** "memory", "cpu,cpuacct", "systemd", "unified" */
  key: string;
  mountpoint: string;
  version: 1 | 2;
  controllers: string[];
}

let cached: Hierarchy[] | undefined;

/** The cgroup hierarchies mounted on this host (cached for the life of the process). */
export function hierarchies(): Hierarchy[] {
  if (cached) return cached;
  const out: Hierarchy[] = [];
  let text = '';
  try {
    text = readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return (cached = out);
  }
  for (const line of text.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    const fstype = right[0];
    const mp = (left[4] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (fstype === 'cgroup2') {
      const base = path.basename(mp);
      out.push({ key: base === 'cgroup' || mp === '/sys/fs/cgroup' ? 'unified' : base, mountpoint: mp, version: 2, controllers: [] });
    } else if (fstype === 'cgroup') {
      const opts = (right[2] ?? '').split(',');
      const controllers = opts.filter((o) => !['rw', 'ro', 'relatime', 'noatime', 'nosuid', 'nodev', 'noexec', 'clone_children', 'xattr'].includes(o) && !o.startsWith('release_agent'));
      out.push({ key: path.basename(mp), mountpoint: mp, version: 1, controllers: controllers.map((c) => c.replace(/^name=/, '')) });
    }
  }
  // a bind mount of the same hierarchy elsewhere (containers) must not count twice
  const seen = new Set<string>();
  cached = out.filter((h) => (seen.has(h.key) ? false : (seen.add(h.key), true)));
  return cached;
}

/** The directory of cgroupsPath in every hierarchy, by hierarchy key. */
export function cgroupPaths(cgroupsPath: string): Record<string, string> {
  const rel = cgroupsPath.replace(/^\/+/, '');
  const out: Record<string, string> = {};
  for (const h of hierarchies()) out[h.key] = path.join(h.mountpoint, rel);
  return out;
}

function hierarchyWith(controller: string): Hierarchy | undefined {
  return hierarchies().find((h) => h.version === 1 && h.controllers.includes(controller));
}

/** The file of a v1 controller (or the unified hierarchy when that controller is not on v1). */
export function controllerFile(cgroupsPath: string, controller: string, v1File: string, v2File: string): string | undefined {
  const rel = cgroupsPath.replace(/^\/+/, '');
  const h1 = hierarchyWith(controller);
  if (h1) return path.join(h1.mountpoint, rel, v1File);
  const h2 = hierarchies().find((h) => h.version === 2);
  return h2 ? path.join(h2.mountpoint, rel, v2File) : undefined;
}

/** The number of OOM kills in the container's memory cgroup; 0 when it cannot tell (cgroup gone). */
export async function oomKills(cgroupsPath: string): Promise<number> {
  const file = controllerFile(cgroupsPath, 'memory', 'memory.oom_control', 'memory.events');
  if (!file) return 0;
  try {
    const text = await fs.readFile(file, 'utf8');
    const m = /^oom_kill (\d+)$/m.exec(text);
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** Removes the container's cgroup directories in every hierarchy (leaf first). Idempotent. */
export async function removeCgroups(cgroupsPath: string): Promise<string[]> {
  const failed: string[] = [];
  await Promise.all(
    Object.values(cgroupPaths(cgroupsPath)).map(async (dir) => {
      for (let attempt = 0; attempt < 20; attempt++) {
        try {
          await fs.rmdir(dir);
          return;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'ENOENT') return;
          if (code !== 'EBUSY') break;
          // processes are still leaving; give them a moment
          await new Promise((r) => setTimeout(r, 25));
        }
      }
      failed.push(dir);
    }),
  );
  return failed;
}

/** Whether any of the container's cgroup directories still exists. */
export async function cgroupsExist(cgroupsPath: string): Promise<boolean> {
  for (const dir of Object.values(cgroupPaths(cgroupsPath))) {
    try {
      await fs.access(dir);
      return true;
    } catch {
      // gone
    }
  }
  return false;
}

/** Whether pid is a member of the cgroup at path (in any hierarchy), from /proc/<pid>/cgroup. */
export async function inCgroup(pid: number, cgroupPath: string): Promise<boolean> {
  try {
    const text = await fs.readFile(`/proc/${pid}/cgroup`, 'utf8');
    return text.split('\n').some((l) => l.slice(l.indexOf(':', l.indexOf(':') + 1) + 1) === cgroupPath);
  } catch {
    return false;
  }
}
