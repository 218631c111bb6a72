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
    /// that generation (see [`LogArchive::writer`]).
    pub fn store(
        &self,
        job: &str,
        node: &str,
        generation: u32,
        lines: &[(bool, String)],
    ) -> Result<PathBuf> {
        let mut w = self.writer(job, node, generation)?;
        for (stderr, line) in lines {
            w.push(*stderr, line)?;
        }
        w.finish()
    }

    /// Starts keeping the output of `job`/`node` in `generation`, line by line as it is
    /// read ([`ArchiveWriter::push`]): on disk as it comes, never more than about twice
    /// [`LogArchive::per_node`] bytes on disk and one line in memory; the last
    /// [`LogArchive::per_node`] bytes (whole lines) are kept by [`ArchiveWriter::finish`],
    /// which replaces what was kept for that generation atomically (a temporary file
    /// renamed). Nothing is replaced when the writer is dropped unfinished.
    pub fn writer(&self, job: &str, node: &str, generation: u32) -> Result<ArchiveWriter> {
        let path = self
            .path(job, node, generation)
            .ok_or_else(|| RuntimeError::InvalidSpec {
                job: job.to_owned(),
                node: node.to_owned(),
                reason: "not a name a log file can carry".into(),
            })?;
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let segment = |n: u32| dir.join(format!(".{generation}.log.part{n}"));
        let segments = [segment(0), segment(1)];
        let file = create(&segments[0])?;
        Ok(ArchiveWriter {
            path,
            tmp: dir.join(format!(".{generation}.log.tmp")),
            per_node: self.per_node,
            current: (std::io::BufWriter::new(file), 0),
            previous: None,
            segments,
            at: 0,
        })
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

fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))
}

/// One node's output being kept, streamed to disk (see [`LogArchive::writer`]). The output
/// goes to a segment file until that one holds [`LogArchive::per_node`] bytes, then to the
/// other one (the older is emptied): the last `per_node` bytes are always in the two.
pub struct ArchiveWriter {
    path: PathBuf,
    tmp: PathBuf,
    per_node: u64,
    /// The segment written to, and its length.
    current: (std::io::BufWriter<std::fs::File>, u64),
    /// The length of the other segment, once there is one.
    previous: Option<u64>,
    segments: [PathBuf; 2],
    /// Which of `segments` is `current`.
    at: usize,
}

impl std::fmt::Debug for ArchiveWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ArchiveWriter {
    /// Appends one line of output (`stderr`: of the standard error).
    pub fn push(&mut self, stderr: bool, line: &str) -> Result<()> {
        use std::io::Write;
        let len = line.len() as u64 + 3;
        if self.current.1 > 0 && self.current.1 + len > self.per_node {
            self.rotate()?;
        }
        let what = || format!("writing {}", self.segments[self.at].display());
        let w = &mut self.current.0;
        w.write_all(if stderr { b"2 " } else { b"1 " })
            .and_then(|()| w.write_all(line.as_bytes()))
            .and_then(|()| w.write_all(b"\n"))
            .map_err(|e| io(what())(e))?;
        self.current.1 += len;
        Ok(())
    }

    /// Continues in the other segment, emptied.
    fn rotate(&mut self) -> Result<()> {
        use std::io::Write;
        let at = self.segments[self.at].display().to_string();
        self.current
            .0
            .flush()
            .map_err(io(format!("writing {at}")))?;
        self.at = 1 - self.at;
        let file = create(&self.segments[self.at])?;
        let (_, len) = std::mem::replace(&mut self.current, (std::io::BufWriter::new(file), 0));
        self.previous = Some(len);
        Ok(())
    }

    /// Keeps the last [`LogArchive::per_node`] bytes written (whole lines) as the
    /// generation's file; returns its path.
    pub fn finish(mut self) -> Result<PathBuf> {
        use std::io::{BufRead, Write};
        let at = self.segments[self.at].display().to_string();
        self.current
            .0
            .flush()
            .map_err(io(format!("writing {at}")))?;
        let mut order = Vec::new();
        if self.previous.is_some() {
            order.push(&self.segments[1 - self.at]);
        }
        order.push(&self.segments[self.at]);
        let total = self.previous.unwrap_or(0) + self.current.1;
        let mut excess = total.saturating_sub(self.per_node);
        let mut out = std::io::BufWriter::new(create(&self.tmp)?);
        let tmp = self.tmp.display().to_string();
        for seg in order {
            let file =
                std::fs::File::open(seg).map_err(io(format!("reading {}", seg.display())))?;
            let mut r = std::io::BufReader::new(file);
            let mut skipped = Vec::new();
            while excess > 0 {
                skipped.clear();
                let n = r
                    .read_until(b'\n', &mut skipped)
                    .map_err(io(format!("reading {}", seg.display())))?;
                if n == 0 {
                    break;
                }
                excess = excess.saturating_sub(n as u64);
            }
            std::io::copy(&mut r, &mut out).map_err(io(format!("writing {tmp}")))?;
        }
        out.flush().map_err(io(format!("writing {tmp}")))?;
        drop(out);
        std::fs::rename(&self.tmp, &self.path)
            .map_err(io(format!("renaming to {}", self.path.display())))?;
        self.remove_segments();
        Ok(self.path.clone())
    }

    fn remove_segments(&self) {
        for s in &self.segments {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        // (after finish: gone already; unfinished: nothing is kept)
        self.remove_segments();
        let _ = std::fs::remove_file(&self.tmp);
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

    fn bytes_under(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    #[test]
    fn a_streamed_output_keeps_its_last_bytes_within_the_bound_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = LogArchive::new(dir.path());
        a.per_node = 1000;
        let mut w = a.writer("j", "w", 3).expect("writer");
        let node_dir = dir.path().join("j").join("w");
        for i in 0..10_000 {
            w.push(i % 7 == 0, &format!("line {i:05}")).expect("pushed");
            if i % 500 == 0 {
                let sz = bytes_under(&node_dir);
                assert!(
                    sz <= 2 * a.per_node + 64,
                    "{sz} bytes on disk while writing"
                );
            }
        }
        let path = w.finish().expect("kept");
        assert_eq!(path, node_dir.join("3.log"));
        let len = std::fs::metadata(&path).expect("the file").len();
        assert!(len <= a.per_node && len > a.per_node - 20, "{len}");
        let kept = a.read("j", "w", Some(3), 0).expect("archived");
        let flat: Vec<(bool, String)> = kept
            .iter()
            .flat_map(|c| c.lines.iter().map(move |l| (c.stderr, l.clone())))
            .collect();
        let want: Vec<(bool, String)> = (10_000 - flat.len()..10_000)
            .map(|i| (i % 7 == 0, format!("line {i:05}")))
            .collect();
        assert_eq!(flat, want, "the last lines, whole, in order");
        assert_eq!(
            std::fs::read_dir(&node_dir).expect("dir").count(),
            1,
            "no segment is left behind"
        );
        // a line longer than the bound is not kept, nor anything before it
        let mut w = a.writer("j", "w", 4).expect("writer");
        w.push(false, "before").expect("pushed");
        w.push(false, &"x".repeat(2000)).expect("pushed");
        w.finish().expect("kept");
        assert_eq!(a.read("j", "w", Some(4), 0), Some(Vec::new()));
        // an unfinished writer keeps nothing and leaves nothing
        let mut w = a.writer("j", "w", 5).expect("writer");
        w.push(false, "half").expect("pushed");
        drop(w);
        assert_eq!(a.generations("j", "w"), [3, 4]);
        assert_eq!(std::fs::read_dir(&node_dir).expect("dir").count(), 2);
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
