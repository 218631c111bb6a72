//! One geomx-agent at a time per host: an exclusive lock on a file in the state directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{NetError, Result};

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// Held while a process manages the host's network; released on drop (or when the process
/// dies).
#[derive(Debug)]
pub struct HostLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl HostLock {
    /// Takes the lock in `state_dir` (created if needed) without waiting; fails with
    /// [`NetError::Locked`] naming the holder's pid when another process has it.
    pub fn acquire(state_dir: &Path) -> Result<HostLock> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| NetError::io(state_dir, e))?;
        let path = state_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| NetError::io(&path, e))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(NetError::Locked {
                    path,
                    pid: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
            Err((_, errno)) => {
                return Err(NetError::io(&path, std::io::Error::from(errno)));
            }
        };
        let pid = format!("{}\n", std::process::id());
        lock.set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| lock.write_all(pid.as_bytes()))
            .map_err(|e| NetError::io(&path, e))?;
        Ok(HostLock { _lock: lock, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = HostLock::acquire(dir.path()).expect("first");
        let e = HostLock::acquire(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("(pid {})", std::process::id())),
            "{e}"
        );
        drop(first);
        HostLock::acquire(dir.path()).expect("free again");
    }
}
