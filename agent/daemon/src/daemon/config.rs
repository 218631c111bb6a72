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
//! [tls]
//! ca = "/etc/geomx/tls/ca.pem"
//! cert = "/etc/geomx/tls/agent-a.pem"
//! key = "/etc/geomx/tls/agent-a-key.pem"
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use geomx_net::{
    DEFAULT_DAEMON_JSON, DEFAULT_DOCKER_HOST, DEFAULT_DOCKER_READY_TIMEOUT,
    DEFAULT_DOCKER_RESTART_COMMAND, DEFAULT_INTERVAL, DEFAULT_STATE_DIR, NetConfig,
};
use geomx_proto::config_file::{line_col, parse_toml};
use geomx_proto::tls::TlsFiles;
use geomx_runtime::DEFAULT_HEARTBEAT_PORT;
use ipnet::Ipv4Net;
use serde::Deserialize;
use toml::Spanned;

use crate::Common;

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/geomx/agent.toml";
/// Default port of the agent API (`AgentNodeService`).
pub const DEFAULT_API_PORT: u16 = 7947;
/// Default port of the controller, used when the URL names none.
pub const DEFAULT_CONTROLLER_PORT: u16 = 7946;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown or mistyped key.
    #[error("{}:{line}:{col}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid; `origin` says where it came from.
    #[error("{origin}: {message}")]
    Invalid {
        /// `file:line:col (key)`, `--flag / ENV`, or the key when it has no better origin.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

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
}

impl AgentConfig {
    /// Reads the file named by `args` (or the default one if it exists), applies the flags,
    /// and validates. Returns the configuration and warnings worth logging.
    pub fn load(
        common: &Common,
        args: &AgentArgs,
    ) -> Result<(AgentConfig, Vec<String>), ConfigError> {
        let (path, text) = match &args.config {
            Some(path) => (Some(path.clone()), read(path)?),
            None => {
                let path = PathBuf::from(DEFAULT_CONFIG_PATH);
                match std::fs::read_to_string(&path) {
                    Ok(text) => (Some(path), text),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, String::new()),
                    Err(source) => return Err(ConfigError::Read { path, source }),
                }
            }
        };
        let file = match &path {
            Some(p) => parse_file(p, &text)?,
            None => FileConfig::default(),
        };
        resolve(common, args, file, path.as_deref(), &text, kernel_hostname)
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
        c
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<Spanned<String>>,
    controller: Option<Spanned<String>>,
    underlay_ip: Option<Spanned<String>>,
    pinned_subnet: Option<Spanned<String>>,
    api_listen: Option<Spanned<String>>,
    heartbeat_port: Option<Spanned<u16>>,
    insecure: Option<bool>,
    state_dir: Option<Spanned<PathBuf>>,
    daemon_json: Option<Spanned<PathBuf>>,
    docker_host: Option<Spanned<String>>,
    docker_restart_command: Option<Spanned<String>>,
    docker_ready_timeout: Option<Spanned<String>>,
    network_interval: Option<Spanned<String>>,
    tls: Option<FileTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    ca: Option<Spanned<PathBuf>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    parse_toml(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        line: e.line,
        col: e.col,
        message: e.message,
    })
}

fn flag(name: &str) -> String {
    let env = format!("GEOMX_{}", name.to_uppercase().replace('-', "_"));
    format!("--{name} / {env}")
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

fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.trim()
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("{s:?} is not an IPv4 address, e.g. \"10.1.1.34\""))
        .and_then(|ip| {
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
                Err(format!(
                    "{ip} cannot be a host's underlay address (unspecified, loopback, multicast or broadcast)"
                ))
            } else {
                Ok(ip)
            }
        })
}

fn parse_subnet(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 CIDR, e.g. \"172.17.34.0/24\""))?;
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

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse::<SocketAddr>()
        .map_err(|e| format!("{s:?} is not an address:port ({e}), e.g. \"10.1.1.34:7947\""))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}), e.g. \"10s\" or \"500ms\""))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

struct Origins<'a> {
    path: Option<&'a Path>,
    text: &'a str,
}

impl Origins<'_> {
    fn file(&self, key: &str, span: Range<usize>) -> String {
        let (line, col) = line_col(self.text, span.start);
        match self.path {
            Some(p) => format!("{}:{line}:{col} ({key})", p.display()),
            None => key.to_owned(),
        }
    }
}

/// A value with where it came from.
struct Sourced<T> {
    value: T,
    origin: String,
}

