//! The runtime: applies desired nodes (network sandbox and role container each), adopts
//! what it finds, follows output for progress, and publishes status snapshots.

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
    ActualContainer, BollardEngine, Engine, EngineState, HostCapacity, Inspection, LogRequest,
};

/// The error of a container the kernel's OOM killer ended (Docker's `OOMKilled`; its exit
/// code is 137, SIGKILL).
pub const OOM_KILLED: &str =
    "OOM-killed (OOMKilled): out of memory, over its [resources] memory limit or the host's";
use crate::error::{Result, RuntimeError};
use crate::heartbeat::{HeartbeatError, HeartbeatReport, HeartbeatSink};
use crate::lines::{LineSplitter, split_timestamp};
use crate::progress::{ProgressParser, ProgressTracker};
use crate::reconcile::{self, Action, ContainerKey, actual_key};
use crate::spec::{
    ContainerKind, ContainerSpec, LABEL_GENERATION, LABEL_PARTY, LABEL_PROGRESS_REGEX, LABEL_ROLE,
    LABEL_SPEC, NodeKey, SandboxConfig, container_name,
};
use crate::status::{LogChunk, NodeState, NodeStatus, Snapshot, now_ms};

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
    state: Mutex<State>,
    apply_lock: tokio::sync::Mutex<()>,
    snapshot: watch::Sender<Snapshot>,
    cancel: CancellationToken,
}

impl<E> Drop for Inner<E> {
    fn drop(&mut self) {
        self.cancel.cancel();
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
}

/// Docker went away: its event stream ended. Without live-restore a dockerd that stops
/// stops every container (SIGTERM, SIGKILL after the stop timeout): a role container that
/// ran when Docker went away and has ended when Docker answers again, now as another
/// daemon, was stopped by the restart, whatever its exit code. A training script that
/// handles SIGTERM and exits 0 would otherwise look like a worker that finished.
///
/// The restart is told by the daemon's identity ([`Engine::daemon_id`]: the socket peer's
/// pid and start time); when that is unknown, by Docker not answering right after the event
/// stream ended (a broken stream of a daemon that stays up is not a restart). The time a
/// container finished is no help: dockerd closes its API first and stops the containers
/// afterwards, and the agent notices only when the stream breaks, once dockerd exits.
#[derive(Clone, Debug)]
struct DockerLoss {
    /// When the event stream ended (Unix ms).
    at_ms: i64,
    /// The role containers that ran then, not judged yet.
    running: BTreeSet<String>,
    /// The daemon that ran before, if its identity is known.
    daemon_before: Option<String>,
    /// Docker did not answer right after the stream ended.
    unreachable: bool,
    /// Once Docker answers again: whether it stopped its containers (restarted, without
    /// live-restore).
    stopped: Option<bool>,
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
    /// The log tail of the ended role container has been fetched.
    finalized: bool,
    /// Why the role container counts as failed whatever its exit code: it was stopped by a
    /// restart of Docker (see [`DockerLoss`]).
    stopped_by_docker: Option<String>,
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
        Tracked {
            status: NodeStatus {
                job: spec.job.clone(),
                node: spec.node.clone(),
                role: spec.role.clone(),
                party: spec.party.clone(),
                generation: spec.generation,
                ..Default::default()
            },
            sandbox: None,
            tracker: ProgressTracker::new(parser),
            follower: None,
            follow_done: false,
            finalized: false,
            stopped_by_docker: None,
        }
    }

