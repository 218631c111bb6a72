//! What a pass or a cleanup changed on a host, one [`Change`] each.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::ROUTE_PROTOCOL;
use crate::daemon_json::KeyChange;
use crate::kernel::WgImplementation;
use crate::reconcile::IP_FORWARD;

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
    /// The VXLAN interface was created.
    VxlanCreated {
        /// Its name.
        interface: String,
        /// Its VNI.
        vni: u32,
        /// Its UDP port.
        port: u16,
    },
    /// The VXLAN interface was deleted (no peer needs it, its settings changed, or cleanup).
    VxlanDeleted {
        /// Its name.
        interface: String,
    },
    /// A static FDB entry for a peer's VTEP was set.
    FdbSet {
        /// The peer host.
        peer: String,
        /// The peer's VTEP MAC.
        mac: String,
        /// The peer's underlay address.
        dst: Ipv4Addr,
    },
    /// An FDB entry no longer wanted was deleted.
    FdbDeleted {
        /// The MAC.
        mac: String,
        /// Its destination.
        dst: Ipv4Addr,
    },
    /// A permanent neighbour entry for a peer's VTEP was set.
    NeighbourSet {
        /// The peer host.
        peer: String,
        /// The peer's VTEP address.
        ip: Ipv4Addr,
        /// The peer's VTEP MAC.
        mac: String,
    },
    /// A neighbour entry no longer wanted was deleted.
    NeighbourDeleted {
        /// Its address.
        ip: Ipv4Addr,
        /// Its MAC.
        mac: String,
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
    /// The jump to a geomx chain was (re)inserted at its place in its built-in chain.
    JumpRestored {
        /// `nat` or `filter`.
        table: String,
        /// The built-in chain.
        hook: String,
        /// geomx's chain.
        chain: String,
        /// Its 1-based position now.
        position: usize,
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

impl Change {
    /// Every [`Change::kind`], in declaration order (a bounded set: the `kind` label of the
    /// agent's `geomx_agent_network_changes_total`).
    pub const KINDS: [&'static str; 24] = [
        "remembered",
        "daemon_json_updated",
        "daemon_json_restored",
        "docker_restarted",
        "ip_forward_enabled",
        "route_added",
        "route_replaced",
        "wireguard_created",
        "wireguard_configured",
        "wireguard_peer_set",
        "wireguard_peer_removed",
        "wireguard_deleted",
        "route_deleted",
        "vxlan_created",
        "vxlan_deleted",
        "fdb_set",
        "fdb_deleted",
        "neighbour_set",
        "neighbour_deleted",
        "chain_created",
        "chain_rebuilt",
        "jump_restored",
        "jump_deleted",
        "chain_deleted",
    ];

    /// The change's kind: its variant in snake case, as in its JSON (`"kind"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Remembered { .. } => "remembered",
            Change::DaemonJsonUpdated { .. } => "daemon_json_updated",
            Change::DaemonJsonRestored { .. } => "daemon_json_restored",
            Change::DockerRestarted { .. } => "docker_restarted",
            Change::IpForwardEnabled { .. } => "ip_forward_enabled",
            Change::RouteAdded { .. } => "route_added",
            Change::RouteReplaced { .. } => "route_replaced",
            Change::WireguardCreated { .. } => "wireguard_created",
            Change::WireguardConfigured { .. } => "wireguard_configured",
            Change::WireguardPeerSet { .. } => "wireguard_peer_set",
            Change::WireguardPeerRemoved { .. } => "wireguard_peer_removed",
            Change::WireguardDeleted { .. } => "wireguard_deleted",
            Change::RouteDeleted { .. } => "route_deleted",
            Change::VxlanCreated { .. } => "vxlan_created",
            Change::VxlanDeleted { .. } => "vxlan_deleted",
            Change::FdbSet { .. } => "fdb_set",
            Change::FdbDeleted { .. } => "fdb_deleted",
            Change::NeighbourSet { .. } => "neighbour_set",
            Change::NeighbourDeleted { .. } => "neighbour_deleted",
            Change::ChainCreated { .. } => "chain_created",
            Change::ChainRebuilt { .. } => "chain_rebuilt",
            Change::JumpRestored { .. } => "jump_restored",
            Change::JumpDeleted { .. } => "jump_deleted",
            Change::ChainDeleted { .. } => "chain_deleted",
        }
    }
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
            Change::VxlanCreated {
                interface,
                vni,
                port,
            } => write!(
                f,
                "created VXLAN interface {interface} (vni {vni}, port {port}, learning off)"
            ),
            Change::VxlanDeleted { interface } => {
                write!(f, "deleted VXLAN interface {interface}")
            }
            Change::FdbSet { peer, mac, dst } => {
                write!(f, "set fdb {mac} dst {dst} (peer {peer})")
            }
            Change::FdbDeleted { mac, dst } => write!(f, "deleted fdb {mac} dst {dst}"),
            Change::NeighbourSet { peer, ip, mac } => {
                write!(f, "set neighbour {ip} lladdr {mac} (peer {peer})")
            }
            Change::NeighbourDeleted { ip, mac } => {
                write!(f, "deleted neighbour {ip} lladdr {mac}")
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
                position,
                found_at,
            } => {
                write!(
                    f,
                    "put the jump {table} {hook} -> {chain} at position {position}"
                )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_is_the_json_tag_and_one_of_the_kinds() {
        let samples = [
            Change::RouteAdded {
                destination: "172.17.29.0/24".parse().expect("net"),
                via: "via 10.1.1.29".into(),
            },
            Change::WireguardPeerSet {
                peer: "b".into(),
                endpoint: "10.1.1.29:7951".into(),
            },
            Change::IpForwardEnabled { was: "0".into() },
            Change::ChainDeleted {
                table: "nat".into(),
                chain: "GEOMX".into(),
            },
            Change::DockerRestarted {
                reason: "bip".into(),
            },
        ];
        for c in samples {
            let json = serde_json::to_value(&c).expect("json");
            assert_eq!(json["kind"].as_str(), Some(c.kind()), "{c}");
            assert!(Change::KINDS.contains(&c.kind()), "{c}");
        }
        let mut kinds = Change::KINDS.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), Change::KINDS.len(), "kinds are distinct");
    }
}
