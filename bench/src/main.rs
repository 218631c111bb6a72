//! `geomx-bench`: geomx's benchmarks (see docs/performance.md).
//!
//! ```text
//! geomx-bench heartbeats [--nodes 1000,10000,50000] [--agents 100] ...
//! geomx-bench dataplane  [--reps 5] [--seconds 5] [--no-overlay]      (root: a lab)
//! geomx-bench footprint  [--idle 10s] [--agent-window 10s] [--skip-lab]
//! geomx-bench deploy      [--runs 5] [--setting flat|geo|both]     (root: a lab)
//! geomx-bench convergence [--cycles 5]                             (root: a lab)
//! geomx-bench detection   [--reps 3]                               (root: a lab)
//! geomx-bench pull        [--runs 1]                               (root: a lab)
//! geomx-bench all [--quick] [--skip-lab]
//! ```
//!
//! Every benchmark prints its figures on standard output as `key=value` lines (easy to
//! grep), a human summary on standard error. Binaries are taken from `--bin-dir`, else
//! `$GEOMX_BIN_DIR`, else the directory of geomx-bench itself (use the release build:
//! `cargo build --release -p geomx-controller -p geomx-agent -p geomxctl -p geomx-bench`).
//! Exit code 0 when every benchmark ran (whether or not its target was met), 1 otherwise.

mod bins;
mod controller;
mod convergence;
mod dataplane;
mod deploy;
mod detection;
mod dockerfwd;
mod footprint;
mod heartbeats;
mod labcluster;
mod procfs;
mod pull;
mod report;
mod wan;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::labcluster::BenchCluster;
use crate::report::{Line, note};

#[derive(Debug, Parser)]
#[command(
    name = "geomx-bench",
    version,
    about = "geomx's benchmarks, each against a baseline measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Controller heartbeat capacity: fake agents and real jobs against a real controller.
    Heartbeats(HeartbeatArgs),
    /// Container-to-container throughput across lab hosts vs host-to-host (needs root).
    Dataplane(DataplaneArgs),
    /// Release binary sizes, the idle controller's and the agents' memory and CPU.
    Footprint(FootprintArgs),
    /// Submit → all 12 nodes of the HiPS reference job running, vs plain `docker run -d`.
    Deploy(DeployArgs),
    /// A fourth host joins / is lost: until every other host has / withdrew its route.
    Convergence(ConvergenceArgs),
    /// A node crash → job Failed; an agent killed and cut off → host lost.
    Detection(DetectionArgs),
    /// The MXNet image from the lab registry to 3 hosts over shaped WAN links: `geomxctl
    /// pull` vs parallel `docker pull`.
    Pull(PullArgs),
    /// Everything: footprint, heartbeats, dataplane, then in one lab cluster deploy,
    /// detection, convergence.
    All(AllArgs),
}

#[derive(Clone, Debug, Args)]
struct Common {
    /// Directory of the geomx binaries [default: $GEOMX_BIN_DIR, else geomx-bench's own].
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Reduced sizes and durations (a smoke run).
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Clone, Debug, Args)]
struct HeartbeatArgs {
    #[command(flatten)]
    common: Common,
    /// Node counts, each against a fresh controller [default: 1000,10000,50000; quick: 2000].
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Fake agents (hosts) [default: 100; quick: 20].
    #[arg(long)]
    agents: Option<usize>,
    /// Report interval of the paced phase (the controller's default heartbeat interval).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    interval: Duration,
    /// Unrecorded load before each window [default: 2s; quick: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Window of each baseline phase (health, nojobs) [default: 8s; quick: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    baseline: Option<Duration>,
    /// Window of the paced phase [default: 40s; quick: 4s].
    #[arg(long, value_parser = humantime::parse_duration)]
    paced: Option<Duration>,
    /// Window of the saturated phase [default: 20s; quick: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    saturated: Option<Duration>,
    /// Keep the work directory (controller logs and state).
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Debug, Args)]
struct PullArgs {
    #[command(flatten)]
    common: Common,
    /// Runs of geomx and of docker each, alternating which goes first [default: 1].
    #[arg(long)]
    runs: Option<usize>,
}

#[derive(Clone, Debug, Args)]
struct DataplaneArgs {
    #[command(flatten)]
    common: Common,
    /// Repetitions of every path [default: 7; quick: 2].
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per iperf3 run, after 1 s omitted [default: 4; quick: 2].
    #[arg(long)]
    seconds: Option<u32>,
    /// Parallel TCP streams per run (iperf3 -P).
    #[arg(long, default_value_t = 1)]
    streams: u32,
    /// Do not try Docker swarm's overlay.
    #[arg(long)]
    no_overlay: bool,
}

