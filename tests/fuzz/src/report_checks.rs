//! Invariants of the agent's report for any state of its host, checked by the
//! `report_convert` fuzz target and replayed on stable by
//! `agent/daemon/tests/fuzz_regressions.rs` (which includes this file and `report_gen.rs`
//! with `#[path]`, so they may only use `std`, `geomx_agent`, `geomx_runtime`,
//! `geomx_proto` and `prost`).
//!
//! The input is what the report is made of (`report_gen.rs`): the runtime's node statuses,
//! Docker's images, the pulls, the network status, and a budget.
//!
//! * `convert::host_report` never panics and carries every node with its identity, state,
//!   container, address, exit code, restarts, times, progress (counters, accuracy and
//!   metrics bit for bit) and rendezvous as the runtime has them; the last 50 lines of its
//!   log tail, each cut to 1024 bytes on a character boundary, and its error cut to 4096;
//!   the network error cut to 2048; `nodes_known` and `images_known` as known; every image
//!   reference once, sorted, but none the controller would refuse the report for (over 512
//!   bytes, control characters) and at most 4096.
//! * The report survives its wire round trip: decoding its encoding and encoding again
//!   gives the same bytes (NaN included), and `encoded_len` is the encoding's length.
//! * `report::fit` under the budget: the report goes out at most that big, or with every
//!   step that could leave anything out taken; the steps are taken in the order of
//!   `Omission::ALL`, each only while the report was still over the budget, and each
//!   leaves out what it says and nothing else; the report names them (`omitted`,
//!   `full_size_bytes`: the size as built); every node's identity, phase, counters and
//!   addresses, and the host's network state, ports, pulls and capacity are untouched; the
//!   fitted report survives its round trip too.

use geomx_agent::convert::{
    self, MAX_IMAGE_LEN, MAX_IMAGES, MAX_LOG_LINE_LEN, MAX_LOG_TAIL_LINES, MAX_NETWORK_ERROR_LEN,
    MAX_NODE_ERROR_LEN, ReportParts,
};
use geomx_agent::report::{self, Omission};
use geomx_proto::v1::{self, HostReport};
use geomx_runtime::{ImageDetails, NodeStatus};
use prost::Message;

use crate::report_gen::{ReportInput, report_input};

/// Runs every check on `data` (see [`report_input`]).
pub fn check_report(data: &[u8]) {
    let input = report_input(data);
    let parts = ReportParts {
        host: "a",
        applied_revision: input.applied_revision,
        nodes: input.nodes.as_deref(),
        images: input.images.as_deref(),
        pulls: &input.pulls,
        network: v1::NetworkStatus {
            converged: input.network.0,
            routes: input.network.1,
            error: input.network.2.clone(),
            links: Vec::new(),
        },
        agent_version: &input.agent_version,
        listening_ports: input.listening_ports.clone(),
        capacity: input.capacity,
    };
    let built = convert::host_report(&parts);
    check_conversion(&input, &built);
    check_round_trip(&built);
    check_fit(&built, input.budget);
}

/// `cut` is `original` cut to at most `max` bytes on a character boundary, as long as it
/// can be.
fn check_cut(what: &str, original: &str, cut: &str, max: usize) {
    assert!(original.starts_with(cut), "{what}: not a prefix");
    assert!(cut.len() <= max, "{what}: {} bytes", cut.len());
    if original.len() <= max {
        assert_eq!(cut.len(), original.len(), "{what}: cut although short");
    } else {
        // a character is at most 4 bytes: no more than 3 lost beyond the limit
        assert!(
            cut.len() + 3 >= max,
            "{what}: cut to {} of {max}",
            cut.len()
        );
    }
}

