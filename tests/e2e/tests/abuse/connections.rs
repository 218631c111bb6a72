//! Slow clients against the live cluster (issue 13, the review's third finding): before,
//! 300 slow-body connections to a host's heartbeat endpoint were all still open after 40 s,
//! and 300 connections to the agent API that never started TLS stayed open. Run again, at
//! once:
//!
//! * 300 connections to host a's heartbeat endpoint (its docker0 gateway, port 7948) from
//!   inside a's network namespace, each sending a complete request head and then its body
//!   one byte a second (`Content-Length: 60000`);
//! * 300 TCP connections to host a's agent API (port 7947 on its underlay address, from
//!   host b) that never send a byte (never start TLS);
//! * 300 such connections to the controller's port (from host c).
//!
//! Every one must be closed by the server (seen from the client: a read returns end of
//! file or a reset, or a write fails) within 15 s of connecting: the TLS handshake deadline
//! (10 s) and the caps (the agent API's 64 connections, the heartbeat endpoint's 8 per
//! source) close the API floods; the heartbeat endpoint's own deadline is 15 s from the
//! accept, so its connections get 1.5 s of slack for the accept and the scheduling of a
//! loaded 2-core machine. During the flood the endpoints keep serving: the heartbeat
//! endpoint answers a request from another address (an HTTP status: without a node's
//! token it is 401, which is the endpoint at work), `geomxctl hosts` answers and every
//! host stays ready; afterwards the heartbeat endpoint, the agent API and the controller
//! each answer again (the APIs: a TLS ClientHello gets a ServerHello).
//!
//! 900 sockets in this process at most; no fd limit is raised. About 20 s.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_lab::{Cluster, LabHost, Netns};

/// Connections per flood.
const FLOOD: usize = 300;
/// The heartbeat endpoint's deadline per connection (`geomx_runtime::heartbeat::
/// CONNECTION_DEADLINE`), counted from its accept.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(15);
/// What the client allows on top of it (the accept, a loaded machine's scheduling).
const HEARTBEAT_SLACK: Duration = Duration::from_millis(1500);
/// The bound for the connections that never start TLS.
const NO_TLS_BOUND: Duration = Duration::from_secs(15);
/// The declared body of a slow heartbeat (never sent in full).
const SLOW_BODY_LEN: usize = 60_000;
/// How often a slow client sends one more byte of its body.
const TRICKLE_EVERY: Duration = Duration::from_secs(1);

/// One client connection of a flood.
struct Conn {
    stream: TcpStream,
    opened: Instant,
    /// When and how the server closed it.
    closed: Option<(Duration, &'static str)>,
    /// Bytes the server sent before closing (an answer such as a 401 is fine).
    received: usize,
}

/// A flood against one endpoint.
struct Flood {
    name: &'static str,
    target: SocketAddr,
    conns: Vec<Conn>,
    /// Connections the server refused outright (closed before the connect completed).
    refused: usize,
    bound: Duration,
    slow_body: bool,
    last_trickle: Instant,
}

impl Flood {
    fn open(&self) -> usize {
        self.conns.iter().filter(|c| c.closed.is_none()).count()
    }

    /// Notes every connection the server closed since the last look; slow clients send
    /// their next byte when it is time.
    fn poll(&mut self) {
        let trickle = self.slow_body && self.last_trickle.elapsed() >= TRICKLE_EVERY;
        if trickle {
            self.last_trickle = Instant::now();
        }
        let mut buf = [0u8; 4096];
        for c in self.conns.iter_mut().filter(|c| c.closed.is_none()) {
            let closed = loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => break Some("eof"),
                    Ok(n) => c.received += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break Some("reset"),
                }
            };
            let closed = closed
                .or_else(|| (trickle && c.stream.write(b" ").is_err()).then_some("write failed"));
            if let Some(how) = closed {
                c.closed = Some((c.opened.elapsed(), how));
            }
        }
    }

    /// Fails naming the connections still open past the bound.
    fn check_bound(&self) -> anyhow::Result<()> {
        let late: Vec<Duration> = self
            .conns
            .iter()
            .filter(|c| c.closed.is_none() && c.opened.elapsed() > self.bound)
            .map(|c| c.opened.elapsed())
            .collect();
        ensure!(
            late.is_empty(),
            "{} ({}): {} of {FLOOD} connections still open after {:.1}s (bound {:.1}s)",
            self.name,
            self.target,
            late.len(),
            late.iter().max().unwrap_or(&Duration::ZERO).as_secs_f64(),
            self.bound.as_secs_f64()
        );
        Ok(())
    }

    /// `name_within_1s=N name_after_5s=N name_median_ms=N name_slowest_ms=N
    /// name_answered=N` (refused connects count as closed at once).
    fn summary(&self) -> String {
        let mut times: Vec<Duration> = self
            .conns
            .iter()
            .filter_map(|c| c.closed.map(|x| x.0))
            .chain(std::iter::repeat_n(Duration::ZERO, self.refused))
            .collect();
        times.sort();
        let within_1s = times
            .iter()
            .filter(|t| **t < Duration::from_secs(1))
            .count();
        let after_5s = times
            .iter()
            .filter(|t| **t >= Duration::from_secs(5))
            .count();
        let median = times.get(times.len() / 2).copied().unwrap_or_default();
        let slowest = times.last().copied().unwrap_or_default();
        let answered = self.conns.iter().filter(|c| c.received > 0).count();
        let n = self.name;
        format!(
            "{n}_within_1s={within_1s} {n}_after_5s={after_5s} {n}_median_ms={} {n}_slowest_ms={} {n}_answered={answered}",
            median.as_millis(),
            slowest.as_millis()
        )
    }
}

