/**
 * Force-new-cluster (quorum loss recovery): apply everything committed, take a snapshot at the
 * commit index whose configuration is this node alone, and replace the log with it. Uncommitted
 * entries are dropped.
 */
import path from 'node:path';
import { FlotillaError } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import { EntryType } from '../../gen/flotilla/v1/raft.js';
import { unwrapProposal, unwrapSnapshot, wrapSnapshot } from './encoding.js';
import { snapIndex } from './memory-storage.js';
import { writeMembersFile } from './membership.js';
import type { ConfState, Snapshot } from './types.js';
import type { Wal } from './wal.js';

export interface ForceNewClusterOptions {
  dataDir: string;
  stateMachine: { apply(data: Uint8Array, index: number): void; snapshot(): Uint8Array; restore(data: Uint8Array, index: number): void };
  log?: Logger;
}

/** Rewrites wal (closing it) and the members file; returns the WAL reopened by reopen(). */
export function forceNewCluster(wal: Wal, opts: ForceNewClusterOptions, id: number, addr: string, members: Map<number, string>, reopen: () => Wal): Wal {
  const storage = wal.storage;
  const hs = storage.initialState().hardState;
  const commit = hs.commit;
  const sm = opts.stateMachine;
  const snap = storage.snapshot();
  const si = snapIndex(snap);
  if (si > 0) sm.restore(unwrapSnapshot(snap.data).state, si);
  for (let i = si + 1; i <= commit; ) {
    const ents = storage.entries(i, commit + 1, 16 * 1024 * 1024);
    for (const e of ents) {
      if (e.type === EntryType.ENTRY_TYPE_NORMAL && e.data.length > 0) {
        try {
          sm.apply(unwrapProposal(e.data).payload, e.index);
        } catch {}
      }
    }
    i += ents.length;
  }
  members.clear();
  members.set(id, addr);
  const conf: ConfState = { voters: [id], learners: [] };
  const term = commit > 0 ? storage.term(commit) : 0;
  const data = wrapSnapshot(members, sm.snapshot());
  const newSnap: Snapshot = { data, metadata: { index: Math.max(commit, 0), term, confState: conf } };
  if (commit === 0) {
    throw new FlotillaError('FAILED_PRECONDITION', 'raft: nothing was ever committed here; start a new cluster instead of --force-new-cluster');
  }
  wal.resetTo(newSnap, { term: hs.term, vote: 0, commit });
  wal.close();
  writeMembersFile(path.join(opts.dataDir, 'members.json'), members);
  opts.log?.warn({ id, index: commit, term: hs.term }, 'raft: forced a new one-member cluster from the local state');
  return reopen();
}
