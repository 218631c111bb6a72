//! `/etc/geomx/agent.toml`: the configuration of `geomx-agent run` and `geomx-agent leave`.
//!
//! Precedence, per setting: flag or its `GEOMX_*` environment variable, then the file, then
//! the default. Relative paths in the file are relative to the file's directory. Unknown
//! keys are refused; errors name where the bad value came from (`agent.toml:3:14
//! (underlay_ip)`, or `--underlay-ip / GEOMX_UNDERLAY_IP`).
//!
//! ```toml
//! name = "a"                              # host name, default: the kernel hostname
//! controller = "https://10.1.1.1:7946"    # required
//! underlay_ip = "10.1.1.34"               # default: the source address of the route to the controller
//! pinned_subnet = "172.17.34.0/24"        # optional
//! api_listen = "10.1.1.34:7947"           # AgentNodeService; default <underlay_ip>:7947
//! heartbeat_port = 7948                   # HTTP heartbeats on the docker0 gateway
//! insecure = false                        # plaintext to the controller and on the API (labs only)
//! state_dir = "/var/lib/geomx-agent"
//! daemon_json = "/etc/docker/daemon.json"
//! docker_host = "unix:///var/run/docker.sock"
//! docker_restart_command = "systemctl restart docker"
//! docker_ready_timeout = "60s"
//! network_interval = "10s"                # periodic network re-check
//! logs_retention = "7d"                   # output of removed containers kept this long
//! backend = "auto"                        # data plane to peers: auto (host-gw on the LAN,
//!                                         # wireguard elsewhere), host-gw, wireguard or
//!                                         # vxlan (unencrypted);
//!                                         # default: the controller's
//! wireguard_port = 7951                   # WireGuard's UDP port on the underlay address
//! registry_auth_file = "/etc/geomx/registry-auth.json"  # Docker config.json format, mode 0600
//! max_parallel_pulls = 3                  # image pulls downloading at once
//! metrics_listen = "127.0.0.1:7950"       # /metrics in plain HTTP; "": none
//! [tls]
//! ca = "/etc/geomx/tls/ca.pem"
//! cert = "/etc/geomx/tls/agent-a.pem"
//! key = "/etc/geomx/tls/agent-a-key.pem"
//! ```

use geomx_net::{Backend, WG_PORT};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use geomx_net::{
    DEFAULT_DAEMON_JSON, DEFAULT_DOCKER_HOST, DEFAULT_DOCKER_READY_TIMEOUT,
    DEFAULT_DOCKER_RESTART_COMMAND, DEFAULT_INTERVAL, DEFAULT_STATE_DIR, NetConfig,
};
pub use geomx_proto::config_file::ConfigError;
use geomx_proto::config_file::{ConfigFile, HumanDuration, Settings, TlsFlags, TlsPick, TlsTable};
use geomx_proto::tls::TlsFiles;
use geomx_runtime::DEFAULT_HEARTBEAT_PORT;
use ipnet::Ipv4Net;
use serde::Deserialize;
use toml::Spanned;

use super::metrics::DEFAULT_METRICS_LISTEN;
use crate::Common;

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/geomx/agent.toml";
/// Default port of the agent API (`AgentNodeService`).
pub const DEFAULT_API_PORT: u16 = 7947;
/// Default port of the controller, used when the URL names none.
pub const DEFAULT_CONTROLLER_PORT: u16 = 7946;

