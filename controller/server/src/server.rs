//! Wiring: store, membership, services, TLS, health, reflection, background tasks, and
//! graceful shutdown.
//!
//! ```no_run
//! # async fn demo(config: geomx_controller::ControllerConfig) -> Result<(), geomx_controller::ServerError> {
//! let running = geomx_controller::start(config).await?;
//! println!("serving on {} as {}", running.local_addr(), running.controller_id());
//! running.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use geomx_proto::tls::{TlsError, TlsMaterial};
use geomx_proto::v1::agent_service_server::AgentServiceServer;
use geomx_proto::v1::host_service_server::HostServiceServer;
use geomx_proto::v1::job_service_server::JobServiceServer;
use geomx_proto::web::{WebLimits, WebServer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::agents::AgentApi;
use crate::auth::Auth;
use crate::config::{ConfigError, ControllerConfig};
use crate::credentials::{Credentials, MethodRoles};
use crate::dashboard::Dashboard;
use crate::dashboard::curves::Curves;
use crate::hosts::HostApi;
use crate::jobs::stub::NoJobApi;
use crate::jobs::{JobApi, JobOptions, Jobs, JobsError};
use crate::leases::LeasePool;
use crate::membership::{HostEvent, Membership, MembershipError, Timing};
use crate::metrics::ControllerMetrics;
use crate::store::{Store, StoreError};
use crate::web::WebState;
use crate::workloads::{NoWorkloads, Workloads};

/// Largest request the controller decodes (4 MiB).
pub const MAX_DECODING_MESSAGE_SIZE: usize = 4 << 20;
/// Largest response the controller encodes (16 MiB).
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 16 << 20;
/// Largest header block accepted (64 KiB).
pub const MAX_HEADER_LIST_SIZE: u32 = 64 << 10;
/// HTTP/2 keepalive ping interval: dead agents' watch streams end after
/// interval + timeout.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive ping timeout.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Time allowed for a TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection from which nothing is read for this long is closed (see
/// `geomx_proto::incoming`): one that finished its TLS handshake and never spoke HTTP/2, or a
/// dead one. An HTTP/2 peer is pinged after [`HTTP2_KEEPALIVE_INTERVAL`] of silence and
/// must answer within [`HTTP2_KEEPALIVE_TIMEOUT`], so a live one is never idle this long.
pub const CONNECTION_IDLE_TIMEOUT: Duration =
    HTTP2_KEEPALIVE_INTERVAL.saturating_add(HTTP2_KEEPALIVE_TIMEOUT);
/// Most connections open at once (agents, users, each with its watch streams multiplexed on
/// one HTTP/2 connection); one more is closed at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// Most connections the web listener (`web_listen`) holds at once.
pub const MAX_WEB_CONNECTIONS: usize = 64;

/// Errors starting or stopping the controller.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Loading the membership failed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// Loading the jobs failed.
    #[error(transparent)]
    Jobs(#[from] JobsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server task ended abnormally.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A controller serving in this process.
#[derive(Debug)]
pub struct RunningController {
    local_addr: SocketAddr,
    membership: Arc<Membership>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    detector: JoinHandle<()>,
    forwarder: JoinHandle<()>,
    jobs: Option<Arc<Jobs>>,
    ticker: Option<JoinHandle<()>>,
    /// The dashboard's curve sampler, when `web_listen` is set.
    sampler: Option<JoinHandle<()>>,
    credentials: Arc<Credentials>,
    credential_watcher: JoinHandle<()>,
    streams: TaskTracker,
    health: HealthReporter,
    shutdown_timeout: Duration,
    metrics: Arc<ControllerMetrics>,
    /// The web listener's address and task, when `web_listen` is set.
    web: Option<(SocketAddr, JoinHandle<()>)>,
}

/// Starts a controller with the jobs layer and default [`JobOptions`].
pub async fn start(config: ControllerConfig) -> Result<RunningController, ServerError> {
    start_with_options(config, JobOptions::default()).await
}

/// Starts a controller with the jobs layer tuned by `options` (tests shorten timings). The
/// jobs are loaded from the state directory and installed before anything is served, so no
/// agent ever sees a desired state without its containers.
pub async fn start_with_options(
    config: ControllerConfig,
    options: JobOptions,
) -> Result<RunningController, ServerError> {
    config.validate()?;
    let tls = match (&config.tls, config.insecure) {
        (Some(files), false) => Some(files.load()?),
        _ => None,
    };
    let mut options = options;
    if options.job_retention.is_none() && !config.job_retention.is_zero() {
        options.job_retention = Some(config.job_retention);
    }
    let membership = open_membership(&config).await?;
    let jobs = Jobs::load(
        membership.clone(),
        tls.as_ref().map(TlsMaterial::client_config),
        options,
    )?;
    let workloads: Arc<dyn Workloads> = jobs.clone();
    serve(config, tls, membership, workloads, Some(jobs)).await
}

async fn open_membership(config: &ControllerConfig) -> Result<Arc<Membership>, ServerError> {
    let store = Store::open(&config.state_dir)?;
    let pool = LeasePool::new(config.cluster_cidr, config.host_subnet_prefix);
    let timing = Timing {
        heartbeat_interval: config.heartbeat_interval,
        grace_period: config.grace_period,
        lease_ttl: (!config.lease_ttl.is_zero()).then_some(config.lease_ttl),
    };
    let membership = Membership::load(store, pool, timing)?;
    membership.release_orphaned_leases().await?;
    Ok(membership)
}

/// Starts a controller with custom workloads instead of the jobs layer (`None`: no role
/// containers at all); its `JobService` answers `UNIMPLEMENTED`. `workloads` is built from
/// the membership before anything is served.
pub async fn start_with_workloads<F>(
    config: ControllerConfig,
    workloads: F,
) -> Result<RunningController, ServerError>
where
    F: FnOnce(&Arc<Membership>) -> Option<Arc<dyn Workloads>>,
{
    config.validate()?;
    let tls = match (&config.tls, config.insecure) {
        (Some(files), false) => Some(files.load()?),
        _ => None,
    };
    let membership = open_membership(&config).await?;
    let workloads = workloads(&membership).unwrap_or_else(|| Arc::new(NoWorkloads));
    serve(config, tls, membership, workloads, None).await
}

/// Hands every host change of `membership` to `workloads` until `cancel`.
async fn forward_host_changes(
    mut changes: tokio::sync::broadcast::Receiver<HostEvent>,
    workloads: Arc<dyn Workloads>,
    cancel: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let event = tokio::select! {
            e = changes.recv() => e,
            () = cancel.cancelled() => break,
        };
        match event {
            Ok(e) => workloads.host_changed(&e.host, e.change).await,
            Err(RecvError::Lagged(n)) => {
                // the jobs ticker re-checks every job's hosts on its own
                tracing::warn!(missed = n, "host changes missed by the jobs layer");
            }
            Err(RecvError::Closed) => break,
        }
    }
}

async fn serve(
    config: ControllerConfig,
    tls: Option<TlsMaterial>,
    membership: Arc<Membership>,
    workloads: Arc<dyn Workloads>,
    jobs: Option<Arc<Jobs>>,
) -> Result<RunningController, ServerError> {
    let (credentials, warnings) =
        Credentials::load(config.credential_sources()).map_err(|message| ConfigError::Invalid {
            origin: "[auth]".into(),
            message,
        })?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let credentials = Arc::new(credentials);
    let auth = Auth::new(credentials.clone(), config.insecure);
    let metrics = Arc::new(ControllerMetrics::new(membership.clone(), jobs.clone()));
    let shutdown = CancellationToken::new();
    let streams = TaskTracker::new();
    let forwarder = tokio::spawn(forward_host_changes(
        membership.subscribe_changes(),
        workloads.clone(),
        shutdown.child_token(),
    ));

    let agents = AgentServiceServer::new(
        AgentApi::new(
            membership.clone(),
            workloads,
            auth.clone(),
            shutdown.clone(),
            streams.clone(),
        )
        .with_backend(config.backend.clone())
        .with_metrics(metrics.rpc().clone()),
    )
    .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
    // a desired state: at most what an agent decodes
    .max_encoding_message_size(geomx_proto::MAX_DESIRED_STATE_LEN);
    // user services: MethodRoles notes the RPC's role for the interceptor inside
    let hosts = MethodRoles::new(InterceptedService::new(
        HostServiceServer::new(HostApi::new(membership.clone()).with_jobs(jobs.clone()))
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE),
        auth.user_interceptor(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServiceServer<AgentApi>>().await;
    health.set_serving::<HostServiceServer<HostApi>>().await;
    health.set_serving::<JobServiceServer<JobApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(geomx_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE);
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.server_config().timeout(TLS_HANDSHAKE_TIMEOUT))?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(agents)
        .add_service(hosts);
    let router = match &jobs {
        Some(jobs) => router.add_service(MethodRoles::new(InterceptedService::new(
            JobServiceServer::new(JobApi::new(jobs.clone(), shutdown.clone(), streams.clone()))
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE),
            auth.user_interceptor(),
        ))),
        None => router.add_service(MethodRoles::new(InterceptedService::new(
            JobServiceServer::new(NoJobApi)
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE),
            auth.user_interceptor(),
        ))),
    };

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let incoming =
        geomx_proto::incoming::guarded(incoming, CONNECTION_IDLE_TIMEOUT, MAX_CONNECTIONS);

    let curves = Arc::new(Curves::new());
    let web = match config.web_listen {
        Some(addr) => Some(
            serve_web(
                addr,
                tls.as_ref(),
                WebState {
                    metrics: metrics.clone(),
                    auth: auth.clone(),
                    metrics_allow: config.metrics_allow.clone(),
                    dashboard: Arc::new(Dashboard::new(
                        membership.clone(),
                        jobs.clone(),
                        auth.clone(),
                        curves.clone(),
                        tls.is_some(),
                    )),
                },
                shutdown.child_token(),
            )
            .await?,
        ),
        None => None,
    };

    let detector = tokio::spawn(membership.clone().run_loss_detector(shutdown.child_token()));
    let credential_watcher = tokio::spawn(
        credentials
            .clone()
            .watch_files(config.credentials_poll, shutdown.child_token()),
    );
    let ticker = jobs
        .as_ref()
        .map(|j| tokio::spawn(j.clone().run_ticker(shutdown.child_token())));
    let sampler = jobs
        .as_ref()
        .filter(|_| config.web_listen.is_some())
        .map(|j| {
            tokio::spawn(crate::dashboard::curves::run_sampler(
                curves.clone(),
                j.clone(),
                shutdown.child_token(),
            ))
        });
    let server = tokio::spawn(
        router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
    );

    let hosts_known = membership.hosts().len();
    tracing::info!(
        listen = %local_addr,
        web_listen = web.as_ref().map(|(a, _)| a.to_string()).unwrap_or_default(),
        controller_id = %membership.controller_id(),
        tls = tls.is_some(),
        cluster_cidr = %config.cluster_cidr,
        host_subnet_prefix = config.host_subnet_prefix,
        state_dir = %config.state_dir.display(),
        hosts = hosts_known,
        active_jobs = jobs.as_ref().map_or(0, |j| j.active_jobs().len()),
        credentials = %credentials.snapshot().summary(),
        "geomx-controller serving"
    );
    if tls.is_none() {
        tracing::warn!(
            "INSECURE MODE: plaintext gRPC, agents are not authenticated; never use this outside a throwaway lab"
        );
    }

    Ok(RunningController {
        local_addr,
        membership,
        shutdown,
        server,
        detector,
        forwarder,
        jobs,
        ticker,
        sampler,
        credentials,
        credential_watcher,
        streams,
        health,
        shutdown_timeout: config.shutdown_timeout,
        metrics,
        web,
    })
}

