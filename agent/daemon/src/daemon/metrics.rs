//! The agent's Prometheus metrics: one registry, every metric defined here (and documented
//! in docs/operations.md, "Agent metrics"), served in plain HTTP on `metrics_listen`
//! (default `127.0.0.1:7950`) at `/metrics` ([`serve`]).
//!
//! * The network task counts its passes by result and the changes they made by kind
//!   ([`AgentMetrics::observe_pass`]); the link prober sets the per-peer gauges
//!   ([`AgentMetrics::set_links`]).
//! * The runtime counts role container starts and exits, image pulls and the heartbeat
//!   endpoint in plain atomics ([`RuntimeCounters`], one for the whole process, handed to
//!   every runtime the daemon starts); each scrape brings the registry's counters up to
//!   them.
//! * The heartbeat families (`geomx_agent_heartbeats_accepted_total`,
//!   `geomx_agent_heartbeats_refused_total{reason}`,
//!   `geomx_agent_heartbeat_metrics_dropped_total`) are in a registry of their own, rendered
//!   both into `/metrics` and into `state_dir/heartbeat.prom` for node_exporter's textfile
//!   collector ([`AgentMetrics::render_heartbeats`]).
//!
//! Counters start at zero with the process. Label values come from fixed sets (`result`,
//! `kind`, `outcome`, `reason`) or are host names of the cluster (`peer`).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use geomx_net::{Change, NetError, PassOutcome};
use geomx_proto::v1::PeerLink;
use geomx_proto::web::{WebLimits, WebResponse, WebServer, plain, respond};
use geomx_runtime::{CancellationToken, Refusal, RuntimeCounters};
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{error, info};

/// Default `metrics_listen`: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7950";

/// Most connections the metrics listener holds at once.
const MAX_CONNECTIONS: usize = 16;

/// Label `result` (`ok`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Label `kind` (one of [`Change::KINDS`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Label `peer` (a host name of the cluster).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// Label `outcome` (`success`, `failure`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Label `reason` (one of [`Refusal::ALL`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Label `version` of `geomx_agent_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

const OK: ResultLabel = ResultLabel { result: "ok" };
const ERROR: ResultLabel = ResultLabel { result: "error" };
const SUCCESS: OutcomeLabel = OutcomeLabel { outcome: "success" };
const FAILURE: OutcomeLabel = OutcomeLabel { outcome: "failure" };

/// The agent's registry (see the module docs).
pub struct AgentMetrics {
    registry: Registry,
    heartbeat_registry: Registry,
    runtime: Arc<RuntimeCounters>,
    network_passes: Family<ResultLabel, Counter>,
    network_changes: Family<KindLabel, Counter>,
    peer_rtt: Family<PeerLabel, FloatGauge>,
    peer_loss: Family<PeerLabel, FloatGauge>,
    container_starts: Counter,
    container_exits: Family<OutcomeLabel, Counter>,
    pull_bytes: Counter,
    pulls: Family<ResultLabel, Counter>,
    heartbeats_accepted: Counter,
    heartbeats_refused: Family<ReasonLabel, Counter>,
    heartbeat_metrics_dropped: Counter,
    /// One scrape at a time: the counters are brought up to the runtime's, then encoded.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Registers every metric, each series of a fixed label set at zero.
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::default();
        let mut heartbeat_registry = Registry::default();
        let network_passes = Family::<ResultLabel, Counter>::default();
        let network_changes = Family::<KindLabel, Counter>::default();
        let peer_rtt = Family::<PeerLabel, FloatGauge>::default();
        let peer_loss = Family::<PeerLabel, FloatGauge>::default();
        let container_starts = Counter::default();
        let container_exits = Family::<OutcomeLabel, Counter>::default();
        let pull_bytes = Counter::default();
        let pulls = Family::<ResultLabel, Counter>::default();
        let heartbeats_accepted = Counter::default();
        let heartbeats_refused = Family::<ReasonLabel, Counter>::default();
        let heartbeat_metrics_dropped = Counter::default();
        let info = Family::<VersionLabel, Gauge>::default();

        for label in [OK, ERROR] {
            let _ = network_passes.get_or_create(&label);
            let _ = pulls.get_or_create(&label);
        }
        for kind in Change::KINDS {
            let _ = network_changes.get_or_create(&KindLabel { kind });
        }
        for label in [SUCCESS, FAILURE] {
            let _ = container_exits.get_or_create(&label);
        }
        for r in Refusal::ALL {
            let _ = heartbeats_refused.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        info.get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);

