//! Table tests of the pure plan: each row is an observed host (a converged fake host's
//! snapshot, changed the way the row says), a desired state and the steps the plan must
//! hold, or the error it must give.

use super::*;
use crate::fake::FakeKernel;
use crate::kernel::{Mac, RuleSpec};
use crate::observe;
use crate::{NetConfig, Reconciler};

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("net")
}

fn peer(name: &str, ip: &str, subnet: &str, key: Option<&str>) -> Peer {
    Peer {
        name: name.into(),
        underlay_ip: ip.parse().expect("ip"),
        subnet: net(subnet),
        wireguard_key: key.map(str::to_string),
        wireguard_port: None,
    }
}

/// Host a with b on its LAN and c in another data center (reached via the router).
fn desired(backend: Backend) -> DesiredNetwork {
    DesiredNetwork {
        subnet: net("172.17.34.0/24"),
        cluster: net("172.17.0.0/16"),
        peers: vec![
            peer("b", "10.1.1.29", "172.17.29.0/24", Some("pub-b")),
            peer("c", "10.3.1.33", "172.17.33.0/24", Some("pub-c")),
        ],
        backend,
    }
}

fn settings() -> HostSettings {
    HostSettings {
        host: "a".into(),
        backend: None,
        wireguard_port: WG_PORT,
        daemon_json: "/etc/docker/daemon.json".into(),
        docker_host: "unix:///fake/docker.sock".into(),
        docker_required: false,
    }
}

fn memory() -> PlanMemory {
    PlanMemory {
        random_fully: true,
        ..PlanMemory::default()
    }
}

/// What the host looks like after a successful pass for `d`.
async fn converged(d: &DesiredNetwork) -> (FakeKernel, Observed) {
    let fake = FakeKernel::new();
    let mut r = Reconciler::new(NetConfig::new("a"), fake.kernel());
    r.reconcile(d).await.expect("converges");
    let seen = observe::observe(&fake.kernel(), &NetConfig::new("a"), d)
        .await
        .expect("observe");
    (fake, seen)
}

/// The steps in short words, for comparing.
fn words(plan: &NetPlan) -> Vec<String> {
    plan.steps
        .iter()
        .map(|s| match s {
            Step::Remember(_) => "remember".into(),
            Step::WriteDaemonJson { .. } => "write daemon.json".into(),
            Step::RestartDocker { for_docker0, .. } => {
                format!(
                    "restart docker{}",
                    if *for_docker0 { " (docker0)" } else { "" }
                )
            }
            Step::EnableIpForward { .. } => "ip_forward".into(),
            Step::Firewall(f) => format!("firewall {}", f.table),
            Step::WgCreate => "wg create".into(),
            Step::WgConfigure { .. } => "wg configure".into(),
            Step::WgSetPeer { peer, .. } => format!("wg peer {peer}"),
            Step::WgRemovePeer { public_key } => format!("wg remove {public_key}"),
            Step::VxlanCreate(_) => "vxlan create".into(),
            Step::FdbSet { peer, .. } => format!("fdb {peer}"),
            Step::FdbDelete(e) => format!("fdb delete {}", e.mac),
            Step::NeighSet { peer, .. } => format!("neigh {peer}"),
            Step::NeighDelete(e) => format!("neigh delete {}", e.ip),
            Step::RouteReplace { route, .. } => {
                format!("route {} {}", route.destination, route.via())
            }
            Step::RouteDelete(r) => format!("route delete {}", r.destination),
            Step::VxlanDelete => "vxlan delete".into(),
            Step::WgDelete => "wg delete".into(),
        })
        .collect()
}

type Change = fn(&mut Observed, &mut DesiredNetwork, &mut PlanMemory);

