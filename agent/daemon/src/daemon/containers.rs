//! The container side of the daemon: once the host network is in place (the first
//! successful network pass, so docker0 has the host's bip) and the host's subnet is known
//! (from the controller or the persisted state), connect to Docker (retrying while it is down), make sure the
//! pause image is there, start the runtime (which adopts the containers it finds, starting,
//! stopping and restarting nothing), serve the nodes' HTTP heartbeats on the docker0
//! gateway, and apply every desired state's containers (serialized, and again every
//! network interval).
//!
//! The runtime's [`geomx_runtime::CreationRecord`] (`containers.json`) and heartbeat key
//! (`heartbeat.key`, mode 0600, made once) live in the state directory: only the
//! containers the agent created are adopted or removed, and every role container gets its
//! own heartbeat token (see `geomx_runtime::ownership` and `geomx_runtime::auth`). The
//! heartbeat endpoint's counters (refusals per reason, metrics dropped) are logged when
//! they change (at most every [`STATS_EVERY`]) and written for Prometheus' textfile
//! collector to `heartbeat.prom` in the state directory, rendered from the agent's registry
//! ([`super::metrics`], which serves them on `/metrics` too).
//!
//! The gateway (first address of the subnet) is in every container's `GEOMX_AGENT_URL`;
//! if the controller ever leases the host another subnet, the runtime is restarted with
//! the new URL (its containers are replaced: their network changed with docker0 anyway).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use geomx_proto::v1::DesiredState;
use geomx_runtime::{
    Action, CancellationToken, CreationRecord, Engine, HEARTBEAT_KEY_FILE, HeartbeatKey,
    HeartbeatServer, MountKind, Runtime, RuntimeConfig, agent_url,
};
use ipnet::Ipv4Net;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::backoff::ErrorLog;
use super::docker::{EngineSource, error_chain};
use super::metrics::AgentMetrics;
use super::{Ctx, convert};

/// The heartbeat endpoint's counters, for Prometheus' textfile collector, in the state
/// directory.
pub const HEARTBEAT_STATS_FILE: &str = "heartbeat.prom";
/// How often the heartbeat counters are looked at (logged and written when they changed).
pub const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// docker0's address for the subnet of `state`: its first address.
pub fn gateway(state: &DesiredState) -> Option<Ipv4Addr> {
    let net: Ipv4Net = state.subnet.trim().parse().ok()?;
    Some(Ipv4Addr::from(u32::from(net.network()).saturating_add(1)))
}

