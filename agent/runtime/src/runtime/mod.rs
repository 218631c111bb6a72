//! The runtime: applies desired nodes (network sandbox and role container each), adopts
//! what it finds, follows output for progress, and publishes status snapshots.
//!
//! This module holds the shared state and the public entry points ([`Runtime::apply`],
//! snapshots, heartbeats); the work is split by responsibility:
//! - `execute`: carrying out a plan (remove, create, start sandboxes and role containers);
//! - `adopt`: taking over labelled containers found on the host;
//! - `events`: Docker's event stream, the periodic resync, containers that disappear;
//! - `docker_loss`: judging the containers that ran when Docker went away;
//! - `follow`: following a role container's output, and its log tail once it ended;
//! - `inspect`: one container's inspection turned into the node's state;
//! - `logs`: serving a node's output, live or kept, and keeping it on removal;
//! - `peers`: who has reached a scheduler that still waits for its rendezvous.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::engine::{
    ActualContainer, BollardEngine, Engine, EngineState, HostCapacity, ImageDetails, Inspection,
    LogRequest,
};
use crate::pull::{Ensure, PullConfig, PullManager, PullStatus, Resolved};

/// The error of a container the kernel's OOM killer ended (Docker's `OOMKilled`; its exit
/// code is 137, SIGKILL).
pub const OOM_KILLED: &str =
    "OOM-killed (OOMKilled): out of memory, over its [resources] memory limit or the host's";
use crate::auth::{HeartbeatKey, Token, TokenSubject};
use crate::error::{Result, RuntimeError};
use crate::heartbeat::{
    HeartbeatCounters, HeartbeatError, HeartbeatReport, HeartbeatSink, Recorded, Refusal,
};
use crate::lines::{LineSplitter, split_timestamp, split_timestamp_ns};
use crate::ownership::{Created, CreationRecord};
use crate::progress::{ProgressParser, ProgressTracker};
use crate::reconcile::{self, Action, ContainerKey, actual_key};
use crate::spec::{
    ContainerKind, ContainerSpec, LABEL_GENERATION, LABEL_PARTY, LABEL_PROGRESS_REGEX, LABEL_ROLE,
    LABEL_SPEC, NodeKey, SandboxConfig, container_name,
};
use crate::status::{LogChunk, NodeState, NodeStatus, Snapshot, now_ms};

mod adopt;
mod docker_loss;
mod events;
mod execute;
mod follow;
mod inspect;
mod logs;
mod peers;

pub use docker_loss::DOCKER_LOSS_FILE;
use docker_loss::DockerLoss;
use events::mark_missing;

/// How the runtime behaves on this host.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// `GEOMX_AGENT_URL` for every container (e.g. `http://172.17.34.1:7948`, see
    /// [`crate::heartbeat::agent_url`]); empty to leave the variable out. Part of the spec
    /// hash: changing it replaces the role containers.
    pub agent_url: String,
    /// The IP reported for host-network containers (the host's underlay address).
    pub host_ip: Option<Ipv4Addr>,
    /// How network sandboxes are made.
    pub sandbox: SandboxConfig,
    /// How long a role container may take to stop (SIGTERM → SIGKILL) when it is removed.
    pub stop_timeout: Duration,
    /// How often the runtime re-lists Docker's containers (missed events, Docker restarts)
    /// and re-applies the last desired state (retries transient failures).
    pub resync_interval: Duration,
    /// Lines of output kept as [`NodeStatus::log_tail`] once a container has ended.
    pub log_tail_lines: u32,
    /// The host's name, for messages (a node stopped by a restart of Docker "on host b").
    pub host: String,
    /// Where a role container's output is kept when it is removed; `None` keeps nothing.
    pub log_archive: Option<crate::archive::LogArchive>,
    /// How missing images are pulled (specs with `image_pull` other than never).
    pub pulls: PullConfig,
    /// The containers this agent created (see [`crate::ownership`]): only those are
    /// adopted, kept, replaced or removed. The daemon keeps it in its state directory; the
    /// default is kept in memory (a clone of the config shares it).
    pub records: CreationRecord,
    /// The controller id whose labelled containers are adopted when there is no creation
    /// record yet (the first start after an upgrade); `None`: every labelled container.
    pub controller_id: Option<String>,
    /// The key of the containers' heartbeat tokens (see [`crate::auth`]); `None`: role
    /// containers get no token and heartbeats are checked by source address only.
    pub heartbeat_key: Option<HeartbeatKey>,
    /// Where a loss of Docker not judged yet is kept across agent restarts (the daemon:
    /// [`DOCKER_LOSS_FILE`] in its state directory); `None`: in memory only. A host that
    /// shuts down stops Docker, then the agent: the next agent still knows which role
    /// containers Docker's stop ended (see `docker_loss`).
    pub docker_loss_file: Option<std::path::PathBuf>,
    /// What the runtime counts (container starts and exits, pulls, heartbeats); shared with
    /// whoever reads it (the daemon's metrics). The default is the runtime's own.
    pub counters: Arc<crate::counters::RuntimeCounters>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            agent_url: String::new(),
            host_ip: None,
            sandbox: SandboxConfig::default(),
            stop_timeout: Duration::from_secs(2),
            resync_interval: Duration::from_secs(5),
            log_tail_lines: 20,
            host: String::new(),
            log_archive: None,
            pulls: PullConfig::default(),
            records: CreationRecord::in_memory(),
            controller_id: None,
            heartbeat_key: None,
            docker_loss_file: None,
            counters: Arc::default(),
        }
    }
}

