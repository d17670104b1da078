#!/usr/bin/env bash
# Build a Raspberry Pi 3/4 (arm64) SD-card image that boots into `offgrid serve`.
#
#   sudo appliance/build-image.sh [--wheel llama_cpp_python-...-linux_aarch64.whl]
#                                 [--model FILE.gguf] [--initramfs list|most] [--out DIR]
#
# No Docker and no loop devices: an arm64 Debian bookworm rootfs is made with
# mmdebstrap under qemu-user (cached by its package list and options), offgrid
# and its aarch64 Python packages are copied in from this machine, and the
# partitioned image is assembled from a FAT file (mkfs.vfat -C + mcopy) and an
# ext4 file (mkfs.ext4 -d) with sfdisk and dd. The result is
# OUT/offgrid-<version>-rpi-arm64.img, its .zst and SHA256SUMS.
# Every stage prints its duration on stderr; the image path goes to stdout.
set -euo pipefail
# shellcheck source=/dev/null  # build/apt-sources.sh, checked with build/container.sh
. "$(dirname "$0")/../build/apt-sources.sh"

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${OFFGRID_BUILD_CACHE:-$HOME/.cache/offgrid-build}
suite=bookworm
pyver=3.11          # bookworm's python3
out=$repo/dist
wheel=""
model=""
initramfs=list
rootfs_only=0
compress=1
boot_mib=256

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    cat <<USAGE

Options:
  --wheel FILE       aarch64 llama-cpp-python wheel (default: build/wheels.sh aarch64)
  --model FILE       a .gguf model to preinstall into the image's model store
  --initramfs MODE   list: a small initrd with the modules a Pi 3/4 and QEMU need
                     (default); most: Debian's full initrd, for release images
  --out DIR          where the image goes (default: dist/)
  --no-compress      skip the .zst (tests use the raw image)
  --rootfs-only      only make (or reuse) the cached rootfs tarball; print its path
Environment: OFFGRID_BUILD_CACHE (default ~/.cache/offgrid-build) holds the
rootfs tarballs; OFFGRID_CACHED_ONLY=1 takes a cached rootfs or exits 3.
Needs root, mmdebstrap, qemu-user-static, binfmt-support, mtools,
dosfstools, e2fsprogs, fdisk, zstd and python3 with pip.
USAGE
}

die() { echo "build-image: $*" >&2; exit 1; }
log() { echo "build-image: $*" >&2; }
# stage NAME COMMAND...: run one stage and print how long it took.
stage() {
    local name=$1 t0=$SECONDS
    shift
    log "$name ..."
    "$@"
    log "$name took $((SECONDS - t0)) s"
}

while [ $# -gt 0 ]; do
    case $1 in
        --wheel) wheel=$(realpath "${2:?--wheel needs a file}"); shift 2 ;;
        --model) model=$(realpath "${2:?--model needs a file}"); shift 2 ;;
        --initramfs) initramfs=${2:?--initramfs needs list or most}; shift 2 ;;
        --out) out=${2:?--out needs a folder}; shift 2 ;;
        --no-compress) compress=0; shift ;;
        --rootfs-only) rootfs_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
case $initramfs in list|most) ;; *) die "--initramfs must be list or most, got $initramfs" ;; esac
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, chroot and binfmt_misc need it)"
[ -z "$wheel" ] || [ -f "$wheel" ] || die "no such wheel: $wheel"
[ -z "$model" ] || [ -f "$model" ] || die "no such model: $model"
for tool in mmdebstrap mcopy mkfs.vfat mkfs.ext4 sfdisk zstd update-binfmts; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install mmdebstrap qemu-user-static binfmt-support mtools dosfstools e2fsprogs fdisk zstd)"
done

# qemu-user ####################################################################

