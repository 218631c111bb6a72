//! Jobs: submission, placement, the state machine, heartbeat aggregation, and
//! `geomx.v1.JobService`.
//!
//! * [`record`]: what is persisted in sled, and the key layout.
//! * [`engine`]: the state machine as pure functions (decisions from records + reports).
//! * [`placement`]: admission checks (hosts ready, images present, pseudo ports free).
//! * [`view`]: the API messages (`Job`, `JobNode`, `Event`, `ContainerSpec`).
//! * [`logs`]: the `NodeLogs` proxy to the agents.
//! * [`api`]: the gRPC service over [`Jobs`].
//!
//! [`Jobs`] is the jobs layer: it implements [`Workloads`] (the role containers of each
//! host's desired state, the agents' reports, membership changes), keeps every run's records
//! in memory (loaded from sled at start), and changes them in one place,
//! [`Jobs::reconcile`]: under one async lock it runs [`engine::evaluate`], commits the
//! changes durably, applies them to memory, and publishes a new revision when a host's
//! containers changed.
//!
//! Heartbeats are cheap: [`Workloads::host_reported`] updates the in-memory soft state of the
//! reported nodes (status, heartbeat time, progress, throughput) under a short lock and only
//! reconciles a job when a report says something the records do not know yet (a new state,
//! a sandbox IP, an exit). A periodic tick ([`JobOptions::tick`]) catches what no report
//! announces: stalls, nodes no longer reported, restart drains.

pub mod api;
pub mod binds;
pub mod engine;
pub mod images;
pub mod limits;
pub mod logs;
pub mod placement;
pub mod record;
pub mod rendezvous;
pub mod stub;
pub mod view;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use geomx_proto::v1::{
    ContainerSpec, Event, HostReport, Job, LogChunk, NodeLogsRequest, NodeStatus,
    RemoveJobResponse, UserLogsRequest,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::ClientTlsConfig;
use tracing::Instrument;

use self::engine::{Changes, Command, Ctx, HostCond, HostNodes, JobSoft, NodeSoft, PlanIndex};
use self::logs::AgentConnector;
use self::placement::PortUse;
use self::record::{
    CURRENT_PREFIX, CurrentRecord, JobMeta, JobSource, NodeRecord, NodeState, Phase, current_key,
    event_scope, meta_key, node_key, node_prefix, parse_job_ref, run_prefix, source_key,
};
use self::view::RunRef;
use crate::membership::{Membership, MembershipError};
use crate::metrics::{JobCounters, JobsSummary, PartyTraining};
use crate::store::{Batch, EventRecord, EventScope, HostState, StoreError, TreeId, now_ms};
use crate::validate;
use crate::workloads::{HostChange, WorkloadError, Workloads};

pub use self::api::JobApi;

/// Largest job file accepted (1 MiB).
pub const MAX_JOB_FILE_LEN: usize = 1 << 20;
/// Longest file name accepted with a job.
pub const MAX_FILE_NAME_LEN: usize = 256;
/// Lines of a node's log tail kept from a report.
pub const MAX_LOG_TAIL_LINES: usize = 50;
/// Longest log line kept from a report.
pub const MAX_LOG_LINE_LEN: usize = 1024;
/// Longest error kept from a report.
pub const MAX_NODE_ERROR_LEN: usize = 4096;
/// Longest container id kept from a report (Docker's are 64 hex digits).
pub const MAX_CONTAINER_ID_LEN: usize = 128;
/// Longest node address kept from a report (an IPv4 address is at most 15 characters).
pub const MAX_NODE_IP_LEN: usize = 64;
/// Most progress metrics kept from a report (those with the first names).
pub const MAX_METRICS: usize = 32;
/// Longest metric name kept from a report.
pub const MAX_METRIC_NAME_LEN: usize = 64;
/// Longest list of problems in the message of a refused submission. The problems of a job
/// file echo its values, and the message travels percent-encoded in the `grpc-message`
/// trailer, which clients refuse past 16 KiB of headers (hyper's default): 4 KiB stays
/// under it even if every byte is encoded (3 bytes each).
pub const MAX_SUBMIT_ERROR_LEN: usize = 4 << 10;

/// Tunables of the jobs layer. Not in the config file or flags: the defaults are what a
/// cluster wants; tests shorten them programmatically.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// How often stalls, vanished nodes and restart drains are checked (default 500 ms).
    pub tick: Duration,
    /// Replaces the `stall_timeout` of every job. **For tests only**: job files cannot set
    /// less than 10 s (`geomx_job::limits::STALL_TIMEOUT_MIN_SECS`), and nothing outside
    /// code can set this (no config key, flag or variable).
    pub stall_timeout_override: Option<Duration>,
    /// How long a restart waits for the agents to remove the old generation's containers
    /// before it starts the next one anyway (default 30 s).
    pub restart_drain_timeout: Duration,
    /// Connect timeout of `NodeLogs` to an agent (default 5 s).
    pub agent_connect_timeout: Duration,
    /// An ended job is removed (as by `geomxctl rm`) this long after it ended; `None`
    /// keeps it (the controller's `job_retention`, see [`crate::config`]).
    pub job_retention: Option<Duration>,
    /// Most bytes of role containers one host's desired state may hold at submit (default
    /// [`limits::MAX_HOST_STATE_LEN`]; tests lower it to stay light).
    pub max_host_state_len: usize,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            tick: Duration::from_millis(500),
            stall_timeout_override: None,
            restart_drain_timeout: Duration::from_secs(30),
            agent_connect_timeout: Duration::from_secs(5),
            job_retention: None,
            max_host_state_len: limits::MAX_HOST_STATE_LEN,
        }
    }
}

/// Errors of the jobs layer (besides refusals, which are gRPC statuses).
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Committing or publishing through the membership failed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// A stored job is unusable.
    #[error("stored job {job}: {message}")]
    Corrupt {
        /// The job.
        job: String,
        /// What is wrong.
        message: String,
    },
}