fn resolve(
    common: &Common,
    args: &AgentArgs,
    file: FileConfig,
    path: Option<&Path>,
    text: &str,
    hostname: impl Fn() -> Option<String>,
) -> Result<(AgentConfig, Vec<String>), ConfigError> {
    let origins = Origins { path, text };
    let base_dir = path
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()))
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    let rel = |p: PathBuf| -> PathBuf {
        if p.is_relative() && !base_dir.as_os_str().is_empty() {
            base_dir.join(p)
        } else {
            p
        }
    };
    let mut warnings = Vec::new();

    /// flag (already typed or a string to parse) > file (spanned) > nothing.
    fn pick<T, F, P>(
        flag_value: Option<F>,
        flag_name: &str,
        file_value: Option<Spanned<T>>,
        key: &str,
        origins: &Origins<'_>,
        parse: P,
    ) -> Result<Option<Sourced<F>>, ConfigError>
    where
        P: Fn(T) -> Result<F, String>,
    {
        if let Some(v) = flag_value {
            return Ok(Some(Sourced {
                value: v,
                origin: flag(flag_name),
            }));
        }
        match file_value {
            None => Ok(None),
            Some(s) => {
                let origin = origins.file(key, s.span());
                let value = parse(s.into_inner()).map_err(|message| ConfigError::Invalid {
                    origin: origin.clone(),
                    message,
                })?;
                Ok(Some(Sourced { value, origin }))
            }
        }
    }
    let invalid = |origin: String, message: String| ConfigError::Invalid { origin, message };
    // flags given as strings are parsed with the same rules, their origin named
    fn parse_flag<T>(
        name: &str,
        v: &Option<String>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        v.as_deref()
            .map(|s| {
                parse(s).map_err(|message| ConfigError::Invalid {
                    origin: flag(name),
                    message,
                })
            })
            .transpose()
    }

    let insecure = args.insecure.or(file.insecure).unwrap_or(false);

    // name
    let name = match pick(
        common.host_name.clone(),
        "host-name",
        file.name,
        "name",
        &origins,
        Ok::<String, String>,
    )? {
        Some(s) => {
            if !valid_host_name(&s.value) {
                return Err(invalid(
                    s.origin,
                    format!(
                        "{:?} is not a valid host name: [a-z0-9-], 1..63 characters (the CN of the agent's certificate)",
                        s.value
                    ),
                ));
            }
            s.value
        }
        None => {
            let h = hostname().unwrap_or_default();
            if !valid_host_name(&h) {
                return Err(invalid(
                    "name".into(),
                    format!(
                        "the kernel hostname {h:?} is not a valid geomx host name ([a-z0-9-], 1..63 characters): set name in agent.toml or --host-name"
                    ),
                ));
            }
            h
        }
    };

    // controller
    let controller = pick(
        args.controller.clone(),
        "controller",
        file.controller,
        "controller",
        &origins,
        Ok::<String, String>,
    )?
    .ok_or_else(|| {
        invalid(
            "controller".into(),
            "required: set controller = \"https://<controller>:7946\" in agent.toml, or --controller / GEOMX_CONTROLLER".into(),
        )
    })?;
    let controller_url = normalize_controller_url(&controller.value, insecure)
        .map_err(|m| invalid(controller.origin.clone(), m))?;

    let underlay_ip = match parse_flag("underlay-ip", &args.underlay_ip, parse_ipv4)? {
        Some(v) => Some(v),
        None => pick(
            None,
            "underlay-ip",
            file.underlay_ip,
            "underlay_ip",
            &origins,
            |s: String| parse_ipv4(&s),
        )?
        .map(|s| s.value),
    };
    let pinned_subnet = match parse_flag("pinned-subnet", &args.pinned_subnet, parse_subnet)? {
        Some(v) => Some(v),
        None => pick(
            None,
            "pinned-subnet",
            file.pinned_subnet,
            "pinned_subnet",
            &origins,
            |s: String| parse_subnet(&s),
        )?
        .map(|s| s.value),
    };
    let api_listen = match parse_flag("api-listen", &args.api_listen, parse_listen)? {
        Some(v) => Some(v),
        None => pick(
            None,
            "api-listen",
            file.api_listen,
            "api_listen",
            &origins,
            |s: String| parse_listen(&s),
        )?
        .map(|s| s.value),
    };
    let heartbeat_port = pick(
        args.heartbeat_port,
        "heartbeat-port",
        file.heartbeat_port,
        "heartbeat_port",
        &origins,
        |p: u16| {
            if p == 0 {
                Err("must be a port number 1..=65535".to_owned())
            } else {
                Ok(p)
            }
        },
    )?;
    if let Some(s) = &heartbeat_port
        && s.value == 0
    {
        return Err(invalid(
            s.origin.clone(),
            "must be a port number 1..=65535".into(),
        ));
    }
    let heartbeat_port = heartbeat_port.map_or(DEFAULT_HEARTBEAT_PORT, |s| s.value);

    let state_dir = pick(
        common.state_dir.clone(),
        "state-dir",
        file.state_dir,
        "state_dir",
        &origins,
        |p: PathBuf| Ok(rel(p)),
    )?
    .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |s| s.value);
    let daemon_json = pick(
        common.daemon_json.clone(),
        "daemon-json",
        file.daemon_json,
        "daemon_json",
        &origins,
        |p: PathBuf| Ok(rel(p)),
    )?
    .map_or_else(|| PathBuf::from(DEFAULT_DAEMON_JSON), |s| s.value);
    let docker_host = pick(
        common.docker_host.clone(),
        "docker-host",
        file.docker_host,
        "docker_host",
        &origins,
        |s: String| {
            if s.trim().is_empty() {
                Err("must not be empty, e.g. \"unix:///var/run/docker.sock\"".to_owned())
            } else {
                Ok(s)
            }
        },
    )?
    .map_or_else(|| DEFAULT_DOCKER_HOST.to_owned(), |s| s.value);
    let docker_restart_command = pick(
        common.docker_restart_command.clone(),
        "docker-restart-command",
        file.docker_restart_command,
        "docker_restart_command",
        &origins,
        |s: String| {
            if s.trim().is_empty() {
                Err("must not be empty, e.g. \"systemctl restart docker\"".to_owned())
            } else {
                Ok(s)
            }
        },
    )?
    .map_or_else(|| DEFAULT_DOCKER_RESTART_COMMAND.to_owned(), |s| s.value);
    let docker_ready_timeout = pick(
        common.docker_ready_timeout,
        "docker-ready-timeout",
        file.docker_ready_timeout,
        "docker_ready_timeout",
        &origins,
        |s: String| parse_duration(&s),
    )?
    .map_or(DEFAULT_DOCKER_READY_TIMEOUT, |s| s.value);
    let network_interval = pick(
        args.network_interval,
        "network-interval",
        file.network_interval,
        "network_interval",
        &origins,
        |s: String| parse_duration(&s),
    )?
    .map_or(DEFAULT_INTERVAL, |s| s.value);
    if network_interval < Duration::from_millis(100) {
        return Err(invalid(
            "network_interval".into(),
            "must be at least 100ms".into(),
        ));
    }

    // TLS: each file from its flag or the [tls] table
    let file_tls = file.tls.unwrap_or_default();
    let tls_path = |arg: &Option<PathBuf>, f: Option<Spanned<PathBuf>>| -> Option<PathBuf> {
        arg.clone().or_else(|| f.map(|s| rel(s.into_inner())))
    };
    let ca = tls_path(&args.tls_ca, file_tls.ca);
    let cert = tls_path(&args.tls_cert, file_tls.cert);
    let key = tls_path(&args.tls_key, file_tls.key);
    let tls = match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => {
            if insecure {
                warnings.push("insecure mode: the TLS files are ignored".to_owned());
                None
            } else {
                Some(TlsFiles { ca, cert, key })
            }
        }
        (None, None, None) if insecure => None,
        (ca, cert, key) => {
            let missing: Vec<&str> = [
                ("ca", ca.is_none()),
                ("cert", cert.is_none()),
                ("key", key.is_none()),
            ]
            .into_iter()
            .filter(|(_, m)| *m)
            .map(|(k, _)| k)
            .collect();
            if insecure {
                warnings.push("insecure mode: the TLS files are ignored".to_owned());
                None
            } else {
                return Err(invalid(
                    "tls".into(),
                    format!(
                        "{} missing: set [tls] ca, cert and key (make them with `geomxctl certs agent --name {name}`), or --tls-ca/--tls-cert/--tls-key",
                        missing.join(", ")
                    ),
                ));
            }
        }
    };

    Ok((
        AgentConfig {
            file: path.map(Path::to_owned),
            name,
            controller: controller_url,
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
        let path = Path::new("/etc/geomx/agent.toml");
        let file = parse_file(path, text)?;
        resolve(&c.common, &c.args, file, Some(path), text, || {
            Some("box1".into())
        })
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
            e.to_string().starts_with("/etc/geomx/agent.toml:1:18:"),
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
        let path = Path::new("agent.toml");
        let file = parse_file(path, text).expect("parses");
        let e = resolve(&c.common, &c.args, file, Some(path), text, || {
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
