//! Registry credentials from a Docker `config.json`-format file (the agent's
//! `registry_auth_file`):
//!
//! ```json
//! {"auths": {"10.1.1.253:5000": {"auth": "dXNlcjpwYXNz"},
//!            "https://index.docker.io/v1/": {"username": "u", "password": "p"}}}
//! ```
//!
//! `auth` is base64 of `user:password`; `username`/`password` may be given instead. Keys
//! may be written as `host[:port]` or as a URL (`https://host:port/...`); Docker Hub is
//! `https://index.docker.io/v1/` (also found as `docker.io`). The file must be readable by
//! its owner only (mode 0600 or stricter): [`AuthFile::load`] refuses it otherwise. The
//! file is read again for every pull and resolve, so rotating credentials needs no
//! restart. Credentials are never logged: [`Credentials`]' `Debug` prints the user only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Docker Hub's registry host as references name it.
pub const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's key in `config.json`.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// It cannot be read.
    #[error("registry credentials file {path}: cannot read it: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Others than its owner may read or write it.
    #[error(
        "registry credentials file {path} has mode {mode:04o}: it must be readable by its owner only (chmod 600 {path})"
    )]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It is not a Docker `config.json`.
    #[error("registry credentials file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (no secret in it).
        reason: String,
    },
}

/// One registry's credentials. `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password (or token).
    pub password: String,
    /// The registry (the key as found in the file).
    pub server: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("server", &self.server)
            .finish()
    }
}

#[derive(Deserialize)]
struct FileFormat {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The parsed credentials of a file, by registry host (`host[:port]`, `docker.io` for
/// Docker Hub). `Debug` prints the registries only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthFile {
    by_registry: BTreeMap<String, Credentials>,
}

impl std::fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_registry.keys()).finish()
    }
}

impl AuthFile {
    /// Reads `path`, refusing it when group or others have any access to it.
    pub fn load(path: &Path) -> Result<AuthFile, CredentialsError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Mode {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        AuthFile::parse(&text).map_err(|reason| CredentialsError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the text of a `config.json`; the error says what is wrong without quoting
    /// any value.
    pub fn parse(text: &str) -> Result<AuthFile, String> {
        let file: FileFormat = serde_json::from_str(text).map_err(|e| {
            format!(
                "not a Docker config.json ({{\"auths\": {{\"host:port\": {{\"auth\": \"<base64 of user:password>\"}}}}}}): line {}, column {}: {}",
                e.line(),
                e.column(),
                classify_json_error(&e)
            )
        })?;
        let mut by_registry = BTreeMap::new();
        for (key, entry) in file.auths {
            let registry = registry_of_key(&key);
            if registry.is_empty() {
                return Err(format!("auths key {key:?} names no registry"));
            }
            let (username, password) = match (entry.username, entry.password, entry.auth) {
                (Some(u), Some(p), _) if !u.is_empty() => (u, p),
                (_, _, Some(auth)) if !auth.is_empty() => {
                    let raw = decode_base64(auth.trim()).ok_or_else(|| {
                        format!("auths[{key:?}].auth is not base64 (of user:password)")
                    })?;
                    let text = String::from_utf8(raw).map_err(|_| {
                        format!("auths[{key:?}].auth does not decode to text (user:password)")
                    })?;
                    match text.split_once(':') {
                        Some((u, p)) if !u.is_empty() => (u.to_owned(), p.to_owned()),
                        _ => {
                            return Err(format!(
                                "auths[{key:?}].auth does not decode to user:password"
                            ));
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "auths[{key:?}] has neither \"auth\" nor \"username\" and \"password\""
                    ));
                }
            };
            by_registry.insert(
                registry,
                Credentials {
                    username,
                    password,
                    server: key,
                },
            );
        }
        Ok(AuthFile { by_registry })
    }

    /// The credentials for `registry` (`host[:port]`; `docker.io` for Docker Hub).
    pub fn lookup(&self, registry: &str) -> Option<&Credentials> {
        self.by_registry.get(&registry_of_key(registry))
    }

    /// The registries it has credentials for.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.by_registry.keys().map(String::as_str)
    }
}

/// A serde_json error without the text it quotes (which may be a secret).
fn classify_json_error(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "cannot read",
        Category::Syntax => "invalid JSON",
        Category::Data => "unexpected value (auths must map registries to objects of strings)",
        Category::Eof => "ends early",
    }
}

/// The registry host of a `config.json` key: `https://host:port/v1/` → `host:port`;
/// Docker Hub's keys → `docker.io`.
pub fn registry_of_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" | DOCKER_HUB => {
            DOCKER_HUB.to_owned()
        }
        _ => host,
    }
}

/// Standard base64 (padding optional); `None` when `s` is not base64.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    // a single leftover character (6 bits) cannot end valid base64
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        assert_eq!(
            decode_base64("dXNlcjpwYXNz").as_deref(),
            Some(&b"user:pass"[..])
        );
        assert_eq!(decode_base64("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(decode_base64("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(decode_base64("Y"), None);
        assert_eq!(decode_base64("!!!!"), None);
    }

    #[test]
    fn keys_name_registries() {
        for (key, reg) in [
            ("10.1.1.253:5000", "10.1.1.253:5000"),
            ("https://10.1.1.253:5000", "10.1.1.253:5000"),
            ("https://10.1.1.253:5000/v2/", "10.1.1.253:5000"),
            (DOCKER_HUB_KEY, DOCKER_HUB),
            ("docker.io", DOCKER_HUB),
            ("Registry.Example.com", "registry.example.com"),
        ] {
            assert_eq!(registry_of_key(key), reg, "{key}");
        }
    }

    #[test]
    fn both_forms_parse_and_debug_hides_the_password() {
        let f = AuthFile::parse(
            r#"{"auths": {"https://10.1.1.253:5000": {"auth": "dXNlcjpzM2NyM3Q="},
                "https://index.docker.io/v1/": {"username": "hub", "password": "t0ken"}}}"#,
        )
        .expect("parses");
        let c = f.lookup("10.1.1.253:5000").expect("found");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "s3cr3t")
        );
        assert_eq!(
            f.lookup(DOCKER_HUB).map(|c| c.username.as_str()),
            Some("hub")
        );
        assert!(f.lookup("other:5000").is_none());
        let shown = format!("{c:?} {f:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("t0ken"),
            "{shown}"
        );
    }

    #[test]
    fn bad_files_are_named_without_secrets() {
        for (text, want) in [
            ("{", "ends early"),
            (r#"{"auths": {"r:5000": {"auth": "***"}}}"#, "not base64"),
            (
                r#"{"auths": {"r:5000": {"auth": "bm9jb2xvbg=="}}}"#,
                "user:password",
            ),
            (r#"{"auths": {"r:5000": {}}}"#, "neither"),
            (r#"{"auths": {"r:5000": {"auth": 7}}}"#, "unexpected value"),
        ] {
            let e = AuthFile::parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains("bm9jb2xvbg"), "{e}");
        }
    }

    #[test]
    fn a_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {}}"#).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = AuthFile::load(&path).expect_err("0644");
        assert!(
            e.to_string().contains("0644") && e.to_string().contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(AuthFile::load(&path).is_ok());
        let e = AuthFile::load(&dir.path().join("nope")).expect_err("missing");
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
