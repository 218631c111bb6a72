//! The heartbeat endpoint and container ownership under the review's attacks (issue 13),
//! against the live cluster (hosts a, b, c):
//!
//! 1. a metric flood from inside a job container (80 POSTs of ~60 KB, every metric name
//!    new, with the container's own token): every host stays ready, another job on the
//!    hosts keeps Running and progressing, the agent's RSS grows by less than 30 MB, and
//!    the drops are visible (in the answers and the agent's counters);
//! 2. forged heartbeats for another job's hung worker, from another container on its host,
//!    from a container on another host and from the host's namespace, without a token and
//!    with a stolen one: refused (401/403, counted), and the worker still fails at its
//!    stall timeout;
//! 3. `docker commit` of a role container, run by hand under another name with the
//!    image's labels: after several agent passes and an agent restart it still runs, and
//!    the job's own node is unaffected (no container of the job restarted); removed here at
//!    the end.
//!
//! Leaves the cluster as it found it: every host ready, no job of its own running.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_e2e::eventually;
use geomx_lab::{Cluster, Dockerd, Netns};
use serde_json::Value;

/// The job that must not notice anything: scheduler, server and worker-0 on a, worker-1 on
/// b; its workers also report over HTTP (with their tokens).
const OTHER: &str = "hb-other";
/// The job whose only worker hangs after two iterations, all on b.
const HUNG: &str = "hb-hung";
const STALL_TIMEOUT_S: u64 = 10;
const FLOOD_POSTS: usize = 80;

