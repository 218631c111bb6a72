//! The kept inputs of a fuzz target, for the stable replay tests that include this file
//! with `#[path]` (`agent/net/tests/fuzz_regressions.rs`,
//! `controller/job/tests/fuzz_regressions.rs`; both crates sit two levels below the root).

use std::path::{Path, PathBuf};

/// The files under `tests/fuzz/regressions/<target>/`, sorted; panics when there are none.
pub fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    files
}
