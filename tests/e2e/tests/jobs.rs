//! Jobs end to end in a lab: `geomxctl submit` against the real controller, agents starting
//! role containers in three dockerds, the test image (geomx-psnode) standing in for GeoMX.
//!
//! Needs the binaries: `cargo build --workspace --bins` before `cargo test`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use geomx_e2e::browser::{Browser, artifacts_dir, curl_in, scrape};
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::Cluster;
use serde_json::Value;

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn cluster() -> anyhow::Result<Cluster> {
    geomx_e2e::seed_cluster()
}

fn nodes(job: &Value) -> Vec<Value> {
    job["nodes"].as_array().cloned().unwrap_or_default()
}

fn node<'j>(job: &'j Value, name: &str) -> Option<&'j Value> {
    job["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

/// Waits until no geomx container (role or sandbox) is left on any host.
fn assert_no_containers_within(c: &Cluster, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    eventually("every geomx container removed", timeout, || {
        c.lab()
            .hosts()
            .iter()
            .all(|h| c.geomx_containers(&h.name).is_ok_and(|v| v.is_empty()))
            .then_some(())
    })?;
    Ok(start.elapsed())
}

fn logs(c: &Cluster, job: &str, node: &str) -> anyhow::Result<String> {
    let out = c.ctl(&["logs", job, node])?;
    ensure!(
        out.status.success(),
        "geomxctl logs {job} {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn events(c: &Cluster, job: &str) -> anyhow::Result<Vec<Value>> {
    Ok(c.ctl_json(&["events", job])?["events"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A small single-party job (mode ps) on hosts b and c with extra worker env.
fn small_job(name: &str, worker_env: &str, policy: &str) -> String {
    let env = format!("PSNODE_INTERVAL = \"100ms\", {worker_env}");
    geomx_lab::jobfile::ps_job(name, &["b", "c"], 2, &env, policy)
}

#[test]
fn hips_example_runs_across_three_hosts_to_success() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster()?;
    let file = repo_file("examples/hips.toml");
    let out = c.ctl(&["submit", "--detach", &file.display().to_string()])?;
    ensure!(
        out.status.success(),
        "submit refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // every one of the 12 nodes runs, on the host the job file names, with an IP of that
    // host's subnet
    let job = c.wait_phase("hips-mnist", "Running", Duration::from_secs(90))?;
    let ns = nodes(&job);
    ensure!(ns.len() == 12, "{} nodes: {job}", ns.len());
    let hosts = c.hosts()?;
    let subnet_of = |h: &str| -> Option<ipnet::Ipv4Net> {
        hosts
            .iter()
            .find(|x| x["name"] == h)
            .and_then(|x| x["subnet"].as_str()?.parse().ok())
    };
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for n in &ns {
        let host = n["host"].as_str().unwrap_or_default();
        *per_host.entry(host.to_string()).or_default() += 1;
        let ip: std::net::Ipv4Addr = n["ip"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("node {n}"))?;
        let subnet = subnet_of(host).context("host subnet")?;
        ensure!(
            subnet.contains(&ip),
            "{} has ip {ip} outside {host}'s {subnet}",
            n["name"]
        );
    }
    ensure!(
        per_host == BTreeMap::from([("a".into(), 4), ("b".into(), 4), ("c".into(), 4)]),
        "nodes per host: {per_host:?}"
    );

    // the schedulers saw exactly the registrations the counts promise (so counts and
    // routing are right): read through the agents' log API
    for (sched, want) in [
        ("global-scheduler", "complete: servers=1 workers=2"),
        ("central-scheduler", "complete: servers=1 workers=1"),
        ("a-scheduler", "complete: servers=1 workers=2"),
        ("b-scheduler", "complete: servers=1 workers=2"),
    ] {
        let text = eventually(
            &format!("{sched} complete"),
            Duration::from_secs(20),
            || {
                logs(&c, "hips-mnist", sched)
                    .ok()
                    .filter(|t| t.contains(want))
            },
        )
        .with_context(|| format!("{sched} log: {:?}", logs(&c, "hips-mnist", sched)))?;
        let ip = node(&job, sched)
            .and_then(|n| n["ip"].as_str())
            .unwrap_or_default();
        ensure!(
            text.contains(ip),
            "{sched} did not bind its own IP {ip}: {text}"
        );
    }

    hips_topology_on_the_dashboard(&c, &job)?;
    agents_count_their_containers(&c)?;

    // status shows progress of the training workers, then the job succeeds
    c.wait_job(
        "hips-mnist",
        Duration::from_secs(30),
        "worker progress",
        |j| node(j, "a-worker-0").is_some_and(|n| n["progress"]["iteration"].as_u64() > Some(2)),
    )?;
    let table = c.ctl(&["status", "hips-mnist"])?;
    let table = String::from_utf8_lossy(&table.stdout);
    ensure!(
        table.contains("a-worker-0") && table.contains("ITER"),
        "status table: {table}"
    );
    let done = c.wait_phase("hips-mnist", "Succeeded", Duration::from_secs(90))?;
    for w in ["a-worker-0", "a-worker-1", "b-worker-0", "b-worker-1"] {
        let n = node(&done, w).context(w)?;
        ensure!(n["exit_code"] == 0, "{w}: {n}");
        ensure!(
            n["progress"]["iteration"].as_u64() == Some(20),
            "{w} progress: {n}"
        );
    }
    let kinds: Vec<String> = events(&c, "hips-mnist")?
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect();
    for k in ["Submitted", "Running", "Succeeded"] {
        ensure!(kinds.iter().any(|x| x == k), "no {k} event in {kinds:?}");
    }
    assert_no_containers_within(&c, Duration::from_secs(10))?;
    c.down()?;
    Ok(())
}

/// The dashboard's job page draws the HiPS hierarchy: the global tier (global scheduler,
/// global server and the central party) above the parties a and b, each with its scheduler,
/// server and workers, every node with its host and IP; a click on a node shows its output.
fn hips_topology_on_the_dashboard(c: &Cluster, job: &Value) -> anyhow::Result<()> {
    let web = c.web_url();
    let mut b = Browser::logged_in(c)?;
    b.navigate(&format!("{web}/#/jobs/hips-mnist"))?;
    b.wait_for(
        "document.querySelectorAll('.topology .node').length === 12",
        Duration::from_secs(20),
    )
    .context("the job page shows the 12 nodes")?;
    // where each node is drawn: "tier > party > role box"
    let placed = b.eval(
        "JSON.stringify([...document.querySelectorAll('.topology .node')].map(n => [n.dataset.node, \
         n.closest('.global') ? 'global' : 'parties', \
         (n.closest('.party') || {dataset: {}}).dataset.party || '-', \
         n.querySelector('.node-meta').textContent]))",
    )?;
    let placed: Vec<(String, String, String, String)> =
        serde_json::from_str(placed.as_str().unwrap_or("[]"))?;
    for n in nodes(job) {
        let name = n["name"].as_str().unwrap_or_default();
        let role = n["role"].as_str().unwrap_or_default();
        let party = n["party"].as_str().unwrap_or_default();
        let (_, tier, drawn_party, meta) = placed
            .iter()
            .find(|p| p.0 == name)
            .with_context(|| format!("{name} is not drawn: {placed:?}"))?;
        let want_tier = if role.starts_with("global_") || party == "central" {
            "global"
        } else {
            "parties"
        };
        ensure!(
            tier == want_tier,
            "{name} ({role}, party {party}) drawn in {tier}"
        );
        if !role.starts_with("global_") {
            ensure!(
                drawn_party == party,
                "{name} drawn in party {drawn_party}, is in {party}"
            );
        }
        for part in [n["host"].as_str(), n["ip"].as_str()].into_iter().flatten() {
            ensure!(meta.contains(part), "{name}'s box {meta:?} lacks {part}");
        }
    }
    let parties = b.eval(
        "[...document.querySelectorAll('.parties > .party')].map(p => p.dataset.party).join(',')",
    )?;
    ensure!(
        parties == "a,b",
        "party boxes under the global tier: {parties}"
    );
    b.screenshot(&artifacts_dir().join("dashboard/hips-topology.png"))?;
    // a node's output on a click
    b.eval("document.querySelector('.node[data-node=\"a-scheduler\"]').click(); true")?;
    b.wait_for(
        "(document.querySelector('pre.logs[data-node=\"a-scheduler\"]') || {textContent: ''}).textContent.includes('complete')",
        Duration::from_secs(20),
    )
    .context("a click on a node shows its log tail")?;
    b.drain()?;
    ensure!(b.errors().is_empty(), "dashboard errors: {:#?}", b.errors());
    b.close()
}

/// Every agent's `/metrics` (plain HTTP on 127.0.0.1:7950 in its host) counts the role
/// containers it started (4 per host in the HiPS example) and reports its version.
fn agents_count_their_containers(c: &Cluster) -> anyhow::Result<()> {
    for h in ["a", "b", "c"] {
        let netns = c.lab().host(h)?.netns().clone();
        let (code, body) = curl_in(&netns, None, &["http://127.0.0.1:7950/metrics"])?;
        ensure!(code == 200, "agent {h} /metrics: {code} {body}");
        let starts = scrape(&body, "geomx_agent_container_starts_total");
        ensure!(
            starts.is_some_and(|n| n >= 4.0),
            "agent {h} started 4 role containers, its metrics say {starts:?}:\n{body}"
        );
        ensure!(scrape(&body, "geomx_agent_info") == Some(1.0), "{body}");
        let passes = scrape(&body, "geomx_agent_network_passes_total");
        ensure!(
            passes.is_some_and(|n| n >= 1.0),
            "agent {h} network passes: {passes:?}"
        );
    }
    Ok(())
}

#[test]
fn failures_are_detected_reported_and_cleaned_up() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster()?;

    // refused before anything starts
    let unknown = small_job("unknown-host", "PSNODE_ITERATIONS = \"5\"", "")
        .replace(r#"hosts = ["b", "c"]"#, r#"hosts = ["b", "zz"]"#);
    // a job that may not pull an image its hosts lack (a pulling one is registry.rs's)
    let no_image = small_job("no-image", "PSNODE_ITERATIONS = \"5\"", "").replace(
        "image = \"lizonghango00o1/geomx:cpu-only\"",
        "image = \"geomx-test/absent:1\"\nimage_pull = \"never\"",
    );
    for (file, text, want) in [
        ("unknown.toml", unknown, "zz"),
        ("noimage.toml", no_image, "geomx-test/absent:1"),
    ] {
        let out = c.submit_text(file, &text)?;
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.code() == Some(2),
            "{file} not refused with exit 2: {msg}"
        );
        ensure!(
            msg.contains(want),
            "{file}: the refusal does not name {want}: {msg}"
        );
    }
    // a pseudo job whose scheduler port is taken on its host
    let listener = c.lab().spawn(
        c.lab().host("a")?.netns(),
        "port-9300",
        &[
            "busybox".into(),
            "nc".into(),
            "-l".into(),
            "-p".into(),
            "9300".into(),
        ],
        &[],
    )?;
    let pseudo = r#"name = "pseudo-taken"
mode = "ps"
image = "lizonghango00o1/geomx:cpu-only"
network = "pseudo"
[[party]]
name = "p"
hosts = ["a"]
workers = 1
scheduler_port = 9300
"#;
    // the agent reports its host's listening ports with every heartbeat (500 ms here)
    std::thread::sleep(Duration::from_millis(1500));
    let out = c.submit_text("pseudo.toml", pseudo)?;
    let msg =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(2),
        "a pseudo job on a taken port was accepted: {msg}"
    );
    ensure!(
        msg.contains("9300"),
        "the refusal does not name the port: {msg}"
    );
    listener.kill9()?;
    for h in ["a", "b", "c"] {
        ensure!(
            c.geomx_containers(h)?.is_empty(),
            "a refused job left containers on {h}"
        );
    }

    // a crashing worker fails the job within 2 s, with node, host, exit code and log tail,
    // and every container of the job goes away
    c.submit_ok(
        "crash.toml",
        &small_job(
            "crash",
            "PSNODE_CRASH_AFTER = \"5\", PSNODE_ITERATIONS = \"50\"",
            "",
        ),
    )?;
    let failed = c.wait_phase("crash", "Failed", Duration::from_secs(60))?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    let crashed = nodes(&failed)
        .into_iter()
        .filter(|n| n["exit_code"] == 3)
        .min_by_key(|n| n["finished_at_ms"].as_i64())
        .context("no node exited with 3")?;
    let crashed_name = crashed["name"].as_str().unwrap_or_default();
    let host = crashed["host"].as_str().unwrap_or_default();
    for part in [crashed_name, host, "3"] {
        ensure!(
            reason.contains(part),
            "reason {reason:?} does not name {part}"
        );
    }
    ensure!(
        reason.contains("crash") || reason.contains("iteration"),
        "no log tail in the reason: {reason:?}"
    );
    let detect_ms = failed["finished_at_ms"].as_i64().unwrap_or_default()
        - crashed["finished_at_ms"].as_i64().unwrap_or_default();
    eprintln!("crash_detect_ms={detect_ms}");
    ensure!(detect_ms <= 2000, "Failed {detect_ms} ms after the crash");
    ensure!(
        events(&c, "crash")?
            .iter()
            .any(|e| e["kind"] == "NodeFailed" || e["kind"] == "Failed"),
        "no failure event"
    );
    assert_no_containers_within(&c, Duration::from_secs(5))?;

    // restart = "on-failure": restarted as a whole, restarts counted, then Failed
    c.submit_ok(
        "restart.toml",
        &small_job(
            "restart",
            "PSNODE_CRASH_AFTER = \"3\"",
            "restart = \"on-failure\"\nmax_restarts = 1",
        ),
    )?;
    let failed = c.wait_phase("restart", "Failed", Duration::from_secs(90))?;
    ensure!(
        failed["restarts"] == 1 && failed["generation"] == 1,
        "restart: {failed}"
    );
    ensure!(
        events(&c, "restart")?
            .iter()
            .any(|e| e["kind"] == "Restarting"),
        "no Restarting event"
    );
    assert_no_containers_within(&c, Duration::from_secs(5))?;
    // every generation's output is kept: the crash of each attempt
    for generation in ["0", "1"] {
        let mut crashes = 0;
        for node in ["p-scheduler", "p-server-0", "p-worker-0", "p-worker-1"] {
            let out = c.ctl(&["logs", "restart", node, "--generation", generation])?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                out.status.success() && text.contains("psnode"),
                "logs of {node}, generation {generation}: {text:?}"
            );
            if text.contains("simulated crash after 3 iterations") {
                crashes += 1;
            }
        }
        ensure!(
            crashes > 0,
            "no crash in the output of generation {generation}"
        );
    }

    // a worker that hangs without progress: Failed as stalled after stall_timeout
    c.submit_ok(
        "stall.toml",
        &small_job(
            "stall",
            "PSNODE_HANG_AFTER = \"2\"",
            "stall_timeout = \"10s\"",
        ),
    )?;
    c.wait_phase("stall", "Running", Duration::from_secs(60))?;
    let failed = c.wait_phase("stall", "Failed", Duration::from_secs(40))?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("stall"),
        "not failed as stalled: {reason:?}"
    );
    assert_no_containers_within(&c, Duration::from_secs(5))?;

    // cancel removes every container within 5 s
    c.submit_ok(
        "cancel.toml",
        &small_job("cancel", "PSNODE_ITERATIONS = \"100000\"", ""),
    )?;
    // (once every worker trains, so that each node has printed its part)
    c.wait_job(
        "cancel",
        Duration::from_secs(60),
        "every worker training",
        |j| {
            j["phase"] == "Running"
                && ["p-worker-0", "p-worker-1"].iter().all(|w| {
                    node(j, w).is_some_and(|n| n["progress"]["iteration"].as_u64() >= Some(1))
                })
        },
    )?;
    let out = c.ctl(&["cancel", "cancel"])?;
    ensure!(
        out.status.success(),
        "cancel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = assert_no_containers_within(&c, Duration::from_secs(5))?;
    eprintln!("cancel_cleanup_ms={}", took.as_millis());
    let cancelled = c.job("cancel")?;
    ensure!(cancelled["phase"] == "Cancelled", "{cancelled}");
    // the output of every node outlives the cancelled job's containers, and goes with rm
    let names: Vec<String> = nodes(&cancelled)
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect();
    ensure!(names.len() == 4, "{cancelled}");
    for name in &names {
        let text = logs(&c, "cancel", name)?;
        let mut want = vec![if name.ends_with("scheduler") {
            "psnode scheduler ".to_string()
        } else {
            format!("({name}): listening")
        }];
        if name.contains("-worker-") {
            want.push("Start training on".into());
            want.push("][Iteration 1] Test Acc".into());
        }
        for w in &want {
            ensure!(
                text.contains(w.as_str()),
                "logs of {name} after cancel lack {w:?}: {text:?}"
            );
        }
    }
    let out = c.ctl(&["rm", "cancel"])?;
    ensure!(
        out.status.success(),
        "rm cancel: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in &names {
        let out = c.ctl(&["logs", "cancel", name])?;
        ensure!(
            out.status.code() == Some(2),
            "logs of {name} after rm: {out:?}"
        );
    }

    // a host cut off mid-job: the job fails and says which host was lost
    c.submit_ok(
        "lost.toml",
        &small_job("lost", "PSNODE_ITERATIONS = \"100000\"", ""),
    )?;
    c.wait_phase("lost", "Running", Duration::from_secs(60))?;
    c.lab().cut_link("c")?;
    let failed = c.wait_phase("lost", "Failed", Duration::from_secs(15))?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("host c") || reason.contains("\"c\""),
        "reason does not name host c: {reason:?}"
    );
    // and a job naming the lost host is refused
    let out = c.submit_text(
        "lost2.toml",
        &small_job("lost2", "PSNODE_ITERATIONS = \"5\"", ""),
    )?;
    ensure!(
        out.status.code() == Some(2),
        "a job on a lost host was accepted"
    );
    c.lab().restore_link("c")?;
    c.down()?;
    Ok(())
}

#[test]
fn jobs_survive_agent_and_controller_kill9() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster()?;
    c.submit_ok(
        "long.toml",
        &small_job("long", "PSNODE_ITERATIONS = \"150\"", "")
            .replace(r#"hosts = ["b", "c"]"#, r#"hosts = ["a", "b"]"#),
    )?;
    c.wait_phase("long", "Running", Duration::from_secs(60))?;
    let ids = |h: &str| -> anyhow::Result<String> {
        let d = c.lab().host(h)?.dockerd()?;
        Ok(d.docker(&[
            "ps",
            "--filter",
            "label=io.geomx.managed=true",
            "--format",
            "{{.ID}} {{.Names}} {{.RunningFor}}",
        ])?
        .lines()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n"))
    };
    let before = (ids("a")?, ids("b")?);

    // kill -9 of an agent: it adopts the running containers (none restarted), job goes on
    c.agent("b").kill9()?;
    c.start_agent("b")?;
    c.wait_hosts_ready(&["b".into()], Duration::from_secs(30))?;
    let it = |j: &Value| {
        nodes(j)
            .iter()
            .filter_map(|n| n["progress"]["iteration"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let at = it(&c.job("long")?);
    c.wait_job(
        "long",
        Duration::from_secs(20),
        "progress after the agent restart",
        |j| j["phase"] == "Running" && it(j) > at,
    )?;
    ensure!(
        (ids("a")?, ids("b")?) == before,
        "containers changed across the agent restart"
    );

    // kill -9 of the controller: after its restart the job is still Running with every node
    c.controller().kill9()?;
    c.start_controller()?;
    let job = c.wait_job(
        "long",
        Duration::from_secs(20),
        "Running after the controller restart",
        |j| j["phase"] == "Running" && j["running_nodes"] == 4,
    )?;
    ensure!(job["restarts"] == 0, "{job}");
    ensure!(
        (ids("a")?, ids("b")?) == before,
        "containers changed across the controller restart"
    );
    c.wait_phase("long", "Succeeded", Duration::from_secs(90))?;
    assert_no_containers_within(&c, Duration::from_secs(10))?;
    c.down()?;
    Ok(())
}

#[test]
fn pseudo_example_runs_on_one_host_with_host_networking() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster()?;
    let file = repo_file("examples/pseudo-hips.toml");
    let out = c.ctl(&["submit", &file.display().to_string()])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "submit (followed to the end) failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = c.job("pseudo-hips")?;
    ensure!(job["phase"] == "Succeeded", "{job}");
    ensure!(
        nodes(&job).iter().all(|n| n["host"] == "a"),
        "pseudo nodes off host a"
    );
    ensure!(
        text.contains("Succeeded"),
        "submit's output does not say how it ended: {text}"
    );
    assert_no_containers_within(&c, Duration::from_secs(10))?;
    c.down()?;
    Ok(())
}

/// Waits until `job` ended, whichever way.
fn wait_end(c: &Cluster, job: &str, timeout: Duration) -> anyhow::Result<Value> {
    Ok(c.wait_job(job, timeout, "the end", |j| {
        j["phase"] == "Succeeded" || j["phase"] == "Failed" || j["phase"] == "Cancelled"
    })?)
}

/// The kinds and messages of a job's events.
fn event_texts(c: &Cluster, job: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    Ok(events(c, job)?
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("kind"), s("node"), s("message"))
        })
        .collect())
}

#[test]
fn teardown_crashes_and_lingering_workers_still_succeed() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster()?;

    // GeoMX's ps::Finalize crash: every scheduler and server exits 139 after its ps-lite
    // part ended (the test image's nodes end once their workers said goodbye)
    let crash = "[\"sh\", \"-c\", \"python -c 'import mxnet'; exit 139\"]";
    let hips = std::fs::read_to_string(repo_file("examples/hips.toml"))?
        .replace("name = \"hips-mnist\"", "name = \"teardown\"")
        .replace(
            "[policy]",
            &format!(
                "[command]\nscheduler = {crash}\nserver = {crash}\n\n[env]\nworkers = {{ PSNODE_INTERVAL = \"100ms\", PSNODE_ITERATIONS = \"10\" }}\nmaster = {{ PSNODE_INTERVAL = \"100ms\", PSNODE_ITERATIONS = \"10\" }}\n\n[policy]"
            ),
        );
    c.submit_ok("teardown.toml", &hips)?;
    let done = wait_end(&c, "teardown", Duration::from_secs(120))?;
    ensure!(
        done["phase"] == "Succeeded",
        "not Succeeded: {}",
        done["reason"]
    );
    let crashed: Vec<String> = nodes(&done)
        .iter()
        .filter(|n| n["role"] != "worker" && n["role"] != "master_worker")
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect();
    ensure!(crashed.len() == 7, "{done}");
    let evs = event_texts(&c, "teardown")?;
    for name in &crashed {
        ensure!(
            evs.iter().any(|(k, n, m)| k == "ExitedWhileShuttingDown"
                && n == name
                && m.contains("exited 139 (killed by signal 11, SIGSEGV) while shutting down")
                && m.contains("last log lines:")),
            "no shutdown-crash event naming {name}: {evs:#?}"
        );
    }
    // the final states say what happened, never `running`
    let table = c.ctl(&["status", "teardown"])?;
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    for line in table
        .lines()
        .filter(|l| crashed.iter().any(|n| l.starts_with(n)))
    {
        ensure!(
            line.contains("while shutting down (not a failure)") && !line.contains("running"),
            "status row: {line}\n{table}"
        );
    }
    for line in table.lines().filter(|l| l.contains("-worker-")) {
        ensure!(line.contains("exited 0"), "status row: {line}\n{table}");
    }
    assert_no_containers_within(&c, Duration::from_secs(10))?;
    // the output outlives the containers: every node's, through its agent
    for n in nodes(&done) {
        let name = n["name"].as_str().unwrap_or_default();
        let text = logs(&c, "teardown", name)?;
        let want = if name.contains("worker") {
            "Start training on"
        } else {
            "every worker finished: shutting down"
        };
        ensure!(
            text.contains(want),
            "logs of {name} after the job ended: {text:?}"
        );
    }
    // gone after `geomxctl rm`: the records, the events and the agents' files
    let kept: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|h| Ok(c.agent_state_dir(h)?.join("logs").join("teardown")))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        kept.iter().all(|p| p.is_dir()),
        "no kept output in {kept:?}"
    );
    let out = c.ctl(&["rm", "teardown"])?;
    ensure!(
        out.status.success(),
        "rm: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        kept.iter().all(|p| !p.exists()),
        "kept output left after rm: {kept:?}"
    );
    let out = c.ctl(&["logs", "teardown", "a-worker-0"])?;
    ensure!(out.status.code() == Some(2), "logs after rm: {out:?}");
    let out = c.ctl(&["status", "teardown"])?;
    ensure!(out.status.code() == Some(2), "status after rm: {out:?}");

    // the same job, its schedulers and servers crashing on teardown as before, but one
    // training worker exits 1 after its last iteration: Failed, naming that worker
    let worker = r#"["sh", "-c", "[ \"$GEOMX_NODE\" = b-worker-1 ] && export PSNODE_EXIT_CODE=1; exec python /root/GeoMX/examples/cnn.py --data-slice-idx {slice} --cpu"]"#;
    let master = r#"["python", "/root/GeoMX/examples/cnn.py", "--cpu"]"#;
    let failing = hips
        .replace("name = \"teardown\"", "name = \"teardown-fail\"")
        .replace(
            "[command]\n",
            &format!("[command]\nworker = {worker}\nmaster = {master}\n"),
        );
    c.submit_ok("teardown-fail.toml", &failing)?;
    let done = wait_end(&c, "teardown-fail", Duration::from_secs(120))?;
    let reason = done["reason"].as_str().unwrap_or_default();
    ensure!(done["phase"] == "Failed", "not Failed: {done:#}");
    ensure!(
        reason.starts_with("node b-worker-1 (worker) on host c failed with exit code 1"),
        "reason: {reason}"
    );
    let w = node(&done, "b-worker-1").context("b-worker-1")?;
    ensure!(w["exit_code"] == 1, "b-worker-1: {w}");
    assert_no_containers_within(&c, Duration::from_secs(10))?;

    // P3's hang: workers print their last line and never exit; the job is Succeeded
    // teardown_grace after the last one, the lingering workers are stopped and named
    c.submit_ok(
        "linger.toml",
        &format!(
            "{}\n[progress]\nfinished = \"hanging after 4 iterations\"\n",
            small_job(
                "linger",
                "PSNODE_HANG_AFTER = \"4\", PSNODE_ITERATIONS = \"50\"",
                "teardown_grace = \"3s\"",
            )
        ),
    )?;
    let done = wait_end(&c, "linger", Duration::from_secs(60))?;
    ensure!(
        done["phase"] == "Succeeded",
        "not Succeeded: {}",
        done["reason"]
    );
    let evs = event_texts(&c, "linger")?;
    let at = |kind: &str, node: &str| -> Option<i64> {
        events(&c, "linger")
            .ok()?
            .iter()
            .find(|e| e["kind"] == kind && e["node"] == node)
            .and_then(|e| e["at_ms"].as_i64())
    };
    let mut last_finished = 0;
    for w in ["p-worker-0", "p-worker-1"] {
        let finished = at("TrainingFinished", w).with_context(|| format!("{w}: {evs:#?}"))?;
        last_finished = last_finished.max(finished);
        ensure!(
            evs.iter().any(|(k, n, m)| k == "StoppedAfterTraining"
                && n == w
                && m.contains("stopped by geomx")),
            "no StoppedAfterTraining for {w}: {evs:#?}"
        );
        let n = node(&done, w).context(w)?;
        ensure!(
            n["state"] == "stopped" && n["end"] == "stopped by geomx after it finished training",
            "{w}: {n}"
        );
    }
    let ended = done["finished_at_ms"].as_i64().unwrap_or_default();
    eprintln!(
        "linger_success_after_last_finished_ms={}",
        ended - last_finished
    );
    ensure!(
        ended - last_finished <= 3_000 + 1_500,
        "Succeeded {} ms after the last final line (teardown_grace 3s)",
        ended - last_finished
    );
    ensure!(
        !evs.iter().any(|(k, _, _)| k == "Stalled"),
        "a finished worker was taken for stalled: {evs:#?}"
    );
    assert_no_containers_within(&c, Duration::from_secs(10))?;
    c.down()?;
    Ok(())
}

