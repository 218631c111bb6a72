//! Credentials that can be revoked (issue 13, item 4), against the running lab:
//!
//! 1. roles: a `read` token made with `geomxctl certs token` lists but cannot cancel
//!    (permission denied, exit 2), a `submit` token submits and cancels, and its name is in
//!    the job's events and status;
//! 2. the `submit` token revoked in the revocation file is refused within 5 s, by the same
//!    controller process (no restart);
//! 3. an agent's certificate revoked: within 5 s the controller refuses that agent (the
//!    host's `AgentRefused` event, then the host goes lost); renewed with
//!    `geomxctl certs renew` (new serial) and the agent restarted, every host is ready again.
//!
//! Runs last: it leaves the `ci` token and agent c's old certificate revoked.

use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use geomx_e2e::eventually;
use geomx_lab::Cluster;
use serde_json::Value;

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn json_as(c: &Cluster, token: &str, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = c.ctl_as(token, &all)?;
    ensure!(
        out.status.success(),
        "geomxctl {}: {}",
        all.join(" "),
        text(&out)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn host_events(c: &Cluster, host: &str) -> anyhow::Result<Vec<Value>> {
    Ok(c.ctl_json(&["hosts", "events", host])?["events"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn host_state(c: &Cluster, host: &str) -> Option<String> {
    c.hosts()
        .ok()?
        .iter()
        .find(|h| h["name"] == host)
        .map(|h| h["state"].as_str().unwrap_or_default().to_owned())
}

pub fn run(c: &Cluster) -> anyhow::Result<()> {
    let start = Instant::now();
    let controller_pid = c.controller().pid().context("the controller runs")?;

    // (1) a read token and a submit token, made the documented way
    let ro = c.make_token("grafana", "read")?;
    let ci = c.make_token("ci", "submit")?;
    let tokens = std::fs::read_to_string(c.tokens_file())?;
    ensure!(
        !tokens.contains(&ro) && !tokens.contains(&ci),
        "the tokens file holds a secret:\n{tokens}"
    );
    // the controller picks the file up by itself
    eventually("the new tokens accepted", Duration::from_secs(5), || {
        c.ctl_as(&ro, &["jobs"]).ok().filter(|o| o.status.success())
    })?;
    let job = "cred-job";
    let toml = geomx_lab::jobfile::ps_job(
        job,
        &["b", "c"],
        2,
        "PSNODE_INTERVAL = \"200ms\", PSNODE_ITERATIONS = \"100000\"",
        "",
    );
    let dir = c.lab().dir().join("jobs");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("cred-job.toml");
    std::fs::write(&file, toml)?;
    let out = c.ctl_as(&ci, &["submit", "--detach", &file.display().to_string()])?;
    ensure!(out.status.success(), "ci submits: {}", text(&out));

    let jobs = json_as(c, &ro, &["jobs"])?;
    ensure!(
        jobs["jobs"]
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["name"] == job)),
        "the read token lists the job: {jobs}"
    );
    let out = c.ctl_as(&ro, &["cancel", job])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && err.contains("permission denied")
            && err.contains("token \"grafana\" has role read")
            && err.contains("needs role submit"),
        "a read token cancelling: {}",
        text(&out)
    );
    let status = json_as(c, &ro, &["status", job])?;
    ensure!(
        status["phase"] != "Cancelled",
        "the read token's cancel changed the job: {status}"
    );
    let out = c.ctl_as(&ci, &["cancel", job])?;
    ensure!(out.status.success(), "ci cancels: {}", text(&out));
    let status = json_as(c, &ro, &["status", job])?;
    ensure!(
        status["phase"] == "Cancelled"
            && status["submitted_by"] == "ci"
            && status["cancelled_by"] == "ci",
        "who submitted and cancelled: {status}"
    );
    let events = json_as(c, &ro, &["events", job])?;
    let message = |kind: &str| {
        events["events"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["kind"] == kind))
            .and_then(|e| e["message"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    ensure!(
        message("Submitted").contains("by token \"ci\"")
            && message("Cancelled").contains("cancelled by token \"ci\""),
        "the submit token's name in the events: {events}"
    );
    let out = c.ctl(&["events", job])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("by token \"ci\""),
        "geomxctl events shows who: {}",
        text(&out)
    );

    // the cancelled job's containers go before c's agent is cut off
    eventually(
        "the cancelled job's containers removed",
        Duration::from_secs(30),
        || {
            ["b", "c"]
                .iter()
                .all(|h| {
                    c.geomx_containers(h)
                        .is_ok_and(|v| v.iter().all(|n| !n.contains(job)))
                })
                .then_some(())
        },
    )?;

    // (2) the submit token revoked: refused within 5 s, same controller process
    let revocations = c.revocation_file().display().to_string();
    c.ctl_local(&[
        "certs",
        "revoke",
        "--revocation-file",
        &revocations,
        "--token-name",
        "ci",
        "--reason",
        "leaked in a CI log",
    ])?;
    let revoked_at = Instant::now();
    let refusal = eventually("the revoked token refused", Duration::from_secs(5), || {
        let out = c.ctl_as(&ci, &["jobs"]).ok()?;
        (!out.status.success()).then(|| text(&out))
    })?;
    let took = revoked_at.elapsed();
    ensure!(
        refusal.contains("token \"ci\" is revoked") && refusal.contains("Unauthenticated"),
        "the revoked token's refusal: {refusal}"
    );
    ensure!(
        c.controller().pid() == Some(controller_pid),
        "the controller restarted"
    );
    ensure!(
        c.ctl_as(&ro, &["jobs"])?.status.success(),
        "the read token was refused with ci"
    );
    eprintln!("credentials: the revoked token was refused {took:?} after the list changed");

    // (3) agent c's certificate revoked
    let cert = c.pki_dir().join("agent-c.pem");
    let old = c.ctl_local(&["certs", "show", &cert.display().to_string(), "-o", "json"])?;
    let old_serial = serde_json::from_str::<Value>(&old)?["serial"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let old_serial: String = old_serial
        .chars()
        .filter(|ch| *ch != ':')
        .collect::<String>()
        .trim_start_matches('0')
        .to_owned();
    c.ctl_local(&[
        "certs",
        "revoke",
        "--revocation-file",
        &revocations,
        "--cert",
        &cert.display().to_string(),
    ])?;
    let revoked_at = Instant::now();
    let event = eventually(
        "the controller refusing agent c",
        Duration::from_secs(5),
        || {
            host_events(c, "c")
                .ok()?
                .into_iter()
                .find(|e| e["kind"] == "AgentRefused")
        },
    )?;
    let took = revoked_at.elapsed();
    ensure!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains(&old_serial) && m.contains("revoked")),
        "the AgentRefused event: {event}"
    );
    eprintln!("credentials: agent c refused {took:?} after the list changed");
    // silent for the controller now: lost after grace_period; a and b stay ready
    eventually("host c lost", Duration::from_secs(15), || {
        (host_state(c, "c")? == "lost").then_some(())
    })?;
    for h in ["a", "b"] {
        ensure!(
            host_state(c, h).as_deref() == Some("ready"),
            "host {h} is affected by c's revocation"
        );
    }
    ensure!(
        c.controller().pid() == Some(controller_pid),
        "the controller restarted"
    );

    // renewed (same subject and SANs, new serial, key kept) and the agent restarted
    let renewed = c.ctl_local(&[
        "certs",
        "renew",
        "--dir",
        &c.pki_dir().display().to_string(),
        "--cert",
        &cert.display().to_string(),
        "-o",
        "json",
    ])?;
    let renewed: Value = serde_json::from_str(&renewed)?;
    ensure!(
        renewed["old_serial"] == old_serial.as_str() && renewed["serial"] != old_serial.as_str(),
        "renewal: {renewed}"
    );
    c.agent("c").stop(Duration::from_secs(10))?;
    c.start_agent("c")?;
    let names: Vec<String> = c.lab().hosts().iter().map(|h| h.name.clone()).collect();
    c.wait_hosts_ready(&names, Duration::from_secs(60))?;
    ensure!(
        c.controller().pid() == Some(controller_pid),
        "the controller restarted"
    );
    eprintln!("credentials: scenario done in {:?}", start.elapsed());
    Ok(())
}