impl From<JobsError> for Status {
    fn from(e: JobsError) -> Status {
        let code = match &e {
            JobsError::Store(s) | JobsError::Membership(MembershipError::Store(s)) => s.code(),
            _ => tonic::Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// One run in memory.
#[derive(Debug)]
struct JobEntry {
    meta: JobMeta,
    job_toml: String,
    idx: Arc<PlanIndex>,
    nodes: Vec<NodeRecord>,
    soft: JobSoft,
}

impl JobEntry {
    fn run_ref(&self) -> RunRef<'_> {
        RunRef {
            meta: &self.meta,
            job_toml: &self.job_toml,
            idx: &self.idx,
            nodes: &self.nodes,
            soft: Some(&self.soft),
        }
    }

    fn is_active(&self) -> bool {
        !self.meta.phase.is_terminal()
    }

    /// Applies persisted changes and resets the soft state they invalidate; counts the
    /// phase changes and restarts in `counters`.
    fn apply(&mut self, changes: &Changes, now: Instant, counters: &JobCounters) {
        if let Some(m) = &changes.meta {
            counters.observe(&self.meta, m);
            if m.phase != self.meta.phase {
                self.soft.phase_since = now;
            }
            self.meta = m.clone();
        }
        for (i, n) in &changes.nodes {
            self.nodes[*i] = n.clone();
        }
        if changes.new_generation {
            self.soft.nodes = vec![NodeSoft::default(); self.idx.len()];
        }
        for &i in &changes.started {
            self.soft.nodes[i].start_sent = Some(now);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The latest run of every name.
    jobs: HashMap<String, JobEntry>,
    /// Host → names of the jobs with nodes on it.
    by_host: HashMap<String, BTreeSet<String>>,
}

/// The jobs layer. Shared as `Arc<Jobs>`; see the module docs.
pub struct Jobs {
    membership: Arc<Membership>,
    options: JobOptions,
    connector: AgentConnector,
    inner: Mutex<Inner>,
    write: tokio::sync::Mutex<()>,
    /// Bumped after every persisted change of any job.
    changes: watch::Sender<u64>,
    /// Bumped when reports change what a watcher shows (progress, states).
    reports: watch::Sender<u64>,
    /// Each host's memory and CPUs from its agent's last report that said (placement).
    capacity: Mutex<BTreeMap<String, limits::HostCapacity>>,
    /// Submissions and phase changes, for `/metrics` ([`crate::metrics`]).
    counters: JobCounters,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Jobs {
    /// Loads every job from the membership's store. `agent_tls` is the controller's client
    /// identity for `NodeLogs` (mTLS to the agents); `None` in insecure mode.
    pub fn load(
        membership: Arc<Membership>,
        agent_tls: Option<ClientTlsConfig>,
        options: JobOptions,
    ) -> Result<Arc<Jobs>, JobsError> {
        let store = membership.store();
        let now = Instant::now();
        let mut inner = Inner::default();
        let currents: Vec<CurrentRecord> =
            store.scan_prefix_json(TreeId::Jobs, CURRENT_PREFIX.as_bytes())?;
        for cur in currents {
            let entry = load_run(store, &cur.name, cur.run, now)?;
            if entry.is_active() {
                tracing::info!(
                    job = %entry.meta.name,
                    run = entry.meta.run,
                    phase = entry.meta.phase.as_str(),
                    generation = entry.meta.generation,
                    "job reloaded; its agents' next reports refresh its nodes"
                );
            }
            for host in entry.idx.by_host.keys() {
                inner
                    .by_host
                    .entry(host.clone())
                    .or_default()
                    .insert(cur.name.clone());
            }
            inner.jobs.insert(cur.name, entry);
        }
        let (changes, _) = watch::channel(0);
        let (reports, _) = watch::channel(0);
        Ok(Arc::new(Jobs {
            membership,
            connector: AgentConnector::new(agent_tls, options.agent_connect_timeout),
            options,
            inner: Mutex::new(inner),
            write: tokio::sync::Mutex::new(()),
            changes,
            reports,
            capacity: Mutex::new(BTreeMap::new()),
            counters: JobCounters::default(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The options in effect.
    pub fn options(&self) -> &JobOptions {
        &self.options
    }

    /// The counters of submissions, phase changes and restarts since the process started.
    pub fn counters(&self) -> &JobCounters {
        &self.counters
    }

    /// What the jobs gauges of `/metrics` show: every name's latest phase, and the training
    /// progress of every party of every active job (see [`crate::metrics`]).
    pub fn metrics_summary(&self, now: Instant) -> JobsSummary {
        let inner = self.lock();
        let mut summary = JobsSummary::default();
        for e in inner.jobs.values() {
            summary.phases.push(e.meta.phase);
            if !e.is_active() {
                continue;
            }
            let mut parties: BTreeMap<&str, PartyTraining> = BTreeMap::new();
            for (n, soft) in e.idx.plan.nodes.iter().zip(&e.soft.nodes) {
                let t = parties
                    .entry(n.party.as_str())
                    .or_insert_with(|| PartyTraining {
                        job: e.meta.name.clone(),
                        party: n.party.clone(),
                        ..PartyTraining::default()
                    });
                t.iterations_per_s = t.iterations_per_s.max(soft.iterations_per_s(now));
                let progress = soft
                    .status
                    .as_ref()
                    .filter(|s| s.generation == e.meta.generation)
                    .and_then(|s| s.progress.as_ref());
                if let Some(p) = progress {
                    t.iteration = t.iteration.max(p.iteration);
                    t.epoch = t.epoch.max(p.epoch);
                    if let Some(a) = p.accuracy.filter(|a| a.is_finite()) {
                        t.best_accuracy = Some(t.best_accuracy.map_or(a, |b| b.max(a)));
                    }
                }
            }
            summary.training.extend(parties.into_values());
        }
        summary
    }

    /// Subscribes to persisted changes (a counter bumped after each).
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Subscribes to report-driven changes (progress, node states as reported).
    pub fn subscribe_reports(&self) -> watch::Receiver<u64> {
        self.reports.subscribe()
    }

    fn host_conds(&self) -> BTreeMap<String, HostCond> {
        self.membership
            .hosts()
            .into_iter()
            .map(|h| {
                let cond = match h.record.state {
                    HostState::Ready => HostCond::Ready,
                    HostState::Lost => HostCond::Lost,
                    HostState::Left => HostCond::Left,
                };
                (h.record.name, cond)
            })
            .collect()
    }

    /// `geomxctl pull`: resolves `image` once (through the first of the hosts that answers)
    /// and has every host of `hosts` (empty: every ready host) pull that digest. Refused
    /// naming the hosts that are not ready or unknown, and the registry's answer.
    pub async fn pull_image(
        &self,
        image: &str,
        hosts: &[String],
    ) -> Result<geomx_proto::v1::PullImageResponse, Status> {
        let views = self.membership.hosts();
        let chosen: Vec<&crate::membership::HostView> = if hosts.is_empty() {
            views
                .iter()
                .filter(|v| v.record.state == HostState::Ready)
                .collect()
        } else {
            let mut chosen = Vec::new();
            let mut problems = Vec::new();
            for h in hosts {
                match views.iter().find(|v| &v.record.name == h) {
                    Some(v) if v.record.state == HostState::Ready => chosen.push(v),
                    Some(v) => problems.push(format!("host {h} is {}", v.record.state.as_str())),
                    None => problems.push(format!("host {h} is not registered")),
                }
            }
            if !problems.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "cannot pull {image}: {}",
                    problems.join("; ")
                )));
            }
            chosen
        };
        if chosen.is_empty() {
            return Err(Status::failed_precondition(format!(
                "cannot pull {image}: no host is ready"
            )));
        }
        let through: Vec<String> = chosen.iter().map(|v| v.record.name.clone()).collect();
        let pinned = if image.contains('@') {
            image.to_owned()
        } else {
            images::resolve(&self.connector, image, &through, |h| {
                chosen
                    .iter()
                    .find(|v| v.record.name == h)
                    .map(|v| v.record.agent_url.clone())
            })
            .await?
            .pinned
        };
        let calls = chosen.iter().map(|v| {
            let (host, url, pinned) = (
                v.record.name.clone(),
                v.record.agent_url.clone(),
                pinned.clone(),
            );
            async move {
                let r = self
                    .connector
                    .pull_image(
                        &host,
                        &url,
                        &pinned,
                        geomx_job::DEFAULT_PULL_TIMEOUT_DURATION,
                    )
                    .await;
                (host, r)
            }
        });
        let mut answer = geomx_proto::v1::PullImageResponse {
            pinned: pinned.clone(),
            ..Default::default()
        };
        let mut errors = Vec::new();
        for (host, r) in futures::future::join_all(calls).await {
            match r {
                Ok(true) => answer.pulling.push(host),
                Ok(false) => answer.present.push(host),
                Err(s) => errors.push(s.message().to_owned()),
            }
        }
        if !errors.is_empty() {
            return Err(Status::unavailable(format!(
                "pulling {pinned}: {}{}",
                errors.join("; "),
                if answer.pulling.is_empty() {
                    String::new()
                } else {
                    format!(" (pulling on {})", answer.pulling.join(", "))
                }
            )));
        }
        tracing::info!(image, %pinned, pulling = ?answer.pulling, "pull started");
        Ok(answer)
    }

    /// Pins the job's image to a digest when it must be (see [`images::decide`]): asks one
    /// host's agent to resolve it and rewrites every node's image. `Ok(None)`: run as named.
    async fn pin_image(&self, plan: &mut geomx_job::Plan) -> Result<Option<PinnedImage>, Status> {
        let hosts = self.membership.hosts();
        let by_name: BTreeMap<&str, &crate::membership::HostView> =
            hosts.iter().map(|h| (h.record.name.as_str(), h)).collect();
        let decision = images::decide(plan, |h| {
            by_name.get(h).map(|v| images::HostImages {
                refs: &v.record.images,
                details: &v.image_details,
            })
        });
        let images::Decision::Resolve { through, why } = decision else {
            return Ok(None);
        };
        let ready = |h: &str| {
            by_name
                .get(h)
                .is_some_and(|v| v.record.state == crate::store::HostState::Ready)
        };
        if !through.iter().all(|h| ready(h)) {
            // placement refuses the job, naming the hosts that are not ready
            return Ok(None);
        }
        let r = images::resolve(&self.connector, &plan.image, &through, |h| {
            by_name.get(h).map(|v| v.record.agent_url.clone())
        })
        .await?;
        tracing::info!(image = %plan.image, pinned = %r.pinned, through = %r.through, "image resolved");
        plan.pin_image(&r.pinned);
        Ok(Some(PinnedImage {
            pinned: r.pinned,
            registry: r.registry,
            through: r.through,
            why,
        }))
    }

    /// The Pulling state of a new job: which of its hosts have the image it runs (`None`
    /// with `image_pull = "never"`: placement made sure every host has it).
    fn pulls_of(&self, plan: &geomx_job::Plan) -> Option<images::Pulls> {
        if plan.image_pull == geomx_job::ImagePull::Never {
            return None;
        }
        let image = plan.image_digest.as_deref().unwrap_or(&plan.image);
        let hosts = self.membership.hosts();
        Some(images::Pulls::new(image, plan.hosts(), |h| {
            hosts
                .iter()
                .find(|v| v.record.name == h)
                .map(|v| v.record.images.clone())
        }))
    }

    /// Compiles, checks and stores a job, then starts what can start; `by` names the caller
    /// (its token's name: in the run's record, its `Submitted` event and the log). Refusals:
    /// `INVALID_ARGUMENT` (the file, with every problem), `ALREADY_EXISTS` (an active job of
    /// that name), `FAILED_PRECONDITION` (placement: hosts, images, ports).
    pub async fn submit(&self, file_name: &str, job_toml: &str, by: &str) -> Result<Job, Status> {
        let file_name = if file_name.trim().is_empty() {
            "job.toml".to_owned()
        } else {
            validate::printable("file_name", file_name, MAX_FILE_NAME_LEN)?
        };
        if job_toml.len() > MAX_JOB_FILE_LEN {
            return Err(Status::invalid_argument(format!(
                "{file_name}: {} bytes; a job file may have at most {MAX_JOB_FILE_LEN}",
                job_toml.len()
            )));
        }
        // Up to a second of CPU for a 1 MiB file full of problems: off the async workers.
        let plan = {
            let (file_name, job_toml) = (file_name.clone(), job_toml.to_owned());
            tokio::task::spawn_blocking(move || geomx_job::plan(&file_name, &job_toml))
                .await
                .map_err(|e| Status::internal(format!("reading the job file: {e}")))?
        };
        let plan = plan.map_err(|errors| {
            let n = errors.len();
            let mut listed = errors.to_string();
            if listed.len() > MAX_SUBMIT_ERROR_LEN {
                listed = format!(
                    "{}\n... (problems cut at {MAX_SUBMIT_ERROR_LEN} bytes; `geomxctl plan` shows them)",
                    validate::truncate(&listed, MAX_SUBMIT_ERROR_LEN)
                );
            }
            Status::invalid_argument(format!(
                "{listed}\n{file_name}: {n} problem{} found, nothing submitted",
                if n == 1 { "" } else { "s" }
            ))
        })?;
        let mut plan = plan;
        let name = plan.job.clone();
        let span = tracing::info_span!("submit", job = %name, by = %by);
        // the bind sources are checked on their hosts while the image is resolved
        let sources = binds::sources_by_host(&plan);
        let ready_urls: BTreeMap<String, String> = self
            .membership
            .hosts()
            .into_iter()
            .filter(|h| h.record.state == HostState::Ready)
            .map(|h| (h.record.name.clone(), h.record.agent_url.clone()))
            .collect();
        let (resolved, bind_problems) = tokio::join!(
            self.pin_image(&mut plan).instrument(span.clone()),
            binds::check(&self.connector, sources, |h| ready_urls.get(h).cloned())
                .instrument(span.clone()),
        );
        let resolved = resolved
            // a refusal like placement's: nothing is stored, and the reason names every
            // host's answer (not found, unauthorized, registry unreachable)
            .map_err(|s| {
                Status::failed_precondition(format!(
                    "job {name} cannot be placed, nothing was started: {}",
                    s.message()
                ))
            })?;
        if !bind_problems.is_empty() {
            // refused like placement: nothing is stored; a path missing only later (removed
            // between submit and start) still fails the job before it starts
            tracing::info!(job = %name, problems = bind_problems.len(), "job refused: bind sources");
            return Err(Status::failed_precondition(format!(
                "job {name} cannot be placed, nothing was started:\n{}",
                bind_problems.join("\n")
            )));
        }
        let idx = PlanIndex::new(plan)
            .map_err(|e| Status::invalid_argument(format!("{file_name}: {e}")))?;
        async move {
            let _write = self.write.lock().await;
            let (run, taken, reserved) = {
                let inner = self.lock();
                if let Some(e) = inner.jobs.get(&name)
                    && e.is_active()
                {
                    return Err(Status::already_exists(format!(
                        "job {name} is already {} (run {}); cancel it (geomxctl cancel {name}) or choose another name",
                        e.meta.phase.as_str(),
                        e.meta.run
                    )));
                }
                let run = inner.jobs.get(&name).map_or(1, |e| e.meta.run + 1);
                let taken: Vec<PortUse> = inner
                    .jobs
                    .values()
                    .filter(|e| e.is_active())
                    .flat_map(|e| placement::scheduler_ports(&e.idx.plan))
                    .collect();
                let reserved = limits::reserved(
                    inner
                        .jobs
                        .values()
                        .filter(|e| e.is_active())
                        .map(|e| &e.idx.plan),
                );
                (run, taken, reserved)
            };
            let mut problems = placement::check(&idx.plan, &self.membership.hosts(), &taken);
            {
                let capacity = self
                    .capacity
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                problems.extend(limits::check_capacity(&idx.plan, &capacity, &reserved));
            }
            let existing: BTreeMap<String, Vec<ContainerSpec>> = idx
                .plan
                .hosts()
                .into_iter()
                .map(|h| (h.to_owned(), self.planned_containers(h)))
                .collect();
            problems.extend(limits::check_state_sizes(
                &idx.plan,
                &existing,
                self.options.max_host_state_len,
            ));
            if !problems.is_empty() {
                tracing::info!(problems = problems.len(), "job refused");
                return Err(Status::failed_precondition(format!(
                    "job {name} cannot be placed, nothing was started:\n{}",
                    problems.join("\n")
                )));
            }

            let now = Instant::now();
            let at = now_ms();
            let idx = Arc::new(idx);
            let plan = &idx.plan;
            let pulls = self.pulls_of(plan);
            let pulling = pulls.as_ref().is_some_and(|p| !p.done());
            let mut entry = JobEntry {
                meta: JobMeta {
                    name: name.clone(),
                    run,
                    phase: if pulling { Phase::Pulling } else { Phase::Pending },
                    submitted_at_ms: at,
                    phase_since_ms: at,
                    submitted_by: by.to_owned(),
                    ..Default::default()
                },
                job_toml: job_toml.to_owned(),
                nodes: plan.nodes.iter().map(|n| NodeRecord::new(&n.name)).collect(),
                soft: JobSoft {
                    preflight: preflight_of(plan),
                    pulls: pulls.clone(),
                    ..JobSoft::new(plan.nodes.len(), now)
                },
                idx: idx.clone(),
            };
            let event = |kind: &str, message: String| EventRecord {
                at_ms: at,
                kind: kind.to_owned(),
                message,
                job: name.clone(),
                ..Default::default()
            };
            let hosts = plan.hosts();
            let mut events = vec![
                event(
                    "Submitted",
                    format!(
                        "run {run} of {name} from {file_name} by token {by:?}: mode {}, network {}, {} nodes on {} host{}; restart {}, max_restarts {}, stall_timeout {}",
                        plan.mode.as_str(),
                        plan.network.as_str(),
                        plan.nodes.len(),
                        hosts.len(),
                        if hosts.len() == 1 { "" } else { "s" },
                        plan.policy.restart.as_str(),
                        plan.policy.max_restarts,
                        plan.policy.stall_timeout_text()
                    ),
                ),
                event(
                    "Placed",
                    hosts
                        .iter()
                        .map(|h| {
                            let nodes: Vec<&str> =
                                plan.nodes_on(h).map(|n| n.name.as_str()).collect();
                            format!("{h}: {}", engine::list_names(nodes, 8))
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            ];
            if let Some(r) = &resolved {
                events.push(event(
                    "ImageResolved",
                    format!(
                        "{} is {} in registry {} (asked through host {}; {}): every host runs that digest",
                        plan.image, r.pinned, r.registry, r.through, r.why
                    ),
                ));
            }
            if let Some(p) = pulls.as_ref().filter(|p| !p.done()) {
                events.push(event(
                    "Pulling",
                    format!(
                        "host{} {} pull{} {}; nothing of the job starts before every host has it (pull_timeout {})",
                        if p.pending().count() == 1 { "" } else { "s" },
                        p.pending().collect::<Vec<_>>().join(", "),
                        if p.pending().count() == 1 { "s" } else { "" },
                        p.image,
                        humantime::format_duration(plan.policy.pull_timeout)
                    ),
                ));
            }
            let conds = self.host_conds();
            let changes = self.evaluate_entry(&entry, &conds, now, None);
            entry.apply(&changes, now, &self.counters);
            events.extend(changes.events);

            let scope = event_scope(&name, run);
            let mut batch = Batch::new();
            batch
                .put_json(TreeId::Jobs, current_key(&name), &CurrentRecord { name: name.clone(), run })
                .map_err(JobsError::from)?;
            batch
                .put_json(
                    TreeId::Jobs,
                    source_key(&name, run),
                    &JobSource {
                        file_name: file_name.clone(),
                        job_toml: job_toml.to_owned(),
                        plan: plan.clone(),
                    },
                )
                .map_err(JobsError::from)?;
            batch
                .put_json(TreeId::Jobs, meta_key(&name, run), &entry.meta)
                .map_err(JobsError::from)?;
            for rec in &entry.nodes {
                batch
                    .put_json(TreeId::Jobs, node_key(&name, run, &rec.name), rec)
                    .map_err(JobsError::from)?;
            }
            for e in &events {
                batch
                    .event(EventScope::Job(&scope), e)
                    .map_err(JobsError::from)?;
            }
            self.membership
                .commit(batch, false)
                .await
                .map_err(JobsError::from)?;
            let job = view::job_message(entry.run_ref(), true, now);
            {
                let mut inner = self.lock();
                for host in idx.by_host.keys() {
                    inner
                        .by_host
                        .entry(host.clone())
                        .or_default()
                        .insert(name.clone());
                }
                inner.jobs.insert(name.clone(), entry);
            }
            let revision = self.membership.publish().await.map_err(JobsError::from)?;
            if let Some(e) = self.lock().jobs.get_mut(&name)
                && let Some(p) = e.soft.preflight.as_mut()
            {
                p.revision = revision;
            }
            self.changes.send_modify(|v| *v += 1);
            self.counters.submissions.inc();
            tracing::info!(run, nodes = idx.len(), phase = ?job.phase, "job accepted");
            Ok(job)
        }
        .instrument(span)
        .await
    }

    fn evaluate_entry(
        &self,
        entry: &JobEntry,
        hosts: &BTreeMap<String, HostCond>,
        now: Instant,
        command: Option<Command>,
    ) -> Changes {
        let ctx = Ctx {
            now,
            now_ms: now_ms(),
            hosts,
            stall_timeout: self
                .options
                .stall_timeout_override
                .unwrap_or(entry.idx.plan.policy.stall_timeout),
            absent_timeout: self.membership.timing().grace_period,
            drain_timeout: self.options.restart_drain_timeout,
        };
        engine::evaluate(
            &entry.idx,
            &entry.meta,
            &entry.nodes,
            &entry.soft,
            &ctx,
            command,
        )
    }

    /// Runs one pass of the state machine over job `name` (see [`engine::evaluate`]) and
    /// persists, applies and publishes what it decided.
    pub async fn reconcile(&self, name: &str, command: Option<Command>) -> Result<(), JobsError> {
        let conds = self.host_conds();
        self.reconcile_with(name, command, &conds).await
    }

    async fn reconcile_with(
        &self,
        name: &str,
        command: Option<Command>,
        conds: &BTreeMap<String, HostCond>,
    ) -> Result<(), JobsError> {
        let _write = self.write.lock().await;
        let now = Instant::now();
        let (changes, run, old_phase) = {
            let inner = self.lock();
            let Some(entry) = inner.jobs.get(name) else {
                return Ok(());
            };
            (
                self.evaluate_entry(entry, conds, now, command),
                entry.meta.run,
                entry.meta.phase,
            )
        };
        if changes.is_empty() {
            return Ok(());
        }
        let scope = event_scope(name, run);
        let mut batch = Batch::new();
        if let Some(meta) = &changes.meta {
            batch.put_json(TreeId::Jobs, meta_key(name, run), meta)?;
        }
        for (_, rec) in &changes.nodes {
            batch.put_json(TreeId::Jobs, node_key(name, run, &rec.name), rec)?;
        }
        for e in &changes.events {
            batch.event(EventScope::Job(&scope), e)?;
        }
        self.membership.commit(batch, false).await?;
        {
            let mut inner = self.lock();
            if let Some(entry) = inner.jobs.get_mut(name) {
                entry.apply(&changes, now, &self.counters);
            }
        }
        for e in &changes.events {
            let level_warn = matches!(
                e.kind.as_str(),
                "Failed" | "NodeFailed" | "NodeMissing" | "Stalled" | "HostLost" | "HostLeft"
            );
            if level_warn {
                tracing::warn!(job = name, node = %e.node, host = %e.host, generation = e.generation, kind = %e.kind, "{}", e.message);
            } else {
                tracing::info!(job = name, node = %e.node, host = %e.host, generation = e.generation, kind = %e.kind, "{}", e.message);
            }
        }
        if let Some(phase) = changes.new_phase()
            && phase != old_phase
        {
            tracing::info!(
                job = name,
                from = old_phase.as_str(),
                to = phase.as_str(),
                "job phase"
            );
        }
        if changes.publish {
            self.membership.publish().await?;
        }
        self.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Cancels job `name` for `by` (the caller's token name): it ends Cancelled and its
    /// containers leave the desired state at once. Cancelling an ended job changes nothing.
    pub async fn cancel(&self, name: &str, by: &str) -> Result<Job, Status> {
        validate_job_name(name)?;
        if !self.lock().jobs.contains_key(name) {
            return Err(not_found(name));
        }
        let span = tracing::info_span!("cancel", job = %name, by = %by);
        self.reconcile(name, Some(Command::Cancel { by: by.to_owned() }))
            .instrument(span)
            .await?;
        self.get(name)
    }

    /// Removes ended job `name`: the records and events of every run of the name, then the
    /// output the agents of its (latest run's) hosts kept. Refused for an active job.
    pub async fn remove(&self, name: &str) -> Result<RemoveJobResponse, Status> {
        validate_job_name(name)?;
        let _write = self.write.lock().await;
        let (runs, hosts) = {
            let inner = self.lock();
            let entry = inner.jobs.get(name).ok_or_else(|| not_found(name))?;
            if entry.is_active() {
                return Err(Status::failed_precondition(format!(
                    "job {name} is {}: cancel it first (geomxctl cancel {name})",
                    entry.meta.phase.as_str()
                )));
            }
            let hosts: Vec<String> = entry.idx.by_host.keys().cloned().collect();
            (entry.meta.run, hosts)
        };
        let store = self.membership.store();
        let mut batch = Batch::new();
        batch.remove(TreeId::Jobs, current_key(name));
        for key in store
            .keys_with_prefix(TreeId::Jobs, format!("run/{name}/").as_bytes())
            .map_err(JobsError::from)?
        {
            batch.remove(TreeId::Jobs, key);
        }
        for run in 1..=runs {
            let scope = event_scope(name, run);
            for key in store
                .event_keys(EventScope::Job(&scope))
                .map_err(JobsError::from)?
            {
                batch.remove(TreeId::Events, key);
            }
        }
        self.membership
            .commit(batch, false)
            .await
            .map_err(JobsError::from)?;
        {
            let mut inner = self.lock();
            inner.jobs.remove(name);
            for names in inner.by_host.values_mut() {
                names.remove(name);
            }
        }
        self.changes.send_modify(|c| *c += 1);
        tracing::info!(job = %name, runs, "job removed");
        // sled keeps the space of what was removed: give it back if it is much
        crate::store::log_compaction(&store.compact().await, "after removing a job");
        release_freed_memory();
        let mut answer = RemoveJobResponse {
            runs,
            ..Default::default()
        };
        for host in hosts {
            let Some(view) = self.membership.host(&host) else {
                answer
                    .unreachable
                    .push(format!("{host}: not registered any more"));
                continue;
            };
            match self
                .connector
                .forget(&host, &view.record.agent_url, name)
                .await
            {
                Ok(_) => answer.hosts.push(host),
                Err(s) => answer.unreachable.push(format!("{host}: {}", s.message())),
            }
        }
        Ok(answer)
    }

    /// Removes the jobs that ended longer than [`JobOptions::job_retention`] ago.
    async fn prune_ended(&self) {
        let Some(retention) = self.options.job_retention else {
            return;
        };
        let cutoff =
            now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let old: Vec<String> = self
            .lock()
            .jobs
            .values()
            .filter(|e| {
                !e.is_active() && e.meta.finished_at_ms > 0 && e.meta.finished_at_ms < cutoff
            })
            .map(|e| e.meta.name.clone())
            .collect();
        for name in old {
            match self.remove(&name).await {
                Ok(r) => {
                    tracing::info!(job = %name, runs = r.runs, retention = %humantime::format_duration(retention), "ended job removed after job_retention")
                }
                Err(s) => {
                    tracing::warn!(job = %name, error = %s.message(), "cannot remove an ended job after job_retention")
                }
            }
        }
        // the earlier runs of a name submitted again go the same way
        let resubmitted: Vec<(String, u32)> = self
            .lock()
            .jobs
            .values()
            .filter(|e| e.meta.run > 1)
            .map(|e| (e.meta.name.clone(), e.meta.run))
            .collect();
        for (name, current) in resubmitted {
            match self.prune_old_runs(&name, current, cutoff).await {
                Ok(0) => {}
                Ok(runs) => {
                    tracing::info!(job = %name, runs, retention = %humantime::format_duration(retention), "earlier runs removed after job_retention")
                }
                Err(e) => {
                    tracing::warn!(job = %name, error = %e, "cannot remove earlier runs after job_retention")
                }
            }
        }
    }

    /// Removes the records and events of the runs of `name` before `current` that ended
    /// before `cutoff` (Unix ms); how many it removed.
    async fn prune_old_runs(
        &self,
        name: &str,
        current: u32,
        cutoff: i64,
    ) -> Result<u32, JobsError> {
        let _write = self.write.lock().await;
        let store = self.membership.store();
        let mut batch = Batch::new();
        let mut runs = 0;
        for run in 1..current {
            let Some(meta) = store.get_json::<JobMeta>(TreeId::Jobs, meta_key(name, run))? else {
                continue;
            };
            if meta.finished_at_ms == 0 || meta.finished_at_ms >= cutoff {
                continue;
            }
            runs += 1;
            for key in store.keys_with_prefix(TreeId::Jobs, run_prefix(name, run).as_bytes())? {
                batch.remove(TreeId::Jobs, key);
            }
            for key in store.event_keys(EventScope::Job(&event_scope(name, run)))? {
                batch.remove(TreeId::Events, key);
            }
        }
        if runs > 0 {
            self.membership.commit(batch, false).await?;
            crate::store::log_compaction(&store.compact().await, "after removing runs");
            release_freed_memory();
        }
        Ok(runs)
    }

    /// Names of the jobs still active.
    pub fn active_jobs(&self) -> Vec<String> {
        self.lock()
            .jobs
            .values()
            .filter(|e| e.is_active())
            .map(|e| e.meta.name.clone())
            .collect()
    }

    /// Resolves `name` or `name#run` to (name, run).
    pub fn resolve(&self, reference: &str) -> Result<(String, u32), Status> {
        let (name, run) = parse_job_ref(reference).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{}: a job is named NAME or NAME#RUN",
                validate::shorten(reference)
            ))
        })?;
        validate_job_name(name)?;
        let current = self.lock().jobs.get(name).map(|e| e.meta.run);
        match (current, run) {
            (Some(cur), None) => Ok((name.to_owned(), cur)),
            (Some(cur), Some(r)) if r >= 1 && r <= cur => Ok((name.to_owned(), r)),
            (Some(cur), Some(r)) => Err(Status::not_found(format!(
                "job {name} has runs 1 to {cur}, not {r}"
            ))),
            (None, _) => Err(not_found(name)),
        }
    }

    /// One job with every node (`name` or `name#run` for an earlier run).
    pub fn get(&self, reference: &str) -> Result<Job, Status> {
        let (name, run) = self.resolve(reference)?;
        self.get_run(&name, run)
    }

    /// Run `run` of job `name`.
    pub fn get_run(&self, name: &str, run: u32) -> Result<Job, Status> {
        let now = Instant::now();
        {
            let inner = self.lock();
            if let Some(e) = inner.jobs.get(name)
                && e.meta.run == run
            {
                return Ok(view::job_message(e.run_ref(), true, now));
            }
        }
        let store = self.membership.store();
        if store
            .get_json::<JobMeta>(TreeId::Jobs, meta_key(name, run))
            .map_err(JobsError::from)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "run {run} of job {name} was removed (job_retention)"
            )));
        }
        let entry = load_run(store, name, run, now)?;
        let mut run_ref = entry.run_ref();
        run_ref.soft = None;
        Ok(view::job_message(run_ref, true, now))
    }

    /// Every job's latest run, newest first, without nodes.
    pub fn list(&self) -> Vec<Job> {
        let now = Instant::now();
        let inner = self.lock();
        let mut jobs: Vec<&JobEntry> = inner.jobs.values().collect();
        jobs.sort_by(|a, b| {
            b.meta
                .submitted_at_ms
                .cmp(&a.meta.submitted_at_ms)
                .then_with(|| a.meta.name.cmp(&b.meta.name))
        });
        jobs.into_iter()
            .map(|e| view::job_message(e.run_ref(), false, now))
            .collect()
    }

    /// The events of a job (`name` or `name#run`), oldest first.
    pub fn events(&self, reference: &str) -> Result<Vec<Event>, Status> {
        let (name, run) = self.resolve(reference)?;
        let scope = event_scope(&name, run);
        Ok(self
            .membership
            .store()
            .events(EventScope::Job(&scope))
            .map_err(JobsError::from)?
            .into_iter()
            .map(view::event_message)
            .collect())
    }

    /// Streams a node's output from the agent of its host.
    pub async fn logs(
        &self,
        request: UserLogsRequest,
    ) -> Result<BoxStream<'static, Result<LogChunk, Status>>, Status> {
        let (name, _) = self.resolve(&request.job)?;
        let (host, kept) = {
            let inner = self.lock();
            let entry = inner.jobs.get(&name).ok_or_else(|| not_found(&name))?;
            let node = entry.idx.plan.node(&request.node).ok_or_else(|| {
                Status::not_found(format!(
                    "job {name} has no node {}; geomxctl status {name} lists them",
                    validate::shorten(&request.node)
                ))
            })?;
            // the last lines the controller recorded when the node ended (current
            // generation): shown when its host cannot serve the output any more
            let kept = entry
                .idx
                .index
                .get(&request.node)
                .and_then(|&i| entry.nodes.get(i))
                .filter(|_| {
                    request
                        .generation
                        .is_none_or(|g| g == entry.meta.generation)
                })
                .map(|r| r.log_tail.clone())
                .unwrap_or_default();
            (node.host.clone(), kept)
        };
        let from_record =
            |why: String| -> Result<BoxStream<'static, Result<LogChunk, Status>>, Status> {
                let note = LogChunk {
                    lines: vec![format!(
                        "geomx: {why}; the last {} lines the controller kept:",
                        kept.len()
                    )],
                    stderr: true,
                };
                let lines = LogChunk {
                    lines: kept.clone(),
                    stderr: false,
                };
                Ok(futures::StreamExt::boxed(futures::stream::iter([
                    Ok(note),
                    Ok(lines),
                ])))
            };
        let Some(view) = self.membership.host(&host) else {
            let why = format!("host {host} is not registered any more");
            return if kept.is_empty() {
                Err(Status::unavailable(why))
            } else {
                from_record(why)
            };
        };
        let span = tracing::info_span!("logs", job = %name, node = %request.node, host = %host);
        let streamed = self
            .connector
            .logs(
                &host,
                &view.record.agent_url,
                NodeLogsRequest {
                    job: name,
                    node: request.node,
                    follow: request.follow,
                    tail: request.tail,
                    generation: request.generation,
                },
            )
            .instrument(span)
            .await;
        match streamed {
            Err(status)
                if !kept.is_empty()
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::NotFound
                    ) =>
            {
                from_record(status.message().to_owned())
            }
            other => other,
        }
    }

