import type { Command } from 'commander';

type Group = { register(program: Command): void };

/**
 * Each command group lives in its own module with a register(program) function. Only the group the
 * command line names is loaded (start-up time matters for `container run -d`); help loads them all.
 */
const GROUPS: Record<string, () => Promise<Group>> = {
  manager: () => import('./daemons.js'),
  agent: () => import('./agent.js'),
  cluster: () => import('./cluster.js'),
  node: () => import('./node.js'),
  service: () => import('./service.js'),
  network: () => import('./network.js'),
  secret: () => import('./secret.js'),
  config: () => import('./config.js'),
  image: () => import('./image.js'),
  container: () => import('./container.js'),
  volume: () => import('./volume.js'),
};

export async function registerCommands(program: Command, argv: string[]): Promise<void> {
  program.enablePositionalOptions();
  const args = argv.slice(2);
  const first = args.find((a) => !a.startsWith('-'));
  // `flotilla --version` needs no group
  if (first === undefined && (args.includes('--version') || args.includes('-V'))) return;
  const load = first && GROUPS[first] ? [GROUPS[first]] : Object.values(GROUPS);
  for (const g of await Promise.all(load.map((f) => f()))) g.register(program);
}
