//! The HTTP heartbeat endpoint training nodes may report to themselves.
//!
//! The agent serves it on its docker0 gateway address (port [`DEFAULT_HEARTBEAT_PORT`],
//! 7948) and gives every container the base URL as `GEOMX_AGENT_URL`, e.g.
//! `http://172.17.34.1:7948` (see [`agent_url`]). Host-network containers reach the same
//! address (docker0 lives in the host's namespace).
//!
//! `POST /v1/heartbeat` with a JSON object:
//!
//! ```json
//! {"job": "job1", "node": "a-worker-0", "step": 12, "epoch": 0,
//!  "metrics": {"accuracy": 0.9, "loss": 0.3}}
//! ```
//!
//! - `step` (integer, required): the cumulative iteration; becomes the node's iteration.
//! - `epoch` (integer, optional, may be null): kept from earlier reports when absent.
//! - `metrics` (object of numbers, optional): merged into the node's metrics; `accuracy`
//!   (or `acc`) also becomes the node's accuracy.
//! - `job` and `node` (strings, optional): who reports, normally `GEOMX_JOB` and
//!   `GEOMX_NODE`. They must name a node whose container this agent runs (else 404). When
//!   both are left out, the caller is identified by its source address among the running
//!   docker0 containers, or else (host-network containers share the host's address) by its
//!   token.
//!
//! Who may report for a node (anything else is refused and counted, see
//! [`HeartbeatStats`]):
//! - **its token**: every role container the agent creates gets its own secret in its env,
//!   `GEOMX_HEARTBEAT_TOKEN` (see [`crate::auth`]), sent as `Authorization: Bearer
//!   <token>`; a missing or wrong token is 401 (`WWW-Authenticate: Bearer`);
//! - **its address**: a node on a bridge network (docker0) must also report from its own
//!   container's address (else 403: no other container, host, or container on another
//!   host speaks for it, even with a stolen token; role containers have no `NET_RAW` to
//!   forge a source address). Host-network nodes share the host's address: the token
//!   tells them apart.
//! - Containers adopted from an agent version before tokens (no token in their env, see
//!   [`crate::ownership`]) are checked by address only until their job is restarted.
//! - Bounded: at most 32 metrics per node (names up to 64 bytes; further names dropped and
//!   counted, the answer says how many), 64 KiB bodies, 15 s per connection, 256
//!   connections (8 per source address).
//!
//! Answers: 200 `{"ok": true, "job": ..., "node": ...}` (with `"metrics_dropped": n` when
//! metrics were dropped); 400 `{"error": "..."}` for a malformed body or an unidentifiable
//! caller; 401 for a missing or wrong token; 403 for a node's report from another address;
//! 404 for an unknown job/node or path; 405 for a method other than POST; 413 for a body
//! over 64 KiB.
//!
//! The few lines of Python a training script needs (standard library only; errors are
//! ignored so that training never fails because of a heartbeat):
//!
//! ```python
//! import json, os, urllib.request
//!
//! def geomx_heartbeat(step, epoch=None, **metrics):
//!     """Reports progress to the geomx agent; a no-op outside geomx."""
//!     url = os.environ.get("GEOMX_AGENT_URL")
//!     if not url:
//!         return
//!     body = {"job": os.environ.get("GEOMX_JOB"), "node": os.environ.get("GEOMX_NODE"),
//!             "step": int(step), "epoch": None if epoch is None else int(epoch),
//!             "metrics": {k: float(v) for k, v in metrics.items()}}
//!     headers = {"Content-Type": "application/json"}
//!     token = os.environ.get("GEOMX_HEARTBEAT_TOKEN")
//!     if token:
//!         headers["Authorization"] = "Bearer " + token
//!     req = urllib.request.Request(url + "/v1/heartbeat", data=json.dumps(body).encode(),
//!                                  headers=headers)
//!     try:
//!         urllib.request.urlopen(req, timeout=2).close()
//!     except OSError:
//!         pass
//!
//! # in the training loop:
//! geomx_heartbeat(step=iteration, epoch=epoch, accuracy=test_acc, loss=loss)
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes};
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Result, RuntimeError};
use crate::spec::NodeKey;

/// Default port of the heartbeat endpoint.
pub const DEFAULT_HEARTBEAT_PORT: u16 = 7948;
/// The endpoint's path.
pub const HEARTBEAT_PATH: &str = "/v1/heartbeat";
/// Largest accepted body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long one connection may live (slow senders are cut off).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);
/// Open connections at most, in total.
pub const MAX_CONNECTIONS: usize = 256;
/// Open connections at most from one source address.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;

