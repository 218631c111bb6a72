//! Between the wire (`geomx.v1` messages) and the agent's crates: the desired state into
//! `geomx-net`'s [`DesiredNetwork`] and `geomx-runtime`'s [`ContainerSpec`]s, the runtime's
//! [`NodeStatus`]es and log chunks back into messages.

use std::net::Ipv4Addr;

use geomx_net::{DesiredNetwork, Peer};
use geomx_proto::v1;
use geomx_runtime::{
    ContainerSpec, HostCapacity, ImageDetails, ImagePull, LogChunk, Mount, MountKind, NodeState,
    NodeStatus, Progress, PullStatus, Resources,
};
use ipnet::Ipv4Net;

use crate::report::truncate;

/// A desired state whose network part or containers cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The containers name templates the state does not hold as it must.
    #[error("desired state revision {revision}: {source}")]
    Templates {
        /// The state's revision.
        revision: u64,
        /// What is wrong.
        #[source]
        source: geomx_proto::templates::TemplateError,
    },
    /// A field is not what it must be.
    #[error("desired state revision {revision}: {field} {value:?} is not {expected}")]
    BadField {
        /// The state's revision.
        revision: u64,
        /// Which field (`subnet`, `peers[b].underlay_ip`, ...).
        field: String,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
}

/// The network part of `state`: this host's subnet, the cluster CIDR and the peers.
/// Validation beyond syntax (overlaps, on-link next hops) is the reconciler's.
pub fn desired_network(state: &v1::DesiredState) -> Result<DesiredNetwork, ConvertError> {
    let bad = |field: String, value: &str, expected: &'static str| ConvertError::BadField {
        revision: state.revision,
        field,
        value: value.to_owned(),
        expected,
    };
    let net = |field: String, value: &str| -> Result<Ipv4Net, ConvertError> {
        value
            .trim()
            .parse::<Ipv4Net>()
            .map_err(|_| bad(field, value, "an IPv4 CIDR"))
    };
    let subnet = net("subnet".into(), &state.subnet)?;
    let cluster = net("cluster_cidr".into(), &state.cluster_cidr)?;
    let mut peers = Vec::with_capacity(state.peers.len());
    for p in &state.peers {
        let underlay_ip = p.underlay_ip.trim().parse::<Ipv4Addr>().map_err(|_| {
            bad(
                format!("peers[{}].underlay_ip", p.name),
                &p.underlay_ip,
                "an IPv4 address",
            )
        })?;
        let wireguard_port = match p.wireguard_port {
            0 => None,
            port => Some(u16::try_from(port).map_err(|_| {
                bad(
                    format!("peers[{}].wireguard_port", p.name),
                    &port.to_string(),
                    "a UDP port",
                )
            })?),
        };
        peers.push(Peer {
            name: p.name.clone(),
            underlay_ip,
            subnet: net(format!("peers[{}].subnet", p.name), &p.subnet)?,
            wireguard_key: Some(p.wireguard_public_key.trim().to_string())
                .filter(|k| !k.is_empty()),
            wireguard_port,
        });
    }
    let backend = state.backend.parse().map_err(|_| {
        bad(
            "backend".into(),
            &state.backend,
            "\"auto\", \"host-gw\", \"wireguard\" or \"vxlan\"",
        )
    })?;
    Ok(DesiredNetwork {
        subnet,
        cluster,
        peers,
        backend,
    })
}

/// The role containers of `state`, each complete (expanded with the templates it names:
/// what the runtime gets is what the controller compiled for the node), labelled with the
/// state's controller id.
pub fn container_specs(state: &v1::DesiredState) -> Result<Vec<ContainerSpec>, ConvertError> {
    let expanded =
        geomx_proto::templates::expand_state(state).map_err(|source| ConvertError::Templates {
            revision: state.revision,
            source,
        })?;
    Ok(expanded
        .iter()
        .map(|c| container_spec(c, &state.controller_id))
        .collect())
}

/// One role container (complete: naming no template): an empty progress regex means the
/// default parsers only.
pub fn container_spec(c: &v1::ContainerSpec, controller_id: &str) -> ContainerSpec {
    ContainerSpec {
        job: c.job.clone(),
        node: c.node.clone(),
        role: c.role.clone(),
        party: c.party.clone(),
        image: c.image.clone(),
        image_pull: ImagePull::from_wire(&c.image_pull),
        pull_timeout_ms: c.pull_timeout_ms,
        command: c.command.clone(),
        env: c.env.clone(),
        host_network: c.host_network,
        gpus: c.gpus,
        generation: c.generation,
        progress_regex: Some(c.progress_regex.clone()).filter(|r| !r.trim().is_empty()),
        finished_regex: Some(c.finished_regex.clone()).filter(|r| !r.trim().is_empty()),
        controller_id: controller_id.to_owned(),
        start: c.start,
        sandbox: c.sandbox,
        mounts: c.mounts.iter().map(mount).collect(),
        resources: c.resources.as_ref().map(resources).unwrap_or_default(),
    }
}

