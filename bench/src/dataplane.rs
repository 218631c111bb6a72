//! Data-plane throughput (issue 6, item 3): container on a → container on c through geomx's
//! routes, against host a → host c over the same underlay, in the same run; and, when Docker
//! swarm can be set up across the lab's dockerds, the overlay (VXLAN) users would compare
//! with.
//!
//! Everything runs in a lab (network namespaces on an underlay bridge, one dockerd each):
//! `geomx-agent network apply` on a and c with the seed subnets (172.17.34.0/24 and
//! 172.17.33.0/24), one busybox container per host, and iperf3 (the machine's binary) run
//! inside the namespaces through `nsenter --net=...`: the containers' namespaces
//! (`/proc/<container pid>/ns/net`) for the container path, the hosts' for the underlay.
//! Modes are interleaved within every repetition (rotating which goes first) so that drift
//! of the shared machine hits them alike; the figures are medians.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_lab::{Lab, LabHost, LabSpec, Netns, Rootfs, seed_subnet};

use crate::procfs::{self, MachineWindow};
use crate::report::{Line, median, note};

const CLUSTER: &str = "172.17.0.0/16";
const IMAGE: &str = "geomx-bench/busybox:1";
const OVERLAY_NET: &str = "geomxbenchov";
const OVERLAY_SUBNET: &str = "10.77.0.0/24";
const PORT_CONTAINER: u16 = 5201;
const PORT_HOST: u16 = 5202;
const PORT_OVERLAY: u16 = 5203;

/// Knobs of the data-plane benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Repetitions of every mode.
    pub reps: usize,
    /// Seconds of each iperf3 run (after 1 s that is omitted: TCP slow start).
    pub seconds: u32,
    /// Parallel TCP streams per run (iperf3 -P).
    pub streams: u32,
    /// Try Docker swarm's overlay too.
    pub overlay: bool,
    /// `geomx-agent`.
    pub agent_bin: PathBuf,
}

/// What the benchmark measured, Gbit/s per run.
#[derive(Clone, Debug)]
pub struct DataplaneResult {
    /// Host a → host c.
    pub host: Vec<f64>,
    /// Container on a → container on c (geomx routes).
    pub container: Vec<f64>,
    /// Container on a → container on c over a swarm overlay: the runs, or why not.
    pub overlay: Result<Vec<f64>, String>,
    /// The whole machine's CPU use during the runs, % of all cores.
    pub machine_busy: f64,
    /// 1-minute load average after the runs.
    pub loadavg: f64,
}

impl DataplaneResult {
    /// Median container throughput over median host throughput.
    pub fn ratio(&self) -> f64 {
        median(&self.container) / median(&self.host)
    }

    /// The median of the per-repetition ratios container/host (each pair measured within
    /// seconds of each other: less exposed to the machine's drift).
    pub fn paired_ratio(&self) -> f64 {
        let r: Vec<f64> = self
            .container
            .iter()
            .zip(&self.host)
            .map(|(c, h)| c / h)
            .collect();
        median(&r)
    }
}

/// A throughput path: iperf3 server in `server_ns` on `server_ip:port`, client in `client_ns`.
pub(crate) struct Path2 {
    pub(crate) name: &'static str,
    pub(crate) client_ns: Netns,
    pub(crate) server_ns: Netns,
    pub(crate) server_ip: Ipv4Addr,
    pub(crate) port: u16,
}

/// Child processes killed when dropped (iperf3 servers in namespaces the lab teardown does
/// not know: the containers').
#[derive(Default)]
pub(crate) struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the benchmark; prints its lines.
pub fn run(opts: &Options) -> anyhow::Result<DataplaneResult> {
    let started = Instant::now();
    let lab = Lab::up(LabSpec::for_test().seed_hosts()).context("starting the lab")?;
    note(format!(
        "lab {} up in {:.1}s",
        lab.name(),
        started.elapsed().as_secs_f64()
    ));
    let result = run_in_lab(&lab, opts);
    if result.is_err() {
        lab.dump_logs(20);
    }
    let down = lab.down();
    let result = result?;
    down.context("tearing the lab down")?;
    Ok(result)
}

