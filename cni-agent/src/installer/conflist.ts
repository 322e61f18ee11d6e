// The node's CNI configuration, as runtimes read it: the first file in lexical order among
// *.conf, *.conflist and *.json of the conf dir. Our entry goes last in its plugin list (after the
// plugin that sets up the pod interface, whose result we pass through).
export const PLUGIN_TYPE = 'ambient-bpf-cni';

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
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new ConflistError(`${file} is not a JSON object`);
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

/** The file's text with our entry last (replacing any earlier one of ours), and whether that
 * changed anything. `wrapped` when a lone .conf became a conflist. */
export function withEntry(text: string, file: string, entry: PluginEntry): { text: string; changed: boolean; wrapped: boolean } {
  const wrapped = !Array.isArray(parse(text, file).plugins);
  const list = asConflist(text, file);
  const others = list.plugins.filter((p) => p.type !== PLUGIN_TYPE);
  if (others.length === 0) throw new ConflistError(`${file} has no plugin that sets up the pod interface to chain after`);
  const last = list.plugins.at(-1);
  const changed = wrapped || JSON.stringify(last) !== JSON.stringify(entry) || others.length !== list.plugins.length - 1;
  return { text: JSON.stringify({ ...list, plugins: [...others, entry] }, null, 2) + '\n', changed, wrapped };
}

/** The file's text without our entry, or undefined if it had none. */
export function withoutEntry(text: string, file: string): string | undefined {
  const list = asConflist(text, file);
  const others = list.plugins.filter((p) => p.type !== PLUGIN_TYPE);
  if (others.length === list.plugins.length) return undefined;
  return JSON.stringify({ ...list, plugins: others }, null, 2) + '\n';
}

/** Is our entry the last plugin of this file? */
export function hasEntryLast(text: string, file: string): boolean {
  try {
    return asConflist(text, file).plugins.at(-1)?.type === PLUGIN_TYPE;
  } catch {
    return false;
  }
}
