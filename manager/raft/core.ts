/**
 * flotilla's Raft consensus core: a pure, deterministic state machine (no timers, sockets or
 * files). See docs/raft.md for the contract. The design follows the Raft paper (Ongaro &
 * Ousterhout) and the shape of etcd's raft package (RawNode, Ready, progress tracking), written
 * from scratch.
 */
import { FlotillaError } from '../../common/errors.js';
import { ConfChange as ConfChangeCodec, ConfChangeType, EntryType, MessageType } from '../../gen/flotilla/v1/raft.js';
import { RaftLog } from './log.js';
import { CompactedError, EMPTY_BUFFER, snapIndex } from './memory-storage.js';
import { Progress } from './progress.js';
import type {
  ConfChange,
  ConfState,
  Entry,
  HardState,
  Message,
  RaftConfig,
  RaftRole,
  RaftStatus,
  ReadState,
  Ready,
  Snapshot,
  SoftState,
} from './types.js';

/** A proposal (or read, or transfer request) that cannot be accepted now; retry later or elsewhere. */
export class ProposalDroppedError extends FlotillaError {
  constructor(why: string) {
    super('UNAVAILABLE', `raft proposal dropped: ${why}`);
    this.name = 'ProposalDroppedError';
  }
}

const NONE = 0;
/** context of vote requests sent on a leadership transfer: they bypass the leader lease */
const CAMPAIGN_TRANSFER = Buffer.from('CampaignTransfer');
const DEFAULT_MAX_SIZE_PER_MSG = 1024 * 1024;
const DEFAULT_MAX_INFLIGHT = 256;
const MAX_COMMITTED_SIZE_PER_READY = 16 * 1024 * 1024;

const LOCAL_ONLY = new Set<MessageType>([
  MessageType.MESSAGE_TYPE_HUP,
  MessageType.MESSAGE_TYPE_BEAT,
  MessageType.MESSAGE_TYPE_UNREACHABLE,
  MessageType.MESSAGE_TYPE_SNAP_STATUS,
  MessageType.MESSAGE_TYPE_CHECK_QUORUM,
]);

const RESPONSES = new Set<MessageType>([
  MessageType.MESSAGE_TYPE_APP_RESP,
  MessageType.MESSAGE_TYPE_VOTE_RESP,
  MessageType.MESSAGE_TYPE_PRE_VOTE_RESP,
  MessageType.MESSAGE_TYPE_HEARTBEAT_RESP,
]);

export function toBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** A message with every field defaulted. */
export function newMessage(m: Partial<Message> & { type: MessageType }): Message {
  return {
    type: m.type,
    to: m.to ?? 0,
    from: m.from ?? 0,
    term: m.term ?? 0,
    logTerm: m.logTerm ?? 0,
    index: m.index ?? 0,
    entries: m.entries ?? [],
    commit: m.commit ?? 0,
    snapshot: m.snapshot,
    reject: m.reject ?? false,
    rejectHint: m.rejectHint ?? 0,
    context: m.context ?? EMPTY_BUFFER,
  };
}

export function encodeConfChange(cc: ConfChange): Buffer {
  return Buffer.from(ConfChangeCodec.encode(cc).finish());
}

export function decodeConfChange(data: Uint8Array): ConfChange {
  return ConfChangeCodec.decode(data);
}

interface ReadRequest {
  index: number;
  req: Message;
  acks: Set<number>;
}

function ctxKey(ctx: Uint8Array): string {
  return toBuffer(ctx).toString('latin1');
}

export class RawNode {
  readonly id: number;
  private term = 0;
  private vote = NONE;
  private lead = NONE;
  private role: RaftRole = 'follower';
  readonly log: RaftLog;

  private readonly maxMsgSize: number;
  private readonly maxInflight: number;
  private readonly checkQuorum: boolean;
  private readonly preVote: boolean;
  private readonly electionTimeout: number;
  private readonly heartbeatTimeout: number;
  private readonly random: () => number;
  private randomizedElectionTimeout = 0;
  private electionElapsed = 0;
  private heartbeatElapsed = 0;

  private readonly prs = new Map<number, Progress>();
  private readonly voters = new Set<number>();
  private readonly learners = new Set<number>();
  private readonly votes = new Map<number, boolean>();
  private leadTransferee = NONE;
  /** index of the last conf change proposed by this leader; no new one until it is applied */
  private pendingConfIndex = 0;
  /** conf changes up to this index are already in effect (bootstrap entries) */
  private confKnownIndex = 0;
  /** proposals appended since the last ready(): broadcast them then, in one batch */
  private bcastPending = false;

  private readQueue: string[] = [];
  private readonly readPending = new Map<string, ReadRequest>();
  private pendingReadIndexMessages: Message[] = [];

  private msgs: Message[] = [];
  private readStates: ReadState[] = [];
  private prevSoft: SoftState;
  private prevHard: HardState;

