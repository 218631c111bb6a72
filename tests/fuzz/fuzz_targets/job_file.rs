//! Any bytes as a job file: `geomx_job::parse` / `plan` never panic; a job that parses
//! compiles to a plan obeying every count rule (see `src/job_checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    geomx_fuzz::job_checks::check_job_file(data);
});
