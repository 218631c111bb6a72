//! Which labelled containers are this agent's own: the creation record.
//!
//! Labels are no proof: an image inherits the labels of the container it was committed
//! from, so `docker commit` of a role container, run by hand under another name, carries
//! `io.geomx.managed=true` and the node's job and node labels. The agent therefore keeps a
//! record of the containers it created ([`RECORD_FILE`] in its state directory, JSON,
//! written atomically), by container id, which no image can inherit. Only recorded
//! containers are adopted, kept, replaced or removed; any other labelled container is left
//! alone (not adopted, not removed, not counted as a node) and logged once.
//!
//! Creating a container: a random nonce is recorded as *pending* (with the name) before
//! the create call, the container carries it as label [`LABEL_CREATION`], and the
//! container's id replaces the pending entry once Docker answered. A crash (or a Docker
//! answer lost) in between is recovered at the next listing: a listed, unrecorded
//! container with a pending nonce **and** the pending name is the one the agent created
//! (a committed copy with the nonce label has another id, and the pending entry is gone
//! once the original was recorded). Pending entries nothing matched are dropped after
//! [`PENDING_TTL_MS`].
//!
//! Upgrade: on the first start with no record file (an agent version before records, or a
//! new host), the labelled containers of this agent's controller id (label
//! `io.geomx.controller`, the controller id of the desired state the agent starts with) are
//! adopted once and recorded, so upgrading the agent restarts nothing. Those containers
//! have no heartbeat token: their heartbeats are checked by source address only (see
//! [`crate::heartbeat`]). The same happens if the record file is deleted, and a corrupt
//! file is moved aside (`containers.json.corrupt`) and treated as missing. Labelled
//! containers of other controller ids found then are left alone.
//!
//! Ids of containers Docker no longer lists are dropped from the record (ids are never
//! reused).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::engine::ActualContainer;
use crate::error::{Result, RuntimeError};
use crate::reconcile::actual_key;
use crate::spec::{ContainerKind, LABEL_CONTROLLER, LABEL_CREATION, LABEL_GENERATION};

/// The record's file in the agent's state directory.
pub const RECORD_FILE: &str = "containers.json";
/// How long a pending creation nothing matched is kept.
pub const PENDING_TTL_MS: i64 = 10 * 60 * 1000;

/// One container the agent created (or adopted once at an upgrade).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// Its name at creation.
    pub name: String,
    /// `role` or `sandbox`.
    pub kind: String,
    /// Job.
    pub job: String,
    /// Node.
    pub node: String,
    /// Controller id.
    #[serde(default)]
    pub controller: String,
    /// Generation.
    #[serde(default)]
    pub generation: u32,
    /// The creation nonce (label `io.geomx.creation`); empty for a container adopted at an
    /// upgrade.
    #[serde(default)]
    pub nonce: String,
    /// The container got a heartbeat token in its env.
    #[serde(default)]
    pub token: bool,
    /// When it was recorded (pending: when the creation began), Unix ms.
    #[serde(default)]
    pub since_ms: i64,
}

impl Created {
    /// The entry of a labelled container adopted without a creation (an upgrade): no
    /// token.
    pub fn from_labels(c: &ActualContainer, now_ms: i64) -> Created {
        let (job, node) = actual_key(c).unwrap_or_default();
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        Created {
            name: c.name.clone(),
            kind: ContainerKind::of_labels(&c.labels).as_str().to_string(),
            job,
            node,
            controller: label(LABEL_CONTROLLER),
            generation: label(LABEL_GENERATION).parse().unwrap_or(0),
            nonce: label(LABEL_CREATION),
            token: false,
            since_ms: now_ms,
        }
    }
}

/// The record as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordDoc {
    /// Format version (1).
    #[serde(default)]
    pub version: u32,
    /// Created containers by id.
    #[serde(default)]
    pub containers: BTreeMap<String, Created>,
    /// Creations begun and not yet answered, by nonce.
    #[serde(default)]
    pub pending: BTreeMap<String, Created>,
}

/// Which labelled containers are adopted when there is no record yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Legacy<'a> {
    /// Those labelled with this controller id.
    Controller(&'a str),
    /// Every labelled one (no controller id known: tests, a runtime used on its own).
    Any,
}

