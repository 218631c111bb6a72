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

use crate::engine::{
    ActualContainer, Engine, EngineEvent, EngineState, Inspection, LogFrame, LogRequest,
};
use crate::error::{Result, RuntimeError};
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
        }
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

    async fn images(&self) -> Result<Vec<String>> {
        self.check()?;
        Ok(self.lock().images.iter().cloned().collect())
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
        rt.record_heartbeat(&hb, own).expect("heartbeat");
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
        let forged = rt.record_heartbeat(&hb, other);
        assert!(
            matches!(forged, Err(HeartbeatError::WrongPeer { .. })),
            "{forged:?}"
        );
        assert!(rt.status("job1", "w0").and_then(|s| s.progress).is_none());
        assert_eq!(
            rt.record_heartbeat(&hb, ip).expect("named"),
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
        assert!(rt.record_heartbeat(&anon, ip).is_ok());
        assert!(matches!(
            rt.record_heartbeat(&anon, other),
            Err(HeartbeatError::UnknownPeer(_))
        ));
        let stranger = HeartbeatReport {
            job: Some("job1".into()),
            node: Some("nope".into()),
            step: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            rt.record_heartbeat(&stranger, ip),
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
}
