//! Following a role container's output for progress, and its log tail once it ended.
//!
//! Docker sends a new follower a container's whole output again. A running container gets
//! a new follower when its output stream broke (Docker restarted with live-restore, a
//! broken connection; the follower then ends and the refresh finds the container running),
//! when it runs again after it ended, and after the first follower of a container not
//! running yet ended at once (Docker does not follow such a container). Read again into
//! the same progress tracker, the old lines would take the iteration back (3, 1, 2, 3)
//! until the follower caught up. So each node keeps a [`LogCursor`] of what its tracker has
//! read: a new follower asks Docker for the output from that second on and skips the lines
//! it had read (by their Docker timestamps). A new container, or a new runtime (agent
//! restart), starts without a cursor: its progress is rebuilt from the whole output, read
//! at once and published once (no iteration on the way back up is shown), before the
//! output is followed from there.

use super::*;

/// How far a container's output has been read: the Docker timestamp of the latest line
/// read and how many lines read carried exactly that timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LogCursor {
    /// Unix nanoseconds.
    at_ns: i64,
    lines_at: u32,
}

impl LogCursor {
    /// `cursor` after reading a line stamped `at_ns`. (Lines of standard output and error
    /// are stamped by separate copiers and may arrive slightly out of order: the cursor
    /// keeps the latest.)
    fn advance(cursor: &mut Option<LogCursor>, at_ns: i64) {
        match cursor {
            Some(c) if at_ns == c.at_ns => c.lines_at = c.lines_at.saturating_add(1),
            Some(c) if at_ns < c.at_ns => {}
            _ => *cursor = Some(LogCursor { at_ns, lines_at: 1 }),
        }
    }

    /// The whole second to ask Docker for the output from (it has the cursor's lines).
    fn since_s(self) -> i64 {
        self.at_ns.div_euclid(1_000_000_000)
    }
}

/// What a follower skips: the lines read before it began (see [`LogCursor`]).
#[derive(Debug, Default)]
pub(super) struct Resume {
    after: Option<LogCursor>,
    /// Lines stamped exactly `after.at_ns` skipped so far.
    skipped_at: u32,
}

impl Resume {
    fn after(cursor: Option<LogCursor>) -> Resume {
        Resume {
            after: cursor,
            skipped_at: 0,
        }
    }

