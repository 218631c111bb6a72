//! The WAN router's delay line: what `sch_netem`'s delay and jitter would do, for kernels
//! without netem. Packets crossing a delayed link are queued to user space by an `NFQUEUE`
//! rule in the router's FORWARD chain; this process holds each one for the link's delay
//! (± a uniform jitter, order kept) and then lets it go with a batch verdict. Only metadata is
//! copied to user space and GSO packets stay whole, so a few hundred Mbit cost little.
//!
//! It runs as `geomx-lab delay-line --dir LAB_DIR` inside the router's namespace, reads the
//! delays of every queue from `LAB_DIR/wan/delays.json`, and re-reads them when `reload`
//! arrives on its control socket `LAB_DIR/wan/delayline.sock` (it answers `ok` once the new
//! delays are in force), so a link changes without restarting anything.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::nfqueue::{Incoming, NfQueue};

/// How many packets the kernel holds for one queue at most.
pub const QUEUE_MAX_LEN: u32 = 65_536;

/// The delay of one queue (one direction of one link).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDelay {
    /// NFQUEUE number.
    pub queue: u16,
    /// One-way delay in microseconds.
    pub delay_us: u64,
    /// Uniform jitter in microseconds (each packet's delay is within `delay ± jitter`).
    pub jitter_us: u64,
}

/// Every queue's delay: `LAB_DIR/wan/delays.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayConfig {
    /// One entry per queue.
    pub queues: Vec<QueueDelay>,
}

/// Where a lab's delay-line files live.
pub fn wan_dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("wan")
}

fn config_file(lab_dir: &Path) -> PathBuf {
    wan_dir(lab_dir).join("delays.json")
}

fn socket_file(lab_dir: &Path) -> PathBuf {
    wan_dir(lab_dir).join("delayline.sock")
}

/// Writes the delay configuration (atomically: a reader never sees half a file).
pub fn write_config(lab_dir: &Path, config: &DelayConfig) -> Result<()> {
    let dir = wan_dir(lab_dir);
    std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
    let file = config_file(lab_dir);
    let tmp = file.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| LabError::Setup(format!("delays.json: {e}")))?;
    std::fs::write(&tmp, text).map_err(|e| LabError::io(&tmp, e))?;
    std::fs::rename(&tmp, &file).map_err(|e| LabError::io(&file, e))
}

fn read_config(lab_dir: &Path) -> Result<DelayConfig> {
    let file = config_file(lab_dir);
    let text = std::fs::read_to_string(&file).map_err(|e| LabError::io(&file, e))?;
    serde_json::from_str(&text).map_err(|e| LabError::Setup(format!("{}: {e}", file.display())))
}

/// Asks the running delay line to say `command` (`ping` or `reload`) and waits for its `ok`.
pub fn control(lab_dir: &Path, command: &str, timeout: Duration) -> Result<()> {
    let me = wan_dir(lab_dir).join(format!("ctl-{}-{}.sock", std::process::id(), nonce()));
    let _ = std::fs::remove_file(&me);
    let sock = UnixDatagram::bind(&me).map_err(|e| LabError::io(&me, e))?;
    let result = (|| {
        sock.set_read_timeout(Some(timeout))
            .map_err(|e| LabError::io(&me, e))?;
        let target = socket_file(lab_dir);
        sock.send_to(command.as_bytes(), &target).map_err(|e| {
            LabError::Setup(format!(
                "the lab's delay line does not answer at {} ({e}); is `geomx-lab delay-line` running? see procs/delayline.log",
                target.display()
            ))
        })?;
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).map_err(|_| LabError::Timeout {
            what: format!("the delay line to answer {command:?}"),
            seconds: timeout.as_secs_f64(),
        })?;
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        if answer == "ok" {
            Ok(())
        } else {
            Err(LabError::Setup(format!(
                "the delay line refused {command:?}: {answer}"
            )))
        }
    })();
    let _ = std::fs::remove_file(&me);
    result
}

fn nonce() -> u64 {
    rand::random::<u64>()
}

