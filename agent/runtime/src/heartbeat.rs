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
//!   `GEOMX_NODE`. They must name a container this agent runs (else 404), and a node on a
//!   bridge network must report from its own container's address (else 403: no container
//!   or host speaks for another's node). When both are left out, the caller is identified by
//!   its source address among the running docker0 containers (not possible for
//!   host-network containers, which share the host's address: they must send both).
//! - Bounded: at most 32 metrics per node (names up to 64 bytes; further names dropped),
//!   64 KiB bodies, 15 s per connection, 256 connections (8 per source address).
//!
//! Answers: 200 `{"ok": true, "job": ..., "node": ...}`; 400 `{"error": "..."}` for a
//! malformed body or an unidentifiable caller; 403 for a node's report from another
//! address; 404 for an unknown job/node or path; 405 for a method other than POST; 413 for
//! a body over 64 KiB.
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
//!     req = urllib.request.Request(url + "/v1/heartbeat", data=json.dumps(body).encode(),
//!                                  headers={"Content-Type": "application/json"})
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
use hyper::header::{ALLOW, CONTENT_TYPE};
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
}

impl HeartbeatError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            HeartbeatError::UnknownNode { .. } => StatusCode::NOT_FOUND,
            HeartbeatError::WrongPeer { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Where heartbeats go (the [`crate::Runtime`]; a fake in tests).
pub trait HeartbeatSink: Send + Sync {
    /// Merges a heartbeat from `peer` into the progress of the node it names (or, without
    /// job/node, of the node with that address) and returns the node.
    fn record(&self, report: &HeartbeatReport, peer: IpAddr) -> Result<NodeKey, HeartbeatError>;
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

/// Handles one request (any body type): routing, size limit, JSON parsing, recording.
pub async fn handle<S, B>(sink: &S, peer: IpAddr, req: Request<B>) -> Response<Full<Bytes>>
where
    S: HeartbeatSink + ?Sized,
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if req.uri().path() != HEARTBEAT_PATH {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint {}; POST {HEARTBEAT_PATH}",
                req.uri().path()
            ),
        );
    }
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("use POST {HEARTBEAT_PATH}"),
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
        return r;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body over {MAX_BODY_BYTES} bytes"),
                );
            }
            return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
        }
    };
    let report = match parse_report(&body) {
        Ok(r) => r,
        Err(e) => return error(e.status(), e.to_string()),
    };
    match sink.record(&report, peer) {
        Ok((job, node)) => {
            debug!(%job, %node, step = ?report.step, "heartbeat");
            json(
                StatusCode::OK,
                serde_json::json!({"ok": true, "job": job, "node": node}),
            )
        }
        Err(e) => {
            debug!(%peer, error = %e, "heartbeat refused");
            error(e.status(), e.to_string())
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
        let mut refused = 0u64;
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
                refused += 1;
                if refused.is_power_of_two() {
                    warn!(%peer, refused, "heartbeat endpoint: too many connections; refusing");
                }
                continue;
            };
            let slot = Slot::take(&open, peer.ip());
            let Some(slot) = slot else {
                refused += 1;
                if refused.is_power_of_two() {
                    warn!(%peer, refused, "heartbeat endpoint: too many connections from one address; refusing");
                }
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
    }

    impl HeartbeatSink for Fake {
        fn record(
            &self,
            report: &HeartbeatReport,
            peer: IpAddr,
        ) -> Result<NodeKey, HeartbeatError> {
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
            Ok(key)
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
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_default();
        let peer: IpAddr = "172.17.34.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let resp = handle(sink, peer, req).await;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
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
    }

    #[derive(Clone)]
    struct Nobody;

    impl HeartbeatSink for Nobody {
        fn record(&self, _: &HeartbeatReport, peer: IpAddr) -> Result<NodeKey, HeartbeatError> {
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
