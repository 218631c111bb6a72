//! Executing a plan: removing, creating and starting sandboxes and role containers.

use super::*;

type Step<'a> = Pin<Box<dyn Future<Output = (usize, Result<()>)> + Send + 'a>>;

impl<E: Engine> Runtime<E> {
    /// Executes a plan in phases: role containers go, then sandboxes go, then sandboxes
    /// come (their addresses are needed), then role containers come. Returns one error
    /// slot per action.
    pub(super) async fn execute(&self, plan: &[Action]) -> Vec<Option<String>> {
        let mut errors: Vec<Option<String>> = vec![None; plan.len()];
        let mut phases: [Vec<Step<'_>>; 4] = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        {
            let mut st = self.lock();
            for (i, action) in plan.iter().enumerate() {
                match action {
                    Action::Remove {
                        kind,
                        id,
                        name,
                        key,
                        reason,
                    } => {
                        info!(
                            job = key.as_ref().map_or("", |k| k.0.as_str()),
                            node = key.as_ref().map_or("", |k| k.1.as_str()),
                            id = %short(id), %name, ?reason, "removing a container"
                        );
                        if let Some(k) = key {
                            detach(&mut st, k, *kind, id);
                        }
                        st.start_attempted.remove(id);
                        let phase = if *kind == ContainerKind::Role { 0 } else { 1 };
                        phases[phase].push(Box::pin(self.remove_step(i, *kind, id)));
                    }
                    Action::Replace {
                        kind, old_id, spec, ..
                    } => {
                        info!(job = %spec.job, node = %spec.node, kind = kind.as_str(), old = %short(old_id), "replacing a container whose spec changed");
                        let t = st
                            .nodes
                            .entry(spec.key())
                            .or_insert_with(|| Tracked::for_spec(spec));
                        // detach the old container first: its die/destroy events must not
                        // be taken for the new one's
                        match kind {
                            ContainerKind::Role => t.reset_role(spec),
                            ContainerKind::Sandbox => {
                                t.sandbox = None;
                                t.status.ip.clear();
                            }
                        }
                        st.start_attempted.remove(old_id);
                        let phase = if *kind == ContainerKind::Role { 0 } else { 1 };
                        phases[phase].push(Box::pin(self.remove_step(i, *kind, old_id)));
                    }
                    Action::Missing { kind, spec } => {
                        if let Some(t) = st.nodes.get_mut(&spec.key()) {
                            mark_missing(t, *kind);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.publish();
        for (i, action) in plan.iter().enumerate() {
            match action {
                Action::Create {
                    kind: ContainerKind::Sandbox,
                    spec,
                    hash,
                }
                | Action::Replace {
                    kind: ContainerKind::Sandbox,
                    spec,
                    hash,
                    ..
                } => phases[2].push(Box::pin(self.create_step(
                    i,
                    ContainerKind::Sandbox,
                    spec,
                    hash,
                ))),
                Action::Create {
                    kind: ContainerKind::Role,
                    spec,
                    hash,
                }
                | Action::Replace {
                    kind: ContainerKind::Role,
                    spec,
                    hash,
                    ..
                } => phases[3].push(Box::pin(self.create_step(
                    i,
                    ContainerKind::Role,
                    spec,
                    hash,
                ))),
                Action::Start { kind, id, key } => {
                    let phase = if *kind == ContainerKind::Role { 3 } else { 2 };
                    phases[phase].push(Box::pin(self.start_step(i, *kind, id, key)));
                }
                Action::Keep {
                    kind: ContainerKind::Role,
                    id,
                    key,
                } => self.ensure_follower(key, id, false),
                _ => {}
            }
        }
        for phase in phases {
            for (i, r) in futures::future::join_all(phase).await {
                if let Err(e) = r
                    && errors[i].is_none()
                {
                    errors[i] = Some(e.to_string());
                }
            }
        }
        errors
    }

    pub(super) async fn remove_step(
        &self,
        i: usize,
        kind: ContainerKind,
        id: &str,
    ) -> (usize, Result<()>) {
        let engine = &self.inner.engine;
        let r = match kind {
            ContainerKind::Role => {
                if let Err(e) = engine.stop(id, self.inner.config.stop_timeout).await {
                    warn!(id = %short(id), error = %e, "stop failed; removing by force");
                }
                self.archive_logs(id).await;
                engine.remove(id).await
            }
            // nothing runs in a sandbox: no need to wait for it
            ContainerKind::Sandbox => engine.remove(id).await,
        };
        if r.is_ok() {
            self.inner.config.records.forget(id);
        }
        (i, r)
    }

    /// Creates a container the agent owns: records the creation as pending (its nonce,
    /// also label `io.geomx.creation`), creates, records the id (see
    /// [`crate::ownership`]). A role container gets its heartbeat token in its env when
    /// the agent has a key; returns the id and the token.
    async fn create_recorded(
        &self,
        kind: ContainerKind,
        spec: &ContainerSpec,
        name: &str,
        mut body: bollard::models::ContainerCreateBody,
    ) -> Result<(String, Option<Token>)> {
        let config = &self.inner.config;
        let nonce = crate::auth::nonce()?;
        let entry = Created {
            name: name.to_string(),
            kind: kind.as_str().to_string(),
            job: spec.job.clone(),
            node: spec.node.clone(),
            controller: spec.controller_id.clone(),
            generation: spec.generation,
            nonce: nonce.clone(),
            token: kind == ContainerKind::Role && config.heartbeat_key.is_some(),
            since_ms: 0,
        };
        let token = self.token_of(&entry);
        config.records.begin(&nonce, entry)?;
        crate::spec::stamp_creation(
            &mut body,
            &nonce,
            token.as_ref().map(Token::to_hex).as_deref(),
        );
        match self.inner.engine.create(name, body).await {
            Ok(id) => {
                config.records.created(&nonce, &id);
                Ok((id, token))
            }
            Err(e) => {
                // Docker may have created it all the same when its answer was lost: the
                // pending entry then finds it at the next listing
                if !e.is_transient() {
                    config.records.abandon(&nonce);
                }
                Err(e)
            }
        }
    }

    pub(super) async fn create_step(
        &self,
        i: usize,
        kind: ContainerKind,
        spec: &ContainerSpec,
        hash: &str,
    ) -> (usize, Result<()>) {
        let span = info_span!("create", job = %spec.job, node = %spec.node, kind = kind.as_str());
        let r = match kind {
            ContainerKind::Sandbox => self.create_sandbox(spec, hash).instrument(span).await,
            ContainerKind::Role => self.create_role(spec, hash).instrument(span).await,
        };
        (i, r)
    }

    pub(super) async fn start_step(
        &self,
        i: usize,
        kind: ContainerKind,
        id: &str,
        key: &NodeKey,
    ) -> (usize, Result<()>) {
        let span = info_span!("start", job = %key.0, node = %key.1, kind = kind.as_str());
        let r = async {
            self.lock().start_attempted.insert(id.to_string());
            info!(id = %short(id), "starting an adopted container that was never started");
            let r = self.inner.engine.start(id).await;
            match &r {
                Err(e) => self.set_failed(key, None, format!("starting {}: {e}", kind.as_str())),
                Ok(()) if kind == ContainerKind::Role => {
                    self.inner.config.counters.container_started();
                    self.ensure_follower(key, id, false);
                }
                Ok(()) => {}
            }
            self.refresh(id).await;
            r
        }
        .instrument(span)
        .await;
        (i, r)
    }

    /// Checks the image; on failure marks the node.
    pub(super) async fn check_image(&self, key: &NodeKey, image: &str) -> Result<()> {
        match self.inner.engine.image_present(image).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                let e = RuntimeError::ImageMissing {
                    image: image.to_string(),
                };
                warn!(error = %e, "cannot create the container");
                self.set_failed(key, None, e.to_string());
                Err(e)
            }
            Err(e) => {
                self.set_pending_error(key, e.to_string());
                Err(e)
            }
        }
    }

    pub(super) async fn create_sandbox(&self, spec: &ContainerSpec, hash: &str) -> Result<()> {
        let key = spec.key();
        let sandbox = &self.inner.config.sandbox;
        self.check_image(&key, spec.sandbox_image(sandbox)).await?;
        let name = spec.sandbox_name();
        let id = match self
            .create_recorded(
                ContainerKind::Sandbox,
                spec,
                &name,
                spec.sandbox_body(sandbox),
            )
            .await
        {
            Ok((id, _)) => id,
            Err(e) => {
                warn!(error = %e, "creating the network sandbox failed");
                self.create_failed(&key, &e, "creating the network sandbox");
                return Err(e);
            }
        };
        {
            let mut st = self.lock();
            st.seen.insert(
                (key.0.clone(), key.1.clone(), ContainerKind::Sandbox),
                hash.to_string(),
            );
            st.start_attempted.insert(id.clone());
            if let Some(t) = st.nodes.get_mut(&key) {
                t.sandbox = Some(SandboxStatus {
                    id: id.clone(),
                    name: name.clone(),
                    state: EngineState::Created,
                });
            }
        }
        if let Err(e) = self.inner.engine.start(&id).await {
            warn!(error = %e, "starting the network sandbox failed");
            self.set_failed(&key, None, format!("starting the network sandbox: {e}"));
            return Err(e);
        }
        info!(id = %short(&id), %name, "network sandbox started");
        self.refresh(&id).await;
        Ok(())
    }

    pub(super) async fn create_role(&self, spec: &ContainerSpec, hash: &str) -> Result<()> {
        let key = spec.key();
        let sandbox_id = {
            let mut st = self.lock();
            let t = st
                .nodes
                .entry(key.clone())
                .or_insert_with(|| Tracked::for_spec(spec));
            let sandbox_id = t
                .sandbox
                .as_ref()
                .filter(|s| s.state == EngineState::Running)
                .map(|s| s.id.clone());
            if spec.has_sandbox() && sandbox_id.is_none() {
                let e = RuntimeError::Refused {
                    what: format!("starting {}", spec.container_name()),
                    message: "its network sandbox is not running".into(),
                };
                if t.status.state != NodeState::Failed {
                    t.status.state = NodeState::Failed;
                    t.status.error = e.to_string();
                }
                return Err(e);
            }
            t.reset_role(spec);
            sandbox_id
        };
        self.check_image(&key, &spec.image).await?;
        let name = spec.container_name();
        let config = &self.inner.config;
        let body = spec.create_body(&config.agent_url, &config.sandbox, sandbox_id.as_deref());
        let (id, token) = match self
            .create_recorded(ContainerKind::Role, spec, &name, body)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "create failed");
                self.create_failed(&key, &e, "creating the container");
                return Err(e);
            }
        };
        {
            let mut st = self.lock();
            st.seen.insert(
                (key.0.clone(), key.1.clone(), ContainerKind::Role),
                hash.to_string(),
            );
            st.start_attempted.insert(id.clone());
            if let Some(t) = st.nodes.get_mut(&key) {
                t.status.container_id = id.clone();
                t.status.state = NodeState::Created;
                t.auth = token;
            }
        }
        // follow before starting, so that no early line is missed
        self.ensure_follower(&key, &id, false);
        if let Err(e) = self.inner.engine.start(&id).await {
            warn!(error = %e, "start failed");
            self.set_failed(&key, Some(&id), e.to_string());
            self.refresh(&id).await;
            return Err(e);
        }
        self.inner.config.counters.container_started();
        info!(id = %short(&id), %name, image = %spec.image, "started");
        self.refresh(&id).await;
        Ok(())
    }