#[tokio::test]
async fn plans_from_observed_and_desired() {
    let rows: Vec<(&str, Backend, Change, Vec<&str>)> = vec![
        ("converged: nothing", Backend::Auto, |_, _, _| {}, vec![]),
        (
            "ip_forward reset by someone",
            Backend::Auto,
            |o, _, _| o.ip_forward = "0".into(),
            vec!["ip_forward"],
        ),
        (
            "Docker down, daemon.json fine: nothing (docker0 is not judged)",
            Backend::Auto,
            |o, _, _| {
                o.docker = DockerState::Down {
                    reason: "no socket".into(),
                };
                o.docker0 = None;
            },
            vec![],
        ),
        (
            "Docker down, daemon.json lost its bip: written, not restarted",
            Backend::Auto,
            |o, _, _| {
                o.docker = DockerState::Down {
                    reason: "no socket".into(),
                };
                o.doc.remove("bip");
            },
            vec!["write daemon.json"],
        ),
        (
            "Docker up, daemon.json lost its bip: written, then restarted",
            Backend::Auto,
            |o, _, _| {
                o.doc.remove("bip");
            },
            vec!["write daemon.json", "restart docker"],
        ),
        (
            "docker0 did not take the bip: one restart for it",
            Backend::Auto,
            |o, _, _| o.docker0 = Some(vec![net("172.17.0.1/16")]),
            vec!["restart docker (docker0)"],
        ),
        (
            "the nat chain lost a rule: one firewall step for nat",
            Backend::Auto,
            |o, _, _| {
                if let Some(c) = &mut o.nat.chain {
                    c.pop();
                }
            },
            vec!["firewall nat"],
        ),
        (
            "c's key changed (rotate-key on c): its peer is set again, the old key removed",
            Backend::Auto,
            |_, d, _| d.peers[1].wireguard_key = Some("pub-c-2".into()),
            vec!["wg peer c", "wg remove pub-c"],
        ),
        (
            "this host's key changed (rotate-key here): the interface is configured again",
            Backend::Auto,
            |o, _, _| o.wg_public_key = Some("pub-new".into()),
            vec!["wg configure"],
        ),
        (
            "c left: its route, its filter rule and the tunnel go",
            Backend::Auto,
            |_, d, _| {
                d.peers.truncate(1);
            },
            vec![
                "firewall filter",
                "route delete 172.17.33.0/24",
                "wg delete",
            ],
        ),
        (
            "a stray geomx route inside the cluster goes; one outside stays",
            Backend::Auto,
            |o, _, _| {
                for (dst, gw) in [
                    ("172.17.99.0/24", "10.1.1.99"),
                    ("192.168.7.0/24", "10.1.1.98"),
                ] {
                    o.routes.push(KernelRoute {
                        destination: net(dst),
                        gateway: Some(gw.parse().expect("ip")),
                        device: Some("eth0".into()),
                        protocol: ROUTE_PROTOCOL,
                        metric: 5,
                        kind: RouteKind::Unicast,
                    });
                }
            },
            vec!["route delete 172.17.99.0/24"],
        ),
        (
            "vxlan peers' entries are set, a stale one deleted",
            Backend::Vxlan,
            |o, _, _| {
                if let Some(v) = &mut o.vxlan {
                    v.fdb.retain(|f| f.dst.to_string() != "10.3.1.33");
                    v.fdb.push(FdbEntry {
                        mac: Mac([2, 0x47, 1, 2, 3, 4]),
                        dst: "10.9.9.9".parse().expect("ip"),
                    });
                    v.neighbours.clear();
                }
            },
            vec![
                "neigh b",
                "fdb c",
                "neigh c",
                "fdb delete 02:47:01:02:03:04",
            ],
        ),
        (
            "a vxlan device with other settings is made again",
            Backend::Vxlan,
            |o, _, _| {
                if let Some(v) = &mut o.vxlan {
                    v.spec.port = 4789;
                }
            },
            vec![
                "vxlan delete",
                "vxlan create",
                "fdb b",
                "neigh b",
                "fdb c",
                "neigh c",
            ],
        ),
    ];
    for (what, backend, change, want) in rows {
        let mut d = desired(backend);
        let (_fake, mut seen) = converged(&d).await;
        let mut mem = memory();
        change(&mut seen, &mut d, &mut mem);
        let p = plan(&d, &settings(), &seen, &mem).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(words(&p), want, "{what}");
    }
}

