//! geomx-net: the host network of a geomx agent, owned and reconciled.
//!
//! Every container of a GeoMX job must reach every other container directly by its own IP
//! (ps-lite binds and advertises the container's address on random ports). On each host the
//! [`Reconciler`] makes that true and keeps it true:
//!
//! 1. docker0's address (`bip` in daemon.json) is the first address of the host's subnet,
//!    `"ip-masq": false` (geomx owns masquerading) and, on Docker 28 or newer,
//!    `"allow-direct-routing": true`; Docker is restarted only when the file changed;
//! 2. one route per peer subnet via the peer's underlay address, protocol
//!    [`ROUTE_PROTOCOL`] (247) in the main table: routes without that tag are never touched;
//! 3. nat chain [`NAT_CHAIN`] (cluster-internal traffic keeps its source, container traffic
//!    leaving the cluster is masqueraded) and filter chain [`FILTER_CHAIN`] (forwarding to
//!    and from the cluster is accepted), each jumped to once from position 1 of
//!    `POSTROUTING` / `FORWARD`;
//! 4. `net.ipv4.ip_forward = 1`.
//!
//! The kernel and Docker sit behind the traits of [`kernel`]; [`Kernel::system`] is the
//! real host, [`fake::FakeKernel`] an in-memory one for tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), geomx_net::NetError> {
//! use geomx_net::{DesiredNetwork, Kernel, NetConfig, Peer, Reconciler};
//! let config = NetConfig::new("a");
//! let kernel = Kernel::system(&config)?;
//! let mut reconciler = Reconciler::new(config, kernel);
//! let desired = DesiredNetwork {
//!     subnet: "172.17.34.0/24".parse().unwrap(),
//!     cluster: "172.17.0.0/16".parse().unwrap(),
//!     peers: vec![Peer {
//!         name: "b".into(),
//!         underlay_ip: "10.1.1.29".parse().unwrap(),
//!         subnet: "172.17.29.0/24".parse().unwrap(),
//!         wireguard_key: None,
//!         wireguard_port: None,
//!     }],
//!     backend: Default::default(),
//! };
//! for change in reconciler.reconcile(&desired).await? {
//!     println!("{change}");
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod backend;
mod config;
pub mod daemon_json;
mod desired;
mod error;
pub mod fake;
pub mod kernel;
mod lock;
mod reconcile;
pub mod rules;
mod status;
pub mod system;

pub use backend::{Backend, PeerBackend, WG_INTERFACE, WG_PORT};
pub use config::{
    DEFAULT_DAEMON_JSON, DEFAULT_DOCKER_HOST, DEFAULT_DOCKER_READY_TIMEOUT,
    DEFAULT_DOCKER_RESTART_COMMAND, DEFAULT_INTERVAL, DEFAULT_STATE_DIR, NetConfig, STATE_FILE,
};
pub use desired::{DesiredNetwork, Peer};
pub use error::{NetError, Result, ValidationError};
pub use kernel::Kernel;
pub use lock::{HostLock, LOCK_FILE};
pub use reconcile::{Change, IP_FORWARD, PassTrigger, Reconciler};
pub use rules::{FILTER_CHAIN, NAT_CHAIN};
pub use status::{ChainStatus, DaemonJsonStatus, NetworkStatus};

/// The route protocol number geomx tags its routes with (`proto 247` in `ip route`).
pub const ROUTE_PROTOCOL: u8 = 247;

#[cfg(test)]
mod tests;
