#!/bin/sh
# Quick start: set up this machine and run the example project (examples/hello) offline.
#
#   scripts/example.sh
#
# The jobs server is not built yet; until it is, this runs the example's build step the way the
# server will: in a rootless sandbox on the busybox base image, with the project read-only and a
# build directory mounted at /data. The artifact lands in target/example/data/artifacts.
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] && scripts/setup.sh
cargo build --release --quiet --bin mistryd
data=target/example/data
mkdir -p "$data/params"
# A private copy of the base image: the sandbox creates its mount points (/project, /data) in it.
[ -d target/example/rootfs ] || cp -a target/images/busybox/rootfs target/example/rootfs
echo "${1:-mistry}" > "$data/params/name"
target/release/mistryd sandbox run \
    --rootfs target/example/rootfs \
    --bind "$PWD/examples/hello:/project:ro" \
    --bind "$PWD/$data:/data" \
    --net none --timeout 30s \
    -- /bin/sh /project/build.sh
echo "artifacts: $(ls "$data/artifacts") in $data/artifacts"
