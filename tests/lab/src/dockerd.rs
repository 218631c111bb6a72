//! One dockerd per lab host, running inside the host's network namespace.
//!
//! The daemon is started and stopped by small shell scripts written next to its data
//! (`start.sh`, `stop.sh`, `restart.sh`), so that the harness, a person at a shell and the
//! agent's configurable Docker restart command all do exactly the same thing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd;
use crate::error::{LabError, Result};
use crate::netns::Netns;

/// A lab host's dockerd: its files, scripts and CLI.
#[derive(Clone, Debug)]
pub struct Dockerd {
    dir: PathBuf,
}

impl Dockerd {
    /// Prepares the files of a dockerd in `dir` for the namespace `netns`: an empty
    /// daemon.json (unless one exists) and the start/stop/restart scripts.
    /// `cgroup_parent` keeps the containers of this daemon apart from every other one.
    /// With `own_etc` the daemon runs in a mount namespace of its own where `/etc/docker` is
    /// [`Dockerd::etc_dir`] (for `certs.d`: the registries it trusts), else in the machine's.
    pub fn prepare(
        dir: &Path,
        netns: &Netns,
        cgroup_parent: &str,
        own_etc: bool,
    ) -> Result<Dockerd> {
        std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        let d = Dockerd {
            dir: dir.to_path_buf(),
        };
        if !d.daemon_json().exists() {
            write(&d.daemon_json(), "{}\n", 0o644)?;
        }
        let launch = if own_etc {
            let etc = d.etc_dir();
            std::fs::create_dir_all(etc.join("certs.d")).map_err(|e| LabError::io(&etc, e))?;
            let mount_point = Path::new("/etc/docker");
            std::fs::create_dir_all(mount_point).map_err(|e| LabError::io(mount_point, e))?;
            // its own mount namespace (slave: the machine's later mounts still reach it)
            "unshare --mount --propagation slave -- sh -c 'mount --bind \"$0/etc\" /etc/docker && exec \"$@\"' \"$D\" "
        } else {
            ""
        };
        let dir_s = dir.display();
        let ns = netns.path().display();
        let start = format!(
            r#"#!/bin/sh
# Starts the lab dockerd in {dir_s} inside network namespace {ns}, detached.
D={dir_s}
if [ -f "$D/dockerd.pid" ] && kill -0 "$(cat "$D/dockerd.pid")" 2>/dev/null; then exit 0; fi
rm -f "$D/docker.sock"
setsid nsenter --net={ns} -- {launch}dockerd --data-root "$D/data" --exec-root "$D/exec" \
  --pidfile "$D/dockerd.pid" -H "unix://$D/docker.sock" --config-file "$D/daemon.json" \
  --cgroup-parent {cgroup_parent} --shutdown-timeout 2 >>"$D/dockerd.log" 2>&1 </dev/null &
i=0
while [ $i -lt 600 ]; do
  if docker -H "unix://$D/docker.sock" version >/dev/null 2>&1; then exit 0; fi
  sleep 0.1; i=$((i+1))
done
echo "dockerd in $D did not come up within 60s; last lines of $D/dockerd.log:" >&2
tail -n 20 "$D/dockerd.log" >&2
exit 1
"#
        );
        let stop = format!(
            r#"#!/bin/sh
# Stops the lab dockerd in {dir_s} (TERM, then KILL after 20s).
D={dir_s}
[ -f "$D/dockerd.pid" ] || exit 0
pid=$(cat "$D/dockerd.pid")
kill -TERM "$pid" 2>/dev/null || {{ rm -f "$D/dockerd.pid"; exit 0; }}
i=0
while kill -0 "$pid" 2>/dev/null; do
  i=$((i+1)); [ $i -eq 200 ] && kill -KILL "$pid" 2>/dev/null
  sleep 0.1
done
rm -f "$D/dockerd.pid"
"#
        );
        let restart = format!(
            "#!/bin/sh\n# Restarts the lab dockerd in {dir_s}.\nset -e\n\"{dir_s}/stop.sh\"\nexec \"{dir_s}/start.sh\"\n"
        );
        write(&dir.join("start.sh"), &start, 0o755)?;
        write(&dir.join("stop.sh"), &stop, 0o755)?;
        write(&dir.join("restart.sh"), &restart, 0o755)?;
        Ok(d)
    }

    /// Opens the dockerd files of an existing lab host.
    pub fn at(dir: &Path) -> Dockerd {
        Dockerd {
            dir: dir.to_path_buf(),
        }
    }

    /// The directory holding data, sockets, scripts and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon's `/etc/docker` when it has its own ([`Dockerd::prepare`] with `own_etc`):
    /// `certs.d/<registry>/ca.crt` in it.
    pub fn etc_dir(&self) -> PathBuf {
        self.dir.join("etc")
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix://...` address of the API, for `DOCKER_HOST` or `docker -H`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The daemon's configuration file (the agent manages `bip` and `ip-masq` in it).
    pub fn daemon_json(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }

    /// The daemon's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// The script that restarts this daemon (what the agent's restart command should run).
    pub fn restart_script(&self) -> PathBuf {
        self.dir.join("restart.sh")
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        let s = std::fs::read_to_string(self.dir.join("dockerd.pid")).ok()?;
        let pid: u32 = s.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Starts the daemon and waits for its API.
    pub fn start(&self) -> Result<()> {
        cmd::run(&mut Command::new(self.dir.join("start.sh"))).map(drop)
    }

    /// Stops the daemon (its containers stop with it).
    pub fn stop(&self) -> Result<()> {
        cmd::run(&mut Command::new(self.dir.join("stop.sh"))).map(drop)
    }

    /// Restarts the daemon and waits for its API.
    pub fn restart(&self) -> Result<()> {
        cmd::run(&mut Command::new(self.restart_script())).map(drop)
    }

    /// Waits until the API answers.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if cmd::output(self.cli().arg("version"))?.status.success() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(LabError::Timeout {
                    what: format!("dockerd at {}", self.url()),
                    seconds: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `docker -H <this daemon>` command.
    pub fn cli(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(self.url());
        c
    }

    /// Runs `docker <args>` against this daemon and returns its standard output, trimmed.
    pub fn docker<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String> {
        cmd::run(self.cli().args(args)).map(|s| s.trim().to_string())
    }

    /// Ids of every container, running or not.
    pub fn containers(&self) -> Result<Vec<String>> {
        Ok(self
            .docker(&["ps", "-aq", "--no-trunc"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Removes every container (forcefully).
    pub fn remove_all_containers(&self) -> Result<()> {
        let ids = self.containers()?;
        if !ids.is_empty() {
            let mut args = vec!["rm".to_string(), "-f".to_string()];
            args.extend(ids);
            self.docker(&args)?;
        }
        Ok(())
    }

    /// The main process id of a running container.
    pub fn container_pid(&self, container: &str) -> Result<u32> {
        let s = self.docker(&["inspect", "-f", "{{.State.Pid}}", container])?;
        s.parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| LabError::Setup(format!("container {container} is not running")))
    }

    /// The network namespace of a running container.
    pub fn container_netns(&self, container: &str) -> Result<Netns> {
        Ok(Netns::of_pid(self.container_pid(container)?))
    }

    /// The docker0 address of a container.
    pub fn container_ip(&self, container: &str) -> Result<std::net::Ipv4Addr> {
        let s = self.docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", container])?;
        s.parse()
            .map_err(|_| LabError::Setup(format!("container {container} has no IP ({s:?})")))
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| LabError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| LabError::io(path, e))
}
