//! `geomx-bench`: geomx's benchmarks (see docs/performance.md).
//!
//! ```text
//! geomx-bench heartbeats [--nodes 1000,10000,50000] [--agents 100] ...
//! geomx-bench dataplane  [--reps 5] [--seconds 5] [--no-overlay]      (root: a lab)
//! geomx-bench footprint  [--idle 10s]
//! geomx-bench all [--quick]
//! ```
//!
//! Every benchmark prints its figures on standard output as `key=value` lines (easy to
//! grep), a human summary on standard error. Binaries are taken from `--bin-dir`, else
//! `$GEOMX_BIN_DIR`, else the directory of geomx-bench itself (use the release build:
//! `cargo build --release -p geomx-controller -p geomx-agent -p geomxctl -p geomx-bench`).
//! Exit code 0 when every benchmark ran (whether or not its target was met), 1 otherwise.

mod bins;
mod controller;
mod dataplane;
mod footprint;
mod heartbeats;
mod procfs;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

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
    /// Release binary sizes and the idle controller's memory and CPU.
    Footprint(FootprintArgs),
    /// Everything, in order: footprint, heartbeats, dataplane.
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
}

#[derive(Clone, Debug, Args)]
struct AllArgs {
    #[command(flatten)]
    common: Common,
    /// Skip the benchmarks that need a lab (root, dockerd); also GEOMX_SKIP_LAB=1.
    #[arg(long)]
    skip_lab: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Heartbeats(a) => heartbeats(&a),
        Cmd::Dataplane(a) => dataplane(&a),
        Cmd::Footprint(a) => footprint(&a),
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
    Ok(())
}

fn footprint(a: &FootprintArgs) -> anyhow::Result<()> {
    let q = a.common.quick;
    let dir = bins::bin_dir(a.common.bin_dir.as_deref())?;
    footprint::run(&footprint::Options {
        bin_dir: dir,
        idle: a
            .idle
            .unwrap_or(Duration::from_secs(if q { 2 } else { 10 })),
    })
}

fn all(a: &AllArgs) -> anyhow::Result<()> {
    let common = a.common.clone();
    let skip_lab = a.skip_lab || std::env::var("GEOMX_SKIP_LAB").is_ok_and(|v| v == "1");
    let mut failed = Vec::new();
    let mut step = |name: &str, r: anyhow::Result<()>| {
        if let Err(e) = r {
            eprintln!("geomx-bench: {name} failed: {e:#}");
            failed.push(name.to_owned());
        }
    };
    step(
        "footprint",
        footprint(&FootprintArgs {
            common: common.clone(),
            idle: None,
        }),
    );
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
    if skip_lab {
        note("dataplane skipped (--skip-lab or GEOMX_SKIP_LAB=1)");
        Line::new("dataplane_ratio", "skipped").print();
    } else {
        step(
            "dataplane",
            dataplane(&DataplaneArgs {
                common,
                reps: None,
                seconds: None,
                streams: 1,
                no_overlay: false,
            }),
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("failed: {}", failed.join(", "))
    }
}
