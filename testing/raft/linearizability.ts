/**
 * A linearizability checker: Wing & Gong's search with the pruning of Lowe / Porcupine (memoize
 * (linearized-set, model state) pairs already explored) and P-compositionality (check each
 * partition, e.g. each key of a KV store, independently).
 *
 * An operation whose response was never observed has `ret = Infinity`; its output must then be
 * accepted by the model as "unknown" (it may have taken effect at any point after its call, or never).
 */

export interface Operation<I, O> {
  clientId: number;
  input: I;
  output: O;
  /** invocation time; all call/ret times must be distinct */
  call: number;
  /** response time, Infinity when unknown */
  ret: number;
}

export interface Model<S, I, O> {
  init(): S;
  /** is (input -> output) legal in state? and the next state */
  step(state: S, input: I, output: O): { ok: boolean; state: S };
  /** a string equal for equal states */
  hash(state: S): string;
  /** split a history into independent sub-histories (default: one) */
  partition?(ops: Operation<I, O>[]): Operation<I, O>[][];
}

export type CheckResult = 'ok' | 'illegal' | 'unknown';

export interface CheckReport {
  result: CheckResult;
  /** index (in partition order) of the first partition that is not linearizable */
  failedPartition?: number;
  /** that partition's operations, for a failure message */
  failedOps?: Operation<unknown, unknown>[];
}

interface Ev<I, O> {
  id: number;
  isCall: boolean;
  input: I;
  output: O;
  time: number;
  match: Ev<I, O> | null; // call -> its return
  prev: Ev<I, O> | null;
  next: Ev<I, O> | null;
}

function buildList<I, O>(ops: Operation<I, O>[]): Ev<I, O> {
  const evs: Ev<I, O>[] = [];
  ops.forEach((op, id) => {
    const call: Ev<I, O> = { id, isCall: true, input: op.input, output: op.output, time: op.call, match: null, prev: null, next: null };
    const ret: Ev<I, O> = { id, isCall: false, input: op.input, output: op.output, time: op.ret, match: null, prev: null, next: null };
    call.match = ret;
    evs.push(call, ret);
  });
  // by time; at equal times (only Infinity returns) calls first, then by id for determinism
  evs.sort((a, b) => (a.time !== b.time ? a.time - b.time : a.isCall !== b.isCall ? (a.isCall ? -1 : 1) : a.id - b.id));
  const head: Ev<I, O> = { id: -1, isCall: false, input: undefined as I, output: undefined as O, time: -Infinity, match: null, prev: null, next: null };
  let prev = head;
  for (const e of evs) {
    prev.next = e;
    e.prev = prev;
    prev = e;
  }
  return head;
}

function lift<I, O>(e: Ev<I, O>): void {
  e.prev!.next = e.next;
  if (e.next) e.next.prev = e.prev;
  const m = e.match!;
  m.prev!.next = m.next;
  if (m.next) m.next.prev = m.prev;
}

function unlift<I, O>(e: Ev<I, O>): void {
  const m = e.match!;
  m.prev!.next = m;
  if (m.next) m.next.prev = m;
  e.prev!.next = e;
  if (e.next) e.next.prev = e;
}

class Bits {
  readonly w: Uint32Array;
  constructor(n: number) {
    this.w = new Uint32Array(Math.ceil(n / 32) || 1);
  }
  set(i: number): void {
    this.w[i >>> 5]! |= 1 << (i & 31);
  }
  clear(i: number): void {
    this.w[i >>> 5]! &= ~(1 << (i & 31));
  }
  keyWith(i: number): string {
    const word = i >>> 5;
    let s = '';
    for (let k = 0; k < this.w.length; k++) {
      let v = this.w[k]!;
      if (k === word) v |= 1 << (i & 31);
      s += (v >>> 0).toString(36) + ',';
    }
    return s;
  }
}

/** Check one partition. maxSteps bounds the search (result 'unknown' when exceeded). */
export function checkPartition<S, I, O>(model: Model<S, I, O>, ops: Operation<I, O>[], maxSteps = 5_000_000): CheckResult {
  if (ops.length === 0) return 'ok';
  const head = buildList(ops);
  const linearized = new Bits(ops.length);
  const cache = new Set<string>();
  const calls: { e: Ev<I, O>; state: S }[] = [];
  let state = model.init();
  let entry: Ev<I, O> | null = head.next;
  let steps = 0;
  while (head.next !== null) {
    if (++steps > maxSteps) return 'unknown';
    if (entry === null) return 'illegal'; // cannot happen with well-formed input
    if (entry.isCall) {
      const r = model.step(state, entry.input, entry.match!.output);
      if (r.ok) {
        const key = linearized.keyWith(entry.id) + '|' + model.hash(r.state);
        if (!cache.has(key)) {
          cache.add(key);
          calls.push({ e: entry, state });
          state = r.state;
          linearized.set(entry.id);
          lift(entry);
          entry = head.next;
          continue;
        }
      }
      entry = entry.next;
    } else {
      // a return reached before its call could be linearized: backtrack
      const top = calls.pop();
      if (!top) return 'illegal';
      state = top.state;
      linearized.clear(top.e.id);
      unlift(top.e);
      entry = top.e.next;
    }
  }
  return 'ok';
}

export function checkOperations<S, I, O>(model: Model<S, I, O>, history: Operation<I, O>[], maxSteps?: number): CheckReport {
  for (const op of history) {
    if (!(op.ret > op.call)) throw new Error(`operation returns (${op.ret}) before its call (${op.call})`);
  }
  const parts = model.partition ? model.partition(history) : [history];
  let unknown = false;
  for (let i = 0; i < parts.length; i++) {
    const r = checkPartition(model, parts[i]!, maxSteps);
    if (r === 'illegal') return { result: 'illegal', failedPartition: i, failedOps: parts[i] as Operation<unknown, unknown>[] };
    if (r === 'unknown') unknown = true;
  }
  return { result: unknown ? 'unknown' : 'ok' };
}

// ---------------------------------------------------------------- a key-value register model

export type KvInput =
  | { op: 'get'; key: string }
  | { op: 'put'; key: string; value: string }
  | { op: 'cas'; key: string; expected: string | null; value: string };

/** get: value read; put: nothing; cas: whether it swapped. unknown: the response was never seen. */
export interface KvOutput {
  value?: string | null;
  ok?: boolean;
  unknown?: boolean;
}

export const kvModel: Model<string | null, KvInput, KvOutput> = {
  init: () => null,
  step(state, input, output) {
    switch (input.op) {
      case 'get':
        return { ok: output.unknown === true || output.value === state, state };
      case 'put':
        return { ok: true, state: input.value };
      case 'cas': {
        const swapped = state === input.expected;
        if (output.unknown) return { ok: true, state: swapped ? input.value : state };
        return { ok: output.ok === swapped, state: swapped ? input.value : state };
      }
    }
  },
  hash: (s) => (s === null ? '\u0000' : 'v' + s),
  partition(ops) {
    const byKey = new Map<string, Operation<KvInput, KvOutput>[]>();
    for (const op of ops) {
      let l = byKey.get(op.input.key);
      if (!l) byKey.set(op.input.key, (l = []));
      l.push(op);
    }
    return [...byKey.keys()].sort().map((k) => byKey.get(k)!);
  },
};
