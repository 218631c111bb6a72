//! The compiler: a validated [`JobSpec`] to its [`Plan`], every DMLC_* variable computed.
//!
//! The env of every role follows `geomx-facts.md` exactly (see `docs/job-file.md`):
//!
//! * P training parties, W_p workers in party p, S_g global servers, k = `[central].workers`.
//!   Central training is on when k > 0; then C = k + 1 (the master is counted), else C = 1.
//! * `DMLC_NUM_ALL_WORKER` = ΣW_p (+ C when central training is on).
//! * Slices: party workers in file order (party 0's workers first), then the central workers,
//!   then the master when central training is on. Unique and dense in [0, DMLC_NUM_ALL_WORKER).

use std::collections::BTreeMap;

use crate::mounts::{expand, parse_size};
use crate::plan::{
    CENTRAL_PARTY, Mount, Node, Plan, Policy, Progress, Resources, Role, address_placeholder,
};
use crate::spec::{
    DEFAULT_PIDS_LIMIT, JobSpec, Mode, Network, SLICE_OPTION, SLICE_PLACEHOLDER, limits,
};
use crate::validate::mount_classes;

/// Node name of the global scheduler.
pub const GLOBAL_SCHEDULER: &str = "global-scheduler";
/// Node name of the central scheduler.
pub const CENTRAL_SCHEDULER: &str = "central-scheduler";
/// Node name of the master worker.
pub const MASTER_WORKER: &str = "master-worker";

/// Which `[env]` tables apply to a node, besides `all`.
#[derive(Clone, Copy)]
enum Class {
    Schedulers,
    Servers,
    Master,
    Workers,
}

impl Class {
    /// Its name in `[env]`, `[resources]` and `[[mount]].roles`.
    fn as_str(self) -> &'static str {
        match self {
            Class::Schedulers => "schedulers",
            Class::Servers => "servers",
            Class::Master => "master",
            Class::Workers => "workers",
        }
    }
}

/// Compiles a job into its plan.
///
/// `spec` must be valid: it is when it came from [`crate::parse`]; check a hand-built one with
/// [`JobSpec::validate`]. An invalid spec compiles to some plan without panicking, but that
/// plan is not meaningful; its counts are capped at geomx's limits (a negative count is 0),
/// so that even absurd ones (`workers = i64::MAX`) give a plan of bounded size.
pub fn compile(spec: &JobSpec) -> Plan {
    let mut c = Compiler {
        spec,
        nodes: Vec::new(),
    };
    match spec.mode {
        Mode::Hips => c.hips(),
        Mode::Ps => c.ps(),
    }
    let policy = &spec.policy;
    Plan {
        job: spec.name.clone(),
        mode: spec.mode,
        network: spec.network,
        policy: Policy {
            restart: policy.restart,
            max_restarts: to_u32(policy.max_restarts()),
            stall_timeout: policy.stall_timeout().unwrap_or_default(),
            gpus_per_worker: to_u32(policy.gpus_per_worker),
            teardown_grace: policy.teardown_grace().unwrap_or_default(),
            rendezvous_timeout: policy.rendezvous_timeout().unwrap_or_default(),
            pull_timeout: policy.pull_timeout().unwrap_or_default(),
            restart_delay: policy
                .restart_delay
                .as_deref()
                .and_then(|t| humantime::parse_duration(t).ok())
                .unwrap_or_default(),
            active_deadline: policy
                .active_deadline
                .as_deref()
                .and_then(|t| humantime::parse_duration(t).ok())
                .unwrap_or_default(),
            retry_exit_codes: policy
                .retry_exit_codes
                .iter()
                .flatten()
                .filter_map(|&c| i32::try_from(c).ok())
                .collect(),
        },
        progress: Progress {
            regex: spec.progress_regex().to_string(),
            finished: spec.progress.as_ref().and_then(|p| p.finished.clone()),
            iterations: spec
                .progress
                .as_ref()
                .and_then(|p| p.iterations)
                .and_then(|n| u64::try_from(n).ok()),
        },
        nodes: c.nodes,
        image: spec.image.clone(),
        image_pull: spec.image_pull,
        image_digest: None,
    }
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A count of nodes as compiled: within `0..=max` (the limit validation enforces).
fn count(v: i64, max: i64) -> i64 {
    v.clamp(0, max)
}

fn to_port(v: i64) -> u16 {
    u16::try_from(v.max(0)).unwrap_or(u16::MAX)
}

struct Compiler<'a> {
    spec: &'a JobSpec,
    nodes: Vec<Node>,
}

