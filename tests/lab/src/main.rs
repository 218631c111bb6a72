//! `geomx-lab`: a multi-host geomx cluster on one machine (network namespaces, one dockerd
//! per host, the controller and an agent per host).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use geomx_lab::cluster::{FORWARD_ADDR, WEB_FORWARD_ADDR, WEB_PORT, forward};
use geomx_lab::topology::{
    fmt_duration, fmt_loss, fmt_rate, parse_duration, parse_loss, parse_rate,
};
use geomx_lab::{
    Binaries, CONTROLLER_PORT, Cluster, ClusterSpec, DEFAULT_ROOT, Lab, LabSpec, Link, Netns,
    RegistrySpec, SEED_HOSTS, delayline, read_topology,
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
        /// Number of hosts of a flat lab (default 3).
        #[arg(long, conflicts_with = "topology")]
        hosts: Option<u8>,
        /// A geo-distributed lab: data centers on their own routed networks joined by WAN
        /// links, as this TOML file describes them (see docs/lab.md).
        #[arg(long)]
        topology: Option<PathBuf>,
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
        /// Where people's browsers reach the controller's dashboard and /metrics (a
        /// forwarder to its web_listen; `geomx-lab env` exports it as GEOMX_WEB_URL).
        #[arg(long, default_value_t = SocketAddr::from(WEB_FORWARD_ADDR))]
        web_forward: SocketAddr,
        /// Run a container registry (TLS from the lab's CA, htpasswd auth) in its own
        /// namespace: on the underlay, or in the topology's `[registry] dc` (default its first
        /// data center). The test image and the MXNet image (from --mxnet-tar, else
        /// /var/cache/geomx/mxnet-1.9.1.tar when it exists) are pushed to it.
        #[arg(long)]
        registry: bool,
        /// Do not push the MXNet image to the registry.
        #[arg(long, requires = "registry")]
        no_mxnet: bool,
        /// Where the hosts' images come from: `local` (built or imported on every host) or
        /// `registry-only` (only in the registry, the hosts have none).
        #[arg(long, value_enum, default_value = "local")]
        images: Images,
        /// Every host (and the controller) a booted systemd machine with its own journald
        /// and docker.service (scripts/build-host-rootfs.sh); geomx installed from the
        /// Debian packages in --packages and run under its shipped units, as
        /// docs/deploy.md says.
        #[arg(long, conflicts_with = "registry")]
        boot: bool,
        /// Where the packages of this version are (scripts/package.sh --out DIR).
        #[arg(long, default_value = "target/debian", requires = "boot")]
        packages: PathBuf,
    },
    /// Tear the lab down completely.
    Down,
    /// Show the lab's data centers, hosts and links.
    Status,
    /// The WAN links of a geo-distributed lab.
    Link {
        #[command(subcommand)]
        command: LinkCommand,
    },
    /// Print the environment geomxctl needs (`eval "$(geomx-lab env)"`).
    Env,
    /// Run a command inside a host's namespace, e.g. `geomx-lab exec a -- ip route` (in a
    /// booted lab: inside the host's machine, e.g. `geomx-lab exec a -- journalctl -u
    /// geomx-agent`).
    Exec {
        /// Host name, or "ul" for the underlay namespace (a flat lab's bridge and controller).
        #[arg(required_unless_present_any = ["router", "dc"], conflicts_with_all = ["router", "dc"])]
        host: Option<String>,
        /// In the WAN router's namespace of a geo-distributed lab (captures, counters).
        #[arg(long)]
        router: bool,
        /// In a data center's bridge namespace (its service address; the controller's there).
        #[arg(long, conflicts_with = "router")]
        dc: Option<String>,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// (internal) The WAN router's delay line (runs in the router's namespace).
    #[command(hide = true)]
    DelayLine {
        /// The lab directory.
        #[arg(long)]
        dir: PathBuf,
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
        /// The controller's port to forward to.
        #[arg(long, default_value_t = CONTROLLER_PORT)]
        port: u16,
    },
}

