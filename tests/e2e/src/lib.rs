//! Shared helpers of geomx's end-to-end tests (the tests themselves are in `tests/`).

#![warn(missing_docs)]

pub mod browser;
pub mod faults;
pub mod net;

use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout` with `what`.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "timed out after {:.1}s waiting for {what}",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster on the lab's seed hosts (a, b, c) with the lab's 5 s grace period and 500 ms
/// heartbeats, as the job tests use it.
pub fn seed_cluster() -> anyhow::Result<geomx_lab::Cluster> {
    seed_cluster_with_grace(Duration::from_secs(5))
}

/// [`seed_cluster`] with another grace period (a host silent this long is lost).
pub fn seed_cluster_with_grace(grace: Duration) -> anyhow::Result<geomx_lab::Cluster> {
    let lab = geomx_lab::Lab::up(geomx_lab::LabSpec::for_test().seed_hosts())?;
    Ok(geomx_lab::Cluster::up(
        lab,
        geomx_lab::ClusterSpec {
            grace_period: grace,
            heartbeat_interval: Duration::from_millis(500),
            ..geomx_lab::ClusterSpec::default()
        },
        geomx_lab::Binaries::find()?,
    )?)
}

/// Whether the tests that need root, namespaces and dockerd can run here; they are skipped
/// (with a message) only when `GEOMX_SKIP_LAB=1` says so explicitly.
pub fn lab_tests_enabled() -> bool {
    if std::env::var("GEOMX_SKIP_LAB").is_ok_and(|v| v == "1") {
        eprintln!("GEOMX_SKIP_LAB=1: skipping a lab test");
        return false;
    }
    true
}
