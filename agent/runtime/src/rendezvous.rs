//! A scheduler's rendezvous, as far as this host can see it.
//!
//! Two sources, both read by the agent:
//! - the scheduler's own ps-lite output with `PS_VERBOSE=1` (geomx sets it on schedulers),
//!   in GeoMX's `3rdparty/ps-lite/src/van.cc`: once every expected node has registered,
//!   one `assign id=9 to node role=worker, ip=172.17.34.5, port=45123, is_recovery=0` per
//!   node and `the scheduler is connected to 2 workers and 1 servers` (the global
//!   scheduler: `... connected to 2 servers and 1 global servers`); while it waits, the
//!   global scheduler logs `add node` and `K--N` for each registration (K of N), a local
//!   scheduler nothing at all. Lines carry dmlc's prefix (`[12:00:01] src/van.cc:60: `).
//!   Upstream ps-lite (plain MXNet, mode `ps`) says `assign rank=` for `assign id=`;
//! - the TCP connections to the scheduler's port, from `/proc/<pid>/net/tcp` of its
//!   process: a ps-lite node connects to its scheduler (and stays connected, ZeroMQ) right
//!   before it sends its registration, so the peers connected are the nodes that reached
//!   it — this is what names the nodes a local scheduler still waits for.
//!
//! Everything kept is bounded ([`MAX_REGISTRATIONS`], [`MAX_FIELD`]).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// At most this many registrations and connected peers are kept per scheduler.
pub const MAX_REGISTRATIONS: usize = 256;
/// Longest role or address kept (longer ones are cut).
pub const MAX_FIELD: usize = 64;

/// One node's registration, as a scheduler logged it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// ps-lite's role name: `worker`, `server`, `global server`.
    pub role: String,
    /// The address the node advertised.
    pub ip: String,
    /// The port it bound.
    pub port: u32,
}

/// What is known of one scheduler's rendezvous.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendezvous {
    /// The registrations the scheduler logged (`assign id=...`), in order.
    pub registered: Vec<Registration>,
    /// The scheduler logged that every expected node is connected.
    pub complete: bool,
    /// Registrations counted while waiting (the global scheduler's `K--N`: K), if logged.
    pub count: u32,
    /// The registrations expected (N of `K--N`), 0 if not logged.
    pub expected: u32,
    /// The IPv4 addresses with a TCP connection to the scheduler's port, sorted (see the
    /// module docs).
    pub connected: Vec<String>,
}

/// One line of a scheduler's ps-lite output that tells about its rendezvous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PsLine {
    /// `assign id=N to node role=R, ip=I, port=P, ...`.
    Assigned(Registration),
    /// `the scheduler is connected to N workers and M servers` (or `... servers and M
    /// global servers`).
    Connected,
    /// The global scheduler's `K--N`.
    Count(u32, u32),
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The message of a dmlc log line (`[12:00:01] src/van.cc:60: message`), or the line.
fn message(line: &str) -> &str {
    let rest = line.trim();
    if let Some(after) = rest.strip_prefix('[')
        && let Some((_, tail)) = after.split_once("] ")
        && let Some((place, msg)) = tail.split_once(": ")
        && place.contains(':')
        && !place.contains(' ')
    {
        return msg.trim();
    }
    rest
}

/// Parses one line of ps-lite output (see the module docs); `None` for any other line.
pub fn parse_ps_line(line: &str) -> Option<PsLine> {
    let msg = message(line);
    // GeoMX's ps-lite says `assign id=`, upstream ps-lite (plain MXNet) `assign rank=`
    if let Some(rest) = msg
        .strip_prefix("assign id=")
        .or_else(|| msg.strip_prefix("assign rank="))
    {
        let (_, node) = rest.split_once(" to node ")?;
        let mut reg = Registration::default();
        for field in node.split(", ") {
            match field.split_once('=') {
                Some(("role", v)) => reg.role = cut(v),
                Some(("ip", v)) => reg.ip = cut(v),
                Some(("port", v)) => reg.port = v.trim().parse().ok()?,
                _ => {}
            }
        }
        return (!reg.role.is_empty() && !reg.ip.is_empty()).then_some(PsLine::Assigned(reg));
    }
    if msg.starts_with("the scheduler is connected to ") {
        return Some(PsLine::Connected);
    }
    let (k, n) = msg.split_once("--")?;
    Some(PsLine::Count(k.parse().ok()?, n.parse().ok()?))
}

