#!/bin/sh
# Every benchmark, as root and then as the unprivileged user mistry-test (rootless is the
# promise; root hides the cost of id maps):
#
#   scripts/bench.sh [BENCH...]      # default: sandbox_start image_build server access incremental pipeline cluster debian_build web
#
# BENCH_RUNS, BENCH_BACKENDS, MISTRY_TEST_BTRFS and, for the cluster benchmark, BENCH_SPLIT and
# BENCH_SETTLE (benches/cluster.rs) go to the unprivileged run too.
#
# Needs what scripts/setup.sh provides (the test user, target/images/{busybox,debian}) and
# runs as root. Figures are printed side by side with the peer tools (bwrap, buildah); the
# machine's noise is large, so compare figures of one run.
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench.sh: run as root (it switches to mistry-test itself)" >&2; exit 1; }
benches=${*:-sandbox_start image_build server access incremental pipeline cluster debian_build web}

cargo build --release --bins --benches
list=$(cargo bench --no-run --message-format=json 2>/dev/null |
    grep -E '"kind":\["bench"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')

# Lower case: buildah refuses image paths with capitals (mktemp's names have some).
unpriv=/tmp/mistry-bench-$$
rm -rf "$unpriv"
mkdir -m 755 "$unpriv"
trap 'rm -rf "$unpriv"' EXIT
cp target/release/mistryd target/release/mistry-sandbox "$unpriv/"
mkdir -p "$unpriv/images"
for image in busybox debian; do
    [ ! -d "target/images/$image" ] || cp -a "target/images/$image" "$unpriv/images/$image"
done
chown -R mistry-test: "$unpriv/images"

for name in $benches; do
    bin=$(printf '%s\n' "$list" | grep "/$name-" | head -1)
    [ -n "$bin" ] || { echo "bench.sh: no benchmark $name" >&2; exit 1; }
    cp "$bin" "$unpriv/$name"
    echo "== $name as root"
    "$bin" --bench
    echo "== $name as mistry-test"
    (cd /tmp && runuser -u mistry-test -- env -i PATH=/usr/bin:/bin HOME=/home/mistry-test \
        TMPDIR=/tmp MISTRY_BIN="$unpriv/mistryd" MISTRY_TEST_IMAGES="$unpriv/images" \
        MISTRY_BUSYBOX_ROOTFS="$unpriv/images/busybox/rootfs" \
        ${BENCH_RUNS+BENCH_RUNS="$BENCH_RUNS"} ${MISTRY_TEST_BTRFS+MISTRY_TEST_BTRFS="$MISTRY_TEST_BTRFS"} \
        ${BENCH_BACKENDS+BENCH_BACKENDS="$BENCH_BACKENDS"} \
        ${BENCH_SPLIT+BENCH_SPLIT="$BENCH_SPLIT"} ${BENCH_SETTLE+BENCH_SETTLE="$BENCH_SETTLE"} \
        "$unpriv/$name" --bench)
done
