#!/usr/bin/env bash
# Builds the root file system of the lab's booted hosts (`geomx-lab up --boot`): Debian
# bookworm with systemd, dbus, docker.io, iptables and iproute2, as a plain host would have
# before geomx is installed on it. Built once by debootstrap and kept as a directory, reused
# while this script is unchanged (DIR.key holds its hash); every booted host runs on an
# overlay of it (its own upper directory), so the cache itself is never written to.
#
# Usage: scripts/build-host-rootfs.sh [--dir DIR]   (default /var/cache/geomx/host-rootfs)
# Needs root and a Debian mirror (DEBIAN_MIRROR, default deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=/var/cache/geomx/host-rootfs
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=${2:?--dir needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-host-rootfs: unknown argument $1" >&2; exit 2 ;;
  esac
done

key=$(sha256sum "$0" | cut -d' ' -f1)
if [ -d "$dir/usr" ] && [ "$(cat "$dir.key" 2>/dev/null)" = "$key" ]; then
  echo "build-host-rootfs: reusing $dir (key ${key:0:12})"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "build-host-rootfs: debootstrap missing (scripts/install-deps.sh)" >&2; exit 1; }
mkdir -p "$(dirname "$dir")"
work=$(mktemp -d "$(dirname "$dir")/host-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-host-rootfs: debootstrap bookworm into $work/rootfs"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,iproute2,iptables,docker.io,ca-certificates,procps \
  bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
r=$work/rootfs
# no login prompts on the machines' consoles; nothing that waits for a network manager
ln -sf /dev/null "$r/etc/systemd/system/console-getty.service"
ln -sf /dev/null "$r/etc/systemd/system/getty@.service"
ln -sf /dev/null "$r/etc/systemd/system/systemd-networkd-wait-online.service"
# each machine gets its own machine-id at first boot
: > "$r/etc/machine-id"
rm -f "$r/var/lib/dbus/machine-id"
chroot "$r" apt-get clean
rm -rf "$r/var/lib/apt/lists/"* "$r/var/cache/debconf/"*-old
rm -rf "$dir" "$dir.key"
mv "$r" "$dir"
echo "$key" > "$dir.key"
echo "build-host-rootfs: $dir ($(du -sh "$dir" | cut -f1))"
