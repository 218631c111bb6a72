//! Training curves for the dashboard: every training progress (iteration, epoch, test
//! accuracy) the agents report for an active job's nodes, as a time series per node.
//!
//! Agents report only a node's latest progress; [`run_sampler`] looks at the active jobs
//! each time a report changed something and [`Curves::record`] appends a point for every
//! node whose progress is newer than its last point. The series live in memory (they start
//! again empty when the controller restarts) and are bounded: [`MAX_POINTS_PER_NODE`] per
//! node (when full, the older half is thinned to every second point, so a long run keeps
//! its shape), [`MAX_JOBS`] jobs (the one updated longest ago goes first).
//!
//! A job removed (`geomxctl rm`) loses its curves at the sampler's next look.
//!
//! Points carry a sequence number per job, so a client that has seen up to `seq` asks for
//! what came after ([`Curves::since`]; the server-sent events' `Last-Event-ID`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use geomx_proto::v1::Job;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::jobs::Jobs;

/// Most points kept per node.
pub const MAX_POINTS_PER_NODE: usize = 2000;
/// Most jobs whose curves are kept.
pub const MAX_JOBS: usize = 64;
/// Least time between two looks at the active jobs.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// One observation of a node's training.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    /// Sequence number within the job (increasing).
    pub seq: u64,
    /// The node.
    pub node: String,
    /// Its party.
    pub party: String,
    /// The job's attempt.
    pub generation: u32,
    /// When the agent observed it, Unix milliseconds.
    pub t_ms: i64,
    /// Iteration (cumulative).
    pub iteration: u64,
    /// Epoch.
    pub epoch: u64,
    /// Test accuracy, when the node printed one.
    pub accuracy: Option<f64>,
}

#[derive(Debug, Default)]
struct NodeCurve {
    last_observed_ms: i64,
    last_generation: u32,
    points: Vec<Point>,
}

#[derive(Debug, Default)]
struct JobCurves {
    next_seq: u64,
    touched: u64,
    nodes: BTreeMap<String, NodeCurve>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<String, JobCurves>,
    clock: u64,
}

