//! The daemon against a real controller in-process (TLS, a fresh PKI), with the network
//! and Docker faked (`geomx_net::fake::FakeKernel`, [`geomx_runtime::fake::FakeEngine`]):
//! registration, desired state, reports, crash reporting latency, logs over the agent API,
//! controller restarts and loss, static stability, Docker down at start.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use geomx_controller::workloads::{WorkloadError, Workloads};
use geomx_controller::{ControllerConfig, RunningController};
use geomx_net::fake::FakeKernel;
use geomx_net::{NetConfig, Reconciler};
use geomx_proto::pki::{LabPki, make_lab_pki};
use geomx_proto::tls::TlsFiles;
use geomx_proto::v1::agent_node_service_client::AgentNodeServiceClient;
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_proto::v1::{
    ContainerSpec, ContainerState, DesiredState, HostReport, NodeLogsRequest, Peer, RegisterRequest,
};
use tempfile::TempDir;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use geomx_runtime::fake::FakeEngine;
use geomx_runtime::{RuntimeError, SandboxConfig};

use super::docker::EngineSource;
use super::state::StateFile;
use super::{Running, Settings, agent_version, start};

const IMAGE: &str = "geomx-test/psnode:latest";
const HEARTBEAT: Duration = Duration::from_millis(200);

/// A stand-in for the jobs layer: fixed containers per host, every report recorded.
#[derive(Default)]
struct TestWorkloads {
    containers: Mutex<HashMap<String, Vec<ContainerSpec>>>,
    reports: Mutex<Vec<(Instant, String, HostReport)>>,
}

