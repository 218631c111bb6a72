//! The network pass as a pure function: what the host has ([`Observed`]) and what it
//! should have ([`DesiredNetwork`]) in, the steps that make it so ([`NetPlan`]) out. No
//! kernel, no Docker, no clock: every decision of a pass is here and table-tested; the
//! executor ([`crate::apply`]) only carries the steps out.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::ROUTE_PROTOCOL;
use crate::backend::{
    self, Backend, PeerBackend, Unreachable, VXLAN_INTERFACE, VXLAN_MTU, VXLAN_PORT, VXLAN_VNI,
    WG_INTERFACE, WG_PORT,
};
use crate::daemon_json::{self, Doc, KeyChange, Remembered};
use crate::desired::{DesiredNetwork, Peer};
use crate::error::{NetError, Result};
use crate::kernel::{
    DockerVersion, FdbEntry, KernelRoute, NeighEntry, PeerRoute, RouteKind, VxlanDevice, VxlanSpec,
    WgDevice, WgPeerConfig,
};
use crate::rules::{self, ChainObserved, FilterPeer, TableFix};

/// Docker as the pass found it: an explicit input, not something to guess.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DockerState {
    /// The API answered.
    Up(DockerVersion),
    /// The API did not answer: daemon.json is written for its next start, Docker is not
    /// restarted, docker0 is not checked; routes and iptables are applied as always.
    Down {
        /// Why (the API's error).
        reason: String,
    },
}

impl Default for DockerState {
    /// Not seen yet.
    fn default() -> DockerState {
        DockerState::Down {
            reason: "not asked yet".into(),
        }
    }
}

/// Everything a pass reads from the host before deciding anything.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Docker.
    pub docker: DockerState,
    /// daemon.json's text (`None`: absent).
    pub daemon_text: Option<String>,
    /// daemon.json parsed.
    pub doc: Doc,
    /// What daemon.json held before geomx changed it (`None`: geomx has not).
    pub remembered: Option<Remembered>,
    /// docker0's addresses (`None`: no docker0).
    pub docker0: Option<Vec<Ipv4Net>>,
    /// `net.ipv4.ip_forward`.
    pub ip_forward: String,
    /// The main routing table.
    pub routes: Vec<KernelRoute>,
    /// The kernel's route to each peer's underlay address (`ip route get`).
    pub paths: BTreeMap<Ipv4Addr, Option<KernelRoute>>,
    /// This host's WireGuard public key (`None`: not read, no peer has a key).
    pub wg_public_key: Option<String>,
    /// The WireGuard interface.
    pub wireguard: Option<WgDevice>,
    /// The VXLAN interface.
    pub vxlan: Option<VxlanDevice>,
    /// nat: POSTROUTING and geomx's chain.
    pub nat: ChainObserved,
    /// filter: FORWARD and geomx's chain.
    pub filter: ChainObserved,
}

/// What the reconciler remembers between passes, as the plan needs it.
#[derive(Clone, Debug, Default)]
pub struct PlanMemory {
    /// The Docker version seen last (used while Docker is down).
    pub last_docker: Option<DockerVersion>,
    /// A bip Docker was already restarted once for (docker0 did not take it).
    pub restarted_for: Option<Ipv4Net>,
    /// Whether `MASQUERADE --random-fully` works here.
    pub random_fully: bool,
}

/// This host's settings the plan needs.
#[derive(Clone, Debug)]
pub struct HostSettings {
    /// Its name.
    pub host: String,
    /// The agent's backend override.
    pub backend: Option<Backend>,
    /// Its WireGuard listen port.
    pub wireguard_port: u16,
    /// daemon.json's path, for messages.
    pub daemon_json: std::path::PathBuf,
    /// The Docker address, for messages.
    pub docker_host: String,
    /// A Docker that does not answer refuses the pass (see `NetConfig::docker_required`).
    pub docker_required: bool,
}

