//! Admission: can a compiled job run on the hosts it names, right now?
//!
//! Checked before anything is stored or started ([`check`]); every problem is reported, not
//! only the first:
//! * every host the job names is registered and ready (not lost, not left) and not cordoned;
//! * with `image_pull = "never"`: every image a node needs is present on its host (from the
//!   host's last report; otherwise hosts pull what they lack, see [`super::images`]);
//! * network "pseudo": no scheduler port is already listening on the host, or bound by a
//!   scheduler of another active pseudo job on the same host.

use std::collections::{BTreeMap, BTreeSet};

use geomx_job::{Network, Plan};

use crate::membership::HostView;
use crate::store::HostState;

/// A port a scheduler of an active pseudo job binds on its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortUse {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Job holding it.
    pub job: String,
    /// Node holding it.
    pub node: String,
}

/// The ports the pseudo schedulers of `plan` bind, with their hosts.
pub fn scheduler_ports(plan: &Plan) -> Vec<PortUse> {
    if plan.network != Network::Pseudo {
        return Vec::new();
    }
    plan.nodes
        .iter()
        .filter_map(|n| {
            n.binds.map(|port| PortUse {
                host: n.host.clone(),
                port,
                job: plan.job.clone(),
                node: n.name.clone(),
            })
        })
        .collect()
}

