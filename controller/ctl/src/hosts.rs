//! `geomxctl hosts`: the hosts the controller knows, live or lost, and their maintenance.
//!
//! Table columns: NAME, UNDERLAY IP, SUBNET, STATE, SCHEDULING (`enabled` or `cordoned`),
//! HEARTBEAT (age, e.g. "1.2s ago"), AGENT VERSION; `--wide` adds NETWORK, CONTAINERS and
//! AGENT URL. `--output json` prints `{"hosts": [...]}` with every field.
//!
//! * `hosts cordon HOST` / `hosts uncordon HOST`: no new job may place a node on it / it
//!   may again; running jobs stay.
//! * `hosts drain HOST [--deadline D]`: cordon, then wait up to `D` (default 1h) for the
//!   jobs with nodes there to end, cancel those still active at the deadline (`0s`: at
//!   once), and wait until the host runs no role container. Progress on stderr.
//! * `hosts remove HOST`: forget a lost or departed host and release its subnet; a ready
//!   host is refused with the reason (exit 2).
//! * `hosts events HOST`: what happened to it, oldest first (also after it was removed).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use geomx_proto::json::{HostJson, host_json, scheduling};
use geomx_proto::v1::{
    CancelJobRequest, GetJobRequest, Host, HostRequest, JobPhase, ListHostsRequest, ListJobsRequest,
};
use serde::Serialize;

use crate::client::{ConnectOptions, Remote, connect, runtime};
use crate::jobs::{is_terminal, phase_name, refused};
use crate::table::Table;
use crate::{Cli, Output};

/// Arguments of `geomxctl hosts`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HostsArgs {
    /// Table output: also show network state, container count and agent URL.
    #[arg(long)]
    pub wide: bool,
    /// Table output: how every host reaches every peer (backend, round trip, loss, WireGuard
    /// handshake age), as the hosts measure it through the data plane.
    #[arg(long)]
    pub links: bool,
    /// Maintenance of one host.
    #[command(subcommand)]
    pub action: Option<HostAction>,
}

/// `geomxctl hosts` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum HostAction {
    /// Take a host out of scheduling: jobs naming it are refused; its running jobs stay.
    Cordon {
        /// The host.
        host: String,
    },
    /// Make a cordoned host schedulable again.
    Uncordon {
        /// The host.
        host: String,
    },
    /// Cordon a host, let its jobs end (cancelling those still active at the deadline),
    /// and wait until it runs no role container.
    Drain {
        /// The host.
        host: String,
        /// How long the jobs with nodes there may run on, e.g. "30m"; "0s" cancels them at
        /// once.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// How long to wait for the host's containers to be gone once its jobs ended.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        empty_timeout: Duration,
    },
    /// Forget a lost or departed host and release its subnet (refused for a ready host).
    Remove {
        /// The host.
        host: String,
    },
    /// What happened to a host, oldest first.
    Events {
        /// The host.
        host: String,
    },
}

/// Runs `geomxctl hosts`.
pub fn run(args: &HostsArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    if let Some(action) = &args.action {
        return run_action(action, cli);
    }
    let opts = ConnectOptions::from_cli(cli);
    let hosts = runtime()?.block_on(list(&opts))?;
    match cli.output {
        Output::Json => {
            let hosts: Vec<HostJson<'_>> = hosts.iter().map(host_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "hosts": hosts }))?
            );
        }
        Output::Table if args.links => print!("{}", render_links(&hosts)),
        Output::Table => print!("{}", render(&hosts, args.wide)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every host the controller knows (`ListHosts`).
pub async fn list(opts: &ConnectOptions) -> anyhow::Result<Vec<Host>> {
    let remote = connect(opts).await?;
    remote
        .hosts()
        .list_hosts(ListHostsRequest {})
        .await
        .map(|r| r.into_inner().hosts)
        .map_err(|s| remote.explain("listing hosts", s))
}

fn print_host(h: &Host, output: Output, message: &str) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&host_json(h))?),
        Output::Table => println!("{message}"),
    }
    Ok(())
}

