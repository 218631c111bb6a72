//! TOML configuration files with errors located at file, line, column and key: the one
//! loader behind `/etc/geomx/controller.toml` and `/etc/geomx/agent.toml`.
//!
//! A program declares its file as a `serde` struct of typed, spanned fields
//! (`Option<Spanned<Ipv4Addr>>`, `Option<Spanned<HumanDuration>>`, a [`TlsTable`], ...)
//! with `deny_unknown_fields`, then:
//!
//! 1. [`ConfigFile::read`] reads the file given on the command line, or the default one if
//!    it exists;
//! 2. [`ConfigFile::parse`] deserializes it: a syntax error, an unknown key or a value of
//!    the wrong type is a [`ConfigError::Parse`] naming `file:line:col` (and the key, for a
//!    bad value);
//! 3. [`Settings::pick`] resolves each setting with the precedence flag (or its
//!    environment variable) > file > default, checks it, and remembers its origin
//!    (`file:line:col (key)` or `--flag / ENV`) for later errors ([`ConfigError::Invalid`]);
//!    [`Settings::tls`] does the same for the three TLS files.
//!
//! Relative paths in a file are relative to the file's directory ([`ConfigFile::path_of`]).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::tls::TlsFiles;

/// A TOML document that does not parse into the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {message}")]
pub struct TomlError {
    /// 1-based line of the problem.
    pub line: usize,
    /// 1-based column (in characters) of the problem.
    pub col: usize,
    /// What is wrong, as toml says it.
    pub message: String,
    /// The key whose value is wrong, when the problem is a value (`tls.ca`).
    pub key: Option<String>,
}

/// Parses `text` into `T` (unknown keys are refused when `T` says `deny_unknown_fields`).
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map(|s| s.start);
        let (line, col) = start.map_or((1, 1), |s| line_col(text, s));
        TomlError {
            line,
            col,
            message: e.message().trim().to_owned(),
            key: start.and_then(|s| key_at(text, s)),
        }
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// The dotted key whose value starts at byte `offset` (`None` when `offset` is not inside
/// a `key = value` line's value): the key on its line, prefixed by the last `[table]`
/// header above it.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset.min(text.len()))?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let head = before.get(line_start..)?;
    let eq = head.find('=')?;
    let key = head.get(..eq)?.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let table = before
        .get(..line_start)?
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// Errors reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// What the file was for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown or mistyped key.
    #[error("{}:{line}:{col}{}: {message}", path.display(), key.as_ref().map(|k| format!(" ({k})")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// The key whose value is wrong, if the problem is a value.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid; `origin` says where it came from.
    #[error("{origin}: {message}")]
    Invalid {
        /// `file:line:col (key)`, `--flag / ENV`, or the key when it has no better origin.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// A config file as read (or none): its text, for locating errors, and its directory, for
/// relative paths.
#[derive(Clone, Debug, Default)]
pub struct ConfigFile {
    path: Option<PathBuf>,
    text: String,
}

impl ConfigFile {
    /// Reads `explicit` (which must exist), or else `default` if it exists; no file at all
    /// is [`ConfigFile::default`] (every setting from flags and defaults).
    pub fn read(explicit: Option<&Path>, default: &Path) -> Result<ConfigFile, ConfigError> {
        let read = |path: &Path| std::fs::read_to_string(path);
        let error = |path: &Path, source| ConfigError::Read {
            what: "config file",
            path: path.to_owned(),
            source,
        };
        match explicit {
            Some(path) => Ok(ConfigFile::from_text(
                path,
                read(path).map_err(|e| error(path, e))?,
            )),
            None => match read(default) {
                Ok(text) => Ok(ConfigFile::from_text(default, text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
                Err(e) => Err(error(default, e)),
            },
        }
    }

    /// The file `path` with contents `text` (for tests, or text read elsewhere).
    pub fn from_text(path: &Path, text: impl Into<String>) -> ConfigFile {
        ConfigFile {
            path: Some(path.to_owned()),
            text: text.into(),
        }
    }

    /// The file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Deserializes the file into `T` (`T::default()` when there is no file).
    pub fn parse<T: DeserializeOwned + Default>(&self) -> Result<T, ConfigError> {
        let Some(path) = &self.path else {
            return Ok(T::default());
        };
        parse_toml(&self.text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            line: e.line,
            col: e.col,
            key: e.key,
            message: e.message,
        })
    }

    /// `file:line:col (key)` for a value at `span` of the file (`key` without a file).
    pub fn origin(&self, key: &str, span: Range<usize>) -> String {
        let (line, col) = line_col(&self.text, span.start);
        match &self.path {
            Some(p) => format!("{}:{line}:{col} ({key})", p.display()),
            None => key.to_owned(),
        }
    }

    /// `p` from the file: relative to the file's directory.
    pub fn path_of(&self, p: &Path) -> PathBuf {
        let base = self
            .path
            .as_ref()
            .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
            .and_then(|f| f.parent().map(Path::to_owned));
        match base {
            Some(dir) if p.is_relative() && !dir.as_os_str().is_empty() => dir.join(p),
            _ => p.to_owned(),
        }
    }
}

/// A duration in a config file, written the way people do: `"10s"`, `"500ms"`, `"7d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration ({e}), e.g. \"10s\" or \"500ms\""
                ))
            })
    }
}

