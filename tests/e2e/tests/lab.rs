//! The lab harness itself: hosts reach each other over the underlay, each runs its own
//! dockerd, and teardown leaves nothing behind.

use std::time::Duration;

use geomx_e2e::lab_tests_enabled;
use geomx_lab::{Lab, LabSpec, OUTSIDE_IP, Rootfs};

#[test]
fn lab_builds_hosts_with_own_dockerd_and_tears_down_without_leftovers() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let lab = Lab::up(LabSpec::for_test().seed_hosts())?;
    let a = lab.host("a")?;
    let c = lab.host("c")?;

    // underlay: a reaches c and the outside address; the machine's own namespace is untouched
    a.run(&["busybox", "ping", "-c1", "-W2", &c.underlay_ip.to_string()])?;
    a.run(&["busybox", "ping", "-c1", "-W2", &OUTSIDE_IP.to_string()])?;
    let root_links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()?;
    let root_links = String::from_utf8_lossy(&root_links.stdout);
    assert!(
        !root_links.contains("v-a"),
        "a lab interface leaked into the root namespace"
    );

    // one dockerd per host, each in its own namespace: docker0 lives in the host namespace
    for h in lab.hosts() {
        let d = h.dockerd()?;
        assert!(d.pid().is_some(), "dockerd of {} is not running", h.name);
        let link = h.run(&["ip", "-o", "-4", "addr", "show", "docker0"])?;
        assert!(
            link.contains("inet "),
            "host {} has no docker0 address: {link}",
            h.name
        );
    }

    // a busybox image imported from this machine runs
    let rootfs = Rootfs::new(&lab.dir().join("rootfs"))?.with_busybox()?;
    let da = a.dockerd()?;
    rootfs.import(da, "geomx-lab/busybox:test", &["/bin/sh"])?;
    let out = da.docker(&["run", "--rm", "geomx-lab/busybox:test", "echo", "hello"])?;
    assert_eq!(out, "hello");
    da.docker(&[
        "run",
        "-d",
        "--name",
        "sleeper",
        "geomx-lab/busybox:test",
        "sleep",
        "600",
    ])?;
    let ip = da.container_ip("sleeper")?;
    assert!(ip.octets()[0] == 172, "unexpected container ip {ip}");

    // cutting a link isolates the host
    lab.cut_link("c")?;
    assert!(
        a.run(&["busybox", "ping", "-c1", "-W1", &c.underlay_ip.to_string()])
            .is_err()
    );
    lab.restore_link("c")?;
    geomx_e2e::eventually("c reachable again", Duration::from_secs(5), || {
        a.run(&["busybox", "ping", "-c1", "-W1", &c.underlay_ip.to_string()])
            .ok()
    })?;

    let dir = lab.dir();
    let names: Vec<String> = lab.hosts().iter().map(|h| h.netns().name()).collect();
    let dockerd_pid = da.pid();
    lab.down()?;

    assert!(!dir.exists(), "lab directory {} left behind", dir.display());
    let ns = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()?
            .stdout,
    )
    .into_owned();
    for n in names {
        assert!(!ns.contains(&n), "namespace {n} left behind");
    }
    if let Some(pid) = dockerd_pid {
        assert!(!geomx_lab::alive(pid), "dockerd {pid} still running");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "mounts left under the lab dir"
    );
    Ok(())
}

#[test]
fn dropping_a_lab_on_panic_cleans_up() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let spec = LabSpec::for_test()
        .host("x", std::net::Ipv4Addr::new(10, 1, 1, 50))
        .docker(false);
    let dir = spec.dir();
    let ns = format!("{}-x", spec.name);
    let result = std::panic::catch_unwind(move || {
        let _lab = Lab::up(spec).expect("lab up");
        panic!("a failing test");
    });
    assert!(result.is_err());
    assert!(!dir.exists(), "lab directory left behind after a panic");
    assert!(
        !std::path::Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} left behind after a panic"
    );
    Ok(())
}

#[test]
fn a_flat_lab_registry_serves_its_hosts_and_goes_with_a_panicking_test() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    if !lab_tests_enabled() {
        return Ok(());
    }
    let spec = LabSpec::for_test()
        .host("a", std::net::Ipv4Addr::new(10, 1, 1, 34))
        .host("b", std::net::Ipv4Addr::new(10, 1, 1, 29))
        .registry(geomx_lab::RegistrySpec::default());
    let (name, dir) = (spec.name.clone(), spec.dir());
    let lab = Lab::up(spec)?;
    let reg = lab.registry().context("no registry")?.clone();
    // on the underlay, beside the hosts
    ensure!(reg.host_port() == "10.1.1.253:5000", "{}", reg.host_port());
    let pid: u32 = std::fs::read_to_string(reg.dir.join("registry.pid"))?
        .trim()
        .parse()?;
    let auth = reg.auth_file();
    let config = auth.parent().context("auth file dir")?;
    let test = reg.image(geomx_lab::REGISTRY_TEST_IMAGE);
    let pull = |host: &str, image: &str| -> anyhow::Result<String> {
        let h = lab.host(host)?;
        let out = h.docker_with_config(config, &["pull", "--quiet", image])?;
        ensure!(
            out.status.success(),
            "{host}: pull {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(h.dockerd()?
            .docker(&["image", "inspect", "-f", "{{index .RepoDigests 0}}", image])?)
    };
    let on_b = pull("b", &test)?;
    // the API later tests use: a host's image pushed under a name of its own
    let again = lab.push_to_registry("b", &test, "geomx/again:1")?;
    let on_a = pull("a", &again)?;
    let digest = |r: &str| r.split_once('@').map(|(_, d)| d.to_string());
    ensure!(
        digest(&on_a).is_some() && digest(&on_a) == digest(&on_b),
        "{on_a} vs {on_b}"
    );

    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _lab = lab;
        panic!("a test failing with its registry up");
    }));
    ensure!(r.is_err());
    ensure!(
        geomx_lab::gone(pid),
        "the registry (pid {pid}) outlived its lab"
    );
    ensure!(!dir.exists(), "{} left behind", dir.display());
    let ns = std::path::Path::new("/run/netns").join(format!("{name}-svc-registry"));
    ensure!(!ns.exists(), "{} left behind", ns.display());
    Ok(())
}
