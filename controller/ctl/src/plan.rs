//! `geomxctl plan`: validate a job file and print the nodes it compiles to, without deploying.
//!
//! `--output table` (default) prints a summary and one row per node (`--wide` adds every
//! node's full command, environment and the schedulers it reaches); `--output json` prints
//! the plan as one JSON object (`{"job", "mode", "network", "policy", "progress", "nodes"}`).
//! An invalid file prints every problem (`FILE:LINE:COL: message`) and exits with code 2;
//! with `--output json` the problems are printed as `{"file", "errors": [...]}`.
//!
//! Connected to a controller (`--controller` or GEOMX_CONTROLLER given), a valid HiPS plan is
//! also checked against the links the agents measured: a warning on standard error when the
//! central party's host is much farther from the parties' hosts than another ready host would
//! be ([`crate::placement`]). Standard output is the same as offline; an unreachable
//! controller only adds a note on standard error.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use geomx_job::{JobErrors, Node, Plan, Role};
use geomx_proto::v1::Host;

use crate::client::{ConnectOptions, runtime};
use crate::placement::{CentralWarning, Rtts, central_warning};
use crate::table::{Table, shell_join};
use crate::{Cli, Output};

/// Exit code for an invalid job file.
const REFUSED: u8 = 2;

/// Arguments of `geomxctl plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The job file (TOML); `-` reads standard input.
    pub file: PathBuf,
    /// Table output: also print every node's full command, environment and the schedulers
    /// it reaches.
    #[arg(long)]
    pub wide: bool,
}

/// Runs `geomxctl plan`.
pub fn run(args: &PlanArgs, cli: &Cli) -> anyhow::Result<ExitCode> {
    let output = cli.output;
    let name = args.file.display().to_string();
    let src = if name == "-" {
        let mut src = String::new();
        std::io::stdin()
            .read_to_string(&mut src)
            .context("reading the job file from standard input")?;
        src
    } else {
        match std::fs::read_to_string(&args.file) {
            Ok(src) => src,
            Err(e) => {
                eprintln!("error: cannot read job file {name}: {e}");
                return Ok(ExitCode::from(REFUSED));
            }
        }
    };
    let file = if name == "-" {
        "<stdin>"
    } else {
        name.as_str()
    };
    match geomx_job::plan(file, &src) {
        Ok(plan) => {
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&plan).context("serializing the plan")?
                ),
                Output::Table => print!("{}", render_plan(&plan, args.wide)),
            }
            if cli.controller_given {
                match measured_hosts(cli) {
                    Ok(hosts) => {
                        if let Some(w) = placement_warning(&plan, &hosts) {
                            eprintln!("warning: {w}");
                        }
                    }
                    Err(e) => eprintln!(
                        "note: the central party's placement was not checked against measured links: {e:#}"
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "file": file,
                        "errors": errors.errors(),
                    }))
                    .context("serializing the errors")?
                ),
                Output::Table => eprint!("{}", render_errors(file, &errors)),
            }
            Ok(ExitCode::from(REFUSED))
        }
    }
}

/// The hosts the controller knows, with their measured links (within a few seconds).
fn measured_hosts(cli: &Cli) -> anyhow::Result<Vec<Host>> {
    let opts = ConnectOptions::from_cli(cli);
    runtime()?.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), crate::hosts::list(&opts))
            .await
            .map_err(|_| anyhow::anyhow!("the controller did not answer within 5s"))?
    })
}

/// The central party's placement judged by `hosts`' measured links: the central host is
/// the global scheduler's, the parties' hosts those of every other party's nodes, and the
/// candidates every ready, uncordoned host.
fn placement_warning(plan: &Plan, hosts: &[Host]) -> Option<CentralWarning> {
    let scheduler = plan
        .nodes
        .iter()
        .find(|n| n.role == Role::GlobalScheduler)?;
    let parties: std::collections::BTreeSet<&str> = plan
        .nodes
        .iter()
        .filter(|n| n.party != scheduler.party)
        .map(|n| n.host.as_str())
        .collect();
    let mut rtts = Rtts::default();
    for h in hosts {
        for l in &h.links {
            rtts.insert(&h.name, &l.peer, l.rtt_ms);
        }
    }
    let candidates = hosts
        .iter()
        .filter(|h| h.state == "ready" && !h.cordoned)
        .map(|h| h.name.as_str());
    central_warning(&rtts, &scheduler.host, parties, candidates)
}

/// Every problem, one per line, then a count.
fn render_errors(file: &str, errors: &JobErrors) -> String {
    let mut out = String::new();
    for e in errors.errors() {
        out.push_str(&format!("error: {e}\n"));
    }
    let n = errors.len();
    out.push_str(&format!(
        "{file}: {n} problem{} found, nothing planned\n",
        if n == 1 { "" } else { "s" }
    ));
    out
}

