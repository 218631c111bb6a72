//! `geomx.v1.HostService`: what the cluster is made of, for users.

use std::sync::Arc;

use geomx_proto::v1::host_service_server::HostService;
use geomx_proto::v1::{
    Host, HostEventsResponse, HostRequest, ListHostsRequest, ListHostsResponse, PullImageRequest,
    PullImageResponse,
};
use tonic::{Request, Response, Status};

use crate::jobs::Jobs;
use crate::jobs::view::event_message;
use crate::membership::{HostView, Membership};
use crate::store::EventScope;

/// Implementation of `HostService` (authorization is done by the service's interceptor).
#[derive(Clone, Debug)]
pub struct HostApi {
    membership: Arc<Membership>,
    jobs: Option<Arc<Jobs>>,
}

impl HostApi {
    /// The service over `membership`.
    pub fn new(membership: Arc<Membership>) -> Self {
        HostApi {
            membership,
            jobs: None,
        }
    }

    /// With the jobs layer, which calls the agents (`PullImage`).
    pub fn with_jobs(mut self, jobs: Option<Arc<Jobs>>) -> Self {
        self.jobs = jobs;
        self
    }
}

/// The API view of a host.
pub fn host_message(view: &HostView) -> Host {
    let r = &view.record;
    Host {
        name: r.name.clone(),
        underlay_ip: r.underlay_ip.to_string(),
        subnet: r.subnet.map(|s| s.to_string()).unwrap_or_default(),
        state: r.state.as_str().to_owned(),
        heartbeat_age_ms: u64::try_from(view.heartbeat_age.as_millis()).unwrap_or(u64::MAX),
        agent_version: r.agent_version.clone(),
        network_converged: r.network.converged,
        containers: view.containers,
        agent_url: r.agent_url.clone(),
        registered_at_ms: r.registered_at_ms,
        images: r.images.clone(),
        cordoned: r.cordoned,
        network_error: r.network.error.clone(),
        links: r
            .network
            .links
            .iter()
            .map(|l| geomx_proto::v1::PeerLink {
                peer: l.peer.clone(),
                backend: l.backend.clone(),
                rtt_ms: l.rtt_ms,
                loss_pct: l.loss_pct,
                handshake_age_s: l.handshake_age_s,
            })
            .collect(),
        wireguard_public_key: r
            .wireguard
            .as_ref()
            .map(|w| w.public_key.clone())
            .unwrap_or_default(),
        wireguard_port: r.wireguard.as_ref().map_or(0, |w| u32::from(w.port)),
        image_details: view.image_details.clone(),
        pulls: view.pulls.clone(),
    }
}

fn host_name(request: &Request<HostRequest>) -> Result<String, Status> {
    crate::validate::host_name("name", &request.get_ref().name)
}

#[tonic::async_trait]
impl HostService for HostApi {
    async fn list_hosts(
        &self,
        _request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let hosts = self.membership.hosts().iter().map(host_message).collect();
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn cordon_host(&self, request: Request<HostRequest>) -> Result<Response<Host>, Status> {
        let name = host_name(&request)?;
        let view = self.membership.set_cordon(&name, true).await?;
        Ok(Response::new(host_message(&view)))
    }

    async fn uncordon_host(&self, request: Request<HostRequest>) -> Result<Response<Host>, Status> {
        let name = host_name(&request)?;
        let view = self.membership.set_cordon(&name, false).await?;
        Ok(Response::new(host_message(&view)))
    }

    async fn remove_host(&self, request: Request<HostRequest>) -> Result<Response<Host>, Status> {
        let name = host_name(&request)?;
        let view = self.membership.remove(&name).await?;
        Ok(Response::new(host_message(&view)))
    }

    async fn host_events(
        &self,
        request: Request<HostRequest>,
    ) -> Result<Response<HostEventsResponse>, Status> {
        let name = host_name(&request)?;
        let events = self
            .membership
            .store()
            .events(EventScope::Host(&name))
            .map_err(|e| Status::new(e.code(), e.to_string()))?;
        if events.is_empty() && self.membership.host(&name).is_none() {
            return Err(Status::not_found(format!(
                "host {name:?} is not registered and has no events"
            )));
        }
        Ok(Response::new(HostEventsResponse {
            events: events.into_iter().map(event_message).collect(),
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let Some(jobs) = &self.jobs else {
            return Err(Status::unimplemented(
                "this controller runs without the jobs layer: it calls no agent",
            ));
        };
        let r = request.into_inner();
        let image = crate::validate::printable("image", &r.image, crate::validate::MAX_IMAGE_LEN)?;
        if image.trim().is_empty() || image.contains(char::is_whitespace) {
            return Err(Status::invalid_argument(format!(
                "image {image:?} is not an image reference"
            )));
        }
        if r.hosts.len() > crate::validate::MAX_PULL_HOSTS {
            return Err(Status::invalid_argument(format!(
                "hosts: {} named, at most {}",
                r.hosts.len(),
                crate::validate::MAX_PULL_HOSTS
            )));
        }
        let hosts = r
            .hosts
            .iter()
            .map(|h| crate::validate::host_name("hosts", h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(jobs.pull_image(&image, &hosts).await?))
    }
}
