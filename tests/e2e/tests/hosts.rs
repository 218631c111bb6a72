//! Host maintenance in a lab: `geomxctl hosts cordon|uncordon|drain|remove` and lease
//! expiry, against the real controller and agents, on one cluster for the whole binary
//! (the scenarios run one after the other in a single test, each leaving the cluster as the
//! next expects it).
//!
//! Needs the binaries: `cargo build --workspace --bins` before `cargo test`.

use std::time::Duration;

use anyhow::{Context, ensure};
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::{Binaries, Cluster, ClusterSpec, HostSpec, Lab, LabSpec};
use serde_json::Value;

const GRACE: Duration = Duration::from_secs(3);
/// Short, so the expiry scenario is quick; longer than the time any other scenario keeps a
/// host lost before it acts on it.
const LEASE_TTL: &str = "8s";

fn cluster() -> anyhow::Result<Cluster> {
    let lab = Lab::up(LabSpec::for_test().seed_hosts())?;
    let c = Cluster::up(
        lab,
        ClusterSpec {
            grace_period: GRACE,
            heartbeat_interval: Duration::from_millis(500),
            network_interval: Duration::from_secs(1),
            ..ClusterSpec::default()
        },
        Binaries::find()?,
    )?;
    // the lab writes the controller's config without a lease_ttl: add one and restart it
    let config = c.lab().dir().join("controller").join("controller.toml");
    let mut text = std::fs::read_to_string(&config).context("controller.toml")?;
    text = format!("lease_ttl = \"{LEASE_TTL}\"\n{text}");
    std::fs::write(&config, text).context("controller.toml")?;
    c.controller().stop(Duration::from_secs(5))?;
    c.start_controller()?;
    let names: Vec<String> = c.lab().hosts().iter().map(|h| h.name.clone()).collect();
    c.wait_hosts_ready(&names, Duration::from_secs(30))?;
    Ok(c)
}

fn host(c: &Cluster, name: &str) -> Option<Value> {
    c.hosts().ok()?.into_iter().find(|h| h["name"] == name)
}

fn str_of<'v>(v: &'v Value, key: &str) -> &'v str {
    v[key].as_str().unwrap_or_default()
}

/// A single-party job (scheduler, server, worker) on `hosts`, `iterations` long.
fn long_job(name: &str, hosts: &[&str], iterations: u32) -> String {
    geomx_lab::jobfile::ps_job(
        name,
        hosts,
        1,
        &format!("PSNODE_INTERVAL = \"100ms\", PSNODE_ITERATIONS = \"{iterations}\""),
        "",
    )
}

/// The kinds of `host`'s events, oldest first (`geomxctl hosts events HOST`).
fn host_event_kinds(c: &Cluster, host: &str) -> anyhow::Result<Vec<String>> {
    Ok(c.ctl_json(&["hosts", "events", host])?["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|e| str_of(e, "kind").to_owned())
                .collect()
        })
        .unwrap_or_default())
}

