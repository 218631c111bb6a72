//! Docker as the daemon sees it: the network reconciler made tolerant of a Docker that is
//! not running yet, and the connection of the container runtime.
//!
//! `geomx-agent.service` is ordered before `docker.service` so that the bip is in
//! daemon.json before Docker starts. `geomx-net`'s reconciler, though, reads Docker's
//! version first and stops a pass when Docker does not answer; at boot that would leave the
//! host without routes and iptables until Docker is up, and Docker would wait for the
//! agent's readiness. [`tolerant`] wraps the [`Kernel`] so that while Docker is down a pass
//! still runs completely:
//!
//! * the version is the last one seen (or "unknown": no `allow-direct-routing`, which a
//!   later pass adds once Docker 28+ answers);
//! * daemon.json is written as usual but Docker is not restarted (it reads the file when it
//!   starts), and docker0 counts as carrying daemon.json's bip;
//! * routes, iptables and ip_forward are applied as always.
//!
//! Once Docker answers, the next pass checks docker0 for real (and restarts Docker once if
//! it did not take the bip). [`DockerHealth`] says which mode the last pass ran in.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use geomx_net::kernel::{
    DaemonConfig, DockerDaemon, DockerVersion, KernelRoute, PeerRoute, Routes,
};
use geomx_net::{Kernel, Result as NetResult};
use geomx_runtime::{BollardEngine, Engine, RuntimeError, SandboxConfig, pause};
use ipnet::Ipv4Net;
use tracing::{info, warn};

/// Whether Docker answered the network reconciler at its last look.
#[derive(Clone, Debug, Default)]
pub struct DockerHealth(Arc<Health>);

#[derive(Debug, Default)]
struct Health {
    offline: AtomicBool,
    restarting_until: Mutex<Option<Instant>>,
    last_version: Mutex<Option<DockerVersion>>,
}

impl DockerHealth {
    /// True when the last look found Docker not answering (the pass ran without it).
    pub fn offline(&self) -> bool {
        self.0.offline.load(Ordering::SeqCst)
    }
}

/// `kernel` with Docker-down tolerance (see the module docs); `ready_timeout` is how long
/// Docker gets to answer after a restart the reconciler asked for.
pub fn tolerant(kernel: Kernel, ready_timeout: Duration) -> (Kernel, DockerHealth) {
    let health = DockerHealth::default();
    let docker = Arc::new(TolerantDocker {
        inner: kernel.docker.clone(),
        health: health.clone(),
        ready_timeout,
    });
    let routes = Arc::new(TolerantRoutes {
        inner: kernel.routes.clone(),
        daemon_config: kernel.daemon_config.clone(),
        health: health.clone(),
    });
    (
        Kernel {
            routes,
            docker,
            ..kernel
        },
        health,
    )
}

struct TolerantDocker {
    inner: Arc<dyn DockerDaemon>,
    health: DockerHealth,
    ready_timeout: Duration,
}

impl TolerantDocker {
    fn restarting(&self) -> bool {
        let mut until = self
            .health
            .0
            .restarting_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }
}

impl DockerDaemon for TolerantDocker {
    fn host(&self) -> &str {
        self.inner.host()
    }

    fn version(&self) -> BoxFuture<'_, NetResult<DockerVersion>> {
        Box::pin(async move {
            let h = &self.health.0;
            match self.inner.version().await {
                Ok(v) => {
                    if h.offline.swap(false, Ordering::SeqCst) {
                        info!(docker = %self.inner.host(), version = %v.version, "Docker answers again");
                    }
                    *h.restarting_until
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = None;
                    *h.last_version
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(v.clone());
                    Ok(v)
                }
                // a restart the reconciler asked for: let it wait for the API
                Err(e) if self.restarting() => Err(e),
                Err(e) => {
                    if !h.offline.swap(true, Ordering::SeqCst) {
                        warn!(
                            docker = %self.inner.host(),
                            reason = %e,
                            "Docker is not answering: applying routes and iptables without it; \
                             daemon.json is written for its next start (it is not restarted)"
                        );
                    }
                    Ok(h.last_version
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone()
                        .unwrap_or_else(|| DockerVersion {
                            version: "unknown (Docker is not running)".into(),
                            api_version: String::new(),
                        }))
                }
            }
        })
    }

    fn restart(&self) -> BoxFuture<'_, NetResult<()>> {
        Box::pin(async move {
            if self.health.offline() {
                info!(
                    docker = %self.inner.host(),
                    "Docker is not running: not restarting it; it applies daemon.json when it starts"
                );
                return Ok(());
            }
            let r = self.inner.restart().await;
            *self
                .health
                .0
                .restarting_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some(Instant::now() + self.ready_timeout + Duration::from_secs(1));
            r
        })
    }

    fn restart_command(&self) -> &str {
        self.inner.restart_command()
    }
}

