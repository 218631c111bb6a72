//! A mount namespace per lab host, so that each host has its own `/run/wireguard` (where
//! `wireguard-go` and `wg` keep their control sockets) as real hosts do. The namespaces are
//! kept alive by bind mounts under [`MOUNT_NS_DIR`], made private once (like `ip netns` does
//! for /run/netns); everything else in them is the machine's file system.

use std::path::{Path, PathBuf};

use crate::cmd;
use crate::error::{LabError, Result};

/// Where the lab keeps its hosts' mount namespace files.
pub const MOUNT_NS_DIR: &str = "/run/geomx-lab/mnt";

/// The mount namespace file of `host` in lab `lab`.
pub fn file(lab: &str, host: &str) -> PathBuf {
    Path::new(MOUNT_NS_DIR).join(format!("{lab}-{host}"))
}

fn is_mount_point(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let d = dir.display().to_string();
    info.lines()
        .any(|l| l.split_whitespace().nth(4).is_some_and(|p| p == d))
}

/// Creates the mount namespace of `host` with a private tmpfs on /run/wireguard.
pub fn create(lab: &str, host: &str) -> Result<PathBuf> {
    let dir = Path::new(MOUNT_NS_DIR);
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
    if !is_mount_point(dir) {
        let d = dir.display().to_string();
        cmd::sh("mount", &["--bind", &d, &d])?;
        cmd::sh("mount", &["--make-private", &d])?;
    }
    let f = file(lab, host);
    std::fs::write(&f, b"").map_err(|e| LabError::io(&f, e))?;
    let fs = f.display().to_string();
    cmd::sh(
        "unshare",
        &[&format!("--mount={fs}"), "--propagation", "private", "true"],
    )?;
    std::fs::create_dir_all("/run/wireguard").map_err(|e| LabError::io("/run/wireguard", e))?;
    cmd::sh(
        "nsenter",
        &[
            &format!("--mount={fs}"),
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "mode=0755,size=4m",
            "geomx-lab-wg",
            "/run/wireguard",
        ],
    )?;
    Ok(f)
}

/// Removes the mount namespace of `host` (nothing when there is none).
pub fn delete(lab: &str, host: &str) {
    let f = file(lab, host);
    if f.exists() {
        let _ = nix::mount::umount2(&f, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&f);
    }
}

/// Removes the mount namespaces of lab hosts whose network namespace is gone (left by a lab
/// torn down by an older geomx-lab, or by a process killed mid-teardown).
pub fn sweep_orphans() {
    let Ok(rd) = std::fs::read_dir(MOUNT_NS_DIR) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !Path::new("/run/netns").join(&name).exists() {
            let f = e.path();
            let _ = nix::mount::umount2(&f, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&f);
        }
    }
}
