//! The controller's durable state in sled.
//!
//! Trees: `hosts` (name → [`HostRecord`]), `leases` (subnet → [`LeaseRecord`]), `jobs`
//! (name → the job layer's records, JSON), `events` (scope + sequence → [`EventRecord`]),
//! `meta` (controller id, schema version, revision). Values are JSON.
//!
//! Every change goes through a [`Batch`] applied by [`Store::commit`]: one transaction over
//! all trees (with its preconditions, e.g. [`Batch::expect_lease`], checked inside it), then
//! a flush, so a change is on disk before the RPC that caused it returns success.
//!
//! [`Store`] is the handle the membership and the jobs layer use: typed records over a
//! [`StoreBackend`], the few operations a backend must provide (read a key, scan a prefix,
//! commit a batch atomically, flush). [`SledStore`] is the one backend, embedded; a
//! replicated one can be added behind the same trait without touching membership or jobs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use futures::future::BoxFuture;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// Version of the on-disk layout written by this build.
pub const SCHEMA_VERSION: u64 = 1;

/// Space the state directory's file system must have available beyond twice a change's
/// own bytes before [`Store::commit`] writes it. sled appends to its log in segments of
/// 512 KiB and, once a write to its log fails, refuses every later write until the process
/// restarts; so a change that might not fit is refused before sled sees it, and the
/// controller goes on by itself once space is freed.
pub const MIN_FREE_BYTES: u64 = 1 << 20;

/// Meta key: the state's controller id.
pub const META_CONTROLLER_ID: &[u8] = b"controller_id";
/// Meta key: the schema version of the records.
pub const META_SCHEMA: &[u8] = b"schema_version";
const META_REVISION: &[u8] = b"revision";

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the state directory.
    #[error(
        "state dir {} is in use by another process (is another geomx-controller running?)",
        .0.display()
    )]
    Locked(PathBuf),
    /// The state directory could not be created.
    #[error("cannot create state dir {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state was written by a newer geomx.
    #[error("state dir {} has schema version {found}; this geomx-controller understands up to {SCHEMA_VERSION}", path.display())]
    Schema {
        /// The directory.
        path: PathBuf,
        /// The version found.
        found: u64,
    },
    /// The state directory's file system has too little space for a change; nothing was
    /// written.
    #[error(
        "no space left on device for the state dir {}: {available} bytes available, {needed} needed for this change; nothing was written (free space there: the controller goes on by itself)",
        path.display()
    )]
    NoSpace {
        /// The state directory.
        path: PathBuf,
        /// Bytes available to the controller there.
        available: u64,
        /// Bytes the change needs available (see [`MIN_FREE_BYTES`]).
        needed: u64,
    },
    /// sled failed.
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// The database opened without the records it held: sled stopped reading at damaged
    /// data (the id file beside it names a controller id the database does not have).
    #[error(
        "state store: {} lost its records: the database opens without controller id {id} that its controller_id file names (damaged data, or files removed by hand)",
        path.display()
    )]
    Lost {
        /// The state directory.
        path: PathBuf,
        /// The id the directory had.
        id: String,
    },
    /// A file operation of a compaction failed.
    #[error("state store: compacting {}: {source}", path.display())]
    Compact {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be reopened after a compaction failed.
    #[error(
        "state store: the database is closed after a failed compaction; restart the controller"
    )]
    Closed,
    /// A precondition of the batch did not hold (another change came first); nothing was
    /// written.
    #[error("state store: conflicting change: {0}")]
    Conflict(String),
    /// A record could not be encoded or decoded.
    #[error("state store: record {key:?} in tree {tree}: {source}")]
    Codec {
        /// Tree name.
        tree: &'static str,
        /// Key, lossily decoded.
        key: String,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
}

/// What kind of failure a [`StoreError`] is, for callers deciding how to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The state directory's disk is full: retry once space is freed.
    Full,
    /// Another I/O error.
    Unavailable,
    /// A precondition failed: another change came first.
    Conflict,
    /// Anything else.
    Internal,
}

impl StoreError {
    /// Whether sled found the database's files damaged ("Read corrupted data"): the state
    /// cannot be opened as it is (see `geomx-controller state`).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            StoreError::Sled(sled::Error::Corruption { .. } | sled::Error::ReportableBug(_))
                | StoreError::Lost { .. }
        )
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::NoSpace { .. } => StoreErrorKind::Full,
            StoreError::Conflict(_) => StoreErrorKind::Conflict,
            StoreError::Sled(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) =>
            {
                StoreErrorKind::Full
            }
            StoreError::Sled(sled::Error::Io(_)) => StoreErrorKind::Unavailable,
            _ => StoreErrorKind::Internal,
        }
    }
}

/// Membership state of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Heartbeating; a route target for its peers.
    Ready,
    /// Silent for longer than the grace period; keeps its lease, withdrawn from peers.
    Lost,
    /// Left the cluster; its lease is released.
    Left,
}

impl HostState {
    /// `ready`, `lost` or `left`.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ready => "ready",
            HostState::Lost => "lost",
            HostState::Left => "left",
        }
    }
}

/// Network status from a host's last report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The last reconciliation left everything as desired.
    pub converged: bool,
    /// Peer routes installed.
    pub routes: u32,
    /// Last reconciliation error, empty if none.
    pub error: String,
    /// Every peer as the host measured it through the data plane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkRecord>,
}

