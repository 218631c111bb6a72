//! Deploy latency (issue 6, item 1): `geomxctl submit --detach` of the 12-node HiPS
//! reference topology (examples/hips.toml) on the lab's hosts a, b, c until every node runs,
//! against a plain program that starts the same containers with `docker run -d` in the
//! same hosts' dockerds, measured in the same run.
//!
//! * **geomx**: the clock starts before geomxctl is spawned (in the underlay namespace,
//!   as the lab's tests run it) and stops at the controller's `running_at_ms`: the moment it
//!   recorded the job Running (every node reported running by its agent). The time at which
//!   the benchmark's polling (`geomxctl status -o json` every 100 ms) saw it is printed too.
//! * **baseline**: what geomx does, as a script would do it with no control plane: the
//!   containers of an unrecorded warm-up geomx run are read back with `docker inspect`
//!   (image, command, entrypoint, environment, network), then replayed without geomx's
//!   labels. A ps-lite scheduler binds exactly its `DMLC_PS_ROOT_URI`, so its IP must be
//!   known before it starts: wave 1 starts the network sandboxes (the same pause image and
//!   command geomx uses) with `docker run -d`, all hosts and containers in parallel, and
//!   reads their IPs (`docker inspect`, one call per host); wave 2 starts the 12 role
//!   containers with `docker run -d` (each sandboxed one in `--network container:<sandbox>`,
//!   scheduler addresses replaced by the new sandbox IPs), all in parallel. The clock stops
//!   when the last `docker run -d` returned (Docker answers once the container runs).
//! * Runs alternate (baseline, geomx, baseline, ...) after one unrecorded geomx run; after
//!   each geomx run the job is cancelled and the benchmark waits until no geomx container
//!   is left; baseline containers are removed with `docker rm -f`.
//!
//! Two settings ([`Setting`]):
//!
//! * **flat** (`deploy_ratio`): the seed lab, one LAN; the baseline's `docker` talks to each
//!   host's dockerd socket directly. Target ≤ [`TARGET_RATIO`].
//! * **geo** (`deploy_geo_ratio`, issue 16): three data centers (examples/geo-lab.toml: a in
//!   dc1 with the controller, b in dc2, c in dc3), every WAN link 40 ms one way without jitter,
//!   rate limit or loss; the central party in dc1,
//!   the parties in dc2 and dc3. The baseline's `docker -H tcp://HOST:2375` runs in dc1 where
//!   geomxctl and the controller run, each dockerd's API forwarded on its host's underlay
//!   address ([`crate::dockerfwd`]): both cross the same WAN links. Target ≤
//!   [`GEO_TARGET_RATIO`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::dockerfwd::{self, Forwarder};
use crate::labcluster::{BenchCluster, HOSTS, int, now_ms, secs};
use crate::procfs::{self, MachineWindow};
use crate::report::{Line, median, note};

/// The reference job file.
const HIPS_TOML: &str = include_str!("../../examples/hips.toml");
/// Its job name.
const JOB_PREFIX: &str = "hips-mnist";
/// The name prefix of baseline containers (no geomx label: the agents leave them alone).
const BASELINE_PREFIX: &str = "gxbench";
/// The deploy target: geomx within 1.5 × the plain docker script.
pub const TARGET_RATIO: f64 = 1.5;

/// The geo-distributed deploy target: geomx within 1.2 × the plain docker script over the
/// same WAN links.
pub const GEO_TARGET_RATIO: f64 = 1.2;

/// Where the deploy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// The seed lab's LAN.
    Flat,
    /// Three data centers, 40 ms one way ([`geo_topology`]).
    Geo,
}

impl Setting {
    fn prefix(self) -> &'static str {
        match self {
            Setting::Flat => "deploy",
            Setting::Geo => "deploy_geo",
        }
    }

    fn target(self) -> f64 {
        match self {
            Setting::Flat => TARGET_RATIO,
            Setting::Geo => GEO_TARGET_RATIO,
        }
    }
}

