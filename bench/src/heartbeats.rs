//! Controller heartbeat capacity (issue 6, item 4).
//!
//! A real `geomx-controller` process (release build, TLS on, fresh state directory) on
//! 127.0.0.1, and M fake agents in this process, each with its own agent certificate
//! (CN = host, OU = agent) and its own TLS connection. For every size N:
//!
//! 1. the agents register and report their images (so that jobs can be placed);
//! 2. baseline `health`: every agent calls `grpc.health.v1.Health/Check` back to back over
//!    its connection: the floor of one RPC through TLS, HTTP/2 and tonic, no geomx work;
//! 3. baseline `nojobs`: every agent sends `Report`s back to back carrying its N/M nodes,
//!    named after jobs the controller does not know: TLS + decoding + authentication +
//!    membership, while the jobs layer skips every node (unknown job);
//! 4. one `ps` job per agent (several when N/M > 1026) is submitted through `JobService`
//!    with a bearer token, placing all its nodes on that agent's host. The agents follow
//!    their `Watch` streams like real agents: a node gets a sandbox IP (Pending) when it is
//!    desired and runs once `start` is set; training workers report progress. The benchmark
//!    waits until every job is Running;
//! 5. `paced`: every agent reports all its nodes once per interval (1 s, the controller's
//!    default heartbeat interval), staggered: the real load of N nodes, N heartbeats/s;
//! 6. `saturated`: every agent reports back to back (one report in flight per agent, as a
//!    real agent): the capacity of the real path.
//!
//! Every report of steps 5 and 6 carries new progress for every training worker (the path
//! where the controller records a throughput sample). Reports are encoded once per send
//! from a template patched in place, so the load generator spends little CPU; its CPU is
//! printed next to the controller's.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use geomx_proto::tls::BearerInterceptor;
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_proto::v1::job_service_client::JobServiceClient;
use geomx_proto::v1::{
    ContainerState, DesiredState, HostReport, JobPhase, ListJobsRequest, NetworkStatus, NodeStatus,
    Progress, RegisterRequest, ReportResponse, SubmitJobRequest, WatchRequest,
};
use ipnet::Ipv4Net;
use prost::Message;
use prost::bytes::{BufMut, Bytes};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::controller::{ControllerProcess, Pki};
use crate::procfs::{self, CpuWindow, MachineWindow};
use crate::report::{Line, note, quantile_sorted};

/// The image every benchmark job names (the agents report it as present).
pub const IMAGE: &str = "geomx-bench/node:1";
/// The node heartbeat rate issue 6 asks the controller to sustain.
pub const TARGET_RATE: f64 = 50_000.0;
/// Most nodes of one benchmark job: 1 scheduler, 1 server, 1024 workers (the job file limit).
pub const MAX_NODES_PER_JOB: usize = 1026;
/// Fewest nodes of a `ps` job: scheduler, server, worker.
pub const MIN_NODES_PER_JOB: usize = 3;
/// The real agent's report timeout at the default 1 s heartbeat interval (the interval
/// clamped to 1..5 s).
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(1);
/// The heartbeat interval the controller hands out by default (the agents' beat during
/// ramp-up; reports also go out within 50 ms of a change, as the real agent's do).
const BEAT: Duration = Duration::from_secs(1);
const CLUSTER_CIDR: &str = "172.16.0.0/12";
const HOST_PREFIX: &str = "20";
const AGENT_VERSION: &str = "geomx-bench fake agent";

/// Knobs of the heartbeat benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Node counts to measure, each against a fresh controller.
    pub sizes: Vec<usize>,
    /// Fake agents (hosts).
    pub agents: usize,
    /// Report interval of the paced phase.
    pub interval: Duration,
    /// Load before each measured window (not recorded).
    pub warmup: Duration,
    /// Window of each baseline phase.
    pub baseline: Duration,
    /// Window of the paced phase.
    pub paced: Duration,
    /// Window of the saturated phase.
    pub saturated: Duration,
    /// How long jobs may take to reach Running.
    pub ramp_timeout: Duration,
    /// `geomx-controller`.
    pub controller_bin: PathBuf,
    /// Keep the work directory (logs, state) after the run.
    pub keep: bool,
}

