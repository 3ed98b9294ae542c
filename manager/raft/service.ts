/**
 * The Raft gRPC service's server side: messages from peers, Join/Leave, and proposals and read
 * index requests forwarded by followers, each handed to the node that runs on the server.
 */
import type * as grpc from '@grpc/grpc-js';
import { FlotillaError } from '../../common/errors.js';
import type { Logger } from '../../common/log.js';
import type { JoinRaftRequest, JoinRaftResponse } from '../../gen/flotilla/v1/raft.js';
import type { RawNode } from './core.js';
import { addRaftService } from './transport.js';
import type { AuthzOptions } from '../ca/authz.js';

/** What the service calls on the node. */
export interface RaftServiceTarget {
  handleMessage(m: Parameters<RawNode['step']>[0]): void;
  handleJoin(req: JoinRaftRequest, signal: AbortSignal): Promise<JoinRaftResponse>;
  propose(data: Uint8Array, signal?: AbortSignal): Promise<void>;
  readIndexRaw(signal?: AbortSignal): Promise<number>;
  removeMember(id: number, opts: { force?: boolean; signal?: AbortSignal }): Promise<void>;
}

/** The node that currently serves a server's Raft service (none while it starts). */
export interface ServiceRef {
  node?: RaftServiceTarget;
}

const SERVER_HANDLERS = new WeakMap<grpc.Server, ServiceRef>();

/**
 * Register the Raft service on server, once: a later node on the same server (a demoted manager
 * promoted again) takes over the same handlers. Set ref.node once the node runs.
 */
export function attachRaftService(server: grpc.Server, log: Logger | undefined, authz?: AuthzOptions): ServiceRef {
  const known = SERVER_HANDLERS.get(server);
  if (known) {
    known.node = undefined;
    return known;
  }
  const ref: ServiceRef = {};
  const node = (): RaftServiceTarget => {
    if (!ref.node) throw new FlotillaError('UNAVAILABLE', 'raft node is starting');
    return ref.node;
  };
  addRaftService(
    server,
    {
      onMessage(m) {
        ref.node?.handleMessage(m);
      },
      async join(req, signal) {
        return node().handleJoin(req, signal);
      },
      async propose(data, signal) {
        await node().propose(data, signal);
      },
      async readIndex(signal) {
        return node().readIndexRaw(signal);
      },
      async leave(req, signal) {
        await node().removeMember(req.raftId, { force: req.force, signal });
      },
    },
    log,
    authz,
  );
  SERVER_HANDLERS.set(server, ref);
  return ref;
}