    pub(super) fn create_failed(&self, key: &NodeKey, e: &RuntimeError, what: &str) {
        if e.is_transient() {
            self.set_pending_error(key, format!("{what}: {e}"));
        } else {
            self.set_failed(key, None, e.to_string());
        }
    }

    pub(super) fn set_failed(&self, key: &NodeKey, id: Option<&str>, error: String) {
        let mut st = self.lock();
        if let Some(t) = st.nodes.get_mut(key)
            && id.is_none_or(|id| t.status.container_id == id)
        {
            t.status.state = NodeState::Failed;
            t.status.error = error;
        }
    }

    pub(super) fn set_pending_error(&self, key: &NodeKey, error: String) {
        let mut st = self.lock();
        if let Some(t) = st.nodes.get_mut(key) {
            t.status.state = NodeState::Pending;
            t.status.error = error;
        }
    }
}

/// Before removing container `id` of `key`: forget it (so that its events are not taken
/// for anything else); forget the node when it is no longer desired.
pub(super) fn detach(st: &mut State, key: &NodeKey, kind: ContainerKind, id: &str) {
    let desired = st.is_desired(key);
    let desired_spec = st.desired.as_ref().and_then(|d| d.get(key)).cloned();
    let still_wanted = match (&desired_spec, kind) {
        (Some(s), ContainerKind::Role) => s.start,
        (Some(s), ContainerKind::Sandbox) => s.has_sandbox(),
        (None, _) => false,
    };
    if !still_wanted {
        st.seen.remove(&(key.0.clone(), key.1.clone(), kind));
    }
    if !desired {
        st.nodes.remove(key);
        return;
    }
    let Some(t) = st.nodes.get_mut(key) else {
        return;
    };
    match kind {
        ContainerKind::Role if t.status.container_id == id => match &desired_spec {
            Some(spec) => t.reset_role(spec),
            None => t.status.container_id.clear(),
        },
        ContainerKind::Sandbox if t.sandbox.as_ref().is_some_and(|s| s.id == id) => {
            t.sandbox = None;
            t.status.ip.clear();
        }
        _ => {}
    }
}
