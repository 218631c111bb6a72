//! Controller configuration: `/etc/geomx/controller.toml`, overridden by flags and
//! `GEOMX_CONTROLLER_*` environment variables.
//!
//! Precedence, per setting: flag or environment variable, then the config file, then the
//! default. Relative paths in the file are relative to the file's directory. Errors name
//! where the bad value came from: `file:line:col` for the file, the flag and its variable
//! otherwise.
//!
//! ```toml
//! listen = "0.0.0.0:7946"
//! cluster_cidr = "172.17.0.0/16"
//! host_subnet_prefix = 24
//! state_dir = "/var/lib/geomx-controller"
//! heartbeat_interval = "1s"
//! grace_period = "10s"
//! shutdown_timeout = "10s"
//! backend = "auto"              # the cluster's data plane: auto (host-gw on a shared LAN,
//!                               # WireGuard to other networks), host-gw, wireguard or
//!                               # vxlan (unencrypted: trusted networks only); an
//!                               # agent's own `backend` overrides it
//! lease_ttl = "7d"              # a host lost this long is forgotten, its subnet freed; "0s": never
//! job_retention = "30d"         # an ended job is removed this long after it ended; "0s": never
//! # insecure = true            # plaintext, no client authentication: labs only
//! web_listen = "0.0.0.0:7949"   # /metrics over HTTPS (the [tls] certificate); "": none
//! metrics_allow = []            # CIDRs that may read /metrics without a token
//!
//! [tls]
//! ca = "/etc/geomx/tls/ca.pem"
//! cert = "/etc/geomx/tls/controller.pem"
//! key = "/etc/geomx/tls/controller-key.pem"
//!
//! [auth]
//! tokens_file = "/etc/geomx/tokens"        # NAME ROLE sha256:HEX per line, '#' comments
//! revocation_file = "/etc/geomx/revoked"   # `serial HEX` / `token NAME` per line
//! # tokens = ["..."]                        # inline, for tests
//! ```
//!
//! The tokens and revocation files are read at start (a bad line is a configuration error)
//! and again on SIGHUP and whenever they change ([`crate::credentials`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use geomx_proto::config_file::ConfigError;
use geomx_proto::config_file::{ConfigFile, HumanDuration, Settings, TlsFlags, TlsPick, TlsTable};
use geomx_proto::credentials::parse_inline_tokens;
use geomx_proto::tls::TlsFiles;
use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use toml::Spanned;

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/geomx/controller.toml";
/// Default listen address (all interfaces, port 7946).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7946";
/// Default address of the web listener (`/metrics`) of a controller run from its binary.
pub const DEFAULT_WEB_LISTEN: &str = "0.0.0.0:7949";
/// Default cluster CIDR.
pub const DEFAULT_CLUSTER_CIDR: &str = "172.17.0.0/16";
/// Default prefix length of host subnets.
pub const DEFAULT_HOST_SUBNET_PREFIX: u8 = 24;
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/geomx-controller";
/// Default heartbeat interval given to agents.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default grace period after which a silent host is lost.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Default time allowed for a graceful shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time after which a lost host is forgotten and its lease released (7 days).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default `job_retention`: an ended job is removed 30 days after it ended.
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Command-line flags (each also read from a `GEOMX_CONTROLLER_*` environment variable).
#[derive(Clone, Debug, Default, clap::Parser)]
#[command(
    name = "geomx-controller",
    version,
    about = "geomx control plane: admits hosts, leases container subnets, distributes topology"
)]
pub struct Args {
    /// Config file [default: /etc/geomx/controller.toml, if present].
    #[arg(long, global = true, env = "GEOMX_CONTROLLER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on [default: 0.0.0.0:7946].
    #[arg(long, env = "GEOMX_CONTROLLER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the web listener (`/metrics`; HTTPS with the controller's certificate),
    /// "" for none [default: 0.0.0.0:7949].
    #[arg(long, env = "GEOMX_CONTROLLER_WEB_LISTEN")]
    pub web_listen: Option<String>,
    /// CIDR every host subnet is carved from [default: 172.17.0.0/16].
    #[arg(long, env = "GEOMX_CONTROLLER_CLUSTER_CIDR")]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Prefix length of each host's subnet [default: 24].
    #[arg(long, env = "GEOMX_CONTROLLER_HOST_SUBNET_PREFIX")]
    pub host_subnet_prefix: Option<u8>,
    /// State directory (sled database) [default: /var/lib/geomx-controller].
    #[arg(long, global = true, env = "GEOMX_CONTROLLER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How often agents report, e.g. "1s", "500ms" [default: 1s].
    #[arg(long, env = "GEOMX_CONTROLLER_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// A host silent for this long is marked lost [default: 10s].
    #[arg(long, env = "GEOMX_CONTROLLER_GRACE_PERIOD", value_parser = humantime::parse_duration)]
    pub grace_period: Option<Duration>,
    /// Time allowed for a graceful shutdown [default: 10s].
    #[arg(long, env = "GEOMX_CONTROLLER_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// The cluster's data-plane backend: auto, host-gw, wireguard or vxlan [default: auto].
    #[arg(long, env = "GEOMX_CONTROLLER_BACKEND")]
    pub backend: Option<String>,
    /// A host lost for this long is forgotten and its subnet released; 0s: never [default: 7d].
    #[arg(long, env = "GEOMX_CONTROLLER_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// An ended job is removed (records, events, kept output) this long after it ended; 0s:
    /// never [default: 30d].
    #[arg(long, env = "GEOMX_CONTROLLER_JOB_RETENTION", value_parser = humantime::parse_duration)]
    pub job_retention: Option<Duration>,
    /// CA certificate (PEM) that signs agent and controller certificates.
    #[arg(long, env = "GEOMX_CONTROLLER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The controller's certificate (PEM).
    #[arg(long, env = "GEOMX_CONTROLLER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The controller's private key (PEM).
    #[arg(long, env = "GEOMX_CONTROLLER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// File of user bearer tokens: `NAME ROLE sha256:HEX` per line ('#' comments); reloaded
    /// on SIGHUP and when it changes.
    #[arg(long, env = "GEOMX_CONTROLLER_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Revocation list: `serial HEX` (agent or controller certificates) and `token NAME` per
    /// line; reloaded on SIGHUP and when it changes.
    #[arg(long, env = "GEOMX_CONTROLLER_REVOCATION_FILE")]
    pub revocation_file: Option<PathBuf>,
    /// Serve plaintext gRPC without client authentication. For throwaway labs only.
    #[arg(long, env = "GEOMX_CONTROLLER_INSECURE")]
    pub insecure: bool,
    /// What to do [default: serve].
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `geomx-controller` subcommands; without one it serves.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// The state directory, with the controller stopped: check, export, import (see
    /// docs/operations.md, "Backup and recovery").
    #[command(subcommand)]
    State(StateCommand),
}

