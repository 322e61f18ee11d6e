// The product as deployed: the image built from manifests/Dockerfile, run by containerd (CRI,
// runc) exactly as manifests/base/daemonset.yaml specifies (a kubelet stand-in turns the DaemonSet's
// pod spec into CRI calls), next to the ztunnel stand-in in its own pod and app pods whose network
// containerd sets up through the node's CNI configuration, into which the agent's installer
// chained the plugin. The Kubernetes API is the in-repo test server over HTTPS, reached the
// in-cluster way (service env and a mounted service account token and CA).
import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { cgroup2Mount } from '../bpf/src/index.js';
import { REDIRECTION_ANNOTATION } from '../cni-agent/src/pods/pod.js';
import {
  leftoverCgroupsAnyHierarchy,
  podCgroupPath,
  qosClass,
  type CgroupDriver,
  type ContainerdNode,
  type K8sContainer,
  type Kubelet,
  type QosClass,
  type RunningPod,
} from './helpers/cri.js';
import { appPod, DeployedNode, runtimeTest } from './helpers/deployed-node.js';
import type { KubeApiTestServer } from './helpers/kube-api-server.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { sleep, until } from './helpers/wait.js';

const CLI_IN_IMAGE = '/opt/ambient-bpf/cni-agent/bin/ambient-bpf';

interface StandInPod {
  name: string;
  namespace: string;
  recent: { direction: string; source: string; destination: string }[];
  stats: Record<string, { connections: number }>;
}
interface StatusPod {
  name: string;
  namespace: string;
  state: string;
  ztunnel: string;
  hooks: string;
  reason: string;
  dnsCapture: string;
  counters?: Record<string, number>;
}

/** Requests and limits that make a pod of each QoS class. */
const RESOURCES: Record<QosClass, K8sContainer['resources']> = {
  Guaranteed: { requests: { cpu: '100m', memory: '32Mi' }, limits: { cpu: '100m', memory: '32Mi' } },
  Burstable: { requests: { cpu: '50m' } },
  BestEffort: undefined,
};

// (as assertNothingLeft: only what appeared while this file ran is this file's)
const cgroupsAtStart = new Set(leftoverCgroupsAnyHierarchy());
after(async () => {
  await assertNothingLeft();
  assert.deepEqual(
    leftoverCgroupsAnyHierarchy().filter((c) => !cgroupsAtStart.has(c)),
    [],
    'test cgroups left behind',
  );
});