/// How a host reaches one peer, from its last report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// The peer.
    pub peer: String,
    /// `host-gw`, `wireguard`, `vxlan` or `none`.
    pub backend: String,
    /// Median round trip, milliseconds (0: no answer).
    pub rtt_ms: f64,
    /// Share of probes lost, percent.
    pub loss_pct: f64,
    /// Seconds since the last WireGuard handshake; -1: never or not WireGuard.
    pub handshake_age_s: i64,
}

impl Eq for LinkRecord {}

/// A host's WireGuard identity: its public key and UDP port (its private key never leaves it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardRecord {
    /// Public key, base64.
    pub public_key: String,
    /// UDP port on the host's underlay address.
    pub port: u16,
}

/// A host as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host name (also the key).
    pub name: String,
    /// Underlay IPv4 address.
    pub underlay_ip: Ipv4Addr,
    /// Current lease; `None` once the host left.
    pub subnet: Option<Ipv4Net>,
    /// The last subnet the host held (preferred when it registers again).
    pub last_subnet: Option<Ipv4Net>,
    /// The subnet the agent pinned, if any.
    #[serde(default)]
    pub pinned_subnet: Option<Ipv4Net>,
    /// Membership state.
    pub state: HostState,
    /// Since when (Unix ms) the host is in `state`.
    pub state_since_ms: i64,
    /// First registration (Unix ms).
    pub registered_at_ms: i64,
    /// Agent version from the last Register/Report.
    pub agent_version: String,
    /// Where the agent serves `AgentNodeService`.
    pub agent_url: String,
    /// Network status from the last report.
    #[serde(default)]
    pub network: NetworkRecord,
    /// Images present on the host (repo:tag), sorted, from the last report.
    #[serde(default)]
    pub images: Vec<String>,
    /// Cordoned: no new job may place a node on it (`geomxctl hosts cordon`).
    #[serde(default)]
    pub cordoned: bool,
    /// Its WireGuard identity, from its last registration (`None`: it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardRecord>,
}

/// A subnet lease as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// Its holder.
    pub host: String,
    /// When granted (Unix ms).
    pub granted_at_ms: i64,
}

/// Something that happened, for `events` listings. Mirrors `geomx.v1.Event`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When (Unix ms).
    pub at_ms: i64,
    /// Short kind, e.g. `HostLost`.
    pub kind: String,
    /// Human-readable details.
    pub message: String,
    /// Host concerned, if any.
    #[serde(default)]
    pub host: String,
    /// Job concerned, if any.
    #[serde(default)]
    pub job: String,
    /// Node concerned, if any.
    #[serde(default)]
    pub node: String,
    /// Job attempt, if any.
    #[serde(default)]
    pub generation: u32,
}

/// Which listing an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventScope<'a> {
    /// Events of a host (membership).
    Host(&'a str),
    /// Events of a job.
    Job(&'a str),
}

impl EventScope<'_> {
    fn prefix(&self) -> Vec<u8> {
        let (kind, name) = match self {
            EventScope::Host(n) => ("host", n),
            EventScope::Job(n) => ("job", n),
        };
        let mut p = Vec::with_capacity(kind.len() + name.len() + 2);
        p.extend_from_slice(kind.as_bytes());
        p.push(0);
        p.extend_from_slice(name.as_bytes());
        p.push(0);
        p
    }
}

/// The trees of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeId {
    /// `hosts`.
    Hosts,
    /// `leases`.
    Leases,
    /// `jobs`.
    Jobs,
    /// `events`.
    Events,
    /// `meta`.
    Meta,
}

impl TreeId {
    /// Every tree, in a fixed order.
    pub const ALL: [TreeId; 5] = [
        TreeId::Hosts,
        TreeId::Leases,
        TreeId::Jobs,
        TreeId::Events,
        TreeId::Meta,
    ];

    /// The sled tree name.
    pub fn name(self) -> &'static str {
        match self {
            TreeId::Hosts => "hosts",
            TreeId::Leases => "leases",
            TreeId::Jobs => "jobs",
            TreeId::Events => "events",
            TreeId::Meta => "meta",
        }
    }

    fn index(self) -> usize {
        match self {
            TreeId::Hosts => 0,
            TreeId::Leases => 1,
            TreeId::Jobs => 2,
            TreeId::Events => 3,
            TreeId::Meta => 4,
        }
    }
}

/// Key of a lease: network address (big endian) then prefix length, so leases sort by address.
pub fn lease_key(subnet: Ipv4Net) -> [u8; 5] {
    let o = subnet.network().octets();
    [o[0], o[1], o[2], o[3], subnet.prefix_len()]
}

/// One operation of a [`Batch`], as a [`StoreBackend`] applies it.
#[derive(Debug)]
pub enum Op {
    /// Store `value` under `key` in the tree.
    Put(TreeId, Vec<u8>, Vec<u8>),
    /// Remove `key` from the tree.
    Remove(TreeId, Vec<u8>),
    /// Append an event: the key is the scope prefix; the backend appends a sequence number.
    Event(Vec<u8>, Vec<u8>),
    /// Precondition: there is no record under `key`, or its JSON field `field` is
    /// `holder`. The whole batch fails with [`StoreError::Conflict`] otherwise.
    ExpectFreeOr {
        /// Tree.
        tree: TreeId,
        /// Key.
        key: Vec<u8>,
        /// The JSON field compared.
        field: &'static str,
        /// The one value the field may have.
        holder: String,
    },
}