    /// Whether a line stamped `at_ns` was read before this follower began: it is older than
    /// the cursor, or one of the lines read at the cursor's own timestamp. A line without a
    /// timestamp cannot be told and is read.
    fn already_read(&mut self, at_ns: Option<i64>) -> bool {
        let (Some(c), Some(at)) = (self.after, at_ns) else {
            return false;
        };
        if at < c.at_ns {
            return true;
        }
        if at == c.at_ns && self.skipped_at < c.lines_at {
            self.skipped_at += 1;
            return true;
        }
        false
    }
}

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
        let span = info_span!("follow", job = %key.0, node = %key.1);
        if let Some(c) = t.log_cursor {
            debug!(parent: &span, id = %short(id), after_ns = c.at_ns, "following the output again after the last line read");
        }
        let follow = follow(weak, cancel, key.clone(), id.to_string());
        let task = tokio::spawn(follow.instrument(span));
        t.follower = Some(AbortOnDrop(task));
    }

    /// Reads one output line (with Docker's timestamp) of role container `id` into the
    /// node's progress, unless `resume` says it was read before; true when that changed the
    /// node's status (not published yet).
    fn on_line(&self, key: &NodeKey, id: &str, line: &str, resume: &mut Resume) -> bool {
        let (at_ns, text) = split_timestamp_ns(line);
        let mut st = self.lock();
        match st.nodes.get_mut(key) {
            Some(t) if t.status.container_id == id && !resume.already_read(at_ns) => {
                if let Some(at) = at_ns {
                    LogCursor::advance(&mut t.log_cursor, at);
                }
                let at_ms = at_ns.map_or_else(now_ms, |ns| ns.div_euclid(1_000_000));
                let mut changed = t.tracker.observe(text, at_ms);
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
    }

    /// Opens role container `id`'s output after what its node has read (see
    /// [`LogCursor`]); `None` once the node has another container or none.
    fn open_output(
        &self,
        key: &NodeKey,
        id: &str,
        follow: bool,
    ) -> Option<(BoxStream<'static, Result<crate::engine::LogFrame>>, Resume)> {
        let cursor = {
            let st = self.lock();
            let t = st.nodes.get(key)?;
            if t.status.container_id != id {
                return None;
            }
            t.log_cursor
        };
        let stream = self.inner.engine.logs(
            id,
            LogRequest {
                follow,
                tail: None,
                timestamps: true,
                since_s: cursor.map(LogCursor::since_s),
            },
        );
        Some((stream, Resume::after(cursor)))
    }

    pub(super) async fn tail(&self, id: &str) -> Vec<String> {
        let n = self.inner.config.log_tail_lines;
        let mut frames = self.inner.engine.logs(
            id,
            LogRequest {
                follow: false,
                tail: Some(n),
                timestamps: true,
                since_s: None,
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

/// Follows role container `id` of node `key`: first what it printed so far, read at once
/// and published once (a new runtime rebuilding a long run's progress shows no iteration on
/// the way), then its output as it comes, each change published. Once the output ends, the
/// node is refreshed.
pub(super) async fn follow<E: Engine>(
    weak: Weak<Inner<E>>,
    cancel: CancellationToken,
    key: NodeKey,
    id: String,
) {
    let mut failed = false;
    for follow in [false, true] {
        let Some(inner) = weak.upgrade() else { return };
        let rt = Runtime { inner };
        let Some((stream, resume)) = rt.open_output(&key, &id, follow) else {
            return;
        };
        drop(rt);
        match read_output(&weak, &cancel, &key, &id, stream, resume, follow).await {
            None => return,
            Some(true) => {
                failed = true;
                break;
            }
            Some(false) => {}
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

/// Reads `stream` into node `key`'s progress. `live` (following): each change is published
/// and an unterminated last line is read when the output ends; otherwise (what was
/// printed so far) the changes are published once at the end and an unterminated last
/// line is left to the follow. A line cut off by a broken stream is never read: the next
/// follower gets it whole (read now, its timestamp would make that follower skip it).
/// `Some(true)` when the stream broke; `None` when the runtime is shut down or gone.
async fn read_output<E: Engine>(
    weak: &Weak<Inner<E>>,
    cancel: &CancellationToken,
    key: &NodeKey,
    id: &str,
    mut stream: BoxStream<'static, Result<crate::engine::LogFrame>>,
    mut resume: Resume,
    live: bool,
) -> Option<bool> {
    let mut splitter = LineSplitter::default();
    let mut changed = false;
    let failed = loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return None,
            item = stream.next() => item,
        };
        let rt = Runtime {
            inner: weak.upgrade()?,
        };
        match item {
            Some(Ok(frame)) => {
                for line in splitter.push(&frame) {
                    changed |= rt.on_line(key, id, &line, &mut resume);
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, follow = live, "output stream failed");
                break true;
            }
            None => break false,
        }
        if live && changed {
            rt.publish();
            changed = false;
        }
    };
    let rt = Runtime {
        inner: weak.upgrade()?,
    };
    if live && !failed {
        for (_, line) in splitter.finish() {
            changed |= rt.on_line(key, id, &line, &mut resume);
        }
    }
    if changed {
        rt.publish();
    }
    Some(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_follower_skips_exactly_the_lines_read() {
        // read: t=5, two lines at t=7 (stdout and stderr stamped alike), t=6 late from the
        // other stream
        let mut cursor = None;
        for at in [5, 7, 7, 6] {
            LogCursor::advance(&mut cursor, at);
        }
        assert_eq!(
            cursor,
            Some(LogCursor {
                at_ns: 7,
                lines_at: 2
            })
        );
        // Docker sends them again, then a third line at t=7 and later ones
        let mut resume = Resume::after(cursor);
        let read: Vec<Option<i64>> = [Some(5), Some(6), Some(7), Some(7), Some(7), None, Some(8)]
            .into_iter()
            .filter(|at| !resume.already_read(*at))
            .collect();
        assert_eq!(read, [Some(7), None, Some(8)]);
        // nothing read yet: everything is read, from the start
        assert!(!Resume::after(None).already_read(Some(1)));
        assert_eq!(
            LogCursor {
                at_ns: 1_714_564_800_999_999_999,
                lines_at: 1
            }
            .since_s(),
            1_714_564_800
        );
    }
}
