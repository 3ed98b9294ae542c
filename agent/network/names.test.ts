import { describe, expect, it } from 'vitest';
import { bridgeMac, bridgeName, hostOfAddr, macOf, overlayMtu, parseCidr, vniOf, vxlanName } from './names.js';

describe('data plane names', () => {
  it('derives the task MAC from its IPv4 address (02:42 + the four bytes)', () => {
    expect(macOf('10.0.1.5')).toBe('02:42:0a:00:01:05');
    expect(macOf('10.255.0.200/16')).toBe('02:42:0a:ff:00:c8');
  });
  it('gives bridges a fixed, locally administered MAC that never looks like a task MAC', () => {
    expect(bridgeMac('198.18.7.11', 4097)).toBe('0a:01:c6:12:07:0b');
    expect(bridgeMac('198.18.7.11', 4097).startsWith('02:42')).toBe(false);
  });
  it('names devices from the VXLAN id within IFNAMSIZ and reads them back', () => {
    expect(bridgeName(16777215)).toBe('fl-br-16777215');
    expect(bridgeName(16777215).length).toBeLessThanOrEqual(15);
    expect(vniOf(vxlanName(4101))).toEqual({ kind: 'vx', vni: 4101 });
    expect(vniOf('eth0')).toBeUndefined();
  });
  it('uses the network MTU when set, else the underlay MTU minus the VXLAN overhead', () => {
    expect(overlayMtu(0, 1500)).toBe(1450);
    expect(overlayMtu(undefined, 9000)).toBe(8950);
    expect(overlayMtu(1400, 1500)).toBe(1400);
  });
  it('parses CIDRs and refuses bad ones with the field named', () => {
    expect(parseCidr('10.0.1.5/24')).toEqual({ ip: '10.0.1.5', prefix: 24, bytes: [10, 0, 1, 5] });
    expect(() => parseCidr('10.0.1.256/24', 'task address')).toThrow('invalid task address "10.0.1.256/24"');
    expect(() => parseCidr('10.0.1.5')).toThrow(/prefix length/);
    expect(hostOfAddr('198.18.0.11:4242')).toBe('198.18.0.11');
    expect(hostOfAddr('198.18.0.11')).toBe('198.18.0.11');
  });
});
