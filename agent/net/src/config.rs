//! Where the reconciler finds things on the host, and how often it re-checks.

use crate::backend::{Backend, WG_KEY_FILE, WG_PORT};
use std::path::PathBuf;
use std::time::Duration;

/// Default state directory (what daemon.json held before geomx).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/geomx-agent";
/// Default daemon.json.
pub const DEFAULT_DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// Default Docker API address.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// Default Docker restart command (run with `sh -c`).
pub const DEFAULT_DOCKER_RESTART_COMMAND: &str = "systemctl restart docker";
/// Default re-check interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Default time Docker gets to answer again after a restart.
pub const DEFAULT_DOCKER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "daemon-json-before-geomx.json";

/// The reconciler's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// This host's name (log field `host`; a peer may not carry it).
    pub host: String,
    /// Docker's daemon.json.
    pub daemon_json: PathBuf,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Docker API address (`unix:///var/run/docker.sock`).
    pub docker_host: String,
    /// Command that restarts Docker, run with `sh -c`.
    pub docker_restart_command: String,
    /// How long Docker gets to answer after a restart.
    pub docker_ready_timeout: Duration,
    /// Re-check interval of [`crate::Reconciler::run`].
    pub interval: Duration,
    /// This agent's backend, overriding the cluster's default (`None`: the cluster's).
    pub backend: Option<Backend>,
    /// The WireGuard UDP port this host listens on.
    pub wireguard_port: u16,
    /// A Docker that does not answer is an error that stops the pass before any change
    /// (one-shot `geomx-agent network apply`); otherwise (the daemon) the pass runs without
    /// it: routes and iptables are applied, daemon.json waits for Docker's start.
    pub docker_required: bool,
}

impl NetConfig {
    /// The defaults for the host `host`.
    pub fn new(host: impl Into<String>) -> NetConfig {
        NetConfig {
            host: host.into(),
            daemon_json: PathBuf::from(DEFAULT_DAEMON_JSON),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            docker_host: DEFAULT_DOCKER_HOST.into(),
            docker_restart_command: DEFAULT_DOCKER_RESTART_COMMAND.into(),
            docker_ready_timeout: DEFAULT_DOCKER_READY_TIMEOUT,
            interval: DEFAULT_INTERVAL,
            backend: None,
            wireguard_port: WG_PORT,
            docker_required: false,
        }
    }

    /// The WireGuard private key (mode 0600, never sent anywhere).
    pub fn wireguard_key_file(&self) -> PathBuf {
        self.state_dir.join(WG_KEY_FILE)
    }

    /// The state file.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }
}
