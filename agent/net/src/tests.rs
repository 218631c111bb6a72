//! The decision logic against the in-memory host: no kernel, no Docker.

use std::time::Duration;

use tokio::sync::watch;

use crate::fake::{FakeHost, FakeKernel};
use crate::kernel::{DockerVersion, KernelRoute, RouteKind, RuleSpec};
use crate::{Change, DesiredNetwork, NetConfig, NetError, Peer, ROUTE_PROTOCOL, Reconciler};

fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().expect("test network")
}

fn peer(name: &str, ip: &str, subnet: &str) -> Peer {
    Peer {
        name: name.into(),
        underlay_ip: ip.parse().expect("test ip"),
        subnet: net(subnet),
        wireguard_key: None,
        wireguard_port: None,
    }
}

fn seed_a() -> DesiredNetwork {
    DesiredNetwork {
        subnet: net("172.17.34.0/24"),
        cluster: net("172.17.0.0/16"),
        peers: vec![
            peer("b", "10.1.1.29", "172.17.29.0/24"),
            peer("c", "10.1.1.33", "172.17.33.0/24"),
        ],
        backend: Default::default(),
    }
}

fn reconciler(fake: &FakeKernel) -> Reconciler {
    let mut config = NetConfig::new("a");
    config.docker_ready_timeout = Duration::from_millis(300);
    config.interval = Duration::from_millis(50);
    Reconciler::new(config, fake.kernel())
}

const NAT_RULES: [&str; 2] = [
    r#"-s 172.17.0.0/16 -d 172.17.0.0/16 -m comment --comment "geomx: traffic inside the cluster keeps its source address" -j RETURN"#,
    r#"-s 172.17.34.0/24 ! -d 224.0.0.0/4 -m comment --comment "geomx: masquerade container traffic that leaves the cluster" -j MASQUERADE --random-fully"#,
];
const NAT_JUMP: &str = r#"-m comment --comment "geomx: masquerade container traffic that leaves the cluster" -j GEOMX-POSTROUTING"#;
const FILTER_JUMP: &str =
    r#"-m comment --comment "geomx: forward cluster traffic" -j GEOMX-FORWARD"#;

#[tokio::test]
async fn first_pass_builds_everything_and_the_second_changes_nothing() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    let changes = r.reconcile(&seed_a()).await.expect("first pass");
    let kinds: Vec<String> = changes
        .iter()
        .map(|c| {
            serde_json::to_value(c).expect("json")["kind"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "remembered",
            "daemon_json_updated",
            "docker_restarted",
            "ip_forward_enabled",
            "chain_created",
            "jump_restored",
            "chain_created",
            "jump_restored",
            "route_added",
            "route_added"
        ]
    );
    {
        let h = fake.host();
        let doc: serde_json::Value =
            serde_json::from_str(h.daemon_json.as_deref().expect("daemon.json")).expect("json");
        assert_eq!(doc["bip"], "172.17.34.1/24");
        assert_eq!(doc["ip-masq"], false);
        assert!(
            doc.get("allow-direct-routing").is_none(),
            "Docker 20.10 refuses unknown keys"
        );
        assert_eq!(h.restarts, 1);
        assert_eq!(h.links["docker0"], vec![net("172.17.34.1/24")]);
        assert_eq!(h.sysctls["net.ipv4.ip_forward"], "1");
        assert_eq!(
            h.geomx_routes(),
            [
                "172.17.29.0/24 via 10.1.1.29",
                "172.17.33.0/24 via 10.1.1.33"
            ]
        );
        assert_eq!(h.rules("nat", "GEOMX-POSTROUTING"), NAT_RULES);
        assert_eq!(h.rules("nat", "POSTROUTING")[0], NAT_JUMP);
        // below DOCKER-USER: operators' rules there stay in force
        assert_eq!(
            h.rules("filter", "FORWARD"),
            ["-j DOCKER-USER", FILTER_JUMP, "-o docker0 -j DOCKER"]
        );
        // clamp, own containers, and per on-link peer its subnet on eth0 and its address
        assert_eq!(h.rules("filter", "GEOMX-FORWARD").len(), 6);
    }
    let log_before = fake.host().log.len();
    let again = r.reconcile(&seed_a()).await.expect("second pass");
    assert_eq!(again, vec![], "a second pass must change nothing");
    assert_eq!(fake.host().log.len(), log_before, "nothing mutated");
    assert_eq!(r.last_applied(), Some(&seed_a()));
}

async fn assert_refused_without_change(fake: &FakeKernel, desired: &DesiredNetwork) -> NetError {
    let before = fake.host().clone();
    let e = reconciler(fake)
        .reconcile(desired)
        .await
        .expect_err("must be refused");
    let after = fake.host();
    assert!(after.log.is_empty(), "{e}: mutated {:?}", after.log);
    assert_eq!(after.routes, before.routes);
    assert_eq!(after.tables, before.tables);
    assert_eq!(after.daemon_json, before.daemon_json);
    assert_eq!(after.state, before.state);
    e
}

