import { setMaxListeners } from 'node:events';
import type { Command } from 'commander';
import { invalidArgument } from '../../common/errors.js';
import { isValidName } from '../../common/ids.js';
import { createLogger } from '../../common/log.js';
import { resolveDataDir } from '../../common/paths.js';
import { parseKeyValue } from '../../common/units.js';
import { ipToNum } from '../../manager/allocator/ipam.js';
import { action, collect, ExitError, resolveToken } from '../util.js';
import { loadNodeTls } from '../../manager/ca/certstore.js';

function checkManager(v: string): string {
  if (!/^[^\s:/]+:\d{1,5}$/.test(v) && !/^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(v)) throw invalidArgument('--manager', v, 'expected HOST:PORT');
  const port = Number(v.slice(v.lastIndexOf(':') + 1));
  if (port < 1 || port > 65535) throw invalidArgument('--manager', v, 'the port must be 1-65535');
  return v;
}

export function register(program: Command): void {
  program
    .command('agent')
    .description('Run an agent: join the managers and run the tasks they assign to this node')
    .option('--data-dir <dir>', 'data directory (env FLOTILLA_DATA_DIR, default /var/lib/flotilla)')
    .option('--manager <addrs>', 'manager address(es), HOST:PORT[,HOST:PORT] (repeatable)', collect)
    .option('--token-file <path>', 'read the join token from this file (keeps it out of `ps`)')
    .option('--token <token>', 'join token; visible to every user in `ps`: prefer --token-file or env FLOTILLA_TOKEN')
    .option('--hostname <name>', 'node hostname (default: the host name)')
    .option('--label <K=V>', 'engine label (repeatable)', collect)
    .option('--runtime <runtime>', 'container runtime: runc or sim (simulated containers, for scale tests)', 'runc')
    .option('--advertise-addr <ip>', 'this node\'s underlay IPv4 address, the overlay tunnel endpoint other nodes reach (default: the first non-loopback IPv4 address)')
    .action(
      action(async (opts: { dataDir?: string; manager?: string[]; token?: string; tokenFile?: string; hostname?: string; label?: string[]; runtime: string; advertiseAddr?: string }) => {
        const managers = (opts.manager ?? [])
          .flatMap((m) => m.split(','))
          .map((m) => m.trim())
          .filter(Boolean)
          .map(checkManager);
        if (managers.length === 0) throw new ExitError(2, 'missing --manager HOST:PORT');
        const token = resolveToken(opts);
        // a node that joined before has its certificate and needs no token
        if (!token && !loadNodeTls(resolveDataDir(opts.dataDir))) throw new ExitError(2, 'missing --token-file (or FLOTILLA_TOKEN): use the join token printed by `flotilla cluster join-token worker -q`');
        if (opts.runtime !== 'runc' && opts.runtime !== 'sim') throw invalidArgument('--runtime', opts.runtime, 'must be runc or sim');
        if (opts.hostname !== undefined && !isValidName(opts.hostname)) {
          throw invalidArgument('--hostname', opts.hostname, 'use letters, digits, "_", "." or "-"');
        }
        if (opts.advertiseAddr !== undefined && ipToNum(opts.advertiseAddr) === undefined)
          throw invalidArgument('--advertise-addr', opts.advertiseAddr, 'expected an IPv4 address (no port)');
        const labels = Object.fromEntries((opts.label ?? []).map((l) => parseKeyValue('--label', l)));
        const dataDir = resolveDataDir(opts.dataDir);
        const log = createLogger('agent');
        const ctl = new AbortController();
        // one signal ends every loop of the daemon: many listeners on it are expected
        setMaxListeners(0, ctl.signal);
        const stop = (): void => ctl.abort();
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
        const { runAgent } = await import('../../agent/agent.js');
        try {
          await runAgent({
            dataDir,
            managers,
            token,
            hostname: opts.hostname,
            addr: opts.advertiseAddr,
            labels,
            runtime: opts.runtime,
            signal: ctl.signal,
            log,
          });
        } finally {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
        }
      }),
    );
}
