#!/usr/bin/env bash
# The whole geomx test suite, as CI runs it (`.ci/run`), on a fresh Debian bookworm machine
# as root: system packages, formatting, lints, unit tests and the integration tests that
# build multi-host labs out of network namespaces (they change nothing outside them).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build (the integration tests run the real binaries; with the tests, so that nextest builds nothing again)"
cargo build --workspace --all-targets --locked

echo "== the real MXNet image's root file system (cached in /var/cache/geomx)"
scripts/build-mxnet-image.sh

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked --no-fail-fast
fi
echo "== all tests passed"
