//! Jobs end to end: a real controller in-process with TLS, simulated agents over real gRPC
//! (register with an agent certificate, watch the desired state, run "containers" in memory
//! with sandbox IPs from their subnet, report NodeStatus), and a fake AgentNodeService for
//! the logs proxy.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use geomx_controller::JobOptions;
use geomx_controller::store::{EventScope, TreeId};
use geomx_proto::pki::CertificateAuthority;
use geomx_proto::tls::{TlsMaterial, require_controller};
use geomx_proto::v1::agent_node_service_server::{AgentNodeService, AgentNodeServiceServer};
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_proto::v1::{
    CancelJobRequest, ContainerSpec, ContainerState, DesiredState, GetJobRequest, HostReport, Job,
    JobEventsRequest, JobPhase, ListJobsRequest, LogChunk, NodeLogsRequest, NodeStatus, Progress,
    SubmitJobRequest, UserLogsRequest, WatchRequest,
};
use ipnet::Ipv4Net;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const IMAGE: &str = "geomx/test:1";

/// central on a, party p (2 workers) on b, party q (1 worker) on c: 11 nodes.
const ROUTED: &str = r#"
name = "hips-test"
mode = "hips"
image = "geomx/test:1"

[central]
host = "a"

[[party]]
name = "p"
hosts = ["b"]
workers = 2

[[party]]
name = "q"
hosts = ["c"]
workers = 1
"#;

/// What every simulated host's Docker reports: 4 GiB, 2 CPUs.
const SIM_MEMORY: u64 = 4 << 30;
const SIM_CPUS: u32 = 2;

/// Plain ps on one host with host networking: 4 nodes.
fn pseudo(name: &str, port: u16, policy: &str) -> String {
    format!(
        r#"
name = "{name}"
mode = "ps"
image = "geomx/test:1"
network = "pseudo"

[[party]]
name = "p"
hosts = ["a"]
workers = 2
scheduler_port = {port}

[policy]
{policy}
"#
    )
}

fn routed_with_policy(policy: &str) -> String {
    format!("{ROUTED}\n[policy]\n{policy}\n")
}

fn options() -> JobOptions {
    JobOptions {
        tick: Duration::from_millis(100),
        restart_drain_timeout: Duration::from_secs(10),
        ..JobOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// The simulated agent.

/// Something a simulated agent saw or did, in order, across all agents.
#[derive(Clone, Debug)]
enum Happening {
    /// `start` arrived for a node.
    Start { node: String, at: Instant },
    /// The node's container runs (reported from now on).
    Running { node: String, at: Instant },
}

type Journal = Arc<Mutex<Vec<Happening>>>;

#[derive(Clone, Debug)]
struct SimNode {
    spec: ContainerSpec,
    started: Option<ContainerSpec>,
    state: ContainerState,
    ip: String,
    exit_code: Option<i32>,
    log_tail: Vec<String>,
    progress: Option<Progress>,
    started_at_ms: i64,
    /// The container was replaced because its spec changed after it started.
    recreated: u32,
}

#[derive(Debug)]
struct SimState {
    nodes: BTreeMap<(String, String), SimNode>,
    last: Option<DesiredState>,
    states: usize,
    next_ip: u32,
    reporting: bool,
    images: Vec<String>,
    /// Pulls it reports.
    pulls: Vec<geomx_proto::v1::ImagePull>,
    listening_ports: Vec<u32>,
    scheduler_delay: Duration,
    /// The agent has not adopted its containers yet (restarted while Docker is slow): it
    /// reports with `nodes_known: false`, `images_known: false`, no node, no image.
    nodes_unknown: bool,
    /// The host's memory and CPUs as its Docker would report them (0: unknown).
    memory_bytes: u64,
    cpus: u32,
}

/// A fake geomx-agent: registers, watches, runs containers in memory, reports.
struct Sim {
    host: String,
    subnet: Ipv4Net,
    agent_url: String,
    state: Arc<Mutex<SimState>>,
    kick: Arc<Notify>,
    journal: Journal,
    tasks: Vec<JoinHandle<()>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Sim {
    async fn start(lab: &Lab, host: &str, journal: &Journal) -> Sim {
        Sim::start_with(lab, host, journal, None).await
    }

    async fn start_with(
        lab: &Lab,
        host: &str,
        journal: &Journal,
        agent_url: Option<String>,
    ) -> Sim {
        // as the agent: what the controller may send, not tonic's 4 MiB default
        let mut client = lab
            .agent(host)
            .await
            .max_decoding_message_size(geomx_proto::MAX_DESIRED_STATE_LEN);
        let mut req = register_request(host);
        if let Some(url) = &agent_url {
            req.agent_url = url.clone();
        }
        let agent_url = req.agent_url.clone();
        let reg = client.register(req).await.expect("register").into_inner();
        let mut sim = Sim {
            host: host.to_owned(),
            subnet: reg.subnet.parse().expect("subnet"),
            agent_url,
            state: Arc::new(Mutex::new(SimState {
                nodes: BTreeMap::new(),
                last: None,
                states: 0,
                next_ip: 2,
                reporting: true,
                images: vec![IMAGE.to_owned(), "busybox:latest".to_owned()],
                pulls: Vec::new(),
                listening_ports: vec![22],
                scheduler_delay: Duration::ZERO,
                nodes_unknown: false,
                memory_bytes: SIM_MEMORY,
                cpus: SIM_CPUS,
            })),
            kick: Arc::new(Notify::new()),
            journal: journal.clone(),
            tasks: Vec::new(),
        };
        sim.spawn(client).await;
        sim
    }

    async fn spawn(&mut self, client: AgentServiceClient<Channel>) {
        // A first report, so that the controller knows the host's images before a submit.
        let report = self.report();
        client.clone().report(report).await.expect("first report");
        let mut watch = client
            .clone()
            .watch(geomx_proto::templates::watch_request(WatchRequest {
                host: self.host.clone(),
            }))
            .await
            .expect("watch")
            .into_inner();
        let (state, kick, journal, host, subnet) = (
            self.state.clone(),
            self.kick.clone(),
            self.journal.clone(),
            self.host.clone(),
            self.subnet,
        );
        self.tasks.push(tokio::spawn(async move {
            while let Ok(Some(desired)) = watch.message().await {
                apply(&state, &journal, &kick, &host, subnet, desired);
                kick.notify_one();
            }
        }));
        let (state, kick, host) = (self.state.clone(), self.kick.clone(), self.host.clone());
        let mut client = client;
        self.tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(HEARTBEAT) => {}
                    () = kick.notified() => {}
                }
                let report = {
                    let s = state.lock().unwrap();
                    if !s.reporting {
                        continue;
                    }
                    build_report(&host, &s)
                };
                let _ = client.report(report).await;
            }
        }));
    }

    fn report(&self) -> HostReport {
        build_report(&self.host, &self.state.lock().unwrap())
    }

    /// Reconnects to a restarted controller, keeping its "containers".
    async fn reconnect(&mut self, lab: &Lab) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let mut client = lab.agent(&self.host).await;
        let mut req = register_request(&self.host);
        req.agent_url = self.agent_url.clone();
        client.register(req).await.expect("register again");
        self.spawn(client).await;
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    fn pause_reports(&self) {
        self.state.lock().unwrap().reporting = false;
    }

    fn with<R>(&self, f: impl FnOnce(&mut SimState) -> R) -> R {
        let r = f(&mut self.state.lock().unwrap());
        self.kick.notify_one();
        r
    }

    fn node(&self, job: &str, node: &str) -> Option<SimNode> {
        self.state
            .lock()
            .unwrap()
            .nodes
            .get(&(job.to_owned(), node.to_owned()))
            .cloned()
    }

    fn ip(&self, job: &str, node: &str) -> String {
        self.node(job, node).expect("node on this sim").ip
    }

    fn set(&self, job: &str, node: &str, f: impl FnOnce(&mut SimNode)) {
        self.with(|s| {
            let n = s
                .nodes
                .get_mut(&(job.to_owned(), node.to_owned()))
                .expect("node on this sim");
            f(n);
        });
    }

    /// Progress of a node that may be gone already (the job ended): then nothing.
    fn try_progress(&self, job: &str, node: &str, iteration: u64, accuracy: f64) {
        if self.node(job, node).is_some() {
            self.with(|s| {
                if let Some(n) = s.nodes.get_mut(&(job.to_owned(), node.to_owned())) {
                    n.progress = Some(Progress {
                        epoch: iteration / 10,
                        iteration,
                        accuracy: Some(accuracy),
                        observed_at_ms: now_ms(),
                        ..Default::default()
                    });
                }
            });
        }
    }

    fn exit(&self, job: &str, node: &str, code: i32, tail: &[&str]) {
        self.set(job, node, |n| {
            n.state = if code == 0 {
                ContainerState::Exited
            } else {
                ContainerState::Failed
            };
            n.exit_code = Some(code);
            n.log_tail = tail.iter().map(|s| s.to_string()).collect();
        });
    }

    fn progress(&self, job: &str, node: &str, iteration: u64, accuracy: f64) {
        self.set(job, node, |n| {
            n.progress = Some(Progress {
                epoch: iteration / 10,
                iteration,
                accuracy: Some(accuracy),
                observed_at_ms: now_ms(),
                ..Default::default()
            });
        });
    }

    /// The containers of the last desired state.
    fn desired(&self) -> Vec<ContainerSpec> {
        self.state
            .lock()
            .unwrap()
            .last
            .as_ref()
            .map(|d| d.containers.clone())
            .unwrap_or_default()
    }

    fn recreated(&self) -> u32 {
        self.state
            .lock()
            .unwrap()
            .nodes
            .values()
            .map(|n| n.recreated)
            .sum()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop();
    }
}

fn build_report(host: &str, s: &SimState) -> HostReport {
    if s.nodes_unknown {
        return HostReport {
            host: host.to_owned(),
            applied_revision: s.last.as_ref().map_or(0, |d| d.revision),
            agent_version: "sim-agent 0.1".to_owned(),
            listening_ports: s.listening_ports.clone(),
            nodes_known: Some(false),
            images_known: Some(false),
            ..Default::default()
        };
    }
    HostReport {
        host: host.to_owned(),
        applied_revision: s.last.as_ref().map_or(0, |d| d.revision),
        nodes: s
            .nodes
            .values()
            .map(|n| NodeStatus {
                job: n.spec.job.clone(),
                node: n.spec.node.clone(),
                generation: n.spec.generation,
                state: n.state as i32,
                container_id: format!("c-{}-{}", n.spec.job, n.spec.node),
                ip: n.ip.clone(),
                exit_code: n.exit_code,
                restarts: 0,
                progress: n.progress.clone(),
                log_tail: n.log_tail.clone(),
                error: String::new(),
                started_at_ms: n.started_at_ms,
                finished_at_ms: 0,
                rendezvous: None,
            })
            .collect(),
        images: s.images.clone(),
        network: None,
        agent_version: "sim-agent 0.1".to_owned(),
        listening_ports: s.listening_ports.clone(),
        nodes_known: Some(true),
        images_known: Some(true),
        memory_bytes: s.memory_bytes,
        cpus: s.cpus,
        image_details: Vec::new(),
        pulls: s.pulls.clone(),
        omitted: Vec::new(),
        full_size_bytes: 0,
    }
}

