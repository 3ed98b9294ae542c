/**
 * Which store a manager's cluster uses, and the etcd mode's store key on disk.
 *
 * A cluster uses our Raft or an etcd cluster from its first manager on: <data>/store-kind records
 * the choice ("raft", or "etcd <prefix>") and a manager started with the other kind on that data
 * dir is refused with one line. The etcd prefix records it too (<prefix>/meta/kind).
 *
 * The store key seals every value before it reaches etcd; each manager keeps it in
 * <data>/certificates/etcd-store-key, sealed with its own data key (manager/keys), beside its
 * certificate: the only state an etcd-mode manager keeps.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FlotillaError, invalidArgument } from '../../common/errors.js';
import { writeFileAtomicSync } from '../../common/fsutil.js';
import { seal, unseal } from '../keys/keys.js';
import type { EtcdStoreOptions } from './backend.js';

export const STORE_KIND_FILE = 'store-kind';
export const STORE_KEY_FILE = path.join('certificates', 'etcd-store-key');
const STORE_KEY_AAD = Buffer.from('flotilla etcd store key v1');

/** --store etcd, as the manager takes it (files already read). */
export interface EtcdMode extends EtcdStoreOptions {
  kind: 'etcd';
}

/**
 * Refuses a data dir that belongs to a cluster of the other store kind; records the kind on first
 * use. etcdPrefix undefined = Raft.
 */
export function checkStoreKind(dataDir: string, etcdPrefix: string | undefined): void {
  const file = path.join(dataDir, STORE_KIND_FILE);
  const want = etcdPrefix === undefined ? 'raft' : `etcd ${etcdPrefix}`;
  let have: string | undefined;
  try {
    have = fs.readFileSync(file, 'utf8').trim();
  } catch {
    have = undefined;
  }
  if (have === undefined && fs.existsSync(path.join(dataDir, 'raft'))) have = 'raft';
  if (have !== undefined && have !== want) {
    const what = (k: string): string => (k === 'raft' ? "flotilla's own Raft store" : `the etcd store (prefix ${k.slice(5)})`);
    throw new FlotillaError(
      'FAILED_PRECONDITION',
      `${dataDir} belongs to a cluster that uses ${what(have)}, not ${what(want)}: a cluster keeps the store of its first manager (start with ${have === 'raft' ? 'no --store flag' : `--store etcd --etcd-prefix ${have.slice(5)}`}, or use another --data-dir)`,
    );
  }
  if (have === undefined) {
    fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    writeFileAtomicSync(file, want + '\n');
  }
}

export function loadStoreKey(dataDir: string, dek: Uint8Array): Buffer | undefined {
  const file = path.join(dataDir, STORE_KEY_FILE);
  if (!fs.existsSync(file)) return undefined;
  return unseal(dek, fs.readFileSync(file), STORE_KEY_AAD);
}

export function saveStoreKey(dataDir: string, dek: Uint8Array, key: Uint8Array): void {
  const file = path.join(dataDir, STORE_KEY_FILE);
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
  writeFileAtomicSync(file, seal(dek, key, STORE_KEY_AAD), { mode: 0o600 });
}

export interface EtcdFlags {
  store?: string;
  etcdEndpoints?: string;
  etcdPrefix?: string;
  etcdCacert?: string;
  etcdCert?: string;
  etcdKey?: string;
  etcdLeaseTtl?: string;
}

function readPem(flag: string, file: string | undefined): Buffer | undefined {
  if (file === undefined) return undefined;
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw invalidArgument(flag, file, `cannot read it: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
}

/** The manager's --store/--etcd-* flags: undefined for our Raft; one clear line for bad input. */
export function parseEtcdFlags(o: EtcdFlags): EtcdMode | undefined {
  const kind = o.store ?? 'raft';
  if (kind !== 'raft' && kind !== 'etcd') throw invalidArgument('--store', kind, 'must be raft or etcd');
  if (kind === 'raft') {
    for (const [flag, v] of [['--etcd-endpoints', o.etcdEndpoints], ['--etcd-prefix', o.etcdPrefix], ['--etcd-cacert', o.etcdCacert], ['--etcd-cert', o.etcdCert], ['--etcd-key', o.etcdKey], ['--etcd-lease-ttl', o.etcdLeaseTtl]] as const)
      if (v !== undefined) throw invalidArgument(flag, v, 'only with --store etcd');
    return undefined;
  }
  const endpoints = (o.etcdEndpoints ?? '').split(',').map((e) => e.trim()).filter(Boolean);
  if (endpoints.length === 0) throw invalidArgument('--etcd-endpoints', o.etcdEndpoints ?? '', 'required with --store etcd (e.g. https://h1:2379,https://h2:2379)');
  for (const e of endpoints) if (!/^https?:\/\/[^\s/]+:\d{1,5}$/.test(e)) throw invalidArgument('--etcd-endpoints', e, 'expected http(s)://HOST:PORT');
  const prefix = o.etcdPrefix ?? '/flotilla/default';
  if (!/^\/[A-Za-z0-9_.\-/]*[A-Za-z0-9_.-]$/.test(prefix) || prefix.includes('//')) throw invalidArgument('--etcd-prefix', prefix, 'expected an absolute key path like /flotilla/CLUSTER (letters, digits, "_", ".", "-", "/"; no trailing "/")');
  if ((o.etcdCert === undefined) !== (o.etcdKey === undefined)) throw invalidArgument(o.etcdCert === undefined ? '--etcd-cert' : '--etcd-key', '', 'give both --etcd-cert and --etcd-key');
  if (o.etcdCert !== undefined && o.etcdCacert === undefined) throw invalidArgument('--etcd-cacert', '', 'required with --etcd-cert');
  if (endpoints.some((e) => e.startsWith('https:')) && o.etcdCacert === undefined) throw invalidArgument('--etcd-cacert', '', 'required for https endpoints (the CA that signed etcd\'s certificate)');
  let leaseTtlS: number | undefined;
  if (o.etcdLeaseTtl !== undefined) {
    if (!/^\d{1,4}$/.test(o.etcdLeaseTtl) || Number(o.etcdLeaseTtl) < 2) throw invalidArgument('--etcd-lease-ttl', o.etcdLeaseTtl, 'expected whole seconds, at least 2');
    leaseTtlS = Number(o.etcdLeaseTtl);
  }
  return { kind: 'etcd', endpoints, prefix, ca: readPem('--etcd-cacert', o.etcdCacert), cert: readPem('--etcd-cert', o.etcdCert), key: readPem('--etcd-key', o.etcdKey), leaseTtlS };
}
