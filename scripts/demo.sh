#!/usr/bin/env bash
# The main job on a local multi-host lab, from a fresh Debian bookworm machine (as root):
#   1. installs the system packages (scripts/install-deps.sh) and builds geomx;
#   2. builds the real MXNet 1.9.1 image (scripts/build-mxnet-image.sh, cached);
#   3. brings up a geo-distributed lab (examples/geo-lab.toml: three data centers dc1, dc2,
#      dc3, each its own routed network with one host, a, b and c, joined by WAN links of
#      30-60 ms one way, 100-200 Mbit and 0.1 % loss; one dockerd per host, the controller in
#      dc1, an agent per host, TLS everywhere) with `geomx-lab up --topology`; the agents
#      connect the data centers with WireGuard;
#   4. runs the seed's HiPS topology (examples/hips.toml, 12 nodes: the central party in dc1,
#      the parties in dc2 and dc3) on the lab's stand-in GeoMX image, and then real MXNet
#      training on scikit-learn's handwritten digits (examples/mxnet-ps.toml) across dc1 and
#      dc2, each followed to its end with `geomxctl submit`;
#   5. tears the lab down (pass --keep to leave it up and explore with geomxctl).
# Nothing outside the lab's namespaces is changed.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "demo: unknown argument $arg" >&2; exit 2 ;;
  esac
done

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "installing system packages"
scripts/install-deps.sh

step "building geomx"
cargo build --workspace --bins --locked
export PATH="$PWD/target/debug:$PATH"

step "building the MXNet 1.9.1 image (debootstrap + wheels, cached)"
scripts/build-mxnet-image.sh

lab=demo
geomx-lab --name "$lab" down >/dev/null 2>&1 || true   # what a previous demo left
step "bringing up the lab: 3 data centers on WAN links, controller, agents, images"
geomx-lab --name "$lab" up --topology examples/geo-lab.toml --mxnet-tar /var/cache/geomx/mxnet-1.9.1.tar
if [ "$keep" = 0 ]; then
  trap 'step "tearing the lab down"; geomx-lab --name "$lab" down' EXIT
fi
eval "$(geomx-lab --name "$lab" env)"

step "geomx-lab link show: the WAN between the data centers"
geomx-lab --name "$lab" link show

step "geomxctl hosts: every host has its own container subnet"
geomxctl hosts

step "the data plane on host a: WireGuard to the other data centers"
geomx-lab --name "$lab" exec a -- ip route show proto 247
geomx-lab --name "$lab" exec a -- wg show geomx-wg

step "geomxctl plan examples/hips.toml: 12 nodes, every DMLC_* count computed"
geomxctl plan examples/hips.toml

step "geomxctl submit examples/hips.toml (the lab's stand-in image plays GeoMX)"
geomxctl submit examples/hips.toml
geomxctl status hips-mnist
geomxctl events hips-mnist

step "geomxctl submit examples/mxnet-ps.toml: real MXNet 1.9.1 training across dc1 and dc2"
geomxctl submit examples/mxnet-ps.toml
geomxctl status mxnet-ps

step "the controller's /metrics (Prometheus text) through the lab's web forwarder"
curl -sS --cacert "$GEOMX_CA" -H "Authorization: Bearer $GEOMX_TOKEN" "$GEOMX_WEB_URL/metrics" \
  | grep -E '^geomx_(job_(submissions|successes|failures|restarts)_total|hosts|jobs)\b'

step "geomxctl web: the dashboard (trust $GEOMX_CA in the browser, or run with --keep and open it)"
geomxctl web

step "done"
if [ "$keep" = 1 ]; then
  echo "the lab is still up:   eval \"\$(target/debug/geomx-lab --name $lab env)\"; target/debug/geomxctl jobs"
  echo "the dashboard:         target/debug/geomxctl web --open"
  echo "tear it down with:     target/debug/geomx-lab --name $lab down"
fi
