//! Watching Docker: its events, the periodic resync, containers that disappear.

use super::inspect::same_phase;
use super::*;

impl<E: Engine> Runtime<E> {
    /// A container disappeared: if its node is still desired it is Missing, otherwise
    /// forgotten.
    pub(super) fn on_gone(&self, id: &str) {
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

    pub(super) async fn resync(&self) {
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
            None => match self.list_owned().await {
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
        self.poll_rendezvous();
        // suspects Docker no longer has were removed meanwhile: nothing to judge
        let known: BTreeSet<&str> = actual.iter().map(|c| c.id.as_str()).collect();
        let mut st = self.lock();
        if let Some(loss) = &mut st.docker_lost {
            let before = loss.running.len();
            loss.running.retain(|id| known.contains(id.as_str()));
            let changed = loss.running.len() != before;
            if loss.running.is_empty() {
                st.docker_lost = None;
            }
            if changed {
                self.keep_docker_loss(&st);
            }
        }
    }

    pub(super) fn spawn_resync_loop(&self) {
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        let every = self.inner.config.resync_interval;
        let pulls = self.inner.pulls.clone();
        let resync = async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                    // a pull ended: create what waited for it (or fail it) at once
                    () = pulls.ended().notified() => {}
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

    pub(super) fn spawn_event_loop(&self) {
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
}

pub(super) fn mark_missing(t: &mut Tracked, kind: ContainerKind) {
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
