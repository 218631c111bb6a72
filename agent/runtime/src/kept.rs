//! JSON files the agent keeps in its state directory across restarts, read back tolerantly:
//! a file that does not parse (a crash mid-write on a file system without ordered writes, a
//! hand edit) is moved aside as `<name>.corrupt` for a human to look at, and the agent goes on
//! as if it were missing, instead of refusing to start.

use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use tracing::warn;

/// Reads the kept JSON file at `path`. `Ok(None)` when there is no file, or when it does not
/// parse: then it has been renamed to [`aside`]`(path)` with a warning that names `what` the
/// file holds and `consequence`, what going on without it means. Errors are reading the file
/// (other than its absence) or moving a corrupt one aside.
pub(crate) fn read_json<T: DeserializeOwned>(
    path: &Path,
    what: &str,
    consequence: &str,
) -> io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<T>(&bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let moved_to = aside(path);
            warn!(file = %path.display(), error = %e, moved_to = %moved_to.display(),
                "the kept {what} does not parse: moved aside; {consequence}");
            std::fs::rename(path, &moved_to)?;
            Ok(None)
        }
    }
}

/// Where a corrupt kept file goes: its name with `.corrupt` appended, beside it.
pub(crate) fn aside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".corrupt");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Doc {
        n: u32,
    }

    #[test]
    fn missing_parsed_and_corrupt_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("doc.json");
        let read = || read_json::<Doc>(&path, "doc", "starting afresh");

        assert_eq!(read().expect("missing"), None);

        std::fs::write(&path, br#"{"n": 3}"#).expect("write");
        assert_eq!(read().expect("parsed"), Some(Doc { n: 3 }));

        std::fs::write(&path, b"{\"n\": 3").expect("write");
        assert_eq!(read().expect("corrupt"), None);
        assert!(!path.exists(), "the corrupt file is moved away");
        assert_eq!(
            std::fs::read(dir.path().join("doc.json.corrupt")).expect("moved aside"),
            b"{\"n\": 3"
        );
    }

    #[test]
    fn a_file_that_cannot_be_read_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        // a directory where the file should be: reading it fails with something other
        // than NotFound, and nothing is moved
        let path = dir.path().join("doc.json");
        std::fs::create_dir(&path).expect("mkdir");
        assert!(read_json::<Doc>(&path, "doc", "starting afresh").is_err());
        assert!(path.is_dir());
    }
}
