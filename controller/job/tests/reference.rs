//! The examples compile to exactly what geomx-facts.md and the GeoMX deployment guide say.
//!
//! The expected environments are written out literally from the facts table (not derived
//! from the compiler): no variable more, none less.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use geomx_job::{Cpus, Mode, Mount, MountType, Network, Plan, Role};

fn example(name: &str) -> (String, String) {
    let path = format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (path, src)
}

fn plan_of(name: &str) -> Plan {
    let (path, src) = example(name);
    geomx_job::plan(&path, &src).unwrap_or_else(|e| panic!("{e}"))
}

/// Parses `K=V K=V ...` into a map.
fn env(spec: &str) -> BTreeMap<String, String> {
    spec.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("K=V");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Splits a command line on spaces; `IMPORT` is the seed's `python -c "import mxnet"`.
fn argv(cmd: &str) -> Vec<String> {
    if cmd == IMPORT {
        return vec!["python".into(), "-c".into(), "import mxnet".into()];
    }
    cmd.split_whitespace().map(str::to_string).collect()
}

/// (name, role, party, env besides PS_VERBOSE/DMLC_INTERFACE, command, slice, binds)
type Expected = (
    &'static str,
    Role,
    &'static str,
    &'static str,
    &'static str,
    Option<u32>,
    Option<u16>,
);

const COMMON: &str = "PS_VERBOSE=1 DMLC_INTERFACE=eth0";
const IMPORT: &str = "python -c \"import mxnet\"";

#[test]
fn pseudo_hips_is_the_seed_script_node_for_node() {
    let plan = plan_of("pseudo-hips.toml");
    assert_eq!(plan.job, "pseudo-hips");
    assert_eq!(plan.mode, Mode::Hips);
    assert_eq!(plan.network, Network::Pseudo);

    let expected: Vec<Expected> = vec![
        (
            "global-scheduler",
            Role::GlobalScheduler,
            "central",
            "DMLC_ROLE_GLOBAL=global_scheduler DMLC_PS_GLOBAL_ROOT_URI=127.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2",
            IMPORT,
            None,
            Some(9092),
        ),
        (
            "central-scheduler",
            Role::Scheduler,
            "central",
            "DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1",
            IMPORT,
            None,
            Some(9093),
        ),
        (
            "global-server-0",
            Role::GlobalServer,
            "central",
            "DMLC_ROLE_GLOBAL=global_server DMLC_PS_GLOBAL_ROOT_URI=127.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 DMLC_ENABLE_CENTRAL_WORKER=0 DMLC_NUM_ALL_WORKER=4",
            IMPORT,
            None,
            None,
        ),
        (
            "master-worker",
            Role::MasterWorker,
            "central",
            "DMLC_ROLE=worker DMLC_ROLE_MASTER_WORKER=1 DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 DMLC_NUM_ALL_WORKER=4",
            "python /root/GeoMX/examples/cnn.py --cpu",
            None,
            None,
        ),
        (
            "a-scheduler",
            Role::Scheduler,
            "a",
            "DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2",
            IMPORT,
            None,
            Some(9094),
        ),
        (
            "a-server",
            Role::Server,
            "a",
            "DMLC_PS_GLOBAL_ROOT_URI=127.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2",
            IMPORT,
            None,
            None,
        ),
        (
            "a-worker-0",
            Role::Worker,
            "a",
            "DMLC_ROLE=worker DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4",
            "python /root/GeoMX/examples/cnn.py --data-slice-idx 0 --cpu",
            Some(0),
            None,
        ),
        (
            "a-worker-1",
            Role::Worker,
            "a",
            "DMLC_ROLE=worker DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4",
            "python /root/GeoMX/examples/cnn.py --data-slice-idx 1 --cpu",
            Some(1),
            None,
        ),
        (
            "b-scheduler",
            Role::Scheduler,
            "b",
            "DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9095 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2",
            IMPORT,
            None,
            Some(9095),
        ),
        (
            "b-server",
            Role::Server,
            "b",
            "DMLC_PS_GLOBAL_ROOT_URI=127.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9095 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2",
            IMPORT,
            None,
            None,
        ),
        (
            "b-worker-0",
            Role::Worker,
            "b",
            "DMLC_ROLE=worker DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9095 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4",
            "python /root/GeoMX/examples/cnn.py --data-slice-idx 2 --cpu",
            Some(2),
            None,
        ),
        (
            "b-worker-1",
            Role::Worker,
            "b",
            "DMLC_ROLE=worker DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9095 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4",
            "python /root/GeoMX/examples/cnn.py --data-slice-idx 3 --cpu",
            Some(3),
            None,
        ),
    ];

    assert_eq!(plan.nodes.len(), 12);
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    let expected_names: Vec<&str> = expected.iter().map(|e| e.0).collect();
    assert_eq!(names, expected_names);
    for (name, role, party, vars, command, slice, binds) in expected {
        let node = plan.node(name).expect(name);
        assert_eq!(node.role, role, "{name}");
        assert_eq!(node.party, party, "{name}");
        assert_eq!(node.host, "a", "{name}");
        assert_eq!(node.image, "lizonghango00o1/geomx:cpu-only", "{name}");
        assert_eq!(node.env, env(&format!("{vars} {COMMON}")), "{name}");
        assert_eq!(node.command, argv(command), "{name}");
        assert_eq!(node.slice, slice, "{name}");
        assert_eq!(node.binds, binds, "{name}");
        assert_eq!(node.gpus, 0, "{name}");
        assert!(
            node.depends_on().is_empty(),
            "{name}: pseudo has no placeholders"
        );
    }

    // The master's command in the seed script is `python cnn.py --cpu`; the script's
    // python path differs (relative there), the arguments are the same.
    let json = serde_json::to_value(&plan).expect("json");
    assert_eq!(json["job"], "pseudo-hips");
    assert_eq!(json["mode"], "hips");
    assert_eq!(json["nodes"][0]["role"], "global_scheduler");
    assert_eq!(json["nodes"][3]["role"], "master_worker");
    assert_eq!(json["nodes"][0]["env"]["DMLC_NUM_GLOBAL_WORKER"], "2");
}

#[test]
fn pseudo_hips_without_defaults_written_out_is_the_same_plan() {
    let (_, src) = example("pseudo-hips.toml");
    let start = src.find("[command]").expect("[command]");
    let end = src.find("[central]").expect("[central]");
    let short = format!("{}{}", &src[..start], &src[end..]);
    let a = geomx_job::plan("a", &src).expect("valid");
    let b = geomx_job::plan("b", &short).expect("valid");
    assert_eq!(a, b);
}

#[test]
fn hips_is_the_seed_topology_on_three_hosts() {
    let plan = plan_of("hips.toml");
    assert_eq!(plan.network, Network::Routed);
    let host = |n: &str| plan.node(n).expect(n).host.clone();
    for n in [
        "global-scheduler",
        "central-scheduler",
        "global-server-0",
        "master-worker",
    ] {
        assert_eq!(host(n), "a", "{n}");
    }
    for n in ["a-scheduler", "a-server", "a-worker-0", "a-worker-1"] {
        assert_eq!(host(n), "b", "{n}");
    }
    for n in ["b-scheduler", "b-server", "b-worker-0", "b-worker-1"] {
        assert_eq!(host(n), "c", "{n}");
    }

    // Same env as the pseudo plan, with each URI the placeholder of the scheduler it names.
    let pseudo = plan_of("pseudo-hips.toml");
    for node in &plan.nodes {
        let other = pseudo.node(&node.name).expect("same nodes");
        let mut env = node.env.clone();
        for (k, v) in env.iter_mut() {
            if k.ends_with("_URI") {
                *v = "127.0.0.1".into();
            }
        }
        assert_eq!(env, other.env, "{}", node.name);
        assert_eq!(node.command, other.command, "{}", node.name);
    }

    let server = plan.node("a-server").expect("a-server");
    assert_eq!(
        server.env["DMLC_PS_GLOBAL_ROOT_URI"],
        "{{global-scheduler.ip}}"
    );
    assert_eq!(server.env["DMLC_PS_ROOT_URI"], "{{a-scheduler.ip}}");
    assert_eq!(
        server.depends_on().into_iter().collect::<Vec<_>>(),
        vec!["a-scheduler", "global-scheduler"]
    );
    assert_eq!(server.reaches, vec!["global-scheduler", "a-scheduler"]);
    let gs = plan.node("global-server-0").expect("global server");
    assert_eq!(gs.env["DMLC_PS_ROOT_URI"], "{{central-scheduler.ip}}");
    assert_eq!(gs.env["DMLC_PS_GLOBAL_ROOT_URI"], "{{global-scheduler.ip}}");
    // A scheduler binds exactly its own address.
    let cs = plan.node("central-scheduler").expect("central scheduler");
    assert_eq!(cs.env["DMLC_PS_ROOT_URI"], "{{central-scheduler.ip}}");
    assert_eq!(cs.binds, Some(9093));

    // Filling in the addresses of the seed's multi-host guide.
    let ips = |n: &str| match n {
        "global-scheduler" => Some(Ipv4Addr::new(172, 17, 34, 2)),
        "central-scheduler" => Some(Ipv4Addr::new(172, 17, 34, 3)),
        "a-scheduler" => Some(Ipv4Addr::new(172, 17, 29, 2)),
        "b-scheduler" => Some(Ipv4Addr::new(172, 17, 33, 2)),
        _ => None,
    };
    let resolved = gs.resolve_env(&ips).expect("resolved");
    assert_eq!(resolved["DMLC_PS_GLOBAL_ROOT_URI"], "172.17.34.2");
    assert_eq!(resolved["DMLC_PS_ROOT_URI"], "172.17.34.3");
    for node in &plan.nodes {
        let resolved = node.resolve_env(&ips).expect("every address known");
        assert!(
            resolved.values().all(|v| !v.contains("{{")),
            "{}",
            node.name
        );
    }
    assert_eq!(
        plan.hosts().into_iter().collect::<Vec<_>>(),
        vec!["a", "b", "c"]
    );
    assert_eq!(
        plan.container_name("a-worker-0"),
        "geomx.hips-mnist.a-worker-0"
    );
}

#[test]
fn mxnet_ps_is_one_party_with_two_servers_and_four_workers() {
    let plan = plan_of("mxnet-ps.toml");
    assert_eq!(plan.mode, Mode::Ps);
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "ps-scheduler",
            "ps-server-0",
            "ps-server-1",
            "ps-worker-0",
            "ps-worker-1",
            "ps-worker-2",
            "ps-worker-3"
        ]
    );
    let uri = "{{ps-scheduler.ip}}";
    for node in &plan.nodes {
        // (no `verbose`: PS_VERBOSE=1 on the scheduler only, for its rendezvous)
        let (role, verbose) = match node.role {
            Role::Scheduler => ("scheduler", " PS_VERBOSE=1"),
            Role::Server => ("server", ""),
            Role::Worker => ("worker", ""),
            other => panic!("unexpected role {other:?}"),
        };
        assert_eq!(
            node.env,
            env(&format!(
                "DMLC_ROLE={role} DMLC_PS_ROOT_URI={uri} DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=4 DMLC_INTERFACE=eth0{verbose}"
            )),
            "{}",
            node.name
        );
    }
    let hosts: Vec<&str> = plan.nodes.iter().map(|n| n.host.as_str()).collect();
    assert_eq!(hosts, vec!["a", "a", "a", "a", "b", "a", "b"]);
    let w2 = plan.node("ps-worker-2").expect("worker");
    assert_eq!(w2.slice, Some(2));
    assert_eq!(
        w2.command,
        argv(
            "python3 /opt/geomx/examples/mxnet_ps_train.py --data-slice-idx 2 --epochs 20 --lr 0.002"
        )
    );
    assert_eq!(plan.policy.max_restarts, 2);
    assert_eq!(plan.policy.stall_timeout.as_secs(), 300);
}