    /// Checks stalls, vanished nodes and restart drains every [`JobOptions::tick`] until
    /// `cancel`.
    pub async fn run_ticker(self: Arc<Self>, cancel: CancellationToken) {
        let mut interval = tokio::time::interval(self.options.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = cancel.cancelled() => break,
            }
            self.prune_ended().await;
            let names = self.active_jobs();
            if names.is_empty() {
                continue;
            }
            let conds = self.host_conds();
            for name in names {
                if let Err(e) = self.reconcile_with(&name, None, &conds).await {
                    tracing::error!(job = %name, error = %e, "cannot update job");
                }
                // one job at a time: let the reports queued on this worker run in between
                tokio::task::yield_now().await;
            }
        }
    }
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!(
        "no job named {}; geomxctl jobs lists them",
        validate::shorten(name)
    ))
}

fn validate_job_name(name: &str) -> Result<(), Status> {
    if geomx_job::is_valid_name(name, geomx_job::limits::JOB_NAME_MAX) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{} is not a job name ([a-z0-9-], 1..={} characters)",
            validate::shorten(name),
            geomx_job::limits::JOB_NAME_MAX
        )))
    }
}

/// A job's image pinned at submit, for its event.
struct PinnedImage {
    pinned: String,
    registry: String,
    through: String,
    why: String,
}

