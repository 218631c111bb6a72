//! geomx on real hosts (issue 12): a booted lab (every host and the controller a systemd
//! machine with its own journald and docker.service), geomx installed from its Debian
//! packages with `apt-get install ./*.deb` and started with `systemctl enable --now` as
//! docs/deploy.md says. One lab for the whole binary; the scenarios run one after the other
//! in a single test, as a user would try them on a host:
//!
//! 1. the units: `Type=notify` (`systemctl restart` returns with the agent ready), active;
//! 2. the HiPS reference job (examples/hips.toml) end to end;
//! 3. logs in the journal with structured fields (`journalctl -u geomx-agent JOB=...`);
//! 4. `kill -9` of the agent: systemd restarts it, no role container restarts;
//! 5. `systemctl stop geomx-agent`: containers, routes and rules stay;
//! 6. a newer package: the agent restarts on the new binary, no container restarts, the
//!    admin's configuration edits survive;
//! 7. `systemctl restart docker`: bip, routes and rules as before;
//! 8. a reboot (power off, boot): the agent is ready before Docker's first start, docker0
//!    has the leased subnet, routes are back, the host is ready again, the running job's
//!    containers come back (restarted as a gang: `restart = "on-failure"`) and it runs jobs.
//!
//! Needs the binaries (`cargo build --workspace --bins`) and the booted hosts' root file
//! system (`scripts/build-host-rootfs.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::{Binaries, Cluster, ClusterSpec, Lab, LabSpec, Machine, Packages};
use serde_json::Value;