/// The flags of `geomx-agent run` and `leave` (each also read from a `GEOMX_*` variable).
/// The common flags (`--host-name`, `--state-dir`, `--daemon-json`, `--docker-host`,
/// `--docker-restart-command`, `--docker-ready-timeout`) override the file's `name`,
/// `state_dir`, `daemon_json`, `docker_host`, `docker_restart_command` and
/// `docker_ready_timeout`.
#[derive(Clone, Debug, Default, Args)]
pub struct AgentArgs {
    /// The agent's config file [default: /etc/geomx/agent.toml, if present].
    #[arg(long, short = 'c', env = "GEOMX_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The controller, e.g. https://10.1.1.1:7946 (required here or in the file).
    #[arg(long, env = "GEOMX_CONTROLLER")]
    pub controller: Option<String>,
    /// This host's underlay IPv4 address [default: the source address of the route to the
    /// controller].
    #[arg(long, env = "GEOMX_UNDERLAY_IP")]
    pub underlay_ip: Option<String>,
    /// A container subnet this host insists on (CIDR inside the cluster CIDR).
    #[arg(long, env = "GEOMX_PINNED_SUBNET")]
    pub pinned_subnet: Option<String>,
    /// Where to serve the agent API for the controller [default: <underlay ip>:7947].
    #[arg(long, env = "GEOMX_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Port of the HTTP heartbeat endpoint on the docker0 gateway [default: 7948].
    #[arg(long, env = "GEOMX_HEARTBEAT_PORT")]
    pub heartbeat_port: Option<u16>,
    /// Plaintext to the controller and on the agent API, no certificates (throwaway labs
    /// only). `--insecure` or `--insecure=false`.
    #[arg(long, env = "GEOMX_INSECURE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: Option<bool>,
    /// How often the host network is re-checked, e.g. 10s [default: 10s].
    #[arg(long, env = "GEOMX_NETWORK_INTERVAL", value_parser = humantime::parse_duration)]
    pub network_interval: Option<Duration>,
    /// How long the output of removed role containers is kept on disk [default: 7d].
    #[arg(long, env = "GEOMX_LOGS_RETENTION", value_parser = humantime::parse_duration)]
    pub logs_retention: Option<Duration>,
    /// Data-plane backend to peers, overriding the controller's default: auto, host-gw,
    /// wireguard or vxlan.
    #[arg(long, env = "GEOMX_BACKEND")]
    pub backend: Option<String>,
    /// WireGuard's UDP port on the underlay address [default: 7951].
    #[arg(long, env = "GEOMX_WIREGUARD_PORT")]
    pub wireguard_port: Option<u16>,
    /// Registry credentials for image pulls: a Docker config.json-format file readable by
    /// its owner only (mode 0600), read again for every pull.
    #[arg(long, env = "GEOMX_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// Image pulls downloading at once on this host [default: 3].
    #[arg(long, env = "GEOMX_MAX_PARALLEL_PULLS")]
    pub max_parallel_pulls: Option<u32>,
    /// Where to serve the agent's Prometheus metrics (`/metrics`, plain HTTP), as
    /// address:port, or "" for none [default: 127.0.0.1:7950].
    #[arg(long, env = "GEOMX_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// CA certificate (PEM) that signed the controller's and this agent's certificates.
    #[arg(long, env = "GEOMX_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM; OU=agent, CN=<host name>).
    #[arg(long, env = "GEOMX_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, env = "GEOMX_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// The resolved, validated configuration of an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    /// This host's name (`[a-z0-9-]`, 1..63 characters; the CN of its certificate).
    pub name: String,
    /// The controller's URL (`https://host:port`, `http://` when insecure).
    pub controller: String,
    /// The underlay address; `None`: the source address of the route to the controller.
    pub underlay_ip: Option<Ipv4Addr>,
    /// The subnet this host insists on.
    pub pinned_subnet: Option<Ipv4Net>,
    /// Where the agent API listens; `None`: `<underlay ip>:7947`.
    pub api_listen: Option<SocketAddr>,
    /// Port of the HTTP heartbeat endpoint on the docker0 gateway.
    pub heartbeat_port: u16,
    /// Plaintext everywhere.
    pub insecure: bool,
    /// The agent's TLS files (`None` only when insecure).
    pub tls: Option<TlsFiles>,
    /// State directory (lock, daemon.json memory, last desired state).
    pub state_dir: PathBuf,
    /// Docker's daemon.json.
    pub daemon_json: PathBuf,
    /// Docker API address.
    pub docker_host: String,
    /// How long Docker gets to answer again after a restart.
    pub docker_ready_timeout: Duration,
    /// Command restarting Docker (run with `sh -c`).
    pub docker_restart_command: String,
    /// How often the network is re-checked.
    pub network_interval: Duration,
    /// How long the output of removed role containers is kept.
    pub logs_retention: Duration,
    /// This agent's backend (`None`: the controller's default).
    pub backend: Option<Backend>,
    /// WireGuard's UDP port.
    pub wireguard_port: u16,
    /// The registry credentials file (checked at load: mode 0600, parsable).
    pub registry_auth_file: Option<PathBuf>,
    /// Image pulls downloading at once.
    pub max_parallel_pulls: u32,
    /// Where `/metrics` is served in plain HTTP (`None`: not served).
    pub metrics_listen: Option<SocketAddr>,
}

impl AgentConfig {
    /// Reads the file named by `args` (or the default one if it exists), applies the flags,
    /// and validates. Returns the configuration and warnings worth logging.
    pub fn load(
        common: &Common,
        args: &AgentArgs,
    ) -> Result<(AgentConfig, Vec<String>), ConfigError> {
        let file = ConfigFile::read(args.config.as_deref(), Path::new(DEFAULT_CONFIG_PATH))?;
        resolve(common, args, &file, kernel_hostname)
    }

