#!/bin/sh
# Quick start: run mistryd with the example projects of examples/ (hello, and deps, app and
# announce of the release pipeline in examples/pipelines/), which build offline from the busybox
# base image. It builds the client `mistry` beside mistryd too.
#
# It needs only what the examples use, and no network (but cargo's, for crates it does not have
# yet): as root, `scripts/setup.sh --example` gives root subordinate ids and makes the busybox
# image from the machine's busybox (images/recipes/busybox.sh); as another user, the busybox
# image is made the same way, and the user needs subordinate ids of its own (/etc/subuid). Jobs
# have no network ("network": "none"). The test suite's packages and images are
# scripts/test.sh's business.
#
#   scripts/example.sh [ADDR]            (default 127.0.0.1:8462; Ctrl-C stops the server)
#
# Then, from another terminal:
#   curl -X POST -d '{"project": "hello", "params": {"name": "you"}}' http://127.0.0.1:8462/jobs
# The artifacts land in target/example/builds/hello/ready/<id>/data/artifacts. The pipeline:
#   curl -X POST -d '{"pipeline": "release", "params": {"version": "1.0"}}' http://127.0.0.1:8462/pipelines
#   target/release/mistry pipeline run release -- --version=1.0
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
    scripts/setup.sh --example
elif [ ! -x target/images/busybox/rootfs/bin/busybox ] || [ ! -f target/images/busybox/index.json ]; then
    images/recipes/busybox.sh target/images/busybox
fi
cargo build --release --quiet -p mistry -p mistry-client --bin mistryd --bin mistry
addr=${1:-127.0.0.1:8462}
mkdir -p target/example/builds
cat > target/example/config.json <<JSON
{
  "projects_path": "$PWD/examples",
  "build_path": "$PWD/target/example/builds",
  "images_path": "$PWD/target/images",
  "network": "none"
}
JSON
echo "mistryd on http://$addr with the projects of examples/ (try: curl -X POST -d '{\"project\": \"hello\"}' http://$addr/jobs)"
exec target/release/mistryd --config target/example/config.json --addr "$addr"
