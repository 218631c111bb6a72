//! The node behaviour: schedulers that wait for registrations, servers and workers that
//! register, receive the roster, connect to each other and (workers) train.
//!
//! Wire protocol (one text line each way over a short TCP connection):
//!
//! - node → scheduler: `REGISTER <server|worker> <ip:port> <name>` → `OK <n>/<expected>`
//!   (or `ERR ...` for a registration beyond the configured counts); as ps-lite's ZeroMQ
//!   connection, this one stays open for the node's lifetime (geomx's agent sees who
//!   reached a scheduler by its connections);
//! - scheduler → node, once complete, to the node's advertised address:
//!   `ROSTER <local|global> <scheduler ip:port> servers=<a,b> workers=<c,d>` → `OK`;
//! - worker → every server of its roster: `HELLO <ip:port> <name>` → `OK`;
//! - ps-lite's `Finalize`: a worker that trained to the end says `BYE <ip:port>` to its
//!   scheduler and its servers; a scheduler exits once each of its workers said it, a server
//!   once each worker of its local roster did (a party server says `BYE` to the global
//!   scheduler first, where it counts as a worker). Their exit code is
//!   `PSNODE_FINALIZE_EXIT` (0).
//!
//! Schedulers also print the lines GeoMX's ps-lite prints with `PS_VERBOSE=1`
//! (`3rdparty/ps-lite/src/van.cc`, with dmlc's log prefix), which geomx's agent parses: the
//! global scheduler `add node` and `K--N` for each registration; every scheduler, once
//! complete, `assign id=N to node role=R, ip=I, port=P, is_recovery=0` per node and `the
//! scheduler is connected to W workers and S servers` (global: `... P servers and G global
//! servers`). A local scheduler prints nothing while it waits, as ps-lite.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::config::{Config, Kind, Layer, Role, Scheduler};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_millis(200);
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Advertised `ip:port`.
    pub addr: String,
    /// Its name (GEOMX_NODE).
    pub name: String,
}

/// The nodes a scheduler saw, sent to each of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    /// Layer of the scheduler.
    pub layer: String,
    /// Scheduler address.
    pub scheduler: String,
    /// Servers' addresses in registration order.
    pub servers: Vec<String>,
    /// Workers' addresses in registration order (the rank order).
    pub workers: Vec<String>,
}

impl Roster {
    /// The wire line.
    pub fn to_line(&self) -> String {
        format!(
            "ROSTER {} {} servers={} workers={}",
            self.layer,
            self.scheduler,
            self.servers.join(","),
            self.workers.join(",")
        )
    }

    /// Parses a wire line.
    pub fn parse(line: &str) -> Option<Roster> {
        let mut it = line.split_whitespace();
        if it.next()? != "ROSTER" {
            return None;
        }
        let layer = it.next()?.to_string();
        let scheduler = it.next()?.to_string();
        let list = |s: &str, key: &str| -> Option<Vec<String>> {
            let v = s.strip_prefix(key)?;
            Some(
                v.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect(),
            )
        };
        let servers = list(it.next()?, "servers=")?;
        let workers = list(it.next()?, "workers=")?;
        Some(Roster {
            layer,
            scheduler,
            servers,
            workers,
        })
    }
}

/// Sends one line to `addr` and returns the one-line answer.
pub fn exchange(addr: &str, line: &str) -> std::io::Result<String> {
    exchange_on(addr, line).map(|(answer, _)| answer)
}

/// [`exchange`], also returning the connection (still open).
fn exchange_on(addr: &str, line: &str) -> std::io::Result<(String, TcpStream)> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr}: no address"));
    for sa in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
            Ok(mut s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                s.write_all(format!("{line}\n").as_bytes())?;
                let mut answer = String::new();
                BufReader::new(&s).read_line(&mut answer)?;
                return Ok((answer.trim().to_string(), s));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The registrations' connections, kept open (see the module docs).
static KEPT: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

/// A line as ps-lite's `PS_VLOG(1)` prints it: `[HH:MM:SS] src/van.cc:LINE: text`.
fn ps_log(line: u32, text: &str) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    println!("[{h:02}:{m:02}:{s:02}] src/van.cc:{line}: {text}");
}

