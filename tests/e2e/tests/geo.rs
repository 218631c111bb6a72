//! The geo-distributed lab: data centers on their own routed networks joined by emulated WAN
//! links. What the links do is measured here the way a user would check a real WAN: ping
//! round trips, iperf3 throughput, datagrams counted at the receiver.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use geomx_e2e::lab_tests_enabled;
use geomx_lab::measure::{iperf3, mean_sd, ping_rtts, udp_delivered};
use geomx_lab::topology::parse_topology;
use geomx_lab::{Lab, LabSpec, Netns};

const TOPOLOGY: &str = r#"
[[dc]]
name = "dc1"
subnet = "10.1.1.0/24"
hosts = [{ name = "a", ip = "10.1.1.34" }, "a2"]
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
delay = "20ms"

[[link]]
dcs = ["dc1", "dc3"]
delay = "10ms"
rate = "200mbit"

[[link]]
dcs = ["dc2", "dc3"]
loss = "1%"
"#;

fn geo_lab() -> anyhow::Result<Lab> {
    let file = parse_topology("geo.toml", TOPOLOGY)?;
    Ok(Lab::up(LabSpec::for_test().docker(false).topology(file))?)
}

fn ip(lab: &Lab, host: &str) -> anyhow::Result<Ipv4Addr> {
    Ok(lab.host(host)?.underlay_ip)
}

fn ns(lab: &Lab, host: &str) -> anyhow::Result<Netns> {
    Ok(lab.host(host)?.netns().clone())
}

/// Measurements share two cores with the rest of the suite: a figure counts when one of up to
/// three attempts lands in its band.
fn within<T: std::fmt::Debug>(
    what: &str,
    mut measure: impl FnMut() -> anyhow::Result<T>,
    ok: impl Fn(&T) -> bool,
) -> anyhow::Result<T> {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let v = measure()?;
        if ok(&v) {
            eprintln!("{what}: {v:?}");
            return Ok(v);
        }
        seen.push(v);
    }
    anyhow::bail!("{what}: out of band in every attempt: {seen:?}")
}

fn rtt_stats(
    lab: &Lab,
    from: &str,
    to: &str,
    n: u32,
    gap_ms: u64,
) -> anyhow::Result<(f64, f64, usize)> {
    let rtts = ping_rtts(
        &ns(lab, from)?,
        ip(lab, to)?,
        n,
        Duration::from_millis(gap_ms),
    )?;
    let (m, sd) = mean_sd(&rtts);
    Ok((m, sd, rtts.len()))
}

fn delay_line_pid(lab: &Lab) -> Option<u32> {
    lab.process("delayline").pid()
}

