// Records what was built, for `ambient-bpf --version`: the package version and the commit (from
// git when the tree is a checkout, else AMBIENT_BPF_COMMIT, which the image build passes in).
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';

const root = new URL('../', import.meta.url);
const { version } = JSON.parse(readFileSync(new URL('package.json', root), 'utf8'));
let commit = process.env.AMBIENT_BPF_COMMIT || 'unknown';
try {
  commit = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: root, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
} catch {
  // not a checkout (the image build copies the tree without .git)
}
writeFileSync(new URL('dist/build-info.json', root), JSON.stringify({ version, commit }) + '\n');
