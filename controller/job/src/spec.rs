//! The job file format: what a `job.toml` may contain, with its defaults.
//!
//! These structs are the file, key for key (`deny_unknown_fields` everywhere). Counts and
//! ports are read as signed integers so that a negative or huge value reaches validation and
//! gets a message that says what the allowed range is. [`crate::parse`] reads and validates a
//! file; a `JobSpec` built in code should be checked with [`JobSpec::validate`] before
//! [`crate::compile`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default `interface` (`DMLC_INTERFACE`).
pub const DEFAULT_INTERFACE: &str = "eth0";
/// Default `[central].global_scheduler_port`.
pub const DEFAULT_GLOBAL_SCHEDULER_PORT: i64 = 9092;
/// Default `[central].scheduler_port`.
pub const DEFAULT_CENTRAL_SCHEDULER_PORT: i64 = 9093;
/// Default scheduler port of the first `[[party]]`; party `i` (0-based) defaults to this + i.
pub const DEFAULT_FIRST_PARTY_SCHEDULER_PORT: i64 = 9094;
/// Default `[policy].stall_timeout`.
pub const DEFAULT_STALL_TIMEOUT: &str = "10m";
/// Default `[policy].teardown_grace`: how long around the end of training a scheduler or
/// server may crash (GeoMX's `ps::Finalize` segfaults) and a finished worker may linger.
pub const DEFAULT_TEARDOWN_GRACE: &str = "10s";
/// Default `[policy].rendezvous_timeout`: how long the schedulers' rendezvous may take.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: &str = "5m";
/// Default `[policy].pull_timeout`: how long one host may take to pull the job's image.
pub const DEFAULT_PULL_TIMEOUT: &str = "30m";
/// [`DEFAULT_PULL_TIMEOUT`] as a duration.
pub const DEFAULT_PULL_TIMEOUT_DURATION: Duration = Duration::from_secs(30 * 60);
/// Longest `[policy].teardown_grace`.
pub const TEARDOWN_GRACE_MAX_SECS: u64 = 3600;
/// The longest wait between two gang restarts, however `[policy].restart_delay` doubles.
pub const RESTART_DELAY_CAP_SECS: u64 = 300;
/// Default `[policy].max_restarts` when `restart = "on-failure"` and it is not given.
pub const DEFAULT_MAX_RESTARTS_ON_FAILURE: i64 = 3;
/// Default scheduler and server command.
pub const DEFAULT_SCHEDULER_COMMAND: [&str; 3] = ["python", "-c", "import mxnet"];
/// Default worker command. `{slice}` is replaced by the worker's data slice.
pub const DEFAULT_WORKER_COMMAND: [&str; 5] = [
    "python",
    "/root/GeoMX/examples/cnn.py",
    "--data-slice-idx",
    SLICE_PLACEHOLDER,
    "--cpu",
];
/// The placeholder for a worker's data slice in `[command].worker`.
pub const SLICE_PLACEHOLDER: &str = "{slice}";
/// The option that carries the data slice when a worker command has no `{slice}`.
pub const SLICE_OPTION: &str = "--data-slice-idx";
/// The progress line GeoMX's examples print, e.g.
/// `[Time 12.345][Epoch 0][Iteration 17] Test Acc 0.9312`; used when `[progress]` is absent.
pub const DEFAULT_PROGRESS_REGEX: &str =
    r"\[Epoch (?P<epoch>\d+)\]\[Iteration (?P<iteration>\d+)\] Test Acc (?P<accuracy>[0-9.eE+-]+)";
/// The pids limit of every container whose job sets no `pids` (a fork bomb in one container
/// cannot exhaust the host's process table).
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;
/// Named groups a `[progress].regex` may use.
pub const PROGRESS_GROUPS: [&str; 5] = ["epoch", "iteration", "step", "accuracy", "loss"];

