import { timingSafeEqual } from 'node:crypto';
import { pooledRandomBytes } from './random.js';

const ALPHABET = '0123456789abcdefghijklmnopqrstuvwxyz';

/** A random 25-character lowercase id, like Swarm's. */
export function newId(): string {
  const bytes = pooledRandomBytes(25);
  let out = '';
  for (const b of bytes) out += ALPHABET[b % 36];
  return out;
}

export function shortId(id: string): string {
  return id.slice(0, 12);
}

const NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$/;

/** Names of containers, services and nodes: letters, digits, "_", "." and "-", at most 63. */
export function isValidName(name: string): boolean {
  return NAME_RE.test(name);
}

/** Compares a secret (a join token) in constant time. */
export function secretMatches(given: string, want: string): boolean {
  const a = Buffer.from(given);
  const b = Buffer.from(want);
  return a.length === b.length && timingSafeEqual(a, b);
}
