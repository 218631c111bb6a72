//! Errors of the lab harness.

use std::path::PathBuf;

/// Everything that can go wrong building, driving or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command could not be started at all (missing binary, ...).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on standard error (trimmed).
        stderr: String,
    },
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        seconds: f64,
    },
    /// A job ended in another phase than the one awaited (it can never reach it now).
    #[error(
        "job {job} ended {phase} while waiting for phase {wanted}: {reason} (last status: {status})"
    )]
    JobEnded {
        /// The job.
        job: String,
        /// The phase it ended in.
        phase: String,
        /// The phase awaited.
        wanted: String,
        /// Its reason.
        reason: String,
        /// Its last status (JSON).
        status: String,
    },
    /// A precondition of the lab is not met (not root, missing tool, bad name ...).
    #[error("{0}")]
    Setup(String),
    /// A kernel call failed.
    #[error("{what}: {source}")]
    Sys {
        /// The operation.
        what: String,
        /// The errno.
        source: nix::Error,
    },
}

impl LabError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the lab harness.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
