//! `geomx-agent run`: the host's daemon, driven by the controller.
//!
//! One process per host (the [`HostLock`] in the state directory). Its tasks, each logging
//! with a `host` field:
//!
//! * **network** ([`geomx_net::Reconciler::run`]): brings the host to the desired network
//!   (docker0 bip, peer routes, GEOMX chains, ip_forward) on every change and every
//!   `network_interval`; tolerant of Docker being down at boot (Docker's state is an input
//!   of the network plan: while it does not answer, routes and iptables are applied and
//!   daemon.json waits for Docker's start).
//!   The first successful pass makes the agent ready (`sd_notify READY=1`).
//! * **controller session** ([`controller::session_loop`]): Register, then Watch; every
//!   desired state is persisted ([`state::StateFile`]) and published.
//! * **reports** ([`controller::report_loop`]): HostReport every heartbeat interval and
//!   promptly (≤ 50 ms debounce) when a container changes.
//! * **containers** ([`containers::containers_loop`]): Docker connection, pause image,
//!   runtime, node heartbeat endpoint, desired containers applied.
//! * **API** ([`api::serve`]): AgentNodeService (logs) for the controller.
//!
//! Static stability: nothing is torn down because the controller is away. Without a
//! controller the last desired state (from the controller, or persisted at the previous
//! run) keeps being applied. SIGTERM/SIGINT stop the tasks and leave containers, routes
//! and rules as they are; the next agent adopts them.

pub mod api;
pub mod backoff;
pub mod config;
pub mod containers;
pub mod control;
pub mod controller;
pub use geomx_agent::convert;
pub mod debounce;
pub mod docker;
pub mod inventory;
pub mod leave;
pub mod links;
pub mod metrics;
pub mod ports;
pub mod rotate;
pub mod state;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use geomx_net::{DesiredNetwork, HostLock, Kernel, NetError, PassOutcome, PassTrigger, Reconciler};
use geomx_proto::tls::TlsMaterial;
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_proto::v1::{DesiredState, RegisterResponse};
use geomx_runtime::{CancellationToken, Engine, Runtime};
use ipnet::Ipv4Net;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use self::backoff::{Backoff, ErrorLog};
use self::config::{AgentArgs, AgentConfig};
use self::docker::{DockerSource, EngineSource};
use self::state::StateFile;
use crate::Common;

/// This host's WireGuard public key (making the key pair on first start) and port; `None`
/// with a warning when WireGuard's tools are missing.
fn wireguard_identity(kernel: &Kernel, net: &geomx_net::NetConfig) -> Option<(String, u16)> {
    let file = net.wireguard_key_file();
    match kernel.wireguard.ensure_key(&file) {
        Ok(public) => {
            info!(public_key = %public, port = net.wireguard_port, key = %file.display(), "WireGuard identity");
            Some((public, net.wireguard_port))
        }
        Err(e) => {
            warn!(error = %e, "no WireGuard on this host: peers in other networks cannot be reached");
            None
        }
    }
}

/// The agent's version string, as reported to the controller.
pub fn agent_version() -> String {
    format!("geomx-agent {}", env!("CARGO_PKG_VERSION"))
}

/// What the daemon's tasks need, resolved from [`AgentConfig`] (tests build it directly).
#[derive(Clone, Debug)]
pub struct Settings {
    /// This host's name.
    pub host: String,
    /// The controller's URL.
    pub controller: String,
    /// The agent's TLS material (`None`: insecure).
    pub tls: Option<TlsMaterial>,
    /// The configured underlay address (`None`: found from the route to the controller).
    pub underlay_ip: Option<Ipv4Addr>,
    /// The subnet the host insists on.
    pub pinned_subnet: Option<Ipv4Net>,
    /// Where the API listens (`None`: `<underlay>:7947`).
    pub api_listen: Option<SocketAddr>,
    /// Port of the node heartbeat endpoint on the docker0 gateway (`None`: not served,
    /// no `GEOMX_AGENT_URL`).
    pub heartbeat_port: Option<u16>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// How often the network is re-checked and the containers re-applied.
    pub network_interval: Duration,
    /// How long the output of removed role containers is kept.
    pub logs_retention: Duration,
    /// First retry delay (controller, Docker).
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Reported version.
    pub agent_version: String,
    /// This host's WireGuard public key and port, registered with the controller (`None`:
    /// WireGuard is not available here; peers that need it cannot be reached).
    pub wireguard: Option<(String, u16)>,
    /// How missing images are pulled (credentials file, concurrency).
    pub pulls: geomx_runtime::PullConfig,
    /// Where `/metrics` is served in plain HTTP (`None`: not served; port 0: any free
    /// port, see [`Ctx::metrics_addr`]).
    pub metrics_listen: Option<SocketAddr>,
}

