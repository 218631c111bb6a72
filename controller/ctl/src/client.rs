//! Connecting to the controller; used by every subcommand that talks to it.
//!
//! * `--controller URL` (env `GEOMX_CONTROLLER`): `https://host:7946`; a bare `host:port`
//!   means https. `http://` is refused unless `--insecure` is given (then a warning is
//!   printed): the controller must have been started with `--insecure` too.
//! * `--ca FILE` (env `GEOMX_CA`): the CA that signed the controller's certificate; default
//!   `/etc/geomx/tls/ca.pem` when it exists. Only this CA is trusted.
//! * `--token T` (env `GEOMX_TOKEN`): sent as `authorization: Bearer T` on every call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use geomx_proto::tls::{BearerInterceptor, client_config_ca_only, load_ca};
use geomx_proto::v1::host_service_client::HostServiceClient;
use geomx_proto::v1::job_service_client::JobServiceClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::Cli;

/// CA file used when `--ca` is not given and the file exists.
pub const DEFAULT_CA: &str = "/etc/geomx/tls/ca.pem";

/// How to reach the controller.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Controller URL.
    pub controller: String,
    /// Bearer token.
    pub token: Option<String>,
    /// CA file.
    pub ca: Option<PathBuf>,
    /// Allow plaintext `http://`.
    pub insecure: bool,
}

impl ConnectOptions {
    /// The options given on the command line.
    pub fn from_cli(cli: &Cli) -> Self {
        ConnectOptions {
            controller: cli.controller.clone(),
            token: cli.token.clone(),
            ca: cli.ca.clone(),
            insecure: cli.insecure,
        }
    }
}

/// Adds the bearer token, when there is one.
#[derive(Clone, Debug)]
pub struct Credentials(Option<BearerInterceptor>);

impl Interceptor for Credentials {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &mut self.0 {
            Some(bearer) => bearer.call(request),
            None => Ok(request),
        }
    }
}

/// A connection to the controller's user API.
#[derive(Clone, Debug)]
pub struct Remote {
    channel: Channel,
    credentials: Credentials,
    url: String,
}

/// Client of `HostService`.
pub type HostClient = HostServiceClient<InterceptedService<Channel, Credentials>>;
/// Client of `JobService`.
#[allow(dead_code, reason = "used by the job subcommands (issue 5)")]
pub type JobClient = JobServiceClient<InterceptedService<Channel, Credentials>>;

impl Remote {
    /// The `HostService` client.
    pub fn hosts(&self) -> HostClient {
        HostServiceClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }

    /// The `JobService` client.
    #[allow(dead_code, reason = "used by the job subcommands (issue 5)")]
    pub fn jobs(&self) -> JobClient {
        JobServiceClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }

    /// The controller URL.
    #[allow(dead_code, reason = "used by the job subcommands (issue 5)")]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Explains a failed call in words a person can act on.
    pub fn explain(&self, what: &str, status: Status) -> anyhow::Error {
        explain_status(&self.url, what, &status)
    }
}

/// Explains a failed call to `url`.
pub fn explain_status(url: &str, what: &str, status: &Status) -> anyhow::Error {
    let msg = status.message();
    let hint = match status.code() {
        Code::Unauthenticated if msg.contains("revoked") => {
            " (the token was revoked: ask an admin for a new one)"
        }
        Code::Unauthenticated => {
            " (check --token / GEOMX_TOKEN against the controller's tokens file)"
        }
        Code::PermissionDenied if msg.contains("needs role") => {
            " (the token's role does not allow this: ask an admin for a token with that role)"
        }
        Code::PermissionDenied => " (user calls need a token, not an agent certificate)",
        Code::Unavailable => {
            " (is the controller running and reachable? do --controller and --ca match it?)"
        }
        Code::Unimplemented => " (the controller does not offer this yet)",
        _ => "",
    };
    anyhow::anyhow!("{what} at {url}: {:?}: {msg}{hint}", status.code())
}

/// Normalizes the controller URL and checks its scheme against `insecure`.
pub fn normalize_url(url: &str, insecure: bool) -> anyhow::Result<(String, bool)> {
    let url = url.trim().trim_end_matches('/');
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}")
    };
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .with_context(|| format!("--controller {url:?} is not a URL"))?;
    if uri.host().is_none() {
        bail!("--controller {url:?} has no host");
    }
    match uri.scheme_str() {
        Some("https") => Ok((url, true)),
        Some("http") if insecure => Ok((url, false)),
        Some("http") => bail!(
            "refusing plaintext {url}: use https:// (the default), or pass --insecure for a controller started with --insecure"
        ),
        _ => bail!("--controller {url:?} must start with https://"),
    }
}

/// Connects to the controller (TLS unless `http://` with `--insecure`).
pub async fn connect(opts: &ConnectOptions) -> anyhow::Result<Remote> {
    let (url, tls) = normalize_url(&opts.controller, opts.insecure)?;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--controller {url:?} is not a valid endpoint"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if tls {
        if opts.insecure {
            eprintln!(
                "warning: --insecure has no effect on {url}: the controller's certificate is still verified"
            );
        }
        let ca_path = match &opts.ca {
            Some(p) => p.clone(),
            None if Path::new(DEFAULT_CA).exists() => PathBuf::from(DEFAULT_CA),
            None => bail!(
                "no CA certificate: pass --ca FILE or set GEOMX_CA (the ca.pem that signed the controller's certificate)"
            ),
        };
        let ca = load_ca(&ca_path)?;
        endpoint = endpoint
            .tls_config(client_config_ca_only(&ca))
            .context("TLS configuration")?;
    } else {
        eprintln!(
            "warning: plaintext connection to {url} (--insecure): the token and everything else travel unencrypted"
        );
    }
    let credentials = match opts.token.as_deref().map(str::trim) {
        Some(t) if !t.is_empty() => Credentials(Some(
            BearerInterceptor::new(t).context("--token / GEOMX_TOKEN")?,
        )),
        _ if tls => bail!("no token: pass --token or set GEOMX_TOKEN"),
        _ => Credentials(None),
    };
    let channel = endpoint.connect().await.map_err(|e| {
        let mut msg = format!("cannot reach the controller at {url}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        anyhow::anyhow!(msg)
    })?;
    Ok(Remote {
        channel,
        credentials,
        url,
    })
}

/// A single-threaded runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("10.1.1.1:7946", false).unwrap(),
            ("https://10.1.1.1:7946".to_owned(), true)
        );
        assert_eq!(
            normalize_url("https://ctl.example:7946/", false).unwrap(),
            ("https://ctl.example:7946".to_owned(), true)
        );
        let err = normalize_url("http://127.0.0.1:7946", false).unwrap_err();
        assert!(err.to_string().contains("--insecure"), "{err}");
        assert_eq!(
            normalize_url("http://127.0.0.1:7946", true).unwrap(),
            ("http://127.0.0.1:7946".to_owned(), false)
        );
        assert!(normalize_url("ftp://x", true).is_err());
    }
}