#[derive(Clone, Debug, Args)]
struct FootprintArgs {
    #[command(flatten)]
    common: Common,
    /// How long the controller idles before it is measured [default: 10s; quick: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Window over which each agent is measured, idle and during a job [default: 10s;
    /// quick: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    agent_window: Option<Duration>,
    /// Skip the agent's figures (they need a lab: root, dockerd); also GEOMX_SKIP_LAB=1.
    #[arg(long)]
    skip_lab: bool,
}

#[derive(Clone, Debug, Args)]
struct DeployArgs {
    #[command(flatten)]
    common: Common,
    /// Recorded runs of geomx and of the baseline each [default: 5; quick: 2].
    #[arg(long)]
    runs: Option<usize>,
    /// The seed lab's LAN (flat), three data centers 40 ms apart (geo), or both.
    #[arg(long, value_enum, default_value_t = DeploySetting::Both)]
    setting: DeploySetting,
}

/// Where `deploy` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DeploySetting {
    Flat,
    Geo,
    Both,
}

#[derive(Clone, Debug, Args)]
struct ConvergenceArgs {
    #[command(flatten)]
    common: Common,
    /// Join / loss / leave cycles of the fourth host [default: 5; quick: 2].
    #[arg(long)]
    cycles: Option<usize>,
}

#[derive(Clone, Debug, Args)]
struct DetectionArgs {
    #[command(flatten)]
    common: Common,
    /// Repetitions of the node crash and of the host loss [default: 3; quick: 1].
    #[arg(long)]
    reps: Option<usize>,
}

#[derive(Clone, Debug, Args)]
struct AllArgs {
    #[command(flatten)]
    common: Common,
    /// Skip the benchmarks that need a lab (root, dockerd); also GEOMX_SKIP_LAB=1.
    #[arg(long)]
    skip_lab: bool,
    /// Only these parts [default: all]: footprint, heartbeats, dataplane, cluster (deploy,
    /// detection, convergence in one lab cluster), geo (deploy across data centers).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Part>,
}

