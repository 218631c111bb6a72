//! Subnet leases: carving fixed-size host subnets out of the cluster CIDR.
//!
//! Pure decision logic; [`crate::membership`] persists the result. The rules, in order:
//! 1. a pinned subnet is honoured when it is a `/prefix` network inside the cluster CIDR and
//!    no other host holds it, and refused with the reason otherwise;
//! 2. a host that holds a lease keeps it (the same host gets the same subnet back across
//!    agent and controller restarts, and while it is lost);
//! 3. a host that held a subnet before (it left) gets it back if it is still free;
//! 4. otherwise the lowest free subnet, skipping the cluster's first subnet (whose first
//!    address is Docker's default bridge address, e.g. 172.17.0.1) unless it is the only one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Why a lease cannot be granted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The pinned subnet is another host's.
    #[error("pinned subnet {subnet} is leased to host {holder:?}")]
    PinnedTaken {
        /// The subnet.
        subnet: Ipv4Net,
        /// Its holder.
        holder: String,
    },
    /// The pinned subnet is not inside the cluster CIDR.
    #[error("pinned subnet {subnet} is outside the cluster CIDR {cluster}")]
    PinnedOutside {
        /// The subnet.
        subnet: Ipv4Net,
        /// The cluster CIDR.
        cluster: Ipv4Net,
    },
    /// The pinned subnet has the wrong size.
    #[error("pinned subnet {subnet} must be a /{prefix} (the controller's host_subnet_prefix)")]
    PinnedWrongPrefix {
        /// The subnet.
        subnet: Ipv4Net,
        /// The required prefix length.
        prefix: u8,
    },
    /// The pinned subnet has host bits set.
    #[error("pinned subnet {subnet} has host bits set; did you mean {network}?")]
    PinnedNotNetwork {
        /// The subnet as given.
        subnet: Ipv4Net,
        /// Its network.
        network: Ipv4Net,
    },
    /// Every subnet is leased.
    #[error(
        "no free /{prefix} left in {cluster}: all {total} subnets are leased (hosts that left release theirs; lost hosts keep them)"
    )]
    Exhausted {
        /// The cluster CIDR.
        cluster: Ipv4Net,
        /// Host subnet prefix.
        prefix: u8,
        /// Number of subnets in the pool.
        total: u64,
    },
}

/// The pool of host subnets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePool {
    cluster: Ipv4Net,
    prefix: u8,
}

impl LeasePool {
    /// A pool of `/prefix` subnets of `cluster` (validated by the configuration:
    /// `cluster.prefix_len() <= prefix <= 30`).
    pub fn new(cluster: Ipv4Net, prefix: u8) -> Self {
        LeasePool {
            cluster: cluster.trunc(),
            prefix,
        }
    }

    /// The cluster CIDR.
    pub fn cluster(&self) -> Ipv4Net {
        self.cluster
    }

    /// The host subnet prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of subnets in the pool.
    pub fn total(&self) -> u64 {
        1u64 << (self.prefix.saturating_sub(self.cluster.prefix_len()))
    }

    /// True when `subnet` is one of the pool's subnets.
    pub fn contains(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.prefix
            && subnet.trunc() == subnet
            && self.cluster.contains(&subnet)
    }

    /// The `index`-th subnet of the pool.
    fn nth(&self, index: u64) -> Option<Ipv4Net> {
        if index >= self.total() {
            return None;
        }
        let size = 1u64 << (32 - u32::from(self.prefix));
        let base = u64::from(u32::from(self.cluster.network()));
        let addr = u32::try_from(base + index * size).ok()?;
        Ipv4Net::new(Ipv4Addr::from(addr), self.prefix).ok()
    }

