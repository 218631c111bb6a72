//! `geomxctl events JOB`: what happened to a job, oldest first.
//!
//! Columns: TIME (UTC), KIND, GEN (the attempt), NODE, HOST, MESSAGE (continuation lines,
//! e.g. a failed node's log tail, are indented below). `JOB#RUN` lists an earlier run of a
//! reused name. `--output json` prints `{"events": [...]}`.

pub use geomx_proto::json::event_json;
use std::process::ExitCode;

use geomx_proto::v1::{Event, JobEventsRequest};
use serde_json::json;

use crate::client::{ConnectOptions, connect, runtime};
use crate::jobs::{dash, refused, utc_time};
use crate::table::Table;
use crate::{Cli, Output};

/// Arguments of `geomxctl events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// The job (NAME, or NAME#RUN for an earlier run of the name).
    pub job: String,
}

/// Runs `geomxctl events`.
pub fn run(args: &EventsArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let events = match remote
            .jobs()
            .job_events(JobEventsRequest {
                name: args.job.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner().events,
            Err(s) => return refused(&remote, "listing events", s, cli.output),
        };
        match cli.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "events": events.iter().map(event_json).collect::<Vec<_>>()
                }))?
            ),
            Output::Table => print!("{}", render(&events)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Events as a table (continuation lines indented below their row).
pub fn render(events: &[Event]) -> String {
    if events.is_empty() {
        return "no events\n".to_owned();
    }
    let mut t = Table::new(["TIME (UTC)", "KIND", "GEN", "NODE", "HOST", "MESSAGE"]);
    let mut continuations: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let mut lines = e.message.lines();
        t.row([
            utc_time(e.at_ms),
            e.kind.clone(),
            e.generation.to_string(),
            dash(&e.node),
            dash(&e.host),
            lines.next().unwrap_or("").to_owned(),
        ]);
        let rest: Vec<String> = lines.map(str::to_owned).collect();
        if !rest.is_empty() {
            continuations.push((i, rest));
        }
    }
    // Multi-line messages (log tails): their further lines go under the row.
    let rendered = t.render();
    let mut out = String::new();
    for (row, line) in rendered.lines().enumerate() {
        out.push_str(line);
        out.push('\n');
        if row == 0 {
            continue;
        }
        if let Some((_, rest)) = continuations.iter().find(|(i, _)| *i == row - 1) {
            for l in rest {
                out.push_str("    ");
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_table_with_log_tail() {
        let events = vec![
            Event {
                at_ms: 1_714_564_800_123,
                job: "j".into(),
                kind: "Submitted".into(),
                message: "run 1".into(),
                ..Default::default()
            },
            Event {
                at_ms: 1_714_564_801_000,
                job: "j".into(),
                kind: "NodeFailed".into(),
                message: "node w failed with exit code 3\nlast log lines:\n  boom".into(),
                node: "w".into(),
                host: "b".into(),
                generation: 1,
            },
        ];
        let out = render(&events);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("TIME (UTC)"), "{out}");
        assert!(
            lines[1].starts_with("2024-05-01 12:00:00.123  Submitted   0    -     -     run 1"),
            "{out}"
        );
        assert!(
            lines[2].contains("NodeFailed  1    w     b     node w failed with exit code 3"),
            "{out}"
        );
        assert_eq!(lines[3], "    last log lines:");
        assert_eq!(lines[4], "      boom");
    }
}
