//! The per-container heartbeat secrets: every role container the agent creates gets its
//! own token in its env ([`ENV_HEARTBEAT_TOKEN`]), sent back as `Authorization: Bearer
//! <token>` with its heartbeats (see [`crate::heartbeat`]).
//!
//! A token is derived, never stored: HMAC-SHA256 under the agent's [`HeartbeatKey`] (32
//! random bytes made once, mode 0600, in the agent's state directory, [`HEARTBEAT_KEY_FILE`])
//! of what names the container: the controller id, job, node, container name, generation
//! and the creation nonce (label `io.geomx.creation`, see [`crate::ownership`]). So every
//! container, also a new one of the same node and generation, has its own token; a
//! restarted agent (same key, same labels) derives the same tokens and checks the
//! heartbeats of the containers it adopts; and the env variable is not part of the spec
//! hash (adding it in an agent upgrade replaces no running container).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tracing::warn;

use crate::error::{Result, RuntimeError};

/// Env var with the container's heartbeat token, set in every role container the agent
/// creates while it has a [`HeartbeatKey`].
pub const ENV_HEARTBEAT_TOKEN: &str = "GEOMX_HEARTBEAT_TOKEN";
/// The key's file in the agent's state directory.
pub const HEARTBEAT_KEY_FILE: &str = "heartbeat.key";

const KEY_LEN: usize = 32;
const DOMAIN: &str = "geomx-heartbeat-token-v1";

/// The agent's secret for heartbeat tokens. `Debug` shows nothing of it.
#[derive(Clone)]
pub struct HeartbeatKey {
    key: hmac::Key,
}

impl std::fmt::Debug for HeartbeatKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeartbeatKey(..)")
    }
}

/// What a token is derived from: everything that names one container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenSubject<'a> {
    /// The controller id (label `io.geomx.controller`).
    pub controller: &'a str,
    /// Job name.
    pub job: &'a str,
    /// Node name.
    pub node: &'a str,
    /// The container's name at creation (`geomx.<job>.<node>`).
    pub name: &'a str,
    /// The job's attempt.
    pub generation: u32,
    /// The creation nonce (label `io.geomx.creation`).
    pub nonce: &'a str,
}