/// What one phase measured.
#[derive(Clone, Debug, Default)]
pub struct PhaseStats {
    /// Successful RPCs completed inside the window.
    pub rpcs: u64,
    /// Node statuses carried by those RPCs.
    pub nodes: u64,
    /// Failed RPCs inside the window.
    pub errors: u64,
    /// The first error seen.
    pub first_error: Option<String>,
    /// Latency of every successful RPC of the window, and of every report that got no
    /// answer within [`REPORT_TIMEOUT`] (the time it waited: a lower bound), µs, sorted.
    pub latency_us: Vec<u32>,
    /// Length of the window, s.
    pub window_s: f64,
    /// Controller CPU over the window, % of one core.
    pub controller_cpu: f64,
    /// This process's CPU over the window, % of one core.
    pub loadgen_cpu: f64,
    /// Controller RSS at the end of the window, MiB.
    pub controller_rss: f64,
    /// The whole machine's CPU use over the window, % of all cores.
    pub machine_busy: f64,
    /// 1-minute load average at the end of the window.
    pub loadavg: f64,
}

impl PhaseStats {
    /// RPCs per second.
    pub fn rpc_rate(&self) -> f64 {
        self.rpcs as f64 / self.window_s
    }
    /// Node heartbeats per second.
    pub fn node_rate(&self) -> f64 {
        self.nodes as f64 / self.window_s
    }
    /// Latency quantile in ms.
    pub fn ms(&self, q: f64) -> f64 {
        quantile_sorted(&self.latency_us, q) / 1000.0
    }
    /// Largest latency in ms.
    pub fn max_ms(&self) -> f64 {
        self.latency_us
            .last()
            .map_or(f64::NAN, |v| f64::from(*v) / 1000.0)
    }
}

/// Everything measured at one size.
#[derive(Clone, Debug, Default)]
pub struct SizeResult {
    /// Nodes.
    pub nodes: usize,
    /// Agents.
    pub agents: usize,
    /// Jobs submitted.
    pub jobs: usize,
    /// Health Check baseline.
    pub health: PhaseStats,
    /// Reports of unknown jobs.
    pub nojobs: PhaseStats,
    /// Submit to all jobs Running, s.
    pub ramp_s: f64,
    /// Reports sent while the jobs started.
    pub ramp_reports: u64,
    /// Of those, failed ones (no answer within the agent's timeout, mostly).
    pub ramp_failed: u64,
    /// Controller RSS once every job runs, MiB.
    pub rss_after_ramp: f64,
    /// Paced reports.
    pub paced: PhaseStats,
    /// Reports paced to offer exactly [`TARGET_RATE`] node heartbeats/s (`None` when that
    /// is the paced phase already, or would need an interval under 1 ms).
    pub target: Option<PhaseStats>,
    /// Interval of the target phase.
    pub target_interval: Duration,
    /// Mean encoded size of one agent's report while every job runs, bytes.
    pub report_bytes: usize,
    /// Back-to-back reports.
    pub saturated: PhaseStats,
    /// Controller peak RSS (VmHWM) over the whole run, MiB.
    pub peak_rss: f64,
    /// Jobs still Running at the end.
    pub jobs_running: usize,
    /// Offered rate of the paced phase, node heartbeats/s.
    pub offered: f64,
}

impl SizeResult {
    /// The phase that offered [`TARGET_RATE`]: the target phase, or the paced one when it
    /// offered that rate itself.
    pub fn at_target(&self) -> &PhaseStats {
        self.target.as_ref().unwrap_or(&self.paced)
    }

    /// Whether the phase offering [`TARGET_RATE`] kept up with it with p99 < 50 ms and no
    /// error (kept up: at least 99 % of the offered rate counted in the window).
    pub fn target_met(&self) -> bool {
        let t = self.at_target();
        let offered = if self.target.is_some() {
            TARGET_RATE
        } else {
            self.offered
        };
        offered >= TARGET_RATE
            && t.node_rate() >= 0.99 * TARGET_RATE
            && t.ms(0.99) < 50.0
            && t.errors == 0
    }
}

/// Runs every size; prints one line per phase and a summary line per size.
pub async fn run(opts: &Options) -> anyhow::Result<Vec<SizeResult>> {
    let work = tempfile::Builder::new()
        .prefix("geomx-bench-heartbeats-")
        .tempdir()
        .context("making a work directory")?;
    let pki_dir = work.path().join("pki");
    let pki = Pki::new(&pki_dir)?;
    let mut results = Vec::new();
    for &size in &opts.sizes {
        let dir = work.path().join(format!("n{size}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let r = run_size(opts, &pki, &dir, size).await.with_context(|| {
            format!(
                "heartbeats at {size} nodes (work files in {})",
                dir.display()
            )
        });
        match r {
            Ok(r) => results.push(r),
            Err(e) => {
                let kept = work.keep();
                note(format!("work directory kept: {}", kept.display()));
                return Err(e);
            }
        }
    }
    if opts.keep {
        let kept = work.keep();
        note(format!("work directory kept: {}", kept.display()));
    }
    Ok(results)
}