struct TolerantRoutes {
    inner: Arc<dyn Routes>,
    daemon_config: Arc<dyn DaemonConfig>,
    health: DockerHealth,
}

/// The `bip` of daemon.json's text, if it has a valid one.
fn daemon_json_bip(text: &str) -> Option<Ipv4Net> {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()?
        .get("bip")?
        .as_str()?
        .parse()
        .ok()
}

impl Routes for TolerantRoutes {
    fn main_table(&self) -> BoxFuture<'_, NetResult<Vec<KernelRoute>>> {
        self.inner.main_table()
    }

    fn replace(&self, route: PeerRoute) -> BoxFuture<'_, NetResult<()>> {
        self.inner.replace(route)
    }

    fn delete(&self, route: KernelRoute) -> BoxFuture<'_, NetResult<()>> {
        self.inner.delete(route)
    }

    fn lookup(&self, ip: Ipv4Addr) -> BoxFuture<'_, NetResult<Option<KernelRoute>>> {
        self.inner.lookup(ip)
    }

    fn link_addresses(&self, name: String) -> BoxFuture<'_, NetResult<Option<Vec<Ipv4Net>>>> {
        Box::pin(async move {
            if name == "docker0" && self.health.offline() {
                // Docker gives docker0 daemon.json's bip when it starts
                let bip = self
                    .daemon_config
                    .read()
                    .ok()
                    .flatten()
                    .and_then(|t| daemon_json_bip(&t));
                if let Some(bip) = bip {
                    return Ok(Some(vec![bip]));
                }
            }
            self.inner.link_addresses(name).await
        })
    }
}

/// Where the container runtime gets its Docker engine and sandbox settings from.
pub trait EngineSource: Send + Sync + 'static {
    /// The engine type.
    type Engine: Engine;
    /// Connects to Docker (called again after a failure).
    fn connect(&self) -> impl Future<Output = Result<Self::Engine, String>> + Send;
    /// How network sandboxes are made on `engine` (imports the pause image if needed).
    fn sandbox(
        &self,
        engine: &Self::Engine,
    ) -> impl Future<Output = Result<SandboxConfig, String>> + Send;
}

/// The real Docker at a `docker_host` address.
#[derive(Clone, Debug)]
pub struct DockerSource {
    docker_host: String,
}

impl DockerSource {
    /// Docker at `docker_host` (`unix:///var/run/docker.sock`, a socket path, `tcp://...`).
    pub fn new(docker_host: &str) -> DockerSource {
        DockerSource {
            docker_host: docker_host.to_owned(),
        }
    }
}

/// Connects to Docker at `docker_host` and negotiates the API version.
pub async fn connect_engine(docker_host: &str) -> Result<BollardEngine, String> {
    let socket = docker_host
        .strip_prefix("unix://")
        .or_else(|| docker_host.starts_with('/').then_some(docker_host));
    match socket {
        Some(path) => BollardEngine::connect_unix(Path::new(path))
            .await
            .map_err(|e| format!("Docker at {docker_host}: {}", error_chain(&e))),
        None => {
            let docker = bollard::Docker::connect_with_host(docker_host)
                .map_err(|e| format!("Docker at {docker_host}: {e}"))?
                .negotiate_version()
                .await
                .map_err(|e| format!("Docker at {docker_host}: {e}"))?;
            Ok(BollardEngine::new(docker))
        }
    }
}

impl EngineSource for DockerSource {
    type Engine = BollardEngine;

    async fn connect(&self) -> Result<BollardEngine, String> {
        connect_engine(&self.docker_host).await
    }

    async fn sandbox(&self, engine: &BollardEngine) -> Result<SandboxConfig, String> {
        match pause::ensure_image(engine).await {
            Ok(tag) => {
                info!(image = %tag, "network sandboxes run the pause image");
                Ok(pause::sandbox_config(tag))
            }
            Err(RuntimeError::PauseUnavailable) => {
                warn!(
                    "{}: network sandboxes run a shell loop in each job's image",
                    RuntimeError::PauseUnavailable
                );
                Ok(SandboxConfig::default())
            }
            Err(e) => Err(format!(
                "importing the pause image {}: {}",
                pause::image_tag(),
                error_chain(&e)
            )),
        }
    }
}

pub use geomx_proto::error_chain;

