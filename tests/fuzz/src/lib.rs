//! Checks shared by the geomx fuzz targets and their stable replay tests.
//!
//! Each module is a plain file that the crates' own `tests/fuzz_regressions.rs` include with
//! `#[path]`, so the inputs kept under `regressions/` are replayed by `cargo test` on stable.

pub mod daemon_json_checks;
pub mod heartbeat_checks;
pub mod job_checks;
pub mod job_gen;
pub mod report_checks;
pub mod report_gen;