#[tokio::test]
async fn invalid_desired_states_change_nothing() {
    let fake = FakeKernel::new();
    let mut d = seed_a();
    d.subnet = net("10.200.0.0/24");
    let e = assert_refused_without_change(&fake, &d).await;
    assert_eq!(
        e.to_string(),
        "invalid desired network: this host's subnet 10.200.0.0/24 is outside the cluster CIDR 172.17.0.0/16"
    );
    let mut d = seed_a();
    d.peers[1].subnet = net("172.17.29.0/25");
    let e = assert_refused_without_change(&fake, &d).await;
    assert!(
        e.to_string()
            .contains("peers b (172.17.29.0/24) and c (172.17.29.0/25)"),
        "{e}"
    );
}

#[tokio::test]
async fn with_docker_down_routes_and_rules_are_applied_and_daemon_json_waits() {
    let fake = FakeKernel::new();
    fake.host().docker = None;
    let mut r = reconciler(&fake);
    let outcome = r.pass(&seed_a()).await.expect("a pass without Docker");
    assert!(outcome.docker_offline && r.docker_offline());
    assert_eq!(outcome.action, crate::Action::Converged);
    {
        let h = fake.host();
        assert_eq!(
            h.geomx_routes(),
            [
                "172.17.29.0/24 via 10.1.1.29",
                "172.17.33.0/24 via 10.1.1.33"
            ]
        );
        assert_eq!(h.rules("nat", "GEOMX-POSTROUTING"), NAT_RULES);
        assert_eq!(h.sysctls["net.ipv4.ip_forward"], "1");
        let json: serde_json::Value =
            serde_json::from_str(h.daemon_json.as_deref().expect("daemon.json")).expect("json");
        assert_eq!(json["bip"], "172.17.34.1/24");
        assert_eq!(json["ip-masq"], false);
        assert_eq!(h.restarts, 0, "Docker is not restarted while it is down");
        assert!(!h.log.iter().any(|l| l == "docker restart"), "{:?}", h.log);
    }
    // the same pass again changes nothing
    assert!(r.reconcile(&seed_a()).await.expect("again").is_empty());

    // Docker comes up with the bip from daemon.json (as a real one would): nothing to do
    {
        let mut h = fake.host();
        h.docker = Some(crate::kernel::DockerVersion {
            version: "20.10.24".into(),
            api_version: "1.41".into(),
        });
        h.links
            .insert("docker0".into(), vec![net("172.17.34.1/24")]);
    }
    assert!(
        r.reconcile(&seed_a())
            .await
            .expect("with Docker")
            .is_empty()
    );
    assert!(!r.docker_offline());
    assert_eq!(fake.host().restarts, 0);
}

#[tokio::test]
async fn docker_coming_up_without_the_bip_is_restarted_once() {
    let fake = FakeKernel::new();
    fake.host().docker = None;
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("offline pass");
    // Docker starts but docker0 still has its old address
    fake.host().docker = Some(crate::kernel::DockerVersion {
        version: "20.10.24".into(),
        api_version: "1.41".into(),
    });
    let changes = r
        .reconcile(&seed_a())
        .await
        .expect("a restart fixes docker0");
    assert_eq!(
        changes.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        ["restarted Docker (docker0 carried 172.17.0.1/16, not bip 172.17.34.1/24)"]
    );
    assert_eq!(fake.host().restarts, 1);
    assert_eq!(fake.host().links["docker0"], vec![net("172.17.34.1/24")]);
}

#[tokio::test]
async fn a_malformed_daemon_json_changes_nothing() {
    let fake = FakeKernel::new();
    fake.host().daemon_json = Some("{\n  \"debug\": true,\n}\n".into());
    let e = assert_refused_without_change(&fake, &seed_a()).await;
    assert_eq!(
        e.to_string(),
        "/etc/docker/daemon.json: malformed JSON at line 3, column 1: trailing comma"
    );
}