/// Limits geomx enforces; a job beyond them is refused as absurd (documented in
/// `docs/job-file.md`).
pub mod limits {
    /// Longest job name.
    pub const JOB_NAME_MAX: usize = 40;
    /// Longest party or host name.
    pub const NAME_MAX: usize = 63;
    /// Most `[[party]]` tables.
    pub const PARTIES_MAX: i64 = 64;
    /// Most hosts listed by one party.
    pub const HOSTS_PER_PARTY_MAX: usize = 64;
    /// Most workers in one party (and most central training workers).
    pub const WORKERS_PER_PARTY_MAX: i64 = 1024;
    /// Most global servers (hips) or party servers (ps).
    pub const SERVERS_MAX: i64 = 64;
    /// Most nodes (processes) one job may compile to.
    pub const NODES_MAX: i64 = 4096;
    /// Lowest port a scheduler may bind: privileged ports are refused.
    pub const PORT_MIN: i64 = 1024;
    /// Highest port.
    pub const PORT_MAX: i64 = 65535;
    /// Ports geomx itself uses on every host (controller, agent API, agent heartbeat).
    pub const RESERVED_PORTS: [i64; 3] = [7946, 7947, 7948];
    /// Highest `verbose` (`PS_VERBOSE`).
    pub const VERBOSE_MAX: i64 = 2;
    /// Most restarts of a job.
    pub const MAX_RESTARTS_MAX: i64 = 100;
    /// Most GPUs per worker.
    pub const GPUS_PER_WORKER_MAX: i64 = 16;
    /// Shortest stall timeout, in seconds.
    pub const STALL_TIMEOUT_MIN_SECS: u64 = 10;
    /// Longest stall timeout, in seconds (7 days).
    pub const STALL_TIMEOUT_MAX_SECS: u64 = 7 * 24 * 3600;
    /// Longest `[progress].regex`, in bytes.
    pub const PROGRESS_REGEX_MAX_LEN: usize = 1024;
    /// Longest image reference.
    pub const IMAGE_MAX: usize = 255;
    /// Longest interface name (Linux IFNAMSIZ - 1).
    pub const INTERFACE_MAX: usize = 15;
    /// Most bytes a compiled plan may take (see [`crate::plan_bytes_estimate`]): about what
    /// the controller stores for the job and adds to its hosts' desired states.
    pub const PLAN_BYTES_MAX: u64 = 8 << 20;
    /// Most `[[mount]]` tables.
    pub const MOUNTS_MAX: usize = 32;
    /// Longest mount source or target, in bytes.
    pub const MOUNT_PATH_MAX: usize = 1024;
    /// Most driver options of one volume.
    pub const MOUNT_OPTIONS_MAX: usize = 32;
    /// Longest volume driver option (key or value), in bytes.
    pub const MOUNT_OPTION_MAX: usize = 1024;
    /// Smallest `memory` (Docker refuses less than 6 MiB).
    pub const MEMORY_MIN: u64 = 6 << 20;
    /// Largest `memory` and `shm_size` (1 TiB).
    pub const MEMORY_MAX: u64 = 1 << 40;
    /// Smallest `shm_size` (1 MiB).
    pub const SHM_SIZE_MIN: u64 = 1 << 20;
    /// Fewest CPUs (`cpus`).
    pub const CPUS_MIN: f64 = 0.01;
    /// Most CPUs (`cpus`).
    pub const CPUS_MAX: f64 = 1024.0;
    /// Smallest `pids` (a GeoMX process needs a few dozen threads).
    pub const PIDS_MIN: i64 = 16;
    /// Largest `pids`.
    pub const PIDS_MAX: i64 = 1 << 22;
}

/// Which parameter-server architecture the job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// GeoMX hierarchical parameter servers: a central party and training parties.
    Hips,
    /// Single-layer MXNet / ps-lite: one party, its scheduler, servers and workers.
    Ps,
}

impl Mode {
    /// The name used in job files and plans.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hips => "hips",
            Mode::Ps => "ps",
        }
    }
}

/// How nodes reach each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Every node in its own container with a routable IP (multi-host); addresses are filled
    /// in at deploy time (`{{<node>.ip}}`).
    #[default]
    Routed,
    /// Every node on one host, host networking, every address 127.0.0.1.
    Pseudo,
}

impl Network {
    /// The name used in job files and plans.
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Routed => "routed",
            Network::Pseudo => "pseudo",
        }
    }
}

/// When a host pulls the job's image (`image_pull`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImagePull {
    /// Pull where the image is missing (the default). The controller pins the reference
    /// to the digest its registry serves at submit unless every host of the job has the
    /// tag already; hosts then pull that digest.
    #[default]
    IfNotPresent,
    /// Resolve the reference in its registry at every submit and run that digest on every
    /// host, pulling it where it is missing (a tag moved since the last job is followed).
    Always,
    /// Never pull: the image must be on every host of the job at submit, else the job is
    /// refused (load it there with `docker load`).
    Never,
}