  constructor(config: RaftConfig) {
    if (!Number.isInteger(config.id) || config.id <= 0) throw new FlotillaError('INVALID_ARGUMENT', `invalid raft id ${config.id}: must be a positive integer`);
    if (config.heartbeatTick <= 0) throw new FlotillaError('INVALID_ARGUMENT', `invalid heartbeatTick ${config.heartbeatTick}: must be > 0`);
    if (config.electionTick <= config.heartbeatTick) {
      throw new FlotillaError('INVALID_ARGUMENT', `invalid electionTick ${config.electionTick}: must be greater than heartbeatTick ${config.heartbeatTick}`);
    }
    this.id = config.id;
    this.maxMsgSize = config.maxSizePerMsg ?? DEFAULT_MAX_SIZE_PER_MSG;
    this.maxInflight = config.maxInflightMsgs ?? DEFAULT_MAX_INFLIGHT;
    if (this.maxInflight <= 0) throw new FlotillaError('INVALID_ARGUMENT', `invalid maxInflightMsgs ${this.maxInflight}: must be > 0`);
    this.checkQuorum = config.checkQuorum ?? false;
    this.preVote = config.preVote ?? false;
    this.electionTimeout = config.electionTick;
    this.heartbeatTimeout = config.heartbeatTick;
    this.random = config.random ?? Math.random;

    const storage = config.storage;
    this.log = new RaftLog(storage, Math.max(MAX_COMMITTED_SIZE_PER_READY, this.maxMsgSize));
    const { hardState, confState } = storage.initialState();
    const hsEmpty = hardState.term === 0 && hardState.vote === 0 && hardState.commit === 0;

    for (const v of confState.voters) this.addNode(v, false);
    for (const l of confState.learners) this.addNode(l, true);

    if (hsEmpty && storage.lastIndex() === 0 && this.prs.size === 0 && (config.peers?.length ?? 0) > 0) {
      // Bootstrap a brand-new cluster: one committed ADD_NODE entry per peer at term 1, so that
      // nodes joining later learn the founding membership from the log.
      this.becomeFollower(1, NONE);
      const ents: Entry[] = config.peers!.map((p, i) => ({
        term: 1,
        index: i + 1,
        type: EntryType.ENTRY_TYPE_CONF_CHANGE,
        data: encodeConfChange({ type: ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE, nodeId: p, context: EMPTY_BUFFER }),
      }));
      this.log.append(ents);
      this.log.commitTo(ents.length);
      for (const p of config.peers!) this.addNode(p, false);
      this.confKnownIndex = ents.length; // already in effect: the node may campaign at once
    } else if (!hsEmpty) {
      if (hardState.commit > this.log.lastIndex()) {
        throw new FlotillaError(
          'INTERNAL',
          `raft: hard state commit ${hardState.commit} is past the last log index ${this.log.lastIndex()}`,
        );
      }
      // (a snapshot is committed by definition, even if the hard state was saved before it)
      this.log.committed = Math.max(hardState.commit, this.log.committed);
      this.term = hardState.term;
      this.vote = hardState.vote;
    }
    if (this.prs.size === 0 && storage.lastIndex() > 0 && snapIndex(storage.snapshot()) === 0 && (config.peers?.length ?? 0) > 0) {
      // A log without a snapshot and without bootstrap entries: take the voters from peers.
      for (const p of config.peers!) this.addNode(p, false);
    }
    const applied = Math.min(config.applied ?? 0, this.log.committed);
    if (applied > this.log.applied) {
      // Conf changes the application already applied are not delivered again: replay them here.
      const from = this.log.applied + 1;
      for (let i = from; i <= applied; ) {
        const ents = this.log.slice(i, applied + 1, 16 * 1024 * 1024);
        for (const e of ents) if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) this.applyConfChange(decodeConfChange(e.data));
        i += ents.length;
      }
      this.log.appliedTo(applied);
    }
    this.becomeFollower(this.term, NONE);
    this.prevSoft = { lead: this.lead, role: this.role };
    this.prevHard = hsEmpty ? { term: 0, vote: 0, commit: 0 } : { ...hardState };
  }

  // ---------------------------------------------------------------- public API

  tick(): void {
    if (this.role === 'leader') this.tickHeartbeat();
    else this.tickElection();
  }

  /** Step a message received from a peer. Local-only message types are ignored. */
  step(m: Message): void {
    if (LOCAL_ONLY.has(m.type)) return;
    if (m.to !== this.id) return;
    if (RESPONSES.has(m.type) && !this.prs.has(m.from)) return;
    this.stepInternal(m);
  }

  propose(data: Uint8Array): void {
    this.proposeEntry({ term: 0, index: 0, type: EntryType.ENTRY_TYPE_NORMAL, data: toBuffer(data) });
  }

  proposeConfChange(cc: ConfChange): void {
    if (this.role === 'leader' && this.pendingConfIndex > this.log.applied) {
      throw new ProposalDroppedError('a configuration change is still pending');
    }
    this.proposeEntry({ term: 0, index: 0, type: EntryType.ENTRY_TYPE_CONF_CHANGE, data: encodeConfChange(cc) });
  }

  private proposeEntry(e: Entry): void {
    if (this.lead === NONE) throw new ProposalDroppedError('no leader');
    const ok = this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_PROP, from: this.id, entries: [e] }));
    if (!ok) throw new ProposalDroppedError(this.leadTransferee !== NONE ? 'leadership transfer in progress' : 'not accepted');
  }

  /**
   * Apply a committed conf change (called by the driver, in log order, for every CONF_CHANGE
   * entry it applies). Returns the new configuration. A leader that removes itself steps down.
   */
  applyConfChange(cc: ConfChange): ConfState {
    switch (cc.type) {
      case ConfChangeType.CONF_CHANGE_TYPE_ADD_NODE:
        this.addNode(cc.nodeId, false);
        break;
      case ConfChangeType.CONF_CHANGE_TYPE_ADD_LEARNER:
        this.addNode(cc.nodeId, true);
        break;
      case ConfChangeType.CONF_CHANGE_TYPE_REMOVE_NODE:
        this.removeNode(cc.nodeId);
        break;
    }
    return this.confState();
  }

  campaign(): void {
    this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_HUP, from: this.id }));
  }

  transferLeader(to: number): void {
    this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_TRANSFER_LEADER, from: to }));
  }

  /**
   * Request a linearizable read. A ReadState with the same context appears in a later Ready once
   * leadership is confirmed; serve the read when applied >= its index. Contexts must be unique.
   */
  readIndex(ctx: Uint8Array): void {
    if (this.lead === NONE) throw new ProposalDroppedError('no leader');
    const ok = this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_READ_INDEX, from: this.id, context: toBuffer(ctx) }));
    if (!ok) throw new ProposalDroppedError('read not accepted');
  }

  reportUnreachable(id: number): void {
    this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_UNREACHABLE, from: id }));
  }

  reportSnapshot(id: number, ok: boolean): void {
    this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_SNAP_STATUS, from: id, reject: !ok }));
  }

  hasReady(): boolean {
    if (this.bcastPending && this.role === 'leader') return true;
    if (this.msgs.length > 0 || this.readStates.length > 0) return true;
    if (this.lead !== this.prevSoft.lead || this.role !== this.prevSoft.role) return true;
    if (this.term !== this.prevHard.term || this.vote !== this.prevHard.vote || this.log.committed !== this.prevHard.commit) return true;
    const u = this.log.unstable;
    if (u.offsetInProgress < u.offset + u.entries.length) return true;
    if (u.snapshot && !u.snapshotInProgress) return true;
    return this.log.hasNextCommittedEnts();
  }

  /**
   * What to do next: persist hardState/entries/snapshot, then send messages, then apply the
   * snapshot and committedEntries, then call advance(rd). Readys must be handled in order.
   */
  ready(): Ready {
    if (this.bcastPending) {
      this.bcastPending = false;
      if (this.role === 'leader') this.bcastAppend();
    }
    const u = this.log.unstable;
    const rd: Ready = {
      entries: u.nextEntries(),
      committedEntries: this.log.nextCommittedEnts(),
      messages: this.msgs,
      readStates: this.readStates,
      mustSync: false,
    };
    if (this.lead !== this.prevSoft.lead || this.role !== this.prevSoft.role) {
      rd.softState = { lead: this.lead, role: this.role };
      this.prevSoft = rd.softState;
    }
    const hs: HardState = { term: this.term, vote: this.vote, commit: this.log.committed };
    if (hs.term !== this.prevHard.term || hs.vote !== this.prevHard.vote || hs.commit !== this.prevHard.commit) {
      rd.hardState = hs;
      rd.mustSync = hs.term !== this.prevHard.term || hs.vote !== this.prevHard.vote;
      this.prevHard = hs;
    }
    if (u.snapshot && !u.snapshotInProgress) rd.snapshot = u.snapshot;
    if (rd.entries.length > 0 || rd.snapshot) rd.mustSync = true;
    u.acceptInProgress();
    if (rd.committedEntries.length > 0) this.log.applying = rd.committedEntries[rd.committedEntries.length - 1]!.index;
    this.msgs = [];
    this.readStates = [];
    return rd;
  }

  /** The Ready was persisted, its messages sent, its snapshot and entries applied. */
  advance(rd: Ready): void {
    if (rd.entries.length > 0) {
      const last = rd.entries[rd.entries.length - 1]!;
      this.log.stableTo(last.index, last.term);
    }
    if (rd.snapshot) {
      const i = snapIndex(rd.snapshot);
      this.log.stableSnapTo(i);
      if (i > this.log.applied) this.log.applied = i;
      if (i > this.log.applying) this.log.applying = i;
    }
    if (rd.committedEntries.length > 0) this.log.appliedTo(rd.committedEntries[rd.committedEntries.length - 1]!.index);
  }

  status(): RaftStatus {
    const progress: RaftStatus['progress'] = {};
    if (this.role === 'leader') {
      for (const [id, pr] of this.prs) {
        progress[id] = { match: pr.match, next: pr.next, state: pr.state, recentActive: pr.recentActive };
      }
    }
    return {
      id: this.id,
      term: this.term,
      vote: this.vote,
      commit: this.log.committed,
      applied: this.log.applied,
      lead: this.lead,
      role: this.role,
      progress,
      confState: this.confState(),
      leadTransferee: this.leadTransferee,
    };
  }

  /** A cheap subset of status() for hot paths. */
  basicStatus(): { id: number; term: number; vote: number; lead: number; role: RaftRole; commit: number; applied: number } {
    return {
      id: this.id,
      term: this.term,
      vote: this.vote,
      lead: this.lead,
      role: this.role,
      commit: this.log.committed,
      applied: this.log.applied,
    };
  }

  confState(): ConfState {
    return { voters: [...this.voters].sort((a, b) => a - b), learners: [...this.learners].sort((a, b) => a - b) };
  }

  // ---------------------------------------------------------------- roles

  private promotable(): boolean {
    return this.voters.has(this.id);
  }

  private quorum(): number {
    return Math.floor(this.voters.size / 2) + 1;
  }

  private resetRandomizedElectionTimeout(): void {
    this.randomizedElectionTimeout = this.electionTimeout + Math.floor(this.random() * this.electionTimeout);
  }

  private reset(term: number): void {
    if (this.term !== term) {
      this.term = term;
      this.vote = NONE;
    }
    this.lead = NONE;
    this.electionElapsed = 0;
    this.heartbeatElapsed = 0;
    this.resetRandomizedElectionTimeout();
    this.leadTransferee = NONE;
    this.votes.clear();
    const last = this.log.lastIndex();
    for (const [id, old] of this.prs) {
      const pr = new Progress(last + 1, this.maxInflight, old.isLearner);
      if (id === this.id) {
        pr.match = last;
        pr.recentActive = true;
      }
      this.prs.set(id, pr);
    }
    this.pendingConfIndex = 0;
    this.readQueue = [];
    this.readPending.clear();
    this.pendingReadIndexMessages = [];
  }

  private becomeFollower(term: number, lead: number): void {
    this.reset(term);
    this.lead = lead;
    this.role = 'follower';
  }

  private becomePreCandidate(): void {
    this.votes.clear();
    this.lead = NONE;
    this.role = 'pre-candidate';
  }

  private becomeCandidate(): void {
    this.reset(this.term + 1);
    this.vote = this.id;
    this.role = 'candidate';
  }

  private becomeLeader(): void {
    this.reset(this.term);
    this.lead = this.id;
    this.role = 'leader';
    this.prs.get(this.id)?.becomeReplicate();
    this.appendEntries([{ term: 0, index: 0, type: EntryType.ENTRY_TYPE_NORMAL, data: EMPTY_BUFFER }]);
    // No conf change until this term's first entry is applied: this also covers any conf change
    // left unapplied from earlier terms, and is the fix for the single-server change bug Ongaro
    // describes (a new leader must commit an entry of its term before changing the membership).
    this.pendingConfIndex = this.log.lastIndex();
  }

  private hup(transfer: boolean): void {
    if (this.role === 'leader') return;
    if (!this.promotable()) return;
    if (this.hasUnappliedConfChanges()) return;
    if (this.preVote && !transfer) this.campaign0(true, false);
    else this.campaign0(false, transfer);
  }

  private hasUnappliedConfChanges(): boolean {
    const from = Math.max(this.log.applied, this.confKnownIndex);
    if (from >= this.log.committed) return false;
    let i = Math.max(from + 1, this.log.firstIndex());
    while (i <= this.log.committed) {
      const ents = this.log.slice(i, this.log.committed + 1, 4 * 1024 * 1024);
      for (const e of ents) if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) return true;
      i += ents.length;
    }
    return false;
  }

  private campaign0(pre: boolean, transfer: boolean): void {
    let voteType: MessageType;
    let term: number;
    if (pre) {
      this.becomePreCandidate();
      voteType = MessageType.MESSAGE_TYPE_PRE_VOTE;
      term = this.term + 1;
    } else {
      this.becomeCandidate();
      voteType = MessageType.MESSAGE_TYPE_VOTE;
      term = this.term;
    }
    if (this.poll(this.id, true) === 'won') {
      if (pre) this.campaign0(false, transfer);
      else this.becomeLeader();
      return;
    }
    const lastIndex = this.log.lastIndex();
    const lastTerm = this.log.lastTerm();
    for (const v of this.voters) {
      if (v === this.id) continue;
      this.send(
        newMessage({
          type: voteType,
          to: v,
          term,
          index: lastIndex,
          logTerm: lastTerm,
          context: transfer ? CAMPAIGN_TRANSFER : EMPTY_BUFFER,
        }),
      );
    }
  }

  private poll(from: number, granted: boolean): 'won' | 'lost' | 'pending' {
    if (!this.votes.has(from)) this.votes.set(from, granted);
    let yes = 0;
    let no = 0;
    for (const v of this.voters) {
      const g = this.votes.get(v);
      if (g === true) yes++;
      else if (g === false) no++;
    }
    const q = this.quorum();
    if (yes >= q) return 'won';
    if (no > this.voters.size - q) return 'lost';
    return 'pending';
  }

  // ---------------------------------------------------------------- ticks

  private tickElection(): void {
    this.electionElapsed++;
    if (this.promotable() && this.electionElapsed >= this.randomizedElectionTimeout) {
      this.electionElapsed = 0;
      this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_HUP, from: this.id }));
    }
  }

  private tickHeartbeat(): void {
    this.heartbeatElapsed++;
    this.electionElapsed++;
    if (this.electionElapsed >= this.electionTimeout) {
      this.electionElapsed = 0;
      if (this.checkQuorum) this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_CHECK_QUORUM, from: this.id }));
      if (this.role === 'leader' && this.leadTransferee !== NONE) this.leadTransferee = NONE; // transfer timed out
    }
    if (this.role !== 'leader') return;
    if (this.heartbeatElapsed >= this.heartbeatTimeout) {
      this.heartbeatElapsed = 0;
      this.stepInternal(newMessage({ type: MessageType.MESSAGE_TYPE_BEAT, from: this.id }));
    }
  }

  // ---------------------------------------------------------------- step

  private send(m: Message): void {
    if (m.from === NONE) m.from = this.id;
    const t = m.type;
    if (
      t === MessageType.MESSAGE_TYPE_VOTE ||
      t === MessageType.MESSAGE_TYPE_VOTE_RESP ||
      t === MessageType.MESSAGE_TYPE_PRE_VOTE ||
      t === MessageType.MESSAGE_TYPE_PRE_VOTE_RESP
    ) {
      // term set by the caller
    } else if (t !== MessageType.MESSAGE_TYPE_PROP && t !== MessageType.MESSAGE_TYPE_READ_INDEX) {
      m.term = this.term;
    }
    this.msgs.push(m);
  }

  /** returns false when the message was a proposal/read/transfer that was dropped */
  private stepInternal(m: Message): boolean {
    const T = MessageType;
    if (m.term === 0) {
      // local message (or a forwarded proposal / read)
    } else if (m.term > this.term) {
      if (m.type === T.MESSAGE_TYPE_VOTE || m.type === T.MESSAGE_TYPE_PRE_VOTE) {
        const force = m.context.equals(CAMPAIGN_TRANSFER);
        const inLease = this.checkQuorum && this.lead !== NONE && this.electionElapsed < this.electionTimeout;
        if (!force && inLease) return true; // a live leader: ignore the disruptive candidate
      }
      if (m.type === T.MESSAGE_TYPE_PRE_VOTE) {
        // never change term on a pre-vote request
      } else if (m.type === T.MESSAGE_TYPE_PRE_VOTE_RESP && !m.reject) {
        // the term of a granted pre-vote is our future term
      } else if (m.type === T.MESSAGE_TYPE_APP || m.type === T.MESSAGE_TYPE_HEARTBEAT || m.type === T.MESSAGE_TYPE_SNAP) {
        this.becomeFollower(m.term, m.from);
      } else {
        this.becomeFollower(m.term, NONE);
      }
    } else if (m.term < this.term) {
      if ((this.checkQuorum || this.preVote) && (m.type === T.MESSAGE_TYPE_APP || m.type === T.MESSAGE_TYPE_HEARTBEAT)) {
        // Tell a stale leader about the new term (it may be cut off and would otherwise never learn).
        this.send(newMessage({ type: T.MESSAGE_TYPE_APP_RESP, to: m.from }));
      } else if (m.type === T.MESSAGE_TYPE_PRE_VOTE) {
        this.send(newMessage({ type: T.MESSAGE_TYPE_PRE_VOTE_RESP, to: m.from, term: this.term, reject: true }));
      }
      return true;
    }

    switch (m.type) {
      case T.MESSAGE_TYPE_HUP:
        this.hup(m.context.equals(CAMPAIGN_TRANSFER));
        return true;
      case T.MESSAGE_TYPE_VOTE:
      case T.MESSAGE_TYPE_PRE_VOTE: {
        const pre = m.type === T.MESSAGE_TYPE_PRE_VOTE;
        const canVote =
          this.vote === m.from || (this.vote === NONE && this.lead === NONE) || (pre && m.term > this.term);
        const respType = pre ? T.MESSAGE_TYPE_PRE_VOTE_RESP : T.MESSAGE_TYPE_VOTE_RESP;
        if (canVote && this.log.isUpToDate(m.index, m.logTerm)) {
          this.send(newMessage({ type: respType, to: m.from, term: m.term }));
          if (!pre) {
            this.electionElapsed = 0;
            this.vote = m.from;
          }
        } else {
          this.send(newMessage({ type: respType, to: m.from, term: this.term, reject: true }));
        }
        return true;
      }
    }
    switch (this.role) {
      case 'leader':
        return this.stepLeader(m);
      case 'candidate':
      case 'pre-candidate':
        return this.stepCandidate(m);
      case 'follower':
        return this.stepFollower(m);
    }
  }

  private stepLeader(m: Message): boolean {
    const T = MessageType;
    switch (m.type) {
      case T.MESSAGE_TYPE_BEAT:
        this.bcastHeartbeat();
        return true;
      case T.MESSAGE_TYPE_CHECK_QUORUM:
        if (!this.quorumActive()) this.becomeFollower(this.term, NONE);
        for (const [id, pr] of this.prs) if (id !== this.id) pr.recentActive = false;
        return true;
      case T.MESSAGE_TYPE_PROP: {
        if (m.entries.length === 0) return false;
        if (!this.prs.has(this.id)) return false; // removed
        if (this.leadTransferee !== NONE) return false;
        const ents: Entry[] = [];
        for (let i = 0; i < m.entries.length; i++) {
          const e = m.entries[i]!;
          if (e.type === EntryType.ENTRY_TYPE_CONF_CHANGE) {
            if (this.pendingConfIndex > this.log.applied) {
              if (m.from === this.id) return false;
              ents.push({ term: 0, index: 0, type: EntryType.ENTRY_TYPE_NORMAL, data: EMPTY_BUFFER });
              continue;
            }
            this.pendingConfIndex = this.log.lastIndex() + i + 1;
          }
          ents.push(e);
        }
        this.appendEntries(ents);
        // Sent at the next ready(): every proposal made until then goes in one append per follower.
        this.bcastPending = true;
        return true;
      }
      case T.MESSAGE_TYPE_READ_INDEX: {
        if (this.voters.size === 1 && this.voters.has(this.id)) {
          this.respondRead(m, this.log.committed);
          return true;
        }
        if (!this.committedEntryInCurrentTerm()) {
          // The commit index is not known to be current until this term's first entry commits.
          this.pendingReadIndexMessages.push(m);
          return true;
        }
        this.startRead(m);
        return true;
      }
    }

    const pr = this.prs.get(m.from);
    if (!pr) return true;
    switch (m.type) {
      case T.MESSAGE_TYPE_APP_RESP:
        this.handleAppendResponse(m, pr);
        return true;
      case T.MESSAGE_TYPE_HEARTBEAT_RESP: {
        pr.recentActive = true;
        pr.probeSent = false;
        if (pr.state === 'replicate' && pr.inflights.full()) pr.inflights.freeFirstOne();
        if (pr.match < this.log.lastIndex()) this.sendAppend(m.from);
        if (m.context.length > 0) this.recvReadAck(m.from, m.context);
        return true;
      }
      case T.MESSAGE_TYPE_SNAP_STATUS:
        if (pr.state !== 'snapshot') return true;
        if (m.reject) pr.pendingSnapshot = 0;
        pr.becomeProbe();
        // wait for a heartbeat response (or the append response) before probing again
        pr.probeSent = true;
        return true;
      case T.MESSAGE_TYPE_UNREACHABLE:
        if (pr.state === 'replicate') pr.becomeProbe();
        return true;
      case T.MESSAGE_TYPE_TRANSFER_LEADER: {
        if (pr.isLearner) return false;
        const transferee = m.from;
        if (this.leadTransferee !== NONE) {
          if (this.leadTransferee === transferee) return true;
          this.leadTransferee = NONE;
        }
        if (transferee === this.id) return true;
        this.electionElapsed = 0;
        this.leadTransferee = transferee;
        if (pr.match === this.log.lastIndex()) this.sendTimeoutNow(transferee);
        else this.sendAppend(transferee);
        return true;
      }
    }
    return true;
  }

  private handleAppendResponse(m: Message, pr: Progress): void {
    pr.recentActive = true;
    if (m.reject) {
      let nextProbe = m.rejectHint;
      if (m.logTerm > 0) nextProbe = this.log.findConflictByTerm(m.rejectHint, m.logTerm).index;
      if (pr.maybeDecrTo(m.index, nextProbe)) {
        if (pr.state === 'replicate') pr.becomeProbe();
        this.sendAppend(m.from);
      }
      return;
    }
    const oldPaused = pr.isPaused();
    if (pr.maybeUpdate(m.index) || (pr.match === m.index && pr.state === 'probe')) {
      if (pr.state === 'probe') {
        pr.becomeReplicate();
      } else if (pr.state === 'snapshot' && pr.match + 1 >= this.log.firstIndex()) {
        pr.becomeProbe();
        pr.becomeReplicate();
      } else if (pr.state === 'replicate') {
        pr.inflights.freeLE(m.index);
      }
      if (this.maybeCommit()) {
        this.releasePendingReads();
        this.bcastAppend();
      } else if (oldPaused) {
        this.sendAppend(m.from);
      }
      while (this.maybeSendAppend(m.from, false)) {
        // keep the pipeline full
      }
      if (m.from === this.leadTransferee && pr.match === this.log.lastIndex()) this.sendTimeoutNow(m.from);
    }
  }

  private stepCandidate(m: Message): boolean {
    const T = MessageType;
    const myVoteResp = this.role === 'pre-candidate' ? T.MESSAGE_TYPE_PRE_VOTE_RESP : T.MESSAGE_TYPE_VOTE_RESP;
    switch (m.type) {
      case T.MESSAGE_TYPE_PROP:
      case T.MESSAGE_TYPE_READ_INDEX:
      case T.MESSAGE_TYPE_TRANSFER_LEADER:
        return false;
      case T.MESSAGE_TYPE_APP:
        this.becomeFollower(m.term, m.from);
        this.handleAppend(m);
        return true;
      case T.MESSAGE_TYPE_HEARTBEAT:
        this.becomeFollower(m.term, m.from);
        this.handleHeartbeat(m);
        return true;
      case T.MESSAGE_TYPE_SNAP:
        this.becomeFollower(m.term, m.from);
        this.handleSnapshot(m);
        return true;
      case myVoteResp: {
        const r = this.poll(m.from, !m.reject);
        if (r === 'won') {
          if (this.role === 'pre-candidate') this.campaign0(false, false);
          else {
            this.becomeLeader();
            this.bcastAppend();
          }
        } else if (r === 'lost') {
          this.becomeFollower(this.term, NONE);
        }
        return true;
      }
    }
    return true;
  }

  private stepFollower(m: Message): boolean {
    const T = MessageType;
    switch (m.type) {
      case T.MESSAGE_TYPE_PROP:
      case T.MESSAGE_TYPE_READ_INDEX:
      case T.MESSAGE_TYPE_TRANSFER_LEADER:
        if (this.lead === NONE) return false;
        this.send({ ...m, to: this.lead });
        return true;
      case T.MESSAGE_TYPE_APP:
        this.electionElapsed = 0;
        this.lead = m.from;
        this.handleAppend(m);
        return true;
      case T.MESSAGE_TYPE_HEARTBEAT:
        this.electionElapsed = 0;
        this.lead = m.from;
        this.handleHeartbeat(m);
        return true;
      case T.MESSAGE_TYPE_SNAP:
        this.electionElapsed = 0;
        this.lead = m.from;
        this.handleSnapshot(m);
        return true;
      case T.MESSAGE_TYPE_TIMEOUT_NOW:
        this.hup(true);
        return true;
      case T.MESSAGE_TYPE_READ_INDEX_RESP:
        this.readStates.push({ index: m.index, context: m.context });
        return true;
    }
    return true;
  }

  // ---------------------------------------------------------------- follower handlers

  private handleAppend(m: Message): void {
    const T = MessageType;
    if (m.index < this.log.committed) {
      this.send(newMessage({ type: T.MESSAGE_TYPE_APP_RESP, to: m.from, index: this.log.committed }));
      return;
    }
    const lastNew = this.log.maybeAppend(m.index, m.logTerm, m.commit, m.entries);
    if (lastNew !== undefined) {
      this.send(newMessage({ type: T.MESSAGE_TYPE_APP_RESP, to: m.from, index: lastNew }));
      return;
    }
    // Reject with a hint: the largest index <= m.index whose term is <= m.logTerm, so the leader
    // skips whole terms of conflicting entries at once.
    const hint = this.log.findConflictByTerm(Math.min(m.index, this.log.lastIndex()), m.logTerm);
    this.send(
      newMessage({
        type: T.MESSAGE_TYPE_APP_RESP,
        to: m.from,
        index: m.index,
        reject: true,
        rejectHint: hint.index,
        logTerm: hint.term,
      }),
    );
  }

  private handleHeartbeat(m: Message): void {
    this.log.commitTo(m.commit);
    this.send(newMessage({ type: MessageType.MESSAGE_TYPE_HEARTBEAT_RESP, to: m.from, context: m.context }));
  }

  private handleSnapshot(m: Message): void {
    const s = m.snapshot;
    if (s && this.restore(s)) {
      this.send(newMessage({ type: MessageType.MESSAGE_TYPE_APP_RESP, to: m.from, index: this.log.lastIndex() }));
    } else {
      this.send(newMessage({ type: MessageType.MESSAGE_TYPE_APP_RESP, to: m.from, index: this.log.committed }));
    }
  }

  private restore(s: Snapshot): boolean {
    const idx = snapIndex(s);
    const term = s.metadata?.term ?? 0;
    if (idx <= this.log.committed) return false;
    if (this.log.matchTerm(idx, term)) {
      // we already have the entries: fast-forward the commit index
      this.log.commitTo(idx);
      return false;
    }
    this.log.restore(s);
    const cs = s.metadata?.confState ?? { voters: [], learners: [] };
    this.prs.clear();
    this.voters.clear();
    this.learners.clear();
    for (const v of cs.voters) this.addNode(v, false);
    for (const l of cs.learners) this.addNode(l, true);
    return true;
  }

  // ---------------------------------------------------------------- leader helpers

  private appendEntries(es: Entry[]): void {
    let li = this.log.lastIndex();
    const ents: Entry[] = new Array<Entry>(es.length);
    for (let i = 0; i < es.length; i++) {
      const e = es[i]!;
      ents[i] = { term: this.term, index: ++li, type: e.type, data: e.data };
    }
    li = this.log.append(ents);
    this.prs.get(this.id)?.maybeUpdate(li);
    this.maybeCommit();
  }

  private maybeCommit(): boolean {
    const n = this.voters.size;
    if (n === 0) return false;
    const matches: number[] = [];
    for (const v of this.voters) matches.push(this.prs.get(v)?.match ?? 0);
    matches.sort((a, b) => b - a);
    const mci = matches[this.quorum() - 1]!;
    return this.log.maybeCommit(mci, this.term);
  }

  private committedEntryInCurrentTerm(): boolean {
    return this.log.termOrUndefined(this.log.committed) === this.term;
  }

  private quorumActive(): boolean {
    let active = 0;
    for (const v of this.voters) {
      if (v === this.id || this.prs.get(v)?.recentActive) active++;
    }
    return active >= this.quorum();
  }

  private bcastAppend(): void {
    for (const id of this.prs.keys()) if (id !== this.id) this.sendAppend(id);
  }

  private sendAppend(to: number): void {
    this.maybeSendAppend(to, true);
  }

  private maybeSendAppend(to: number, sendIfEmpty: boolean): boolean {
    const pr = this.prs.get(to);
    if (!pr || pr.isPaused()) return false;
    const prevIndex = pr.next - 1;
    const prevTerm = this.log.termOrUndefined(prevIndex);
    let ents: Entry[] = [];
    let compacted = prevTerm === undefined;
    if (!compacted) {
      try {
        ents = this.log.entriesFrom(pr.next, this.maxMsgSize);
      } catch (err) {
        if (!(err instanceof CompactedError)) throw err;
        compacted = true;
      }
    }
    if (compacted) return this.maybeSendSnapshot(to, pr);
    if (ents.length === 0 && !sendIfEmpty) return false;
    this.send(
      newMessage({
        type: MessageType.MESSAGE_TYPE_APP,
        to,
        index: prevIndex,
        logTerm: prevTerm,
        entries: ents,
        commit: this.log.committed,
      }),
    );
    pr.sentEntries(ents.length > 0 ? ents[ents.length - 1]!.index : prevIndex, ents.length > 0);
    return true;
  }

  private maybeSendSnapshot(to: number, pr: Progress): boolean {
    if (!pr.recentActive) return false;
    const snap = this.log.snapshot();
    const idx = snapIndex(snap);
    if (idx === 0) return false;
    this.send(newMessage({ type: MessageType.MESSAGE_TYPE_SNAP, to, snapshot: snap }));
    pr.becomeSnapshot(idx);
    return true;
  }

  private bcastHeartbeat(ctx?: Buffer): void {
    let context = ctx;
    if (context === undefined) {
      const last = this.readQueue[this.readQueue.length - 1];
      context = last === undefined ? EMPTY_BUFFER : this.readPending.get(last)!.req.context;
    }
    for (const [id, pr] of this.prs) {
      if (id === this.id) continue;
      this.send(
        newMessage({
          type: MessageType.MESSAGE_TYPE_HEARTBEAT,
          to: id,
          commit: Math.min(pr.match, this.log.committed),
          context,
        }),
      );
    }
  }

  private sendTimeoutNow(to: number): void {
    this.send(newMessage({ type: MessageType.MESSAGE_TYPE_TIMEOUT_NOW, to }));
  }

  // ---------------------------------------------------------------- reads

  private respondRead(m: Message, index: number): void {
    if (m.from === NONE || m.from === this.id) {
      this.readStates.push({ index, context: m.context });
    } else {
      this.send(newMessage({ type: MessageType.MESSAGE_TYPE_READ_INDEX_RESP, to: m.from, index, context: m.context }));
    }
  }

  private startRead(m: Message): void {
    const key = ctxKey(m.context);
    if (!this.readPending.has(key)) {
      this.readPending.set(key, { index: this.log.committed, req: m, acks: new Set([this.id]) });
      this.readQueue.push(key);
    }
    this.bcastHeartbeat(m.context);
  }

  private releasePendingReads(): void {
    if (this.pendingReadIndexMessages.length === 0 || !this.committedEntryInCurrentTerm()) return;
    const pending = this.pendingReadIndexMessages;
    this.pendingReadIndexMessages = [];
    for (const m of pending) this.startRead(m);
  }

  private recvReadAck(from: number, ctx: Buffer): void {
    const key = ctxKey(ctx);
    const rr = this.readPending.get(key);
    if (!rr) return;
    rr.acks.add(from);
    let n = 0;
    for (const v of this.voters) if (rr.acks.has(v)) n++;
    if (n < this.quorum()) return;
    // Leadership confirmed at this point: every read queued before this one is safe as well.
    const pos = this.readQueue.indexOf(key);
    const done = this.readQueue.slice(0, pos + 1);
    this.readQueue = this.readQueue.slice(pos + 1);
    for (const k of done) {
      const r = this.readPending.get(k)!;
      this.readPending.delete(k);
      this.respondRead(r.req, r.index);
    }
  }

  // ---------------------------------------------------------------- membership

  private addNode(id: number, learner: boolean): void {
    const pr = this.prs.get(id);
    if (pr) {
      if (learner || !pr.isLearner) return; // already present (demoting a voter is not supported)
      pr.isLearner = false;
      this.learners.delete(id);
      this.voters.add(id);
      return;
    }
    const npr = new Progress(this.log.lastIndex() + 1, this.maxInflight, learner);
    npr.recentActive = true;
    if (id === this.id) npr.match = this.log.lastIndex();
    this.prs.set(id, npr);
    if (learner) this.learners.add(id);
    else this.voters.add(id);
  }

  private removeNode(id: number): void {
    if (!this.prs.has(id)) return;
    this.prs.delete(id);
    this.voters.delete(id);
    this.learners.delete(id);
    if (this.role !== 'leader') return;
    if (id === this.id) {
      this.stepDownAfterRemoval();
      return;
    }
    if (this.leadTransferee === id) this.leadTransferee = NONE;
    // A smaller quorum may commit more, and may confirm pending reads.
    if (this.maybeCommit()) this.bcastAppend();
  }

  /**
   * The leader applied its own removal: tell the followers the commit index, hand leadership to
   * the most up-to-date voter when one is fully caught up, and step down.
   */
  private stepDownAfterRemoval(): void {
    this.bcastHeartbeat(EMPTY_BUFFER);
    let best = NONE;
    let bestMatch = -1;
    for (const v of this.voters) {
      const pr = this.prs.get(v)!;
      if (pr.match > bestMatch) {
        best = v;
        bestMatch = pr.match;
      }
    }
    if (best !== NONE && bestMatch === this.log.lastIndex()) this.sendTimeoutNow(best);
    this.becomeFollower(this.term, NONE);
  }
}
