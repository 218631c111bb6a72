//! The seam between membership (this issue) and jobs (issue 5).
//!
//! [`crate::membership::Membership`] composes each host's `DesiredState` from its own
//! records (subnet, peers) and from a [`Workloads`] implementation (the role containers).
//! It hands every heartbeat to [`Workloads::host_reported`] and every membership change to
//! [`Workloads::host_changed`]. The jobs layer implements this trait, installs itself with
//! [`crate::membership::Membership::set_workloads`], and calls
//! [`crate::membership::Membership::publish`] (or `commit(batch, true)`) after changing
//! what [`Workloads::containers_for`] returns, so every watching agent gets its new state.

use geomx_proto::v1::{ContainerSpec, HostReport};
use tonic::Status;

/// A change of a host's membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostChange {
    /// Registered for the first time, or again after leaving.
    Joined,
    /// Silent for the grace period.
    Lost,
    /// Reported (or registered) again after being lost.
    Returned,
    /// Left the cluster.
    Left,
}

/// What runs on the hosts: the jobs layer.
#[tonic::async_trait]
pub trait Workloads: Send + Sync + 'static {
    /// The role containers `host` must run now. Called whenever a desired state is computed
    /// (for each watching host after every published change), so it must be cheap and must
    /// not call back into the membership's mutating methods.
    fn containers_for(&self, host: &str) -> Vec<ContainerSpec>;

    /// A heartbeat of `host` (already authenticated and recorded by the membership).
    /// An error is returned to the agent as the RPC's status.
    async fn host_reported(&self, host: &str, report: &HostReport) -> Result<(), Status> {
        let _ = (host, report);
        Ok(())
    }

    /// `host` changed membership state (after the change is durable and published).
    async fn host_changed(&self, host: &str, change: HostChange) {
        let _ = (host, change);
    }
}

/// No jobs: every host runs no role container.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoWorkloads;

#[tonic::async_trait]
impl Workloads for NoWorkloads {
    fn containers_for(&self, _host: &str) -> Vec<ContainerSpec> {
        Vec::new()
    }
}
