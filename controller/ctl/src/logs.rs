//! `geomxctl logs JOB NODE [-f] [--tail N] [--generation N]`: a node's output, fetched by
//! the controller from the agent of the node's host: the running container's, or, once the
//! job ended (or for an earlier generation of a restarted job), what the agent kept of it
//! when the container was removed.
//!
//! Standard output lines go to stdout, standard error lines to stderr. `-f` keeps streaming
//! until the container ends (or Ctrl-C). `--output json` prints one JSON object per line:
//! `{"stderr": bool, "line": "..."}`.

use std::io::Write;
use std::process::ExitCode;

use geomx_proto::v1::UserLogsRequest;
use serde_json::json;

use crate::client::{ConnectOptions, connect, runtime};
use crate::jobs::refused;
use crate::{Cli, Output};

/// Arguments of `geomxctl logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The job.
    pub job: String,
    /// The node, e.g. a-worker-0 (geomxctl status JOB lists them).
    pub node: String,
    /// Keep streaming new output until the container ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines of past output (0 for all).
    #[arg(long, default_value_t = 0)]
    pub tail: u32,
    /// The attempt of a restarted job (0 first; `geomxctl status` shows the current one).
    #[arg(long)]
    pub generation: Option<u32>,
}

/// Runs `geomxctl logs`.
pub fn run(args: &LogsArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let request = UserLogsRequest {
            job: args.job.clone(),
            node: args.node.clone(),
            follow: args.follow,
            tail: args.tail,
            generation: args.generation,
        };
        let mut stream = match remote.jobs().node_logs(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return refused(&remote, "fetching logs", s, cli.output),
        };
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        loop {
            let chunk = match stream.message().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(s) => return refused(&remote, "streaming logs", s, cli.output),
            };
            match cli.output {
                Output::Json => {
                    let mut out = stdout.lock();
                    for line in &chunk.lines {
                        writeln!(out, "{}", json!({ "stderr": chunk.stderr, "line": line }))?;
                    }
                    out.flush()?;
                }
                Output::Table if chunk.stderr => {
                    let mut err = stderr.lock();
                    for line in &chunk.lines {
                        writeln!(err, "{line}")?;
                    }
                }
                Output::Table => {
                    let mut out = stdout.lock();
                    for line in &chunk.lines {
                        writeln!(out, "{line}")?;
                    }
                    out.flush()?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
