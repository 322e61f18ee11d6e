// Installs the CNI plugin on the node: copies the binary into the CNI bin dir and puts our entry
// last in the primary conflist (before upstream istio-cni's, when that ends it) (atomically, keeping the file's mode); watches the conf dir and puts
// the entry back whenever another component rewrites the file, reporting repeated conflicts
// (upstream's known pain: a primary CNI that overwrites the conflist makes pods bypass the mesh).
import {
  chmodSync,
  copyFileSync,
  existsSync,
  readdirSync,
  readFileSync,
  renameSync,
  statSync,
  unlinkSync,
  watch,
  writeFileSync,
  type FSWatcher,
} from 'node:fs';
import { basename, join } from 'node:path';
import type { Logger } from '../../../ztunnel-bridge/src/logger.js';
import {
  hasEntryInPlace,
  primaryConfigFile,
  PLUGIN_TYPE,
  upstreamAmbientEnabled,
  withEntry,
  withoutEntry,
  type PluginEntry,
} from './conflist.js';

export const PLUGIN_BINARY = PLUGIN_TYPE;
/** More re-inserts than this within CONFLICT_WINDOW_MS is reported as a conflict. */
const CONFLICT_THRESHOLD = 5;
const CONFLICT_WINDOW_MS = 60_000;

export interface InstallerOptions {
  binDir: string;
  confDir: string;
  /** The conflist to chain into (a file name in confDir); default: the one runtimes load, the
   * first in lexical order. A .conf named here that was wrapped is its .conflist. */
  confFile?: string | undefined;
  /** The built plugin binary to copy. */
  binarySource: string;
  agentSocket: string;
  /** The plugin's decision data when the agent is unreachable (the entry's policy_file). */
  policyFile: string;
  log: Logger;
  debounceMs?: number;
  onConflict?: (reinserts: number) => void;
}

/** Writes `text` to `path` through a temporary file and a rename, with `mode`. */
function writeAtomic(path: string, text: string, mode: number): void {
  const tmp = join(path, '..', `.${basename(path)}.ambient-bpf-tmp`);
  writeFileSync(tmp, text, { mode });
  chmodSync(tmp, mode);
  renameSync(tmp, path);
}

export class CniInstaller {
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private reinserts: number[] = [];
  /** Upstream's istio-cni runs its ambient mode here, as last read (warned when it turns on). */
  upstreamAmbient = false;
  private readonly entry: PluginEntry;
  /** Installs by result, with upstream's result names (istio_cni_installs_total). */
  readonly installs = new Map<'SUCCESS' | 'COPY_BINARIES_FAILURE' | 'CREATE_CNI_CONFIG_FAILURE', number>();

  constructor(private readonly opts: InstallerOptions) {
    this.entry = { type: PLUGIN_TYPE, agent_socket: opts.agentSocket, policy_file: opts.policyFile };
  }

