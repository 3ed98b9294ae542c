/** Checks that child processes are not spawned on the main thread (see agent/runtime/spawner.ts). */

/** Samples the main thread's active handles every ms while fn runs: whether a child process was among them. */
export async function mainThreadSpawned<T>(fn: () => Promise<T>): Promise<{ value: T; sawChild: boolean }> {
  // children of earlier tests (killed, not yet reaped) must not count
  for (let i = 0; process.getActiveResourcesInfo().includes('ProcessWrap'); i++) {
    if (i > 500) throw new Error('a child process of an earlier test is still running');
    await new Promise((res) => setTimeout(res, 10));
  }
  let sawChild = false;
  const look = (): void => {
    if (process.getActiveResourcesInfo().includes('ProcessWrap')) sawChild = true;
  };
  const timer = setInterval(look, 1);
  try {
    const p = fn();
    look(); // a spawn on the main thread has its handle from the synchronous part of fn on
    const value = await p;
    return { value, sawChild };
  } finally {
    clearInterval(timer);
  }
}
