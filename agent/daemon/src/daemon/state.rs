//! The last desired state the controller sent, kept in the state directory
//! (`desired-state.pb`, the protobuf encoding of `geomx.v1.DesiredState`) so that an agent
//! starting while the controller is unreachable keeps the host as it was (static
//! stability).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use geomx_proto::v1::DesiredState;
use prost::Message;

/// Name of the file inside the state directory.
pub const DESIRED_STATE_FILE: &str = "desired-state.pb";

/// Errors reading or writing the persisted desired state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a desired state.
    #[error("{}: not a desired state ({source}); it is ignored and replaced by the controller's next one", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// What prost said.
        #[source]
        source: prost::DecodeError,
    },
}

/// The persisted desired state of this host.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The file in `state_dir`.
    pub fn new(state_dir: &Path) -> StateFile {
        StateFile {
            path: state_dir.join(DESIRED_STATE_FILE),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted state; `None` when there is none.
    pub fn load(&self) -> Result<Option<DesiredState>, StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        DesiredState::decode(bytes.as_slice())
            .map(Some)
            .map_err(|source| StateError::Decode {
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the persisted state atomically (temporary file, fsync, rename, fsync of the
    /// directory; mode 0600).
    pub fn save(&self, state: &DesiredState) -> Result<(), StateError> {
        write_atomic(&self.path, &state.encode_to_vec()).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Removes it (no error when there is none).
    pub fn remove(&self) -> Result<(), StateError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
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
    use geomx_proto::v1::Peer;

    use super::*;

    #[test]
    fn a_state_survives_a_round_trip_and_garbage_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile::new(dir.path());
        assert!(f.load().expect("no file").is_none());
        let s = DesiredState {
            revision: 12,
            host: "a".into(),
            subnet: "172.17.1.0/24".into(),
            cluster_cidr: "172.17.0.0/16".into(),
            peers: vec![Peer {
                name: "b".into(),
                underlay_ip: "10.1.1.29".into(),
                subnet: "172.17.2.0/24".into(),
                ..Default::default()
            }],
            heartbeat_interval_ms: 1000,
            controller_id: "c1".into(),
            ..Default::default()
        };
        f.save(&s).expect("save");
        assert_eq!(f.load().expect("load"), Some(s.clone()));
        let mut s2 = s.clone();
        s2.revision = 13;
        f.save(&s2).expect("save again");
        assert_eq!(f.load().expect("load").map(|s| s.revision), Some(13));
        // no temporary file left behind
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![DESIRED_STATE_FILE.to_string()]);
        fs::write(f.path(), b"\xff\xff\xff not protobuf").expect("write");
        let e = f.load().unwrap_err();
        assert!(e.to_string().contains("not a desired state"), "{e}");
        f.remove().expect("remove");
        f.remove().expect("remove twice");
        assert!(f.load().expect("gone").is_none());
    }
}