/// What a node needs beyond its env.
struct NodeFacts {
    name: String,
    role: Role,
    party: String,
    host: String,
    command: Vec<String>,
    slice: Option<u32>,
    binds: Option<i64>,
    reaches: Vec<&'static str>,
    reaches_party: Option<String>,
    gpus: u32,
}

impl Compiler<'_> {
    /// The address of node `name`'s own container, as written into env.
    fn uri(&self, name: &str) -> String {
        match self.spec.network {
            Network::Pseudo => "127.0.0.1".to_string(),
            Network::Routed => address_placeholder(name),
        }
    }

    fn push(&mut self, facts: NodeFacts, class: Class, computed: Vec<(&str, String)>) {
        let spec = self.spec;
        let mut env: BTreeMap<String, String> = spec.env.all.clone();
        let class_env = match class {
            Class::Schedulers => &spec.env.schedulers,
            Class::Servers => &spec.env.servers,
            Class::Master => &spec.env.master,
            Class::Workers => &spec.env.workers,
        };
        env.extend(class_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // Computed variables last: they always win (validation refuses overriding them).
        for (k, v) in computed {
            env.insert(k.to_string(), v);
        }
        env.insert("DMLC_INTERFACE".into(), spec.interface().to_string());
        // schedulers log their rendezvous with PS_VERBOSE=1, which geomx follows (see
        // docs/operations.md); `verbose` decides for every node when it is set
        match spec.verbose {
            Some(v) => {
                env.insert("PS_VERBOSE".into(), v.to_string());
            }
            None if matches!(class, Class::Schedulers) => {
                env.insert("PS_VERBOSE".into(), "1".into());
            }
            None => {}
        }
        let mounts = self.mounts(class, &facts);
        let resources = self.resources(class);
        let mut reaches: Vec<String> = facts.reaches.iter().map(|s| s.to_string()).collect();
        reaches.extend(facts.reaches_party);
        self.nodes.push(Node {
            name: facts.name,
            role: facts.role,
            party: facts.party,
            host: facts.host,
            image: spec.image.clone(),
            command: facts.command,
            env,
            slice: facts.slice,
            binds: facts.binds.map(to_port),
            reaches,
            gpus: facts.gpus,
            mounts,
            resources,
        });
    }

    /// The mounts of a node of `class`, placeholders expanded.
    fn mounts(&self, class: Class, facts: &NodeFacts) -> Vec<Mount> {
        let spec = self.spec;
        let fill = |t: &str| expand(t, &spec.name, &facts.party, &facts.name, &facts.host);
        spec.mounts
            .iter()
            .filter(|m| mount_classes(m.roles.as_deref()).contains(class.as_str()))
            .map(|m| Mount {
                kind: m.kind,
                source: fill(&m.source),
                target: m.target.clone(),
                readonly: m.readonly,
                driver: m.driver.clone(),
                options: m
                    .options
                    .iter()
                    .map(|(k, v)| (k.clone(), fill(v)))
                    .collect(),
            })
            .collect()
    }

    /// The resources of a node of `class`: the class's keys, then `all`'s, then the pids
    /// default.
    fn resources(&self, class: Class) -> Resources {
        let r = &self.spec.resources;
        let own = match class {
            Class::Schedulers => &r.schedulers,
            Class::Servers => &r.servers,
            Class::Master => &r.master,
            Class::Workers => &r.workers,
        };
        let merged = own.or(&r.all);
        Resources {
            memory: merged.memory.as_deref().and_then(parse_size),
            cpus: merged.cpus,
            pids: Some(
                merged
                    .pids
                    .map_or(DEFAULT_PIDS_LIMIT, |p| p.clamp(1, limits::PIDS_MAX))
                    .unsigned_abs(),
            ),
            shm_size: merged.shm_size.as_deref().and_then(parse_size),
        }
    }

    fn gpus(&self) -> u32 {
        to_u32(self.spec.policy.gpus_per_worker)
    }

    fn worker_command(&self, slice: u32) -> Vec<String> {
        let cmd = self.spec.worker_command();
        if cmd.iter().any(|a| a.contains(SLICE_PLACEHOLDER)) {
            cmd.iter()
                .map(|a| a.replace(SLICE_PLACEHOLDER, &slice.to_string()))
                .collect()
        } else {
            with_slice(cmd, slice)
        }
    }

    fn hips(&mut self) {
        let spec = self.spec;
        let Some(central) = &spec.central else {
            return;
        };
        let parties = &spec.parties;
        let p = parties.len();
        let sg = count(central.global_servers, limits::SERVERS_MAX);
        let k = count(central.workers, limits::WORKERS_PER_PARTY_MAX);
        let central_training = k > 0;
        let c = if central_training { k + 1 } else { 1 };
        let sum_w: i64 = parties
            .iter()
            .map(|p| count(p.workers, limits::WORKERS_PER_PARTY_MAX))
            .sum();
        let all = sum_w + if central_training { c } else { 0 };
        let gport = central.global_scheduler_port;
        let cport = central.scheduler_port;
        let guri = self.uri(GLOBAL_SCHEDULER);
        let curi = self.uri(CENTRAL_SCHEDULER);
        let chost = central.host.clone();
        let central_node = |name: String, role, command, slice, binds, reaches, gpus| NodeFacts {
            name,
            role,
            party: CENTRAL_PARTY.to_string(),
            host: chost.clone(),
            command,
            slice,
            binds,
            reaches,
            reaches_party: None,
            gpus,
        };
        let global_vars = || {
            vec![
                ("DMLC_PS_GLOBAL_ROOT_URI", guri.clone()),
                ("DMLC_PS_GLOBAL_ROOT_PORT", gport.to_string()),
                ("DMLC_NUM_GLOBAL_SERVER", sg.to_string()),
                ("DMLC_NUM_GLOBAL_WORKER", p.to_string()),
            ]
        };
        let central_vars = |role: &str| {
            vec![
                ("DMLC_ROLE", role.to_string()),
                ("DMLC_PS_ROOT_URI", curi.clone()),
                ("DMLC_PS_ROOT_PORT", cport.to_string()),
                ("DMLC_NUM_SERVER", sg.to_string()),
                ("DMLC_NUM_WORKER", c.to_string()),
            ]
        };

        // Global scheduler.
        let mut env = vec![("DMLC_ROLE_GLOBAL", "global_scheduler".to_string())];
        env.extend(global_vars());
        let facts = central_node(
            GLOBAL_SCHEDULER.into(),
            Role::GlobalScheduler,
            spec.scheduler_command(),
            None,
            Some(gport),
            vec![],
            0,
        );
        self.push(facts, Class::Schedulers, env);

        // Central scheduler.
        let facts = central_node(
            CENTRAL_SCHEDULER.into(),
            Role::Scheduler,
            spec.scheduler_command(),
            None,
            Some(cport),
            vec![],
            0,
        );
        self.push(facts, Class::Schedulers, central_vars("scheduler"));

        // Global servers.
        for i in 0..sg {
            let mut env = vec![("DMLC_ROLE_GLOBAL", "global_server".to_string())];
            env.extend(global_vars());
            env.extend(central_vars("server"));
            env.push((
                "DMLC_ENABLE_CENTRAL_WORKER",
                if central_training { "1" } else { "0" }.to_string(),
            ));
            env.push(("DMLC_NUM_ALL_WORKER", all.to_string()));
            let facts = central_node(
                format!("global-server-{i}"),
                Role::GlobalServer,
                spec.server_command(),
                None,
                None,
                vec![GLOBAL_SCHEDULER, CENTRAL_SCHEDULER],
                0,
            );
            self.push(facts, Class::Servers, env);
        }

        // Master worker (last slice when central training is on).
        let master_slice = central_training.then(|| to_u32(all - 1));
        let mut command = spec.master_command();
        if let Some(slice) = master_slice {
            command = with_slice(command, slice);
        }
        let mut env = central_vars("worker");
        env.insert(1, ("DMLC_ROLE_MASTER_WORKER", "1".to_string()));
        env.push(("DMLC_NUM_ALL_WORKER", all.to_string()));
        let facts = central_node(
            MASTER_WORKER.into(),
            Role::MasterWorker,
            command,
            master_slice,
            None,
            vec![CENTRAL_SCHEDULER],
            self.gpus(),
        );
        self.push(facts, Class::Master, env);

        // Central training workers: slices after every party's.
        for j in 0..k {
            let slice = to_u32(sum_w + j);
            let mut env = central_vars("worker");
            env.push(("DMLC_NUM_ALL_WORKER", all.to_string()));
            let facts = central_node(
                format!("central-worker-{j}"),
                Role::Worker,
                self.worker_command(slice),
                Some(slice),
                None,
                vec![CENTRAL_SCHEDULER],
                self.gpus(),
            );
            self.push(facts, Class::Workers, env);
        }

        // Training parties.
        let mut next_slice: i64 = 0;
        for (i, party) in parties.iter().enumerate() {
            let sched = format!("{}-scheduler", party.name);
            let uri = self.uri(&sched);
            let port = spec.party_scheduler_port(i);
            let w = count(party.workers, limits::WORKERS_PER_PARTY_MAX);
            let first_host = party.hosts.first().cloned().unwrap_or_default();
            let local_vars = |role: &str| {
                vec![
                    ("DMLC_ROLE", role.to_string()),
                    ("DMLC_PS_ROOT_URI", uri.clone()),
                    ("DMLC_PS_ROOT_PORT", port.to_string()),
                    ("DMLC_NUM_SERVER", "1".to_string()),
                    ("DMLC_NUM_WORKER", w.to_string()),
                ]
            };

            let facts = NodeFacts {
                name: sched.clone(),
                role: Role::Scheduler,
                party: party.name.clone(),
                host: first_host.clone(),
                command: spec.scheduler_command(),
                slice: None,
                binds: Some(port),
                reaches: vec![],
                reaches_party: None,
                gpus: 0,
            };
            self.push(facts, Class::Schedulers, local_vars("scheduler"));

            let mut env = global_vars();
            env.extend(local_vars("server"));
            let facts = NodeFacts {
                name: format!("{}-server", party.name),
                role: Role::Server,
                party: party.name.clone(),
                host: first_host.clone(),
                command: spec.server_command(),
                slice: None,
                binds: None,
                reaches: vec![GLOBAL_SCHEDULER],
                reaches_party: Some(sched.clone()),
                gpus: 0,
            };
            self.push(facts, Class::Servers, env);

            for j in 0..w {
                let slice = to_u32(next_slice + j);
                let mut env = local_vars("worker");
                env.push(("DMLC_NUM_ALL_WORKER", all.to_string()));
                let facts = NodeFacts {
                    name: format!("{}-worker-{j}", party.name),
                    role: Role::Worker,
                    party: party.name.clone(),
                    host: round_robin(&party.hosts, j),
                    command: self.worker_command(slice),
                    slice: Some(slice),
                    binds: None,
                    reaches: vec![],
                    reaches_party: Some(sched.clone()),
                    gpus: self.gpus(),
                };
                self.push(facts, Class::Workers, env);
            }
            next_slice += w;
        }
    }

    fn ps(&mut self) {
        let spec = self.spec;
        let Some(party) = spec.parties.first() else {
            return;
        };
        let sched = format!("{}-scheduler", party.name);
        let uri = self.uri(&sched);
        let port = spec.party_scheduler_port(0);
        let s = count(party.servers, limits::SERVERS_MAX);
        let w = count(party.workers, limits::WORKERS_PER_PARTY_MAX);
        let first_host = party.hosts.first().cloned().unwrap_or_default();
        let vars = |role: &str| {
            vec![
                ("DMLC_ROLE", role.to_string()),
                ("DMLC_PS_ROOT_URI", uri.clone()),
                ("DMLC_PS_ROOT_PORT", port.to_string()),
                ("DMLC_NUM_SERVER", s.to_string()),
                ("DMLC_NUM_WORKER", w.to_string()),
            ]
        };
        let node =
            |name: String, role, host, command, slice, binds, reaches_party, gpus| NodeFacts {
                name,
                role,
                party: party.name.clone(),
                host,
                command,
                slice,
                binds,
                reaches: vec![],
                reaches_party,
                gpus,
            };
        let facts = node(
            sched.clone(),
            Role::Scheduler,
            first_host.clone(),
            spec.scheduler_command(),
            None,
            Some(port),
            None,
            0,
        );
        self.push(facts, Class::Schedulers, vars("scheduler"));
        for i in 0..s {
            let facts = node(
                format!("{}-server-{i}", party.name),
                Role::Server,
                first_host.clone(),
                spec.server_command(),
                None,
                None,
                Some(sched.clone()),
                0,
            );
            self.push(facts, Class::Servers, vars("server"));
        }
        for j in 0..w {
            let slice = to_u32(j);
            let facts = node(
                format!("{}-worker-{j}", party.name),
                Role::Worker,
                round_robin(&party.hosts, j),
                self.worker_command(slice),
                Some(slice),
                None,
                Some(sched.clone()),
                self.gpus(),
            );
            self.push(facts, Class::Workers, vars("worker"));
        }
    }
}

fn round_robin(hosts: &[String], j: i64) -> String {
    let idx = usize::try_from(j).unwrap_or(0) % hosts.len().max(1);
    hosts.get(idx).cloned().unwrap_or_default()
}

fn with_slice(mut cmd: Vec<String>, slice: u32) -> Vec<String> {
    cmd.push(SLICE_OPTION.to_string());
    cmd.push(slice.to_string());
    cmd
}
