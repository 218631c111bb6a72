//! The static host file of `geomx-agent network apply --config host.toml`: this host's
//! subnet, the cluster CIDR and the peers, without a controller.
//!
//! ```toml
//! name = "a"                  # this host (default: --host-name, else the kernel hostname)
//! subnet = "172.17.34.0/24"   # this host's container subnet; docker0 gets 172.17.34.1/24
//! cluster = "172.17.0.0/16"   # every host's subnet lies inside it
//!
//! [[peers]]
//! name = "b"
//! underlay_ip = "10.1.1.29"
//! subnet = "172.17.29.0/24"
//! ```

use std::path::Path;

use anyhow::Context;
use geomx_net::{DesiredNetwork, Peer};
use ipnet::Ipv4Net;
use serde::Deserialize;

/// host.toml.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    /// This host's name.
    pub name: Option<String>,
    /// This host's container subnet.
    pub subnet: Ipv4Net,
    /// The cluster CIDR.
    pub cluster: Ipv4Net,
    /// The other hosts.
    #[serde(default)]
    pub peers: Vec<Peer>,
}

impl HostFile {
    /// Reads and parses `path` (errors name the file, line and column).
    pub fn load(path: &Path) -> anyhow::Result<HostFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        HostFile::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses the text of a host file.
    pub fn parse(text: &str) -> anyhow::Result<HostFile> {
        Ok(toml::from_str(text)?)
    }

    /// The desired network it describes.
    pub fn desired(&self) -> DesiredNetwork {
        DesiredNetwork {
            subnet: self.subnet,
            cluster: self.cluster,
            peers: self.peers.clone(),
            backend: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_host_file_parses() {
        let f = HostFile::parse(
            r#"
name = "a"
subnet = "172.17.34.0/24"
cluster = "172.17.0.0/16"

[[peers]]
name = "b"
underlay_ip = "10.1.1.29"
subnet = "172.17.29.0/24"
"#,
        )
        .expect("parses");
        assert_eq!(f.name.as_deref(), Some("a"));
        let d = f.desired();
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.bip().to_string(), "172.17.34.1/24");
    }

    #[test]
    fn mistakes_are_reported_with_their_place() {
        let e = HostFile::parse(
            "subnet = \"172.17.34.0/24\"\ncluster = \"172.17.0.0/16\"\nsubnett = 1\n",
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("unknown field `subnett`"), "{msg}");
        let e = HostFile::parse("subnet = \"172.17.34.0/33\"\ncluster = \"172.17.0.0/16\"\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    }
}