/// A container's heartbeat token (32 bytes; 64 hex digits in the env). `Debug` shows
/// nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; KEY_LEN]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The token as it goes into the env: 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Whether `given` (what a caller sent) is this token; takes the same time whatever
    /// part of it differs.
    pub fn matches(&self, given: &str) -> bool {
        let Some(bytes) = unhex(given.trim()) else {
            return false;
        };
        if bytes.len() != KEY_LEN {
            return false;
        }
        self.0
            .iter()
            .zip(bytes.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl HeartbeatKey {
    /// A new random key.
    pub fn generate() -> Result<HeartbeatKey> {
        let mut bytes = [0u8; KEY_LEN];
        random(&mut bytes)?;
        Ok(HeartbeatKey::from_bytes(&bytes))
    }

    /// The key of `bytes`.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> HeartbeatKey {
        HeartbeatKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// The key in `path` (64 hex digits), made once (mode 0600) when the file does not
    /// exist. A file readable by others is made 0600 (with a warning); a file that does
    /// not hold a key is an error (it is not replaced: the running containers' tokens
    /// come from it).
    pub fn load_or_create(path: &Path) -> Result<HeartbeatKey> {
        let io = |what: String| move |source| RuntimeError::Io { what, source };
        match fs::read_to_string(path) {
            Ok(text) => {
                let meta = fs::metadata(path).map_err(io(format!("{}", path.display())))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    warn!(file = %path.display(), "the heartbeat key was readable by others; making it 0600");
                    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                        .map_err(io(format!("chmod 0600 {}", path.display())))?;
                }
                let bytes = unhex(text.trim())
                    .filter(|b| b.len() == KEY_LEN)
                    .ok_or_else(|| RuntimeError::Io {
                        what: format!("{}", path.display()),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "not a heartbeat key (64 hex digits); move it away to make a new one (the running containers' heartbeats are then refused until their job restarts)",
                        ),
                    })?;
                let mut key = [0u8; KEY_LEN];
                key.copy_from_slice(&bytes);
                Ok(HeartbeatKey::from_bytes(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; KEY_LEN];
                random(&mut bytes)?;
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
                let tmp = dir.join(format!(".{HEARTBEAT_KEY_FILE}.{}.tmp", std::process::id()));
                let written = (|| {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    f.write_all(format!("{}\n", hex(&bytes)).as_bytes())?;
                    f.sync_all()?;
                    // never over an existing key (another process made one meanwhile)
                    fs::hard_link(&tmp, path)?;
                    fs::File::open(dir)?.sync_all()
                })();
                let _ = fs::remove_file(&tmp);
                match written {
                    Ok(()) => Ok(HeartbeatKey::from_bytes(&bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        HeartbeatKey::load_or_create(path)
                    }
                    Err(source) => Err(RuntimeError::Io {
                        what: format!("writing {}", path.display()),
                        source,
                    }),
                }
            }
            Err(source) => Err(RuntimeError::Io {
                what: format!("reading {}", path.display()),
                source,
            }),
        }
    }

    /// The token of the container `who` names.
    pub fn token(&self, who: &TokenSubject<'_>) -> Token {
        let msg = format!(
            "{DOMAIN}\0{}\0{}\0{}\0{}\0{}\0{}",
            who.controller, who.job, who.node, who.name, who.generation, who.nonce
        );
        let tag = hmac::sign(&self.key, msg.as_bytes());
        let mut out = [0u8; KEY_LEN];
        out.copy_from_slice(&tag.as_ref()[..KEY_LEN]);
        Token(out)
    }
}

/// A fresh creation nonce: 16 random bytes, 32 hex digits.
pub fn nonce() -> Result<String> {
    let mut bytes = [0u8; 16];
    random(&mut bytes)?;
    Ok(hex(&bytes))
}

fn random(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new().fill(buf).map_err(|_| RuntimeError::Io {
        what: "the system's random number generator".into(),
        source: std::io::Error::other("no randomness"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(nonce: &str) -> TokenSubject<'_> {
        TokenSubject {
            controller: "c1",
            job: "job1",
            node: "a-worker-0",
            name: "geomx.job1.a-worker-0",
            generation: 0,
            nonce,
        }
    }

    #[test]
    fn tokens_are_per_container_and_checked_whole() {
        let k = HeartbeatKey::from_bytes(&[7; 32]);
        let t = k.token(&who("n1"));
        assert_eq!(t.to_hex().len(), 64);
        assert!(t.matches(&t.to_hex()));
        assert!(t.matches(&t.to_hex().to_uppercase()), "hex in either case");
        assert_eq!(k.token(&who("n1")), t, "derived again the same");
        // another nonce (another container of the same node), generation, node or key
        assert_ne!(k.token(&who("n2")), t);
        let mut g = who("n1");
        g.generation = 1;
        assert_ne!(k.token(&g), t);
        let mut n = who("n1");
        n.node = "a-worker-1";
        assert_ne!(k.token(&n), t);
        assert_ne!(HeartbeatKey::from_bytes(&[8; 32]).token(&who("n1")), t);
        // malformed or partial tokens are refused
        let hex = t.to_hex();
        for bad in ["", "zz", &hex[..62], &format!("{hex}00"), "é"] {
            assert!(!t.matches(bad), "{bad:?}");
        }
        let mut flipped = hex.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        assert!(!t.matches(&String::from_utf8(flipped).expect("ascii")));
        assert_eq!(format!("{t:?} {k:?}"), "Token(..) HeartbeatKey(..)");
    }

    #[test]
    fn the_key_file_is_made_once_0600_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join(HEARTBEAT_KEY_FILE);
        let k1 = HeartbeatKey::load_or_create(&path).expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = HeartbeatKey::load_or_create(&path).expect("load");
        assert_eq!(
            k1.token(&who("n")),
            k2.token(&who("n")),
            "the same key again"
        );
        // too wide: tightened
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        HeartbeatKey::load_or_create(&path).expect("load");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // garbage is not replaced
        fs::write(&path, "not a key\n").expect("write");
        let e = HeartbeatKey::load_or_create(&path).expect_err("garbage");
        assert!(e.to_string().contains("not a heartbeat key"), "{e}");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "not a key\n",
            "kept"
        );
        let names: Vec<String> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![HEARTBEAT_KEY_FILE.to_string()],
            "no temporary file"
        );
        assert_ne!(nonce().expect("nonce"), nonce().expect("nonce"));
        assert_eq!(nonce().expect("nonce").len(), 32);
    }
}
