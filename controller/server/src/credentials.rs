//! The user tokens and the revocation list in force, reloaded without a restart.
//!
//! [`Credentials`] holds one [`Snapshot`]: the tokens (inline `[auth] tokens` plus the
//! `[auth] tokens_file`, see [`geomx_proto::credentials`]) and what `[auth] revocation_file`
//! revokes (certificate serials, token names). It is read at start (a bad file is a
//! configuration error), then again:
//!
//! * on SIGHUP ([`Credentials::reload`], wired by the binary), and
//! * when either file changes: [`Credentials::watch_files`] reads both once a second
//!   ([`POLL_INTERVAL`]) and applies new contents once they read the same twice in a row
//!   (a file caught half-written is not taken).
//!
//! A reload is all or nothing: when either file cannot be read or has a bad line, the
//! previous snapshot stays in force whole and the error is logged (once per content), so a
//! typo never opens the API up nor locks everyone out. Every applied reload bumps the
//! snapshot's generation, which [`Credentials::subscribe`] announces: the agents' watch
//! streams re-check their certificate then and end when it was revoked.
//!
//! [`MethodRoles`] and [`required_role`]: which [`Role`] each user RPC needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use geomx_proto::credentials::{
    Revocations, Role, TokenSet, parse_inline_tokens, parse_revocations, parse_tokens_file,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// How often the tokens and revocation files are read for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A changed file must read the same again after this long before it is applied.
pub const SETTLE: Duration = Duration::from_millis(150);

/// Where the credentials come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// `[auth] tokens`: plaintext secrets (role admin, named `inline-N`) or
    /// `NAME ROLE sha256:HEX` lines. Fixed for the controller's life.
    pub inline: Vec<String>,
    /// `[auth] tokens_file`.
    pub tokens_file: Option<PathBuf>,
    /// `[auth] revocation_file`.
    pub revocation_file: Option<PathBuf>,
}

/// The credentials in force.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Tokens that may call the user API.
    pub tokens: TokenSet,
    /// Revoked certificate serials and token names.
    pub revoked: Revocations,
    /// 0 at start, +1 per applied reload.
    pub generation: u64,
}

impl Snapshot {
    /// `tokens: 1 admin, 2 read; revoked: 1 certificate, 0 tokens`.
    pub fn summary(&self) -> String {
        format!(
            "tokens: {}; revoked: {}",
            self.tokens.summary(),
            self.revoked.summary()
        )
    }
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files hold what is in force already.
    Unchanged,
    /// New credentials are in force (their summary).
    Applied(String),
    /// A file is bad: the previous credentials stay (the error).
    Kept(String),
}

/// Raw contents of the two files as last read (`None`: not configured).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Contents {
    tokens: Option<Result<Vec<u8>, String>>,
    revocations: Option<Result<Vec<u8>, String>>,
}

#[derive(Debug, Default)]
struct Seen {
    /// What the snapshot in force was made of.
    applied: Contents,
    /// Contents refused last (their error was logged once).
    refused: Option<Contents>,
}

/// The credentials in force and how to reload them.
#[derive(Debug)]
pub struct Credentials {
    sources: Sources,
    current: RwLock<Arc<Snapshot>>,
    seen: Mutex<Seen>,
    changes: watch::Sender<u64>,
    /// Agents refused for a revoked certificate, noted once per (host, serial, generation).
    noted: Mutex<BTreeMap<(String, String), u64>>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

impl Contents {
    fn read(sources: &Sources) -> Contents {
        Contents {
            tokens: sources.tokens_file.as_deref().map(read_file),
            revocations: sources.revocation_file.as_deref().map(read_file),
        }
    }
}

/// Builds a snapshot from `sources` as read into `contents`; the warnings worth logging.
fn build(
    sources: &Sources,
    contents: &Contents,
) -> Result<(TokenSet, Revocations, Vec<String>), String> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut tokens = match parse_inline_tokens(&sources.inline) {
        Ok(t) => t,
        Err(e) => {
            errors.push(e);
            Vec::new()
        }
    };
    if let (Some(path), Some(read)) = (&sources.tokens_file, &contents.tokens) {
        let label = path.display().to_string();
        match read {
            Err(e) => errors.push(e.clone()),
            Ok(bytes) => match std::str::from_utf8(bytes) {
                Err(_) => errors.push(format!("{label}: not UTF-8 text")),
                Ok(text) => match parse_tokens_file(text, &label) {
                    Ok(f) => {
                        warnings.extend(f.warnings);
                        tokens.extend(f.tokens);
                    }
                    Err(e) => errors.push(e),
                },
            },
        }
    }
    let mut revoked = Revocations::default();
    if let (Some(path), Some(read)) = (&sources.revocation_file, &contents.revocations) {
        let label = path.display().to_string();
        match read {
            Err(e) => errors.push(e.clone()),
            Ok(bytes) => match std::str::from_utf8(bytes) {
                Err(_) => errors.push(format!("{label}: not UTF-8 text")),
                Ok(text) => match parse_revocations(text, &label) {
                    Ok(r) => revoked = r,
                    Err(e) => errors.push(e),
                },
            },
        }
    }
    let set = match TokenSet::new(tokens) {
        Ok(s) => s,
        Err(e) => {
            errors.push(e);
            TokenSet::default()
        }
    };
    if errors.is_empty() {
        Ok((set, revoked, warnings))
    } else {
        Err(errors.join("\n"))
    }
}

