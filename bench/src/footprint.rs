//! Footprints (issue 6, item 5): release binary sizes, the controller's idle RSS and CPU,
//! and (in a lab cluster) the agents' RSS and CPU, idle and while a job runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::bins;
use crate::controller::{ControllerProcess, Pki};
use crate::labcluster::{BenchCluster, HOSTS};
use crate::procfs::{self, PreciseCpuWindow};
use crate::report::{Line, note};

/// The binaries whose size is reported.
pub const BINARIES: [&str; 3] = ["geomx-controller", "geomx-agent", "geomxctl"];

/// Knobs of the footprint benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// How long the idle controller runs before its RSS is read; CPU (scheduler run time
    /// of its threads, ns resolution) is averaged over all of it but the first second.
    pub idle: Duration,
}

/// Runs every footprint measurement; prints one line each.
/// (The agent's figures need a lab: [`agent_footprint`].)
pub fn run(opts: &Options) -> anyhow::Result<()> {
    binary_sizes(&opts.bin_dir)?;
    controller_idle(opts)?;
    Ok(())
}

/// `footprint_binary=<name> size_bytes=<n> size_mib=<x>` for each of [`BINARIES`].
pub fn binary_sizes(dir: &Path) -> anyhow::Result<()> {
    if !bins::is_release(dir) {
        note(format!(
            "{} does not look like a release build: sizes are not the release figures",
            dir.display()
        ));
    }
    for name in BINARIES {
        let path = dir.join(name);
        match std::fs::metadata(&path) {
            Ok(m) => Line::new("footprint_binary", name)
                .kv("size_bytes", m.len())
                .f("size_mib", m.len() as f64 / (1024.0 * 1024.0), 2)
                .print(),
            Err(e) => {
                note(format!("{}: {e}", path.display()));
                Line::new("footprint_binary", name)
                    .kv("size_bytes", "missing")
                    .print();
            }
        }
    }
    Ok(())
}

/// The controller started with TLS, a fresh state directory and no agent; after
/// `opts.idle`, its RSS, peak RSS and CPU.
pub fn controller_idle(opts: &Options) -> anyhow::Result<()> {
    let bin = bins::binary(&opts.bin_dir, "geomx-controller")?;
    let work = tempfile::Builder::new()
        .prefix("geomx-bench-footprint-")
        .tempdir()
        .context("making a work directory")?;
    let pki = Pki::new(&work.path().join("pki"))?;
    let controller = ControllerProcess::start(
        &bin,
        &pki,
        &work.path().join("state"),
        &work.path().join("controller.log"),
        &[],
    )?;
    let pid = controller.pid();
    let settle = Duration::from_secs(1).min(opts.idle / 2);
    std::thread::sleep(settle);
    let cpu = PreciseCpuWindow::start(pid)?;
    std::thread::sleep(opts.idle.saturating_sub(settle));
    let cpu_pct = cpu.percent()?;
    let rss = procfs::rss_mib(pid)?;
    let hwm = procfs::peak_rss_mib(pid)?;
    let threads = procfs::status_value(pid, "Threads").unwrap_or(0.0);
    controller
        .stop(Duration::from_secs(10))
        .context("stopping the controller")?;
    Line::new("footprint_controller_idle_rss_mb", format!("{rss:.1}"))
        .f("controller_idle_peak_rss_mb", hwm, 1)
        .f("controller_idle_cpu_pct", cpu_pct, 3)
        .f("controller_threads", threads, 0)
        .f("idle_s", opts.idle.as_secs_f64(), 1)
        .print();
    Ok(())
}

/// The agent's footprint target: resident memory, MB (10^6 bytes).
pub const AGENT_RSS_TARGET_MB: f64 = 25.0;
/// The agent's footprint target: CPU when idle, % of one core.
pub const AGENT_IDLE_CPU_TARGET_PCT: f64 = 0.5;

