//! The schedulers' rendezvous, as their agents report it (issue 17, item 3).
//!
//! ps-lite polls forever while a registration is missing: a node that never started, a
//! count short, a blocked port. Each scheduler's agent reports what it sees
//! (`NodeStatus.rendezvous`: the scheduler's `PS_VERBOSE=1` lines and the peers connected to
//! its port, see the agent's `geomx_runtime::rendezvous`); here those addresses are matched
//! to the job's nodes, giving per scheduler "k of n registered, waiting for: <nodes>" for
//! `geomxctl status` and events, and the nodes to name when
//! `[policy].rendezvous_timeout` passes.
//!
//! A scheduler's members are the nodes whose `DMLC_PS_ROOT_URI`/`PORT` (local layer) or
//! `DMLC_PS_GLOBAL_ROOT_URI`/`PORT` (global layer) are its own. A member counts as
//! registered once the scheduler logged that all are connected, once a training worker of
//! its layer reports progress (ps-lite trains only after the rendezvous), or once its
//! address is among the scheduler's registrations or connected peers — when no other
//! member shares that address (host networking: every node has the host's address, so only
//! the completion tells). A scheduler with `PS_VERBOSE=0`, or whose agent reports no
//! rendezvous (older agents), is not followed.

use std::collections::BTreeMap;

use geomx_job::{Plan, Role};

use super::engine::{JobSoft, PlanIndex, list_names};
use super::record::{NodeRecord, NodeState};

/// The members of every scheduler (by position; empty for other nodes).
pub fn members(plan: &Plan) -> Vec<Vec<usize>> {
    // (URI, port) of a node's scheduler of one layer
    let scheduler_of = |n: &geomx_job::Node, global: bool| {
        let (uri, port) = if global {
            ("DMLC_PS_GLOBAL_ROOT_URI", "DMLC_PS_GLOBAL_ROOT_PORT")
        } else {
            ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT")
        };
        Some((n.env.get(uri)?.clone(), n.env.get(port)?.clone()))
    };
    let mut out = vec![Vec::new(); plan.nodes.len()];
    for (s, sched) in plan.nodes.iter().enumerate() {
        let global = match sched.role {
            Role::Scheduler => false,
            Role::GlobalScheduler => true,
            _ => continue,
        };
        let Some(own) = scheduler_of(sched, global) else {
            continue;
        };
        out[s] = plan
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                !n.role.is_scheduler() && scheduler_of(n, global).as_ref() == Some(&own)
            })
            .map(|(i, _)| i)
            .collect();
    }
    out
}

/// One followed scheduler's rendezvous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    /// The scheduler (position in the plan).
    pub scheduler: usize,
    /// Its members that registered.
    pub registered: Vec<usize>,
    /// Its members not (known to be) registered yet.
    pub waiting: Vec<usize>,
    /// The rendezvous is complete.
    pub complete: bool,
    /// ps-lite's own count while waiting (the global scheduler's `K--N`), if logged.
    pub counted: Option<(u32, u32)>,
}

impl Wait {
    /// The registrations expected.
    pub fn expected(&self) -> usize {
        self.registered.len() + self.waiting.len()
    }
}