/// `geomx-controller state ...`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Reads every record and decodes it; exit 0 when all do, 1 when one does not, 3 when
    /// the store is corrupt.
    Check,
    /// Writes every record to FILE ("-": standard output) as JSON lines.
    Export {
        /// The export file; written whole or not at all.
        file: PathBuf,
    },
    /// Restores an export into an empty (or new) state directory, in one atomic batch.
    Import {
        /// The export file ("-": standard input).
        file: PathBuf,
    },
}

/// The resolved, validated configuration of a controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Address to serve on; port 0 picks a free port (see
    /// [`crate::server::RunningController::local_addr`]).
    pub listen: SocketAddr,
    /// Address of the web listener serving `/metrics` ([`crate::web`]); `None`: none. HTTPS
    /// with the controller's certificate unless `insecure`. Port 0 picks a free port (see
    /// [`crate::server::RunningController::web_addr`]).
    pub web_listen: Option<SocketAddr>,
    /// Source networks that may read `/metrics` without a token (`metrics_allow`).
    pub metrics_allow: Vec<IpNet>,
    /// CIDR every host subnet is carved from.
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of host subnets.
    pub host_subnet_prefix: u8,
    /// sled state directory.
    pub state_dir: PathBuf,
    /// How often agents report.
    pub heartbeat_interval: Duration,
    /// After how long without a report a host is lost.
    pub grace_period: Duration,
    /// Time allowed for a graceful shutdown before connections are dropped.
    pub shutdown_timeout: Duration,
    /// A host lost for longer than this is forgotten and its lease released; zero: never.
    pub lease_ttl: Duration,
    /// An ended job is removed this long after it ended; zero: never.
    pub job_retention: Duration,
    /// The cluster's default data-plane backend (`auto`, `host-gw`, `wireguard`, `vxlan`).
    pub backend: String,
    /// TLS files; required unless `insecure`.
    pub tls: Option<TlsFiles>,
    /// Plaintext without client authentication.
    pub insecure: bool,
    /// Inline bearer tokens (`[auth] tokens`): plaintext secrets (role admin, named
    /// `inline-N`) or `NAME ROLE sha256:HEX` lines.
    pub tokens: Vec<String>,
    /// `[auth] tokens_file` (see [`crate::credentials`]).
    pub tokens_file: Option<PathBuf>,
    /// `[auth] revocation_file`.
    pub revocation_file: Option<PathBuf>,
    /// How often the two files are read for changes ([`crate::credentials::POLL_INTERVAL`]).
    pub credentials_poll: Duration,
}

