//! What a node is, read from the DMLC_* environment exactly as GeoMX reads it, plus the
//! psnode's own PSNODE_* switches and the `python ...` arguments.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The role of a node in GeoMX's two-layer topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `DMLC_ROLE_GLOBAL=global_scheduler`: binds the global root address, waits for the
    /// global servers and one party server per party.
    GlobalScheduler,
    /// `DMLC_ROLE_GLOBAL=global_server` (and `DMLC_ROLE=server`): registers with the global
    /// scheduler (as a server) and the central scheduler (as a server).
    GlobalServer,
    /// `DMLC_ROLE=scheduler`: binds the local root address, waits for its servers and workers.
    Scheduler,
    /// `DMLC_ROLE=server` with the global variables but no `DMLC_ROLE_GLOBAL`: a party
    /// server, registers with its party scheduler (server) and the global scheduler (worker).
    PartyServer,
    /// `DMLC_ROLE=server` without global variables: a plain ps-lite server.
    Server,
    /// `DMLC_ROLE=worker` with `DMLC_ROLE_MASTER_WORKER=1`: the central master worker.
    MasterWorker,
    /// `DMLC_ROLE=worker`.
    Worker,
    /// No role: `python -c "import mxnet"` outside a cluster; exits 0 at once.
    Idle,
}

impl Role {
    /// The name used in log lines.
    pub fn name(self) -> &'static str {
        match self {
            Role::GlobalScheduler => "global_scheduler",
            Role::GlobalServer => "global_server",
            Role::Scheduler => "scheduler",
            Role::PartyServer => "party_server",
            Role::Server => "server",
            Role::MasterWorker => "master_worker",
            Role::Worker => "worker",
            Role::Idle => "idle",
        }
    }

    /// Whether the node trains (prints progress).
    pub fn trains(self) -> bool {
        matches!(self, Role::Worker | Role::MasterWorker)
    }
}

/// How a node registers with a scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// As a server of that layer.
    Server,
    /// As a worker of that layer.
    Worker,
}

impl Kind {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::Worker => "worker",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "server" => Some(Kind::Server),
            "worker" => Some(Kind::Worker),
            _ => None,
        }
    }
}

/// Which layer a scheduler serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// `DMLC_PS_ROOT_*`.
    Local,
    /// `DMLC_PS_GLOBAL_ROOT_*`.
    Global,
}

impl Layer {
    /// Wire/log name.
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Local => "local",
            Layer::Global => "global",
        }
    }
}

/// A scheduler's address and the registrations it expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduler {
    /// Layer.
    pub layer: Layer,
    /// `DMLC_PS_ROOT_URI` / `DMLC_PS_GLOBAL_ROOT_URI`.
    pub uri: String,
    /// `DMLC_PS_ROOT_PORT` / `DMLC_PS_GLOBAL_ROOT_PORT`.
    pub port: u16,
    /// Servers of the layer (`DMLC_NUM_SERVER` / `DMLC_NUM_GLOBAL_SERVER`).
    pub servers: usize,
    /// Workers of the layer (`DMLC_NUM_WORKER` / `DMLC_NUM_GLOBAL_WORKER`).
    pub workers: usize,
}

impl Scheduler {
    /// `uri:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.uri, self.port)
    }
}

/// Everything a node needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Role.
    pub role: Role,
    /// The scheduler this node binds (schedulers) or registers with, per layer and kind.
    pub registrations: Vec<(Scheduler, Kind)>,
    /// For schedulers: what they bind and wait for.
    pub serves: Option<Scheduler>,
    /// `DMLC_NODE_HOST`.
    pub node_host: Option<String>,
    /// `DMLC_INTERFACE` (default eth0).
    pub interface: String,
    /// `PORT`: fixed local-layer port.
    pub port: Option<u16>,
    /// `DMLC_NUM_ALL_WORKER` (or `DMLC_NUM_WORKER`): N in "Start training on N workers".
    pub all_workers: usize,
    /// `--data-slice-idx`.
    pub data_slice: Option<u64>,
    /// `PSNODE_INTERVAL` (ms, or with a unit: 200ms, 1s).
    pub interval: Duration,
    /// `PSNODE_ITERATIONS`.
    pub iterations: u64,
    /// `PSNODE_ITERS_PER_EPOCH`.
    pub iters_per_epoch: u64,
    /// `PSNODE_CRASH_AFTER`: exit 3 after that many iterations.
    pub crash_after: Option<u64>,
    /// `PSNODE_HANG_AFTER`: stop printing and sleep after that many iterations.
    pub hang_after: Option<u64>,
    /// `PSNODE_EXIT_CODE`: exit code after the last iteration (default 0).
    pub exit_code: i32,
    /// `PSNODE_FINALIZE_EXIT`: exit code of a scheduler or server once every worker it
    /// waits for said goodbye (ps-lite's `Finalize`; default 0, 139 imitates GeoMX's crash).
    pub finalize_exit: i32,
    /// `PSNODE_HTTP_HEARTBEAT=1`: POST progress to `GEOMX_AGENT_URL` too.
    pub http_heartbeat: bool,
    /// `GEOMX_AGENT_URL`.
    pub agent_url: Option<String>,
    /// `GEOMX_HEARTBEAT_TOKEN`: sent as `Authorization: Bearer ...` with the heartbeats.
    pub heartbeat_token: Option<String>,
    /// `GEOMX_JOB`.
    pub job: Option<String>,
    /// `GEOMX_NODE` (or `HOSTNAME`): a name for log lines.
    pub name: String,
}

