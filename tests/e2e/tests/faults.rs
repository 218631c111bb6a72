//! The fault suite of issue 6, in a lab with the real binaries (TLS on): agent restarts
//! during a running job, the controller killed with SIGKILL again and again during joins,
//! submits and heartbeats, dockerd restarted under a job, a host's underlay link flapping,
//! and the controller's state directory running out of space.
//!
//! Each test checks what an operator would check and prints its figures as `key=value`
//! lines. `GEOMX_FAULTS_LONG=1` runs the long versions (100 agent restarts, a minute of
//! controller kills, ...); `GEOMX_FAULTS_SEED=N` replays a fault schedule. See
//! docs/faults.md.
//!
//! Needs the binaries: `cargo build --workspace --bins` before `cargo test`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_e2e::faults::*;
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::{Binaries, Cluster, ClusterSpec, HostSpec, Lab, LabSpec, SEED_HOSTS};
use serde_json::Value;

/// Grace period of the fault tests' clusters: an agent away for less is not lost.
const GRACE: Duration = Duration::from_secs(5);
/// The agents' periodic network pass.
const NETWORK_INTERVAL: Duration = Duration::from_secs(2);

/// The grace period of the flapping test: the deployment default (controller.toml), which
/// short underlay flaps must never exhaust.
const FLAP_GRACE: Duration = Duration::from_secs(10);

fn cluster_on(lab: Lab) -> anyhow::Result<Cluster> {
    cluster_on_with(lab, GRACE)
}

fn cluster_on_with(lab: Lab, grace: Duration) -> anyhow::Result<Cluster> {
    Ok(Cluster::up(
        lab,
        ClusterSpec {
            grace_period: grace,
            heartbeat_interval: Duration::from_millis(500),
            network_interval: NETWORK_INTERVAL,
            ..ClusterSpec::default()
        },
        Binaries::find()?,
    )?)
}

/// A lab of the seed hosts (`hosts` of a, b, c) with a cluster on it.
fn cluster(hosts: usize) -> anyhow::Result<Cluster> {
    cluster_with(hosts, GRACE)
}

/// [`cluster`] with another grace period.
fn cluster_with(hosts: usize, grace: Duration) -> anyhow::Result<Cluster> {
    let mut spec = LabSpec::for_test();
    for (name, ip) in SEED_HOSTS.iter().take(hosts) {
        spec = spec.host(name, *ip);
    }
    cluster_on_with(Lab::up(spec)?, grace)
}

/// What geomxctl printed, both streams.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The worker environment of a psnode job running `iterations` at `interval_ms`.
fn workers_env(iterations: u64, interval_ms: u64) -> String {
    format!("PSNODE_ITERATIONS = \"{iterations}\", PSNODE_INTERVAL = \"{interval_ms}ms\"")
}

/// Waits until every training worker of `job` reported an iteration above `above`.
fn wait_progress(c: &Cluster, job: &str, above: u64, timeout: Duration) -> anyhow::Result<Value> {
    Ok(c.wait_job(
        job,
        timeout,
        &format!("every worker past iteration {above}"),
        |j| j["phase"] == "Running" && min_worker_iteration(j) > above,
    )?)
}

/// The job's phase, generation and restarts must still be those of an undisturbed run.
fn ensure_first_generation(job: &Value) -> anyhow::Result<()> {
    ensure!(
        job["generation"] == 0 && job["restarts"] == 0,
        "job {} was restarted: generation {}, restarts {}",
        job["name"],
        job["generation"],
        job["restarts"]
    );
    Ok(())
}