fn run_in_lab(lab: &Lab, opts: &Options) -> anyhow::Result<DataplaneResult> {
    let a = lab.host("a")?;
    let c = lab.host("c")?;
    // geomx's host networking on a and c (each restarts its dockerd once)
    std::thread::scope(|s| {
        let runs: Vec<_> = [(a, c), (c, a)]
            .into_iter()
            .map(|(h, peer)| s.spawn(move || apply_network(h, peer, &opts.agent_bin)))
            .collect();
        runs.into_iter().try_for_each(|r| {
            r.join()
                .map_err(|_| anyhow::anyhow!("network apply thread panicked"))?
        })
    })?;
    let rootfs = Rootfs::new(&lab.dir().join("rootfs"))?.with_busybox()?;
    for h in [a, c] {
        rootfs
            .import(h.dockerd()?, IMAGE, &["/bin/sh"])
            .with_context(|| format!("importing the busybox image on {}", h.name))?;
    }
    let (da, dc) = (a.dockerd()?, c.dockerd()?);
    da.docker(&["run", "-d", "--name", "bench-a", IMAGE, "sleep", "86400"])?;
    dc.docker(&["run", "-d", "--name", "bench-c", IMAGE, "sleep", "86400"])?;
    let ip_a = da.container_ip("bench-a")?;
    let ip_c = dc.container_ip("bench-c")?;
    ensure!(
        ip_a.octets()[..3] == [172, 17, 34] && ip_c.octets()[..3] == [172, 17, 33],
        "the containers got {ip_a} and {ip_c}, not addresses of the seed subnets"
    );
    let ns_a = da.container_netns("bench-a")?;
    let ns_c = dc.container_netns("bench-c")?;
    let mut paths = vec![
        Path2 {
            name: "host",
            client_ns: a.netns().clone(),
            server_ns: c.netns().clone(),
            server_ip: c.underlay_ip,
            port: PORT_HOST,
        },
        Path2 {
            name: "container",
            client_ns: ns_a,
            server_ns: ns_c,
            server_ip: ip_c,
            port: PORT_CONTAINER,
        },
    ];
    let overlay = if opts.overlay {
        match setup_overlay(a, c) {
            Ok(p) => {
                paths.push(p);
                Ok(())
            }
            Err(e) => {
                note(format!("swarm overlay unavailable: {e:#}"));
                Err(format!("{e:#}"))
            }
        }
    } else {
        Err("not attempted (--no-overlay)".to_owned())
    };

    let mut servers = Children::default();
    for p in &paths {
        servers.0.push(iperf_server(p)?);
    }
    // one unrecorded second per path: ARP, conntrack, route caches, TCP metrics
    for p in &paths {
        iperf_client(p, 1, opts.streams)
            .with_context(|| format!("iperf3 warm-up over the {} path", p.name))?;
    }
    let machine = MachineWindow::start()?;
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for rep in 0..opts.reps {
        for k in 0..paths.len() {
            let i = (k + rep) % paths.len();
            let gbps = iperf_client(&paths[i], opts.seconds, opts.streams)
                .with_context(|| format!("iperf3 over the {} path", paths[i].name))?;
            note(format!(
                "rep {}/{}: {} {gbps:.2} Gbit/s",
                rep + 1,
                opts.reps,
                paths[i].name
            ));
            runs[i].push(gbps);
        }
    }
    drop(servers);
    let machine_busy = machine.percent()?;
    let mut runs = runs.into_iter();
    let host = runs.next().unwrap_or_default();
    let container = runs.next().unwrap_or_default();
    let result = DataplaneResult {
        host,
        container,
        overlay: overlay.map(|()| runs.next().unwrap_or_default()),
        machine_busy,
        loadavg: procfs::loadavg(),
    };
    print(&result, opts);
    Ok(result)
}

