//! `geomxctl submit FILE [--detach]`: plan locally, submit, then follow the job to its end.
//!
//! 1. The file is planned locally first: an invalid file prints every problem (as
//!    `geomxctl plan` does) and exits 2 without contacting the controller.
//! 2. The controller admits or refuses the job (unknown or lost host, missing image, port in
//!    use, duplicate name): a refusal prints the reason and exits 2.
//! 3. `--detach` prints the job name and exits 0. Otherwise the job is followed (WatchJob)
//!    until it ends: on a terminal, a live view redrawn in place (while the job is Pulling
//!    its image, one progress bar per pulling host with bytes, rate and ETA; then every
//!    node's state until the job runs, then a progress bar per training worker, relative to
//!    the most advanced one, with epoch, iteration, accuracy and iterations/s); otherwise (a
//!    pipe, a log file) plain lines: phase changes, pull progress per host, node changes,
//!    and a progress line every 10 seconds. `--output json` prints every update as one
//!    JSON line (with the job's `image_digest` and `pulls`).
//! 4. Exit code: 0 when the job Succeeded, 1 when it Failed or was Cancelled (or the
//!    controller could not be reached again). Ctrl-C stops following, not the job.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use geomx_proto::v1::{GetJobRequest, Job, JobNode, JobPhase, SubmitJobRequest};
use serde_json::json;

use crate::client::{ConnectOptions, Remote, connect, runtime};
use crate::jobs::{
    FAILED, REFUSED, age_ms, first_line, is_refusal, is_terminal, job_json, node_state, now_ms,
    phase_name, print_refusal, refused, short_duration,
};
use crate::pulls::{PullBars, PullLines};
use crate::{Cli, Output};

/// How often the plain-lines view prints progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Longest the follower waits for the controller to come back.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// Rows of nodes or workers the live view shows at most.
const MAX_ROWS: usize = 40;
/// Width of a progress bar.
const BAR: usize = 24;

/// Arguments of `geomxctl submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The job file (TOML); `-` reads standard input.
    pub file: PathBuf,
    /// Print the job name once the job is accepted and return, without following it.
    #[arg(long, short)]
    pub detach: bool,
}

/// Runs `geomxctl submit`.
pub fn run(args: &SubmitArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let shown = args.file.display().to_string();
    let (file, src) = if shown == "-" {
        let mut src = String::new();
        std::io::stdin()
            .read_to_string(&mut src)
            .context("reading the job file from standard input")?;
        ("<stdin>".to_owned(), src)
    } else {
        match std::fs::read_to_string(&args.file) {
            Ok(src) => (shown, src),
            Err(e) => {
                eprintln!("error: cannot read job file {shown}: {e}");
                return Ok(ExitCode::from(REFUSED));
            }
        }
    };
    if let Err(errors) = geomx_job::plan(&file, &src) {
        match cli.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({ "file": file, "errors": errors.errors() }))?
            ),
            Output::Table => {
                for e in errors.errors() {
                    eprintln!("error: {e}");
                }
                let n = errors.len();
                eprintln!(
                    "{file}: {n} problem{} found, nothing submitted",
                    if n == 1 { "" } else { "s" }
                );
            }
        }
        return Ok(ExitCode::from(REFUSED));
    }
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        let job = match remote
            .jobs()
            .submit_job(SubmitJobRequest {
                job_toml: src,
                file_name: file,
            })
            .await
        {
            Ok(r) => r
                .into_inner()
                .job
                .context("the controller answered without the job")?,
            Err(s) => return refused(&remote, "submitting the job", s, cli.output),
        };
        if args.detach {
            match cli.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&job))?),
                Output::Table => println!("{}", job.name),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let view: Box<dyn View> = match cli.output {
            Output::Json => Box::new(JsonLines),
            Output::Table if std::io::stdout().is_terminal() => Box::new(Live::default()),
            Output::Table => Box::new(Lines::default()),
        };
        follow(&remote, job, view, cli.output).await
    })
}

