//! Data-plane backends: how this host reaches each peer's container subnet.
//!
//! - `host-gw`: a route via the peer's underlay address (the seeds' manual set-up; the peer must
//!   be on-link, on the same L2 network);
//! - `wireguard`: an encrypted tunnel, interface [`WG_INTERFACE`], one WireGuard peer per host
//!   with the peer's container subnet as its allowed IPs, UDP port [`WG_PORT`];
//! - `vxlan`: an unencrypted overlay, interface [`VXLAN_INTERFACE`], UDP port [`VXLAN_PORT`],
//!   static FDB and neighbour entries per peer (no multicast, no learning), flannel-style:
//!   the route to a peer's subnet goes via the peer's VTEP address (its subnet's network
//!   address) `onlink`, whose neighbour entry is the peer's VTEP MAC ([`vtep_mac`]), whose
//!   FDB entry is the peer's underlay address;
//! - `auto` (the default): host-gw to on-link peers, wireguard to every other — like flannel's
//!   VXLAN DirectRouting, but encrypted.
//!
//! [`resolve`] picks a peer's backend; it is pure and table-tested.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The WireGuard interface geomx owns.
pub const WG_INTERFACE: &str = "geomx-wg";
/// geomx's WireGuard UDP port (the next of geomx's convention ports 7946..7950).
pub const WG_PORT: u16 = 7951;
/// The MTU of [`WG_INTERFACE`]: 1500 less WireGuard's overhead over IPv4 (60) and IPv6 (80).
pub const WG_MTU: u32 = 1420;
/// Seconds between keepalives, so that NAT and stateful firewalls on the way keep the path.
pub const WG_KEEPALIVE: u16 = 25;
/// The private key's file name in the agent's state directory (mode 0600).
pub const WG_KEY_FILE: &str = "wireguard.key";

/// The VXLAN interface geomx owns.
pub const VXLAN_INTERFACE: &str = "geomx-vxlan";
/// geomx's VXLAN UDP port (after [`WG_PORT`]; not 8472, so that flannel can live beside it).
pub const VXLAN_PORT: u16 = 7952;
/// geomx's VXLAN network identifier (its route protocol number).
pub const VXLAN_VNI: u32 = 247;
/// The MTU of [`VXLAN_INTERFACE`]: 1500 less VXLAN's 50 bytes over IPv4.
pub const VXLAN_MTU: u32 = 1450;

/// A host's VTEP MAC, derived from its container subnet (unique in the cluster, so no
/// registration is needed): locally administered unicast `02:47:` and the subnet's network
/// address.
pub fn vtep_mac(subnet: ipnet::Ipv4Net) -> crate::kernel::Mac {
    let [a, b, c, d] = subnet.network().octets();
    crate::kernel::Mac([0x02, 0x47, a, b, c, d])
}

/// A host's VTEP address on the VXLAN device: its subnet's network address.
pub fn vtep_ip(subnet: ipnet::Ipv4Net) -> std::net::Ipv4Addr {
    subnet.network()
}

/// A backend as configured (the cluster default, an agent's override).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// host-gw to on-link peers, wireguard to the others.
    #[default]
    Auto,
    /// A route via the peer's underlay address.
    HostGw,
    /// An encrypted WireGuard tunnel.
    Wireguard,
    /// An unencrypted VXLAN overlay.
    Vxlan,
}

impl Backend {
    /// Its name in configuration files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::HostGw => "host-gw",
            Backend::Wireguard => "wireguard",
            Backend::Vxlan => "vxlan",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "" | "auto" => Ok(Backend::Auto),
            "host-gw" => Ok(Backend::HostGw),
            "wireguard" => Ok(Backend::Wireguard),
            "vxlan" => Ok(Backend::Vxlan),
            other => Err(format!(
                "unknown backend {other:?}: use \"auto\", \"host-gw\", \"wireguard\" or \"vxlan\""
            )),
        }
    }
}

/// The backend a peer is actually reached through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerBackend {
    /// A route via the peer's underlay address.
    HostGw,
    /// Through [`WG_INTERFACE`].
    Wireguard,
    /// Through [`VXLAN_INTERFACE`].
    Vxlan,
}

impl PeerBackend {
    /// Its name in reports (`host-gw`, `wireguard`, `vxlan`).
    pub fn as_str(self) -> &'static str {
        match self {
            PeerBackend::HostGw => "host-gw",
            PeerBackend::Wireguard => "wireguard",
            PeerBackend::Vxlan => "vxlan",
        }
    }
}

