//! The seam between the decision logic and the host: traits for routes, firewall, sysctls,
//! Docker and files, with real implementations in [`crate::system`] and in-memory ones in
//! [`crate::fake`].
//!
//! Routes and Docker are asynchronous (netlink, the Docker API); the firewall, sysctls and
//! files are synchronous (the firewall is run on a blocking thread by the reconciler).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The kind of a route, as far as geomx cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// A gateway or direct route.
    Unicast,
    /// An address of this host.
    Local,
    /// Anything else (blackhole, unreachable, broadcast ...).
    Other,
}

/// An IPv4 route of the kernel's main table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRoute {
    /// Destination network (`0.0.0.0/0` for the default route).
    pub destination: Ipv4Net,
    /// Next hop, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Output device name, when known.
    pub device: Option<String>,
    /// Route protocol (`proto` in `ip route`); geomx's routes carry
    /// [`crate::ROUTE_PROTOCOL`].
    pub protocol: u8,
    /// Metric (priority).
    pub metric: u32,
    /// Route type.
    pub kind: RouteKind,
}

impl fmt::Display for KernelRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(dev) = &self.device {
            write!(f, " dev {dev}")?;
        }
        write!(f, " proto {}", protocol_name(self.protocol))?;
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        Ok(())
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        2 => "kernel".into(),
        3 => "boot".into(),
        4 => "static".into(),
        16 => "dhcp".into(),
        other => other.to_string(),
    }
}

/// A route geomx wants, in the main table with protocol [`crate::ROUTE_PROTOCOL`] and metric
/// 0: a peer's subnet via the peer's underlay address (host-gw), through a device
/// (WireGuard), or via the peer's VTEP address on the VXLAN device (`onlink`); through a
/// device, this host's docker0 address is the source of its own packets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoute {
    /// The peer's subnet.
    pub destination: Ipv4Net,
    /// The peer's underlay address (host-gw).
    pub gateway: Option<Ipv4Addr>,
    /// The output device (WireGuard).
    pub device: Option<String>,
    /// The preferred source address.
    pub source: Option<Ipv4Addr>,
    /// The gateway is on the device even though no address of the device covers it
    /// (`onlink`: VXLAN's peer VTEP addresses).
    #[serde(default)]
    pub onlink: bool,
}

impl PeerRoute {
    /// Whether the kernel's `route` is this one (destination, next hop or device, metric 0,
    /// unicast).
    pub fn matches(&self, route: &KernelRoute) -> bool {
        route.destination == self.destination
            && route.gateway == self.gateway
            && (self.device.is_none() || route.device == self.device)
            && route.metric == 0
            && route.kind == RouteKind::Unicast
    }

    /// The next hop as `ip route` would say it (`via 10.1.1.29`, `dev geomx-wg`,
    /// `via 172.17.29.0 dev geomx-vxlan onlink`).
    pub fn via(&self) -> String {
        match (&self.gateway, &self.device) {
            (Some(gw), Some(dev)) if self.onlink => format!("via {gw} dev {dev} onlink"),
            (Some(gw), _) => format!("via {gw}"),
            (None, Some(dev)) => format!("dev {dev}"),
            (None, None) => "nowhere".into(),
        }
    }
}

/// Routes and addresses (netlink).
pub trait Routes: Send + Sync {
    /// Every IPv4 route of the main table (all protocols).
    fn main_table(&self) -> BoxFuture<'_, Result<Vec<KernelRoute>>>;
    /// Adds `route`, replacing a route with the same destination and metric
    /// (`NLM_F_REPLACE`).
    fn replace(&self, route: PeerRoute) -> BoxFuture<'_, Result<()>>;
    /// Deletes a geomx route (matched on destination, gateway and protocol).
    fn delete(&self, route: KernelRoute) -> BoxFuture<'_, Result<()>>;
    /// The route the kernel would use to reach `ip` (`ip route get`); `None` when
    /// unreachable.
    fn lookup(&self, ip: Ipv4Addr) -> BoxFuture<'_, Result<Option<KernelRoute>>>;
    /// The IPv4 addresses of the link `name`; `None` when there is no such link.
    fn link_addresses(&self, name: String) -> BoxFuture<'_, Result<Option<Vec<Ipv4Net>>>>;
}