/// The base URL containers get as `GEOMX_AGENT_URL`: `http://<gateway>:<port>`.
pub fn agent_url(gateway: IpAddr, port: u16) -> String {
    format!("http://{}", SocketAddr::new(gateway, port))
}

/// The body of a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct HeartbeatReport {
    /// Job name (`GEOMX_JOB`), optional.
    #[serde(default)]
    pub job: Option<String>,
    /// Node name (`GEOMX_NODE`), optional.
    #[serde(default)]
    pub node: Option<String>,
    /// Cumulative iteration (required when received over HTTP).
    #[serde(default)]
    pub step: Option<u64>,
    /// Epoch, optional.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// Free-form metrics.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// Why a heartbeat was not taken.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The body is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The body names a node this agent does not run.
    #[error("no container for node {node} of job {job} on this host")]
    UnknownNode {
        /// Job name given.
        job: String,
        /// Node name given.
        node: String,
    },
    /// No job/node given and no running container has the caller's address.
    #[error("no running container has address {0}; send \"job\" and \"node\"")]
    UnknownPeer(IpAddr),
    /// No job/node given and several containers share the caller's address.
    #[error("several containers have address {0} (host networking); send \"job\" and \"node\"")]
    AmbiguousPeer(IpAddr),
    /// The body names a node whose container has another address than the caller.
    #[error("node {node} of job {job} reports from its own container's address, not from {peer}")]
    WrongPeer {
        /// Job name given.
        job: String,
        /// Node name given.
        node: String,
        /// The caller's address.
        peer: IpAddr,
    },
    /// The node's container has a token and the caller sent none.
    #[error(
        "node {node} of job {job} reports with its token: send \"Authorization: Bearer $GEOMX_HEARTBEAT_TOKEN\""
    )]
    NoToken {
        /// Job name.
        job: String,
        /// Node name.
        node: String,
    },
    /// The caller's token is not the node's.
    #[error("wrong token for node {node} of job {job}")]
    BadToken {
        /// Job name.
        job: String,
        /// Node name.
        node: String,
    },
}

impl HeartbeatError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            HeartbeatError::UnknownNode { .. } => StatusCode::NOT_FOUND,
            HeartbeatError::WrongPeer { .. } => StatusCode::FORBIDDEN,
            HeartbeatError::NoToken { .. } | HeartbeatError::BadToken { .. } => {
                StatusCode::UNAUTHORIZED
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The reason it is counted under.
    pub fn refusal(&self) -> Refusal {
        match self {
            HeartbeatError::UnknownNode { .. } | HeartbeatError::UnknownPeer(_) => {
                Refusal::UnknownNode
            }
            HeartbeatError::WrongPeer { .. } => Refusal::WrongAddress,
            HeartbeatError::NoToken { .. } => Refusal::NoToken,
            HeartbeatError::BadToken { .. } => Refusal::BadToken,
            HeartbeatError::Invalid(_) | HeartbeatError::AmbiguousPeer(_) => Refusal::BadRequest,
        }
    }
}

/// Why the endpoint refused a request (or a connection): the counters' reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// Malformed: not JSON, no step, another path or method, an unidentifiable caller
    /// (400, 404 for a path, 405).
    BadRequest,
    /// A body over [`MAX_BODY_BYTES`] (413).
    TooLarge,
    /// No such node (or no container of it) on this host (404).
    UnknownNode,
    /// The node has a token and none was sent (401).
    NoToken,
    /// A wrong token (401).
    BadToken,
    /// A bridge-network node's report from another address (403).
    WrongAddress,
    /// A connection over [`MAX_CONNECTIONS`] or [`MAX_CONNECTIONS_PER_SOURCE`] (closed at
    /// once).
    TooManyConnections,
}

impl Refusal {
    /// Every reason, in counter order.
    pub const ALL: [Refusal; 7] = [
        Refusal::BadRequest,
        Refusal::TooLarge,
        Refusal::UnknownNode,
        Refusal::NoToken,
        Refusal::BadToken,
        Refusal::WrongAddress,
        Refusal::TooManyConnections,
    ];

    /// The reason's name (the Prometheus label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::TooLarge => "too_large",
            Refusal::UnknownNode => "unknown_node",
            Refusal::NoToken => "no_token",
            Refusal::BadToken => "bad_token",
            Refusal::WrongAddress => "wrong_address",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// What a taken heartbeat did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The node it was merged into.
    pub key: NodeKey,
    /// Metrics not kept (over [`crate::progress::MAX_METRICS`] names, names over
    /// [`crate::progress::MAX_METRIC_NAME`] bytes, or not finite).
    pub metrics_dropped: usize,
}

