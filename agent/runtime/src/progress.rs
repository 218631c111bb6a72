//! Training progress from a container's output: a pure line parser ([`ProgressParser`]) and
//! the per-container accumulation of what it finds ([`ProgressTracker`]).
//!
//! Recognised lines (anywhere in the line, so logging prefixes such as `INFO:root:` are fine):
//!
//! | source | example | gives |
//! |---|---|---|
//! | GeoMX examples | `[Time 1.234][Epoch 0][Iteration 17] Test Acc 0.9312` | epoch, iteration (cumulative from 1), accuracy; metric `time` |
//! | MXNet `Speedometer` | `Epoch[0] Batch [100]\tSpeed: 1234.56 samples/sec\taccuracy=0.912` (also `Batch [0-100]`, `Batch [100-200]`, `Iter[0] Batch [100]`) | epoch, iteration (see below), accuracy from `accuracy`/`acc`; metrics `samples_per_sec`, `batch` and every `name=value` |
//! | MXNet epoch end | `Epoch[0] Validation-accuracy=0.95`, `Epoch[0] Train-accuracy=0.91` | epoch; `Validation-accuracy` sets accuracy; metrics `validation-<name>` / `train-<name>` |
//! | the job's regex | named groups `epoch`, `iteration` (or `step`), `accuracy`, any other named group that parses as a number | as named; other groups become metrics |
//!
//! The job's own regex is tried first. Speedometer batch numbers restart at every epoch;
//! the tracker turns them into a cumulative iteration: `iteration = (sum over earlier
//! epochs of the highest batch number seen in that epoch) + batch`. It undercounts by at
//! most the Speedometer's `frequent` per epoch, but it never goes backwards, which is what
//! throughput and stall detection need. Speedometer's accuracy is training accuracy; a
//! later `Validation-accuracy` line replaces it.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// The latest training progress of a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Epoch (0-based, as GeoMX prints it).
    pub epoch: u64,
    /// Iteration, cumulative from 1.
    pub iteration: u64,
    /// Test (or validation, or training) accuracy, when printed.
    pub accuracy: Option<f64>,
    /// When it was observed (the log line's Docker timestamp, or the heartbeat's arrival),
    /// Unix milliseconds.
    pub observed_at_ms: i64,
    /// Other metrics: parsed from the line (speed, loss, ...) or reported over HTTP.
    pub metrics: BTreeMap<String, f64>,
    /// The node printed the line its job declares as the end of training
    /// (`[progress].finished`); it stays set.
    #[serde(default)]
    pub finished: bool,
}

/// Which recogniser matched a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// `[Time t][Epoch e][Iteration i] Test Acc a`.
    GeoMx,
    /// MXNet's Speedometer callback.
    Speedometer,
    /// MXNet's end-of-epoch metric line.
    EpochEnd,
    /// The job's own regex.
    Custom,
}

/// What one output line says about progress.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressLine {
    /// Which recogniser matched.
    pub kind: LineKind,
    /// Epoch, if the line names one.
    pub epoch: Option<u64>,
    /// Cumulative iteration, if the line names one.
    pub iteration: Option<u64>,
    /// Batch number within the epoch (Speedometer).
    pub batch: Option<u64>,
    /// Accuracy, if the line names one.
    pub accuracy: Option<f64>,
    /// Other numbers the line carries.
    pub metrics: BTreeMap<String, f64>,
}

