//! Replays, on stable, the inputs kept for the `heartbeat_body` fuzz target
//! (`tests/fuzz/regressions/heartbeat_body/`: seeds, and every input that once failed,
//! minimized) with the very checks the target runs (`tests/fuzz/src/heartbeat_checks.rs`,
//! included below). See `tests/fuzz/README.md`.

#[path = "../../../tests/fuzz/src/heartbeat_checks.rs"]
mod heartbeat_checks;
#[path = "../../../tests/fuzz/src/regressions.rs"]
mod regressions;

#[test]
fn heartbeat_body_regressions_pass_the_fuzz_checks() {
    for path in regressions::inputs("heartbeat_body") {
        let data = std::fs::read(&path).expect("read");
        eprintln!("heartbeat_body: {}", path.display());
        heartbeat_checks::check_heartbeat_bodies(&data);
    }
}

/// The review's flood (issue 13): a node posting ever new metric names, long names and
/// numbers that are no numbers keeps at most 32 metrics of at most 64-byte names.
#[test]
fn a_metric_flood_stays_bounded() {
    let mut bodies = Vec::new();
    for round in 0..16 {
        let metrics: Vec<String> = (0..100)
            .map(|k| format!("\"m{round}-{k}\": {k}.5"))
            .chain([format!("\"{}\": 1", "x".repeat(65))])
            .collect();
        bodies.push(format!(
            r#"{{"job": "j", "node": "w0", "step": {round}, "metrics": {{{}}}}}"#,
            metrics.join(", ")
        ));
    }
    heartbeat_checks::check_heartbeat_bodies(bodies.join("\0").as_bytes());
}
