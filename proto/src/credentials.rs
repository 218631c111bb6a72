//! User tokens (named, with a role, stored as hashes) and the revocation list, as the
//! controller reads them and `geomxctl certs token|revoke` writes them.
//!
//! # Tokens file
//!
//! One token per line; blank lines and lines starting with `#` are skipped:
//!
//! ```text
//! # NAME  ROLE    HASH OF THE SECRET
//! alice   admin   sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! ci      submit  sha256:...
//! grafana read    sha256:...
//! ```
//!
//! * `NAME`: 1..=64 characters of `[A-Za-z0-9._-]`, starting with a letter or digit; unique in
//!   the file. It names the caller in events and logs (who submitted, who cancelled) and in
//!   the revocation list (`token NAME`).
//! * `ROLE`: [`Role`]: `read`, `submit` or `admin`.
//! * `HASH`: `sha256:` and the 64 hex digits of SHA-256 of the secret ([`hash_secret`]): the
//!   file holds no secret. `geomxctl certs token` makes a secret, prints it once and appends
//!   its line.
//!
//! The old form, a plaintext token alone on its line, is still read (deprecated): it gets
//! role `admin` and the name `token-<line>`, and [`TokenFile::warnings`] says so.
//!
//! # Revocation list
//!
//! ```text
//! serial 4a:1f:...:09     # a certificate serial as `geomxctl certs show` prints it
//! token  ci               # a token by name
//! ```
//!
//! `#` starts a comment anywhere on a line. Serials are compared as numbers: colons, case and
//! leading zeros do not matter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::tls::validate_token;

/// Prefix of a token hash in the tokens file.
pub const HASH_PREFIX: &str = "sha256:";
/// Longest token name.
pub const MAX_NAME_LEN: usize = 64;

/// What a token may do. Ordered: each role may do everything the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// List and look: jobs, status, events, logs, watch, hosts, host events.
    Read,
    /// `read`, and submit, cancel and remove jobs, pull images.
    Submit,
    /// Everything: also cordon, uncordon, drain and remove hosts.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Read, Role::Submit, Role::Admin];

    /// `read`, `submit`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "submit" => Ok(Role::Submit),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: use admin, submit or read")),
        }
    }
}

/// Checks a token name: 1..=[`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]`, starting with a
/// letter or a digit.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "token name {name:?} must be 1..{MAX_NAME_LEN} characters of [A-Za-z0-9._-], starting with a letter or digit"
        ))
    }
}

/// SHA-256 of `secret`, as the tokens file holds it: `sha256:<64 hex digits>`.
pub fn hash_secret(secret: &str) -> String {
    format!("{HASH_PREFIX}{}", hex(&sha256(secret.as_bytes())))
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hash(s: &str) -> Result<[u8; 32], String> {
    let Some(digits) = s.strip_prefix(HASH_PREFIX) else {
        return Err(format!(
            "{s:?} is not a token hash: expected {HASH_PREFIX} and 64 hex digits (`geomxctl certs token` writes it)"
        ));
    };
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{HASH_PREFIX}{digits}: expected 64 hex digits after {HASH_PREFIX}"
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
            .map_err(|e| format!("{HASH_PREFIX}{digits}: {e}"))?;
    }
    Ok(out)
}

/// How a token is kept.
#[derive(Clone, PartialEq, Eq)]
enum Secret {
    /// SHA-256 of the secret.
    Hash([u8; 32]),
    /// The secret itself (the deprecated one-token-per-line form, inline test tokens).
    Plain(Vec<u8>),
}

