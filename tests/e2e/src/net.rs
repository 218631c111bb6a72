//! Checks of the data plane between lab hosts and containers.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_lab::{Lab, LabHost, Rootfs};

/// Accepts one connection on `listener` within `timeout` and returns the peer's address
/// and what it sent.
pub fn accept_one(
    listener: &TcpListener,
    timeout: Duration,
) -> anyhow::Result<(SocketAddr, String)> {
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut got = String::new();
                let _ = stream.read_to_string(&mut got);
                return Ok((peer, got));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    bail!("no connection within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends a line from container `container` on `host` to `addr` with busybox nc, and returns
/// the source address the listener saw.
pub fn tcp_source(
    host: &LabHost,
    container: &str,
    listener: &TcpListener,
    addr: SocketAddr,
) -> anyhow::Result<Ipv4Addr> {
    let d = host.dockerd()?;
    let send = format!(
        "echo hello-from-{container} | nc -w 3 {} {}",
        addr.ip(),
        addr.port()
    );
    let (peer, got) = std::thread::scope(|s| {
        let sender = s.spawn(|| d.docker(&["exec", container, "sh", "-c", &send]));
        let accepted = accept_one(listener, Duration::from_secs(5));
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        let accepted = accepted.with_context(|| format!("sender said {sent:?}"))?;
        anyhow::Ok(accepted)
    })?;
    ensure!(
        got.trim() == format!("hello-from-{container}"),
        "listener at {addr} received {got:?}"
    );
    match peer.ip() {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => bail!("unexpected peer address {other}"),
    }
}

/// The routes geomx made on `host` (`ip route show proto 247`), one per line.
pub fn geomx_routes(host: &LabHost) -> anyhow::Result<Vec<String>> {
    Ok(host
        .run(&["ip", "-4", "route", "show", "proto", "247"])?
        .lines()
        .map(|l| l.trim().to_string())
        .collect())
}

/// Builds a busybox image once and imports it as `tag` into the dockerds of `hosts`.
pub fn import_busybox(lab: &Lab, hosts: &[&LabHost], tag: &str) -> anyhow::Result<()> {
    let rootfs = Rootfs::new(&lab.dir().join("rootfs"))?.with_busybox()?;
    std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                let rootfs = &rootfs;
                s.spawn(move || -> anyhow::Result<()> {
                    rootfs.import(h.dockerd()?, tag, &["/bin/sh"])?;
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("import panicked"))?)
    })
}

/// Checks that a container on `from` reaches a container on `to` by ping and TCP, and that
/// the receiver sees the sender's own container IP (no NAT inside the cluster). Starts the
/// two containers from `image` (which needs busybox) and removes them afterwards.
pub fn assert_containers_connected(
    from: &LabHost,
    to: &LabHost,
    image: &str,
) -> anyhow::Result<()> {
    let (df, dt) = (from.dockerd()?, to.dockerd()?);
    let (sender, receiver) = (format!("ping-{}", from.name), format!("pong-{}", to.name));
    df.docker(&["run", "-d", "--name", &sender, image, "sleep", "600"])?;
    dt.docker(&["run", "-d", "--name", &receiver, image, "sleep", "600"])?;
    let result = (|| {
        let sender_ip = df.container_ip(&sender)?;
        let receiver_ip = dt.container_ip(&receiver)?;
        df.docker(&[
            "exec",
            &sender,
            "ping",
            "-c",
            "1",
            "-W",
            "3",
            &receiver_ip.to_string(),
        ])
        .with_context(|| format!("ping {receiver_ip} from {sender} ({sender_ip})"))?;
        let netns = dt.container_netns(&receiver)?;
        let addr = SocketAddr::from((receiver_ip, 5201));
        let listener = netns.listen_tcp(addr)?;
        let seen = tcp_source(from, &sender, &listener, addr)?;
        ensure!(
            seen == sender_ip,
            "the receiver saw {seen}, not the sender's container IP {sender_ip} (NAT inside the cluster?)"
        );
        anyhow::Ok(())
    })();
    let _ = df.docker(&["rm", "-f", &sender]);
    let _ = dt.docker(&["rm", "-f", &receiver]);
    result
}
