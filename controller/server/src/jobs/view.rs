//! The API view of jobs: `geomx.v1.Job`, `JobNode`, `Event` from records and soft state.

use std::time::Instant;

use geomx_job::{MountType, Network, Node, Plan};
use geomx_proto::v1::{
    ContainerSpec, Event, Job, JobNode, Mount, NodeStatus, Resources, SchedulerRendezvous,
};

use super::engine::{JobSoft, PlanIndex, waiting_for};
use super::record::{JobMeta, NodeRecord, NodeState, Phase};
use super::rendezvous;
use crate::store::EventRecord;

/// What a view needs of a run.
#[derive(Clone, Copy, Debug)]
pub struct RunRef<'a> {
    /// Phase, counters, times.
    pub meta: &'a JobMeta,
    /// The submitted file.
    pub job_toml: &'a str,
    /// The plan and its index.
    pub idx: &'a PlanIndex,
    /// Node records, in plan order.
    pub nodes: &'a [NodeRecord],
    /// Soft state, for runs this process follows.
    pub soft: Option<&'a JobSoft>,
}

/// The `Job` message of a run; `with_nodes` adds every node (GetJob, WatchJob).
pub fn job_message(run: RunRef<'_>, with_nodes: bool, now: Instant) -> Job {
    let meta = run.meta;
    // An ended job's containers are removed: none runs, whatever was last reported.
    let running = if meta.phase.is_terminal() {
        0
    } else {
        run.nodes
            .iter()
            .filter(|n| n.state == NodeState::Running)
            .count()
    };
    let nodes = if with_nodes {
        (0..run.idx.len())
            .map(|i| node_message(run, i, now))
            .collect()
    } else {
        Vec::new()
    };
    Job {
        name: meta.name.clone(),
        mode: run.idx.plan.mode.as_str().to_owned(),
        phase: meta.phase.to_proto() as i32,
        reason: match run.soft.and_then(|s| s.preflight.as_ref()) {
            _ if meta.phase == Phase::Pulling => match run.soft.and_then(|s| s.pulls.as_ref()) {
                Some(p) => format!("pulling image {} on {}", p.image, p.pending_summary()),
                None => "waiting for the hosts to report the job's image".to_owned(),
            },
            Some(p) if !p.pending.is_empty() && !meta.phase.is_terminal() => format!(
                "waiting for host{} {} to check the job's bind mount sources",
                if p.pending.len() == 1 { "" } else { "s" },
                p.pending
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => waiting_for(run.idx, meta, run.nodes),
        },
        restarts: meta.restarts,
        max_restarts: run.idx.plan.policy.max_restarts,
        generation: meta.generation,
        submitted_at_ms: meta.submitted_at_ms,
        running_at_ms: meta.running_at_ms,
        finished_at_ms: meta.finished_at_ms,
        nodes,
        job_toml: if with_nodes {
            run.job_toml.to_owned()
        } else {
            String::new()
        },
        node_count: u32::try_from(run.idx.len()).unwrap_or(u32::MAX),
        running_nodes: u32::try_from(running).unwrap_or(u32::MAX),
        rendezvous: if with_nodes {
            rendezvous_messages(run)
        } else {
            Vec::new()
        },
        image: run.idx.plan.image.clone(),
        image_digest: run.idx.plan.image_digest.clone().unwrap_or_default(),
        image_pull: run.idx.plan.image_pull.as_str().to_owned(),
        pulls: run
            .soft
            .and_then(|s| s.pulls.as_ref())
            .map(super::images::Pulls::messages)
            .unwrap_or_default(),
        submitted_by: meta.submitted_by.clone(),
        cancelled_by: meta.cancelled_by.clone(),
    }
}

/// The rendezvous of the run's followed schedulers, while it starts or runs.
fn rendezvous_messages(run: RunRef<'_>) -> Vec<SchedulerRendezvous> {
    let Some(soft) = run.soft else {
        return Vec::new();
    };
    if !matches!(run.meta.phase, Phase::Starting | Phase::Running) {
        return Vec::new();
    }
    let idx = run.idx;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    rendezvous::of_run(idx, |i| &run.nodes[i], soft)
        .iter()
        .map(|w| {
            let n = &idx.plan.nodes[w.scheduler];
            SchedulerRendezvous {
                scheduler: n.name.clone(),
                host: n.host.clone(),
                registered: count(w.registered.len()),
                expected: count(w.expected()),
                waiting: w
                    .waiting
                    .iter()
                    .map(|&i| idx.plan.nodes[i].name.clone())
                    .collect(),
                complete: w.complete,
                summary: rendezvous::summary(idx, w),
            }
        })
        .collect()
}

fn node_message(run: RunRef<'_>, i: usize, now: Instant) -> JobNode {
    let n = &run.idx.plan.nodes[i];
    let rec = &run.nodes[i];
    let soft = run.soft.map(|s| &s.nodes[i]);
    let reported = soft
        .and_then(|s| s.status.as_ref())
        .filter(|st| st.generation == run.meta.generation);
    let mut status = match reported {
        Some(st) => st.clone(),
        None => NodeStatus {
            job: run.meta.name.clone(),
            node: n.name.clone(),
            generation: run.meta.generation,
            ..Default::default()
        },
    };
    // The record is authoritative for what the controller decided (an ended node stays
    // ended, a missing node is missing even if no agent says so).
    if reported.is_none() || rec.state.is_ended() {
        status.state = rec.state.to_proto() as i32;
        status.exit_code = rec.exit_code;
        if status.log_tail.is_empty() {
            status.log_tail.clone_from(&rec.log_tail);
        }
        if status.error.is_empty() {
            status.error.clone_from(&rec.error);
        }
        if status.started_at_ms == 0 {
            status.started_at_ms = rec.started_at_ms;
        }
        if status.finished_at_ms == 0 {
            status.finished_at_ms = rec.finished_at_ms;
        }
    }
    if status.ip.is_empty()
        && let Some(ip) = rec.ip
    {
        status.ip = ip.to_string();
    }
    JobNode {
        name: n.name.clone(),
        role: n.role.as_str().to_owned(),
        party: n.party.clone(),
        host: n.host.clone(),
        status: Some(status),
        heartbeat_age_ms: soft.and_then(|s| s.last_report).map_or(0, |t| {
            u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)
        }),
        iterations_per_s: soft.map_or(0.0, |s| s.iterations_per_s(now)),
        end: rec.end.clone(),
    }
}

