//! `geomx-controller state check | export FILE | import FILE`: the controller's state checked,
//! written out and restored (with the controller stopped: the state directory is locked
//! while a controller uses it).
//!
//! An export is JSON lines: a header (`format`, `version`, `controller_id`, counts), then one
//! line per record of every tree, `{"tree", "key" | "key_hex", "value" | "value_hex"}`: a key
//! that is printable UTF-8 as text, else hex; a value that is JSON as JSON, else hex. It
//! holds every record exactly (hosts, leases, jobs with their runs and nodes, events, the
//! meta records: the controller id the containers are labelled with, the revision), so an
//! import gives back the same state. An import goes only into an empty state directory,
//! reads and checks the whole file first and writes it in one atomic batch: a bad file
//! changes nothing.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::store::{
    Batch, EventRecord, HostRecord, LeaseRecord, META_CONTROLLER_ID, META_EVENT_ID_BASE, Store,
    StoreError, TreeId,
};

/// The `format` of an export's header.
pub const FORMAT: &str = "geomx-controller-state";
/// The version of the export format this controller writes and reads.
pub const VERSION: u64 = 1;
/// Longest line of an export that is read (a record of the state is far smaller).
const MAX_LINE: usize = 64 << 20;

/// Errors of `state` commands.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store failed (locked by a running controller, corrupt, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing the export file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line of the export file is not what an export holds.
    #[error("{}:{line}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The state directory to import into already holds records.
    #[error(
        "state dir {} already holds {records} records: import only into an empty or new state dir (move this one aside first)",
        path.display()
    )]
    NotEmpty {
        /// The state directory.
        path: PathBuf,
        /// Records found (hosts, leases, jobs, events).
        records: usize,
    },
}

impl BackupError {
    /// Whether the state store is damaged (see [`StoreError::is_corrupt`]).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, BackupError::Store(s) if s.is_corrupt())
    }
}

/// The first line of an export.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u64,
    controller_id: String,
    exported_at_ms: i64,
    /// Records per tree.
    records: BTreeMap<String, usize>,
}

/// One record of an export.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    tree: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

/// Records per tree of a check, export or import.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Records per tree name.
    pub records: BTreeMap<&'static str, usize>,
    /// Records that do not decode as what their tree holds: `tree key: reason`.
    pub problems: Vec<String>,
}

