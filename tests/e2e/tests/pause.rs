//! The pause image of network sandboxes against a real dockerd in the lab: imported once
//! (`docker import` through bollard) with its label and entrypoint, stops at once with exit
//! code 0 on SIGTERM, and holds the network namespace of a node whose role container joins
//! it; removing the node removes both containers.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use geomx_e2e::lab_tests_enabled;
use geomx_lab::{Dockerd, Lab, LabSpec, Rootfs};
use geomx_runtime::{BollardEngine, ContainerSpec, NodeState, Runtime, RuntimeConfig, pause};

const BUSYBOX: &str = "geomx-lab/busybox:pause-test";

#[test]
fn the_pause_image_is_imported_once_and_holds_a_sandbox() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    if pause::binary().is_none() {
        eprintln!("this build has no pause binary (no C compiler/static libc); skipping");
        return Ok(());
    }
    let lab = Lab::up(LabSpec::for_test().host("a", Ipv4Addr::new(10, 1, 1, 34)))?;
    let result = (|| {
        let d = lab.host("a")?.dockerd()?;
        Rootfs::new(&lab.dir().join("rootfs"))?
            .with_busybox()?
            .import(d, BUSYBOX, &["/bin/sh"])?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        tokio.block_on(scenario(d))
    })();
    if result.is_err() {
        lab.dump_logs(30);
    }
    lab.down()?;
    result
}

fn inspect(d: &Dockerd, what: &str, format: &str) -> anyhow::Result<String> {
    Ok(d.docker(&["inspect", "-f", format, what])?
        .trim()
        .to_string())
}

async fn scenario(d: &Dockerd) -> anyhow::Result<()> {
    let engine = BollardEngine::connect_unix(&d.socket()).await?;

    // imported once, labelled, with /pause as entrypoint
    let tag = pause::ensure_image(&engine).await?;
    ensure!(tag == pause::image_tag(), "{tag}");
    let id = inspect(d, &tag, "{{.Id}}")?;
    ensure!(
        inspect(d, &tag, "{{index .Config.Labels \"io.geomx.image\"}}")? == "pause",
        "the image is not labelled"
    );
    // containers inherit image labels: the ownership label would make the agent remove
    // anybody's container of this image as one of its own
    let managed = inspect(d, &tag, "{{index .Config.Labels \"io.geomx.managed\"}}")?;
    ensure!(
        managed.is_empty() || managed == "<no value>",
        "the image carries the ownership label: {managed:?}"
    );
    ensure!(
        inspect(d, &tag, "{{json .Config.Entrypoint}}")? == "[\"/pause\"]",
        "entrypoint: {}",
        inspect(d, &tag, "{{json .Config.Entrypoint}}")?
    );
    let size: u64 = inspect(d, &tag, "{{.Size}}")?.parse()?;
    ensure!(size < 4 << 20, "the pause image has {size} bytes");
    ensure!(pause::ensure_image(&engine).await? == tag);
    ensure!(inspect(d, &tag, "{{.Id}}")? == id, "imported again");
    let listed = d.docker(&["images", "-q", "geomx/pause"])?;
    ensure!(listed.lines().count() == 1, "images: {listed}");

    // a container of it ends at once on SIGTERM, with exit code 0
    d.docker(&["run", "-d", "--name", "pause-alone", &tag])?;
    let t = Instant::now();
    d.docker(&["stop", "-t", "10", "pause-alone"])?;
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "docker stop took {:?}: SIGTERM ignored",
        t.elapsed()
    );
    ensure!(inspect(d, "pause-alone", "{{.State.ExitCode}}")? == "0");
    d.docker(&["rm", "pause-alone"])?;
    // somebody else's container of the pause image: not geomx's, so never removed
    d.docker(&["run", "-d", "--name", "pause-foreign", &tag])?;

    // a node's sandbox runs it; the role container joins the sandbox's network
    let config = RuntimeConfig {
        sandbox: pause::sandbox_config(tag.clone()),
        stop_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let rt = Runtime::start(engine, config).await?;
    let spec = ContainerSpec {
        job: "pz".into(),
        node: "n0".into(),
        role: "worker".into(),
        party: "a".into(),
        image: BUSYBOX.into(),
        command: vec!["sh".into(), "-c".into(), "echo up; sleep 600".into()],
        env: BTreeMap::new(),
        controller_id: "e2e".into(),
        start: true,
        sandbox: true,
        ..Default::default()
    };
    let report = rt.apply(vec![spec]).await?;
    ensure!(report.errors().next().is_none(), "{report:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = rt.status("pz", "n0").context("node tracked")?;
        if s.state == NodeState::Running && !s.ip.is_empty() {
            break s;
        }
        ensure!(Instant::now() < deadline, "node not running: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sandbox = "geomx-net.pz.n0";
    ensure!(inspect(d, sandbox, "{{.Config.Image}}")? == tag);
    ensure!(inspect(d, sandbox, "{{.State.Status}}")? == "running");
    let sandbox_id = inspect(d, sandbox, "{{.Id}}")?;
    ensure!(
        inspect(d, "geomx.pz.n0", "{{.HostConfig.NetworkMode}}")?
            == format!("container:{sandbox_id}")
    );
    ensure!(
        inspect(d, sandbox, "{{.NetworkSettings.IPAddress}}")? == status.ip,
        "node ip {} is not the sandbox's",
        status.ip
    );
    let env = inspect(d, "geomx.pz.n0", "{{json .Config.Env}}")?;
    ensure!(env.contains("PYTHONUNBUFFERED=1"), "{env}");

    // the node withdrawn: both containers go, quickly (pause ends on SIGTERM)
    let t = Instant::now();
    let report = rt.apply(Vec::new()).await?;
    ensure!(report.errors().next().is_none(), "{report:?}");
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "removal took {:?}",
        t.elapsed()
    );
    let left = d.docker(&["ps", "-aq", "--filter", "label=io.geomx.job=pz"])?;
    ensure!(left.trim().is_empty(), "left behind: {left}");
    ensure!(
        inspect(d, "pause-foreign", "{{.State.Status}}")? == "running",
        "the agent's runtime touched a container it does not own"
    );
    d.docker(&["rm", "-f", "pause-foreign"])?;
    rt.shutdown();
    Ok(())
}
