//! The seam between membership and jobs.
//!
//! The gRPC layer ([`crate::agents`]) composes each host's `DesiredState` from the
//! membership's part (subnet, peers) and from a [`Workloads`] implementation (the role
//! containers), and hands every heartbeat to [`Workloads::host_reported`] after the
//! membership recorded it. Membership changes reach the workloads through a subscription
//! ([`crate::membership::Membership::subscribe_changes`], forwarded to
//! [`Workloads::host_changed`] by the server): the membership holds no reference to the
//! jobs layer, which holds the membership. The jobs layer calls
//! [`crate::membership::Membership::publish`] (or `commit(batch, true)`) after changing
//! what [`Workloads::containers_for`] returns, so every watching agent gets its new state.

use geomx_proto::v1::{ContainerSpec, HostReport};

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
    /// Cordoned: no new placements.
    Cordoned,
    /// Uncordoned.
    Uncordoned,
    /// Forgotten: removed by an operator, or its lease expired.
    Removed,
}

/// Why the workloads refused a report.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The report is not acceptable as sent.
    #[error("{0}")]
    Invalid(String),
    /// The workloads cannot take the report now; the agent may retry.
    #[error("{0}")]
    Unavailable(String),
}

/// What runs on the hosts: the jobs layer.
#[tonic::async_trait]
pub trait Workloads: Send + Sync + 'static {
    /// The role containers `host` must run now. Called whenever a desired state is computed
    /// (for each watching host after every published change), so it must be cheap and must
    /// not call back into the membership's mutating methods.
    fn containers_for(&self, host: &str) -> Vec<ContainerSpec>;

    /// A heartbeat of `host` (already authenticated and recorded by the membership).
    /// An error is returned to the agent.
    async fn host_reported(&self, host: &str, report: &HostReport) -> Result<(), WorkloadError> {
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
