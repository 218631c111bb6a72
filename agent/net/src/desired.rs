//! The desired network state of one host and its validation.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::ValidationError;

/// Another host of the cluster, as this host needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The peer's host name.
    pub name: String,
    /// Its address on the underlay network (the next hop for its subnet).
    pub underlay_ip: Ipv4Addr,
    /// Its container subnet (its docker0 network).
    pub subnet: Ipv4Net,
    /// Its WireGuard public key (base64), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_key: Option<String>,
    /// Its WireGuard UDP port on its underlay address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_port: Option<u16>,
}

/// What this host's network should look like: its own container subnet, the cluster CIDR
/// holding every host's subnet, and the other hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredNetwork {
    /// This host's container subnet; docker0 gets its first address.
    pub subnet: Ipv4Net,
    /// The cluster CIDR: traffic inside it keeps its source address.
    pub cluster: Ipv4Net,
    /// The other hosts.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// The cluster's default backend (an agent may override it).
    #[serde(default)]
    pub backend: Backend,
}

impl DesiredNetwork {
    /// docker0's address: the first address of the subnet with the subnet's prefix
    /// (`172.17.34.1/24` for `172.17.34.0/24`), the value of `bip` in daemon.json.
    pub fn bip(&self) -> Ipv4Net {
        let first = Ipv4Addr::from(u32::from(self.subnet.network()).saturating_add(1));
        // the prefix comes from a valid Ipv4Net, so it is at most 32
        Ipv4Net::new(first, self.subnet.prefix_len()).unwrap_or(self.subnet)
    }

    /// Checks the desired state on its own (no kernel needed). `host` is this host's name.
    /// Returns the first problem found.
    pub fn validate(&self, host: &str) -> Result<(), ValidationError> {
        if host.trim().is_empty() {
            return Err(ValidationError::EmptyName {
                what: "this host".into(),
            });
        }
        network_address("the cluster CIDR", self.cluster)?;
        let own = "this host's subnet";
        network_address(own, self.subnet)?;
        container_subnet(own, self.subnet, self.cluster)?;
        let mut names: BTreeMap<&str, ()> = BTreeMap::new();
        let mut underlays: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.name.trim().is_empty() {
                return Err(ValidationError::EmptyName {
                    what: format!("peer #{}", i + 1),
                });
            }
            if p.name == host {
                return Err(ValidationError::PeerIsThisHost {
                    name: p.name.clone(),
                });
            }
            if names.insert(&p.name, ()).is_some() {
                return Err(ValidationError::DuplicatePeer {
                    name: p.name.clone(),
                });
            }
            let what = format!("peer {}'s subnet", p.name);
            network_address(&what, p.subnet)?;
            container_subnet(&what, p.subnet, self.cluster)?;
            if overlaps(p.subnet, self.subnet) {
                return Err(ValidationError::PeerHasOwnSubnet {
                    peer: p.name.clone(),
                    subnet: p.subnet,
                    own: self.subnet,
                });
            }
            if let Some(q) = self.peers[..i]
                .iter()
                .find(|q| overlaps(q.subnet, p.subnet))
            {
                return Err(ValidationError::OverlappingPeers {
                    first: q.name.clone(),
                    first_subnet: q.subnet,
                    second: p.name.clone(),
                    second_subnet: p.subnet,
                });
            }
            underlay(p, self.cluster)?;
            if let Some(first) = underlays.insert(p.underlay_ip, &p.name) {
                return Err(ValidationError::DuplicateUnderlay {
                    first: first.to_string(),
                    second: p.name.clone(),
                    ip: p.underlay_ip,
                });
            }
        }
        Ok(())
    }
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn network_address(what: &str, net: Ipv4Net) -> Result<(), ValidationError> {
    if net.addr() != net.network() {
        return Err(ValidationError::NotNetworkAddress {
            what: what.to_string(),
            net,
            suggestion: net.trunc(),
        });
    }
    Ok(())
}

fn container_subnet(what: &str, subnet: Ipv4Net, cluster: Ipv4Net) -> Result<(), ValidationError> {
    if subnet.prefix_len() > 30 {
        return Err(ValidationError::SubnetTooSmall {
            what: what.to_string(),
            net: subnet,
        });
    }
    if !cluster.contains(&subnet) {
        return Err(ValidationError::SubnetOutsideCluster {
            what: what.to_string(),
            subnet,
            cluster,
        });
    }
    Ok(())
}

