//! Reading a job file: TOML syntax, the file format (serde, unknown keys refused), then
//! validation, every problem located at its line and column.
//!
//! The text is parsed once into toml's spanned document tree. From it come (1) a map from
//! field paths (`party[1].servers`) to their spans, used to place validation problems, and
//! (2) the typed [`JobSpec`] via serde. When serde refuses the document, each section is
//! deserialized on its own so that every section's problem is reported, not just the first.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::error::{ErrorKind, JobError, JobErrors, LineIndex, MAX_REPORTED_PROBLEMS};
use crate::spec::{
    CentralSpec, CommandSpec, EnvSpec, ImagePull, JobSpec, Mode, MountSpec, Network, PartySpec,
    PolicySpec, ProgressSpec, ResourceLimits, ResourcesSpec,
};
use crate::validate::{Problem, problems};

/// Top-level keys of a job file, in documentation order.
pub const TOP_LEVEL_KEYS: [&str; 15] = [
    "name",
    "mode",
    "image",
    "image_pull",
    "network",
    "interface",
    "verbose",
    "command",
    "env",
    "central",
    "party",
    "policy",
    "progress",
    "mount",
    "resources",
];
const REQUIRED_TOP_LEVEL_KEYS: [(&str, &str); 3] = [
    ("name", "the job name, e.g. name = \"hips-mnist\""),
    ("mode", "mode = \"hips\" or mode = \"ps\""),
    (
        "image",
        "the container image every node runs, e.g. image = \"lizonghango00o1/geomx:cpu-only\"",
    ),
];

/// Spans of every key and value in a document, by field path.
#[derive(Debug, Default)]
struct Spans {
    /// path → (key span, value span); ordered, so that a field's subtree is a range.
    map: BTreeMap<String, (Range<usize>, Range<usize>)>,
}

impl Spans {
    fn from_doc(doc: &Spanned<DeTable<'_>>) -> Spans {
        let mut spans = Spans::default();
        spans.table("", doc.get_ref());
        spans
    }

