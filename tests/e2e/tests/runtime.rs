//! geomx-runtime against a real dockerd in the lab, with the psnode test image: a ps-mode
//! topology on docker0 registers and trains, progress is parsed, a crashing worker reports
//! its exit code and log tail, nodes report over HTTP, a new runtime adopts the running
//! containers without restarting them, and containers no longer desired are removed.
//!
//! Needs the binaries: `cargo build --workspace --bins` first.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use geomx_e2e::lab_tests_enabled;
use geomx_lab::{
    Dockerd, Lab, LabHost, LabSpec, PSNODE_IMAGE, build_psnode_image, find_psnode_binary,
};
use geomx_runtime::{
    CancellationToken, ContainerSpec, HeartbeatServer, NodeState, Runtime, RuntimeConfig, Snapshot,
    agent_url,
};
use tokio::sync::watch;

const JOB: &str = "ps1";
/// The runtime's periodic resync in this test: see the crash check.
const RESYNC: Duration = Duration::from_secs(30);

fn spec(node: &str, role: &str, command: &[&str], env: &[(&str, String)]) -> ContainerSpec {
    ContainerSpec {
        job: JOB.into(),
        node: node.into(),
        role: role.into(),
        party: "a".into(),
        image: PSNODE_IMAGE.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        controller_id: "e2e".into(),
        start: true,
        sandbox: true,
        ..Default::default()
    }
}

/// The ps-mode job: a scheduler, a server and three workers (worker-1 also reports over
/// HTTP, worker-2 crashes after 3 iterations). `sched_ip` is the scheduler's address (its
/// sandbox's), `None` before it is known: then nothing starts, only sandboxes exist.
fn cluster(sched_ip: Option<&str>) -> Vec<ContainerSpec> {
    let local = |role: &str| {
        vec![
            ("DMLC_ROLE", role.to_string()),
            ("DMLC_PS_ROOT_URI", sched_ip.unwrap_or("").to_string()),
            ("DMLC_PS_ROOT_PORT", "9093".to_string()),
            ("DMLC_NUM_SERVER", "1".to_string()),
            ("DMLC_NUM_WORKER", "3".to_string()),
            ("PS_VERBOSE", "1".to_string()),
            ("DMLC_INTERFACE", "eth0".to_string()),
        ]
    };
    let worker = |i: usize, extra: &[(&str, &str)]| {
        let mut env = local("worker");
        env.push(("PSNODE_INTERVAL", "150ms".into()));
        env.push(("PSNODE_ITERATIONS", "12".into()));
        env.push(("PSNODE_ITERS_PER_EPOCH", "4".into()));
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let slice = i.to_string();
        spec(
            &format!("worker-{i}"),
            "worker",
            &[
                "python",
                "/root/GeoMX/examples/cnn.py",
                "--data-slice-idx",
                &slice,
                "--cpu",
            ],
            &env,
        )
    };
    let mut nodes = vec![
        spec(
            "scheduler",
            "scheduler",
            &["python", "-c", "import mxnet"],
            &local("scheduler"),
        ),
        spec(
            "server",
            "server",
            &["python", "-c", "import mxnet"],
            &local("server"),
        ),
        worker(0, &[]),
        worker(1, &[("PSNODE_HTTP_HEARTBEAT", "1")]),
        worker(2, &[("PSNODE_CRASH_AFTER", "3")]),
    ];
    for n in &mut nodes {
        n.start = sched_ip.is_some();
    }
    nodes
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&Snapshot) -> bool,
) -> anyhow::Result<Snapshot> {
    let r = tokio::time::timeout(timeout, async {
        loop {
            {
                let s = rx.borrow_and_update().clone();
                if f(&s) {
                    return Ok(s);
                }
            }
            if rx.changed().await.is_err() {
                bail!("runtime gone");
            }
        }
    })
    .await;
    match r {
        Ok(r) => r,
        Err(_) => bail!(
            "timed out after {timeout:?} waiting for {what}; last snapshot: {:#?}",
            rx.borrow().nodes
        ),
    }
}

async fn log_lines<E: geomx_runtime::Engine>(
    rt: &Runtime<E>,
    node: &str,
) -> anyhow::Result<Vec<String>> {
    let mut s = rt.logs(JOB, node, false, 0).await?;
    let mut lines = Vec::new();
    while let Some(c) = s.next().await {
        lines.extend(c?.lines);
    }
    Ok(lines)
}

