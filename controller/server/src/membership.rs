//! Host membership: registration and leases, heartbeats, loss detection, cordons, removal,
//! lease expiry, and the network part of every host's desired state.
//!
//! Every change of a host is decided by one pure function, [`transition`]: the host's
//! record (if any), the other hosts' records and an [`Input`] (register, report, leave,
//! silence, cordon, uncordon, remove, expiry) give a [`Delta`]: the record after, the
//! effect on its lease, the events, whether peers' desired states change, and the
//! [`HostChange`] to announce. [`Membership`] applies a delta in one place
//! ([`Membership::apply`]): under one async lock it writes the delta as one [`Batch`] (with
//! a compare-and-set on the lease), flushes it, then updates its in-memory view, bumps the
//! revision and announces the change.
//!
//! Publishing bumps the cluster revision (persisted with the change) on a
//! `tokio::sync::watch` channel; every open `Watch` stream wakes up, recomputes its host's
//! [`DesiredState`] and sends it if it differs from what it sent last. Nothing polls. The
//! jobs layer learns of host changes by subscribing ([`Membership::subscribe_changes`]);
//! the membership holds no reference to it.
//!
//! Heartbeat times are soft state: they live in memory only. After a controller restart
//! every known host gets a fresh grace period to report before it is declared lost.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use geomx_proto::v1::{DesiredState, Peer};
use ipnet::Ipv4Net;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::leases::{LeaseError, LeasePool};
use crate::store::{
    Batch, EventRecord, EventScope, HostRecord, HostState, LeaseRecord, NetworkRecord, Store,
    StoreError, TreeId, WireguardRecord, now_ms,
};
pub use crate::workloads::HostChange;

/// Errors of membership operations; the gRPC layer maps each to a status.
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
    /// A host that is still ready cannot be removed.
    #[error(
        "host {host:?} is ready (last heartbeat {age} ago): only a lost or departed host can be removed; stop its agent (or run `geomx-agent leave` there) first"
    )]
    NotRemovable {
        /// The host.
        host: String,
        /// Time since its last heartbeat, human-readable.
        age: String,
    },
    /// No lease could be granted.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Heartbeat timing handed to agents, and how long a lost host keeps its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often agents report.
    pub heartbeat_interval: Duration,
    /// After how long without a report a host is lost.
    pub grace_period: Duration,
    /// A host lost for longer than this is forgotten and its lease released; `None`: never.
    pub lease_ttl: Option<Duration>,
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
    /// Its WireGuard identity.
    pub wireguard: Option<WireguardRecord>,
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
    /// The images with ids, digests and sizes; `None` when not known (the last kept).
    pub image_details: Option<Vec<geomx_proto::v1::ImageInfo>>,
    /// The host's image pulls (running and recently ended).
    pub pulls: Vec<geomx_proto::v1::ImagePull>,
    /// What the agent left out of the report to keep it under the message limit; `None`:
    /// the report is complete.
    pub degraded: Option<ReportDegradation>,
}

/// What a degraded report left out (`HostReport.omitted`), and its sizes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportDegradation {
    /// The steps the agent took, in order (`metrics`, `image_details`, ...).
    pub omitted: Vec<String>,
    /// The report's size before, as the agent measured it.
    pub full_size_bytes: u64,
    /// Its size as received.
    pub size_bytes: u64,
}

/// The host event a report's degradation changing from `before` to `now` gives:
/// `ReportDegraded` (what is left out, the sizes) or `ReportComplete`; none when it did not
/// change. Pure.
pub fn degradation_event(
    before: &[String],
    now: Option<&ReportDegradation>,
) -> Option<(&'static str, String)> {
    match now {
        Some(d) if d.omitted != before => Some((
            "ReportDegraded",
            format!(
                "the agent's report ({} bytes) is over its budget: sent without {} ({} bytes; the controller accepts at most {} per request); see docs/operations.md, \"Degraded reports\"",
                d.full_size_bytes,
                d.omitted.join(", "),
                d.size_bytes,
                crate::server::MAX_DECODING_MESSAGE_SIZE
            ),
        )),
        None if !before.is_empty() => Some((
            "ReportComplete",
            format!(
                "the agent's reports are complete again (they left out {} before)",
                before.join(", ")
            ),
        )),
        _ => None,
    }
}

/// What happens to a host: the inputs of [`transition`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Its agent registers (first time, again, after leaving or being lost).
    Register(Registration),
    /// Its agent reports (only the durable parts matter here).
    Report(HeartbeatData),
    /// Its agent leaves the cluster (`geomx-agent leave`).
    Leave,
    /// It has been silent this long (the loss detector).
    Silence(Duration),
    /// An operator cordons it: no new placements.
    Cordon,
    /// An operator uncordons it.
    Uncordon,
    /// An operator removes it (only when lost or left).
    Remove,
    /// The lease-expiry check (at the `now` given to [`transition`]).
    Expiry,
}

/// What a transition does to the host's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseEffect {
    /// Nothing.
    Keep,
    /// A subnet is granted (the host had none).
    Grant(Ipv4Net),
    /// The host moves from one subnet to another.
    Move {
        /// Released.
        from: Ipv4Net,
        /// Granted.
        to: Ipv4Net,
    },
    /// The subnet is released.
    Release(Ipv4Net),
}

/// The result of [`transition`]; [`Membership::apply`] makes it durable and visible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// The record before.
    pub before: Option<HostRecord>,
    /// The record after; `None`: the host is forgotten.
    pub after: Option<HostRecord>,
    /// The effect on its lease.
    pub lease: LeaseEffect,
    /// What to record (host scope).
    pub events: Vec<EventRecord>,
    /// Whether peers' desired states change (the revision is bumped).
    pub topology: bool,
    /// The change announced to subscribers.
    pub change: Option<HostChange>,
}

impl Delta {
    fn unchanged(before: Option<&HostRecord>) -> Delta {
        Delta {
            before: before.cloned(),
            after: before.cloned(),
            lease: LeaseEffect::Keep,
            events: Vec::new(),
            topology: false,
            change: None,
        }
    }

