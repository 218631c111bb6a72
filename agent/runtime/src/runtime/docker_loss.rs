//! Docker going away: which role containers were stopped by a restart of Docker.

use serde::{Deserialize, Serialize};

use super::*;

/// The file in the agent's state directory that keeps an undecided [`DockerLoss`] across
/// agent restarts (see [`RuntimeConfig::docker_loss_file`]).
pub const DOCKER_LOSS_FILE: &str = "docker-loss.json";

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
///
/// A host shutting down stops Docker first and the agent right after (the agent's unit is
/// ordered before docker.service): the loss is written to
/// [`RuntimeConfig::docker_loss_file`] the moment the stream ends, before anything else,
/// and the next agent judges it once Docker answers after the boot (another boot id is a
/// restart whatever the daemon's identity). Without that, a worker that exits 0 on SIGTERM
/// would count as finished after every reboot and the job would never be restarted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct DockerLoss {
    /// When the event stream ended (Unix ms).
    pub(super) at_ms: i64,
    /// The role containers that ran then, not judged yet.
    pub(super) running: BTreeSet<String>,
    /// The daemon that ran before, if its identity is known.
    pub(super) daemon_before: Option<String>,
    /// Docker did not answer right after the stream ended.
    pub(super) unreachable: bool,
    /// The host's boot id then (`/proc/sys/kernel/random/boot_id`), if known.
    #[serde(default)]
    pub(super) boot_id: Option<String>,
    /// Once Docker answers again: whether it stopped its containers (restarted, without
    /// live-restore).
    #[serde(skip)]
    pub(super) stopped: Option<bool>,
    /// Decided with another boot id than the loss's: the host rebooted.
    #[serde(skip)]
    pub(super) rebooted: bool,
}

/// This boot's id, if the kernel tells (a systemd-nspawn machine gets its own per boot).
pub(super) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The loss kept in `path` by an earlier agent, if any. An unreadable or corrupt file is
/// logged, moved aside (`.corrupt`) and treated as no loss.
pub(super) fn load_docker_loss(path: &Path) -> Option<DockerLoss> {
    let loss = crate::kept::read_json::<DockerLoss>(
        path,
        "Docker loss",
        "its containers are judged as if Docker had not gone away",
    )
    .unwrap_or_else(|e| {
        warn!(file = %path.display(), error = %e, "cannot read the kept Docker loss; ignoring it");
        None
    })?;
    if loss.running.is_empty() {
        return None;
    }
    info!(
        file = %path.display(),
        running = loss.running.len(),
        lost_at_ms = loss.at_ms,
        "Docker went away while the last agent ran (a reboot or a Docker restart): its containers will be judged when Docker answers"
    );
    Some(loss)
}

impl<E: Engine> Runtime<E> {
    /// Docker's event stream ended (see [`DockerLoss`]): remembers when, which role
    /// containers ran and which daemon that was, writes it down at once (a host shutting
    /// down stops the agent right after Docker), then whether Docker answers right after.
    pub(super) async fn on_event_stream_ended(&self) {
        let at_ms = now_ms();
        {
            let mut st = self.lock();
            let running: BTreeSet<String> = st
                .nodes
                .values()
                .filter(|t| {
                    t.status.state == NodeState::Running && !t.status.container_id.is_empty()
                })
                .map(|t| t.status.container_id.clone())
                .collect();
            let daemon_before = st.daemon_id.clone();
            match &mut st.docker_lost {
                // still judging an earlier loss: the containers that ran then stay suspects
                Some(loss) => loss.stopped = None,
                None => {
                    if running.is_empty() {
                        return;
                    }
                    st.docker_lost = Some(DockerLoss {
                        at_ms,
                        running,
                        daemon_before,
                        unreachable: false,
                        boot_id: boot_id(),
                        stopped: None,
                        rebooted: false,
                    });
                    self.keep_docker_loss(&st);
                }
            }
        }
        // a stopping dockerd has closed its socket: the call fails at once; a frozen one
        // does not answer (and stops nothing); a live one answers
        let probe =
            tokio::time::timeout(Duration::from_secs(2), self.inner.engine.list_managed()).await;
        let Ok(Err(e)) = probe else { return };
        let mut st = self.lock();
        if let Some(loss) = &mut st.docker_lost {
            if !loss.unreachable {
                warn!(
                    error = %e,
                    running = loss.running.len(),
                    "Docker went away; its running containers will be checked when it answers again"
                );
            }
            loss.unreachable = true;
            self.keep_docker_loss(&st);
        }
    }

    /// Writes the undecided loss to [`RuntimeConfig::docker_loss_file`], or removes the
    /// file when there is none (called under the state lock, so that writes keep order).
    pub(super) fn keep_docker_loss(&self, st: &State) {
        let Some(path) = &self.inner.config.docker_loss_file else {
            return;
        };
        let result = match &st.docker_lost {
            Some(loss) => serde_json::to_vec(loss)
                .map_err(std::io::Error::other)
                .and_then(|bytes| crate::ownership::write_atomic(path, &bytes)),
            None => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            warn!(file = %path.display(), error = %e, "cannot keep the Docker loss on disk (after an agent restart its containers' exits would count as ends of their own)");
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
            loss.rebooted =
                matches!((&loss.boot_id, boot_id()), (Some(then), Some(now)) if *then != now);
            let restarted = loss.rebooted
                || match (&loss.daemon_before, &now_id) {
                    (Some(before), Some(now)) => before != now,
                    _ => loss.unreachable,
                };
            info!(
                restarted,
                rebooted = loss.rebooted,
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
        let rebooted = loss.rebooted;
        if loss.running.is_empty() {
            st.docker_lost = None;
        }
        self.keep_docker_loss(st);
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
            let how = if rebooted {
                " at a reboot of the host"
            } else {
                ""
            };
            t.stopped_by_docker = Some(format!(
                "stopped by a restart of Docker on {host}{how} (it was running when Docker went away; its exit code says nothing about the training)"
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