    fn table(&mut self, prefix: &str, table: &DeTable<'_>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            self.map.insert(path.clone(), (key.span(), value.span()));
            self.value(&path, value);
        }
    }

    fn value(&mut self, path: &str, value: &Spanned<DeValue<'_>>) {
        match value.get_ref() {
            DeValue::Table(t) => self.table(path, t),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    self.map
                        .insert(item_path.clone(), (item.span(), item.span()));
                    self.value(&item_path, item);
                }
            }
            _ => {}
        }
    }

    /// The field whose value span is the smallest one containing `span`, among `within`
    /// and the fields under it (`within.key`, `within[i]`). Looks at that subtree only, so
    /// placing one problem per `[[party]]` stays linear in the file.
    fn innermost(&self, within: &str, span: &Range<usize>) -> Option<String> {
        // Every path starting with "X." sorts in ["X.", "X/"), with "X[" in ["X[", "X\\").
        let under = |open: char, close: char| {
            self.map
                .range(format!("{within}{open}")..format!("{within}{close}"))
        };
        self.map
            .get_key_value(within)
            .into_iter()
            .chain(under('.', '/'))
            .chain(under('[', '\\'))
            .filter(|(_, (_, v))| v.start <= span.start && span.end <= v.end)
            .min_by_key(|(path, (_, v))| (v.end - v.start, std::cmp::Reverse(path.len())))
            .map(|(path, _)| path.clone())
    }

    /// The best span for a field: itself, else its closest located ancestor.
    fn locate(&self, field: &str, at_key: bool) -> Option<Range<usize>> {
        let mut path = field;
        loop {
            if let Some((key, value)) = self.map.get(path) {
                return Some(if at_key { key.clone() } else { value.clone() });
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

/// A problem and the byte offset it is about; its line and column are worked out only for
/// the problems that are reported (see [`sorted`]).
struct Located {
    offset: Option<usize>,
    error: JobError,
}

/// Builds errors for one file.
struct Reporter<'a> {
    file: &'a str,
    src: &'a str,
}

impl Reporter<'_> {
    fn at(
        &self,
        span: Option<Range<usize>>,
        field: Option<String>,
        kind: ErrorKind,
        message: String,
    ) -> Located {
        Located {
            offset: span.map(|s| s.start),
            error: JobError {
                file: self.file.to_string(),
                line: None,
                col: None,
                field,
                kind,
                message,
            },
        }
    }

    fn toml(&self, e: &toml::de::Error, field: Option<String>, kind: ErrorKind) -> Located {
        let message = e.message().trim().replace('\n', " ");
        self.at(e.span(), field, kind, message)
    }
}

/// Reads and validates a job file. `file` names it in messages; `src` is its text.
///
/// Returns every problem found: all syntax errors; else every section's format error
/// (unknown keys, wrong types, missing keys); else every validation problem.
pub fn parse(file: &str, src: &str) -> Result<JobSpec, JobErrors> {
    let r = Reporter { file, src };
    let (doc, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        // A garbage file can have a syntax error every other byte: build only those that
        // can be reported, in file order, and count the rest.
        let mut order: Vec<(bool, Option<usize>, usize)> = syntax
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let at = e.span().map(|s| s.start);
                (at.is_none(), at, i)
            })
            .collect();
        order.sort_unstable();
        let dropped = order.len().saturating_sub(MAX_REPORTED_PROBLEMS + 1);
        order.truncate(MAX_REPORTED_PROBLEMS + 1);
        let errors = order
            .into_iter()
            .filter_map(|(_, _, i)| syntax.get(i))
            .map(|e| {
                let mut located = r.toml(e, None, ErrorKind::Syntax);
                if let Some(key) = e.span().and_then(|s| src.get(s))
                    && located.error.message == "duplicate key"
                {
                    located.error.message = format!("duplicate key `{key}`");
                }
                located
            })
            .collect();
        return Err(sorted(&r, errors, dropped));
    }
    let spans = Spans::from_doc(&doc);

    let spec = match JobSpec::deserialize(toml::de::Deserializer::from(doc.clone())) {
        Ok(spec) => spec,
        Err(whole) => {
            let mut errors = diagnose(&r, &doc, &spans);
            if errors.is_empty() {
                errors.push(r.toml(&whole, None, ErrorKind::Schema));
            }
            return Err(sorted(&r, errors, 0));
        }
    };

    let found = problems(&spec);
    if found.is_empty() {
        return Ok(spec);
    }
    let errors = found
        .into_iter()
        .map(
            |Problem {
                 field,
                 at_key,
                 message,
             }| {
                let span = spans.locate(&field, at_key);
                r.at(span, Some(field), ErrorKind::Invalid, message)
            },
        )
        .collect();
    Err(sorted(&r, errors, 0))
}

/// Problems sorted by position (unlocated ones last, in the order found), each placed at
/// its line and column; at most [`MAX_REPORTED_PROBLEMS`], then one entry saying how many
/// more there were (`dropped` of them already left out by the caller).
fn sorted(r: &Reporter<'_>, mut errors: Vec<Located>, dropped: usize) -> JobErrors {
    errors.sort_by_key(|e| (e.offset.is_none(), e.offset));
    let lines = LineIndex::new(r.src);
    let mut out: Vec<JobError> = Vec::new();
    let mut left = errors.into_iter();
    for Located { offset, mut error } in left.by_ref() {
        if let Some(offset) = offset {
            let (line, col) = lines.line_col(r.src, offset);
            error.line = Some(line);
            error.col = Some(col);
        }
        if out.last() != Some(&error) {
            out.push(error);
        }
        if out.len() == MAX_REPORTED_PROBLEMS {
            break;
        }
    }
    let mut more = left.map(|l| l.error);
    if let Some(next) = more.next() {
        let n = 1 + more.count() + dropped;
        out.push(JobError {
            file: r.file.to_string(),
            line: None,
            col: None,
            field: None,
            kind: next.kind,
            message: format!(
                "... and {n} more problem{} (only the first {MAX_REPORTED_PROBLEMS} are shown)",
                if n == 1 { "" } else { "s" }
            ),
        });
    }
    JobErrors(out)
}