/// One token: its name, its role and (a hash of) its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The caller's name in events and logs.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Where it was read (`FILE:LINE`, `auth.tokens[N]`), for messages.
    pub origin: String,
    secret: Secret,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// A token kept as the hash of `secret` (for tests and `geomxctl`).
    pub fn hashed(name: &str, role: Role, secret: &str) -> Token {
        Token {
            name: name.to_owned(),
            role,
            origin: "memory".to_owned(),
            secret: Secret::Hash(sha256(secret.as_bytes())),
        }
    }

    /// Whether this token is kept in plaintext (the deprecated form).
    pub fn is_plaintext(&self) -> bool {
        matches!(self.secret, Secret::Plain(_))
    }

    /// Whether `presented` (its SHA-256 in `presented_hash`) is this token's secret; in
    /// constant time for equal lengths.
    fn matches(&self, presented: &[u8], presented_hash: &[u8; 32]) -> bool {
        match &self.secret {
            Secret::Hash(h) => constant_time_eq(h, presented_hash),
            Secret::Plain(p) => constant_time_eq(p, presented),
        }
    }
}

/// What a line of a tokens file (or an inline token) holds.
fn parse_token_line(line: &str, origin: &str, legacy_name: &str) -> Result<Token, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields.as_slice() {
        [plain] => {
            validate_token(plain).map_err(|e| e.to_string())?;
            if plain.starts_with(HASH_PREFIX) {
                return Err(format!(
                    "a hash alone is not a token line: write `NAME ROLE {plain}`"
                ));
            }
            Ok(Token {
                name: legacy_name.to_owned(),
                role: Role::Admin,
                origin: origin.to_owned(),
                secret: Secret::Plain(plain.as_bytes().to_vec()),
            })
        }
        [name, role, hash] => {
            validate_name(name)?;
            let role: Role = role.parse()?;
            let hash = parse_hash(hash)?;
            Ok(Token {
                name: (*name).to_owned(),
                role,
                origin: origin.to_owned(),
                secret: Secret::Hash(hash),
            })
        }
        _ => Err(format!(
            "expected `NAME ROLE {HASH_PREFIX}HEX` ({} fields found; `geomxctl certs token --name NAME --role ROLE --tokens-file FILE` writes such a line)",
            fields.len()
        )),
    }
}

/// A parsed tokens file: its tokens and what is worth a warning.
#[derive(Clone, Debug, Default)]
pub struct TokenFile {
    /// The tokens, in file order.
    pub tokens: Vec<Token>,
    /// Deprecated lines (plaintext tokens), each `FILE:LINE: ...`.
    pub warnings: Vec<String>,
}

/// Parses a tokens file (see the module docs); `label` names it in messages (its path).
/// Every bad line is reported, each as `LABEL:LINE: problem`, one per line of the error.
pub fn parse_tokens_file(text: &str, label: &str) -> Result<TokenFile, String> {
    let mut file = TokenFile::default();
    let mut errors = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let origin = format!("{label}:{n}");
        match parse_token_line(line, &origin, &format!("token-{n}")) {
            Ok(t) => {
                if let Some(first) = names.get(&t.name) {
                    errors.push(format!(
                        "{origin}: token name {:?} is already used on line {first}",
                        t.name
                    ));
                    continue;
                }
                if let Some(same) = file.tokens.iter().find(|o| o.secret == t.secret) {
                    errors.push(format!(
                        "{origin}: the same secret as token {:?} ({}); every token needs its own",
                        same.name, same.origin
                    ));
                    continue;
                }
                if t.is_plaintext() {
                    file.warnings.push(format!(
                        "{origin}: a plaintext token (deprecated): taken as role admin, named {:?}; replace the line with `NAME ROLE {HASH_PREFIX}HEX` (`geomxctl certs token --name NAME --role ROLE --tokens-file {label} --stdin` hashes an existing secret)",
                        t.name
                    ));
                }
                names.insert(t.name.clone(), n);
                file.tokens.push(t);
            }
            Err(e) => errors.push(format!("{origin}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(file)
    } else {
        Err(errors.join("\n"))
    }
}

/// Parses inline tokens (`[auth] tokens`): each a plaintext secret (role admin, named
/// `inline-<N>`) or a `NAME ROLE sha256:HEX` line.
pub fn parse_inline_tokens<S: AsRef<str>>(tokens: &[S]) -> Result<Vec<Token>, String> {
    let mut out: Vec<Token> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let origin = format!("auth.tokens[{i}]");
        let tok = parse_token_line(t.as_ref().trim(), &origin, &format!("inline-{}", i + 1))
            .map_err(|e| format!("{origin}: {e}"))?;
        if out.iter().any(|o| o.secret == tok.secret) {
            // the same inline token twice: harmless
            continue;
        }
        if out.iter().any(|o| o.name == tok.name) {
            return Err(format!("{origin}: token name {:?} is used twice", tok.name));
        }
        out.push(tok);
    }
    Ok(out)
}

/// The tokens that may call the user API, with what each may do.
#[derive(Clone, Default)]
pub struct TokenSet {
    tokens: Vec<Token>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSet({} tokens)", self.tokens.len())
    }
}