    /// True when applying it writes nothing.
    pub fn is_noop(&self) -> bool {
        self.before == self.after
            && self.lease == LeaseEffect::Keep
            && self.events.is_empty()
            && !self.topology
    }
}

fn subnet_str(s: Option<Ipv4Net>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| s.to_string())
}

/// `d` for messages: whole seconds, or milliseconds below a second.
fn human(d: Duration) -> String {
    let d = if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(0))
    };
    humantime::format_duration(d).to_string()
}

/// Decides what `input` does to host `name`, given every host's record (`hosts`, including
/// the host's own), the lease pool, the timing and the time `now_ms` (Unix ms). Pure: no
/// I/O, no clock.
pub fn transition(
    hosts: &BTreeMap<String, HostRecord>,
    name: &str,
    input: &Input,
    pool: &LeasePool,
    timing: &Timing,
    now_ms: i64,
) -> Result<Delta, MembershipError> {
    let before = hosts.get(name);
    let event = |kind: &str, message: String| EventRecord {
        at_ms: now_ms,
        kind: kind.to_owned(),
        message,
        host: name.to_owned(),
        ..Default::default()
    };
    let underlay_holder = |ip: Ipv4Addr| {
        hosts
            .values()
            .find(|o| o.name != name && o.state == HostState::Ready && o.underlay_ip == ip)
            .map(|o| o.name.clone())
    };
    let known = || before.ok_or_else(|| MembershipError::UnknownHost(name.to_owned()));
    let mut delta = Delta::unchanged(before);
    match input {
        Input::Register(reg) => {
            if let Some(holder) = underlay_holder(reg.underlay_ip) {
                return Err(MembershipError::UnderlayInUse {
                    ip: reg.underlay_ip,
                    holder,
                });
            }
            let leases: BTreeMap<Ipv4Net, String> = hosts
                .values()
                .filter_map(|h| h.subnet.map(|s| (s, h.name.clone())))
                .collect();
            let subnet = pool.choose(
                name,
                before.and_then(|o| o.subnet),
                before.and_then(|o| o.last_subnet),
                reg.pinned_subnet,
                &leases,
            )?;
            let mut rec = before.cloned().unwrap_or_else(|| HostRecord {
                name: name.to_owned(),
                underlay_ip: reg.underlay_ip,
                subnet: None,
                last_subnet: None,
                pinned_subnet: None,
                state: HostState::Ready,
                state_since_ms: now_ms,
                registered_at_ms: now_ms,
                agent_version: String::new(),
                agent_url: String::new(),
                network: NetworkRecord::default(),
                images: Vec::new(),
                cordoned: false,
                wireguard: None,
            });
            rec.underlay_ip = reg.underlay_ip;
            rec.subnet = Some(subnet);
            rec.last_subnet = Some(subnet);
            rec.pinned_subnet = reg.pinned_subnet;
            rec.agent_version.clone_from(&reg.agent_version);
            rec.agent_url.clone_from(&reg.agent_url);
            rec.wireguard.clone_from(&reg.wireguard);
            if rec.state != HostState::Ready {
                rec.state = HostState::Ready;
                rec.state_since_ms = now_ms;
            }
            if before == Some(&rec) {
                return Ok(delta);
            }
            delta.lease = match before.and_then(|o| o.subnet) {
                None => LeaseEffect::Grant(subnet),
                Some(from) if from != subnet => LeaseEffect::Move { from, to: subnet },
                Some(_) => LeaseEffect::Keep,
            };
            // a new WireGuard key or port (`geomx-agent rotate-key`) goes into every peer's
            // desired state too
            delta.topology = before.is_none_or(|o| {
                o.state != rec.state
                    || o.underlay_ip != rec.underlay_ip
                    || o.subnet != rec.subnet
                    || o.wireguard != rec.wireguard
            });
            match before {
                None => {
                    delta.change = Some(HostChange::Joined);
                    delta.events.push(event(
                        "HostRegistered",
                        format!(
                            "registered with subnet {subnet}, underlay {}",
                            rec.underlay_ip
                        ),
                    ));
                }
                Some(o) => {
                    match o.state {
                        HostState::Left => {
                            delta.change = Some(HostChange::Joined);
                            delta.events.push(event(
                                "HostRejoined",
                                format!("joined again with subnet {subnet}"),
                            ));
                        }
                        HostState::Lost => {
                            delta.change = Some(HostChange::Returned);
                            delta.events.push(event(
                                "HostReturned",
                                format!("registered again with subnet {subnet}"),
                            ));
                        }
                        HostState::Ready => {}
                    }
                    if o.subnet.is_some() && o.subnet != rec.subnet {
                        delta.events.push(event(
                            "SubnetChanged",
                            format!("subnet {} → {subnet}", subnet_str(o.subnet)),
                        ));
                    }
                    if o.underlay_ip != rec.underlay_ip {
                        delta.events.push(event(
                            "UnderlayChanged",
                            format!("underlay {} → {}", o.underlay_ip, rec.underlay_ip),
                        ));
                    }
                    if o.wireguard.is_some() && o.wireguard != rec.wireguard {
                        let key = |w: &Option<WireguardRecord>| {
                            w.as_ref().map_or_else(
                                || "none".to_owned(),
                                |w| format!("{} port {}", w.public_key, w.port),
                            )
                        };
                        delta.events.push(event(
                            "WireguardKeyChanged",
                            format!(
                                "WireGuard key {} → {}",
                                key(&o.wireguard),
                                key(&rec.wireguard)
                            ),
                        ));
                    }
                }
            }
            delta.after = Some(rec);
        }
        Input::Report(data) => {
            let old = known()?;
            if old.state == HostState::Left {
                return Err(MembershipError::HostLeft(name.to_owned()));
            }
            let mut rec = old.clone();
            rec.agent_version.clone_from(&data.agent_version);
            rec.network = data.network.clone();
            if let Some(images) = &data.images {
                rec.images.clone_from(images);
            }
            if old.state == HostState::Lost {
                if let Some(holder) = underlay_holder(old.underlay_ip) {
                    return Err(MembershipError::UnderlayInUse {
                        ip: old.underlay_ip,
                        holder,
                    });
                }
                rec.state = HostState::Ready;
                rec.state_since_ms = now_ms;
                delta.topology = true;
                delta.change = Some(HostChange::Returned);
                delta.events.push(event(
                    "HostReturned",
                    format!("reporting again with subnet {}", subnet_str(rec.subnet)),
                ));
            }
            delta.after = Some(rec);
        }
        Input::Leave => {
            let old = known()?;
            if old.state == HostState::Left {
                return Ok(delta);
            }
            let mut rec = old.clone();
            rec.state = HostState::Left;
            rec.state_since_ms = now_ms;
            rec.subnet = None;
            if let Some(s) = old.subnet {
                delta.lease = LeaseEffect::Release(s);
            }
            delta.topology = true;
            delta.change = Some(HostChange::Left);
            delta.events.push(event(
                "HostLeft",
                format!("left; subnet {} released", subnet_str(old.subnet)),
            ));
            delta.after = Some(rec);
        }
        Input::Silence(silent_for) => {
            let Some(old) = before else {
                return Ok(delta);
            };
            if old.state != HostState::Ready || *silent_for <= timing.grace_period {
                return Ok(delta);
            }
            let mut rec = old.clone();
            rec.state = HostState::Lost;
            rec.state_since_ms = now_ms;
            delta.topology = true;
            delta.change = Some(HostChange::Lost);
            let keep = match timing.lease_ttl {
                Some(ttl) => format!("kept for lease_ttl {}", human(ttl)),
                None => "kept".to_owned(),
            };
            delta.events.push(event(
                "HostLost",
                format!(
                    "no heartbeat for {} (grace period {}); routes to it withdrawn, subnet {} {keep}",
                    human(*silent_for),
                    human(timing.grace_period),
                    subnet_str(rec.subnet)
                ),
            ));
            delta.after = Some(rec);
        }
        Input::Cordon | Input::Uncordon => {
            let old = known()?;
            let cordon = *input == Input::Cordon;
            if old.cordoned == cordon {
                return Ok(delta);
            }
            let mut rec = old.clone();
            rec.cordoned = cordon;
            if cordon {
                delta.change = Some(HostChange::Cordoned);
                delta.events.push(event(
                    "HostCordoned",
                    "cordoned: no new job may place a node here; running jobs stay".into(),
                ));
            } else {
                delta.change = Some(HostChange::Uncordoned);
                delta.events.push(event(
                    "HostUncordoned",
                    "uncordoned: schedulable again".into(),
                ));
            }
            delta.after = Some(rec);
        }
        Input::Remove => {
            let old = known()?;
            if old.state == HostState::Ready {
                // the heartbeat age is soft state: Membership::remove fills it in
                return Err(MembershipError::NotRemovable {
                    host: name.to_owned(),
                    age: "less than its grace period".to_owned(),
                });
            }
            if let Some(s) = old.subnet {
                delta.lease = LeaseEffect::Release(s);
            }
            delta.topology = true;
            delta.change = Some(HostChange::Removed);
            delta.events.push(event(
                "HostRemoved",
                format!(
                    "removed while {}; subnet {} released",
                    old.state.as_str(),
                    subnet_str(old.subnet)
                ),
            ));
            delta.after = None;
        }
        Input::Expiry => {
            let (Some(old), Some(ttl)) = (before, timing.lease_ttl) else {
                return Ok(delta);
            };
            let lost_for = Duration::from_millis(
                u64::try_from(now_ms.saturating_sub(old.state_since_ms)).unwrap_or(0),
            );
            if old.state != HostState::Lost || lost_for <= ttl {
                return Ok(delta);
            }
            if let Some(s) = old.subnet {
                delta.lease = LeaseEffect::Release(s);
            }
            delta.topology = true;
            delta.change = Some(HostChange::Removed);
            delta.events.push(event(
                "LeaseExpired",
                format!(
                    "lost for {} (lease_ttl {}): forgotten, subnet {} released; it registers afresh when it comes back",
                    human(lost_for),
                    human(ttl),
                    subnet_str(old.subnet)
                ),
            ));
            delta.after = None;
        }
    }
    Ok(delta)
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
    /// Its images with ids, digests and sizes, from its last report that knew them.
    pub image_details: Vec<geomx_proto::v1::ImageInfo>,
    /// Its image pulls, from its last report.
    pub pulls: Vec<geomx_proto::v1::ImagePull>,
}