/// A new job's preflight: every host with a node that has a bind mount must check its
/// sources before any node of the job gets a sandbox or starts (see
/// [`engine::JobSoft::preflight`]); `None` for a job without bind mounts.
fn preflight_of(plan: &geomx_job::Plan) -> Option<engine::Preflight> {
    let pending: BTreeSet<String> = plan
        .nodes
        .iter()
        .filter(|n| {
            n.mounts
                .iter()
                .any(|m| m.kind == geomx_job::MountType::Bind)
        })
        .map(|n| n.host.clone())
        .collect();
    (!pending.is_empty()).then_some(engine::Preflight {
        revision: u64::MAX,
        pending,
    })
}

/// Gives the memory a removed job held back to the system: glibc keeps freed blocks in its
/// arenas (one per runtime thread), so without this a controller that once held a large
/// job stays that large.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it only returns free pages of glibc's arenas to
    // the kernel and is safe to call from any thread at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

fn load_run(
    store: &crate::store::Store,
    name: &str,
    run: u32,
    now: Instant,
) -> Result<JobEntry, JobsError> {
    let corrupt = |message: String| JobsError::Corrupt {
        job: format!("{name}#{run}"),
        message,
    };
    let meta: JobMeta = store
        .get_json(TreeId::Jobs, meta_key(name, run))?
        .ok_or_else(|| corrupt("no meta record".into()))?;
    let source: JobSource = store
        .get_json(TreeId::Jobs, source_key(name, run))?
        .ok_or_else(|| corrupt("no source record".into()))?;
    let idx = PlanIndex::new(source.plan).map_err(|e| corrupt(e.to_string()))?;
    let stored: Vec<NodeRecord> =
        store.scan_prefix_json(TreeId::Jobs, node_prefix(name, run).as_bytes())?;
    let mut by_name: HashMap<String, NodeRecord> =
        stored.into_iter().map(|r| (r.name.clone(), r)).collect();
    let nodes = idx
        .plan
        .nodes
        .iter()
        .map(|n| {
            by_name
                .remove(&n.name)
                .unwrap_or_else(|| NodeRecord::new(&n.name))
        })
        .collect();
    let mut soft = JobSoft::new(idx.len(), now);
    if meta.phase == Phase::Pulling {
        // the hosts' next reports say which have the image
        let image = idx.plan.image_digest.as_deref().unwrap_or(&idx.plan.image);
        soft.pulls = Some(images::Pulls::new(image, idx.plan.hosts(), |_| None));
    }
    Ok(JobEntry {
        meta,
        job_toml: source.job_toml,
        idx: Arc::new(idx),
        nodes,
        soft,
    })
}

