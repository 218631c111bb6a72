//! Property tests: for any valid job, every count rule of geomx-facts.md holds, checked from
//! the compiled env alone (not from the job), and data slices are unique and dense.

use geomx_job::{
    CentralSpec, CommandSpec, Cpus, EnvSpec, JobSpec, Mode, MountSpec, MountType, Network,
    PartySpec, Plan, PolicySpec, ResourceLimits, ResourcesSpec, Role,
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

/// Mount sources with every placeholder, bind and volume; targets distinct per role class.
fn mounts_strategy(mode: Mode) -> impl Strategy<Value = Vec<MountSpec>> {
    let classes: Vec<&'static str> = match mode {
        Mode::Hips => vec!["all", "schedulers", "servers", "master", "workers"],
        Mode::Ps => vec!["all", "schedulers", "servers", "workers"],
    };
    let one = (
        any::<bool>(),
        proptest::sample::select(vec![
            "/srv/geomx/{party}",
            "/data/{job}/{node}",
            "/mnt/{host}-{party}",
            "/var/{party}/data",
        ]),
        proptest::sample::select(vec!["geomx-{job}-output", "{party}.{node}", "cache"]),
        proptest::option::of(proptest::sample::subsequence(classes, 1..=2)),
        any::<bool>(),
    );
    proptest::collection::vec(one, 0..=4).prop_map(|mounts| {
        mounts
            .into_iter()
            .enumerate()
            .map(
                |(i, (bind, bind_src, vol_src, roles, readonly))| MountSpec {
                    kind: if bind {
                        MountType::Bind
                    } else {
                        MountType::Volume
                    },
                    source: if bind { bind_src } else { vol_src }.to_string(),
                    target: format!("/mnt/m{i}"),
                    roles: roles.map(|r| r.into_iter().map(str::to_string).collect()),
                    readonly,
                    driver: (!bind && i % 2 == 0).then(|| "local".to_string()),
                    options: Default::default(),
                },
            )
            .collect()
    })
}

fn limits_strategy() -> impl Strategy<Value = ResourceLimits> {
    (
        proptest::option::of(proptest::sample::select(vec!["512m", "8g", "1.5g"])),
        proptest::option::of(proptest::sample::select(vec![0.5, 2.0, 2.5])),
        proptest::option::of(16i64..=100_000),
        proptest::option::of(proptest::sample::select(vec!["64m", "2g"])),
    )
        .prop_map(|(memory, cpus, pids, shm)| ResourceLimits {
            memory: memory.map(str::to_string),
            cpus: cpus.map(Cpus),
            pids,
            shm_size: shm.map(str::to_string),
        })
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
        mounts in mounts_strategy(mode),
        all_limits in limits_strategy(),
        worker_limits in limits_strategy(),
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
            image_pull: geomx_job::ImagePull::IfNotPresent,
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
            mounts,
            resources: ResourcesSpec {
                all: all_limits,
                workers: worker_limits,
                ..ResourcesSpec::default()
            },
        }
    }
}

// The count-rule checker is shared with the fuzz targets (which run it on arbitrary job
// files) and their stable replay: one copy, in the fuzz crate.
#[path = "../../../tests/fuzz/src/job_checks.rs"]
#[allow(dead_code)]
mod job_checks;

/// Every count rule, read from the env of the plan's nodes only.
fn check_count_rules(plan: &Plan) {
    job_checks::check_plan(plan);
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
        // The size estimate the limit is checked on is close to the plan's real size.
        let real = serde_json::to_vec(&plan).expect("json").len() as u64;
        let estimate = geomx_job::plan_bytes_estimate(&spec);
        prop_assert!(estimate >= real / 2 && estimate <= real * 2, "estimate {estimate}, plan {real} bytes");
        // Every node's expanded mounts are valid and the job's for its class.
        job_checks::check_mounts(&spec, &plan);
        // Resources: the class's keys, else all's, else the defaults.
        for n in &plan.nodes {
            let own = if n.role == Role::Worker { &spec.resources.workers } else { &ResourceLimits::default() };
            let want = own.or(&spec.resources.all);
            prop_assert_eq!(n.resources.memory, want.memory.as_deref().and_then(geomx_job::parse_size));
            prop_assert_eq!(n.resources.cpus, want.cpus);
            prop_assert_eq!(n.resources.pids, Some(want.pids.unwrap_or(geomx_job::DEFAULT_PIDS_LIMIT) as u64));
        }
        // PS_VERBOSE: `verbose` when set, else 1 on schedulers only.
        for n in &plan.nodes {
            let want = spec.verbose.map(|v| v.to_string()).or_else(|| n.role.is_scheduler().then(|| "1".to_string()));
            prop_assert_eq!(n.env.get("PS_VERBOSE").cloned(), want);
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