async fn run_size(
    opts: &Options,
    pki: &Pki,
    dir: &Path,
    size: usize,
) -> anyhow::Result<SizeResult> {
    let m = opts.agents;
    if m == 0 || size < m * MIN_NODES_PER_JOB {
        bail!(
            "{size} nodes on {m} agents: every agent needs at least {MIN_NODES_PER_JOB} nodes (one ps job)"
        );
    }
    let state = dir.join("state");
    let log = dir.join("controller.log");
    let controller = ControllerProcess::start(
        &opts.controller_bin,
        pki,
        &state,
        &log,
        &[
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--host-subnet-prefix",
            HOST_PREFIX,
        ],
    )?;
    let pid = controller.pid();
    note(format!(
        "{size} nodes on {m} agents: controller pid {pid} on {}",
        controller.addr()
    ));
    let result = measure_size(opts, pki, &controller, size).await;
    if let Err(e) = &result {
        note(format!(
            "failed: {e:#}\ncontroller log (last lines):\n{}",
            controller.log_tail(30)
        ));
    }
    let status = controller
        .stop(Duration::from_secs(15))
        .context("stopping the controller")?;
    if !status.success() {
        note(format!("the controller exited with {status}"));
    }
    result
}

async fn measure_size(
    opts: &Options,
    pki: &Pki,
    controller: &ControllerProcess,
    size: usize,
) -> anyhow::Result<SizeResult> {
    let m = opts.agents;
    let pid = controller.pid();
    let per_agent = split(size, m);

    // Agents: one TLS connection each, with its own certificate.
    let mut agents = Vec::with_capacity(m);
    for (i, &nodes) in per_agent.iter().enumerate() {
        let host = format!("h{i:03}");
        let underlay = underlay_ip(i);
        let tls = pki.agent_tls(&host, IpAddr::V4(underlay))?;
        let channel = controller.channel(tls).await?;
        agents.push(Agent::new(i, host, underlay, channel, nodes));
    }
    for a in &mut agents {
        a.register().await?;
    }
    let started = Instant::now();
    for a in &mut agents {
        a.set_unknown_job_nodes();
        let bytes = a.next_report();
        a.send_report(bytes).await.context("first report")?;
    }
    note(format!(
        "{m} agents registered and reported in {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    let mut result = SizeResult {
        nodes: size,
        agents: m,
        offered: size as f64 / opts.interval.as_secs_f64(),
        ..Default::default()
    };
    let (agents, health) = run_phase(agents, Load::Health, opts.warmup, opts.baseline, pid).await?;
    print_phase(size, m, "health", &health, None);
    result.health = health;
    let (mut agents, nojobs) = run_phase(
        agents,
        Load::Reports { paced: None },
        opts.warmup,
        opts.baseline,
        pid,
    )
    .await?;
    print_phase(size, m, "nojobs", &nojobs, None);
    result.nojobs = nojobs;

    // Real jobs: watch, submit, follow the desired state until every job runs.
    let user_channel = controller.channel(pki.user_tls()).await?;
    let mut jobs = JobServiceClient::with_interceptor(
        user_channel,
        BearerInterceptor::new(&pki.token).context("token")?,
    );
    let mut watches = Vec::new();
    for a in &mut agents {
        watches.push(a.watch().await?);
    }
    let watches = AbortOnDrop(watches);
    let ramp_start = Instant::now();
    let mut job_names = Vec::new();
    for a in &agents {
        for (j, toml) in a.job_files(size).into_iter().enumerate() {
            let name = job_name(size, &a.host, j);
            jobs.submit_job(SubmitJobRequest {
                job_toml: toml,
                file_name: format!("{name}.toml"),
            })
            .await
            .with_context(|| format!("submitting job {name}"))?;
            job_names.push(name);
        }
    }
    result.jobs = job_names.len();
    let submitted = ramp_start.elapsed();
    let (agents, ramp) = ramp_up(agents, &mut jobs, job_names.len(), opts.ramp_timeout).await?;
    result.ramp_s = ramp.took.as_secs_f64();
    result.ramp_reports = ramp.reports;
    result.ramp_failed = ramp.failed;
    result.rss_after_ramp = procfs::rss_mib(pid)?;
    let nodes_reported: usize = agents.iter().map(|a| a.report.nodes.len()).sum();
    if nodes_reported != size {
        bail!("the agents run {nodes_reported} nodes, not {size}");
    }
    note(format!(
        "{} jobs submitted in {:.1}s, all Running after {:.1}s ({} of {} reports failed meanwhile)",
        job_names.len(),
        submitted.as_secs_f64(),
        result.ramp_s,
        ramp.failed,
        ramp.reports
    ));

    let (agents, paced) = run_phase(
        agents,
        Load::Reports {
            paced: Some(opts.interval),
        },
        opts.warmup,
        opts.paced,
        pid,
    )
    .await?;
    print_phase(size, m, "paced", &paced, Some(result.offered));
    result.paced = paced;
    let mut agents = agents;
    result.report_bytes = agents
        .iter_mut()
        .map(|a| a.next_report().len())
        .sum::<usize>()
        / m;
    result.target_interval = opts.interval;
    let target_interval = Duration::from_secs_f64(size as f64 / TARGET_RATE);
    let agents = if target_interval != opts.interval && target_interval >= Duration::from_millis(1)
    {
        let (agents, target) = run_phase(
            agents,
            Load::Reports {
                paced: Some(target_interval),
            },
            opts.warmup,
            opts.paced.min(opts.saturated.max(Duration::from_secs(1))),
            pid,
        )
        .await?;
        print_phase(size, m, "target", &target, Some(TARGET_RATE));
        result.target = Some(target);
        result.target_interval = target_interval;
        agents
    } else {
        agents
    };
    let (agents, saturated) = run_phase(
        agents,
        Load::Reports { paced: None },
        opts.warmup,
        opts.saturated,
        pid,
    )
    .await?;
    print_phase(size, m, "saturated", &saturated, None);
    result.saturated = saturated;

    result.peak_rss = procfs::peak_rss_mib(pid)?;
    let listed = jobs
        .list_jobs(ListJobsRequest {})
        .await
        .context("listing jobs")?
        .into_inner()
        .jobs;
    result.jobs_running = listed
        .iter()
        .filter(|j| j.phase == JobPhase::Running as i32)
        .count();
    if result.jobs_running != result.jobs
        && let Some(j) = listed.iter().find(|j| j.phase != JobPhase::Running as i32)
    {
        note(format!(
            "job {} is {:?} after the run: {}",
            j.name,
            JobPhase::try_from(j.phase).unwrap_or(JobPhase::Unspecified),
            j.reason
        ));
    }
    drop(watches);
    drop(agents);
    print_summary(&result);
    Ok(result)
}

/// `n` split over `m` as evenly as possible (the first ones get one more).
fn split(n: usize, m: usize) -> Vec<usize> {
    (0..m).map(|i| n / m + usize::from(i < n % m)).collect()
}

fn underlay_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + i)
}

