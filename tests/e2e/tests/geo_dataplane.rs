//! The cross-data-center data plane on the geo-distributed lab: containers in three data
//! centers on routed networks reach each other through WireGuard (and hosts of one data center
//! through plain host-gw routes), nothing crosses the WAN in the clear, and the tunnel survives
//! the agent being killed. One cluster for the whole binary's checks.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use geomx_e2e::net::{assert_containers_connected, geomx_routes, import_busybox};
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::topology::parse_topology;
use geomx_lab::{Binaries, Cluster, ClusterSpec, Lab, LabHost, LabProcess, LabSpec};

const IMAGE: &str = "geomx-lab/busybox:test";

/// Three data centers, every WAN link 5 ms one way (the job tests use 40 ms); dc1 has two
/// hosts on one LAN.
const TOPOLOGY: &str = r#"
[[dc]]
name = "dc1"
subnet = "10.1.1.0/24"
hosts = [{ name = "a", ip = "10.1.1.34" }, { name = "a2", ip = "10.1.1.35" }]
[[dc]]
name = "dc2"
subnet = "10.2.1.0/24"
hosts = [{ name = "b", ip = "10.2.1.29" }]
[[dc]]
name = "dc3"
subnet = "10.3.1.0/24"
hosts = [{ name = "c", ip = "10.3.1.33" }]
[[link]]
dcs = ["dc1", "dc2"]
delay = "5ms"
[[link]]
dcs = ["dc1", "dc3"]
delay = "5ms"
[[link]]
dcs = ["dc2", "dc3"]
delay = "5ms"
"#;

/// The geo lab's cluster, and a2's network as it was before any agent ran (what cleanup
/// must give back).
fn geo_cluster() -> anyhow::Result<(Cluster, HostNet)> {
    let file = parse_topology("geo.toml", TOPOLOGY)?;
    let lab = Lab::up(LabSpec::for_test().topology(file))?;
    let pristine_a2 = host_net(lab.host("a2")?)?;
    let c = Cluster::up(
        lab,
        ClusterSpec {
            network_interval: Duration::from_secs(1),
            ..ClusterSpec::default()
        },
        Binaries::find()?,
    )?;
    Ok((c, pristine_a2))
}

/// A host's network as `geomx-agent cleanup` must give it back: every IPv4 route of every
/// table, the links (`ip -o link`, without interface indexes), `iptables-save` without
/// counters, and daemon.json.
#[derive(Debug, PartialEq)]
struct HostNet {
    routes: String,
    links: String,
    iptables: String,
    daemon_json: String,
}

fn host_net(host: &LabHost) -> anyhow::Result<HostNet> {
    let mut links: Vec<String> = host
        .run(&["ip", "-o", "link", "show"])?
        .lines()
        .map(|l| match l.split_once(": ") {
            Some((index, rest)) if index.chars().all(|c| c.is_ascii_digit()) => rest.to_string(),
            _ => l.to_string(),
        })
        .collect();
    links.sort();
    Ok(HostNet {
        routes: host.netns().routes()?,
        links: links.join("\n"),
        iptables: host.netns().iptables_save()?,
        daemon_json: std::fs::read_to_string(host.dockerd()?.daemon_json())?,
    })
}

/// The lines of `after` not in `before` (+) and of `before` not in `after` (-).
fn line_diff(before: &str, after: &str) -> String {
    let (b, a): (BTreeSet<&str>, BTreeSet<&str>) =
        (before.lines().collect(), after.lines().collect());
    let mut out: Vec<String> = b.difference(&a).map(|l| format!("- {l}")).collect();
    out.extend(a.difference(&b).map(|l| format!("+ {l}")));
    out.join("\n")
}