/// What a listing means for the record (see [`claim`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    /// Ids of the listed containers that are the agent's (recorded before, recovered or
    /// adopted now).
    pub owned: BTreeSet<String>,
    /// Ids recorded now from a pending creation (nonce and name matched).
    pub recovered: Vec<String>,
    /// Ids adopted now because there was no record yet (upgrade).
    pub legacy: Vec<String>,
    /// Ids of listed labelled containers that are not the agent's: left alone.
    pub foreign: Vec<String>,
    /// Recorded ids Docker no longer lists: dropped from the record.
    pub gone: Vec<String>,
    /// Pending nonces that expired.
    pub expired: Vec<String>,
}

/// Pure: which of the labelled containers `actual` are the agent's according to `doc`,
/// and the record after this listing. `legacy` is `Some` only when there was no record
/// file (the first start of an upgraded agent): the labelled containers it names are
/// adopted once.
pub fn claim(
    doc: &RecordDoc,
    actual: &[ActualContainer],
    legacy: Option<Legacy<'_>>,
    now_ms: i64,
) -> (Claim, RecordDoc) {
    let mut next = doc.clone();
    next.version = 1;
    let mut out = Claim::default();
    let listed: BTreeSet<&str> = actual.iter().map(|c| c.id.as_str()).collect();
    for c in actual {
        if next.containers.contains_key(&c.id) {
            out.owned.insert(c.id.clone());
            continue;
        }
        let nonce = c.labels.get(LABEL_CREATION).filter(|n| !n.is_empty());
        if let Some(n) = nonce
            && next.pending.get(n).is_some_and(|p| p.name == c.name)
            && let Some(mut entry) = next.pending.remove(n)
        {
            entry.since_ms = now_ms;
            next.containers.insert(c.id.clone(), entry);
            out.owned.insert(c.id.clone());
            out.recovered.push(c.id.clone());
            continue;
        }
        let adopt = match legacy {
            None => false,
            Some(Legacy::Any) => true,
            Some(Legacy::Controller(id)) => {
                c.labels.get(LABEL_CONTROLLER).map(String::as_str) == Some(id)
            }
        };
        if adopt && actual_key(c).is_some() {
            next.containers
                .insert(c.id.clone(), Created::from_labels(c, now_ms));
            out.owned.insert(c.id.clone());
            out.legacy.push(c.id.clone());
        } else {
            out.foreign.push(c.id.clone());
        }
    }
    next.containers.retain(|id, _| {
        let keep = listed.contains(id.as_str());
        if !keep {
            out.gone.push(id.clone());
        }
        keep
    });
    next.pending.retain(|nonce, p| {
        let keep = now_ms.saturating_sub(p.since_ms) < PENDING_TTL_MS;
        if !keep {
            out.expired.push(nonce.clone());
        }
        keep
    });
    (out, next)
}

/// The agent's creation record: in its state directory ([`CreationRecord::open`]) or in
/// memory ([`CreationRecord::in_memory`], as a fresh state directory: the first listing
/// adopts the labelled containers once). Cheap to clone (a handle): clones share it, so a
/// runtime started again with a clone of the same config finds what the first created.
#[derive(Clone)]
pub struct CreationRecord {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    path: Option<PathBuf>,
    doc: RecordDoc,
    /// No record existed: the next claim adopts the labelled containers once.
    first: bool,
    /// Foreign ids already logged.
    logged: BTreeSet<String>,
}

impl Default for CreationRecord {
    fn default() -> Self {
        CreationRecord::in_memory()
    }
}

impl std::fmt::Debug for CreationRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("CreationRecord")
            .field("path", &g.path)
            .field("containers", &g.doc.containers.len())
            .field("pending", &g.doc.pending.len())
            .finish()
    }
}

impl CreationRecord {
    /// A record kept in memory only, starting empty and with no record "file" (the first
    /// claim adopts the labelled containers once).
    pub fn in_memory() -> CreationRecord {
        CreationRecord {
            inner: Arc::new(Mutex::new(Inner {
                path: None,
                doc: RecordDoc::default(),
                first: true,
                logged: BTreeSet::new(),
            })),
        }
    }

