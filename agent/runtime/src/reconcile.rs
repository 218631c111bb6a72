//! Desired containers vs. the labelled containers Docker has: a pure planning function.
//!
//! A desired node calls for up to two containers: its network sandbox (every docker0 node,
//! from the moment it is desired) and its role container (once the spec says `start`).
//! Rules, per container (job, node, kind):
//!
//! - desired, no container, never seen by this runtime → [`Action::Create`];
//! - desired, no container, but this runtime created or adopted one with the same spec
//!   hash → [`Action::Missing`]: it was removed behind geomx's back; it is reported, not
//!   recreated (geomx restarts whole jobs, never single nodes);
//! - desired, a container with the same spec hash → [`Action::Keep`] whatever its state:
//!   an ended container stays (with its exit code and log tail) until the desired state
//!   drops it; a container that was created but never started (an agent died between
//!   create and start) gets one [`Action::Start`];
//! - desired, a container with another spec hash (generation, image, env, sandbox ...) →
//!   [`Action::Replace`];
//! - a labelled container nobody desires (or a second one for the same node and kind, or
//!   one without job/node labels) → [`Action::Remove`].
//!
//! `actual` holds only the containers this agent created ([`crate::ownership::claim`] of
//! the labelled ones Docker lists): a labelled container the agent did not create (a
//! committed copy of a role container run by hand) is never kept, replaced or removed.
//!
//! Applying the same desired state twice, or after an agent restart (which adopts the
//! running containers), yields only `Keep`s.

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::{ActualContainer, EngineState};
use crate::spec::{
    ContainerKind, ContainerSpec, LABEL_JOB, LABEL_NODE, LABEL_SPEC, NodeKey, SandboxConfig,
};

/// Identifies a container of a node: (job, node, kind).
pub type ContainerKey = (String, String, ContainerKind);

/// Why a container goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its node (or its role container) is not in the desired state (job cancelled,
    /// failed, finished, unknown; or `start` was withdrawn).
    NotDesired,
    /// Another container already serves the same node.
    Duplicate,
    /// It is labelled as geomx's but lacks job/node labels.
    Unlabelled,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create and start a container of the node.
    Create {
        /// Sandbox or role.
        kind: ContainerKind,
        /// The node's spec.
        spec: ContainerSpec,
        /// The container's spec hash.
        hash: String,
    },
    /// Stop and remove `old_id`, then create and start a container of the node.
    Replace {
        /// Sandbox or role.
        kind: ContainerKind,
        /// The container that goes.
        old_id: String,
        /// The node's spec.
        spec: ContainerSpec,
        /// The container's spec hash.
        hash: String,
    },
    /// Start a created container that was never started.
    Start {
        /// Sandbox or role.
        kind: ContainerKind,
        /// Container id.
        id: String,
        /// Its node.
        key: NodeKey,
    },
    /// Nothing to do.
    Keep {
        /// Sandbox or role.
        kind: ContainerKind,
        /// Container id.
        id: String,
        /// Its node.
        key: NodeKey,
    },
    /// Stop (short timeout) and remove.
    Remove {
        /// Sandbox or role.
        kind: ContainerKind,
        /// Container id.
        id: String,
        /// Container name.
        name: String,
        /// Its node, if labelled.
        key: Option<NodeKey>,
        /// Why.
        reason: RemoveReason,
    },
    /// Desired and seen before, but gone: report it, do not recreate it.
    Missing {
        /// Sandbox or role.
        kind: ContainerKind,
        /// The node's spec.
        spec: ContainerSpec,
    },
    /// Not planned (never produced by [`plan`]): the runtime refused the spec as invalid
    /// (bad name, bad regex, listed twice); the outcome carries the reason.
    Invalid {
        /// The spec.
        spec: ContainerSpec,
    },
}

impl Action {
    /// Whether the action changes anything on the host.
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            Action::Create { .. }
                | Action::Replace { .. }
                | Action::Start { .. }
                | Action::Remove { .. }
        )
    }

    /// The kind of container the action is about (`None` for [`Action::Invalid`]).
    pub fn kind(&self) -> Option<ContainerKind> {
        match self {
            Action::Create { kind, .. }
            | Action::Replace { kind, .. }
            | Action::Start { kind, .. }
            | Action::Keep { kind, .. }
            | Action::Remove { kind, .. }
            | Action::Missing { kind, .. } => Some(*kind),
            Action::Invalid { .. } => None,
        }
    }
}