/// A membership change of a host, as subscribers get it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEvent {
    /// The host.
    pub host: String,
    /// What happened.
    pub change: HostChange,
}

#[derive(Clone, Debug)]
struct HostEntry {
    record: HostRecord,
    last_seen: Instant,
    containers: u32,
    listening_ports: Vec<u32>,
    image_details: Vec<geomx_proto::v1::ImageInfo>,
    pulls: Vec<geomx_proto::v1::ImagePull>,
    /// What its last report left out (empty: complete).
    report_omitted: Vec<String>,
}

impl HostEntry {
    fn new(record: HostRecord, last_seen: Instant) -> HostEntry {
        HostEntry {
            record,
            last_seen,
            containers: 0,
            listening_ports: Vec::new(),
            image_details: Vec::new(),
            pulls: Vec::new(),
            report_omitted: Vec::new(),
        }
    }
}

/// How many host changes a slow subscriber may fall behind before it misses some.
const CHANGES_CAPACITY: usize = 1024;

/// The membership of the cluster. Shared as `Arc<Membership>`.
pub struct Membership {
    store: Store,
    pool: LeasePool,
    timing: Timing,
    view: RwLock<BTreeMap<String, HostEntry>>,
    write: tokio::sync::Mutex<()>,
    revision: watch::Sender<u64>,
    changes: broadcast::Sender<HostEvent>,
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
            view.insert(record.name.clone(), HostEntry::new(record, now));
        }
        let revision = store.revision()?.max(1);
        let (revision, _) = watch::channel(revision);
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Ok(Arc::new(Membership {
            store,
            pool,
            timing,
            view: RwLock::new(view),
            write: tokio::sync::Mutex::new(()),
            revision,
            changes,
        }))
    }

    /// Releases the leases no host record holds (left behind by an older controller or a
    /// crash between versions), so that the lease compare-and-set of later grants cannot
    /// trip over them; returns how many. Called once at start.
    pub async fn release_orphaned_leases(&self) -> Result<usize, MembershipError> {
        let _guard = self.write.lock().await;
        let orphans: Vec<LeaseRecord> = {
            let view = self.view();
            self.store
                .leases()?
                .into_iter()
                .filter(|l| {
                    view.get(&l.host)
                        .is_none_or(|e| e.record.subnet != Some(l.subnet))
                })
                .collect()
        };
        if orphans.is_empty() {
            return Ok(0);
        }
        let mut batch = Batch::new();
        for l in &orphans {
            tracing::warn!(subnet = %l.subnet, host = %l.host, "lease without a matching host record: released");
            batch.remove_lease(l.subnet);
        }
        self.store.commit(batch).await?;
        Ok(orphans.len())
    }

    /// Subscribes to host changes (after each is durable and published). A subscriber that
    /// falls more than 1024 changes behind gets `Lagged` and should re-read
    /// [`Membership::hosts`].
    pub fn subscribe_changes(&self) -> broadcast::Receiver<HostEvent> {
        self.changes.subscribe()
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

    /// Decides `input` for `host` with [`transition`] and applies the delta: one batch
    /// (host record, lease with a compare-and-set, events, revision), flushed; then the
    /// view, the revision and the subscribers. The one place membership changes.
    pub async fn apply(&self, host: &str, input: Input) -> Result<Delta, MembershipError> {
        let guard = self.write.lock().await;
        let now = now_ms();
        let delta = {
            let view = self.view();
            let records: BTreeMap<String, HostRecord> = view
                .iter()
                .map(|(k, e)| (k.clone(), e.record.clone()))
                .collect();
            transition(&records, host, &input, &self.pool, &self.timing, now)?
        };
        let heard_from = matches!(input, Input::Register(_) | Input::Report(_));
        if delta.is_noop() {
            if heard_from {
                self.touch(host);
            }
            return Ok(delta);
        }
        let mut batch = Batch::new();
        let grant = |batch: &mut Batch, subnet: Ipv4Net| {
            batch.expect_lease(subnet, host);
            batch.put_lease(&LeaseRecord {
                subnet,
                host: host.to_owned(),
                granted_at_ms: now,
            })
        };
        match delta.lease {
            LeaseEffect::Keep => {}
            LeaseEffect::Grant(s) => grant(&mut batch, s)?,
            LeaseEffect::Move { from, to } => {
                batch.remove_lease(from);
                grant(&mut batch, to)?;
            }
            LeaseEffect::Release(s) => {
                batch.expect_lease(s, host);
                batch.remove_lease(s);
            }
        }
        match &delta.after {
            Some(rec) if delta.before.as_ref() != Some(rec) => batch.put_host(rec)?,
            Some(_) => {}
            None => batch.remove(TreeId::Hosts, host.as_bytes()),
        }
        for e in &delta.events {
            batch.event(EventScope::Host(host), e)?;
        }
        let revision = delta.topology.then(|| self.revision() + 1);
        if let Some(r) = revision {
            batch.set_revision(r);
        }
        self.store.commit(batch).await?;
        {
            let mut view = self.view_mut();
            match &delta.after {
                Some(rec) => {
                    let entry = view
                        .entry(host.to_owned())
                        .or_insert_with(|| HostEntry::new(rec.clone(), Instant::now()));
                    entry.record = rec.clone();
                    if heard_from {
                        entry.last_seen = Instant::now();
                    }
                }
                None => {
                    view.remove(host);
                }
            }
        }
        if let Some(r) = revision {
            self.revision.send_replace(r);
        }
        drop(guard);
        for e in &delta.events {
            tracing::info!(host, kind = %e.kind, "{}", e.message);
        }
        if let Some(change) = delta.change {
            // no subscriber is fine
            let _ = self.changes.send(HostEvent {
                host: host.to_owned(),
                change,
            });
        }
        Ok(delta)
    }

    /// Admits `reg.host` (again) and returns its subnet. Idempotent: a registration that
    /// changes nothing writes nothing.
    pub async fn register(&self, reg: Registration) -> Result<Ipv4Net, MembershipError> {
        let host = reg.host.clone();
        let delta = self.apply(&host, Input::Register(reg)).await?;
        delta
            .after
            .and_then(|r| r.subnet)
            .ok_or(MembershipError::UnknownHost(host))
    }

    fn touch(&self, host: &str) {
        if let Some(e) = self.view_mut().get_mut(host) {
            e.last_seen = Instant::now();
        }
    }

    /// Records a heartbeat of `host`: refreshes its last-seen time and soft state, and
    /// brings a lost host back and persists what changed (version, network status, images)
    /// through [`Membership::apply`].
    ///
    /// A report whose degradation (what the agent left out to stay under the message limit)
    /// changed records a `ReportDegraded` or `ReportComplete` event on the host.
    pub async fn report(&self, host: &str, data: HeartbeatData) -> Result<(), MembershipError> {
        let mut degradation = None;
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
            if let Some(details) = &data.image_details {
                e.image_details.clone_from(details);
            }
            e.pulls.clone_from(&data.pulls);
            if let Some((kind, message)) =
                degradation_event(&e.report_omitted, data.degraded.as_ref())
            {
                e.report_omitted = data
                    .degraded
                    .as_ref()
                    .map(|d| d.omitted.clone())
                    .unwrap_or_default();
                degradation = Some((kind, message));
            }
            e.record.state == HostState::Lost
                || e.record.agent_version != data.agent_version
                || e.record.network != data.network
                || data.images.as_ref().is_some_and(|i| *i != e.record.images)
        };
        if needs_write {
            self.apply(host, Input::Report(data)).await?;
        }
        if let Some((kind, message)) = degradation {
            if kind == "ReportDegraded" {
                tracing::warn!(host, kind, "{message}");
            } else {
                tracing::info!(host, kind, "{message}");
            }
            let mut batch = Batch::new();
            batch.event(
                EventScope::Host(host),
                &EventRecord {
                    at_ms: now_ms(),
                    kind: kind.to_owned(),
                    message,
                    host: host.to_owned(),
                    ..Default::default()
                },
            )?;
            self.commit(batch, false).await?;
        }
        Ok(())
    }

    /// Removes `host` from the cluster and releases its lease. Leaving twice is fine.
    pub async fn leave(&self, host: &str) -> Result<(), MembershipError> {
        self.apply(host, Input::Leave).await.map(drop)
    }

    /// Cordons (`true`) or uncordons `host`; returns it as it is then.
    pub async fn set_cordon(&self, host: &str, cordon: bool) -> Result<HostView, MembershipError> {
        let input = if cordon {
            Input::Cordon
        } else {
            Input::Uncordon
        };
        self.apply(host, input).await?;
        self.host(host)
            .ok_or_else(|| MembershipError::UnknownHost(host.to_owned()))
    }

    /// Forgets a lost or departed `host` and releases its lease; returns it as it was.
    /// A ready host is refused ([`MembershipError::NotRemovable`]).
    pub async fn remove(&self, host: &str) -> Result<HostView, MembershipError> {
        let view = self
            .host(host)
            .ok_or_else(|| MembershipError::UnknownHost(host.to_owned()))?;
        match self.apply(host, Input::Remove).await {
            Err(MembershipError::NotRemovable { host, .. }) => Err(MembershipError::NotRemovable {
                host,
                age: human(view.heartbeat_age),
            }),
            other => other.map(|_| view),
        }
    }

    /// Marks `host` lost if it is ready and silent for longer than the grace period.
    /// Returns whether it did.
    pub async fn mark_lost_if_silent(&self, host: &str) -> Result<bool, MembershipError> {
        let Some(silent_for) = self.view().get(host).map(|e| e.last_seen.elapsed()) else {
            return Ok(false);
        };
        let delta = self.apply(host, Input::Silence(silent_for)).await?;
        Ok(delta.change == Some(HostChange::Lost))
    }

    /// Forgets `host` if it has been lost for longer than the lease TTL. Returns whether it
    /// did.
    pub async fn expire_if_due(&self, host: &str) -> Result<bool, MembershipError> {
        let delta = self.apply(host, Input::Expiry).await?;
        Ok(delta.change == Some(HostChange::Removed))
    }

    /// Marks hosts lost when they stay silent past the grace period, and forgets those lost
    /// past the lease TTL, until `cancel`.
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
            let now = now_ms();
            let ttl_ms = self
                .timing
                .lease_ttl
                .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
            let (overdue, expired): (Vec<String>, Vec<String>) = {
                let view = self.view();
                let overdue = view
                    .values()
                    .filter(|e| e.record.state == HostState::Ready && e.last_seen.elapsed() > grace)
                    .map(|e| e.record.name.clone())
                    .collect();
                let expired = view
                    .values()
                    .filter(|e| {
                        e.record.state == HostState::Lost
                            && ttl_ms
                                .is_some_and(|t| now.saturating_sub(e.record.state_since_ms) > t)
                    })
                    .map(|e| e.record.name.clone())
                    .collect();
                (overdue, expired)
            };
            for host in overdue {
                if let Err(e) = self.mark_lost_if_silent(&host).await {
                    tracing::error!(host, error = %e, "cannot mark host lost");
                }
            }
            for host in expired {
                if let Err(e) = self.expire_if_due(&host).await {
                    tracing::error!(host, error = %e, "cannot expire the lease of a lost host");
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

    /// The network part of `host`'s desired state now: its subnet and every other ready
    /// host as a peer; `containers` is left empty for the caller (the jobs layer's). A lost
    /// host still gets its state; a host that left gets [`MembershipError::HostLeft`].
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
                        wireguard_public_key: e
                            .record
                            .wireguard
                            .as_ref()
                            .map(|w| w.public_key.clone())
                            .unwrap_or_default(),
                        wireguard_port: e
                            .record
                            .wireguard
                            .as_ref()
                            .map_or(0, |w| u32::from(w.port)),
                    })
                })
                .collect();
            (entry.record.subnet, peers)
        };
        Ok(DesiredState {
            revision,
            host: host.to_owned(),
            subnet: subnet.map(|s| s.to_string()).unwrap_or_default(),
            cluster_cidr: self.pool.cluster().to_string(),
            peers,
            containers: Vec::new(),
            heartbeat_interval_ms: duration_ms(self.timing.heartbeat_interval),
            controller_id: self.controller_id().to_owned(),
            // the gRPC layer sets the cluster's default (empty: auto)
            backend: String::new(),
            templates: Vec::new(),
        })
    }
}

