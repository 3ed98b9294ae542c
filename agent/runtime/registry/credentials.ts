/**
 * Registry credentials of a user, in Docker's config.json layout:
 *
 *   { "auths": { "127.0.0.1:5000": { "auth": "<base64 of user:password>" },
 *                "https://index.docker.io/v1/": { "auth": "..." } } }
 *
 * The file is $FLOTILLA_CONFIG/config.json (a directory, like $DOCKER_CONFIG), else ~/.flotilla/config.json;
 * it is written atomically with mode 0600 in a 0700 directory, and other keys in it are kept. Like
 * Docker's file (without a credential helper) the password is only base64-encoded: the file's mode is
 * its protection. Credentials are never printed or logged.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { FlotillaError, errorMessage } from '../../../common/errors.js';
import { writeFileAtomic } from '../../../common/fsutil.js';
import { DEFAULT_REGISTRY, authKey } from './reference.js';

export interface Credentials {
  username: string;
  password: string;
}

interface ConfigFile {
  auths?: Record<string, { auth?: string; username?: string; password?: string; identitytoken?: string }>;
  [k: string]: unknown;
}

/** The credentials file: $FLOTILLA_CONFIG/config.json, else ~/.flotilla/config.json. */
export function credentialsPath(): string {
  const dir = process.env.FLOTILLA_CONFIG ?? path.join(os.homedir(), '.flotilla');
  return path.join(dir, 'config.json');
}

async function readConfig(file: string): Promise<ConfigFile> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw new FlotillaError('FAILED_PRECONDITION', `cannot read ${file}: ${errorMessage(err)}`);
  }
  try {
    const v = JSON.parse(text) as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not a JSON object');
    return v as ConfigFile;
  } catch (err) {
    throw new FlotillaError('FAILED_PRECONDITION', `${file} is not valid JSON: ${errorMessage(err)}`);
  }
}

/** The keys a registry may be stored under (Docker writes some with a scheme or a trailing /v2/). */
function keysFor(registry: string): string[] {
  const k = authKey(registry);
  const out = [k, registry, `https://${registry}`, `https://${registry}/`, `https://${registry}/v2/`, `http://${registry}`, `http://${registry}/`];
  if (registry === DEFAULT_REGISTRY) out.push('index.docker.io', 'registry-1.docker.io', 'https://registry-1.docker.io');
  return [...new Set(out)];
}

/** The stored credentials for a registry ("127.0.0.1:5000", "docker.io"), or undefined. */
export async function loadCredentials(registry: string, file = credentialsPath()): Promise<Credentials | undefined> {
  const cfg = await readConfig(file);
  for (const key of keysFor(registry)) {
    const e = cfg.auths?.[key];
    if (!e) continue;
    if (typeof e.username === 'string' && typeof e.password === 'string') return { username: e.username, password: e.password };
    if (typeof e.auth === 'string' && e.auth !== '') {
      const plain = Buffer.from(e.auth, 'base64').toString('utf8');
      const colon = plain.indexOf(':');
      if (colon <= 0) throw new FlotillaError('FAILED_PRECONDITION', `${file}: the "auth" entry for ${key} is not base64 of user:password`);
      return { username: plain.slice(0, colon), password: plain.slice(colon + 1) };
    }
  }
  return undefined;
}

/** Stores credentials for a registry (replacing any), file mode 0600. */
export async function saveCredentials(registry: string, creds: Credentials, file = credentialsPath()): Promise<void> {
  if (creds.username === '' || creds.username.includes(':')) throw new FlotillaError('INVALID_ARGUMENT', 'invalid username: must be non-empty and contain no ":"');
  await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
  const cfg = await readConfig(file);
  const auths = { ...(cfg.auths ?? {}) };
  for (const k of keysFor(registry)) delete auths[k];
  auths[authKey(registry)] = { auth: Buffer.from(`${creds.username}:${creds.password}`, 'utf8').toString('base64') };
  await writeFileAtomic(file, JSON.stringify({ ...cfg, auths }, null, '\t') + '\n', { mode: 0o600 });
  await fs.chmod(file, 0o600);
}

/** Removes a registry's credentials; returns whether there were any. */
export async function removeCredentials(registry: string, file = credentialsPath()): Promise<boolean> {
  const cfg = await readConfig(file);
  if (!cfg.auths) return false;
  const auths = { ...cfg.auths };
  let found = false;
  for (const k of keysFor(registry)) {
    if (k in auths) {
      delete auths[k];
      found = true;
    }
  }
  if (!found) return false;
  await writeFileAtomic(file, JSON.stringify({ ...cfg, auths }, null, '\t') + '\n', { mode: 0o600 });
  return true;
}