/// The next container address of a simulated host.
fn next_ip(s: &mut SimState, subnet: Ipv4Net) -> String {
    let ip = Ipv4Addr::from(u32::from(subnet.network()) + s.next_ip);
    s.next_ip += 1;
    ip.to_string()
}

/// What a real agent does with a desired state: sandboxes for new nodes that ask for one
/// (their IP is known before they start), containers for started ones (a node without a
/// sandbox gets its IP when its container starts), removal of the rest.
fn apply(
    state: &Arc<Mutex<SimState>>,
    journal: &Journal,
    kick: &Arc<Notify>,
    host: &str,
    subnet: Ipv4Net,
    mut desired: DesiredState,
) {
    // as the agent does: every container complete, with the templates it names
    desired.containers = geomx_proto::templates::expand_state(&desired).expect("expands");
    desired.templates.clear();
    let mut s = state.lock().unwrap();
    s.states += 1;
    let wanted: BTreeMap<(String, String), ContainerSpec> = desired
        .containers
        .iter()
        .map(|c| ((c.job.clone(), c.node.clone()), c.clone()))
        .collect();
    s.nodes.retain(|k, n| {
        wanted
            .get(k)
            .is_some_and(|spec| spec.generation == n.spec.generation)
    });
    for (key, spec) in wanted {
        if !s.nodes.contains_key(&key) {
            let ip = if spec.host_network {
                ip_of(host).to_owned()
            } else if spec.sandbox {
                next_ip(&mut s, subnet)
            } else {
                String::new()
            };
            s.nodes.insert(
                key.clone(),
                SimNode {
                    spec: spec.clone(),
                    started: None,
                    state: ContainerState::Pending,
                    ip,
                    exit_code: None,
                    log_tail: Vec::new(),
                    progress: None,
                    started_at_ms: 0,
                    recreated: 0,
                },
            );
        }
        let delay = s.scheduler_delay;
        // a started node, or one whose sandbox is asked for only now (after the job's
        // preflight), gets its address
        if (spec.start || spec.sandbox) && s.nodes.get(&key).is_some_and(|n| n.ip.is_empty()) {
            let ip = next_ip(&mut s, subnet);
            if let Some(n) = s.nodes.get_mut(&key) {
                n.ip = ip;
            }
        }
        let n = s.nodes.get_mut(&key).expect("inserted");
        n.spec = spec.clone();
        if !spec.start {
            continue;
        }
        match &n.started {
            None => {
                n.started = Some(spec.clone());
                journal.lock().unwrap().push(Happening::Start {
                    node: spec.node.clone(),
                    at: Instant::now(),
                });
                let scheduler = spec.role.ends_with("scheduler");
                if scheduler && !delay.is_zero() {
                    n.state = ContainerState::Created;
                    let (state, journal, kick) = (state.clone(), journal.clone(), kick.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        {
                            let mut s = state.lock().unwrap();
                            if let Some(n) = s.nodes.get_mut(&key) {
                                n.state = ContainerState::Running;
                                n.started_at_ms = now_ms();
                            }
                            journal.lock().unwrap().push(Happening::Running {
                                node: key.1.clone(),
                                at: Instant::now(),
                            });
                        }
                        kick.notify_one();
                    });
                } else {
                    n.state = ContainerState::Running;
                    n.started_at_ms = now_ms();
                    journal.lock().unwrap().push(Happening::Running {
                        node: spec.node.clone(),
                        at: Instant::now(),
                    });
                }
            }
            Some(old) if *old != spec => {
                n.recreated += 1;
                n.started = Some(spec.clone());
            }
            Some(_) => {}
        }
    }
    s.last = Some(desired);
}

// ---------------------------------------------------------------------------------------
// Helpers.

struct Cluster {
    lab: Lab,
    journal: Journal,
    sims: BTreeMap<String, Sim>,
    jobs: UserJobs,
}

impl Cluster {
    async fn start(hosts: &[&str]) -> Cluster {
        Cluster::start_with(hosts, options()).await
    }

    async fn start_with(hosts: &[&str], opts: JobOptions) -> Cluster {
        let lab = Lab::start_with_jobs(opts).await;
        let journal: Journal = Arc::default();
        let mut sims = BTreeMap::new();
        for h in hosts {
            sims.insert((*h).to_owned(), Sim::start(&lab, h, &journal).await);
        }
        let jobs = lab.user_jobs(&lab.pki.token).await;
        Cluster {
            lab,
            journal,
            sims,
            jobs,
        }
    }

    fn sim(&self, host: &str) -> &Sim {
        &self.sims[host]
    }

    async fn submit(&self, toml: &str) -> Result<Job, Status> {
        self.jobs
            .clone()
            .submit_job(SubmitJobRequest {
                job_toml: toml.to_owned(),
                file_name: "test.toml".to_owned(),
            })
            .await
            .map(|r| r.into_inner().job.expect("job"))
    }

    async fn get(&self, name: &str) -> Job {
        self.jobs
            .clone()
            .get_job(GetJobRequest { name: name.into() })
            .await
            .expect("get job")
            .into_inner()
    }