# arm64 programs in the rootfs run through binfmt_misc; on machines whose init
# is not systemd nothing mounts it, and qemu-user-static leaves it disabled.
enable_qemu_aarch64() {
    local bm=/proc/sys/fs/binfmt_misc
    if [ ! -e $bm/status ]; then
        mount -t binfmt_misc binfmt_misc $bm || die "cannot mount binfmt_misc on $bm"
    fi
    if [ ! -e $bm/qemu-aarch64 ] || ! grep -q '^enabled' $bm/qemu-aarch64; then
        update-binfmts --enable qemu-aarch64 || die "cannot enable qemu-aarch64 (is qemu-user-static installed?)"
    fi
    grep -q '^flags: .*F' $bm/qemu-aarch64 \
        || die "qemu-aarch64 is registered without the F flag; reinstall qemu-user-static"
}

# Rootfs #######################################################################

# The packages of the appliance. raspi-firmware is in non-free-firmware; it
# fills /boot/firmware with the Pi boot files, kernel and device trees.
packages="systemd-sysv udev dbus kmod iproute2 netbase ca-certificates python3 libgomp1
linux-image-arm64 initramfs-tools raspi-firmware dosfstools e2fsprogs fdisk
avahi-daemon libnss-mdns openssh-server"

# Modules a Pi 3/4 (SD card, USB disk) and QEMU's virt machine need to find
# the root file system; the rest load from /lib/modules after the switch.
initrd_modules="virtio_pci virtio_blk virtio_net ext4 vfat nls_cp437 nls_ascii
sdhci_iproc sdhci_pltfm mmc_block bcm2835 bcm2835_dma usb_storage uas dwc2 xhci_pci xhci_plat_hcd reset_raspberrypi"


rootfs_tarball() {
    local sources key
    # The host's sources with the non-free-firmware component added.
    sources=$(host_apt_sources "$suite" "main non-free-firmware" build-image) || exit 1
    # Keyed by what goes into it; the mirror is not part of the key.
    key=$(printf '%s\n' "$suite" "$packages" "$initramfs" "$initrd_modules" "rootfs-v1" \
        | sha256sum | cut -c1-12)
    tarball=$cache/rootfs/$suite-arm64-$initramfs-$key.tar.zst
    if [ -f "$tarball" ]; then
        log "rootfs: reusing $tarball"
        return
    fi
    if [ "${OFFGRID_CACHED_ONLY:-}" = 1 ]; then
        echo "build-image: not cached: the arm64 rootfs; appliance/build-image.sh --rootfs-only makes it" \
             "(OFFGRID_CACHED_ONLY=1)" >&2
        exit 3
    fi
    mkdir -p "$cache/rootfs"
    local hook
    hook=$(mktemp -d)
    printf '%s\n' "$sources" > "$hook/sources.list"
    # Written before any package is installed, so the kernel's initramfs is
    # made once, with these settings, and the conffiles are kept as they are.
    printf 'MODULES=%s\n' "$initramfs" > "$hook/offgrid.conf"
    printf '%s' "$initrd_modules" | tr -s ' \n' '\n' > "$hook/modules"
    log "rootfs: mmdebstrap $suite arm64 ($initramfs initramfs; about 8 minutes on 2 cores)"
    # shellcheck disable=SC2016  # the hooks' $1 is the rootfs, set by mmdebstrap
    mmdebstrap --mode=root --architectures=arm64 --variant=minbase \
        --include="$(printf '%s' "$packages" | tr -s ' \n' ',')" \
        --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
        --setup-hook="cp $hook/offgrid.conf \"\$1/etc/initramfs-tools/conf.d/offgrid.conf\"" \
        --setup-hook="cp $hook/modules \"\$1/etc/initramfs-tools/modules\"" \
        --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
        "$suite" "$cache/rootfs/partial-$key.tar.zst" "$hook/sources.list" >&2 \
        || { rm -rf "$hook" "$cache/rootfs/partial-$key.tar.zst"; die "mmdebstrap failed"; }
    rm -rf "$hook"
    mv "$cache/rootfs/partial-$key.tar.zst" "$tarball"
}

