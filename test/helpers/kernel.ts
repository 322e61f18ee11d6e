// Preconditions of kernel tests (see test/README.md): root, bpffs, netns. Without them a
// test skips on a developer machine and fails in CI (CI=true), so a green run means the datapath ran.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { statfsSync } from 'node:fs';
import { release } from 'node:os';
import { chooseModes, probeKernel, type Steering } from '../../bpf/src/index.js';

const BPF_FS_MAGIC = 0xcafe4a11;

function missingPrerequisite(): string | undefined {
  if (process.getuid?.() !== 0) return 'kernel tests need root';
  try {
    if (statfsSync('/sys/fs/bpf').type !== BPF_FS_MAGIC) return 'no bpffs at /sys/fs/bpf (run scripts/setup.sh)';
  } catch {
    return 'no /sys/fs/bpf';
  }
  try {
    execFileSync('ip', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'iproute2 (ip) is not installed';
  }
  return undefined;
}

/** What a test needs beyond the tc fallback and sk_lookup steering (kernels before 6.6). */
export interface KernelNeeds {
  /** The test's full name, as the old-kernel harness lists it (test/old-kernel/suite.ts). */
  name: string;
  tcx?: boolean;
  steering?: Steering;
  /** tc programs that read the cookie of their netns (kernel-features.ts, tcNetnsCookie). */
  tcNetnsCookie?: boolean;
}

/** What this kernel can do, probed as the agent probes it (where kernel tests can run at all). */
const KERNEL = missingPrerequisite() === undefined ? await probeKernel() : undefined;
const MODES = KERNEL ? chooseModes(KERNEL.features, { attachMode: 'auto', steering: 'auto' }) : undefined;
/** The steering the agent picks on this kernel by default. */
export const KERNEL_STEERING: Steering = MODES?.steering ?? 'sk-assign';
/** Does this kernel have tcx links (6.6+)? */
export const KERNEL_HAS_TCX = KERNEL?.features.tcx ?? false;
/** Can this kernel's tc programs read the cookie of their netns (tcNetnsCookie)? */
export const KERNEL_HAS_TC_NETNS_COOKIE = KERNEL?.features.tcNetnsCookie ?? false;

/** Options for `describe`/`it`: skip with the reason, or throw in CI where skipping is a failure.
 * With `needs`, a test of tcx or of sk-assign steering on a kernel before 6.6 (the old-kernel
 * guest) is skipped only if the harness named it as not applicable (OLD_KERNEL_NOT_APPLICABLE);
 * any other test that cannot run there fails in CI. */
export function kernelTest(needs?: KernelNeeds): { skip?: string } {
  const missing = missingPrerequisite() ?? (needs ? unavailable(needs) : undefined);
  if (!missing) return {};
  if (needs && (JSON.parse(process.env.OLD_KERNEL_NOT_APPLICABLE || '[]') as string[]).includes(needs.name))
    return { skip: `not applicable: ${missing}` };
  if (process.env.CI === 'true') throw new Error(`CI=true and ${missing}: kernel tests must run in CI`);
  return { skip: missing };
}

function unavailable(needs: KernelNeeds): string | undefined {
  if (needs.tcx && !KERNEL_HAS_TCX) return `Linux ${release()} has no tcx (6.6+)`;
  if (needs.tcNetnsCookie && !KERNEL_HAS_TC_NETNS_COOKIE)
    return `Linux ${release()}'s tc programs cannot read their netns's cookie (tcNetnsCookie, probed)`;
  if (needs.steering === 'sk-assign' && KERNEL_STEERING !== 'sk-assign')
    return `Linux ${release()}'s bpf_sk_assign refuses SO_REUSEPORT listeners (6.6+)`;
  return undefined;
}

/** A short random suffix for names of namespaces, devices, pins and sockets. */
export function uniqueSuffix(): string {
  return randomBytes(3).toString('hex');
}

/** Every name a test makes starts with this, so a suite can check nothing of its own is left.
 * TEST_NAME_PREFIX (2-4 lowercase letters) keeps two suites running side by side on one machine
 * from seeing each other's namespaces as leftovers. */
export const TEST_PREFIX = /^[a-z]{2,4}$/.test(process.env.TEST_NAME_PREFIX ?? '')
  ? process.env.TEST_NAME_PREFIX!
  : 'abt';

/** Directory for one test's pins; removed by the test, checked by assertNothingLeft. */
export function testBpffsRoot(id: string): string {
  return `/sys/fs/bpf/${TEST_PREFIX}-${id}`;
}
