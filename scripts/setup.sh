#!/usr/bin/env bash
# Prepares a fresh Debian machine (as root) to build and run ambient-bpf: Debian packages, npm
# packages, the build, and a bpffs mount. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build: clang (BPF target), libbpf/libelf/zlib (native addon), make/gcc/python3 (node-gyp).
# Run and test: iproute2 (ip, tc), util-linux (nsenter), bpftool, procps (sysctl);
# iptables for the benchmark's upstream baseline; containernetworking-plugins (bridge, host-local)
# for the CNI chaining tests; python3-scapy for the crafted packets of the attack tests (run with
# Debian's /usr/bin/python3, which is where it installs); netcat-openbsd, curl, socat and iperf3,
# the real programs of the TCP-semantics tests.
# The test of the product as deployed (test/deployed.test.ts): containerd (with its CRI plugin) and
# runc run the image; mmdebstrap and buildah build it (scripts/build-image.sh); busybox-static makes
# the test's pause and app images; openssl the API test server's certificate.
# The old-kernel check (test/old-kernel.test.ts): qemu-system-x86 boots Debian's Linux 6.1 (fetched
# by apt-get download, never installed) with a busybox-static initramfs.
# The formatter check (npm run lint): clang-format for the C sources (prettier, for TypeScript, is an
# npm dev dependency).
# The metrics test (test/prometheus.test.ts): prometheus scrapes the agent (a server the test starts
# on 127.0.0.1 with its own configuration and storage) and its promtool checks the exposition.
packages=(clang libbpf-dev libelf-dev zlib1g-dev make gcc g++ libc6-dev binutils python3 iproute2 util-linux bpftool procps iptables containernetworking-plugins python3-scapy
  netcat-openbsd curl socat iperf3 containerd runc mmdebstrap buildah busybox-static openssl prometheus
  qemu-system-x86 clang-format)
# `kubectl kustomize` renders the platform overlays (test/manifests.test.ts): Debian's kubectl is
# in kubernetes-client. A machine that has a kubectl already (another package's, such as Google
# Cloud SDK's) keeps it: both ship /usr/bin/kubectl, and dpkg refuses to install the second.
command -v kubectl >/dev/null || packages+=(kubernetes-client)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  # Debian's prometheus starts a system server (on *:9090, scraping the node) as it installs, where
  # invoke-rc.d or systemd can. The tests start their own, and a metrics server nobody asked for
  # should not run: while installing, a policy-rc.d answering 101 ("action forbidden", which
  # invoke-rc.d and deb-systemd-invoke obey) keeps every package's service from starting. It is
  # removed afterwards, unless the machine had one already (container images ship one), which stays.
  # --no-install-recommends matters here too: prometheus recommends the node exporter, another
  # service.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# scripts/setup.sh: no service starts while it installs packages.\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  # Debian's containerd enables and starts a system service where systemd runs. The tests never use
  # it (they start their own containerd with its own socket, root, state, network and mount
  # namespaces), and a node runtime nobody asked for should not keep running: when this script is
  # what installed containerd, that service is stopped and disabled. Where there is no systemd (as
  # in CI's sandbox) nothing was started.
  if [[ " ${missing[*]} " == *" containerd "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now containerd.service >/dev/null 2>&1 || true
  fi
  # Same for prometheus: not started above, and not enabled for the next boot either.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-fund --no-audit --loglevel=error
fi

echo "setup: npm run build"
npm run --silent build >/dev/null

if ! mountpoint -q /sys/fs/bpf; then
  echo "setup: mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
