//! Real training: examples/mxnet-ps.toml on the MXNet 1.9.1 image (scripts/build-mxnet-image.sh)
//! across two data centers of the geo-distributed lab (a WAN link of 40 ms one way and 0.1 %
//! loss), kvstore dist_sync over WireGuard between the hosts' container networks, on
//! scikit-learn's handwritten digits.
//!
//! Needs the image's root file system tarball: `scripts/build-mxnet-image.sh` (the README's
//! test command builds it), or `GEOMX_MXNET_TAR=/path/to/tar`.
//!
//! The dashboard is watched while the job trains, in headless Chromium inside the lab
//! (tests/e2e/src/browser.rs): login with the lab token, the cluster's two data centers,
//! the job page's topology with every node, the training curve gaining points without a
//! reload, then a failing job whose node turns red with its reason; no console errors;
//! screenshots in target/test-artifacts/dashboard/ (or `$GEOMX_TEST_ARTIFACTS`). Without a
//! token the pages and the API refuse; `/metrics` counts the runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_e2e::browser::{Browser, artifacts_dir, curl, scrape};
use geomx_e2e::lab_tests_enabled;
use geomx_lab::topology::parse_topology;
use geomx_lab::{Binaries, Cluster, ClusterSpec, Lab, LabSpec};

/// Host a in dc1, host b in dc2, a slow and lossy WAN between them.
const TWO_DATA_CENTERS: &str = r#"
[[dc]]
name = "dc1"
subnet = "10.1.1.0/24"
hosts = [{ name = "a", ip = "10.1.1.34" }]
[[dc]]
name = "dc2"
subnet = "10.2.1.0/24"
hosts = [{ name = "b", ip = "10.2.1.29" }]
[[link]]
dcs = ["dc1", "dc2"]
delay = "40ms"
jitter = "2ms"
rate = "200mbit"
loss = "0.1%"
"#;

fn mxnet_tar() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("GEOMX_MXNET_TAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/geomx/mxnet-1.9.1.tar"));
    if !p.exists() {
        bail!(
            "{} is missing: build it with scripts/build-mxnet-image.sh (or set GEOMX_MXNET_TAR)",
            p.display()
        );
    }
    Ok(p)
}

