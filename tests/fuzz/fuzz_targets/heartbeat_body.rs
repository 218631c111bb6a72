//! Any bytes as the body of `POST /v1/heartbeat`: the agent's parse and validation
//! (`geomx_runtime::heartbeat::parse_report`) and its merge into a node's progress
//! (`ProgressTracker::report`, as `Runtime::record_heartbeat` calls it) never panic, and what
//! a node's progress holds stays bounded (see `src/heartbeat_checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    geomx_fuzz::heartbeat_checks::check_heartbeat_bodies(data);
});