/// Runs the container side until `shutdown` (see the module docs).
pub async fn containers_loop<S: EngineSource>(
    ctx: Arc<Ctx<S::Engine>>,
    source: S,
    shutdown: CancellationToken,
) {
    let mut desired = ctx.desired.subscribe();
    let mut underlay_rx = ctx.underlay.subscribe();
    // containers start once the host network is in place: a sandbox made before Docker
    // got the host's bip would get an address of the wrong subnet (and be killed by the
    // Docker restart that applies it)
    let mut net_ready = ctx.net_ready.subscribe();
    tokio::select! {
        () = shutdown.cancelled() => return,
        r = net_ready.wait_for(|r| *r) => if r.is_err() { return },
    }
    loop {
        // the subnet decides GEOMX_AGENT_URL: wait for a desired state that names one
        let (gw, controller_id) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = desired.wait_for(|d| d.as_deref().and_then(gateway).is_some()) => match r {
                Ok(d) => (
                    d.as_deref().and_then(gateway),
                    d.as_deref().map(|d| d.controller_id.clone()).unwrap_or_default(),
                ),
                Err(_) => return,
            },
        };
        let Some(gw) = gw else { return };
        let host_ip = tokio::select! {
            () = shutdown.cancelled() => return,
            r = underlay_rx.wait_for(Option::is_some) => match r {
                Ok(ip) => *ip,
                Err(_) => return,
            },
        };

        let (records, heartbeat_key) = match own_state(&ctx) {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot read the agent's container record or heartbeat key in its state directory; containers are left as they are, retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(ctx.settings.backoff_max) => {}
                }
                continue;
            }
        };
        let Some((engine, sandbox)) = connect(&ctx, &source, &shutdown).await else {
            return;
        };
        let agent_url = ctx
            .settings
            .heartbeat_port
            .map(|p| agent_url(IpAddr::V4(gw), p))
            .unwrap_or_default();
        let config = RuntimeConfig {
            agent_url: agent_url.clone(),
            host_ip,
            sandbox,
            host: ctx.settings.host.clone(),
            // output outlives its container: `geomxctl logs` of ended jobs and generations
            log_archive: Some(geomx_runtime::LogArchive {
                retention: ctx.settings.logs_retention,
                ..geomx_runtime::LogArchive::new(ctx.settings.state_dir.join("logs"))
            }),
            pulls: ctx.settings.pulls.clone(),
            records,
            controller_id: (!controller_id.is_empty()).then_some(controller_id),
            heartbeat_key,
            docker_loss_file: Some(ctx.settings.state_dir.join(geomx_runtime::DOCKER_LOSS_FILE)),
            // one set of counters for the process: a restarted runtime counts on
            counters: ctx.metrics.runtime_counters(),
            ..Default::default()
        };
        let runtime = match Runtime::start(engine, config).await {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot start the container runtime; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(ctx.settings.backoff_max) => {}
                }
                continue;
            }
        };
        let adopted = runtime.snapshot().nodes.len();
        info!(
            agent_url = %agent_url,
            adopted,
            "container runtime started (running containers are adopted, none restarted)"
        );
        ctx.runtime.send_replace(Some(runtime.clone()));

        let heartbeats = shutdown.child_token();
        if let Some(port) = ctx.settings.heartbeat_port {
            let addr = SocketAddr::new(IpAddr::V4(gw), port);
            let rt = runtime.clone();
            let token = heartbeats.clone();
            tokio::spawn(
                serve_heartbeats(rt, addr, token)
                    .instrument(info_span!("heartbeats", host = %ctx.settings.host)),
            );
            let file = ctx.settings.state_dir.join(HEARTBEAT_STATS_FILE);
            tokio::spawn(
                export_heartbeat_stats(
                    runtime.clone(),
                    ctx.metrics.clone(),
                    file,
                    heartbeats.clone(),
                )
                .instrument(info_span!("heartbeats", host = %ctx.settings.host)),
            );
        }

        let restart = apply_loop(&ctx, &runtime, gw, &mut desired, &shutdown).await;
        heartbeats.cancel();
        ctx.runtime.send_replace(None);
        runtime.shutdown();
        if !restart {
            return;
        }
        info!(
            "the host's subnet changed: restarting the container runtime with the new GEOMX_AGENT_URL"
        );
    }
}

/// The creation record and (with the heartbeat endpoint on) the heartbeat key from the
/// state directory; the key is made on the first start.
fn own_state<E: Engine>(
    ctx: &Ctx<E>,
) -> Result<(CreationRecord, Option<HeartbeatKey>), geomx_runtime::RuntimeError> {
    let dir = &ctx.settings.state_dir;
    let records = CreationRecord::open(dir)?;
    let key = match ctx.settings.heartbeat_port {
        Some(_) => Some(HeartbeatKey::load_or_create(&dir.join(HEARTBEAT_KEY_FILE))?),
        None => None,
    };
    Ok((records, key))
}

/// Logs the heartbeat endpoint's counters when they changed and writes their families of
/// the agent's registry to `file` (Prometheus text format, atomically, see
/// [`AgentMetrics::render_heartbeats`]), every [`STATS_EVERY`] until `token` is cancelled.
async fn export_heartbeat_stats<E: Engine>(
    rt: Runtime<E>,
    metrics: Arc<AgentMetrics>,
    file: std::path::PathBuf,
    token: CancellationToken,
) {
    let mut last = None;
    let mut errors = ErrorLog::default();
    loop {
        let now = rt.heartbeat_stats();
        if last.as_ref() != Some(&now) {
            if last.is_some() {
                if now.refused_total() > 0 || now.metrics_dropped > 0 {
                    warn!(counters = %now, file = %file.display(), "heartbeat endpoint: refusals and drops since the agent started");
                } else {
                    debug!(counters = %now, "heartbeat endpoint counters");
                }
            }
            match geomx_runtime::ownership::write_atomic(
                &file,
                metrics.render_heartbeats().as_bytes(),
            ) {
                Ok(()) => {
                    errors.succeeded();
                }
                Err(e) => {
                    let msg = format!("{}: {e}", file.display());
                    if errors.failed(&msg) {
                        warn!(error = %msg, "cannot write the heartbeat counters");
                    }
                }
            }
            last = Some(now);
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(STATS_EVERY) => {}
        }
    }
}