/// Opens `FLOOD` connections to `target` from inside `netns` (from `source` when given),
/// each sending `preamble` first, all non-blocking afterwards.
fn flood(
    name: &'static str,
    netns: &Netns,
    source: Option<IpAddr>,
    target: SocketAddr,
    preamble: Vec<u8>,
    bound: Duration,
) -> anyhow::Result<Flood> {
    let slow_body = !preamble.is_empty();
    let (conns, refused) = netns.enter(move || -> anyhow::Result<(Vec<Conn>, usize)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut conns = Vec::with_capacity(FLOOD);
        let mut refused = 0;
        for _ in 0..FLOOD {
            let socket = tokio::net::TcpSocket::new_v4()?;
            if let Some(ip) = source {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            let opened = Instant::now();
            let connected = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), socket.connect(target)).await
            });
            let stream = match connected {
                Ok(Ok(s)) => s.into_std()?,
                // a cap may refuse outright: closed at once
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                    ) =>
                {
                    refused += 1;
                    continue;
                }
                Ok(Err(e)) => return Err(e).context(format!("connecting to {target}")),
                Err(_) => bail!("connecting to {target}: no answer within 5 s"),
            };
            stream.set_nonblocking(false)?;
            if !preamble.is_empty() {
                // a closed connection's write may fail: poll notes it
                let _ = (&stream).write_all(&preamble);
            }
            stream.set_nonblocking(true)?;
            conns.push(Conn {
                stream,
                opened,
                closed: None,
                received: 0,
            });
        }
        Ok((conns, refused))
    })??;
    Ok(Flood {
        name,
        target,
        conns,
        refused,
        bound,
        slow_body,
        last_trickle: Instant::now(),
    })
}

/// The address of `host`'s docker0 (the heartbeat endpoint's).
fn docker0_gateway(host: &LabHost) -> anyhow::Result<Ipv4Addr> {
    let out = host.run(&["ip", "-4", "-o", "addr", "show", "docker0"])?;
    let cidr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .context("docker0 has no IPv4 address")?;
    Ok(cidr.split('/').next().unwrap_or_default().parse()?)
}

/// Posts a heartbeat to `target` from inside `netns`, from `source`; returns the status.
fn heartbeat_status(netns: &Netns, source: IpAddr, target: SocketAddr) -> anyhow::Result<u16> {
    let body = r#"{"job": "abuse-connections", "node": "w0", "step": 1}"#;
    let request = format!(
        "POST /v1/heartbeat HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = netns.enter(move || -> anyhow::Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(3), socket.connect(target)).await
            })
            .context("no connection within 3 s")??
            .into_std()?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        (&stream).write_all(request.as_bytes())?;
        let mut answer = String::new();
        (&stream).read_to_string(&mut answer)?;
        Ok(answer)
    })??;
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP answer from {target}: {answer:?}"))
}