/// Variables shown in the COUNTS column, with their short names.
const COUNTS: [(&str, &str); 6] = [
    ("DMLC_NUM_SERVER", "srv"),
    ("DMLC_NUM_WORKER", "wrk"),
    ("DMLC_NUM_GLOBAL_SERVER", "gsrv"),
    ("DMLC_NUM_GLOBAL_WORKER", "gwrk"),
    ("DMLC_NUM_ALL_WORKER", "all"),
    ("DMLC_ENABLE_CENTRAL_WORKER", "central"),
];

/// Variables every plan computes; the rest are "extra" (from `[env]`).
fn is_computed(var: &str) -> bool {
    geomx_job::COMPUTED_VARIABLES.contains(&var)
}

fn counts(node: &Node) -> String {
    let mut parts: Vec<String> = COUNTS
        .iter()
        .filter_map(|(var, short)| node.env.get(*var).map(|v| format!("{short}={v}")))
        .collect();
    let extra = node.env.keys().filter(|k| !is_computed(k)).count();
    if extra > 0 {
        parts.push(format!("+{extra} env"));
    }
    parts.join(" ")
}

fn dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".to_string())
}

/// The table view of a plan.
fn render_plan(plan: &Plan, wide: bool) -> String {
    let hosts: Vec<&str> = plan.hosts().into_iter().collect();
    let p = &plan.policy;
    let mut out = format!(
        "job {}: mode {}, network {}, {} nodes on {} host{} ({})\n",
        plan.job,
        plan.mode.as_str(),
        plan.network.as_str(),
        plan.nodes.len(),
        hosts.len(),
        if hosts.len() == 1 { "" } else { "s" },
        hosts.join(", ")
    );
    out.push_str(&format!(
        "policy: restart {}, max_restarts {}, stall_timeout {}, gpus_per_worker {}\n\n",
        p.restart.as_str(),
        p.max_restarts,
        p.stall_timeout_text(),
        p.gpus_per_worker
    ));

    let mut table = Table::new([
        "NAME", "ROLE", "PARTY", "HOST", "BINDS", "SLICE", "COUNTS", "COMMAND",
    ]);
    for n in &plan.nodes {
        table.row([
            n.name.clone(),
            n.role.as_str().to_string(),
            n.party.clone(),
            n.host.clone(),
            dash(n.binds.map(|b| b.to_string())),
            dash(n.slice.map(|s| s.to_string())),
            counts(n),
            shell_join(&n.command),
        ]);
    }
    out.push_str(&table.render());
    out.push_str(
        "\nCOUNTS: srv/wrk = DMLC_NUM_SERVER/DMLC_NUM_WORKER, gsrv/gwrk = DMLC_NUM_GLOBAL_SERVER/\
         DMLC_NUM_GLOBAL_WORKER, all = DMLC_NUM_ALL_WORKER, central = DMLC_ENABLE_CENTRAL_WORKER; \
         +N env = variables from [env]\n",
    );
    if wide {
        for n in &plan.nodes {
            out.push_str(&format!(
                "\n{} ({} on {}, image {})\n",
                n.name,
                n.role.as_str(),
                n.host,
                n.image
            ));
            out.push_str(&format!("  command  {}\n", shell_join(&n.command)));
            let reaches = if n.reaches.is_empty() {
                "-".to_string()
            } else {
                n.reaches.join(", ")
            };
            out.push_str(&format!("  reaches  {reaches}\n"));
            if n.gpus > 0 {
                out.push_str(&format!("  gpus     {}\n", n.gpus));
            }
            for (i, m) in n.mounts.iter().enumerate() {
                let label = if i == 0 { "mounts" } else { "" };
                let mode = if m.readonly { "ro" } else { "rw" };
                out.push_str(&format!(
                    "  {label:<7}  {} {} -> {} ({mode})\n",
                    m.kind.as_str(),
                    m.source,
                    m.target
                ));
            }
            let r = &n.resources;
            let limits: Vec<String> = [
                r.memory.map(|b| format!("memory={b}")),
                r.cpus.map(|c| format!("cpus={}", c.0)),
                r.pids.map(|p| format!("pids={p}")),
                r.shm_size.map(|b| format!("shm_size={b}")),
            ]
            .into_iter()
            .flatten()
            .collect();
            if !limits.is_empty() {
                out.push_str(&format!("  limits   {}\n", limits.join(" ")));
            }
            for (i, (k, v)) in n.env.iter().enumerate() {
                let label = if i == 0 { "env" } else { "" };
                out.push_str(&format!("  {label:<7}  {k}={v}\n"));
            }
        }
    } else {
        out.push_str("(--wide prints every node's full environment)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> String {
        let path = format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn table_shows_every_node_with_counts() {
        let plan = geomx_job::plan("p", &example("pseudo-hips.toml")).expect("valid");
        let text = render_plan(&plan, false);
        assert!(
            text.starts_with(
                "job pseudo-hips: mode hips, network pseudo, 12 nodes on 1 host (a)\n"
            )
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("global-server-0"))
            .expect("row");
        assert!(
            line.contains("srv=1 wrk=1 gsrv=1 gwrk=2 all=4 central=0"),
            "{line}"
        );
        assert!(line.ends_with(r#"python -c "import mxnet""#), "{line}");
        let worker = text
            .lines()
            .find(|l| l.starts_with("b-worker-1"))
            .expect("row");
        assert!(
            worker.ends_with("python /root/GeoMX/examples/cnn.py --data-slice-idx 3 --cpu"),
            "{worker}"
        );
    }

    #[test]
    fn wide_prints_full_env() {
        let plan = geomx_job::plan("h", &example("hips.toml")).expect("valid");
        let text = render_plan(&plan, true);
        assert!(text.contains("  env      DMLC_INTERFACE=eth0\n"), "{text}");
        assert!(
            text.contains("DMLC_PS_ROOT_URI={{a-scheduler.ip}}"),
            "{text}"
        );
        assert!(
            text.contains("  reaches  global-scheduler, a-scheduler\n"),
            "{text}"
        );
    }

    #[test]
    fn exit_codes() {
        let dir = format!("{}/../..", env!("CARGO_MANIFEST_DIR"));
        let args = |file: &str| PlanArgs {
            file: PathBuf::from(format!("{dir}/{file}")),
            wide: false,
        };
        let ok = run(&args("examples/mxnet-ps.toml"), &cli(Output::Json)).expect("runs");
        assert_eq!(ok, ExitCode::SUCCESS);
        let invalid = run(
            &args("controller/job/tests/invalid/01-hips-party-two-servers.toml"),
            &cli(Output::Table),
        )
        .expect("runs");
        assert_eq!(invalid, ExitCode::from(REFUSED));
        let missing = run(&args("no-such-job.toml"), &cli(Output::Table)).expect("runs");
        assert_eq!(missing, ExitCode::from(REFUSED));
    }

    /// A command line without `--controller`: the offline plan.
    fn cli(output: Output) -> Cli {
        use clap::Parser;
        let mut c = Cli::try_parse_from(["geomxctl", "plan", "x.toml"]).expect("parses");
        c.output = output;
        assert!(!c.controller_given);
        c
    }

    fn host(name: &str, links: &[(&str, f64)]) -> Host {
        Host {
            name: name.into(),
            state: "ready".into(),
            links: links
                .iter()
                .map(|(peer, rtt_ms)| geomx_proto::v1::PeerLink {
                    peer: (*peer).into(),
                    backend: "wireguard".into(),
                    rtt_ms: *rtt_ms,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_central_party_is_judged_by_the_measured_links() {
        // examples/hips.toml: the central party on a, parties on b and c; d sits beside b
        // and c (a is across an ocean)
        let plan = geomx_job::plan("h", &example("hips.toml")).expect("valid");
        let far = vec![
            host("a", &[("b", 80.0), ("c", 80.0), ("d", 80.0)]),
            host("b", &[("a", 80.0), ("c", 20.0), ("d", 5.0)]),
            host("c", &[("a", 80.0), ("b", 20.0), ("d", 5.0)]),
            host("d", &[("a", 80.0), ("b", 5.0), ("c", 5.0)]),
        ];
        let w = placement_warning(&plan, &far).expect("warns");
        assert_eq!(w.central.host, "a");
        assert_eq!(w.better.host, "d");
        assert_eq!(w.parties, ["b", "c"]);
        let text = w.to_string();
        assert!(text.contains("host a") && text.contains("host d"), "{text}");
        assert!(text.contains("sum 160.0 ms, max 80.0 ms from a"), "{text}");
        assert!(text.contains("sum 10.0 ms, max 5.0 ms from d"), "{text}");

        // d cordoned, and b, c each 20 ms from the other: a (80 ms) is still much farther
        // than b (0 + 20)
        let mut cordoned = far.clone();
        cordoned[3].cordoned = true;
        assert_eq!(
            placement_warning(&plan, &cordoned).map(|w| w.better.host),
            Some("b".to_owned())
        );
        // every data center 40 ms from every other: no host is much nearer
        let even = vec![
            host("a", &[("b", 40.0), ("c", 40.0)]),
            host("b", &[("a", 40.0), ("c", 40.0)]),
            host("c", &[("a", 40.0), ("b", 40.0)]),
        ];
        assert_eq!(placement_warning(&plan, &even), None);
        // nothing measured yet (a controller whose agents just started), or a ps job
        let fresh: Vec<Host> = ["a", "b", "c"].iter().map(|h| host(h, &[])).collect();
        assert_eq!(placement_warning(&plan, &fresh), None);
        let ps = geomx_job::plan("p", &example("mxnet-ps.toml")).expect("valid");
        assert_eq!(placement_warning(&ps, &far), None);
    }

    #[test]
    fn errors_are_listed_with_a_count() {
        let errors = geomx_job::parse("bad.toml", "name = \"X\"\nmode = \"ps\"\nimage = \"i\"\n")
            .expect_err("invalid");
        let text = render_errors("bad.toml", &errors);
        assert!(
            text.starts_with("error: bad.toml:1:8: job name \"X\""),
            "{text}"
        );
        assert!(
            text.ends_with("bad.toml: 2 problems found, nothing planned\n"),
            "{text}"
        );
    }
}
