import type { Command } from 'commander';
import * as image from './image.js';
import * as container from './container.js';
import * as daemons from './daemons.js';
import * as cluster from './cluster.js';
import * as node from './node.js';
import * as service from './service.js';
import * as agent from './agent.js';

/** Each command group lives in its own module with a register(program) function. */
export function registerCommands(program: Command): void {
  for (const g of [daemons, agent, cluster, node, service, image, container]) g.register(program);
}