#[tokio::test]
async fn peers_off_link_and_foreign_routes_to_peer_subnets_change_nothing() {
    let fake = FakeKernel::new();
    let mut d = seed_a();
    d.peers[0].underlay_ip = "192.0.2.7".parse().expect("ip");
    // with backend host-gw: refused, naming the peer and what the kernel said
    d.backend = crate::Backend::HostGw;
    let e = assert_refused_without_change(&fake, &d).await;
    assert_eq!(
        e.to_string(),
        "peer b: underlay address 192.0.2.7 is not on a directly connected network (it is reached via 10.1.1.1); backend host-gw routes a peer's subnet via the peer's underlay address, which must be on-link: use backend auto, wireguard or vxlan for peers in other networks"
    );
    // with auto, a peer off-link without a WireGuard key (an old agent) is refused too
    d.backend = crate::Backend::Auto;
    let e = assert_refused_without_change(&fake, &d).await;
    assert!(
        e.to_string().starts_with(
            "peer b: underlay address 192.0.2.7 is not on a directly connected network (it is reached via 10.1.1.1), so host-gw cannot reach it, and the peer has no WireGuard key"
        ),
        "{e}"
    );
    let mut d = seed_a();
    d.peers[0].underlay_ip = "10.1.1.34".parse().expect("ip");
    let e = assert_refused_without_change(&fake, &d).await;
    assert!(e.to_string().contains("an address of this host"), "{e}");

    // the seed recipe's hand-made route: geomx refuses to overwrite it
    fake.host().routes.push(KernelRoute {
        destination: net("172.17.29.0/24"),
        gateway: Some("10.1.1.29".parse().expect("ip")),
        device: Some("eth0".into()),
        protocol: 3,
        metric: 0,
        kind: RouteKind::Unicast,
    });
    let e = assert_refused_without_change(&fake, &seed_a()).await;
    assert!(matches!(e, NetError::RouteConflict { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("(172.17.29.0/24 via 10.1.1.29 dev eth0 proto boot)"),
        "{e}"
    );
}

#[tokio::test]
async fn routes_follow_the_peers_and_foreign_routes_stay() {
    let fake = FakeKernel::new();
    let foreign = KernelRoute {
        destination: net("192.168.50.0/24"),
        gateway: Some("10.1.1.1".parse().expect("ip")),
        device: Some("eth0".into()),
        protocol: 4,
        metric: 0,
        kind: RouteKind::Unicast,
    };
    fake.host().routes.push(foreign.clone());
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("first pass");

    // b moved to another underlay address, c left, d joined; a stray geomx route appeared
    fake.host()
        .connected
        .push((net("10.1.2.0/24"), "eth1".into()));
    fake.host().routes.push(KernelRoute {
        destination: net("172.17.99.0/24"),
        gateway: Some("10.1.1.99".parse().expect("ip")),
        device: Some("eth0".into()),
        protocol: ROUTE_PROTOCOL,
        metric: 100,
        kind: RouteKind::Unicast,
    });
    let mut d = seed_a();
    d.peers[0].underlay_ip = "10.1.2.29".parse().expect("ip");
    d.peers[1] = peer("d", "10.1.1.40", "172.17.40.0/24");
    let changes = r.reconcile(&d).await.expect("pass");
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    // the filter chain follows the peers (b now on eth1, d instead of c)
    assert!(
        shown[0].starts_with("rebuilt chain filter GEOMX-FORWARD")
            && shown[0].contains("-s 172.17.29.0/24 -d 172.17.34.0/24 -i eth1")
            && shown[0].contains("-s 10.1.1.40/32"),
        "{shown:#?}"
    );
    assert_eq!(
        shown[1..],
        [
            "replaced route 172.17.29.0/24 via 10.1.1.29 with via 10.1.2.29",
            "added route 172.17.40.0/24 via 10.1.1.40 proto 247",
            "deleted route 172.17.33.0/24 via 10.1.1.33",
            "deleted route 172.17.99.0/24 via 10.1.1.99",
        ]
    );
    let h = fake.host();
    assert_eq!(
        h.geomx_routes(),
        [
            "172.17.29.0/24 via 10.1.2.29",
            "172.17.40.0/24 via 10.1.1.40"
        ]
    );
    assert!(h.routes.contains(&foreign), "a foreign route was touched");
}

#[tokio::test]
async fn chains_are_rebuilt_in_order_and_jumps_kept_single_below_docker_user() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("first pass");

    // the MASQUERADE rule deleted by hand
    fake.host()
        .tables
        .get_mut("nat")
        .and_then(|t| t.get_mut("GEOMX-POSTROUTING"))
        .expect("chain")
        .pop();
    let c = r.reconcile(&seed_a()).await.expect("repair");
    assert_eq!(c.len(), 1);
    assert!(
        matches!(&c[0], Change::ChainRebuilt { missing, unexpected, .. } if missing.len() == 1 && unexpected.is_empty())
    );
    assert_eq!(fake.host().rules("nat", "GEOMX-POSTROUTING"), NAT_RULES);

    // rules swapped, a stranger added to our chain
    {
        let mut h = fake.host();
        let chain = h
            .tables
            .get_mut("filter")
            .and_then(|t| t.get_mut("GEOMX-FORWARD"))
            .expect("chain");
        chain.reverse();
        chain.push(RuleSpec::parse("-s 10.9.9.9/32 -j ACCEPT"));
    }
    let c = r.reconcile(&seed_a()).await.expect("repair");
    assert_eq!(c.len(), 1);
    assert_eq!(
        c[0].to_string(),
        "rebuilt chain filter GEOMX-FORWARD (missing: []; unexpected: [-s 10.9.9.9/32 -j ACCEPT])"
    );

    // Docker restarted: its rules went in front of our jump, and someone added a second jump
    {
        let mut h = fake.host();
        let fwd = h
            .tables
            .get_mut("filter")
            .and_then(|t| t.get_mut("FORWARD"))
            .expect("FORWARD");
        let jump = fwd.remove(1);
        fwd.push(jump);
        let post = h
            .tables
            .get_mut("nat")
            .and_then(|t| t.get_mut("POSTROUTING"))
            .expect("POSTROUTING");
        post.push(RuleSpec::parse("-s 10.0.0.0/8 -j GEOMX-POSTROUTING"));
    }
    let c = r.reconcile(&seed_a()).await.expect("repair");
    let shown: Vec<String> = c.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        shown,
        [
            "put the jump nat POSTROUTING -> GEOMX-POSTROUTING at position 1 (found at position 1, 3)",
            "put the jump filter FORWARD -> GEOMX-FORWARD at position 2 (found at position 3)",
        ]
    );
    let h = fake.host();
    let post = h.rules("nat", "POSTROUTING");
    assert_eq!(post[0], NAT_JUMP);
    assert_eq!(
        post.iter()
            .filter(|r| r.ends_with("-j GEOMX-POSTROUTING"))
            .count(),
        1
    );
    assert_eq!(
        h.rules("filter", "FORWARD"),
        ["-j DOCKER-USER", FILTER_JUMP, "-o docker0 -j DOCKER"]
    );
}

