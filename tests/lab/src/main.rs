//! `geomx-lab`: a multi-host geomx cluster on one machine (network namespaces, one dockerd
//! per host, the controller and an agent per host).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use geomx_lab::cluster::{FORWARD_ADDR, forward};
use geomx_lab::{
    Binaries, CONTROLLER_PORT, Cluster, ClusterSpec, DEFAULT_ROOT, Lab, LabSpec, Netns, OUTSIDE_IP,
    SEED_HOSTS,
};

/// Multi-host lab for geomx: hosts as network namespaces on one underlay bridge, one dockerd
/// each, the controller at 10.1.1.1:7946 and an agent on every host. Nothing outside the
/// lab's namespaces is changed; the controller is also reachable on 127.0.0.1:7946.
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
    /// Build a lab of N hosts (a, b, c at the seed addresses 10.1.1.34/.29/.33 with the seed
    /// subnets 172.17.34/29/33.0/24, then d, e, ...) and start geomx on it.
    Up {
        /// Number of hosts.
        #[arg(long, default_value_t = 3)]
        hosts: u8,
        /// Only namespaces and dockerds: no certificates, controller, agents or images.
        #[arg(long)]
        bare: bool,
        /// Plaintext gRPC without authentication instead of TLS + token.
        #[arg(long)]
        insecure: bool,
        /// Also import the real MXNet image from this root file system tarball (made by
        /// scripts/build-mxnet-image.sh) as geomx/mxnet:1.9.1.
        #[arg(long)]
        mxnet_tar: Option<PathBuf>,
        /// Where people's geomxctl reaches the controller (a forwarder into the lab).
        #[arg(long, default_value_t = SocketAddr::from(FORWARD_ADDR))]
        forward: SocketAddr,
    },
    /// Tear the lab down completely.
    Down,
    /// Show the lab's hosts.
    Status,
    /// Print the environment geomxctl needs (`eval "$(geomx-lab env)"`).
    Env,
    /// Run a command inside a host's namespace, e.g. `geomx-lab exec a -- ip route`.
    Exec {
        /// Host name, or "ul" for the underlay namespace (where the controller runs).
        host: String,
        /// The command.
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// (internal) Forward TCP from this namespace into the lab's controller.
    #[command(hide = true)]
    Forward {
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
        /// The lab directory (marks the process as the lab's, for teardown).
        #[arg(long)]
        dir: PathBuf,
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

fn attach(cli: &Cli) -> anyhow::Result<Lab> {
    Lab::attach(&cli.root, &cli.name)
        .with_context(|| format!("no lab {} under {}", cli.name, cli.root.display()))
}

fn env_file(lab: &Lab) -> PathBuf {
    lab.dir().join("env")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Up {
            hosts,
            bare,
            insecure,
            mxnet_tar,
            forward: forward_addr,
        } => {
            if *hosts == 0 || *hosts > 20 {
                bail!("--hosts must be 1..=20");
            }
            let bins = if *bare { None } else { Some(Binaries::find()?) };
            let mut spec = LabSpec::new(&cli.name).persistent();
            spec.root = cli.root.clone();
            for i in 0..*hosts {
                let (n, ip) = host_spec(i);
                spec = spec.host(&n, ip);
            }
            let lab = Lab::up(spec).context("building the lab")?;
            let Some(bins) = bins else {
                print_status(&lab);
                return Ok(());
            };
            let cluster_spec = ClusterSpec {
                tls: !insecure,
                heartbeat_interval: Duration::from_secs(1),
                grace_period: Duration::from_secs(5),
                network_interval: Duration::from_secs(5),
                seed_subnets: true,
                psnode_image: true,
                mxnet_tar: mxnet_tar.clone(),
            };
            let dir = lab.dir();
            let cluster = match Cluster::up(lab, cluster_spec, bins) {
                Ok(c) => c,
                Err(e) => {
                    // nothing half-built stays behind
                    if let Ok(lab) = Lab::attach(&cli.root, &cli.name) {
                        lab.dump_logs(20);
                        let _ = lab.down();
                    }
                    return Err(e)
                        .context(format!("starting geomx in the lab ({})", dir.display()));
                }
            };
            start_forwarder(&cluster, *forward_addr)?;
            let scheme = if *insecure { "http" } else { "https" };
            let env = cluster.ctl_env(&format!("{scheme}://{forward_addr}"));
            let text: String = env
                .iter()
                .map(|(k, v)| format!("export {k}={v}\n"))
                .collect();
            std::fs::write(env_file(cluster.lab()), &text)?;
            print_status(cluster.lab());
            println!();
            println!(
                "controller: {} (in the lab), {scheme}://{forward_addr} (from here)",
                cluster.controller_url()
            );
            println!(
                "use geomxctl from here after:  eval \"$(geomx-lab --name {} env)\"",
                cli.name
            );
            println!(
                "tear down with:                geomx-lab --name {} down",
                cli.name
            );
        }
        Command::Down => {
            let lab = attach(&cli)?;
            lab.down().context("tearing the lab down")?;
            println!("lab {} is gone", cli.name);
        }
        Command::Status => print_status(&attach(&cli)?),
        Command::Env => {
            let lab = attach(&cli)?;
            let file = env_file(&lab);
            print!(
                "{}",
                std::fs::read_to_string(&file).with_context(|| format!(
                    "{} (a --bare lab has no controller)",
                    file.display()
                ))?
            );
        }
        Command::Exec { host, argv } => {
            let lab = attach(&cli)?;
            let ns = if host == "ul" {
                lab.underlay().clone()
            } else {
                lab.host(host)?.netns().clone()
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
        Command::Forward { listen, dir: _ } => {
            let lab = attach(&cli)?;
            forward(
                *listen,
                lab.underlay(),
                SocketAddr::from((OUTSIDE_IP, CONTROLLER_PORT)),
            )?;
        }
    }
    Ok(())
}

fn start_forwarder(cluster: &Cluster, listen: SocketAddr) -> anyhow::Result<()> {
    let lab = cluster.lab();
    let me = std::env::current_exe().context("locating geomx-lab")?;
    let p = lab.spawn(
        &Netns::of_pid(std::process::id()),
        "forward",
        &[
            me.display().to_string(),
            "--name".into(),
            lab.name().to_string(),
            "--root".into(),
            lab.spec().root.display().to_string(),
            "forward".into(),
            "--listen".into(),
            listen.to_string(),
            "--dir".into(),
            lab.dir().display().to_string(),
        ],
        &[],
    )?;
    // it binds at once; an early exit means the address is taken
    std::thread::sleep(Duration::from_millis(300));
    if p.pid().is_none() {
        bail!(
            "the forwarder to the controller could not start on {listen} (pass --forward ADDR):\n{}",
            p.log_tail(5)
        );
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