/// Binds `web_listen` and serves [`crate::web::route`] on it (HTTPS with the controller's
/// certificate when it has one) until `shutdown`.
async fn serve_web(
    addr: SocketAddr,
    tls: Option<&TlsMaterial>,
    state: WebState,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let tls = tls.map(TlsMaterial::rustls_server_config).transpose()?;
    let limits = WebLimits {
        max_connections: MAX_WEB_CONNECTIONS,
        handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
        ..WebLimits::default()
    };
    let bind_error = |source| ServerError::Bind { addr, source };
    let server = WebServer::bind(addr, tls, limits)
        .await
        .map_err(bind_error)?;
    let local = server.local_addr().map_err(bind_error)?;
    let state = Arc::new(state);
    let task = tokio::spawn(server.serve(
        move |peer, req| crate::web::route(state.clone(), peer, req),
        shutdown,
    ));
    Ok((local, task))
}

impl RunningController {
    /// The address the controller listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The controller id of the state directory.
    pub fn controller_id(&self) -> &str {
        self.membership.controller_id()
    }

    /// The web listener's address (`/metrics`), when `web_listen` is set.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref().map(|(a, _)| *a)
    }

    /// The controller's metrics ([`ControllerMetrics::render`] is what `/metrics` serves).
    pub fn metrics(&self) -> &Arc<ControllerMetrics> {
        &self.metrics
    }

    /// The membership (hosts, leases, desired state).
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    /// The jobs layer (`None` when started with custom workloads).
    pub fn jobs(&self) -> Option<&Arc<Jobs>> {
        self.jobs.as_ref()
    }

    /// The user tokens and revocations in force; [`Credentials::reload`] re-reads their
    /// files (the binary does on SIGHUP; they are also watched).
    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// A token that, when cancelled, starts the shutdown (as [`RunningController::shutdown`]
    /// would, without waiting).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until `signal` completes (or the server fails), then shuts down gracefully.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        tokio::select! {
            () = signal => {
                tracing::info!("shutdown requested");
            }
            () = self.shutdown.cancelled() => {}
            ended = &mut self.server => {
                // The server ended on its own: report why after cleaning up.
                self.shutdown.cancel();
                self.streams.close();
                let _ = (&mut self.detector).await;
                let _ = (&mut self.forwarder).await;
                let _ = (&mut self.credential_watcher).await;
                if let Some(t) = self.ticker.as_mut() {
                    let _ = t.await;
                }
                if let Some(t) = self.sampler.as_mut() {
                    let _ = t.await;
                }
                self.membership.store().flush().await?;
                return match ended {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(e.into()),
                };
            }
        }
        self.shutdown().await
    }

    /// Stops accepting connections, ends every watch stream, waits up to the configured
    /// shutdown timeout for connections to close, and flushes the store.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let RunningController {
            membership,
            shutdown,
            mut server,
            detector,
            forwarder,
            ticker,
            sampler,
            credential_watcher,
            streams,
            health,
            shutdown_timeout,
            web,
            ..
        } = self;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        shutdown.cancel();
        streams.close();
        let result = match tokio::time::timeout(shutdown_timeout, &mut server).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ServerError::Transport(e)),
            Ok(Err(e)) => Err(ServerError::Task(e)),
            Err(_) => {
                tracing::warn!(
                    timeout = %humantime::format_duration(shutdown_timeout),
                    "connections still open after the shutdown timeout; closing them"
                );
                server.abort();
                Ok(())
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), streams.wait())
            .await
            .is_err()
        {
            tracing::warn!("watch streams did not end in time");
        }
        let _ = detector.await;
        let _ = forwarder.await;
        let _ = credential_watcher.await;
        if let Some(t) = ticker {
            let _ = t.await;
        }
        if let Some(t) = sampler {
            let _ = t.await;
        }
        if let Some((_, task)) = web {
            let _ = task.await;
        }
        membership.store().flush().await?;
        tracing::info!("geomx-controller stopped; state flushed");
        result
    }
}
