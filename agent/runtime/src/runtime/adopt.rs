//! Adopting the containers this agent created found on the host (see
//! [`crate::ownership`]), and forgetting leftovers.

use super::*;

impl<E: Engine> Runtime<E> {
    /// Forgets tracked nodes that are neither desired nor backed by a container.
    pub(super) fn drop_untracked_leftovers(&self) {
        let mut st = self.lock();
        let desired: BTreeSet<NodeKey> = st
            .desired
            .as_ref()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default();
        st.nodes.retain(|k, t| {
            desired.contains(k)
                || t.sandbox.is_some()
                || (!t.status.container_id.is_empty() && t.status.state != NodeState::Missing)
        });
    }

    /// Adopts the containers not tracked yet among `actual` (this agent's own, from
    /// [`Runtime::list_owned`]): status from labels and inspect, output followed from the
    /// start (progress is rebuilt, nothing is restarted), the heartbeat token derived
    /// again from the creation record.
    pub(super) async fn adopt_untracked(&self, actual: &[ActualContainer]) {
        let ids: BTreeSet<&str> = actual.iter().map(|c| c.id.as_str()).collect();
        let mut adopted = Vec::new();
        {
            let mut st = self.lock();
            for c in actual {
                let Some(key) = actual_key(c) else { continue };
                let kind = ContainerKind::of_labels(&c.labels);
                let current = st.nodes.get(&key).map(|t| match kind {
                    ContainerKind::Role => t.status.container_id.clone(),
                    ContainerKind::Sandbox => {
                        t.sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default()
                    }
                });
                let adopt = match current.as_deref() {
                    None | Some("") => true,
                    Some(cur) => cur != c.id && !ids.contains(cur),
                };
                if !adopt {
                    continue;
                }
                let desired = st.desired.as_ref().and_then(|d| d.get(&key));
                let regex = desired
                    .map(|s| s.progress_regex.clone())
                    .unwrap_or_else(|| c.labels.get(LABEL_PROGRESS_REGEX).cloned());
                let finished = desired.and_then(|s| s.finished_regex.clone());
                let parser = ProgressParser::with_finished(regex.as_deref(), finished.as_deref())
                    .unwrap_or_else(|_| default_parser());
                let t = st
                    .nodes
                    .entry(key.clone())
                    .or_insert_with(|| Tracked::from_labels(&key, c, parser.clone()));
                match kind {
                    ContainerKind::Role => {
                        let sandbox = t.sandbox.take();
                        let ip = std::mem::take(&mut t.status.ip);
                        *t = Tracked::from_labels(&key, c, parser);
                        t.sandbox = sandbox;
                        t.status.ip = ip;
                        t.status.container_id = c.id.clone();
                        t.auth = self
                            .inner
                            .config
                            .records
                            .get(&c.id)
                            .and_then(|e| self.token_of(&e));
                        t.status.state = match c.state {
                            EngineState::Created => NodeState::Created,
                            EngineState::Exited | EngineState::Dead => NodeState::Exited,
                            _ => NodeState::Running,
                        };
                    }
                    ContainerKind::Sandbox => {
                        t.sandbox = Some(SandboxStatus {
                            id: c.id.clone(),
                            name: c.name.clone(),
                            state: c.state,
                        });
                    }
                }
                info!(job = %key.0, node = %key.1, kind = kind.as_str(), id = %short(&c.id), "adopting a container");
                let label = c.labels.get(LABEL_SPEC).cloned().unwrap_or_default();
                st.seen.insert((key.0.clone(), key.1.clone(), kind), label);
                adopted.push((key, kind, c.id.clone()));
            }
        }
        for (key, kind, id) in &adopted {
            if *kind == ContainerKind::Role {
                self.ensure_follower(key, id, false);
            }
        }
        // sandboxes first: the role containers take their address
        adopted.sort_by_key(|(_, kind, _)| *kind);
        for (_, _, id) in &adopted {
            self.refresh(id).await;
        }
    }
}
