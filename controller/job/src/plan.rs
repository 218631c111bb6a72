//! The compiled plan: every role node of a job, with what it runs and what deploying it needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::UnresolvedAddress;
use crate::spec::{Cpus, ImagePull, Mode, MountType, Network, RestartPolicy};

/// The party name of the central nodes.
pub const CENTRAL_PARTY: &str = "central";

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The global scheduler (hips).
    GlobalScheduler,
    /// A global server (hips), also a server of the central party.
    GlobalServer,
    /// A local scheduler: the central scheduler or a party scheduler.
    Scheduler,
    /// A party server.
    Server,
    /// The master worker (hips): initializes the global servers.
    MasterWorker,
    /// A training worker (party or central).
    Worker,
}

impl Role {
    /// The name used in plans and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::GlobalScheduler => "global_scheduler",
            Role::GlobalServer => "global_server",
            Role::Scheduler => "scheduler",
            Role::Server => "server",
            Role::MasterWorker => "master_worker",
            Role::Worker => "worker",
        }
    }

    /// True for the global and local schedulers.
    pub fn is_scheduler(self) -> bool {
        matches!(self, Role::GlobalScheduler | Role::Scheduler)
    }
}

/// Job-level policy for the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// `never` or `on-failure`.
    pub restart: RestartPolicy,
    /// Restarts allowed with `on-failure`.
    pub max_restarts: u32,
    /// A worker with no progress for this long is stalled.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// GPUs each worker (and the master) gets.
    pub gpus_per_worker: u32,
    /// How long around the end of training a scheduler or server may exit non-zero without
    /// failing the job, and how long a worker that finished training may linger before
    /// geomx stops it (plans stored before the key existed: the default, 10s).
    #[serde(with = "humantime_serde", default = "default_teardown_grace")]
    pub teardown_grace: Duration,
    /// The wait before the first gang restart (doubled for each further one, capped); zero
    /// for none.
    #[serde(with = "humantime_serde", default)]
    pub restart_delay: Duration,
    /// A job still active this long after its submission fails; zero for no deadline.
    #[serde(with = "humantime_serde", default)]
    pub active_deadline: Duration,
    /// Exit codes that restart the job under `on-failure`; empty for any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_exit_codes: Vec<i32>,
    /// How long the schedulers' rendezvous may take once the job's nodes run (plans stored
    /// before the key existed: the default, 5m).
    #[serde(with = "humantime_serde", default = "default_rendezvous_timeout")]
    pub rendezvous_timeout: Duration,
    /// How long one host may take to pull the job's image (plans stored before the key
    /// existed: the default, 30m).
    #[serde(with = "humantime_serde", default = "default_pull_timeout")]
    pub pull_timeout: Duration,
}

impl Policy {
    /// The wait before restart number `n` (1 for the first): `restart_delay` doubled for
    /// each restart before it, at most [`crate::spec::RESTART_DELAY_CAP_SECS`] (never less
    /// than `restart_delay` itself).
    pub fn restart_delay_for(&self, n: u32) -> Duration {
        if self.restart_delay.is_zero() {
            return Duration::ZERO;
        }
        let cap = Duration::from_secs(crate::spec::RESTART_DELAY_CAP_SECS).max(self.restart_delay);
        let factor = 1u32 << n.saturating_sub(1).min(20);
        self.restart_delay.saturating_mul(factor).min(cap)
    }
}

fn default_rendezvous_timeout() -> Duration {
    humantime::parse_duration(crate::spec::DEFAULT_RENDEZVOUS_TIMEOUT)
        .unwrap_or(Duration::from_secs(300))
}

fn default_pull_timeout() -> Duration {
    humantime::parse_duration(crate::spec::DEFAULT_PULL_TIMEOUT)
        .unwrap_or(Duration::from_secs(1800))
}

fn default_teardown_grace() -> Duration {
    humantime::parse_duration(crate::DEFAULT_TEARDOWN_GRACE).unwrap_or(Duration::from_secs(10))
}

impl Policy {
    /// `stall_timeout` as people write it, e.g. `10m`.
    pub fn stall_timeout_text(&self) -> String {
        humantime::format_duration(self.stall_timeout).to_string()
    }
}

