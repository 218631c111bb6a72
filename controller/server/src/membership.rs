//! Host membership: registration and leases, heartbeats, loss detection, and the desired
//! state of every host.
//!
//! The [`Membership`] keeps an in-memory view of every host (loaded from the [`Store`] at
//! start) and changes it only after the change is durable: mutations are serialized by one
//! async lock, written as one [`Batch`], flushed, then applied to the view and published.
//!
//! Publishing bumps the cluster revision (persisted with the change) on a
//! `tokio::sync::watch` channel; every open `Watch` stream wakes up, recomputes its host's
//! [`DesiredState`] with [`Membership::desired_state_for`] and sends it if it differs from
//! what it sent last. Nothing polls.
//!
//! Heartbeat times are soft state: they live in memory only. After a controller restart
//! every known host gets a fresh grace period to report before it is declared lost.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use geomx_proto::v1::{DesiredState, HostReport, Peer};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::leases::{LeaseError, LeasePool};
use crate::store::{
    Batch, EventRecord, EventScope, HostRecord, HostState, LeaseRecord, NetworkRecord, Store,
    StoreError, now_ms,
};
use crate::workloads::{HostChange, NoWorkloads, Workloads};

/// Errors of membership operations; each maps to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// No host of that name registered.
    #[error("host {0:?} is not registered; call Register first")]
    UnknownHost(String),
    /// The host left the cluster.
    #[error("host {0:?} left the cluster; call Register to join again")]
    HostLeft(String),
    /// Another live host uses the underlay address.
    #[error("underlay IP {ip} is already used by live host {holder:?}")]
    UnderlayInUse {
        /// The address.
        ip: Ipv4Addr,
        /// The host using it.
        holder: String,
    },
    /// No lease could be granted.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The jobs layer refused a report.
    #[error("{}", .0.message())]
    Workload(Status),
}

impl From<MembershipError> for Status {
    fn from(e: MembershipError) -> Status {
        let msg = e.to_string();
        match e {
            MembershipError::UnknownHost(_) => Status::not_found(msg),
            MembershipError::HostLeft(_) => Status::failed_precondition(msg),
            MembershipError::UnderlayInUse { .. } => Status::already_exists(msg),
            MembershipError::Lease(LeaseError::PinnedTaken { .. }) => Status::already_exists(msg),
            MembershipError::Lease(LeaseError::Exhausted { .. }) => Status::resource_exhausted(msg),
            MembershipError::Lease(_) => Status::invalid_argument(format!("pinned_subnet: {msg}")),
            MembershipError::Store(s) => Status::new(s.code(), msg),
            MembershipError::Workload(status) => status,
        }
    }
}

/// Heartbeat timing handed to agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often agents report.
    pub heartbeat_interval: Duration,
    /// After how long without a report a host is lost.
    pub grace_period: Duration,
}

/// A validated registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Host name.
    pub host: String,
    /// Underlay IPv4 address.
    pub underlay_ip: Ipv4Addr,
    /// Subnet the agent insists on.
    pub pinned_subnet: Option<Ipv4Net>,
    /// Agent version.
    pub agent_version: String,
    /// Agent API URL.
    pub agent_url: String,
}

/// The validated parts of a heartbeat the membership keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatData {
    /// Agent version.
    pub agent_version: String,
    /// Network status.
    pub network: NetworkRecord,
    /// Images on the host, sorted; `None` when the agent does not know them yet (the last
    /// known list is kept).
    pub images: Option<Vec<String>>,
    /// Role containers running; `None` when the agent does not know its containers yet
    /// (the last known count is kept).
    pub running_containers: Option<u32>,
    /// TCP ports listening on the host's own addresses, sorted.
    pub listening_ports: Vec<u32>,
}

/// A host as [`Membership::hosts`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// The stored record.
    pub record: HostRecord,
    /// Time since its last Register or Report (since the controller started, if none since).
    pub heartbeat_age: Duration,
    /// Role containers running, from its last report.
    pub containers: u32,
    /// TCP ports listening on the host, from its last report (empty until it reports).
    pub listening_ports: Vec<u32>,
}

#[derive(Clone, Debug)]
struct HostEntry {
    record: HostRecord,
    last_seen: Instant,
    containers: u32,
    listening_ports: Vec<u32>,
}

