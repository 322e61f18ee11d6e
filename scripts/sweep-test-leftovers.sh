#!/usr/bin/env bash
# Removes what an interrupted earlier test run left on this machine (a killed runner cannot run its
# cleanup hooks), so that each test file's "nothing left behind" check measures this run only.
# Touches nothing but the test prefix's own names: network namespaces, cgroups, bpffs directories
# and /tmp directories called "<prefix>-*" (TEST_NAME_PREFIX, default abt), and the processes
# running inside those namespaces and cgroups, which only the tests start; with the default prefix
# also a killed demo test's demo (below).
set -uo pipefail
prefix="${TEST_NAME_PREFIX:-abt}"
[[ "$prefix" =~ ^[a-z]{2,4}$ ]] || prefix=abt
swept=()

# The demo (test/demo.test.ts runs it) names its own: netns "ambd-<id>-*", bpffs and /tmp
# "ambient-bpf-demo-<id>". Swept with the default prefix only, the one CI's run uses: a side run
# with its own prefix must not take a demo another run is showing.
demo_ns='^$'
demo_dirs=()
if [ "$prefix" = abt ]; then
  demo_ns='^ambd-'
  demo_dirs=(/sys/fs/bpf/ambient-bpf-demo-* /tmp/ambient-bpf-demo-*)
fi

for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}-|${demo_ns}"); do
  pids=$(ip netns pids "$ns" 2>/dev/null)
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  ip netns delete "$ns" 2>/dev/null && swept+=("netns $ns")
done

# Every cgroup hierarchy (v2, and v1 controllers where the machine still mounts them).
for mnt in $(awk '$3 == "cgroup" || $3 == "cgroup2" {print $2}' /proc/mounts); do
  for dir in "$mnt/${prefix}-"*; do
    [ -d "$dir" ] || continue
    { echo 1 > "$dir/cgroup.kill"; } 2>/dev/null # v2: every process below
    find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null
    # Children before parents (rmdir needs an empty cgroup); processes take a moment to leave.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null
      [ -d "$dir" ] || break
      sleep 0.2
    done
    [ -d "$dir" ] && echo "sweep: could not remove cgroup $dir" >&2 || swept+=("cgroup $dir")
  done
done

for dir in /sys/fs/bpf/"${prefix}"-* /tmp/"${prefix}"-* "${demo_dirs[@]}"; do
  [ -e "$dir" ] || continue
  rm -rf "$dir" 2>/dev/null && swept+=("$dir") || echo "sweep: could not remove $dir" >&2
done

if [ ${#swept[@]} -gt 0 ]; then
  echo "sweep: removed ${#swept[@]} leftovers of an earlier test run:"
  printf '  %s\n' "${swept[@]}" | head -20
fi
exit 0