/// One image of the host as reported.
pub fn image_info(i: &ImageDetails) -> v1::ImageInfo {
    v1::ImageInfo {
        id: i.id.clone(),
        repo_tags: i.repo_tags.clone(),
        repo_digests: i.repo_digests.clone(),
        size_bytes: i.size_bytes,
    }
}

/// One pull as reported (its error is bounded by the pull manager).
pub fn image_pull(p: &PullStatus) -> v1::ImagePull {
    v1::ImagePull {
        image: p.image.clone(),
        state: p.state.as_str().to_owned(),
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        layers_done: p.layers_done,
        layers_total: p.layers_total,
        attempt: p.attempt,
        error: p.error.clone(),
        started_at_ms: p.started_at_ms,
        updated_at_ms: p.updated_at_ms,
        registry: p.registry.clone(),
    }
}

/// One mount; an unknown type is taken for a bind (the stricter: its source must exist).
pub fn mount(m: &v1::Mount) -> Mount {
    Mount {
        kind: if m.r#type == "volume" {
            MountKind::Volume
        } else {
            MountKind::Bind
        },
        source: m.source.clone(),
        target: m.target.clone(),
        readonly: m.readonly,
        driver: Some(m.driver.clone()).filter(|d| !d.is_empty()),
        options: m
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The limits: CPUs to Docker's billionths (a negative or absurd value is no limit).
pub fn resources(r: &v1::Resources) -> Resources {
    let nano = r.cpus * 1e9;
    Resources {
        memory_bytes: r.memory_bytes,
        nano_cpus: if (1.0..1e18).contains(&nano) {
            nano.round() as u64
        } else {
            0
        },
        pids: r.pids,
        shm_size_bytes: r.shm_size_bytes,
    }
}

/// The wire state of a node state.
pub fn container_state(s: NodeState) -> v1::ContainerState {
    match s {
        NodeState::Pending => v1::ContainerState::Pending,
        NodeState::Created => v1::ContainerState::Created,
        NodeState::Running => v1::ContainerState::Running,
        NodeState::Exited => v1::ContainerState::Exited,
        NodeState::Failed => v1::ContainerState::Failed,
        NodeState::Missing => v1::ContainerState::Missing,
    }
}

/// The wire form of a node's progress.
pub fn progress(p: &Progress) -> v1::Progress {
    v1::Progress {
        epoch: p.epoch,
        iteration: p.iteration,
        accuracy: p.accuracy,
        observed_at_ms: p.observed_at_ms,
        metrics: p.metrics.clone(),
        finished: p.finished,
    }
}

/// Longest log line the controller keeps from a report (its `jobs::MAX_LOG_LINE_LEN`); the
/// agent sends no more of a line.
pub const MAX_LOG_LINE_LEN: usize = 1024;
/// Most lines of a log tail the controller keeps from a report (its
/// `jobs::MAX_LOG_TAIL_LINES`); the agent sends the last ones.
pub const MAX_LOG_TAIL_LINES: usize = 50;
/// Longest node error the controller keeps from a report (its `jobs::MAX_NODE_ERROR_LEN`).
pub const MAX_NODE_ERROR_LEN: usize = 4096;
/// Longest network error the controller keeps from a report (its
/// `validate::MAX_NETWORK_ERROR_LEN`).
pub const MAX_NETWORK_ERROR_LEN: usize = 2048;

/// The wire form of a node's status (the role and party stay local: the controller knows
/// them from the job). The log tail and the error are cut to what the controller keeps of
/// them (a container printing one endless line must not grow the host's report).
pub fn node_status(s: &NodeStatus) -> v1::NodeStatus {
    v1::NodeStatus {
        job: s.job.clone(),
        node: s.node.clone(),
        generation: s.generation,
        state: container_state(s.state) as i32,
        container_id: s.container_id.clone(),
        ip: s.ip.clone(),
        exit_code: s.exit_code,
        restarts: s.restarts,
        progress: s.progress.as_ref().map(progress),
        log_tail: s.log_tail[s.log_tail.len().saturating_sub(MAX_LOG_TAIL_LINES)..]
            .iter()
            .map(|l| truncate(l, MAX_LOG_LINE_LEN).to_owned())
            .collect(),
        error: truncate(&s.error, MAX_NODE_ERROR_LEN).to_owned(),
        started_at_ms: s.started_at_ms,
        finished_at_ms: s.finished_at_ms,
        rendezvous: s.rendezvous.as_ref().map(|r| v1::Rendezvous {
            registered: r
                .registered
                .iter()
                .map(|g| v1::Registration {
                    role: g.role.clone(),
                    ip: g.ip.clone(),
                    port: g.port,
                })
                .collect(),
            complete: r.complete,
            count: r.count,
            expected: r.expected,
            connected: r.connected.clone(),
        }),
    }
}

/// Most image references the controller takes from a report (its `validate::MAX_IMAGES`:
/// it refuses a report with more, which would make the host lost).
pub const MAX_IMAGES: usize = 4096;
/// Longest image reference the controller takes (its `validate::MAX_IMAGE_LEN`).
pub const MAX_IMAGE_LEN: usize = 512;

/// The image references a report carries: every `repo:tag` and `repo@sha256:...` once,
/// sorted, without those the controller would refuse the whole report for (longer than
/// [`MAX_IMAGE_LEN`], control characters: no job can name them), at most [`MAX_IMAGES`].
pub fn image_references(images: &[ImageDetails]) -> Vec<String> {
    let mut refs = ImageDetails::references(images);
    refs.retain(|r| r.len() <= MAX_IMAGE_LEN && !r.chars().any(char::is_control));
    refs.truncate(MAX_IMAGES);
    refs
}

/// What a host's report is made of (see [`host_report`]).
#[derive(Clone, Debug, Default)]
pub struct ReportParts<'a> {
    /// The reporting host.
    pub host: &'a str,
    /// The revision of the last desired state applied.
    pub applied_revision: u64,
    /// The runtime's nodes; `None` until the container runtime adopted the host's
    /// containers (the report then says `nodes_known: false`).
    pub nodes: Option<&'a [NodeStatus]>,
    /// Docker's images; `None` until Docker listed them once (`images_known: false`).
    pub images: Option<&'a [ImageDetails]>,
    /// The runtime's pulls.
    pub pulls: &'a [PullStatus],
    /// The network's status (its error is cut to what the controller keeps).
    pub network: v1::NetworkStatus,
    /// The agent's version.
    pub agent_version: &'a str,
    /// TCP ports listening on the host's own addresses.
    pub listening_ports: Vec<u32>,
    /// The host's memory and CPUs.
    pub capacity: HostCapacity,
}