/// The lab's geo-distributed example (examples/geo-lab.toml: hosts a, b, c in dc1, dc2,
/// dc3, the controller in dc1).
const GEO_LAB: &str = include_str!("../../examples/geo-lab.toml");
/// The one-way delay of every WAN link in the geo setting.
pub const GEO_DELAY: Duration = Duration::from_millis(40);

/// The geo setting's lab: the geo example with every WAN link [`GEO_DELAY`] one way, no
/// jitter, rate limit or loss (the deploy's figures are about round trips).
pub fn geo_topology() -> anyhow::Result<geomx_lab::topology::TopologyFile> {
    let mut t = geomx_lab::topology::parse_topology("examples/geo-lab.toml", GEO_LAB)?;
    for l in &mut t.topology.links {
        l.shape = geomx_lab::topology::Shape {
            delay: GEO_DELAY,
            ..Default::default()
        };
    }
    Ok(t)
}

/// Knobs of the deploy benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Recorded runs of each (geomx and baseline).
    pub runs: usize,
    /// Where.
    pub setting: Setting,
}

/// How the baseline reaches the hosts' dockerds.
enum Via {
    /// Each host's socket, from this machine.
    Local,
    /// `docker -H tcp://...` in the controller's namespace, through the forwarders.
    Wan {
        ns: geomx_lab::Netns,
        forwarders: BTreeMap<String, Forwarder>,
    },
}

impl Via {
    fn for_setting(bc: &BenchCluster, setting: Setting) -> anyhow::Result<Via> {
        if setting == Setting::Flat {
            return Ok(Via::Local);
        }
        let mut forwarders = BTreeMap::new();
        for host in HOSTS {
            let h = bc.host(host)?;
            let f = Forwarder::start(
                h.netns(),
                std::net::SocketAddr::from((h.underlay_ip, dockerfwd::PORT)),
                h.dockerd()?.socket(),
            )?;
            forwarders.insert(host.to_owned(), f);
        }
        Ok(Via::Wan {
            ns: bc.cluster().lab().controller_netns(),
            forwarders,
        })
    }
}

/// The reference job, kept running: psnode's workers train "forever" (10^8 iterations).
pub fn job_toml(name: &str) -> String {
    let body = HIPS_TOML.replacen(
        &format!("name = \"{JOB_PREFIX}\""),
        &format!("name = \"{name}\""),
        1,
    );
    format!(
        "{body}\n[env]\nworkers = {{ PSNODE_ITERATIONS = \"100000000\" }}\nmaster = {{ PSNODE_ITERATIONS = \"100000000\" }}\n"
    )
}

/// One geomx deploy.
#[derive(Clone, Debug)]
struct GeomxRun {
    /// Submit → the controller recorded Running, s.
    total_s: f64,
    /// Submit → the benchmark's polling saw Running, s.
    observed_s: f64,
    /// Where the time went, ms from the start (see [`breakdown`]).
    breakdown: Vec<(String, i64)>,
}

/// One baseline deploy.
#[derive(Clone, Copy, Debug)]
struct DockerRun {
    total_s: f64,
    wave1_s: f64,
}

