//! A geomx cluster in a lab for the benchmarks that need real agents (deploy, convergence,
//! detection, the agent's footprint): `geomx_lab::Cluster` on the seed hosts a, b, c, with
//! small helpers on top (clock, polling, the geomx containers of a host, the lab's routes).
//!
//! Every lab is torn down by [`BenchCluster::down`], also after a failed benchmark; a panic
//! tears it down through `geomx_lab::Lab`'s `Drop`.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use geomx_lab::{Binaries, Cluster, ClusterSpec, Lab, LabHost, LabSpec};
use serde_json::Value;

use crate::report::note;

/// The seed hosts every cluster benchmark uses.
pub const HOSTS: [&str; 3] = ["a", "b", "c"];

/// A cluster of the seed hosts with the lab's default timing.
pub struct BenchCluster {
    cluster: Cluster,
    spec: ClusterSpec,
}

impl BenchCluster {
    /// Starts a lab of hosts a, b, c, the controller, an agent per host and the test image
    /// (geomx-psnode, also tagged with the GeoMX image name), with the binaries of
    /// `bin_dir` (which must hold geomx-controller, geomx-agent, geomxctl, geomx-psnode),
    /// and the lab tests' timing (heartbeat 500 ms, grace 3 s, network re-check 2 s).
    pub fn up(bin_dir: &Path) -> anyhow::Result<BenchCluster> {
        BenchCluster::up_with(bin_dir, BenchCluster::lab_test_timing())
    }

    /// Like [`BenchCluster::up`] with the defaults of a real deployment: heartbeat 1 s,
    /// grace period 10 s, network re-check 10 s (controller.toml's and agent.toml's
    /// defaults).
    pub fn up_production_timing(bin_dir: &Path) -> anyhow::Result<BenchCluster> {
        BenchCluster::up_with(
            bin_dir,
            ClusterSpec {
                heartbeat_interval: Duration::from_secs(1),
                grace_period: Duration::from_secs(10),
                network_interval: Duration::from_secs(10),
                ..ClusterSpec::default()
            },
        )
    }

    /// Like [`BenchCluster::up`] on a geo-distributed lab of hosts a, b, c.
    pub fn up_geo(
        bin_dir: &Path,
        topology: geomx_lab::topology::TopologyFile,
    ) -> anyhow::Result<BenchCluster> {
        BenchCluster::up_in(
            bin_dir,
            LabSpec::for_test().topology(topology),
            BenchCluster::lab_test_timing(),
        )
    }

    fn lab_test_timing() -> ClusterSpec {
        ClusterSpec {
            heartbeat_interval: Duration::from_millis(500),
            grace_period: Duration::from_secs(3),
            network_interval: Duration::from_secs(2),
            ..ClusterSpec::default()
        }
    }

    /// Starts the cluster with `spec`'s timing (see [`BenchCluster::up`]).
    pub fn up_with(bin_dir: &Path, spec: ClusterSpec) -> anyhow::Result<BenchCluster> {
        BenchCluster::up_in(bin_dir, LabSpec::for_test().seed_hosts(), spec)
    }

