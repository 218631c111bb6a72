//! Failure detection (issue 6, item 6), in the lab cluster of hosts a, b, c:
//!
//! * **node crash**: a small job (mode ps on hosts b and c: a scheduler, a server, two
//!   workers) runs; one worker's container is killed with `docker kill` in its host's
//!   dockerd. Figure: from the container's end (Docker's `State.FinishedAt` as the agent
//!   reported it in the node's `finished_at_ms`; the instant `docker kill` returned when it
//!   is missing) to the controller recording the job Failed (`finished_at_ms` of the job).
//!   Every process runs on this machine, so the clocks are one. The time at which the
//!   benchmark's polling (`geomxctl status -o json` every 50 ms) saw Failed is printed too.
//!   Target ≤ 1 s.
//! * **host loss**: host c's agent is killed (`kill -9`) and its underlay link cut; figure:
//!   from the cut to the controller reporting c `lost` (polling `geomxctl hosts -o json`,
//!   each poll a fresh geomxctl process, 40–80 ms apart: the figure is the answer time of the
//!   first poll that saw it, an upper bound). Target ≤ grace period + 1 s. Then the link
//!   is restored and the agent restarted, and the benchmark waits until c is ready again.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use crate::labcluster::{BenchCluster, int, now_ms, secs};
use crate::procfs;
use crate::report::{Line, median, note};

/// Node-crash detection target.
pub const CRASH_TARGET_S: f64 = 1.0;
/// Host-loss detection target beyond the grace period.
pub const LOSS_SLACK_S: f64 = 1.0;

/// Knobs of the detection benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Repetitions of each case.
    pub reps: usize,
}

/// A two-worker job on hosts b and c whose workers run until killed.
fn crash_job(name: &str) -> String {
    geomx_lab::jobfile::ps_job(
        name,
        &["b", "c"],
        2,
        "PSNODE_ITERATIONS = \"100000000\"",
        "restart = \"never\"",
    )
}

/// Runs both cases in `bc`; prints their lines.
pub fn run(bc: &BenchCluster, opts: &Options) -> anyhow::Result<()> {
    let load_before = procfs::loadavg();
    let mut crash = Vec::new();
    let mut crash_seen = Vec::new();
    for i in 1..=opts.reps {
        let (d, seen) = node_crash(bc, &format!("bench-crash-{i}"))
            .with_context(|| format!("node crash {i}"))?;
        note(format!(
            "detection: node crash {i}: Failed {d:.3}s after the container ended (polling saw it after {seen:.3}s)"
        ));
        crash.push(d);
        crash_seen.push(seen);
    }
    let grace = bc.spec().grace_period.as_secs_f64();
    let mut loss = Vec::new();
    for i in 1..=opts.reps {
        let d = host_loss(bc, "c").with_context(|| format!("host loss {i}"))?;
        note(format!("detection: host loss {i}: lost after {d:.3}s"));
        loss.push(d);
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    Line::new(
        "detection_node_crash_p50_s",
        format!("{:.3}", median(&crash)),
    )
    .f("node_crash_max_s", max(&crash), 3)
    .kv("node_crash_runs", list(&crash))
    .f("node_crash_observed_p50_s", median(&crash_seen), 3)
    .f("host_loss_p50_s", median(&loss), 3)
    .f("host_loss_max_s", max(&loss), 3)
    .f("host_loss_minus_grace_p50_s", median(&loss) - grace, 3)
    .kv("host_loss_runs", list(&loss))
    .f("grace_s", grace, 1)
    .f(
        "heartbeat_interval_s",
        bc.spec().heartbeat_interval.as_secs_f64(),
        1,
    )
    .kv("reps", opts.reps)
    .f("loadavg_before", load_before, 1)
    .f("loadavg", procfs::loadavg(), 1)
    .print();
    Line::new(
        "detection_node_crash_target_1s_met",
        max(&crash) <= CRASH_TARGET_S,
    )
    .kv(
        "host_loss_target_grace_plus_1s_met",
        max(&loss) <= grace + LOSS_SLACK_S,
    )
    .print();
    Ok(())
}

/// One node crash; returns (controller-recorded detection, polling-observed detection), s.
fn node_crash(bc: &BenchCluster, name: &str) -> anyhow::Result<(f64, f64)> {
    bc.submit(name, &crash_job(name))?;
    let result = (|| {
        let (job, _) = bc.wait_job(
            name,
            Duration::from_millis(100),
            Duration::from_secs(90),
            "phase Running",
            |j| j["phase"] == "Running",
        )?;
        // a worker on host c
        let victim = job["nodes"]
            .as_array()
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n["role"] == "worker" && n["host"] == "c")
                    .or_else(|| ns.iter().find(|n| n["role"] == "worker"))
            })
            .cloned()
            .context("the job has no worker")?;
        let node = victim["name"].as_str().unwrap_or_default().to_owned();
        let host = victim["host"].as_str().unwrap_or_default().to_owned();
        // let it run a moment, as a real crash would come mid-training
        std::thread::sleep(Duration::from_millis(500));
        let container = format!("geomx.{name}.{node}");
        let d = bc.host(&host)?.dockerd()?;
        let kill_start = Instant::now();
        d.docker(&["kill", &container])
            .with_context(|| format!("docker kill {container} on {host}"))?;
        let killed_ms = now_ms();
        let (failed, seen) = bc.wait_job(
            name,
            Duration::from_millis(50),
            Duration::from_secs(30),
            "phase Failed",
            |j| j["phase"] == "Failed",
        )?;
        let observed = seen.duration_since(kill_start).as_secs_f64();
        let failed_at = int(&failed, "finished_at_ms");
        ensure!(failed_at > 0, "job {name} Failed without finished_at_ms");
        let ended_at = failed["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node.as_str()))
            .map(|n| int(n, "finished_at_ms"))
            .filter(|t| *t > 0)
            .unwrap_or(killed_ms);
        note(format!(
            "detection: {name}: killed {node} on {host}; reason: {}",
            failed["reason"]
        ));
        Ok((secs(ended_at, failed_at), observed))
    })();
    let cleared = bc.wait_no_geomx_containers(Duration::from_secs(60));
    let r = result?;
    cleared.with_context(|| format!("containers of job {name} left behind"))?;
    Ok(r)
}

/// Kills `host`'s agent and cuts its link; returns seconds until the controller reports it
/// lost. Restores the host afterwards (link, agent, ready).
fn host_loss(bc: &BenchCluster, host: &str) -> anyhow::Result<f64> {
    let c = bc.cluster();
    c.agent(host).kill9().context("kill -9 of the agent")?;
    c.lab().cut_link(host).context("cutting the link")?;
    let cut = Instant::now();
    let result = (|| {
        loop {
            let h = bc.host_json(host)?;
            let seen = cut.elapsed();
            if h.is_some_and(|h| h["state"] == "lost") {
                return Ok(seen.as_secs_f64());
            }
            ensure!(
                seen < bc.spec().grace_period + Duration::from_secs(20),
                "{host} not lost after {:.1}s",
                seen.as_secs_f64()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    let restored = (|| {
        c.lab().restore_link(host)?;
        c.start_agent(host)?;
        anyhow::Ok(())
    })()
    .context("restoring the host");
    let r = result?;
    restored?;
    bc.wait_ready(&[host], Duration::from_secs(60))?;
    Ok(r)
}
