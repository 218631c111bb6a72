//! Docker access behind a trait ([`Engine`]), so that the runtime's decisions can be tested
//! with a fake; [`BollardEngine`] is the real one (bollard 0.21).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, ContainerSummaryStateEnum};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions,
    ListContainersOptions, ListImagesOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::credentials::Credentials;
use crate::error::{Result, RuntimeError};
use crate::spec::LABEL_MANAGED;
use crate::status::parse_rfc3339_ms;

/// A container's state as Docker names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// Created, never started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Being restarted by Docker.
    Restarting,
    /// Being removed.
    Removing,
    /// Ended.
    Exited,
    /// Ended and could not be cleaned up.
    Dead,
    /// Anything else.
    Unknown,
}

impl EngineState {
    fn from_name(s: &str) -> EngineState {
        match s {
            "created" => EngineState::Created,
            "running" => EngineState::Running,
            "paused" => EngineState::Paused,
            "restarting" => EngineState::Restarting,
            "removing" => EngineState::Removing,
            "exited" => EngineState::Exited,
            "dead" => EngineState::Dead,
            _ => EngineState::Unknown,
        }
    }
}

/// A labelled container as listed (cheap: no inspect).
#[derive(Clone, Debug, PartialEq)]
pub struct ActualContainer {
    /// Container id.
    pub id: String,
    /// Name without the leading slash.
    pub name: String,
    /// All labels.
    pub labels: HashMap<String, String>,
    /// State.
    pub state: EngineState,
}

/// What inspecting one container tells.
#[derive(Clone, Debug, PartialEq)]
pub struct Inspection {
    /// Container id.
    pub id: String,
    /// Name without the leading slash.
    pub name: String,
    /// All labels.
    pub labels: HashMap<String, String>,
    /// State.
    pub state: EngineState,
    /// Exit code (meaningful once ended; Docker also sets it when a start fails).
    pub exit_code: Option<i64>,
    /// Docker's error (e.g. why a start failed), empty if none.
    pub error: String,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// IPv4 address on its bridge network, if it has one.
    pub ip: Option<String>,
    /// Runs with host networking.
    pub host_network: bool,
    /// Start time, Unix ms; 0 if never started.
    pub started_at_ms: i64,
    /// End time, Unix ms; 0 if not ended.
    pub finished_at_ms: i64,
    /// Docker's restart count.
    pub restart_count: u32,
    /// The host pid of its main process while it runs (0 otherwise).
    pub pid: u32,
}

/// How to read a container's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogRequest {
    /// Keep streaming until the container ends.
    pub follow: bool,
    /// Only the last N lines; `None` for all.
    pub tail: Option<u32>,
    /// Prefix every line with Docker's RFC 3339 timestamp and a space.
    pub timestamps: bool,
    /// Only the output from this Unix time on (whole seconds, as Docker's API takes it);
    /// `None` for all.
    pub since_s: Option<i64>,
}

/// One piece of output as Docker sends it (not necessarily whole lines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFrame {
    /// From standard error.
    pub stderr: bool,
    /// The bytes.
    pub data: Vec<u8>,
}

/// A container event of a geomx container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineEvent {
    /// Container id.
    pub id: String,
    /// Docker's action: create, start, die, oom, kill, stop, destroy, ...
    pub action: String,
}

/// What a host can give containers, as Docker sees it (`docker info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCapacity {
    /// Memory in bytes (`MemTotal`); 0 when unknown.
    pub memory_bytes: u64,
    /// CPUs (`NCPU`); 0 when unknown.
    pub cpus: u32,
}

/// One image as Docker lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageDetails {
    /// Docker's image id (`sha256:...` of its config).
    pub id: String,
    /// Its tags (`repo:tag`).
    pub repo_tags: Vec<String>,
    /// Its registry digests (`repo@sha256:...`).
    pub repo_digests: Vec<String>,
    /// Size on disk in bytes.
    pub size_bytes: u64,
}