/// Keys of the sub-tables, for reporting every unknown key (serde stops at the first).
/// A unit test checks them against the structs.
const COMMAND_KEYS: [&str; 4] = ["scheduler", "server", "worker", "master"];
const ENV_KEYS: [&str; 5] = ["all", "schedulers", "servers", "master", "workers"];
const CENTRAL_KEYS: [&str; 5] = [
    "host",
    "global_scheduler_port",
    "scheduler_port",
    "global_servers",
    "workers",
];
const PARTY_KEYS: [&str; 5] = ["name", "hosts", "workers", "scheduler_port", "servers"];
const POLICY_KEYS: [&str; 10] = [
    "restart",
    "max_restarts",
    "stall_timeout",
    "gpus_per_worker",
    "teardown_grace",
    "restart_delay",
    "active_deadline",
    "retry_exit_codes",
    "rendezvous_timeout",
    "pull_timeout",
];
const PROGRESS_KEYS: [&str; 3] = ["regex", "finished", "iterations"];
const MOUNT_KEYS: [&str; 7] = [
    "type", "source", "target", "roles", "readonly", "driver", "options",
];
const RESOURCE_KEYS: [&str; 4] = ["memory", "cpus", "pids", "shm_size"];

/// serde's words for TOML types, in TOML's words.
fn friendlier(message: &str) -> String {
    message
        .replace("missing field", "missing key")
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number")
        .replace("expected a sequence", "expected an array")
        .replace("expected a map", "expected a table")
        .replace("expected struct ", "expected a table ")
}

fn one_of(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deserializes each top-level section on its own, collecting every format error.
fn diagnose(r: &Reporter<'_>, doc: &Spanned<DeTable<'_>>, spans: &Spans) -> Vec<Located> {
    let table = doc.get_ref();
    let party_names = match table.get("party").map(|v| v.get_ref()) {
        Some(DeValue::Array(items)) => items
            .iter()
            .map(|item| {
                item.get_ref()
                    .as_table()
                    .and_then(|t| t.get("name"))
                    .and_then(|n| n.get_ref().as_str())
                    .filter(|n| crate::validate::is_valid_name(n, crate::spec::limits::NAME_MAX))
                    .map(str::to_string)
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut d = Diagnosis {
        r,
        spans,
        party_names,
        errors: Vec::new(),
    };
    for (key, value) in table {
        let name: &str = key.get_ref();
        let field = name.to_string();
        match name {
            "name" | "image" | "interface" => d.check::<String>(field, value),
            "mode" => d.check::<Mode>(field, value),
            "network" => d.check::<Network>(field, value),
            "image_pull" => d.check::<ImagePull>(field, value),
            "verbose" => d.check::<i64>(field, value),
            "command" => d.table::<CommandSpec>(field, "[command]", &COMMAND_KEYS, value),
            "central" => d.table::<CentralSpec>(field, "[central]", &CENTRAL_KEYS, value),
            "policy" => d.table::<PolicySpec>(field, "[policy]", &POLICY_KEYS, value),
            "progress" => d.table::<ProgressSpec>(field, "[progress]", &PROGRESS_KEYS, value),
            "env" => match value.get_ref() {
                DeValue::Table(classes) => {
                    d.unknown_keys(&field, "[env]", &ENV_KEYS, classes);
                    for (class, vars) in classes {
                        if ENV_KEYS.contains(&class.get_ref().as_ref()) {
                            d.check::<BTreeMap<String, String>>(
                                format!("env.{}", class.get_ref()),
                                vars,
                            );
                        }
                    }
                }
                _ => d.check::<EnvSpec>(field, value),
            },
            "mount" => match value.get_ref() {
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let field = format!("mount[{i}]");
                        let what = d.human(&field);
                        d.table::<MountSpec>(field, &what, &MOUNT_KEYS, item);
                    }
                }
                DeValue::Table(_) => d.errors.push(r.at(
                    Some(value.span()),
                    Some(field),
                    ErrorKind::Schema,
                    "mount must be an array of tables: write [[mount]], not [mount]".to_string(),
                )),
                _ => d.check::<Vec<MountSpec>>(field, value),
            },
            "resources" => match value.get_ref() {
                DeValue::Table(classes) => {
                    d.unknown_keys(&field, "[resources]", &ENV_KEYS, classes);
                    for (class, limits) in classes {
                        if ENV_KEYS.contains(&class.get_ref().as_ref()) {
                            let field = format!("resources.{}", class.get_ref());
                            let what = format!("[{field}]");
                            d.table::<ResourceLimits>(field, &what, &RESOURCE_KEYS, limits);
                        }
                    }
                }
                _ => d.check::<ResourcesSpec>(field, value),
            },
            "party" => match value.get_ref() {
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let field = format!("party[{i}]");
                        let what = d.human(&field);
                        d.table::<PartySpec>(field, &what, &PARTY_KEYS, item);
                    }
                }
                DeValue::Table(_) => d.errors.push(r.at(
                    Some(value.span()),
                    Some(field),
                    ErrorKind::Schema,
                    "party must be an array of tables: write [[party]], not [party]".to_string(),
                )),
                _ => d.check::<Vec<PartySpec>>(field, value),
            },
            _ => d.errors.push(r.at(
                Some(key.span()),
                Some(field),
                ErrorKind::Schema,
                format!(
                    "unknown key `{name}`, expected one of {}",
                    one_of(&TOP_LEVEL_KEYS)
                ),
            )),
        }
    }
    for (key, what) in REQUIRED_TOP_LEVEL_KEYS {
        if !table.contains_key(key) {
            d.errors.push(r.at(
                None,
                Some(key.to_string()),
                ErrorKind::Schema,
                format!("missing required key `{key}`: {what}"),
            ));
        }
    }
    d.errors
}