impl ControllerConfig {
    /// A configuration with every default, serving TLS with `tls` and state in `state_dir`,
    /// except `web_listen`: off (a controller started in-process, as tests do, binds nothing
    /// it was not asked to; the binary's default is [`DEFAULT_WEB_LISTEN`]).
    pub fn new(state_dir: impl Into<PathBuf>, tls: Option<TlsFiles>) -> Self {
        ControllerConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid socket address"),
            web_listen: None,
            metrics_allow: Vec::new(),
            cluster_cidr: DEFAULT_CLUSTER_CIDR
                .parse()
                .expect("DEFAULT_CLUSTER_CIDR is a valid CIDR"),
            host_subnet_prefix: DEFAULT_HOST_SUBNET_PREFIX,
            state_dir: state_dir.into(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            grace_period: DEFAULT_GRACE_PERIOD,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            lease_ttl: DEFAULT_LEASE_TTL,
            job_retention: DEFAULT_JOB_RETENTION,
            backend: "auto".into(),
            tls,
            insecure: false,
            tokens: Vec::new(),
            tokens_file: None,
            revocation_file: None,
            credentials_poll: crate::credentials::POLL_INTERVAL,
        }
    }

    /// Where the user tokens and revocations come from.
    pub fn credential_sources(&self) -> crate::credentials::Sources {
        crate::credentials::Sources {
            inline: self.tokens.clone(),
            tokens_file: self.tokens_file.clone(),
            revocation_file: self.revocation_file.clone(),
        }
    }