    /// The network reconciler's settings.
    pub fn net_config(&self) -> NetConfig {
        let mut c = NetConfig::new(&self.name);
        c.daemon_json = self.daemon_json.clone();
        c.state_dir = self.state_dir.clone();
        c.docker_host = self.docker_host.clone();
        c.docker_restart_command = self.docker_restart_command.clone();
        c.docker_ready_timeout = self.docker_ready_timeout;
        c.interval = self.network_interval;
        c.backend = self.backend;
        c.wireguard_port = self.wireguard_port;
        c
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<Spanned<String>>,
    controller: Option<Spanned<String>>,
    underlay_ip: Option<Spanned<Ipv4Addr>>,
    pinned_subnet: Option<Spanned<Ipv4Net>>,
    api_listen: Option<Spanned<SocketAddr>>,
    heartbeat_port: Option<Spanned<u16>>,
    insecure: Option<bool>,
    state_dir: Option<Spanned<PathBuf>>,
    daemon_json: Option<Spanned<PathBuf>>,
    docker_host: Option<Spanned<String>>,
    docker_restart_command: Option<Spanned<String>>,
    docker_ready_timeout: Option<Spanned<HumanDuration>>,
    network_interval: Option<Spanned<HumanDuration>>,
    logs_retention: Option<Spanned<HumanDuration>>,
    backend: Option<Spanned<Backend>>,
    wireguard_port: Option<Spanned<u16>>,
    registry_auth_file: Option<Spanned<PathBuf>>,
    max_parallel_pulls: Option<Spanned<u32>>,
    metrics_listen: Option<Spanned<String>>,
    tls: Option<TlsTable>,
}

/// The kernel's host name, if it can be read.
pub fn kernel_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Checks a host name the way the controller does: `[a-z0-9-]`, 1..63 characters.
pub fn valid_host_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Normalizes the controller URL (a bare `host:port` gets the scheme `insecure` implies, a
/// URL without a port gets 7946) and checks its scheme against `insecure`.
pub fn normalize_controller_url(url: &str, insecure: bool) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    if url.is_empty() {
        return Err("is empty; e.g. \"https://10.1.1.1:7946\"".into());
    }
    let mut url = if url.contains("://") {
        url.to_owned()
    } else if insecure {
        format!("http://{url}")
    } else {
        format!("https://{url}")
    };
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|_| format!("{url:?} is not a URL, e.g. \"https://10.1.1.1:7946\""))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("{url:?} must be scheme://host:port without a path"));
    }
    match (uri.scheme_str(), insecure) {
        (Some("https"), false) | (Some("http"), true) => {}
        (Some("http"), false) => {
            return Err(format!(
                "refusing plaintext {url}: use https://, or insecure = true for a controller started with --insecure"
            ));
        }
        (Some("https"), true) => {
            return Err(format!(
                "{url} is TLS but insecure = true speaks plaintext: use http:// with an insecure controller, or drop insecure"
            ));
        }
        _ => return Err(format!("{url:?} must start with https://")),
    }
    if uri.port_u16().is_none() {
        url = format!("{url}:{DEFAULT_CONTROLLER_PORT}");
    }
    Ok(url)
}

fn check_underlay(ip: Ipv4Addr) -> Result<Ipv4Addr, String> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
        Err(format!(
            "{ip} cannot be a host's underlay address (unspecified, loopback, multicast or broadcast)"
        ))
    } else {
        Ok(ip)
    }
}

fn check_subnet(net: Ipv4Net) -> Result<Ipv4Net, String> {
    if net.trunc() != net {
        return Err(format!(
            "{net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    if net.prefix_len() > 30 {
        return Err(format!("{net} is too small: use /30 or shorter"));
    }
    Ok(net)
}

fn check_duration(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn not_empty(example: &'static str) -> impl Fn(String) -> Result<String, String> {
    move |s: String| {
        if s.trim().is_empty() {
            Err(format!("must not be empty, e.g. \"{example}\""))
        } else {
            Ok(s)
        }
    }
}

/// A flag given as a string, parsed as `T` (`example` shows the form) or a file's typed
/// value; then `check`ed.
/// A port a listener can use: 1..=65535.
fn port_number(p: u16) -> Result<u16, String> {
    if p == 0 {
        Err("must be a port number 1..=65535".to_owned())
    } else {
        Ok(p)
    }
}

fn typed<T: std::str::FromStr>(
    example: &'static str,
    what: &'static str,
    check: fn(T) -> Result<T, String>,
) -> impl FnOnce(Result<String, T>) -> Result<T, String> {
    move |v| match v {
        Ok(s) => s
            .trim()
            .parse::<T>()
            .map_err(|_| format!("{s:?} is not {what}, e.g. \"{example}\""))
            .and_then(check),
        Err(v) => check(v),
    }
}

/// [`DEFAULT_METRICS_LISTEN`] as an address.
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7950))
}

