/**
 * Encryption at rest (docs/security.md): each manager has its own data-encryption key (DEK, 32
 * random bytes) that encrypts its Raft WAL records, its snapshots and the private key in
 * certificates/node-tls.json. The DEK is kept in <data>/keys.json, itself encrypted (AES-256-GCM)
 * under a key-encryption key (KEK):
 *
 *  - without autolock the KEK is stored in keys.json beside the sealed DEK: this protects a copy of
 *    the raft/ directory or a backup of it taken without keys.json, not a copy of the whole data dir;
 *  - with autolock the KEK is derived (HKDF-SHA256) from the cluster's unlock key (FLTKEY-1-...),
 *    which lives only in the Cluster object of the (encrypted) store; it is never written to disk,
 *    so a restarted manager cannot read its own state until `flotilla cluster unlock` gives it
 *    the key.
 *
 * Toggling autolock or rotating the unlock key re-encrypts the DEK under the new KEK (rewrap); the
 * DEK itself never changes, so the WAL and snapshots stay readable.
 *
 * keys.json: {"version":1,"dek":"<base64 sealed DEK>","kek":"<base64 KEK>"} ("kek" absent when
 * autolocked). Sealed = 12-byte nonce || ciphertext || 16-byte GCM tag.
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { writeFileAtomicSync } from '../../common/fsutil.js';
import { pooledRandomBytes } from '../../common/random.js';

export const KEYS_FILE = 'keys.json';
export const UNLOCK_KEY_PREFIX = 'FLTKEY-1-';
const NONCE = 12;
const TAG = 16;
/** the bytes seal() adds to a plaintext */
export const SEAL_OVERHEAD = NONCE + TAG;

/** AES-256-GCM with a random 96-bit nonce: nonce || ciphertext || tag. */
export function seal(key: Uint8Array, plain: Uint8Array, aad?: Uint8Array): Buffer {
  const nonce = pooledRandomBytes(NONCE);
  const c = createCipheriv('aes-256-gcm', key, nonce);
  if (aad) c.setAAD(aad);
  const out = Buffer.allocUnsafe(NONCE + plain.length + TAG);
  nonce.copy(out, 0);
  const n = c.update(plain).copy(out, NONCE);
  c.final();
  c.getAuthTag().copy(out, NONCE + n);
  return out;
}

/** Decrypts what seal() made; throws (a plain Error) when the key is wrong or the data was altered. */
export function unseal(key: Uint8Array, sealed: Uint8Array, aad?: Uint8Array): Buffer {
  if (sealed.length < NONCE + TAG) throw new Error('sealed data too short');
  const buf = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.length);
  const d = createDecipheriv('aes-256-gcm', key, buf.subarray(0, NONCE));
  d.setAuthTag(buf.subarray(buf.length - TAG));
  if (aad) d.setAAD(aad);
  const out = d.update(buf.subarray(NONCE, buf.length - TAG));
  d.final(); // throws "Unsupported state or unable to authenticate data"
  return out;
}

/** A new cluster unlock key: FLTKEY-1- and 32 random bytes in base64url. */
export function newUnlockKey(): string {
  return UNLOCK_KEY_PREFIX + randomBytes(32).toString('base64url');
}

/** The KEK of an unlock key; INVALID_ARGUMENT when it is not one (the message never echoes it). */
export function kekFromUnlockKey(key: string): Buffer {
  const k = key.trim();
  const raw = k.startsWith(UNLOCK_KEY_PREFIX) ? Buffer.from(k.slice(UNLOCK_KEY_PREFIX.length), 'base64url') : Buffer.alloc(0);
  if (raw.length !== 32 || raw.toString('base64url') !== k.slice(UNLOCK_KEY_PREFIX.length)) {
    throw new FlotillaError('INVALID_ARGUMENT', `invalid unlock key: expected ${UNLOCK_KEY_PREFIX} followed by 43 base64url characters`);
  }
  return Buffer.from(hkdfSync('sha256', raw, Buffer.from('flotilla'), Buffer.from('flotilla manager kek v1'), 32));
}

interface KeysFile {
  version: 1;
  dek: string;
  kek?: string;
}

const DEK_AAD = Buffer.from('flotilla dek v1');

/** The unlocked keys of a manager. */
export class DataKeys {
  /** the unlock key the DEK is wrapped under now ('' when autolock is off) */
  private wrappedUnderKey: string;

