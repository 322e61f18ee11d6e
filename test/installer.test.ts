// The CNI installer on real directories: entry last in the primary conflist, a lone .conf wrapped,
// file modes kept, rewrites by "another component" repaired and reported when they repeat, and a
// clean uninstall. Next to upstream istio-cni (sidecar mode): our entry goes before its entry,
// which upstream's installer keeps last, and neither installer moves, changes or removes the other's.
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import {
  hasEntryInPlace,
  primaryConfigFile,
  withEntry,
  withoutEntry,
  ConflistError,
} from '../cni-agent/src/installer/conflist.js';
import { CniInstaller } from '../cni-agent/src/installer/installer.js';
import { silentLogger } from '../ztunnel-bridge/src/logger.js';
import { until } from './helpers/wait.js';

const entry = { type: 'ambient-bpf-cni' as const, agent_socket: '/run/a.sock', policy_file: '/var/lib/a/cni-policy' };
const bridge = { type: 'bridge', bridge: 'cni0', ipam: { type: 'host-local' } };
const conflist = (plugins: object[]) => JSON.stringify({ cniVersion: '1.0.0', name: 'k8s', plugins });
/** Upstream's entry as its installer writes it (sidecar mode: ambient off). */
const istioCni = {
  name: 'istio-cni',
  type: 'istio-cni',
  plugin_log_level: 'info',
  cni_agent_run_dir: '/var/run/istio-cni',
  ambient_enabled: false,
  exclude_namespaces: ['kube-system'],
  pod_namespace: 'istio-system',
};
const plugins = (text: string) => (JSON.parse(text) as { plugins: Record<string, unknown>[] }).plugins;

/** What upstream's installer does to the primary conflist, as istio/istio's
 * cni/pkg/install/cniconfig.go (insertCNIConfig) does it: its old entry out, its entry appended
 * last; a lone .conf becomes a list of two. */
function upstreamInstall(text: string): string {
  const conf = JSON.parse(text) as Record<string, unknown>;
  if (typeof conf.type === 'string') {
    const single = { ...conf };
    delete single.cniVersion;
    return JSON.stringify({ name: 'k8s-pod-network', cniVersion: '0.3.1', plugins: [single, istioCni] });
  }
  const kept = (conf.plugins as { type?: unknown }[]).filter((p) => p.type !== 'istio-cni');
  return JSON.stringify({ ...conf, plugins: [...kept, istioCni] });
}

describe('conflist', () => {
  it('picks the file a runtime loads first', () => {
    assert.equal(
      primaryConfigFile(['99-z.conflist', '10-calico.conflist', '05-a.conf', 'README', '.hidden.conf']),
      '05-a.conf',
    );
    assert.equal(primaryConfigFile(['notes.txt']), undefined);
  });

  it('puts our entry last, once, and says when nothing changed', () => {
    const once = withEntry(conflist([bridge]), 'x.conflist', entry);
    assert.deepEqual((JSON.parse(once.text) as { plugins: object[] }).plugins, [bridge, entry]);
    assert.equal(once.changed, true);
    assert.equal(withEntry(once.text, 'x.conflist', entry).changed, false);
    const moved = withEntry(conflist([entry, bridge, { type: 'portmap' }]), 'x.conflist', {
      ...entry,
      agent_socket: '/run/b.sock',
    });
    assert.deepEqual(
      (JSON.parse(moved.text) as { plugins: { type: string }[] }).plugins.map((p) => p.type),
      ['bridge', 'portmap', 'ambient-bpf-cni'],
    );
    assert.equal(hasEntryInPlace(moved.text, 'x.conflist'), true);
  });

  it('wraps a lone .conf the way upstream does', () => {
    const r = withEntry(JSON.stringify({ cniVersion: '0.4.0', name: 'net', ...bridge }), 'x.conf', entry);
    assert.equal(r.wrapped, true);
    assert.deepEqual(JSON.parse(r.text), { cniVersion: '0.4.0', name: 'net', plugins: [bridge, entry] });
  });

  it('goes before an istio-cni entry that ends the list, and leaves it as it is', () => {
    const portmap = { type: 'portmap', capabilities: { portMappings: true } };
    const r = withEntry(conflist([bridge, portmap, istioCni]), 'x.conflist', entry);
    assert.deepEqual(plugins(r.text), [bridge, portmap, entry, istioCni]);
    assert.equal(hasEntryInPlace(r.text, 'x.conflist'), true);
    assert.equal(withEntry(r.text, 'x.conflist', entry).changed, false);
    // Upstream's installer run again (it re-appends itself) changes nothing, nor do we after it.
    assert.deepEqual(plugins(upstreamInstall(r.text)), plugins(r.text));
    // Our entry last and upstream's installed after us: still in place.
    const later = upstreamInstall(withEntry(conflist([bridge]), 'x.conflist', entry).text);
    assert.deepEqual(plugins(later), [bridge, entry, istioCni]);
    assert.equal(hasEntryInPlace(later, 'x.conflist'), true);
    assert.equal(withEntry(later, 'x.conflist', entry).changed, false);
    // Our entry after istio-cni (written by hand, or by an older version of ours): put before it.
    assert.deepEqual(plugins(withEntry(conflist([bridge, istioCni, entry]), 'x.conflist', entry).text), [
      bridge,
      entry,
      istioCni,
    ]);
    assert.equal(hasEntryInPlace(conflist([bridge, istioCni, entry]), 'x.conflist'), false);
    // istio-cni alone sets up no interface: nothing to chain after.
    assert.throws(
      () => withEntry(conflist([istioCni]), 'x.conflist', entry),
      /no plugin that sets up the pod interface/,
    );
    // Uninstall takes only ours out.
    assert.deepEqual(plugins(withoutEntry(r.text, 'x.conflist')!), [bridge, portmap, istioCni]);
  });

  it('removes only our entry, and rejects what it cannot chain into', () => {
    assert.deepEqual(JSON.parse(withoutEntry(conflist([bridge, entry]), 'x')!), JSON.parse(conflist([bridge])));
    assert.equal(withoutEntry(conflist([bridge]), 'x'), undefined);
    assert.throws(
      () => withEntry('{', 'bad.conflist', entry),
      (e: Error) => e instanceof ConflistError && /not valid JSON/.test(e.message),
    );
    assert.throws(() => withEntry(conflist([]), 'empty.conflist', entry), /no plugin that sets up the pod interface/);
    assert.throws(() => withEntry('{"name":"x"}', 'odd.conf', entry), /neither "plugins" nor "type"/);
  });
});

