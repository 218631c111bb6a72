//! Invariants of the agent's daemon.json merge (`geomx_net::daemon_json`), checked by the
//! `daemon_json` fuzz target and replayed on stable by `agent/net/tests/fuzz_regressions.rs`
//! (which includes this file with `#[path]`, so it may only use `std`, `geomx_net` and
//! `serde_json`).
//!
//! The input is the text of an existing daemon.json. Following what the reconciler does
//! (preflight → apply → cleanup), for Docker before and after 28 and a few subnets:
//!
//! * `parse` never panics; a refused file is an error, never a partial document.
//! * `apply` sets exactly the managed keys it is given, keeps every other key as it was,
//!   reports exactly the keys whose value changed, and is idempotent.
//! * `render` → `parse` gives the same document back (what the agent writes, it can read).
//! * The state record (`Remembered`) survives its JSON round trip.
//! * `restore` of the merged file gives back the original text byte for byte (nothing else
//!   changed), with the original values of the managed keys, absent ones absent.
//! * When someone else added a key meanwhile, `restore` keeps that key, gives the managed
//!   keys their original values and leaves every other original key untouched.

use std::path::Path;

use geomx_net::DesiredNetwork;
use geomx_net::daemon_json::{self, Doc, MANAGED_KEYS, Remembered};
use geomx_net::kernel::DockerVersion;
use serde_json::Value;

const PATH: &str = "/etc/docker/daemon.json";
/// A key nobody uses, added "by someone else" between apply and restore.
const FOREIGN_KEY: &str = "geomx-fuzz-foreign-key";

fn desired(subnet: &str) -> DesiredNetwork {
    DesiredNetwork {
        subnet: subnet.parse().expect("fixed subnet"),
        cluster: "172.16.0.0/12".parse().expect("fixed cluster"),
        peers: vec![],
        backend: Default::default(),
    }
}

fn docker(version: &str) -> DockerVersion {
    DockerVersion {
        version: version.into(),
        api_version: "1.41".into(),
    }
}

/// Runs every check on `data` as the text of daemon.json (non-UTF-8 is skipped: the agent
/// reads the file as a `String` and refuses one that is not UTF-8 before the merge).
pub fn check_daemon_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(PATH);
    let doc = match daemon_json::parse(path, Some(text)) {
        Ok(doc) => doc,
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with(PATH), "{shown}");
            return;
        }
    };
    // A blank file is an empty document, and so is none.
    if text.trim().is_empty() {
        assert!(doc.is_empty());
    }
    assert_eq!(
        daemon_json::parse(path, None).map(|d| d.is_empty()).ok(),
        Some(true)
    );

    for (subnet, version) in [
        ("172.17.34.0/24", "20.10.24+dfsg1"),
        ("172.17.34.0/24", "28.0.1"),
        ("172.31.255.0/28", "v29.1"),
    ] {
        check_merge(text, &doc, &desired(subnet), &docker(version));
    }
}

fn check_merge(text: &str, doc: &Doc, desired: &DesiredNetwork, docker: &DockerVersion) {
    let path = Path::new(PATH);
    let settings = daemon_json::settings(desired, docker);
    for (key, _) in &settings {
        assert!(MANAGED_KEYS.contains(key), "{key} is not a managed key");
    }

    // What the reconciler records before its first change.
    let remembered = Remembered::capture(Some(text), doc, vec![]);
    let state = remembered.to_json();
    let reread = Remembered::from_json(Path::new("state.json"), &state)
        .unwrap_or_else(|e| panic!("state record does not read back: {e}\n{state}"));
    assert_eq!(reread, remembered, "state record changed in its round trip");

    // apply: the managed keys set, everything else kept, exactly the changes reported.
    let (merged, changes) = daemon_json::apply(doc, &settings);
    for (key, value) in &settings {
        assert_eq!(merged.get(*key), Some(value), "{key} not set");
    }
    for (key, value) in doc {
        if !settings.iter().any(|(k, _)| k == key) {
            assert_eq!(merged.get(key), Some(value), "{key} changed by apply");
        }
    }
    for key in merged.keys() {
        assert!(
            doc.contains_key(key) || settings.iter().any(|(k, _)| k == key),
            "apply added {key}"
        );
    }
    let changed: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    let expected: Vec<&str> = settings
        .iter()
        .filter(|(k, v)| doc.get(*k) != Some(v))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(changed, expected, "reported changes");
    for c in &changes {
        assert_eq!(c.before.as_ref(), doc.get(&c.key));
        assert_eq!(c.after.as_ref(), merged.get(&c.key));
        let _ = c.to_string();
    }
    let (again, none) = daemon_json::apply(&merged, &settings);
    assert_eq!(again, merged, "apply is not idempotent");
    assert!(none.is_empty(), "a second apply reports changes");

    // What the agent writes, it reads back.
    let written = daemon_json::render(&merged);
    let on_disk = daemon_json::parse(path, Some(&written))
        .unwrap_or_else(|e| panic!("the written daemon.json does not parse: {e}\n{written}"));
    assert_eq!(on_disk, merged, "render/parse changed the document");

    // cleanup with nothing else changed: the original text, byte for byte.
    let restored = remembered.restore(&on_disk);
    assert_eq!(
        restored.text.as_deref(),
        Some(text),
        "restore did not give the original text back"
    );
    let back = daemon_json::parse(path, restored.text.as_deref()).expect("original parses");
    check_managed_keys_restored(doc, &back);
    assert_eq!(&back, doc);
    // The reported changes are exactly the managed keys whose value differs.
    for c in &restored.changes {
        assert!(MANAGED_KEYS.contains(&c.key.as_str()));
        assert_eq!(c.before.as_ref(), on_disk.get(&c.key));
        assert_eq!(c.after.as_ref(), doc.get(&c.key));
    }
    for key in MANAGED_KEYS {
        let differs = on_disk.get(key) != doc.get(key);
        assert_eq!(
            restored.changes.iter().any(|c| c.key == key),
            differs,
            "{key}: change reported iff the value differs"
        );
    }

    // cleanup after someone else edited the file: their key kept, ours restored.
    let mut edited = on_disk.clone();
    edited.insert(
        FOREIGN_KEY.into(),
        Value::String("added while geomx ran".into()),
    );
    let restored = remembered.restore(&edited);
    let text_after = restored
        .text
        .unwrap_or_else(|| panic!("restore removed a file someone else edited"));
    let back = daemon_json::parse(path, Some(&text_after))
        .unwrap_or_else(|e| panic!("restored daemon.json does not parse: {e}\n{text_after}"));
    check_managed_keys_restored(doc, &back);
    assert_eq!(
        back.get(FOREIGN_KEY),
        edited.get(FOREIGN_KEY),
        "the foreign key was lost"
    );
    for (key, value) in doc {
        if key != FOREIGN_KEY {
            assert_eq!(back.get(key), Some(value), "{key} not restored as it was");
        }
    }
    for key in back.keys() {
        assert!(
            key == FOREIGN_KEY || doc.contains_key(key),
            "restore added {key}"
        );
    }

    // With no file before geomx: cleanup removes the file again.
    let none = Remembered::capture(None, &Doc::new(), vec![]);
    let (fresh, _) = daemon_json::apply(&Doc::new(), &settings);
    assert_eq!(none.restore(&fresh).text, None);
}

/// Every managed key of `back` is as in `original`: same value, or absent when it was.
fn check_managed_keys_restored(original: &Doc, back: &Doc) {
    for key in MANAGED_KEYS {
        assert_eq!(back.get(key), original.get(key), "{key} not restored");
    }
}
