//! Route convergence (issue 6, item 2), in the lab cluster of hosts a, b, c plus a fourth
//! host d (10.1.1.40) that joins, gets lost and leaves, over and over:
//!
//! 1. **join**: d's agent starts (`geomx-agent run`; the first time, with a fresh host:
//!    namespace and dockerd made just before). Figure: until every existing host (a, b, c)
//!    has a route via 10.1.1.40 (`proto 247`), polled with `ip -n <ns> route` every 10 ms
//!    per host, in one thread per host. Reported from the agent's start (`join_s`, what a
//!    person sees) and from the agent's registration (its `registered` log line, the
//!    moment it got its lease: `join_after_register_s`, the control plane's part, with the
//!    agent's own start-up, TLS handshake and registration excluded).
//! 2. **loss**: d's agent is killed (`kill -9`) and its link cut. Figure: until every
//!    existing host has withdrawn the route (`loss_s`); the controller waits for the grace
//!    period first, so the figure compared with the target is `loss_s - grace`.
//! 3. **leave**: the link is restored and `geomx-agent leave` run on d (lease released,
//!    containers and network cleanup, dockerd restarted), so the next join is a fresh one.
//!
//! Target: join ≤ 1 s (p50), loss ≤ grace + 1 s.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_lab::{HostSpec, LabHost};

use crate::labcluster::{BenchCluster, HOSTS, geomx_routes, has_route_via, int, now_ms};
use crate::procfs;
use crate::report::{Line, median, note};

/// The joining host.
const NEW_HOST: &str = "d";
/// Its underlay address.
const NEW_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 40);
/// Join target, p50.
pub const JOIN_TARGET_S: f64 = 1.0;
/// Loss target beyond the grace period.
pub const LOSS_SLACK_S: f64 = 1.0;
/// How often each host's routes are read.
const POLL: Duration = Duration::from_millis(10);

/// Knobs of the convergence benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Join/loss cycles.
    pub cycles: usize,
}

/// Waits until `present` holds for the route via `gw` on every host of `hosts`; returns
/// the instant the last host got there (each host polled every [`POLL`] in its own thread).
fn wait_routes(
    hosts: &[LabHost],
    gw: Ipv4Addr,
    present: bool,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let start = Instant::now();
    let results: Vec<anyhow::Result<Instant>> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                s.spawn(move || {
                    loop {
                        let routes = geomx_routes(h)?;
                        let now = Instant::now();
                        if has_route_via(&routes, gw) == present {
                            return Ok(now);
                        }
                        if start.elapsed() > timeout {
                            bail!(
                                "{}: route via {gw} still {} after {:.0}s: {routes:?}",
                                h.name,
                                if present { "missing" } else { "there" },
                                timeout.as_secs_f64()
                            );
                        }
                        std::thread::sleep(POLL);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|j| {
                j.join()
                    .map_err(|_| anyhow::anyhow!("route poller panicked"))?
            })
            .collect()
    });
    let mut last = start;
    for r in results {
        last = last.max(r?);
    }
    Ok(last)
}

/// One join: (from the agent's start, from the controller's registration or NaN), s.
fn measure_join(
    bc: &mut BenchCluster,
    peers: &[LabHost],
    first: bool,
) -> anyhow::Result<(f64, f64)> {
    let (t0, t0_ms) = if first {
        bc.cluster_mut()
            .add_host(HostSpec {
                name: NEW_HOST.into(),
                underlay_ip: NEW_IP,
                dc: None,
            })
            .context("adding host d")?;
        (Instant::now(), now_ms())
    } else {
        let (t0, t0_ms) = (Instant::now(), now_ms());
        bc.cluster()
            .start_agent(NEW_HOST)
            .context("starting d's agent")?;
        (t0, t0_ms)
    };
    let done = wait_routes(peers, NEW_IP, true, Duration::from_secs(60))?;
    let done_ms = t0_ms + done.duration_since(t0).as_millis() as i64;
    let join_s = done.duration_since(t0).as_secs_f64();
    let d = bc
        .host_json(NEW_HOST)?
        .context("the controller does not know d")?;
    // the registration of this join: the agent's "registered" log line (the controller's
    // registered_at_ms is the host's first registration only)
    let log = std::fs::read_to_string(bc.cluster().agent(NEW_HOST).log()).unwrap_or_default();
    let registered = registered_at_ms(&log, t0_ms - 100)
        .or_else(|| Some(int(&d, "registered_at_ms")).filter(|r| *r >= t0_ms));
    let after_register = registered.map_or(f64::NAN, |r| (done_ms - r) as f64 / 1000.0);
    Ok((join_s, after_register))
}

/// The time (Unix ms) of the first "registered" line of an agent log at or after
/// `not_before_ms` (tracing's fmt lines start with an RFC 3339 UTC timestamp).
fn registered_at_ms(log: &str, not_before_ms: i64) -> Option<i64> {
    log.lines()
        .filter(|l| l.contains("geomx_agent::daemon::controller: registered"))
        .filter_map(|l| {
            let ts = l.split_whitespace().next()?;
            let t = humantime::parse_rfc3339(ts).ok()?;
            let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64;
            Some(ms)
        })
        .find(|ms| *ms >= not_before_ms)
}

