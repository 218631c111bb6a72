//! The control plane in a lab: the real geomx-controller (TLS, tokens) in the underlay
//! namespace and a real geomx-agent on every host, as a person would run them.
//!
//! Needs the binaries: `cargo build --workspace --bins` before `cargo test`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use geomx_e2e::net::{assert_containers_connected, geomx_routes};
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::{Binaries, Cluster, ClusterSpec, HostSpec, Lab, LabHost, LabSpec, PSNODE_IMAGE};

const GRACE: Duration = Duration::from_secs(3);

fn cluster(hosts: &[(&str, Ipv4Addr)]) -> anyhow::Result<Cluster> {
    let mut spec = LabSpec::for_test();
    for (n, ip) in hosts {
        spec = spec.host(n, *ip);
    }
    let lab = Lab::up(spec)?;
    let cluster = Cluster::up(
        lab,
        ClusterSpec {
            grace_period: GRACE,
            heartbeat_interval: Duration::from_millis(500),
            network_interval: Duration::from_secs(1),
            ..ClusterSpec::default()
        },
        Binaries::find()?,
    )?;
    Ok(cluster)
}

/// Host name → (subnet, state) as the controller reports them.
fn leases(c: &Cluster) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    Ok(c.hosts()?
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or_default().to_string(),
                (
                    h["subnet"].as_str().unwrap_or_default().to_string(),
                    h["state"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// What a host's kernel holds: routes and the normalized iptables-save.
fn kernel_state(h: &LabHost) -> anyhow::Result<(String, String)> {
    Ok((h.netns().routes()?, h.netns().iptables_save()?))
}

fn all_kernel_states(c: &Cluster) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    c.lab()
        .hosts()
        .iter()
        .map(|h| Ok((h.name.clone(), kernel_state(h)?)))
        .collect()
}

fn has_route_to(h: &LabHost, subnet: &str, via: Ipv4Addr) -> bool {
    geomx_routes(h)
        .map(|r| {
            r.iter()
                .any(|l| l.starts_with(&format!("{subnet} via {via} ")))
        })
        .unwrap_or(false)
}

fn host_json(c: &Cluster, name: &str) -> Option<serde_json::Value> {
    c.hosts().ok()?.into_iter().find(|h| h["name"] == name)
}

#[test]
fn controller_leases_subnets_connects_hosts_and_admits_a_fourth() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let mut c = cluster(&geomx_lab::SEED_HOSTS)?;

    // every agent got a distinct /24 of the cluster CIDR, docker0 carries its first address,
    // and routes to every peer subnet via the peer's underlay IP
    let leases = leases(&c)?;
    ensure!(leases.len() == 3, "hosts: {leases:?}");
    let mut subnets = std::collections::BTreeSet::new();
    for (name, (subnet, state)) in &leases {
        ensure!(state == "ready", "{name} is {state}");
        let net: ipnet::Ipv4Net = subnet.parse().context("subnet")?;
        let cluster: ipnet::Ipv4Net = "172.17.0.0/16".parse()?;
        ensure!(
            net.prefix_len() == 24 && cluster.contains(&net),
            "{name}: {subnet} is not a /24 of {cluster}"
        );
        ensure!(subnets.insert(subnet.clone()), "{subnet} leased twice");
        let h = c.lab().host(name)?;
        let gw = Ipv4Addr::from(u32::from(net.network()) + 1);
        let docker0 = h.run(&["ip", "-o", "-4", "addr", "show", "docker0"])?;
        ensure!(
            docker0.contains(&format!("inet {gw}/24")),
            "{name}: docker0 is not {gw}/24: {docker0}"
        );
    }
    for h in c.lab().hosts() {
        for peer in c.lab().hosts().iter().filter(|p| p.name != h.name) {
            let subnet = &leases[&peer.name].0;
            ensure!(
                has_route_to(h, subnet, peer.underlay_ip),
                "{} has no route to {subnet} via {}: {:?}",
                h.name,
                peer.underlay_ip,
                geomx_routes(h)?
            );
        }
    }
    assert_containers_connected(c.lab().host("a")?, c.lab().host("c")?, PSNODE_IMAGE)?;

    // a fourth host: every existing host has its route within 2 s of its registration
    c.add_host(HostSpec {
        name: "d".into(),
        underlay_ip: Ipv4Addr::new(10, 1, 1, 40),
        dc: None,
    })?;
    let d = eventually("d registered", Duration::from_secs(60), || {
        host_json(&c, "d").filter(|h| h["subnet"].as_str().is_some_and(|s| !s.is_empty()))
    })?;
    let d_subnet = d["subnet"].as_str().unwrap_or_default().to_string();
    let registered_at = d["registered_at_ms"].as_i64().unwrap_or_default();
    let d_ip = Ipv4Addr::new(10, 1, 1, 40);
    for name in ["a", "b", "c"] {
        let h = c.lab().host(name)?;
        eventually(
            &format!("{name} routes to d's {d_subnet}"),
            Duration::from_secs(10),
            || has_route_to(h, &d_subnet, d_ip).then_some(()),
        )?;
    }
    let converged_after = now_ms() - registered_at;
    eprintln!("route_convergence_join_ms={converged_after}");
    ensure!(
        converged_after <= 2000,
        "the existing hosts got d's route {converged_after} ms after it registered (> 2 s)"
    );
    c.wait_hosts_ready(&["d".to_string()], Duration::from_secs(60))?;
    c.build_images(&[c.lab().host("d")?.clone()])?;
    assert_containers_connected(c.lab().host("d")?, c.lab().host("b")?, PSNODE_IMAGE)?;

    // security: a wrong token and a client that does not trust the controller are refused
    let mut bad = c.ctl_env(&c.controller_url());
    bad.retain(|(k, _)| k != "GEOMX_TOKEN");
    let out = c
        .lab()
        .underlay()
        .command(&c.binaries().ctl.display().to_string())
        .args(["hosts", "--token", "not-the-token"])
        .envs(bad.clone())
        .output()?;
    ensure!(!out.status.success(), "a wrong token was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.to_lowercase().contains("token") || err.contains("Unauthenticated"),
        "unclear refusal of a wrong token: {err}"
    );
    bad.retain(|(k, _)| k != "GEOMX_CA");
    let out = c
        .lab()
        .underlay()
        .command(&c.binaries().ctl.display().to_string())
        .args(["hosts", "--token", c.token()])
        .envs(bad)
        .output()?;
    ensure!(
        !out.status.success(),
        "a client without the lab CA trusted the controller"
    );
    c.down()?;
    Ok(())
}

#[test]
fn hosts_survive_restarts_and_a_lost_host_comes_back_with_its_subnet() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = cluster(&geomx_lab::SEED_HOSTS)?;
    let before = leases(&c)?;
    let kernel_before = all_kernel_states(&c)?;

    // kill -9 of the controller: nothing changes on any host while it is away, and after a
    // restart on the same state dir every lease is there and every agent reconnects
    c.controller().kill9()?;
    std::thread::sleep(GRACE + Duration::from_secs(1));
    ensure!(
        all_kernel_states(&c)? == kernel_before,
        "a host's routes or rules changed while the controller was away"
    );
    c.start_controller()?;
    let names: Vec<String> = before.keys().cloned().collect();
    c.wait_hosts_ready(&names, Duration::from_secs(30))?;
    ensure!(
        leases(&c)? == before,
        "leases changed across a controller restart"
    );
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        all_kernel_states(&c)? == kernel_before,
        "a host's routes or rules changed across the controller restart"
    );

    // kill -9 of an agent: same subnet after its restart, nothing duplicated
    c.agent("b").kill9()?;
    c.start_agent("b")?;
    c.wait_hosts_ready(&["b".to_string()], Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        leases(&c)? == before,
        "leases changed across an agent restart"
    );
    ensure!(
        all_kernel_states(&c)? == kernel_before,
        "an agent restart changed routes or rules"
    );

    // a host cut off: lost within the grace period, its routes withdrawn from the others
    let (c_subnet, _) = before["c"].clone();
    let c_ip = c.lab().host("c")?.underlay_ip;
    c.agent("c").kill9()?;
    c.lab().cut_link("c")?;
    let cut = Instant::now();
    eventually("c marked lost", GRACE + Duration::from_secs(5), || {
        host_json(&c, "c").filter(|h| h["state"] == "lost")
    })?;
    let lost_after = cut.elapsed();
    eprintln!("host_loss_detected_ms={}", lost_after.as_millis());
    ensure!(
        lost_after <= GRACE + Duration::from_millis(1500),
        "c was marked lost after {lost_after:?} (grace {GRACE:?})"
    );
    for name in ["a", "b"] {
        let h = c.lab().host(name)?;
        eventually(
            &format!("{name} withdraws the route to c"),
            Duration::from_secs(3),
            || (!has_route_to(h, &c_subnet, c_ip)).then_some(()),
        )?;
    }

    // and back: same subnet, routes restored everywhere
    c.lab().restore_link("c")?;
    c.start_agent("c")?;
    c.wait_hosts_ready(&["c".to_string()], Duration::from_secs(30))?;
    ensure!(
        leases(&c)?["c"].0 == c_subnet,
        "c came back with another subnet"
    );
    for name in ["a", "b"] {
        let h = c.lab().host(name)?;
        eventually(
            &format!("{name} routes to c again"),
            Duration::from_secs(5),
            || has_route_to(h, &c_subnet, c_ip).then_some(()),
        )?;
    }
    assert_containers_connected(c.lab().host("a")?, c.lab().host("c")?, PSNODE_IMAGE)?;
    c.down()?;
    Ok(())
}
