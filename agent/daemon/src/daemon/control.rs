//! The running agent's local control socket, and `geomx-agent rotate-key` on top of it.
//!
//! The socket is `<state_dir>/agent.sock` ([`CONTROL_SOCKET`]): mode 0600 in the 0700 state
//! directory, and every connection's peer credentials are checked (`SO_PEERCRED`: the same
//! user as the agent, root in practice). Nothing is reachable over the network. One JSON line
//! per request ([`Request`]) and one per reply ([`Reply`]).
//!
//! **Key rotation** (`geomx-agent rotate-key`): the agent (which holds the host lock, so no
//! other pass or agent races it)
//!
//! 1. refuses when this host uses no WireGuard: its backend (agent.toml, else the cluster
//!    default) is `host-gw` or `vxlan`, or WireGuard's tools are missing ([`rotatable`]);
//! 2. writes a new private key to `<state_dir>/wireguard.key` (`wg genkey`; a temporary file
//!    of mode 0600, fsync, rename: the old key is whole until the new one is);
//! 3. asks the network task for a pass, which reconfigures `geomx-wg` with the new key, and
//!    waits until the interface carries the new public key;
//! 4. only then registers again with the new public key: the controller bumps the cluster's
//!    revision and every peer's desired state carries it; each peer's next pass replaces its
//!    WireGuard peer for this host and (persistent keepalive) handshakes at once.
//!
//! Between 3 and the peers' passes, tunnels to this host are down: a controller round trip
//! and a pass, well under a second on the lab's 5 ms links (`geo_dataplane.rs` measures it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use geomx_net::kernel::Wireguard;
use geomx_net::{Backend, WG_INTERFACE};
use geomx_runtime::{CancellationToken, Engine};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::Ctx;

/// The control socket's file name in the state directory.
pub const CONTROL_SOCKET: &str = "agent.sock";
/// The longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a rotation waits for the interface to carry the new key, and for the
/// controller to take it.
const ROTATE_STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// A request on the control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Replace the WireGuard key pair.
    RotateKey,
}

/// What a rotation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    /// This host.
    pub host: String,
    /// The public key before.
    pub old_public_key: String,
    /// The public key now.
    pub new_public_key: String,
    /// The private key's file (mode 0600).
    pub key_file: String,
    /// Whether `geomx-wg` was in use and now carries the new key (`false`: no peer needs a
    /// tunnel right now; it is made with the new key when one does).
    pub interface_reconfigured: bool,
    /// Whether the controller took the new public key (`false`: it did not answer in time;
    /// the agent keeps registering, and peers reach this host again once it does).
    pub registered: bool,
    /// Peers in the desired state (they get the new key from the controller).
    pub peers: usize,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Reply {
    /// The key pair was replaced.
    Rotated(Rotated),
    /// Nothing was done, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// It went wrong part-way; what happened.
    Failed {
        /// What.
        error: String,
    },
}

/// Why a host's key cannot be rotated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// WireGuard's tools are missing.
    #[error(
        "this host has no WireGuard identity (wireguard-tools / wireguard-go missing when the agent started): nothing to rotate"
    )]
    NoWireguard,
    /// The backend in force uses no WireGuard.
    #[error(
        "this host's backend is {backend} ({origin}), which uses no WireGuard: nothing to rotate"
    )]
    Backend {
        /// The backend.
        backend: Backend,
        /// `agent.toml` or `the cluster default`.
        origin: &'static str,
    },
}

/// Whether the key of a host can be rotated: it has a WireGuard identity and its backend
/// (`own`, else the cluster's `cluster`) may use WireGuard.
pub fn rotatable(
    has_identity: bool,
    own: Option<Backend>,
    cluster: Backend,
) -> Result<(), Refusal> {
    if !has_identity {
        return Err(Refusal::NoWireguard);
    }
    let (backend, origin) = match own {
        Some(b) => (b, "agent.toml"),
        None => (cluster, "the cluster default"),
    };
    match backend {
        Backend::Auto | Backend::Wireguard => Ok(()),
        other => Err(Refusal::Backend {
            backend: other,
            origin,
        }),
    }
}

/// The control socket of the agent whose state directory is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_SOCKET)
}

/// What the control server needs beside the context.
pub struct Control {
    /// The host's WireGuard.
    pub wireguard: Arc<dyn Wireguard>,
    /// The private key's file.
    pub key_file: PathBuf,
    /// This agent's backend override.
    pub own_backend: Option<Backend>,
}

