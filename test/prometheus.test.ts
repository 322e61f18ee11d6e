// The agent's /metrics as Prometheus itself reads it: a real Prometheus server (Debian's package),
// started here on 127.0.0.1 with its own configuration and storage, scrapes the running agent every
// second; its HTTP API answers for our metrics and upstream istio-cni's names, and promtool checks
// the exposition text.
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { CLI } from './helpers/cli.js';
import { kernelTest, testBpffsRoot, TEST_PREFIX } from './helpers/kernel.js';
import { assertNothingLeft, removeDatapath } from './helpers/leftovers.js';
import { podWithRemote, Topology } from './helpers/topology.js';
import { sleep, until } from './helpers/wait.js';

after(assertNothingLeft);

/** prometheus and promtool, or why not: outside CI a machine without them skips; CI fails. */
function prometheusMissing(): string | undefined {
  for (const tool of ['prometheus', 'promtool']) {
    try {
      execFileSync(tool, ['--version'], { stdio: 'ignore' });
    } catch {
      const why = `${tool} is not installed (scripts/setup.sh installs Debian’s prometheus)`;
      if (process.env.CI === 'true') throw new Error(`CI=true and ${why}: the metrics test must run in CI`);
      return why;
    }
  }
  return undefined;
}

/** A port free on 127.0.0.1 now (the kernel's pick). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function start(cmd: string, args: string[]): { child: ChildProcess; output: () => string; exited: Promise<unknown> } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  return { child, output: () => out, exited: new Promise((r) => child.once('exit', r)) };
}

async function stop(p: { child: ChildProcess; exited: Promise<unknown> }): Promise<void> {
  if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGTERM');
  await Promise.race([p.exited, new Promise((r) => setTimeout(r, 5000))]);
  if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
}

type Sample = { metric: Record<string, string>; value: [number, string] };

describe('metrics scraped by Prometheus', kernelTest(), () => {
  const skip = prometheusMissing();

  it(
    'a real Prometheus scrapes the agent: our metrics and upstream’s names have the agent’s values; promtool accepts the exposition',
    { skip, timeout: 120_000 },
    async (t) => {
      const topo = new Topology();
      const root = testBpffsRoot(topo.id);
      const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-prometheus-`));
      t.after(() => rmSync(dir, { recursive: true, force: true }));
      // 243: above what the churn tests fill (their hundreds of pods are 198.18.0-199.x), whose netns the
      // agent would also find holding the pod's address when they run at the same time.
      const net = await podWithRemote(topo, 243);
      const binDir = join(dir, 'bin');
      const confDir = join(dir, 'net.d');
      mkdirSync(binDir);
      mkdirSync(confDir);
      writeFileSync(
        join(confDir, '10-bridge.conflist'),
        JSON.stringify({ cniVersion: '1.0.0', name: 'k8s', plugins: [{ type: 'bridge' }] }),
      );
      const pods = join(dir, 'pods.yaml');
      writeFileSync(
        pods,
        [
          'apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { istio.io/dataplane-mode: ambient } }',
          `apiVersion: v1\nkind: Pod\nmetadata: { name: cart, namespace: shop, uid: prom-cart-${topo.id} }\nstatus: { phase: Running, podIP: ${net.podV4} }`,
        ].join('\n---\n'),
      );
      const socket = join(dir, 'ztunnel.sock');
      const metricsPort = await freePort();
      const agent = start(CLI, [
        'agent',
        '--node-name',
        'node-a',
        '--local-pods',
        pods,
        '--ztunnel-socket',
        socket,
        '--plugin-socket',
        join(dir, 'cni.sock'),
        '--cni-policy-file',
        join(dir, 'cni-policy'),
        '--status-socket',
        join(dir, 'status.sock'),
        '--bpffs',
        root,
        '--install-cni',
        '--cni-bin-dir',
        binDir,
        '--cni-conf-dir',
        confDir,
        '--metrics-addr',
        `127.0.0.1:${metricsPort}`,
      ]);
      const ztunnel = start(CLI, ['ztunnel', '--socket', socket]);
      t.after(async () => {
        await stop(ztunnel);
        await stop(agent);
        await removeDatapath(root);
        await topo.cleanup();
      });
      const scrape = async () => (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
      await until(
        async () => /ambient_bpf_pods\{state="enabled"\} 1\n/.test(await scrape().catch(() => '')),
        () => `pod enabled (${agent.output()})`,
        20_000,
      );

      // promtool: the exposition parses and passes Prometheus' own lint (names, units, suffixes).
      const text = await scrape();
      const lint = await new Promise<{ code: number; out: string }>((resolve) => {
        const p = execFile('promtool', ['check', 'metrics'], (err, stdout, stderr) =>
          resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, out: stdout + stderr }),
        );
        p.stdin!.end(text);
      });
      assert.equal(lint.code, 0, `promtool check metrics:\n${lint.out}`);
      assert.equal(lint.out.trim(), '', 'promtool has nothing to say');

      // Prometheus, its own configuration and storage, scraping every second.
      const promPort = await freePort();
      writeFileSync(
        join(dir, 'prometheus.yml'),
        [
          'global: { scrape_interval: 1s, evaluation_interval: 1s }',
          'scrape_configs:',
          '  - job_name: ambient-bpf',
          `    static_configs: [{ targets: ['127.0.0.1:${metricsPort}'], labels: { node: node-a } }]`,
          '',
        ].join('\n'),
      );
      const prometheus = start('prometheus', [
        `--config.file=${join(dir, 'prometheus.yml')}`,
        `--storage.tsdb.path=${join(dir, 'tsdb')}`,
        `--web.listen-address=127.0.0.1:${promPort}`,
        '--log.level=warn',
      ]);
      t.after(() => stop(prometheus));
      const api = `http://127.0.0.1:${promPort}`;
      await until(
        async () => (await fetch(`${api}/-/ready`).catch(() => ({ status: 0 }))).status === 200,
        () => `prometheus ready (${prometheus.output()})`,
        30_000,
      );
      const query = async (q: string): Promise<Sample[]> => {
        const res = (await (await fetch(`${api}/api/v1/query?query=${encodeURIComponent(q)}`)).json()) as {
          status: string;
          data: { resultType: string; result: Sample[] };
          error?: string;
        };
        assert.equal(res.status, 'success', `${q}: ${res.error}`);
        return res.data.result;
      };
      /** The one sample's value, once Prometheus has it. */
      const valueOf = async (q: string): Promise<number> => {
        let last: Sample[] = [];
        await until(
          async () => (last = await query(q)).length > 0 || (await sleep(200), false),
          () => `Prometheus has ${q} (${prometheus.output()})`,
          20_000,
        );
        assert.equal(last.length, 1, `${q}: ${JSON.stringify(last)}`);
        return Number(last[0]!.value[1]);
      };

      // The scrape itself succeeded, with the target's labels.
      assert.equal(await valueOf('up{job="ambient-bpf",node="node-a"}'), 1);
      // Upstream istio-cni's node agent names: their dashboards and alerts read these.
      assert.equal(await valueOf('ztunnel_connected'), 1);
      assert.equal(await valueOf('istio_cni_install_ready'), 1);
      assert.equal(await valueOf('istio_cni_installs_total{result="SUCCESS"}'), 1);
      assert.ok((await valueOf('nodeagent_reconcile_events_total{type="add"}')) >= 1);
      // Ours.
      assert.equal(await valueOf('ambient_bpf_pods{state="enabled"}'), 1);
      assert.equal(await valueOf('ambient_bpf_pods{state="failed"}'), 0);
      assert.equal(await valueOf('ambient_bpf_ztunnel_connections'), 1);
      assert.equal(await valueOf('ambient_bpf_enroll_duration_seconds_count'), 1);
      assert.equal(await valueOf('ambient_bpf_reconcile_errors_total'), 0);
      // The histogram as PromQL uses it: the enrolment took between 0 and the last finite bucket.
      const p99 = await valueOf('histogram_quantile(0.99, ambient_bpf_enroll_duration_seconds_bucket)');
      assert.ok(p99 > 0 && p99 <= 10, `p99 enrolment ${p99}s`);
      // The datapath's counters, per pod by its name.
      const series = await query('ambient_bpf_datapath_events_total{namespace="shop",pod="cart"}');
      assert.ok(series.length > 0, 'the pod’s datapath counters');
      assert.ok(
        series.every((s) => s.metric.uid === `prom-cart-${topo.id}` && s.metric.counter),
        JSON.stringify(series[0]),
      );

      // A change on the agent reaches Prometheus: ztunnel goes, the gauges follow.
      await stop(ztunnel);
      await until(
        async () => Number((await query('ztunnel_connected'))[0]?.value[1]) === 0 || (await sleep(200), false),
        'ztunnel_connected 0 after ztunnel stopped',
        20_000,
      );
      assert.equal(await valueOf('ambient_bpf_ztunnel_connections'), 0);
    },
  );
});