/// The parts of `geomx-bench all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Footprint,
    Heartbeats,
    Dataplane,
    Cluster,
    Geo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Heartbeats(a) => heartbeats(&a),
        Cmd::Dataplane(a) => dataplane(&a),
        Cmd::Footprint(a) => footprint(&a),
        Cmd::Deploy(a) => deploy_cmd(&a),
        Cmd::Convergence(a) => in_cluster(&a.common, |bc| convergence(bc, &a)),
        Cmd::Detection(a) => in_cluster(&a.common, |bc| detection(bc, &a)),
        Cmd::Pull(a) => pull_cmd(&a),
        Cmd::All(a) => all(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("geomx-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn warn_if_debug(dir: &std::path::Path) {
    if !bins::is_release(dir) {
        note(format!(
            "binaries from {}: not a release build, figures are not comparable to docs/performance.md",
            dir.display()
        ));
    }
}

fn heartbeats(a: &HeartbeatArgs) -> anyhow::Result<()> {
    let q = a.common.quick;
    let dir = bins::bin_dir(a.common.bin_dir.as_deref())?;
    warn_if_debug(&dir);
    let pick = |v: Option<Duration>, full: u64, quick: u64| {
        v.unwrap_or(Duration::from_secs(if q { quick } else { full }))
    };
    let opts = heartbeats::Options {
        sizes: if !a.nodes.is_empty() {
            a.nodes.clone()
        } else if q {
            vec![2000]
        } else {
            vec![1000, 10_000, 50_000]
        },
        agents: a.agents.unwrap_or(if q { 20 } else { 100 }),
        interval: a.interval,
        warmup: pick(a.warmup, 2, 1),
        baseline: pick(a.baseline, 8, 3),
        paced: pick(a.paced, 40, 4),
        saturated: pick(a.saturated, 20, 3),
        ramp_timeout: Duration::from_secs(300),
        controller_bin: bins::binary(&dir, "geomx-controller")?,
        keep: a.keep,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("geomx-bench")
        .build()
        .context("starting the async runtime")?;
    let results = runtime.block_on(heartbeats::run(&opts))?;
    for r in &results {
        let mut line = Line::new("heartbeat_target_nodes", r.nodes)
            .kv("target_50k_per_s_p99_under_50ms_met", r.target_met())
            .kv(
                "capacity_at_least_50k_per_s",
                r.saturated.node_rate() >= heartbeats::TARGET_RATE && r.saturated.errors == 0,
            );
        if r.nodes == 10_000 {
            line = line.kv("rss_target_200mb_met", r.peak_rss <= 200.0);
        }
        line.print();
    }
    Ok(())
}

fn dataplane(a: &DataplaneArgs) -> anyhow::Result<()> {
    let q = a.common.quick;
    let dir = bins::bin_dir(a.common.bin_dir.as_deref())?;
    let opts = dataplane::Options {
        reps: a.reps.unwrap_or(if q { 2 } else { 7 }).max(1),
        seconds: a.seconds.unwrap_or(if q { 2 } else { 4 }).max(1),
        streams: a.streams.max(1),
        overlay: !a.no_overlay,
        agent_bin: bins::binary(&dir, "geomx-agent")?,
    };
    let r = dataplane::run(&opts)?;
    Line::new("dataplane_target_ratio_095_met", r.ratio() >= 0.95).print();
    let w = wan::run(&wan::Options {
        reps: a.reps.unwrap_or(if q { 1 } else { 5 }).max(1),
        seconds: opts.seconds,
        bins: geomx_lab::Binaries::in_dir(&dir)?,
    })?;
    Line::new("dataplane_wan_target_ratio_095_met", w.wan_ratio() >= 0.95).print();
    Ok(())
}

fn pull_cmd(a: &PullArgs) -> anyhow::Result<()> {
    let dir = bins::bin_dir(a.common.bin_dir.as_deref())?;
    warn_if_debug(&dir);
    let r = pull::run(&pull::Options {
        runs: a.runs.unwrap_or(1).max(1),
        bins: geomx_lab::Binaries::in_dir(&dir)?,
    })?;
    if let Some(r) = r {
        pull::report(&r);
    }
    Ok(())
}

fn skip_lab_env() -> bool {
    std::env::var("GEOMX_SKIP_LAB").is_ok_and(|v| v == "1")
}

fn agent_window(common: &Common, flag: Option<Duration>) -> Duration {
    flag.unwrap_or(Duration::from_secs(if common.quick { 3 } else { 10 }))
}

fn footprint(a: &FootprintArgs) -> anyhow::Result<()> {
    let q = a.common.quick;
    let dir = bins::bin_dir(a.common.bin_dir.as_deref())?;
    footprint::run(&footprint::Options {
        bin_dir: dir,
        idle: a
            .idle
            .unwrap_or(Duration::from_secs(if q { 2 } else { 10 })),
    })?;
    if a.skip_lab || skip_lab_env() {
        note("agent footprint skipped (--skip-lab or GEOMX_SKIP_LAB=1)");
        footprint::agent_skipped();
        return Ok(());
    }
    let window = agent_window(&a.common, a.agent_window);
    let dir = bins::bin_dir(a.common.bin_dir.as_deref())?;
    // the agents' figures with a real deployment's timing, not the lab tests' faster one
    let bc = BenchCluster::up_production_timing(&dir)?;
    let r = footprint::agent_footprint(&bc, window);
    let down = bc.down(r.is_err());
    r?;
    down
}

/// Starts a lab cluster with the binaries of `common`, runs `f` in it, tears it down (also
/// when `f` fails, after printing the end of every log).
fn in_cluster(
    common: &Common,
    f: impl FnOnce(&mut BenchCluster) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = bins::bin_dir(common.bin_dir.as_deref())?;
    warn_if_debug(&dir);
    let mut bc = BenchCluster::up(&dir)?;
    let r = f(&mut bc);
    let down = bc.down(r.is_err());
    r?;
    down
}

fn deploy_runs(a: &DeployArgs) -> usize {
    a.runs.unwrap_or(if a.common.quick { 2 } else { 5 }).max(1)
}

fn deploy(bc: &mut BenchCluster, a: &DeployArgs) -> anyhow::Result<()> {
    deploy::run(
        bc,
        &deploy::Options {
            runs: deploy_runs(a),
            setting: deploy::Setting::Flat,
        },
    )
}

/// The deploy benchmark across three data centers, in a geo lab of its own.
fn deploy_geo(a: &DeployArgs) -> anyhow::Result<()> {
    let dir = bins::bin_dir(a.common.bin_dir.as_deref())?;
    warn_if_debug(&dir);
    let bc = BenchCluster::up_geo(&dir, deploy::geo_topology()?)?;
    let r = deploy::run(
        &bc,
        &deploy::Options {
            runs: deploy_runs(a),
            setting: deploy::Setting::Geo,
        },
    );
    let down = bc.down(r.is_err());
    r?;
    down
}

fn deploy_cmd(a: &DeployArgs) -> anyhow::Result<()> {
    if a.setting != DeploySetting::Geo {
        in_cluster(&a.common, |bc| deploy(bc, a))?;
    }
    if a.setting != DeploySetting::Flat {
        deploy_geo(a)?;
    }
    Ok(())
}

fn convergence(bc: &mut BenchCluster, a: &ConvergenceArgs) -> anyhow::Result<()> {
    let cycles = a
        .cycles
        .unwrap_or(if a.common.quick { 2 } else { 5 })
        .max(1);
    convergence::run(bc, &convergence::Options { cycles })
}

fn detection(bc: &mut BenchCluster, a: &DetectionArgs) -> anyhow::Result<()> {
    let reps = a.reps.unwrap_or(if a.common.quick { 1 } else { 3 }).max(1);
    detection::run(bc, &detection::Options { reps })
}

fn all(a: &AllArgs) -> anyhow::Result<()> {
    let common = a.common.clone();
    let skip_lab = a.skip_lab || skip_lab_env();
    let part = |p: Part| a.only.is_empty() || a.only.contains(&p);
    let mut failed = Vec::new();
    let mut step = |name: &str, r: anyhow::Result<()>| {
        if let Err(e) = r {
            eprintln!("geomx-bench: {name} failed: {e:#}");
            failed.push(name.to_owned());
        }
    };
    if part(Part::Footprint) {
        step(
            "footprint",
            footprint(&FootprintArgs {
                common: common.clone(),
                idle: None,
                agent_window: None,
                skip_lab,
            }),
        );
    }
    if part(Part::Heartbeats) {
        step(
            "heartbeats",
            heartbeats(&HeartbeatArgs {
                common: common.clone(),
                nodes: Vec::new(),
                agents: None,
                interval: Duration::from_secs(1),
                warmup: None,
                baseline: None,
                paced: None,
                saturated: None,
                keep: false,
            }),
        );
    }
    if skip_lab {
        note("dataplane and the lab cluster benchmarks skipped (--skip-lab or GEOMX_SKIP_LAB=1)");
        if part(Part::Dataplane) {
            Line::new("dataplane_ratio", "skipped").print();
        }
        if part(Part::Cluster) {
            Line::new("deploy_ratio", "skipped").print();
            Line::new("convergence_join_p50_s", "skipped").print();
            Line::new("detection_node_crash_p50_s", "skipped").print();
        }
        if part(Part::Geo) {
            Line::new("deploy_geo_ratio", "skipped").print();
        }
    } else {
        if part(Part::Dataplane) {
            step(
                "dataplane",
                dataplane(&DataplaneArgs {
                    common: common.clone(),
                    reps: None,
                    seconds: None,
                    streams: 1,
                    no_overlay: false,
                }),
            );
        }
        if part(Part::Cluster) {
            // one cluster for deploy, detection and convergence (which adds a host, so it goes
            // last); a failing benchmark does not stop the next
            let mut inner: Vec<(String, anyhow::Error)> = Vec::new();
            let r = in_cluster(&common, |bc| {
                let mut run = |name: &str, r: anyhow::Result<()>| {
                    if let Err(e) = r {
                        inner.push((name.to_owned(), e));
                    }
                };
                run(
                    "deploy",
                    deploy(
                        bc,
                        &DeployArgs {
                            common: common.clone(),
                            runs: None,
                            setting: DeploySetting::Flat,
                        },
                    ),
                );
                run(
                    "detection",
                    detection(
                        bc,
                        &DetectionArgs {
                            common: common.clone(),
                            reps: None,
                        },
                    ),
                );
                run(
                    "convergence",
                    convergence(
                        bc,
                        &ConvergenceArgs {
                            common: common.clone(),
                            cycles: None,
                        },
                    ),
                );
                if inner.is_empty() {
                    Ok(())
                } else {
                    anyhow::bail!("{} failed", inner.len())
                }
            });
            for (name, e) in inner.drain(..) {
                step(&name, Err(e));
            }
            if let Err(e) = r {
                // the cluster itself (up or down) failed, or the steps above did
                step("lab cluster", Err(e));
            }
        }
        if part(Part::Geo) {
            step(
                "deploy across data centers",
                deploy_geo(&DeployArgs {
                    common: common.clone(),
                    runs: None,
                    setting: DeploySetting::Geo,
                }),
            );
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("failed: {}", failed.join(", "))
    }
}