/// One iptables rule as the words of its specification (without `-A CHAIN`), e.g.
/// `["-s", "172.17.0.0/16", "-j", "ACCEPT"]`. Words are compared as they are, so a rule
/// written by geomx must be in the canonical form `iptables -S` prints.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleSpec(pub Vec<String>);

impl RuleSpec {
    /// A rule from its words.
    pub fn new<S: AsRef<str>>(words: &[S]) -> RuleSpec {
        RuleSpec(words.iter().map(|w| w.as_ref().to_string()).collect())
    }

    /// Splits a rule as `iptables -S` prints it (double quotes group words; `\"` and `\\`
    /// are escapes inside them).
    pub fn parse(text: &str) -> RuleSpec {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        let mut quoted = false;
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => {
                    quoted = !quoted;
                    in_word = true;
                }
                '\\' if quoted => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                c if c.is_whitespace() && !quoted => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                c => {
                    cur.push(c);
                    in_word = true;
                }
            }
        }
        if in_word {
            words.push(cur);
        }
        RuleSpec(words)
    }

    /// The target of the rule (the word after `-j`), if any.
    pub fn target(&self) -> Option<&str> {
        self.0
            .iter()
            .position(|w| w == "-j")
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    /// The words.
    pub fn words(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for RuleSpec {
    /// The rule as one line, words with spaces in double quotes (how `iptables -S` prints
    /// them, and how the iptables crate splits them again).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, w) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            if w.is_empty() || w.contains(char::is_whitespace) {
                write!(f, "\"{w}\"")?;
            } else {
                f.write_str(w)?;
            }
        }
        Ok(())
    }
}

/// iptables: read one chain at a time, change a whole table at once. Synchronous: the
/// reconciler calls it from a blocking thread.
pub trait Firewall: Send + Sync {
    /// Whether `chain` exists in `table`.
    fn chain_exists(&self, table: &str, chain: &str) -> Result<bool>;
    /// The rules of an existing chain, in order.
    fn list_rules(&self, table: &str, chain: &str) -> Result<Vec<RuleSpec>>;
    /// Applies `payload` (iptables-restore's format: `*table`, chain lines, commands,
    /// `COMMIT`) with `iptables-restore --noflush`: one atomic transaction per table,
    /// chains it does not name are left as they are. A payload that fails changes nothing.
    fn restore(&self, payload: &str) -> Result<()>;
    /// Whether `MASQUERADE --random-fully` is worth trying.
    fn supports_random_fully(&self) -> bool;
}

/// Kernel parameters (`/proc/sys`).
pub trait Sysctl: Send + Sync {
    /// Reads a parameter (`net.ipv4.ip_forward`), trimmed.
    fn read(&self, key: &str) -> Result<String>;
    /// Writes a parameter.
    fn write(&self, key: &str, value: &str) -> Result<()>;
}

/// What the Docker engine says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerVersion {
    /// Engine version, e.g. `20.10.24+dfsg1` or `28.0.1`.
    pub version: String,
    /// API version, e.g. `1.41`.
    pub api_version: String,
}

impl DockerVersion {
    /// The engine's major version, if it parses.
    pub fn major(&self) -> Option<u32> {
        let digits: String = self
            .version
            .trim_start_matches('v')
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    }

    /// Docker 28 and newer drop packets routed directly to container addresses unless
    /// daemon.json sets `"allow-direct-routing": true`.
    pub fn needs_allow_direct_routing(&self) -> bool {
        self.major().is_some_and(|m| m >= 28)
    }
}

/// The Docker daemon: its API and its restart command.
pub trait DockerDaemon: Send + Sync {
    /// The Docker host address, for messages.
    fn host(&self) -> &str;
    /// The engine version; an error when the API does not answer.
    fn version(&self) -> BoxFuture<'_, Result<DockerVersion>>;
    /// Runs the configured restart command (returns when the command has exited).
    fn restart(&self) -> BoxFuture<'_, Result<()>>;
    /// The restart command, for messages.
    fn restart_command(&self) -> &str;
}