static GEOMX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"\[Time\s+(?P<time>[-+0-9.eE]+)\]\s*\[Epoch\s+(?P<epoch>\d+)\]\s*\[Iteration\s+(?P<iteration>\d+)\](?:\s*Test Acc\s+(?P<accuracy>[-+0-9.eE]+|nan))?",
    )
    .expect("static regex compiles")
});
static SPEEDOMETER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?:Epoch|Iter)\[(?P<epoch>\d+)\]\s*Batch\s*\[(?:\d+-)?(?P<batch>\d+)\]\s*Speed:\s*(?P<speed>[-+0-9.eE]+|inf|nan)\s*samples/sec(?P<rest>.*)$",
    )
    .expect("static regex compiles")
});
static NAME_VALUE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)=(?P<value>[-+]?(?:[0-9.]+(?:[eE][-+]?\d+)?|inf|nan))",
    )
    .expect("static regex compiles")
});
static EPOCH_END: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"Epoch\[(?P<epoch>\d+)\]\s*(?P<set>Validation|Train)-(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[-+]?(?:[0-9.]+(?:[eE][-+]?\d+)?|inf|nan))",
    )
    .expect("static regex compiles")
});

/// A compiled set of recognisers: the defaults plus, optionally, the job's own regex.
#[derive(Clone, Debug)]
pub struct ProgressParser {
    custom: Option<Regex>,
    finished: Option<Regex>,
}

impl ProgressParser {
    /// The default recognisers plus `custom` (a regex with named groups), if given.
    pub fn new(custom: Option<&str>) -> Result<ProgressParser> {
        let custom = match custom.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(re) => Some(Regex::new(re).map_err(|e| RuntimeError::InvalidRegex {
                regex: re.to_string(),
                source: Box::new(e),
            })?),
        };
        Ok(ProgressParser {
            custom,
            finished: None,
        })
    }

    /// The default recognisers plus `custom` (see [`ProgressParser::new`]), and `finished`:
    /// a regex matching the line that ends training, if given.
    pub fn with_finished(custom: Option<&str>, finished: Option<&str>) -> Result<ProgressParser> {
        let mut p = ProgressParser::new(custom)?;
        p.finished = match finished.filter(|s| !s.trim().is_empty()) {
            None => None,
            Some(re) => Some(Regex::new(re).map_err(|e| RuntimeError::InvalidRegex {
                regex: re.to_string(),
                source: Box::new(e),
            })?),
        };
        Ok(p)
    }

    /// The custom regex, if any.
    pub fn custom(&self) -> Option<&str> {
        self.custom.as_ref().map(Regex::as_str)
    }

    /// The regex of the line that ends training, if any.
    pub fn finished(&self) -> Option<&str> {
        self.finished.as_ref().map(Regex::as_str)
    }

    /// Whether `line` is the line that ends training.
    pub fn is_finished_line(&self, line: &str) -> bool {
        self.finished.as_ref().is_some_and(|re| re.is_match(line))
    }

    /// What `line` says about progress, if anything.
    pub fn parse(&self, line: &str) -> Option<ProgressLine> {
        if let Some(re) = &self.custom
            && let Some(p) = parse_custom(re, line)
        {
            return Some(p);
        }
        if let Some(c) = GEOMX.captures(line) {
            let mut metrics = BTreeMap::new();
            if let Some(t) = num::<f64>(c.name("time")) {
                metrics.insert("time".into(), t);
            }
            return Some(ProgressLine {
                kind: LineKind::GeoMx,
                epoch: num(c.name("epoch")),
                iteration: num(c.name("iteration")),
                batch: None,
                accuracy: num(c.name("accuracy")),
                metrics,
            });
        }
        if let Some(c) = SPEEDOMETER.captures(line) {
            let mut metrics = BTreeMap::new();
            let batch: Option<u64> = num(c.name("batch"));
            if let Some(b) = batch {
                metrics.insert("batch".into(), b as f64);
            }
            if let Some(s) = num::<f64>(c.name("speed")) {
                metrics.insert("samples_per_sec".into(), s);
            }
            let mut accuracy = None;
            if let Some(rest) = c.name("rest") {
                for nv in NAME_VALUE.captures_iter(rest.as_str()) {
                    let (Some(name), Some(v)) = (nv.name("name"), num::<f64>(nv.name("value")))
                    else {
                        continue;
                    };
                    if matches!(name.as_str(), "accuracy" | "acc") {
                        accuracy = Some(v);
                    }
                    metrics.insert(name.as_str().to_string(), v);
                }
            }
            return Some(ProgressLine {
                kind: LineKind::Speedometer,
                epoch: num(c.name("epoch")),
                iteration: None,
                batch,
                accuracy,
                metrics,
            });
        }
        if let Some(c) = EPOCH_END.captures(line) {
            let set = c.name("set").map_or("", |m| m.as_str());
            let name = c.name("name").map_or("", |m| m.as_str());
            let value: Option<f64> = num(c.name("value"));
            let mut metrics = BTreeMap::new();
            if let Some(v) = value {
                metrics.insert(format!("{}-{name}", set.to_ascii_lowercase()), v);
            }
            let accuracy = (set == "Validation" && matches!(name, "accuracy" | "acc"))
                .then_some(value)
                .flatten();
            return Some(ProgressLine {
                kind: LineKind::EpochEnd,
                epoch: num(c.name("epoch")),
                iteration: None,
                batch: None,
                accuracy,
                metrics,
            });
        }
        None
    }
}