/// The `ContainerSpec` of node `i` of a run (see [`crate::workloads::Workloads::containers_for`]).
/// Deterministic: made from persisted records only.
pub fn container_spec(
    meta: &JobMeta,
    idx: &PlanIndex,
    rec: &NodeRecord,
    i: usize,
    may_sandbox: bool,
) -> ContainerSpec {
    let n = &idx.plan.nodes[i];
    let base = node_container_spec(&idx.plan, n);
    ContainerSpec {
        env: rec
            .env
            .as_ref()
            .map(|e| e.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        generation: meta.generation,
        start: rec.started(),
        // no sandbox before every host checked the job's bind sources and has its image
        sandbox: base.sandbox && may_sandbox,
        ..base
    }
}

/// What a node's `ContainerSpec` holds before it is deployed: everything but its resolved
/// env (here: the plan's, with address placeholders), generation and `start`. Also what the
/// size limits at submit measure.
pub fn node_container_spec(plan: &Plan, n: &Node) -> ContainerSpec {
    let regex = &plan.progress.regex;
    ContainerSpec {
        job: plan.job.clone(),
        node: n.name.clone(),
        role: n.role.as_str().to_owned(),
        party: n.party.clone(),
        image: n.image.clone(),
        command: n.command.clone(),
        env: n.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        host_network: plan.network == Network::Pseudo,
        gpus: n.gpus,
        generation: 0,
        progress_regex: if regex == geomx_job::DEFAULT_PROGRESS_REGEX {
            String::new()
        } else {
            regex.clone()
        },
        finished_regex: plan.progress.finished.clone().unwrap_or_default(),
        start: false,
        // only a node whose env names its own address needs it before it starts
        sandbox: plan.network != Network::Pseudo && n.depends_on().contains(&n.name),
        mounts: n
            .mounts
            .iter()
            .map(|m| Mount {
                r#type: match m.kind {
                    MountType::Bind => "bind",
                    MountType::Volume => "volume",
                }
                .to_owned(),
                source: m.source.clone(),
                target: m.target.clone(),
                readonly: m.readonly,
                driver: m.driver.clone().unwrap_or_default(),
                options: m
                    .options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect(),
        resources: Some(Resources {
            memory_bytes: n.resources.memory.unwrap_or(0),
            cpus: n.resources.cpus.map_or(0.0, |c| c.0),
            pids: n.resources.pids.unwrap_or(0),
            shm_size_bytes: n.resources.shm_size.unwrap_or(0),
        }),
        templates: Vec::new(),
        image_pull: plan.image_pull.as_str().to_owned(),
        pull_timeout_ms: u64::try_from(plan.policy.pull_timeout.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The API form of a stored event.
pub fn event_message(e: EventRecord) -> Event {
    Event {
        at_ms: e.at_ms,
        job: e.job,
        kind: e.kind,
        message: e.message,
        node: e.node,
        host: e.host,
        generation: e.generation,
    }
}

/// A job with every age zeroed: two of them are equal when nothing but time passed.
pub fn without_ages(job: &Job) -> Job {
    let mut j = job.clone();
    for n in &mut j.nodes {
        n.heartbeat_age_ms = 0;
    }
    j
}
