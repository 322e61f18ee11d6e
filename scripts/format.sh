#!/usr/bin/env bash
# Formats the sources the project owns: TypeScript with prettier (.prettierrc.json), C with
# clang-format (.clang-format: the kernel's style). `scripts/format.sh --check` changes nothing and
# fails naming the files that are not formatted (npm run lint runs it, so CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t ts < <(git ls-files '*.ts')
mapfile -t c < <(git ls-files '*.c' '*.h')
if [ "${1:-}" = --check ]; then
  status=0
  npx prettier --check --log-level warn "${ts[@]}" || status=1
  clang-format --dry-run --Werror "${c[@]}" 2>&1 | grep -o '^[^:]*\.[ch]:' | sort -u | sed 's/:$/: not formatted (clang-format)/' || true
  clang-format --dry-run --Werror "${c[@]}" >/dev/null 2>&1 || status=1
  [ "$status" = 0 ] || echo "format: run scripts/format.sh (npm run format) to format these files" >&2
  exit "$status"
fi
npx prettier --write --log-level warn "${ts[@]}"
clang-format -i "${c[@]}"
