//! Image pulls of one host: the [`PullManager`] behind a job's missing image
//! (`image_pull = "if-not-present"`/`"always"`) and `geomxctl pull`.
//!
//! - One pull per reference: asking again while it runs joins it.
//! - At most [`PullConfig::max_parallel`] pulls download at once (the others wait for a
//!   slot; their timeout starts with the slot).
//! - Progress is aggregated from Docker's per-layer messages ([`LayerTally`]): bytes done
//!   and total over the layers to download; a layer's bytes are done once it is
//!   "Download complete" (or later); "Already exists" layers count as done layers but add
//!   no bytes.
//! - Transient errors (registry unreachable, connection reset, EOF, 5xx) are retried with
//!   backoff (1 s doubling up to 30 s; state "retrying" with the error) until the pull's
//!   timeout; definitive ones (not found, unauthorized, disk full, an untrusted
//!   certificate) fail it at once. [`classify`] puts Docker's message in words.
//! - A pull is bounded by its timeout: its stream is dropped, and dockerd cancels a pull
//!   whose client went away.
//! - Ended pulls stay listed for [`PullConfig::keep_ended`] (10 minutes) for the reports;
//!   at most [`MAX_PULLS`] are kept. A failed pull is not retried by [`PullManager::ensure`]
//!   until [`PullManager::release_failures`] lets it go (no desired node needs the image
//!   any more), so that a node whose image cannot be pulled fails once instead of looping.
//! - Credentials come from the `registry_auth_file` ([`crate::credentials`]), read again
//!   for every attempt.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::counters::RuntimeCounters;
use crate::credentials::{AuthFile, Credentials, DOCKER_HUB};
use crate::engine::{Engine, PullEvent};
use crate::error::{Result, RuntimeError};
use crate::status::now_ms;

/// Most pulls listed (running and ended).
pub const MAX_PULLS: usize = 64;
/// Longest error text of a pull, in bytes.
pub const MAX_ERROR_LEN: usize = 512;
/// Default bound of one pull (all its attempts).
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default number of pulls downloading at once.
pub const DEFAULT_MAX_PARALLEL_PULLS: usize = 3;
/// Bound of a resolve (a registry HEAD through Docker).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most layers tracked per pull.
const MAX_LAYERS: usize = 1024;

/// How pulls behave on this host.
#[derive(Clone, Debug)]
pub struct PullConfig {
    /// Pulls downloading at once (at least 1).
    pub max_parallel: usize,
    /// The Docker `config.json`-format credentials file, if any.
    pub auth_file: Option<PathBuf>,
    /// Bound of a pull whose caller gives none.
    pub default_timeout: Duration,
    /// How long ended pulls stay listed.
    pub keep_ended: Duration,
    /// First wait after a transient error (doubling per attempt).
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            max_parallel: DEFAULT_MAX_PARALLEL_PULLS,
            auth_file: None,
            default_timeout: DEFAULT_PULL_TIMEOUT,
            keep_ended: Duration::from_secs(600),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// An image reference taken apart: `[registry/]repo[:tag][@digest]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host (`host[:port]`; [`DOCKER_HUB`] when the reference names none).
    pub registry: String,
    /// The repository as written (with the registry when written), without tag or digest.
    pub repo: String,
    /// The tag, if written.
    pub tag: Option<String>,
    /// The digest (`sha256:...`), if written.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Takes `reference` apart (no validation beyond what the splitting needs).
    pub fn parse(reference: &str) -> ImageRef {
        let reference = reference.trim();
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, Some(d.to_owned())),
            None => (reference, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (
                &name[..last_slash + i],
                Some(name[last_slash + i + 1..].to_owned()),
            ),
            None => (name, None),
        };
        let registry = match repo.split_once('/') {
            Some((first, _))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                first.to_ascii_lowercase()
            }
            _ => DOCKER_HUB.to_owned(),
        };
        ImageRef {
            registry,
            repo: repo.to_owned(),
            tag,
            digest,
        }
    }

    /// The reference to pull: by digest when there is one, else by tag (`latest` when none
    /// is written: Docker would pull every tag of a bare name).
    pub fn pull_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.repo),
            (None, Some(t)) => format!("{}:{t}", self.repo),
            (None, None) => format!("{}:latest", self.repo),
        }
    }

    /// `repo@digest`.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}@{digest}", self.repo)
    }
}

