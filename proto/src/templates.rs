//! What the role containers of a desired state have in common, sent once.
//!
//! Every node of a job carries the job's `[env]` and its role's command: a 128-worker job
//! with 40 KB of `[env.all]` would repeat those 40 KB 128 times in its host's
//! `DesiredState`. The controller [`share`]s them before sending: per job, then per job and
//! role, the variables (and command) every container of the group has go into one
//! [`ContainerTemplate`] that the containers name. The agent [`expand`]s them back before
//! its runtime sees them: each container is then exactly what it was before sharing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;

use crate::v1::{ContainerSpec, ContainerTemplate, DesiredState};

/// The gRPC metadata key with which an agent asks for shared desired states on
/// `AgentService.Watch` (value `1`). An agent that does not send it (one from before
/// templates) gets every container complete.
pub const EXPANDS_TEMPLATES_HEADER: &str = "geomx-expands-templates";

/// A `Watch` request asking for shared desired states (see [`EXPANDS_TEMPLATES_HEADER`]).
pub fn watch_request(request: crate::v1::WatchRequest) -> tonic::Request<crate::v1::WatchRequest> {
    let mut r = tonic::Request::new(request);
    r.metadata_mut().insert(
        EXPANDS_TEMPLATES_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    r
}

/// Whether a `Watch` request asks for shared desired states.
pub fn expands_templates<T>(request: &tonic::Request<T>) -> bool {
    request
        .metadata()
        .get(EXPANDS_TEMPLATES_HEADER)
        .is_some_and(|v| v == "1")
}

/// A desired state whose containers cannot be expanded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A container names a template the state does not hold.
    #[error(
        "container {job}/{node} names template {template:?}, which the desired state does not hold"
    )]
    Unknown {
        /// The container's job.
        job: String,
        /// The container's node.
        node: String,
        /// The missing template.
        template: String,
    },
    /// Two templates have the same name.
    #[error("the desired state holds template {0:?} twice")]
    Duplicate(String),
}

/// How containers are grouped, in order: by job, then by job and role.
fn group_keys(c: &ContainerSpec) -> [String; 2] {
    [c.job.clone(), format!("{}/{}", c.job, c.role)]
}

/// Moves what the containers of each group (job; job and role) have in common into
/// templates, where that makes the state smaller. Containers that already name templates
/// are left as they are. Expanding the result ([`expand`]) gives `containers` back, in
/// their order.
pub fn share(mut containers: Vec<ContainerSpec>) -> (Vec<ContainerTemplate>, Vec<ContainerSpec>) {
    let eligible: Vec<usize> = (0..containers.len())
        .filter(|&i| containers[i].templates.is_empty())
        .collect();
    let mut templates = Vec::new();
    let mut names: BTreeSet<String> = containers
        .iter()
        .flat_map(|c| c.templates.iter().cloned())
        .collect();
    for level in 0..2 {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in &eligible {
            let [job, role] = group_keys(&containers[i]);
            groups
                .entry(if level == 0 { job } else { role })
                .or_default()
                .push(i);
        }
        for (name, members) in groups {
            if members.len() < 2 || names.contains(&name) {
                continue;
            }
            let first = &containers[members[0]];
            let mut env = first.env.clone();
            let same_command = !first.command.is_empty()
                && members
                    .iter()
                    .all(|&i| containers[i].command == first.command);
            let command = if same_command {
                first.command.clone()
            } else {
                Vec::new()
            };
            for &i in &members[1..] {
                let other = &containers[i].env;
                env.retain(|k, v| other.get(k) == Some(v));
            }
            // only where it saves bytes: what the members drop against the template and
            // the names they carry instead
            let body = ContainerTemplate {
                name: String::new(),
                command: command.clone(),
                env: env.clone(),
            }
            .encoded_len();
            let saved = body.saturating_mul(members.len());
            let cost = body + name.len() + 4 + members.len() * (name.len() + 2);
            if env.is_empty() && command.is_empty() || saved <= cost {
                continue;
            }
            for &i in &members {
                let c = &mut containers[i];
                c.env.retain(|k, _| !env.contains_key(k));
                if same_command {
                    c.command.clear();
                }
                c.templates.push(name.clone());
            }
            names.insert(name.clone());
            templates.push(ContainerTemplate { name, command, env });
        }
    }
    (templates, containers)
}