fn read_line(stream: &TcpStream) -> std::io::Result<String> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

fn reply(mut stream: &TcpStream, line: &str) {
    let _ = stream.write_all(format!("{line}\n").as_bytes());
}

/// The address this node advertises: `DMLC_NODE_HOST`, else the IPv4 of
/// `DMLC_INTERFACE`, else the first non-loopback IPv4 (as ps-lite does).
pub fn advertise_ip(cfg: &Config) -> Result<IpAddr> {
    if let Some(h) = &cfg.node_host {
        if let Ok(ip) = h.parse::<IpAddr>() {
            return Ok(ip);
        }
        let sa = (h.as_str(), 0)
            .to_socket_addrs()
            .with_context(|| format!("DMLC_NODE_HOST {h:?} does not resolve"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("DMLC_NODE_HOST {h:?} has no IPv4 address"))?;
        return Ok(sa.ip());
    }
    let addrs: Vec<(String, IpAddr)> = nix::ifaddrs::getifaddrs()
        .context("getifaddrs")?
        .filter_map(|a| {
            let ip = a.address?.as_sockaddr_in()?.ip();
            Some((a.interface_name, IpAddr::V4(ip)))
        })
        .collect();
    if let Some((_, ip)) = addrs.iter().find(|(n, _)| *n == cfg.interface) {
        return Ok(*ip);
    }
    addrs
        .iter()
        .find(|(_, ip)| !ip.is_loopback())
        .map(|(_, ip)| *ip)
        .with_context(|| {
            format!(
                "no IPv4 address on DMLC_INTERFACE={} nor on any other interface",
                cfg.interface
            )
        })
}

#[derive(Default)]
struct Registry {
    servers: Vec<Peer>,
    workers: Vec<Peer>,
    complete: bool,
    byes: std::collections::BTreeSet<String>,
}

/// Runs a scheduler: binds exactly `sched`'s address and waits (forever if need be) for
/// exactly the configured registrations, then sends the roster to every node. Returns only
/// on a bind error.
pub fn run_scheduler(role: Role, sched: &Scheduler, finalize_exit: i32) -> Result<()> {
    let addr = sched.addr();
    let name = role.name();
    let listener = TcpListener::bind(&addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrNotAvailable {
            format!(" (is {} an address of this container?)", sched.uri)
        } else {
            String::new()
        };
        anyhow::anyhow!(
            "Check failed: (my_node_.port) != (-1) bind failed: tcp://{addr}: {e}{hint}"
        )
    })?;
    println!(
        "psnode {name} {addr}: waiting for servers={} workers={}",
        sched.servers, sched.workers
    );
    let reg = Arc::new(Mutex::new(Registry::default()));
    {
        let reg = reg.clone();
        let (addr, servers, workers) = (addr.clone(), sched.servers, sched.workers);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(LOG_EVERY);
                let r = reg.lock().unwrap_or_else(|p| p.into_inner());
                if r.complete {
                    return;
                }
                println!(
                    "psnode {name} {addr}: still waiting: servers={}/{servers} workers={}/{workers} from [{}]",
                    r.servers.len(),
                    r.workers.len(),
                    r.servers
                        .iter()
                        .chain(&r.workers)
                        .map(|p| p.addr.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
        });
    }
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let reg = reg.clone();
        let sched = sched.clone();
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let line = match read_line(&stream) {
                Ok(l) => l,
                Err(_) => return,
            };
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let ["BYE", node_addr, ..] = parts.as_slice() {
                reply(&stream, "OK");
                let mut r = reg.lock().unwrap_or_else(|p| p.into_inner());
                r.byes.insert(node_addr.to_string());
                if r.complete && r.byes.len() >= sched.workers {
                    println!(
                        "psnode {name} {}: every worker finished: shutting down (exit {finalize_exit})",
                        sched.addr()
                    );
                    std::process::exit(finalize_exit);
                }
                return;
            }
            let (kind, node_addr, node_name) = match parts.as_slice() {
                ["REGISTER", k, a, n, ..] => match Kind::parse(k) {
                    Some(k) => (k, a.to_string(), n.to_string()),
                    None => return reply(&stream, "ERR bad kind"),
                },
                _ => return reply(&stream, "ERR bad request"),
            };
            let answer = register(&reg, &sched, name, kind, node_addr, node_name, &peer);
            reply(&stream, &answer);
            // the node keeps the connection (as ZeroMQ does) until it ends
            if answer.starts_with("OK") && stream.set_read_timeout(None).is_ok() {
                let _ = std::io::copy(&mut &stream, &mut std::io::sink());
            }
        });
    }
    Ok(())
}