/// Runs geomxctl, returning (exit code, stdout, stderr).
fn ctl(c: &Cluster, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = c.ctl(args)?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `geomxctl hosts drain HOST --deadline D --output json`: its report and its progress.
fn drain(c: &Cluster, host: &str, deadline: &str) -> anyhow::Result<(Value, String)> {
    let (code, out, err) = ctl(
        c,
        &[
            "hosts",
            "drain",
            host,
            "--deadline",
            deadline,
            "--output",
            "json",
        ],
    )?;
    ensure!(code == Some(0), "drain: {out}{err}");
    let report = serde_json::from_str(&out).with_context(|| format!("drain: {out}"))?;
    Ok((report, err))
}

#[test]
fn cordon_drain_remove_and_lease_expiry() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let mut c = cluster()?;

    // ---- cordon: no new job, the running one stays
    c.submit_ok("keep.toml", &long_job("keep", &["c"], 100_000))?;
    let running = c.wait_phase("keep", "Running", Duration::from_secs(60))?;
    let (code, out, err) = ctl(&c, &["hosts", "cordon", "c"])?;
    ensure!(code == Some(0), "cordon: {out}{err}");
    let hc = host(&c, "c").context("host c")?;
    ensure!(
        hc["scheduling"] == "cordoned" && hc["cordoned"] == true,
        "c after cordon: {hc}"
    );
    let (_, table, _) = ctl(&c, &["hosts"])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("c "))
        .context("row of c")?;
    ensure!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("SCHEDULING"))
            && row.contains("cordoned"),
        "hosts table:\n{table}"
    );
    let refused = c.submit_text("new.toml", &long_job("new", &["c"], 10))?;
    let why = String::from_utf8_lossy(&refused.stderr).into_owned();
    ensure!(
        refused.status.code() == Some(2) && why.contains("host c") && why.contains("cordoned"),
        "a job on a cordoned host was not refused as such: {why}"
    );
    // the running job goes on, every node running, across several heartbeats
    let progressed = c.wait_job("keep", Duration::from_secs(30), "progress", |j| {
        j["phase"] == "Running"
            && j["running_nodes"] == running["running_nodes"]
            && geomx_e2e::faults::max_iteration(j) > geomx_e2e::faults::max_iteration(&running) + 10
    })?;
    ensure!(progressed["phase"] == "Running", "{progressed}");

    // ---- drain with --deadline 0s: the job is cancelled and the host emptied
    let (report, err) = drain(&c, "c", "0s")?;
    ensure!(
        report["cancelled"] == serde_json::json!(["keep"]) && report["containers"] == 0,
        "drain report: {report}"
    );
    ensure!(c.job("keep")?["phase"] == "Cancelled");
    eventually(
        "no geomx container left on c",
        Duration::from_secs(10),
        || c.geomx_containers("c").ok().filter(Vec::is_empty),
    )?;
    ensure!(err.contains("cancelling job keep"), "drain progress: {err}");

    // ---- drain waiting for a job to finish on its own
    let (code, out, err) = ctl(&c, &["hosts", "uncordon", "c"])?;
    ensure!(code == Some(0), "uncordon: {out}{err}");
    ensure!(host(&c, "c").is_some_and(|h| h["scheduling"] == "enabled"));
    c.submit_ok("short.toml", &long_job("short", &["c"], 50))?;
    let (report, _) = drain(&c, "c", "2m")?;
    ensure!(
        report["ended"]["short"] == "Succeeded"
            && report["cancelled"] == serde_json::json!([])
            && report["containers"] == 0,
        "drain report: {report}"
    );
    ensure!(c.job("short")?["phase"] == "Succeeded");

    // ---- remove: a ready host is refused with the reason
    let (code, _, err) = ctl(&c, &["hosts", "remove", "b"])?;
    ensure!(
        code == Some(2) && err.contains("host \"b\" is ready"),
        "remove of a ready host: {code:?} {err}"
    );
    ensure!(host(&c, "b").is_some_and(|h| h["state"] == "ready"));

    // ---- remove of a lost host frees its subnet, and a new host gets it
    let c_subnet = str_of(&host(&c, "c").context("c")?, "subnet").to_owned();
    c.agent("c").kill9()?;
    eventually("c lost", GRACE * 4, || {
        host(&c, "c").filter(|h| h["state"] == "lost")
    })?;
    let (code, out, err) = ctl(&c, &["hosts", "remove", "c"])?;
    ensure!(
        code == Some(0) && out.contains(&format!("subnet {c_subnet} released")),
        "remove of lost c: {out}{err}"
    );
    ensure!(host(&c, "c").is_none(), "c still listed");
    let kinds = host_event_kinds(&c, "c")?;
    ensure!(
        kinds.ends_with(&[
            "HostCordoned".into(),
            "HostUncordoned".into(),
            "HostCordoned".into(),
            "HostLost".into(),
            "HostRemoved".into(),
        ]),
        "events of c: {kinds:?}"
    );
    c.add_host(HostSpec {
        name: "d".into(),
        underlay_ip: std::net::Ipv4Addr::new(10, 1, 1, 40),
        dc: None,
    })?;
    let d = eventually("d registered", Duration::from_secs(60), || {
        host(&c, "d").filter(|h| !str_of(h, "subnet").is_empty())
    })?;
    ensure!(
        str_of(&d, "subnet") == c_subnet,
        "d got {} instead of the freed {c_subnet}",
        str_of(&d, "subnet")
    );

    // ---- lease expiry: a host lost past lease_ttl is forgotten, and registers afresh
    let before = host(&c, "b").context("b")?;
    let b_subnet = str_of(&before, "subnet").to_owned();
    c.lab().cut_link("b")?;
    eventually("b lost", GRACE * 4, || {
        host(&c, "b").filter(|h| h["state"] == "lost" && str_of(h, "subnet") == b_subnet)
    })?;
    eventually("b's lease expired", Duration::from_secs(30), || {
        c.hosts().ok().filter(|hosts| {
            hosts
                .iter()
                .all(|h| h["name"] != "b" && str_of(h, "subnet") != b_subnet)
        })
    })?;
    c.lab().restore_link("b")?;
    let back = eventually("b registered again", Duration::from_secs(60), || {
        host(&c, "b").filter(|h| h["state"] == "ready" && !str_of(h, "subnet").is_empty())
    })?;
    ensure!(
        back["registered_at_ms"].as_i64() > before["registered_at_ms"].as_i64(),
        "b came back with its old record: {back}"
    );
    let kinds = host_event_kinds(&c, "b")?;
    ensure!(
        kinds.ends_with(&[
            "HostLost".into(),
            "LeaseExpired".into(),
            "HostRegistered".into()
        ]),
        "events of b: {kinds:?}"
    );
    c.wait_hosts_ready(
        &["a".into(), "b".into(), "d".into()],
        Duration::from_secs(60),
    )?;

    c.down()?;
    Ok(())
}