    /// The record in `state_dir` ([`RECORD_FILE`]). A missing file is a first start (see
    /// the module docs); a file that does not parse is moved aside with a warning and
    /// treated as missing; a file that cannot be read is an error.
    pub fn open(state_dir: &Path) -> Result<CreationRecord> {
        let path = state_dir.join(RECORD_FILE);
        let kept = crate::kept::read_json::<RecordDoc>(
            &path,
            "creation record",
            "the labelled containers of this controller are adopted again",
        )
        .map_err(|source| RuntimeError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        let first = kept.is_none();
        let doc = kept.unwrap_or_default();
        Ok(CreationRecord {
            inner: Arc::new(Mutex::new(Inner {
                path: Some(path),
                doc,
                first,
                logged: BTreeSet::new(),
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file, if the record is kept in one.
    pub fn path(&self) -> Option<PathBuf> {
        self.lock().path.clone()
    }

    /// The ids recorded.
    pub fn ids(&self) -> BTreeSet<String> {
        self.lock().doc.containers.keys().cloned().collect()
    }

    /// The entry of container `id`, if it is recorded.
    pub fn get(&self, id: &str) -> Option<Created> {
        self.lock().doc.containers.get(id).cloned()
    }

    /// Takes a listing of the labelled containers: returns those that are the agent's (see
    /// [`claim`]; `controller`: this agent's controller id, for the first start without a
    /// record) and keeps the record up to date (written when it changed). Foreign
    /// containers are logged once each.
    pub fn claim(
        &self,
        actual: &[ActualContainer],
        controller: Option<&str>,
    ) -> Vec<ActualContainer> {
        let mut g = self.lock();
        let legacy = g.first.then_some(match controller {
            Some(id) if !id.is_empty() => Legacy::Controller(id),
            _ => Legacy::Any,
        });
        let (c, next) = claim(&g.doc, actual, legacy, crate::status::now_ms());
        let name = |id: &str| {
            actual
                .iter()
                .find(|a| a.id == id)
                .map_or(String::new(), |a| a.name.clone())
        };
        if g.first {
            info!(
                adopted = c.legacy.len(),
                left_alone = c.foreign.len(),
                "no creation record yet (first start of this agent version, or a new state directory): adopting the labelled containers of this controller once and recording them"
            );
        }
        for id in &c.recovered {
            info!(id = %short(id), name = %name(id), "recorded a container whose creation was not recorded (the agent stopped, or Docker's answer was lost, between create and record)");
        }
        for id in &c.foreign {
            if g.logged.insert(id.clone()) {
                warn!(id = %short(id), name = %name(id), "a container labelled io.geomx.managed that this agent did not create (e.g. run by hand from a committed image) is left alone: not adopted, not removed");
            }
        }
        let listed: BTreeSet<&str> = actual.iter().map(|a| a.id.as_str()).collect();
        g.logged.retain(|id| listed.contains(id.as_str()));
        let changed = next != g.doc || g.first;
        g.doc = next;
        g.first = false;
        if changed {
            persist(&g);
        }
        actual
            .iter()
            .filter(|a| c.owned.contains(&a.id))
            .cloned()
            .collect()
    }

    /// Before creating a container: records the creation as pending under `nonce`. `Err`
    /// when the record cannot be written (then nothing may be created: a container the
    /// record does not know would not be the agent's after a restart).
    pub fn begin(&self, nonce: &str, mut entry: Created) -> Result<()> {
        let mut g = self.lock();
        entry.nonce = nonce.to_string();
        entry.since_ms = crate::status::now_ms();
        g.doc.pending.insert(nonce.to_string(), entry);
        g.doc.version = 1;
        match &g.path {
            None => Ok(()),
            Some(path) => write_atomic(path, &encode(&g.doc)).map_err(|source| RuntimeError::Io {
                what: format!("writing the creation record {}", path.display()),
                source,
            }),
        }
    }

    /// Docker created the pending creation `nonce` as container `id`.
    pub fn created(&self, nonce: &str, id: &str) {
        let mut g = self.lock();
        if let Some(mut entry) = g.doc.pending.remove(nonce) {
            entry.since_ms = crate::status::now_ms();
            g.doc.containers.insert(id.to_string(), entry);
            persist(&g);
        }
    }

    /// The pending creation `nonce` did not happen (Docker refused it).
    pub fn abandon(&self, nonce: &str) {
        let mut g = self.lock();
        if g.doc.pending.remove(nonce).is_some() {
            persist(&g);
        }
    }

    /// Container `id` was removed by the agent.
    pub fn forget(&self, id: &str) {
        let mut g = self.lock();
        if g.doc.containers.remove(id).is_some() {
            persist(&g);
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn encode(doc: &RecordDoc) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(doc).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Writes the record when it is kept in a file; a failure is logged (the record in memory
/// stays right, and the next write carries everything).
fn persist(g: &Inner) {
    if let Some(path) = &g.path
        && let Err(e) = write_atomic(path, &encode(&g.doc))
    {
        warn!(file = %path.display(), error = %e, "cannot write the creation record; keeping it in memory (containers created meanwhile are not the agent's after a restart unless it is written)");
    }
}

/// Replaces `path` atomically (temporary file, fsync, rename, fsync of the directory;
/// mode 0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineState;
    use crate::spec::{ContainerSpec, LABEL_CREATION, SandboxConfig};

    const URL: &str = "http://172.17.34.1:7948";

    fn spec(node: &str) -> ContainerSpec {
        ContainerSpec {
            job: "j".into(),
            node: node.into(),
            role: "worker".into(),
            party: "a".into(),
            image: "img:1".into(),
            controller_id: "c".into(),
            host_network: true,
            start: true,
            ..Default::default()
        }
    }

    /// A role container as the agent creates it (with its nonce label).
    fn made(id: &str, s: &ContainerSpec, nonce: &str) -> ActualContainer {
        let mut labels = s.labels(URL, &SandboxConfig::default());
        labels.insert(LABEL_CREATION.into(), nonce.into());
        ActualContainer {
            id: id.into(),
            name: s.container_name(),
            labels,
            state: EngineState::Running,
        }
    }

    fn entry(c: &ActualContainer) -> Created {
        Created {
            token: true,
            ..Created::from_labels(c, 0)
        }
    }

    #[test]
    fn a_crash_between_create_and_record_is_recovered_by_nonce_and_name() {
        let own = made("c1", &spec("w0"), "n1");
        let mut doc = RecordDoc::default();
        doc.pending.insert("n1".into(), entry(&own));
        // a copy with the same nonce label but another name is not it
        let mut copy = own.clone();
        copy.id = "c2".into();
        copy.name = "copy".into();
        let (c, next) = claim(&doc, &[copy.clone(), own.clone()], None, 1);
        assert_eq!(c.recovered, vec!["c1".to_string()]);
        assert_eq!(c.foreign, vec!["c2".to_string()]);
        assert!(next.pending.is_empty());
        assert!(next.containers["c1"].token);
        // once recorded, the same nonce recovers nothing else
        let (c, _) = claim(&next, &[copy, own], None, 2);
        assert_eq!(c.owned, BTreeSet::from(["c1".to_string()]));
        assert!(c.recovered.is_empty());
        // a pending creation nothing matched expires
        let mut doc = RecordDoc::default();
        doc.pending
            .insert("n9".into(), entry(&made("x", &spec("w9"), "n9")));
        let (c, next) = claim(&doc, &[], None, PENDING_TTL_MS + 1);
        assert_eq!(c.expired, vec!["n9".to_string()]);
        assert!(next.pending.is_empty());
    }

    #[test]
    fn the_record_survives_a_restart_and_a_corrupt_one_is_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = CreationRecord::open(dir.path()).expect("open");
        // first start: the labelled containers of this controller are adopted once
        let mut other = made("c9", &spec("w9"), "");
        other
            .labels
            .insert(LABEL_CONTROLLER.into(), "another".into());
        let legacy = made("c1", &spec("w1"), "");
        let owned = r.claim(&[legacy.clone(), other.clone()], Some("c"));
        assert_eq!(owned, vec![legacy.clone()]);
        assert!(!r.get("c1").expect("recorded").token);
        r.begin("n2", entry(&made("", &spec("w2"), "n2")))
            .expect("begin");
        r.created("n2", "c2");
        let r2 = CreationRecord::open(dir.path()).expect("open again");
        assert_eq!(r2.ids(), BTreeSet::from(["c1".into(), "c2".into()]));
        // not the first start any more: a new labelled container is not adopted
        let stranger = made("c3", &spec("w3"), "");
        let owned = r2.claim(&[legacy.clone(), stranger, other], Some("c"));
        assert_eq!(owned, vec![legacy.clone()], "c2 is gone, c3 is a stranger");
        assert_eq!(r2.ids(), BTreeSet::from(["c1".into()]));
        r2.forget("c1");
        assert!(r2.ids().is_empty());
        fs::write(dir.path().join(RECORD_FILE), b"{ not json").expect("write");
        let r3 = CreationRecord::open(dir.path()).expect("open corrupt");
        assert!(dir.path().join(format!("{RECORD_FILE}.corrupt")).exists());
        assert_eq!(
            r3.claim(std::slice::from_ref(&legacy), Some("c")),
            vec![legacy]
        );
    }
}
