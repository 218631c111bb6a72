//! `geomx-agent`: the geomx host agent.
//!
//! * `geomx-agent network apply --config host.toml [--watch]`: host networking from a static
//!   peer list, without a controller (once, or kept in place until stopped);
//! * `geomx-agent network plan --config host.toml`: what a pass would do, changing nothing;
//! * `geomx-agent network show [--output table|json]`: what geomx owns on this host;
//! * `geomx-agent cleanup`: removes it and gives daemon.json back its pre-geomx values;
//! * `geomx-agent run [--config /etc/geomx/agent.toml]`: the daemon connected to the
//!   controller (see [`daemon`]);
//! * `geomx-agent leave`: tells the controller the host leaves, removes its geomx containers
//!   and cleans up its network;
//! * `geomx-agent rotate-key`: the running agent replaces the host's WireGuard key pair (see
//!   [`daemon::control`]).
//!
//! Exit codes: 0 success, 1 failure, 2 usage or configuration error.

mod config;
mod daemon;
mod network;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use geomx_net::{
    DEFAULT_DAEMON_JSON, DEFAULT_DOCKER_HOST, DEFAULT_DOCKER_READY_TIMEOUT,
    DEFAULT_DOCKER_RESTART_COMMAND, DEFAULT_STATE_DIR, NetConfig,
};

/// geomx host agent: owns this host's docker0 bip, peer routes and masquerade rules, and
/// (with the control plane) runs the role containers of GeoMX jobs.
#[derive(Debug, Parser)]
#[command(name = "geomx-agent", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand shares (each also read from a `GEOMX_*` variable). Those without
/// a value fall back to agent.toml (`run`, `leave`), then to their default.
#[derive(Clone, Debug, Default, Args)]
pub struct Common {
    /// The agent's state directory (lock, what daemon.json held before geomx, the last
    /// desired state) [default: /var/lib/geomx-agent].
    #[arg(long, global = true, env = "GEOMX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Docker's daemon.json [default: /etc/docker/daemon.json].
    #[arg(long, global = true, env = "GEOMX_DAEMON_JSON")]
    pub daemon_json: Option<PathBuf>,
    /// Docker API address [default: unix:///var/run/docker.sock].
    #[arg(long, global = true, env = "GEOMX_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Command that restarts Docker (run with `sh -c`) when daemon.json changed
    /// [default: systemctl restart docker].
    #[arg(long, global = true, env = "GEOMX_DOCKER_RESTART_COMMAND")]
    pub docker_restart_command: Option<String>,
    /// How long Docker may take to answer again after a restart [default: 60s].
    #[arg(long, global = true, env = "GEOMX_DOCKER_READY_TIMEOUT",
          value_parser = humantime::parse_duration)]
    pub docker_ready_timeout: Option<Duration>,
    /// This host's name (default: `name` of host.toml / agent.toml, else the kernel hostname).
    #[arg(long, global = true, env = "GEOMX_HOST_NAME")]
    pub host_name: Option<String>,
    /// Log format (logs go to standard error; level from GEOMX_LOG or RUST_LOG, default info).
    #[arg(long, global = true, env = "GEOMX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Log format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Output format of commands that print results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Table,
    /// For programs.
    Json,
}

impl Common {
    /// The reconciler settings for the host `host`.
    pub fn net_config(&self, host: &str, interval: Option<Duration>) -> NetConfig {
        let mut c = NetConfig::new(host);
        c.daemon_json = self
            .daemon_json
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DAEMON_JSON));
        c.state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        c.docker_host = self
            .docker_host
            .clone()
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string());
        c.docker_restart_command = self
            .docker_restart_command
            .clone()
            .unwrap_or_else(|| DEFAULT_DOCKER_RESTART_COMMAND.to_string());
        c.docker_ready_timeout = self
            .docker_ready_timeout
            .unwrap_or(DEFAULT_DOCKER_READY_TIMEOUT);
        if let Some(i) = interval {
            c.interval = i;
        }
        c
    }

    /// This host's name: `--host-name`, else `fallback`, else the kernel hostname.
    pub fn host(&self, fallback: Option<&str>) -> String {
        self.host_name
            .clone()
            .or_else(|| fallback.map(str::to_string))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Host networking without a controller: apply a static host file, show the state.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Remove every route (proto 247), chain, jump and the WireGuard interface geomx owns on
    /// this host and give daemon.json back its pre-geomx bip/ip-masq/allow-direct-routing
    /// (restarting Docker when the file changes). Stop a running agent first.
    Cleanup(network::CleanupArgs),
    /// Run as the host's daemon (systemd: geomx-agent.service): register with the
    /// controller, keep the host network and the role containers as it wants them, report.
    /// Stops on SIGTERM/SIGINT leaving containers and network in place.
    Run(daemon::config::AgentArgs),
    /// Leave the cluster: tell the controller, remove this host's geomx containers, then
    /// clean up the network as `cleanup` does. Stop the agent first.
    Leave(daemon::leave::LeaveArgs),
    /// Replace this host's WireGuard key pair: the running agent writes a new private key
    /// (0600, in its state directory), reconfigures geomx-wg with it, then registers the new
    /// public key with the controller, which hands it to every peer (tunnels to this host
    /// pause for about a controller round trip). Needs the agent running.
    RotateKey(daemon::rotate::RotateArgs),
}

fn init_logging(format: LogFormat) {
    geomx_proto::logging::init(&geomx_proto::logging::LogOptions {
        default_filter: "info".into(),
        filter_env: Some("GEOMX_LOG"),
        format: match format {
            LogFormat::Text => geomx_proto::logging::StderrFormat::Text,
            LogFormat::Json => geomx_proto::logging::StderrFormat::Json,
        },
        with_target: true,
        identifier: "geomx-agent",
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.common.log_format);
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(dispatch(cli)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the async runtime")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("geomx-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let common = cli.common;
    match cli.command {
        Command::Network(cmd) => network::network(&common, cmd).await,
        Command::Cleanup(args) => network::cleanup(&common, args).await,
        Command::Run(args) => daemon::run(&common, &args).await,
        Command::Leave(args) => daemon::leave::leave(&common, &args).await,
        Command::RotateKey(args) => daemon::rotate::rotate_key(&common, &args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn common_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "geomx-agent",
            "network",
            "apply",
            "--config",
            "h.toml",
            "--watch",
            "--interval",
            "1s",
            "--daemon-json",
            "/x/daemon.json",
            "--docker-restart-command",
            "/x/restart.sh",
        ])
        .expect("parses");
        assert_eq!(
            cli.common.daemon_json,
            Some(PathBuf::from("/x/daemon.json"))
        );
        let c = cli.common.net_config("a", Some(Duration::from_secs(1)));
        assert_eq!(c.docker_restart_command, "/x/restart.sh");
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }
}