    /// Scrapes `/metrics` until `pred` holds.
    async fn lab_metrics_until(
        &self,
        within: Duration,
        pred: impl Fn(&prometheus_parse::Scrape) -> bool,
    ) -> prometheus_parse::Scrape {
        let deadline = Instant::now() + within;
        loop {
            let m = self.lab.metrics().await;
            if pred(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "metrics: {:?}", m.samples);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the job until `pred` holds.
    async fn wait(&self, name: &str, within: Duration, pred: impl Fn(&Job) -> bool) -> Job {
        let deadline = Instant::now() + within;
        loop {
            let job = self.get(name).await;
            if pred(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {name} did not get there within {within:?}; it is {:?}: {}\n{:#?}",
                JobPhase::try_from(job.phase),
                job.reason,
                job.nodes
                    .iter()
                    .map(|n| (n.name.clone(), n.status.as_ref().map(|s| s.state)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_phase(&self, name: &str, phase: JobPhase, within: Duration) -> Job {
        self.wait(name, within, |j| j.phase == phase as i32).await
    }

    async fn events(&self, name: &str) -> Vec<geomx_proto::v1::Event> {
        self.jobs
            .clone()
            .job_events(JobEventsRequest { name: name.into() })
            .await
            .expect("events")
            .into_inner()
            .events
    }

    /// Waits until no sim's desired state holds containers of `job`.
    async fn wait_no_containers(&self, job: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left: usize = self
                .sims
                .values()
                .map(|s| s.desired().iter().filter(|c| c.job == job).count())
                .sum();
            if left == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{left} containers of {job} still desired after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn started_env(&self, job: &str, host: &str, node: &str) -> BTreeMap<String, String> {
        self.sim(host)
            .node(job, node)
            .and_then(|n| n.started)
            .map(|s| s.env.into_iter().collect())
            .unwrap_or_else(|| panic!("{node} was not started on {host}"))
    }

    fn happened(&self, node: &str, running: bool) -> Option<Instant> {
        self.journal.lock().unwrap().iter().find_map(|h| match h {
            Happening::Start { node: n, at } if !running && n == node => Some(*at),
            Happening::Running { node: n, at } if running && n == node => Some(*at),
            _ => None,
        })
    }
}

fn node<'a>(job: &'a Job, name: &str) -> &'a geomx_proto::v1::JobNode {
    job.nodes.iter().find(|n| n.name == name).expect("node")
}

fn state_of(job: &Job, name: &str) -> i32 {
    node(job, name).status.as_ref().map_or(0, |s| s.state)
}

const TRAINING: [(&str, &str); 4] = [
    ("a", "master-worker"),
    ("b", "p-worker-0"),
    ("b", "p-worker-1"),
    ("c", "q-worker-0"),
];

/// The schedulers and servers of [`ROUTED`]: they end after the training workers (ps-lite's
/// Finalize), which ends the job at once (else `teardown_grace` later).
const SHUTTING_DOWN: [(&str, &str); 7] = [
    ("a", "global-scheduler"),
    ("a", "central-scheduler"),
    ("a", "global-server-0"),
    ("b", "p-scheduler"),
    ("b", "p-server"),
    ("c", "q-scheduler"),
    ("c", "q-server"),
];

async fn running_routed(c: &Cluster) -> Job {
    let job = c.submit(ROUTED).await.expect("accepted");
    assert_eq!(job.node_count, 11);
    c.wait_phase("hips-test", JobPhase::Running, Duration::from_secs(5))
        .await
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn routed_gang_start_fills_scheduler_ips_and_orders_starts() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    for s in c.sims.values() {
        s.with(|st| st.scheduler_delay = Duration::from_millis(300));
    }
    let submitted = c.submit(ROUTED).await.expect("accepted");
    assert_eq!(submitted.phase, JobPhase::Pending as i32);
    assert_eq!(submitted.mode, "hips");
    assert_eq!(submitted.nodes.len(), 11);
    assert!(submitted.job_toml.contains("hips-test"));

    let job = c
        .wait_phase("hips-test", JobPhase::Running, Duration::from_secs(5))
        .await;
    assert_eq!(job.running_nodes, 11);
    assert_eq!(job.generation, 0);
    assert!(job.running_at_ms >= job.submitted_at_ms);

    // Only the schedulers (their env names their own address) get a network sandbox.
    for h in ["a", "b", "c"] {
        for spec in c.sim(h).desired() {
            let scheduler = spec.role.ends_with("scheduler");
            assert_eq!(spec.sandbox, scheduler, "{}: sandbox", spec.node);
        }
    }
    // Each node's IP is the one its agent reported (sandbox or container).
    let j = "hips-test";
    for n in &job.nodes {
        let status = n.status.as_ref().expect("status");
        assert_eq!(status.ip, c.sim(&n.host).ip(j, &n.name), "{}", n.name);
        assert_eq!(status.state, ContainerState::Running as i32);
    }
    let gs_ip = c.sim("a").ip(j, "global-scheduler");
    let cs_ip = c.sim("a").ip(j, "central-scheduler");
    let ps_ip = c.sim("b").ip(j, "p-scheduler");
    let qs_ip = c.sim("c").ip(j, "q-scheduler");
    assert!(gs_ip.starts_with(&c.sim("a").subnet.to_string()[..7]));

    // Schedulers bind their own sandbox IP.
    let env = c.started_env(j, "a", "global-scheduler");
    assert_eq!(env["DMLC_PS_GLOBAL_ROOT_URI"], gs_ip);
    assert_eq!(
        c.started_env(j, "a", "central-scheduler")["DMLC_PS_ROOT_URI"],
        cs_ip
    );
    assert_eq!(
        c.started_env(j, "b", "p-scheduler")["DMLC_PS_ROOT_URI"],
        ps_ip
    );
    // The others get the schedulers' IPs, across hosts.
    let gsrv = c.started_env(j, "a", "global-server-0");
    assert_eq!(gsrv["DMLC_PS_GLOBAL_ROOT_URI"], gs_ip);
    assert_eq!(gsrv["DMLC_PS_ROOT_URI"], cs_ip);
    assert_eq!(
        c.started_env(j, "a", "master-worker")["DMLC_PS_ROOT_URI"],
        cs_ip
    );
    let psrv = c.started_env(j, "b", "p-server");
    assert_eq!(psrv["DMLC_PS_GLOBAL_ROOT_URI"], gs_ip);
    assert_eq!(psrv["DMLC_PS_ROOT_URI"], ps_ip);
    assert_eq!(
        c.started_env(j, "b", "p-worker-1")["DMLC_PS_ROOT_URI"],
        ps_ip
    );
    assert_eq!(
        c.started_env(j, "c", "q-worker-0")["DMLC_PS_ROOT_URI"],
        qs_ip
    );
    assert_eq!(
        c.started_env(j, "c", "q-server")["DMLC_PS_GLOBAL_ROOT_URI"],
        gs_ip
    );

    // Order: a server or worker starts only after every scheduler it registers with runs.
    let waits: [(&str, &[&str]); 7] = [
        (
            "global-server-0",
            &["global-scheduler", "central-scheduler"],
        ),
        ("master-worker", &["central-scheduler"]),
        ("p-server", &["global-scheduler", "p-scheduler"]),
        ("p-worker-0", &["p-scheduler"]),
        ("p-worker-1", &["p-scheduler"]),
        ("q-server", &["global-scheduler", "q-scheduler"]),
        ("q-worker-0", &["q-scheduler"]),
    ];
    for (n, schedulers) in waits {
        let started = c.happened(n, false).expect("started");
        for s in schedulers {
            let running = c.happened(s, true).expect("scheduler ran");
            assert!(
                started > running,
                "{n} started before its scheduler {s} ran"
            );
        }
    }
    // Schedulers start in parallel, as soon as their own IP is known.
    for s in [
        "global-scheduler",
        "central-scheduler",
        "p-scheduler",
        "q-scheduler",
    ] {
        let started = c.happened(s, false).expect("scheduler started");
        assert!(c.happened("p-worker-0", false).expect("worker started") > started);
    }

    // Specs carry what the agent needs.
    let spec = c
        .sim("b")
        .desired()
        .into_iter()
        .find(|s| s.node == "p-worker-0")
        .expect("spec");
    assert_eq!(spec.role, "worker");
    assert_eq!(spec.party, "p");
    assert_eq!(spec.image, IMAGE);
    assert!(!spec.host_network);
    assert_eq!(spec.generation, 0);
    assert!(spec.start);
    assert!(spec.progress_regex.is_empty(), "default progress parsing");
    assert!(spec.command.iter().any(|a| a == "--data-slice-idx"));
    // Nothing was recreated: specs never changed once started.
    assert_eq!(c.sims.values().map(Sim::recreated).sum::<u32>(), 0);

    let kinds: Vec<String> = c.events(j).await.into_iter().map(|e| e.kind).collect();
    for k in [
        "Submitted",
        "Placed",
        "SchedulersStarting",
        "SchedulersUp",
        "NodesStarting",
        "Running",
    ] {
        assert!(kinds.contains(&k.to_owned()), "{k} missing in {kinds:?}");
    }
    assert_eq!(kinds[0], "Submitted");
    assert_eq!(kinds.last().map(String::as_str), Some("Running"));
}

#[tokio::test]
async fn pending_sandboxes_get_no_start_until_ips_are_known() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    // Host c's agent does not report its sandboxes yet.
    c.sim("c").pause_reports();
    c.submit(ROUTED).await.expect("accepted");
    let job = c
        .wait("hips-test", Duration::from_secs(3), |j| {
            j.phase == JobPhase::Starting as i32
                && state_of(j, "p-worker-0") == ContainerState::Running as i32
        })
        .await;
    assert!(job.reason.contains("q-scheduler"), "{}", job.reason);
    let on_c = c.sim("c").desired();
    assert_eq!(on_c.len(), 3);
    assert!(
        on_c.iter().all(|s| !s.start && s.env.is_empty()),
        "{on_c:?}"
    );
    // Once c reports, the rest starts.
    c.sim("c").with(|s| s.reporting = true);
    c.wait_phase("hips-test", JobPhase::Running, Duration::from_secs(3))
        .await;
}

#[tokio::test]
async fn succeeds_when_training_workers_exit_zero_and_containers_go() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let j = "hips-test";
    // Progress and throughput are aggregated per node.
    for it in 1..=6u64 {
        for (h, n) in TRAINING {
            c.sim(h).progress(j, n, it * 2, 0.5 + it as f64 / 100.0);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let job = c
        .wait(j, Duration::from_secs(2), |j| {
            node(j, "p-worker-0").iterations_per_s > 0.0
        })
        .await;
    let w = node(&job, "p-worker-0");
    let p = w
        .status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .expect("progress");
    assert_eq!(p.iteration, 12);
    assert_eq!(p.epoch, 1);
    assert!((p.accuracy.unwrap_or_default() - 0.56).abs() < 1e-9);
    assert!(w.heartbeat_age_ms < 1000, "{}", w.heartbeat_age_ms);
    assert!(
        (4.0..=12.0).contains(&w.iterations_per_s),
        "about 8 it/s: {}",
        w.iterations_per_s
    );
    // A server exiting 0 early is not a failure.
    c.sim("c").exit(j, "q-server", 0, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.get(j).await.phase, JobPhase::Running as i32);

    // A watcher sees the end.
    let mut watch = c
        .jobs
        .clone()
        .watch_job(GetJobRequest { name: j.into() })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("ok").expect("a job");
    assert_eq!(first.phase, JobPhase::Running as i32);

    for (h, n) in TRAINING {
        c.sim(h).exit(j, n, 0, &["done"]);
    }
    for (h, n) in SHUTTING_DOWN.iter().filter(|(_, n)| *n != "q-server") {
        c.sim(h).exit(j, n, 0, &[]);
    }
    let job = c
        .wait_phase(j, JobPhase::Succeeded, Duration::from_secs(3))
        .await;
    assert_eq!(job.reason, "all 4 training workers exited 0");
    assert!(job.finished_at_ms > 0);
    c.wait_no_containers(j, Duration::from_secs(2)).await;

    let last = tokio::time::timeout(Duration::from_secs(3), async {
        let mut last = None;
        while let Some(j) = watch.message().await.expect("stream ok") {
            last = Some(j);
        }
        last
    })
    .await
    .expect("the watch ends with the job")
    .expect("messages");
    assert_eq!(last.phase, JobPhase::Succeeded as i32);

    let events = c.events(j).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains(&"NodeExited"));
    assert_eq!(kinds.last(), Some(&"Succeeded"));
    let listed = c
        .jobs
        .clone()
        .list_jobs(ListJobsRequest {})
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].nodes.is_empty());
    assert_eq!(listed[0].node_count, 11);
}

#[tokio::test]
async fn crashed_worker_fails_the_job_within_two_seconds() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let j = "hips-test";
    let crashed = Instant::now();
    c.sim("b").exit(
        j,
        "p-worker-1",
        3,
        &[
            "[Epoch 0][Iteration 5] Test Acc 0.5",
            "Traceback (most recent call last):",
            "RuntimeError: boom",
        ],
    );
    let job = c
        .wait_phase(j, JobPhase::Failed, Duration::from_secs(2))
        .await;
    let took = crashed.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let r = &job.reason;
    assert!(
        r.starts_with("node p-worker-1 (worker) on host b failed with exit code 3"),
        "{r}"
    );
    assert!(
        r.contains("RuntimeError: boom") && r.contains("Traceback"),
        "{r}"
    );
    // Every container of the job leaves every host's desired state at once.
    c.wait_no_containers(j, Duration::from_secs(1)).await;
    let w = node(&job, "p-worker-1").status.clone().expect("status");
    assert_eq!(w.state, ContainerState::Failed as i32);
    assert_eq!(w.exit_code, Some(3));
    assert_eq!(w.log_tail.len(), 3);

    let events = c.events(j).await;
    let failed = events
        .iter()
        .find(|e| e.kind == "NodeFailed")
        .expect("NodeFailed event");
    assert_eq!(failed.node, "p-worker-1");
    assert_eq!(failed.host, "b");
    assert!(
        failed.message.contains("exit code 3") && failed.message.contains("RuntimeError: boom")
    );
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("Failed"));
    // The name stays taken by the ended job until it is submitted again (allowed).
    let again = c
        .submit(ROUTED)
        .await
        .expect("a finished name may be reused");
    assert_eq!(again.phase, JobPhase::Pending as i32);
    assert_eq!(again.restarts, 0);
    // The first run's history is kept under NAME#1.
    let old = c.get("hips-test#1").await;
    assert_eq!(old.phase, JobPhase::Failed as i32);
    let old_events = c.events("hips-test#1").await;
    assert_eq!(old_events.last().map(|e| e.kind.as_str()), Some("Failed"));
    let new_events = c.events("hips-test").await;
    assert_eq!(new_events[0].kind, "Submitted");
    assert!(new_events[0].message.starts_with("run 2 of hips-test"));
}

#[tokio::test]
async fn stalled_worker_fails_after_stall_timeout() {
    let c = Cluster::start_with(
        &["a", "b", "c"],
        JobOptions {
            stall_timeout_override: Some(Duration::from_millis(1200)),
            ..options()
        },
    )
    .await;
    running_routed(&c).await;
    let j = "hips-test";
    let since = Instant::now();
    // Everyone progresses, except p-worker-0 after its first iteration.
    c.sim("b").progress(j, "p-worker-0", 1, 0.1);
    let progressing = async {
        for it in 1..100u64 {
            for (h, n) in TRAINING {
                if n != "p-worker-0" {
                    c.sim(h).try_progress(j, n, it, 0.2);
                }
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    let job = tokio::select! {
        job = c.wait_phase(j, JobPhase::Failed, Duration::from_secs(4)) => job,
        () = progressing => panic!("not failed"),
    };
    let took = since.elapsed();
    assert!(took >= Duration::from_millis(1200), "too early: {took:?}");
    assert!(took < Duration::from_secs(3), "too late: {took:?}");
    assert!(
        job.reason
            .starts_with("node p-worker-0 (worker) on host b stalled: no progress for"),
        "{}",
        job.reason
    );
    assert!(job.reason.contains("iteration 1"), "{}", job.reason);
    let kinds: Vec<String> = c.events(j).await.into_iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&"Stalled".to_owned()), "{kinds:?}");
    c.wait_no_containers(j, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn restart_on_failure_starts_a_new_generation() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    let j = "hips-test";
    c.submit(&routed_with_policy(
        "restart = \"on-failure\"\nmax_restarts = 2",
    ))
    .await
    .expect("accepted");
    let before = c
        .wait_phase(j, JobPhase::Running, Duration::from_secs(5))
        .await;
    assert_eq!(before.max_restarts, 2);
    c.sim("c").exit(j, "q-worker-0", 7, &["oops"]);
    let job = c
        .wait(j, Duration::from_secs(5), |j| {
            j.generation == 1 && j.phase == JobPhase::Running as i32
        })
        .await;
    assert_eq!(job.restarts, 1);
    // Every container is of the new generation and started again.
    for s in c.sims.values() {
        let specs = s.desired();
        assert!(!specs.is_empty());
        assert!(
            specs.iter().all(|c| c.generation == 1 && c.start),
            "{specs:?}"
        );
    }
    let kinds: Vec<String> = c.events(j).await.into_iter().map(|e| e.kind).collect();
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap_or(usize::MAX);
    assert!(pos("NodeFailed") < pos("Restarting"));
    assert!(pos("Restarting") < pos("Restarted"));
    assert!(
        kinds.iter().filter(|k| *k == "Running").count() == 2,
        "{kinds:?}"
    );
    let restarting = c
        .events(j)
        .await
        .into_iter()
        .find(|e| e.kind == "Restarting")
        .expect("event");
    // the whole reason: node, host, exit code and log tail
    assert!(
        restarting.message.starts_with(
            "restart 1 of 2 after: node q-worker-0 (worker) on host c failed with exit code 7"
        ) && restarting.message.ends_with("last log lines:\n  oops"),
        "{}",
        restarting.message
    );
    assert_eq!(restarting.generation, 0);
}

#[tokio::test]
async fn lost_host_fails_the_job_naming_the_host() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let j = "hips-test";
    let cut = Instant::now();
    c.sim("c").pause_reports();
    let job = c
        .wait_phase(j, JobPhase::Failed, GRACE + Duration::from_secs(2))
        .await;
    assert!(cut.elapsed() >= GRACE - Duration::from_millis(100));
    assert!(job.reason.starts_with("host c was lost"), "{}", job.reason);
    assert!(job.reason.contains("q-worker-0"), "{}", job.reason);
    let lost = c
        .events(j)
        .await
        .into_iter()
        .find(|e| e.kind == "HostLost")
        .expect("HostLost event");
    assert_eq!(lost.host, "c");
    c.wait_no_containers(j, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_agent_that_has_not_adopted_its_containers_yet_loses_no_node_nor_image() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let j = "hips-test";
    // the agents of a and b restarted while their Docker is slow: they report (the hosts
    // live) but know no container and no image yet, for several grace periods
    for h in ["a", "b"] {
        c.sim(h).with(|s| s.nodes_unknown = true);
    }
    tokio::time::sleep(GRACE * 3).await;
    let job = c.get(j).await;
    assert_eq!(job.phase, JobPhase::Running as i32, "{}", job.reason);
    for h in ["a", "b"] {
        let host = c.lab.host(h).await;
        assert_eq!(host.state, "ready");
        assert!(host.images.contains(&IMAGE.to_owned()), "{:?}", host.images);
    }
    // the last known images of a stand: a job there is not refused for a missing image
    c.submit(&pseudo("pj", 9500, ""))
        .await
        .expect("accepted on a");
    // adopted: everything reported again, nothing happened
    for h in ["a", "b"] {
        c.sim(h).with(|s| s.nodes_unknown = false);
    }
    tokio::time::sleep(GRACE * 2).await;
    let job = c.get(j).await;
    assert_eq!(job.phase, JobPhase::Running as i32, "{}", job.reason);
    let kinds: Vec<String> = c.events(j).await.into_iter().map(|e| e.kind).collect();
    assert!(
        !kinds
            .iter()
            .any(|k| ["NodeMissing", "NodeFailed", "Failed", "HostLost"].contains(&k.as_str())),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn rm_removes_an_ended_job_and_refuses_an_active_one() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let j = "hips-test";
    let rm = |name: &str| {
        let jobs = c.jobs.clone();
        let name = name.to_owned();
        async move {
            jobs.clone()
                .remove_job(geomx_proto::v1::RemoveJobRequest { name })
                .await
        }
    };
    let err = rm(j).await.expect_err("active");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("cancel it first"), "{err}");
    c.jobs
        .clone()
        .cancel_job(CancelJobRequest { name: j.into() })
        .await
        .expect("cancel");
    let answer = rm(j).await.expect("removed").into_inner();
    assert_eq!(answer.runs, 1);
    // the sims serve no agent API: the hosts are named as not reached
    assert_eq!(answer.unreachable.len(), 3, "{answer:?}");
    let err = c
        .jobs
        .clone()
        .get_job(GetJobRequest { name: j.into() })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(rm(j).await.expect_err("twice").code(), Code::NotFound);
    // the name is free again, from run 1, without the old run's events
    let job = c.submit(ROUTED).await.expect("accepted again");
    assert_eq!(job.name, j);
    let kinds: Vec<String> = c.events(j).await.into_iter().map(|e| e.kind).collect();
    assert!(!kinds.iter().any(|k| k == "Cancelled"), "{kinds:?}");
    let err = c
        .jobs
        .clone()
        .get_job(GetJobRequest {
            name: format!("{j}#2"),
        })
        .await
        .expect_err("no run 2");
    assert_eq!(err.code(), Code::NotFound);
}

/// Hosts a, b, c with a `job_retention` of 300 ms.
async fn retention_cluster() -> Cluster {
    Cluster::start_with(
        &["a", "b", "c"],
        JobOptions {
            job_retention: Some(Duration::from_millis(300)),
            ..options()
        },
    )
    .await
}

#[tokio::test]
async fn ended_jobs_are_removed_after_job_retention() {
    let c = retention_cluster().await;
    running_routed(&c).await;
    let j = "hips-test";
    c.jobs
        .clone()
        .cancel_job(CancelJobRequest { name: j.into() })
        .await
        .expect("cancel");
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = c
                .jobs
                .clone()
                .get_job(GetJobRequest { name: j.into() })
                .await;
            if r.as_ref().is_err_and(|s| s.code() == Code::NotFound) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the ended job is still there after job_retention"
    );
    // its records (run, plan, nodes) and events are gone from the store too
    let store = c.lab.controller().membership().store();
    let left = |tree, prefix: &str| {
        store
            .keys_with_prefix(tree, prefix.as_bytes())
            .expect("scan")
            .len()
    };
    assert_eq!(left(TreeId::Jobs, &format!("run/{j}/")), 0);
    assert_eq!(left(TreeId::Jobs, &format!("current/{j}")), 0);
    let scope = format!("{j}#1");
    assert!(
        store
            .event_keys(EventScope::Job(&scope))
            .expect("scan")
            .is_empty()
    );
}

#[tokio::test]
async fn earlier_runs_of_a_name_are_removed_after_job_retention() {
    let c = retention_cluster().await;
    let j = "hips-test";
    running_routed(&c).await;
    c.jobs
        .clone()
        .cancel_job(CancelJobRequest { name: j.into() })
        .await
        .expect("cancel");
    // run 2 of the same name, still running when run 1 is past job_retention
    running_routed(&c).await;
    let store = c.lab.controller().membership().store();
    let run1 = format!("run/{j}/{:010}/", 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store
        .keys_with_prefix(TreeId::Jobs, run1.as_bytes())
        .expect("scan")
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "run 1 is still stored after job_retention"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        store
            .event_keys(EventScope::Job(&format!("{j}#1")))
            .expect("scan")
            .is_empty(),
        "run 1's events are still stored"
    );
    let err = c
        .jobs
        .clone()
        .get_job(GetJobRequest {
            name: format!("{j}#1"),
        })
        .await
        .expect_err("run 1 removed");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let run2 = c
        .jobs
        .clone()
        .get_job(GetJobRequest { name: j.into() })
        .await
        .expect("run 2 stays")
        .into_inner();
    assert_eq!(run2.phase, JobPhase::Running as i32);
    assert!(!c.events(j).await.is_empty(), "run 2 keeps its events");
}

#[tokio::test]
async fn cancel_removes_every_container_at_once() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let j = "hips-test";
    let asked = Instant::now();
    let job = c
        .jobs
        .clone()
        .cancel_job(CancelJobRequest { name: j.into() })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(job.phase, JobPhase::Cancelled as i32);
    c.wait_no_containers(j, Duration::from_secs(1)).await;
    assert!(asked.elapsed() < Duration::from_secs(1));
    // The sims removed their containers.
    for s in c.sims.values() {
        assert!(s.node(j, "p-worker-0").is_none());
    }
    let kinds: Vec<String> = c.events(j).await.into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.last().map(String::as_str), Some("Cancelled"));
    // Cancelling again changes nothing; unknown jobs are NOT_FOUND.
    let again = c
        .jobs
        .clone()
        .cancel_job(CancelJobRequest { name: j.into() })
        .await
        .expect("cancel twice")
        .into_inner();
    assert_eq!(again.phase, JobPhase::Cancelled as i32);
    let err = c
        .jobs
        .clone()
        .cancel_job(CancelJobRequest {
            name: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn controller_restart_keeps_the_job_running_with_identical_specs() {
    let mut c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let j = "hips-test";
    let before: BTreeMap<String, Vec<ContainerSpec>> = c
        .sims
        .iter()
        .map(|(h, s)| (h.clone(), s.desired()))
        .collect();
    let states_before: BTreeMap<String, usize> = c
        .sims
        .iter()
        .map(|(h, s)| (h.clone(), s.state.lock().unwrap().states))
        .collect();
    for s in c.sims.values_mut() {
        s.stop();
    }
    c.lab.restart().await;
    // The job is back from sled, Running with all its nodes, before any agent reported.
    c.jobs = c.lab.user_jobs(&c.lab.pki.token).await;
    let job = c.get(j).await;
    assert_eq!(job.phase, JobPhase::Running as i32);
    assert_eq!(job.nodes.len(), 11);
    // Reports only come after a while: no failure for that.
    tokio::time::sleep(GRACE / 2).await;
    assert_eq!(c.get(j).await.phase, JobPhase::Running as i32);
    let lab = &c.lab;
    for s in c.sims.values_mut() {
        s.reconnect(lab).await;
    }
    // Every agent gets byte-identical container specs: nothing is recreated.
    for (h, s) in &c.sims {
        let deadline = Instant::now() + Duration::from_secs(2);
        while s.state.lock().unwrap().states == states_before[h] {
            assert!(Instant::now() < deadline, "no desired state for {h}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.desired(), before[h], "specs of host {h} changed");
        assert_eq!(s.recreated(), 0);
    }
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
    let job = c.get(j).await;
    assert_eq!(job.phase, JobPhase::Running as i32, "{}", job.reason);
    assert_eq!(job.running_nodes, 11);
    assert!(job.nodes.iter().all(|n| n.heartbeat_age_ms < 1000));
    // And it still ends normally.
    for (h, n) in TRAINING.iter().chain(&SHUTTING_DOWN) {
        c.sim(h).exit(j, n, 0, &[]);
    }
    c.wait_phase(j, JobPhase::Succeeded, Duration::from_secs(3))
        .await;
}

#[tokio::test]
async fn refusals_happen_before_anything_starts() {
    let c = Cluster::start(&["a", "b"]).await;
    // Host c is not registered.
    let err = c.submit(ROUTED).await.expect_err("unknown host");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("host c (nodes q-scheduler, q-server, q-worker-0) is not registered"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("nothing was started"));

    // Host c registered but lost.
    let mut cc = lab_agent(&c.lab, "c").await;
    register(&mut cc, "c").await;
    cc.report(HostReport {
        images: vec![IMAGE.into()],
        ..report("c")
    })
    .await
    .expect("report");
    let deadline = Instant::now() + GRACE + Duration::from_secs(2);
    while c.lab.host("c").await.state != "lost" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = c.submit(ROUTED).await.expect_err("lost host");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("host c (nodes q-scheduler"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("is lost: no heartbeat for"),
        "{}",
        err.message()
    );

    // An image missing on a host, and the job may not pull it.
    let other_image = ROUTED.replace(
        "image = \"geomx/test:1\"",
        "image = \"geomx/other:2\"\nimage_pull = \"never\"",
    );
    let err = c.submit(&other_image).await.expect_err("image");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(
            "image geomx/other:2 is not present on host a and the job's image_pull is \"never\""
        ),
        "{}",
        err.message()
    );
    assert!(err.message().contains("on host b"));
    // It may pull, but no agent can resolve it (these hosts' agents serve no API): nothing
    // is stored, the error names every host asked.
    let pulling = ROUTED
        .replace("geomx/test:1", "geomx/other:2")
        .replace("hosts = [\"c\"]", "hosts = [\"a\"]");
    let err = c.submit(&pulling).await.expect_err("unresolvable");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message()
            .contains("image geomx/other:2 cannot be resolved to a digest")
            && err.message().contains("on host a: ")
            && err.message().contains("on host b: "),
        "{}",
        err.message()
    );

    // Pseudo: a scheduler port already listening on the host.
    c.sim("a").with(|s| s.listening_ports = vec![22, 9500]);
    tokio::time::sleep(HEARTBEAT * 2).await;
    let err = c.submit(&pseudo("pj", 9500, "")).await.expect_err("port");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("port 9500 of node p-scheduler is already in use on host a"),
        "{}",
        err.message()
    );
    // Pseudo: a port bound by another active pseudo job.
    c.submit(&pseudo("pj1", 9600, ""))
        .await
        .expect("first pseudo job");
    let err = c
        .submit(&pseudo("pj2", 9600, ""))
        .await
        .expect_err("taken by pj1");
    assert!(
        err.message().contains(
            "port 9600 of node p-scheduler on host a is bound by node p-scheduler of active job pj1"
        ),
        "{}",
        err.message()
    );
    // A duplicate active name.
    let err = c
        .submit(&pseudo("pj1", 9700, ""))
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("job pj1 is already"),
        "{}",
        err.message()
    );
    // An invalid file: every problem, with file:line:col.
    let bad = "name = \"Bad\"\nmode = \"hips\"\nimage = \"i\"\n[central]\nhost = \"a\"\n[[party]]\nname = \"p\"\nhosts = [\"b\"]\nworkers = 0\n";
    let err = c.submit(bad).await.expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    let msg = err.message();
    assert!(msg.contains("test.toml:1:8: job name \"Bad\""), "{msg}");
    assert!(msg.contains("test.toml:9:11:"), "{msg}");
    assert!(
        msg.ends_with("test.toml: 2 problems found, nothing submitted"),
        "{msg}"
    );

    // Nothing of the refused jobs exists anywhere.
    let listed = c
        .jobs
        .clone()
        .list_jobs(ListJobsRequest {})
        .await
        .expect("list")
        .into_inner()
        .jobs;
    let names: Vec<&str> = listed.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["pj1"]);
    for s in c.sims.values() {
        assert!(s.desired().iter().all(|c| c.job == "pj1"));
    }
    // The pseudo job itself ran with host networking and 127.0.0.1.
    let job = c
        .wait_phase("pj1", JobPhase::Running, Duration::from_secs(3))
        .await;
    assert_eq!(job.node_count, 4);
    let specs = c.sim("a").desired();
    assert!(specs.iter().all(|s| s.host_network));
    assert!(
        specs
            .iter()
            .all(|s| s.env["DMLC_PS_ROOT_URI"] == "127.0.0.1")
    );
    // Schedulers first in pseudo too.
    let sched = c.happened("p-scheduler", true).expect("ran");
    assert!(c.happened("p-worker-0", false).expect("started") > sched);
}

async fn lab_agent(lab: &Lab, host: &str) -> AgentServiceClient<Channel> {
    lab.agent(host).await
}

// ---------------------------------------------------------------------------------------
// NodeLogs through a fake agent API.

#[derive(Clone, Default)]
struct FakeAgentApi {
    seen: Arc<Mutex<Vec<NodeLogsRequest>>>,
    resolved: Arc<Mutex<Vec<String>>>,
    pulled: Arc<Mutex<Vec<String>>>,
    /// Host paths that exist (for CheckBindSources); any other is missing.
    paths: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// Paths refused (they lead where no bind mount may go), with the agent's reason.
    refused: Arc<Mutex<BTreeMap<String, String>>>,
    /// The paths of every CheckBindSources call.
    bind_checks: Arc<Mutex<Vec<Vec<String>>>>,
}

#[tonic::async_trait]
impl AgentNodeService for FakeAgentApi {
    type LogsStream = futures::stream::BoxStream<'static, Result<LogChunk, Status>>;