/// Follows job `first.name` until it ends, reconnecting when the controller goes away.
async fn follow(
    remote: &Remote,
    first: Job,
    mut view: Box<dyn View>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let name = first.name.clone();
    view.update(&first)?;
    let mut down_since: Option<Instant> = None;
    loop {
        let opened = remote
            .jobs()
            .watch_job(GetJobRequest { name: name.clone() })
            .await;
        let problem = match opened {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                down_since = None;
                loop {
                    match stream.message().await {
                        Ok(Some(job)) => {
                            view.update(&job)?;
                            if is_terminal(job.phase) {
                                view.finish(&job)?;
                                return Ok(exit_code(&job));
                            }
                        }
                        Ok(None) => break None,
                        Err(s) => break Some(s),
                    }
                }
            }
            Err(s) => Some(s),
        };
        if let Some(s) = &problem
            && is_refusal(s.code())
        {
            print_refusal(s, output);
            return Ok(ExitCode::from(REFUSED));
        }
        let since = *down_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_FOR {
            let status = problem.unwrap_or_else(|| tonic::Status::unavailable("stream ended"));
            return Err(remote.explain("following the job", status));
        }
        view.note(&format!(
            "lost the watch of job {name} ({}); retrying",
            problem.map_or_else(|| "stream ended".to_owned(), |s| s.message().to_owned())
        ))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn exit_code(job: &Job) -> ExitCode {
    if job.phase == JobPhase::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILED)
    }
}

/// How updates are shown.
trait View {
    /// A new state of the job.
    fn update(&mut self, job: &Job) -> std::io::Result<()>;
    /// The job ended (after its last update).
    fn finish(&mut self, job: &Job) -> std::io::Result<()>;
    /// Something to tell besides the job (connection trouble).
    fn note(&mut self, text: &str) -> std::io::Result<()>;
}

/// `--output json`: every update as one JSON line.
struct JsonLines;

impl View for JsonLines {
    fn update(&mut self, job: &Job) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", job_json(job))?;
        out.flush()
    }

    fn finish(&mut self, _job: &Job) -> std::io::Result<()> {
        Ok(())
    }

    fn note(&mut self, text: &str) -> std::io::Result<()> {
        eprintln!("warning: {text}");
        Ok(())
    }
}

fn is_training(n: &JobNode) -> bool {
    n.role == "worker" || n.role == "master_worker"
}

/// Summary of the training workers' progress.
#[derive(Debug, Default, PartialEq)]
struct Overall {
    workers: usize,
    with_progress: usize,
    min_iteration: u64,
    max_iteration: u64,
    epoch: u64,
    best_accuracy: Option<f64>,
    iterations_per_s: f64,
}

fn overall(job: &Job) -> Overall {
    let mut o = Overall::default();
    let mut first = true;
    for n in job.nodes.iter().filter(|n| is_training(n)) {
        o.workers += 1;
        o.iterations_per_s += n.iterations_per_s;
        let Some(p) = n.status.as_ref().and_then(|s| s.progress.as_ref()) else {
            continue;
        };
        o.with_progress += 1;
        if first {
            o.min_iteration = p.iteration;
            first = false;
        }
        o.min_iteration = o.min_iteration.min(p.iteration);
        o.max_iteration = o.max_iteration.max(p.iteration);
        o.epoch = o.epoch.max(p.epoch);
        if let Some(a) = p.accuracy {
            o.best_accuracy = Some(o.best_accuracy.map_or(a, |b: f64| b.max(a)));
        }
    }
    o
}

fn overall_line(o: &Overall) -> String {
    if o.with_progress == 0 {
        return format!(
            "progress: {} training workers, no progress reported yet",
            o.workers
        );
    }
    format!(
        "progress: iteration {} (slowest {}), epoch {}, best accuracy {}, {:.2} it/s over {} workers",
        o.max_iteration,
        o.min_iteration,
        o.epoch,
        o.best_accuracy
            .map_or_else(|| "-".to_owned(), |a| format!("{a:.4}")),
        o.iterations_per_s,
        o.workers
    )
}

/// Plain lines for pipes and log files.
#[derive(Default)]
struct Lines {
    phase: Option<i32>,
    states: BTreeMap<String, String>,
    last_progress: Option<Instant>,
    last_overall: Option<Overall>,
    pulls: PullLines,
}

/// The job's pulls as (host, pull).
fn job_pulls(job: &Job) -> impl Iterator<Item = (&str, &geomx_proto::v1::ImagePull)> {
    job.pulls
        .iter()
        .filter_map(|p| Some((p.host.as_str(), p.pull.as_ref()?)))
}