fn check_node(i: usize, ours: &NodeStatus, wire: &v1::NodeStatus) {
    let at = format!("node {i} ({}/{})", ours.job, ours.node);
    assert_eq!(wire.job, ours.job, "{at}");
    assert_eq!(wire.node, ours.node, "{at}");
    assert_eq!(wire.generation, ours.generation, "{at}");
    assert_eq!(
        wire.state,
        convert::container_state(ours.state) as i32,
        "{at}"
    );
    assert_eq!(wire.container_id, ours.container_id, "{at}");
    assert_eq!(wire.ip, ours.ip, "{at}");
    assert_eq!(wire.exit_code, ours.exit_code, "{at}");
    assert_eq!(wire.restarts, ours.restarts, "{at}");
    assert_eq!(
        (wire.started_at_ms, wire.finished_at_ms),
        (ours.started_at_ms, ours.finished_at_ms),
        "{at}"
    );
    match (&ours.progress, &wire.progress) {
        (None, None) => {}
        (Some(p), Some(w)) => {
            assert_eq!((w.epoch, w.iteration), (p.epoch, p.iteration), "{at}");
            assert_eq!(
                w.accuracy.map(f64::to_bits),
                p.accuracy.map(f64::to_bits),
                "{at}"
            );
            assert_eq!(w.observed_at_ms, p.observed_at_ms, "{at}");
            assert_eq!(w.finished, p.finished, "{at}");
            let bits = |m: &std::collections::BTreeMap<String, f64>| -> Vec<(String, u64)> {
                m.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect()
            };
            assert_eq!(bits(&w.metrics), bits(&p.metrics), "{at}: metrics");
        }
        (p, w) => panic!("{at}: progress {p:?} became {w:?}"),
    }
    let skip = ours.log_tail.len().saturating_sub(MAX_LOG_TAIL_LINES);
    assert_eq!(wire.log_tail.len(), ours.log_tail.len() - skip, "{at}");
    for (k, (line, cut)) in ours.log_tail[skip..].iter().zip(&wire.log_tail).enumerate() {
        check_cut(&format!("{at}: log line {k}"), line, cut, MAX_LOG_LINE_LEN);
    }
    check_cut(
        &format!("{at}: error"),
        &ours.error,
        &wire.error,
        MAX_NODE_ERROR_LEN,
    );
    match (&ours.rendezvous, &wire.rendezvous) {
        (None, None) => {}
        (Some(r), Some(w)) => {
            assert_eq!(
                (w.complete, w.count, w.expected),
                (r.complete, r.count, r.expected),
                "{at}"
            );
            assert_eq!(w.connected, r.connected, "{at}");
            let regs: Vec<(&str, &str, u32)> = r
                .registered
                .iter()
                .map(|g| (g.role.as_str(), g.ip.as_str(), g.port))
                .collect();
            let wregs: Vec<(&str, &str, u32)> = w
                .registered
                .iter()
                .map(|g| (g.role.as_str(), g.ip.as_str(), g.port))
                .collect();
            assert_eq!(wregs, regs, "{at}");
        }
        (r, w) => panic!("{at}: rendezvous {r:?} became {w:?}"),
    }
}

