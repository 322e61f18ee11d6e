#!/usr/bin/env bash
# Runs every test (lint, types, and the kernel tests with real namespaces and packets), after
# doing its own set-up. Needs root on Linux 6.6+ for the tcx tests (the tc fallback runs anywhere
# BPF does).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/sweep-test-leftovers.sh
npm test
