#!/bin/sh
# Real-shaped projects built by mistryd and buildah side by side, on one run: a multi-stage Go
# service, a Rust workspace, a Node app with a lock file and a Python app with wheels (their
# contexts are in benches/realworld/, all FROM the Debian image of images/recipes/debian.sh).
# Each project is built cold (an empty step cache; the base image is in each tool's storage
# beforehand, not timed) and then again unchanged; the four share one store per tool, as on a
# server. Printed: the times and each project's growth of the store, with mistryd/buildah ratios,
# and mistryd's step summary of each build (an unchanged rebuild must build nothing).
#
#   scripts/realworld-bench.sh [root|rootless|both]     # default: root
#
# Run as root (rootless switches to mistry-test, like scripts/bench.sh). Needs buildah,
# target/images/debian (scripts/setup.sh) and the network to deb.debian.org, pypi.org and
# registry.npmjs.org (apt-get, pip and npm in the builds). MISTRYD names a mistryd binary
# (default: target/release/mistryd, built if missing). buildah runs with its own --root and
# --runroot under the run's directory (overlay storage, chroot isolation), never /run/containers
# nor /var/lib/containers.
set -eu

inner() {
    # As the user measured: $1 = the run's directory, $2 = a label.
    dir=$1 label=$2
    m="$dir/mistryd" images="$dir/images"
    out="$dir/$label"
    mkdir -p "$out"
    store="$out/mistry-store"
    broot="$out/buildah"
    # buildah keeps RUN --mount=type=cache directories in $TMPDIR/buildah-cache*, outside its
    # --root: here, so that they count in its storage (mistryd's are in its store) and go away.
    mkdir -p "$broot/tmp"
    b() {
        TMPDIR="$broot/tmp" buildah --root "$broot/root" --runroot "$broot/run" \
            --storage-driver overlay "$@"
    }
    du_b() {
        if [ "$(id -u)" = 0 ]; then du -s -B1 "$1"; else buildah unshare du -s -B1 "$1"; fi |
            cut -f1
    }
    now() { date +%s.%N; }
    # Each line of the output with the time it came.
    stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done; }
    # The steps of a stamped log ($1) that took a second or more (a step ends when the next
    # starts: its commit is counted in it); $2 matches a step's first line.
    slow_steps() {
        awk -v pat="$2" -v who="$3" '
            { t = $1; sub(/^[^ ]+ /, "") }
            $0 ~ pat { if (n) d[n] += t - start; n++; name[n] = substr($0, 1, 70); start = t }
            END { if (n) d[n] += t - start
                  for (i = 1; i <= n; i++) if (d[i] >= 1) printf "           %-8s %6.1fs  %s\n", who, d[i], name[i] }' "$1"
    }
    mkdir -p "$out/base"
    echo "FROM debian" > "$out/base/Dockerfile"
    "$m" image build --store "$store" --images "$images" "$out/base" > "$out/base.log" 2>&1
    id=$(b pull -q "oci:$images/debian:latest")
    b tag "$id" localhost/debian:latest
    echo "== $label: mistryd's store: $(cat "$store/backend"); buildah: overlay, chroot isolation"
    printf '%-8s %-10s %9s %9s %6s %9s %9s %6s\n' project build mistryd buildah ratio \
        "m. store" "b. store" ratio
    for p in go rust node python; do
        ctx="$dir/projects/$p"
        bctx="$out/buildah-ctx/$p"
        mkdir -p "$bctx"
        cp -a "$ctx/." "$bctx/"
        sed -i 's/^FROM debian/FROM localhost\/debian/' "$bctx/Dockerfile"
        for phase in cold unchanged; do
            ms0=$(du_b "$store")
            bs0=$(du_b "$broot")
            ml="$out/$p-$phase.mistry.log" bl="$out/$p-$phase.buildah.log"
            t0=$(now)
            { "$m" image build --store "$store" --images "$images" --project "$p" "$ctx" \
                2> "$out/$p-$phase.mistry.err"; echo "exit $?"; } | stamp > "$ml"
            t1=$(now)
            tail -1 "$ml" | grep -q ' exit 0$' ||
                { tail -20 "$ml" "$out/$p-$phase.mistry.err"; exit 1; }
            { b bud --layers --isolation chroot -t "rw-$p" "$bctx" 2>&1; echo "exit $?"; } |
                stamp > "$bl"
            t2=$(now)
            tail -1 "$bl" | grep -q ' exit 0$' || { tail -20 "$bl"; exit 1; }
            ms1=$(du_b "$store")
            bs1=$(du_b "$broot")
            awk -v p="$p" -v ph="$phase" -v t0="$t0" -v t1="$t1" -v t2="$t2" \
                -v ms="$((ms1 - ms0))" -v bs="$((bs1 - bs0))" 'BEGIN {
                    m = t1 - t0; b = t2 - t1
                    r = (bs > 0 ? sprintf("%5.2fx", ms / bs) : "     -")
                    printf "%-8s %-10s %8.1fs %8.1fs %5.2fx %8.1fM %8.1fM %s\n", p, ph, m, b,
                        (b > 0 ? m / b : 0), ms / 1048576, bs / 1048576, r
                }'
            echo "         mistryd: $(sed -n 's/^image [0-9a-f]* (\(.*\))$/\1/p' "$out/$p-$phase.mistry.err")"
            if [ "$phase" = cold ]; then
                slow_steps "$ml" '^Step [0-9]+/[0-9]+ : ' mistryd
                slow_steps "$bl" 'STEP [0-9]+/[0-9]+: ' buildah
            fi
        done
    done
    ms=$(du_b "$store")
    bs=$(du_b "$broot")
    awk -v ms="$ms" -v bs="$bs" 'BEGIN {
        printf "whole store with the base image: mistryd %.1fM, buildah %.1fM: %.2fx\n",
            ms / 1048576, bs / 1048576, ms / bs }'
}

