import { defineConfig } from 'vitest/config';

/**
 * Test files that touch nothing of the host but temporary directories and loopback ports: unit tests,
 * and processes with the sim runtime or etcd on 127.0.0.1:0. They run in their own lane, beside the
 * host lane (runc, mounts, cgroups, network namespaces, nftables, registries), one file at a time in
 * each lane (scripts/test.mjs starts both). A new test file lands in the host lane unless named here.
 */
export const LOOPBACK = [
  'manager/**/*.test.ts',
  'cli/**/*.test.ts',
  'common/**/*.test.ts',
  'test/updates.test.ts',
  'test/control-plane.test.ts',
  'test/security.test.ts',
  'test/etcd-store.test.ts',
  'test/networks-manager.test.ts',
  'test/managers-ha.test.ts',
  'test/networks-ha.test.ts',
  'test/ca-rotation.test.ts',
  'test/limits.test.ts',
  'test/raft-processes.test.ts',
  'test/events-ha.test.ts',
  'test/cli-startup.test.ts',
];

export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Real processes, mounts and cgroups: one file at a time per lane, to stay within 2 cores.
    fileParallelism: false,
    pool: 'forks',
    projects: [
      { extends: true, test: { name: 'loopback', include: LOOPBACK } },
      { extends: true, test: { name: 'host', include: ['**/*.test.ts'], exclude: ['node_modules/**', 'dist/**', ...LOOPBACK] } },
    ],
  },
});
