//! [`DockerDaemon`] through bollard, restarted by a configurable shell command.

use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker};
use futures::future::BoxFuture;

use crate::error::{NetError, Result};
use crate::kernel::{DockerDaemon, DockerVersion};

/// Seconds a single API request may take.
const REQUEST_TIMEOUT_SECS: u64 = 10;

/// The Docker daemon at `host` (`unix:///var/run/docker.sock`, `tcp://...`).
#[derive(Clone, Debug)]
pub struct BollardDocker {
    host: String,
    restart_command: String,
    restart_timeout: Duration,
}

impl BollardDocker {
    /// The daemon at `host`, restarted with `sh -c <restart_command>`, which may take up to
    /// `restart_timeout`.
    pub fn new(host: &str, restart_command: &str, restart_timeout: Duration) -> BollardDocker {
        BollardDocker {
            host: host.to_string(),
            restart_command: restart_command.to_string(),
            restart_timeout,
        }
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> NetError {
        NetError::DockerUnavailable {
            host: self.host.clone(),
            reason: reason.to_string(),
        }
    }

    fn connect(&self) -> Result<Docker> {
        let docker = if let Some(path) = self.host.strip_prefix("unix://") {
            if !std::path::Path::new(path).exists() {
                return Err(self.unavailable(format!("the socket {path} does not exist")));
            }
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
        } else if self.host.starts_with('/') {
            Docker::connect_with_unix(&self.host, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
        } else {
            Docker::connect_with_host(&self.host)
        };
        docker.map_err(|e| self.unavailable(e))
    }
}

impl DockerDaemon for BollardDocker {
    fn host(&self) -> &str {
        &self.host
    }

    fn version(&self) -> BoxFuture<'_, Result<DockerVersion>> {
        Box::pin(async move {
            let docker = self
                .connect()?
                .negotiate_version()
                .await
                .map_err(|e| self.unavailable(e))?;
            let v = docker.version().await.map_err(|e| self.unavailable(e))?;
            Ok(DockerVersion {
                version: v.version.unwrap_or_default(),
                api_version: v.api_version.unwrap_or_default(),
            })
        })
    }

    fn restart(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            tracing::debug!(command = %self.restart_command, "restarting Docker");
            let failed = |status: String, stderr: String| NetError::DockerRestartFailed {
                command: self.restart_command.clone(),
                status,
                stderr,
            };
            let child = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&self.restart_command)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                // not killed when the pass is dropped or times out: a restart command
                // interrupted between stop and start would leave Docker down
                .spawn()
                .map_err(|e| failed("not started".into(), e.to_string()))?;
            let out = tokio::time::timeout(self.restart_timeout, child.wait_with_output())
                .await
                .map_err(|_| {
                    failed(
                        format!("still running after {:?}", self.restart_timeout),
                        String::new(),
                    )
                })?
                .map_err(|e| failed("unknown".into(), e.to_string()))?;
            if !out.status.success() {
                return Err(failed(
                    out.status.to_string(),
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
            Ok(())
        })
    }

    fn restart_command(&self) -> &str {
        &self.restart_command
    }
}
