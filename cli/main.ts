#!/usr/bin/env node
import { Command } from 'commander';
import { registerCommands } from './commands/index.js';

const program = new Command();
program
  .name('flotilla')
  .description('A Swarm-style multi-host container orchestrator')
  .version('0.1.0')
  .showHelpAfterError('(add --help for usage)')
  .configureOutput({ outputError: (str, write) => write(str.startsWith('error:') ? `flotilla: ${str.slice(7)}` : str) });

await registerCommands(program, process.argv);

await program.parseAsync(process.argv);
