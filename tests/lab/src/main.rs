//! `geomx-lab`: a multi-host lab on one machine (network namespaces, one dockerd per host).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use geomx_lab::{DEFAULT_ROOT, Lab, LabSpec, SEED_HOSTS};

/// Multi-host lab for geomx: hosts as network namespaces on one underlay bridge, one dockerd
/// each. Nothing outside the lab's namespaces is changed.
#[derive(Debug, Parser)]
#[command(name = "geomx-lab", version, about)]
struct Cli {
    /// Lab name (prefix of its namespaces).
    #[arg(long, global = true, default_value = "geomx", env = "GEOMX_LAB_NAME")]
    name: String,
    /// Directory holding labs.
    #[arg(long, global = true, default_value = DEFAULT_ROOT, env = "GEOMX_LAB_ROOT")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a lab of N hosts (a, b, c at the seed addresses 10.1.1.34/.29/.33, then d, e, ...).
    Up {
        /// Number of hosts.
        #[arg(long, default_value_t = 3)]
        hosts: u8,
        /// Hosts without dockerd.
        #[arg(long)]
        no_docker: bool,
    },
    /// Tear the lab down completely.
    Down,
    /// Show the lab's hosts.
    Status,
    /// Run a command inside a host's namespace, e.g. `geomx-lab exec a -- ip route`.
    Exec {
        /// Host name, or "ul" for the underlay namespace.
        host: String,
        /// The command.
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("geomx-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn host_spec(i: u8) -> (String, std::net::Ipv4Addr) {
    if let Some((n, ip)) = SEED_HOSTS.get(i as usize) {
        return (n.to_string(), *ip);
    }
    let name = ((b'a' + i) as char).to_string();
    (name, std::net::Ipv4Addr::new(10, 1, 1, 40 + i))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up { hosts, no_docker } => {
            if hosts == 0 || hosts > 20 {
                bail!("--hosts must be 1..=20");
            }
            let mut spec = LabSpec::new(&cli.name).persistent().docker(!no_docker);
            spec.root = cli.root.clone();
            for i in 0..hosts {
                let (n, ip) = host_spec(i);
                spec = spec.host(&n, ip);
            }
            let lab = Lab::up(spec).context("building the lab")?;
            print_status(&lab);
        }
        Command::Down => {
            let lab = Lab::attach(&cli.root, &cli.name)
                .with_context(|| format!("no lab {} under {}", cli.name, cli.root.display()))?;
            lab.down().context("tearing the lab down")?;
            println!("lab {} is gone", cli.name);
        }
        Command::Status => {
            let lab = Lab::attach(&cli.root, &cli.name)
                .with_context(|| format!("no lab {} under {}", cli.name, cli.root.display()))?;
            print_status(&lab);
        }
        Command::Exec { host, argv } => {
            let lab = Lab::attach(&cli.root, &cli.name)
                .with_context(|| format!("no lab {} under {}", cli.name, cli.root.display()))?;
            let ns = if host == "ul" {
                lab.underlay().clone()
            } else {
                lab.host(&host)?.netns().clone()
            };
            let status = ns
                .command(&argv[0])
                .args(&argv[1..])
                .status()
                .with_context(|| format!("running {}", argv[0]))?;
            if !status.success() {
                bail!("{} exited with {status}", argv[0]);
            }
        }
    }
    Ok(())
}

fn print_status(lab: &Lab) {
    println!("lab {} in {}", lab.name(), lab.dir().display());
    println!(
        "{:<6} {:<14} {:<22} DOCKER_HOST",
        "HOST", "UNDERLAY", "NAMESPACE"
    );
    for h in lab.hosts() {
        let docker = h
            .dockerd()
            .map(|d| {
                if d.pid().is_some() {
                    d.url()
                } else {
                    format!("{} (stopped)", d.url())
                }
            })
            .unwrap_or_else(|_| "-".into());
        println!(
            "{:<6} {:<14} {:<22} {docker}",
            h.name,
            h.underlay_ip.to_string(),
            h.netns().name()
        );
    }
}
