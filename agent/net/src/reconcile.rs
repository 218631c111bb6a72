//! The reconciler: observe the host, plan ([`crate::plan`], pure), apply
//! ([`crate::apply`]); the list of what changed out. A pass that restarted Docker is
//! planned again at once (Docker rewrites its iptables when it starts).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ROUTE_PROTOCOL;
use crate::apply::{self, Applied};
use crate::backend::{PeerBackend, VXLAN_INTERFACE, WG_INTERFACE};
use crate::change::Change;
use crate::config::NetConfig;
use crate::daemon_json::{self, Doc, Remembered};
use crate::desired::DesiredNetwork;
use crate::error::Result;
use crate::kernel::Kernel;
use crate::observe::{self, blocking, read_state};
use crate::plan::{self, DockerState, HostSettings, NetPlan, PlanMemory, describe_via};
use crate::rules::{self, FILTER_CHAIN, NAT_CHAIN};

/// The sysctl geomx keeps at 1.
pub const IP_FORWARD: &str = "net.ipv4.ip_forward";
pub(crate) const DOCKER0: &str = "docker0";
/// How many times one call of [`Reconciler::reconcile`] plans again after a Docker restart.
const MAX_PLANS: usize = 3;
/// The first retry after a failed pass; doubled on each failure up to the interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The retry delays after failed passes: [`FIRST_RETRY`], doubling with each failure in a
/// row, never more than `cap` (the pass interval); a pass that succeeds starts it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    /// Before any failure, for retries of at most `cap`.
    pub(crate) fn new(cap: Duration) -> Backoff {
        Backoff {
            next: FIRST_RETRY,
            cap,
        }
    }

    /// A pass failed: how long to wait before the next one.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.next.min(self.cap);
        self.next = self.next.saturating_mul(2).min(self.cap);
        wait
    }

    /// A pass succeeded: the next failure waits [`FIRST_RETRY`] again.
    pub(crate) fn succeeded(&mut self) {
        self.next = FIRST_RETRY;
    }
}

/// What a pass tells its caller to do next (as kube-rs's `Action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The host matches: the next pass at the interval (or on a change).
    Converged,
    /// Plan again at once (the pass restarted Docker).
    Requeue,
}

/// One pass's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PassOutcome {
    /// What it changed.
    pub changes: Vec<Change>,
    /// What next.
    pub action: Action,
    /// Each peer's backend.
    pub backends: Vec<(String, PeerBackend)>,
    /// Docker did not answer: daemon.json waits for its start, docker0 was not checked.
    pub docker_offline: bool,
}

fn record(changes: &mut Vec<Change>, change: Change) {
    info!("{change}");
    changes.push(change);
}

/// Asks a running [`Reconciler::run`] for a pass now.
#[derive(Clone, Debug)]
pub struct PassTrigger(Arc<Notify>);

