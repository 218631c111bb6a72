//! `geomx.v1.AgentNodeService`, served on the agent's API address for the controller:
//! mTLS requiring a client certificate signed by the geomx CA, and only the controller's
//! (OU=controller) may call it ([`require_controller`]). In insecure mode it is plaintext
//! and open (labs only).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use geomx_proto::tls::{TlsMaterial, require_controller};
use geomx_proto::v1::agent_node_service_server::{AgentNodeService, AgentNodeServiceServer};
use geomx_proto::v1::{
    AgentPullRequest, AgentPullResponse, BindSourceCheck, CheckBindSourcesRequest,
    CheckBindSourcesResponse, ForgetJobRequest, ForgetJobResponse, LogChunk, NodeLogsRequest,
    ResolveImageRequest, ResolveImageResponse,
};
use geomx_runtime::{CancellationToken, Engine, PullCause, Runtime, RuntimeError};
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::backoff::ErrorLog;
use super::docker::error_chain;
use super::{Ctx, convert};

/// Longest job or node name accepted (the runtime's limit).
const MAX_NAME_LEN: usize = 100;
/// Longest image reference accepted.
const MAX_IMAGE_LEN: usize = 512;

/// The service: logs of this host's role containers.
pub struct NodeApi<E: Engine> {
    runtime: watch::Receiver<Option<Runtime<E>>>,
    require_cert: bool,
    shutdown: CancellationToken,
}

impl<E: Engine> NodeApi<E> {
    /// The service over the runtime published in `runtime`; `require_cert`: only the
    /// controller's certificate may call it.
    pub fn new(
        runtime: watch::Receiver<Option<Runtime<E>>>,
        require_cert: bool,
        shutdown: CancellationToken,
    ) -> Self {
        NodeApi {
            runtime,
            require_cert,
            shutdown,
        }
    }
}

fn check_name(what: &str, v: &str) -> Result<(), Status> {
    let ok = !v.is_empty()
        && v.len() <= MAX_NAME_LEN
        && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{what}: must be 1..={MAX_NAME_LEN} characters of [a-zA-Z0-9_.-], starting with a letter or digit"
        )))
    }
}

fn check_image(v: &str) -> Result<(), Status> {
    let ok = !v.is_empty()
        && v.len() <= MAX_IMAGE_LEN
        && v.chars().all(|c| c.is_ascii_graphic())
        && !v.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "image: must be a reference (repo[:tag] or repo@sha256:...) of 1..={MAX_IMAGE_LEN} printable characters"
        )))
    }
}

/// Most paths one `CheckBindSources` may ask about.
pub const MAX_BIND_CHECKS: usize = 1024;
/// Longest path `CheckBindSources` checks (a job file's limit on a mount source).
const MAX_BIND_PATH_LEN: usize = 1024;

/// The paths of a `CheckBindSources` request, if they are within its limits.
fn check_paths(paths: &[String]) -> Result<(), Status> {
    if paths.len() > MAX_BIND_CHECKS {
        return Err(Status::invalid_argument(format!(
            "{} paths: at most {MAX_BIND_CHECKS} per request",
            paths.len()
        )));
    }
    let max = MAX_BIND_PATH_LEN;
    if let Some(p) = paths
        .iter()
        .find(|p| p.is_empty() || p.len() > max || p.contains('\0'))
    {
        return Err(Status::invalid_argument(format!(
            "path of {} bytes: paths are 1..={max} bytes without NUL",
            p.len()
        )));
    }
    Ok(())
}

/// What this host has of bind source `path`: the runtime's check before it creates a
/// container (the path exists; where its symlinks lead passes the job file's rules).
fn check_bind_source<E: Engine>(runtime: &Runtime<E>, path: &str) -> BindSourceCheck {
    let (state, reason) = match runtime.bind_source_refusal(path) {
        None => ("exists", String::new()),
        Some(RuntimeError::BindSourceMissing { .. }) => ("missing", String::new()),
        Some(e) => ("refused", e.to_string()),
    };
    BindSourceCheck {
        path: path.to_owned(),
        state: state.to_owned(),
        reason,
    }
}

fn status_of(e: &RuntimeError) -> Status {
    match e {
        RuntimeError::NoSuchNode { .. } => Status::not_found(e.to_string()),
        RuntimeError::ImageUnavailable { cause, .. } => {
            let m = e.to_string();
            match cause {
                PullCause::NotFound => Status::not_found(m),
                PullCause::Unauthorized => Status::permission_denied(m),
                PullCause::Unreachable
                | PullCause::RegistryError
                | PullCause::DockerUnavailable => Status::unavailable(m),
                PullCause::TimedOut(_) => Status::deadline_exceeded(m),
                PullCause::DiskFull => Status::resource_exhausted(m),
                PullCause::Untrusted | PullCause::Failed => Status::failed_precondition(m),
            }
        }
        RuntimeError::Docker { .. } | RuntimeError::Io { .. } => {
            Status::unavailable(error_chain(e))
        }
        _ => Status::internal(error_chain(e)),
    }
}

