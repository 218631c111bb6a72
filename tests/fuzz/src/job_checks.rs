//! Invariants of `geomx-job` checked by the `job_file` and `job_compile` fuzz targets and
//! replayed on stable by `controller/job/tests/fuzz_regressions.rs` (which includes this file
//! with `#[path]`, so it may only use `std`, `geomx_job` and `toml`).
//!
//! * [`check_job_file`]: any text → `parse` never panics; an error lists at least one problem,
//!   each located inside the text; a job that parses validates in code too, compiles to a plan
//!   obeying every count rule ([`check_plan`]) and the job file ([`check_plan_matches_spec`]),
//!   and survives a TOML round trip.
//! * [`check_job_spec`]: any `JobSpec` built in code (see `job_gen.rs`) → `validate` and
//!   `compile` never panic; `validate` and `parse` of the spec written as TOML agree; a valid
//!   spec compiles to a plan obeying the same rules.
//!
//! The count rules are those of `controller/job/tests/properties.rs` (`check_count_rules`),
//! read from the compiled env alone; the slice check is adapted to arbitrary worker commands
//! (the property test's generator only makes commands without `--data-slice-idx`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use geomx_job::{JobSpec, Mode, Network, Node, Plan, Role};

/// The file name given to the parser.
pub const FILE: &str = "fuzz.toml";

/// Runs every check on a job file given as raw bytes (non-UTF-8 input is skipped: the
/// controller and geomxctl only ever hand the parser a `&str`).
pub fn check_job_file(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match geomx_job::parse(FILE, src) {
        Err(errors) => check_errors(src, &errors),
        Ok(spec) => {
            if let Err(e) = spec.validate() {
                panic!("parse accepted a job that validate() refuses: {e}\n{src}");
            }
            let plan = geomx_job::compile(&spec);
            check_plan(&plan);
            check_plan_matches_spec(&spec, &plan);
            let direct = geomx_job::plan(FILE, src).expect("plan() agrees with parse()");
            assert_eq!(direct, plan, "plan() differs from compile(parse())");
            check_toml_round_trip(&spec);
        }
    }
}

/// Runs every check on a job built in code, valid or not.
pub fn check_job_spec(spec: &JobSpec) {
    let valid = spec.validate();
    // compile must not panic, even on an invalid job.
    let plan = geomx_job::compile(spec);
    let text = toml::to_string(spec);
    match (&valid, &text) {
        (Ok(()), Ok(text)) => {
            check_plan(&plan);
            check_plan_matches_spec(spec, &plan);
            let back = geomx_job::parse(FILE, text)
                .unwrap_or_else(|e| panic!("a valid job written as TOML is refused: {e}\n{text}"));
            assert_eq!(&back, spec, "TOML round trip changed the job\n{text}");
        }
        (Ok(()), Err(e)) => panic!("a valid job cannot be written as TOML: {e}\n{spec:#?}"),
        (Err(problems), Ok(text)) => {
            assert!(!problems.is_empty(), "an error without problems");
            for p in problems.errors() {
                assert!(p.field.is_some(), "an in-code problem names no field: {p}");
                let _ = p.to_string();
            }
            // The same job read from a file is refused as well.
            if let Ok(back) = geomx_job::parse(FILE, text) {
                panic!(
                    "validate() refuses a job that parse() accepts: {problems}\n{text}\n{back:#?}"
                );
            }
        }
        (Err(_), Err(_)) => {}
    }
}

/// A refused file: at least one problem, each located inside the text.
fn check_errors(src: &str, errors: &geomx_job::JobErrors) {
    assert!(!errors.is_empty(), "an error without problems");
    let lines = src.split('\n').count();
    for e in errors.errors() {
        assert_eq!(e.file, FILE);
        assert_eq!(e.line.is_some(), e.col.is_some(), "{e:?}");
        if let (Some(line), Some(col)) = (e.line, e.col) {
            assert!(line >= 1 && line <= lines, "line {line} of {lines}: {e:?}");
            let width = src
                .split('\n')
                .nth(line - 1)
                .map_or(0, |l| l.chars().count());
            assert!(col >= 1 && col <= width + 1, "col {col} of {width}: {e:?}");
        }
        assert!(!e.message.is_empty(), "{e:?}");
        let _ = e.to_string();
    }
    let _ = errors.to_string();
}

