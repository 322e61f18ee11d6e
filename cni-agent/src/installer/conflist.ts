// The node's CNI configuration, as runtimes read it: the first file in lexical order among
// *.conf, *.conflist and *.json of the conf dir. Our entry goes after the plugins that set up the
// pod interface (whose result we pass through), last, except before upstream's istio-cni entries
// that end the list: upstream's installer keeps its entry last (it takes its old one out and
// appends it again), so [primary plugins..., ambient-bpf-cni, istio-cni] is the one order that
// neither installer changes (README, "Next to upstream istio-cni in sidecar mode").
export const PLUGIN_TYPE = 'ambient-bpf-cni';
/** Upstream Istio's chained plugin (its sidecar-mode redirection, or its ambient relay). */
export const UPSTREAM_PLUGIN_TYPE = 'istio-cni';

export interface PluginEntry {
  type: typeof PLUGIN_TYPE;
  agent_socket: string;
  policy_file: string;
  [key: string]: unknown;
}

export class ConflistError extends Error {
  override readonly name = 'ConflistError';
}

/** The file a runtime would load, or undefined when the dir has none. */
export function primaryConfigFile(files: string[]): string | undefined {
  return files.filter((f) => /\.(conflist|conf|json)$/.test(f) && !f.startsWith('.')).sort()[0];
}

interface Conflist {
  cniVersion?: unknown;
  name?: unknown;
  plugins: Record<string, unknown>[];
  [key: string]: unknown;
}

function parse(text: string, file: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new ConflistError(`${file} is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new ConflistError(`${file} is not a JSON object`);
  return value as Record<string, unknown>;
}

/** A conflist from a .conflist, or from a lone .conf wrapped as upstream does. */
function asConflist(text: string, file: string): Conflist {
  const obj = parse(text, file);
  if (Array.isArray(obj.plugins)) return obj as Conflist;
  if (typeof obj.type !== 'string') throw new ConflistError(`${file} has neither "plugins" nor "type"`);
  const { cniVersion, name, ...plugin } = obj;
  return { cniVersion, name, plugins: [plugin] };
}

/** The plugins with `entry` in its place: after the last plugin that is neither ours nor
 * upstream's istio-cni, so that the istio-cni entries ending the list stay last. Every other
 * plugin keeps its order. */
function arranged(
  plugins: Record<string, unknown>[],
  entry: Record<string, unknown>,
  file: string,
): Record<string, unknown>[] {
  const others = plugins.filter((p) => p.type !== PLUGIN_TYPE);
  let at = others.length;
  while (at > 0 && others[at - 1]!.type === UPSTREAM_PLUGIN_TYPE) at--;
  if (at === 0) throw new ConflistError(`${file} has no plugin that sets up the pod interface to chain after`);
  return [...others.slice(0, at), entry, ...others.slice(at)];
}

/** The file's text with our entry in its place (replacing any earlier one of ours), and whether
 * that changed anything. `wrapped` when a lone .conf became a conflist. */
export function withEntry(
  text: string,
  file: string,
  entry: PluginEntry,
): { text: string; changed: boolean; wrapped: boolean } {
  const wrapped = !Array.isArray(parse(text, file).plugins);
  const list = asConflist(text, file);
  const plugins = arranged(list.plugins, entry, file);
  const changed = wrapped || JSON.stringify(plugins) !== JSON.stringify(list.plugins);
  return { text: JSON.stringify({ ...list, plugins }, null, 2) + '\n', changed, wrapped };
}

/** The file's text without our entry, or undefined if it had none. */
export function withoutEntry(text: string, file: string): string | undefined {
  const list = asConflist(text, file);
  const others = list.plugins.filter((p) => p.type !== PLUGIN_TYPE);
  if (others.length === list.plugins.length) return undefined;
  return JSON.stringify({ ...list, plugins: others }, null, 2) + '\n';
}

/** Does upstream's istio-cni in this file run its ambient mode (`"ambient_enabled": true`)? Then
 * both node agents would enrol the same ambient pods. */
export function upstreamAmbientEnabled(text: string, file: string): boolean {
  try {
    return asConflist(text, file).plugins.some((p) => p.type === UPSTREAM_PLUGIN_TYPE && p.ambient_enabled === true);
  } catch {
    return false;
  }
}

/** Is our entry, once, in its place in this file (last, or before the istio-cni entries that
 * end the list)? */
export function hasEntryInPlace(text: string, file: string): boolean {
  try {
    const { plugins } = asConflist(text, file);
    const ours = plugins.filter((p) => p.type === PLUGIN_TYPE);
    return ours.length === 1 && JSON.stringify(arranged(plugins, ours[0]!, file)) === JSON.stringify(plugins);
  } catch {
    return false;
  }
}
