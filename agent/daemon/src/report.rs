//! Keeping a host's report under the controller's message limit.
//!
//! The controller decodes at most [`CONTROLLER_LIMIT`] (4 MiB) per request; a report over it
//! is refused, and a host whose every report is refused is declared lost, failing every job
//! with a node on it. So the agent measures each report (`prost::Message::encoded_len`) and,
//! when it is over [`REPORT_BUDGET`] (3 MiB: room for the gRPC framing and for a report that
//! grew by the next heartbeat), [`fit`] leaves out optional detail in the fixed order of
//! [`Omission::ALL`] until it fits:
//!
//! | step | left out | what stays, what the controller does |
//! |---|---|---|
//! | `metrics` | every node's free-form progress metrics | epoch, iteration, accuracy, finished, observed time |
//! | `image_details` | the images' ids, digests and sizes (`geomxctl images`) | the controller keeps the last it had |
//! | `log_tails` | the last lines of ended nodes | failure events name node, host and exit code, without the lines |
//! | `rendezvous_lists` | the schedulers' registration and connection lists | complete, count, expected |
//! | `images` | the image list (`images_known: false`) | the controller keeps the last list |
//! | `errors` | node, network and pull errors beyond 256 bytes | their first 256 bytes |
//!
//! Every node's identity (job, node, generation), state, container, address, exit code,
//! restarts, times and progress counters always stay, and so do the host's network status,
//! listening ports, pulls and capacity. A step that finds nothing to leave out is skipped;
//! the steps taken are named in the report (`omitted`, with `full_size_bytes`), the
//! controller records a `ReportDegraded` host event when they change, and the agent logs a
//! warning. Pure: no I/O, no clock.

use geomx_proto::v1::HostReport;
use prost::Message;

/// The controller's gRPC decoding limit for every request, reports included (4 MiB: its
/// `server::MAX_DECODING_MESSAGE_SIZE`; a test keeps the two equal).
pub const CONTROLLER_LIMIT: usize = 4 << 20;

/// What the agent keeps a report under (3 MiB): a quarter below [`CONTROLLER_LIMIT`].
pub const REPORT_BUDGET: usize = 3 << 20;

/// How long an error stays in the last step ([`Omission::Errors`]), in bytes.
pub const SHORT_ERROR_LEN: usize = 256;

/// Optional detail a report may leave out, in the order [`fit`] leaves it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Omission {
    /// Every node's free-form metrics.
    Metrics,
    /// The images' ids, digests and sizes.
    ImageDetails,
    /// The last lines of ended nodes.
    LogTails,
    /// The schedulers' registration and connection lists.
    RendezvousLists,
    /// The image list (the report says `images_known: false`).
    Images,
    /// Errors beyond [`SHORT_ERROR_LEN`] bytes.
    Errors,
}

impl Omission {
    /// Every step, in the order [`fit`] takes them.
    pub const ALL: [Omission; 6] = [
        Omission::Metrics,
        Omission::ImageDetails,
        Omission::LogTails,
        Omission::RendezvousLists,
        Omission::Images,
        Omission::Errors,
    ];

    /// The step's name on the wire (`HostReport.omitted`).
    pub fn as_str(self) -> &'static str {
        match self {
            Omission::Metrics => "metrics",
            Omission::ImageDetails => "image_details",
            Omission::LogTails => "log_tails",
            Omission::RendezvousLists => "rendezvous_lists",
            Omission::Images => "images",
            Omission::Errors => "errors",
        }
    }

    /// Leaves this detail out of `r`; false when there was none to leave out.
    pub fn apply(self, r: &mut HostReport) -> bool {
        let mut changed = false;
        match self {
            Omission::Metrics => {
                for p in r.nodes.iter_mut().filter_map(|n| n.progress.as_mut()) {
                    changed |= !p.metrics.is_empty();
                    p.metrics.clear();
                }
            }
            Omission::ImageDetails => {
                changed = !r.image_details.is_empty();
                r.image_details.clear();
            }
            Omission::LogTails => {
                for n in &mut r.nodes {
                    changed |= !n.log_tail.is_empty();
                    n.log_tail.clear();
                }
            }
            Omission::RendezvousLists => {
                for z in r.nodes.iter_mut().filter_map(|n| n.rendezvous.as_mut()) {
                    changed |= !z.registered.is_empty() || !z.connected.is_empty();
                    z.registered.clear();
                    z.connected.clear();
                }
            }
            Omission::Images => {
                // an empty list that is known stays: "no images" is no detail
                if !r.images.is_empty() || !r.image_details.is_empty() {
                    r.images.clear();
                    r.image_details.clear();
                    r.images_known = Some(false);
                    changed = true;
                }
            }
            Omission::Errors => {
                let mut cut = |s: &mut String| {
                    if s.len() > SHORT_ERROR_LEN {
                        *s = truncate(s, SHORT_ERROR_LEN).to_owned();
                        changed = true;
                    }
                };
                for n in &mut r.nodes {
                    cut(&mut n.error);
                }
                if let Some(net) = r.network.as_mut() {
                    cut(&mut net.error);
                }
                for p in &mut r.pulls {
                    cut(&mut p.error);
                }
            }
        }
        changed
    }
}

