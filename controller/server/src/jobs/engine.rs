//! The job state machine, as pure functions.
//!
//! [`evaluate`] looks at one run: its persisted records ([`JobMeta`], [`NodeRecord`]s), the
//! soft observations of its agents ([`JobSoft`]: the latest `NodeStatus` of every node,
//! heartbeat times, progress) and the state of its hosts ([`Ctx`]), and returns the
//! [`Changes`] to persist: new records, events, and whether the hosts' desired state changed.
//! It performs no I/O and reads no clock (the caller passes `now`), so every decision is
//! unit-tested here; the service ([`super::Jobs`]) persists the changes, applies them to
//! memory and publishes.
//!
//! One pass, in order:
//! 1. ended jobs change no more; a cancel ends the job;
//! 2. a host of the job that is lost, left or unknown fails it (not restartable: nodes are
//!    pinned to hosts by the job file);
//! 3. Restarting: once every host reported none of the job's containers (or the drain timeout
//!    passed), the generation is bumped and the job starts again;
//! 4. the agents' reports of the current generation update the node records (IP, state, exit
//!    code, log tail);
//! 5. a training worker that printed `[progress].finished` or reached `[progress].iterations`
//!    has finished training, even if its process never exits;
//! 6. a node that failed, went missing, is no longer reported, or (a training worker) stalled
//!    fails the job, or restarts it under `restart = "on-failure"` while restarts are left —
//!    except a scheduler or server that exits non-zero while the job shuts down (see
//!    [the teardown window](#the-teardown-window));
//! 7. every training worker finished (exited 0, or finished training): Succeeded once every
//!    node ended or `teardown_grace` after the last one finished, whichever is first; nodes
//!    still running then are stopped by geomx (an event names each lingering worker);
//! 8. nodes whose addresses are known (and, for servers and workers, whose schedulers run)
//!    get their resolved environment and `start`;
//! 9. Pending → Starting (first start), SchedulersUp, Starting → Running (every node runs).
//!
//! # The teardown window
//!
//! GeoMX's ps-lite crashes while shutting down: `Van::Stop(true)` joins a thread that exists
//! only with `ENABLE_DGT`, so the global scheduler, the global servers and the party servers
//! die with SIGSEGV (exit 139) in `ps::Finalize`, sometimes just before the last worker
//! exits. So a scheduler or server (or a worker that already finished training) exiting
//! non-zero does not fail the job when the last training worker finishes at most
//! `teardown_grace` after it (or it exits after that): an event names the node, its exit
//! code and its log tail ("exited 139 while shutting down"). Until then the job waits; past
//! the window it fails as any other failure. Times are the controller's (when it recorded
//! the end), so hosts' clocks do not matter.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use geomx_job::{Network, Plan, RestartPolicy, Role};
use geomx_proto::v1::NodeStatus;

use super::record::{JobMeta, NodeRecord, NodeState, Phase};
use super::rendezvous;
use crate::store::EventRecord;

/// Lines of a node's log tail quoted in a failure reason.
pub const REASON_LOG_LINES: usize = 10;
/// Window of the throughput measurement.
pub const THROUGHPUT_WINDOW: Duration = Duration::from_secs(60);
/// Minimum spacing of throughput samples.
const SAMPLE_SPACING: Duration = Duration::from_millis(500);

/// A plan with the lookups the engine needs, computed once.
#[derive(Clone, Debug)]
pub struct PlanIndex {
    /// The plan.
    pub plan: Plan,
    /// Node name → position in `plan.nodes`.
    pub index: HashMap<String, usize>,
    /// Per node: the nodes whose IP its environment needs (a scheduler: itself).
    pub deps: Vec<Vec<usize>>,
    /// Per node: the schedulers that must run before it starts (empty for schedulers).
    pub waits_for: Vec<Vec<usize>>,
    /// Per node: a training worker (role worker or master_worker).
    pub training: Vec<bool>,
    /// Host → its nodes, in plan order.
    pub by_host: BTreeMap<String, Vec<usize>>,
    /// The schedulers, in plan order.
    pub schedulers: Vec<usize>,
    /// Per scheduler: the nodes that register with it (see [`super::rendezvous`]); empty
    /// for other nodes.
    pub members: Vec<Vec<usize>>,
}

/// A plan that cannot be deployed (a placeholder or `reaches` naming no node).
#[derive(Debug, thiserror::Error)]
#[error("node {node}: refers to node {missing:?}, which the plan does not have")]
pub struct PlanIndexError {
    /// The node with the reference.
    pub node: String,
    /// The missing node.
    pub missing: String,
}

impl PlanIndex {
    /// Indexes `plan`.
    pub fn new(plan: Plan) -> Result<PlanIndex, PlanIndexError> {
        let index: HashMap<String, usize> = plan
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let lookup = |node: &str, name: &str| {
            index.get(name).copied().ok_or_else(|| PlanIndexError {
                node: node.to_owned(),
                missing: name.to_owned(),
            })
        };
        let mut deps = Vec::with_capacity(plan.nodes.len());
        let mut waits_for = Vec::with_capacity(plan.nodes.len());
        let mut by_host: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut schedulers = Vec::new();
        for (i, n) in plan.nodes.iter().enumerate() {
            let d = n
                .depends_on()
                .iter()
                .map(|name| lookup(&n.name, name))
                .collect::<Result<Vec<_>, _>>()?;
            let mut w = Vec::new();
            if n.role.is_scheduler() {
                schedulers.push(i);
            } else {
                for name in &n.reaches {
                    w.push(lookup(&n.name, name)?);
                }
                for &j in &d {
                    if plan.nodes[j].role.is_scheduler() {
                        w.push(j);
                    }
                }
                w.sort_unstable();
                w.dedup();
                w.retain(|&j| j != i);
            }
            deps.push(d);
            waits_for.push(w);
            by_host.entry(n.host.clone()).or_default().push(i);
        }
        let training = plan
            .nodes
            .iter()
            .map(|n| matches!(n.role, Role::Worker | Role::MasterWorker))
            .collect();
        let members = super::rendezvous::members(&plan);
        Ok(PlanIndex {
            plan,
            index,
            deps,
            waits_for,
            training,
            by_host,
            schedulers,
            members,
        })
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.plan.nodes.len()
    }

    /// True for a plan without nodes (never for a compiled job).
    pub fn is_empty(&self) -> bool {
        self.plan.nodes.is_empty()
    }
}

/// What the controller currently observes of one node (in memory only).
#[derive(Clone, Debug, Default)]
pub struct NodeSoft {
    /// The latest status its agent reported for the current generation.
    pub status: Option<NodeStatus>,
    /// When its agent last reported it.
    pub last_report: Option<Instant>,
    /// When it was first seen running (in this controller process and generation).
    pub running_since: Option<Instant>,
    /// The last progress seen: (epoch, iteration, observed_at_ms).
    pub progress_key: Option<(u64, u64, i64)>,
    /// When the progress last changed.
    pub progress_at: Option<Instant>,
    /// (time, iteration) samples over the last minute, for throughput.
    pub samples: VecDeque<(Instant, u64)>,
    /// When `start` was sent (in this controller process).
    pub start_sent: Option<Instant>,
}

impl NodeSoft {
    /// Records a status of the current generation received at `now`. Returns whether
    /// anything a watcher shows (state, progress, a scheduler's rendezvous) changed.
    pub fn observe(&mut self, status: NodeStatus, now: Instant) -> bool {
        let mut changed = self.status.as_ref().is_none_or(|old| {
            old.state != status.state || old.ip != status.ip || old.rendezvous != status.rendezvous
        });
        if NodeState::from_proto(status.state) == Some(NodeState::Running)
            && self.running_since.is_none()
        {
            self.running_since = Some(now);
        }
        if let Some(p) = &status.progress {
            let key = (p.epoch, p.iteration, p.observed_at_ms);
            if self.progress_key != Some(key) {
                self.progress_key = Some(key);
                self.progress_at = Some(now);
                changed = true;
            }
            if self
                .samples
                .back()
                .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= SAMPLE_SPACING)
            {
                self.samples.push_back((now, p.iteration));
            }
            while self
                .samples
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > THROUGHPUT_WINDOW)
            {
                self.samples.pop_front();
            }
        }
        self.last_report = Some(now);
        self.status = Some(status);
        changed
    }

    /// Training iterations per second over the last minute, as of `now` (0 without two
    /// samples in the window).
    pub fn iterations_per_s(&self, now: Instant) -> f64 {
        let mut window = self
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= THROUGHPUT_WINDOW);
        let Some(first) = window.next() else {
            return 0.0;
        };
        let Some(last) = window.next_back() else {
            return 0.0;
        };
        let secs = last.0.saturating_duration_since(first.0).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        last.1.saturating_sub(first.1) as f64 / secs
    }
}

/// When a host of a job last reported its containers, and whether it listed any of the job.
///
/// Only reports whose agent knows the host's containers (`nodes_known`, see
/// [`JobSoft::host_reported`]) say anything about the job's nodes: an agent that has not
/// adopted its containers yet (just restarted, Docker slow or down) reports none of them
/// though they run on.
#[derive(Clone, Copy, Debug)]
pub struct HostSeen {
    /// When the host last reported with its containers known.
    pub at: Instant,
    /// Whether that report held any container of the job (any generation).
    pub has_nodes: bool,
    /// Whether the host's latest report knew its containers. While false, none of the
    /// host's nodes is taken for gone (nor the host for drained).
    pub nodes_known: bool,
    /// The first report of the current run of reports with the containers known: absence
    /// of a node is measured from here at the earliest, so that an agent that just adopted
    /// its containers is not blamed for the time it did not know them.
    pub known_since: Instant,
    /// Since when the host's reports have not known its containers (`None` while they
    /// do). Bounded: after the job's stall timeout the host's started nodes are missing,
    /// so that an agent that never gets to its Docker does not hold the job forever.
    pub unknown_since: Option<Instant>,
}

/// What one host report says about the containers of one job (see
/// [`JobSoft::host_reported`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostNodes {
    /// The agent knows the host's containers; `has_nodes`: any of the job's among them.
    Known {
        /// Whether the report held any container of the job.
        has_nodes: bool,
    },
    /// The agent has not adopted the host's containers yet (`nodes_known: false`): its
    /// node list means nothing.
    Unknown,
}

impl HostNodes {
    /// From a report: whether the agent knows its containers (`nodes_known`, absent for
    /// agents that predate the field: known) and whether the job has any among them.
    pub fn of_report(nodes_known: Option<bool>, has_nodes: bool) -> HostNodes {
        if nodes_known == Some(false) {
            HostNodes::Unknown
        } else {
            HostNodes::Known { has_nodes }
        }
    }
}

/// The soft state of one run.
#[derive(Clone, Debug)]
pub struct JobSoft {
    /// Per node, in plan order.
    pub nodes: Vec<NodeSoft>,
    /// Per host of the job: its last report.
    pub hosts: HashMap<String, HostSeen>,
    /// When the job entered its phase (or when this process loaded it).
    pub phase_since: Instant,
    /// When this process loaded or accepted the job.
    pub loaded_at: Instant,
    /// A job with bind mounts, just accepted: the hosts whose agents have not yet checked
    /// its bind sources. Until none is left no node gets a sandbox or starts, so that a
    /// source missing on one host fails the job before any container of it exists.
    pub preflight: Option<Preflight>,
    /// The job's hosts and whether each has its image yet (the Pulling phase), with their
    /// last pull progress; `None` for a job that needs no pull.
    pub pulls: Option<super::images::Pulls>,
}

/// The hosts still to check a new job's bind mount sources (see [`JobSoft::preflight`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preflight {
    /// The revision of the first desired state holding the job's containers (`u64::MAX`
    /// until it is published): a host that applied it has checked them (an agent refuses a
    /// node whose bind source is missing as soon as the node is desired).
    pub revision: u64,
    /// Hosts that have not applied that revision yet.
    pub pending: std::collections::BTreeSet<String>,
}

impl JobSoft {
    /// Fresh soft state for `nodes` nodes at `now`.
    pub fn new(nodes: usize, now: Instant) -> JobSoft {
        JobSoft {
            nodes: vec![NodeSoft::default(); nodes],
            hosts: HashMap::new(),
            phase_since: now,
            loaded_at: now,
            preflight: None,
            pulls: None,
        }
    }

    /// Whether every host checked the job's bind mount sources (or it has none to check).
    pub fn preflight_done(&self) -> bool {
        self.preflight.as_ref().is_none_or(|p| p.pending.is_empty())
    }

    /// Whether every host of the job has its image (or it needs no pull).
    pub fn pulls_done(&self) -> bool {
        self.pulls.as_ref().is_none_or(super::images::Pulls::done)
    }

    /// `host` applied desired state `revision`: true when that ends the preflight.
    pub fn host_applied(&mut self, host: &str, revision: u64) -> bool {
        let Some(p) = self.preflight.as_mut() else {
            return false;
        };
        if revision < p.revision || !p.pending.remove(host) {
            return false;
        }
        p.pending.is_empty()
    }

