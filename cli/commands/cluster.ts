import type { Command } from 'commander';
import { GetClusterResponse, GetUnlockKeyResponse, IssueClientCertificateResponse, ListNodesResponse, RotateJoinTokenResponse, RotateRootCAResponse, UpdateClusterResponse } from '../../gen/flotilla/v1/control.js';
import { readSecretLine } from '../util.js';
import { writeClientTlsDir } from '../../manager/ca/certstore.js';
import { parseDuration } from '../../common/units.js';
import { parseCertificate } from '../../manager/ca/x509.js';
import { NodeRole } from '../../gen/flotilla/v1/objects.js';
import { withControl } from '../client.js';
import { action, checkFormat, printJson, table, ExitError } from '../util.js';
import { hostOption } from './service.js';

export function register(program: Command): void {
  const cluster = program.command('cluster').description('Manage the cluster');

  hostOption(cluster.command('info').description('Display cluster-wide information').option('--format <format>', 'table or json')).action(
    action(async (opts: { host?: string; format?: string }) => {
      const format = checkFormat(opts.format);
      await withControl(opts.host, async (c) => {
        const r = await c.call<unknown, GetClusterResponse>('getCluster', {});
        const { nodes } = await c.call<unknown, ListNodesResponse>('listNodes', {});
        const hostOf = (addr: string): string =>
          nodes.find((n) => n.role === NodeRole.NODE_ROLE_MANAGER && (n.status?.addr === addr || n.description?.managerAddr === addr))?.description?.hostname ?? '';
        const managers = r.managers.map((m) => ({
          raftId: m.raftId.toString(16),
          addr: m.addr,
          hostname: hostOf(m.addr),
          leader: m.leader,
          reachability: m.reachability,
        }));
        const info = {
          id: r.cluster?.id,
          name: r.cluster?.spec?.name,
          leader: r.leaderAddr,
          store: r.store || 'raft',
          nodes: r.nodes,
          services: r.services,
          tasks: r.tasks,
          heartbeatPeriodMs: r.cluster?.spec?.heartbeatPeriodMs,
          taskHistoryLimit: r.cluster?.spec?.taskHistoryLimit,
          managers,
        };
        if (format === 'json') return printJson(info);
        process.stdout.write(
          [
            `Cluster ID:          ${info.id}`,
            `Name:                ${info.name}`,
            `Leader:              ${info.leader}`,
            `Store:               ${info.store}`,
            `Nodes:               ${info.nodes}`,
            `Services:            ${info.services}`,
            `Tasks:               ${info.tasks}`,
            `Heartbeat period:    ${(info.heartbeatPeriodMs ?? 0) / 1000}s`,
            `Task history limit:  ${info.taskHistoryLimit}`,
            `Managers:            ${managers.length}`,
          ].join('\n') + '\n',
        );
        process.stdout.write(
          table(
            ['RAFT ID', 'ADDRESS', 'HOSTNAME', 'STATUS'],
            managers.map((m) => [m.raftId, m.addr, m.hostname, m.leader ? 'Leader' : m.reachability === 'reachable' ? 'Reachable' : 'Unreachable']),
          ),
        );
      });
    }),
  );

  hostOption(
    cluster
      .command('join-token')
      .description('Show the join token for workers or managers')
      .argument('<role>', 'worker or manager')
      .option('-q, --quiet', 'only display the token')
      .option('--rotate', 'replace the token: the old one is refused for new joins (joined nodes are not affected)'),
  ).action(
    action(async (role: string, opts: { host?: string; quiet?: boolean; rotate?: boolean }) => {
      if (role !== 'worker' && role !== 'manager') throw new ExitError(1, `invalid role ${JSON.stringify(role)}: must be worker or manager`);
      await withControl(opts.host, async (c) => {
        if (opts.rotate) {
          await c.call<unknown, RotateJoinTokenResponse>('rotateJoinToken', { role });
          if (!opts.quiet) process.stdout.write(`Successfully rotated the ${role} join token.\n\n`);
        }
        const r = await c.call<unknown, GetClusterResponse>('getCluster', {});
        const token = role === 'worker' ? r.cluster?.tokens?.worker : r.cluster?.tokens?.manager;
        if (opts.quiet) return void process.stdout.write(`${token}\n`);
        const join =
          role === 'worker'
            ? `flotilla agent --manager ${r.leaderAddr} --token-file /etc/flotilla/token`
            : `flotilla manager --join ${r.leaderAddr} --token-file /etc/flotilla/token --listen-addr HOST:PORT`;
        process.stdout.write(
          `To add a ${role} to this cluster, put this token in /etc/flotilla/token (mode 0600) on the new host:\n\n    ${token}\n\n` +
            `then run the following command:\n\n    ${join}\n\n`,
        );
      });
    }),
  );

  hostOption(
    cluster
      .command('client-cert')
      .description('Write an admin client certificate for the CLI over TCP (run on a manager, over its unix socket)')
      .requiredOption('--out <dir>', 'directory to write ca.pem, cert.pem and key.pem (0600) into')
      .option('--expiry <duration>', 'certificate lifetime (default: the cluster node certificate lifetime)'),
  ).action(
    action(async (opts: { host?: string; out: string; expiry?: string }) => {
      const expiryMs = opts.expiry ? parseDuration('--expiry', opts.expiry) : 0;
      await withControl(opts.host, async (c) => {
        const r = await c.call<unknown, IssueClientCertificateResponse>('issueClientCertificate', { expiryMs });
        await writeClientTlsDir(opts.out, { trustPem: r.caPem, certPem: r.certPem, keyPem: r.keyPem });
        const id = parseCertificate(r.certPem);
        process.stdout.write(`wrote ${opts.out}/{ca,cert,key}.pem (admin certificate ${id.nodeId}, expires ${id.notAfter.toISOString()})\n`);
        process.stdout.write(`use it with: flotilla --tlsdir ${opts.out} -H MANAGER:PORT ...  (or FLOTILLA_TLS_DIR=${opts.out})\n`);
      });
    }),
  );

  hostOption(
    cluster
      .command('update')
      .description('Update cluster-wide settings')
      .option('--autolock <bool>', 'true: managers start locked after a restart until `flotilla cluster unlock`; false: off'),
  ).action(
    action(async (opts: { host?: string; autolock?: string }) => {
      if (opts.autolock === undefined) throw new ExitError(1, 'nothing to update: give --autolock=true|false');
      if (opts.autolock !== 'true' && opts.autolock !== 'false') throw new ExitError(1, `invalid --autolock ${JSON.stringify(opts.autolock)}: must be true or false`);
      await withControl(opts.host, async (c) => {
        const r = await c.call<unknown, UpdateClusterResponse>('updateCluster', { autolock: opts.autolock, rotateUnlockKey: false });
        if (r.unlockKey) process.stdout.write(unlockKeyText(r.unlockKey));
        else process.stdout.write('autolock is off\n');
      });
    }),
  );

  hostOption(
    cluster
      .command('ca')
      .description('Show the root CA rotation status, or --rotate: replace the root CA (every node moves to a new root; then the old root is refused)')
      .option('--rotate', 'start a root CA rotation and wait until every node holds a certificate from the new root')
      .option('--timeout <duration>', 'how long --rotate waits (default 5m)'),
  ).action(
    action(async (opts: { host?: string; rotate?: boolean; timeout?: string }) => {
      const timeoutMs = opts.timeout ? parseDuration('--timeout', opts.timeout) : 5 * 60_000;
      await withControl(opts.host, async (c) => {
        let st = await c.call<unknown, RotateRootCAResponse>('rotateRootCa', { start: !!opts.rotate });
        if (!opts.rotate) {
          process.stdout.write(`root CA: ${st.root}\n`);
          process.stdout.write(st.inProgress ? `rotation in progress: ${st.nodes - st.pendingNodes.length}/${st.nodes} nodes on the new root\n` : 'no rotation in progress\n');
          return;
        }
        process.stdout.write(`CA rotation started: new root ${st.root}; nodes trust both roots and renew from the new one\n`);
        const deadline = Date.now() + timeoutMs;
        let last = '';
        for (;;) {
          const line = st.inProgress ? `${st.nodes - st.pendingNodes.length}/${st.nodes} nodes hold a certificate from the new root` : '';
          if (line && line !== last) process.stdout.write(`${line}\n`);
          last = line;
          if (!st.inProgress) break;
          if (Date.now() > deadline) {
            const { nodes } = await c.call<unknown, ListNodesResponse>('listNodes', {});
            const names = st.pendingNodes.map((id) => nodes.find((n) => n.id === id)?.description?.hostname || id);
            throw new ExitError(
              1,
              st.pendingNodes.length > 0
                ? `CA rotation not finished after ${opts.timeout ?? '5m'}: waiting for ${names.join(', ')} to renew from the new root (it goes on in the background; check with flotilla cluster ca)`
                : `CA rotation not finished after ${opts.timeout ?? '5m'}: every node is on the new root but the leader has not dropped the old one yet (check with flotilla cluster ca)`,
            );
          }
          await new Promise((r) => setTimeout(r, 500));
          st = await c.call<unknown, RotateRootCAResponse>('rotateRootCa', { start: false });
        }
        process.stdout.write(`CA rotation complete: every node holds a certificate from ${st.root}; the old root is no longer trusted\n`);
      });
    }),
  );

  hostOption(
    cluster
      .command('unlock-key')
      .description('Show (or --rotate) the key that unlocks a restarted manager when autolock is on')
      .option('-q, --quiet', 'only display the key')
      .option('--rotate', 'replace the unlock key (managers that are down keep needing the old one)'),
  ).action(
    action(async (opts: { host?: string; quiet?: boolean; rotate?: boolean }) => {
      await withControl(opts.host, async (c) => {
        const key = opts.rotate
          ? (await c.call<unknown, UpdateClusterResponse>('updateCluster', { autolock: '', rotateUnlockKey: true })).unlockKey
          : (await c.call<unknown, GetUnlockKeyResponse>('getUnlockKey', {})).unlockKey;
        if (!key) throw new ExitError(1, 'autolock is off: there is no unlock key (flotilla cluster update --autolock=true)');
        process.stdout.write(opts.quiet ? `${key}\n` : unlockKeyText(key));
      });
    }),
  );

  hostOption(
    cluster.command('unlock').description('Unlock a manager started with autolock on: reads the unlock key from the terminal or stdin (never from the command line)'),
  ).action(
    action(async (opts: { host?: string }) => {
      const key = await readSecretLine('Enter the unlock key: ');
      if (!key) throw new ExitError(1, 'no unlock key given (type it at the prompt or pipe it on stdin)');
      await withControl(opts.host, async (c) => {
        await c.call<unknown, unknown>('unlockManager', { unlockKey: key });
      });
      process.stdout.write('manager unlocked\n');
    }),
  );
}

function unlockKeyText(key: string): string {
  return (
    `To unlock a manager that restarts while autolock is on, run \`flotilla cluster unlock\` on its host and enter this key:\n\n    ${key}\n\n` +
    'Keep it safe: without it a restarted manager cannot read its own state. A manager that was down when the key was rotated needs the key from before.\n'
  );
}
