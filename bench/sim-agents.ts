/**
 * Many simulated agents in one process, for the scale benchmark: runAgent() N times with the sim
 * runtime (each its own in-memory SimRuntime, data dir and hostname), until SIGTERM/SIGINT.
 *
 *   node dist/bench/sim-agents.js --manager HOST:PORT --token TOKEN --count 125 --prefix sim-0- --data-dir DIR
 *
 * Prints "registered HOSTNAME" once per agent's first registration, "failed HOSTNAME: why" when an
 * agent stops with an error, and "running UNIX_MS N" (N: simulated containers running over all its
 * agents) every 250 ms when N changed. Resources reported per node: 8 CPUs, 32 GiB.
 */
import path from 'node:path';
import { parseArgs } from 'node:util';
import { runAgent } from '../agent/agent.js';
import { SimRuntime } from '../agent/worker/sim.js';
import { createLogger } from '../common/log.js';

const { values } = parseArgs({
  options: {
    manager: { type: 'string' },
    token: { type: 'string' },
    count: { type: 'string', default: '125' },
    prefix: { type: 'string', default: 'sim-' },
    'data-dir': { type: 'string' },
  },
});
if (!values.manager || !values.token || !values['data-dir']) {
  process.stderr.write('usage: sim-agents --manager HOST:PORT --token TOKEN --data-dir DIR [--count N] [--prefix P]\n');
  process.exit(2);
}
const count = Number(values.count);
const ctl = new AbortController();
process.once('SIGTERM', () => ctl.abort());
process.once('SIGINT', () => ctl.abort());
const log = createLogger('sim-agents');

const runtimes: SimRuntime[] = [];
let lastRunning = -1;
const counter = setInterval(() => {
  void Promise.all(runtimes.map(async (rt) => (await rt.list()).filter((c) => c.status === 'running').length)).then((ns) => {
    const n = ns.reduce((a, b) => a + b, 0);
    if (n !== lastRunning) process.stdout.write(`running ${Date.now()} ${n}\n`);
    lastRunning = n;
  });
}, 250);
ctl.signal.addEventListener('abort', () => clearInterval(counter), { once: true });

// Joins are admitted a few at a time: a real agent joins from its own machine, and 125 concurrent
// joins in one process only queue behind each other's key generation and TLS handshakes (the
// libuv thread pool and this one event loop) until their deadlines pass and they retry.
const JOIN_SLOTS = Number(process.env.SIM_JOIN_CONCURRENCY ?? 16);
let slots = JOIN_SLOTS;
const queue: Array<() => void> = [];
const acquire = (): Promise<void> => (slots > 0 ? (slots--, Promise.resolve()) : new Promise((r) => queue.push(r)));
const release = (): void => {
  const next = queue.shift();
  if (next) next();
  else slots++;
};

const runs = Array.from({ length: count }, async (_, i) => {
  const hostname = `${values.prefix}${String(i).padStart(4, '0')}`;
  const rt = SimRuntime.memory();
  runtimes.push(rt);
  let first = true;
  let held = true;
  const done = (): void => {
    if (held) release();
    held = false;
  };
  await acquire();
  try {
    await runAgent({
      dataDir: path.join(values['data-dir']!, hostname),
      managers: [values.manager!],
      token: values.token!,
      hostname,
      runtime: 'sim',
      runtimeInstance: rt,
      addr: '127.0.0.1',
      resources: { nanoCpus: 8e9, memoryBytes: 32 * 1024 ** 3 },
      signal: ctl.signal,
      log: log.child({ hostname }),
      onRegistered: () => {
        if (first) process.stdout.write(`registered ${hostname}\n`);
        first = false;
        done();
      },
    });
  } catch (err) {
    process.stdout.write(`failed ${hostname}: ${(err as Error).message}\n`);
  } finally {
    done();
  }
});
await Promise.all(runs);