/// A valid job written as TOML reads back as the same job.
fn check_toml_round_trip(spec: &JobSpec) {
    let text = toml::to_string(spec).unwrap_or_else(|e| panic!("cannot write {spec:#?}: {e}"));
    let back = geomx_job::parse("round-trip.toml", &text)
        .unwrap_or_else(|e| panic!("a valid job written as TOML is refused: {e}\n{text}"));
    assert_eq!(&back, spec, "TOML round trip changed the job\n{text}");
}

fn get<'a>(n: &'a Node, k: &str) -> Option<&'a str> {
    n.env.get(k).map(String::as_str)
}

fn num(n: &Node, k: &str) -> usize {
    get(n, k)
        .unwrap_or_else(|| panic!("{}: {k} missing", n.name))
        .parse()
        .unwrap_or_else(|_| panic!("{}: {k} not a number", n.name))
}

fn role(n: &Node) -> Option<&str> {
    get(n, "DMLC_ROLE")
}

fn global_role(n: &Node) -> Option<&str> {
    get(n, "DMLC_ROLE_GLOBAL")
}

fn local_key(n: &Node) -> Option<(String, String)> {
    Some((
        get(n, "DMLC_PS_ROOT_URI")?.to_string(),
        get(n, "DMLC_PS_ROOT_PORT")?.to_string(),
    ))
}

fn global_key(n: &Node) -> Option<(String, String)> {
    Some((
        get(n, "DMLC_PS_GLOBAL_ROOT_URI")?.to_string(),
        get(n, "DMLC_PS_GLOBAL_ROOT_PORT")?.to_string(),
    ))
}

