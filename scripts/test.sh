#!/usr/bin/env bash
# The whole geomx test suite, as CI runs it (`.ci/run`), on a fresh Debian bookworm machine
# as root: system packages, formatting, lints, unit tests and the integration tests that
# build multi-host labs out of network namespaces (they change nothing outside them).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# One build from scratch: incremental compilation would only add gigabytes of caches to target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The build, the labs' docker data and the root file systems need room; a full disk shows up
# later as a linker killed by SIGBUS or a dockerd that cannot start, so say so up front.
mkdir -p target
free_kib=$(df --output=avail -k target | tail -1 | tr -d ' ')
echo "== disk: $((free_kib / 1024 / 1024)) GiB free for target/ ($(df --output=target target | tail -1))"
if [ "$free_kib" -lt $((8 * 1024 * 1024)) ]; then
  echo "warning: less than 8 GiB free; the build (about 2.5 GiB), the root file systems and the labs need about 8 GiB" >&2
fi

# the root file systems (network-bound: debootstrap, pip) are built while cargo compiles
echo "== in the background: the real MXNet image's and the booted hosts' root file systems (cached in /var/cache/geomx)"
scripts/build-mxnet-image.sh > target/build-mxnet-image.log 2>&1 &
mxnet_pid=$!
scripts/build-host-rootfs.sh > target/build-host-rootfs.log 2>&1 &
hostfs_pid=$!

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build (the integration tests run the real binaries; with the tests, so that nextest builds nothing again)"
cargo build --workspace --all-targets --locked
echo "== target/ takes $(du -sh target | cut -f1), $(df -h --output=avail target | tail -1 | tr -d ' ') free"

echo "== the root file systems"
for job in "mxnet:$mxnet_pid:target/build-mxnet-image.log" "hosts:$hostfs_pid:target/build-host-rootfs.log"; do
  IFS=: read -r what pid log <<<"$job"
  if ! wait "$pid"; then
    echo "building the $what root file system failed:" >&2
    cat "$log" >&2
    exit 1
  fi
  cat "$log"
done

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked --no-fail-fast
fi
echo "== all tests passed"
