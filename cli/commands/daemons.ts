import { setMaxListeners } from 'node:events';
import type { Command } from 'commander';
import { resolveDataDir } from '../../common/paths.js';
import { createLogger } from '../../common/log.js';
import { parseDuration } from '../../common/units.js';
import { isValidName } from '../../common/ids.js';
import { invalidArgument } from '../../common/errors.js';
import { Manager, defaultHostname } from '../../manager/manager.js';
import { DEFAULT_CONTROL_SOCKET } from '../client.js';
import { action, collect, ExitError, resolveToken } from '../util.js';
import { parseKeyValue } from '../../common/units.js';
import { MIN_CERT_EXPIRY_MS } from '../../manager/ca/x509.js';
import { type EtcdFlags, parseEtcdFlags } from '../../manager/etcd/mode.js';

import { checkPool, DEFAULT_ADDR_POOL, DEFAULT_POOL_MASK_LENGTH } from '../../manager/allocator/ipam.js';

function checkAddr(flag: string, v: string): string {
  if (!/^[^\s:]*:\d{1,5}$/.test(v) && !/^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(v)) throw invalidArgument(flag, v, 'expected HOST:PORT');
  return v;
}

/** --cert-expiry: one number and unit, d/h/m/s (a certificate lives up to years: past parseDuration's range). */
function parseCertExpiry(v: string): number {
  const m = /^(\d+)(d|h|m|s)$/.exec(v.trim());
  if (!m) throw invalidArgument('--cert-expiry', v, 'expected a number and a unit: d, h, m or s (e.g. 90d, 5m)');
  const ms = Number(m[1]) * { d: 86_400_000, h: 3_600_000, m: 60_000, s: 1000 }[m[2] as 'd' | 'h' | 'm' | 's'];
  if (ms > 20 * 365 * 86_400_000) throw invalidArgument('--cert-expiry', v, 'must be shorter than the root CA (20 years)');
  return ms;
}

