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
    const name = this.track(role);
    await sh('ip', ['netns', 'add', name]);
    await this.ip(name, 'link', 'set', 'lo', 'up');
    return name;
  }

  /** The name of a netns for `role`, removed by cleanup() once made (e.g. by batch()). */
  track(role: string): string {
    const name = `${TEST_PREFIX}-${role}-${this.id}`;
    this.namespaces.push(name);
    return name;
  }

  /** `ip` commands run by one process (`ip -batch`), in netns `ns` or, without one, at the top
   * level (netns add, veth pairs created straight into namespaces): a pod's set-up in three
   * processes instead of a dozen, which counts when a benchmark makes hundreds. */
  async batch(ns: string | undefined, lines: string[]): Promise<void> {
    const p = run('ip', [...(ns ? ['-n', ns] : []), '-batch', '-']);
    p.child.stdin!.end(lines.join('\n') + '\n');
    await p;
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
    await this.ip(
      ns,
      ...(cidr.includes(':') ? ['-6', 'addr', 'add', cidr, 'dev', dev, 'nodad'] : ['addr', 'add', cidr, 'dev', dev]),
    );
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
  const pod = topo.track(`pod${tag}`);
  const remote = topo.track(`rem${tag}`);
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
  await topo.batch(undefined, [
    `netns add ${pod}`,
    `netns add ${remote}`,
    `link add eth0 netns ${pod} type veth peer name eth0 netns ${remote}`,
  ]);
  await topo.batch(remote, [
    'link set lo up',
    'link set eth0 up',
    `addr add ${net.remoteV4}/24 dev eth0`,
    `addr add ${net.remoteV6}/64 dev eth0 nodad`,
  ]);
  await topo.batch(pod, [
    'link set lo up',
    'link set eth0 up',
    `addr add ${net.podV4}/24 dev eth0`,
    `addr add ${net.podV6}/64 dev eth0 nodad`,
    `route add default via ${net.remoteV4}`,
    `route add default via ${net.remoteV6}`,
  ]);
  return net;
}
