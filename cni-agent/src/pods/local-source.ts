// The local pod source (`--local-pods FILE`): v1 Namespace and Pod objects in a YAML file, in the
// shape `kubectl get -o yaml` prints (several documents, or one `kind: List`), watched for changes.
// It is how the product runs without a cluster. A pod without spec.nodeName belongs to this node.
// An edit that does not parse is reported and ignored: the last good state stays in force.
import { createHash } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { parseAllDocuments } from 'yaml';
import type { ClusterState, Namespace, Pod, SourceChange } from './pod.js';

/** The uid of a pod a hand-written file gives none (no runtime knows it: CNI ADDs name such a pod
 * by its name only). */
export const DERIVED_UID_PREFIX = 'local-';

export class LocalPodsError extends Error {
  override readonly name = 'LocalPodsError';
}

/** Parses the file's text into this node's pods and all namespaces; throws LocalPodsError. */
export function parseLocalPods(text: string, nodeName: string): ClusterState {
  const state: ClusterState = { pods: new Map(), namespaces: new Map() };
  const objects: unknown[] = [];
  for (const doc of parseAllDocuments(text)) {
    if (doc.errors.length > 0) throw new LocalPodsError(`YAML: ${doc.errors[0]!.message}`);
    let value: unknown;
    try {
      value = doc.toJS(); // resolves aliases: an unknown one, or too many (an alias bomb), throws
    } catch (err) {
      throw new LocalPodsError(`YAML: ${(err as Error).message}`);
    }
    if (value === null || value === undefined) continue;
    const obj = value as { kind?: unknown; items?: unknown };
    if (obj.kind === 'List') {
      if (!Array.isArray(obj.items)) throw new LocalPodsError('a List without items');
      objects.push(...(obj.items as unknown[]));
    } else objects.push(value);
  }
  for (const [i, value] of objects.entries()) {
    const obj = value as {
      apiVersion?: unknown;
      kind?: unknown;
      metadata?: { name?: unknown; namespace?: unknown; uid?: unknown };
    };
    const where = `object ${i + 1}`;
    if (typeof obj !== 'object' || obj === null) throw new LocalPodsError(`${where} is not a mapping`);
    if (obj.apiVersion !== 'v1' || (obj.kind !== 'Pod' && obj.kind !== 'Namespace')) {
      throw new LocalPodsError(
        `${where}: only v1 Pod and Namespace objects are supported, not ${String(obj.apiVersion)} ${String(obj.kind)}`,
      );
    }
    const name = obj.metadata?.name;
    if (typeof name !== 'string' || name === '')
      throw new LocalPodsError(`${where}: ${obj.kind} without metadata.name`);
    if (obj.kind === 'Namespace') {
      state.namespaces.set(name, obj as Namespace);
      continue;
    }
    const pod = obj as Pod;
    pod.metadata.namespace =
      typeof obj.metadata?.namespace === 'string' && obj.metadata.namespace ? obj.metadata.namespace : 'default';
    // Hand-written files may leave the uid out: derive a stable one from the pod's identity.
    if (typeof obj.metadata?.uid !== 'string' || obj.metadata.uid === '') {
      pod.metadata.uid = `${DERIVED_UID_PREFIX}${createHash('sha256').update(`${pod.metadata.namespace}/${name}`).digest('hex').slice(0, 24)}`;
    }
    const node = pod.spec?.nodeName;
    if (node !== undefined && node !== '' && node !== nodeName) continue;
    if (state.pods.has(pod.metadata.uid)) throw new LocalPodsError(`${where}: duplicate pod uid ${pod.metadata.uid}`);
    state.pods.set(pod.metadata.uid, pod);
  }
  return state;
}

/** The changes that turn `before` into `after`. */
export function diffStates(before: ClusterState, after: ClusterState): SourceChange[] {
  const changes: SourceChange[] = [];
  for (const [name, namespace] of after.namespaces) {
    const old = before.namespaces.get(name);
    if (!old) changes.push({ kind: 'namespace', type: 'added', namespace });
    else if (JSON.stringify(old) !== JSON.stringify(namespace))
      changes.push({ kind: 'namespace', type: 'updated', namespace });
  }
  for (const [uid, pod] of after.pods) {
    const old = before.pods.get(uid);
    if (!old) changes.push({ kind: 'pod', type: 'added', pod });
    else if (JSON.stringify(old) !== JSON.stringify(pod)) changes.push({ kind: 'pod', type: 'updated', pod });
  }
  for (const [uid, pod] of before.pods) if (!after.pods.has(uid)) changes.push({ kind: 'pod', type: 'deleted', pod });
  for (const [name, namespace] of before.namespaces) {
    if (!after.namespaces.has(name)) changes.push({ kind: 'namespace', type: 'deleted', namespace });
  }
  return changes;
}

export interface LocalPodSourceOptions {
  file: string;
  nodeName: string;
  onChange: (changes: SourceChange[], state: ClusterState) => void;
  /** A file that did not parse (the previous state stays in force). */
  onError: (err: Error) => void;
  debounceMs?: number;
}

export class LocalPodSource {
  private state: ClusterState = { pods: new Map(), namespaces: new Map() };
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private reading: Promise<void> = Promise.resolve();
  private readonly file: string;

  constructor(private readonly options: LocalPodSourceOptions) {
    this.file = resolve(options.file);
  }

  get current(): ClusterState {
    return this.state;
  }

  /** Reads the file once (it must parse) and starts watching it. */
  async start(): Promise<ClusterState> {
    this.state = parseLocalPods(
      await readFile(this.file, 'utf8').catch((err: Error) => {
        throw new LocalPodsError(`cannot read ${this.file}: ${err.message}`);
      }),
      this.options.nodeName,
    );
    // Watch the directory: editors and `kubectl get > file` replace the file rather than write it.
    this.watcher = watch(dirname(this.file), (_event, name) => {
      if (name !== null && name !== basename(this.file)) return;
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.reload(), this.options.debounceMs ?? 50);
    });
    return this.state;
  }

  stop(): void {
    clearTimeout(this.timer);
    this.watcher?.close();
    this.watcher = undefined;
  }

  private reload(): void {
    this.reading = this.reading.then(async () => {
      let next: ClusterState;
      try {
        next = parseLocalPods(await readFile(this.file, 'utf8'), this.options.nodeName);
      } catch (err) {
        this.options.onError(
          err instanceof LocalPodsError
            ? err
            : new LocalPodsError(`cannot read ${this.file}: ${(err as Error).message}`),
        );
        return;
      }
      const changes = diffStates(this.state, next);
      this.state = next;
      if (changes.length > 0) this.options.onChange(changes, next);
    });
  }
}
