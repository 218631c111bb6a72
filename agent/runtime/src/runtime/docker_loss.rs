//! Docker going away: which role containers were stopped by a restart of Docker.

use super::*;

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
pub(super) struct DockerLoss {
    /// When the event stream ended (Unix ms).
    pub(super) at_ms: i64,
    /// The role containers that ran then, not judged yet.
    pub(super) running: BTreeSet<String>,
    /// The daemon that ran before, if its identity is known.
    pub(super) daemon_before: Option<String>,
    /// Docker did not answer right after the stream ended.
    pub(super) unreachable: bool,
    /// Once Docker answers again: whether it stopped its containers (restarted, without
    /// live-restore).
    pub(super) stopped: Option<bool>,
}

impl<E: Engine> Runtime<E> {
    /// Docker's event stream ended (see [`DockerLoss`]): remembers when, which role
    /// containers ran, which daemon that was, and whether Docker answers right after.
    pub(super) async fn on_event_stream_ended(&self) {
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
    pub(super) async fn decide_docker_loss(&self, id: &str) {
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
    pub(super) fn judge_docker_loss(&self, st: &mut State, insp: &Inspection) -> bool {
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
    pub(super) fn docker_loss_suspects(&self) -> Vec<String> {
        self.lock()
            .docker_lost
            .as_ref()
            .map(|l| l.running.iter().cloned().collect())
            .unwrap_or_default()
    }
}
