//! Booted lab hosts: a Debian bookworm root file system with systemd, dbus and docker.io
//! (`scripts/build-host-rootfs.sh`, cached) booted by `systemd-nspawn -b` inside the host's
//! network namespace, so the host has its own PID 1, /etc, /run, journald and
//! docker.service, like a real host; `geomx-lab up --boot`.
//!
//! Each machine runs on an overlay of the cached root file system (its own upper directory
//! under the host's directory: what it writes survives a reboot of the machine, the cache
//! is never written to), with `/var/lib/docker` on a plain directory beside it (Docker's
//! overlay2 cannot live on an overlay). The machine and everything in it run in cgroups
//! `gxlab-<lab>-<host>` of every hierarchy, which the lab removes at teardown.
//!
//! Docker's socket is also offered at `<host dir>/machine/run/docker.sock` (a second listen
//! stream of docker.socket on a bind-mounted directory), so the lab's docker CLI helpers
//! reach a machine's Docker like a namespace host's.
//!
//! Needs (stack notes): `--register=no --keep-unit` (this machine's PID 1 is not systemd),
//! `--capability=all --system-call-filter="@keyring bpf"` and writable cgroups for Docker
//! inside, and `SYSTEMD_NSPAWN_API_VFS_WRITABLE=network` so that the machine may write
//! /proc/sys/net (Docker's ip_forward, the agent's sysctls) of its network namespace.
//! The machine's /sys/fs/cgroup is a tree of its own (`<machine dir>/cgroup`: a tmpfs with
//! each hierarchy's `gxlab-<lab>-<host>` subtree bound at the hierarchy's name), writable:
//! the machine runs in a cgroup namespace rooted at those subtrees, so its systemd and its
//! Docker take them for the root. (With the machine's whole /sys/fs/cgroup bound, every
//! machine's systemd took the real root's `/init.scope` and `/system.slice`; nspawn's own
//! cgroup mounts are read-only, and Docker cannot run containers on them.)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cmd;
use crate::error::{LabError, Result};
use crate::netns::Netns;

/// Where `scripts/build-host-rootfs.sh` keeps the root file system (or `$GEOMX_HOST_ROOTFS`).
pub const DEFAULT_HOST_ROOTFS: &str = "/var/cache/geomx/host-rootfs";

