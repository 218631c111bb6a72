//! Logs that outlive their containers: when a role container is removed, its output is kept
//! on disk, one file per node and generation, so `geomxctl logs` works for ended jobs and
//! earlier attempts of restarted ones.
//!
//! Layout under the archive's directory: `<job>/<node>/<generation>.log`, one line of output
//! per line, prefixed `1 ` (standard output) or `2 ` (standard error). Bounded per node (the
//! last [`LogArchive::per_node`] bytes of each generation are kept), per host (the oldest
//! files go first once [`LogArchive::total`] is passed) and in time (files older than
//! [`LogArchive::retention`] are pruned).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Result, RuntimeError};
use crate::status::LogChunk;

/// Default bound of one node's archived output per generation: the last 16 MiB.
pub const DEFAULT_PER_NODE_BYTES: u64 = 16 << 20;
/// Default bound of a host's archived output: 1 GiB.
pub const DEFAULT_TOTAL_BYTES: u64 = 1 << 30;
/// Default retention of archived output: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where and how much output is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogArchive {
    /// The directory (created when needed).
    pub dir: PathBuf,
    /// Bytes kept per node and generation (the last ones).
    pub per_node: u64,
    /// Bytes kept on the host, all archives together.
    pub total: u64,
    /// Archives older than this are removed.
    pub retention: Duration,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Io { what, source }
}