# Customise ####################################################################

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/offgrid.py")
[ -n "$version" ] || die "cannot read __version__ from offgrid.py"
host_python=python3
[ -x "$repo/.venv/bin/python" ] && host_python=$repo/.venv/bin/python

unpack_rootfs() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/offgrid-image.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    root=$work/root
    mkdir "$root"
    tar --zstd -xf "$tarball" -C "$root" --numeric-owner
}

customise() {
    root_uuid=$(cat /proc/sys/kernel/random/uuid)
    boot_id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ' | tr a-f A-F)
    boot_uuid=${boot_id:0:4}-${boot_id:4:4}
    echo offgrid > "$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\toffgrid\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        > "$root/etc/hosts"
    cat > "$root/etc/fstab" <<FSTAB
# <file system>	<mount point>	<type>	<options>	<dump>	<pass>
UUID=$root_uuid	/	ext4	defaults,noatime	0	1
UUID=$boot_uuid	/boot/firmware	vfat	defaults,nofail,x-systemd.device-timeout=60s	0	2
FSTAB
    # cmdline.txt now, and the same root for the kernel hook on later upgrades.
    sed -i "s|^#\{0,1\}ROOTPART=.*|ROOTPART=UUID=$root_uuid|" "$root/etc/default/raspi-firmware"
    grep -q "^ROOTPART=UUID=$root_uuid" "$root/etc/default/raspi-firmware" \
        || echo "ROOTPART=UUID=$root_uuid" >> "$root/etc/default/raspi-firmware"
    sed -i "s|root=[^ ]*|root=UUID=$root_uuid|" "$root/boot/firmware/cmdline.txt"
    grep -q "root=UUID=$root_uuid" "$root/boot/firmware/cmdline.txt" || die "cmdline.txt has no root="
    install -m 644 "$here/20-wired.network" "$root/etc/systemd/network/20-wired.network"

    # The server: offgrid.py, the unit offgrid writes itself, the appliance's
    # drop-in, the first-boot steps and the `offgrid` command for root.
    install -d "$root/opt/offgrid"
    install -m 644 "$repo/offgrid.py" "$root/opt/offgrid/offgrid.py"
    chroot "$root" useradd --system --user-group --home-dir /var/lib/offgrid --shell /usr/sbin/nologin offgrid
    "$host_python" "$root/opt/offgrid/offgrid.py" install-service --python /usr/bin/python3 --output - \
        | sed "s|$root||g" > "$root/etc/systemd/system/offgrid.service"
    install -d "$root/etc/systemd/system/offgrid.service.d"
    install -m 644 "$here/offgrid.service.conf" "$root/etc/systemd/system/offgrid.service.d/appliance.conf"
    install -m 644 "$here/offgrid-firstboot.service" "$root/etc/systemd/system/offgrid-firstboot.service"
    install -m 755 "$here/firstboot.sh" "$root/usr/local/sbin/offgrid-firstboot"
    install -m 755 "$here/offgrid-cli.sh" "$root/usr/local/bin/offgrid"
    install -d -m 750 "$root/var/lib/offgrid" "$root/var/lib/offgrid/models"
    printf '{\n  "host": "0.0.0.0"\n}\n' > "$root/var/lib/offgrid/config.json"
    if [ -n "$model" ]; then
        cp "$model" "$root/var/lib/offgrid/models/"
    fi
    chroot "$root" chown -R offgrid:offgrid /var/lib/offgrid
    chroot "$root" systemctl enable --quiet systemd-networkd.service offgrid.service offgrid-firstboot.service
    # SSH starts only if the first boot finds an authorized_keys file.
    chroot "$root" systemctl disable --quiet ssh.service
}