/// What happened to one step of an [`Runtime::apply`].
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The planned step.
    pub action: Action,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The result of [`Runtime::apply`]: every planned step and how it went.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyReport {
    /// One per container (sandbox, role) of every desired node, and per container to remove.
    pub outcomes: Vec<Outcome>,
}

impl ApplyReport {
    /// The steps that changed something on the host (create, replace, start, remove).
    pub fn changes(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.action.is_change())
    }

    /// Whether nothing was changed.
    pub fn is_no_op(&self) -> bool {
        self.changes().next().is_none()
    }

    /// The steps that failed.
    pub fn errors(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.error.is_some())
    }
}

/// The nodes of one host. Cheap to clone (a handle); background tasks (Docker events,
/// periodic resync, one output follower per role container) run until
/// [`Runtime::shutdown`] or until the last handle is dropped.
///
/// A docker0 node has two containers: its network sandbox `geomx-net.<job>.<node>`,
/// created as soon as the node is desired (its address is the node's [`NodeStatus::ip`]
/// from then on), and its role container `geomx.<job>.<node>`, created in the sandbox's
/// network once the spec says `start`. A host-network node has only the role container.
pub struct Runtime<E: Engine = BollardEngine> {
    inner: Arc<Inner<E>>,
}

impl<E: Engine> Clone for Runtime<E> {
    fn clone(&self) -> Self {
        Runtime {
            inner: self.inner.clone(),
        }
    }
}

impl<E: Engine> std::fmt::Debug for Runtime<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner<E> {
    engine: E,
    config: RuntimeConfig,
    pulls: PullManager,
    state: Mutex<State>,
    apply_lock: tokio::sync::Mutex<()>,
    snapshot: watch::Sender<Snapshot>,
    cancel: CancellationToken,
}

impl<E> Drop for Inner<E> {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.pulls.shutdown();
    }
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<NodeKey, Tracked>,
    /// The last desired state; `None` until the first apply.
    desired: Option<BTreeMap<NodeKey, ContainerSpec>>,
    /// Spec hash per container of the containers created or adopted (and not removed by us).
    seen: BTreeMap<ContainerKey, String>,
    start_attempted: BTreeSet<String>,
    /// Docker went away while role containers ran (see [`DockerLoss`]); `None` otherwise.
    docker_lost: Option<DockerLoss>,
    /// The identity of the daemon last seen answering ([`Engine::daemon_id`]), if known.
    daemon_id: Option<String>,
    /// Per container with a refresh in flight: the order of its inspections (see
    /// [`inspect::RefreshOrder`]).
    refreshes: BTreeMap<String, inspect::RefreshOrder>,
}

impl State {
    fn is_desired(&self, key: &NodeKey) -> bool {
        self.desired.as_ref().is_none_or(|d| d.contains_key(key))
    }