impl TokenSet {
    /// The set of `tokens`; a name given twice is an error (the first origin is named).
    pub fn new(tokens: Vec<Token>) -> Result<TokenSet, String> {
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for t in &tokens {
            if let Some(first) = seen.insert(&t.name, &t.origin) {
                return Err(format!(
                    "{}: token name {:?} is already used ({first})",
                    t.origin, t.name
                ));
            }
        }
        Ok(TokenSet { tokens })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Every token, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Token> {
        self.tokens.iter()
    }

    /// The token whose secret is `presented`, if any. Every token is compared (no early
    /// exit), each in constant time.
    pub fn find(&self, presented: &str) -> Option<&Token> {
        let bytes = presented.as_bytes();
        let hash = sha256(bytes);
        let mut found = None;
        for t in &self.tokens {
            if t.matches(bytes, &hash) && found.is_none() {
                found = Some(t);
            }
        }
        found
    }

    /// How many tokens have each role, e.g. `2 admin, 1 read`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = Role::ALL
            .iter()
            .rev()
            .filter_map(|r| {
                let n = self.tokens.iter().filter(|t| t.role == *r).count();
                (n > 0).then(|| format!("{n} {r}"))
            })
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// A certificate serial in the form revocations are compared in: lowercase hex without
/// separators or leading zeros (`0` for zero). Accepts `4A:01:ff`, `4a01ff`, `0x4a01ff`.
pub fn normalize_serial(s: &str) -> Result<String, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a certificate serial: hex digits, colons allowed (as `geomxctl certs show` prints it)"
        ));
    }
    if digits.len() > 80 {
        return Err(format!(
            "{s:?} is too long for a certificate serial (at most 20 bytes)"
        ));
    }
    let trimmed = digits.trim_start_matches('0').to_ascii_lowercase();
    Ok(if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed
    })
}

/// The serial of a DER certificate's raw serial bytes, normalized ([`normalize_serial`]).
pub fn serial_of_bytes(raw: &[u8]) -> String {
    let h = hex(raw);
    let trimmed = h.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// What is revoked: certificate serials and token names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    serials: BTreeSet<String>,
    tokens: BTreeSet<String>,
}

impl Revocations {
    /// Whether the certificate with this (normalized) serial is revoked.
    pub fn serial_revoked(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    /// Whether the token named `name` is revoked.
    pub fn token_revoked(&self, name: &str) -> bool {
        self.tokens.contains(name)
    }

    /// The revoked serials (normalized).
    pub fn serials(&self) -> impl Iterator<Item = &str> {
        self.serials.iter().map(String::as_str)
    }

    /// The revoked token names.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(String::as_str)
    }

    /// Revokes a serial (normalized first).
    pub fn revoke_serial(&mut self, serial: &str) -> Result<(), String> {
        self.serials.insert(normalize_serial(serial)?);
        Ok(())
    }

    /// Revokes a token by name.
    pub fn revoke_token(&mut self, name: &str) -> Result<(), String> {
        validate_name(name)?;
        self.tokens.insert(name.to_owned());
        Ok(())
    }