    async fn logs(
        &self,
        request: Request<NodeLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        require_controller(&request)?;
        let req = request.into_inner();
        if req.node == "nope" {
            return Err(Status::not_found("no such container"));
        }
        self.seen.lock().unwrap().push(req.clone());
        let chunks = vec![
            Ok(LogChunk {
                lines: vec![format!("hello from {}", req.node), "line 2".into()],
                stderr: false,
            }),
            Ok(LogChunk {
                lines: vec!["warning".into()],
                stderr: true,
            }),
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn forget_job(
        &self,
        request: Request<geomx_proto::v1::ForgetJobRequest>,
    ) -> Result<Response<geomx_proto::v1::ForgetJobResponse>, Status> {
        require_controller(&request)?;
        Ok(Response::new(geomx_proto::v1::ForgetJobResponse {
            had_logs: true,
        }))
    }

    /// As an agent's Docker answers for the lab registry `reg:5000`: `geomx/test:moved`
    /// resolves to one digest, `geomx/test:nope` is not found, `private/x` refuses the
    /// host's credentials.
    async fn resolve_image(
        &self,
        request: Request<geomx_proto::v1::ResolveImageRequest>,
    ) -> Result<Response<geomx_proto::v1::ResolveImageResponse>, Status> {
        require_controller(&request)?;
        let image = request.into_inner().image;
        self.resolved.lock().unwrap().push(image.clone());
        match image.as_str() {
            "reg:5000/geomx/test:moved" => {
                Ok(Response::new(geomx_proto::v1::ResolveImageResponse {
                    pinned: format!("reg:5000/geomx/test@{MOVED_DIGEST}"),
                    digest: MOVED_DIGEST.into(),
                    registry: "reg:5000".into(),
                }))
            }
            "reg:5000/private/x:1" => Err(Status::permission_denied(
                "image reg:5000/private/x:1 on registry reg:5000: unauthorized (no basic auth credentials)",
            )),
            _ => Err(Status::not_found(format!(
                "image {image} on registry reg:5000: not found (manifest unknown)"
            ))),
        }
    }

    async fn pull_image(
        &self,
        request: Request<geomx_proto::v1::AgentPullRequest>,
    ) -> Result<Response<geomx_proto::v1::AgentPullResponse>, Status> {
        require_controller(&request)?;
        self.pulled.lock().unwrap().push(request.into_inner().image);
        Ok(Response::new(geomx_proto::v1::AgentPullResponse {
            started: true,
        }))
    }

    /// As the agent's filesystem answers: [`FakeAgentApi::paths`] exist, the
    /// [`FakeAgentApi::refused`] ones lead into /etc, any other is missing.
    async fn check_bind_sources(
        &self,
        request: Request<geomx_proto::v1::CheckBindSourcesRequest>,
    ) -> Result<Response<geomx_proto::v1::CheckBindSourcesResponse>, Status> {
        require_controller(&request)?;
        let paths = request.into_inner().paths;
        self.bind_checks.lock().unwrap().push(paths.clone());
        let existing = self.paths.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        let sources = paths
            .into_iter()
            .map(|path| {
                let (state, reason) = match refused.get(&path) {
                    Some(why) => ("refused", why.clone()),
                    None if existing.contains(&path) => ("exists", String::new()),
                    None => ("missing", String::new()),
                };
                geomx_proto::v1::BindSourceCheck {
                    path,
                    state: state.into(),
                    reason,
                }
            })
            .collect();
        Ok(Response::new(geomx_proto::v1::CheckBindSourcesResponse {
            sources,
        }))
    }
}

/// A cluster of `hosts` whose agents are each a [`FakeAgentApi`] of its own (served until
/// the handles are aborted or the test ends).
async fn cluster_with_fake_agents(
    hosts: &[&str],
) -> (Cluster, BTreeMap<String, FakeAgentApi>, Vec<JoinHandle<()>>) {
    let lab = Lab::start_with_jobs(options()).await;
    let journal: Journal = Arc::default();
    let mut sims = BTreeMap::new();
    let mut fakes = BTreeMap::new();
    let mut servers = Vec::new();
    for h in hosts {
        let fake = FakeAgentApi::default();
        let (url, server) = serve_fake_agent(&lab, &fake).await;
        servers.push(server);
        sims.insert(
            (*h).to_owned(),
            Sim::start_with(&lab, h, &journal, Some(url)).await,
        );
        fakes.insert((*h).to_owned(), fake);
    }
    let jobs = lab.user_jobs(&lab.pki.token).await;
    let c = Cluster {
        lab,
        journal,
        sims,
        jobs,
    };
    (c, fakes, servers)
}

/// The digest [`FakeAgentApi`] resolves `reg:5000/geomx/test:moved` to.
const MOVED_DIGEST: &str =
    "sha256:4747474747474747474747474747474747474747474747474747474747474747";

/// Serves `fake` as the AgentNodeService of an agent on 127.0.0.1, with a certificate of
/// the lab CA, requiring the controller's client certificate; its URL.
async fn serve_fake_agent(lab: &Lab, fake: &FakeAgentApi) -> (String, JoinHandle<()>) {
    let ca = CertificateAuthority::load(&lab.pki.dir).expect("lab CA");
    let issued = ca
        .issue_agent("a", "127.0.0.1".parse().expect("ip"), &[], 30)
        .expect("agent cert");
    let tls = TlsMaterial::from_pem(ca.cert_pem().as_bytes(), issued.cert_pem, issued.key_pem)
        .expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .tls_config(tls.server_config_client_required())
        .expect("tls config")
        .add_service(AgentNodeServiceServer::new(fake.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let task = tokio::spawn(async move {
        let _ = server.await;
    });
    (format!("https://127.0.0.1:{}", addr.port()), task)
}

/// A job whose image is on no host: the controller resolves the tag once through an
/// agent, pins every node to that digest, holds the job in Pulling (no sandbox, no start)
/// with the hosts' pull progress in its status, and starts it once every host has the
/// digest. What the registry refuses is refused at submit, naming host, image and cause.
#[tokio::test]
async fn an_image_on_no_host_is_pinned_pulled_then_started() {
    let lab = Lab::start_with_jobs(options()).await;
    let fake = FakeAgentApi::default();
    let (url, server) = serve_fake_agent(&lab, &fake).await;
    let journal: Journal = Arc::default();
    let mut sims = BTreeMap::new();
    for h in ["a", "b", "c"] {
        sims.insert(
            h.to_owned(),
            Sim::start_with(&lab, h, &journal, Some(url.clone())).await,
        );
    }
    let jobs = lab.user_jobs(&lab.pki.token).await;
    let c = Cluster {
        lab,
        journal,
        sims,
        jobs,
    };
    let pinned = format!("reg:5000/geomx/test@{MOVED_DIGEST}");
    let toml = ROUTED.replace(IMAGE, "reg:5000/geomx/test:moved");
    let job = c.submit(&toml).await.expect("accepted");
    assert_eq!(job.phase, JobPhase::Pulling as i32, "{}", job.reason);
    assert_eq!(job.image, "reg:5000/geomx/test:moved");
    assert_eq!(job.image_digest, pinned);
    assert_eq!(job.image_pull, "if-not-present");
    assert_eq!(
        fake.resolved.lock().unwrap().as_slice(),
        ["reg:5000/geomx/test:moved"],
        "resolved once, through one agent"
    );
    // every host gets the pinned reference, may pull it, and nothing starts
    for s in c.sims.values() {
        let specs = s.desired();
        assert!(!specs.is_empty());
        assert!(specs.iter().all(|sp| sp.image == pinned
            && sp.image_pull == "if-not-present"
            && sp.pull_timeout_ms == 30 * 60 * 1000
            && !sp.sandbox
            && !sp.start));
    }
    // a and c have it; b reports progress, then has it too
    for h in ["a", "c"] {
        c.sim(h).with(|s| s.images.push(pinned.clone()));
    }
    c.sim("b").with(|s| {
        s.pulls = vec![geomx_proto::v1::ImagePull {
            image: pinned.clone(),
            state: "pulling".into(),
            bytes_done: 10 << 20,
            bytes_total: 40 << 20,
            registry: "reg:5000".into(),
            ..Default::default()
        }]
    });
    let job = c
        .wait("hips-test", Duration::from_secs(5), |j| {
            j.pulls
                .iter()
                .any(|p| p.host == "b" && p.pull.as_ref().is_some_and(|p| p.bytes_done == 10 << 20))
        })
        .await;
    assert_eq!(job.phase, JobPhase::Pulling as i32);
    assert!(
        job.reason.contains("pulling image")
            && job.reason.contains("b (pulling 10.0 MiB of 40.0 MiB (25%)"),
        "{}",
        job.reason
    );
    assert!(
        c.sims
            .values()
            .all(|s| s.desired().iter().all(|sp| !sp.start))
    );
    c.sim("b").with(|s| {
        s.images.push(pinned.clone());
        s.pulls[0].state = "done".into();
        s.pulls[0].bytes_done = 40 << 20;
    });
    let job = c
        .wait_phase("hips-test", JobPhase::Running, Duration::from_secs(10))
        .await;
    assert!(
        job.nodes
            .iter()
            .all(|n| n.host != "b" || n.status.is_some())
    );
    let events = c
        .jobs
        .clone()
        .job_events(JobEventsRequest {
            name: "hips-test".into(),
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    for kind in ["ImageResolved", "Pulling", "Pulled"] {
        assert!(kinds.contains(&kind), "{kinds:?}");
    }
    let resolved = events
        .iter()
        .find(|e| e.kind == "ImageResolved")
        .expect("event");
    assert!(
        resolved.message.contains(&pinned) && resolved.message.contains("reg:5000"),
        "{}",
        resolved.message
    );

    // refused at submit, nothing stored: a tag the registry does not have, credentials it
    // refuses
    for (image, code, words) in [
        (
            "reg:5000/geomx/test:nope",
            Code::NotFound,
            "not found (manifest unknown)",
        ),
        (
            "reg:5000/private/x:1",
            Code::PermissionDenied,
            "unauthorized",
        ),
    ] {
        let toml = ROUTED.replace("hips-test", "refused").replace(IMAGE, image);
        let err = c.submit(&toml).await.expect_err("refused");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        let m = err.message();
        assert!(
            m.contains(&format!("image {image} cannot be resolved"))
                && m.contains("on host ")
                && m.contains(words)
                && m.contains("nothing was started"),
            "{code:?}: {m}"
        );
    }
    let listed = c
        .jobs
        .clone()
        .list_jobs(ListJobsRequest {})
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert!(listed.iter().all(|j| j.name != "refused"));
    server.abort();
}

/// Submits a pseudo job `logs-<host>` on `host` and asks for a worker's logs, which fails.
async fn logs_on(jobs: &UserJobs, host: &str, port: u16) -> Status {
    let toml = pseudo(&format!("logs-{host}"), port, "")
        .replace("hosts = [\"a\"]", &format!("hosts = [\"{host}\"]"));
    jobs.clone()
        .submit_job(SubmitJobRequest {
            job_toml: toml,
            file_name: format!("{host}.toml"),
        })
        .await
        .expect("accepted");
    jobs.clone()
        .node_logs(UserLogsRequest {
            job: format!("logs-{host}"),
            node: "p-worker-0".into(),
            ..Default::default()
        })
        .await
        .expect_err("the agent cannot be asked")
}

#[tokio::test]
async fn node_logs_are_proxied_from_the_agent_with_mtls() {
    let lab = Lab::start_with_jobs(options()).await;
    let fake = FakeAgentApi::default();
    let (url, server) = serve_fake_agent(&lab, &fake).await;
    let journal: Journal = Arc::default();
    let _a = Sim::start_with(&lab, "a", &journal, Some(url)).await;
    // Host b's agent is unreachable.
    let _b = Sim::start_with(&lab, "b", &journal, Some("https://127.0.0.1:1".into())).await;
    let jobs = lab.user_jobs(&lab.pki.token).await;
    jobs.clone()
        .submit_job(SubmitJobRequest {
            job_toml: pseudo("logs", 9800, ""),
            file_name: "logs.toml".into(),
        })
        .await
        .expect("accepted");

    let mut stream = jobs
        .clone()
        .node_logs(UserLogsRequest {
            job: "logs".into(),
            node: "p-worker-1".into(),
            follow: true,
            tail: 20,
            generation: None,
        })
        .await
        .expect("logs")
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.expect("stream ok") {
        chunks.push(chunk);
    }
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].lines, ["hello from p-worker-1", "line 2"]);
    assert!(chunks[1].stderr);
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [NodeLogsRequest {
            job: "logs".into(),
            node: "p-worker-1".into(),
            follow: true,
            tail: 20,
            generation: None,
        }]
    );

    // Errors: unknown node, unknown job, the agent's own NOT_FOUND.
    let err = jobs
        .clone()
        .node_logs(UserLogsRequest {
            job: "logs".into(),
            node: "x-worker-9".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), Code::NotFound);
    let err = jobs
        .clone()
        .node_logs(UserLogsRequest {
            job: "nojob".into(),
            node: "p-worker-0".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown job");
    assert_eq!(err.code(), Code::NotFound);

    // An unreachable agent: UNAVAILABLE, naming host and URL.
    let err = logs_on(&jobs, "b", 9801).await;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message()
            .contains("cannot reach the agent of host b at https://127.0.0.1:1"),
        "{}",
        err.message()
    );

    // An agent that registered a plaintext URL is never called from a TLS cluster.
    let _c = Sim::start_with(&lab, "c", &journal, Some("http://127.0.0.1:1".into())).await;
    let err = logs_on(&jobs, "c", 9802).await;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("registered a plaintext http:// URL"),
        "{}",
        err.message()
    );
    server.abort();
}

/// Heartbeat aggregation cost: reports of 1000 running nodes straight into the jobs layer
/// (no gRPC). Run with `cargo test --release -p geomx-controller --test jobs -- --ignored
/// --nocapture heartbeat_throughput`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn heartbeat_throughput() {
    use geomx_controller::workloads::Workloads;
    let c = Cluster::start(&["a", "b"]).await;
    let toml = r#"
name = "big"
mode = "ps"
image = "geomx/test:1"
[[party]]
name = "p"
hosts = ["b"]
workers = 1000
"#;
    c.submit(toml).await.expect("accepted");
    c.wait_phase("big", JobPhase::Running, Duration::from_secs(20))
        .await;
    c.sims["b"].pause_reports();
    let jobs = c.lab.controller().jobs().expect("jobs layer").clone();
    let base = c.sims["b"].report();
    let rounds = 200u64;
    let started = Instant::now();
    for r in 0..rounds {
        let mut report = base.clone();
        for n in &mut report.nodes {
            n.progress = Some(Progress {
                iteration: r,
                observed_at_ms: r as i64,
                ..Default::default()
            });
        }
        jobs.host_reported("b", &report).await.expect("report");
    }
    let took = started.elapsed();
    let per_s = (rounds * 1002) as f64 / took.as_secs_f64();
    println!(
        "{} node heartbeats in {took:?}: {per_s:.0}/s",
        rounds * 1002
    );
    assert_eq!(c.get("big").await.phase, JobPhase::Running as i32);
}

/// The job of [`mounts_and_limits_reach_the_desired_state_expanded_per_node`]'s first
/// mount: every worker binds `/srv/geomx/<party>` (p on b, q on c).
const PARTY_DATA: &str = r#"
[[mount]]
type = "bind"
source = "/srv/geomx/{party}"
target = "/root/data"
roles = ["workers"]
"#;

/// Nothing of job hips-test is recorded or placed: not listed, not found, no host has a
/// container of it in its desired state.
async fn nothing_recorded(c: &Cluster) {
    let listed = c
        .jobs
        .clone()
        .list_jobs(ListJobsRequest {})
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert!(listed.iter().all(|j| j.name != "hips-test"), "{listed:?}");
    let err = c
        .jobs
        .clone()
        .get_job(GetJobRequest {
            name: "hips-test".into(),
        })
        .await
        .expect_err("no such job");
    assert_eq!(err.code(), Code::NotFound);
    for s in c.sims.values() {
        assert!(s.desired().is_empty(), "placed on {}", s.host);
    }
}

/// Issue 10: a bind source missing on a host is refused at submit, naming host and path
/// (every host with bind mounts is asked through its agent, at once), with nothing
/// recorded or placed; so is a path that leads where no bind mount may go, and a job
/// whose host's agent cannot be asked. (With the paths there the job is accepted:
/// [`mounts_and_limits_reach_the_desired_state_expanded_per_node`].)
#[tokio::test]
async fn a_missing_bind_source_is_refused_at_submit_naming_host_and_path() {
    let (c, fakes, servers) = cluster_with_fake_agents(&["a", "b", "c"]).await;
    fakes["b"]
        .paths
        .lock()
        .unwrap()
        .insert("/srv/geomx/p".into());
    let job = format!("{ROUTED}{PARTY_DATA}");
    let err = c.submit(&job).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let m = err.message();
    assert!(
        m.contains("job hips-test cannot be placed, nothing was started")
            && m.contains("on host c: bind source /srv/geomx/q does not exist"),
        "{m}"
    );
    assert!(!m.contains("on host b"), "b has its source: {m}");
    // each host was asked about its own paths only; a (the master) binds nothing
    assert_eq!(
        fakes["b"].bind_checks.lock().unwrap().as_slice(),
        [vec!["/srv/geomx/p".to_owned()]]
    );
    assert_eq!(
        fakes["c"].bind_checks.lock().unwrap().as_slice(),
        [vec!["/srv/geomx/q".to_owned()]]
    );
    assert!(fakes["a"].bind_checks.lock().unwrap().is_empty());
    nothing_recorded(&c).await;

    // a path whose symlink leads into /etc: the agent's reason
    let why = "bind mount source /srv/geomx/q resolves to /etc/ssl, which lies in /etc, which is refused for bind mounts: refused";
    fakes["c"]
        .refused
        .lock()
        .unwrap()
        .insert("/srv/geomx/q".into(), why.into());
    let err = c.submit(&job).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&format!("on host c: {why}")),
        "{}",
        err.message()
    );
    nothing_recorded(&c).await;
    fakes["c"].refused.lock().unwrap().clear();

