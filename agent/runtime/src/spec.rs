//! What a role container must be: [`ContainerSpec`], its Docker name, labels and spec hash,
//! and the Docker create body made from it.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig, Mount as DockerMount,
    MountType as DockerMountType, MountVolumeOptions, MountVolumeOptionsDriverConfig,
    RestartPolicy, RestartPolicyNameEnum,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// Label every geomx container carries (`true`).
pub const LABEL_MANAGED: &str = "io.geomx.managed";
/// Label: job name.
pub const LABEL_JOB: &str = "io.geomx.job";
/// Label: node name within the job.
pub const LABEL_NODE: &str = "io.geomx.node";
/// Label: role (global_scheduler, global_server, scheduler, server, master_worker, worker).
pub const LABEL_ROLE: &str = "io.geomx.role";
/// Label: party name ("central" for the central party).
pub const LABEL_PARTY: &str = "io.geomx.party";
/// Label: id of the controller state the container was made for.
pub const LABEL_CONTROLLER: &str = "io.geomx.controller";
/// Label: attempt number of the job.
pub const LABEL_GENERATION: &str = "io.geomx.generation";
/// Label: [`ContainerSpec::spec_hash`] of the spec the container was made from.
pub const LABEL_SPEC: &str = "io.geomx.spec";
/// Label: the spec's custom progress regex, if any (so that an adopting agent parses the
/// container's output the same way before it has seen the desired state).
pub const LABEL_PROGRESS_REGEX: &str = "io.geomx.progress-regex";

/// Label: what the container is for, [`ContainerKind`] (`role` or `sandbox`); a geomx
/// container without it is a role container.
pub const LABEL_KIND: &str = "io.geomx.kind";
/// Label: the random nonce of the container's creation (see [`crate::ownership`]); not
/// part of the spec hash.
pub const LABEL_CREATION: &str = "io.geomx.creation";

/// Env var naming the job, set in every container.
pub const ENV_JOB: &str = "GEOMX_JOB";
/// Env var naming the node, set in every container.
pub const ENV_NODE: &str = "GEOMX_NODE";
/// Env var with the base URL of the agent's heartbeat endpoint, set in every container.
pub const ENV_AGENT_URL: &str = "GEOMX_AGENT_URL";
/// Env var set to `1` in every role container unless the spec sets it: Python block-buffers
/// its output when it is not a terminal, so progress lines would reach the output follower
/// late (or only at exit) and a healthy node would look stalled.
pub const ENV_PYTHONUNBUFFERED: &str = "PYTHONUNBUFFERED";

/// The pids limit of a role container whose spec sets none: a fork bomb in one container
/// cannot exhaust the host's process table.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;
/// Log driver of every role container (Docker's `json-file`, rotated).
pub const LOG_DRIVER: &str = "json-file";
/// Size at which a role container's log file is rotated (`max-size`).
pub const LOG_MAX_SIZE: &str = "50m";
/// Rotated log files kept per role container (`max-file`): at most 150 MB of log each.
pub const LOG_MAX_FILE: &str = "3";
/// Security options of every role container: no process gains privileges through setuid
/// binaries or file capabilities.
pub const SECURITY_OPTS: [&str; 1] = ["no-new-privileges:true"];
/// Capabilities dropped from every role container (raw sockets: spoofed packets, ARP
/// games on the bridge); everything else is Docker's default set.
pub const CAP_DROP: [&str; 1] = ["NET_RAW"];

/// What a [`Mount`] mounts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// A host path, which must exist.
    #[default]
    Bind,
    /// A Docker named volume, created (with its driver and options) if missing.
    Volume,
}

/// One mount of a role container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mount {
    /// Bind or volume.
    pub kind: MountKind,
    /// The host path (bind) or the volume's name (volume).
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mounted read-only.
    pub readonly: bool,
    /// Volume driver; `None` for Docker's default (`local`).
    pub driver: Option<String>,
    /// Volume driver options.
    pub options: BTreeMap<String, String>,
}

/// Resource limits of a role container; 0 means unset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// CPUs in billionths (Docker's `NanoCpus`).
    pub nano_cpus: u64,
    /// Most processes and threads; 0 for [`DEFAULT_PIDS_LIMIT`].
    pub pids: u64,
    /// Size of `/dev/shm` in bytes; 0 for Docker's default.
    pub shm_size_bytes: u64,
}

impl Resources {
    /// The pids limit in effect.
    pub fn pids_limit(&self) -> u64 {
        if self.pids == 0 {
            DEFAULT_PIDS_LIMIT
        } else {
            self.pids
        }
    }

    /// Whether these limits are what a spec without any gets (so that the spec hash of
    /// such a container stays what it was before limits existed).
    fn is_default(&self) -> bool {
        Resources {
            pids: self.pids_limit(),
            ..*self
        } == Resources {
            pids: DEFAULT_PIDS_LIMIT,
            ..Resources::default()
        }
    }
}