/// Runs the deploy benchmark in `bc`; prints its lines.
pub fn run(bc: &BenchCluster, opts: &Options) -> anyhow::Result<()> {
    let via = Via::for_setting(bc, opts.setting)?;
    let prefix = opts.setting.prefix();
    let machine = MachineWindow::start()?;
    let load_before = procfs::loadavg();
    // unrecorded warm-up: caches, and the containers the baseline replays
    let (warm, plan) = geomx_run(bc, "bench-deploy-0", true)?;
    let plan = plan.context("no container plan from the warm-up run")?;
    note(format!(
        "{prefix}: warm-up geomx run {:.2}s; baseline plan: {} sandboxes, {} role containers",
        warm.total_s,
        plan.sandboxes.len(),
        plan.roles.len()
    ));
    ensure!(
        plan.roles.len() == 12,
        "the reference job should run 12 role containers, saw {}",
        plan.roles.len()
    );
    let mut geomx = Vec::new();
    let mut docker = Vec::new();
    for i in 1..=opts.runs {
        let d = docker_run(bc, &via, &plan).with_context(|| format!("baseline run {i}"))?;
        note(format!(
            "{prefix} run {i}: docker {:.2}s (wave 1 {:.2}s)",
            d.total_s, d.wave1_s
        ));
        docker.push(d);
        let (g, _) = geomx_run(bc, &format!("bench-deploy-{i}"), false)
            .with_context(|| format!("geomx run {i}"))?;
        note(format!(
            "{prefix} run {i}: geomx {:.2}s (observed {:.2}s)",
            g.total_s, g.observed_s
        ));
        geomx.push(g);
    }
    let g: Vec<f64> = geomx.iter().map(|r| r.total_s).collect();
    let o: Vec<f64> = geomx.iter().map(|r| r.observed_s).collect();
    let d: Vec<f64> = docker.iter().map(|r| r.total_s).collect();
    let w1: Vec<f64> = docker.iter().map(|r| r.wave1_s).collect();
    let ratio = median(&g) / median(&d);
    let runs_list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut line = Line::new(&format!("{prefix}_ratio"), format!("{ratio:.2}"));
    if opts.setting == Setting::Geo {
        line = line
            .kv("wan", format!("3dc,{}ms_one_way", GEO_DELAY.as_millis()))
            .kv("baseline_client", "dc1,docker_-H_tcp");
    }
    line.f("geomx_p50_s", median(&g), 2)
        .f("docker_p50_s", median(&d), 2)
        .kv("runs", opts.runs)
        .f("geomx_observed_p50_s", median(&o), 2)
        .f("docker_wave1_p50_s", median(&w1), 2)
        .kv("geomx_runs", runs_list(&g))
        .kv("docker_runs", runs_list(&d))
        .kv("nodes", plan.roles.len())
        .kv("sandboxes", plan.sandboxes.len())
        .kv("hosts", HOSTS.len())
        .f("machine_busy_pct", machine.percent()?, 0)
        .f("loadavg_before", load_before, 1)
        .f("loadavg", procfs::loadavg(), 1)
        .print();
    // where geomx's time goes: the median of every step over the recorded runs
    let mut steps: BTreeMap<usize, (String, Vec<f64>)> = BTreeMap::new();
    for r in &geomx {
        for (i, (name, ms)) in r.breakdown.iter().enumerate() {
            steps
                .entry(i)
                .or_insert_with(|| (name.clone(), Vec::new()))
                .1
                .push(*ms as f64);
        }
    }
    let mut line = Line::new(&format!("{prefix}_breakdown"), "geomx_p50_ms_from_submit");
    for (name, v) in steps.values() {
        line = line.f(name, median(v), 0);
    }
    line.print();
    let target = opts.setting.target();
    Line::new(
        &format!(
            "{prefix}_target_ratio_{}_met",
            format!("{target}").replace('.', "")
        ),
        ratio.is_finite() && ratio <= target,
    )
    .print();
    Ok(())
}