fn job_name(size: usize, host: &str, j: usize) -> String {
    format!("b{size}-{host}-{j}")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The desired state an agent's watch stream delivered last.
#[derive(Default)]
struct Desired {
    version: AtomicU64,
    state: Mutex<Option<DesiredState>>,
}

/// A fake agent: one connection, one certificate, its nodes.
struct Agent {
    index: usize,
    host: String,
    underlay: Ipv4Addr,
    channel: Channel,
    grpc: tonic::client::Grpc<Channel>,
    nodes: usize,
    subnet: Option<Ipv4Net>,
    report: HostReport,
    iteration: u64,
    desired: Arc<Desired>,
    seen: u64,
    started_at_ms: i64,
}

impl Agent {
    fn new(
        index: usize,
        host: String,
        underlay: Ipv4Addr,
        channel: Channel,
        nodes: usize,
    ) -> Agent {
        let report = HostReport {
            host: host.clone(),
            applied_revision: 0,
            nodes: Vec::new(),
            images: vec![IMAGE.to_owned()],
            network: Some(NetworkStatus {
                converged: true,
                routes: 0,
                error: String::new(),
                ..Default::default()
            }),
            agent_version: AGENT_VERSION.to_owned(),
            listening_ports: Vec::new(),
            // newer optional fields (nodes_known, images_known): absent means "known"
            ..Default::default()
        };
        Agent {
            index,
            host,
            underlay,
            grpc: tonic::client::Grpc::new(channel.clone()),
            channel,
            nodes,
            subnet: None,
            report,
            iteration: 0,
            desired: Arc::new(Desired::default()),
            seen: 0,
            started_at_ms: now_ms(),
        }
    }

    async fn register(&mut self) -> anyhow::Result<()> {
        let resp = AgentServiceClient::new(self.channel.clone())
            .register(RegisterRequest {
                host: self.host.clone(),
                underlay_ip: self.underlay.to_string(),
                pinned_subnet: String::new(),
                agent_version: AGENT_VERSION.to_owned(),
                agent_url: format!("https://{}:7947", self.underlay),
                ..Default::default()
            })
            .await
            .with_context(|| format!("registering {}", self.host))?
            .into_inner();
        let subnet: Ipv4Net = resp
            .subnet
            .parse()
            .with_context(|| format!("{}: subnet {:?}", self.host, resp.subnet))?;
        if subnet.hosts().count() < self.nodes + 2 {
            bail!(
                "{}: subnet {subnet} is too small for {} nodes",
                self.host,
                self.nodes
            );
        }
        self.subnet = Some(subnet);
        Ok(())
    }

    /// Opens the watch stream; its task keeps the latest desired state.
    async fn watch(&mut self) -> anyhow::Result<JoinHandle<()>> {
        let mut stream = AgentServiceClient::new(self.channel.clone())
            .watch(WatchRequest {
                host: self.host.clone(),
            })
            .await
            .with_context(|| format!("{}: opening the watch stream", self.host))?
            .into_inner();
        let desired = self.desired.clone();
        let host = self.host.clone();
        Ok(tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(state)) => {
                        *desired.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(state);
                        desired.version.fetch_add(1, Ordering::Release);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        note(format!("{host}: watch stream ended: {e}"));
                        break;
                    }
                }
            }
        }))
    }

    fn ip(&self, i: usize) -> String {
        let base = self.subnet.map_or(0, |s| u32::from(s.network()));
        let i = u32::try_from(i).unwrap_or(u32::MAX - 2);
        Ipv4Addr::from(base.saturating_add(2).saturating_add(i)).to_string()
    }

    fn container_id(&self, i: usize) -> String {
        format!("{:032x}{:032x}", self.index as u128 + 0xbe7c, i as u128 + 1)
    }

    fn status(
        &self,
        i: usize,
        job: &str,
        node: &str,
        generation: u32,
        running: bool,
        training: bool,
    ) -> NodeStatus {
        NodeStatus {
            job: job.to_owned(),
            node: node.to_owned(),
            generation,
            state: if running {
                ContainerState::Running as i32
            } else {
                ContainerState::Pending as i32
            },
            container_id: self.container_id(i),
            ip: self.ip(i),
            exit_code: None,
            restarts: 0,
            progress: (running && training).then(|| Progress {
                epoch: 0,
                iteration: 0,
                accuracy: Some(0.5),
                observed_at_ms: 0,
                metrics: Default::default(),
                finished: false,
            }),
            log_tail: Vec::new(),
            error: String::new(),
            started_at_ms: if running { self.started_at_ms } else { 0 },
            finished_at_ms: 0,
            rendezvous: None,
        }
    }

    /// Nodes named after jobs the controller does not know (the `nojobs` baseline).
    fn set_unknown_job_nodes(&mut self) {
        let job = format!("nojob-{}", self.host);
        let nodes: Vec<NodeStatus> = (0..self.nodes)
            .map(|i| {
                let node = match i {
                    0 => "p-scheduler".to_owned(),
                    1 => "p-server-0".to_owned(),
                    _ => format!("p-worker-{}", i - 2),
                };
                self.status(i, &job, &node, 0, true, i >= 2)
            })
            .collect();
        self.report.nodes = nodes;
    }

    /// Rebuilds the node list from the desired state when a new one arrived.
    fn refresh(&mut self) {
        let version = self.desired.version.load(Ordering::Acquire);
        if version == self.seen {
            return;
        }
        self.seen = version;
        let state = self
            .desired
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(state) = state else {
            return;
        };
        let nodes: Vec<NodeStatus> = state
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let training = matches!(c.role.as_str(), "worker" | "master_worker");
                self.status(i, &c.job, &c.node, c.generation, c.start, training)
            })
            .collect();
        self.report.nodes = nodes;
        self.report.applied_revision = state.revision;
        if let Some(n) = &mut self.report.network {
            n.routes = u32::try_from(state.peers.len()).unwrap_or(u32::MAX);
        }
    }

    /// The next report, encoded: new progress for every training worker.
    fn next_report(&mut self) -> Bytes {
        self.iteration += 1;
        let at = now_ms();
        let it = self.iteration;
        for n in &mut self.report.nodes {
            if let Some(p) = &mut n.progress {
                p.iteration = it;
                p.epoch = it / 100;
                p.observed_at_ms = at;
            }
        }
        Bytes::from(self.report.encode_to_vec())
    }

    /// Sends a report and waits for the answer at most [`REPORT_TIMEOUT`], like the real
    /// agent (which gives up after its heartbeat interval clamped to 1..5 s and reports
    /// again on the next beat; the controller then sees the call cancelled).
    async fn send_report(&mut self, bytes: Bytes) -> Result<ReportResponse, Status> {
        let call = async {
            self.grpc
                .ready()
                .await
                .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
            let path = PathAndQuery::from_static("/geomx.v1.AgentService/Report");
            self.grpc
                .unary(Request::new(bytes), path, RawReport)
                .await
                .map(tonic::Response::into_inner)
        };
        match tokio::time::timeout(REPORT_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {REPORT_TIMEOUT:?} (the agent's report timeout)"
            ))),
        }
    }

    /// The job files placing this agent's nodes on its host.
    fn job_files(&self, size: usize) -> Vec<String> {
        let jobs = self.nodes.div_ceil(MAX_NODES_PER_JOB);
        split(self.nodes, jobs)
            .into_iter()
            .enumerate()
            .map(|(j, n)| {
                format!(
                    "name = \"{}\"\nmode = \"ps\"\nimage = \"{IMAGE}\"\nnetwork = \"routed\"\n\n[[party]]\nname = \"p\"\nhosts = [\"{}\"]\nworkers = {}\nservers = 1\n\n[policy]\nrestart = \"never\"\nstall_timeout = \"10m\"\n",
                    job_name(size, &self.host, j),
                    self.host,
                    n - 2
                )
            })
            .collect()
    }
}