    fn find(&self, id: &str) -> Option<(NodeKey, ContainerKind)> {
        self.nodes.iter().find_map(|(k, t)| {
            if t.status.container_id == id {
                Some((k.clone(), ContainerKind::Role))
            } else if t.sandbox.as_ref().is_some_and(|s| s.id == id) {
                Some((k.clone(), ContainerKind::Sandbox))
            } else {
                None
            }
        })
    }
}

struct Tracked {
    /// The node's status: the role container's, with the sandbox's address.
    status: NodeStatus,
    /// The network sandbox, if the node has one (docker0 nodes).
    sandbox: Option<SandboxStatus>,
    tracker: ProgressTracker,
    /// The task following the role container's output.
    follower: Option<AbortOnDrop>,
    /// The follower reached the end of the output (the container stopped, or the stream
    /// broke): a container found running again needs a new follower.
    follow_done: bool,
    /// How far the role container's output has been read into `tracker`: a new follower
    /// of the same container resumes there (Docker sends the whole output again).
    log_cursor: Option<follow::LogCursor>,
    /// The log tail of the ended role container has been fetched.
    finalized: bool,
    /// The role container's end was counted ([`crate::RuntimeCounters::container_exited`]),
    /// until it runs again.
    exit_counted: bool,
    /// Why the role container counts as failed whatever its exit code: it was stopped by a
    /// restart of Docker (see [`DockerLoss`]).
    stopped_by_docker: Option<String>,
    /// The host pid of the role container's process while it runs (0: unknown).
    pid: u32,
    /// The role container's heartbeat token; `None` for a container without one (made by
    /// an agent version before tokens, or without a key): checked by address only.
    auth: Option<Token>,
    /// The role container runs with host networking, as Docker last said (the desired
    /// spec says it too, once known).
    host_network: bool,
}

struct SandboxStatus {
    id: String,
    name: String,
    state: EngineState,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Tracked {
    fn for_spec(spec: &ContainerSpec) -> Tracked {
        let parser = ProgressParser::with_finished(
            spec.progress_regex.as_deref(),
            spec.finished_regex.as_deref(),
        )
        .unwrap_or_else(|_| default_parser());
        let mut t = Tracked::new(
            NodeStatus {
                job: spec.job.clone(),
                node: spec.node.clone(),
                role: spec.role.clone(),
                party: spec.party.clone(),
                generation: spec.generation,
                ..Default::default()
            },
            parser,
        );
        t.host_network = spec.host_network;
        t
    }

    fn from_labels(key: &NodeKey, c: &ActualContainer, parser: ProgressParser) -> Tracked {
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        Tracked::new(
            NodeStatus {
                job: key.0.clone(),
                node: key.1.clone(),
                role: label(LABEL_ROLE),
                party: label(LABEL_PARTY),
                generation: label(LABEL_GENERATION).parse().unwrap_or(0),
                ..Default::default()
            },
            parser,
        )
    }

    /// A node not yet seen running: `status` names it (a scheduler also gets an empty
    /// rendezvous to fill).
    fn new(mut status: NodeStatus, parser: ProgressParser) -> Tracked {
        if is_scheduler(&status.role) {
            status.rendezvous = Some(Default::default());
        }
        Tracked {
            status,
            sandbox: None,
            tracker: ProgressTracker::new(parser),
            follower: None,
            follow_done: false,
            log_cursor: None,
            finalized: false,
            exit_counted: false,
            stopped_by_docker: None,
            pid: 0,
            auth: None,
            host_network: false,
        }
    }

    /// Forgets the role container (it is being replaced or withdrawn); keeps the sandbox.
    fn reset_role(&mut self, spec: &ContainerSpec) {
        let mut fresh = Tracked::for_spec(spec);
        fresh.sandbox = self.sandbox.take();
        fresh.status.ip = if fresh.sandbox.is_some() {
            std::mem::take(&mut self.status.ip)
        } else {
            String::new()
        };
        *self = fresh;
    }
}

/// Whether a role (label `io.geomx.role`) is a scheduler's, whose rendezvous is tracked.
fn is_scheduler(role: &str) -> bool {
    matches!(role, "scheduler" | "global_scheduler")
}

fn default_parser() -> ProgressParser {
    // no custom regex: cannot fail
    ProgressParser::new(None).unwrap_or_else(|_| unreachable!("default parsers compile"))
}

impl Runtime<BollardEngine> {
    /// Connects to the dockerd socket at `path` and starts the runtime (see [`Runtime::start`]).
    pub async fn connect_unix(path: &Path, config: RuntimeConfig) -> Result<Runtime> {
        let engine = BollardEngine::connect_unix(path).await?;
        Runtime::start(engine, config).await
    }
}

impl<E: Engine> Runtime<E> {
    /// Starts the runtime on `engine`: adopts every container it created that it finds
    /// (the [`RuntimeConfig::records`]; running or ended; nothing is started, stopped or
    /// restarted), follows their output, and starts watching Docker's events. Nothing is
    /// removed before the first [`Runtime::apply`]. Labelled containers it did not create
    /// are left alone (see [`crate::ownership`]).
    pub async fn start(engine: E, config: RuntimeConfig) -> Result<Runtime<E>> {
        let (tx, _) = watch::channel(Snapshot::default());
        let pulls = PullManager::with_counters(config.pulls.clone(), config.counters.clone());
        let docker_lost = config
            .docker_loss_file
            .as_deref()
            .and_then(docker_loss::load_docker_loss);
        let rt = Runtime {
            inner: Arc::new(Inner {
                engine,
                pulls,
                config,
                state: Mutex::new(State {
                    docker_lost,
                    ..State::default()
                }),
                apply_lock: tokio::sync::Mutex::new(()),
                snapshot: tx,
                cancel: CancellationToken::new(),
            }),
        };
        {
            let _g = rt.inner.apply_lock.lock().await;
            let actual = rt.list_owned().await?;
            rt.adopt_untracked(&actual).await;
            let daemon = rt.inner.engine.daemon_id().await.ok().flatten();
            rt.lock().daemon_id = daemon;
        }
        rt.publish();
        rt.spawn_event_loop();
        rt.spawn_resync_loop();
        Ok(rt)
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The engine.
    pub fn engine(&self) -> &E {
        &self.inner.engine
    }

    /// Stops the background tasks (the containers keep running). The runtime must not be
    /// used afterwards.
    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.pulls.shutdown();
        self.lock()
            .nodes
            .values_mut()
            .for_each(|t| t.follower = None);
    }

