//! Data-plane throughput per backend, on the LAN and across a shaped WAN link (issue 16): a
//! geo-distributed lab of two data centers (hosts a and a2 in dc1, b in dc2, the link
//! 100 Mbit and 40 ms one way) with a whole cluster on it (backend `auto`), one busybox
//! container per host, and iperf3 in the same run over four paths:
//!
//! - LAN underlay a → a2, and container a → container a2 (host-gw);
//! - WAN underlay a → b, and container a → container b (WireGuard).
//!
//! Each backend's figure is container ÷ underlay over the same links; paths are interleaved
//! within every repetition (rotating which goes first) and the figures are medians.

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

/// Medians in Gbit/s of every path.
#[derive(Clone, Debug)]
pub struct WanResult {
    /// LAN underlay, LAN container (host-gw), WAN underlay, WAN container (WireGuard).
    pub runs: [Vec<f64>; 4],
}

impl WanResult {
    /// host-gw container ÷ underlay on the LAN.
    pub fn lan_ratio(&self) -> f64 {
        median(&self.runs[1]) / median(&self.runs[0])
    }

    /// WireGuard container ÷ underlay across the shaped WAN link.
    pub fn wan_ratio(&self) -> f64 {
        median(&self.runs[3]) / median(&self.runs[2])
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
    let routes = a.run(&["ip", "-4", "route", "show", "proto", "247"])?;
    ensure!(
        routes.contains("dev geomx-wg") && routes.contains("via 10.1.1.35"),
        "a's routes are not host-gw to a2 and WireGuard to b:\n{routes}"
    );
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
            name: "lan container (host-gw)",
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
            name: "wan container (wireguard)",
            client_ns: ns_a,
            server_ns: ns_b,
            server_ip: ip_b,
            port: 5214,
        },
    ];
    let mut servers = Children::default();
    for p in &paths {
        servers.0.push(iperf_server(p)?);
    }
    for p in &paths {
        iperf_client(p, 1, 1)
            .with_context(|| format!("iperf3 warm-up over the {} path", p.name))?;
    }
    let mut runs: [Vec<f64>; 4] = Default::default();
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
                .with_context(|| format!("iperf3 over the {} path", paths[i].name))?;
            note(format!(
                "rep {}/{}: {} {:.1} Mbit/s",
                rep + 1,
                opts.reps,
                paths[i].name,
                gbps * 1000.0
            ));
            runs[i].push(gbps);
        }
    }
    drop(servers);
    let r = WanResult { runs };
    let mbit = |v: &[f64]| median(v) * 1000.0;
    Line::new(
        "dataplane_lan_hostgw_ratio",
        format!("{:.3}", r.lan_ratio()),
    )
    .f("container_mbit", mbit(&r.runs[1]), 0)
    .f("underlay_mbit", mbit(&r.runs[0]), 0)
    .print();
    Line::new(
        "dataplane_wan_wireguard_ratio",
        format!("{:.3}", r.wan_ratio()),
    )
    .f("container_mbit", mbit(&r.runs[3]), 1)
    .f("underlay_mbit", mbit(&r.runs[2]), 1)
    .kv("link", "100mbit,40ms")
    .kv("reps", opts.reps)
    .print();
    note(format!(
        "host-gw on the LAN: {:.3} of the underlay; WireGuard across the 100 Mbit / 40 ms link: {:.3} (target ≥ 0.95; its tunnel's MSS is 1380 against the underlay's 1448, 0.953 at equal wire rate)",
        r.lan_ratio(),
        r.wan_ratio()
    ));
    Ok(r)
}