export function register(program: Command): void {
  program
    .command('manager')
    .description('Run a manager (and, unless --no-agent, an agent in the same process)')
    .option('--data-dir <dir>', 'data directory (env FLOTILLA_DATA_DIR, default /var/lib/flotilla)')
    .option('--hostname <name>', 'node hostname (default: the host name)')
    .option('--listen-addr <addr>', 'HOST:PORT for managers and agents', '0.0.0.0:4242')
    .option('--advertise-addr <addr>', 'HOST:PORT other nodes use to reach this manager')
    .option('--control-socket <path>', 'unix socket for the control API ("" to disable)', DEFAULT_CONTROL_SOCKET)
    .option('--no-agent', 'do not run an agent in this process')
    .option('--runtime <runtime>', 'runtime of the in-process agent: runc or sim', 'runc')
    .option('--label <K=V>', 'engine label of the in-process agent (repeatable)', collect)
    .option('--heartbeat-period <duration>', 'agent heartbeat period for a new cluster', '5s')
    .option('--join <addr>', 'join the cluster of the manager at HOST:PORT (needs the manager join token: --token-file or FLOTILLA_TOKEN)')
    .option('--token-file <path>', 'read the manager join token from this file, with --join (keeps it out of `ps`)')
    .option('--token <token>', 'the manager join token, with --join; visible to every user in `ps`: prefer --token-file or env FLOTILLA_TOKEN')
    .option('--autolock', 'a new cluster starts with autolock: a restarted manager stays locked until `flotilla cluster unlock` (see `flotilla cluster unlock-key`)')
    .option('--cert-expiry <duration>', 'node certificate lifetime, for a new cluster (e.g. 90d, 12h, 5m; at least 30s)', '90d')
    .option('--force-new-cluster', 'restart this manager as a new one-manager cluster with all its state (quorum loss recovery)')
    .option('--default-addr-pool <cidr>', 'a new cluster\'s address pool for overlay network subnets (default 10.0.0.0/8)')
    .option('--default-addr-pool-mask-length <n>', 'prefix length of the subnets taken from the pool (default 24)')
    .option('--store <kind>', 'the managers\' store, chosen by a cluster\'s first manager: raft (built in) or etcd (docs/store.md)', 'raft')
    .option('--etcd-endpoints <urls>', 'with --store etcd: comma-separated etcd client URLs (https://h1:2379,...)')
    .option('--etcd-prefix <path>', 'with --store etcd: the cluster\'s key prefix (default /flotilla/default)')
    .option('--etcd-cacert <file>', 'with --store etcd: CA bundle that verifies etcd\'s certificate')
    .option('--etcd-cert <file>', 'with --store etcd: client certificate for etcd')
    .option('--etcd-key <file>', 'with --store etcd: client key for etcd')
    .option('--etcd-lease-ttl <seconds>', 'with --store etcd: leader election lease TTL (default 10)')
    .action(
      action(
        async (opts: {
          dataDir?: string;
          hostname?: string;
          listenAddr: string;
          advertiseAddr?: string;
          controlSocket: string;
          agent: boolean;
          runtime: string;
          label?: string[];
          heartbeatPeriod: string;
          join?: string;
          token?: string;
          tokenFile?: string;
          forceNewCluster?: boolean;
          defaultAddrPool?: string;
          defaultAddrPoolMaskLength?: string;
          autolock?: boolean;
          certExpiry: string;
        } & EtcdFlags) => {
          const etcd = parseEtcdFlags(opts);
          if (etcd && opts.forceNewCluster) throw invalidArgument('--force-new-cluster', true, 'not with --store etcd (etcd keeps the state; restart the managers)');
          const certExpiryMs = parseCertExpiry(opts.certExpiry);
          if (certExpiryMs < MIN_CERT_EXPIRY_MS) throw invalidArgument('--cert-expiry', opts.certExpiry, 'must be at least 30s');
          let pool: { pool: string; mask: number } | undefined;
          if (opts.defaultAddrPool !== undefined || opts.defaultAddrPoolMaskLength !== undefined) {
            if (opts.join) throw invalidArgument('--default-addr-pool', opts.defaultAddrPool ?? '', 'only for the first manager (a joining manager gets the cluster\'s)');
            const p = opts.defaultAddrPool ?? DEFAULT_ADDR_POOL;
            const m = opts.defaultAddrPoolMaskLength;
            if (m !== undefined && !/^\d{1,2}$/.test(m)) throw invalidArgument('--default-addr-pool-mask-length', m, 'not a number');
            const checked = checkPool(p, m !== undefined ? Number(m) : DEFAULT_POOL_MASK_LENGTH);
            pool = { pool: p, mask: checked.maskLength };
          }
          const token = opts.join ? resolveToken(opts) : '';
          if (opts.join) {
            checkAddr('--join', opts.join);
            if (!token) throw invalidArgument('--token-file', '', 'required with --join (the manager join token: flotilla cluster join-token manager -q), or FLOTILLA_TOKEN');
          }
          if (opts.join && opts.autolock) throw invalidArgument('--autolock', true, 'applies to a new cluster only (for an existing one: flotilla cluster update --autolock=true)');
          if (opts.join && opts.forceNewCluster) throw invalidArgument('--force-new-cluster', true, 'cannot be combined with --join');
          checkAddr('--listen-addr', opts.listenAddr);
          if (opts.advertiseAddr) checkAddr('--advertise-addr', opts.advertiseAddr);
          if (opts.runtime !== 'runc' && opts.runtime !== 'sim') throw invalidArgument('--runtime', opts.runtime, 'must be runc or sim');
          const hostname = opts.hostname ?? defaultHostname();
          if (!isValidName(hostname)) throw invalidArgument('--hostname', hostname, 'use letters, digits, "_", "." or "-"');
          const heartbeatMs = parseDuration('--heartbeat-period', opts.heartbeatPeriod);
          const labels = Object.fromEntries((opts.label ?? []).map((l) => parseKeyValue('--label', l)));
          const dataDir = resolveDataDir(opts.dataDir);
          const log = createLogger('manager');
          const ctl = new AbortController();
          // one signal ends every loop of the daemon: many listeners on it are expected
          setMaxListeners(0, ctl.signal);
          const stop = (): void => ctl.abort();
          process.once('SIGINT', stop);
          process.once('SIGTERM', stop);
          const manager = new Manager({
            dataDir,
            hostname,
            listenAddr: opts.listenAddr,
            advertiseAddr: opts.advertiseAddr,
            controlSocket: opts.controlSocket,
            heartbeatMs,
            join: opts.join,
            token,
            forceNewCluster: opts.forceNewCluster,
            defaultAddrPool: pool?.pool,
            defaultAddrPoolMaskLength: pool?.mask,
            certExpiryMs,
            etcd,
            registerNode: !opts.agent,
            autolock: opts.autolock,
            onLocked: () => process.stdout.write(`flotilla manager locked (autolock): run \`flotilla cluster unlock\` (control socket unix://${opts.controlSocket})\n`),
            log,
            signal: ctl.signal,
          });
          try {
            await manager.start();
          } catch (err) {
            // SIGTERM while locked (autolock) or starting: a clean stop, not a failure
            if (ctl.signal.aborted) return;
            throw err;
          }
          process.stdout.write(
            `flotilla manager ready: listening on ${manager.advertiseAddr()}${opts.controlSocket ? `, control socket unix://${opts.controlSocket}` : ''}\n`,
          );
          let agentRun: Promise<void> = Promise.resolve();
          if (opts.agent) {
            const { runAgent } = await import('../../agent/agent.js');
            agentRun = runAgent({
              dataDir,
              // this manager first, then every other manager (a follower's dispatcher sends agents on)
              managers: [manager.advertiseAddr(), ...((manager.etcd ?? manager.raft)?.members().map((m) => m.addr) ?? []), ...(opts.join ? [opts.join] : [])].filter(
                (a, i, all) => all.indexOf(a) === i,
              ),
              addr: manager.advertiseAddr(),
              managerAddr: manager.advertiseAddr(),
              token: '',
              // the manager's own certificate: the in-process agent is the manager's node
              tls: manager.tls,
              hostname,
              labels,
              runtime: opts.runtime as 'runc' | 'sim',
              signal: ctl.signal,
              log: log.child({ component: 'agent' }),
            }).catch((err: unknown) => {
              log.error({ err: (err as Error).message }, 'in-process agent failed');
              process.exitCode = 1;
              ctl.abort();
            });
          }
          const stopped = new Promise<void>((resolve) => ctl.signal.addEventListener('abort', () => resolve(), { once: true }));
          const fatal = await Promise.race([stopped.then(() => undefined), manager.failed]);
          if (fatal) {
            // a fatal Raft or storage error (e.g. the disk is full): stop the agent and the manager,
            // then exit non-zero with one line, so that a supervisor restarts the manager; a stuck
            // shutdown does not keep the process alive
            setTimeout(() => {
              process.stderr.write(`flotilla: ${fatal.message}: exiting\n`);
              process.exit(1);
            }, 5000).unref();
            ctl.abort();
            await agentRun;
            await manager.stop().catch(() => {});
            throw new ExitError(1, `${fatal.message}: exiting`);
          }
          await agentRun;
          await manager.stop();
        },
      ),
    );
}
