//! Helpers of the fault suite (`tests/faults.rs`): what an operator looks at before and after
//! a fault (containers, kernel state, hosts, job events), a seeded random source for fault
//! schedules, and file system tricks (a small tmpfs, filling it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use geomx_lab::{Cluster, Lab, LabHost};
use serde_json::Value;

/// `GEOMX_FAULTS_LONG=1`: run the long versions of the fault tests (100 agent restarts, a
/// minute of controller kills, ...), as the fault suite's issue asks for; the default
/// versions are shorter so that CI stays fast.
pub fn long_mode() -> bool {
    std::env::var("GEOMX_FAULTS_LONG").is_ok_and(|v| v == "1")
}

/// A small seeded random source (xorshift64*) for fault schedules. The seed comes from
/// `GEOMX_FAULTS_SEED` when set, else from the clock; it is printed, so that a failing
/// schedule can be replayed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A source for `what`, seeded as described above (and printed as `<what>_seed=N`).
    pub fn seeded(what: &str) -> Rng {
        let seed = std::env::var("GEOMX_FAULTS_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{what}_seed={seed} (replay with GEOMX_FAULTS_SEED={seed})");
        Rng::new(seed)
    }

    /// A source with a fixed seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }

    /// A duration in `lo..hi`, to the millisecond.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_millis(self.range(lo.as_millis() as u64, hi.as_millis() as u64))
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64) as usize]
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

pub use geomx_lab::jobfile::ps_job;

/// The nodes of a job (`geomxctl status` JSON).
pub fn nodes(job: &Value) -> Vec<Value> {
    job["nodes"].as_array().cloned().unwrap_or_default()
}

/// The highest iteration any worker of the job reported.
pub fn max_iteration(job: &Value) -> u64 {
    nodes(job)
        .iter()
        .filter_map(|n| n["progress"]["iteration"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The lowest iteration over the job's training workers (0 if one reported nothing).
pub fn min_worker_iteration(job: &Value) -> u64 {
    nodes(job)
        .iter()
        .filter(|n| n["role"] == "worker" || n["role"] == "master_worker")
        .map(|n| n["progress"]["iteration"].as_u64().unwrap_or(0))
        .min()
        .unwrap_or(0)
}

/// The events of a job (`geomxctl events JOB`), oldest first.
pub fn job_events(c: &Cluster, job: &str) -> anyhow::Result<Vec<Value>> {
    Ok(c.ctl_json(&["events", job])?["events"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The kinds of a job's events, oldest first.
pub fn event_kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect()
}

/// Event kinds that say a job was disturbed: a node failed, vanished or stalled, a host was
/// lost or left, the job failed or restarted.
pub const DISTURBANCE_EVENTS: [&str; 9] = [
    "NodeFailed",
    "NodeMissing",
    "Stalled",
    "HostLost",
    "HostLeft",
    "Failed",
    "Restarting",
    "Restarted",
    "Cancelled",
];

/// Fails when any of the job's events is a [`DISTURBANCE_EVENTS`] kind.
pub fn ensure_undisturbed(c: &Cluster, job: &str) -> anyhow::Result<Vec<String>> {
    let events = job_events(c, job)?;
    let kinds = event_kinds(&events);
    let bad: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["kind"]
                .as_str()
                .is_some_and(|k| DISTURBANCE_EVENTS.contains(&k))
        })
        .collect();
    ensure!(
        bad.is_empty(),
        "job {job} was disturbed: {}",
        serde_json::to_string(&bad).unwrap_or_default()
    );
    Ok(kinds)
}

/// What Docker says about one geomx container: what must not change while a job runs
/// through an agent restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    /// Full container id.
    pub id: String,
    /// `State.StartedAt`.
    pub started_at: String,
    /// `RestartCount`.
    pub restart_count: u64,
    /// `State.Status` (running, exited, ...).
    pub status: String,
}

/// Every geomx container (role containers and sandboxes) on `host`, by name.
pub fn geomx_container_states(host: &LabHost) -> anyhow::Result<BTreeMap<String, ContainerState>> {
    let d = host.dockerd()?;
    let ids = d.docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        "label=io.geomx.managed=true",
    ])?;
    let ids: Vec<&str> = ids.lines().filter(|l| !l.trim().is_empty()).collect();
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut args = vec![
        "inspect",
        "-f",
        "{{.Name}} {{.Id}} {{.State.StartedAt}} {{.RestartCount}} {{.State.Status}}",
    ];
    args.extend(ids);
    let out = d.docker(&args)?;
    let mut states = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 5, "docker inspect printed {line:?}");
        states.insert(
            f[0].trim_start_matches('/').to_string(),
            ContainerState {
                id: f[1].to_string(),
                started_at: f[2].to_string(),
                restart_count: f[3].parse().context("RestartCount")?,
                status: f[4].to_string(),
            },
        );
    }
    Ok(states)
}