/// Warnings about who else may read or change the files.
pub fn file_mode_warnings(sources: &Sources, tokens: &TokenSet) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    };
    if let Some(p) = &sources.tokens_file
        && let Some(m) = mode(p)
    {
        if m & 0o022 != 0 {
            out.push(format!(
                "tokens file {} (mode {m:04o}) may be changed by other users, who could add a token: chmod 600 it",
                p.display()
            ));
        } else if m & 0o044 != 0 && {
            let prefix = format!("{}:", p.display());
            tokens
                .iter()
                .any(|t| t.is_plaintext() && t.origin.starts_with(&prefix))
        } {
            out.push(format!(
                "tokens file {} (mode {m:04o}) holds plaintext tokens other users can read: chmod 600 it (better: hashes, see docs/deploy.md)",
                p.display()
            ));
        }
    }
    if let Some(p) = &sources.revocation_file
        && let Some(m) = mode(p)
        && m & 0o022 != 0
    {
        out.push(format!(
            "revocation file {} (mode {m:04o}) may be changed by other users, who could lift a revocation: chmod 644 it",
            p.display()
        ));
    }
    out
}

impl Credentials {
    /// Reads the credentials of `sources`; every problem is an error (the controller does
    /// not start on a bad file). Returns them and the warnings worth logging.
    pub fn load(sources: Sources) -> Result<(Credentials, Vec<String>), String> {
        let contents = Contents::read(&sources);
        let (tokens, revoked, mut warnings) = build(&sources, &contents)?;
        warnings.extend(file_mode_warnings(&sources, &tokens));
        let snapshot = Snapshot {
            tokens,
            revoked,
            generation: 0,
        };
        Ok((
            Credentials {
                sources,
                current: RwLock::new(Arc::new(snapshot)),
                seen: Mutex::new(Seen {
                    applied: contents,
                    refused: None,
                }),
                changes: watch::channel(0).0,
                noted: Mutex::new(BTreeMap::new()),
            },
            warnings,
        ))
    }

    /// Fixed credentials (no files): for tests and labs.
    pub fn fixed(tokens: TokenSet, revoked: Revocations) -> Credentials {
        Credentials {
            sources: Sources::default(),
            current: RwLock::new(Arc::new(Snapshot {
                tokens,
                revoked,
                generation: 0,
            })),
            seen: Mutex::new(Seen::default()),
            changes: watch::channel(0).0,
            noted: Mutex::new(BTreeMap::new()),
        }
    }

    /// Where they come from.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// Whether there is a file to watch.
    pub fn has_files(&self) -> bool {
        self.sources.tokens_file.is_some() || self.sources.revocation_file.is_some()
    }

    /// The credentials in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Announces each applied reload (the new generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Reads both files and applies them (SIGHUP): the new snapshot when they are good, the
    /// previous one kept (and the error logged) when not. `why` goes into the log.
    pub fn reload(&self, why: &str) -> Reload {
        let contents = Contents::read(&self.sources);
        self.apply(contents, why, true)
    }

    /// Applies the files if their contents changed since they were last applied or
    /// refused (a refusal is logged once per content).
    pub fn reload_if_changed(&self) -> Reload {
        let contents = Contents::read(&self.sources);
        {
            let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if contents == seen.applied || seen.refused.as_ref() == Some(&contents) {
                return Reload::Unchanged;
            }
        }
        self.apply(contents, "a file changed", false)
    }