if [ "${1:-}" = --inner ]; then
    inner "$2" "$3"
    exit 0
fi

cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "realworld-bench.sh: run as root" >&2; exit 1; }
command -v buildah > /dev/null || { echo "realworld-bench.sh: needs buildah" >&2; exit 1; }
[ -f target/images/debian/index.json ] ||
    { echo "realworld-bench.sh: no target/images/debian (scripts/setup.sh)" >&2; exit 1; }
who=${1:-root}
mistryd=${MISTRYD:-target/release/mistryd}
[ -x "$mistryd" ] || cargo build --release -p mistry --bin mistryd

# Lower case: buildah refuses image paths with capitals (mktemp's names have some).
dir=/tmp/realworld-bench-$$
rm -rf "$dir"
mkdir -m 755 "$dir"
cleanup() {
    # Rootless, the stores hold files of subordinate ids: removed in the user's namespace.
    if [ -d "$dir/rootless" ]; then
        (cd /tmp && runuser -u mistry-test -- env -i PATH=/usr/bin:/bin HOME=/home/mistry-test \
            TMPDIR=/tmp buildah unshare rm -rf "$dir/rootless") 2> /dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT
cp "$mistryd" "$dir/mistryd"
cp "$0" "$dir/bench.sh"
mkdir -p "$dir/images"
cp -a target/images/debian "$dir/images/debian"
cp -a benches/realworld "$dir/projects"
chown -R mistry-test: "$dir/images" "$dir/projects"
chmod -R a+rX "$dir"

case $who in
root | both) sh "$dir/bench.sh" --inner "$dir" root ;;
esac
case $who in
rootless | both)
    mkdir -p "$dir/rootless"
    chown mistry-test: "$dir/rootless"
    (cd /tmp && runuser -u mistry-test -- env -i PATH=/usr/bin:/bin HOME=/home/mistry-test \
        TMPDIR=/tmp sh "$dir/bench.sh" --inner "$dir" rootless)
    ;;
esac
