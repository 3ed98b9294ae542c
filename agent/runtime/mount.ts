/**
 * The one place in flotilla that performs mounts. The snapshotter returns MountSpec descriptions;
 * mountAll applies them with mount(8), unmount undoes them with umount(8).
 *
 * Overlay options are limited to one page (4096 bytes) by the kernel. When the option string of an
 * overlay mount is longer than that, the lowerdir paths are made relative to their common parent
 * directory and mount(8) runs with that directory as its working directory (the kernel resolves
 * relative lowerdirs against the caller's cwd). That allows about 55 layers under a short data dir;
 * beyond that mountAll fails with RESOURCE_EXHAUSTED.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError } from '../../common/errors.js';
import { execInWorker } from './spawner.js';
import type { MountSpec } from './types.js';

const PAGE = 4096;

/** Runs mount/umount (spawned off the main thread, see spawner.ts). */
async function run(cmd: string, args: string[], cwd?: string): Promise<void> {
  const r = await execInWorker(cmd, args, { cwd, timeoutMs: 60_000 });
  if (r.error !== undefined) {
    const msg = r.stderr.trim() || r.error;
    throw new FlotillaError('INTERNAL', `${cmd} ${args.join(' ')}: ${msg}`, { cause: new Error(r.error) });
  }
}

/** Unescapes the octal escapes (\040 etc.) of /proc/self/mountinfo. */
function unescapeMountPath(p: string): string {
  return p.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Mount points currently listed in /proc/self/mountinfo. */
export async function mountPoints(): Promise<string[]> {
  const text = await fs.readFile('/proc/self/mountinfo', 'utf8');
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f[4]) out.push(unescapeMountPath(f[4]));
  }
  return out;
}

async function realTarget(target: string): Promise<string> {
  const abs = path.resolve(target);
  try {
    return await fs.realpath(abs);
  } catch {
    return abs;
  }
}

export async function isMounted(target: string): Promise<boolean> {
  const t = await realTarget(target);
  return (await mountPoints()).includes(t);
}

/**
 * Whether runc can make this overlay mount itself (as the "/" mount of the container's config): its
 * option string, with absolute paths, must fit in the kernel's one-page limit.
 */
export function overlayFitsInSpec(m: MountSpec): boolean {
  return m.type === 'overlay' && m.options.every((o) => !o.includes(',')) && m.options.join(',').length < PAGE - 1;
}

/** Returns [options, cwd] for an overlay mount, relativising lowerdirs when the option string is too long. */
export function overlayOptions(options: string[]): { data: string; cwd?: string } {
  const data = options.join(',');
  if (data.length < PAGE - 1) return { data };
  const i = options.findIndex((o) => o.startsWith('lowerdir='));
  const lower = i >= 0 ? options[i]!.slice('lowerdir='.length).split(':') : [];
  if (lower.length === 0 || !lower.every((l) => path.isAbsolute(l))) {
    throw new FlotillaError('RESOURCE_EXHAUSTED', `overlay mount options are ${data.length} bytes, over the kernel's ${PAGE}-byte limit`);
  }
  // common parent directory of all lowerdirs
  let common = path.dirname(lower[0]!);
  while (!lower.every((l) => l.startsWith(common + '/')) && common !== '/') common = path.dirname(common);
  const rel = lower.map((l) => path.relative(common, l));
  const opts = [...options];
  opts[i] = `lowerdir=${rel.join(':')}`;
  const shorter = opts.join(',');
  if (shorter.length >= PAGE - 1) {
    throw new FlotillaError(
      'RESOURCE_EXHAUSTED',
      `too many layers (${lower.length}) for one overlay mount: options are ${shorter.length} bytes even with relative paths, over the kernel's ${PAGE}-byte limit`,
    );
  }
  return { data: shorter, cwd: common };
}

function checkOptions(m: MountSpec): void {
  for (const o of m.options) {
    if (o.includes(',')) throw new FlotillaError('INVALID_ARGUMENT', `mount option ${JSON.stringify(o)} contains a comma`);
  }
}

/** Performs one mount onto target. */
export async function mountOne(m: MountSpec, target: string): Promise<void> {
  checkOptions(m);
  const isBind = m.type === 'bind' || m.options.includes('bind') || m.options.includes('rbind');
  if (isBind) {
    const opts = m.options.includes('bind') || m.options.includes('rbind') ? m.options : ['bind', ...m.options];
    await run('mount', ['-o', opts.join(','), m.source, target]);
    return;
  }
  if (m.type === 'overlay') {
    const { data, cwd } = overlayOptions(m.options);
    await run('mount', ['-t', 'overlay', '-o', data, m.source || 'overlay', target], cwd);
    return;
  }
  const args = ['-t', m.type];
  if (m.options.length > 0) args.push('-o', m.options.join(','));
  await run('mount', [...args, m.source, target]);
}

/**
 * Mounts each description onto target, in order (later mounts stack on earlier ones). If one fails the
 * ones already made are undone and the error is thrown.
 */
export async function mountAll(mounts: MountSpec[], target: string): Promise<void> {
  await fs.mkdir(target, { recursive: true });
  let done = 0;
  try {
    for (const m of mounts) {
      await mountOne(m, target);
      done++;
    }
  } catch (err) {
    for (let i = 0; i < done; i++) await umountOnce(target).catch(() => undefined);
    throw err;
  }
}

async function umountOnce(target: string): Promise<void> {
  try {
    await run('umount', [target]);
  } catch {
    await run('umount', ['-l', target]);
  }
}

/**
 * Unmounts everything mounted on target (stacked mounts included). Idempotent: a target that is not a
 * mount point (or does not exist) is fine. Falls back to a lazy unmount when the mount is busy.
 */
export async function unmount(target: string): Promise<void> {
  for (let i = 0; i < 32 && (await isMounted(target)); i++) await umountOnce(await realTarget(target));
  if (await isMounted(target)) throw new FlotillaError('INTERNAL', `could not unmount ${target}`);
}