impl View for Lines {
    fn update(&mut self, job: &Job) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.phase.is_none() {
            let hosts: std::collections::BTreeSet<&str> =
                job.nodes.iter().map(|n| n.host.as_str()).collect();
            writeln!(
                out,
                "job {} submitted: {} nodes on {}",
                job.name,
                job.node_count,
                hosts.into_iter().collect::<Vec<_>>().join(", ")
            )?;
            if !job.image_digest.is_empty() {
                writeln!(out, "image {} pinned to {}", job.image, job.image_digest)?;
            }
        }
        for line in self.pulls.lines(job_pulls(job)) {
            writeln!(out, "{line}")?;
        }
        for n in &job.nodes {
            let s = n.status.clone().unwrap_or_default();
            let shown = format!("{} {}", node_state(n), s.ip);
            if self.states.get(&n.name) != Some(&shown) {
                let ip = if s.ip.is_empty() {
                    String::new()
                } else {
                    format!(" ip {}", s.ip)
                };
                writeln!(
                    out,
                    "node {} ({} on {}): {}{ip}",
                    n.name,
                    n.role,
                    n.host,
                    node_state(n)
                )?;
                self.states.insert(n.name.clone(), shown);
            }
        }
        if self.phase != Some(job.phase) {
            self.phase = Some(job.phase);
            let reason = first_line(&job.reason, 200);
            if reason.is_empty() || is_terminal(job.phase) {
                writeln!(out, "phase: {}", phase_name(job.phase))?;
            } else {
                writeln!(out, "phase: {} ({reason})", phase_name(job.phase))?;
            }
        }
        let o = overall(job);
        let due = self
            .last_progress
            .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        if o.with_progress > 0 && due && self.last_overall.as_ref() != Some(&o) {
            writeln!(out, "{}", overall_line(&o))?;
            self.last_progress = Some(Instant::now());
            self.last_overall = Some(o);
        }
        out.flush()
    }

    fn finish(&mut self, job: &Job) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        let o = overall(job);
        if o.with_progress > 0 {
            writeln!(out, "{}", overall_line(&o))?;
        }
        write!(out, "{}", ending(job))?;
        out.flush()
    }

    fn note(&mut self, text: &str) -> std::io::Result<()> {
        eprintln!("warning: {text}");
        Ok(())
    }
}

/// The last words about an ended job.
fn ending(job: &Job) -> String {
    let mut out = format!(
        "job {} {} after {}",
        job.name,
        phase_name(job.phase),
        short_duration(age_ms(
            if job.finished_at_ms > 0 {
                job.finished_at_ms
            } else {
                now_ms()
            },
            job.submitted_at_ms
        ))
    );
    if job.restarts > 0 {
        out.push_str(&format!(
            " and {} restart{}",
            job.restarts,
            if job.restarts == 1 { "" } else { "s" }
        ));
    }
    let mut reason = job.reason.lines();
    match reason.next() {
        Some(first) => out.push_str(&format!(": {first}\n")),
        None => out.push('\n'),
    }
    for l in reason {
        out.push_str(&format!("  {l}\n"));
    }
    if job.phase != JobPhase::Succeeded as i32 {
        out.push_str(&format!(
            "see: geomxctl events {0}; geomxctl status {0}\n",
            job.name
        ));
    }
    out
}

/// The live view on a terminal: a block redrawn in place; while the job is Pulling, a
/// header line and one indicatif bar per pulling host instead.
#[derive(Default)]
struct Live {
    drawn: usize,
    started: Option<Instant>,
    bars: Option<PullBars>,
}

impl Live {
    fn draw(&mut self, block: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.drawn > 0 {
            // Up to the block's first line, then clear to the end of the screen.
            write!(out, "\x1b[{}A\r\x1b[J", self.drawn)?;
        }
        // Auto-wrap off while drawing: a line wider than the terminal is cut, not wrapped,
        // so the block keeps the number of lines it is moved up by next time.
        write!(out, "\x1b[?7l{block}\x1b[?7h")?;
        self.drawn = block.lines().count();
        out.flush()
    }
}

