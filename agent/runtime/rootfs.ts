/**
 * Looking things up inside a container's root file system from the host, without letting the image's
 * symlinks point outside it: /etc/passwd and /etc/group for USER, and PATH for the command.
 *
 * resolveInRoot follows symlinks itself, component by component, treating the rootfs as "/"; an absolute
 * link target or a ".." that would climb above the root stays inside it (like chroot).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { FlotillaError, invalidArgument } from '../../common/errors.js';

const MAX_LINKS = 40;

/** Host path of `p` (absolute inside the container) with symlinks resolved within root. */
export async function resolveInRoot(root: string, p: string): Promise<string> {
  const pending = p.split('/').filter((c) => c !== '' && c !== '.');
  const resolved: string[] = [];
  let links = 0;
  while (pending.length > 0) {
    const c = pending.shift()!;
    if (c === '..') {
      resolved.pop();
      continue;
    }
    const host = path.join(root, ...resolved, c);
    let st;
    try {
      st = await fs.lstat(host);
    } catch {
      // a missing component: the rest cannot resolve further, keep it literal
      resolved.push(c, ...pending.filter((x) => x !== '.'));
      break;
    }
    if (st.isSymbolicLink()) {
      if (++links > MAX_LINKS) throw new FlotillaError('INVALID_ARGUMENT', `too many levels of symbolic links in ${p}`);
      const target = await fs.readlink(host);
      const parts = target.split('/').filter((x) => x !== '' && x !== '.');
      if (target.startsWith('/')) resolved.length = 0;
      pending.unshift(...parts);
      continue;
    }
    resolved.push(c);
  }
  return path.join(root, ...resolved);
}

async function readInRoot(root: string, p: string): Promise<string | undefined> {
  try {
    const host = await resolveInRoot(root, p);
    const st = await fs.stat(host);
    if (!st.isFile() || st.size > 16 * 1024 * 1024) return undefined;
    return await fs.readFile(host, 'utf8');
  } catch (err) {
    if (err instanceof FlotillaError) throw err;
    return undefined;
  }
}

export interface ResolvedUser {
  uid: number;
  gid: number;
  additionalGids: number[];
  /** the user's home directory from /etc/passwd, "/" when unknown */
  home: string;
}

function parseColonFile(text: string | undefined): string[][] {
  if (!text) return [];
  return text
    .split('\n')
    .filter((l) => l.trim() !== '' && !l.startsWith('#'))
    .map((l) => l.split(':'));
}

const isUint = (s: string): boolean => /^\d+$/.test(s) && Number(s) <= 0xffffffff;

/**
 * Resolves Docker's USER forms: "", "name", "uid", "name:group", "uid:gid", "name:gid", "uid:group".
 * Names are looked up in the rootfs's /etc/passwd and /etc/group; numeric ids need not exist there.
 */
export async function resolveUser(root: string, spec: string): Promise<ResolvedUser> {
  const s = spec.trim();
  const [userPart = '', groupPart] = s === '' ? ['root'] : s.split(':', 2);
  if (userPart === '' || (groupPart !== undefined && groupPart === '')) throw invalidArgument('user', spec, 'expected name, uid, name:group or uid:gid');
  const passwd = parseColonFile(await readInRoot(root, '/etc/passwd'));
  const groups = parseColonFile(await readInRoot(root, '/etc/group'));

  let uid: number;
  let gid = 0;
  let home = '/';
  let userName: string | undefined;
  const byName = passwd.find((f) => f[0] === userPart);
  const byUid = isUint(userPart) ? passwd.find((f) => f[2] === userPart) : undefined;
  const entry = byName ?? byUid;
  if (isUint(userPart)) {
    uid = Number(userPart);
  } else if (byName && byName[2] !== undefined && isUint(byName[2])) {
    uid = Number(byName[2]);
  } else {
    throw new FlotillaError('INVALID_ARGUMENT', `invalid user ${JSON.stringify(spec)}: no user "${userPart}" in the image's /etc/passwd`);
  }
  if (entry) {
    userName = entry[0];
    if (entry[3] !== undefined && isUint(entry[3])) gid = Number(entry[3]);
    if (entry[5]) home = entry[5];
  }
  if (groupPart !== undefined) {
    if (isUint(groupPart)) gid = Number(groupPart);
    else {
      const g = groups.find((f) => f[0] === groupPart);
      if (!g || g[2] === undefined || !isUint(g[2])) {
        throw new FlotillaError('INVALID_ARGUMENT', `invalid user ${JSON.stringify(spec)}: no group "${groupPart}" in the image's /etc/group`);
      }
      gid = Number(g[2]);
    }
  }
  const additional = new Set<number>();
  if (userName !== undefined && groupPart === undefined) {
    for (const g of groups) {
      const members = (g[3] ?? '').split(',').map((m) => m.trim());
      if (g[2] !== undefined && isUint(g[2]) && members.includes(userName) && Number(g[2]) !== gid) additional.add(Number(g[2]));
    }
  }
  return { uid, gid, additionalGids: [...additional], home };
}

async function isExecutableFile(root: string, p: string): Promise<boolean> {
  try {
    const host = await resolveInRoot(root, p);
    const st = await fs.stat(host);
    return st.isFile() && (st.mode & 0o111) !== 0;
  } catch (err) {
    if (err instanceof FlotillaError) throw err;
    return false;
  }
}

/**
 * Checks that the command exists in the rootfs the way execve in the container would find it: a name
 * with a "/" is taken relative to cwd; a bare name is searched in PATH. Throws INVALID_ARGUMENT
 * "executable file not found: X" otherwise. Returns the path inside the container.
 */
export async function findExecutable(root: string, cmd: string, envPath: string, cwd: string): Promise<string> {
  if (cmd === '') throw new FlotillaError('INVALID_ARGUMENT', 'no command: the image has no Entrypoint or Cmd and none was given');
  if (cmd.includes('/')) {
    const p = path.posix.resolve(cwd || '/', cmd);
    if (await isExecutableFile(root, p)) return p;
    throw new FlotillaError('INVALID_ARGUMENT', `executable file not found: ${cmd}`);
  }
  for (const dir of envPath.split(':')) {
    if (dir === '') continue;
    const p = path.posix.join(path.posix.resolve(cwd || '/', dir), cmd);
    if (await isExecutableFile(root, p)) return p;
  }
  throw new FlotillaError('INVALID_ARGUMENT', `executable file not found: ${cmd} (searched $PATH ${envPath})`);
}

/** Docker's --group-add: GIDs as they are, names looked up in the rootfs's /etc/group. */
export async function resolveGroups(root: string, groups: string[]): Promise<number[]> {
  if (groups.length === 0) return [];
  const table = groups.every(isUint) ? [] : parseColonFile(await readInRoot(root, '/etc/group'));
  return groups.map((g) => {
    if (isUint(g)) return Number(g);
    const row = table.find((f) => f[0] === g);
    if (!row || row[2] === undefined || !isUint(row[2])) throw new FlotillaError('INVALID_ARGUMENT', `invalid group ${JSON.stringify(g)}: no such group in the image's /etc/group`);
    return Number(row[2]);
  });
}