/// Why a pull (or a resolve) failed, in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullCause {
    /// No such repository, tag or manifest.
    NotFound,
    /// Credentials missing or refused.
    Unauthorized,
    /// The registry cannot be reached (refused, no route, DNS, timeouts, resets, EOF).
    Unreachable,
    /// The registry answered with a server error (5xx, too many requests).
    RegistryError,
    /// The host's disk is full.
    DiskFull,
    /// The registry's certificate is not trusted by this host's Docker.
    Untrusted,
    /// Docker itself did not answer.
    DockerUnavailable,
    /// The bound passed.
    TimedOut(Duration),
    /// Anything else (definitive).
    Failed,
}

impl PullCause {
    /// Whether another attempt may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            PullCause::Unreachable | PullCause::RegistryError | PullCause::DockerUnavailable
        )
    }
}

impl std::fmt::Display for PullCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullCause::NotFound => f.write_str("not found"),
            PullCause::Unauthorized => f.write_str("unauthorized"),
            PullCause::Unreachable => f.write_str("registry unreachable"),
            PullCause::RegistryError => f.write_str("registry error"),
            PullCause::DiskFull => f.write_str("disk full"),
            PullCause::Untrusted => f.write_str(
                "certificate not trusted (install the registry's CA as /etc/docker/certs.d/<registry>/ca.crt)",
            ),
            PullCause::DockerUnavailable => f.write_str("Docker unavailable"),
            PullCause::TimedOut(d) => write!(f, "timed out after {}", format_duration(*d)),
            PullCause::Failed => f.write_str("failed"),
        }
    }
}

impl PullCause {
    /// `<cause>: <message>`, without saying the cause twice when Docker's message starts
    /// with it ("unauthorized: authentication required", not "unauthorized: unauthorized:
    /// authentication required").
    pub fn explain(&self, message: &str) -> String {
        let cause = self.to_string();
        let lead = message.get(..cause.len());
        if message.is_empty() {
            cause
        } else if lead.is_some_and(|l| l.eq_ignore_ascii_case(&cause)) {
            message.to_owned()
        } else {
            format!("{cause}: {message}")
        }
    }
}

/// `30s`, `2m`, `1m30s`, `30m`, `1h`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// The cause of Docker's error text (of a pull or a resolve).
pub fn classify(text: &str) -> PullCause {
    let t = text.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if any(&["no space left on device", "disk quota exceeded"]) {
        PullCause::DiskFull
    } else if any(&[
        "unauthorized",
        "denied",
        "no basic auth credentials",
        "authentication required",
        "incorrect username or password",
    ]) {
        PullCause::Unauthorized
    } else if any(&[
        "manifest unknown",
        "not found",
        "name unknown",
        "no such image",
        "unknown manifest",
    ]) {
        PullCause::NotFound
    } else if any(&["x509", "certificate"]) {
        PullCause::Untrusted
    } else if any(&[
        "connection refused",
        "no route to host",
        "network is unreachable",
        "host is unreachable",
        "i/o timeout",
        "timeout",
        "timed out",
        "connection reset",
        "broken pipe",
        "eof",
        "no such host",
        "name resolution",
        "server misbehaving",
        "deadline exceeded",
    ]) {
        PullCause::Unreachable
    } else if any(&[
        "500 internal",
        "502 bad gateway",
        "503 service",
        "504 gateway",
        "internal server error",
        "bad gateway",
        "service unavailable",
        "gateway timeout",
        "toomanyrequests",
        "too many requests",
        "status 50",
        "status code 50",
    ]) {
        PullCause::RegistryError
    } else {
        PullCause::Failed
    }
}

