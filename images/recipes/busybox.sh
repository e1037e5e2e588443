#!/bin/sh
# Build a tiny base image from Debian's busybox-static package, offline-capable.
#
#   images/recipes/busybox.sh OUTDIR
#
# Produces OUTDIR as an OCI image layout (oci-layout, index.json, blobs/; tag "latest", one
# gzip layer, owned by root) whose filesystem is also left unpacked in OUTDIR/rootfs:
# /bin/busybox with a symlink per applet, /etc/passwd and /etc/group with root (0),
# builder (1000) and nobody (65534), and the usual empty directories.
# The binary, offline first: the installed busybox-static package's; else the .deb fetched with
# `apt-get download busybox-static` (network); else the installed `busybox` package's (dynamic,
# in a default Debian install), copied with the shared libraries it loads. `BUSYBOX=FILE` names
# a binary to use instead. Nothing binary is committed to the repository.
set -eu

out=${1:?usage: busybox.sh OUTDIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bin=
if [ -n "${BUSYBOX:-}" ]; then
    bin=$BUSYBOX
elif dpkg -S /bin/busybox 2>/dev/null | grep -q '^busybox-static:'; then
    bin=/bin/busybox
elif (cd "$work" && apt-get download busybox-static >/dev/null 2>&1); then
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/pkg"
    bin="$work/pkg/bin/busybox"
elif dpkg -S /bin/busybox 2>/dev/null | grep -q '^busybox:'; then
    bin=/bin/busybox
else
    echo "busybox.sh: need Debian's busybox-static or busybox (apt-get install busybox-static)" >&2
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
# A dynamic busybox brings the libraries it loads (ldd's paths: `lib => /path` and the loader).
ldd "$bin" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\).*/\1/p' |
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
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

# The OCI layout.
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
rm -rf "$out/blobs" "$out/index.json" "$out/oci-layout"
mkdir -p "$out/blobs/sha256"
# Everything belongs to root, except builder's home (uid/gid 1000), whoever runs this.
tar --numeric-owner --owner=0 --group=0 --sort=name --exclude=./home/builder \
    -C "$out/rootfs" -cf "$work/layer.tar" .
tar --numeric-owner --owner=1000 --group=1000 -C "$out/rootfs" -rf "$work/layer.tar" ./home/builder
gzip -n -c "$work/layer.tar" > "$work/layer.tar.gz"
diff_id=$(sha "$work/layer.tar")
layer=$(sha "$work/layer.tar.gz")
cp "$work/layer.tar.gz" "$out/blobs/sha256/$layer"
arch=$(dpkg --print-architecture)
version=$("$out/rootfs/bin/busybox" | head -1 | cut -d' ' -f2)
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"Labels":{"org.opencontainers.image.version":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"images/recipes/busybox.sh"}]}' \
    "$arch" "$version" "$diff_id" > "$work/config.json"
config=$(sha "$work/config.json")
cp "$work/config.json" "$out/blobs/sha256/$config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$(size "$work/config.json")" "$layer" "$(size "$work/layer.tar.gz")" > "$work/manifest.json"
manifest=$(sha "$work/manifest.json")
cp "$work/manifest.json" "$out/blobs/sha256/$manifest"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' \
    "$manifest" "$(size "$work/manifest.json")" > "$out/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$out/oci-layout"
echo "busybox image in $out (OCI layout, manifest sha256:$manifest; unpacked in $out/rootfs): $version"