/// A report's node status made safe to keep: bounded log tail, lines, error, container id,
/// address and metrics.
fn sanitize(st: &NodeStatus) -> NodeStatus {
    let mut s = st.clone();
    if s.container_id.len() > MAX_CONTAINER_ID_LEN {
        s.container_id = validate::truncate(&s.container_id, MAX_CONTAINER_ID_LEN);
    }
    if s.ip.len() > MAX_NODE_IP_LEN {
        s.ip = validate::truncate(&s.ip, MAX_NODE_IP_LEN);
    }
    if let Some(p) = s.progress.as_mut()
        && (p.metrics.len() > MAX_METRICS
            || p.metrics.keys().any(|k| k.len() > MAX_METRIC_NAME_LEN))
    {
        let mut kept: Vec<(String, f64)> = std::mem::take(&mut p.metrics)
            .into_iter()
            .filter(|(k, _)| k.len() <= MAX_METRIC_NAME_LEN)
            .collect();
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        kept.truncate(MAX_METRICS);
        p.metrics = kept.into_iter().collect();
    }
    if s.log_tail.len() > MAX_LOG_TAIL_LINES {
        s.log_tail.drain(..s.log_tail.len() - MAX_LOG_TAIL_LINES);
    }
    for line in &mut s.log_tail {
        if line.len() > MAX_LOG_LINE_LEN {
            *line = validate::truncate(line, MAX_LOG_LINE_LEN);
        }
    }
    if s.error.len() > MAX_NODE_ERROR_LEN {
        s.error = validate::truncate(&s.error, MAX_NODE_ERROR_LEN);
    }
    s
}

