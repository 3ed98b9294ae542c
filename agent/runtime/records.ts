/**
 * Container records and names, in the run root:
 *
 *   <run>/containers/<id>/state.json   the record (written atomically: temp file + rename)
 *   <run>/names/<name>                 name reservation, holding the id (created O_EXCL: unique across processes)
 *
 * Every operation reads the record from disk, so several processes (agent, CLI) can share a data dir.
 * Records carry no lock: a process serialises its own mutations of one container (RuncRuntime.locked),
 * and `ownerPid` tells the others whether a creating/removing record is still being worked on.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError, alreadyExists, notFound } from '../../common/errors.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import { isValidName } from '../../common/ids.js';
import { readExitCode } from './exit-watcher.js';

export type RecordState = 'creating' | 'created' | 'running' | 'stopped' | 'removing';

export interface ContainerRecord {
  version: 1;
  id: string;
  name: string;
  image: string;
  imageDigest: string;
  state: RecordState;
  /** pid of the process that last took the record into creating/removing */
  ownerPid: number;
  pid: number;
  conmonPid: number;
  exitCode: number | null;
  oomKilled: boolean;
  created: number;
  started: number;
  finished: number;
  cgroupsPath: string;
  labels: Record<string, string>;
  logSizeMax: number;
  args: string[];
  /** named volumes the container mounts (volume rm refuses while any record lists one) */
  volumes?: string[];
  /** anonymous volumes made for it, removed with it */
  anonVolumes?: string[];
  /** what `stop` sends first, without SIG (default TERM) */
  stopSignal?: string;
}

/** A container id as newId() makes them (what reconcile may clean up). */
export const CONTAINER_ID = /^[a-z0-9]{25}$/;

/** A record for id in `state`, owned by this process, with nothing known yet beyond `fields`. */
export function newRecord(id: string, state: RecordState, fields: Partial<ContainerRecord> = {}): ContainerRecord {
  return {
    version: 1,
    id,
    name: '',
    image: '',
    imageDigest: '',
    state,
    ownerPid: process.pid,
    pid: 0,
    conmonPid: 0,
    exitCode: null,
    oomKilled: false,
    created: 0,
    started: 0,
    finished: 0,
    cgroupsPath: `/flotilla/${id}`,
    labels: {},
    logSizeMax: 0,
    args: [],
    ...fields,
  };
}

/** Where a data dir's containers keep their records, names, bundles, exit files and logs. */
export class Records {
  readonly containersDir: string;
  readonly exitsDir: string;
  readonly namesDir: string;
  readonly logsDir: string;

  constructor(runRoot: string, dataDir: string) {
    this.containersDir = path.join(runRoot, 'containers');
    this.exitsDir = path.join(runRoot, 'exits');
    this.namesDir = path.join(runRoot, 'names');
    this.logsDir = path.join(dataDir, 'logs');
  }

  /** the container's directory: its OCI bundle and conmon's persist dir */
  dir(id: string): string {
    return path.join(this.containersDir, id);
  }
  statePath(id: string): string {
    return path.join(this.dir(id), 'state.json');
  }
  rootfs(id: string): string {
    return path.join(this.dir(id), 'rootfs');
  }
  logPath(id: string): string {
    return path.join(this.logsDir, id, 'ctr.log');
  }
  exitFile(id: string): string {
    return path.join(this.exitsDir, id);
  }

  async read(id: string): Promise<ContainerRecord | undefined> {
    try {
      return JSON.parse(await fs.readFile(this.statePath(id), 'utf8')) as ContainerRecord;
    } catch {
      return undefined;
    }
  }

  async write(rec: ContainerRecord): Promise<void> {
    await writeFileAtomic(this.statePath(rec.id), JSON.stringify(rec), { durable: false, mode: 0o644 });
  }

  /** The exit code conmon wrote for id (exits dir first, then the bundle's copy), if any. */
  async exitCodeOf(id: string): Promise<number | undefined> {
    return (await readExitCode(this.exitFile(id))) ?? (await readExitCode(path.join(this.dir(id), 'exit')));
  }

  /** Resolves a container id, name or unique id prefix to its id. */
  async resolve(idOrName: string): Promise<string> {
    const ref = idOrName.trim();
    if (ref === '' || ref.includes('/') || ref.startsWith('.')) throw notFound('container', idOrName);
    if (isValidName(ref)) {
      try {
        const id = (await fs.readFile(path.join(this.namesDir, ref), 'utf8')).trim();
        if (id && existsSync(this.statePath(id))) return id;
      } catch {
        // not a name
      }
    }
    if (existsSync(this.statePath(ref))) return ref;
    if (/^[a-z0-9]{3,}$/.test(ref)) {
      const hits = (await fs.readdir(this.containersDir)).filter((d) => d.startsWith(ref));
      if (hits.length === 1 && existsSync(this.statePath(hits[0]!))) return hits[0]!;
      if (hits.length > 1) throw new FlotillaError('INVALID_ARGUMENT', `container id prefix ${JSON.stringify(ref)} is ambiguous: it matches ${hits.length} containers`);
    }
    throw notFound('container', idOrName);
  }

  /** Reserves name for id; ALREADY_EXISTS when another container (of any process) has it. */
  async reserveName(name: string, id: string): Promise<void> {
    try {
      await fs.writeFile(path.join(this.namesDir, name), id, { flag: 'wx' });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw alreadyExists('container', name);
      throw err;
    }
  }

  /** Releases name if id still holds it. */
  async releaseName(name: string, id: string): Promise<void> {
    const file = path.join(this.namesDir, name);
    const owner = await fs.readFile(file, 'utf8').catch(() => '');
    if (owner.trim() === id) await fs.rm(file, { force: true });
  }

  /** Removes name reservations whose container directory is gone. */
  async dropStaleNames(): Promise<void> {
    for (const name of await fs.readdir(this.namesDir)) {
      const file = path.join(this.namesDir, name);
      const owner = (await fs.readFile(file, 'utf8').catch(() => '')).trim();
      if (owner && !existsSync(this.dir(owner))) await fs.rm(file, { force: true });
    }
  }
}