    /// Records a report of `host` received at `now`. A report that knows the host's
    /// containers updates [`HostSeen`]; one that does not only marks the host's nodes as
    /// not known (the host's liveness is the membership's business). Returns whether the
    /// report says the host runs none of the job's containers (a restart may proceed).
    pub fn host_reported(&mut self, host: &str, now: Instant, nodes: HostNodes) -> bool {
        match nodes {
            HostNodes::Known { has_nodes } => {
                let known_since = self
                    .hosts
                    .get(host)
                    .filter(|s| s.nodes_known)
                    .map_or(now, |s| s.known_since);
                self.hosts.insert(
                    host.to_owned(),
                    HostSeen {
                        at: now,
                        has_nodes,
                        nodes_known: true,
                        known_since,
                        unknown_since: None,
                    },
                );
                !has_nodes
            }
            HostNodes::Unknown => {
                if let Some(s) = self.hosts.get_mut(host) {
                    s.nodes_known = false;
                    s.unknown_since.get_or_insert(now);
                }
                false
            }
        }
    }
}

/// Membership state of a host, as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCond {
    /// Heartbeating.
    Ready,
    /// Silent for the grace period.
    Lost,
    /// Left the cluster.
    Left,
    /// Not known to the membership.
    Unknown,
}

/// Everything a pass needs besides the job.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    /// Now (monotonic).
    pub now: Instant,
    /// Now (Unix ms), for records and events.
    pub now_ms: i64,
    /// State of every known host.
    pub hosts: &'a BTreeMap<String, HostCond>,
    /// The stall timeout in effect for this job.
    pub stall_timeout: Duration,
    /// A started node its host stops reporting for this long is missing.
    pub absent_timeout: Duration,
    /// How long a restart waits for the old containers to go.
    pub drain_timeout: Duration,
}

impl Ctx<'_> {
    fn host(&self, host: &str) -> HostCond {
        self.hosts.get(host).copied().unwrap_or(HostCond::Unknown)
    }
}

/// A user's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Stop every container; the job ends Cancelled. `by`: the caller's token name (empty:
    /// unknown, "a user").
    Cancel {
        /// Who cancels.
        by: String,
    },
}

/// What a pass decided: records to write, events to append, and whether the hosts'
/// desired state changed.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// The new meta, when it changed.
    pub meta: Option<JobMeta>,
    /// Node records that changed, by position.
    pub nodes: Vec<(usize, NodeRecord)>,
    /// Events to append, oldest first.
    pub events: Vec<EventRecord>,
    /// True when `containers_for` of some host changes (publish a new revision).
    pub publish: bool,
    /// Nodes that got `start` in this pass.
    pub started: Vec<usize>,
    /// True when the generation was bumped (soft state must be reset).
    pub new_generation: bool,
}

impl Changes {
    /// True when nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.meta.is_none() && self.nodes.is_empty() && self.events.is_empty()
    }

    /// The phase after the changes, if it changed.
    pub fn new_phase(&self) -> Option<Phase> {
        self.meta.as_ref().map(|m| m.phase)
    }
}

/// A copy-on-write view of a run during a pass.
struct Draft<'a> {
    base_meta: &'a JobMeta,
    base_nodes: &'a [NodeRecord],
    meta: JobMeta,
    nodes: BTreeMap<usize, NodeRecord>,
    events: Vec<EventRecord>,
    started: Vec<usize>,
    now_ms: i64,
}

impl<'a> Draft<'a> {
    fn new(meta: &'a JobMeta, nodes: &'a [NodeRecord], now_ms: i64) -> Draft<'a> {
        Draft {
            base_meta: meta,
            base_nodes: nodes,
            meta: meta.clone(),
            nodes: BTreeMap::new(),
            events: Vec::new(),
            started: Vec::new(),
            now_ms,
        }
    }

    fn node(&self, i: usize) -> &NodeRecord {
        self.nodes.get(&i).unwrap_or(&self.base_nodes[i])
    }

    fn node_mut(&mut self, i: usize) -> &mut NodeRecord {
        let base = &self.base_nodes[i];
        self.nodes.entry(i).or_insert_with(|| base.clone())
    }

    fn event(&mut self, kind: &str, message: String, node: &str, host: &str) {
        self.events.push(EventRecord {
            at_ms: self.now_ms,
            kind: kind.to_owned(),
            message,
            host: host.to_owned(),
            job: self.meta.name.clone(),
            node: node.to_owned(),
            generation: self.meta.generation,
        });
    }

    fn set_phase(&mut self, phase: Phase, reason: String) {
        if self.meta.phase != phase {
            self.meta.phase = phase;
            self.meta.phase_since_ms = self.now_ms;
        }
        self.meta.reason = reason;
        if phase.is_terminal() {
            self.meta.finished_at_ms = self.now_ms;
        }
    }

    fn finish(mut self) -> Changes {
        if self.meta.phase.is_terminal() && !self.base_meta.phase.is_terminal() {
            // what each node's end was: never `running` beside an ended job
            for i in 0..self.base_nodes.len() {
                let r = self.node(i);
                if !r.end.is_empty() {
                    continue;
                }
                let stop = matches!(r.state, NodeState::Running | NodeState::Created);
                let now_ms = self.now_ms;
                let r = self.node_mut(i);
                if stop {
                    r.state = NodeState::Stopped;
                    r.finished_at_ms = now_ms;
                    r.ended_seen_ms = now_ms;
                }
                r.end = end_text(r);
            }
        }
        let new_generation = self.meta.generation != self.base_meta.generation;
        let env_changed = self
            .nodes
            .iter()
            .any(|(i, n)| n.env != self.base_nodes[*i].env);
        // leaving Pulling gives the nodes their sandboxes
        let pulled =
            (self.meta.phase == Phase::Pulling) != (self.base_meta.phase == Phase::Pulling);
        let publish = new_generation
            || env_changed
            || pulled
            || self.meta.phase.runs_containers() != self.base_meta.phase.runs_containers();
        let nodes: Vec<(usize, NodeRecord)> = self
            .nodes
            .into_iter()
            .filter(|(i, n)| *n != self.base_nodes[*i])
            .collect();
        Changes {
            meta: (self.meta != *self.base_meta).then_some(self.meta),
            nodes,
            events: self.events,
            publish,
            started: self.started,
            new_generation,
        }
    }
}

/// One pass of the state machine over a run (see the module docs).
pub fn evaluate(
    idx: &PlanIndex,
    meta: &JobMeta,
    nodes: &[NodeRecord],
    soft: &JobSoft,
    ctx: &Ctx<'_>,
    command: Option<Command>,
) -> Changes {
    debug_assert_eq!(nodes.len(), idx.len(), "one record per node");
    let mut d = Draft::new(meta, nodes, ctx.now_ms);
    if d.meta.phase.is_terminal() {
        return d.finish();
    }
    if let Some(Command::Cancel { by }) = &command {
        let what = match d.meta.phase {
            Phase::Running => "while running",
            Phase::Restarting => "while restarting",
            Phase::Pulling => "while pulling its image",
            _ => "while starting",
        };
        let who = if by.is_empty() {
            "a user".to_owned()
        } else {
            format!("token {by:?}")
        };
        let reason = format!("cancelled by {who} {what}; every container is being removed");
        d.event("Cancelled", reason.clone(), "", "");
        d.set_phase(Phase::Cancelled, reason);
        d.meta.cancelled_by.clone_from(by);
        return d.finish();
    }
    if let Some(reason) = host_problem(idx, &mut d, ctx) {
        fail(idx, &mut d, reason, false);
        return d.finish();
    }
    let deadline = idx.plan.policy.active_deadline;
    let active = ms_between(d.meta.submitted_at_ms, d.now_ms);
    if !deadline.is_zero() && active > deadline {
        let reason = format!(
            "active_deadline {} passed: the job has been active for {} since it was submitted",
            humantime::format_duration(deadline),
            humantime::format_duration(Duration::from_secs(active.as_secs()))
        );
        d.event("DeadlineExceeded", reason.clone(), "", "");
        fail(idx, &mut d, reason, false);
        return d.finish();
    }
    if d.meta.phase == Phase::Restarting {
        let drained = idx.by_host.keys().all(|h| {
            soft.hosts
                .get(h)
                .is_some_and(|s| s.nodes_known && s.at >= soft.phase_since && !s.has_nodes)
        });
        let waited = ctx.now.saturating_duration_since(soft.phase_since);
        if !drained && waited < ctx.drain_timeout {
            return d.finish();
        }
        if waited < idx.plan.policy.restart_delay_for(d.meta.restarts) {
            // the backoff between gang restarts
            return d.finish();
        }
        if !drained {
            d.event(
                "RestartDrainTimeout",
                format!(
                    "old containers still reported after {}; starting generation {} anyway (agents replace containers of an older generation)",
                    humantime::format_duration(ctx.drain_timeout),
                    d.meta.generation + 1
                ),
                "",
                "",
            );
        }
        restart_now(idx, &mut d);
    } else {
        observe(idx, &mut d, soft);
        training_finished(idx, &mut d, soft);
    }
    let waits = if matches!(d.meta.phase, Phase::Starting | Phase::Running) {
        rendezvous::of_run(idx, |i| d.node(i), soft)
    } else {
        Vec::new()
    };
    announce_rendezvous(idx, &mut d, &waits);
    if let Some(reason) = node_problem(idx, &mut d, soft, ctx, &waits) {
        fail(idx, &mut d, reason, true);
        return d.finish();
    }
    if let Some(reason) = rendezvous_timed_out(idx, &mut d, soft, ctx, &waits) {
        fail(idx, &mut d, reason, true);
        return d.finish();
    }
    if let Some(last) = training_done_at(idx, &d) {
        let all_ended = (0..idx.len()).all(|i| d.node(i).state.is_ended());
        let waited = ms_between(last, d.now_ms);
        if all_ended || waited >= idx.plan.policy.teardown_grace {
            succeed(idx, &mut d, waited);
            return d.finish();
        }
    }
    if d.meta.phase == Phase::Pulling {
        if !soft.pulls_done() {
            if let Some(reason) = pull_timed_out(idx, &d, soft) {
                d.event("PullTimeout", reason.clone(), "", "");
                fail(idx, &mut d, reason, true);
            }
            return d.finish();
        }
        let took = ms_between(d.meta.phase_since_ms, d.now_ms);
        d.event(
            "Pulled",
            format!(
                "every host of the job has {} (Pulling took {})",
                soft.pulls.as_ref().map_or("", |p| p.image.as_str()),
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(took.as_millis()).unwrap_or(u64::MAX) / 100 * 100
                ))
            ),
            "",
            "",
        );
        d.set_phase(Phase::Pending, String::new());
    }
    if soft.preflight_done() {
        start_ready(idx, &mut d);
    }
    advance(idx, &mut d);
    d.finish()
}

/// How long past `policy.pull_timeout` the controller waits for a host's agent, which
/// bounds its pulls itself, to report the end of one.
pub const PULL_TIMEOUT_SLACK: Duration = Duration::from_secs(60);

/// The reason to fail a job still Pulling `pull_timeout` (and a slack for the agents' own
/// verdict) after it entered the phase: names the hosts and how far each got.
fn pull_timed_out(idx: &PlanIndex, d: &Draft<'_>, soft: &JobSoft) -> Option<String> {
    let timeout = idx.plan.policy.pull_timeout;
    let waited = ms_between(d.meta.phase_since_ms, d.now_ms);
    if waited < timeout + PULL_TIMEOUT_SLACK {
        return None;
    }
    let pulls = soft.pulls.as_ref()?;
    Some(format!(
        "pulling image {} timed out: after {} (pull_timeout {}) still pulling on {}",
        pulls.image,
        humantime::format_duration(Duration::from_secs(waited.as_secs())),
        humantime::format_duration(timeout),
        pulls.pending_summary()
    ))
}

/// An event per change of a scheduler's rendezvous ("2 of 3 registered, waiting for ...");
/// the last one is kept in the scheduler's record.
fn announce_rendezvous(idx: &PlanIndex, d: &mut Draft<'_>, waits: &[rendezvous::Wait]) {
    for w in waits {
        let text = rendezvous::summary(idx, w);
        if d.node(w.scheduler).rendezvous == text {
            continue;
        }
        let n = &idx.plan.nodes[w.scheduler];
        d.node_mut(w.scheduler).rendezvous.clone_from(&text);
        d.event("Rendezvous", text, &n.name, &n.host);
    }
}

/// The reason to fail when a scheduler still waits `rendezvous_timeout` after it and every
/// node it waits for ran (see [`super::rendezvous`]).
fn rendezvous_timed_out(
    idx: &PlanIndex,
    d: &mut Draft<'_>,
    soft: &JobSoft,
    ctx: &Ctx<'_>,
    waits: &[rendezvous::Wait],
) -> Option<String> {
    let timeout = idx.plan.policy.rendezvous_timeout;
    let mut late = Vec::new();
    let mut waited_most = Duration::ZERO;
    for w in waits
        .iter()
        .filter(|w| !w.complete && !w.waiting.is_empty())
    {
        // from when the scheduler and all its members run (a member not running yet is
        // another problem, or not one yet)
        let since = std::iter::once(w.scheduler)
            .chain(idx.members[w.scheduler].iter().copied())
            .map(|i| soft.nodes[i].running_since)
            .collect::<Option<Vec<Instant>>>()
            .and_then(|v| v.into_iter().max());
        let Some(since) = since else { continue };
        let waited = ctx.now.saturating_duration_since(since);
        if waited > timeout {
            waited_most = waited_most.max(waited);
            late.push(w.clone());
        }
    }
    if late.is_empty() {
        return None;
    }
    let reason = rendezvous::timeout_reason(idx, waits, waited_most, timeout);
    let first = &idx.plan.nodes[late[0].scheduler];
    d.event(
        "RendezvousTimeout",
        reason.clone(),
        &first.name,
        &first.host,
    );
    Some(reason)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The duration from `from_ms` to `to_ms` (zero if reversed).
fn ms_between(from_ms: i64, to_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(to_ms.saturating_sub(from_ms)).unwrap_or(0))
}

