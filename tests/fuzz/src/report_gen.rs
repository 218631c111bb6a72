//! Structured input for the `report_convert` fuzz target: bytes → what a host's report is
//! made of (the runtime's node statuses, Docker's images, the pulls, the network status)
//! and a budget to fit it under.
//!
//! A small reader in the manner of `arbitrary::Unstructured` (each choice takes a byte; past
//! the end every choice is 0), written out as in `job_gen.rs` so that
//! `agent/daemon/tests/fuzz_regressions.rs` replays the same bytes on stable without new
//! dependencies. Strings come from a pool around every cut the conversion and the fitting
//! make (multi-byte characters across 256, 1024, 2048 and 4096 bytes, control characters,
//! NUL), repeated to reach them from short inputs; numbers from pools of extremes (NaN,
//! infinities, -0, `i64::MIN`, `u64::MAX`); budgets from 0 to the agent's own.

use std::collections::BTreeMap;

use geomx_runtime::rendezvous::{Registration, Rendezvous};
use geomx_runtime::{
    HostCapacity, ImageDetails, NodeState, NodeStatus, Progress, PullState, PullStatus,
};

/// Reads choices from fuzz bytes; 0 once they run out.
pub struct Choices<'a> {
    data: &'a [u8],
    /// Bytes of repeated strings made so far (see [`MAX_REPEATED`]).
    repeated: usize,
}

impl<'a> Choices<'a> {
    /// Choices drawn from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Choices { data, repeated: 0 }
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

    /// A string from the pool, repeated a number of times from [`REPEATS`] (once when the
    /// input's repeated strings reached [`MAX_REPEATED`]).
    fn string(&mut self) -> String {
        let s = self.pick(&STRINGS);
        let mut n = self.pick(&REPEATS);
        if n > 1 {
            if self.repeated + s.len() * n > MAX_REPEATED {
                n = 1;
            } else {
                self.repeated += s.len() * n;
            }
        }
        s.repeat(n)
    }

    /// A short name (job, node, metric, role).
    fn name(&mut self) -> String {
        let s = self.pick(&NAMES);
        if self.below(8) == 0 {
            // past the runtime's 64-byte metric names
            s.repeat(self.pick(&[9, 33, 70]))
        } else {
            s.to_owned()
        }
    }

    fn f64(&mut self) -> f64 {
        self.pick(&FLOATS)
    }

    fn i64(&mut self) -> i64 {
        self.pick(&INTS)
    }

    fn u64(&mut self) -> u64 {
        self.pick(&UINTS)
    }

    fn u32(&mut self) -> u32 {
        self.pick(&[0, 1, 2, 255, 256, 65_535, u32::MAX])
    }

    fn list<T>(&mut self, max: usize, mut item: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let n = self.pick(&LENGTHS).min(max);
        (0..n).map(|_| item(self)).collect()
    }
}

const STRINGS: [&str; 16] = [
    "",
    "a",
    "job1",
    "172.17.34.2",
    "registry:5000/geomx/psnode:latest",
    "é",
    "\u{10FFFF}",
    "x\u{1F600}",
    "tab\there",
    "line\nbreak",
    "\0",
    "\u{7f}\u{1b}[31m",
    "Traceback (most recent call last): ",
    "[Time 1.0][Epoch 0][Iteration 17] Test Acc nan",
    "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "ab",
];
/// How often a string is repeated: across every cut (256, 1024, 2048, 4096 bytes) for the
/// pool's 1-, 2- and 4-byte characters.
const REPEATS: [usize; 10] = [1, 1, 1, 2, 3, 129, 257, 513, 1025, 2049];
/// Repeated strings stop at this many bytes per input: the reports stay under about a MiB
/// (every budget but the agent's own is far smaller), and an execution fast.
const MAX_REPEATED: usize = 512 << 10;
const NAMES: [&str; 12] = [
    "accuracy",
    "acc",
    "loss",
    "time",
    "samples_per_sec",
    "",
    "a",
    "é",
    "w0",
    "lr",
    "m-1",
    "validation-accuracy",
];
const LENGTHS: [usize; 10] = [0, 1, 2, 3, 5, 8, 20, 33, 51, 70];
const FLOATS: [f64; 12] = [
    0.0,
    -0.0,
    0.5,
    1.0,
    -1.0,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::MAX,
    f64::MIN_POSITIVE,
    1e-310,
    0.931_2,
];
const INTS: [i64; 8] = [0, 1, -1, 1_700_000_000_000, i64::MIN, i64::MAX, 99, -99];
const UINTS: [u64; 7] = [0, 1, 17, 1 << 30, 1 << 40, u64::MAX - 1, u64::MAX];
/// Budgets: from none at all to the agent's own (3 MiB), around the sizes small inputs
/// reach.
pub const BUDGETS: [usize; 12] = [
    0,
    1,
    64,
    200,
    500,
    1_000,
    2_000,
    5_000,
    20_000,
    100_000,
    1 << 20,
    3 << 20,
];
/// At most this many nodes (each of up to 55 lines of up to 8 KiB before the cuts).
const MAX_NODES: usize = 12;