fn underlay(p: &Peer, cluster: Ipv4Net) -> Result<(), ValidationError> {
    let ip = p.underlay_ip;
    let reason = if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if cluster.contains(&ip) {
        Some("it lies inside the cluster CIDR")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ValidationError::BadUnderlay {
            peer: p.name.clone(),
            ip,
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test network")
    }

    fn peer(name: &str, ip: &str, subnet: &str) -> Peer {
        Peer {
            name: name.into(),
            underlay_ip: ip.parse().expect("test ip"),
            subnet: net(subnet),
            wireguard_key: None,
            wireguard_port: None,
        }
    }

    fn seed_a() -> DesiredNetwork {
        DesiredNetwork {
            subnet: net("172.17.34.0/24"),
            cluster: net("172.17.0.0/16"),
            peers: vec![
                peer("b", "10.1.1.29", "172.17.29.0/24"),
                peer("c", "10.1.1.33", "172.17.33.0/24"),
            ],
            backend: Default::default(),
        }
    }

    #[test]
    fn the_seed_topology_is_valid_and_bip_is_the_first_address() {
        let d = seed_a();
        assert_eq!(d.validate("a"), Ok(()));
        assert_eq!(d.bip(), net("172.17.34.1/24"));
    }

    #[test]
    fn a_subnet_outside_the_cluster_is_refused() {
        let mut d = seed_a();
        d.subnet = net("172.18.34.0/24");
        let e = d.validate("a").unwrap_err();
        assert!(matches!(e, ValidationError::SubnetOutsideCluster { .. }));
        assert_eq!(
            e.to_string(),
            "this host's subnet 172.18.34.0/24 is outside the cluster CIDR 172.17.0.0/16"
        );
        let mut d = seed_a();
        d.peers[1].subnet = net("10.9.0.0/24");
        assert!(
            d.validate("a")
                .unwrap_err()
                .to_string()
                .starts_with("peer c's subnet")
        );
    }

    #[test]
    fn overlapping_peers_are_named_both() {
        let mut d = seed_a();
        d.peers[1].subnet = net("172.17.29.128/25");
        let e = d.validate("a").unwrap_err();
        assert_eq!(
            e.to_string(),
            "peers b (172.17.29.0/24) and c (172.17.29.128/25) have overlapping subnets"
        );
    }

    #[test]
    fn a_peer_with_this_hosts_subnet_is_refused() {
        let mut d = seed_a();
        d.peers[0].subnet = net("172.17.34.0/24");
        assert!(matches!(
            d.validate("a"),
            Err(ValidationError::PeerHasOwnSubnet { .. })
        ));
        let mut d = seed_a();
        d.peers[0].subnet = net("172.17.0.0/16");
        assert!(matches!(
            d.validate("a"),
            Err(ValidationError::PeerHasOwnSubnet { .. })
        ));
    }

    #[test]
    fn names_must_be_unique_and_not_this_host() {
        let mut d = seed_a();
        d.peers[1].name = "b".into();
        assert_eq!(
            d.validate("a"),
            Err(ValidationError::DuplicatePeer { name: "b".into() })
        );
        assert_eq!(
            seed_a().validate("b"),
            Err(ValidationError::PeerIsThisHost { name: "b".into() })
        );
        assert!(matches!(
            seed_a().validate(""),
            Err(ValidationError::EmptyName { .. })
        ));
    }

    #[test]
    fn host_bits_and_tiny_subnets_are_refused() {
        let mut d = seed_a();
        d.subnet = net("172.17.34.1/24");
        assert_eq!(
            d.validate("a").unwrap_err().to_string(),
            "this host's subnet 172.17.34.1/24 is not a network address (did you mean 172.17.34.0/24?)"
        );
        let mut d = seed_a();
        d.subnet = net("172.17.34.0/31");
        assert!(matches!(
            d.validate("a"),
            Err(ValidationError::SubnetTooSmall { .. })
        ));
    }

    #[test]
    fn underlay_addresses_must_be_usable_next_hops() {
        let mut d = seed_a();
        d.peers[1].underlay_ip = "10.1.1.29".parse().expect("ip");
        assert!(matches!(
            d.validate("a"),
            Err(ValidationError::DuplicateUnderlay { .. })
        ));
        let mut d = seed_a();
        d.peers[0].underlay_ip = "172.17.200.1".parse().expect("ip");
        assert!(matches!(
            d.validate("a"),
            Err(ValidationError::BadUnderlay { .. })
        ));
        let mut d = seed_a();
        d.peers[0].underlay_ip = "127.0.0.1".parse().expect("ip");
        assert!(matches!(
            d.validate("a"),
            Err(ValidationError::BadUnderlay { .. })
        ));
    }
}