/// The membership of the cluster. Shared as `Arc<Membership>`.
pub struct Membership {
    store: Store,
    pool: LeasePool,
    timing: Timing,
    view: RwLock<BTreeMap<String, HostEntry>>,
    write: tokio::sync::Mutex<()>,
    revision: watch::Sender<u64>,
    workloads: RwLock<Arc<dyn Workloads>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("pool", &self.pool)
            .field("timing", &self.timing)
            .field("revision", &*self.revision.borrow())
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// Loads the membership from `store`. Every known host gets a fresh grace period.
    pub fn load(
        store: Store,
        pool: LeasePool,
        timing: Timing,
    ) -> Result<Arc<Membership>, MembershipError> {
        let now = Instant::now();
        let mut view = BTreeMap::new();
        for record in store.hosts()? {
            if let Some(subnet) = record.subnet
                && !pool.contains(subnet)
            {
                tracing::warn!(
                    host = %record.name,
                    %subnet,
                    cluster = %pool.cluster(),
                    prefix = pool.prefix(),
                    "lease does not fit the configured cluster CIDR/prefix; the host gets a new subnet when it registers again"
                );
            }
            view.insert(
                record.name.clone(),
                HostEntry {
                    record,
                    last_seen: now,
                    containers: 0,
                    listening_ports: Vec::new(),
                },
            );
        }
        let stored_leases = store.leases()?;
        for lease in &stored_leases {
            let consistent = view
                .get(&lease.host)
                .is_some_and(|e| e.record.subnet == Some(lease.subnet));
            if !consistent {
                tracing::warn!(subnet = %lease.subnet, host = %lease.host, "lease without a matching host record");
            }
        }
        let revision = store.revision()?.max(1);
        let (revision, _) = watch::channel(revision);
        Ok(Arc::new(Membership {
            store,
            pool,
            timing,
            view: RwLock::new(view),
            write: tokio::sync::Mutex::new(()),
            revision,
            workloads: RwLock::new(Arc::new(NoWorkloads)),
        }))
    }

    /// Installs the jobs layer (see [`crate::workloads`]).
    pub fn set_workloads(&self, workloads: Arc<dyn Workloads>) {
        *self
            .workloads
            .write()
            .unwrap_or_else(PoisonError::into_inner) = workloads;
    }