#[tokio::test]
async fn docker_28_gets_allow_direct_routing_and_restarts_only_on_change() {
    let fake = FakeKernel::new();
    {
        let mut h = fake.host();
        h.docker = Some(DockerVersion {
            version: "28.0.4".into(),
            api_version: "1.48".into(),
        });
        h.daemon_json = Some(r#"{"log-level": "warn", "bip": "172.17.34.1/24"}"#.into());
    }
    let mut r = reconciler(&fake);
    let c = r.reconcile(&seed_a()).await.expect("pass");
    let updated = c
        .iter()
        .find_map(|c| match c {
            Change::DaemonJsonUpdated { keys, .. } => Some(keys.clone()),
            _ => None,
        })
        .expect("daemon.json updated");
    let keys: Vec<&str> = updated.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["ip-masq", "allow-direct-routing"]);
    let doc: serde_json::Value =
        serde_json::from_str(fake.host().daemon_json.as_deref().expect("file")).expect("json");
    assert_eq!(doc["log-level"], "warn");
    assert_eq!(doc["allow-direct-routing"], true);
    assert_eq!(fake.host().restarts, 1);
    r.reconcile(&seed_a()).await.expect("again");
    assert_eq!(fake.host().restarts, 1);
}

#[tokio::test]
async fn docker_that_does_not_apply_bip_is_an_error_without_restart_loops() {
    let fake = FakeKernel::new();
    fake.host().docker_ignores_bip = true;
    let mut r = reconciler(&fake);
    let e = r.reconcile(&seed_a()).await.expect_err("docker0 mismatch");
    assert_eq!(
        e.to_string(),
        "docker0 carries 172.17.0.1/16 but /etc/docker/daemon.json sets bip 172.17.34.1/24; Docker did not apply it (see the dockerd log)"
    );
    assert_eq!(fake.host().restarts, 1);
    // the file is right now: one more restart for this bip, then no more
    let _ = r.reconcile(&seed_a()).await.expect_err("still wrong");
    assert_eq!(fake.host().restarts, 2);
    let _ = r.reconcile(&seed_a()).await.expect_err("still wrong");
    assert_eq!(fake.host().restarts, 2);
    // routes and rules were not touched while docker0 is wrong
    assert!(fake.host().geomx_routes().is_empty());

    fake.host().docker_ignores_bip = false;
    let mut fresh = reconciler(&fake);
    let c = fresh
        .reconcile(&seed_a())
        .await
        .expect("a restarted agent tries once more");
    assert!(
        matches!(&c[0], Change::DockerRestarted { reason } if reason.starts_with("docker0 carried 172.17.0.1/16"))
    );
}

#[tokio::test]
async fn masquerade_falls_back_without_random_fully() {
    let fake = FakeKernel::new();
    fake.host().random_fully = false;
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("pass");
    let rules = fake.host().rules("nat", "GEOMX-POSTROUTING");
    assert!(rules[1].ends_with("-j MASQUERADE"), "{}", rules[1]);
    assert_eq!(r.reconcile(&seed_a()).await.expect("again"), vec![]);
}

#[tokio::test]
async fn cleanup_restores_the_host_as_it_was() {
    let original = FakeHost {
        daemon_json: Some("{\n  \"debug\": true\n}\n".into()),
        ..FakeHost::default()
    };
    let fake = FakeKernel::with(original.clone());
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("pass");
    // Docker drops its own MASQUERADE rule with ip-masq false
    fake.host()
        .tables
        .get_mut("nat")
        .and_then(|t| t.get_mut("POSTROUTING"))
        .expect("POSTROUTING")
        .retain(|r| r.target() != Some("MASQUERADE"));
    assert!(fake.host().state.is_some());

    let changes = r.cleanup().await.expect("cleanup");
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        shown,
        [
            "deleted the jump nat POSTROUTING -> GEOMX-POSTROUTING",
            "deleted chain nat GEOMX-POSTROUTING",
            "deleted the jump filter FORWARD -> GEOMX-FORWARD",
            "deleted chain filter GEOMX-FORWARD",
            "deleted route 172.17.29.0/24 via 10.1.1.29",
            "deleted route 172.17.33.0/24 via 10.1.1.33",
            "restarted Docker (bring docker0 back to its pre-geomx address 172.17.0.1/16 before removing bip)",
            "restored /etc/docker/daemon.json: bip: \"172.17.34.1/24\" -> absent, ip-masq: false -> absent",
            "restarted Docker (daemon.json restored)",
        ]
    );
    {
        let h = fake.host();
        assert_eq!(h.daemon_json, original.daemon_json, "byte for byte");
        assert_eq!(h.state, None);
        assert_eq!(h.routes, original.routes);
        assert_eq!(h.links["docker0"], original.links["docker0"]);
        assert_eq!(
            h.rules("filter", "FORWARD"),
            original.rules("filter", "FORWARD")
        );
        assert!(!h.tables["nat"].contains_key("GEOMX-POSTROUTING"));
    }
    assert_eq!(r.cleanup().await.expect("cleanup twice"), vec![]);
}