/// Who forged a heartbeat, and the status it got.
type Forged = Vec<(&'static str, u16)>;

pub fn run(c: &Cluster) -> anyhow::Result<()> {
    let started = Instant::now();
    let r = scenario(c);
    if r.is_err() {
        c.lab().dump_logs(40);
    }
    // whatever happened: our jobs and the copy go
    let _ = c.ctl(&["cancel", OTHER]);
    let _ = c.ctl(&["cancel", HUNG]);
    if let Ok(d) = c.lab().host("a").and_then(|h| h.dockerd()) {
        let _ = d.docker(&["rm", "-f", "hb-copy"]);
        let _ = d.docker(&["rmi", "-f", "geomx-abuse/copy:1"]);
    }
    r?;
    eventually(
        "no container of the heartbeat scenario left",
        Duration::from_secs(20),
        || {
            c.lab()
                .hosts()
                .iter()
                .all(|h| {
                    c.geomx_containers(&h.name)
                        .is_ok_and(|v| v.iter().all(|n| !n.contains(OTHER) && !n.contains(HUNG)))
                })
                .then_some(())
        },
    )?;
    eprintln!(
        "heartbeat and ownership attacks: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn scenario(c: &Cluster) -> anyhow::Result<()> {
    let t0 = Instant::now();
    c.submit_ok(
        "hb-other.toml",
        &geomx_lab::jobfile::ps_job(
            OTHER,
            &["a", "b"],
            2,
            "PSNODE_INTERVAL = \"200ms\", PSNODE_ITERATIONS = \"100000\", PSNODE_HTTP_HEARTBEAT = \"1\"",
            "",
        ),
    )?;
    let other = c.wait_job(
        OTHER,
        Duration::from_secs(60),
        "both workers training, with HTTP heartbeats",
        |j| {
            j["phase"] == "Running"
                && ["p-worker-0", "p-worker-1"].iter().all(|w| {
                    node(j, w).is_some_and(|n| {
                        n["progress"]["iteration"].as_u64() >= Some(2)
                            // only the HTTP heartbeat carries "loss": the token works
                            && n["progress"]["metrics"].get("loss").is_some()
                    })
                })
        },
    )?;
    eprintln!(
        "{OTHER} training after {:.1}s (iterations {:?})",
        t0.elapsed().as_secs_f64(),
        iterations(&other)
    );

    c.submit_ok(
        "hb-hung.toml",
        &geomx_lab::jobfile::ps_job(
            HUNG,
            &["b"],
            1,
            "PSNODE_INTERVAL = \"100ms\", PSNODE_HANG_AFTER = \"2\"",
            &format!("stall_timeout = \"{STALL_TIMEOUT_S}s\""),
        ),
    )?;
    let hung_running = wait_running(c, HUNG)?;
    // the worker hangs after its 2nd iteration: the stall clock runs from about now
    let other_before = iterations(&c.job(OTHER)?);

    let a = c.lab().host("a")?;
    let b = c.lab().host("b")?;
    let (da, db) = (a.dockerd()?, b.dockerd()?);
    let name = |job: &str, node: &str| format!("geomx.{job}.{node}");
    let hung_worker = name(HUNG, "p-worker-0");
    let hung_env = env_of(db, &hung_worker)?;
    let stolen = hung_env
        .get("GEOMX_HEARTBEAT_TOKEN")
        .cloned()
        .context("the hung worker has no GEOMX_HEARTBEAT_TOKEN")?;
    ensure!(stolen.len() == 64, "token {stolen:?}");
    let b_url = agent_addr(&hung_env)?;
    let forged_body = |step: u64| {
        format!(
            r#"{{"job": "{HUNG}", "node": "p-worker-0", "step": {step}, "epoch": 0, "metrics": {{"accuracy": 0.99}}}}"#
        )
    };
    let b_pid = c.agent("b").pid().context("agent b not running")?;
    let rss_before = rss_kb(b_pid)?;

    // --- 1 and 2 at once, while the hung worker's stall clock runs
    let flood_from = db.container_netns(&name(HUNG, "p-scheduler"))?;
    let flood_env = env_of(db, &name(HUNG, "p-scheduler"))?;
    let flood_token = flood_env
        .get("GEOMX_HEARTBEAT_TOKEN")
        .cloned()
        .context("the scheduler has no token")?;
    let same_host = db.container_netns(&name(HUNG, "p-server-0"))?;
    let same_host_token = env_of(db, &name(HUNG, "p-server-0"))?
        .get("GEOMX_HEARTBEAT_TOKEN")
        .cloned()
        .context("the server has no token")?;
    let other_host = da.container_netns(&name(OTHER, "p-server-0"))?;
    let host_ns = b.netns().clone();
    let stop = AtomicBool::new(false);
    let (flood, forged, failed) = std::thread::scope(|s| {
        let flood = s.spawn(|| -> anyhow::Result<Vec<(u16, String)>> {
            let mut out = Vec::new();
            for i in 0..FLOOD_POSTS {
                let body = flood_body(i);
                out.push(post(&flood_from, b_url, &body, Some(&flood_token))?);
            }
            // and the review's flood as it was, without a token
            for i in 0..5 {
                out.push(post(&flood_from, b_url, &flood_body(1000 + i), None)?);
            }
            Ok(out)
        });
        let forge = s.spawn(|| -> anyhow::Result<Forged> {
            let mut out: Forged = Vec::new();
            let mut step = 1000;
            while !stop.load(Ordering::SeqCst) {
                step += 1;
                let body = forged_body(step);
                for (who, ns, token) in [
                    ("same host, no token", &same_host, None),
                    (
                        "same host, its own token",
                        &same_host,
                        Some(same_host_token.as_str()),
                    ),
                    ("same host, stolen token", &same_host, Some(stolen.as_str())),
                    ("other host, no token", &other_host, None),
                    (
                        "other host, stolen token",
                        &other_host,
                        Some(stolen.as_str()),
                    ),
                    ("host namespace, no token", &host_ns, None),
                    (
                        "host namespace, stolen token",
                        &host_ns,
                        Some(stolen.as_str()),
                    ),
                ] {
                    match post(ns, b_url, &body, token) {
                        Ok((status, _)) => out.push((who, status)),
                        // the failed job's containers are gone, and their namespaces with
                        // them: nobody is left to forge from there
                        Err(_) if !ns.exists() => continue,
                        Err(e) => return Err(e),
                    }
                }
                std::thread::sleep(Duration::from_millis(400));
            }
            Ok(out)
        });
        // meanwhile: the hung worker still fails as stalled, the forged steps never show
        let failed = (|| -> anyhow::Result<(Value, Duration)> {
            let deadline = Duration::from_secs(STALL_TIMEOUT_S + 25);
            loop {
                let j = c.job(HUNG)?;
                if let Some(w) = node(&j, "p-worker-0") {
                    let it = w["progress"]["iteration"].as_u64().unwrap_or(0);
                    ensure!(it < 1000, "a forged heartbeat was taken: {w}");
                }
                if j["phase"] != "Running" {
                    return Ok((j, hung_running.elapsed()));
                }
                if hung_running.elapsed() > deadline {
                    bail!("{HUNG} still running after {deadline:?}: {j}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })();
        stop.store(true, Ordering::SeqCst);
        let flood = flood
            .join()
            .unwrap_or_else(|_| bail!("flood thread panicked"));
        let forged = forge
            .join()
            .unwrap_or_else(|_| bail!("forging thread panicked"));
        (flood, forged, failed)
    });
    let (hung, took) = failed?;
    let reason = hung["reason"].as_str().unwrap_or_default();
    ensure!(
        hung["phase"] == "Failed" && reason.contains("stall"),
        "{HUNG} did not fail as stalled: {hung}"
    );
    ensure!(
        took >= Duration::from_secs(STALL_TIMEOUT_S / 2)
            && took <= Duration::from_secs(STALL_TIMEOUT_S + 15),
        "{HUNG} did not fail at its stall timeout ({took:?}): {hung}"
    );
    eprintln!(
        "{HUNG} failed as stalled {:.1}s after Running, despite the forged heartbeats",
        took.as_secs_f64()
    );
    // every forgery refused: 401 (no or wrong token) or 403 (the stolen token from another
    // address); 404 only once the failed job's containers are gone, and then for good
    let forged = forged?;
    let mut per: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    for (who, status) in &forged {
        per.entry(who).or_default().push(*status);
    }
    for (who, statuses) in &per {
        let refused = statuses.iter().take_while(|s| **s != 404).count();
        ensure!(
            refused >= 5 && statuses[refused..].iter().all(|s| *s == 404),
            "{who}: {statuses:?}"
        );
        // no token or another's: 401; the stolen token itself from another address: 403
        let want: &[u16] = if who.contains("stolen") {
            &[403]
        } else {
            &[401]
        };
        ensure!(
            statuses[..refused].iter().all(|s| want.contains(s)),
            "{who}: expected {want:?}, got {statuses:?}"
        );
    }
    eprintln!(
        "forged heartbeats refused: {}",
        per.iter()
            .map(|(w, s)| format!("{w}={}", s.len()))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // the flood: taken, its metrics dropped beyond the limit, the unauthenticated part 401
    let flood = flood?;
    let (taken, rest) = flood.split_at(FLOOD_POSTS);
    ensure!(
        taken.iter().all(|(s, _)| *s == 200),
        "flood answers: {:?}",
        taken.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    let dropped: u64 = taken
        .iter()
        .filter_map(|(_, b)| serde_json::from_str::<Value>(b).ok())
        .filter_map(|v| v["metrics_dropped"].as_u64())
        .sum();
    ensure!(
        dropped > 50_000,
        "the answers should say the flood's metrics were dropped: {dropped}"
    );
    ensure!(rest.iter().all(|(s, _)| *s == 401), "{rest:?}");
    let rss_after = rss_kb(b_pid)?;
    let grew_mb = rss_after.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "agent b RSS {} -> {} kB (+{grew_mb:.1} MB) after {FLOOD_POSTS} POSTs, {dropped} metrics dropped",
        rss_before, rss_after
    );
    ensure!(grew_mb < 30.0, "agent b grew by {grew_mb:.1} MB");
    // what the controller holds of the flooding node is bounded too
    let hung_job = c.job(HUNG)?;
    if let Some(sched) = node(&hung_job, "p-scheduler") {
        let n = sched["progress"]["metrics"]
            .as_object()
            .map_or(0, |m| m.len());
        ensure!(n <= 32, "the scheduler reports {n} metrics");
    }
    // the refusals are counted in the agent (its Prometheus file, its log)
    let counters = eventually(
        "agent b's heartbeat counters",
        Duration::from_secs(12),
        || {
            let m = prom(c, "b").ok()?;
            let get = |k: &str| m.get(k).copied().unwrap_or(0);
            (get("refused{reason=\"no_token\"}") >= 5
                && get("refused{reason=\"bad_token\"}") >= 5
                && get("refused{reason=\"wrong_address\"}") >= 5
                && get("metrics_dropped") >= dropped)
                .then_some(m)
        },
    )?;
    eprintln!("agent b's counters: {counters:?}");
    let log_b = std::fs::read_to_string(c.agent("b").log()).unwrap_or_default();
    ensure!(
        log_b.contains("heartbeat refused"),
        "agent b's log does not show the refusals"
    );
    // every host ready, the other job running on and progressing
    wait_all_ready(c)?;
    let other = c.wait_job(
        OTHER,
        Duration::from_secs(10),
        "progress past the attack",
        |j| j["phase"] == "Running" && progressed(&other_before, &iterations(j)),
    )?;
    let other_mid = iterations(&other);

    // --- 3: a committed copy of a role container, run by hand under another name
    let victim = name(OTHER, "p-worker-0");
    let started_at =
        |d: &Dockerd, n: &str| d.docker(&["inspect", "-f", "{{.Id}} {{.State.StartedAt}}", n]);
    let on_a: Vec<String> = c
        .geomx_containers("a")?
        .into_iter()
        .filter(|n| n.contains(OTHER))
        .collect();
    ensure!(on_a.len() >= 4, "{OTHER} on a: {on_a:?}");
    let before: Vec<String> = on_a
        .iter()
        .map(|n| started_at(da, n))
        .collect::<Result<_, _>>()?;
    da.docker(&["commit", "--pause=false", &victim, "geomx-abuse/copy:1"])?;
    da.docker(&[
        "run",
        "-d",
        "--name",
        "hb-copy",
        "geomx-abuse/copy:1",
        "sleep",
        "600",
    ])?;
    let managed = da.docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"io.geomx.managed\"}} {{index .Config.Labels \"io.geomx.node\"}}",
        "hb-copy",
    ])?;
    ensure!(
        managed.trim() == "true p-worker-0",
        "the copy should carry the node's labels: {managed:?}"
    );
    let copy_running = || {
        da.docker(&["inspect", "-f", "{{.State.Running}}", "hb-copy"])
            .is_ok_and(|s| s.trim() == "true")
    };
    // several passes of the agent (one every network interval, 2 s, plus its resyncs)
    std::thread::sleep(Duration::from_secs(6));
    ensure!(
        copy_running(),
        "the copy was stopped or removed by the agent"
    );
    // an agent restart: the copy is not adopted, the job's containers are
    c.agent("a").stop(Duration::from_secs(10))?;
    c.start_agent("a")?;
    wait_all_ready(c)?;
    std::thread::sleep(Duration::from_secs(5));
    ensure!(copy_running(), "the copy did not survive the agent restart");
    let log_a = std::fs::read_to_string(c.agent("a").log()).unwrap_or_default();
    ensure!(
        !log_a
            .lines()
            .any(|l| l.contains("removing a container") && l.contains("hb-copy")),
        "agent a removed the copy"
    );
    ensure!(
        log_a.contains("did not create"),
        "agent a does not say it leaves the copy alone"
    );
    let after: Vec<String> = on_a
        .iter()
        .map(|n| started_at(da, n))
        .collect::<Result<_, _>>()?;
    ensure!(
        before == after,
        "a container of {OTHER} on a was replaced or restarted: {before:?} -> {after:?}"
    );
    let other = c.wait_job(
        OTHER,
        Duration::from_secs(10),
        "progress after the restart",
        |j| j["phase"] == "Running" && progressed(&other_mid, &iterations(j)),
    )?;
    let copy_id = da.docker(&["inspect", "-f", "{{.Id}}", "hb-copy"])?;
    ensure!(
        node(&other, "p-worker-0").is_some_and(|n| n["container_id"] != copy_id.trim()),
        "the copy is counted as the node: {other}"
    );
    // the restarted agent derives the same tokens: the workers' heartbeats still go through
    eventually(
        "agent a taking its workers' heartbeats after the restart",
        Duration::from_secs(12),
        || {
            let m = prom(c, "a").ok()?;
            let get = |k: &str| m.get(k).copied().unwrap_or(0);
            (get("accepted") > 0
                && get("refused{reason=\"bad_token\"}") == 0
                && get("refused{reason=\"no_token\"}") == 0)
                .then_some(())
        },
    )?;
    da.docker(&["rm", "-f", "hb-copy"])?;
    da.docker(&["rmi", "-f", "geomx-abuse/copy:1"])?;
    let out = c.ctl(&["cancel", OTHER])?;
    ensure!(
        out.status.success(),
        "cancel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("scenario body: {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn node<'j>(job: &'j Value, name: &str) -> Option<&'j Value> {
    job["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

fn iterations(job: &Value) -> Vec<u64> {
    ["p-worker-0", "p-worker-1"]
        .iter()
        .map(|w| {
            node(job, w)
                .and_then(|n| n["progress"]["iteration"].as_u64())
                .unwrap_or(0)
        })
        .collect()
}

fn progressed(before: &[u64], now: &[u64]) -> bool {
    before.len() == now.len() && before.iter().zip(now).all(|(b, n)| n > b)
}

fn wait_running(c: &Cluster, job: &str) -> anyhow::Result<Instant> {
    c.wait_phase(job, "Running", Duration::from_secs(60))?;
    Ok(Instant::now())
}

fn wait_all_ready(c: &Cluster) -> anyhow::Result<()> {
    let names: Vec<String> = c.lab().hosts().iter().map(|h| h.name.clone()).collect();
    c.wait_hosts_ready(&names, Duration::from_secs(30))?;
    Ok(())
}

/// One POST body of the flood: ~60 KB of metric names never sent before (some over the
/// 64-byte limit).
fn flood_body(i: usize) -> String {
    let mut metrics = String::new();
    let mut k = 0;
    while metrics.len() < 60_000 {
        if k > 0 {
            metrics.push_str(", ");
        }
        let pad = if k % 10 == 0 { 70 } else { 24 };
        metrics.push_str(&format!("\"f{i:03}-{k:04}-{}\": {k}.5", "x".repeat(pad)));
        k += 1;
    }
    format!(r#"{{"step": {i}, "metrics": {{{metrics}}}}}"#)
}

/// One POST of `body` to the heartbeat endpoint at `addr` from inside `ns`, with `token` as
/// bearer token; (status, body).
fn post(
    ns: &Netns,
    addr: SocketAddr,
    body: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = ns.connect_tcp(addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST /v1/heartbeat HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {:?}", resp.lines().next()))?;
    let body = resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((status, body))
}

/// The env of a container, as Docker has it.
fn env_of(d: &Dockerd, container: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let out = d.docker(&[
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        container,
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The heartbeat endpoint of a container's agent, from its `GEOMX_AGENT_URL`.
fn agent_addr(env: &BTreeMap<String, String>) -> anyhow::Result<SocketAddr> {
    let url = env.get("GEOMX_AGENT_URL").context("no GEOMX_AGENT_URL")?;
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("GEOMX_AGENT_URL {url:?}"))
}

/// A process's resident set size, kB.
fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// The agent of `host`'s heartbeat counters (its `heartbeat.prom`), by name without the
/// `geomx_agent_heartbeat(s)_` prefix and `_total` suffix: `accepted`, `metrics_dropped`,
/// `refused{reason="..."}`.
fn prom(c: &Cluster, host: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let file = c.agent_state_dir(host)?.join("heartbeat.prom");
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let name = name
                .trim_start_matches("geomx_agent_heartbeats_")
                .trim_start_matches("geomx_agent_heartbeat_")
                .replace("_total", "");
            Some((name, value.parse().ok()?))
        })
        .collect())
}