/// One role container of a job, as the controller wants it on this host.
///
/// The agent daemon converts `geomx.v1.ContainerSpec` (plus `DesiredState.controller_id`)
/// into this type; an empty `progress_regex` in the proto becomes `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Job name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
    pub job: String,
    /// Node name within the job, e.g. "a-worker-0" (same character set).
    pub node: String,
    /// Role: global_scheduler, global_server, scheduler, server, master_worker, worker.
    pub role: String,
    /// Party name, "central" for the central party.
    pub party: String,
    /// Image reference (normally pinned by the controller: `repo@sha256:...`).
    pub image: String,
    /// Whether the agent may pull `image` when it is missing. Not part of the spec hash.
    #[serde(default)]
    pub image_pull: ImagePull,
    /// Bound of one pull of `image` in milliseconds; 0 for the default (30 minutes). Not
    /// part of the spec hash.
    #[serde(default)]
    pub pull_timeout_ms: u64,
    /// Command argv; empty for the image's default command.
    pub command: Vec<String>,
    /// Environment (scheduler addresses already filled in). `GEOMX_JOB`, `GEOMX_NODE` and
    /// `GEOMX_AGENT_URL` are added by the runtime and override entries of the same name;
    /// `PYTHONUNBUFFERED=1` is added unless the spec sets `PYTHONUNBUFFERED` itself.
    pub env: BTreeMap<String, String>,
    /// Host networking (network "pseudo") instead of docker0.
    pub host_network: bool,
    /// GPUs to request through a Docker device request; 0 for none.
    pub gpus: u32,
    /// Attempt number of the job (0 first, +1 per whole-job restart).
    pub generation: u32,
    /// Extra progress regex with named groups (epoch, iteration, accuracy, step);
    /// `None` for the default parsers only.
    pub progress_regex: Option<String>,
    /// The regex of the line that ends training (`[progress].finished`); `None` for none.
    #[serde(default)]
    pub finished_regex: Option<String>,
    /// The controller's state id, stored as label `io.geomx.controller`.
    pub controller_id: String,
    /// Create and start the role container now (its env is complete). While false only
    /// the network sandbox exists (if `sandbox`) or nothing.
    pub start: bool,
    /// Give the node a network sandbox so that its docker0 address is known before its
    /// role container exists (a scheduler's env names its own address); otherwise the
    /// role container starts directly on docker0. Ignored with host networking.
    pub sandbox: bool,
    /// What to mount into the role container.
    pub mounts: Vec<Mount>,
    /// Resource limits of the role container.
    pub resources: Resources,
}

/// Whether a missing image may be pulled (`ContainerSpec.image_pull` of the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImagePull {
    /// A missing image fails the node (also what an empty value from a controller before
    /// pulls means).
    #[default]
    Never,
    /// Pull the image when it is missing.
    IfNotPresent,
    /// Pull what is missing (the controller pinned the reference to a digest, so a present
    /// digest is the right image).
    Always,
}

impl ImagePull {
    /// From the wire: "if-not-present", "always"; anything else is "never".
    pub fn from_wire(s: &str) -> ImagePull {
        match s.trim() {
            "if-not-present" => ImagePull::IfNotPresent,
            "always" => ImagePull::Always,
            _ => ImagePull::Never,
        }
    }

    /// Whether a missing image may be pulled.
    pub fn may_pull(self) -> bool {
        self != ImagePull::Never
    }
}

/// Identifies a node on a host: (job, node).
pub type NodeKey = (String, String);

/// The two containers of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContainerKind {
    /// The network sandbox of a docker0 node: a small container that only holds the
    /// node's network namespace, so that its IP is known before the role container
    /// exists (the pattern of a Kubernetes pod's pause container).
    Sandbox,
    /// The role container: the GeoMX process itself (joins the sandbox's network, if any).
    Role,
}

impl ContainerKind {
    /// The value of label `io.geomx.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerKind::Sandbox => "sandbox",
            ContainerKind::Role => "role",
        }
    }

    /// The kind of a container from its labels (no label: a role container).
    pub fn of_labels(labels: &HashMap<String, String>) -> ContainerKind {
        match labels.get(LABEL_KIND).map(String::as_str) {
            Some("sandbox") => ContainerKind::Sandbox,
            _ => ContainerKind::Role,
        }
    }
}

/// How network sandboxes are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The sandbox image; `None` for the node's own image (always present, since the role
    /// container needs it too).
    pub image: Option<String>,
    /// The sandbox's argv (set as entrypoint); it must run until stopped. The default
    /// needs `/bin/sh` and `sleep` in the image and ends at once on SIGTERM.
    pub command: Vec<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            image: None,
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
            ],
        }
    }
}