/// Environment lookups with ps-lite's error style.
struct Env<'a>(&'a BTreeMap<String, String>);

impl Env<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn req(&self, k: &str) -> Result<&str> {
        self.get(k)
            .with_context(|| format!("Check failed: env {k} is not set (ps-lite needs it)"))
    }

    fn num<T: std::str::FromStr>(&self, k: &str) -> Result<Option<T>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| anyhow::anyhow!("env {k}={v:?} is not a valid number")),
        }
    }

    fn req_num<T: std::str::FromStr>(&self, k: &str) -> Result<T> {
        self.num(k)?
            .with_context(|| format!("Check failed: env {k} is not set (ps-lite needs it)"))
    }

    fn local(&self) -> Result<Scheduler> {
        Ok(Scheduler {
            layer: Layer::Local,
            uri: self.req("DMLC_PS_ROOT_URI")?.to_string(),
            port: self.req_num("DMLC_PS_ROOT_PORT")?,
            servers: self.req_num("DMLC_NUM_SERVER")?,
            workers: self.req_num("DMLC_NUM_WORKER")?,
        })
    }

    fn global(&self) -> Result<Scheduler> {
        Ok(Scheduler {
            layer: Layer::Global,
            uri: self.req("DMLC_PS_GLOBAL_ROOT_URI")?.to_string(),
            port: self.req_num("DMLC_PS_GLOBAL_ROOT_PORT")?,
            servers: self.req_num("DMLC_NUM_GLOBAL_SERVER")?,
            workers: self.req_num("DMLC_NUM_GLOBAL_WORKER")?,
        })
    }
}

/// Parses a duration: plain milliseconds ("200") or with a unit ("200ms", "1.5s").
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.trim().parse::<u64>().ok().map(Duration::from_millis);
    }
    if let Some(secs) = s.strip_suffix('s') {
        return secs
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(Duration::from_secs_f64);
    }
    s.parse::<u64>().ok().map(Duration::from_millis)
}

/// The value of `--data-slice-idx N` (or `--data-slice-idx=N`) among the arguments.
pub fn data_slice(args: &[String]) -> Result<Option<u64>> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = if a == "--data-slice-idx" {
            it.next()
                .context("--data-slice-idx needs a value")?
                .as_str()
        } else if let Some(v) = a.strip_prefix("--data-slice-idx=") {
            v
        } else {
            continue;
        };
        return v
            .parse()
            .map(Some)
            .with_context(|| format!("--data-slice-idx {v:?} is not a number"));
    }
    Ok(None)
}