        registry.register("geomx_agent_info", "The agent's version (value 1)", info);
        registry.register(
            "geomx_agent_network_passes",
            "Network reconcile passes, by result",
            network_passes.clone(),
        );
        registry.register(
            "geomx_agent_network_changes",
            "Changes the network passes made to the host, by kind",
            network_changes.clone(),
        );
        registry.register(
            "geomx_agent_peer_rtt_seconds",
            "Median round trip to a peer's docker0 gateway through the data plane over the last probes (absent while every probe is lost)",
            peer_rtt.clone(),
        );
        registry.register(
            "geomx_agent_peer_loss_ratio",
            "Share (0..1) of the last probes to a peer's docker0 gateway that got no answer",
            peer_loss.clone(),
        );
        registry.register(
            "geomx_agent_container_starts",
            "Role containers started",
            container_starts.clone(),
        );
        registry.register(
            "geomx_agent_container_exits",
            "Role containers seen ending, by outcome (success: exit code 0)",
            container_exits.clone(),
        );
        registry.register(
            "geomx_agent_image_pull_bytes",
            "Image layer bytes downloaded by pulls",
            pull_bytes.clone(),
        );
        registry.register(
            "geomx_agent_image_pulls",
            "Image pulls ended, by result",
            pulls.clone(),
        );
        heartbeat_registry.register(
            "geomx_agent_heartbeats_accepted",
            "Node heartbeats the agent took",
            heartbeats_accepted.clone(),
        );
        heartbeat_registry.register(
            "geomx_agent_heartbeats_refused",
            "Node heartbeats (or connections) the agent refused, by reason",
            heartbeats_refused.clone(),
        );
        heartbeat_registry.register(
            "geomx_agent_heartbeat_metrics_dropped",
            "Metrics of taken heartbeats that were not kept (per-node limits)",
            heartbeat_metrics_dropped.clone(),
        );
        AgentMetrics {
            registry,
            heartbeat_registry,
            runtime: Arc::default(),
            network_passes,
            network_changes,
            peer_rtt,
            peer_loss,
            container_starts,
            container_exits,
            pull_bytes,
            pulls,
            heartbeats_accepted,
            heartbeats_refused,
            heartbeat_metrics_dropped,
            scrape: Mutex::new(()),
        }
    }

    /// The counters every runtime of this process counts into
    /// ([`geomx_runtime::RuntimeConfig::counters`]).
    pub fn runtime_counters(&self) -> Arc<RuntimeCounters> {
        self.runtime.clone()
    }

    /// Counts one network pass and the changes it made.
    pub fn observe_pass(&self, result: &Result<PassOutcome, NetError>) {
        match result {
            Ok(outcome) => {
                self.network_passes.get_or_create(&OK).inc();
                for c in &outcome.changes {
                    self.network_changes
                        .get_or_create(&KindLabel { kind: c.kind() })
                        .inc();
                }
            }
            Err(_) => {
                self.network_passes.get_or_create(&ERROR).inc();
            }
        }
    }

    /// Sets the per-peer gauges to `links` (series of peers no longer there go).
    pub fn set_links(&self, links: &[PeerLink]) {
        self.peer_rtt.clear();
        self.peer_loss.clear();
        for l in links {
            let label = PeerLabel {
                peer: l.peer.clone(),
            };
            let loss = (l.loss_pct / 100.0).clamp(0.0, 1.0);
            self.peer_loss.get_or_create(&label).set(loss);
            if loss < 1.0 {
                self.peer_rtt.get_or_create(&label).set(l.rtt_ms / 1000.0);
            }
        }
    }

    /// Every metric now, in the Prometheus text format
    /// ([`geomx_proto::exposition::CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let _one = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.catch_up();
        let mut text = geomx_proto::exposition::encode(&self.registry);
        text.push_str(&geomx_proto::exposition::encode(&self.heartbeat_registry));
        text
    }

    /// The heartbeat families only (what `heartbeat.prom` holds), in the same format.
    pub fn render_heartbeats(&self) -> String {
        let _one = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.catch_up();
        geomx_proto::exposition::encode(&self.heartbeat_registry)
    }

    /// Brings the registry's counters up to the runtime's atomics.
    fn catch_up(&self) {
        let now = self.runtime.read();
        up_to(&self.container_starts, now.container_starts);
        up_to(
            &self.container_exits.get_or_create(&SUCCESS),
            now.exits_success,
        );
        up_to(
            &self.container_exits.get_or_create(&FAILURE),
            now.exits_failure,
        );
        up_to(&self.pull_bytes, now.pull_bytes);
        up_to(&self.pulls.get_or_create(&OK), now.pulls_ok);
        up_to(&self.pulls.get_or_create(&ERROR), now.pulls_failed);
        let hb = self.runtime.heartbeats.read();
        up_to(&self.heartbeats_accepted, hb.accepted);
        up_to(&self.heartbeat_metrics_dropped, hb.metrics_dropped);
        for r in Refusal::ALL {
            let n = hb.refused.get(r.as_str()).copied().unwrap_or(0);
            up_to(
                &self
                    .heartbeats_refused
                    .get_or_create(&ReasonLabel { reason: r.as_str() }),
                n,
            );
        }
    }
}

