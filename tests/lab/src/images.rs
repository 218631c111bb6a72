//! The test image: geomx-psnode (a stand-in for a ps-lite node) on busybox, built from this
//! machine's files with `docker import` (there is no registry).
//!
//! Tag convention: [`PSNODE_IMAGE`] (`geomx-test/psnode:latest`). Job files written for the
//! real GeoMX image can run unchanged against it when the same image is also tagged with
//! the GeoMX name (e.g. `docker tag geomx-test/psnode:latest lizonghango00o1/geomx:cpu-only`,
//! or build twice with both tags).
//!
//! Inside the image:
//!
//! - `/usr/bin/geomx-psnode`, also the default command;
//! - `/usr/bin/python` and `/usr/bin/python3`: symlinks to it, so that GeoMX's commands
//!   (`python -c "import mxnet"`, `python /root/GeoMX/examples/cnn.py --data-slice-idx 0
//!   --cpu`) run unchanged (psnode ignores the script and reads `--data-slice-idx`);
//! - `/root/GeoMX/examples/*.py` placeholders and busybox (sh, ip, ping, nc, ...).

use std::path::{Path, PathBuf};

use crate::dockerd::Dockerd;
use crate::error::{LabError, Result};
use crate::rootfs::Rootfs;

/// The tag of the test image.
pub const PSNODE_IMAGE: &str = "geomx-test/psnode:latest";

/// Environment variable naming the geomx-psnode binary explicitly.
pub const PSNODE_BIN_ENV: &str = "GEOMX_PSNODE_BIN";

/// GeoMX example scripts that get a placeholder in the image.
const EXAMPLES: [&str; 7] = [
    "cnn.py",
    "cnn_bsc.py",
    "cnn_mpq.py",
    "cnn_fp16.py",
    "cnn_hfa.py",
    "cnn_dgt.py",
    "cnn_tsengine.py",
];

/// Builds the test image from `psnode_binary` into `dockerd` as `tag`, assembling its root
/// file system in `work_dir` (emptied first; left in place for inspection).
pub fn build_psnode_image(
    dockerd: &Dockerd,
    psnode_binary: &Path,
    tag: &str,
    work_dir: &Path,
) -> Result<()> {
    if !psnode_binary.is_file() {
        return Err(LabError::Setup(format!(
            "{} not found: build it first (`cargo build --workspace --bins`)",
            psnode_binary.display()
        )));
    }
    let rootfs = Rootfs::new(work_dir)?.with_busybox()?;
    rootfs.add_binary(psnode_binary, "usr/bin/geomx-psnode")?;
    for link in ["usr/bin/python", "usr/bin/python3"] {
        let p = rootfs.dir().join(link);
        std::os::unix::fs::symlink("geomx-psnode", &p).map_err(|e| LabError::Io {
            path: p.clone(),
            source: e,
        })?;
    }
    for script in EXAMPLES {
        rootfs.add_file(
            &format!("root/GeoMX/examples/{script}"),
            b"# placeholder of geomx's test image: /usr/bin/python is geomx-psnode\n",
            0o644,
        )?;
    }
    rootfs.add_file("root/data/mnist/README", b"placeholder\n", 0o644)?;
    rootfs.import(dockerd, tag, &["/usr/bin/geomx-psnode"])
}

/// Finds the geomx-psnode binary: `$GEOMX_PSNODE_BIN`, else next to the running executable
/// or one directory up (a test binary lives in `target/<profile>/deps/`, the binaries in
/// `target/<profile>/`).
pub fn find_psnode_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(PSNODE_BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(LabError::Setup(format!(
                "{PSNODE_BIN_ENV}={} is not a file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(|e| LabError::io("current executable", e))?;
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("geomx-psnode");
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    Err(LabError::Setup(format!(
        "geomx-psnode not found (looked at {}); run `cargo build --workspace --bins` first or set {PSNODE_BIN_ENV}",
        tried.join(", ")
    )))
}