/// Docker's daemon.json.
pub trait DaemonConfig: Send + Sync {
    /// Its path, for messages.
    fn path(&self) -> &Path;
    /// Its text; `None` when the file does not exist.
    fn read(&self) -> Result<Option<String>>;
    /// Replaces it atomically (temporary file, fsync, rename).
    fn write(&self, text: &str) -> Result<()>;
    /// Removes it (no error when it is absent).
    fn remove(&self) -> Result<()>;
}

/// The agent's own state file: what daemon.json held before geomx changed it.
pub trait StateStore: Send + Sync {
    /// Its path, for messages.
    fn path(&self) -> &Path;
    /// Its text; `None` when there is none.
    fn read(&self) -> Result<Option<String>>;
    /// Replaces it atomically.
    fn write(&self, text: &str) -> Result<()>;
    /// Removes it (no error when it is absent).
    fn remove(&self) -> Result<()>;
}

/// A WireGuard peer as configured on (or wanted for) [`crate::backend::WG_INTERFACE`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WgPeerConfig {
    /// Its public key (base64).
    pub public_key: String,
    /// Its endpoint (underlay address and port).
    pub endpoint: Option<std::net::SocketAddrV4>,
    /// Its allowed IPs: the peer's container subnet.
    pub allowed_ips: Vec<Ipv4Net>,
}

/// The WireGuard interface as the kernel (or wireguard-go) has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgDevice {
    /// Its public key.
    pub public_key: String,
    /// Its listen port.
    pub listen_port: u16,
    /// Its peers.
    pub peers: Vec<WgPeerConfig>,
    /// Seconds since each peer's latest handshake, by public key (`None`: never).
    pub handshakes: Vec<(String, Option<u64>)>,
}

/// How the WireGuard interface is implemented on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WgImplementation {
    /// The kernel's module (netlink).
    Kernel,
    /// `wireguard-go`, in user space (no module; the lab's machines).
    Userspace,
}

/// WireGuard on this host: the key pair, the interface and its peers. Synchronous: the
/// reconciler calls it from a blocking thread.
pub trait Wireguard: Send + Sync {
    /// The public key of the private key in `key_file`, making a key pair first (file mode
    /// 0600) when there is none.
    fn ensure_key(&self, key_file: &Path) -> Result<String>;
    /// Makes a new private key in `key_file` (replacing the old one atomically) and returns
    /// its public key.
    fn rotate_key(&self, key_file: &Path) -> Result<String>;
    /// The interface `name` and its configuration; `None` when it does not exist.
    fn show(&self, name: &str) -> Result<Option<WgDevice>>;
    /// Creates the interface `name` (kernel module, else wireguard-go) with `mtu`, up.
    fn create(&self, name: &str, mtu: u32) -> Result<WgImplementation>;
    /// Sets the interface's private key (from `key_file`) and listen port.
    fn configure(&self, name: &str, key_file: &Path, port: u16) -> Result<()>;
    /// Adds or updates a peer (endpoint, allowed IPs, keepalive).
    fn set_peer(&self, name: &str, peer: &WgPeerConfig, keepalive: u16) -> Result<()>;
    /// Removes a peer.
    fn remove_peer(&self, name: &str, public_key: &str) -> Result<()>;
    /// Deletes the interface (and stops wireguard-go behind it).
    fn delete(&self, name: &str) -> Result<()>;
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A VXLAN device's settings, as wanted or as the kernel has them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanSpec {
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Source address of the encapsulated packets (`None`: the kernel picks it per packet
    /// from the route to the peer).
    pub local: Option<Ipv4Addr>,
    /// The device's MAC address (the peers' FDB and neighbour entries point at it).
    pub mac: Mac,
    /// Its MTU.
    pub mtu: u32,
}

/// A static forwarding entry of a VXLAN device: frames for `mac` go to `dst` (`bridge fdb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FdbEntry {
    /// The peer's VTEP MAC.
    pub mac: Mac,
    /// The peer's underlay address.
    pub dst: Ipv4Addr,
}