impl ImageDetails {
    /// Every `repo:tag` and `repo@sha256:...` of `images`, sorted, once each.
    pub fn references(images: &[ImageDetails]) -> Vec<String> {
        let mut v: Vec<String> = images
            .iter()
            .flat_map(|i| i.repo_tags.iter().chain(&i.repo_digests).cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// One progress message of a pull (Docker's `{"id", "status", "progressDetail"}`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullEvent {
    /// The layer (or the tag, for "Pulling from ..."); empty for messages of the whole
    /// image ("Digest: ...", "Status: ...").
    pub id: String,
    /// "Pulling fs layer", "Waiting", "Downloading", "Verifying Checksum", "Download
    /// complete", "Extracting", "Pull complete", "Already exists", ...
    pub status: String,
    /// `progressDetail.current`.
    pub current: Option<u64>,
    /// `progressDetail.total`.
    pub total: Option<u64>,
}

/// The Docker operations the runtime needs. `Clone` (a handle): pulls run in tasks of
/// their own.
pub trait Engine: Clone + Send + Sync + 'static {
    /// Every container (running or not) labelled `io.geomx.managed=true`.
    fn list_managed(&self) -> impl Future<Output = Result<Vec<ActualContainer>>> + Send;
    /// Inspects a container by id or name; `None` when it does not exist.
    fn inspect(&self, id: &str) -> impl Future<Output = Result<Option<Inspection>>> + Send;
    /// Whether the image is present locally.
    fn image_present(&self, image: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Every image present locally, with its tags, digests, id and size.
    fn image_list(&self) -> impl Future<Output = Result<Vec<ImageDetails>>> + Send;
    /// The manifest digest (`sha256:...`) the registry serves now for `image` (by tag),
    /// without downloading anything (`GET /distribution/<image>/json`). Docker's answer
    /// about the registry is a [`RuntimeError::Registry`].
    fn resolve(
        &self,
        image: &str,
        credentials: Option<&Credentials>,
    ) -> impl Future<Output = Result<String>> + Send;
    /// Pulls `image` (`repo:tag` or `repo@sha256:...`): Docker's progress messages; an
    /// error (a [`RuntimeError::Registry`] with Docker's message) ends the stream.
    /// Dropping the stream cancels the pull.
    fn pull(
        &self,
        image: &str,
        credentials: Option<&Credentials>,
    ) -> BoxStream<'static, Result<PullEvent>>;
    /// Creates a container; returns its id.
    fn create(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> impl Future<Output = Result<String>> + Send;
    /// Starts a created container.
    fn start(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Stops a container (SIGTERM, SIGKILL after `timeout`); no error if already stopped or gone.
    fn stop(&self, id: &str, timeout: Duration) -> impl Future<Output = Result<()>> + Send;
    /// Removes a container (forcefully); no error if already gone.
    fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// The container's output.
    fn logs(&self, id: &str, req: LogRequest) -> BoxStream<'static, Result<LogFrame>>;
    /// Container events of geomx containers, from now on.
    fn events(&self) -> BoxStream<'static, Result<EngineEvent>>;
    /// Whether the daemon keeps containers running while it is down (`live-restore`); if
    /// not, a restart of the daemon stops every container.
    fn live_restore(&self) -> impl Future<Output = Result<bool>> + Send;
    /// An identity of the running daemon process, which changes when the daemon restarts
    /// (for a local socket: the peer's pid and start time); `None` when the engine cannot
    /// tell (a TCP daemon, another pid namespace).
    fn daemon_id(&self) -> impl Future<Output = Result<Option<String>>> + Send;
    /// The host's memory and CPUs; unknown (zeros) unless the engine can tell.
    fn capacity(&self) -> impl Future<Output = Result<HostCapacity>> + Send {
        async { Ok(HostCapacity::default()) }
    }
    /// The remote IPv4 addresses of the established TCP connections to local port `port`
    /// in the network namespace of host process `pid` (its `/proc/<pid>/net/tcp`).
    fn established_peers(&self, pid: u32, port: u16) -> Result<Vec<std::net::Ipv4Addr>> {
        let path = format!("/proc/{pid}/net/tcp");
        let text = std::fs::read_to_string(&path).map_err(|source| RuntimeError::Io {
            what: format!("reading {path}"),
            source,
        })?;
        Ok(crate::rendezvous::established_peers(&text, port))
    }
    /// Whether a bind mount's host path exists. Docker resolves bind sources on the
    /// filesystem of the host it runs on, which is this process's.
    fn path_exists(&self, path: &str) -> bool {
        Path::new(path).exists()
    }
    /// Where a host path really leads (symlinks resolved); `None` when that cannot be told.
    fn real_path(&self, path: &str) -> Option<String> {
        std::fs::canonicalize(path)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }
}

/// [`Engine`] over a real dockerd through bollard.
#[derive(Clone, Debug)]
pub struct BollardEngine {
    docker: Docker,
    /// The daemon's unix socket, when connected through one (for [`Engine::daemon_id`]).
    socket: Option<std::path::PathBuf>,
}

/// Timeout of single Docker API requests (not of streams), in seconds.
const REQUEST_TIMEOUT_S: u64 = 120;

impl BollardEngine {
    /// Wraps a connected client (call `negotiate_version` on it first).
    pub fn new(docker: Docker) -> BollardEngine {
        BollardEngine {
            docker,
            socket: None,
        }
    }

    /// Connects to the dockerd API socket at `path` and negotiates the API version
    /// (Debian's dockerd 20.10 speaks 1.41 at most).
    pub async fn connect_unix(path: &Path) -> Result<BollardEngine> {
        let p = path.to_string_lossy().into_owned();
        let docker = Docker::connect_with_unix(&p, REQUEST_TIMEOUT_S, bollard::API_DEFAULT_VERSION)
            .map_err(|e| RuntimeError::docker(format!("connect {p}"), e))?
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::docker(format!("negotiate API version at {p}"), e))?;
        Ok(BollardEngine {
            docker,
            socket: Some(path.to_path_buf()),
        })
    }

    /// Connects as the docker CLI would (`DOCKER_HOST` or the default socket) and
    /// negotiates the API version.
    pub async fn connect_local() -> Result<BollardEngine> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| RuntimeError::docker("connect", e))?
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::docker("negotiate API version", e))?;
        Ok(BollardEngine {
            docker,
            socket: None,
        })
    }

