/**
 * Membership around the core's configuration: the address book of the members (kept in
 * <dataDir>/members.json and in the transport), how conf changes and snapshots update it, the
 * leader's choices (which learner to promote, whether a removal leaves a quorum, whom to hand
 * leadership to), and joining an existing cluster as a brand-new node.
 *
 * New members join as learners (Join RPC to any manager, forwarded to the leader); the leader
 * promotes a learner to voter once it has caught up. Addresses travel in the ConfChange context
 * and in snapshots.
 */
import * as grpc from '@grpc/grpc-js';
import os from 'node:os';
import { FlotillaError, errorMessage } from '../../common/errors.js';
import { writeFileAtomicSync } from '../../common/fsutil.js';
import type { Logger } from '../../common/log.js';
import { sleep } from '../../common/sleep.js';
import { ConfChangeType, RaftClient, type JoinRaftRequest, type JoinRaftResponse } from '../../gen/flotilla/v1/raft.js';
import type { RawNode } from './core.js';
import type { CcContext } from './encoding.js';
import { CHANNEL_OPTIONS, callUnary } from './transport.js';
import type { ConfChange, ConfState } from './types.js';

/** What the book tells about peers (the transport). */
export interface PeerSink {
  setPeer(id: number, addr: string): void;
  removePeer(id: number): void;
}

type RaftStatus = ReturnType<RawNode['status']>;

export function writeMembersFile(file: string, members: Map<number, string>): void {
  writeFileAtomicSync(file, JSON.stringify([...members].map(([id, addr]) => ({ id, addr })), null, 1));
}

export class MemberBook {
  readonly addrs = new Map<number, string>();
  peers: PeerSink | undefined;

  constructor(
    private readonly selfId: number,
    private readonly file: string,
    initial: Map<number, string>,
  ) {
    for (const [id, addr] of initial) this.addrs.set(id, addr);
  }

  addr(id: number): string | undefined {
    return this.addrs.get(id);
  }

  /** Tell the transport every known peer. */
  connect(peers: PeerSink): void {
    this.peers = peers;
    for (const [id, addr] of this.addrs) peers.setPeer(id, addr);
  }

  /** A snapshot brings the member list of its configuration. */
  restore(members: { id: number; addr: string }[], cs: ConfState | undefined): void {
    const inConf = new Set([...(cs?.voters ?? []), ...(cs?.learners ?? [])]);
    let changed = false;
    for (const m of members) {
      if (this.addrs.get(m.id) !== m.addr && m.id !== this.selfId) {
        this.addrs.set(m.id, m.addr);
        this.peers?.setPeer(m.id, m.addr);
        changed = true;
      }
    }
    for (const id of [...this.addrs.keys()]) {
      if (inConf.size > 0 && !inConf.has(id) && id !== this.selfId) {
        this.addrs.delete(id);
        this.peers?.removePeer(id);
        changed = true;
      }
    }
    if (changed) this.save();
  }

  /** An applied conf change. Returns true when it removed this node. */
  apply(cc: ConfChange, ctx: CcContext): boolean {
    if (cc.type === ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE) {
      if (this.addrs.delete(cc.nodeId)) this.save();
      this.peers?.removePeer(cc.nodeId);
      return cc.nodeId === this.selfId;
    }
    if (ctx.addr && cc.nodeId !== this.selfId && this.addrs.get(cc.nodeId) !== ctx.addr) {
      this.addrs.set(cc.nodeId, ctx.addr);
      this.peers?.setPeer(cc.nodeId, ctx.addr);
      this.save();
    }
    return false;
  }

  /** The id already given to a joiner at addr (a retry after its first Join was committed). */
  idOf(addr: string, inConf: Set<number>): number | undefined {
    for (const [id, a] of this.addrs) if (a === addr && inConf.has(id)) return id;
    return undefined;
  }

  joinResponse(raftId: number): JoinRaftResponse {
    return { raftId, members: [...this.addrs].map(([id, addr]) => ({ raftId: id, addr, nodeId: '' })) };
  }

  private save(): void {
    writeMembersFile(this.file, this.addrs);
  }
}

/** Leader: a learner that has caught up (within 100 entries of the commit, replicating), if any. */
export function learnerToPromote(st: RaftStatus): number | undefined {
  for (const l of st.confState.learners) {
    const pr = st.progress[l];
    if (!pr || !pr.recentActive || pr.state !== 'replicate' || pr.match + 100 < st.commit) continue;
    return l;
  }
  return undefined;
}

/** Leader: refuse (FAILED_PRECONDITION) to remove a voter when the reachable remaining voters would not make a quorum. */
export function checkRemovalQuorum(st: RaftStatus, selfId: number, id: number, reachable: (id: number) => boolean): void {
  const remaining = st.confState.voters.filter((v) => v !== id);
  const up = remaining.filter((v) => v === selfId || (st.progress[v]?.recentActive === true && reachable(v))).length;
  const quorum = Math.floor(remaining.length / 2) + 1;
  if (remaining.length === 0 || up < quorum) {
    throw new FlotillaError('FAILED_PRECONDITION', `removing raft member ${id} would leave ${up} reachable of ${remaining.length} voters, short of a quorum of ${quorum} (use force to remove anyway)`);
  }
}

/** Leader: the most up-to-date recently active voter other than itself, 0 if none. */
export function transferTarget(st: RaftStatus, selfId: number): number {
  let best = 0;
  let bestMatch = -1;
  for (const v of st.confState.voters) {
    if (v === selfId) continue;
    const pr = st.progress[v];
    if (pr && pr.recentActive && pr.match > bestMatch) {
      best = v;
      bestMatch = pr.match;
    }
  }
  return best;
}

/** A brand-new node asks a member at `join` to add it (as a learner) until it is accepted or the deadline passes. */
export async function joinCluster(
  opts: { join: string; joinToken?: string; requestTimeoutMs?: number; credentials?: grpc.ChannelCredentials; signal: AbortSignal; log?: Logger },
  addr: string,
): Promise<JoinRaftResponse> {
  const client = new RaftClient(opts.join, opts.credentials ?? grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  try {
    const deadline = Date.now() + (opts.requestTimeoutMs ?? 15_000) * 2;
    for (;;) {
      opts.signal.throwIfAborted();
      try {
        const res = await callUnary<JoinRaftRequest, JoinRaftResponse>(client, 'join', { token: opts.joinToken ?? '', addr, hostname: os.hostname(), nodeId: '' }, opts.signal, opts.requestTimeoutMs ?? 15_000);
        if (!res.raftId) throw new FlotillaError('INTERNAL', `raft: join via ${opts.join} returned no raft id`);
        return res;
      } catch (err) {
        const code = err instanceof FlotillaError ? err.code : 'UNAVAILABLE';
        if ((code !== 'UNAVAILABLE' && code !== 'DEADLINE_EXCEEDED' && code !== 'FAILED_PRECONDITION') || Date.now() > deadline) {
          throw new FlotillaError(code, `raft: joining via ${opts.join} failed: ${errorMessage(err)}`, { cause: err });
        }
        opts.log?.info({ join: opts.join, err: errorMessage(err) }, 'raft: join not accepted yet; retrying');
        await sleep(300, opts.signal);
      }
    }
  } finally {
    client.close();
  }
}
