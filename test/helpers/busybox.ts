/**
 * Builds a small test image from the host's static busybox (Debian's busybox-static, /bin/busybox), so
 * tests across the project can create an image without a registry or the CLI:
 *
 *   const img = await importBusybox(dataDir);           // 'busybox:latest', Cmd ["sh"]
 *   await buildBusyboxRootfs(dir);                       // just the directory
 *
 * deploy/images/busybox.sh builds the same root file system from the shell.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ImageStore } from '../../agent/runtime/images.js';
import type { ImageRecord } from '../../agent/runtime/types.js';

const execFileP = promisify(execFile);

export const BUSYBOX = process.env.FLOTILLA_BUSYBOX ?? '/bin/busybox';

const PASSWD = 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n';
const GROUP = 'root:x:0:\nnogroup:x:65534:\n';

/** Creates a busybox root file system in dir (which may exist): /bin/busybox plus one symlink per applet. */
export async function buildBusyboxRootfs(dir: string): Promise<void> {
  const root = path.resolve(dir);
  await fs.mkdir(root, { recursive: true });
  await fs.chmod(root, 0o755);
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'root', 'proc', 'sys', 'dev', 'run', 'var', 'home']) {
    await fs.mkdir(path.join(root, d), { recursive: true, mode: 0o755 });
  }
  await fs.chmod(path.join(root, 'root'), 0o700);
  await fs.mkdir(path.join(root, 'tmp'), { recursive: true });
  await fs.chmod(path.join(root, 'tmp'), 0o1777);
  await fs.copyFile(BUSYBOX, path.join(root, 'bin', 'busybox'));
  await fs.chmod(path.join(root, 'bin', 'busybox'), 0o755);
  const { stdout } = await execFileP(BUSYBOX, ['--list']);
  for (const applet of stdout.split('\n').map((s) => s.trim())) {
    if (!applet || applet === 'busybox' || applet.includes('/')) continue;
    await fs.rm(path.join(root, 'bin', applet), { force: true });
    await fs.symlink('busybox', path.join(root, 'bin', applet));
  }
  await fs.rm(path.join(root, 'usr/bin/env'), { force: true });
  await fs.symlink('/bin/busybox', path.join(root, 'usr/bin/env'));
  await fs.writeFile(path.join(root, 'etc/passwd'), PASSWD, { mode: 0o644 });
  await fs.writeFile(path.join(root, 'etc/group'), GROUP, { mode: 0o644 });
  for (const f of ['etc/hosts', 'etc/hostname', 'etc/resolv.conf']) await fs.writeFile(path.join(root, f), '', { mode: 0o644 });
}

/** Builds the busybox root file system in a temp dir and imports it into the node's image store. */
export async function importBusybox(dataDir: string, name = 'busybox:latest'): Promise<ImageRecord> {
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-busybox-'));
  try {
    await buildBusyboxRootfs(tmp);
    const store = await ImageStore.open(dataDir);
    // as deploy/images/busybox.sh: the same image (digest) on every node that imports it
    const sourceDateEpoch = Math.floor((await fs.stat('/bin/busybox')).mtimeMs / 1000);
    return await store.import(name, tmp, { config: { cmd: ['sh'] }, sourceDateEpoch });
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
}