struct Diagnosis<'a, 'r> {
    r: &'a Reporter<'r>,
    spans: &'a Spans,
    /// Valid names of the `[[party]]` tables, by index.
    party_names: Vec<Option<String>>,
    errors: Vec<Located>,
}

impl Diagnosis<'_, '_> {
    fn check<T: DeserializeOwned>(&mut self, field: String, value: &Spanned<DeValue<'_>>) {
        let mut owned = value.clone();
        owned.get_mut().make_owned();
        if let Err(e) = T::deserialize(ValueDeserializer::from(owned)) {
            // Name the innermost field the error is about.
            let field = e
                .span()
                .and_then(|span| self.spans.innermost(&field, &span))
                .unwrap_or(field);
            let mut located = self.r.toml(&e, Some(field.clone()), ErrorKind::Schema);
            located.error.message = format!(
                "{}: {}",
                self.human(&field),
                friendlier(&located.error.message)
            );
            self.errors.push(located);
        }
    }

    /// How a field path reads in a message: `party "a": workers`, `[env.servers]: X`.
    fn human(&self, field: &str) -> String {
        if let Some(rest) = field.strip_prefix("party[") {
            let (index, rest) = rest.split_once(']').unwrap_or((rest, ""));
            let ctx = match index.parse::<usize>() {
                Ok(i) => match self.party_names.get(i) {
                    Some(Some(name)) => format!("party {name:?}"),
                    _ => format!("[[party]] #{}", i + 1),
                },
                Err(_) => "[[party]]".to_string(),
            };
            return match rest.strip_prefix('.') {
                Some(key) => format!("{ctx}: {key}"),
                None => ctx,
            };
        }
        if let Some(rest) = field.strip_prefix("mount[") {
            let (index, rest) = rest.split_once(']').unwrap_or((rest, ""));
            let ctx = match index.parse::<usize>() {
                Ok(i) => format!("[[mount]] #{}", i + 1),
                Err(_) => "[[mount]]".to_string(),
            };
            return match rest.strip_prefix('.') {
                Some(key) => format!("{ctx}: {key}"),
                None => ctx,
            };
        }
        if let Some(rest) = field.strip_prefix("resources.") {
            return match rest.split_once('.') {
                Some((class, key)) => format!("[resources.{class}]: {key}"),
                None => format!("[resources.{rest}]"),
            };
        }
        if let Some(rest) = field.strip_prefix("env.") {
            return match rest.split_once('.') {
                Some((class, var)) => format!("[env.{class}]: {var}"),
                None => format!("[env.{rest}]"),
            };
        }
        for table in [
            "command",
            "central",
            "policy",
            "progress",
            "env",
            "resources",
        ] {
            if field == table {
                return format!("[{table}]");
            }
            if let Some(key) = field.strip_prefix(table).and_then(|r| r.strip_prefix('.')) {
                return format!("[{table}]: {key}");
            }
        }
        field.to_string()
    }

    fn unknown_keys(&mut self, field: &str, what: &str, known: &[&str], table: &DeTable<'_>) {
        for key in table.keys() {
            if !known.contains(&key.get_ref().as_ref()) {
                self.errors.push(self.r.at(
                    Some(key.span()),
                    Some(format!("{field}.{}", key.get_ref())),
                    ErrorKind::Schema,
                    format!(
                        "unknown key `{}` in {what}, expected one of {}",
                        key.get_ref(),
                        one_of(known)
                    ),
                ));
            }
        }
    }

