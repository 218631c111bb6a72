//! Serving a node's output (live or kept) and keeping it when its container is removed.

use super::*;

impl<E: Engine> Runtime<E> {
    /// The output of one node's role container (`geomxctl logs`): the last `tail` lines
    /// (0 for all), then, with `follow`, new output until the container ends.
    pub async fn logs(
        &self,
        job: &str,
        node: &str,
        follow: bool,
        tail: u32,
    ) -> Result<BoxStream<'static, Result<LogChunk>>> {
        let no_such = || RuntimeError::NoSuchNode {
            job: job.to_string(),
            node: node.to_string(),
        };
        let tracked = self
            .status(job, node)
            .map(|s| s.container_id)
            .filter(|id| !id.is_empty());
        let id = match tracked {
            Some(id) => id,
            None => {
                self.inner
                    .engine
                    .inspect(&container_name(job, node))
                    .await?
                    .ok_or_else(no_such)?
                    .id
            }
        };
        let frames = self.inner.engine.logs(
            &id,
            LogRequest {
                follow,
                tail: (tail > 0).then_some(tail),
                timestamps: false,
                since_s: None,
            },
        );
        let (job, node) = (job.to_string(), node.to_string());
        let frames = frames.map(move |r| {
            r.map_err(|e| match e {
                RuntimeError::NoSuchNode { .. } => RuntimeError::NoSuchNode {
                    job: job.clone(),
                    node: node.clone(),
                },
                other => other,
            })
        });
        Ok(crate::lines::chunks(frames.boxed()))
    }

    /// Keeps the output of role container `id` in the [`RuntimeConfig::log_archive`] (if
    /// any) before it is removed. Best effort: a failure is logged, the removal goes on.
    pub(super) async fn archive_logs(&self, id: &str) {
        let Some(archive) = &self.inner.config.log_archive else {
            return;
        };
        // the container's own labels name it (its tracking may be gone already)
        let owner = match self.inner.engine.inspect(id).await {
            Ok(Some(insp)) => {
                let label = |k: &str| insp.labels.get(k).cloned().unwrap_or_default();
                Some((
                    label(crate::spec::LABEL_JOB),
                    label(crate::spec::LABEL_NODE),
                    label(LABEL_GENERATION).parse().unwrap_or(0),
                ))
            }
            _ => None,
        };
        let Some((job, node, generation)) =
            owner.filter(|(j, n, _)| !j.is_empty() && !n.is_empty())
        else {
            return;
        };
        let frames = self.inner.engine.logs(
            id,
            LogRequest {
                follow: false,
                tail: None,
                timestamps: false,
                since_s: None,
            },
        );
        let mut chunks = crate::lines::chunks(frames.boxed());
        // streamed to the file, line by line: a node's output may be far larger than memory
        let mut kept = match archive.writer(&job, &node, generation) {
            Ok(w) => w,
            Err(e) => {
                warn!(%job, %node, error = %e, "cannot keep the output");
                return;
            }
        };
        let mut lines = 0u64;
        'read: while let Some(c) = chunks.next().await {
            match c {
                Ok(c) => {
                    for l in &c.lines {
                        if let Err(e) = kept.push(c.stderr, l) {
                            warn!(%job, %node, error = %e, "cannot keep the output");
                            return;
                        }
                        lines += 1;
                    }
                }
                Err(e) => {
                    warn!(%job, %node, error = %e, "reading the output to keep failed; keeping what was read");
                    break 'read;
                }
            }
        }
        match kept.finish() {
            Ok(path) => {
                debug!(%job, %node, generation, path = %path.display(), lines, "output kept")
            }
            Err(e) => warn!(%job, %node, error = %e, "cannot keep the output"),
        }
        for p in archive.prune(std::time::SystemTime::now()) {
            debug!(path = %p.display(), "old output removed");
        }
    }

    /// Deletes what the [`RuntimeConfig::log_archive`] kept of `job`; whether it kept any.
    pub fn forget_logs(&self, job: &str) -> Result<bool> {
        match &self.inner.config.log_archive {
            Some(archive) => archive.forget(job),
            None => Ok(false),
        }
    }

    /// The output of a node: its container's (streamed; `follow` until it ends) while it
    /// exists and is of `generation` (any when `None`), else what the
    /// [`RuntimeConfig::log_archive`] kept of it (of `generation`, or the latest).
    pub async fn logs_of(
        &self,
        job: &str,
        node: &str,
        generation: Option<u32>,
        follow: bool,
        tail: u32,
    ) -> Result<BoxStream<'static, Result<LogChunk>>> {
        let live = self
            .status(job, node)
            .filter(|s| !s.container_id.is_empty())
            .is_some_and(|s| generation.is_none_or(|g| g == s.generation));
        if live {
            return self.logs(job, node, follow, tail).await;
        }
        let kept = self
            .inner
            .config
            .log_archive
            .as_ref()
            .and_then(|a| a.read(job, node, generation, tail));
        match (kept, generation) {
            (Some(chunks), _) => Ok(futures::stream::iter(chunks.into_iter().map(Ok)).boxed()),
            // not tracked: perhaps a container of the name (adopted late)
            (None, None) => self.logs(job, node, follow, tail).await,
            (None, Some(_)) => Err(RuntimeError::NoSuchNode {
                job: job.to_string(),
                node: node.to_string(),
            }),
        }
    }
}