    fn apply(&self, contents: Contents, why: &str, forced: bool) -> Reload {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match build(&self.sources, &contents) {
            Err(e) => {
                let repeated = seen.refused.as_ref() == Some(&contents);
                if forced || !repeated {
                    tracing::error!(
                        reason = why,
                        "credentials NOT reloaded, the previous tokens and revocations stay in force:\n{e}"
                    );
                }
                seen.refused = Some(contents);
                Reload::Kept(e)
            }
            Ok((tokens, revoked, warnings)) => {
                seen.refused = None;
                if contents == seen.applied && !forced {
                    return Reload::Unchanged;
                }
                let unchanged = contents == seen.applied;
                seen.applied = contents;
                for w in warnings
                    .into_iter()
                    .chain(file_mode_warnings(&self.sources, &tokens))
                {
                    tracing::warn!("{w}");
                }
                let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
                let snapshot = Snapshot {
                    tokens,
                    revoked,
                    generation: current.generation + 1,
                };
                let summary = snapshot.summary();
                tracing::info!(
                    reason = why,
                    generation = snapshot.generation,
                    unchanged,
                    "credentials reloaded: {summary}"
                );
                let generation = snapshot.generation;
                *current = Arc::new(snapshot);
                drop(current);
                drop(seen);
                self.changes.send_replace(generation);
                Reload::Applied(summary)
            }
        }
    }

    /// Reads the files every `interval` and applies changes ([`Credentials::reload_if_changed`])
    /// until `cancel`. A change is applied once it reads the same twice, [`SETTLE`] apart.
    pub async fn watch_files(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        if !self.has_files() {
            return;
        }
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let first = Contents::read(&self.sources);
            {
                let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                if first == seen.applied || seen.refused.as_ref() == Some(&first) {
                    continue;
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(SETTLE) => {}
            }
            if Contents::read(&self.sources) != first {
                // still being written: look again at the next tick
                continue;
            }
            let this = self.clone();
            // file reads and hashing: off the async workers
            let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
        }
    }

    /// Whether an agent refused for revoked certificate `serial` on `host` should be noted
    /// (an event, a warning): once per host, serial and generation of the list.
    pub fn note_refusal(&self, host: &str, serial: &str) -> bool {
        let generation = self.snapshot().generation;
        let mut noted = self.noted.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (host.to_owned(), serial.to_owned());
        if noted.get(&key) == Some(&generation) {
            return false;
        }
        noted.insert(key, generation);
        true
    }
}

/// The user RPC a request calls and the role it needs, put into the request's extensions
/// by [`MethodRoles`] for the user interceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalledMethod {
    /// `Service/Method`, e.g. `JobService/CancelJob`.
    pub name: String,
    /// The role it needs.
    pub needed: Role,
}

/// The role a user RPC needs, by its gRPC path (`/geomx.v1.JobService/CancelJob`):
///
/// | role | RPCs |
/// |---|---|
/// | `read` | `JobService`: GetJob, ListJobs, WatchJob, JobEvents, NodeLogs; `HostService`: ListHosts, HostEvents |
/// | `submit` | `JobService`: SubmitJob, CancelJob, RemoveJob; `HostService`: PullImage |
/// | `admin` | `HostService`: CordonHost, UncordonHost, RemoveHost; anything not listed |
pub fn required_role(path: &str) -> Role {
    let method = path.trim_start_matches('/');
    match method {
        "geomx.v1.JobService/GetJob"
        | "geomx.v1.JobService/ListJobs"
        | "geomx.v1.JobService/WatchJob"
        | "geomx.v1.JobService/JobEvents"
        | "geomx.v1.JobService/NodeLogs"
        | "geomx.v1.HostService/ListHosts"
        | "geomx.v1.HostService/HostEvents" => Role::Read,
        "geomx.v1.JobService/SubmitJob"
        | "geomx.v1.JobService/CancelJob"
        | "geomx.v1.JobService/RemoveJob"
        | "geomx.v1.HostService/PullImage" => Role::Submit,
        // CordonHost, UncordonHost, RemoveHost, and whatever is added without a decision
        _ => Role::Admin,
    }
}