describe('the product as deployed: the image under containerd, as the DaemonSet runs it', runtimeTest(), () => {
  let node: ContainerdNode;
  let api: KubeApiTestServer;
  let kubelet: Kubelet;
  let agent: RunningPod;
  let ztunnel: RunningPod;
  const app: Record<string, RunningPod> = {};

  const annotation = (rp: RunningPod) =>
    (
      api.get('pods', rp.pod.metadata.name, rp.pod.metadata.namespace)?.metadata as
        { annotations?: Record<string, string> } | undefined
    )?.annotations?.[REDIRECTION_ANNOTATION];

  /** `ambient-bpf status --json` inside the agent's container. */
  /** Does the agent answer, with both ambient shop pods acked by ztunnel? */
  async function shopPodsAcked(): Promise<boolean> {
    try {
      const s = await agentStatus();
      return ['shop/cart', 'shop/web'].every(
        (n) => s.find((p) => `${p.namespace}/${p.name}` === n)?.ztunnel === 'acked',
      );
    } catch {
      return false;
    }
  }

  async function agentStatus(): Promise<StatusPod[]> {
    const r = await kubelet.exec(agent, 'agent', [
      CLI_IN_IMAGE,
      'status',
      '--json',
      '--status-socket=/var/run/ambient-bpf/status.sock',
    ]);
    assert.equal(r.exit_code, 0, `ambient-bpf status in the agent container: ${r.stderr}`);
    return (JSON.parse(r.stdout) as { pods: StatusPod[] }).pods;
  }

  /** What the ztunnel stand-in saw (it prints its counters on SIGUSR1). */
  async function standInStats(): Promise<StandInPod[]> {
    const before = kubelet.containerLog(ztunnel, 'istio-proxy').split('\n').length;
    const r = await kubelet.exec(ztunnel, 'istio-proxy', ['node', '-e', 'process.kill(1, "SIGUSR1")']);
    assert.equal(r.exit_code, 0, r.stderr);
    let line: string | undefined;
    await until(() => {
      line = kubelet
        .containerLog(ztunnel, 'istio-proxy')
        .split('\n')
        .slice(before - 1)
        .find((l) => l.startsWith('{"pods":'));
      return line !== undefined;
    }, 'the stand-in printing its counters');
    return (JSON.parse(line!) as { pods: StandInPod[] }).pods;
  }

  /** An HTTP request from one app pod to another's server; the peer address the server saw. */
  async function fetchPeer(from: RunningPod, to: RunningPod): Promise<string> {
    // (Debian's static busybox wget crashes with -T; ExecSync's timeout bounds the request.)
    const r = await kubelet.exec(from, 'app', ['wget', '-q', '-O', '-', `http://${to.ips[0]}:8080/cgi-bin/peer`]);
    assert.equal(r.exit_code, 0, `${from.pod.metadata.name} -> ${to.pod.metadata.name}: ${r.stderr}`);
    // busybox httpd listens on IPv6 and shows IPv4 peers mapped: [::ffff:198.18.10.5].
    return r.stdout
      .trim()
      .split(' ')[0]!
      .replace(/^\[(?:::ffff:)?|\]$/g, '');
  }

  const deployed = new DeployedNode();

  before(
    async () => {
      await deployed.start();
      [node, api, kubelet, agent, ztunnel] = [
        deployed.node!,
        deployed.api!,
        deployed.kubelet!,
        deployed.agent!,
        deployed.ztunnel!,
      ];
      app.cart = await kubelet.runPod(appPod('cart', 'shop'));
      app.web = await kubelet.runPod(appPod('web', 'shop'));
      app.legacy = await kubelet.runPod(appPod('legacy', 'shop', { 'istio.io/dataplane-mode': 'none' }));
      app.old = await kubelet.runPod(appPod('old', 'plain'));
    },
    { timeout: 30 * 60_000 },
  );

  after(() => deployed.stop(), { timeout: 120_000 });

  it('runs the agent under the DaemonSet’s privileges and reaches the API the in-cluster way', async () => {
    const st = await kubelet.containerState(agent, 'agent');
    assert.equal(st.state, 'CONTAINER_RUNNING', kubelet.containerLog(agent, 'agent'));
    assert.ok(
      api.requests.some((r) => r.path === '/api/v1/pods' && r.watch),
      'the agent watches pods through the API',
    );
    // The container's own view: the capabilities the DaemonSet grants and nothing else.
    const caps = await kubelet.exec(agent, 'agent', [
      'node',
      '-e',
      'process.stdout.write(require("fs").readFileSync("/proc/self/status","utf8"))',
    ]);
    const eff = BigInt(`0x${/CapEff:\s*([0-9a-f]+)/.exec(caps.stdout)![1]}`);
    const bits = { NET_ADMIN: 12n, SYS_ADMIN: 21n, SYS_PTRACE: 19n, BPF: 39n };
    const want = Object.values(bits).reduce((a, b) => a | (1n << b), 0n);
    assert.equal(eff, want, `effective capabilities ${eff.toString(16)}`);
    assert.match(caps.stdout, /NoNewPrivs:\s*1/);
    assert.match(caps.stdout, /Seccomp:\s*2/, 'RuntimeDefault seccomp filter');
    const ro = await kubelet.exec(agent, 'agent', ['node', '-e', 'require("fs").writeFileSync("/opt/x", "")']);
    assert.notEqual(ro.exit_code, 0, 'the root file system is read-only');
    // kubelet's probes, as the DaemonSet declares them, from the node.
    await until(
      async () => (await kubelet.probe(agent, 'agent', 'readinessProbe').catch(() => 0)) === 200,
      'the readiness probe passing',
      30_000,
    );
    assert.equal(await kubelet.probe(agent, 'agent', 'livenessProbe'), 200);
  });

  it('redirects ambient pods and ztunnel acks them; leaves opted-out and plain pods alone', async () => {
    await until(
      () => annotation(app.cart!) === 'enabled' && annotation(app.web!) === 'enabled',
      'ambient pods annotated enabled',
      30_000,
    );
    assert.equal(annotation(app.legacy!), undefined);
    assert.equal(annotation(app.old!), undefined);
    const status = await agentStatus();
    const byName = new Map(status.map((p) => [`${p.namespace}/${p.name}`, p]));
    for (const n of ['shop/cart', 'shop/web'])
      assert.equal(byName.get(n)?.ztunnel, 'acked', `${n}: ${JSON.stringify(byName.get(n))}`);
    for (const n of ['shop/legacy', 'plain/old'])
      assert.notEqual(byName.get(n)?.ztunnel, 'acked', `${n}: ${JSON.stringify(byName.get(n))}`);
  });

  it('sends ambient pod-to-pod traffic through ztunnel with the original destination; the others go direct', async () => {
    const peerSeen = await fetchPeer(app.web!, app.cart!);
    const stats = await standInStats();
    const web = stats.find((p) => p.name === 'web');
    const cart = stats.find((p) => p.name === 'cart');
    assert.ok(
      web?.recent.some((c) => c.direction === 'outbound' && c.destination === `${app.cart!.ips[0]}:8080`),
      `web's outbound through ztunnel to cart's address: ${JSON.stringify(web)}`,
    );
    assert.ok(
      cart?.recent.some((c) => c.direction === 'inbound' && c.destination === `${app.cart!.ips[0]}:8080`),
      `cart's inbound through ztunnel: ${JSON.stringify(cart)}`,
    );
    // ztunnel connects to the app from the client's own address (as upstream's in-node path does).
    assert.equal(peerSeen, app.web!.ips[0]);
    // The agent's metrics (the DaemonSet's metrics port, from the node) count it for the pod.
    const metricsPort = kubelet.containerPort(agent.pod.spec.containers[0]!, 'metrics');
    const metrics = await kubelet.httpGetFromNode('127.0.0.1', metricsPort, '/metrics');
    assert.equal(metrics.status, 200);
    const redirected =
      /^ambient_bpf_datapath_events_total\{[^}]*namespace="shop",pod="web"[^}]*counter="outboundRedirected"[^}]*\} (\d+)/m.exec(
        metrics.body,
      );
    assert.ok(
      redirected && Number(redirected[1]) >= 1,
      `web's outbound redirections in /metrics: ${metrics.body
        .split('\n')
        .filter((l) => l.includes('pod="web"'))
        .join('\n')}`,
    );
    // The same over IPv6 (the pods' second address).
    const web6 = app.web!.ips.find((ip) => ip.includes(':'));
    const cart6 = app.cart!.ips.find((ip) => ip.includes(':'));
    assert.ok(web6 && cart6, `IPv6 addresses: ${app.web!.ips.join(' ')} ${app.cart!.ips.join(' ')}`);
    const r6 = await kubelet.exec(app.web!, 'app', ['wget', '-q', '-O', '-', `http://[${cart6}]:8080/cgi-bin/peer`]);
    assert.equal(r6.exit_code, 0, `web -> cart over IPv6: ${r6.stderr}`);
    assert.equal(
      r6.stdout
        .trim()
        .split(' ')[0]!
        .replace(/^\[|\]$/g, ''),
      web6,
    );
    const stats6 = await standInStats();
    assert.ok(
      stats6
        .find((p) => p.name === 'web')
        ?.recent.some((c) => c.direction === 'outbound' && c.destination === `[${cart6}]:8080`),
      `web's IPv6 outbound through ztunnel to cart's address: ${JSON.stringify(stats6.find((p) => p.name === 'web')?.recent)}`,
    );
    // Opted out and plain: direct, the server sees the client's own address, ztunnel sees nothing.
    assert.equal(await fetchPeer(app.legacy!, app.old!), app.legacy!.ips[0]);
    assert.equal(await fetchPeer(app.old!, app.legacy!), app.old!.ips[0]);
    const after = await standInStats();
    assert.deepEqual(after.map((p) => `${p.namespace}/${p.name}`).sort(), ['shop/cart', 'shop/web']);
  });

  it(
    'enrols a pod that was already running when its namespace is labelled (its netns found from the container)',
    { timeout: 90_000 },
    async () => {
      const label = (mode?: string) =>
        api.upsert('namespaces', {
          apiVersion: 'v1',
          kind: 'Namespace',
          metadata: { name: 'plain', labels: mode ? { 'istio.io/dataplane-mode': mode } : {} },
        });
      label('ambient');
      await until(() => annotation(app.old!) === 'enabled', 'the running pod enrolled and acked', 30_000);
      assert.equal(await fetchPeer(app.legacy!, app.old!), app.legacy!.ips[0]);
      assert.ok(
        (await standInStats())
          .find((p) => p.name === 'old')
          ?.recent.some((c) => c.direction === 'inbound' && c.destination === `${app.old!.ips[0]}:8080`),
        'its inbound through ztunnel',
      );
      label();
      await until(() => annotation(app.old!) === undefined, 'unenrolled after the label went', 30_000);
      await until(async () => !(await standInStats()).some((p) => p.name === 'old'), 'ztunnel told', 30_000);
    },
  );

  it('keeps pods captured while the agent is killed, and converges after kubelet restarts it', async () => {
    await kubelet.killContainer(agent, 'agent');
    const during = await standInStats();
    const before = during.find((p) => p.name === 'web')?.stats.outbound?.connections ?? 0;
    await fetchPeer(app.web!, app.cart!);
    const stats = await standInStats();
    assert.equal(
      stats.find((p) => p.name === 'web')?.stats.outbound?.connections,
      before + 1,
      'captured while the agent is down',
    );
    await kubelet.startContainer(agent, 'agent');
    await until(shopPodsAcked, 'the restarted agent adopting the pods and ztunnel acking them', 60_000);
    assert.equal(annotation(app.cart!), 'enabled');
    await fetchPeer(app.web!, app.cart!);
  });

  it(
    'survives a rolling update: SIGTERM within the grace period, pods stay captured, the new agent adopts them',
    { timeout: 120_000 },
    async () => {
      const started = Date.now();
      assert.equal(
        await kubelet.stopContainer(agent, 'agent'),
        0,
        `the agent's exit on SIGTERM: ${kubelet.containerLog(agent, 'agent').slice(-500)}`,
      );
      assert.ok(
        Date.now() - started < (agent.pod.spec.terminationGracePeriodSeconds ?? 30) * 1000,
        'stopped within the grace period',
      );
      assert.match(
        kubelet.containerLog(agent, 'agent'),
        /the DaemonSet still runs on this node \(an upgrade or a restart\): leaving everything in place/,
        'decided from the API, not for want of an answer',
      );
      assert.equal(await fetchPeer(app.web!, app.cart!), app.web!.ips[0]);
      await kubelet.startContainer(agent, 'agent');
      await until(shopPodsAcked, 'the new agent adopting the pods', 60_000);
    },
  );

  it(
    'needs each capability the DaemonSet grants, and names the one that is missing',
    { timeout: 180_000 },
    async () => {
      const c = agent.pod.spec.containers[0]!;
      const granted = [...(c.securityContext!.capabilities!.add ?? [])];
      try {
        for (const cap of granted) {
          await kubelet.killContainer(agent, 'agent');
          c.securityContext!.capabilities!.add = granted.filter((x) => x !== cap);
          await kubelet.startContainer(agent, 'agent');
          if (cap === 'BPF') {
            // Covered by SYS_ADMIN (the kernel's bpf_capable()); the verifier refuses these programs
            // to CAP_BPF without CAP_SYS_ADMIN or CAP_PERFMON, so SYS_ADMIN is the one that counts.
            await until(shopPodsAcked, 'the agent working without BPF (SYS_ADMIN covers it)', 30_000);
            continue;
          }
          await until(
            async () => (await kubelet.containerState(agent, 'agent')).state === 'CONTAINER_EXITED',
            `the agent stopping without ${cap}`,
            30_000,
          );
          const st = await kubelet.containerState(agent, 'agent');
          const log = kubelet.containerLog(agent, 'agent');
          assert.notEqual(st.exit_code, 0);
          assert.match(
            log,
            new RegExp(`missing capabilit(y|ies) CAP_${cap} \\(`),
            `the reason names CAP_${cap}: ${log.slice(-500)}`,
          );
          // Still captured meanwhile: the pins hold.
          await fetchPeer(app.web!, app.cart!);
        }
      } finally {
        await kubelet.killContainer(agent, 'agent');
        c.securityContext!.capabilities!.add = granted;
        await kubelet.startContainer(agent, 'agent');
      }
      await until(shopPodsAcked, 'the agent with every capability again', 60_000);
    },
  );

  it(
    'captures the DNS and outbound TCP of app containers in every kubelet cgroup layout, from their first packet',
    { timeout: 240_000 },
    async () => {
      // Any address: DNS capture sends the query to ztunnel's 15053 in the pod whatever the server.
      const server = app.web!.ips[0]!;
      for (const driver of ['cgroupfs', 'systemd'] as CgroupDriver[]) {
        for (const qos of ['Guaranteed', 'Burstable', 'BestEffort'] as QosClass[]) {
          const layout = `${driver}/${qos}`;
          const pod = appPod(`l-${driver.slice(0, 3)}-${qos.toLowerCase()}`, 'shop');
          // The container's first act, right after the CNI ADD returned: a DNS query.
          Object.assign(pod.spec.containers[0]!, {
            resources: RESOURCES[qos],
            command: [
              '/bin/sh',
              '-c',
              `busybox nslookup first.abp.test ${server} >/dev/null 2>&1 & exec /bin/httpd -f -p 8080 -h /www`,
            ],
          });
          assert.equal(qosClass(pod.spec), qos);
          kubelet.cgroupDriver = driver;
          const rp = await kubelet.runPod(pod);
          try {
            assert.ok(
              existsSync(join(cgroup2Mount(), podCgroupPath(node.cgroupParent, rp.uid, qos, driver))),
              `${layout}: the pod cgroup where kubelet makes it`,
            );
            await until(() => annotation(rp) === 'enabled', `${layout}: enabled`, 30_000);
            const dnsSeen = async () =>
              (await standInStats()).find((p) => p.name === pod.metadata.name)?.stats.dns?.connections ?? 0;
            await until(
              async () => (await dnsSeen()) >= 1,
              `${layout}: the container's first DNS query reaching ztunnel's 15053`,
              15_000,
            );
            assert.equal((await agentStatus()).find((p) => p.name === pod.metadata.name)?.dnsCapture, 'on', layout);
            // Outbound TCP: the connect hook on the pod's cgroup routes the app's socket over lo to
            // ztunnel (the interface path would loop it through eth0 and leave lo idle).
            const loPackets = async () =>
              Number((await kubelet.exec(rp, 'app', ['cat', '/sys/class/net/lo/statistics/tx_packets'])).stdout.trim());
            const lo0 = await loPackets();
            assert.equal(
              await fetchPeer(rp, app.web!),
              rp.ips[0],
              `${layout}: ztunnel connects from the client's address`,
            );
            const lo1 = await loPackets();
            assert.ok(lo1 - lo0 >= 4, `${layout}: the connection went over lo (${lo1 - lo0} packets)`);
            const seen = (await standInStats()).find((p) => p.name === pod.metadata.name);
            assert.ok(
              seen?.recent.some((c) => c.direction === 'outbound' && c.destination === `${app.web!.ips[0]}:8080`),
              `${layout}: outbound through ztunnel: ${JSON.stringify(seen)}`,
            );
            const counters = (await agentStatus()).find((p) => p.name === pod.metadata.name)?.counters;
            assert.ok(
              (counters?.outboundRedirected ?? 0) >= 1,
              `${layout}: outboundRedirected ${JSON.stringify(counters)}`,
            );
          } finally {
            kubelet.cgroupDriver = 'cgroupfs';
            await kubelet.deletePod(rp);
          }
        }
      }
    },
  );

  it('needs each host path the DaemonSet mounts, and names the one that is missing', { timeout: 240_000 }, async () => {
    const spec = agent.pod.spec;
    const c = spec.containers[0]!;
    const [volumes, mounts] = [spec.volumes!, c.volumeMounts!];
    const hostPaths = volumes.filter((v) => v.hostPath);
    assert.ok(hostPaths.length >= 8, `the DaemonSet's host paths: ${hostPaths.map((v) => v.hostPath!.path).join(' ')}`);
    try {
      for (const dropped of hostPaths) {
        await kubelet.killContainer(agent, 'agent');
        spec.volumes = volumes.filter((v) => v !== dropped);
        c.volumeMounts = mounts.filter((m) => m.name !== dropped.name);
        await kubelet.startContainer(agent, 'agent');
        const path = dropped.hostPath!.path;
        await until(
          async () => (await kubelet.containerState(agent, 'agent')).state === 'CONTAINER_EXITED',
          `the agent stopping without the host's ${path}`,
          30_000,
        );
        const st = await kubelet.containerState(agent, 'agent');
        const log = kubelet.containerLog(agent, 'agent');
        assert.notEqual(st.exit_code, 0);
        assert.ok(log.includes(`(hostPath ${path})`), `the reason names the host's ${path}: ${log.slice(-800)}`);
        // Still captured meanwhile: the pins hold.
        await fetchPeer(app.web!, app.cart!);
      }
    } finally {
      await kubelet.killContainer(agent, 'agent');
      [spec.volumes, c.volumeMounts] = [volumes, mounts];
      await kubelet.startContainer(agent, 'agent');
    }
    await until(shopPodsAcked, 'the agent with every host path again', 60_000);
  });

  it('unenrols a deleted pod: StopPodSandbox runs CNI DEL through the chained plugin', async () => {
    const uid = app.cart!.uid;
    const pins = join(node.bpffs, 'ambient-bpf', 'pods', uid);
    assert.ok(existsSync(pins), `pins of cart at ${pins}`);
    await kubelet.deletePod(app.cart!);
    delete app.cart;
    await until(() => !existsSync(pins), 'the pod’s pins removed', 30_000);
    await until(
      async () => !(await agentStatus()).some((p) => p.name === 'cart'),
      'the agent forgetting the pod',
      30_000,
    );
    await until(async () => !(await standInStats()).some((p) => p.name === 'cart'), 'ztunnel told', 30_000);
    await sleep(0);
  });

  // Last: it takes ambient-bpf off the node.
  it(
    'takes ambient-bpf off the node on SIGTERM once its DaemonSet is deleted, under the container’s own privileges',
    { timeout: 120_000 },
    async () => {
      const conflist = node.hostPath('/etc/cni/net.d/10-pods.conflist');
      const chained = () =>
        (JSON.parse(readFileSync(conflist, 'utf8')) as { plugins: { type: string }[] }).plugins.map((p) => p.type);
      const plugin = node.hostPath('/opt/cni/bin/ambient-bpf-cni');
      // /var/lib is an overlay on the node: what the agent wrote there is in its upper directory, and
      // a file it removed is gone from there, or a whiteout (a character device) where the host has one.
      const policy = join(node.dir, 'varlib-up/ambient-bpf/cni-policy');
      const isFile = (p: string) => existsSync(p) && statSync(p).isFile();
      const webPins = join(node.bpffs, 'ambient-bpf', 'pods', app.web!.uid);
      assert.ok(
        chained().includes('ambient-bpf-cni') && existsSync(plugin) && isFile(policy) && existsSync(webPins),
        'installed before',
      );
      assert.equal(annotation(app.web!), 'enabled');

      assert.equal(api.daemonSets.size, 1);
      api.daemonSets.clear(); // kubectl delete daemonset: the API no longer has it when the pod stops
      assert.equal(
        await kubelet.stopContainer(agent, 'agent'),
        0,
        `the agent's exit on SIGTERM: ${kubelet.containerLog(agent, 'agent').slice(-1000)}`,
      );
      const log = kubelet.containerLog(agent, 'agent');

      assert.deepEqual(chained(), ['bridge'], `the conflist as the node had it before the agent: ${log.slice(-1500)}`);
      assert.ok(!existsSync(plugin), 'the plugin binary removed');
      assert.ok(!isFile(policy), 'the plugin’s policy removed');
      assert.ok(!existsSync(webPins), 'the pods’ redirection removed');
      assert.equal(annotation(app.web!), undefined, 'the redirection annotation removed');
      // The node still starts pods, ambient-labelled ones included, as plain pods.
      app.late = await kubelet.runPod(appPod('late', 'shop'));
      assert.equal(await fetchPeer(app.late, app.web!), app.late.ips[0]);
    },
  );
});