    fn from_labels(key: &NodeKey, c: &ActualContainer, parser: ProgressParser) -> Tracked {
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        Tracked {
            status: NodeStatus {
                job: key.0.clone(),
                node: key.1.clone(),
                role: label(LABEL_ROLE),
                party: label(LABEL_PARTY),
                generation: label(LABEL_GENERATION).parse().unwrap_or(0),
                ..Default::default()
            },
            sandbox: None,
            tracker: ProgressTracker::new(parser),
            follower: None,
            follow_done: false,
            finalized: false,
            stopped_by_docker: None,
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

fn default_parser() -> ProgressParser {
    // no custom regex: cannot fail
    ProgressParser::new(None).unwrap_or_else(|_| unreachable!("default parsers compile"))
}

type Step<'a> = Pin<Box<dyn Future<Output = (usize, Result<()>)> + Send + 'a>>;

impl Runtime<BollardEngine> {
    /// Connects to the dockerd socket at `path` and starts the runtime (see [`Runtime::start`]).
    pub async fn connect_unix(path: &Path, config: RuntimeConfig) -> Result<Runtime> {
        let engine = BollardEngine::connect_unix(path).await?;
        Runtime::start(engine, config).await
    }
}

impl<E: Engine> Runtime<E> {
    /// Starts the runtime on `engine`: adopts every labelled container it finds (running or
    /// ended; nothing is started, stopped or restarted), follows their output, and starts
    /// watching Docker's events. Nothing is removed before the first [`Runtime::apply`].
    pub async fn start(engine: E, config: RuntimeConfig) -> Result<Runtime<E>> {
        let (tx, _) = watch::channel(Snapshot::default());
        let rt = Runtime {
            inner: Arc::new(Inner {
                engine,
                config,
                state: Mutex::new(State::default()),
                apply_lock: tokio::sync::Mutex::new(()),
                snapshot: tx,
                cancel: CancellationToken::new(),
            }),
        };
        {
            let _g = rt.inner.apply_lock.lock().await;
            let actual = rt.inner.engine.list_managed().await?;
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

    /// Every `repo:tag` present on this host (for the controller's placement checks).
    pub async fn images(&self) -> Result<Vec<String>> {
        self.inner.engine.images().await
    }

    /// Why a bind mount of host path `path` is refused, if it is: the path is missing, or it
    /// leads (through symlinks) where the job file could not name (`/etc`, Docker's state,
    /// ...; the rules of [`geomx_job::bind_source_problem`]).
    fn bind_source_refusal(&self, path: &str) -> Option<RuntimeError> {
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
    /// their sandbox's network), never pulled: a missing image fails the node with
    /// [`RuntimeError::ImageMissing`]'s message. Containers whose spec hash differs are
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

        let actual = self.inner.engine.list_managed().await?;
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

    /// Executes a plan in phases: role containers go, then sandboxes go, then sandboxes
    /// come (their addresses are needed), then role containers come. Returns one error
    /// slot per action.
    async fn execute(&self, plan: &[Action]) -> Vec<Option<String>> {
        let mut errors: Vec<Option<String>> = vec![None; plan.len()];
        let mut phases: [Vec<Step<'_>>; 4] = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        {
            let mut st = self.lock();
            for (i, action) in plan.iter().enumerate() {
                match action {
                    Action::Remove {
                        kind,
                        id,
                        name,
                        key,
                        reason,
                    } => {
                        info!(
                            job = key.as_ref().map_or("", |k| k.0.as_str()),
                            node = key.as_ref().map_or("", |k| k.1.as_str()),
                            id = %short(id), %name, ?reason, "removing a container"
                        );
                        if let Some(k) = key {
                            detach(&mut st, k, *kind, id);
                        }
                        st.start_attempted.remove(id);
                        let phase = if *kind == ContainerKind::Role { 0 } else { 1 };
                        phases[phase].push(Box::pin(self.remove_step(i, *kind, id)));
                    }
                    Action::Replace {
                        kind, old_id, spec, ..
                    } => {
                        info!(job = %spec.job, node = %spec.node, kind = kind.as_str(), old = %short(old_id), "replacing a container whose spec changed");
                        let t = st
                            .nodes
                            .entry(spec.key())
                            .or_insert_with(|| Tracked::for_spec(spec));
                        // detach the old container first: its die/destroy events must not
                        // be taken for the new one's
                        match kind {
                            ContainerKind::Role => t.reset_role(spec),
                            ContainerKind::Sandbox => {
                                t.sandbox = None;
                                t.status.ip.clear();
                            }
                        }
                        st.start_attempted.remove(old_id);
                        let phase = if *kind == ContainerKind::Role { 0 } else { 1 };
                        phases[phase].push(Box::pin(self.remove_step(i, *kind, old_id)));
                    }
                    Action::Missing { kind, spec } => {
                        if let Some(t) = st.nodes.get_mut(&spec.key()) {
                            mark_missing(t, *kind);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.publish();
        for (i, action) in plan.iter().enumerate() {
            match action {
                Action::Create {
                    kind: ContainerKind::Sandbox,
                    spec,
                    hash,
                }
                | Action::Replace {
                    kind: ContainerKind::Sandbox,
                    spec,
                    hash,
                    ..
                } => phases[2].push(Box::pin(self.create_step(
                    i,
                    ContainerKind::Sandbox,
                    spec,
                    hash,
                ))),
                Action::Create {
                    kind: ContainerKind::Role,
                    spec,
                    hash,
                }
                | Action::Replace {
                    kind: ContainerKind::Role,
                    spec,
                    hash,
                    ..
                } => phases[3].push(Box::pin(self.create_step(
                    i,
                    ContainerKind::Role,
                    spec,
                    hash,
                ))),
                Action::Start { kind, id, key } => {
                    let phase = if *kind == ContainerKind::Role { 3 } else { 2 };
                    phases[phase].push(Box::pin(self.start_step(i, *kind, id, key)));
                }
                Action::Keep {
                    kind: ContainerKind::Role,
                    id,
                    key,
                } => self.ensure_follower(key, id, false),
                _ => {}
            }
        }
        for phase in phases {
            for (i, r) in futures::future::join_all(phase).await {
                if let Err(e) = r
                    && errors[i].is_none()
                {
                    errors[i] = Some(e.to_string());
                }
            }
        }
        errors
    }

    async fn remove_step(&self, i: usize, kind: ContainerKind, id: &str) -> (usize, Result<()>) {
        let engine = &self.inner.engine;
        let r = match kind {
            ContainerKind::Role => {
                if let Err(e) = engine.stop(id, self.inner.config.stop_timeout).await {
                    warn!(id = %short(id), error = %e, "stop failed; removing by force");
                }
                self.archive_logs(id).await;
                engine.remove(id).await
            }
            // nothing runs in a sandbox: no need to wait for it
            ContainerKind::Sandbox => engine.remove(id).await,
        };
        (i, r)
    }

    async fn create_step(
        &self,
        i: usize,
        kind: ContainerKind,
        spec: &ContainerSpec,
        hash: &str,
    ) -> (usize, Result<()>) {
        let span = info_span!("create", job = %spec.job, node = %spec.node, kind = kind.as_str());
        let r = match kind {
            ContainerKind::Sandbox => self.create_sandbox(spec, hash).instrument(span).await,
            ContainerKind::Role => self.create_role(spec, hash).instrument(span).await,
        };
        (i, r)
    }

    async fn start_step(
        &self,
        i: usize,
        kind: ContainerKind,
        id: &str,
        key: &NodeKey,
    ) -> (usize, Result<()>) {
        let span = info_span!("start", job = %key.0, node = %key.1, kind = kind.as_str());
        let r = async {
            self.lock().start_attempted.insert(id.to_string());
            info!(id = %short(id), "starting an adopted container that was never started");
            let r = self.inner.engine.start(id).await;
            match &r {
                Err(e) => self.set_failed(key, None, format!("starting {}: {e}", kind.as_str())),
                Ok(()) if kind == ContainerKind::Role => self.ensure_follower(key, id, false),
                Ok(()) => {}
            }
            self.refresh(id).await;
            r
        }
        .instrument(span)
        .await;
        (i, r)
    }

    /// Checks the image; on failure marks the node.
    async fn check_image(&self, key: &NodeKey, image: &str) -> Result<()> {
        match self.inner.engine.image_present(image).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                let e = RuntimeError::ImageMissing {
                    image: image.to_string(),
                };
                warn!(error = %e, "cannot create the container");
                self.set_failed(key, None, e.to_string());
                Err(e)
            }
            Err(e) => {
                self.set_pending_error(key, e.to_string());
                Err(e)
            }
        }
    }

    async fn create_sandbox(&self, spec: &ContainerSpec, hash: &str) -> Result<()> {
        let key = spec.key();
        let sandbox = &self.inner.config.sandbox;
        self.check_image(&key, spec.sandbox_image(sandbox)).await?;
        let name = spec.sandbox_name();
        let id = match self
            .inner
            .engine
            .create(&name, spec.sandbox_body(sandbox))
            .await
        {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "creating the network sandbox failed");
                self.create_failed(&key, &e, "creating the network sandbox");
                return Err(e);
            }
        };
        {
            let mut st = self.lock();
            st.seen.insert(
                (key.0.clone(), key.1.clone(), ContainerKind::Sandbox),
                hash.to_string(),
            );
            st.start_attempted.insert(id.clone());
            if let Some(t) = st.nodes.get_mut(&key) {
                t.sandbox = Some(SandboxStatus {
                    id: id.clone(),
                    name: name.clone(),
                    state: EngineState::Created,
                });
            }
        }
        if let Err(e) = self.inner.engine.start(&id).await {
            warn!(error = %e, "starting the network sandbox failed");
            self.set_failed(&key, None, format!("starting the network sandbox: {e}"));
            return Err(e);
        }
        info!(id = %short(&id), %name, "network sandbox started");
        self.refresh(&id).await;
        Ok(())
    }

    async fn create_role(&self, spec: &ContainerSpec, hash: &str) -> Result<()> {
        let key = spec.key();
        let sandbox_id = {
            let mut st = self.lock();
            let t = st
                .nodes
                .entry(key.clone())
                .or_insert_with(|| Tracked::for_spec(spec));
            let sandbox_id = t
                .sandbox
                .as_ref()
                .filter(|s| s.state == EngineState::Running)
                .map(|s| s.id.clone());
            if spec.has_sandbox() && sandbox_id.is_none() {
                let e = RuntimeError::Refused {
                    what: format!("starting {}", spec.container_name()),
                    message: "its network sandbox is not running".into(),
                };
                if t.status.state != NodeState::Failed {
                    t.status.state = NodeState::Failed;
                    t.status.error = e.to_string();
                }
                return Err(e);
            }
            t.reset_role(spec);
            sandbox_id
        };
        self.check_image(&key, &spec.image).await?;
        let name = spec.container_name();
        let config = &self.inner.config;
        let body = spec.create_body(&config.agent_url, &config.sandbox, sandbox_id.as_deref());
        let id = match self.inner.engine.create(&name, body).await {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "create failed");
                self.create_failed(&key, &e, "creating the container");
                return Err(e);
            }
        };
        {
            let mut st = self.lock();
            st.seen.insert(
                (key.0.clone(), key.1.clone(), ContainerKind::Role),
                hash.to_string(),
            );
            st.start_attempted.insert(id.clone());
            if let Some(t) = st.nodes.get_mut(&key) {
                t.status.container_id = id.clone();
                t.status.state = NodeState::Created;
            }
        }
        // follow before starting, so that no early line is missed
        self.ensure_follower(&key, &id, false);
        if let Err(e) = self.inner.engine.start(&id).await {
            warn!(error = %e, "start failed");
            self.set_failed(&key, Some(&id), e.to_string());
            self.refresh(&id).await;
            return Err(e);
        }
        info!(id = %short(&id), %name, image = %spec.image, "started");
        self.refresh(&id).await;
        Ok(())
    }

    fn create_failed(&self, key: &NodeKey, e: &RuntimeError, what: &str) {
        if e.is_transient() {
            self.set_pending_error(key, format!("{what}: {e}"));
        } else {
            self.set_failed(key, None, e.to_string());
        }
    }

    fn set_failed(&self, key: &NodeKey, id: Option<&str>, error: String) {
        let mut st = self.lock();
        if let Some(t) = st.nodes.get_mut(key)
            && id.is_none_or(|id| t.status.container_id == id)
        {
            t.status.state = NodeState::Failed;
            t.status.error = error;
        }
    }

    fn set_pending_error(&self, key: &NodeKey, error: String) {
        let mut st = self.lock();
        if let Some(t) = st.nodes.get_mut(key) {
            t.status.state = NodeState::Pending;
            t.status.error = error;
        }
    }

    /// Forgets tracked nodes that are neither desired nor backed by a container.
    fn drop_untracked_leftovers(&self) {
        let mut st = self.lock();
        let desired: BTreeSet<NodeKey> = st
            .desired
            .as_ref()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default();
        st.nodes.retain(|k, t| {
            desired.contains(k)
                || t.sandbox.is_some()
                || (!t.status.container_id.is_empty() && t.status.state != NodeState::Missing)
        });
    }

    /// Adopts labelled containers not tracked yet: status from labels and inspect, output
    /// followed from the start (progress is rebuilt, nothing is restarted).
    async fn adopt_untracked(&self, actual: &[ActualContainer]) {
        let ids: BTreeSet<&str> = actual.iter().map(|c| c.id.as_str()).collect();
        let mut adopted = Vec::new();
        {
            let mut st = self.lock();
            for c in actual {
                let Some(key) = actual_key(c) else { continue };
                let kind = ContainerKind::of_labels(&c.labels);
                let current = st.nodes.get(&key).map(|t| match kind {
                    ContainerKind::Role => t.status.container_id.clone(),
                    ContainerKind::Sandbox => {
                        t.sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default()
                    }
                });
                let adopt = match current.as_deref() {
                    None | Some("") => true,
                    Some(cur) => cur != c.id && !ids.contains(cur),
                };
                if !adopt {
                    continue;
                }
                let desired = st.desired.as_ref().and_then(|d| d.get(&key));
                let regex = desired
                    .map(|s| s.progress_regex.clone())
                    .unwrap_or_else(|| c.labels.get(LABEL_PROGRESS_REGEX).cloned());
                let finished = desired.and_then(|s| s.finished_regex.clone());
                let parser = ProgressParser::with_finished(regex.as_deref(), finished.as_deref())
                    .unwrap_or_else(|_| default_parser());
                let t = st
                    .nodes
                    .entry(key.clone())
                    .or_insert_with(|| Tracked::from_labels(&key, c, parser.clone()));
                match kind {
                    ContainerKind::Role => {
                        let sandbox = t.sandbox.take();
                        let ip = std::mem::take(&mut t.status.ip);
                        *t = Tracked::from_labels(&key, c, parser);
                        t.sandbox = sandbox;
                        t.status.ip = ip;
                        t.status.container_id = c.id.clone();
                        t.status.state = match c.state {
                            EngineState::Created => NodeState::Created,
                            EngineState::Exited | EngineState::Dead => NodeState::Exited,
                            _ => NodeState::Running,
                        };
                    }
                    ContainerKind::Sandbox => {
                        t.sandbox = Some(SandboxStatus {
                            id: c.id.clone(),
                            name: c.name.clone(),
                            state: c.state,
                        });
                    }
                }
                info!(job = %key.0, node = %key.1, kind = kind.as_str(), id = %short(&c.id), "adopting a container");
                let label = c.labels.get(LABEL_SPEC).cloned().unwrap_or_default();
                st.seen.insert((key.0.clone(), key.1.clone(), kind), label);
                adopted.push((key, kind, c.id.clone()));
            }
        }
        for (key, kind, id) in &adopted {
            if *kind == ContainerKind::Role {
                self.ensure_follower(key, id, false);
            }
        }
        // sandboxes first: the role containers take their address
        adopted.sort_by_key(|(_, kind, _)| *kind);
        for (_, _, id) in &adopted {
            self.refresh(id).await;
        }
    }

    /// Starts following the output of role container `id` of node `key` unless that is
    /// being done (or was done to the end, unless `restart_finished`: it runs again).
    fn ensure_follower(&self, key: &NodeKey, id: &str, restart_finished: bool) {
        let mut st = self.lock();
        let Some(t) = st.nodes.get_mut(key) else {
            return;
        };
        if t.status.container_id != id {
            return;
        }
        if t.follower.is_some() && !(restart_finished && t.follow_done) {
            return;
        }
        t.follow_done = false;
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        let stream = self.inner.engine.logs(
            id,
            LogRequest {
                follow: true,
                tail: None,
                timestamps: true,
            },
        );
        let span = info_span!("follow", job = %key.0, node = %key.1);
        let task = tokio::spawn(
            follow(weak, cancel, key.clone(), id.to_string(), stream).instrument(span),
        );
        t.follower = Some(AbortOnDrop(task));
    }

    fn on_line(&self, key: &NodeKey, id: &str, line: &str) {
        let (at, text) = split_timestamp(line);
        let changed = {
            let mut st = self.lock();
            match st.nodes.get_mut(key) {
                Some(t) if t.status.container_id == id => {
                    let changed = t.tracker.observe(text, at.unwrap_or_else(now_ms));
                    if changed {
                        t.status.progress = t.tracker.progress().cloned();
                    }
                    changed
                }
                _ => false,
            }
        };
        if changed {
            self.publish();
        }
    }

    /// Re-reads one container's state from Docker and publishes the change; once a role
    /// container has ended, fetches its log tail.
    async fn refresh(&self, id: &str) {
        let insp = match self.inner.engine.inspect(id).await {
            Ok(i) => i,
            Err(e) => {
                warn!(id = %short(id), error = %e, "inspect failed");
                return;
            }
        };
        let Some(insp) = insp else {
            self.on_gone(id);
            return;
        };
        self.decide_docker_loss(&insp.id).await;
        let need_tail = {
            let mut st = self.lock();
            // (under the same lock as the update below: a suspect of a Docker loss is never
            // shown ended before it is judged)
            if !self.judge_docker_loss(&mut st, &insp) {
                return;
            }
            let Some((key, kind)) = st.find(id) else {
                return;
            };
            let Some(t) = st.nodes.get_mut(&key) else {
                return;
            };
            match kind {
                ContainerKind::Sandbox => {
                    apply_sandbox_inspection(t, &insp);
                    None
                }
                ContainerKind::Role => {
                    let shown = t.status.clone();
                    apply_inspection(&mut t.status, &insp, self.inner.config.host_ip);
                    let ended = matches!(insp.state, EngineState::Exited | EngineState::Dead);
                    if ended && let Some(why) = &t.stopped_by_docker {
                        t.status.state = NodeState::Failed;
                        t.status.error.clone_from(why);
                    }
                    if insp.state == EngineState::Running {
                        // running again after it ended (started by someone: geomx sets no
                        // restart policy): follow it again
                        t.finalized = false;
                        t.status.log_tail.clear();
                        drop(st);
                        self.ensure_follower(&key, id, true);
                        None
                    } else if ended && !t.finalized {
                        // shown ended only together with its log tail: until the tail is
                        // read, what is published stays as it was
                        let ended_status = std::mem::replace(&mut t.status, shown);
                        Some(ended_status)
                    } else {
                        None
                    }
                }
            }
        };
        if let Some(ended_status) = need_tail {
            let lines = self.tail(id).await;
            let mut st = self.lock();
            if let Some((key, ContainerKind::Role)) = st.find(id)
                && let Some(t) = st.nodes.get_mut(&key)
            {
                if !t.finalized {
                    t.status = ended_status;
                }
                t.status.log_tail = lines;
                t.finalized = true;
            }
        }
        self.publish();
    }

    /// Docker's event stream ended (see [`DockerLoss`]): remembers when, which role
    /// containers ran, which daemon that was, and whether Docker answers right after.
    async fn on_event_stream_ended(&self) {
        let at_ms = now_ms();
        let running: BTreeSet<String> = self
            .lock()
            .nodes
            .values()
            .filter(|t| t.status.state == NodeState::Running && !t.status.container_id.is_empty())
            .map(|t| t.status.container_id.clone())
            .collect();
        // a stopping dockerd has closed its socket: the call fails at once; a frozen one
        // does not answer (and stops nothing); a live one answers
        let probe =
            tokio::time::timeout(Duration::from_secs(2), self.inner.engine.list_managed()).await;
        let unreachable = match &probe {
            Ok(Err(e)) => Some(e.to_string()),
            Ok(Ok(_)) => None,
            Err(_) => return,
        };
        let mut st = self.lock();
        let daemon_before = st.daemon_id.clone();
        match &mut st.docker_lost {
            // still judging an earlier loss: the containers that ran then stay suspects
            Some(loss) => {
                loss.unreachable |= unreachable.is_some();
                loss.stopped = None;
            }
            None => {
                if running.is_empty() {
                    return;
                }
                if let Some(e) = &unreachable {
                    warn!(
                        error = %e,
                        running = running.len(),
                        "Docker went away; its running containers will be checked when it answers again"
                    );
                }
                st.docker_lost = Some(DockerLoss {
                    at_ms,
                    running,
                    daemon_before,
                    unreachable: unreachable.is_some(),
                    stopped: None,
                });
            }
        }
    }

    /// Once Docker answers about container `id`, a suspect of a Docker loss: decides
    /// whether Docker restarted meanwhile (another daemon, or not answering right after the
    /// stream ended when its identity is unknown) without live-restore, i.e. whether it
    /// stopped its containers.
    async fn decide_docker_loss(&self, id: &str) {
        let undecided = self
            .lock()
            .docker_lost
            .as_ref()
            .is_some_and(|l| l.running.contains(id) && l.stopped.is_none());
        if !undecided {
            return;
        }
        let now_id = match self.inner.engine.daemon_id().await {
            Ok(id) => id,
            Err(e) => {
                debug!(error = %e, "cannot tell the Docker daemon's identity");
                None
            }
        };
        // unknown means Docker's default: off
        let live = self.inner.engine.live_restore().await.unwrap_or(false);
        let mut st = self.lock();
        if let Some(loss) = &mut st.docker_lost
            && loss.stopped.is_none()
        {
            let restarted = match (&loss.daemon_before, &now_id) {
                (Some(before), Some(now)) => before != now,
                _ => loss.unreachable,
            };
            info!(
                restarted,
                live_restore = live,
                daemon_before = loss.daemon_before.as_deref().unwrap_or("unknown"),
                daemon_now = now_id.as_deref().unwrap_or("unknown"),
                "Docker answers again"
            );
            loss.stopped = Some(restarted && !live);
        }
        if now_id.is_some() {
            st.daemon_id = now_id;
        }
    }

    /// Judges a role container that ran when Docker went away, as Docker now shows it
    /// (`insp`): stopped by a restart of Docker if it has ended and Docker stopped its
    /// containers (see [`Runtime::decide_docker_loss`]); marks the node
    /// ([`Tracked::stopped_by_docker`]). False when the inspection must not be applied yet
    /// (the loss is not decided: a new loss began meanwhile; the next resync looks again).
    fn judge_docker_loss(&self, st: &mut State, insp: &Inspection) -> bool {
        let Some(loss) = &mut st.docker_lost else {
            return true;
        };
        if !loss.running.contains(&insp.id)
            || matches!(insp.state, EngineState::Removing | EngineState::Unknown)
        {
            return true;
        }
        let Some(stopped) = loss.stopped else {
            return false;
        };
        loss.running.remove(&insp.id);
        let lost_at = loss.at_ms;
        if loss.running.is_empty() {
            st.docker_lost = None;
        }
        let ended = matches!(insp.state, EngineState::Exited | EngineState::Dead);
        if !(ended && stopped) {
            return true;
        }
        let host = if self.inner.config.host.is_empty() {
            "this host".to_owned()
        } else {
            format!("host {}", self.inner.config.host)
        };
        if let Some((key, ContainerKind::Role)) = st.find(&insp.id)
            && let Some(t) = st.nodes.get_mut(&key)
        {
            warn!(
                job = %key.0,
                node = %key.1,
                id = %short(&insp.id),
                exit_code = insp.exit_code.unwrap_or(-1),
                lost_at_ms = lost_at,
                finished_at_ms = insp.finished_at_ms,
                "a role container was stopped by a restart of Docker: reporting it failed"
            );
            t.stopped_by_docker = Some(format!(
                "stopped by a restart of Docker on {host} (it was running when Docker went away; its exit code says nothing about the training)"
            ));
        }
        true
    }

    /// The containers that ran when Docker went away, not judged yet (after a resync found
    /// Docker back, each is inspected once).
    fn docker_loss_suspects(&self) -> Vec<String> {
        self.lock()
            .docker_lost
            .as_ref()
            .map(|l| l.running.iter().cloned().collect())
            .unwrap_or_default()
    }

    async fn tail(&self, id: &str) -> Vec<String> {
        let n = self.inner.config.log_tail_lines;
        let mut frames = self.inner.engine.logs(
            id,
            LogRequest {
                follow: false,
                tail: Some(n),
                timestamps: true,
            },
        );
        let mut splitter = LineSplitter::default();
        let mut lines: Vec<(Option<i64>, String)> = Vec::new();
        while let Some(frame) = frames.next().await {
            match frame {
                Ok(f) => {
                    for l in splitter.push(&f) {
                        let (at, text) = split_timestamp(&l);
                        lines.push((at, text.to_string()));
                    }
                }
                Err(e) => {
                    warn!(id = %short(id), error = %e, "reading the log tail failed");
                    break;
                }
            }
        }
        for (_, l) in splitter.finish() {
            let (at, text) = split_timestamp(&l);
            lines.push((at, text.to_string()));
        }
        // stdout and stderr arrive interleaved in time order already; keep it stable
        lines.sort_by_key(|(at, _)| at.unwrap_or(0));
        let skip = lines.len().saturating_sub(n as usize);
        lines.into_iter().skip(skip).map(|(_, l)| l).collect()
    }

    /// A container disappeared: if its node is still desired it is Missing, otherwise
    /// forgotten.
    fn on_gone(&self, id: &str) {
        {
            let mut st = self.lock();
            let Some((key, kind)) = st.find(id) else {
                return;
            };
            let desired = st.is_desired(&key);
            if let Some(t) = st.nodes.get_mut(&key) {
                if desired {
                    warn!(job = %key.0, node = %key.1, kind = kind.as_str(), "container removed outside geomx");
                    mark_missing(t, kind);
                } else {
                    match kind {
                        ContainerKind::Role => {
                            t.status.container_id.clear();
                            t.follower = None;
                        }
                        ContainerKind::Sandbox => t.sandbox = None,
                    }
                    if t.status.container_id.is_empty() && t.sandbox.is_none() {
                        st.nodes.remove(&key);
                    }
                }
            }
        }
        self.publish();
    }

    async fn resync(&self) {
        let _g = self.inner.apply_lock.lock().await;
        let desired: Option<Vec<ContainerSpec>> = self
            .lock()
            .desired
            .as_ref()
            .map(|d| d.values().cloned().collect());
        match desired {
            Some(d) => {
                if let Err(e) = self.reconcile_locked(d, false).await {
                    warn!(error = %e, "resync failed");
                }
            }
            None => match self.inner.engine.list_managed().await {
                Ok(actual) => self.adopt_untracked(&actual).await,
                Err(e) => warn!(error = %e, "resync failed"),
            },
        }
        // containers whose state Docker reports differently from ours, or gone ones
        let actual = match self.inner.engine.list_managed().await {
            Ok(a) => a,
            Err(_) => return,
        };
        let stale: Vec<String> = {
            let st = self.lock();
            let mut v = Vec::new();
            for t in st.nodes.values() {
                let role = &t.status.container_id;
                if !role.is_empty() {
                    let fresh = match actual.iter().find(|c| c.id == *role) {
                        None => t.status.state == NodeState::Missing,
                        Some(c) => same_phase(c.state, t.status.state, t.finalized),
                    };
                    if !fresh {
                        v.push(role.clone());
                    }
                }
                if let Some(s) = &t.sandbox
                    && actual.iter().find(|c| c.id == s.id).map(|c| c.state) != Some(s.state)
                {
                    v.push(s.id.clone());
                }
            }
            v
        };
        // (Docker answers again) judge the containers that ran when it went away
        let mut ids = stale;
        for id in self.docker_loss_suspects() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        for id in ids {
            self.refresh(&id).await;
        }
        // suspects Docker no longer has were removed meanwhile: nothing to judge
        let known: BTreeSet<&str> = actual.iter().map(|c| c.id.as_str()).collect();
        let mut st = self.lock();
        if let Some(loss) = &mut st.docker_lost {
            loss.running.retain(|id| known.contains(id.as_str()));
            if loss.running.is_empty() {
                st.docker_lost = None;
            }
        }
    }

    fn spawn_resync_loop(&self) {
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        let every = self.inner.config.resync_interval;
        let resync = async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let rt = Runtime { inner };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = rt.resync() => {}
                }
            }
        };
        // the caller's span (the agent's `host` field) stays on the loop's logs
        tokio::spawn(resync.in_current_span());
    }

    fn spawn_event_loop(&self) {
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        let mut stream = self.inner.engine.events();
        let events = async move {
            loop {
                loop {
                    let ev = tokio::select! {
                        _ = cancel.cancelled() => return,
                        ev = stream.next() => ev,
                    };
                    let Some(inner) = weak.upgrade() else { return };
                    let rt = Runtime { inner };
                    match ev {
                        Some(Ok(ev)) => {
                            debug!(id = %short(&ev.id), action = %ev.action, "docker event");
                            match ev.action.as_str() {
                                "destroy" => rt.on_gone(&ev.id),
                                "start" | "die" | "oom" | "stop" | "restart" | "pause"
                                | "unpause" => {
                                    let refresh = async move { rt.refresh(&ev.id).await };
                                    tokio::spawn(refresh.in_current_span());
                                }
                                _ => {}
                            }
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "docker event stream failed; reconnecting");
                            break;
                        }
                        None => {
                            warn!("docker event stream ended; reconnecting");
                            break;
                        }
                    }
                }
                if let Some(inner) = weak.upgrade() {
                    let rt = Runtime { inner };
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        () = rt.on_event_stream_ended() => {}
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let rt = Runtime { inner };
                stream = rt.inner.engine.events();
                let rt2 = rt.clone();
                let resync = async move { rt2.resync().await };
                tokio::spawn(resync.in_current_span());
            }
        };
        tokio::spawn(events.in_current_span());
    }

    /// The output of one node's role container (`geomxctl logs`): the last `tail` lines
    /// (0 for all), then, with `follow`, new output until the container ends.
    pub async fn logs(
        &self,
        job: &str,
        node: &str,
        follow: bool,
        tail: u32,
    ) -> Result<BoxStream<'static, Result<LogChunk>>> {
        let no_such = || RuntimeError::NoSuchNode {
            job: job.to_string(),
            node: node.to_string(),
        };
        let tracked = self
            .status(job, node)
            .map(|s| s.container_id)
            .filter(|id| !id.is_empty());
        let id = match tracked {
            Some(id) => id,
            None => {
                self.inner
                    .engine
                    .inspect(&container_name(job, node))
                    .await?
                    .ok_or_else(no_such)?
                    .id
            }
        };
        let frames = self.inner.engine.logs(
            &id,
            LogRequest {
                follow,
                tail: (tail > 0).then_some(tail),
                timestamps: false,
            },
        );
        let (job, node) = (job.to_string(), node.to_string());
        let frames = frames.map(move |r| {
            r.map_err(|e| match e {
                RuntimeError::NoSuchNode { .. } => RuntimeError::NoSuchNode {
                    job: job.clone(),
                    node: node.clone(),
                },
                other => other,
            })
        });
        Ok(crate::lines::chunks(frames.boxed()))
    }

    /// Keeps the output of role container `id` in the [`RuntimeConfig::log_archive`] (if
    /// any) before it is removed. Best effort: a failure is logged, the removal goes on.
    async fn archive_logs(&self, id: &str) {
        let Some(archive) = &self.inner.config.log_archive else {
            return;
        };
        // the container's own labels name it (its tracking may be gone already)
        let owner = match self.inner.engine.inspect(id).await {
            Ok(Some(insp)) => {
                let label = |k: &str| insp.labels.get(k).cloned().unwrap_or_default();
                Some((
                    label(crate::spec::LABEL_JOB),
                    label(crate::spec::LABEL_NODE),
                    label(LABEL_GENERATION).parse().unwrap_or(0),
                ))
            }
            _ => None,
        };
        let Some((job, node, generation)) =
            owner.filter(|(j, n, _)| !j.is_empty() && !n.is_empty())
        else {
            return;
        };
        let frames = self.inner.engine.logs(
            id,
            LogRequest {
                follow: false,
                tail: None,
                timestamps: false,
            },
        );
        let mut chunks = crate::lines::chunks(frames.boxed());
        let mut lines = Vec::new();
        while let Some(c) = chunks.next().await {
            match c {
                Ok(c) => lines.extend(c.lines.into_iter().map(|l| (c.stderr, l))),
                Err(e) => {
                    warn!(%job, %node, error = %e, "reading the output to keep failed; keeping what was read");
                    break;
                }
            }
        }
        match archive.store(&job, &node, generation, &lines) {
            Ok(path) => {
                debug!(%job, %node, generation, path = %path.display(), lines = lines.len(), "output kept")
            }
            Err(e) => warn!(%job, %node, error = %e, "cannot keep the output"),
        }
        for p in archive.prune(std::time::SystemTime::now()) {
            debug!(path = %p.display(), "old output removed");
        }
    }

    /// Deletes what the [`RuntimeConfig::log_archive`] kept of `job`; whether it kept any.
    pub fn forget_logs(&self, job: &str) -> Result<bool> {
        match &self.inner.config.log_archive {
            Some(archive) => archive.forget(job),
            None => Ok(false),
        }
    }

    /// The output of a node: its container's (streamed; `follow` until it ends) while it
    /// exists and is of `generation` (any when `None`), else what the
    /// [`RuntimeConfig::log_archive`] kept of it (of `generation`, or the latest).
    pub async fn logs_of(
        &self,
        job: &str,
        node: &str,
        generation: Option<u32>,
        follow: bool,
        tail: u32,
    ) -> Result<BoxStream<'static, Result<LogChunk>>> {
        let live = self
            .status(job, node)
            .filter(|s| !s.container_id.is_empty())
            .is_some_and(|s| generation.is_none_or(|g| g == s.generation));
        if live {
            return self.logs(job, node, follow, tail).await;
        }
        let kept = self
            .inner
            .config
            .log_archive
            .as_ref()
            .and_then(|a| a.read(job, node, generation, tail));
        match (kept, generation) {
            (Some(chunks), _) => Ok(futures::stream::iter(chunks.into_iter().map(Ok)).boxed()),
            // not tracked: perhaps a container of the name (adopted late)
            (None, None) => self.logs(job, node, follow, tail).await,
            (None, Some(_)) => Err(RuntimeError::NoSuchNode {
                job: job.to_string(),
                node: node.to_string(),
            }),
        }
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

    /// Merges a node's own heartbeat (see [`crate::heartbeat`]) into its progress: the
    /// body's job/node must name a node this runtime tracks; without them the caller is the
    /// running docker0 container with address `peer`.
    pub fn record_heartbeat(
        &self,
        report: &HeartbeatReport,
        peer: IpAddr,
    ) -> Result<NodeKey, HeartbeatError> {
        let key = {
            let mut st = self.lock();
            let key = match (&report.job, &report.node) {
                (Some(job), Some(node)) => {
                    let key = (job.clone(), node.clone());
                    if !st.nodes.contains_key(&key) {
                        return Err(HeartbeatError::UnknownNode {
                            job: job.clone(),
                            node: node.clone(),
                        });
                    }
                    key
                }
                (None, None) => {
                    let peer_s = peer.to_string();
                    let matches: Vec<NodeKey> = st
                        .nodes
                        .iter()
                        .filter(|(_, t)| {
                            t.status.state == NodeState::Running && t.status.ip == peer_s
                        })
                        .map(|(k, _)| k.clone())
                        .collect();
                    match matches.len() {
                        1 => matches.into_iter().next().unwrap_or_default(),
                        0 => return Err(HeartbeatError::UnknownPeer(peer)),
                        _ => return Err(HeartbeatError::AmbiguousPeer(peer)),
                    }
                }
                _ => {
                    return Err(HeartbeatError::Invalid(
                        "give both \"job\" and \"node\" (GEOMX_JOB, GEOMX_NODE) or neither".into(),
                    ));
                }
            };
            if let Some(t) = st.nodes.get_mut(&key) {
                t.tracker
                    .report(report.epoch, report.step, report.metrics.clone(), now_ms());
                t.status.progress = t.tracker.progress().cloned();
            }
            key
        };
        self.publish();
        Ok(key)
    }
}

impl<E: Engine> HeartbeatSink for Runtime<E> {
    fn record(&self, report: &HeartbeatReport, peer: IpAddr) -> Result<NodeKey, HeartbeatError> {
        self.record_heartbeat(report, peer)
    }
}

/// Before removing container `id` of `key`: forget it (so that its events are not taken
/// for anything else); forget the node when it is no longer desired.
fn detach(st: &mut State, key: &NodeKey, kind: ContainerKind, id: &str) {
    let desired = st.is_desired(key);
    let desired_spec = st.desired.as_ref().and_then(|d| d.get(key)).cloned();
    let still_wanted = match (&desired_spec, kind) {
        (Some(s), ContainerKind::Role) => s.start,
        (Some(s), ContainerKind::Sandbox) => s.has_sandbox(),
        (None, _) => false,
    };
    if !still_wanted {
        st.seen.remove(&(key.0.clone(), key.1.clone(), kind));
    }
    if !desired {
        st.nodes.remove(key);
        return;
    }
    let Some(t) = st.nodes.get_mut(key) else {
        return;
    };
    match kind {
        ContainerKind::Role if t.status.container_id == id => match &desired_spec {
            Some(spec) => t.reset_role(spec),
            None => t.status.container_id.clear(),
        },
        ContainerKind::Sandbox if t.sandbox.as_ref().is_some_and(|s| s.id == id) => {
            t.sandbox = None;
            t.status.ip.clear();
        }
        _ => {}
    }
}

fn mark_missing(t: &mut Tracked, kind: ContainerKind) {
    match kind {
        ContainerKind::Role => {
            if t.status.state != NodeState::Missing {
                warn!(job = %t.status.job, node = %t.status.node, "role container removed outside geomx; not recreating it");
            }
            t.status.state = NodeState::Missing;
            t.follower = None;
            if t.status.error.is_empty() {
                t.status.error = "the container was removed outside geomx".into();
            }
        }
        ContainerKind::Sandbox => {
            let name = t
                .sandbox
                .take()
                .map(|s| s.name)
                .unwrap_or_else(|| crate::spec::sandbox_name(&t.status.job, &t.status.node));
            // the node's network is gone with it, unless it has ended anyway
            if !matches!(t.status.state, NodeState::Exited | NodeState::Failed) {
                t.status.state = NodeState::Missing;
                if t.status.error.is_empty() {
                    t.status.error =
                        format!("the network sandbox {name} was removed outside geomx");
                }
            }
        }
    }
}

async fn follow<E: Engine>(
    weak: Weak<Inner<E>>,
    cancel: CancellationToken,
    key: NodeKey,
    id: String,
    mut stream: BoxStream<'static, Result<crate::engine::LogFrame>>,
) {
    let mut splitter = LineSplitter::default();
    let mut failed = false;
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(inner) = weak.upgrade() else { return };
        let rt = Runtime { inner };
        match item {
            Some(Ok(frame)) => {
                for line in splitter.push(&frame) {
                    rt.on_line(&key, &id, &line);
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "output stream failed");
                failed = true;
                break;
            }
            None => break,
        }
    }
    if failed {
        // a container whose output cannot be read must not make us retry in a hot loop
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    let Some(inner) = weak.upgrade() else { return };
    let rt = Runtime { inner };
    for (_, line) in splitter.finish() {
        rt.on_line(&key, &id, &line);
    }
    if let Some(t) = rt.lock().nodes.get_mut(&key)
        && t.status.container_id == id
    {
        t.follow_done = true;
    }
    debug!("output ended");
    // the stream ends when the container does: report it even if the event was missed
    // (the finished task stays registered as the follower: an ended container is not
    // re-read on every apply; `refresh` starts a new follower if it runs again)
    rt.refresh(&id).await;
}

fn apply_sandbox_inspection(t: &mut Tracked, i: &Inspection) {
    let Some(sb) = t.sandbox.as_mut() else {
        return;
    };
    sb.state = i.state;
    if let Some(ip) = &i.ip {
        t.status.ip = ip.clone();
    }
    let ended = matches!(i.state, EngineState::Exited | EngineState::Dead);
    if ended && !t.status.state.is_terminal() {
        t.status.state = NodeState::Failed;
        t.status.error = format!(
            "the network sandbox {} ended (exit code {})",
            sb.name,
            i.exit_code.unwrap_or(-1)
        );
    }
}

fn apply_inspection(s: &mut NodeStatus, i: &Inspection, host_ip: Option<Ipv4Addr>) {
    match i.state {
        EngineState::Running | EngineState::Paused | EngineState::Restarting => {
            s.state = NodeState::Running;
            s.exit_code = None;
        }
        EngineState::Created => {
            if i.error.is_empty() {
                if s.state != NodeState::Failed {
                    s.state = NodeState::Created;
                }
            } else {
                s.state = NodeState::Failed;
                s.error = i.error.clone();
                s.exit_code = i.exit_code.and_then(|c| i32::try_from(c).ok());
            }
        }
        EngineState::Exited | EngineState::Dead => {
            let code = i
                .exit_code
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(-1);
            s.exit_code = Some(code);
            s.state = if code == 0 && !i.oom_killed {
                NodeState::Exited
            } else {
                NodeState::Failed
            };
            if i.oom_killed {
                s.error = OOM_KILLED.into();
            } else if !i.error.is_empty() {
                s.error = i.error.clone();
            }
        }
        EngineState::Removing | EngineState::Unknown => {}
    }
    if i.host_network {
        if let Some(ip) = host_ip {
            s.ip = ip.to_string();
        }
    } else if let Some(ip) = &i.ip {
        // (a role container in its sandbox's network has no address of its own)
        s.ip = ip.clone();
    }
    s.started_at_ms = i.started_at_ms;
    s.finished_at_ms = if s.state.is_terminal() {
        i.finished_at_ms
    } else {
        0
    };
    s.restarts = i.restart_count;
}

fn same_phase(engine: EngineState, ours: NodeState, finalized: bool) -> bool {
    match engine {
        EngineState::Running | EngineState::Paused | EngineState::Restarting => {
            ours == NodeState::Running
        }
        EngineState::Created => matches!(ours, NodeState::Created | NodeState::Failed),
        EngineState::Exited | EngineState::Dead => {
            matches!(ours, NodeState::Exited | NodeState::Failed) && finalized
        }
        EngineState::Removing | EngineState::Unknown => true,
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
