import { describe, expect, it } from 'vitest';
import { AddressSet, checkGateway, checkPool, checkSubnet, FIRST_VNI, nextPoolSubnet, nextVni, parseCidr, parseMtu, formatCidr } from './ipam.js';

describe('ipam (pure)', () => {
  it('parses CIDRs strictly and names the flag on bad input', () => {
    expect(parseCidr('10.0.1.0/24')).toEqual({ base: 0x0a000100, prefix: 24 });
    expect(parseCidr('10.0.1.5/24')).toBeUndefined();
    expect(parseCidr('10.0.1.256/24')).toBeUndefined();
    expect(parseCidr('010.0.1.0/24')).toBeUndefined();
    expect(() => checkSubnet('--subnet', '10.0.1.5/24')).toThrow('invalid --subnet "10.0.1.5/24": host bits set: the subnet is 10.0.1.0/24');
    expect(() => checkSubnet('--subnet', 'nope')).toThrow(/invalid --subnet "nope": not an IPv4 CIDR/);
    expect(() => checkSubnet('--subnet', '10.0.0.0/30')).toThrow(/prefix length must be between \/8 and \/29/);
    expect(() => checkGateway('--gateway', '10.0.2.1', checkSubnet('--subnet', '10.0.1.0/24'))).toThrow(/not a host address of subnet 10.0.1.0\/24/);
    expect(() => checkGateway('--gateway', '10.0.1.255', checkSubnet('--subnet', '10.0.1.0/24'))).toThrow(/not a host address/);
    expect(() => parseMtu('abc')).toThrow('invalid --opt mtu "abc": not a number');
    expect(() => parseMtu('100')).toThrow(/between 576 and 9216/);
    expect(parseMtu('1400')).toBe(1400);
    expect(() => checkPool('10.0.0.0/8', 4)).toThrow(/--default-addr-pool-mask-length/);
  });

  it('carves pool subnets in order, skipping taken and overlapping ones', () => {
    const pool = checkPool('10.0.0.0/8', 24);
    expect(formatCidr(nextPoolSubnet(pool, [])!)).toBe('10.0.0.0/24');
    const taken = [parseCidr('10.0.0.0/24')!, parseCidr('10.0.1.0/24')!, parseCidr('10.0.2.0/23')!];
    expect(formatCidr(nextPoolSubnet(pool, taken)!)).toBe('10.0.4.0/24');
    // a user's /16 inside the pool is skipped in one step
    expect(formatCidr(nextPoolSubnet(pool, [parseCidr('10.0.0.0/16')!])!)).toBe('10.1.0.0/24');
    const small = checkPool('192.168.0.0/28', 29);
    expect(formatCidr(nextPoolSubnet(small, [parseCidr('192.168.0.0/29')!])!)).toBe('192.168.0.8/29');
    expect(nextPoolSubnet(small, [parseCidr('192.168.0.0/28')!])).toBeUndefined();
  });

  it('gives the lowest free VNI from 4096', () => {
    expect(nextVni([])).toBe(FIRST_VNI);
    expect(nextVni([4096, 4097, 4099])).toBe(4098);
  });

  it('hands out each host address once, round from the last, and takes freed ones back', () => {
    const s = new AddressSet('10.0.9.0/29', '10.0.9.1');
    // 6 host addresses, the gateway holds one
    const got = [s.allocate(), s.allocate(), s.allocate(), s.allocate(), s.allocate()];
    expect(got).toEqual(['10.0.9.2/29', '10.0.9.3/29', '10.0.9.4/29', '10.0.9.5/29', '10.0.9.6/29']);
    expect(s.inUse()).toBe(6);
    expect(s.allocate()).toBeUndefined();
    s.release('10.0.9.4/29');
    expect(s.allocate()).toBe('10.0.9.4/29');
    expect(s.take('10.0.9.4')).toBe(false);
    expect(s.take('10.0.10.4')).toBe(false);
  });
});
