//! The controller's Prometheus metrics: one registry, every metric defined here (and
//! documented in docs/operations.md, "Metrics"), served on `web_listen` at `/metrics` (see
//! [`crate::web`]).
//!
//! * Counters move where things happen: [`JobCounters`] in the jobs layer (submissions and
//!   the phase changes of [`crate::jobs::Jobs`]), [`RpcMetrics`] in the agent service
//!   (report and watch latency). They start from zero with the process.
//! * Gauges that describe state (hosts by state, jobs by phase, the training progress of
//!   every active job) are computed from the membership and the jobs at each scrape
//!   ([`ControllerMetrics::render`]), so they are right after a restart and a job's series
//!   go away with the job.
//!
//! Labels are bounded: `state` (3 values), `phase` (8), `party` (the job file's parties) and,
//! for the training gauges only, `job` — series of active jobs only.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::jobs::Jobs;
use crate::jobs::record::{JobMeta, Phase};
use crate::membership::Membership;
use crate::store::HostState;

/// Label of the hosts gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// Label of the jobs gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// Labels of the per-party training gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobPartyLabels {
    job: String,
    party: String,
}

/// Label of the per-job training gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Counters of the jobs layer, moved by [`crate::jobs::Jobs`].
#[derive(Clone, Debug, Default)]
pub struct JobCounters {
    /// `geomx_job_submissions_total`: runs accepted by `SubmitJob`.
    pub submissions: Counter,
    /// `geomx_job_successes_total`: runs that became Succeeded.
    pub successes: Counter,
    /// `geomx_job_failures_total`: runs that became Failed (for good: a failure that
    /// restarts the job counts as a restart).
    pub failures: Counter,
    /// `geomx_job_restarts_total`: whole-job restarts.
    pub restarts: Counter,
    /// `geomx_job_cancellations_total`: runs cancelled by a user.
    pub cancellations: Counter,
}

impl JobCounters {
    /// Counts what changed from `old` to `new` (the same run's metadata before and after a
    /// persisted change).
    pub fn observe(&self, old: &JobMeta, new: &JobMeta) {
        if new.restarts > old.restarts {
            self.restarts.inc_by(u64::from(new.restarts - old.restarts));
        }
        if new.phase == old.phase {
            return;
        }
        match new.phase {
            Phase::Succeeded => self.successes.inc(),
            Phase::Failed => self.failures.inc(),
            Phase::Cancelled => self.cancellations.inc(),
            _ => 0,
        };
    }
}

/// Latency of the agent service, observed by [`crate::agents::AgentApi`].
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    /// `geomx_report_duration_seconds`: handling one agent `Report`.
    pub report_duration: Histogram,
    /// `geomx_watch_send_duration_seconds`: from a revision change to the desired state
    /// handed to a watch stream (building it, and waiting for room in the stream).
    pub watch_send_duration: Histogram,
}

impl Default for RpcMetrics {
    /// Buckets from 0.5 ms to about 8 s, doubling.
    fn default() -> Self {
        let buckets = || exponential_buckets(0.0005, 2.0, 15);
        RpcMetrics {
            report_duration: Histogram::new(buckets()),
            watch_send_duration: Histogram::new(buckets()),
        }
    }
}