fn check_conversion(input: &ReportInput, r: &HostReport) {
    assert_eq!(r.host, "a");
    assert_eq!(r.applied_revision, input.applied_revision);
    assert_eq!(r.nodes_known, Some(input.nodes.is_some()));
    let nodes = input.nodes.as_deref().unwrap_or_default();
    assert_eq!(r.nodes.len(), nodes.len());
    for (i, (ours, wire)) in nodes.iter().zip(&r.nodes).enumerate() {
        check_node(i, ours, wire);
    }
    assert_eq!(r.images_known, Some(input.images.is_some()));
    let images = input.images.as_deref().unwrap_or_default();
    // what the controller takes: at most 4096, none it would refuse the report for
    let all = ImageDetails::references(images);
    assert!(r.images.len() <= MAX_IMAGES);
    assert!(
        r.images.windows(2).all(|w| w[0] < w[1]),
        "sorted, once each"
    );
    for i in &r.images {
        assert!(
            i.len() <= MAX_IMAGE_LEN && !i.chars().any(char::is_control),
            "{i:?}"
        );
        assert!(
            all.binary_search(i).is_ok(),
            "{i:?} is no image of the host"
        );
    }
    let takeable = all
        .iter()
        .filter(|i| i.len() <= MAX_IMAGE_LEN && !i.chars().any(char::is_control))
        .count();
    assert_eq!(r.images.len(), takeable.min(MAX_IMAGES), "images left out");
    assert_eq!(r.image_details.len(), images.len());
    for (d, w) in images.iter().zip(&r.image_details) {
        assert_eq!(
            (&w.id, &w.repo_tags, &w.repo_digests, w.size_bytes),
            (&d.id, &d.repo_tags, &d.repo_digests, d.size_bytes)
        );
    }
    assert_eq!(r.pulls.len(), input.pulls.len());
    for (p, w) in input.pulls.iter().zip(&r.pulls) {
        assert_eq!(w.image, p.image);
        assert_eq!(w.state, p.state.as_str());
        assert_eq!((w.bytes_done, w.bytes_total), (p.bytes_done, p.bytes_total));
        assert_eq!(w.error, p.error);
    }
    let net = r.network.as_ref().expect("a report has a network status");
    assert_eq!(
        (net.converged, net.routes),
        (input.network.0, input.network.1)
    );
    check_cut(
        "network error",
        &input.network.2,
        &net.error,
        MAX_NETWORK_ERROR_LEN,
    );
    assert_eq!(r.agent_version, input.agent_version);
    assert_eq!(r.listening_ports, input.listening_ports);
    assert_eq!(
        (r.memory_bytes, r.cpus),
        (input.capacity.memory_bytes, input.capacity.cpus)
    );
    assert!(
        r.omitted.is_empty() && r.full_size_bytes == 0,
        "built degraded"
    );
}

/// The wire round trip: the same bytes again (NaN compares unequal, its bits do not).
fn check_round_trip(r: &HostReport) {
    let bytes = r.encode_to_vec();
    assert_eq!(
        bytes.len(),
        r.encoded_len(),
        "encoded_len is not the length"
    );
    let back = HostReport::decode(bytes.as_slice()).expect("a report decodes");
    assert_eq!(
        back.encode_to_vec(),
        bytes,
        "the round trip changed the report"
    );
}

/// What no step of the fitting may change, as text.
fn kept(r: &HostReport) -> String {
    let mut out = format!(
        "{} rev {} {:?} ports {:?} known {:?} mem {} cpus {} net {:?} pulls {}\n",
        r.host,
        r.applied_revision,
        r.agent_version,
        r.listening_ports,
        r.nodes_known,
        r.memory_bytes,
        r.cpus,
        r.network
            .as_ref()
            .map(|n| (n.converged, n.routes, n.links.len())),
        r.pulls.len(),
    );
    for n in &r.nodes {
        let p = n.progress.as_ref();
        let z = n.rendezvous.as_ref();
        out.push_str(&format!(
            "{:?}/{:?}#{} {} {:?} {:?} {:?} {} {} {} {:?} {:?} {:?} {:?} {:?} {:?}\n",
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
            p.map(|p| (p.epoch, p.iteration)),
            p.and_then(|p| p.accuracy).map(f64::to_bits),
            p.map(|p| (p.observed_at_ms, p.finished)),
            z.map(|z| (z.complete, z.count, z.expected)),
            n.rendezvous.is_some(),
            n.progress.is_some(),
        ));
    }
    out
}