#[derive(Debug, Subcommand)]
enum LinkCommand {
    /// Change a link while the lab runs (only what is given changes; nothing restarts).
    Set {
        /// One data center.
        a: String,
        /// The other.
        b: String,
        /// One-way delay, e.g. 40ms (the round trip is twice this); 0 for none.
        #[arg(long)]
        delay: Option<String>,
        /// Uniform jitter of the delay, e.g. 5ms (at most the delay).
        #[arg(long)]
        jitter: Option<String>,
        /// Rate of each direction, e.g. 200mbit; "none" for unshaped.
        #[arg(long)]
        rate: Option<String>,
        /// Random loss of each direction, e.g. 0.1%.
        #[arg(long)]
        loss: Option<String>,
    },
    /// Show every link.
    Show {
        /// table or json.
        #[arg(long, short = 'o', default_value = "table")]
        output: Output,
    },
    /// Partition: nothing passes between the two data centers, either way.
    Cut {
        /// One data center.
        a: String,
        /// The other.
        b: String,
    },
    /// End a partition.
    Heal {
        /// One data center.
        a: String,
        /// The other.
        b: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Images {
    Local,
    RegistryOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
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
            topology,
            bare,
            insecure,
            mxnet_tar,
            forward: forward_addr,
            web_forward: web_forward_addr,
            registry,
            no_mxnet,
            images,
            boot,
            packages,
        } => {
            if *boot && *bare {
                bail!("--boot installs geomx from packages: it cannot be --bare");
            }
            if *boot && *insecure {
                bail!("--boot follows docs/deploy.md (TLS and tokens): it cannot be --insecure");
            }
            let packages = if *boot {
                Some(geomx_lab::Packages::in_dir(
                    packages,
                    env!("CARGO_PKG_VERSION"),
                )?)
            } else {
                None
            };
            if *images == Images::RegistryOnly && !*registry {
                bail!("--images registry-only needs --registry");
            }
            let bins = if *bare { None } else { Some(Binaries::find()?) };
            let mut spec = LabSpec::new(&cli.name).persistent().boot(*boot);
            spec.root = cli.root.clone();
            match topology {
                Some(file) => spec = spec.topology(read_topology(file)?),
                None => {
                    let hosts = hosts.unwrap_or(3);
                    if hosts == 0 || hosts > 20 {
                        bail!("--hosts must be 1..=20");
                    }
                    for i in 0..hosts {
                        let (n, ip) = host_spec(i);
                        spec = spec.host(&n, ip);
                    }
                }
            }
            if *registry {
                let mut r = RegistrySpec::default();
                if !*no_mxnet {
                    r = match mxnet_tar {
                        Some(t) => RegistrySpec {
                            mxnet_tar: Some(t.clone()),
                            ..r
                        },
                        None => r.with_cached_mxnet(),
                    };
                }
                spec = spec.registry(r);
            }
            let existed = spec.dir().join("lab.json").exists();
            let lab = match Lab::up(spec) {
                Ok(lab) => lab,
                Err(e) => {
                    // a persistent lab is not torn down on drop: nothing half-built stays
                    // (but a lab of that name that was there before is not ours to remove)
                    if let Some(lab) = (!existed)
                        .then(|| Lab::attach(&cli.root, &cli.name).ok())
                        .flatten()
                    {
                        lab.dump_logs(20);
                        let _ = lab.down();
                    }
                    return Err(e).context("building the lab");
                }
            };
            let registry_env: String = lab
                .registry()
                .map(|r| r.env())
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| format!("export {k}={v}\n"))
                .collect();
            let Some(bins) = bins else {
                if !registry_env.is_empty() {
                    std::fs::write(env_file(&lab), &registry_env)?;
                }
                print_status(&lab);
                return Ok(());
            };
            let local = *images == Images::Local;
            let cluster_spec = ClusterSpec {
                tls: !insecure,
                heartbeat_interval: Duration::from_secs(1),
                grace_period: Duration::from_secs(5),
                network_interval: Duration::from_secs(5),
                seed_subnets: true,
                psnode_image: local,
                mxnet_tar: mxnet_tar.clone().filter(|_| local),
            };
            let dir = lab.dir();
            let started = match &packages {
                Some(p) => Cluster::up_booted(lab, cluster_spec, bins, p),
                None => Cluster::up(lab, cluster_spec, bins),
            };
            let cluster = match started {
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
            start_forwarder(&cluster, *forward_addr, CONTROLLER_PORT, "forward")?;
            start_forwarder(&cluster, *web_forward_addr, WEB_PORT, "forward-web")?;
            let scheme = if *insecure { "http" } else { "https" };
            let mut env = cluster.ctl_env(&format!("{scheme}://{forward_addr}"));
            env.push((
                "GEOMX_WEB_URL".into(),
                format!("{scheme}://{web_forward_addr}"),
            ));
            let mut text: String = env
                .iter()
                .map(|(k, v)| format!("export {k}={v}\n"))
                .collect();
            text.push_str(&registry_env);
            std::fs::write(env_file(cluster.lab()), &text)?;
            print_status(cluster.lab());
            println!();
            println!(
                "controller: {} (in the lab), {scheme}://{forward_addr} (from here)",
                cluster.controller_url()
            );
            println!(
                "dashboard: {scheme}://{web_forward_addr} (from here; `geomxctl web` prints a login link)"
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
                    "{} (a --bare lab without --registry has no environment)",
                    file.display()
                ))?
            );
        }
        Command::Exec {
            host,
            router,
            dc,
            argv,
        } => {
            let lab = attach(&cli)?;
            // a booted host: inside its machine (its own PID 1, /etc, journal, Docker)
            if let (Some(h), false, None) = (host.as_deref(), *router, dc)
                && h != "ul"
                && let Ok(m) = lab.host(h)?.machine()
            {
                let status = m
                    .command(argv)?
                    .stdin(std::process::Stdio::inherit())
                    .status()
                    .with_context(|| format!("running {} in machine {}", argv[0], m.name()))?;
                if !status.success() {
                    bail!("{} exited with {status}", argv[0]);
                }
                return Ok(());
            }
            let ns = match (host.as_deref(), dc) {
                _ if *router => lab.router()?.clone(),
                (_, Some(dc)) => lab.dc_netns(dc)?,
                (Some("ul"), _) | (None, None) => lab.underlay().clone(),
                (Some(h), _) => lab.host(h)?.netns().clone(),
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
        Command::Forward {
            listen,
            dir: _,
            port,
        } => {
            let lab = attach(&cli)?;
            forward(
                *listen,
                &lab.controller_netns(),
                SocketAddr::from((lab.controller_ip(), *port)),
            )?;
        }
        Command::DelayLine { dir } => delayline::run(dir)?,
        Command::Link { command } => {
            let mut lab = attach(&cli)?;
            link_command(&mut lab, command)?;
        }
    }
    Ok(())
}