#[tonic::async_trait]
impl<E: Engine> AgentNodeService for NodeApi<E> {
    type LogsStream = BoxStream<'static, Result<LogChunk, Status>>;

    async fn logs(
        &self,
        request: Request<NodeLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        self.authorize(&request, "log")?;
        let req = request.into_inner();
        check_name("job", &req.job)?;
        check_name("node", &req.node)?;
        let runtime = self.runtime()?;
        debug!(job = %req.job, node = %req.node, follow = req.follow, tail = req.tail, "streaming logs");
        let stream = runtime
            .logs_of(&req.job, &req.node, req.generation, req.follow, req.tail)
            .await
            .map_err(|e| status_of(&e))?;
        let stream = stream
            .map(|r| r.map(convert::log_chunk).map_err(|e| status_of(&e)))
            // a following stream ends when the agent stops
            .take_until(self.shutdown.clone().cancelled_owned())
            .boxed();
        Ok(Response::new(stream))
    }

    async fn forget_job(
        &self,
        request: Request<ForgetJobRequest>,
    ) -> Result<Response<ForgetJobResponse>, Status> {
        self.authorize(&request, "forget")?;
        let req = request.into_inner();
        check_name("job", &req.job)?;
        let runtime = self.runtime()?;
        let had_logs = runtime.forget_logs(&req.job).map_err(|e| status_of(&e))?;
        debug!(job = %req.job, had_logs, "kept output deleted");
        Ok(Response::new(ForgetJobResponse { had_logs }))
    }

    async fn resolve_image(
        &self,
        request: Request<ResolveImageRequest>,
    ) -> Result<Response<ResolveImageResponse>, Status> {
        self.authorize(&request, "resolve")?;
        let req = request.into_inner();
        check_image(&req.image)?;
        let runtime = self.runtime()?;
        let r = runtime
            .resolve_image(&req.image)
            .await
            .inspect_err(|e| debug!(image = %req.image, error = %e, "resolve failed"))
            .map_err(|e| status_of(&e))?;
        debug!(image = %req.image, pinned = %r.pinned, "resolved");
        Ok(Response::new(ResolveImageResponse {
            pinned: r.pinned,
            digest: r.digest,
            registry: r.registry,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<AgentPullRequest>,
    ) -> Result<Response<AgentPullResponse>, Status> {
        self.authorize(&request, "pull")?;
        let req = request.into_inner();
        check_image(&req.image)?;
        let runtime = self.runtime()?;
        let timeout = Some(Duration::from_millis(req.timeout_ms)).filter(|t| !t.is_zero());
        let started = runtime
            .pull_image(&req.image, timeout)
            .await
            .map_err(|e| status_of(&e))?;
        info!(image = %req.image, started, "pull requested by the controller");
        Ok(Response::new(AgentPullResponse { started }))
    }

    async fn check_bind_sources(
        &self,
        request: Request<CheckBindSourcesRequest>,
    ) -> Result<Response<CheckBindSourcesResponse>, Status> {
        self.authorize(&request, "bind source check")?;
        let paths = request.into_inner().paths;
        check_paths(&paths)?;
        let runtime = self.runtime()?;
        // filesystem calls (a hung NFS mount blocks one): off the async workers
        let sources = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|p| check_bind_source(&runtime, p))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(format!("checking bind sources: {e}")))?;
        debug!(
            paths = sources.len(),
            missing = sources.iter().filter(|s| s.state != "exists").count(),
            "bind sources checked for the controller"
        );
        Ok(Response::new(CheckBindSourcesResponse { sources }))
    }
}

impl<E: Engine> NodeApi<E> {
    /// Only the controller's certificate may call (unless insecure).
    fn authorize<T>(&self, request: &Request<T>, what: &str) -> Result<(), Status> {
        if self.require_cert {
            require_controller(request).inspect_err(|s| {
                warn!(peer = ?request.remote_addr(), error = %s.message(), "{what} request refused");
            })?;
        }
        Ok(())
    }

