//! The agent's side of `AgentService`: register, keep the watch stream open, report.
//!
//! * [`session_loop`]: registers (backoff with jitter, capped; each distinct error logged
//!   once), then keeps `Watch` open. Every desired state is persisted and published to the
//!   other tasks. When the stream ends (a controller restart) it is reopened with backoff;
//!   when the controller says the host is unknown (or left), the agent registers again.
//!   While the controller is away nothing changes on the host: the last desired state
//!   stays in force.
//! * [`report_loop`]: a `HostReport` every heartbeat interval, and promptly (debounced,
//!   at most [`crate::daemon::debounce::MAX_DELAY`] after the first change) when a
//!   container's lifecycle (state, exit code, address, error) or the network status
//!   changes. Progress alone rides on the periodic report (it changes with every output
//!   line). Every report is kept under the controller's message limit
//!   ([`geomx_agent::report::fit`]): over its budget it leaves out optional detail, says so
//!   in the report and logs a warning.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use geomx_agent::convert::ReportParts;
use geomx_agent::report::{self, Fitted, Omission, REPORT_BUDGET};
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_proto::v1::{
    DesiredState, HostReport, NetworkStatus as WireNetworkStatus, RegisterRequest,
    RegisterResponse, WatchRequest,
};
use geomx_runtime::{CancellationToken, Engine, Snapshot};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use super::backoff::{Backoff, ErrorLog};
use super::debounce::Debouncer;
use super::{Ctx, Settings, convert, ports};

/// How long one unary call (Register, Report) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A lazily connecting channel to the controller (mTLS unless insecure). Reconnects by
/// itself; HTTP/2 keepalives notice a controller that vanished without closing.
pub fn channel(settings: &Settings) -> Result<Channel, String> {
    let mut ep = Endpoint::from_shared(settings.controller.clone())
        .map_err(|e| format!("controller URL {}: {e}", settings.controller))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = &settings.tls {
        ep = ep
            .tls_config(tls.client_config())
            .map_err(|e| format!("TLS configuration for {}: {e}", settings.controller))?;
    }
    Ok(ep.connect_lazy())
}

/// Whether `status` means "register (again) first".
fn needs_register(status: &Status) -> bool {
    matches!(status.code(), Code::NotFound | Code::FailedPrecondition)
}

/// A status as one line, with a hint for the errors people can fix.
pub fn describe(status: &Status) -> String {
    let hint = match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            " (check [tls] in agent.toml: the agent certificate must be signed by the controller's CA, with OU=agent and CN=<name>)"
        }
        _ => "",
    };
    let mut msg = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg.push_str(hint);
    msg
}