#[tonic::async_trait]
impl Workloads for TestWorkloads {
    fn containers_for(&self, host: &str) -> Vec<ContainerSpec> {
        self.containers
            .lock()
            .map(|c| c.get(host).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    async fn host_reported(&self, host: &str, report: &HostReport) -> Result<(), WorkloadError> {
        if let Ok(mut r) = self.reports.lock() {
            r.push((Instant::now(), host.to_owned(), report.clone()));
        }
        Ok(())
    }
}

impl TestWorkloads {
    fn reports_of(&self, host: &str) -> Vec<(Instant, HostReport)> {
        self.reports
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(_, h, _)| h == host)
                    .map(|(t, _, rep)| (*t, rep.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn last_report(&self, host: &str) -> Option<HostReport> {
        self.reports_of(host).pop().map(|(_, r)| r)
    }
}

struct Lab {
    dir: TempDir,
    pki: LabPki,
    state_dir: PathBuf,
    port: u16,
    controller: Option<RunningController>,
    workloads: Arc<TestWorkloads>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn worker(job: &str, node: &str) -> ContainerSpec {
    ContainerSpec {
        job: job.into(),
        node: node.into(),
        role: "worker".into(),
        party: "a".into(),
        image: IMAGE.into(),
        command: vec!["python".into(), "cnn.py".into()],
        env: [("DMLC_ROLE".to_string(), "worker".to_string())].into(),
        start: true,
        sandbox: true,
        ..Default::default()
    }
}

impl Lab {
    async fn start() -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let agents: Vec<(String, IpAddr)> = vec![
            ("a".into(), "127.0.0.1".parse().expect("ip")),
            ("b".into(), "10.1.1.29".parse().expect("ip")),
        ];
        let pki =
            make_lab_pki(&dir.path().join("pki"), &["127.0.0.1".to_owned()], &agents).expect("pki");
        let state_dir = dir.path().join("controller");
        let mut lab = Lab {
            dir,
            pki,
            state_dir,
            port: free_port(),
            controller: None,
            workloads: Arc::new(TestWorkloads::default()),
        };
        lab.boot().await;
        lab
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    async fn boot(&mut self) {
        let tls = TlsFiles {
            ca: self.pki.ca.clone(),
            cert: self.pki.controller_cert.clone(),
            key: self.pki.controller_key.clone(),
        };
        let mut config = ControllerConfig::new(&self.state_dir, Some(tls));
        config.listen = SocketAddr::from(([127, 0, 0, 1], self.port));
        config.heartbeat_interval = HEARTBEAT;
        config.grace_period = Duration::from_millis(1500);
        config.shutdown_timeout = Duration::from_secs(2);
        let w = self.workloads.clone();
        let mut last = None;
        // the port of the previous run may take a moment to be free again
        for _ in 0..50 {
            let w = w.clone();
            match geomx_controller::start_with_workloads(config.clone(), move |_| {
                Some(w as Arc<dyn Workloads>)
            })
            .await
            {
                Ok(c) => {
                    self.controller = Some(c);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("controller does not start: {last:?}");
    }

    async fn stop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await.expect("clean shutdown");
        }
    }

    fn controller(&self) -> &RunningController {
        self.controller.as_ref().expect("running")
    }

    async fn publish(&self) {
        self.controller()
            .membership()
            .publish()
            .await
            .expect("publish");
    }

    fn agent_files(&self, host: &str) -> TlsFiles {
        let (_, cert, key) = self
            .pki
            .agents
            .iter()
            .find(|(h, _, _)| h == host)
            .expect("agent");
        TlsFiles {
            ca: self.pki.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }
    }

    fn controller_tls(&self) -> ClientTlsConfig {
        TlsFiles {
            ca: self.pki.ca.clone(),
            cert: self.pki.controller_cert.clone(),
            key: self.pki.controller_key.clone(),
        }
        .load()
        .expect("controller tls")
        .client_config()
    }

    /// Registers host b by hand and keeps it heartbeating (a peer for host a).
    async fn peer_b(&self) -> tokio::task::JoinHandle<()> {
        let tls = self.agent_files("b").load().expect("b tls").client_config();
        let channel = Endpoint::from_shared(self.url())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect_lazy();
        let mut client = AgentServiceClient::new(channel);
        client
            .register(RegisterRequest {
                host: "b".into(),
                underlay_ip: "10.1.1.29".into(),
                agent_version: "test".into(),
                ..Default::default()
            })
            .await
            .expect("b registers");
        tokio::spawn(async move {
            loop {
                let _ = client
                    .report(HostReport {
                        host: "b".into(),
                        agent_version: "test".into(),
                        ..Default::default()
                    })
                    .await;
                tokio::time::sleep(HEARTBEAT).await;
            }
        })
    }

    fn settings(&self, state_dir: PathBuf, api_port: u16) -> Settings {
        Settings {
            host: "a".into(),
            controller: self.url(),
            tls: Some(self.agent_files("a").load().expect("a tls")),
            underlay_ip: Some("127.0.0.1".parse().expect("ip")),
            pinned_subnet: None,
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], api_port))),
            heartbeat_port: None,
            state_dir,
            network_interval: Duration::from_millis(100),
            logs_retention: geomx_runtime::archive::DEFAULT_RETENTION,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(300),
            agent_version: agent_version(),
            wireguard: None,
            pulls: Default::default(),
            metrics_listen: None,
        }
    }
}

fn agent(
    settings: Settings,
    fake: &FakeKernel,
    engine: &FakeEngine,
    persisted: Option<DesiredState>,
) -> Running<FakeEngine> {
    let kernel = fake.kernel();
    let mut net = NetConfig::new(&settings.host);
    net.interval = settings.network_interval;
    let reconciler = Reconciler::new(net, kernel);
    let channel = super::controller::channel(&settings).expect("channel");
    start(
        settings,
        reconciler,
        FakeSource(engine.clone()),
        AgentServiceClient::new(channel),
        persisted,
    )
}

async fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Scrapes the running agent's `/metrics` (after the test's first container started and
/// exited with code 3) and checks that the daemon's code paths moved the counters.
async fn check_metrics(running: &Running<FakeEngine>) {
    use super::metrics::tests::{counter, http, parse};
    let addr = eventually("/metrics bound", Duration::from_secs(5), || {
        *running.ctx.metrics_addr.borrow()
    })
    .await;
    let scrape = |text: String| parse(&text);
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let (status, body) = http(addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let s = scrape(body);
        // (the exit is counted when the runtime sees it, which the report above shows)
        if counter(
            &s,
            "geomx_agent_container_exits_total",
            &[("outcome", "failure")],
        ) >= 1.0
        {
            break s;
        }
        assert!(Instant::now() < deadline, "the failed exit is not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(counter(&s, "geomx_agent_container_starts_total", &[]) >= 1.0);
    assert_eq!(
        counter(
            &s,
            "geomx_agent_container_exits_total",
            &[("outcome", "success")]
        ),
        0.0
    );
    assert!(counter(&s, "geomx_agent_network_passes_total", &[("result", "ok")]) >= 1.0);
    assert!(
        counter(
            &s,
            "geomx_agent_network_changes_total",
            &[("kind", "route_added")]
        ) >= 1.0,
        "the route to b was added"
    );
    let changes: f64 = s
        .samples
        .iter()
        .filter(|x| x.metric == "geomx_agent_network_changes_total")
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(changes > 1.0, "{changes}");
    let refused = |s: &prometheus_parse::Scrape| {
        counter(
            s,
            "geomx_agent_heartbeats_refused_total",
            &[("reason", "unknown_node")],
        )
    };
    let before = refused(&s);
    let rt = running
        .ctx
        .runtime
        .borrow()
        .clone()
        .expect("the runtime runs");
    let report = geomx_runtime::heartbeat::parse_report(
        br#"{"job": "job1", "node": "no-such-node", "step": 1}"#,
    )
    .expect("a heartbeat");
    let e = rt
        .record_heartbeat(&report, "172.17.0.9".parse().expect("ip"), None)
        .expect_err("refused");
    assert_eq!(e.refusal(), geomx_runtime::Refusal::UnknownNode);
    let (_, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(refused(&parse(&body)), before + 1.0, "{body}");
}

fn node_state(r: &HostReport, node: &str) -> Option<(ContainerState, Option<i32>)> {
    r.nodes
        .iter()
        .find(|n| n.node == node)
        .map(|n| (n.state(), n.exit_code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registers_applies_reports_survives_controller_restarts_and_loss() {
    let mut lab = Lab::start().await;
    let _b = lab.peer_b().await;
    lab.workloads
        .containers
        .lock()
        .expect("lock")
        .insert("a".into(), vec![worker("job1", "a-worker-0")]);

    let agent_state = lab.dir.path().join("agent-a");
    let api_port = free_port();
    let fake = FakeKernel::new();
    let engine = FakeEngine::new(&[IMAGE]);
    let mut settings = lab.settings(agent_state.clone(), api_port);
    // /metrics on any free port
    settings.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut running = agent(settings, &fake, &engine, None);

    // registered, with a lease; the network follows the desired state
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready in time");
    let a = eventually("host a registered", Duration::from_secs(5), || {
        lab.controller().membership().host("a")
    })
    .await;
    let subnet = a.record.subnet.expect("a subnet");
    let b_subnet = lab
        .controller()
        .membership()
        .host("b")
        .and_then(|b| b.record.subnet)
        .expect("b subnet");
    assert_eq!(a.record.agent_url, format!("https://127.0.0.1:{api_port}"));
    eventually("the route to b", Duration::from_secs(5), || {
        fake.host()
            .geomx_routes()
            .contains(&format!("{b_subnet} via 10.1.1.29"))
            .then_some(())
    })
    .await;
    let bip = format!(
        "{}",
        super::containers::gateway(&DesiredState {
            subnet: subnet.to_string(),
            ..Default::default()
        })
        .expect("gw")
    );
    let daemon_json = fake.host().daemon_json.clone().unwrap_or_default();
    assert!(daemon_json.contains(&format!("{bip}/24")), "{daemon_json}");

    // the container runs, with the env the runtime adds
    let name = "geomx.job1.a-worker-0";
    let id = eventually("the role container", Duration::from_secs(5), || {
        engine.id_of(name)
    })
    .await;
    let env = engine.env_of(name);
    assert!(env.contains(&"PYTHONUNBUFFERED=1".to_string()), "{env:?}");
    assert!(env.contains(&"GEOMX_JOB=job1".to_string()), "{env:?}");
    assert!(engine.id_of("geomx-net.job1.a-worker-0").is_some());

    // reports: the node running, the network converged, the API port listening
    let report = eventually(
        "a report with the node running",
        Duration::from_secs(5),
        || {
            lab.workloads.last_report("a").filter(|r| {
                node_state(r, "a-worker-0").map(|s| s.0) == Some(ContainerState::Running)
                    && r.network
                        .as_ref()
                        .is_some_and(|n| n.converged && n.routes == 1)
                    && r.applied_revision > 0
            })
        },
    )
    .await;
    assert_eq!(report.agent_version, agent_version());
    assert!(
        report.images.contains(&IMAGE.to_string()),
        "{:?}",
        report.images
    );
    assert!(
        report.listening_ports.contains(&u32::from(api_port)),
        "{:?}",
        report.listening_ports
    );
    // the desired state is persisted
    let persisted = StateFile::new(&agent_state)
        .load()
        .expect("readable")
        .expect("persisted");
    assert_eq!(persisted.subnet, subnet.to_string());
    assert_eq!(persisted.containers.len(), 1);

    // logs over the agent API: the controller's certificate only
    engine.print(&id, "[Time 1.0][Epoch 0][Iteration 1] Test Acc 0.5");
    engine.print(&id, "hello from a-worker-0");
    let api_url = format!("https://127.0.0.1:{api_port}");
    let channel = |tls: ClientTlsConfig| {
        Endpoint::from_shared(api_url.clone())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect_lazy()
    };
    let mut logs = AgentNodeServiceClient::new(channel(lab.controller_tls()));
    let request = NodeLogsRequest {
        job: "job1".into(),
        node: "a-worker-0".into(),
        follow: false,
        tail: 0,
        generation: None,
    };
    let lines = eventually_logs(&mut logs, request.clone()).await;
    assert!(
        lines.contains(&"hello from a-worker-0".to_string()),
        "{lines:?}"
    );
    let mut as_agent = AgentNodeServiceClient::new(channel(
        lab.agent_files("b").load().expect("b").client_config(),
    ));
    let refused = as_agent.logs(request.clone()).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    let missing = logs
        .logs(NodeLogsRequest {
            node: "nope".into(),
            ..request.clone()
        })
        .await
        .expect_err("no such node");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");

    // a crash reaches the controller well within a second
    let crashed_at = Instant::now();
    engine.exit(&id, 3);
    let seen_at = eventually("the crash reported", Duration::from_secs(3), || {
        lab.workloads
            .reports_of("a")
            .into_iter()
            .find(|(t, r)| {
                *t >= crashed_at
                    && node_state(r, "a-worker-0") == Some((ContainerState::Failed, Some(3)))
            })
            .map(|(t, _)| t)
    })
    .await;
    let latency = seen_at.duration_since(crashed_at);
    eprintln!("crash reported after {latency:?}");
    assert!(
        latency < Duration::from_millis(500),
        "crash reported after {latency:?}"
    );

    // /metrics counted what the daemon did: the container's start and its failed exit,
    // the network passes and their changes; a refused heartbeat moves the refusals
    check_metrics(&running).await;

    // the controller goes away: nothing on the host changes
    lab.stop().await;
    let kernel_log = fake.host().log.len();
    let calls = engine.calls().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let h = fake.host();
        let new: Vec<&String> = h.log[kernel_log..].iter().collect();
        assert!(
            new.is_empty(),
            "the host network changed while the controller was away: {new:?}"
        );
        assert!(
            h.geomx_routes()
                .contains(&format!("{b_subnet} via 10.1.1.29"))
        );
    }
    assert_eq!(
        engine.calls().len(),
        calls,
        "{:?}",
        &engine.calls()[calls..]
    );

    // it comes back on the same state: the agent watches and reports again by itself
    let back_at = Instant::now();
    lab.boot().await;
    eventually(
        "reports after the controller restart",
        Duration::from_secs(10),
        || {
            lab.workloads
                .reports_of("a")
                .into_iter()
                .any(|(t, _)| t > back_at)
                .then_some(())
        },
    )
    .await;
    // and gets new desired states: a second container
    lab.workloads
        .containers
        .lock()
        .expect("lock")
        .get_mut("a")
        .expect("a")
        .push(worker("job1", "a-worker-1"));
    lab.publish().await;
    // (started, not only created: the start call must not fall into the count below)
    eventually(
        "the second container started",
        Duration::from_secs(10),
        || {
            let id = engine.id_of("geomx.job1.a-worker-1")?;
            engine
                .calls()
                .contains(&format!("start {id}"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        lab.controller()
            .membership()
            .host("a")
            .and_then(|h| h.record.subnet),
        Some(subnet),
        "same subnet after the restart"
    );

    // stopping the agent leaves containers and network in place
    let calls = engine.calls().len();
    let kernel_log = fake.host().log.len();
    running.stop(Duration::from_secs(5)).await;
    assert_eq!(engine.calls().len(), calls);
    assert_eq!(fake.host().log.len(), kernel_log);
    assert!(engine.id_of("geomx.job1.a-worker-1").is_some());
    lab.stop().await;
}

async fn eventually_logs(
    client: &mut AgentNodeServiceClient<Channel>,
    request: NodeLogsRequest,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client.logs(request.clone()).await {
            Ok(stream) => {
                let mut lines = Vec::new();
                let mut s = stream.into_inner();
                while let Some(chunk) = s.next().await {
                    lines.extend(chunk.expect("chunk").lines);
                }
                return lines;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("logs not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("logs: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registers_again_when_the_controller_forgets_the_host() {
    let mut lab = Lab::start().await;
    let fake = FakeKernel::new();
    let engine = FakeEngine::new(&[IMAGE]);
    let mut running = agent(
        lab.settings(lab.dir.path().join("agent-a"), free_port()),
        &fake,
        &engine,
        None,
    );
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready");
    eventually("registered", Duration::from_secs(5), || {
        lab.controller().membership().host("a")
    })
    .await;
    // a fresh controller state (a new cluster) on the same address
    lab.stop().await;
    lab.state_dir = lab.dir.path().join("controller-new");
    lab.boot().await;
    eventually(
        "registered with the new controller",
        Duration::from_secs(10),
        || lab.controller().membership().host("a"),
    )
    .await;
    let id = lab.controller().controller_id().to_owned();
    eventually(
        "the new controller id in the desired state",
        Duration::from_secs(5),
        || {
            running
                .ctx
                .desired
                .borrow()
                .as_ref()
                .filter(|d| d.controller_id == id)
                .map(|_| ())
        },
    )
    .await;
    running.stop(Duration::from_secs(5)).await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_controller_the_persisted_state_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("agent-a");
    let persisted = DesiredState {
        revision: 9,
        host: "a".into(),
        subnet: "172.17.5.0/24".into(),
        cluster_cidr: "172.17.0.0/16".into(),
        peers: vec![Peer {
            name: "b".into(),
            underlay_ip: "10.1.1.29".into(),
            subnet: "172.17.6.0/24".into(),
            ..Default::default()
        }],
        containers: vec![worker("job1", "a-worker-0")],
        heartbeat_interval_ms: 200,
        controller_id: "ctl-old".into(),
        ..Default::default()
    };
    StateFile::new(&state_dir).save(&persisted).expect("save");
    let loaded = StateFile::new(&state_dir).load().expect("load");

    // a controller nobody listens at
    let settings = Settings {
        host: "a".into(),
        controller: format!("http://127.0.0.1:{}", free_port()),
        tls: None,
        underlay_ip: Some("127.0.0.1".parse().expect("ip")),
        pinned_subnet: None,
        api_listen: Some(SocketAddr::from(([127, 0, 0, 1], free_port()))),
        heartbeat_port: None,
        state_dir,
        network_interval: Duration::from_millis(100),
        logs_retention: geomx_runtime::archive::DEFAULT_RETENTION,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        agent_version: agent_version(),
        wireguard: None,
        pulls: Default::default(),
        metrics_listen: None,
    };
    let fake = FakeKernel::new();
    let engine = FakeEngine::new(&[IMAGE]);
    let mut running = agent(settings, &fake, &engine, loaded);
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready without a controller");
    assert_eq!(
        fake.host().geomx_routes(),
        vec!["172.17.6.0/24 via 10.1.1.29".to_string()]
    );
    let id = eventually("the persisted container", Duration::from_secs(5), || {
        engine.id_of("geomx.job1.a-worker-0")
    })
    .await;
    let labels = engine.lock().containers[&id].labels.clone();
    assert_eq!(labels["io.geomx.controller"], "ctl-old");
    assert!(running.ctx.registered.borrow().is_none());
    running.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_down_at_start_still_gives_routes_then_containers() {
    let lab = Lab::start().await;
    let _b = lab.peer_b().await;
    lab.workloads
        .containers
        .lock()
        .expect("lock")
        .insert("a".into(), vec![worker("job1", "a-worker-0")]);
    let fake = FakeKernel::new();
    fake.host().docker = None;
    let engine = FakeEngine::new(&[IMAGE]);
    engine.set_down(true);
    let mut running = agent(
        lab.settings(lab.dir.path().join("agent-a"), free_port()),
        &fake,
        &engine,
        None,
    );
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready while Docker is down");
    eventually("the route to b", Duration::from_secs(5), || {
        (!fake.host().geomx_routes().is_empty()).then_some(())
    })
    .await;
    assert_eq!(fake.host().restarts, 0);
    let r = eventually(
        "a report saying Docker is down",
        Duration::from_secs(5),
        || {
            lab.workloads
                .last_report("a")
                .filter(|r| r.network.as_ref().is_some_and(|n| !n.error.is_empty()))
        },
    )
    .await;
    // no runtime yet: the report says it does not know the host's nodes and images (the
    // controller must not take the job's nodes for gone, nor the images for missing)
    assert_eq!(r.nodes_known, Some(false), "{r:?}");
    assert_eq!(r.images_known, Some(false), "{r:?}");
    assert!(r.nodes.is_empty() && r.images.is_empty(), "{r:?}");
    assert!(!r.network.expect("network").converged);
    assert!(engine.names().is_empty());

    // Docker starts (with the bip daemon.json gives it)
    {
        let mut h = fake.host();
        let bip = h
            .daemon_json
            .as_deref()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .and_then(|v| v["bip"].as_str().map(str::to_owned))
            .expect("bip written while Docker was down");
        h.links
            .insert("docker0".into(), vec![bip.parse().expect("bip")]);
        h.docker = Some(geomx_net::kernel::DockerVersion {
            version: "20.10.24".into(),
            api_version: "1.41".into(),
        });
    }
    engine.set_down(false);
    eventually(
        "the container once Docker answers",
        Duration::from_secs(10),
        || engine.id_of("geomx.job1.a-worker-0"),
    )
    .await;
    let r = eventually("a converged report", Duration::from_secs(5), || {
        lab.workloads.last_report("a").filter(|r| {
            r.network.as_ref().is_some_and(|n| n.converged) && r.images_known == Some(true)
        })
    })
    .await;
    assert_eq!(r.nodes_known, Some(true), "{r:?}");
    assert!(r.images.contains(&IMAGE.to_string()), "{:?}", r.images);
    assert_eq!(fake.host().restarts, 0, "Docker started with the right bip");
    running.stop(Duration::from_secs(5)).await;
}

/// An [`EngineSource`] handing out clones of one fake engine (the sandboxes use the default
/// shell loop in the job's image).
#[derive(Clone)]
struct FakeSource(FakeEngine);

impl EngineSource for FakeSource {
    type Engine = FakeEngine;

    async fn connect(&self) -> Result<FakeEngine, String> {
        self.0.check().map_err(|e: RuntimeError| e.to_string())?;
        Ok(self.0.clone())
    }

    async fn sandbox(&self, _engine: &FakeEngine) -> Result<SandboxConfig, String> {
        Ok(SandboxConfig::default())
    }
}

/// A job's image only in the registry: the agent pulls it (reporting the pull and, once
/// done, the image with its digest), then runs the node; the controller can resolve and
/// pull through the agent API (its certificate only).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_image_is_pulled_reported_and_resolvable_through_the_api() {
    use geomx_proto::v1::{AgentPullRequest, ResolveImageRequest};
    let lab = Lab::start().await;
    let engine = FakeEngine::new(&[]);
    let tag = "10.1.1.253:5000/geomx/test:latest";
    let pinned = engine.push(tag, &[("sha256:l1", 1000), ("sha256:l2", 24)]);
    let mut spec = worker("job1", "a-worker-0");
    spec.image = pinned.clone();
    spec.image_pull = "if-not-present".into();
    lab.workloads
        .containers
        .lock()
        .expect("lock")
        .insert("a".into(), vec![spec]);
    let api_port = free_port();
    let fake = FakeKernel::new();
    let mut running = agent(
        lab.settings(lab.dir.path().join("agent-a"), api_port),
        &fake,
        &engine,
        None,
    );
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready in time");
    let r = eventually(
        "a report with the pull done and the node running",
        Duration::from_secs(10),
        || {
            lab.workloads.last_report("a").filter(|r| {
                r.pulls.iter().any(|p| p.state == "done")
                    && node_state(r, "a-worker-0").map(|s| s.0) == Some(ContainerState::Running)
                    && r.images.contains(&pinned)
            })
        },
    )
    .await;
    let p = r
        .pulls
        .iter()
        .find(|p| p.image == pinned)
        .expect("the pull");
    assert_eq!((p.bytes_done, p.bytes_total), (1024, 1024), "{p:?}");
    assert_eq!((p.layers_done, p.layers_total), (2, 2), "{p:?}");
    assert_eq!(p.registry, "10.1.1.253:5000");
    // the registry counted the pull and its bytes
    {
        use super::metrics::tests::{counter, parse};
        let s = parse(&running.ctx.metrics.render());
        assert_eq!(
            counter(&s, "geomx_agent_image_pull_bytes_total", &[]),
            1024.0
        );
        assert_eq!(
            counter(&s, "geomx_agent_image_pulls_total", &[("result", "ok")]),
            1.0
        );
        assert_eq!(
            counter(&s, "geomx_agent_image_pulls_total", &[("result", "error")]),
            0.0
        );
    }
    assert!(
        r.image_details
            .iter()
            .any(|i| i.repo_digests.contains(&pinned) && i.size_bytes == 1024),
        "{:?}",
        r.image_details
    );

    let channel = |tls: ClientTlsConfig| {
        Endpoint::from_shared(format!("https://127.0.0.1:{api_port}"))
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect_lazy()
    };
    let mut api = AgentNodeServiceClient::new(channel(lab.controller_tls()));
    let resolved = api
        .resolve_image(ResolveImageRequest { image: tag.into() })
        .await
        .expect("resolves")
        .into_inner();
    assert_eq!(resolved.pinned, pinned);
    assert_eq!(resolved.registry, "10.1.1.253:5000");
    let missing = api
        .resolve_image(ResolveImageRequest {
            image: "10.1.1.253:5000/geomx/test:nope".into(),
        })
        .await
        .expect_err("no such tag");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    assert!(
        missing.message().starts_with(
            "image 10.1.1.253:5000/geomx/test:nope on registry 10.1.1.253:5000: not found ("
        ),
        "{}",
        missing.message()
    );
    let present = api
        .pull_image(AgentPullRequest {
            image: pinned.clone(),
            timeout_ms: 0,
        })
        .await
        .expect("pull")
        .into_inner();
    assert!(!present.started, "present already");
    let mut as_agent = AgentNodeServiceClient::new(channel(
        lab.agent_files("b").load().expect("b").client_config(),
    ));
    let refused = as_agent
        .resolve_image(ResolveImageRequest { image: tag.into() })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    running.stop(Duration::from_secs(5)).await;
}

/// A report over the agent's budget (here: 40,000 image tags, whose details alone come to
/// about 6 MB, over the controller's 4 MiB limit) goes out without the detail it can spare,
/// says so, and is taken: the host stays ready, the controller records `ReportDegraded`
/// and keeps the image list it can take (at most 4096 references).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_report_is_degraded_and_the_host_stays_ready() {
    use geomx_agent::convert::MAX_IMAGES;
    use geomx_agent::report::{CONTROLLER_LIMIT, REPORT_BUDGET};
    use geomx_controller::store::{EventScope, HostState};
    use prost::Message;

    let mut lab = Lab::start().await;
    let fake = FakeKernel::new();
    let tags: Vec<String> = (0..40_000)
        .map(|k| format!("registry.example:5000/{}/image-{k:05}:v1", "x".repeat(60)))
        .collect();
    let images: Vec<&str> = tags.iter().map(String::as_str).chain([IMAGE]).collect();
    let engine = FakeEngine::new(&images);
    let mut running = agent(
        lab.settings(lab.dir.path().join("agent-a"), free_port()),
        &fake,
        &engine,
        None,
    );
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready");
    let report = eventually("a degraded report", Duration::from_secs(20), || {
        lab.workloads
            .last_report("a")
            .filter(|r| !r.omitted.is_empty())
    })
    .await;
    assert_eq!(report.omitted, ["image_details"]);
    assert!(report.image_details.is_empty());
    assert!(
        report.full_size_bytes > CONTROLLER_LIMIT as u64,
        "{}",
        report.full_size_bytes
    );
    assert!(
        report.encoded_len() <= REPORT_BUDGET,
        "{}",
        report.encoded_len()
    );
    assert_eq!(report.images.len(), MAX_IMAGES);
    let m = lab.controller().membership().clone();
    eventually("the ReportDegraded event", Duration::from_secs(5), || {
        m.store()
            .events(EventScope::Host("a"))
            .ok()?
            .into_iter()
            .find(|e| e.kind == "ReportDegraded")
    })
    .await;
    let host = m.host("a").expect("a");
    assert_eq!(host.record.state, HostState::Ready);
    assert_eq!(host.record.images.len(), MAX_IMAGES);
    running.stop(Duration::from_secs(5)).await;
    lab.stop().await;
}