/// [`geomx_container_states`] of every host of the lab, by host name.
pub fn all_container_states(
    lab: &Lab,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, ContainerState>>> {
    lab.hosts()
        .iter()
        .map(|h| Ok((h.name.clone(), geomx_container_states(h)?)))
        .collect()
}

/// A host's kernel state as the fault tests compare it: the sorted route table (all tables)
/// and the normalized `iptables-save`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelState {
    /// [`geomx_lab::Netns::routes`].
    pub routes: String,
    /// [`geomx_lab::Netns::iptables_save`].
    pub iptables: String,
}

/// The kernel state of `host`.
pub fn kernel_state(host: &LabHost) -> anyhow::Result<KernelState> {
    Ok(KernelState {
        routes: host.netns().routes()?,
        iptables: host.netns().iptables_save()?,
    })
}

/// The kernel state of every host of the lab, by host name.
pub fn kernel_states(lab: &Lab) -> anyhow::Result<BTreeMap<String, KernelState>> {
    lab.hosts()
        .iter()
        .map(|h| Ok((h.name.clone(), kernel_state(h)?)))
        .collect()
}

/// The lines only in `before` (`-`) and only in `after` (`+`), for messages.
pub fn line_diff(before: &str, after: &str) -> String {
    let b: BTreeSet<&str> = before.lines().collect();
    let a: BTreeSet<&str> = after.lines().collect();
    let mut out: Vec<String> = b.difference(&a).map(|l| format!("- {l}")).collect();
    out.extend(a.difference(&b).map(|l| format!("+ {l}")));
    if out.is_empty() && before != after {
        out.push("(same lines, another order)".into());
    }
    out.join("\n")
}

/// Describes how two sets of kernel states differ (empty when they are equal).
pub fn kernel_diff(
    before: &BTreeMap<String, KernelState>,
    after: &BTreeMap<String, KernelState>,
) -> String {
    let mut out = Vec::new();
    for (host, b) in before {
        match after.get(host) {
            None => out.push(format!("{host}: missing")),
            Some(a) => {
                if a.routes != b.routes {
                    out.push(format!(
                        "{host} routes:\n{}",
                        line_diff(&b.routes, &a.routes)
                    ));
                }
                if a.iptables != b.iptables {
                    out.push(format!(
                        "{host} iptables-save:\n{}",
                        line_diff(&b.iptables, &a.iptables)
                    ));
                }
            }
        }
    }
    out.join("\n")
}