    fn workloads(&self) -> Arc<dyn Workloads> {
        self.workloads
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn view(&self) -> RwLockReadGuard<'_, BTreeMap<String, HostEntry>> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn view_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<String, HostEntry>> {
        self.view.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store (for the jobs layer's own records).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The controller id of the store.
    pub fn controller_id(&self) -> &str {
        self.store.controller_id()
    }

    /// The lease pool.
    pub fn pool(&self) -> LeasePool {
        self.pool
    }

    /// The heartbeat timing.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The current cluster revision.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Every known host, by name.
    pub fn hosts(&self) -> Vec<HostView> {
        self.view().values().map(host_view).collect()
    }

    /// One host.
    pub fn host(&self, name: &str) -> Option<HostView> {
        self.view().get(name).map(host_view)
    }

    /// Admits `reg.host` (again) and returns its subnet. Idempotent: a registration that
    /// changes nothing writes nothing.
    pub async fn register(&self, reg: Registration) -> Result<Ipv4Net, MembershipError> {
        let guard = self.write.lock().await;
        let now = now_ms();
        let (old, leases) = {
            let view = self.view();
            if let Some(other) = view.values().find(|e| {
                e.record.name != reg.host
                    && e.record.state == HostState::Ready
                    && e.record.underlay_ip == reg.underlay_ip
            }) {
                return Err(MembershipError::UnderlayInUse {
                    ip: reg.underlay_ip,
                    holder: other.record.name.clone(),
                });
            }
            (
                view.get(&reg.host).map(|e| e.record.clone()),
                leases_of(&view),
            )
        };
        let subnet = self.pool.choose(
            &reg.host,
            old.as_ref().and_then(|o| o.subnet),
            old.as_ref().and_then(|o| o.last_subnet),
            reg.pinned_subnet,
            &leases,
        )?;
        let mut rec = old.clone().unwrap_or_else(|| HostRecord {
            name: reg.host.clone(),
            underlay_ip: reg.underlay_ip,
            subnet: None,
            last_subnet: None,
            pinned_subnet: None,
            state: HostState::Ready,
            state_since_ms: now,
            registered_at_ms: now,
            agent_version: String::new(),
            agent_url: String::new(),
            network: NetworkRecord::default(),
            images: Vec::new(),
        });
        let change = match old.as_ref().map(|o| o.state) {
            None | Some(HostState::Left) => Some(HostChange::Joined),
            Some(HostState::Lost) => Some(HostChange::Returned),
            Some(HostState::Ready) => None,
        };
        rec.underlay_ip = reg.underlay_ip;
        rec.subnet = Some(subnet);
        rec.last_subnet = Some(subnet);
        rec.pinned_subnet = reg.pinned_subnet;
        rec.agent_version = reg.agent_version;
        rec.agent_url = reg.agent_url;
        if rec.state != HostState::Ready {
            rec.state = HostState::Ready;
            rec.state_since_ms = now;
        }
        if old.as_ref() == Some(&rec) {
            self.touch(&reg.host);
            return Ok(subnet);
        }
        let topology = old.as_ref().is_none_or(|o| {
            o.state != rec.state || o.underlay_ip != rec.underlay_ip || o.subnet != rec.subnet
        });

        let mut batch = Batch::new();
        let old_subnet = old.as_ref().and_then(|o| o.subnet);
        if old_subnet != Some(subnet) {
            if let Some(s) = old_subnet {
                batch.remove_lease(s);
            }
            batch.put_lease(&LeaseRecord {
                subnet,
                host: reg.host.clone(),
                granted_at_ms: now,
            })?;
        }
        batch.put_host(&rec)?;
        let event = |kind: &str, message: String| EventRecord {
            at_ms: now,
            kind: kind.to_owned(),
            message,
            host: reg.host.clone(),
            ..Default::default()
        };
        let scope = EventScope::Host(&reg.host);
        match (&old, change) {
            (None, _) => batch.event(
                scope,
                &event(
                    "HostRegistered",
                    format!(
                        "registered with subnet {subnet}, underlay {}",
                        rec.underlay_ip
                    ),
                ),
            )?,
            (Some(_), Some(HostChange::Joined)) => batch.event(
                scope,
                &event("HostRejoined", format!("joined again with subnet {subnet}")),
            )?,
            (Some(_), Some(HostChange::Returned)) => batch.event(
                scope,
                &event(
                    "HostReturned",
                    format!("registered again with subnet {subnet}"),
                ),
            )?,
            _ => {}
        }
        if let Some(o) = &old {
            if o.subnet.is_some() && o.subnet != rec.subnet {
                batch.event(
                    scope,
                    &event(
                        "SubnetChanged",
                        format!(
                            "subnet {} → {subnet}",
                            o.subnet.map_or_else(|| "-".to_owned(), |s| s.to_string())
                        ),
                    ),
                )?;
            }
            if o.underlay_ip != rec.underlay_ip {
                batch.event(
                    scope,
                    &event(
                        "UnderlayChanged",
                        format!("underlay {} → {}", o.underlay_ip, rec.underlay_ip),
                    ),
                )?;
            }
        }
        let revision = topology.then(|| self.revision() + 1);
        if let Some(r) = revision {
            batch.set_revision(r);
        }
        self.store.commit(batch).await?;
        {
            let mut view = self.view_mut();
            let entry = view.entry(reg.host.clone()).or_insert_with(|| HostEntry {
                record: rec.clone(),
                last_seen: Instant::now(),
                containers: 0,
                listening_ports: Vec::new(),
            });
            entry.record = rec;
            entry.last_seen = Instant::now();
        }
        if let Some(r) = revision {
            self.revision.send_replace(r);
        }
        drop(guard);
        if let Some(c) = change {
            self.workloads().host_changed(&reg.host, c).await;
        }
        Ok(subnet)
    }

    fn touch(&self, host: &str) {
        if let Some(e) = self.view_mut().get_mut(host) {
            e.last_seen = Instant::now();
        }
    }

    /// Records a heartbeat of `host`: refreshes its last-seen time, brings a lost host back,
    /// persists what changed (version, network status, images), then hands `raw` to the
    /// jobs layer.
    pub async fn report(
        &self,
        host: &str,
        data: HeartbeatData,
        raw: &HostReport,
    ) -> Result<(), MembershipError> {
        let needs_write = {
            let mut view = self.view_mut();
            let e = view
                .get_mut(host)
                .ok_or_else(|| MembershipError::UnknownHost(host.to_owned()))?;
            if e.record.state == HostState::Left {
                return Err(MembershipError::HostLeft(host.to_owned()));
            }
            e.last_seen = Instant::now();
            if let Some(n) = data.running_containers {
                e.containers = n;
            }
            e.listening_ports.clone_from(&data.listening_ports);
            e.record.state == HostState::Lost
                || e.record.agent_version != data.agent_version
                || e.record.network != data.network
                || data.images.as_ref().is_some_and(|i| *i != e.record.images)
        };
        let mut change = None;
        if needs_write {
            let guard = self.write.lock().await;
            let now = now_ms();
            let old = {
                let view = self.view();
                let e = view
                    .get(host)
                    .ok_or_else(|| MembershipError::UnknownHost(host.to_owned()))?;
                if e.record.state == HostState::Left {
                    return Err(MembershipError::HostLeft(host.to_owned()));
                }
                if e.record.state == HostState::Lost
                    && let Some(other) = view.values().find(|o| {
                        o.record.name != host
                            && o.record.state == HostState::Ready
                            && o.record.underlay_ip == e.record.underlay_ip
                    })
                {
                    return Err(MembershipError::UnderlayInUse {
                        ip: e.record.underlay_ip,
                        holder: other.record.name.clone(),
                    });
                }
                e.record.clone()
            };
            let mut rec = old.clone();
            rec.agent_version = data.agent_version;
            rec.network = data.network;
            if let Some(images) = data.images {
                rec.images = images;
            }
            let mut batch = Batch::new();
            let mut revision = None;
            if rec.state == HostState::Lost {
                rec.state = HostState::Ready;
                rec.state_since_ms = now;
                change = Some(HostChange::Returned);
                let r = self.revision() + 1;
                batch.set_revision(r);
                revision = Some(r);
                batch.event(
                    EventScope::Host(host),
                    &EventRecord {
                        at_ms: now,
                        kind: "HostReturned".into(),
                        message: format!(
                            "reporting again with subnet {}",
                            rec.subnet.map_or_else(|| "-".to_owned(), |s| s.to_string())
                        ),
                        host: host.to_owned(),
                        ..Default::default()
                    },
                )?;
            }
            if rec != old {
                batch.put_host(&rec)?;
                self.store.commit(batch).await?;
                if let Some(e) = self.view_mut().get_mut(host) {
                    e.record = rec;
                }
                if let Some(r) = revision {
                    self.revision.send_replace(r);
                    tracing::info!(host, "host is back");
                }
            }
            drop(guard);
        }
        let workloads = self.workloads();
        if let Some(c) = change {
            workloads.host_changed(host, c).await;
        }
        workloads
            .host_reported(host, raw)
            .await
            .map_err(MembershipError::Workload)
    }

    /// Removes `host` from the cluster and releases its lease. Leaving twice is fine.
    pub async fn leave(&self, host: &str) -> Result<(), MembershipError> {
        let guard = self.write.lock().await;
        let old = self
            .view()
            .get(host)
            .map(|e| e.record.clone())
            .ok_or_else(|| MembershipError::UnknownHost(host.to_owned()))?;
        if old.state == HostState::Left {
            return Ok(());
        }
        let now = now_ms();
        let mut rec = old.clone();
        rec.state = HostState::Left;
        rec.state_since_ms = now;
        rec.subnet = None;
        let mut batch = Batch::new();
        if let Some(s) = old.subnet {
            batch.remove_lease(s);
        }
        batch.put_host(&rec)?;
        batch.event(
            EventScope::Host(host),
            &EventRecord {
                at_ms: now,
                kind: "HostLeft".into(),
                message: format!(
                    "left; subnet {} released",
                    old.subnet.map_or_else(|| "-".to_owned(), |s| s.to_string())
                ),
                host: host.to_owned(),
                ..Default::default()
            },
        )?;
        let r = self.revision() + 1;
        batch.set_revision(r);
        self.store.commit(batch).await?;
        if let Some(e) = self.view_mut().get_mut(host) {
            e.record = rec;
        }
        self.revision.send_replace(r);
        drop(guard);
        self.workloads().host_changed(host, HostChange::Left).await;
        Ok(())
    }

    /// Marks `host` lost if it is ready and silent for longer than the grace period.
    /// Returns whether it did.
    pub async fn mark_lost_if_silent(&self, host: &str) -> Result<bool, MembershipError> {
        let guard = self.write.lock().await;
        let (old, silent_for) = {
            let view = self.view();
            let Some(e) = view.get(host) else {
                return Ok(false);
            };
            let silent_for = e.last_seen.elapsed();
            if e.record.state != HostState::Ready || silent_for <= self.timing.grace_period {
                return Ok(false);
            }
            (e.record.clone(), silent_for)
        };
        let now = now_ms();
        let mut rec = old;
        rec.state = HostState::Lost;
        rec.state_since_ms = now;
        let mut batch = Batch::new();
        batch.put_host(&rec)?;
        batch.event(
            EventScope::Host(host),
            &EventRecord {
                at_ms: now,
                kind: "HostLost".into(),
                message: format!(
                    "no heartbeat for {} (grace period {}); routes to it withdrawn, subnet {} kept",
                    humantime::format_duration(Duration::from_millis(
                        u64::try_from(silent_for.as_millis()).unwrap_or(u64::MAX)
                    )),
                    humantime::format_duration(self.timing.grace_period),
                    rec.subnet.map_or_else(|| "-".to_owned(), |s| s.to_string())
                ),
                host: host.to_owned(),
                ..Default::default()
            },
        )?;
        let r = self.revision() + 1;
        batch.set_revision(r);
        self.store.commit(batch).await?;
        if let Some(e) = self.view_mut().get_mut(host) {
            e.record = rec;
        }
        self.revision.send_replace(r);
        drop(guard);
        tracing::warn!(host, silent_ms = silent_for.as_millis() as u64, "host lost");
        self.workloads().host_changed(host, HostChange::Lost).await;
        Ok(true)
    }

    /// Marks hosts lost when they stay silent past the grace period, until `cancel`.
    pub async fn run_loss_detector(self: Arc<Self>, cancel: CancellationToken) {
        let tick = (self.timing.grace_period / 10)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = cancel.cancelled() => break,
            }
            let grace = self.timing.grace_period;
            let overdue: Vec<String> = self
                .view()
                .values()
                .filter(|e| e.record.state == HostState::Ready && e.last_seen.elapsed() > grace)
                .map(|e| e.record.name.clone())
                .collect();
            for host in overdue {
                if let Err(e) = self.mark_lost_if_silent(&host).await {
                    tracing::error!(host, error = %e, "cannot mark host lost");
                }
            }
        }
    }