impl Summary {
    /// `hosts 3, leases 3, jobs 41, events 310, meta 4`.
    pub fn counts(&self) -> String {
        TreeId::ALL
            .iter()
            .map(|t| format!("{} {}", t.name(), self.records.get(t.name()).unwrap_or(&0)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn tree_named(name: &str) -> Option<TreeId> {
    TreeId::ALL.into_iter().find(|t| t.name() == name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// A key as an export line holds it.
fn key_fields(key: &[u8], line: &mut Line) {
    match std::str::from_utf8(key) {
        Ok(k) if !k.chars().any(char::is_control) => line.key = Some(k.to_owned()),
        _ => line.key_hex = Some(hex(key)),
    }
}

/// A value as an export line holds it: JSON as it is (its text kept byte for byte), anything
/// else as hex (so that an import restores the bytes exactly).
fn value_fields(value: &[u8], line: &mut Line) {
    match std::str::from_utf8(value)
        .ok()
        .filter(|t| !t.contains('\n'))
        .and_then(|t| RawValue::from_string(t.to_owned()).ok())
    {
        Some(v) => line.value = Some(v),
        None => line.value_hex = Some(hex(value)),
    }
}

/// What is wrong with `value` for `tree`, if anything.
fn problem(tree: TreeId, value: &[u8]) -> Option<String> {
    let r = match tree {
        TreeId::Hosts => serde_json::from_slice::<HostRecord>(value).map(drop),
        TreeId::Leases => serde_json::from_slice::<LeaseRecord>(value).map(drop),
        TreeId::Events => serde_json::from_slice::<EventRecord>(value).map(drop),
        TreeId::Jobs => serde_json::from_slice::<Value>(value).map(drop),
        TreeId::Meta => Ok(()),
    };
    r.err().map(|e| e.to_string())
}

fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Reads every record and decodes it as what its tree holds.
pub fn check(store: &Store) -> Result<Summary, BackupError> {
    let mut summary = Summary::default();
    for tree in TreeId::ALL {
        let entries = store.entries(tree)?;
        summary.records.insert(tree.name(), entries.len());
        for (k, v) in &entries {
            if let Some(p) = problem(tree, v) {
                summary
                    .problems
                    .push(format!("{} {:?}: {p}", tree.name(), key_text(k)));
            }
        }
    }
    Ok(summary)
}

/// Writes every record of `store` to `out` (named `path` in errors).
pub fn export(store: &Store, out: &mut dyn Write, path: &Path) -> Result<Summary, BackupError> {
    let io = |source| BackupError::Io {
        path: path.to_owned(),
        source,
    };
    let mut trees = Vec::new();
    let mut summary = Summary::default();
    for tree in TreeId::ALL {
        let entries = store.entries(tree)?;
        summary.records.insert(tree.name(), entries.len());
        trees.push((tree, entries));
    }
    let header = Header {
        format: FORMAT.to_owned(),
        version: VERSION,
        controller_id: store.controller_id().to_owned(),
        exported_at_ms: crate::store::now_ms(),
        records: summary
            .records
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
    };
    write_line(out, path, &header)?;
    for (tree, entries) in &trees {
        for (k, v) in entries {
            let mut line = Line {
                tree: tree.name().to_owned(),
                ..Line::default()
            };
            key_fields(k, &mut line);
            value_fields(v, &mut line);
            write_line(out, path, &line)?;
        }
    }
    out.flush().map_err(io)?;
    Ok(summary)
}

/// Writes `v` as one JSON line.
fn write_line<T: Serialize>(out: &mut dyn Write, path: &Path, v: &T) -> Result<(), BackupError> {
    let io = |source| BackupError::Io {
        path: path.to_owned(),
        source,
    };
    serde_json::to_writer(&mut *out, v).map_err(|e| io(e.into()))?;
    out.write_all(b"\n").map_err(io)
}

/// The records of an export file, checked: `(tree, key, value)`.
type Records = Vec<(TreeId, Vec<u8>, Vec<u8>)>;

/// Reads and checks a whole export (`input`, named `path` in errors).
fn read_export(input: &mut dyn BufRead, path: &Path) -> Result<(Header, Records), BackupError> {
    let bad = |line: usize, reason: String| BackupError::Format {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut header: Option<Header> = None;
    let mut records = Vec::new();
    let mut buf = Vec::new();
    let mut n = 0usize;
    loop {
        buf.clear();
        let read = std::io::Read::take(&mut *input, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| BackupError::Io {
                path: path.to_owned(),
                source,
            })?;
        if read == 0 {
            break;
        }
        n += 1;
        if buf.len() > MAX_LINE {
            return Err(bad(n, format!("line longer than {MAX_LINE} bytes")));
        }
        let text = std::str::from_utf8(&buf).map_err(|e| bad(n, format!("not UTF-8: {e}")))?;
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        if header.is_none() {
            let h: Header = serde_json::from_str(text).map_err(|e| {
                bad(
                    n,
                    format!("not a geomx-controller state export header: {e}"),
                )
            })?;
            if h.format != FORMAT {
                return Err(bad(
                    n,
                    format!("format {:?}, expected {FORMAT:?}", h.format),
                ));
            }
            if h.version != VERSION {
                return Err(bad(
                    n,
                    format!(
                        "export format version {}; this geomx-controller reads version {VERSION}",
                        h.version
                    ),
                ));
            }
            header = Some(h);
            continue;
        }
        let line: Line = serde_json::from_str(text).map_err(|e| bad(n, e.to_string()))?;
        let tree = tree_named(&line.tree).ok_or_else(|| {
            let names: Vec<_> = TreeId::ALL.iter().map(|t| t.name()).collect();
            bad(
                n,
                format!("unknown tree {:?} (one of {})", line.tree, names.join(", ")),
            )
        })?;
        let key = match (line.key, line.key_hex) {
            (Some(k), None) => k.into_bytes(),
            (None, Some(h)) => {
                unhex(&h).ok_or_else(|| bad(n, format!("key_hex {h:?} is not hex")))?
            }
            _ => return Err(bad(n, "a record has exactly one of key and key_hex".into())),
        };
        let value = match (line.value, line.value_hex) {
            (Some(v), None) => v.get().as_bytes().to_vec(),
            (None, Some(h)) => {
                unhex(&h).ok_or_else(|| bad(n, "value_hex is not hex".to_owned()))?
            }
            _ => {
                return Err(bad(
                    n,
                    "a record has exactly one of value and value_hex".into(),
                ));
            }
        };
        if let Some(p) = problem(tree, &value) {
            return Err(bad(
                n,
                format!("{} record {:?}: {p}", tree.name(), key_text(&key)),
            ));
        }
        records.push((tree, key, value));
    }
    let header = header.ok_or_else(|| bad(1, "empty file: no export header".into()))?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (tree, _, _) in &records {
        *counts.entry(tree.name().to_owned()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = header
        .records
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    if counts != expected {
        return Err(bad(
            n,
            format!(
                "the header counts {expected:?} records but the file holds {counts:?}: the export is incomplete"
            ),
        ));
    }
    Ok((header, records))
}

/// Restores an export into `store`, which must hold no record yet; everything in one batch.
pub async fn import(
    store: &Store,
    input: &mut dyn BufRead,
    path: &Path,
) -> Result<Summary, BackupError> {
    let (header, records) = read_export(input, path)?;
    let held: usize = [TreeId::Hosts, TreeId::Leases, TreeId::Jobs, TreeId::Events]
        .into_iter()
        .map(|t| store.entries(t).map(|e| e.len()))
        .sum::<Result<usize, _>>()?;
    if held > 0 {
        return Err(BackupError::NotEmpty {
            path: store.path().to_owned(),
            records: held,
        });
    }
    let mut summary = Summary::default();
    let mut batch = Batch::new();
    // event keys end in their sequence number: new events must come after every one
    let mut next_event = 0u64;
    let mut base = 0u64;
    let mut id = String::new();
    for (tree, key, value) in records {
        *summary.records.entry(tree.name()).or_default() += 1;
        match tree {
            TreeId::Events => {
                if let Some(seq) = key
                    .len()
                    .checked_sub(8)
                    .and_then(|i| key.get(i..))
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                {
                    next_event = next_event.max(u64::from_be_bytes(seq).saturating_add(1));
                }
            }
            TreeId::Meta if key == META_EVENT_ID_BASE => {
                if let Ok(b) = <[u8; 8]>::try_from(value.as_slice()) {
                    base = u64::from_be_bytes(b);
                }
                continue;
            }
            TreeId::Meta if key == META_CONTROLLER_ID => {
                id = String::from_utf8_lossy(&value).into_owned();
            }
            _ => {}
        }
        batch.put_raw(tree, key, value);
    }
    if id.is_empty() {
        id = header.controller_id.clone();
        batch.put_raw(
            TreeId::Meta,
            META_CONTROLLER_ID.to_vec(),
            id.clone().into_bytes(),
        );
    }
    batch.put_raw(
        TreeId::Meta,
        META_EVENT_ID_BASE.to_vec(),
        base.max(next_event).to_be_bytes().to_vec(),
    );
    store.commit(batch).await?;
    store.flush().await?;
    // the id beside the database follows (it tells a database that lost its records)
    crate::store::set_id_file(store.path(), &id)?;
    Ok(summary)
}

#[cfg(test)]
mod tests;