/// Every reason `plan` cannot be placed on `hosts` now (empty when it can). `taken` are the
/// ports held by other active pseudo jobs.
pub fn check(plan: &Plan, hosts: &[HostView], taken: &[PortUse]) -> Vec<String> {
    let by_name: BTreeMap<&str, &HostView> =
        hosts.iter().map(|h| (h.record.name.as_str(), h)).collect();
    let mut problems = Vec::new();
    let mut usable = BTreeSet::new();
    for host in plan.hosts() {
        let nodes: Vec<&str> = plan.nodes_on(host).map(|n| n.name.as_str()).collect();
        let nodes = super::engine::list_names(nodes, 4);
        match by_name.get(host) {
            None => {
                let known: Vec<&str> = by_name.keys().copied().collect();
                problems.push(format!(
                    "host {host} (nodes {nodes}) is not registered with the controller (registered: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ));
            }
            Some(h) if h.record.cordoned => problems.push(format!(
                "host {host} (nodes {nodes}) is cordoned: it takes no new job (geomxctl hosts uncordon {host})"
            )),
            Some(h) => match h.record.state {
                HostState::Ready => {
                    usable.insert(host);
                }
                HostState::Lost => problems.push(format!(
                    "host {host} (nodes {nodes}) is lost: no heartbeat for {}",
                    humantime::format_duration(std::time::Duration::from_secs(
                        h.heartbeat_age.as_secs()
                    ))
                )),
                HostState::Left => problems.push(format!(
                    "host {host} (nodes {nodes}) left the cluster; start its agent again to rejoin"
                )),
            },
        }
    }
    // with image_pull "if-not-present" or "always" the hosts pull what they lack
    let pulls = plan.image_pull != geomx_job::ImagePull::Never;
    for host in usable.iter().filter(|_| !pulls) {
        let Some(view) = by_name.get(host) else {
            continue;
        };
        let needed: BTreeSet<&str> = plan.nodes_on(host).map(|n| n.image.as_str()).collect();
        for image in needed {
            if view.record.images.is_empty() {
                problems.push(format!(
                    "image {image} is not known to be on host {host}: its agent has not reported any image yet"
                ));
            } else if !view
                .record
                .images
                .iter()
                .any(|have| image_matches(image, have))
            {
                problems.push(format!(
                    "image {image} is not present on host {host} and the job's image_pull is \"never\" (load it there with docker load, or let the host pull it: image_pull = \"if-not-present\")"
                ));
            }
        }
    }
    for want in scheduler_ports(plan) {
        if !usable.contains(want.host.as_str()) {
            continue;
        }
        if let Some(view) = by_name.get(want.host.as_str())
            && view.listening_ports.contains(&u32::from(want.port))
        {
            problems.push(format!(
                "port {} of node {} is already in use on host {} (network \"pseudo\" binds the host's ports)",
                want.port, want.node, want.host
            ));
            continue;
        }
        if let Some(other) = taken
            .iter()
            .find(|t| t.host == want.host && t.port == want.port && t.job != plan.job)
        {
            problems.push(format!(
                "port {} of node {} on host {} is bound by node {} of active job {}",
                want.port, want.node, want.host, other.node, other.job
            ));
        }
    }
    problems
}

/// Whether image reference `wanted` names the image `have` (as an agent lists it,
/// `repo:tag`): a missing tag means `latest`, Docker Hub's `docker.io/` and `library/`
/// prefixes are optional. A reference by digest cannot be checked and always matches.
pub fn image_matches(wanted: &str, have: &str) -> bool {
    if wanted.contains('@') {
        return true;
    }
    normalize_image(wanted) == normalize_image(have)
}

fn normalize_image(image: &str) -> String {
    let image = image.trim();
    let image = image.strip_prefix("docker.io/").unwrap_or(image);
    let image = image.strip_prefix("library/").unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{HostRecord, NetworkRecord};
    use std::time::Duration;

    fn host(name: &str, state: HostState, images: &[&str], ports: &[u32]) -> HostView {
        HostView {
            record: HostRecord {
                name: name.into(),
                underlay_ip: "10.1.1.1".parse().unwrap(),
                subnet: None,
                last_subnet: None,
                pinned_subnet: None,
                state,
                state_since_ms: 0,
                registered_at_ms: 0,
                agent_version: String::new(),
                agent_url: String::new(),
                network: NetworkRecord::default(),
                images: images.iter().map(|s| s.to_string()).collect(),
                cordoned: false,
                wireguard: None,
            },
            heartbeat_age: Duration::from_secs(12),
            containers: 0,
            listening_ports: ports.to_vec(),
            image_details: Vec::new(),
            pulls: Vec::new(),
        }
    }

    const ROUTED: &str = r#"
name = "j"
mode = "hips"
image = "geomx/img:1"
image_pull = "never"
[central]
host = "a"
[[party]]
name = "p"
hosts = ["b"]
workers = 1
[[party]]
name = "q"
hosts = ["c"]
workers = 1
"#;

    const PSEUDO: &str = r#"
name = "pj"
mode = "ps"
image = "img"
network = "pseudo"
[[party]]
name = "p"
hosts = ["a"]
workers = 1
scheduler_port = 9100
"#;

    #[test]
    fn hosts_and_images() {
        let plan = geomx_job::plan("t", ROUTED).unwrap();
        let hosts = [
            host("a", HostState::Ready, &["geomx/img:1"], &[]),
            host("b", HostState::Lost, &["geomx/img:1"], &[]),
            host("d", HostState::Ready, &[], &[]),
        ];
        let p = check(&plan, &hosts, &[]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with(
                "host b (nodes p-scheduler, p-server, p-worker-0) is lost: no heartbeat for 12s"
            ),
            "{}",
            p[0]
        );
        assert!(p[1].starts_with("host c (nodes q-scheduler"), "{}", p[1]);
        assert!(p[1].contains("registered: a, b, d"), "{}", p[1]);

        let hosts = [
            host("a", HostState::Ready, &["other:1"], &[]),
            host("b", HostState::Left, &[], &[]),
            host("c", HostState::Ready, &[], &[]),
        ];
        let p = check(&plan, &hosts, &[]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("left the cluster"));
        assert!(
            p[1].starts_with("image geomx/img:1 is not present on host a"),
            "{}",
            p[1]
        );
        assert!(p[2].contains("has not reported any image"), "{}", p[2]);

        // hosts that may pull: a missing image is no problem of placement
        let pulling = ROUTED.replace("image_pull = \"never\"", "image_pull = \"if-not-present\"");
        let plan = geomx_job::plan("t", &pulling).unwrap();
        let hosts = [
            host("a", HostState::Ready, &["other:1"], &[]),
            host("b", HostState::Ready, &[], &[]),
            host("c", HostState::Ready, &["geomx/img:1"], &[]),
        ];
        assert_eq!(check(&plan, &hosts, &[]), Vec::<String>::new());
    }

    #[test]
    fn pseudo_ports() {
        let plan = geomx_job::plan("t", PSEUDO).unwrap();
        let ok = [host("a", HostState::Ready, &["img:latest"], &[22])];
        assert!(check(&plan, &ok, &[]).is_empty());
        let busy = [host("a", HostState::Ready, &["img:latest"], &[9100])];
        let p = check(&plan, &busy, &[]);
        assert_eq!(
            p,
            [
                "port 9100 of node p-scheduler is already in use on host a (network \"pseudo\" binds the host's ports)"
            ]
        );
        let taken = [PortUse {
            host: "a".into(),
            port: 9100,
            job: "other".into(),
            node: "x-scheduler".into(),
        }];
        let p = check(&plan, &ok, &taken);
        assert_eq!(
            p,
            [
                "port 9100 of node p-scheduler on host a is bound by node x-scheduler of active job other"
            ]
        );
        assert_eq!(scheduler_ports(&plan).len(), 1);
    }

    #[test]
    fn image_references() {
        assert!(image_matches("img", "img:latest"));
        assert!(image_matches("docker.io/library/busybox", "busybox:latest"));
        assert!(image_matches(
            "lizonghango00o1/geomx:cpu-only",
            "lizonghango00o1/geomx:cpu-only"
        ));
        assert!(!image_matches(
            "lizonghango00o1/geomx:cu80",
            "lizonghango00o1/geomx:cpu-only"
        ));
        assert!(image_matches("localhost:5000/x", "localhost:5000/x:latest"));
        assert!(image_matches("x@sha256:abc", "y:1"));
    }
}
