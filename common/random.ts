import { randomFillSync } from 'node:crypto';

/**
 * Random bytes from the system CSPRNG, drawn from a pool refilled 4 KiB at a time: one call into
 * OpenSSL per pool instead of one per id or nonce (randomBytes(12) costs about as much as
 * randomBytes(4096)). Every byte is handed out once; a slice stays valid after the pool is refilled
 * (a refill makes a new buffer). For ids and nonces, not for long-lived keys (use randomBytes).
 */
const POOL_BYTES = 4096;
let pool = Buffer.alloc(0);
let offset = 0;

export function pooledRandomBytes(n: number): Buffer {
  if (n > POOL_BYTES) return randomFillSync(Buffer.allocUnsafe(n));
  if (offset + n > pool.length) {
    pool = randomFillSync(Buffer.allocUnsafe(POOL_BYTES));
    offset = 0;
  }
  const out = pool.subarray(offset, offset + n);
  offset += n;
  return out;
}