/// Fault 1: Agents restarted (SIGKILL and SIGTERM, on varying hosts) while a job runs across
/// the hosts: nothing of the job or the hosts may change.
#[test]
fn agent_restarts_during_a_running_job_change_nothing() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let restarts: usize = if long_mode() { 100 } else { 10 };
    let mut rng = Rng::seeded("agent_restarts");
    let c = cluster(3)?;
    let hosts = ["a", "b", "c"];

    // a job that outlasts the restarts: a restart with its checks takes about 0.7 s on an
    // idle 2-core machine and up to 3 s with two labs at once; allow 4 s per restart at
    // 10 iterations per second
    let iterations = 150 + 40 * restarts as u64;
    c.submit_ok(
        "steady.toml",
        &ps_job("steady", &hosts, 3, &workers_env(iterations, 100), ""),
    )?;
    c.wait_phase("steady", "Running", Duration::from_secs(60))?;
    wait_progress(&c, "steady", 0, Duration::from_secs(30))?;
    let containers_before = all_container_states(c.lab())?;
    let kernel_before = kernel_states(c.lab())?;
    ensure!(
        containers_before.values().map(BTreeMap::len).sum::<usize>() == 6,
        "the job's containers (5 role containers, 1 sandbox): {containers_before:?}"
    );

    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let (seen, back_after, sigkills) = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_hosts(&c, &stop, Duration::from_millis(250)));
        let result = (|| {
            let mut back_after = Vec::with_capacity(restarts);
            let mut kills = 0;
            for i in 0..restarts {
                let host = *rng.pick(&hosts);
                let sigkill = rng.chance(0.5);
                kills += usize::from(sigkill);
                let since = restart_agent(&c, host, sigkill)?;
                back_after.push(
                    wait_reported_since(&c, host, Some("steady"), since, GRACE)
                        .with_context(|| format!("restart {i} of the agent of {host}"))?,
                );
                // the next restart at once or a little later
                std::thread::sleep(rng.duration(Duration::ZERO, Duration::from_millis(700)));
            }
            anyhow::Ok((back_after, kills))
        })();
        stop.store(true, Ordering::Relaxed);
        let seen = watcher.join().expect("host watcher");
        result.map(|(b, k)| (seen, b, k))
    })?;
    let took = started.elapsed();

    // the restarted agents ran their periodic network pass at least once
    let job = c.job("steady")?;
    let at = min_worker_iteration(&job);
    ensure!(job["phase"] == "Running", "after the restarts: {job}");
    ensure_first_generation(&job)?;
    std::thread::sleep(NETWORK_INTERVAL + Duration::from_millis(500));
    let containers_after = all_container_states(c.lab())?;
    let kernel_after = kernel_states(c.lab())?;
    let mut restarted = 0;
    for (host, before) in &containers_before {
        for (name, b) in before {
            match containers_after[host].get(name) {
                Some(a) if a == b => {}
                other => {
                    restarted += 1;
                    eprintln!("{host}: {name} was {b:?}, now {other:?}");
                }
            }
        }
        ensure!(
            containers_after[host].len() == before.len(),
            "{host}: containers before {before:?}, after {:?}",
            containers_after[host]
        );
    }
    ensure!(
        containers_after
            .values()
            .flat_map(BTreeMap::values)
            .all(|s| s.restart_count == 0 && s.status == "running"),
        "containers after: {containers_after:?}"
    );
    let diff = kernel_diff(&kernel_before, &kernel_after);
    let max_gap = seen
        .max_heartbeat_age_ms
        .values()
        .max()
        .copied()
        .unwrap_or(0);
    let mut back: Vec<u128> = back_after.iter().map(Duration::as_millis).collect();
    back.sort_unstable();
    eprintln!(
        "agent_restarts={restarts} sigkill={sigkills} sigterm={} took_s={:.1} agent_back_p50_ms={} agent_back_max_ms={} max_heartbeat_age_ms={max_gap} containers_restarted={restarted} kernel_state_changed={}",
        restarts - sigkills,
        took.as_secs_f64(),
        back[back.len() / 2],
        back[back.len() - 1],
        !diff.is_empty()
    );
    ensure!(
        restarted == 0,
        "{restarted} containers restarted or recreated"
    );
    ensure!(
        diff.is_empty(),
        "routes or iptables changed across the agent restarts:\n{diff}"
    );
    ensure!(
        seen.not_ready().is_empty(),
        "hosts not ready during the restarts: {:?}",
        seen.not_ready()
    );

    // still making progress, then done, never disturbed
    wait_progress(&c, "steady", at, Duration::from_secs(20))?;
    let done = c.wait_phase(
        "steady",
        "Succeeded",
        Duration::from_secs(iterations / 10 + 60),
    )?;
    ensure_first_generation(&done)?;
    let kinds = ensure_undisturbed(&c, "steady")?;
    ensure!(
        kinds.iter().filter(|k| *k == "Running").count() == 1,
        "the job left Running and came back: {kinds:?}"
    );
    c.down()?;
    Ok(())
}

