//! The JSON form of the API's messages, one for every reader: `geomxctl --output json` prints
//! it and the controller's dashboard (`web_listen`) serves it, so scripts and the browser see
//! the same fields (documented with the messages in `geomx/v1/*.proto`; names are the proto
//! field names, phases as `Running`, container states as `running`).

use serde::Serialize;
use serde_json::{Value, json};

use crate::v1::{ContainerState, Event, Host, ImagePull, Job, JobNode, JobPhase};

/// `Pending`, `Running`, ...
pub fn phase_name(phase: i32) -> &'static str {
    match JobPhase::try_from(phase) {
        Ok(JobPhase::Pending) => "Pending",
        Ok(JobPhase::Pulling) => "Pulling",
        Ok(JobPhase::Starting) => "Starting",
        Ok(JobPhase::Running) => "Running",
        Ok(JobPhase::Succeeded) => "Succeeded",
        Ok(JobPhase::Failed) => "Failed",
        Ok(JobPhase::Cancelled) => "Cancelled",
        Ok(JobPhase::Restarting) => "Restarting",
        _ => "Unknown",
    }
}

/// `pending`, `running`, `exited`, `failed`, ...
pub fn state_name(state: i32) -> &'static str {
    match ContainerState::try_from(state) {
        Ok(ContainerState::Pending) => "pending",
        Ok(ContainerState::Created) => "created",
        Ok(ContainerState::Running) => "running",
        Ok(ContainerState::Exited) => "exited",
        Ok(ContainerState::Failed) => "failed",
        Ok(ContainerState::Missing) => "missing",
        Ok(ContainerState::Stopped) => "stopped",
        _ => "-",
    }
}

/// The JSON form of a job (nodes included when the job has them).
pub fn job_json(j: &Job) -> Value {
    let mut v = json!({
        "name": j.name,
        "mode": j.mode,
        "phase": phase_name(j.phase),
        "reason": j.reason,
        "restarts": j.restarts,
        "max_restarts": j.max_restarts,
        "generation": j.generation,
        "submitted_at_ms": j.submitted_at_ms,
        "running_at_ms": j.running_at_ms,
        "finished_at_ms": j.finished_at_ms,
        "node_count": j.node_count,
        "running_nodes": j.running_nodes,
        "image": j.image,
        "image_digest": j.image_digest,
        "image_pull": j.image_pull,
        "submitted_by": j.submitted_by,
        "cancelled_by": j.cancelled_by,
    });
    if !j.pulls.is_empty() {
        v["pulls"] = Value::Array(
            j.pulls
                .iter()
                .filter_map(|p| Some((p.host.as_str(), p.pull.as_ref()?)))
                .map(|(host, p)| pull_json(host, p))
                .collect(),
        );
    }
    if !j.nodes.is_empty() {
        v["nodes"] = Value::Array(j.nodes.iter().map(node_json).collect());
    }
    if !j.rendezvous.is_empty() {
        v["rendezvous"] = Value::Array(
            j.rendezvous
                .iter()
                .map(|r| {
                    json!({
                        "scheduler": r.scheduler,
                        "host": r.host,
                        "registered": r.registered,
                        "expected": r.expected,
                        "waiting": r.waiting,
                        "complete": r.complete,
                        "summary": r.summary,
                    })
                })
                .collect(),
        );
    }
    v
}

/// The JSON form of one host's image pull.
pub fn pull_json(host: &str, p: &ImagePull) -> Value {
    json!({
        "host": host,
        "image": p.image,
        "registry": p.registry,
        "state": p.state,
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
        "layers_done": p.layers_done,
        "layers_total": p.layers_total,
        "attempt": p.attempt,
        "error": p.error,
        "started_at_ms": p.started_at_ms,
        "updated_at_ms": p.updated_at_ms,
    })
}

/// The JSON form of a node.
pub fn node_json(n: &JobNode) -> Value {
    let s = n.status.clone().unwrap_or_default();
    let p = s.progress.clone();
    json!({
        "name": n.name,
        "role": n.role,
        "party": n.party,
        "host": n.host,
        "ip": s.ip,
        "state": state_name(s.state),
        "end": n.end,
        "exit_code": s.exit_code,
        "error": s.error,
        "log_tail": s.log_tail,
        "generation": s.generation,
        "container_id": s.container_id,
        "restarts": s.restarts,
        "started_at_ms": s.started_at_ms,
        "finished_at_ms": s.finished_at_ms,
        "heartbeat_age_ms": n.heartbeat_age_ms,
        "iterations_per_s": n.iterations_per_s,
        "progress": p.map(|p| json!({
            "epoch": p.epoch,
            "iteration": p.iteration,
            "accuracy": p.accuracy,
            "observed_at_ms": p.observed_at_ms,
            "metrics": p.metrics,
        })),
    })
}

/// An event in `--output json`.
pub fn event_json(e: &Event) -> Value {
    json!({
        "at_ms": e.at_ms,
        "kind": e.kind,
        "message": e.message,
        "node": e.node,
        "host": e.host,
        "generation": e.generation,
    })
}

/// A host in `--output json`.
#[derive(Debug, Serialize)]
pub struct HostJson<'a> {
    name: &'a str,
    underlay_ip: &'a str,
    subnet: &'a str,
    state: &'a str,
    heartbeat_age_ms: u64,
    agent_version: &'a str,
    network_converged: bool,
    network_error: &'a str,
    links: Vec<LinkJson<'a>>,
    containers: u32,
    agent_url: &'a str,
    registered_at_ms: i64,
    images: &'a [String],
    cordoned: bool,
    scheduling: &'static str,
    /// The WireGuard public key the host registered (`null`: none).
    wireguard_public_key: Option<&'a str>,
    /// Its WireGuard UDP port (`null`: none).
    wireguard_port: Option<u32>,
}

/// One peer link in `--output json`.
#[derive(Debug, Serialize)]
pub struct LinkJson<'a> {
    peer: &'a str,
    backend: &'a str,
    rtt_ms: f64,
    loss_pct: f64,
    /// Seconds since the last WireGuard handshake (`null`: never, or not WireGuard).
    handshake_age_s: Option<i64>,
}

/// `enabled` or `cordoned`.
pub fn scheduling(h: &Host) -> &'static str {
    if h.cordoned { "cordoned" } else { "enabled" }
}

/// The JSON form of a host (`geomxctl hosts --output json`, the dashboard's cluster).
pub fn host_json(h: &Host) -> HostJson<'_> {
    HostJson {
        name: &h.name,
        underlay_ip: &h.underlay_ip,
        subnet: &h.subnet,
        state: &h.state,
        heartbeat_age_ms: h.heartbeat_age_ms,
        agent_version: &h.agent_version,
        network_converged: h.network_converged,
        network_error: &h.network_error,
        links: h
            .links
            .iter()
            .map(|l| LinkJson {
                peer: &l.peer,
                backend: &l.backend,
                rtt_ms: l.rtt_ms,
                loss_pct: l.loss_pct,
                handshake_age_s: (l.handshake_age_s >= 0).then_some(l.handshake_age_s),
            })
            .collect(),
        containers: h.containers,
        agent_url: &h.agent_url,
        registered_at_ms: h.registered_at_ms,
        images: &h.images,
        cordoned: h.cordoned,
        scheduling: scheduling(h),
        wireguard_public_key: (!h.wireguard_public_key.is_empty())
            .then_some(h.wireguard_public_key.as_str()),
        wireguard_port: (h.wireguard_port != 0).then_some(h.wireguard_port),
    }
}
