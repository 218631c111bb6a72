//! An in-memory Docker engine for the daemon's tests (the runtime's own fake is private to
//! its crate): containers with states, addresses, output and events; images; a switch
//! that makes it unreachable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use futures::StreamExt;
use futures::stream::BoxStream;
use geomx_runtime::engine::{
    ActualContainer, EngineEvent, EngineState, Inspection, LogFrame, LogRequest,
};
use geomx_runtime::spec::LABEL_MANAGED;
use geomx_runtime::{Engine, RuntimeError, SandboxConfig};
use tokio::sync::broadcast;

use super::docker::EngineSource;

#[derive(Clone, Debug)]
pub struct FakeContainer {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    pub state: EngineState,
    pub exit_code: i64,
    pub ip: String,
    pub host_network: bool,
    pub logs: Vec<String>,
    pub env: Vec<String>,
}

#[derive(Default)]
pub struct FakeState {
    pub containers: BTreeMap<String, FakeContainer>,
    pub images: BTreeSet<String>,
    pub next: u64,
    /// Every mutating call ("create NAME", "start ID", "stop ID", "remove ID").
    pub calls: Vec<String>,
}

#[derive(Clone)]
pub struct FakeEngine {
    pub state: Arc<Mutex<FakeState>>,
    down: Arc<AtomicBool>,
    events: broadcast::Sender<EngineEvent>,
}

impl FakeEngine {
    pub fn new(images: &[&str]) -> FakeEngine {
        let (events, _) = broadcast::channel(1024);
        FakeEngine {
            state: Arc::new(Mutex::new(FakeState {
                images: images.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })),
            down: Arc::new(AtomicBool::new(false)),
            events,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Docker does not answer while `down`.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), RuntimeError> {
        if self.down.load(Ordering::SeqCst) {
            Err(RuntimeError::Io {
                what: "fake docker".into(),
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down"),
            })
        } else {
            Ok(())
        }
    }

    fn emit(&self, id: &str, action: &str) {
        let _ = self.events.send(EngineEvent {
            id: id.to_string(),
            action: action.to_string(),
        });
    }

    pub fn id_of(&self, name: &str) -> Option<String> {
        self.lock()
            .containers
            .values()
            .find(|c| c.name == name)
            .map(|c| c.id.clone())
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

    pub fn print(&self, id: &str, line: &str) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.logs.push(format!("{line}\n"));
        }
    }

    pub fn exit(&self, id: &str, code: i64) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.state = EngineState::Exited;
            c.exit_code = code;
        }
        self.emit(id, "die");
    }

    pub fn env_of(&self, name: &str) -> Vec<String> {
        self.lock()
            .containers
            .values()
            .find(|c| c.name == name)
            .map(|c| c.env.clone())
            .unwrap_or_default()
    }
}

impl Engine for FakeEngine {
    async fn list_managed(&self) -> Result<Vec<ActualContainer>, RuntimeError> {
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

    async fn inspect(&self, id: &str) -> Result<Option<Inspection>, RuntimeError> {
        self.check()?;
        let st = self.lock();
        Ok(st
            .containers
            .values()
            .find(|c| c.id == id || c.name == id)
            .map(|c| Inspection {
                id: c.id.clone(),
                name: c.name.clone(),
                labels: c.labels.clone(),
                state: c.state,
                exit_code: Some(c.exit_code),
                error: String::new(),
                oom_killed: false,
                ip: (c.state == EngineState::Running && !c.ip.is_empty()).then(|| c.ip.clone()),
                host_network: c.host_network,
                started_at_ms: 1,
                finished_at_ms: if c.state == EngineState::Exited { 2 } else { 0 },
                restart_count: 0,
            }))
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.check()?;
        Ok(self.lock().images.contains(image))
    }

    async fn images(&self) -> Result<Vec<String>, RuntimeError> {
        self.check()?;
        Ok(self.lock().images.iter().cloned().collect())
    }

    async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String, RuntimeError> {
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
        st.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                name: name.to_string(),
                labels: body.labels.clone().unwrap_or_default(),
                state: EngineState::Created,
                exit_code: 0,
                ip: if mode == "bridge" {
                    format!("172.17.9.{}", n + 1)
                } else {
                    String::new()
                },
                host_network: mode == "host",
                logs: Vec::new(),
                env: body.env.clone().unwrap_or_default(),
            },
        );
        drop(st);
        self.emit(&id, "create");
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.check()?;
        {
            let mut st = self.lock();
            st.calls.push(format!("start {id}"));
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| RuntimeError::NoSuchNode {
                    job: String::new(),
                    node: id.to_string(),
                })?;
            c.state = EngineState::Running;
        }
        self.emit(id, "start");
        Ok(())
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        self.check()?;
        let was_running = {
            let mut st = self.lock();
            st.calls.push(format!("stop {id}"));
            match st.containers.get_mut(id) {
                Some(c) if c.state == EngineState::Running => {
                    c.state = EngineState::Exited;
                    c.exit_code = 143;
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

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
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

    fn logs(
        &self,
        id: &str,
        req: LogRequest,
    ) -> BoxStream<'static, Result<LogFrame, RuntimeError>> {
        let me = self.clone();
        let id = id.to_string();
        let find = |me: &FakeEngine, id: &str| me.lock().containers.get(id).cloned();
        if !req.follow {
            let lines = find(&me, &id).map(|c| c.logs).unwrap_or_default();
            let skip = req
                .tail
                .map_or(0, |n| lines.len().saturating_sub(n as usize));
            return futures::stream::iter(lines.into_iter().skip(skip).map(|l| {
                Ok(LogFrame {
                    stderr: false,
                    data: l.into_bytes(),
                })
            }))
            .boxed();
        }
        futures::stream::unfold(0usize, move |next| {
            let me = me.clone();
            let id = id.clone();
            async move {
                loop {
                    let c = find(&me, &id)?;
                    if let Some(l) = c.logs.get(next) {
                        let frame = LogFrame {
                            stderr: false,
                            data: l.clone().into_bytes(),
                        };
                        return Some((Ok(frame), next + 1));
                    }
                    if c.state != EngineState::Running && c.state != EngineState::Created {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
        .boxed()
    }

    fn events(&self) -> BoxStream<'static, Result<EngineEvent, RuntimeError>> {
        let rx = self.events.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((Ok(ev), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }
}

/// An [`EngineSource`] handing out clones of one fake engine (the sandboxes use the default
/// shell loop in the job's image).
#[derive(Clone)]
pub struct FakeSource(pub FakeEngine);

impl EngineSource for FakeSource {
    type Engine = FakeEngine;

    async fn connect(&self) -> Result<FakeEngine, String> {
        self.0.check().map_err(|e| e.to_string())?;
        Ok(self.0.clone())
    }

    async fn sandbox(&self, _engine: &FakeEngine) -> Result<SandboxConfig, String> {
        Ok(SandboxConfig::default())
    }
}