    /// Status snapshots: the receiver sees a new value (promptly, typically within
    /// milliseconds) whenever a container starts or ends, a sandbox gets its address, the
    /// progress changes, or an apply changes something. Intermediate values may be
    /// skipped; the latest is always there.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.inner.snapshot.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.snapshot.borrow().clone()
    }

    /// The current status of one node.
    pub fn status(&self, job: &str, node: &str) -> Option<NodeStatus> {
        self.lock()
            .nodes
            .get(&(job.to_string(), node.to_string()))
            .map(|t| t.status.clone())
    }

    /// Every `repo:tag` and `repo@sha256:...` present on this host (for the controller's
    /// placement checks).
    pub async fn images(&self) -> Result<Vec<String>> {
        Ok(ImageDetails::references(&self.image_details().await?))
    }

    /// Every image on this host with its tags, digests, id and size.
    pub async fn image_details(&self) -> Result<Vec<ImageDetails>> {
        self.inner.engine.image_list().await
    }

    /// The pulls running and those ended in the last 10 minutes (at most 64).
    pub fn pulls(&self) -> Vec<PullStatus> {
        self.inner.pulls.list()
    }

    /// Bumped whenever a pull starts, progresses or ends.
    pub fn subscribe_pulls(&self) -> watch::Receiver<u64> {
        self.inner.pulls.subscribe()
    }

    /// Resolves `image` to the digest its registry serves now (nothing is downloaded;
    /// bounded by 20 s; a reference by digest is itself). Errors are
    /// [`RuntimeError::ImageUnavailable`] naming image, registry and cause.
    pub async fn resolve_image(&self, image: &str) -> Result<Resolved> {
        self.inner.pulls.resolve(&self.inner.engine, image).await
    }

