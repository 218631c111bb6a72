//! `geomx-agent network apply|plan|show` and `geomx-agent cleanup`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use geomx_net::{Change, HostLock, Kernel, NetworkStatus, Reconciler};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::HostFile;
use crate::{Common, Output};

/// `geomx-agent network ...`.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Bring this host's network to the state of a host file: docker0 bip (daemon.json,
    /// Docker restarted if it changed), a route per peer, the GEOMX-* chains, ip_forward.
    /// Prints what changed ("no changes" when nothing did). With --watch, keeps it so:
    /// re-checks every --interval, re-reads the file on SIGHUP, stops on SIGTERM/SIGINT.
    Apply(ApplyArgs),
    /// Show what geomx owns on this host: routes (proto 247), chains, docker0, daemon.json
    /// keys and what they were before geomx, ip_forward.
    Show(ShowArgs),
    /// Print what `apply` would do now with a host file, step by step, changing nothing
    /// ("no changes planned" when the host matches).
    Plan(PlanArgs),
}

/// Arguments of `network plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The host file (see docs/networking.md).
    #[arg(long, short = 'c', env = "GEOMX_NET_CONFIG")]
    pub config: PathBuf,
    /// Output format of the steps.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of `network apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The host file (see docs/networking.md).
    #[arg(long, short = 'c', env = "GEOMX_NET_CONFIG")]
    pub config: PathBuf,
    /// Keep running: re-apply every --interval and on SIGHUP (which re-reads the file).
    #[arg(long)]
    pub watch: bool,
    /// Re-check interval with --watch.
    #[arg(long, env = "GEOMX_NET_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Output format of the changes (without --watch).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of `network show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of `cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Output format of the changes.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Serialize)]
struct Report<'a> {
    host: &'a str,
    changes: &'a [Change],
}

fn print_changes(host: &str, changes: &[Change], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&Report { host, changes })?
        ),
        Output::Table if changes.is_empty() => println!("no changes"),
        Output::Table => {
            for c in changes {
                println!("{c}");
            }
        }
    }
    Ok(())
}

/// Runs a `network` subcommand.
pub async fn network(common: &Common, cmd: NetworkCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NetworkCommand::Apply(args) => apply(common, args).await,
        NetworkCommand::Show(args) => show(common, args).await,
        NetworkCommand::Plan(args) => plan(common, args).await,
    }
}

async fn apply(common: &Common, args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let file = HostFile::load(&args.config)?;
    let host = common.host(file.name.as_deref());
    let config = common.net_config(&host, Some(args.interval));
    let _lock = HostLock::acquire(&config.state_dir)?;
    let kernel = Kernel::system(&config).context("opening the host's network")?;
    let mut config = config;
    // one shot: a Docker that does not answer is an error before any change (a daemon,
    // --watch, applies what it can and writes daemon.json for Docker's start)
    config.docker_required = !args.watch;
    let mut reconciler = Reconciler::new(config, kernel);
    if !args.watch {
        let changes = reconciler
            .reconcile(&file.desired())
            .await
            .with_context(|| format!("applying {}", args.config.display()))?;
        print_changes(&host, &changes, args.output)?;
        return Ok(ExitCode::SUCCESS);
    }

    let (tx, rx) = watch::channel(Some(file.desired()));
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let path = args.config.clone();
    let reload = async move {
        loop {
            tokio::select! {
                _ = hup.recv() => match HostFile::load(&path) {
                    Ok(f) => {
                        tracing::info!(file = %path.display(), "SIGHUP: re-read the host file");
                        tx.send_replace(Some(f.desired()));
                    }
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "SIGHUP: keeping the previous desired state"
                    ),
                },
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
            }
        }
    };
    tracing::info!(
        host = %host,
        interval = %humantime::format_duration(args.interval),
        "keeping the host network at {}",
        args.config.display()
    );
    reconciler.run(rx, reload, |_, _| {}).await;
    tracing::info!(host = %host, "stopped; the host network stays as it is (`geomx-agent cleanup` removes it)");
    Ok(ExitCode::SUCCESS)
}

async fn plan(common: &Common, args: PlanArgs) -> anyhow::Result<ExitCode> {
    let file = HostFile::load(&args.config)?;
    let host = common.host(file.name.as_deref());
    let mut config = common.net_config(&host, None);
    config.docker_required = true;
    let kernel = Kernel::system(&config).context("opening the host's network")?;
    let plan = Reconciler::new(config, kernel)
        .plan(&file.desired())
        .await
        .with_context(|| format!("planning {}", args.config.display()))?;
    let steps: Vec<String> = plan.steps.iter().map(|s| s.to_string()).collect();
    match args.output {
        Output::Json => {
            let backends: std::collections::BTreeMap<&str, &str> = plan
                .backends
                .iter()
                .map(|(p, b)| (p.as_str(), b.as_str()))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "host": host,
                    "backends": backends,
                    "steps": steps,
                }))?
            );
        }
        Output::Table if steps.is_empty() => println!("no changes planned"),
        Output::Table => {
            for s in &steps {
                println!("{s}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(common: &Common, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let host = common.host(None);
    let config = common.net_config(&host, None);
    let kernel = Kernel::system(&config).context("opening the host's network")?;
    let status = NetworkStatus::read(&host, &kernel).await;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => print!("{status}"),
    }
    Ok(if status.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `cleanup`.
pub async fn cleanup(common: &Common, args: CleanupArgs) -> anyhow::Result<ExitCode> {
    let host = common.host(None);
    let config = common.net_config(&host, None);
    let _lock = HostLock::acquire(&config.state_dir)?;
    let kernel = Kernel::system(&config).context("opening the host's network")?;
    let changes = Reconciler::new(config, kernel)
        .cleanup()
        .await
        .context("cleaning up")?;
    print_changes(&host, &changes, args.output)?;
    Ok(ExitCode::SUCCESS)
}
