//! Structured input for the `job_compile` fuzz target: bytes → a [`JobSpec`] built in code.
//!
//! A small reader in the manner of `arbitrary::Unstructured` (each choice takes a byte; past
//! the end every choice is 0), written out here rather than derived with `arbitrary` so that
//! `controller/job/tests/fuzz_regressions.rs` can replay the same bytes on stable without
//! new dependencies. Values are drawn from small pools around every limit and rule of the
//! validator (ports around 1024/7946-7948/65535, counts around 0/1/64/1024, reserved names,
//! computed variables, `{slice}`, `{{`, NUL, regexes with and without the needed groups),
//! plus absurd extremes (`i64::MIN`, `i64::MAX`) that only `compile` of an invalid job sees.

use std::collections::BTreeMap;

use geomx_job::{
    CentralSpec, CommandSpec, Cpus, EnvSpec, JobSpec, Mode, MountSpec, MountType, Network,
    PartySpec, PolicySpec, ProgressSpec, ResourceLimits, ResourcesSpec, RestartPolicy,
};

/// Reads choices from fuzz bytes; 0 once they run out.
pub struct Choices<'a> {
    data: &'a [u8],
}

impl<'a> Choices<'a> {
    /// Choices drawn from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Choices { data }
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// 0..n (n ≥ 1).
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }

    fn pick<T: Clone>(&mut self, pool: &[T]) -> T {
        pool[self.below(pool.len())].clone()
    }

    fn string(&mut self, pool: &[&str]) -> String {
        self.pick(pool).to_string()
    }

    fn count(&mut self) -> i64 {
        let b = self.byte();
        if b >= 240 {
            BIG_COUNTS[usize::from(b) % BIG_COUNTS.len()]
        } else {
            COUNTS[usize::from(b) % COUNTS.len()]
        }
    }
}

const JOB_NAMES: [&str; 6] = [
    "j",
    "hips-mnist",
    "",
    "Bad_Name",
    "a-",
    "x23456789012345678901234567890123456789012",
];
const IMAGES: [&str; 5] = ["img", "geomx/psnode:test", "", "with space", "tab\there"];
const INTERFACES: [&str; 5] = ["eth0", "", "lo", "sixteen-chars-00", "eth 0"];
const HOSTS: [&str; 8] = ["a", "b", "c", "d", "", "UP", "-a", "h0"];
const PARTY_NAMES: [&str; 8] = ["a", "b", "p-1", "central", "global", "", "A", "a"];
const PORTS: [i64; 16] = [
    9092,
    9093,
    9094,
    9095,
    10_000,
    10_001,
    65_535,
    1024,
    1023,
    0,
    -1,
    7946,
    7948,
    65_536,
    i64::MAX,
    i64::MIN,
];
/// Counts: mostly small; one choice in 16 is a limit or beyond (a 1024-worker job takes a
/// while to compile and check, so these are kept rare to keep the target fast).
const COUNTS: [i64; 8] = [1, 2, 3, 0, 1, 2, -1, 4];
const BIG_COUNTS: [i64; 6] = [64, 65, 1024, 1025, i64::MAX, i64::MIN];
const SMALL: [i64; 8] = [0, 1, 2, 3, -1, 16, 17, i64::MIN];
const ARGS: [&str; 10] = [
    "python",
    "train.py",
    "{slice}",
    "--data-slice-idx",
    "--data-slice-idx={slice}",
    "",
    "a\0b",
    "-x",
    "{{slice}}",
    "--cpu",
];
const ENV_NAMES: [&str; 10] = [
    "A",
    "MXNET_KVSTORE_USE_HFA",
    "DMLC_ROLE",
    "DMLC_NODE_HOST",
    "GEOMX_JOB",
    "1BAD",
    "FOO_URI",
    "PS_VERBOSE",
    "DMLC_INTERFACE",
    "GLOBAL_X",
];
const ENV_VALUES: [&str; 6] = ["1", "", "{{a-scheduler.ip}}", "nul\0", "}}", "127.0.0.1"];
const TIMEOUTS: [&str; 7] = ["10m", "10s", "9s", "7days", "8days", "soon", ""];
const REGEXES: [&str; 7] = [
    geomx_job::DEFAULT_PROGRESS_REGEX,
    r"step (?P<step>\d+) loss (?P<loss>[0-9.]+)",
    "no groups",
    "(",
    r"(?P<iteration>\d+)(?P<bogus>x)",
    r"(?P<iteration>\d+){100}",
    "",
];

const MOUNT_SOURCES: [&str; 10] = [
    "/srv/geomx/{party}",
    "geomx-{job}-output",
    "/data",
    "/",
    "/etc",
    "/{host}",
    "/var/run/docker.sock",
    "rel/path",
    "/srv/{slice}",
    "vol.{node}",
];
const MOUNT_TARGETS: [&str; 7] = [
    "/root/data",
    "/root/output",
    "/proc/x",
    "data",
    "/root/data/",
    "/x/{node}",
    "/",
];
const MOUNT_ROLES: [&str; 7] = [
    "all",
    "workers",
    "master",
    "servers",
    "schedulers",
    "worker",
    "",
];
const SIZES: [&str; 7] = ["8g", "512m", "1k", "2t", "lots", "", "6m"];
const CPUS: [f64; 6] = [2.5, 1.0, 0.0, -1.0, 2000.0, 0.01];