impl View for Live {
    fn update(&mut self, job: &Job) -> std::io::Result<()> {
        let started = *self.started.get_or_insert_with(Instant::now);
        if job.phase == JobPhase::Pulling as i32 {
            if self.bars.is_none() {
                // the block so far stays; the bars go below it
                self.drawn = 0;
                println!(
                    "job {}: Pulling {}{}",
                    job.name,
                    if job.image_digest.is_empty() {
                        &job.image
                    } else {
                        &job.image_digest
                    },
                    if job.image_digest.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", job.image)
                    }
                );
            }
            self.bars
                .get_or_insert_with(PullBars::new)
                .update(job_pulls(job));
            return Ok(());
        }
        if let Some(mut bars) = self.bars.take() {
            // the last state of every bar stays on the screen, the block goes below
            bars.update(job_pulls(job));
            drop(bars);
            self.drawn = 0;
        }
        let block = live_block(job, started.elapsed());
        self.draw(&block)
    }

    fn finish(&mut self, job: &Job) -> std::io::Result<()> {
        if let Some(mut bars) = self.bars.take() {
            bars.update(job_pulls(job));
        }
        let mut out = std::io::stdout().lock();
        write!(out, "{}", ending(job))?;
        out.flush()
    }

    fn note(&mut self, text: &str) -> std::io::Result<()> {
        // Printed above the block, which is drawn again below it.
        let mut out = std::io::stdout().lock();
        if self.drawn > 0 {
            write!(out, "\x1b[{}A\r\x1b[J", self.drawn)?;
            self.drawn = 0;
        }
        writeln!(out, "warning: {text}")?;
        out.flush()
    }
}