    fn up_in(bin_dir: &Path, lab: LabSpec, spec: ClusterSpec) -> anyhow::Result<BenchCluster> {
        let bins = Binaries::in_dir(bin_dir).context("finding the binaries the lab runs")?;
        let started = Instant::now();
        let lab = Lab::up(lab).context("starting the lab")?;
        let name = lab.name().to_owned();
        // Cluster::up consumes the lab; on failure the lab is dropped, which tears it down
        let cluster = Cluster::up(lab, spec.clone(), bins)
            .with_context(|| format!("starting the cluster in lab {name}"))?;
        note(format!(
            "lab {name}: cluster of {} hosts up in {:.1}s",
            HOSTS.len(),
            started.elapsed().as_secs_f64()
        ));
        Ok(BenchCluster { cluster, spec })
    }

    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The cluster, mutable (to add a host).
    pub fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }

    /// The cluster's timing (heartbeat interval, grace period, network interval).
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// A host of the lab.
    pub fn host(&self, name: &str) -> anyhow::Result<&LabHost> {
        Ok(self.cluster.lab().host(name)?)
    }

    /// Tears everything down; with `failed`, prints the end of every log first.
    pub fn down(self, failed: bool) -> anyhow::Result<()> {
        if failed {
            self.cluster.lab().dump_logs(30);
        }
        self.cluster.down().context("tearing the lab down")
    }

    /// `geomxctl <args> --output json`.
    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        self.cluster
            .ctl_json(args)
            .with_context(|| format!("geomxctl {}", args.join(" ")))
    }

    /// `geomxctl status JOB --output json`.
    pub fn job(&self, name: &str) -> anyhow::Result<Value> {
        self.ctl_json(&["status", name])
    }

    /// The job's events (`geomxctl events JOB --output json`), oldest first.
    pub fn events(&self, name: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self.ctl_json(&["events", name])?["events"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// One host as the controller sees it (`geomxctl hosts --output json`).
    pub fn host_json(&self, name: &str) -> anyhow::Result<Option<Value>> {
        Ok(self
            .cluster
            .hosts()
            .context("geomxctl hosts")?
            .into_iter()
            .find(|h| h["name"] == name))
    }

    /// Submits `toml` as `<lab>/jobs/<name>.toml` with `geomxctl submit --detach`.
    pub fn submit(&self, name: &str, toml: &str) -> anyhow::Result<()> {
        self.cluster
            .submit_ok(&format!("{name}.toml"), toml)
            .with_context(|| format!("submitting job {name}"))
    }

    /// Polls the job every `every` until `done` accepts it; fails when it ends otherwise
    /// (Failed, Cancelled, Succeeded without `done`) or after `timeout`.
    pub fn wait_job(
        &self,
        name: &str,
        every: Duration,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<(Value, Instant)> {
        let start = Instant::now();
        loop {
            let j = self.job(name)?;
            let seen = Instant::now();
            if done(&j) {
                return Ok((j, seen));
            }
            let phase = j["phase"].as_str().unwrap_or_default();
            if matches!(phase, "Failed" | "Cancelled" | "Succeeded") {
                bail!(
                    "job {name} ended {phase} while waiting for {what}: {}",
                    j["reason"]
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "job {name}: no {what} within {:.0}s (phase {phase}, {}/{} nodes running)",
                    timeout.as_secs_f64(),
                    j["running_nodes"],
                    j["node_count"]
                );
            }
            std::thread::sleep(every);
        }
    }

    /// Cancels the job (if it is still active) and waits until no geomx container is left on
    /// any host of the lab.
    pub fn cancel_and_clear(&self, name: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let out = self
            .cluster
            .ctl(&["cancel", name])
            .with_context(|| format!("geomxctl cancel {name}"))?;
        if !out.status.success() {
            // an ended job cannot be cancelled: only complain when it still runs
            let phase = self.job(name)?["phase"].as_str().unwrap_or("").to_owned();
            if !matches!(phase.as_str(), "Failed" | "Cancelled" | "Succeeded") {
                bail!(
                    "geomxctl cancel {name} failed (phase {phase}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        self.wait_no_geomx_containers(timeout)
    }

    /// Waits until no geomx container (role or sandbox) is left on any host of the lab.
    pub fn wait_no_geomx_containers(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let mut left = Vec::new();
            for h in self.cluster.lab().hosts() {
                let names = self
                    .cluster
                    .geomx_containers(&h.name)
                    .with_context(|| format!("listing the geomx containers of {}", h.name))?;
                left.extend(names.into_iter().map(|n| format!("{}:{n}", h.name)));
            }
            if left.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "geomx containers still there after {:.0}s: {}",
                    timeout.as_secs_f64(),
                    left.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the controller reports every host in `names` ready and converged.
    pub fn wait_ready(&self, names: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        self.cluster
            .wait_hosts_ready(&names, timeout)
            .with_context(|| format!("waiting for hosts {names:?} to be ready"))
    }
}

/// The machine's clock, Unix milliseconds (the controller's and dockerd's clock too: every
/// process of a lab runs on this machine).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The geomx routes (`proto 247`) of a lab host's namespace, one line each, read with
/// `ip -n <namespace> -4 route show proto 247` (a few ms).
pub fn geomx_routes(h: &LabHost) -> anyhow::Result<Vec<String>> {
    let ns = h.netns().name();
    let out = std::process::Command::new("ip")
        .args(["-n", &ns, "-4", "route", "show", "proto", "247"])
        .output()
        .with_context(|| format!("ip -n {ns} route"))?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} route: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Whether one of `routes` goes via `gateway`.
pub fn has_route_via(routes: &[String], gateway: std::net::Ipv4Addr) -> bool {
    let via = format!(" via {gateway} ");
    routes.iter().any(|r| format!("{r} ").contains(&via))
}

/// An integer field of a JSON object (0 when absent).
pub fn int(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or_default()
}

/// Seconds between two Unix-millisecond instants.
pub fn secs(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_via() {
        let r = vec!["172.17.40.0/24 via 10.1.1.40 dev eth0 proto 247".to_owned()];
        assert!(has_route_via(&r, "10.1.1.40".parse().unwrap()));
        assert!(!has_route_via(&r, "10.1.1.4".parse().unwrap()));
        assert_eq!(secs(1000, 2500), 1.5);
    }
}