/// Aborts the watch tasks when dropped.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Sends pre-encoded `HostReport` bytes, decodes the `ReportResponse`.
#[derive(Clone, Copy, Debug, Default)]
struct RawReport;

#[derive(Clone, Copy, Debug, Default)]
struct RawEncoder;

#[derive(Clone, Copy, Debug, Default)]
struct ResponseDecoder;

impl Codec for RawReport {
    type Encode = Bytes;
    type Decode = ReportResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = ReportResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ReportResponse>, Status> {
        ReportResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding ReportResponse: {e}")))
    }
}

type UserJobs = JobServiceClient<InterceptedService<Channel, BearerInterceptor>>;

/// What the agents saw while the jobs started.
#[derive(Clone, Copy, Debug, Default)]
pub struct RampStats {
    /// Submit to every job Running.
    pub took: Duration,
    /// Reports sent.
    pub reports: u64,
    /// Reports that failed (mostly: no answer within [`REPORT_TIMEOUT`]).
    pub failed: u64,
}

/// Agents follow their watch streams like real agents (a report within 50 ms of a new
/// desired state, else every beat) until every job is Running.
async fn ramp_up(
    agents: Vec<Agent>,
    jobs: &mut UserJobs,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<(Vec<Agent>, RampStats)> {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<JoinHandle<(Agent, u64, u64)>> = agents
        .into_iter()
        .map(|mut a| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut reports, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    a.refresh();
                    let bytes = a.next_report();
                    let sent_at = Instant::now();
                    reports += 1;
                    if let Err(e) = a.send_report(bytes).await {
                        failed += 1;
                        if failed == 1 {
                            note(format!(
                                "{}: a report failed during ramp-up (more are counted, not shown): {}",
                                a.host,
                                e.message()
                            ));
                        }
                    }
                    // the next beat, or 50 ms after a new desired state
                    let beat = sent_at + BEAT;
                    loop {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= beat {
                            break;
                        }
                        if a.desired.version.load(Ordering::Acquire) != a.seen {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                (a, reports, failed)
            })
        })
        .collect();
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let listed = match jobs.list_jobs(ListJobsRequest {}).await {
            Ok(r) => r.into_inner().jobs,
            Err(e) => break Err(anyhow::anyhow!("listing jobs: {e}")),
        };
        let running = listed
            .iter()
            .filter(|j| j.phase == JobPhase::Running as i32)
            .count();
        if let Some(bad) = listed
            .iter()
            .find(|j| j.phase == JobPhase::Failed as i32 || j.phase == JobPhase::Cancelled as i32)
        {
            break Err(anyhow::anyhow!("job {} failed: {}", bad.name, bad.reason));
        }
        if running == expected {
            break Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            break Err(anyhow::anyhow!(
                "only {running} of {expected} jobs Running after {:.0}s",
                timeout.as_secs_f64()
            ));
        }
    };
    stop.store(true, Ordering::Relaxed);
    let mut back = Vec::new();
    let mut stats = RampStats::default();
    for t in tasks {
        let (a, reports, failed) = t.await.context("an agent task panicked")?;
        stats.reports += reports;
        stats.failed += failed;
        back.push(a);
    }
    stats.took = outcome?;
    back.sort_by_key(|a| a.index);
    // One more refresh: the last desired state (every node started) is in place.
    for a in &mut back {
        a.refresh();
    }
    Ok((back, stats))
}

