//! `geomx.v1.AgentService`: the gRPC face of [`Membership`] for agents.
//!
//! Every RPC authenticates the caller as the agent of the host it names
//! ([`Auth::check_agent`]), validates every field ([`crate::validate`]) and maps
//! membership errors to gRPC statuses. An agent refused for a revoked certificate gets a
//! host event `AgentRefused` (once per host, serial and revocation list); its `Watch`
//! stream ends as soon as the revocation is in force.

use std::sync::Arc;
use std::time::Instant;

use geomx_proto::v1::agent_service_server::AgentService;
use geomx_proto::v1::{
    ContainerState, DesiredState, HostReport, LeaveRequest, LeaveResponse, RegisterRequest,
    RegisterResponse, ReportResponse, WatchRequest,
};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::auth::Auth;
use crate::leases::LeaseError;
use crate::membership::{
    HeartbeatData, Membership, MembershipError, Registration, ReportDegradation, duration_ms,
    same_content,
};
use crate::metrics::RpcMetrics;
use crate::store::{
    Batch, EventRecord, EventScope, LinkRecord, NetworkRecord, StoreError, StoreErrorKind,
};
use crate::validate;
use crate::workloads::{WorkloadError, Workloads};

impl From<MembershipError> for Status {
    fn from(e: MembershipError) -> Status {
        let msg = e.to_string();
        match e {
            MembershipError::UnknownHost(_) => Status::not_found(msg),
            MembershipError::HostLeft(_) | MembershipError::NotRemovable { .. } => {
                Status::failed_precondition(msg)
            }
            MembershipError::UnderlayInUse { .. } => Status::already_exists(msg),
            MembershipError::Lease(LeaseError::PinnedTaken { .. }) => Status::already_exists(msg),
            MembershipError::Lease(LeaseError::Exhausted { .. }) => Status::resource_exhausted(msg),
            MembershipError::Lease(_) => Status::invalid_argument(format!("pinned_subnet: {msg}")),
            MembershipError::Store(s) => Status::new(s.code(), msg),
        }
    }
}

impl StoreError {
    /// The gRPC code of a request that failed on this error: `RESOURCE_EXHAUSTED` when the
    /// state directory's disk is full (the request may be retried once space is freed),
    /// `UNAVAILABLE` for another I/O error, `ABORTED` for a conflicting change, `INTERNAL`
    /// otherwise.
    pub fn code(&self) -> tonic::Code {
        match self.kind() {
            StoreErrorKind::Full => tonic::Code::ResourceExhausted,
            StoreErrorKind::Unavailable => tonic::Code::Unavailable,
            StoreErrorKind::Conflict => tonic::Code::Aborted,
            StoreErrorKind::Internal => tonic::Code::Internal,
        }
    }
}

impl From<WorkloadError> for Status {
    fn from(e: WorkloadError) -> Status {
        match e {
            WorkloadError::Invalid(m) => Status::invalid_argument(m),
            WorkloadError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// Implementation of `AgentService`.
#[derive(Clone)]
pub struct AgentApi {
    membership: Arc<Membership>,
    workloads: Arc<dyn Workloads>,
    auth: Auth,
    shutdown: CancellationToken,
    streams: TaskTracker,
    backend: String,
    metrics: RpcMetrics,
}

impl std::fmt::Debug for AgentApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentApi")
            .field("membership", &self.membership)
            .finish_non_exhaustive()
    }
}

impl AgentApi {
    /// The service over `membership`, with the role containers and report handling of
    /// `workloads`; `Watch` streams end when `shutdown` is cancelled and their tasks are
    /// tracked by `streams`.
    pub fn new(
        membership: Arc<Membership>,
        workloads: Arc<dyn Workloads>,
        auth: Auth,
        shutdown: CancellationToken,
        streams: TaskTracker,
    ) -> Self {
        AgentApi {
            membership,
            workloads,
            auth,
            shutdown,
            streams,
            backend: String::new(),
            metrics: RpcMetrics::default(),
        }
    }

    /// Observe report and watch latency into `metrics` (those of the controller's registry;
    /// without this call into unregistered histograms).
    pub fn with_metrics(mut self, metrics: RpcMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The cluster's default data-plane backend every host's desired state carries (empty:
    /// `auto`).
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backend = backend.into();
        self
    }
}

impl AgentApi {
    /// Checks the caller and the host field of an agent request; returns the host name and
    /// the caller's certificate (`None` in insecure mode).
    async fn agent_host<T>(
        &self,
        request: &Request<T>,
        host: &str,
    ) -> Result<(String, Option<geomx_proto::tls::PeerIdentity>), Status> {
        match self.auth.check_agent(request, host) {
            Ok(id) => Ok((validate::host_name("host", host)?, id)),
            Err(denied) => {
                if let Some(id) = &denied.revoked {
                    self.note_revoked(&id.common_name, id).await;
                }
                Err(denied.status)
            }
        }
    }