impl ContainerSpec {
    /// (job, node).
    pub fn key(&self) -> NodeKey {
        (self.job.clone(), self.node.clone())
    }

    /// The Docker container name: `geomx.<job>.<node>`.
    pub fn container_name(&self) -> String {
        container_name(&self.job, &self.node)
    }

    /// The name of the node's network sandbox: `geomx-net.<job>.<node>`.
    pub fn sandbox_name(&self) -> String {
        sandbox_name(&self.job, &self.node)
    }

    /// Whether the node has a network sandbox (a docker0 node that asked for one).
    pub fn has_sandbox(&self) -> bool {
        self.sandbox && !self.host_network
    }

    /// The image of the node's sandbox.
    pub fn sandbox_image<'a>(&'a self, sandbox: &'a SandboxConfig) -> &'a str {
        sandbox.image.as_deref().unwrap_or(&self.image)
    }

    /// The spec hash of the node's sandbox: image, command, generation and controller id
    /// (a new attempt of the job gets a fresh network namespace and address).
    pub fn sandbox_hash(&self, sandbox: &SandboxConfig) -> String {
        let shape = serde_json::json!({
            "sandbox": self.sandbox_image(sandbox),
            "command": sandbox.command,
            "generation": self.generation,
            "controller": self.controller_id,
        });
        format!("{:016x}", fnv1a64(shape.to_string().as_bytes()))
    }

    /// The sandbox's Docker create body.
    pub fn sandbox_body(&self, sandbox: &SandboxConfig) -> ContainerCreateBody {
        let mut labels = self.common_labels();
        labels.insert(LABEL_KIND.into(), ContainerKind::Sandbox.as_str().into());
        labels.insert(LABEL_SPEC.into(), self.sandbox_hash(sandbox));
        ContainerCreateBody {
            image: Some(self.sandbox_image(sandbox).to_string()),
            entrypoint: Some(sandbox.command.clone()),
            cmd: Some(Vec::new()),
            env: Some(vec![
                format!("{ENV_JOB}={}", self.job),
                format!("{ENV_NODE}={}", self.node),
            ]),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some("bridge".into()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Checks names and the progress regex.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| RuntimeError::InvalidSpec {
            job: self.job.clone(),
            node: self.node.clone(),
            reason,
        };
        for (what, v) in [("job", &self.job), ("node", &self.node)] {
            if !valid_name_part(v) {
                return Err(invalid(format!(
                    "{what} name {v:?} must be 1..=100 characters of [a-zA-Z0-9_.-], starting with a letter or digit"
                )));
            }
        }
        if self.image.trim().is_empty() {
            return Err(invalid("no image".into()));
        }
        if let Some(re) = &self.progress_regex {
            crate::progress::ProgressParser::new(Some(re))?;
        }
        if let Some(re) = &self.finished_regex {
            crate::progress::ProgressParser::with_finished(None, Some(re))?;
        }
        let mut targets = std::collections::BTreeSet::new();
        for m in &self.mounts {
            if !m.target.starts_with('/') || m.target == "/" {
                return Err(invalid(format!(
                    "mount target {:?} is not an absolute path below /",
                    m.target
                )));
            }
            if !targets.insert(m.target.as_str()) {
                return Err(invalid(format!(
                    "mount target {:?} is listed twice",
                    m.target
                )));
            }
            if m.kind == MountKind::Volume
                && let Some((key, why)) =
                    geomx_job::volume_options_problem(m.driver.as_deref(), &m.options)
            {
                return Err(invalid(format!(
                    "volume {:?}: option {key}: {why}",
                    m.source
                )));
            }
            if m.source.is_empty() || (m.kind == MountKind::Bind && !m.source.starts_with('/')) {
                return Err(invalid(format!(
                    "mount source {:?} is not {}",
                    m.source,
                    match m.kind {
                        MountKind::Bind => "an absolute host path",
                        MountKind::Volume => "a volume name",
                    }
                )));
            }
        }
        Ok(())
    }

    /// The host paths the mounts bind: every bind mount's source, and the `device` of a
    /// `local` volume whose options bind it ([`geomx_job::local_volume_bind_device`]).
    pub fn bind_sources(&self) -> impl Iterator<Item = &str> {
        self.mounts.iter().filter_map(|m| match m.kind {
            MountKind::Bind => Some(m.source.as_str()),
            MountKind::Volume => {
                geomx_job::local_volume_bind_device(m.driver.as_deref(), &m.options)
            }
        })
    }

    /// The complete environment of the container: the spec's env plus `GEOMX_JOB`,
    /// `GEOMX_NODE`, (when not empty) `GEOMX_AGENT_URL`, and `PYTHONUNBUFFERED=1` unless the
    /// spec sets `PYTHONUNBUFFERED` (to any value: `""` or `0` keep Python's buffering).
    /// Part of the spec hash like every other variable. Not the heartbeat token
    /// ([`crate::auth::ENV_HEARTBEAT_TOKEN`], added at creation by [`stamp_creation`] and
    /// never taken from the spec): it is not part of the hash.
    pub fn full_env(&self, agent_url: &str) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.remove(crate::auth::ENV_HEARTBEAT_TOKEN);
        env.entry(ENV_PYTHONUNBUFFERED.into())
            .or_insert_with(|| "1".into());
        env.insert(ENV_JOB.into(), self.job.clone());
        env.insert(ENV_NODE.into(), self.node.clone());
        if !agent_url.is_empty() {
            env.insert(ENV_AGENT_URL.into(), agent_url.to_string());
        }
        env
    }

    /// A stable hash (FNV-1a 64, hex) of everything that shapes the container: image,
    /// command, full env, networking (host, or the sandbox's hash), GPUs, generation, role,
    /// party and controller id.
    /// Not the progress regex (changing it re-parses, it does not restart). Stable across
    /// processes and agent versions, so an agent restart finds the same hashes.
    pub fn spec_hash(&self, agent_url: &str, sandbox: &SandboxConfig) -> String {
        #[derive(Serialize)]
        struct Shape<'a> {
            image: &'a str,
            command: &'a [String],
            env: BTreeMap<String, String>,
            network: String,
            gpus: u32,
            generation: u32,
            role: &'a str,
            party: &'a str,
            controller: &'a str,
            // left out when empty or default: the hashes of containers made before
            // mounts and limits existed stay the same
            #[serde(skip_serializing_if = "<[Mount]>::is_empty")]
            mounts: &'a [Mount],
            #[serde(skip_serializing_if = "Option::is_none")]
            resources: Option<Resources>,
        }
        let shape = Shape {
            image: &self.image,
            command: &self.command,
            env: self.full_env(agent_url),
            // a new sandbox means a new network namespace: the role container follows it
            network: if self.has_sandbox() {
                format!("sandbox:{}", self.sandbox_hash(sandbox))
            } else {
                "host".into()
            },
            gpus: self.gpus,
            generation: self.generation,
            role: &self.role,
            party: &self.party,
            controller: &self.controller_id,
            mounts: &self.mounts,
            resources: (!self.resources.is_default()).then_some(self.resources),
        };
        // serializing plain strings, numbers and a BTreeMap cannot fail
        let bytes = serde_json::to_vec(&shape).unwrap_or_default();
        format!("{:016x}", fnv1a64(&bytes))
    }

