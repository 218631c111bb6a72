//! Any runtime status (built from the bytes) as the agent's report: the conversion to
//! `geomx.v1` messages, the encode/decode round trip, and the report's fitting under a
//! budget, which keeps every node's identity and progress counters and says what it left
//! out (see `src/report_checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    geomx_fuzz::report_checks::check_report(data);
});