/// A permanent neighbour entry on a VXLAN device: `ip` is at `mac` (`ip neigh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NeighEntry {
    /// The peer's VTEP address (the network address of its subnet).
    pub ip: Ipv4Addr,
    /// The peer's VTEP MAC.
    pub mac: Mac,
}

/// A VXLAN device as the kernel has it, with its static entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanDevice {
    /// Its settings (`None` fields the kernel did not report are taken as different).
    pub spec: VxlanSpec,
    /// Whether it is up.
    pub up: bool,
    /// Its static FDB entries with a destination.
    pub fdb: Vec<FdbEntry>,
    /// Its permanent IPv4 neighbour entries.
    pub neighbours: Vec<NeighEntry>,
}

/// VXLAN devices and their static entries (netlink).
pub trait Vxlan: Send + Sync {
    /// The device `name`; `None` when there is none. An error when a link of that name
    /// exists but is not a VXLAN device.
    fn show(&self, name: &str) -> BoxFuture<'_, Result<Option<VxlanDevice>>>;
    /// Creates the device `name` (learning off, no multicast group) and sets it up.
    fn create(&self, name: &str, spec: &VxlanSpec) -> BoxFuture<'_, Result<()>>;
    /// Deletes the device (no error when it is absent).
    fn delete(&self, name: &str) -> BoxFuture<'_, Result<()>>;
    /// Adds or replaces a static FDB entry.
    fn fdb_set(&self, name: &str, entry: FdbEntry) -> BoxFuture<'_, Result<()>>;
    /// Deletes an FDB entry.
    fn fdb_delete(&self, name: &str, entry: FdbEntry) -> BoxFuture<'_, Result<()>>;
    /// Adds or replaces a permanent neighbour entry.
    fn neigh_set(&self, name: &str, entry: NeighEntry) -> BoxFuture<'_, Result<()>>;
    /// Deletes a neighbour entry.
    fn neigh_delete(&self, name: &str, entry: NeighEntry) -> BoxFuture<'_, Result<()>>;
}

/// Everything the reconciler touches on a host.
#[derive(Clone)]
pub struct Kernel {
    /// Routes and addresses.
    pub routes: Arc<dyn Routes>,
    /// iptables.
    pub firewall: Arc<dyn Firewall>,
    /// /proc/sys.
    pub sysctl: Arc<dyn Sysctl>,
    /// The Docker daemon.
    pub docker: Arc<dyn DockerDaemon>,
    /// daemon.json.
    pub daemon_config: Arc<dyn DaemonConfig>,
    /// The state file.
    pub state: Arc<dyn StateStore>,
    /// WireGuard.
    pub wireguard: Arc<dyn Wireguard>,
    /// VXLAN.
    pub vxlan: Arc<dyn Vxlan>,
}

impl fmt::Debug for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel")
            .field("docker", &self.docker.host())
            .field("daemon_json", &self.daemon_config.path())
            .field("state", &self.state.path())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_through_iptables_quoting() {
        let line = r#"-s 172.17.0.0/16 -m comment --comment "geomx: cluster traffic" -j RETURN"#;
        let r = RuleSpec::parse(line);
        assert_eq!(
            r.words(),
            [
                "-s",
                "172.17.0.0/16",
                "-m",
                "comment",
                "--comment",
                "geomx: cluster traffic",
                "-j",
                "RETURN"
            ]
        );
        assert_eq!(r.to_string(), line);
        assert_eq!(r.target(), Some("RETURN"));
        assert_eq!(
            RuleSpec::parse(r#"--comment "a \"b\" c" -j X"#).words(),
            ["--comment", "a \"b\" c", "-j", "X"]
        );
        assert_eq!(RuleSpec::parse("-m comment --comment geomx-x").0.len(), 4);
    }

    #[test]
    fn docker_major_versions_parse() {
        let v = |s: &str| DockerVersion {
            version: s.into(),
            api_version: "1.41".into(),
        };
        assert_eq!(v("20.10.24+dfsg1").major(), Some(20));
        assert!(!v("20.10.24+dfsg1").needs_allow_direct_routing());
        assert!(v("28.0.1").needs_allow_direct_routing());
        assert!(v("v29.1").needs_allow_direct_routing());
        assert_eq!(v("dev").major(), None);
    }
}
