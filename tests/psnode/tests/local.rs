//! geomx-psnode processes on 127.0.0.1: the seed's full HiPS topology registers, trains
//! and stops; a scheduler bound to a foreign address fails like ps-lite; `python` works.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_geomx-psnode");

struct Proc {
    name: String,
    child: Child,
    out: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    fn spawn(name: &str, env: &[(String, String)], args: &[&str]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_clear()
            .env("GEOMX_NODE", name)
            .env("DMLC_NODE_HOST", "127.0.0.1")
            .env("PS_VERBOSE", "1")
            .env("DMLC_INTERFACE", "lo")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn geomx-psnode");
        let out = Arc::new(Mutex::new(String::new()));
        let pipes: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        let mut readers = Vec::new();
        for pipe in pipes {
            let out = out.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut o) = out.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                }
            }));
        }
        Proc {
            name: name.to_string(),
            child,
            out,
            readers,
        }
    }

    fn output(&self) -> String {
        self.out.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn wait_output(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let o = self.output();
            if o.contains(needle) {
                return o;
            }
            assert!(
                start.elapsed() < timeout,
                "{}: no {needle:?} within {timeout:?}; output:\n{o}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // the pipes close with the process: all its output is in once they are read
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return st.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not exit within {timeout:?}; output:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> i32 {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(5))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn hips_topology_registers_trains_and_stops() {
    let (g, c, a, b) = (free_port(), free_port(), free_port(), free_port());
    let (g, c, a, b) = (g.to_string(), c.to_string(), a.to_string(), b.to_string());
    let ip = "127.0.0.1";
    let fast = [
        ("PSNODE_INTERVAL", "20ms"),
        ("PSNODE_ITERATIONS", "6"),
        ("PSNODE_ITERS_PER_EPOCH", "3"),
    ];
    let global = [
        ("DMLC_PS_GLOBAL_ROOT_URI", ip),
        ("DMLC_PS_GLOBAL_ROOT_PORT", g.as_str()),
        ("DMLC_NUM_GLOBAL_SERVER", "1"),
        ("DMLC_NUM_GLOBAL_WORKER", "2"),
    ];
    let central = [
        ("DMLC_PS_ROOT_URI", ip),
        ("DMLC_PS_ROOT_PORT", c.as_str()),
        ("DMLC_NUM_SERVER", "1"),
        ("DMLC_NUM_WORKER", "1"),
    ];
    let party = |port: &str| {
        kv(&[
            ("DMLC_PS_ROOT_URI", ip),
            ("DMLC_PS_ROOT_PORT", port),
            ("DMLC_NUM_SERVER", "1"),
            ("DMLC_NUM_WORKER", "2"),
        ])
    };

    let mut procs = Vec::new();
    // workers and servers first: like ps-lite they wait for their schedulers
    for (p, port, slices) in [("a", &a, [0, 1]), ("b", &b, [2, 3])] {
        for (i, slice) in slices.iter().enumerate() {
            let env = [
                kv(&fast),
                kv(&[("DMLC_ROLE", "worker"), ("DMLC_NUM_ALL_WORKER", "4")]),
                party(port),
            ]
            .concat();
            let slice = slice.to_string();
            procs.push(Proc::spawn(
                &format!("{p}-worker-{i}"),
                &env,
                &[
                    "/root/GeoMX/examples/cnn.py",
                    "--data-slice-idx",
                    &slice,
                    "--cpu",
                ],
            ));
        }
        let env = [kv(&global), kv(&[("DMLC_ROLE", "server")]), party(port)].concat();
        procs.push(Proc::spawn(
            &format!("{p}-server"),
            &env,
            &["-c", "import mxnet"],
        ));
        let env = [kv(&[("DMLC_ROLE", "scheduler")]), party(port)].concat();
        procs.push(Proc::spawn(
            &format!("{p}-scheduler"),
            &env,
            &["-c", "import mxnet"],
        ));
    }
    let env = [
        kv(&fast),
        kv(&central),
        kv(&[
            ("DMLC_ROLE", "worker"),
            ("DMLC_ROLE_MASTER_WORKER", "1"),
            ("DMLC_NUM_ALL_WORKER", "4"),
        ]),
    ]
    .concat();
    procs.push(Proc::spawn("master-worker", &env, &["cnn.py", "--cpu"]));
    let env = [
        kv(&global),
        kv(&central),
        kv(&[
            ("DMLC_ROLE_GLOBAL", "global_server"),
            ("DMLC_ROLE", "server"),
            ("DMLC_ENABLE_CENTRAL_WORKER", "0"),
            ("DMLC_NUM_ALL_WORKER", "4"),
        ]),
    ]
    .concat();
    procs.push(Proc::spawn("global-server", &env, &["-c", "import mxnet"]));
    let env = [kv(&central), kv(&[("DMLC_ROLE", "scheduler")])].concat();
    procs.push(Proc::spawn(
        "central-scheduler",
        &env,
        &["-c", "import mxnet"],
    ));
    let env = [kv(&global), kv(&[("DMLC_ROLE_GLOBAL", "global_scheduler")])].concat();
    procs.push(Proc::spawn(
        "global-scheduler",
        &env,
        &["-c", "import mxnet"],
    ));

    let t = Duration::from_secs(20);
    let names: Vec<String> = procs.iter().map(|p| p.name.clone()).collect();
    let by = |name: &str| names.iter().position(|n| n == name).expect(name);
    let o = procs[by("global-scheduler")].wait_output("complete: servers=1 workers=2", t);
    assert!(
        o.contains(&format!("global_scheduler {ip}:{g} complete")),
        "{o}"
    );
    procs[by("central-scheduler")].wait_output("complete: servers=1 workers=1", t);
    procs[by("a-scheduler")].wait_output("complete: servers=1 workers=2", t);
    procs[by("b-scheduler")].wait_output("complete: servers=1 workers=2", t);

    for name in [
        "a-worker-0",
        "a-worker-1",
        "b-worker-0",
        "b-worker-1",
        "master-worker",
    ] {
        let i = by(name);
        assert_eq!(procs[i].wait_exit(t), 0, "{name}:\n{}", procs[i].output());
        let out = procs[i].output();
        assert!(
            out.contains("Start training on 4 workers, my rank is"),
            "{out}"
        );
        assert!(out.contains("[Epoch 1][Iteration 6] Test Acc"), "{out}");
        assert!(out.contains("connected to 1 server(s)"), "{out}");
    }
    assert!(
        procs[by("b-worker-1")]
            .output()
            .contains("psnode: data slice 3")
    );
    // servers saw their workers' connections
    assert!(procs[by("a-server")].output().matches("connected").count() >= 2);
    assert!(procs[by("global-server")].output().contains("ready"));
    for name in [
        "a-server",
        "b-server",
        "global-server",
        "a-scheduler",
        "central-scheduler",
        "global-scheduler",
    ] {
        let i = by(name);
        assert_eq!(procs[i].terminate(), 0, "{name} on SIGTERM");
    }
}

#[test]
fn scheduler_on_a_foreign_address_fails_to_bind() {
    let mut p = Proc::spawn(
        "scheduler",
        &kv(&[
            ("DMLC_ROLE", "scheduler"),
            ("DMLC_PS_ROOT_URI", "10.255.255.254"),
            ("DMLC_PS_ROOT_PORT", "9093"),
            ("DMLC_NUM_SERVER", "1"),
            ("DMLC_NUM_WORKER", "1"),
        ]),
        &["-c", "import mxnet"],
    );
    assert_eq!(p.wait_exit(Duration::from_secs(5)), 1);
    assert!(p.output().contains("bind failed"), "{}", p.output());
}

#[test]
fn an_incomplete_scheduler_waits_and_says_so() {
    let port = free_port().to_string();
    let mut s = Proc::spawn(
        "scheduler",
        &kv(&[
            ("DMLC_ROLE", "scheduler"),
            ("DMLC_PS_ROOT_URI", "127.0.0.1"),
            ("DMLC_PS_ROOT_PORT", &port),
            ("DMLC_NUM_SERVER", "1"),
            ("DMLC_NUM_WORKER", "2"),
        ]),
        &[],
    );
    let mut w = Proc::spawn(
        "w",
        &kv(&[
            ("DMLC_ROLE", "worker"),
            ("DMLC_PS_ROOT_URI", "127.0.0.1"),
            ("DMLC_PS_ROOT_PORT", &port),
            ("DMLC_NUM_SERVER", "1"),
            ("DMLC_NUM_WORKER", "2"),
        ]),
        &[],
    );
    s.wait_output("registered worker 1/2", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!s.output().contains("complete"));
    assert!(
        w.child.try_wait().ok().flatten().is_none(),
        "the worker must wait"
    );
    assert_eq!(w.terminate(), 0);
    assert_eq!(s.terminate(), 0);
}

#[test]
fn runs_as_python() {
    let dir = std::env::temp_dir().join(format!("psnode-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let python = dir.join("python");
    let _ = std::fs::remove_file(&python);
    std::os::unix::fs::symlink(BIN, &python).expect("symlink");
    let out = Command::new(&python)
        .args(["-c", "import mxnet"])
        .env_clear()
        .output()
        .expect("run python");
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
