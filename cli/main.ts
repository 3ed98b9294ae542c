#!/usr/bin/env node
import { Command } from 'commander';
import { registerCommands } from './commands/index.js';

// `flotilla ... | head`: a closed pipe ends the command quietly
for (const out of [process.stdout, process.stderr]) {
  out.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw err;
  });
}

const program = new Command();
program
  .name('flotilla')
  .description('A Swarm-style multi-host container orchestrator')
  .version('0.1.0')
  .showHelpAfterError('(add --help for usage)')
  .configureOutput({ outputError: (str, write) => write(str.startsWith('error:') ? `flotilla: ${str.slice(7)}` : str) });

await registerCommands(program, process.argv);

await program.parseAsync(process.argv);
