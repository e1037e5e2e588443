#!/bin/sh
# Build a Debian base image (bookworm, debootstrap minbase) as an OCI image layout, for the
# real-world tests and for projects `FROM debian`. Run as root (debootstrap needs it); the
# layout it writes is readable by everyone, so an unprivileged mistryd can use it.
#
#   images/recipes/debian.sh OUTDIR
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SUITE (bookworm),
# DEBIAN_PACKAGES (what is installed on top of minbase; default: ca-certificates, python3,
# python3-pip, python3-venv, nodejs, npm — so jobs need not download them each run).
#
# Produces OUTDIR as an OCI image layout (oci-layout, index.json, blobs/; tag "latest", one gzip
# layer with the files' real owners). No unpacked rootfs is left behind. The host's extra CA
# certificates (/usr/local/share/ca-certificates/*, e.g. a TLS-inspecting proxy's) are installed
# in the image's store, and the image's environment points npm, pip and other tools at the
# system bundle (NODE_EXTRA_CA_CERTS, PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE). apt's
# package lists are removed (as Docker's debian image does): run `apt-get update` first.
# The layout is written to OUTDIR.new and renamed into place when complete, so an OUTDIR with
# an index.json is complete.
set -eu

out=${1:?usage: debian.sh OUTDIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=${DEBIAN_SUITE:-bookworm}
packages=${DEBIAN_PACKAGES:-ca-certificates python3 python3-pip python3-venv nodejs npm}

if [ "$(id -u)" != 0 ]; then
    echo "debian.sh: run as root (debootstrap creates files of several owners and device nodes)" >&2
    exit 1
fi
command -v debootstrap >/dev/null || {
    echo "debian.sh: needs debootstrap (apt-get install debootstrap)" >&2
    exit 1
}

umask 022
work=$(mktemp -d "${TMPDIR:-/tmp}/mistry-debian.XXXXXX")
root="$work/rootfs"
cleanup() {
    for m in proc sys dev/pts dev; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$(date +%s)
echo "debian.sh: debootstrap --variant=minbase $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    echo "debian.sh: debootstrap failed (log above)" >&2
    exit 1
}
echo "debian.sh: debootstrap took $(( $(date +%s) - start ))s"

# The host's extra CAs (a TLS-inspecting proxy's, a company's): the image trusts what the host
# trusts beyond Debian's bundle, or nothing inside could fetch over https here.
mkdir -p "$root/usr/local/share/ca-certificates"
for crt in /usr/local/share/ca-certificates/*.crt; do
    if [ -f "$crt" ]; then cp "$crt" "$root/usr/local/share/ca-certificates/"; fi
done

# No services start inside the chroot; apt as in Docker's debian image.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
start=$(date +%s)
if [ -n "$packages" ]; then
    echo "debian.sh: installing $packages"
    # shellcheck disable=SC2086 # a list of package names
    { in_root apt-get update -qq && in_root apt-get install -y -qq --no-install-recommends $packages; } \
        > "$work/apt.log" 2>&1 || {
        tail -n 30 "$work/apt.log" >&2
        echo "debian.sh: installing the packages failed (log above)" >&2
        exit 1
    }
fi
if [ -x "$root/usr/sbin/update-ca-certificates" ]; then
    in_root update-ca-certificates --fresh > /dev/null 2>&1
fi
in_root apt-get clean
umount "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
    "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache
# Device nodes are not carried by layers (mistry skips them; the sandbox makes its own /dev).
find "$root/dev" -mindepth 1 -delete
: > "$root/etc/resolv.conf"
chmod 644 "$root/etc/resolv.conf"
echo "debian.sh: packages took $(( $(date +%s) - start ))s"

# The OCI layout.
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
new="$out.new"
rm -rf "$new"
mkdir -p "$new/blobs/sha256"
start=$(date +%s)
tar --numeric-owner --sort=name --xattrs --xattrs-include='security.capability' \
    -C "$root" -cf "$work/layer.tar" .
gzip -n -c "$work/layer.tar" > "$work/layer.tar.gz"
diff_id=$(sha "$work/layer.tar")
layer=$(sha "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$new/blobs/sha256/$layer"
echo "debian.sh: layer written in $(( $(date +%s) - start ))s ($(( $(size "$work/layer.tar") >> 20 )) MiB, $(( $(size "$new/blobs/sha256/$layer") >> 20 )) MiB gzipped)"
arch=$(chroot "$root" dpkg --print-architecture)
version=$(cat "$root/etc/debian_version")
bundle=/etc/ssl/certs/ca-certificates.crt
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","SSL_CERT_FILE=%s","NODE_EXTRA_CA_CERTS=%s","PIP_CERT=%s","REQUESTS_CA_BUNDLE=%s"],"Cmd":["bash"],"Labels":{"org.opencontainers.image.version":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"images/recipes/debian.sh: debootstrap --variant=minbase %s %s; apt-get install %s"}]}' \
    "$arch" "$bundle" "$bundle" "$bundle" "$bundle" "$version" "$diff_id" "$suite" "$mirror" "$packages" > "$work/config.json"
config=$(sha "$work/config.json")
cp "$work/config.json" "$new/blobs/sha256/$config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$(size "$work/config.json")" "$layer" "$(size "$new/blobs/sha256/$layer")" > "$work/manifest.json"
manifest=$(sha "$work/manifest.json")
cp "$work/manifest.json" "$new/blobs/sha256/$manifest"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' \
    "$manifest" "$(size "$work/manifest.json")" > "$new/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$new/oci-layout"
chmod -R a+rX "$new"
rm -rf "$out"
mv "$new" "$out"
echo "debian image in $out (OCI layout, manifest sha256:$manifest): Debian $version ($arch)"