fn parse_custom(re: &Regex, line: &str) -> Option<ProgressLine> {
    let c = re.captures(line)?;
    let mut p = ProgressLine {
        kind: LineKind::Custom,
        epoch: None,
        iteration: None,
        batch: None,
        accuracy: None,
        metrics: BTreeMap::new(),
    };
    for name in re.capture_names().flatten() {
        let m = c.name(name);
        match name {
            "epoch" => p.epoch = num(m),
            "iteration" => p.iteration = num(m).or(p.iteration),
            "step" => p.iteration = p.iteration.or(num(m)),
            "accuracy" => p.accuracy = num(m),
            other => {
                if let Some(v) = num::<f64>(m) {
                    p.metrics.insert(other.to_string(), v);
                }
            }
        }
    }
    // a match that says nothing is no progress
    (p.epoch.is_some() || p.iteration.is_some() || p.accuracy.is_some() || !p.metrics.is_empty())
        .then_some(p)
}

fn num<T: std::str::FromStr>(m: Option<regex::Match<'_>>) -> Option<T> {
    m.and_then(|m| m.as_str().trim().parse().ok())
}

/// Most metrics kept per node (further names are dropped; known ones still update).
pub const MAX_METRICS: usize = 32;
/// Longest metric name kept, in bytes.
pub const MAX_METRIC_NAME: usize = 64;

/// The progress of one container: feeds lines (or HTTP heartbeats) through a parser and
/// keeps the latest [`Progress`].
#[derive(Clone, Debug)]
pub struct ProgressTracker {
    parser: ProgressParser,
    current: Option<Progress>,
    speedo_epoch: Option<u64>,
    speedo_base: u64,
    speedo_max_batch: u64,
}

impl ProgressTracker {
    /// A tracker with no progress yet.
    pub fn new(parser: ProgressParser) -> ProgressTracker {
        ProgressTracker {
            parser,
            current: None,
            speedo_epoch: None,
            speedo_base: 0,
            speedo_max_batch: 0,
        }
    }

    /// The parser in use.
    pub fn parser(&self) -> &ProgressParser {
        &self.parser
    }

    /// Replaces the parser (the job's regex changed); progress so far is kept.
    pub fn set_parser(&mut self, parser: ProgressParser) {
        self.parser = parser;
    }

    /// The latest progress.
    pub fn progress(&self) -> Option<&Progress> {
        self.current.as_ref()
    }

    /// Feeds one output line seen at `at_ms`; true when it changed the progress.
    pub fn observe(&mut self, line: &str, at_ms: i64) -> bool {
        if self.parser.is_finished_line(line) && !self.current.as_ref().is_some_and(|p| p.finished)
        {
            let mut p = self.current.take().unwrap_or_default();
            p.finished = true;
            p.observed_at_ms = at_ms;
            self.current = Some(p);
            return true;
        }
        let Some(p) = self.parser.parse(line) else {
            return false;
        };
        let iteration = match p.kind {
            LineKind::Speedometer => p.batch.map(|b| self.speedometer_iteration(p.epoch, b)),
            _ => p.iteration,
        };
        self.merge(p.epoch, iteration, p.accuracy, p.metrics, at_ms);
        true
    }

