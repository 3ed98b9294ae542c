/**
 * Service discovery on one node: the resolver (resolver.ts) and the VIP tables (vip.ts) driven together
 * from the node's NetworkViews. The data plane calls:
 *
 *   const d = new Discovery(opts);
 *   d.setViews(views)                           on every view change (after the bridges exist or are made)
 *   d.resolvConf(networkIds)                    the container's /etc/resolv.conf (before it starts)
 *   await d.attachTask(taskId, netns, netIds)   once the task's netns is attached to its networks
 *   d.adoptTask(taskId, netns, netIds)          tasks found attached at agent start (tables kept until setViews)
 *   await d.detachTask(taskId)                  before the netns is removed
 *   await d.close()                             agent shutdown (containers keep their VIP tables)
 */
import type { NetworkView } from '../../gen/flotilla/v1/dispatcher.js';
import { Resolver, resolvConf, type ResolverOptions } from './resolver.js';
import { VipBalancer, type VipOptions } from './vip.js';

export interface DiscoveryOptions {
  resolver?: ResolverOptions;
  vip?: VipOptions;
  log?: (msg: string) => void;
}

export class Discovery {
  readonly resolver: Resolver;
  readonly vip: VipBalancer;
  private views: NetworkView[] = [];
  private readonly log: (msg: string) => void;

  constructor(o: DiscoveryOptions = {}) {
    this.log = o.log ?? (() => undefined);
    this.resolver = new Resolver({ log: this.log, ...o.resolver });
    this.vip = new VipBalancer({ log: this.log, ...o.vip });
  }

  /**
   * New views: DNS answers change at once (synchronously); the VIP tables of every attached container are
   * replaced, each in one nft transaction. Resolves when all tables are in; failures are logged and
   * returned (one line each), never thrown: a container whose netns went away must not stop the others.
   */
  async setViews(views: NetworkView[]): Promise<string[]> {
    this.views = views;
    this.resolver.setViews(views);
    try {
      await this.vip.update(views);
      return [];
    } catch (err) {
      const msg = (err as Error).message;
      this.log(msg);
      return [msg];
    }
  }

  /** The /etc/resolv.conf of a container on these networks: their gateways, where the resolver answers. */
  resolvConf(networkIds: string[]): string {
    const ids = new Set(networkIds);
    return resolvConf(this.views.filter((v) => v.network && ids.has(v.network.id)));
  }

  /** Installs the VIP table in the task's netns (path) for its networks. */
  async attachTask(taskId: string, netns: string, networkIds: string[]): Promise<void> {
    await this.vip.attach(taskId, netns, networkIds, this.views);
  }

  /** A task attached by an earlier agent process: its VIP table is kept until the next setViews(). */
  adoptTask(taskId: string, netns: string, networkIds: string[]): void {
    this.vip.adopt(taskId, netns, networkIds);
  }

  async detachTask(taskId: string): Promise<void> {
    await this.vip.detach(taskId);
  }

  async close(): Promise<void> {
    await this.resolver.close();
  }
}