    /// Checks a pinned subnet's shape (not whether it is free).
    pub fn check_pinned(&self, subnet: Ipv4Net) -> Result<(), LeaseError> {
        if subnet.trunc() != subnet {
            return Err(LeaseError::PinnedNotNetwork {
                subnet,
                network: subnet.trunc(),
            });
        }
        if subnet.prefix_len() != self.prefix {
            return Err(LeaseError::PinnedWrongPrefix {
                subnet,
                prefix: self.prefix,
            });
        }
        if !self.cluster.contains(&subnet) {
            return Err(LeaseError::PinnedOutside {
                subnet,
                cluster: self.cluster,
            });
        }
        Ok(())
    }

    /// Chooses the subnet of `host`.
    ///
    /// * `held`: its current lease, if any;
    /// * `previous`: the subnet it last held (after leaving), if any;
    /// * `pinned`: the subnet its agent insists on, if any;
    /// * `leases`: every current lease (subnet → holder), including `host`'s own.
    pub fn choose(
        &self,
        host: &str,
        held: Option<Ipv4Net>,
        previous: Option<Ipv4Net>,
        pinned: Option<Ipv4Net>,
        leases: &BTreeMap<Ipv4Net, String>,
    ) -> Result<Ipv4Net, LeaseError> {
        let holder_of = |subnet: Ipv4Net| -> Option<&str> {
            leases
                .iter()
                .find(|(s, h)| h.as_str() != host && overlaps(**s, subnet))
                .map(|(_, h)| h.as_str())
        };
        if let Some(pinned) = pinned {
            self.check_pinned(pinned)?;
            if let Some(holder) = holder_of(pinned) {
                return Err(LeaseError::PinnedTaken {
                    subnet: pinned,
                    holder: holder.to_owned(),
                });
            }
            return Ok(pinned);
        }
        if let Some(held) = held.filter(|s| self.contains(*s) && holder_of(*s).is_none()) {
            return Ok(held);
        }
        if let Some(prev) = previous.filter(|s| self.contains(*s) && holder_of(*s).is_none()) {
            return Ok(prev);
        }
        let start = if self.total() > 1 { 1 } else { 0 };
        let mut index = start;
        while let Some(candidate) = self.nth(index) {
            if holder_of(candidate).is_none() {
                return Ok(candidate);
            }
            index += 1;
        }
        Err(LeaseError::Exhausted {
            cluster: self.cluster,
            prefix: self.prefix,
            total: self.total() - start,
        })
    }
}