    /// Starts pulling `image` unless it is present (`Ok(false)`), bounded by `timeout`
    /// (`None`: 30 minutes); joins a running pull, retries a failed one. Progress is in
    /// [`Runtime::pulls`].
    pub async fn pull_image(&self, image: &str, timeout: Option<Duration>) -> Result<bool> {
        if self.inner.engine.image_present(image).await? {
            return Ok(false);
        }
        match self
            .inner
            .pulls
            .ensure(&self.inner.engine, image, timeout, true)
        {
            Ensure::Started | Ensure::Running => Ok(true),
            Ensure::Failed(message) => Err(RuntimeError::Refused {
                what: format!("pulling {image}"),
                message,
            }),
        }
    }

    /// The image of a container of `spec` that the agent may pull: the role's image, or the
    /// sandbox's when it is the job's image; `None` when the spec does not let the agent
    /// pull (`image_pull = "never"`) or the sandbox image is geomx's own.
    fn pullable_image(&self, kind: ContainerKind, spec: &ContainerSpec) -> Option<String> {
        if !spec.image_pull.may_pull() {
            return None;
        }
        match kind {
            ContainerKind::Role => Some(spec.image.clone()),
            ContainerKind::Sandbox => {
                let image = spec.sandbox_image(&self.inner.config.sandbox);
                (image == spec.image).then(|| spec.image.clone())
            }
        }
    }

    /// Whether `image` is present, asking Docker once per pass (`cache`); an error counts
    /// as present (the create step asks again and reports Docker's error).
    async fn image_present_cached(&self, cache: &mut BTreeMap<String, bool>, image: &str) -> bool {
        if let Some(p) = cache.get(image) {
            return *p;
        }
        let p = self.inner.engine.image_present(image).await.unwrap_or(true);
        cache.insert(image.to_owned(), p);
        p
    }

    /// Makes sure `image` (missing) is being pulled for the node `key`; `Err` with the
    /// node's error when its pull failed for good.
    fn ensure_pull(&self, key: &NodeKey, spec: &ContainerSpec, image: &str) -> Result<(), String> {
        let timeout = Some(Duration::from_millis(spec.pull_timeout_ms)).filter(|t| !t.is_zero());
        match self
            .inner
            .pulls
            .ensure(&self.inner.engine, image, timeout, false)
        {
            Ensure::Started | Ensure::Running => {
                debug!(job = %key.0, node = %key.1, %image, "waiting for the image's pull");
                Ok(())
            }
            Ensure::Failed(error) => {
                warn!(job = %key.0, node = %key.1, %image, %error, "the image cannot be pulled");
                Err(error)
            }
        }
    }

    /// Pulls the missing images of the desired nodes not created yet (also those that do
    /// not start yet: the images are there by the gang start), and takes the creations
    /// whose image is missing out of `plan`: the node stays Pending, without error, and is
    /// created once the pull is done (a finished pull re-applies the desired state) or,
    /// when its pull failed for good, fails with the pull's error (in `outcomes` too).
    async fn hold_for_pulls(
        &self,
        valid: &[ContainerSpec],
        plan: Vec<Action>,
        outcomes: &mut Vec<Outcome>,
    ) -> Vec<Action> {
        let mut present: BTreeMap<String, bool> = BTreeMap::new();
        let waiting: Vec<(&ContainerSpec, String)> = {
            let st = self.lock();
            valid
                .iter()
                .filter(|s| {
                    st.nodes.get(&s.key()).is_none_or(|t| {
                        t.status.state == NodeState::Pending && t.status.container_id.is_empty()
                    })
                })
                .filter_map(|s| Some((s, self.pullable_image(ContainerKind::Role, s)?)))
                .collect()
        };
        for (spec, image) in waiting {
            if self.image_present_cached(&mut present, &image).await {
                continue;
            }
            let key = spec.key();
            match self.ensure_pull(&key, spec, &image) {
                Ok(()) => {
                    let mut st = self.lock();
                    if let Some(t) = st.nodes.get_mut(&key) {
                        t.status.error.clear();
                    }
                }
                Err(error) => self.set_failed(&key, None, error),
            }
        }
        let mut kept = Vec::with_capacity(plan.len());
        for action in plan {
            let (Action::Create { kind, spec, .. } | Action::Replace { kind, spec, .. }) = &action
            else {
                kept.push(action);
                continue;
            };
            let Some(image) = self.pullable_image(*kind, spec) else {
                kept.push(action);
                continue;
            };
            if self.image_present_cached(&mut present, &image).await {
                kept.push(action);
                continue;
            }
            let key = spec.key();
            if let Err(error) = self.ensure_pull(&key, spec, &image) {
                self.set_failed(&key, None, error.clone());
                outcomes.push(Outcome {
                    action,
                    error: Some(error),
                });
            }
        }
        kept
    }