/// Host name → subnet, as the controller reports the hosts.
pub fn subnets(c: &Cluster) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(c.hosts()?
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or_default().to_string(),
                h["subnet"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// What [`watch_hosts`] saw.
#[derive(Clone, Debug, Default)]
pub struct HostsSeen {
    /// Successful polls.
    pub polls: u64,
    /// Polls that failed (controller unreachable, ...).
    pub failed_polls: u64,
    /// Per host: every state seen.
    pub states: BTreeMap<String, BTreeSet<String>>,
    /// Per host: every non-empty subnet seen, in the order first seen.
    pub subnets: BTreeMap<String, Vec<String>>,
    /// Per host: the highest heartbeat age seen (ms).
    pub max_heartbeat_age_ms: BTreeMap<String, u64>,
}

impl HostsSeen {
    /// Records one poll of `geomxctl hosts` (a failed one counts as such).
    pub fn record<E>(&mut self, hosts: Result<Vec<Value>, E>) {
        let Ok(hosts) = hosts else {
            self.failed_polls += 1;
            return;
        };
        self.polls += 1;
        for h in hosts {
            let name = h["name"].as_str().unwrap_or_default().to_string();
            if let Some(s) = h["state"].as_str() {
                self.states
                    .entry(name.clone())
                    .or_default()
                    .insert(s.to_string());
            }
            if let Some(s) = h["subnet"].as_str().filter(|s| !s.is_empty()) {
                let v = self.subnets.entry(name.clone()).or_default();
                if !v.iter().any(|x| x == s) {
                    v.push(s.to_string());
                }
            }
            let age = h["heartbeat_age_ms"].as_u64().unwrap_or(0);
            let m = self.max_heartbeat_age_ms.entry(name).or_default();
            *m = (*m).max(age);
        }
    }

    /// The hosts seen in any state other than `ready`, with those states.
    pub fn not_ready(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.states
            .iter()
            .filter(|(_, s)| s.iter().any(|x| x != "ready"))
            .map(|(h, s)| (h.clone(), s.clone()))
            .collect()
    }
}

/// Polls `geomxctl hosts` every `every` until `stop` is set (run it on a scoped thread) and
/// records what it saw.
pub fn watch_hosts(c: &Cluster, stop: &AtomicBool, every: Duration) -> HostsSeen {
    let mut seen = HostsSeen::default();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        seen.record(c.hosts());
        if let Some(rest) = every.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    seen
}

/// Mounts a tmpfs of `bytes` at `dir` (created if needed). The lab unmounts everything
/// under its directory when it is torn down.
pub fn mount_tmpfs(dir: &Path, bytes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    geomx_lab::cmd::sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes},mode=0700"),
            "tmpfs",
            &dir.display().to_string(),
        ],
    )?;
    Ok(())
}

/// Free bytes of the file system holding `dir` (what an unprivileged writer may use).
pub fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let out = geomx_lab::cmd::sh("stat", &["-f", "-c", "%a %S", &dir.display().to_string()])?;
    let f: Vec<u64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(f.len() == 2, "stat -f printed {out:?}");
    Ok(f[0] * f[1])
}

/// Fills the file system holding `dir` with the file `dir/<name>` until a write fails with
/// "no space left on device"; returns the file and how much it holds. Removing the file
/// frees the space again.
pub fn fill_fs(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, u64)> {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0x5au8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
        }
    }
    let _ = f.sync_all();
    Ok((path, written))
}

/// Waits until the controller holds a report of `host`'s agent sent after `since` (its
/// heartbeat is younger than the time since `since` when asked), with the host ready and
/// its network converged, and, with `job`, a report of each of the job's nodes on `host`
/// sent after `since` too (the agent adopted its containers); returns how long after
/// `since` that was seen.
pub fn wait_reported_since(
    c: &Cluster,
    host: &str,
    job: Option<&str>,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let fresh = |v: &Value, asked_after: Duration| {
        v["heartbeat_age_ms"]
            .as_u64()
            .is_some_and(|age| Duration::from_millis(age) < asked_after)
    };
    crate::eventually(
        &format!("reports of {host}'s agent after its restart"),
        timeout,
        || {
            let asked_after = since.elapsed();
            let hosts = c.hosts().ok()?;
            let h = hosts.iter().find(|h| h["name"] == host)?;
            if !(fresh(h, asked_after) && h["state"] == "ready" && h["network_converged"] == true) {
                return None;
            }
            if let Some(job) = job {
                let asked_after = since.elapsed();
                let j = c.job(job).ok()?;
                let mine: Vec<Value> = nodes(&j)
                    .into_iter()
                    .filter(|n| n["host"] == host)
                    .collect();
                if !mine.iter().all(|n| fresh(n, asked_after)) {
                    return None;
                }
            }
            Some(since.elapsed())
        },
    )
}