impl ImagePull {
    /// The name used in job files and plans.
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePull::IfNotPresent => "if-not-present",
            ImagePull::Always => "always",
            ImagePull::Never => "never",
        }
    }
}

/// What the controller does when a node of the job fails or stalls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// The job fails; nothing is restarted.
    #[default]
    Never,
    /// The whole job (every node, as a gang) is restarted, up to `max_restarts` times.
    OnFailure,
}

impl RestartPolicy {
    /// The name used in job files and plans.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
        }
    }
}

/// A job file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Job name: `[a-z0-9-]`, 1..=40 characters, starting and ending with a letter or digit.
    pub name: String,
    /// `hips` or `ps`.
    pub mode: Mode,
    /// Container image every node runs.
    pub image: String,
    /// When hosts pull `image`: `if-not-present` (default), `always` or `never`.
    #[serde(default)]
    pub image_pull: ImagePull,
    /// `routed` (default) or `pseudo`.
    #[serde(default)]
    pub network: Network,
    /// `DMLC_INTERFACE`; `None` means [`DEFAULT_INTERFACE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `PS_VERBOSE` (0..=2); `None` leaves it unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verbose: Option<i64>,
    /// Commands per role class.
    #[serde(default)]
    pub command: CommandSpec,
    /// Extra environment per role class.
    #[serde(default)]
    pub env: EnvSpec,
    /// The central party (`mode = "hips"` only, and required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central: Option<CentralSpec>,
    /// The training parties (`[[party]]`), in file order.
    #[serde(default, rename = "party")]
    pub parties: Vec<PartySpec>,
    /// What the controller does on failure or stall.
    #[serde(default)]
    pub policy: PolicySpec,
    /// How to read training progress from worker output; `None` means
    /// [`DEFAULT_PROGRESS_REGEX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressSpec>,
    /// Host paths and named volumes mounted into the nodes (`[[mount]]`), in file order.
    #[serde(default, rename = "mount", skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// Resource limits per role class (`[resources.<class>]`).
    #[serde(default, skip_serializing_if = "ResourcesSpec::is_empty")]
    pub resources: ResourcesSpec,
}

/// What a `[[mount]]` mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountType {
    /// A path of the node's host, which must exist there.
    Bind,
    /// A Docker named volume, created (with `driver` and `options`) when missing.
    Volume,
}

impl MountType {
    /// The name used in job files and plans.
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Volume => "volume",
        }
    }
}

/// `[[mount]]`: a host path or a named volume in the containers of some role classes.
///
/// `source` may hold the placeholders [`MOUNT_PLACEHOLDERS`], expanded per node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// `bind` or `volume`.
    #[serde(rename = "type")]
    pub kind: MountType,
    /// A bind's absolute host path, or a volume's name.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Role classes whose nodes get the mount (`all`, `schedulers`, `servers`, `master`,
    /// `workers`); `None` means `["all"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Mounted read-only (default true).
    #[serde(default = "yes")]
    pub readonly: bool,
    /// Volume driver (volumes only); `None` is Docker's default (`local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Volume driver options (volumes only), e.g. NFS's `type`, `o`, `device`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

/// Placeholders a mount's `source` may use, expanded per node.
pub const MOUNT_PLACEHOLDERS: [&str; 4] = ["{job}", "{party}", "{node}", "{host}"];

/// Role classes of `[env]`, `[[mount]].roles` and `[resources.<class>]`.
pub const ROLE_CLASSES: [&str; 5] = ["all", "schedulers", "servers", "master", "workers"];

/// A CPU count (`cpus = 2.5`): a float that validation keeps finite and positive.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cpus(pub f64);

// Valid jobs only hold finite values, for which `==` is an equivalence.
impl Eq for Cpus {}

/// The limits of one role class; unset keys inherit from `all`, then Docker's (or geomx's
/// host-protecting) defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    /// Memory limit, e.g. `"8g"`, `"512m"` (units b, k, m, g, t: powers of 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPUs, e.g. `2.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    /// Most processes and threads in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// Size of `/dev/shm`, e.g. `"2g"` (Docker's default is 64m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<String>,
}