/// One queue's packets in flight: ids in arrival order with their release times.
#[derive(Debug, Default)]
struct Held {
    delay: Duration,
    jitter: Duration,
    packets: VecDeque<(Instant, u32)>,
    last_release: Option<Instant>,
}

/// The delay line's decisions, without any socket: when each packet goes.
#[derive(Debug, Default)]
pub struct DelayLine {
    queues: BTreeMap<u16, Held>,
}

impl DelayLine {
    /// Sets (or changes) every queue's delay; packets already held keep their release time.
    pub fn configure(&mut self, config: &DelayConfig) {
        for q in &config.queues {
            let held = self.queues.entry(q.queue).or_default();
            held.delay = Duration::from_micros(q.delay_us);
            held.jitter = Duration::from_micros(q.jitter_us);
        }
    }

    /// A packet arrived on `queue` at `now`; `unit` in `[-1, 1]` picks its jitter. Its release
    /// time is `now + delay + unit × jitter`, but never before the previous packet's: a link
    /// does not reorder.
    pub fn arrive(&mut self, queue: u16, id: u32, now: Instant, unit: f64) {
        let held = self.queues.entry(queue).or_default();
        let base = now + held.delay;
        let j = held.jitter.as_secs_f64() * unit.clamp(-1.0, 1.0);
        let mut release = if j >= 0.0 {
            base + Duration::from_secs_f64(j)
        } else {
            base.checked_sub(Duration::from_secs_f64(-j)).unwrap_or(now)
        };
        if release < now {
            release = now;
        }
        if let Some(last) = held.last_release
            && release < last
        {
            release = last;
        }
        held.last_release = Some(release);
        held.packets.push_back((release, id));
    }

    /// Takes every packet due at `now`: for each queue with any, the highest id due (a batch
    /// verdict up to it releases them all).
    pub fn take_due(&mut self, now: Instant) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        for (q, held) in &mut self.queues {
            let mut last = None;
            while let Some(&(t, id)) = held.packets.front() {
                if t > now {
                    break;
                }
                last = Some(id);
                held.packets.pop_front();
            }
            if let Some(id) = last {
                out.push((*q, id));
            }
        }
        out
    }

    /// When the next held packet is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queues
            .values()
            .filter_map(|h| h.packets.front().map(|p| p.0))
            .min()
    }

    /// How many packets are held.
    pub fn held(&self) -> usize {
        self.queues.values().map(|h| h.packets.len()).sum()
    }
}

