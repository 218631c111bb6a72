//! Admission limits that protect hosts and the controller: what a job asks of a host's
//! memory and CPUs against what the host has, and how much a job adds to a host's desired
//! state.
//!
//! * [`check_capacity`]: the memory and CPU limits of a job's nodes on a host, plus what the
//!   other active jobs there reserve, must fit in what the host's Docker reports
//!   (`HostReport.memory_bytes`, `cpus`). A host that reported no capacity (an older agent,
//!   or Docker not answering yet) is not checked.
//! * [`check_state_sizes`]: a host's desired state, with the job's containers added and
//!   shared as the controller sends them (a job's common env once, not once per node), must
//!   stay within [`MAX_HOST_STATE_LEN`], half of what an agent decodes
//!   ([`geomx_proto::MAX_DESIRED_STATE_LEN`]): addresses filled in later and the peer list
//!   fit in the other half.

use std::collections::BTreeMap;

use geomx_job::Plan;
use geomx_proto::templates::shared_len;
use geomx_proto::v1::ContainerSpec;

use super::view::node_container_spec;

/// Most bytes of role containers one host's desired state may hold at submit.
pub const MAX_HOST_STATE_LEN: usize = geomx_proto::MAX_DESIRED_STATE_LEN / 2;

/// What a host can give containers, from its agent's last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCapacity {
    /// Memory in bytes; 0 when unknown.
    pub memory_bytes: u64,
    /// CPUs; 0 when unknown.
    pub cpus: u32,
}

/// What nodes ask of a host: the sum of their limits (nodes without a limit ask nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Asked {
    /// Memory limits, bytes.
    pub memory_bytes: u64,
    /// CPU limits.
    pub cpus: f64,
    /// Nodes with a memory limit.
    pub memory_nodes: usize,
    /// Nodes with a CPU limit.
    pub cpu_nodes: usize,
}

impl Asked {
    fn add(&mut self, other: &Asked) {
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.cpus += other.cpus;
        self.memory_nodes += other.memory_nodes;
        self.cpu_nodes += other.cpu_nodes;
    }
}

/// What `plan` asks of each of its hosts.
pub fn asked(plan: &Plan) -> BTreeMap<String, Asked> {
    let mut out: BTreeMap<String, Asked> = BTreeMap::new();
    for n in &plan.nodes {
        let a = out.entry(n.host.clone()).or_default();
        if let Some(m) = n.resources.memory {
            a.memory_bytes = a.memory_bytes.saturating_add(m);
            a.memory_nodes += 1;
        }
        if let Some(c) = n.resources.cpus {
            a.cpus += c.0;
            a.cpu_nodes += 1;
        }
    }
    out
}

/// What `plans` (the other active jobs) reserve on each host together.
pub fn reserved<'a>(plans: impl IntoIterator<Item = &'a Plan>) -> BTreeMap<String, Asked> {
    let mut out: BTreeMap<String, Asked> = BTreeMap::new();
    for plan in plans {
        for (host, a) in asked(plan) {
            out.entry(host).or_default().add(&a);
        }
    }
    out
}

/// Every host of `plan` whose memory or CPUs cannot hold what the job asks there (with what
/// `reserved` by the other active jobs), naming host, resource, asked and available.
pub fn check_capacity(
    plan: &Plan,
    capacity: &BTreeMap<String, HostCapacity>,
    reserved: &BTreeMap<String, Asked>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let none = Asked::default();
    for (host, want) in asked(plan) {
        let Some(have) = capacity.get(&host) else {
            continue;
        };
        let others = reserved.get(&host).unwrap_or(&none);
        if have.memory_bytes > 0 && want.memory_nodes > 0 {
            let free = have.memory_bytes.saturating_sub(others.memory_bytes);
            if want.memory_bytes > free {
                problems.push(format!(
                    "host {host} cannot hold the memory job {} asks there: {} asked ({} node{} with a memory limit), {} available ({} on the host{})",
                    plan.job,
                    bytes(want.memory_bytes),
                    want.memory_nodes,
                    plural(want.memory_nodes),
                    bytes(free),
                    bytes(have.memory_bytes),
                    held_by_others(others.memory_bytes > 0, &bytes(others.memory_bytes)),
                ));
            }
        }
        if have.cpus > 0 && want.cpu_nodes > 0 {
            let free = (f64::from(have.cpus) - others.cpus).max(0.0);
            // a hair of slack for sums of fractions such as 0.1 + 0.2
            if want.cpus > free + 1e-9 {
                problems.push(format!(
                    "host {host} cannot hold the CPUs job {} asks there: {} asked ({} node{} with a CPU limit), {} available ({} on the host{})",
                    plan.job,
                    cpus(want.cpus),
                    want.cpu_nodes,
                    plural(want.cpu_nodes),
                    cpus(free),
                    have.cpus,
                    held_by_others(others.cpus > 0.0, &cpus(others.cpus)),
                ));
            }
        }
    }
    problems
}

/// How many bytes the containers of `plan` add to each of its hosts' desired states, with
/// the `existing` containers there (other jobs'), as the controller sends them: shared
/// ([`geomx_proto::templates::share`]), addresses still placeholders. Per host: (what the
/// job adds, the total).
pub fn state_bytes(
    plan: &Plan,
    existing: &BTreeMap<String, Vec<ContainerSpec>>,
) -> BTreeMap<String, (usize, usize)> {
    let mut out = BTreeMap::new();
    for host in plan.hosts() {
        let mut containers = existing.get(host).cloned().unwrap_or_default();
        let before = if containers.is_empty() {
            0
        } else {
            shared_len(containers.clone())
        };
        containers.extend(plan.nodes_on(host).map(|n| node_container_spec(plan, n)));
        let total = shared_len(containers);
        out.insert(host.to_owned(), (total.saturating_sub(before), total));
    }
    out
}