impl ResourceLimits {
    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        *self == ResourceLimits::default()
    }

    /// `self` with every unset key taken from `base`.
    pub fn or(&self, base: &ResourceLimits) -> ResourceLimits {
        ResourceLimits {
            memory: self.memory.clone().or_else(|| base.memory.clone()),
            cpus: self.cpus.or(base.cpus),
            pids: self.pids.or(base.pids),
            shm_size: self.shm_size.clone().or_else(|| base.shm_size.clone()),
        }
    }
}

/// `[resources]`: limits per role class, merged all → class (the class wins, key by key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSpec {
    /// Every node.
    #[serde(default, skip_serializing_if = "ResourceLimits::is_empty")]
    pub all: ResourceLimits,
    /// Global and local schedulers.
    #[serde(default, skip_serializing_if = "ResourceLimits::is_empty")]
    pub schedulers: ResourceLimits,
    /// Global and party servers.
    #[serde(default, skip_serializing_if = "ResourceLimits::is_empty")]
    pub servers: ResourceLimits,
    /// The master worker (hips only).
    #[serde(default, skip_serializing_if = "ResourceLimits::is_empty")]
    pub master: ResourceLimits,
    /// Training workers (party and central ones), not the master.
    #[serde(default, skip_serializing_if = "ResourceLimits::is_empty")]
    pub workers: ResourceLimits,
}

impl ResourcesSpec {
    /// True when no class sets anything.
    pub fn is_empty(&self) -> bool {
        *self == ResourcesSpec::default()
    }

    /// Every class with its name, in [`ROLE_CLASSES`] order.
    pub fn classes(&self) -> [(&'static str, &ResourceLimits); 5] {
        [
            ("all", &self.all),
            ("schedulers", &self.schedulers),
            ("servers", &self.servers),
            ("master", &self.master),
            ("workers", &self.workers),
        ]
    }
}

/// `[command]`: argv lists per role class. `None` means the default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Global and local schedulers; default [`DEFAULT_SCHEDULER_COMMAND`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Vec<String>>,
    /// Global and party servers; default [`DEFAULT_SCHEDULER_COMMAND`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<Vec<String>>,
    /// Training workers; default [`DEFAULT_WORKER_COMMAND`]. `{slice}` is replaced by the
    /// worker's data slice; without it, `--data-slice-idx N` is appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<Vec<String>>,
    /// The master worker (hips only); default: the worker command without its slice
    /// arguments. May not contain `{slice}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<Vec<String>>,
}

/// `[env]`: extra variables per role class, merged all → class (later wins).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSpec {
    /// Every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub all: BTreeMap<String, String>,
    /// Global and local schedulers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schedulers: BTreeMap<String, String>,
    /// Global and party servers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub servers: BTreeMap<String, String>,
    /// The master worker (hips only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub master: BTreeMap<String, String>,
    /// Training workers (party and central ones), not the master.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub workers: BTreeMap<String, String>,
}

/// `[central]`: the central party of a hips job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralSpec {
    /// Host of every central node.
    pub host: String,
    /// Port the global scheduler binds.
    #[serde(default = "default_global_scheduler_port")]
    pub global_scheduler_port: i64,
    /// Port the central (local) scheduler binds.
    #[serde(default = "default_central_scheduler_port")]
    pub scheduler_port: i64,
    /// Number of global servers, S_g.
    #[serde(default = "one")]
    pub global_servers: i64,
    /// Central training workers besides the master; > 0 turns central training on.
    #[serde(default)]
    pub workers: i64,
}

/// `[[party]]`: one training party (a data center).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartySpec {
    /// Party name: `[a-z0-9-]`, 1..=63 characters; `central` and `global` are reserved.
    pub name: String,
    /// Hosts: scheduler and server(s) on the first, workers round-robin over all.
    pub hosts: Vec<String>,
    /// Number of workers, W_p.
    pub workers: i64,
    /// Port the party scheduler binds; `None` means
    /// [`DEFAULT_FIRST_PARTY_SCHEDULER_PORT`] + the party's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_port: Option<i64>,
    /// Number of servers: exactly 1 in hips; 1..=64 in ps.
    #[serde(default = "one")]
    pub servers: i64,
}