fn host_view(e: &HostEntry) -> HostView {
    HostView {
        record: e.record.clone(),
        heartbeat_age: e.last_seen.elapsed(),
        containers: e.containers,
        listening_ports: e.listening_ports.clone(),
        image_details: e.image_details.clone(),
        pulls: e.pulls.clone(),
    }
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
        && a.templates == b.templates
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
            lease_ttl: None,
        }
    }

    fn reg(host: &str, ip: &str) -> Registration {
        Registration {
            host: host.into(),
            underlay_ip: ip.parse().unwrap(),
            pinned_subnet: None,
            agent_version: "test".into(),
            agent_url: String::new(),
            wireguard: None,
        }
    }

    /// The kinds of `host`'s stored events, oldest first.
    fn event_kinds(m: &Membership, host: &str) -> Vec<String> {
        m.store()
            .events(EventScope::Host(host))
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
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
        assert_eq!(
            event_kinds(&m, "b"),
            ["HostRegistered", "HostLeft", "HostRejoined"]
        );
    }

    #[tokio::test]
    async fn lost_and_back_keeps_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 100);
        let a = m.register(reg("a", "10.1.1.1")).await.unwrap();
        m.register(reg("b", "10.1.1.2")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // b reports, a stays silent.
        m.report("b", HeartbeatData::default()).await.unwrap();
        assert!(m.mark_lost_if_silent("a").await.unwrap());
        assert!(!m.mark_lost_if_silent("b").await.unwrap());
        assert_eq!(m.host("a").unwrap().record.state, HostState::Lost);
        assert!(m.desired_state_for("b").unwrap().peers.is_empty());
        // The lost host still sees its peers.
        assert_eq!(m.desired_state_for("a").unwrap().peers.len(), 1);
        // Its lease is kept: nobody else gets it.
        let c = m.register(reg("c", "10.1.1.3")).await.unwrap();
        assert_ne!(c, a);
        m.report("a", HeartbeatData::default()).await.unwrap();
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
        m.report("a", known).await.unwrap();
        // an agent just restarted, its Docker slow: it knows neither yet
        tokio::time::sleep(Duration::from_millis(50)).await;
        m.report("a", HeartbeatData::default()).await.unwrap();
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
        m.report("a", empty).await.unwrap();
        let h = m.host("a").unwrap();
        assert!(h.record.images.is_empty());
        assert_eq!(h.containers, 0);
    }

    #[tokio::test]
    async fn a_degraded_report_is_an_event_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 1000);
        m.register(reg("a", "10.1.1.1")).await.unwrap();
        let degraded = |omitted: &[&str]| HeartbeatData {
            degraded: Some(ReportDegradation {
                omitted: omitted.iter().map(|o| (*o).to_owned()).collect(),
                full_size_bytes: 4_370_477,
                size_bytes: 2_900_000,
            }),
            ..Default::default()
        };
        m.report("a", HeartbeatData::default()).await.unwrap();
        m.report("a", degraded(&["metrics"])).await.unwrap();
        m.report("a", degraded(&["metrics"])).await.unwrap();
        m.report("a", degraded(&["metrics", "log_tails"]))
            .await
            .unwrap();
        m.report("a", HeartbeatData::default()).await.unwrap();
        m.report("a", HeartbeatData::default()).await.unwrap();
        let kinds = event_kinds(&m, "a");
        assert_eq!(
            kinds,
            [
                "HostRegistered",
                "ReportDegraded",
                "ReportDegraded",
                "ReportComplete"
            ]
        );
        let events = m.store().events(EventScope::Host("a")).unwrap();
        assert_eq!(
            events[1].message,
            "the agent's report (4370477 bytes) is over its budget: sent without metrics (2900000 bytes; the controller accepts at most 4194304 per request); see docs/operations.md, \"Degraded reports\""
        );
        assert!(events[2].message.contains("without metrics, log_tails"));
        assert_eq!(
            events[3].message,
            "the agent's reports are complete again (they left out metrics, log_tails before)"
        );
        assert_eq!(m.host("a").unwrap().record.state, HostState::Ready);
    }

    #[tokio::test]
    async fn unknown_hosts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 1000);
        assert!(matches!(
            m.report("x", HeartbeatData::default()).await,
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
        let status: tonic::Status = MembershipError::UnknownHost("x".into()).into();
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

    // ---- the transition function, as tables: state × input → state, events, lease effect

    const NOW: i64 = 1_000_000_000_000;
    const GRACE: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(3600);

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[derive(Clone, Copy, Debug)]
    enum Before {
        Unknown,
        Ready,
        /// Ready with the WireGuard key `key-1`.
        ReadyWg,
        Cordoned,
        /// Lost 10 minutes ago (within the lease TTL).
        Lost,
        /// Lost 2 hours ago (past the lease TTL).
        LostLong,
        Left,
    }

    fn record(name: &str, ip: &str, subnet: &str, state: HostState, since: i64) -> HostRecord {
        HostRecord {
            name: name.into(),
            underlay_ip: ip.parse().unwrap(),
            subnet: (state != HostState::Left).then(|| net(subnet)),
            last_subnet: Some(net(subnet)),
            pinned_subnet: None,
            state,
            state_since_ms: since,
            registered_at_ms: 1,
            agent_version: "test".into(),
            agent_url: String::new(),
            network: NetworkRecord::default(),
            images: Vec::new(),
            cordoned: false,
            wireguard: None,
        }
    }

    /// Host `h` (10.1.1.5, 172.17.5.0/24) in state `before`, and a ready peer `o`
    /// (10.1.1.9, 172.17.1.0/24).
    fn cluster(before: Before) -> BTreeMap<String, HostRecord> {
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "o".to_owned(),
            record("o", "10.1.1.9", "172.17.1.0/24", HostState::Ready, 1),
        );
        let h = |state, since| record("h", "10.1.1.5", "172.17.5.0/24", state, since);
        let rec = match before {
            Before::Unknown => None,
            Before::Ready => Some(h(HostState::Ready, 1)),
            Before::ReadyWg => Some(HostRecord {
                wireguard: Some(wg_record("key-1")),
                ..h(HostState::Ready, 1)
            }),
            Before::Cordoned => Some(HostRecord {
                cordoned: true,
                ..h(HostState::Ready, 1)
            }),
            Before::Lost => Some(h(HostState::Lost, NOW - 600_000)),
            Before::LostLong => Some(h(HostState::Lost, NOW - 7_200_000)),
            Before::Left => Some(h(HostState::Left, NOW - 600_000)),
        };
        if let Some(r) = rec {
            hosts.insert("h".to_owned(), r);
        }
        hosts
    }

    fn register_h() -> Input {
        Input::Register(Registration {
            host: "h".into(),
            underlay_ip: "10.1.1.5".parse().unwrap(),
            pinned_subnet: None,
            agent_version: "test".into(),
            agent_url: String::new(),
            wireguard: None,
        })
    }

    fn register_wg(key: &str) -> Input {
        let Input::Register(mut r) = register_h() else {
            unreachable!()
        };
        r.wireguard = Some(wg_record(key));
        Input::Register(r)
    }

    fn wg_record(key: &str) -> WireguardRecord {
        WireguardRecord {
            public_key: key.into(),
            port: 7951,
        }
    }

    /// What a row expects: the state after (`None`: forgotten), cordoned after, event
    /// kinds, lease effect, whether peers' states change, the announced change.
    type Outcome = Result<
        (
            Option<HostState>,
            bool,
            &'static [&'static str],
            LeaseEffect,
            bool,
            Option<HostChange>,
        ),
        &'static str,
    >;

    fn err_kind(e: &MembershipError) -> &'static str {
        match e {
            MembershipError::UnknownHost(_) => "UnknownHost",
            MembershipError::HostLeft(_) => "HostLeft",
            MembershipError::UnderlayInUse { .. } => "UnderlayInUse",
            MembershipError::NotRemovable { .. } => "NotRemovable",
            MembershipError::Lease(_) => "Lease",
            MembershipError::Store(_) => "Store",
        }
    }

    fn check_rows(rows: Vec<(Before, Input, Outcome)>, timing: Timing) {
        let pool = LeasePool::new(net("172.17.0.0/16"), 24);
        for (before, input, want) in rows {
            let hosts = cluster(before);
            let got = transition(&hosts, "h", &input, &pool, &timing, NOW);
            let label = format!("{before:?} × {input:?}");
            match (got, want) {
                (Ok(d), Ok((state, cordoned, events, lease, topology, change))) => {
                    assert_eq!(d.after.as_ref().map(|r| r.state), state, "{label}: state");
                    if let Some(r) = &d.after {
                        assert_eq!(r.cordoned, cordoned, "{label}: cordoned");
                        assert_eq!(
                            r.subnet.is_some(),
                            r.state != HostState::Left,
                            "{label}: a host holds a subnet unless it left"
                        );
                    }
                    let kinds: Vec<&str> = d.events.iter().map(|e| e.kind.as_str()).collect();
                    assert_eq!(kinds, events, "{label}: events");
                    assert_eq!(d.lease, lease, "{label}: lease");
                    assert_eq!(d.topology, topology, "{label}: topology");
                    assert_eq!(d.change, change, "{label}: change");
                    assert_eq!(d.before.as_ref(), hosts.get("h"), "{label}: before");
                }
                (Err(e), Err(kind)) => assert_eq!(err_kind(&e), kind, "{label}: {e}"),
                (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn transitions() {
        use Before::*;
        use HostChange as C;
        use HostState::{Left as SLeft, Lost as SLost, Ready as SReady};
        use LeaseEffect::{Grant, Keep, Release};
        let own = net("172.17.5.0/24");
        let silent = Input::Silence(GRACE + Duration::from_millis(1));
        let report = Input::Report(HeartbeatData {
            agent_version: "test".into(),
            ..Default::default()
        });
        #[rustfmt::skip]
        let rows: Vec<(Before, Input, Outcome)> = vec![
            // register
            (Unknown,  register_h(), Ok((Some(SReady), false, &["HostRegistered"], Grant(net("172.17.2.0/24")), true, Some(C::Joined)))),
            (Ready,    register_h(), Ok((Some(SReady), false, &[], Keep, false, None))),
            (Cordoned, register_h(), Ok((Some(SReady), true, &[], Keep, false, None))),
            (Lost,     register_h(), Ok((Some(SReady), false, &["HostReturned"], Keep, true, Some(C::Returned)))),
            (Left,     register_h(), Ok((Some(SReady), false, &["HostRejoined"], Grant(own), true, Some(C::Joined)))),
            // a new WireGuard key (rotate-key): peers' states change, the old key is named
            (Ready,    register_wg("key-1"), Ok((Some(SReady), false, &[], Keep, true, None))),
            (ReadyWg,  register_wg("key-1"), Ok((Some(SReady), false, &[], Keep, false, None))),
            (ReadyWg,  register_wg("key-2"), Ok((Some(SReady), false, &["WireguardKeyChanged"], Keep, true, None))),
            // report
            (Unknown,  report.clone(), Err("UnknownHost")),
            (Ready,    report.clone(), Ok((Some(SReady), false, &[], Keep, false, None))),
            (Lost,     report.clone(), Ok((Some(SReady), false, &["HostReturned"], Keep, true, Some(C::Returned)))),
            (Left,     report.clone(), Err("HostLeft")),
            // leave
            (Unknown,  Input::Leave, Err("UnknownHost")),
            (Ready,    Input::Leave, Ok((Some(SLeft), false, &["HostLeft"], Release(own), true, Some(C::Left)))),
            (Cordoned, Input::Leave, Ok((Some(SLeft), true, &["HostLeft"], Release(own), true, Some(C::Left)))),
            (Lost,     Input::Leave, Ok((Some(SLeft), false, &["HostLeft"], Release(own), true, Some(C::Left)))),
            (Left,     Input::Leave, Ok((Some(SLeft), false, &[], Keep, false, None))),
            // silence
            (Unknown,  silent.clone(), Ok((None, false, &[], Keep, false, None))),
            (Ready,    silent.clone(), Ok((Some(SLost), false, &["HostLost"], Keep, true, Some(C::Lost)))),
            (Ready,    Input::Silence(GRACE), Ok((Some(SReady), false, &[], Keep, false, None))),
            (Cordoned, silent.clone(), Ok((Some(SLost), true, &["HostLost"], Keep, true, Some(C::Lost)))),
            (Lost,     silent.clone(), Ok((Some(SLost), false, &[], Keep, false, None))),
            (Left,     silent.clone(), Ok((Some(SLeft), false, &[], Keep, false, None))),
            // cordon, uncordon
            (Unknown,  Input::Cordon, Err("UnknownHost")),
            (Ready,    Input::Cordon, Ok((Some(SReady), true, &["HostCordoned"], Keep, false, Some(C::Cordoned)))),
            (Cordoned, Input::Cordon, Ok((Some(SReady), true, &[], Keep, false, None))),
            (Lost,     Input::Cordon, Ok((Some(SLost), true, &["HostCordoned"], Keep, false, Some(C::Cordoned)))),
            (Cordoned, Input::Uncordon, Ok((Some(SReady), false, &["HostUncordoned"], Keep, false, Some(C::Uncordoned)))),
            (Ready,    Input::Uncordon, Ok((Some(SReady), false, &[], Keep, false, None))),
            (Unknown,  Input::Uncordon, Err("UnknownHost")),
            // remove
            (Unknown,  Input::Remove, Err("UnknownHost")),
            (Ready,    Input::Remove, Err("NotRemovable")),
            (Cordoned, Input::Remove, Err("NotRemovable")),
            (Lost,     Input::Remove, Ok((None, false, &["HostRemoved"], Release(own), true, Some(C::Removed)))),
            (LostLong, Input::Remove, Ok((None, false, &["HostRemoved"], Release(own), true, Some(C::Removed)))),
            (Left,     Input::Remove, Ok((None, false, &["HostRemoved"], Keep, true, Some(C::Removed)))),
            // lease expiry
            (Unknown,  Input::Expiry, Ok((None, false, &[], Keep, false, None))),
            (Ready,    Input::Expiry, Ok((Some(SReady), false, &[], Keep, false, None))),
            (Lost,     Input::Expiry, Ok((Some(SLost), false, &[], Keep, false, None))),
            (LostLong, Input::Expiry, Ok((None, false, &["LeaseExpired"], Release(own), true, Some(C::Removed)))),
            (Left,     Input::Expiry, Ok((Some(SLeft), false, &[], Keep, false, None))),
        ];
        check_rows(
            rows,
            Timing {
                heartbeat_interval: GRACE / 4,
                grace_period: GRACE,
                lease_ttl: Some(TTL),
            },
        );
    }

    #[test]
    fn without_a_lease_ttl_lost_hosts_keep_their_lease() {
        use Before::*;
        #[rustfmt::skip]
        let rows: Vec<(Before, Input, Outcome)> = vec![
            (LostLong, Input::Expiry, Ok((Some(HostState::Lost), false, &[], LeaseEffect::Keep, false, None))),
        ];
        check_rows(
            rows,
            Timing {
                heartbeat_interval: GRACE / 4,
                grace_period: GRACE,
                lease_ttl: None,
            },
        );
    }

    #[test]
    fn an_underlay_in_use_is_refused() {
        let pool = LeasePool::new(net("172.17.0.0/16"), 24);
        let t = timing(10_000);
        let taken = Input::Register(Registration {
            host: "h".into(),
            underlay_ip: "10.1.1.9".parse().unwrap(),
            pinned_subnet: None,
            agent_version: "test".into(),
            agent_url: String::new(),
            wireguard: None,
        });
        let e = transition(&cluster(Before::Ready), "h", &taken, &pool, &t, NOW).unwrap_err();
        assert!(
            e.to_string().contains("already used by live host \"o\""),
            "{e}"
        );
        // a lost host whose address a ready host took meanwhile cannot come back by report
        let mut hosts = cluster(Before::Lost);
        if let Some(o) = hosts.get_mut("o") {
            o.underlay_ip = "10.1.1.5".parse().unwrap();
        }
        let report = Input::Report(HeartbeatData::default());
        let e = transition(&hosts, "h", &report, &pool, &t, NOW).unwrap_err();
        assert_eq!(err_kind(&e), "UnderlayInUse");
        // a removal refused names the reason
        let e =
            transition(&cluster(Before::Ready), "h", &Input::Remove, &pool, &t, NOW).unwrap_err();
        assert!(
            e.to_string().contains("only a lost or departed host"),
            "{e}"
        );
    }

    // ---- the apply path: durable, visible, announced

    #[tokio::test]
    async fn remove_frees_the_subnet_for_a_new_host_and_is_announced() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 100);
        let mut changes = m.subscribe_changes();
        let a = m.register(reg("a", "10.1.1.1")).await.unwrap();
        m.register(reg("b", "10.1.1.2")).await.unwrap();
        let err = m.remove("a").await.unwrap_err();
        assert!(matches!(err, MembershipError::NotRemovable { .. }), "{err}");
        // a goes silent, b keeps reporting
        let deadline = Instant::now() + Duration::from_secs(5);
        while !m.mark_lost_if_silent("a").await.unwrap() {
            assert!(Instant::now() < deadline, "a never lost");
            m.report("b", HeartbeatData::default()).await.unwrap();
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let removed = m.remove("a").await.unwrap();
        assert_eq!(removed.record.subnet, Some(a));
        assert!(m.host("a").is_none());
        assert!(m.store().leases().unwrap().iter().all(|l| l.subnet != a));
        // the next new host gets the freed subnet
        assert_eq!(m.register(reg("c", "10.1.1.3")).await.unwrap(), a);
        let mut seen = Vec::new();
        while let Ok(e) = changes.try_recv() {
            seen.push((e.host, e.change));
        }
        assert_eq!(
            seen,
            [
                ("a".to_owned(), HostChange::Joined),
                ("b".to_owned(), HostChange::Joined),
                ("a".to_owned(), HostChange::Lost),
                ("a".to_owned(), HostChange::Removed),
                ("c".to_owned(), HostChange::Joined),
            ]
        );
        assert_eq!(
            event_kinds(&m, "a"),
            ["HostRegistered", "HostLost", "HostRemoved"]
        );
    }

    #[tokio::test]
    async fn orphaned_leases_are_released_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 1000);
        let a = m.register(reg("a", "10.1.1.1")).await.unwrap();
        let mut batch = Batch::new();
        batch
            .put_lease(&LeaseRecord {
                subnet: net("172.17.2.0/24"),
                host: "gone".into(),
                granted_at_ms: 1,
            })
            .unwrap();
        m.store().commit(batch).await.unwrap();
        assert_eq!(m.release_orphaned_leases().await.unwrap(), 1);
        let leases = m.store().leases().unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].subnet, a);
        // the freed subnet can be granted again (its compare-and-set holds)
        assert_eq!(
            m.register(reg("b", "10.1.1.2")).await.unwrap(),
            net("172.17.2.0/24")
        );
    }

    #[tokio::test]
    async fn a_cordon_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = open(dir.path(), 1000);
            m.register(reg("a", "10.1.1.1")).await.unwrap();
            assert!(m.set_cordon("a", true).await.unwrap().record.cordoned);
        }
        let m = open(dir.path(), 1000);
        assert!(m.host("a").unwrap().record.cordoned);
        // registering again after maintenance keeps the cordon until uncordoned
        m.register(reg("a", "10.1.1.1")).await.unwrap();
        assert!(m.host("a").unwrap().record.cordoned);
        assert!(!m.set_cordon("a", false).await.unwrap().record.cordoned);
        assert!(matches!(
            m.set_cordon("x", true).await,
            Err(MembershipError::UnknownHost(_))
        ));
    }
}