#[test]
fn json_plan_has_the_documented_shape() {
    let plan = plan_of("hips.toml");
    let json = serde_json::to_value(&plan).expect("json");
    let top: Vec<&str> = json
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    for key in ["job", "mode", "network", "nodes", "policy", "progress"] {
        assert!(top.contains(&key), "{key}");
    }
    assert_eq!(json["policy"]["stall_timeout"], "10m");
    assert_eq!(json["policy"]["restart"], "never");
    let node = &json["nodes"][0];
    for key in [
        "name", "role", "party", "host", "image", "command", "env", "slice", "binds", "reaches",
        "gpus",
    ] {
        assert!(node.get(key).is_some(), "{key}");
    }
    // Round trip.
    let back: Plan = serde_json::from_value(json).expect("plan");
    assert_eq!(back, plan);

    // mounts: [{"type", "source", "target", "readonly"}], placeholders expanded
    let plan = plan_of("hips-data-mounts.toml");
    let json = serde_json::to_value(&plan).expect("json");
    let nodes = json["nodes"].as_array().expect("nodes");
    let mounts: Vec<&serde_json::Value> = nodes
        .iter()
        .flat_map(|n| n["mounts"].as_array().expect("mounts array"))
        .collect();
    assert!(mounts.len() >= 9, "{mounts:?}");
    for m in &mounts {
        let keys: Vec<&str> = m
            .as_object()
            .expect("mount object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["readonly", "source", "target", "type"], "{m}");
        assert!(m["type"] == "bind" || m["type"] == "volume", "{m}");
        assert!(m["readonly"].is_boolean(), "{m}");
        assert!(!m["source"].as_str().expect("source").contains('{'), "{m}");
        assert!(
            m["target"].as_str().expect("target").starts_with('/'),
            "{m}"
        );
    }
    let worker = nodes
        .iter()
        .find(|n| n["name"] == "beijing-worker-0")
        .expect("beijing-worker-0");
    assert_eq!(
        worker["mounts"],
        serde_json::json!([
            { "type": "bind", "source": "/srv/geomx/beijing", "target": "/root/data", "readonly": true }
        ])
    );
    let back: Plan = serde_json::from_value(json).expect("plan");
    assert_eq!(back, plan);
}

/// `examples/hips-data-mounts.toml` (docs/job-file.md's three-site example) parses and
/// compiles: every party's workers bind their own site's directory read-only, the master
/// its directory, its script and the model volume, the schedulers and servers nothing; the
/// limits of each role class as written, `all`'s for the others.
#[test]
fn hips_data_mounts_gives_every_site_its_own_data_and_the_master_its_volume() {
    let plan = plan_of("hips-data-mounts.toml");
    assert_eq!(plan.job, "hips-three-sites");
    let mount = |kind: MountType, source: &str, target: &str, readonly: bool| Mount {
        kind,
        source: source.to_owned(),
        target: target.to_owned(),
        readonly,
        driver: None,
        options: BTreeMap::new(),
    };
    const GIB: u64 = 1 << 30;
    let mut workers = 0;
    for node in &plan.nodes {
        match node.role {
            Role::Worker => {
                workers += 1;
                let host = match node.party.as_str() {
                    "beijing" => "b",
                    "shanghai" => "c",
                    "shenzhen" => "d",
                    other => panic!("{}: party {other}", node.name),
                };
                assert_eq!(node.host, host, "{}", node.name);
                let source = format!("/srv/geomx/{}", node.party);
                assert_eq!(
                    node.mounts,
                    [mount(MountType::Bind, &source, "/root/data", true)],
                    "{}",
                    node.name
                );
                assert_eq!(node.resources.memory, Some(8 * GIB), "{}", node.name);
                assert_eq!(node.resources.cpus, Some(Cpus(2.5)), "{}", node.name);
                assert_eq!(node.resources.shm_size, Some(2 * GIB), "{}", node.name);
            }
            Role::MasterWorker => {
                assert_eq!(node.host, "a");
                assert_eq!(
                    node.mounts,
                    [
                        mount(MountType::Bind, "/srv/geomx/central", "/root/data", true),
                        mount(MountType::Bind, "/srv/geomx/train", "/root/train", true),
                        mount(
                            MountType::Volume,
                            "geomx-hips-three-sites-model",
                            "/root/output",
                            false
                        ),
                    ]
                );
                assert_eq!(node.resources.memory, Some(8 * GIB));
                assert_eq!(node.resources.cpus, Some(Cpus(2.0)));
                assert_eq!(node.resources.shm_size, None);
            }
            _ => {
                assert!(node.mounts.is_empty(), "{} mounts nothing", node.name);
                assert_eq!(node.resources.memory, Some(2 * GIB), "{}", node.name);
                assert_eq!(node.resources.cpus, Some(Cpus(1.0)), "{}", node.name);
            }
        }
        assert_eq!(
            node.resources.pids,
            Some(geomx_job::DEFAULT_PIDS_LIMIT as u64),
            "{}",
            node.name
        );
    }
    assert_eq!(workers, 6);
}