    /// Checks the relations between settings (origins are reported as `config`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let origin = |_: &str| "config".to_owned();
        self.validate_with(&origin)
    }

    fn validate_with(&self, origin: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin(key),
            message,
        };
        let cidr = self.cluster_cidr;
        if cidr.trunc() != cidr {
            return Err(invalid(
                "cluster_cidr",
                format!("{cidr} has host bits set; did you mean {}?", cidr.trunc()),
            ));
        }
        if cidr.prefix_len() < 8 {
            return Err(invalid(
                "cluster_cidr",
                format!("{cidr} is too large: the prefix must be /8 or longer"),
            ));
        }
        let hp = self.host_subnet_prefix;
        if hp > 30 {
            return Err(invalid(
                "host_subnet_prefix",
                format!("/{hp} leaves no room for containers: use /30 or shorter (/24 is usual)"),
            ));
        }
        if hp < cidr.prefix_len() {
            return Err(invalid(
                "host_subnet_prefix",
                format!(
                    "/{hp} is larger than the cluster CIDR {cidr}: host subnets are carved from it"
                ),
            ));
        }
        for (key, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("grace_period", self.grace_period),
            ("shutdown_timeout", self.shutdown_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be longer than zero".into()));
            }
            if d > Duration::from_secs(24 * 3600) {
                return Err(invalid(key, "must be at most 24h".into()));
            }
        }
        if !self.lease_ttl.is_zero() && self.lease_ttl <= self.grace_period {
            return Err(invalid(
                "lease_ttl",
                format!(
                    "{} must be longer than grace_period ({}), or \"0s\" for never",
                    humantime::format_duration(self.lease_ttl),
                    humantime::format_duration(self.grace_period)
                ),
            ));
        }
        if self.heartbeat_interval < Duration::from_millis(50) {
            return Err(invalid(
                "heartbeat_interval",
                "must be at least 50ms".into(),
            ));
        }
        if self.grace_period < self.heartbeat_interval * 2 {
            return Err(invalid(
                "grace_period",
                format!(
                    "{} must be at least twice heartbeat_interval ({}), or hosts flap between ready and lost",
                    humantime::format_duration(self.grace_period),
                    humantime::format_duration(self.heartbeat_interval)
                ),
            ));
        }
        if !self.insecure && self.tls.is_none() {
            return Err(invalid(
                "tls",
                "TLS files are required: set [tls] ca, cert and key (make them with `geomxctl certs`), or run with --insecure for a throwaway lab".into(),
            ));
        }
        parse_inline_tokens(&self.tokens).map_err(|e| invalid("tokens", e))?;
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty".into()));
        }
        if let Some(web) = self.web_listen
            && web.port() != 0
            && web.port() == self.listen.port()
            && (web.ip() == self.listen.ip()
                || web.ip().is_unspecified()
                || self.listen.ip().is_unspecified())
        {
            return Err(invalid(
                "web_listen",
                format!(
                    "{web} is the gRPC listen address ({}): use another port (7949 is usual), or \"\" for none",
                    self.listen
                ),
            ));
        }
        Ok(())
    }

    /// Reads the config file named by `args` (or the default one if it exists), applies the
    /// flags, and validates. Returns the configuration and warnings worth logging.
    pub fn load(args: &Args) -> Result<(ControllerConfig, Vec<String>), ConfigError> {
        let file = ConfigFile::read(args.config.as_deref(), Path::new(DEFAULT_CONFIG_PATH))?;
        resolve(args, &file)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Spanned<SocketAddr>>,
    web_listen: Option<Spanned<String>>,
    metrics_allow: Option<Vec<Spanned<String>>>,
    cluster_cidr: Option<Spanned<Ipv4Net>>,
    host_subnet_prefix: Option<Spanned<u8>>,
    state_dir: Option<Spanned<PathBuf>>,
    heartbeat_interval: Option<Spanned<HumanDuration>>,
    grace_period: Option<Spanned<HumanDuration>>,
    shutdown_timeout: Option<Spanned<HumanDuration>>,
    lease_ttl: Option<Spanned<HumanDuration>>,
    job_retention: Option<Spanned<HumanDuration>>,
    backend: Option<Spanned<String>>,
    insecure: Option<bool>,
    tls: Option<TlsTable>,
    auth: Option<FileAuth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    tokens: Option<Vec<Spanned<String>>>,
    tokens_file: Option<Spanned<PathBuf>>,
    revocation_file: Option<Spanned<PathBuf>>,
}

/// Takes a value as it is (its type already checked it).
fn same<T>(v: T) -> Result<T, String> {
    Ok(v)
}