/// A host's report, complete (before [`crate::report::fit`] keeps it under the
/// controller's limit).
pub fn host_report(p: &ReportParts<'_>) -> v1::HostReport {
    let mut network = p.network.clone();
    network.error = truncate(&network.error, MAX_NETWORK_ERROR_LEN).to_owned();
    v1::HostReport {
        host: p.host.to_owned(),
        applied_revision: p.applied_revision,
        nodes: p
            .nodes
            .unwrap_or_default()
            .iter()
            .map(node_status)
            .collect(),
        images_known: Some(p.images.is_some()),
        images: p.images.map(image_references).unwrap_or_default(),
        image_details: p
            .images
            .unwrap_or_default()
            .iter()
            .map(image_info)
            .collect(),
        pulls: p.pulls.iter().map(image_pull).collect(),
        network: Some(network),
        agent_version: p.agent_version.to_owned(),
        listening_ports: p.listening_ports.clone(),
        nodes_known: Some(p.nodes.is_some()),
        memory_bytes: p.capacity.memory_bytes,
        cpus: p.capacity.cpus,
        omitted: Vec::new(),
        full_size_bytes: 0,
    }
}

/// The wire form of a piece of output.
pub fn log_chunk(c: LogChunk) -> v1::LogChunk {
    v1::LogChunk {
        lines: c.lines,
        stderr: c.stderr,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn state() -> v1::DesiredState {
        v1::DesiredState {
            revision: 7,
            host: "a".into(),
            subnet: "172.17.34.0/24".into(),
            cluster_cidr: "172.17.0.0/16".into(),
            peers: vec![v1::Peer {
                name: "b".into(),
                underlay_ip: "10.1.1.29".into(),
                subnet: "172.17.29.0/24".into(),
                ..Default::default()
            }],
            containers: vec![v1::ContainerSpec {
                job: "job1".into(),
                node: "a-worker-0".into(),
                role: "worker".into(),
                party: "a".into(),
                image: "geomx-test/psnode:latest".into(),
                command: vec!["python".into(), "cnn.py".into()],
                env: BTreeMap::from([("DMLC_ROLE".to_string(), "worker".to_string())]),
                host_network: false,
                gpus: 1,
                generation: 2,
                progress_regex: String::new(),
                finished_regex: String::new(),
                start: true,
                sandbox: true,
                mounts: vec![v1::Mount {
                    r#type: "volume".into(),
                    source: "geomx-job1-output".into(),
                    target: "/root/output".into(),
                    readonly: false,
                    driver: "local".into(),
                    options: BTreeMap::from([("type".to_string(), "nfs".to_string())]),
                }],
                resources: Some(v1::Resources {
                    memory_bytes: 1 << 30,
                    cpus: 2.5,
                    pids: 0,
                    shm_size_bytes: 0,
                }),
                templates: Vec::new(),
                image_pull: "if-not-present".into(),
                pull_timeout_ms: 60_000,
            }],
            heartbeat_interval_ms: 1000,
            controller_id: "ctl-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_desired_state_becomes_a_network_and_specs() {
        let s = state();
        let n = desired_network(&s).expect("converts");
        assert_eq!(n.subnet.to_string(), "172.17.34.0/24");
        assert_eq!(n.cluster.to_string(), "172.17.0.0/16");
        assert_eq!(n.peers.len(), 1);
        assert_eq!(n.peers[0].name, "b");
        assert_eq!(n.peers[0].underlay_ip.to_string(), "10.1.1.29");
        assert_eq!(n.bip().to_string(), "172.17.34.1/24");

        let specs = container_specs(&s).expect("no templates");
        assert_eq!(specs.len(), 1);
        let c = &specs[0];
        assert_eq!(c.controller_id, "ctl-1");
        assert_eq!(c.progress_regex, None);
        assert_eq!(c.gpus, 1);
        assert_eq!(c.generation, 2);
        assert!(c.start);
        assert_eq!(c.env["DMLC_ROLE"], "worker");
        assert_eq!(c.command, vec!["python", "cnn.py"]);
        assert_eq!(c.image_pull, ImagePull::IfNotPresent);
        assert_eq!(c.pull_timeout_ms, 60_000);
        assert_eq!(c.mounts.len(), 1);
        assert_eq!(c.mounts[0].kind, MountKind::Volume);
        assert_eq!(c.mounts[0].driver.as_deref(), Some("local"));
        assert_eq!(c.mounts[0].options["type"], "nfs");
        assert!(!c.mounts[0].readonly);
        assert_eq!(c.resources.memory_bytes, 1 << 30);
        assert_eq!(c.resources.nano_cpus, 2_500_000_000);
        // 0: the agent's default
        assert_eq!(c.resources.pids_limit(), geomx_runtime::DEFAULT_PIDS_LIMIT);
        // an unknown mount type is a bind (its source must exist); absurd CPUs are no limit
        let mut odd = s.containers[0].clone();
        odd.mounts[0].r#type = "tmpfs".into();
        if let Some(r) = odd.resources.as_mut() {
            r.cpus = f64::NAN;
        }
        let c = container_spec(&odd, "x");
        assert_eq!(c.mounts[0].kind, MountKind::Bind);
        assert_eq!(c.resources.nano_cpus, 0);
        let mut with_regex = s.containers[0].clone();
        with_regex.progress_regex = "it=(?P<iteration>\\d+)".into();
        assert_eq!(
            container_spec(&with_regex, "x").progress_regex.as_deref(),
            Some("it=(?P<iteration>\\d+)")
        );
        assert_eq!(container_spec(&with_regex, "x").finished_regex, None);
        with_regex.finished_regex = "^done$".into();
        assert_eq!(
            container_spec(&with_regex, "x").finished_regex.as_deref(),
            Some("^done$")
        );
    }

    #[test]
    fn containers_are_expanded_with_their_templates_before_the_runtime_sees_them() {
        let mut s = state();
        let mut second = s.containers[0].clone();
        second.node = "a-worker-1".into();
        second
            .env
            .insert("GEOMX_NODE".to_string(), "a-worker-1".to_string());
        s.containers.push(second);
        let full = container_specs(&s).expect("no templates");
        (s.templates, s.containers) = geomx_proto::templates::share(s.containers.clone());
        assert!(!s.templates.is_empty(), "the two workers share their env");
        assert!(s.containers.iter().all(|c| c.command.is_empty()));
        assert_eq!(container_specs(&s).expect("expands"), full);
        s.templates.clear();
        let e = container_specs(&s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "desired state revision 7: container job1/a-worker-0 names template \"job1\", which the desired state does not hold"
        );
    }

    #[test]
    fn the_clusters_backend_reaches_the_network() {
        use geomx_net::Backend;
        for (wire, want) in [
            ("", Backend::Auto),
            ("auto", Backend::Auto),
            ("host-gw", Backend::HostGw),
            ("wireguard", Backend::Wireguard),
            ("vxlan", Backend::Vxlan),
        ] {
            let mut s = state();
            s.backend = wire.into();
            assert_eq!(
                desired_network(&s).expect("converts").backend,
                want,
                "{wire:?}"
            );
        }
        let mut s = state();
        s.backend = "weave".into();
        assert_eq!(
            desired_network(&s).unwrap_err().to_string(),
            "desired state revision 7: backend \"weave\" is not \"auto\", \"host-gw\", \"wireguard\" or \"vxlan\""
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut s = state();
        s.peers[0].underlay_ip = "10.1.1.299".into();
        let e = desired_network(&s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "desired state revision 7: peers[b].underlay_ip \"10.1.1.299\" is not an IPv4 address"
        );
        let mut s = state();
        s.subnet = String::new();
        assert!(
            desired_network(&s)
                .unwrap_err()
                .to_string()
                .contains("subnet")
        );
    }

    #[test]
    fn the_report_limits_are_the_controllers() {
        use geomx_controller::{jobs, validate};
        assert_eq!(MAX_LOG_LINE_LEN, jobs::MAX_LOG_LINE_LEN);
        assert_eq!(MAX_LOG_TAIL_LINES, jobs::MAX_LOG_TAIL_LINES);
        assert_eq!(MAX_NODE_ERROR_LEN, jobs::MAX_NODE_ERROR_LEN);
        assert_eq!(MAX_NETWORK_ERROR_LEN, validate::MAX_NETWORK_ERROR_LEN);
        assert_eq!(MAX_IMAGES, validate::MAX_IMAGES);
        assert_eq!(MAX_IMAGE_LEN, validate::MAX_IMAGE_LEN);
    }

    /// A host with more image references than the controller takes (or one it would refuse)
    /// still reports: the references it can take, never the whole report refused.
    #[test]
    fn image_references_are_what_the_controller_takes() {
        let many = ImageDetails {
            id: "sha256:1".into(),
            repo_tags: (0..5000).map(|k| format!("img:{k:05}")).collect(),
            repo_digests: vec![
                format!("img@sha256:{}", "0".repeat(600)),
                "img\u{7}:bell".into(),
                "img:00001".into(),
            ],
            size_bytes: 1,
        };
        let refs = image_references(std::slice::from_ref(&many));
        assert_eq!(refs.len(), MAX_IMAGES);
        assert_eq!(refs[0], "img:00000");
        assert_eq!(refs[MAX_IMAGES - 1], format!("img:{:05}", MAX_IMAGES - 1));
        assert!(refs.windows(2).all(|w| w[0] < w[1]));
        let few = ImageDetails {
            repo_tags: vec!["b:1".into(), "a:1".into(), "\u{0}x".into()],
            ..many
        };
        assert_eq!(image_references(&[few]), ["a:1", "b:1", "img:00001"]);
    }

    /// A container printing one endless line (or a Docker error of megabytes) cannot grow
    /// the report past what the controller keeps of it anyway.
    #[test]
    fn log_tails_and_errors_are_cut_to_what_the_controller_keeps() {
        let s = NodeStatus {
            job: "j".into(),
            node: "w0".into(),
            state: NodeState::Failed,
            log_tail: (0..80)
                .map(|k| format!("{k} {}", "é".repeat(1 << 20)))
                .collect(),
            error: "x".repeat(1 << 20),
            ..Default::default()
        };
        let w = node_status(&s);
        assert_eq!(w.log_tail.len(), MAX_LOG_TAIL_LINES);
        assert!(w.log_tail[0].starts_with("30 "), "the last lines stay");
        assert!(
            w.log_tail
                .iter()
                .all(|l| l.len() <= MAX_LOG_LINE_LEN && l.len() > MAX_LOG_LINE_LEN - 4)
        );
        assert_eq!(w.error.len(), MAX_NODE_ERROR_LEN);
        let short = NodeStatus {
            log_tail: vec!["a".into(), String::new()],
            error: "exit 1".into(),
            ..s
        };
        let w = node_status(&short);
        assert_eq!(w.log_tail, ["a", ""]);
        assert_eq!(w.error, "exit 1");
    }

    #[test]
    fn a_host_report_is_made_of_its_parts() {
        let nodes = vec![NodeStatus {
            job: "j".into(),
            node: "w0".into(),
            state: NodeState::Running,
            ..Default::default()
        }];
        let images = vec![ImageDetails {
            id: "sha256:1".into(),
            repo_tags: vec!["b:1".into(), "a:1".into()],
            repo_digests: vec!["a@sha256:2".into()],
            size_bytes: 5,
        }];
        let parts = ReportParts {
            host: "a",
            applied_revision: 4,
            nodes: Some(&nodes),
            images: Some(&images),
            pulls: &[],
            network: v1::NetworkStatus {
                converged: false,
                routes: 1,
                error: "n".repeat(10_000),
                links: vec![],
            },
            agent_version: "0.1.0",
            listening_ports: vec![22],
            capacity: HostCapacity {
                memory_bytes: 1 << 30,
                cpus: 2,
            },
        };
        let r = host_report(&parts);
        assert_eq!((r.host.as_str(), r.applied_revision), ("a", 4));
        assert_eq!(r.nodes.len(), 1);
        assert_eq!((r.nodes_known, r.images_known), (Some(true), Some(true)));
        assert_eq!(r.images, ["a:1", "a@sha256:2", "b:1"]);
        assert_eq!(r.image_details.len(), 1);
        let net = r.network.as_ref().expect("network");
        assert_eq!(net.error.len(), MAX_NETWORK_ERROR_LEN);
        assert_eq!((r.memory_bytes, r.cpus), (1 << 30, 2));
        assert!(r.omitted.is_empty());
        // before the runtime and Docker's first listing: not known, rather than empty
        let r = host_report(&ReportParts {
            nodes: None,
            images: None,
            ..parts
        });
        assert_eq!((r.nodes_known, r.images_known), (Some(false), Some(false)));
        assert!(r.nodes.is_empty() && r.images.is_empty() && r.image_details.is_empty());
    }

    #[test]
    fn statuses_go_back_on_the_wire() {
        let s = NodeStatus {
            job: "job1".into(),
            node: "a-worker-0".into(),
            role: "worker".into(),
            party: "a".into(),
            generation: 3,
            state: NodeState::Failed,
            container_id: "abc".into(),
            ip: "172.17.34.2".into(),
            exit_code: Some(1),
            restarts: 0,
            progress: Some(Progress {
                epoch: 1,
                iteration: 12,
                accuracy: Some(0.5),
                observed_at_ms: 99,
                metrics: BTreeMap::from([("loss".to_string(), 0.25)]),
                finished: true,
            }),
            log_tail: vec!["boom".into()],
            error: "exit 1".into(),
            started_at_ms: 10,
            finished_at_ms: 20,
            rendezvous: None,
        };
        let w = node_status(&s);
        assert_eq!(w.state, v1::ContainerState::Failed as i32);
        assert_eq!(w.exit_code, Some(1));
        assert_eq!(w.generation, 3);
        assert_eq!(w.ip, "172.17.34.2");
        let p = w.progress.expect("progress");
        assert_eq!((p.epoch, p.iteration, p.accuracy), (1, 12, Some(0.5)));
        assert_eq!(p.metrics["loss"], 0.25);
        assert!(p.finished, "the final line travels to the controller");
        assert_eq!(w.log_tail, vec!["boom"]);
        assert_eq!((w.started_at_ms, w.finished_at_ms), (10, 20));
        for (ours, wire) in [
            (NodeState::Pending, v1::ContainerState::Pending),
            (NodeState::Created, v1::ContainerState::Created),
            (NodeState::Running, v1::ContainerState::Running),
            (NodeState::Exited, v1::ContainerState::Exited),
            (NodeState::Missing, v1::ContainerState::Missing),
        ] {
            assert_eq!(container_state(ours), wire);
        }
        let c = log_chunk(LogChunk {
            lines: vec!["a".into(), "b".into()],
            stderr: true,
        });
        assert_eq!(c.lines, vec!["a", "b"]);
        assert!(c.stderr);
    }
}