    /// The bollard client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }
}

fn is_status(e: &BollardError, code: u16) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// The `X-Registry-Auth` credentials of `c` (built at the call, never kept or logged).
fn docker_credentials(c: &Credentials) -> bollard::auth::DockerCredentials {
    bollard::auth::DockerCredentials {
        username: Some(c.username.clone()),
        password: Some(c.password.clone()),
        serveraddress: Some(c.server.clone()),
        ..Default::default()
    }
}

/// Docker's answer about a registry as a [`RuntimeError::Registry`] (its message as Docker
/// wrote it, the HTTP status in words when the message does not say); Docker itself not
/// answering stays a [`RuntimeError::Docker`] (transient).
fn registry_error(op: String, e: BollardError) -> RuntimeError {
    let message = match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match (status_code, crate::pull::classify(&message)) {
            (404, crate::pull::PullCause::Failed) => format!("not found: {message}"),
            (401 | 403, crate::pull::PullCause::Failed) => format!("unauthorized: {message}"),
            (500.., crate::pull::PullCause::Failed) => {
                format!("{message} (status code {status_code})")
            }
            _ => message,
        },
        BollardError::DockerStreamError { error } => error,
        other => return RuntimeError::docker(op, other),
    };
    RuntimeError::Registry { op, message }
}

fn managed_filter() -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), vec![format!("{LABEL_MANAGED}=true")])])
}

