/** A proposer without durability, applying each batch on the next turn: for tests and simulations. */
import type { StoreBatch } from '../../gen/flotilla/v1/objects.js';
import type { MemoryStore, Proposer } from './store.js';

export class MemoryProposer implements Proposer {
  private index = 0;
  constructor(private readonly store: MemoryStore) {}
  async propose(batch: StoreBatch): Promise<void> {
    await Promise.resolve();
    this.store.applyBatch(batch, ++this.index);
  }
}
