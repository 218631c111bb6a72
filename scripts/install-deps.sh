#!/usr/bin/env bash
# Installs the system packages geomx's build, tests and lab need on Debian bookworm (as root).
# Idempotent: does nothing when everything is there. Never starts the machine's own Docker
# service: geomx's lab runs one dockerd per network namespace instead.
set -euo pipefail

packages=(
  docker.io       # dockerd for the lab hosts (one per namespace)
  iptables        # nft backend; the agent drives it through the iptables crate
  iproute2        # ip netns / veth / bridge for the lab
  util-linux      # nsenter
  busybox-static  # userland of the test images
  tar
  ca-certificates
  iperf3          # data-plane benchmark and the geo-distributed lab's link checks
  wireguard-tools # wg: the agent configures its WireGuard interface with it
  wireguard-go    # WireGuard in user space where the kernel has no module (this machine kind)
  tcpdump         # captures on the lab's WAN router (tests of what crosses the WAN)
  debootstrap     # the real MXNet image (scripts/build-mxnet-image.sh)
  docker-registry # the lab's registry (geomx-lab up --registry): the distribution v2 server
  apache2-utils   # htpasswd: the lab registry's bcrypt password file
  systemd-container # systemd-nspawn: the booted lab hosts (geomx-lab up --boot)
  chromium        # headless browser of the dashboard's tests (tests/e2e/src/browser.rs)
  openssl         # the tests pin the lab controller's key for chromium
  curl            # the dashboard tests' plain HTTP(S) requests (no browser)
)
# Node.js's npm builds the dashboard's JavaScript dependencies (controller/server/web); a
# machine with Node.js from elsewhere (NodeSource) has npm already and must not get
# Debian's, which conflicts with it
command -v npm >/dev/null || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  # keep package scripts from starting services on this machine (its own dockerd would
  # rewrite the machine's iptables and docker0)
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  trap '[ $created_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in ip nsenter unshare iptables iptables-save dockerd docker busybox tar iperf3 wg wireguard-go tcpdump docker-registry htpasswd systemd-nspawn dpkg-deb chromium openssl curl npm; do
  command -v "$tool" >/dev/null || { echo "install-deps: $tool still missing" >&2; exit 1; }
done

# the dashboard's npm packages, exactly as web/package-lock.json pins them
web="$(dirname "$0")/../controller/server/web"
if [ ! -e "$web/node_modules/.package-lock.json" ] || ! cmp -s "$web/package-lock.json" "$web/node_modules/.package-lock.json.src" 2>/dev/null; then
  echo "install-deps: npm ci in controller/server/web"
  (cd "$web" && npm ci --no-audit --no-fund --ignore-scripts >/dev/null && cp package-lock.json node_modules/.package-lock.json.src)
fi
