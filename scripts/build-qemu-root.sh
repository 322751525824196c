#!/usr/bin/env bash
# Builds a Debian 13 (trixie) root holding QEMU from trixie-backports (11.1, which has the
# vfio-user client `vfio-user-pci`) into OUTDIR/rootfs, for the NVMe-over-vfio-user tests. Debian 12's
# own QEMU (7.2, no vfio-user) stays the host's QEMU for everything else.
#
# The root comes from the Debian archive this machine's apt already uses (mmdebstrap). Two ways to run
# its QEMU, both with the host's paths, sockets and memfds unchanged:
#   OUTDIR/bin/qemu-system-x86_64 ...   through the root's own dynamic loader and libraries (no
#                                       mounts, no chroot: what the tests use)
#   chroot OUTDIR/rootfs qemu-system-x86_64 ...   with /dev, /proc, /sys and the socket directories
#                                       bind-mounted (in a private mount namespace, e.g. unshare -m)
# OUTDIR/bin/qemu-img, qemu-io and qemu-storage-daemon are wrapped the same way.
#
# Idempotent: a stamp records a hash of this script and OUTDIR; when the root and a matching stamp
# exist nothing is done (no network either), and the root itself is rebuilt only when its suite,
# packages or mirror change. Non-interactive, fit for CI. Needs root (or sudo) and mmdebstrap
# (scripts/install-system-deps.sh installs it).
#
# usage: scripts/build-qemu-root.sh OUTDIR
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
SUITE=trixie
BACKPORTS=trixie-backports
# What QEMU needs for a TCG or KVM guest with vfio-user, virtio and the qemu-img/io block tools.
QEMU_PACKAGES=(qemu-system-x86 qemu-utils qemu-block-extra ipxe-qemu)
WRAPPED=(qemu-system-x86_64 qemu-img qemu-io qemu-storage-daemon)
TRIPLET=x86_64-linux-gnu

