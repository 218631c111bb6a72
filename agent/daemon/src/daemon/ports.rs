//! The TCP ports listening in the agent's network namespace, from `/proc/net/tcp` and
//! `/proc/net/tcp6` (for the controller's refusal of a network "pseudo" job whose port is
//! taken on its host).

use std::collections::BTreeSet;
use std::path::Path;

/// The `st` column value of a listening socket.
const TCP_LISTEN: &str = "0A";

/// Every TCP port with a listening socket in this process's network namespace (any local
/// address: all, loopback or a specific one), sorted. Unreadable files count as empty.
pub fn listening_ports() -> Vec<u32> {
    listening_ports_in(Path::new("/proc/self/net"))
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
    fn a_socket_listening_here_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = u32::from(l.local_addr().expect("addr").port());
        assert!(listening_ports().contains(&port));
    }
}
