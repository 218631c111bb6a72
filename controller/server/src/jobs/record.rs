//! What the jobs layer persists in sled, and under which keys.
//!
//! Every submission of a job name is a *run* (1, 2, ...). A run's records live in the `jobs`
//! tree under `run/<name>/<run, 10 digits>/...`:
//!
//! | key | value |
//! |---|---|
//! | `current/<name>` | the run number of the name's latest run ([`CurrentRecord`]) |
//! | `run/<name>/<run>/meta` | phase, counters, times ([`JobMeta`]) |
//! | `run/<name>/<run>/source` | the job file and the compiled plan ([`JobSource`], written once) |
//! | `run/<name>/<run>/node/<node>` | one node of the current generation ([`NodeRecord`]) |
//!
//! A finished name may be submitted again: the new run gets the next number and the old
//! run's records and events stay where they are (history; `GetJob`/`JobEvents` accept
//! `<name>#<run>` to read them). Events of a run are kept in the `events` tree under the scope
//! `job/<name>#<run>` ([`event_scope`]).
//!
//! Only transitions are written (a node's state, its sandbox IP, its resolved environment
//! when it is started, the job's phase); heartbeats (progress, heartbeat times) stay in memory.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use geomx_job::Plan;
use geomx_proto::v1::{ContainerState, JobPhase};
use serde::{Deserialize, Serialize};

/// Phase of a job (mirrors `geomx.v1.JobPhase`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted, nothing started yet (routed: waiting for the schedulers' sandbox IPs).
    #[default]
    Pending,
    /// Accepted; some hosts are pulling the job's image. Nothing of the job starts (no
    /// sandbox, no container) before every host has it; then Pending.
    Pulling,
    /// Schedulers, then servers and workers are being started.
    Starting,
    /// Every node runs (or, for a node that is not a training worker, ended with 0).
    Running,
    /// Every training worker exited 0.
    Succeeded,
    /// A node failed, stalled, disappeared or lost its host.
    Failed,
    /// Cancelled by a user (`JobMeta::cancelled_by` names the token).
    Cancelled,
    /// Failed and being restarted as a whole: its containers are being removed.
    Restarting,
}

impl Phase {
    /// Every phase, in the order of a job's life.
    pub const ALL: [Phase; 8] = [
        Phase::Pulling,
        Phase::Pending,
        Phase::Starting,
        Phase::Running,
        Phase::Restarting,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// True once the job has ended (Succeeded, Failed, Cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }

    /// True while the job's containers belong in the desired state.
    pub fn runs_containers(self) -> bool {
        matches!(
            self,
            Phase::Pulling | Phase::Pending | Phase::Starting | Phase::Running
        )
    }

    /// The name people see: `Pending`, `Running`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Pulling => "Pulling",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
            Phase::Restarting => "Restarting",
        }
    }

    /// The API enum.
    pub fn to_proto(self) -> JobPhase {
        match self {
            Phase::Pending => JobPhase::Pending,
            Phase::Pulling => JobPhase::Pulling,
            Phase::Starting => JobPhase::Starting,
            Phase::Running => JobPhase::Running,
            Phase::Succeeded => JobPhase::Succeeded,
            Phase::Failed => JobPhase::Failed,
            Phase::Cancelled => JobPhase::Cancelled,
            Phase::Restarting => JobPhase::Restarting,
        }
    }
}

/// State of a node as last recorded (mirrors `geomx.v1.ContainerState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not created yet (routed: only its sandbox may exist).
    #[default]
    Pending,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Ended with exit code 0.
    Exited,
    /// Ended with a non-zero exit code, or could not start.
    Failed,
    /// Gone although it was expected.
    Missing,
    /// Still running (or created) when its job ended: stopped by geomx then.
    Stopped,
}