impl Op {
    /// Bytes of keys and values.
    fn len(&self) -> usize {
        match self {
            Op::Put(_, k, v) | Op::Event(k, v) => k.len() + v.len(),
            Op::Remove(_, k) => k.len(),
            Op::ExpectFreeOr { .. } => 0,
        }
    }

    /// Whether the precondition holds for `current` (the stored value); true for other ops.
    pub fn holds(&self, current: Option<&[u8]>) -> bool {
        let Op::ExpectFreeOr { field, holder, .. } = self else {
            return true;
        };
        let Some(current) = current else {
            return true;
        };
        serde_json::from_slice::<serde_json::Value>(current)
            .ok()
            .and_then(|j| j.get(*field).and_then(|f| f.as_str().map(str::to_owned)))
            .is_some_and(|found| found == *holder)
    }
}

/// A set of changes applied atomically by [`Store::commit`].
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Stores `value` as JSON under `key` in `tree`.
    pub fn put_json<T: Serialize>(
        &mut self,
        tree: TreeId,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<(), StoreError> {
        let key = key.as_ref().to_vec();
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Codec {
            tree: tree.name(),
            key: String::from_utf8_lossy(&key).into_owned(),
            source,
        })?;
        self.ops.push(Op::Put(tree, key, bytes));
        Ok(())
    }

    /// Stores `value` as it is under `key` in `tree` (a restore of exported records).
    pub fn put_raw(&mut self, tree: TreeId, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(tree, key, value));
    }

    /// Removes `key` from `tree`.
    pub fn remove(&mut self, tree: TreeId, key: impl AsRef<[u8]>) {
        self.ops.push(Op::Remove(tree, key.as_ref().to_vec()));
    }

    /// Stores a host record.
    pub fn put_host(&mut self, host: &HostRecord) -> Result<(), StoreError> {
        self.put_json(TreeId::Hosts, host.name.as_bytes(), host)
    }

    /// Stores a lease.
    pub fn put_lease(&mut self, lease: &LeaseRecord) -> Result<(), StoreError> {
        self.put_json(TreeId::Leases, lease_key(lease.subnet), lease)
    }

    /// Compare-and-set on leases: the batch applies only if `subnet` is free or already
    /// leased to `holder` when it commits.
    pub fn expect_lease(&mut self, subnet: Ipv4Net, holder: &str) {
        self.ops.push(Op::ExpectFreeOr {
            tree: TreeId::Leases,
            key: lease_key(subnet).to_vec(),
            field: "host",
            holder: holder.to_owned(),
        });
    }

    /// The operations, in order (for a [`StoreBackend`]).
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    /// Bytes of keys and values the batch writes.
    pub fn bytes(&self) -> u64 {
        self.ops.iter().map(|op| op.len() as u64).sum()
    }

    /// Releases the lease of `subnet`.
    pub fn remove_lease(&mut self, subnet: Ipv4Net) {
        self.remove(TreeId::Leases, lease_key(subnet));
    }

    /// Appends an event to `scope`'s listing (its sequence number is assigned at commit).
    pub fn event(&mut self, scope: EventScope<'_>, event: &EventRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(event).map_err(|source| StoreError::Codec {
            tree: TreeId::Events.name(),
            key: event.kind.clone(),
            source,
        })?;
        self.ops.push(Op::Event(scope.prefix(), bytes));
        Ok(())
    }

    /// Records the cluster revision.
    pub fn set_revision(&mut self, revision: u64) {
        self.ops.push(Op::Put(
            TreeId::Meta,
            META_REVISION.to_vec(),
            revision.to_be_bytes().to_vec(),
        ));
    }
}

/// Keys and values of a scan, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// What a state backend provides; [`Store`] adds the typed records on top.
pub trait StoreBackend: Send + Sync + std::fmt::Debug + 'static {
    /// The id of this state, generated once when it was created.
    fn controller_id(&self) -> &str;
    /// Where the state lives, for messages.
    fn path(&self) -> &Path;
    /// The value of `key` in `tree`.
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key and value of `tree` starting with `prefix`, in key order.
    fn scan_prefix(&self, tree: TreeId, prefix: &[u8]) -> Result<Entries, StoreError>;
    /// Applies `batch` atomically (every precondition checked inside the transaction) and
    /// makes it durable before returning.
    fn commit(&self, batch: Batch) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Makes everything durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Gives back the space of removed records if they left much (after large removals);
    /// `None` when there was nothing worth it.
    fn compact(&self) -> BoxFuture<'_, Result<Option<Compaction>, StoreError>> {
        Box::pin(async { Ok(None) })
    }
}

/// The state of one controller: typed records over a [`StoreBackend`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
}