#[tokio::test]
async fn backends_and_routes_per_backend() {
    for (backend, b_via, c_via) in [
        (Backend::Auto, "via 10.1.1.29", "dev geomx-wg"),
        (Backend::Wireguard, "dev geomx-wg", "dev geomx-wg"),
        (
            Backend::Vxlan,
            "via 172.17.29.0 dev geomx-vxlan onlink",
            "via 172.17.33.0 dev geomx-vxlan onlink",
        ),
    ] {
        let d = desired(backend);
        let fake = FakeKernel::new();
        let seen = observe::observe(&fake.kernel(), &NetConfig::new("a"), &d)
            .await
            .expect("observe");
        let p = plan(&d, &settings(), &seen, &memory()).expect("plan");
        let routes: Vec<String> = words(&p)
            .into_iter()
            .filter(|w| w.starts_with("route "))
            .collect();
        assert_eq!(
            routes,
            [
                format!("route 172.17.29.0/24 {b_via}"),
                format!("route 172.17.33.0/24 {c_via}")
            ],
            "{backend}"
        );
        let filter = p
            .steps
            .iter()
            .find_map(|s| match s {
                Step::Firewall(f) if f.table == "filter" => Some(f.payload.clone()),
                _ => None,
            })
            .expect("filter");
        // each peer's containers are accepted only on the device they come through
        for (subnet, dev) in [("172.17.29.0/24", b_via), ("172.17.33.0/24", c_via)] {
            let iface = if dev.contains("geomx-wg") {
                "geomx-wg"
            } else if dev.contains("geomx-vxlan") {
                "geomx-vxlan"
            } else {
                "eth0"
            };
            assert!(
                filter.contains(&format!("-s {subnet} -d 172.17.34.0/24 -i {iface} ")),
                "{backend}: {filter}"
            );
        }
    }
}

#[tokio::test]
async fn refusals_name_the_peer_and_plan_nothing() {
    let fake = FakeKernel::new();
    // host-gw across data centers
    let mut d = desired(Backend::HostGw);
    let seen = observe::observe(&fake.kernel(), &NetConfig::new("a"), &d)
        .await
        .expect("observe");
    let e = plan(&d, &settings(), &seen, &memory()).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "peer c: underlay address 10.3.1.33 is not on a directly connected network (it is reached via 10.1.1.1); backend host-gw routes a peer's subnet via the peer's underlay address, which must be on-link: use backend auto, wireguard or vxlan for peers in other networks",
        "{e}"
    );
    // auto, but c has no key (an old agent)
    d.backend = Backend::Auto;
    d.peers[1].wireguard_key = None;
    let e = plan(&d, &settings(), &seen, &memory()).expect_err("refused");
    assert!(
        e.to_string().starts_with(
            "peer c: underlay address 10.3.1.33 is not on a directly connected network"
        ),
        "{e}"
    );
    // a one-shot apply needs Docker: nothing is planned without it
    let d = desired(Backend::Auto);
    let mut down = seen.clone();
    down.docker = DockerState::Down {
        reason: "the socket /fake/docker.sock does not exist".into(),
    };
    let strict = HostSettings {
        docker_required: true,
        ..settings()
    };
    let e = plan(&d, &strict, &down, &memory()).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "Docker at unix:///fake/docker.sock is not reachable: the socket /fake/docker.sock does not exist"
    );
    // a second bip restart is not planned: an error that says what docker0 carries
    let d = desired(Backend::Auto);
    let (_f, mut seen) = converged(&d).await;
    seen.docker0 = Some(vec![net("172.17.0.1/16")]);
    let mem = PlanMemory {
        restarted_for: Some(d.bip()),
        ..memory()
    };
    let e = plan(&d, &settings(), &seen, &mem).expect_err("refused");
    assert!(matches!(e, NetError::Docker0Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("172.17.0.1/16"), "{e}");
    assert!(e.to_string().contains("/etc/docker/daemon.json"), "{e}");
}

#[test]
fn vtep_addresses_come_from_the_subnet() {
    let s = net("172.17.29.0/24");
    assert_eq!(backend::vtep_mac(s).to_string(), "02:47:ac:11:1d:00");
    assert_eq!(backend::vtep_ip(s).to_string(), "172.17.29.0");
    // jumps of other chains in FORWARD never count as ours
    assert!(RuleSpec::parse("-j DOCKER-USER").target() != Some(crate::FILTER_CHAIN));
}