#[tokio::test]
async fn a_cleanup_whose_docker_restart_failed_can_be_run_again() {
    let original = FakeHost::default();
    let fake = FakeKernel::with(original.clone());
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("pass");
    fake.host().restart_fails = true;
    let e = r.cleanup().await.expect_err("restart fails");
    assert!(matches!(e, NetError::DockerRestartFailed { .. }), "{e}");
    assert!(
        fake.host().state.is_some(),
        "the state must survive a failed cleanup"
    );
    fake.host().restart_fails = false;
    r.cleanup().await.expect("second cleanup");
    let h = fake.host();
    assert_eq!(h.daemon_json, original.daemon_json);
    assert_eq!(h.links["docker0"], original.links["docker0"]);
    assert_eq!(h.state, None);
}

#[tokio::test]
async fn cleanup_with_a_malformed_daemon_json_changes_nothing() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("pass");
    fake.host().daemon_json = Some("{".into());
    fake.host().log.clear();
    let e = r.cleanup().await.expect_err("malformed");
    assert!(matches!(e, NetError::MalformedDaemonJson { .. }), "{e}");
    assert!(fake.host().log.is_empty());
}

#[tokio::test]
async fn the_loop_reapplies_the_last_desired_state_and_follows_changes() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    let trigger = r.trigger();
    let (tx, rx) = watch::channel::<Option<DesiredNetwork>>(None);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let passes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let seen = passes.clone();
    let fake2 = fake.clone();
    let task = tokio::spawn(async move {
        r.run(
            rx,
            async {
                let _ = stop_rx.await;
            },
            move |_, result| {
                seen.lock()
                    .expect("lock")
                    .push(result.as_ref().map_or(usize::MAX, |o| o.changes.len()));
            },
        )
        .await;
        r
    });
    let wait_for = |what: &'static str, cond: Box<dyn Fn() -> bool + Send>| async move {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    };

    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        passes.lock().expect("lock").is_empty(),
        "no pass before a desired state"
    );

    tx.send_replace(Some(seed_a()));
    let f = fake2.clone();
    wait_for(
        "routes",
        Box::new(move || f.host().geomx_routes().len() == 2),
    )
    .await;

    // a route deleted by hand comes back within an interval
    fake2
        .host()
        .routes
        .retain(|r| r.destination != net("172.17.33.0/24"));
    let f = fake2.clone();
    wait_for(
        "repair",
        Box::new(move || f.host().geomx_routes().len() == 2),
    )
    .await;

    // a peer removed from the desired state loses its route
    let mut d = seed_a();
    d.peers.pop();
    tx.send_replace(Some(d));
    let f = fake2.clone();
    wait_for(
        "removal",
        Box::new(move || f.host().geomx_routes().len() == 1),
    )
    .await;

    // the controller goes away: the last desired state stays in force
    drop(tx);
    fake2.host().routes.retain(|r| r.protocol != ROUTE_PROTOCOL);
    let f = fake2.clone();
    wait_for(
        "static stability",
        Box::new(move || f.host().geomx_routes().len() == 1),
    )
    .await;

    let n = passes.lock().expect("lock").len();
    trigger.now();
    let p = passes.clone();
    wait_for(
        "triggered pass",
        Box::new(move || p.lock().expect("lock").len() > n),
    )
    .await;

    let _ = stop_tx.send(());
    let r = task.await.expect("loop ends on shutdown");
    assert_eq!(r.last_applied().map(|d| d.peers.len()), Some(1));
    let passes = passes.lock().expect("lock");
    assert!(
        passes.iter().all(|n| *n != usize::MAX),
        "a pass failed: {passes:?}"
    );
}

/// Seed host a with peer c moved to another data center (reached via the gateway), with a
/// WireGuard key; b stays on the LAN.
fn a_with_c_elsewhere() -> DesiredNetwork {
    let mut d = seed_a();
    d.peers[1].underlay_ip = "10.3.1.33".parse().expect("ip");
    d.peers[1].wireguard_key = Some("pub-of-c".into());
    d.peers[1].wireguard_port = Some(7951);
    d.peers[0].wireguard_key = Some("pub-of-b".into());
    d
}

