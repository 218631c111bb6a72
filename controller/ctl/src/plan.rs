//! `geomxctl plan`: validate a job file and print its nodes.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::Output;

/// Arguments of `geomxctl plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The job file (TOML).
    pub file: PathBuf,
}

/// Runs `geomxctl plan`.
pub fn run(_args: &PlanArgs, _output: Output) -> anyhow::Result<ExitCode> {
    anyhow::bail!("plan: not built yet")
}
