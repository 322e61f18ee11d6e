// A minimal CNI runtime for tests: executes a conflist's plugins in order per the CNI spec (ADD
// passes each result on as prevResult; DEL runs in reverse), inside a netns that plays the node.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Topology } from './topology.js';

export const CNI_PATH = ['/usr/lib/cni', fileURLToPath(new URL('../../../cni-agent/bin', import.meta.url))].join(':');

export interface Conflist {
  cniVersion: string;
  name: string;
  plugins: Record<string, unknown>[];
}

export interface PluginRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** Executes one plugin binary in `nodeNs` with the CNI environment and `config` on stdin.
 * `pluginDirs` are searched before CNI_PATH (a bin dir an installer wrote, a stand-in plugin). */
export function execPlugin(
  nodeNs: string,
  type: string,
  env: Record<string, string>,
  stdin: string,
  pluginDirs: string[] = [],
): Promise<PluginRun> {
  const path = [...pluginDirs, CNI_PATH].join(':');
  const binary = path
    .split(':')
    .map((d) => `${d}/${type}`)
    .find((p) => existsSync(p));
  return new Promise((resolve) => {
    const child = execFile(
      'nsenter',
      [`--net=${Topology.netnsPath(nodeNs)}`, binary ?? type],
      { env: { PATH: process.env.PATH ?? '', CNI_PATH: path, ...env } },
      (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
      },
    );
    // A plugin may exit before reading its stdin (an error it can tell from the environment alone).
    child.stdin!.on('error', () => undefined);
    child.stdin!.end(stdin);
  });
}

export interface Invocation {
  containerId: string;
  netns: string;
  ifname?: string;
  args?: string;
}

/** Runs ADD over the chain; returns the last plugin's run (and each result along the way). */
export async function chainAdd(
  nodeNs: string,
  list: Conflist,
  inv: Invocation,
  pluginDirs: string[] = [],
): Promise<{ last: PluginRun; results: unknown[] }> {
  let prevResult: unknown;
  const results: unknown[] = [];
  let last: PluginRun = { code: 0, stdout: '', stderr: '' };
  for (const plugin of list.plugins) {
    const config = { cniVersion: list.cniVersion, name: list.name, ...plugin, ...(prevResult ? { prevResult } : {}) };
    last = await execPlugin(nodeNs, String(plugin.type), env('ADD', inv), JSON.stringify(config), pluginDirs);
    if (last.code !== 0) return { last, results };
    prevResult = JSON.parse(last.stdout) as unknown;
    results.push(prevResult);
  }
  return { last, results };
}

export async function chainDel(
  nodeNs: string,
  list: Conflist,
  inv: Invocation,
  pluginDirs: string[] = [],
): Promise<PluginRun[]> {
  const runs: PluginRun[] = [];
  for (const plugin of [...list.plugins].reverse()) {
    const config = { cniVersion: list.cniVersion, name: list.name, ...plugin };
    runs.push(await execPlugin(nodeNs, String(plugin.type), env('DEL', inv), JSON.stringify(config), pluginDirs));
  }
  return runs;
}

function env(command: string, inv: Invocation): Record<string, string> {
  return {
    CNI_COMMAND: command,
    CNI_CONTAINERID: inv.containerId,
    CNI_NETNS: inv.netns,
    CNI_IFNAME: inv.ifname ?? 'eth0',
    CNI_ARGS: inv.args ?? '',
  };
}
