//! Between the wire (`geomx.v1` messages) and the agent's crates: the desired state into
//! `geomx-net`'s [`DesiredNetwork`] and `geomx-runtime`'s [`ContainerSpec`]s, the runtime's
//! [`NodeStatus`]es and log chunks back into messages.

use std::net::Ipv4Addr;

use geomx_net::{DesiredNetwork, Peer};
use geomx_proto::v1;
use geomx_runtime::{
    ContainerSpec, ImageDetails, ImagePull, LogChunk, Mount, MountKind, NodeState, NodeStatus,
    Progress, PullStatus, Resources,
};
use ipnet::Ipv4Net;

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

/// The wire form of a node's status (the role and party stay local: the controller knows
/// them from the job).
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
        log_tail: s.log_tail.clone(),
        error: s.error.clone(),
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
