//! The data plane as this host sees it: every few seconds a TCP connect to each peer's docker0
//! gateway (its heartbeat port), through whatever route geomx installed for the peer, gives a
//! round trip (an answer, accepted or refused, is a reply; only silence is a loss); the
//! WireGuard interface gives each tunnelled peer's handshake age. Reported with every report.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geomx_net::{Kernel, ROUTE_PROTOCOL, WG_INTERFACE};
use geomx_proto::v1::PeerLink;
use geomx_runtime::{CancellationToken, Engine};

use super::{Ctx, convert};

/// Probes kept per peer.
const WINDOW: usize = 10;
/// How long a probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The last probes of one peer: `Some(rtt)` answered, `None` lost.
#[derive(Debug, Default)]
struct Samples(VecDeque<Option<f64>>);

impl Samples {
    fn push(&mut self, s: Option<f64>) {
        if self.0.len() == WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(s);
    }

    /// Median round trip of the answered probes (0 when none) and the share lost in percent.
    fn summary(&self) -> (f64, f64) {
        let mut ok: Vec<f64> = self.0.iter().flatten().copied().collect();
        let lost = self.0.len() - ok.len();
        ok.sort_by(f64::total_cmp);
        let rtt = if ok.is_empty() { 0.0 } else { ok[ok.len() / 2] };
        let loss = if self.0.is_empty() {
            0.0
        } else {
            100.0 * lost as f64 / self.0.len() as f64
        };
        (rtt, loss)
    }
}

/// One TCP connect: the time to an answer (accepted or refused), `None` on silence.
async fn probe(addr: SocketAddr) -> Option<f64> {
    let t0 = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Some(t0.elapsed().as_secs_f64() * 1000.0),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Some(t0.elapsed().as_secs_f64() * 1000.0)
        }
        _ => None,
    }
}

/// Probes every peer every `every` until `shutdown`, publishing into `ctx.links`.
pub async fn run<E: Engine>(
    ctx: Arc<Ctx<E>>,
    kernel: Kernel,
    every: Duration,
    shutdown: CancellationToken,
) {
    let Some(port) = ctx.settings.heartbeat_port else {
        return;
    };
    let mut samples: BTreeMap<String, Samples> = BTreeMap::new();
    loop {
        let peers = ctx
            .desired
            .borrow()
            .as_deref()
            .and_then(|s| convert::desired_network(s).ok())
            .map(|d| d.peers)
            .unwrap_or_default();
        let routes = kernel.routes.main_table().await.unwrap_or_default();
        let wg = kernel.wireguard.clone();
        let device = tokio::task::spawn_blocking(move || wg.show(WG_INTERFACE).ok().flatten())
            .await
            .ok()
            .flatten();
        let probes = peers.iter().map(|p| {
            let gw = Ipv4Addr::from(u32::from(p.subnet.network()).saturating_add(1));
            probe(SocketAddr::from((gw, port)))
        });
        let results = futures::future::join_all(probes).await;
        samples.retain(|name, _| peers.iter().any(|p| &p.name == name));
        let mut links = Vec::with_capacity(peers.len());
        for (p, r) in peers.iter().zip(results) {
            let s = samples.entry(p.name.clone()).or_default();
            s.push(r);
            let (rtt_ms, loss_pct) = s.summary();
            let route = routes
                .iter()
                .find(|r| r.protocol == ROUTE_PROTOCOL && r.destination == p.subnet);
            let backend = match route {
                Some(r) if r.device.as_deref() == Some(WG_INTERFACE) => "wireguard",
                Some(r) if r.device.as_deref() == Some(geomx_net::VXLAN_INTERFACE) => "vxlan",
                Some(r) if r.gateway.is_some() => "host-gw",
                _ => "none",
            };
            let handshake_age_s = device
                .as_ref()
                .zip(p.wireguard_key.as_ref())
                .and_then(|(d, k)| d.handshakes.iter().find(|(key, _)| key == k))
                .and_then(|(_, age)| *age)
                .map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX));
            links.push(PeerLink {
                peer: p.name.clone(),
                backend: backend.into(),
                rtt_ms,
                loss_pct,
                handshake_age_s,
            });
        }
        ctx.metrics.set_links(&links);
        if let Ok(mut l) = ctx.links.lock() {
            *l = links;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_yields_median_and_loss() {
        let mut s = Samples::default();
        assert_eq!(s.summary(), (0.0, 0.0));
        for v in [Some(10.0), None, Some(30.0), Some(20.0)] {
            s.push(v);
        }
        assert_eq!(s.summary(), (20.0, 25.0));
        for _ in 0..WINDOW {
            s.push(None);
        }
        assert_eq!(s.summary(), (0.0, 100.0));
        assert_eq!(s.0.len(), WINDOW);
    }
}