/// Writes host.toml (this host's seed subnet, `peer` as its only peer) and runs
/// `geomx-agent network apply` inside the host's namespace.
fn apply_network(host: &LabHost, peer: &LabHost, agent: &Path) -> anyhow::Result<()> {
    let subnet = seed_subnet(&host.name).context("a seed host")?;
    let peer_subnet = seed_subnet(&peer.name).context("a seed host")?;
    let file = host.dir().join("host.toml");
    let text = format!(
        "name = \"{}\"\nsubnet = \"{subnet}\"\ncluster = \"{CLUSTER}\"\n\n[[peers]]\nname = \"{}\"\nunderlay_ip = \"{}\"\nsubnet = \"{peer_subnet}\"\n",
        host.name, peer.name, peer.underlay_ip
    );
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    let d = host.dockerd()?;
    let out = host
        .netns()
        .command(&agent.display().to_string())
        .arg("--state-dir")
        .arg(host.dir().join("agent-state"))
        .arg("--daemon-json")
        .arg(d.daemon_json())
        .arg("--docker-host")
        .arg(d.url())
        .arg("--docker-restart-command")
        .arg(d.restart_script())
        .args(["network", "apply", "--config"])
        .arg(&file)
        .env("GEOMX_LOG", "warn")
        .output()
        .with_context(|| format!("running {}", agent.display()))?;
    if !out.status.success() {
        bail!(
            "geomx-agent network apply on {} failed ({}):\n{}",
            host.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Swarm on a (advertising its underlay address), c joins, an attachable overlay network,
/// one container on it per host; returns the path between them.
fn setup_overlay(a: &LabHost, c: &LabHost) -> anyhow::Result<Path2> {
    let (da, dc) = (a.dockerd()?, c.dockerd()?);
    let (ua, uc) = (a.underlay_ip.to_string(), c.underlay_ip.to_string());
    da.docker(&[
        "swarm",
        "init",
        "--advertise-addr",
        &ua,
        "--listen-addr",
        &format!("{ua}:2377"),
    ])
    .context("docker swarm init on a")?;
    let token = da
        .docker(&["swarm", "join-token", "-q", "worker"])
        .context("join token")?;
    dc.docker(&[
        "swarm",
        "join",
        "--token",
        &token,
        "--advertise-addr",
        &uc,
        "--listen-addr",
        &format!("{uc}:2377"),
        &format!("{ua}:2377"),
    ])
    .context("docker swarm join on c")?;
    da.docker(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--attachable",
        "--subnet",
        OVERLAY_SUBNET,
        OVERLAY_NET,
    ])
    .context("creating the overlay network")?;
    da.docker(&[
        "run",
        "-d",
        "--name",
        "ov-a",
        "--network",
        OVERLAY_NET,
        IMAGE,
        "sleep",
        "86400",
    ])
    .context("a container on the overlay on a")?;
    // c learns about the network through the swarm: retry for a while
    let start = Instant::now();
    loop {
        match dc.docker(&[
            "run",
            "-d",
            "--name",
            "ov-c",
            "--network",
            OVERLAY_NET,
            IMAGE,
            "sleep",
            "86400",
        ]) {
            Ok(_) => break,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                let _ = dc.docker(&["rm", "-f", "ov-c"]);
                note(format!("overlay container on c not yet: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e).context("a container on the overlay on c"),
        }
    }
    let ip = |d: &geomx_lab::Dockerd, name: &str| -> anyhow::Result<Ipv4Addr> {
        let f = format!("{{{{(index .NetworkSettings.Networks \"{OVERLAY_NET}\").IPAddress}}}}");
        let s = d.docker(&["inspect", "-f", &f, name])?;
        s.parse()
            .with_context(|| format!("{name} has no overlay address ({s:?})"))
    };
    let ip_c = ip(dc, "ov-c")?;
    let start = Instant::now();
    loop {
        match da.docker(&[
            "exec",
            "ov-a",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &ip_c.to_string(),
        ]) {
            Ok(_) => break,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                note(format!("overlay ping not yet: {e}"));
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).context("ping over the overlay"),
        }
    }
    Ok(Path2 {
        name: "overlay",
        client_ns: da.container_netns("ov-a")?,
        server_ns: dc.container_netns("ov-c")?,
        server_ip: ip_c,
        port: PORT_OVERLAY,
    })
}

pub(crate) fn iperf_server(p: &Path2) -> anyhow::Result<Child> {
    let mut cmd: Command = p.server_ns.command("iperf3");
    cmd.args(["-s", "-B"])
        .arg(p.server_ip.to_string())
        .arg("-p")
        .arg(p.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .with_context(|| format!("starting the iperf3 server of the {} path", p.name))
}

/// One iperf3 run; the receiver's throughput in Gbit/s.
pub(crate) fn iperf_client(p: &Path2, seconds: u32, streams: u32) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        let out = p
            .client_ns
            .command("iperf3")
            .arg("-c")
            .arg(p.server_ip.to_string())
            .arg("-p")
            .arg(p.port.to_string())
            .args(["-O", "1", "-J", "-t"])
            .arg(seconds.to_string())
            .arg("-P")
            .arg(streams.to_string())
            .stdin(Stdio::null())
            .output()
            .context("running iperf3")?;
        let text = String::from_utf8_lossy(&out.stdout);
        match parse_iperf(&text) {
            Ok(bps) if out.status.success() => return Ok(bps / 1e9),
            other => {
                let why = match other {
                    Ok(_) => format!("exit {}", out.status),
                    Err(e) => format!("{e:#}"),
                };
                // the server may still be starting
                if start.elapsed() < Duration::from_secs(10) && why.contains("refused") {
                    std::thread::sleep(Duration::from_millis(300));
                    continue;
                }
                bail!(
                    "iperf3 to {}:{} failed: {why}\n{}",
                    p.server_ip,
                    p.port,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// `end.sum_received.bits_per_second` of iperf3's JSON (an `error` field is an error).
fn parse_iperf(json: &str) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("no end.sum_received.bits_per_second in iperf3's output")
}

fn print(r: &DataplaneResult, opts: &Options) {
    let host = median(&r.host);
    let container = median(&r.container);
    let mut line = Line::new("dataplane_ratio", format!("{:.3}", r.ratio()))
        .f("paired_ratio", r.paired_ratio(), 3)
        .f("container_gbps", container, 2)
        .f("host_gbps", host, 2);
    match &r.overlay {
        Ok(runs) => {
            let o = median(runs);
            let paired: Vec<f64> = runs.iter().zip(&r.host).map(|(o, h)| o / h).collect();
            line = line
                .f("overlay_gbps", o, 2)
                .f("overlay_ratio", o / host, 3)
                .f("overlay_paired_ratio", median(&paired), 3);
        }
        Err(_) => line = line.kv("overlay_gbps", "unavailable"),
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    line.kv("reps", opts.reps)
        .kv("seconds", opts.seconds)
        .kv("streams", opts.streams)
        .kv("host_runs", fmt(&r.host))
        .kv("container_runs", fmt(&r.container))
        .kv(
            "overlay_runs",
            r.overlay.as_ref().map_or("-".to_owned(), |v| fmt(v)),
        )
        .f("machine_busy_pct", r.machine_busy, 0)
        .f("loadavg", r.loadavg, 1)
        .print();
    note(format!(
        "container→container {container:.2} Gbit/s vs host→host {host:.2} Gbit/s: ratio {:.3}, paired {:.3} (target ≥ 0.95){}",
        r.ratio(),
        r.paired_ratio(),
        match &r.overlay {
            Ok(v) => format!(
                "; swarm overlay {:.2} Gbit/s (ratio {:.3})",
                median(v),
                median(v) / host
            ),
            Err(e) => format!("; overlay not measured: {e}"),
        }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_json_is_read() {
        let ok = r#"{"start":{},"end":{"sum_received":{"bits_per_second":2.5e10}}}"#;
        assert_eq!(parse_iperf(ok).unwrap(), 2.5e10);
        let err =
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        assert!(
            parse_iperf(err)
                .unwrap_err()
                .to_string()
                .contains("refused")
        );
        assert!(parse_iperf("garbage").is_err());
    }
}
