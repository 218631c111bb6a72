//! Editing Docker's daemon.json: the keys geomx manages, everything else kept, and what the
//! file held before geomx so that cleanup can give it back.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::desired::DesiredNetwork;
use crate::error::{NetError, Result};
use crate::kernel::DockerVersion;

/// The daemon.json keys geomx sets (and restores on cleanup).
pub const MANAGED_KEYS: [&str; 3] = ["bip", "ip-masq", "allow-direct-routing"];

/// A parsed daemon.json (a JSON object).
pub type Doc = serde_json::Map<String, Value>;

/// One key changed in daemon.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    /// The key.
    pub key: String,
    /// Its value before (`None`: absent).
    pub before: Option<Value>,
    /// Its value after (`None`: absent).
    pub after: Option<Value>,
}

impl fmt::Display for KeyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<Value>| v.as_ref().map_or("absent".to_string(), Value::to_string);
        write!(
            f,
            "{}: {} -> {}",
            self.key,
            show(&self.before),
            show(&self.after)
        )
    }
}

/// Parses daemon.json; a missing or blank file is an empty object.
pub fn parse(path: &Path, text: Option<&str>) -> Result<Doc> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Ok(Doc::new());
    };
    let value: Value = serde_json::from_str(text).map_err(|e| NetError::MalformedDaemonJson {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: strip_position(&e.to_string()),
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(NetError::DaemonJsonNotObject {
            path: path.to_path_buf(),
            found: match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            },
        }),
    }
}