/// Connects to Docker and prepares the sandbox settings, retrying with backoff (each
/// distinct error logged once); triggers a network pass once Docker answers (so that a
/// bip written while Docker was down is verified at once). `None` on shutdown.
async fn connect<S: EngineSource>(
    ctx: &Ctx<S::Engine>,
    source: &S,
    shutdown: &CancellationToken,
) -> Option<(S::Engine, geomx_runtime::SandboxConfig)> {
    let mut backoff = ctx.settings.backoff();
    let mut errors = ErrorLog::default();
    loop {
        let attempt = async {
            let engine = source.connect().await?;
            ctx.net_trigger.now();
            let sandbox = source.sandbox(&engine).await?;
            Ok::<_, String>((engine, sandbox))
        };
        let result = tokio::select! {
            () = shutdown.cancelled() => return None,
            r = attempt => r,
        };
        match result {
            Ok(r) => {
                if errors.succeeded() {
                    info!("Docker answers: starting the container runtime");
                }
                return Some(r);
            }
            Err(e) => {
                if errors.failed(&e) {
                    warn!(error = %e, "Docker is not available yet; retrying with backoff (containers are left as they are)");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Applies the desired containers whenever the desired state changes and every network
/// interval. Returns true when the runtime must be restarted (the gateway changed), false
/// on shutdown.
async fn apply_loop<E: Engine>(
    ctx: &Ctx<E>,
    runtime: &Runtime<E>,
    gw: Ipv4Addr,
    desired: &mut tokio::sync::watch::Receiver<Option<Arc<DesiredState>>>,
    shutdown: &CancellationToken,
) -> bool {
    let mut errors = ErrorLog::default();
    let mut failing: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(ctx.settings.network_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let state = desired.borrow_and_update().clone();
        if let Some(state) = state {
            if gateway(&state).is_some_and(|g| g != gw) {
                return true;
            }
            apply(ctx, runtime, &state, &mut errors, &mut failing).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            r = desired.changed() => if r.is_err() { return false },
            _ = tick.tick() => {}
        }
    }
}

async fn apply<E: Engine>(
    ctx: &Ctx<E>,
    runtime: &Runtime<E>,
    state: &DesiredState,
    errors: &mut ErrorLog,
    failing: &mut BTreeSet<String>,
) {
    let specs = match convert::container_specs(state) {
        Ok(mut specs) => {
            check_bind_sources_early(&mut specs);
            specs
        }
        Err(e) => {
            let msg = e.to_string();
            if errors.failed(&msg) {
                error!(error = %msg, "cannot use the containers of the desired state; keeping the previous ones");
            }
            return;
        }
    };
    match runtime.apply(specs).await {
        Ok(report) => {
            if errors.succeeded() {
                info!("applying containers works again");
            }
            let changes = report.changes().count();
            if changes > 0 {
                info!(
                    revision = state.revision,
                    changes, "applied the desired containers"
                );
            } else {
                debug!(
                    revision = state.revision,
                    "desired containers already in place"
                );
            }
            let now: BTreeSet<String> = report
                .errors()
                .map(|o| {
                    format!(
                        "{}: {}",
                        describe(&o.action),
                        o.error.as_deref().unwrap_or("")
                    )
                })
                .collect();
            for e in now.difference(failing) {
                warn!(revision = state.revision, error = %e, "a container step failed (reported to the controller in the node's status)");
            }
            *failing = now;
            ctx.applied_revision
                .fetch_max(state.revision, Ordering::SeqCst);
        }
        Err(e) => {
            let msg = error_chain(&e);
            if errors.failed(&msg) {
                warn!(error = %msg, "cannot apply the desired containers (Docker unreachable?); retrying every network interval");
            }
        }
    }
}

/// A node not started yet whose bind mount source is missing on this host is handed to the
/// runtime as started: the runtime refuses it before creating anything ("bind mount source
/// ... does not exist on this host") and reports it failed, so the controller fails the job
/// while it still waits for every host to check its sources (no container of it exists).
fn check_bind_sources_early(specs: &mut [geomx_runtime::ContainerSpec]) {
    for spec in specs.iter_mut().filter(|s| !s.start) {
        if let Some(m) = spec
            .mounts
            .iter()
            .find(|m| m.kind == MountKind::Bind && !std::path::Path::new(&m.source).exists())
        {
            debug!(job = %spec.job, node = %spec.node, source = %m.source, "a bind mount source is missing: refusing the node now");
            spec.start = true;
        }
    }
}

/// One line for a planned step: what, which container of which node.
fn describe(action: &Action) -> String {
    let node = |job: &str, node: &str| format!("{job}/{node}");
    match action {
        Action::Create { kind, spec, .. } => {
            format!(
                "create {} of {}",
                kind.as_str(),
                node(&spec.job, &spec.node)
            )
        }
        Action::Replace { kind, spec, .. } => {
            format!(
                "replace {} of {}",
                kind.as_str(),
                node(&spec.job, &spec.node)
            )
        }
        Action::Start { kind, key, .. } => {
            format!("start {} of {}", kind.as_str(), node(&key.0, &key.1))
        }
        Action::Keep { kind, key, .. } => {
            format!("keep {} of {}", kind.as_str(), node(&key.0, &key.1))
        }
        Action::Remove { name, .. } => format!("remove {name}"),
        Action::Missing { kind, spec } => {
            format!(
                "{} of {} is missing",
                kind.as_str(),
                node(&spec.job, &spec.node)
            )
        }
        Action::Invalid { spec } => format!("invalid spec {}", node(&spec.job, &spec.node)),
    }
}

/// Serves the nodes' HTTP heartbeats on `addr` (the docker0 gateway) once that address
/// exists, until `token` is cancelled.
async fn serve_heartbeats<E: Engine>(rt: Runtime<E>, addr: SocketAddr, token: CancellationToken) {
    let mut errors = ErrorLog::default();
    loop {
        match HeartbeatServer::bind(addr).await {
            Ok(server) => {
                info!(url = %format!("http://{addr}"), "serving node heartbeats (GEOMX_AGENT_URL)");
                if let Err(e) = server.serve(rt, token).await {
                    warn!(error = %error_chain(&e), "the heartbeat endpoint stopped");
                }
                return;
            }
            Err(e) => {
                let msg = error_chain(&e);
                if errors.failed(&msg) {
                    info!(error = %msg, "the heartbeat endpoint waits for docker0 to carry its address; retrying every second");
                }
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_the_first_address() {
        let s = DesiredState {
            subnet: "172.17.34.0/24".into(),
            ..Default::default()
        };
        assert_eq!(gateway(&s), Some(Ipv4Addr::new(172, 17, 34, 1)));
        assert_eq!(gateway(&DesiredState::default()), None);
    }

    #[tokio::test]
    async fn heartbeat_prom_is_the_registrys_heartbeat_families() {
        use super::super::metrics::tests::{counter, parse};
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Arc::new(AgentMetrics::new());
        let rt = Runtime::start(
            geomx_runtime::fake::FakeEngine::new(&[]),
            RuntimeConfig {
                counters: metrics.runtime_counters(),
                ..Default::default()
            },
        )
        .await
        .expect("runtime");
        let report =
            geomx_runtime::heartbeat::parse_report(br#"{"job": "j", "node": "n", "step": 1}"#)
                .expect("a heartbeat");
        let refused = rt.record_heartbeat(&report, "172.17.0.9".parse().expect("ip"), None);
        assert!(refused.is_err(), "no such node");
        let file = dir.path().join(HEARTBEAT_STATS_FILE);
        let stop = CancellationToken::new();
        tokio::spawn(export_heartbeat_stats(
            rt.clone(),
            metrics.clone(),
            file.clone(),
            stop.clone(),
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&file) {
                break t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} not written",
                file.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        stop.cancel();
        let scrape = parse(&text);
        assert_eq!(
            counter(
                &scrape,
                "geomx_agent_heartbeats_refused_total",
                &[("reason", "unknown_node")]
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            counter(&scrape, "geomx_agent_heartbeats_accepted_total", &[]),
            0.0
        );
        assert_eq!(
            counter(&scrape, "geomx_agent_heartbeat_metrics_dropped_total", &[]),
            0.0
        );
        assert_eq!(
            scrape
                .docs
                .get("geomx_agent_heartbeats_refused_total")
                .map(String::as_str),
            Some("Node heartbeats (or connections) the agent refused, by reason.")
        );
        assert_eq!(
            text,
            metrics.render_heartbeats(),
            "the registry's rendering"
        );
        rt.shutdown();
    }
}
