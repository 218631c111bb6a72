//! When to send a report after the runtime's snapshot changed: soon (a crash must reach
//! the controller well within a second), but not once per change when a burst of changes
//! arrives (a job starting, many progress lines).

use std::time::Duration;

use tokio::time::Instant;

/// Quiet time after the last change before reporting.
pub const QUIET: Duration = Duration::from_millis(20);
/// Longest delay between the first unreported change and its report.
pub const MAX_DELAY: Duration = Duration::from_millis(50);

/// Collects changes and says when to report them: [`QUIET`] after the last change, but at
/// most [`MAX_DELAY`] after the first unreported one.
#[derive(Clone, Debug)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Default for Debouncer {
    fn default() -> Self {
        Debouncer::new(QUIET, MAX_DELAY)
    }
}

impl Debouncer {
    /// A debouncer with the given quiet time and maximum delay.
    pub fn new(quiet: Duration, max_delay: Duration) -> Debouncer {
        Debouncer {
            quiet,
            max_delay: max_delay.max(quiet),
            first: None,
            last: None,
        }
    }

    /// Something changed at `now`.
    pub fn changed(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the pending changes are due (`None`: nothing pending).
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max_delay))
    }

    /// Whether the pending changes are due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// A report went out (covering everything pending).
    pub fn reported(&mut self) {
        self.first = None;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_change_is_reported_after_the_quiet_time() {
        let t0 = Instant::now();
        let mut d = Debouncer::default();
        assert_eq!(d.deadline(), None);
        assert!(!d.due(t0));
        d.changed(t0);
        assert_eq!(d.deadline(), Some(t0 + QUIET));
        assert!(!d.due(t0 + QUIET - Duration::from_millis(1)));
        assert!(d.due(t0 + QUIET));
        d.reported();
        assert_eq!(d.deadline(), None);
    }

    #[test]
    fn a_burst_is_reported_at_most_max_delay_after_its_first_change() {
        let t0 = Instant::now();
        let mut d = Debouncer::default();
        // a change every 10 ms: the quiet time never passes
        for i in 0..20u64 {
            d.changed(t0 + Duration::from_millis(10 * i));
        }
        assert_eq!(d.deadline(), Some(t0 + MAX_DELAY));
        assert!(d.due(t0 + MAX_DELAY));
        d.reported();
        // the next burst starts a new window
        let t1 = t0 + Duration::from_millis(300);
        d.changed(t1);
        d.changed(t1 + Duration::from_millis(5));
        assert_eq!(d.deadline(), Some(t1 + Duration::from_millis(5) + QUIET));
    }

    #[test]
    fn the_deadline_never_exceeds_max_delay() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Duration::from_millis(100), Duration::from_millis(30));
        d.changed(t0);
        // max_delay is raised to the quiet time at least
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(100)));
    }
}