impl NodeState {
    /// From the API enum; `None` for an unspecified or unknown value.
    pub fn from_proto(state: i32) -> Option<NodeState> {
        match ContainerState::try_from(state).ok()? {
            ContainerState::Unspecified => None,
            ContainerState::Pending => Some(NodeState::Pending),
            ContainerState::Created => Some(NodeState::Created),
            ContainerState::Running => Some(NodeState::Running),
            ContainerState::Exited => Some(NodeState::Exited),
            ContainerState::Failed => Some(NodeState::Failed),
            ContainerState::Missing => Some(NodeState::Missing),
            ContainerState::Stopped => Some(NodeState::Stopped),
        }
    }

    /// The API enum.
    pub fn to_proto(self) -> ContainerState {
        match self {
            NodeState::Pending => ContainerState::Pending,
            NodeState::Created => ContainerState::Created,
            NodeState::Running => ContainerState::Running,
            NodeState::Exited => ContainerState::Exited,
            NodeState::Failed => ContainerState::Failed,
            NodeState::Missing => ContainerState::Missing,
            NodeState::Stopped => ContainerState::Stopped,
        }
    }

    /// True once the container has ended or is gone.
    pub fn is_ended(self) -> bool {
        matches!(
            self,
            NodeState::Exited | NodeState::Failed | NodeState::Missing | NodeState::Stopped
        )
    }

    /// `pending`, `running`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::Created => "created",
            NodeState::Running => "running",
            NodeState::Exited => "exited",
            NodeState::Failed => "failed",
            NodeState::Missing => "missing",
            NodeState::Stopped => "stopped",
        }
    }
}

/// The run number of a name's latest run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentRecord {
    /// Job name.
    pub name: String,
    /// Run number (1 for the first submission of the name).
    pub run: u32,
}

/// Phase, counters and times of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMeta {
    /// Job name.
    pub name: String,
    /// Run number of the name.
    pub run: u32,
    /// Current phase.
    pub phase: Phase,
    /// Why the job is in its phase (kept for Failed, Cancelled, Succeeded, Restarting).
    pub reason: String,
    /// Whole-job restarts so far.
    pub restarts: u32,
    /// Current attempt number (0 first, +1 per restart).
    pub generation: u32,
    /// Submission time (Unix ms).
    pub submitted_at_ms: i64,
    /// When the job last became Running (Unix ms), 0 if never.
    pub running_at_ms: i64,
    /// When the job ended (Unix ms), 0 while active.
    pub finished_at_ms: i64,
    /// Since when (Unix ms) the job is in its phase.
    pub phase_since_ms: i64,
    /// Whether the SchedulersUp event was recorded in this generation.
    #[serde(default)]
    pub schedulers_up: bool,
    /// The name of the token that submitted the run (see [`crate::auth::Caller`]); empty
    /// for runs recorded before callers were named.
    #[serde(default)]
    pub submitted_by: String,
    /// The name of the token that cancelled the run, once cancelled.
    #[serde(default)]
    pub cancelled_by: String,
}

/// The submitted job file and what it compiled to (written once per run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSource {
    /// The file name given at submission (for messages).
    pub file_name: String,
    /// The job file's text.
    pub job_toml: String,
    /// The compiled plan the run uses (stored, so a newer geomx-job does not change it).
    pub plan: Plan,
}

/// One node of a run, in its current generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Its IPv4 address as reported by its agent (routed: the sandbox's), once known.
    pub ip: Option<Ipv4Addr>,
    /// The resolved environment it was started with; `Some` once `start` was sent. Kept
    /// byte-identical for the whole generation (the agent replaces a container whose spec
    /// changes).
    pub env: Option<BTreeMap<String, String>>,
    /// Last recorded state.
    pub state: NodeState,
    /// Exit code once ended.
    pub exit_code: Option<i32>,
    /// Why it could not start or how it ended badly, from the agent.
    pub error: String,
    /// The last lines of its output, once ended.
    pub log_tail: Vec<String>,
    /// Container start time (Unix ms), 0 if unknown.
    pub started_at_ms: i64,
    /// Container end time (Unix ms), 0 while running.
    pub finished_at_ms: i64,
    /// When the controller recorded the node's end (Unix ms, the controller's clock; 0
    /// while it runs): the teardown window is measured with it.
    #[serde(default)]
    pub ended_seen_ms: i64,
    /// When the controller saw a training worker finish training without (yet) exiting:
    /// it printed `[progress].finished` or reached `[progress].iterations` (Unix ms, the
    /// controller's clock); 0 if not.
    #[serde(default)]
    pub training_done_ms: i64,
    /// How the node ended, for people ("exited 0", "stopped by geomx when the job
    /// ended", ...); set once its job ended.
    #[serde(default)]
    pub end: String,
    /// A scheduler's rendezvous as last announced in an event (see
    /// [`super::rendezvous::summary`]); empty for other nodes and until known.
    #[serde(default)]
    pub rendezvous: String,
}

