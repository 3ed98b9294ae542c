/**
 * The runc runtime's secret and config files (agent/runtime/files.ts), on real runc: written on a
 * tmpfs and bind-mounted read-only with their owner and mode; with a run root on a disk, the files
 * directory gets a tmpfs of its own, so nothing reaches the disk; deleted when the container stops,
 * and gone (mount included) when it is removed; bad file options refused before anything is made.
 */
import { existsSync, readFileSync, readdirSync, statfsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RuncRuntime } from '../agent/runtime/containers.js';
import { isCode } from '../common/errors.js';
import { importBusybox } from './helpers/busybox.js';
import { mountsUnder, removeRunRoots } from './helpers/runtime-debris.js';

const isRoot = process.getuid?.() === 0;
const TMPFS_MAGIC = 0x01021994;
const VALUE = `secret-${Math.random().toString(36).slice(2)}-${Date.now()}`;

/** Regular files under dir holding needle. */
function holding(dir: string, needle: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile() && readFileSync(p).includes(needle)) out.push(p);
    }
  };
  if (existsSync(dir)) walk(dir);
  return out;
}

describe.skipIf(!isRoot)('runc runtime: secret and config files (needs root, runc, conmon)', () => {
  const cases = [
    { label: 'run root on a tmpfs', diskRunRoot: false },
    { label: 'run root on a disk (a tmpfs per container)', diskRunRoot: true },
  ];
  for (const { label, diskRunRoot } of cases) {
    describe(label, () => {
      let dataDir: string;
      let rt: RuncRuntime;

      beforeAll(async () => {
        dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-files-'));
        await importBusybox(dataDir);
        const saved = process.env.FLOTILLA_RUN_ROOT;
        // a run root under the data dir: on /tmp's disk here
        if (diskRunRoot) process.env.FLOTILLA_RUN_ROOT = path.join(dataDir, 'runroot');
        try {
          rt = await RuncRuntime.open(dataDir);
        } finally {
          if (saved === undefined) delete process.env.FLOTILLA_RUN_ROOT;
          else process.env.FLOTILLA_RUN_ROOT = saved;
        }
      });

      afterAll(async () => {
        if (!rt) return;
        for (const c of await rt.list()) await rt.remove(c.id, true).catch(() => undefined);
        rt.close();
        expect(mountsUnder(dataDir)).toEqual([]);
        expect(mountsUnder(rt.runRoot)).toEqual([]);
        await fs.rm(dataDir, { recursive: true, force: true });
        removeRunRoots(dataDir);
      });

      it('mounts the files read-only with their owner and mode, on a tmpfs, and deletes them when the container stops', async () => {
        expect(statfsSync(rt.runRoot).type === TMPFS_MAGIC).toBe(!diskRunRoot);
        const info = await rt.create({
          name: 'files',
          image: 'busybox',
          command: ['sleep', '100'],
          files: [
            { target: '/run/secrets/db', data: Buffer.from(VALUE), uid: 65534, gid: 65534, mode: 0o400 },
            { target: '/etc/app/app.conf', data: Buffer.from('port=80\n'), uid: 0, gid: 0, mode: 0o644 },
          ],
        });
        await rt.start(info.id);
        expect((await rt.exec(info.id, ['cat', '/run/secrets/db'])).output).toBe(VALUE);
        expect((await rt.exec(info.id, ['stat', '-c', '%a %u %g', '/run/secrets/db', '/etc/app/app.conf'])).output.trim().split('\n')).toEqual(['400 65534 65534', '644 0 0']);
        const w = await rt.exec(info.id, ['sh', '-c', 'echo x > /etc/app/app.conf']);
        expect(w.exitCode).not.toBe(0);
        expect(w.output).toMatch(/Read-only file system/);
        // on the host: only in the container's files directory, which is a tmpfs
        const filesDir = path.join(rt.records.dir(info.id), 'files');
        expect(holding(dataDir, VALUE).filter((p) => !p.startsWith(filesDir + '/'))).toEqual([]);
        expect(holding(rt.runRoot, VALUE)).toEqual([path.join(filesDir, '0')]);
        expect(statfsSync(filesDir).type).toBe(TMPFS_MAGIC);
        expect(mountsUnder(dataDir)).toEqual(diskRunRoot ? [filesDir] : []);
        // stopped: the files go at once (the container stays)
        await rt.stop(info.id, 1000);
        expect((await rt.inspect(info.id)).status).toBe('stopped');
        expect(existsSync(filesDir)).toBe(false);
        expect(mountsUnder(dataDir)).toEqual([]);
        expect(holding(rt.runRoot, VALUE)).toEqual([]);
        await rt.remove(info.id, true);
      });

      it('removes the files (and their tmpfs) with a container removed while running', async () => {
        const info = await rt.create({ name: 'rmfiles', image: 'busybox', command: ['sleep', '100'], files: [{ target: '/run/secrets/x', data: Buffer.from(VALUE), uid: 0, gid: 0, mode: 0o444 }] });
        await rt.start(info.id);
        await rt.remove(info.id, true);
        expect(holding(rt.runRoot, VALUE)).toEqual([]);
        expect(mountsUnder(dataDir)).toEqual([]);
      });

      it('refuses bad file options before creating anything', async () => {
        for (const files of [
          [{ target: 'relative', data: Buffer.from('x'), uid: 0, gid: 0, mode: 0o444 }],
          [{ target: '/a/../b', data: Buffer.from('x'), uid: 0, gid: 0, mode: 0o444 }],
          [{ target: '/a', data: Buffer.from('x'), uid: 0, gid: 0, mode: 0o4755 }],
          [
            { target: '/a', data: Buffer.from('x'), uid: 0, gid: 0, mode: 0o444 },
            { target: '/a', data: Buffer.from('y'), uid: 0, gid: 0, mode: 0o444 },
          ],
        ]) {
          const err = await rt.create({ name: 'bad', image: 'busybox', command: ['true'], files }).catch((e: unknown) => e);
          expect(isCode(err, 'INVALID_ARGUMENT'), JSON.stringify(files.map((f) => f.target))).toBe(true);
        }
        expect(await rt.list()).toEqual([]);
      });
    });
  }
});