/// `metrics_listen`: an `address:port`, or "" for none.
fn parse_metrics_listen(v: &str) -> Result<Option<SocketAddr>, String> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    v.trim().parse().map(Some).map_err(|_| {
        format!("{v:?} is not an address:port (e.g. \"{DEFAULT_METRICS_LISTEN}\"), or \"\" for no metrics listener")
    })
}

fn resolve(
    common: &Common,
    args: &AgentArgs,
    source: &ConfigFile,
    hostname: impl Fn() -> Option<String>,
) -> Result<(AgentConfig, Vec<String>), ConfigError> {
    let file: FileConfig = source.parse()?;
    let mut settings = Settings::new(source, "GEOMX_");
    let mut warnings = Vec::new();
    let insecure = args.insecure.or(file.insecure).unwrap_or(false);

    let name = match settings.pick_same("name", "host-name", common.host_name.clone(), file.name, |n| {
        if valid_host_name(&n) {
            Ok(n)
        } else {
            Err(format!(
                "{n:?} is not a valid host name: [a-z0-9-], 1..63 characters (the CN of the agent's certificate)"
            ))
        }
    })? {
        Some(n) => n,
        None => {
            let h = hostname().unwrap_or_default();
            if !valid_host_name(&h) {
                return Err(settings.invalid(
                    "name",
                    format!(
                        "the kernel hostname {h:?} is not a valid geomx host name ([a-z0-9-], 1..63 characters): set name in agent.toml or --host-name"
                    ),
                ));
            }
            h
        }
    };

    let controller = settings
        .pick_same(
            "controller",
            "controller",
            args.controller.clone(),
            file.controller,
            |url| normalize_controller_url(&url, insecure),
        )?
        .ok_or_else(|| ConfigError::Invalid {
            origin: "controller".into(),
            message: "required: set controller = \"https://<controller>:7946\" in agent.toml, or --controller / GEOMX_CONTROLLER".into(),
        })?;

    let underlay_ip = settings.pick(
        "underlay_ip",
        "underlay-ip",
        args.underlay_ip.clone(),
        file.underlay_ip,
        typed("10.1.1.34", "an IPv4 address", check_underlay),
    )?;
    let pinned_subnet = settings.pick(
        "pinned_subnet",
        "pinned-subnet",
        args.pinned_subnet.clone(),
        file.pinned_subnet,
        typed("172.17.34.0/24", "an IPv4 CIDR", check_subnet),
    )?;
    let api_listen = settings.pick(
        "api_listen",
        "api-listen",
        args.api_listen.clone(),
        file.api_listen,
        typed("10.1.1.34:7947", "an address:port", Ok),
    )?;
    let heartbeat_port = settings
        .pick_same(
            "heartbeat_port",
            "heartbeat-port",
            args.heartbeat_port,
            file.heartbeat_port,
            port_number,
        )?
        .unwrap_or(DEFAULT_HEARTBEAT_PORT);

    let mut path = |key: &str, flag: &str, arg: &Option<PathBuf>, value, default: &str| {
        settings
            .pick(key, flag, arg.clone(), value, |v| {
                Ok(v.unwrap_or_else(|p: PathBuf| source.path_of(&p)))
            })
            .map(|p| p.unwrap_or_else(|| PathBuf::from(default)))
    };
    let state_dir = path(
        "state_dir",
        "state-dir",
        &common.state_dir,
        file.state_dir,
        DEFAULT_STATE_DIR,
    )?;
    let daemon_json = path(
        "daemon_json",
        "daemon-json",
        &common.daemon_json,
        file.daemon_json,
        DEFAULT_DAEMON_JSON,
    )?;
    let docker_host = settings
        .pick_same(
            "docker_host",
            "docker-host",
            common.docker_host.clone(),
            file.docker_host,
            not_empty("unix:///var/run/docker.sock"),
        )?
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned());
    let docker_restart_command = settings
        .pick_same(
            "docker_restart_command",
            "docker-restart-command",
            common.docker_restart_command.clone(),
            file.docker_restart_command,
            not_empty("systemctl restart docker"),
        )?
        .unwrap_or_else(|| DEFAULT_DOCKER_RESTART_COMMAND.to_owned());
    let duration = |v: Result<Duration, HumanDuration>| check_duration(v.unwrap_or_else(|f| f.0));
    let docker_ready_timeout = settings
        .pick(
            "docker_ready_timeout",
            "docker-ready-timeout",
            common.docker_ready_timeout,
            file.docker_ready_timeout,
            duration,
        )?
        .unwrap_or(DEFAULT_DOCKER_READY_TIMEOUT);
    let network_interval = settings
        .pick(
            "network_interval",
            "network-interval",
            args.network_interval,
            file.network_interval,
            duration,
        )?
        .unwrap_or(DEFAULT_INTERVAL);
    if network_interval < Duration::from_millis(100) {
        return Err(settings.invalid("network_interval", "must be at least 100ms"));
    }
    let logs_retention = settings
        .pick(
            "logs_retention",
            "logs-retention",
            args.logs_retention,
            file.logs_retention,
            duration,
        )?
        .unwrap_or(geomx_runtime::archive::DEFAULT_RETENTION);
    let backend = settings.pick(
        "backend",
        "backend",
        args.backend.clone(),
        file.backend,
        typed("auto", "a backend (auto, host-gw, wireguard or vxlan)", Ok),
    )?;
    let wireguard_port = settings
        .pick_same(
            "wireguard_port",
            "wireguard-port",
            args.wireguard_port,
            file.wireguard_port,
            port_number,
        )?
        .unwrap_or(WG_PORT);
    // refused at once when others may read it or it is not a config.json (it is read
    // again for every pull, so a later rotation needs no restart)
    let registry_auth_file = settings.pick(
        "registry_auth_file",
        "registry-auth-file",
        args.registry_auth_file.clone(),
        file.registry_auth_file,
        |v| {
            let path = v.unwrap_or_else(|p: PathBuf| source.path_of(&p));
            geomx_runtime::credentials::AuthFile::load(&path).map_err(|e| e.to_string())?;
            Ok(path)
        },
    )?;
    let max_parallel_pulls = settings
        .pick_same(
            "max_parallel_pulls",
            "max-parallel-pulls",
            args.max_parallel_pulls,
            file.max_parallel_pulls,
            |n| {
                if (1..=64).contains(&n) {
                    Ok(n)
                } else {
                    Err(format!("{n} is not 1..=64"))
                }
            },
        )?
        .unwrap_or(geomx_runtime::pull::DEFAULT_MAX_PARALLEL_PULLS as u32);
    let metrics_listen = match settings.pick(
        "metrics_listen",
        "metrics-listen",
        args.metrics_listen.clone(),
        file.metrics_listen,
        |v| parse_metrics_listen(&v.unwrap_or_else(|f| f)),
    )? {
        Some(v) => v,
        None => Some(default_metrics_listen()),
    };

    // TLS: each file from its flag or the [tls] table
    let flags = TlsFlags {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    };
    let tls = match settings.tls(&flags, file.tls) {
        TlsPick::Complete(files) if !insecure => Some(files),
        TlsPick::None if insecure => None,
        TlsPick::Complete(_) | TlsPick::Incomplete(_) if insecure => {
            warnings.push("insecure mode: the TLS files are ignored".to_owned());
            None
        }
        TlsPick::Incomplete(missing) => {
            return Err(ConfigError::Invalid {
                origin: "tls".into(),
                message: format!(
                    "{} missing: set [tls] ca, cert and key (make them with `geomxctl certs agent --name {name}`), or --tls-ca/--tls-cert/--tls-key",
                    missing.join(", ")
                ),
            });
        }
        TlsPick::None | TlsPick::Complete(_) => {
            return Err(ConfigError::Invalid {
                origin: "tls".into(),
                message: format!(
                    "ca, cert, key missing: set [tls] ca, cert and key (make them with `geomxctl certs agent --name {name}`), or --tls-ca/--tls-cert/--tls-key"
                ),
            });
        }
    };

    Ok((
        AgentConfig {
            file: source.path().map(Path::to_owned),
            name,
            controller,
            underlay_ip,
            pinned_subnet,
            api_listen,
            heartbeat_port,
            insecure,
            tls,
            state_dir,
            daemon_json,
            docker_host,
            docker_ready_timeout,
            docker_restart_command,
            network_interval,
            logs_retention,
            backend,
            wireguard_port,
            registry_auth_file,
            max_parallel_pulls,
            metrics_listen,
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    const EXAMPLE: &str = r#"
name = "a"                              # host name, default: the kernel hostname
controller = "https://10.1.1.1:7946"    # required
underlay_ip = "10.1.1.34"               # default: the source address of the route to the controller
pinned_subnet = "172.17.34.0/24"        # optional
api_listen = "10.1.1.34:7947"           # AgentNodeService; default <underlay_ip>:7947
heartbeat_port = 7948                   # HTTP heartbeats on the docker0 gateway
insecure = false                        # plaintext to the controller and on the API (labs only; logs a warning)
state_dir = "/var/lib/geomx-agent"
daemon_json = "/etc/docker/daemon.json"
docker_host = "unix:///var/run/docker.sock"
docker_restart_command = "systemctl restart docker"
network_interval = "10s"                # periodic network re-check
[tls]
ca = "/etc/geomx/tls/ca.pem"
cert = "/etc/geomx/tls/agent-a.pem"
key = "/etc/geomx/tls/agent-a-key.pem"
"#;

    #[derive(Debug, clap::Parser)]
    struct TestCli {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: AgentArgs,
    }

    fn cli(argv: &[&str]) -> TestCli {
        let mut v = vec!["geomx-agent"];
        v.extend_from_slice(argv);
        TestCli::try_parse_from(v).expect("flags parse")
    }

    fn load(text: &str, argv: &[&str]) -> Result<(AgentConfig, Vec<String>), ConfigError> {
        let c = cli(argv);
        let file = ConfigFile::from_text(Path::new("/etc/geomx/agent.toml"), text);
        resolve(&c.common, &c.args, &file, || Some("box1".into()))
    }

    #[test]
    fn the_documented_example_parses() {
        let (c, warnings) = load(EXAMPLE, &[]).expect("parses");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.name, "a");
        assert_eq!(c.controller, "https://10.1.1.1:7946");
        assert_eq!(c.underlay_ip, Some("10.1.1.34".parse().unwrap()));
        assert_eq!(c.pinned_subnet, Some("172.17.34.0/24".parse().unwrap()));
        assert_eq!(c.api_listen, Some("10.1.1.34:7947".parse().unwrap()));
        assert_eq!(c.heartbeat_port, 7948);
        assert!(!c.insecure);
        assert_eq!(c.network_interval, Duration::from_secs(10));
        assert_eq!(c.docker_restart_command, "systemctl restart docker");
        let tls = c.tls.expect("tls");
        assert_eq!(tls.cert, PathBuf::from("/etc/geomx/tls/agent-a.pem"));
        let n = load(EXAMPLE, &[]).expect("parses").0.net_config();
        assert_eq!(n.host, "a");
        assert_eq!(n.interval, Duration::from_secs(10));
    }

    #[test]
    fn logs_retention_defaults_to_a_week_and_is_read_from_file_and_flag() {
        let (c, _) = load(EXAMPLE, &[]).expect("parses");
        assert_eq!(c.logs_retention, geomx_runtime::archive::DEFAULT_RETENTION);
        let text = EXAMPLE.replace(
            "network_interval = \"10s\"",
            "network_interval = \"10s\"\nlogs_retention = \"2d\"",
        );
        let (c, _) = load(&text, &[]).expect("parses");
        assert_eq!(c.logs_retention, Duration::from_secs(2 * 24 * 3600));
        let (c, _) = load(&text, &["--logs-retention", "1h"]).expect("parses");
        assert_eq!(c.logs_retention, Duration::from_secs(3600), "the flag wins");
    }

    #[test]
    fn the_registry_auth_file_is_checked_at_load_and_pulls_are_limited() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = dir.path().join("auth.json");
        let text = |extra: &str| {
            EXAMPLE.replace(
                "network_interval = \"10s\"",
                &format!("network_interval = \"10s\"\n{extra}"),
            )
        };
        let with_file = text(&format!(
            "registry_auth_file = {:?}",
            auth.display().to_string()
        ));
        let chmod = |mode| {
            std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        std::fs::write(
            &auth,
            r#"{"auths": {"10.1.1.253:5000": {"auth": "dXNlcjpwYXNz"}}}"#,
        )
        .expect("write");
        chmod(0o600);
        let (c, _) = load(&with_file, &[]).expect("parses");
        assert_eq!(c.registry_auth_file.as_deref(), Some(auth.as_path()));
        assert_eq!(c.max_parallel_pulls, 3);
        let s = super::super::Settings::from_config(&c, None);
        assert_eq!(s.pulls.auth_file.as_deref(), Some(auth.as_path()));
        assert_eq!(s.pulls.max_parallel, 3);
        // readable by others: refused, naming the key, the file and the fix
        chmod(0o644);
        let e = load(&with_file, &[]).expect_err("0644").to_string();
        assert!(
            e.contains("registry_auth_file") && e.contains("0644") && e.contains("chmod 600"),
            "{e}"
        );
        chmod(0o600);
        std::fs::write(&auth, "{\"auths\": ").expect("write");
        let e = load(&with_file, &[]).expect_err("unparsable").to_string();
        assert!(
            e.contains(&auth.display().to_string()) && e.contains("config.json"),
            "{e}"
        );
        let (c, _) = load(&text("max_parallel_pulls = 5"), &[]).expect("parses");
        assert_eq!(c.max_parallel_pulls, 5);
        let e = load(&text("max_parallel_pulls = 0"), &[])
            .expect_err("zero")
            .to_string();
        assert!(e.contains("max_parallel_pulls"), "{e}");
    }

    #[test]
    fn metrics_listen_defaults_to_loopback_and_can_be_moved_or_turned_off() {
        let (c, _) = load(EXAMPLE, &[]).expect("parses");
        assert_eq!(c.metrics_listen, Some("127.0.0.1:7950".parse().unwrap()));
        assert_eq!(
            c.metrics_listen.map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_METRICS_LISTEN)
        );
        let s = super::super::Settings::from_config(&c, None);
        assert_eq!(s.metrics_listen, c.metrics_listen);
        let with = |line: &str| format!("{EXAMPLE}\n").replace("[tls]", &format!("{line}\n[tls]"));
        let (c, _) = load(&with("metrics_listen = \"10.1.1.34:9100\""), &[]).expect("parses");
        assert_eq!(c.metrics_listen, Some("10.1.1.34:9100".parse().unwrap()));
        let (c, _) = load(&with("metrics_listen = \"\""), &[]).expect("parses");
        assert_eq!(c.metrics_listen, None, "\"\" turns it off");
        let (c, _) = load(
            &with("metrics_listen = \"10.1.1.34:9100\""),
            &["--metrics-listen", "0.0.0.0:7950"],
        )
        .expect("parses");
        assert_eq!(
            c.metrics_listen,
            Some("0.0.0.0:7950".parse().unwrap()),
            "the flag wins"
        );
        let (c, _) = load(EXAMPLE, &["--metrics-listen="]).expect("parses");
        assert_eq!(c.metrics_listen, None);
        let e = load(&with("metrics_listen = \"localhost\""), &[])
            .expect_err("no port")
            .to_string();
        assert!(
            e.contains("(metrics_listen)") && e.contains("address:port"),
            "{e}"
        );
        let e = load(EXAMPLE, &["--metrics-listen", "nope"])
            .expect_err("bad flag")
            .to_string();
        assert!(
            e.starts_with("--metrics-listen / GEOMX_METRICS_LISTEN:"),
            "{e}"
        );
        let e = load(&with("metrics_listen = 7950"), &[])
            .expect_err("not a string")
            .to_string();
        assert!(e.contains("metrics_listen"), "{e}");
    }

    #[test]
    fn the_shipped_example_file_parses() {
        let text = include_str!("../../../../systemd/agent.toml.example");
        let (c, _) = load(text, &[]).expect("systemd/agent.toml.example parses");
        assert_eq!(c.controller, "https://10.1.1.1:7946");
        assert!(c.tls.is_some());
    }

    #[test]
    fn defaults_apply_to_a_minimal_file() {
        let text = "controller = \"10.1.1.1:7946\"\n[tls]\nca = \"tls/ca.pem\"\ncert = \"tls/a.pem\"\nkey = \"tls/a-key.pem\"\n";
        let (c, _) = load(text, &[]).expect("parses");
        assert_eq!(c.name, "box1", "kernel hostname");
        assert_eq!(c.controller, "https://10.1.1.1:7946");
        assert_eq!(c.underlay_ip, None);
        assert_eq!(c.api_listen, None);
        assert_eq!(c.heartbeat_port, 7948);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.daemon_json, PathBuf::from(DEFAULT_DAEMON_JSON));
        assert_eq!(c.docker_host, DEFAULT_DOCKER_HOST);
        assert_eq!(c.docker_ready_timeout, DEFAULT_DOCKER_READY_TIMEOUT);
        assert_eq!(c.network_interval, DEFAULT_INTERVAL);
        // relative paths are relative to the file's directory
        assert_eq!(
            c.tls.expect("tls").ca,
            PathBuf::from("/etc/geomx/tls/ca.pem")
        );
        // a URL without a port gets the controller's
        let (c, _) = load(
            "controller = \"http://ctl.example\"\ninsecure = true\n",
            &[],
        )
        .expect("parses");
        assert_eq!(c.controller, "http://ctl.example:7946");
    }

    #[test]
    fn flags_and_env_win_over_the_file() {
        let (c, _) = load(
            EXAMPLE,
            &[
                "--host-name",
                "b",
                "--controller",
                "https://10.9.9.9:1234",
                "--underlay-ip",
                "10.1.1.29",
                "--state-dir",
                "/tmp/s",
                "--daemon-json",
                "/tmp/d.json",
                "--docker-host",
                "unix:///tmp/d.sock",
                "--docker-restart-command",
                "/tmp/restart.sh",
                "--network-interval",
                "2s",
                "--heartbeat-port",
                "9999",
                "--tls-cert",
                "/x/b.pem",
            ],
        )
        .expect("parses");
        assert_eq!(c.name, "b");
        assert_eq!(c.controller, "https://10.9.9.9:1234");
        assert_eq!(c.underlay_ip, Some("10.1.1.29".parse().unwrap()));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(c.daemon_json, PathBuf::from("/tmp/d.json"));
        assert_eq!(c.docker_host, "unix:///tmp/d.sock");
        assert_eq!(c.docker_restart_command, "/tmp/restart.sh");
        assert_eq!(c.network_interval, Duration::from_secs(2));
        assert_eq!(c.heartbeat_port, 9999);
        let tls = c.tls.expect("tls");
        assert_eq!(tls.cert, PathBuf::from("/x/b.pem"));
        assert_eq!(tls.key, PathBuf::from("/etc/geomx/tls/agent-a-key.pem"));
        // a default-valued flag that was not given does not hide the file's value
        let (c, _) = load(
            "controller = \"http://c:1\"\nstate_dir = \"/srv/geomx\"\ninsecure = true\n",
            &[],
        )
        .expect("parses");
        assert_eq!(c.state_dir, PathBuf::from("/srv/geomx"));
        // --insecure=false beats insecure = true in the file
        let e = load(
            "controller = \"http://c:1\"\ninsecure = true\n",
            &["--insecure=false"],
        )
        .unwrap_err();
        assert!(e.to_string().contains("refusing plaintext"), "{e}");
        let (c, _) = load("controller = \"http://c:1\"\n", &["--insecure"]).expect("parses");
        assert!(c.insecure);
        assert!(c.tls.is_none());
    }

    #[test]
    fn mistakes_name_file_line_and_column() {
        let e = load(
            "controller = \"https://c:1\"\nunderlay_ipp = \"10.1.1.34\"\n",
            &[],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/geomx/agent.toml:2:1:"), "{msg}");
        assert!(msg.contains("unknown field `underlay_ipp`"), "{msg}");

        let e = load(
            "controller = \"https://c:1\"\nunderlay_ip = \"10.1.1.340\"\n",
            &[],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/geomx/agent.toml:2:15 (underlay_ip):"),
            "{msg}"
        );

        let e = load("heartbeat_port = \"x\"\n", &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/geomx/agent.toml:1:18 (heartbeat_port):"),
            "{e}"
        );

        let e = load(
            "controller = \"https://c:1\"\n[tls]\nca = \"ca.pem\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("cert, key missing"), "{e}");

        let e = load("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n", &[]).unwrap_err();
        assert!(e.to_string().starts_with("controller: required"), "{e}");

        let e = load(
            "controller = \"http://10.1.1.1:7946\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/geomx/agent.toml:1:14 (controller): refusing plaintext"),
            "{e}"
        );

        let e = load(EXAMPLE, &["--underlay-ip", "nope"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--underlay-ip / GEOMX_UNDERLAY_IP: \"nope\""),
            "{e}"
        );
        let e = load(EXAMPLE, &["--host-name", "Box_1"]).unwrap_err();
        assert!(
            e.to_string().starts_with("--host-name / GEOMX_HOST_NAME:"),
            "{e}"
        );
        let e = load(&EXAMPLE.replace("172.17.34.0/24", "172.17.34.1/24"), &[]).unwrap_err();
        assert!(e.to_string().contains("did you mean 172.17.34.0/24"), "{e}");
        let e = load(&EXAMPLE.replace("\"10s\"", "\"often\""), &[]).unwrap_err();
        assert!(e.to_string().contains("(network_interval)"), "{e}");
    }

    #[test]
    fn an_unusable_kernel_hostname_asks_for_a_name() {
        let c = cli(&[]);
        let text = "controller = \"http://c:1\"\ninsecure = true\n";
        let file = ConfigFile::from_text(Path::new("agent.toml"), text);
        let e = resolve(&c.common, &c.args, &file, || {
            Some("Host.example.com".into())
        })
        .unwrap_err();
        assert!(e.to_string().contains("set name in agent.toml"), "{e}");
    }

    #[test]
    fn controller_urls() {
        assert_eq!(
            normalize_controller_url("10.1.1.1:7946", false).unwrap(),
            "https://10.1.1.1:7946"
        );
        assert_eq!(
            normalize_controller_url("10.1.1.1", true).unwrap(),
            "http://10.1.1.1:7946"
        );
        assert_eq!(
            normalize_controller_url("https://ctl:9000/", false).unwrap(),
            "https://ctl:9000"
        );
        assert!(normalize_controller_url("https://ctl:9000", true).is_err());
        assert!(normalize_controller_url("ftp://ctl:9000", false).is_err());
        assert!(normalize_controller_url("https://ctl:9000/x", false).is_err());
        assert!(normalize_controller_url("", false).is_err());
    }
}
