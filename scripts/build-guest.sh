#!/usr/bin/env bash
# Builds the e2e test guest into OUTDIR: a Debian cloud kernel (OUTDIR/vmlinuz) and a busybox
# initramfs (OUTDIR/initramfs.cpio.gz) whose /init loads the virtio-blk/virtio-scsi modules and then
# serves commands on the serial console (the protocol tests/e2e/guest.py speaks). The initramfs also
# holds /bin/vhd-pattern (tests/e2e/tools/vhd-pattern.c, static), which writes and checks test data at
# native speed; the same binary is left at OUTDIR/vhd-pattern for the host's side of the checks.
#
# Idempotent: a stamp records the kernel package and a hash of this script and of the helper's
# source; when the artifacts and a matching stamp exist nothing is done (no network either).
# Non-interactive, fit for CI.
#
# usage: scripts/build-guest.sh OUTDIR
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
PATTERN_SOURCE="$REPO_ROOT/tests/e2e/tools/vhd-pattern.c"
KERNEL_META=linux-image-cloud-amd64
# insmod order: each module after the ones it depends on.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         scsi_common scsi_mod sd_mod virtio_scsi virtio_blk)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

apt_update() {
    log "running apt-get update"
    $SUDO apt-get update -qq
}

# The metapackage depends on the versioned kernel package, e.g. linux-image-6.1.0-56-cloud-amd64.
kernel_package() {
    apt-cache depends "$KERNEL_META" 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n 1
}

script_hash=$(cat "$0" "$PATTERN_SOURCE" | sha256sum | cut -d' ' -f1)
stamp="$OUTDIR/.stamp"
if [ -f "$OUTDIR/vmlinuz" ] && [ -f "$OUTDIR/initramfs.cpio.gz" ] && [ -f "$OUTDIR/vhd-pattern" ] \
        && [ -f "$stamp" ] && grep -qx "script $script_hash" "$stamp"; then
    log "up to date: $OUTDIR ($(sed -n 's/^kernel //p' "$stamp"))"
    exit 0
fi

for tool in apt-cache apt-get dpkg-deb cpio gzip gcc; do
    command -v "$tool" >/dev/null || die "$tool not found (this script needs a Debian system)"
done
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || die "busybox not found: apt-get install busybox-static"
# The initramfs has no libc: only the static busybox works there.
if LC_ALL=C ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked: apt-get install busybox-static"
fi

pkg=$(kernel_package || true)
if [ -z "$pkg" ]; then
    apt_update
    pkg=$(kernel_package || true)
fi
[ -n "$pkg" ] || die "cannot resolve the kernel package $KERNEL_META depends on"

# 1. Download the kernel package (kept in OUTDIR, reused on the next run).
debdir="$OUTDIR/deb"
mkdir -p "$debdir"
# Packages of kernels the metapackage no longer points to are of no further use.
find "$debdir" -maxdepth 1 -name '*.deb' ! -name "${pkg}_*" -delete
deb=$(find "$debdir" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)
if [ -z "$deb" ]; then
    log "downloading $pkg"
    # apt-get download writes into the current directory; as root it warns that the _apt user
    # cannot write there, which is harmless.
    if ! (cd "$debdir" && apt-get download -q "$pkg"); then
        apt_update
        (cd "$debdir" && apt-get download -q "$pkg")
    fi
    deb=$(find "$debdir" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)
    [ -n "$deb" ] || die "apt-get download $pkg produced no .deb in $debdir"
fi

