#!/usr/bin/env bash
# Prepares everything the real-guest vhost-user-blk tests need; idempotent, safe on a fresh clone.
#
#   Tests/vhost/setup.sh            # install what is missing, build the initramfs, print the paths
#   DP_VHOST_CACHE=DIR setup.sh     # cache somewhere else (default: <repo>/.build-vhost)
#
# 1. Debian packages (only those missing; needs root): qemu-system-x86 (with qemu-storage-daemon
#    from qemu-system-common), qemu-utils (qemu-img), busybox-static. --no-install-recommends:
#    the recommends pull ~140 more packages (GUI, audio, USB) that a headless TCG guest never uses.
# 2. The guest kernel. We do NOT install linux-image-amd64 on the host: in a container that pulls
#    systemd, udev and initramfs-tools and runs their hooks (building an initramfs for the host).
#    Instead `apt-get download` the versioned image package that linux-image-amd64 depends on and
#    extract only vmlinuz and the six virtio modules into the cache. No hooks, nothing installed,
#    works the same on any Debian 12 machine as root. DP_VHOST_KVER=VERSION pins the version (it
#    must be downloadable); an already extracted version in the cache is reused without apt.
# 3. The initramfs (Tests/vhost/README.md): busybox, the modules, guest/init. Rebuilt only when an
#    input changed (a checksum stamp), in well under a second.
#
# Writes CACHE/env.sh (KVER, KERNEL, INITRD, VHOST_CACHE) for the other scripts and prints it.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PACKAGES=(qemu-system-x86 qemu-utils busybox-static)
MODULES=(  # load order matters
    drivers/virtio/virtio_ring.ko
    drivers/virtio/virtio.ko
    drivers/virtio/virtio_pci_modern_dev.ko
    drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci.ko
    drivers/block/virtio_blk.ko
)

is_installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

apt_updated=0
apt_update_once() {
    if [ $apt_updated = 0 ]; then
        vlog "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do is_installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
    local t0=$SECONDS
    apt_update_once
    vlog "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        > "$VHOST_CACHE/apt-install.log" 2>&1 || { tail -20 "$VHOST_CACHE/apt-install.log" >&2; die "apt-get install failed"; }
    vlog "installed in $(( SECONDS - t0 ))s"
}

# Sets KVER and KDIR (which holds boot/vmlinuz-KVER and lib/modules/KVER/kernel/...).
fetch_kernel() {
    local pkg deb
    KVER=${DP_VHOST_KVER:-}
    if [ -z "$KVER" ]; then
        # Reuse the newest version already extracted, if any, so a second run needs no apt at all.
        KVER=$(ls -1 "$VHOST_CACHE/kernel" 2>/dev/null | grep -v '\.tmp$' | sort -V | tail -1 || true)
        if [ -n "$KVER" ] && [ ! -e "$VHOST_CACHE/kernel/$KVER/.complete" ]; then KVER=; fi
    fi
    if [ -z "$KVER" ]; then
        apt_update_once
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 to a versioned package (apt-get update?)"
        KVER=${pkg#linux-image-}
    fi
    KDIR=$VHOST_CACHE/kernel/$KVER
    [ -e "$KDIR/.complete" ] && return 0

    pkg=linux-image-$KVER
    mkdir -p "$VHOST_CACHE/deb"
    deb=$(ls -1 "$VHOST_CACHE/deb/${pkg}_"*.deb 2>/dev/null | tail -1 || true)
    if [ -z "$deb" ]; then
        [ "$(id -u)" = 0 ] || die "need root (or a cached $pkg .deb) to download the guest kernel"
        apt_update_once
        vlog "apt-get download $pkg"
        # As root apt warns that the _apt user cannot write here; the download still succeeds.
        (cd "$VHOST_CACHE/deb" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
        deb=$(ls -1 "$VHOST_CACHE/deb/${pkg}_"*.deb 2>/dev/null | tail -1 || true)
        [ -n "$deb" ] || die "apt-get download $pkg failed"
    fi
    vlog "extracting vmlinuz and virtio modules from $(basename "$deb")"
    rm -rf "$KDIR.tmp"
    mkdir -p "$KDIR.tmp"
    local members=("./boot/vmlinuz-$KVER") m
    for m in "${MODULES[@]}"; do members+=("./lib/modules/$KVER/kernel/$m"); done
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$KDIR.tmp" "${members[@]}"
    rm -rf "$KDIR"
    mv "$KDIR.tmp" "$KDIR"
    touch "$KDIR/.complete"
    # The .deb is 70 MB and no longer needed once extracted.
    rm -f "$deb"
}

build_initramfs() {
    local busybox=/bin/busybox init=$VHOST_DIR/guest/init m stamp tree
    case " $("$busybox" --list 2>/dev/null | tr '\n' ' ') " in
        *" ash "*" dd "*) ;;
        *) die "$busybox is not a usable busybox-static" ;;
    esac
    INITRD=$VHOST_CACHE/initramfs-$KVER.cpio.gz
    stamp=$( { sha256sum "$busybox" "$init"; for m in "${MODULES[@]}"; do sha256sum "$KDIR/lib/modules/$KVER/kernel/$m"; done; } | sha256sum | cut -c1-16)
    if [ -e "$INITRD" ] && [ "$(cat "$INITRD.stamp" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    vlog "building $INITRD"
    tree=$VHOST_CACHE/initramfs-tree
    rm -rf "$tree"
    mkdir -p "$tree/bin" "$tree/lib/modules" "$tree/dev" "$tree/proc" "$tree/sys" "$tree/tmp"
    cp "$busybox" "$tree/bin/busybox"
    for m in "${MODULES[@]}"; do
        local f=$KDIR/lib/modules/$KVER/kernel/$m
        case $f in  # busybox insmod cannot read compressed modules (newer Debian kernels use .ko.xz)
            *.xz) xz -dc "$f" > "$tree/lib/modules/$(basename "$f" .xz)" ;;
            *) cp "$f" "$tree/lib/modules/" ;;
        esac
    done
    cp "$init" "$tree/init"
    chmod 755 "$tree/init" "$tree/bin/busybox"
    (cd "$tree" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$INITRD.tmp")
    mv "$INITRD.tmp" "$INITRD"
    echo "$stamp" > "$INITRD.stamp"
}

main() {
    local t0=$SECONDS
    mkdir -p "$VHOST_CACHE"
    install_packages
    for c in qemu-system-x86_64 qemu-storage-daemon qemu-img; do
        command -v "$c" >/dev/null || die "$c not found after install"
    done
    fetch_kernel
    build_initramfs
    cat > "$VHOST_CACHE/env.sh" <<EOF
VHOST_CACHE='$VHOST_CACHE'
KVER='$KVER'
KERNEL='$KDIR/boot/vmlinuz-$KVER'
INITRD='$INITRD'
EOF
    cat "$VHOST_CACHE/env.sh"
    vlog "setup done in $(( SECONDS - t0 ))s"
}

main "$@"
