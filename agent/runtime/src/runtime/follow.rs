//! Following a role container's output for progress, and its log tail once it ended.

use super::*;

impl<E: Engine> Runtime<E> {
    /// Starts following the output of role container `id` of node `key` unless that is
    /// being done (or was done to the end, unless `restart_finished`: it runs again).
    pub(super) fn ensure_follower(&self, key: &NodeKey, id: &str, restart_finished: bool) {
        let mut st = self.lock();
        let Some(t) = st.nodes.get_mut(key) else {
            return;
        };
        if t.status.container_id != id {
            return;
        }
        if t.follower.is_some() && !(restart_finished && t.follow_done) {
            return;
        }
        t.follow_done = false;
        let weak = Arc::downgrade(&self.inner);
        let cancel = self.inner.cancel.clone();
        let stream = self.inner.engine.logs(
            id,
            LogRequest {
                follow: true,
                tail: None,
                timestamps: true,
            },
        );
        let span = info_span!("follow", job = %key.0, node = %key.1);
        let task = tokio::spawn(
            follow(weak, cancel, key.clone(), id.to_string(), stream).instrument(span),
        );
        t.follower = Some(AbortOnDrop(task));
    }

    pub(super) fn on_line(&self, key: &NodeKey, id: &str, line: &str) {
        let (at, text) = split_timestamp(line);
        let changed = {
            let mut st = self.lock();
            match st.nodes.get_mut(key) {
                Some(t) if t.status.container_id == id => {
                    let mut changed = t.tracker.observe(text, at.unwrap_or_else(now_ms));
                    if changed {
                        t.status.progress = t.tracker.progress().cloned();
                    }
                    if let Some(r) = &mut t.status.rendezvous {
                        changed |= r.observe(text);
                    }
                    changed
                }
                _ => false,
            }
        };
        if changed {
            self.publish();
        }
    }

    pub(super) async fn tail(&self, id: &str) -> Vec<String> {
        let n = self.inner.config.log_tail_lines;
        let mut frames = self.inner.engine.logs(
            id,
            LogRequest {
                follow: false,
                tail: Some(n),
                timestamps: true,
            },
        );
        let mut splitter = LineSplitter::default();
        let mut lines: Vec<(Option<i64>, String)> = Vec::new();
        while let Some(frame) = frames.next().await {
            match frame {
                Ok(f) => {
                    for l in splitter.push(&f) {
                        let (at, text) = split_timestamp(&l);
                        lines.push((at, text.to_string()));
                    }
                }
                Err(e) => {
                    warn!(id = %short(id), error = %e, "reading the log tail failed");
                    break;
                }
            }
        }
        for (_, l) in splitter.finish() {
            let (at, text) = split_timestamp(&l);
            lines.push((at, text.to_string()));
        }
        // stdout and stderr arrive interleaved in time order already; keep it stable
        lines.sort_by_key(|(at, _)| at.unwrap_or(0));
        let skip = lines.len().saturating_sub(n as usize);
        lines.into_iter().skip(skip).map(|(_, l)| l).collect()
    }
}

pub(super) async fn follow<E: Engine>(
    weak: Weak<Inner<E>>,
    cancel: CancellationToken,
    key: NodeKey,
    id: String,
    mut stream: BoxStream<'static, Result<crate::engine::LogFrame>>,
) {
    let mut splitter = LineSplitter::default();
    let mut failed = false;
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(inner) = weak.upgrade() else { return };
        let rt = Runtime { inner };
        match item {
            Some(Ok(frame)) => {
                for line in splitter.push(&frame) {
                    rt.on_line(&key, &id, &line);
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "output stream failed");
                failed = true;
                break;
            }
            None => break,
        }
    }
    if failed {
        // a container whose output cannot be read must not make us retry in a hot loop
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    let Some(inner) = weak.upgrade() else { return };
    let rt = Runtime { inner };
    for (_, line) in splitter.finish() {
        rt.on_line(&key, &id, &line);
    }
    if let Some(t) = rt.lock().nodes.get_mut(&key)
        && t.status.container_id == id
    {
        t.follow_done = true;
    }
    debug!("output ended");
    // the stream ends when the container does: report it even if the event was missed
    // (the finished task stays registered as the follower: an ended container is not
    // re-read on every apply; `refresh` starts a new follower if it runs again)
    rt.refresh(&id).await;
}