/// serde_json appends " at line L column C"; the error carries them separately.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// The file's text for a document: pretty JSON and a final newline.
pub fn render(doc: &Doc) -> String {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

/// The values geomx wants: `bip`, `"ip-masq": false`, and on Docker 28 or newer
/// `"allow-direct-routing": true`.
pub fn settings(desired: &DesiredNetwork, docker: &DockerVersion) -> Vec<(&'static str, Value)> {
    let mut v = vec![
        ("bip", Value::String(desired.bip().to_string())),
        ("ip-masq", Value::Bool(false)),
    ];
    if docker.needs_allow_direct_routing() {
        v.push(("allow-direct-routing", Value::Bool(true)));
    }
    v
}

/// `doc` with `settings` applied, and what changed.
pub fn apply(doc: &Doc, settings: &[(&'static str, Value)]) -> (Doc, Vec<KeyChange>) {
    let mut out = doc.clone();
    let mut changes = Vec::new();
    for (key, value) in settings {
        let before = doc.get(*key).cloned();
        if before.as_ref() != Some(value) {
            out.insert(key.to_string(), value.clone());
            changes.push(KeyChange {
                key: key.to_string(),
                before,
                after: Some(value.clone()),
            });
        }
    }
    (out, changes)
}

/// What daemon.json held before geomx first changed it, kept in the state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Format of this record.
    pub format: u32,
    /// The keys geomx manages.
    pub managed: Vec<String>,
    /// Values of the managed keys that were present; a managed key missing here was absent.
    pub before: BTreeMap<String, Value>,
    /// The whole file as it was (`None`: there was no file).
    pub original: Option<String>,
    /// docker0's addresses before geomx (Docker keeps the last bridge subnet in its own
    /// store when bip is unset, so cleanup needs them to bring docker0 back).
    pub docker0: Vec<Ipv4Net>,
    /// The cluster CIDR geomx's routes lie in: cleanup removes protocol 247 routes only
    /// inside it, also from a process that never ran a pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Ipv4Net>,
}

/// daemon.json as cleanup gives it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The file's new text; `None` removes the file (there was none before geomx).
    pub text: Option<String>,
    /// The managed keys that change.
    pub changes: Vec<KeyChange>,
}

impl Remembered {
    /// Records the file `text` (parsed as `doc`) and docker0's current addresses.
    pub fn capture(text: Option<&str>, doc: &Doc, docker0: Vec<Ipv4Net>) -> Remembered {
        Remembered {
            format: 1,
            managed: MANAGED_KEYS.iter().map(|k| k.to_string()).collect(),
            before: MANAGED_KEYS
                .iter()
                .filter_map(|k| doc.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect(),
            original: text.map(str::to_string),
            docker0,
            cluster: None,
        }
    }

    /// Parses the state file.
    pub fn from_json(path: &Path, text: &str) -> Result<Remembered> {
        serde_json::from_str(text).map_err(|e| NetError::CorruptState {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The state file's text.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// The managed keys of `current` set back to what they were. When nothing else in the
    /// file changed since geomx took it over, the original text comes back byte for byte.
    pub fn restore(&self, current: &Doc) -> Restored {
        let mut restored = current.clone();
        let mut changes = Vec::new();
        for key in &self.managed {
            let now = current.get(key).cloned();
            let then = self.before.get(key).cloned();
            match &then {
                Some(v) => {
                    restored.insert(key.clone(), v.clone());
                }
                None => {
                    restored.remove(key);
                }
            }
            if now != then {
                changes.push(KeyChange {
                    key: key.clone(),
                    before: now,
                    after: then,
                });
            }
        }
        let original_doc = self
            .original
            .as_deref()
            .map(|t| parse(Path::new("original"), Some(t)).unwrap_or_default())
            .unwrap_or_default();
        let text = if restored == original_doc {
            self.original.clone()
        } else {
            Some(render(&restored))
        };
        Restored { text, changes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredNetwork {
        DesiredNetwork {
            subnet: "172.17.34.0/24".parse().expect("net"),
            cluster: "172.17.0.0/16".parse().expect("net"),
            peers: vec![],
            backend: Default::default(),
        }
    }

    fn docker(v: &str) -> DockerVersion {
        DockerVersion {
            version: v.into(),
            api_version: "1.41".into(),
        }
    }

    #[test]
    fn malformed_json_names_file_line_and_column() {
        let e = parse(
            Path::new("/etc/docker/daemon.json"),
            Some("{\n  \"bip\": ,\n}"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/docker/daemon.json: malformed JSON at line 2, column 10: expected value"
        );
        let e = parse(Path::new("d.json"), Some("[1]")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "d.json: expected a JSON object at the top level, found an array"
        );
        assert!(parse(Path::new("d.json"), None).expect("empty").is_empty());
        assert!(
            parse(Path::new("d.json"), Some(" \n"))
                .expect("blank")
                .is_empty()
        );
    }

    #[test]
    fn settings_keep_other_keys_and_report_changes() {
        let doc = parse(
            Path::new("d"),
            Some(r#"{"log-level":"warn","bip":"10.0.0.1/24","registry-mirrors":["x"]}"#),
        )
        .expect("doc");
        let (out, changes) = apply(&doc, &settings(&desired(), &docker("20.10.24")));
        assert_eq!(out["log-level"], "warn");
        assert_eq!(out["registry-mirrors"][0], "x");
        assert_eq!(out["bip"], "172.17.34.1/24");
        assert_eq!(out["ip-masq"], false);
        assert!(out.get("allow-direct-routing").is_none());
        let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            shown,
            [
                r#"bip: "10.0.0.1/24" -> "172.17.34.1/24""#,
                "ip-masq: absent -> false"
            ]
        );
        let (again, none) = apply(&out, &settings(&desired(), &docker("20.10.24")));
        assert_eq!(again, out);
        assert!(none.is_empty());
        let (v28, c28) = apply(&out, &settings(&desired(), &docker("28.1.0")));
        assert_eq!(v28["allow-direct-routing"], true);
        assert_eq!(c28.len(), 1);
    }

    #[test]
    fn restore_gives_back_absent_keys_and_original_bytes() {
        let original = "{ \"debug\": true }";
        let doc = parse(Path::new("d"), Some(original)).expect("doc");
        let r = Remembered::capture(Some(original), &doc, vec![]);
        let (mut now, _) = apply(&doc, &settings(&desired(), &docker("28.0.0")));
        let back = r.restore(&now);
        assert_eq!(back.text.as_deref(), Some(original));
        assert_eq!(back.changes.len(), 3);
        assert!(back.changes.iter().all(|c| c.after.is_none()));

        // something else changed meanwhile: keys restored, the rest kept
        now.insert("debug".into(), Value::Bool(false));
        let back = r.restore(&now);
        let text = back.text.expect("text");
        let parsed = parse(Path::new("d"), Some(&text)).expect("restored");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed["debug"], false);

        // a present value comes back as it was
        let with_bip = parse(
            Path::new("d"),
            Some(r#"{"bip":"192.168.5.1/24","ip-masq":true}"#),
        )
        .expect("doc");
        let r = Remembered::capture(None, &with_bip, vec![]);
        let back = r.restore(&apply(&with_bip, &settings(&desired(), &docker("1"))).0);
        let parsed = parse(Path::new("d"), back.text.as_deref()).expect("restored");
        assert_eq!(parsed["bip"], "192.168.5.1/24");
        assert_eq!(parsed["ip-masq"], true);

        // no file before geomx and nothing else added: the file goes away
        let r = Remembered::capture(None, &Doc::new(), vec![]);
        let back = r.restore(&apply(&Doc::new(), &settings(&desired(), &docker("1"))).0);
        assert_eq!(back.text, None);
        let json = r.to_json();
        assert_eq!(
            Remembered::from_json(Path::new("s"), &json).expect("state"),
            r
        );
    }
}