/// Submits the reference job as `name`, waits until it runs, reads the breakdown (and with
/// `capture`, the containers to replay), cancels it and waits until its containers are gone.
fn geomx_run(
    bc: &BenchCluster,
    name: &str,
    capture: bool,
) -> anyhow::Result<(GeomxRun, Option<Plan>)> {
    let toml = job_toml(name);
    let t0_ms = now_ms();
    let t0 = Instant::now();
    bc.submit(name, &toml)?;
    let submitted = t0.elapsed();
    let result = (|| {
        let (job, seen) = bc.wait_job(
            name,
            Duration::from_millis(100),
            Duration::from_secs(120),
            "phase Running",
            |j| j["phase"] == "Running",
        )?;
        let observed_s = seen.duration_since(t0).as_secs_f64();
        let running_at = int(&job, "running_at_ms");
        ensure!(
            running_at > 0,
            "job {name} is Running without running_at_ms"
        );
        let events = bc.events(name)?;
        let breakdown = breakdown(t0_ms, submitted, &job, &events);
        let plan = if capture {
            Some(Plan::capture(bc)?)
        } else {
            None
        };
        Ok((
            GeomxRun {
                total_s: secs(t0_ms, running_at),
                observed_s,
                breakdown,
            },
            plan,
        ))
    })();
    let cleared = bc.cancel_and_clear(name, Duration::from_secs(60));
    let r = result?;
    cleared.with_context(|| format!("cancelling job {name}"))?;
    Ok(r)
}

/// Milliseconds from the start (`t0_ms`) to each step of a deploy, in order:
/// `cli_returned` (geomxctl submit --detach exited), `submitted` (the controller stored the
/// job), `first_sched_started` / `last_sched_started` (the schedulers' containers started,
/// Docker's start times as the agents reported them), `first_other_started` /
/// `last_other_started` (servers and workers), `running` (the controller recorded Running),
/// and the time of each job event the controller recorded (`ev_<Kind>`).
fn breakdown(t0_ms: i64, submitted: Duration, job: &Value, events: &[Value]) -> Vec<(String, i64)> {
    let mut out = vec![
        ("cli_returned_ms".to_owned(), submitted.as_millis() as i64),
        (
            "submitted_ms".to_owned(),
            int(job, "submitted_at_ms") - t0_ms,
        ),
    ];
    let nodes = job["nodes"].as_array().cloned().unwrap_or_default();
    let starts = |sched: bool| -> Vec<i64> {
        let mut v: Vec<i64> = nodes
            .iter()
            .filter(|n| (n["role"].as_str().unwrap_or_default().contains("scheduler")) == sched)
            .map(|n| int(n, "started_at_ms"))
            .filter(|t| *t > 0)
            .map(|t| t - t0_ms)
            .collect();
        v.sort_unstable();
        v
    };
    for (label, sched) in [("sched", true), ("other", false)] {
        let v = starts(sched);
        out.push((
            format!("first_{label}_started_ms"),
            v.first().copied().unwrap_or(-1),
        ));
        out.push((
            format!("last_{label}_started_ms"),
            v.last().copied().unwrap_or(-1),
        ));
    }
    out.push(("running_ms".to_owned(), int(job, "running_at_ms") - t0_ms));
    let mut seen = std::collections::BTreeSet::new();
    for e in events {
        let kind = e["kind"].as_str().unwrap_or("event");
        if seen.insert(kind.to_owned()) {
            out.push((format!("ev_{kind}_ms"), int(e, "at_ms") - t0_ms));
        }
    }
    out
}

/// A network sandbox to replay.
#[derive(Clone, Debug)]
struct Sandbox {
    host: String,
    node: String,
    image: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    /// Its IP in the geomx run (the value to replace in the role containers' env).
    old_ip: String,
}

/// A role container to replay.
#[derive(Clone, Debug)]
struct Role {
    host: String,
    node: String,
    image: String,
    cmd: Vec<String>,
    env: Vec<String>,
    /// The node whose sandbox it joins, or the network mode (`bridge`, `host`).
    network: Network,
}

#[derive(Clone, Debug)]
enum Network {
    Sandbox(String),
    Mode(String),
}