/// How to read training progress from a worker's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// A regex with named groups among `epoch`, `iteration`, `step`, `accuracy`, `loss`.
    pub regex: String,
    /// The line a worker prints once its training is done, if the job declares one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// The iteration a worker's training ends with, if the job declares it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u64>,
}

impl Progress {
    /// The compiled regex (validated when the job was parsed).
    pub fn compiled(&self) -> Result<regex::Regex, regex::Error> {
        crate::compile_progress_regex(&self.regex)
    }
}

/// One process of the job, in its own container (network "routed") or as a host-network
/// container on the single host (network "pseudo").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique within the job: `global-scheduler`, `a-worker-0`, ...
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its party; `central` for the central nodes.
    pub party: String,
    /// The host it runs on.
    pub host: String,
    /// The container image.
    pub image: String,
    /// argv.
    pub command: Vec<String>,
    /// Its environment. In network "routed", addresses known only at deploy time are
    /// `{{<node>.ip}}` placeholders: see [`Node::resolve_env`].
    pub env: BTreeMap<String, String>,
    /// The data slice of a training worker (`--data-slice-idx`).
    pub slice: Option<u32>,
    /// The port a scheduler binds (on its own address).
    pub binds: Option<u16>,
    /// The scheduler nodes it registers with.
    pub reaches: Vec<String>,
    /// GPUs to give the container.
    pub gpus: u32,
    /// What is mounted into the container, placeholders expanded.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// The container's resource limits.
    #[serde(default)]
    pub resources: Resources,
}

/// One mount of a node, placeholders expanded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// `bind` or `volume`.
    #[serde(rename = "type")]
    pub kind: MountType,
    /// The host path (bind) or the volume's name (volume).
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mounted read-only.
    pub readonly: bool,
    /// Volume driver; `None` for Docker's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Volume driver options.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

/// A node's resource limits; `None` leaves Docker's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPUs.
    pub cpus: Option<Cpus>,
    /// Most processes and threads ([`crate::DEFAULT_PIDS_LIMIT`] unless the job sets it).
    pub pids: Option<u64>,
    /// Size of `/dev/shm` in bytes.
    pub shm_size: Option<u64>,
}

/// The placeholder for a node's IP address in a routed plan: `{{<node>.ip}}`.
pub fn address_placeholder(node: &str) -> String {
    format!("{{{{{node}.ip}}}}")
}

/// Every `{{<node>.ip}}` in `value`, as (byte range, node name).
fn placeholders(value: &str) -> Vec<(std::ops::Range<usize>, &str)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(start) = value[from..].find("{{").map(|i| i + from) {
        let Some(end) = value[start..].find("}}").map(|i| i + start) else {
            break;
        };
        if let Some(node) = value[start + 2..end].strip_suffix(".ip") {
            found.push((start..end + 2, node));
        }
        from = end + 2;
    }
    found
}

impl Node {
    /// Names of the nodes whose IP address this node's environment needs (sorted, unique).
    /// A scheduler needs its own: it binds exactly the address in its `*_URI`. Empty in
    /// network "pseudo".
    pub fn depends_on(&self) -> BTreeSet<String> {
        self.env
            .values()
            .flat_map(|v| placeholders(v).into_iter().map(|(_, n)| n.to_string()))
            .collect()
    }

    /// The environment with every `{{<node>.ip}}` replaced by `ips(node)`.
    pub fn resolve_env(
        &self,
        ips: &impl Fn(&str) -> Option<Ipv4Addr>,
    ) -> Result<BTreeMap<String, String>, UnresolvedAddress> {
        let mut env = BTreeMap::new();
        for (name, value) in &self.env {
            let mut resolved = String::with_capacity(value.len());
            let mut last = 0;
            for (range, node) in placeholders(value) {
                let ip = ips(node).ok_or_else(|| UnresolvedAddress {
                    node: self.name.clone(),
                    variable: name.clone(),
                    needs: node.to_string(),
                })?;
                resolved.push_str(&value[last..range.start]);
                resolved.push_str(&ip.to_string());
                last = range.end;
            }
            resolved.push_str(&value[last..]);
            env.insert(name.clone(), resolved);
        }
        Ok(env)
    }
}

