import { describe, expect, it } from 'vitest';
import { pooledRandomBytes } from './random.js';

describe('pooledRandomBytes', () => {
  it('hands out every byte once: no two nonces alike across pool refills, and a slice survives a refill', () => {
    const first = pooledRandomBytes(12);
    const copy = Buffer.from(first);
    const seen = new Set<string>([copy.toString('hex')]);
    // 2,000 nonces of 12 bytes span six 4 KiB pools
    for (let i = 0; i < 2000; i++) {
      const n = pooledRandomBytes(12);
      expect(n.length).toBe(12);
      seen.add(n.toString('hex'));
    }
    expect(seen.size).toBe(2001);
    expect(first.equals(copy)).toBe(true);
    expect(pooledRandomBytes(10_000).length).toBe(10_000);
  });
});