impl NodeRecord {
    /// A fresh record (nothing known) for node `name`.
    pub fn new(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    /// True once `start` was sent for it in this generation.
    pub fn started(&self) -> bool {
        self.env.is_some()
    }
}

/// Key of `current/<name>`.
pub fn current_key(name: &str) -> String {
    format!("current/{name}")
}

/// Prefix of every `current/` key.
pub const CURRENT_PREFIX: &str = "current/";

/// Prefix of every record of one run.
pub fn run_prefix(name: &str, run: u32) -> String {
    format!("run/{name}/{run:010}/")
}

/// Key of a run's [`JobMeta`].
pub fn meta_key(name: &str, run: u32) -> String {
    format!("{}meta", run_prefix(name, run))
}

/// Key of a run's [`JobSource`].
pub fn source_key(name: &str, run: u32) -> String {
    format!("{}source", run_prefix(name, run))
}

/// Prefix of a run's [`NodeRecord`]s.
pub fn node_prefix(name: &str, run: u32) -> String {
    format!("{}node/", run_prefix(name, run))
}

/// Key of one [`NodeRecord`].
pub fn node_key(name: &str, run: u32, node: &str) -> String {
    format!("{}{node}", node_prefix(name, run))
}

/// The event scope of a run: `<name>#<run>`.
pub fn event_scope(name: &str, run: u32) -> String {
    format!("{name}#{run}")
}

/// Splits `name` or `name#run` (as users may write it) into the name and the run, if given.
pub fn parse_job_ref(s: &str) -> Option<(&str, Option<u32>)> {
    match s.split_once('#') {
        None => Some((s, None)),
        Some((name, run)) => run.parse().ok().map(|r| (name, Some(r))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_run_and_refs_parse() {
        assert!(meta_key("j", 2) < meta_key("j", 10));
        assert_eq!(
            node_key("j", 1, "a-worker-0"),
            "run/j/0000000001/node/a-worker-0"
        );
        assert!(node_key("j", 1, "x").starts_with(&node_prefix("j", 1)));
        assert_eq!(event_scope("j", 3), "j#3");
        assert_eq!(parse_job_ref("j"), Some(("j", None)));
        assert_eq!(parse_job_ref("j#3"), Some(("j", Some(3))));
        assert_eq!(parse_job_ref("j#x"), None);
    }

    #[test]
    fn phases_and_states() {
        assert!(Phase::Failed.is_terminal());
        assert!(!Phase::Restarting.is_terminal());
        assert!(!Phase::Restarting.runs_containers());
        assert!(Phase::Pending.runs_containers());
        for s in [
            NodeState::Pending,
            NodeState::Created,
            NodeState::Running,
            NodeState::Exited,
            NodeState::Failed,
            NodeState::Missing,
            NodeState::Stopped,
        ] {
            assert_eq!(NodeState::from_proto(s.to_proto() as i32), Some(s));
        }
        assert_eq!(NodeState::from_proto(0), None);
        assert_eq!(NodeState::from_proto(99), None);
        let json = serde_json::to_string(&Phase::Restarting).unwrap();
        assert_eq!(json, "\"restarting\"");
    }
}