impl Settings {
    /// The settings of `config`, with its TLS material loaded.
    pub fn from_config(c: &AgentConfig, tls: Option<TlsMaterial>) -> Settings {
        Settings {
            host: c.name.clone(),
            controller: c.controller.clone(),
            tls,
            underlay_ip: c.underlay_ip,
            pinned_subnet: c.pinned_subnet,
            api_listen: c.api_listen,
            heartbeat_port: Some(c.heartbeat_port),
            state_dir: c.state_dir.clone(),
            network_interval: c.network_interval,
            logs_retention: c.logs_retention,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            agent_version: agent_version(),
            wireguard: None,
            pulls: geomx_runtime::PullConfig {
                auth_file: c.registry_auth_file.clone(),
                max_parallel: c.max_parallel_pulls as usize,
                ..Default::default()
            },
            metrics_listen: c.metrics_listen,
        }
    }

    /// A backoff with these settings.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_initial, self.backoff_max)
    }

    /// Where the API listens, given the underlay address.
    pub fn api_addr(&self, underlay: Ipv4Addr) -> SocketAddr {
        self.api_listen
            .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(underlay), config::DEFAULT_API_PORT))
    }

    /// The URL the controller reaches the API at (registered as `agent_url`).
    pub fn agent_url(&self, underlay: Ipv4Addr) -> String {
        let addr = self.api_addr(underlay);
        let ip = if addr.ip().is_unspecified() {
            IpAddr::V4(underlay)
        } else {
            addr.ip()
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
    }
}

/// How often every peer is probed through the data plane.
const LINK_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// The network part of the last report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStatus {
    /// The last pass left everything as desired (with Docker answering).
    pub converged: bool,
    /// Peer routes in place after the last successful pass.
    pub routes: u32,
    /// The last pass's error, or why it is not converged.
    pub error: String,
}

/// What the tasks share.
pub struct Ctx<E: Engine> {
    /// Settings.
    pub settings: Settings,
    /// The last desired state (from the controller, or persisted).
    pub desired: watch::Sender<Option<Arc<DesiredState>>>,
    /// The last registration.
    pub registered: watch::Sender<Option<RegisterResponse>>,
    /// The network's status.
    pub net: watch::Sender<NetStatus>,
    /// True once a network pass succeeded (the agent is ready; containers may start).
    pub net_ready: watch::Sender<bool>,
    /// The runtime, once Docker answered.
    pub runtime: watch::Sender<Option<Runtime<E>>>,
    /// The underlay address, once known.
    pub underlay: watch::Sender<Option<Ipv4Addr>>,
    /// The heartbeat interval (from the controller).
    pub heartbeat_interval: watch::Sender<Duration>,
    /// Revision of the last desired state whose containers were applied.
    pub applied_revision: AtomicU64,
    /// Images on the host (tags, digests, ids, sizes), refreshed by [`inventory`]; `None`
    /// until Docker listed them once (reports then say `images_known: false`).
    pub images: Mutex<Option<Vec<geomx_runtime::ImageDetails>>>,
    /// The host's memory and CPUs as Docker sees them, refreshed with the images; unknown
    /// (zeros) until Docker answered once.
    pub capacity: Mutex<geomx_runtime::HostCapacity>,
    /// Counts the changes of `images` and `capacity` (the reporter reports them soon).
    pub inventory: watch::Sender<u64>,
    /// Asks the session to register again (a report was refused as unknown).
    pub reregister: Notify,
    /// Tells the session that reports get through again (skip the rest of its backoff).
    pub controller_back: Notify,
    /// Asks the network task for a pass now.
    pub net_trigger: PassTrigger,
    /// The persisted desired state.
    pub state_file: StateFile,
    /// Every peer as measured through the data plane (see [`links`]), for the reports.
    pub links: Mutex<Vec<geomx_proto::v1::PeerLink>>,
    /// This host's WireGuard public key and port as registered (starts as
    /// `settings.wireguard`; [`control`]'s key rotation replaces it).
    pub wireguard: Mutex<Option<(String, u16)>>,
    /// Network passes finished (successful or not), counted.
    pub net_passes: watch::Sender<u64>,
    /// The agent's Prometheus registry.
    pub metrics: Arc<metrics::AgentMetrics>,
    /// Where `/metrics` listens, once bound (see [`Settings::metrics_listen`]).
    pub metrics_addr: watch::Sender<Option<SocketAddr>>,
}

