#!/bin/sh
# First boot of the OffGrid appliance (run once by offgrid-firstboot.service,
# before offgrid.service): grow the root partition to fill the card, make the
# API key the server needs to listen on the LAN and print it on the console,
# and turn on SSH when the card carries an authorized_keys file.
set -eu

STATE=/var/lib/offgrid
DONE=/var/lib/offgrid-firstboot.done
FIRMWARE=/boot/firmware

say() { echo "offgrid-firstboot: $*"; }

# The boot partition carries the key file and authorized_keys. Its mount
# gives up after the fstab's device timeout, which a slow first boot (udev
# busy with every device for the first time) can outlast: try once more.
firmware_mounted() {
    mountpoint -q $FIRMWARE && return 0
    udevadm settle --timeout=120 || true
    mount $FIRMWARE 2>/dev/null || true
    mountpoint -q $FIRMWARE && return 0
    say "the boot partition is not mounted on $FIRMWARE"
    return 1
}

grow_root() {
    root_dev=$(findmnt -no SOURCE /)
    name=$(basename "$root_dev")
    if [ ! -e "/sys/class/block/$name/partition" ]; then
        say "root $root_dev is not a partition; not growing it"
        return 0
    fi
    part=$(cat "/sys/class/block/$name/partition")
    disk=/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")
    before=$(df -BM --output=size / | tail -n 1 | tr -d ' ')
    # Move the end of the last partition to the end of the card; partx tells
    # the kernel about the new size while the partition is mounted.
    if echo ", +" | sfdisk --quiet --no-reread --no-tell-kernel -N "$part" "$disk"; then
        partx --update --nr "$part" "$disk"
        resize2fs "$root_dev" >/dev/null 2>&1 || say "resize2fs $root_dev failed"
    else
        say "sfdisk could not grow partition $part of $disk"
    fi
    say "root file system $root_dev: $before before, $(df -BM --output=size / | tail -n 1 | tr -d ' ') now"
}

create_key() {
    key=$(runuser -u offgrid -- env OFFGRID_HOME=$STATE PYTHONPATH=/opt/offgrid/site python3 -c \
        'import sys; sys.path[0] = "/opt/offgrid"; import offgrid; sys.exit(offgrid.main())' \
        keys create --name appliance --scope admin 2>/dev/null)
    say "API key created (admin scope); it is shown only now:"
    say ""
    say "    OFFGRID API KEY: $key"
    say ""
    say "Clients send it as: Authorization: Bearer KEY"
    if firmware_mounted; then
        # For a Pi without a screen: the key can be read from the card on
        # another computer. docs/appliance.md says to delete the file.
        printf 'OFFGRID API KEY: %s\n' "$key" > $FIRMWARE/offgrid-api-key.txt
        sync
        say "the key is also in offgrid-api-key.txt on the card's boot partition"
    fi
}

enable_ssh() {
    if firmware_mounted && [ -f $FIRMWARE/authorized_keys ]; then
        install -d -m 700 /root/.ssh
        install -m 600 $FIRMWARE/authorized_keys /root/.ssh/authorized_keys
        rm -f $FIRMWARE/authorized_keys
        ssh-keygen -A >/dev/null
        systemctl enable ssh.service >/dev/null 2>&1
        systemctl start --no-block ssh.service
        say "SSH enabled for root with the keys from authorized_keys"
    else
        say "SSH stays off (put an authorized_keys file on the boot partition to turn it on)"
    fi
}

grow_root
create_key
enable_ssh
say "hostname $(hostname); on the LAN: http://$(hostname).local:11611"
touch $DONE
