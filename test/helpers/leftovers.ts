// Suite-level check that a test file left nothing of its own behind.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { Datapath } from '../../bpf/src/index.js';
import { leftoverCgroups } from './app.js';
import { TEST_PREFIX } from './kernel.js';
import { leftoverNamespaces, sh } from './topology.js';

/** Test-named namespaces, bpffs directories and cgroups that existed before this file started (each
 * test file runs in its own process, which loads this module first thing). They are not this
 * file's: a file that the runner killed at its timeout leaves its own behind, and every later file
 * would fail for them. The file that leaked them fails anyway (its timeout), and the next run's
 * sweep (scripts/sweep-test-leftovers.sh) removes them. */
const existedBefore = new Set([
  ...(existsSync('/run/netns') ? readdirSync('/run/netns') : []).map((n) => `netns ${n}`),
  ...readdirSync('/sys/fs/bpf').map((n) => `pins ${n}`),
  ...leftoverCgroups().map((n) => `cgroup ${n}`),
]);
const ours = (kind: string) => (n: string) => n.startsWith(`${TEST_PREFIX}-`) && !existedBefore.has(`${kind} ${n}`);

export async function assertNothingLeft(): Promise<void> {
  assert.deepEqual((await leftoverNamespaces()).filter(ours('netns')), [], 'test network namespaces left behind');
  assert.deepEqual(readdirSync('/sys/fs/bpf').filter(ours('pins')), [], 'test bpffs directories left behind');
  assert.deepEqual(leftoverCgroups().filter(ours('cgroup')), [], 'test cgroups left behind');
}

/** The programs of a pod's pinned tcx links under a datapath root: the programs that root's
 * datapath loaded (each open of a root loads its own). */
export async function podProgramIds(root: string, uid: string): Promise<Set<number>> {
  const ids = new Set<number>();
  for (const hook of ['ingress', 'egress']) {
    ids.add(
      (
        JSON.parse(await sh('bpftool', ['-j', 'link', 'show', 'pinned', `${root}/pods/${uid}/${hook}`])) as {
          prog_id: number;
        }
      ).prog_id,
    );
  }
  return ids;
}

/** IDs of the BPF links running one of these programs: a test's own links, whatever other suites
 * on the machine attach meanwhile. */
export async function linksOfPrograms(progIds: Set<number>): Promise<number[]> {
  const links = JSON.parse(await sh('bpftool', ['-j', 'link', 'show'])) as { id: number; prog_id: number }[];
  return links.filter((l) => progIds.has(l.prog_id)).map((l) => l.id);
}

/** Detaches every pod attached under a test's bpffs root and removes the root. */
export async function removeDatapath(root: string): Promise<void> {
  const dp = await Datapath.open({ bpffsRoot: root });
  for (const p of await dp.list()) await dp.detach(p.uid);
  dp.close();
  rmSync(root, { recursive: true, force: true });
}