fn check_fit(built: &HostReport, budget: usize) {
    let mut r = built.clone();
    let f = report::fit(&mut r, budget);
    let full = built.encoded_len();
    assert_eq!(f.full_len, full);
    assert_eq!(f.len, r.encoded_len());
    check_round_trip(&r);
    assert_eq!(kept(&r), kept(built), "fitting changed what it must keep");
    // said so
    let names: Vec<&str> = f.omitted.iter().map(|o| o.as_str()).collect();
    assert_eq!(r.omitted, names);
    if f.degraded() {
        assert_eq!(r.full_size_bytes, full as u64);
        assert!(full > budget, "degraded a report within its budget");
    } else {
        assert_eq!(r.full_size_bytes, 0);
        assert_eq!(
            r.encode_to_vec(),
            built.encode_to_vec(),
            "a report left complete was changed"
        );
    }
    // in order, once each
    assert!(f.omitted.windows(2).all(|w| w[0] < w[1]), "{:?}", f.omitted);
    // under the budget, or nothing left to leave out
    if f.len > budget {
        for step in Omission::ALL {
            assert!(
                !step.apply(&mut r.clone()),
                "{} bytes over a budget of {budget}, and {step} not taken",
                f.len
            );
        }
    }
    // each step was needed: replaying the ones before it leaves the report over the budget
    let mut replay = built.clone();
    for (k, step) in f.omitted.iter().enumerate() {
        assert!(
            replay.encoded_len() > budget,
            "{step} taken at {} bytes, within a budget of {budget}",
            replay.encoded_len()
        );
        assert!(
            step.apply(&mut replay),
            "{step} taken without leaving anything out"
        );
        replay.omitted = names[..=k].iter().map(|s| (*s).to_owned()).collect();
        replay.full_size_bytes = full as u64;
    }
    assert_eq!(
        replay.encode_to_vec(),
        r.encode_to_vec(),
        "the steps' replay differs"
    );
    // each step left out what it says, and the steps not taken nothing
    check_steps(built, &r, &f.omitted);
}

fn check_steps(built: &HostReport, r: &HostReport, omitted: &[Omission]) {
    let has = |o: Omission| omitted.contains(&o);
    for (b, n) in built.nodes.iter().zip(&r.nodes) {
        let metrics = |n: &v1::NodeStatus| n.progress.as_ref().map(|p| p.metrics.len());
        if has(Omission::Metrics) {
            assert!(metrics(n).is_none_or(|m| m == 0));
        } else {
            assert_eq!(
                n.progress.as_ref().map(|p| p.encode_to_vec()),
                b.progress.as_ref().map(|p| p.encode_to_vec())
            );
        }
        if has(Omission::LogTails) {
            assert!(n.log_tail.is_empty());
        } else {
            assert_eq!(n.log_tail, b.log_tail);
        }
        let lists = |n: &v1::NodeStatus| {
            n.rendezvous
                .as_ref()
                .map(|z| (z.registered.clone(), z.connected.clone()))
        };
        if has(Omission::RendezvousLists) {
            assert!(
                lists(n).is_none_or(|(g, c)| g.is_empty() && c.is_empty()),
                "rendezvous lists left"
            );
        } else {
            assert_eq!(lists(n), lists(b));
        }
        if has(Omission::Errors) {
            check_cut("error", &b.error, &n.error, report::SHORT_ERROR_LEN);
        } else {
            assert_eq!(n.error, b.error);
        }
    }
    if has(Omission::ImageDetails) || has(Omission::Images) {
        assert!(r.image_details.is_empty());
    } else {
        assert_eq!(r.image_details, built.image_details);
    }
    if has(Omission::Images) {
        assert!(r.images.is_empty());
        assert_eq!(r.images_known, Some(false));
    } else {
        assert_eq!(r.images, built.images);
        assert_eq!(r.images_known, built.images_known);
    }
    let net_error = |r: &HostReport| {
        r.network
            .as_ref()
            .map(|n| n.error.clone())
            .unwrap_or_default()
    };
    let pull_errors =
        |r: &HostReport| -> Vec<String> { r.pulls.iter().map(|p| p.error.clone()).collect() };
    if has(Omission::Errors) {
        check_cut(
            "network error",
            &net_error(built),
            &net_error(r),
            report::SHORT_ERROR_LEN,
        );
        for (b, p) in pull_errors(built).iter().zip(pull_errors(r)) {
            check_cut("pull error", b, &p, report::SHORT_ERROR_LEN);
        }
    } else {
        assert_eq!(net_error(r), net_error(built));
        assert_eq!(pull_errors(r), pull_errors(built));
    }
}
