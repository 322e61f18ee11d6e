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
packages=(clang libbpf-dev libelf-dev zlib1g-dev make gcc g++ libc6-dev binutils python3 iproute2 util-linux bpftool procps iptables containernetworking-plugins python3-scapy
  netcat-openbsd curl socat iperf3 containerd runc mmdebstrap buildah busybox-static openssl
  qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's containerd enables and starts a system service where systemd runs. The tests never use
  # it (they start their own containerd with its own socket, root, state, network and mount
  # namespaces), and a node runtime nobody asked for should not keep running: when this script is
  # what installed containerd, that service is stopped and disabled. Where there is no systemd (as
  # in CI's sandbox) nothing was started.
  if [[ " ${missing[*]} " == *" containerd "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now containerd.service >/dev/null 2>&1 || true
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
