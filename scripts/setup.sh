#!/bin/sh
# Prepare a fresh Debian 12 machine for mistry's tests and examples. Idempotent; run as root.
#
#   scripts/setup.sh             everything the test suite needs (below)
#   scripts/setup.sh --example   only what scripts/example.sh needs, offline: root's subordinate
#                                ids and the busybox base image
#
# - installs the Debian packages the tests use (slirp4netns for isolated networks, with
#   /dev/net/tun usable by every user, as standard distributions have it);
# - gives root and the unprivileged test user `mistry-test` subordinate id ranges
#   (/etc/subuid, /etc/subgid), so sandboxes map 65536 ids;
# - installs PostgreSQL 15 for the multi-agent tests, with no system cluster;
# - loop-mounts a btrfs filesystem at /mnt/mistry-btrfs (4 GiB sparse image) for the btrfs
#   backend's tests;
# - builds the busybox base image from Debian's busybox-static into target/images/busybox;
# - builds the Debian base image (debootstrap, with python3, pip, nodejs, npm) into
#   target/images/debian for the real-world tests (network to deb.debian.org; ~2 minutes once).
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and creates the test user)" >&2
    exit 1
fi

# Subordinate ids: 65536 for a user, after the highest range in use (useradd may already have
# given a new user one).
add_range() { # user file
    touch "$2"
    grep -q "^$1:" "$2" && return 0
    start=$(awk -F: 'BEGIN { m = 100000 } NF >= 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' "$2")
    echo "$1:$start:65536" >> "$2"
}
busybox_image() {
    if [ ! -x target/images/busybox/rootfs/bin/busybox ] || [ ! -f target/images/busybox/index.json ]; then
        images/recipes/busybox.sh target/images/busybox
    fi
}
if [ "${1:-}" = --example ]; then
    add_range root /etc/subuid
    add_range root /etc/subgid
    busybox_image
    exit 0
fi

PACKAGES="busybox-static uidmap slirp4netns bubblewrap buildah hyperfine btrfs-progs gcc libc6-dev passwd procps skopeo util-linux docker-registry apache2-utils rsync openssh-server openssh-client chromium chromium-driver python3-pip wrk debootstrap"
missing=
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# The seccomp tests run npm, pip and apt-get in a sandbox: npm from Debian unless the machine
# has one already (e.g. with its own Node.js), and apt's package lists.
command -v npm >/dev/null || missing="$missing npm"
if [ -z "$missing" ] && ! ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1; then
    apt-get update -qq
fi
if [ -n "$missing" ]; then
    echo "setup.sh: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Isolated networks (the default `network`): slirp4netns opens /dev/net/tun as the daemon's user.
# Standard distributions make the node 0666 (udev's static node rule; it lets a user make
# devices only in network namespaces they own); some VMs leave it 0600.
if [ ! -e /dev/net/tun ]; then
    mkdir -p /dev/net
    mknod -m 0666 /dev/net/tun c 10 200
fi
chmod 0666 /dev/net/tun

# Subordinate ids: 65536 for root and for mistry-test.
if ! id mistry-test >/dev/null 2>&1; then
    useradd --create-home --shell /bin/sh mistry-test
fi
for u in root mistry-test; do
    add_range "$u" /etc/subuid
    add_range "$u" /etc/subgid
done

# sshd (started by the client's scp tests on 127.0.0.1) needs its privilege separation directory.
mkdir -p /run/sshd
chmod 755 /run/sshd

# A loop-mounted btrfs for the btrfs backend (user_subvol_rm_allowed: rootless deletes).
BTRFS_IMG=/var/lib/mistry-test/btrfs.img
BTRFS_MNT=/mnt/mistry-btrfs
if ! mountpoint -q "$BTRFS_MNT"; then
    mkdir -p "$(dirname "$BTRFS_IMG")" "$BTRFS_MNT"
    if [ ! -f "$BTRFS_IMG" ]; then
        truncate -s 4G "$BTRFS_IMG"
        mkfs.btrfs -q "$BTRFS_IMG"
    fi
    mount -o loop,user_subvol_rm_allowed "$BTRFS_IMG" "$BTRFS_MNT"
fi
chmod 1777 "$BTRFS_MNT"

# PostgreSQL 15 for the multi-agent tests (tests/cluster.rs start throwaway clusters of their
# own, as mistry-test): installed without the system cluster, which is neither created, started
# nor enabled. postgresql-common comes first, so that its createcluster.conf says so before
# postgresql-15's postinst reads it.
if [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    echo "setup.sh: installing postgresql (no system cluster)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
    sed -i 's/^#* *create_main_cluster *=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
    grep -q '^create_main_cluster = false' /etc/postgresql-common/createcluster.conf ||
        echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
fi

busybox_image

# The Debian image is complete when its index.json and the manifest it names are there (the
# recipe renames the layout into place only when done). Without the network it is left out:
# the real-world tests then skip themselves, and fail under CI.
debian_ok() {
    [ -f target/images/debian/index.json ] || return 1
    m=$(sed -n 's/.*"digest":"sha256:\([0-9a-f]*\)".*/\1/p' target/images/debian/index.json)
    [ -n "$m" ] && [ -f "target/images/debian/blobs/sha256/$m" ]
}
if ! debian_ok; then
    images/recipes/debian.sh target/images/debian ||
        echo "setup.sh: no Debian image (images/recipes/debian.sh failed): the real-world tests will skip" >&2
fi
