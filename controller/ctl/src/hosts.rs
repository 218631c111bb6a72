//! `geomxctl hosts`: the hosts the controller knows, live or lost.
//!
//! Table columns: NAME, UNDERLAY IP, SUBNET, STATE, HEARTBEAT (age, e.g. "1.2s ago"),
//! AGENT VERSION; `--wide` adds NETWORK, CONTAINERS and AGENT URL. `--output json` prints
//! `{"hosts": [...]}` with every field.

use std::process::ExitCode;

use geomx_proto::v1::{Host, ListHostsRequest};
use serde::Serialize;

use crate::client::{ConnectOptions, connect, runtime};
use crate::table::Table;
use crate::{Cli, Output};

/// Arguments of `geomxctl hosts`.
#[derive(Debug, clap::Args)]
pub struct HostsArgs {
    /// Table output: also show network state, container count and agent URL.
    #[arg(long)]
    pub wide: bool,
}

/// A host in `--output json`.
#[derive(Debug, Serialize)]
struct HostJson<'a> {
    name: &'a str,
    underlay_ip: &'a str,
    subnet: &'a str,
    state: &'a str,
    heartbeat_age_ms: u64,
    agent_version: &'a str,
    network_converged: bool,
    containers: u32,
    agent_url: &'a str,
    registered_at_ms: i64,
    images: &'a [String],
}

/// Runs `geomxctl hosts`.
pub fn run(args: &HostsArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_cli(cli);
    let hosts = runtime()?.block_on(async {
        let remote = connect(&opts).await?;
        remote
            .hosts()
            .list_hosts(ListHostsRequest {})
            .await
            .map(|r| r.into_inner().hosts)
            .map_err(|s| remote.explain("listing hosts", s))
    })?;
    match cli.output {
        Output::Json => {
            let hosts: Vec<HostJson<'_>> = hosts.iter().map(host_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "hosts": hosts }))?
            );
        }
        Output::Table => print!("{}", render(&hosts, args.wide)),
    }
    Ok(ExitCode::SUCCESS)
}

fn host_json(h: &Host) -> HostJson<'_> {
    HostJson {
        name: &h.name,
        underlay_ip: &h.underlay_ip,
        subnet: &h.subnet,
        state: &h.state,
        heartbeat_age_ms: h.heartbeat_age_ms,
        agent_version: &h.agent_version,
        network_converged: h.network_converged,
        containers: h.containers,
        agent_url: &h.agent_url,
        registered_at_ms: h.registered_at_ms,
        images: &h.images,
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// The hosts as an aligned table.
fn render(hosts: &[Host], wide: bool) -> String {
    if hosts.is_empty() {
        return "no hosts registered\n".to_owned();
    }
    let mut headers = vec![
        "NAME",
        "UNDERLAY IP",
        "SUBNET",
        "STATE",
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
            format_age(h.heartbeat_age_ms),
            dash(&h.agent_version),
        ];
        if wide {
            row.push(
                if h.network_converged {
                    "converged"
                } else {
                    "pending"
                }
                .to_owned(),
            );
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
        assert!(render(&hosts, true).contains("AGENT URL"));
        assert_eq!(render(&[], false), "no hosts registered\n");
    }
}
