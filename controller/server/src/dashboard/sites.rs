//! The data centers of the cluster as the dashboard shows them, found from what the agents
//! measured: two hosts whose agents route to each other directly (`host-gw`: one L2
//! segment) are in the same data center; hosts reached only through a tunnel (`wireguard`,
//! `vxlan`) are in others. A data center is a connected component of host-gw links; it is
//! named by the smallest IPv4 network holding its hosts' underlay addresses (at most a /8)
//! and ordered by that network.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use geomx_proto::v1::Host;
use ipnet::Ipv4Net;
use serde::Serialize;

/// One data center.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Site {
    /// Its underlay network (e.g. `10.1.1.0/24`), or `unknown` when no host has an IPv4
    /// underlay address.
    pub network: String,
    /// Its hosts, by name.
    pub hosts: Vec<String>,
}

/// The data centers of `hosts` (see the module docs).
pub fn sites(hosts: &[Host]) -> Vec<Site> {
    let names: BTreeSet<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    // union-find over host names
    let mut parent: BTreeMap<&str, &str> = names.iter().map(|n| (*n, *n)).collect();
    fn root<'a>(parent: &mut BTreeMap<&'a str, &'a str>, mut n: &'a str) -> &'a str {
        while let Some(&p) = parent.get(n) {
            if p == n {
                break;
            }
            n = p;
        }
        n
    }
    for h in hosts {
        for l in h.links.iter().filter(|l| l.backend == "host-gw") {
            if !names.contains(l.peer.as_str()) {
                continue;
            }
            let a = root(&mut parent, h.name.as_str());
            let b = root(&mut parent, l.peer.as_str());
            if a != b {
                let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                parent.insert(hi, lo);
            }
        }
    }
    let mut groups: BTreeMap<&str, Vec<&Host>> = BTreeMap::new();
    for h in hosts {
        let r = root(&mut parent, h.name.as_str());
        groups.entry(r).or_default().push(h);
    }
    let mut out: Vec<(Option<Ipv4Net>, Site)> = groups
        .into_values()
        .map(|members| {
            let ips: Vec<Ipv4Addr> = members
                .iter()
                .filter_map(|h| h.underlay_ip.parse().ok())
                .collect();
            let net = covering(&ips);
            let mut hosts: Vec<String> = members.iter().map(|h| h.name.clone()).collect();
            hosts.sort();
            let network = net.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
            (net, Site { network, hosts })
        })
        .collect();
    out.sort_by(|a, b| (a.0.is_none(), a.0, &a.1.hosts).cmp(&(b.0.is_none(), b.0, &b.1.hosts)));
    out.into_iter().map(|(_, s)| s).collect()
}

/// The smallest network (a /24 or wider, at most a /8) holding every address of `ips`.
fn covering(ips: &[Ipv4Addr]) -> Option<Ipv4Net> {
    let first = *ips.first()?;
    (8..=24)
        .rev()
        .filter_map(|prefix| Ipv4Net::new(first, prefix).ok().map(|n| n.trunc()))
        .find(|net| ips.iter().all(|ip| net.contains(ip)))
}

#[cfg(test)]
mod tests {
    use geomx_proto::v1::PeerLink;

    use super::*;

    fn host(name: &str, ip: &str, links: &[(&str, &str)]) -> Host {
        Host {
            name: name.into(),
            underlay_ip: ip.into(),
            links: links
                .iter()
                .map(|(peer, backend)| PeerLink {
                    peer: (*peer).into(),
                    backend: (*backend).into(),
                    ..PeerLink::default()
                })
                .collect(),
            ..Host::default()
        }
    }

    fn names(s: &[Site]) -> Vec<(String, Vec<String>)> {
        s.iter()
            .map(|s| (s.network.clone(), s.hosts.clone()))
            .collect()
    }

    #[test]
    fn host_gw_links_make_a_data_center_and_tunnels_separate_them() {
        type Want<'a> = Vec<(&'a str, Vec<&'a str>)>;
        let cases: Vec<(Vec<Host>, Want<'_>)> = vec![
            // three data centers, dc1 with two hosts
            (
                vec![
                    host("a", "10.1.1.34", &[("c", "host-gw"), ("b", "wireguard")]),
                    host("c", "10.1.1.35", &[("a", "host-gw"), ("b", "wireguard")]),
                    host("b", "10.2.1.29", &[("a", "wireguard"), ("d", "vxlan")]),
                    host("d", "10.3.1.9", &[("b", "vxlan")]),
                ],
                vec![
                    ("10.1.1.0/24", vec!["a", "c"]),
                    ("10.2.1.0/24", vec!["b"]),
                    ("10.3.1.0/24", vec!["d"]),
                ],
            ),
            // one flat network: a link reported by one side only is enough
            (
                vec![
                    host("x", "10.9.0.2", &[("y", "host-gw")]),
                    host("y", "10.9.3.2", &[]),
                ],
                vec![("10.9.0.0/22", vec!["x", "y"])],
            ),
            // no links yet (a fresh cluster): every host on its own; a link to an unknown
            // peer is ignored; an address that does not parse
            (
                vec![
                    host("p", "192.0.2.1", &[("gone", "host-gw")]),
                    host("q", "not-an-ip", &[]),
                ],
                vec![("192.0.2.0/24", vec!["p"]), ("unknown", vec!["q"])],
            ),
            (vec![], vec![]),
        ];
        for (i, (hosts, want)) in cases.into_iter().enumerate() {
            let want: Vec<(String, Vec<String>)> = want
                .into_iter()
                .map(|(n, h)| (n.to_owned(), h.into_iter().map(String::from).collect()))
                .collect();
            assert_eq!(names(&sites(&hosts)), want, "case {i}");
        }
    }
}