/// An agent restarted while its Docker does not answer (dockerd frozen with SIGSTOP; the
/// containers run on): until its container runtime has adopted the running containers
/// (which needs Docker) the agent reports its host with `nodes_known: false` and
/// `images_known: false`. The controller keeps the host ready, takes none of its nodes for
/// gone and keeps its last image list, for longer than the grace period; once Docker
/// answers the agent adopts the containers and the job runs on undisturbed. (Before the fix
/// the job failed with "node ... is missing: its agent has not reported it ... although the
/// host reports"; see docs/faults.md.)
#[test]
fn agent_restarted_while_docker_is_slow_keeps_the_job() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    /// Freezes a dockerd (SIGSTOP; its containers run on) until dropped.
    struct Frozen(u32);
    impl Drop for Frozen {
        fn drop(&mut self) {
            let _ = geomx_lab::cmd::sh("kill", &["-CONT", &self.0.to_string()]);
        }
    }
    let c = cluster(2)?;
    c.submit_ok(
        "steady.toml",
        &ps_job("steady", &["a", "b"], 2, &workers_env(600, 100), ""),
    )?;
    c.wait_phase("steady", "Running", Duration::from_secs(60))?;
    wait_progress(&c, "steady", 0, Duration::from_secs(30))?;
    let pid = c.lab().host("b")?.dockerd()?.pid().context("b's dockerd")?;
    let frozen = Frozen(pid);
    geomx_lab::cmd::sh("kill", &["-STOP", &pid.to_string()])?;
    let since = restart_agent(&c, "b", true)?;
    // the new agent reports (its network is not converged without Docker) ...
    eventually("a report of b's new agent", GRACE, || {
        let asked_after = since.elapsed();
        let hosts = c.hosts().ok()?;
        let b = hosts.iter().find(|h| h["name"] == "b")?;
        (Duration::from_millis(b["heartbeat_age_ms"].as_u64()?) < asked_after).then_some(())
    })?;
    // ... for longer than the grace period, while Docker does not answer
    let frozen_at = Instant::now();
    let stop = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_hosts(&c, &stop, Duration::from_millis(250)));
        std::thread::sleep((GRACE + Duration::from_secs(2)).saturating_sub(frozen_at.elapsed()));
        stop.store(true, Ordering::Relaxed);
        watcher.join().expect("host watcher")
    });
    let hosts = c.hosts()?;
    let b_host = hosts
        .iter()
        .find(|h| h["name"] == "b")
        .context("host b")?
        .clone();
    let before_thaw = c.job("steady")?;
    let frozen_for = frozen_at.elapsed();
    drop(frozen);
    let thawed = Instant::now();
    let back = wait_reported_since(&c, "b", Some("steady"), thawed, GRACE * 2);
    let job = c.job("steady")?;
    eprintln!(
        "while frozen: job phase {} reason {:?}; after: phase={} reason={:?}",
        before_thaw["phase"], before_thaw["reason"], job["phase"], job["reason"]
    );
    ensure!(
        before_thaw["phase"] == "Running" && job["phase"] == "Running",
        "{}",
        job["reason"]
    );
    ensure_first_generation(&job)?;
    ensure!(
        seen.not_ready().is_empty(),
        "hosts not ready while b's Docker was frozen: {:?}",
        seen.not_ready()
    );
    // the controller kept b's images (the agent could not list them)
    ensure!(
        b_host["images"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i == "lizonghango00o1/geomx:cpu-only")),
        "b's images while its Docker was frozen: {b_host}"
    );
    let adopted_after = back?;
    let at = min_worker_iteration(&c.job("steady")?);
    wait_progress(&c, "steady", at, Duration::from_secs(20))?;
    ensure_undisturbed(&c, "steady")?;
    eprintln!(
        "docker_frozen_ms={} grace_ms={} b_max_heartbeat_age_ms={} adopted_after_thaw_ms={} job=Running",
        frozen_for.as_millis(),
        GRACE.as_millis(),
        seen.max_heartbeat_age_ms.get("b").copied().unwrap_or(0),
        adopted_after.as_millis()
    );
    c.down()?;
    Ok(())
}

/// How one submission during the controller kill loop ended.
#[derive(Debug, Default)]
struct Submits {
    /// Accepted (exit 0).
    accepted: Vec<String>,
    /// Refused as already existing on a retry: accepted before, the answer was lost.
    ack_lost: Vec<String>,
    /// Refused otherwise (exit 2).
    refused: Vec<(String, String)>,
    /// Attempts that failed for lack of a controller (exit 1), retried.
    retries: u64,
}