/// The controller's registry and the state its gauges are computed from.
pub struct ControllerMetrics {
    registry: Registry,
    membership: Arc<Membership>,
    jobs: Option<Arc<Jobs>>,
    rpc: RpcMetrics,
    hosts: Family<StateLabel, Gauge>,
    jobs_by_phase: Family<PhaseLabel, Gauge>,
    iteration: Family<JobPartyLabels, Gauge>,
    epoch: Family<JobPartyLabels, Gauge>,
    iterations_per_second: Family<JobPartyLabels, FloatGauge>,
    best_accuracy: Family<JobLabel, FloatGauge>,
    /// One scrape at a time: the gauges are refilled, then encoded.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

impl ControllerMetrics {
    /// Registers every metric; the job counters are those of `jobs` (none without the jobs
    /// layer).
    pub fn new(membership: Arc<Membership>, jobs: Option<Arc<Jobs>>) -> ControllerMetrics {
        let mut registry = Registry::default();
        let rpc = RpcMetrics::default();
        let hosts = Family::<StateLabel, Gauge>::default();
        let jobs_by_phase = Family::<PhaseLabel, Gauge>::default();
        let iteration = Family::<JobPartyLabels, Gauge>::default();
        let epoch = Family::<JobPartyLabels, Gauge>::default();
        let iterations_per_second = Family::<JobPartyLabels, FloatGauge>::default();
        let best_accuracy = Family::<JobLabel, FloatGauge>::default();
        registry.register(
            "geomx_hosts",
            "Hosts known to the controller, by state",
            hosts.clone(),
        );
        registry.register(
            "geomx_jobs",
            "Jobs (each name's latest run), by phase",
            jobs_by_phase.clone(),
        );
        let counters = jobs
            .as_ref()
            .map(|j| j.counters().clone())
            .unwrap_or_default();
        for (name, help, counter) in [
            (
                "geomx_job_submissions",
                "Job runs accepted",
                &counters.submissions,
            ),
            (
                "geomx_job_successes",
                "Job runs that succeeded",
                &counters.successes,
            ),
            (
                "geomx_job_failures",
                "Job runs that failed for good (not restarted)",
                &counters.failures,
            ),
            (
                "geomx_job_restarts",
                "Whole-job restarts",
                &counters.restarts,
            ),
            (
                "geomx_job_cancellations",
                "Job runs cancelled by a user",
                &counters.cancellations,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register_with_unit(
            "geomx_report_duration",
            "Time to handle one agent report",
            Unit::Seconds,
            rpc.report_duration.clone(),
        );
        registry.register_with_unit(
            "geomx_watch_send_duration",
            "Time from a revision change to the desired state handed to a watch stream",
            Unit::Seconds,
            rpc.watch_send_duration.clone(),
        );
        registry.register(
            "geomx_job_iteration",
            "Latest training iteration of an active job, per party (highest of its nodes)",
            iteration.clone(),
        );
        registry.register(
            "geomx_job_epoch",
            "Latest training epoch of an active job, per party (highest of its nodes)",
            epoch.clone(),
        );
        registry.register(
            "geomx_job_iterations_per_second",
            "Training iterations per second of an active job over the last minute, per party (fastest of its nodes)",
            iterations_per_second.clone(),
        );
        registry.register(
            "geomx_job_best_accuracy",
            "Best test accuracy (0..1) reported by any node of an active job",
            best_accuracy.clone(),
        );
        ControllerMetrics {
            registry,
            membership,
            jobs,
            rpc,
            hosts,
            jobs_by_phase,
            iteration,
            epoch,
            iterations_per_second,
            best_accuracy,
            scrape: Mutex::new(()),
        }
    }

    /// The latency histograms the agent service observes into.
    pub fn rpc(&self) -> &RpcMetrics {
        &self.rpc
    }

    /// Every metric now, in the Prometheus text format
    /// ([`geomx_proto::exposition::CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let _one = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh();
        geomx_proto::exposition::encode(&self.registry)
    }

    /// Sets the state gauges from the membership and the jobs.
    fn refresh(&self) {
        let hosts = self.membership.hosts();
        for state in [HostState::Ready, HostState::Lost, HostState::Left] {
            let n = hosts.iter().filter(|h| h.record.state == state).count();
            self.hosts
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let Some(jobs) = &self.jobs else {
            return;
        };
        let now = Instant::now();
        let summary = jobs.metrics_summary(now);
        for phase in Phase::ALL {
            let n = summary.phases.iter().filter(|p| **p == phase).count();
            self.jobs_by_phase
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str().to_ascii_lowercase(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.iteration.clear();
        self.epoch.clear();
        self.iterations_per_second.clear();
        self.best_accuracy.clear();
        for t in summary.training {
            let labels = JobPartyLabels {
                job: t.job.clone(),
                party: t.party,
            };
            self.iteration
                .get_or_create(&labels)
                .set(i64::try_from(t.iteration).unwrap_or(i64::MAX));
            self.epoch
                .get_or_create(&labels)
                .set(i64::try_from(t.epoch).unwrap_or(i64::MAX));
            self.iterations_per_second
                .get_or_create(&labels)
                .set(t.iterations_per_s);
            if let Some(a) = t.best_accuracy {
                let g = self.best_accuracy.get_or_create(&JobLabel { job: t.job });
                if a > g.get() {
                    g.set(a);
                }
            }
        }
    }
}

/// What the gauges of the jobs layer are computed from (see [`Jobs::metrics_summary`]).
#[derive(Clone, Debug, Default)]
pub struct JobsSummary {
    /// The phase of each name's latest run.
    pub phases: Vec<Phase>,
    /// The training progress of every party of every active job.
    pub training: Vec<PartyTraining>,
}

/// Training progress of one party of an active job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PartyTraining {
    /// The job.
    pub job: String,
    /// The party.
    pub party: String,
    /// Highest iteration of its nodes.
    pub iteration: u64,
    /// Highest epoch of its nodes.
    pub epoch: u64,
    /// Highest iterations per second of its nodes (over the last minute).
    pub iterations_per_s: f64,
    /// Best accuracy of its nodes, if any printed one.
    pub best_accuracy: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_move_the_right_counters() {
        let c = JobCounters::default();
        let running = JobMeta {
            phase: Phase::Running,
            ..Default::default()
        };
        let restarting = JobMeta {
            phase: Phase::Restarting,
            restarts: 1,
            ..Default::default()
        };
        c.observe(&running, &restarting);
        assert_eq!(c.restarts.get(), 1);
        assert_eq!(c.failures.get(), 0);
        let failed = JobMeta {
            phase: Phase::Failed,
            restarts: 1,
            ..Default::default()
        };
        c.observe(&restarting, &failed);
        c.observe(&failed, &failed);
        assert_eq!((c.restarts.get(), c.failures.get()), (1, 1));
        let succeeded = JobMeta {
            phase: Phase::Succeeded,
            ..Default::default()
        };
        c.observe(&running, &succeeded);
        let cancelled = JobMeta {
            phase: Phase::Cancelled,
            ..Default::default()
        };
        c.observe(&running, &cancelled);
        assert_eq!((c.successes.get(), c.cancellations.get()), (1, 1));
    }
}
