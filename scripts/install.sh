#!/usr/bin/env bash
# Installs geomx on this machine (or into a package root): the binaries, the systemd units
# and example configurations. Idempotent: binaries and units are replaced, configuration
# files that exist are never touched.
#
#   scripts/install.sh [--prefix /usr/local] [--bin-dir DIR] [--build] [--no-reload]
#   DESTDIR=/tmp/pkg scripts/install.sh --prefix /usr     # packaging: nothing outside DESTDIR
#
#   binaries  geomx-agent geomx-controller geomxctl -> $DESTDIR$PREFIX/bin
#             (from target/release, or --bin-dir; --build runs `cargo build --release` first)
#   units     geomx-agent.service geomx-controller.service -> $DESTDIR/etc/systemd/system
#             (ExecStart pointing at $PREFIX/bin)
#   configs   /etc/geomx/agent.toml and /etc/geomx/controller.toml from systemd/*.example,
#             only if absent; the examples themselves always as /etc/geomx/*.toml.example;
#             /etc/geomx/tls (mode 0700) for the certificates
#
# Afterwards (see docs/deploy.md): put the certificates in /etc/geomx/tls, edit the
# config, `systemctl enable --now geomx-agent` (or geomx-controller).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=/usr/local
bin_dir=""
build=0
reload=1
destdir=${DESTDIR:-}

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --bin-dir=*) bin_dir=${1#*=}; shift ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --destdir=*) destdir=${1#*=}; shift ;;
    --build) build=1; shift ;;
    --no-reload) reload=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$prefix" in
  /*) ;;
  *) echo "install.sh: --prefix must be an absolute path (got $prefix)" >&2; exit 2 ;;
esac
destdir=${destdir%/}

binaries=(geomx-agent geomx-controller geomxctl)
if [ -z "$bin_dir" ]; then
  bin_dir="$repo/target/release"
  if [ "$build" = 1 ]; then
    (cd "$repo" && cargo build --release --bins -p geomx-agent -p geomx-controller -p geomxctl)
  fi
fi
for b in "${binaries[@]}"; do
  if [ ! -x "$bin_dir/$b" ]; then
    echo "install.sh: $bin_dir/$b is missing: build first (cargo build --release, or --build)" >&2
    exit 1
  fi
done

target_bin="$destdir$prefix/bin"
unit_dir="$destdir/etc/systemd/system"
conf_dir="$destdir/etc/geomx"

install -d -m 0755 "$target_bin" "$unit_dir" "$conf_dir"
install -d -m 0700 "$conf_dir/tls"

for b in "${binaries[@]}"; do
  install -m 0755 "$bin_dir/$b" "$target_bin/$b"
  echo "installed $target_bin/$b"
done

for unit in geomx-agent.service geomx-controller.service; do
  tmp=$(mktemp)
  sed "s|/usr/local/bin/|$prefix/bin/|g" "$repo/systemd/$unit" >"$tmp"
  install -m 0644 "$tmp" "$unit_dir/$unit"
  rm -f "$tmp"
  echo "installed $unit_dir/$unit"
done

for conf in agent controller; do
  install -m 0644 "$repo/systemd/$conf.toml.example" "$conf_dir/$conf.toml.example"
  if [ -e "$conf_dir/$conf.toml" ]; then
    echo "kept $conf_dir/$conf.toml (exists)"
  else
    install -m 0644 "$repo/systemd/$conf.toml.example" "$conf_dir/$conf.toml"
    case $conf in
      agent) hint="name, controller, underlay_ip, [tls]" ;;
      *) hint="listen, cluster_cidr, [tls], [auth]" ;;
    esac
    echo "installed $conf_dir/$conf.toml: edit it ($hint)"
  fi
done

if [ -z "$destdir" ] && [ "$reload" = 1 ] && command -v systemctl >/dev/null 2>&1 \
  && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "systemd reloaded; next: systemctl enable --now geomx-agent (or geomx-controller)"
fi
