import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FlotillaError } from '../../common/errors.js';
import { DataKeys, LockedKeys, kekFromUnlockKey, newUnlockKey, openKeys, seal, unseal } from './keys.js';
import { loadNodeTls, saveNodeTls } from '../ca/certstore.js';

const dirs: string[] = [];
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-keys-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return err instanceof FlotillaError ? `${err.code}: ${err.message}` : `other: ${String(err)}`;
  }
  return 'no error';
}

describe('data keys', () => {
  it('seal/unseal: a random nonce per call, a flipped bit or a wrong key or AAD is detected', () => {
    const k = randomBytes(32);
    const a = seal(k, Buffer.from('hello'), Buffer.of(1));
    const b = seal(k, Buffer.from('hello'), Buffer.of(1));
    expect(a.equals(b)).toBe(false);
    expect(unseal(k, a, Buffer.of(1)).toString()).toBe('hello');
    const bad = Buffer.from(a);
    bad[13]! ^= 1;
    expect(() => unseal(k, bad, Buffer.of(1))).toThrow();
    expect(() => unseal(randomBytes(32), a, Buffer.of(1))).toThrow();
    expect(() => unseal(k, a, Buffer.of(2))).toThrow();
  });

  it('first start makes a DEK under a stored KEK; autolock seals it under the unlock key only', () => {
    const dir = tmp();
    const k1 = openKeys(dir);
    expect(k1).toBeInstanceOf(DataKeys);
    const dek = (k1 as DataKeys).dek;
    expect(dek.length).toBe(32);
    const file = path.join(dir, 'keys.json');
    expect(fs.statSync(file).mode & 0o777).toBe(0o600);
    expect(JSON.parse(fs.readFileSync(file, 'utf8')).kek).toBeTypeOf('string');
    expect(fs.readFileSync(file).includes(dek.toString('base64'))).toBe(false);
    expect((openKeys(dir) as DataKeys).dek.equals(dek)).toBe(true);

    // autolock on
    const key = newUnlockKey();
    expect(key).toMatch(/^FLTKEY-1-[A-Za-z0-9_-]{43}$/);
    expect((k1 as DataKeys).follow(key)).toBe(true);
    expect((k1 as DataKeys).follow(key)).toBe(false);
    const text = fs.readFileSync(file, 'utf8');
    expect(JSON.parse(text).kek).toBeUndefined();
    expect(text.includes(key)).toBe(false);
    const locked = openKeys(dir);
    expect(locked).toBeInstanceOf(LockedKeys);
    expect(codeOf(() => (locked as LockedKeys).unlock(newUnlockKey()))).toMatch(/^PERMISSION_DENIED: wrong unlock key/);
    expect(codeOf(() => (locked as LockedKeys).unlock('FLTKEY-1-short'))).toMatch(/^INVALID_ARGUMENT: invalid unlock key/);
    const un = (locked as LockedKeys).unlock(`${key}\n`);
    expect(un.dek.equals(dek)).toBe(true);

    // rotation: the old key no longer opens it
    const key2 = newUnlockKey();
    un.follow(key2);
    const locked2 = openKeys(dir) as LockedKeys;
    expect(codeOf(() => locked2.unlock(key))).toMatch(/^PERMISSION_DENIED/);
    expect(locked2.unlock(key2).dek.equals(dek)).toBe(true);

    // autolock off again: a stored KEK
    un.follow('');
    expect((openKeys(dir) as DataKeys).dek.equals(dek)).toBe(true);
  });

  it('the KEK of an unlock key is derived, not the key bytes themselves', () => {
    const key = newUnlockKey();
    const raw = Buffer.from(key.slice('FLTKEY-1-'.length), 'base64url');
    const kek = kekFromUnlockKey(key);
    expect(kek.length).toBe(32);
    expect(kek.equals(raw)).toBe(false);
    expect(kekFromUnlockKey(` ${key} `).equals(kek)).toBe(true);
  });

  it('a raft log without keys.json (from before encryption at rest) is refused with one line', () => {
    const dir = tmp();
    fs.mkdirSync(path.join(dir, 'raft', 'wal'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'raft', 'wal', '0000000000000001-0000000000000001.wal'), 'x');
    expect(codeOf(() => openKeys(dir))).toMatch(/^FAILED_PRECONDITION: .*raft holds a raft log but .*keys.json is missing .*refusing to start/);
    expect(fs.existsSync(path.join(dir, 'keys.json'))).toBe(false);
  });

  it('an altered keys.json is refused', () => {
    const dir = tmp();
    openKeys(dir);
    const file = path.join(dir, 'keys.json');
    const j = JSON.parse(fs.readFileSync(file, 'utf8')) as { kek: string };
    j.kek = randomBytes(32).toString('base64');
    fs.writeFileSync(file, JSON.stringify(j));
    expect(codeOf(() => openKeys(dir))).toMatch(/^FAILED_PRECONDITION: .*does not decrypt/);
  });

  it('node-tls.json keeps the private key sealed with the data key', async () => {
    const dir = tmp();
    const dek = randomBytes(32);
    const m = { trustPem: 'TRUST', certPem: 'CERT', keyPem: '-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n' };
    await saveNodeTls(dir, m, { dek });
    const file = path.join(dir, 'certificates', 'node-tls.json');
    expect(fs.readFileSync(file).includes('PRIVATE KEY')).toBe(false);
    expect(loadNodeTls(dir, { dek })).toEqual(m);
    expect(codeOf(() => loadNodeTls(dir))).toMatch(/^FAILED_PRECONDITION: .*encrypted with the manager data key/);
    expect(codeOf(() => loadNodeTls(dir, { dek: randomBytes(32) }))).toMatch(/^FAILED_PRECONDITION: .*does not decrypt/);
    // without a data key (a worker) it is stored as before
    await saveNodeTls(dir, m);
    expect(loadNodeTls(dir)).toEqual(m);
  });
});