/// The name of signal `n` (Linux numbering), for the common ones.
pub fn signal_name(n: i32) -> Option<&'static str> {
    Some(match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// ` (killed by signal 11, SIGSEGV)` for an exit code of 128 + a signal (what Docker's
/// init and shells report for a process a signal killed); empty otherwise.
pub fn signal_note(code: i32) -> String {
    if !(129..=128 + 64).contains(&code) {
        return String::new();
    }
    let sig = code - 128;
    match signal_name(sig) {
        Some(name) => format!(" (killed by signal {sig}, {name})"),
        None => format!(" (killed by signal {sig})"),
    }
}

/// `exited 0`, `exited 139 (killed by signal 11, SIGSEGV)`, `missing`, ...: how an ended
/// node ended, for people.
pub fn end_text(r: &NodeRecord) -> String {
    match (r.state, r.exit_code) {
        (NodeState::Exited, _) => "exited 0".to_owned(),
        (NodeState::Failed, Some(code)) => format!("exited {code}{}", signal_note(code)),
        (NodeState::Failed, None) => "could not start".to_owned(),
        (NodeState::Missing, _) => "missing: its container is gone".to_owned(),
        (NodeState::Stopped, _) => "stopped by geomx when the job ended".to_owned(),
        (NodeState::Pending, _) => "never started (the job ended first)".to_owned(),
        (NodeState::Created, _) | (NodeState::Running, _) => String::new(),
    }
}

/// A node whose non-zero exit may be a crash while shutting down: a scheduler or server
/// (GeoMX's `ps::Finalize` segfaults), or a training worker that had finished training.
/// Not a node that could not start or went missing.
fn teardown_candidate(idx: &PlanIndex, i: usize, r: &NodeRecord) -> bool {
    r.state == NodeState::Failed
        && r.exit_code.is_some_and(|c| c != 0)
        && (!idx.training[i] || r.training_done_ms > 0)
}

/// Whether a training worker has finished: exited 0, or finished training (its final line
/// or its total iterations) whatever happened to its process after.
fn training_worker_done(r: &NodeRecord) -> bool {
    r.state == NodeState::Exited || r.training_done_ms > 0
}

fn all_training_done(idx: &PlanIndex, d: &Draft<'_>) -> bool {
    training_done_at(idx, d).is_some()
}

/// When the last training worker finished (controller ms), once every one has.
fn training_done_at(idx: &PlanIndex, d: &Draft<'_>) -> Option<i64> {
    let mut last = None;
    for i in (0..idx.len()).filter(|&i| idx.training[i]) {
        let r = d.node(i);
        if !training_worker_done(r) {
            return None;
        }
        let at = if r.training_done_ms > 0 {
            r.training_done_ms
        } else {
            r.ended_seen_ms
        };
        last = last.max(Some(at));
    }
    last
}

/// Running training workers whose progress says training is over: printed the job's
/// `[progress].finished` line or reached `[progress].iterations`.
fn training_finished(idx: &PlanIndex, d: &mut Draft<'_>, soft: &JobSoft) {
    let total = idx.plan.progress.iterations;
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        if !idx.training[i] {
            continue;
        }
        let r = d.node(i);
        if r.training_done_ms > 0 || r.state != NodeState::Running {
            continue;
        }
        let Some(p) = soft.nodes[i]
            .status
            .as_ref()
            .filter(|st| st.generation == d.meta.generation)
            .and_then(|st| st.progress.as_ref())
        else {
            continue;
        };
        let how = if p.finished {
            "printed its final line ([progress].finished)".to_owned()
        } else if let Some(total) = total.filter(|&t| p.iteration >= t) {
            format!(
                "reached iteration {} of {total} ([progress].iterations)",
                p.iteration
            )
        } else {
            continue;
        };
        let now_ms = d.now_ms;
        d.node_mut(i).training_done_ms = now_ms;
        d.event(
            "TrainingFinished",
            format!(
                "node {} ({}) on host {} finished training: it {how}; it counts as finished, and geomx stops it if it still runs teardown_grace ({}) after the last training worker finished",
                n.name,
                n.role.as_str(),
                n.host,
                humantime::format_duration(idx.plan.policy.teardown_grace)
            ),
            &n.name,
            &n.host,
        );
    }
}

/// Every training worker finished and the teardown is over: Succeeded. Names the nodes that
/// exited non-zero while shutting down and the workers geomx stops after their training.
fn succeed(idx: &PlanIndex, d: &mut Draft<'_>, waited: Duration) {
    let grace = idx.plan.policy.teardown_grace;
    let last = training_done_at(idx, d).unwrap_or(d.now_ms);
    let mut crashed = Vec::new();
    let mut lingering = Vec::new();
    let mut exited = 0usize;
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        let r = d.node(i).clone();
        if teardown_candidate(idx, i, &r) {
            let when = if r.ended_seen_ms >= last {
                "after the training workers finished".to_owned()
            } else {
                format!(
                    "{} before the last training worker finished (within teardown_grace {})",
                    humantime::format_duration(round_ms(ms_between(r.ended_seen_ms, last))),
                    humantime::format_duration(grace)
                )
            };
            let code = r.exit_code.unwrap_or_default();
            let mut msg = format!(
                "node {} ({}) on host {} exited {code}{} while shutting down, {when}: not a failure",
                n.name,
                n.role.as_str(),
                n.host,
                signal_note(code)
            );
            push_tail(&mut msg, &r.log_tail);
            d.event("ExitedWhileShuttingDown", msg, &n.name, &n.host);
            d.node_mut(i).end = format!("{} while shutting down (not a failure)", end_text(&r));
            crashed.push(format!("{} ({code})", n.name));
        } else if idx.training[i] && r.state == NodeState::Running && r.training_done_ms > 0 {
            d.event(
                "StoppedAfterTraining",
                format!(
                    "node {} ({}) on host {} still ran {} after it finished training (teardown_grace {}): stopped by geomx; it counts as finished",
                    n.name,
                    n.role.as_str(),
                    n.host,
                    humantime::format_duration(round_ms(ms_between(
                        r.training_done_ms,
                        d.now_ms
                    ))),
                    humantime::format_duration(grace)
                ),
                &n.name,
                &n.host,
            );
            let rec = d.node_mut(i);
            rec.state = NodeState::Stopped;
            rec.end = "stopped by geomx after it finished training".to_owned();
            lingering.push(n.name.clone());
        } else if idx.training[i] && r.state == NodeState::Exited {
            exited += 1;
        }
    }
    let workers = (0..idx.len()).filter(|&i| idx.training[i]).count();
    let mut reason = if lingering.is_empty() && exited == workers {
        format!("all {workers} training worker{} exited 0", plural(workers))
    } else {
        format!(
            "all {workers} training worker{} finished ({exited} exited 0, {} stopped by geomx after finishing training, {} ended otherwise after finishing training)",
            plural(workers),
            lingering.len(),
            workers - exited - lingering.len()
        )
    };
    if !crashed.is_empty() {
        reason.push_str(&format!(
            "; exited non-zero while shutting down: {}",
            list_names(crashed.iter().map(String::as_str), 8)
        ));
    }
    let still = (0..idx.len())
        .filter(|&i| !d.node(i).state.is_ended())
        .count();
    if still > 0 && waited >= grace {
        reason.push_str(&format!(
            "; {still} node{} still running teardown_grace ({}) after the last training worker finished {} stopped",
            plural(still),
            humantime::format_duration(grace),
            if still == 1 { "is" } else { "are" }
        ));
    }
    d.event("Succeeded", reason.clone(), "", "");
    d.set_phase(Phase::Succeeded, reason);
}

/// A failure text with what the log tail tells about a known trap: GeoMX's ps-lite in mode
/// "ps" (its servers require the global-layer variables: "Check notnull: find(...)").
fn with_hint(idx: &PlanIndex, mut text: String, r: &NodeRecord) -> String {
    let geomx_ps = idx.plan.mode == geomx_job::Mode::Ps
        && r.log_tail
            .iter()
            .any(|l| l.contains("Check notnull: find(") || l.contains("DMLC_NUM_GLOBAL_"));
    if geomx_ps {
        text.push_str(
            "\n(mode \"ps\" needs plain MXNet: GeoMX's ps-lite aborts in mode \"ps\", its servers require DMLC_NUM_GLOBAL_WORKER and DMLC_NUM_GLOBAL_SERVER; use mode \"hips\" with the GeoMX image, or an image with plain MXNet, e.g. pip's mxnet==1.9.1)",
        );
    }
    text
}

fn push_tail(text: &mut String, log_tail: &[String]) {
    let skip = log_tail.len().saturating_sub(REASON_LOG_LINES);
    if log_tail.len() > skip {
        text.push_str("\nlast log lines:");
        for line in &log_tail[skip..] {
            text.push_str("\n  ");
            text.push_str(line);
        }
    }
}

/// `a, b, c and 4 more`.
pub fn list_names<'a>(names: impl IntoIterator<Item = &'a str>, max: usize) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    if names.len() <= max {
        return names.join(", ");
    }
    format!("{} and {} more", names[..max].join(", "), names.len() - max)
}

/// A host of the job that is not ready: records an event and returns the reason.
fn host_problem(idx: &PlanIndex, d: &mut Draft<'_>, ctx: &Ctx<'_>) -> Option<String> {
    for (host, on) in &idx.by_host {
        let cond = ctx.host(host);
        if cond == HostCond::Ready {
            continue;
        }
        let nodes = list_names(on.iter().map(|&i| idx.plan.nodes[i].name.as_str()), 8);
        let (kind, reason) = match cond {
            HostCond::Lost => (
                "HostLost",
                format!(
                    "host {host} was lost (no heartbeat within the grace period) with node{} {nodes}",
                    plural(on.len())
                ),
            ),
            HostCond::Left => (
                "HostLeft",
                format!(
                    "host {host} left the cluster with node{} {nodes}",
                    plural(on.len())
                ),
            ),
            _ => (
                "HostUnknown",
                format!("host {host} is no longer known to the controller (nodes {nodes})"),
            ),
        };
        d.event(kind, reason.clone(), "", host);
        return Some(reason);
    }
    None
}

/// Fails the job, or restarts it when the policy allows and restarts are left.
fn fail(idx: &PlanIndex, d: &mut Draft<'_>, reason: String, restartable: bool) {
    let policy = &idx.plan.policy;
    let on_failure = policy.restart == RestartPolicy::OnFailure;
    let code = if restartable {
        failing_exit_code(idx, d)
    } else {
        None
    };
    let not_retried = code
        .filter(|c| !policy.retry_exit_codes.is_empty() && !policy.retry_exit_codes.contains(c));
    if let Some(c) = not_retried
        && on_failure
    {
        let codes: Vec<String> = policy.retry_exit_codes.iter().map(i32::to_string).collect();
        let reason = format!(
            "{reason} (not restarted: exit code {c} is not among retry_exit_codes {})",
            codes.join(", ")
        );
        d.event("Failed", reason.clone(), "", "");
        d.set_phase(Phase::Failed, reason);
        return;
    }
    if restartable && on_failure && d.meta.restarts < policy.max_restarts {
        d.meta.restarts += 1;
        let delay = policy.restart_delay_for(d.meta.restarts);
        let after = if delay.is_zero() {
            String::new()
        } else {
            format!(
                " (in {}, once the old containers are gone)",
                humantime::format_duration(delay)
            )
        };
        let why = format!(
            "restart {} of {}{after} after: {reason}",
            d.meta.restarts, policy.max_restarts
        );
        d.event("Restarting", why.clone(), "", "");
        d.set_phase(Phase::Restarting, why);
        return;
    }
    let reason = if on_failure && restartable {
        format!(
            "{reason} (no restart left: {} of {} used)",
            d.meta.restarts, policy.max_restarts
        )
    } else if on_failure {
        format!("{reason} (not restarted: the job's nodes are pinned to this host)")
    } else {
        reason
    };
    d.event("Failed", reason.clone(), "", "");
    d.set_phase(Phase::Failed, reason);
}

/// The exit code of the node whose failure fails the job (the first failed node in plan
/// order that exited non-zero), if it exited.
fn failing_exit_code(idx: &PlanIndex, d: &Draft<'_>) -> Option<i32> {
    (0..idx.len())
        .map(|i| d.node(i))
        .find(|r| r.state == NodeState::Failed && r.exit_code.is_some_and(|c| c != 0))
        .and_then(|r| r.exit_code)
}