fn resolve(
    args: &Args,
    source: &ConfigFile,
) -> Result<(ControllerConfig, Vec<String>), ConfigError> {
    let file: FileConfig = source.parse()?;
    let mut settings = Settings::new(source, "GEOMX_CONTROLLER_");
    let mut warnings = Vec::new();
    let mut cfg = ControllerConfig::new(DEFAULT_STATE_DIR, None);
    cfg.web_listen = Some(
        DEFAULT_WEB_LISTEN
            .parse()
            .expect("DEFAULT_WEB_LISTEN is a valid socket address"),
    );
    let duration = |v: Result<Duration, HumanDuration>| Ok(v.unwrap_or_else(|f| f.0));

    if let Some(v) = settings.pick_same("listen", "listen", args.listen, file.listen, same)? {
        cfg.listen = v;
    }
    if let Some(v) = settings.pick(
        "web_listen",
        "web-listen",
        args.web_listen.clone(),
        file.web_listen,
        |v| parse_web_listen(&v.unwrap_or_else(|f| f)),
    )? {
        cfg.web_listen = v;
    }
    for entry in file.metrics_allow.unwrap_or_default() {
        let origin = source.origin("metrics_allow", entry.span());
        let net = parse_allowed_net(entry.get_ref())
            .map_err(|message| ConfigError::Invalid { origin, message })?;
        cfg.metrics_allow.push(net);
    }
    if let Some(v) = settings.pick_same(
        "cluster_cidr",
        "cluster-cidr",
        args.cluster_cidr,
        file.cluster_cidr,
        same,
    )? {
        cfg.cluster_cidr = v;
    }
    if let Some(v) = settings.pick_same(
        "host_subnet_prefix",
        "host-subnet-prefix",
        args.host_subnet_prefix,
        file.host_subnet_prefix,
        same,
    )? {
        cfg.host_subnet_prefix = v;
    }
    if let Some(v) = settings.pick(
        "state_dir",
        "state-dir",
        args.state_dir.clone(),
        file.state_dir,
        |v| Ok(v.unwrap_or_else(|p: PathBuf| source.path_of(&p))),
    )? {
        cfg.state_dir = v;
    }
    for (key, flag, arg, value, target) in [
        (
            "heartbeat_interval",
            "heartbeat-interval",
            args.heartbeat_interval,
            file.heartbeat_interval,
            &mut cfg.heartbeat_interval,
        ),
        (
            "grace_period",
            "grace-period",
            args.grace_period,
            file.grace_period,
            &mut cfg.grace_period,
        ),
        (
            "shutdown_timeout",
            "shutdown-timeout",
            args.shutdown_timeout,
            file.shutdown_timeout,
            &mut cfg.shutdown_timeout,
        ),
        (
            "lease_ttl",
            "lease-ttl",
            args.lease_ttl,
            file.lease_ttl,
            &mut cfg.lease_ttl,
        ),
        (
            "job_retention",
            "job-retention",
            args.job_retention,
            file.job_retention,
            &mut cfg.job_retention,
        ),
    ] {
        if let Some(v) = settings.pick(key, flag, arg, value, duration)? {
            *target = v;
        }
    }

    if let Some(b) = settings.pick(
        "backend",
        "backend",
        args.backend.clone(),
        file.backend,
        |v| {
            let b = v.unwrap_or_else(|f| f);
            match b.as_str() {
                "auto" | "host-gw" | "wireguard" | "vxlan" => Ok(b),
                other => Err(format!(
                    "{other:?} is not a backend: use \"auto\", \"host-gw\", \"wireguard\" or \"vxlan\""
                )),
            }
        },
    )? {
        cfg.backend = b;
    }

    cfg.insecure = args.insecure || file.insecure.unwrap_or(false);

    // TLS: each file from its flag or the [tls] table.
    let flags = TlsFlags {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    };
    match settings.tls(&flags, file.tls) {
        TlsPick::Complete(files) if cfg.insecure => {
            let _ = files;
            warnings.push("insecure mode: the TLS files are ignored".to_owned());
        }
        TlsPick::Complete(files) => cfg.tls = Some(files),
        TlsPick::None => {}
        TlsPick::Incomplete(_) if cfg.insecure => {}
        TlsPick::Incomplete(missing) => {
            return Err(ConfigError::Invalid {
                origin: "tls".into(),
                message: format!(
                    "incomplete: {} missing (set [tls] ca, cert and key, or --tls-ca/--tls-cert/--tls-key)",
                    missing.join(", ")
                ),
            });
        }
    }

    // Tokens: inline list plus the tokens file; the revocation list. Read here to refuse a
    // bad line at start (exit 2); the server reads them again (and on every change).
    let auth = file.auth.unwrap_or_default();
    for t in auth.tokens.unwrap_or_default() {
        let origin = source.origin("auth.tokens", t.span());
        let t = t.into_inner();
        parse_inline_tokens(std::slice::from_ref(&t)).map_err(|e| ConfigError::Invalid {
            origin,
            message: e.trim_start_matches("auth.tokens[0]: ").to_owned(),
        })?;
        cfg.tokens.push(t);
    }
    cfg.tokens.dedup();
    cfg.tokens_file = args
        .tokens_file
        .clone()
        .or_else(|| auth.tokens_file.map(|s| source.path_of(s.get_ref())));
    cfg.revocation_file = args
        .revocation_file
        .clone()
        .or_else(|| auth.revocation_file.map(|s| source.path_of(s.get_ref())));
    let (credentials, _) = crate::credentials::Credentials::load(cfg.credential_sources())
        .map_err(|message| ConfigError::Invalid {
            origin: "[auth]".into(),
            message,
        })?;
    let token_count = credentials.snapshot().tokens.len();

    if cfg.insecure {
        warnings.push(
            "INSECURE MODE: plaintext gRPC, agents are not authenticated; never use this outside a throwaway lab"
                .to_owned(),
        );
    } else if token_count == 0 {
        warnings.push(
            "no user tokens configured: HostService and JobService refuse every call (set [auth] tokens_file)"
                .to_owned(),
        );
    }

    cfg.validate_with(&|key: &str| settings.origin(key))?;
    Ok((cfg, warnings))
}