/// The (job, node) of a labelled container.
pub fn actual_key(c: &ActualContainer) -> Option<NodeKey> {
    let job = c.labels.get(LABEL_JOB).filter(|s| !s.is_empty())?;
    let node = c.labels.get(LABEL_NODE).filter(|s| !s.is_empty())?;
    Some((job.clone(), node.clone()))
}

/// The containers the desired nodes call for: (kind, spec, name, hash), sandboxes first.
pub fn desired_containers<'a>(
    desired: &'a [ContainerSpec],
    agent_url: &str,
    sandbox: &SandboxConfig,
) -> Vec<(ContainerKind, &'a ContainerSpec, String, String)> {
    let mut v = Vec::new();
    for spec in desired.iter().filter(|s| s.has_sandbox()) {
        v.push((
            ContainerKind::Sandbox,
            spec,
            spec.sandbox_name(),
            spec.sandbox_hash(sandbox),
        ));
    }
    for spec in desired.iter().filter(|s| s.start) {
        v.push((
            ContainerKind::Role,
            spec,
            spec.container_name(),
            spec.spec_hash(agent_url, sandbox),
        ));
    }
    v
}

/// Plans the way from `actual` to `desired`.
///
/// - `agent_url`, `sandbox`: what the containers are made with (part of the spec hashes);
/// - `seen`: spec hash per container of every container this runtime created or adopted
///   and has not removed itself;
/// - `start_attempted`: ids of containers this runtime already tried to start.
pub fn plan(
    desired: &[ContainerSpec],
    actual: &[ActualContainer],
    agent_url: &str,
    sandbox: &SandboxConfig,
    seen: &BTreeMap<ContainerKey, String>,
    start_attempted: &BTreeSet<String>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut by_key: BTreeMap<ContainerKey, Vec<&ActualContainer>> = BTreeMap::new();
    for c in actual {
        let kind = ContainerKind::of_labels(&c.labels);
        match actual_key(c) {
            Some((job, node)) => by_key.entry((job, node, kind)).or_default().push(c),
            None => actions.push(Action::Remove {
                kind,
                id: c.id.clone(),
                name: c.name.clone(),
                key: None,
                reason: RemoveReason::Unlabelled,
            }),
        }
    }
    let mut unique = BTreeSet::new();
    let desired: Vec<ContainerSpec> = desired
        .iter()
        .filter(|s| unique.insert(s.key())) // a duplicate spec: the first wins
        .cloned()
        .collect();
    for (kind, spec, name, hash) in desired_containers(&desired, agent_url, sandbox) {
        let key = spec.key();
        let ckey = (spec.job.clone(), spec.node.clone(), kind);
        let mut found = by_key.remove(&ckey).unwrap_or_default();
        // the container to keep: same hash, proper name first
        found.sort_by_key(|c| {
            (
                c.labels.get(LABEL_SPEC) != Some(&hash),
                c.name != name,
                c.id.clone(),
            )
        });
        let mut rest = found.into_iter();
        match rest.next() {
            None if seen.get(&ckey) == Some(&hash) => actions.push(Action::Missing {
                kind,
                spec: spec.clone(),
            }),
            None => actions.push(Action::Create {
                kind,
                spec: spec.clone(),
                hash,
            }),
            Some(c) if c.labels.get(LABEL_SPEC) == Some(&hash) => {
                if c.state == EngineState::Created && !start_attempted.contains(&c.id) {
                    actions.push(Action::Start {
                        kind,
                        id: c.id.clone(),
                        key: key.clone(),
                    });
                } else {
                    actions.push(Action::Keep {
                        kind,
                        id: c.id.clone(),
                        key: key.clone(),
                    });
                }
            }
            Some(c) => actions.push(Action::Replace {
                kind,
                old_id: c.id.clone(),
                spec: spec.clone(),
                hash,
            }),
        }
        for c in rest {
            actions.push(Action::Remove {
                kind,
                id: c.id.clone(),
                name: c.name.clone(),
                key: Some(key.clone()),
                reason: RemoveReason::Duplicate,
            });
        }
    }
    for ((job, node, kind), cs) in by_key {
        for c in cs {
            actions.push(Action::Remove {
                kind,
                id: c.id.clone(),
                name: c.name.clone(),
                key: Some((job.clone(), node.clone())),
                reason: RemoveReason::NotDesired,
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::spec::{LABEL_MANAGED, LABEL_SPEC};

    const URL: &str = "http://172.17.34.1:7948";

    fn sb() -> SandboxConfig {
        SandboxConfig::default()
    }

    /// A host-network node (role container only).
    fn spec(node: &str) -> ContainerSpec {
        ContainerSpec {
            job: "j".into(),
            node: node.into(),
            role: "worker".into(),
            party: "a".into(),
            image: "img:1".into(),
            command: vec!["python".into()],
            env: BTreeMap::new(),
            controller_id: "c".into(),
            host_network: true,
            start: true,
            sandbox: true,
            ..Default::default()
        }
    }

    fn running(id: &str, s: &ContainerSpec) -> ActualContainer {
        ActualContainer {
            id: id.into(),
            name: s.container_name(),
            labels: s.labels(URL, &sb()),
            state: EngineState::Running,
        }
    }

    fn sandbox(id: &str, s: &ContainerSpec) -> ActualContainer {
        ActualContainer {
            id: id.into(),
            name: s.sandbox_name(),
            labels: s.sandbox_body(&sb()).labels.unwrap_or_default(),
            state: EngineState::Running,
        }
    }

    fn no_seen() -> BTreeMap<ContainerKey, String> {
        BTreeMap::new()
    }

    fn p(desired: &[ContainerSpec], actual: &[ActualContainer]) -> Vec<Action> {
        plan(desired, actual, URL, &sb(), &no_seen(), &BTreeSet::new())
    }

    const ROLE: ContainerKind = ContainerKind::Role;
    const SANDBOX: ContainerKind = ContainerKind::Sandbox;

    #[test]
    fn creates_what_is_missing_and_keeps_what_matches() {
        let (w0, w1) = (spec("w0"), spec("w1"));
        let actual = vec![running("c0", &w0)];
        assert_eq!(
            p(&[w0.clone(), w1.clone()], &actual),
            vec![
                Action::Keep {
                    kind: ROLE,
                    id: "c0".into(),
                    key: w0.key()
                },
                Action::Create {
                    kind: ROLE,
                    hash: w1.spec_hash(URL, &sb()),
                    spec: w1
                },
            ]
        );
    }

    #[test]
    fn docker0_nodes_get_a_sandbox_first_and_a_role_container_once_started() {
        let mut s = spec("sched");
        s.host_network = false;
        s.start = false;
        assert_eq!(
            p(std::slice::from_ref(&s), &[]),
            vec![Action::Create {
                kind: SANDBOX,
                hash: s.sandbox_hash(&sb()),
                spec: s.clone()
            }]
        );
        let sb0 = sandbox("s0", &s);
        let none = p(std::slice::from_ref(&s), std::slice::from_ref(&sb0));
        assert!(none.iter().all(|a| !a.is_change()), "{none:?}");
        // start: the sandbox stays, the role container comes
        s.start = true;
        let started = p(std::slice::from_ref(&s), std::slice::from_ref(&sb0));
        assert_eq!(
            started,
            vec![
                Action::Keep {
                    kind: SANDBOX,
                    id: "s0".into(),
                    key: s.key()
                },
                Action::Create {
                    kind: ROLE,
                    hash: s.spec_hash(URL, &sb()),
                    spec: s.clone()
                },
            ]
        );
        // a new generation replaces both
        let mut g1 = s.clone();
        g1.generation = 1;
        let next = p(&[g1], &[sb0, running("r0", &s)]);
        assert_eq!(
            next.iter()
                .filter(|a| matches!(a, Action::Replace { .. }))
                .count(),
            2,
            "{next:?}"
        );
    }

    #[test]
    fn same_desired_twice_is_a_no_op_also_for_ended_containers() {
        let (w0, w1) = (spec("w0"), spec("w1"));
        let mut ended = running("c1", &w1);
        ended.state = EngineState::Exited;
        let actual = vec![running("c0", &w0), ended];
        let plan = p(&[w0, w1], &actual);
        assert!(plan.iter().all(|a| !a.is_change()), "{plan:?}");
    }

    #[test]
    fn changed_spec_is_replaced() {
        let w0 = spec("w0");
        let actual = vec![running("c0", &w0)];
        for change in [
            |s: &mut ContainerSpec| s.generation = 1,
            |s: &mut ContainerSpec| s.image = "img:2".into(),
            |s: &mut ContainerSpec| {
                s.env
                    .insert("DMLC_PS_ROOT_URI".into(), "172.17.34.2".into());
            },
        ] {
            let mut next = w0.clone();
            change(&mut next);
            assert_eq!(
                p(std::slice::from_ref(&next), &actual),
                vec![Action::Replace {
                    kind: ROLE,
                    old_id: "c0".into(),
                    hash: next.spec_hash(URL, &sb()),
                    spec: next,
                }]
            );
        }
    }

    #[test]
    fn undesired_duplicate_and_unlabelled_containers_are_removed() {
        let w0 = spec("w0");
        let mut dup = running("c9", &w0);
        dup.name = "other-name".into();
        let stale = running("c5", &spec("gone"));
        let unlabelled = ActualContainer {
            id: "c7".into(),
            name: "x".into(),
            labels: HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())]),
            state: EngineState::Exited,
        };
        let actual = vec![dup, running("c0", &w0), stale, unlabelled];
        let plan = p(std::slice::from_ref(&w0), &actual);
        assert!(plan.contains(&Action::Keep {
            kind: ROLE,
            id: "c0".into(),
            key: w0.key()
        }));
        let removed: Vec<(&str, RemoveReason)> = plan
            .iter()
            .filter_map(|a| match a {
                Action::Remove { id, reason, .. } => Some((id.as_str(), *reason)),
                _ => None,
            })
            .collect();
        assert_eq!(removed.len(), 3);
        assert!(removed.contains(&("c9", RemoveReason::Duplicate)));
        assert!(removed.contains(&("c5", RemoveReason::NotDesired)));
        assert!(removed.contains(&("c7", RemoveReason::Unlabelled)));
        // empty desired state: everything goes
        let plan = p(&[], &actual);
        assert_eq!(plan.iter().filter(|a| a.is_change()).count(), 4);
        // a withdrawn start removes the role container, not the sandbox
        let mut s = spec("n");
        s.host_network = false;
        let actual = vec![sandbox("s1", &s), running("r1", &s)];
        s.start = false;
        let plan = p(std::slice::from_ref(&s), &actual);
        assert!(plan.contains(&Action::Remove {
            kind: ROLE,
            id: "r1".into(),
            name: s.container_name(),
            key: Some(s.key()),
            reason: RemoveReason::NotDesired
        }));
        assert_eq!(plan.iter().filter(|a| a.is_change()).count(), 1);
    }

    #[test]
    fn a_container_removed_behind_our_back_is_missing_not_recreated() {
        let w0 = spec("w0");
        let seen = BTreeMap::from([(
            ("j".to_string(), "w0".to_string(), ROLE),
            w0.spec_hash(URL, &sb()),
        )]);
        let plan1 = plan(
            std::slice::from_ref(&w0),
            &[],
            URL,
            &sb(),
            &seen,
            &BTreeSet::new(),
        );
        assert_eq!(
            plan1,
            vec![Action::Missing {
                kind: ROLE,
                spec: w0.clone()
            }]
        );
        // a new generation after that is created
        let mut g1 = w0.clone();
        g1.generation = 1;
        let plan2 = plan(&[g1], &[], URL, &sb(), &seen, &BTreeSet::new());
        assert!(matches!(&plan2[..], [Action::Create { .. }]));
    }

    #[test]
    fn created_but_never_started_gets_one_start() {
        let w0 = spec("w0");
        let mut c = running("c0", &w0);
        c.state = EngineState::Created;
        assert_eq!(
            p(std::slice::from_ref(&w0), std::slice::from_ref(&c)),
            vec![Action::Start {
                kind: ROLE,
                id: "c0".into(),
                key: w0.key()
            }]
        );
        let tried = BTreeSet::from(["c0".to_string()]);
        let plan = plan(
            std::slice::from_ref(&w0),
            &[c],
            URL,
            &sb(),
            &no_seen(),
            &tried,
        );
        assert!(matches!(&plan[..], [Action::Keep { .. }]));
    }

    /// The plan of a host whose labelled containers are `listed`, with the creation record
    /// `doc` (`first`: no record file yet): the foreign containers and the plan.
    fn owned_plan(
        desired: &[ContainerSpec],
        listed: &[ActualContainer],
        doc: &crate::ownership::RecordDoc,
        first: bool,
        seen: &BTreeMap<ContainerKey, String>,
    ) -> (Vec<String>, Vec<Action>) {
        let legacy = first.then_some(crate::ownership::Legacy::Controller("c"));
        let (claim, _) = crate::ownership::claim(doc, listed, legacy, 0);
        let owned: Vec<ActualContainer> = listed
            .iter()
            .filter(|c| claim.owned.contains(&c.id))
            .cloned()
            .collect();
        (
            claim.foreign,
            plan(desired, &owned, URL, &sb(), seen, &BTreeSet::new()),
        )
    }

    #[test]
    fn only_the_containers_the_agent_created_are_kept_or_removed() {
        use crate::ownership::{Created, RecordDoc};
        let w0 = spec("w0");
        let own = running("c0", &w0);
        let record = |ids: &[&ActualContainer]| RecordDoc {
            version: 1,
            containers: ids
                .iter()
                .map(|c| (c.id.clone(), Created::from_labels(c, 0)))
                .collect(),
            pending: BTreeMap::new(),
        };
        // a committed copy of the role container, run by hand: every label, another name
        let mut copy = running("c9", &w0);
        copy.name = "evil".into();
        // the same under the node's own name, once the original is gone
        let mut same_name = running("c8", &w0);
        same_name.name = w0.container_name();
        let seen = BTreeMap::from([(
            ("j".to_string(), "w0".to_string(), ROLE),
            w0.spec_hash(URL, &sb()),
        )]);
        let keep = |id: &str| Action::Keep {
            kind: ROLE,
            id: id.into(),
            key: w0.key(),
        };
        let create = Action::Create {
            kind: ROLE,
            spec: w0.clone(),
            hash: w0.spec_hash(URL, &sb()),
        };
        let missing = Action::Missing {
            kind: ROLE,
            spec: w0.clone(),
        };
        type Case<'a> = (
            &'a str,
            Vec<ActualContainer>,
            RecordDoc,
            bool,
            BTreeMap<ContainerKey, String>,
            &'a [ContainerSpec],
            Vec<&'a str>,
            Vec<Action>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "own container: kept",
                vec![own.clone()],
                record(&[&own]),
                false,
                no_seen(),
                std::slice::from_ref(&w0),
                vec![],
                vec![keep("c0")],
            ),
            (
                "own container, node no longer desired: removed",
                vec![own.clone()],
                record(&[&own]),
                false,
                no_seen(),
                &[],
                vec![],
                vec![Action::Remove {
                    kind: ROLE,
                    id: "c0".into(),
                    name: own.name.clone(),
                    key: Some(w0.key()),
                    reason: RemoveReason::NotDesired,
                }],
            ),
            (
                "committed copy under another name: left alone (before: removed as Duplicate)",
                vec![copy.clone(), own.clone()],
                record(&[&own]),
                false,
                no_seen(),
                std::slice::from_ref(&w0),
                vec!["c9"],
                vec![keep("c0")],
            ),
            (
                "committed copy, the job ended: only the own container goes",
                vec![copy.clone(), own.clone()],
                record(&[&own]),
                false,
                no_seen(),
                &[],
                vec!["c9"],
                vec![Action::Remove {
                    kind: ROLE,
                    id: "c0".into(),
                    name: own.name.clone(),
                    key: Some(w0.key()),
                    reason: RemoveReason::NotDesired,
                }],
            ),
            (
                "copy under the same name after the original is gone: not adopted, the node is missing",
                vec![same_name.clone()],
                record(&[&own]),
                false,
                seen.clone(),
                std::slice::from_ref(&w0),
                vec!["c8"],
                vec![missing],
            ),
            (
                "copy under the same name, nothing seen (a restarted agent): create (Docker refuses the name), not adopted",
                vec![same_name.clone()],
                RecordDoc::default(),
                false,
                no_seen(),
                std::slice::from_ref(&w0),
                vec!["c8"],
                vec![create],
            ),
            (
                "unrecorded legacy container on the first start: adopted and kept",
                vec![own.clone()],
                RecordDoc::default(),
                true,
                no_seen(),
                std::slice::from_ref(&w0),
                vec![],
                vec![keep("c0")],
            ),
            (
                "unrecorded container after the first start: a stranger",
                vec![own.clone()],
                RecordDoc::default(),
                false,
                no_seen(),
                &[],
                vec!["c0"],
                vec![],
            ),
        ];
        for (what, listed, doc, first, seen, desired, foreign, want) in cases {
            let (f, got) = owned_plan(desired, &listed, &doc, first, &seen);
            assert_eq!(f, foreign, "{what}: foreign");
            assert_eq!(got, want, "{what}: plan");
        }
        // a legacy container of another controller id is not adopted on the first start
        let mut other = own.clone();
        other
            .labels
            .insert(crate::spec::LABEL_CONTROLLER.into(), "old".into());
        let (f, got) = owned_plan(&[], &[other], &RecordDoc::default(), true, &no_seen());
        assert_eq!((f, got), (vec!["c0".to_string()], vec![]));
    }

    #[test]
    fn spec_label_mismatch_from_old_agent_url_replaces() {
        let w0 = spec("w0");
        let mut c = running("c0", &w0);
        c.labels.insert(
            LABEL_SPEC.into(),
            w0.spec_hash("http://172.17.9.1:7948", &sb()),
        );
        let plan = p(&[w0], &[c]);
        assert!(matches!(&plan[..], [Action::Replace { .. }]));
    }
}