    /// Records (once per host, serial and revocation list) that the agent of `host` was
    /// refused for its revoked certificate: a warning and a host event.
    async fn note_revoked(&self, host: &str, id: &geomx_proto::tls::PeerIdentity) {
        if !self.auth.credentials().note_refusal(host, &id.serial) {
            return;
        }
        let file = self
            .auth
            .credentials()
            .sources()
            .revocation_file
            .as_ref()
            .map(|f| format!(" ({})", f.display()))
            .unwrap_or_default();
        let message = format!(
            "the agent's certificate {id} serial {} is revoked{file}: its calls are refused and its watch stream ended; the host goes lost after grace_period unless its agent gets a valid certificate",
            id.serial
        );
        tracing::warn!(host, serial = %id.serial, "agent refused: {message}");
        if self.membership.host(host).is_none() {
            return;
        }
        let mut batch = Batch::new();
        let event = EventRecord {
            at_ms: crate::store::now_ms(),
            kind: "AgentRefused".to_owned(),
            message,
            host: host.to_owned(),
            ..Default::default()
        };
        if let Err(e) = batch.event(EventScope::Host(host), &event) {
            tracing::warn!(host, error = %e, "cannot record the AgentRefused event");
            return;
        }
        if let Err(e) = self.membership.commit(batch, false).await {
            tracing::warn!(host, error = %e, "cannot record the AgentRefused event");
        }
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let (host, _) = self.agent_host(&request, &request.get_ref().host).await?;
        let req = request.into_inner();
        let membership = &self.membership;
        let span = tracing::info_span!("register", host = %host);
        async move {
            let pool = membership.pool();
            let reg = Registration {
                host,
                underlay_ip: validate::underlay_ip(
                    "underlay_ip",
                    &req.underlay_ip,
                    pool.cluster(),
                )?,
                pinned_subnet: validate::optional_subnet("pinned_subnet", &req.pinned_subnet)?,
                agent_version: validate::printable(
                    "agent_version",
                    &req.agent_version,
                    validate::MAX_VERSION_LEN,
                )?,
                agent_url: validate::agent_url("agent_url", &req.agent_url)?,
                wireguard: validate::wireguard(&req.wireguard_public_key, req.wireguard_port)?,
            };
            let underlay = reg.underlay_ip;
            let subnet = membership.register(reg).await.inspect_err(|e| {
                tracing::warn!(error = %e, "registration refused");
            })?;
            tracing::info!(%subnet, %underlay, "registered");
            let timing = membership.timing();
            Ok(Response::new(RegisterResponse {
                subnet: subnet.to_string(),
                cluster_cidr: pool.cluster().to_string(),
                heartbeat_interval_ms: duration_ms(timing.heartbeat_interval),
                grace_period_ms: duration_ms(timing.grace_period),
                controller_id: membership.controller_id().to_owned(),
            }))
        }
        .instrument(span)
        .await
    }