    /// Why a bind mount of host path `path` is refused, if it is: the path is missing, or it
    /// leads (through symlinks) where the job file could not name (`/etc`, Docker's state,
    /// ...; the rules of [`geomx_job::bind_source_problem`]). Also what the agent answers
    /// the controller's `CheckBindSources` at submit. Touches only the filesystem (no
    /// Docker call); blocking.
    pub fn bind_source_refusal(&self, path: &str) -> Option<RuntimeError> {
        let engine = &self.inner.engine;
        if !engine.path_exists(path) {
            return Some(RuntimeError::BindSourceMissing {
                path: path.to_string(),
            });
        }
        let real = engine.real_path(path)?;
        geomx_job::bind_source_problem(&real).map(|why| RuntimeError::BindSourceRefused {
            path: path.to_string(),
            real,
            why,
        })
    }

    /// The host's memory and CPUs as Docker sees them (for the controller's placement
    /// checks).
    pub async fn capacity(&self) -> Result<HostCapacity> {
        self.inner.engine.capacity().await
    }

    /// Makes the host run exactly `desired` (the complete set of nodes this host must run)
    /// and returns what was planned and how it went.
    ///
    /// Every docker0 node gets its network sandbox at once (its IP appears in the node's
    /// status); role containers are created and started for the specs with `start` (in
    /// their sandbox's network). A missing image is pulled when the spec's `image_pull`
    /// allows it (the node stays Pending until the pull is done, then it is created at
    /// once; a pull failing for good fails the node with `pulling image <ref> from
    /// registry <registry>: <cause>: <message>`); with `image_pull = "never"` it fails the
    /// node with [`RuntimeError::ImageMissing`]'s message. Containers whose spec hash differs are
    /// replaced; labelled containers not desired are stopped (short timeout) and removed;
    /// ended containers are kept as they are. Applying the same set again — also from a
    /// new runtime after an agent restart — changes nothing.
    ///
    /// Per-node failures are reported in the outcomes and in the node's status; `Err` only
    /// when Docker cannot be listed at all.
    pub async fn apply(&self, desired: Vec<ContainerSpec>) -> Result<ApplyReport> {
        let _g = self.inner.apply_lock.lock().await;
        self.reconcile_locked(desired, true).await
    }