/// Wraps a user service: notes the RPC called and the role it needs ([`CalledMethod`]) in
/// the request's extensions, where the user interceptor inside checks the caller's token
/// against it. (An interceptor alone cannot see which method is called.)
#[derive(Clone, Debug)]
pub struct MethodRoles<S> {
    inner: S,
}

impl<S> MethodRoles<S> {
    /// Wraps `inner` (an `InterceptedService` with the user interceptor).
    pub fn new(inner: S) -> Self {
        MethodRoles { inner }
    }
}

impl<S, B> Service<http::Request<B>> for MethodRoles<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let called = CalledMethod {
            name: path
                .trim_start_matches('/')
                .trim_start_matches("geomx.v1.")
                .to_owned(),
            needed: required_role(path),
        };
        request.extensions_mut().insert(called);
        self.inner.call(request)
    }
}

impl<S: NamedService> NamedService for MethodRoles<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_proto::credentials::hash_secret;

    #[test]
    fn every_user_rpc_has_a_role_and_read_is_only_looking() {
        // every rpc of the user services, from the .proto itself: a new one must be placed
        let proto = include_str!("../../../proto/geomx/v1/user.proto");
        let mut service = "";
        let mut rpcs = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap_or("");
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap_or("").trim();
                rpcs.push(format!("/geomx.v1.{service}/{name}"));
            }
        }
        assert_eq!(rpcs.len(), 14, "{rpcs:?}");
        let placed: BTreeMap<&str, Role> = [
            ("/geomx.v1.JobService/SubmitJob", Role::Submit),
            ("/geomx.v1.JobService/GetJob", Role::Read),
            ("/geomx.v1.JobService/ListJobs", Role::Read),
            ("/geomx.v1.JobService/CancelJob", Role::Submit),
            ("/geomx.v1.JobService/WatchJob", Role::Read),
            ("/geomx.v1.JobService/JobEvents", Role::Read),
            ("/geomx.v1.JobService/NodeLogs", Role::Read),
            ("/geomx.v1.JobService/RemoveJob", Role::Submit),
            ("/geomx.v1.HostService/ListHosts", Role::Read),
            ("/geomx.v1.HostService/CordonHost", Role::Admin),
            ("/geomx.v1.HostService/UncordonHost", Role::Admin),
            ("/geomx.v1.HostService/RemoveHost", Role::Admin),
            ("/geomx.v1.HostService/HostEvents", Role::Read),
            ("/geomx.v1.HostService/PullImage", Role::Submit),
        ]
        .into_iter()
        .collect();
        for rpc in &rpcs {
            let want = placed
                .get(rpc.as_str())
                .unwrap_or_else(|| panic!("{rpc}: decide its role in required_role and here"));
            assert_eq!(required_role(rpc), *want, "{rpc}");
        }
        assert_eq!(required_role("/geomx.v1.JobService/Unknown"), Role::Admin);
        assert_eq!(required_role("/x"), Role::Admin);
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    fn sources(dir: &Path) -> Sources {
        Sources {
            inline: vec!["inline-secret-0123456789".into()],
            tokens_file: Some(dir.join("tokens")),
            revocation_file: Some(dir.join("revoked")),
        }
    }

    #[test]
    fn a_bad_file_on_reload_keeps_the_previous_credentials_whole() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        let revoked = dir.path().join("revoked");
        write(
            &tokens,
            &format!(
                "alice admin {}\nro read {}\n",
                hash_secret("alice-secret-0123456789"),
                hash_secret("ro-secret-0123456789")
            ),
        );
        write(&revoked, "");
        let (c, warnings) = Credentials::load(sources(dir.path())).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let s = c.snapshot();
        assert_eq!(s.generation, 0);
        assert_eq!(s.tokens.len(), 3);
        assert_eq!(c.reload_if_changed(), Reload::Unchanged);
        let mut changes = c.subscribe();

        // revoking a token and a serial: applied, announced
        write(&revoked, "token ro\nserial 4A:01\n");
        assert!(matches!(c.reload_if_changed(), Reload::Applied(_)));
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        let s = c.snapshot();
        assert_eq!(s.generation, 1);
        assert!(s.revoked.token_revoked("ro") && s.revoked.serial_revoked("4a01"));

        // a bad revocation file: everything stays as it was, no announcement
        write(&revoked, "token ro\nserial 4A:01\nlift everything\n");
        let Reload::Kept(e) = c.reload_if_changed() else {
            panic!("a bad file applied")
        };
        assert!(e.contains("revoked:3: unknown kind \"lift\""), "{e}");
        assert_eq!(c.reload_if_changed(), Reload::Unchanged, "refused once");
        assert!(!changes.has_changed().unwrap());
        let s = c.snapshot();
        assert_eq!(s.generation, 1);
        assert!(s.revoked.token_revoked("ro") && s.revoked.serial_revoked("4a01"));

        // a bad tokens file (while the revocation file is fixed): still the old set whole
        write(&revoked, "token ro\n");
        write(&tokens, "alice admin sha256:nothex\n");
        assert!(matches!(c.reload_if_changed(), Reload::Kept(_)));
        let s = c.snapshot();
        assert!(s.revoked.serial_revoked("4a01"), "not half applied");
        assert!(s.tokens.find("alice-secret-0123456789").is_some());
        // a missing file is bad too (never "no revocations")
        std::fs::remove_file(&revoked).unwrap();
        write(
            &tokens,
            &format!("alice admin {}\n", hash_secret("alice-secret-0123456789")),
        );
        let Reload::Kept(e) = c.reload("SIGHUP") else {
            panic!("a missing revocation file applied")
        };
        assert!(e.contains("cannot read") && e.contains("revoked"), "{e}");
        assert!(c.snapshot().revoked.serial_revoked("4a01"));

        // good again: applied; the ro token is gone from the tokens file
        write(&revoked, "");
        assert!(matches!(c.reload_if_changed(), Reload::Applied(_)));
        let s = c.snapshot();
        assert_eq!(s.generation, 2);
        assert!(!s.revoked.serial_revoked("4a01"));
        assert!(s.tokens.find("ro-secret-0123456789").is_none());
        assert_eq!(s.tokens.len(), 2);
        // SIGHUP with nothing changed still reloads (and says so)
        assert!(matches!(c.reload("SIGHUP"), Reload::Applied(_)));
        assert_eq!(c.snapshot().generation, 3);
    }

    #[test]
    fn a_bad_file_at_start_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("tokens"), "a nobody sha256:00\n");
        write(&dir.path().join("revoked"), "");
        let err = Credentials::load(sources(dir.path())).unwrap_err();
        assert!(err.contains("tokens:1: unknown role \"nobody\""), "{err}");
        std::fs::remove_file(dir.path().join("revoked")).unwrap();
        write(&dir.path().join("tokens"), "");
        let err = Credentials::load(sources(dir.path())).unwrap_err();
        assert!(
            err.contains("cannot read") && err.contains("revoked"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_watcher_applies_a_change_within_a_poll() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("tokens"), "");
        write(&dir.path().join("revoked"), "");
        let (c, _) = Credentials::load(sources(dir.path())).unwrap();
        let c = Arc::new(c);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            c.clone()
                .watch_files(Duration::from_millis(50), cancel.clone()),
        );
        let mut changes = c.subscribe();
        write(&dir.path().join("revoked"), "token inline-1\n");
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("reloaded in time")
            .unwrap();
        assert!(c.snapshot().revoked.token_revoked("inline-1"));
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn refusals_are_noted_once_per_list() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("tokens"), "");
        write(&dir.path().join("revoked"), "serial 01\n");
        let (c, _) = Credentials::load(sources(dir.path())).unwrap();
        assert!(c.note_refusal("a", "1"));
        assert!(!c.note_refusal("a", "1"));
        assert!(c.note_refusal("b", "1"));
        write(&dir.path().join("revoked"), "serial 01\nserial 02\n");
        c.reload_if_changed();
        assert!(c.note_refusal("a", "1"), "again after the list changed");
    }

    #[test]
    fn mode_warnings() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = sources(dir.path());
        write(&dir.path().join("tokens"), "0123456789abcdef-plain\n");
        write(&dir.path().join("revoked"), "");
        let chmod = |f: &str, m: u32| {
            std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(m))
                .unwrap();
        };
        chmod("tokens", 0o600);
        chmod("revoked", 0o644);
        let (_, warnings) = Credentials::load(s.clone()).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("plaintext token (deprecated)"),
            "{warnings:?}"
        );
        chmod("tokens", 0o644);
        chmod("revoked", 0o666);
        let (_, warnings) = Credentials::load(s).unwrap();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("plaintext tokens other users can read")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("could lift a revocation")),
            "{warnings:?}"
        );
    }
}