impl fmt::Display for PeerBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a peer cannot be reached with the backend asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// host-gw was asked for, the peer is not on-link: the reason says what the kernel said.
    NotOnLink(String),
    /// WireGuard is needed, the peer has not registered a public key (an older agent); when
    /// the peer is off-link, what the kernel said about it.
    NoWireguardKey(Option<String>),
}

/// Picks the backend for one peer: `cluster` is the controller's default, `own` this agent's
/// override (if any), `on_link` whether the kernel reaches the peer's underlay address
/// directly (`Err` carries what it said instead), `has_key` whether the peer published a
/// WireGuard key.
pub fn resolve(
    cluster: Backend,
    own: Option<Backend>,
    on_link: Result<(), String>,
    has_key: bool,
) -> Result<PeerBackend, Unreachable> {
    let wanted = own.unwrap_or(cluster);
    let wireguard = |off_link: Option<String>| {
        if has_key {
            Ok(PeerBackend::Wireguard)
        } else {
            Err(Unreachable::NoWireguardKey(off_link))
        }
    };
    match (wanted, on_link) {
        (Backend::HostGw, Ok(())) => Ok(PeerBackend::HostGw),
        (Backend::HostGw, Err(why)) => Err(Unreachable::NotOnLink(why)),
        (Backend::Wireguard, on_link) => wireguard(on_link.err()),
        (Backend::Vxlan, _) => Ok(PeerBackend::Vxlan),
        (Backend::Auto, Ok(())) => Ok(PeerBackend::HostGw),
        (Backend::Auto, Err(why)) => wireguard(Some(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Row = (
        Backend,
        Option<Backend>,
        Result<(), String>,
        bool,
        Result<PeerBackend, Unreachable>,
    );

    #[test]
    fn every_combination_resolves_as_documented() {
        use Backend::*;
        use PeerBackend as P;
        let off = || Err::<(), String>("it is reached via 10.1.1.1".into());
        let table: Vec<Row> = vec![
            (Auto, None, Ok(()), true, Ok(P::HostGw)),
            (Auto, None, Ok(()), false, Ok(P::HostGw)),
            (Auto, None, off(), true, Ok(P::Wireguard)),
            (
                Auto,
                None,
                off(),
                false,
                Err(Unreachable::NoWireguardKey(Some(
                    "it is reached via 10.1.1.1".into(),
                ))),
            ),
            (HostGw, None, Ok(()), true, Ok(P::HostGw)),
            (
                HostGw,
                None,
                off(),
                true,
                Err(Unreachable::NotOnLink("it is reached via 10.1.1.1".into())),
            ),
            (Wireguard, None, Ok(()), true, Ok(P::Wireguard)),
            (
                Wireguard,
                None,
                Ok(()),
                false,
                Err(Unreachable::NoWireguardKey(None)),
            ),
            // the agent's override wins over the cluster default
            (HostGw, Some(Wireguard), Ok(()), true, Ok(P::Wireguard)),
            (Wireguard, Some(Auto), Ok(()), true, Ok(P::HostGw)),
            // VXLAN crosses routers and needs no key
            (Vxlan, None, off(), false, Ok(P::Vxlan)),
            (Vxlan, None, Ok(()), true, Ok(P::Vxlan)),
            (Auto, Some(Vxlan), off(), false, Ok(P::Vxlan)),
            (Vxlan, Some(HostGw), Ok(()), true, Ok(P::HostGw)),
            (
                Auto,
                Some(HostGw),
                off(),
                true,
                Err(Unreachable::NotOnLink("it is reached via 10.1.1.1".into())),
            ),
        ];
        for (cluster, own, link, key, want) in table {
            assert_eq!(
                resolve(cluster, own, link.clone(), key),
                want,
                "cluster {cluster}, own {own:?}, on-link {link:?}, key {key}"
            );
        }
    }

    #[test]
    fn names_parse_and_print() {
        for b in [
            Backend::Auto,
            Backend::HostGw,
            Backend::Wireguard,
            Backend::Vxlan,
        ] {
            assert_eq!(b.as_str().parse::<Backend>(), Ok(b));
        }
        assert_eq!("".parse::<Backend>(), Ok(Backend::Auto));
        assert!(
            "vxlan2"
                .parse::<Backend>()
                .unwrap_err()
                .contains("unknown backend")
        );
    }
}
