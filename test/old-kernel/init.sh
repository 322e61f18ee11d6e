#!/bin/busybox sh
# /init of the old-kernel guest (test/old-kernel/harness.ts builds the initramfs around it with
# Debian's busybox-static and the kernel package's own modules). Loads the modules, mounts the
# host's root read-only over 9p under a tmpfs overlay, and runs the chosen test files there with
# one `node --test`. Every step prints "OLDK step <name>" on the serial console first, so the host
# can say which one failed; the test results go to the shared writable directory (/results).
/bin/busybox mkdir -p /bin /proc /sys /dev /lower /rw /newroot /results
/bin/busybox --install -s /bin
export PATH=/bin

step() { echo "OLDK step $1"; }
fail() { echo "OLDK fail $1"; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "OLDK release $(uname -r)"

# Requests the kernel makes for modules not in the initramfs: logged, so a missing one is named.
echo /modprobe-log > /proc/sys/kernel/modprobe

step modules
for m in $(cat /modules.order); do
  insmod "/modules/$m.ko" || fail "modules: insmod $m"
done

step 9p
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "9p: mount hostroot"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results || fail "9p: mount results"

step overlay
mount -t tmpfs -o size=1536m tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay: mount"

step mounts
R=/newroot
. /guest.env
# A checkout under /tmp or /run (a CI clone in /tmp, say) would be hidden by the guest's own tmpfs
# mounts there: it is kept aside and mounted back at its path.
kept=
case "$OLDK_REPO" in /tmp/* | /run/*)
  mkdir -p /keep && mount --bind "$R$OLDK_REPO" /keep || fail "mounts: keep $OLDK_REPO"
  kept=1 ;;
esac
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t bpf bpf $R/sys/fs/bpf || fail "mounts: bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "mounts: cgroup2"
mount -t tmpfs tmpfs $R/run
mkdir -p $R/run/netns $R/run/lock
mount -t tmpfs tmpfs $R/tmp
if [ -n "$kept" ]; then
  mkdir -p "$R$OLDK_REPO" && mount --bind /keep "$R$OLDK_REPO" || fail "mounts: $OLDK_REPO back"
fi
mkdir -p $R/results
mount --bind /results $R/results
# The guest's own lo: nothing else brings it up.
ip link set lo up || fail "mounts: lo up"

step tests
echo "OLDK tests-start $(cut -d' ' -f1 /proc/uptime)"
if [ -n "$OLDK_COMMAND" ]; then
  chroot $R /bin/sh -c 'cd "$OLDK_REPO" && eval "$OLDK_COMMAND"' 2>&1
  echo "$?" > /results/rc
  : > /results/results.jsonl
else chroot $R /bin/sh -c 'cd "$OLDK_REPO" && exec node --test --test-concurrency=1 --test-timeout="$OLDK_TEST_TIMEOUT_MS" \
  --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter="$OLDK_REPO/dist/test/old-kernel/reporter.js" --test-reporter-destination=/results/results.jsonl \
  $OLDK_FILES' 2>&1
echo "$?" > /results/rc
fi
echo "OLDK tests-end $(cut -d' ' -f1 /proc/uptime)"
sync
step poweroff
poweroff -f