    /// Commits a batch of the jobs layer; with `publish`, also bumps the revision so every
    /// watching agent recomputes its desired state.
    pub async fn commit(&self, mut batch: Batch, publish: bool) -> Result<u64, MembershipError> {
        let _guard = self.write.lock().await;
        let revision = if publish {
            let r = self.revision() + 1;
            batch.set_revision(r);
            r
        } else {
            self.revision()
        };
        self.store.commit(batch).await?;
        if publish {
            self.revision.send_replace(revision);
        }
        Ok(revision)
    }

    /// Bumps the revision so every watching agent recomputes its desired state.
    pub async fn publish(&self) -> Result<u64, MembershipError> {
        self.commit(Batch::new(), true).await
    }

    /// Subscribes to revision changes for a `Watch` of `host` (which must be registered
    /// and not have left).
    pub fn subscribe(&self, host: &str) -> Result<watch::Receiver<u64>, MembershipError> {
        self.check_watchable(host)?;
        Ok(self.revision.subscribe())
    }

    fn check_watchable(&self, host: &str) -> Result<(), MembershipError> {
        match self.view().get(host) {
            None => Err(MembershipError::UnknownHost(host.to_owned())),
            Some(e) if e.record.state == HostState::Left => {
                Err(MembershipError::HostLeft(host.to_owned()))
            }
            Some(_) => Ok(()),
        }
    }