/// Fault 2: The controller killed with SIGKILL every 1-4 s and restarted on the same state dir,
/// while hosts join, jobs are submitted and agents heartbeat.
#[test]
fn controller_kill9_loop_during_joins_submits_and_heartbeats() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let window = if long_mode() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(15)
    };
    let mut kill_rng = Rng::seeded("controller_kills");
    let mut submit_rng = Rng::new(kill_rng.next_u64());
    let c = cluster(3)?;
    let first_subnets = subnets(&c)?;
    let dockerd_pids: BTreeMap<String, Option<u32>> = c
        .lab()
        .hosts()
        .iter()
        .map(|h| Ok((h.name.clone(), h.dockerd()?.pid())))
        .collect::<anyhow::Result<_>>()?;
    let joining = [
        HostSpec {
            name: "d".into(),
            underlay_ip: Ipv4Addr::new(10, 1, 1, 40),
            dc: None,
        },
        HostSpec {
            name: "e".into(),
            underlay_ip: Ipv4Addr::new(10, 1, 1, 41),
            dc: None,
        },
    ];

    // adding a host needs the cluster exclusively (the lab grows); everything else shares it
    let shared = RwLock::new(c);
    let start = Instant::now();
    let deadline = start + window;
    let done = AtomicBool::new(false);
    let (kills, max_down, submits, seen) = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            let mut kills = 0u32;
            let mut max_down = Duration::ZERO;
            while Instant::now() < deadline {
                std::thread::sleep(
                    kill_rng.duration(Duration::from_secs(1), Duration::from_secs(4)),
                );
                let c = shared.read().expect("cluster lock");
                max_down = max_down.max(kill9_and_restart_controller(&c)?);
                kills += 1;
            }
            anyhow::Ok((kills, max_down))
        });
        let submitter = s.spawn(|| {
            let mut out = Submits::default();
            let mut n = 0;
            while Instant::now() < deadline {
                let name = format!("k{n}");
                n += 1;
                let job = ps_job(&name, &["a", "b", "c"], 2, &workers_env(20, 100), "");
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let o = shared
                        .read()
                        .expect("cluster lock")
                        .submit_text(&format!("{name}.toml"), &job)?;
                    let text = output_text(&o);
                    match o.status.code() {
                        Some(0) => {
                            out.accepted.push(name.clone());
                            break;
                        }
                        Some(2) if attempts > 1 && text.contains("already") => {
                            out.ack_lost.push(name.clone());
                            break;
                        }
                        Some(2) => {
                            out.refused.push((name.clone(), text));
                            break;
                        }
                        _ if attempts > 200 => bail!("{name}: never accepted nor refused: {text}"),
                        _ => {
                            out.retries += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
                std::thread::sleep(
                    submit_rng.duration(Duration::from_millis(300), Duration::from_millis(1500)),
                );
            }
            anyhow::Ok(out)
        });
        let watcher = s.spawn(|| {
            let mut seen = HostsSeen::default();
            while !done.load(Ordering::Relaxed) {
                let hosts = shared.read().expect("cluster lock").hosts();
                seen.record(hosts);
                std::thread::sleep(Duration::from_millis(250));
            }
            seen
        });
        // hosts join a quarter and half-way through the window
        let joins = (|| {
            for (i, h) in joining.iter().enumerate() {
                let at = start + window * (i as u32 + 1) / 4;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                shared.write().expect("cluster lock").add_host(h.clone())?;
            }
            anyhow::Ok(())
        })();
        let killed = killer.join().expect("killer");
        let submitted = submitter.join().expect("submitter");
        done.store(true, Ordering::Relaxed);
        let seen = watcher.join().expect("watcher");
        joins?;
        let (kills, max_down) = killed?;
        anyhow::Ok((kills, max_down, submitted?, seen))
    })?;
    let c = shared.into_inner().expect("cluster lock");
    let last_restart = Instant::now();
    // every restart came up (none refused its state dir, none exited at start)
    let log = std::fs::read_to_string(c.controller().log())?;
    let serving = log.matches("geomx-controller serving").count();
    ensure!(
        serving == kills as usize + 1 && !log.contains("cannot start"),
        "{kills} kills, {serving} controller starts:\n{}",
        c.controller().log_tail(40)
    );

    // every agent reconnected: all five hosts ready with their network converged
    let all: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
    c.wait_hosts_ready(&all, Duration::from_secs(60))?;
    let reconnected_after = last_restart.elapsed();

    // no lease lost or duplicated: every host holds the subnet it was first given (the
    // watcher saw no other), all distinct, docker0 carries it, and no Docker of a, b, c
    // was restarted (a new subnet would have restarted it)
    let now_subnets = subnets(&c)?;
    for (host, subnet) in &now_subnets {
        let first = first_subnets
            .get(host)
            .or_else(|| seen.subnets.get(host).and_then(|v| v.first()))
            .with_context(|| format!("{host}: never seen with a subnet"))?;
        ensure!(
            subnet == first,
            "{host} holds {subnet}, first leased {first}"
        );
        let all_seen = seen.subnets.get(host).cloned().unwrap_or_default();
        ensure!(
            all_seen.iter().all(|s| s == subnet),
            "{host} was seen with subnets {all_seen:?}"
        );
        let h = c.lab().host(host)?;
        ensure!(
            docker0_address(h)? == gateway_of(subnet)?,
            "{host}: docker0 is {}, the lease is {subnet}",
            docker0_address(h)?
        );
    }
    let distinct: BTreeSet<&String> = now_subnets.values().collect();
    ensure!(
        distinct.len() == all.len() && now_subnets.len() == all.len(),
        "leases: {now_subnets:?}"
    );
    for (host, pid) in &dockerd_pids {
        ensure!(
            c.lab().host(host)?.dockerd()?.pid() == *pid,
            "the Docker of {host} was restarted"
        );
    }

    // routes on every host consistent with the leases
    let hosts_json = c.hosts()?;
    let expected = expected_route_targets(&hosts_json);
    for h in c.lab().hosts() {
        let want = &expected[&h.name];
        eventually(
            &format!("{}'s routes to be {want:?}", h.name),
            Duration::from_secs(10),
            || route_targets(h).ok().filter(|r| r == want),
        )?;
    }

    // no accepted job lost: each is there (run 1: never accepted twice), and ends
    // Succeeded with its events from Submitted to Succeeded
    let kept: Vec<&String> = submits.accepted.iter().chain(&submits.ack_lost).collect();
    ensure!(
        submits.refused.is_empty(),
        "submissions refused: {:?}",
        submits.refused
    );
    ensure!(!kept.is_empty(), "no job was accepted during the kill loop");
    for name in &kept {
        let job = c
            .wait_phase(name, "Succeeded", Duration::from_secs(90))
            .with_context(|| format!("accepted job {name}"))?;
        let second = c.ctl(&["status", &format!("{name}#2")])?;
        ensure!(
            !second.status.success(),
            "{name} was accepted twice: {}",
            output_text(&second)
        );
        ensure_first_generation(&job)?;
        let kinds = event_kinds(&job_events(&c, name)?);
        ensure!(
            kinds.first().map(String::as_str) == Some("Submitted")
                && kinds.last().map(String::as_str) == Some("Succeeded"),
            "{name}: events {kinds:?}"
        );
    }
    let listed = c.ctl_json(&["jobs"])?["jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        listed.len() == kept.len(),
        "{} jobs listed, {} accepted: {listed:?}",
        listed.len(),
        kept.len()
    );
    eprintln!(
        "controller_kills={kills} window_s={} max_restart_ms={} submits_accepted={} submits_ack_lost={} submit_retries={} hosts_joined=2 failed_polls={} reconnected_after_ms={} leases_changed=0 jobs_lost=0",
        window.as_secs(),
        max_down.as_millis(),
        submits.accepted.len(),
        submits.ack_lost.len(),
        submits.retries,
        seen.failed_polls,
        reconnected_after.as_millis()
    );
    c.down()?;
    Ok(())
}

