#!/usr/bin/env bash
# The whole geomx test suite, as CI runs it (`.ci/run`), on a fresh Debian bookworm machine
# as root: system packages, formatting, lints, unit tests and the integration tests that
# build multi-host labs out of network namespaces (they change nothing outside them).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# the root file systems (network-bound: debootstrap, pip) are built while cargo compiles
mkdir -p target
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