fn run_action(action: &HostAction, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        match action {
            HostAction::Cordon { host } | HostAction::Uncordon { host } => {
                let cordon = matches!(action, HostAction::Cordon { .. });
                let request = HostRequest { name: host.clone() };
                let reply = if cordon {
                    remote.hosts().cordon_host(request).await
                } else {
                    remote.hosts().uncordon_host(request).await
                };
                let h = match reply {
                    Ok(r) => r.into_inner(),
                    Err(s) => return refused(&remote, "changing the host", s, cli.output),
                };
                let message = if cordon {
                    format!("host {} cordoned: no new job may place a node there; its running jobs stay", h.name)
                } else {
                    format!("host {} uncordoned: schedulable again", h.name)
                };
                print_host(&h, cli.output, &message)?;
                Ok(ExitCode::SUCCESS)
            }
            HostAction::Remove { host } => {
                let h = match remote
                    .hosts()
                    .remove_host(HostRequest { name: host.clone() })
                    .await
                {
                    Ok(r) => r.into_inner(),
                    Err(s) => return refused(&remote, "removing the host", s, cli.output),
                };
                let released = if h.subnet.is_empty() {
                    "it held no subnet".to_owned()
                } else {
                    format!("subnet {} released", h.subnet)
                };
                print_host(
                    &h,
                    cli.output,
                    &format!("host {} ({}) removed; {released}", h.name, h.state),
                )?;
                Ok(ExitCode::SUCCESS)
            }
            HostAction::Drain {
                host,
                deadline,
                empty_timeout,
            } => drain(&remote, host, *deadline, *empty_timeout, cli.output).await,
            HostAction::Events { host } => {
                let events = match remote
                    .hosts()
                    .host_events(HostRequest { name: host.clone() })
                    .await
                {
                    Ok(r) => r.into_inner().events,
                    Err(s) => return refused(&remote, "listing the host's events", s, cli.output),
                };
                match cli.output {
                    Output::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "events": events.iter().map(crate::events::event_json).collect::<Vec<_>>()
                        }))?
                    ),
                    Output::Table => print!("{}", crate::events::render(&events)),
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// The active jobs with nodes on `host`, with their phases.
async fn jobs_on(remote: &Remote, host: &str) -> anyhow::Result<BTreeMap<String, i32>> {
    let jobs = remote
        .jobs()
        .list_jobs(ListJobsRequest {})
        .await
        .map_err(|s| remote.explain("listing jobs", s))?
        .into_inner()
        .jobs;
    let mut on = BTreeMap::new();
    for j in jobs.into_iter().filter(|j| !is_terminal(j.phase)) {
        let Ok(job) = remote
            .jobs()
            .get_job(GetJobRequest {
                name: j.name.clone(),
            })
            .await
        else {
            continue; // ended and replaced meanwhile
        };
        let job = job.into_inner();
        if !is_terminal(job.phase) && job.nodes.iter().any(|n| n.host == host) {
            on.insert(job.name, job.phase);
        }
    }
    Ok(on)
}

async fn host_of(remote: &Remote, host: &str) -> anyhow::Result<Option<Host>> {
    Ok(remote
        .hosts()
        .list_hosts(ListHostsRequest {})
        .await
        .map_err(|s| remote.explain("listing hosts", s))?
        .into_inner()
        .hosts
        .into_iter()
        .find(|h| h.name == host))
}

/// What `geomxctl hosts drain` did, for `--output json`.
#[derive(Debug, Default, Serialize)]
struct DrainJson {
    host: String,
    /// Jobs that ended on their own (name → final phase).
    ended: BTreeMap<String, &'static str>,
    /// Jobs cancelled at the deadline.
    cancelled: Vec<String>,
    /// Role containers the host reported at the end.
    containers: u32,
}

const DRAIN_POLL: Duration = Duration::from_millis(500);

