//! Data-plane throughput per backend, on the LAN and across a shaped WAN link (issue 16): a
//! geo-distributed lab of two data centers (hosts a and a2 in dc1, b in dc2, the link
//! 100 Mbit and 40 ms one way) with a whole cluster on it, one busybox container per host,
//! and iperf3 in the same run over four paths per phase:
//!
//! - LAN underlay a → a2, and container a → container a2;
//! - WAN underlay a → b, and container a → container b;
//!
//! in three phases, the agents restarted with another backend between them: `auto`
//! (host-gw on the LAN, WireGuard across the WAN), `wireguard` (on the LAN too) and
//! `vxlan` (both). Each figure is container ÷ underlay over the same links, measured in the
//! same phase; paths are interleaved within every repetition (rotating which goes first)
//! and the figures are medians.

use std::time::Instant;

use anyhow::{Context, ensure};
use geomx_lab::topology::parse_topology;
use geomx_lab::{Binaries, Cluster, ClusterSpec, Lab, LabSpec, Rootfs};

use crate::dataplane::{Children, Path2, iperf_client, iperf_server};
use crate::report::{Line, median, note};

const IMAGE: &str = "geomx-bench/busybox:1";

const TOPOLOGY: &str = r#"
[[dc]]
name = "dc1"
subnet = "10.1.1.0/24"
hosts = [{ name = "a", ip = "10.1.1.34" }, { name = "a2", ip = "10.1.1.35" }]
[[dc]]
name = "dc2"
subnet = "10.2.1.0/24"
hosts = [{ name = "b", ip = "10.2.1.29" }]
[[link]]
dcs = ["dc1", "dc2"]
delay = "40ms"
rate = "100mbit"
"#;

/// Knobs of the WAN data-plane benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Repetitions of every path.
    pub reps: usize,
    /// Seconds of each iperf3 run (after 1 s that is omitted).
    pub seconds: u32,
    /// The geomx binaries.
    pub bins: Binaries,
}

/// One phase's runs in Gbit/s: LAN underlay, LAN container, WAN underlay, WAN container.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    /// The runs of every path.
    pub runs: [Vec<f64>; 4],
}

impl Phase {
    /// Container ÷ underlay on the LAN.
    pub fn lan_ratio(&self) -> f64 {
        median(&self.runs[1]) / median(&self.runs[0])
    }

    /// Container ÷ underlay across the shaped WAN link.
    pub fn wan_ratio(&self) -> f64 {
        median(&self.runs[3]) / median(&self.runs[2])
    }
}

/// The three phases.
#[derive(Clone, Debug)]
pub struct WanResult {
    /// `auto`: host-gw on the LAN, WireGuard across the WAN.
    pub auto: Phase,
    /// `wireguard` everywhere.
    pub wireguard: Phase,
    /// `vxlan` everywhere.
    pub vxlan: Phase,
}

impl WanResult {
    /// WireGuard container ÷ underlay across the shaped WAN link (the target's figure).
    pub fn wan_ratio(&self) -> f64 {
        self.auto.wan_ratio()
    }
}

/// Runs the benchmark; prints its lines.
pub fn run(opts: &Options) -> anyhow::Result<WanResult> {
    let started = Instant::now();
    let topo = parse_topology("bench-wan.toml", TOPOLOGY)?;
    let lab = Lab::up(LabSpec::for_test().topology(topo)).context("starting the geo lab")?;
    let cluster = Cluster::up(
        lab,
        ClusterSpec {
            psnode_image: false,
            ..ClusterSpec::default()
        },
        opts.bins.clone(),
    )
    .context("starting geomx on the geo lab")?;
    note(format!(
        "geo lab {} with geomx up in {:.1}s",
        cluster.lab().name(),
        started.elapsed().as_secs_f64()
    ));
    let result = measure(&cluster, opts);
    if result.is_err() {
        cluster.lab().dump_logs(20);
    }
    let down = cluster.down();
    let result = result?;
    down.context("tearing the geo lab down")?;
    Ok(result)
}