/// Fault 3: dockerd restarted on a host while a job runs there. Docker stops the containers
/// (no live-restore): the job must fail cleanly, naming the node, the host and the Docker
/// restart, also when the stopped worker exited 0, and the host's geomx rules and routes
/// must be back within the network interval.
#[test]
fn dockerd_restart_mid_job_fails_the_job_cleanly_and_the_host_recovers() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster(2)?;
    let b = c.lab().host("b")?.clone();
    let kernel_before = kernel_state(&b)?;

    // p-worker-1 runs on b. psnode exits 0 on Docker's SIGTERM, like a training script
    // that checkpoints on SIGTERM: by its exit code alone it looks like a worker that
    // finished. The agent knows better: it ran when Docker went away.
    let victim = ps_job("victim", &["a", "b"], 2, &workers_env(3000, 100), "");
    c.submit_ok("victim.toml", &victim)?;
    c.wait_phase("victim", "Running", Duration::from_secs(60))?;
    wait_progress(&c, "victim", 0, Duration::from_secs(30))?;

    let restart = Instant::now();
    b.dockerd()?.restart()?;
    let docker_back = restart.elapsed();
    // Docker put its own rules back, in front of geomx's jumps; the agent's next pass
    // (at the latest one network interval later) restores geomx's chains and order
    let geomx_before = geomx_iptables(&kernel_before.iptables);
    let geomx_restored = eventually(
        "geomx's chains and jumps on b as before",
        NETWORK_INTERVAL + Duration::from_secs(5),
        || {
            let now = b.netns().iptables_save().ok()?;
            (geomx_iptables(&now) == geomx_before).then(|| restart.elapsed() - docker_back)
        },
    )
    .with_context(|| {
        let now = b.netns().iptables_save().unwrap_or_default();
        line_diff(&geomx_before, &geomx_iptables(&now))
    })?;
    let failed = c.wait_job("victim", Duration::from_secs(30), "Failed", |j| {
        j["phase"] == "Failed" || j["phase"] == "Succeeded"
    })?;
    let failed_after = restart.elapsed();
    ensure!(failed["phase"] == "Failed", "{failed}");
    let reason = failed["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.starts_with("node p-worker-1 (worker) on host b failed with exit code 0")
            && reason.contains("stopped by a restart of Docker on host b"),
        "the reason does not name node p-worker-1, host b, exit code 0 and the Docker restart: {reason:?}"
    );
    eprintln!("victim reason: {reason}");
    let kinds = event_kinds(&job_events(&c, "victim")?);
    ensure!(
        kinds
            .iter()
            .any(|k| k == "NodeFailed" || k == "NodeMissing"),
        "events: {kinds:?}"
    );

    // the job's containers go from both hosts
    for h in ["a", "b"] {
        eventually(
            &format!("the job's containers removed from {h}"),
            Duration::from_secs(20),
            || c.geomx_containers(h).ok().filter(Vec::is_empty),
        )?;
    }
    // and then b's whole route table and iptables are as before the job
    eventually(
        "b's routes and iptables as before",
        NETWORK_INTERVAL * 2 + Duration::from_secs(5),
        || (kernel_state(&b).ok()? == kernel_before).then_some(()),
    )
    .with_context(|| {
        let now = kernel_state(&b).unwrap_or(KernelState {
            routes: String::new(),
            iptables: String::new(),
        });
        format!(
            "routes:\n{}\niptables:\n{}",
            line_diff(&kernel_before.routes, &now.routes),
            line_diff(&kernel_before.iptables, &now.iptables)
        )
    })?;
    ensure!(
        geomx_restored <= NETWORK_INTERVAL + Duration::from_secs(1),
        "geomx's rules on b restored {geomx_restored:?} after Docker was back"
    );

    // and the host runs the next job to success
    c.submit_ok(
        "after.toml",
        &ps_job("after", &["a", "b"], 2, &workers_env(20, 100), ""),
    )?;
    let done = c.wait_phase("after", "Succeeded", Duration::from_secs(90))?;
    ensure_first_generation(&done)?;
    eprintln!(
        "dockerd_restart_s={:.1} job_failed_after_ms={} geomx_rules_restored_after_docker_ms={} next_job=Succeeded",
        docker_back.as_secs_f64(),
        failed_after.as_millis(),
        geomx_restored.as_millis()
    );
    c.down()?;
    Ok(())
}

