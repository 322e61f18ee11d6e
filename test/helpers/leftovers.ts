// Suite-level check that a test file left nothing of its own behind.
import assert from 'node:assert/strict';
import { readdirSync, rmSync } from 'node:fs';
import { Datapath } from '../../bpf/src/index.js';
import { leftoverCgroups } from './app.js';
import { TEST_PREFIX } from './kernel.js';
import { leftoverNamespaces, sh } from './topology.js';

export async function assertNothingLeft(): Promise<void> {
  assert.deepEqual(await leftoverNamespaces(), [], 'test network namespaces left behind');
  const pins = readdirSync('/sys/fs/bpf').filter((n) => n.startsWith(`${TEST_PREFIX}-`));
  assert.deepEqual(pins, [], 'test bpffs directories left behind');
  assert.deepEqual(leftoverCgroups(), [], 'test cgroups left behind');
}

/** IDs of BPF links whose program is one of ours (pod_ingress, pod_egress, pod_reroute_ingress and its _l3 twin: the
 * kernel cuts both names to pod_reroute_ing), machine-wide. */
export async function podLinkIds(): Promise<number[]> {
  const progs = JSON.parse(await sh('bpftool', ['-j', 'prog', 'show'])) as { id: number; name?: string }[];
  const ours = new Set(progs.filter((p) => p.name === 'pod_ingress' || p.name === 'pod_egress' || p.name === 'pod_reroute_ing').map((p) => p.id));
  const links = JSON.parse(await sh('bpftool', ['-j', 'link', 'show'])) as { id: number; prog_id: number }[];
  return links.filter((l) => ours.has(l.prog_id)).map((l) => l.id);
}

/** Detaches every pod attached under a test's bpffs root and removes the root. */
export async function removeDatapath(root: string): Promise<void> {
  const dp = await Datapath.open({ bpffsRoot: root });
  for (const p of await dp.list()) await dp.detach(p.uid);
  dp.close();
  rmSync(root, { recursive: true, force: true });
}
