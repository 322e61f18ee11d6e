// The agent's local surfaces accept only root: the plugin, ZDS and status sockets are 0600 in
// directories nobody else may write, and an unprivileged process cannot connect to any of them.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, statSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Agent } from '../cni-agent/src/agent.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { kernelTest, testBpffsRoot, uniqueSuffix } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { sh } from './helpers/topology.js';

after(assertNothingLeft);

/** Connects to a Unix socket as uid/gid 65534 with no capabilities; the error name, or "connected". */
async function connectAsNobody(path: string, type: 'stream' | 'seqpacket'): Promise<string> {
  const py = `import socket,sys\ns=socket.socket(socket.AF_UNIX, socket.SOCK_${type === 'stream' ? 'STREAM' : 'SEQPACKET'})\ntry:\n  s.connect(sys.argv[1]); print('connected')\nexcept Exception as e: print(type(e).__name__)`;
  const drop = ['--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', '--bounding-set=-all'];
  return (await sh('setpriv', [...drop, '/usr/bin/python3', '-c', py, path])).trim();
}

describe('local attack surface', kernelTest(), () => {
  it('the plugin, ZDS and status sockets are root-only', async (t) => {
    const id = uniqueSuffix();
    const root = testBpffsRoot(id);
    const base = mkdtempSync(join(tmpdir(), 'abt-surface-'));
    chmodSync(base, 0o755); // even where others may traverse, the sockets stay closed to them
    const dirs = { run: join(base, 'run'), ztunnel: join(base, 'ztunnel') };
    writeFileSync(join(base, 'pods.yaml'), '');
    const sockets = {
      plugin: join(dirs.run, 'cni.sock'),
      status: join(dirs.run, 'status.sock'),
      ztunnel: join(dirs.ztunnel, 'ztunnel.sock'),
    };
    const agent = new Agent({
      nodeName: 'n',
      source: { localPods: join(base, 'pods.yaml') },
      ztunnelSocket: sockets.ztunnel,
      pluginSocket: sockets.plugin,
      cniPolicyFile: join(base, 'cni-policy'),
      statusSocket: sockets.status,
      bpffs: root,
      hostRoot: '/',
      attachMode: 'auto',
      verifyIntervalMs: 0,
      log: silentLogger,
    });
    t.after(async () => {
      agent.stop();
      await removeDatapath(root);
      rmSync(base, { recursive: true, force: true });
    });
    await agent.start();
    for (const [name, path] of Object.entries(sockets)) {
      assert.equal(statSync(path).mode & 0o777, 0o600, `${name} socket mode`);
      assert.equal(statSync(path).uid, 0, `${name} socket owner`);
    }
    for (const dir of Object.values(dirs)) assert.equal(statSync(dir).mode & 0o022, 0, `${dir} is writable by others`);
    assert.equal(await connectAsNobody(sockets.plugin, 'stream'), 'PermissionError');
    assert.equal(await connectAsNobody(sockets.status, 'stream'), 'PermissionError');
    assert.equal(await connectAsNobody(sockets.ztunnel, 'seqpacket'), 'PermissionError');
    // The policy file the plugin reads while the agent is down: readable, holds only names.
    assert.equal(statSync(join(base, 'cni-policy')).mode & 0o777, 0o644);
  });
});