/// Fault 4: A host's underlay link flapping (down and up every 0.5-1 s, each outage shorter
/// than the grace period) while a job runs: nothing happens. Then a cut longer than the
/// grace period: the host is lost, the job fails naming it, its routes are withdrawn; back
/// with the same subnet after the link is restored.
#[test]
fn underlay_flapping_is_tolerated_and_a_long_cut_is_a_lost_host() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let flapping = if long_mode() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    };
    let mut rng = Rng::seeded("underlay_flaps");
    let c = cluster_with(3, FLAP_GRACE)?;
    let hosts = ["a", "b", "c"];
    let c_ip = c.lab().host("c")?.underlay_ip;
    let c_subnet = subnets(&c)?["c"].clone();

    let iterations = 150 + flapping.as_millis() as u64 / 100;
    c.submit_ok(
        "flappy.toml",
        &ps_job("flappy", &hosts, 3, &workers_env(iterations, 100), ""),
    )?;
    c.wait_phase("flappy", "Running", Duration::from_secs(60))?;
    wait_progress(&c, "flappy", 0, Duration::from_secs(30))?;

    let stop = AtomicBool::new(false);
    let (seen, flaps, down_total) = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_hosts(&c, &stop, Duration::from_millis(200)));
        let result = (|| {
            let (mut flaps, mut down_total) = (0u32, Duration::ZERO);
            let end = Instant::now() + flapping;
            while Instant::now() < end {
                let down = rng.duration(Duration::from_millis(500), Duration::from_millis(1000));
                c.lab().cut_link("c")?;
                std::thread::sleep(down);
                c.lab().restore_link("c")?;
                flaps += 1;
                down_total += down;
                std::thread::sleep(
                    rng.duration(Duration::from_millis(500), Duration::from_millis(1000)),
                );
            }
            anyhow::Ok((flaps, down_total))
        })();
        // whatever happened, the link ends up
        let _ = c.lab().restore_link("c");
        stop.store(true, Ordering::Relaxed);
        let seen = watcher.join().expect("host watcher");
        result.map(|(f, d)| (seen, f, d))
    })?;
    let job = c.job("flappy")?;
    let at = min_worker_iteration(&job);
    ensure!(job["phase"] == "Running", "after the flapping: {job}");
    ensure_first_generation(&job)?;
    ensure!(
        seen.not_ready().is_empty(),
        "hosts not ready during the flapping: {:?}",
        seen.not_ready()
    );
    let max_age = seen.max_heartbeat_age_ms.get("c").copied().unwrap_or(0);
    eprintln!(
        "link_flaps={flaps} flapping_s={} link_down_total_ms={} c_max_heartbeat_age_ms={max_age} host_lost=0",
        flapping.as_secs(),
        down_total.as_millis()
    );
    wait_progress(&c, "flappy", at, Duration::from_secs(20))?;
    let done = c.wait_phase(
        "flappy",
        "Succeeded",
        Duration::from_secs(iterations / 10 + 60),
    )?;
    ensure_first_generation(&done)?;
    ensure_undisturbed(&c, "flappy")?;

    // a cut longer than the grace period: c is lost
    c.submit_ok(
        "cut.toml",
        &ps_job("cut", &hosts, 3, &workers_env(3000, 100), ""),
    )?;
    c.wait_phase("cut", "Running", Duration::from_secs(60))?;
    c.lab().cut_link("c")?;
    let cut = Instant::now();
    eventually("c marked lost", FLAP_GRACE + Duration::from_secs(5), || {
        c.hosts()
            .ok()?
            .into_iter()
            .find(|h| h["name"] == "c" && h["state"] == "lost")
    })?;
    let lost_after = cut.elapsed();
    let failed = c.wait_phase("cut", "Failed", Duration::from_secs(10))?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("host c"),
        "the reason does not name host c: {reason:?}"
    );
    let c_route = format!("{c_subnet} via {c_ip}");
    for name in ["a", "b"] {
        let h = c.lab().host(name)?;
        eventually(
            &format!("{name} withdraws its route to c"),
            Duration::from_secs(5),
            || route_targets(h).ok().filter(|r| !r.contains(&c_route)),
        )?;
    }

    // back: same subnet, routes everywhere, the failed job's containers gone from c too
    c.lab().restore_link("c")?;
    let restored = Instant::now();
    c.wait_hosts_ready(&["c".to_string()], Duration::from_secs(30))?;
    let back_after = restored.elapsed();
    ensure!(
        subnets(&c)?["c"] == c_subnet,
        "c came back with another subnet"
    );
    for name in ["a", "b"] {
        let h = c.lab().host(name)?;
        eventually(
            &format!("{name} routes to c again"),
            Duration::from_secs(10),
            || route_targets(h).ok().filter(|r| r.contains(&c_route)),
        )?;
    }
    for h in hosts {
        eventually(
            &format!("the failed job's containers removed from {h}"),
            Duration::from_secs(20),
            || c.geomx_containers(h).ok().filter(Vec::is_empty),
        )?;
    }
    eprintln!(
        "long_cut_lost_after_ms={} grace_ms={} back_after_restore_ms={} same_subnet=true",
        lost_after.as_millis(),
        FLAP_GRACE.as_millis(),
        back_after.as_millis()
    );
    ensure!(
        lost_after <= FLAP_GRACE + Duration::from_secs(2),
        "c was marked lost {lost_after:?} after the cut (grace {FLAP_GRACE:?})"
    );
    c.down()?;
    Ok(())
}