/// The source address of the kernel's route to the controller (no packet is sent).
pub async fn route_source(controller: &str) -> Result<Ipv4Addr, String> {
    let uri: tonic::codegen::http::Uri = controller
        .parse()
        .map_err(|_| format!("{controller:?} is not a URL"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{controller:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(7946);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    let target = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("{host} has no IPv4 address (the underlay is IPv4)"))?;
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    socket
        .connect(target)
        .await
        .map_err(|e| format!("no route to the controller at {target}: {e}"))?;
    match socket.local_addr() {
        Ok(SocketAddr::V4(a)) if !a.ip().is_unspecified() => Ok(*a.ip()),
        Ok(a) => Err(format!("unexpected source address {a}")),
        Err(e) => Err(format!("source address: {e}")),
    }
}

/// Resolves this host's underlay address once (the configured one, else the route source
/// towards the controller, retried with backoff) and publishes it.
pub async fn underlay_loop<E: Engine>(ctx: Arc<Ctx<E>>, shutdown: CancellationToken) {
    if let Some(ip) = ctx.settings.underlay_ip {
        ctx.underlay.send_replace(Some(ip));
        return;
    }
    let mut backoff = ctx.settings.backoff();
    let mut errors = ErrorLog::default();
    loop {
        match route_source(&ctx.settings.controller).await {
            Ok(ip) => {
                info!(underlay_ip = %ip, "underlay address: the source of the route to the controller");
                ctx.underlay.send_replace(Some(ip));
                return;
            }
            Err(e) => {
                if errors.failed(&e) {
                    warn!(error = %e, "cannot find this host's underlay address yet (set underlay_ip in agent.toml to skip this); retrying");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

async fn wait_underlay<E: Engine>(ctx: &Ctx<E>, shutdown: &CancellationToken) -> Option<Ipv4Addr> {
    let mut rx = ctx.underlay.subscribe();
    tokio::select! {
        r = rx.wait_for(Option::is_some) => r.ok().and_then(|v| *v),
        () = shutdown.cancelled() => None,
    }
}

/// Sleeps for the next backoff delay, or until a report got through again (the controller
/// is back); false when shutting down.
async fn pause<E: Engine>(
    ctx: &Ctx<E>,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(backoff.next_delay()) => true,
        () = ctx.controller_back.notified() => true,
    }
}

/// Registers, then keeps the watch stream open, until `shutdown`.
pub async fn session_loop<E: Engine>(
    ctx: Arc<Ctx<E>>,
    mut client: AgentServiceClient<Channel>,
    shutdown: CancellationToken,
) {
    let Some(underlay) = wait_underlay(&ctx, &shutdown).await else {
        return;
    };
    let s = &ctx.settings;
    let mut backoff = s.backoff();
    let mut register_errors = ErrorLog::default();
    let mut watch_errors = ErrorLog::default();
    let mut ever_registered = false;
    'register: loop {
        let wireguard = ctx
            .wireguard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let request = RegisterRequest {
            host: s.host.clone(),
            underlay_ip: underlay.to_string(),
            pinned_subnet: s.pinned_subnet.map(|n| n.to_string()).unwrap_or_default(),
            agent_version: s.agent_version.clone(),
            agent_url: s.agent_url(underlay),
            wireguard_public_key: wireguard.as_ref().map(|w| w.0.clone()).unwrap_or_default(),
            wireguard_port: wireguard.as_ref().map_or(0, |w| u32::from(w.1)),
        };
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(CALL_TIMEOUT, client.register(request)) => r,
        };
        let response = match result {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                let msg = describe(&status);
                if register_errors.failed(&msg) {
                    warn!(controller = %s.controller, error = %msg, "registration failed; retrying with backoff (the host network and containers stay as they are)");
                }
                if !pause(&ctx, &mut backoff, &shutdown).await {
                    return;
                }
                continue 'register;
            }
            Err(_) => {
                let msg = format!("no answer within {CALL_TIMEOUT:?}");
                if register_errors.failed(&msg) {
                    warn!(controller = %s.controller, error = %msg, "registration failed; retrying with backoff");
                }
                if !pause(&ctx, &mut backoff, &shutdown).await {
                    return;
                }
                continue 'register;
            }
        };
        register_errors.succeeded();
        backoff.reset();
        registered(&ctx, &response, underlay, ever_registered);
        ever_registered = true;

        // the watch stream, reopened whenever it ends
        loop {
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                r = client.watch(geomx_proto::templates::watch_request(WatchRequest { host: s.host.clone() })) => r,
            };
            let mut stream = match opened {
                Ok(r) => r.into_inner(),
                Err(status) if needs_register(&status) => {
                    info!(reason = %status.message(), "the controller does not know this host (any more): registering again");
                    continue 'register;
                }
                Err(status) => {
                    let msg = describe(&status);
                    if watch_errors.failed(&msg) {
                        warn!(controller = %s.controller, error = %msg, "cannot watch the desired state; retrying with backoff (the last desired state stays in force)");
                    }
                    if !pause(&ctx, &mut backoff, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let mut first = true;
            loop {
                let item = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = ctx.reregister.notified() => {
                        info!("registering again (a report was refused as unknown, or the WireGuard key changed)");
                        continue 'register;
                    }
                    m = stream.message() => m,
                };
                match item {
                    Ok(Some(state)) => {
                        if first {
                            if watch_errors.succeeded() {
                                info!(controller = %s.controller, "watching the desired state again");
                            } else {
                                debug!("watching the desired state");
                            }
                            first = false;
                            backoff.reset();
                        }
                        received(&ctx, state);
                    }
                    Ok(None) => {
                        let msg = "the controller ended the watch stream".to_owned();
                        if watch_errors.failed(&msg) {
                            info!(controller = %s.controller, "{msg} (restarting?); reconnecting with backoff, the last desired state stays in force");
                        }
                        break;
                    }
                    Err(status) if needs_register(&status) => {
                        info!(reason = %status.message(), "the controller no longer knows this host: registering again");
                        continue 'register;
                    }
                    Err(status) => {
                        let msg = describe(&status);
                        if watch_errors.failed(&msg) {
                            warn!(controller = %s.controller, error = %msg, "the watch stream broke; reconnecting with backoff, the last desired state stays in force");
                        }
                        break;
                    }
                }
            }
            if !pause(&ctx, &mut backoff, &shutdown).await {
                return;
            }
        }
    }
}

fn registered<E: Engine>(ctx: &Ctx<E>, r: &RegisterResponse, underlay: Ipv4Addr, again: bool) {
    let interval = Duration::from_millis(u64::from(r.heartbeat_interval_ms));
    if !interval.is_zero() {
        ctx.heartbeat_interval.send_replace(interval);
    }
    let held = ctx
        .desired
        .borrow()
        .as_ref()
        .map(|d| d.subnet.clone())
        .filter(|s| !s.is_empty());
    if let Some(held) = held
        && held != r.subnet
    {
        warn!(was = %held, now = %r.subnet, "the controller leased this host a different subnet: docker0 and the containers' addresses will change");
    }
    info!(
        controller = %ctx.settings.controller,
        subnet = %r.subnet,
        cluster = %r.cluster_cidr,
        %underlay,
        heartbeat_interval = %humantime::format_duration(interval),
        controller_id = %r.controller_id,
        "{}",
        if again { "registered again" } else { "registered" }
    );
    ctx.registered.send_replace(Some(r.clone()));
}

fn received<E: Engine>(ctx: &Ctx<E>, state: DesiredState) {
    if state.host != ctx.settings.host {
        warn!(for_host = %state.host, "ignoring a desired state for another host");
        return;
    }
    let interval = Duration::from_millis(u64::from(state.heartbeat_interval_ms));
    if !interval.is_zero() {
        ctx.heartbeat_interval.send_if_modified(|i| {
            let changed = *i != interval;
            *i = interval;
            changed
        });
    }
    if let Err(e) = ctx.state_file.save(&state) {
        warn!(error = %e, "cannot persist the desired state (a restart without the controller would not have it)");
    }
    let starting = state.containers.iter().filter(|c| c.start).count();
    info!(
        revision = state.revision,
        subnet = %state.subnet,
        peers = state.peers.len(),
        containers = state.containers.len(),
        starting,
        "desired state"
    );
    ctx.desired.send_replace(Some(Arc::new(state)));
}

/// What of the nodes' statuses makes a prompt report worth it: their lifecycle (state,
/// exit code, container, address, error, log tail), not their progress. Progress changes
/// with every output line of every node; it travels with the next periodic report.
fn lifecycle(s: &Snapshot) -> String {
    let mut out = String::new();
    for n in &s.nodes {
        out.push_str(&format!(
            "{}/{}#{} {:?} {} {} {:?} {} {}\n",
            n.job,
            n.node,
            n.generation,
            n.state,
            n.container_id,
            n.ip,
            n.exit_code,
            n.error,
            n.log_tail.len()
        ));
    }
    out
}

/// Waits until the lifecycle of the runtime's nodes differs from `reported` (what the last
/// report carried; see [`lifecycle`]); at once if it does already. False when the runtime
/// is gone; never completes without a runtime.
async fn snapshot_changed(rx: &mut Option<watch::Receiver<Snapshot>>, reported: &str) -> bool {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    loop {
        if lifecycle(&r.borrow_and_update()) != reported {
            return true;
        }
        if r.changed().await.is_err() {
            return false;
        }
    }
}

/// Waits until a pull changed; false when the runtime is gone; never completes without a
/// runtime.
async fn pulls_changed(rx: &mut Option<watch::Receiver<u64>>) -> bool {
    match rx {
        None => std::future::pending().await,
        Some(r) => r.changed().await.is_ok(),
    }
}

/// Reports every heartbeat interval, and promptly after a change (a pull's progress at
/// most once per [`PULL_PROGRESS_EVERY`]).
pub async fn report_loop<E: Engine>(
    ctx: Arc<Ctx<E>>,
    mut client: AgentServiceClient<Channel>,
    shutdown: CancellationToken,
) {
    let mut runtime_rx = ctx.runtime.subscribe();
    let mut snapshots = runtime_rx
        .borrow_and_update()
        .as_ref()
        .map(|r| r.subscribe());
    let mut pull_rx = runtime_rx.borrow().as_ref().map(|r| r.subscribe_pulls());
    let mut net_rx = ctx.net.subscribe();
    let mut registered_rx = ctx.registered.subscribe();
    let mut debounce = Debouncer::default();
    // the node lifecycle the last report carried
    let mut reported = String::new();
    // the pulls' lifecycle the last report carried, and whether their progress changed since
    let mut reported_pulls = String::new();
    let mut progress_pending = false;
    let mut last_report = Instant::now();
    let mut next = Instant::now();
    let mut errors = ErrorLog::default();
    let mut inventory_rx = ctx.inventory.subscribe();
    // what the last report left out (logged when it changes)
    let mut omitted = Vec::new();
    loop {
        let progress_due = progress_pending.then(|| last_report + PULL_PROGRESS_EVERY);
        let wake = [debounce.deadline(), progress_due]
            .into_iter()
            .flatten()
            .fold(next, Instant::min);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(wake) => {}
            // (not while a report is pending: it will carry the change)
            ok = snapshot_changed(&mut snapshots, &reported), if debounce.deadline().is_none() => {
                if ok {
                    debounce.changed(Instant::now());
                } else {
                    snapshots = None;
                }
            }
            ok = pulls_changed(&mut pull_rx) => {
                if !ok {
                    pull_rx = None;
                } else if pulls_lifecycle(&runtime_pulls(&ctx)) != reported_pulls {
                    // a pull started, retried or ended: report soon (the images a
                    // finished pull added follow when the inventory has them)
                    debounce.changed(Instant::now());
                } else {
                    progress_pending = true;
                }
            }
            r = runtime_rx.changed() => {
                if r.is_err() {
                    return;
                }
                snapshots = runtime_rx.borrow_and_update().as_ref().map(|r| r.subscribe());
                pull_rx = runtime_rx.borrow().as_ref().map(|r| r.subscribe_pulls());
                debounce.changed(Instant::now());
            }
            r = net_rx.changed() => {
                if r.is_err() {
                    return;
                }
                debounce.changed(Instant::now());
            }
            r = inventory_rx.changed() => {
                if r.is_err() {
                    return;
                }
                // the images or the capacity changed (a pull added one): report soon
                debounce.changed(Instant::now());
            }
            r = registered_rx.changed() => {
                if r.is_err() {
                    return;
                }
                // just registered: report at once
                next = Instant::now();
            }
        }
        let now = Instant::now();
        let progress_now = progress_due.is_some_and(|d| now >= d);
        if now < next && !debounce.due(now) && !progress_now {
            continue;
        }
        let interval = *ctx.heartbeat_interval.borrow();
        debounce.reported();
        progress_pending = false;
        last_report = now;
        if ctx.registered.borrow().is_none() {
            next = now + interval;
            continue;
        }
        let (report, carried, fitted) = build_report(&ctx);
        log_fitting(&mut omitted, &fitted);
        reported = carried;
        reported_pulls = pulls_lifecycle(&runtime_pulls(&ctx));
        let grace = ctx
            .registered
            .borrow()
            .as_ref()
            .map(|r| Duration::from_millis(u64::from(r.grace_period_ms)));
        let timeout = report_timeout(interval, grace);
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(timeout, client.report(report)) => r,
        };
        match result {
            Ok(Ok(r)) => {
                if errors.succeeded() {
                    info!(controller = %ctx.settings.controller, "reporting to the controller again");
                    // the controller is back: the session need not sit out its backoff
                    ctx.controller_back.notify_one();
                }
                let i = Duration::from_millis(u64::from(r.into_inner().heartbeat_interval_ms));
                if !i.is_zero() && i != interval {
                    info!(interval = %humantime::format_duration(i), "the controller changed the heartbeat interval");
                    ctx.heartbeat_interval.send_replace(i);
                }
            }
            Ok(Err(status)) => {
                if needs_register(&status) {
                    ctx.reregister.notify_one();
                }
                let msg = describe(&status);
                if errors.failed(&msg) {
                    warn!(controller = %ctx.settings.controller, error = %msg, "report failed; retrying every heartbeat interval");
                }
            }
            Err(_) => {
                let msg = format!("no answer within {timeout:?}");
                if errors.failed(&msg) {
                    warn!(controller = %ctx.settings.controller, error = %msg, "report failed; retrying every heartbeat interval on a new connection");
                }
                // The connection may be alive but stuck: after a short underlay cut TCP
                // backs off its retransmissions exponentially (seconds), and every report
                // would queue behind it. A new connection starts with a fresh timer, so
                // reports resume as soon as the path is back.
                if let Ok(fresh) = channel(&ctx.settings) {
                    client = AgentServiceClient::new(fresh)
                        .max_decoding_message_size(geomx_proto::MAX_DESIRED_STATE_LEN);
                }
            }
        }
        next = Instant::now() + *ctx.heartbeat_interval.borrow();
    }
}

/// The pulls of the runtime (none without one).
fn runtime_pulls<E: Engine>(ctx: &Ctx<E>) -> Vec<geomx_runtime::PullStatus> {
    ctx.runtime
        .borrow()
        .as_ref()
        .map(|rt| rt.pulls())
        .unwrap_or_default()
}

/// What of the pulls makes a prompt report worth it: a pull starting, retrying or ending
/// (not its bytes, which go at most once per [`PULL_PROGRESS_EVERY`]).
fn pulls_lifecycle(pulls: &[geomx_runtime::PullStatus]) -> String {
    pulls
        .iter()
        .map(|p| {
            format!(
                "{} {} {} {}\n",
                p.image,
                p.state.as_str(),
                p.attempt,
                p.error
            )
        })
        .collect()
}

/// How long a report may wait for its answer before the next one goes on a new connection.
///
/// A third of the grace period: a stuck connection is replaced early enough for a report
/// on a new one (TLS handshake included) to arrive before the controller declares the host
/// lost, and a controller that is merely slow (a loaded host) is not given up on after one
/// heartbeat interval (each retry would add a handshake to its load). Never under the
/// interval or 1 s, never over 10 s; without a known grace period, the interval (1 to 5 s).
pub fn report_timeout(interval: Duration, grace: Option<Duration>) -> Duration {
    let floor = interval.max(Duration::from_secs(1));
    match grace.filter(|g| !g.is_zero()) {
        Some(g) => (g / 3).clamp(floor.min(Duration::from_secs(10)), Duration::from_secs(10)),
        None => interval.clamp(Duration::from_secs(1), Duration::from_secs(5)),
    }
}

/// Longest a pull's progress waits for a report while it changes.
pub const PULL_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The report of this host now, fitted under [`REPORT_BUDGET`] (see
/// [`geomx_agent::report`]), the lifecycle of the nodes it carries, and what the fitting did.
///
/// Until the container runtime has started (it adopts the host's containers, which needs
/// Docker) the report carries no node and says so (`nodes_known: false`): the controller
/// then refreshes the host's liveness but takes none of its nodes for gone. Likewise
/// `images_known` is false until Docker listed the images once.
pub fn build_report<E: Engine>(ctx: &Ctx<E>) -> (HostReport, String, Fitted) {
    let runtime = ctx.runtime.borrow().clone();
    let snapshot = runtime.as_ref().map(|rt| rt.snapshot()).unwrap_or_default();
    let net = ctx.net.borrow().clone();
    let images = ctx.images.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let pulls = runtime_pulls(ctx);
    let capacity = *ctx.capacity.lock().unwrap_or_else(|p| p.into_inner());
    let mut report = convert::host_report(&ReportParts {
        host: &ctx.settings.host,
        applied_revision: ctx.applied_revision.load(Ordering::SeqCst),
        nodes: runtime.is_some().then_some(snapshot.nodes.as_slice()),
        images: images.as_deref(),
        pulls: &pulls,
        network: WireNetworkStatus {
            converged: net.converged,
            routes: net.routes,
            error: net.error,
            links: ctx.links.lock().map(|l| l.clone()).unwrap_or_default(),
        },
        agent_version: &ctx.settings.agent_version,
        listening_ports: ports::listening_ports(),
        capacity,
    });
    let fitted = report::fit(&mut report, REPORT_BUDGET);
    (report, lifecycle(&snapshot), fitted)
}

/// Logs what fitting a report left out when that changes (not at every report): a warning
/// naming the steps and the sizes, and a line once the reports are complete again.
fn log_fitting(previous: &mut Vec<Omission>, fitted: &Fitted) {
    if *previous == fitted.omitted {
        return;
    }
    if fitted.degraded() {
        warn!(
            full_bytes = fitted.full_len,
            sent_bytes = fitted.len,
            budget_bytes = REPORT_BUDGET,
            controller_limit_bytes = report::CONTROLLER_LIMIT,
            omitted = %fitted.omitted_list(),
            "the host's report is over its budget: sending it without {} (the controller records a ReportDegraded event; see docs/operations.md)",
            fitted.omitted_list()
        );
        if fitted.len > REPORT_BUDGET {
            warn!(
                sent_bytes = fitted.len,
                "the host's report is still over its budget with every optional detail left out"
            );
        }
    } else {
        info!(
            bytes = fitted.len,
            "the host's report fits its budget again: complete"
        );
    }
    previous.clone_from(&fitted.omitted);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_timeouts_follow_the_grace_period() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // (interval, grace, timeout)
        let table = [
            (ms(500), Some(s(3)), s(1)),
            (ms(500), Some(s(5)), ms(1666)),
            (s(2), Some(s(10)), ms(3333)),
            (s(2), Some(s(3)), s(2)),
            (s(1), Some(s(60)), s(10)),
            (s(30), Some(s(90)), s(10)),
            (ms(200), Some(ms(600)), s(1)),
            (ms(500), None, s(1)),
            (s(3), None, s(3)),
            (s(9), Some(Duration::ZERO), s(5)),
        ];
        for (interval, grace, want) in table {
            let got = report_timeout(interval, grace);
            assert!(
                got.abs_diff(want) < ms(1),
                "interval {interval:?} grace {grace:?}: {got:?}, want {want:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_route_source_towards_loopback_is_loopback() {
        assert_eq!(
            route_source("https://127.0.0.1:7946").await,
            Ok(Ipv4Addr::LOCALHOST)
        );
        assert!(route_source("not a url").await.is_err());
    }

    #[test]
    fn progress_alone_is_not_a_lifecycle_change() {
        use geomx_runtime::{NodeState, NodeStatus, Progress};
        let node = NodeStatus {
            job: "j".into(),
            node: "w0".into(),
            state: NodeState::Running,
            ip: "172.17.34.2".into(),
            ..Default::default()
        };
        let base = Snapshot {
            revision: 1,
            nodes: vec![node.clone()],
        };
        let mut progressed = base.clone();
        progressed.revision = 2;
        progressed.nodes[0].progress = Some(Progress {
            iteration: 5,
            ..Default::default()
        });
        assert_eq!(lifecycle(&base), lifecycle(&progressed));
        let mut crashed = progressed.clone();
        crashed.nodes[0].state = NodeState::Failed;
        crashed.nodes[0].exit_code = Some(3);
        assert_ne!(lifecycle(&base), lifecycle(&crashed));
        let mut moved = base.clone();
        moved.nodes[0].ip = "172.17.34.9".into();
        assert_ne!(lifecycle(&base), lifecycle(&moved));
    }

    #[test]
    fn statuses_are_described_with_hints() {
        let s = Status::permission_denied("certificate CN=b may not act for host a");
        let d = describe(&s);
        assert!(d.starts_with("PermissionDenied: certificate CN=b"), "{d}");
        assert!(d.contains("OU=agent"), "{d}");
        assert!(needs_register(&Status::not_found(
            "host \"a\" is not registered"
        )));
        assert!(needs_register(&Status::failed_precondition("left")));
        assert!(!needs_register(&Status::unavailable("down")));
    }
}