    /// The desired state of `host` now: its subnet, every other ready host as a peer, and
    /// the role containers the jobs layer wants on it. A lost host still gets its state;
    /// a host that left gets [`MembershipError::HostLeft`].
    pub fn desired_state_for(&self, host: &str) -> Result<DesiredState, MembershipError> {
        let revision = self.revision();
        let (subnet, peers) = {
            let view = self.view();
            let entry = view
                .get(host)
                .ok_or_else(|| MembershipError::UnknownHost(host.to_owned()))?;
            if entry.record.state == HostState::Left {
                return Err(MembershipError::HostLeft(host.to_owned()));
            }
            let peers: Vec<Peer> = view
                .values()
                .filter(|e| e.record.name != host && e.record.state == HostState::Ready)
                .filter_map(|e| {
                    e.record.subnet.map(|s| Peer {
                        name: e.record.name.clone(),
                        underlay_ip: e.record.underlay_ip.to_string(),
                        subnet: s.to_string(),
                    })
                })
                .collect();
            (entry.record.subnet, peers)
        };
        let containers = self.workloads().containers_for(host);
        Ok(DesiredState {
            revision,
            host: host.to_owned(),
            subnet: subnet.map(|s| s.to_string()).unwrap_or_default(),
            cluster_cidr: self.pool.cluster().to_string(),
            peers,
            containers,
            heartbeat_interval_ms: duration_ms(self.timing.heartbeat_interval),
            controller_id: self.controller_id().to_owned(),
        })
    }
}