fn register(
    reg: &Arc<Mutex<Registry>>,
    sched: &Scheduler,
    name: &'static str,
    kind: Kind,
    node_addr: String,
    node_name: String,
    from: &str,
) -> String {
    let addr = sched.addr();
    let mut r = reg.lock().unwrap_or_else(|p| p.into_inner());
    if r.servers
        .iter()
        .chain(&r.workers)
        .any(|p| p.addr == node_addr)
    {
        return "OK again".into();
    }
    let (list, want) = match kind {
        Kind::Server => (&mut r.servers, sched.servers),
        Kind::Worker => (&mut r.workers, sched.workers),
    };
    if list.len() >= want {
        println!(
            "psnode {name} {addr}: unexpected {} registration from {node_addr} ({node_name}, connected from {from}): already {}/{want}",
            kind.as_str(),
            list.len()
        );
        return format!("ERR {} count {want} reached", kind.as_str());
    }
    list.push(Peer {
        addr: node_addr.clone(),
        name: node_name.clone(),
    });
    let n = list.len();
    println!(
        "psnode {name} {addr}: registered {} {n}/{want} {node_addr} ({node_name})",
        kind.as_str()
    );
    let global = sched.layer == Layer::Global;
    if global {
        ps_log(256, "add node");
        ps_log(
            105,
            &format!(
                "{}--{}",
                r.servers.len() + r.workers.len(),
                sched.servers + sched.workers
            ),
        );
    }
    if r.servers.len() == sched.servers && r.workers.len() == sched.workers && !r.complete {
        r.complete = true;
        // ps-lite's ids: servers 8, 10, ...; workers 9, 11, ...
        let (server_role, worker_role) = if global {
            ("global server", "server")
        } else {
            ("server", "worker")
        };
        let assigned = r
            .servers
            .iter()
            .enumerate()
            .map(|(k, p)| (8 + 2 * k, server_role, p))
            .chain(
                r.workers
                    .iter()
                    .enumerate()
                    .map(|(k, p)| (9 + 2 * k, worker_role, p)),
            );
        for (id, role, p) in assigned {
            let (ip, port) = p.addr.rsplit_once(':').unwrap_or((p.addr.as_str(), "0"));
            ps_log(
                60,
                &format!("assign id={id} to node role={role}, ip={ip}, port={port}, is_recovery=0"),
            );
        }
        ps_log(
            85,
            &if global {
                format!(
                    "the scheduler is connected to {} servers and {} global servers",
                    r.workers.len(),
                    r.servers.len()
                )
            } else {
                format!(
                    "the scheduler is connected to {} workers and {} servers",
                    r.workers.len(),
                    r.servers.len()
                )
            },
        );
        let all: Vec<Peer> = r.servers.iter().chain(&r.workers).cloned().collect();
        println!(
            "psnode {name} {addr} complete: servers={} workers={} from [{}]",
            r.servers.len(),
            r.workers.len(),
            all.iter()
                .map(|p| p.addr.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        let roster = Roster {
            layer: sched.layer.as_str().to_string(),
            scheduler: addr.clone(),
            servers: r.servers.iter().map(|p| p.addr.clone()).collect(),
            workers: r.workers.iter().map(|p| p.addr.clone()).collect(),
        };
        for p in all {
            let line = roster.to_line();
            let addr = addr.clone();
            std::thread::spawn(move || send_until_ok(name, &addr, &p, &line));
        }
    }
    format!("OK {n}/{want}")
}

/// Sends the roster to a node's advertised address until it answers OK (this is the
/// scheduler → node route being exercised).
fn send_until_ok(name: &str, sched: &str, p: &Peer, line: &str) {
    let start = Instant::now();
    let mut last_log = Instant::now();
    loop {
        match exchange(&p.addr, line) {
            Ok(a) if a.starts_with("OK") => {
                println!(
                    "psnode {name} {sched}: roster delivered to {} ({}) after {:.2}s",
                    p.addr,
                    p.name,
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            Ok(a) => eprintln!("psnode {name} {sched}: {} answered {a:?}", p.addr),
            Err(e) if last_log.elapsed() >= LOG_EVERY => {
                eprintln!(
                    "psnode {name} {sched}: cannot reach {} ({}) to send the roster: {e}",
                    p.addr, p.name
                );
                last_log = Instant::now();
            }
            Err(_) => {}
        }
        std::thread::sleep(RETRY);
    }
}

/// Runs a server or worker; returns the exit code (servers never return unless on error).
pub fn run_node(cfg: &Config) -> Result<i32> {
    let role = cfg.role.name();
    let ip = advertise_ip(cfg)?;
    let listener = TcpListener::bind((ip, cfg.port.unwrap_or(0)))
        .map_err(|e| anyhow::anyhow!("bind failed: tcp://{ip}:{}: {e}", cfg.port.unwrap_or(0)))?;
    let me = listener.local_addr().context("local address")?.to_string();
    println!("psnode {role} {me} ({}): listening", cfg.name);
    let (tx, rx) = mpsc::channel::<Roster>();
    let (bye_tx, bye_rx) = mpsc::channel::<String>();
    {
        let me = me.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let tx = tx.clone();
                let bye_tx = bye_tx.clone();
                let me = me.clone();
                std::thread::spawn(move || {
                    let Ok(line) = read_line(&stream) else { return };
                    if let Some(addr) = line.strip_prefix("BYE ") {
                        reply(&stream, "OK");
                        let _ = bye_tx.send(addr.trim().to_string());
                    } else if let Some(r) = Roster::parse(&line) {
                        reply(&stream, "OK");
                        let _ = tx.send(r);
                    } else if let ["HELLO", addr, name, ..] =
                        line.split_whitespace().collect::<Vec<_>>().as_slice()
                    {
                        println!("psnode {role} {me}: worker {addr} ({name}) connected");
                        reply(&stream, "OK");
                    } else {
                        reply(&stream, "ERR bad request");
                    }
                });
            }
        });
    }
    for (sched, kind) in &cfg.registrations {
        register_with(role, &me, &cfg.name, sched, *kind);
    }
    let mut rosters: Vec<Roster> = Vec::new();
    while rosters.len() < cfg.registrations.len() {
        let r = rx.recv().context("listener ended")?;
        if rosters.iter().any(|x| x.scheduler == r.scheduler) {
            continue;
        }
        println!(
            "psnode {role} {me}: {} roster from {}: servers=[{}] workers=[{}]",
            r.layer,
            r.scheduler,
            r.servers.join(","),
            r.workers.join(",")
        );
        rosters.push(r);
    }
    let local = rosters
        .iter()
        .find(|r| r.layer == Layer::Local.as_str())
        .context("no local roster")?;
    if !cfg.role.trains() {
        println!("psnode {role} {me}: ready");
        let mut byes = std::collections::BTreeSet::new();
        while byes.len() < local.workers.len() {
            byes.insert(bye_rx.recv().context("listener ended")?);
        }
        for (sched, kind) in &cfg.registrations {
            if *kind == Kind::Worker {
                bye(role, &me, &sched.addr());
            }
        }
        println!(
            "psnode {role} {me}: every worker finished: shutting down (exit {})",
            cfg.finalize_exit
        );
        return Ok(cfg.finalize_exit);
    }
    for server in &local.servers {
        hello(role, &me, &cfg.name, server);
    }
    println!(
        "psnode {role} {me}: connected to {} server(s)",
        local.servers.len()
    );
    let rank = local.workers.iter().position(|w| *w == me).unwrap_or(0);
    let code = crate::train::train(cfg, rank);
    if cfg.crash_after.is_none_or(|n| n > cfg.iterations) {
        // Finalize: every scheduler and server of this worker learns that it is done
        for (sched, _) in &cfg.registrations {
            bye(role, &me, &sched.addr());
        }
        for server in &local.servers {
            bye(role, &me, server);
        }
    }
    Ok(code)
}

/// Says goodbye to `addr` (best effort: a peer that is gone needs no goodbye).
fn bye(role: &str, me: &str, addr: &str) {
    if let Err(e) = exchange(addr, &format!("BYE {me}")) {
        eprintln!("psnode {role} {me}: goodbye to {addr} failed: {e}");
    }
}

fn register_with(role: &str, me: &str, name: &str, sched: &Scheduler, kind: Kind) {
    let line = format!("REGISTER {} {me} {name}", kind.as_str());
    let addr = sched.addr();
    let mut last_log: Option<Instant> = None;
    loop {
        match exchange_on(&addr, &line) {
            Ok((a, conn)) if a.starts_with("OK") => {
                println!(
                    "psnode {role} {me}: registered as {} with {} scheduler {addr} ({a})",
                    kind.as_str(),
                    sched.layer.as_str()
                );
                KEPT.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
                return;
            }
            Ok((a, _)) => {
                // like ps-lite: a node the scheduler does not expect just waits
                if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    eprintln!(
                        "psnode {role} {me}: {} scheduler {addr} refused: {a}",
                        sched.layer.as_str()
                    );
                    last_log = Some(Instant::now());
                }
            }
            Err(e) => {
                if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    eprintln!(
                        "psnode {role} {me}: waiting for the {} scheduler at {addr}: {e}",
                        sched.layer.as_str()
                    );
                    last_log = Some(Instant::now());
                }
            }
        }
        std::thread::sleep(RETRY);
    }
}

