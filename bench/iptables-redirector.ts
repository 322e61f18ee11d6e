// Upstream's way of redirecting a pod, behind the reconciler's PodRedirector interface, for the
// enrollment benchmark's baseline: its in-pod rules applied with `iptables-restore --noflush` and
// its routes with `ip`, each spawned into the pod netns by `tcpbench spawn` (setns, then fork and
// exec, as upstream's Go agent runs them from a thread that entered the netns).
import { execFile } from 'node:child_process';
import { isIP } from 'node:net';
import { fileURLToPath } from 'node:url';
import type { PodAttachment } from '../bpf/src/index.js';
import type { PodRedirector } from '../cni-agent/src/enrollment/reconciler.js';
import { upstreamInpodRules, upstreamRouteCommands } from './upstream-rules.js';

const TCPBENCH = fileURLToPath(new URL('../../bench/bin/tcpbench', import.meta.url));

function spawnIn(netns: string, args: string[], input = ''): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile(TCPBENCH, ['spawn', netns, ...args], (err) =>
      err ? reject(new Error(`${args.join(' ')}: ${err.message}`)) : resolve(),
    );
    child.stdin?.on('error', () => undefined);
    child.stdin?.end(input);
  });
}

export class IptablesRedirector implements PodRedirector {
  private readonly pods = new Map<string, string>();

  /** `dns`: upstream's DNS capture rules too (its default since 1.25). */
  constructor(private readonly options: { dns?: boolean } = {}) {}

  async attach(pod: PodAttachment): Promise<void> {
    if (this.pods.get(pod.uid) === pod.netnsPath) return; // upstream checks its rules are in place
    for (const family of new Set(pod.ips.map((ip) => isIP(ip) as 4 | 6))) {
      await spawnIn(
        pod.netnsPath,
        [family === 4 ? 'iptables-restore' : 'ip6tables-restore', '--noflush'],
        upstreamInpodRules(family, this.options),
      );
      for (const cmd of upstreamRouteCommands(family)) await spawnIn(pod.netnsPath, cmd);
    }
    this.pods.set(pod.uid, pod.netnsPath);
  }

  detach(uid: string): Promise<{ warning?: string }> {
    this.pods.delete(uid); // the benchmark deletes the pod netns, and its rules with it
    return Promise.resolve({});
  }

  list(): Promise<{ uid: string; netnsPath: string; netnsPresent: boolean }[]> {
    return Promise.resolve([...this.pods].map(([uid, netnsPath]) => ({ uid, netnsPath, netnsPresent: true })));
  }

  verify(uid: string): Promise<{ found: boolean; ok: boolean; problems: string[] }> {
    return Promise.resolve({ found: this.pods.has(uid), ok: this.pods.has(uid), problems: [] });
  }
}