    fn runtime(&self) -> Result<Runtime<E>, Status> {
        self.runtime
            .borrow()
            .clone()
            .ok_or_else(|| Status::unavailable("this agent is not connected to Docker yet"))
    }
}

/// Time a caller has to finish its TLS handshake with the agent API.
pub const API_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive of the agent API: a connection silent for interval + timeout (nothing
/// read, not even a ping's answer) is closed.
pub const API_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`API_KEEPALIVE_INTERVAL`].
pub const API_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most connections the agent API keeps open at once; one more is closed at once. Only
/// the controller calls it (a few connections); the cap bounds what a flood costs.
pub const API_MAX_CONNECTIONS: usize = 64;
/// Most concurrent calls (streams) on one connection.
pub const API_MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Largest header block accepted (16 KiB).
pub const API_MAX_HEADER_LIST_SIZE: u32 = 16 << 10;

/// Serves the API on `addr` (binding retried with backoff until it works) until
/// `shutdown`: mTLS with a handshake deadline, HTTP/2 keepalive, an idle deadline per
/// connection and at most [`API_MAX_CONNECTIONS`] of them (see [`geomx_proto::incoming`]).
pub async fn serve<E: Engine>(
    ctx: Arc<Ctx<E>>,
    addr: SocketAddr,
    tls: Option<TlsMaterial>,
    shutdown: CancellationToken,
) {
    let mut backoff = ctx.settings.backoff();
    let mut errors = ErrorLog::default();
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                let msg = e.to_string();
                if errors.failed(&msg) {
                    warn!(%addr, error = %msg, "cannot listen for the controller's API calls yet (logs); retrying");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    };
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(API_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(API_KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(API_MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(API_MAX_STREAMS_PER_CONNECTION);
    if let Some(tls) = &tls {
        builder = match builder.tls_config(
            tls.server_config_client_required()
                .timeout(API_TLS_HANDSHAKE_TIMEOUT),
        ) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot serve the agent API with TLS");
                return;
            }
        };
    }
    let api = NodeApi::new(ctx.runtime.subscribe(), tls.is_some(), shutdown.clone());
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let incoming = geomx_proto::incoming::guarded(
        incoming,
        API_KEEPALIVE_INTERVAL.saturating_add(API_KEEPALIVE_TIMEOUT),
        API_MAX_CONNECTIONS,
    );
    info!(%addr, mtls = tls.is_some(), "serving the agent API (AgentNodeService, controller only)");
    if let Err(e) = builder
        .add_service(AgentNodeServiceServer::new(api))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
    {
        warn!(error = %error_chain(&e), "the agent API stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CheckBindSources` answers per path, in order: a path that exists, one missing, one
    /// whose symlink leads into /etc (refused, naming where it leads); too many paths or
    /// an overlong one are INVALID_ARGUMENT.
    #[tokio::test]
    async fn bind_sources_are_checked_like_before_a_container_is_created() {
        use geomx_runtime::fake::FakeEngine;
        let fake = FakeEngine::new(&[]);
        {
            let mut st = fake.lock();
            st.paths.insert("/srv/geomx/a".into());
            st.paths.insert("/srv/geomx/link".into());
            st.links.insert("/srv/geomx/link".into(), "/etc/ssl".into());
        }
        let runtime = Runtime::start(fake, geomx_runtime::RuntimeConfig::default())
            .await
            .expect("runtime");
        let (_tx, rx) = watch::channel(Some(runtime));
        let api = NodeApi::new(rx, false, CancellationToken::new());
        let ask = |paths: Vec<String>| {
            api.check_bind_sources(Request::new(CheckBindSourcesRequest { paths }))
        };
        let answer = ask(vec![
            "/srv/geomx/a".into(),
            "/srv/geomx/b".into(),
            "/srv/geomx/link".into(),
        ])
        .await
        .expect("checked")
        .into_inner()
        .sources;
        let got: Vec<(&str, &str)> = answer
            .iter()
            .map(|s| (s.path.as_str(), s.state.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("/srv/geomx/a", "exists"),
                ("/srv/geomx/b", "missing"),
                ("/srv/geomx/link", "refused")
            ]
        );
        assert!(
            answer[2]
                .reason
                .contains("resolves to /etc/ssl, which lies in /etc"),
            "{}",
            answer[2].reason
        );
        let too_many = vec!["/srv/x".to_string(); MAX_BIND_CHECKS + 1];
        assert_eq!(
            ask(too_many).await.expect_err("too many").code(),
            tonic::Code::InvalidArgument
        );
        let long = format!("/{}", "x".repeat(MAX_BIND_PATH_LEN));
        assert_eq!(
            ask(vec![long]).await.expect_err("too long").code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("job", "job1").is_ok());
        assert!(check_name("node", "a-worker-0").is_ok());
        assert!(check_name("job", "").is_err());
        assert!(check_name("job", "../etc").is_err());
        assert!(check_name("job", &"x".repeat(101)).is_err());
        assert!(check_image("10.1.1.253:5000/geomx/test@sha256:ab").is_ok());
        assert!(check_image("").is_err());
        assert!(check_image("a b").is_err());
        assert!(check_image("-x").is_err());
        for (cause, code) in [
            (PullCause::NotFound, tonic::Code::NotFound),
            (PullCause::Unauthorized, tonic::Code::PermissionDenied),
            (PullCause::Unreachable, tonic::Code::Unavailable),
            (
                PullCause::TimedOut(std::time::Duration::from_secs(20)),
                tonic::Code::DeadlineExceeded,
            ),
        ] {
            let e = RuntimeError::ImageUnavailable {
                image: "r:5000/x:1".into(),
                registry: "r:5000".into(),
                cause,
                message: "m".into(),
            };
            let s = status_of(&e);
            assert_eq!(s.code(), code, "{cause:?}");
            assert!(
                s.message().contains("r:5000/x:1 on registry r:5000"),
                "{}",
                s.message()
            );
        }
        assert_eq!(
            status_of(&RuntimeError::NoSuchNode {
                job: "j".into(),
                node: "n".into()
            })
            .code(),
            tonic::Code::NotFound
        );
    }
}