/// Bumps the generation: every node starts over.
fn restart_now(idx: &PlanIndex, d: &mut Draft<'_>) {
    d.meta.generation += 1;
    d.meta.schedulers_up = false;
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        *d.node_mut(i) = NodeRecord::new(&n.name);
    }
    d.event(
        "Restarted",
        format!(
            "old containers are gone; generation {} starts (restart {} of {})",
            d.meta.generation, d.meta.restarts, idx.plan.policy.max_restarts
        ),
        "",
        "",
    );
    d.set_phase(Phase::Starting, String::new());
}

/// Folds the latest reports of the current generation into the node records.
fn observe(idx: &PlanIndex, d: &mut Draft<'_>, soft: &JobSoft) {
    let generation = d.meta.generation;
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        let Some(st) = soft.nodes[i].status.as_ref() else {
            continue;
        };
        if st.generation != generation {
            continue;
        }
        let (rec_state, rec_ip, rec_started) = {
            let r = d.node(i);
            (r.state, r.ip, r.started())
        };
        if rec_state.is_ended() {
            // the tail may come in a later report than the end: keep the last lines of
            // every node that ended
            let ended_report = NodeState::from_proto(st.state).is_some_and(NodeState::is_ended);
            if ended_report && d.node(i).log_tail.is_empty() && !st.log_tail.is_empty() {
                d.node_mut(i).log_tail.clone_from(&st.log_tail);
            }
            continue;
        }
        let Some(mut state) = NodeState::from_proto(st.state) else {
            continue;
        };
        if state == NodeState::Exited && st.exit_code.is_some_and(|c| c != 0) {
            state = NodeState::Failed;
        }
        let ip: Option<Ipv4Addr> = st.ip.trim().parse().ok();
        if let Some(ip) = ip
            && rec_ip != Some(ip)
        {
            match rec_ip {
                Some(old) if rec_started => {
                    let msg = format!(
                        "node {} on host {}: its address changed from {old} to {ip} (its network sandbox was recreated); its peers still use the old one",
                        n.name, n.host
                    );
                    let now_ms = d.now_ms;
                    let r = d.node_mut(i);
                    r.state = NodeState::Failed;
                    r.error = msg.clone();
                    r.finished_at_ms = now_ms;
                    d.event("AddressChanged", msg, &n.name, &n.host);
                    continue;
                }
                _ => d.node_mut(i).ip = Some(ip),
            }
        }
        if state == rec_state {
            continue;
        }
        let now_ms = d.now_ms;
        let r = d.node_mut(i);
        r.state = state;
        match state {
            NodeState::Running => {
                r.started_at_ms = if st.started_at_ms > 0 {
                    st.started_at_ms
                } else {
                    now_ms
                };
            }
            NodeState::Exited | NodeState::Failed | NodeState::Missing | NodeState::Stopped => {
                r.ended_seen_ms = now_ms;
                r.exit_code = st.exit_code;
                r.error.clone_from(&st.error);
                r.log_tail.clone_from(&st.log_tail);
                if st.started_at_ms > 0 {
                    r.started_at_ms = st.started_at_ms;
                }
                r.finished_at_ms = if st.finished_at_ms > 0 {
                    st.finished_at_ms
                } else {
                    now_ms
                };
            }
            NodeState::Pending | NodeState::Created => {}
        }
        let r = d.node(i).clone();
        match state {
            NodeState::Exited => {
                let what = if idx.training[i] {
                    "training worker finished"
                } else {
                    "not a training worker: the job goes on"
                };
                d.event(
                    "NodeExited",
                    format!(
                        "node {} ({}) on host {} exited 0 ({what})",
                        n.name,
                        n.role.as_str(),
                        n.host
                    ),
                    &n.name,
                    &n.host,
                );
            }
            NodeState::Failed if teardown_candidate(idx, i, &r) => {
                let why = if r.training_done_ms > 0 {
                    "it had finished training: it counts as finished".to_owned()
                } else {
                    format!(
                        "not a failure if every training worker finishes within teardown_grace ({}) of it: GeoMX's servers and schedulers may crash in ps::Finalize",
                        humantime::format_duration(idx.plan.policy.teardown_grace)
                    )
                };
                d.event(
                    "NodeExitedNonZero",
                    format!("{}\n({why})", failure_text(n, &r)),
                    &n.name,
                    &n.host,
                );
            }
            NodeState::Failed => {
                d.event("NodeFailed", failure_text(n, &r), &n.name, &n.host);
            }
            NodeState::Missing => {
                d.event("NodeMissing", failure_text(n, &r), &n.name, &n.host);
            }
            _ => {}
        }
    }
}

/// Why a failed or missing node failed, with the last lines of its log.
pub fn failure_text(n: &geomx_job::Node, r: &NodeRecord) -> String {
    let mut text = match (r.state, r.exit_code) {
        (NodeState::Missing, _) => format!(
            "node {} ({}) on host {} is missing: its container is gone",
            n.name,
            n.role.as_str(),
            n.host
        ),
        (_, Some(code)) => format!(
            "node {} ({}) on host {} failed with exit code {code}{}",
            n.name,
            n.role.as_str(),
            n.host,
            signal_note(code)
        ),
        (_, None) => format!(
            "node {} ({}) on host {} could not start",
            n.name,
            n.role.as_str(),
            n.host
        ),
    };
    let error = r.error.trim();
    if error.starts_with(&format!("node {} ", n.name)) {
        // A message the controller wrote itself (absence, address change): complete.
        text = error.to_owned();
    } else if !error.is_empty() {
        text.push_str(": ");
        text.push_str(error);
    }
    let tail: Vec<&String> = r
        .log_tail
        .iter()
        .rev()
        .take(REASON_LOG_LINES)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if !tail.is_empty() {
        text.push_str("\nlast log lines:");
        for line in tail {
            text.push_str("\n  ");
            text.push_str(line);
        }
    }
    text
}

/// The first node problem that fails the job, if any (records its event).
fn node_problem(
    idx: &PlanIndex,
    d: &mut Draft<'_>,
    soft: &JobSoft,
    ctx: &Ctx<'_>,
    waits: &[rendezvous::Wait],
) -> Option<String> {
    let grace = idx.plan.policy.teardown_grace;
    let training_done = all_training_done(idx, d);
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        let r = d.node(i);
        if !matches!(r.state, NodeState::Failed | NodeState::Missing) {
            continue;
        }
        if teardown_candidate(idx, i, r) {
            if r.training_done_ms > 0 || training_done {
                continue;
            }
            let waited = ms_between(r.ended_seen_ms, d.now_ms);
            if waited <= grace {
                // the training workers may still finish within the window
                continue;
            }
            let msg = format!(
                "{}\n(not a shutdown crash: the training workers had not finished {} after it ended, teardown_grace {})",
                with_hint(idx, failure_text(n, r), r),
                humantime::format_duration(round_ms(waited)),
                humantime::format_duration(grace)
            );
            d.event("NodeFailed", msg.clone(), &n.name, &n.host);
            return Some(msg);
        }
        return Some(with_hint(idx, failure_text(n, r), r));
    }
    // Started nodes their host stopped reporting.
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        let r = d.node(i);
        if !r.started() || r.state.is_ended() {
            continue;
        }
        let s = &soft.nodes[i];
        let Some(seen) = soft.hosts.get(&n.host) else {
            continue;
        };
        if !seen.nodes_known {
            // the agent has not adopted its containers yet: its silence means nothing,
            // for as long as the job tolerates no news at all (its stall timeout)
            let unknown_for = seen.unknown_since.map_or(Duration::ZERO, |since| {
                ctx.now.saturating_duration_since(since)
            });
            if unknown_for > ctx.stall_timeout {
                let msg = format!(
                    "node {} ({}) on host {} is unaccounted for: the agent on host {} has not known its containers for {} (stall_timeout {}); is Docker running there?",
                    n.name,
                    n.role.as_str(),
                    n.host,
                    n.host,
                    humantime::format_duration(round_ms(unknown_for)),
                    humantime::format_duration(ctx.stall_timeout)
                );
                let now_ms = d.now_ms;
                let r = d.node_mut(i);
                r.state = NodeState::Missing;
                r.error = msg.clone();
                r.finished_at_ms = now_ms;
                d.event("NodeMissing", msg.clone(), &n.name, &n.host);
                return Some(msg);
            }
            continue;
        }
        let baseline = [
            s.last_report,
            s.start_sent,
            Some(soft.loaded_at),
            Some(seen.known_since),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(soft.loaded_at);
        let gap = seen.at.saturating_duration_since(baseline);
        if gap > ctx.absent_timeout {
            let msg = format!(
                "node {} ({}) on host {} is missing: its agent has not reported it for {} although the host reports",
                n.name,
                n.role.as_str(),
                n.host,
                humantime::format_duration(round_ms(gap))
            );
            let now_ms = d.now_ms;
            let r = d.node_mut(i);
            r.state = NodeState::Missing;
            r.error = msg.clone();
            r.finished_at_ms = now_ms;
            d.event("NodeMissing", msg.clone(), &n.name, &n.host);
            return Some(msg);
        }
    }
    // Training workers without progress.
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        if !idx.training[i]
            || d.node(i).state != NodeState::Running
            || d.node(i).training_done_ms > 0
        {
            continue;
        }
        let s = &soft.nodes[i];
        let running = s
            .status
            .as_ref()
            .is_some_and(|st| NodeState::from_proto(st.state) == Some(NodeState::Running));
        let Some(since) = s.running_since else {
            continue;
        };
        if !running {
            continue;
        }
        if soft.hosts.get(&n.host).is_some_and(|h| !h.nodes_known) {
            // its agent does not see it (not adopted yet): no news is not a stall
            continue;
        }
        if waits
            .iter()
            .any(|w| !w.complete && idx.waits_for[i].contains(&w.scheduler))
        {
            // still in its rendezvous: rendezvous_timeout names who is missing
            continue;
        }
        let last = s.progress_at.map_or(since, |p| p.max(since));
        let quiet = ctx.now.saturating_duration_since(last);
        if quiet > ctx.stall_timeout {
            let progress = match s.status.as_ref().and_then(|st| st.progress.as_ref()) {
                Some(p) => {
                    let acc = p
                        .accuracy
                        .map(|a| format!(", accuracy {a:.4}"))
                        .unwrap_or_default();
                    format!(
                        "last progress: epoch {}, iteration {}{acc}",
                        p.epoch, p.iteration
                    )
                }
                None => "no progress reported since it started".to_owned(),
            };
            let msg = format!(
                "node {} ({}) on host {} stalled: no progress for {} (stall_timeout {}); {progress}",
                n.name,
                n.role.as_str(),
                n.host,
                humantime::format_duration(Duration::from_secs(quiet.as_secs())),
                humantime::format_duration(ctx.stall_timeout)
            );
            d.event("Stalled", msg.clone(), &n.name, &n.host);
            return Some(msg);
        }
    }
    None
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends `start` (with the resolved environment) to every node that can start now.
fn start_ready(idx: &PlanIndex, d: &mut Draft<'_>) {
    if !d.meta.phase.runs_containers() {
        return;
    }
    let mut started = Vec::new();
    for (i, n) in idx.plan.nodes.iter().enumerate() {
        if d.node(i).started() {
            continue;
        }
        if !idx.deps[i].iter().all(|&j| d.node(j).ip.is_some()) {
            continue;
        }
        if !idx.waits_for[i]
            .iter()
            .all(|&j| d.node(j).state == NodeState::Running)
        {
            continue;
        }
        let ips = |name: &str| idx.index.get(name).and_then(|&j| d.node(j).ip);
        match n.resolve_env(&ips) {
            Ok(env) => started.push((i, env)),
            Err(e) => {
                // Unreachable: every dependency has an IP. Keep waiting rather than panic.
                tracing::error!(job = %d.meta.name, node = %n.name, error = %e, "cannot resolve environment");
            }
        }
    }
    if started.is_empty() {
        return;
    }
    let pseudo = idx.plan.network == Network::Pseudo;
    let describe = |i: usize, d: &Draft<'_>| {
        let n = &idx.plan.nodes[i];
        match (pseudo, d.node(i).ip) {
            (true, _) => format!("{} on {}", n.name, n.host),
            (false, Some(ip)) => format!("{} ({ip} on {})", n.name, n.host),
            (false, None) => format!("{} on {}", n.name, n.host),
        }
    };
    let schedulers: Vec<String> = started
        .iter()
        .filter(|(i, _)| idx.plan.nodes[*i].role.is_scheduler())
        .map(|(i, _)| describe(*i, d))
        .collect();
    let others: Vec<String> = started
        .iter()
        .filter(|(i, _)| !idx.plan.nodes[*i].role.is_scheduler())
        .map(|(i, _)| idx.plan.nodes[*i].name.clone())
        .collect();
    for (i, env) in started {
        d.node_mut(i).env = Some(env);
        d.started.push(i);
    }
    if !schedulers.is_empty() {
        d.event(
            "SchedulersStarting",
            format!(
                "starting scheduler{} {}",
                plural(schedulers.len()),
                list_names(schedulers.iter().map(String::as_str), 16)
            ),
            "",
            "",
        );
    }
    if !others.is_empty() {
        d.event(
            "NodesStarting",
            format!(
                "starting {} server{}/worker{}: {}",
                others.len(),
                plural(others.len()),
                plural(others.len()),
                list_names(others.iter().map(String::as_str), 16)
            ),
            "",
            "",
        );
    }
}