# 2. Unpack it and take the kernel image.
kroot="$OUTDIR/kernel-root"
rm -rf "$kroot"
dpkg-deb -x "$deb" "$kroot"
vmlinuz=$(find "$kroot/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
[ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in $deb"
kver=${vmlinuz##*/vmlinuz-}
moddir="$kroot/lib/modules/$kver"
[ -d "$moddir" ] || die "no modules directory for $kver in $deb"

# 3. The initramfs tree: busybox with one symlink per applet, the pattern helper, the modules, /init.
root="$OUTDIR/initramfs-root"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
# Static: the initramfs has no libc (needs libc6-dev's libc.a).
gcc -static -O2 -Wall -Wextra -Werror -o "$OUTDIR/vhd-pattern.tmp" "$PATTERN_SOURCE" \
    || die "cannot build $PATTERN_SOURCE (gcc and libc6-dev are needed)"
cp "$OUTDIR/vhd-pattern.tmp" "$root/bin/vhd-pattern"
for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

: > "$root/etc/guest-modules"
for mod in "${MODULES[@]}"; do
    src=$(find "$moddir" -name "$mod.ko" -o -name "$mod.ko.*" | head -n 1)
    if [ -z "$src" ]; then
        grep -q "/$mod\.ko\$" "$moddir/modules.builtin" 2>/dev/null \
            || die "module $mod is neither in $pkg nor built into its kernel"
        log "$mod is built into the kernel"
        continue
    fi
    # busybox insmod cannot read compressed modules: decompress on the host.
    dst="$root/lib/modules/$mod.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" > "$dst" ;;
        *.ko.zst) zstd -qdc "$src" > "$dst" ;;
        *.ko.gz) gzip -dc "$src" > "$dst" ;;
        *) die "unknown module compression: $src" ;;
    esac
    echo "$mod" >> "$root/etc/guest-modules"
done

# The serial-console command protocol (spoken by tests/e2e/guest.py):
#   host -> guest: "RUN <nonce> <n>" then n lines of the base64-encoded shell script
#   guest -> host: "VHD-BEGIN-<nonce>", the script's stdout+stderr, "\nVHD-END-<nonce> rc=<status>"
# The console echoes nothing and does not map \n to \r\n, so the output comes back byte for byte.
cat > "$root/init" <<'EOF'
#!/bin/sh
# PID 1 of the vhostd e2e guest.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/ttyS0 >/dev/ttyS0 2>&1

for mod in $(cat /etc/guest-modules); do
    insmod "/lib/modules/$mod.ko" || echo "guest-init: insmod $mod failed"
done
# Kernel messages would interleave with command output; `dmesg` still has them.
echo 1 > /proc/sys/kernel/printk
stty -echo -onlcr

# `make demo` (scripts/demo.py) boots with vhd.demo=1: run its job instead of serving commands.
if grep -qw vhd.demo=1 /proc/cmdline; then
    vhd-demo
    sync
    poweroff -f
fi

echo "VHD-GUEST-READY"
while :; do
    IFS= read -r header || { sleep 1; continue; }
    case "$header" in
        "RUN "*) ;;
        *) continue ;;
    esac
    set -- $header
    nonce=$2
    lines=$3
    : > /tmp/cmd.b64
    while [ "$lines" -gt 0 ]; do
        IFS= read -r chunk
        echo "$chunk" >> /tmp/cmd.b64
        lines=$((lines - 1))
    done
    echo "VHD-BEGIN-$nonce"
    if base64 -d /tmp/cmd.b64 > /tmp/cmd.sh; then
        # A child shell: a command's `exit` or `cd` cannot touch PID 1.
        sh /tmp/cmd.sh </dev/null 2>&1
        rc=$?
    else
        rc=254
    fi
    echo
    echo "VHD-END-$nonce rc=$rc"
done
EOF
chmod 755 "$root/init"

