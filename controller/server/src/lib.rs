//! `geomx-controller`: the geomx control plane.
//!
//! * [`config`]: the configuration file, flags and environment.
//! * [`store`]: the sled state (hosts, leases, jobs, events) with durable, atomic batches.
//! * [`leases`]: carving host subnets out of the cluster CIDR.
//! * [`membership`]: registration, heartbeats, loss detection, each host's desired state.
//! * [`workloads`]: the seam where the jobs layer adds role containers and sees reports.
//! * [`auth`]: who may call which service (agent certificates, user tokens and their roles).
//! * [`credentials`]: the tokens and the revocation list in force, reloaded without restart.
//! * [`jobs`]: the jobs layer (submission, placement, state machine, heartbeat aggregation)
//!   and its gRPC service.
//! * [`agents`], [`hosts`]: the other gRPC services.
//! * [`server`]: wiring, health, reflection, graceful shutdown.
//! * [`metrics`]: the Prometheus registry; [`web`]: the `web_listen` HTTPS listener that
//!   serves it at `/metrics`.
//!
//! Start one in-process with [`start`] (see [`server`]).

#![warn(missing_docs)]

pub mod agents;
pub mod auth;
pub mod backup;
pub mod config;
pub mod credentials;
pub mod dashboard;
pub mod hosts;
pub mod jobs;
pub mod leases;
pub mod membership;
pub mod metrics;
pub mod server;
pub mod store;
pub mod validate;
pub mod web;
pub mod workloads;

pub use config::{Args, ControllerConfig};
pub use jobs::JobOptions;
pub use server::{RunningController, ServerError, start, start_with_options, start_with_workloads};