/// Every count rule of geomx-facts.md, read from the env of the plan's nodes only (the
/// checker of `controller/job/tests/properties.rs`).
pub fn check_plan(plan: &Plan) {
    let nodes = &plan.nodes;

    // Names are unique.
    let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names.len(), nodes.len(), "duplicate node names");

    // Local layer: every scheduler waits for exactly the servers and workers pointing at it,
    // and they all agree on the counts.
    let schedulers: Vec<&Node> = nodes
        .iter()
        .filter(|n| role(n) == Some("scheduler"))
        .collect();
    assert!(!schedulers.is_empty(), "no scheduler");
    let mut keys = BTreeSet::new();
    for s in &schedulers {
        let key = local_key(s).expect("scheduler has a root");
        assert!(keys.insert(key.clone()), "two schedulers at {key:?}");
        assert_eq!(
            s.binds.map(|p| p.to_string()),
            Some(key.1.clone()),
            "{}",
            s.name
        );
        let own = match plan.network {
            Network::Pseudo => "127.0.0.1".to_string(),
            Network::Routed => format!("{{{{{}.ip}}}}", s.name),
        };
        assert_eq!(key.0, own, "{}: binds its own address", s.name);
        let members: Vec<&Node> = nodes
            .iter()
            .filter(|n| role(n).is_some() && role(n) != Some("scheduler"))
            .filter(|n| local_key(n).as_ref() == Some(&key))
            .collect();
        let workers = members.iter().filter(|n| role(n) == Some("worker")).count();
        let servers = members.iter().filter(|n| role(n) == Some("server")).count();
        assert_eq!(num(s, "DMLC_NUM_WORKER"), workers, "{}", s.name);
        assert_eq!(num(s, "DMLC_NUM_SERVER"), servers, "{}", s.name);
        assert!(workers >= 1 && servers >= 1, "{}", s.name);
        for m in &members {
            assert_eq!(num(m, "DMLC_NUM_WORKER"), workers, "{}", m.name);
            assert_eq!(num(m, "DMLC_NUM_SERVER"), servers, "{}", m.name);
        }
    }
    // Every non-scheduler points at an existing scheduler.
    for n in nodes
        .iter()
        .filter(|n| role(n).is_some_and(|r| r != "scheduler"))
    {
        assert!(keys.contains(&local_key(n).expect("root")), "{}", n.name);
    }

    // Global layer.
    let global_schedulers: Vec<&Node> = nodes
        .iter()
        .filter(|n| global_role(n) == Some("global_scheduler"))
        .collect();
    let global_servers: Vec<&Node> = nodes
        .iter()
        .filter(|n| global_role(n) == Some("global_server"))
        .collect();
    let central_on = global_servers
        .iter()
        .any(|n| get(n, "DMLC_ENABLE_CENTRAL_WORKER") == Some("1"));
    match plan.mode {
        Mode::Ps => {
            assert!(global_schedulers.is_empty() && global_servers.is_empty());
            for n in nodes {
                for k in n.env.keys() {
                    // User variables may contain GLOBAL; computed ones are DMLC_*.
                    assert!(
                        !(k.starts_with("DMLC_") && k.contains("GLOBAL"))
                            && k != "DMLC_NUM_ALL_WORKER",
                        "{}: {k} in ps mode",
                        n.name
                    );
                }
            }
        }
        Mode::Hips => {
            assert_eq!(global_schedulers.len(), 1);
            let gs = global_schedulers[0];
            assert!(role(gs).is_none(), "the global scheduler has no local role");
            let gkey = global_key(gs).expect("global root");
            assert_eq!(gs.binds.map(|p| p.to_string()), Some(gkey.1.clone()));
            let party_servers: Vec<&Node> = nodes
                .iter()
                .filter(|n| role(n) == Some("server") && global_role(n).is_none())
                .collect();
            for n in party_servers.iter().chain(global_servers.iter()) {
                assert_eq!(global_key(n).as_ref(), Some(&gkey), "{}", n.name);
            }
            assert_eq!(num(gs, "DMLC_NUM_GLOBAL_WORKER"), party_servers.len());
            assert_eq!(num(gs, "DMLC_NUM_GLOBAL_SERVER"), global_servers.len());
            for n in nodes
                .iter()
                .filter(|n| n.env.contains_key("DMLC_NUM_GLOBAL_SERVER"))
            {
                assert_eq!(
                    num(n, "DMLC_NUM_GLOBAL_WORKER"),
                    party_servers.len(),
                    "{}",
                    n.name
                );
                assert_eq!(
                    num(n, "DMLC_NUM_GLOBAL_SERVER"),
                    global_servers.len(),
                    "{}",
                    n.name
                );
            }
            // A party server with DMLC_NUM_SERVER != 1 aborts.
            for n in &party_servers {
                assert_eq!(num(n, "DMLC_NUM_SERVER"), 1, "{}", n.name);
            }
            for n in nodes {
                assert_eq!(
                    n.env.contains_key("DMLC_ENABLE_CENTRAL_WORKER"),
                    global_role(n) == Some("global_server"),
                    "{}",
                    n.name
                );
            }
            let masters: Vec<&Node> = nodes
                .iter()
                .filter(|n| get(n, "DMLC_ROLE_MASTER_WORKER") == Some("1"))
                .collect();
            assert_eq!(masters.len(), 1);
            let central_workers = num(masters[0], "DMLC_NUM_WORKER");
            if !central_on {
                assert_eq!(central_workers, 1);
            }
            assert_eq!(num(masters[0], "DMLC_NUM_SERVER"), global_servers.len());

            // DMLC_NUM_ALL_WORKER: on every worker, the master and the global servers.
            let training = nodes
                .iter()
                .filter(|n| role(n) == Some("worker"))
                .filter(|n| get(n, "DMLC_ROLE_MASTER_WORKER").is_none())
                .count()
                + usize::from(central_on);
            for n in nodes {
                let should = role(n) == Some("worker") || global_role(n) == Some("global_server");
                assert_eq!(
                    n.env.contains_key("DMLC_NUM_ALL_WORKER"),
                    should,
                    "{}",
                    n.name
                );
                if should {
                    assert_eq!(num(n, "DMLC_NUM_ALL_WORKER"), training, "{}", n.name);
                }
            }
        }
    }

    // Slices: unique and dense in [0, number of training workers), only on workers.
    let total = match plan.mode {
        Mode::Hips => nodes
            .iter()
            .find(|n| n.env.contains_key("DMLC_NUM_ALL_WORKER"))
            .map(|n| num(n, "DMLC_NUM_ALL_WORKER"))
            .expect("all workers"),
        Mode::Ps => num(schedulers[0], "DMLC_NUM_WORKER"),
    };
    let mut slices = Vec::new();
    for n in nodes {
        if let Some(s) = n.slice {
            assert!(role(n) == Some("worker"), "{} has a slice", n.name);
            slices.push(s as usize);
        }
        assert!(
            !n.command.iter().any(|a| a.contains("{slice}")),
            "{}: {{slice}} left in the command",
            n.name
        );
    }
    slices.sort_unstable();
    assert_eq!(slices, (0..total).collect::<Vec<_>>(), "slices");

    // Addresses: placeholders name existing schedulers, and all of them resolve.
    for n in nodes {
        let deps = n.depends_on();
        match plan.network {
            Network::Pseudo => {
                assert!(deps.is_empty(), "{}", n.name);
                for k in ["DMLC_PS_ROOT_URI", "DMLC_PS_GLOBAL_ROOT_URI"] {
                    if let Some(v) = get(n, k) {
                        assert_eq!(v, "127.0.0.1", "{}", n.name);
                    }
                }
            }
            Network::Routed => {
                for d in &deps {
                    let target = plan.node(d).expect("placeholder names a node");
                    assert!(target.role.is_scheduler(), "{} depends on {d}", n.name);
                }
            }
        }
        let resolved = n
            .resolve_env(&|_: &str| Some(Ipv4Addr::new(10, 0, 0, 1)))
            .expect("resolves");
        assert!(resolved.values().all(|v| !v.contains("{{")), "{}", n.name);
        for r in &n.reaches {
            let target = plan.node(r).expect("reaches a node");
            assert!(target.role.is_scheduler(), "{} reaches {r}", n.name);
        }
        assert!(n.env.contains_key("DMLC_INTERFACE"), "{}", n.name);
        if n.role.is_scheduler() {
            assert!(n.binds.is_some(), "{}", n.name);
        } else {
            assert!(n.binds.is_none(), "{}", n.name);
        }
    }
    if plan.network == Network::Pseudo {
        assert_eq!(plan.hosts().len(), 1);
        let ports: Vec<u16> = nodes.iter().filter_map(|n| n.binds).collect();
        let unique: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(ports.len(), unique.len(), "pseudo ports distinct");
    }
}