/// One step of a plan, in the order the executor takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Record daemon.json's pre-geomx values (before the first change).
    Remember(Remembered),
    /// Write daemon.json.
    WriteDaemonJson {
        /// Its new text.
        text: String,
        /// The keys that change.
        keys: Vec<KeyChange>,
    },
    /// Restart Docker, wait for its API and for docker0 to carry `bip`; the pass ends
    /// after it (Docker rewrites its iptables when it starts: the rest is planned again).
    RestartDocker {
        /// Why.
        reason: String,
        /// docker0's address to wait for.
        bip: Ipv4Net,
        /// The restart is for a docker0 that did not take the bip (only once per bip).
        for_docker0: bool,
    },
    /// Set `net.ipv4.ip_forward` to 1.
    EnableIpForward {
        /// Its value before.
        was: String,
    },
    /// Apply one table's iptables-restore payload.
    Firewall(TableFix),
    /// Create the WireGuard interface.
    WgCreate,
    /// Give it its private key and listen port.
    WgConfigure {
        /// The port.
        port: u16,
    },
    /// Add or update a WireGuard peer.
    WgSetPeer {
        /// The peer host.
        peer: String,
        /// Its configuration.
        config: WgPeerConfig,
    },
    /// Remove a WireGuard peer.
    WgRemovePeer {
        /// Its public key.
        public_key: String,
    },
    /// Create the VXLAN interface.
    VxlanCreate(VxlanSpec),
    /// Set a static FDB entry.
    FdbSet {
        /// The peer host.
        peer: String,
        /// The entry.
        entry: FdbEntry,
    },
    /// Delete an FDB entry.
    FdbDelete(FdbEntry),
    /// Set a permanent neighbour entry.
    NeighSet {
        /// The peer host.
        peer: String,
        /// The entry.
        entry: NeighEntry,
    },
    /// Delete a neighbour entry.
    NeighDelete(NeighEntry),
    /// Add a route, or replace the one with its destination.
    RouteReplace {
        /// The route.
        route: PeerRoute,
        /// The next hop it replaces (`None`: there was no route).
        was: Option<String>,
    },
    /// Delete a geomx route.
    RouteDelete(KernelRoute),
    /// Delete the VXLAN interface (its settings changed, or no peer needs it).
    VxlanDelete,
    /// Delete the WireGuard interface (no peer needs it).
    WgDelete,
}

impl std::fmt::Display for Step {
    /// The step in words, as `geomx-agent network plan` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Remember(r) => match r.cluster {
                Some(c) => write!(
                    f,
                    "remember daemon.json's pre-geomx values and the cluster {c}"
                ),
                None => write!(f, "remember daemon.json's pre-geomx values"),
            },
            Step::WriteDaemonJson { keys, .. } => {
                let k: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                write!(f, "write daemon.json: {}", k.join(", "))
            }
            Step::RestartDocker { reason, .. } => write!(f, "restart Docker ({reason})"),
            Step::EnableIpForward { was } => write!(f, "set net.ipv4.ip_forward=1 (was {was})"),
            Step::Firewall(fix) => {
                let lines: Vec<&str> = fix
                    .payload
                    .lines()
                    .filter(|l| !l.starts_with('*') && *l != "COMMIT")
                    .collect();
                write!(
                    f,
                    "iptables-restore --noflush -t {}: {}",
                    fix.table,
                    lines.join(" | ")
                )
            }
            Step::WgCreate => write!(f, "create WireGuard interface {WG_INTERFACE}"),
            Step::WgConfigure { port } => {
                write!(
                    f,
                    "configure {WG_INTERFACE}: private key, listen port {port}"
                )
            }
            Step::WgSetPeer { peer, config } => write!(
                f,
                "set WireGuard peer {peer} ({}) at {}",
                config.public_key,
                config
                    .endpoint
                    .map_or_else(|| "-".to_string(), |e| e.to_string())
            ),
            Step::WgRemovePeer { public_key } => write!(f, "remove WireGuard peer {public_key}"),
            Step::VxlanCreate(spec) => write!(
                f,
                "create VXLAN interface {VXLAN_INTERFACE} (vni {}, port {}, mac {}, mtu {})",
                spec.vni, spec.port, spec.mac, spec.mtu
            ),
            Step::FdbSet { peer, entry } => write!(
                f,
                "set fdb {} dst {} on {VXLAN_INTERFACE} (peer {peer})",
                entry.mac, entry.dst
            ),
            Step::FdbDelete(e) => write!(f, "delete fdb {} dst {}", e.mac, e.dst),
            Step::NeighSet { peer, entry } => write!(
                f,
                "set neighbour {} lladdr {} on {VXLAN_INTERFACE} (peer {peer})",
                entry.ip, entry.mac
            ),
            Step::NeighDelete(e) => write!(f, "delete neighbour {} lladdr {}", e.ip, e.mac),
            Step::RouteReplace { route, was } => match was {
                Some(was) => write!(
                    f,
                    "replace route {} {was} with {}",
                    route.destination,
                    route.via()
                ),
                None => write!(
                    f,
                    "add route {} {} proto {ROUTE_PROTOCOL}",
                    route.destination,
                    route.via()
                ),
            },
            Step::RouteDelete(r) => write!(f, "delete route {r}"),
            Step::VxlanDelete => write!(f, "delete VXLAN interface {VXLAN_INTERFACE}"),
            Step::WgDelete => write!(f, "delete WireGuard interface {WG_INTERFACE}"),
        }
    }
}

