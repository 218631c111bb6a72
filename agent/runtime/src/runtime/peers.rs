//! Who has reached a scheduler that still waits: the TCP connections to its port (see
//! [`crate::rendezvous`]).

use super::*;

/// The variable holding the port a scheduler of `role` binds.
fn port_variable(role: &str) -> Option<&'static str> {
    match role {
        "scheduler" => Some("DMLC_PS_ROOT_PORT"),
        "global_scheduler" => Some("DMLC_PS_GLOBAL_ROOT_PORT"),
        _ => None,
    }
}

impl<E: Engine> Runtime<E> {
    /// Reads the peers connected to every running scheduler whose rendezvous is not
    /// complete, and publishes what changed. Best effort: a scheduler whose connections
    /// cannot be read keeps what was known.
    pub(super) fn poll_rendezvous(&self) {
        let targets: Vec<(NodeKey, String, u32, u16)> = {
            let st = self.lock();
            st.nodes
                .iter()
                .filter(|(_, t)| {
                    t.status.state == NodeState::Running
                        && t.pid > 0
                        && t.status.rendezvous.as_ref().is_some_and(|r| !r.complete)
                })
                .filter_map(|(k, t)| {
                    let spec = st.desired.as_ref()?.get(k)?;
                    let port = spec.env.get(port_variable(&t.status.role)?)?.parse().ok()?;
                    Some((k.clone(), t.status.container_id.clone(), t.pid, port))
                })
                .collect()
        };
        let mut changed = false;
        for (key, id, pid, port) in targets {
            let peers = match self.inner.engine.established_peers(pid, port) {
                Ok(p) => p,
                Err(e) => {
                    debug!(job = %key.0, node = %key.1, error = %e, "cannot read the scheduler's connections");
                    continue;
                }
            };
            let mut st = self.lock();
            if let Some(t) = st.nodes.get_mut(&key)
                && t.status.container_id == id
                && let Some(r) = &mut t.status.rendezvous
            {
                changed |= r.set_connected(peers);
            }
        }
        if changed {
            self.publish();
        }
    }
}