/// The `[tls]` table both programs share.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsTable {
    /// CA certificate (PEM).
    pub ca: Option<Spanned<PathBuf>>,
    /// This program's certificate (PEM).
    pub cert: Option<Spanned<PathBuf>>,
    /// Its private key (PEM).
    pub key: Option<Spanned<PathBuf>>,
}

/// The TLS files given as flags.
#[derive(Clone, Debug, Default)]
pub struct TlsFlags {
    /// `--tls-ca`.
    pub ca: Option<PathBuf>,
    /// `--tls-cert`.
    pub cert: Option<PathBuf>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
}

/// What [`Settings::tls`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsPick {
    /// All three files.
    Complete(TlsFiles),
    /// None of them.
    None,
    /// Some, not all: the names of the missing ones (`ca`, `cert`, `key`).
    Incomplete(Vec<&'static str>),
}

/// A value with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// `file:line:col (key)` or `--flag / ENV`.
    pub origin: String,
}

/// Resolves the settings of one program from its flags and its [`ConfigFile`], and
/// remembers where each came from.
#[derive(Debug)]
pub struct Settings<'a> {
    file: &'a ConfigFile,
    env_prefix: &'static str,
    origins: HashMap<String, String>,
}

impl<'a> Settings<'a> {
    /// Settings from `file`; flags' environment variables are `env_prefix` + the flag in
    /// upper case (`GEOMX_CONTROLLER_` + `GRACE_PERIOD`).
    pub fn new(file: &'a ConfigFile, env_prefix: &'static str) -> Self {
        Settings {
            file,
            env_prefix,
            origins: HashMap::new(),
        }
    }

    /// The file.
    pub fn file(&self) -> &ConfigFile {
        self.file
    }

    /// `--flag / ENV` of `flag` (its long name without dashes).
    pub fn flag(&self, flag: &str) -> String {
        let env = format!(
            "{}{}",
            self.env_prefix,
            flag.to_uppercase().replace('-', "_")
        );
        format!("--{flag} / {env}")
    }

    /// The value of setting `key`: the flag `flag_name` if given (`flag_value`, as
    /// `Ok`), else the file's (`file_value`, as `Err`), else `None`; `check` validates and
    /// converts it, its error naming where the value came from.
    pub fn pick<A, F, T>(
        &mut self,
        key: &str,
        flag_name: &str,
        flag_value: Option<A>,
        file_value: Option<Spanned<F>>,
        check: impl FnOnce(Result<A, F>) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let (value, origin) = match (flag_value, file_value) {
            (Some(v), _) => (Ok(v), self.flag(flag_name)),
            (None, Some(s)) => {
                let origin = self.file.origin(key, s.span());
                (Err(s.into_inner()), origin)
            }
            (None, None) => return Ok(None),
        };
        let value = check(value).map_err(|message| ConfigError::Invalid {
            origin: origin.clone(),
            message,
        })?;
        self.origins.insert(key.to_owned(), origin);
        Ok(Some(value))
    }

    /// Like [`Settings::pick`] when the flag and the file have the same type and only need
    /// `check`.
    pub fn pick_same<T>(
        &mut self,
        key: &str,
        flag_name: &str,
        flag_value: Option<T>,
        file_value: Option<Spanned<T>>,
        check: impl FnOnce(T) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.pick(key, flag_name, flag_value, file_value, |v| {
            check(v.unwrap_or_else(|f| f))
        })
    }

    /// Where `key` came from, or `key (default)`.
    pub fn origin(&self, key: &str) -> String {
        self.origins
            .get(key)
            .cloned()
            .unwrap_or_else(|| format!("{key} (default)"))
    }

