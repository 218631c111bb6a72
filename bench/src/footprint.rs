//! Footprints (issue 6, item 5): release binary sizes, the controller's idle RSS and CPU,
//! and (not measured yet) the agent's idle and running RSS and CPU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::bins;
use crate::controller::{ControllerProcess, Pki};
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
pub fn run(opts: &Options) -> anyhow::Result<()> {
    binary_sizes(&opts.bin_dir)?;
    controller_idle(opts)?;
    agent_footprint(&opts.bin_dir);
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

/// The agent's RSS and CPU, idle and during a job. Not measured yet: the agent daemon
/// (`geomx-agent run`) is being finished elsewhere. When it lands, start it in a lab host
/// (`geomx_lab::Cluster` does) and measure it like [`controller_idle`] does (VmRSS, VmHWM,
/// utime+stime over a window), once idle and once while a job runs on its host. Targets:
/// ≤ 25 MB RSS, ≤ 0.5 % of a core idle.
pub fn agent_footprint(bin_dir: &Path) {
    let present = bin_dir.join("geomx-agent").is_file();
    Line::new("footprint_agent_idle_rss_mb", "not_measured_yet")
        .kv("agent_idle_cpu_pct", "not_measured_yet")
        .kv("agent_job_rss_mb", "not_measured_yet")
        .kv("agent_job_cpu_pct", "not_measured_yet")
        .kv("agent_binary_present", present)
        .print();
}
