//! The real host: netlink, iptables, /proc/sys, the Docker API, files.

mod docker;
mod files;
mod iptables;
mod netlink;
mod sysctl;
mod vxlan;
mod wireguard;

use std::sync::Arc;

pub use self::docker::BollardDocker;
pub use self::files::{DaemonJsonFile, StateFile, write_atomic, write_secret};
pub use self::iptables::IptablesFirewall;
pub use self::netlink::NetlinkRoutes;
pub use self::sysctl::ProcSysctl;
pub use self::vxlan::NetlinkVxlan;
pub use self::wireguard::{WgTools, parse_dump};

use crate::config::NetConfig;
use crate::error::Result;
use crate::kernel::Kernel;

impl Kernel {
    /// The host the process runs on (its network namespace), as `config` describes it.
    /// Must be called from within a Tokio runtime (the netlink socket is driven by it).
    pub fn system(config: &NetConfig) -> Result<Kernel> {
        let routes = NetlinkRoutes::connect()?;
        let vxlan = NetlinkVxlan::new(routes.handle());
        Ok(Kernel {
            routes: Arc::new(routes),
            firewall: Arc::new(IptablesFirewall::new()?),
            sysctl: Arc::new(ProcSysctl),
            docker: Arc::new(BollardDocker::new(
                &config.docker_host,
                &config.docker_restart_command,
                config.docker_ready_timeout,
            )),
            daemon_config: Arc::new(DaemonJsonFile::new(&config.daemon_json)),
            state: Arc::new(StateFile::new(config.state_file())),
            wireguard: Arc::new(WgTools),
            vxlan: Arc::new(vxlan),
        })
    }
}