/// Runs the delay line of the lab at `lab_dir` until killed (called in the router's namespace).
pub fn run(lab_dir: &Path) -> Result<()> {
    // a router forwards in softirq context, ahead of the programs it carries traffic for:
    // the delay line runs ahead of them too (best effort)
    // SAFETY: setpriority only reads its integer arguments.
    let _ = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, -15) };
    let config = read_config(lab_dir)?;
    let mut nfq = NfQueue::open()?;
    for q in &config.queues {
        nfq.bind(q.queue, QUEUE_MAX_LEN)?;
    }
    let mut line = DelayLine::default();
    line.configure(&config);
    let sock_path = socket_file(lab_dir);
    let _ = std::fs::remove_file(&sock_path);
    let ctl = UnixDatagram::bind(&sock_path).map_err(|e| LabError::io(&sock_path, e))?;
    ctl.set_nonblocking(true)
        .map_err(|e| LabError::io(&sock_path, e))?;
    tracing::info!(queues = config.queues.len(), "delay line ready");
    let mut bound: Vec<u16> = config.queues.iter().map(|q| q.queue).collect();
    loop {
        let timeout = line.next_due().map(|t| {
            let d = t.saturating_duration_since(Instant::now());
            nix::sys::time::TimeSpec::from_duration(d)
        });
        // SAFETY: both descriptors belong to objects alive for the whole call.
        let (nfd, cfd) = unsafe {
            (
                BorrowedFd::borrow_raw(nfq.fd()),
                BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&ctl)),
            )
        };
        let mut fds = [
            nix::poll::PollFd::new(nfd, nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(cfd, nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::ppoll(&mut fds, timeout, None) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(LabError::Sys {
                    what: "ppoll".into(),
                    source: e,
                });
            }
        }
        // everything the kernel queued so far
        loop {
            let batch = nfq.recv_ready()?;
            if batch.is_empty() {
                break;
            }
            let now = Instant::now();
            for m in batch {
                if let Incoming::Packet { queue, id } = m {
                    line.arrive(queue, id, now, rand::random_range(-1.0..=1.0));
                }
            }
        }
        for (queue, id) in line.take_due(Instant::now()) {
            nfq.accept_through(queue, id)?;
        }
        let mut buf = [0u8; 256];
        while let Ok((n, from)) = ctl.recv_from(&mut buf) {
            let answer = match &buf[..n] {
                b"ping" => "ok".to_string(),
                b"reload" => match read_config(lab_dir) {
                    Ok(c) => {
                        let mut res = Ok(());
                        for q in &c.queues {
                            if !bound.contains(&q.queue) {
                                res = nfq.bind(q.queue, QUEUE_MAX_LEN);
                                bound.push(q.queue);
                            }
                        }
                        line.configure(&c);
                        match res {
                            Ok(()) => "ok".to_string(),
                            Err(e) => e.to_string(),
                        }
                    }
                    Err(e) => e.to_string(),
                },
                other => format!("unknown command {:?}", String::from_utf8_lossy(other)),
            };
            if let Some(p) = from.as_pathname() {
                let _ = ctl.send_to(answer.as_bytes(), p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(delay_ms: u64, jitter_ms: u64) -> DelayLine {
        let mut l = DelayLine::default();
        l.configure(&DelayConfig {
            queues: vec![QueueDelay {
                queue: 1,
                delay_us: delay_ms * 1000,
                jitter_us: jitter_ms * 1000,
            }],
        });
        l
    }

    #[test]
    fn a_packet_goes_after_its_delay_and_not_before() {
        let mut l = line(40, 0);
        let t0 = Instant::now();
        l.arrive(1, 7, t0, 0.0);
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(40)));
        assert!(l.take_due(t0 + Duration::from_millis(39)).is_empty());
        assert_eq!(l.take_due(t0 + Duration::from_millis(40)), vec![(1, 7)]);
        assert_eq!(l.held(), 0);
        assert_eq!(l.next_due(), None);
    }

    #[test]
    fn jitter_spreads_release_times_but_never_reorders() {
        let mut l = line(40, 5);
        let t0 = Instant::now();
        l.arrive(1, 1, t0, 1.0); // +45 ms
        l.arrive(1, 2, t0 + Duration::from_millis(1), -1.0); // would be +36 ms: waits for 1
        l.arrive(1, 3, t0 + Duration::from_millis(100), -1.0); // +135 ms
        assert_eq!(l.take_due(t0 + Duration::from_millis(44)), vec![]);
        // one batch verdict up to the highest due id
        assert_eq!(l.take_due(t0 + Duration::from_millis(45)), vec![(1, 2)]);
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(135)));
    }

    #[test]
    fn a_changed_delay_applies_to_new_packets_only() {
        let mut l = line(40, 0);
        let t0 = Instant::now();
        l.arrive(1, 1, t0, 0.0);
        l.configure(&DelayConfig {
            queues: vec![QueueDelay {
                queue: 1,
                delay_us: 10_000,
                jitter_us: 0,
            }],
        });
        l.arrive(1, 2, t0, 0.0);
        // the second may not overtake the first
        assert_eq!(l.take_due(t0 + Duration::from_millis(10)), vec![]);
        assert_eq!(l.take_due(t0 + Duration::from_millis(40)), vec![(1, 2)]);
        l.arrive(1, 3, t0 + Duration::from_millis(50), 0.0);
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(60)));
    }

    #[test]
    fn queues_are_independent() {
        let mut l = line(40, 0);
        l.configure(&DelayConfig {
            queues: vec![QueueDelay {
                queue: 2,
                delay_us: 0,
                jitter_us: 0,
            }],
        });
        let t0 = Instant::now();
        l.arrive(1, 1, t0, 0.0);
        l.arrive(2, 1, t0, 0.0);
        assert_eq!(l.take_due(t0), vec![(2, 1)]);
    }
}