    // an agent that cannot be asked: refused naming its host (c's agent API is gone: its
    // listener is closed once the aborted task has ended)
    let mut servers = servers;
    let c_server = servers.pop().expect("c's agent API");
    c_server.abort();
    assert!(c_server.await.is_err_and(|e| e.is_cancelled()));
    let err = c.submit(&job).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("on host c: cannot check the bind sources /srv/geomx/q")
            && err.message().contains("cannot reach the agent of host c"),
        "{}",
        err.message()
    );
    nothing_recorded(&c).await;
}

#[tokio::test]
async fn mounts_and_limits_reach_the_desired_state_expanded_per_node() {
    let (c, fakes, _servers) = cluster_with_fake_agents(&["a", "b", "c"]).await;
    for (host, path) in [("b", "/srv/geomx/p"), ("c", "/srv/geomx/q")] {
        fakes[host].paths.lock().unwrap().insert(path.into());
    }
    let job = format!(
        "{ROUTED}{PARTY_DATA}{}",
        r#"

[[mount]]
type = "volume"
source = "geomx-{job}-output"
target = "/root/output"
roles = ["master"]
readonly = false
driver = "local"

[resources.workers]
memory = "512m"
cpus = 0.5
pids = 256
shm_size = "1g"
"#
    );
    let accepted = c.submit(&job).await.expect("accepted");
    // nothing starts before the hosts with bind mounts checked their sources
    assert_eq!(
        accepted.reason,
        "waiting for hosts b, c to check the job's bind mount sources"
    );
    c.wait_phase("hips-test", JobPhase::Running, Duration::from_secs(5))
        .await;
    let specs = c.sim("b").desired();
    let worker = specs
        .iter()
        .find(|s| s.node == "p-worker-1")
        .expect("p-worker-1 on b");
    assert_eq!(worker.mounts.len(), 1);
    assert_eq!(worker.mounts[0].r#type, "bind");
    assert_eq!(worker.mounts[0].source, "/srv/geomx/p");
    assert_eq!(worker.mounts[0].target, "/root/data");
    assert!(worker.mounts[0].readonly);
    let r = worker.resources.expect("resources");
    assert_eq!(r.memory_bytes, 512 << 20);
    assert_eq!(r.cpus, 0.5);
    assert_eq!(r.pids, 256);
    assert_eq!(r.shm_size_bytes, 1 << 30);
    // the party server mounts nothing and gets the default pids limit
    let server = specs
        .iter()
        .find(|s| s.node == "p-server")
        .expect("p-server");
    assert!(server.mounts.is_empty());
    let r = server.resources.expect("resources");
    assert_eq!(
        (r.memory_bytes, r.pids),
        (0, geomx_job::DEFAULT_PIDS_LIMIT as u64)
    );
    let master = c
        .sim("a")
        .desired()
        .into_iter()
        .find(|s| s.node == "master-worker")
        .expect("master on a");
    assert_eq!(master.mounts.len(), 1);
    assert_eq!(master.mounts[0].source, "geomx-hips-test-output");
    assert_eq!(master.mounts[0].driver, "local");
    assert!(!master.mounts[0].readonly);
}

#[tokio::test]
async fn a_host_without_the_memory_or_cpus_asked_is_refused_naming_them() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    // p's two workers are on b: 2 x 3g and 2 x 1.5 CPUs, b has 4 GiB and 2 CPUs
    let job = format!("{ROUTED}\n[resources.workers]\nmemory = \"3g\"\ncpus = 1.5\n");
    let err = c.submit(&job).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let msg = err.message();
    assert!(
        msg.contains("host b cannot hold the memory job hips-test asks there: 6.0GiB asked (2 nodes with a memory limit), 4.0GiB available (4.0GiB on the host)"),
        "{msg}"
    );
    assert!(
        msg.contains("host b cannot hold the CPUs job hips-test asks there: 3 asked (2 nodes with a CPU limit), 2 available (2 on the host)"),
        "{msg}"
    );
    // host c (one worker) holds it: not named
    assert!(!msg.contains("host c"), "{msg}");
    assert!(c.sim("b").desired().is_empty(), "nothing placed");
    // within the host it is accepted
    let fits = format!("{ROUTED}\n[resources.workers]\nmemory = \"1g\"\ncpus = 1\n");
    c.submit(&fits).await.expect("accepted");
}

