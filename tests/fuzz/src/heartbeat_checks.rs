//! Invariants of the agent's heartbeat endpoint for what a training container posts to it
//! (`POST /v1/heartbeat`), checked by the `heartbeat_body` fuzz target and replayed on
//! stable by `agent/runtime/tests/fuzz_regressions.rs` (which includes this file with
//! `#[path]`, so it may only use `std` and `geomx_runtime`).
//!
//! The input is a sequence of bodies separated by NUL bytes (a JSON body holds none), posted
//! one after the other by the same node: each goes through the agent's own parse and
//! validation (`heartbeat::parse_report`) and, when taken, is merged into the node's
//! progress exactly as `Runtime::record_heartbeat` merges it (`ProgressTracker::report`).
//!
//! * `parse_report` never panics; a refused body is a 400 with a message, a taken one has a
//!   step, and no empty job or node.
//! * After every merge the node's progress is bounded whatever was posted before: at most
//!   `MAX_METRICS` (32) metrics, names of at most `MAX_METRIC_NAME` (64) bytes, every value
//!   finite, accuracy finite (no NaN or infinity reaches the report), and so its size is at
//!   most 32 × (64 + 8) bytes of names and values.
//! * The merge does what the endpoint's documentation says: the step becomes the iteration,
//!   an absent epoch keeps the last one, `accuracy` (else `acc`) becomes the accuracy, known
//!   metrics are updated, new ones are added while there is room and dropped after,
//!   nothing is forgotten, and a heartbeat never marks training finished.

use std::collections::BTreeMap;

use geomx_runtime::heartbeat::{HeartbeatError, parse_report};
use geomx_runtime::progress::{
    MAX_METRIC_NAME, MAX_METRICS, Progress, ProgressParser, ProgressTracker,
};

/// At most this many bodies are taken from one input.
const MAX_BODIES: usize = 16;

/// Runs every check on `data`: NUL-separated heartbeat bodies from one node.
pub fn check_heartbeat_bodies(data: &[u8]) {
    let parser = ProgressParser::new(None).expect("the default parsers compile");
    let mut tracker = ProgressTracker::new(parser);
    for (i, body) in data.split(|b| *b == 0).take(MAX_BODIES).enumerate() {
        let at_ms = i64::try_from(i).unwrap_or(0) + 1;
        let report = match parse_report(body) {
            Ok(r) => r,
            Err(e) => {
                assert!(matches!(e, HeartbeatError::Invalid(_)), "{e:?}");
                assert_eq!(e.status().as_u16(), 400, "{e}");
                assert!(!e.to_string().is_empty());
                continue;
            }
        };
        assert!(report.step.is_some(), "a body without a step was taken");
        for (what, v) in [("job", &report.job), ("node", &report.node)] {
            assert!(
                v.as_deref().is_none_or(|s| !s.is_empty()),
                "an empty {what} was taken"
            );
        }
        let before = tracker.progress().cloned();
        // as Runtime::record_heartbeat calls it
        tracker.report(report.epoch, report.step, report.metrics.clone(), at_ms);
        let after = tracker
            .progress()
            .cloned()
            .expect("a merged heartbeat is progress");
        check_bounded(&after);
        check_merge(
            before.as_ref(),
            &after,
            &report.metrics,
            report.epoch,
            report.step,
            at_ms,
        );
    }
}

/// What a node's progress may hold, whatever it was sent.
fn check_bounded(p: &Progress) {
    assert!(
        p.metrics.len() <= MAX_METRICS,
        "{} metrics",
        p.metrics.len()
    );
    for (name, value) in &p.metrics {
        assert!(
            name.len() <= MAX_METRIC_NAME,
            "a metric name of {} bytes",
            name.len()
        );
        assert!(value.is_finite(), "metric {name:?} is {value}");
    }
    if let Some(a) = p.accuracy {
        assert!(a.is_finite(), "accuracy {a}");
    }
    let bytes: usize = p.metrics.keys().map(|k| k.len() + 8).sum();
    assert!(
        bytes <= MAX_METRICS * (MAX_METRIC_NAME + 8),
        "{bytes} bytes of metrics"
    );
}

/// One heartbeat's merge, against the progress before it.
fn check_merge(
    before: Option<&Progress>,
    after: &Progress,
    sent: &BTreeMap<String, f64>,
    epoch: Option<u64>,
    step: Option<u64>,
    at_ms: i64,
) {
    let empty = Progress::default();
    let before = before.unwrap_or(&empty);
    assert_eq!(Some(after.iteration), step, "the step is the iteration");
    assert_eq!(after.epoch, epoch.unwrap_or(before.epoch), "epoch");
    let accuracy = sent.get("accuracy").or_else(|| sent.get("acc")).copied();
    assert_eq!(
        after.accuracy.map(f64::to_bits),
        accuracy.or(before.accuracy).map(f64::to_bits),
        "accuracy"
    );
    assert_eq!(after.observed_at_ms, at_ms);
    assert_eq!(
        after.finished, before.finished,
        "a heartbeat changed `finished`"
    );
    // nothing forgotten; known names updated; nothing from elsewhere
    for name in before.metrics.keys() {
        assert!(after.metrics.contains_key(name), "{name:?} forgotten");
    }
    let valid = |name: &str, value: f64| name.len() <= MAX_METRIC_NAME && value.is_finite();
    for (name, value) in &after.metrics {
        match sent.get(name) {
            Some(v) if valid(name, *v) => {
                assert_eq!(value.to_bits(), v.to_bits(), "{name:?} not updated");
            }
            _ => assert_eq!(
                before.metrics.get(name).map(|v| v.to_bits()),
                Some(value.to_bits()),
                "{name:?} changed or came from nowhere"
            ),
        }
    }
    // new names taken while there is room, in the order the body holds them (sorted)
    let mut room = MAX_METRICS.saturating_sub(before.metrics.len());
    for (name, value) in sent {
        if !valid(name, *value) || before.metrics.contains_key(name) {
            continue;
        }
        if room > 0 {
            assert!(
                after.metrics.contains_key(name),
                "{name:?} dropped with room left"
            );
            room -= 1;
        } else {
            assert!(
                !after.metrics.contains_key(name),
                "{name:?} taken past the limit"
            );
        }
    }
}