fn mount(c: &mut Choices<'_>) -> MountSpec {
    let roles = c.bool().then(|| {
        let n = c.below(3);
        (0..n).map(|_| c.string(&MOUNT_ROLES)).collect()
    });
    MountSpec {
        kind: if c.bool() {
            MountType::Volume
        } else {
            MountType::Bind
        },
        source: c.string(&MOUNT_SOURCES),
        target: c.string(&MOUNT_TARGETS),
        roles,
        readonly: c.bool(),
        driver: c.bool().then(|| c.string(&["local", "", "nfs x"])),
        options: if c.bool() {
            BTreeMap::from([("type".to_string(), "nfs".to_string())])
        } else {
            BTreeMap::new()
        },
    }
}

fn limits(c: &mut Choices<'_>) -> ResourceLimits {
    ResourceLimits {
        memory: c.bool().then(|| c.string(&SIZES)),
        cpus: c.bool().then(|| Cpus(c.pick(&CPUS))),
        pids: c.bool().then(|| c.pick(&[16, 15, 4096, 0, -1, i64::MAX])),
        shm_size: c.bool().then(|| c.string(&SIZES)),
    }
}

fn argv(c: &mut Choices<'_>) -> Option<Vec<String>> {
    if !c.bool() {
        return None;
    }
    let n = c.below(5);
    Some((0..n).map(|_| c.string(&ARGS)).collect())
}

fn vars(c: &mut Choices<'_>) -> BTreeMap<String, String> {
    let n = c.below(4);
    (0..n)
        .map(|_| (c.string(&ENV_NAMES), c.string(&ENV_VALUES)))
        .collect()
}

fn party(c: &mut Choices<'_>) -> PartySpec {
    let hosts = c.below(4);
    PartySpec {
        name: c.string(&PARTY_NAMES),
        hosts: (0..hosts).map(|_| c.string(&HOSTS)).collect(),
        workers: c.count(),
        scheduler_port: c.bool().then(|| c.pick(&PORTS)),
        servers: if c.bool() { 1 } else { c.count() },
    }
}

/// The job these bytes describe.
pub fn job_spec(data: &[u8]) -> JobSpec {
    let mut c = Choices::new(data);
    let mode = if c.bool() { Mode::Ps } else { Mode::Hips };
    let network = if c.bool() {
        Network::Pseudo
    } else {
        Network::Routed
    };
    let name = c.string(&JOB_NAMES);
    let image = c.string(&IMAGES);
    let interface = c.bool().then(|| c.string(&INTERFACES));
    let verbose = c.bool().then(|| c.pick(&SMALL));
    let command = CommandSpec {
        scheduler: argv(&mut c),
        server: argv(&mut c),
        worker: argv(&mut c),
        master: argv(&mut c),
    };
    let env = EnvSpec {
        all: vars(&mut c),
        schedulers: vars(&mut c),
        servers: vars(&mut c),
        master: vars(&mut c),
        workers: vars(&mut c),
    };
    // Central present by default in hips, absent by default in ps.
    let central = (c.bool() != (mode == Mode::Hips)).then(|| CentralSpec {
        host: c.string(&HOSTS),
        global_scheduler_port: c.pick(&PORTS),
        scheduler_port: c.pick(&PORTS),
        global_servers: if c.bool() { 1 } else { c.count() },
        workers: if c.bool() { 0 } else { c.count() },
    });
    // Mostly 1..=3 parties, sometimes none or more than the limit allows.
    let parties = match c.below(8) {
        0 => 0,
        7 => 65 + c.below(2),
        n => n.min(3),
    };
    let template = party(&mut c);
    let parties: Vec<PartySpec> = (0..parties)
        .map(|i| {
            if i >= 4 {
                // Beyond a few, repeat the template under distinct names, one worker each
                // (keeps a 65-party job small enough to fuzz quickly).
                PartySpec {
                    name: format!("p{i}"),
                    workers: 1,
                    ..template.clone()
                }
            } else if i == 0 {
                template.clone()
            } else {
                party(&mut c)
            }
        })
        .collect();
    let restart = if c.bool() {
        RestartPolicy::OnFailure
    } else {
        RestartPolicy::Never
    };
    let policy = PolicySpec {
        restart,
        max_restarts: c.bool().then(|| c.pick(&[0, 1, 3, 100, 101, -1, i64::MAX])),
        stall_timeout: c.bool().then(|| c.string(&TIMEOUTS)),
        gpus_per_worker: c.pick(&SMALL),
        // not drawn: the kept inputs keep meaning the jobs they meant
        teardown_grace: None,
        restart_delay: None,
        active_deadline: None,
        retry_exit_codes: None,
        rendezvous_timeout: None,
        pull_timeout: None,
    };
    let progress = c.bool().then(|| ProgressSpec {
        regex: c.string(&REGEXES),
        finished: None,
        iterations: None,
    });
    // Drawn last: the inputs kept from before mounts existed read as jobs without any.
    let mounts = (0..c.below(4)).map(|_| mount(&mut c)).collect();
    let resources = if c.bool() {
        ResourcesSpec {
            all: limits(&mut c),
            schedulers: limits(&mut c),
            servers: limits(&mut c),
            master: limits(&mut c),
            workers: limits(&mut c),
        }
    } else {
        ResourcesSpec::default()
    };
    JobSpec {
        name,
        mode,
        image,
        // not drawn: the kept inputs keep meaning the jobs they meant
        image_pull: geomx_job::ImagePull::IfNotPresent,
        network,
        interface,
        verbose,
        command,
        env,
        central,
        parties,
        policy,
        progress,
        mounts,
        resources,
    }
}
