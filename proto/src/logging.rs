//! Where the daemons' logs go: journald with structured fields under systemd, stderr
//! otherwise.
//!
//! Under systemd (a unit's stderr is connected to the journal: systemd sets
//! `JOURNAL_STREAM=<device>:<inode>` of that stream), events go to journald's native socket
//! through `tracing-journald`, each with its fields as journal fields: the fields of the
//! enclosing spans (`job`, `node`, `host`, ...) and of the event, upper-cased and without a
//! prefix, so that
//!
//! ```text
//! journalctl -u geomx-agent JOB=hips
//! journalctl -u geomx-controller HOST=a1 -o json
//! ```
//!
//! find one job's or one host's lines. Anywhere else (a terminal, a lab, a test), events
//! are written to stderr as text or JSON lines. `GEOMX_LOG_TARGET=stderr` (or `journald`)
//! forces one; journald that cannot be reached falls back to stderr with a warning.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variable forcing the log target: `stderr`, `journald` or `auto` (default).
pub const LOG_TARGET_ENV: &str = "GEOMX_LOG_TARGET";

/// Format of the stderr log (journald entries are always structured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StderrFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the log goes, as decided by [`choose_target`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// journald's native protocol, fields as journal fields.
    Journald,
    /// Lines on stderr.
    Stderr,
}

/// How a daemon logs.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// The filter used when neither `filter_env` nor `RUST_LOG` sets one (e.g. `info`).
    pub default_filter: String,
    /// A variable read before `RUST_LOG` for the filter (e.g. `GEOMX_LOG`), if any.
    pub filter_env: Option<&'static str>,
    /// The stderr format.
    pub format: StderrFormat,
    /// Whether stderr lines name the event's target (module path).
    pub with_target: bool,
    /// The journal's `SYSLOG_IDENTIFIER` (the binary's name).
    pub identifier: &'static str,
}

/// The target for `forced` (the value of [`LOG_TARGET_ENV`]), `journal_stream` (the value of
/// `JOURNAL_STREAM`) and `stderr_id` (stderr's device and inode): journald when forced, or
/// when not forced to stderr and stderr is the stream systemd connected to the journal.
/// An unknown forced value is an error naming it.
pub fn choose_target(
    forced: Option<&str>,
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
) -> Result<Target, String> {
    match forced.map(str::trim) {
        Some("journald") => return Ok(Target::Journald),
        Some("stderr") => return Ok(Target::Stderr),
        None | Some("") | Some("auto") => {}
        Some(other) => {
            return Err(format!(
                "{LOG_TARGET_ENV}={other:?}: expected auto, journald or stderr"
            ));
        }
    }
    let connected = journal_stream
        .and_then(|s| s.split_once(':'))
        .and_then(|(dev, ino)| Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?)));
    match (connected, stderr_id) {
        (Some(j), Some(e)) if j == e => Ok(Target::Journald),
        _ => Ok(Target::Stderr),
    }
}

/// Device and inode of stderr, as `JOURNAL_STREAM` names them.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self/fd/2").ok()?;
    Some((meta.dev(), meta.ino()))
}

fn filter(options: &LogOptions) -> EnvFilter {
    options
        .filter_env
        .and_then(|var| std::env::var(var).ok())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(&options.default_filter))
}

/// Installs the global subscriber for `options`: journald or stderr (see the module
/// documentation). Returns the target chosen. Call once, first thing in `main`.
pub fn init(options: &LogOptions) -> Target {
    let forced = std::env::var(LOG_TARGET_ENV).ok();
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    let (target, problem) =
        match choose_target(forced.as_deref(), journal_stream.as_deref(), stderr_id()) {
            Ok(t) => (t, None),
            Err(e) => (Target::Stderr, Some(e)),
        };
    if target == Target::Journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier(options.identifier.to_string());
                tracing_subscriber::registry()
                    .with(filter(options))
                    .with(layer)
                    .init();
                return Target::Journald;
            }
            Err(e) => {
                init_stderr(options);
                tracing::warn!("journald is not reachable ({e}): logging to stderr");
                return Target::Stderr;
            }
        }
    }
    init_stderr(options);
    if let Some(problem) = problem {
        tracing::warn!("{problem}; logging to stderr");
    }
    Target::Stderr
}

fn init_stderr(options: &LogOptions) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(options))
        .with_target(options.with_target)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match options.format {
        StderrFormat::Text => builder.init(),
        StderrFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_follows_the_journal_stream_and_the_override() {
        let err = Some((12, 34));
        /// (GEOMX_LOG_TARGET, JOURNAL_STREAM, stderr's device and inode, expected)
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<(u64, u64)>, Target);
        let cases: &[Case] = &[
            // under systemd: stderr is the journal stream
            (None, Some("12:34"), err, Target::Journald),
            (Some("auto"), Some("12:34"), err, Target::Journald),
            // stderr redirected elsewhere by the service (e.g. `2>file`): not the journal
            (None, Some("12:35"), err, Target::Stderr),
            (None, Some("garbage"), err, Target::Stderr),
            (None, None, err, Target::Stderr),
            (None, Some("12:34"), None, Target::Stderr),
            // forced
            (Some("stderr"), Some("12:34"), err, Target::Stderr),
            (Some("journald"), None, None, Target::Journald),
        ];
        for (forced, stream, id, want) in cases {
            assert_eq!(
                choose_target(*forced, *stream, *id).unwrap(),
                *want,
                "{forced:?} {stream:?} {id:?}"
            );
        }
        let e = choose_target(Some("syslog"), None, None).unwrap_err();
        assert!(
            e.contains("GEOMX_LOG_TARGET") && e.contains("syslog"),
            "{e}"
        );
    }
}
