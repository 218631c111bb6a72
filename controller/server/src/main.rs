//! The `geomx-controller` binary: configuration, logging, signals, systemd readiness.
//!
//! Exit codes: 0 after a clean shutdown, 1 on a runtime failure, 2 on a configuration error
//! (the systemd unit does not restart on 2).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use geomx_controller::{Args, ControllerConfig};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let (config, warnings) = match ControllerConfig::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("geomx-controller: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    for w in warnings {
        tracing::warn!("{w}");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("geomx-controller")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("geomx-controller: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let running = geomx_controller::start(config)
        .await
        .context("cannot start")?;
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let result = running.run_until(shutdown_signal()).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    result.context("shutting down")
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