describe('CNI installer', () => {
  function dirs(t: { after: (fn: () => void) => void }) {
    const base = mkdtempSync(join(tmpdir(), 'abt-install-'));
    const binDir = join(base, 'bin');
    const confDir = join(base, 'net.d');
    mkdirSync(binDir);
    mkdirSync(confDir);
    const binarySource = join(base, 'plugin-build');
    writeFileSync(binarySource, '#!/bin/sh\necho plugin\n');
    t.after(() => rmSync(base, { recursive: true, force: true }));
    return { binDir, confDir, binarySource };
  }

  it('installs binary and entry, keeps the file mode, repairs rewrites, reports repeated conflicts, uninstalls', async (t) => {
    const { binDir, confDir, binarySource } = dirs(t);
    const primary = join(confDir, '10-bridge.conflist');
    writeFileSync(primary, conflist([bridge]));
    chmodSync(primary, 0o640);
    writeFileSync(join(confDir, '99-other.conflist'), conflist([{ type: 'macvlan' }]));
    const conflicts: number[] = [];
    const installer = new CniInstaller({
      binDir,
      confDir,
      binarySource,
      agentSocket: '/run/a.sock',
      policyFile: '/var/lib/a/cni-policy',
      log: silentLogger,
      debounceMs: 10,
      onConflict: (n) => conflicts.push(n),
    });
    t.after(() => installer.stop());
    installer.start();

    assert.equal(readFileSync(join(binDir, 'ambient-bpf-cni'), 'utf8'), readFileSync(binarySource, 'utf8'));
    assert.equal(statSync(join(binDir, 'ambient-bpf-cni')).mode & 0o777, 0o755);
    assert.deepEqual((JSON.parse(readFileSync(primary, 'utf8')) as { plugins: object[] }).plugins, [bridge, entry]);
    assert.equal(statSync(primary).mode & 0o777, 0o640);
    assert.equal(
      readFileSync(join(confDir, '99-other.conflist'), 'utf8'),
      conflist([{ type: 'macvlan' }]),
      'a file runtimes do not load was changed',
    );
    assert.equal(installer.entryInPlace, true);

    // Another component (the primary CNI) rewrites its file without our entry, again and again.
    for (let i = 0; i < 6; i++) {
      writeFileSync(primary, conflist([bridge]));
      await until(() => installer.entryInPlace, `repair ${i + 1}`);
    }
    assert.deepEqual(conflicts.slice(0, 1), [6]);

    assert.deepEqual(installer.uninstall(), [primary]);
    assert.deepEqual(JSON.parse(readFileSync(primary, 'utf8')), JSON.parse(conflist([bridge])));
    assert.equal(existsSync(join(binDir, 'ambient-bpf-cni')), false);
  });

  it('next to upstream istio-cni: installs before its entry, takes no part in its rewrites, uninstalls only ours', async (t) => {
    const { binDir, confDir, binarySource } = dirs(t);
    const primary = join(confDir, '10-bridge.conflist');
    // Upstream's installer was there first.
    writeFileSync(primary, upstreamInstall(conflist([bridge])));
    const installer = new CniInstaller({
      binDir,
      confDir,
      binarySource,
      agentSocket: '/run/a.sock',
      policyFile: '/var/lib/a/cni-policy',
      log: silentLogger,
      debounceMs: 10,
    });
    t.after(() => installer.stop());
    installer.start();
    assert.deepEqual(plugins(readFileSync(primary, 'utf8')), [bridge, entry, istioCni]);
    assert.equal(installer.entryInPlace, true);
    // Upstream's installer rewrites the file (its own repair loop does on every change): the order
    // holds, and ours does not answer with a rewrite of its own (no fight over the last place).
    for (let i = 0; i < 3; i++) writeFileSync(primary, upstreamInstall(readFileSync(primary, 'utf8')));
    const written = readFileSync(primary, 'utf8');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(readFileSync(primary, 'utf8'), written, 'our installer rewrote the file after upstream’s');
    assert.deepEqual(plugins(written), [bridge, entry, istioCni]);
    assert.equal(installer.installs.get('SUCCESS'), 1, 'our installer counted a repair');
    assert.equal(installer.entryInPlace, true);
    // Upstream's uninstall takes its entry out: ours stays, still in place, nothing rewritten.
    writeFileSync(primary, conflist([bridge, entry]));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(installer.installs.get('SUCCESS'), 1);
    assert.equal(installer.entryInPlace, true);
    // And installs again: after ours.
    writeFileSync(primary, upstreamInstall(readFileSync(primary, 'utf8')));
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(plugins(readFileSync(primary, 'utf8')), [bridge, entry, istioCni]);
    // Our uninstall leaves upstream's entry, unchanged, where it was.
    assert.deepEqual(installer.uninstall(), [primary]);
    assert.deepEqual(plugins(readFileSync(primary, 'utf8')), [bridge, istioCni]);
  });

  it('warns once when upstream istio-cni in the conflist runs its ambient mode, and again after it was off', async (t) => {
    const { binDir, confDir, binarySource } = dirs(t);
    const primary = join(confDir, '10-bridge.conflist');
    const ambientOn = { ...istioCni, ambient_enabled: true };
    writeFileSync(primary, conflist([bridge, ambientOn]));
    const warnings: string[] = [];
    const log = { ...silentLogger, warn: (_o: object, msg?: string) => warnings.push(msg ?? '') };
    const installer = new CniInstaller({
      binDir,
      confDir,
      binarySource,
      agentSocket: '/run/a.sock',
      policyFile: '/var/lib/a/cni-policy',
      log,
      debounceMs: 10,
    });
    t.after(() => installer.stop());
    installer.start();
    const ambientWarnings = () =>
      warnings.filter((w) => /istio-cni .* runs its ambient mode \("ambient_enabled": true\)/.test(w)).length;
    assert.equal(ambientWarnings(), 1);
    assert.deepEqual(
      plugins(readFileSync(primary, 'utf8')),
      [bridge, entry, ambientOn],
      'installed anyway, in its place',
    );
    // Rewrites while it stays on: no repeat. Off, then on again: warned again.
    writeFileSync(primary, conflist([bridge, ambientOn]));
    await until(
      () => plugins(readFileSync(primary, 'utf8')).length === 3,
      () => 'our entry put back',
      2_000,
    );
    assert.equal(ambientWarnings(), 1, 'warned again while nothing changed for it');
    writeFileSync(primary, conflist([bridge, entry, istioCni]));
    await until(
      () => !installer.upstreamAmbient,
      () => 'the change to off seen',
      2_000,
    );
    writeFileSync(primary, conflist([bridge, entry, ambientOn]));
    await until(
      () => ambientWarnings() === 2,
      () => `warnings: ${JSON.stringify(warnings)}`,
      2_000,
    );
  });

  it('wraps a lone .conf into a .conflist of the same name', (t) => {
    const { binDir, confDir, binarySource } = dirs(t);
    writeFileSync(join(confDir, '05-net.conf'), JSON.stringify({ cniVersion: '1.0.0', name: 'net', ...bridge }));
    const installer = new CniInstaller({
      binDir,
      confDir,
      binarySource,
      agentSocket: '/run/a.sock',
      policyFile: '/var/lib/a/cni-policy',
      log: silentLogger,
    });
    t.after(() => installer.stop());
    installer.start();
    assert.equal(existsSync(join(confDir, '05-net.conf')), false);
    assert.deepEqual(
      (JSON.parse(readFileSync(join(confDir, '05-net.conflist'), 'utf8')) as { plugins: object[] }).plugins,
      [bridge, entry],
    );
  });

  it('refuses to start without a CNI configuration to chain into', (t) => {
    const { binDir, confDir, binarySource } = dirs(t);
    const installer = new CniInstaller({
      binDir,
      confDir,
      binarySource,
      agentSocket: '/run/a.sock',
      policyFile: '/var/lib/a/cni-policy',
      log: silentLogger,
    });
    assert.throws(() => installer.start(), /no CNI configuration in .* to chain into/);
  });
});
