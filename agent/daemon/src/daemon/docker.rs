//! Docker as the daemon's container runtime sees it: where the engine comes from and how
//! network sandboxes are made. (The network pass treats Docker's state as an explicit
//! input of its plan: see `geomx_net::plan::DockerState`.)

use std::future::Future;
use std::path::Path;

use geomx_runtime::{BollardEngine, Engine, RuntimeError, SandboxConfig, pause};
use tracing::{info, warn};

/// Where the container runtime gets its Docker engine and sandbox settings from.
pub trait EngineSource: Send + Sync + 'static {
    /// The engine type.
    type Engine: Engine;
    /// Connects to Docker (called again after a failure).
    fn connect(&self) -> impl Future<Output = Result<Self::Engine, String>> + Send;
    /// How network sandboxes are made on `engine` (imports the pause image if needed).
    fn sandbox(
        &self,
        engine: &Self::Engine,
    ) -> impl Future<Output = Result<SandboxConfig, String>> + Send;
}

/// The real Docker at a `docker_host` address.
#[derive(Clone, Debug)]
pub struct DockerSource {
    docker_host: String,
}

impl DockerSource {
    /// Docker at `docker_host` (`unix:///var/run/docker.sock`, a socket path, `tcp://...`).
    pub fn new(docker_host: &str) -> DockerSource {
        DockerSource {
            docker_host: docker_host.to_owned(),
        }
    }
}

/// Connects to Docker at `docker_host` and negotiates the API version.
pub async fn connect_engine(docker_host: &str) -> Result<BollardEngine, String> {
    let socket = docker_host
        .strip_prefix("unix://")
        .or_else(|| docker_host.starts_with('/').then_some(docker_host));
    match socket {
        Some(path) => BollardEngine::connect_unix(Path::new(path))
            .await
            .map_err(|e| format!("Docker at {docker_host}: {}", error_chain(&e))),
        None => {
            let docker = bollard::Docker::connect_with_host(docker_host)
                .map_err(|e| format!("Docker at {docker_host}: {e}"))?
                .negotiate_version()
                .await
                .map_err(|e| format!("Docker at {docker_host}: {e}"))?;
            Ok(BollardEngine::new(docker))
        }
    }
}

impl EngineSource for DockerSource {
    type Engine = BollardEngine;

    async fn connect(&self) -> Result<BollardEngine, String> {
        connect_engine(&self.docker_host).await
    }

    async fn sandbox(&self, engine: &BollardEngine) -> Result<SandboxConfig, String> {
        match pause::ensure_image(engine).await {
            Ok(tag) => {
                info!(image = %tag, "network sandboxes run the pause image");
                Ok(pause::sandbox_config(tag))
            }
            Err(RuntimeError::PauseUnavailable) => {
                warn!(
                    "{}: network sandboxes run a shell loop in each job's image",
                    RuntimeError::PauseUnavailable
                );
                Ok(SandboxConfig::default())
            }
            Err(e) => Err(format!(
                "importing the pause image {}: {}",
                pause::image_tag(),
                error_chain(&e)
            )),
        }
    }
}

pub use geomx_proto::error_chain;
