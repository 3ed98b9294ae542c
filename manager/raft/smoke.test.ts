import { describe, it, expect } from 'vitest';
import { TestNet } from './testnet.js';
describe('smoke', () => {
  it('elects and replicates', () => {
    const net = new TestNet([1, 2, 3]);
    net.campaign(1);
    expect(net.leader()).toBe(1);
    net.propose(1, 'a');
    net.propose(2, 'b');
    for (const id of [1, 2, 3]) expect(net.appliedData(id)).toEqual(['a', 'b']);
    net.tickAll(30);
    expect(net.leader()).toBe(1);
    net.isolate(1);
    net.tickAll(30);
    console.log(net.leader(), [1,2,3].map(i => net.node(i).raw.status().role));
  });
});