#[tokio::test]
async fn auto_uses_host_gw_on_the_lan_and_wireguard_across_networks() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    let changes = r
        .reconcile(&a_with_c_elsewhere())
        .await
        .expect("first pass");
    let text: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert!(
        text.iter()
            .any(|c| c == "set WireGuard peer c at 10.3.1.33:7951"),
        "{text:?}"
    );
    {
        let h = fake.host();
        assert_eq!(
            h.geomx_routes(),
            [
                "172.17.29.0/24 via 10.1.1.29",
                "172.17.33.0/24 dev geomx-wg"
            ]
        );
        let wg = &h.wireguard["geomx-wg"];
        assert_eq!(wg.listen_port, 7951);
        assert_eq!(wg.public_key, "pub-key1", "the host's own key pair");
        assert_eq!(wg.peers.len(), 1, "b is on the LAN: no tunnel to it");
        assert_eq!(wg.peers[0].public_key, "pub-of-c");
        assert_eq!(wg.peers[0].allowed_ips, [net("172.17.33.0/24")]);
    }
    // converged: nothing changes, the key is not made again
    let log = fake.host().log.len();
    assert_eq!(
        r.reconcile(&a_with_c_elsewhere()).await.expect("again"),
        vec![]
    );
    assert_eq!(fake.host().log.len(), log);
    assert_eq!(fake.host().wg_keys_made, 1);

    // drift: the tunnel's peer removed by hand, the route deleted: both repaired
    fake.host()
        .wireguard
        .get_mut("geomx-wg")
        .expect("wg")
        .peers
        .clear();
    fake.host()
        .routes
        .retain(|r| r.device.as_deref() != Some("geomx-wg"));
    let repaired = r.reconcile(&a_with_c_elsewhere()).await.expect("repair");
    assert_eq!(repaired.len(), 2, "{repaired:?}");

    // c re-keyed (geomx-agent rotate-key on c): the old peer goes, the new one comes
    let mut rekeyed = a_with_c_elsewhere();
    rekeyed.peers[1].wireguard_key = Some("pub-of-c-2".into());
    let changes = r.reconcile(&rekeyed).await.expect("rekey");
    let text: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        text,
        [
            "set WireGuard peer c at 10.3.1.33:7951",
            "removed WireGuard peer pub-of-c"
        ]
    );

    // c gone: no peer needs the tunnel any more, the interface goes with its route
    let mut only_b = seed_a();
    only_b.peers.truncate(1);
    r.reconcile(&only_b).await.expect("c left");
    assert!(!fake.host().wireguard.contains_key("geomx-wg"));
    assert_eq!(fake.host().geomx_routes(), ["172.17.29.0/24 via 10.1.1.29"]);

    // cleanup removes the tunnel too
    r.reconcile(&a_with_c_elsewhere()).await.expect("c back");
    r.cleanup().await.expect("cleanup");
    let h = fake.host();
    assert!(h.wireguard.is_empty() && h.geomx_routes().is_empty());
}

#[tokio::test]
async fn an_agent_override_and_the_cluster_default_pick_the_backend() {
    // the cluster says wireguard: b on the LAN is tunnelled too
    let fake = FakeKernel::new();
    let mut d = a_with_c_elsewhere();
    d.backend = crate::Backend::Wireguard;
    reconciler(&fake).reconcile(&d).await.expect("pass");
    assert_eq!(
        fake.host().geomx_routes(),
        ["172.17.29.0/24 dev geomx-wg", "172.17.33.0/24 dev geomx-wg"]
    );
    // this agent says host-gw: c in another network is refused, nothing half-installed
    let fake = FakeKernel::new();
    let mut config = NetConfig::new("a");
    config.backend = Some(crate::Backend::HostGw);
    let e = Reconciler::new(config, fake.kernel())
        .reconcile(&a_with_c_elsewhere())
        .await
        .expect_err("refused");
    assert!(
        e.to_string()
            .starts_with("peer c: underlay address 10.3.1.33 is not on a directly connected network (it is reached via 10.1.1.1)"),
        "{e}"
    );
    assert!(fake.host().log.is_empty(), "{:?}", fake.host().log);
}

#[tokio::test]
async fn a_pass_that_fails_half_way_is_finished_by_the_next() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    fake.host()
        .fail_on("route replace 172.17.33.0/24", "Network is down");
    let e = r.reconcile(&seed_a()).await.expect_err("c's route fails");
    assert!(e.to_string().contains("Network is down"), "{e}");
    {
        let h = fake.host();
        // everything before the failing step is in place, nothing after it was tried
        assert_eq!(h.geomx_routes(), ["172.17.29.0/24 via 10.1.1.29"]);
        assert_eq!(h.rules("nat", "GEOMX-POSTROUTING"), NAT_RULES);
        assert_eq!(
            h.log.last().map(String::as_str),
            Some("FAILED route replace 172.17.33.0/24 via 10.1.1.33")
        );
    }
    assert_eq!(
        r.last_applied(),
        None,
        "a failed pass is not the last applied"
    );
    fake.host().fail.clear();
    let changes = r.reconcile(&seed_a()).await.expect("the next pass");
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        shown,
        ["added route 172.17.33.0/24 via 10.1.1.33 proto 247"]
    );
    assert!(r.reconcile(&seed_a()).await.expect("again").is_empty());
}

