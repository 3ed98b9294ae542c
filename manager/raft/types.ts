/**
 * The contract of flotilla's Raft core (manager/raft/core.ts), shared by the core, the durable
 * storage, the transport and the node driver. The core is a pure state machine: no timers, sockets
 * or files. The caller ticks it, steps messages into it, proposes, reads ready(), persists
 * (hardState, entries, snapshot), THEN sends messages, applies committedEntries, and calls advance().
 */
import type { ConfChange, ConfState, Entry, HardState, Message, Snapshot } from '../../gen/flotilla/v1/raft.js';

export type { ConfChange, ConfState, Entry, HardState, Message, Snapshot };

export type RaftRole = 'follower' | 'pre-candidate' | 'candidate' | 'leader';

export interface SoftState {
  lead: number; // 0 = none known
  role: RaftRole;
}

export interface ReadState {
  /** the commit index at the time the read was requested; safe to serve once applied >= index */
  index: number;
  /** the context passed to readIndex() */
  context: Uint8Array;
}

export interface Ready {
  /** set when it changed since the last ready() */
  softState?: SoftState;
  /** set when it changed; persist before sending messages */
  hardState?: HardState;
  /** entries to append to stable storage before sending messages */
  entries: Entry[];
  /** a snapshot to persist and install (from the leader); apply it before committedEntries */
  snapshot?: Snapshot;
  /** entries committed and ready to apply, in order */
  committedEntries: Entry[];
  /** messages to send after persisting */
  messages: Message[];
  readStates: ReadState[];
  /**
   * true when the hard state's term/vote, entries or a snapshot changed: persist them durably
   * (fsync) before sending messages. False when only the commit index changed (persisting it
   * without fsync is enough). Messages are never to be sent before persisting.
   */
  mustSync: boolean;
}

/** The read side of the log storage the core consults (etcd's Storage interface, in spirit). */
export interface LogStorage {
  initialState(): { hardState: HardState; confState: ConfState };
  /** entries [lo, hi), at most maxSize bytes (at least one entry) */
  entries(lo: number, hi: number, maxSize: number): Entry[];
  /** term of entry i; throws CompactedError when i < firstIndex()-1, UnavailableError when i > lastIndex() */
  term(i: number): number;
  lastIndex(): number;
  firstIndex(): number;
  snapshot(): Snapshot;
}

export interface RaftConfig {
  id: number;
  /** initial voters for a brand-new cluster (ignored when storage has a conf state) */
  peers?: number[];
  electionTick: number;
  heartbeatTick: number;
  storage: LogStorage;
  /** last applied index when restarting */
  applied?: number;
  maxSizePerMsg?: number;
  maxInflightMsgs?: number;
  preVote?: boolean;
  checkQuorum?: boolean;
  /** deterministic randomness for election timeouts: returns [0,1) */
  random?: () => number;
}

export interface RaftStatus {
  id: number;
  term: number;
  vote: number;
  commit: number;
  applied: number;
  lead: number;
  role: RaftRole;
  /** leader only: match index per peer */
  progress: Record<number, { match: number; next: number; state: 'probe' | 'replicate' | 'snapshot'; recentActive: boolean }>;
  confState: ConfState;
  leadTransferee: number;
}
