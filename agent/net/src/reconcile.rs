//! The reconciler: desired network state in, kernel and Docker brought to match, the list of
//! what changed out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ROUTE_PROTOCOL;
use crate::backend::{self, PeerBackend, Unreachable, WG_INTERFACE, WG_KEEPALIVE, WG_MTU, WG_PORT};
use crate::config::NetConfig;
use crate::daemon_json::{self, Doc, KeyChange, Remembered};
use crate::desired::{DesiredNetwork, Peer};
use crate::error::{NetError, Result};
use crate::kernel::{
    DockerVersion, Firewall, Kernel, KernelRoute, PeerRoute, RouteKind, RuleSpec, WgImplementation,
    WgPeerConfig,
};
use crate::rules::{self, ChainPlan, FILTER_CHAIN, NAT_CHAIN};

/// The sysctl geomx keeps at 1.
pub const IP_FORWARD: &str = "net.ipv4.ip_forward";
const DOCKER0: &str = "docker0";
/// How long docker0 gets to show the new bip once Docker answers again (at most the
/// configured Docker ready timeout).
const DOCKER0_PATIENCE: Duration = Duration::from_secs(10);

/// One thing a pass (or cleanup) changed on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// daemon.json's managed keys were recorded before geomx first changed them.
    Remembered {
        /// The state file.
        path: PathBuf,
    },
    /// daemon.json was rewritten.
    DaemonJsonUpdated {
        /// The file.
        path: PathBuf,
        /// The keys that changed.
        keys: Vec<KeyChange>,
    },
    /// daemon.json got its pre-geomx values back (or was removed: there was none).
    DaemonJsonRestored {
        /// The file.
        path: PathBuf,
        /// The keys that changed.
        keys: Vec<KeyChange>,
        /// The file was removed.
        removed: bool,
    },
    /// Docker was restarted through the restart command.
    DockerRestarted {
        /// Why.
        reason: String,
    },
    /// `net.ipv4.ip_forward` was set to 1.
    IpForwardEnabled {
        /// The value before.
        was: String,
    },
    /// A route to a peer subnet was added.
    RouteAdded {
        /// The peer subnet.
        destination: Ipv4Net,
        /// Its next hop (`via 10.1.1.29`, `dev geomx-wg`).
        via: String,
    },
    /// A geomx route got a new next hop.
    RouteReplaced {
        /// The peer subnet.
        destination: Ipv4Net,
        /// The new next hop.
        via: String,
        /// The old next hop.
        was: String,
    },
    /// The WireGuard interface was created.
    WireguardCreated {
        /// Its name.
        interface: String,
        /// Kernel module or wireguard-go.
        implementation: WgImplementation,
    },
    /// The WireGuard interface got its key and port.
    WireguardConfigured {
        /// Its name.
        interface: String,
        /// Its listen port.
        port: u16,
    },
    /// A WireGuard peer was added or changed.
    WireguardPeerSet {
        /// The peer host.
        peer: String,
        /// Its endpoint.
        endpoint: String,
    },
    /// A WireGuard peer no longer wanted was removed.
    WireguardPeerRemoved {
        /// Its public key.
        public_key: String,
    },
    /// The WireGuard interface was deleted (no peer needs it, or cleanup).
    WireguardDeleted {
        /// Its name.
        interface: String,
    },
    /// A geomx route no longer wanted was deleted.
    RouteDeleted {
        /// Its destination.
        destination: Ipv4Net,
        /// Its next hop.
        via: String,
    },
    /// A geomx chain was created with its rules.
    ChainCreated {
        /// `nat` or `filter`.
        table: String,
        /// The chain.
        chain: String,
        /// Its rules.
        rules: Vec<String>,
    },
    /// A geomx chain was flushed and filled again in order.
    ChainRebuilt {
        /// `nat` or `filter`.
        table: String,
        /// The chain.
        chain: String,
        /// Wanted rules that were missing.
        missing: Vec<String>,
        /// Rules that were there and are not wanted.
        unexpected: Vec<String>,
    },
    /// The jump to a geomx chain was (re)inserted at position 1 of its built-in chain.
    JumpRestored {
        /// `nat` or `filter`.
        table: String,
        /// The built-in chain.
        hook: String,
        /// geomx's chain.
        chain: String,
        /// 1-based positions of the jumps found before (empty: none).
        found_at: Vec<usize>,
    },
    /// A jump to a geomx chain was deleted (cleanup).
    JumpDeleted {
        /// `nat` or `filter`.
        table: String,
        /// The built-in chain.
        hook: String,
        /// geomx's chain.
        chain: String,
    },
    /// A geomx chain was flushed and deleted (cleanup).
    ChainDeleted {
        /// `nat` or `filter`.
        table: String,
        /// The chain.
        chain: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = |k: &[KeyChange]| {
            k.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Change::Remembered { path } => {
                write!(
                    f,
                    "remembered daemon.json's pre-geomx values in {}",
                    path.display()
                )
            }
            Change::DaemonJsonUpdated { path, keys: k } => {
                write!(f, "updated {}: {}", path.display(), keys(k))
            }
            Change::DaemonJsonRestored {
                path,
                keys: k,
                removed,
            } => {
                if *removed {
                    write!(
                        f,
                        "removed {} (there was none before geomx)",
                        path.display()
                    )
                } else if k.is_empty() {
                    write!(f, "restored {}", path.display())
                } else {
                    write!(f, "restored {}: {}", path.display(), keys(k))
                }
            }
            Change::DockerRestarted { reason } => write!(f, "restarted Docker ({reason})"),
            Change::IpForwardEnabled { was } => {
                write!(f, "set {IP_FORWARD}=1 (was {was})")
            }
            Change::RouteAdded { destination, via } => {
                write!(f, "added route {destination} {via} proto {ROUTE_PROTOCOL}")
            }
            Change::RouteReplaced {
                destination,
                via,
                was,
            } => write!(f, "replaced route {destination} {was} with {via}"),
            Change::WireguardCreated {
                interface,
                implementation,
            } => write!(
                f,
                "created WireGuard interface {interface} ({implementation:?})"
            ),
            Change::WireguardConfigured { interface, port } => {
                write!(f, "configured {interface}: private key, listen port {port}")
            }
            Change::WireguardPeerSet { peer, endpoint } => {
                write!(f, "set WireGuard peer {peer} at {endpoint}")
            }
            Change::WireguardPeerRemoved { public_key } => {
                write!(f, "removed WireGuard peer {public_key}")
            }
            Change::WireguardDeleted { interface } => {
                write!(f, "deleted WireGuard interface {interface}")
            }
            Change::RouteDeleted { destination, via } => {
                write!(f, "deleted route {destination} {via}")
            }
            Change::ChainCreated {
                table,
                chain,
                rules,
            } => write!(
                f,
                "created chain {table} {chain} with [{}]",
                rules.join("; ")
            ),
            Change::ChainRebuilt {
                table,
                chain,
                missing,
                unexpected,
            } => {
                write!(f, "rebuilt chain {table} {chain}")?;
                if missing.is_empty() && unexpected.is_empty() {
                    write!(f, " (rules out of order)")
                } else {
                    write!(
                        f,
                        " (missing: [{}]; unexpected: [{}])",
                        missing.join("; "),
                        unexpected.join("; ")
                    )
                }
            }
            Change::JumpRestored {
                table,
                hook,
                chain,
                found_at,
            } => {
                write!(f, "put the jump {table} {hook} -> {chain} at position 1")?;
                if found_at.is_empty() {
                    write!(f, " (it was missing)")
                } else {
                    let at: Vec<String> = found_at.iter().map(|p| p.to_string()).collect();
                    write!(f, " (found at position {})", at.join(", "))
                }
            }
            Change::JumpDeleted { table, hook, chain } => {
                write!(f, "deleted the jump {table} {hook} -> {chain}")
            }
            Change::ChainDeleted { table, chain } => write!(f, "deleted chain {table} {chain}"),
        }
    }
}