/// A compiled job: every node, in start order (schedulers of a group first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Job name.
    pub job: String,
    /// `hips` or `ps`.
    pub mode: Mode,
    /// `routed` or `pseudo`.
    pub network: Network,
    /// Controller policy.
    pub policy: Policy,
    /// Progress parsing for the agent.
    pub progress: Progress,
    /// Every node.
    pub nodes: Vec<Node>,
    /// The image as the job file names it.
    #[serde(default)]
    pub image: String,
    /// When hosts pull it (plans stored before the key existed: `never`, what geomx did).
    #[serde(default = "stored_image_pull")]
    pub image_pull: ImagePull,
    /// The reference every node runs once the controller pinned `image` at submit
    /// (`repo@sha256:...`; see [`Plan::pin_image`]); `None`: the nodes run `image` as named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

fn stored_image_pull() -> ImagePull {
    ImagePull::Never
}

impl Plan {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every host the job runs on (sorted).
    pub fn hosts(&self) -> BTreeSet<&str> {
        self.nodes.iter().map(|n| n.host.as_str()).collect()
    }

    /// The nodes on `host`, in plan order.
    pub fn nodes_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.iter().filter(move |n| n.host == host)
    }

    /// Pins the job's image: every node runs `pinned` (`repo@sha256:...`) from now on.
    pub fn pin_image(&mut self, pinned: &str) {
        for n in &mut self.nodes {
            pinned.clone_into(&mut n.image);
        }
        self.image_digest = Some(pinned.to_owned());
    }

    /// The container name of a node: `geomx.<job>.<node>`.
    pub fn container_name(&self, node: &str) -> String {
        format!("geomx.{}.{}", self.job, node)
    }
}

/// Serde for a `Duration` as a humantime string (`"10m"`).
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(env: &[(&str, &str)]) -> Node {
        Node {
            name: "a-server".into(),
            role: Role::Server,
            party: "a".into(),
            host: "b".into(),
            image: "img".into(),
            command: vec![],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            slice: None,
            binds: None,
            reaches: vec![],
            gpus: 0,
            mounts: vec![],
            resources: Resources::default(),
        }
    }

    #[test]
    fn placeholders_are_found_and_resolved() {
        let n = node(&[
            ("DMLC_PS_ROOT_URI", "{{a-scheduler.ip}}"),
            ("DMLC_PS_GLOBAL_ROOT_URI", "{{global-scheduler.ip}}"),
            ("X", "tcp://{{a-scheduler.ip}}:1 and {{not a placeholder}}"),
            ("DMLC_ROLE", "server"),
        ]);
        assert_eq!(
            n.depends_on().into_iter().collect::<Vec<_>>(),
            vec!["a-scheduler", "global-scheduler"]
        );
        let ips = |name: &str| match name {
            "a-scheduler" => Some(Ipv4Addr::new(172, 17, 29, 2)),
            "global-scheduler" => Some(Ipv4Addr::new(172, 17, 34, 2)),
            _ => None,
        };
        let env = n.resolve_env(&ips).expect("resolved");
        assert_eq!(env["DMLC_PS_ROOT_URI"], "172.17.29.2");
        assert_eq!(env["DMLC_PS_GLOBAL_ROOT_URI"], "172.17.34.2");
        assert_eq!(env["X"], "tcp://172.17.29.2:1 and {{not a placeholder}}");
        assert_eq!(env["DMLC_ROLE"], "server");

        let err = n
            .resolve_env(&|name: &str| (name == "a-scheduler").then_some(Ipv4Addr::LOCALHOST))
            .expect_err("global scheduler unknown");
        assert_eq!(err.needs, "global-scheduler");
        assert_eq!(err.variable, "DMLC_PS_GLOBAL_ROOT_URI");
    }

    #[test]
    fn placeholder_format() {
        assert_eq!(
            address_placeholder("central-scheduler"),
            "{{central-scheduler.ip}}"
        );
    }
}
