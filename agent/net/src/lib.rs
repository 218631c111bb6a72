//! geomx-net: the host network of a geomx agent, owned and reconciled.
//!
//! Every container of a GeoMX job must reach every other container directly by its own IP
//! (ps-lite binds and advertises the container's address on random ports). On each host the
//! [`Reconciler`] makes that true and keeps it true:
//!
//! 1. docker0's address (`bip` in daemon.json) is the first address of the host's subnet,
//!    `"ip-masq": false` (geomx owns masquerading) and, on Docker 28 or newer,
//!    `"allow-direct-routing": true`; Docker is restarted only when the file changed;
//! 2. one route per peer subnet, protocol [`ROUTE_PROTOCOL`] (247) in the main table, through
//!    the peer's backend ([`backend`]): via its underlay address (host-gw), through the
//!    WireGuard interface `geomx-wg`, or via its VTEP on the VXLAN interface `geomx-vxlan`
//!    (static FDB and neighbour entries); routes without the tag are never touched;
//! 3. nat chain [`NAT_CHAIN`] (cluster-internal traffic keeps its source, container traffic
//!    leaving the cluster is masqueraded), jumped to from position 1 of `POSTROUTING`, and
//!    filter chain [`FILTER_CHAIN`] (this host's containers may send; traffic to them is
//!    accepted only from the peers' subnets on the device they come through), jumped to
//!    right below `DOCKER-USER` in `FORWARD`; both written with one atomic
//!    `iptables-restore --noflush` per table;
//! 4. `net.ipv4.ip_forward = 1`.
//!
//! A pass is observe ([`observe`]), plan ([`plan::plan`], pure and table-tested), apply
//! (an executor that carries the steps out); [`Reconciler::pass`] says what next
//! ([`Action`]). The kernel and Docker sit behind the traits of [`kernel`];
//! [`Kernel::system`] is the real host, [`fake::FakeKernel`] an in-memory one for tests
//! (which can fail any chosen operation).
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

mod apply;
pub mod backend;
mod change;
mod config;
pub mod daemon_json;
mod desired;
mod error;
pub mod fake;
pub mod kernel;
mod lock;
mod observe;
pub mod plan;
mod reconcile;
pub mod rules;
mod status;
pub mod system;

pub use backend::{Backend, PeerBackend, VXLAN_INTERFACE, VXLAN_PORT, WG_INTERFACE, WG_PORT};
pub use change::Change;
pub use config::{
    DEFAULT_DAEMON_JSON, DEFAULT_DOCKER_HOST, DEFAULT_DOCKER_READY_TIMEOUT,
    DEFAULT_DOCKER_RESTART_COMMAND, DEFAULT_INTERVAL, DEFAULT_STATE_DIR, NetConfig, STATE_FILE,
};
pub use desired::{DesiredNetwork, Peer};
pub use error::{NetError, Result, ValidationError};
pub use kernel::Kernel;
pub use lock::{HostLock, LOCK_FILE};
pub use plan::{NetPlan, Step};
pub use reconcile::{Action, IP_FORWARD, PassOutcome, PassTrigger, Reconciler};
pub use rules::{FILTER_CHAIN, NAT_CHAIN};
pub use status::{ChainStatus, DaemonJsonStatus, NetworkStatus};

/// The route protocol number geomx tags its routes with (`proto 247` in `ip route`).
pub const ROUTE_PROTOCOL: u8 = 247;

#[cfg(test)]
mod tests;