/// Pending → Starting, SchedulersUp, Starting → Running.
fn advance(idx: &PlanIndex, d: &mut Draft<'_>) {
    if d.meta.phase == Phase::Pending && (0..idx.len()).any(|i| d.node(i).started()) {
        d.set_phase(Phase::Starting, String::new());
    }
    if !d.meta.schedulers_up
        && !idx.schedulers.is_empty()
        && idx
            .schedulers
            .iter()
            .all(|&i| d.node(i).state == NodeState::Running)
    {
        d.meta.schedulers_up = true;
        d.event(
            "SchedulersUp",
            format!(
                "all {} scheduler{} run: {}",
                idx.schedulers.len(),
                plural(idx.schedulers.len()),
                list_names(
                    idx.schedulers
                        .iter()
                        .map(|&i| idx.plan.nodes[i].name.as_str()),
                    16
                )
            ),
            "",
            "",
        );
    }
    let all_run = (0..idx.len()).all(|i| {
        let r = d.node(i);
        r.started() && matches!(r.state, NodeState::Running | NodeState::Exited)
    });
    if d.meta.phase == Phase::Starting && all_run {
        d.meta.running_at_ms = d.now_ms;
        d.event(
            "Running",
            format!(
                "all {} node{} run (generation {})",
                idx.len(),
                plural(idx.len()),
                d.meta.generation
            ),
            "",
            "",
        );
        d.set_phase(Phase::Running, String::new());
    }
}