log() { echo "build-qemu-root: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The wrappers name the root by its absolute path: a moved checkout regenerates them.
script_hash=$( (sha256sum "$0" | cut -d' ' -f1; echo "$OUTDIR") | sha256sum | cut -d' ' -f1)
stamp="$OUTDIR/.stamp"
if [ -x "$OUTDIR/rootfs/usr/bin/qemu-system-x86_64" ] && [ -x "$OUTDIR/bin/qemu-system-x86_64" ] \
        && [ -f "$stamp" ] && grep -qx "script $script_hash" "$stamp"; then
    log "up to date: $OUTDIR ($(sed -n 's/^qemu //p' "$stamp"))"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
command -v mmdebstrap >/dev/null || die "mmdebstrap not found: run scripts/install-system-deps.sh"
command -v apt-get >/dev/null || die "apt-get not found (this script needs a Debian system)"

# The mirror serving this machine's own Debian release (Origin and Label "Debian"), e.g.
# http://deb.debian.org/debian/ or a local proxy: trixie comes from the same place.
debian_mirror() {
    apt-get indextargets --format '$(ORIGIN)|$(LABEL)|$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
        | awk -F'|' '$1 == "Debian" && $2 == "Debian" { print $3; exit }'
}
mirror=$(debian_mirror || true)
if [ -z "$mirror" ]; then
    log "running apt-get update"
    $SUDO apt-get update -qq
    mirror=$(debian_mirror || true)
fi
[ -n "$mirror" ] || die "no Debian archive among apt's sources (apt-get indextargets)"
log "mirror $mirror"

# The root is rebuilt only when what goes into it changes (not for a change of the wrappers below).
root="$OUTDIR/rootfs"
root_key="suite $SUITE $BACKPORTS packages ${QEMU_PACKAGES[*]} mirror $mirror"
rm -f "$stamp"
started=$(date +%s)
if [ -x "$root/usr/bin/qemu-system-x86_64" ] && [ -f "$root/.vhd-root" ] \
        && [ "$(cat "$root/.vhd-root")" = "$root_key" ]; then
    log "root up to date: $root"
else
    # Built beside the result and moved in place at the end: an interrupted run leaves no half root.
    work="$OUTDIR/rootfs.tmp"
    $SUDO rm -rf "$work"
    # The backports suite is pinned low by its Release file; -t selects it for QEMU and for whatever
    # newer libraries QEMU's backport needs. Documentation and translations are not needed.
    $SUDO mmdebstrap --quiet --mode=root --variant=apt --components=main \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 \
            --no-install-recommends -t $BACKPORTS ${QEMU_PACKAGES[*]}" \
        --customize-hook='chroot "$1" apt-get clean' \
        "$SUITE" "$work" "deb $mirror $SUITE main" "deb $mirror $BACKPORTS main" \
        || die "mmdebstrap failed"
    [ -x "$work/usr/bin/qemu-system-x86_64" ] || die "no qemu-system-x86_64 in the new root"
    echo "$root_key" | $SUDO tee "$work/.vhd-root" >/dev/null
    echo "$(($(date +%s) - started))" | $SUDO tee "$work/.vhd-build-s" >/dev/null
    $SUDO rm -rf "$root"
    $SUDO mv "$work" "$root"
fi

# Wrappers: the root's loader runs the root's binary with the root's libraries. QEMU also looks for
# modules, firmware and data at compiled-in paths (/usr/lib/TRIPLET/qemu, /usr/share/qemu,
# /usr/share/seabios), where the host's own QEMU 7.2 keeps files that 11.1 refuses ("Only modules
# from the same build can be loaded"). So a wrapper first enters a private mount namespace and
# bind-mounts the root's directories over those; the host's mounts do not change.
mkdir -p "$OUTDIR/bin"
loader="/usr/lib/$TRIPLET/ld-linux-x86-64.so.2"
[ -e "$root$loader" ] || die "no dynamic loader $loader in the new root"
for tool in "${WRAPPED[@]}"; do
    [ -x "$root/usr/bin/$tool" ] || die "no $tool in the new root"
    extra_args=""
    [ "$tool" = qemu-system-x86_64 ] && extra_args='-L "$root/usr/share/qemu" -L "$root/usr/share/seabios"'
    sed -e "s|@TOOL@|$tool|g" -e "s|@ROOT@|$root|g" -e "s|@TRIPLET@|$TRIPLET|g" \
        -e "s|@LOADER@|$loader|g" -e "s|@SUITE@|$SUITE|g" -e "s|@EXTRA_ARGS@|$extra_args|g" \
        > "$OUTDIR/bin/$tool.tmp" <<'EOF'
#!/bin/sh
# @TOOL@ of the Debian @SUITE@ root built by scripts/build-qemu-root.sh, run by the root's own loader
# in a private mount namespace where the root's QEMU directories cover the host's.
root="@ROOT@"
if [ -z "$VHD_QEMU_ROOT_NS" ]; then
    export VHD_QEMU_ROOT_NS=1
    if [ "$(id -u)" -eq 0 ]; then
        exec unshare --mount --propagation private "$0" "$@"
    fi
    exec unshare --user --map-root-user --mount --propagation private "$0" "$@"
fi
unset VHD_QEMU_ROOT_NS
for dir in /usr/lib/@TRIPLET@/qemu /usr/share/qemu /usr/share/seabios; do
    if [ -d "$dir" ] && [ -d "$root$dir" ]; then
        mount --bind "$root$dir" "$dir" || exit 1
    fi
done
export QEMU_MODULE_DIR="$root/usr/lib/@TRIPLET@/qemu"
exec "$root@LOADER@" --argv0 @TOOL@ --library-path "$root/usr/lib/@TRIPLET@" \
    "$root/usr/bin/@TOOL@" @EXTRA_ARGS@ "$@"
EOF
    chmod 755 "$OUTDIR/bin/$tool.tmp"
    mv "$OUTDIR/bin/$tool.tmp" "$OUTDIR/bin/$tool"
done

version=$("$OUTDIR/bin/qemu-system-x86_64" --version | head -n 1)
"$OUTDIR/bin/qemu-system-x86_64" -device help | grep -q '"vfio-user-pci"' \
    || die "$version has no vfio-user-pci device"
root_build_s=$(cat "$root/.vhd-build-s" 2>/dev/null || echo unknown)
printf 'qemu %s\nroot_build_s %s\nscript %s\n' "$version" "$root_build_s" "$script_hash" > "$stamp"
log "ready in $(($(date +%s) - started)) s (the root took $root_build_s s): $version, with vfio-user-pci"