#[tokio::test]
async fn only_an_agent_that_expands_templates_gets_shared_states() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    running_routed(&c).await;
    let first = |shared: bool| {
        let lab = &c.lab;
        async move {
            let request = WatchRequest { host: "b".into() };
            let request = if shared {
                geomx_proto::templates::watch_request(request)
            } else {
                Request::new(request)
            };
            let mut stream = lab
                .agent("b")
                .await
                .watch(request)
                .await
                .expect("watch")
                .into_inner();
            next_state(&mut stream, Duration::from_secs(2)).await
        }
    };
    // an agent from before templates: every container complete
    let old = first(false).await;
    assert!(old.templates.is_empty());
    let worker = old
        .containers
        .iter()
        .find(|s| s.node == "p-worker-1")
        .expect("p-worker-1 on b");
    assert_eq!(worker.env["DMLC_ROLE"], "worker");
    assert!(!worker.command.is_empty());
    // one that expands them: the same containers once expanded, in fewer bytes
    let new = first(true).await;
    assert!(!new.templates.is_empty());
    assert!(prost::Message::encoded_len(&new) < prost::Message::encoded_len(&old));
    assert_eq!(
        geomx_proto::templates::expand_state(&new).expect("expands"),
        old.containers
    );
}

/// A one-host ps job on b whose every node carries `kib` KiB of env.
fn heavy(name: &str, workers: u32, kib: usize) -> String {
    format!(
        r#"
name = "{name}"
mode = "ps"
image = "geomx/test:1"

[env.all]
PAYLOAD = "{}"

[[party]]
name = "p"
hosts = ["b"]
workers = {workers}
"#,
        "x".repeat(kib << 10)
    )
}

