#!/usr/bin/env bash
# Builds the agent's image from manifests/Dockerfile on a machine without an image registry, as
# root, with Debian's tools only: mmdebstrap makes the two base images (Debian bookworm), buildah
# builds the Dockerfile on them, and the result is written as a docker archive that
# `ctr images import` (or `docker load`) takes.
#
#   scripts/build-image.sh OUT_DIR [--test-images]
#
# OUT_DIR/ambient-bpf.tar   localhost/ambient-bpf:latest (the DaemonSet's image, with its registry)
# --test-images also builds what test/deployed.test.ts runs next to it, from Debian's
# busybox-static: OUT_DIR/pause.tar (localhost/abt-pause:1, the pod sandbox's process) and
# OUT_DIR/app.tar (localhost/abt-app:1, a shell, wget and an HTTP server whose CGI answers with the
# peer address it saw).
#
# The base images:
#   build: bookworm minbase (apt-get, for the Dockerfile's build stage) + this machine's node/npm
#   run:   bookworm essential + libbpf1 libelf1 zlib1g libstdc++6 + this machine's node binary
# Node.js is copied from this machine because bookworm's nodejs is 18 and the agent's
# dependencies (yargs 18, pino 10) need 20.19+ (package.json "engines"); a pipeline with a
# registry uses node:20-bookworm{,-slim} instead (the Dockerfile's defaults).
#
# Work files (the mmdebstrap tarballs, kept as a cache, and buildah's storage, removed at the end)
# are under $AMBIENT_BPF_IMAGE_WORK (default /var/tmp/ambient-bpf-image). Whatever fails, the
# last line names the step.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: build-image.sh OUT_DIR [--test-images]}
test_images=${2:-}
work=${AMBIENT_BPF_IMAGE_WORK:-/var/tmp/ambient-bpf-image}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
mkdir -p "$out" "$work"
out=$(readlink -f "$out")
work=$(readlink -f "$work")

step_name=''
step() {
  step_name=$1
  echo "build-image: $step_name" >&2
}
trap 'rc=$?; [ $rc -eq 0 ] || echo "build-image: FAILED at step: $step_name (exit $rc)" >&2' EXIT

step 'checking the tools (mmdebstrap, buildah, node 20.19+)'
for tool in mmdebstrap buildah; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
done
node_bin=$(readlink -f "$(command -v node)")
npm_dir=$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' \
  || { echo "build-image: node $(node --version) is older than 20.19" >&2; exit 1; }
node_version=$(node --version)

# buildah with its own storage (one per run, so two builds cannot trip over each other), so nothing
# here touches /var/lib/containers.
storage=$(mktemp -d "$work/storage.XXXXXX")
bh() { buildah --root "$storage/root" --runroot "$storage/run" --storage-driver overlay "$@"; }
cleanup_storage() {
  bh rm --all >/dev/null 2>&1 || true
  bh rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$storage"
}
trap 'rc=$?; cleanup_storage; [ $rc -eq 0 ] || echo "build-image: FAILED at step: $step_name (exit $rc)" >&2' EXIT

# A root file system tarball, made once per package list and Node.js version (kept in $work).
rootfs() { # NAME VARIANT PACKAGES HOOK...
  local name=$1 variant=$2 packages=$3
  shift 3
  local key
  key=$(printf '%s\n' "$suite" "$variant" "$packages" "$node_version" "$@" | sha256sum | cut -c1-12)
  local tar=$work/$name-$key.tar
  if [ ! -s "$tar" ]; then
    step "mmdebstrap: the $name base ($suite, $variant: $packages)"
    rm -f "$work/$name"-*.tar
    mmdebstrap --quiet --variant="$variant" --include="$packages" --format=tar \
      --customize-hook='rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/* "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
      "$@" "$suite" "$tar.tmp" "$mirror" >&2
    mv "$tar.tmp" "$tar"
  fi
  step "importing the $name base into buildah"
  local c
  c=$(bh from scratch)
  bh add "$c" "$tar" / >/dev/null
  bh config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin "$c"
  if [ "$name" = build ]; then
    # The build stage also gets what this machine's own builds rely on to reach the npm registry
    # and to build the addon offline: the CA certificates it trusts (Debian's plus any extra one,
    # such as a TLS-inspecting egress proxy's) and Node.js's headers for node-gyp (instead of
    # downloading them).
    bh copy "$c" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
    bh config --env NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt "$c"
    local headers
    headers=$(dirname "$(dirname "$node_bin")")/include/node
    if [ -e "$headers/node.h" ] && [ -e "$headers/common.gypi" ]; then
      bh copy "$c" "$headers" /usr/local/include/node >/dev/null
      bh config --env npm_config_nodedir=/usr/local "$c"
    fi
  fi
  bh commit --quiet "$c" "localhost/ambient-bpf-$name-base:$key" >/dev/null
  bh rm "$c" >/dev/null
  eval "${name}_image=localhost/ambient-bpf-$name-base:$key"
}

