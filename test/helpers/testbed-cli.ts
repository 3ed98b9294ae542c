/**
 * The test bed from the shell (deploy/testbed.sh runs the compiled dist/test/helpers/testbed-cli.js):
 *
 *   up [HOSTS] [--managers N] [--no-busybox]   make a bed of HOSTS hosts (default 3, 1 manager), print its run id
 *   down [RUNID...]                            destroy the given beds (default: the manual ones and those of dead tests)
 *   ls                                         list the beds on this machine
 */
import { CLI, Testbed } from './testbed.js';
import { importBusybox } from './busybox.js';

function usage(): never {
  process.stderr.write('usage: testbed up [HOSTS] [--managers N] [--no-busybox] | down [RUNID...] | ls\n');
  process.exit(2);
}

async function up(args: string[]): Promise<void> {
  let hosts = 3;
  let managers = 1;
  let busybox = true;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--managers') managers = Number(args[++i]);
    else if (a === '--no-busybox') busybox = false;
    else if (/^\d+$/.test(a)) hosts = Number(a);
    else usage();
  }
  if (!Number.isInteger(managers) || managers < 1 || managers > hosts) {
    process.stderr.write(`invalid --managers ${managers}: 1 to HOSTS (${hosts})\n`);
    process.exit(2);
  }
  const ctl = new AbortController();
  process.once('SIGINT', () => ctl.abort());
  const bed = await Testbed.create({
    managers,
    agents: hosts - managers,
    manual: true,
    signal: ctl.signal,
    heartbeat: '1s',
    prepareHost: busybox ? (h) => importBusybox(h.dataDir) : undefined,
    log: (m) => process.stderr.write(`${m}\n`),
  });
  const m = bed.hosts[0]!;
  const lines = [
    `test bed ${bed.runId}: ${bed.hosts.length} hosts on ${bed.state.subnet}.0/24 (underlay netns ${bed.state.underlay})`,
    ...bed.hosts.map((h) => `  ${h.name}  ${h.role.padEnd(7)}  ${h.ip.padEnd(15)}  netns ${h.netns}  data ${h.dataDir}  pid ${h.pid}`),
    '',
    'CLI against the cluster (from the root namespace, over the control socket):',
    `  export FLOTILLA_HOST=unix://${m.socket}`,
    `  node ${CLI} node ls`,
    `  node ${CLI} service create --name web --replicas 3 --network host busybox:latest sleep 1000`,
    'A command inside host N (network namespace only; mounts and cgroups stay the machine\'s):',
    `  nsenter --net=/run/netns/${bed.hosts[bed.hosts.length - 1]!.netns} ip addr`,
    `  nsenter --net=/run/netns/${bed.hosts[bed.hosts.length - 1]!.netns} node ${CLI} container ls --data-dir ${bed.hosts[bed.hosts.length - 1]!.dataDir}`,
    `Daemon output: ${bed.root}/hN.log`,
    `Tear down: bash deploy/testbed.sh down ${bed.runId}`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

async function down(ids: string[]): Promise<number> {
  if (ids.length === 0) {
    // every manual bed, and beds whose test process died; not the bed of a test that is running
    await Testbed.sweep((m) => process.stderr.write(`${m}\n`), { manual: true });
    const left = Testbed.runs();
    if (left.length) process.stdout.write(`still here (a running test's, or see above): ${left.join(', ')}\n`);
    return 0;
  }
  const runs = ids;
  let bad = 0;
  for (const id of runs) {
    let bed: Testbed;
    try {
      bed = Testbed.attach(id, { log: (m) => process.stderr.write(`${id}: ${m}\n`) });
    } catch (err) {
      process.stderr.write(`${id}: no state file (${(err as Error).message}); remove its namespaces by hand: ip netns list | grep fl-${id}-\n`);
      bad++;
      continue;
    }
    const problems = await bed.destroy();
    const left = bed.leftovers();
    if (left.length) bad++;
    process.stdout.write(`${id}: ${left.length ? `left behind: ${left.join('; ')}` : problems.length ? 'destroyed (after the problems above)' : 'destroyed'}\n`);
  }
  return bad ? 1 : 0;
}

const [cmd, ...rest] = process.argv.slice(2);
if (cmd === 'up') await up(rest);
else if (cmd === 'down') process.exitCode = await down(rest);
else if (cmd === 'ls') process.stdout.write(Testbed.runs().map((id) => `${id}\n`).join(''));
else usage();
