//! `geomxctl jobs`, and what every job subcommand shares: the JSON form of jobs and nodes,
//! phase and state names, durations and times for people, and the exit code of a refused
//! call.
//!
//! Table columns of `jobs`: NAME, PHASE, NODES, RUNNING, RESTARTS, AGE (since submission),
//! REASON (its first line). `--output json` prints `{"jobs": [...]}` (see [`job_json`]).

use std::process::ExitCode;

use geomx_proto::v1::{Job, JobNode, JobPhase, ListJobsRequest};
use serde_json::json;
use tonic::{Code, Status};

pub use geomx_proto::json::{job_json, phase_name, pull_json, state_name};

use crate::client::{ConnectOptions, Remote, connect, runtime};
use crate::table::Table;
use crate::{Cli, Output};

/// Exit code of a refusal (invalid input, unknown job, a job the controller rejected).
pub const REFUSED: u8 = 2;
/// Exit code of a failure (a job that failed or was cancelled, an unreachable controller).
pub const FAILED: u8 = 1;

/// Arguments of `geomxctl jobs`.
#[derive(Debug, clap::Args)]
pub struct JobsArgs {}

/// Runs `geomxctl jobs`.
pub fn run(_args: &JobsArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let jobs = match remote.jobs().list_jobs(ListJobsRequest {}).await {
            Ok(r) => r.into_inner().jobs,
            Err(s) => return refused(&remote, "listing jobs", s, cli.output),
        };
        match cli.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "jobs": jobs.iter().map(job_json).collect::<Vec<_>>()
                }))?
            ),
            Output::Table => print!("{}", render(&jobs, now_ms())),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn render(jobs: &[Job], now: i64) -> String {
    if jobs.is_empty() {
        return "no jobs; geomxctl submit JOB.toml starts one\n".to_owned();
    }
    let mut t = Table::new([
        "NAME", "PHASE", "NODES", "RUNNING", "RESTARTS", "AGE", "REASON",
    ]);
    for j in jobs {
        t.row([
            j.name.clone(),
            phase_name(j.phase).to_owned(),
            j.node_count.to_string(),
            j.running_nodes.to_string(),
            format!("{}/{}", j.restarts, j.max_restarts),
            short_duration(age_ms(now, j.submitted_at_ms)),
            first_line(&j.reason, 80),
        ]);
    }
    t.render()
}

/// A failed call: a refusal prints its message (or a JSON error) and gives exit code 2;
/// anything else (unreachable, internal) is an error (exit code 1).
pub fn refused(
    remote: &Remote,
    what: &str,
    status: Status,
    output: Output,
) -> anyhow::Result<ExitCode> {
    if is_refusal(status.code()) {
        print_refusal(&status, output);
        return Ok(ExitCode::from(REFUSED));
    }
    Err(remote.explain(what, status))
}

/// Prints a refusal: `error: ...` on stderr, or `{"error", "code"}` on stdout for JSON.
pub fn print_refusal(status: &Status, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            json!({ "error": status.message(), "code": format!("{:?}", status.code()) })
        ),
        Output::Table => {
            let mut lines = status.message().lines();
            let denied = if status.code() == Code::PermissionDenied {
                "permission denied: "
            } else {
                ""
            };
            if let Some(first) = lines.next() {
                eprintln!("error: {denied}{first}");
            }
            for l in lines {
                eprintln!("  {l}");
            }
        }
    }
}

/// Codes that mean "the request was refused" rather than "something broke" (a token whose
/// role does not allow the call is refused too: exit 2).
pub fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::PermissionDenied
    )
}

/// True once the job has ended.
pub fn is_terminal(phase: i32) -> bool {
    matches!(
        JobPhase::try_from(phase),
        Ok(JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled)
    )
}

/// A node's state for tables: `running`, `exited(0)`, `failed(3)`; once its job ended, how
/// it ended (`exited 139 (killed by signal 11, SIGSEGV) while shutting down (not a
/// failure)`, `stopped by geomx when the job ended`).
pub fn node_state(n: &JobNode) -> String {
    if !n.end.is_empty() {
        return n.end.clone();
    }
    match &n.status {
        None => "-".to_owned(),
        Some(s) => match s.exit_code {
            Some(code) => format!("{}({code})", state_name(s.state)),
            None => state_name(s.state).to_owned(),
        },
    }
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Milliseconds from `since` to `now` (0 if `since` is unset or in the future).
pub fn age_ms(now: i64, since: i64) -> u64 {
    if since <= 0 {
        return 0;
    }
    u64::try_from(now.saturating_sub(since)).unwrap_or(0)
}

/// A duration for people: `0.4s`, `12.0s`, `3m07s`, `2h05m`, `3d4h`.
pub fn short_duration(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// A Unix-ms time as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
pub fn utc_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// Howard Hinnant's civil_from_days: (year, month, day) of days since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The first line of `s`, cut to `max` characters with `...`.
pub fn first_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() <= max {
        let more = s.lines().nth(1).is_some();
        if more {
            format!("{line} ...")
        } else {
            line.to_owned()
        }
    } else {
        let cut: String = line.chars().take(max.saturating_sub(3)).collect();
        format!("{cut}...")
    }
}

/// `-` for empty cells.
pub fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(short_duration(400), "0.4s");
        assert_eq!(short_duration(187_000), "3m07s");
        assert_eq!(short_duration(7_500_000), "2h05m");
        assert_eq!(utc_time(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc_time(1_714_564_800_123), "2024-05-01 12:00:00.123");
        assert_eq!(age_ms(10_000, 0), 0);
        assert_eq!(age_ms(10_000, 4_000), 6_000);
    }

    #[test]
    fn lines_and_names() {
        assert_eq!(first_line("a\nb", 10), "a ...");
        assert_eq!(first_line("abcdefghijkl", 8), "abcde...");
        assert_eq!(phase_name(JobPhase::Restarting as i32), "Restarting");
        assert_eq!(phase_name(99), "Unknown");
        assert!(is_terminal(JobPhase::Cancelled as i32));
        assert!(!is_terminal(JobPhase::Running as i32));
        assert!(is_refusal(Code::FailedPrecondition));
        assert!(!is_refusal(Code::Unavailable));
    }

    #[test]
    fn table_of_jobs() {
        let jobs = vec![Job {
            name: "hips".into(),
            phase: JobPhase::Failed as i32,
            reason: "node p-worker-1 (worker) on host b failed with exit code 3\nlast log lines:\n  boom".into(),
            node_count: 11,
            running_nodes: 0,
            restarts: 1,
            max_restarts: 3,
            submitted_at_ms: 1_000,
            ..Default::default()
        }];
        let out = render(&jobs, 188_000);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NAME  PHASE   NODES  RUNNING  RESTARTS  AGE    REASON"),
            "{out}"
        );
        assert!(
            lines[1].contains("Failed  11     0        1/3       3m07s  node p-worker-1"),
            "{out}"
        );
        assert!(lines[1].ends_with("exit code 3 ..."), "{out}");
        assert!(render(&[], 0).starts_with("no jobs"));
    }
}