#[tokio::test]
async fn a_refused_iptables_payload_changes_nothing_in_its_table() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("first pass");
    // someone broke the chains; the repair of filter is refused by iptables
    {
        let mut h = fake.host();
        for (t, c) in [("nat", "GEOMX-POSTROUTING"), ("filter", "GEOMX-FORWARD")] {
            h.tables
                .get_mut(t)
                .and_then(|t| t.get_mut(c))
                .expect("chain")
                .clear();
        }
        h.fail_on(
            "iptables-restore filter",
            "Resource temporarily unavailable",
        );
    }
    let before = fake.host().tables.clone();
    r.reconcile(&seed_a()).await.expect_err("filter refused");
    {
        let h = fake.host();
        assert_eq!(
            h.rules("nat", "GEOMX-POSTROUTING"),
            NAT_RULES,
            "nat went in"
        );
        assert_eq!(h.tables["filter"], before["filter"], "filter is as it was");
    }
    fake.host().fail.clear();
    r.reconcile(&seed_a()).await.expect("repaired");
    assert_eq!(fake.host().rules("filter", "GEOMX-FORWARD").len(), 6);
}

#[tokio::test]
async fn without_random_fully_plain_masquerade_is_used() {
    let fake = FakeKernel::new();
    fake.host().random_fully = false;
    let mut r = reconciler(&fake);
    r.reconcile(&seed_a()).await.expect("pass");
    let rules = fake.host().rules("nat", "GEOMX-POSTROUTING");
    assert!(rules[1].ends_with("-j MASQUERADE"), "{rules:?}");
    assert!(r.reconcile(&seed_a()).await.expect("again").is_empty());
}

#[tokio::test]
async fn a_failed_docker_restart_is_retried_for_docker0() {
    let fake = FakeKernel::new();
    fake.host().restart_fails = true;
    let mut r = reconciler(&fake);
    let e = r.reconcile(&seed_a()).await.expect_err("restart fails");
    assert!(e.to_string().contains("fake failure"), "{e}");
    fake.host().restart_fails = false;
    let shown: Vec<String> = r
        .reconcile(&seed_a())
        .await
        .expect("next pass")
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(
        shown[0],
        "restarted Docker (docker0 carried 172.17.0.1/16, not bip 172.17.34.1/24)"
    );
    assert_eq!(fake.host().links["docker0"], vec![net("172.17.34.1/24")]);
}

#[tokio::test]
async fn vxlan_peers_get_a_device_entries_and_onlink_routes() {
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    let mut d = a_with_c_elsewhere();
    d.backend = crate::Backend::Vxlan;
    r.reconcile(&d).await.expect("pass");
    {
        let h = fake.host();
        let dev = &h.vxlan["geomx-vxlan"];
        assert_eq!(dev.spec.vni, 247);
        assert_eq!(dev.spec.port, 7952);
        assert_eq!(dev.spec.mac.to_string(), "02:47:ac:11:22:00");
        let fdb: Vec<String> = dev
            .fdb
            .iter()
            .map(|f| format!("{} {}", f.mac, f.dst))
            .collect();
        assert_eq!(
            fdb,
            ["02:47:ac:11:1d:00 10.1.1.29", "02:47:ac:11:21:00 10.3.1.33"]
        );
        assert_eq!(dev.neighbours.len(), 2);
        assert_eq!(
            h.geomx_routes(),
            [
                "172.17.29.0/24 via 172.17.29.0",
                "172.17.33.0/24 via 172.17.33.0"
            ]
        );
    }
    assert!(r.reconcile(&d).await.expect("again").is_empty());
    // back to auto: b by host-gw, c by WireGuard, the VXLAN device goes
    r.reconcile(&a_with_c_elsewhere()).await.expect("auto");
    assert!(fake.host().vxlan.is_empty());
    r.cleanup().await.expect("cleanup");
    let h = fake.host();
    assert!(h.vxlan.is_empty() && h.wireguard.is_empty() && h.geomx_routes().is_empty());
}

#[tokio::test]
async fn cleanup_removes_only_routes_inside_the_cluster() {
    let fake = FakeKernel::new();
    reconciler(&fake).reconcile(&seed_a()).await.expect("pass");
    let foreign = KernelRoute {
        destination: net("192.168.50.0/24"),
        gateway: Some("10.1.1.50".parse().expect("ip")),
        device: Some("eth0".into()),
        protocol: ROUTE_PROTOCOL,
        metric: 0,
        kind: RouteKind::Unicast,
    };
    fake.host().routes.push(foreign.clone());
    // a state file of an older agent (no cluster) and a process that never ran a pass:
    // no proof which protocol 247 routes are geomx's, so none through a gateway goes
    let state = fake.host().state.clone().expect("state");
    let mut old: serde_json::Value = serde_json::from_str(&state).expect("json");
    old.as_object_mut().expect("object").remove("cluster");
    fake.host().state = Some(old.to_string());
    let changes = reconciler(&fake).cleanup().await.expect("cleanup");
    assert!(
        !changes
            .iter()
            .any(|c| matches!(c, Change::RouteDeleted { .. }))
    );
    assert_eq!(fake.host().geomx_routes().len(), 3);

    // a new pass records the cluster; a later process's cleanup (agent restarted, or
    // `geomx-agent cleanup`) removes geomx's routes, and only those
    reconciler(&fake).reconcile(&seed_a()).await.expect("pass");
    let state: serde_json::Value =
        serde_json::from_str(fake.host().state.as_deref().expect("state")).expect("json");
    assert_eq!(state["cluster"], "172.17.0.0/16");
    reconciler(&fake).cleanup().await.expect("cleanup");
    assert_eq!(
        fake.host().geomx_routes(),
        ["192.168.50.0/24 via 10.1.1.50"]
    );
    // an explicit cluster works the same
    reconciler(&fake).reconcile(&seed_a()).await.expect("pass");
    fake.host().state = Some(old.to_string());
    reconciler(&fake)
        .cleanup_within(Some(net("172.17.0.0/16")))
        .await
        .expect("cleanup");
    assert_eq!(
        fake.host().geomx_routes(),
        ["192.168.50.0/24 via 10.1.1.50"]
    );
}