/// Fault 5: The controller's state directory runs out of space: a submission gets a clear
/// RESOURCE_EXHAUSTED error, nothing is acknowledged that was not written, the controller
/// keeps serving and goes on by itself once space is freed; a restart on the same state
/// directory loads everything acknowledged.
#[test]
fn controller_state_dir_full_is_a_clear_error_and_loses_nothing() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let lab = Lab::up(
        LabSpec::for_test()
            .host("a", SEED_HOSTS[0].1)
            .host("b", SEED_HOSTS[1].1),
    )?;
    let state = Cluster::controller_state_dir_of(&lab);
    let tmpfs_bytes = 8u64 << 20;
    mount_tmpfs(&state, tmpfs_bytes)?;
    let c = cluster_on(lab)?;
    let pid = c.controller().pid().context("controller pid")?;
    let short = |name: &str| ps_job(name, &["a", "b"], 1, &workers_env(3, 100), "");

    // acknowledged before the disk fills up
    for name in ["ack-0", "ack-1"] {
        c.submit_ok(&format!("{name}.toml"), &short(name))?;
        c.wait_phase(name, "Succeeded", Duration::from_secs(60))?;
    }
    // and one running through it: its worker ends while nothing can be written
    c.submit_ok(
        "live.toml",
        &ps_job("live", &["a", "b"], 1, &workers_env(40, 100), ""),
    )?;
    c.wait_phase("live", "Running", Duration::from_secs(60))?;

    let (filler, filled) = fill_fs(&state, "filler")?;
    let full_at = Instant::now();
    let mut refused = 0;
    let mut message = String::new();
    for i in 0..5 {
        let name = format!("full-{i}");
        let out = c.submit_text(&format!("{name}.toml"), &short(&name))?;
        let text = output_text(&out);
        ensure!(
            out.status.code() == Some(1),
            "{name} while the disk is full: exit {:?}: {text}",
            out.status.code()
        );
        ensure!(
            (text.contains("ResourceExhausted") || text.contains("Unavailable"))
                && text.to_lowercase().contains("no space"),
            "{name}: unclear error: {text}"
        );
        refused += 1;
        message = text.trim().to_string();
    }
    // the controller keeps serving: hosts heartbeat (in memory), reads work
    ensure!(c.controller().pid() == Some(pid), "the controller died");
    let hosts_ready = || -> anyhow::Result<bool> {
        Ok(c.hosts()?.iter().all(|h| h["state"] == "ready") && c.hosts()?.len() == 2)
    };
    ensure!(hosts_ready()?, "hosts: {:?}", c.hosts()?);
    // live's worker finishes while the disk is full: the controller cannot record it, so
    // it does not claim it (status shows only what is on disk)
    let worker_done = eventually("live's worker to exit", Duration::from_secs(30), || {
        let d = c.lab().host("a").ok()?.dockerd().ok()?;
        let st = d
            .docker(&[
                "inspect",
                "-f",
                "{{.State.Status}}",
                "geomx.live.p-worker-0",
            ])
            .ok()?;
        (st == "exited").then_some(())
    });
    worker_done?;
    std::thread::sleep(Duration::from_secs(2));
    let live = c.job("live")?;
    ensure!(
        live["phase"] == "Running",
        "live is {} though nothing could be written: {live}",
        live["phase"]
    );
    ensure!(c.controller().pid() == Some(pid), "the controller died");
    let full_for = full_at.elapsed();

    // space back: the controller goes on by itself
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    c.wait_phase("live", "Succeeded", Duration::from_secs(10))?;
    let caught_up = freed.elapsed();
    c.submit_ok("after.toml", &short("after"))?;
    c.wait_phase("after", "Succeeded", Duration::from_secs(60))?;
    ensure!(c.controller().pid() == Some(pid), "the controller died");

    // a restart on the same state dir loads everything acknowledged, nothing else
    let jobs_of = |c: &Cluster| -> anyhow::Result<BTreeMap<String, (String, String)>> {
        Ok(c.ctl_json(&["jobs"])?["jobs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|j| {
                (
                    j["name"].as_str().unwrap_or_default().to_string(),
                    (j["phase"].to_string(), j["submitted_at_ms"].to_string()),
                )
            })
            .collect())
    };
    let jobs_before = jobs_of(&c)?;
    let subnets_before = subnets(&c)?;
    kill9_and_restart_controller(&c)?;
    let jobs_after = jobs_of(&c)?;
    ensure!(
        jobs_after == jobs_before,
        "jobs before the restart {jobs_before:?}, after {jobs_after:?}"
    );
    let names: BTreeSet<&str> = jobs_after.keys().map(String::as_str).collect();
    ensure!(
        names == BTreeSet::from(["ack-0", "ack-1", "live", "after"]),
        "jobs after the restart: {names:?}"
    );
    for name in &names {
        let kinds = event_kinds(&job_events(&c, name)?);
        ensure!(
            kinds.first().map(String::as_str) == Some("Submitted")
                && kinds.last().map(String::as_str) == Some("Succeeded"),
            "{name}: events {kinds:?}"
        );
    }
    ensure!(subnets(&c)? == subnets_before, "leases changed");
    c.wait_hosts_ready(&["a".to_string(), "b".to_string()], Duration::from_secs(30))?;
    eprintln!(
        "state_tmpfs_bytes={tmpfs_bytes} filler_bytes={filled} refused_submits={refused} full_for_ms={} controller_crashed=0 caught_up_after_free_ms={} jobs_after_restart={} error={message:?}",
        full_for.as_millis(),
        caught_up.as_millis(),
        names.len()
    );
    c.down()?;
    Ok(())
}