/// `web_listen`: an `address:port`, or "" for none.
fn parse_web_listen(v: &str) -> Result<Option<SocketAddr>, String> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    v.trim().parse().map(Some).map_err(|_| {
        format!("{v:?} is not an address:port (e.g. \"{DEFAULT_WEB_LISTEN}\"), or \"\" for no web listener")
    })
}

/// One `metrics_allow` entry: a CIDR (`10.0.0.0/8`) or a single address (`192.0.2.7`).
fn parse_allowed_net(v: &str) -> Result<IpNet, String> {
    let v = v.trim();
    if let Ok(net) = v.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "{net} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    v.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{v:?} is not a CIDR (e.g. \"10.0.0.0/8\") or an address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn load_text(
        text: &str,
        extra: &[&str],
    ) -> Result<(ControllerConfig, Vec<String>), ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, text).unwrap();
        let mut argv = vec!["geomx-controller", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).unwrap();
        ControllerConfig::load(&args)
    }

    #[test]
    fn defaults_and_overrides() {
        let (cfg, warnings) = load_text(
            "cluster_cidr = \"10.244.0.0/16\"\nheartbeat_interval = \"500ms\"\ninsecure = true\nstate_dir = \"state\"\n",
            &["--grace-period", "3s"],
        )
        .unwrap();
        assert_eq!(cfg.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(cfg.host_subnet_prefix, 24);
        assert_eq!(cfg.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(cfg.grace_period, Duration::from_secs(3));
        assert_eq!(cfg.listen.port(), 7946);
        assert!(cfg.insecure);
        assert!(cfg.state_dir.is_absolute() && cfg.state_dir.ends_with("state"));
        assert!(warnings.iter().any(|w| w.contains("INSECURE")));
    }

    #[test]
    fn web_listen_and_metrics_allow() {
        let (cfg, _) = load_text("insecure = true\n", &[]).unwrap();
        assert_eq!(cfg.web_listen, Some("0.0.0.0:7949".parse().unwrap()));
        assert!(cfg.metrics_allow.is_empty());
        let (cfg, _) = load_text(
            "insecure = true\nweb_listen = \"127.0.0.1:9100\"\nmetrics_allow = [\"10.0.0.0/8\", \"192.0.2.7\", \"::1\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(cfg.web_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let allowed: Vec<String> = cfg.metrics_allow.iter().map(ToString::to_string).collect();
        assert_eq!(allowed, ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]);
        let (cfg, _) = load_text("insecure = true\n", &["--web-listen", ""]).unwrap();
        assert_eq!(cfg.web_listen, None);

        let err = load_text("insecure = true\nweb_listen = \"nowhere\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller.toml:2:14 (web_listen)"), "{err}");
        let err = load_text("insecure = true\nmetrics_allow = [\"10.1.2.3/8\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(metrics_allow)") && err.contains("did you mean 10.0.0.0/8"),
            "{err}"
        );
        let err = load_text("insecure = true\nweb_listen = \"0.0.0.0:7946\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(web_listen)") && err.contains("gRPC listen address"),
            "{err}"
        );
    }

    #[test]
    fn errors_point_at_the_value() {
        let err = load_text("insecure = true\n\ncluster_cidr = \"172.17.0.0/33\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller.toml:3:16 (cluster_cidr)"), "{err}");
        let err = load_text("insecure = true\nlisten = 7946\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller.toml:2:10"), "{err}");
        let err = load_text("insecure = true\nlisen = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("controller.toml:2:1") && err.contains("lisen"),
            "{err}"
        );
        let err = load_text("insecure = true\nhost_subnet_prefix = 12\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("host_subnet_prefix") && err.contains(":2:"),
            "{err}"
        );
        let err = load_text("insecure = true\ngrace_period = \"1s\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least twice"), "{err}");
        let err = load_text("[auth]\ntokens = [\"short\"]\n", &["--insecure"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:11") && err.contains("at least 16"),
            "{err}"
        );
    }

    #[test]
    fn lease_ttl_defaults_to_a_week_and_zero_means_never() {
        let (cfg, _) = load_text("insecure = true\n", &[]).unwrap();
        assert_eq!(cfg.lease_ttl, DEFAULT_LEASE_TTL);
        let (cfg, _) = load_text("insecure = true\nlease_ttl = \"0s\"\n", &[]).unwrap();
        assert!(cfg.lease_ttl.is_zero());
        let (cfg, _) = load_text("insecure = true\n", &["--lease-ttl", "1h"]).unwrap();
        assert_eq!(cfg.lease_ttl, Duration::from_secs(3600));
        let err = load_text("insecure = true\nlease_ttl = \"5s\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("controller.toml:2:13 (lease_ttl)")
                && err.contains("longer than grace_period"),
            "{err}"
        );
        let err = load_text("insecure = true\nlease_ttl = \"a week\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("controller.toml:2:13 (lease_ttl): \"a week\" is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn job_retention_defaults_to_30_days_and_zero_means_never() {
        let (cfg, _) = load_text("insecure = true\n", &[]).unwrap();
        assert_eq!(cfg.job_retention, DEFAULT_JOB_RETENTION);
        let (cfg, _) = load_text("insecure = true\njob_retention = \"0s\"\n", &[]).unwrap();
        assert!(cfg.job_retention.is_zero());
        let (cfg, _) = load_text("insecure = true\njob_retention = \"2d\"\n", &[]).unwrap();
        assert_eq!(cfg.job_retention, Duration::from_secs(2 * 24 * 3600));
        let err = load_text("insecure = true\njob_retention = \"long\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("(job_retention)"), "{err}");
    }

    #[test]
    fn tls_is_required_unless_insecure() {
        let err = load_text("", &[]).unwrap_err().to_string();
        assert!(err.contains("TLS files are required"), "{err}");
        let err = load_text("[tls]\nca = \"ca.pem\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cert, key missing"), "{err}");
        let (cfg, warnings) = load_text(
            "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
            &[],
        )
        .unwrap();
        assert!(cfg.tls.unwrap().ca.is_absolute());
        assert!(warnings.iter().any(|w| w.contains("no user tokens")));
    }

    #[test]
    fn tokens_file_lines() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "# users\n0123456789abcdef-alice\n\nbad token\n").unwrap();
        let err = load_text(
            "insecure = true\n",
            &["--tokens-file", tokens.to_str().unwrap()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tokens:4: expected `NAME ROLE"), "{err}");
        let h = geomx_proto::credentials::hash_secret("0123456789abcdef0123");
        std::fs::write(
            &tokens,
            format!("ci submit {h}\nci read {h}\nro reader {h}\n"),
        )
        .unwrap();
        let err = load_text(
            "insecure = true\n",
            &["--tokens-file", tokens.to_str().unwrap()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tokens:2: token name \"ci\" is already used on line 1")
                && err.contains("tokens:3: unknown role \"reader\""),
            "{err}"
        );
    }

    #[test]
    fn the_revocation_file_comes_from_auth_or_the_flag_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let revoked = dir.path().join("revoked");
        std::fs::write(&revoked, "serial 4a:01\ntoken ci\n").unwrap();
        let (cfg, _) = load_text(
            &format!(
                "insecure = true\n[auth]\nrevocation_file = \"{}\"\n",
                revoked.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(cfg.revocation_file.as_deref(), Some(revoked.as_path()));
        std::fs::write(&revoked, "serial 4a:01\ncert b\n").unwrap();
        let err = load_text(
            "insecure = true\n",
            &["--revocation-file", revoked.to_str().unwrap()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("revoked:2: unknown kind \"cert\""), "{err}");
        let err = load_text(
            "insecure = true\n",
            &[
                "--revocation-file",
                dir.path().join("missing").to_str().unwrap(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot read") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn the_backend_comes_from_the_file_or_the_flag_and_is_checked() {
        let (cfg, _) = load_text("insecure = true\n", &[]).unwrap();
        assert_eq!(cfg.backend, "auto");
        for b in ["auto", "host-gw", "wireguard", "vxlan"] {
            let (cfg, _) =
                load_text(&format!("insecure = true\nbackend = \"{b}\"\n"), &[]).unwrap();
            assert_eq!(cfg.backend, b);
        }
        let (cfg, _) = load_text(
            "insecure = true\nbackend = \"wireguard\"\n",
            &["--backend", "vxlan"],
        )
        .unwrap();
        assert_eq!(cfg.backend, "vxlan", "the flag wins");
        let err = load_text("insecure = true\nbackend = \"weave\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("controller.toml:2:") && err.contains("\"weave\" is not a backend"),
            "{err}"
        );
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../../systemd/controller.toml.example");
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "0123456789abcdef0123\n").unwrap();
        let revoked = dir.path().join("revoked");
        std::fs::write(&revoked, "").unwrap();
        let (cfg, _) = load_text(
            text,
            &[
                "--tokens-file",
                tokens.to_str().unwrap(),
                "--revocation-file",
                revoked.to_str().unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 7946);
        assert_eq!(cfg.grace_period, DEFAULT_GRACE_PERIOD);
        assert_eq!(
            cfg.tls.unwrap().cert,
            PathBuf::from("/etc/geomx/tls/controller.pem")
        );
        assert_eq!(cfg.tokens_file.as_deref(), Some(tokens.as_path()));
    }
}