impl Rendezvous {
    /// Takes one line of the scheduler's output into account; whether anything changed.
    pub fn observe(&mut self, line: &str) -> bool {
        match parse_ps_line(line) {
            Some(PsLine::Assigned(reg)) => {
                if self.registered.len() >= MAX_REGISTRATIONS || self.registered.contains(&reg) {
                    return false;
                }
                self.registered.push(reg);
                true
            }
            Some(PsLine::Connected) => !std::mem::replace(&mut self.complete, true),
            Some(PsLine::Count(k, n)) => {
                let changed = (self.count, self.expected) != (k, n);
                self.count = k;
                self.expected = n;
                changed
            }
            None => false,
        }
    }

    /// Sets the peers connected to the scheduler's port; whether they changed.
    pub fn set_connected(&mut self, mut peers: Vec<Ipv4Addr>) -> bool {
        peers.sort_unstable();
        peers.dedup();
        peers.truncate(MAX_REGISTRATIONS);
        let peers: Vec<String> = peers.into_iter().map(|p| p.to_string()).collect();
        if peers == self.connected {
            return false;
        }
        self.connected = peers;
        true
    }
}

/// The remote IPv4 addresses of the established TCP connections to local port `port` in
/// the text of a `/proc/<pid>/net/tcp` file.
pub fn established_peers(proc_net_tcp: &str, port: u16) -> Vec<Ipv4Addr> {
    // "  sl  local_address rem_address   st ..." then e.g.
    // "   0: 0522A8C0:2385 0322A8C0:B0F2 01 ..." (addresses little-endian hex, st 01 =
    // ESTABLISHED)
    let addr = |s: &str| -> Option<(Ipv4Addr, u16)> {
        let (ip, port) = s.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some((Ipv4Addr::from(ip.swap_bytes()), port))
    };
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            let (_, local_port) = addr(f.next()?)?;
            let (remote, _) = addr(f.next()?)?;
            let established = f.next()? == "01";
            (established && local_port == port).then_some(remote)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // lines as GeoMX's ps-lite prints them with PS_VERBOSE=1 (van.cc; Node::DebugString in
    // include/ps/internal/message.h; dmlc's log prefix)
    const LOCAL: &[&str] = &[
        "[09:14:02] src/van.cc:481: Bind to role=scheduler, id=1, ip=172.17.34.2, port=9094, is_recovery=0",
        "[09:14:09] src/van.cc:60: assign id=8 to node role=server, ip=172.17.35.3, port=50123, is_recovery=0",
        "[09:14:09] src/van.cc:60: assign id=9 to node role=worker, ip=172.17.35.4, port=41877, is_recovery=0",
        "[09:14:09] src/van.cc:60: assign id=11 to node role=worker, ip=172.17.36.2, port=38011, is_recovery=0",
        "[09:14:09] src/van.cc:85: the scheduler is connected to 2 workers and 1 servers",
    ];
    const GLOBAL: &[&str] = &[
        "[09:14:03] src/van.cc:256: add node",
        "[09:14:03] src/van.cc:105: 1--3",
        "[09:14:05] src/van.cc:256: add node",
        "[09:14:05] src/van.cc:105: 2--3",
        "[09:14:09] src/van.cc:105: 3--3",
        "[09:14:09] src/van.cc:121: assign id=8 to node role=global server, ip=172.17.34.3, port=40001, is_recovery=0",
        "[09:14:09] src/van.cc:121: assign id=9 to node role=server, ip=172.17.35.3, port=40417, is_recovery=0udp[channel 1] port = 40418",
        "[09:14:09] src/van.cc:144: the scheduler is connected to 2 servers and 1 global servers",
    ];

    #[test]
    fn a_local_scheduler_names_its_nodes_once_complete() {
        let mut r = Rendezvous::default();
        assert!(!r.observe(LOCAL[0]), "its own bind line says nothing");
        for l in &LOCAL[1..4] {
            assert!(r.observe(l), "{l}");
        }
        assert!(!r.complete);
        assert!(r.observe(LOCAL[4]));
        assert!(r.complete);
        assert_eq!(
            r.registered,
            [
                Registration {
                    role: "server".into(),
                    ip: "172.17.35.3".into(),
                    port: 50123
                },
                Registration {
                    role: "worker".into(),
                    ip: "172.17.35.4".into(),
                    port: 41877
                },
                Registration {
                    role: "worker".into(),
                    ip: "172.17.36.2".into(),
                    port: 38011
                },
            ]
        );
        assert!(!r.observe(LOCAL[1]), "a line seen again changes nothing");
    }

    #[test]
    fn the_global_scheduler_counts_while_it_waits() {
        let mut r = Rendezvous::default();
        for l in &GLOBAL[..4] {
            r.observe(l);
        }
        assert_eq!((r.count, r.expected, r.complete), (2, 3, false));
        for l in &GLOBAL[4..] {
            r.observe(l);
        }
        assert_eq!((r.count, r.expected, r.complete), (3, 3, true));
        let roles: Vec<(&str, &str)> = r
            .registered
            .iter()
            .map(|g| (g.role.as_str(), g.ip.as_str()))
            .collect();
        assert_eq!(
            roles,
            [("global server", "172.17.34.3"), ("server", "172.17.35.3")]
        );
    }

    #[test]
    fn other_lines_and_bad_ones_are_ignored_and_kept_bounded() {
        for l in [
            "psnode scheduler 172.17.34.2:9094: registered worker 1/2",
            "[Time 1.2][Epoch 0][Iteration 3] Test Acc 0.5",
            "assign id=9 to node role=worker, ip=1.2.3.4, port=notaport, is_recovery=0",
            "a--b",
            "",
        ] {
            assert_eq!(parse_ps_line(l), None, "{l}");
        }
        // upstream ps-lite (dmlc/ps-lite van.cc, plain MXNet)
        assert_eq!(
            parse_ps_line(
                "[10:00:00] src/van.cc:87: assign rank=9 to node role=worker, ip=10.0.0.5, port=41001, is_recovery=0"
            ),
            Some(PsLine::Assigned(Registration {
                role: "worker".into(),
                ip: "10.0.0.5".into(),
                port: 41001
            }))
        );
        // without dmlc's prefix too
        assert_eq!(
            parse_ps_line("the scheduler is connected to 1 workers and 1 servers"),
            Some(PsLine::Connected)
        );
        let mut r = Rendezvous::default();
        let long = "9".repeat(500);
        for i in 0..(MAX_REGISTRATIONS + 10) {
            r.observe(&format!(
                "assign id={i} to node role=worker, ip=10.0.{}.{}{long}, port={i}, is_recovery=0",
                i / 256,
                i % 256
            ));
        }
        assert_eq!(r.registered.len(), MAX_REGISTRATIONS);
        assert!(r.registered.iter().all(|g| g.ip.len() <= MAX_FIELD));
    }

    #[test]
    fn established_connections_to_the_port_from_proc_net_tcp() {
        // 192.168.34.5:9093 listening; 192.168.34.3 and .4 connected; one outgoing
        // connection from a random port; one closing
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0522A8C0:2385 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0522A8C0:2385 0322A8C0:B0F2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0522A8C0:2385 0422A8C0:9C41 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   3: 0522A8C0:D431 0622A8C0:2385 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 20 4 30 10 -1
   4: 0522A8C0:2385 0722A8C0:9C42 06 00000000:00000000 00:00000000 00000000     0        0 0 0 0000000000000000 20 4 30 10 -1
";
        assert_eq!(
            established_peers(text, 9093),
            [
                Ipv4Addr::new(192, 168, 34, 3),
                Ipv4Addr::new(192, 168, 34, 4)
            ]
        );
        assert!(established_peers("garbage\nmore garbage", 9093).is_empty());
        let mut r = Rendezvous::default();
        assert!(r.set_connected(established_peers(text, 9093)));
        assert!(!r.set_connected(established_peers(text, 9093)));
        assert_eq!(r.connected, ["192.168.34.3", "192.168.34.4"]);
    }
}
