//! `geomxctl`: the geomx command-line client.
//!
//! Conventions shared by every subcommand: `--controller URL` (env `GEOMX_CONTROLLER`),
//! `--token T` (env `GEOMX_TOKEN`), `--ca FILE` (env `GEOMX_CA`), `--output table|json`.
//! Exit codes: 0 success, 1 failure (a job that failed, an unreachable controller),
//! 2 refused (invalid input, a job the controller rejected).

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod cancel;
mod certs;
mod client;
mod events;
mod hosts;
mod images;
mod jobs;
mod logs;
mod placement;
mod plan;
mod pulls;
mod rm;
mod status;
mod submit;
mod table;
mod web;

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables for people.
    #[default]
    Table,
    /// One JSON document for scripts.
    Json,
}

/// geomx command-line client: plan, submit and observe GeoMX jobs.
#[derive(Debug, Parser)]
#[command(name = "geomxctl", version, about, long_about = None)]
pub struct Cli {
    /// Controller address, e.g. https://10.1.1.34:7946.
    #[arg(
        long,
        global = true,
        env = "GEOMX_CONTROLLER",
        default_value = "https://127.0.0.1:7946"
    )]
    pub controller: String,
    /// Bearer token for the user API.
    #[arg(long, global = true, env = "GEOMX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the controller's certificate.
    #[arg(long, global = true, env = "GEOMX_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Allow a plaintext http:// controller URL (a controller started with --insecure).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Whether `--controller` or GEOMX_CONTROLLER was given (not the default): `plan` then
    /// checks the central party's placement against the measured links.
    #[arg(skip)]
    pub controller_given: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a job file and print the nodes it compiles to, without deploying.
    Plan(plan::PlanArgs),
    /// Submit a job file, then follow the job until it ends (exit 0 succeeded, 1 failed,
    /// 2 refused).
    Submit(submit::SubmitArgs),
    /// List the jobs: phase, nodes running, restarts, age, reason.
    Jobs(jobs::JobsArgs),
    /// One job with every node: host, IP, state, last heartbeat, progress.
    Status(status::StatusArgs),
    /// A node's output, fetched through the agent of its host.
    Logs(logs::LogsArgs),
    /// Stop every container of a job on every host.
    Cancel(cancel::CancelArgs),
    /// Remove an ended job: its records, events and the output its agents kept.
    Rm(rm::RmArgs),
    /// What happened to a job, oldest first.
    Events(events::EventsArgs),
    /// List the hosts the controller knows: subnet, state, last heartbeat.
    Hosts(hosts::HostsArgs),
    /// Every host's images: tags, digest, id and size, as its agent last listed them.
    Images(images::ImagesArgs),
    /// Pull an image on hosts ahead of a job: one digest everywhere, with progress.
    Pull(images::PullArgs),
    /// Make the CA, certificates and tokens of a cluster (no controller needed).
    Certs(certs::CertsArgs),
    /// The dashboard's URL and a login link (--open: open it in a browser).
    Web(web::WebArgs),
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli.controller_given = !matches!(
        matches.value_source("controller"),
        None | Some(clap::parser::ValueSource::DefaultValue)
    );
    let result = match &cli.command {
        Command::Plan(args) => plan::run(args, &cli),
        Command::Submit(args) => submit::run(args, &cli),
        Command::Jobs(args) => jobs::run(args, &cli),
        Command::Status(args) => status::run(args, &cli),
        Command::Logs(args) => logs::run(args, &cli),
        Command::Cancel(args) => cancel::run(args, &cli),
        Command::Rm(args) => rm::run(args, &cli),
        Command::Events(args) => events::run(args, &cli),
        Command::Hosts(args) => hosts::run(args, &cli),
        Command::Images(args) => images::run_images(args, &cli),
        Command::Pull(args) => images::run_pull(args, &cli),
        Command::Certs(args) => certs::run(args, cli.output),
        Command::Web(args) => web::run(args, &cli),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
