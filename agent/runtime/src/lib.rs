//! geomx-runtime: the role containers of one host, through Docker (bollard 0.21).
//!
//! The agent daemon converts the controller's desired state into [`ContainerSpec`]s and
//! calls [`Runtime::apply`]; it reports [`Runtime::snapshot`] (and reacts to
//! [`Runtime::subscribe`]) as `NodeStatus`es, serves [`Runtime::logs`] to the controller and
//! [`Runtime::images`] in its heartbeats, and runs the [`heartbeat`] endpoint on its docker0
//! gateway with the runtime as sink.
//!
//! - A docker0 node gets a network sandbox `geomx-net.<job>.<node>` (a small container
//!   holding the node's network namespace) as soon as it is desired: its address is in the
//!   node's status before anything runs, so the controller can give a scheduler its own
//!   address (ps-lite binds exactly `DMLC_PS_ROOT_URI`) and the others the schedulers'.
//!   Once the spec says `start`, the role container `geomx.<job>.<node>` is created in the
//!   sandbox's network. Host-network nodes (network "pseudo") have no sandbox.
//! - Containers are labelled `io.geomx.*` (see [`spec`]), including `io.geomx.kind`
//!   (`sandbox`/`role`) and `io.geomx.spec`, a hash of everything that shapes the container:
//!   a container whose hash differs from the desired spec's is replaced.
//! - A new runtime (agent restart) adopts the containers it created ([`ownership`]: a
//!   creation record by container id, which no image can inherit; labelled containers
//!   it did not create are left alone), running or ended, and rebuilds their progress
//!   from their output; applying the same desired state again then changes nothing.
//! - Ended containers stay (with exit code and log tail) until the desired state drops
//!   them; nothing is ever restarted by the runtime (geomx restarts whole jobs). With a
//!   [`LogArchive`] configured, a role container's output is kept on disk when it is
//!   removed, and [`Runtime::logs_of`] serves it for ended jobs and earlier generations.
//! - A missing image is pulled when the spec's `image_pull` allows it ([`pull`]: one pull
//!   per reference, a per-host concurrency limit, layer progress, retries of transient
//!   errors, credentials from a Docker `config.json` file, see [`credentials`]); the node
//!   waits Pending meanwhile and is created as soon as the pull is done.
//! - Progress comes from the containers' output ([`progress`]) and from the nodes' own
//!   HTTP heartbeats ([`heartbeat`]), each role container authenticated by its own token
//!   ([`auth`]) and, on docker0, its address.
//! - Sandboxes run the tiny static [`pause`] program from the image `geomx/pause:<version>`
//!   when the daemon imported it ([`pause::ensure_image`]), else a shell loop in the job's
//!   own image.
//! - Every role container gets `PYTHONUNBUFFERED=1` unless its spec sets the variable (see
//!   [`ContainerSpec::full_env`]): Python buffers a pipe's output, which would hide progress
//!   lines from the output follower and make a healthy node look stalled.
//!
//! ```no_run
//! # async fn demo() -> Result<(), geomx_runtime::RuntimeError> {
//! use geomx_runtime::{ContainerSpec, Runtime, RuntimeConfig};
//! let rt = Runtime::connect_unix(
//!     std::path::Path::new("/var/run/docker.sock"),
//!     RuntimeConfig { agent_url: "http://172.17.34.1:7948".into(), ..Default::default() },
//! )
//! .await?;
//! let report = rt
//!     .apply(vec![ContainerSpec {
//!         job: "job1".into(),
//!         node: "a-scheduler".into(),
//!         role: "scheduler".into(),
//!         party: "a".into(),
//!         image: "geomx-test/psnode:latest".into(),
//!         command: vec!["python".into(), "-c".into(), "import mxnet".into()],
//!         start: true,
//!         sandbox: true,
//!         ..Default::default()
//!     }])
//!     .await?;
//! assert!(report.errors().next().is_none());
//! let mut updates = rt.subscribe();
//! updates.changed().await.ok();
//! println!("{:?}", updates.borrow().node("job1", "a-scheduler"));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod archive;
pub mod auth;
pub mod counters;
pub mod credentials;
pub mod engine;
mod error;
pub mod heartbeat;
mod kept;
mod lines;
pub mod ownership;
pub mod pause;
pub mod progress;
pub mod pull;
pub mod reconcile;
pub mod rendezvous;
mod runtime;
pub mod spec;
pub mod status;

pub use archive::LogArchive;
pub use auth::{ENV_HEARTBEAT_TOKEN, HEARTBEAT_KEY_FILE, HeartbeatKey};
pub use counters::{RuntimeCounters, RuntimeCounts};
pub use engine::{BollardEngine, Engine, HostCapacity, ImageDetails, PullEvent};
pub use error::{Result, RuntimeError};
pub use heartbeat::{
    DEFAULT_HEARTBEAT_PORT, HeartbeatCounters, HeartbeatError, HeartbeatReport, HeartbeatServer,
    HeartbeatSink, Recorded, Refusal, agent_url,
};
pub use ownership::{CreationRecord, RECORD_FILE};
pub use progress::{Progress, ProgressParser, ProgressTracker};
pub use pull::{PullCause, PullConfig, PullManager, PullState, PullStatus, Resolved};
pub use reconcile::{Action, ContainerKey, RemoveReason};
pub use rendezvous::{Registration, Rendezvous};
pub use runtime::{ApplyReport, DOCKER_LOSS_FILE, OOM_KILLED, Outcome, Runtime, RuntimeConfig};
pub use spec::{
    ContainerKind, ContainerSpec, DEFAULT_PIDS_LIMIT, ImagePull, Mount, MountKind, NodeKey,
    Resources, SandboxConfig, container_name, sandbox_name,
};
pub use status::{LogChunk, NodeState, NodeStatus, Snapshot};
/// The cancellation token [`HeartbeatServer::serve`] stops on (re-exported from tokio-util).
pub use tokio_util::sync::CancellationToken;

#[cfg(any(test, feature = "fake"))]
pub mod fake;