/// The cause of a runtime error met while pulling or resolving: Docker's message about
/// the registry is classified; Docker itself not answering is transient.
pub fn cause_of(e: &RuntimeError) -> PullCause {
    match e {
        RuntimeError::Registry { message, .. } => classify(message),
        RuntimeError::ImageUnavailable { cause, .. } => *cause,
        e if e.is_transient() => PullCause::DockerUnavailable,
        e => classify(&e.to_string()),
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Layer {
    total: u64,
    current: u64,
    downloaded: bool,
    existed: bool,
}

/// The progress of one pull attempt, from Docker's per-layer messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerTally {
    layers: BTreeMap<String, Layer>,
}

impl LayerTally {
    /// Takes in one message; returns whether the progress changed.
    pub fn apply(&mut self, ev: &PullEvent) -> bool {
        if ev.id.is_empty() {
            return false;
        }
        let status = ev.status.as_str();
        let known = matches!(
            status,
            "Pulling fs layer"
                | "Waiting"
                | "Downloading"
                | "Verifying Checksum"
                | "Download complete"
                | "Extracting"
                | "Pull complete"
                | "Already exists"
        );
        if !known || (!self.layers.contains_key(&ev.id) && self.layers.len() >= MAX_LAYERS) {
            return false;
        }
        let before = self.layers.get(&ev.id).copied();
        let l = self.layers.entry(ev.id.clone()).or_default();
        match status {
            "Downloading" => {
                if let Some(total) = ev.total.filter(|t| *t > 0) {
                    l.total = total;
                }
                if let Some(c) = ev.current {
                    l.current = c;
                }
            }
            "Verifying Checksum" | "Download complete" | "Extracting" | "Pull complete" => {
                l.downloaded = true;
            }
            "Already exists" => l.existed = true,
            _ => {}
        }
        before != Some(*l)
    }

    /// Layer bytes downloaded (layers already present do not count).
    pub fn bytes_done(&self) -> u64 {
        self.layers
            .values()
            .filter(|l| !l.existed)
            .map(|l| if l.downloaded { l.total } else { l.current })
            .sum()
    }

    /// Layer bytes to download, as far as known.
    pub fn bytes_total(&self) -> u64 {
        self.layers
            .values()
            .filter(|l| !l.existed)
            .map(|l| l.total)
            .sum()
    }

    /// Layers downloaded or already present.
    pub fn layers_done(&self) -> u32 {
        let n = self
            .layers
            .values()
            .filter(|l| l.downloaded || l.existed)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Layers of the image, as far as known.
    pub fn layers_total(&self) -> u32 {
        u32::try_from(self.layers.len()).unwrap_or(u32::MAX)
    }
}

/// Where a pull is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullState {
    /// Waiting for a slot or downloading.
    Pulling,
    /// The last attempt failed transiently; the next one waits its backoff.
    Retrying,
    /// The image is present.
    Done,
    /// Failed for good.
    Failed,
}

impl PullState {
    /// "pulling", "retrying", "done" or "failed".
    pub fn as_str(self) -> &'static str {
        match self {
            PullState::Pulling => "pulling",
            PullState::Retrying => "retrying",
            PullState::Done => "done",
            PullState::Failed => "failed",
        }
    }

    /// Done or failed.
    pub fn is_ended(self) -> bool {
        matches!(self, PullState::Done | PullState::Failed)
    }
}

/// One pull as reported (`geomx.v1.ImagePull`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullStatus {
    /// The reference pulled.
    pub image: String,
    /// Its registry.
    pub registry: String,
    /// Where it is.
    pub state: PullState,
    /// Layer bytes downloaded in this attempt.
    pub bytes_done: u64,
    /// Layer bytes to download, as far as known.
    pub bytes_total: u64,
    /// Layers done (downloaded or present).
    pub layers_done: u32,
    /// Layers known.
    pub layers_total: u32,
    /// The attempt (1 for the first).
    pub attempt: u32,
    /// Why the last attempt failed: `<cause>: <Docker's message>` (at most
    /// [`MAX_ERROR_LEN`] bytes); empty while it goes well.
    pub error: String,
    /// The cause of `error`, if any.
    pub cause: Option<PullCause>,
    /// When the pull started (Unix ms).
    pub started_at_ms: i64,
    /// When it last changed (Unix ms).
    pub updated_at_ms: i64,
}

