#!/usr/bin/env node
import { Command } from 'commander';
import { registerCommands } from './commands/index.js';
// not ./client.js: that loads gRPC and X.509, which most commands load later only if they need them
import { type ClientTlsFlags, setClientTlsFlags } from './tlsflags.js';

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
  .configureOutput({ outputError: (str, write) => write(str.startsWith('error:') ? `flotilla: ${str.slice(7)}` : str) })
  .option('--tlsdir <dir>', 'client certificate directory for TCP hosts: ca.pem, cert.pem, key.pem (env FLOTILLA_TLS_DIR)')
  .option('--tlscacert <file>', 'root CA bundle for TCP hosts (env FLOTILLA_TLS_CACERT)')
  .option('--tlscert <file>', 'admin client certificate for TCP hosts (env FLOTILLA_TLS_CERT)')
  .option('--tlskey <file>', 'its private key (env FLOTILLA_TLS_KEY)')
  .hook('preAction', (_cmd, actionCmd) => setClientTlsFlags(actionCmd.optsWithGlobals<ClientTlsFlags>()));

await registerCommands(program, process.argv);

await program.parseAsync(process.argv);