/// What one host's report is made of, as the agent has it.
#[derive(Clone, Debug, Default)]
pub struct ReportInput {
    /// The runtime's nodes; `None`: the runtime has not adopted the host's containers.
    pub nodes: Option<Vec<NodeStatus>>,
    /// Docker's images; `None`: not listed yet.
    pub images: Option<Vec<ImageDetails>>,
    /// The pulls.
    pub pulls: Vec<PullStatus>,
    /// The network's state (converged, routes, error).
    pub network: (bool, u32, String),
    /// The agent's version.
    pub agent_version: String,
    /// The listening ports.
    pub listening_ports: Vec<u32>,
    /// Memory and CPUs.
    pub capacity: HostCapacity,
    /// The revision applied.
    pub applied_revision: u64,
    /// The budget to fit the report under.
    pub budget: usize,
}

const STATES: [NodeState; 6] = [
    NodeState::Pending,
    NodeState::Created,
    NodeState::Running,
    NodeState::Exited,
    NodeState::Failed,
    NodeState::Missing,
];
const PULL_STATES: [PullState; 4] = [
    PullState::Pulling,
    PullState::Retrying,
    PullState::Done,
    PullState::Failed,
];

fn progress(c: &mut Choices<'_>) -> Progress {
    Progress {
        epoch: c.u64(),
        iteration: c.u64(),
        accuracy: c.bool().then(|| c.f64()),
        observed_at_ms: c.i64(),
        metrics: c
            .list(40, |c| (c.name(), c.f64()))
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        finished: c.bool(),
    }
}

fn rendezvous(c: &mut Choices<'_>) -> Rendezvous {
    Rendezvous {
        registered: c.list(20, |c| Registration {
            role: c.name(),
            ip: c.string(),
            port: c.u32(),
        }),
        complete: c.bool(),
        count: c.u32(),
        expected: c.u32(),
        connected: c.list(20, Choices::string),
    }
}

fn node(c: &mut Choices<'_>, i: usize) -> NodeStatus {
    NodeStatus {
        // distinct identities, as the runtime has them
        job: format!("{}-{}", c.name(), i % 3),
        node: format!("{}-{i}", c.name()),
        role: c.name(),
        party: c.name(),
        generation: c.u32(),
        state: c.pick(&STATES),
        container_id: c.string(),
        ip: c.string(),
        exit_code: c
            .bool()
            .then(|| c.pick(&[0, 1, 137, 139, -1, i32::MIN, i32::MAX])),
        restarts: c.u32(),
        progress: c.bool().then(|| progress(c)),
        log_tail: c.list(55, Choices::string),
        error: c.string(),
        started_at_ms: c.i64(),
        finished_at_ms: c.i64(),
        rendezvous: c.bool().then(|| rendezvous(c)),
    }
}

fn image(c: &mut Choices<'_>) -> ImageDetails {
    ImageDetails {
        id: c.string(),
        repo_tags: c.list(8, Choices::string),
        repo_digests: c.list(8, Choices::string),
        size_bytes: c.u64(),
    }
}

fn pull(c: &mut Choices<'_>) -> PullStatus {
    PullStatus {
        image: c.string(),
        registry: c.string(),
        state: c.pick(&PULL_STATES),
        bytes_done: c.u64(),
        bytes_total: c.u64(),
        layers_done: c.u32(),
        layers_total: c.u32(),
        attempt: c.u32(),
        error: c.string(),
        cause: None,
        started_at_ms: c.i64(),
        updated_at_ms: c.i64(),
    }
}

/// The report's parts and budget drawn from `data`.
pub fn report_input(data: &[u8]) -> ReportInput {
    let mut c = Choices::new(data);
    let budget = c.pick(&BUDGETS);
    let nodes = c.bool().then(|| {
        let n = c.pick(&LENGTHS).min(MAX_NODES);
        (0..n).map(|i| node(&mut c, i)).collect()
    });
    let images = c.bool().then(|| c.list(12, image));
    ReportInput {
        nodes,
        images,
        pulls: c.list(8, pull),
        network: (c.bool(), c.u32(), c.string()),
        agent_version: c.string(),
        listening_ports: c.list(20, Choices::u32),
        capacity: HostCapacity {
            memory_bytes: c.u64(),
            cpus: c.u32(),
        },
        applied_revision: c.u64(),
        budget,
    }
}
