//! The `geomx-controller` binary: configuration, logging, signals, systemd readiness.
//!
//! Exit codes: 0 after a clean shutdown, 1 on a runtime failure, 2 on a configuration error,
//! 3 when the state store is corrupt (the systemd unit restarts on neither 2 nor 3: both need
//! a person). `geomx-controller state check|export|import` works on a stopped controller's
//! state directory.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use geomx_controller::config::{Command, StateCommand};
use geomx_controller::store::Store;
use geomx_controller::{Args, ControllerConfig, backup};

/// Exit code when the state store is corrupt.
const EXIT_CORRUPT: u8 = 3;

fn main() -> ExitCode {
    let args = Args::parse();
    geomx_proto::logging::init(&geomx_proto::logging::LogOptions {
        default_filter: "info".into(),
        filter_env: None,
        format: geomx_proto::logging::StderrFormat::Text,
        with_target: false,
        identifier: "geomx-controller",
    });

    let (config, warnings) = match ControllerConfig::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("geomx-controller: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::State(cmd)) = &args.command {
        return state(cmd, &config.state_dir);
    }
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
    let state_dir = config.state_dir.clone();
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_corrupt(e.as_ref()) => {
            tracing::error!("{e:#}");
            eprintln!("{}", recovery(&state_dir));
            ExitCode::from(EXIT_CORRUPT)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// Whether `e` or an error under it is sled finding its files damaged.
fn is_corrupt(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<geomx_controller::store::StoreError>()
            .is_some_and(geomx_controller::store::StoreError::is_corrupt)
            || e.downcast_ref::<geomx_controller::ServerError>()
                .is_some_and(
                    |s| matches!(s, geomx_controller::ServerError::Store(s) if s.is_corrupt()),
                )
            || e.downcast_ref::<sled::Error>().is_some_and(|s| {
                matches!(
                    s,
                    sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)
                )
            })
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// What to do about a corrupt state directory.
fn recovery(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "geomx-controller: the state in {d} is corrupt and cannot be opened; the controller will not start on it (exit {EXIT_CORRUPT}: systemd does not restart it).\n\
         To recover:\n\
         1. keep the damaged copy: mv {d} {d}.corrupt\n\
         2. restore your last export into a new state dir: geomx-controller state import BACKUP.jsonl\n\
         \x20  (without an export, start with an empty state dir: agents register again and keep\n\
         \x20  their subnets where free; jobs and events are lost)\n\
         3. geomx-controller state check, then systemctl start geomx-controller\n\
         See docs/operations.md, \"Backup and recovery\"."
    )
}

/// `geomx-controller state ...` on `dir`.
fn state(cmd: &StateCommand, dir: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("geomx-controller: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let creates = matches!(cmd, StateCommand::Import { .. });
    if !creates && !dir.join("db").exists() {
        eprintln!(
            "geomx-controller: no state in {} (no db there); --state-dir or state_dir in the config names it",
            dir.display()
        );
        return ExitCode::from(1);
    }
    let result = runtime.block_on(async {
        let store = Store::open(dir).map_err(backup::BackupError::from)?;
        match cmd {
            StateCommand::Check => {
                let s = backup::check(&store)?;
                println!("{}: {}", dir.display(), s.counts());
                for p in &s.problems {
                    println!("problem: {p}");
                }
                Ok(if s.problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                        "geomx-controller: {} records do not decode (see above)",
                        s.problems.len()
                    );
                    ExitCode::from(1)
                })
            }
            StateCommand::Export { file } => export(&store, file).map(|s| {
                eprintln!("exported {} to {}", s.counts(), file.display());
                ExitCode::SUCCESS
            }),
            StateCommand::Import { file } => {
                let s = if file.as_os_str() == "-" {
                    backup::import(&store, &mut std::io::stdin().lock(), file).await?
                } else {
                    let f =
                        std::fs::File::open(file).map_err(|source| backup::BackupError::Io {
                            path: file.clone(),
                            source,
                        })?;
                    backup::import(&store, &mut std::io::BufReader::new(f), file).await?
                };
                eprintln!("imported {} into {}", s.counts(), dir.display());
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) if e.is_corrupt() || is_corrupt(&e) => {
            eprintln!("geomx-controller: {e}");
            eprintln!("{}", recovery(dir));
            ExitCode::from(EXIT_CORRUPT)
        }
        Err(e) => {
            eprintln!("geomx-controller: {e}");
            ExitCode::from(1)
        }
    }
}

/// Writes the export to `file` ("-": stdout): into a temporary file renamed at the end, so
/// that a failed export never leaves a partial file under the name.
fn export(store: &Store, file: &Path) -> Result<backup::Summary, backup::BackupError> {
    let io = |source| backup::BackupError::Io {
        path: file.to_owned(),
        source,
    };
    if file.as_os_str() == "-" {
        return backup::export(store, &mut std::io::stdout().lock(), file);
    }
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let summary = {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        backup::export(store, &mut w, file)?
    };
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(file).map_err(|e| io(e.error))?;
    Ok(summary)
}

async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let running = geomx_controller::start(config)
        .await
        .context("cannot start")?;
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let reloads = tokio::spawn(reload_on_sighup(
        running.credentials().clone(),
        running.shutdown_token(),
    ));
    let result = running.run_until(shutdown_signal()).await;
    reloads.abort();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    result.context("shutting down")
}

/// Re-reads the tokens and revocation files on every SIGHUP (`systemctl reload`) until
/// `stop`; a bad file keeps the credentials in force (the error is logged).
async fn reload_on_sighup(
    credentials: std::sync::Arc<geomx_controller::credentials::Credentials>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: credentials reload only when their files change");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        tracing::info!("SIGHUP received: reloading the tokens and revocation files");
        let c = credentials.clone();
        let _ = tokio::task::spawn_blocking(move || c.reload("SIGHUP")).await;
    }
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
