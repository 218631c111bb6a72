//! geomx job files: parsing, validation and compilation into GeoMX role nodes.
//!
//! A job file (`docs/job-file.md`) describes a GeoMX training job in a few lines; this crate
//! turns it into every process (node) the job needs, with the exact `DMLC_*` environment
//! ps-lite requires, and refuses every topology that would hang or fail. Pure: no I/O; the
//! caller reads the file.
//!
//! ```
//! let src = r#"
//! name = "demo"
//! mode = "hips"
//! image = "lizonghango00o1/geomx:cpu-only"
//! [central]
//! host = "a"
//! [[party]]
//! name = "p"
//! hosts = ["b"]
//! workers = 2
//! "#;
//! let spec = geomx_job::parse("demo.toml", src).expect("valid job");
//! let plan = geomx_job::compile(&spec);
//! assert_eq!(plan.nodes.len(), 8);
//! assert_eq!(plan.node("p-worker-1").and_then(|n| n.slice), Some(1));
//! ```
#![warn(missing_docs)]

mod compile;
mod error;
mod mounts;
mod parse;
mod plan;
mod spec;
mod validate;

pub use compile::{CENTRAL_SCHEDULER, GLOBAL_SCHEDULER, MASTER_WORKER, compile};
pub use error::{ErrorKind, JobError, JobErrors, MAX_REPORTED_PROBLEMS, UnresolvedAddress};
pub use mounts::{
    LOCAL_VOLUME_TYPES, REFUSED_BIND_SOURCES, REFUSED_TARGETS, bind_source_problem,
    expand as expand_placeholders, is_local_driver, local_volume_bind_device, parse_size,
    target_problem, volume_name_problem, volume_options_problem,
};
pub use parse::{TOP_LEVEL_KEYS, parse};
pub use plan::{
    CENTRAL_PARTY, Mount, Node, Plan, Policy, Progress, Resources, Role, address_placeholder,
};
pub use spec::{
    CentralSpec, CommandSpec, Cpus, DEFAULT_CENTRAL_SCHEDULER_PORT,
    DEFAULT_FIRST_PARTY_SCHEDULER_PORT, DEFAULT_GLOBAL_SCHEDULER_PORT, DEFAULT_INTERFACE,
    DEFAULT_MAX_RESTARTS_ON_FAILURE, DEFAULT_PIDS_LIMIT, DEFAULT_PROGRESS_REGEX,
    DEFAULT_PULL_TIMEOUT, DEFAULT_PULL_TIMEOUT_DURATION, DEFAULT_SCHEDULER_COMMAND,
    DEFAULT_STALL_TIMEOUT, DEFAULT_TEARDOWN_GRACE, DEFAULT_WORKER_COMMAND, EnvSpec, ImagePull,
    JobSpec, MOUNT_PLACEHOLDERS, Mode, MountSpec, MountType, Network, PROGRESS_GROUPS, PartySpec,
    PolicySpec, ProgressSpec, ROLE_CLASSES, ResourceLimits, ResourcesSpec, RestartPolicy,
    SLICE_OPTION, SLICE_PLACEHOLDER, limits,
};
pub use validate::{COMPUTED_VARIABLES, is_valid_env_name, is_valid_name, plan_bytes_estimate};

/// Reads, validates and compiles a job file in one step.
pub fn plan(file: &str, src: &str) -> Result<Plan, JobErrors> {
    parse(file, src).map(|spec| compile(&spec))
}

impl JobSpec {
    /// Validates a job built in code (one from [`parse`] already is). Problems carry the
    /// field they are about but no line and column; they name the file `<job>`.
    pub fn validate(&self) -> Result<(), JobErrors> {
        let problems = validate::problems(self);
        if problems.is_empty() {
            return Ok(());
        }
        Err(JobErrors(
            problems
                .into_iter()
                .map(|p| JobError {
                    file: "<job>".to_string(),
                    line: None,
                    col: None,
                    field: Some(p.field),
                    kind: ErrorKind::Invalid,
                    message: p.message,
                })
                .collect(),
        ))
    }
}

/// Compiles a `[progress].regex` with geomx's size limits.
pub fn compile_progress_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
}