/// The geomx routes of `host` as `SUBNET via UNDERLAY_IP` (the first three words of each).
pub fn route_targets(host: &LabHost) -> anyhow::Result<BTreeSet<String>> {
    Ok(crate::net::geomx_routes(host)?
        .iter()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect())
}

/// The geomx routes every host must have given the controller's view of the hosts
/// (`geomxctl hosts` JSON): `SUBNET via UNDERLAY_IP` of every other ready host.
pub fn expected_route_targets(hosts: &[Value]) -> BTreeMap<String, BTreeSet<String>> {
    let target = |h: &Value| {
        format!(
            "{} via {}",
            h["subnet"].as_str().unwrap_or_default(),
            h["underlay_ip"].as_str().unwrap_or_default()
        )
    };
    hosts
        .iter()
        .map(|h| {
            let name = h["name"].as_str().unwrap_or_default().to_string();
            let peers = hosts
                .iter()
                .filter(|p| p["name"] != h["name"] && p["state"] == "ready")
                .map(target)
                .collect();
            (name, peers)
        })
        .collect()
}

/// The IPv4 address and prefix of docker0 on `host` (`172.17.34.1/24`).
pub fn docker0_address(host: &LabHost) -> anyhow::Result<String> {
    let out = host.run(&["ip", "-o", "-4", "addr", "show", "docker0"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("{}: docker0 has no IPv4 address: {out}", host.name))
}

/// The gateway address (first host address) of a subnet such as `172.17.34.0/24`, with its
/// prefix: `172.17.34.1/24`.
pub fn gateway_of(subnet: &str) -> anyhow::Result<String> {
    let (net, prefix) = subnet
        .split_once('/')
        .with_context(|| format!("{subnet:?} is not a CIDR"))?;
    let net: std::net::Ipv4Addr = net.parse().with_context(|| format!("{subnet:?}"))?;
    Ok(format!(
        "{}/{prefix}",
        std::net::Ipv4Addr::from(u32::from(net) + 1)
    ))
}

/// The part of a normalized `iptables-save` that is geomx's: every line naming a GEOMX
/// chain, and the first rule of `FORWARD` and of `POSTROUTING` in each table (geomx wants
/// its jumps there).
pub fn geomx_iptables(save: &str) -> String {
    let mut out = Vec::new();
    let mut table = "";
    let mut first_seen: BTreeSet<String> = BTreeSet::new();
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t;
            first_seen.clear();
            out.push(l.to_string());
            continue;
        }
        let chain = l
            .strip_prefix("-A ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default();
        let first_of_builtin = matches!(chain, "FORWARD" | "POSTROUTING")
            && first_seen.insert(format!("{table}/{chain}"));
        if l.contains("GEOMX") || first_of_builtin {
            out.push(l.to_string());
        }
    }
    out.join("\n")
}

/// Kills the controller with SIGKILL and starts it again on its state directory; returns
/// once it listens, with how long it was away. ([`geomx_lab::LabProcess::kill9`] returns
/// only once the process is really gone, its lock on the state directory and its listening
/// socket released, so the restart cannot race it.)
pub fn kill9_and_restart_controller(c: &Cluster) -> anyhow::Result<Duration> {
    c.controller().kill9()?;
    let down = Instant::now();
    c.start_controller()?;
    Ok(down.elapsed())
}

/// Stops the agent of `host` (SIGKILL, else SIGTERM with a 10 s grace) and starts it
/// again; returns when it was started.
pub fn restart_agent(c: &Cluster, host: &str, sigkill: bool) -> anyhow::Result<Instant> {
    let agent = c.agent(host);
    if sigkill {
        agent.kill9()?;
    } else {
        agent.stop(Duration::from_secs(10))?;
    }
    let started = Instant::now();
    c.start_agent(host)?;
    Ok(started)
}