/// Moves `counter` up to `value` (a counter never goes down).
fn up_to(counter: &Counter, value: u64) {
    let have = counter.get();
    if value > have {
        counter.inc_by(value - have);
    }
}

/// The answer to `method path`: the metrics at `/metrics` (GET or HEAD, 405 otherwise),
/// 404 elsewhere.
pub fn answer(metrics: &AgentMetrics, method: &Method, path: &str) -> WebResponse {
    match path {
        "/metrics" => {
            if method != Method::GET && method != Method::HEAD {
                let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET");
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                return r;
            }
            respond(
                StatusCode::OK,
                geomx_proto::exposition::CONTENT_TYPE,
                metrics.render(),
            )
        }
        _ => plain(StatusCode::NOT_FOUND, "not found: try /metrics"),
    }
}

/// Binds `addr` (plain HTTP) and serves [`answer`] on it until `shutdown`, publishing the
/// bound address in `bound`. A listener that cannot be bound is logged; the agent goes on
/// without it.
pub async fn serve(
    metrics: Arc<AgentMetrics>,
    addr: SocketAddr,
    bound: watch::Sender<Option<SocketAddr>>,
    shutdown: CancellationToken,
) {
    let limits = WebLimits {
        max_connections: MAX_CONNECTIONS,
        ..WebLimits::default()
    };
    let server = match WebServer::bind(addr, None, limits).await {
        Ok(s) => s,
        Err(e) => {
            error!(%addr, error = %e, "cannot listen for /metrics on metrics_listen; the agent goes on without it (set metrics_listen to a free address:port, or \"\" for none)");
            return;
        }
    };
    let local = server.local_addr().unwrap_or(addr);
    info!(url = %format!("http://{local}/metrics"), "serving the agent's metrics (metrics_listen)");
    bound.send_replace(Some(local));
    let handler = move |_peer: SocketAddr, req: hyper::Request<hyper::body::Incoming>| {
        let metrics = metrics.clone();
        async move { answer(&metrics, req.method(), req.uri().path()) }
    };
    server.serve(handler, shutdown).await;
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, Instant};

    use prometheus_parse::{Scrape, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One HTTP/1.1 request to `addr`; the status code and the body.
    pub(crate) async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
            .await
            .expect("answered within 10 s")
            .expect("read");
        let out = String::from_utf8(out).expect("utf-8");
        let (head, body) = out.split_once("\r\n\r\n").expect("a head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        // (Connection: close, no chunking for a full body)
        (status, body.to_owned())
    }

    /// The text parsed by a Prometheus text-format parser.
    pub(crate) fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
    }

    /// The value of the sample `name` with the labels `labels` (all of them, none more).
    pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<Value> {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .map(|s| s.value.clone())
    }

    /// A counter's value (panics when the sample is missing or not a counter).
    pub(crate) fn counter(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        match value(scrape, name, labels) {
            Some(Value::Counter(v)) => v,
            other => panic!("{name}{labels:?}: {other:?}"),
        }
    }

    /// Starts [`serve`] on 127.0.0.1:0; its address.
    pub(crate) async fn listening(
        metrics: Arc<AgentMetrics>,
        stop: &CancellationToken,
    ) -> SocketAddr {
        let (tx, mut rx) = watch::channel(None);
        tokio::spawn(serve(
            metrics,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            tx,
            stop.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = tokio::time::timeout_at(deadline.into(), rx.wait_for(Option::is_some))
            .await
            .expect("bound within 10 s")
            .expect("bound");
        addr.expect("an address")
    }

    #[tokio::test]
    async fn the_listener_serves_every_documented_metric_with_its_type() {
        let metrics = Arc::new(AgentMetrics::new());
        let stop = CancellationToken::new();
        let addr = listening(metrics.clone(), &stop).await;

        let (status, body) = http(addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let scrape = parse(&body);
        for (name, labels) in [
            ("geomx_agent_network_passes_total", vec![("result", "ok")]),
            (
                "geomx_agent_network_passes_total",
                vec![("result", "error")],
            ),
            (
                "geomx_agent_network_changes_total",
                vec![("kind", "route_added")],
            ),
            (
                "geomx_agent_network_changes_total",
                vec![("kind", "wireguard_peer_set")],
            ),
            ("geomx_agent_container_starts_total", vec![]),
            (
                "geomx_agent_container_exits_total",
                vec![("outcome", "success")],
            ),
            (
                "geomx_agent_container_exits_total",
                vec![("outcome", "failure")],
            ),
            ("geomx_agent_image_pull_bytes_total", vec![]),
            ("geomx_agent_image_pulls_total", vec![("result", "ok")]),
            ("geomx_agent_image_pulls_total", vec![("result", "error")]),
            ("geomx_agent_heartbeats_accepted_total", vec![]),
            (
                "geomx_agent_heartbeats_refused_total",
                vec![("reason", "bad_token")],
            ),
            (
                "geomx_agent_heartbeats_refused_total",
                vec![("reason", "too_many_connections")],
            ),
            ("geomx_agent_heartbeat_metrics_dropped_total", vec![]),
        ] {
            assert_eq!(
                counter(&scrape, name, &labels),
                0.0,
                "{name}{labels:?} starts at 0"
            );
        }
        let kinds = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "geomx_agent_network_changes_total")
            .count();
        assert_eq!(kinds, Change::KINDS.len(), "one series per change kind");
        assert_eq!(
            value(
                &scrape,
                "geomx_agent_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(Value::Gauge(1.0))
        );
        assert!(
            scrape
                .samples
                .iter()
                .all(|s| s.metric.starts_with("geomx_agent_")),
            "{body}"
        );
        // no peer yet: no peer series
        assert!(value(&scrape, "geomx_agent_peer_loss_ratio", &[("peer", "b")]).is_none());

        // the counters move with the code paths that count, the gauges follow the links
        let outcome = PassOutcome {
            changes: vec![
                Change::RouteAdded {
                    destination: "172.17.29.0/24".parse().expect("net"),
                    via: "via 10.1.1.29".into(),
                },
                Change::IpForwardEnabled { was: "0".into() },
            ],
            action: geomx_net::Action::Converged,
            backends: Vec::new(),
            docker_offline: false,
        };
        metrics.observe_pass(&Ok(outcome));
        metrics.observe_pass(&Err(NetError::DockerUnavailable {
            host: "unix:///x".into(),
            reason: "down".into(),
        }));
        metrics.set_links(&[
            PeerLink {
                peer: "b".into(),
                backend: "host-gw".into(),
                rtt_ms: 12.0,
                loss_pct: 25.0,
                handshake_age_s: -1,
            },
            PeerLink {
                peer: "c".into(),
                backend: "none".into(),
                rtt_ms: 0.0,
                loss_pct: 100.0,
                handshake_age_s: -1,
            },
        ]);
        let rt = metrics.runtime_counters();
        rt.container_started();
        rt.container_exited(false);
        rt.pull_bytes(4096);
        rt.pull_ended(true);
        rt.heartbeats.accepted(2);
        rt.heartbeats.refused(Refusal::BadToken);

        let (_, body) = http(addr, "GET", "/metrics").await;
        let scrape = parse(&body);
        let c = |name: &str, labels: &[(&str, &str)]| counter(&scrape, name, labels);
        assert_eq!(
            c("geomx_agent_network_passes_total", &[("result", "ok")]),
            1.0
        );
        assert_eq!(
            c("geomx_agent_network_passes_total", &[("result", "error")]),
            1.0
        );
        assert_eq!(
            c(
                "geomx_agent_network_changes_total",
                &[("kind", "route_added")]
            ),
            1.0
        );
        assert_eq!(
            c(
                "geomx_agent_network_changes_total",
                &[("kind", "ip_forward_enabled")]
            ),
            1.0
        );
        assert_eq!(
            c(
                "geomx_agent_network_changes_total",
                &[("kind", "route_deleted")]
            ),
            0.0
        );
        assert_eq!(c("geomx_agent_container_starts_total", &[]), 1.0);
        assert_eq!(
            c(
                "geomx_agent_container_exits_total",
                &[("outcome", "failure")]
            ),
            1.0
        );
        assert_eq!(
            c(
                "geomx_agent_container_exits_total",
                &[("outcome", "success")]
            ),
            0.0
        );
        assert_eq!(c("geomx_agent_image_pull_bytes_total", &[]), 4096.0);
        assert_eq!(c("geomx_agent_image_pulls_total", &[("result", "ok")]), 1.0);
        assert_eq!(c("geomx_agent_heartbeats_accepted_total", &[]), 1.0);
        assert_eq!(c("geomx_agent_heartbeat_metrics_dropped_total", &[]), 2.0);
        assert_eq!(
            c(
                "geomx_agent_heartbeats_refused_total",
                &[("reason", "bad_token")]
            ),
            1.0
        );
        assert_eq!(
            value(&scrape, "geomx_agent_peer_rtt_seconds", &[("peer", "b")]),
            Some(Value::Gauge(0.012))
        );
        assert_eq!(
            value(&scrape, "geomx_agent_peer_loss_ratio", &[("peer", "b")]),
            Some(Value::Gauge(0.25))
        );
        assert_eq!(
            value(&scrape, "geomx_agent_peer_loss_ratio", &[("peer", "c")]),
            Some(Value::Gauge(1.0))
        );
        assert!(
            value(&scrape, "geomx_agent_peer_rtt_seconds", &[("peer", "c")]).is_none(),
            "no round trip of a peer that answers nothing"
        );
        // a peer gone from the links goes from the gauges
        metrics.set_links(&[]);
        let (_, body) = http(addr, "GET", "/metrics").await;
        assert!(!body.contains("peer=\"b\""), "{body}");

        stop.cancel();
    }

    #[tokio::test]
    async fn only_get_and_head_of_metrics_are_answered() {
        let metrics = Arc::new(AgentMetrics::new());
        let stop = CancellationToken::new();
        let addr = listening(metrics, &stop).await;
        let (status, body) = http(addr, "POST", "/metrics").await;
        assert_eq!(status, 405, "{body}");
        let (status, body) = http(addr, "DELETE", "/metrics").await;
        assert_eq!(status, 405, "{body}");
        let (status, body) = http(addr, "GET", "/").await;
        assert_eq!(status, 404, "{body}");
        let (status, body) = http(addr, "GET", "/metricsx").await;
        assert_eq!(status, 404, "{body}");
        let (status, body) = http(addr, "HEAD", "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.is_empty(), "HEAD has no body: {body}");
        stop.cancel();
    }

    #[test]
    fn heartbeat_prom_holds_the_heartbeat_families_only() {
        let metrics = AgentMetrics::new();
        let rt = metrics.runtime_counters();
        rt.heartbeats.accepted(0);
        rt.heartbeats.refused(Refusal::NoToken);
        rt.heartbeats.refused(Refusal::NoToken);
        rt.container_started();
        let text = metrics.render_heartbeats();
        let scrape = parse(&text);
        assert_eq!(
            counter(&scrape, "geomx_agent_heartbeats_accepted_total", &[]),
            1.0
        );
        assert_eq!(
            counter(
                &scrape,
                "geomx_agent_heartbeats_refused_total",
                &[("reason", "no_token")]
            ),
            2.0
        );
        for r in Refusal::ALL {
            assert!(
                value(
                    &scrape,
                    "geomx_agent_heartbeats_refused_total",
                    &[("reason", r.as_str())]
                )
                .is_some(),
                "{} missing in\n{text}",
                r.as_str()
            );
        }
        assert_eq!(
            counter(&scrape, "geomx_agent_heartbeat_metrics_dropped_total", &[]),
            0.0
        );
        assert!(
            scrape
                .samples
                .iter()
                .all(|s| s.metric.starts_with("geomx_agent_heartbeat")),
            "{text}"
        );
        // the same families, the same values, in /metrics
        let all = parse(&metrics.render());
        assert_eq!(
            counter(
                &all,
                "geomx_agent_heartbeats_refused_total",
                &[("reason", "no_token")]
            ),
            2.0
        );
        assert_eq!(
            counter(&all, "geomx_agent_container_starts_total", &[]),
            1.0
        );
    }
}
