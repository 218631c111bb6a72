//! An in-memory [`Engine`] for unit tests (the runtime's own, below, and the agent daemon's
//! with the `fake` feature): containers, images, logs and events in a map, with switches to
//! make a container print or exit and Docker stop answering.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use crate::credentials::{Credentials, registry_of_key};
use crate::engine::{
    ActualContainer, Engine, EngineEvent, EngineState, ImageDetails, Inspection, LogFrame,
    LogRequest, PullEvent,
};
use crate::error::{Result, RuntimeError};
use crate::pull::ImageRef;
use crate::spec::LABEL_MANAGED;
use crate::status::{format_rfc3339_ns, now_ms};

/// A container of the fake engine.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub struct FakeContainer {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    pub state: EngineState,
    pub exit_code: i64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub ip: String,
    pub host_network: bool,
    pub logs: Vec<FakeLogLine>,
    pub body: ContainerCreateBody,
    pub oom_killed: bool,
    /// Its "host pid" (unique per container).
    pub pid: u32,
    /// The peers connected to each of its ports ([`Engine::established_peers`]).
    pub peers: BTreeMap<u16, Vec<std::net::Ipv4Addr>>,
}

/// One line a fake container printed.
#[derive(Clone, Debug)]
pub struct FakeLogLine {
    /// On standard error.
    pub stderr: bool,
    /// The line, with its line break.
    pub text: String,
    /// Docker's timestamp of it, Unix nanoseconds (never before the line above it).
    pub at_ns: i64,
}

/// A follow stream of a container's output opened on the fake (see
/// [`FakeEngine::follows`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeFollow {
    /// The container asked for.
    pub id: String,
    /// It has sent every line there was and waits for more (all it sent was taken).
    pub caught_up: bool,
}

/// Everything the fake engine holds.
#[derive(Default)]
#[allow(missing_docs)]
pub struct FakeState {
    pub containers: BTreeMap<String, FakeContainer>,
    pub images: BTreeSet<String>,
    pub next: u64,
    pub calls: Vec<String>,
    /// Host paths that exist (for bind mounts); no other path does.
    pub paths: BTreeSet<String>,
    /// Symlinks among them: path -> where it leads.
    pub links: BTreeMap<String, String>,
    /// The registries pulls and resolves reach.
    pub registry: FakeRegistry,
    /// Image id per local reference (references pulled from the registry; others get an
    /// id made from their name).
    pub image_ids: BTreeMap<String, String>,
    /// Layers present locally (pulls of images sharing them find them "Already exists").
    pub layers: BTreeSet<String>,
    /// Operations made to fail (see [`FakeEngine::fail`]).
    pub failures: Vec<FakeFailure>,
    /// Pulls streaming now, and the most that ever did at once.
    pub pulls_active: u32,
    pub pulls_max: u32,
}

/// An operation of the fake made to fail: the next `times` calls whose description
/// (e.g. `pull 10.1.1.253:5000/geomx/test@sha256:...`, `resolve r:5000/x:1`) starts with
/// `op` fail with `message` (Docker's text).
#[derive(Clone, Debug)]
pub struct FakeFailure {
    /// The operation's description, or its start.
    pub op: String,
    /// How many more calls fail.
    pub times: u32,
    /// Docker's error text.
    pub message: String,
}

/// One image in the fake registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeImage {
    /// Its image id.
    pub id: String,
    /// Its layers: (digest, size in bytes).
    pub layers: Vec<(String, u64)>,
}

/// The fake registries: manifests by `repo@digest`, tags (which can move) by
/// `repo:tag`, and the credentials a registry requires.
#[derive(Clone, Debug, Default)]
pub struct FakeRegistry {
    /// `repo:tag` -> manifest digest.
    pub tags: BTreeMap<String, String>,
    /// `repo@digest` -> the image.
    pub manifests: BTreeMap<String, FakeImage>,
    /// Registry host -> (user, password) it requires.
    pub auth: BTreeMap<String, (String, String)>,
}

/// An inspect of one container held back by [`FakeEngine::hold_next_inspect`]: it reads
/// the container's state when asked, then waits until [`InspectHold::release`] (or until
/// the hold is dropped) to answer what it read, as a slow answer of Docker would.
pub struct InspectHold {
    reached: Option<tokio::sync::oneshot::Receiver<()>>,
    release: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InspectHold {
    /// Waits until the held inspect has been asked for and has read the state.
    pub async fn reached(&mut self) {
        if let Some(r) = self.reached.take() {
            let _ = r.await;
        }
    }

    /// Lets the held inspect answer.
    pub fn release(mut self) {
        if let Some(s) = self.release.take() {
            let _ = s.send(());
        }
    }
}

/// The inspects a [`FakeEngine`] answered, in order: what was asked and the state it read
/// (`None`: no such container).
pub type Inspected = Vec<(String, Option<EngineState>)>;

type InspectGate = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

/// An in-memory Docker engine; clones share their state.
#[derive(Clone)]
pub struct FakeEngine {
    /// The containers, images and calls.
    pub state: Arc<Mutex<FakeState>>,
    events: broadcast::Sender<EngineEvent>,
    down: Arc<AtomicBool>,
    /// Bumped by [`FakeEngine::stop_daemon`]: ends every event stream (the daemon closed
    /// its API).
    daemon_runs: Arc<tokio::sync::watch::Sender<u64>>,
    /// Bumped by [`FakeEngine::start_daemon`]: a new daemon process.
    daemon_starts: Arc<tokio::sync::watch::Sender<u64>>,
    /// Whether [`Engine::daemon_id`] tells the daemon's identity (default yes).
    daemon_ids: Arc<AtomicBool>,
    live_restore: Arc<AtomicBool>,
    /// The next inspect of a container (by id or name as asked) to hold back.
    inspect_holds: Arc<Mutex<HashMap<String, InspectGate>>>,
    /// Every inspect answered, in order: what was asked and the state it read (`None`: no
    /// such container).
    inspected: Arc<tokio::sync::watch::Sender<Inspected>>,
    /// Bumped by [`FakeEngine::break_log_streams`]: ends every output stream with an error.
    log_breaks: Arc<tokio::sync::watch::Sender<u64>>,
    /// Every follow stream opened, in order.
    follows: Arc<tokio::sync::watch::Sender<Vec<FakeFollow>>>,
    /// While true, pulls stop after announcing their layers (see [`FakeEngine::hold_pulls`]).
    pull_gate: Arc<tokio::sync::watch::Sender<bool>>,
    /// Pulls streaming now (see [`FakeEngine::pulls_active`]).
    pulls_active: Arc<tokio::sync::watch::Sender<u32>>,
}

/// Decrements the fake's count of streaming pulls when a pull ends or is dropped.
struct PullGuard {
    fake: FakeEngine,
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        self.fake.lock().pulls_active -= 1;
        self.fake
            .pulls_active
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[allow(missing_docs)]
impl FakeEngine {
    /// An engine holding `images` and no container.
    pub fn new(images: &[&str]) -> FakeEngine {
        let (events, _) = broadcast::channel(1024);
        let st = FakeState {
            images: images.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        FakeEngine {
            state: Arc::new(Mutex::new(st)),
            events,
            down: Arc::new(AtomicBool::new(false)),
            daemon_runs: Arc::new(tokio::sync::watch::Sender::new(0)),
            daemon_starts: Arc::new(tokio::sync::watch::Sender::new(0)),
            daemon_ids: Arc::new(AtomicBool::new(true)),
            live_restore: Arc::new(AtomicBool::new(false)),
            inspect_holds: Arc::default(),
            inspected: Arc::new(tokio::sync::watch::Sender::new(Vec::new())),
            log_breaks: Arc::new(tokio::sync::watch::Sender::new(0)),
            follows: Arc::new(tokio::sync::watch::Sender::new(Vec::new())),
            pull_gate: Arc::new(tokio::sync::watch::Sender::new(false)),
            pulls_active: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Pushes an image to the fake registry as `reference` (`repo:tag`) with `layers`
    /// ((digest, size)): the tag moves to it. Returns its pinned reference
    /// (`repo@sha256:...`).
    pub fn push(&self, reference: &str, layers: &[(&str, u64)]) -> String {
        let r = ImageRef::parse(reference);
        let shape = format!("{reference} {layers:?}");
        let digest = format!(
            "sha256:{:016x}{:048x}",
            crate::spec::fnv1a64(shape.as_bytes()),
            0
        );
        let id = format!(
            "sha256:{:016x}{:048x}",
            crate::spec::fnv1a64(format!("id {shape}").as_bytes()),
            0
        );
        let pinned = r.pinned(&digest);
        let mut st = self.lock();
        st.registry.manifests.insert(
            pinned.clone(),
            FakeImage {
                id,
                layers: layers.iter().map(|(d, n)| (d.to_string(), *n)).collect(),
            },
        );
        st.registry.tags.insert(r.pull_reference(), digest);
        pinned
    }

    /// The registry `registry` (host:port) requires these credentials.
    pub fn require_auth(&self, registry: &str, user: &str, password: &str) {
        self.lock().registry.auth.insert(
            registry.to_string(),
            (user.to_string(), password.to_string()),
        );
    }

    /// The next `times` operations whose description starts with `op` (`pull <ref>`,
    /// `resolve <ref>`) fail with Docker's text `message`; a pull fails after announcing
    /// its layers, as a broken download does.
    pub fn fail(&self, op: &str, times: u32, message: &str) {
        self.lock().failures.push(FakeFailure {
            op: op.to_string(),
            times,
            message: message.to_string(),
        });
    }

    fn take_failure(&self, op: &str) -> Option<String> {
        let mut st = self.lock();
        let f = st
            .failures
            .iter_mut()
            .find(|f| f.times > 0 && op.starts_with(&f.op))?;
        f.times -= 1;
        Some(f.message.clone())
    }

    /// While `held`, pulls stop after announcing their layers (to see several at once).
    pub fn hold_pulls(&self, held: bool) {
        self.pull_gate.send_replace(held);
    }

    /// The number of pulls streaming now.
    pub fn pulls_active(&self) -> tokio::sync::watch::Receiver<u32> {
        self.pulls_active.subscribe()
    }

    /// Docker's answer to credentials for `registry`: `None` when they are good (or the
    /// registry wants none).
    fn auth_error(&self, registry: &str, creds: Option<&Credentials>) -> Option<String> {
        let st = self.lock();
        let (user, pass) = st.registry.auth.get(registry)?;
        match creds {
            None => Some(format!(
                "Head \"https://{registry}/v2/\": no basic auth credentials"
            )),
            Some(c)
                if &c.username == user
                    && &c.password == pass
                    && registry_of_key(&c.server) == registry =>
            {
                None
            }
            Some(_) => Some("unauthorized: authentication required".into()),
        }
    }

    /// The image a reference names in the registry.
    fn manifest(&self, reference: &str) -> Option<(String, FakeImage)> {
        let r = ImageRef::parse(reference);
        let st = self.lock();
        let digest = match &r.digest {
            Some(d) => d.clone(),
            None => st.registry.tags.get(&r.pull_reference())?.clone(),
        };
        let image = st.registry.manifests.get(&r.pinned(&digest))?.clone();
        Some((digest, image))
    }

    /// Holds back the next inspect of `id`: it reads the state when asked but answers only
    /// once the returned hold is released, so that a later inspect can answer first.
    pub fn hold_next_inspect(&self, id: &str) -> InspectHold {
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel();
        self.inspect_holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (reached_tx, release_rx));
        InspectHold {
            reached: Some(reached_rx),
            release: Some(release_tx),
        }
    }

    /// Container `id`'s process gets connections to its `port` from `peers` (what
    /// [`Engine::established_peers`] then tells).
    pub fn set_peers(&self, id: &str, port: u16, peers: &[std::net::Ipv4Addr]) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.peers.insert(port, peers.to_vec());
        }
    }