/// Why an active job is in its phase, for people (Pending, Starting); empty otherwise.
pub fn waiting_for(idx: &PlanIndex, meta: &JobMeta, nodes: &[NodeRecord]) -> String {
    let names = |f: &dyn Fn(usize) -> bool| {
        let v: Vec<&str> = (0..idx.len())
            .filter(|&i| f(i))
            .map(|i| idx.plan.nodes[i].name.as_str())
            .collect();
        (v.len(), list_names(v, 6))
    };
    match meta.phase {
        Phase::Pending | Phase::Starting => {
            // the nodes whose address someone not yet started is waiting for
            let (n, no_ip) = names(&|j| {
                nodes[j].ip.is_none()
                    && (0..idx.len()).any(|i| !nodes[i].started() && idx.deps[i].contains(&j))
            });
            if n > 0 && idx.schedulers.iter().any(|&i| !nodes[i].started()) {
                return format!("waiting for the network sandboxes (IPs) of {no_ip}");
            }
            let (n, sched) = names(&|i| {
                idx.plan.nodes[i].role.is_scheduler() && nodes[i].state != NodeState::Running
            });
            if n > 0 {
                return format!("waiting for scheduler{} {sched} to run", plural(n));
            }
            let (n, rest) =
                names(&|i| !matches!(nodes[i].state, NodeState::Running | NodeState::Exited));
            if n > 0 {
                return format!("waiting for {n} node{} to run: {rest}", plural(n));
            }
            String::new()
        }
        _ => meta.reason.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_proto::v1::{ContainerState, Progress};

    const ROUTED: &str = r#"
name = "j"
mode = "hips"
image = "img:1"
[central]
host = "a"
[[party]]
name = "p"
hosts = ["b"]
workers = 2
"#;

    const PSEUDO: &str = r#"
name = "pj"
mode = "ps"
image = "img:1"
network = "pseudo"
[[party]]
name = "p"
hosts = ["a"]
workers = 1
"#;

    fn index(src: &str) -> PlanIndex {
        PlanIndex::new(geomx_job::plan("t.toml", src).expect("valid job")).expect("index")
    }

    fn with_policy(src: &str, policy: &str) -> String {
        format!("{src}\n[policy]\n{policy}\n")
    }

    struct Fixture {
        idx: PlanIndex,
        meta: JobMeta,
        nodes: Vec<NodeRecord>,
        soft: JobSoft,
        hosts: BTreeMap<String, HostCond>,
        t0: Instant,
        now: Instant,
    }

    impl Fixture {
        fn new(src: &str) -> Fixture {
            let idx = index(src);
            let t0 = Instant::now();
            let nodes = idx
                .plan
                .nodes
                .iter()
                .map(|n| NodeRecord::new(&n.name))
                .collect();
            let hosts = idx
                .by_host
                .keys()
                .map(|h| (h.clone(), HostCond::Ready))
                .collect();
            let meta = JobMeta {
                name: idx.plan.job.clone(),
                run: 1,
                ..Default::default()
            };
            let soft = JobSoft::new(idx.len(), t0);
            Fixture {
                idx,
                meta,
                nodes,
                soft,
                hosts,
                t0,
                now: t0,
            }
        }

        fn i(&self, name: &str) -> usize {
            self.idx.index[name]
        }

        fn ctx(&self) -> Ctx<'_> {
            Ctx {
                now: self.now,
                now_ms: 1_000
                    + i64::try_from(self.now.saturating_duration_since(self.t0).as_millis())
                        .unwrap_or(i64::MAX),
                hosts: &self.hosts,
                stall_timeout: Duration::from_secs(10),
                absent_timeout: Duration::from_secs(3),
                drain_timeout: Duration::from_secs(30),
            }
        }

        /// One pass, applied as the service would.
        fn pass(&mut self, command: Option<Command>) -> Changes {
            let changes = evaluate(
                &self.idx,
                &self.meta,
                &self.nodes,
                &self.soft,
                &self.ctx(),
                command,
            );
            if let Some(m) = &changes.meta {
                if m.phase != self.meta.phase {
                    self.soft.phase_since = self.now;
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
                self.soft.nodes[i].start_sent = Some(self.now);
            }
            changes
        }

        fn report(&mut self, name: &str, state: ContainerState, ip: &str) {
            let i = self.i(name);
            let host = self.idx.plan.nodes[i].host.clone();
            let st = NodeStatus {
                job: self.meta.name.clone(),
                node: name.into(),
                generation: self.meta.generation,
                state: state as i32,
                ip: ip.into(),
                ..Default::default()
            };
            self.soft.nodes[i].observe(st, self.now);
            self.soft
                .host_reported(&host, self.now, HostNodes::Known { has_nodes: true });
        }

        fn report_status(&mut self, st: NodeStatus) {
            let i = self.i(&st.node);
            self.soft.nodes[i].observe(st, self.now);
        }

        fn kinds(changes: &Changes) -> Vec<&str> {
            changes.events.iter().map(|e| e.kind.as_str()).collect()
        }

        fn started(&self) -> Vec<&str> {
            self.idx
                .plan
                .nodes
                .iter()
                .zip(&self.nodes)
                .filter(|(_, r)| r.started())
                .map(|(n, _)| n.name.as_str())
                .collect()
        }

        fn run_everything(&mut self) {
            let names: Vec<String> = self.idx.plan.nodes.iter().map(|n| n.name.clone()).collect();
            for (k, name) in names.iter().enumerate() {
                self.report(
                    name,
                    ContainerState::Pending,
                    &format!("172.17.0.{}", k + 2),
                );
            }
            for _ in 0..3 {
                self.pass(None);
                for (k, name) in names.iter().enumerate() {
                    if self.nodes[self.i(name)].started() {
                        self.report(
                            name,
                            ContainerState::Running,
                            &format!("172.17.0.{}", k + 2),
                        );
                    }
                }
            }
            self.pass(None);
            assert_eq!(self.meta.phase, Phase::Running);
        }
    }

    #[test]
    fn index_knows_dependencies() {
        let idx = index(ROUTED);
        let gs = idx.index["global-scheduler"];
        let srv = idx.index["p-server"];
        assert_eq!(idx.deps[gs], vec![gs], "a scheduler needs its own IP");
        assert!(idx.waits_for[gs].is_empty());
        let names = |v: &[usize]| -> Vec<String> {
            v.iter().map(|&i| idx.plan.nodes[i].name.clone()).collect()
        };
        assert_eq!(
            names(&idx.waits_for[srv]),
            ["global-scheduler", "p-scheduler"]
        );
        assert!(idx.training[idx.index["master-worker"]]);
        assert!(idx.training[idx.index["p-worker-1"]]);
        assert!(!idx.training[srv]);
        assert_eq!(idx.by_host.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(idx.schedulers.len(), 3);
    }

    #[test]
    fn routed_start_order_follows_ips_and_running_schedulers() {
        let mut f = Fixture::new(ROUTED);
        // Nothing is known: nothing starts, the job stays Pending.
        let c = f.pass(None);
        assert!(c.is_empty());
        assert_eq!(f.meta.phase, Phase::Pending);

        // Sandbox IPs of the central nodes arrive: the two central schedulers start.
        f.report("global-scheduler", ContainerState::Pending, "172.17.1.2");
        f.report("central-scheduler", ContainerState::Pending, "172.17.1.3");
        f.report("global-server-0", ContainerState::Pending, "172.17.1.4");
        let c = f.pass(None);
        assert!(c.publish);
        assert_eq!(Fixture::kinds(&c), ["SchedulersStarting"]);
        assert_eq!(f.started(), ["global-scheduler", "central-scheduler"]);
        assert_eq!(f.meta.phase, Phase::Starting);
        let gs = &f.nodes[f.i("global-scheduler")];
        let env = gs.env.as_ref().unwrap();
        assert_eq!(env["DMLC_PS_GLOBAL_ROOT_URI"], "172.17.1.2");
        let cs = f.nodes[f.i("central-scheduler")].env.clone().unwrap();
        assert_eq!(cs["DMLC_PS_ROOT_URI"], "172.17.1.3");

        // A pass with nothing new changes nothing (idempotent).
        assert!(f.pass(None).is_empty());

        // The global server knows every IP but its schedulers do not run yet.
        f.report("p-scheduler", ContainerState::Pending, "172.17.2.2");
        f.pass(None);
        assert!(!f.nodes[f.i("global-server-0")].started());
        assert!(f.nodes[f.i("p-scheduler")].started());

        // Central schedulers run: the global server and the master start (their
        // schedulers run and their IPs are known); the party server waits for p-scheduler.
        f.report("global-scheduler", ContainerState::Running, "172.17.1.2");
        f.report("central-scheduler", ContainerState::Running, "172.17.1.3");
        f.report("master-worker", ContainerState::Pending, "172.17.1.5");
        f.report("p-server", ContainerState::Pending, "172.17.2.3");
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["NodesStarting"]);
        assert!(f.nodes[f.i("global-server-0")].started());
        assert!(f.nodes[f.i("master-worker")].started());
        assert!(!f.nodes[f.i("p-server")].started());
        let gsrv = f.nodes[f.i("global-server-0")].env.clone().unwrap();
        assert_eq!(gsrv["DMLC_PS_GLOBAL_ROOT_URI"], "172.17.1.2");
        assert_eq!(gsrv["DMLC_PS_ROOT_URI"], "172.17.1.3");

        f.report("p-scheduler", ContainerState::Running, "172.17.2.2");
        let c = f.pass(None);
        assert!(Fixture::kinds(&c).contains(&"SchedulersUp"));
        assert!(f.nodes[f.i("p-server")].started());
        // Workers need no IP of their own: they started with the server.
        assert!(f.nodes[f.i("p-worker-0")].started());
        let w = f.nodes[f.i("p-worker-1")].env.clone().unwrap();
        assert_eq!(w["DMLC_PS_ROOT_URI"], "172.17.2.2");
        assert!(!w.contains_key("DMLC_PS_GLOBAL_ROOT_URI"));
        assert_eq!(f.meta.phase, Phase::Starting);

        // Everything runs: Running.
        for name in [
            "global-server-0",
            "master-worker",
            "p-server",
            "p-worker-0",
            "p-worker-1",
        ] {
            let ip = f.nodes[f.i(name)]
                .ip
                .map(|i| i.to_string())
                .unwrap_or_default();
            f.report(name, ContainerState::Running, &ip);
        }
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["Running"]);
        assert_eq!(f.meta.phase, Phase::Running);
        assert!(!c.publish, "becoming Running changes no container");
    }

    #[test]
    fn pseudo_schedulers_start_at_once_then_the_rest() {
        let mut f = Fixture::new(PSEUDO);
        let c = f.pass(None);
        assert_eq!(f.started(), ["p-scheduler"]);
        assert_eq!(f.meta.phase, Phase::Starting);
        assert!(c.publish);
        assert_eq!(
            f.nodes[0].env.as_ref().unwrap()["DMLC_PS_ROOT_URI"],
            "127.0.0.1"
        );
        f.report("p-scheduler", ContainerState::Running, "10.1.1.1");
        f.pass(None);
        assert_eq!(f.started(), ["p-scheduler", "p-server-0", "p-worker-0"]);
    }

    #[test]
    fn nothing_starts_before_every_host_checked_the_bind_sources() {
        let mut f = Fixture::new(PSEUDO);
        f.soft.preflight = Some(Preflight {
            revision: u64::MAX,
            pending: ["a".to_string()].into(),
        });
        // the desired state is not published yet: no revision reaches it
        assert!(!f.soft.host_applied("a", 7));
        let c = f.pass(None);
        assert!(c.is_empty(), "{c:?}");
        assert!(f.nodes.iter().all(|n| !n.started()));
        if let Some(p) = f.soft.preflight.as_mut() {
            p.revision = 8;
        }
        assert!(
            !f.soft.host_applied("a", 7),
            "an older state does not count"
        );
        assert!(!f.soft.preflight_done());
        assert!(f.soft.host_applied("a", 8), "the host checked them");
        assert!(f.soft.preflight_done());
        assert!(!f.soft.host_applied("a", 9), "done once");
        f.pass(None);
        assert!(
            f.nodes.iter().any(|n| n.started()),
            "now the schedulers start"
        );
    }

    #[test]
    fn started_env_never_changes() {
        let mut f = Fixture::new(PSEUDO);
        f.pass(None);
        let before = f.nodes[0].env.clone();
        // An IP reported later (pseudo: the host's) does not touch the started env.
        f.report("p-scheduler", ContainerState::Running, "10.1.1.1");
        f.pass(None);
        assert_eq!(f.nodes[0].env, before);
    }

    #[test]
    fn worker_failure_fails_with_node_host_code_and_log_tail() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        let mut st = NodeStatus {
            job: "j".into(),
            node: "p-worker-1".into(),
            state: ContainerState::Failed as i32,
            exit_code: Some(3),
            log_tail: (0..15).map(|k| format!("line {k}")).collect(),
            ..Default::default()
        };
        st.ip = "172.17.0.9".into();
        f.report_status(st);
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["NodeFailed", "Failed"]);
        assert!(c.publish, "containers are dropped");
        assert_eq!(f.meta.phase, Phase::Failed);
        let r = &f.meta.reason;
        assert!(
            r.starts_with("node p-worker-1 (worker) on host b failed with exit code 3"),
            "{r}"
        );
        assert!(
            r.contains("line 14") && r.contains("line 5") && !r.contains("line 4\n"),
            "{r}"
        );
        assert_eq!(c.events[0].node, "p-worker-1");
        assert_eq!(c.events[0].host, "b");
        assert!(f.meta.finished_at_ms > 0);
        // Ended: nothing changes any more.
        f.report("p-worker-0", ContainerState::Failed, "");
        assert!(f.pass(None).is_empty());
    }

    #[test]
    fn exited_with_nonzero_code_is_a_failure_and_zero_on_a_server_is_not() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        let ip = f.nodes[f.i("p-server")].ip.unwrap().to_string();
        f.report("p-server", ContainerState::Exited, &ip);
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["NodeExited"]);
        assert_eq!(f.meta.phase, Phase::Running);
        f.report_status(NodeStatus {
            node: "p-worker-0".into(),
            state: ContainerState::Exited as i32,
            exit_code: Some(1),
            ..Default::default()
        });
        f.pass(None);
        assert_eq!(f.meta.phase, Phase::Failed);
    }

    #[test]
    fn success_when_every_training_worker_exits_zero() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        for name in ["p-worker-0", "p-worker-1"] {
            f.report_status(NodeStatus {
                node: name.into(),
                state: ContainerState::Exited as i32,
                exit_code: Some(0),
                ..Default::default()
            });
            f.pass(None);
        }
        assert_eq!(f.meta.phase, Phase::Running, "the master still trains");
        f.report_status(NodeStatus {
            node: "master-worker".into(),
            state: ContainerState::Exited as i32,
            exit_code: Some(0),
            ..Default::default()
        });
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["NodeExited"]);
        assert_eq!(
            f.meta.phase,
            Phase::Running,
            "schedulers and servers get teardown_grace to shut down"
        );
        // they shut down (ps::Finalize): the job ends at once
        for name in SERVERS {
            f.report_status(NodeStatus {
                node: name.into(),
                state: ContainerState::Exited as i32,
                exit_code: Some(0),
                ..Default::default()
            });
        }
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c).last(), Some(&"Succeeded"));
        assert_eq!(f.meta.phase, Phase::Succeeded);
        assert!(c.publish);
        assert_eq!(f.meta.reason, "all 3 training workers exited 0");
        assert!(f.nodes.iter().all(|n| n.end == "exited 0"), "{:?}", f.nodes);
    }

    /// One timeline of the teardown window: at each second, the nodes that end then (node,
    /// exit code); a pass after each second.
    struct Teardown {
        name: &'static str,
        steps: &'static [(u64, &'static [(&'static str, i32)])],
        phase: Phase,
        /// Seconds after the start at which the phase was reached.
        at: u64,
        /// Event kinds the run must have recorded.
        events: &'static [&'static str],
        /// Text the reason (or, for Succeeded, an event) must hold.
        says: &'static str,
    }

    const SERVERS: [&str; 5] = [
        "global-scheduler",
        "global-server-0",
        "central-scheduler",
        "p-scheduler",
        "p-server",
    ];

    #[test]
    fn teardown_windows() {
        let cases = [
            Teardown {
                name: "every server crashes 139 after the last worker exited 0",
                steps: &[
                    (1, &[("p-worker-0", 0), ("p-worker-1", 0)]),
                    (2, &[("master-worker", 0)]),
                    (
                        3,
                        &[
                            ("global-scheduler", 139),
                            ("global-server-0", 139),
                            ("central-scheduler", 0),
                            ("p-scheduler", 0),
                            ("p-server", 139),
                        ],
                    ),
                ],
                phase: Phase::Succeeded,
                at: 3,
                events: &["ExitedWhileShuttingDown", "Succeeded"],
                says: "exited 139 (killed by signal 11, SIGSEGV) while shutting down, after the training workers finished",
            },
            Teardown {
                name: "a server crashes 3s before the last worker exits (grace 4s)",
                steps: &[
                    (1, &[("p-worker-0", 0), ("p-worker-1", 0)]),
                    (2, &[("p-server", 139)]),
                    (5, &[("master-worker", 0)]),
                ],
                phase: Phase::Succeeded,
                at: 9,
                events: &["NodeExitedNonZero", "ExitedWhileShuttingDown", "Succeeded"],
                says: "3s before the last training worker finished (within teardown_grace 4s)",
            },
            Teardown {
                name: "a server crashes and the workers do not finish within the grace",
                steps: &[
                    (1, &[("p-server", 139)]),
                    (5, &[]),
                    (6, &[]),
                    (
                        7,
                        &[("p-worker-0", 0), ("p-worker-1", 0), ("master-worker", 0)],
                    ),
                ],
                phase: Phase::Failed,
                at: 6,
                events: &["NodeExitedNonZero", "NodeFailed", "Failed"],
                says: "not a shutdown crash: the training workers had not finished 5s after it ended",
            },
            Teardown {
                name: "a worker exiting 1 fails the job at once, whatever the window",
                steps: &[
                    (1, &[("p-worker-0", 0), ("master-worker", 0)]),
                    (2, &[("p-worker-1", 1)]),
                ],
                phase: Phase::Failed,
                at: 2,
                events: &["NodeFailed", "Failed"],
                says: "node p-worker-1 (worker) on host b failed with exit code 1",
            },
            Teardown {
                name: "a worker killed by SIGKILL names the signal",
                steps: &[(1, &[("p-worker-0", 137)])],
                phase: Phase::Failed,
                at: 1,
                events: &["NodeFailed", "Failed"],
                says: "failed with exit code 137 (killed by signal 9, SIGKILL)",
            },
            Teardown {
                name: "servers that never exit are stopped teardown_grace after the last worker",
                steps: &[
                    (1, &[("p-worker-0", 0), ("p-worker-1", 0)]),
                    (2, &[("master-worker", 0), ("global-scheduler", 139)]),
                    (5, &[]),
                    (6, &[]),
                ],
                phase: Phase::Succeeded,
                at: 6,
                events: &["ExitedWhileShuttingDown", "Succeeded"],
                says: "4 nodes still running teardown_grace (4s) after the last training worker finished are stopped",
            },
        ];
        for case in cases {
            let mut f = Fixture::new(&with_policy(ROUTED, "teardown_grace = \"4s\""));
            f.run_everything();
            let mut kinds: Vec<String> = Vec::new();
            let mut texts: Vec<String> = Vec::new();
            let mut reached = None;
            let last = case.steps.last().map_or(0, |s| s.0) + 4;
            for sec in 1..=last {
                f.now = f.t0 + Duration::from_secs(sec);
                if let Some((_, ends)) = case.steps.iter().find(|(t, _)| *t == sec) {
                    for (node, code) in ends.iter() {
                        f.report_status(NodeStatus {
                            node: (*node).into(),
                            state: if *code == 0 {
                                ContainerState::Exited
                            } else {
                                ContainerState::Failed
                            } as i32,
                            exit_code: Some(*code),
                            log_tail: vec![format!("{node} says goodbye")],
                            ..Default::default()
                        });
                    }
                }
                let c = f.pass(None);
                kinds.extend(c.events.iter().map(|e| e.kind.clone()));
                texts.extend(c.events.iter().map(|e| e.message.clone()));
                if reached.is_none() && f.meta.phase.is_terminal() {
                    reached = Some(sec);
                }
            }
            assert_eq!(f.meta.phase, case.phase, "{}: {kinds:?}", case.name);
            assert_eq!(reached, Some(case.at), "{}: {kinds:?}", case.name);
            for k in case.events {
                assert!(
                    kinds.iter().any(|x| x == k),
                    "{}: no {k} in {kinds:?}",
                    case.name
                );
            }
            assert!(
                f.meta.reason.contains(case.says) || texts.iter().any(|t| t.contains(case.says)),
                "{}: {:?} / {texts:#?}",
                case.name,
                f.meta.reason
            );
            // never `running` beside an ended job
            assert!(
                f.nodes
                    .iter()
                    .all(|n| n.state != NodeState::Running && !n.end.is_empty()),
                "{}: {:?}",
                case.name,
                f.nodes
            );
        }
    }

    #[test]
    fn shutdown_crash_events_name_node_code_and_log_tail() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        for name in ["p-worker-0", "p-worker-1", "master-worker"] {
            f.report_status(NodeStatus {
                node: name.into(),
                state: ContainerState::Exited as i32,
                exit_code: Some(0),
                ..Default::default()
            });
        }
        f.pass(None);
        for name in SERVERS {
            f.report_status(NodeStatus {
                node: name.into(),
                state: ContainerState::Failed as i32,
                exit_code: Some(139),
                log_tail: vec!["Segmentation fault in ps::Finalize".into()],
                ..Default::default()
            });
        }
        let c = f.pass(None);
        assert_eq!(f.meta.phase, Phase::Succeeded);
        let crashes: Vec<&EventRecord> = c
            .events
            .iter()
            .filter(|e| e.kind == "ExitedWhileShuttingDown")
            .collect();
        let mut named: Vec<&str> = crashes.iter().map(|e| e.node.as_str()).collect();
        named.sort_unstable();
        let mut want = SERVERS.to_vec();
        want.sort_unstable();
        assert_eq!(named, want);
        for e in crashes {
            assert!(e.message.contains("exited 139"), "{}", e.message);
            assert!(
                e.message
                    .contains("last log lines:\n  Segmentation fault in ps::Finalize"),
                "{}",
                e.message
            );
        }
        assert!(
            f.meta
                .reason
                .contains("exited non-zero while shutting down: global-scheduler (139)")
        );
        let srv = &f.nodes[f.i("p-server")];
        assert_eq!(
            srv.end,
            "exited 139 (killed by signal 11, SIGSEGV) while shutting down (not a failure)"
        );
    }

    #[test]
    fn finished_workers_that_linger_are_stopped_and_count_as_finished() {
        for (progress, finish) in [
            ("finished = \"^training done$\"", true),
            ("iterations = 20", false),
        ] {
            let src = format!(
                "{}\n[progress]\n{progress}\n",
                with_policy(ROUTED, "teardown_grace = \"4s\"")
            );
            let mut f = Fixture::new(&src);
            f.run_everything();
            let names = ["p-worker-0", "p-worker-1", "master-worker"];
            for (k, name) in names.iter().enumerate() {
                f.now = f.t0 + Duration::from_secs(1 + k as u64);
                f.report_status(NodeStatus {
                    node: (*name).into(),
                    state: ContainerState::Running as i32,
                    progress: Some(Progress {
                        iteration: if finish { 7 } else { 20 },
                        finished: finish,
                        observed_at_ms: 5,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                let c = f.pass(None);
                assert_eq!(Fixture::kinds(&c), ["TrainingFinished"], "{progress}");
                assert_eq!(f.meta.phase, Phase::Running);
            }
            // the last one finished at 3s: 4s later (7s) the job ends; no stall in between
            for sec in 4..7 {
                f.now = f.t0 + Duration::from_secs(sec);
                assert!(f.pass(None).events.is_empty(), "{progress} at {sec}s");
            }
            f.now = f.t0 + Duration::from_secs(7);
            let c = f.pass(None);
            assert_eq!(f.meta.phase, Phase::Succeeded, "{progress}");
            let stopped: Vec<&str> = c
                .events
                .iter()
                .filter(|e| e.kind == "StoppedAfterTraining")
                .map(|e| e.node.as_str())
                .collect();
            assert_eq!(
                stopped,
                ["master-worker", "p-worker-0", "p-worker-1"],
                "{progress}"
            );
            assert!(
                f.meta
                    .reason
                    .starts_with("all 3 training workers finished (0 exited 0, 3 stopped by geomx after finishing training"),
                "{}",
                f.meta.reason
            );
            let w = &f.nodes[f.i("p-worker-0")];
            assert_eq!(w.state, NodeState::Stopped);
            assert_eq!(w.end, "stopped by geomx after it finished training");
            let s = &f.nodes[f.i("p-server")];
            assert_eq!(s.end, "stopped by geomx when the job ended");
        }
    }

    #[test]
    fn a_worker_crashing_after_its_final_line_counts_as_finished() {
        let src = format!("{ROUTED}\n[progress]\nfinished = \"done\"\n");
        let mut f = Fixture::new(&src);
        f.run_everything();
        f.report_status(NodeStatus {
            node: "p-worker-0".into(),
            state: ContainerState::Running as i32,
            progress: Some(Progress {
                iteration: 3,
                finished: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        f.pass(None);
        f.report_status(NodeStatus {
            node: "p-worker-0".into(),
            state: ContainerState::Failed as i32,
            exit_code: Some(139),
            ..Default::default()
        });
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["NodeExitedNonZero"]);
        assert_eq!(f.meta.phase, Phase::Running);
    }

    #[test]
    fn mode_ps_on_geomx_names_the_trap() {
        let mut f = Fixture::new(PSEUDO);
        f.run_everything();
        f.report_status(NodeStatus {
            node: "p-server-0".into(),
            state: ContainerState::Failed as i32,
            exit_code: Some(134),
            log_tail: vec![
                "[12:00:00] src/postoffice.cc:43: Check notnull: find(\"DMLC_NUM_GLOBAL_WORKER\")"
                    .into(),
            ],
            ..Default::default()
        });
        f.pass(None);
        f.now += Duration::from_secs(11);
        f.pass(None);
        assert_eq!(f.meta.phase, Phase::Failed);
        assert!(
            f.meta.reason.contains("mode \"ps\" needs plain MXNet"),
            "{}",
            f.meta.reason
        );
        assert!(
            f.meta.reason.contains("killed by signal 6, SIGABRT"),
            "{}",
            f.meta.reason
        );
    }

    #[test]
    fn final_states_after_a_failure_say_what_happened() {
        let mut f = Fixture::new(ROUTED);
        // only the schedulers run; the rest never started
        let names: Vec<String> = f.idx.plan.nodes.iter().map(|n| n.name.clone()).collect();
        for (k, name) in names.iter().enumerate() {
            f.report(
                name,
                ContainerState::Pending,
                &format!("172.17.0.{}", k + 2),
            );
        }
        f.pass(None);
        for name in ["global-scheduler", "central-scheduler", "p-scheduler"] {
            let ip = f.nodes[f.i(name)].ip.unwrap().to_string();
            f.report(name, ContainerState::Running, &ip);
        }
        f.pass(None);
        let c = f.pass(Some(Command::Cancel { by: String::new() }));
        assert!(c.publish);
        let gs = &f.nodes[f.i("global-scheduler")];
        assert_eq!(gs.state, NodeState::Stopped);
        assert_eq!(gs.end, "stopped by geomx when the job ended");
        let w = &f.nodes[f.i("p-worker-0")];
        assert!(!w.started() || w.state != NodeState::Running);
        assert!(!w.end.is_empty(), "{w:?}");
    }

    #[test]
    fn stall_after_timeout_measured_from_progress() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        let progress = |it: u64, at: i64| NodeStatus {
            node: "p-worker-0".into(),
            state: ContainerState::Running as i32,
            progress: Some(Progress {
                epoch: 0,
                iteration: it,
                accuracy: Some(0.5),
                observed_at_ms: at,
                ..Default::default()
            }),
            ..Default::default()
        };
        // Others keep reporting progress; p-worker-0 progresses, then stops.
        for k in 0..5u64 {
            f.now = f.t0 + Duration::from_secs(3 * k);
            f.report_status(progress(k + 1, k as i64));
            for w in ["p-worker-1", "master-worker"] {
                let mut st = progress(k + 1, k as i64);
                st.node = w.into();
                f.report_status(st);
            }
            assert!(f.pass(None).is_empty());
        }
        // 12s: p-worker-0's last progress was at 12s; the others go on.
        for s in [15u64, 20, 22] {
            f.now = f.t0 + Duration::from_secs(s);
            f.report_status(progress(5, 4));
            for w in ["p-worker-1", "master-worker"] {
                let mut st = progress(s, s as i64);
                st.node = w.into();
                f.report_status(st);
            }
            assert!(f.pass(None).is_empty(), "not stalled at {s}s");
        }
        f.now = f.t0 + Duration::from_secs(23);
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["Stalled", "Failed"]);
        assert!(
            f.meta.reason.contains("p-worker-0")
                && f.meta.reason.contains("stalled")
                && f.meta.reason.contains("iteration 5"),
            "{}",
            f.meta.reason
        );
    }

    #[test]
    fn restart_on_failure_drains_then_bumps_generation() {
        let mut f = Fixture::new(&with_policy(
            PSEUDO,
            "restart = \"on-failure\"\nmax_restarts = 1",
        ));
        f.run_everything();
        f.report_status(NodeStatus {
            node: "p-worker-0".into(),
            state: ContainerState::Failed as i32,
            exit_code: Some(3),
            ..Default::default()
        });
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["NodeFailed", "Restarting"]);
        assert!(c.publish);
        assert_eq!(f.meta.phase, Phase::Restarting);
        assert_eq!(f.meta.restarts, 1);
        assert!(
            f.meta
                .reason
                .starts_with("restart 1 of 1 after: node p-worker-0")
        );
        // The host still reports the old containers: wait.
        f.now += Duration::from_secs(1);
        f.soft
            .host_reported("a", f.now, HostNodes::Known { has_nodes: true });
        assert!(f.pass(None).is_empty());
        // Gone: generation 1 starts, schedulers first.
        f.now += Duration::from_secs(1);
        f.soft
            .host_reported("a", f.now, HostNodes::Known { has_nodes: false });
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["Restarted", "SchedulersStarting"]);
        assert!(c.new_generation && c.publish);
        assert_eq!(f.meta.generation, 1);
        assert_eq!(f.meta.phase, Phase::Starting);
        assert_eq!(f.started(), ["p-scheduler"]);
        // Old-generation reports are ignored.
        f.soft.nodes[0].observe(
            NodeStatus {
                node: "p-scheduler".into(),
                generation: 0,
                state: ContainerState::Failed as i32,
                ..Default::default()
            },
            f.now,
        );
        assert!(f.pass(None).is_empty());
        // A second failure: no restart left.
        f.run_everything();
        f.report_status(NodeStatus {
            node: "p-worker-0".into(),
            generation: 1,
            state: ContainerState::Failed as i32,
            exit_code: Some(3),
            ..Default::default()
        });
        f.pass(None);
        assert_eq!(f.meta.phase, Phase::Failed);
        assert!(
            f.meta.reason.contains("no restart left: 1 of 1 used"),
            "{}",
            f.meta.reason
        );
    }

    /// Fails p-worker-0 of the current generation with `code` at the fixture's time.
    fn fail_worker(f: &mut Fixture, code: i32) -> Changes {
        let generation = f.meta.generation;
        f.report_status(NodeStatus {
            node: "p-worker-0".into(),
            generation,
            state: ContainerState::Failed as i32,
            exit_code: Some(code),
            ..Default::default()
        });
        f.pass(None)
    }

    #[test]
    fn retry_exit_codes_choose_which_failures_restart() {
        let policy = "restart = \"on-failure\"\nmax_restarts = 3\nretry_exit_codes = [137, 143]";
        for (code, phase, says) in [
            (
                137,
                Phase::Restarting,
                "restart 1 of 3 after: node p-worker-0",
            ),
            (
                143,
                Phase::Restarting,
                "restart 1 of 3 after: node p-worker-0",
            ),
            (
                1,
                Phase::Failed,
                "(not restarted: exit code 1 is not among retry_exit_codes 137, 143)",
            ),
        ] {
            let mut f = Fixture::new(&with_policy(PSEUDO, policy));
            f.run_everything();
            let c = fail_worker(&mut f, code);
            assert_eq!(f.meta.phase, phase, "exit {code}: {:?}", Fixture::kinds(&c));
            assert!(
                f.meta.reason.contains(says),
                "exit {code}: {}",
                f.meta.reason
            );
        }
    }

    #[test]
    fn gang_restarts_back_off_exponentially() {
        let mut f = Fixture::new(&with_policy(
            PSEUDO,
            "restart = \"on-failure\"\nmax_restarts = 3\nrestart_delay = \"2s\"",
        ));
        for (restart, delay) in [(1u32, 2u64), (2, 4)] {
            f.run_everything();
            fail_worker(&mut f, 3);
            assert_eq!(f.meta.phase, Phase::Restarting);
            assert_eq!(f.meta.restarts, restart);
            assert!(
                f.meta
                    .reason
                    .contains(&format!("(in {delay}s, once the old containers are gone)")),
                "{}",
                f.meta.reason
            );
            let since = f.now;
            // drained at once, but the backoff holds the next generation back
            f.soft
                .host_reported("a", f.now, HostNodes::Known { has_nodes: false });
            f.now = since + Duration::from_millis(delay * 1000 - 100);
            assert!(
                f.pass(None).is_empty(),
                "restart {restart} before its delay"
            );
            f.now = since + Duration::from_secs(delay);
            let c = f.pass(None);
            assert_eq!(Fixture::kinds(&c)[0], "Restarted", "restart {restart}");
            assert_eq!(f.meta.generation, restart);
        }
        let p = &f.idx.plan.policy;
        assert_eq!(p.restart_delay_for(3), Duration::from_secs(8));
        assert_eq!(p.restart_delay_for(30), Duration::from_secs(300), "capped");
    }

    #[test]
    fn active_deadline_fails_the_job_without_restart() {
        let mut f = Fixture::new(&with_policy(
            PSEUDO,
            "restart = \"on-failure\"\nactive_deadline = \"10s\"",
        ));
        f.meta.submitted_at_ms = 1_000;
        f.run_everything();
        f.now = f.t0 + Duration::from_secs(9);
        assert!(f.pass(None).is_empty(), "not past it yet");
        f.now = f.t0 + Duration::from_millis(10_500);
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["DeadlineExceeded", "Failed"]);
        assert_eq!(f.meta.phase, Phase::Failed);
        assert!(
            f.meta
                .reason
                .starts_with("active_deadline 10s passed: the job has been active for 10s"),
            "{}",
            f.meta.reason
        );
        assert_eq!(f.meta.restarts, 0);
    }

    #[test]
    fn restart_proceeds_after_the_drain_timeout() {
        let mut f = Fixture::new(&with_policy(PSEUDO, "restart = \"on-failure\""));
        f.run_everything();
        f.report("p-server-0", ContainerState::Failed, "10.1.1.1");
        f.pass(None);
        assert_eq!(f.meta.phase, Phase::Restarting);
        f.now += Duration::from_secs(31);
        let c = f.pass(None);
        assert_eq!(
            Fixture::kinds(&c),
            ["RestartDrainTimeout", "Restarted", "SchedulersStarting"]
        );
    }

    #[test]
    fn lost_host_fails_without_restart() {
        let mut f = Fixture::new(&with_policy(ROUTED, "restart = \"on-failure\""));
        f.run_everything();
        f.hosts.insert("b".into(), HostCond::Lost);
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["HostLost", "Failed"]);
        assert_eq!(f.meta.phase, Phase::Failed);
        assert!(
            f.meta.reason.starts_with("host b was lost"),
            "{}",
            f.meta.reason
        );
        assert!(f.meta.reason.contains("p-worker-0"));
        assert_eq!(c.events[0].host, "b");
    }

    #[test]
    fn cancel_ends_everything() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        let c = f.pass(Some(Command::Cancel { by: "ci".into() }));
        assert_eq!(Fixture::kinds(&c), ["Cancelled"]);
        assert_eq!(
            c.events[0].message,
            "cancelled by token \"ci\" while running; every container is being removed"
        );
        assert!(c.publish);
        assert_eq!(f.meta.phase, Phase::Cancelled);
        assert_eq!(f.meta.cancelled_by, "ci");
        assert!(
            f.pass(Some(Command::Cancel { by: String::new() }))
                .is_empty(),
            "cancel twice is a no-op"
        );
    }

    #[test]
    fn a_started_node_no_longer_reported_goes_missing() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        // Host b keeps reporting its other nodes, but not p-worker-0.
        let w = f.i("p-worker-0");
        let last = f.soft.nodes[w].last_report.unwrap();
        for (secs, expect_missing) in [(2, false), (4, true)] {
            f.now = last + Duration::from_secs(secs);
            for o in ["p-scheduler", "p-server", "p-worker-1"] {
                let ip = f.nodes[f.i(o)]
                    .ip
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                f.report(o, ContainerState::Running, &ip);
            }
            let c = f.pass(None);
            if expect_missing {
                assert_eq!(Fixture::kinds(&c), ["NodeMissing", "Failed"]);
                assert!(f.meta.reason.contains("p-worker-0"), "{}", f.meta.reason);
            } else {
                assert!(c.is_empty(), "within the absence timeout");
            }
        }
    }

    /// The nodes of `host` except `except`, reported running at `f.now` (with their
    /// addresses), the training workers at iteration `iteration`.
    fn report_host_except(f: &mut Fixture, host: &str, except: &str, iteration: u64) {
        let names: Vec<(String, bool)> = f.idx.by_host[host]
            .iter()
            .map(|&i| (f.idx.plan.nodes[i].name.clone(), f.idx.training[i]))
            .collect();
        for (o, training) in names {
            if o == except {
                continue;
            }
            let ip = f.nodes[f.i(&o)]
                .ip
                .map(|i| i.to_string())
                .unwrap_or_default();
            f.report(&o, ContainerState::Running, &ip);
            if training {
                f.report_status(NodeStatus {
                    job: f.meta.name.clone(),
                    node: o,
                    state: ContainerState::Running as i32,
                    ip,
                    progress: Some(Progress {
                        iteration,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
    }

    #[test]
    fn a_host_whose_agent_does_not_know_its_nodes_yet_loses_none() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        let t = f.now;
        // b's agent restarted while its Docker is slow: it reports (the host is alive) but
        // knows no container, for far longer than the absence timeout (3 s), as long as the
        // stall timeout (10 s) allows (see the next test for longer)
        for secs in 1..=11 {
            f.now = t + Duration::from_secs(secs);
            assert!(
                !f.soft
                    .host_reported("b", f.now, HostNodes::of_report(Some(false), false))
            );
            report_host_except(&mut f, "a", "", secs);
            let c = f.pass(None);
            assert!(c.is_empty(), "after {secs}s: {:?}", Fixture::kinds(&c));
        }
        assert_eq!(f.meta.phase, Phase::Running);
        // adopted: every node is there again, nothing happened
        f.now += Duration::from_secs(1);
        report_host_except(&mut f, "b", "", 200);
        assert!(f.pass(None).is_empty());
        assert_eq!(f.meta.phase, Phase::Running);
    }

    #[test]
    fn a_host_that_never_knows_its_nodes_again_fails_the_job_after_the_stall_timeout() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        let t = f.now;
        // b's agent cannot get to its Docker at all: 10 s (the stall timeout) are
        // tolerated, then its started nodes are unaccounted for
        for secs in 1..=12 {
            f.now = t + Duration::from_secs(secs);
            f.soft
                .host_reported("b", f.now, HostNodes::of_report(Some(false), false));
            report_host_except(&mut f, "a", "", secs);
            let c = f.pass(None);
            if secs <= 11 {
                assert!(c.is_empty(), "after {secs}s: {:?}", Fixture::kinds(&c));
            } else {
                assert_eq!(Fixture::kinds(&c), ["NodeMissing", "Failed"]);
            }
        }
        assert_eq!(f.meta.phase, Phase::Failed);
        assert!(
            f.meta.reason.contains("on host b is unaccounted for")
                && f.meta
                    .reason
                    .contains("has not known its containers for 11s")
                && f.meta.reason.contains("is Docker running there?"),
            "{}",
            f.meta.reason
        );
    }

    #[test]
    fn a_node_absent_after_adoption_goes_missing_after_the_absence_timeout() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        let t = f.now;
        f.now = t + Duration::from_secs(4);
        f.soft
            .host_reported("b", f.now, HostNodes::of_report(Some(false), false));
        report_host_except(&mut f, "a", "", 4);
        assert!(f.pass(None).is_empty());
        // b's agent adopted its containers, p-worker-0's is gone (removed meanwhile): its
        // absence counts from the first report that knew the containers, not from the last
        // report of the node before the agent restarted
        let adopted = t + Duration::from_secs(5);
        for (secs, expect_missing) in [(5, false), (7, false), (9, true)] {
            f.now = t + Duration::from_secs(secs);
            report_host_except(&mut f, "a", "", secs);
            report_host_except(&mut f, "b", "p-worker-0", secs);
            let c = f.pass(None);
            if expect_missing {
                assert_eq!(Fixture::kinds(&c), ["NodeMissing", "Failed"]);
                assert!(
                    f.meta.reason.contains("p-worker-0")
                        && f.meta.reason.contains("has not reported it for 4s"),
                    "{}",
                    f.meta.reason
                );
            } else {
                assert!(
                    c.is_empty(),
                    "{}s after adoption: {c:?}",
                    (f.now - adopted).as_secs()
                );
            }
        }
    }

    #[test]
    fn agents_without_the_nodes_known_field_are_taken_at_their_word() {
        // an agent from before the field: absent means known, as before
        assert_eq!(
            HostNodes::of_report(None, false),
            HostNodes::Known { has_nodes: false }
        );
        assert_eq!(
            HostNodes::of_report(Some(true), true),
            HostNodes::Known { has_nodes: true }
        );
        assert_eq!(HostNodes::of_report(Some(false), true), HostNodes::Unknown);
    }

    #[test]
    fn a_restart_does_not_take_an_unknown_host_for_drained() {
        let mut f = Fixture::new(&with_policy(PSEUDO, "restart = \"on-failure\""));
        f.run_everything();
        f.report("p-server-0", ContainerState::Failed, "10.1.1.1");
        f.pass(None);
        assert_eq!(f.meta.phase, Phase::Restarting);
        // the agent of a restarted and does not know its containers yet: not drained
        f.now += Duration::from_secs(1);
        assert!(!f.soft.host_reported("a", f.now, HostNodes::Unknown));
        assert!(f.pass(None).is_empty());
        assert_eq!(f.meta.phase, Phase::Restarting);
        // it knows them: none of the job's left
        f.now += Duration::from_secs(1);
        assert!(
            f.soft
                .host_reported("a", f.now, HostNodes::Known { has_nodes: false })
        );
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["Restarted", "SchedulersStarting"]);
    }

    #[test]
    fn address_change_of_a_started_node_fails_it() {
        let mut f = Fixture::new(ROUTED);
        f.run_everything();
        f.report("p-scheduler", ContainerState::Running, "172.17.9.9");
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["AddressChanged", "Failed"]);
        assert!(
            f.meta.reason.contains("address changed"),
            "{}",
            f.meta.reason
        );
    }

    #[test]
    fn could_not_start_names_the_error() {
        let mut f = Fixture::new(PSEUDO);
        f.pass(None);
        f.report_status(NodeStatus {
            node: "p-scheduler".into(),
            state: ContainerState::Failed as i32,
            error: "image img:1 not found".into(),
            ..Default::default()
        });
        f.pass(None);
        assert_eq!(
            f.meta.reason,
            "node p-scheduler (scheduler) on host a could not start: image img:1 not found"
        );
    }

    #[test]
    fn throughput_over_the_last_minute() {
        let t0 = Instant::now();
        let mut s = NodeSoft::default();
        for k in 0..=10u64 {
            s.observe(
                NodeStatus {
                    state: ContainerState::Running as i32,
                    progress: Some(Progress {
                        iteration: k * 2,
                        observed_at_ms: k as i64,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                t0 + Duration::from_secs(k),
            );
        }
        let ips = s.iterations_per_s(t0 + Duration::from_secs(10));
        assert!((ips - 2.0).abs() < 1e-9, "{ips}");
        assert_eq!(s.iterations_per_s(t0 + Duration::from_secs(200)), 0.0);
        assert!(s.samples.len() <= 11);
    }

    #[test]
    fn waiting_for_explains_pending_and_starting() {
        let mut f = Fixture::new(ROUTED);
        let w = waiting_for(&f.idx, &f.meta, &f.nodes);
        assert!(w.starts_with("waiting for the network sandboxes"), "{w}");
        f.report("global-scheduler", ContainerState::Pending, "172.17.1.2");
        f.report("central-scheduler", ContainerState::Pending, "172.17.1.3");
        f.report("p-scheduler", ContainerState::Pending, "172.17.2.2");
        f.pass(None);
        let w = waiting_for(&f.idx, &f.meta, &f.nodes);
        assert!(w.starts_with("waiting for schedulers"), "{w}");
    }

    #[test]
    fn names_are_listed_with_a_limit() {
        assert_eq!(list_names(["a", "b"], 3), "a, b");
        assert_eq!(list_names(["a", "b", "c", "d"], 2), "a, b and 2 more");
    }

    fn rendezvous_report(f: &mut Fixture, node: &str, r: geomx_proto::v1::Rendezvous) {
        let i = f.i(node);
        let st = NodeStatus {
            job: f.meta.name.clone(),
            node: node.into(),
            generation: f.meta.generation,
            state: ContainerState::Running as i32,
            ip: f.nodes[i].ip.map(|ip| ip.to_string()).unwrap_or_default(),
            rendezvous: Some(r),
            ..Default::default()
        };
        f.report_status(st);
    }

    fn ip_of(f: &Fixture, node: &str) -> String {
        f.nodes[f.i(node)]
            .ip
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn schedulers_members_come_from_their_addresses() {
        let idx = index(ROUTED);
        let names = |s: &str| -> Vec<&str> {
            idx.members[idx.index[s]]
                .iter()
                .map(|&i| idx.plan.nodes[i].name.as_str())
                .collect()
        };
        assert_eq!(
            names("p-scheduler"),
            ["p-server", "p-worker-0", "p-worker-1"]
        );
        assert_eq!(names("global-scheduler"), ["global-server-0", "p-server"]);
        assert_eq!(
            names("central-scheduler"),
            ["global-server-0", "master-worker"]
        );
        assert!(names("p-worker-0").is_empty());
    }

    /// Item 3 of issue 17: per scheduler "k of n registered, waiting for", as events;
    /// a rendezvous still waiting `rendezvous_timeout` after everything runs fails the job
    /// naming the node that never registered and its host; its workers are not "stalled"
    /// meanwhile, and a party server waiting for its own party is not blamed.
    #[test]
    fn a_rendezvous_that_never_completes_names_the_missing_node() {
        use geomx_proto::v1::{Registration, Rendezvous};
        let mut f = Fixture::new(&with_policy(ROUTED, "rendezvous_timeout = \"20s\""));
        f.run_everything();
        // the central party trains (its scheduler is not followed here)
        let master = |it: u64| NodeStatus {
            node: "master-worker".into(),
            state: ContainerState::Running as i32,
            progress: Some(Progress {
                iteration: it,
                observed_at_ms: i64::try_from(it).unwrap_or(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        f.report_status(master(1));
        // p-worker-1 never started its process: only the server and p-worker-0 reached
        // their scheduler; the global scheduler counts 1 of 2 (p-server waits for its party)
        let connected = vec![ip_of(&f, "p-server"), ip_of(&f, "p-worker-0")];
        rendezvous_report(
            &mut f,
            "p-scheduler",
            Rendezvous {
                connected: connected.clone(),
                ..Default::default()
            },
        );
        let global_server = ip_of(&f, "global-server-0");
        rendezvous_report(
            &mut f,
            "global-scheduler",
            Rendezvous {
                count: 1,
                expected: 2,
                connected: vec![global_server],
                ..Default::default()
            },
        );
        let c = f.pass(None);
        let said: Vec<&str> = c
            .events
            .iter()
            .filter(|e| e.kind == "Rendezvous")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(
            said,
            [
                "scheduler global-scheduler (host a): 1 of 2 registered (ps-lite counts 1 of 2), waiting for: p-server (host b)",
                "scheduler p-scheduler (host b): 2 of 3 registered, waiting for: p-worker-1 (host b)",
            ]
        );
        assert!(f.pass(None).is_empty(), "announced once");
        // past the stall timeout (10s): the party's workers are in their rendezvous
        for s in [11u64, 20] {
            f.now = f.t0 + Duration::from_secs(s);
            f.report_status(master(s));
            let c = f.pass(None);
            assert!(c.is_empty(), "not failed at {s}s: {:?}", c.events);
        }
        f.now = f.t0 + Duration::from_secs(21);
        f.report_status(master(21));
        let c = f.pass(None);
        assert_eq!(Fixture::kinds(&c), ["RendezvousTimeout", "Failed"]);
        assert_eq!(f.meta.phase, Phase::Failed);
        let first = f.meta.reason.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            "rendezvous timed out after 21s (rendezvous_timeout 20s): p-worker-1 (worker) on host b never registered",
            "{}",
            f.meta.reason
        );
        assert!(
            f.meta.reason.contains("waiting for: p-worker-1 (host b)"),
            "{}",
            f.meta.reason
        );

        // the same, completed in time: the scheduler's own lines say so
        let mut f = Fixture::new(&with_policy(ROUTED, "rendezvous_timeout = \"20s\""));
        f.run_everything();
        let registered = ["p-server", "p-worker-0", "p-worker-1"]
            .iter()
            .map(|n| Registration {
                role: "worker".into(),
                ip: ip_of(&f, n),
                port: 1,
            })
            .collect();
        rendezvous_report(
            &mut f,
            "p-scheduler",
            Rendezvous {
                registered,
                complete: true,
                ..Default::default()
            },
        );
        f.report_status(master(1));
        let c = f.pass(None);
        assert_eq!(
            c.events
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>(),
            ["scheduler p-scheduler (host b): 3 of 3 registered, rendezvous complete"]
        );
        f.now = f.t0 + Duration::from_secs(25);
        f.report_status(master(25));
        for w in ["p-worker-0", "p-worker-1"] {
            let mut st = NodeStatus {
                node: w.into(),
                state: ContainerState::Running as i32,
                progress: Some(Progress {
                    iteration: 3,
                    observed_at_ms: 3,
                    ..Default::default()
                }),
                ..Default::default()
            };
            st.ip = ip_of(&f, w);
            f.report_status(st);
        }
        assert!(f.pass(None).is_empty());
        assert_eq!(f.meta.phase, Phase::Running);
    }
}
