//! `geomxctl status JOB`: one job with every node.
//!
//! A header (phase, generation, restarts, nodes running, times, reason), then one row per
//! node: NAME, ROLE, PARTY, HOST, IP, STATE (`failed(3)` with the exit code), HEARTBEAT
//! (age of its agent's last report), EPOCH, ITER, ACC, IT/S (iterations per second over the
//! last minute). `JOB#RUN` shows an earlier run of a reused name. `--output json` prints the
//! job with its nodes. While a scheduler's rendezvous is incomplete, the header says whom
//! it waits for (`rendezvous: scheduler a-scheduler (host a): 2 of 3 registered, waiting
//! for: a-worker-1 (host b)`; JSON: `rendezvous`). The header names the image, the digest
//! every host runs when the controller pinned it, and each host's pull of it.

use std::process::ExitCode;

use geomx_proto::v1::{GetJobRequest, Job};

use crate::client::{ConnectOptions, connect, runtime};
use crate::jobs::{
    age_ms, dash, is_terminal, job_json, node_state, now_ms, phase_name, refused, short_duration,
};
use crate::table::Table;
use crate::{Cli, Output};

/// Arguments of `geomxctl status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The job (NAME, or NAME#RUN for an earlier run of the name).
    pub job: String,
}

/// Runs `geomxctl status`.
pub fn run(args: &StatusArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let job = match remote
            .jobs()
            .get_job(GetJobRequest {
                name: args.job.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return refused(&remote, "getting the job", s, cli.output),
        };
        match cli.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&job))?),
            Output::Table => print!("{}", render(&job, now_ms())),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The header lines of a job.