#[tokio::test]
async fn a_pass_that_restarted_docker_asks_to_be_planned_again() {
    use crate::Action;
    let fake = FakeKernel::new();
    let mut r = reconciler(&fake);
    // the first pass writes the bip and restarts Docker: it stops there and requeues
    let first = r.pass(&seed_a()).await.expect("first pass");
    assert_eq!(first.action, Action::Requeue, "{:?}", first.changes);
    assert!(
        first
            .changes
            .iter()
            .any(|c| matches!(c, Change::DockerRestarted { .. })),
        "{:?}",
        first.changes
    );
    assert_eq!(fake.host().restarts, 1);
    assert_eq!(
        r.last_applied(),
        None,
        "a requeued pass is not the last applied"
    );
    // the next one finishes the host and converges; the one after changes nothing
    let second = r.pass(&seed_a()).await.expect("second pass");
    assert_eq!(second.action, Action::Converged, "{:?}", second.changes);
    assert_eq!(fake.host().geomx_routes().len(), 2);
    assert_eq!(r.last_applied(), Some(&seed_a()));
    let third = r.pass(&seed_a()).await.expect("third pass");
    assert_eq!((third.action, third.changes), (Action::Converged, vec![]));
    assert_eq!(fake.host().restarts, 1);
}

#[test]
fn the_retry_delay_doubles_from_a_second_up_to_the_interval() {
    use crate::reconcile::Backoff;
    let s = Duration::from_secs;
    let mut b = Backoff::new(s(10));
    let waits: Vec<Duration> = (0..6).map(|_| b.failed()).collect();
    assert_eq!(waits, [s(1), s(2), s(4), s(8), s(10), s(10)]);
    // a success starts over
    b.succeeded();
    assert_eq!(b.failed(), s(1));
    assert_eq!(b.failed(), s(2));
    // an interval below a second is the delay from the first failure on
    let mut short = Backoff::new(Duration::from_millis(300));
    assert_eq!(short.failed(), Duration::from_millis(300));
    assert_eq!(short.failed(), Duration::from_millis(300));
    // a huge interval does not overflow
    let mut long = Backoff::new(Duration::MAX);
    for _ in 0..80 {
        long.failed();
    }
    assert_eq!(long.failed(), Duration::MAX);
}

/// The loop: a pass that restarted Docker is followed by another at once (not after the
/// interval), failed passes are retried after 1 s, then 2 s (not at the interval).
#[tokio::test]
async fn the_loop_requeues_after_a_restart_and_backs_off_after_failures() {
    use std::time::Instant;
    let fake = FakeKernel::new();
    fake.host()
        .fail_on("route replace 172.17.33.0/24", "Network is down");
    let mut config = NetConfig::new("a");
    config.docker_ready_timeout = Duration::from_millis(300);
    config.interval = Duration::from_secs(60);
    let mut r = Reconciler::new(config, fake.kernel());
    let (_tx, rx) = watch::channel(Some(seed_a()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // (when, the pass's action or None for a failure)
    let passes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = passes.clone();
    let task = tokio::spawn(async move {
        r.run(
            rx,
            async {
                let _ = stop_rx.await;
            },
            move |_, result| {
                seen.lock()
                    .expect("lock")
                    .push((Instant::now(), result.as_ref().ok().map(|o| o.action)));
            },
        )
        .await;
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes.lock().expect("lock").len() < 4 {
        assert!(Instant::now() < deadline, "passes: {:?}", passes.lock());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    task.await.expect("loop ends on shutdown");
    let passes = passes.lock().expect("lock").clone();
    let actions: Vec<_> = passes.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        actions[..4],
        [Some(crate::Action::Requeue), None, None, None],
        "the restart requeues; c's route fails from then on"
    );
    let gap = |i: usize| passes[i + 1].0 - passes[i].0;
    // at once after the restart: well below the first retry and the interval
    assert!(gap(0) < Duration::from_millis(900), "{:?}", gap(0));
    // then 1 s and 2 s: growing, never the 60 s interval
    let ms = Duration::from_millis;
    assert!(
        gap(1) >= ms(990) && gap(1) < Duration::from_secs(20),
        "{:?}",
        gap(1)
    );
    assert!(
        gap(2) >= ms(1990) && gap(2) < Duration::from_secs(20),
        "{:?}",
        gap(2)
    );
}