fn docker0_gateway(host: &LabHost) -> anyhow::Result<Ipv4Addr> {
    let out = host.run(&["ip", "-4", "-o", "addr", "show", "docker0"])?;
    let cidr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .context("docker0 has no IPv4 address")?;
    Ok(cidr.split('/').next().unwrap_or_default().parse()?)
}

/// One HTTP request from inside the host's namespace; returns (status, body).
fn http_post(
    host: &LabHost,
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = host.netns().connect_tcp(addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    let body = resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((status, body))
}

fn inspect(d: &Dockerd, name: &str, format: &str) -> anyhow::Result<String> {
    Ok(d.docker(&["inspect", "-f", format, name])?)
}

#[test]
fn runtime_runs_adopts_and_removes_role_containers() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let started = Instant::now();
    let psnode = find_psnode_binary()?;
    let lab = Lab::up(LabSpec::for_test().host("a", Ipv4Addr::new(10, 1, 1, 34)))?;
    let a = lab.host("a")?;
    let d = a.dockerd()?;
    build_psnode_image(d, &psnode, PSNODE_IMAGE, &lab.dir().join("psnode-rootfs"))?;
    eprintln!(
        "lab and image ready after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let gw = docker0_gateway(a)?;
    let listener = a.netns().listen_tcp(SocketAddr::new(gw.into(), 0))?;
    let hb_addr = listener.local_addr()?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = tokio.block_on(scenario(a, d, listener, hb_addr));
    if result.is_err() {
        lab.dump_logs(30);
    }
    drop(tokio);
    lab.down()?;
    eprintln!("done after {:.1}s", started.elapsed().as_secs_f64());
    result
}

async fn scenario(
    a: &LabHost,
    d: &Dockerd,
    listener: std::net::TcpListener,
    hb_addr: SocketAddr,
) -> anyhow::Result<()> {
    let config = RuntimeConfig {
        agent_url: agent_url(hb_addr.ip(), hb_addr.port()),
        host_ip: Some(a.underlay_ip),
        stop_timeout: Duration::from_secs(2),
        // long enough that whatever the runtime publishes within a few seconds came from
        // Docker's event stream, not from a resync that happened to look
        resync_interval: RESYNC,
        ..Default::default()
    };
    let rt = Runtime::connect_unix(&d.socket(), config.clone()).await?;
    let server = HeartbeatServer::from_std(listener)?;
    let stop_hb = CancellationToken::new();
    let hb = tokio::spawn(server.serve(rt.clone(), stop_hb.clone()));
    let mut rx = rt.subscribe();

    // --- a missing image is refused clearly, nothing is created
    let mut ghost = cluster(None).remove(0);
    ghost.job = "ghost".into();
    ghost.image = "geomx-test/absent:1".into();
    let report = rt.apply(vec![ghost]).await?;
    let err = report
        .errors()
        .next()
        .and_then(|o| o.error.clone())
        .context("missing image must fail")?;
    ensure!(
        err.contains("geomx-test/absent:1") && err.contains("not present"),
        "{err}"
    );
    let st = rt.status("ghost", "scheduler").context("ghost status")?;
    ensure!(
        st.state == NodeState::Failed && st.error.contains("not present"),
        "{st:?}"
    );
    ensure!(
        d.containers()?.is_empty(),
        "a container was created for a missing image"
    );
    ensure!(rt.images().await?.contains(&PSNODE_IMAGE.to_string()));

    // --- network "pseudo": host networking and 127.0.0.1; reported with the host's address
    let pseudo = |node: &str, role: &str, extra: &[(&str, &str)]| {
        let mut env = vec![
            ("DMLC_ROLE", role.to_string()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            ("DMLC_PS_ROOT_PORT", "19093".to_string()),
            ("DMLC_NUM_SERVER", "0".to_string()),
            ("DMLC_NUM_WORKER", "1".to_string()),
            ("DMLC_INTERFACE", "eth0".to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let mut s = spec(node, role, &["python", "-c", "import mxnet"], &env);
        s.job = "pseudo".into();
        s.host_network = true;
        s
    };
    let pseudo_job = vec![
        pseudo("scheduler", "scheduler", &[]),
        pseudo(
            "worker-0",
            "worker",
            &[("PSNODE_INTERVAL", "50ms"), ("PSNODE_ITERATIONS", "3")],
        ),
    ];
    let report = rt.apply(pseudo_job).await?;
    ensure!(report.errors().next().is_none(), "{report:?}");
    let snap = wait_for(
        &mut rx,
        "pseudo worker done",
        Duration::from_secs(20),
        |s| {
            s.node("pseudo", "worker-0")
                .is_some_and(|n| n.state.is_terminal())
        },
    )
    .await?;
    let w = snap.node("pseudo", "worker-0").context("pseudo worker")?;
    ensure!(
        w.exit_code == Some(0) && w.ip == a.underlay_ip.to_string(),
        "{w:#?}"
    );
    let s = snap
        .node("pseudo", "scheduler")
        .context("pseudo scheduler")?;
    // the stand-in scheduler finalizes like ps-lite's once every worker said goodbye: it may
    // still be running or already have exited 0
    ensure!(
        (s.state == NodeState::Running || (s.state == NodeState::Exited && s.exit_code == Some(0)))
            && s.ip == a.underlay_ip.to_string(),
        "{s:#?}"
    );
    let mut lines = Vec::new();
    let mut chunks = rt.logs("pseudo", "scheduler", false, 0).await?;
    while let Some(c) = chunks.next().await {
        lines.extend(c?.lines);
    }
    ensure!(
        lines.iter().any(
            |l| l.contains("127.0.0.1:19093 complete: servers=0 workers=1")
                && l.contains(&a.underlay_ip.to_string())
        ),
        "{lines:#?}"
    );
    let report = rt.apply(vec![]).await?;
    ensure!(report.changes().count() == 2, "two removed: {report:?}");
    ensure!(d.containers()?.is_empty());

    // --- every node gets its network sandbox first; the scheduler's address then goes
    // into everybody's DMLC_PS_ROOT_URI, its own included (it binds exactly that address)
    let report = rt.apply(cluster(None)).await?;
    ensure!(report.errors().next().is_none(), "{report:?}");
    ensure!(report.changes().count() == 5, "five sandboxes: {report:?}");
    let snap = wait_for(&mut rx, "sandbox addresses", Duration::from_secs(20), |s| {
        s.nodes.iter().filter(|n| n.job == JOB).count() == 5
            && s.nodes
                .iter()
                .filter(|n| n.job == JOB)
                .all(|n| n.state == NodeState::Pending && !n.ip.is_empty())
    })
    .await?;
    ensure!(
        d.containers()?.len() == 5,
        "only the sandboxes exist before the start"
    );
    let sched_ip = snap
        .node(JOB, "scheduler")
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    ensure!(sched_ip.starts_with("172."), "scheduler ip {sched_ip}");
    let sandbox_id = inspect(d, &format!("geomx-net.{JOB}.scheduler"), "{{.Id}}")?;

    let desired = cluster(Some(&sched_ip));
    let t0 = Instant::now();
    let report = rt.apply(desired.clone()).await?;
    ensure!(report.errors().next().is_none(), "{report:?}");
    ensure!(
        report.changes().count() == 5,
        "five role containers, sandboxes kept: {report:?}"
    );
    ensure!(
        inspect(d, &format!("geomx-net.{JOB}.scheduler"), "{{.Id}}")? == sandbox_id,
        "the sandbox was replaced"
    );
    ensure!(
        inspect(
            d,
            &format!("geomx.{JOB}.scheduler"),
            "{{.HostConfig.NetworkMode}}"
        )? == format!("container:{sandbox_id}")
    );

    // --- progress rises while the workers train; worker-2 crashes
    let mut seen: Vec<(u64, f64)> = Vec::new();
    let mut crash_noticed_ms = None;
    let snap = wait_for(&mut rx, "workers ended", Duration::from_secs(40), |s| {
        if crash_noticed_ms.is_none()
            && let Some(n) = s.node(JOB, "worker-2")
            && n.state.is_terminal()
        {
            crash_noticed_ms = Some(now_ms() - n.finished_at_ms);
        }
        if let Some(p) = s.node(JOB, "worker-0").and_then(|n| n.progress.as_ref())
            && seen.last().map(|l| l.0) != Some(p.iteration)
        {
            seen.push((p.iteration, p.accuracy.unwrap_or(0.0)));
        }
        ["worker-0", "worker-1", "worker-2"]
            .iter()
            .all(|w| s.node(JOB, w).is_some_and(|n| n.state.is_terminal()))
    })
    .await?;
    eprintln!(
        "workers ended {:.1}s after their start; worker-0 progress seen: {seen:?}",
        t0.elapsed().as_secs_f64()
    );
    let crash_noticed_ms = crash_noticed_ms.context("crash not seen")?;
    eprintln!("the crash was published {crash_noticed_ms} ms after the container ended");
    // how fast is geomx-bench's (detection); here only that the event stream told, long
    // before the resync could have
    ensure!(
        crash_noticed_ms < RESYNC.as_millis() as i64 / 3,
        "the crash was published {crash_noticed_ms} ms after the container ended: not from Docker's \
         event stream (the resync runs every {RESYNC:?})"
    );
    ensure!(seen.len() >= 3, "too few progress updates: {seen:?}");
    ensure!(
        seen.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1),
        "progress must rise: {seen:?}"
    );
    for w in ["worker-0", "worker-1"] {
        let n = snap.node(JOB, w).context("worker")?;
        ensure!(
            n.state == NodeState::Exited && n.exit_code == Some(0),
            "{n:#?}"
        );
        let p = n.progress.as_ref().context("progress")?;
        ensure!(p.iteration == 12 && p.epoch == 2, "{p:?}");
        ensure!(p.accuracy.is_some_and(|a| a > 0.8), "{p:?}");
        ensure!(
            n.finished_at_ms >= n.started_at_ms && n.started_at_ms > 0,
            "{n:?}"
        );
        ensure!(
            n.log_tail.iter().any(|l| l.contains("training done")),
            "{n:?}"
        );
    }
    // worker-1 also reported over HTTP: only the heartbeat carries "loss"
    let p1 = snap
        .node(JOB, "worker-1")
        .and_then(|n| n.progress.clone())
        .context("p1")?;
    ensure!(
        p1.metrics.contains_key("loss"),
        "no HTTP heartbeat merged: {p1:?}"
    );
    let crashed = snap.node(JOB, "worker-2").context("worker-2")?;
    ensure!(
        crashed.state == NodeState::Failed && crashed.exit_code == Some(3),
        "{crashed:#?}"
    );
    ensure!(
        crashed
            .log_tail
            .iter()
            .any(|l| l.contains("simulated crash")),
        "{:?}",
        crashed.log_tail
    );
    ensure!(crashed.progress.as_ref().is_some_and(|p| p.iteration == 3));

    // the scheduler saw exactly the expected registrations, over routed docker0 addresses
    let lines = log_lines(&rt, "scheduler").await?;
    let complete = lines
        .iter()
        .find(|l| l.contains("complete: servers=1 workers=3"))
        .with_context(|| format!("no registration line in {lines:#?}"))?;
    ensure!(
        complete.contains(&format!("scheduler {sched_ip}:9093")),
        "{complete}"
    );
    let server_lines = log_lines(&rt, "server").await?;
    ensure!(
        server_lines
            .iter()
            .filter(|l| l.contains("connected"))
            .count()
            >= 3,
        "{server_lines:#?}"
    );
    let w0 = log_lines(&rt, "worker-0").await?;
    ensure!(w0.iter().any(|l| l == "psnode: data slice 0"), "{w0:#?}");
    let mut tail = rt.logs(JOB, "worker-0", false, 2).await?;
    let mut last = Vec::new();
    while let Some(c) = tail.next().await {
        last.extend(c?.lines);
    }
    ensure!(last.len() == 2, "tail 2: {last:?}");

    // names, labels and env
    let name = format!("geomx.{JOB}.worker-0");
    let labels = inspect(d, &name, "{{json .Config.Labels}}")?;
    for want in [
        "\"io.geomx.managed\":\"true\"",
        "\"io.geomx.job\":\"ps1\"",
        "\"io.geomx.node\":\"worker-0\"",
        "\"io.geomx.role\":\"worker\"",
        "\"io.geomx.party\":\"a\"",
        "\"io.geomx.controller\":\"e2e\"",
        "\"io.geomx.generation\":\"0\"",
        "\"io.geomx.spec\":",
    ] {
        ensure!(labels.contains(want), "{want} not in {labels}");
    }
    let env = inspect(d, &name, "{{json .Config.Env}}")?;
    for want in [
        "GEOMX_JOB=ps1",
        "GEOMX_NODE=worker-0",
        &format!("GEOMX_AGENT_URL={}", config.agent_url),
    ] {
        ensure!(env.contains(want), "{want} not in {env}");
    }
    ensure!(inspect(d, &name, "{{.HostConfig.RestartPolicy.Name}}")? == "no");

    // --- the heartbeat endpoint, called from the host's namespace: a forged report for a
    // node on docker0 is refused (only the node's own container speaks for it; worker-1's
    // own reports above were taken) and changes nothing
    let before_forgery = rt.status(JOB, "server").and_then(|s| s.progress);
    let (status, body) = http_post(
        a,
        hb_addr,
        "/v1/heartbeat",
        r#"{"job": "ps1", "node": "server", "step": 7, "epoch": 1, "metrics": {"accuracy": 0.5}}"#,
    )?;
    ensure!(
        status == 403 && body.contains("reports from its own container's address"),
        "{status} {body}"
    );
    ensure!(
        rt.status(JOB, "server").and_then(|s| s.progress) == before_forgery,
        "a forged heartbeat changed the server's progress"
    );
    let (status, body) = http_post(a, hb_addr, "/v1/heartbeat", "{\"step\": ")?;
    ensure!(status == 400 && body.contains("error"), "{status} {body}");
    let (status, _) = http_post(
        a,
        hb_addr,
        "/v1/heartbeat",
        r#"{"job": "ps1", "node": "nope", "step": 1}"#,
    )?;
    ensure!(status == 404, "{status}");

    // --- agent restart: a new runtime adopts; the same desired state changes nothing
    let before = rt.snapshot();
    let docker_started = inspect(d, &format!("geomx.{JOB}.server"), "{{.State.StartedAt}}")?;
    stop_hb.cancel();
    hb.await??;
    rt.shutdown();
    drop(rt);
    let rt = Runtime::connect_unix(&d.socket(), config.clone()).await?;
    let mut rx = rt.subscribe();
    let snap = wait_for(&mut rx, "adopted", Duration::from_secs(10), |s| {
        s.nodes.len() == before.nodes.len()
            && s.node(JOB, "worker-0")
                .and_then(|n| n.progress.as_ref())
                .is_some_and(|p| p.iteration == 12)
            && s.node(JOB, "worker-2")
                .is_some_and(|n| !n.log_tail.is_empty())
    })
    .await?;
    for b in &before.nodes {
        let n = snap.node(&b.job, &b.node).context("adopted node")?;
        ensure!(
            n.container_id == b.container_id
                && n.started_at_ms == b.started_at_ms
                && n.state == b.state
                && n.exit_code == b.exit_code
                && n.log_tail == b.log_tail
                // Docker forgets an ended container's address
                && (n.ip == b.ip || b.state.is_terminal()),
            "adoption changed {}: {b:#?} -> {n:#?}",
            b.node
        );
    }
    let report = rt.apply(desired.clone()).await?;
    ensure!(
        report.is_no_op(),
        "re-applying after a restart changed things: {report:?}"
    );
    ensure!(
        inspect(d, &format!("geomx.{JOB}.server"), "{{.State.StartedAt}}")? == docker_started,
        "the server was restarted"
    );
    ensure!(inspect(d, &format!("geomx.{JOB}.server"), "{{.RestartCount}}")? == "0");

    // --- containers no longer desired go; the rest stays
    let keep: Vec<ContainerSpec> = desired
        .iter()
        .filter(|s| s.node == "scheduler" || s.node == "server")
        .cloned()
        .collect();
    let report = rt.apply(keep.clone()).await?;
    ensure!(report.changes().count() == 6, "{report:?}");
    ensure!(
        d.containers()?.len() == 4,
        "three workers and their sandboxes should be gone"
    );
    let t_cancel = Instant::now();
    let report = rt.apply(vec![]).await?;
    ensure!(report.changes().count() == 4, "{report:?}");
    ensure!(
        d.containers()?.is_empty(),
        "containers left: {:?}",
        d.containers()?
    );
    eprintln!(
        "removed running scheduler and server in {:.2}s",
        t_cancel.elapsed().as_secs_f64()
    );
    wait_for(&mut rx, "empty snapshot", Duration::from_secs(5), |s| {
        s.nodes.is_empty()
    })
    .await?;
    rt.shutdown();
    Ok(())
}
