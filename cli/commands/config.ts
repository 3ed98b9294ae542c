import type { Command } from 'commander';
import { registerObjectCommands } from '../secrets.js';
import { hostOption } from './service.js';

export function register(program: Command): void {
  registerObjectCommands(program, 'config', hostOption);
}