impl Store {
    /// Opens (creating if needed) the embedded sled store in `dir` (see [`SledStore::open`]).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Ok(Store::with_backend(Arc::new(SledStore::open(dir)?)))
    }

    /// A store over `backend`.
    pub fn with_backend(backend: Arc<dyn StoreBackend>) -> Store {
        Store { backend }
    }

    /// The id of this state directory, generated once when it was created.
    pub fn controller_id(&self) -> &str {
        self.backend.controller_id()
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        self.backend.path()
    }

    /// Applies `batch` atomically and durably (see [`StoreBackend::commit`]).
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.backend.commit(batch).await
    }

    /// Every key and value of `tree`, in key order, as stored.
    pub fn entries(&self, tree: TreeId) -> Result<Entries, StoreError> {
        self.backend.scan_prefix(tree, b"")
    }

    /// Flushes everything to disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush().await
    }

    /// Gives back the space removed records left, if it is much (see
    /// [`StoreBackend::compact`]).
    pub async fn compact(&self) -> Result<Option<Compaction>, StoreError> {
        self.backend.compact().await
    }

    /// Reads one JSON record.
    pub fn get_json<T: DeserializeOwned>(
        &self,
        tree: TreeId,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<T>, StoreError> {
        let key = key.as_ref();
        match self.backend.get(tree, key)? {
            Some(v) => decode(tree, key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Reads every JSON record of `tree` in key order.
    pub fn scan_json<T: DeserializeOwned>(&self, tree: TreeId) -> Result<Vec<T>, StoreError> {
        self.scan_prefix_json(tree, b"")
    }

    /// Reads every JSON record of `tree` whose key starts with `prefix`, in key order.
    pub fn scan_prefix_json<T: DeserializeOwned>(
        &self,
        tree: TreeId,
        prefix: &[u8],
    ) -> Result<Vec<T>, StoreError> {
        self.backend
            .scan_prefix(tree, prefix)?
            .into_iter()
            .map(|(k, v)| decode(tree, &k, &v))
            .collect()
    }

    /// Every host record, by name.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.scan_json(TreeId::Hosts)
    }

    /// Every lease, by address.
    pub fn leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.scan_json(TreeId::Leases)
    }

    /// The events of `scope`, oldest first.
    pub fn events(&self, scope: EventScope<'_>) -> Result<Vec<EventRecord>, StoreError> {
        self.scan_prefix_json(TreeId::Events, &scope.prefix())
    }

    /// Every key of `tree` starting with `prefix`, in key order (to remove them).
    pub fn keys_with_prefix(
        &self,
        tree: TreeId,
        prefix: &[u8],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .backend
            .scan_prefix(tree, prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// The keys of `scope`'s events (to remove them).
    pub fn event_keys(&self, scope: EventScope<'_>) -> Result<Vec<Vec<u8>>, StoreError> {
        self.keys_with_prefix(TreeId::Events, &scope.prefix())
    }

    /// The last recorded cluster revision (0 for a fresh store).
    pub fn revision(&self) -> Result<u64, StoreError> {
        Ok(self
            .backend
            .get(TreeId::Meta, META_REVISION)?
            .map_or(0, |v| decode_u64(&v)))
    }
}

/// The directory of the sled database inside the state directory.
const DB_DIR: &str = "db";
/// The controller id, also kept outside the database (see [`SledStore::open`]).
const ID_FILE: &str = "controller_id";

/// Records `id` as the controller id of the state directory `dir` beside its database
/// (after a restore replaced the id in the database).
pub fn set_id_file(dir: &Path, id: &str) -> Result<(), StoreError> {
    write_id_file(&dir.join(ID_FILE), id)
}

/// Writes the id file durably (temporary file, fsync, rename).
fn write_id_file(path: &Path, id: &str) -> Result<(), StoreError> {
    let io = |source| StoreError::Compact {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut f, format!("{id}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
/// Where a compaction builds the fresh copy.
const DB_NEW_DIR: &str = "db.new";
/// Where the database being replaced goes during the swap.
const DB_OLD_DIR: &str = "db.old";
/// Written once [`DB_NEW_DIR`] is complete and durable: from then on the swap is finished,
/// not undone (also by the next start after a crash).
const DB_NEW_DONE: &str = "db.new.done";
/// The base added to sled's generated ids in event keys: a fresh (compacted) database
/// counts its ids from 0 again, so the base keeps new events after the old ones.
/// Meta key: added to sled's generated ids to make event sequence numbers (a copy or a
/// restore moves it past every id used before).
pub const META_EVENT_ID_BASE: &[u8] = b"event_id_base";

/// A state directory is compacted when its files take more than this many times its live
/// records' bytes, plus [`COMPACT_SLACK_BYTES`].
pub const COMPACT_RATIO: u64 = 2;
/// See [`COMPACT_RATIO`]: sled's files are a few MiB even for a tiny state.
pub const COMPACT_SLACK_BYTES: u64 = 16 << 20;

/// What a compaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// Bytes of the database's files before.
    pub before: u64,
    /// Bytes of the database's files after.
    pub after: u64,
    /// Bytes of keys and values it holds.
    pub live: u64,
}

/// One open sled database and its trees.
#[derive(Debug)]
struct Live {
    db: sled::Db,
    trees: [sled::Tree; 5],
    event_id_base: u64,
}

impl Live {
    fn open(path: &Path, dir: &Path) -> Result<Live, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            // sled's default page cache is 1 GiB; the controller's state is small.
            .cache_capacity(64 << 20)
            .open()
            .map_err(|e| match &e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(dir.to_owned())
                }
                _ => StoreError::Sled(e),
            })?;
        let open = |t: TreeId| db.open_tree(t.name());
        let trees = [
            open(TreeId::Hosts)?,
            open(TreeId::Leases)?,
            open(TreeId::Jobs)?,
            open(TreeId::Events)?,
            open(TreeId::Meta)?,
        ];
        let event_id_base = trees[TreeId::Meta.index()]
            .get(META_EVENT_ID_BASE)?
            .map_or(0, |v| decode_u64(&v));
        Ok(Live {
            db,
            trees,
            event_id_base,
        })
    }

    fn tree(&self, tree: TreeId) -> &sled::Tree {
        &self.trees[tree.index()]
    }

    /// Bytes of every key and value.
    fn live_bytes(&self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for t in &self.trees {
            for kv in t.iter() {
                let (k, v) = kv?;
                n = n.saturating_add((k.len() + v.len()) as u64);
            }
        }
        Ok(n)
    }

    /// Copies every record into a fresh database at `path` (its event id base moved past
    /// every id this one generated) and makes it durable.
    fn copy_to(&self, path: &Path, dir: &Path) -> Result<(), StoreError> {
        let fresh = Live::open(path, dir)?;
        for id in TreeId::ALL {
            let mut batch = sled::Batch::default();
            for kv in self.tree(id).iter() {
                let (k, v) = kv?;
                batch.insert(k, v);
            }
            fresh.tree(id).apply_batch(batch)?;
        }
        let base = self
            .event_id_base
            .saturating_add(self.db.generate_id()?)
            .saturating_add(1);
        fresh
            .tree(TreeId::Meta)
            .insert(META_EVENT_ID_BASE, &base.to_be_bytes())?;
        fresh.db.flush()?;
        Ok(())
    }
}

/// The embedded sled database of one controller.
///
/// sled never gives back the space of removed records: its files stay as large as the
/// state ever was. [`SledStore::compact`] (at open, and after large removals) copies the
/// records into a fresh database and swaps it in, crash-safely: the copy is built in
/// `db.new`; once it is durable `db.new.done` is written, the old database is closed and
/// moved to `db.old`, the copy moved to `db`, and `db.old` deleted. A start after a crash
/// finishes a swap whose copy was done and discards one whose copy was not.
#[derive(Debug)]
pub struct SledStore {
    /// `None` only while a compaction swaps databases (under the write lock).
    live: std::sync::RwLock<Option<Arc<Live>>>,
    /// Commits and flushes hold it shared; a compaction holds it exclusively.
    gate: tokio::sync::RwLock<()>,
    controller_id: String,
    path: PathBuf,
    /// `lock` in the state directory, held while the store is open.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`. A directory held by another process
    /// gives [`StoreError::Locked`]. A fresh directory gets a new controller id. A state
    /// whose files are much larger than its records is compacted first.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        let lock = lock_dir(dir)?;
        // a compaction interrupted by a crash: finished or undone (the lock is ours)
        recover_swap(dir)?;
        let live = Live::open(&dir.join(DB_DIR), dir)?;
        let meta = live.tree(TreeId::Meta);
        if let Some(v) = meta.get(META_SCHEMA)? {
            let found = decode_u64(&v);
            if found > SCHEMA_VERSION {
                return Err(StoreError::Schema {
                    path: dir.to_owned(),
                    found,
                });
            }
        }
        // The id is also kept in a plain file beside the database: sled, finding its log
        // damaged, may open it as empty (it stops reading at the damage) instead of failing;
        // an id file without the id in the database is that, not a fresh state.
        let id_file = dir.join(ID_FILE);
        let kept = std::fs::read_to_string(&id_file)
            .ok()
            .map(|s| s.trim().to_owned());
        let controller_id = match meta.get(META_CONTROLLER_ID)? {
            Some(v) if kept.as_deref().is_none_or(|k| k.as_bytes() == v.as_ref()) => {
                String::from_utf8_lossy(&v).into_owned()
            }
            _ if kept.is_some() => {
                return Err(StoreError::Lost {
                    path: dir.to_owned(),
                    id: kept.unwrap_or_default(),
                });
            }
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                meta.insert(META_CONTROLLER_ID, id.as_bytes())?;
                meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                live.db.flush()?;
                id
            }
        };
        if kept.is_none() {
            write_id_file(&id_file, &controller_id)?;
        }
        let store = SledStore {
            live: std::sync::RwLock::new(Some(Arc::new(live))),
            gate: tokio::sync::RwLock::new(()),
            controller_id,
            path: dir.to_owned(),
            _lock: lock,
        };
        // (it reads every record: damaged data found there is fatal, not a warning)
        let compacted = store.compact_now(false);
        if let Err(e) = &compacted
            && e.is_corrupt()
        {
            return Err(compacted.err().unwrap_or(StoreError::Closed));
        }
        log_compaction(&compacted, "at start");
        Ok(store)
    }

    /// The open database (not while a compaction swaps it: then the caller waits).
    fn live(&self) -> Result<Arc<Live>, StoreError> {
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Bytes of the database's files.
    pub fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.path.join(DB_DIR))
    }

    /// Compacts the database if its files take more than [`COMPACT_RATIO`] times its
    /// records plus [`COMPACT_SLACK_BYTES`] (`force`: whatever they take). Waits for the
    /// commits in flight and holds later ones until it is done.
    pub async fn compact(&self, force: bool) -> Result<Option<Compaction>, StoreError> {
        let _gate = self.gate.write().await;
        self.compact_now(force)
    }

    /// [`SledStore::compact`] with no commit running (the caller holds the gate or is
    /// opening the store).
    fn compact_now(&self, force: bool) -> Result<Option<Compaction>, StoreError> {
        let before = self.disk_bytes();
        let live_bytes = self.live()?.live_bytes()?;
        let threshold = live_bytes
            .saturating_mul(COMPACT_RATIO)
            .saturating_add(COMPACT_SLACK_BYTES);
        if !force && before <= threshold {
            return Ok(None);
        }
        let dir = &self.path;
        remove_dir_if_exists(&dir.join(DB_NEW_DIR))?;
        self.live()?.copy_to(&dir.join(DB_NEW_DIR), dir)?;
        mark_done(dir)?;
        let mut slot = self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // close the old database: readers hold its handle only for one read
        if let Some(mut old) = slot.take() {
            loop {
                match Arc::try_unwrap(old) {
                    Ok(live) => {
                        drop(live);
                        break;
                    }
                    Err(still) => {
                        old = still;
                        std::thread::yield_now();
                    }
                }
            }
        }
        let swapped = recover_swap(dir);
        // whatever happened, open what is at db now (the copy, or the old one if the swap failed)
        *slot = Some(Arc::new(Live::open(&dir.join(DB_DIR), dir)?));
        swapped?;
        Ok(Some(Compaction {
            before,
            after: self.disk_bytes(),
            live: live_bytes,
        }))
    }

    /// Applies `batch` atomically and flushes it to disk before returning. A batch the state
    /// directory's file system might not have room for is refused with
    /// [`StoreError::NoSpace`] before anything is written (see [`MIN_FREE_BYTES`]).
    async fn commit_batch(&self, batch: Batch) -> Result<(), StoreError> {
        let _gate = self.gate.read().await;
        let live = self.live()?;
        let bytes = batch.bytes();
        self.ensure_space(bytes)?;
        // Sequence numbers of events are taken before the transaction (sled ids are
        // monotonic across restarts), so the closure can be re-run on conflicts.
        let mut ops = Vec::with_capacity(batch.ops.len());
        let mut expects = Vec::new();
        for op in batch.ops {
            ops.push(match op {
                Op::Event(mut key, value) => {
                    let id = live.event_id_base.saturating_add(live.db.generate_id()?);
                    key.extend_from_slice(&id.to_be_bytes());
                    (TreeId::Events, key, Some(value))
                }
                Op::Put(tree, key, value) => (tree, key, Some(value)),
                Op::Remove(tree, key) => (tree, key, None),
                expect @ Op::ExpectFreeOr { .. } => {
                    expects.push(expect);
                    continue;
                }
            });
        }
        let trees: Vec<&sled::Tree> = TreeId::ALL.iter().map(|t| live.tree(*t)).collect();
        trees
            .as_slice()
            .transaction(|tx| {
                for expect in &expects {
                    let Op::ExpectFreeOr { tree, key, .. } = expect else {
                        continue;
                    };
                    let current = tx[tree.index()].get(key.as_slice())?;
                    if !expect.holds(current.as_deref()) {
                        return Err(ConflictableTransactionError::Abort(format!(
                            "{} {:?} changed meanwhile",
                            tree.name(),
                            String::from_utf8_lossy(key)
                        )));
                    }
                }
                for (tree, key, value) in &ops {
                    let t = &tx[tree.index()];
                    match value {
                        Some(v) => {
                            t.insert(key.as_slice(), v.as_slice())?;
                        }
                        None => {
                            t.remove(key.as_slice())?;
                        }
                    }
                }
                Ok::<(), ConflictableTransactionError<String>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(why) => StoreError::Conflict(why),
            })?;
        live.db.flush_async().await?;
        Ok(())
    }

    /// Refuses a change of `bytes` when the state directory's file system has less than
    /// twice that plus [`MIN_FREE_BYTES`] available. A file system that cannot tell is not
    /// checked.
    fn ensure_space(&self, bytes: u64) -> Result<(), StoreError> {
        let Ok(st) = nix::sys::statvfs::statvfs(&self.path) else {
            return Ok(());
        };
        #[allow(clippy::useless_conversion)] // the field types differ between platforms
        let available =
            u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
        let needed = MIN_FREE_BYTES.saturating_add(bytes.saturating_mul(2));
        if available < needed {
            return Err(StoreError::NoSpace {
                path: self.path.clone(),
                available,
                needed,
            });
        }
        Ok(())
    }
}

