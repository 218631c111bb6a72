//! The TCP ports listening in the agent's network namespace (for the controller's refusal
//! of a network "pseudo" job whose port is taken on its host).
//!
//! They are asked of the kernel through `NETLINK_SOCK_DIAG` with a state filter of LISTEN,
//! which walks only the kernel's table of listening sockets. `/proc/net/tcp{,6}`, the
//! fallback when netlink is refused, walks every TCP connection of every network namespace
//! on each read: on a busy host that made the once-a-heartbeat listing most of an idle
//! agent's CPU.

use std::collections::BTreeSet;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

/// The `st` column value of a listening socket.
const TCP_LISTEN: &str = "0A";

/// Receive buffer of a sock_diag dump: the kernel sends at most about a page per message
/// batch; 64 KiB holds any batch.
const RECV_BUFFER: usize = 64 * 1024;

/// Every TCP port with a listening socket in this process's network namespace (any local
/// address: all, loopback or a specific one), sorted. Through netlink, else from `/proc`;
/// unreadable sources count as empty.
pub fn listening_ports() -> Vec<u32> {
    match listening_ports_netlink() {
        Ok(ports) => ports,
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag refused, reading /proc/self/net/tcp");
            listening_ports_in(Path::new("/proc/self/net"))
        }
    }
}

/// [`listening_ports`] through `NETLINK_SOCK_DIAG`, IPv4 and IPv6, sorted.
pub fn listening_ports_netlink() -> std::io::Result<Vec<u32>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut ports = BTreeSet::new();
    for (family, id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        dump_listening(&mut socket, family, id, &mut ports)?;
    }
    Ok(ports.into_iter().collect())
}

/// Sends one sock_diag dump request for listening TCP sockets of `family` and adds their
/// local ports to `ports`.
fn dump_listening(
    socket: &mut Socket,
    family: u8,
    socket_id: SocketId,
    ports: &mut BTreeSet<u32>,
) -> std::io::Result<()> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0)?;

    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        if size == 0 {
            return Err(invalid(
                "sock_diag: the dump ended without NLMSG_DONE".into(),
            ));
        }
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|e| invalid(format!("sock_diag: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let port = u32::from(response.header.socket_id.source_port);
                    if port > 0 {
                        ports.insert(port);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
                }
                _ => {}
            }
            if length == 0 {
                return Err(invalid("sock_diag: a message of length 0".into()));
            }
            offset += length;
        }
    }
}

/// [`listening_ports`] from the `tcp` and `tcp6` files in `dir`.
pub fn listening_ports_in(dir: &Path) -> Vec<u32> {
    let mut ports = BTreeSet::new();
    for file in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
            ports.extend(parse_listening(&text));
        }
    }
    ports.into_iter().collect()
}

/// The local ports of the listening sockets in the text of a `/proc/net/tcp{,6}` file.
/// Lines that do not parse are skipped.
pub fn parse_listening(text: &str) -> BTreeSet<u32> {
    let mut ports = BTreeSet::new();
    for line in text.lines().skip(1) {
        let mut cols = line.split_whitespace();
        // "sl" "local_address" "rem_address" "st" ...
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (cols.next(), cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        if !state.eq_ignore_ascii_case(TCP_LISTEN) {
            continue;
        }
        let Some((_, port)) = local.rsplit_once(':') else {
            continue;
        };
        if let Ok(port) = u32::from_str_radix(port, 16)
            && port > 0
            && port <= 65_535
        {
            ports.insert(port);
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21456 1 0000000000000000 100 0 0 10 0
   1: 2201010A:1F0B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   2: 00000000:1F0C 00000000:0000 0a 00000000:00000000 00:00000000 00000000     0        0 31338 1 0000000000000000 100 0 0 10 0
   3: 2201010A:9C40 0101010A:1F0A 01 00000000:00000000 02:000A3F4B 00000000     0        0 41234 2 0000000000000000 20 4 30 10 -1
   4: garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 19088 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21457 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listening_sockets_of_tcp_and_tcp6() {
        // 0x0277 = 631 (loopback), 0x1F0B = 7947 (10.1.1.34), 0x1F0C = 7948 (all);
        // the established connection from port 0x9C40 is not listening
        assert_eq!(
            parse_listening(TCP).into_iter().collect::<Vec<_>>(),
            vec![631, 7947, 7948]
        );
        assert_eq!(
            parse_listening(TCP6).into_iter().collect::<Vec<_>>(),
            vec![22, 631]
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tcp"), TCP).expect("write");
        std::fs::write(dir.path().join("tcp6"), TCP6).expect("write");
        assert_eq!(listening_ports_in(dir.path()), vec![22, 631, 7947, 7948]);
        // a missing file (no IPv6) is empty
        std::fs::remove_file(dir.path().join("tcp6")).expect("rm");
        assert_eq!(listening_ports_in(dir.path()), vec![631, 7947, 7948]);
    }

    #[test]
    fn a_socket_listening_here_is_found_and_a_connected_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = u32::from(l.local_addr().expect("addr").port());
        let l6 = std::net::TcpListener::bind("[::1]:0").ok();
        let client = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let client_port = u32::from(client.local_addr().expect("addr").port());
        let netlink = listening_ports_netlink().expect("sock_diag");
        assert!(netlink.contains(&port), "{port} not in {netlink:?}");
        assert!(
            !netlink.contains(&client_port),
            "{client_port} in {netlink:?}"
        );
        if let Some(l6) = &l6 {
            let port6 = u32::from(l6.local_addr().expect("addr").port());
            assert!(netlink.contains(&port6), "{port6} not in {netlink:?}");
        }
        // the fallback sees it too
        assert!(listening_ports_in(Path::new("/proc/self/net")).contains(&port));
        assert!(listening_ports().contains(&port));
    }
}