/// A TLS 1.3 ClientHello (x25519 key share, the three TLS 1.3 suites, ECDSA/RSA-PSS/Ed25519
/// signatures): enough for a rustls server to answer with its ServerHello.
fn client_hello() -> Vec<u8> {
    let mut ext = Vec::new();
    // supported_versions: TLS 1.3
    ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    // supported_groups: x25519
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    // signature_algorithms
    ext.extend_from_slice(&[
        0x00, 0x0d, 0x00, 0x0a, 0x00, 0x08, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x08, 0x07,
    ]);
    // key_share: x25519, any 32 bytes are a public key
    ext.extend_from_slice(&[0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]);
    ext.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(9)));
    let mut body = vec![0x03, 0x03];
    body.extend((0..32u8).map(|i| i.wrapping_mul(11)));
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&u16::try_from(ext.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(hs.len()).unwrap_or(0).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// Whether the TLS server at `target` answers a ClientHello from inside `netns` with a
/// ServerHello within 5 s.
fn tls_answers(netns: &Netns, target: SocketAddr) -> anyhow::Result<()> {
    let mut s = netns.connect_tcp(target, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&client_hello())?;
    let mut head = [0u8; 6];
    s.read_exact(&mut head)
        .with_context(|| format!("{target}: no answer to a TLS ClientHello"))?;
    ensure!(
        head[0] == 0x16 && head[1] == 0x03 && head[5] == 0x02,
        "{target}: {head:02x?} is no ServerHello"
    );
    Ok(())
}

/// Every host of the cluster ready, as `geomxctl hosts` says.
fn all_ready(c: &Cluster, names: &[String]) -> anyhow::Result<()> {
    let hosts = c.hosts()?;
    for n in names {
        let h = hosts
            .iter()
            .find(|h| h["name"] == n.as_str())
            .with_context(|| format!("host {n} missing from geomxctl hosts"))?;
        ensure!(h["state"] == "ready", "host {n} is {}", h["state"]);
    }
    Ok(())
}

pub fn run(c: &Cluster) -> anyhow::Result<()> {
    let started = Instant::now();
    let lab = c.lab();
    let a = lab.host("a")?;
    let b = lab.host("b")?;
    let hc = lab.host("c")?;
    let names: Vec<String> = lab.hosts().iter().map(|h| h.name.clone()).collect();
    let gateway = docker0_gateway(a)?;
    let heartbeat = SocketAddr::from((gateway, geomx_runtime::DEFAULT_HEARTBEAT_PORT));
    let hosts = c.hosts()?;
    let agent_url = hosts
        .iter()
        .find(|h| h["name"] == "a")
        .and_then(|h| h["agent_url"].as_str())
        .context("host a has no agent URL")?
        .to_owned();
    let agent_api: SocketAddr = agent_url
        .rsplit("://")
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("agent URL {agent_url:?}"))?;
    let controller = c.controller_addr();
    // the heartbeat endpoint serves before the flood, from the address the checks use
    let checker = IpAddr::V4(a.underlay_ip);
    let before = heartbeat_status(a.netns(), checker, heartbeat)?;

    let head = format!(
        "POST /v1/heartbeat HTTP/1.1\r\nHost: {heartbeat}\r\nContent-Type: application/json\r\nContent-Length: {SLOW_BODY_LEN}\r\n\r\n{{"
    );
    let mut floods = vec![
        flood(
            "heartbeat",
            a.netns(),
            None,
            heartbeat,
            head.into_bytes(),
            HEARTBEAT_DEADLINE + HEARTBEAT_SLACK,
        )?,
        flood(
            "agent_api",
            b.netns(),
            None,
            agent_api,
            Vec::new(),
            NO_TLS_BOUND,
        )?,
        flood(
            "controller",
            hc.netns(),
            None,
            controller,
            Vec::new(),
            NO_TLS_BOUND,
        )?,
    ];
    let opened_in = started.elapsed();

    // during: the endpoints keep serving, the hosts stay ready
    let mut during_checks = 0;
    let mut heartbeat_during = Vec::new();
    let mut last_check = Instant::now() - Duration::from_secs(10);
    loop {
        for f in &mut floods {
            f.poll();
            f.check_bound()?;
        }
        let open: usize = floods.iter().map(Flood::open).sum();
        if open == 0 {
            break;
        }
        if last_check.elapsed() >= Duration::from_secs(2) {
            last_check = Instant::now();
            heartbeat_during.push(
                heartbeat_status(a.netns(), checker, heartbeat)
                    .context("the heartbeat endpoint stopped answering during the flood")?,
            );
            all_ready(c, &names).context("during the flood")?;
            during_checks += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(during_checks >= 2, "the flood ended before it was checked");
    let flood_s = started.elapsed().as_secs_f64();

    // after: everything answers again
    let after = heartbeat_status(a.netns(), checker, heartbeat)?;
    ensure!(
        after == before && heartbeat_during.iter().all(|s| *s == before),
        "the heartbeat endpoint answered {before} before, {heartbeat_during:?} during, {after} after the flood"
    );
    tls_answers(b.netns(), agent_api).context("the agent API after the flood")?;
    tls_answers(hc.netns(), controller).context("the controller after the flood")?;
    c.wait_hosts_ready(&names, Duration::from_secs(10))?;
    all_ready(c, &names)?;
    let summary: Vec<String> = floods.iter().map(Flood::summary).collect();
    println!(
        "abuse_connections: floods={}x{FLOOD} opened_in_ms={} all_closed_s={flood_s:.1} heartbeat_status={before} checks_during={during_checks} {} took_s={:.1}",
        floods.len(),
        opened_in.as_millis(),
        summary.join(" "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
