//! CPU time and memory of a process, from /proc.

use std::time::Instant;

use anyhow::{Context, bail};

/// Clock ticks per second of /proc/<pid>/stat's utime and stime.
pub fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        // USER_HZ is 100 on every Linux architecture geomx runs on.
        _ => 100.0,
    }
}

/// utime + stime of `pid` (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.len() < 13 {
        bail!("{path}: too few fields");
    }
    let utime: f64 = fields[11]
        .parse()
        .with_context(|| format!("{path}: utime {:?}", fields[11]))?;
    let stime: f64 = fields[12]
        .parse()
        .with_context(|| format!("{path}: stime {:?}", fields[12]))?;
    Ok((utime + stime) / clock_ticks())
}

/// The number of a field of /proc/<pid>/status (`VmRSS` in kB, `Threads`, ...).
pub fn status_value(pid: u32, field: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kb: f64 = v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("{path}: {field} {v:?}"))?;
            return Ok(kb);
        }
    }
    bail!("{path}: no {field} line")
}

/// A `kB` field of /proc/<pid>/status (`VmRSS`, `VmHWM`, ...), in MiB.
pub fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    Ok(status_value(pid, field)? / 1024.0)
}

/// Current resident set size of `pid`, MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmRSS")
}

/// Peak resident set size of `pid` (VmHWM), MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmHWM")
}

/// CPU use of a process over a window: start with [`CpuWindow::start`], read with
/// [`CpuWindow::percent`] (100 = one core fully busy).
#[derive(Clone, Copy, Debug)]
pub struct CpuWindow {
    pid: u32,
    cpu: f64,
    at: Instant,
}

impl CpuWindow {
    /// Starts measuring `pid` now.
    pub fn start(pid: u32) -> anyhow::Result<CpuWindow> {
        Ok(CpuWindow {
            pid,
            cpu: cpu_seconds(pid)?,
            at: Instant::now(),
        })
    }

    /// Percent of one core used since the start.
    pub fn percent(&self) -> anyhow::Result<f64> {
        let cpu = cpu_seconds(self.pid)? - self.cpu;
        let wall = self.at.elapsed().as_secs_f64();
        Ok(if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 })
    }
}

/// Nanoseconds on CPU of every thread of `pid` (/proc/<pid>/task/*/schedstat), by thread.
fn thread_cpu_ns(pid: u32) -> anyhow::Result<std::collections::BTreeMap<u32, u64>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry.with_context(|| format!("reading {dir}"))?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // a thread may end between the listing and the read
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text.split_whitespace().next().and_then(|v| v.parse().ok()) {
            out.insert(tid, ns);
        }
    }
    Ok(out)
}

/// CPU use of a process over a window with nanosecond resolution (the scheduler's
/// per-thread run time), for small figures such as an idle daemon's: utime/stime count
/// in 10 ms ticks. Time of threads that end inside the window is not counted.
#[derive(Clone, Debug)]
pub struct PreciseCpuWindow {
    pid: u32,
    start: std::collections::BTreeMap<u32, u64>,
    at: Instant,
}

impl PreciseCpuWindow {
    /// Starts measuring `pid` now.
    pub fn start(pid: u32) -> anyhow::Result<PreciseCpuWindow> {
        Ok(PreciseCpuWindow {
            pid,
            start: thread_cpu_ns(pid)?,
            at: Instant::now(),
        })
    }

    /// Percent of one core used since the start.
    pub fn percent(&self) -> anyhow::Result<f64> {
        let now = thread_cpu_ns(self.pid)?;
        let ns: u64 = now
            .iter()
            .map(|(tid, v)| v.saturating_sub(self.start.get(tid).copied().unwrap_or(0)))
            .sum();
        let wall = self.at.elapsed().as_secs_f64();
        Ok(if wall > 0.0 {
            100.0 * ns as f64 / 1e9 / wall
        } else {
            0.0
        })
    }
}

/// The 1-minute load average of the machine.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// (busy, total) jiffies of all CPUs from /proc/stat (busy = all but idle and iowait).
fn machine_jiffies() -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat: no cpu line")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        bail!("/proc/stat: short cpu line");
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let total: f64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Ok((total - idle, total))
}

/// The whole machine's CPU use over a window, % of all cores (100 = every core busy).
#[derive(Clone, Copy, Debug)]
pub struct MachineWindow {
    busy: f64,
    total: f64,
}

impl MachineWindow {
    /// Starts measuring now.
    pub fn start() -> anyhow::Result<MachineWindow> {
        let (busy, total) = machine_jiffies()?;
        Ok(MachineWindow { busy, total })
    }

    /// Percent of all cores busy since the start.
    pub fn percent(&self) -> anyhow::Result<f64> {
        let (busy, total) = machine_jiffies()?;
        let dt = total - self.total;
        Ok(if dt > 0.0 {
            100.0 * (busy - self.busy) / dt
        } else {
            0.0
        })
    }
}

/// Number of CPUs online.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        let rss = rss_mib(me).unwrap();
        assert!(rss > 0.0);
        assert!(peak_rss_mib(me).unwrap() >= rss * 0.5);
        let w = CpuWindow::start(me).unwrap();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(w.percent().unwrap() >= 0.0);
        let p = PreciseCpuWindow::start(me).unwrap();
        assert!(p.percent().unwrap() >= 0.0);
        let m = MachineWindow::start().unwrap();
        assert!((0.0..=100.0).contains(&m.percent().unwrap()));
        assert!(loadavg() >= 0.0);
    }
}