#[test]
fn wan_links_delay_shape_lose_and_partition_as_configured() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let mut lab = geo_lab()?;
    let dl = delay_line_pid(&lab).context("the delay line runs")?;

    // inside a data center: bridged at LAN speed, never through the router
    let (lan_rtt, _, n) = rtt_stats(&lab, "a", "a2", 10, 20)?;
    ensure!(
        n == 10 && lan_rtt < 1.0,
        "LAN round trip {lan_rtt:.3} ms ({n} replies)"
    );
    let lan = iperf3(
        &lab,
        &ns(&lab, "a2")?,
        &ns(&lab, "a")?,
        ip(&lab, "a2")?,
        3,
        1,
    )?;
    ensure!(lan > 1e9, "LAN throughput {:.0} Mbit/s", lan / 1e6);
    eprintln!("LAN: rtt {lan_rtt:.3} ms, {:.0} Mbit/s", lan / 1e6);

    // delay: the round trip is twice the one-way delay, ±10 % + 1 ms
    let band =
        |d: f64| move |v: &(f64, f64, usize)| (v.0 - 2.0 * d).abs() <= 0.2 * d + 1.0 && v.2 >= 28;
    let (_, sd0, _) = within(
        "dc1-dc2 rtt at 20 ms",
        || rtt_stats(&lab, "a", "b", 30, 20),
        band(20.0),
    )?;

    // changed at run time, nothing restarted; jitter shows as spread
    lab.set_link("dc1", "dc2", |s| {
        s.delay = Duration::from_millis(40);
        s.jitter = Duration::from_millis(5);
    })?;
    ensure!(
        delay_line_pid(&lab) == Some(dl),
        "link set restarted the delay line"
    );
    let (_, sd, _) = within(
        "dc1-dc2 rtt at 40 ms ± 5 ms",
        || rtt_stats(&lab, "a", "b", 40, 30),
        band(40.0),
    )?;
    // uniform ±5 ms each way: a round trip's deviation is about 4 ms
    ensure!(
        sd > 2.0 && sd > 2.0 * sd0,
        "jitter not visible: sd {sd:.2} ms (without jitter {sd0:.2} ms)"
    );

    // rate: one TCP flow within 15 % of the link's rate, at 200 and at 50 Mbit
    let (a, c) = (ns(&lab, "a")?, ns(&lab, "c")?);
    let c_ip = ip(&lab, "c")?;
    let rate_band = |r: f64| move |v: &f64| (v - r).abs() <= 0.15 * r;
    within(
        "dc1-dc3 at 200mbit",
        || Ok(iperf3(&lab, &c, &a, c_ip, 5, 2)?),
        rate_band(200e6),
    )?;
    lab.set_link("dc1", "dc3", |s| s.rate_bps = Some(50_000_000))?;
    within(
        "dc1-dc3 at 50mbit",
        || Ok(iperf3(&lab, &c, &a, c_ip, 5, 2)?),
        rate_band(50e6),
    )?;

    // loss: 1 % each way, within 4.5 binomial standard deviations over 5,000 datagrams
    let (b, b_ip) = (ns(&lab, "b")?, ip(&lab, "b")?);
    let n = 5000u32;
    let expect = f64::from(n) * 0.01;
    let tol = 4.5 * (f64::from(n) * 0.01 * 0.99).sqrt();
    for (from, to, to_ip, dir) in [(&b, &c, c_ip, "dc2->dc3"), (&c, &b, b_ip, "dc3->dc2")] {
        let got = udp_delivered(
            from,
            to,
            to_ip,
            n,
            Duration::from_micros(50),
            Duration::from_millis(500),
        )?;
        let lost = f64::from(n - got);
        eprintln!("{dir}: {lost} of {n} lost (expected {expect} ± {tol:.0})");
        ensure!(
            (lost - expect).abs() <= tol,
            "{dir}: {lost} of {n} lost, expected {expect} ± {tol:.0}"
        );
    }

    // cut: nothing passes either way, at once; other links unaffected; heal restores
    let a_ip = ip(&lab, "a")?;
    let t0 = Instant::now();
    lab.set_link("dc1", "dc2", |s| s.cut = true)?;
    let took = t0.elapsed();
    ensure!(took < Duration::from_secs(1), "link cut took {took:?}");
    let gap = Duration::from_millis(5);
    let linger = Duration::from_millis(300);
    let ab = udp_delivered(&a, &b, b_ip, 20, gap, linger)?;
    let ba = udp_delivered(&b, &a, a_ip, 20, gap, linger)?;
    ensure!(
        ab == 0 && ba == 0,
        "through a cut link: {ab} a->b, {ba} b->a"
    );
    ensure!(
        ping_rtts(&a, b_ip, 2, gap)?.is_empty(),
        "ping crossed a cut link"
    );
    ensure!(
        udp_delivered(&a, &c, c_ip, 20, gap, linger)? == 20,
        "cutting dc1-dc2 broke dc1-dc3"
    );
    lab.set_link("dc1", "dc2", |s| s.cut = false)?;
    let ab = udp_delivered(&a, &b, b_ip, 20, gap, linger)?;
    let ba = udp_delivered(&b, &a, a_ip, 20, gap, linger)?;
    ensure!(
        ab == 20 && ba == 20,
        "after heal: {ab} a->b, {ba} b->a of 20"
    );
    ensure!(
        delay_line_pid(&lab) == Some(dl),
        "the delay line was restarted"
    );

    // everything lived in the lab's namespaces and goes with it
    let name = lab.name().to_string();
    let dir = lab.dir();
    lab.down()?;
    assert_nothing_left(&name, &dir, dl, "the delay line")
}

/// No namespace of the lab `name`, no `dir`, process `pid` (`what`) gone, no lab interface in
/// the machine's namespace.
fn assert_nothing_left(
    name: &str,
    dir: &std::path::Path,
    pid: u32,
    what: &str,
) -> anyhow::Result<()> {
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()?
            .stdout,
    )?;
    let left: Vec<&str> = list
        .lines()
        .filter(|l| l.starts_with(&format!("{name}-")))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(geomx_lab::gone(pid), "{what} (pid {pid}) outlived its lab");
    ensure!(!dir.exists(), "{} left behind", dir.display());
    let root = String::from_utf8(
        std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()?
            .stdout,
    )?;
    ensure!(
        !root.contains("wan0") && !root.contains(" gw@"),
        "a lab interface leaked into the root namespace"
    );
    Ok(())
}