/// `[policy]`: used by the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// `never` (default) or `on-failure`.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Restarts allowed with `on-failure`; default 0 with `never`, 3 with `on-failure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<i64>,
    /// A worker with no progress for this long is stalled (humantime, e.g. `10m`); default
    /// [`DEFAULT_STALL_TIMEOUT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_timeout: Option<String>,
    /// GPUs per worker (and master); 0 = none.
    #[serde(default)]
    pub gpus_per_worker: i64,
    /// How long around the end of training a scheduler or server may exit non-zero without
    /// failing the job, and how long a worker that finished training may still run before
    /// geomx stops it (humantime); default [`DEFAULT_TEARDOWN_GRACE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teardown_grace: Option<String>,
    /// How long after the job's nodes run every scheduler's rendezvous may take before the
    /// job fails naming the nodes that never registered (humantime); default
    /// [`DEFAULT_RENDEZVOUS_TIMEOUT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous_timeout: Option<String>,
    /// How long one host may take to pull the job's image, retries of transient errors
    /// included, before the job fails naming host, image and cause (humantime); default
    /// [`DEFAULT_PULL_TIMEOUT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_timeout: Option<String>,
    /// With `on-failure`: the wait before the first gang restart, doubled for each further
    /// one, at most [`RESTART_DELAY_CAP_SECS`] (humantime); default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_delay: Option<String>,
    /// A job still active this long after its submission fails, restarts or not
    /// (humantime); default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline: Option<String>,
    /// With `on-failure`: only a node exiting with one of these codes restarts the job (a
    /// failure without an exit code, a stall or a missing node, always may); default: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_exit_codes: Option<Vec<i64>>,
}

/// `[progress]`: how a worker's output shows training progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressSpec {
    /// A regex with named groups among `epoch`, `iteration`, `step`, `accuracy`, `loss`, at
    /// least `iteration` or `step`; default [`DEFAULT_PROGRESS_REGEX`].
    #[serde(default = "default_progress_regex")]
    pub regex: String,
    /// A regex matching the line a worker prints once training is done: a worker that
    /// printed it counts as finished even if its process never exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// The iteration a worker's training ends with: a worker whose progress reached it
    /// counts as finished even if its process never exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<i64>,
}

fn default_progress_regex() -> String {
    DEFAULT_PROGRESS_REGEX.to_owned()
}