/// Binds the control socket (replacing a stale one: the caller holds the host lock) with
/// mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the control socket until `shutdown`; removes it then. Requests are handled one at
/// a time.
pub async fn serve<E: Engine>(
    ctx: Arc<Ctx<E>>,
    control: Control,
    listener: UnixListener,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    // the socket is the agent's own: its owner is the agent's user
    let own_uid = {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&path) {
            Ok(m) => m.uid(),
            Err(e) => {
                warn!(error = %e, socket = %path.display(), "control socket gone; geomx-agent rotate-key will not reach this agent");
                return;
            }
        }
    };
    info!(socket = %path.display(), "control socket ready (geomx-agent rotate-key)");
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    continue;
                }
            },
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == own_uid => {}
            Ok(c) => {
                warn!(
                    uid = c.uid(),
                    "control socket: refused a connection from another user"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "control socket: no peer credentials; refused");
                continue;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = handle(&ctx, &control, stream) => {}
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle<E: Engine>(ctx: &Ctx<E>, control: &Control, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).take(MAX_REQUEST).read_line(&mut line),
    )
    .await;
    let reply = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::RotateKey) => rotate(ctx, control).await,
            Err(e) => Reply::Refused {
                reason: format!("not a request this agent knows: {e}"),
            },
        },
        Ok(Err(e)) => Reply::Refused {
            reason: format!("reading the request: {e}"),
        },
        Err(_) => Reply::Refused {
            reason: "no request within 5s".into(),
        },
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|e| {
        format!("{{\"result\":\"failed\",\"error\":\"serializing the reply: {e}\"}}")
    });
    text.push('\n');
    if let Err(e) = write.write_all(text.as_bytes()).await {
        warn!(error = %e, "control socket: the client went away before the reply");
    }
}

/// Rotates the key (see the module's documentation).
async fn rotate<E: Engine>(ctx: &Ctx<E>, control: &Control) -> Reply {
    let (cluster, peers) = {
        let d = ctx.desired.borrow();
        (
            d.as_ref()
                .and_then(|d| d.backend.parse::<Backend>().ok())
                .unwrap_or_default(),
            d.as_ref().map_or(0, |d| d.peers.len()),
        )
    };
    let old = ctx
        .wireguard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Err(r) = rotatable(old.is_some(), control.own_backend, cluster) {
        warn!(reason = %r, "key rotation refused");
        return Reply::Refused {
            reason: r.to_string(),
        };
    }
    let Some((old_public, port)) = old else {
        return Reply::Refused {
            reason: Refusal::NoWireguard.to_string(),
        };
    };

    // 2. the new private key, atomically
    let wg = control.wireguard.clone();
    let file = control.key_file.clone();
    let made = tokio::task::spawn_blocking(move || wg.rotate_key(&file)).await;
    let new_public = match made {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => {
            return Reply::Failed {
                error: format!("making the new key pair: {e} (the old key stays in force)"),
            };
        }
        Err(e) => {
            return Reply::Failed {
                error: format!("making the new key pair: {e} (the old key stays in force)"),
            };
        }
    };
    info!(old = %old_public, new = %new_public, key = %control.key_file.display(), "new WireGuard key pair written");
    *ctx.wireguard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((new_public.clone(), port));

    // 3. geomx-wg takes it (a pass), before any peer is told
    let interface_reconfigured = match interface_takes(ctx, control, &new_public).await {
        Ok(used) => used,
        Err(e) => {
            // a later pass gives the interface the key file's key anyway: register it, so
            // that the peers follow as soon as it does
            ctx.reregister.notify_one();
            return Reply::Failed {
                error: format!(
                    "the new key is in {} but {WG_INTERFACE} does not use it yet: {e}; the agent registers the new public key and keeps applying it (tunnels to this host are down until both ends have it)",
                    control.key_file.display()
                ),
            };
        }
    };

    // 4. the controller, which hands it to every peer
    let mut registered = ctx.registered.subscribe();
    registered.mark_unchanged();
    ctx.reregister.notify_one();
    let registered = tokio::time::timeout(ROTATE_STEP_TIMEOUT, registered.changed())
        .await
        .is_ok_and(|r| r.is_ok());
    if registered {
        info!(public_key = %new_public, peers, "the controller has the new WireGuard public key");
    } else {
        warn!(public_key = %new_public, "the controller has not taken the new public key yet; the agent keeps registering");
    }
    Reply::Rotated(Rotated {
        host: ctx.settings.host.clone(),
        old_public_key: old_public,
        new_public_key: new_public,
        key_file: control.key_file.display().to_string(),
        interface_reconfigured,
        registered,
        peers,
    })
}