/// RSS, peak RSS (MiB), threads and CPU (% of a core, scheduler run time of its threads)
/// of every process in `pids` over `window`, measured together.
fn measure(pids: &[u32], window: Duration) -> anyhow::Result<Vec<(f64, f64, f64, f64)>> {
    let windows: Vec<PreciseCpuWindow> = pids
        .iter()
        .map(|p| PreciseCpuWindow::start(*p))
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(window);
    pids.iter()
        .zip(&windows)
        .map(|(pid, w)| {
            Ok((
                procfs::rss_mib(*pid)?,
                procfs::peak_rss_mib(*pid)?,
                procfs::status_value(*pid, "Threads").unwrap_or(0.0),
                w.percent()?,
            ))
        })
        .collect()
}

/// The agents' RSS and CPU in a lab cluster (hosts a, b, c, each agent registered, its
/// network converged): first idle (no job) over `window`, after 1 s of settling, then
/// while the 12-node reference job runs (4 role containers and their sandboxes per host,
/// progress lines parsed, a report to the controller every heartbeat interval). The
/// figures are host a's agent's; `*_max_*` is the largest of the three agents'.
pub fn agent_footprint(bc: &BenchCluster, window: Duration) -> anyhow::Result<()> {
    let load_before = procfs::loadavg();
    let pids: Vec<u32> = HOSTS
        .iter()
        .map(|h| {
            bc.cluster()
                .agent(h)
                .pid()
                .with_context(|| format!("the agent of {h} does not run"))
        })
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = measure(&pids, window)?;
    // during a job
    let job = "bench-footprint";
    bc.submit(job, &crate::deploy::job_toml(job))?;
    let during = (|| -> anyhow::Result<_> {
        bc.wait_job(
            job,
            Duration::from_millis(200),
            Duration::from_secs(120),
            "phase Running",
            |j| j["phase"] == "Running",
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let containers = bc
            .cluster()
            .geomx_containers("a")
            .context("listing a's containers")?
            .len();
        Ok((measure(&pids, window)?, containers))
    })();
    let cleared = bc.cancel_and_clear(job, Duration::from_secs(60));
    let (during, containers) = during?;
    cleared?;
    let max = |v: &[(f64, f64, f64, f64)], f: fn(&(f64, f64, f64, f64)) -> f64| {
        v.iter().map(f).fold(f64::NAN, f64::max)
    };
    let (rss, hwm, threads, cpu) = idle[0];
    let (jrss, jhwm, _, jcpu) = during[0];
    Line::new("footprint_agent_idle_rss_mb", format!("{rss:.1}"))
        .f("agent_idle_peak_rss_mb", hwm, 1)
        .f("agent_idle_cpu_pct", cpu, 3)
        .f("agent_idle_cpu_max_pct", max(&idle, |m| m.3), 3)
        .f("agent_idle_rss_max_mb", max(&idle, |m| m.0), 1)
        .f("agent_job_rss_mb", jrss, 1)
        .f("agent_job_peak_rss_mb", jhwm, 1)
        .f("agent_job_cpu_pct", jcpu, 3)
        .f("agent_job_cpu_max_pct", max(&during, |m| m.3), 3)
        .f("agent_job_rss_max_mb", max(&during, |m| m.0), 1)
        .kv("agent_job_containers_on_a", containers)
        .f("agent_threads", threads, 0)
        .f("window_s", window.as_secs_f64(), 1)
        .f(
            "heartbeat_interval_s",
            bc.spec().heartbeat_interval.as_secs_f64(),
            1,
        )
        .f(
            "network_interval_s",
            bc.spec().network_interval.as_secs_f64(),
            1,
        )
        .f("loadavg_before", load_before, 1)
        .f("loadavg", procfs::loadavg(), 1)
        .print();
    // MiB → MB for the target
    let mb = |mib: f64| mib * 1.048_576;
    let peak = max(&idle, |m| m.1).max(max(&during, |m| m.1));
    Line::new(
        "footprint_agent_rss_25mb_met",
        mb(peak) <= AGENT_RSS_TARGET_MB,
    )
    .kv(
        "agent_idle_cpu_05pct_met",
        max(&idle, |m| m.3) <= AGENT_IDLE_CPU_TARGET_PCT,
    )
    .print();
    Ok(())
}

/// The agent line when no lab runs (`--skip-lab`, `GEOMX_SKIP_LAB=1`).
pub fn agent_skipped() {
    Line::new("footprint_agent_idle_rss_mb", "skipped").print();
}