fn host_view(e: &HostEntry) -> HostView {
    HostView {
        record: e.record.clone(),
        heartbeat_age: e.last_seen.elapsed(),
        containers: e.containers,
        listening_ports: e.listening_ports.clone(),
    }
}

fn leases_of(view: &BTreeMap<String, HostEntry>) -> BTreeMap<Ipv4Net, String> {
    view.values()
        .filter_map(|e| e.record.subnet.map(|s| (s, e.record.name.clone())))
        .collect()
}

/// A duration in whole milliseconds, saturating at `u32::MAX`.
pub fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// True when two desired states differ in anything but their revision.
pub fn same_content(a: &DesiredState, b: &DesiredState) -> bool {
    a.host == b.host
        && a.subnet == b.subnet
        && a.cluster_cidr == b.cluster_cidr
        && a.peers == b.peers
        && a.containers == b.containers
        && a.heartbeat_interval_ms == b.heartbeat_interval_ms
        && a.controller_id == b.controller_id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(grace_ms: u64) -> Timing {
        Timing {
            heartbeat_interval: Duration::from_millis(grace_ms / 4),
            grace_period: Duration::from_millis(grace_ms),
        }
    }

    fn reg(host: &str, ip: &str) -> Registration {
        Registration {
            host: host.into(),
            underlay_ip: ip.parse().unwrap(),
            pinned_subnet: None,
            agent_version: "test".into(),
            agent_url: String::new(),
        }
    }

    fn open(dir: &std::path::Path, grace_ms: u64) -> Arc<Membership> {
        let store = Store::open(dir).unwrap();
        Membership::load(
            store,
            LeasePool::new("172.17.0.0/16".parse().unwrap(), 24),
            timing(grace_ms),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn register_lease_peers_leave() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 10_000);
        let a = m.register(reg("a", "10.1.1.1")).await.unwrap();
        let b = m.register(reg("b", "10.1.1.2")).await.unwrap();
        assert_ne!(a, b);
        assert_eq!(m.register(reg("a", "10.1.1.1")).await.unwrap(), a);
        let err = m.register(reg("c", "10.1.1.2")).await.unwrap_err();
        assert!(
            matches!(err, MembershipError::UnderlayInUse { .. }),
            "{err}"
        );
        let ds = m.desired_state_for("a").unwrap();
        assert_eq!(ds.subnet, a.to_string());
        assert_eq!(ds.peers.len(), 1);
        assert_eq!(ds.peers[0].name, "b");
        let rev = m.revision();
        m.leave("b").await.unwrap();
        assert!(m.revision() > rev);
        assert!(m.desired_state_for("a").unwrap().peers.is_empty());
        assert!(matches!(
            m.desired_state_for("b"),
            Err(MembershipError::HostLeft(_))
        ));
        m.leave("b").await.unwrap();
        // Rejoining gets the previous subnet back while it is free.
        assert_eq!(m.register(reg("b", "10.1.1.2")).await.unwrap(), b);
        let kinds: Vec<String> = m
            .store()
            .events(EventScope::Host("b"))
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["HostRegistered", "HostLeft", "HostRejoined"]);
    }

    #[tokio::test]
    async fn lost_and_back_keeps_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 100);
        let a = m.register(reg("a", "10.1.1.1")).await.unwrap();
        m.register(reg("b", "10.1.1.2")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // b reports, a stays silent.
        m.report("b", HeartbeatData::default(), &HostReport::default())
            .await
            .unwrap();
        assert!(m.mark_lost_if_silent("a").await.unwrap());
        assert!(!m.mark_lost_if_silent("b").await.unwrap());
        assert_eq!(m.host("a").unwrap().record.state, HostState::Lost);
        assert!(m.desired_state_for("b").unwrap().peers.is_empty());
        // The lost host still sees its peers.
        assert_eq!(m.desired_state_for("a").unwrap().peers.len(), 1);
        // Its lease is kept: nobody else gets it.
        let c = m.register(reg("c", "10.1.1.3")).await.unwrap();
        assert_ne!(c, a);
        m.report("a", HeartbeatData::default(), &HostReport::default())
            .await
            .unwrap();
        assert_eq!(m.host("a").unwrap().record.state, HostState::Ready);
        assert_eq!(m.host("a").unwrap().record.subnet, Some(a));
        assert_eq!(m.desired_state_for("b").unwrap().peers.len(), 2);
    }

    #[tokio::test]
    async fn a_report_without_known_images_or_containers_keeps_the_last_ones() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 1000);
        m.register(reg("a", "10.1.1.1")).await.unwrap();
        let known = HeartbeatData {
            images: Some(vec!["img:1".into()]),
            running_containers: Some(3),
            ..Default::default()
        };
        m.report("a", known, &HostReport::default()).await.unwrap();
        // an agent just restarted, its Docker slow: it knows neither yet
        tokio::time::sleep(Duration::from_millis(50)).await;
        m.report("a", HeartbeatData::default(), &HostReport::default())
            .await
            .unwrap();
        let h = m.host("a").unwrap();
        assert_eq!(h.record.images, ["img:1"]);
        assert_eq!(h.containers, 3);
        assert!(
            h.heartbeat_age < Duration::from_millis(50),
            "the host's liveness is refreshed"
        );
        // known again, and empty: taken as it is
        let empty = HeartbeatData {
            images: Some(vec![]),
            running_containers: Some(0),
            ..Default::default()
        };
        m.report("a", empty, &HostReport::default()).await.unwrap();
        let h = m.host("a").unwrap();
        assert!(h.record.images.is_empty());
        assert_eq!(h.containers, 0);
    }

    #[tokio::test]
    async fn unknown_hosts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 1000);
        assert!(matches!(
            m.report("x", HeartbeatData::default(), &HostReport::default())
                .await,
            Err(MembershipError::UnknownHost(_))
        ));
        assert!(matches!(
            m.leave("x").await,
            Err(MembershipError::UnknownHost(_))
        ));
        assert!(matches!(
            m.subscribe("x"),
            Err(MembershipError::UnknownHost(_))
        ));
        let status: Status = MembershipError::UnknownHost("x".into()).into();
        assert_eq!(status.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, rev, id) = {
            let m = open(dir.path(), 1000);
            let a = m.register(reg("a", "10.1.1.1")).await.unwrap();
            m.register(reg("b", "10.1.1.2")).await.unwrap();
            (a, m.revision(), m.controller_id().to_owned())
        };
        let m = open(dir.path(), 1000);
        assert_eq!(m.controller_id(), id);
        assert_eq!(m.revision(), rev);
        assert_eq!(m.host("a").unwrap().record.subnet, Some(a));
        assert_eq!(m.register(reg("a", "10.1.1.1")).await.unwrap(), a);
    }
}