    /// `retry_failed`: also retry creating nodes that failed definitively (missing image,
    /// refused by Docker); the periodic resync retries only transient failures.
    async fn reconcile_locked(
        &self,
        desired: Vec<ContainerSpec>,
        retry_failed: bool,
    ) -> Result<ApplyReport> {
        let mut outcomes = Vec::new();
        let mut valid = Vec::new();
        let mut desired_map = BTreeMap::new();
        for spec in desired {
            let err = if desired_map.contains_key(&spec.key()) {
                Some(format!("node {}/{} is listed twice", spec.job, spec.node))
            } else {
                spec.validate().err().map(|e| e.to_string()).or_else(|| {
                    // refused before anything starts: Docker would make the path an empty
                    // root-owned directory and the node would train on nothing
                    spec.bind_sources()
                        .find_map(|path| self.bind_source_refusal(path))
                        .map(|e| e.to_string())
                })
            };
            if let Some(err) = err {
                if retry_failed {
                    warn!(job = %spec.job, node = %spec.node, error = %err, "invalid container spec");
                }
                if let std::collections::btree_map::Entry::Vacant(v) = desired_map.entry(spec.key())
                {
                    let mut t = Tracked::for_spec(&spec);
                    t.status.state = NodeState::Failed;
                    t.status.error = err.clone();
                    self.lock().nodes.insert(spec.key(), t);
                    v.insert(spec.clone());
                }
                outcomes.push(Outcome {
                    action: Action::Invalid { spec },
                    error: Some(err),
                });
                continue;
            }
            desired_map.insert(spec.key(), spec.clone());
            valid.push(spec);
        }

        let actual = self.list_owned().await?;
        self.adopt_untracked(&actual).await;

        let config = &self.inner.config;
        let plan = {
            let mut st = self.lock();
            for spec in &valid {
                match st.nodes.get_mut(&spec.key()) {
                    Some(t) => {
                        if (t.tracker.parser().custom() != spec.progress_regex.as_deref()
                            || t.tracker.parser().finished() != spec.finished_regex.as_deref())
                            && let Ok(p) = ProgressParser::with_finished(
                                spec.progress_regex.as_deref(),
                                spec.finished_regex.as_deref(),
                            )
                        {
                            t.tracker.set_parser(p);
                        }
                    }
                    None => {
                        st.nodes.insert(spec.key(), Tracked::for_spec(spec));
                    }
                }
            }
            st.desired = Some(desired_map);
            let mut plan = reconcile::plan(
                &valid,
                &actual,
                &config.agent_url,
                &config.sandbox,
                &st.seen,
                &st.start_attempted,
            );
            if !retry_failed {
                plan.retain(|a| match a {
                    Action::Create { spec, .. } => st
                        .nodes
                        .get(&spec.key())
                        .is_none_or(|t| t.status.state != NodeState::Failed),
                    _ => true,
                });
            }
            plan
        };
        // a failed pull is remembered while a desired node needs its image
        let needed: BTreeSet<String> = valid
            .iter()
            .flat_map(|s| {
                [ContainerKind::Sandbox, ContainerKind::Role]
                    .into_iter()
                    .filter_map(|k| self.pullable_image(k, s))
            })
            .collect();
        self.inner.pulls.release_failures(&needed);
        let plan = self.hold_for_pulls(&valid, plan, &mut outcomes).await;

        let errors = self.execute(&plan).await;
        outcomes.extend(plan.into_iter().zip(errors).map(|(action, error)| {
            if action.is_change() {
                debug!(?action, ?error, "applied");
            }
            Outcome { action, error }
        }));
        self.drop_untracked_leftovers();
        self.publish();
        Ok(ApplyReport { outcomes })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // a panic while holding the lock leaves consistent-enough data: keep going
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self) {
        let nodes: Vec<NodeStatus> = self
            .lock()
            .nodes
            .values()
            .map(|t| t.status.clone())
            .collect();
        self.inner.snapshot.send_if_modified(|s| {
            if s.nodes == nodes {
                return false;
            }
            s.nodes = nodes;
            s.revision += 1;
            true
        });
    }

    /// The labelled containers Docker lists that this runtime created (see
    /// [`crate::ownership`]); the others are left alone.
    pub(super) async fn list_owned(&self) -> Result<Vec<ActualContainer>> {
        let actual = self.inner.engine.list_managed().await?;
        let config = &self.inner.config;
        Ok(config
            .records
            .claim(&actual, config.controller_id.as_deref()))
    }

    /// The heartbeat token of the role container recorded as `entry` (`None`: it has none).
    pub(super) fn token_of(&self, entry: &Created) -> Option<Token> {
        let key = self.inner.config.heartbeat_key.as_ref()?;
        (entry.token && !entry.nonce.is_empty()).then(|| {
            key.token(&TokenSubject {
                controller: &entry.controller,
                job: &entry.job,
                node: &entry.node,
                name: &entry.name,
                generation: entry.generation,
                nonce: &entry.nonce,
            })
        })
    }

    /// The heartbeat endpoint's counters (refusals per reason, metrics dropped) since
    /// [`RuntimeConfig::counters`] were made (the daemon's: since the agent started).
    pub fn heartbeat_stats(&self) -> HeartbeatCounters {
        self.inner.config.counters.heartbeats.read()
    }

    /// Merges a node's own heartbeat (see [`crate::heartbeat`]) into its progress. The
    /// body's job/node must name a node this runtime runs a role container of; without
    /// them the caller is the running docker0 container with address `peer`, or else the
    /// node whose token is `token`. A node whose container has a token must send it
    /// (401 otherwise); a node on a bridge network must report from its container's own
    /// address (403 otherwise). Refusals are counted ([`Runtime::heartbeat_stats`]).
    pub fn record_heartbeat(
        &self,
        report: &HeartbeatReport,
        peer: IpAddr,
        token: Option<&str>,
    ) -> Result<Recorded, HeartbeatError> {
        let r = self.check_and_record(report, peer, token);
        match &r {
            Ok(rec) => {
                self.inner
                    .config
                    .counters
                    .heartbeats
                    .accepted(rec.metrics_dropped);
                self.publish();
            }
            Err(e) => self.count_refusal(e.refusal(), peer, Some(e)),
        }
        r
    }

