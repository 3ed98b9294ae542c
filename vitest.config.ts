import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['**/*.test.ts'],
    exclude: ['node_modules/**', 'dist/**'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Real processes, mounts and cgroups: keep files sequential to stay within 2 cores.
    fileParallelism: false,
    pool: 'forks',
  },
});
