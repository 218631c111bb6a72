#!/usr/bin/env bash
# Runs the geomx fuzz targets (see tests/fuzz/README.md).
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 600: the "10-minute run without a crash"); TARGETs default to
# all of job_file, job_compile, daemon_json, heartbeat_body and report_convert, run one
# after the other. Installs cargo-fuzz from crates.io when it is missing. cargo-fuzz needs
# nightly features: on the stable toolchain they are enabled with RUSTC_BOOTSTRAP=1 (only
# for these builds).
#
# The working corpus grows in tests/fuzz/corpus/<target>/ (not committed); the committed
# seeds and regressions in tests/fuzz/regressions/<target>/ are read as a second corpus.
# A crash is saved under tests/fuzz/artifacts/<target>/; minimize it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz tmin --fuzz-dir tests/fuzz -O <target> <artifact>
# then fix the bug and copy the minimized input to regressions/<target>/ (cargo test
# replays that directory on stable). Logs: tests/fuzz/logs/<target>.log. Exits non-zero when
# any target crashed.
set -uo pipefail

secs="${1:-600}"
if [[ $# -gt 0 ]]; then shift; fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(job_file job_compile daemon_json heartbeat_body report_convert)
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz (crates.io)" >&2
    cargo install cargo-fuzz --locked || exit 1
fi

cd "$root" || exit 1
cargo fuzz build --fuzz-dir tests/fuzz -O || exit 1

status=0
mkdir -p "$here/logs"
for t in "${targets[@]}"; do
    mkdir -p "$here/corpus/$t" "$here/artifacts/$t"
    args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1)
    if [[ -f "$here/dicts/$t.dict" ]]; then
        args+=(-dict="$here/dicts/$t.dict")
    fi
    log="$here/logs/$t.log"
    echo "run.sh: $t for ${secs}s (log: $log)" >&2
    cargo fuzz run --fuzz-dir tests/fuzz -O "$t" \
        "$here/corpus/$t" "$here/regressions/$t" -- "${args[@]}" >"$log" 2>&1
    rc=$?
    # The last status line (#N ... cov: C ft: F corp: N/S exec/s: E) and libFuzzer's totals.
    last="$(grep -E '^#[0-9]+' "$log" | tail -n 1)"
    execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')"
    echo "fuzz_target=$t seconds=$secs exit=$rc executions=${execs:-?} last_status=\"$last\""
    if [[ $rc -ne 0 ]]; then
        status=1
        echo "run.sh: $t FAILED; artifacts:" >&2
        ls -1 "$here/artifacts/$t" >&2
        grep -E "panicked|ERROR: libFuzzer" "$log" | head -n 5 >&2
    fi
done
exit $status