    fn check_and_record(
        &self,
        report: &HeartbeatReport,
        peer: IpAddr,
        token: Option<&str>,
    ) -> Result<Recorded, HeartbeatError> {
        let mut st = self.lock();
        let key = match (&report.job, &report.node) {
            (Some(job), Some(node)) => (job.clone(), node.clone()),
            (None, None) => {
                let peer_s = peer.to_string();
                let by_address: Vec<NodeKey> = st
                    .nodes
                    .iter()
                    .filter(|(_, t)| t.status.state == NodeState::Running && t.status.ip == peer_s)
                    .map(|(k, _)| k.clone())
                    .collect();
                let by_token = || {
                    let token = token?;
                    st.nodes
                        .iter()
                        .find(|(_, t)| t.auth.as_ref().is_some_and(|a| a.matches(token)))
                        .map(|(k, _)| k.clone())
                };
                match by_address.len() {
                    1 => by_address.into_iter().next().unwrap_or_default(),
                    0 => by_token().ok_or(HeartbeatError::UnknownPeer(peer))?,
                    _ => by_token().ok_or(HeartbeatError::AmbiguousPeer(peer))?,
                }
            }
            _ => {
                return Err(HeartbeatError::Invalid(
                    "give both \"job\" and \"node\" (GEOMX_JOB, GEOMX_NODE) or neither".into(),
                ));
            }
        };
        let unknown = || HeartbeatError::UnknownNode {
            job: key.0.clone(),
            node: key.1.clone(),
        };
        // only a node whose role container this runtime runs reports
        let t = st
            .nodes
            .get(&key)
            .filter(|t| !t.status.container_id.is_empty())
            .ok_or_else(unknown)?;
        if let Some(expected) = &t.auth {
            match token {
                None => {
                    return Err(HeartbeatError::NoToken {
                        job: key.0.clone(),
                        node: key.1.clone(),
                    });
                }
                Some(given) if !expected.matches(given) => {
                    return Err(HeartbeatError::BadToken {
                        job: key.0.clone(),
                        node: key.1.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        // a node on a bridge network reports from its own address: another container (or
        // host) cannot speak for it, even with its token (raw sockets are dropped from role
        // containers, so the source cannot be forged); host-network nodes share the host's
        // address and are told apart by their tokens
        let bridged = st
            .desired
            .as_ref()
            .and_then(|d| d.get(&key))
            .map_or(!t.host_network, |spec| !spec.host_network);
        if bridged && t.status.ip != peer.to_string() {
            return Err(HeartbeatError::WrongPeer {
                job: key.0.clone(),
                node: key.1.clone(),
                peer,
            });
        }
        let Some(t) = st.nodes.get_mut(&key) else {
            return Err(unknown());
        };
        let metrics_dropped =
            t.tracker
                .report(report.epoch, report.step, report.metrics.clone(), now_ms());
        t.status.progress = t.tracker.progress().cloned();
        Ok(Recorded {
            key,
            metrics_dropped,
        })
    }

    /// Counts a refusal of the heartbeat endpoint; logged at the 1st, 2nd, 4th, 8th, ...
    /// of each reason (a flood does not flood the log).
    fn count_refusal(&self, why: Refusal, peer: IpAddr, error: Option<&HeartbeatError>) {
        let n = self.inner.config.counters.heartbeats.refused(why);
        if n.is_power_of_two() {
            let error = error.map(ToString::to_string).unwrap_or_default();
            warn!(reason = why.as_str(), count = n, %peer, %error, "heartbeat refused");
        }
    }
}

impl<E: Engine> HeartbeatSink for Runtime<E> {
    fn record(
        &self,
        report: &HeartbeatReport,
        peer: IpAddr,
        token: Option<&str>,
    ) -> Result<Recorded, HeartbeatError> {
        self.record_heartbeat(report, peer, token)
    }

    fn refused(&self, why: Refusal, peer: IpAddr) {
        self.count_refusal(why, peer, None);
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