    /// The inspects answered so far, in order (see [`FakeEngine::hold_next_inspect`]).
    pub fn inspected(&self) -> tokio::sync::watch::Receiver<Inspected> {
        self.inspected.subscribe()
    }

    /// Whether the daemon's identity can be told (like a local socket's peer); off: like a
    /// TCP daemon.
    pub fn set_daemon_ids(&self, on: bool) {
        self.daemon_ids.store(on, Ordering::SeqCst);
    }

    /// The daemon's `live-restore` setting (default off, like Docker's).
    pub fn set_live_restore(&self, on: bool) {
        self.live_restore.store(on, Ordering::SeqCst);
    }

    /// The daemon stops, as dockerd does: it closes its API (event streams end, calls fail
    /// until [`FakeEngine::start_daemon`]), then, without live-restore, stops every running
    /// container, which exits with `exit_code` (0: a program that exits on SIGTERM; 137:
    /// one killed after the stop timeout).
    pub fn stop_daemon(&self, exit_code: i64) {
        self.set_down(true);
        self.daemon_runs.send_modify(|n| *n += 1);
        self.break_log_streams();
        if self.live_restore.load(Ordering::SeqCst) {
            return;
        }
        let now = now_ms();
        for c in self.lock().containers.values_mut() {
            if c.state == EngineState::Running {
                c.state = EngineState::Exited;
                c.exit_code = exit_code;
                c.finished_at_ms = now;
            }
        }
    }

    /// Every event stream ends while the daemon stays up (a broken connection).
    pub fn break_event_streams(&self) {
        self.daemon_runs.send_modify(|n| *n += 1);
    }

    /// Every output stream ends with an error while the containers keep running (a broken
    /// connection; Docker stopping with live-restore).
    pub fn break_log_streams(&self) {
        self.log_breaks.send_modify(|n| *n += 1);
    }

    /// The follow streams of containers' output opened so far, in order.
    pub fn follows(&self) -> tokio::sync::watch::Receiver<Vec<FakeFollow>> {
        self.follows.subscribe()
    }

    /// A new daemon answers (after [`FakeEngine::stop_daemon`]).
    pub fn start_daemon(&self) {
        self.daemon_starts.send_modify(|n| *n += 1);
        self.set_down(false);
    }

    /// A container ends by itself while the daemon is down (with live-restore the daemon
    /// finds it exited when it comes back); no event (nobody is listening).
    pub fn exit_silently(&self, id: &str, code: i64) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.state = EngineState::Exited;
            c.exit_code = code;
            c.finished_at_ms = now_ms();
        }
    }

    /// The state, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Docker does not answer while `down`.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// An error while Docker is down.
    pub fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(RuntimeError::Io {
                what: "fake docker".into(),
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down"),
            })
        } else {
            Ok(())
        }
    }

    /// The environment a container named `name` was created with.
    pub fn env_of(&self, name: &str) -> Vec<String> {
        self.lock()
            .containers
            .values()
            .find(|c| c.name == name)
            .and_then(|c| c.body.env.clone())
            .unwrap_or_default()
    }

    fn emit(&self, id: &str, action: &str) {
        let _ = self.events.send(EngineEvent {
            id: id.to_string(),
            action: action.to_string(),
        });
    }

    pub fn print(&self, id: &str, line: &str) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
            let at_ns = c.logs.last().map_or(now, |l| l.at_ns.max(now));
            c.logs.push(FakeLogLine {
                stderr: false,
                text: format!("{line}\n"),
                at_ns,
            });
        }
    }

    pub fn exit(&self, id: &str, code: i64) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.state = EngineState::Exited;
            c.exit_code = code;
            c.finished_at_ms = now_ms();
        }
        self.emit(id, "die");
    }

    /// The kernel's OOM killer ends the container (exit 137, `OOMKilled`).
    pub fn oom_kill(&self, id: &str) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.state = EngineState::Exited;
            c.exit_code = 137;
            c.oom_killed = true;
            c.finished_at_ms = now_ms();
        }
        self.emit(id, "oom");
        self.emit(id, "die");
    }

    /// `docker commit` of container `id`, then `docker run -d --name <name>` of the image
    /// by someone else: as with Docker, the new container inherits the labels and the env
    /// of the one committed (they are in the image's config), gets its own id and, on the
    /// default bridge network, its own address, and runs. Returns its id.
    pub fn commit_and_run(&self, id: &str, name: &str) -> Option<String> {
        let new_id = {
            let mut st = self.lock();
            let src = st.containers.get(id)?.clone();
            st.next += 1;
            let n = st.next;
            let new_id = format!("{n:064x}");
            let mut body = src.body.clone();
            if let Some(hc) = body.host_config.as_mut() {
                // a plain `docker run`: the default network, no geomx host config
                hc.network_mode = Some("bridge".into());
            }
            st.containers.insert(
                new_id.clone(),
                FakeContainer {
                    id: new_id.clone(),
                    name: name.to_string(),
                    labels: src.labels.clone(),
                    state: EngineState::Running,
                    exit_code: 0,
                    started_at_ms: now_ms(),
                    finished_at_ms: 0,
                    ip: format!("172.17.34.{}", n + 1),
                    host_network: false,
                    logs: Vec::new(),
                    body,
                    oom_killed: false,
                    pid: u32::try_from(n).unwrap_or(u32::MAX).saturating_add(1000),
                    peers: BTreeMap::new(),
                },
            );
            new_id
        };
        self.emit(&new_id, "create");
        self.emit(&new_id, "start");
        Some(new_id)
    }

    /// The value of env variable `var` of the container named `name`, if set.
    pub fn env_var(&self, name: &str, var: &str) -> Option<String> {
        let prefix = format!("{var}=");
        self.env_of(name)
            .into_iter()
            .find_map(|e| e.strip_prefix(&prefix).map(str::to_string))
    }

    /// `docker rm -f` by someone else.
    pub fn remove_behind_back(&self, id: &str) {
        self.lock().containers.remove(id);
        self.emit(id, "destroy");
    }

    pub fn ids(&self) -> Vec<String> {
        self.lock().containers.keys().cloned().collect()
    }

    /// The id of the container named `name`.
    pub fn id_of(&self, name: &str) -> Option<String> {
        self.find(name).map(|c| c.id)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .containers
            .values()
            .map(|c| c.name.clone())
            .collect();
        v.sort();
        v
    }

    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn find(&self, id_or_name: &str) -> Option<FakeContainer> {
        let st = self.lock();
        st.containers
            .values()
            .find(|c| c.id == id_or_name || c.name == id_or_name)
            .cloned()
    }
}

impl Engine for FakeEngine {
    async fn list_managed(&self) -> Result<Vec<ActualContainer>> {
        self.check()?;
        Ok(self
            .lock()
            .containers
            .values()
            .filter(|c| c.labels.get(LABEL_MANAGED).is_some_and(|v| v == "true"))
            .map(|c| ActualContainer {
                id: c.id.clone(),
                name: c.name.clone(),
                labels: c.labels.clone(),
                state: c.state,
            })
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<Option<Inspection>> {
        self.check()?;
        let read = self.find(id).map(|c| Inspection {
            id: c.id.clone(),
            name: c.name.clone(),
            labels: c.labels.clone(),
            state: c.state,
            exit_code: Some(c.exit_code),
            error: String::new(),
            oom_killed: c.oom_killed,
            ip: (c.state == EngineState::Running && !c.ip.is_empty()).then(|| c.ip.clone()),
            host_network: c.host_network,
            started_at_ms: c.started_at_ms,
            finished_at_ms: c.finished_at_ms,
            restart_count: 0,
            pid: if c.state == EngineState::Running {
                c.pid
            } else {
                0
            },
        });
        let gate = self
            .inspect_holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some((reached, release)) = gate {
            let _ = reached.send(());
            let _ = release.await;
        }
        let state = read.as_ref().map(|i| i.state);
        self.inspected
            .send_modify(|v| v.push((id.to_string(), state)));
        Ok(read)
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        self.check()?;
        let mut st = self.lock();
        st.calls.push(format!("image {image}"));
        Ok(st.images.contains(image))
    }

    async fn image_list(&self) -> Result<Vec<ImageDetails>> {
        self.check()?;
        let st = self.lock();
        let mut by_id: BTreeMap<String, ImageDetails> = BTreeMap::new();
        for reference in &st.images {
            let id = st.image_ids.get(reference).cloned().unwrap_or_else(|| {
                format!("sha256:{:016x}", crate::spec::fnv1a64(reference.as_bytes()))
            });
            let size = st
                .registry
                .manifests
                .values()
                .find(|m| m.id == id)
                .map_or(0, |m| m.layers.iter().map(|(_, n)| n).sum());
            let i = by_id.entry(id.clone()).or_insert_with(|| ImageDetails {
                id,
                size_bytes: size,
                ..Default::default()
            });
            if reference.contains('@') {
                i.repo_digests.push(reference.clone());
            } else {
                i.repo_tags.push(reference.clone());
            }
        }
        Ok(by_id.into_values().collect())
    }

    async fn resolve(&self, image: &str, credentials: Option<&Credentials>) -> Result<String> {
        self.check()?;
        let op = format!("resolve {image}");
        self.lock().calls.push(op.clone());
        let registry = ImageRef::parse(image).registry;
        if let Some(message) = self
            .take_failure(&op)
            .or_else(|| self.auth_error(&registry, credentials))
        {
            return Err(RuntimeError::Registry { op, message });
        }
        match self.manifest(image) {
            Some((digest, _)) => Ok(digest),
            None => Err(RuntimeError::Registry {
                op,
                message: format!("{image}: not found: manifest unknown"),
            }),
        }
    }

    fn pull(
        &self,
        image: &str,
        credentials: Option<&Credentials>,
    ) -> BoxStream<'static, Result<PullEvent>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<PullEvent>>(16);
        let me = self.clone();
        let image = image.to_string();
        let credentials = credentials.cloned();
        let task = async move {
            let op = format!("pull {image}");
            {
                let mut st = me.lock();
                st.calls.push(op.clone());
                st.pulls_active += 1;
                st.pulls_max = st.pulls_max.max(st.pulls_active);
            }
            me.pulls_active.send_modify(|n| *n += 1);
            let _guard = PullGuard { fake: me.clone() };
            let send = |ev: Result<PullEvent>| {
                let tx = tx.clone();
                async move { tx.send(ev).await.is_ok() }
            };
            let event = |id: &str, status: &str, current: Option<u64>, total: Option<u64>| {
                Ok(PullEvent {
                    id: id.to_string(),
                    status: status.to_string(),
                    current,
                    total,
                })
            };
            if let Err(e) = me.check() {
                send(Err(e)).await;
                return;
            }
            let r = ImageRef::parse(&image);
            if let Some(message) = me.auth_error(&r.registry, credentials.as_ref()) {
                send(Err(RuntimeError::Registry { op, message })).await;
                return;
            }
            let Some((digest, manifest)) = me.manifest(&image) else {
                let message =
                    format!("manifest for {image} not found: manifest unknown: manifest unknown");
                send(Err(RuntimeError::Registry { op, message })).await;
                return;
            };
            let tag = r.tag.clone().unwrap_or_else(|| digest.clone());
            let repo_path = r.repo.split_once('/').map_or(r.repo.as_str(), |(_, p)| p);
            if !send(event(
                &tag,
                &format!("Pulling from {repo_path}"),
                None,
                None,
            ))
            .await
            {
                return;
            }
            let present: BTreeSet<String> = me.lock().layers.clone();
            for (layer, _) in &manifest.layers {
                let status = if present.contains(layer) {
                    "Already exists"
                } else {
                    "Pulling fs layer"
                };
                if !send(event(layer, status, None, None)).await {
                    return;
                }
            }
            let mut gate = me.pull_gate.subscribe();
            tokio::select! {
                _ = gate.wait_for(|held| !held) => {}
                () = tx.closed() => return,
            }
            if let Some(message) = me.take_failure(&op) {
                send(Err(RuntimeError::Registry { op, message })).await;
                return;
            }
            for (layer, size) in manifest.layers.iter().filter(|(l, _)| !present.contains(l)) {
                for ev in [
                    event(layer, "Downloading", Some(size / 2), Some(*size)),
                    event(layer, "Downloading", Some(*size), Some(*size)),
                    event(layer, "Verifying Checksum", None, None),
                    event(layer, "Download complete", None, None),
                    event(layer, "Extracting", Some(*size), Some(*size)),
                    event(layer, "Pull complete", None, None),
                ] {
                    if !send(ev).await {
                        return;
                    }
                }
                me.lock().layers.insert(layer.clone());
            }
            {
                let mut st = me.lock();
                let mut refs = vec![r.pinned(&digest)];
                if r.digest.is_none() {
                    refs.push(r.pull_reference());
                }
                for reference in refs {
                    // a moved tag leaves the old image without it
                    st.images.insert(reference.clone());
                    st.image_ids.insert(reference, manifest.id.clone());
                }
            }
            send(event("", &format!("Digest: {digest}"), None, None)).await;
            send(event(
                "",
                &format!("Status: Downloaded newer image for {image}"),
                None,
                None,
            ))
            .await;
        };
        tokio::spawn(task);
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
        )
        .boxed()
    }