/// What the plan must say given the job it came from: node count, image, interface,
/// `PS_VERBOSE`, the user's `[env]`, hosts, ports, worker commands and policy.
pub fn check_plan_matches_spec(spec: &JobSpec, plan: &Plan) {
    assert_eq!(plan.job, spec.name);
    assert_eq!(plan.mode, spec.mode);
    assert_eq!(plan.network, spec.network);
    let expected = match spec.mode {
        Mode::Ps => spec
            .parties
            .iter()
            .map(|p| 1 + p.servers + p.workers)
            .sum::<i64>(),
        Mode::Hips => {
            let c = spec.central.as_ref().expect("central");
            3 + c.global_servers
                + c.workers
                + spec.parties.iter().map(|p| 2 + p.workers).sum::<i64>()
        }
    };
    assert_eq!(plan.nodes.len() as i64, expected, "node count");
    assert!(plan.nodes.len() as i64 <= geomx_job::limits::NODES_MAX);
    assert_eq!(plan.progress.regex, spec.progress_regex());
    assert!(plan.progress.compiled().is_ok(), "progress regex compiles");
    assert_eq!(
        i64::from(plan.policy.max_restarts),
        spec.policy.max_restarts()
    );
    assert_eq!(
        Ok(plan.policy.stall_timeout),
        spec.policy.stall_timeout().map_err(|e| e.to_string())
    );
    assert_eq!(
        i64::from(plan.policy.gpus_per_worker),
        spec.policy.gpus_per_worker
    );

    let computed: BTreeSet<&str> = geomx_job::COMPUTED_VARIABLES.iter().copied().collect();
    let worker_cmd = spec.worker_command();
    let slice_in_cmd = worker_cmd.iter().any(|a| a.contains("{slice}"));
    for n in &plan.nodes {
        assert_eq!(n.image, spec.image, "{}", n.name);
        assert_eq!(
            get(n, "DMLC_INTERFACE"),
            Some(spec.interface()),
            "{}",
            n.name
        );
        // `verbose` for every node when set; else PS_VERBOSE=1 on schedulers only (geomx
        // follows their rendezvous)
        let verbose = spec
            .verbose
            .map(|v| v.to_string())
            .or_else(|| n.role.is_scheduler().then(|| "1".to_string()));
        assert_eq!(n.env.get("PS_VERBOSE").cloned(), verbose, "{}", n.name);
        // The user's variables: all, then the node's class (later wins).
        let class = match n.role {
            Role::GlobalScheduler | Role::Scheduler => &spec.env.schedulers,
            Role::GlobalServer | Role::Server => &spec.env.servers,
            Role::MasterWorker => &spec.env.master,
            Role::Worker => &spec.env.workers,
        };
        let mut user: BTreeMap<&str, &str> = BTreeMap::new();
        for (k, v) in spec.env.all.iter().chain(class.iter()) {
            user.insert(k, v);
        }
        for (k, v) in &user {
            assert_eq!(get(n, k), Some(*v), "{}: user variable {k}", n.name);
        }
        for k in n.env.keys() {
            assert!(
                computed.contains(k.as_str()) || user.contains_key(k.as_str()),
                "{}: unexpected variable {k}",
                n.name
            );
        }
        // Hosts: the central host, or one of the party's hosts.
        if n.party == geomx_job::CENTRAL_PARTY {
            let c = spec.central.as_ref().expect("central");
            assert_eq!(n.host, c.host, "{}", n.name);
        } else {
            let party = spec
                .parties
                .iter()
                .find(|p| p.name == n.party)
                .unwrap_or_else(|| panic!("{}: unknown party {}", n.name, n.party));
            assert!(party.hosts.contains(&n.host), "{}", n.name);
        }
        // Worker commands: the data slice in place of {slice}, or appended.
        if n.role == Role::Worker {
            let slice = n.slice.expect("a worker has a slice").to_string();
            let want: Vec<String> = if slice_in_cmd {
                worker_cmd
                    .iter()
                    .map(|a| a.replace("{slice}", &slice))
                    .collect()
            } else {
                let mut c = worker_cmd.clone();
                c.push(geomx_job::SLICE_OPTION.to_string());
                c.push(slice);
                c
            };
            assert_eq!(n.command, want, "{}", n.name);
        }
    }
    check_mounts(spec, plan);
    // Ports: the ones the job file asks for.
    for n in plan.nodes.iter().filter(|n| n.role.is_scheduler()) {
        let want = if n.role == Role::GlobalScheduler {
            spec.central.as_ref().map(|c| c.global_scheduler_port)
        } else if n.party == geomx_job::CENTRAL_PARTY {
            spec.central.as_ref().map(|c| c.scheduler_port)
        } else {
            spec.parties
                .iter()
                .position(|p| p.name == n.party)
                .map(|i| spec.party_scheduler_port(i))
        };
        assert_eq!(n.binds.map(i64::from), want, "{}", n.name);
    }
}