impl StoreBackend for SledStore {
    fn controller_id(&self) -> &str {
        &self.controller_id
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.live()?.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, tree: TreeId, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.live()?
            .tree(tree)
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn commit(&self, batch: Batch) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.commit_batch(batch))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let _gate = self.gate.read().await;
            self.live()?.db.flush_async().await?;
            Ok(())
        })
    }

    fn compact(&self) -> BoxFuture<'_, Result<Option<Compaction>, StoreError>> {
        Box::pin(SledStore::compact(self, false))
    }
}

/// Logs what a compaction `when` (e.g. "at start") did.
pub fn log_compaction(result: &Result<Option<Compaction>, StoreError>, when: &str) {
    match result {
        Ok(Some(c)) => tracing::info!(
            before = c.before,
            after = c.after,
            live = c.live,
            "state compacted {when}"
        ),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot compact the state {when}; going on with it as it is")
        }
    }
}

fn compact_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Compact {
        path: path.to_owned(),
        source,
    }
}

/// Holds `lock` in the state directory for as long as the store is open: no second
/// controller finishes or undoes this one's compaction.
fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(compact_err(&path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| StoreError::Locked(dir.to_owned()))
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(compact_err(dir))
}

fn remove_dir_if_exists(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(compact_err(path)(e)),
    }
}