impl PullStatus {
    /// The error of a node whose image this failed pull was:
    /// `pulling image <ref> from registry <registry>: <cause>: <message>`.
    pub fn node_error(&self) -> String {
        format!(
            "pulling image {} from registry {}: {}",
            self.image, self.registry, self.error
        )
    }
}

/// What [`PullManager::ensure`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ensure {
    /// A pull started now.
    Started,
    /// A pull of the image runs already.
    Running,
    /// The last pull failed and is remembered: the node fails with this error.
    Failed(String),
}

/// The result of a resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `repo@sha256:...`.
    pub pinned: String,
    /// `sha256:...`.
    pub digest: String,
    /// The registry asked.
    pub registry: String,
}

struct Entry {
    status: PullStatus,
    /// When it ended (for [`PullConfig::keep_ended`]).
    ended_at: Option<Instant>,
    /// A failed pull that `ensure` does not restart.
    sticky: bool,
    /// Bumped per started pull: a stale task does not touch a newer one's entry.
    run: u64,
}

struct Shared {
    config: PullConfig,
    table: Mutex<BTreeMap<String, Entry>>,
    slots: Arc<Semaphore>,
    changes: watch::Sender<u64>,
    ended: Notify,
    cancel: CancellationToken,
    runs: std::sync::atomic::AtomicU64,
    counters: Arc<RuntimeCounters>,
}