/// A job or node name that is safe as a path component (the runtime validates names; this
/// is the second line of defence).
fn safe(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LogArchive {
    /// An archive in `dir` with the default bounds.
    pub fn new(dir: impl Into<PathBuf>) -> LogArchive {
        LogArchive {
            dir: dir.into(),
            per_node: DEFAULT_PER_NODE_BYTES,
            total: DEFAULT_TOTAL_BYTES,
            retention: DEFAULT_RETENTION,
        }
    }

    fn node_dir(&self, job: &str, node: &str) -> Option<PathBuf> {
        (safe(job) && safe(node)).then(|| self.dir.join(job).join(node))
    }

    /// The file of one node's generation.
    pub fn path(&self, job: &str, node: &str, generation: u32) -> Option<PathBuf> {
        self.node_dir(job, node)
            .map(|d| d.join(format!("{generation}.log")))
    }

    /// Keeps `lines` ((stderr, line), in order) as the output of `job`/`node` in
    /// `generation`: the last [`LogArchive::per_node`] bytes, replacing what was kept for
    /// that generation. Written atomically (a temporary file renamed).
    pub fn store(
        &self,
        job: &str,
        node: &str,
        generation: u32,
        lines: &[(bool, String)],
    ) -> Result<PathBuf> {
        let path = self
            .path(job, node, generation)
            .ok_or_else(|| RuntimeError::InvalidSpec {
                job: job.to_owned(),
                node: node.to_owned(),
                reason: "not a name a log file can carry".into(),
            })?;
        let mut kept = Vec::new();
        let mut size = 0u64;
        for (stderr, line) in lines.iter().rev() {
            let len = line.len() as u64 + 3;
            if size + len > self.per_node {
                break;
            }
            size += len;
            kept.push((*stderr, line.as_str()));
        }
        let mut text = String::with_capacity(usize::try_from(size).unwrap_or(0));
        for (stderr, line) in kept.into_iter().rev() {
            text.push_str(if stderr { "2 " } else { "1 " });
            text.push_str(line);
            text.push('\n');
        }
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let tmp = dir.join(format!(".{generation}.log.tmp"));
        std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io(format!("renaming to {}", path.display())))?;
        Ok(path)
    }

    /// The generations archived for `job`/`node`, oldest first.
    pub fn generations(&self, job: &str, node: &str) -> Vec<u32> {
        let Some(dir) = self.node_dir(job, node) else {
            return Vec::new();
        };
        let mut v: Vec<u32> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        v.sort_unstable();
        v
    }

    /// The archived output of `job`/`node` in `generation` (the latest archived one when
    /// `None`), the last `tail` lines (all for 0), as chunks of consecutive lines of one
    /// stream; `None` when nothing is archived.
    pub fn read(
        &self,
        job: &str,
        node: &str,
        generation: Option<u32>,
        tail: u32,
    ) -> Option<Vec<LogChunk>> {
        let generation = match generation {
            Some(g) => g,
            None => *self.generations(job, node).last()?,
        };
        let text = std::fs::read_to_string(self.path(job, node, generation)?).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let skip = if tail == 0 {
            0
        } else {
            lines.len().saturating_sub(tail as usize)
        };
        let mut chunks: Vec<LogChunk> = Vec::new();
        for l in &lines[skip..] {
            let (stderr, line) = match l.split_at_checked(2) {
                Some(("2 ", rest)) => (true, rest),
                Some(("1 ", rest)) => (false, rest),
                _ => (false, *l),
            };
            match chunks.last_mut() {
                Some(c) if c.stderr == stderr => c.lines.push(line.to_owned()),
                _ => chunks.push(LogChunk {
                    lines: vec![line.to_owned()],
                    stderr,
                }),
            }
        }
        Some(chunks)
    }

    /// Removes every archive of `job`. Returns whether there was any.
    pub fn forget(&self, job: &str) -> Result<bool> {
        if !safe(job) {
            return Ok(false);
        }
        let dir = self.dir.join(job);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(format!("removing {}", dir.display()))(e)),
        }
    }

    /// Removes archives older than the retention as of `now`, then the oldest ones while
    /// the host's archives together pass [`LogArchive::total`]. Returns the files removed.
    pub fn prune(&self, now: SystemTime) -> Vec<PathBuf> {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        for job in read_dirs(&self.dir) {
            for node in read_dirs(&job) {
                for f in std::fs::read_dir(&node).into_iter().flatten().flatten() {
                    let p = f.path();
                    if p.extension().is_some_and(|e| e == "log")
                        && let Ok(m) = f.metadata()
                    {
                        files.push((m.modified().unwrap_or(now), m.len(), p));
                    }
                }
            }
        }
        files.sort();
        let mut removed = Vec::new();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        for (modified, len, path) in files {
            let old = now.duration_since(modified).unwrap_or_default() > self.retention;
            if (old || total > self.total) && std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                if let Some(parent) = path.parent() {
                    // empty node and job directories go too (fails harmlessly otherwise)
                    let _ = std::fs::remove_dir(parent);
                    if let Some(job) = parent.parent() {
                        let _ = std::fs::remove_dir(job);
                    }
                }
                removed.push(path);
            }
        }
        removed
    }
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[(bool, &str)]) -> Vec<(bool, String)> {
        v.iter().map(|(e, l)| (*e, (*l).to_owned())).collect()
    }

    #[test]
    fn stores_and_reads_back_streams_generations_and_tails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = LogArchive::new(dir.path());
        a.store(
            "j",
            "w",
            0,
            &lines(&[(false, "a"), (true, "oops"), (false, "b")]),
        )
        .expect("stored");
        a.store("j", "w", 1, &lines(&[(false, "second run")]))
            .expect("stored");
        assert_eq!(a.generations("j", "w"), [0, 1]);
        let latest = a.read("j", "w", None, 0).expect("archived");
        assert_eq!(latest.len(), 1);
        assert_eq!(latest[0].lines, ["second run"]);
        let first = a.read("j", "w", Some(0), 0).expect("archived");
        let flat: Vec<(bool, &str)> = first
            .iter()
            .flat_map(|c| c.lines.iter().map(move |l| (c.stderr, l.as_str())))
            .collect();
        assert_eq!(flat, [(false, "a"), (true, "oops"), (false, "b")]);
        let tail = a.read("j", "w", Some(0), 1).expect("archived");
        assert_eq!(tail[0].lines, ["b"]);
        assert!(a.read("j", "w", Some(7), 0).is_none());
        assert!(a.read("j", "other", None, 0).is_none());
        assert!(a.forget("j").expect("forgot"));
        assert!(a.read("j", "w", None, 0).is_none());
        assert!(!a.forget("j").expect("nothing left"));
    }

    #[test]
    fn bounded_per_node_per_host_and_in_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = LogArchive::new(dir.path());
        a.per_node = 30;
        let many: Vec<(bool, String)> = (0..100).map(|i| (false, format!("line {i:03}"))).collect();
        a.store("j", "w", 0, &many).expect("stored");
        let kept = a.read("j", "w", None, 0).expect("archived");
        assert_eq!(
            kept[0].lines,
            ["line 098", "line 099"],
            "the last bytes are kept"
        );

        a.total = 25;
        a.store("j", "x", 0, &many).expect("stored");
        let removed = a.prune(SystemTime::now());
        assert_eq!(
            removed.len(),
            1,
            "the oldest goes once the host's bound is passed"
        );
        a.total = DEFAULT_TOTAL_BYTES;
        let later = SystemTime::now() + DEFAULT_RETENTION + Duration::from_secs(60);
        assert_eq!(
            a.prune(later).len(),
            1,
            "the rest once it is older than the retention"
        );
        assert!(a.generations("j", "x").is_empty() && a.generations("j", "w").is_empty());
    }

    #[test]
    fn names_that_are_not_path_components_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = LogArchive::new(dir.path());
        assert!(a.path("..", "w", 0).is_none());
        assert!(a.path("j", "a/b", 0).is_none());
        assert!(a.store("j", "..", 0, &[]).is_err());
        assert!(!a.forget("../x").expect("refused quietly"));
    }
}
