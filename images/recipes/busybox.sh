#!/bin/sh
# Build a tiny root filesystem from Debian's busybox-static package, offline-capable.
#
#   images/recipes/busybox.sh OUTDIR
#
# Produces OUTDIR/rootfs: /bin/busybox with a symlink per applet, /etc/passwd and /etc/group
# with root (0), builder (1000) and nobody (65534), and the usual empty directories.
# The binary comes from the .deb fetched with `apt-get download` when apt can, otherwise from the
# installed busybox-static package. Nothing binary is committed to the repository.
set -eu

out=${1:?usage: busybox.sh OUTDIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bin=
if (cd "$work" && apt-get download busybox-static >/dev/null 2>&1); then
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/pkg"
    bin="$work/pkg/bin/busybox"
elif dpkg -S /bin/busybox 2>/dev/null | grep -q '^busybox-static:'; then
    bin=/bin/busybox
else
    echo "busybox.sh: need Debian's busybox-static (apt-get install busybox-static)" >&2
    exit 1
fi

root="$out/rootfs.new"
rm -rf "$root"
mkdir -p "$root"
for d in bin sbin usr/bin usr/sbin etc dev proc sys tmp root home/builder var/tmp; do
    mkdir -p "$root/$d"
done
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 700 "$root/root"
cp "$bin" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
"$root/bin/busybox" --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
builder:x:1000:1000:builder:/home/builder:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
builder:x:1000:
nogroup:x:65534:
GROUP
echo "busybox" > "$root/etc/hostname"
rm -rf "$out/rootfs"
mv "$root" "$out/rootfs"
echo "busybox rootfs in $out/rootfs ($("$out/rootfs/bin/busybox" | head -1))"