fn start_forwarder(
    cluster: &Cluster,
    listen: SocketAddr,
    port: u16,
    process: &str,
) -> anyhow::Result<()> {
    let lab = cluster.lab();
    let me = std::env::current_exe().context("locating geomx-lab")?;
    let p = lab.spawn(
        &Netns::of_pid(std::process::id()),
        process,
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
            "--port".into(),
            port.to_string(),
        ],
        &[],
    )?;
    // it binds at once; an early exit means the address is taken
    std::thread::sleep(Duration::from_millis(300));
    if p.pid().is_none() {
        bail!(
            "the forwarder to the controller's port {port} could not start on {listen} (pass --forward ADDR / --web-forward ADDR):\n{}",
            p.log_tail(5)
        );
    }
    Ok(())
}

fn link_command(lab: &mut Lab, command: &LinkCommand) -> anyhow::Result<()> {
    match command {
        LinkCommand::Set {
            a,
            b,
            delay,
            jitter,
            rate,
            loss,
        } => {
            let delay = delay.as_deref().map(parse_duration).transpose();
            let jitter = jitter.as_deref().map(parse_duration).transpose();
            let rate = rate.as_deref().map(parse_rate).transpose();
            let loss = loss.as_deref().map(parse_loss).transpose();
            let (delay, jitter, rate, loss) = (
                delay.map_err(|e| anyhow::anyhow!("--delay {e}"))?,
                jitter.map_err(|e| anyhow::anyhow!("--jitter {e}"))?,
                rate.map_err(|e| anyhow::anyhow!("--rate {e}"))?,
                loss.map_err(|e| anyhow::anyhow!("--loss {e}"))?,
            );
            let l = lab.set_link(a, b, |s| {
                if let Some(d) = delay {
                    s.delay = d;
                }
                if let Some(j) = jitter {
                    s.jitter = j;
                }
                if let Some(r) = rate {
                    s.rate_bps = r;
                }
                if let Some(l) = loss {
                    s.loss = l;
                }
            })?;
            print_links(&[l]);
        }
        LinkCommand::Cut { a, b } => {
            let l = lab.set_link(a, b, |s| s.cut = true)?;
            print_links(&[l]);
        }
        LinkCommand::Heal { a, b } => {
            let l = lab.set_link(a, b, |s| s.cut = false)?;
            print_links(&[l]);
        }
        LinkCommand::Show { output } => {
            let links = lab.links()?;
            match output {
                Output::Table => print_links(links),
                Output::Json => {
                    let v: Vec<serde_json::Value> = links.iter().map(link_json).collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
        }
    }
    Ok(())
}

fn link_json(l: &Link) -> serde_json::Value {
    serde_json::json!({
        "dcs": l.dcs,
        "delay_ms": l.shape.delay.as_secs_f64() * 1000.0,
        "jitter_ms": l.shape.jitter.as_secs_f64() * 1000.0,
        "rate_bps": l.shape.rate_bps,
        "loss_pct": l.shape.loss * 100.0,
        "cut": l.shape.cut,
    })
}

fn print_links(links: &[Link]) {
    println!(
        "{:<26} {:>8} {:>8} {:>10} {:>7}  STATE",
        "LINK", "DELAY", "JITTER", "RATE", "LOSS"
    );
    for l in links {
        let state = if l.shape.cut {
            "cut"
        } else if l.shape.is_unshaped() {
            "unshaped"
        } else {
            "shaped"
        };
        println!(
            "{:<26} {:>8} {:>8} {:>10} {:>7}  {state}",
            format!("{} - {}", l.dcs[0], l.dcs[1]),
            fmt_duration(l.shape.delay),
            fmt_duration(l.shape.jitter),
            fmt_rate(l.shape.rate_bps),
            fmt_loss(l.shape.loss),
        );
    }
}

fn print_status(lab: &Lab) {
    println!("lab {} in {}", lab.name(), lab.dir().display());
    if let Some(t) = lab.topology() {
        println!();
        println!(
            "{:<12} {:<18} {:<15} {:<15} NAMESPACE",
            "DC", "SUBNET", "GATEWAY", "SERVICES"
        );
        for dc in &t.dcs {
            println!(
                "{:<12} {:<18} {:<15} {:<15} {}{}",
                dc.name,
                dc.subnet.to_string(),
                dc.gateway().to_string(),
                dc.service_ip().to_string(),
                lab.dc_netns(&dc.name).map(|n| n.name()).unwrap_or_default(),
                if dc.name == t.controller_dc {
                    "  (controller)"
                } else {
                    ""
                }
            );
        }
        println!("router: namespace {}", lab.underlay().name());
        println!();
        print_links(&t.links);
        println!();
    }
    if let Some(r) = lab.registry() {
        println!(
            "registry: https://{} (namespace {}{}), user {}, CA {}",
            r.host_port(),
            r.netns_name,
            r.dc.as_deref()
                .map(|d| format!(", data center {d}"))
                .unwrap_or_default(),
            r.user,
            r.ca.display()
        );
        println!();
    }
    println!(
        "{:<6} {:<12} {:<14} {:<22} DOCKER_HOST",
        "HOST", "DC", "UNDERLAY", "NAMESPACE"
    );
    for h in lab.hosts() {
        let docker = h
            .dockerd()
            .map(|d| {
                if let Ok(m) = h.machine() {
                    let state = if m.leader().is_some() {
                        "booted"
                    } else {
                        "powered off"
                    };
                    format!("{} (machine {}, {state})", d.url(), m.name())
                } else if d.pid().is_some() {
                    d.url()
                } else {
                    format!("{} (stopped)", d.url())
                }
            })
            .unwrap_or_else(|_| "-".into());
        println!(
            "{:<6} {:<12} {:<14} {:<22} {docker}",
            h.name,
            h.dc.as_deref().unwrap_or("-"),
            h.underlay_ip.to_string(),
            h.netns().name()
        );
    }
}
