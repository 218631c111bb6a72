//! Any bytes as an existing daemon.json: the agent's merge (`apply`) and cleanup (`restore`)
//! never panic, keep every key they do not manage, and give the managed keys back as they
//! were (see `src/daemon_json_checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    geomx_fuzz::daemon_json_checks::check_daemon_json(data);
});
