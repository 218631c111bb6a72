//! `NodeLogs`: the controller streams a node's output from the agent of its host.
//!
//! The controller is a gRPC client of `AgentNodeService` at the host's `agent_url`
//! (`https://<underlay ip>:7947`): with TLS it presents its own certificate (mTLS; the agent
//! accepts only the controller's), in insecure mode it speaks plaintext to `http://` URLs.
//! An agent that cannot be reached gives a clear `UNAVAILABLE`.

use geomx_proto::error_chain;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use geomx_proto::v1::agent_node_service_client::AgentNodeServiceClient;
use geomx_proto::v1::{ForgetJobRequest, LogChunk, NodeLogsRequest};
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How the controller connects to agents.
#[derive(Clone, Debug)]
pub struct AgentConnector {
    tls: Option<ClientTlsConfig>,
    connect_timeout: Duration,
}

impl AgentConnector {
    /// With `tls` (the controller's own identity and the CA), or plaintext only.
    pub fn new(tls: Option<ClientTlsConfig>, connect_timeout: Duration) -> Self {
        AgentConnector {
            tls,
            connect_timeout,
        }
    }

    /// A channel to the agent of `host` serving at `url`.
    pub(super) async fn channel(&self, host: &str, url: &str) -> Result<Channel, Status> {
        if url.is_empty() {
            return Err(Status::unavailable(format!(
                "the agent of host {host} registered no agent_url: it cannot be called"
            )));
        }
        let unavailable = |what: String| {
            Status::unavailable(format!(
                "cannot reach the agent of host {host} at {url}: {what}"
            ))
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| unavailable(format!("bad URL: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if url.starts_with("http://") && self.tls.is_some() {
            // never call an agent in plaintext from a TLS cluster: a listener there could
            // be anyone's
            return Err(unavailable(
                "the agent registered a plaintext http:// URL, and this controller calls agents over mTLS only (give the agent its TLS files, or run both insecure)".into(),
            ));
        }
        if url.starts_with("https://") {
            let Some(tls) = &self.tls else {
                return Err(unavailable(
                    "the controller runs without TLS (--insecure) and cannot authenticate to an https:// agent; run both with TLS or both insecure".into(),
                ));
            };
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| unavailable(format!("TLS configuration: {e}")))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| unavailable(error_chain(&e)))
    }

    /// Asks the agent of `host` to delete the output it kept of `job`; whether it had any.
    pub async fn forget(&self, host: &str, url: &str, job: &str) -> Result<bool, Status> {
        let channel = self.channel(host, url).await?;
        let answer = AgentNodeServiceClient::new(channel)
            .forget_job(ForgetJobRequest {
                job: job.to_owned(),
            })
            .await
            .map_err(|s| agent_status(host, &s))?;
        Ok(answer.into_inner().had_logs)
    }

    /// Opens the log stream of `request` at the agent of `host` serving at `url`.
    pub async fn logs(
        &self,
        host: &str,
        url: &str,
        request: NodeLogsRequest,
    ) -> Result<BoxStream<'static, Result<LogChunk, Status>>, Status> {
        let channel = self.channel(host, url).await?;
        let (job, node) = (request.job.clone(), request.node.clone());
        let stream = AgentNodeServiceClient::new(channel)
            .logs(request)
            .await
            .map_err(|s| agent_status(host, &s))?
            .into_inner();
        tracing::debug!(host, job, node, "streaming logs from the agent");
        let host = host.to_owned();
        Ok(stream
            .map(move |item| item.map_err(|s| agent_status(&host, &s)))
            .boxed())
    }
}

/// An agent's error, with its code kept and the host named.
pub(super) fn agent_status(host: &str, status: &Status) -> Status {
    let code = match status.code() {
        // A transport failure is the agent being unreachable.
        tonic::Code::Unknown if status.message().contains("transport") => tonic::Code::Unavailable,
        c => c,
    };
    Status::new(code, format!("agent of host {host}: {}", status.message()))
}