/// Records that `db.new` is complete and durable.
fn mark_done(dir: &Path) -> Result<(), StoreError> {
    let done = dir.join(DB_NEW_DONE);
    std::fs::File::create(&done)
        .and_then(|f| f.sync_all())
        .map_err(compact_err(&done))?;
    fsync_dir(dir)
}

/// Finishes a compaction whose copy is done (`db.new.done`): `db` to `db.old`, `db.new` to
/// `db`, then `db.old` and the mark deleted. Without the mark, a partial `db.new` is
/// deleted. Each step can be repeated after a crash.
fn recover_swap(dir: &Path) -> Result<(), StoreError> {
    let (db, new, old, done) = (
        dir.join(DB_DIR),
        dir.join(DB_NEW_DIR),
        dir.join(DB_OLD_DIR),
        dir.join(DB_NEW_DONE),
    );
    if done.exists() {
        if new.exists() {
            if db.exists() {
                remove_dir_if_exists(&old)?;
                std::fs::rename(&db, &old).map_err(compact_err(&db))?;
                fsync_dir(dir)?;
            }
            std::fs::rename(&new, &db).map_err(compact_err(&new))?;
            fsync_dir(dir)?;
        }
        std::fs::remove_file(&done).map_err(compact_err(&done))?;
        fsync_dir(dir)?;
    } else {
        remove_dir_if_exists(&new)?;
        if !db.exists() && old.exists() {
            std::fs::rename(&old, &db).map_err(compact_err(&old))?;
            fsync_dir(dir)?;
        }
    }
    remove_dir_if_exists(&old)
}

