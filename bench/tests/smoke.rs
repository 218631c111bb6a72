//! Smoke test: `geomx-bench all --quick` runs every benchmark in reduced form and prints
//! every figure. It checks that the benchmarks work, not the figures (a debug build on a
//! busy test machine says nothing about performance).
//!
//! Needs the binaries next to the test's geomx-bench (`cargo build --workspace --bins`
//! first, as for the e2e tests) and, for the data-plane part, root and dockerd (a lab);
//! `GEOMX_SKIP_LAB=1` skips that part.

use std::path::Path;
use std::process::Command;

#[test]
fn all_quick_prints_every_figure() {
    let exe = Path::new(env!("CARGO_BIN_EXE_geomx-bench"));
    let dir = exe.parent().expect("geomx-bench has a directory");
    for bin in ["geomx-controller", "geomx-agent"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: run `cargo build --workspace --bins` before the tests",
            dir.join(bin).display()
        );
    }
    let out = Command::new(exe)
        .args(["all", "--quick"])
        .arg("--bin-dir")
        .arg(dir)
        .output()
        .expect("geomx-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "geomx-bench all --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let skip_lab = std::env::var("GEOMX_SKIP_LAB").is_ok_and(|v| v == "1");
    let mut expected = vec![
        "footprint_binary=geomx-controller size_bytes=",
        "footprint_binary=geomx-agent size_bytes=",
        "footprint_binary=geomxctl size_bytes=",
        "footprint_controller_idle_rss_mb=",
        "footprint_agent_idle_rss_mb=not_measured_yet",
        "heartbeat_nodes=2000 agents=20 phase=health ",
        "heartbeat_nodes=2000 agents=20 phase=nojobs ",
        "heartbeat_nodes=2000 agents=20 phase=paced ",
        "heartbeat_nodes=2000 agents=20 phase=target ",
        "heartbeat_nodes=2000 agents=20 phase=saturated ",
        "heartbeat_nodes=2000 agents=20 phase=summary ",
        "heartbeat_target_nodes=2000 ",
    ];
    if skip_lab {
        expected.push("dataplane_ratio=skipped");
    } else {
        expected.extend([
            "dataplane_ratio=",
            "overlay_gbps=",
            "dataplane_target_ratio_095_met=",
        ]);
    }
    for want in expected {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(want) || l.contains(want)),
            "no line with {want:?} in:\n{stdout}\n{stderr}"
        );
    }
    // every heartbeat phase ran without errors and every job kept running
    for line in stdout.lines().filter(|l| l.starts_with("heartbeat_nodes=")) {
        if line.contains("phase=summary") {
            assert!(
                line.contains("jobs=20 jobs_running_after=20 "),
                "jobs did not all keep running: {line}"
            );
        } else {
            assert!(line.contains(" errors=0 "), "errors in {line}");
        }
    }
}
