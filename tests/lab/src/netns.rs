//! Named network namespaces (`ip netns`), commands inside them, and sockets bound in them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::{CloneFlags, setns};

use crate::cmd;
use crate::error::{LabError, Result};

/// A network namespace, named (`/run/netns/<name>`) or any other namespace file such as
/// `/proc/<pid>/ns/net` of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    path: PathBuf,
    /// A mount namespace commands enter too (a lab host's own /run/wireguard).
    mount: Option<PathBuf>,
}

impl Netns {
    /// Creates the named namespace `name` with its loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        cmd::sh("ip", &["netns", "add", name])?;
        let ns = Netns::named(name);
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The named namespace `name` (it need not exist yet).
    pub fn named(name: &str) -> Netns {
        Netns {
            path: Path::new("/run/netns").join(name),
            mount: None,
        }
    }

    /// The namespace of the process `pid` (a container's init, say).
    pub fn of_pid(pid: u32) -> Netns {
        Netns {
            path: PathBuf::from(format!("/proc/{pid}/ns/net")),
            mount: None,
        }
    }

    /// The same network namespace, with commands also entering the mount namespace `file`.
    pub fn with_mount(mut self, file: Option<PathBuf>) -> Netns {
        self.mount = file;
        self
    }

    /// The mount namespace commands enter, if any.
    pub fn mount(&self) -> Option<&Path> {
        self.mount.as_deref()
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name for `ip netns` (the file name).
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether the namespace file exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Deletes a named namespace (no error when it is already gone).
    pub fn delete(&self) -> Result<()> {
        if self.exists() {
            cmd::sh("ip", &["netns", "delete", &self.name()])?;
        }
        Ok(())
    }

    /// A command that runs `program` inside the namespace (through `nsenter --net`, which,
    /// unlike `ip netns exec`, leaves /sys and the cgroup mounts alone).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display()));
        if let Some(m) = &self.mount {
            c.arg(format!("--mount={}", m.display()));
        }
        c.arg("--").arg(program);
        c
    }

    /// Runs `argv` inside the namespace and returns its standard output.
    pub fn run<S: AsRef<str>>(&self, argv: &[S]) -> Result<String> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| LabError::Setup("empty command".into()))?;
        let mut c = self.command(program.as_ref());
        c.args(args.iter().map(|a| a.as_ref()));
        cmd::run(&mut c)
    }

    /// Runs `f` on a fresh thread that entered the namespace, and returns its result.
    /// Sockets created by `f` stay bound to the namespace wherever they are used later.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = File::open(&self.path).map_err(|e| LabError::io(&self.path, e))?;
        let what = format!("setns({})", self.path.display());
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|source| LabError::Sys { what, source })?;
            Ok(f())
        })
        .join()
        .map_err(|_| LabError::Setup("thread inside the namespace panicked".into()))?
    }

    /// A TCP listener bound to `addr` inside the namespace.
    pub fn listen_tcp(&self, addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
        self.enter(move || std::net::TcpListener::bind(addr))?
            .map_err(|e| LabError::Setup(format!("bind {addr}: {e}")))
    }

    /// Opens a TCP connection from inside the namespace.
    pub fn connect_tcp(
        &self,
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<std::net::TcpStream> {
        self.enter(move || std::net::TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|e| LabError::Setup(format!("connect {addr}: {e}")))
    }

    /// `iptables-save` of the namespace, without comments and counters, for comparisons.
    pub fn iptables_save(&self) -> Result<String> {
        let out = self.run(&["iptables-save"])?;
        Ok(normalize_iptables_save(&out))
    }

    /// `ip -4 route show table all`, sorted, for comparisons.
    pub fn routes(&self) -> Result<String> {
        let out = self.run(&["ip", "-4", "route", "show", "table", "all"])?;
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort_unstable();
        Ok(lines.join("\n"))
    }
}

/// Drops the `#` comment lines (they carry timestamps) and zeroes `[packets:bytes]` counters.
pub fn normalize_iptables_save(out: &str) -> String {
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                match l.rfind(" [") {
                    Some(i) => l[..i].to_string(),
                    None => l.to_string(),
                }
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_save_normalization_drops_comments_and_counters() {
        let raw = "# Generated by iptables-save v1.8.9 on Mon\n*nat\n:PREROUTING ACCEPT [12:720]\n:GEOMX-POSTROUTING - [0:0]\n-A POSTROUTING -j GEOMX-POSTROUTING\nCOMMIT\n# Completed on Mon\n";
        assert_eq!(
            normalize_iptables_save(raw),
            "*nat\n:PREROUTING ACCEPT\n:GEOMX-POSTROUTING -\n-A POSTROUTING -j GEOMX-POSTROUTING\nCOMMIT"
        );
    }
}
