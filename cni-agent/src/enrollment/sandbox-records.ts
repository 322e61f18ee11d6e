// Which sandbox (CNI_CONTAINERID) of a pod is the enrolled one. Runtimes retry DEL for earlier
// sandboxes of a pod long after a new one is up, and K8S_POD_UID is the same for every sandbox: only
// the container ID tells a stale DEL from the one that tears down the running sandbox.
//
// Why a file per pod uid next to the plugin socket (the agent's run dir): the record must outlive an
// agent restart (the pinned redirection does, and a stale DEL may come right after the restart),
// and the datapath's pinned records (bpffs) cannot hold regular files. The run dir is a tmpfs on
// real nodes, so a reboot clears it together with the pods' namespaces and the bpffs pins. Each
// record is written atomically (rename) at ADD and removed when the pod is unenrolled by its own
// sandbox's DEL or leaves the node. A pod without a record (enrolled while running, not through ADD)
// falls back to comparing the DEL's netns with the enrolled one (see Reconciler.cniDel).
import { mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';

/** A uid or container ID that is safe as a file name and in a log line. */
const SAFE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export interface SandboxStore {
  get(uid: string): string | undefined;
  set(uid: string, containerId: string): void;
  delete(uid: string): void;
}

/** Records under `<dir of the plugin socket>/sandboxes/<uid>`. */
export class SandboxRecords implements SandboxStore {
  readonly dir: string;

  constructor(pluginSocket: string) {
    this.dir = join(dirname(pluginSocket), 'sandboxes');
  }

  get(uid: string): string | undefined {
    if (!SAFE.test(uid)) return undefined;
    try {
      const id = readFileSync(join(this.dir, uid), 'utf8').trim();
      return SAFE.test(id) ? id : undefined;
    } catch {
      return undefined;
    }
  }

  set(uid: string, containerId: string): void {
    if (!SAFE.test(uid) || !SAFE.test(containerId)) return; // kept in memory only
    mkdirSync(this.dir, { recursive: true, mode: 0o750 });
    const tmp = join(this.dir, `.${uid}.tmp-${process.pid}`);
    writeFileSync(tmp, `${containerId}\n`, { mode: 0o600 });
    renameSync(tmp, join(this.dir, uid));
  }

  delete(uid: string): void {
    if (SAFE.test(uid)) rmSync(join(this.dir, uid), { force: true });
  }
}