/// The pulls of one host (see the module). Cheap to clone.
#[derive(Clone)]
pub struct PullManager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PullManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullManager")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl PullManager {
    /// A manager with `config` (no pull yet), counting into counters of its own.
    pub fn new(config: PullConfig) -> PullManager {
        PullManager::with_counters(config, Arc::default())
    }

    /// A manager with `config` (no pull yet) that counts pulls and their bytes into
    /// `counters`.
    pub fn with_counters(config: PullConfig, counters: Arc<RuntimeCounters>) -> PullManager {
        let slots = Arc::new(Semaphore::new(config.max_parallel.max(1)));
        PullManager {
            shared: Arc::new(Shared {
                config,
                table: Mutex::new(BTreeMap::new()),
                slots,
                changes: watch::Sender::new(0),
                ended: Notify::new(),
                cancel: CancellationToken::new(),
                runs: std::sync::atomic::AtomicU64::new(0),
                counters,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PullConfig {
        &self.shared.config
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.shared
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bumped whenever a pull starts, progresses or ends.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Notified (one stored permit) whenever a pull ends.
    pub fn ended(&self) -> &Notify {
        &self.shared.ended
    }

    /// Stops every pull (their streams are dropped).
    pub fn shutdown(&self) {
        self.shared.cancel.cancel();
    }

    /// The credentials for `registry`, from the file read now.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>> {
        match &self.shared.config.auth_file {
            None => Ok(None),
            Some(path) => Ok(AuthFile::load(path)?.lookup(registry).cloned()),
        }
    }

    /// Every pull running or ended within [`PullConfig::keep_ended`], oldest first, at most
    /// [`MAX_PULLS`].
    pub fn list(&self) -> Vec<PullStatus> {
        let keep = self.shared.config.keep_ended;
        let recent = |e: &Entry| e.ended_at.is_none_or(|t| t.elapsed() < keep);
        let mut table = self.lock();
        // a remembered failure stays (unlisted) while a node needs its image
        table.retain(|_, e| recent(e) || e.sticky);
        let mut v: Vec<PullStatus> = table
            .values()
            .filter(|e| recent(e))
            .map(|e| e.status.clone())
            .collect();
        v.sort_by_key(|s| s.started_at_ms);
        v.truncate(MAX_PULLS);
        v
    }

    /// The pull of `image`, if listed.
    pub fn status(&self, image: &str) -> Option<PullStatus> {
        self.lock().get(image).map(|e| e.status.clone())
    }

    /// Failed pulls of images no longer `needed` may run again when asked.
    pub fn release_failures(&self, needed: &BTreeSet<String>) {
        for (image, e) in self.lock().iter_mut() {
            if e.sticky && !needed.contains(image) {
                e.sticky = false;
            }
        }
    }

    /// Makes sure `image` is being pulled (it is missing on the host): joins a running
    /// pull, reports a remembered failure, or starts one bounded by `timeout` (`None`: the
    /// default). `restart_failed`: a remembered failure is retried (an explicit request).
    pub fn ensure<E: Engine + Clone>(
        &self,
        engine: &E,
        image: &str,
        timeout: Option<Duration>,
        restart_failed: bool,
    ) -> Ensure {
        let mut table = self.lock();
        if let Some(e) = table.get(image) {
            match e.status.state {
                PullState::Pulling | PullState::Retrying => return Ensure::Running,
                PullState::Failed if e.sticky && !restart_failed => {
                    return Ensure::Failed(e.status.node_error());
                }
                _ => {}
            }
        }
        if !table.contains_key(image) && table.len() >= MAX_PULLS {
            // make room: the oldest ended pull goes
            let oldest = table
                .iter()
                .filter(|(_, e)| e.status.state.is_ended())
                .min_by_key(|(_, e)| e.status.started_at_ms)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    table.remove(&k);
                }
                None => {
                    return Ensure::Failed(format!(
                        "pulling image {image}: {MAX_PULLS} pulls run on this host already"
                    ));
                }
            }
        }
        let r = ImageRef::parse(image);
        let now = now_ms();
        let run = self
            .shared
            .runs
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        table.insert(
            image.to_owned(),
            Entry {
                status: PullStatus {
                    image: image.to_owned(),
                    registry: r.registry.clone(),
                    state: PullState::Pulling,
                    bytes_done: 0,
                    bytes_total: 0,
                    layers_done: 0,
                    layers_total: 0,
                    attempt: 1,
                    error: String::new(),
                    cause: None,
                    started_at_ms: now,
                    updated_at_ms: now,
                },
                ended_at: None,
                sticky: false,
                run,
            },
        );
        drop(table);
        self.bump();
        let timeout = timeout
            .filter(|t| !t.is_zero())
            .unwrap_or(self.shared.config.default_timeout);
        let span = info_span!("pull", image = %image, registry = %r.registry);
        let task = run_pull(
            self.clone(),
            engine.clone(),
            image.to_owned(),
            r,
            timeout,
            run,
        );
        let cancel = self.shared.cancel.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = task => {}
                }
            }
            .instrument(span),
        );
        Ensure::Started
    }

    fn bump(&self) {
        self.shared.changes.send_modify(|n| *n += 1);
    }

    /// Changes the entry of `image` if it is still pull `run`'s.
    fn update(&self, image: &str, run: u64, f: impl FnOnce(&mut PullStatus)) {
        {
            let mut table = self.lock();
            let Some(e) = table.get_mut(image).filter(|e| e.run == run) else {
                return;
            };
            f(&mut e.status);
            e.status.updated_at_ms = now_ms();
            if e.status.state.is_ended() {
                e.ended_at = Some(Instant::now());
                e.sticky = e.status.state == PullState::Failed;
            }
        }
        self.bump();
    }

    /// Resolves `image` to the digest its registry serves now, through Docker (nothing is
    /// downloaded), bounded by [`RESOLVE_TIMEOUT`]. A reference by digest is itself.
    pub async fn resolve<E: Engine>(&self, engine: &E, image: &str) -> Result<Resolved> {
        let r = ImageRef::parse(image);
        if let Some(d) = &r.digest {
            return Ok(Resolved {
                pinned: r.pinned(d),
                digest: d.clone(),
                registry: r.registry,
            });
        }
        let unavailable = |cause: PullCause, message: String| RuntimeError::ImageUnavailable {
            image: image.to_owned(),
            registry: r.registry.clone(),
            cause,
            message: bounded(message),
        };
        let creds = self
            .credentials(&r.registry)
            .map_err(|e| unavailable(PullCause::Failed, e.to_string()))?;
        let reference = r.pull_reference();
        match tokio::time::timeout(RESOLVE_TIMEOUT, engine.resolve(&reference, creds.as_ref()))
            .await
        {
            Err(_) => Err(unavailable(
                PullCause::TimedOut(RESOLVE_TIMEOUT),
                "the registry did not answer".into(),
            )),
            Ok(Err(e)) => {
                let message = match &e {
                    RuntimeError::Registry { message, .. } => message.clone(),
                    e => e.to_string(),
                };
                Err(unavailable(cause_of(&e), message))
            }
            Ok(Ok(digest)) => Ok(Resolved {
                pinned: r.pinned(&digest),
                digest,
                registry: r.registry,
            }),
        }
    }
}