vendor() {
    if [ -z "$wheel" ]; then
        [ -x "$repo/build/wheels.sh" ] || die "no --wheel given and no build/wheels.sh to build one"
        wheel=$("$repo/build/wheels.sh" aarch64 | tail -n 1)
        [ -f "$wheel" ] || die "build/wheels.sh aarch64 printed no wheel"
    fi
    "$here/vendor.sh" "$root/opt/offgrid/site" "$pyver" "$wheel"
    # /opt is read-only to the service (ProtectSystem=strict): compile the
    # bytecode now, under the target's paths, or every start compiles it again.
    if [ "$("$host_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$pyver" ]; then
        "$host_python" -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$root" -p / \
            "$root/opt/offgrid" >&2
    else
        log "vendor: $host_python is not Python $pyver; the service compiles its bytecode at its first start"
        sed -i '/^# The image holds the bytecode/,/^Environment=PYTHONPYCACHEPREFIX=$/d' \
            "$root/etc/systemd/system/offgrid.service.d/appliance.conf"
    fi
}

# Image ########################################################################

assemble() {
    mkdir -p "$out"
    img=$out/offgrid-$version-rpi-arm64.img
    local fw=$work/firmware sector=512 start_mib=4 used root_mib total_mib
    # The FAT partition gets /boot/firmware; the root file system gets the
    # rest, with an empty /boot/firmware to mount it on.
    mv "$root/boot/firmware" "$fw"
    mkdir "$root/boot/firmware"
    used=$(du -sm "$root" | cut -f1)
    root_mib=$(( (used * 5 / 4 + 300 + 3) / 4 * 4 ))
    total_mib=$(( start_mib + boot_mib + root_mib ))
    rm -f "$img" "$work/boot.vfat" "$work/root.ext4"
    mkfs.vfat -F 32 -n RASPIFIRM -i "${boot_uuid/-/}" -C "$work/boot.vfat" $((boot_mib * 1024)) >/dev/null
    mcopy -s -p -i "$work/boot.vfat" "$fw"/* ::/
    mkfs.ext4 -q -L RASPIROOT -U "$root_uuid" -E root_owner=0:0 -d "$root" "$work/root.ext4" "${root_mib}M"
    rmdir "$root/boot/firmware"
    mv "$fw" "$root/boot/firmware"
    truncate -s "${total_mib}M" "$img"
    sfdisk --quiet "$img" <<TABLE
label: dos
label-id: 0x${boot_id:0:8}
unit: sectors
start=$((start_mib * 1024 * 1024 / sector)), size=$((boot_mib * 1024 * 1024 / sector)), type=c, bootable
start=$(((start_mib + boot_mib) * 1024 * 1024 / sector)), type=83
TABLE
    dd if="$work/boot.vfat" of="$img" bs=1M seek=$start_mib conv=notrunc,sparse status=none
    dd if="$work/root.ext4" of="$img" bs=1M seek=$((start_mib + boot_mib)) conv=notrunc,sparse status=none
    rm -f "$work/boot.vfat" "$work/root.ext4"
    log "image: $img, ${total_mib} MiB ($(du -h "$img" | cut -f1) allocated); root UUID $root_uuid, boot $boot_uuid"
}

compress_image() {
    rm -f "$img.zst"
    zstd -q -T0 -10 "$img" -o "$img.zst"
    (cd "$out" && sha256sum "$(basename "$img")" "$(basename "$img").zst" > SHA256SUMS)
    log "compressed: $img.zst, $(du -h "$img.zst" | cut -f1); checksums in $out/SHA256SUMS"
}

# Main #########################################################################

stage "qemu-user" enable_qemu_aarch64
stage "rootfs" rootfs_tarball
if [ $rootfs_only = 1 ]; then
    echo "$tarball"
    exit 0
fi

stage "unpack rootfs" unpack_rootfs
stage "customise" customise
stage "vendor" vendor
stage "assemble" assemble
[ $compress = 0 ] || stage "compress" compress_image
echo "$img"