    /// `N certificates, M tokens`.
    pub fn summary(&self) -> String {
        format!(
            "{} certificate{}, {} token{}",
            self.serials.len(),
            if self.serials.len() == 1 { "" } else { "s" },
            self.tokens.len(),
            if self.tokens.len() == 1 { "" } else { "s" }
        )
    }
}

/// Parses a revocation list (see the module docs); every bad line is reported as
/// `LABEL:LINE: problem`, one per line of the error.
pub fn parse_revocations(text: &str, label: &str) -> Result<Revocations, String> {
    let mut r = Revocations::default();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let result = match fields.as_slice() {
            ["serial", s] => r.revoke_serial(s),
            ["token", name] => r.revoke_token(name),
            [kind, _] => Err(format!(
                "unknown kind {kind:?}: a line is `serial HEX` or `token NAME`"
            )),
            _ => Err(format!(
                "expected `serial HEX` or `token NAME`, found {} fields",
                fields.len()
            )),
        };
        if let Err(e) = result {
            errors.push(format!("{label}:{n}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(r)
    } else {
        Err(errors.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_known_vectors() {
        assert_eq!(
            hash_secret(""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hash_secret("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Admin.allows(Role::Submit));
        assert!(Role::Submit.allows(Role::Read));
        assert!(Role::Read.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Submit));
        assert!(!Role::Submit.allows(Role::Admin));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        let err = "root".parse::<Role>().unwrap_err();
        assert!(err.contains("unknown role \"root\""), "{err}");
    }

    #[test]
    fn a_tokens_file_with_names_roles_and_hashes() {
        let alice = "alice-secret-0123456789";
        let text = format!(
            "# users\n\nalice admin {}\n  ci   submit  {}  \nro read {}\n",
            hash_secret(alice),
            hash_secret("ci-secret-0123456789"),
            hash_secret("ro-secret-0123456789")
                .to_uppercase()
                .replace("SHA256:", "sha256:"),
        );
        let f = parse_tokens_file(&text, "/etc/geomx/tokens").unwrap();
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
        let set = TokenSet::new(f.tokens).unwrap();
        assert_eq!(set.len(), 3);
        let t = set.find(alice).unwrap();
        assert_eq!((t.name.as_str(), t.role), ("alice", Role::Admin));
        assert_eq!(t.origin, "/etc/geomx/tokens:3");
        assert_eq!(set.find("ci-secret-0123456789").unwrap().role, Role::Submit);
        assert_eq!(set.find("ro-secret-0123456789").unwrap().name, "ro");
        assert!(set.find("nope-0123456789abcdef").is_none());
        assert!(
            set.find(&hash_secret(alice)).is_none(),
            "the hash is not the secret"
        );
        assert_eq!(set.summary(), "1 admin, 1 submit, 1 read");
    }

    #[test]
    fn the_plaintext_form_is_still_read_as_admin_with_a_warning() {
        let f = parse_tokens_file("# old\n0123456789abcdef-legacy\n", "tokens").unwrap();
        assert_eq!(f.tokens.len(), 1);
        assert_eq!(f.tokens[0].name, "token-2");
        assert_eq!(f.tokens[0].role, Role::Admin);
        assert!(f.tokens[0].is_plaintext());
        assert_eq!(f.warnings.len(), 1);
        assert!(
            f.warnings[0].starts_with("tokens:2: a plaintext token (deprecated)"),
            "{:?}",
            f.warnings
        );
        let set = TokenSet::new(f.tokens).unwrap();
        assert_eq!(set.find("0123456789abcdef-legacy").unwrap().name, "token-2");
    }

    #[test]
    fn bad_lines_are_named_by_file_and_line() {
        let h = hash_secret("x-0123456789abcdef");
        let text = format!(
            "a admin {h}\na read {}\nb root {}\nc read sha256:abc\nd read {} extra\nshort\nbad/name read {}\ne read {h}\n",
            hash_secret("1-0123456789abcdef"),
            hash_secret("2-0123456789abcdef"),
            hash_secret("3-0123456789abcdef"),
            hash_secret("4-0123456789abcdef"),
        );
        let err = parse_tokens_file(&text, "T").unwrap_err();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 7, "{err}");
        assert!(
            lines[0].starts_with("T:2: token name \"a\" is already used on line 1"),
            "{err}"
        );
        assert!(lines[1].starts_with("T:3: unknown role \"root\""), "{err}");
        assert!(
            lines[2].starts_with("T:4: sha256:abc: expected 64 hex"),
            "{err}"
        );
        assert!(lines[3].starts_with("T:5: expected `NAME ROLE"), "{err}");
        assert!(
            lines[4].starts_with("T:6: a token must have at least 16"),
            "{err}"
        );
        assert!(
            lines[5].starts_with("T:7: token name \"bad/name\""),
            "{err}"
        );
        assert!(
            lines[6].starts_with("T:8: the same secret as token \"a\""),
            "{err}"
        );
    }

    #[test]
    fn inline_tokens() {
        let toks = parse_inline_tokens(&[
            "0123456789abcdef".to_owned(),
            format!("ro read {}", hash_secret("ro-0123456789abcdef")),
            "0123456789abcdef".to_owned(),
        ])
        .unwrap();
        assert_eq!(toks.len(), 2);
        assert_eq!(
            (toks[0].name.as_str(), toks[0].role),
            ("inline-1", Role::Admin)
        );
        assert_eq!((toks[1].name.as_str(), toks[1].role), ("ro", Role::Read));
        let err = parse_inline_tokens(&["short"]).unwrap_err();
        assert!(err.starts_with("auth.tokens[0]: a token must"), "{err}");
        // a name in the file and inline at once
        let file = parse_tokens_file(
            &format!("ro read {}\n", hash_secret("other-0123456789")),
            "F",
        )
        .unwrap();
        let mut all = toks;
        all.extend(file.tokens);
        let err = TokenSet::new(all).unwrap_err();
        assert!(
            err.contains("F:1: token name \"ro\" is already used (auth.tokens[1])"),
            "{err}"
        );
    }

    #[test]
    fn serials_compare_as_numbers() {
        assert_eq!(normalize_serial("4A:01:FF").unwrap(), "4a01ff");
        assert_eq!(normalize_serial("00:4a:01:ff").unwrap(), "4a01ff");
        assert_eq!(normalize_serial("0x4a01ff").unwrap(), "4a01ff");
        assert_eq!(normalize_serial("00").unwrap(), "0");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
        assert_eq!(serial_of_bytes(&[0x00, 0x4a, 0x01, 0xff]), "4a01ff");
    }

    #[test]
    fn a_revocation_list() {
        let r = parse_revocations(
            "# stolen laptop\nserial 4a:01:ff   # agent a\ntoken ci\n\ntoken  ro # done\n",
            "R",
        )
        .unwrap();
        assert!(r.serial_revoked("4a01ff"));
        assert!(!r.serial_revoked("4a01fe"));
        assert!(r.token_revoked("ci") && r.token_revoked("ro"));
        assert!(!r.token_revoked("alice"));
        assert_eq!(r.summary(), "1 certificate, 2 tokens");
        let err = parse_revocations("serial zz\nuser bob\ntoken\ntoken a b\n", "R").unwrap_err();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 4, "{err}");
        assert!(
            lines[0].starts_with("R:1: \"zz\" is not a certificate serial"),
            "{err}"
        );
        assert!(lines[1].starts_with("R:2: unknown kind \"user\""), "{err}");
        assert!(lines[2].starts_with("R:3: expected `serial HEX`"), "{err}");
        assert!(lines[3].starts_with("R:4: expected"), "{err}");
    }
}
