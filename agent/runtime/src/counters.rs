//! What the runtime counts for the agent's metrics: role container starts and exits, image
//! pulls and their bytes, and the heartbeat endpoint's [`HeartbeatStats`].
//!
//! Plain atomics, shared through an `Arc` in [`crate::RuntimeConfig::counters`]: the daemon
//! makes one [`RuntimeCounters`] at process start and hands it to every runtime it starts
//! (a runtime restarted for a new subnet keeps counting where the previous one stopped), and
//! reads it for its Prometheus registry. Every counter only grows.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::heartbeat::HeartbeatStats;

/// The runtime's counters (see the module docs).
#[derive(Debug, Default)]
pub struct RuntimeCounters {
    /// The heartbeat endpoint's counters.
    pub heartbeats: HeartbeatStats,
    container_starts: AtomicU64,
    exits_success: AtomicU64,
    exits_failure: AtomicU64,
    pull_bytes: AtomicU64,
    pulls_ok: AtomicU64,
    pulls_failed: AtomicU64,
}

/// A reading of [`RuntimeCounters`] (without the heartbeat counters: see
/// [`HeartbeatStats::read`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeCounts {
    /// Role containers the runtime started (created and started, or an adopted one that was
    /// never started).
    pub container_starts: u64,
    /// Role containers seen ending with exit code 0 (and not OOM-killed or ended by a stop
    /// of Docker).
    pub exits_success: u64,
    /// Role containers seen ending otherwise.
    pub exits_failure: u64,
    /// Image layer bytes downloaded by pulls (every attempt's).
    pub pull_bytes: u64,
    /// Pulls that ended with the image on the host.
    pub pulls_ok: u64,
    /// Pulls that failed (for good: retries of one pull are one pull).
    pub pulls_failed: u64,
}

impl RuntimeCounters {
    /// Counts a role container started.
    pub fn container_started(&self) {
        self.container_starts.fetch_add(1, Relaxed);
    }

    /// Counts a role container seen ending, successfully or not.
    pub fn container_exited(&self, success: bool) {
        if success {
            self.exits_success.fetch_add(1, Relaxed);
        } else {
            self.exits_failure.fetch_add(1, Relaxed);
        }
    }

    /// Counts `n` more layer bytes downloaded.
    pub fn pull_bytes(&self, n: u64) {
        if n > 0 {
            self.pull_bytes.fetch_add(n, Relaxed);
        }
    }

    /// Counts a pull that ended, with the image or not.
    pub fn pull_ended(&self, ok: bool) {
        if ok {
            self.pulls_ok.fetch_add(1, Relaxed);
        } else {
            self.pulls_failed.fetch_add(1, Relaxed);
        }
    }

    /// The counters now.
    pub fn read(&self) -> RuntimeCounts {
        RuntimeCounts {
            container_starts: self.container_starts.load(Relaxed),
            exits_success: self.exits_success.load(Relaxed),
            exits_failure: self.exits_failure.load(Relaxed),
            pull_bytes: self.pull_bytes.load(Relaxed),
            pulls_ok: self.pulls_ok.load(Relaxed),
            pulls_failed: self.pulls_failed.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_move_separately() {
        let c = RuntimeCounters::default();
        c.container_started();
        c.container_exited(true);
        c.container_exited(false);
        c.container_exited(false);
        c.pull_bytes(0);
        c.pull_bytes(100);
        c.pull_ended(true);
        c.pull_ended(false);
        assert_eq!(
            c.read(),
            RuntimeCounts {
                container_starts: 1,
                exits_success: 1,
                exits_failure: 2,
                pull_bytes: 100,
                pulls_ok: 1,
                pulls_failed: 1,
            }
        );
    }
}
