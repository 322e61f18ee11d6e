// The previous release, for upgrade tests: the commit named in test/upgrade/previous-release,
// extracted from this repository's history into a temporary tree (git archive: nothing is
// registered in the repository), built there, and cached under /var/tmp by its hash so CI builds
// it once per machine.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../../..', import.meta.url));
const RELEASE_FILE = join(REPO, 'test/upgrade/previous-release');
const CACHE = '/var/tmp/ambient-bpf-previous-release';

export interface PreviousRelease {
  commit: string;
  /** Its `ambient-bpf` launcher (agent, datapath commands). */
  cli: string;
}

export function previousRelease(): PreviousRelease {
  const commit = readFileSync(RELEASE_FILE, 'utf8').trim();
  if (!/^[0-9a-f]{40}$/.test(commit)) throw new Error(`${RELEASE_FILE} must hold a full commit hash, not "${commit}"`);
  const dir = join(CACHE, commit);
  if (!existsSync(join(dir, '.built'))) {
    const tmp = `${dir}.${process.pid}`;
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp, { recursive: true });
    try {
      execFileSync('sh', ['-c', `git -C "${REPO}" archive ${commit} | tar -x -C "${tmp}"`], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      execFileSync('sh', ['-c', 'npm ci --no-audit --no-fund && npm run build'], {
        cwd: tmp,
        stdio: ['ignore', 'ignore', 'pipe'],
        maxBuffer: 64 << 20,
      });
      writeFileSync(join(tmp, '.built'), `${commit}\n`);
      rmSync(dir, { recursive: true, force: true });
      renameSync(tmp, dir);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }
  return { commit, cli: join(dir, 'cni-agent/bin/ambient-bpf') };
}