fn live_block(job: &Job, elapsed: Duration) -> String {
    let mut out = format!(
        "job {}: {} ({}/{} nodes running, generation {}, restarts {}/{}) {}\n",
        job.name,
        phase_name(job.phase),
        job.running_nodes,
        job.node_count,
        job.generation,
        job.restarts,
        job.max_restarts,
        short_duration(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    );
    if !job.reason.is_empty() {
        out.push_str(&format!("  {}\n", first_line(&job.reason, 160)));
    }
    let running = job.phase == JobPhase::Running as i32;
    if running {
        let o = overall(job);
        let top = o.max_iteration.max(1);
        let workers: Vec<&JobNode> = job.nodes.iter().filter(|n| is_training(n)).collect();
        let width = workers.iter().map(|n| n.name.len()).max().unwrap_or(0);
        for n in workers.iter().take(MAX_ROWS) {
            let p = n.status.as_ref().and_then(|s| s.progress.as_ref());
            let it = p.map_or(0, |p| p.iteration);
            let filled = usize::try_from(it.saturating_mul(BAR as u64) / top)
                .unwrap_or(BAR)
                .min(BAR);
            out.push_str(&format!(
                "  {:<width$}  [{}{}]  it {:>6}  epoch {:>3}  acc {}  {:>6.2} it/s  {}\n",
                n.name,
                "#".repeat(filled),
                "-".repeat(BAR - filled),
                it,
                p.map_or(0, |p| p.epoch),
                p.and_then(|p| p.accuracy)
                    .map_or_else(|| "  -   ".to_owned(), |a| format!("{a:.4}")),
                n.iterations_per_s,
                node_state(n)
            ));
        }
        if workers.len() > MAX_ROWS {
            out.push_str(&format!(
                "  ... and {} more workers\n",
                workers.len() - MAX_ROWS
            ));
        }
        out.push_str(&format!("  {}\n", overall_line(&o)));
    } else {
        let width = job.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
        for n in job.nodes.iter().take(MAX_ROWS) {
            let ip = n.status.as_ref().map_or("", |s| s.ip.as_str());
            out.push_str(&format!(
                "  {:<width$}  {:<16}  {:<6}  {:<15}  {}\n",
                n.name,
                n.role,
                n.host,
                if ip.is_empty() { "-" } else { ip },
                node_state(n)
            ));
        }
        if job.nodes.len() > MAX_ROWS {
            out.push_str(&format!(
                "  ... and {} more nodes\n",
                job.nodes.len() - MAX_ROWS
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_proto::v1::{ContainerState, NodeStatus, Progress};

    fn worker(name: &str, it: u64, acc: f64, ips: f64) -> JobNode {
        JobNode {
            name: name.into(),
            role: "worker".into(),
            party: "p".into(),
            host: "b".into(),
            status: Some(NodeStatus {
                state: ContainerState::Running as i32,
                ip: "172.17.2.5".into(),
                progress: Some(Progress {
                    epoch: it / 10,
                    iteration: it,
                    accuracy: Some(acc),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            heartbeat_age_ms: 100,
            iterations_per_s: ips,
            end: String::new(),
        }
    }

    fn job(phase: JobPhase) -> Job {
        Job {
            name: "j".into(),
            phase: phase as i32,
            node_count: 3,
            running_nodes: 3,
            nodes: vec![
                JobNode {
                    name: "p-scheduler".into(),
                    role: "scheduler".into(),
                    host: "b".into(),
                    status: Some(NodeStatus {
                        state: ContainerState::Running as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                worker("p-worker-0", 40, 0.91, 2.0),
                worker("p-worker-1", 20, 0.85, 1.0),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn overall_progress() {
        let o = overall(&job(JobPhase::Running));
        assert_eq!(o.workers, 2);
        assert_eq!((o.min_iteration, o.max_iteration, o.epoch), (20, 40, 4));
        assert_eq!(o.best_accuracy, Some(0.91));
        assert!((o.iterations_per_s - 3.0).abs() < 1e-9);
        assert_eq!(
            overall_line(&o),
            "progress: iteration 40 (slowest 20), epoch 4, best accuracy 0.9100, 3.00 it/s over 2 workers"
        );
    }

    #[test]
    fn live_block_shows_nodes_then_bars() {
        let starting = live_block(&job(JobPhase::Starting), Duration::from_secs(3));
        assert!(
            starting.starts_with("job j: Starting (3/3 nodes running"),
            "{starting}"
        );
        assert!(starting.contains("p-scheduler  scheduler"), "{starting}");
        let running = live_block(&job(JobPhase::Running), Duration::from_secs(3));
        let bar = running
            .lines()
            .find(|l| l.contains("p-worker-1"))
            .expect("bar");
        assert!(
            bar.contains("[############------------]  it     20"),
            "{bar}"
        );
        let full = running
            .lines()
            .find(|l| l.contains("p-worker-0"))
            .expect("bar");
        assert!(full.contains(&format!("[{}]", "#".repeat(BAR))), "{full}");
        assert!(running.contains("progress: iteration 40"));
    }

    /// Issue 17, item 7: the last screen of an ended job shows how each node ended (the
    /// controller's `end`), never `running`, whatever its host reported last.
    #[test]
    fn the_last_screen_of_an_ended_job_shows_no_node_running() {
        let mut j = job(JobPhase::Succeeded);
        j.running_nodes = 0;
        j.reason = "all 2 training workers exited 0".into();
        j.nodes[0].end = "stopped by geomx when the job ended".into();
        for w in &mut j.nodes[1..] {
            w.end = "exited 0".into();
        }
        let block = live_block(&j, Duration::from_secs(9));
        assert!(
            block.starts_with("job j: Succeeded (0/3 nodes running"),
            "{block}"
        );
        let rows: Vec<&str> = block.lines().skip(2).collect();
        assert_eq!(rows.len(), 3, "{block}");
        for (row, end) in rows.iter().zip([
            "stopped by geomx when the job ended",
            "exited 0",
            "exited 0",
        ]) {
            assert!(row.ends_with(end) && !row.contains("running"), "{row}");
        }
        let end = ending(&j);
        assert_eq!(
            end.lines().next().map(|l| l.contains("running")),
            Some(false),
            "{end}"
        );
    }

    #[test]
    fn endings() {
        let mut j = job(JobPhase::Failed);
        j.reason = "node w failed with exit code 3\nlast log lines:\n  boom".into();
        j.submitted_at_ms = 1_000;
        j.finished_at_ms = 11_000;
        j.restarts = 1;
        let text = ending(&j);
        assert!(text.starts_with("job j Failed after 10.0s and 1 restart: node w failed with exit code 3\n  last log lines:\n    boom\n"), "{text}");
        assert!(text.ends_with("see: geomxctl events j; geomxctl status j\n"));
        assert_eq!(exit_code(&j), ExitCode::from(FAILED));
        j.phase = JobPhase::Succeeded as i32;
        assert_eq!(exit_code(&j), ExitCode::SUCCESS);
    }
}
