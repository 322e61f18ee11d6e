// Waiting in tests: bounded, with a message that says what never happened.
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function until(cond: () => boolean | Promise<boolean>, what: string, ms = 5000): Promise<void> {
  for (const start = Date.now(); !(await cond()); await sleep(10)) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`);
  }
}