#[test]
fn a_geo_lab_dropped_by_a_failing_test_leaves_nothing() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let file = parse_topology(
        "small.toml",
        "[[dc]]\nname = \"x\"\nsubnet = \"10.8.0.0/24\"\nhosts = [\"p\"]\n\
         [[dc]]\nname = \"y\"\nsubnet = \"10.9.0.0/24\"\nhosts = [\"q\"]\n\
         [[link]]\ndcs = [\"x\", \"y\"]\ndelay = \"5ms\"\n",
    )?;
    let lab = Lab::up(LabSpec::for_test().docker(false).topology(file))?;
    let (name, dir) = (lab.name().to_string(), lab.dir());
    let pid = delay_line_pid(&lab).context("delay line")?;
    // routed across the WAN: 2 × 5 ms
    let rtts = ping_rtts(
        &ns(&lab, "p")?,
        ip(&lab, "q")?,
        3,
        Duration::from_millis(20),
    )?;
    ensure!(
        rtts.len() == 3 && rtts.iter().all(|r| *r >= 9.0),
        "rtts {rtts:?}"
    );
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _lab = lab;
        panic!("a test failing with its lab up");
    }));
    ensure!(r.is_err());
    assert_nothing_left(&name, &dir, pid, "the delay line")
}

#[test]
fn a_bad_topology_file_is_refused_at_its_line() -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[[dc]]\nname = \"dc1\"\nsubnet = \"10.1.1.0/24\"\nhosts = [\"a\"]\n\n[[link]]\ndcs = [\"dc1\", \"dc9\"]\n",
    )?;
    let out = std::process::Command::new(geomx_lab::lab_binary()?)
        .args(["--name", "nolab", "--root"])
        .arg(&dir)
        .args(["up", "--bare", "--topology"])
        .arg(&file)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "accepted a bad file");
    ensure!(
        err.contains(&format!(
            "{}:7:7: unknown data center \"dc9\" (the file has dc1)",
            file.display()
        )),
        "{err}"
    );
    ensure!(
        !dir.join("nolab").exists(),
        "a lab was started from a bad file"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("geomx-geo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// `geomx-lab down` of a lab made by `geomx-lab up` in a test, also when the test fails.
struct CliLab {
    name: String,
    done: bool,
}

impl CliLab {
    fn cmd(&self) -> anyhow::Result<std::process::Command> {
        let mut c = std::process::Command::new(geomx_lab::lab_binary()?);
        c.args(["--name", &self.name]);
        Ok(c)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cmd()?.args(args).output()?;
        ensure!(
            out.status.success(),
            "geomx-lab {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for CliLab {
    fn drop(&mut self) {
        if !self.done
            && let Ok(mut c) = self.cmd()
        {
            let _ = c.arg("down").output();
        }
    }
}

/// `docker --config <config> <args>` against `host`'s dockerd, with `stdin` fed to it.
fn docker_with(
    host: &geomx_lab::LabHost,
    config: &std::path::Path,
    args: &[&str],
    stdin: &str,
) -> anyhow::Result<std::process::Output> {
    use std::io::Write;
    let mut c = host.dockerd()?.cli();
    c.arg("--config").arg(config).args(args);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

#[test]
fn the_lab_registry_serves_other_data_centers_over_the_wan_with_tls_and_credentials()
-> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile_dir()?.join("registry");
    std::fs::create_dir_all(&dir)?;
    let topo = dir.join("reg.toml");
    std::fs::write(
        &topo,
        "[[dc]]\nname = \"x\"\nsubnet = \"10.8.0.0/24\"\nhosts = [\"p\"]\n\
         [[dc]]\nname = \"y\"\nsubnet = \"10.9.0.0/24\"\nhosts = [\"q\"]\n\
         [[dc]]\nname = \"z\"\nsubnet = \"10.10.0.0/24\"\nhosts = [\"r\"]\n\
         [[link]]\ndcs = [\"x\", \"y\"]\ndelay = \"5ms\"\n\
         [[link]]\ndcs = [\"y\", \"z\"]\ndelay = \"5ms\"\nrate = \"100mbit\"\n\
         [registry]\ndc = \"y\"\n",
    )?;
    let mut cli = CliLab {
        name: format!("gxreg{}", std::process::id()),
        done: false,
    };
    let topo_s = topo.display().to_string();
    cli.run(&[
        "up",
        "--bare",
        "--registry",
        "--no-mxnet",
        "--topology",
        &topo_s,
    ])?;
    let env: std::collections::BTreeMap<String, String> = cli
        .run(&["env"])?
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let var = |k: &str| {
        env.get(k)
            .cloned()
            .with_context(|| format!("env has no {k}"))
    };
    let (registry, user, password) = (
        var("GEOMX_LAB_REGISTRY")?,
        var("GEOMX_LAB_REGISTRY_USER")?,
        var("GEOMX_LAB_REGISTRY_PASSWORD")?,
    );
    ensure!(
        std::path::Path::new(&var("GEOMX_LAB_REGISTRY_CA")?).is_file(),
        "no CA file"
    );
    // in data center y, in a namespace of its own
    ensure!(registry == "10.9.0.253:5000", "registry at {registry}");
    let root = std::env::var_os("GEOMX_LAB_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| geomx_lab::DEFAULT_ROOT.into());
    let lab = Lab::attach(&root, &cli.name)?;
    let reg = lab
        .registry()
        .context("Lab::registry of the attached lab")?;
    ensure!(reg.host_port() == registry && reg.dc.as_deref() == Some("y"));
    let lab_dir = lab.dir();
    let registry_pid = lab_dir.join("registry").join("registry.pid");
    let registry_pid: u32 = std::fs::read_to_string(&registry_pid)?.trim().parse()?;
    ensure!(
        !geomx_lab::gone(registry_pid),
        "the registry is not running"
    );

    let image = format!("{registry}/geomx/test:latest");
    let mut digests = Vec::new();
    for host in ["p", "r"] {
        let h = lab.host(host)?;
        // across the WAN: through the router (the data center's gateway)
        let route = h.run(&["ip", "route", "get", "10.9.0.253"])?;
        ensure!(route.contains(" via "), "{host}: route {route}");
        ensure!(
            h.dockerd()?
                .docker(&["images", "-q", &image])?
                .trim()
                .is_empty(),
            "{host} has the image before pulling"
        );
        let config = dir.join(format!("client-{host}"));
        std::fs::create_dir_all(&config)?;
        // no credentials: refused by the registry's auth (TLS itself is trusted)
        let out = docker_with(h, &config, &["pull", &image], "")?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("no basic auth credentials"),
            "{host}: pull without credentials: {err}"
        );
        ensure!(
            !err.contains("x509") && !err.contains("certificate"),
            "{host}: {err}"
        );
        // a wrong password: refused at login
        let out = docker_with(
            h,
            &config,
            &["login", "-u", &user, "--password-stdin", &registry],
            "not-the-password",
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.to_lowercase().contains("401 unauthorized"),
            "{host}: login with a wrong password: {err}"
        );
        // the lab's credentials: pulled
        let out = docker_with(
            h,
            &config,
            &["login", "-u", &user, "--password-stdin", &registry],
            &password,
        )?;
        ensure!(
            out.status.success(),
            "{host}: login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = docker_with(h, &config, &["pull", &image], "")?;
        ensure!(
            out.status.success(),
            "{host}: pull: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest =
            h.dockerd()?
                .docker(&["image", "inspect", "-f", "{{index .RepoDigests 0}}", &image])?;
        ensure!(
            digest.starts_with(&format!("{registry}/geomx/test@sha256:")),
            "{host}: digest {digest}"
        );
        let hello = h
            .dockerd()?
            .docker(&["run", "--rm", &image, "echo", "hi"])?;
        ensure!(hello == "hi", "{host}: the pulled image ran: {hello:?}");
        digests.push(digest);
    }
    ensure!(digests[0] == digests[1], "two digests: {digests:?}");
    // the pushing host (q, beside the registry) kept no copy
    ensure!(
        lab.host("q")?
            .dockerd()?
            .docker(&["images", "-q", &image])?
            .is_empty(),
        "the pushing host kept the image"
    );

    drop(lab);
    cli.run(&["down"])?;
    cli.done = true;
    assert_nothing_left(&cli.name, &lab_dir, registry_pid, "the registry")?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
