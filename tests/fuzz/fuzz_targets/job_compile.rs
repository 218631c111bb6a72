//! Any bytes → a `JobSpec` built in code (`src/job_gen.rs`): `validate` and `compile` never
//! panic, `validate` agrees with `parse` of the job written as TOML, a valid job compiles to
//! a plan obeying every count rule (see `src/job_checks.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let spec = geomx_fuzz::job_gen::job_spec(data);
    geomx_fuzz::job_checks::check_job_spec(&spec);
});