/// Waits until a's two geomx routes (to a2, then to b) go as `want` says.
fn wait_routes(a: &geomx_lab::LabHost, backend: &str, want: &[&str; 2]) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let routes = a.run(&["ip", "-4", "route", "show", "proto", "247"])?;
        let lines: Vec<&str> = routes.lines().collect();
        let ok = lines.len() == 2
            && lines.iter().any(|l| l.contains(want[0]))
            && lines
                .iter()
                .all(|l| l.contains(want[0]) || l.contains(want[1]));
        if ok {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "a's routes are not what backend {backend} makes ({want:?}):\n{routes}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// One phase: iperf3 over the four paths, interleaved.
fn measure_phase(paths: &[Path2; 4], opts: &Options, backend: &str) -> anyhow::Result<Phase> {
    let mut servers = Children::default();
    for p in paths {
        servers.0.push(iperf_server(p)?);
    }
    for p in paths {
        iperf_client(p, 1, 1)
            .with_context(|| format!("iperf3 warm-up over the {} path ({backend})", p.name))?;
    }
    let mut phase = Phase::default();
    for rep in 0..opts.reps {
        for k in 0..paths.len() {
            let i = (k + rep) % paths.len();
            // the WAN paths get two more seconds: slow start over an 80 ms round trip
            let secs = if i >= 2 {
                opts.seconds + 2
            } else {
                opts.seconds
            };
            let gbps = iperf_client(&paths[i], secs, 1)
                .with_context(|| format!("iperf3 over the {} path ({backend})", paths[i].name))?;
            note(format!(
                "{backend} rep {}/{}: {} {:.1} Mbit/s",
                rep + 1,
                opts.reps,
                paths[i].name,
                gbps * 1000.0
            ));
            phase.runs[i].push(gbps);
        }
    }
    drop(servers);
    Ok(phase)
}

fn measure(c: &Cluster, opts: &Options) -> anyhow::Result<WanResult> {
    let lab = c.lab();
    let (a, a2, b) = (lab.host("a")?, lab.host("a2")?, lab.host("b")?);
    let rootfs = Rootfs::new(&lab.dir().join("rootfs"))?.with_busybox()?;
    for h in [a, a2, b] {
        rootfs
            .import(h.dockerd()?, IMAGE, &["/bin/sh"])
            .with_context(|| format!("importing the busybox image on {}", h.name))?;
        h.dockerd()?.docker(&[
            "run",
            "-d",
            "--name",
            &format!("bench-{}", h.name),
            IMAGE,
            "sleep",
            "86400",
        ])?;
    }
    wait_routes(a, "auto", &["via 10.1.1.35", "dev geomx-wg"])?;
    let ctr = |h: &geomx_lab::LabHost| -> anyhow::Result<(geomx_lab::Netns, std::net::Ipv4Addr)> {
        let d = h.dockerd()?;
        let n = format!("bench-{}", h.name);
        Ok((d.container_netns(&n)?, d.container_ip(&n)?))
    };
    let (ns_a, _) = ctr(a)?;
    let (ns_a2, ip_a2) = ctr(a2)?;
    let (ns_b, ip_b) = ctr(b)?;
    let paths = [
        Path2 {
            name: "lan underlay",
            client_ns: a.netns().clone(),
            server_ns: a2.netns().clone(),
            server_ip: a2.underlay_ip,
            port: 5211,
        },
        Path2 {
            name: "lan container",
            client_ns: ns_a.clone(),
            server_ns: ns_a2,
            server_ip: ip_a2,
            port: 5212,
        },
        Path2 {
            name: "wan underlay",
            client_ns: a.netns().clone(),
            server_ns: b.netns().clone(),
            server_ip: b.underlay_ip,
            port: 5213,
        },
        Path2 {
            name: "wan container",
            client_ns: ns_a,
            server_ns: ns_b,
            server_ip: ip_b,
            port: 5214,
        },
    ];
    let auto = measure_phase(&paths, opts, "auto")?;
    for h in ["a", "a2", "b"] {
        c.set_agent_backend(h, Some("wireguard"))?;
    }
    wait_routes(a, "wireguard", &["dev geomx-wg", "dev geomx-wg"])?;
    let wireguard = measure_phase(&paths, opts, "wireguard")?;
    for h in ["a", "a2", "b"] {
        c.set_agent_backend(h, Some("vxlan"))?;
    }
    wait_routes(a, "vxlan", &["dev geomx-vxlan", "dev geomx-vxlan"])?;
    let vxlan = measure_phase(&paths, opts, "vxlan")?;
    let r = WanResult {
        auto,
        wireguard,
        vxlan,
    };
    let mbit = |v: &[f64]| median(v) * 1000.0;
    for (name, phase, lan) in [
        ("hostgw", &r.auto, true),
        ("wireguard", &r.auto, false),
        ("wireguard", &r.wireguard, true),
        ("vxlan", &r.vxlan, true),
        ("vxlan", &r.vxlan, false),
    ] {
        let (key, ratio, i) = if lan {
            (format!("dataplane_lan_{name}_ratio"), phase.lan_ratio(), 0)
        } else {
            (format!("dataplane_wan_{name}_ratio"), phase.wan_ratio(), 2)
        };
        let mut line = Line::new(&key, format!("{ratio:.3}"))
            .f("container_mbit", mbit(&phase.runs[i + 1]), 1)
            .f("underlay_mbit", mbit(&phase.runs[i]), 1);
        if !lan {
            line = line.kv("link", "100mbit,40ms");
        }
        line.kv("reps", opts.reps).print();
    }
    note(format!(
        "host-gw on the LAN: {:.3} of the underlay; WireGuard on the LAN {:.3}, across the 100 Mbit / 40 ms link {:.3} (target ≥ 0.95; its tunnel's MSS is 1380 against the underlay's 1448, 0.953 at equal wire rate); VXLAN on the LAN {:.3}, across the link {:.3}",
        r.auto.lan_ratio(),
        r.wireguard.lan_ratio(),
        r.auto.wan_ratio(),
        r.vxlan.lan_ratio(),
        r.vxlan.wan_ratio()
    ));
    Ok(r)
}
