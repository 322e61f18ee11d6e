// kubelet's pod cgroups: the path parser on real-world shapes (both cgroup drivers, every QoS
// class, prefixes, cgroup namespaces), and DNS capture's pod cgroup found for every QoS class in a
// real cgroup v2 tree with a real "pause" process in it.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { CgroupLocator, kubeletPodCgroup } from '../cni-agent/src/enrollment/cgroup-locator.js';
import { parsePodCgroupPath, podUidOfCgroupName, podUidOfProcCgroup } from '../cni-agent/src/pods/pod-cgroup.js';
import { kernelTest } from './helpers/kernel.js';
import { KubeletCgroups } from './helpers/kubelet-cgroups.js';
import { assertNothingLeft } from './helpers/leftovers.js';
import { Topology } from './helpers/topology.js';

const UID = '2c48913c-b29f-11e7-9350-020968147796';
const UID_ = UID.replace(/-/g, '_');
const CTR = '9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961';

describe('pod cgroup paths', () => {
  it('finds the pod uid and pod cgroup in every path shape kubelet makes', () => {
    const cases: [string, string][] = [
      // cgroupfs driver: Guaranteed, Burstable, BestEffort
      [`/kubepods/pod${UID}/${CTR}`, `/kubepods/pod${UID}`],
      [`/kubepods/burstable/pod${UID}/${CTR}`, `/kubepods/burstable/pod${UID}`],
      [`/kubepods/besteffort/pod${UID}/${CTR}`, `/kubepods/besteffort/pod${UID}`],
      [`/kubepods/besteffort/pod${UID}`, `/kubepods/besteffort/pod${UID}`],
      // systemd driver
      [
        `/kubepods.slice/kubepods-pod${UID_}.slice/cri-containerd-${CTR}.scope`,
        `/kubepods.slice/kubepods-pod${UID_}.slice`,
      ],
      [
        `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod${UID_}.slice/crio-${CTR}.scope`,
        `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod${UID_}.slice`,
      ],
      [
        `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${UID_}.slice/docker-${CTR}.scope`,
        `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${UID_}.slice`,
      ],
      // leading prefixes: kubelet's --cgroup-root, a kind node inside docker, another cgroup namespace
      [
        `/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubepods-besteffort-pod${UID_}.slice/cri-containerd-${CTR}.scope`,
        `/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubepods-besteffort-pod${UID_}.slice`,
      ],
      [
        `/docker/8d461fa5765781bcf5f7eb192f101bc3103d4b932e26236f43feecfa20664f96/kubepods/besteffort/pod${UID}/${CTR}`,
        `/docker/8d461fa5765781bcf5f7eb192f101bc3103d4b932e26236f43feecfa20664f96/kubepods/besteffort/pod${UID}`,
      ],
      [`/../../pod${UID}/${CTR}`, `/../../pod${UID}`],
      [
        `/../../kubepods-besteffort-pod${UID_}.slice/cri-containerd-${CTR}.scope`,
        `/../../kubepods-besteffort-pod${UID_}.slice`,
      ],
      // a runtime's directory below the pod cgroup, and a deleted cgroup
      [`/kubepods/burstable/pod${UID}/${CTR}/init`, `/kubepods/burstable/pod${UID}`],
      [`/kubepods/pod${UID}/${CTR} (deleted)`, `/kubepods/pod${UID}`],
      // uppercase hex is canonicalised
      [`/kubepods/pod${UID.toUpperCase()}/${CTR}`, `/kubepods/pod${UID.toUpperCase()}`],
    ];
    for (const [path, podCgroup] of cases) assert.deepEqual(parsePodCgroupPath(path), { uid: UID, podCgroup }, path);
  });

  it('finds no pod in paths that are no pod’s, or name two pods', () => {
    const other = randomUUID();
    for (const path of [
      '/',
      '/system.slice/containerd.service',
      '/user.slice/user-0.slice/session-1.scope',
      '/kubepods/besteffort',
      '/kubepods.slice/kubepods-besteffort.slice',
      `/kubepods/podnot-a-uid/${CTR}`,
      `/kubepods/xpod${UID}/${CTR}`,
      `/kubepods/pod${UID}x/${CTR}`,
      `/kubepods/pod${UID.slice(0, 9)}${UID_.slice(9)}/${CTR}`, // mixed separators
      `/kubepods.slice/pod${UID_}.slice/${CTR}`, // a slice without kubelet's kubepods prefix
      `/kubepods/besteffort/pod${other}/${CTR}/pod${UID}/x`, // a pod naming a cgroup after another
      `/kubepods/besteffort/pod${other}/${CTR}/kubepods-pod${UID_}.slice/x`,
      `/crio-${CTR}.scope`,
    ]) {
      assert.equal(parsePodCgroupPath(path), undefined, path);
    }
    assert.equal(podUidOfCgroupName(`kubepods-burstable-pod${UID_}.slice`), UID);
    assert.equal(podUidOfCgroupName(`pod${UID}`), UID);
    assert.equal(podUidOfCgroupName('besteffort'), undefined);
  });

  it('reads the cgroup v2 line of /proc/PID/cgroup (hybrid hosts list v1 controllers first)', () => {
    const hybrid = `12:memory:/kubepods/besteffort/pod${randomUUID()}/${CTR}\n1:name=systemd:/x\n0::/kubepods/besteffort/pod${UID}/${CTR}\n`;
    assert.equal(podUidOfProcCgroup(hybrid), UID);
    assert.equal(podUidOfProcCgroup('0::/system.slice/sshd.service\n'), undefined);
    assert.equal(podUidOfProcCgroup(`12:memory:/kubepods/pod${UID}/${CTR}\n`), undefined, 'no cgroup v2 line');
  });
});

after(assertNothingLeft);

describe('DNS capture’s pod cgroup', kernelTest(), () => {
  it('is kubelet’s pod cgroup for Guaranteed, Burstable and BestEffort pods, both drivers, not the pause container’s', async (t) => {
    const topo = new Topology();
    const cgroups = new KubeletCgroups(topo.id);
    t.after(async () => {
      await cgroups.cleanup();
      await topo.cleanup();
    });
    const layouts: [string, (uid: string) => string][] = [
      ['cgroupfs guaranteed', (uid) => `kubepods/pod${uid}`],
      ['cgroupfs burstable', (uid) => `kubepods/burstable/pod${uid}`],
      ['cgroupfs besteffort', (uid) => `kubepods/besteffort/pod${uid}`],
      ['systemd guaranteed', (uid) => `kubepods.slice/kubepods-pod${uid.replace(/-/g, '_')}.slice`],
      [
        'systemd burstable',
        (uid) => `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod${uid.replace(/-/g, '_')}.slice`,
      ],
      [
        'systemd besteffort',
        (uid) => `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${uid.replace(/-/g, '_')}.slice`,
      ],
    ];
    const locator = new CgroupLocator('/', { kubeletRoot: cgroups.root });
    let n = 0;
    for (const [what, layout] of layouts) {
      const uid = randomUUID();
      const netns = Topology.netnsPath(await topo.netns(`cg${n++}`));
      const pod = layout(uid);
      // The pause container's process, in a container cgroup below the pod's.
      await cgroups.sleeper(join(pod, 'pause'), netns);
      assert.equal(kubeletPodCgroup(cgroups.root, uid), join(cgroups.root, pod), what);
      assert.equal(locator.find(uid, netns), join(cgroups.root, pod), what);
    }
  });
});