impl std::fmt::Display for Omission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`fit`] did to a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fitted {
    /// The report's encoded size as built, in bytes.
    pub full_len: usize,
    /// Its encoded size as it goes out (with `omitted` and `full_size_bytes`).
    pub len: usize,
    /// What was left out, in order; empty: the report is complete.
    pub omitted: Vec<Omission>,
}

impl Fitted {
    /// Whether anything was left out.
    pub fn degraded(&self) -> bool {
        !self.omitted.is_empty()
    }

    /// The steps taken, for a log line: `metrics, log_tails`.
    pub fn omitted_list(&self) -> String {
        self.omitted
            .iter()
            .map(|o| o.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Leaves optional detail out of `report`, step by step in the order of [`Omission::ALL`],
/// until its encoded size is at most `budget`, and writes what it left out into the report
/// (`omitted`, `full_size_bytes`; both cleared when nothing was). A report within the budget
/// is left as it is. When even the last step leaves it over the budget, it goes out as
/// small as it can be (every step taken, [`Fitted::len`] says how big).
pub fn fit(report: &mut HostReport, budget: usize) -> Fitted {
    report.omitted.clear();
    report.full_size_bytes = 0;
    let full_len = report.encoded_len();
    let mut len = full_len;
    let mut omitted = Vec::new();
    for step in Omission::ALL {
        if len <= budget {
            break;
        }
        if !step.apply(report) {
            continue;
        }
        omitted.push(step);
        report.omitted.push(step.as_str().to_owned());
        report.full_size_bytes = u64::try_from(full_len).unwrap_or(u64::MAX);
        len = report.encoded_len();
    }
    Fitted {
        full_len,
        len,
        omitted,
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use geomx_proto::v1::{
        ContainerState, ImageInfo, ImagePull, NetworkStatus, NodeStatus, Progress, Registration,
        Rendezvous,
    };

    use super::*;

    /// A report of `nodes` nodes with `metrics` metrics each (names of `name_len` bytes),
    /// every optional detail filled in.
    fn report(nodes: usize, metrics: usize, name_len: usize) -> HostReport {
        HostReport {
            host: "a".into(),
            applied_revision: 9,
            nodes: (0..nodes)
                .map(|i| NodeStatus {
                    job: format!("job-{}", i % 3),
                    node: format!("a-worker-{i}"),
                    generation: 2,
                    state: if i % 4 == 0 {
                        ContainerState::Failed as i32
                    } else {
                        ContainerState::Running as i32
                    },
                    container_id: format!("{i:064x}"),
                    ip: format!("172.17.34.{}", i % 250 + 2),
                    exit_code: (i % 4 == 0).then_some(1),
                    restarts: 0,
                    progress: Some(Progress {
                        epoch: 3,
                        iteration: 1000 + i as u64,
                        accuracy: Some(0.5),
                        observed_at_ms: 77,
                        metrics: (0..metrics)
                            .map(|k| (format!("{k:0>name_len$}"), k as f64))
                            .collect::<BTreeMap<_, _>>(),
                        finished: i % 7 == 0,
                    }),
                    log_tail: (0..20)
                        .map(|k| format!("line {k} {}", "x".repeat(200)))
                        .collect(),
                    error: "e".repeat(1000),
                    started_at_ms: 10,
                    finished_at_ms: 20,
                    rendezvous: (i % 5 == 0).then(|| Rendezvous {
                        registered: (0..256)
                            .map(|k| Registration {
                                role: "worker".into(),
                                ip: format!("172.17.29.{k}"),
                                port: 9000,
                            })
                            .collect(),
                        complete: true,
                        count: 256,
                        expected: 256,
                        connected: (0..256).map(|k| format!("172.17.29.{k}")).collect(),
                    }),
                })
                .collect(),
            images: (0..200)
                .map(|k| format!("registry:5000/image-{k}:latest"))
                .collect(),
            network: Some(NetworkStatus {
                converged: false,
                routes: 2,
                error: "n".repeat(2000),
                links: Vec::new(),
            }),
            agent_version: "0.1.0".into(),
            listening_ports: vec![22, 7947, 7948],
            nodes_known: Some(true),
            images_known: Some(true),
            memory_bytes: 1 << 34,
            cpus: 2,
            image_details: (0..200)
                .map(|k| ImageInfo {
                    id: format!("sha256:{k:064x}"),
                    repo_tags: vec![format!("registry:5000/image-{k}:latest")],
                    repo_digests: vec![format!("registry:5000/image-{k}@sha256:{k:064x}")],
                    size_bytes: 1 << 30,
                })
                .collect(),
            pulls: vec![ImagePull {
                image: "registry:5000/image-0:latest".into(),
                state: "failed".into(),
                error: "p".repeat(500),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// What no step may touch: per node, and of the host.
    fn kept(r: &HostReport) -> (Vec<String>, String) {
        let nodes = r
            .nodes
            .iter()
            .map(|n| {
                let p = n.progress.as_ref();
                let z = n.rendezvous.as_ref();
                format!(
                    "{}/{}#{} state {} {} {} exit {:?} restarts {} {}-{} epoch {:?} iteration {:?} accuracy {:?} at {:?} finished {:?} rendezvous {:?}",
                    n.job,
                    n.node,
                    n.generation,
                    n.state,
                    n.container_id,
                    n.ip,
                    n.exit_code,
                    n.restarts,
                    n.started_at_ms,
                    n.finished_at_ms,
                    p.map(|p| p.epoch),
                    p.map(|p| p.iteration),
                    p.and_then(|p| p.accuracy),
                    p.map(|p| p.observed_at_ms),
                    p.map(|p| p.finished),
                    z.map(|z| (z.complete, z.count, z.expected)),
                )
            })
            .collect();
        let n = r.network.as_ref();
        let host = format!(
            "{} rev {} {} ports {:?} known {:?} mem {} cpus {} converged {:?} routes {:?} pulls {}",
            r.host,
            r.applied_revision,
            r.agent_version,
            r.listening_ports,
            r.nodes_known,
            r.memory_bytes,
            r.cpus,
            n.map(|n| n.converged),
            n.map(|n| n.routes),
            r.pulls.len(),
        );
        (nodes, host)
    }

    #[test]
    fn the_constants_are_the_controllers() {
        assert_eq!(
            CONTROLLER_LIMIT,
            geomx_controller::server::MAX_DECODING_MESSAGE_SIZE
        );
        const { assert!(REPORT_BUDGET <= CONTROLLER_LIMIT * 3 / 4) };
    }

    #[test]
    fn a_report_within_its_budget_is_left_as_it_is() {
        let mut r = report(3, 4, 8);
        let before = r.clone();
        let f = fit(&mut r, REPORT_BUDGET);
        assert_eq!(r, before);
        assert!(!f.degraded());
        assert_eq!(f.full_len, f.len);
        assert_eq!(f.len, r.encoded_len());
        assert!(r.omitted.is_empty());
        assert_eq!(r.full_size_bytes, 0);
        // what an earlier fit wrote is cleared
        let mut again = r.clone();
        again.omitted = vec!["metrics".into()];
        again.full_size_bytes = 5;
        fit(&mut again, REPORT_BUDGET);
        assert_eq!(again, before);
    }

    /// [`report`] without the other details (no log tails, rendezvous, images or long
    /// errors): only the metrics can grow it.
    fn metrics_only(nodes: usize, metrics: usize, name_len: usize) -> HostReport {
        let mut r = report(nodes, metrics, name_len);
        for n in &mut r.nodes {
            n.log_tail.clear();
            n.rendezvous = None;
            n.error = "exit 1".into();
        }
        r.images.clear();
        r.image_details.clear();
        r
    }

    /// Checks one fitted report against the one it was made of: under the budget (or
    /// every step taken), exactly `want` left out and said so, everything else kept.
    fn check(
        label: &str,
        original: &HostReport,
        r: &HostReport,
        f: &Fitted,
        budget: usize,
        want: &[Omission],
    ) {
        use Omission::*;
        assert_eq!(f.omitted, want, "{label}: {f:?}");
        assert_eq!(f.full_len, original.encoded_len(), "{label}");
        assert_eq!(f.len, r.encoded_len(), "{label}");
        if f.len > budget {
            // over the budget only when nothing is left to leave out
            for step in Omission::ALL {
                assert!(
                    !step.apply(&mut r.clone()),
                    "{label}: {} bytes, {step} not taken",
                    f.len
                );
            }
        }
        assert_eq!(
            kept(r),
            kept(original),
            "{label}: identity, phase or progress changed"
        );
        assert_eq!(r.nodes.len(), original.nodes.len(), "{label}");
        // said so, in the report the controller gets
        let names: Vec<&str> = want.iter().map(|o| o.as_str()).collect();
        assert_eq!(r.omitted, names, "{label}");
        let wire = HostReport::decode(r.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(&wire, r, "{label}");
        if want.is_empty() {
            assert_eq!(r.full_size_bytes, 0, "{label}");
            assert_eq!(r, original, "{label}");
        } else {
            assert_eq!(r.full_size_bytes, f.full_len as u64, "{label}");
            assert!(f.full_len > budget, "{label}");
        }
        // each step did what it says, and the steps not taken did nothing
        let has = |o: Omission| want.contains(&o);
        let metrics = |r: &HostReport| -> Vec<usize> {
            r.nodes
                .iter()
                .map(|n| n.progress.as_ref().map_or(0, |p| p.metrics.len()))
                .collect()
        };
        let tails = |r: &HostReport| -> Vec<Vec<String>> {
            r.nodes.iter().map(|n| n.log_tail.clone()).collect()
        };
        let lists = |r: &HostReport| -> Vec<Option<Rendezvous>> {
            r.nodes.iter().map(|n| n.rendezvous.clone()).collect()
        };
        let errors =
            |r: &HostReport| -> Vec<String> { r.nodes.iter().map(|n| n.error.clone()).collect() };
        if has(Metrics) {
            assert!(metrics(r).iter().all(|m| *m == 0), "{label}");
        } else {
            assert_eq!(metrics(r), metrics(original), "{label}");
        }
        if has(ImageDetails) || has(Images) {
            assert!(r.image_details.is_empty(), "{label}");
        } else {
            assert_eq!(r.image_details, original.image_details, "{label}");
        }
        if has(LogTails) {
            assert!(tails(r).iter().all(Vec::is_empty), "{label}");
        } else {
            assert_eq!(tails(r), tails(original), "{label}");
        }
        if has(RendezvousLists) {
            assert!(
                lists(r)
                    .iter()
                    .flatten()
                    .all(|z| z.registered.is_empty() && z.connected.is_empty()),
                "{label}"
            );
        } else {
            assert_eq!(lists(r), lists(original), "{label}");
        }
        if has(Images) {
            assert!(r.images.is_empty(), "{label}");
            assert_eq!(r.images_known, Some(false), "{label}");
        } else {
            assert_eq!(r.images, original.images, "{label}");
            assert_eq!(r.images_known, original.images_known, "{label}");
        }
        if has(Errors) {
            assert!(
                errors(r).iter().all(|e| e.len() <= SHORT_ERROR_LEN),
                "{label}"
            );
            assert!(
                errors(r)
                    .iter()
                    .zip(errors(original))
                    .all(|(e, o)| o.starts_with(e.as_str())),
                "{label}"
            );
        } else {
            assert_eq!(errors(r), errors(original), "{label}");
        }
        // what goes out fits again as it is
        let mut again = r.clone();
        let f2 = fit(&mut again, budget);
        if f.len <= budget {
            assert!(f2.omitted.is_empty(), "{label}: {f2:?}");
        }
    }

    /// Reports of N nodes × M metrics with long names (the review's flood, bounded by the
    /// runtime at 32 metrics of 64 bytes per node, on many nodes) shrink under the budget
    /// by leaving out the metrics alone, keep every node's identity, phase and progress
    /// counters, and say what they left out.
    #[test]
    fn reports_of_many_nodes_and_metrics_shrink_under_the_budget_and_say_so() {
        use Omission::*;
        // (nodes, metrics per node, name length, budget, the steps expected)
        let table: &[(usize, usize, usize, usize, &[Omission])] = &[
            (1500, 32, 64, REPORT_BUDGET, &[Metrics]),
            (1500, 32, 64, CONTROLLER_LIMIT * 2, &[]),
            (1200, 32, 64, REPORT_BUDGET, &[]),
            (3000, 32, 64, REPORT_BUDGET, &[Metrics]),
            (20_000, 32, 8, REPORT_BUDGET, &[Metrics]),
            (100, 32, 64, 100 << 10, &[Metrics]),
            (100, 1, 1, 100 << 10, &[]),
            // the network's long error cut too; then smaller it does not get
            (10, 32, 64, 2 << 10, &[Metrics, Errors]),
            (10, 32, 64, 1 << 10, &[Metrics, Errors]),
            (0, 0, 0, 1, &[Errors]),
        ];
        for &(nodes, metrics, name_len, budget, want) in table {
            let label =
                format!("{nodes} nodes × {metrics} metrics of {name_len} bytes, budget {budget}");
            let original = metrics_only(nodes, metrics, name_len);
            let mut r = original.clone();
            let f = fit(&mut r, budget);
            eprintln!("{label}: {} → {} bytes, {:?}", f.full_len, f.len, f.omitted);
            check(&label, &original, &r, &f, budget, want);
        }
    }

    /// With every detail present, a budget between the sizes after k and after k+1 steps
    /// takes exactly k+1 steps, in the order of [`Omission::ALL`].
    #[test]
    fn the_steps_are_taken_in_order_and_only_as_far_as_needed() {
        let original = report(100, 32, 64);
        // the size after each prefix of the steps
        let mut sizes = vec![original.encoded_len()];
        let mut r = original.clone();
        for (k, step) in Omission::ALL.iter().enumerate() {
            assert!(step.apply(&mut r), "{step}: nothing to leave out");
            r.omitted.push(step.as_str().to_owned());
            r.full_size_bytes = sizes[0] as u64;
            sizes.push(r.encoded_len());
            assert!(
                sizes[k + 1] < sizes[k],
                "{step} did not shrink the report: {sizes:?}"
            );
        }
        eprintln!("sizes after each step: {sizes:?}");
        for k in 0..Omission::ALL.len() {
            // just enough for k+1 steps, and just not enough for k
            for budget in [sizes[k + 1], (sizes[k] + sizes[k + 1]) / 2, sizes[k] - 1] {
                let mut r = original.clone();
                let f = fit(&mut r, budget);
                check(
                    &format!("budget {budget}"),
                    &original,
                    &r,
                    &f,
                    budget,
                    &Omission::ALL[..=k],
                );
            }
        }
        let mut r = original.clone();
        let f = fit(&mut r, sizes[0]);
        check("the full size", &original, &r, &f, sizes[0], &[]);
    }

    #[test]
    fn a_report_that_cannot_fit_goes_out_as_small_as_it_can() {
        let mut r = report(50, 32, 64);
        let before = kept(&r);
        let f = fit(&mut r, 100);
        assert_eq!(f.omitted, Omission::ALL);
        assert!(f.len > 100);
        assert_eq!(f.len, r.encoded_len());
        assert_eq!(kept(&r), before);
        assert_eq!(
            f.omitted_list(),
            "metrics, image_details, log_tails, rendezvous_lists, images, errors"
        );
        // every error cut on a character boundary
        let mut r = report(1, 0, 0);
        r.nodes[0].error = "é".repeat(300);
        fit(&mut r, 10);
        assert_eq!(r.nodes[0].error.len(), SHORT_ERROR_LEN);
        r.nodes[0].error = format!("x{}", "é".repeat(300));
        fit(&mut r, 10);
        assert_eq!(r.nodes[0].error.len(), SHORT_ERROR_LEN - 1);
    }
}
