//! daemon.json and the state file on disk, written atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{NetError, Result};
use crate::kernel::{DaemonConfig, StateStore};

/// Reads a file; `None` when it does not exist.
fn read(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NetError::io(path, e)),
    }
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::io(path, e)),
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = parent(path);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NetError::io(&dir, e))
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Replaces `path` with `text`: a temporary file next to it, fsync, rename, fsync of the
/// directory. Keeps the old file's permissions (0644 for a new one).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    replace_file(path, text.as_bytes(), mode)
}

/// Writes a secret (a private key) atomically with mode 0600, its directory made 0700 when it
/// has to be created.
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = parent(path);
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| NetError::io(&dir, e))?;
    }
    replace_file(path, format!("{text}\n").as_bytes(), 0o600)
}

/// A temporary file of mode `mode` (from its creation on) next to `path`, fsync, rename,
/// fsync of the directory.
fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.geomx-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(NetError::io(path, e));
    }
    sync_dir(path)
}

/// Docker's daemon.json at a path.
#[derive(Clone, Debug)]
pub struct DaemonJsonFile {
    path: PathBuf,
}

impl DaemonJsonFile {
    /// daemon.json at `path`.
    pub fn new(path: impl Into<PathBuf>) -> DaemonJsonFile {
        DaemonJsonFile { path: path.into() }
    }
}

impl DaemonConfig for DaemonJsonFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Option<String>> {
        read(&self.path)
    }

    fn write(&self, text: &str) -> Result<()> {
        write_atomic(&self.path, text)
    }

    fn remove(&self) -> Result<()> {
        remove(&self.path)
    }
}

/// The state file in the agent's state directory (created on first write, mode 0700).
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> StateFile {
        StateFile { path: path.into() }
    }
}

impl StateStore for StateFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Option<String>> {
        read(&self.path)
    }

    fn write(&self, text: &str) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = parent(&self.path);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| NetError::io(&dir, e))?;
        write_atomic(&self.path, text)
    }

    fn remove(&self) -> Result<()> {
        remove(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_keep_mode_and_leave_no_temp_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let f = DaemonJsonFile::new(dir.path().join("daemon.json"));
        assert_eq!(f.read().expect("read"), None);
        f.write("{}\n").expect("write");
        fs::set_permissions(f.path(), fs::Permissions::from_mode(0o600)).expect("chmod");
        f.write("{\"bip\":\"x\"}\n").expect("rewrite");
        assert_eq!(
            f.read().expect("read").as_deref(),
            Some("{\"bip\":\"x\"}\n")
        );
        let mode = fs::metadata(f.path()).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["daemon.json"]);
        f.remove().expect("remove");
        f.remove().expect("remove twice");

        let s = StateFile::new(dir.path().join("state/sub/s.json"));
        s.write("1").expect("state write creates the directory");
        assert_eq!(s.read().expect("read").as_deref(), Some("1"));
    }
}