/// The rendezvous of every followed scheduler of a run that is starting or running
/// (`rec(i)`: node `i`'s record), in plan order.
pub fn of_run<'a>(
    idx: &PlanIndex,
    rec: impl Fn(usize) -> &'a NodeRecord,
    soft: &JobSoft,
) -> Vec<Wait> {
    let mut out = Vec::new();
    for &s in &idx.schedulers {
        let n = &idx.plan.nodes[s];
        if n.env.get("PS_VERBOSE").is_some_and(|v| v.trim() == "0")
            || rec(s).state != NodeState::Running
        {
            continue;
        }
        let Some(r) = soft.nodes[s]
            .status
            .as_ref()
            .and_then(|st| st.rendezvous.as_ref())
        else {
            continue;
        };
        let members = &idx.members[s];
        let trained = members
            .iter()
            .any(|&m| idx.training[m] && soft.nodes[m].progress_key.is_some());
        let complete = r.complete || trained;
        let mut by_ip: BTreeMap<String, usize> = BTreeMap::new();
        for &m in members {
            if let Some(ip) = rec(m).ip {
                *by_ip.entry(ip.to_string()).or_default() += 1;
            }
        }
        let seen = |m: usize| {
            let Some(ip) = rec(m).ip.map(|ip| ip.to_string()) else {
                return false;
            };
            by_ip.get(&ip) == Some(&1)
                && (r.connected.contains(&ip) || r.registered.iter().any(|g| g.ip == ip))
        };
        let (registered, waiting): (Vec<usize>, Vec<usize>) =
            members.iter().partition(|&&m| complete || seen(m));
        out.push(Wait {
            scheduler: s,
            registered,
            waiting,
            complete,
            counted: (!complete && r.expected > 0).then_some((r.count, r.expected)),
        });
    }
    out
}

/// "a-worker-1 (host b)", for a list of nodes.
fn with_hosts(idx: &PlanIndex, nodes: &[usize]) -> String {
    list_names(
        nodes
            .iter()
            .map(|&i| {
                format!(
                    "{} (host {})",
                    idx.plan.nodes[i].name, idx.plan.nodes[i].host
                )
            })
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
        16,
    )
}

/// One scheduler's rendezvous for people: "scheduler a-scheduler (host a): 2 of 3
/// registered, waiting for: a-worker-1 (host b)".
pub fn summary(idx: &PlanIndex, w: &Wait) -> String {
    let n = &idx.plan.nodes[w.scheduler];
    let head = format!(
        "scheduler {} (host {}): {} of {} registered",
        n.name,
        n.host,
        w.registered.len(),
        w.expected()
    );
    if w.complete || w.waiting.is_empty() {
        return format!("{head}, rendezvous complete");
    }
    let counted = w
        .counted
        .map(|(k, of)| format!(" (ps-lite counts {k} of {of})"))
        .unwrap_or_default();
    format!(
        "{head}{counted}, waiting for: {}",
        with_hosts(idx, &w.waiting)
    )
}

/// The nodes to blame when the rendezvous times out: those some scheduler waits for that
/// are not registered with another scheduler still waiting itself (a party server that
/// waits for its own party's rendezvous before it registers globally is not the cause).
pub fn never_registered(waits: &[Wait]) -> Vec<usize> {
    let blocked = |m: usize| {
        waits
            .iter()
            .any(|w| !w.complete && !w.waiting.is_empty() && w.registered.contains(&m))
    };
    let mut out: Vec<usize> = waits
        .iter()
        .filter(|w| !w.complete)
        .flat_map(|w| w.waiting.iter().copied())
        .filter(|&m| !blocked(m))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Why the job fails when the rendezvous did not complete in time (`waited`).
pub fn timeout_reason(
    idx: &PlanIndex,
    waits: &[Wait],
    waited: std::time::Duration,
    timeout: std::time::Duration,
) -> String {
    let missing = never_registered(waits);
    let who = missing
        .iter()
        .map(|&i| {
            let n = &idx.plan.nodes[i];
            format!("{} ({}) on host {}", n.name, n.role.as_str(), n.host)
        })
        .collect::<Vec<_>>();
    let mut text = format!(
        "rendezvous timed out after {} (rendezvous_timeout {}): {} never registered",
        humantime::format_duration(std::time::Duration::from_secs(waited.as_secs())),
        humantime::format_duration(timeout),
        if who.is_empty() {
            "some node".to_owned()
        } else {
            list_names(who.iter().map(String::as_str), 16)
        }
    );
    for w in waits
        .iter()
        .filter(|w| !w.complete && !w.waiting.is_empty())
    {
        text.push('\n');
        text.push_str(&summary(idx, w));
    }
    text
}
