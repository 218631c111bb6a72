//! geomx-agent's host networking against the real kernel: a lab of hosts (network
//! namespaces on an underlay bridge, one dockerd each), the real `geomx-agent` binary run
//! inside the host namespaces.
//!
//! Needs the binary: `cargo build --workspace --bins` before `cargo test`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use geomx_e2e::net::{geomx_routes, import_busybox, tcp_source};
use geomx_e2e::{eventually, lab_tests_enabled};
use geomx_lab::{Lab, LabHost, LabSpec, Netns, OUTSIDE_IP};

const CLUSTER: &str = "172.17.0.0/16";
const IMAGE: &str = "geomx-test/busybox:net";

/// The seed documents' container subnet of each lab host.
fn subnet_of(host: &str) -> &'static str {
    match host {
        "a" => "172.17.34.0/24",
        "b" => "172.17.29.0/24",
        "c" => "172.17.33.0/24",
        _ => "172.17.99.0/24",
    }
}

/// target/debug/geomx-agent, next to the directory of this test executable.
fn agent_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable without a parent directory")?;
    let bin = dir.join("geomx-agent");
    ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        bin.display()
    );
    Ok(bin)
}

/// The agent of one lab host: its flags point at the host's dockerd and files.
struct Agent<'a> {
    host: &'a LabHost,
    bin: PathBuf,
}

impl<'a> Agent<'a> {
    fn new(host: &'a LabHost) -> anyhow::Result<Agent<'a>> {
        Ok(Agent {
            host,
            bin: agent_bin()?,
        })
    }

    fn state_dir(&self) -> PathBuf {
        self.host.dir().join("agent-state")
    }

    fn host_file(&self) -> PathBuf {
        self.host.dir().join("host.toml")
    }

    fn common_args(&self) -> anyhow::Result<Vec<String>> {
        let d = self.host.dockerd()?;
        Ok(vec![
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--daemon-json".into(),
            d.daemon_json().display().to_string(),
            "--docker-host".into(),
            d.url(),
            "--docker-restart-command".into(),
            d.restart_script().display().to_string(),
        ])
    }

    /// Runs `geomx-agent <common flags> <args>` inside the host's namespace.
    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = self.common_args()?;
        all.extend(args.iter().map(|s| s.to_string()));
        self.run_raw(&all)
    }

    fn run_raw(&self, args: &[String]) -> anyhow::Result<Output> {
        let bin = self.bin.display().to_string();
        let out = self
            .host
            .netns()
            .command(&bin)
            .args(args)
            .env("GEOMX_LOG", "info")
            .output()
            .with_context(|| format!("running {bin}"))?;
        Ok(out)
    }

    /// Runs and requires success; returns standard output.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "geomx-agent {args:?} on {} failed ({}):\n{}",
                self.host.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes host.toml: this host's seed subnet and `peers` (name, underlay, subnet).
    fn write_host_file(&self, peers: &[(&str, Ipv4Addr, &str)]) -> anyhow::Result<()> {
        write_host_file(
            &self.host_file(),
            &self.host.name,
            subnet_of(&self.host.name),
            peers,
        )
    }

    fn apply(&self) -> anyhow::Result<String> {
        let f = self.host_file().display().to_string();
        self.ok(&["network", "apply", "--config", &f])
    }
}

fn write_host_file(
    path: &Path,
    name: &str,
    subnet: &str,
    peers: &[(&str, Ipv4Addr, &str)],
) -> anyhow::Result<()> {
    let mut s = format!("name = \"{name}\"\nsubnet = \"{subnet}\"\ncluster = \"{CLUSTER}\"\n");
    for (n, ip, sub) in peers {
        s.push_str(&format!(
            "\n[[peers]]\nname = \"{n}\"\nunderlay_ip = \"{ip}\"\nsubnet = \"{sub}\"\n"
        ));
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// Every other lab host as a peer of `host`.
fn peers_of<'l>(lab: &'l Lab, host: &str) -> Vec<(&'l str, Ipv4Addr, &'static str)> {
    lab.hosts()
        .iter()
        .filter(|h| h.name != host)
        .map(|h| (h.name.as_str(), h.underlay_ip, subnet_of(&h.name)))
        .collect()
}

/// The host state cleanup must give back: routes, nat and filter tables, daemon.json.
#[derive(Debug, PartialEq)]
struct Snapshot {
    routes: String,
    iptables: String,
    daemon_json: String,
}

fn snapshot(host: &LabHost) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        routes: host.netns().routes()?,
        iptables: host.netns().iptables_save()?,
        daemon_json: std::fs::read_to_string(host.dockerd()?.daemon_json())?,
    })
}