/// A started daemon: its tasks and what they share.
pub struct Running<E: Engine> {
    /// What the tasks share (tests look into it).
    pub ctx: Arc<Ctx<E>>,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl<E: Engine> Running<E> {
    /// Waits until the first network pass succeeded (false if the agent stopped first).
    pub async fn ready(&mut self) -> bool {
        self.ready.wait_for(|r| *r).await.is_ok()
    }

    /// A token that stops every task when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every task (containers and network stay as they are), waiting up to
    /// `within` for them.
    pub async fn stop(mut self, within: Duration) {
        self.shutdown.cancel();
        let joined = tokio::time::timeout(within, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            warn!("some tasks did not stop within {within:?}; leaving them");
            self.tasks.abort_all();
        }
        if let Some(rt) = self.ctx.runtime.send_replace(None) {
            rt.shutdown();
        }
    }
}

/// Starts the daemon's tasks: the network through `reconciler`, containers through
/// `source`, the controller through `client`.
/// `persisted` is the desired state of the previous run, applied until the controller
/// answers.
pub fn start<S: EngineSource>(
    settings: Settings,
    reconciler: Reconciler,
    source: S,
    client: AgentServiceClient<tonic::transport::Channel>,
    persisted: Option<DesiredState>,
) -> Running<S::Engine> {
    // a root span: the caller's own span must not nest (`agent{..}:agent{..}`)
    let span = info_span!(parent: None, "agent", host = %settings.host);
    let shutdown = CancellationToken::new();
    let state_file = StateFile::new(&settings.state_dir);
    let ctx = Arc::new(Ctx {
        desired: watch::Sender::new(persisted.map(Arc::new)),
        registered: watch::Sender::new(None),
        net: watch::Sender::new(NetStatus::default()),
        net_ready: watch::Sender::new(false),
        runtime: watch::Sender::new(None),
        underlay: watch::Sender::new(None),
        heartbeat_interval: watch::Sender::new(Duration::from_secs(1)),
        applied_revision: AtomicU64::new(0),
        images: Mutex::new(None),
        capacity: Mutex::new(geomx_runtime::HostCapacity::default()),
        inventory: watch::Sender::new(0),
        reregister: Notify::new(),
        controller_back: Notify::new(),
        net_trigger: reconciler.trigger(),
        state_file,
        wireguard: Mutex::new(settings.wireguard.clone()),
        settings,
        links: Mutex::new(Vec::new()),
        net_passes: watch::Sender::new(0),
        metrics: Arc::new(metrics::AgentMetrics::new()),
        metrics_addr: watch::Sender::new(None),
    });
    let ready = ctx.net_ready.subscribe();
    let mut tasks = JoinSet::new();
    if let Some(addr) = ctx.settings.metrics_listen {
        tasks.spawn(
            metrics::serve(
                ctx.metrics.clone(),
                addr,
                ctx.metrics_addr.clone(),
                shutdown.clone(),
            )
            .instrument(span.clone()),
        );
    }
    tasks.spawn(
        links::run(
            ctx.clone(),
            reconciler.kernel().clone(),
            LINK_PROBE_INTERVAL,
            shutdown.clone(),
        )
        .instrument(span.clone()),
    );

    // network: desired state → DesiredNetwork → reconciler
    let (net_tx, net_rx) = watch::channel(None::<DesiredNetwork>);
    tasks.spawn(dispatch_network(ctx.clone(), net_tx, shutdown.clone()).instrument(span.clone()));
    {
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        let mut reconciler = reconciler;
        tasks.spawn(
            async move {
                let mut first = true;
                let on_pass = |d: &DesiredNetwork, r: &Result<PassOutcome, NetError>| {
                    let offline = r.as_ref().is_ok_and(|o| o.docker_offline);
                    // a pass that restarted Docker is planned again at once: not yet in place
                    let requeued = r
                        .as_ref()
                        .is_ok_and(|o| o.action == geomx_net::Action::Requeue);
                    ctx.net.send_if_modified(|s| {
                        let new = match r {
                            Ok(_) => NetStatus {
                                converged: !offline && !requeued,
                                routes: u32::try_from(d.peers.len()).unwrap_or(u32::MAX),
                                error: if offline {
                                    "Docker is not answering: routes and iptables are in place, docker0's bip waits for Docker to start".into()
                                } else {
                                    String::new()
                                },
                            },
                            Err(e) => NetStatus {
                                converged: false,
                                routes: s.routes,
                                error: e.to_string(),
                            },
                        };
                        let changed = *s != new;
                        *s = new;
                        changed
                    });
                    ctx.metrics.observe_pass(r);
                    ctx.net_passes.send_modify(|n| *n += 1);
                    if r.is_ok() && !requeued && first {
                        first = false;
                        info!(
                            subnet = %d.subnet,
                            peers = d.peers.len(),
                            docker = if offline { "not running" } else { "up" },
                            "host network in place"
                        );
                        ctx.net_ready.send_replace(true);
                    }
                };
                reconciler.run(net_rx, stop.cancelled_owned(), on_pass).await;
            }
            .instrument(span.clone()),
        );
    }

    tasks.spawn(controller::underlay_loop(ctx.clone(), shutdown.clone()).instrument(span.clone()));
    tasks.spawn(
        controller::session_loop(ctx.clone(), client.clone(), shutdown.clone())
            .instrument(span.clone()),
    );
    tasks.spawn(inventory::run(ctx.clone(), shutdown.clone()).instrument(span.clone()));
    tasks.spawn(
        controller::report_loop(ctx.clone(), client, shutdown.clone()).instrument(span.clone()),
    );
    tasks.spawn(
        containers::containers_loop(ctx.clone(), source, shutdown.clone()).instrument(span.clone()),
    );
    {
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        tasks.spawn(
            async move {
                let mut underlay = ctx.underlay.subscribe();
                let ip = tokio::select! {
                    () = stop.cancelled() => return,
                    r = underlay.wait_for(Option::is_some) => match r {
                        Ok(ip) => *ip,
                        Err(_) => return,
                    },
                };
                let Some(ip) = ip else { return };
                let addr = ctx.settings.api_addr(ip);
                let tls = ctx.settings.tls.clone();
                api::serve(ctx, addr, tls, stop).await;
            }
            .instrument(span.clone()),
        );
    }
    Running {
        ctx,
        ready,
        shutdown,
        tasks,
    }
}

/// Feeds the network part of every desired state to the reconciler (only when it changed).
async fn dispatch_network<E: Engine>(
    ctx: Arc<Ctx<E>>,
    net: watch::Sender<Option<DesiredNetwork>>,
    shutdown: CancellationToken,
) {
    let mut desired = ctx.desired.subscribe();
    let mut errors = ErrorLog::default();
    loop {
        let state = desired.borrow_and_update().clone();
        if let Some(state) = state {
            match convert::desired_network(&state) {
                Ok(n) => {
                    errors.succeeded();
                    net.send_if_modified(|cur| {
                        if cur.as_ref() == Some(&n) {
                            false
                        } else {
                            *cur = Some(n);
                            true
                        }
                    });
                }
                Err(e) => {
                    if errors.failed(&e.to_string()) {
                        error!(error = %e, "cannot use the network part of the desired state; keeping the previous one");
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = desired.changed() => if r.is_err() { return },
        }
    }
}

/// `geomx-agent run`: exit code 0 after a clean stop, 1 on a failure, 2 on a
/// configuration error.
pub async fn run(common: &Common, args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let (config, warnings) = match AgentConfig::load(common, args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("geomx-agent: configuration error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let span = info_span!("agent", host = %config.name);
    async move {
        for w in warnings {
            warn!("{w}");
        }
        let tls = match load_tls(&config) {
            Ok(tls) => tls,
            Err(TlsProblem::Unreadable(e)) => return Err(e),
            Err(TlsProblem::WrongIdentity(msg)) => {
                eprintln!("geomx-agent: configuration error: {msg}");
                return Ok(ExitCode::from(2));
            }
        };
        if config.insecure {
            warn!(
                "INSECURE MODE: plaintext to the controller and on the agent API, nobody is authenticated; never use this outside a throwaway lab"
            );
        }
        let lock = HostLock::acquire(&config.state_dir).context("taking the host lock")?;
        info!(
            config = %config.file.as_ref().map_or("(none)".into(), |p| p.display().to_string()),
            controller = %config.controller,
            state_dir = %config.state_dir.display(),
            docker = %config.docker_host,
            daemon_json = %config.daemon_json.display(),
            version = %agent_version(),
            "geomx-agent starting"
        );
        let net_config = config.net_config();
        let kernel = Kernel::system(&net_config).context("opening the host's network")?;
        let wireguard = wireguard_identity(&kernel, &net_config);
        let control = control::Control {
            wireguard: kernel.wireguard.clone(),
            key_file: net_config.wireguard_key_file(),
            own_backend: config.backend,
        };
        let reconciler = Reconciler::new(net_config, kernel);
        let mut settings = Settings::from_config(&config, tls);
        settings.wireguard = wireguard;
        let persisted = load_persisted(&settings);
        let client = AgentServiceClient::new(
            controller::channel(&settings).map_err(anyhow::Error::msg)?,
        )
        // what the controller may send (its encoding limit), not tonic's 4 MiB default
        .max_decoding_message_size(geomx_proto::MAX_DESIRED_STATE_LEN);
        let mut running = start(
            settings,
            reconciler,
            DockerSource::new(&config.docker_host),
            client,
            persisted,
        );

        let stop = running.shutdown_token();
        let socket = control::socket_path(&config.state_dir);
        match control::bind(&socket) {
            Ok(listener) => {
                let served = control::serve(
                    running.ctx.clone(),
                    control,
                    listener,
                    socket,
                    stop.clone(),
                );
                tokio::spawn(served.instrument(info_span!("control")));
            }
            Err(e) => {
                warn!(error = %e, socket = %socket.display(), "cannot open the control socket: geomx-agent rotate-key will not reach this agent");
            }
        }
        let signal = wait_for_signal(&stop);
        tokio::pin!(signal);
        let mut notified = false;
        loop {
            tokio::select! {
                r = &mut signal => {
                    r?;
                    break;
                }
                ready = running.ready(), if !notified => {
                    notified = true;
                    if ready {
                        match sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
                            Ok(()) => info!("ready (READY=1 sent to systemd when run by it)"),
                            Err(e) => warn!(error = %e, "sd_notify READY failed"),
                        }
                    }
                }
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        info!("stopping: containers, routes and rules stay as they are");
        running.stop(Duration::from_secs(5)).await;
        drop(lock);
        info!("stopped");
        Ok(ExitCode::SUCCESS)
    }
    .instrument(span)
    .await
}

/// Why the TLS files cannot be used.
enum TlsProblem {
    /// They cannot be read or parsed (may be transient: exit 1, systemd retries).
    Unreadable(anyhow::Error),
    /// The certificate is not this host's agent certificate (a configuration error: exit 2).
    WrongIdentity(String),
}

fn load_tls(config: &AgentConfig) -> Result<Option<TlsMaterial>, TlsProblem> {
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    let tls = files
        .load()
        .context("loading the agent's TLS files")
        .map_err(TlsProblem::Unreadable)?;
    let id = tls.own_identity();
    if !id.is_agent() || id.common_name != config.name {
        return Err(TlsProblem::WrongIdentity(format!(
            "{} is the certificate of {id}, but this agent is host {:?}: the controller accepts only OU=agent, CN=<host name> (geomxctl certs agent --name {})",
            files.cert.display(),
            config.name,
            config.name
        )));
    }
    Ok(Some(tls))
}

fn load_persisted(settings: &Settings) -> Option<DesiredState> {
    let file = StateFile::new(&settings.state_dir);
    match file.load() {
        Ok(Some(s)) if s.host == settings.host => {
            info!(
                revision = s.revision,
                subnet = %s.subnet,
                peers = s.peers.len(),
                containers = s.containers.len(),
                file = %file.path().display(),
                "applying the persisted desired state until the controller answers"
            );
            Some(s)
        }
        Ok(Some(s)) => {
            warn!(file = %file.path().display(), for_host = %s.host, "the persisted desired state is for another host name; ignoring it");
            None
        }
        Ok(None) => {
            info!("no persisted desired state: waiting for the controller");
            None
        }
        Err(e) => {
            warn!(error = %e, "waiting for the controller");
            None
        }
    }
}

/// Completes on SIGTERM, SIGINT or a cancelled `stop`; logs and ignores SIGHUP.
async fn wait_for_signal(stop: &CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); return Ok(()) }
            _ = int.recv() => { info!("SIGINT received"); return Ok(()) }
            _ = hup.recv() => info!("SIGHUP ignored: restart the agent to read agent.toml again (nothing is disrupted)"),
            () = stop.cancelled() => return Ok(()),
        }
    }
}