pub fn header(job: &Job, now: i64) -> String {
    let mut out = format!(
        "job {}: {} (mode {}, generation {}, restarts {}/{}), {}/{} nodes running\n",
        job.name,
        phase_name(job.phase),
        job.mode,
        job.generation,
        job.restarts,
        job.max_restarts,
        job.running_nodes,
        job.node_count
    );
    let mut times = vec![format!(
        "submitted {} ago{}",
        short_duration(age_ms(now, job.submitted_at_ms)),
        if job.submitted_by.is_empty() {
            String::new()
        } else {
            format!(" by {}", job.submitted_by)
        }
    )];
    if job.running_at_ms > 0 {
        times.push(format!(
            "running since {} ago",
            short_duration(age_ms(now, job.running_at_ms))
        ));
    }
    if job.finished_at_ms > 0 {
        times.push(format!(
            "ended {} ago{}",
            short_duration(age_ms(now, job.finished_at_ms)),
            if job.cancelled_by.is_empty() {
                String::new()
            } else {
                format!(" (cancelled by {})", job.cancelled_by)
            }
        ));
    }
    out.push_str(&times.join(", "));
    out.push('\n');
    if !job.image.is_empty() {
        out.push_str(&format!("image: {}", job.image));
        if !job.image_digest.is_empty() {
            out.push_str(&format!(", every host runs {}", job.image_digest));
        }
        out.push_str(&format!(" (image_pull {})\n", job.image_pull));
    }
    for p in &job.pulls {
        if let Some(pull) = &p.pull {
            out.push_str(&format!(
                "pull on {}: {}\n",
                p.host,
                crate::pulls::pull_text(pull)
            ));
        }
    }
    if is_terminal(job.phase) {
        out.push_str("the job's containers are removed; STATE says how each node ended\n");
    }
    for r in job.rendezvous.iter().filter(|r| !r.complete) {
        out.push_str(&format!("rendezvous: {}\n", r.summary));
    }
    if !job.reason.is_empty() {
        let mut lines = job.reason.lines();
        if let Some(first) = lines.next() {
            out.push_str(&format!("reason: {first}\n"));
        }
        for l in lines {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out
}

/// The node table of a job.
pub fn node_table(job: &Job) -> String {
    let mut t = Table::new([
        "NAME",
        "ROLE",
        "PARTY",
        "HOST",
        "IP",
        "STATE",
        "HEARTBEAT",
        "EPOCH",
        "ITER",
        "ACC",
        "IT/S",
    ]);
    for n in &job.nodes {
        let s = n.status.clone().unwrap_or_default();
        let p = s.progress.as_ref();
        t.row([
            n.name.clone(),
            n.role.clone(),
            n.party.clone(),
            n.host.clone(),
            dash(&s.ip),
            node_state(n),
            if n.heartbeat_age_ms == 0 {
                "-".to_owned()
            } else {
                format!("{} ago", short_duration(n.heartbeat_age_ms))
            },
            p.map_or_else(|| "-".to_owned(), |p| p.epoch.to_string()),
            p.map_or_else(|| "-".to_owned(), |p| p.iteration.to_string()),
            p.and_then(|p| p.accuracy)
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.4}")),
            if n.iterations_per_s > 0.0 {
                format!("{:.2}", n.iterations_per_s)
            } else {
                "-".to_owned()
            },
        ]);
    }
    t.render()
}

fn render(job: &Job, now: i64) -> String {
    format!("{}\n{}", header(job, now), node_table(job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_proto::v1::{ContainerState, JobNode, JobPhase, NodeStatus, Progress};

    #[test]
    fn status_table() {
        let job = Job {
            name: "hips".into(),
            mode: "hips".into(),
            phase: JobPhase::Failed as i32,
            reason: "node w (worker) on host b failed with exit code 3\nlast log lines:\n  boom"
                .into(),
            node_count: 2,
            running_nodes: 1,
            submitted_at_ms: 1_000,
            finished_at_ms: 61_000,
            nodes: vec![
                JobNode {
                    name: "w".into(),
                    role: "worker".into(),
                    party: "p".into(),
                    host: "b".into(),
                    status: Some(NodeStatus {
                        state: ContainerState::Failed as i32,
                        exit_code: Some(3),
                        ip: "172.17.2.5".into(),
                        progress: Some(Progress {
                            epoch: 1,
                            iteration: 17,
                            accuracy: Some(0.93125),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    heartbeat_age_ms: 400,
                    iterations_per_s: 2.5,
                    end: String::new(),
                },
                JobNode {
                    name: "s".into(),
                    role: "scheduler".into(),
                    party: "p".into(),
                    host: "b".into(),
                    status: Some(NodeStatus {
                        state: ContainerState::Stopped as i32,
                        ..Default::default()
                    }),
                    end: "stopped by geomx when the job ended".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let out = render(&job, 121_000);
        assert!(out.starts_with("job hips: Failed (mode hips, generation 0, restarts 0/0), 1/2 nodes running\nsubmitted 2m00s ago, ended 1m00s ago\nthe job's containers are removed; STATE says how each node ended\nreason: node w"), "{out}");
        assert!(out.contains("\n  last log lines:\n    boom\n"), "{out}");
        let row = out.lines().find(|l| l.starts_with("w ")).expect("row");
        assert!(
            row.contains("172.17.2.5  failed(3)  ")
                && row.contains("  0.4s ago   1      17    0.9313  2.50"),
            "{row}"
        );
        let row = out.lines().find(|l| l.starts_with("s ")).expect("row");
        assert!(
            row.contains("stopped by geomx when the job ended  -"),
            "never `running` beside an ended job: {row}"
        );
    }

    #[test]
    fn a_waiting_rendezvous_says_whom_it_waits_for() {
        use geomx_proto::v1::SchedulerRendezvous;
        let waiting =
            "scheduler a-scheduler (host a): 2 of 3 registered, waiting for: a-worker-1 (host b)";
        let job = Job {
            name: "hips".into(),
            phase: JobPhase::Running as i32,
            rendezvous: vec![
                SchedulerRendezvous {
                    scheduler: "a-scheduler".into(),
                    registered: 2,
                    expected: 3,
                    waiting: vec!["a-worker-1".into()],
                    summary: waiting.into(),
                    ..Default::default()
                },
                SchedulerRendezvous {
                    scheduler: "b-scheduler".into(),
                    complete: true,
                    summary:
                        "scheduler b-scheduler (host c): 3 of 3 registered, rendezvous complete"
                            .into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let out = header(&job, 0);
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("rendezvous"))
            .collect();
        assert_eq!(lines, [format!("rendezvous: {waiting}")], "{out}");
        let v = job_json(&job);
        assert_eq!(v["rendezvous"][0]["waiting"][0], "a-worker-1");
        assert_eq!(v["rendezvous"][1]["complete"], true);
    }
}