/// One pull, all its attempts.
async fn run_pull<E: Engine>(
    pm: PullManager,
    engine: E,
    image: String,
    r: ImageRef,
    timeout: Duration,
    run: u64,
) {
    let slots = pm.shared.slots.clone();
    let Ok(_permit) = slots.acquire_owned().await else {
        return;
    };
    let deadline = Instant::now() + timeout;
    let config = pm.shared.config.clone();
    let mut backoff = config.backoff_initial;
    let mut attempt = 1u32;
    let reference = r.pull_reference();
    info!(timeout = %format_duration(timeout), "pulling image");
    let fail = |cause: PullCause, message: &str| {
        warn!(%cause, error = %message, "pull failed");
        pm.shared.counters.pull_ended(false);
        pm.update(&image, run, |s| {
            s.state = PullState::Failed;
            s.cause = Some(cause);
            s.error = bounded(cause.explain(message));
        });
    };
    loop {
        pm.update(&image, run, |s| {
            s.state = PullState::Pulling;
            s.attempt = attempt;
        });
        let creds = match pm.credentials(&r.registry) {
            Ok(c) => c,
            Err(e) => {
                fail(PullCause::Unauthorized, &e.to_string());
                break;
            }
        };
        let mut tally = LayerTally::default();
        let attempt_result = tokio::time::timeout_at(deadline, async {
            let mut stream = engine.pull(&reference, creds.as_ref());
            let mut counted = 0;
            while let Some(ev) = stream.next().await {
                let ev = ev?;
                if tally.apply(&ev) {
                    let done = tally.bytes_done();
                    pm.shared.counters.pull_bytes(done.saturating_sub(counted));
                    counted = counted.max(done);
                    pm.update(&image, run, |s| {
                        s.bytes_done = tally.bytes_done();
                        s.bytes_total = tally.bytes_total();
                        s.layers_done = tally.layers_done();
                        s.layers_total = tally.layers_total();
                    });
                }
            }
            // the stream ended: the image must be there now
            match engine.image_present(&reference).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(RuntimeError::Registry {
                    op: format!("pull {reference}"),
                    message: "the pull ended without the image (unexpected EOF)".into(),
                }),
                Err(e) => Err(e),
            }
        })
        .await;
        let e = match attempt_result {
            Ok(Ok(())) => {
                info!(attempt, bytes = tally.bytes_total(), "image pulled");
                pm.shared.counters.pull_ended(true);
                pm.update(&image, run, |s| {
                    s.state = PullState::Done;
                    s.error.clear();
                    s.cause = None;
                });
                break;
            }
            Err(_) => {
                let last = pm.status(&image).map(|s| s.error).unwrap_or_default();
                let message = if last.is_empty() {
                    format!(
                        "{} of {} bytes downloaded in {attempt} attempt(s)",
                        tally.bytes_done(),
                        tally.bytes_total()
                    )
                } else {
                    format!("last error: {last}")
                };
                fail(PullCause::TimedOut(timeout), &message);
                break;
            }
            Ok(Err(e)) => e,
        };
        let cause = cause_of(&e);
        let message = match &e {
            RuntimeError::Registry { message, .. } => message.clone(),
            e => e.to_string(),
        };
        if !cause.is_transient() {
            fail(cause, &message);
            break;
        }
        let now = Instant::now();
        if now + backoff >= deadline {
            fail(
                PullCause::TimedOut(timeout),
                &format!("last error: {}", cause.explain(&message)),
            );
            break;
        }
        warn!(attempt, %cause, error = %message, retry_in = ?backoff, "pull failed; retrying");
        pm.update(&image, run, |s| {
            s.state = PullState::Retrying;
            s.cause = Some(cause);
            s.error = bounded(cause.explain(&message));
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(config.backoff_max);
        attempt = attempt.saturating_add(1);
    }
    pm.shared.ended.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_taken_apart() {
        for (s, registry, repo, tag, digest, pull) in [
            (
                "10.1.1.253:5000/geomx/test:latest",
                "10.1.1.253:5000",
                "10.1.1.253:5000/geomx/test",
                Some("latest"),
                None,
                "10.1.1.253:5000/geomx/test:latest",
            ),
            (
                "10.1.1.253:5000/geomx/test@sha256:ab",
                "10.1.1.253:5000",
                "10.1.1.253:5000/geomx/test",
                None,
                Some("sha256:ab"),
                "10.1.1.253:5000/geomx/test@sha256:ab",
            ),
            (
                "lizonghango00o1/geomx:cpu-only",
                DOCKER_HUB,
                "lizonghango00o1/geomx",
                Some("cpu-only"),
                None,
                "lizonghango00o1/geomx:cpu-only",
            ),
            ("alpine", DOCKER_HUB, "alpine", None, None, "alpine:latest"),
            (
                "localhost/x:1@sha256:cd",
                "localhost",
                "localhost/x",
                Some("1"),
                Some("sha256:cd"),
                "localhost/x@sha256:cd",
            ),
            (
                "registry.example.com/a/b",
                "registry.example.com",
                "registry.example.com/a/b",
                None,
                None,
                "registry.example.com/a/b:latest",
            ),
        ] {
            let r = ImageRef::parse(s);
            assert_eq!(r.registry, registry, "{s}");
            assert_eq!(r.repo, repo, "{s}");
            assert_eq!(r.tag.as_deref(), tag, "{s}");
            assert_eq!(r.digest.as_deref(), digest, "{s}");
            assert_eq!(r.pull_reference(), pull, "{s}");
        }
    }

    #[test]
    fn a_cause_is_said_once() {
        use PullCause::*;
        let table = [
            (
                Unauthorized,
                "unauthorized: authentication required",
                "unauthorized: authentication required",
            ),
            (
                Unauthorized,
                "denied: requested access",
                "unauthorized: denied: requested access",
            ),
            (
                NotFound,
                "Not found: manifest unknown",
                "Not found: manifest unknown",
            ),
            (NotFound, "manifest unknown", "not found: manifest unknown"),
            (Unreachable, "", "registry unreachable"),
            (
                DiskFull,
                "no space left on device",
                "disk full: no space left on device",
            ),
        ];
        for (cause, message, want) in table {
            assert_eq!(cause.explain(message), want, "{cause:?} {message:?}");
        }
    }

    #[test]
    fn errors_are_classified() {
        use PullCause::*;
        for (text, cause) in [
            (
                "manifest for 10.1.1.253:5000/geomx/test:nope not found: manifest unknown: manifest unknown",
                NotFound,
            ),
            (
                "Head \"https://10.1.1.253:5000/v2/geomx/test/manifests/latest\": no basic auth credentials",
                Unauthorized,
            ),
            ("unauthorized: authentication required", Unauthorized),
            (
                "pull access denied for nope, repository does not exist or may require 'docker login': denied: requested access to the resource is denied",
                Unauthorized,
            ),
            (
                "Get \"https://10.1.1.253:5000/v2/\": dial tcp 10.1.1.253:5000: connect: connection refused",
                Unreachable,
            ),
            (
                "Get \"https://10.1.1.253:5000/v2/\": dial tcp 10.1.1.253:5000: connect: no route to host",
                Unreachable,
            ),
            (
                "Get \"https://10.1.1.253:5000/v2/\": net/http: request canceled while waiting for connection (Client.Timeout exceeded while awaiting headers)",
                Unreachable,
            ),
            (
                "Get \"https://reg.example/v2/\": dial tcp: lookup reg.example on 127.0.0.53:53: no such host",
                Unreachable,
            ),
            (
                "read tcp 10.1.1.34:5122->10.1.1.253:5000: read: connection reset by peer",
                Unreachable,
            ),
            ("unexpected EOF", Unreachable),
            (
                "received unexpected HTTP status: 503 Service Unavailable",
                RegistryError,
            ),
            (
                "failed to register layer: write /usr/lib/x.so: no space left on device",
                DiskFull,
            ),
            (
                "Get \"https://10.1.1.253:5000/v2/\": x509: certificate signed by unknown authority",
                Untrusted,
            ),
            ("invalid reference format", Failed),
        ] {
            assert_eq!(classify(text), cause, "{text}");
            let transient = matches!(cause, Unreachable | RegistryError);
            assert_eq!(cause.is_transient(), transient, "{text}");
        }
        assert_eq!(
            TimedOut(Duration::from_secs(30)).to_string(),
            "timed out after 30s"
        );
        assert_eq!(format_duration(Duration::from_secs(1800)), "30m");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }

    fn ev(id: &str, status: &str, current: Option<u64>, total: Option<u64>) -> PullEvent {
        PullEvent {
            id: id.into(),
            status: status.into(),
            current,
            total,
        }
    }

    #[test]
    fn progress_is_aggregated_over_layers() {
        let mut t = LayerTally::default();
        // (bytes done, bytes total, layers done, layers total) after each message
        let steps = [
            (
                ev("latest", "Pulling from geomx/test", None, None),
                (0, 0, 0, 0),
            ),
            (ev("a", "Pulling fs layer", None, None), (0, 0, 0, 1)),
            (ev("b", "Pulling fs layer", None, None), (0, 0, 0, 2)),
            (ev("c", "Already exists", None, None), (0, 0, 1, 3)),
            (ev("b", "Waiting", None, None), (0, 0, 1, 3)),
            (
                ev("a", "Downloading", Some(100), Some(1000)),
                (100, 1000, 1, 3),
            ),
            (
                ev("a", "Downloading", Some(600), Some(1000)),
                (600, 1000, 1, 3),
            ),
            (
                ev("b", "Downloading", Some(50), Some(500)),
                (650, 1500, 1, 3),
            ),
            (
                ev("a", "Verifying Checksum", None, None),
                (1050, 1500, 2, 3),
            ),
            (ev("a", "Download complete", None, None), (1050, 1500, 2, 3)),
            (
                ev("a", "Extracting", Some(32768), Some(1000)),
                (1050, 1500, 2, 3),
            ),
            (ev("a", "Pull complete", None, None), (1050, 1500, 2, 3)),
            (ev("b", "Download complete", None, None), (1500, 1500, 3, 3)),
            (ev("b", "Pull complete", None, None), (1500, 1500, 3, 3)),
            (ev("", "Digest: sha256:ab", None, None), (1500, 1500, 3, 3)),
        ];
        for (i, (e, want)) in steps.iter().enumerate() {
            t.apply(e);
            let got = (
                t.bytes_done(),
                t.bytes_total(),
                t.layers_done(),
                t.layers_total(),
            );
            assert_eq!(got, *want, "step {i}: {e:?}");
        }
    }

    #[test]
    fn errors_are_bounded() {
        let long = "é".repeat(600);
        let b = bounded(long);
        assert!(
            b.len() <= MAX_ERROR_LEN && b.ends_with("..."),
            "{}",
            b.len()
        );
    }
}