/// Issue 17, item 3: a HiPS job whose party-a worker a-worker-1 runs but never starts
/// ps-lite (its command sleeps). `geomxctl status` shows a-scheduler waiting for exactly
/// that worker while it waits, and the job fails within `rendezvous_timeout` naming it and
/// its host (not the workers that merely print no progress, nor party a's server, which
/// waits for its own party in ps-lite).
#[test]
fn a_worker_that_never_joins_fails_the_rendezvous_naming_it() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster()?;
    let master = r#"["python", "/root/GeoMX/examples/cnn.py", "--cpu"]"#;
    let worker = r#"["sh", "-c", "[ \"$GEOMX_NODE\" = a-worker-1 ] && exec sleep 100000; exec python /root/GeoMX/examples/cnn.py --data-slice-idx {slice} --cpu"]"#;
    let job = std::fs::read_to_string(repo_file("examples/hips.toml"))?
        .replace("name = \"hips-mnist\"", "name = \"rendezvous\"")
        .replace(
            "[policy]",
            &format!(
                "[command]\nworker = {worker}\nmaster = {master}\n\n[policy]\nrendezvous_timeout = \"20s\""
            ),
        );
    c.submit_ok("rendezvous.toml", &job)?;
    let submitted = Instant::now();

    // while it waits: status (table and JSON) says who waits for whom
    let waiting =
        "scheduler a-scheduler (host b): 2 of 3 registered, waiting for: a-worker-1 (host b)";
    // (once the other schedulers completed theirs, only a-scheduler still waits)
    let table = eventually(
        "status naming the missing worker alone",
        Duration::from_secs(60),
        || {
            let out = c.ctl(&["status", "rendezvous"]).ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let waits: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("rendezvous:"))
                .collect();
            (waits == [format!("rendezvous: {waiting}")]).then_some(text)
        },
    )
    .with_context(|| format!("{:#}", c.job("rendezvous").unwrap_or_default()))?;
    ensure!(
        table.contains("Running"),
        "every node runs while a-scheduler waits:\n{table}"
    );
    let job = c.job("rendezvous")?;
    let waits = job["rendezvous"].as_array().cloned().unwrap_or_default();
    let a = waits
        .iter()
        .find(|w| w["scheduler"] == "a-scheduler")
        .with_context(|| format!("no rendezvous of a-scheduler: {job:#}"))?;
    ensure!(
        a["waiting"] == serde_json::json!(["a-worker-1"]) && a["registered"] == 2,
        "{a:#}"
    );
    ensure!(
        waits
            .iter()
            .filter(|w| w["scheduler"] != "a-scheduler")
            .all(|w| w["complete"] == true),
        "the other schedulers completed: {waits:#?}"
    );

    // the verdict: within rendezvous_timeout (20 s from when everything ran, plus the
    // agents' report and resync intervals)
    let done = wait_end(&c, "rendezvous", Duration::from_secs(90))?;
    let took = submitted.elapsed();
    ensure!(done["phase"] == "Failed", "not Failed: {done:#}");
    let reason = done["reason"].as_str().unwrap_or_default();
    let first = reason.lines().next().unwrap_or_default();
    ensure!(
        first.starts_with("rendezvous timed out after ")
            && first.ends_with(
                "(rendezvous_timeout 20s): a-worker-1 (worker) on host b never registered"
            ),
        "reason: {reason}"
    );
    ensure!(took < Duration::from_secs(60), "took {took:?}: {reason}");
    let evs = event_texts(&c, "rendezvous")?;
    ensure!(
        evs.iter()
            .any(|(k, n, m)| k == "Rendezvous" && n == "a-scheduler" && m == waiting),
        "no event of the wait: {evs:#?}"
    );
    ensure!(
        evs.iter().any(|(k, _, _)| k == "RendezvousTimeout")
            && !evs.iter().any(|(k, _, _)| k == "Stalled"),
        "{evs:#?}"
    );
    assert_no_containers_within(&c, Duration::from_secs(15))?;
    Ok(())
}