/// Adds a route, a nat rule and a filter rule that geomx did not make.
fn add_foreign_state(host: &LabHost) -> anyhow::Result<()> {
    let ns = host.netns();
    ns.run(&["ip", "route", "add", "192.168.250.0/24", "via", "10.1.1.1"])?;
    ns.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "192.168.251.0/24",
        "-m",
        "comment",
        "--comment",
        "not geomx",
        "-j",
        "MASQUERADE",
    ])?;
    ns.run(&[
        "iptables",
        "-A",
        "FORWARD",
        "-s",
        "192.168.252.0/24",
        "-m",
        "comment",
        "--comment",
        "not geomx",
        "-j",
        "ACCEPT",
    ])?;
    Ok(())
}

fn assert_foreign_state_intact(host: &LabHost) -> anyhow::Result<()> {
    let routes = host.netns().routes()?;
    ensure!(
        routes.contains("192.168.250.0/24 via 10.1.1.1"),
        "the foreign route is gone:\n{routes}"
    );
    let save = host.netns().iptables_save()?;
    for rule in [
        "-A POSTROUTING -s 192.168.251.0/24 -m comment --comment \"not geomx\" -j MASQUERADE",
        "-A FORWARD -s 192.168.252.0/24 -m comment --comment \"not geomx\" -j ACCEPT",
    ] {
        ensure!(save.contains(rule), "foreign rule {rule} is gone:\n{save}");
    }
    Ok(())
}

/// The rules of `chain` in `table`, as `iptables -S` prints them.
fn chain_rules(host: &LabHost, table: &str, chain: &str) -> anyhow::Result<Vec<String>> {
    let out = host.run(&["iptables", "-t", table, "-S", chain])?;
    Ok(out
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect())
}

/// The rules geomx wants on a host whose jumps are in place.
fn assert_geomx_rules_in_place(host: &LabHost) -> anyhow::Result<()> {
    let post = chain_rules(host, "nat", "POSTROUTING")?;
    ensure!(
        post.first()
            .is_some_and(|r| r.ends_with("-j GEOMX-POSTROUTING")),
        "POSTROUTING does not start with the geomx jump: {post:#?}"
    );
    ensure!(
        post.iter()
            .filter(|r| r.ends_with("-j GEOMX-POSTROUTING"))
            .count()
            == 1,
        "more than one jump to GEOMX-POSTROUTING: {post:#?}"
    );
    // right below Docker's DOCKER-USER jump (operators' rules there stay in force), or
    // first when there is none
    let fwd = chain_rules(host, "filter", "FORWARD")?;
    let want = fwd
        .iter()
        .position(|r| r.ends_with("-j DOCKER-USER"))
        .map_or(0, |i| i + 1);
    ensure!(
        fwd.get(want)
            .is_some_and(|r| r.ends_with("-j GEOMX-FORWARD"))
            && fwd
                .iter()
                .filter(|r| r.ends_with("-j GEOMX-FORWARD"))
                .count()
                == 1,
        "FORWARD does not jump to geomx's chain once, right below DOCKER-USER: {fwd:#?}"
    );
    let nat = chain_rules(host, "nat", "GEOMX-POSTROUTING")?;
    let subnet = subnet_of(&host.name);
    ensure!(
        nat.len() == 2
            && nat[0].contains(&format!("-s {CLUSTER} -d {CLUSTER}"))
            && nat[0].ends_with("-j RETURN")
            && nat[1].contains(&format!("-s {subnet} ! -d 224.0.0.0/4"))
            && nat[1].contains("-j MASQUERADE"),
        "unexpected GEOMX-POSTROUTING: {nat:#?}"
    );
    ensure!(
        nat.iter().all(|r| r.contains("--comment \"geomx: ")),
        "a geomx rule without its comment: {nat:#?}"
    );
    Ok(())
}

