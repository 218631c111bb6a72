//! Property tests: for any valid job, every count rule of geomx-facts.md holds, checked from
//! the compiled env alone (not from the job), and data slices are unique and dense.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use geomx_job::{
    CentralSpec, CommandSpec, EnvSpec, JobSpec, Mode, Network, Node, PartySpec, Plan, PolicySpec,
    Role,
};
use proptest::prelude::*;

const HOSTS: [&str; 5] = ["h0", "h1", "h2", "h3", "h4"];

fn party_strategy(mode: Mode, pseudo: bool) -> impl Strategy<Value = (Vec<String>, i64, i64)> {
    let hosts = if pseudo {
        Just(vec!["h0".to_string()]).boxed()
    } else {
        proptest::sample::subsequence(HOSTS.to_vec(), 1..=3)
            .prop_shuffle()
            .prop_map(|h| h.into_iter().map(str::to_string).collect())
            .boxed()
    };
    let servers = match mode {
        Mode::Hips => Just(1i64).boxed(),
        Mode::Ps => (1i64..=4).boxed(),
    };
    (hosts, 1i64..=6, servers)
}

prop_compose! {
    fn job_strategy()(
        mode in prop_oneof![Just(Mode::Hips), Just(Mode::Ps)],
        pseudo in any::<bool>(),
    )(
        parties in proptest::collection::vec(
            party_strategy(mode, pseudo),
            if mode == Mode::Ps { 1..=1 } else { 1..=5 },
        ),
        mode in Just(mode),
        pseudo in Just(pseudo),
        global_servers in 1i64..=3,
        central_workers in prop_oneof![Just(0i64), 0i64..=3],
        central_host in proptest::sample::select(HOSTS.to_vec()),
        base_port in 10_000i64..60_000,
        // In "routed" ports may repeat (every scheduler has its own address).
        routed_ports in proptest::collection::vec(10_000i64..10_003, 7),
        explicit_ports in any::<bool>(),
        verbose in proptest::option::of(0i64..=2),
        slice_in_worker in any::<bool>(),
        extra_env in any::<bool>(),
    ) -> JobSpec {
        let port = |i: usize| if pseudo { base_port + i as i64 } else { routed_ports[i % 7] };
        let central = (mode == Mode::Hips).then(|| CentralSpec {
            host: if pseudo { "h0".into() } else { central_host.to_string() },
            global_scheduler_port: port(0),
            scheduler_port: port(1),
            global_servers,
            workers: central_workers,
        });
        let parties = parties
            .into_iter()
            .enumerate()
            .map(|(i, (hosts, workers, servers))| PartySpec {
                name: format!("p{i}"),
                hosts,
                workers,
                scheduler_port: (explicit_ports || !pseudo).then(|| port(i + 2)),
                servers,
            })
            .collect::<Vec<_>>();
        // Default party ports (9094 + i) must not collide with the central ones in pseudo.
        let central = central.map(|mut c| {
            if pseudo && !explicit_ports {
                c.global_scheduler_port = 9092;
                c.scheduler_port = 9093;
            }
            c
        });
        let mut env = EnvSpec::default();
        if extra_env {
            env.all.insert("A".into(), "1".into());
            env.servers.insert("MXNET_KVSTORE_SIZE_LOWER_BOUND".into(), "1000".into());
            env.workers.insert("ENABLE_P3".into(), "1".into());
        }
        JobSpec {
            name: "prop".into(),
            mode,
            image: "img".into(),
            network: if pseudo { Network::Pseudo } else { Network::Routed },
            interface: None,
            verbose,
            command: CommandSpec {
                worker: (!slice_in_worker).then(|| vec!["python".into(), "train.py".into()]),
                ..CommandSpec::default()
            },
            env,
            central,
            parties,
            policy: PolicySpec::default(),
            progress: None,
        }
    }
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

fn slice_arg(cmd: &[String]) -> Option<u32> {
    let i = cmd.iter().position(|a| a == "--data-slice-idx")?;
    cmd.get(i + 1)?.parse().ok()
}

/// Every count rule, read from the env of the plan's nodes only.
fn check_count_rules(plan: &Plan) {
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
                    assert!(
                        !k.contains("GLOBAL") && k != "DMLC_NUM_ALL_WORKER",
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
            // Only global servers carry DMLC_ENABLE_CENTRAL_WORKER; the central party's
            // worker count is 1 (the master) unless central training is on.
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
            // The central party's servers are exactly the global servers.
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

    // Slices: unique and dense in [0, number of training workers).
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
        let from_cmd = slice_arg(&n.command);
        assert_eq!(from_cmd, n.slice, "{}: slice in command", n.name);
        if let Some(s) = n.slice {
            assert!(role(n) == Some("worker"), "{} has a slice", n.name);
            slices.push(s as usize);
        }
        assert!(
            !n.command.iter().any(|a| a.contains("{slice}")),
            "{}",
            n.name
        );
    }
    slices.sort_unstable();
    assert_eq!(slices, (0..total).collect::<Vec<_>>(), "slices");

    // Addresses: placeholders name existing nodes, and all of them resolve.
    for n in nodes {
        let deps = n.depends_on();
        match plan.network {
            Network::Pseudo => {
                assert!(deps.is_empty(), "{}", n.name);
                for (k, v) in &n.env {
                    if k.ends_with("_URI") {
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
        assert!(resolved.values().all(|v| !v.contains("{{")));
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_count_rule_holds_for_any_valid_job(spec in job_strategy()) {
        if let Err(e) = spec.validate() {
            panic!("generated job is invalid: {e}\n{spec:#?}");
        }
        let plan = geomx_job::compile(&spec);
        check_count_rules(&plan);
        // PS_VERBOSE exactly when verbose is set.
        for n in &plan.nodes {
            prop_assert_eq!(n.env.get("PS_VERBOSE").cloned(), spec.verbose.map(|v| v.to_string()));
        }
        // Node count.
        let expected = match spec.mode {
            Mode::Ps => spec.parties.iter().map(|p| 1 + p.servers + p.workers).sum::<i64>(),
            Mode::Hips => {
                let c = spec.central.as_ref().expect("central");
                3 + c.global_servers + c.workers
                    + spec.parties.iter().map(|p| 2 + p.workers).sum::<i64>()
            }
        };
        prop_assert_eq!(plan.nodes.len() as i64, expected);
        // Worker roles carry their role.
        for n in &plan.nodes {
            let r = n.env.get("DMLC_ROLE").map(String::as_str);
            match n.role {
                Role::GlobalScheduler => prop_assert_eq!(r, None),
                Role::Scheduler => prop_assert_eq!(r, Some("scheduler")),
                Role::GlobalServer | Role::Server => prop_assert_eq!(r, Some("server")),
                Role::MasterWorker | Role::Worker => prop_assert_eq!(r, Some("worker")),
            }
        }
    }

    #[test]
    fn a_valid_job_survives_toml_round_trip(spec in job_strategy()) {
        let text = toml::to_string(&spec).expect("serialize");
        let back = geomx_job::parse("round-trip.toml", &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        prop_assert_eq!(back, spec);
    }

    #[test]
    fn compile_never_panics_even_on_invalid_jobs(
        mut spec in job_strategy(),
        workers in -3i64..4,
        servers in -3i64..4,
        global_servers in -3i64..4,
        central_workers in -3i64..4,
        drop_hosts in any::<bool>(),
        drop_central in any::<bool>(),
    ) {
        if let Some(p) = spec.parties.first_mut() {
            p.workers = workers;
            p.servers = servers;
            if drop_hosts {
                p.hosts.clear();
            }
        }
        if let Some(c) = spec.central.as_mut() {
            c.global_servers = global_servers;
            c.workers = central_workers;
        }
        if drop_central {
            spec.central = None;
        }
        let _ = geomx_job::compile(&spec);
        let _ = spec.validate();
    }
}

#[test]
fn env_only_count_check_catches_a_wrong_count() {
    // The checker itself must fail on a plan whose counts disagree.
    let src = std::fs::read_to_string(format!(
        "{}/../../examples/pseudo-hips.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("example");
    let mut plan = geomx_job::plan("p", &src).expect("valid");
    check_count_rules(&plan);
    let node = plan
        .nodes
        .iter_mut()
        .find(|n| n.name == "global-scheduler")
        .expect("gs");
    node.env.insert("DMLC_NUM_GLOBAL_WORKER".into(), "3".into());
    let result = std::panic::catch_unwind(|| check_count_rules(&plan));
    assert!(
        result.is_err(),
        "a wrong DMLC_NUM_GLOBAL_WORKER must be caught"
    );
}
