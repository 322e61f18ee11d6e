// Waiting in tests: bounded, with a message that says what never happened.
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** `what` may be a function, read when the wait times out (e.g. a process's stderr by then). */
export async function until(cond: () => boolean | Promise<boolean>, what: string | (() => string), ms = 5000): Promise<void> {
  for (const start = Date.now(); !(await cond()); await sleep(10)) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${typeof what === 'function' ? what() : what}`);
  }
}
