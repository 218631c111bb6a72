//! `geomxctl cancel JOB`: stops every container of the job on every host; the job ends
//! Cancelled. Cancelling an ended job changes nothing (and says so). `--output json` prints
//! the job.

use std::process::ExitCode;

use geomx_proto::v1::{CancelJobRequest, JobPhase};

use crate::client::{ConnectOptions, connect, runtime};
use crate::jobs::{job_json, phase_name, refused};
use crate::{Cli, Output};

/// Arguments of `geomxctl cancel`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The job.
    pub job: String,
}

/// Runs `geomxctl cancel`.
pub fn run(args: &CancelArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let job = match remote
            .jobs()
            .cancel_job(CancelJobRequest {
                name: args.job.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return refused(&remote, "cancelling the job", s, cli.output),
        };
        match cli.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&job))?),
            Output::Table if job.phase == JobPhase::Cancelled as i32 => println!(
                "job {} cancelled; its containers are being removed from every host",
                job.name
            ),
            Output::Table => println!(
                "job {} had already ended: {}",
                job.name,
                phase_name(job.phase)
            ),
        }
        Ok(ExitCode::SUCCESS)
    })
}