/// Every host whose desired state would pass `limit` (normally [`MAX_HOST_STATE_LEN`]) with
/// the job's containers added to the `existing` ones, naming limit and size.
pub fn check_state_sizes(
    plan: &Plan,
    existing: &BTreeMap<String, Vec<ContainerSpec>>,
    limit: usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (host, (adds, total)) in state_bytes(plan, existing) {
        if total > limit {
            let have = total.saturating_sub(adds);
            let others = if have > 0 {
                format!(" on top of {} of other jobs' containers", mib(have))
            } else {
                String::new()
            };
            problems.push(format!(
                "host {host}: job {} would add {} of container specs to its desired state{others}, {} in all: at most {} (an agent decodes at most {}); make [env] smaller or spread the jobs over more hosts",
                plan.job,
                mib(adds),
                mib(total),
                mib(limit),
                mib(geomx_proto::MAX_DESIRED_STATE_LEN)
            ));
        }
    }
    problems
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn held_by_others(any: bool, what: &str) -> String {
    if any {
        format!(", {what} held by other jobs' limits")
    } else {
        String::new()
    }
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// A byte count as `docker stats` shows it: `512MiB`, `7.6GiB`.
fn bytes(b: u64) -> String {
    let b = b as f64;
    let gib = f64::from(1u32 << 30);
    let mib = f64::from(1u32 << 20);
    if b >= gib {
        format!("{:.1}GiB", b / gib)
    } else {
        format!("{:.0}MiB", b / mib)
    }
}

fn cpus(c: f64) -> String {
    let s = format!("{c:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
name = "j"
mode = "hips"
image = "img"
[central]
host = "a"
[[party]]
name = "p"
hosts = ["b"]
workers = 2
[resources.workers]
memory = "3g"
cpus = 1.5
[resources.master]
memory = "1g"
"#;

    fn cap(gib: u64, cpus: u32) -> HostCapacity {
        HostCapacity {
            memory_bytes: gib << 30,
            cpus,
        }
    }

    #[test]
    fn a_host_too_small_is_named_with_resource_asked_and_available() {
        let plan = geomx_job::plan("t", JOB).expect("valid");
        let asked = asked(&plan);
        assert_eq!(asked["b"].memory_bytes, 6 << 30);
        assert_eq!(asked["b"].cpus, 3.0);
        assert_eq!(asked["a"].memory_bytes, 1 << 30);

        let big = BTreeMap::from([("a".into(), cap(8, 4)), ("b".into(), cap(8, 4))]);
        assert!(check_capacity(&plan, &big, &BTreeMap::new()).is_empty());

        let small = BTreeMap::from([("a".into(), cap(8, 4)), ("b".into(), cap(4, 2))]);
        let p = check_capacity(&plan, &small, &BTreeMap::new());
        assert_eq!(
            p,
            [
                "host b cannot hold the memory job j asks there: 6.0GiB asked (2 nodes with a memory limit), 4.0GiB available (4.0GiB on the host)",
                "host b cannot hold the CPUs job j asks there: 3 asked (2 nodes with a CPU limit), 2 available (2 on the host)",
            ]
        );

        // what other jobs hold counts
        let other =
            geomx_job::plan("t", &JOB.replace("name = \"j\"", "name = \"k\"")).expect("valid");
        let held = reserved([&other]);
        let p = check_capacity(&plan, &big, &held);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].ends_with(
                "2.0GiB available (8.0GiB on the host, 6.0GiB held by other jobs' limits)"
            ),
            "{}",
            p[0]
        );

        // unknown capacity is not checked
        let unknown = BTreeMap::from([("b".into(), HostCapacity::default())]);
        assert!(check_capacity(&plan, &unknown, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_desired_state_over_the_limit_is_refused_naming_limit_and_size() {
        let plan = geomx_job::plan("t", JOB).expect("valid");
        let none = BTreeMap::new();
        let sizes = state_bytes(&plan, &none);
        assert!(sizes["b"].0 > 100 && sizes["b"].0 < 4096, "{sizes:?}");
        assert_eq!(sizes["b"].0, sizes["b"].1);
        assert!(check_state_sizes(&plan, &none, MAX_HOST_STATE_LEN).is_empty());
        // other jobs' containers whose env is not shared with this one's
        let other = |i: usize| ContainerSpec {
            job: format!("other-{i}"),
            node: "w".into(),
            env: BTreeMap::from([("PAYLOAD".to_string(), "x".repeat(1 << 20))]),
            ..Default::default()
        };
        let full = BTreeMap::from([("b".to_string(), (0..8).map(other).collect::<Vec<_>>())]);
        let p = check_state_sizes(&plan, &full, MAX_HOST_STATE_LEN);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("host b: job j would add 0.0 MiB of container specs to its desired state on top of 8.0 MiB of other jobs' containers, 8.0 MiB in all: at most 8.0 MiB (an agent decodes at most 16.0 MiB)"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn a_big_env_on_many_nodes_counts_once() {
        // 128 workers with 40 KB of [env.all]: 5 MB as separate specs, one template shared
        let job = format!(
            "{}\n[env.all]\nPAYLOAD = \"{}\"\n",
            JOB.replace("workers = 2", "workers = 128"),
            "x".repeat(40_000)
        );
        let plan = geomx_job::plan("t", &job).expect("valid");
        let unshared: usize = plan
            .nodes_on("b")
            .map(|n| prost::Message::encoded_len(&node_container_spec(&plan, n)))
            .sum();
        let (adds, _) = state_bytes(&plan, &BTreeMap::new())["b"];
        assert!(unshared > 5_000_000, "{unshared}");
        assert!(adds < 200_000, "{adds}");
    }
}