/// The endpoint's counters since the agent started, per reason (in the runtime's
/// [`crate::RuntimeCounters`]; the agent logs them and exposes them in its Prometheus
/// registry and `heartbeat.prom`).
#[derive(Debug, Default)]
pub struct HeartbeatStats {
    accepted: std::sync::atomic::AtomicU64,
    metrics_dropped: std::sync::atomic::AtomicU64,
    refused: [std::sync::atomic::AtomicU64; Refusal::ALL.len()],
}

/// A reading of [`HeartbeatStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatCounters {
    /// Heartbeats taken.
    pub accepted: u64,
    /// Metrics dropped from taken heartbeats.
    pub metrics_dropped: u64,
    /// Refusals per reason (every reason, zeros included).
    pub refused: BTreeMap<&'static str, u64>,
}

impl HeartbeatStats {
    /// Counts a taken heartbeat (and what it dropped).
    pub fn accepted(&self, metrics_dropped: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.accepted.fetch_add(1, Relaxed);
        if metrics_dropped > 0 {
            self.metrics_dropped
                .fetch_add(metrics_dropped as u64, Relaxed);
        }
    }

    /// Counts a refusal; returns the reason's count so far (with this one).
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// The counters now.
    pub fn read(&self) -> HeartbeatCounters {
        use std::sync::atomic::Ordering::Relaxed;
        HeartbeatCounters {
            accepted: self.accepted.load(Relaxed),
            metrics_dropped: self.metrics_dropped.load(Relaxed),
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.as_str(), self.refused[r.index()].load(Relaxed)))
                .collect(),
        }
    }
}

impl HeartbeatCounters {
    /// Refusals of every reason together.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

impl std::fmt::Display for HeartbeatCounters {
    /// `accepted=N metrics_dropped=N refused: reason=N ...` (reasons with a count only).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accepted={} metrics_dropped={} refused={}",
            self.accepted,
            self.metrics_dropped,
            self.refused_total()
        )?;
        for (reason, n) in self.refused.iter().filter(|(_, n)| **n > 0) {
            write!(f, " {reason}={n}")?;
        }
        Ok(())
    }
}

/// Where heartbeats go (the [`crate::Runtime`]; a fake in tests).
pub trait HeartbeatSink: Send + Sync {
    /// Merges a heartbeat from `peer` (with the bearer `token` it sent, if any) into the
    /// progress of the node it names (or, without job/node, of the node with that
    /// address, or else that token) and returns the node.
    fn record(
        &self,
        report: &HeartbeatReport,
        peer: IpAddr,
        token: Option<&str>,
    ) -> Result<Recorded, HeartbeatError>;

    /// Counts a refusal the endpoint made before (or instead of) [`HeartbeatSink::record`]
    /// (a malformed request, a connection over the limits); `peer` is the caller.
    fn refused(&self, _why: Refusal, _peer: IpAddr) {}
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message.into() }))
}

/// The bearer token of a request: `Some("")` for an `Authorization` header of another
/// scheme (or not text), so that it is refused as a wrong token rather than taken for none.
pub fn bearer_token<B>(req: &Request<B>) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?;
    let text = value.to_str().unwrap_or_default().trim();
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    Some(if scheme.eq_ignore_ascii_case("bearer") {
        token.trim().to_string()
    } else {
        String::new()
    })
}