    /// Reports every unknown key of a table, then deserializes the rest.
    fn table<T: DeserializeOwned>(
        &mut self,
        field: String,
        what: &str,
        known: &[&str],
        value: &Spanned<DeValue<'_>>,
    ) {
        let DeValue::Table(table) = value.get_ref() else {
            return self.check::<T>(field, value);
        };
        self.unknown_keys(&field, what, known, table);
        let mut rest = DeTable::new();
        for (k, v) in table {
            if known.contains(&k.get_ref().as_ref()) {
                rest.insert(k.clone(), v.clone());
            }
        }
        let rest = Spanned::new(value.span(), DeValue::Table(rest));
        self.check::<T>(field, &rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
mode = "hips"
image = "img"

[central]
host = "a"

[[party]]
name = "p"
hosts = ["a"]
workers = 2
"#;

    fn keys<T: serde::Serialize>(value: &T) -> Vec<String> {
        let value = toml::Value::try_from(value).expect("serializes");
        let mut keys: Vec<String> = value.as_table().expect("table").keys().cloned().collect();
        keys.sort();
        keys
    }

    fn sorted_keys(list: &[&str]) -> Vec<String> {
        let mut keys: Vec<String> = list.iter().map(|k| k.to_string()).collect();
        keys.sort();
        keys
    }

    #[test]
    fn key_lists_match_the_structs() {
        let vars = || BTreeMap::from([("A".to_string(), "1".to_string())]);
        let argv = || Some(vec!["x".to_string()]);
        let limits = || ResourceLimits {
            memory: Some("1g".into()),
            cpus: Some(crate::spec::Cpus(1.0)),
            pids: Some(100),
            shm_size: Some("1g".into()),
        };
        let spec = JobSpec {
            name: "n".into(),
            mode: Mode::Hips,
            image: "i".into(),
            image_pull: ImagePull::Always,
            network: Network::Routed,
            interface: Some("eth0".into()),
            verbose: Some(1),
            command: CommandSpec {
                scheduler: argv(),
                server: argv(),
                worker: argv(),
                master: argv(),
            },
            env: EnvSpec {
                all: vars(),
                schedulers: vars(),
                servers: vars(),
                master: vars(),
                workers: vars(),
            },
            central: Some(CentralSpec {
                host: "h".into(),
                global_scheduler_port: 1,
                scheduler_port: 2,
                global_servers: 1,
                workers: 0,
            }),
            parties: vec![PartySpec {
                name: "p".into(),
                hosts: vec!["h".into()],
                workers: 1,
                scheduler_port: Some(3),
                servers: 1,
            }],
            policy: PolicySpec {
                restart: crate::spec::RestartPolicy::Never,
                max_restarts: Some(0),
                stall_timeout: Some("1m".into()),
                gpus_per_worker: 0,
                teardown_grace: Some("10s".into()),
                restart_delay: Some("1s".into()),
                active_deadline: Some("1h".into()),
                retry_exit_codes: Some(vec![137]),
                rendezvous_timeout: Some("5m".into()),
                pull_timeout: Some("30m".into()),
            },
            progress: Some(ProgressSpec {
                regex: "x".into(),
                finished: Some("done".into()),
                iterations: Some(1),
            }),
            mounts: vec![MountSpec {
                kind: crate::spec::MountType::Volume,
                source: "v".into(),
                target: "/v".into(),
                roles: Some(vec!["all".into()]),
                readonly: true,
                driver: Some("local".into()),
                options: BTreeMap::from([("o".to_string(), "x".to_string())]),
            }],
            resources: ResourcesSpec {
                all: limits(),
                schedulers: limits(),
                servers: limits(),
                master: limits(),
                workers: limits(),
            },
        };
        assert_eq!(keys(&spec), sorted_keys(&TOP_LEVEL_KEYS));
        assert_eq!(keys(&spec.command), sorted_keys(&COMMAND_KEYS));
        assert_eq!(keys(&spec.env), sorted_keys(&ENV_KEYS));
        assert_eq!(keys(&spec.central), sorted_keys(&CENTRAL_KEYS));
        assert_eq!(keys(&spec.parties[0]), sorted_keys(&PARTY_KEYS));
        assert_eq!(keys(&spec.policy), sorted_keys(&POLICY_KEYS));
        assert_eq!(keys(&spec.progress), sorted_keys(&PROGRESS_KEYS));
        assert_eq!(keys(&spec.mounts[0]), sorted_keys(&MOUNT_KEYS));
        assert_eq!(keys(&spec.resources), sorted_keys(&ENV_KEYS));
        assert_eq!(keys(&spec.resources.all), sorted_keys(&RESOURCE_KEYS));
    }

    #[test]
    fn minimal_hips_job_parses_with_defaults() {
        let spec = parse("t.toml", MINIMAL).expect("valid");
        assert_eq!(spec.interface(), "eth0");
        assert_eq!(spec.network, Network::Routed);
        let central = spec.central.as_ref().expect("central");
        assert_eq!(central.global_scheduler_port, 9092);
        assert_eq!(central.scheduler_port, 9093);
        assert_eq!(central.global_servers, 1);
        assert_eq!(central.workers, 0);
        assert_eq!(spec.parties[0].servers, 1);
        assert_eq!(spec.party_scheduler_port(0), 9094);
    }

    #[test]
    fn image_pull_and_pull_timeout() {
        let spec = parse("t.toml", MINIMAL).expect("valid");
        assert_eq!(spec.image_pull, ImagePull::IfNotPresent);
        assert_eq!(spec.policy.pull_timeout_text(), "30m");
        let plan = crate::plan("t.toml", MINIMAL).expect("valid");
        assert_eq!(plan.image_pull, ImagePull::IfNotPresent);
        assert_eq!(plan.policy.pull_timeout.as_secs(), 1800);
        for (text, want) in [
            ("always", ImagePull::Always),
            ("never", ImagePull::Never),
            ("if-not-present", ImagePull::IfNotPresent),
        ] {
            let src = MINIMAL.replace(
                "image = \"img\"\n",
                &format!("image = \"img\"\nimage_pull = \"{text}\"\n"),
            );
            assert_eq!(parse("t.toml", &src).expect("valid").image_pull, want);
        }
        let src = MINIMAL.replace(
            "image = \"img\"\n",
            "image = \"img\"\nimage_pull = \"sometimes\"\n",
        );
        let text = parse("t.toml", &src).expect_err("invalid").to_string();
        assert!(
            text.starts_with("t.toml:5:14: image_pull: unknown variant `sometimes`, expected one of `if-not-present`, `always`, `never`"),
            "{text}"
        );
        let src = format!("{MINIMAL}\n[policy]\npull_timeout = \"soon\"\n");
        let text = parse("t.toml", &src).expect_err("invalid").to_string();
        assert!(
            text.contains("pull_timeout = \"soon\" is not a duration"),
            "{text}"
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let errs = parse("t.toml", "name = \"t\"\nmode = \n").expect_err("invalid");
        let e = &errs.errors()[0];
        assert_eq!(e.kind, ErrorKind::Syntax);
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn every_sections_format_error_is_reported() {
        let src = format!("foo = 1\n{MINIMAL}\n[policy]\nrestart = \"sometimes\"\n");
        let src = src.replace("host = \"a\"", "host = \"a\"\nworkers = \"x\"");
        let src = src.replace("workers = 2", "workers = 2\nservrs = 1");
        let errs = parse("t.toml", &src).expect_err("invalid");
        let text = errs.to_string();
        assert_eq!(errs.len(), 4, "{text}");
        assert!(text.contains("unknown key `servrs`"), "{text}");
        assert!(text.contains("invalid type: string \"x\""), "{text}");
        assert!(text.contains("unknown key `foo`"), "{text}");
        assert!(text.contains("unknown variant `sometimes`"), "{text}");
        assert!(errs.errors().iter().all(|e| e.line.is_some()), "{text}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let src = MINIMAL.replace("image = \"img\"\n", "");
        let errs = parse("t.toml", &src).expect_err("invalid");
        assert_eq!(
            errs.to_string(),
            "t.toml: image: missing required key `image`: the container image every node runs, e.g. image = \"lizonghango00o1/geomx:cpu-only\""
        );
    }

    #[test]
    fn validation_problems_point_at_the_value() {
        let src = MINIMAL.replace("workers = 2", "workers = 2\nservers = 2");
        let errs = parse("hips.toml", &src).expect_err("invalid");
        assert_eq!(
            errs.to_string(),
            "hips.toml:13:11: party \"p\": servers = 2, but mode \"hips\" requires exactly 1 server per party (ps-lite aborts: \"load balance at the first layer is not supported\")"
        );
    }
}
