//! What the runtime reports: per-node [`NodeStatus`] (mirroring `geomx.v1.NodeStatus`),
//! snapshots of all of them, and log chunks.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::progress::Progress;

/// Lifecycle of one role container (mirrors `geomx.v1.ContainerState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Desired but not created yet, or creation is being retried after a transient Docker
    /// error (see [`NodeStatus::error`]).
    #[default]
    Pending,
    /// Created, not started.
    Created,
    /// Running (also paused or restarting, as Docker sees it).
    Running,
    /// Ended with exit code 0.
    Exited,
    /// Ended with a non-zero exit code (or killed by the OOM killer), or could not be
    /// created or started (missing image, Docker refused it: see [`NodeStatus::error`]).
    Failed,
    /// Gone although it was expected: this runtime created or adopted it and it was removed
    /// behind geomx's back. It is not recreated (geomx restarts whole jobs).
    Missing,
}

impl NodeState {
    /// Whether the container has ended (or will never run).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            NodeState::Exited | NodeState::Failed | NodeState::Missing
        )
    }
}

/// The state of one role container as this host sees it (mirrors `geomx.v1.NodeStatus`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Job name.
    pub job: String,
    /// Node name.
    pub node: String,
    /// Role (label `io.geomx.role`).
    pub role: String,
    /// Party (label `io.geomx.party`).
    pub party: String,
    /// Attempt number of the job the container belongs to.
    pub generation: u32,
    /// Lifecycle state.
    pub state: NodeState,
    /// Docker container id; empty while pending.
    pub container_id: String,
    /// The container's IPv4 on docker0, or the host's IP (as configured) with host
    /// networking; the last known address once the container has ended (empty for an
    /// ended container adopted after an agent restart: Docker forgets it); empty if unknown.
    pub ip: String,
    /// Exit code once ended.
    pub exit_code: Option<i32>,
    /// How many times Docker restarted the container (0: geomx sets no restart policy).
    pub restarts: u32,
    /// Latest progress, if any was seen.
    pub progress: Option<Progress>,
    /// The last lines of output (stdout and stderr interleaved), filled once the container
    /// has ended.
    pub log_tail: Vec<String>,
    /// Why the container could not be created or started, or how it ended badly.
    pub error: String,
    /// Container start time, Unix milliseconds; 0 if never started.
    pub started_at_ms: i64,
    /// Container end time, Unix milliseconds; 0 while running.
    pub finished_at_ms: i64,
    /// A scheduler's rendezvous as this host sees it (see [`crate::rendezvous`]); `None`
    /// for other roles.
    pub rendezvous: Option<crate::rendezvous::Rendezvous>,
}

/// Every geomx container on the host, as published to subscribers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Increases with every published change.
    pub revision: u64,
    /// Sorted by (job, node).
    pub nodes: Vec<NodeStatus>,
}

impl Snapshot {
    /// The status of one node.
    pub fn node(&self, job: &str, node: &str) -> Option<&NodeStatus> {
        self.nodes.iter().find(|n| n.job == job && n.node == node)
    }
}

/// A piece of container output (mirrors `geomx.v1.LogChunk`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// Whole lines, without their line breaks (a last line without a break is sent when
    /// the stream ends).
    pub lines: Vec<String>,
    /// True for standard error.
    pub stderr: bool,
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Parses an RFC 3339 UTC time as Docker prints it (`2024-05-01T12:00:00.123456789Z`,
/// also with a `+hh:mm` offset) into Unix milliseconds. Docker's "never"
/// (`0001-01-01T00:00:00Z`) and anything unparsable give `None`.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    parse_rfc3339(s).map(|(secs, nanos)| secs * 1_000 + nanos / 1_000_000)
}

/// [`parse_rfc3339_ms`] to the nanosecond (Docker's log timestamps tell lines apart only
/// at that precision); `None` also past the year 2262.
pub(crate) fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let (secs, nanos) = parse_rfc3339(s)?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Unix seconds and nanoseconds of an RFC 3339 time.
fn parse_rfc3339(s: &str) -> Option<(i64, i64)> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (year, month, day) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hour, min, sec) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if year <= 1 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        let mut ns = digits.chars().take(9).collect::<String>();
        while ns.len() < 9 {
            ns.push('0');
        }
        nanos = ns.parse().ok()?;
        rest = &frac[digits.len()..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let h: i64 = o.get(1..3)?.parse().ok()?;
            let m: i64 = o.get(4..6)?.parse().ok()?;
            let v = h * 60 + m;
            if o.starts_with('-') { -v } else { v }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + min * 60 + sec - offset_min * 60;
    Some((secs, nanos))
}

/// Unix nanoseconds as Docker prints a log line's timestamp
/// (`2024-05-01T12:00:00.123456789Z`; the inverse of [`parse_rfc3339_ns`] for UTC).
#[cfg(any(test, feature = "fake"))]
pub(crate) fn format_rfc3339_ns(ns: i64) -> String {
    let (secs, nanos) = (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
    let (days, day_s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        day_s / 3_600,
        day_s % 3_600 / 60,
        day_s % 60
    )
}

// Howard Hinnant's civil_from_days: the proleptic Gregorian date of a day since 1970-01-01.
#[cfg(any(test, feature = "fake"))]
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

// Howard Hinnant's days_from_civil: days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_values() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01Z"), Some(1_000));
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T12:00:00.123456789Z"),
            Some(1_714_564_800_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T14:00:00.5+02:00"),
            Some(1_714_564_800_500)
        );
        assert_eq!(parse_rfc3339_ms("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ms("garbage"), None);
        assert_eq!(parse_rfc3339_ms(""), None);
        assert_eq!(
            parse_rfc3339_ns("2024-05-01T12:00:00.123456789Z"),
            Some(1_714_564_800_123_456_789)
        );
        for ns in [0, 1, 1_714_564_800_123_456_789, 951_782_400_000_000_007] {
            let s = format_rfc3339_ns(ns);
            assert_eq!(parse_rfc3339_ns(&s), Some(ns), "{s}");
        }
        assert_eq!(
            format_rfc3339_ns(1_714_564_800_123_456_789),
            "2024-05-01T12:00:00.123456789Z"
        );
    }
}
