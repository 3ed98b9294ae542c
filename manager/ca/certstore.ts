/**
 * Where TLS material lives on disk.
 *  - A node's own material: one file, `<data dir>/certificates/node-tls.json` (0600), written
 *    atomically, so a crash mid-renewal never leaves a certificate without its key. A node needs
 *    it before Raft (managers) or a session (workers) can start, so it is local, not in the store.
 *    On a manager the private key is sealed with the manager's data key (opts.dek, manager/keys):
 *    the file then holds `keyEnc` (base64 of nonce || AES-256-GCM ciphertext || tag) instead of
 *    `keyPem`. Workers have no data key (Swarm's workers keep theirs in clear too).
 *  - A CLI client directory (`flotilla cluster client-cert --out DIR`, `--tlsdir`): `ca.pem`,
 *    `cert.pem`, `key.pem` (0600), the names Docker's CLI uses.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { writeFileAtomic } from '../../common/fsutil.js';
import { seal, unseal } from '../keys/keys.js';
import type { TlsMaterial } from './credentials.js';

export const NODE_TLS_FILE = path.join('certificates', 'node-tls.json');
const KEY_AAD = Buffer.from('flotilla node key v1');

export interface NodeTlsOptions {
  /** a manager's data key (32 bytes): the private key is stored sealed with it */
  dek?: Uint8Array;
}

export async function saveNodeTls(dataDir: string, m: TlsMaterial, opts: NodeTlsOptions = {}): Promise<void> {
  const file = path.join(dataDir, NODE_TLS_FILE);
  await fs.promises.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
  const key = opts.dek ? { keyEnc: seal(opts.dek, Buffer.from(m.keyPem), KEY_AAD).toString('base64') } : { keyPem: m.keyPem };
  await writeFileAtomic(file, JSON.stringify({ trustPem: m.trustPem, certPem: m.certPem, ...key }), { mode: 0o600 });
}

/**
 * The node's saved material, or undefined when it has none yet (first start, or a pre-TLS data dir).
 * A sealed key needs opts.dek; a key in clear is still read with one (the next save seals it).
 */
export function loadNodeTls(dataDir: string, opts: NodeTlsOptions = {}): TlsMaterial | undefined {
  const file = path.join(dataDir, NODE_TLS_FILE);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  try {
    const j = JSON.parse(text) as Partial<TlsMaterial> & { keyEnc?: unknown };
    if (typeof j.keyEnc === 'string') {
      if (!opts.dek) throw new Error('the private key is encrypted with the manager data key, and none was given');
      try {
        j.keyPem = unseal(opts.dek, Buffer.from(j.keyEnc, 'base64'), KEY_AAD).toString('utf8');
      } catch {
        throw new Error('the private key does not decrypt with this manager\'s data key');
      }
    }
    if (typeof j.trustPem !== 'string' || typeof j.certPem !== 'string' || typeof j.keyPem !== 'string') throw new Error('missing fields');
    return { trustPem: j.trustPem, certPem: j.certPem, keyPem: j.keyPem };
  } catch (err) {
    throw new FlotillaError('FAILED_PRECONDITION', `${file}: unreadable node certificate (${errorMessage(err)}); remove it and rejoin the node`);
  }
}

export const CLIENT_FILES = { ca: 'ca.pem', cert: 'cert.pem', key: 'key.pem' } as const;

export async function writeClientTlsDir(dir: string, m: TlsMaterial): Promise<void> {
  await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
  await writeFileAtomic(path.join(dir, CLIENT_FILES.ca), m.trustPem, { mode: 0o644 });
  await writeFileAtomic(path.join(dir, CLIENT_FILES.cert), m.certPem, { mode: 0o644 });
  await writeFileAtomic(path.join(dir, CLIENT_FILES.key), m.keyPem, { mode: 0o600 });
}

/**
 * The CLI's material: from explicit files (--tlscacert/--tlscert/--tlskey) or a directory
 * (--tlsdir / FLOTILLA_TLS_DIR) holding ca.pem, cert.pem, key.pem. Errors name the flag and file.
 */
export function readClientTls(opts: { dir?: string; ca?: string; cert?: string; key?: string }): TlsMaterial {
  const pick = (flag: string, explicit: string | undefined, name: string): [string, string] => {
    if (explicit) return [flag, explicit];
    if (opts.dir) return ['--tlsdir', path.join(opts.dir, name)];
    throw new FlotillaError('INVALID_ARGUMENT', `${flag} is required (or --tlsdir DIR with ${name})`);
  };
  const read = ([flag, file]: [string, string]): string => {
    try {
      return fs.readFileSync(file, 'utf8');
    } catch (err) {
      throw new FlotillaError('INVALID_ARGUMENT', `invalid ${flag} ${JSON.stringify(file)}: ${errorMessage(err)}`);
    }
  };
  return {
    trustPem: read(pick('--tlscacert', opts.ca, CLIENT_FILES.ca)),
    certPem: read(pick('--tlscert', opts.cert, CLIENT_FILES.cert)),
    keyPem: read(pick('--tlskey', opts.key, CLIENT_FILES.key)),
  };
}