    async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String> {
        self.check()?;
        let mut st = self.lock();
        st.calls.push(format!("create {name}"));
        let image = body.image.clone().unwrap_or_default();
        if !st.images.contains(&image) {
            return Err(RuntimeError::ImageMissing { image });
        }
        if st.containers.values().any(|c| c.name == name) {
            return Err(RuntimeError::Refused {
                what: format!("creating {name}"),
                message: "name in use".into(),
            });
        }
        st.next += 1;
        let n = st.next;
        let id = format!("{n:064x}");
        let mode = body
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default();
        if let Some(net) = mode.strip_prefix("container:")
            && st
                .containers
                .get(net)
                .is_none_or(|c| c.state != EngineState::Running)
        {
            return Err(RuntimeError::Refused {
                what: format!("creating {name}"),
                message: format!("cannot join the network of {net}: not running"),
            });
        }
        let host_network = mode == "host";
        let own_ip = mode == "bridge";
        st.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                name: name.to_string(),
                labels: body.labels.clone().unwrap_or_default(),
                state: EngineState::Created,
                exit_code: 0,
                started_at_ms: 0,
                finished_at_ms: 0,
                ip: if own_ip {
                    format!("172.17.34.{}", n + 1)
                } else {
                    String::new()
                },
                host_network,
                logs: Vec::new(),
                body,
                oom_killed: false,
                pid: u32::try_from(n).unwrap_or(u32::MAX).saturating_add(1000),
                peers: BTreeMap::new(),
            },
        );
        drop(st);
        self.emit(&id, "create");
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.check()?;
        {
            let mut st = self.lock();
            st.calls.push(format!("start {id}"));
            let c = st.containers.get_mut(id).ok_or(RuntimeError::NoSuchNode {
                job: String::new(),
                node: id.to_string(),
            })?;
            c.state = EngineState::Running;
            c.started_at_ms = now_ms();
        }
        self.emit(id, "start");
        Ok(())
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<()> {
        self.check()?;
        let was_running = {
            let mut st = self.lock();
            st.calls.push(format!("stop {id}"));
            match st.containers.get_mut(id) {
                Some(c) if c.state == EngineState::Running => {
                    c.state = EngineState::Exited;
                    c.exit_code = 143;
                    c.finished_at_ms = now_ms();
                    true
                }
                _ => false,
            }
        };
        if was_running {
            self.emit(id, "die");
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        self.check()?;
        let existed = {
            let mut st = self.lock();
            st.calls.push(format!("remove {id}"));
            st.containers.remove(id).is_some()
        };
        if existed {
            self.emit(id, "destroy");
        }
        Ok(())
    }

    fn logs(&self, id: &str, req: LogRequest) -> BoxStream<'static, Result<LogFrame>> {
        let me = self.clone();
        let id = id.to_string();
        // as Docker: every stream starts at the beginning of the output (or at `since`),
        // with each line's timestamp when asked
        let since_ns = req
            .since_s
            .map_or(i64::MIN, |s| s.saturating_mul(1_000_000_000));
        let frame = move |l: &FakeLogLine| LogFrame {
            stderr: l.stderr,
            data: if req.timestamps {
                format!("{} {}", format_rfc3339_ns(l.at_ns), l.text).into_bytes()
            } else {
                l.text.clone().into_bytes()
            },
        };
        let from_since = move |c: &FakeContainer| {
            c.logs
                .iter()
                .position(|l| l.at_ns >= since_ns)
                .unwrap_or(c.logs.len())
        };
        let Some(c) = self.find(&id) else {
            return futures::stream::empty().boxed();
        };
        // Docker follows only a running container; otherwise it sends what there is
        if !req.follow || c.state != EngineState::Running {
            let lines = &c.logs[from_since(&c)..];
            let skip = req
                .tail
                .map_or(0, |n| lines.len().saturating_sub(n as usize));
            let frames: Vec<_> = lines.iter().skip(skip).map(|l| Ok(frame(l))).collect();
            return futures::stream::iter(frames).boxed();
        }
        let mut breaks = self.log_breaks.subscribe();
        breaks.mark_unchanged();
        let mut index = 0;
        self.follows.send_modify(|f| {
            index = f.len();
            f.push(FakeFollow {
                id: id.clone(),
                caught_up: false,
            });
        });
        let start = from_since(&c);
        futures::stream::unfold((start, breaks), move |(next, mut breaks)| {
            let me = me.clone();
            let id = id.clone();
            async move {
                let mut broke = false;
                loop {
                    if next == usize::MAX {
                        return None;
                    }
                    if broke || breaks.has_changed().unwrap_or(true) {
                        let e = RuntimeError::Io {
                            what: format!("logs {id}"),
                            source: std::io::Error::new(
                                std::io::ErrorKind::ConnectionReset,
                                "the connection broke",
                            ),
                        };
                        // (ends after the error, like the real engine's stream)
                        return Some((Err(e), (usize::MAX, breaks)));
                    }
                    let c = me.find(&id)?;
                    if let Some(l) = c.logs.get(next) {
                        return Some((Ok(frame(l)), (next + 1, breaks)));
                    }
                    if c.state != EngineState::Running {
                        return None;
                    }
                    me.follows.send_if_modified(|f| match f.get_mut(index) {
                        Some(s) if !s.caught_up => {
                            s.caught_up = true;
                            true
                        }
                        _ => false,
                    });
                    tokio::select! {
                        _ = breaks.changed() => broke = true,
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
            }
        })
        .boxed()
    }

    fn events(&self) -> BoxStream<'static, Result<EngineEvent>> {
        if let Err(e) = self.check() {
            return futures::stream::iter([Err(e)]).boxed();
        }
        let rx = self.events.subscribe();
        let mut runs = self.daemon_runs.subscribe();
        runs.mark_unchanged();
        futures::stream::unfold((rx, runs), |(mut rx, mut runs)| async move {
            loop {
                tokio::select! {
                    // the daemon stopped: its API closes the stream
                    _ = runs.changed() => return None,
                    r = rx.recv() => match r {
                        Ok(ev) => return Some((Ok(ev), (rx, runs))),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                }
            }
        })
        .boxed()
    }

    fn path_exists(&self, path: &str) -> bool {
        self.lock().paths.contains(path)
    }

    fn established_peers(&self, pid: u32, port: u16) -> Result<Vec<std::net::Ipv4Addr>> {
        self.check()?;
        Ok(self
            .lock()
            .containers
            .values()
            .find(|c| c.pid == pid && c.state == EngineState::Running)
            .and_then(|c| c.peers.get(&port).cloned())
            .unwrap_or_default())
    }

    fn real_path(&self, path: &str) -> Option<String> {
        let st = self.lock();
        st.links
            .get(path)
            .cloned()
            .or_else(|| st.paths.contains(path).then(|| path.to_string()))
    }

    async fn live_restore(&self) -> Result<bool> {
        self.check()?;
        Ok(self.live_restore.load(Ordering::SeqCst))
    }

    async fn daemon_id(&self) -> Result<Option<String>> {
        self.check()?;
        Ok(self
            .daemon_ids
            .load(Ordering::SeqCst)
            .then(|| format!("fake-dockerd-{}", *self.daemon_starts.borrow())))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;
    use crate::heartbeat::{HeartbeatError, HeartbeatReport};
    use crate::reconcile::Action;
    use crate::runtime::{Runtime, RuntimeConfig};
    use crate::spec::{ContainerSpec, LABEL_JOB, LABEL_SPEC};
    use crate::status::{NodeState, NodeStatus};

    const IMG: &str = "geomx-test/psnode:latest";

    fn config() -> RuntimeConfig {
        RuntimeConfig {
            agent_url: "http://172.17.34.1:7948".into(),
            resync_interval: Duration::from_millis(200),
            ..Default::default()
        }
    }

    fn spec(node: &str) -> ContainerSpec {
        ContainerSpec {
            job: "job1".into(),
            node: node.into(),
            role: "worker".into(),
            party: "a".into(),
            image: IMG.into(),
            command: vec!["python".into(), "cnn.py".into()],
            env: BTreeMap::from([("DMLC_ROLE".into(), "worker".into())]),
            controller_id: "ctl".into(),
            start: true,
            sandbox: true,
            ..Default::default()
        }
    }

    fn role_id(fake: &FakeEngine, node: &str) -> String {
        fake.id_of(&format!("geomx.job1.{node}"))
            .unwrap_or_else(|| panic!("no role container for {node}: {:?}", fake.names()))
    }

    async fn wait_for(
        rt: &Runtime<FakeEngine>,
        what: &str,
        f: impl Fn(&crate::status::Snapshot) -> bool,
    ) -> crate::status::Snapshot {
        let mut rx = rt.subscribe();
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                {
                    let s = rx.borrow_and_update().clone();
                    if f(&s) {
                        return s;
                    }
                }
                if rx.changed().await.is_err() {
                    return rt.snapshot();
                }
            }
        })
        .await;
        match r {
            Ok(s) => s,
            Err(_) => panic!("timed out waiting for {what}: {:#?}", rt.snapshot()),
        }
    }

    fn node<'a>(s: &'a crate::status::Snapshot, n: &str) -> &'a NodeStatus {
        s.node("job1", n)
            .unwrap_or_else(|| panic!("no node {n} in {s:#?}"))
    }

    #[tokio::test]
    async fn apply_creates_then_is_a_no_op() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let report = rt.apply(vec![spec("w0"), spec("w1")]).await.expect("apply");
        assert_eq!(
            report.changes().count(),
            4,
            "two sandboxes, two roles: {report:?}"
        );
        assert!(report.errors().next().is_none(), "{report:?}");
        let s = wait_for(&rt, "running", |s| {
            s.nodes.len() == 2 && s.nodes.iter().all(|n| n.state == NodeState::Running)
        })
        .await;
        let w0 = node(&s, "w0");
        assert!(w0.ip.starts_with("172.17.34."));
        assert!(w0.started_at_ms > 0);
        assert_eq!(w0.role, "worker");
        {
            let st = fake.lock();
            let c = st
                .containers
                .values()
                .find(|c| c.name == "geomx.job1.w0")
                .expect("named geomx.job1.w0");
            assert_eq!(c.labels[LABEL_JOB], "job1");
            assert_eq!(
                c.labels[LABEL_SPEC],
                spec("w0").spec_hash(&config().agent_url, &config().sandbox)
            );
            let env = c.body.env.clone().unwrap_or_default();
            assert!(env.contains(&"GEOMX_AGENT_URL=http://172.17.34.1:7948".to_string()));
        }
        let report = rt.apply(vec![spec("w0"), spec("w1")]).await.expect("apply");
        assert!(report.is_no_op(), "{report:?}");
        rt.shutdown();
    }

    /// Waits until a follow stream of `id` newer than the first `after` ones has sent all
    /// the output there was (so the runtime has read it); returns how many were opened.
    async fn wait_caught_up(fake: &FakeEngine, id: &str, after: usize) -> usize {
        let mut rx = fake.follows();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|f| f.iter().skip(after).any(|s| s.id == id && s.caught_up)),
        )
        .await;
        let opened = r.ok().and_then(|r| r.ok()).map(|f| f.len());
        opened.unwrap_or_else(|| panic!("no new follower of {id} caught up: {:?}", *rx.borrow()))
    }

    #[tokio::test]
    async fn a_follower_started_again_resumes_after_the_lines_read() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        let id = role_id(&fake, "w0");
        // (the follower opened before the start ended at once, as Docker's does: the
        // container's first real follower began once it ran)
        for i in 1..=3 {
            fake.print(
                &id,
                &format!("[Time 0.{i}][Epoch 0][Iteration {i}] Test Acc 0.{i}0"),
            );
        }
        let iteration =
            |s: &crate::status::Snapshot| node(s, "w0").progress.as_ref().map(|p| p.iteration);
        wait_for(&rt, "iteration 3", |s| iteration(s) == Some(3)).await;
        // the node also reports over HTTP, ahead of its output
        let hb = HeartbeatReport {
            job: Some("job1".into()),
            node: Some("w0".into()),
            step: Some(5),
            ..Default::default()
        };
        let own: IpAddr = node(&rt.snapshot(), "w0").ip.parse().expect("ip");
        rt.record_heartbeat(&hb, own, None).expect("heartbeat");
        let before = rt.snapshot();
        assert_eq!(iteration(&before), Some(5));
        let opened = fake.follows().borrow().len();

        // the output stream breaks while the container runs: a new follower, to which the
        // fake (as Docker) sends the whole output again
        fake.break_log_streams();
        let opened = wait_caught_up(&fake, &id, opened).await;
        let after = rt.snapshot();
        assert_eq!(
            node(&after, "w0").progress,
            node(&before, "w0").progress,
            "the old lines were read again"
        );
        assert_eq!(after.revision, before.revision, "{after:#?}");

        // twice, and new lines are read
        fake.break_log_streams();
        wait_caught_up(&fake, &id, opened).await;
        assert_eq!(iteration(&rt.snapshot()), Some(5));
        fake.print(&id, "[Time 0.6][Epoch 0][Iteration 6] Test Acc 0.60");
        let s = wait_for(&rt, "iteration 6", |s| iteration(s) == Some(6)).await;
        assert_eq!(
            node(&s, "w0").progress.as_ref().map(|p| p.accuracy),
            Some(Some(0.6))
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_new_runtime_adopts_without_restarting_and_rebuilds_progress() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        let id = role_id(&fake, "w0");
        fake.print(&id, "Start training on 2 workers, my rank is 0.");
        fake.print(&id, "[Time 0.2][Epoch 0][Iteration 1] Test Acc 0.10");
        fake.print(&id, "[Time 0.4][Epoch 0][Iteration 2] Test Acc 0.20");
        wait_for(&rt, "progress", |s| {
            s.node("job1", "w0")
                .and_then(|n| n.progress.as_ref())
                .is_some_and(|p| p.iteration == 2)
        })
        .await;
        let before = rt.status("job1", "w0").expect("status");
        rt.shutdown();
        drop(rt);

        let calls_before = fake.calls().len();
        let rt2 = Runtime::start(fake.clone(), config())
            .await
            .expect("restart");
        let s = wait_for(&rt2, "adopted progress", |s| {
            s.node("job1", "w0")
                .and_then(|n| n.progress.as_ref())
                .is_some_and(|p| p.iteration == 2)
        })
        .await;
        let after = node(&s, "w0");
        assert_eq!(after.container_id, before.container_id);
        assert_eq!(after.started_at_ms, before.started_at_ms);
        assert_eq!(after.state, NodeState::Running);
        assert_eq!(after.progress.as_ref().and_then(|p| p.accuracy), Some(0.2));
        let report = rt2.apply(vec![spec("w0")]).await.expect("apply");
        assert!(report.is_no_op(), "{report:?}");
        assert_eq!(fake.calls().len(), calls_before, "{:?}", fake.calls());
        rt2.shutdown();
    }

    #[tokio::test]
    async fn missing_image_fails_the_node_clearly() {
        let fake = FakeEngine::new(&[]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let report = rt.apply(vec![spec("w0")]).await.expect("apply");
        let err = report.errors().next().and_then(|o| o.error.clone());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains(IMG) && e.contains("not present")),
            "{report:?}"
        );
        let st = rt.status("job1", "w0").expect("status");
        assert_eq!(st.state, NodeState::Failed);
        assert!(st.error.contains("not present"), "{st:?}");
        assert!(fake.ids().is_empty());
        assert!(!fake.calls().iter().any(|c| c.starts_with("create")));
        rt.shutdown();
    }

    #[tokio::test]
    async fn the_sandbox_gives_the_address_before_the_role_container_starts() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let mut sched = spec("sched");
        sched.start = false;
        let report = rt.apply(vec![sched.clone()]).await.expect("apply");
        assert_eq!(report.changes().count(), 1, "{report:?}");
        let s = wait_for(&rt, "address", |s| {
            s.node("job1", "sched").is_some_and(|n| !n.ip.is_empty())
        })
        .await;
        let n = node(&s, "sched");
        assert_eq!(n.state, NodeState::Pending);
        assert!(n.container_id.is_empty());
        let ip = n.ip.clone();
        assert_eq!(fake.names(), vec!["geomx-net.job1.sched".to_string()]);
        // started: the role container joins the sandbox's network and keeps its address
        sched.start = true;
        let report = rt.apply(vec![sched.clone()]).await.expect("apply");
        assert_eq!(report.changes().count(), 1, "{report:?}");
        let s = wait_for(&rt, "running", |s| {
            s.node("job1", "sched")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        assert_eq!(node(&s, "sched").ip, ip);
        let sandbox = fake.id_of("geomx-net.job1.sched").expect("sandbox");
        let body = fake
            .find("geomx.job1.sched")
            .map(|c| c.body)
            .expect("role container");
        assert_eq!(
            body.host_config.and_then(|h| h.network_mode),
            Some(format!("container:{sandbox}"))
        );
        // the sandbox dying fails the node
        fake.exit(&sandbox, 137);
        let s = wait_for(&rt, "failed", |s| {
            s.node("job1", "sched")
                .is_some_and(|n| n.state == NodeState::Failed)
        })
        .await;
        assert!(node(&s, "sched").error.contains("network sandbox"), "{s:?}");
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_node_without_a_sandbox_starts_directly_on_docker0_with_its_own_address() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let mut w = spec("w0");
        w.sandbox = false;
        w.start = false;
        // not started, no sandbox: nothing to create, no address yet
        let report = rt.apply(vec![w.clone()]).await.expect("apply");
        assert!(report.is_no_op(), "{report:?}");
        let pending = rt.status("job1", "w0").expect("tracked");
        assert_eq!(pending.state, NodeState::Pending);
        assert!(pending.ip.is_empty(), "{pending:?}");
        w.start = true;
        rt.apply(vec![w]).await.expect("apply");
        let s = wait_for(&rt, "running with an address", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running && !n.ip.is_empty())
        })
        .await;
        assert_eq!(fake.names(), vec!["geomx.job1.w0".to_string()]);
        let body = fake
            .find("geomx.job1.w0")
            .map(|c| c.body)
            .expect("role container");
        assert_eq!(
            body.host_config.and_then(|h| h.network_mode),
            Some("bridge".to_string())
        );
        assert!(!node(&s, "w0").ip.is_empty());
        rt.shutdown();
    }

    #[tokio::test]
    async fn host_network_nodes_have_no_sandbox_and_report_the_host_address() {
        let fake = FakeEngine::new(&[IMG]);
        let cfg = RuntimeConfig {
            host_ip: Some(std::net::Ipv4Addr::new(10, 1, 1, 34)),
            ..config()
        };
        let rt = Runtime::start(fake.clone(), cfg).await.expect("start");
        let mut w = spec("w0");
        w.host_network = true;
        w.start = false;
        let report = rt.apply(vec![w.clone()]).await.expect("apply");
        assert!(report.is_no_op(), "{report:?}");
        assert_eq!(
            rt.status("job1", "w0").map(|s| s.state),
            Some(NodeState::Pending)
        );
        w.start = true;
        rt.apply(vec![w]).await.expect("apply");
        let s = wait_for(&rt, "running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        assert_eq!(node(&s, "w0").ip, "10.1.1.34");
        assert_eq!(fake.names(), vec!["geomx.job1.w0".to_string()]);
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_container_created_but_never_started_is_started_once() {
        let fake = FakeEngine::new(&[IMG]);
        let mut w = spec("w0");
        w.host_network = true;
        // an agent died between create and start
        let cfg = config();
        let id = fake
            .create(
                &w.container_name(),
                w.create_body(&cfg.agent_url, &cfg.sandbox, None),
            )
            .await
            .expect("create");
        let rt = Runtime::start(fake.clone(), cfg).await.expect("start");
        assert_eq!(
            rt.status("job1", "w0").map(|s| s.state),
            Some(NodeState::Created)
        );
        let report = rt.apply(vec![w.clone()]).await.expect("apply");
        assert!(
            matches!(&report.outcomes[..], [o] if matches!(o.action, Action::Start { .. })),
            "{report:?}"
        );
        wait_for(&rt, "running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        assert_eq!(role_id(&fake, "w0"), id);
        assert!(rt.apply(vec![w]).await.expect("apply").is_no_op());
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_missing_image_is_retried_by_apply_not_by_the_resync() {
        let fake = FakeEngine::new(&[]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        let checks = |f: &FakeEngine| f.calls().iter().filter(|c| c.starts_with("image")).count();
        assert_eq!(checks(&fake), 1);
        tokio::time::sleep(config().resync_interval * 3).await;
        assert_eq!(checks(&fake), 1, "{:?}", fake.calls());
        assert_eq!(
            rt.status("job1", "w0").map(|s| s.state),
            Some(NodeState::Failed)
        );
        fake.lock().images.insert(IMG.into());
        let report = rt.apply(vec![spec("w0")]).await.expect("apply");
        assert!(report.errors().next().is_none(), "{report:?}");
        wait_for(&rt, "running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_vanished_undesired_container_is_forgotten() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        rt.shutdown();
        drop(rt);
        // agent restart: adopted before any desired state arrives, then removed by someone
        let rt = Runtime::start(fake.clone(), config())
            .await
            .expect("restart");
        let id = role_id(&fake, "w0");
        fake.remove_behind_back(&id);
        wait_for(&rt, "missing", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Missing)
        })
        .await;
        let report = rt.apply(vec![]).await.expect("apply");
        assert_eq!(
            report.changes().count(),
            1,
            "only the sandbox left: {report:?}"
        );
        wait_for(&rt, "forgotten", |s| s.nodes.is_empty()).await;
        assert!(fake.ids().is_empty());
        rt.shutdown();
    }

    #[tokio::test]
    async fn ended_containers_report_and_stay_until_dropped() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        let id = role_id(&fake, "w0");
        for i in 0..30 {
            fake.print(&id, &format!("line {i}"));
        }
        fake.print(&id, "psnode: simulated crash");
        fake.exit(&id, 3);
        let s = wait_for(&rt, "failed", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Failed && !n.log_tail.is_empty())
        })
        .await;
        let w0 = node(&s, "w0");
        assert_eq!(w0.exit_code, Some(3));
        assert_eq!(w0.log_tail.len(), 20);
        assert_eq!(
            w0.log_tail.last().map(String::as_str),
            Some("psnode: simulated crash")
        );
        assert!(w0.finished_at_ms > 0);
        // the same desired state keeps it (no restart) ...
        let report = rt.apply(vec![spec("w0")]).await.expect("apply");
        assert!(report.is_no_op(), "{report:?}");
        assert_eq!(fake.ids().len(), 2);
        assert_eq!(role_id(&fake, "w0"), id);
        // ... until it is no longer desired
        let report = rt.apply(vec![]).await.expect("apply");
        assert_eq!(report.outcomes.len(), 2, "{report:?}");
        assert!(
            report
                .outcomes
                .iter()
                .all(|o| matches!(o.action, Action::Remove { .. })),
            "{report:?}"
        );
        assert!(fake.ids().is_empty());
        let s = wait_for(&rt, "forgotten", |s| s.nodes.is_empty()).await;
        assert!(s.nodes.is_empty());
        rt.shutdown();
    }

    #[tokio::test]
    async fn removed_behind_our_back_is_missing_and_not_recreated() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        let id = role_id(&fake, "w0");
        fake.remove_behind_back(&id);
        wait_for(&rt, "missing", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Missing)
        })
        .await;
        let report = rt.apply(vec![spec("w0")]).await.expect("apply");
        assert!(report.is_no_op(), "{report:?}");
        assert_eq!(fake.names(), vec!["geomx-net.job1.w0".to_string()]);
        // the next generation is created (sandbox and role replaced or created)
        let mut g1 = spec("w0");
        g1.generation = 1;
        let report = rt.apply(vec![g1]).await.expect("apply");
        assert_eq!(report.changes().count(), 2, "{report:?}");
        assert_eq!(fake.ids().len(), 2);
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_new_generation_replaces_and_strangers_are_removed() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0"), spec("w1")]).await.expect("apply");
        let old = rt.status("job1", "w0").expect("w0").container_id;
        let mut g1 = spec("w0");
        g1.generation = 1;
        let mut rx = rt.subscribe();
        let states = tokio::spawn(async move {
            let mut seen = Vec::new();
            while rx.changed().await.is_ok() {
                let s = rx.borrow_and_update().clone();
                if let Some(n) = s.node("job1", "w0") {
                    seen.push(n.state);
                    if n.generation == 1 && n.state == NodeState::Running {
                        break;
                    }
                }
            }
            seen
        });
        let report = rt.apply(vec![g1]).await.expect("apply");
        // w0: sandbox and role replaced; w1: sandbox and role removed
        assert_eq!(report.changes().count(), 4, "{report:?}");
        let seen = tokio::time::timeout(Duration::from_secs(5), states)
            .await
            .expect("replaced in time")
            .expect("collector");
        assert!(
            !seen
                .iter()
                .any(|s| matches!(s, NodeState::Failed | NodeState::Missing)),
            "{seen:?}"
        );
        let s = wait_for(&rt, "replaced", |s| {
            s.nodes.len() == 1
                && s.node("job1", "w0").is_some_and(|n| {
                    n.state == NodeState::Running && n.generation == 1 && n.container_id != old
                })
        })
        .await;
        assert_eq!(node(&s, "w0").generation, 1);
        assert_eq!(
            fake.names(),
            vec!["geomx-net.job1.w0".to_string(), "geomx.job1.w0".to_string()]
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn heartbeats_merge_into_progress() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        let s = wait_for(&rt, "running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        let ip: IpAddr = node(&s, "w0").ip.parse().expect("ip");
        let hb = HeartbeatReport {
            job: Some("job1".into()),
            node: Some("w0".into()),
            step: Some(12),
            epoch: Some(0),
            metrics: BTreeMap::from([("accuracy".into(), 0.9), ("loss".into(), 0.3)]),
        };
        let other: IpAddr = "172.17.34.200".parse().expect("ip");
        // another container (or host) cannot speak for w0: refused, nothing recorded
        let forged = rt.record_heartbeat(&hb, other, None);
        assert!(
            matches!(forged, Err(HeartbeatError::WrongPeer { .. })),
            "{forged:?}"
        );
        assert!(rt.status("job1", "w0").and_then(|s| s.progress).is_none());
        assert_eq!(
            rt.record_heartbeat(&hb, ip, None).expect("named").key,
            ("job1".to_string(), "w0".to_string())
        );
        let p = rt
            .status("job1", "w0")
            .and_then(|s| s.progress)
            .expect("progress");
        assert_eq!((p.iteration, p.accuracy), (12, Some(0.9)));
        let anon = HeartbeatReport {
            step: Some(13),
            ..Default::default()
        };
        assert!(rt.record_heartbeat(&anon, ip, None).is_ok());
        assert!(matches!(
            rt.record_heartbeat(&anon, other, None),
            Err(HeartbeatError::UnknownPeer(_))
        ));
        let stranger = HeartbeatReport {
            job: Some("job1".into()),
            node: Some("nope".into()),
            step: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            rt.record_heartbeat(&stranger, ip, None),
            Err(HeartbeatError::UnknownNode { .. })
        ));
        rt.shutdown();
    }

    fn config_on(host: &str) -> RuntimeConfig {
        RuntimeConfig {
            host: host.into(),
            ..config()
        }
    }

    async fn running_w0(fake: &FakeEngine, rt: &Runtime<FakeEngine>) -> String {
        rt.apply(vec![spec("w0")]).await.expect("apply");
        wait_for(rt, "w0 running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        role_id(fake, "w0")
    }

    #[tokio::test]
    async fn a_worker_stopped_by_a_docker_restart_fails_whatever_its_exit_code() {
        // 0: a script that exits on SIGTERM (psnode, checkpointing scripts); 137: one
        // killed after Docker's stop timeout
        // (without the daemon's identity, e.g. Docker over TCP: told by Docker not
        // answering after the event stream ended)
        for (code, ids) in [(0, true), (137, true), (0, false)] {
            let fake = FakeEngine::new(&[IMG]);
            fake.set_daemon_ids(ids);
            let rt = Runtime::start(fake.clone(), config_on("b"))
                .await
                .expect("start");
            running_w0(&fake, &rt).await;
            fake.stop_daemon(code);
            tokio::time::sleep(Duration::from_millis(300)).await;
            fake.start_daemon();
            let s = wait_for(&rt, "w0 failed", |s| {
                s.node("job1", "w0")
                    .is_some_and(|n| n.state == NodeState::Failed)
            })
            .await;
            let n = node(&s, "w0");
            assert_eq!(n.exit_code, Some(code as i32), "{n:?}");
            assert!(
                n.error
                    .starts_with("stopped by a restart of Docker on host b"),
                "{}",
                n.error
            );
            // it stays failed through later resyncs and refreshes
            tokio::time::sleep(Duration::from_millis(600)).await;
            let n = rt.status("job1", "w0").expect("w0");
            assert_eq!(n.state, NodeState::Failed, "{n:?}");
            // the sandbox stopped too: that alone does not overwrite the reason
            assert!(n.error.contains("restart of Docker"), "{}", n.error);
            rt.shutdown();
        }
    }

    #[tokio::test]
    async fn a_docker_loss_outlives_the_agent_that_saw_it() {
        // a host shutting down: Docker stops its containers (w0 exits 0 on SIGTERM) and
        // exits, then the agent is stopped; after the boot a new agent starts before Docker
        for ids in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = dir.path().join(crate::DOCKER_LOSS_FILE);
            let fake = FakeEngine::new(&[IMG]);
            fake.set_daemon_ids(ids);
            let config = RuntimeConfig {
                docker_loss_file: Some(file.clone()),
                ..config_on("b")
            };
            let rt = Runtime::start(fake.clone(), config.clone())
                .await
                .expect("start");
            let id = running_w0(&fake, &rt).await;
            fake.stop_daemon(0);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            // (without the daemon's identity: once Docker was found not answering)
            let kept = |f: &std::path::Path| {
                std::fs::read_to_string(f).is_ok_and(|t| ids || t.contains("\"unreachable\":true"))
            };
            while !kept(&file) {
                assert!(std::time::Instant::now() < deadline, "no {file:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            rt.shutdown();
            fake.start_daemon();
            let rt = Runtime::start(fake.clone(), config.clone())
                .await
                .expect("start after the boot");
            let s = wait_for(&rt, "w0 failed", |s| {
                s.node("job1", "w0")
                    .is_some_and(|n| n.state == NodeState::Failed)
            })
            .await;
            let n = node(&s, "w0");
            assert_eq!(n.container_id, id);
            assert_eq!(n.exit_code, Some(0), "{n:?}");
            assert!(
                n.error
                    .starts_with("stopped by a restart of Docker on host b"),
                "{}",
                n.error
            );
            // judged once: the record is gone, a third agent sees a plain exit
            assert!(!file.exists(), "{file:?} left after the judgement");
            rt.shutdown();
            let rt = Runtime::start(fake.clone(), config).await.expect("start");
            let s = wait_for(&rt, "w0 adopted", |s| s.node("job1", "w0").is_some()).await;
            assert_eq!(node(&s, "w0").state, NodeState::Exited, "ids {ids}");
            rt.shutdown();
        }
    }

    #[tokio::test]
    async fn a_kept_docker_loss_that_is_corrupt_is_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(crate::DOCKER_LOSS_FILE);
        std::fs::write(&file, b"{\"at_ms\": 1, \"running\": [").expect("write");
        let fake = FakeEngine::new(&[IMG]);
        let config = RuntimeConfig {
            docker_loss_file: Some(file.clone()),
            ..config_on("b")
        };
        let rt = Runtime::start(fake.clone(), config).await.expect("start");
        running_w0(&fake, &rt).await;
        assert!(!file.exists());
        assert!(dir.path().join("docker-loss.json.corrupt").exists());
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_worker_that_finished_before_docker_went_away_keeps_its_success() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config_on("b"))
            .await
            .expect("start");
        let id = running_w0(&fake, &rt).await;
        fake.exit(&id, 0);
        wait_for(&rt, "w0 exited", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Exited)
        })
        .await;
        fake.stop_daemon(0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        fake.start_daemon();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let n = rt.status("job1", "w0").expect("w0");
        assert_eq!(
            (n.state, n.exit_code),
            (NodeState::Exited, Some(0)),
            "{n:?}"
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn with_live_restore_or_a_broken_event_stream_an_exit_is_an_exit() {
        // live-restore: Docker's restart stops nothing; w0 finishes meanwhile
        let fake = FakeEngine::new(&[IMG]);
        fake.set_live_restore(true);
        let rt = Runtime::start(fake.clone(), config_on("b"))
            .await
            .expect("start");
        let id = running_w0(&fake, &rt).await;
        fake.stop_daemon(0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        fake.exit_silently(&id, 0);
        fake.start_daemon();
        let s = wait_for(&rt, "w0 exited", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state != NodeState::Running)
        })
        .await;
        let n = node(&s, "w0");
        assert_eq!(
            (n.state, n.exit_code),
            (NodeState::Exited, Some(0)),
            "{n:?}"
        );
        assert!(n.error.is_empty(), "{}", n.error);
        rt.shutdown();

        // the event stream breaks while Docker stays up, w0 finishes right after
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config_on("b"))
            .await
            .expect("start");
        let id = running_w0(&fake, &rt).await;
        fake.break_event_streams();
        tokio::time::sleep(Duration::from_millis(100)).await;
        fake.exit_silently(&id, 0);
        let s = wait_for(&rt, "w0 exited", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state != NodeState::Running)
        })
        .await;
        let n = node(&s, "w0");
        assert_eq!(
            (n.state, n.exit_code),
            (NodeState::Exited, Some(0)),
            "{n:?}"
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn invalid_specs_are_refused_per_node() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let report = rt
            .apply(vec![spec("bad name"), spec("w0"), spec("w0")])
            .await
            .expect("apply");
        assert_eq!(report.errors().count(), 2, "{report:?}");
        assert_eq!(fake.ids().len(), 2);
        assert_eq!(
            rt.status("job1", "bad name").map(|s| s.state),
            Some(NodeState::Failed)
        );
        rt.shutdown();
    }

    /// Applies `s` (node w0), which must be refused before anything is created; the node's
    /// error.
    async fn refused(rt: &Runtime<FakeEngine>, fake: &FakeEngine, s: ContainerSpec) -> String {
        let report = rt.apply(vec![s]).await.expect("apply");
        assert_eq!(report.errors().count(), 1, "{report:?}");
        let snap = rt.snapshot();
        let w0 = node(&snap, "w0");
        assert_eq!(w0.state, NodeState::Failed);
        assert!(
            fake.names().is_empty(),
            "nothing created: {:?}",
            fake.names()
        );
        w0.error.clone()
    }

    /// A worker that bind-mounts `source` read-only at /root/data.
    fn with_bind(node: &str, source: &str) -> ContainerSpec {
        ContainerSpec {
            mounts: vec![crate::spec::Mount {
                kind: crate::spec::MountKind::Bind,
                source: source.into(),
                target: "/root/data".into(),
                readonly: true,
                ..Default::default()
            }],
            ..spec(node)
        }
    }

    #[tokio::test]
    async fn a_missing_bind_source_fails_the_node_before_anything_is_created() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let s = with_bind("w0", "/srv/geomx/a");
        let error = refused(&rt, &fake, s.clone()).await;
        assert!(
            error.contains("bind mount source /srv/geomx/a does not exist on this host"),
            "{error}"
        );

        // once the path exists, the node is made, with the mount
        fake.lock().paths.insert("/srv/geomx/a".into());
        let report = rt.apply(vec![s]).await.expect("apply");
        assert!(report.errors().next().is_none(), "{report:?}");
        let id = role_id(&fake, "w0");
        let body = fake.lock().containers[&id].body.clone();
        let mounts = body.host_config.and_then(|h| h.mounts).unwrap_or_default();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].source.as_deref(), Some("/srv/geomx/a"));
        assert_eq!(mounts[0].read_only, Some(true));
    }

    #[tokio::test]
    async fn a_bind_source_that_leads_into_etc_is_refused() {
        let fake = FakeEngine::new(&[IMG]);
        {
            let mut st = fake.lock();
            st.paths.insert("/srv/geomx/a".into());
            st.links.insert("/srv/geomx/a".into(), "/etc/ssl".into());
        }
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let s = with_bind("w0", "/srv/geomx/a");
        let error = refused(&rt, &fake, s).await;
        assert!(
            error.starts_with(
                "bind mount source /srv/geomx/a resolves to /etc/ssl, which lies in /etc"
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_oom_killed_container_fails_saying_so() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        wait_for(&rt, "running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        fake.oom_kill(&role_id(&fake, "w0"));
        let s = wait_for(&rt, "failed", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Failed)
        })
        .await;
        let w0 = node(&s, "w0");
        assert_eq!(w0.exit_code, Some(137));
        assert!(w0.error.starts_with("OOM-killed"), "{}", w0.error);
    }

    async fn all_lines(
        rt: &Runtime<FakeEngine>,
        generation: Option<u32>,
    ) -> crate::error::Result<Vec<String>> {
        let mut stream = rt.logs_of("job1", "w0", generation, false, 0).await?;
        let mut lines = Vec::new();
        while let Some(c) = stream.next().await {
            lines.extend(c?.lines);
        }
        Ok(lines)
    }

    #[tokio::test]
    async fn output_outlives_the_container_per_generation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = FakeEngine::new(&[IMG]);
        let cfg = RuntimeConfig {
            log_archive: Some(crate::archive::LogArchive::new(dir.path())),
            ..config()
        };
        let rt = Runtime::start(fake.clone(), cfg).await.expect("start");
        let id = running_w0(&fake, &rt).await;
        fake.print(&id, "generation 0 trains");
        fake.exit(&id, 0);
        // the job ended: its containers are removed, the output stays
        rt.apply(vec![]).await.expect("apply");
        wait_for(&rt, "w0 gone", |s| s.node("job1", "w0").is_none()).await;
        assert_eq!(
            all_lines(&rt, None).await.expect("kept"),
            ["generation 0 trains"]
        );
        // a restarted job: generation 1 runs, generation 0 is still there
        let mut w = spec("w0");
        w.generation = 1;
        rt.apply(vec![w]).await.expect("apply");
        wait_for(&rt, "w0 gen 1 running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running && n.generation == 1)
        })
        .await;
        let id = role_id(&fake, "w0");
        fake.print(&id, "generation 1 trains");
        assert_eq!(
            all_lines(&rt, None).await.expect("live"),
            ["generation 1 trains"]
        );
        assert_eq!(
            all_lines(&rt, Some(0)).await.expect("kept"),
            ["generation 0 trains"]
        );
        assert!(matches!(
            all_lines(&rt, Some(5)).await,
            Err(crate::error::RuntimeError::NoSuchNode { .. })
        ));
    }

    /// Waits (5 s at most) until an answered inspect of `id`, after the first `from`
    /// answers, read `state`.
    async fn answered(
        rx: &mut tokio::sync::watch::Receiver<Inspected>,
        from: usize,
        id: &str,
        state: EngineState,
    ) {
        let found = |v: &Inspected| {
            v.iter()
                .skip(from)
                .any(|(i, s)| i == id && *s == Some(state))
        };
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(found))
            .await
            .unwrap_or_else(|_| panic!("no inspect of {id} read {state:?}"))
            .map(|_| ())
            .unwrap_or_else(|_| panic!("the fake is gone"));
    }

    /// Item 8 of issue 17: two inspections of one container answered out of order (the
    /// one asked first answers last) do not flip its state to the older one. A network
    /// sandbox is the container here: only Docker's events refresh it (a role container's
    /// end is also seen by its output follower). On this current-thread runtime an answer
    /// is applied, or dropped, before the test goes on.
    #[tokio::test]
    async fn an_inspection_answered_late_does_not_flip_the_state_back() {
        let fake = FakeEngine::new(&[IMG]);
        let config = RuntimeConfig {
            resync_interval: Duration::from_secs(3600),
            ..config()
        };
        let rt = Runtime::start(fake.clone(), config).await.expect("start");
        rt.apply(vec![spec("w0")]).await.expect("apply");
        wait_for(&rt, "w0 running", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        let id = fake.id_of("geomx-net.job1.w0").expect("a sandbox");
        let mut inspected = fake.inspected();
        // the sandbox's two inspects so far (after its start, and for its start event)
        let drained = |v: &Inspected| v.iter().filter(|(i, _)| *i == id).count() >= 2;
        tokio::time::timeout(Duration::from_secs(5), inspected.wait_for(drained))
            .await
            .expect("the sandbox inspected twice")
            .expect("the fake");
        // the sandbox ends; the inspect its end triggers reads "exited" and is slow
        let mut hold = fake.hold_next_inspect(&id);
        fake.exit(&id, 137);
        tokio::time::timeout(Duration::from_secs(5), hold.reached())
            .await
            .expect("an inspect after the exit");
        // it runs again (started by someone): that inspect, asked later, answers first
        let from = inspected.borrow_and_update().len();
        Engine::start(&fake, &id).await.expect("start again");
        answered(&mut inspected, from, &id, EngineState::Running).await;
        // now the first one answers "exited": stale, it must not be applied
        let from = inspected.borrow_and_update().len();
        hold.release();
        answered(&mut inspected, from, &id, EngineState::Exited).await;
        let w0 = rt.status("job1", "w0").expect("w0");
        assert_eq!(w0.state, NodeState::Running, "{w0:#?}");
        assert_eq!(w0.error, "", "{w0:#?}");
        rt.shutdown();
    }

    /// Item 3 of issue 17: a scheduler's status carries its rendezvous: the peers
    /// connected to its port while it waits, then what its ps-lite output says.
    #[tokio::test]
    async fn a_scheduler_reports_who_reached_it_and_its_registrations() {
        let fake = FakeEngine::new(&[IMG]);
        let rt = Runtime::start(fake.clone(), config()).await.expect("start");
        let mut sched = spec("a-scheduler");
        sched.role = "scheduler".into();
        sched.env = BTreeMap::from([
            ("DMLC_ROLE".into(), "scheduler".into()),
            ("DMLC_PS_ROOT_PORT".into(), "9094".into()),
        ]);
        rt.apply(vec![sched, spec("w0")]).await.expect("apply");
        let s = wait_for(&rt, "running", |s| {
            s.nodes.len() == 2 && s.nodes.iter().all(|n| n.state == NodeState::Running)
        })
        .await;
        assert_eq!(node(&s, "w0").rendezvous, None, "not a scheduler");
        assert_eq!(
            node(&s, "a-scheduler").rendezvous,
            Some(crate::Rendezvous::default())
        );
        let id = role_id(&fake, "a-scheduler");
        let w = std::net::Ipv4Addr::new(172, 17, 35, 4);
        fake.set_peers(&id, 9094, &[w, w]);
        fake.set_peers(&id, 9999, &[std::net::Ipv4Addr::new(10, 0, 0, 1)]);
        let s = wait_for(&rt, "a connected peer", |s| {
            s.node("job1", "a-scheduler")
                .and_then(|n| n.rendezvous.as_ref())
                .is_some_and(|r| !r.connected.is_empty())
        })
        .await;
        let r = node(&s, "a-scheduler")
            .rendezvous
            .clone()
            .unwrap_or_default();
        assert_eq!(r.connected, ["172.17.35.4"]);
        fake.print(&id, "[09:14:09] src/van.cc:60: assign id=9 to node role=worker, ip=172.17.35.4, port=41877, is_recovery=0");
        fake.print(
            &id,
            "[09:14:09] src/van.cc:85: the scheduler is connected to 1 workers and 0 servers",
        );
        let s = wait_for(&rt, "complete", |s| {
            s.node("job1", "a-scheduler")
                .and_then(|n| n.rendezvous.as_ref())
                .is_some_and(|r| r.complete)
        })
        .await;
        let r = node(&s, "a-scheduler")
            .rendezvous
            .clone()
            .unwrap_or_default();
        assert_eq!(r.registered.len(), 1);
        assert_eq!(r.registered[0].ip, "172.17.35.4");
        rt.shutdown();
    }

    const REG: &str = "10.1.1.253:5000";

    fn pull_config(max_parallel: usize) -> RuntimeConfig {
        RuntimeConfig {
            // the periodic resync is not what creates a pulled node's containers
            resync_interval: Duration::from_secs(3600),
            pulls: crate::pull::PullConfig {
                max_parallel,
                backoff_initial: Duration::from_millis(5),
                backoff_max: Duration::from_millis(20),
                ..Default::default()
            },
            ..config()
        }
    }

    fn pulling(node: &str, image: &str) -> ContainerSpec {
        ContainerSpec {
            image: image.into(),
            image_pull: crate::spec::ImagePull::IfNotPresent,
            ..spec(node)
        }
    }

    fn running(s: &crate::status::Snapshot, nodes: &[&str]) -> bool {
        nodes.iter().all(|n| {
            s.node("job1", n)
                .is_some_and(|n| n.state == NodeState::Running)
        })
    }

    fn failed(s: &crate::status::Snapshot, n: &str) -> bool {
        s.node("job1", n)
            .is_some_and(|n| n.state == NodeState::Failed)
    }

    fn pull_calls(fake: &FakeEngine) -> usize {
        fake.calls()
            .iter()
            .filter(|c| c.starts_with("pull "))
            .count()
    }

    #[tokio::test]
    async fn an_image_only_in_the_registry_is_pulled_then_the_node_starts() {
        let fake = FakeEngine::new(&[]);
        let pinned = fake.push(
            &format!("{REG}/geomx/test:latest"),
            &[("sha256:l1", 1000), ("sha256:l2", 500)],
        );
        let rt = Runtime::start(fake.clone(), pull_config(3))
            .await
            .expect("start");
        let report = rt.apply(vec![pulling("w0", &pinned)]).await.expect("apply");
        assert!(report.errors().next().is_none(), "{report:?}");
        assert!(
            report.is_no_op(),
            "nothing is created before the pull: {report:?}"
        );
        let st = rt.status("job1", "w0").expect("status");
        assert_eq!((st.state, st.error.as_str()), (NodeState::Pending, ""));
        // the pull's end re-applies the desired state at once (the resync is an hour away)
        wait_for(&rt, "w0 running", |s| running(s, &["w0"])).await;
        assert!(fake.names().contains(&"geomx.job1.w0".to_string()));
        let pulls = rt.pulls();
        assert_eq!(pulls.len(), 1, "{pulls:?}");
        let p = &pulls[0];
        assert_eq!(p.state, crate::pull::PullState::Done);
        assert_eq!((p.bytes_done, p.bytes_total), (1500, 1500));
        assert_eq!((p.layers_done, p.layers_total, p.attempt), (2, 2, 1));
        assert_eq!(p.registry, REG);
        let images = rt.images().await.expect("images");
        assert!(images.contains(&pinned), "{images:?}");
        let details = rt.image_details().await.expect("details");
        assert_eq!(details.len(), 1, "{details:?}");
        assert_eq!(details[0].size_bytes, 1500);
        assert_eq!(pull_calls(&fake), 1);
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_pull_failing_for_good_fails_the_node_once_with_its_cause() {
        let fake = FakeEngine::new(&[]);
        let image = format!("{REG}/geomx/test:nope");
        let rt = Runtime::start(fake.clone(), pull_config(3))
            .await
            .expect("start");
        rt.apply(vec![pulling("w0", &image)]).await.expect("apply");
        let s = wait_for(&rt, "w0 failed", |s| failed(s, "w0")).await;
        let err = &node(&s, "w0").error;
        assert!(
            err.starts_with(&format!(
                "pulling image {image} from registry {REG}: not found: manifest for {image} not found"
            )),
            "{err}"
        );
        assert!(fake.ids().is_empty());
        // remembered while the node is desired: no loop of pulls
        let report = rt.apply(vec![pulling("w0", &image)]).await.expect("apply");
        assert!(
            report
                .errors()
                .any(|o| o.error.as_deref() == Some(err.as_str())),
            "{report:?}"
        );
        assert_eq!(pull_calls(&fake), 1);
        // forgotten once no node needs it: a resubmitted job pulls afresh
        rt.apply(vec![]).await.expect("apply");
        fake.push(&image, &[("sha256:l9", 10)]);
        rt.apply(vec![pulling("w0", &image)]).await.expect("apply");
        wait_for(&rt, "w0 running", |s| running(s, &["w0"])).await;
        assert_eq!(pull_calls(&fake), 2);
        rt.shutdown();
    }

    #[tokio::test]
    async fn transient_errors_are_retried_then_the_pull_succeeds() {
        let fake = FakeEngine::new(&[]);
        let pinned = fake.push(&format!("{REG}/geomx/test:latest"), &[("sha256:l1", 100)]);
        fake.fail(
            &format!("pull {pinned}"),
            2,
            &format!("Get \"https://{REG}/v2/\": dial tcp {REG}: connect: connection refused"),
        );
        let rt = Runtime::start(fake.clone(), pull_config(3))
            .await
            .expect("start");
        let mut changes = rt.subscribe_pulls();
        let seen = tokio::spawn({
            let rt = rt.clone();
            async move {
                let mut states = Vec::new();
                while changes.changed().await.is_ok() {
                    for p in rt.pulls() {
                        if states.last() != Some(&(p.state, p.error.clone())) {
                            states.push((p.state, p.error.clone()));
                        }
                    }
                    if rt.pulls().iter().any(|p| p.state.is_ended()) {
                        break;
                    }
                }
                states
            }
        });
        rt.apply(vec![pulling("w0", &pinned)]).await.expect("apply");
        wait_for(&rt, "w0 running", |s| running(s, &["w0"])).await;
        let p = rt.pulls().pop().expect("a pull");
        assert_eq!((p.state, p.attempt), (crate::pull::PullState::Done, 3));
        assert_eq!(pull_calls(&fake), 3);
        let states = seen.await.expect("watcher");
        assert!(
            states
                .iter()
                .any(|(s, e)| *s == crate::pull::PullState::Retrying
                    && e.starts_with("registry unreachable: ")),
            "{states:?}"
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_pull_that_outlasts_its_timeout_fails_the_node() {
        let fake = FakeEngine::new(&[]);
        let pinned = fake.push(&format!("{REG}/geomx/test:latest"), &[("sha256:l1", 100)]);
        fake.hold_pulls(true);
        let rt = Runtime::start(fake.clone(), pull_config(3))
            .await
            .expect("start");
        let spec = ContainerSpec {
            pull_timeout_ms: 50,
            ..pulling("w0", &pinned)
        };
        rt.apply(vec![spec]).await.expect("apply");
        let s = wait_for(&rt, "w0 failed", |s| failed(s, "w0")).await;
        let err = &node(&s, "w0").error;
        assert!(err.contains("timed out after 50ms"), "{err}");
        // the stream was dropped: Docker cancels the pull
        let mut active = fake.pulls_active();
        tokio::time::timeout(Duration::from_secs(5), active.wait_for(|n| *n == 0))
            .await
            .expect("the pull ended")
            .expect("fake");
        rt.shutdown();
    }

    #[tokio::test]
    async fn pulls_honour_the_limit_and_one_pull_serves_every_node_of_an_image() {
        let fake = FakeEngine::new(&[]);
        let images: Vec<String> = (0..4)
            .map(|i| {
                fake.push(
                    &format!("{REG}/geomx/img{i}:latest"),
                    &[(format!("sha256:layer{i}").as_str(), 100)],
                )
            })
            .collect();
        fake.hold_pulls(true);
        let rt = Runtime::start(fake.clone(), pull_config(2))
            .await
            .expect("start");
        let mut specs: Vec<ContainerSpec> = images
            .iter()
            .enumerate()
            .map(|(i, img)| pulling(&format!("w{i}"), img))
            .collect();
        // a second node of the first image
        specs.push(pulling("w4", &images[0]));
        rt.apply(specs).await.expect("apply");
        let mut active = fake.pulls_active();
        tokio::time::timeout(Duration::from_secs(5), active.wait_for(|n| *n == 2))
            .await
            .expect("two pulls stream")
            .expect("fake");
        assert_eq!(rt.pulls().len(), 4, "one pull per image: {:?}", rt.pulls());
        fake.hold_pulls(false);
        wait_for(&rt, "every node running", |s| {
            running(s, &["w0", "w1", "w2", "w3", "w4"])
        })
        .await;
        assert_eq!(fake.lock().pulls_max, 2);
        assert_eq!(pull_calls(&fake), 4, "{:?}", fake.calls());
        rt.shutdown();
    }

    #[tokio::test]
    async fn credentials_come_from_the_auth_file_read_again_for_each_pull() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.json");
        let write = |user_pass: &str| {
            let auth = match user_pass {
                "user:right" => "dXNlcjpyaWdodA==",
                _ => "dXNlcjp3cm9uZw==",
            };
            std::fs::write(
                &file,
                format!(r#"{{"auths": {{"https://{REG}": {{"auth": "{auth}"}}}}}}"#),
            )
            .expect("write");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        };
        write("user:wrong");
        let fake = FakeEngine::new(&[]);
        let pinned = fake.push(&format!("{REG}/geomx/test:latest"), &[("sha256:l1", 100)]);
        fake.require_auth(REG, "user", "right");
        let mut cfg = pull_config(3);
        cfg.pulls.auth_file = Some(file.clone());
        let rt = Runtime::start(fake.clone(), cfg).await.expect("start");
        rt.apply(vec![pulling("w0", &pinned)]).await.expect("apply");
        let s = wait_for(&rt, "w0 failed", |s| failed(s, "w0")).await;
        let err = &node(&s, "w0").error;
        assert!(err.contains(": unauthorized: "), "{err}");
        assert!(!err.contains("right") && !err.contains("wrong"), "{err}");
        // rotated: no restart needed
        write("user:right");
        rt.apply(vec![]).await.expect("apply");
        rt.apply(vec![pulling("w0", &pinned)]).await.expect("apply");
        wait_for(&rt, "w0 running", |s| running(s, &["w0"])).await;
        rt.shutdown();
    }

    #[tokio::test]
    async fn resolving_pins_the_tag_as_the_registry_has_it_now() {
        let fake = FakeEngine::new(&[]);
        let tag = format!("{REG}/geomx/test:latest");
        let first = fake.push(&tag, &[("sha256:l1", 100)]);
        let rt = Runtime::start(fake.clone(), pull_config(3))
            .await
            .expect("start");
        let r = rt.resolve_image(&tag).await.expect("resolve");
        assert_eq!(
            (r.pinned.as_str(), r.registry.as_str()),
            (first.as_str(), REG)
        );
        assert!(first.ends_with(&r.digest));
        // the tag moves
        let second = fake.push(&tag, &[("sha256:l2", 100)]);
        assert_ne!(first, second);
        assert_eq!(
            rt.resolve_image(&tag).await.expect("resolve").pinned,
            second
        );
        // a digest is itself, without asking anything
        let calls = fake.calls().len();
        assert_eq!(
            rt.resolve_image(&first).await.expect("resolve").pinned,
            first
        );
        assert_eq!(fake.calls().len(), calls);
        let nope = format!("{REG}/geomx/test:nope");
        let e = rt.resolve_image(&nope).await.expect_err("missing tag");
        assert!(
            matches!(
                e,
                RuntimeError::ImageUnavailable {
                    cause: crate::pull::PullCause::NotFound,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("image {nope} on registry {REG}: not found (")),
            "{e}"
        );
        fake.fail(
            "resolve",
            1,
            "dial tcp 10.1.1.253:5000: connect: no route to host",
        );
        let e = rt.resolve_image(&tag).await.expect_err("unreachable");
        assert!(e.to_string().contains("registry unreachable"), "{e}");
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_never_pulled_image_fails_as_before_and_pull_image_starts_a_pull() {
        let fake = FakeEngine::new(&[]);
        let pinned = fake.push(&format!("{REG}/geomx/test:latest"), &[("sha256:l1", 100)]);
        let rt = Runtime::start(fake.clone(), pull_config(3))
            .await
            .expect("start");
        let never = ContainerSpec {
            image: pinned.clone(),
            ..spec("w0")
        };
        rt.apply(vec![never]).await.expect("apply");
        let st = rt.status("job1", "w0").expect("status");
        assert_eq!(st.state, NodeState::Failed);
        assert_eq!(
            st.error,
            format!(
                "image {pinned} is not present on this host and the job's image_pull is \"never\""
            )
        );
        assert_eq!(pull_calls(&fake), 0);
        assert!(rt.pull_image(&pinned, None).await.expect("pull"));
        let mut changes = rt.subscribe_pulls();
        tokio::time::timeout(
            Duration::from_secs(5),
            changes.wait_for(|_| rt.pulls().iter().any(|p| p.state.is_ended())),
        )
        .await
        .expect("pulled")
        .expect("pulls");
        assert!(
            !rt.pull_image(&pinned, None).await.expect("pull"),
            "present now"
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn images_are_pulled_before_the_gang_start_and_ended_pulls_are_listed_for_a_while() {
        let fake = FakeEngine::new(&[]);
        let pinned = fake.push(&format!("{REG}/geomx/test:latest"), &[("sha256:l1", 100)]);
        let mut cfg = pull_config(3);
        cfg.pulls.keep_ended = Duration::ZERO;
        let rt = Runtime::start(fake.clone(), cfg).await.expect("start");
        // a host-network node that does not start yet: nothing to create, but its image
        // comes now
        let waiting = ContainerSpec {
            host_network: true,
            start: false,
            ..pulling("w0", &pinned)
        };
        rt.apply(vec![waiting.clone()]).await.expect("apply");
        let mut changes = rt.subscribe_pulls();
        tokio::time::timeout(
            Duration::from_secs(5),
            changes.wait_for(|_| fake.lock().images.contains(&pinned)),
        )
        .await
        .expect("pulled")
        .expect("pulls");
        assert!(fake.ids().is_empty(), "{:?}", fake.names());
        // (kept for no time here: an ended pull is no longer listed)
        assert!(rt.pulls().is_empty(), "{:?}", rt.pulls());
        let report = rt
            .apply(vec![ContainerSpec {
                start: true,
                ..waiting
            }])
            .await
            .expect("apply");
        assert!(report.errors().next().is_none(), "{report:?}");
        wait_for(&rt, "w0 running", |s| running(s, &["w0"])).await;
        assert_eq!(pull_calls(&fake), 1);
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_remembered_failure_outlives_its_listing_while_the_node_is_desired() {
        let fake = FakeEngine::new(&[]);
        let image = format!("{REG}/geomx/test:nope");
        let mut cfg = pull_config(3);
        cfg.pulls.keep_ended = Duration::ZERO;
        let rt = Runtime::start(fake.clone(), cfg).await.expect("start");
        rt.apply(vec![pulling("w0", &image)]).await.expect("apply");
        wait_for(&rt, "w0 failed", |s| failed(s, "w0")).await;
        assert!(rt.pulls().is_empty());
        let report = rt.apply(vec![pulling("w0", &image)]).await.expect("apply");
        assert!(report.errors().next().is_some(), "{report:?}");
        assert_eq!(pull_calls(&fake), 1, "{:?}", fake.calls());
        rt.shutdown();
    }

    fn keyed() -> RuntimeConfig {
        RuntimeConfig {
            heartbeat_key: Some(crate::auth::HeartbeatKey::from_bytes(&[9; 32])),
            controller_id: Some("ctl".into()),
            ..config()
        }
    }

    fn beat(node: &str, step: u64) -> HeartbeatReport {
        HeartbeatReport {
            job: Some("job1".into()),
            node: Some(node.into()),
            step: Some(step),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn heartbeats_need_the_containers_own_token_and_on_docker0_its_address() {
        let fake = FakeEngine::new(&[IMG]);
        let cfg = keyed();
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("start");
        let mut host = spec("h0");
        host.host_network = true;
        rt.apply(vec![spec("w0"), spec("w1"), host.clone()])
            .await
            .expect("apply");
        let s = wait_for(&rt, "running", |s| {
            s.nodes.len() == 3 && s.nodes.iter().all(|n| n.state == NodeState::Running)
        })
        .await;
        let token = |node: &str| {
            fake.env_var(
                &format!("geomx.job1.{node}"),
                crate::auth::ENV_HEARTBEAT_TOKEN,
            )
            .unwrap_or_else(|| panic!("no token in the env of {node}"))
        };
        let (t0, t1, th) = (token("w0"), token("w1"), token("h0"));
        assert_eq!(t0.len(), 64);
        assert!(t0 != t1 && t0 != th, "every container has its own token");
        let ip = |n: &str| -> IpAddr { node(&s, n).ip.parse().expect("ip") };
        let (ip0, ip1) = (ip("w0"), ip("w1"));
        let refused = |r: Result<crate::heartbeat::Recorded, HeartbeatError>| match r {
            Err(e) => e,
            Ok(r) => panic!("taken: {r:?}"),
        };
        // no token, another container's token, the right token from another address
        assert!(matches!(
            refused(rt.record_heartbeat(&beat("w0", 1), ip0, None)),
            HeartbeatError::NoToken { .. }
        ));
        assert!(matches!(
            refused(rt.record_heartbeat(&beat("w0", 1), ip0, Some(&t1))),
            HeartbeatError::BadToken { .. }
        ));
        assert!(matches!(
            refused(rt.record_heartbeat(&beat("w0", 1), ip1, Some(&t0))),
            HeartbeatError::WrongPeer { .. }
        ));
        assert!(rt.status("job1", "w0").and_then(|s| s.progress).is_none());
        // its own token from its own address
        let r = rt
            .record_heartbeat(&beat("w0", 5), ip0, Some(&t0))
            .expect("own");
        assert_eq!(r.key, ("job1".to_string(), "w0".to_string()));
        // a host-network node shares the host's address: its token tells it apart, also
        // without job and node
        let host_ip: IpAddr = "10.1.1.34".parse().expect("ip");
        assert!(matches!(
            refused(rt.record_heartbeat(&beat("h0", 1), host_ip, Some(&t0))),
            HeartbeatError::BadToken { .. }
        ));
        rt.record_heartbeat(&beat("h0", 2), host_ip, Some(&th))
            .expect("host node");
        let anon = HeartbeatReport {
            step: Some(3),
            ..Default::default()
        };
        assert_eq!(
            rt.record_heartbeat(&anon, host_ip, Some(&th))
                .expect("by token")
                .key
                .1,
            "h0"
        );
        let c = rt.heartbeat_stats();
        assert_eq!(
            (
                c.accepted,
                c.refused["no_token"],
                c.refused["bad_token"],
                c.refused["wrong_address"]
            ),
            (3, 1, 2, 1),
            "{c}"
        );
        // the spec hash is the token-less one: a restarted agent (same key, same record)
        // derives the same tokens and changes nothing
        rt.shutdown();
        drop(rt);
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("restart");
        let report = rt
            .apply(vec![spec("w0"), spec("w1"), host.clone()])
            .await
            .expect("apply");
        assert!(report.is_no_op(), "{report:?}");
        wait_for(&rt, "adopted", |s| {
            s.nodes
                .iter()
                .filter(|n| n.state == NodeState::Running)
                .count()
                == 3
        })
        .await;
        rt.record_heartbeat(&beat("w0", 6), ip0, Some(&t0))
            .expect("own token after a restart");
        assert!(rt.record_heartbeat(&beat("w0", 7), ip0, Some(&t1)).is_err());
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_committed_copy_run_by_hand_is_neither_adopted_nor_removed() {
        let fake = FakeEngine::new(&[IMG]);
        let cfg = keyed();
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("start");
        let id = running_w0(&fake, &rt).await;
        let token = fake
            .env_var("geomx.job1.w0", crate::auth::ENV_HEARTBEAT_TOKEN)
            .expect("token");
        // `docker commit` + `docker run --name evil`: the copy has every label of the node
        let copy = fake.commit_and_run(&id, "evil").expect("copy");
        {
            let st = fake.lock();
            assert_eq!(st.containers[&copy].labels, st.containers[&id].labels);
        }
        for _ in 0..3 {
            let report = rt.apply(vec![spec("w0")]).await.expect("apply");
            assert!(report.is_no_op(), "{report:?}");
        }
        // a resync too
        tokio::time::sleep(cfg.resync_interval * 2).await;
        assert!(fake.ids().contains(&copy), "the copy was removed");
        assert_eq!(role_id(&fake, "w0"), id);
        let s = rt.snapshot();
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(node(&s, "w0").container_id, id, "the copy is not the node");
        // the copy's stolen token does not work from its own address
        let copy_ip: IpAddr = fake.lock().containers[&copy].ip.parse().expect("ip");
        assert!(matches!(
            rt.record_heartbeat(&beat("w0", 9), copy_ip, Some(&token)),
            Err(HeartbeatError::WrongPeer { .. })
        ));
        // an agent restart adopts its own container only
        rt.shutdown();
        drop(rt);
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("restart");
        let s = wait_for(&rt, "adopted", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        assert_eq!(node(&s, "w0").container_id, id);
        // (resyncs before any desired state adopt nothing else either)
        tokio::time::sleep(cfg.resync_interval * 2).await;
        let s = rt.snapshot();
        assert_eq!(s.nodes.len(), 1, "{s:#?}");
        assert_eq!(node(&s, "w0").container_id, id);
        assert!(rt.apply(vec![spec("w0")]).await.expect("apply").is_no_op());
        // the job ends: the agent removes what it made, the copy stays
        let report = rt.apply(vec![]).await.expect("apply");
        assert_eq!(report.changes().count(), 2, "{report:?}");
        assert_eq!(fake.ids(), vec![copy.clone()]);
        // the original gone, a copy under its very name is not it either
        let again = fake.commit_and_run(&copy, "geomx.job1.w0").expect("copy 2");
        let report = rt.apply(vec![spec("w0")]).await.expect("apply");
        assert!(
            !report.outcomes.iter().any(
                |o| matches!(&o.action, Action::Remove { id, .. } if *id == again || *id == copy)
            ),
            "{report:?}"
        );
        assert!(fake.ids().contains(&again) && fake.ids().contains(&copy));
        assert_ne!(
            rt.status("job1", "w0").map(|s| s.container_id),
            Some(again.clone())
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn an_upgraded_agent_adopts_the_containers_of_its_controller_once() {
        let fake = FakeEngine::new(&[IMG]);
        // containers made by an agent version before creation records and tokens
        let mut w0 = spec("w0");
        w0.host_network = true;
        let cfg = keyed();
        let legacy = fake
            .create(
                &w0.container_name(),
                w0.create_body(&cfg.agent_url, &cfg.sandbox, None),
            )
            .await
            .expect("create");
        fake.start(&legacy).await.expect("start");
        let mut old = spec("x0");
        old.host_network = true;
        old.controller_id = "an-old-cluster".into();
        let other = fake
            .create(
                &old.container_name(),
                old.create_body(&cfg.agent_url, &cfg.sandbox, None),
            )
            .await
            .expect("create");
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("start");
        let s = wait_for(&rt, "adopted", |s| {
            s.node("job1", "w0")
                .is_some_and(|n| n.state == NodeState::Running)
        })
        .await;
        assert_eq!(s.nodes.len(), 1, "only this controller's: {s:#?}");
        let calls = fake.calls().len();
        assert!(rt.apply(vec![w0.clone()]).await.expect("apply").is_no_op());
        assert_eq!(fake.calls().len(), calls, "nothing restarted");
        // no token in its env: checked as before (host network: by the names)
        rt.record_heartbeat(&beat("w0", 1), "10.1.1.34".parse().expect("ip"), None)
            .expect("a legacy container's heartbeat");
        // once recorded, a labelled container appearing later is not adopted
        let mut late = spec("w9");
        late.host_network = true;
        let stranger = fake
            .create(
                &late.container_name(),
                late.create_body(&cfg.agent_url, &cfg.sandbox, None),
            )
            .await
            .expect("create");
        rt.shutdown();
        drop(rt);
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("restart");
        assert!(rt.status("job1", "w9").is_none());
        assert!(rt.status("job1", "w0").is_some());
        rt.apply(vec![]).await.expect("apply");
        assert_eq!(
            fake.ids().into_iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([other, stranger]),
            "only the adopted one removed"
        );
        rt.shutdown();
    }

    #[tokio::test]
    async fn a_creation_whose_record_was_lost_is_recovered_by_its_nonce() {
        let fake = FakeEngine::new(&[IMG]);
        let cfg = keyed();
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("start");
        let mut w0 = spec("w0");
        w0.host_network = true;
        // the agent recorded the pending creation and died before recording the id
        let nonce = crate::auth::nonce().expect("nonce");
        cfg.records
            .begin(
                &nonce,
                crate::ownership::Created {
                    name: w0.container_name(),
                    kind: "role".into(),
                    job: "job1".into(),
                    node: "w0".into(),
                    controller: "ctl".into(),
                    token: true,
                    ..Default::default()
                },
            )
            .expect("begin");
        let mut body = w0.create_body(&cfg.agent_url, &cfg.sandbox, None);
        crate::spec::stamp_creation(&mut body, &nonce, None);
        let id = fake
            .create(&w0.container_name(), body)
            .await
            .expect("create");
        rt.shutdown();
        drop(rt);
        let rt = Runtime::start(fake.clone(), cfg.clone())
            .await
            .expect("restart");
        assert_eq!(
            rt.status("job1", "w0").map(|s| s.container_id),
            Some(id.clone())
        );
        assert!(cfg.records.ids().contains(&id));
        let report = rt.apply(vec![w0]).await.expect("apply");
        assert!(
            matches!(&report.outcomes[..], [o] if matches!(o.action, Action::Start { .. })),
            "{report:?}"
        );
        rt.shutdown();
    }
}
