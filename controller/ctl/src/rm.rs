//! `geomxctl rm JOB`: removes an ended job: every run's records and events on the controller
//! and the output its hosts' agents kept. Refused (exit 2) for an active job: cancel it first.
//! `--output json` prints what was removed.

use std::process::ExitCode;

use geomx_proto::v1::RemoveJobRequest;
use serde_json::json;

use crate::client::{ConnectOptions, connect, runtime};
use crate::jobs::refused;
use crate::{Cli, Output};

/// Arguments of `geomxctl rm`.
#[derive(Debug, clap::Args)]
pub struct RmArgs {
    /// The job (every run of the name).
    pub job: String,
}

/// Runs `geomxctl rm`.
pub fn run(args: &RmArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let answer = match remote
            .jobs()
            .remove_job(RemoveJobRequest {
                name: args.job.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return refused(&remote, "removing the job", s, cli.output),
        };
        match cli.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "name": args.job,
                    "runs": answer.runs,
                    "hosts": answer.hosts,
                    "unreachable": answer.unreachable,
                }))?
            ),
            Output::Table => {
                println!(
                    "job {} removed: {} run{}, records and events; kept output deleted on {}",
                    args.job,
                    answer.runs,
                    if answer.runs == 1 { "" } else { "s" },
                    if answer.hosts.is_empty() {
                        "no host".to_owned()
                    } else {
                        answer.hosts.join(", ")
                    }
                );
                for u in &answer.unreachable {
                    eprintln!("not deleted (goes with the agent's retention): {u}");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