/// The role class of a node (`[env]`, `[resources]`, `[[mount]].roles`).
fn class_of(role: Role) -> &'static str {
    match role {
        Role::GlobalScheduler | Role::Scheduler => "schedulers",
        Role::GlobalServer | Role::Server => "servers",
        Role::MasterWorker => "master",
        Role::Worker => "workers",
    }
}

/// Every node's mounts are valid once expanded (no placeholder left, no refused path,
/// distinct targets), are the job's mounts for its role class in file order, and every
/// node has a pids limit.
pub fn check_mounts(spec: &JobSpec, plan: &Plan) {
    for n in &plan.nodes {
        let class = class_of(n.role);
        let wanted: Vec<&geomx_job::MountSpec> = spec
            .mounts
            .iter()
            .filter(|m| {
                let roles = m.roles.clone().unwrap_or_else(|| vec!["all".to_string()]);
                roles.iter().any(|r| r == "all" || r == class)
            })
            .collect();
        assert_eq!(
            n.mounts.len(),
            wanted.len(),
            "{}: mounts {:?}",
            n.name,
            n.mounts
        );
        let mut targets = BTreeSet::new();
        for (m, w) in n.mounts.iter().zip(&wanted) {
            assert_eq!(m.kind, w.kind, "{}", n.name);
            assert_eq!(m.readonly, w.readonly, "{}", n.name);
            assert_eq!(m.target, w.target, "{}", n.name);
            let expanded =
                geomx_job::expand_placeholders(&w.source, &plan.job, &n.party, &n.name, &n.host);
            assert_eq!(m.source, expanded, "{}", n.name);
            assert!(
                !m.source.contains(['{', '}']),
                "{}: placeholder left in {}",
                n.name,
                m.source
            );
            let problem = match m.kind {
                geomx_job::MountType::Bind => geomx_job::bind_source_problem(&m.source),
                geomx_job::MountType::Volume => geomx_job::volume_name_problem(&m.source),
            };
            assert_eq!(problem, None, "{}: source {}", n.name, m.source);
            assert_eq!(
                geomx_job::target_problem(&m.target),
                None,
                "{}: target {}",
                n.name,
                m.target
            );
            assert!(
                targets.insert(m.target.as_str()),
                "{}: target {} mounted twice",
                n.name,
                m.target
            );
        }
        assert!(
            n.resources.pids.is_some_and(|p| p > 0),
            "{}: no pids limit",
            n.name
        );
    }
}