/// The version the packages are first built as, and the "newer" one of the upgrade.
const VERSION: &str = env!("CARGO_PKG_VERSION");
fn newer_version() -> String {
    format!("{VERSION}+upgrade1")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `scripts/package.sh` for `version` from the binaries the tests run.
fn package(bins: &Binaries, out: &Path, version: &str) -> anyhow::Result<Packages> {
    let bin_dir = bins.agent.parent().context("the agent's directory")?;
    let status = Command::new(repo().join("scripts/package.sh"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .args(["--compress", "none", "--version", version, "--out"])
        .arg(out)
        .status()
        .context("scripts/package.sh")?;
    ensure!(
        status.success(),
        "scripts/package.sh --version {version}: {status}"
    );
    Ok(Packages::in_dir(out, version)?)
}

fn sh(m: &Machine, script: &str) -> anyhow::Result<String> {
    Ok(m.run(&["sh", "-c", script])?)
}

/// `systemctl show -p P1,P2 UNIT` as (property, value) pairs in the order asked.
fn show(m: &Machine, unit: &str, props: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = m.run(&["systemctl", "show", unit, "-p", &props.join(",")])?;
    props
        .iter()
        .map(|p| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{p}=")))
                .map(str::to_string)
                .with_context(|| format!("{unit} has no {p}: {out}"))
        })
        .collect()
}

/// Every geomx container on the machine with its start time and restart count.
fn containers(m: &Machine) -> anyhow::Result<Vec<String>> {
    let ids = m.run(&[
        "docker",
        "ps",
        "-q",
        "--filter",
        "label=io.geomx.managed=true",
    ])?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut argv = vec![
        "docker",
        "inspect",
        "-f",
        "{{.Name}} {{.State.StartedAt}} {{.RestartCount}}",
    ];
    argv.extend(ids);
    let mut v: Vec<String> = m.run(&argv)?.lines().map(str::to_string).collect();
    v.sort();
    Ok(v)
}

/// What geomx owns in the machine's kernel: its routes and every iptables line that names
/// a GEOMX chain (docker0's address aside).
fn network(m: &Machine) -> anyhow::Result<(String, Vec<String>, Vec<String>)> {
    let docker0 = sh(m, "ip -4 -o addr show dev docker0 | awk '{print $4}'")?
        .trim()
        .to_string();
    let routes = sh(m, "ip route show proto 247")?
        .lines()
        .map(str::to_string)
        .collect();
    let rules = sh(m, "iptables-save")?
        .lines()
        .filter(|l| l.contains("GEOMX") && !l.starts_with('#'))
        .map(|l| {
            // counters differ from one save to the next
            l.split_once("] ")
                .filter(|_| l.starts_with(':'))
                .map_or(l, |(chain, _)| chain)
                .to_string()
        })
        .collect();
    Ok((docker0, routes, rules))
}

fn host_json(c: &Cluster, name: &str) -> Option<Value> {
    c.hosts().ok()?.into_iter().find(|h| h["name"] == name)
}

#[test]
fn geomx_under_systemd_from_packages() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let bins = Binaries::find()?;
    let lab = Lab::up(LabSpec::for_test().seed_hosts().boot(true))?;
    let debs = lab.dir().join("debs");
    let first = package(&bins, &debs, VERSION)?;
    let newer = package(&bins, &debs, &newer_version())?;
    let c = Cluster::up_booted(
        lab,
        ClusterSpec {
            seed_subnets: true,
            ..ClusterSpec::default()
        },
        bins,
        &first,
    )?;
    let machine = |h: &str| -> anyhow::Result<Machine> { Ok(c.lab().host(h)?.machine()?.clone()) };
    let (a, b) = (machine("a")?, machine("b")?);
    let ctl = c.lab().controller_machine().context("controller machine")?;

    // ---- 1. the units as shipped
    for h in ["a", "b", "c"] {
        let m = machine(h)?;
        let v = show(&m, "geomx-agent", &["Type", "ActiveState", "FragmentPath"])?;
        ensure!(
            v[0] == "notify"
                && v[1] == "active"
                && v[2].ends_with("/lib/systemd/system/geomx-agent.service"),
            "geomx-agent on {h} (the packaged unit): {v:?}"
        );
    }
    let v = show(&ctl, "geomx-controller", &["Type", "ActiveState"])?;
    ensure!(v == ["notify", "active"], "geomx-controller: {v:?}");
    // Type=notify: `systemctl restart` returns once the new agent said READY=1
    let before = show(&a, "geomx-agent", &["MainPID"])?;
    a.run(&["systemctl", "restart", "geomx-agent"])?;
    let after = show(&a, "geomx-agent", &["MainPID", "ActiveState", "SubState"])?;
    ensure!(
        after[0] != before[0] && after[1] == "active" && after[2] == "running",
        "right after systemctl restart: {after:?} (before: {before:?})"
    );
    let ready = sh(&a, "journalctl -u geomx-agent -o cat --no-pager -n 200")?;
    ensure!(
        ready.contains("READY=1"),
        "the agent's journal has no readiness line:\n{ready}"
    );

    // ---- 2. the HiPS reference job
    let hips = std::fs::read_to_string(repo().join("examples/hips.toml"))?;
    c.submit_ok("hips.toml", &hips)?;
    let job = c.wait_phase("hips-mnist", "Succeeded", Duration::from_secs(120))?;
    eprintln!("HiPS under systemd: {}", job["reason"]);

    // ---- 3. the journal's structured fields
    let lines = sh(
        &b,
        "journalctl -u geomx-agent -o json --no-pager JOB=hips-mnist",
    )?;
    let entries: Vec<Value> = lines
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("journalctl -o json")?;
    ensure!(
        !entries.is_empty()
            && entries
                .iter()
                .all(|e| e["JOB"] == "hips-mnist" && e["HOST"] == "b")
            && entries.iter().any(|e| e["NODE"].is_string()),
        "journalctl -u geomx-agent JOB=hips-mnist on b: {lines}"
    );

    // ---- 4. kill -9 of the agent during a job
    let long = geomx_lab::jobfile::ps_job(
        "long",
        &["a", "b"],
        2,
        "PSNODE_INTERVAL = \"100ms\", PSNODE_ITERATIONS = \"100000\"",
        "",
    );
    c.submit_ok("long.toml", &long)?;
    c.wait_phase("long", "Running", Duration::from_secs(60))?;
    let on_b = containers(&b)?;
    ensure!(!on_b.is_empty(), "no role container on b");
    let v = show(&b, "geomx-agent", &["MainPID", "NRestarts"])?;
    b.run(&["kill", "-9", &v[0]])?;
    eventually(
        "systemd to restart the killed agent",
        Duration::from_secs(20),
        || {
            let now = show(&b, "geomx-agent", &["MainPID", "NRestarts", "ActiveState"]).ok()?;
            (now[0] != v[0] && now[1] != v[1] && now[2] == "active").then_some(())
        },
    )?;
    ensure!(
        containers(&b)? == on_b,
        "containers changed across the agent's kill -9"
    );
    ensure!(
        c.job("long")?["phase"] == "Running",
        "job long after kill -9"
    );

    // ---- 5. systemctl stop: nothing of the host's goes
    let net_b = network(&b)?;
    ensure!(
        net_b.0 == "172.17.29.1/24" && net_b.1.len() == 2 && !net_b.2.is_empty(),
        "b's network: {net_b:?}"
    );
    b.run(&["systemctl", "stop", "geomx-agent"])?;
    ensure!(show(&b, "geomx-agent", &["ActiveState"])? == ["inactive"]);
    ensure!(network(&b)? == net_b, "b's network after systemctl stop");
    ensure!(containers(&b)? == on_b, "containers after systemctl stop");
    b.run(&["systemctl", "start", "geomx-agent"])?;

    // ---- 6. a newer package
    sh(
        &b,
        "echo '# the admin was here' >> /etc/geomx/agent.toml && \
         echo '# and here' >> /etc/geomx/agent.toml.example",
    )?;
    let pid = show(&b, "geomx-agent", &["MainPID"])?;
    Cluster::install_packages(&b, &[&newer.agent])?;
    let now = show(&b, "geomx-agent", &["MainPID", "ActiveState"])?;
    ensure!(
        now[0] != pid[0] && now[1] == "active",
        "after the upgrade: {now:?} (before {pid:?})"
    );
    let version = b.run(&["dpkg-query", "-W", "-f", "${Version}", "geomx-agent"])?;
    ensure!(version == newer_version(), "installed: {version}");
    let kept = sh(
        &b,
        "tail -n 1 /etc/geomx/agent.toml; tail -n 1 /etc/geomx/agent.toml.example",
    )?;
    ensure!(
        kept == "# the admin was here\n# and here\n",
        "configuration after the upgrade: {kept}"
    );
    ensure!(containers(&b)? == on_b, "containers after the upgrade");
    c.wait_hosts_ready(&["b".to_string()], Duration::from_secs(30))?;
    ensure!(
        c.job("long")?["phase"] == "Running",
        "job long after the upgrade"
    );
    let out = c.ctl(&["cancel", "long"])?;
    ensure!(out.status.success(), "cancel long");
    c.wait_phase("long", "Cancelled", Duration::from_secs(60))?;

    // ---- 7. systemctl restart docker
    let net_b = network(&b)?;
    b.run(&["systemctl", "restart", "docker"])?;
    eventually(
        "b's bip, routes and rules after a Docker restart",
        Duration::from_secs(30),
        || (network(&b).ok()? == net_b).then_some(()),
    )?;

    // ---- 8. a reboot, with a job running that restarts on failure
    let survivor = geomx_lab::jobfile::ps_job(
        "survivor",
        &["a", "b"],
        2,
        "PSNODE_INTERVAL = \"100ms\", PSNODE_ITERATIONS = \"100000\"",
        "restart = \"on-failure\"\nmax_restarts = 3",
    );
    c.submit_ok("survivor.toml", &survivor)?;
    c.wait_phase("survivor", "Running", Duration::from_secs(60))?;
    let before_reboot = containers(&b)?;
    ensure!(!before_reboot.is_empty(), "no container of survivor on b");
    b.poweroff(Duration::from_secs(30))?;
    b.boot(Duration::from_secs(90))?;
    let agent_up = show(&b, "geomx-agent", &["ActiveEnterTimestampMonotonic"])?;
    let docker_up = show(&b, "docker", &["InactiveExitTimestampMonotonic"])?;
    let (agent_up, docker_up): (u64, u64) = (agent_up[0].parse()?, docker_up[0].parse()?);
    ensure!(
        agent_up > 0 && agent_up <= docker_up,
        "after the reboot the agent was ready at {agent_up} µs, Docker started at {docker_up} µs"
    );
    c.wait_hosts_ready(&["b".to_string()], Duration::from_secs(60))?;
    eventually(
        "b's network after the reboot",
        Duration::from_secs(30),
        || {
            let (docker0, routes, rules) = network(&b).ok()?;
            (docker0 == net_b.0 && routes == net_b.1 && !rules.is_empty()).then_some(())
        },
    )?;
    let hb = host_json(&c, "b").context("host b")?;
    ensure!(hb["state"] == "ready", "b after the reboot: {hb}");
    // the job's containers come back: the worker Docker stopped at the shutdown (psnode
    // exits 0 on SIGTERM) is no finished worker, the job restarts as a gang and runs on b
    let back = eventually(
        "survivor running again on b after the reboot",
        Duration::from_secs(90),
        || {
            let job = c.job("survivor").ok()?;
            let now = containers(&b).ok()?;
            (job["phase"] == "Running"
                && job["restarts"].as_u64().is_some_and(|r| r >= 1)
                && now.len() == before_reboot.len()
                && now.iter().all(|c| !before_reboot.contains(c)))
            .then_some(job)
        },
    )?;
    let restarting: Vec<String> = c.ctl_json(&["events", "survivor"])?["events"]
        .as_array()
        .context("survivor's events")?
        .iter()
        .filter(|e| e["kind"] == "Restarting" || e["kind"] == "NodeFailed")
        .map(|e| e["message"].to_string())
        .collect();
    eprintln!(
        "survivor after the reboot: restarts {}, {restarting:?}",
        back["restarts"]
    );
    ensure!(
        !restarting.iter().any(|m| m.contains("finished")),
        "a worker stopped by the shutdown counted as finished: {restarting:?}"
    );
    let out = c.ctl(&["cancel", "survivor"])?;
    ensure!(out.status.success(), "cancel survivor");
    c.wait_phase("survivor", "Cancelled", Duration::from_secs(60))?;
    let again = geomx_lab::jobfile::ps_job(
        "again",
        &["a", "b"],
        2,
        "PSNODE_INTERVAL = \"20ms\", PSNODE_ITERATIONS = \"20\"",
        "",
    );
    c.submit_ok("again.toml", &again)?;
    c.wait_phase("again", "Succeeded", Duration::from_secs(90))?;
    c.down()?;
    Ok(())
}
