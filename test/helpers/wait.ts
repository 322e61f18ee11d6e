// Waiting in tests: bounded, with a message that says what never happened.
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A slower machine stretches every bounded wait by TEST_TIME_SCALE (the old-kernel guest runs
 * under QEMU's TCG emulation, several times slower: test/old-kernel/harness.ts sets it). */
export const TIME_SCALE = Math.max(1, Number(process.env.TEST_TIME_SCALE) || 1);
export const scaled = (ms: number): number => ms * TIME_SCALE;

/** `what` may be a function, read when the wait times out (e.g. a process's stderr by then).
 * `everyMs` spaces the checks (a costly check would load the machine it measures). */
export async function until(
  cond: () => boolean | Promise<boolean>,
  what: string | (() => string),
  ms = 5000,
  everyMs = 10,
): Promise<void> {
  for (const start = Date.now(); !(await cond()); await sleep(everyMs)) {
    if (Date.now() - start > ms * TIME_SCALE)
      throw new Error(`timed out waiting for ${typeof what === 'function' ? what() : what}`);
  }
}
