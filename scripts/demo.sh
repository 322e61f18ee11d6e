#!/usr/bin/env bash
# The embedded default on one machine: sets up, then runs `ambient-bpf demo` (pods as network
# namespaces, the bundled ztunnel stand-in). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cni-agent/bin/ambient-bpf demo "$@"
