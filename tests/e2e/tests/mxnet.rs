//! Real training: examples/mxnet-ps.toml on the MXNet 1.9.1 image (scripts/build-mxnet-image.sh)
//! across two data centers of the geo-distributed lab (a WAN link of 40 ms one way and 0.1 %
//! loss), kvstore dist_sync over WireGuard between the hosts' container networks, on
//! scikit-learn's handwritten digits.
//!
//! Needs the image's root file system tarball: `scripts/build-mxnet-image.sh` (the README's
//! test command builds it), or `GEOMX_MXNET_TAR=/path/to/tar`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
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
    c.down()?;
    Ok(())
}