    /// Merges a node's own report (HTTP heartbeat) at `at_ms`. The accuracy is taken from
    /// metric `accuracy` (or `acc`) when present. Returns how many of `metrics` were not
    /// kept (over [`MAX_METRICS`] names, names over [`MAX_METRIC_NAME`] bytes, not finite).
    pub fn report(
        &mut self,
        epoch: Option<u64>,
        iteration: Option<u64>,
        metrics: BTreeMap<String, f64>,
        at_ms: i64,
    ) -> usize {
        let accuracy = metrics
            .get("accuracy")
            .or_else(|| metrics.get("acc"))
            .copied();
        self.merge(epoch, iteration, accuracy, metrics, at_ms)
    }

    fn speedometer_iteration(&mut self, epoch: Option<u64>, batch: u64) -> u64 {
        let e = epoch.unwrap_or(0);
        match self.speedo_epoch {
            Some(prev) if e > prev => {
                self.speedo_base += self.speedo_max_batch;
                self.speedo_max_batch = 0;
            }
            Some(prev) if e < prev => {
                // training started over in the same container
                self.speedo_base = 0;
                self.speedo_max_batch = 0;
            }
            _ => {}
        }
        self.speedo_epoch = Some(e);
        self.speedo_max_batch = self.speedo_max_batch.max(batch);
        self.speedo_base + batch
    }

