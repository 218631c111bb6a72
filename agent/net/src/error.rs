//! Errors of the host network reconciler.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;

/// A desired network state that cannot be applied as it is. Found before anything is
/// changed on the host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The host name (of this host or of a peer) is empty.
    #[error("{what}: the name is empty")]
    EmptyName {
        /// Which name.
        what: String,
    },
    /// A subnet is written with host bits set.
    #[error("{what} {net} is not a network address (did you mean {suggestion}?)")]
    NotNetworkAddress {
        /// Which subnet.
        what: String,
        /// As given.
        net: Ipv4Net,
        /// The network it lies in.
        suggestion: Ipv4Net,
    },
    /// A container subnet too small for a bridge address and containers.
    #[error("{what} {net} is too small: use a prefix of /30 or shorter")]
    SubnetTooSmall {
        /// Which subnet.
        what: String,
        /// As given.
        net: Ipv4Net,
    },
    /// A container subnet that does not lie inside the cluster CIDR.
    #[error("{what} {subnet} is outside the cluster CIDR {cluster}")]
    SubnetOutsideCluster {
        /// Which subnet ("this host's subnet", "peer b's subnet").
        what: String,
        /// The subnet.
        subnet: Ipv4Net,
        /// The cluster CIDR.
        cluster: Ipv4Net,
    },
    /// A peer whose subnet overlaps this host's own subnet.
    #[error("peer {peer}: its subnet {subnet} overlaps this host's subnet {own}")]
    PeerHasOwnSubnet {
        /// The peer.
        peer: String,
        /// Its subnet.
        subnet: Ipv4Net,
        /// This host's subnet.
        own: Ipv4Net,
    },
    /// Two peers whose subnets overlap.
    #[error(
        "peers {first} ({first_subnet}) and {second} ({second_subnet}) have overlapping subnets"
    )]
    OverlappingPeers {
        /// The first peer (in list order).
        first: String,
        /// Its subnet.
        first_subnet: Ipv4Net,
        /// The second peer.
        second: String,
        /// Its subnet.
        second_subnet: Ipv4Net,
    },
    /// The same peer name twice.
    #[error("peer {name} is listed more than once")]
    DuplicatePeer {
        /// The name.
        name: String,
    },
    /// A peer with this host's own name.
    #[error("peer {name} has the name of this host")]
    PeerIsThisHost {
        /// The name.
        name: String,
    },
    /// Two peers with the same underlay address.
    #[error("peers {first} and {second} have the same underlay address {ip}")]
    DuplicateUnderlay {
        /// The first peer.
        first: String,
        /// The second peer.
        second: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// A peer underlay address that cannot be a next hop.
    #[error("peer {peer}: {ip} cannot be an underlay address ({reason})")]
    BadUnderlay {
        /// The peer.
        peer: String,
        /// The address.
        ip: Ipv4Addr,
        /// Why not.
        reason: &'static str,
    },
}

/// Everything that can go wrong reconciling or cleaning up the host network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The desired state is invalid; nothing was changed.
    #[error("invalid desired network: {0}")]
    Invalid(#[from] ValidationError),
    /// daemon.json is not valid JSON.
    #[error("{path}: malformed JSON at line {line}, column {column}: {message}")]
    MalformedDaemonJson {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What serde_json said.
        message: String,
    },
    /// daemon.json is valid JSON but not an object.
    #[error("{path}: expected a JSON object at the top level, found {found}")]
    DaemonJsonNotObject {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        found: &'static str,
    },
    /// The Docker API does not answer (socket missing, daemon down).
    #[error("Docker at {host} is not reachable: {reason}")]
    DockerUnavailable {
        /// The Docker host address.
        host: String,
        /// Why.
        reason: String,
    },
    /// The Docker restart command failed.
    #[error("Docker restart command `{command}` failed ({status}): {stderr}")]
    DockerRestartFailed {
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Docker did not come back after a restart.
    #[error("Docker at {host} did not answer within {seconds:.0}s after `{command}`: {reason}")]
    DockerNotReady {
        /// The Docker host address.
        host: String,
        /// The restart command.
        command: String,
        /// How long we waited.
        seconds: f64,
        /// The last error.
        reason: String,
    },
    /// docker0 does not carry the bip address Docker was told to use.
    #[error(
        "docker0 carries {found} but {path} sets bip {expected}; Docker did not apply it (see the dockerd log)"
    )]
    Docker0Mismatch {
        /// The bip.
        expected: Ipv4Net,
        /// What docker0 carries ("no address", "no such link" or a list).
        found: String,
        /// daemon.json.
        path: PathBuf,
    },
    /// A peer's underlay address is not directly reachable.
    #[error(
        "peer {peer}: underlay address {ip} is not on a directly connected network ({detail}); \
         backend host-gw routes a peer's subnet via the peer's underlay address, which must be \
         on-link: use backend auto, wireguard or vxlan for peers in other networks"
    )]
    PeerNotOnLink {
        /// The peer.
        peer: String,
        /// Its underlay address.
        ip: Ipv4Addr,
        /// What the kernel's route lookup said.
        detail: String,
    },
    /// A route not made by geomx already covers a peer subnet exactly.
    #[error(
        "a route to {destination} not made by geomx exists ({existing}); geomx does not replace \
         routes it did not make: remove it (`ip route del {destination}`) or change the peer's subnet"
    )]
    RouteConflict {
        /// The peer subnet.
        destination: Ipv4Net,
        /// The existing route, described.
        existing: String,
    },
    /// A peer cannot be reached with the backend this host uses for it.
    #[error("peer {peer}: {reason}")]
    PeerUnreachable {
        /// The peer.
        peer: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A WireGuard operation failed.
    #[error("wireguard: {op}: {message}")]
    Wireguard {
        /// The operation (the command line).
        op: String,
        /// What it said.
        message: String,
    },
    /// A netlink request failed.
    #[error("netlink: {op}: {message}")]
    Netlink {
        /// The operation.
        op: String,
        /// The error.
        message: String,
    },
    /// An iptables command failed.
    #[error("iptables: {op}: {message}")]
    Iptables {
        /// The operation.
        op: String,
        /// The error.
        message: String,
    },
    /// A sysctl could not be read or written.
    #[error("sysctl {key}: {source}")]
    Sysctl {
        /// The key, e.g. `net.ipv4.ip_forward`.
        key: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The state file cannot be understood.
    #[error(
        "{path}: unreadable geomx state ({message}); move it away only if daemon.json needs no restoring"
    )]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Another geomx-agent process manages this host's network.
    #[error("{path} is locked: another geomx-agent manages this host's network{pid}")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// ", pid N" when known.
        pid: String,
    },
    /// A blocking task of the reconciler panicked or was cancelled.
    #[error("internal: {0}")]
    Internal(String),
}

impl NetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> NetError {
        NetError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, e: impl std::fmt::Display) -> NetError {
        NetError::Netlink {
            op: op.into(),
            message: e.to_string(),
        }
    }

    pub(crate) fn iptables(op: impl Into<String>, message: impl Into<String>) -> NetError {
        NetError::Iptables {
            op: op.into(),
            message: message.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = NetError> = std::result::Result<T, E>;