/// Handles one request (any body type): routing, size limit, JSON parsing, recording.
/// Refusals are counted through [`HeartbeatSink::refused`] (or by the sink's
/// [`HeartbeatSink::record`] itself).
pub async fn handle<S, B>(sink: &S, peer: IpAddr, req: Request<B>) -> Response<Full<Bytes>>
where
    S: HeartbeatSink + ?Sized,
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if req.uri().path() != HEARTBEAT_PATH {
        sink.refused(Refusal::BadRequest, peer);
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint {}; POST {HEARTBEAT_PATH}",
                req.uri().path()
            ),
        );
    }
    if req.method() != Method::POST {
        sink.refused(Refusal::BadRequest, peer);
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("use POST {HEARTBEAT_PATH}"),
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
        return r;
    }
    let token = bearer_token(&req);
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                sink.refused(Refusal::TooLarge, peer);
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body over {MAX_BODY_BYTES} bytes"),
                );
            }
            sink.refused(Refusal::BadRequest, peer);
            return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
        }
    };
    let report = match parse_report(&body) {
        Ok(r) => r,
        Err(e) => {
            sink.refused(e.refusal(), peer);
            return error(e.status(), e.to_string());
        }
    };
    match sink.record(&report, peer, token.as_deref()) {
        Ok(Recorded {
            key: (job, node),
            metrics_dropped,
        }) => {
            debug!(%job, %node, step = ?report.step, "heartbeat");
            let mut answer = serde_json::json!({"ok": true, "job": job, "node": node});
            if metrics_dropped > 0 {
                answer["metrics_dropped"] = metrics_dropped.into();
            }
            json(StatusCode::OK, answer)
        }
        Err(e) => {
            debug!(%peer, error = %e, "heartbeat refused");
            let mut r = error(e.status(), e.to_string());
            if e.status() == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer realm=\"geomx-heartbeat\""),
                );
            }
            r
        }
    }
}

/// Parses and checks a heartbeat body.
pub fn parse_report(body: &[u8]) -> Result<HeartbeatReport, HeartbeatError> {
    let report: HeartbeatReport = serde_json::from_slice(body)
        .map_err(|e| HeartbeatError::Invalid(format!("invalid heartbeat JSON: {e}")))?;
    if report.step.is_none() {
        return Err(HeartbeatError::Invalid(
            "missing \"step\" (the cumulative iteration, an integer)".into(),
        ));
    }
    for (what, v) in [("job", &report.job), ("node", &report.node)] {
        if v.as_deref().is_some_and(str::is_empty) {
            return Err(HeartbeatError::Invalid(format!("empty \"{what}\"")));
        }
    }
    Ok(report)
}

/// The heartbeat endpoint: a listening socket, served by [`HeartbeatServer::serve`].
#[derive(Debug)]
pub struct HeartbeatServer {
    listener: TcpListener,
}

impl HeartbeatServer {
    /// Binds `addr` (the docker0 gateway address and [`DEFAULT_HEARTBEAT_PORT`]; port 0
    /// for any free port).
    pub async fn bind(addr: SocketAddr) -> Result<HeartbeatServer> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Io {
                what: format!("binding the heartbeat endpoint on {addr}"),
                source,
            })?;
        Ok(HeartbeatServer { listener })
    }

    /// Serves on a listener bound elsewhere (e.g. on a thread inside another network
    /// namespace: the socket stays in the namespace it was created in).
    pub fn from_std(listener: std::net::TcpListener) -> Result<HeartbeatServer> {
        let io = |source| RuntimeError::Io {
            what: "adopting the heartbeat listener".into(),
            source,
        };
        listener.set_nonblocking(true).map_err(io)?;
        let listener = TcpListener::from_std(listener).map_err(io)?;
        Ok(HeartbeatServer { listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|source| RuntimeError::Io {
                what: "heartbeat endpoint address".into(),
                source,
            })
    }

    /// Serves heartbeats into `sink` until `shutdown` is cancelled. Bounded: at most
    /// [`MAX_CONNECTIONS`] connections ([`MAX_CONNECTIONS_PER_SOURCE`] per source address),
    /// each closed after [`CONNECTION_DEADLINE`] whatever it is doing; headers within 10 s.
    pub async fn serve<S>(self, sink: S, shutdown: CancellationToken) -> Result<()>
    where
        S: HeartbeatSink + Clone + 'static,
    {
        let open = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<IpAddr, usize>::new()));
        let total = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "heartbeat endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = total.clone().try_acquire_owned() else {
                sink.refused(Refusal::TooManyConnections, peer.ip());
                continue;
            };
            let slot = Slot::take(&open, peer.ip());
            let Some(slot) = slot else {
                sink.refused(Refusal::TooManyConnections, peer.ip());
                continue;
            };
            let sink = sink.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let sink = sink.clone();
                    async move { Ok::<_, Infallible>(handle(&sink, peer.ip(), req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    r = tokio::time::timeout(CONNECTION_DEADLINE, conn) => match r {
                        Ok(Err(e)) => debug!(%peer, error = %e, "heartbeat connection"),
                        Err(_) => debug!(%peer, "heartbeat connection: deadline, closed"),
                        Ok(Ok(())) => {}
                    }
                }
            });
        }
    }
}