/// Whether a report of the current generation tells something the record does not know.
fn notable(rec: &NodeRecord, st: &NodeStatus) -> bool {
    if rec.state.is_ended() {
        return false;
    }
    if NodeState::from_proto(st.state).is_some_and(|s| s != rec.state) {
        return true;
    }
    match st.ip.trim().parse::<Ipv4Addr>() {
        Ok(ip) => rec.ip != Some(ip),
        Err(_) => false,
    }
}

impl Jobs {
    /// The containers the active jobs place on `host` as their plans have them (env with
    /// address placeholders: a node not started yet counts with the env it will get).
    fn planned_containers(&self, host: &str) -> Vec<ContainerSpec> {
        let inner = self.lock();
        let Some(names) = inner.by_host.get(host) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| inner.jobs.get(name))
            .filter(|e| e.meta.phase.runs_containers())
            .flat_map(|e| {
                let plan = &e.idx.plan;
                e.idx
                    .by_host
                    .get(host)
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .map(|&i| view::node_container_spec(plan, &plan.nodes[i]))
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Workloads for Jobs {
    fn containers_for(&self, host: &str) -> Vec<ContainerSpec> {
        let inner = self.lock();
        let Some(names) = inner.by_host.get(host) else {
            return Vec::new();
        };
        let mut specs = Vec::new();
        for name in names {
            let Some(e) = inner.jobs.get(name) else {
                continue;
            };
            if !e.meta.phase.runs_containers() {
                continue;
            }
            for &i in e.idx.by_host.get(host).map_or(&[][..], Vec::as_slice) {
                specs.push(view::container_spec(
                    &e.meta,
                    &e.idx,
                    &e.nodes[i],
                    i,
                    e.soft.preflight_done() && e.meta.phase != Phase::Pulling,
                ));
            }
        }
        specs
    }

    async fn host_reported(&self, host: &str, report: &HostReport) -> Result<(), WorkloadError> {
        if report.memory_bytes > 0 || report.cpus > 0 {
            self.capacity
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    host.to_owned(),
                    limits::HostCapacity {
                        memory_bytes: report.memory_bytes,
                        cpus: report.cpus,
                    },
                );
        }
        let now = Instant::now();
        let mut dirty = BTreeSet::new();
        let mut shown_changed = false;
        let mut preflight_done = false;
        let pulls = validate::image_pulls(&report.pulls);
        let refs = (report.images_known != Some(false)).then_some(report.images.as_slice());
        {
            let mut guard = self.lock();
            let Inner { jobs, by_host } = &mut *guard;
            let mut present: HashSet<&str> = HashSet::new();
            for st in &report.nodes {
                let Some(entry) = jobs.get_mut(st.job.as_str()) else {
                    continue;
                };
                if !entry.is_active() {
                    continue;
                }
                present.insert(st.job.as_str());
                let Some(&i) = entry.idx.index.get(&st.node) else {
                    continue;
                };
                if entry.idx.plan.nodes[i].host != host {
                    tracing::warn!(job = %st.job, node = %st.node, host, expected = %entry.idx.plan.nodes[i].host, "a host reported a node placed on another host; ignored");
                    continue;
                }
                if st.generation != entry.meta.generation {
                    continue;
                }
                if notable(&entry.nodes[i], st) {
                    dirty.insert(entry.meta.name.clone());
                }
                shown_changed |= entry.soft.nodes[i].observe(sanitize(st), now);
            }
            if let Some(names) = by_host.get(host) {
                for name in names {
                    let Some(entry) = jobs.get_mut(name) else {
                        continue;
                    };
                    if !entry.is_active() {
                        continue;
                    }
                    let nodes =
                        HostNodes::of_report(report.nodes_known, present.contains(name.as_str()));
                    let drained = entry.soft.host_reported(host, now, nodes);
                    if entry.meta.phase == Phase::Restarting && drained {
                        dirty.insert(name.clone());
                    }
                    if let Some(p) = entry.soft.pulls.as_mut()
                        && p.reported(host, refs, &pulls)
                    {
                        shown_changed = true;
                        if entry.meta.phase == Phase::Pulling && p.done() {
                            tracing::info!(job = %name, image = %p.image, "every host of the job has its image");
                            dirty.insert(name.clone());
                        }
                    }
                    if entry.soft.host_applied(host, report.applied_revision) {
                        tracing::info!(job = %name, "every host has the bind mount sources of the job; starting it");
                        dirty.insert(name.clone());
                        preflight_done = true;
                    }
                }
            }
        }
        if shown_changed {
            self.reports.send_modify(|v| *v += 1);
        }
        if preflight_done {
            // the job's nodes may get their sandboxes now
            if let Err(e) = self.membership.publish().await {
                tracing::error!(host, error = %e, "cannot publish the end of a job's preflight");
            }
        }
        for name in dirty {
            let span = tracing::debug_span!("job_report", job = %name, host);
            if let Err(e) = self.reconcile(&name, None).instrument(span).await {
                tracing::error!(job = %name, host, error = %e, "cannot update job after a report");
            }
        }
        Ok(())
    }

    async fn host_changed(&self, host: &str, change: HostChange) {
        if matches!(
            change,
            HostChange::Joined
                | HostChange::Returned
                | HostChange::Cordoned
                | HostChange::Uncordoned
        ) {
            return;
        }
        let names: Vec<String> = {
            let inner = self.lock();
            inner
                .by_host
                .get(host)
                .map(|names| {
                    names
                        .iter()
                        .filter(|n| inner.jobs.get(*n).is_some_and(JobEntry::is_active))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        for name in names {
            let span = tracing::info_span!("job_host_change", job = %name, host, ?change);
            if let Err(e) = self.reconcile(&name, None).instrument(span).await {
                tracing::error!(job = %name, host, error = %e, "cannot update job after a host change");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_proto::v1::ContainerState;

    #[test]
    fn notable_reports() {
        let mut rec = NodeRecord::new("n");
        let st = |state: ContainerState, ip: &str| NodeStatus {
            state: state as i32,
            ip: ip.into(),
            ..Default::default()
        };
        assert!(!notable(&rec, &st(ContainerState::Pending, "")));
        assert!(notable(&rec, &st(ContainerState::Pending, "172.17.1.2")));
        rec.ip = Some("172.17.1.2".parse().unwrap());
        assert!(!notable(&rec, &st(ContainerState::Pending, "172.17.1.2")));
        assert!(notable(&rec, &st(ContainerState::Running, "172.17.1.2")));
        rec.state = NodeState::Failed;
        assert!(!notable(&rec, &st(ContainerState::Running, "x")));
    }

    #[test]
    fn reports_are_bounded() {
        let st = NodeStatus {
            log_tail: (0..200)
                .map(|i| format!("{i}{}", "x".repeat(5000)))
                .collect(),
            error: "e".repeat(10_000),
            ..Default::default()
        };
        let s = sanitize(&st);
        assert_eq!(s.log_tail.len(), MAX_LOG_TAIL_LINES);
        assert!(s.log_tail[0].starts_with("150"));
        assert!(s.log_tail.iter().all(|l| l.len() <= MAX_LOG_LINE_LEN));
        assert_eq!(s.error.len(), MAX_NODE_ERROR_LEN);

        let st = NodeStatus {
            container_id: "c".repeat(100_000),
            ip: "1".repeat(100_000),
            progress: Some(geomx_proto::v1::Progress {
                metrics: (0..1000)
                    .map(|i| (format!("m{i}"), 1.0))
                    .chain([("k".repeat(100_000), 2.0)])
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = sanitize(&st);
        assert_eq!(s.container_id.len(), MAX_CONTAINER_ID_LEN);
        assert_eq!(s.ip.len(), MAX_NODE_IP_LEN);
        let metrics = &s.progress.as_ref().expect("progress").metrics;
        assert_eq!(metrics.len(), MAX_METRICS);
        assert!(metrics.keys().all(|k| k.len() <= MAX_METRIC_NAME_LEN));
    }
}