    fn merge(
        &mut self,
        epoch: Option<u64>,
        iteration: Option<u64>,
        accuracy: Option<f64>,
        metrics: BTreeMap<String, f64>,
        at_ms: i64,
    ) -> usize {
        let mut p = self.current.take().unwrap_or_default();
        if let Some(e) = epoch {
            p.epoch = e;
        }
        if let Some(i) = iteration {
            p.iteration = i;
        }
        if accuracy.is_some() {
            p.accuracy = accuracy;
        }
        // bounded: a container cannot grow the agent (and its report) without limit
        let mut dropped = 0;
        for (name, value) in metrics {
            if name.len() > MAX_METRIC_NAME || !value.is_finite() {
                dropped += 1;
                continue;
            }
            if p.metrics.len() >= MAX_METRICS && !p.metrics.contains_key(&name) {
                dropped += 1;
                continue;
            }
            p.metrics.insert(name, value);
        }
        p.observed_at_ms = at_ms;
        self.current = Some(p);
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_metrics_are_bounded_in_number_and_name_length() {
        let mut t = ProgressTracker::new(defaults());
        // a flood: many names, long names, non-numbers
        for round in 0..10u64 {
            let mut m = BTreeMap::new();
            for k in 0..100 {
                m.insert(format!("m{round}-{k}"), k as f64);
            }
            m.insert("x".repeat(1000), 1.0);
            m.insert("nan".into(), f64::NAN);
            let dropped = t.report(None, Some(round), m, 1);
            // 102 sent: the first round keeps 32 of the 100, later ones none
            assert_eq!(dropped, if round == 0 { 70 } else { 102 }, "round {round}");
        }
        let p = t.progress().expect("progress");
        assert_eq!(p.metrics.len(), MAX_METRICS);
        assert!(p.metrics.keys().all(|k| k.len() <= MAX_METRIC_NAME));
        assert!(!p.metrics.contains_key("nan"));
        // a known metric still updates once the table is full
        let known = p.metrics.keys().next().cloned().expect("a metric");
        let dropped = t.report(
            None,
            Some(11),
            [(known.clone(), 42.0)].into_iter().collect(),
            2,
        );
        assert_eq!(dropped, 0);
        assert_eq!(t.progress().expect("p").metrics[&known], 42.0);
        assert_eq!(t.progress().expect("p").iteration, 11);
    }

    fn defaults() -> ProgressParser {
        ProgressParser::new(None).expect("defaults")
    }

    #[test]
    fn the_finished_line_marks_the_end_of_training_and_stays() {
        let parser = ProgressParser::with_finished(None, Some(r"^training done after \d+"))
            .expect("compiles");
        assert_eq!(parser.finished(), Some(r"^training done after \d+"));
        let mut t = ProgressTracker::new(parser);
        assert!(t.observe("[Time 1.0][Epoch 0][Iteration 20] Test Acc 0.9", 5));
        assert!(!t.progress().is_some_and(|p| p.finished));
        assert!(t.observe("training done after 20 iterations", 7));
        let p = t.progress().expect("progress");
        assert!(p.finished);
        assert_eq!((p.iteration, p.observed_at_ms), (20, 7));
        // printed again or followed by more lines: still finished
        assert!(!t.observe("training done after 20 iterations", 8));
        t.observe("[Time 2.0][Epoch 0][Iteration 21] Test Acc 0.9", 9);
        assert!(t.progress().is_some_and(|p| p.finished));
        // no finished regex: nothing is a final line
        assert!(!defaults().is_finished_line("training done after 20 iterations"));
        assert!(ProgressParser::with_finished(None, Some("(")).is_err());
    }

    #[test]
    fn geomx_line() {
        let p = defaults()
            .parse("[Time 12.345][Epoch 0][Iteration 17] Test Acc 0.9312")
            .expect("parsed");
        assert_eq!(p.kind, LineKind::GeoMx);
        assert_eq!(p.epoch, Some(0));
        assert_eq!(p.iteration, Some(17));
        assert_eq!(p.accuracy, Some(0.9312));
        assert_eq!(p.metrics.get("time"), Some(&12.345));
        let p = defaults()
            .parse("INFO:root:[Time 1.0][Epoch 3][Iteration 400]")
            .expect("no accuracy is fine");
        assert_eq!(
            (p.epoch, p.iteration, p.accuracy),
            (Some(3), Some(400), None)
        );
        assert!(
            defaults()
                .parse("Start training on 4 workers, my rank is 0.")
                .is_none()
        );
        assert!(defaults().parse("[Epoch 0][Iteration 1]").is_none());
    }

    #[test]
    fn speedometer_lines() {
        let p = defaults()
            .parse("INFO:root:Epoch[1] Batch [100]\tSpeed: 1234.56 samples/sec\taccuracy=0.912000")
            .expect("parsed");
        assert_eq!(p.kind, LineKind::Speedometer);
        assert_eq!(
            (p.epoch, p.batch, p.accuracy),
            (Some(1), Some(100), Some(0.912))
        );
        assert_eq!(p.metrics.get("samples_per_sec"), Some(&1234.56));
        let p = defaults()
            .parse("Epoch[0] Batch [100-200]\tSpeed: 99.00 samples/sec\taccuracy=0.5\tcross-entropy=1.25")
            .expect("auto_reset form");
        assert_eq!(p.batch, Some(200));
        assert_eq!(p.metrics.get("cross-entropy"), Some(&1.25));
        let p = defaults()
            .parse("Epoch[0] Batch [0-50]\tSpeed: 10.0 samples/sec\tacc=0.25")
            .expect("no auto_reset");
        assert_eq!((p.batch, p.accuracy), (Some(50), Some(0.25)));
        let p = defaults()
            .parse("Iter[2] Batch [20]\tSpeed: 10.00 samples/sec")
            .expect("no metric");
        assert_eq!((p.epoch, p.batch, p.accuracy), (Some(2), Some(20), None));
    }

    #[test]
    fn epoch_end_lines() {
        let p = defaults()
            .parse("INFO:root:Epoch[0] Validation-accuracy=0.950000")
            .expect("parsed");
        assert_eq!(p.kind, LineKind::EpochEnd);
        assert_eq!(
            (p.epoch, p.iteration, p.accuracy),
            (Some(0), None, Some(0.95))
        );
        assert_eq!(p.metrics.get("validation-accuracy"), Some(&0.95));
        let p = defaults()
            .parse("Epoch[1] Train-accuracy=0.91")
            .expect("train");
        assert_eq!(p.accuracy, None);
        assert_eq!(p.metrics.get("train-accuracy"), Some(&0.91));
        assert!(defaults().parse("Epoch[1] Time cost=12.3").is_none());
    }

    #[test]
    fn custom_regex_first_with_named_groups() {
        let parser =
            ProgressParser::new(Some(r"step (?P<step>\d+) ep (?P<epoch>\d+) acc (?P<accuracy>[0-9.]+) loss (?P<loss>[0-9.]+)"))
                .expect("compiles");
        let p = parser
            .parse("step 42 ep 1 acc 0.8 loss 0.3")
            .expect("parsed");
        assert_eq!(p.kind, LineKind::Custom);
        assert_eq!(
            (p.epoch, p.iteration, p.accuracy),
            (Some(1), Some(42), Some(0.8))
        );
        assert_eq!(p.metrics.get("loss"), Some(&0.3));
        // defaults still apply to other lines
        assert_eq!(
            parser
                .parse("[Time 1][Epoch 0][Iteration 1] Test Acc 0.1")
                .map(|p| p.kind),
            Some(LineKind::GeoMx)
        );
        assert!(ProgressParser::new(Some("(")).is_err());
        assert!(
            ProgressParser::new(Some("  "))
                .expect("blank")
                .custom()
                .is_none()
        );
    }

    #[test]
    fn tracker_accumulates_speedometer_batches_across_epochs() {
        let mut t = ProgressTracker::new(defaults());
        for (line, want) in [
            (
                "Epoch[0] Batch [50]\tSpeed: 1 samples/sec\taccuracy=0.1",
                50,
            ),
            (
                "Epoch[0] Batch [100]\tSpeed: 1 samples/sec\taccuracy=0.2",
                100,
            ),
            ("Epoch[0] Validation-accuracy=0.3", 100),
            (
                "Epoch[1] Batch [50]\tSpeed: 1 samples/sec\taccuracy=0.4",
                150,
            ),
            (
                "Epoch[1] Batch [100]\tSpeed: 1 samples/sec\taccuracy=0.5",
                200,
            ),
            (
                "Epoch[2] Batch [50]\tSpeed: 1 samples/sec\taccuracy=0.6",
                250,
            ),
        ] {
            assert!(t.observe(line, 1));
            assert_eq!(t.progress().map(|p| p.iteration), Some(want), "{line}");
        }
        let p = t.progress().cloned().unwrap_or_default();
        assert_eq!((p.epoch, p.accuracy), (2, Some(0.6)));
        assert!(!t.observe("nothing here", 2));
    }

    #[test]
    fn tracker_merges_lines_and_reports() {
        let mut t = ProgressTracker::new(defaults());
        assert!(t.progress().is_none());
        t.observe("[Time 1.0][Epoch 0][Iteration 1] Test Acc 0.10", 1000);
        t.observe("[Time 2.0][Epoch 0][Iteration 2] Test Acc 0.20", 2000);
        let p = t.progress().cloned().unwrap_or_default();
        assert_eq!(
            (p.epoch, p.iteration, p.accuracy, p.observed_at_ms),
            (0, 2, Some(0.2), 2000)
        );
        t.report(
            Some(1),
            Some(12),
            [("accuracy".to_string(), 0.9), ("loss".to_string(), 0.3)].into(),
            3000,
        );
        let p = t.progress().cloned().unwrap_or_default();
        assert_eq!(
            (p.epoch, p.iteration, p.accuracy, p.observed_at_ms),
            (1, 12, Some(0.9), 3000)
        );
        assert_eq!(p.metrics.get("loss"), Some(&0.3));
        assert_eq!(p.metrics.get("time"), Some(&2.0));
    }
}