    /// An invalid-value error for `key`, at its origin.
    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin(key),
            message: message.into(),
        }
    }

    /// The TLS files: each from its flag or the `[tls]` table (relative to the file).
    pub fn tls(&self, flags: &TlsFlags, table: Option<TlsTable>) -> TlsPick {
        let table = table.unwrap_or_default();
        let pick = |flag: &Option<PathBuf>, f: Option<Spanned<PathBuf>>| {
            flag.clone()
                .or_else(|| f.map(|s| self.file.path_of(s.get_ref())))
        };
        match (
            pick(&flags.ca, table.ca),
            pick(&flags.cert, table.cert),
            pick(&flags.key, table.key),
        ) {
            (Some(ca), Some(cert), Some(key)) => TlsPick::Complete(TlsFiles { ca, cert, key }),
            (None, None, None) => TlsPick::None,
            (ca, cert, key) => TlsPick::Incomplete(
                [("ca", ca), ("cert", cert), ("key", key)]
                    .into_iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| k)
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("", 10), (1, 1));
        assert_eq!(line_col("é\nx", 3), (2, 1));
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Shape {
        name: Option<String>,
        every: Option<Spanned<HumanDuration>>,
        addr: Option<Spanned<std::net::Ipv4Addr>>,
        tls: Option<TlsTable>,
    }

    fn file(text: &str) -> ConfigFile {
        ConfigFile::from_text(Path::new("/etc/geomx/x.toml"), text)
    }

    #[test]
    fn errors_point_at_the_key() {
        let e = parse_toml::<Shape>("name = \"a\"\nnmae = \"b\"\n").unwrap_err();
        assert_eq!((e.line, e.col), (2, 1));
        assert!(e.message.contains("nmae"), "{e}");
        assert_eq!(e.key, None, "an unknown key is not a bad value");
        // a bad value names file, line, column and key
        let e = file("name = \"a\"\n\n[tls]\nca = 3\n")
            .parse::<Shape>()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/geomx/x.toml:4:6 (tls.ca): "), "{e}");
        let e = file("addr = \"10.1.1.300\"\n")
            .parse::<Shape>()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/geomx/x.toml:1:8 (addr): "), "{e}");
    }

    #[test]
    fn durations_through_the_helper() {
        let s: Shape = file("every = \"1m 30s\"\n").parse().unwrap();
        assert_eq!(
            s.every.map(|e| e.into_inner()),
            Some(HumanDuration(Duration::from_secs(90)))
        );
        let e = file("every = \"often\"\n")
            .parse::<Shape>()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/geomx/x.toml:1:9 (every): \"often\" is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn precedence_origins_and_tls() {
        let f = file("every = \"2s\"\n[tls]\nca = \"ca.pem\"\n");
        let shape: Shape = f.parse().unwrap();
        let mut settings = Settings::new(&f, "GEOMX_X_");
        let from_file = settings
            .pick_same("every", "every", None, shape.every, Ok)
            .unwrap();
        assert_eq!(from_file, Some(HumanDuration(Duration::from_secs(2))));
        assert_eq!(settings.origin("every"), "/etc/geomx/x.toml:1:9 (every)");
        let e = settings
            .pick_same::<u8>("port", "port", Some(0), None, |_| {
                Err("must not be 0".into())
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "--port / GEOMX_X_PORT: must not be 0");
        assert_eq!(settings.origin("other"), "other (default)");
        let flags = TlsFlags {
            cert: Some("/x/c.pem".into()),
            ..Default::default()
        };
        assert_eq!(
            settings.tls(&flags, shape.tls),
            TlsPick::Incomplete(vec!["key"])
        );
        let all = TlsFlags {
            key: Some("/x/k.pem".into()),
            ..flags
        };
        let f2 = file("[tls]\nca = \"ca.pem\"\n");
        let s2: Shape = f2.parse().unwrap();
        match Settings::new(&f2, "GEOMX_X_").tls(&all, s2.tls) {
            TlsPick::Complete(t) => assert_eq!(t.ca, PathBuf::from("/etc/geomx/ca.pem")),
            other => panic!("{other:?}"),
        }
        assert!(ConfigFile::default().parse::<Shape>().is_ok());
        let missing = ConfigFile::read(Some(Path::new("/nonexistent/x.toml")), Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("cannot read config file /nonexistent/x.toml"),
            "{missing}"
        );
    }
}