fn one() -> i64 {
    1
}
fn yes() -> bool {
    true
}
fn default_global_scheduler_port() -> i64 {
    DEFAULT_GLOBAL_SCHEDULER_PORT
}
fn default_central_scheduler_port() -> i64 {
    DEFAULT_CENTRAL_SCHEDULER_PORT
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl JobSpec {
    /// `DMLC_INTERFACE` of every node.
    pub fn interface(&self) -> &str {
        self.interface.as_deref().unwrap_or(DEFAULT_INTERFACE)
    }

    /// The scheduler command in effect.
    pub fn scheduler_command(&self) -> Vec<String> {
        self.command
            .scheduler
            .clone()
            .unwrap_or_else(|| owned(&DEFAULT_SCHEDULER_COMMAND))
    }

    /// The server command in effect.
    pub fn server_command(&self) -> Vec<String> {
        self.command
            .server
            .clone()
            .unwrap_or_else(|| owned(&DEFAULT_SCHEDULER_COMMAND))
    }

    /// The worker command in effect (still holding `{slice}` if it has one).
    pub fn worker_command(&self) -> Vec<String> {
        self.command
            .worker
            .clone()
            .unwrap_or_else(|| owned(&DEFAULT_WORKER_COMMAND))
    }

    /// The master command in effect: as given, or the worker command without its slice
    /// arguments (every argument holding `{slice}`, and the option just before a bare
    /// `{slice}` when it starts with `-`).
    pub fn master_command(&self) -> Vec<String> {
        match &self.command.master {
            Some(master) => master.clone(),
            None => strip_slice_args(&self.worker_command()),
        }
    }

    /// The scheduler port of party `index` in effect.
    pub fn party_scheduler_port(&self, index: usize) -> i64 {
        match self.parties.get(index) {
            Some(PartySpec {
                scheduler_port: Some(port),
                ..
            }) => *port,
            _ => DEFAULT_FIRST_PARTY_SCHEDULER_PORT.saturating_add(index as i64),
        }
    }

    /// The progress regex in effect.
    pub fn progress_regex(&self) -> &str {
        self.progress
            .as_ref()
            .map_or(DEFAULT_PROGRESS_REGEX, |p| p.regex.as_str())
    }
}

impl PolicySpec {
    /// `max_restarts` in effect.
    pub fn max_restarts(&self) -> i64 {
        self.max_restarts.unwrap_or(match self.restart {
            RestartPolicy::Never => 0,
            RestartPolicy::OnFailure => DEFAULT_MAX_RESTARTS_ON_FAILURE,
        })
    }

    /// `stall_timeout` as written (or the default).
    pub fn stall_timeout_text(&self) -> &str {
        self.stall_timeout
            .as_deref()
            .unwrap_or(DEFAULT_STALL_TIMEOUT)
    }

    /// `stall_timeout` parsed.
    pub fn stall_timeout(&self) -> Result<Duration, humantime::DurationError> {
        humantime::parse_duration(self.stall_timeout_text())
    }

    /// `teardown_grace` as written (or the default).
    pub fn teardown_grace_text(&self) -> &str {
        self.teardown_grace
            .as_deref()
            .unwrap_or(DEFAULT_TEARDOWN_GRACE)
    }

    /// `teardown_grace` parsed.
    pub fn teardown_grace(&self) -> Result<Duration, humantime::DurationError> {
        humantime::parse_duration(self.teardown_grace_text())
    }

    /// `rendezvous_timeout` as written (or the default).
    pub fn rendezvous_timeout_text(&self) -> &str {
        self.rendezvous_timeout
            .as_deref()
            .unwrap_or(DEFAULT_RENDEZVOUS_TIMEOUT)
    }

    /// `rendezvous_timeout` parsed.
    pub fn rendezvous_timeout(&self) -> Result<Duration, humantime::DurationError> {
        humantime::parse_duration(self.rendezvous_timeout_text())
    }

    /// `pull_timeout` as written (or the default).
    pub fn pull_timeout_text(&self) -> &str {
        self.pull_timeout.as_deref().unwrap_or(DEFAULT_PULL_TIMEOUT)
    }

    /// `pull_timeout` parsed.
    pub fn pull_timeout(&self) -> Result<Duration, humantime::DurationError> {
        humantime::parse_duration(self.pull_timeout_text())
    }
}

/// Removes the slice arguments from a worker command (see [`JobSpec::master_command`]).
pub(crate) fn strip_slice_args(worker: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(worker.len());
    for arg in worker {
        if arg == SLICE_PLACEHOLDER {
            if out.last().is_some_and(|prev| prev.starts_with('-')) {
                out.pop();
            }
        } else if !arg.contains(SLICE_PLACEHOLDER) {
            out.push(arg.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        owned(args)
    }

    #[test]
    fn master_default_drops_the_slice_option_and_value() {
        assert_eq!(
            strip_slice_args(&owned(&DEFAULT_WORKER_COMMAND)),
            v(&["python", "/root/GeoMX/examples/cnn.py", "--cpu"])
        );
        assert_eq!(
            strip_slice_args(&v(&["python", "t.py", "--data-slice-idx={slice}", "--cpu"])),
            v(&["python", "t.py", "--cpu"])
        );
        assert_eq!(
            strip_slice_args(&v(&["python", "t.py", "{slice}"])),
            v(&["python", "t.py"])
        );
        assert_eq!(
            strip_slice_args(&v(&["python", "t.py", "--cpu"])),
            v(&["python", "t.py", "--cpu"])
        );
    }

    #[test]
    fn default_progress_regex_reads_geomx_progress_lines() {
        let re = crate::compile_progress_regex(DEFAULT_PROGRESS_REGEX).expect("compiles");
        let caps = re
            .captures("[Time 12.345][Epoch 0][Iteration 17] Test Acc 0.9312")
            .expect("matches");
        assert_eq!(&caps["epoch"], "0");
        assert_eq!(&caps["iteration"], "17");
        assert_eq!(&caps["accuracy"], "0.9312");
        assert!(
            re.captures("Start training on 4 workers, my rank is 0.")
                .is_none()
        );
    }

    #[test]
    fn policy_defaults_depend_on_restart() {
        let mut p = PolicySpec::default();
        assert_eq!(p.max_restarts(), 0);
        assert_eq!(p.stall_timeout().ok(), Some(Duration::from_secs(600)));
        p.restart = RestartPolicy::OnFailure;
        assert_eq!(p.max_restarts(), 3);
        p.max_restarts = Some(7);
        assert_eq!(p.max_restarts(), 7);
    }
}