/// The cached root file system of booted hosts: `$GEOMX_HOST_ROOTFS` or
/// [`DEFAULT_HOST_ROOTFS`]; an error naming the script that builds it when it is missing.
pub fn host_rootfs() -> Result<PathBuf> {
    let dir = std::env::var_os("GEOMX_HOST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HOST_ROOTFS));
    if !dir.join("usr/lib/systemd/systemd").exists() && !dir.join("lib/systemd/systemd").exists() {
        return Err(LabError::Setup(format!(
            "no booted-host root file system at {}: run scripts/build-host-rootfs.sh",
            dir.display()
        )));
    }
    Ok(dir)
}

/// A booted lab host.
#[derive(Clone, Debug)]
pub struct Machine {
    name: String,
    dir: PathBuf,
}

impl Machine {
    /// Prepares machine `name` (`<lab>-<host>`) in `dir`: the overlay's directories, the
    /// Docker directories, the hostname, and `boot.sh`, which boots it detached in `netns`
    /// in cgroups `cgroup`.
    pub fn prepare(
        name: &str,
        hostname: &str,
        dir: &Path,
        netns: &Netns,
        cgroup: &str,
        rootfs: &Path,
    ) -> Result<Machine> {
        let m = Machine {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        };
        for d in ["upper", "work", "root", "docker", "run"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| LabError::io(&p, e))?;
        }
        // files of the machine, written into its upper directory before the first boot
        let upper = dir.join("upper");
        write(&upper.join("etc/hostname"), &format!("{hostname}\n"), 0o644)?;
        write(
            &upper.join("etc/systemd/system/docker.socket.d/geomx-lab.conf"),
            "# geomx lab: Docker's socket also where the lab's CLI finds it (bind-mounted)\n\
             [Socket]\nListenStream=/run/geomx-lab/docker.sock\n",
            0o644,
        )?;
        let d = dir.display();
        let ns = netns.path().display();
        let lower = rootfs.display();
        let boot = format!(
            r#"#!/bin/sh
# Boots lab machine {name} from {d}, detached, inside network namespace {ns}.
D={d}
if [ -f "$D/nspawn.pid" ] && kill -0 "$(cat "$D/nspawn.pid")" 2>/dev/null; then exit 0; fi
mountpoint -q "$D/root" || mount -t overlay geomx-lab -o "lowerdir={lower},upperdir=$D/upper,workdir=$D/work" "$D/root" || exit 1
rm -f "$D/run/docker.sock"
setsid sh -c '
  mkdir -p "$0/cgroup"
  mountpoint -q "$0/cgroup" || mount -t tmpfs -o mode=0755,size=1m geomx-lab-cgroup "$0/cgroup" || exit 1
  for c in /sys/fs/cgroup/*/; do
    [ -f "$c/cgroup.procs" ] || continue
    mkdir -p "$c/{cgroup}" || exit 1
    if [ -f "$c/cpuset.cpus" ]; then
      cat "$c/cpuset.cpus" > "$c/{cgroup}/cpuset.cpus"; cat "$c/cpuset.mems" > "$c/{cgroup}/cpuset.mems"
    fi
    echo $$ > "$c/{cgroup}/cgroup.procs" || exit 1
    n=$(basename "$c")
    mkdir -p "$0/cgroup/$n"
    mountpoint -q "$0/cgroup/$n" || mount --bind "${{c}}{cgroup}" "$0/cgroup/$n" || exit 1
  done
  echo $$ > "$0/nspawn.pid"
  exec env SYSTEMD_NSPAWN_API_VFS_WRITABLE=network systemd-nspawn --quiet -D "$0/root" -b -M {name} \
    --register=no --keep-unit --capability=all --system-call-filter="@keyring bpf" \
    --bind="$0/cgroup:/sys/fs/cgroup" --bind="$0/docker:/var/lib/docker" --bind="$0/run:/run/geomx-lab" \
    --network-namespace-path={ns} --console=read-only
' "$D" >>"$D/console.log" 2>&1 </dev/null &
"#
        );
        write(&dir.join("boot.sh"), &boot, 0o755)?;
        Ok(m)
    }

    /// Masks `units` in the machine (links to /dev/null in its /etc/systemd/system): they do
    /// not start at boot (Docker in the controller's machine, say).
    pub fn mask_units(&self, units: &[&str]) -> Result<()> {
        let dir = self.dir.join("upper/etc/systemd/system");
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        for u in units {
            let link = dir.join(u);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink("/dev/null", &link)
                    .map_err(|e| LabError::io(&link, e))?;
            }
        }
        Ok(())
    }

    /// The machine at `dir` (prepared earlier).
    pub fn at(name: &str, dir: &Path) -> Machine {
        Machine {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        }
    }

    /// Its name (`<lab>-<host>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its root file system as seen from outside (the overlay, mounted while booted).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Its console output (the boot messages).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The directory holding the second socket of its Docker (`docker.sock`).
    pub fn docker_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// PID of `systemd-nspawn`, while the machine runs.
    pub fn nspawn_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("nspawn.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        crate::process::alive(pid).then_some(pid)
    }

    /// PID (in this machine's namespace) of the machine's PID 1 (its systemd), while it
    /// runs.
    pub fn leader(&self) -> Option<u32> {
        let nspawn = self.nspawn_pid()?;
        let children =
            std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children.split_whitespace().find_map(|p| p.parse().ok())
    }

    /// Boots the machine and waits until its systemd says it is up (`running`, or
    /// `degraded`: then the failed units are in the error) within `timeout`.
    pub fn boot(&self, timeout: Duration) -> Result<()> {
        cmd::sh(
            &self.dir.join("boot.sh").display().to_string(),
            &[] as &[&str],
        )?;
        self.wait_up(timeout)
    }

    /// Waits until the machine's systemd has finished starting up.
    pub fn wait_up(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.leader().is_some() {
                let out = self.exec(&["systemctl", "is-system-running"])?;
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                match state.as_str() {
                    "running" => return Ok(()),
                    "degraded" => {
                        let failed = self
                            .exec(&["systemctl", "--failed", "--no-legend", "--plain"])
                            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                            .unwrap_or_default();
                        return Err(LabError::Setup(format!(
                            "machine {} booted degraded; failed units:\n{failed}",
                            self.name
                        )));
                    }
                    _ => {}
                }
            } else if start.elapsed() > Duration::from_secs(2) && self.nspawn_pid().is_none() {
                return Err(LabError::Setup(format!(
                    "machine {} did not boot:\n{}",
                    self.name,
                    tail(&self.console_log(), 20)
                )));
            }
            if start.elapsed() > timeout {
                return Err(LabError::Setup(format!(
                    "machine {} not up within {:.0}s:\n{}",
                    self.name,
                    timeout.as_secs_f64(),
                    tail(&self.console_log(), 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command running `argv` inside the machine (all its namespaces, as root).
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<Command> {
        let leader = self
            .leader()
            .ok_or_else(|| LabError::Setup(format!("machine {} is not running", self.name)))?;
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(leader.to_string())
            .arg("-a")
            .arg("--")
            .args(argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        Ok(c)
    }

    /// Runs `argv` inside the machine; its output whatever its exit status.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<Output> {
        cmd::output(&mut self.command(argv)?)
    }

    /// Runs `argv` inside the machine; its standard output, an error when it fails.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<String> {
        cmd::run(&mut self.command(argv)?)
    }

    /// Powers the machine off (`systemctl poweroff` inside: units stop as on a real host)
    /// and waits until it is gone; killed when it takes longer than `timeout`. The overlay
    /// stays mounted (files can be read and written from outside between boots).
    pub fn poweroff(&self, timeout: Duration) -> Result<()> {
        let Some(nspawn) = self.nspawn_pid() else {
            return Ok(());
        };
        if self.leader().is_some() {
            let _ = self.exec(&["systemctl", "poweroff", "--no-block"]);
        }
        let start = Instant::now();
        while crate::process::alive(nspawn) {
            if start.elapsed() > timeout {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(nspawn as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(LabError::Setup(format!(
                    "machine {} did not power off within {:.0}s: killed",
                    self.name,
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(self.dir.join("nspawn.pid"));
        Ok(())
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| LabError::io(parent, e))?;
    }
    std::fs::write(path, text).map_err(|e| LabError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| LabError::io(path, e))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
