// Network namespaces and veth pairs made for one test, all removed by cleanup(). Nothing is ever
// created in the host netns: a veth is created with both ends already in test namespaces.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync } from 'node:fs';
import { TEST_PREFIX, uniqueSuffix } from './kernel.js';

const run = promisify(execFile);

export async function sh(cmd: string, args: string[]): Promise<string> {
  const { stdout } = await run(cmd, args, { maxBuffer: 16 << 20 });
  return stdout;
}

export class Topology {
  readonly id = uniqueSuffix();
  private readonly namespaces: string[] = [];

  /** Creates a netns; returns its name (the path is netnsPath(name)). */
  async netns(role: string): Promise<string> {
    const name = `${TEST_PREFIX}-${role}-${this.id}`;
    await sh('ip', ['netns', 'add', name]);
    this.namespaces.push(name);
    await this.ip(name, 'link', 'set', 'lo', 'up');
    return name;
  }

  static netnsPath(name: string): string {
    return `/var/run/netns/${name}`;
  }

  async ip(ns: string, ...args: string[]): Promise<string> {
    return sh('ip', ['-n', ns, ...args]);
  }

  /** In a netns, through nsenter (not `ip netns exec`, which hides /sys/fs/bpf). */
  async exec(ns: string, cmd: string, ...args: string[]): Promise<string> {
    return sh('nsenter', [`--net=${Topology.netnsPath(ns)}`, cmd, ...args]);
  }

  async veth(nsA: string, ifA: string, nsB: string, ifB: string): Promise<void> {
    await sh('ip', ['link', 'add', ifA, 'netns', nsA, 'type', 'veth', 'peer', 'name', ifB, 'netns', nsB]);
    await this.ip(nsA, 'link', 'set', ifA, 'up');
    await this.ip(nsB, 'link', 'set', ifB, 'up');
  }

  async addAddress(ns: string, dev: string, cidr: string): Promise<void> {
    await this.ip(ns, ...(cidr.includes(':') ? ['-6', 'addr', 'add', cidr, 'dev', dev, 'nodad'] : ['addr', 'add', cidr, 'dev', dev]));
  }

  async deleteNetns(name: string): Promise<void> {
    await sh('ip', ['netns', 'del', name]);
    this.namespaces.splice(this.namespaces.indexOf(name), 1);
  }

  async cleanup(): Promise<void> {
    for (const ns of this.namespaces.splice(0)) {
      if (existsSync(Topology.netnsPath(ns))) await sh('ip', ['netns', 'del', ns]).catch(() => undefined);
    }
  }
}

/** Namespaces named like a test's that still exist (a suite asserts there are none). */
export async function leftoverNamespaces(): Promise<string[]> {
  const out = await sh('ip', ['netns', 'list']);
  return out
    .split('\n')
    .map((l) => l.split(' ')[0] ?? '')
    .filter((n) => n.startsWith(`${TEST_PREFIX}-`));
}

export interface PodNet {
  topo: Topology;
  pod: string; // netns names
  remote: string;
  podPath: string;
  podV4: string;
  podV6: string;
  remoteV4: string;
  remoteV6: string;
}

/** A pod netns (eth0 with v4+v6) wired to a "remote" host netns that is also its gateway. `tag`
 * tells apart several such pairs in one topology. */
export async function podWithRemote(topo: Topology, subnet = 0, tag = ''): Promise<PodNet> {
  const pod = await topo.netns(`pod${tag}`);
  const remote = await topo.netns(`rem${tag}`);
  await topo.veth(pod, 'eth0', remote, 'eth0');
  const net: PodNet = {
    topo,
    pod,
    remote,
    podPath: Topology.netnsPath(pod),
    podV4: `198.18.${subnet}.2`,
    podV6: `2001:db8:${subnet}::2`,
    remoteV4: `198.18.${subnet}.1`,
    remoteV6: `2001:db8:${subnet}::1`,
  };
  await topo.addAddress(pod, 'eth0', `${net.podV4}/24`);
  await topo.addAddress(pod, 'eth0', `${net.podV6}/64`);
  await topo.addAddress(remote, 'eth0', `${net.remoteV4}/24`);
  await topo.addAddress(remote, 'eth0', `${net.remoteV6}/64`);
  await topo.ip(pod, 'route', 'add', 'default', 'via', net.remoteV4);
  await topo.ip(pod, '-6', 'route', 'add', 'default', 'via', net.remoteV6);
  return net;
}
