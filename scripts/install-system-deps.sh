#!/usr/bin/env bash
# Installs the Debian packages vhostd and its tests need, skipping those already present.
set -euo pipefail
PACKAGES=(
    gcc make python3-dev python3-venv pkg-config liburing-dev   # building the extension
    qemu-system-x86 qemu-utils busybox-static cpio              # e2e guests, qemu-storage-daemon
    libc6-dev                                                   # the guest's static pattern helper
    clang libclang-rt-14-dev                                    # AddressSanitizer build for fuzzing
    valgrind                                                    # instruction counts in the benchmark
    systemd tmux                                                # unit file check, vhostd-top's screen test
    prometheus                                                  # scraping /metrics, the dashboard's PromQL
    librbd1                                                     # RBD bdevs (optional at run time: dlopen'ed)
    ceph-mon ceph-osd ceph-mgr ceph-common                      # the tests' one-node Ceph cluster, `rbd export`
    qemu-block-extra                                            # QEMU's rbd driver: the benchmark's qsd-rbd target
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients   # a real libvirt domain on vhostd disks
    mmdebstrap                                                  # the Debian 13 root with QEMU 11.1 (vfio-user)
)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