impl Engine for BollardEngine {
    async fn list_managed(&self) -> Result<Vec<ActualContainer>> {
        let opts = ListContainersOptions {
            all: true,
            filters: Some(managed_filter()),
            ..Default::default()
        };
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| RuntimeError::docker("list containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let name = c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string();
                let state = c
                    .state
                    .map(|s| match s {
                        ContainerSummaryStateEnum::EMPTY => EngineState::Unknown,
                        other => EngineState::from_name(other.as_ref()),
                    })
                    .unwrap_or(EngineState::Unknown);
                Some(ActualContainer {
                    id,
                    name,
                    labels: c.labels.unwrap_or_default(),
                    state,
                })
            })
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<Option<Inspection>> {
        let r = match self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(r) => r,
            Err(e) if is_status(&e, 404) => return Ok(None),
            Err(e) => return Err(RuntimeError::docker(format!("inspect {id}"), e)),
        };
        let st = r.state.unwrap_or_default();
        let state = st
            .status
            .map(|s| match s {
                ContainerStateStatusEnum::EMPTY => EngineState::Unknown,
                other => EngineState::from_name(other.as_ref()),
            })
            .unwrap_or(EngineState::Unknown);
        let host_network = r
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref())
            .is_some_and(|m| m == "host");
        let ip = r
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|nets| {
                let mut v: Vec<(String, String)> = nets
                    .into_iter()
                    .filter_map(|(name, ep)| ep.ip_address.map(|ip| (name, ip)))
                    .filter(|(_, ip)| !ip.is_empty())
                    .collect();
                // prefer the default bridge (docker0)
                v.sort_by_key(|(name, _)| name != "bridge");
                v.into_iter().next().map(|(_, ip)| ip)
            });
        Ok(Some(Inspection {
            id: r.id.unwrap_or_else(|| id.to_string()),
            name: r
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            labels: r.config.and_then(|c| c.labels).unwrap_or_default(),
            state,
            exit_code: st.exit_code,
            error: st.error.unwrap_or_default(),
            oom_killed: st.oom_killed.unwrap_or(false),
            pid: st.pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            ip,
            host_network,
            started_at_ms: st
                .started_at
                .as_deref()
                .and_then(parse_rfc3339_ms)
                .unwrap_or(0),
            finished_at_ms: st
                .finished_at
                .as_deref()
                .and_then(parse_rfc3339_ms)
                .unwrap_or(0),
            restart_count: r
                .restart_count
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(0),
        }))
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(RuntimeError::docker(format!("inspect image {image}"), e)),
        }
    }

    async fn image_list(&self) -> Result<Vec<ImageDetails>> {
        let list = self
            .docker
            .list_images(Some(ListImagesOptions::default()))
            .await
            .map_err(|e| RuntimeError::docker("list images", e))?;
        Ok(list
            .into_iter()
            .map(|i| ImageDetails {
                id: i.id,
                repo_tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                repo_digests: i
                    .repo_digests
                    .into_iter()
                    .filter(|d| d != "<none>@<none>")
                    .collect(),
                size_bytes: u64::try_from(i.size).unwrap_or(0),
            })
            .collect())
    }

    async fn resolve(&self, image: &str, credentials: Option<&Credentials>) -> Result<String> {
        let r = self
            .docker
            .inspect_registry_image(image, credentials.map(docker_credentials))
            .await
            .map_err(|e| registry_error(format!("resolve {image}"), e))?;
        r.descriptor
            .digest
            .filter(|d| !d.is_empty())
            .ok_or_else(|| RuntimeError::Registry {
                op: format!("resolve {image}"),
                message: "Docker's answer names no digest".into(),
            })
    }

    fn pull(
        &self,
        image: &str,
        credentials: Option<&Credentials>,
    ) -> BoxStream<'static, Result<PullEvent>> {
        let opts = CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        };
        let op = format!("pull {image}");
        self.docker
            .create_image(Some(opts), None, credentials.map(docker_credentials))
            .map(move |r| match r {
                Ok(info) => {
                    let detail = info.progress_detail.unwrap_or_default();
                    Ok(PullEvent {
                        id: info.id.unwrap_or_default(),
                        status: info.status.unwrap_or_default(),
                        current: detail.current.and_then(|c| u64::try_from(c).ok()),
                        total: detail.total.and_then(|t| u64::try_from(t).ok()),
                    })
                }
                Err(e) => Err(registry_error(op.clone(), e)),
            })
            .boxed()
    }

    async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String> {
        let image = body.image.clone().unwrap_or_default();
        let opts = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        match self.docker.create_container(Some(opts), body).await {
            Ok(r) => Ok(r.id),
            Err(e) if is_status(&e, 404) => Err(RuntimeError::ImageMissing { image }),
            Err(BollardError::DockerResponseServerError {
                status_code,
                message,
            }) if (400..500).contains(&status_code) => Err(RuntimeError::Refused {
                what: format!("creating {name}"),
                message,
            }),
            Err(e) => Err(RuntimeError::docker(format!("create {name}"), e)),
        }
    }

    async fn start(&self, id: &str) -> Result<()> {
        match self.docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code,
                message,
            }) if (400..500).contains(&status_code) || message.contains("OCI runtime") => {
                Err(RuntimeError::Refused {
                    what: format!("starting {id}"),
                    message,
                })
            }
            Err(e) => Err(RuntimeError::docker(format!("start {id}"), e)),
        }
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<()> {
        let opts = StopContainerOptions {
            t: Some(i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        match self.docker.stop_container(id, Some(opts)).await {
            // 304: already stopped; 404: gone
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 304) || is_status(&e, 404) => Ok(()),
            Err(e) => Err(RuntimeError::docker(format!("stop {id}"), e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let opts = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            // 404: gone; 409: removal already in progress
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
            Err(e) => Err(RuntimeError::docker(format!("remove {id}"), e)),
        }
    }

    fn logs(&self, id: &str, req: LogRequest) -> BoxStream<'static, Result<LogFrame>> {
        let opts = LogsOptions {
            follow: req.follow,
            stdout: true,
            stderr: true,
            timestamps: req.timestamps,
            tail: req
                .tail
                .map_or_else(|| "all".to_string(), |n| n.to_string()),
            // (0: from the start; a time past what the API takes reads everything, which
            // only costs reading)
            since: req.since_s.and_then(|s| i32::try_from(s).ok()).unwrap_or(0),
            ..Default::default()
        };
        let id_owned = id.to_string();
        self.docker
            .logs(id, Some(opts))
            .filter_map(move |r| {
                let out = match r {
                    Ok(bollard::container::LogOutput::StdErr { message }) => Some(Ok(LogFrame {
                        stderr: true,
                        data: message.to_vec(),
                    })),
                    Ok(
                        bollard::container::LogOutput::StdOut { message }
                        | bollard::container::LogOutput::Console { message },
                    ) => Some(Ok(LogFrame {
                        stderr: false,
                        data: message.to_vec(),
                    })),
                    Ok(bollard::container::LogOutput::StdIn { .. }) => None,
                    Err(e) if is_status(&e, 404) => Some(Err(RuntimeError::NoSuchNode {
                        job: String::new(),
                        node: id_owned.clone(),
                    })),
                    Err(e) => Some(Err(RuntimeError::docker(format!("logs {id_owned}"), e))),
                };
                futures::future::ready(out)
            })
            .boxed()
    }

    fn events(&self) -> BoxStream<'static, Result<EngineEvent>> {
        let mut filters = managed_filter();
        filters.insert("type".into(), vec!["container".into()]);
        let opts = EventsOptions {
            filters: Some(filters),
            ..Default::default()
        };
        self.docker
            .events(Some(opts))
            .filter_map(|r| {
                let out = match r {
                    Ok(ev) => {
                        let id = ev.actor.and_then(|a| a.id).unwrap_or_default();
                        let action = ev.action.unwrap_or_default();
                        // "exec_start: sh -c ..." and the like carry a suffix
                        let action = action.split(':').next().unwrap_or("").trim().to_string();
                        (!id.is_empty()).then_some(Ok(EngineEvent { id, action }))
                    }
                    Err(e) => Some(Err(RuntimeError::docker("events", e))),
                };
                futures::future::ready(out)
            })
            .boxed()
    }

    async fn live_restore(&self) -> Result<bool> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| RuntimeError::docker("info", e))?;
        Ok(info.live_restore_enabled.unwrap_or(false))
    }

    async fn capacity(&self) -> Result<HostCapacity> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| RuntimeError::docker("info", e))?;
        Ok(HostCapacity {
            memory_bytes: info
                .mem_total
                .and_then(|m| u64::try_from(m).ok())
                .unwrap_or(0),
            cpus: info.ncpu.and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        })
    }

    async fn daemon_id(&self) -> Result<Option<String>> {
        let Some(path) = &self.socket else {
            return Ok(None);
        };
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| RuntimeError::Io {
                what: format!("connecting to {}", path.display()),
                source,
            })?;
        let cred = stream.peer_cred().map_err(|source| RuntimeError::Io {
            what: format!("the peer of {}", path.display()),
            source,
        })?;
        Ok(cred.pid().filter(|p| *p > 0).map(process_identity))
    }
}