impl Config {
    /// Reads the configuration from an environment and the command-line arguments (the
    /// arguments a `python` invocation got, script path included).
    pub fn from_env(env: &BTreeMap<String, String>, args: &[String]) -> Result<Config> {
        let e = Env(env);
        let role_global = e.get("DMLC_ROLE_GLOBAL");
        let role_local = e.get("DMLC_ROLE");
        let has_global = e.get("DMLC_PS_GLOBAL_ROOT_URI").is_some();
        let master = e.get("DMLC_ROLE_MASTER_WORKER") == Some("1");
        let role = match (role_global, role_local) {
            (Some("global_scheduler"), _) => Role::GlobalScheduler,
            (Some("global_server"), _) => Role::GlobalServer,
            (Some(other), _) => bail!("unknown DMLC_ROLE_GLOBAL {other:?}"),
            (None, Some("scheduler")) => Role::Scheduler,
            (None, Some("server")) if has_global => Role::PartyServer,
            (None, Some("server")) => Role::Server,
            (None, Some("worker")) if master => Role::MasterWorker,
            (None, Some("worker")) => Role::Worker,
            (None, Some(other)) => bail!("unknown DMLC_ROLE {other:?}"),
            (None, None) => Role::Idle,
        };
        let (serves, registrations) = match role {
            Role::GlobalScheduler => (Some(e.global()?), vec![]),
            Role::Scheduler => (Some(e.local()?), vec![]),
            Role::GlobalServer => (
                None,
                vec![(e.global()?, Kind::Server), (e.local()?, Kind::Server)],
            ),
            Role::PartyServer => {
                let local = e.local()?;
                if local.servers != 1 {
                    bail!(
                        "Check failed: DMLC_NUM_SERVER={} on a party server: load balance at the first layer is not supported",
                        local.servers
                    );
                }
                (
                    None,
                    vec![(local, Kind::Server), (e.global()?, Kind::Worker)],
                )
            }
            Role::Server => (None, vec![(e.local()?, Kind::Server)]),
            Role::MasterWorker | Role::Worker => (None, vec![(e.local()?, Kind::Worker)]),
            Role::Idle => (None, vec![]),
        };
        let all_workers = match e.num::<usize>("DMLC_NUM_ALL_WORKER")? {
            Some(n) => n,
            None => e.num("DMLC_NUM_WORKER")?.unwrap_or(1),
        };
        let interval = match e.get("PSNODE_INTERVAL") {
            None => Duration::from_millis(200),
            Some(v) => parse_duration(v)
                .with_context(|| format!("PSNODE_INTERVAL={v:?}: use e.g. 200 or 200ms"))?,
        };
        let iters_per_epoch: u64 = e.num("PSNODE_ITERS_PER_EPOCH")?.unwrap_or(10);
        if iters_per_epoch == 0 {
            bail!("PSNODE_ITERS_PER_EPOCH must be at least 1");
        }
        Ok(Config {
            role,
            registrations,
            serves,
            node_host: e.get("DMLC_NODE_HOST").map(str::to_string),
            interface: e.get("DMLC_INTERFACE").unwrap_or("eth0").to_string(),
            port: e.num("PORT")?,
            all_workers,
            data_slice: data_slice(args)?,
            interval,
            iterations: e.num("PSNODE_ITERATIONS")?.unwrap_or(20),
            iters_per_epoch,
            crash_after: e.num("PSNODE_CRASH_AFTER")?,
            hang_after: e.num("PSNODE_HANG_AFTER")?,
            exit_code: e.num("PSNODE_EXIT_CODE")?.unwrap_or(0),
            finalize_exit: e.num("PSNODE_FINALIZE_EXIT")?.unwrap_or(0),
            http_heartbeat: e.get("PSNODE_HTTP_HEARTBEAT") == Some("1"),
            agent_url: e.get("GEOMX_AGENT_URL").map(str::to_string),
            heartbeat_token: e.get("GEOMX_HEARTBEAT_TOKEN").map(str::to_string),
            job: e.get("GEOMX_JOB").map(str::to_string),
            name: e
                .get("GEOMX_NODE")
                .or_else(|| e.get("HOSTNAME"))
                .unwrap_or("psnode")
                .to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &str) -> BTreeMap<String, String> {
        pairs
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const COMMON: &str = "PS_VERBOSE=1 DMLC_INTERFACE=eth0";

    #[test]
    fn seed_roles() {
        let cases = [
            (
                "DMLC_ROLE_GLOBAL=global_scheduler DMLC_PS_GLOBAL_ROOT_URI=127.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2",
                Role::GlobalScheduler,
            ),
            (
                "DMLC_ROLE_GLOBAL=global_server DMLC_PS_GLOBAL_ROOT_URI=127.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 DMLC_ENABLE_CENTRAL_WORKER=0 DMLC_NUM_ALL_WORKER=4",
                Role::GlobalServer,
            ),
            (
                "DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1",
                Role::Scheduler,
            ),
            (
                "DMLC_ROLE=worker DMLC_ROLE_MASTER_WORKER=1 DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 DMLC_NUM_ALL_WORKER=4",
                Role::MasterWorker,
            ),
            (
                "DMLC_PS_GLOBAL_ROOT_URI=127.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2",
                Role::PartyServer,
            ),
            (
                "DMLC_ROLE=worker DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4",
                Role::Worker,
            ),
            (
                "DMLC_ROLE=server DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9000 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=2",
                Role::Server,
            ),
            ("", Role::Idle),
        ];
        for (vars, role) in cases {
            let c = Config::from_env(&env(&format!("{COMMON} {vars}")), &[])
                .unwrap_or_else(|e| panic!("{vars}: {e:#}"));
            assert_eq!(c.role, role, "{vars}");
        }
    }

    #[test]
    fn registrations_follow_geomx() {
        let gs = Config::from_env(
            &env("DMLC_ROLE_GLOBAL=global_server DMLC_PS_GLOBAL_ROOT_URI=10.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=10.0.0.2 DMLC_PS_ROOT_PORT=9093 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1"),
            &[],
        )
        .expect("global server");
        let regs: Vec<(String, Kind)> = gs
            .registrations
            .iter()
            .map(|(s, k)| (s.addr(), *k))
            .collect();
        assert_eq!(
            regs,
            vec![
                ("10.0.0.1:9092".to_string(), Kind::Server),
                ("10.0.0.2:9093".to_string(), Kind::Server)
            ]
        );
        let ps = Config::from_env(
            &env("DMLC_PS_GLOBAL_ROOT_URI=10.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=10.0.0.3 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2"),
            &[],
        )
        .expect("party server");
        let regs: Vec<(Layer, Kind)> = ps
            .registrations
            .iter()
            .map(|(s, k)| (s.layer, *k))
            .collect();
        assert_eq!(
            regs,
            vec![(Layer::Local, Kind::Server), (Layer::Global, Kind::Worker)]
        );
        let sched = Config::from_env(
            &env("DMLC_ROLE_GLOBAL=global_scheduler DMLC_PS_GLOBAL_ROOT_URI=10.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=2 DMLC_NUM_GLOBAL_WORKER=3"),
            &[],
        )
        .expect("global scheduler");
        let s = sched.serves.expect("serves");
        assert_eq!(
            (s.servers, s.workers, s.addr().as_str()),
            (2, 3, "10.0.0.1:9092")
        );
    }

    #[test]
    fn ps_lite_checks() {
        // a party server with DMLC_NUM_SERVER != 1 aborts like GeoMX
        let e = Config::from_env(
            &env(
                "DMLC_PS_GLOBAL_ROOT_URI=10.0.0.1 DMLC_PS_GLOBAL_ROOT_PORT=9092 DMLC_NUM_GLOBAL_SERVER=1 DMLC_NUM_GLOBAL_WORKER=2 DMLC_ROLE=server DMLC_PS_ROOT_URI=10.0.0.3 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=2 DMLC_NUM_WORKER=2",
            ),
            &[],
        );
        assert!(format!("{:#}", e.expect_err("error")).contains("load balance"));
        let e = Config::from_env(&env("DMLC_ROLE=scheduler DMLC_PS_ROOT_PORT=9093"), &[]);
        assert!(format!("{:#}", e.expect_err("error")).contains("DMLC_PS_ROOT_URI"));
        assert!(Config::from_env(&env("DMLC_ROLE=chef"), &[]).is_err());
    }

    #[test]
    fn psnode_switches_and_args() {
        let args: Vec<String> = [
            "/root/GeoMX/examples/cnn.py",
            "--data-slice-idx",
            "3",
            "--cpu",
        ]
        .map(String::from)
        .to_vec();
        let c = Config::from_env(
            &env("DMLC_ROLE=worker DMLC_PS_ROOT_URI=10.0.0.3 DMLC_PS_ROOT_PORT=9094 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2 DMLC_NUM_ALL_WORKER=4 PSNODE_INTERVAL=50ms PSNODE_ITERATIONS=7 PSNODE_CRASH_AFTER=2 PSNODE_EXIT_CODE=5 PSNODE_HTTP_HEARTBEAT=1 GEOMX_AGENT_URL=http://172.17.0.1:7948 GEOMX_HEARTBEAT_TOKEN=ab12 GEOMX_NODE=a-worker-1 DMLC_NODE_HOST=172.17.0.5"),
            &args,
        )
        .expect("worker");
        assert_eq!(c.data_slice, Some(3));
        assert_eq!(c.interval, Duration::from_millis(50));
        assert_eq!(c.iterations, 7);
        assert_eq!(c.crash_after, Some(2));
        assert_eq!(c.exit_code, 5);
        assert!(c.http_heartbeat);
        assert_eq!(c.heartbeat_token.as_deref(), Some("ab12"));
        assert_eq!(c.all_workers, 4);
        assert_eq!(c.name, "a-worker-1");
        assert_eq!(c.node_host.as_deref(), Some("172.17.0.5"));
        let d = Config::from_env(&env("DMLC_ROLE=worker DMLC_PS_ROOT_URI=x DMLC_PS_ROOT_PORT=1 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=2"), &[])
            .expect("defaults");
        assert_eq!(
            (d.iterations, d.interval, d.exit_code, d.all_workers),
            (20, Duration::from_millis(200), 0, 2)
        );
        assert_eq!(d.interface, "eth0");
        assert!(data_slice(&["--data-slice-idx=9".to_string()]).expect("eq form") == Some(9));
        assert!(data_slice(&["--data-slice-idx".to_string()]).is_err());
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("x"), None);
    }
}