    type WatchStream = ReceiverStream<Result<DesiredState, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (host, identity) = self.agent_host(&request, &request.get_ref().host).await?;
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("the controller is shutting down"));
        }
        let shared = geomx_proto::templates::expands_templates(&request);
        let revisions = self.membership.subscribe(&host)?;
        let (tx, rx) = mpsc::channel(4);
        let membership = self.membership.clone();
        let workloads = self.workloads.clone();
        let shutdown = self.shutdown.clone();
        let backend = self.backend.clone();
        let span = tracing::info_span!("watch", host = %host);
        let watch_send_duration = self.metrics.watch_send_duration.clone();
        let revocation = identity.map(|id| Revocation {
            auth: self.auth.clone(),
            changes: self.auth.credentials().subscribe(),
            id,
        });
        self.streams.spawn(
            watch_loop(
                membership,
                workloads,
                Watcher {
                    backend,
                    host,
                    shared,
                    revocation,
                    watch_send_duration,
                },
                tx,
                revisions,
                shutdown,
            )
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(
        &self,
        request: Request<HostReport>,
    ) -> Result<Response<ReportResponse>, Status> {
        let (host, _) = self.agent_host(&request, &request.get_ref().host).await?;
        let report = request.into_inner();
        let span = tracing::debug_span!("report", host = %host);
        let membership = &self.membership;
        let started = Instant::now();
        let _observe = ObserveOnDrop {
            histogram: &self.metrics.report_duration,
            started,
        };
        async move {
            let data = heartbeat_data(&report)?;
            membership.report(&host, data).await?;
            self.workloads.host_reported(&host, &report).await?;
            Ok(Response::new(ReportResponse {
                heartbeat_interval_ms: duration_ms(membership.timing().heartbeat_interval),
            }))
        }
        .instrument(span)
        .await
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let (host, _) = self.agent_host(&request, &request.get_ref().host).await?;
        let span = tracing::info_span!("leave", host = %host);
        async {
            self.membership.leave(&host).await?;
            tracing::info!("host left");
            Ok(Response::new(LeaveResponse {}))
        }
        .instrument(span)
        .await
    }
}

/// Validates what the membership keeps of a report.
fn heartbeat_data(report: &HostReport) -> Result<HeartbeatData, Status> {
    let agent_version = validate::printable(
        "agent_version",
        &report.agent_version,
        validate::MAX_VERSION_LEN,
    )?;
    if report.images.len() > validate::MAX_IMAGES {
        return Err(Status::invalid_argument(format!(
            "images: {} entries, at most {} allowed",
            report.images.len(),
            validate::MAX_IMAGES
        )));
    }
    let mut images = Vec::with_capacity(report.images.len());
    for image in &report.images {
        images.push(validate::printable(
            "images",
            image,
            validate::MAX_IMAGE_LEN,
        )?);
    }
    images.sort();
    images.dedup();
    // an agent that has not listed Docker's images yet (just restarted, Docker slow) sends
    // none: keep the last known list rather than refuse jobs for "missing" images
    let images = (report.images_known != Some(false)).then_some(images);
    let network = report
        .network
        .as_ref()
        .map_or_else(NetworkRecord::default, |n| NetworkRecord {
            converged: n.converged,
            routes: n.routes,
            error: validate::truncate(&n.error, validate::MAX_NETWORK_ERROR_LEN),
            links: n
                .links
                .iter()
                .take(validate::MAX_LINKS)
                .map(|l| LinkRecord {
                    peer: validate::truncate(&l.peer, 63),
                    backend: validate::truncate(&l.backend, 16),
                    rtt_ms: if l.rtt_ms.is_finite() {
                        l.rtt_ms.max(0.0)
                    } else {
                        0.0
                    },
                    loss_pct: if l.loss_pct.is_finite() {
                        l.loss_pct.clamp(0.0, 100.0)
                    } else {
                        0.0
                    },
                    handshake_age_s: l.handshake_age_s.max(-1),
                })
                .collect(),
        });
    let running = report
        .nodes
        .iter()
        .filter(|n| n.state == ContainerState::Running as i32)
        .count();
    if report.listening_ports.len() > 65_536 || report.listening_ports.iter().any(|p| *p > 65_535) {
        return Err(Status::invalid_argument(
            "listening_ports: ports must be 0..=65535, each at most once",
        ));
    }
    let omitted = report_omitted(report);
    let mut listening_ports = report.listening_ports.clone();
    listening_ports.sort_unstable();
    listening_ports.dedup();
    Ok(HeartbeatData {
        agent_version,
        network,
        images,
        // before the agent adopted its containers its node list means nothing
        running_containers: (report.nodes_known != Some(false))
            .then(|| u32::try_from(running).unwrap_or(u32::MAX)),
        listening_ports,
        // left out of a degraded report (over the agent's budget): the last kept
        image_details: (report.images_known != Some(false)
            && !omitted.iter().any(|o| o == "image_details"))
        .then(|| validate::image_details(&report.image_details)),
        pulls: validate::image_pulls(&report.pulls),
        degraded: (!omitted.is_empty()).then(|| ReportDegradation {
            omitted,
            full_size_bytes: report.full_size_bytes,
            size_bytes: u64::try_from(prost::Message::encoded_len(report)).unwrap_or(u64::MAX),
        }),
    })
}

/// What a degraded report says it left out (`HostReport.omitted`), bounded: at most 16
/// names of at most 32 printable bytes.
fn report_omitted(report: &HostReport) -> Vec<String> {
    report
        .omitted
        .iter()
        .take(16)
        .map(|o| {
            validate::truncate(o, 32)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect()
        })
        .collect()
}

/// Sends `host`'s desired state: at once, then after every published change that alters
/// it, until the client goes away, the host leaves, or the controller shuts down.
/// Who watches: the cluster's default backend, the host, and whether its agent expands
/// templates (else it gets every container complete).
struct Watcher {
    backend: String,
    host: String,
    shared: bool,
    /// The agent's certificate, checked again whenever the revocation list changes (`None`
    /// in insecure mode).
    revocation: Option<Revocation>,
    /// Observes each desired state's time from revision change to hand-over.
    watch_send_duration: Histogram,
}

/// Observes the time since `started` into `histogram` when dropped (whichever way the
/// request ends).
struct ObserveOnDrop<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for ObserveOnDrop<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// What a watch stream needs to notice its agent's certificate being revoked.
struct Revocation {
    auth: Auth,
    changes: tokio::sync::watch::Receiver<u64>,
    id: geomx_proto::tls::PeerIdentity,
}

impl Revocation {
    /// Completes when the certificate is revoked (never without a revocation list change).
    async fn revoked(this: &mut Option<Revocation>) {
        let Some(r) = this else {
            return std::future::pending().await;
        };
        loop {
            if r.auth.revoked(&r.id) {
                return;
            }
            if r.changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

async fn watch_loop(
    membership: Arc<Membership>,
    workloads: Arc<dyn Workloads>,
    watcher: Watcher,
    tx: mpsc::Sender<Result<DesiredState, Status>>,
    mut revisions: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let Watcher {
        backend,
        host,
        shared,
        mut revocation,
        watch_send_duration,
    } = watcher;
    tracing::info!("watch opened");
    let mut last: Option<DesiredState> = None;
    loop {
        revisions.borrow_and_update();
        let changed_at = Instant::now();
        match membership.desired_state_for(&host) {
            Ok(mut state) => {
                let containers = workloads.containers_for(&host);
                if shared {
                    // what a job's containers have in common travels once (the agent expands it)
                    (state.templates, state.containers) = geomx_proto::templates::share(containers);
                } else {
                    state.containers = containers;
                }
                state.backend.clone_from(&backend);
                if last.as_ref().is_none_or(|l| !same_content(l, &state)) {
                    tracing::debug!(
                        revision = state.revision,
                        peers = state.peers.len(),
                        "sending desired state"
                    );
                    tokio::select! {
                        sent = tx.send(Ok(state.clone())) => {
                            if sent.is_err() { break }
                            watch_send_duration.observe(changed_at.elapsed().as_secs_f64());
                        }
                        () = shutdown.cancelled() => {
                            let _ = tx.try_send(Err(Status::unavailable("the controller is shutting down")));
                            break;
                        }
                    }
                    last = Some(state);
                }
            }
            Err(e) => {
                tracing::info!(error = %e, "ending watch");
                let _ = tx.try_send(Err(e.into()));
                break;
            }
        }
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { break },
            () = shutdown.cancelled() => {
                let _ = tx.try_send(Err(Status::unavailable("the controller is shutting down")));
                break;
            }
            () = tx.closed() => break,
            () = Revocation::revoked(&mut revocation) => {
                let id = revocation.as_ref().map(|r| &r.id);
                let serial = id.map(|i| i.serial.clone()).unwrap_or_default();
                tracing::warn!(%serial, "ending the watch stream: the agent's certificate was revoked");
                let _ = tx.try_send(Err(Status::permission_denied(format!(
                    "certificate serial {serial} is revoked (the controller's revocation list)"
                ))));
                break;
            }
        }
    }
    tracing::info!("watch closed");
}

#[cfg(test)]
mod degraded_report_tests {
    use geomx_proto::v1::ImageInfo;

    use super::*;

    #[test]
    fn a_degraded_report_says_what_it_left_out_and_the_last_image_details_stay() {
        let details = vec![ImageInfo {
            id: "sha256:1".into(),
            ..Default::default()
        }];
        let complete = HostReport {
            host: "a".into(),
            images: vec!["img:1".into()],
            image_details: details.clone(),
            ..Default::default()
        };
        let d = heartbeat_data(&complete).expect("valid");
        assert_eq!(d.degraded, None);
        assert_eq!(d.image_details, Some(details));
        let degraded = HostReport {
            image_details: Vec::new(),
            omitted: vec!["metrics".into(), "image_details".into()],
            full_size_bytes: 5 << 20,
            ..complete.clone()
        };
        let d = heartbeat_data(&degraded).expect("valid");
        // None: the membership keeps the details it had
        assert_eq!(d.image_details, None);
        assert_eq!(d.images, Some(vec!["img:1".to_owned()]));
        let g = d.degraded.expect("degraded");
        assert_eq!(g.omitted, ["metrics", "image_details"]);
        assert_eq!(g.full_size_bytes, 5 << 20);
        assert_eq!(g.size_bytes, prost::Message::encoded_len(&degraded) as u64);
        // what an agent says is bounded
        let odd = HostReport {
            omitted: (0..100)
                .map(|k| format!("{k}\n{}", "x".repeat(100)))
                .collect(),
            ..complete
        };
        let g = heartbeat_data(&odd)
            .expect("valid")
            .degraded
            .expect("degraded");
        assert_eq!(g.omitted.len(), 16);
        assert!(g.omitted.iter().all(|o| o.len() <= 32 && !o.contains('\n')));
    }
}