/// The curves of the recent jobs (see the module docs).
#[derive(Debug)]
pub struct Curves {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Default for Curves {
    fn default() -> Self {
        Curves {
            inner: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Curves {
    /// No curves.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes every time a point is recorded.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Appends a point for every node of `job` whose progress is newer than its last one;
    /// returns how many.
    pub fn record(&self, job: &Job) -> usize {
        let mut added = 0;
        {
            let mut inner = self.lock();
            inner.clock += 1;
            let clock = inner.clock;
            if !inner.jobs.contains_key(&job.name) && inner.jobs.len() >= MAX_JOBS {
                let oldest = inner
                    .jobs
                    .iter()
                    .min_by_key(|(_, j)| j.touched)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    inner.jobs.remove(&k);
                }
            }
            let curves = inner.jobs.entry(job.name.clone()).or_default();
            for n in &job.nodes {
                let Some(status) = &n.status else { continue };
                let Some(p) = &status.progress else { continue };
                if p.observed_at_ms <= 0 || (p.iteration == 0 && p.accuracy.is_none()) {
                    continue;
                }
                let curve = curves.nodes.entry(n.name.clone()).or_default();
                let newer = p.observed_at_ms > curve.last_observed_ms
                    || status.generation != curve.last_generation;
                let same_values = curve.points.last().is_some_and(|last| {
                    last.iteration == p.iteration
                        && last.accuracy == p.accuracy
                        && last.generation == status.generation
                });
                if !newer || same_values {
                    continue;
                }
                curve.last_observed_ms = p.observed_at_ms;
                curve.last_generation = status.generation;
                curves.next_seq += 1;
                curve.points.push(Point {
                    seq: curves.next_seq,
                    node: n.name.clone(),
                    party: n.party.clone(),
                    generation: status.generation,
                    t_ms: p.observed_at_ms,
                    iteration: p.iteration,
                    epoch: p.epoch,
                    accuracy: p.accuracy,
                });
                if curve.points.len() > MAX_POINTS_PER_NODE {
                    thin(&mut curve.points);
                }
                added += 1;
            }
            if added > 0 {
                curves.touched = clock;
            }
        }
        if added > 0 {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        added
    }

    /// The points of job `name` after sequence number `after`, oldest first, and the
    /// highest sequence number of the job (`after` when there is nothing new).
    pub fn since(&self, name: &str, after: u64) -> (Vec<Point>, u64) {
        let inner = self.lock();
        let Some(curves) = inner.jobs.get(name) else {
            return (Vec::new(), after);
        };
        let mut points: Vec<Point> = curves
            .nodes
            .values()
            .flat_map(|c| c.points.iter().filter(|p| p.seq > after).cloned())
            .collect();
        points.sort_by_key(|p| p.seq);
        (points, curves.next_seq.max(after))
    }

    /// Forgets job `name`'s curves (the job was removed).
    pub fn forget(&self, name: &str) {
        self.lock().jobs.remove(name);
    }

    /// The jobs with curves.
    pub fn jobs(&self) -> Vec<String> {
        self.lock().jobs.keys().cloned().collect()
    }
}

/// Halves the older half of `points` (keeps every second one), keeping the newer half.
fn thin(points: &mut Vec<Point>) {
    let half = points.len() / 2;
    let mut i = 0;
    points.retain(|_| {
        let keep = i >= half || i % 2 == 0;
        i += 1;
        keep
    });
}

/// Records the active jobs' progress into `curves` each time a report changed something
/// (at most every [`SAMPLE_EVERY`]) until `shutdown`.
pub async fn run_sampler(curves: Arc<Curves>, jobs: Arc<Jobs>, shutdown: CancellationToken) {
    let mut reports = jobs.subscribe_reports();
    let mut changes = jobs.subscribe_changes();
    // the jobs active at the last look: one that ended since gets a last look (the report
    // that ended it may carry its final progress)
    let mut active: Vec<String> = Vec::new();
    loop {
        let now_active = jobs.active_jobs();
        for name in now_active.iter().chain(active.iter()) {
            if let Ok(job) = jobs.get(name) {
                curves.record(&job);
            }
        }
        active = now_active;
        // a removed job's curves go with it (`geomxctl rm`)
        for name in curves.jobs() {
            if jobs
                .get(&name)
                .is_err_and(|s| s.code() == tonic::Code::NotFound)
            {
                curves.forget(&name);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = reports.changed() => if r.is_err() { return },
            c = changes.changed() => if c.is_err() { return },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use geomx_proto::v1::{JobNode, NodeStatus, Progress};

    use super::*;

    /// (node, generation, observed at, iteration, accuracy)
    type Obs<'a> = (&'a str, u32, i64, u64, Option<f64>);

    fn job(nodes: &[Obs<'_>]) -> Job {
        Job {
            name: "j".into(),
            nodes: nodes
                .iter()
                .map(|&(name, generation, at, iteration, accuracy)| JobNode {
                    name: name.into(),
                    role: "worker".into(),
                    party: "p".into(),
                    status: Some(NodeStatus {
                        generation,
                        progress: Some(Progress {
                            iteration,
                            accuracy,
                            observed_at_ms: at,
                            ..Progress::default()
                        }),
                        ..NodeStatus::default()
                    }),
                    ..JobNode::default()
                })
                .collect(),
            ..Job::default()
        }
    }

    #[test]
    fn a_point_per_new_progress_and_none_for_a_repeated_report() {
        let c = Curves::new();
        let mut rx = c.subscribe();
        // (node, generation, observed at, iteration, accuracy)
        let table: &[(&[Obs<'_>], usize)] = &[
            (&[("w0", 1, 0, 0, None)], 0), // nothing observed yet
            (&[("w0", 1, 100, 1, Some(0.1)), ("w1", 1, 0, 0, None)], 1),
            (&[("w0", 1, 100, 1, Some(0.1))], 0), // the same report again
            (&[("w0", 1, 200, 1, Some(0.1))], 0), // newer, same values
            (&[("w0", 1, 300, 2, Some(0.3)), ("w1", 1, 310, 2, None)], 2),
            (&[("w0", 2, 50, 1, Some(0.1))], 1), // restarted: clock of a new run
        ];
        for (i, (nodes, added)) in table.iter().enumerate() {
            assert_eq!(c.record(&job(nodes)), *added, "row {i}");
        }
        assert!(rx.has_changed().unwrap());
        let (all, last) = c.since("j", 0);
        assert_eq!(last, 4);
        let seqs: Vec<u64> = all.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(all[3].generation, 2);
        let (after, last) = c.since("j", 2);
        assert_eq!(
            after
                .iter()
                .map(|p| (p.node.as_str(), p.seq))
                .collect::<Vec<_>>(),
            [("w1", 3), ("w0", 4)]
        );
        assert_eq!(last, 4);
        assert_eq!(c.since("j", 4), (vec![], 4));
        assert_eq!(c.since("other", 7), (vec![], 7));
        rx.mark_unchanged();
        c.forget("j");
        assert_eq!(c.since("j", 0), (vec![], 0));
    }

    #[test]
    fn a_long_run_is_thinned_and_keeps_its_first_and_latest_points() {
        let c = Curves::new();
        for i in 1..=(MAX_POINTS_PER_NODE as u64 * 3) {
            c.record(&job(&[("w0", 1, i as i64, i, None)]));
        }
        let (points, _) = c.since("j", 0);
        assert!(points.len() <= MAX_POINTS_PER_NODE, "{}", points.len());
        assert!(points.len() > MAX_POINTS_PER_NODE / 2);
        assert_eq!(points[0].iteration, 1);
        assert_eq!(
            points.last().map(|p| p.iteration),
            Some(MAX_POINTS_PER_NODE as u64 * 3)
        );
        assert!(points.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn the_number_of_jobs_is_bounded() {
        let c = Curves::new();
        for i in 0..=MAX_JOBS {
            let mut j = job(&[("w0", 1, 10, 1, None)]);
            j.name = format!("j{i}");
            c.record(&j);
        }
        assert_eq!(c.since("j0", 0).0.len(), 0, "the oldest job went");
        assert_eq!(c.since(&format!("j{MAX_JOBS}"), 0).0.len(), 1);
    }
}
