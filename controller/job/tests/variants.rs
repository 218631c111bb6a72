//! Each of GeoMX's task variants (scripts/cpu/*.sh) is expressible with [command] and [env];
//! each test checks the env (and commands) that matter for that variant.

use geomx_job::{Node, Plan, Role};

/// The seed topology (pseudo, 2 parties × 2 workers) plus `extra` TOML.
fn seed_with(top: &str, extra: &str) -> Plan {
    let src = format!(
        r#"
name = "variant"
mode = "hips"
image = "lizonghango00o1/geomx:cpu-only"
network = "pseudo"
verbose = 1
{top}

[central]
host = "a"

[[party]]
name = "a"
hosts = ["a"]
workers = 2

[[party]]
name = "b"
hosts = ["a"]
workers = 2

{extra}
"#
    );
    geomx_job::plan("variant.toml", &src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

fn is_scheduler(n: &Node) -> bool {
    n.role.is_scheduler()
}
fn is_server(n: &Node) -> bool {
    matches!(n.role, Role::Server | Role::GlobalServer)
}
fn is_master(n: &Node) -> bool {
    n.role == Role::MasterWorker
}
fn is_worker(n: &Node) -> bool {
    n.role == Role::Worker
}

/// Asserts `vars` are set (with these values) exactly on the nodes `on` selects.
fn assert_vars(plan: &Plan, vars: &[(&str, &str)], on: impl Fn(&Node) -> bool) {
    for node in &plan.nodes {
        for (k, v) in vars {
            if on(node) {
                assert_eq!(
                    node.env.get(*k).map(String::as_str),
                    Some(*v),
                    "{} should have {k}={v}",
                    node.name
                );
            } else {
                assert!(
                    !node.env.contains_key(*k),
                    "{} should not have {k}",
                    node.name
                );
            }
        }
    }
}

#[test]
fn bisparse_compression() {
    let plan = seed_with(
        "",
        r#"
[command]
worker = ["python", "/root/GeoMX/examples/cnn_bsc.py", "--data-slice-idx", "{slice}", "--cpu"]
[env]
servers = { MXNET_KVSTORE_SIZE_LOWER_BOUND = "1000" }
"#,
    );
    assert_vars(
        &plan,
        &[("MXNET_KVSTORE_SIZE_LOWER_BOUND", "1000")],
        is_server,
    );
    assert_eq!(
        plan.node("b-worker-1").expect("worker").command[1],
        "/root/GeoMX/examples/cnn_bsc.py"
    );
    // The master runs the same script, without the slice.
    assert_eq!(
        plan.node("master-worker").expect("master").command,
        ["python", "/root/GeoMX/examples/cnn_bsc.py", "--cpu"]
    );
}

#[test]
fn mixed_precision() {
    let plan = seed_with(
        "",
        r#"
[command]
worker = ["python", "/root/GeoMX/examples/cnn_mpq.py", "--data-slice-idx", "{slice}", "--cpu"]
[env]
servers = { MXNET_KVSTORE_SIZE_LOWER_BOUND = "1000" }
master = { MXNET_KVSTORE_SIZE_LOWER_BOUND = "1000" }
workers = { MXNET_KVSTORE_SIZE_LOWER_BOUND = "1000" }
"#,
    );
    assert_vars(&plan, &[("MXNET_KVSTORE_SIZE_LOWER_BOUND", "1000")], |n| {
        !is_scheduler(n)
    });
}

#[test]
fn hfa_sync() {
    let plan = seed_with(
        "",
        r#"
[command]
worker = ["python", "/root/GeoMX/examples/cnn_hfa.py", "--data-slice-idx", "{slice}", "--cpu"]
[env.servers]
MXNET_KVSTORE_USE_HFA = "1"
MXNET_KVSTORE_HFA_K1 = "20"
MXNET_KVSTORE_HFA_K2 = "10"
[env.master]
MXNET_KVSTORE_USE_HFA = "1"
MXNET_KVSTORE_HFA_K1 = "20"
MXNET_KVSTORE_HFA_K2 = "10"
[env.workers]
MXNET_KVSTORE_USE_HFA = "1"
MXNET_KVSTORE_HFA_K1 = "20"
MXNET_KVSTORE_HFA_K2 = "10"
"#,
    );
    assert_vars(
        &plan,
        &[
            ("MXNET_KVSTORE_USE_HFA", "1"),
            ("MXNET_KVSTORE_HFA_K1", "20"),
            ("MXNET_KVSTORE_HFA_K2", "10"),
        ],
        |n| !is_scheduler(n),
    );
}

#[test]
fn mixed_sync_master_gets_the_flag() {
    let plan = seed_with(
        "",
        r#"
[command]
master = ["python", "/root/GeoMX/examples/cnn.py", "--cpu", "--mixed-sync"]
"#,
    );
    for node in &plan.nodes {
        let has = node.command.iter().any(|a| a == "--mixed-sync");
        assert_eq!(has, is_master(node), "{}", node.name);
    }
    assert_eq!(
        plan.node("a-worker-0").expect("worker").command,
        [
            "python",
            "/root/GeoMX/examples/cnn.py",
            "--data-slice-idx",
            "0",
            "--cpu"
        ]
    );
}

#[test]
fn dgt() {
    let plan = seed_with(
        "",
        r#"
[env.servers]
ENABLE_DGT = "2"
DMLC_UDP_CHANNEL_NUM = "3"
DMLC_K = "0.8"
ADAPTIVE_K_FLAG = "1"
"#,
    );
    assert_vars(
        &plan,
        &[
            ("ENABLE_DGT", "2"),
            ("DMLC_UDP_CHANNEL_NUM", "3"),
            ("DMLC_K", "0.8"),
            ("ADAPTIVE_K_FLAG", "1"),
        ],
        is_server,
    );
}

#[test]
fn p3_on_servers_and_workers_not_the_master() {
    let plan = seed_with(
        "",
        r#"
[env]
servers = { ENABLE_P3 = "1" }
workers = { ENABLE_P3 = "1" }
"#,
    );
    assert_vars(&plan, &[("ENABLE_P3", "1")], |n| {
        is_server(n) || is_worker(n)
    });
}

#[test]
fn tsengine_on_every_non_scheduler() {
    let ts = r#"{ ENABLE_INTER_TS = "1", ENABLE_INTRA_TS = "1", MAX_GREED_RATE_TS = "0.9" }"#;
    let plan = seed_with(
        "",
        &format!("[env]\nservers = {ts}\nmaster = {ts}\nworkers = {ts}\n"),
    );
    assert_vars(
        &plan,
        &[
            ("ENABLE_INTER_TS", "1"),
            ("ENABLE_INTRA_TS", "1"),
            ("MAX_GREED_RATE_TS", "0.9"),
        ],
        |n| !is_scheduler(n),
    );
}

#[test]
fn multi_global_servers() {
    let src = r#"
name = "multi-gps"
mode = "hips"
image = "lizonghango00o1/geomx:cpu-only"
network = "pseudo"

[central]
host = "a"
global_servers = 2

[[party]]
name = "a"
hosts = ["a"]
workers = 2

[[party]]
name = "b"
hosts = ["a"]
workers = 2
"#;
    let plan = geomx_job::plan("multi.toml", src).expect("valid");
    assert_eq!(plan.nodes.len(), 13);
    let gs: Vec<&Node> = plan
        .nodes
        .iter()
        .filter(|n| n.role == Role::GlobalServer)
        .collect();
    assert_eq!(
        gs.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["global-server-0", "global-server-1"]
    );
    for node in &plan.nodes {
        if let Some(v) = node.env.get("DMLC_NUM_GLOBAL_SERVER") {
            assert_eq!(v, "2", "{}", node.name);
        }
        if node.party == "central" && node.role != Role::GlobalScheduler {
            assert_eq!(node.env["DMLC_NUM_SERVER"], "2", "{}", node.name);
            assert_eq!(node.env["DMLC_PS_ROOT_PORT"], "9093", "{}", node.name);
        }
    }
    assert_eq!(
        plan.node("global-scheduler").expect("gs").env["DMLC_NUM_GLOBAL_WORKER"],
        "2"
    );
}

#[test]
fn central_training_workers() {
    let src = r#"
name = "central-training"
mode = "hips"
image = "lizonghango00o1/geomx:cpu-only"
network = "pseudo"

[central]
host = "a"
workers = 2

[[party]]
name = "a"
hosts = ["a"]
workers = 2

[[party]]
name = "b"
hosts = ["a"]
workers = 3
"#;
    let plan = geomx_job::plan("central.toml", src).expect("valid");
    // C = 2 central workers + the master = 3; all = 2 + 3 + 3 = 8.
    let gs = plan.node("global-server-0").expect("global server");
    assert_eq!(gs.env["DMLC_ENABLE_CENTRAL_WORKER"], "1");
    assert_eq!(gs.env["DMLC_NUM_WORKER"], "3");
    assert_eq!(gs.env["DMLC_NUM_ALL_WORKER"], "8");
    for name in [
        "central-scheduler",
        "master-worker",
        "central-worker-0",
        "central-worker-1",
    ] {
        let node = plan.node(name).expect(name);
        assert_eq!(node.env["DMLC_NUM_WORKER"], "3", "{name}");
        assert_eq!(node.env["DMLC_NUM_SERVER"], "1", "{name}");
        assert_eq!(node.env["DMLC_PS_ROOT_PORT"], "9093", "{name}");
        assert!(
            !node.env.contains_key("DMLC_ENABLE_CENTRAL_WORKER"),
            "{name}"
        );
    }
    let cw = plan.node("central-worker-1").expect("central worker");
    assert_eq!(cw.role, Role::Worker);
    assert_eq!(cw.party, "central");
    assert_eq!(cw.env["DMLC_ROLE"], "worker");
    assert_eq!(cw.env["DMLC_NUM_ALL_WORKER"], "8");
    // Slices: party a 0-1, party b 2-4, central workers 5-6, master 7.
    let slice = |n: &str| plan.node(n).expect(n).slice;
    assert_eq!(slice("a-worker-1"), Some(1));
    assert_eq!(slice("b-worker-2"), Some(4));
    assert_eq!(slice("central-worker-0"), Some(5));
    assert_eq!(slice("central-worker-1"), Some(6));
    assert_eq!(slice("master-worker"), Some(7));
    assert_eq!(
        plan.node("master-worker").expect("master").command,
        [
            "python",
            "/root/GeoMX/examples/cnn.py",
            "--cpu",
            "--data-slice-idx",
            "7"
        ]
    );
    assert_eq!(
        cw.command,
        [
            "python",
            "/root/GeoMX/examples/cnn.py",
            "--data-slice-idx",
            "6",
            "--cpu"
        ]
    );
}

#[test]
fn fp16_is_a_command_change() {
    let plan = seed_with(
        "",
        r#"
[command]
worker = ["python", "/root/GeoMX/examples/cnn_fp16.py", "--data-slice-idx", "{slice}", "--cpu"]
"#,
    );
    assert_eq!(
        plan.node("master-worker").expect("master").command,
        ["python", "/root/GeoMX/examples/cnn_fp16.py", "--cpu"]
    );
}

#[test]
fn env_merges_all_then_class_and_computed_wins() {
    let plan = seed_with(
        "interface = \"ethwe\"",
        r#"
[env]
all = { A = "all", B = "all" }
workers = { B = "workers" }
schedulers = { C = "schedulers" }
"#,
    );
    let w = plan.node("a-worker-0").expect("worker");
    assert_eq!(w.env["A"], "all");
    assert_eq!(w.env["B"], "workers");
    assert!(!w.env.contains_key("C"));
    assert_eq!(w.env["DMLC_INTERFACE"], "ethwe");
    let s = plan.node("a-scheduler").expect("scheduler");
    assert_eq!(s.env["B"], "all");
    assert_eq!(s.env["C"], "schedulers");
    let m = plan.node("master-worker").expect("master");
    assert_eq!(m.env["B"], "all", "the master is not in the workers class");
}

#[test]
fn verbose_unset_means_no_ps_verbose() {
    let src = r#"
name = "quiet"
mode = "ps"
image = "img"
[[party]]
name = "p"
hosts = ["h"]
workers = 1
"#;
    let plan = geomx_job::plan("quiet.toml", src).expect("valid");
    // without `verbose`: PS_VERBOSE=1 on the schedulers only (geomx follows their
    // rendezvous), on no other node
    for n in &plan.nodes {
        let want = n.role.is_scheduler().then_some("1");
        assert_eq!(
            n.env.get("PS_VERBOSE").map(String::as_str),
            want,
            "{}",
            n.name
        );
    }
    assert!(plan.nodes.iter().all(|n| n.env["DMLC_INTERFACE"] == "eth0"));
    assert_eq!(plan.node("p-scheduler").expect("s").binds, Some(9094));
}

#[test]
fn worker_command_without_slice_gets_it_appended_and_gpus_go_to_workers() {
    let plan = seed_with(
        "",
        r#"
[command]
worker = ["python", "train.py"]
[policy]
gpus_per_worker = 2
"#,
    );
    let w = plan.node("b-worker-0").expect("worker");
    assert_eq!(w.command, ["python", "train.py", "--data-slice-idx", "2"]);
    assert_eq!(w.gpus, 2);
    let m = plan.node("master-worker").expect("master");
    assert_eq!(m.command, ["python", "train.py"]);
    assert_eq!(m.gpus, 2);
    assert_eq!(plan.node("a-server").expect("server").gpus, 0);
    assert_eq!(plan.node("global-scheduler").expect("gs").gpus, 0);
}

#[test]
fn workers_round_robin_over_party_hosts() {
    let src = r#"
name = "rr"
mode = "hips"
image = "img"
[central]
host = "c"
[[party]]
name = "p"
hosts = ["h1", "h2", "h3"]
workers = 5
"#;
    let plan = geomx_job::plan("rr.toml", src).expect("valid");
    let host = |n: &str| plan.node(n).expect(n).host.clone();
    assert_eq!(host("p-scheduler"), "h1");
    assert_eq!(host("p-server"), "h1");
    let workers: Vec<String> = (0..5).map(|i| host(&format!("p-worker-{i}"))).collect();
    assert_eq!(workers, ["h1", "h2", "h3", "h1", "h2"]);
    assert_eq!(host("global-scheduler"), "c");
}
