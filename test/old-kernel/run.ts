// `node dist/test/old-kernel/run.js [test files...]`: the old-kernel check by hand (see README,
// Compatibility). Without arguments it runs the same set as test/old-kernel.test.ts.
import { GUEST_SUITE, NOT_APPLICABLE_ON_6_1 } from './suite.js';
import { HarnessError, runOnOldKernel } from './harness.js';

const argv = process.argv.slice(2);
const command = argv[0] === '--sh' ? argv[1] : undefined;
const files = command !== undefined ? [] : argv.length ? argv : GUEST_SUITE;
const totalTimeoutMs = 1_800_000;
try {
  const r = await runOnOldKernel({
    files,
    ...(command !== undefined ? { command } : {}),
    notApplicable: NOT_APPLICABLE_ON_6_1.map((n) => n.name),
    totalTimeoutMs,
    onConsole: (l) => process.stdout.write(`guest| ${l}\n`),
  });
  const byFile = new Map<string, { pass: number; fail: number; skip: number }>();
  for (const t of r.tests) {
    const c = byFile.get(t.file) ?? { pass: 0, fail: 0, skip: 0 };
    c[t.result]++;
    byFile.set(t.file, c);
  }
  console.log(
    `\n${r.kernelPackage} (${r.release}): boot ${r.bootSeconds.toFixed(1)} s guest / ${r.bootWallSeconds.toFixed(1)} s wall, prepare ${r.prepareSeconds.toFixed(1)} s, total ${r.wallSeconds.toFixed(1)} s, node --test exit ${r.exitCode}`,
  );
  for (const [file, c] of byFile) console.log(`  ${file}: ${c.pass} passed, ${c.fail} failed, ${c.skip} skipped`);
  for (const t of r.tests.filter((t) => t.result !== 'pass'))
    console.log(`  ${t.result}: ${t.file} › ${t.name}${t.skip ? ` (${t.skip})` : ''}${t.error ? `: ${t.error}` : ''}`);
  process.exitCode = r.exitCode === 0 && r.tests.every((t) => t.result !== 'fail') ? 0 : 1;
} catch (e) {
  console.error(e instanceof HarnessError ? e.message : e);
  process.exitCode = 2;
}