#[tokio::test]
async fn a_job_past_a_hosts_state_limit_is_refused_and_a_small_job_still_runs_there() {
    // a host limit of 1.8 MiB instead of 8 keeps the states this test sends small
    let c = Cluster::start_with(
        &["a", "b", "c"],
        JobOptions {
            max_host_state_len: 1_900_000,
            ..options()
        },
    )
    .await;
    // 14 nodes x 400 KiB: 5.5 MiB as separate specs, but its env travels once (0.4 MiB)
    c.submit(&heavy("heavy-1", 12, 400))
        .await
        .expect("accepted");
    c.wait_phase("heavy-1", JobPhase::Running, Duration::from_secs(10))
        .await;
    // jobs do not share their env with each other: 400 KiB each, b is full after 3 more
    for i in 1..=3 {
        c.submit(&heavy(&format!("fill-{i}"), 1, 400))
            .await
            .unwrap_or_else(|e| panic!("fill-{i} refused: {}", e.message()));
    }
    let err = c
        .submit(&heavy("fill-4", 1, 400))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let msg = err.message();
    assert!(
        msg.contains("host b: job fill-4 would add 0.4 MiB of container specs to its desired state on top of 1.6 MiB of other jobs' containers, 2.0 MiB in all: at most 1.8 MiB (an agent decodes at most 16.0 MiB)"),
        "{msg}"
    );
    // a plan past the plan limit is refused by the job model, naming limit and size
    let err = c
        .submit(&heavy("heavy-3", 24, 400))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("at most 8.0 MiB (the limit on a plan"),
        "{}",
        err.message()
    );
    // the host is not starved: a small job on it runs at once
    let small = ROUTED.replace("hips-test", "small");
    let asked = Instant::now();
    c.submit(&small).await.expect("accepted");
    c.wait_phase("small", JobPhase::Running, Duration::from_secs(30))
        .await;
    assert!(asked.elapsed() < Duration::from_secs(30));
}

