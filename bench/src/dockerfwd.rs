//! Docker's API over the lab's links: a TCP listener in a host's namespace (on its underlay
//! address) that forwards every connection to the host's dockerd socket, so that a `docker -H
//! tcp://...` client in another namespace (the controller's data center) crosses the same
//! routers, delays and rates as the controller's traffic to the agents.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use geomx_lab::Netns;

/// The port the forwarders listen on (Docker's conventional plaintext port).
pub const PORT: u16 = 2375;

/// One forwarder; stops when dropped.
pub struct Forwarder {
    addr: SocketAddr,
    ns: Netns,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `addr` inside `ns` and forwards to the Unix socket `socket`.
    pub fn start(ns: &Netns, addr: SocketAddr, socket: PathBuf) -> anyhow::Result<Forwarder> {
        let listener: TcpListener = ns
            .listen_tcp(addr)
            .with_context(|| format!("listening on {addr} for dockerd's API"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                let _ = tcp.set_nodelay(true);
                let socket = socket.clone();
                std::thread::spawn(move || {
                    if let Ok(unix) = UnixStream::connect(&socket) {
                        splice(tcp, unix);
                    }
                });
            }
        });
        Ok(Forwarder {
            addr,
            ns: ns.clone(),
            stop,
            thread: Some(thread),
        })
    }

    /// `tcp://ADDR`, for `docker -H`.
    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // wake the accept loop
        let _ = self.ns.connect_tcp(self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways until either side closes.
fn splice(tcp: TcpStream, unix: UnixStream) {
    let (Ok(mut tcp_r), Ok(mut unix_w)) = (tcp.try_clone(), unix.try_clone()) else {
        return;
    };
    let (mut tcp_w, mut unix_r) = (tcp, unix);
    let up = std::thread::spawn(move || {
        copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(Shutdown::Write);
    });
    copy(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = up.join();
}

fn copy(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