/// A pass's plan: each peer's backend and the steps, in order. Empty steps: converged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetPlan {
    /// Every peer's backend, by name.
    pub backends: Vec<(String, PeerBackend)>,
    /// What to do.
    pub steps: Vec<Step>,
}

impl NetPlan {
    /// Whether the host already matches.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// docker0's address in words, for messages.
pub(crate) fn describe_docker0(addrs: &Option<Vec<Ipv4Net>>) -> String {
    match addrs {
        Some(a) if a.is_empty() => "no IPv4 address".to_string(),
        Some(a) => a
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        None => "nothing (there is no docker0)".to_string(),
    }
}

/// Whether the kernel reaches `ip` directly (Ok) or what it does instead (Err), as
/// [`backend::resolve`] takes it; a peer at this host's own address is an error.
fn on_link(peer: &Peer, path: Option<&KernelRoute>) -> Result<std::result::Result<(), String>> {
    Ok(match path {
        None => Err("no route to it".to_string()),
        Some(r) if r.kind == RouteKind::Local => {
            return Err(NetError::PeerNotOnLink {
                peer: peer.name.clone(),
                ip: peer.underlay_ip,
                detail: "it is an address of this host".into(),
            });
        }
        Some(r) if r.kind != RouteKind::Unicast => Err(format!("the kernel routes it as {r}")),
        Some(KernelRoute {
            gateway: Some(gw), ..
        }) => Err(format!("it is reached via {gw}")),
        Some(_) => Ok(()),
    })
}

/// Each peer's backend; the first peer that cannot be reached the way it is asked for is
/// an error naming it (nothing of the pass is applied then).
pub fn backends(
    desired: &DesiredNetwork,
    settings: &HostSettings,
    observed: &Observed,
) -> Result<Vec<(Peer, PeerBackend)>> {
    let mut out = Vec::new();
    for p in &desired.peers {
        if let Some(r) = observed
            .routes
            .iter()
            .find(|r| r.protocol != ROUTE_PROTOCOL && r.destination == p.subnet)
        {
            return Err(NetError::RouteConflict {
                destination: p.subnet,
                existing: r.to_string(),
            });
        }
        let path = observed.paths.get(&p.underlay_ip).and_then(Option::as_ref);
        let link = on_link(p, path)?;
        match backend::resolve(
            desired.backend,
            settings.backend,
            link,
            p.wireguard_key.is_some(),
        ) {
            Ok(b) => out.push((p.clone(), b)),
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
    Ok(out)
}

/// The plan of one pass. Pure: the same inputs give the same plan.
pub fn plan(
    desired: &DesiredNetwork,
    settings: &HostSettings,
    observed: &Observed,
    memory: &PlanMemory,
) -> Result<NetPlan> {
    desired.validate(&settings.host)?;
    if settings.docker_required
        && let DockerState::Down { reason } = &observed.docker
    {
        return Err(NetError::DockerUnavailable {
            host: settings.docker_host.clone(),
            reason: reason.clone(),
        });
    }
    let peers = backends(desired, settings, observed)?;
    let mut steps = Vec::new();
    plan_docker(desired, settings, observed, memory, &mut steps)?;
    if observed.ip_forward != "1" {
        steps.push(Step::EnableIpForward {
            was: observed.ip_forward.clone(),
        });
    }
    plan_firewall(desired, &peers, observed, memory, &mut steps);
    plan_wireguard(&peers, settings, observed, &mut steps);
    plan_vxlan(desired, &peers, observed, &mut steps);
    plan_routes(desired, &peers, observed, &mut steps);
    if !peers.iter().any(|(_, b)| *b == PeerBackend::Vxlan) && observed.vxlan.is_some() {
        steps.push(Step::VxlanDelete);
    }
    if !peers.iter().any(|(_, b)| *b == PeerBackend::Wireguard) && observed.wireguard.is_some() {
        steps.push(Step::WgDelete);
    }
    Ok(NetPlan {
        backends: peers.iter().map(|(p, b)| (p.name.clone(), *b)).collect(),
        steps,
    })
}

fn plan_docker(
    desired: &DesiredNetwork,
    settings: &HostSettings,
    observed: &Observed,
    memory: &PlanMemory,
    steps: &mut Vec<Step>,
) -> Result<()> {
    let bip = desired.bip();
    let up = match &observed.docker {
        DockerState::Up(v) => Some(v.clone()),
        DockerState::Down { .. } => None,
    };
    let version = up
        .clone()
        .or_else(|| memory.last_docker.clone())
        .unwrap_or_else(|| DockerVersion {
            version: "unknown (Docker is not running)".into(),
            api_version: String::new(),
        });
    let wanted = daemon_json::settings(desired, &version);
    let (doc, keys) = daemon_json::apply(&observed.doc, &wanted);
    // before the first change: what daemon.json held, and the cluster the routes lie in
    match &observed.remembered {
        None => {
            let mut r = Remembered::capture(
                observed.daemon_text.as_deref(),
                &observed.doc,
                observed.docker0.clone().unwrap_or_default(),
            );
            r.cluster = Some(desired.cluster);
            steps.push(Step::Remember(r));
        }
        Some(r) if r.cluster != Some(desired.cluster) => {
            let mut r = r.clone();
            r.cluster = Some(desired.cluster);
            steps.push(Step::Remember(r));
        }
        Some(_) => {}
    }
    if !keys.is_empty() {
        steps.push(Step::WriteDaemonJson {
            text: daemon_json::render(&doc),
            keys,
        });
        if up.is_some() {
            steps.push(Step::RestartDocker {
                reason: "daemon.json changed".into(),
                bip,
                for_docker0: false,
            });
        }
        return Ok(());
    }
    if up.is_none() || observed.docker0.as_ref().is_some_and(|a| a.contains(&bip)) {
        return Ok(());
    }
    let found = describe_docker0(&observed.docker0);
    if memory.restarted_for == Some(bip) {
        return Err(NetError::Docker0Mismatch {
            expected: bip,
            found,
            path: settings.daemon_json.clone(),
        });
    }
    // daemon.json is right but Docker has not applied it (a restart that failed earlier,
    // an edit by hand): restart once for this bip, not on every pass
    steps.push(Step::RestartDocker {
        reason: format!("docker0 carried {found}, not bip {bip}"),
        bip,
        for_docker0: true,
    });
    Ok(())
}

fn plan_firewall(
    desired: &DesiredNetwork,
    peers: &[(Peer, PeerBackend)],
    observed: &Observed,
    memory: &PlanMemory,
    steps: &mut Vec<Step>,
) {
    let nat = rules::nat_plan(desired, memory.random_fully);
    let filter_peers: Vec<FilterPeer> = peers
        .iter()
        .map(|(p, b)| FilterPeer {
            subnet: p.subnet,
            backend: *b,
            underlay_ip: p.underlay_ip,
            device: observed
                .paths
                .get(&p.underlay_ip)
                .and_then(Option::as_ref)
                .and_then(|r| r.device.clone()),
        })
        .collect();
    let filter = rules::filter_plan(desired, &filter_peers);
    for fix in [
        rules::table_fix(&nat, &observed.nat),
        rules::table_fix(&filter, &observed.filter),
    ]
    .into_iter()
    .flatten()
    {
        steps.push(Step::Firewall(fix));
    }
}

fn plan_wireguard(
    peers: &[(Peer, PeerBackend)],
    settings: &HostSettings,
    observed: &Observed,
    steps: &mut Vec<Step>,
) {
    let wanted: Vec<(String, WgPeerConfig)> = peers
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
    if wanted.is_empty() {
        return;
    }
    let port = settings.wireguard_port;
    let empty = WgDevice {
        public_key: String::new(),
        listen_port: 0,
        peers: Vec::new(),
        handshakes: Vec::new(),
    };
    let device = match &observed.wireguard {
        Some(d) => d,
        None => {
            steps.push(Step::WgCreate);
            &empty
        }
    };
    if observed.wg_public_key.as_deref() != Some(device.public_key.as_str())
        || device.listen_port != port
    {
        steps.push(Step::WgConfigure { port });
    }
    for (name, want) in &wanted {
        if !device.peers.contains(want) {
            steps.push(Step::WgSetPeer {
                peer: name.clone(),
                config: want.clone(),
            });
        }
    }
    for have in &device.peers {
        if !wanted.iter().any(|(_, w)| w.public_key == have.public_key) {
            steps.push(Step::WgRemovePeer {
                public_key: have.public_key.clone(),
            });
        }
    }
}

/// This host's VXLAN device as geomx wants it.
pub fn vxlan_spec(desired: &DesiredNetwork) -> VxlanSpec {
    VxlanSpec {
        vni: VXLAN_VNI,
        port: VXLAN_PORT,
        local: None,
        mac: backend::vtep_mac(desired.subnet),
        mtu: VXLAN_MTU,
    }
}

fn plan_vxlan(
    desired: &DesiredNetwork,
    peers: &[(Peer, PeerBackend)],
    observed: &Observed,
    steps: &mut Vec<Step>,
) {
    let vx: Vec<&Peer> = peers
        .iter()
        .filter(|(_, b)| *b == PeerBackend::Vxlan)
        .map(|(p, _)| p)
        .collect();
    if vx.is_empty() {
        return;
    }
    let spec = vxlan_spec(desired);
    let device = match &observed.vxlan {
        Some(d) if d.spec == spec && d.up => Some(d),
        Some(_) => {
            // settings cannot be changed in place: make it again
            steps.push(Step::VxlanDelete);
            steps.push(Step::VxlanCreate(spec));
            None
        }
        None => {
            steps.push(Step::VxlanCreate(spec));
            None
        }
    };
    let (fdb, neighbours) = device.map_or((&[][..], &[][..]), |d| {
        (d.fdb.as_slice(), d.neighbours.as_slice())
    });
    let mut want_fdb = Vec::new();
    let mut want_neigh = Vec::new();
    for p in &vx {
        let mac = backend::vtep_mac(p.subnet);
        let f = FdbEntry {
            mac,
            dst: p.underlay_ip,
        };
        let n = NeighEntry {
            ip: backend::vtep_ip(p.subnet),
            mac,
        };
        if !fdb.contains(&f) {
            steps.push(Step::FdbSet {
                peer: p.name.clone(),
                entry: f,
            });
        }
        if !neighbours.contains(&n) {
            steps.push(Step::NeighSet {
                peer: p.name.clone(),
                entry: n,
            });
        }
        want_fdb.push(f);
        want_neigh.push(n);
    }
    for f in fdb.iter().filter(|f| !want_fdb.contains(f)) {
        steps.push(Step::FdbDelete(*f));
    }
    for n in neighbours.iter().filter(|n| !want_neigh.contains(n)) {
        steps.push(Step::NeighDelete(*n));
    }
}

/// The route geomx wants to `peer` through `backend`.
pub fn peer_route(desired: &DesiredNetwork, peer: &Peer, backend: PeerBackend) -> PeerRoute {
    let own = desired.bip().addr();
    match backend {
        PeerBackend::HostGw => PeerRoute {
            destination: peer.subnet,
            gateway: Some(peer.underlay_ip),
            device: None,
            source: None,
            onlink: false,
        },
        PeerBackend::Wireguard => PeerRoute {
            destination: peer.subnet,
            gateway: None,
            device: Some(WG_INTERFACE.into()),
            source: Some(own),
            onlink: false,
        },
        PeerBackend::Vxlan => PeerRoute {
            destination: peer.subnet,
            gateway: Some(backend::vtep_ip(peer.subnet)),
            device: Some(VXLAN_INTERFACE.into()),
            source: Some(own),
            onlink: true,
        },
    }
}

/// A kernel route's next hop as `ip route` says it.
pub fn describe_via(r: &KernelRoute) -> String {
    match (&r.gateway, &r.device) {
        (Some(gw), _) => format!("via {gw}"),
        (None, Some(dev)) => format!("dev {dev}"),
        (None, None) => "-".into(),
    }
}

fn plan_routes(
    desired: &DesiredNetwork,
    peers: &[(Peer, PeerBackend)],
    observed: &Observed,
    steps: &mut Vec<Step>,
) {
    let want: BTreeMap<Ipv4Net, PeerRoute> = peers
        .iter()
        .map(|(p, b)| (p.subnet, peer_route(desired, p, *b)))
        .collect();
    let mut satisfied = std::collections::BTreeSet::new();
    let mut overwritten: BTreeMap<Ipv4Net, String> = BTreeMap::new();
    let mut stale = Vec::new();
    for r in observed
        .routes
        .iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL)
    {
        let dst = r.destination;
        match want.get(&dst) {
            Some(w) if w.matches(r) && !satisfied.contains(&dst) => {
                satisfied.insert(dst);
            }
            // same destination and metric: NLM_F_REPLACE overwrites it
            Some(_) if r.metric == 0 && !overwritten.contains_key(&dst) => {
                overwritten.insert(dst, describe_via(r));
            }
            // geomx's routes outside the cluster are not this pass's to judge
            _ if !desired.cluster.contains(&dst) => {}
            _ => stale.push(r.clone()),
        }
    }
    for (dst, route) in &want {
        if !satisfied.contains(dst) {
            steps.push(Step::RouteReplace {
                route: route.clone(),
                was: overwritten.get(dst).cloned(),
            });
        }
    }
    for r in stale {
        steps.push(Step::RouteDelete(r));
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