/// `<pid>@<start time in clock ticks since boot>` (field 22 of `/proc/<pid>/stat`), or the
/// pid alone when `/proc` does not tell: a restarted process has another identity even if
/// it got the same pid.
fn process_identity(pid: i32) -> String {
    let start = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(19).map(str::to_owned))
        });
    match start {
        Some(t) => format!("{pid}@{t}"),
        None => pid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_answers_about_registries_keep_their_message_and_say_the_status() {
        let server = |status_code: u16, message: &str| BollardError::DockerResponseServerError {
            status_code,
            message: message.into(),
        };
        let message = |e: RuntimeError| match e {
            RuntimeError::Registry { message, .. } => message,
            other => panic!("not a registry error: {other:?}"),
        };
        for (e, want) in [
            (
                server(404, "manifest unknown"),
                "manifest unknown".to_string(),
            ),
            (server(404, "nope"), "not found: nope".into()),
            (server(401, "nope"), "unauthorized: nope".into()),
            (server(500, "boom"), "boom (status code 500)".into()),
            (
                BollardError::DockerStreamError {
                    error: "unexpected EOF".into(),
                },
                "unexpected EOF".into(),
            ),
        ] {
            assert_eq!(message(registry_error("pull x".into(), e)), want);
        }
        assert_eq!(
            crate::pull::classify("boom (status code 500)"),
            crate::pull::PullCause::RegistryError
        );
        // Docker itself not answering is no registry's fault
        let e = registry_error(
            "pull x".into(),
            BollardError::IOError {
                err: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
            },
        );
        assert!(matches!(e, RuntimeError::Docker { .. }), "{e:?}");
        assert!(e.is_transient());
    }
}
