//! Smoke tests: `geomx-bench all --quick` runs every benchmark in reduced form and prints
//! every figure, one test per part (`--only`), so that the lab parts share the lab tests'
//! slots and the CPU-saturating heartbeat part runs alone (.config/nextest.toml). They
//! check that the benchmarks work, not the figures (a debug build on a busy test machine
//! says nothing about performance).
//!
//! Needs the binaries next to the test's geomx-bench (`cargo build --workspace --bins`
//! first, as for the e2e tests) and, for the lab parts (the agents' footprint, data plane,
//! deploy, detection, convergence), root and dockerd; `GEOMX_SKIP_LAB=1` skips those.

use std::path::Path;
use std::process::Command;

fn skip_lab() -> bool {
    std::env::var("GEOMX_SKIP_LAB").is_ok_and(|v| v == "1")
}

/// Runs `geomx-bench all --quick --only PART` and returns its stdout, failing the test
/// when it fails or a line of `expected` is missing.
fn quick(part: &str, expected: &[&str]) -> String {
    let exe = Path::new(env!("CARGO_BIN_EXE_geomx-bench"));
    let dir = exe.parent().expect("geomx-bench has a directory");
    for bin in [
        "geomx-controller",
        "geomx-agent",
        "geomxctl",
        "geomx-psnode",
    ] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: run `cargo build --workspace --bins` before the tests",
            dir.join(bin).display()
        );
    }
    let started = std::time::Instant::now();
    let out = Command::new(exe)
        .args(["all", "--quick", "--only", part])
        .arg("--bin-dir")
        .arg(dir)
        .output()
        .expect("geomx-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "geomx-bench all --quick --only {part} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!(
        "geomx-bench all --quick --only {part} took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    for want in expected {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(want) || l.contains(want)),
            "no line with {want:?} in:\n{stdout}\n{stderr}"
        );
    }
    stdout
}

/// Every figure of the lines starting with one of `prefixes` is a number (a NaN means a
/// step measured nothing).
fn all_numbers(stdout: &str, prefixes: &[&str]) {
    for prefix in prefixes {
        for line in stdout.lines().filter(|l| l.starts_with(prefix)) {
            assert!(
                !line.contains("=NaN") && !line.contains(",NaN") && !line.contains("=-1 "),
                "a figure is missing in {line}"
            );
        }
    }
}

#[test]
fn footprint_prints_every_figure() {
    let mut expected = vec![
        "footprint_binary=geomx-controller size_bytes=",
        "footprint_binary=geomx-agent size_bytes=",
        "footprint_binary=geomxctl size_bytes=",
        "footprint_controller_idle_rss_mb=",
    ];
    if skip_lab() {
        expected.push("footprint_agent_idle_rss_mb=skipped");
    } else {
        expected.extend([
            "footprint_agent_idle_rss_mb=",
            " agent_idle_cpu_pct=",
            " agent_job_rss_mb=",
            " agent_job_cpu_pct=",
            "footprint_agent_rss_25mb_met=",
            " agent_idle_cpu_05pct_met=",
        ]);
    }
    let stdout = quick("footprint", &expected);
    if !skip_lab() {
        all_numbers(&stdout, &["footprint_agent_idle_rss_mb="]);
    }
}

#[test]
fn heartbeats_prints_every_phase_without_errors() {
    let stdout = quick(
        "heartbeats",
        &[
            "heartbeat_nodes=2000 agents=20 phase=health ",
            "heartbeat_nodes=2000 agents=20 phase=nojobs ",
            "heartbeat_nodes=2000 agents=20 phase=paced ",
            "heartbeat_nodes=2000 agents=20 phase=target ",
            "heartbeat_nodes=2000 agents=20 phase=saturated ",
            "heartbeat_nodes=2000 agents=20 phase=summary ",
            "heartbeat_target_nodes=2000 ",
        ],
    );
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

#[test]
fn dataplane_prints_every_backend() {
    if skip_lab() {
        quick("dataplane", &["dataplane_ratio=skipped"]);
        return;
    }
    quick(
        "dataplane",
        &[
            "dataplane_ratio=",
            "overlay_gbps=",
            "dataplane_target_ratio_095_met=",
            "dataplane_lan_hostgw_ratio=",
            "dataplane_wan_wireguard_ratio=",
            "dataplane_lan_wireguard_ratio=",
            "dataplane_lan_vxlan_ratio=",
            "dataplane_wan_vxlan_ratio=",
            "dataplane_wan_target_ratio_095_met=",
        ],
    );
}

#[test]
fn cluster_benchmarks_print_deploy_detection_and_convergence() {
    if skip_lab() {
        quick(
            "cluster",
            &[
                "deploy_ratio=skipped",
                "convergence_join_p50_s=skipped",
                "detection_node_crash_p50_s=skipped",
            ],
        );
        return;
    }
    let stdout = quick(
        "cluster",
        &[
            "deploy_ratio=",
            " geomx_p50_s=",
            " docker_p50_s=",
            " runs=2 ",
            "deploy_breakdown=geomx_p50_ms_from_submit ",
            " running_ms=",
            "deploy_target_ratio_15_met=",
            "detection_node_crash_p50_s=",
            " host_loss_p50_s=",
            " host_loss_minus_grace_p50_s=",
            "detection_node_crash_target_1s_met=",
            " host_loss_target_grace_plus_1s_met=",
            "convergence_join_p50_s=",
            " join_after_register_p50_s=",
            " loss_p50_s=",
            " loss_minus_grace_p50_s=",
            "convergence_join_target_1s_met=",
            " loss_target_grace_plus_1s_met=",
        ],
    );
    all_numbers(
        &stdout,
        &[
            "deploy_ratio=",
            "deploy_breakdown=",
            "detection_node_crash_p50_s=",
            "convergence_join_p50_s=",
        ],
    );
}

#[test]
fn deploy_across_data_centers_prints_its_figures() {
    if skip_lab() {
        quick("geo", &["deploy_geo_ratio=skipped"]);
        return;
    }
    let stdout = quick(
        "geo",
        &[
            "deploy_geo_ratio=",
            " wan=3dc,40ms_one_way ",
            "deploy_geo_breakdown=geomx_p50_ms_from_submit ",
            "deploy_geo_target_ratio_12_met=",
        ],
    );
    all_numbers(&stdout, &["deploy_geo_ratio=", "deploy_geo_breakdown="]);
}