/// The complete containers of a shared list: each with its templates' env and command
/// (see `ContainerSpec.templates`), naming no template.
pub fn expand(
    templates: &[ContainerTemplate],
    containers: &[ContainerSpec],
) -> Result<Vec<ContainerSpec>, TemplateError> {
    let mut by_name: HashMap<&str, &ContainerTemplate> = HashMap::with_capacity(templates.len());
    for t in templates {
        if by_name.insert(t.name.as_str(), t).is_some() {
            return Err(TemplateError::Duplicate(t.name.clone()));
        }
    }
    containers
        .iter()
        .map(|c| {
            if c.templates.is_empty() {
                return Ok(c.clone());
            }
            let mut env = BTreeMap::new();
            let mut command: &[String] = &[];
            for name in &c.templates {
                let t = by_name
                    .get(name.as_str())
                    .ok_or_else(|| TemplateError::Unknown {
                        job: c.job.clone(),
                        node: c.node.clone(),
                        template: name.clone(),
                    })?;
                env.extend(t.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                if !t.command.is_empty() {
                    command = &t.command;
                }
            }
            env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            Ok(ContainerSpec {
                command: if c.command.is_empty() {
                    command.to_vec()
                } else {
                    c.command.clone()
                },
                env,
                templates: Vec::new(),
                ..c.clone()
            })
        })
        .collect()
}

/// The complete containers of `state` ([`expand`] of its templates and containers).
pub fn expand_state(state: &DesiredState) -> Result<Vec<ContainerSpec>, TemplateError> {
    expand(&state.templates, &state.containers)
}

/// How many bytes `containers` take in a desired state once shared ([`share`]): the
/// encoded containers and templates fields.
pub fn shared_len(containers: Vec<ContainerSpec>) -> usize {
    let (templates, containers) = share(containers);
    DesiredState {
        templates,
        containers,
        ..Default::default()
    }
    .encoded_len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        job: &str,
        node: &str,
        role: &str,
        env: &[(&str, &str)],
        cmd: &[&str],
    ) -> ContainerSpec {
        ContainerSpec {
            job: job.into(),
            node: node.into(),
            role: role.into(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            command: cmd.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn workers(job: &str, n: usize, payload: &str) -> Vec<ContainerSpec> {
        (0..n)
            .map(|i| {
                let node = format!("p-worker-{i}");
                spec(
                    job,
                    &node,
                    "worker",
                    &[
                        ("PAYLOAD", payload),
                        ("DMLC_ROLE", "worker"),
                        ("GEOMX_NODE", node.as_str()),
                    ],
                    &["python", "train.py"],
                )
            })
            .collect()
    }

    #[test]
    fn a_job_s_common_env_and_command_are_sent_once_and_expand_back_exactly() {
        let payload = "x".repeat(40_000);
        let mut all = workers("j", 128, &payload);
        all.push(spec(
            "j",
            "p-scheduler",
            "scheduler",
            &[("PAYLOAD", &payload), ("DMLC_ROLE", "scheduler")],
            &[],
        ));
        all.push(spec("k", "p-worker-0", "worker", &[("A", "1")], &["sh"]));
        let full = DesiredState {
            containers: all.clone(),
            ..Default::default()
        }
        .encoded_len();
        let (templates, shared) = share(all.clone());
        let names: Vec<&str> = templates.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["j", "j/worker"]);
        assert_eq!(templates[0].env.keys().collect::<Vec<_>>(), ["PAYLOAD"]);
        assert!(templates[0].command.is_empty(), "the scheduler has none");
        assert_eq!(templates[1].command, ["python", "train.py"]);
        assert_eq!(templates[1].env["DMLC_ROLE"], "worker");
        assert_eq!(shared[0].templates, ["j", "j/worker"]);
        assert_eq!(shared[0].env.keys().collect::<Vec<_>>(), ["GEOMX_NODE"]);
        assert!(shared[0].command.is_empty());
        assert_eq!(shared[128].templates, ["j"], "alone in its role");
        assert!(shared[129].templates.is_empty(), "alone in its job");
        let len = shared_len(all.clone());
        assert!(full > 5_000_000 && len < 60_000, "{full} -> {len}");
        assert_eq!(expand(&templates, &shared).expect("expands"), all);
    }

    #[test]
    fn commands_and_env_that_differ_stay_in_the_containers() {
        let all = vec![
            spec("j", "w0", "worker", &[("A", "1"), ("B", "2")], &["a", "0"]),
            spec("j", "w1", "worker", &[("A", "1"), ("B", "3")], &["a", "1"]),
            spec("j", "w2", "worker", &[("A", "1")], &[]),
            spec("m", "w0", "worker", &[("A", "1")], &[]),
            spec("m", "w1", "worker", &[("B", "1")], &[]),
        ];
        let (templates, shared) = share(all.clone());
        assert_eq!(templates.len(), 1, "{templates:?}");
        assert_eq!(templates[0].name, "j");
        assert!(templates[0].command.is_empty());
        assert_eq!(shared[0].command, ["a", "0"]);
        assert!(shared[2].command.is_empty());
        assert!(shared[3].templates.is_empty() && shared[4].templates.is_empty());
        assert_eq!(expand(&templates, &shared).expect("expands"), all);
        // a state without templates expands to itself
        assert_eq!(expand(&[], &all).expect("expands"), all);
    }

    /// Random desired states (jobs, roles, overlapping env, equal or different commands,
    /// containers that already name templates): expanding what `share` made gives every
    /// container back exactly, and sharing never makes a state larger than a few bytes
    /// per container.
    #[test]
    fn sharing_then_expanding_gives_every_container_back() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(10);
        let pick =
            |rng: &mut StdRng, from: &[&str]| from[rng.random_range(0..from.len())].to_owned();
        for _ in 0..500 {
            let n = rng.random_range(0..12);
            let all: Vec<ContainerSpec> = (0..n)
                .map(|i| {
                    let env = (0..rng.random_range(0..6))
                        .map(|_| {
                            (
                                pick(&mut rng, &["A", "B", "C", "D", "DMLC_ROLE", ""]),
                                pick(&mut rng, &["1", "2", "", "x=y", "{{p-scheduler.ip}}"]),
                            )
                        })
                        .collect();
                    let command = match rng.random_range(0..3) {
                        0 => Vec::new(),
                        1 => vec!["python".to_owned(), "train.py".to_owned()],
                        _ => vec!["sh".to_owned(), format!("{i}")],
                    };
                    ContainerSpec {
                        job: pick(&mut rng, &["j", "k"]),
                        node: format!("n{i}"),
                        role: pick(&mut rng, &["worker", "server", "scheduler"]),
                        env,
                        command,
                        templates: if rng.random_range(0..10) == 0 {
                            vec!["given".to_owned()]
                        } else {
                            Vec::new()
                        },
                        ..Default::default()
                    }
                })
                .collect();
            let given = ContainerTemplate {
                name: "given".into(),
                ..Default::default()
            };
            let (mut templates, shared) = share(all.clone());
            templates.push(given.clone());
            let back = expand(&templates, &shared).expect("expands");
            let want = expand(&[given], &all).expect("expands");
            assert_eq!(back, want, "{all:?}");
            let full = DesiredState {
                containers: all.clone(),
                ..Default::default()
            }
            .encoded_len();
            assert!(shared_len(all) <= full + 4 * n, "sharing grew the state");
        }
    }

    #[test]
    fn a_missing_or_doubled_template_is_an_error() {
        let (templates, shared) = share(workers("j", 2, "p"));
        let e = expand(&templates[1..], &shared).unwrap_err();
        assert_eq!(
            e.to_string(),
            "container j/p-worker-0 names template \"j\", which the desired state does not hold"
        );
        let twice = [templates[0].clone(), templates[0].clone()];
        assert_eq!(
            expand(&twice, &shared).unwrap_err(),
            TemplateError::Duplicate("j".into())
        );
    }
}