/// The lines of a node's [`UserJobs::node_logs`] answer, with whether they are stderr.
async fn logs_of(jobs: &UserJobs, job: &str, node: &str) -> Vec<(bool, String)> {
    let mut stream = jobs
        .clone()
        .node_logs(UserLogsRequest {
            job: job.into(),
            node: node.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("logs of {node}: {e}"))
        .into_inner();
    let mut lines = Vec::new();
    while let Some(chunk) = stream.message().await.expect("stream ok") {
        lines.extend(chunk.lines.into_iter().map(|l| (chunk.stderr, l)));
    }
    lines
}

/// Issue 17, item 4: the controller keeps the last lines of every node that ended, not only
/// of failed ones (also a tail that comes in a report after the end), in its store, and
/// `NodeLogs` answers from them, saying so, when the node's host cannot serve the output:
/// its agent unreachable, then the host removed.
#[tokio::test]
async fn the_last_lines_of_every_ended_node_outlive_its_host() {
    let lab = Lab::start_with_jobs(options()).await;
    let journal: Journal = Arc::default();
    let mut sims = BTreeMap::new();
    // the agent of host b cannot be reached for logs
    sims.insert(
        "b".to_owned(),
        Sim::start_with(&lab, "b", &journal, Some("https://127.0.0.1:1".into())).await,
    );
    let jobs = lab.user_jobs(&lab.pki.token).await;
    let mut c = Cluster {
        lab,
        journal,
        sims,
        jobs,
    };
    let j = "kept";
    let toml = pseudo(j, 9810, "").replace("hosts = [\"a\"]", "hosts = [\"b\"]");
    c.submit(&toml).await.expect("accepted");
    let job = c
        .wait_phase(j, JobPhase::Running, Duration::from_secs(5))
        .await;
    let names: Vec<String> = job.nodes.iter().map(|n| n.name.clone()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let tail = |name: &str| vec![format!("{name}: a line"), format!("{name}: its last line")];
    let (training, others): (Vec<&String>, Vec<&String>) =
        names.iter().partition(|n| n.contains("-worker-"));
    assert_eq!(training.len(), 2, "{names:?}");
    // the scheduler and the server exit 0 first (the job goes on), the server's tail only
    // in a later report
    let server: &String = others
        .iter()
        .find(|n| n.contains("-server"))
        .expect("a server");
    for &n in &others {
        let lines = if n == server { Vec::new() } else { tail(n) };
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        c.sim("b").exit(j, n, 0, &lines);
    }
    c.wait(j, Duration::from_secs(3), |job| {
        others
            .iter()
            .all(|n| state_of(job, n) == ContainerState::Exited as i32)
    })
    .await;
    c.sim("b").set(j, server, |n| n.log_tail = tail(server));
    c.wait(j, Duration::from_secs(3), |job| {
        node(job, server)
            .status
            .as_ref()
            .is_some_and(|s| s.log_tail == tail(server))
    })
    .await;
    assert_eq!(c.get(j).await.phase, JobPhase::Running as i32);
    for n in &training {
        let lines = tail(n);
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        c.sim("b").exit(j, n, 0, &lines);
    }
    c.wait_phase(j, JobPhase::Succeeded, Duration::from_secs(3))
        .await;
    c.wait_no_containers(j, Duration::from_secs(2)).await;

    // kept in the store: after a restart, before any agent reported, every node's tail
    for s in c.sims.values_mut() {
        s.stop();
    }
    c.lab.restart().await;
    c.jobs = c.lab.user_jobs(&c.lab.pki.token).await;
    let job = c.get(j).await;
    for n in &names {
        let st = node(&job, n).status.as_ref().expect("status");
        assert_eq!(st.state, ContainerState::Exited as i32, "{n}");
        assert_eq!(st.log_tail, tail(n), "the tail of {n} (exited 0)");
    }

    // the agent cannot be reached: the kept lines, saying so
    let kept_note = |why: &str| format!("geomx: {why}; the last 2 lines the controller kept:");
    for n in &names {
        let lines = logs_of(&c.jobs, j, n).await;
        let (stderr, note) = lines.first().cloned().unwrap_or_default();
        assert!(
            stderr
                && note
                    .starts_with("geomx: cannot reach the agent of host b at https://127.0.0.1:1")
                && note.ends_with("; the last 2 lines the controller kept:"),
            "{n}: {lines:?}"
        );
        let rest: Vec<(bool, String)> = tail(n).into_iter().map(|l| (false, l)).collect();
        assert_eq!(lines[1..], rest[..], "{n}");
    }

    // the host is lost (silent since the restart), then removed: the kept lines still
    let hosts = c.lab.user_hosts(&c.lab.pki.token).await;
    let deadline = Instant::now() + GRACE * 5;
    loop {
        let removed = hosts
            .clone()
            .remove_host(geomx_proto::v1::HostRequest { name: "b".into() })
            .await;
        match removed {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "host b not removed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in &names {
        let lines = logs_of(&c.jobs, j, n).await;
        let mut want = vec![(true, kept_note("host b is not registered any more"))];
        want.extend(tail(n).into_iter().map(|l| (false, l)));
        assert_eq!(lines, want, "{n}");
    }
}

/// `/metrics` on `web_listen`: refused without a token; with one, the documented metrics
/// with their types, the state gauges, and counters that move as jobs are submitted,
/// restart, fail and succeed.
#[tokio::test]
async fn metrics_follow_submissions_restarts_failures_and_successes() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    let (status, body) = c.lab.scrape(None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    let (status, _) = c.lab.scrape(Some("not-a-token-of-this-lab")).await;
    assert_eq!(status, 401);

    let m = c.lab.metrics().await;
    for (name, kind_wanted) in [
        ("geomx_job_submissions_total", "counter"),
        ("geomx_job_successes_total", "counter"),
        ("geomx_job_failures_total", "counter"),
        ("geomx_job_restarts_total", "counter"),
        ("geomx_job_cancellations_total", "counter"),
        ("geomx_hosts", "gauge"),
        ("geomx_jobs", "gauge"),
        ("geomx_report_duration_seconds", "histogram"),
        ("geomx_watch_send_duration_seconds", "histogram"),
    ] {
        assert_eq!(kind(&m, name), Some(kind_wanted), "{name}");
    }
    assert_eq!(sample(&m, "geomx_hosts", &[("state", "ready")]), Some(3.0));
    assert_eq!(sample(&m, "geomx_hosts", &[("state", "lost")]), Some(0.0));
    assert_eq!(sample(&m, "geomx_job_submissions_total", &[]), Some(0.0));

    // Run 1: fails, restarts once, fails for good.
    let j = "hips-test";
    c.submit(&routed_with_policy(
        "restart = \"on-failure\"\nmax_restarts = 1",
    ))
    .await
    .expect("accepted");
    c.wait_phase(j, JobPhase::Running, Duration::from_secs(5))
        .await;
    c.sim("b").progress(j, "p-worker-0", 20, 0.75);
    let m = c
        .lab_metrics_until(Duration::from_secs(3), |m| {
            sample(m, "geomx_job_iteration", &[("job", j), ("party", "p")]) == Some(20.0)
        })
        .await;
    assert_eq!(kind(&m, "geomx_job_iteration"), Some("gauge"));
    assert_eq!(
        sample(&m, "geomx_job_epoch", &[("job", j), ("party", "p")]),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "geomx_job_best_accuracy", &[("job", j)]),
        Some(0.75)
    );
    assert!(
        sample(
            &m,
            "geomx_job_iterations_per_second",
            &[("job", j), ("party", "q")]
        )
        .is_some()
    );
    assert_eq!(sample(&m, "geomx_jobs", &[("phase", "running")]), Some(1.0));
    assert_eq!(sample(&m, "geomx_job_submissions_total", &[]), Some(1.0));

    c.sim("c").exit(j, "q-worker-0", 7, &["oops"]);
    c.wait(j, Duration::from_secs(5), |j| {
        j.generation == 1 && j.phase == JobPhase::Running as i32
    })
    .await;
    let m = c.lab.metrics().await;
    assert_eq!(sample(&m, "geomx_job_restarts_total", &[]), Some(1.0));
    assert_eq!(sample(&m, "geomx_job_failures_total", &[]), Some(0.0));
    c.sim("c").exit(j, "q-worker-0", 7, &["oops again"]);
    c.wait_phase(j, JobPhase::Failed, Duration::from_secs(5))
        .await;
    let m = c.lab.metrics().await;
    assert_eq!(sample(&m, "geomx_job_failures_total", &[]), Some(1.0));
    assert_eq!(sample(&m, "geomx_job_restarts_total", &[]), Some(1.0));
    assert_eq!(sample(&m, "geomx_jobs", &[("phase", "failed")]), Some(1.0));
    // an ended job has no training series
    assert_eq!(
        sample(&m, "geomx_job_iteration", &[("job", j), ("party", "p")]),
        None
    );

    // Run 2: succeeds.
    running_routed(&c).await;
    for (h, n) in TRAINING.iter().chain(SHUTTING_DOWN.iter()) {
        c.sim(h).exit(j, n, 0, &[]);
    }
    c.wait_phase(j, JobPhase::Succeeded, Duration::from_secs(3))
        .await;
    let m = c.lab.metrics().await;
    assert_eq!(sample(&m, "geomx_job_submissions_total", &[]), Some(2.0));
    assert_eq!(sample(&m, "geomx_job_successes_total", &[]), Some(1.0));
    assert_eq!(sample(&m, "geomx_job_failures_total", &[]), Some(1.0));
    assert_eq!(
        sample(&m, "geomx_jobs", &[("phase", "succeeded")]),
        Some(1.0)
    );
    assert_eq!(sample(&m, "geomx_jobs", &[("phase", "failed")]), Some(0.0));
    let reports = m
        .samples
        .iter()
        .find(|s| s.metric == "geomx_report_duration_seconds_count")
        .map(|s| match s.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        });
    assert!(
        reports.is_some_and(|n| n > 0.0),
        "reports observed: {reports:?}"
    );
}

/// The dashboard's job API: the job with its nodes and curve points, and its event stream
/// sending the job and new points as the agents report progress.
#[tokio::test]
async fn the_dashboard_follows_a_job_and_its_training_curve() {
    let c = Cluster::start(&["a", "b", "c"]).await;
    let j = "hips-test";
    c.submit(&routed_with_policy("")).await.expect("accepted");
    c.wait_phase(j, JobPhase::Running, Duration::from_secs(5))
        .await;
    let auth = format!("Authorization: Bearer {}\r\n", c.lab.pki.token);
    c.sim("b").progress(j, "p-worker-0", 3, 0.25);
    // the curve's first point, in the job's JSON
    let start = std::time::Instant::now();
    let body = loop {
        let (status, _, body) = c.lab.web("GET", &format!("/api/jobs/{j}"), &auth, "").await;
        assert_eq!(status, 200, "{body}");
        if body.contains("\"points\":[{") {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no curve point: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["job"]["name"], j);
    assert_eq!(
        v["job"]["nodes"].as_array().map(Vec::len),
        v["job"]["node_count"].as_u64().map(|n| n as usize)
    );
    let first = &v["points"][0];
    assert_eq!(first["node"], "p-worker-0");
    assert_eq!(first["iteration"], 3);
    assert_eq!(first["accuracy"], 0.25);
    let seq = v["seq"].as_u64().expect("seq");

    // the stream: the job at once, then the points after `seq` as they come
    let stream = {
        let lab = &c.lab;
        let path = format!("/api/jobs/{j}/stream");
        let headers = format!("{auth}Last-Event-ID: {seq}\r\n");
        async move {
            lab.web_until(&path, &headers, Duration::from_secs(10), |t| {
                t.contains("event: job") && t.contains("\"iteration\":7")
            })
            .await
        }
    };
    let report = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.sim("b").progress(j, "p-worker-0", 7, 0.5);
    };
    let (text, ()) = tokio::join!(stream, report);
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    assert!(text.contains("retry: 1000"), "{text}");
    // the points events carry only what came after Last-Event-ID
    let sent: Vec<serde_json::Value> = text
        .split("event: points\ndata: ")
        .skip(1)
        .filter_map(|rest| serde_json::from_str(rest.lines().next()?).ok())
        .collect();
    let seqs: Vec<u64> = sent
        .iter()
        .flat_map(|m| m["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["seq"].as_u64())
        .collect();
    assert!(
        !seqs.is_empty() && seqs.iter().all(|&s| s > seq),
        "{seqs:?} after {seq}: {text}"
    );
    assert!(text.contains(&format!("id: {}", seq + 1)), "{text}");
    // an unknown job and a bad name
    let (status, _, _) = c.lab.web("GET", "/api/jobs/nope", &auth, "").await;
    assert_eq!(status, 404);
    let (status, _, _) = c.lab.web("GET", "/api/jobs/%2e%2e", &auth, "").await;
    assert_eq!(status, 400);
}