#[test]
fn mxnet_example_trains_across_two_data_centers() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let tar = mxnet_tar()?;
    let spec = LabSpec::for_test().topology(parse_topology("two-dcs.toml", TWO_DATA_CENTERS)?);
    let c = Cluster::up(
        Lab::up(spec)?,
        ClusterSpec {
            psnode_image: false,
            mxnet_tar: Some(tar),
            ..ClusterSpec::default()
        },
        Binaries::find()?,
    )?;
    let shots = artifacts_dir().join("dashboard");
    let web = c.web_url();
    refused_without_a_token(&c)?;
    let mut b = Browser::logged_in(&c)?;
    b.wait_for(
        "document.querySelectorAll('#cluster .site').length === 2 && document.querySelectorAll('#cluster tr.host').length === 2",
        Duration::from_secs(20),
    )
    .context("the cluster page shows the two data centers, one host each")?;
    // The example, with GeoMX's ps::Finalize crash imitated: the scheduler and the servers
    // exit 139 after MXNet's own exit. The job must still succeed, naming each 139.
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/mxnet-ps.toml");
    let crash = r#"["sh", "-c", "python3 -c 'import mxnet'; exit 139"]"#;
    let text = std::fs::read_to_string(&file)?
        .replace(
            r#"scheduler = ["python3", "-c", "import mxnet"]"#,
            &format!("scheduler = {crash}"),
        )
        .replace(
            r#"server = ["python3", "-c", "import mxnet"]"#,
            &format!("server = {crash}"),
        );
    ensure!(text.matches("exit 139").count() == 2, "{text}");
    let crashing = std::env::temp_dir().join(format!("mxnet-ps-139-{}.toml", std::process::id()));
    std::fs::write(&crashing, &text)?;
    let out = c.ctl(&["submit", "--detach", &crashing.display().to_string()])?;
    ensure!(
        out.status.success(),
        "submit refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // the job page: every node of the plan in the topology, then a curve that grows while
    // the page stays loaded (no reload: the marker set on the window survives)
    let planned = c.job("mxnet-ps")?["node_count"].as_u64().unwrap_or(0);
    ensure!(
        planned == 7,
        "the example plans 7 nodes, the controller says {planned}"
    );
    b.navigate(&format!("{web}/#/jobs/mxnet-ps"))?;
    b.eval("window.__noReload = 1")?;
    b.wait_for(
        &format!("document.querySelectorAll('.topology .node').length === {planned}"),
        Duration::from_secs(30),
    )
    .context("the topology shows every node")?;
    let first_points = b
        .wait_for(
            "Number(document.getElementById('curves').dataset.points || 0)",
            Duration::from_secs(120),
        )
        .context("the curve gets points while the job trains")?
        .as_u64()
        .unwrap_or(0);
    let grown = b
        .wait_for(
            &format!(
                "window.__noReload === 1 && Number(document.getElementById('curves').dataset.points) > {first_points} && document.querySelectorAll('.curves .uplot').length === 2"
            ),
            Duration::from_secs(60),
        )
        .context("the curve gains points without a reload")?;
    ensure!(grown == serde_json::json!(true));
    let phase = c.job("mxnet-ps")?["phase"].clone();
    ensure!(
        phase == "Running",
        "the curve grew while the job was {phase}, not while it trained"
    );
    b.screenshot(&shots.join("job-training.png"))?;

    // sample every worker's accuracy while it trains
    let start = Instant::now();
    let mut seen: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let job = loop {
        let job = c.job("mxnet-ps")?;
        for n in job["nodes"].as_array().into_iter().flatten() {
            if let Some(acc) = n["progress"]["accuracy"].as_f64() {
                let name = n["name"].as_str().unwrap_or_default().to_string();
                let v = seen.entry(name).or_default();
                if v.last() != Some(&acc) {
                    v.push(acc);
                }
            }
        }
        match job["phase"].as_str() {
            Some("Succeeded") => break job,
            Some("Failed" | "Cancelled") => {
                bail!("the job ended {}: {}", job["phase"], job["reason"])
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(240) {
            bail!("no end after 4 minutes: {job}");
        }
        std::thread::sleep(Duration::from_millis(150));
    };

    let workers: Vec<&serde_json::Value> = job["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["role"] == "worker")
        .collect();
    ensure!(workers.len() == 4, "{job}");
    let hosts: std::collections::BTreeSet<&str> =
        workers.iter().filter_map(|n| n["host"].as_str()).collect();
    ensure!(
        hosts.len() == 2,
        "workers did not span two hosts: {hosts:?}"
    );
    for w in &workers {
        let name = w["name"].as_str().unwrap_or_default();
        ensure!(w["exit_code"] == 0, "{name}: {w}");
        let final_acc = w["progress"]["accuracy"]
            .as_f64()
            .context("final accuracy")?;
        let first = seen
            .get(name)
            .and_then(|v| v.first().copied())
            .unwrap_or(final_acc);
        eprintln!(
            "{name}: accuracy {first:.3} -> {final_acc:.3} ({} samples)",
            seen.get(name).map_or(0, Vec::len)
        );
        ensure!(final_acc > 0.6, "{name} ended with accuracy {final_acc}");
        let samples = seen.get(name).map_or(0, Vec::len);
        ensure!(
            samples >= 3,
            "status showed {name}'s accuracy only {samples} times while it trained"
        );
        ensure!(
            final_acc > first,
            "{name}: accuracy did not rise ({first} -> {final_acc})"
        );
    }
    let events = c.ctl_json(&["events", "mxnet-ps"])?;
    let crashed: std::collections::BTreeSet<&str> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["kind"] == "ExitedWhileShuttingDown"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("exited 139"))
        })
        .filter_map(|e| e["node"].as_str())
        .collect();
    let others: std::collections::BTreeSet<&str> = job["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["role"] != "worker")
        .filter_map(|n| n["name"].as_str())
        .collect();
    ensure!(
        crashed == others && others.len() == 3,
        "shutdown crashes named {crashed:?}, expected the scheduler and servers {others:?}: {events}"
    );
    ensure!(job["restarts"] == 0, "restarted: {job}");
    let _ = std::fs::remove_file(&crashing);

    // the page followed the job to its end: Succeeded, every worker exited 0
    b.wait_for(
        "document.querySelector('#job-header .phase-succeeded') !== null && document.querySelectorAll('.topology .node[data-state=exited]').length >= 4",
        Duration::from_secs(20),
    )
    .context("the job page shows the job succeeded")?;
    // the ps::Finalize crashes of the scheduler and servers are not failures: nothing red
    let nothing_red = b.wait_for(
        "document.querySelectorAll('.topology .node[data-state=failed]').length === 0",
        Duration::from_secs(10),
    );
    if let Err(e) = nothing_red {
        // what the page got (its stream's updates) and what the API says now
        let updates = b.eval("document.getElementById('view').dataset.updates")?;
        let api = b.eval("fetch('/api/jobs/mxnet-ps').then(r => r.json()).then(j => JSON.stringify(j.job.nodes.map(n => [n.name, n.state, n.exit_code, n.end])))")?;
        bail!("{e:#}\nupdates the page received: {updates}\nthe API's nodes: {api}");
    }
    b.screenshot(&shots.join("job-succeeded.png"))?;

    failed_node_turns_red(&c, &mut b, &web, &shots)?;

    b.navigate(&format!("{web}/#/"))?;
    b.wait_for(
        "document.querySelectorAll('#jobs tr[data-job]').length === 2",
        Duration::from_secs(20),
    )?;
    b.screenshot(&shots.join("cluster.png"))?;
    b.drain()?;
    ensure!(
        b.errors().is_empty(),
        "the dashboard logged errors: {:#?}",
        b.errors()
    );
    b.close()?;
    metrics_counted_the_runs(&c)?;
    c.down()?;
    Ok(())
}

/// Without a token: the dashboard sends the browser to /login, its API and /metrics
/// answer 401, and a wrong token is refused.
fn refused_without_a_token(c: &Cluster) -> anyhow::Result<()> {
    let web = c.web_url();
    let (code, _) = curl(c, &[&format!("{web}/")])?;
    ensure!(code == 303, "/ without a session: {code}");
    for path in [
        "/api/cluster",
        "/api/jobs",
        "/api/jobs/mxnet-ps",
        "/metrics",
    ] {
        let (code, body) = curl(c, &[&format!("{web}{path}")])?;
        ensure!(code == 401, "{path} without a token: {code} {body}");
    }
    let (code, body) = curl(
        c,
        &[
            "-d",
            "token=not-the-token-0123456789",
            &format!("{web}/login"),
        ],
    )?;
    ensure!(
        code == 401 && body.contains("invalid"),
        "a wrong token: {code} {body}"
    );
    let (code, _) = curl(
        c,
        &[
            "-H",
            &format!("Authorization: Bearer {}", c.token()),
            &format!("{web}/api/jobs"),
        ],
    )?;
    ensure!(code == 200, "/api/jobs with the token: {code}");
    Ok(())
}

/// A job whose first worker exits 3 at once: its page shows that node red with the reason
/// the controller gives.
fn failed_node_turns_red(
    c: &Cluster,
    b: &mut Browser,
    web: &str,
    shots: &std::path::Path,
) -> anyhow::Result<()> {
    let job = r#"
name = "mxnet-fails"
mode = "ps"
image = "geomx/mxnet:1.9.1"
network = "routed"

[command]
scheduler = ["python3", "-c", "import mxnet"]
server = ["python3", "-c", "import mxnet"]
worker = ["sh", "-c", "if [ {slice} = 0 ]; then echo 'bad input: cannot read the data slice' >&2; exit 3; fi; exec python3 -c 'import mxnet'"]

[[party]]
name = "ps"
hosts = ["a", "b"]
workers = 2
servers = 1
scheduler_port = 9092
"#;
    c.submit_ok("mxnet-fails.toml", job)?;
    b.navigate(&format!("{web}/#/jobs/mxnet-fails"))?;
    let reason = b
        .wait_for(
            "(() => { const n = document.querySelector('.topology .node[data-state=failed]');              return n && document.querySelector('#job-header .phase-failed') ?              n.dataset.node + ' | ' + getComputedStyle(n).backgroundColor + ' | ' + n.querySelector('.node-reason').textContent : null })()",
            Duration::from_secs(90),
        )
        .context("the failed worker turns red with its reason")?;
    let reason = reason.as_str().unwrap_or_default().to_owned();
    let parts: Vec<&str> = reason.split(" | ").collect();
    ensure!(parts.len() == 3, "{reason}");
    let job = c.job("mxnet-fails")?;
    ensure!(job["phase"] == "Failed", "{job}");
    let failed = job["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == parts[0])
        .with_context(|| format!("the page's failed node {} is not in {job}", parts[0]))?;
    ensure!(failed["exit_code"] == 3, "{failed}");
    // red: the node's background is the failure colour (#ffebe9)
    ensure!(parts[1] == "rgb(255, 235, 233)", "not red: {reason}");
    ensure!(
        parts[2].contains('3'),
        "the reason names the exit code: {reason}"
    );
    ensure!(
        job["reason"].as_str().is_some_and(|r| r.contains(parts[0])),
        "the job's reason names the node the page shows red: {job}"
    );
    b.screenshot(&shots.join("job-failed.png"))?;
    Ok(())
}

/// `/metrics` (with the lab token) counted both runs: two submissions, one success, one
/// failure.
fn metrics_counted_the_runs(c: &Cluster) -> anyhow::Result<()> {
    let (code, body) = curl(
        c,
        &[
            "-H",
            &format!("Authorization: Bearer {}", c.token()),
            &format!("{}/metrics", c.web_url()),
        ],
    )?;
    ensure!(code == 200, "/metrics: {code} {body}");
    let value = |name: &str| scrape(&body, name);
    ensure!(value("geomx_job_submissions_total") == Some(2.0), "{body}");
    ensure!(value("geomx_job_successes_total") == Some(1.0), "{body}");
    ensure!(value("geomx_job_failures_total") == Some(1.0), "{body}");
    Ok(())
}
