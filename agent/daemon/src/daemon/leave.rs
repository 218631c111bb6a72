//! `geomx-agent leave`: take this host out of the cluster for good.
//!
//! 1. `Leave` at the controller: it releases the host's lease and withdraws its routes from
//!    every peer (refused unless the controller answers, or `--force`);
//! 2. every geomx container on the host (label `io.geomx.managed=true`) is stopped and
//!    removed;
//! 3. the network cleanup of `geomx-agent cleanup` (routes, GEOMX chains and jumps,
//!    daemon.json's pre-geomx values; Docker restarted if the file changed);
//! 4. the persisted desired state is removed.
//!
//! The agent must not be running (the host lock refuses otherwise). Starting
//! `geomx-agent run` again later registers the host anew.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use geomx_net::{HostLock, Kernel, Reconciler};
use geomx_proto::v1::LeaveRequest;
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_runtime::{ContainerKind, Engine};
use tonic::Code;

use super::config::{AgentArgs, AgentConfig};
use super::docker::{connect_engine, error_chain};
use super::state::StateFile;
use super::{Settings, controller};
use crate::Common;

/// Arguments of `geomx-agent leave`.
#[derive(Clone, Debug, Args)]
pub struct LeaveArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Clean up this host even when the controller cannot be told (it then keeps the
    /// host as lost, holding its subnet, until it is told).
    #[arg(long)]
    force: bool,
}

/// Runs `geomx-agent leave`.
pub async fn leave(common: &Common, args: &LeaveArgs) -> anyhow::Result<ExitCode> {
    let (config, warnings) = match AgentConfig::load(common, &args.agent) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("geomx-agent: configuration error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    for w in warnings {
        tracing::warn!("{w}");
    }
    let _lock = HostLock::acquire(&config.state_dir)
        .context("stop geomx-agent first (systemctl stop geomx-agent)")?;
    let host = config.name.clone();

    // 1. the controller
    let tls = match &config.tls {
        Some(files) => Some(files.load().context("loading the agent's TLS files")?),
        None => None,
    };
    let settings = Settings::from_config(&config, tls);
    let told = tell_controller(&settings).await;
    match &told {
        Ok(msg) => println!("{msg}"),
        Err(e) if args.force => {
            eprintln!("warning: {e}; cleaning up this host anyway (--force)");
        }
        Err(e) => {
            anyhow::bail!("{e}; nothing was changed on this host (--force cleans it up anyway)")
        }
    }

    // 2. the containers
    match connect_engine(&config.docker_host).await {
        Ok(engine) => remove_containers(&engine).await?,
        Err(e) => eprintln!(
            "warning: {e}: geomx containers (if any) stay; remove them later with \
             `docker rm -f $(docker ps -aq --filter label=io.geomx.managed=true)`"
        ),
    }

    // 3. the network
    let net_config = config.net_config();
    let kernel = Kernel::system(&net_config).context("opening the host's network")?;
    let changes = Reconciler::new(net_config, kernel)
        .cleanup()
        .await
        .context("cleaning up the host network")?;
    if changes.is_empty() {
        println!("network: nothing to clean up");
    }
    for c in &changes {
        println!("network: {c}");
    }

    // 4. the persisted desired state
    StateFile::new(&config.state_dir)
        .remove()
        .context("removing the persisted desired state")?;
    println!(
        "host {host} left the cluster{}",
        if told.is_ok() {
            ""
        } else {
            " (the controller was not told)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

async fn tell_controller(settings: &Settings) -> Result<String, String> {
    let channel = controller::channel(settings)?;
    let mut client = AgentServiceClient::new(channel);
    let call = client.leave(LeaveRequest {
        host: settings.host.clone(),
    });
    match tokio::time::timeout(Duration::from_secs(15), call).await {
        Ok(Ok(_)) => Ok(format!(
            "controller {}: host {} left, its subnet is released",
            settings.controller, settings.host
        )),
        Ok(Err(s)) if s.code() == Code::NotFound => Ok(format!(
            "controller {}: host {} was not registered",
            settings.controller, settings.host
        )),
        Ok(Err(s)) => Err(format!(
            "the controller at {} refused Leave: {}",
            settings.controller,
            controller::describe(&s)
        )),
        Err(_) => Err(format!(
            "the controller at {} did not answer within 15s",
            settings.controller
        )),
    }
}

/// Stops and removes every geomx container: role containers first, then sandboxes.
async fn remove_containers<E: Engine>(engine: &E) -> anyhow::Result<()> {
    let mut list = engine
        .list_managed()
        .await
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        .context("listing geomx containers")?;
    // role containers (they live in their sandbox's network) before sandboxes
    list.sort_by_key(|c| ContainerKind::of_labels(&c.labels) == ContainerKind::Sandbox);
    if list.is_empty() {
        println!("containers: none");
    }
    for c in list {
        if let Err(e) = engine.stop(&c.id, Duration::from_secs(5)).await {
            eprintln!("warning: stopping {}: {}", c.name, error_chain(&e));
        }
        engine
            .remove(&c.id)
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))
            .with_context(|| format!("removing container {}", c.name))?;
        println!("containers: removed {}", c.name);
    }
    Ok(())
}