  constructor(
    readonly file: string,
    /** the data-encryption key (32 bytes) */
    readonly dek: Buffer,
    unlockKey: string,
  ) {
    this.wrappedUnderKey = unlockKey;
  }

  /** True when the DEK is sealed under this unlock key ('' : under a stored KEK). */
  wrappedUnder(unlockKey: string): boolean {
    return this.wrappedUnderKey === unlockKey;
  }

  get autolocked(): boolean {
    return this.wrappedUnderKey !== '';
  }

  /**
   * Make keys.json match the cluster's autolock setting: unlockKey '' (autolock off) stores a new
   * random KEK beside the sealed DEK; otherwise the DEK is sealed under the unlock key's KEK and no
   * KEK is stored. Returns true when the file was rewritten.
   */
  follow(unlockKey: string): boolean {
    if (unlockKey === this.wrappedUnderKey) return false;
    writeKeys(this.file, this.dek, unlockKey);
    this.wrappedUnderKey = unlockKey;
    return true;
  }
}

function writeKeys(file: string, dek: Buffer, unlockKey: string): void {
  const kek = unlockKey ? kekFromUnlockKey(unlockKey) : randomBytes(32);
  const f: KeysFile = { version: 1, dek: seal(kek, dek, DEK_AAD).toString('base64') };
  if (!unlockKey) f.kek = kek.toString('base64');
  writeFileAtomicSync(file, JSON.stringify(f) + '\n', { mode: 0o600 });
}

/** A manager whose DEK is sealed under the unlock key: unlock() with the right key gives its keys. */
export class LockedKeys {
  constructor(
    readonly file: string,
    private readonly sealedDek: Buffer,
  ) {}

  /** The keys, or FAILED_PRECONDITION "wrong unlock key" (INVALID_ARGUMENT for a malformed one). */
  unlock(unlockKey: string): DataKeys {
    const kek = kekFromUnlockKey(unlockKey);
    let dek: Buffer;
    try {
      dek = unseal(kek, this.sealedDek, DEK_AAD);
    } catch {
      throw new FlotillaError('PERMISSION_DENIED', 'wrong unlock key: this manager stays locked');
    }
    return new DataKeys(this.file, dek, unlockKey.trim());
  }
}

export interface OpenKeysOptions {
  /** the raft directory: a data dir that holds a raft log but no keys.json is refused */
  raftDir?: string;
}

/**
 * The keys of the manager whose data dir is dataDir: created on first start (a new DEK, autolock
 * off), unsealed with the stored KEK, or LockedKeys when keys.json holds no KEK (autolock).
 */
export function openKeys(dataDir: string, opts: OpenKeysOptions = {}): DataKeys | LockedKeys {
  const file = path.join(dataDir, KEYS_FILE);
  let text: string | undefined;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  if (text === undefined) {
    const raftDir = opts.raftDir ?? path.join(dataDir, 'raft');
    if (hasRaftLog(raftDir)) {
      throw new FlotillaError(
        'FAILED_PRECONDITION',
        `${raftDir} holds a raft log but ${file} is missing (an unencrypted log from before encryption at rest, or a lost key file): ` +
          'refusing to start; move that directory aside and join this manager to the cluster again',
      );
    }
    fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    const dek = randomBytes(32);
    writeKeys(file, dek, '');
    return new DataKeys(file, dek, '');
  }
  let f: KeysFile;
  try {
    f = JSON.parse(text) as KeysFile;
    if (f.version !== 1 || typeof f.dek !== 'string' || (f.kek !== undefined && typeof f.kek !== 'string')) throw new Error('unknown format');
  } catch (err) {
    throw new FlotillaError('FAILED_PRECONDITION', `${file}: unreadable key file (${errorMessage(err)}); refusing to start`);
  }
  const sealedDek = Buffer.from(f.dek, 'base64');
  if (f.kek === undefined) return new LockedKeys(file, sealedDek);
  try {
    return new DataKeys(file, unseal(Buffer.from(f.kek, 'base64'), sealedDek, DEK_AAD), '');
  } catch {
    throw new FlotillaError('FAILED_PRECONDITION', `${file}: the data key does not decrypt with the stored key (the file was altered); refusing to start`);
  }
}

function hasRaftLog(raftDir: string): boolean {
  for (const sub of ['wal', 'snap']) {
    try {
      if (fs.readdirSync(path.join(raftDir, sub)).some((n) => n.endsWith('.wal') || n.endsWith('.snap'))) return true;
    } catch {}
  }
  return false;
}