/// A capture in the WAN router, started and known to be listening.
fn capture(c: &Cluster, name: &str, args: &[&str]) -> anyhow::Result<LabProcess> {
    let lab = c.lab();
    let mut argv: Vec<String> = ["tcpdump", "-i", "any", "-n", "-l"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(args.iter().map(|s| s.to_string()));
    let p = lab.spawn(lab.router()?, name, &argv, &[])?;
    eventually("tcpdump to listen", Duration::from_secs(10), || {
        std::fs::read_to_string(p.log())
            .ok()
            .filter(|l| l.contains("listening on"))
    })?;
    Ok(p)
}

/// Stops a capture and returns what it printed (its packets, one per line, and payloads).
fn finish(p: &LabProcess) -> anyhow::Result<String> {
    p.stop(Duration::from_secs(5))?;
    Ok(std::fs::read_to_string(p.log())?)
}

fn container(host: &LabHost, name: &str) -> anyhow::Result<Ipv4Addr> {
    let d = host.dockerd()?;
    d.docker(&["run", "-d", "--name", name, IMAGE, "sleep", "3600"])?;
    Ok(d.container_ip(name)?)
}

/// Sends `bytes` from container `from` on `src` to a listener in container `to` on `dst`;
/// returns what arrived, the source address the receiver saw and the rate.
fn transfer(
    src: &LabHost,
    from: &str,
    dst: &LabHost,
    to: &str,
    bytes: u64,
) -> anyhow::Result<(u64, Ipv4Addr, f64)> {
    let dd = dst.dockerd()?;
    let ip = dd.container_ip(to)?;
    let addr = SocketAddr::from((ip, 5301));
    let listener = dd.container_netns(to)?.listen_tcp(addr)?;
    let mib = bytes >> 20;
    let send = format!(
        "dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null | nc -w 5 {} {}",
        ip, 5301
    );
    let t0 = Instant::now();
    let (got, peer) = std::thread::scope(|s| {
        let sender = s.spawn(|| src.dockerd()?.docker(&["exec", from, "sh", "-c", &send]));
        listener.set_nonblocking(true)?;
        let t = Instant::now();
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if sender.is_finished() || t.elapsed() > Duration::from_secs(15) {
                        let said = sender
                            .join()
                            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
                        anyhow::bail!("no connection from {from} to {to}:5301 (sender: {said:?})");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        // until everything arrived: closing then ends the sender's nc, which waits for us
        while got < bytes {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) => {
                    drop(stream);
                    let _ = sender.join();
                    anyhow::bail!("receiving from {from} after {got} bytes: {e}");
                }
            }
        }
        drop(stream);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?
            .context("sender")?;
        anyhow::Ok((got, peer))
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let std::net::IpAddr::V4(seen) = peer.ip() else {
        anyhow::bail!("unexpected peer {peer}");
    };
    Ok((got, seen, got as f64 * 8.0 / secs))
}

/// Container to container between the long-lived containers `x` and `y`, in both
/// directions: a ping, then `bytes` over TCP that arrive whole from the sender's own
/// container address (no NAT inside the cluster). Returns the rates in Mbit/s.
fn both_ways(
    x: (&LabHost, &str),
    y: (&LabHost, &str),
    bytes: u64,
    what: &str,
) -> anyhow::Result<Vec<f64>> {
    let mut rates = Vec::new();
    for ((src, from), (dst, to)) in [(x, y), (y, x)] {
        let to_ip = dst.dockerd()?.container_ip(to)?;
        src.dockerd()?
            .docker(&[
                "exec",
                from,
                "ping",
                "-c",
                "1",
                "-W",
                "3",
                &to_ip.to_string(),
            ])
            .with_context(|| format!("{what}: ping {to} ({to_ip}) from {from}"))?;
        let (got, seen, rate) = transfer(src, from, dst, to, bytes)
            .with_context(|| format!("{what}: {from} -> {to}"))?;
        let from_ip = src.dockerd()?.container_ip(from)?;
        eprintln!(
            "{what} {from} -> {to}: {got} bytes at {:.0} Mbit/s, source {seen}",
            rate / 1e6
        );
        ensure!(
            got == bytes,
            "{what} {from} -> {to}: {got} of {bytes} bytes"
        );
        ensure!(
            seen == from_ip,
            "{what}: {to} saw {seen}, not {from}'s {from_ip} (NAT?)"
        );
        rates.push(rate / 1e6);
    }
    Ok(rates)
}

/// A lab host and the name of its long-lived container.
type Placed = (&'static str, &'static str);

/// The data-center pairs of [`TOPOLOGY`] through the test's containers: dc1-dc2, dc1-dc3,
/// dc2-dc3.
const DC_PAIRS: [(Placed, Placed); 3] = [
    (("a", "box-a"), ("b", "box-b")),
    (("a", "box-a"), ("c", "box-c")),
    (("b", "box-b"), ("c", "box-c")),
];

/// [`both_ways`] for every data-center pair.
fn every_dc_pair(c: &Cluster, bytes: u64, what: &str) -> anyhow::Result<()> {
    let lab = c.lab();
    for ((hx, nx), (hy, ny)) in DC_PAIRS {
        both_ways((lab.host(hx)?, nx), (lab.host(hy)?, ny), bytes, what)?;
    }
    Ok(())
}

/// `geomx-agent cleanup` on `host` with its agent stopped first (the lock refuses
/// otherwise); returns what it printed.
fn cleanup_host(c: &Cluster, host: &LabHost) -> anyhow::Result<String> {
    c.agent(&host.name).stop(Duration::from_secs(10))?;
    let d = host.dockerd()?;
    let bin = c.binaries().agent.display().to_string();
    let state = c.agent_state_dir(&host.name)?.display().to_string();
    Ok(host.run(&[
        bin.as_str(),
        "--state-dir",
        &state,
        "--daemon-json",
        &d.daemon_json().display().to_string(),
        "--docker-host",
        &d.url(),
        "--docker-restart-command",
        &d.restart_script().display().to_string(),
        "cleanup",
    ])?)
}

/// Cleanup on a2 while it still tunnels to b and c through geomx-wg: the interface, its
/// routes and geomx's chains go, Docker's chains stay, and a2's routes (every table), links,
/// rules and daemon.json are again what they were before its agent first ran. a2's agent
/// stays stopped (the VXLAN phase starts it again).
fn cleanup_restores_a_wireguard_host(c: &Cluster, pristine: &HostNet) -> anyhow::Result<()> {
    let a2 = c.lab().host("a2")?;
    ensure!(
        wg_peers(a2)?.len() == 2,
        "a2 does not tunnel to b and c: {:?}",
        wg_peers(a2)
    );
    let routes = geomx_routes(a2)?;
    ensure!(
        routes.iter().filter(|r| r.contains("dev geomx-wg")).count() == 2,
        "a2's routes: {routes:?}"
    );
    // containers gone first (their veths are no part of the host before geomx)
    a2.dockerd()?.remove_all_containers()?;
    let out = cleanup_host(c, a2)?;
    eprintln!("cleanup on a2:\n{}", out.trim());
    ensure!(
        out.contains("deleted WireGuard interface geomx-wg") && out.contains("deleted chain"),
        "{out}"
    );
    ensure!(
        a2.run(&["ip", "link", "show", "dev", "geomx-wg"]).is_err(),
        "geomx-wg still there"
    );
    ensure!(
        geomx_routes(a2)?.iter().all(|r| r.is_empty()),
        "protocol 247 routes left: {:?}",
        geomx_routes(a2)?
    );
    let after = host_net(a2)?;
    ensure!(
        !after.iptables.contains("GEOMX"),
        "geomx rules left:\n{}",
        after.iptables
    );
    ensure!(
        after.iptables.contains(":DOCKER ") && after.iptables.contains(":DOCKER-USER"),
        "cleanup removed Docker's own chains:\n{}",
        after.iptables
    );
    for (what, before, now) in [
        ("routes", &pristine.routes, &after.routes),
        ("links", &pristine.links, &after.links),
        ("iptables", &pristine.iptables, &after.iptables),
        ("daemon.json", &pristine.daemon_json, &after.daemon_json),
    ] {
        ensure!(
            before == now,
            "a2's {what} after cleanup differ from before its agent ran:\n{}",
            line_diff(before, now)
        );
    }
    Ok(())
}

/// The longest run of unanswered pings (at `gap` apart) in busybox ping's output.
fn longest_outage(out: &str, sent: u32, gap: Duration) -> Duration {
    let seqs: BTreeSet<u32> = out
        .lines()
        .filter_map(|l| l.split("seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|s| s.parse().ok())
        .collect();
    let mut longest = 0u32;
    let mut run = 0u32;
    for s in 0..sent {
        if seqs.contains(&s) {
            run = 0;
        } else {
            run += 1;
            longest = longest.max(run);
        }
    }
    gap * longest
}

fn wg_peers(host: &LabHost) -> anyhow::Result<BTreeSet<String>> {
    Ok(host
        .run(&["wg", "show", "geomx-wg", "peers"])?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The state a pass owns: routes, geomx's links, WireGuard configuration (not counters),
/// VXLAN entries and rules.
fn owned_state(host: &LabHost) -> anyhow::Result<String> {
    let routes = host.run(&["ip", "-4", "route", "show", "proto", "247"])?;
    let links: Vec<String> = host
        .run(&["ip", "-d", "-o", "link", "show"])?
        .lines()
        .filter(|l| l.contains(": geomx-"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter(|w| !w.starts_with("qlen") && !w.chars().all(|c| c.is_ascii_digit()))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let mut wg: Vec<String> = match host.run(&["wg", "show", "geomx-wg", "dump"]) {
        Ok(out) => out
            .lines()
            .map(|l| l.split('\t').take(4).collect::<Vec<_>>().join(" "))
            .collect(),
        Err(_) => Vec::new(),
    };
    // the interface first, then its peers in no particular order (wireguard-go lists them
    // from a map)
    if wg.len() > 1 {
        wg[1..].sort();
    }
    let vxlan = match host.run(&["bridge", "fdb", "show", "dev", "geomx-vxlan"]) {
        Ok(fdb) => format!(
            "{fdb}\n{}",
            host.run(&["ip", "neigh", "show", "dev", "geomx-vxlan"])?
        ),
        Err(_) => String::new(),
    };
    let rules = geomx_lab::normalize_iptables_save(&host.netns().iptables_save()?);
    Ok(format!(
        "{routes}\n{}\n{}\n{vxlan}\n{rules}",
        links.join("\n"),
        wg.join("\n")
    ))
}

/// Runs `geomx-agent ARGS` in `host`'s namespace: exit code, standard output and error.
fn agent_command(
    host: &LabHost,
    c: &Cluster,
    args: &[&str],
) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = host
        .netns()
        .command(&c.binaries().agent.display().to_string())
        .args(args)
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The WireGuard public key the controller holds for `host` (`geomxctl hosts -o json`).
/// The changes the agent of `host` logged so far (the network executor's lines).
fn applied_changes(c: &Cluster, host: &str) -> anyhow::Result<Vec<String>> {
    let log = std::fs::read_to_string(c.agent(host).log())?;
    Ok(log
        .lines()
        .filter(|l| l.contains("geomx_net::apply:"))
        .map(str::to_string)
        .collect())
}

/// Sets `backend = "vxlan"` in every agent's agent.toml and (re)starts the agents. Waits
/// until every host reaches its peers through geomx-vxlan (a host's routes come after its
/// Docker restart, if its pass made one).
fn vxlan_everywhere(c: &Cluster) -> anyhow::Result<()> {
    let lab = c.lab();
    let hosts = ["a", "a2", "b", "c"];
    for h in hosts {
        c.set_agent_backend(h, Some("vxlan"))?;
    }
    for h in hosts {
        let host = lab.host(h)?;
        eventually(
            &format!("{h}'s routes through geomx-vxlan"),
            Duration::from_secs(30),
            || {
                let r = geomx_routes(host).ok()?;
                (r.len() == 3
                    && r.iter()
                        .all(|l| l.contains("dev geomx-vxlan") && l.contains("onlink")))
                .then_some(())
            },
        )
        .with_context(|| format!("{h}'s routes: {:?}", geomx_routes(host)))?;
    }
    Ok(())
}

fn registered_key(c: &Cluster, host: &str) -> anyhow::Result<String> {
    let hosts = c.hosts()?;
    let h = hosts
        .iter()
        .find(|h| h["name"] == host)
        .with_context(|| format!("{host} listed"))?;
    h["wireguard_public_key"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{host} has no WireGuard key at the controller: {h}"))
}

/// `geomx-agent rotate-key` on a while containers in b and c ping a's container every 50 ms:
/// the longest gap stays within a few seconds, the controller holds the new public key, b and
/// c tunnel to it, and the private key file is new and 0600.
fn rotate_key_keeps_traffic_flowing(c: &Cluster, ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    const MAX_OUTAGE: Duration = Duration::from_secs(3);
    let lab = c.lab();
    let (a, b, ch) = (lab.host("a")?, lab.host("b")?, lab.host("c")?);
    let key_file = c.agent_state_dir("a")?.join("wireguard.key");
    let old_private = std::fs::read_to_string(&key_file)?;
    let old_public = registered_key(c, "a")?;
    ensure!(
        wg_peers(b)?.contains(&old_public),
        "b does not tunnel to a's key"
    );

    // pings of 50 ms from b's and c's containers to a's, logged inside the containers
    let gap = Duration::from_millis(50);
    let count = 160u32;
    let target = ips[0].to_string();
    let mut pingers = Vec::new();
    for (h, n) in [(b, "box-b"), (ch, "box-c")] {
        let d = h.dockerd()?.clone();
        let cmd = format!("ping -c {count} -i 0.05 -W 2 {target} > /tmp/rotate-ping.log 2>&1");
        let name = n.to_owned();
        pingers.push((
            h,
            n,
            std::thread::spawn(move || d.docker(&["exec", &name, "sh", "-c", &cmd])),
        ));
    }
    // wait until both answer (some replies logged) before rotating
    for (h, n, _) in &pingers {
        let d = h.dockerd()?;
        eventually(
            &format!("{n}'s pings to be answered"),
            Duration::from_secs(10),
            || {
                let log = d.docker(&["exec", n, "cat", "/tmp/rotate-ping.log"]).ok()?;
                (log.matches("seq=").count() >= 5).then_some(())
            },
        )?;
    }

    let conf = lab.dir().join("a").join("agent.toml").display().to_string();
    let t0 = Instant::now();
    let (code, out, err) =
        agent_command(a, c, &["rotate-key", "--config", &conf, "--output", "json"])?;
    let took = t0.elapsed();
    ensure!(
        code == Some(0),
        "rotate-key: exit {code:?}
{out}
{err}"
    );
    let reply: serde_json::Value = serde_json::from_str(&out).context("rotate-key's JSON")?;
    eprintln!("rotate-key on a in {took:?}: {reply}");
    ensure!(
        reply["result"] == "rotated"
            && reply["registered"] == true
            && reply["interface_reconfigured"] == true
            && reply["old_public_key"] == old_public.as_str(),
        "rotate-key's answer: {reply}"
    );
    let new_public = reply["new_public_key"]
        .as_str()
        .context("new_public_key")?
        .to_owned();
    ensure!(new_public != old_public, "the public key did not change");

    for (h, n, p) in pingers {
        p.join()
            .map_err(|_| anyhow::anyhow!("pinger panicked"))?
            .ok();
        let log = h
            .dockerd()?
            .docker(&["exec", n, "cat", "/tmp/rotate-ping.log"])?;
        let outage = longest_outage(&log, count, gap);
        eprintln!("{n} -> box-a across rotate-key: longest outage {outage:?}");
        ensure!(
            outage <= MAX_OUTAGE,
            "{n} -> box-a stopped for {outage:?} across the key rotation:
{log}"
        );
    }

    // the controller holds the new key, both peers tunnel to it (and not the old one)
    ensure!(
        registered_key(c, "a")? == new_public,
        "the controller still holds {} for a",
        registered_key(c, "a")?
    );
    for h in [b, ch] {
        let peers = wg_peers(h)?;
        ensure!(
            peers.contains(&new_public) && !peers.contains(&old_public),
            "{}'s tunnel peers: {peers:?}",
            h.name
        );
    }
    ensure!(
        a.run(&["wg", "show", "geomx-wg", "public-key"])?.trim() == new_public,
        "a's geomx-wg does not carry the new key"
    );
    let new_private = std::fs::read_to_string(&key_file)?;
    ensure!(
        new_private != old_private && !new_private.trim().is_empty(),
        "the private key file did not change"
    );
    let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "the private key file is {mode:o}");
    ensure!(
        !out.contains(new_private.trim()) && !err.contains(new_private.trim()),
        "rotate-key printed the private key"
    );
    Ok(())
}

/// `geomxctl plan` of the HiPS job with the central party moved to b (dc2) and the parties to
/// a and a2 (dc1, 80 ms away): connected, it warns naming b and a nearer host of dc1 with the
/// measured figures; offline it prints the same plan and no warning.
fn plan_warns_of_a_far_central_party(c: &Cluster, hips: &str) -> anyhow::Result<()> {
    let moved = hips
        .replacen("host = \"a\"", "host = \"b\"", 1)
        .replacen("hosts = [\"b\"]", "hosts = [\"a\"]", 1)
        .replacen("hosts = [\"c\"]", "hosts = [\"a2\"]", 1);
    ensure!(
        moved.contains("hosts = [\"a2\"]"),
        "hips.toml changed:\n{hips}"
    );
    let file = c.lab().dir().join("far-central.toml");
    std::fs::write(&file, &moved)?;
    let path = file.display().to_string();
    // the links' medians follow the 40 ms set above within a few probes
    let (out, err) = eventually("plan to warn", Duration::from_secs(40), || {
        let o = c.ctl(&["plan", &path]).ok()?;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.success() && err.contains("warning: the central party's host b is much farther"))
            .then(|| (String::from_utf8_lossy(&o.stdout).into_owned(), err))
    })?;
    eprintln!("{}", err.trim());
    ensure!(
        err.contains("from the parties' hosts (a, a2) than host a")
            && err.contains("consider [central] host = \"a")
            && err.contains(" ms from b"),
        "the warning: {err}"
    );
    let offline = std::process::Command::new(&c.binaries().ctl)
        .args(["plan", &path])
        .env_remove("GEOMX_CONTROLLER")
        .output()?;
    ensure!(
        offline.status.success()
            && String::from_utf8_lossy(&offline.stdout) == out
            && offline.stderr.is_empty(),
        "offline plan: {offline:?}"
    );
    Ok(())
}

#[test]
fn containers_in_three_data_centers_talk_through_wireguard_or_vxlan_and_the_firewall_holds()
-> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let (c, pristine_a2) = geo_cluster()?;
    let lab = c.lab();
    let (a, a2, b, ch) = (
        lab.host("a")?,
        lab.host("a2")?,
        lab.host("b")?,
        lab.host("c")?,
    );

    // backends: host-gw inside dc1, WireGuard to the other data centers
    let routes = geomx_routes(a)?;
    let sub = |h: &str| -> anyhow::Result<String> {
        let hosts = c.hosts()?;
        let v = hosts
            .iter()
            .find(|x| x["name"] == h)
            .context("host listed")?;
        Ok(v["subnet"].as_str().unwrap_or_default().to_string())
    };
    let want_lan = format!("{} via 10.1.1.35", sub("a2")?);
    ensure!(
        routes.iter().any(|r| r.starts_with(&want_lan)),
        "a's routes: {routes:?}"
    );
    for peer in ["b", "c"] {
        let s = sub(peer)?;
        ensure!(
            routes
                .iter()
                .any(|r| r.starts_with(&format!("{s} dev geomx-wg"))),
            "a's route to {peer} ({s}) is not through geomx-wg: {routes:?}"
        );
    }
    ensure!(wg_peers(a)?.len() == 2, "a tunnels to b and c only");

    eprintln!("backends as expected; importing the image");
    import_busybox(lab, &[a, a2, b, ch], IMAGE)?;
    let names = [(a, "box-a"), (a2, "box-a2"), (b, "box-b"), (ch, "box-c")];
    let mut ips = Vec::new();
    for (h, n) in names {
        ips.push(container(h, n)?);
    }

    // what crosses the WAN while containers talk: captured in the router
    let marker = format!("GEOMX-PLAINTEXT-{}", std::process::id());
    let clear = capture(&c, "cap-clear", &["net", "172.16.0.0/12"])?;
    let all = capture(&c, "cap-all", &["-A", "-s", "256", "not", "arp"])?;
    // every data-center pair and the two hosts of dc1, both ways: ping, TCP from the
    // container's own address (1 MiB: the capture prints every packet)
    every_dc_pair(&c, 1 << 20, "wireguard")?;
    both_ways((a, "box-a"), (a2, "box-a2"), 1 << 20, "host-gw")?;
    for (h, n, dst) in [(b, "box-b", ips[0]), (ch, "box-c", ips[2])] {
        let cmd = format!(
            "echo {marker} | nc -u -w 1 {dst} 5400; echo {marker} | nc -w 1 {dst} 5401; true"
        );
        h.dockerd()?.docker(&["exec", n, "sh", "-c", &cmd])?;
    }
    eprintln!("connectivity checked");

    // the firewall accepts container traffic only from the cluster: a stranger on dc1's LAN
    // with a route to a's containers is not forwarded to them, and an operator's DOCKER-USER
    // rule still applies to cluster traffic (geomx's jump sits below it)
    let dc1 = lab.dc_netns("dc1")?;
    let sa = sub("a")?;
    dc1.run(&["ip", "route", "add", &sa, "via", &a.underlay_ip.to_string()])?;
    let stranger = dc1.run(&["ping", "-c", "2", "-W", "1", &ips[0].to_string()]);
    dc1.run(&["ip", "route", "del", &sa])?;
    ensure!(
        stranger.is_err(),
        "a host on dc1's LAN that is no peer reached a's container: {stranger:?}"
    );
    let b_box = b.dockerd()?.container_ip("box-b")?.to_string();
    let ping_a = |h: &LabHost, n: &str| {
        h.dockerd()
            .and_then(|d| d.docker(&["exec", n, "ping", "-c", "1", "-W", "2", &ips[0].to_string()]))
            .is_ok()
    };
    a.run(&["iptables", "-I", "DOCKER-USER", "-s", &b_box, "-j", "DROP"])?;
    let (from_b, from_c) = (ping_a(b, "box-b"), ping_a(ch, "box-c"));
    a.run(&["iptables", "-D", "DOCKER-USER", "-s", &b_box, "-j", "DROP"])?;
    ensure!(
        !from_b && from_c,
        "with DOCKER-USER dropping box-b on a: b reached box-a {from_b}, c reached it {from_c}"
    );
    ensure!(
        ping_a(b, "box-b"),
        "box-b cannot reach box-a after the DROP is gone"
    );
    let seen_all = finish(&all)?;
    ensure!(
        !seen_all.contains(&marker),
        "the marker crossed the WAN in plaintext"
    );
    let wg_packets = seen_all
        .lines()
        .filter(|l| l.contains(".7951:") && l.contains("UDP"))
        .count();
    ensure!(
        wg_packets > 10,
        "hardly any WireGuard packets on the WAN ({wg_packets}): {}",
        &seen_all[..seen_all.len().min(2000)]
    );

    // bulk across every data-center pair, both ways: 64 MiB arrive whole, from the sender's
    // own container address (one transfer after another)
    every_dc_pair(&c, 64 << 20, "wireguard 64 MiB")?;
    let seen_clear = finish(&clear)?;
    let leaked: Vec<&str> = seen_clear
        .lines()
        .filter(|l| l.contains(" IP ") || l.contains(" In ") || l.contains(" Out "))
        .collect();
    ensure!(
        leaked.is_empty(),
        "container addresses on the WAN: {:?}",
        &leaked[..leaked.len().min(5)]
    );

    // every host measures its peers through the data plane: a's view in `geomxctl hosts`.
    // The round trip is the median of the last probes: the first ones ran while the lab was
    // still busy coming up (6 ms to a2 seen on a loaded CI machine), so wait until a2, in a's
    // own data center, measures below the WAN's 10 ms round trip.
    let mut last_seen = None;
    let links = eventually("a's measured links", Duration::from_secs(40), || {
        let hosts = c.hosts().ok()?;
        let l = hosts.iter().find(|h| h["name"] == "a")?["links"]
            .as_array()?
            .clone();
        last_seen = Some(l.clone());
        let rtt = |p: &str| {
            l.iter()
                .find(|x| x["peer"] == p)
                .and_then(|x| x["rtt_ms"].as_f64())
                .filter(|r| *r > 0.0)
        };
        let answered = ["a2", "b", "c"].iter().all(|p| rtt(p).is_some());
        (l.len() == 3 && answered && rtt("a2").is_some_and(|r| r < 9.0)).then_some(l)
    })
    .with_context(|| format!("a's links last seen: {last_seen:?}"))?;
    let wan_min = links
        .iter()
        .filter(|l| l["peer"] != "a2")
        .filter_map(|l| l["rtt_ms"].as_f64())
        .fold(f64::INFINITY, f64::min);
    for l in &links {
        let (peer, rtt) = (
            l["peer"].as_str().unwrap_or_default(),
            l["rtt_ms"].as_f64().unwrap_or(0.0),
        );
        eprintln!(
            "a -> {peer}: {} rtt {rtt:.2} ms loss {}% handshake {}",
            l["backend"], l["loss_pct"], l["handshake_age_s"]
        );
        if peer == "a2" {
            ensure!(
                l["backend"] == "host-gw" && rtt < wan_min,
                "a -> a2 (same data center) is not faster than across the WAN ({wan_min:.2} ms): {l}"
            );
            ensure!(l["handshake_age_s"].is_null(), "a -> a2 has no tunnel: {l}");
        } else {
            // 5 ms each way across the WAN
            ensure!(
                l["backend"] == "wireguard" && rtt >= 9.0,
                "a -> {peer}: {l}"
            );
            ensure!(
                l["handshake_age_s"].as_i64().is_some_and(|s| s < 180),
                "a -> {peer}: {l}"
            );
        }
    }
    let table = c.ctl(&["hosts", "--links"])?;
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    ensure!(
        table.contains("HOST") && table.contains("wireguard") && table.contains("host-gw"),
        "{table}"
    );

    // converged: over three network intervals (1 s each) the agent's passes change nothing
    let before = owned_state(a)?;
    let changes_before = applied_changes(&c, "a")?;
    std::thread::sleep(Duration::from_secs(3));
    let after = owned_state(a)?;
    ensure!(
        after == before,
        "a pass changed a converged host:\n{before}\n---\n{after}"
    );
    let changes_after = applied_changes(&c, "a")?;
    ensure!(
        changes_after.len() == changes_before.len(),
        "passes on a converged host made changes: {:?}",
        &changes_after[changes_before.len().min(changes_after.len())..]
    );

    // drift: a tunnel peer and a route removed by hand come back
    let b_key = wg_peers(a)?.into_iter().next().context("a peer")?;
    a.run(&["wg", "set", "geomx-wg", "peer", &b_key, "remove"])?;
    let sb = sub("b")?;
    a.run(&["ip", "route", "del", &sb])?;
    eventually("drift repaired", Duration::from_secs(15), || {
        (wg_peers(a).ok()?.contains(&b_key)
            && geomx_routes(a)
                .ok()?
                .iter()
                .any(|r| r.starts_with(&format!("{sb} dev geomx-wg"))))
        .then_some(())
    })?;

    eprintln!("drift repaired");
    // kill -9 of a's agent and a restart: container traffic b -> a never stops for a second
    let gap = Duration::from_millis(20);
    let count = 250u32;
    let pinger = {
        let d = b.dockerd()?.clone();
        let target = ips[0].to_string();
        std::thread::spawn(move || {
            d.docker(&[
                "exec",
                "box-b",
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                "0.02",
                "-W",
                "2",
                &target,
            ])
        })
    };
    std::thread::sleep(Duration::from_millis(600));
    geomx_e2e::faults::restart_agent(&c, "a", true)?;
    let out = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))?
        .unwrap_or_else(|e| e.to_string());
    let outage = longest_outage(&out, count, gap);
    eprintln!("longest outage across the agent's kill -9 and restart: {outage:?}");
    ensure!(
        outage <= Duration::from_secs(1),
        "traffic stopped for {outage:?}:\n{out}"
    );

    rotate_key_keeps_traffic_flowing(&c, &ips)?;

    // the HiPS reference job (central party in dc1, parties in dc2 and dc3) over WAN links
    // of 40 ms one way and 0.1 % loss, changed at run time with `geomx-lab link set`
    for (x, y) in [("dc1", "dc2"), ("dc1", "dc3"), ("dc2", "dc3")] {
        let out = std::process::Command::new(geomx_lab::lab_binary()?)
            .args(["--name", lab.name(), "--root"])
            .arg(&lab.spec().root)
            .args(["link", "set", x, y, "--delay", "40ms", "--loss", "0.1%"])
            .output()?;
        ensure!(
            out.status.success(),
            "link set {x} {y}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rtt =
        geomx_lab::measure::ping_rtts(a.netns(), b.underlay_ip, 3, Duration::from_millis(50))?;
    ensure!(
        rtt.iter().all(|r| *r > 79.0),
        "a-b round trip {rtt:?} after link set"
    );
    let hips = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hips.toml"),
    )?;
    c.submit_ok("hips.toml", &hips)?;
    let job = c.wait_phase("hips-mnist", "Succeeded", Duration::from_secs(180))?;
    eprintln!("HiPS across three data centers: {}", job["reason"]);
    plan_warns_of_a_far_central_party(&c, &hips)?;

    // cleanup on a WireGuard host gives it back as it was before its agent first ran
    cleanup_restores_a_wireguard_host(&c, &pristine_a2)?;

    // backend = "vxlan" on every agent: the same containers talk through geomx-vxlan
    // (static FDB and neighbour entries, onlink routes), VXLAN's UDP port on the WAN
    vxlan_everywhere(&c)?;
    let vx_cap = capture(&c, "cap-vxlan", &["udp", "port", "7952"])?;
    every_dc_pair(&c, 1 << 20, "vxlan")?;
    assert_containers_connected(a, a2, IMAGE)?;
    let (got, seen, rate) = transfer(b, "box-b", ch, "box-c", 16 << 20)?;
    eprintln!(
        "vxlan box-b -> box-c: {got} bytes at {:.0} Mbit/s, source {seen}",
        rate / 1e6
    );
    ensure!(
        got == 16 << 20 && seen == b.dockerd()?.container_ip("box-b")?,
        "vxlan transfer: {got} bytes from {seen}"
    );
    let vx_seen = finish(&vx_cap)?;
    ensure!(
        vx_seen.lines().filter(|l| l.contains(".7952: UDP")).count() > 10,
        "no VXLAN on the WAN: {}",
        &vx_seen[..vx_seen.len().min(2000)]
    );
    let fdb = a.run(&["bridge", "fdb", "show", "dev", "geomx-vxlan"])?;
    for peer in [b, ch, a2] {
        ensure!(
            fdb.contains(&format!("dst {} ", peer.underlay_ip)) && fdb.contains("permanent"),
            "a's fdb has no entry for {}: {fdb}",
            peer.name
        );
    }
    ensure!(
        a.run(&["ip", "link", "show", "dev", "geomx-wg"]).is_err(),
        "a still has geomx-wg with no WireGuard peer"
    );
    // and converged: passes over three network intervals change nothing (FDB included) and
    // a's agent logs no change (a pass that re-sets an entry would leave the state equal)
    let before = owned_state(a)?;
    let changes_before = applied_changes(&c, "a")?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        owned_state(a)? == before,
        "a pass changed a converged vxlan host"
    );
    let changes_after = applied_changes(&c, "a")?;
    ensure!(
        changes_after.len() == changes_before.len(),
        "passes on a converged vxlan host made changes: {:?}",
        &changes_after[changes_before.len().min(changes_after.len())..]
    );

    // cleanup on c removes the overlay, its routes and chains, and nothing else
    c.agent("c").stop(Duration::from_secs(10))?;
    let state_c = c.agent_state_dir("c")?.display().to_string();
    let (code, _, err) = agent_command(ch, &c, &["--state-dir", &state_c, "rotate-key"])?;
    ensure!(
        code == Some(1) && err.contains("no geomx-agent is running on this host"),
        "rotate-key without an agent: exit {code:?}: {err}"
    );
    let out = cleanup_host(&c, ch)?;
    ensure!(out.contains("deleted VXLAN interface geomx-vxlan"), "{out}");
    for dev in ["geomx-wg", "geomx-vxlan"] {
        ensure!(
            ch.run(&["ip", "link", "show", "dev", dev]).is_err(),
            "{dev} still there"
        );
    }
    ensure!(
        geomx_routes(ch)?.iter().all(|r| r.is_empty()),
        "routes left: {:?}",
        geomx_routes(ch)?
    );
    let save = ch.netns().iptables_save()?;
    ensure!(!save.contains("GEOMX"), "geomx rules left:\n{save}");
    ensure!(
        save.contains("DOCKER"),
        "cleanup removed Docker's own rules:\n{save}"
    );

    // b told to use host-gw for everyone: its peers in dc1 are refused by name, and b's
    // tunnel to them stays as it was (nothing half-applied)
    let before = owned_state(b)?;
    let conf = lab.dir().join("b").join("agent.toml");
    c.set_agent_backend("b", Some("host-gw"))?;
    let err = eventually("b to report the refusal", Duration::from_secs(30), || {
        let hosts = c.hosts().ok()?;
        let e = hosts.iter().find(|h| h["name"] == "b")?["network_error"]
            .as_str()?
            .to_string();
        (!e.is_empty()).then_some(e)
    })?;
    ensure!(
        err.contains("peer a")
            && err.contains("backend host-gw")
            && err.contains("it is reached via 10.2.1.1"),
        "b's refusal: {err}"
    );
    ensure!(
        owned_state(b)? == before,
        "a refused pass changed b's network"
    );
    // and b uses no WireGuard now: rotate-key refuses, naming why, and changes nothing
    let key_b = std::fs::read_to_string(c.agent_state_dir("b")?.join("wireguard.key"))?;
    let conf_b = conf.display().to_string();
    let (code, _, err) = agent_command(b, &c, &["rotate-key", "--config", &conf_b])?;
    ensure!(
        code == Some(2) && err.contains("backend is host-gw (agent.toml)"),
        "rotate-key on a host-gw host: exit {code:?}: {err}"
    );
    ensure!(
        std::fs::read_to_string(c.agent_state_dir("b")?.join("wireguard.key"))? == key_b,
        "a refused rotation changed b's key"
    );
    c.down()?;
    Ok(())
}