  /** Copies the binary, inserts the entry, and starts watching. Throws when there is no CNI
   * configuration to chain into. */
  start(): void {
    this.counted('COPY_BINARIES_FAILURE', () => this.installBinary());
    this.counted('CREATE_CNI_CONFIG_FAILURE', () => this.ensureEntry('install'));
    this.count('SUCCESS');
    this.watcher = watch(this.opts.confDir, () => {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => {
        try {
          if (this.counted('CREATE_CNI_CONFIG_FAILURE', () => this.ensureEntry('repair'))) this.count('SUCCESS');
        } catch (err) {
          this.opts.log.error({ error: (err as Error).message }, 'cannot repair the CNI configuration');
        }
      }, this.opts.debounceMs ?? 100);
    });
  }

  /** Stops watching; the plugin stays installed (pods keep waiting for an agent, not bypassing). */
  stop(): void {
    clearTimeout(this.timer);
    this.watcher?.close();
    this.watcher = undefined;
  }

  private count(result: 'SUCCESS' | 'COPY_BINARIES_FAILURE' | 'CREATE_CNI_CONFIG_FAILURE'): void {
    this.installs.set(result, (this.installs.get(result) ?? 0) + 1);
  }

  /** Runs one install step, counting its failure under `failure`. */
  private counted<T>(failure: 'COPY_BINARIES_FAILURE' | 'CREATE_CNI_CONFIG_FAILURE', step: () => T): T {
    try {
      return step();
    } catch (err) {
      this.count(failure);
      throw err;
    }
  }

  /** Is our entry in its place in the primary conflist? (readiness) */
  get entryInPlace(): boolean {
    const file = this.primary();
    return !!file && hasEntryInPlace(readFileSync(join(this.opts.confDir, file), 'utf8'), file);
  }

  /** Removes our entry from every config file and the binary. */
  uninstall(): string[] {
    this.stop();
    const touched: string[] = [];
    for (const file of readdirSync(this.opts.confDir).filter((f) => /\.(conflist|conf|json)$/.test(f))) {
      const path = join(this.opts.confDir, file);
      let text: string | undefined;
      try {
        text = withoutEntry(readFileSync(path, 'utf8'), file);
      } catch {
        continue; // not ours to judge
      }
      if (text === undefined) continue;
      writeAtomic(path, text, statSync(path).mode & 0o7777);
      touched.push(path);
    }
    const binary = join(this.opts.binDir, PLUGIN_BINARY);
    if (existsSync(binary)) unlinkSync(binary);
    return touched;
  }

  private primary(): string | undefined {
    const files = readdirSync(this.opts.confDir);
    const named = this.opts.confFile;
    if (named === undefined) return primaryConfigFile(files);
    if (files.includes(named)) return named;
    const wrapped = named.replace(/\.(conf|json)$/, '.conflist');
    return files.includes(wrapped) ? wrapped : undefined;
  }

  private installBinary(): void {
    const target = join(this.opts.binDir, PLUGIN_BINARY);
    const tmp = join(this.opts.binDir, `.${PLUGIN_BINARY}.ambient-bpf-tmp`);
    copyFileSync(this.opts.binarySource, tmp);
    chmodSync(tmp, 0o755);
    renameSync(tmp, target);
    this.opts.log.info({ path: target }, 'CNI plugin binary installed');
  }

  /** Puts our entry in its place in the primary conflist (conflist.ts); false when it was there
   * already. */
  private ensureEntry(why: 'install' | 'repair'): boolean {
    const file = this.primary();
    if (!file)
      throw new Error(
        this.opts.confFile === undefined
          ? `no CNI configuration in ${this.opts.confDir} to chain into (is the primary CNI installed?)`
          : `no ${this.opts.confFile} in ${this.opts.confDir} to chain into (--cni-conf-file; is the primary CNI installed?)`,
      );
    const path = join(this.opts.confDir, file);
    const current = readFileSync(path, 'utf8');
    this.checkUpstreamAmbient(current, file);
    const { text, changed, wrapped } = withEntry(current, file, this.entry);
    if (!changed) return false;
    const mode = statSync(path).mode & 0o7777;
    if (wrapped) {
      // A lone .conf becomes a .conflist of the same name; the .conf goes, or it would still win.
      const target = path.replace(/\.(conf|json)$/, '.conflist');
      writeAtomic(target, text, mode);
      unlinkSync(path);
    } else {
      writeAtomic(path, text, mode);
    }
    this.opts.log.info(
      { file, wrapped },
      why === 'install' ? 'CNI entry installed' : 'CNI entry was missing; put back',
    );
    if (why === 'repair') this.noteReinsert();
    return true;
  }

  private checkUpstreamAmbient(text: string, file: string): void {
    const on = upstreamAmbientEnabled(text, file);
    if (on && !this.upstreamAmbient) {
      this.opts.log.warn(
        { file },
        'upstream istio-cni in this CNI configuration runs its ambient mode ("ambient_enabled": true): both node agents would enrol ambient pods; turn it off (istio-cni chart ambient.enabled=false) or remove istio-cni',
      );
    }
    this.upstreamAmbient = on;
  }

  private noteReinsert(): void {
    const now = Date.now();
    this.reinserts = [...this.reinserts.filter((t) => now - t < CONFLICT_WINDOW_MS), now];
    if (this.reinserts.length > CONFLICT_THRESHOLD) {
      this.opts.log.warn(
        { reinserts: this.reinserts.length, windowMs: CONFLICT_WINDOW_MS },
        'another component keeps rewriting the CNI configuration without our entry',
      );
      this.opts.onConflict?.(this.reinserts.length);
    }
  }
}
