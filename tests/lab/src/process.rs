//! Long-running processes of a lab (controller, agents, test servers), detached from the
//! process that started them so that a lab can outlive `geomx-lab up`, each with a pid
//! file and a log file in the lab directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{LabError, Result};
use crate::netns::Netns;

/// A process started in a namespace of the lab.
#[derive(Clone, Debug)]
pub struct LabProcess {
    name: String,
    pidfile: PathBuf,
    log: PathBuf,
}

impl LabProcess {
    /// Starts `argv` inside `netns` with `env` added, in its own session, output appended to
    /// `<dir>/<name>.log`, pid in `<dir>/<name>.pid`. Refuses to start a second copy.
    pub fn spawn(
        dir: &Path,
        name: &str,
        netns: &Netns,
        argv: &[String],
        env: &[(String, String)],
    ) -> Result<LabProcess> {
        let p = LabProcess::at(dir, name);
        if let Some(pid) = p.pid() {
            return Err(LabError::Setup(format!(
                "{name} already runs as pid {pid} ({})",
                p.pidfile.display()
            )));
        }
        // a previous instance that died (crashed, killed) may still be exiting with its
        // files open: wait until it is really gone before starting the next one
        p.signal(Signal::SIGKILL, Duration::from_secs(5))?;
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| LabError::Setup(format!("{name}: empty command")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .map_err(|e| LabError::io(&p.log, e))?;
        let log2 = log.try_clone().map_err(|e| LabError::io(&p.log, e))?;
        let mut c: Command = netns.command(program);
        c.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let child = c.spawn().map_err(|source| LabError::Spawn {
            command: crate::cmd::describe(&c),
            source,
        })?;
        std::fs::write(&p.pidfile, format!("{}\n", child.id()))
            .map_err(|e| LabError::io(&p.pidfile, e))?;
        // the child is reaped by whoever waits on it; a detached lab leaves it to init
        std::mem::forget(child);
        Ok(p)
    }

    /// The process `name` of the lab directory `dir` (running or not).
    pub fn at(dir: &Path, name: &str) -> LabProcess {
        LabProcess {
            name: name.to_string(),
            pidfile: dir.join(format!("{name}.pid")),
            log: dir.join(format!("{name}.log")),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its pid while it runs (a zombie counts as gone).
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }

    /// The pid in its pid file, whatever the state of that process (running, a zombie, or
    /// gone).
    fn recorded_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Sends `signal` and, for TERM/INT/KILL, waits until the process is really gone (KILL
    /// after `timeout`): reaped, or gone from `/proc`, or a zombie whose every thread has
    /// exited. Only then are its files closed, so its locks (flock) and listening sockets
    /// are released: a restart right after cannot race the dying process.
    ///
    /// (A multi-threaded process shows as a zombie as soon as its main thread exited, while
    /// its other threads may still be exiting with its files open; the kernel reports a
    /// thread group leader to `waitpid` only once the whole group has exited.)
    pub fn signal(&self, signal: Signal, timeout: Duration) -> Result<()> {
        let Some(pid) = self.recorded_pid() else {
            return Ok(());
        };
        if gone(pid) {
            let _ = std::fs::remove_file(&self.pidfile);
            return Ok(());
        }
        if alive(pid) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
        if !matches!(signal, Signal::SIGTERM | Signal::SIGKILL | Signal::SIGINT) {
            return Ok(());
        }
        let start = Instant::now();
        let mut killed = signal == Signal::SIGKILL;
        while !gone(pid) {
            if start.elapsed() > timeout && !killed {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                killed = true;
            }
            if start.elapsed() > timeout + Duration::from_secs(5) {
                return Err(LabError::Timeout {
                    what: format!("{} (pid {pid}) to exit", self.name),
                    seconds: timeout.as_secs_f64() + 5.0,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.pidfile);
        Ok(())
    }

    /// SIGKILL, like `kill -9`, and wait until it is really gone (see [`LabProcess::signal`]).
    pub fn kill9(&self) -> Result<()> {
        self.signal(Signal::SIGKILL, Duration::from_secs(5))
    }

    /// SIGTERM with a grace period (then SIGKILL), and wait until it is really gone (see
    /// [`LabProcess::signal`]).
    pub fn stop(&self, grace: Duration) -> Result<()> {
        self.signal(Signal::SIGTERM, grace)
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the parenthesised command name
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(
                state.and_then(|s| s.chars().next()),
                Some('Z') | Some('X') | None
            )
        }
        Err(_) => false,
    }
}

/// Whether `pid` is really gone: reaped now (our child), gone from `/proc`, or a zombie
/// whose every thread has exited (someone else's child, not reaped yet). A process that is
/// gone holds no file, lock or socket any more.
pub fn gone(pid: u32) -> bool {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    // our own children: reaped only once the whole thread group has exited
    match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => return false,
        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return true,
        // stopped/continued (not asked for) or not our child: look at /proc
        Ok(_) | Err(_) => {}
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    match state {
        Some('Z') | Some('X') => {
            // a zombie leader: gone once no other thread of it is left
            match std::fs::read_dir(format!("/proc/{pid}/task")) {
                Ok(tasks) => tasks
                    .filter_map(|t| t.ok())
                    .all(|t| t.file_name().to_str() == Some(pid.to_string().as_str())),
                Err(_) => true,
            }
        }
        _ => false,
    }
}