/// What the agents send during a phase.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// `grpc.health.v1.Health/Check`, back to back.
    Health,
    /// Reports: back to back, or one per interval per agent (staggered).
    Reports { paced: Option<Duration> },
}

#[derive(Default)]
struct TaskStats {
    rpcs: u64,
    nodes: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: Vec<u32>,
}

/// Runs `load` on every agent: `warmup` unrecorded, then a recorded window of `window`.
async fn run_phase(
    agents: Vec<Agent>,
    load: Load,
    warmup: Duration,
    window: Duration,
    controller_pid: u32,
) -> anyhow::Result<(Vec<Agent>, PhaseStats)> {
    let recording = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let m = agents.len().max(1);
    let phase_start = tokio::time::Instant::now();
    let tasks: Vec<JoinHandle<(Agent, TaskStats)>> = agents
        .into_iter()
        .map(|mut a| {
            let recording = recording.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut st = TaskStats::default();
                let mut health = HealthClient::new(a.channel.clone());
                let mut ticker = match load {
                    Load::Reports { paced: Some(every) } => {
                        let offset = every.mul_f64(a.index as f64 / m as f64);
                        let mut t = tokio::time::interval_at(phase_start + offset, every);
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        Some(t)
                    }
                    _ => None,
                };
                loop {
                    if *stop.borrow() {
                        break;
                    }
                    if let Some(t) = &mut ticker {
                        tokio::select! {
                            _ = t.tick() => {}
                            _ = stop.changed() => break,
                        }
                    }
                    let (outcome, nodes) = match load {
                        Load::Health => {
                            let t0 = Instant::now();
                            let r = health
                                .check(HealthCheckRequest {
                                    service: String::new(),
                                })
                                .await
                                .map(drop);
                            ((r, t0.elapsed()), 0)
                        }
                        Load::Reports { .. } => {
                            a.refresh();
                            let nodes = a.report.nodes.len() as u64;
                            let bytes = a.next_report();
                            let t0 = Instant::now();
                            let r = a.send_report(bytes).await.map(drop);
                            ((r, t0.elapsed()), nodes)
                        }
                    };
                    if !recording.load(Ordering::Relaxed) {
                        continue;
                    }
                    match outcome {
                        (Ok(()), took) => {
                            st.rpcs += 1;
                            st.nodes += nodes;
                            st.latency_us
                                .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                        }
                        (Err(e), took) => {
                            st.errors += 1;
                            // A report that got no answer in time counts in the quantiles
                            // with the time it waited: its latency is at least that.
                            if e.code() == tonic::Code::DeadlineExceeded {
                                st.latency_us
                                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                            }
                            st.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                (a, st)
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let ctl_cpu = CpuWindow::start(controller_pid)?;
    let own_cpu = CpuWindow::start(std::process::id())?;
    let machine = MachineWindow::start()?;
    let t0 = Instant::now();
    recording.store(true, Ordering::Relaxed);
    tokio::time::sleep(window).await;
    recording.store(false, Ordering::Relaxed);
    let window_s = t0.elapsed().as_secs_f64();
    let controller_cpu = ctl_cpu.percent()?;
    let loadgen_cpu = own_cpu.percent()?;
    let machine_busy = machine.percent()?;
    let controller_rss = procfs::rss_mib(controller_pid)?;
    let _ = stop_tx.send(true);
    let mut stats = PhaseStats {
        window_s,
        controller_cpu,
        loadgen_cpu,
        controller_rss,
        machine_busy,
        loadavg: procfs::loadavg(),
        ..Default::default()
    };
    let mut back = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (a, st) = t.await.context("an agent task panicked")?;
        stats.rpcs += st.rpcs;
        stats.nodes += st.nodes;
        stats.errors += st.errors;
        if stats.first_error.is_none() {
            stats.first_error = st.first_error;
        }
        stats.latency_us.extend(st.latency_us);
        back.push(a);
    }
    stats.latency_us.sort_unstable();
    back.sort_by_key(|a| a.index);
    Ok((back, stats))
}

fn print_phase(nodes: usize, agents: usize, phase: &str, s: &PhaseStats, offered: Option<f64>) {
    let mut line = Line::new("heartbeat_nodes", nodes)
        .kv("agents", agents)
        .kv("phase", phase);
    if let Some(o) = offered {
        line = line.f("offered_per_s", o, 0);
    }
    line = line
        .f("rate_per_s", s.node_rate(), 0)
        .f("rpc_per_s", s.rpc_rate(), 1)
        .f("p50_ms", s.ms(0.5), 2)
        .f("p99_ms", s.ms(0.99), 2)
        .f("max_ms", s.max_ms(), 2)
        .kv("errors", s.errors)
        .f("controller_cpu_pct", s.controller_cpu, 0)
        .f("loadgen_cpu_pct", s.loadgen_cpu, 0)
        .f("controller_rss_mb", s.controller_rss, 1)
        .f("machine_busy_pct", s.machine_busy, 0)
        .f("loadavg", s.loadavg, 1)
        .f("window_s", s.window_s, 1);
    line.print();
    if let Some(e) = &s.first_error {
        note(format!("{phase}: {} errors, first: {e}", s.errors));
    }
}

fn print_summary(r: &SizeResult) {
    let nojobs_ratio = r.saturated.node_rate() / r.nojobs.node_rate();
    Line::new("heartbeat_nodes", r.nodes)
        .kv("agents", r.agents)
        .kv("phase", "summary")
        .kv("cpus", procfs::cpus())
        .kv("jobs", r.jobs)
        .kv("jobs_running_after", r.jobs_running)
        .f("ramp_s", r.ramp_s, 1)
        .kv("ramp_reports", r.ramp_reports)
        .kv("ramp_report_errors", r.ramp_failed)
        .kv("report_bytes", r.report_bytes)
        .f("rss_after_ramp_mb", r.rss_after_ramp, 1)
        .f("paced_rate_per_s", r.paced.node_rate(), 0)
        .f("paced_p50_ms", r.paced.ms(0.5), 2)
        .f("paced_p99_ms", r.paced.ms(0.99), 2)
        .f("target_rate_per_s", r.at_target().node_rate(), 0)
        .f("target_p99_ms", r.at_target().ms(0.99), 2)
        .kv("target_interval_ms", r.target_interval.as_millis())
        .f("capacity_per_s", r.saturated.node_rate(), 0)
        .f("capacity_p50_ms", r.saturated.ms(0.5), 2)
        .f("capacity_p99_ms", r.saturated.ms(0.99), 2)
        .f("nojobs_capacity_per_s", r.nojobs.node_rate(), 0)
        .f("jobs_vs_nojobs_ratio", nojobs_ratio, 2)
        .f("health_rpc_per_s", r.health.rpc_rate(), 0)
        .f(
            "report_vs_health_rpc_ratio",
            r.saturated.rpc_rate() / r.health.rpc_rate(),
            3,
        )
        .f("controller_cpu_pct", r.saturated.controller_cpu, 0)
        .f("controller_peak_rss_mb", r.peak_rss, 1)
        .print();
    note(format!(
        "{} nodes / {} agents: paced {:.0}/s offered {:.0}/s (p99 {:.1} ms); capacity {:.0} node heartbeats/s (p99 {:.1} ms, {:.0}% controller CPU, {:.0}% load generator CPU); without jobs {:.0}/s; health {:.0} RPC/s; peak RSS {:.1} MiB",
        r.nodes,
        r.agents,
        r.paced.node_rate(),
        r.offered,
        r.paced.ms(0.99),
        r.saturated.node_rate(),
        r.saturated.ms(0.99),
        r.saturated.controller_cpu,
        r.saturated.loadgen_cpu,
        r.nojobs.node_rate(),
        r.health.rpc_rate(),
        r.peak_rss
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_even_and_complete() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(50_000, 100).iter().sum::<usize>(), 50_000);
        assert_eq!(split(2000, 2), vec![1000, 1000]);
    }

    #[test]
    fn underlay_addresses_are_distinct() {
        assert_eq!(underlay_ip(0), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(underlay_ip(255), Ipv4Addr::new(10, 200, 1, 0));
    }
}
