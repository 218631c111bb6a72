#!/usr/bin/env bash
# Builds the Debian packages geomx-agent, geomx-controller and geomxctl from the workspace's
# binaries with dpkg-deb (nothing else needed on Debian):
#
#   scripts/package.sh [--build] [--bin-dir DIR] [--version V] [--out DIR] [--compress xz|gzip|none]
#
#   --build        cargo build --release first (the binaries then come from target/release)
#   --bin-dir DIR  where the binaries are (default target/release)
#   --version V    package version (default: the workspace's version, from Cargo.toml)
#   --out DIR      where the .debs go (default target/debian)
#   --compress C   dpkg-deb compression (default xz; the lab uses none for debug binaries)
#
# Each package holds its binary (debug information stripped) in /usr/bin; the services also their unit in
# /lib/systemd/system (ExecStart at /usr/bin), the example configuration as
# /etc/geomx/<name>.toml.example (a conffile: an edited one survives upgrades; the real
# /etc/geomx/<name>.toml is the admin's and no package owns it) and maintainer scripts from
# systemd/debian/ that reload systemd, never start a service on its first install, and on an
# upgrade restart a running one on the new binary.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bin_dir=""
version=""
out=target/debian
compress=xz
build=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=1; shift ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --version) version=${2:?--version needs a version}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --compress) compress=${2:?--compress needs xz, gzip or none}; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$compress" in xz|gzip|none) ;; *) echo "package.sh: --compress must be xz, gzip or none (got $compress)" >&2; exit 2 ;; esac
for tool in dpkg-deb strip; do
  command -v $tool >/dev/null || { echo "package.sh: $tool missing (dpkg-dev / binutils)" >&2; exit 1; }
done

if [ -z "$version" ]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
fi
# Debian versions: digits first, then [A-Za-z0-9.+~-]
if ! [[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]]; then
  echo "package.sh: \"$version\" is not a Debian package version" >&2
  exit 2
fi
if [ -z "$bin_dir" ]; then
  bin_dir=target/release
  [ "$build" = 1 ] && cargo build --release --locked -p geomx-agent -p geomx-controller -p geomxctl
fi
for b in geomx-agent geomx-controller geomxctl; do
  [ -x "$bin_dir/$b" ] || { echo "package.sh: $bin_dir/$b is missing: build first (--build, or --bin-dir)" >&2; exit 1; }
done
arch=$(dpkg --print-architecture)
maintainer="geomx maintainers <geomx@example.invalid>"
homepage=$(sed -n '/^\[workspace.package\]/,/^\[/s/^repository *= *"\(.*\)"/\1/p' Cargo.toml)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# package NAME DESCRIPTION DEPENDS RECOMMENDS [UNIT CONFIG]
package() {
  local name=$1 description=$2 depends=$3 recommends=$4 unit=${5:-} config=${6:-}
  local root="$work/$name"
  install -d -m 0755 "$root/DEBIAN" "$root/usr/bin"
  install -m 0755 "$bin_dir/$name" "$root/usr/bin/$name"
  # as Debian ships binaries: without debug information (symbols stay, for backtraces)
  strip --strip-debug "$root/usr/bin/$name"
  if [ -n "$unit" ]; then
    install -d -m 0755 "$root/lib/systemd/system" "$root/etc/geomx"
    install -d -m 0700 "$root/etc/geomx/tls"
    sed "s|/usr/local/bin/|/usr/bin/|g" "systemd/$unit.service" > "$root/lib/systemd/system/$unit.service"
    chmod 0644 "$root/lib/systemd/system/$unit.service"
    install -m 0644 "systemd/$config.toml.example" "$root/etc/geomx/$config.toml.example"
    echo "/etc/geomx/$config.toml.example" > "$root/DEBIAN/conffiles"
    for script in postinst prerm postrm; do
      sed -e "s|@PACKAGE@|$name|g" -e "s|@UNIT@|$unit|g" -e "s|@CONFIG@|/etc/geomx/$config.toml|g" \
        "systemd/debian/$script" > "$root/DEBIAN/$script"
      chmod 0755 "$root/DEBIAN/$script"
    done
  fi
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  {
    echo "Package: $name"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: $maintainer"
    echo "Installed-Size: $size"
    [ -n "$depends" ] && echo "Depends: $depends"
    [ -n "$recommends" ] && echo "Recommends: $recommends"
    echo "Section: net"
    echo "Priority: optional"
    echo "Homepage: $homepage"
    echo "Description: $description"
  } > "$root/DEBIAN/control"
  local deb="$out/${name}_${version}_${arch}.deb"
  dpkg-deb --root-owner-group -Z"$compress" --build "$root" "$deb" >/dev/null
  echo "$deb"
}

package geomx-agent "geomx agent: a host's network and GeoMX role containers
 One per host, as the systemd service geomx-agent: owns docker0's bip, the routes to the
 other hosts' container subnets and the iptables rules, and runs the role containers the
 geomx controller assigns to the host." \
  "docker.io | docker-ce, iptables, iproute2, systemd" "wireguard-tools" geomx-agent agent
package geomx-controller "geomx controller: the control plane of geomx
 Hands out container subnets, distributes the party topology of GeoMX jobs to the agents
 and aggregates their heartbeats (gRPC, TLS)." \
  "systemd" "" geomx-controller controller
package geomxctl "geomxctl: the geomx command line
 Plans and submits GeoMX jobs, shows hosts, jobs and logs, makes certificates and tokens." \
  "" ""