/// Connects to a server (the worker → server route).
fn hello(role: &str, me: &str, name: &str, server: &str) {
    let mut last_log: Option<Instant> = None;
    loop {
        match exchange(server, &format!("HELLO {me} {name}")) {
            Ok(a) if a.starts_with("OK") => return,
            Ok(a) => eprintln!("psnode {role} {me}: server {server} answered {a:?}"),
            Err(e) => {
                if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    eprintln!("psnode {role} {me}: cannot reach server {server}: {e}");
                    last_log = Some(Instant::now());
                }
            }
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roster_round_trip() {
        let r = Roster {
            layer: "local".into(),
            scheduler: "172.17.34.2:9094".into(),
            servers: vec!["172.17.34.3:40001".into()],
            workers: vec!["172.17.34.4:40002".into(), "172.17.34.5:40003".into()],
        };
        assert_eq!(Roster::parse(&r.to_line()), Some(r));
        let empty = Roster {
            layer: "global".into(),
            scheduler: "a:1".into(),
            servers: vec![],
            workers: vec![],
        };
        assert_eq!(Roster::parse(&empty.to_line()), Some(empty));
        assert!(Roster::parse("HELLO x y").is_none());
    }

    #[test]
    fn scheduler_counts_exactly() {
        let sched = Scheduler {
            layer: Layer::Local,
            uri: "127.0.0.1".into(),
            port: 1,
            servers: 1,
            workers: 1,
        };
        let reg = Arc::new(Mutex::new(Registry::default()));
        let r = |k, a: &str| register(&reg, &sched, "scheduler", k, a.into(), "n".into(), "x");
        assert_eq!(r(Kind::Worker, "127.0.0.1:1"), "OK 1/1");
        assert_eq!(r(Kind::Worker, "127.0.0.1:1"), "OK again");
        assert!(r(Kind::Worker, "127.0.0.1:2").starts_with("ERR"));
        assert!(!reg.lock().map(|g| g.complete).unwrap_or(true));
        // completing sends rosters to unreachable addresses in the background: harmless
        assert_eq!(r(Kind::Server, "127.0.0.1:3"), "OK 1/1");
        assert!(reg.lock().map(|g| g.complete).unwrap_or(false));
    }
}