    fn common_labels(&self) -> HashMap<String, String> {
        let mut l = HashMap::new();
        l.insert(LABEL_MANAGED.into(), "true".into());
        l.insert(LABEL_JOB.into(), self.job.clone());
        l.insert(LABEL_NODE.into(), self.node.clone());
        l.insert(LABEL_ROLE.into(), self.role.clone());
        l.insert(LABEL_PARTY.into(), self.party.clone());
        l.insert(LABEL_CONTROLLER.into(), self.controller_id.clone());
        l.insert(LABEL_GENERATION.into(), self.generation.to_string());
        l
    }

    /// The labels of the role container.
    pub fn labels(&self, agent_url: &str, sandbox: &SandboxConfig) -> HashMap<String, String> {
        let mut l = self.common_labels();
        l.insert(LABEL_KIND.into(), ContainerKind::Role.as_str().into());
        l.insert(LABEL_SPEC.into(), self.spec_hash(agent_url, sandbox));
        if let Some(re) = &self.progress_regex {
            l.insert(LABEL_PROGRESS_REGEX.into(), re.clone());
        }
        l
    }

    /// The role container's Docker create body: image, command, env, labels, the network
    /// of `sandbox_id` (`container:<id>`) or the host's, a GPU device request when
    /// `gpus > 0`, restart policy "no" (geomx restarts whole jobs, never single
    /// containers), the mounts, the resource limits, and what protects the host whatever
    /// the job says: a pids limit ([`DEFAULT_PIDS_LIMIT`] unless set), rotated `json-file`
    /// logs ([`LOG_MAX_SIZE`] × [`LOG_MAX_FILE`]), [`SECURITY_OPTS`] and [`CAP_DROP`].
    pub fn create_body(
        &self,
        agent_url: &str,
        sandbox: &SandboxConfig,
        sandbox_id: Option<&str>,
    ) -> ContainerCreateBody {
        let env = self
            .full_env(agent_url)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let r = &self.resources;
        let device_requests = (self.gpus > 0).then(|| {
            vec![DeviceRequest {
                driver: Some(String::new()),
                count: Some(i64::from(self.gpus)),
                capabilities: Some(vec![vec!["gpu".to_string()]]),
                ..Default::default()
            }]
        });
        ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: (!self.command.is_empty()).then(|| self.command.clone()),
            env: Some(env),
            labels: Some(self.labels(agent_url, sandbox)),
            host_config: Some(HostConfig {
                // Docker's init as PID 1: exit codes and signals are the process's own (an
                // abort() is 134, not 139) and signals reach it as they would outside
                init: Some(true),
                network_mode: Some(match (self.host_network, sandbox_id) {
                    (true, _) => "host".to_string(),
                    (false, Some(id)) => format!("container:{id}"),
                    (false, None) => "bridge".to_string(),
                }),
                device_requests,
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                mounts: (!self.mounts.is_empty())
                    .then(|| self.mounts.iter().map(docker_mount).collect()),
                memory: nonzero_i64(r.memory_bytes),
                nano_cpus: nonzero_i64(r.nano_cpus),
                pids_limit: nonzero_i64(r.pids_limit()),
                shm_size: nonzero_i64(r.shm_size_bytes),
                log_config: Some(HostConfigLogConfig {
                    typ: Some(LOG_DRIVER.into()),
                    config: Some(HashMap::from([
                        ("max-size".to_string(), LOG_MAX_SIZE.to_string()),
                        ("max-file".to_string(), LOG_MAX_FILE.to_string()),
                    ])),
                }),
                security_opt: Some(SECURITY_OPTS.iter().map(|s| s.to_string()).collect()),
                cap_drop: Some(CAP_DROP.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Marks a create body (a role container's or a sandbox's) with its creation: label
/// [`LABEL_CREATION`] = `nonce` and, for a role container of an agent with a heartbeat key,
/// the container's heartbeat token in its env ([`crate::auth::ENV_HEARTBEAT_TOKEN`],
/// replacing any variable of that name). Neither is part of the spec hash: the label
/// [`LABEL_SPEC`] stays what [`ContainerSpec::spec_hash`] says.
pub fn stamp_creation(body: &mut ContainerCreateBody, nonce: &str, token: Option<&str>) {
    body.labels
        .get_or_insert_with(HashMap::new)
        .insert(LABEL_CREATION.into(), nonce.to_string());
    if let Some(token) = token {
        let prefix = format!("{}=", crate::auth::ENV_HEARTBEAT_TOKEN);
        let env = body.env.get_or_insert_with(Vec::new);
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{prefix}{token}"));
    }
}

/// A byte or CPU count for Docker's API (signed); `None` for 0 (unset).
fn nonzero_i64(v: u64) -> Option<i64> {
    (v > 0).then(|| i64::try_from(v).unwrap_or(i64::MAX))
}

/// A mount in Docker's API form (`HostConfig.Mounts`: no string parsing, so a path with a
/// colon or comma is fine).
fn docker_mount(m: &Mount) -> DockerMount {
    DockerMount {
        typ: Some(match m.kind {
            MountKind::Bind => DockerMountType::BIND,
            MountKind::Volume => DockerMountType::VOLUME,
        }),
        source: Some(m.source.clone()),
        target: Some(m.target.clone()),
        read_only: Some(m.readonly),
        // Docker creates a missing volume from this (an existing one is used as it is)
        volume_options: (m.kind == MountKind::Volume
            && (m.driver.is_some() || !m.options.is_empty()))
        .then(|| MountVolumeOptions {
            driver_config: Some(MountVolumeOptionsDriverConfig {
                name: m.driver.clone(),
                options: (!m.options.is_empty()).then(|| {
                    m.options
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Docker container name of a node: `geomx.<job>.<node>`.
pub fn container_name(job: &str, node: &str) -> String {
    format!("geomx.{job}.{node}")
}

/// The Docker container name of a node's network sandbox: `geomx-net.<job>.<node>`.
pub fn sandbox_name(job: &str, node: &str) -> String {
    format!("geomx-net.{job}.{node}")
}

fn valid_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://172.17.0.1:7948";

    pub(crate) fn spec(job: &str, node: &str) -> ContainerSpec {
        ContainerSpec {
            job: job.into(),
            node: node.into(),
            role: "worker".into(),
            party: "a".into(),
            image: "geomx-test/psnode:latest".into(),
            image_pull: ImagePull::Never,
            pull_timeout_ms: 0,
            command: vec!["python".into(), "cnn.py".into()],
            env: [("DMLC_ROLE".to_string(), "worker".to_string())].into(),
            host_network: false,
            gpus: 0,
            generation: 0,
            progress_regex: None,
            finished_regex: None,
            controller_id: "c1".into(),
            start: true,
            sandbox: true,
            mounts: vec![],
            resources: Resources::default(),
        }
    }

    fn sb() -> SandboxConfig {
        SandboxConfig::default()
    }

    #[test]
    fn hash_is_stable_and_tracks_what_shapes_the_container() {
        let s = spec("j", "w0");
        let h = s.spec_hash(URL, &sb());
        assert_eq!(h, s.clone().spec_hash(URL, &sb()));
        assert_eq!(h.len(), 16);
        let mut g = s.clone();
        g.generation = 1;
        assert_ne!(g.spec_hash(URL, &sb()), h);
        let mut e = s.clone();
        e.env.insert("X".into(), "1".into());
        assert_ne!(e.spec_hash(URL, &sb()), h);
        let mut i = s.clone();
        i.image = "other:1".into();
        assert_ne!(i.spec_hash(URL, &sb()), h);
        assert_ne!(s.spec_hash("http://172.17.9.1:7948", &sb()), h);
        let mut hn = s.clone();
        hn.host_network = true;
        assert_ne!(hn.spec_hash(URL, &sb()), h);
        // another sandbox image means another network namespace
        let other = SandboxConfig {
            image: Some("pause:1".into()),
            ..sb()
        };
        assert_ne!(s.spec_hash(URL, &other), h);
        // not: the progress regex and the start flag
        let mut r = s.clone();
        r.progress_regex = Some("it=(?P<iteration>\\d+)".into());
        r.start = false;
        assert_eq!(r.spec_hash(URL, &sb()), h);
        // the sandbox follows generation and image, not env or command
        let sh = s.sandbox_hash(&sb());
        assert_eq!(e.sandbox_hash(&sb()), sh);
        assert_ne!(g.sandbox_hash(&sb()), sh);
        assert_ne!(i.sandbox_hash(&sb()), sh);
    }

    #[test]
    fn the_pull_policy_and_timeout_are_not_part_of_the_hashes() {
        let s = spec("j", "w0");
        let mut p = s.clone();
        p.image_pull = ImagePull::Always;
        p.pull_timeout_ms = 60_000;
        assert_eq!(p.spec_hash(URL, &sb()), s.spec_hash(URL, &sb()));
        assert_eq!(p.sandbox_hash(&sb()), s.sandbox_hash(&sb()));
        assert_eq!(p.labels(URL, &sb()), s.labels(URL, &sb()));
        assert_eq!(
            ImagePull::from_wire("if-not-present"),
            ImagePull::IfNotPresent
        );
        assert_eq!(ImagePull::from_wire("always"), ImagePull::Always);
        assert_eq!(ImagePull::from_wire(""), ImagePull::Never);
        assert!(!ImagePull::from_wire("never").may_pull());
    }

    #[test]
    fn create_body_has_labels_env_network_and_no_restart_policy() {
        let mut s = spec("job1", "a-worker-0");
        s.env.insert("GEOMX_JOB".into(), "spoofed".into());
        let b = s.create_body("http://172.17.34.1:7948", &sb(), Some("abc"));
        let env = b.env.clone().unwrap_or_default();
        assert!(env.contains(&"GEOMX_JOB=job1".to_string()));
        assert!(env.contains(&"GEOMX_NODE=a-worker-0".to_string()));
        assert!(env.contains(&"GEOMX_AGENT_URL=http://172.17.34.1:7948".to_string()));
        assert!(env.contains(&"DMLC_ROLE=worker".to_string()));
        assert!(env.contains(&"PYTHONUNBUFFERED=1".to_string()));
        let labels = b.labels.clone().unwrap_or_default();
        assert_eq!(labels[LABEL_MANAGED], "true");
        assert_eq!(labels[LABEL_JOB], "job1");
        assert_eq!(labels[LABEL_NODE], "a-worker-0");
        assert_eq!(labels[LABEL_ROLE], "worker");
        assert_eq!(labels[LABEL_PARTY], "a");
        assert_eq!(labels[LABEL_CONTROLLER], "c1");
        assert_eq!(labels[LABEL_GENERATION], "0");
        assert_eq!(labels[LABEL_KIND], "role");
        assert_eq!(
            labels[LABEL_SPEC],
            s.spec_hash("http://172.17.34.1:7948", &sb())
        );
        let hc = b.host_config.clone().unwrap_or_default();
        assert_eq!(hc.init, Some(true), "Docker's init runs as PID 1");
        assert_eq!(hc.network_mode.as_deref(), Some("container:abc"));
        assert!(hc.device_requests.is_none());
        assert_eq!(
            hc.restart_policy.and_then(|r| r.name),
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(s.container_name(), "geomx.job1.a-worker-0");
        assert_eq!(s.sandbox_name(), "geomx-net.job1.a-worker-0");
    }

    #[test]
    fn the_creation_stamp_and_the_token_do_not_change_the_spec_hash() {
        let mut s = spec("job1", "a-worker-0");
        let plain = s.create_body(URL, &sb(), None);
        let mut b = plain.clone();
        stamp_creation(&mut b, "n1", Some("ab12"));
        let labels = b.labels.clone().unwrap_or_default();
        assert_eq!(labels[LABEL_CREATION], "n1");
        assert_eq!(
            labels[LABEL_SPEC],
            plain.labels.clone().unwrap_or_default()[LABEL_SPEC]
        );
        let env = b.env.clone().unwrap_or_default();
        assert!(env.contains(&"GEOMX_HEARTBEAT_TOKEN=ab12".to_string()));
        // a spec cannot set the token, nor change its hash with one
        let h = s.spec_hash(URL, &sb());
        s.env
            .insert("GEOMX_HEARTBEAT_TOKEN".into(), "forged".into());
        assert_eq!(s.spec_hash(URL, &sb()), h);
        let mut b = s.create_body(URL, &sb(), None);
        assert!(
            !b.env
                .clone()
                .unwrap_or_default()
                .iter()
                .any(|e| e.starts_with("GEOMX_HEARTBEAT_TOKEN=")),
            "{:?}",
            b.env
        );
        stamp_creation(&mut b, "n2", Some("cd34"));
        let tokens: Vec<String> = b
            .env
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.starts_with("GEOMX_HEARTBEAT_TOKEN="))
            .collect();
        assert_eq!(tokens, vec!["GEOMX_HEARTBEAT_TOKEN=cd34".to_string()]);
        // a sandbox gets the label, no token
        let mut sb_body = s.sandbox_body(&sb());
        stamp_creation(&mut sb_body, "n3", None);
        assert_eq!(sb_body.labels.unwrap_or_default()[LABEL_CREATION], "n3");
        assert!(
            !sb_body
                .env
                .unwrap_or_default()
                .iter()
                .any(|e| e.starts_with("GEOMX_HEARTBEAT_TOKEN="))
        );
    }

    #[test]
    fn sandbox_body() {
        let s = spec("job1", "a-scheduler");
        let b = s.sandbox_body(&sb());
        assert_eq!(b.image.as_deref(), Some("geomx-test/psnode:latest"));
        assert_eq!(b.entrypoint, Some(sb().command));
        let labels = b.labels.unwrap_or_default();
        assert_eq!(labels[LABEL_KIND], "sandbox");
        assert_eq!(labels[LABEL_NODE], "a-scheduler");
        assert_eq!(labels[LABEL_SPEC], s.sandbox_hash(&sb()));
        assert_eq!(ContainerKind::of_labels(&labels), ContainerKind::Sandbox);
        assert_eq!(
            ContainerKind::of_labels(&HashMap::new()),
            ContainerKind::Role
        );
        let hc = b.host_config.unwrap_or_default();
        assert_eq!(hc.network_mode.as_deref(), Some("bridge"));
    }

    #[test]
    fn host_network_and_gpus() {
        let mut s = spec("j", "n");
        s.host_network = true;
        s.gpus = 2;
        assert!(!s.has_sandbox());
        let hc = s
            .create_body("", &sb(), None)
            .host_config
            .unwrap_or_default();
        assert_eq!(hc.network_mode.as_deref(), Some("host"));
        let dr = hc.device_requests.unwrap_or_default();
        assert_eq!(dr.len(), 1);
        assert_eq!(dr[0].count, Some(2));
        assert_eq!(dr[0].capabilities, Some(vec![vec!["gpu".to_string()]]));
        // no agent URL: the variable is left out rather than set empty
        let env = s.create_body("", &sb(), None).env.unwrap_or_default();
        assert!(!env.iter().any(|e| e.starts_with("GEOMX_AGENT_URL=")));
    }

    #[test]
    fn python_output_is_unbuffered_unless_the_spec_says_otherwise() {
        let s = spec("j", "w");
        assert_eq!(s.full_env(URL)["PYTHONUNBUFFERED"], "1");
        let mut own = s.clone();
        own.env.insert("PYTHONUNBUFFERED".into(), "0".into());
        assert_eq!(own.full_env(URL)["PYTHONUNBUFFERED"], "0");
        // the spec's own value shapes the container like any other variable
        assert_ne!(own.spec_hash(URL, &sb()), s.spec_hash(URL, &sb()));
        let mut same = s.clone();
        same.env.insert("PYTHONUNBUFFERED".into(), "1".into());
        assert_eq!(same.spec_hash(URL, &sb()), s.spec_hash(URL, &sb()));
    }

    #[test]
    fn validation() {
        assert!(spec("job1", "a-worker-0").validate().is_ok());
        assert!(spec("job 1", "w").validate().is_err());
        assert!(spec("", "w").validate().is_err());
        assert!(spec("j", "-w").validate().is_err());
        let mut s = spec("j", "w");
        s.progress_regex = Some("(".into());
        assert!(matches!(
            s.validate(),
            Err(RuntimeError::InvalidRegex { .. })
        ));
        s.progress_regex = None;
        s.image = " ".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn create_body_carries_mounts_limits_and_the_host_protecting_defaults() {
        let plain = spec("j", "w").create_body(URL, &sb(), None);
        let hc = plain.host_config.unwrap_or_default();
        assert_eq!(hc.pids_limit, Some(DEFAULT_PIDS_LIMIT as i64));
        assert_eq!(hc.memory, None);
        assert_eq!(hc.nano_cpus, None);
        assert_eq!(hc.shm_size, None);
        assert!(hc.mounts.is_none());
        let log = hc.log_config.unwrap_or_default();
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        let cfg = log.config.unwrap_or_default();
        assert_eq!(cfg["max-size"], LOG_MAX_SIZE);
        assert_eq!(cfg["max-file"], LOG_MAX_FILE);
        assert_eq!(
            hc.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert_eq!(hc.cap_drop, Some(vec!["NET_RAW".to_string()]));

        let mut s = spec("j", "w");
        s.resources = Resources {
            memory_bytes: 64 << 20,
            nano_cpus: 1_500_000_000,
            pids: 100,
            shm_size_bytes: 1 << 30,
        };
        s.mounts = vec![
            Mount {
                kind: MountKind::Bind,
                source: "/srv/a".into(),
                target: "/root/data".into(),
                readonly: true,
                ..Default::default()
            },
            Mount {
                kind: MountKind::Volume,
                source: "geomx-j-output".into(),
                target: "/root/output".into(),
                readonly: false,
                driver: Some("local".into()),
                options: [("type".to_string(), "tmpfs".to_string())].into(),
            },
        ];
        assert!(s.validate().is_ok());
        let hc = s
            .create_body(URL, &sb(), None)
            .host_config
            .unwrap_or_default();
        assert_eq!(hc.memory, Some(64 << 20));
        assert_eq!(hc.nano_cpus, Some(1_500_000_000));
        assert_eq!(hc.pids_limit, Some(100));
        assert_eq!(hc.shm_size, Some(1 << 30));
        let mounts = hc.mounts.unwrap_or_default();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].typ, Some(DockerMountType::BIND));
        assert_eq!(mounts[0].volume_options, None);
        assert_eq!(mounts[1].typ, Some(DockerMountType::VOLUME));
        assert_eq!(mounts[1].read_only, Some(false));
        let driver = mounts[1]
            .volume_options
            .clone()
            .and_then(|o| o.driver_config)
            .unwrap_or_default();
        assert_eq!(driver.name.as_deref(), Some("local"));
        assert_eq!(driver.options.unwrap_or_default()["type"], "tmpfs");
        assert_eq!(s.bind_sources().collect::<Vec<_>>(), ["/srv/a"]);

        // a local volume whose options bind a host path: its device is a bind source (the
        // runtime checks it exists and where it leads), and the job file's rules hold here
        // too, for a desired state that did not come from a checked job file
        let bind_opts = |device: &str| -> BTreeMap<String, String> {
            [("type", "none"), ("o", "bind"), ("device", device)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        s.mounts[1].options = bind_opts("/srv/b");
        s.mounts[1].driver = None;
        assert!(s.validate().is_ok());
        assert_eq!(s.bind_sources().collect::<Vec<_>>(), ["/srv/a", "/srv/b"]);
        for device in ["/etc", "/", "/var/run/docker.sock", "/var/lib/docker"] {
            s.mounts[1].options = bind_opts(device);
            let err = s.validate().expect_err(device).to_string();
            assert!(err.contains("option device"), "{err}");
        }
        s.mounts[1].options = [("type".to_string(), "proc".to_string())].into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn mounts_and_limits_shape_the_container_but_old_hashes_stay() {
        let s = spec("j", "w");
        let h = s.spec_hash(URL, &sb());
        // the default pids limit, written out, is what no limit means
        let mut d = s.clone();
        d.resources.pids = DEFAULT_PIDS_LIMIT;
        assert_eq!(d.spec_hash(URL, &sb()), h);
        let mut m = s.clone();
        m.resources.memory_bytes = 1 << 30;
        assert_ne!(m.spec_hash(URL, &sb()), h);
        let mut v = s.clone();
        v.mounts.push(Mount {
            kind: MountKind::Volume,
            source: "v".into(),
            target: "/v".into(),
            ..Default::default()
        });
        assert_ne!(v.spec_hash(URL, &sb()), h);
        v.mounts.push(v.mounts[0].clone());
        assert!(v.validate().is_err(), "a target twice");
        v.mounts = vec![Mount {
            kind: MountKind::Bind,
            source: "relative".into(),
            target: "/v".into(),
            ..Default::default()
        }];
        assert!(v.validate().is_err(), "a relative bind source");
    }
}
