/**
 * What the driver puts into the Raft log and into snapshots:
 *
 *   a normal entry:   0xF1, an 8-byte request id, the state machine's payload (an entry without
 *                     the envelope is applied whole and settles no request)
 *   a snapshot:       "FLRS", u32 length of the members JSON, the JSON ([{id, addr}]), the state
 *                     machine's bytes
 *   a conf change's context: JSON {addr?, rid?} (a bare address from older writers is accepted)
 */
import { randomBytes } from 'node:crypto';
import { FlotillaError } from '../../common/errors.js';

const ENVELOPE = 0xf1;
const SNAP_MAGIC = Buffer.from('FLRS');
/** the largest proposal accepted (bytes of state machine payload) */
export const MAX_PROPOSAL = 8 * 1024 * 1024;

export function wrapProposal(rid: Buffer, data: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(9 + data.length);
  out[0] = ENVELOPE;
  rid.copy(out, 1);
  out.set(data, 9);
  return out;
}

export function unwrapProposal(data: Buffer): { rid: string | undefined; payload: Buffer } {
  if (data.length >= 9 && data[0] === ENVELOPE) return { rid: data.subarray(1, 9).toString('hex'), payload: data.subarray(9) };
  return { rid: undefined, payload: data };
}

/** Request ids come from a pool of random bytes refilled 512 at a time (one randomBytes call each). */
const RID_POOL = 4096;
let ridPool = Buffer.alloc(0);
let ridOff = RID_POOL;
export function newRid(): Buffer {
  if (ridOff >= ridPool.length) {
    ridPool = randomBytes(RID_POOL);
    ridOff = 0;
  }
  const rid = ridPool.subarray(ridOff, ridOff + 8);
  ridOff += 8;
  return rid;
}

export function wrapSnapshot(members: Map<number, string>, state: Uint8Array): Buffer {
  const json = Buffer.from(JSON.stringify([...members].map(([id, addr]) => ({ id, addr }))));
  const out = Buffer.allocUnsafe(8 + json.length + state.length);
  SNAP_MAGIC.copy(out, 0);
  out.writeUInt32LE(json.length, 4);
  json.copy(out, 8);
  out.set(state, 8 + json.length);
  return out;
}

export function unwrapSnapshot(data: Buffer): { members: { id: number; addr: string }[]; state: Buffer } {
  if (data.length < 8 || !data.subarray(0, 4).equals(SNAP_MAGIC)) throw new FlotillaError('INTERNAL', 'raft snapshot data has no flotilla header');
  const len = data.readUInt32LE(4);
  const members = JSON.parse(data.subarray(8, 8 + len).toString()) as { id: number; addr: string }[];
  return { members, state: data.subarray(8 + len) };
}

export interface CcContext {
  addr?: string;
  rid?: string;
}

export function encodeContext(ctx: CcContext): Buffer {
  return Buffer.from(JSON.stringify(ctx));
}

export function parseContext(ctx: Buffer): CcContext {
  if (ctx.length === 0) return {};
  try {
    const v = JSON.parse(ctx.toString()) as CcContext;
    return typeof v === 'object' && v ? v : {};
  } catch {
    return { addr: ctx.toString() };
  }
}
