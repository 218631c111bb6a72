//! Inspecting a container and turning what Docker says into the node's state.

use super::*;

/// The inspections of one container in flight. Every Docker event spawns its own refresh,
/// and Docker may answer two inspections of one container in any order: each refresh
/// takes a ticket before it asks, and its answer is applied only if no later-asked one has
/// been applied already (a stale answer would flip the node's state until the next
/// resync). Any change of a container comes with an event, whose refresh asks after the
/// change: the last ticket applied always reflects the container's latest state.
#[derive(Debug, Default)]
pub(super) struct RefreshOrder {
    /// Tickets handed out.
    issued: u64,
    /// The latest ticket whose answer was applied.
    applied: u64,
    /// Refreshes not finished.
    in_flight: u32,
}

/// A refresh's ticket; gives the slot back when the refresh ends, however it ends.
struct Ticket<'a, E: Engine> {
    rt: &'a Runtime<E>,
    id: &'a str,
    n: u64,
}

impl<E: Engine> Ticket<'_, E> {
    /// Whether this answer may be applied (no later-asked one was); if so, it is the
    /// latest applied from now on.
    fn accept(&self, st: &mut State) -> bool {
        let Some(order) = st.refreshes.get_mut(self.id) else {
            return false;
        };
        if order.applied > self.n {
            debug!(id = %short(self.id), ticket = self.n, applied = order.applied, "a stale inspection is dropped");
            return false;
        }
        order.applied = self.n;
        true
    }

    /// Whether this answer is still the latest applied (after an await in between).
    fn still_latest(&self, st: &State) -> bool {
        st.refreshes
            .get(self.id)
            .is_some_and(|o| o.applied == self.n)
    }
}

impl<E: Engine> Drop for Ticket<'_, E> {
    fn drop(&mut self) {
        let mut st = self.rt.lock();
        if let Some(order) = st.refreshes.get_mut(self.id) {
            order.in_flight = order.in_flight.saturating_sub(1);
            if order.in_flight == 0 {
                st.refreshes.remove(self.id);
            }
        }
    }
}

impl<E: Engine> Runtime<E> {
    fn ticket<'a>(&'a self, id: &'a str) -> Ticket<'a, E> {
        let mut st = self.lock();
        let order = st.refreshes.entry(id.to_string()).or_default();
        order.issued += 1;
        order.in_flight += 1;
        Ticket {
            rt: self,
            id,
            n: order.issued,
        }
    }

    /// Re-reads one container's state from Docker and publishes the change; once a role
    /// container has ended, fetches its log tail. Answers are applied in the order they
    /// were asked for (see [`RefreshOrder`]).
    pub(super) async fn refresh(&self, id: &str) {
        let ticket = self.ticket(id);
        let insp = match self.inner.engine.inspect(id).await {
            Ok(i) => i,
            Err(e) => {
                warn!(id = %short(id), error = %e, "inspect failed");
                return;
            }
        };
        let Some(insp) = insp else {
            if ticket.accept(&mut self.lock()) {
                self.on_gone(id);
            }
            return;
        };
        self.decide_docker_loss(&insp.id).await;
        let need_tail = {
            let mut st = self.lock();
            if !ticket.accept(&mut st) {
                return;
            }
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
                    t.pid = insp.pid;
                    t.host_network = insp.host_network;
                    let shown = t.status.clone();
                    apply_inspection(&mut t.status, &insp, self.inner.config.host_ip);
                    let ended = matches!(insp.state, EngineState::Exited | EngineState::Dead);
                    if ended && let Some(why) = &t.stopped_by_docker {
                        t.status.state = NodeState::Failed;
                        t.status.error.clone_from(why);
                    }
                    if insp.state == EngineState::Running {
                        // running again after it ended (started by someone: geomx sets no
                        // restart policy): follow it again, after the output already read
                        t.finalized = false;
                        t.exit_counted = false;
                        t.status.log_tail.clear();
                        drop(st);
                        self.ensure_follower(&key, id, true);
                        None
                    } else if ended && !t.finalized {
                        // counted once per end (finalized until it runs again)
                        if !t.exit_counted {
                            t.exit_counted = true;
                            self.inner
                                .config
                                .counters
                                .container_exited(t.status.state == NodeState::Exited);
                        }
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
            // (a later answer applied meanwhile is newer: this one is dropped)
            if ticket.still_latest(&st)
                && let Some((key, ContainerKind::Role)) = st.find(id)
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
}

pub(super) fn apply_sandbox_inspection(t: &mut Tracked, i: &Inspection) {
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

pub(super) fn apply_inspection(s: &mut NodeStatus, i: &Inspection, host_ip: Option<Ipv4Addr>) {
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

pub(super) fn same_phase(engine: EngineState, ours: NodeState, finalized: bool) -> bool {
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