#[test]
fn agent_connects_containers_across_hosts_and_cleanup_restores_the_host() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let started = Instant::now();
    let lab = Lab::up(LabSpec::for_test().seed_hosts())?;
    let (a, c) = (lab.host("a")?, lab.host("c")?);
    add_foreign_state(a)?;
    let before = snapshot(a)?;
    ensure!(
        before.routes.contains("172.17.0.0/16 dev docker0"),
        "docker0 does not start on Docker's default subnet:\n{}",
        before.routes
    );

    // one pass on every host, in parallel (each restarts its dockerd once)
    let agents: Vec<Agent> = lab
        .hosts()
        .iter()
        .map(Agent::new)
        .collect::<anyhow::Result<_>>()?;
    for ag in &agents {
        ag.write_host_file(&peers_of(&lab, &ag.host.name))?;
    }
    // `network plan` says what a pass would do, and changes nothing
    let a_agent = agents
        .iter()
        .find(|ag| ag.host.name == "a")
        .context("host a")?;
    let f = a_agent.host_file().display().to_string();
    let planned = a_agent.ok(&["network", "plan", "--config", &f])?;
    for step in [
        "write daemon.json: bip",
        "restart Docker (daemon.json changed)",
    ] {
        ensure!(planned.contains(step), "plan on a fresh host:\n{planned}");
    }
    ensure!(snapshot(a)? == before, "network plan changed the host");
    std::thread::scope(|s| {
        let runs: Vec<_> = agents.iter().map(|ag| s.spawn(|| ag.apply())).collect();
        runs.into_iter().try_for_each(|r| {
            let out = r
                .join()
                .map_err(|_| anyhow::anyhow!("agent thread panicked"))??;
            ensure!(
                out.contains("restarted Docker"),
                "first pass output:\n{out}"
            );
            Ok(())
        })
    })?;
    for h in lab.hosts() {
        let addr = h.run(&["ip", "-4", "-o", "addr", "show", "docker0"])?;
        let bip = subnet_of(&h.name).replace(".0/24", ".1/24");
        ensure!(
            addr.contains(&bip),
            "{}: docker0 is not {bip}: {addr}",
            h.name
        );
        assert_geomx_rules_in_place(h)?;
        ensure!(
            geomx_routes(h)?.len() == 2,
            "{}: routes {:?}",
            h.name,
            geomx_routes(h)?
        );
    }
    assert_foreign_state_intact(a)?;

    // containers on a and c talk directly, without NAT
    import_busybox(&lab, &[a, c], IMAGE)?;
    let (da, dc) = (a.dockerd()?, c.dockerd()?);
    for (d, name) in [(da, "xa"), (dc, "xc")] {
        d.docker(&["run", "-d", "--name", name, IMAGE, "sleep", "600"])?;
    }
    let (ip_a, ip_c) = (da.container_ip("xa")?, dc.container_ip("xc")?);
    ensure!(
        ip_a.octets()[..3] == [172, 17, 34] && ip_c.octets()[..3] == [172, 17, 33],
        "containers got {ip_a} and {ip_c}"
    );
    da.docker(&[
        "exec",
        "xa",
        "ping",
        "-c",
        "1",
        "-W",
        "3",
        &ip_c.to_string(),
    ])
    .context("container on a pings the container on c")?;
    let in_c: Netns = dc.container_netns("xc")?;
    let addr = SocketAddr::from((ip_c, 7100));
    let listener = in_c.listen_tcp(addr)?;
    let seen = tcp_source(a, "xa", &listener, addr)?;
    ensure!(
        seen == ip_a,
        "the container on c saw {seen}, not the sender's container address {ip_a}"
    );

    // leaving the cluster, the source is masqueraded to the host's underlay address
    let out_addr = SocketAddr::from((OUTSIDE_IP, 7101));
    let outside = lab.underlay().listen_tcp(out_addr)?;
    let seen = tcp_source(a, "xa", &outside, out_addr)?;
    ensure!(
        seen == a.underlay_ip,
        "the outside saw {seen}, not host a's address {}",
        a.underlay_ip
    );

    // a second pass changes nothing
    let applied = snapshot(a)?;
    let f = Agent::new(a)?.host_file().display().to_string();
    let again = Agent::new(a)?.ok(&["network", "apply", "--config", &f, "--output", "json"])?;
    ensure!(
        again.contains("\"changes\": []"),
        "second pass reported changes: {again}"
    );
    ensure!(snapshot(a)? == applied, "the second pass changed the host");
    ensure!(Agent::new(a)?.apply()?.trim() == "no changes");
    let planned = Agent::new(a)?.ok(&["network", "plan", "--config", &f])?;
    ensure!(
        planned.trim() == "no changes planned",
        "plan on a converged host:\n{planned}"
    );

    // cleanup gives everything back (containers removed first: Docker restarts faster)
    da.remove_all_containers()?;
    let out = Agent::new(a)?.ok(&["cleanup"])?;
    ensure!(
        out.contains("deleted chain nat GEOMX-POSTROUTING")
            && out.contains("restored")
            && out.contains("deleted route 172.17.29.0/24 via 10.1.1.29"),
        "cleanup output:\n{out}"
    );
    let after = snapshot(a)?;
    ensure!(
        after.routes == before.routes,
        "routes differ after cleanup:\nbefore:\n{}\nafter:\n{}",
        before.routes,
        after.routes
    );
    ensure!(
        after.iptables == before.iptables,
        "iptables differ after cleanup:\nbefore:\n{}\nafter:\n{}",
        before.iptables,
        after.iptables
    );
    ensure!(
        after.daemon_json == before.daemon_json,
        "daemon.json differs"
    );
    ensure!(
        !Agent::new(a)?
            .state_dir()
            .join("daemon-json-before-geomx.json")
            .exists(),
        "the state file survived cleanup"
    );
    let out = Agent::new(a)?.ok(&["cleanup"])?;
    ensure!(out.trim() == "no changes", "second cleanup: {out}");
    eprintln!(
        "connectivity test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn agent_repairs_drift_follows_the_peer_list_and_outlives_docker_restarts() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let started = Instant::now();
    // one host is enough: the peers' underlay addresses only need to be on-link
    let lab = Lab::up(LabSpec::for_test().host("a", Ipv4Addr::new(10, 1, 1, 34)))?;
    let a = lab.host("a")?;
    let agent = Agent::new(a)?;
    add_foreign_state(a)?;
    let before = snapshot(a)?;
    let b = ("b", Ipv4Addr::new(10, 1, 1, 29), subnet_of("b"));
    let c = ("c", Ipv4Addr::new(10, 1, 1, 33), subnet_of("c"));
    agent.write_host_file(&[b, c])?;

    let mut argv = vec![agent.bin.display().to_string()];
    argv.extend(agent.common_args()?);
    let file = agent.host_file().display().to_string();
    argv.extend(
        [
            "network",
            "apply",
            "--config",
            &file,
            "--watch",
            "--interval",
            "1s",
        ]
        .map(String::from),
    );
    let proc = lab.spawn(
        a.netns(),
        "agent-a",
        &argv,
        &[("GEOMX_LOG".into(), "info".into())],
    )?;
    eventually("the first pass", Duration::from_secs(60), || {
        (geomx_routes(a).ok()?.len() == 2 && assert_geomx_rules_in_place(a).is_ok()).then_some(())
    })
    .with_context(|| proc.log_tail(30))?;
    let applied = snapshot(a)?;

    // the MASQUERADE rule and a route deleted by hand are back within one interval
    a.run(&["iptables", "-t", "nat", "-D", "GEOMX-POSTROUTING", "2"])?;
    a.run(&["ip", "route", "del", "172.17.29.0/24"])?;
    let t = Instant::now();
    eventually("the repair", Duration::from_secs(3), || {
        (snapshot(a).ok()? == applied).then_some(())
    })
    .with_context(|| proc.log_tail(30))?;
    eprintln!("repaired after {:.2}s", t.elapsed().as_secs_f64());

    // a peer removed from the desired state loses its route (SIGHUP re-reads the file)
    agent.write_host_file(&[b])?;
    let pid = proc.pid().context("the agent is not running")?;
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(hup.success(), "kill -HUP {pid}: {hup}");
    eventually("c's route to go", Duration::from_secs(5), || {
        (geomx_routes(a).ok()? == vec!["172.17.29.0/24 via 10.1.1.29 dev eth0".to_string()])
            .then_some(())
    })
    .with_context(|| proc.log_tail(30))?;
    proc.stop(Duration::from_secs(5))?;
    let log = std::fs::read_to_string(proc.log())?;
    for line in [
        "rebuilt chain nat GEOMX-POSTROUTING",
        "added route 172.17.29.0/24 via 10.1.1.29",
        "deleted route 172.17.33.0/24 via 10.1.1.33",
    ] {
        ensure!(
            log.contains(line),
            "{line:?} is not in the agent's log:\n{log}"
        );
    }
    let applied = snapshot(a)?;

    // Docker's restart puts its own FORWARD rules between DOCKER-USER and geomx's jump; the
    // next pass puts the jump back right below DOCKER-USER
    a.dockerd()?.restart()?;
    let fwd = chain_rules(a, "filter", "FORWARD")?;
    ensure!(
        !fwd[1].ends_with("-j GEOMX-FORWARD"),
        "expected Docker's rules right below DOCKER-USER after its restart: {fwd:#?}"
    );
    let out = agent.apply()?;
    ensure!(
        out.trim().starts_with(
            "put the jump filter FORWARD -> GEOMX-FORWARD at position 2 (found at position "
        ) && out.trim().lines().count() == 1,
        "pass after the Docker restart:\n{out}"
    );
    ensure!(
        snapshot(a)? == applied,
        "the pass did not restore the state"
    );
    ensure!(agent.apply()?.trim() == "no changes");

    // `network show` describes it
    let show = agent.ok(&["network", "show"])?;
    ensure!(
        show.contains("172.17.29.0/24") && show.contains("jump from POSTROUTING at position 1"),
        "network show:\n{show}"
    );
    let json = agent.ok(&["network", "show", "--output", "json"])?;
    ensure!(
        json.contains("\"jump_positions\": [\n        1\n      ]"),
        "network show --output json:\n{json}"
    );
    assert_foreign_state_intact(a)?;

    let out = agent.ok(&["cleanup"])?;
    ensure!(
        out.contains("deleted route 172.17.29.0/24"),
        "cleanup: {out}"
    );
    ensure!(
        snapshot(a)? == before,
        "cleanup did not restore the host:\nbefore {before:#?}\nafter {:#?}",
        snapshot(a)?
    );
    eprintln!("drift test took {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let lab = Lab::up(LabSpec::for_test().host("a", Ipv4Addr::new(10, 1, 1, 34)))?;
    let a = lab.host("a")?;
    let agent = Agent::new(a)?;
    let before = snapshot(a)?;
    let file = agent.host_file().display().to_string();
    let b = ("b", Ipv4Addr::new(10, 1, 1, 29), subnet_of("b"));

    let refused = |what: &str, args: &[String], expect: &str| -> anyhow::Result<()> {
        let out = agent.run_raw(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1),
            "{what}: exit {} (want 1), stderr:\n{stderr}",
            out.status
        );
        ensure!(
            stderr.contains(expect),
            "{what}: the error does not say {expect:?}:\n{stderr}"
        );
        let now = snapshot(a)?;
        ensure!(
            now == before,
            "{what}: the host changed:\nbefore {before:#?}\nnow {now:#?}"
        );
        ensure!(
            !agent
                .state_dir()
                .join("daemon-json-before-geomx.json")
                .exists(),
            "{what}: state was written"
        );
        Ok(())
    };
    // `extra` flags replace the agent's usual ones of the same name
    let apply_args = |extra: &[&str]| -> anyhow::Result<Vec<String>> {
        let mut v = agent.common_args()?;
        for pair in extra.chunks(2) {
            if let [flag, value] = pair
                && let Some(i) = v.iter().position(|x| x == flag)
            {
                v[i + 1] = value.to_string();
            }
        }
        v.extend(["network", "apply", "--config", &file].map(String::from));
        Ok(v)
    };

    write_host_file(&agent.host_file(), "a", "10.200.0.0/24", &[b])?;
    refused(
        "subnet outside the cluster",
        &apply_args(&[])?,
        "this host's subnet 10.200.0.0/24 is outside the cluster CIDR 172.17.0.0/16",
    )?;

    agent.write_host_file(&[b, ("c", Ipv4Addr::new(10, 1, 1, 33), "172.17.29.128/25")])?;
    refused(
        "overlapping peers",
        &apply_args(&[])?,
        "peers b (172.17.29.0/24) and c (172.17.29.128/25) have overlapping subnets",
    )?;

    agent.write_host_file(&[("b", Ipv4Addr::new(10, 1, 1, 29), "172.17.34.0/24")])?;
    refused(
        "peer with this host's subnet",
        &apply_args(&[])?,
        "peer b: its subnet 172.17.34.0/24 overlaps this host's subnet 172.17.34.0/24",
    )?;

    agent.write_host_file(&[b, ("b", Ipv4Addr::new(10, 1, 1, 33), "172.17.33.0/24")])?;
    refused(
        "duplicate peer",
        &apply_args(&[])?,
        "peer b is listed more than once",
    )?;

    agent.write_host_file(&[("b", Ipv4Addr::new(192, 0, 2, 7), "172.17.29.0/24")])?;
    refused(
        "peer not on-link",
        &apply_args(&[])?,
        "peer b: underlay address 192.0.2.7 is not on a directly connected network (it is reached via 10.1.1.1)",
    )?;

    agent.write_host_file(&[b])?;
    refused(
        "missing Docker socket",
        &apply_args(&["--docker-host", "unix:///nonexistent/docker.sock"])?,
        "Docker at unix:///nonexistent/docker.sock is not reachable: the socket /nonexistent/docker.sock does not exist",
    )?;

    std::fs::write(
        agent.host_file(),
        "subnet = \"172.17.34.0/24\"\ncluster = 17\n",
    )?;
    refused("malformed host file", &apply_args(&[])?, "line 2")?;
    agent.write_host_file(&[b])?;

    // a route to a peer subnet made by someone else: geomx does not take it over
    a.run(&["ip", "route", "add", "172.17.29.0/24", "via", "10.1.1.29"])?;
    let with_route = snapshot(a)?;
    let out = agent.run_raw(&apply_args(&[])?)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && stderr.contains("a route to 172.17.29.0/24 not made by geomx exists"),
        "route conflict: {stderr}"
    );
    ensure!(
        snapshot(a)? == with_route,
        "route conflict: the host changed"
    );
    a.run(&["ip", "route", "del", "172.17.29.0/24"])?;

    // a malformed daemon.json is named with line and column, and left as it is
    let dj = a.dockerd()?.daemon_json();
    let original = std::fs::read_to_string(&dj)?;
    std::fs::write(&dj, "{\n  \"debug\": true,,\n}\n")?;
    let out = agent.run_raw(&apply_args(&[])?)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && stderr.contains(&format!(
                "{}: malformed JSON at line 2, column 17",
                dj.display()
            )),
        "malformed daemon.json: {stderr}"
    );
    ensure!(std::fs::read_to_string(&dj)? == "{\n  \"debug\": true,,\n}\n");
    std::fs::write(&dj, original)?;
    ensure!(snapshot(a)? == before, "the host changed");

    // `run` needs the control plane in this build
    let out = agent.run_raw(&["run".to_string()])?;
    ensure!(out.status.code() == Some(2), "run: {}", out.status);
    Ok(())
}