/// One connection's place in the per-source count, given back when dropped.
struct Slot {
    open: std::sync::Arc<std::sync::Mutex<BTreeMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Slot {
    fn take(
        open: &std::sync::Arc<std::sync::Mutex<BTreeMap<IpAddr, usize>>>,
        ip: IpAddr,
    ) -> Option<Slot> {
        let mut m = open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Slot {
            open: open.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Fake {
        known: Vec<(NodeKey, IpAddr)>,
        got: Mutex<Vec<(NodeKey, HeartbeatReport)>>,
        tokens: Mutex<Vec<Option<String>>>,
        stats: HeartbeatStats,
    }

    impl HeartbeatSink for Fake {
        fn record(
            &self,
            report: &HeartbeatReport,
            peer: IpAddr,
            token: Option<&str>,
        ) -> Result<Recorded, HeartbeatError> {
            if let Ok(mut t) = self.tokens.lock() {
                t.push(token.map(str::to_string));
            }
            if token == Some("wrong") {
                return Err(HeartbeatError::BadToken {
                    job: "job1".into(),
                    node: "a-worker-0".into(),
                });
            }
            let key = match (&report.job, &report.node) {
                (Some(j), Some(n)) => self
                    .known
                    .iter()
                    .find(|(k, _)| k.0 == *j && k.1 == *n)
                    .map(|(k, _)| k.clone())
                    .ok_or_else(|| HeartbeatError::UnknownNode {
                        job: j.clone(),
                        node: n.clone(),
                    })?,
                _ => self
                    .known
                    .iter()
                    .find(|(_, ip)| *ip == peer)
                    .map(|(k, _)| k.clone())
                    .ok_or(HeartbeatError::UnknownPeer(peer))?,
            };
            if let Ok(mut g) = self.got.lock() {
                g.push((key.clone(), report.clone()));
            }
            Ok(Recorded {
                key,
                metrics_dropped: report.metrics.len().saturating_sub(2),
            })
        }

        fn refused(&self, why: Refusal, _peer: IpAddr) {
            self.stats.refused(why);
        }
    }

    fn fake() -> Fake {
        Fake {
            known: vec![(
                ("job1".into(), "a-worker-0".into()),
                "172.17.34.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            )],
            ..Default::default()
        }
    }

    async fn call(
        sink: &Fake,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let (status, json, _) = call_with(sink, method, path, body, None).await;
        (status, json)
    }

    async fn call_with(
        sink: &Fake,
        method: Method,
        path: &str,
        body: &str,
        authorization: Option<&str>,
    ) -> (StatusCode, serde_json::Value, hyper::HeaderMap) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(a) = authorization {
            req = req.header(AUTHORIZATION, a);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_default();
        let peer: IpAddr = "172.17.34.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let resp = handle(sink, peer, req).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or_default(),
            headers,
        )
    }

    #[tokio::test]
    async fn good_heartbeat_is_recorded() {
        let sink = fake();
        let (status, body) = call(
            &sink,
            Method::POST,
            HEARTBEAT_PATH,
            r#"{"job": "job1", "node": "a-worker-0", "step": 12, "epoch": 0, "metrics": {"accuracy": 0.9, "loss": 0.3}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["ok"], true);
        assert_eq!(body["node"], "a-worker-0");
        let got = sink.got.lock().map(|g| g.clone()).unwrap_or_default();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.step, Some(12));
        assert_eq!(got[0].1.epoch, Some(0));
        assert_eq!(got[0].1.metrics.get("loss"), Some(&0.3));
    }

    #[tokio::test]
    async fn caller_found_by_address_without_job_and_node() {
        let sink = fake();
        let (status, body) = call(
            &sink,
            Method::POST,
            HEARTBEAT_PATH,
            r#"{"step": 3, "epoch": null}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["job"], "job1");
    }

    #[tokio::test]
    async fn bad_requests_get_json_errors() {
        let sink = fake();
        for (body, want) in [
            ("not json", StatusCode::BAD_REQUEST),
            (
                r#"{"job": "job1", "node": "a-worker-0"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (r#"{"step": -1}"#, StatusCode::BAD_REQUEST),
            (
                r#"{"step": 1, "metrics": {"loss": "x"}}"#,
                StatusCode::BAD_REQUEST,
            ),
            (r#"{"step": 1, "job": ""}"#, StatusCode::BAD_REQUEST),
            (
                r#"{"job": "job1", "node": "nope", "step": 1}"#,
                StatusCode::NOT_FOUND,
            ),
        ] {
            let (status, json) = call(&sink, Method::POST, HEARTBEAT_PATH, body).await;
            assert_eq!(status, want, "{body}: {json}");
            assert!(
                json["error"].as_str().is_some_and(|s| !s.is_empty()),
                "{body}: {json}"
            );
        }
        let (status, _) = call(&sink, Method::GET, HEARTBEAT_PATH, "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, _) = call(&sink, Method::POST, "/other", "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let big = format!(r#"{{"step": 1, "job": "{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        let (status, _) = call(&sink, Method::POST, HEARTBEAT_PATH, &big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(sink.got.lock().map(|g| g.is_empty()).unwrap_or(false));
        // every refusal before the sink was counted by reason
        let c = sink.stats.read();
        assert_eq!(c.refused["bad_request"], 7, "{c}");
        assert_eq!(c.refused["too_large"], 1, "{c}");
    }

    #[tokio::test]
    async fn the_bearer_token_reaches_the_sink_and_a_refusal_asks_for_it() {
        let sink = fake();
        let body = r#"{"job": "job1", "node": "a-worker-0", "step": 1, "metrics": {"a": 1, "b": 2, "c": 3, "d": 4}}"#;
        let (status, json, _) = call_with(
            &sink,
            Method::POST,
            HEARTBEAT_PATH,
            body,
            Some("Bearer abc123"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(
            json["metrics_dropped"], 2,
            "the answer says what was dropped"
        );
        let (status, json, headers) = call_with(
            &sink,
            Method::POST,
            HEARTBEAT_PATH,
            body,
            Some("bearer wrong"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{json}");
        assert!(
            headers
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("Bearer")),
            "{headers:?}"
        );
        call_with(&sink, Method::POST, HEARTBEAT_PATH, body, Some("Basic abc")).await;
        call_with(&sink, Method::POST, HEARTBEAT_PATH, body, None).await;
        let tokens = sink.tokens.lock().map(|t| t.clone()).unwrap_or_default();
        assert_eq!(
            tokens,
            vec![
                Some("abc123".to_string()),
                Some("wrong".to_string()),
                Some(String::new()),
                None
            ],
            "another scheme is an empty (wrong) token, not none"
        );
    }

    #[test]
    fn counters_count_per_reason() {
        let stats = HeartbeatStats::default();
        stats.accepted(0);
        stats.accepted(5);
        assert_eq!(stats.refused(Refusal::BadToken), 1);
        assert_eq!(stats.refused(Refusal::BadToken), 2);
        stats.refused(Refusal::WrongAddress);
        let c = stats.read();
        assert_eq!(c.refused_total(), 3);
        assert_eq!(
            c.to_string(),
            "accepted=2 metrics_dropped=5 refused=3 bad_token=2 wrong_address=1"
        );
        assert_eq!((c.accepted, c.metrics_dropped), (2, 5));
        assert_eq!(
            c.refused.len(),
            Refusal::ALL.len(),
            "every reason, zeros too"
        );
        assert_eq!(c.refused.get("bad_token"), Some(&2));
        assert_eq!(c.refused.get("no_token"), Some(&0));
        assert_eq!(
            HeartbeatError::NoToken {
                job: "j".into(),
                node: "n".into()
            }
            .status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[derive(Clone)]
    struct Nobody;

    impl HeartbeatSink for Nobody {
        fn record(
            &self,
            _: &HeartbeatReport,
            peer: IpAddr,
            _: Option<&str>,
        ) -> Result<Recorded, HeartbeatError> {
            Err(HeartbeatError::UnknownPeer(peer))
        }
    }

    #[tokio::test]
    async fn connections_per_source_are_capped_and_the_endpoint_keeps_serving() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = HeartbeatServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.serve(Nobody, stop.clone()));
        // slow clients that never send a request hold their slots
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_SOURCE {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        // one more from the same address is closed at once, without an answer
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed within 5 s")
            .unwrap_or(0);
        assert_eq!(n, 0, "the extra connection got an answer");
        // once the idle ones go, the endpoint answers again
        drop(idle);
        let mut ok = None;
        for _ in 0..50 {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let req = "POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"step\": 1}";
            c.write_all(req.as_bytes()).await.expect("write");
            let mut out = String::new();
            let _ = c.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 400") {
                ok = Some(out);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok.is_some(), "the endpoint stopped answering");
        stop.cancel();
        let _ = task.await;
    }

    #[test]
    fn url() {
        assert_eq!(
            agent_url(
                "172.17.34.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
                7948
            ),
            "http://172.17.34.1:7948"
        );
    }
}