impl PassTrigger {
    /// Requests a pass as soon as the loop is idle (requests made meanwhile coalesce).
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// Brings the host network to a desired state and keeps it there.
pub struct Reconciler {
    config: NetConfig,
    kernel: Kernel,
    memory: PlanMemory,
    random_fully_known: bool,
    trigger: Arc<Notify>,
    last_applied: Option<DesiredNetwork>,
    docker_offline: bool,
}

impl fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.config)
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler for the host described by `config`, acting through `kernel`.
    pub fn new(config: NetConfig, kernel: Kernel) -> Reconciler {
        Reconciler {
            config,
            kernel,
            memory: PlanMemory::default(),
            random_fully_known: false,
            trigger: Arc::new(Notify::new()),
            last_applied: None,
            docker_offline: false,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// What it acts through.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The desired state of the last pass that succeeded.
    pub fn last_applied(&self) -> Option<&DesiredNetwork> {
        self.last_applied.as_ref()
    }

    /// Whether the last pass found Docker not answering (it ran without it).
    pub fn docker_offline(&self) -> bool {
        self.docker_offline
    }

    /// A handle that makes [`Reconciler::run`] do a pass now.
    pub fn trigger(&self) -> PassTrigger {
        PassTrigger(self.trigger.clone())
    }

    fn settings(&self) -> HostSettings {
        HostSettings {
            host: self.config.host.clone(),
            backend: self.config.backend,
            wireguard_port: self.config.wireguard_port,
            daemon_json: self.kernel.daemon_config.path().to_path_buf(),
            docker_host: self.kernel.docker.host().to_string(),
            docker_required: self.config.docker_required,
        }
    }

    /// What a pass would do now, without doing it (`geomx-agent network plan`); reads the
    /// host, changes nothing.
    pub async fn plan(&mut self, desired: &DesiredNetwork) -> Result<NetPlan> {
        desired.validate(&self.config.host)?;
        let observed = observe::observe(&self.kernel, &self.config, desired).await?;
        self.learn(&observed);
        plan::plan(desired, &self.settings(), &observed, &self.memory)
    }

    fn learn(&mut self, observed: &plan::Observed) {
        if !self.random_fully_known {
            self.memory.random_fully = self.kernel.firewall.supports_random_fully();
            self.random_fully_known = true;
        }
        match &observed.docker {
            DockerState::Up(v) => {
                if self.docker_offline {
                    info!(version = %v.version, "Docker answers again");
                }
                self.docker_offline = false;
                self.memory.last_docker = Some(v.clone());
            }
            DockerState::Down { reason } => {
                if !self.docker_offline {
                    warn!(reason = %reason, "Docker is not answering: applying routes and iptables without it; daemon.json is written for its next start (it is not restarted)");
                }
                self.docker_offline = true;
            }
        }
    }

    /// One pass: observe, plan (nothing is changed when the desired state is invalid or a
    /// peer cannot be reached as asked), apply. Returns what it changed and what next.
    pub async fn pass(&mut self, desired: &DesiredNetwork) -> Result<PassOutcome> {
        let plan = self.plan(desired).await?;
        let mut applied = Applied::default();
        apply::apply(
            &self.kernel,
            &self.config,
            &plan,
            &mut self.memory,
            &mut applied,
        )
        .await?;
        if !applied.restarted {
            self.last_applied = Some(desired.clone());
        }
        Ok(PassOutcome {
            changes: applied.changes,
            action: if applied.restarted {
                Action::Requeue
            } else {
                Action::Converged
            },
            backends: plan.backends,
            docker_offline: self.docker_offline,
        })
    }

    /// Passes until the host matches (at most three, when Docker restarts): validates
    /// `desired` and reads everything first (nothing is changed when that fails), then
    /// brings daemon.json/docker0, ip_forward, iptables, the overlays and routes to the
    /// desired state. Returns what it changed (empty when the host already matched);
    /// every change is also logged.
    pub async fn reconcile(&mut self, desired: &DesiredNetwork) -> Result<Vec<Change>> {
        let span = info_span!("net_pass", host = %self.config.host);
        async move {
            let mut changes = Vec::new();
            for _ in 0..MAX_PLANS {
                let outcome = self.pass(desired).await?;
                changes.extend(outcome.changes);
                if outcome.action == Action::Converged {
                    break;
                }
            }
            if changes.is_empty() {
                debug!("no change");
            }
            Ok(changes)
        }
        .instrument(span)
        .await
    }

    /// Removes every interface, route, chain and jump geomx owns and gives daemon.json back
    /// its pre-geomx values (restarting Docker when the file changes). daemon.json and the
    /// state file are read first: when either is unreadable nothing is changed. Routes are
    /// removed only inside the cluster CIDR of the last pass (see [`Reconciler::cleanup_within`]).
    pub async fn cleanup(&mut self) -> Result<Vec<Change>> {
        self.cleanup_within(None).await
    }

    /// [`Reconciler::cleanup`] with the cluster CIDR geomx's routes lie in (`None`: the
    /// last pass's). Protocol 247 alone is not proof enough that a route is geomx's: with
    /// no cluster known, only routes through geomx's own interfaces are removed and the
    /// others are named in a warning.
    pub async fn cleanup_within(&mut self, cluster: Option<Ipv4Net>) -> Result<Vec<Change>> {
        let span = info_span!("net_cleanup", host = %self.config.host);
        async move {
            let k = self.kernel.clone();
            let daemon_text = k.daemon_config.read()?;
            let doc = daemon_json::parse(k.daemon_config.path(), daemon_text.as_deref())?;
            let state = read_state(&k)?;
            let mut changes = Vec::new();

            let fw = k.firewall.clone();
            let fixes = blocking(move || {
                let mut out = Vec::new();
                for (table, hook, chain) in [
                    ("nat", "POSTROUTING", NAT_CHAIN),
                    ("filter", "FORWARD", FILTER_CHAIN),
                ] {
                    let seen = observe::chain(&*fw, table, hook, chain)?;
                    if let Some(fix) = rules::removal(chain, &seen) {
                        fw.restore(&fix.payload)?;
                        out.extend(fix.changes);
                    }
                }
                Ok(out)
            })
            .await?;
            for c in fixes {
                record(&mut changes, c);
            }

            let cluster = cluster
                .or(self.last_applied.as_ref().map(|d| d.cluster))
                .or(state.as_ref().and_then(|s| s.cluster));
            let ours = |r: &crate::kernel::KernelRoute| {
                r.device
                    .as_deref()
                    .is_some_and(|d| d == WG_INTERFACE || d == VXLAN_INTERFACE)
            };
            let mut left = Vec::new();
            for r in k.routes.main_table().await? {
                if r.protocol != ROUTE_PROTOCOL {
                    continue;
                }
                let inside = match cluster {
                    Some(c) => c.contains(&r.destination),
                    None => ours(&r),
                };
                if !inside {
                    if cluster.is_none() {
                        left.push(r.to_string());
                    }
                    continue;
                }
                let destination = r.destination;
                let via = describe_via(&r);
                k.routes.delete(r).await?;
                record(&mut changes, Change::RouteDeleted { destination, via });
            }
            if !left.is_empty() {
                warn!(routes = %left.join("; "), "the cluster CIDR is not known (no desired state on this host): these protocol 247 routes were left; remove them with `ip route del` if they are geomx's");
            }
            if k.vxlan.show(VXLAN_INTERFACE).await?.is_some() {
                k.vxlan.delete(VXLAN_INTERFACE).await?;
                record(
                    &mut changes,
                    Change::VxlanDeleted {
                        interface: VXLAN_INTERFACE.into(),
                    },
                );
            }
            let wg = k.wireguard.clone();
            let deleted = blocking(move || {
                let there = wg.show(WG_INTERFACE)?.is_some();
                wg.delete(WG_INTERFACE)?;
                Ok(there)
            })
            .await?;
            if deleted {
                record(
                    &mut changes,
                    Change::WireguardDeleted {
                        interface: WG_INTERFACE.into(),
                    },
                );
            }

            if let Some(remembered) = state {
                self.restore_daemon_json(&remembered, daemon_text, &doc, &mut changes)
                    .await?;
                k.state.remove()?;
            }
            self.last_applied = None;
            self.memory.restarted_for = None;
            if changes.is_empty() {
                debug!("nothing to clean up");
            }
            Ok(changes)
        }
        .instrument(span)
        .await
    }

    async fn restore_daemon_json(
        &self,
        remembered: &Remembered,
        daemon_text: Option<String>,
        doc: &Doc,
        changes: &mut Vec<Change>,
    ) -> Result<()> {
        let k = &self.kernel;
        let restored = remembered.restore(doc);
        let file_differs = restored.text != daemon_text;
        let docker_up = k.docker.version().await.is_ok();
        let old = remembered.docker0.first().copied();
        // docker0 off its pre-geomx address also counts: an earlier cleanup may have
        // written the file and failed to restart Docker
        let docker0_differs = match (docker_up, old) {
            (true, Some(old)) => !k
                .routes
                .link_addresses(DOCKER0.into())
                .await?
                .unwrap_or_default()
                .contains(&old),
            _ => false,
        };
        if !file_differs && !docker0_differs {
            return Ok(());
        }
        let restored_doc = daemon_json::parse(k.daemon_config.path(), restored.text.as_deref())?;
        let mut wrote_step = false;
        if docker0_differs
            && !restored_doc.contains_key("bip")
            && let Some(old) = old
        {
            // Docker keeps the default bridge's last subnet in its own store when bip is
            // unset: show it docker0's old address once, then remove the key again
            let mut step = restored_doc.clone();
            step.insert("bip".into(), serde_json::Value::String(old.to_string()));
            k.daemon_config.write(&daemon_json::render(&step))?;
            wrote_step = true;
            apply::restart_docker(k, &self.config).await?;
            record(
                changes,
                Change::DockerRestarted {
                    reason: format!(
                        "bring docker0 back to its pre-geomx address {old} before removing bip"
                    ),
                },
            );
        }
        if file_differs || wrote_step {
            match &restored.text {
                Some(text) => k.daemon_config.write(text)?,
                None => k.daemon_config.remove()?,
            }
            record(
                changes,
                Change::DaemonJsonRestored {
                    path: k.daemon_config.path().to_path_buf(),
                    keys: restored.changes.clone(),
                    removed: restored.text.is_none(),
                },
            );
        }
        if docker_up {
            apply::restart_docker(k, &self.config).await?;
            record(
                changes,
                Change::DockerRestarted {
                    reason: if file_differs || wrote_step {
                        "daemon.json restored".into()
                    } else {
                        "docker0 was not at its pre-geomx address".into()
                    },
                },
            );
        } else {
            warn!(
                "Docker at {} is not running; it reads the restored daemon.json when it starts",
                k.docker.host()
            );
        }
        Ok(())
    }

    /// Keeps the host at the desired state: a pass whenever `desired` gets a new value or
    /// [`PassTrigger::now`] is called, and every [`NetConfig::interval`] otherwise, until
    /// `shutdown` completes. Until the first `Some` nothing is done; afterwards `None`
    /// (or a closed channel: the controller is gone) keeps the last known desired state in
    /// force — static stability. `on_pass` sees every pass's outcome. Failures are logged
    /// (once per distinct error) and retried with backoff (1 s, doubling, up to the
    /// interval); a pass that restarted Docker is followed by another at once.
    pub async fn run<S, F>(
        &mut self,
        mut desired: watch::Receiver<Option<DesiredNetwork>>,
        shutdown: S,
        mut on_pass: F,
    ) where
        S: Future<Output = ()>,
        F: FnMut(&DesiredNetwork, &Result<PassOutcome>),
    {
        let mut current: Option<DesiredNetwork> = desired.borrow_and_update().clone();
        let mut open = true;
        let mut last_error: Option<String> = None;
        let mut backoff = Backoff::new(self.config.interval);
        let trigger = self.trigger.clone();
        tokio::pin!(shutdown);
        loop {
            let mut wait = self.config.interval;
            if let Some(d) = current.clone() {
                let result = self.pass(&d).await;
                match &result {
                    Ok(outcome) => {
                        backoff.succeeded();
                        if last_error.take().is_some() {
                            info!(host = %self.config.host, "host network matches the desired state again");
                        }
                        if outcome.action == Action::Requeue {
                            wait = Duration::ZERO;
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        wait = backoff.failed();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            warn!(host = %self.config.host, error = %msg, "network pass failed; retrying with backoff (next in {wait:?})");
                        } else {
                            debug!(host = %self.config.host, error = %msg, "network pass failed again");
                        }
                        last_error = Some(msg);
                    }
                }
                on_pass(&d, &result);
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
                _ = trigger.notified() => {}
                changed = desired.changed(), if open => match changed {
                    Ok(()) => {
                        if let Some(d) = desired.borrow_and_update().clone() {
                            current = Some(d);
                        }
                    }
                    Err(_) => open = false,
                },
            }
        }
    }
}