/// What geomx started, read back from the hosts' dockerds.
#[derive(Clone, Debug)]
struct Plan {
    sandboxes: Vec<Sandbox>,
    roles: Vec<Role>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Plan {
    /// Reads every geomx container of hosts a, b, c (`docker inspect`).
    fn capture(bc: &BenchCluster) -> anyhow::Result<Plan> {
        let mut sandboxes = Vec::new();
        let mut roles = Vec::new();
        for host in HOSTS {
            let d = bc.host(host)?.dockerd()?;
            let ids = d
                .docker(&[
                    "ps",
                    "-q",
                    "--no-trunc",
                    "--filter",
                    "label=io.geomx.managed=true",
                ])
                .with_context(|| format!("docker ps on {host}"))?;
            let ids: Vec<&str> = ids.lines().filter(|l| !l.trim().is_empty()).collect();
            if ids.is_empty() {
                continue;
            }
            let mut args = vec!["inspect"];
            args.extend(ids.iter().copied());
            let text = d
                .docker(&args)
                .with_context(|| format!("docker inspect on {host}"))?;
            let all: Value = serde_json::from_str(&text)
                .with_context(|| format!("docker inspect on {host}: not JSON"))?;
            let by_id: BTreeMap<String, Value> = all
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|c| (c["Id"].as_str().unwrap_or_default().to_owned(), c))
                .collect();
            for c in by_id.values() {
                let labels = &c["Config"]["Labels"];
                let node = labels["io.geomx.node"]
                    .as_str()
                    .context("a geomx container without io.geomx.node")?
                    .to_owned();
                let image = c["Config"]["Image"].as_str().unwrap_or_default().to_owned();
                let env = strings(&c["Config"]["Env"]);
                if labels["io.geomx.kind"] == "sandbox" {
                    sandboxes.push(Sandbox {
                        host: host.to_owned(),
                        node,
                        image,
                        entrypoint: strings(&c["Config"]["Entrypoint"]),
                        cmd: strings(&c["Config"]["Cmd"]),
                        env,
                        old_ip: c["NetworkSettings"]["IPAddress"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    });
                } else {
                    let mode = c["HostConfig"]["NetworkMode"]
                        .as_str()
                        .unwrap_or("bridge")
                        .to_owned();
                    let network = match mode.strip_prefix("container:") {
                        Some(id) => {
                            let sb = by_id.get(id).context("a role container's sandbox")?;
                            Network::Sandbox(
                                sb["Config"]["Labels"]["io.geomx.node"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned(),
                            )
                        }
                        None => Network::Mode(mode),
                    };
                    roles.push(Role {
                        host: host.to_owned(),
                        node,
                        image,
                        cmd: strings(&c["Config"]["Cmd"]),
                        env,
                        network,
                    });
                }
            }
        }
        Ok(Plan { sandboxes, roles })
    }
}

/// Replaces, in one pass, every whole address of `s` (a maximal run of digits and dots)
/// that is a key of `map` by its value: 172.17.34.2 does not match inside 172.17.34.20, and
/// swapped addresses (old .2 → new .3, old .3 → new .2) do not chain.
fn replace_ips(s: &str, map: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        match map.get(token.as_str()) {
            Some(new) => out.push_str(new),
            None => out.push_str(token),
        }
        token.clear();
    };
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out
}

fn baseline_name(node: &str, sandbox: bool) -> String {
    if sandbox {
        format!("{BASELINE_PREFIX}-net.{node}")
    } else {
        format!("{BASELINE_PREFIX}.{node}")
    }
}

/// Runs `docker <args>` against `host`'s dockerd (through `via`).
fn docker(bc: &BenchCluster, via: &Via, host: &str, args: &[String]) -> anyhow::Result<String> {
    let what = || format!("docker {} on {host}", args.join(" "));
    match via {
        Via::Local => {
            let d = bc.host(host)?.dockerd()?;
            d.docker(args).with_context(what)
        }
        Via::Wan { ns, forwarders } => {
            let url = forwarders
                .get(host)
                .with_context(|| format!("no forwarder to {host}'s dockerd"))?
                .url();
            let out = ns
                .command("docker")
                .arg("-H")
                .arg(&url)
                .args(args)
                .output()
                .with_context(what)?;
            if !out.status.success() {
                bail!(
                    "{}: {}",
                    what(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
    }
}

/// Runs every command of `cmds` ((host, docker args)) at once, each in a thread of its own.
fn parallel(
    bc: &BenchCluster,
    via: &Via,
    cmds: &[(String, Vec<String>)],
) -> anyhow::Result<Vec<String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = cmds
            .iter()
            .map(|(host, args)| s.spawn(move || docker(bc, via, host, args)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("docker thread panicked"))?
            })
            .collect()
    })
}

/// One baseline deploy; removes its containers afterwards.
fn docker_run(bc: &BenchCluster, via: &Via, plan: &Plan) -> anyhow::Result<DockerRun> {
    let t0 = Instant::now();
    let result = (|| {
        // wave 1: the sandboxes, everywhere at once
        let wave1: Vec<(String, Vec<String>)> = plan
            .sandboxes
            .iter()
            .map(|s| {
                let mut a: Vec<String> = ["run", "-d", "--restart", "no", "--network", "bridge"]
                    .map(String::from)
                    .to_vec();
                a.extend(["--name".into(), baseline_name(&s.node, true)]);
                for e in &s.env {
                    a.extend(["-e".into(), e.clone()]);
                }
                let (first, rest) = s
                    .entrypoint
                    .split_first()
                    .map_or((None, &[][..]), |(f, r)| (Some(f.clone()), r));
                if let Some(f) = first {
                    a.extend(["--entrypoint".into(), f]);
                }
                a.push(s.image.clone());
                a.extend(rest.iter().cloned());
                a.extend(s.cmd.iter().cloned());
                (s.host.clone(), a)
            })
            .collect();
        parallel(bc, via, &wave1)?;
        // their IPs: one inspect per host
        let mut new_ip: BTreeMap<String, String> = BTreeMap::new();
        let per_host: Vec<(String, Vec<String>)> = HOSTS
            .iter()
            .filter_map(|h| {
                let names: Vec<String> = plan
                    .sandboxes
                    .iter()
                    .filter(|s| s.host == *h)
                    .map(|s| baseline_name(&s.node, true))
                    .collect();
                (!names.is_empty()).then(|| {
                    let mut a: Vec<String> = vec![
                        "inspect".into(),
                        "-f".into(),
                        "{{.Name}} {{.NetworkSettings.IPAddress}}".into(),
                    ];
                    a.extend(names);
                    ((*h).to_owned(), a)
                })
            })
            .collect();
        for out in parallel(bc, via, &per_host)? {
            for l in out.lines() {
                if let Some((name, ip)) = l.trim().split_once(' ') {
                    new_ip.insert(name.trim_start_matches('/').to_owned(), ip.to_owned());
                }
            }
        }
        let ip_map: BTreeMap<String, String> = plan
            .sandboxes
            .iter()
            .map(|s| {
                let n = baseline_name(&s.node, true);
                new_ip
                    .get(&n)
                    .filter(|ip| !ip.is_empty())
                    .map(|ip| (s.old_ip.clone(), ip.clone()))
                    .with_context(|| format!("baseline sandbox {n} has no IP"))
            })
            .collect::<anyhow::Result<_>>()?;
        let wave1_s = t0.elapsed().as_secs_f64();
        // wave 2: the role containers, everywhere at once
        let wave2: Vec<(String, Vec<String>)> = plan
            .roles
            .iter()
            .map(|r| {
                let mut a: Vec<String> =
                    ["run", "-d", "--restart", "no"].map(String::from).to_vec();
                a.extend(["--name".into(), baseline_name(&r.node, false)]);
                let net = match &r.network {
                    Network::Sandbox(node) => format!("container:{}", baseline_name(node, true)),
                    Network::Mode(m) => m.clone(),
                };
                a.extend(["--network".into(), net]);
                for e in &r.env {
                    a.extend(["-e".into(), replace_ips(e, &ip_map)]);
                }
                a.push(r.image.clone());
                a.extend(r.cmd.iter().cloned());
                (r.host.clone(), a)
            })
            .collect();
        parallel(bc, via, &wave2)?;
        let total_s = t0.elapsed().as_secs_f64();
        // not timed: every container still runs (the replayed env was right)
        std::thread::sleep(Duration::from_millis(500));
        for h in HOSTS {
            let out = docker(
                bc,
                &Via::Local,
                h,
                &[
                    "ps".into(),
                    "-a".into(),
                    "--filter".into(),
                    format!("name={BASELINE_PREFIX}"),
                    "--format".into(),
                    "{{.Names}} {{.State}}".into(),
                ],
            )?;
            for l in out.lines() {
                if !l.ends_with(" running") {
                    bail!("baseline container not running on {h}: {l}");
                }
            }
        }
        Ok(DockerRun { total_s, wave1_s })
    })();
    let cleaned = remove_baseline(bc, via);
    let r = result?;
    cleaned?;
    Ok(r)
}

/// Removes every baseline container of hosts a, b, c.
fn remove_baseline(bc: &BenchCluster, via: &Via) -> anyhow::Result<()> {
    for h in HOSTS {
        let ids = docker(
            bc,
            via,
            h,
            &[
                "ps".into(),
                "-aq".into(),
                "--filter".into(),
                format!("name={BASELINE_PREFIX}"),
            ],
        )?;
        let ids: Vec<String> = ids.split_whitespace().map(str::to_owned).collect();
        if !ids.is_empty() {
            let mut a = vec!["rm".to_owned(), "-f".to_owned()];
            a.extend(ids);
            docker(bc, via, h, &a)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_replacement_is_whole_address_only_and_simultaneous() {
        let map: BTreeMap<String, String> = [
            ("172.17.34.2".to_owned(), "172.17.34.3".to_owned()),
            ("172.17.34.3".to_owned(), "172.17.34.2".to_owned()),
        ]
        .into();
        assert_eq!(
            replace_ips("DMLC_PS_ROOT_URI=172.17.34.2", &map),
            "DMLC_PS_ROOT_URI=172.17.34.3"
        );
        assert_eq!(replace_ips("X=172.17.34.3:9", &map), "X=172.17.34.2:9");
        assert_eq!(replace_ips("X=172.17.34.20", &map), "X=172.17.34.20");
        assert_eq!(replace_ips("X=1172.17.34.2", &map), "X=1172.17.34.2");
    }

    #[test]
    fn the_geo_setting_is_three_data_centers_40ms_apart() {
        let t = geo_topology().expect("the geo example parses");
        let dc_of = |h: &str| t.hosts.iter().find(|x| x.name == h)?.dc.clone();
        assert_eq!(
            HOSTS.map(dc_of),
            [Some("dc1".into()), Some("dc2".into()), Some("dc3".into())]
        );
        assert_eq!(t.topology.controller_dc, "dc1");
        assert_eq!(t.topology.links.len(), 3);
        for l in &t.topology.links {
            assert_eq!(l.shape.delay, GEO_DELAY, "{:?}", l.dcs);
            assert!(l.shape.jitter.is_zero() && l.shape.rate_bps.is_none() && l.shape.loss == 0.0);
        }
        assert_eq!(Setting::Geo.prefix(), "deploy_geo");
        assert_eq!(Setting::Geo.target(), GEO_TARGET_RATIO);
    }

    #[test]
    fn job_keeps_running_and_is_renamed() {
        let t = job_toml("bench-deploy-3");
        assert!(t.contains("name = \"bench-deploy-3\""));
        assert!(!t.contains("name = \"hips-mnist\""));
        assert!(t.contains("PSNODE_ITERATIONS"));
    }
}
