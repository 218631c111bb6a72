//! Where the geomx binaries under test are.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The directory of the binaries: `--bin-dir`, else `$GEOMX_BIN_DIR`, else the directory of
/// this program (cargo's target/release for `target/release/geomx-bench`).
pub fn bin_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(d) = flag {
        return Ok(d.to_owned());
    }
    if let Some(d) = std::env::var_os("GEOMX_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locating geomx-bench itself")?;
    let mut dir = exe
        .parent()
        .map(Path::to_path_buf)
        .context("geomx-bench has no parent directory")?;
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// `dir/name`, which must exist.
pub fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p geomx-controller -p geomx-agent -p geomxctl`) or pass --bin-dir",
            p.display()
        );
    }
    Ok(p)
}

/// Whether `dir` looks like a release build (for a warning next to the figures).
pub fn is_release(dir: &Path) -> bool {
    dir.components().any(|c| c.as_os_str() == "release")
}