/// One loss: seconds from the cut until every peer withdrew the route.
fn measure_loss(bc: &BenchCluster, peers: &[LabHost]) -> anyhow::Result<f64> {
    let c = bc.cluster();
    c.agent(NEW_HOST).kill9().context("kill -9 of d's agent")?;
    c.lab().cut_link(NEW_HOST).context("cutting d's link")?;
    let t0 = Instant::now();
    let done = wait_routes(
        peers,
        NEW_IP,
        false,
        bc.spec().grace_period + Duration::from_secs(30),
    )?;
    Ok(done.duration_since(t0).as_secs_f64())
}

/// Restores d's link and runs `geomx-agent leave` on it (the next join is a fresh one).
fn leave(bc: &BenchCluster) -> anyhow::Result<()> {
    let c = bc.cluster();
    c.lab().restore_link(NEW_HOST)?;
    let h = bc.host(NEW_HOST)?;
    let config = c.lab().dir().join(NEW_HOST).join("agent.toml");
    let out = h
        .netns()
        .command(&c.binaries().agent.display().to_string())
        .args(["leave", "--config"])
        .arg(&config)
        .env("GEOMX_LOG", "warn")
        .output()
        .context("running geomx-agent leave")?;
    ensure!(
        out.status.success(),
        "geomx-agent leave on d failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs the benchmark in `bc` (adds host d to it); prints its lines.
pub fn run(bc: &mut BenchCluster, opts: &Options) -> anyhow::Result<()> {
    let load_before = procfs::loadavg();
    let peers: Vec<LabHost> = HOSTS
        .iter()
        .map(|h| bc.host(h).cloned())
        .collect::<anyhow::Result<_>>()?;
    let grace = bc.spec().grace_period.as_secs_f64();
    let mut joins = Vec::new();
    let mut joins_reg = Vec::new();
    let mut losses = Vec::new();
    for i in 0..opts.cycles.max(1) {
        let (j, jr) =
            measure_join(bc, &peers, i == 0).with_context(|| format!("join {}", i + 1))?;
        note(format!(
            "convergence: join {}: routes on a, b, c {j:.3}s after d's agent started ({jr:.3}s after it registered)",
            i + 1
        ));
        joins.push(j);
        joins_reg.push(jr);
        // d must be fully up (its dockerd restarted with the new bip) before it is cut
        bc.wait_ready(&[NEW_HOST], Duration::from_secs(60))?;
        let l = measure_loss(bc, &peers).with_context(|| format!("loss {}", i + 1))?;
        note(format!(
            "convergence: loss {}: routes withdrawn {l:.3}s after the cut (grace {grace:.1}s)",
            i + 1
        ));
        losses.push(l);
        leave(bc).with_context(|| format!("leave {}", i + 1))?;
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let reg: Vec<f64> = joins_reg
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let join_p50 = median(&joins);
    let loss_p50 = median(&losses);
    Line::new("convergence_join_p50_s", format!("{join_p50:.3}"))
        .f("join_after_register_p50_s", median(&reg), 3)
        .f("loss_p50_s", loss_p50, 3)
        .f("loss_minus_grace_p50_s", loss_p50 - grace, 3)
        .f("loss_max_s", max(&losses), 3)
        .kv("join_runs", list(&joins))
        .kv("join_after_register_runs", list(&joins_reg))
        .kv("loss_runs", list(&losses))
        .f("grace_s", grace, 1)
        .f(
            "heartbeat_interval_s",
            bc.spec().heartbeat_interval.as_secs_f64(),
            1,
        )
        .kv("poll_ms", POLL.as_millis())
        .kv("cycles", opts.cycles.max(1))
        .f("loadavg_before", load_before, 1)
        .f("loadavg", procfs::loadavg(), 1)
        .print();
    Line::new("convergence_join_target_1s_met", join_p50 <= JOIN_TARGET_S)
        .kv(
            "join_after_register_target_1s_met",
            median(&reg) <= JOIN_TARGET_S,
        )
        .kv(
            "loss_target_grace_plus_1s_met",
            max(&losses) <= grace + LOSS_SLACK_S,
        )
        .print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_time_from_the_agent_log() {
        let log = "2026-11-23T07:15:38.238534Z  INFO agent{host=d}: geomx_agent::daemon::controller: registered controller=x\n\
                   2026-11-23T07:16:38.000000Z  INFO agent{host=d}: geomx_agent::daemon::controller: registered again controller=x\n";
        let first = registered_at_ms(log, 0).unwrap();
        assert_eq!(first % 1000, 238);
        assert_eq!(registered_at_ms(log, first + 1).unwrap(), first + 59_762);
        assert_eq!(registered_at_ms(log, first + 60_000), None);
    }
}
