//! Tiny container images built from files of this machine, for a lab without a registry.
//!
//! An image is a directory (busybox for a userland, plus any dynamically linked binary
//! with the shared libraries `ldd` names) turned into an image by `docker import`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cmd;
use crate::dockerd::Dockerd;
use crate::error::{LabError, Result};

/// A root file system being assembled in a directory.
#[derive(Debug)]
pub struct Rootfs {
    dir: PathBuf,
}

impl Rootfs {
    /// Starts an empty root file system in `dir` (emptied first) with the usual directories.
    pub fn new(dir: &Path) -> Result<Rootfs> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        }
        for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root", "usr/bin"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| LabError::io(&p, e))?;
        }
        let r = Rootfs {
            dir: dir.to_path_buf(),
        };
        r.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
        r.add_file("etc/group", b"root:x:0:\n", 0o644)?;
        Ok(r)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds a static busybox (`/bin/busybox` of this machine) and a link for every applet.
    pub fn with_busybox(self) -> Result<Rootfs> {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or_else(|| LabError::Setup("busybox not found: apt-get install busybox".into()))?;
        let dest = self.dir.join("bin/busybox");
        std::fs::copy(busybox, &dest).map_err(|e| LabError::io(&dest, e))?;
        let list = cmd::sh(busybox.to_str().unwrap_or("busybox"), &["--list"])?;
        for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
            if applet == "busybox" || applet.contains('/') {
                continue;
            }
            let link = self.dir.join("bin").join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link).map_err(|e| LabError::io(&link, e))?;
            }
        }
        Ok(self)
    }

    /// Copies the executable `src` to `dest` (a path inside the image, e.g. "usr/bin/x")
    /// together with every shared library it needs, at the same paths as on this machine.
    pub fn add_binary(&self, src: &Path, dest: &str) -> Result<()> {
        let target = self.dir.join(dest.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| LabError::io(parent, e))?;
        }
        std::fs::copy(src, &target).map_err(|e| LabError::io(src, e))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| LabError::io(&target, e))?;
        for lib in shared_libraries(src)? {
            let inside = self.dir.join(lib.strip_prefix("/").unwrap_or(&lib));
            if inside.exists() {
                continue;
            }
            if let Some(parent) = inside.parent() {
                std::fs::create_dir_all(parent).map_err(|e| LabError::io(parent, e))?;
            }
            // copy follows symlinks: the image gets the library's contents under the name asked for
            std::fs::copy(&lib, &inside).map_err(|e| LabError::io(&lib, e))?;
        }
        Ok(())
    }

    /// Writes a file inside the image.
    pub fn add_file(&self, dest: &str, contents: &[u8], mode: u32) -> Result<()> {
        let target = self.dir.join(dest.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| LabError::io(parent, e))?;
        }
        std::fs::write(&target, contents).map_err(|e| LabError::io(&target, e))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .map_err(|e| LabError::io(&target, e))
    }

    /// Imports the directory as image `tag` into `dockerd` (`tar | docker import`), with
    /// PATH set and `cmd` as default command.
    pub fn import(&self, dockerd: &Dockerd, tag: &str, cmd: &[&str]) -> Result<()> {
        let cmd_json = serde_json::to_string(cmd).unwrap_or_else(|_| "[]".into());
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&self.dir)
            .args(["--numeric-owner", "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: "tar".into(),
                source,
            })?;
        let tar_out = tar
            .stdout
            .take()
            .ok_or_else(|| LabError::Setup("tar has no stdout".into()))?;
        let mut import = dockerd.cli();
        import
            .arg("import")
            .arg("--change")
            .arg("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("--change")
            .arg(format!("CMD {cmd_json}"))
            .arg("-")
            .arg(tag)
            .stdin(tar_out);
        let result = cmd::run(&mut import);
        // the Command still holds the pipe's read end: drop it, or a tar that could not write
        // everything (docker import failed early) would wait forever
        drop(import);
        if result.is_err() {
            let _ = tar.kill();
        }
        let _ = tar.wait();
        result.map(drop)
    }
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`; empty for a
/// static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::output(Command::new("ldd").arg(binary))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_ldd(&text))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed_into_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }
}

#[cfg(test)]
mod build_tests {
    use super::*;

    #[test]
    fn busybox_rootfs_has_applet_links() {
        let dir = std::env::temp_dir().join(format!("geomx-rootfs-test-{}", std::process::id()));
        let r = Rootfs::new(&dir)
            .and_then(Rootfs::with_busybox)
            .expect("rootfs");
        for applet in ["sh", "echo", "ping", "sleep", "nc"] {
            let p = r.dir().join("bin").join(applet);
            assert!(p.symlink_metadata().is_ok(), "{} missing", p.display());
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