/// Asks for a network pass until `geomx-wg` carries `public`; `Ok(false)` when the interface
/// does not exist (no peer needs a tunnel now).
async fn interface_takes<E: Engine>(
    ctx: &Ctx<E>,
    control: &Control,
    public: &str,
) -> Result<bool, String> {
    let mut passes = ctx.net_passes.subscribe();
    let deadline = tokio::time::Instant::now() + ROTATE_STEP_TIMEOUT;
    loop {
        passes.mark_unchanged();
        ctx.net_trigger.now();
        let pass = tokio::time::timeout_at(deadline, passes.changed()).await;
        let wg = control.wireguard.clone();
        let shown = tokio::task::spawn_blocking(move || wg.show(WG_INTERFACE))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        match shown {
            None => return Ok(false),
            Some(d) if d.public_key == public => return Ok(true),
            Some(d) => {
                if pass.is_err() {
                    return Err(format!(
                        "no network pass gave it the new key within {ROTATE_STEP_TIMEOUT:?} (it still has {})",
                        d.public_key
                    ));
                }
            }
        }
    }
}

/// Sends `request` to the agent behind `path` and waits up to `timeout` for its reply.
pub async fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, CallError> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ) {
            CallError::NotRunning {
                socket: path.to_path_buf(),
                cause: e,
            }
        } else {
            CallError::Io {
                socket: path.to_path_buf(),
                cause: e,
            }
        }
    })?;
    let io = |cause| CallError::Io {
        socket: path.to_path_buf(),
        cause,
    };
    let mut line = serde_json::to_string(request).map_err(|e| io(e.into()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await.map_err(io)?;
    let mut reply = String::new();
    tokio::time::timeout(timeout, BufReader::new(&mut stream).read_line(&mut reply))
        .await
        .map_err(|_| CallError::Timeout(timeout))?
        .map_err(io)?;
    if reply.trim().is_empty() {
        return Err(CallError::NoReply);
    }
    serde_json::from_str(reply.trim()).map_err(|e| CallError::BadReply(e.to_string()))
}

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No agent listens.
    #[error(
        "no geomx-agent is running on this host (nothing listens on {}: {cause}); start it (systemctl start geomx-agent), or point --state-dir / --config at the running agent's",
        socket.display()
    )]
    NotRunning {
        /// The socket.
        socket: PathBuf,
        /// What connect said.
        cause: std::io::Error,
    },
    /// Talking to it failed.
    #[error("talking to the agent on {}: {cause}", socket.display())]
    Io {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        cause: std::io::Error,
    },
    /// It did not answer in time.
    #[error("the agent did not answer within {0:?}; see its log (journalctl -u geomx-agent)")]
    Timeout(Duration),
    /// It closed the connection without an answer.
    #[error("the agent closed the connection without an answer; see its log")]
    NoReply,
    /// Its answer is not understood.
    #[error("the agent's answer is not understood ({0}): is it an older geomx-agent?")]
    BadReply(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_refused_where_no_wireguard_is_used() {
        use Backend::*;
        /// Identity, own backend, cluster backend, and Ok or a part of the refusal.
        type Row = (bool, Option<Backend>, Backend, Result<(), &'static str>);
        let table: Vec<Row> = vec![
            (true, None, Auto, Ok(())),
            (true, None, Wireguard, Ok(())),
            (true, Some(Wireguard), HostGw, Ok(())),
            (true, Some(Auto), HostGw, Ok(())),
            (true, None, HostGw, Err("host-gw (the cluster default)")),
            (true, Some(HostGw), Auto, Err("host-gw (agent.toml)")),
            (false, None, Auto, Err("no WireGuard identity")),
            (
                false,
                Some(Wireguard),
                Wireguard,
                Err("no WireGuard identity"),
            ),
        ];
        for (identity, own, cluster, want) in table {
            let got = rotatable(identity, own, cluster).map_err(|e| e.to_string());
            match (&got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(part)) => {
                    assert!(e.contains(part), "{identity} {own:?} {cluster}: {e}")
                }
                _ => panic!("{identity} {own:?} {cluster}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn requests_and_replies_are_one_json_line() {
        assert_eq!(
            serde_json::to_string(&Request::RotateKey).unwrap(),
            r#"{"command":"rotate-key"}"#
        );
        let r = Reply::Refused { reason: "x".into() };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"result":"refused","reason":"x"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
    }

    #[tokio::test]
    async fn without_an_agent_the_call_says_so_and_the_socket_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let err = call(&path, &Request::RotateKey, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::NotRunning { .. }), "{err}");
        assert!(
            err.to_string().contains("no geomx-agent is running"),
            "{err}"
        );

        // a stale socket file is replaced; the new one is 0600
        std::fs::write(&path, "stale").unwrap();
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // an agent that answers something else is reported as such
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            assert_eq!(line, "{\"command\":\"rotate-key\"}\n");
            w.write_all(b"{\"result\":\"refused\",\"reason\":\"backend host-gw\"}\n")
                .await
                .unwrap();
        });
        let reply = call(&path, &Request::RotateKey, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            reply,
            Reply::Refused {
                reason: "backend host-gw".into()
            }
        );
        server.await.unwrap();
    }
}
