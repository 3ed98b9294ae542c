import { describe, expect, it } from 'vitest';
import { checkOperations, kvModel, type KvInput, type KvOutput, type Model, type Operation } from '../../testing/raft/linearizability.js';

type Op = Operation<KvInput, KvOutput>;
const put = (c: number, key: string, value: string, call: number, ret: number): Op => ({ clientId: c, input: { op: 'put', key, value }, output: {}, call, ret });
const get = (c: number, key: string, value: string | null, call: number, ret: number): Op => ({ clientId: c, input: { op: 'get', key }, output: { value }, call, ret });
const cas = (c: number, key: string, expected: string | null, value: string, ok: boolean | undefined, call: number, ret: number): Op => ({
  clientId: c,
  input: { op: 'cas', key, expected, value },
  output: ok === undefined ? { unknown: true } : { ok },
  call,
  ret,
});
const check = (ops: Op[]) => checkOperations(kvModel, ops).result;

describe('linearizability checker (KV register model)', () => {
  it('accepts an empty history and a sequential one', () => {
    expect(check([])).toBe('ok');
    expect(check([put(1, 'x', 'a', 1, 2), get(1, 'x', 'a', 3, 4), get(2, 'x', 'a', 5, 6)])).toBe('ok');
  });

  it('rejects a stale read after a completed write', () => {
    expect(check([put(1, 'x', 'a', 1, 2), get(2, 'x', null, 3, 4)])).toBe('illegal');
  });

  it('accepts either value for a read concurrent with a write', () => {
    expect(check([put(1, 'x', 'a', 1, 4), get(2, 'x', null, 2, 3)])).toBe('ok');
    expect(check([put(1, 'x', 'a', 1, 4), get(2, 'x', 'a', 2, 3)])).toBe('ok');
  });

  it('rejects a read that sees a value before it was written', () => {
    expect(check([get(2, 'x', 'a', 1, 2), put(1, 'x', 'a', 3, 4)])).toBe('illegal');
  });

  it('rejects reads that go back in time (new value, then old value)', () => {
    // put a overlaps both reads; the first read sees a, the later one (after it) sees null
    expect(check([put(1, 'x', 'a', 1, 10), get(2, 'x', 'a', 2, 3), get(3, 'x', null, 4, 5)])).toBe('illegal');
    expect(check([put(1, 'x', 'a', 1, 10), get(2, 'x', null, 2, 3), get(3, 'x', 'a', 4, 5)])).toBe('ok');
  });

  it('orders concurrent writes consistently', () => {
    // two concurrent puts; two later sequential reads must agree on the winner
    const base = [put(1, 'x', 'a', 1, 5), put(2, 'x', 'b', 2, 6)];
    expect(check([...base, get(3, 'x', 'a', 7, 8), get(3, 'x', 'a', 9, 10)])).toBe('ok');
    expect(check([...base, get(3, 'x', 'b', 7, 8), get(3, 'x', 'a', 9, 10)])).toBe('illegal');
  });

  it('checks compare-and-set outcomes', () => {
    expect(check([put(1, 'x', 'a', 1, 2), cas(2, 'x', 'a', 'b', true, 3, 4), get(1, 'x', 'b', 5, 6)])).toBe('ok');
    expect(check([put(1, 'x', 'a', 1, 2), cas(2, 'x', 'a', 'b', false, 3, 4)])).toBe('illegal');
    // two concurrent CAS from the same expected value cannot both succeed
    expect(check([put(1, 'x', 'a', 1, 2), cas(2, 'x', 'a', 'b', true, 3, 6), cas(3, 'x', 'a', 'c', true, 4, 5)])).toBe('illegal');
  });

  it('treats an operation without a response as possibly applied at any later point, or never', () => {
    const lost = put(1, 'x', 'a', 1, Infinity);
    expect(check([lost, get(2, 'x', null, 2, 3), get(2, 'x', 'a', 4, 5)])).toBe('ok');
    expect(check([lost, get(2, 'x', null, 2, 3), get(2, 'x', null, 4, 5)])).toBe('ok');
    expect(check([lost, get(2, 'x', 'a', 2, 3), get(2, 'x', null, 4, 5)])).toBe('illegal');
    expect(check([cas(1, 'x', null, 'a', undefined, 1, Infinity), get(2, 'x', 'a', 2, 3)])).toBe('ok');
  });

  it('partitions by key: a violation on one key is found among many ok keys', () => {
    const ops: Op[] = [];
    let t = 0;
    for (let k = 0; k < 20; k++) {
      ops.push(put(1, `k${k}`, 'v', ++t, ++t));
      ops.push(get(2, `k${k}`, 'v', ++t, ++t));
    }
    expect(check(ops)).toBe('ok');
    ops.push(get(3, 'k7', null, ++t, ++t));
    const r = checkOperations(kvModel, ops);
    expect(r.result).toBe('illegal');
    expect(r.failedOps?.every((o) => (o.input as KvInput).key === 'k7')).toBe(true);
  });

  it('handles long histories with heavy concurrency quickly (memoization)', () => {
    // 8 clients each doing 40 overlapping puts/gets on one key, generated from a sequential execution
    let value: string | null = null;
    let t = 0;
    const open: { op: Op; done: number }[] = [];
    for (let i = 0; i < 320; i++) {
      const c = i % 8;
      const call = ++t;
      let op: Op;
      if (i % 3 === 0) op = get(c, 'x', value, call, 0);
      else {
        value = `v${i}`;
        op = put(c, 'x', value, call, 0);
      }
      open.push({ op, done: i + 4 }); // returns after ~4 later calls: heavy overlap
      for (const o of open.filter((x) => x.done === i)) o.op.ret = ++t;
    }
    for (const o of open) if (o.op.ret === 0) o.op.ret = ++t;
    const t0 = Date.now();
    expect(check(open.map((o) => o.op))).toBe('ok');
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('works with another model (a counter) and rejects malformed histories', () => {
    const counter: Model<number, { add: number } | { read: true }, number | null> = {
      init: () => 0,
      step: (s, i, o) => ('add' in i ? { ok: true, state: s + i.add } : { ok: o === s, state: s }),
      hash: (s) => String(s),
    };
    const h = [
      { clientId: 1, input: { add: 1 }, output: null, call: 1, ret: 4 },
      { clientId: 2, input: { add: 2 }, output: null, call: 2, ret: 5 },
      { clientId: 3, input: { read: true as const }, output: 2, call: 3, ret: 6 },
    ];
    expect(checkOperations(counter, h).result).toBe('ok');
    expect(checkOperations(counter, [...h, { clientId: 3, input: { read: true as const }, output: 1, call: 7, ret: 8 }]).result).toBe('illegal');
    expect(() => checkOperations(counter, [{ clientId: 1, input: { add: 1 }, output: null, call: 5, ret: 5 }])).toThrow(/before its call/);
  });
});