/// A kernel route's next hop as `ip route` says it.
fn describe_via(r: &KernelRoute) -> String {
    match (&r.gateway, &r.device) {
        (Some(gw), _) => format!("via {gw}"),
        (None, Some(dev)) => format!("dev {dev}"),
        (None, None) => "-".into(),
    }
}

fn record(changes: &mut Vec<Change>, change: Change) {
    info!("{change}");
    changes.push(change);
}

/// Asks a running [`Reconciler::run`] for a pass now.
#[derive(Clone, Debug)]
pub struct PassTrigger(Arc<Notify>);

impl PassTrigger {
    /// Requests a pass as soon as the loop is idle (requests made meanwhile coalesce).
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// What the reconciler read before changing anything.
struct Preflight {
    docker: DockerVersion,
    daemon_text: Option<String>,
    doc: Doc,
    state: Option<Remembered>,
    /// Every peer with the backend it is reached through.
    backends: Vec<(Peer, PeerBackend)>,
}

/// Brings the host network to a desired state and keeps it there.
pub struct Reconciler {
    config: NetConfig,
    kernel: Kernel,
    random_fully: Option<bool>,
    restarted_for: Option<Ipv4Net>,
    trigger: Arc<Notify>,
    last_applied: Option<DesiredNetwork>,
}

impl fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.config)
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler for the host described by `config`, acting through `kernel`.
    pub fn new(config: NetConfig, kernel: Kernel) -> Reconciler {
        Reconciler {
            config,
            kernel,
            random_fully: None,
            restarted_for: None,
            trigger: Arc::new(Notify::new()),
            last_applied: None,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// What it acts through.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The desired state of the last pass that succeeded.
    pub fn last_applied(&self) -> Option<&DesiredNetwork> {
        self.last_applied.as_ref()
    }

    /// A handle that makes [`Reconciler::run`] do a pass now.
    pub fn trigger(&self) -> PassTrigger {
        PassTrigger(self.trigger.clone())
    }

    /// One pass: validates `desired` and reads everything it needs first (nothing is
    /// changed when that fails), then brings daemon.json/docker0, ip_forward, routes and
    /// iptables to the desired state. Returns what it changed (empty when the host already
    /// matched); every change is also logged.
    pub async fn reconcile(&mut self, desired: &DesiredNetwork) -> Result<Vec<Change>> {
        let span = info_span!("net_pass", host = %self.config.host);
        async move {
            desired.validate(&self.config.host)?;
            let pre = self.preflight(desired).await?;
            let mut changes = Vec::new();
            self.apply_docker(desired, &pre, &mut changes).await?;
            self.apply_ip_forward(&mut changes)?;
            self.apply_wireguard(&pre.backends, &mut changes).await?;
            self.apply_routes(desired, &pre.backends, &mut changes)
                .await?;
            self.apply_firewall(desired, &mut changes).await?;
            if changes.is_empty() {
                debug!("no change");
            }
            self.last_applied = Some(desired.clone());
            Ok(changes)
        }
        .instrument(span)
        .await
    }

    async fn preflight(&self, desired: &DesiredNetwork) -> Result<Preflight> {
        let k = &self.kernel;
        let daemon_text = k.daemon_config.read()?;
        let doc = daemon_json::parse(k.daemon_config.path(), daemon_text.as_deref())?;
        let state = read_state(&self.kernel)?;
        let docker = k.docker.version().await?;

        let table = k.routes.main_table().await?;
        let mut backends = Vec::new();
        for p in &desired.peers {
            if let Some(r) = table
                .iter()
                .find(|r| r.protocol != ROUTE_PROTOCOL && r.destination == p.subnet)
            {
                return Err(NetError::RouteConflict {
                    destination: p.subnet,
                    existing: r.to_string(),
                });
            }
            let on_link = match k.routes.lookup(p.underlay_ip).await? {
                None => Err("no route to it".to_string()),
                // whatever the backend: a peer cannot live at this host's address
                Some(r) if r.kind == RouteKind::Local => {
                    return Err(NetError::PeerNotOnLink {
                        peer: p.name.clone(),
                        ip: p.underlay_ip,
                        detail: "it is an address of this host".into(),
                    });
                }
                Some(r) if r.kind != RouteKind::Unicast => {
                    Err(format!("the kernel routes it as {r}"))
                }
                Some(KernelRoute {
                    gateway: Some(gw), ..
                }) => Err(format!("it is reached via {gw}")),
                Some(_) => Ok(()),
            };
            match backend::resolve(
                desired.backend,
                self.config.backend,
                on_link,
                p.wireguard_key.is_some(),
            ) {
                Ok(b) => backends.push((p.clone(), b)),
                Err(Unreachable::NotOnLink(detail)) => {
                    return Err(NetError::PeerNotOnLink {
                        peer: p.name.clone(),
                        ip: p.underlay_ip,
                        detail,
                    });
                }
                Err(Unreachable::NoWireguardKey(off_link)) => {
                    let why = match off_link {
                        Some(detail) => format!(
                            "underlay address {} is not on a directly connected network ({detail}), so host-gw cannot reach it, and",
                            p.underlay_ip
                        ),
                        None => "backend wireguard is asked for, but".to_owned(),
                    };
                    return Err(NetError::PeerUnreachable {
                        peer: p.name.clone(),
                        reason: format!(
                            "{why} the peer has no WireGuard key for a tunnel (an agent older than this one, or a host file without the peer's wireguard_key): upgrade its agent, or give both hosts a network they share"
                        ),
                    });
                }
            }
        }
        let fw = k.firewall.clone();
        blocking(move || {
            fw.list_rules("nat", "POSTROUTING")?;
            fw.list_rules("filter", "FORWARD")
        })
        .await?;
        Ok(Preflight {
            docker,
            daemon_text,
            doc,
            state,
            backends,
        })
    }

    async fn apply_docker(
        &mut self,
        desired: &DesiredNetwork,
        pre: &Preflight,
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let k = self.kernel.clone();
        let bip = desired.bip();
        let settings = daemon_json::settings(desired, &pre.docker);
        let (doc, keys) = daemon_json::apply(&pre.doc, &settings);
        let mut restarted = false;
        if !keys.is_empty() {
            if pre.state.is_none() {
                let docker0 = k
                    .routes
                    .link_addresses(DOCKER0.into())
                    .await?
                    .unwrap_or_default();
                let remembered = Remembered::capture(pre.daemon_text.as_deref(), &pre.doc, docker0);
                k.state.write(&remembered.to_json())?;
                record(
                    changes,
                    Change::Remembered {
                        path: k.state.path().to_path_buf(),
                    },
                );
            }
            k.daemon_config.write(&daemon_json::render(&doc))?;
            record(
                changes,
                Change::DaemonJsonUpdated {
                    path: k.daemon_config.path().to_path_buf(),
                    keys,
                },
            );
            self.restart_docker().await?;
            record(
                changes,
                Change::DockerRestarted {
                    reason: "daemon.json changed".into(),
                },
            );
            restarted = true;
        }
        let patience = DOCKER0_PATIENCE.min(self.config.docker_ready_timeout);
        let first_look = if restarted { patience } else { Duration::ZERO };
        let found = match self.docker0_carries(bip, first_look).await? {
            Ok(()) => return Ok(()),
            Err(found) => found,
        };
        if restarted || self.restarted_for == Some(bip) {
            return Err(NetError::Docker0Mismatch {
                expected: bip,
                found,
                path: k.daemon_config.path().to_path_buf(),
            });
        }
        // daemon.json is right but Docker has not applied it (a restart that failed
        // earlier, an edit by hand): restart once for this bip, not on every pass
        self.restarted_for = Some(bip);
        self.restart_docker().await?;
        record(
            changes,
            Change::DockerRestarted {
                reason: format!("docker0 carried {found}, not bip {bip}"),
            },
        );
        match self.docker0_carries(bip, patience).await? {
            Ok(()) => Ok(()),
            Err(found) => Err(NetError::Docker0Mismatch {
                expected: bip,
                found,
                path: k.daemon_config.path().to_path_buf(),
            }),
        }
    }

    /// Ok(Ok) when docker0 carries `bip` (waiting up to `patience`), Ok(Err(what it
    /// carries)) when not.
    async fn docker0_carries(
        &self,
        bip: Ipv4Net,
        patience: Duration,
    ) -> Result<std::result::Result<(), String>> {
        let deadline = Instant::now() + patience;
        loop {
            let addrs = self.kernel.routes.link_addresses(DOCKER0.into()).await?;
            let found = match &addrs {
                Some(a) if a.contains(&bip) => return Ok(Ok(())),
                Some(a) if a.is_empty() => "no IPv4 address".to_string(),
                Some(a) => a
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                None => "nothing (there is no docker0)".to_string(),
            };
            if Instant::now() >= deadline {
                return Ok(Err(found));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the restart command and waits until the API answers again.
    async fn restart_docker(&self) -> Result<DockerVersion> {
        let docker = &self.kernel.docker;
        docker.restart().await?;
        let timeout = self.config.docker_ready_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            match docker.version().await {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => {
                    return Err(NetError::DockerNotReady {
                        host: docker.host().to_string(),
                        command: docker.restart_command().to_string(),
                        seconds: timeout.as_secs_f64(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    fn apply_ip_forward(&self, changes: &mut Vec<Change>) -> Result<()> {
        let s = &self.kernel.sysctl;
        let was = s.read(IP_FORWARD)?;
        if was != "1" {
            s.write(IP_FORWARD, "1")?;
            record(changes, Change::IpForwardEnabled { was });
        }
        Ok(())
    }

    /// The WireGuard interface and its peers: made when a peer needs it, removed when none
    /// does; peers set or removed to match, nothing touched when they match already.
    async fn apply_wireguard(
        &self,
        backends: &[(Peer, PeerBackend)],
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let wg = self.kernel.wireguard.clone();
        let key_file = self.config.wireguard_key_file();
        let port = self.config.wireguard_port;
        let wanted: Vec<(String, WgPeerConfig)> = backends
            .iter()
            .filter(|(_, b)| *b == PeerBackend::Wireguard)
            .filter_map(|(p, _)| {
                Some((
                    p.name.clone(),
                    WgPeerConfig {
                        public_key: p.wireguard_key.clone()?,
                        endpoint: Some(SocketAddrV4::new(
                            p.underlay_ip,
                            p.wireguard_port.unwrap_or(WG_PORT),
                        )),
                        allowed_ips: vec![p.subnet],
                    },
                ))
            })
            .collect();
        let found = blocking(move || {
            let mut out = Vec::new();
            let existing = wg.show(WG_INTERFACE)?;
            if wanted.is_empty() {
                if existing.is_some() {
                    wg.delete(WG_INTERFACE)?;
                    out.push(Change::WireguardDeleted {
                        interface: WG_INTERFACE.into(),
                    });
                }
                return Ok(out);
            }
            let public = wg.ensure_key(&key_file)?;
            let device = match existing {
                Some(d) => d,
                None => {
                    let implementation = wg.create(WG_INTERFACE, WG_MTU)?;
                    out.push(Change::WireguardCreated {
                        interface: WG_INTERFACE.into(),
                        implementation,
                    });
                    wg.show(WG_INTERFACE)?.ok_or_else(|| NetError::Wireguard {
                        op: format!("create {WG_INTERFACE}"),
                        message: "the interface does not answer after creation".into(),
                    })?
                }
            };
            if device.public_key != public || device.listen_port != port {
                wg.configure(WG_INTERFACE, &key_file, port)?;
                out.push(Change::WireguardConfigured {
                    interface: WG_INTERFACE.into(),
                    port,
                });
            }
            for (name, want) in &wanted {
                let same = device.peers.iter().any(|have| {
                    have.public_key == want.public_key
                        && have.endpoint == want.endpoint
                        && have.allowed_ips == want.allowed_ips
                });
                if !same {
                    wg.set_peer(WG_INTERFACE, want, WG_KEEPALIVE)?;
                    out.push(Change::WireguardPeerSet {
                        peer: name.clone(),
                        endpoint: want
                            .endpoint
                            .map_or_else(|| "-".to_string(), |e| e.to_string()),
                    });
                }
            }
            for have in &device.peers {
                if !wanted.iter().any(|(_, w)| w.public_key == have.public_key) {
                    wg.remove_peer(WG_INTERFACE, &have.public_key)?;
                    out.push(Change::WireguardPeerRemoved {
                        public_key: have.public_key.clone(),
                    });
                }
            }
            Ok(out)
        })
        .await?;
        for c in found {
            record(changes, c);
        }
        Ok(())
    }

    async fn apply_routes(
        &self,
        desired: &DesiredNetwork,
        backends: &[(Peer, PeerBackend)],
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let routes = &self.kernel.routes;
        let own = desired.bip().addr();
        let want: BTreeMap<Ipv4Net, PeerRoute> = backends
            .iter()
            .map(|(p, b)| {
                let r = match b {
                    PeerBackend::HostGw => PeerRoute {
                        destination: p.subnet,
                        gateway: Some(p.underlay_ip),
                        device: None,
                        source: None,
                    },
                    PeerBackend::Wireguard => PeerRoute {
                        destination: p.subnet,
                        gateway: None,
                        device: Some(WG_INTERFACE.into()),
                        source: Some(own),
                    },
                };
                (p.subnet, r)
            })
            .collect();
        let table = routes.main_table().await?;
        let mut satisfied = BTreeSet::new();
        let mut overwritten: BTreeMap<Ipv4Net, String> = BTreeMap::new();
        let mut stale = Vec::new();
        for r in table.into_iter().filter(|r| r.protocol == ROUTE_PROTOCOL) {
            let dst = r.destination;
            match want.get(&dst) {
                Some(w) if w.matches(&r) && !satisfied.contains(&dst) => {
                    satisfied.insert(dst);
                }
                // same destination and metric: NLM_F_REPLACE below overwrites it
                Some(_) if r.metric == 0 && !overwritten.contains_key(&dst) => {
                    overwritten.insert(dst, describe_via(&r));
                }
                // geomx's routes outside the cluster are not this pass's to judge
                _ if !desired.cluster.contains(&dst) => {}
                _ => stale.push(r),
            }
        }
        for (dst, route) in &want {
            if satisfied.contains(dst) {
                continue;
            }
            routes.replace(route.clone()).await?;
            let change = match overwritten.get(dst) {
                Some(was) => Change::RouteReplaced {
                    destination: *dst,
                    via: route.via(),
                    was: was.clone(),
                },
                None => Change::RouteAdded {
                    destination: *dst,
                    via: route.via(),
                },
            };
            record(changes, change);
        }
        for r in stale {
            let destination = r.destination;
            let via = describe_via(&r);
            routes.delete(r).await?;
            record(changes, Change::RouteDeleted { destination, via });
        }
        Ok(())
    }

    async fn apply_firewall(
        &mut self,
        desired: &DesiredNetwork,
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let fw = self.kernel.firewall.clone();
        let random_fully = self
            .random_fully
            .unwrap_or_else(|| fw.supports_random_fully());
        let nat = rules::nat_plan(desired, random_fully);
        let filter = rules::filter_plan(desired);
        let (found, random_fully) = blocking(move || {
            let mut out = Vec::new();
            let mut random_fully = random_fully;
            ensure_chain(&*fw, &nat, &mut random_fully, &mut out)?;
            ensure_chain(&*fw, &filter, &mut random_fully, &mut out)?;
            Ok((out, random_fully))
        })
        .await?;
        self.random_fully = Some(random_fully);
        for c in found {
            record(changes, c);
        }
        Ok(())
    }

    /// Removes every route, chain and jump geomx owns and gives daemon.json back its
    /// pre-geomx values (restarting Docker when the file changes). daemon.json and the
    /// state file are read first: when either is unreadable nothing is changed.
    pub async fn cleanup(&mut self) -> Result<Vec<Change>> {
        let span = info_span!("net_cleanup", host = %self.config.host);
        async move {
            let k = self.kernel.clone();
            let daemon_text = k.daemon_config.read()?;
            let doc = daemon_json::parse(k.daemon_config.path(), daemon_text.as_deref())?;
            let state = read_state(&k)?;
            let mut changes = Vec::new();

            let fw = k.firewall.clone();
            let found = blocking(move || {
                let mut out = Vec::new();
                for (table, hook, chain) in [
                    ("nat", "POSTROUTING", NAT_CHAIN),
                    ("filter", "FORWARD", FILTER_CHAIN),
                ] {
                    remove_chain(&*fw, table, hook, chain, &mut out)?;
                }
                Ok(out)
            })
            .await?;
            for c in found {
                record(&mut changes, c);
            }

            // only geomx's routes into the cluster: protocol 247 alone is not proof enough
            let cluster = self.last_applied.as_ref().map(|d| d.cluster);
            for r in k.routes.main_table().await? {
                if r.protocol != ROUTE_PROTOCOL
                    || cluster.is_some_and(|c| !c.contains(&r.destination))
                {
                    continue;
                }
                let destination = r.destination;
                let via = describe_via(&r);
                k.routes.delete(r).await?;
                record(&mut changes, Change::RouteDeleted { destination, via });
            }
            let wg = k.wireguard.clone();
            let deleted = blocking(move || {
                let there = wg.show(WG_INTERFACE)?.is_some();
                wg.delete(WG_INTERFACE)?;
                Ok(there)
            })
            .await?;
            if deleted {
                record(
                    &mut changes,
                    Change::WireguardDeleted {
                        interface: WG_INTERFACE.into(),
                    },
                );
            }

            if let Some(remembered) = state {
                self.restore_daemon_json(&remembered, daemon_text, &doc, &mut changes)
                    .await?;
                k.state.remove()?;
            }
            self.last_applied = None;
            self.restarted_for = None;
            if changes.is_empty() {
                debug!("nothing to clean up");
            }
            Ok(changes)
        }
        .instrument(span)
        .await
    }

    async fn restore_daemon_json(
        &self,
        remembered: &Remembered,
        daemon_text: Option<String>,
        doc: &Doc,
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let k = &self.kernel;
        let restored = remembered.restore(doc);
        let file_differs = restored.text != daemon_text;
        let docker_up = k.docker.version().await.is_ok();
        let old = remembered.docker0.first().copied();
        // docker0 off its pre-geomx address also counts: an earlier cleanup may have
        // written the file and failed to restart Docker
        let docker0_differs = match (docker_up, old) {
            (true, Some(old)) => !k
                .routes
                .link_addresses(DOCKER0.into())
                .await?
                .unwrap_or_default()
                .contains(&old),
            _ => false,
        };
        if !file_differs && !docker0_differs {
            return Ok(());
        }
        let restored_doc = daemon_json::parse(k.daemon_config.path(), restored.text.as_deref())?;
        let mut wrote_step = false;
        if docker0_differs
            && !restored_doc.contains_key("bip")
            && let Some(old) = old
        {
            // Docker keeps the default bridge's last subnet in its own store when bip is
            // unset: show it docker0's old address once, then remove the key again
            let mut step = restored_doc.clone();
            step.insert("bip".into(), serde_json::Value::String(old.to_string()));
            k.daemon_config.write(&daemon_json::render(&step))?;
            wrote_step = true;
            self.restart_docker().await?;
            record(
                changes,
                Change::DockerRestarted {
                    reason: format!(
                        "bring docker0 back to its pre-geomx address {old} before removing bip"
                    ),
                },
            );
        }
        if file_differs || wrote_step {
            match &restored.text {
                Some(text) => k.daemon_config.write(text)?,
                None => k.daemon_config.remove()?,
            }
            record(
                changes,
                Change::DaemonJsonRestored {
                    path: k.daemon_config.path().to_path_buf(),
                    keys: restored.changes.clone(),
                    removed: restored.text.is_none(),
                },
            );
        }
        if docker_up {
            self.restart_docker().await?;
            record(
                changes,
                Change::DockerRestarted {
                    reason: if file_differs || wrote_step {
                        "daemon.json restored".into()
                    } else {
                        "docker0 was not at its pre-geomx address".into()
                    },
                },
            );
        } else {
            warn!(
                "Docker at {} is not running; it reads the restored daemon.json when it starts",
                k.docker.host()
            );
        }
        Ok(())
    }

    /// Keeps the host at the desired state: a pass whenever `desired` gets a new value or
    /// [`PassTrigger::now`] is called, and every [`NetConfig::interval`] otherwise, until
    /// `shutdown` completes. Until the first `Some` nothing is done; afterwards `None`
    /// (or a closed channel: the controller is gone) keeps the last known desired state in
    /// force — static stability. `on_pass` sees every pass's outcome. Failures are logged
    /// (once per distinct error) and retried at the next interval.
    pub async fn run<S, F>(
        &mut self,
        mut desired: watch::Receiver<Option<DesiredNetwork>>,
        shutdown: S,
        mut on_pass: F,
    ) where
        S: Future<Output = ()>,
        F: FnMut(&DesiredNetwork, &Result<Vec<Change>>),
    {
        let mut current: Option<DesiredNetwork> = desired.borrow_and_update().clone();
        let mut open = true;
        let mut last_error: Option<String> = None;
        let trigger = self.trigger.clone();
        tokio::pin!(shutdown);
        loop {
            if let Some(d) = current.clone() {
                let result = self.reconcile(&d).await;
                match &result {
                    Ok(_) => {
                        if last_error.take().is_some() {
                            info!(host = %self.config.host, "host network matches the desired state again");
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            warn!(host = %self.config.host, error = %msg, "network pass failed; retrying every {:?}", self.config.interval);
                        } else {
                            debug!(host = %self.config.host, error = %msg, "network pass failed again");
                        }
                        last_error = Some(msg);
                    }
                }
                on_pass(&d, &result);
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = trigger.notified() => {}
                changed = desired.changed(), if open => match changed {
                    Ok(()) => {
                        if let Some(d) = desired.borrow_and_update().clone() {
                            current = Some(d);
                        }
                    }
                    Err(_) => open = false,
                },
            }
        }
    }
}

fn read_state(k: &Kernel) -> Result<Option<Remembered>> {
    match k.state.read()? {
        Some(text) => Ok(Some(Remembered::from_json(k.state.path(), &text)?)),
        None => Ok(None),
    }
}

/// Runs blocking firewall work off the async threads.
async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetError::Internal(format!("firewall task: {e}")))?
}

/// Makes `plan.chain` hold exactly `plan.rules` in order and `plan.hook` jump to it once,
/// at position 1.
fn ensure_chain(
    fw: &dyn Firewall,
    plan: &ChainPlan,
    random_fully: &mut bool,
    out: &mut Vec<Change>,
) -> Result<()> {
    let (table, chain, hook) = (plan.table, plan.chain, plan.hook);
    let exists = fw.chain_exists(table, chain)?;
    let actual = if exists {
        fw.list_rules(table, chain)?
    } else {
        fw.new_chain(table, chain)?;
        Vec::new()
    };
    if !exists || actual != plan.rules {
        if !actual.is_empty() {
            fw.flush_chain(table, chain)?;
        }
        let mut wanted = plan.rules.clone();
        for rule in &mut wanted {
            match fw.append(table, chain, rule) {
                Ok(()) => {}
                Err(e) if rules::is_random_fully(rule) => {
                    warn!(error = %e, "MASQUERADE --random-fully is not supported here; using plain MASQUERADE");
                    *random_fully = false;
                    *rule = rules::without_random_fully(rule);
                    fw.append(table, chain, rule)?;
                }
                Err(e) => return Err(e),
            }
        }
        if !exists {
            out.push(Change::ChainCreated {
                table: table.into(),
                chain: chain.into(),
                rules: wanted.iter().map(|r| r.to_string()).collect(),
            });
        } else if actual != wanted {
            out.push(Change::ChainRebuilt {
                table: table.into(),
                chain: chain.into(),
                missing: wanted
                    .iter()
                    .filter(|r| !actual.contains(r))
                    .map(|r| r.to_string())
                    .collect(),
                unexpected: actual
                    .iter()
                    .filter(|r| !wanted.contains(r))
                    .map(|r| r.to_string())
                    .collect(),
            });
        }
    }
    let jumps: Vec<(usize, RuleSpec)> = fw
        .list_rules(table, hook)?
        .into_iter()
        .enumerate()
        .filter(|(_, r)| r.target() == Some(chain))
        .collect();
    let in_place = jumps.len() == 1 && jumps[0].0 == 0 && jumps[0].1 == plan.jump;
    if !in_place {
        for (_, r) in &jumps {
            fw.delete(table, hook, r)?;
        }
        fw.insert(table, hook, &plan.jump, 1)?;
        out.push(Change::JumpRestored {
            table: table.into(),
            hook: hook.into(),
            chain: chain.into(),
            found_at: jumps.iter().map(|(i, _)| i + 1).collect(),
        });
    }
    Ok(())
}

/// Deletes every jump from `hook` to `chain`, then the chain.
fn remove_chain(
    fw: &dyn Firewall,
    table: &str,
    hook: &str,
    chain: &str,
    out: &mut Vec<Change>,
) -> Result<()> {
    for r in fw
        .list_rules(table, hook)?
        .into_iter()
        .filter(|r| r.target() == Some(chain))
    {
        fw.delete(table, hook, &r)?;
        out.push(Change::JumpDeleted {
            table: table.into(),
            hook: hook.into(),
            chain: chain.into(),
        });
    }
    if fw.chain_exists(table, chain)? {
        fw.flush_chain(table, chain)?;
        fw.delete_chain(table, chain)?;
        out.push(Change::ChainDeleted {
            table: table.into(),
            chain: chain.into(),
        });
    }
    Ok(())
}