/// Bytes of the files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn decode<T: DeserializeOwned>(tree: TreeId, key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|source| StoreError::Codec {
        tree: tree.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn decode_u64(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[8 - n..].copy_from_slice(&v[v.len() - n..]);
    u64::from_be_bytes(b)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, subnet: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            underlay_ip: "10.1.1.1".parse().unwrap(),
            subnet: Some(subnet.parse().unwrap()),
            last_subnet: Some(subnet.parse().unwrap()),
            pinned_subnet: None,
            state: HostState::Ready,
            state_since_ms: 1,
            registered_at_ms: 1,
            agent_version: "t".into(),
            agent_url: String::new(),
            network: NetworkRecord::default(),
            images: vec![],
            cordoned: false,
            wireguard: None,
        }
    }

    #[tokio::test]
    async fn a_database_that_lost_its_records_is_not_taken_for_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut b = Batch::new();
            b.put_host(&host("a", "172.17.1.0/24")).unwrap();
            store.commit(b).await.unwrap();
        }
        // what sled gives when it stops reading at damaged data: an empty database
        std::fs::remove_dir_all(dir.path().join(DB_DIR)).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Lost { .. }), "{err}");
        assert!(err.is_corrupt());
        assert!(err.to_string().contains("lost its records"), "{err}");
        // and nothing was made of it: the next open says the same
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Lost { .. })
        ));
    }

    #[tokio::test]
    async fn commit_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let store = Store::open(dir.path()).unwrap();
            id = store.controller_id().to_owned();
            let mut b = Batch::new();
            b.put_host(&host("a", "172.17.1.0/24")).unwrap();
            b.put_lease(&LeaseRecord {
                subnet: "172.17.1.0/24".parse().unwrap(),
                host: "a".into(),
                granted_at_ms: 1,
            })
            .unwrap();
            b.event(
                EventScope::Host("a"),
                &EventRecord {
                    kind: "Registered".into(),
                    ..Default::default()
                },
            )
            .unwrap();
            b.event(
                EventScope::Host("a"),
                &EventRecord {
                    kind: "Lost".into(),
                    ..Default::default()
                },
            )
            .unwrap();
            b.set_revision(7);
            store.commit(b).await.unwrap();
            // A second open of a held directory is refused clearly.
            let err = Store::open(dir.path()).unwrap_err();
            assert!(matches!(err, StoreError::Locked(_)), "{err}");
            assert!(err.to_string().contains("in use by another process"));
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.controller_id(), id);
        assert_eq!(store.hosts().unwrap(), vec![host("a", "172.17.1.0/24")]);
        assert_eq!(store.leases().unwrap().len(), 1);
        assert_eq!(store.revision().unwrap(), 7);
        let kinds: Vec<String> = store
            .events(EventScope::Host("a"))
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, vec!["Registered", "Lost"]);
        assert!(store.events(EventScope::Job("a")).unwrap().is_empty());
        let mut b = Batch::new();
        b.remove_lease("172.17.1.0/24".parse().unwrap());
        store.commit(b).await.unwrap();
        assert!(store.leases().unwrap().is_empty());
    }

    #[tokio::test]
    async fn lease_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let subnet: Ipv4Net = "172.17.1.0/24".parse().unwrap();
        let lease = |host: &str| LeaseRecord {
            subnet,
            host: host.into(),
            granted_at_ms: 1,
        };
        let mut b = Batch::new();
        b.expect_lease(subnet, "a");
        b.put_lease(&lease("a")).unwrap();
        store.commit(b).await.unwrap();
        // b raced with a: its grant of the same subnet fails, nothing is written
        let mut b = Batch::new();
        b.expect_lease(subnet, "b");
        b.put_lease(&lease("b")).unwrap();
        b.put_host(&host("b", "172.17.1.0/24")).unwrap();
        let err = store.commit(b).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        assert!(store.hosts().unwrap().is_empty());
        assert_eq!(store.leases().unwrap(), vec![lease("a")]);
        // the holder may renew and release it
        let mut b = Batch::new();
        b.expect_lease(subnet, "a");
        b.remove_lease(subnet);
        store.commit(b).await.unwrap();
        assert!(store.leases().unwrap().is_empty());
    }

    #[test]
    fn a_full_disk_is_resource_exhausted() {
        let full = StoreError::NoSpace {
            path: "/var/lib/geomx-controller".into(),
            available: 0,
            needed: MIN_FREE_BYTES,
        };
        assert_eq!(full.kind(), StoreErrorKind::Full);
        assert!(
            full.to_string().starts_with("no space left on device"),
            "{full}"
        );
        let enospc = StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(28)));
        assert_eq!(enospc.kind(), StoreErrorKind::Full);
        let eio = StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(5)));
        assert_eq!(eio.kind(), StoreErrorKind::Unavailable);
        let bug = StoreError::Sled(sled::Error::ReportableBug("x".into()));
        assert_eq!(bug.kind(), StoreErrorKind::Internal);
    }

    fn job_event(kind: &str) -> EventRecord {
        EventRecord {
            kind: kind.into(),
            ..Default::default()
        }
    }

    async fn bloat_and_clear(store: &Store) {
        // 24 records of 1 MiB, written and removed: sled keeps their space
        for i in 0..24 {
            let mut b = Batch::new();
            b.put_json(TreeId::Jobs, format!("run/big/{i}"), &"x".repeat(1 << 20))
                .unwrap();
            store.commit(b).await.unwrap();
        }
        let mut b = Batch::new();
        for i in 0..24 {
            b.remove(TreeId::Jobs, format!("run/big/{i}"));
        }
        store.commit(b).await.unwrap();
    }

    #[tokio::test]
    async fn removed_records_space_is_given_back_and_events_stay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = store.controller_id().to_owned();
        let mut b = Batch::new();
        b.put_host(&host("a", "172.17.1.0/24")).unwrap();
        b.event(EventScope::Job("j#1"), &job_event("Submitted"))
            .unwrap();
        store.commit(b).await.unwrap();
        // nothing worth compacting yet
        assert_eq!(store.compact().await.unwrap(), None);
        bloat_and_clear(&store).await;
        let db = dir.path().join(DB_DIR);
        let bloated = dir_bytes(&db);
        assert!(bloated > 24 << 20, "{bloated}");
        let c = store.compact().await.unwrap().expect("compacted");
        assert_eq!(c.before, bloated);
        assert!(c.after < 8 << 20, "{c:?}");
        assert_eq!(dir_bytes(&db), c.after);
        assert!(!dir.path().join(DB_NEW_DIR).exists());
        assert!(!dir.path().join(DB_OLD_DIR).exists());
        assert!(!dir.path().join(DB_NEW_DONE).exists());
        // everything is still there, and new events come after the old ones
        assert_eq!(store.controller_id(), id);
        assert_eq!(store.hosts().unwrap(), vec![host("a", "172.17.1.0/24")]);
        let mut b = Batch::new();
        b.event(EventScope::Job("j#1"), &job_event("Running"))
            .unwrap();
        store.commit(b).await.unwrap();
        let kinds = |store: &Store| -> Vec<String> {
            store
                .events(EventScope::Job("j#1"))
                .unwrap()
                .into_iter()
                .map(|e| e.kind)
                .collect()
        };
        assert_eq!(kinds(&store), ["Submitted", "Running"]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.controller_id(), id);
        assert_eq!(kinds(&store), ["Submitted", "Running"]);
    }

    #[tokio::test]
    async fn a_bloated_state_is_compacted_at_start_and_a_crash_mid_swap_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = Store::open(dir.path()).unwrap();
            bloat_and_clear(&store).await;
            let mut b = Batch::new();
            b.put_host(&host("a", "172.17.1.0/24")).unwrap();
            store.commit(b).await.unwrap();
            store.controller_id().to_owned()
        };
        let db = dir.path().join(DB_DIR);
        let bloated = dir_bytes(&db);
        let store = Store::open(dir.path()).unwrap();
        let compacted = dir_bytes(&db);
        assert!(compacted < bloated / 3, "{bloated} -> {compacted}");
        assert_eq!(store.hosts().unwrap().len(), 1);
        drop(store);

        // a crash while copying: the partial copy is discarded
        std::fs::create_dir_all(dir.path().join(DB_NEW_DIR)).unwrap();
        std::fs::write(dir.path().join(DB_NEW_DIR).join("junk"), b"partial").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!dir.path().join(DB_NEW_DIR).exists());
        assert_eq!(store.controller_id(), id);
        drop(store);

        // a crash after the copy was done and the old one moved away: the swap is finished
        std::fs::rename(&db, dir.path().join(DB_NEW_DIR)).unwrap();
        std::fs::create_dir_all(dir.path().join(DB_OLD_DIR)).unwrap();
        std::fs::write(dir.path().join(DB_NEW_DONE), b"").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.controller_id(), id);
        assert_eq!(store.hosts().unwrap(), vec![host("a", "172.17.1.0/24")]);
        for leftover in [DB_NEW_DIR, DB_OLD_DIR, DB_NEW_DONE] {
            assert!(!dir.path().join(leftover).exists(), "{leftover}");
        }
    }

    #[test]
    fn lease_keys_sort_by_address() {
        let a = lease_key("172.17.2.0/24".parse().unwrap());
        let b = lease_key("172.17.10.0/24".parse().unwrap());
        assert!(a < b);
    }
}