build_hooks=(
  --customize-hook="copy-in $node_bin /usr/local/bin"
  --customize-hook="mkdir -p \"\$1/usr/local/lib/node_modules\""
  --customize-hook="copy-in $npm_dir /usr/local/lib/node_modules"
  --customize-hook='ln -s ../lib/node_modules/npm/bin/npm-cli.js "$1/usr/local/bin/npm"'
)
rootfs build minbase 'ca-certificates,python3,make,gcc,g++,libc6-dev,binutils,clang,bpftool,libbpf-dev,libelf-dev,zlib1g-dev' "${build_hooks[@]}"
rootfs run essential 'libbpf1,libelf1,zlib1g,libstdc++6,libgcc-s1' \
  --customize-hook="copy-in $node_bin /usr/local/bin"

step 'buildah build -f manifests/Dockerfile (npm ci, npm run build, the runtime stage)'
# chroot isolation on the host's network: RUN steps reach Debian's mirror and the npm registry
# without buildah setting up any network of its own.
bh build --quiet --isolation chroot --layers=false --pull-never \
  --build-arg "BUILD_IMAGE=$build_image" --build-arg "BASE_IMAGE=$run_image" \
  --build-arg "COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -f manifests/Dockerfile -t localhost/ambient-bpf:latest . >&2

step "writing $out/ambient-bpf.tar"
rm -f "$out/ambient-bpf.tar"
bh push --quiet localhost/ambient-bpf:latest "docker-archive:$out/ambient-bpf.tar:localhost/ambient-bpf:latest" >&2

if [ "$test_images" = --test-images ]; then
  busybox=/bin/busybox # busybox-static's (it replaces the dynamic busybox package)
  dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
    || { echo "build-image: busybox-static is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
  tiny() { # NAME ENTRYPOINT-JSON: an image of busybox alone (plus the app's CGI script)
    local name=$1 entry=$2 c dir
    step "the $name test image (busybox-static)"
    dir=$(mktemp -d "$work/$name.XXXXXX")
    mkdir -p "$dir/bin" "$dir/www/cgi-bin" "$dir/tmp"
    cp "$busybox" "$dir/bin/busybox"
    for applet in sh wget httpd sleep cat echo nc; do ln -s busybox "$dir/bin/$applet"; done
    printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%%s %%s\\n" "$REMOTE_ADDR" "$SERVER_PORT"\n' > "$dir/www/cgi-bin/peer"
    chmod 755 "$dir/www/cgi-bin/peer"
    c=$(bh from scratch)
    bh copy "$c" "$dir" / >/dev/null
    bh config --entrypoint "$entry" --cmd '' --env PATH=/bin "$c"
    bh commit --quiet "$c" "localhost/abt-$name:1" >/dev/null
    bh rm "$c" >/dev/null
    rm -rf "$dir"
    rm -f "$out/$name.tar"
    bh push --quiet "localhost/abt-$name:1" "docker-archive:$out/$name.tar:localhost/abt-$name:1" >&2
  }
  tiny pause '["/bin/sleep","2147483647"]'
  tiny app '["/bin/httpd","-f","-p","8080","-h","/www"]'
fi

step done
ls -l "$out"/*.tar >&2