async fn drain(
    remote: &Remote,
    host: &str,
    deadline: Duration,
    empty_timeout: Duration,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let h = match remote
        .hosts()
        .cordon_host(HostRequest {
            name: host.to_owned(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return refused(remote, "cordoning the host", s, output),
    };
    let mut report = DrainJson {
        host: h.name.clone(),
        ..Default::default()
    };
    eprintln!("host {host} cordoned; draining");
    let started = Instant::now();
    let mut tracked: BTreeMap<String, i32> = BTreeMap::new();
    let mut cancelled = false;
    loop {
        let now_on = jobs_on(remote, host).await?;
        let mut changed = false;
        for (name, phase) in &now_on {
            if tracked.insert(name.clone(), *phase) != Some(*phase) {
                eprintln!("  job {name}: {}", phase_name(*phase));
                changed = true;
            }
        }
        let gone: Vec<String> = tracked
            .keys()
            .filter(|n| !now_on.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            tracked.remove(&name);
            if report.cancelled.contains(&name) {
                continue;
            }
            let phase = remote
                .jobs()
                .get_job(GetJobRequest { name: name.clone() })
                .await
                .map_or(JobPhase::Unspecified as i32, |j| j.into_inner().phase);
            eprintln!("  job {name} ended: {}", phase_name(phase));
            report.ended.insert(name, phase_name(phase));
        }
        if now_on.is_empty() {
            break;
        }
        if !cancelled && started.elapsed() >= deadline {
            cancelled = true;
            for name in now_on.keys() {
                eprintln!("  deadline reached: cancelling job {name}");
                remote
                    .jobs()
                    .cancel_job(CancelJobRequest { name: name.clone() })
                    .await
                    .map_err(|s| remote.explain("cancelling a job", s))?;
                report.cancelled.push(name.clone());
            }
            continue;
        }
        if changed {
            eprintln!(
                "  waiting for {} job(s) to end; the rest is cancelled in {}",
                now_on.len(),
                humantime::format_duration(Duration::from_secs(
                    deadline.saturating_sub(started.elapsed()).as_secs()
                ))
            );
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    // the jobs ended: their containers leave the host's desired state; wait until the agent
    // reports none (a host that is not ready cannot report: nothing to wait for)
    let empty_by = Instant::now() + empty_timeout;
    loop {
        let Some(h) = host_of(remote, host).await? else {
            break;
        };
        report.containers = h.containers;
        if h.containers == 0 || h.state != "ready" {
            break;
        }
        if Instant::now() >= empty_by {
            eprintln!(
                "error: host {host} still runs {} role container(s) after {}; see `geomxctl hosts --wide`",
                h.containers,
                humantime::format_duration(empty_timeout)
            );
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => println!(
            "host {host} drained: no active job has nodes there ({} ended, {} cancelled); it stays cordoned",
            report.ended.len(),
            report.cancelled.len()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// The hosts as an aligned table.
/// One row per host and peer: the data plane as each host measures it.
fn render_links(hosts: &[Host]) -> String {
    let mut table = Table::new(vec!["HOST", "PEER", "BACKEND", "RTT", "LOSS", "HANDSHAKE"]);
    let mut rows = 0;
    for h in hosts {
        for l in &h.links {
            rows += 1;
            table.row(vec![
                h.name.clone(),
                l.peer.clone(),
                l.backend.clone(),
                if l.loss_pct >= 100.0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}ms", l.rtt_ms)
                },
                format!("{:.0}%", l.loss_pct),
                if l.handshake_age_s >= 0 {
                    format!("{}s ago", l.handshake_age_s)
                } else {
                    "-".to_owned()
                },
            ]);
        }
    }
    if rows == 0 {
        return "no links measured yet (agents report them every few seconds)\n".to_owned();
    }
    table.render()
}

fn render(hosts: &[Host], wide: bool) -> String {
    if hosts.is_empty() {
        return "no hosts registered\n".to_owned();
    }
    let mut headers = vec![
        "NAME",
        "UNDERLAY IP",
        "SUBNET",
        "STATE",
        "SCHEDULING",
        "HEARTBEAT",
        "AGENT VERSION",
    ];
    if wide {
        headers.extend(["NETWORK", "CONTAINERS", "AGENT URL"]);
    }
    let mut table = Table::new(headers);
    for h in hosts {
        let mut row = vec![
            h.name.clone(),
            dash(&h.underlay_ip),
            dash(&h.subnet),
            h.state.clone(),
            scheduling(h).to_owned(),
            format_age(h.heartbeat_age_ms),
            dash(&h.agent_version),
        ];
        if wide {
            row.push(if h.network_converged {
                "converged".to_owned()
            } else if h.network_error.is_empty() {
                "pending".to_owned()
            } else {
                format!("error: {}", h.network_error)
            });
            row.push(h.containers.to_string());
            row.push(dash(&h.agent_url));
        }
        table.row(row);
    }
    table.render()
}

/// A heartbeat age for people: "0.4s ago", "12.0s ago", "3m07s ago", "2h05m ago", "3d4h ago".
pub fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{:.1}s ago", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s ago", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m ago", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h ago", s / 86_400, (s % 86_400) / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(format_age(0), "0.0s ago");
        assert_eq!(format_age(1234), "1.2s ago");
        assert_eq!(format_age(187_000), "3m07s ago");
        assert_eq!(format_age(7_500_000), "2h05m ago");
        assert_eq!(format_age(3 * 86_400_000 + 4 * 3_600_000), "3d4h ago");
    }

    #[test]
    fn table() {
        let hosts = vec![
            Host {
                name: "a".into(),
                underlay_ip: "10.1.1.1".into(),
                subnet: "172.17.1.0/24".into(),
                state: "ready".into(),
                heartbeat_age_ms: 400,
                agent_version: "0.1.0".into(),
                ..Default::default()
            },
            Host {
                name: "bb".into(),
                underlay_ip: "10.1.1.2".into(),
                state: "left".into(),
                heartbeat_age_ms: 65_000,
                cordoned: true,
                ..Default::default()
            },
        ];
        let out = render(&hosts, false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME  UNDERLAY IP  SUBNET"), "{out}");
        assert!(
            lines[1].contains("172.17.1.0/24") && lines[1].contains("0.4s ago"),
            "{out}"
        );
        assert!(
            lines[2].contains("1m05s ago") && lines[2].contains(" - "),
            "{out}"
        );
        assert!(lines[0].contains("STATE  SCHEDULING  HEARTBEAT"), "{out}");
        assert!(lines[1].contains("ready  enabled"), "{out}");
        assert!(lines[2].contains("left   cordoned"), "{out}");
        let json = serde_json::to_value(host_json(&hosts[1])).unwrap();
        assert_eq!(json["scheduling"], "cordoned");
        assert_eq!(json["cordoned"], true);
        assert!(render(&hosts, true).contains("AGENT URL"));
        assert_eq!(render(&[], false), "no hosts registered\n");
    }
}