#[cfg(test)]
mod tests {
    use geomx_net::fake::FakeKernel;
    use geomx_net::{DesiredNetwork, NetConfig, Reconciler};

    use super::*;

    fn desired() -> DesiredNetwork {
        DesiredNetwork {
            subnet: "172.17.34.0/24".parse().expect("net"),
            cluster: "172.17.0.0/16".parse().expect("net"),
            peers: vec![geomx_net::Peer {
                name: "b".into(),
                underlay_ip: "10.1.1.29".parse().expect("ip"),
                subnet: "172.17.29.0/24".parse().expect("net"),
                wireguard_key: None,
                wireguard_port: None,
            }],
            backend: Default::default(),
        }
    }

    #[tokio::test]
    async fn with_docker_down_routes_and_rules_are_applied_and_daemon_json_written() {
        let fake = FakeKernel::new();
        fake.host().docker = None;
        let (kernel, health) = tolerant(fake.kernel(), Duration::from_secs(1));
        let mut r = Reconciler::new(NetConfig::new("a"), kernel);
        let changes = r
            .reconcile(&desired())
            .await
            .expect("a pass without Docker");
        assert!(health.offline());
        {
            let h = fake.host();
            assert_eq!(h.geomx_routes(), vec!["172.17.29.0/24 via 10.1.1.29"]);
            assert!(!h.rules("nat", "GEOMX-POSTROUTING").is_empty());
            assert_eq!(h.sysctls["net.ipv4.ip_forward"], "1");
            let json: serde_json::Value =
                serde_json::from_str(h.daemon_json.as_deref().expect("daemon.json")).expect("json");
            assert_eq!(json["bip"], "172.17.34.1/24");
            assert_eq!(json["ip-masq"], false);
            assert_eq!(h.restarts, 0, "Docker is not restarted while it is down");
            assert!(!h.log.iter().any(|l| l == "docker restart"), "{:?}", h.log);
            assert!(!changes.is_empty());
        }

        // the same pass again changes nothing
        assert!(r.reconcile(&desired()).await.expect("again").is_empty());

        // Docker comes up with the bip from daemon.json (as a real one would)
        {
            let mut h = fake.host();
            h.docker = Some(DockerVersion {
                version: "20.10.24".into(),
                api_version: "1.41".into(),
            });
            h.links.insert(
                "docker0".into(),
                vec!["172.17.34.1/24".parse().expect("net")],
            );
        }
        assert!(
            r.reconcile(&desired())
                .await
                .expect("with Docker")
                .is_empty()
        );
        assert!(!health.offline());
        assert_eq!(fake.host().restarts, 0);
    }

    #[tokio::test]
    async fn docker_coming_up_without_the_bip_is_restarted_once() {
        let fake = FakeKernel::new();
        fake.host().docker = None;
        let (kernel, health) = tolerant(fake.kernel(), Duration::from_secs(1));
        let mut r = Reconciler::new(NetConfig::new("a"), kernel);
        r.reconcile(&desired()).await.expect("offline pass");
        // Docker starts but docker0 still has the old address
        fake.host().docker = Some(DockerVersion {
            version: "20.10.24".into(),
            api_version: "1.41".into(),
        });
        r.reconcile(&desired())
            .await
            .expect("restart fixes docker0");
        assert!(!health.offline());
        assert_eq!(fake.host().restarts, 1);
        assert_eq!(
            fake.host().links["docker0"],
            vec!["172.17.34.1/24".parse::<Ipv4Net>().expect("net")]
        );
    }

    #[tokio::test]
    async fn with_docker_up_nothing_changes_from_the_plain_reconciler() {
        let plain = FakeKernel::new();
        let wrapped = FakeKernel::new();
        let (kernel, health) = tolerant(wrapped.kernel(), Duration::from_secs(1));
        let a = Reconciler::new(NetConfig::new("a"), plain.kernel())
            .reconcile(&desired())
            .await
            .expect("plain");
        let b = Reconciler::new(NetConfig::new("a"), kernel)
            .reconcile(&desired())
            .await
            .expect("wrapped");
        assert_eq!(a, b);
        assert_eq!(plain.host().log, wrapped.host().log);
        assert!(!health.offline());
    }

    #[test]
    fn bip_from_daemon_json() {
        assert_eq!(
            daemon_json_bip(r#"{"bip": "172.17.34.1/24", "x": 1}"#),
            Some("172.17.34.1/24".parse().expect("net"))
        );
        assert_eq!(daemon_json_bip("{}"), None);
        assert_eq!(daemon_json_bip("not json"), None);
    }
}