# The guest's side of `make demo` (scripts/demo.py parses these lines; keep the two in step):
#   vhd-demo: disk NAME size_bytes=N hctl=H:C:T:L|- serial=S|- model=MODEL...
#   vhd-demo: verify NAME wrote=SEED expect=SEED|zero result=ok N|<what differed>
#   vhd-demo: job-ready          then it waits for a line from the host before the timed job
#   vhd-demo: job NAME ops=N bytes=B ms=T iops=I      (or: job NAME failed: ...)
#   vhd-demo: done failures=N
# Kernel command line: vhd.demo_disks=N (wait for N disks), vhd.demo_job_ms=MS (the job's length).
cat > "$root/bin/vhd-demo" <<'EOF'
#!/bin/sh
# The `make demo` job: the disks the guest sees, a pattern written and read back with O_DIRECT on
# each, then a timed random-read job (4 KiB, O_DIRECT, one at a time) on all of them at once.
disks=1
job_ms=2000
for word in $(cat /proc/cmdline); do
    case "$word" in
        vhd.demo_disks=*) disks=${word#*=} ;;
        vhd.demo_job_ms=*) job_ms=${word#*=} ;;
    esac
done
say() { echo "vhd-demo: $*"; }
names() { for dev in /sys/block/vd* /sys/block/sd*; do [ -e "$dev" ] && echo "${dev##*/}"; done; }
size_bytes() { echo $(($(cat "/sys/block/$1/size") * 512)); }

# SCSI targets are scanned asynchronously after virtio_scsi loads: wait for them (30 s at most).
tries=300
while [ "$(names | wc -l)" -lt "$disks" ] && [ "$tries" -gt 0 ]; do
    sleep 0.1
    tries=$((tries - 1))
done

failures=0
seed=1
for name in $(names); do
    dev=/sys/block/$name
    hctl=-
    serial=-
    if [ -r "$dev/device/model" ]; then
        hctl=$(basename "$(readlink -f "$dev/device")")
        model=$(echo $(cat "$dev/device/vendor") $(cat "$dev/device/model"))
    else
        model=virtio-blk
        [ -s "$dev/serial" ] && serial=$(cat "$dev/serial")
    fi
    say "disk $name size_bytes=$(size_bytes "$name") hctl=$hctl serial=$serial model=$model"
    # A null disk drops what is written and its reads move no data (SPDK's null bdev): the
    # check's fresh, zero-filled buffer must come back unchanged.
    expect=$seed
    case "$model" in *"Null disk") expect=zero ;; esac
    if ! result=$(vhd-pattern write $seed "/dev/$name" 0 4M -b 1M -d 2>&1) \
            || ! result=$(vhd-pattern check $expect "/dev/$name" 0 4M -b 1M -d 2>&1); then
        failures=$((failures + 1))
    fi
    say "verify $name wrote=$seed expect=$expect result=$result"
    seed=$((seed + 1))
done

say "job-ready"
read -r go
for name in $(names); do
    vhd-pattern randread "/dev/$name" "$(size_bytes "$name")" "$job_ms" -d > "/tmp/job.$name" 2>&1 &
done
wait
for name in $(names); do
    if grep -q '^randread ' "/tmp/job.$name"; then
        say "job $name $(sed 's|^randread [^ ]* ||' "/tmp/job.$name")"
    else
        failures=$((failures + 1))
        say "job $name failed: $(cat "/tmp/job.$name")"
    fi
done
say "done failures=$failures"
EOF
chmod 755 "$root/bin/vhd-demo"

# 4. Pack it and publish the artifacts atomically, stamp last.
rm -f "$stamp"
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -1 \
    > "$OUTDIR/initramfs.cpio.gz.tmp"
mv "$OUTDIR/initramfs.cpio.gz.tmp" "$OUTDIR/initramfs.cpio.gz"
cp "$vmlinuz" "$OUTDIR/vmlinuz.tmp"
mv "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
mv "$OUTDIR/vhd-pattern.tmp" "$OUTDIR/vhd-pattern"
rm -rf "$kroot"
printf 'kernel %s\nscript %s\n' "$pkg" "$script_hash" > "$stamp"
log "built $OUTDIR/vmlinuz and $OUTDIR/initramfs.cpio.gz ($pkg, modules: $(tr '\n' ' ' < "$root/etc/guest-modules"))"
