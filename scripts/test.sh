#!/bin/sh
# The whole test suite, on a fresh Debian 12 machine, as root:
#
#   scripts/test.sh
#
# 1. scripts/setup.sh: Debian packages, the unprivileged user mistry-test with subordinate ids,
#    the busybox base image;
# 2. formatting and clippy (warnings are errors);
# 3. every test of the workspace, as root (this also builds the client `mistry`, of the
#    mistry-client package, which tests/server.rs runs);
# 4. the sandbox, images, image build, registry, server, CLI and client tests again as
#    mistry-test: rootless is the promise, and root in a VM hides mistakes. `CI` is passed on, so
#    a test that lacks a prerequisite fails there too instead of skipping.
set -eu
cd "$(dirname "$0")/.."

scripts/setup.sh

export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "test.sh: needs a Rust toolchain (cargo) on PATH" >&2; exit 1; }
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

export MISTRY_TEST_BTRFS=/mnt/mistry-btrfs

# The test binaries, mistryd (the image helper), the client, the probe and the base image go
# where mistry-test can read them. What the tests leave in /tmp belongs partly to subordinate
# ids, which mistry-test cannot remove: at the end root removes the test directories (mistry*,
# and tempfile's .tmp*) made during the run.
unpriv=$(mktemp -d /tmp/mistry-unpriv.XXXXXX)
chmod 755 "$unpriv"
stamp="$unpriv.stamp"
touch "$stamp"
cleanup() {
    code=$?
    find /tmp /mnt/mistry-btrfs -mindepth 1 -maxdepth 1 \( -name "mistry*" -o -name ".tmp*" \) \
        -newer "$stamp" -exec rm -rf {} + 2>/dev/null || true
    rm -rf "$unpriv" "$stamp" || true
    exit $code
}
trap cleanup EXIT
# One probe for every sandbox test, root's and mistry-test's.
cc -static -O2 -o "$unpriv/probe" sandbox/tests/probe.c
export MISTRY_PROBE="$unpriv/probe"

echo "== tests as root"
cargo test --workspace

# buildah as root with its default paths leaves /run/containers (and its auth path) mode 0700:
# the tests as mistry-test must not depend on that state (they set their own auth and runtime
# paths), so they always run after it here.
if command -v buildah >/dev/null; then
    c=$(buildah from scratch)
    buildah rm "$c" >/dev/null
    [ "$(stat -c %a /run/containers)" = 700 ] ||
        { echo "test.sh: buildah as root did not leave /run/containers 0700" >&2; exit 1; }
else
    echo "test.sh: buildah is missing (scripts/setup.sh installs it)" >&2
    exit 1
fi

echo "== sandbox, images, image build, registry, server, cluster, web view (Chromium), CLI and client tests as the unprivileged user mistry-test"
cp -a target/images/busybox/rootfs "$unpriv/rootfs"
mkdir -p "$unpriv/images"
cp -a target/images/busybox "$unpriv/images/busybox"
[ ! -d target/images/debian ] || cp -a target/images/debian "$unpriv/images/debian"
mkdir -p "$unpriv/artifacts"
chown -R mistry-test: "$unpriv/rootfs" "$unpriv/images" "$unpriv/artifacts"
cp target/debug/mistryd target/debug/mistry "$unpriv/"
{
    cargo test -p sandbox --no-run --message-format=json 2>/dev/null
    cargo test -p images --no-run --message-format=json 2>/dev/null
    cargo test -p mistry --lib --test image_build --test dockerfile_syntax --test registry --test registry_errors --test store_choice --test server --test sandbox_cli --test realworld --test run_mounts --test operator --test deep_trees --test incremental --test job_links --test pipelines --test exec --test examples --test cluster --test cluster_jobs --test replicate --test cluster_view --test cluster_logs --test cluster_failures --test cluster_faults --test cluster_jobs_list --test cluster_pipelines --test cluster_tls --test job_limits --test job_preparation --test network --test access --test cluster_trends --test web --test web_pipelines --test web_pipelines_ui --no-run --message-format=json 2>/dev/null
    cargo test -p mistry-client --lib --test cli --test pipeline_cli --no-run --message-format=json 2>/dev/null
} | grep -E '"profile":\{[^}]*"test":true' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' > "$unpriv/list"
# MISTRY_TEST_SHUFFLE=1: this phase in another order at each run — its test binaries shuffled,
# and each binary's tests started in a shuffled order (libtest's --shuffle, allowed on stable by
# RUSTC_BOOTSTRAP; the seed is printed) — to show that no test depends on what ran before it.
shuffle=
if [ -n "${MISTRY_TEST_SHUFFLE:-}" ]; then
    shuf -o "$unpriv/list" "$unpriv/list"
    shuffle="-Z unstable-options --shuffle"
fi
status=0
while read -r bin; do
    name=$(basename "$bin")
    cp "$bin" "$unpriv/$name"
    echo "-- $name (as mistry-test)"
    runuser -u mistry-test -- env -i PATH=/usr/bin:/bin HOME=/home/mistry-test TMPDIR=/tmp \
        MISTRY_BUSYBOX_ROOTFS="$unpriv/rootfs" MISTRY_PROBE="$unpriv/probe" \
        MISTRY_TEST_IMAGES="$unpriv/images" MISTRY_HELPER_BIN="$unpriv/mistryd" \
        MISTRY_CLIENT_BIN="$unpriv/mistry" MISTRY_TEST_ARTIFACTS="$unpriv/artifacts" \
        MISTRY_TEST_BTRFS="$MISTRY_TEST_BTRFS" ${CI+CI="$CI"} ${shuffle:+RUSTC_BOOTSTRAP=1} \
        "$unpriv/$name" $shuffle || status=1
done < "$unpriv/list"
exit $status