/// True when two networks share an address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn pool() -> LeasePool {
        LeasePool::new(net("172.17.0.0/16"), 24)
    }

    fn leases(entries: &[(&str, &str)]) -> BTreeMap<Ipv4Net, String> {
        entries
            .iter()
            .map(|(s, h)| (net(s), (*h).to_owned()))
            .collect()
    }

    #[test]
    fn lowest_free_skipping_the_first() {
        let p = pool();
        let l = leases(&[]);
        assert_eq!(
            p.choose("a", None, None, None, &l),
            Ok(net("172.17.1.0/24"))
        );
        let l = leases(&[("172.17.1.0/24", "a"), ("172.17.3.0/24", "c")]);
        assert_eq!(
            p.choose("b", None, None, None, &l),
            Ok(net("172.17.2.0/24"))
        );
    }

    #[test]
    fn same_host_same_subnet() {
        let p = pool();
        let l = leases(&[("172.17.1.0/24", "a"), ("172.17.9.0/24", "b")]);
        let held = Some(net("172.17.9.0/24"));
        assert_eq!(
            p.choose("b", held, held, None, &l),
            Ok(net("172.17.9.0/24"))
        );
        // Left before: its previous subnet comes back while free.
        let l = leases(&[("172.17.1.0/24", "a")]);
        assert_eq!(
            p.choose("b", None, held, None, &l),
            Ok(net("172.17.9.0/24"))
        );
        // Taken meanwhile: the lowest free one.
        let l = leases(&[("172.17.1.0/24", "a"), ("172.17.9.0/24", "c")]);
        assert_eq!(
            p.choose("b", None, held, None, &l),
            Ok(net("172.17.2.0/24"))
        );
    }

    #[test]
    fn pinned_rules() {
        let p = pool();
        let l = leases(&[("172.17.5.0/24", "a")]);
        assert_eq!(
            p.choose("b", None, None, Some(net("172.17.7.0/24")), &l),
            Ok(net("172.17.7.0/24"))
        );
        // Its own lease is fine; a pin moves a host to a free subnet.
        assert_eq!(
            p.choose(
                "a",
                Some(net("172.17.5.0/24")),
                None,
                Some(net("172.17.5.0/24")),
                &l
            ),
            Ok(net("172.17.5.0/24"))
        );
        assert_eq!(
            p.choose(
                "a",
                Some(net("172.17.5.0/24")),
                None,
                Some(net("172.17.8.0/24")),
                &l
            ),
            Ok(net("172.17.8.0/24"))
        );
        assert_eq!(
            p.choose("b", None, None, Some(net("172.17.5.0/24")), &l),
            Err(LeaseError::PinnedTaken {
                subnet: net("172.17.5.0/24"),
                holder: "a".into()
            })
        );
        assert!(matches!(
            p.choose("b", None, None, Some(net("10.0.0.0/24")), &l),
            Err(LeaseError::PinnedOutside { .. })
        ));
        assert!(matches!(
            p.choose("b", None, None, Some(net("172.17.0.0/25")), &l),
            Err(LeaseError::PinnedWrongPrefix { .. })
        ));
        let err = p
            .choose("b", None, None, Some(net("172.17.6.1/24")), &l)
            .unwrap_err();
        assert!(
            err.to_string().contains("did you mean 172.17.6.0/24"),
            "{err}"
        );
        // The first subnet may be pinned explicitly.
        assert_eq!(
            p.choose("b", None, None, Some(net("172.17.0.0/24")), &l),
            Ok(net("172.17.0.0/24"))
        );
    }

    #[test]
    fn exhaustion() {
        let p = LeasePool::new(net("10.0.0.0/30"), 30);
        assert_eq!(p.total(), 1);
        let l = leases(&[]);
        assert_eq!(p.choose("a", None, None, None, &l), Ok(net("10.0.0.0/30")));
        let l = leases(&[("10.0.0.0/30", "a")]);
        let err = p.choose("b", None, None, None, &l).unwrap_err();
        assert!(
            matches!(err, LeaseError::Exhausted { total: 1, .. }),
            "{err}"
        );

        let p = LeasePool::new(net("10.0.0.0/22"), 24);
        let l = leases(&[
            ("10.0.1.0/24", "a"),
            ("10.0.2.0/24", "b"),
            ("10.0.3.0/24", "c"),
        ]);
        let err = p.choose("d", None, None, None, &l).unwrap_err();
        assert!(
            err.to_string().contains("all 3 subnets are leased"),
            "{err}"
        );
    }

    #[test]
    fn leases_from_another_prefix_still_block() {
        // After a prefix change, an old /24 lease blocks the /25s inside it.
        let p = LeasePool::new(net("172.17.0.0/16"), 25);
        let l = leases(&[("172.17.0.0/24", "old")]);
        assert_eq!(
            p.choose("a", None, None, None, &l),
            Ok(net("172.17.1.0/25"))
        );
        // A held lease that no longer fits the pool is replaced.
        let held = Some(net("172.17.9.0/24"));
        assert_eq!(
            p.choose("x", held, held, None, &leases(&[("172.17.9.0/24", "x")])),
            Ok(net("172.17.0.128/25"))
        );
    }

    #[test]
    fn contains_checks_shape() {
        let p = pool();
        assert!(p.contains(net("172.17.4.0/24")));
        assert!(!p.contains(net("172.17.4.0/25")));
        assert!(!p.contains(net("172.18.4.0/24")));
    }
}
