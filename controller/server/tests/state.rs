//! `geomx-controller state check | export | import` and a damaged state directory, through
//! the real binary: exit codes, messages, and a round trip that keeps every record.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_geomx-controller");

fn controller(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--insecure")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("geomx-controller runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An export of hosts, leases, a job's records and `events` events, as a controller writes
/// them.
fn export_file(path: &Path, events: usize) {
    let mut lines = vec![format!(
        r#"{{"format":"geomx-controller-state","version":1,"controller_id":"3f0c-test","exported_at_ms":0,"records":{{"hosts":2,"leases":2,"jobs":2,"events":{events}}}}}"#
    )];
    for (i, h) in ["a", "b"].iter().enumerate() {
        lines.push(format!(
            r#"{{"tree":"hosts","key":"{h}","value":{{"name":"{h}","underlay_ip":"10.1.1.{n}","subnet":"172.17.{n}.0/24","last_subnet":"172.17.{n}.0/24","state":"ready","state_since_ms":1,"registered_at_ms":1,"agent_version":"0.1.0","agent_url":"https://10.1.1.{n}:7947"}}}}"#,
            n = i + 1
        ));
    }
    for (i, h) in ["a", "b"].iter().enumerate() {
        lines.push(format!(
            r#"{{"tree":"leases","key_hex":"ac11{:02x}0018","value":{{"subnet":"172.17.{n}.0/24","host":"{h}","granted_at_ms":1}}}}"#,
            i + 1,
            n = i + 1
        ));
    }
    lines.push(r#"{"tree":"jobs","key":"current/hips","value":{"name":"hips","run":1}}"#.into());
    lines.push(r#"{"tree":"jobs","key":"meta/hips/1","value":{"phase":4}}"#.into());
    for i in 0..events {
        lines.push(format!(
            r#"{{"tree":"events","key_hex":"6800610000{i:016x}","value":{{"at_ms":{i},"kind":"Registered","message":"{}"}}}}"#,
            "registered again with its subnet ".repeat(3)
        ));
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// An export's record lines, without the header (its time) and the event id base (an
/// import moves it past every event).
fn records(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.contains(r#""key":"event_id_base""#))
        .map(str::to_owned)
        .collect()
}

#[test]
fn export_import_and_check_round_trip_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let file = tmp.path().join("backup.jsonl");
    export_file(&file, 20);
    let o = controller(&one, &["state", "import", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = controller(&one, &["state", "check"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("hosts 2, leases 2, jobs 2, events 20, meta 3"),
        "{}",
        text(&o)
    );
    // export, import elsewhere, export again: the same records
    let first = tmp.path().join("first.jsonl");
    let o = controller(&one, &["state", "export", first.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = controller(&two, &["state", "import", first.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let second = tmp.path().join("second.jsonl");
    let o = controller(&two, &["state", "export", second.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let (a, b) = (records(&first), records(&second));
    assert_eq!(a.len(), 2 + 2 + 2 + 20 + 2, "{a:#?}");
    assert_eq!(a, b);
    let header = std::fs::read_to_string(&second).unwrap();
    let header = header.lines().next().unwrap_or_default();
    assert!(
        header.contains(r#""controller_id":"3f0c-test""#),
        "the controller id is kept: {header}"
    );
    // a second import into a state with records changes nothing
    let o = controller(&two, &["state", "import", first.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("already holds 26 records"),
        "{}",
        text(&o)
    );
    // no state there: said so, nothing created
    let none = tmp.path().join("none");
    let o = controller(&none, &["state", "check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no state in"), "{}", text(&o));
    assert!(!none.exists());
}

#[test]
fn a_byte_flipped_store_is_named_corrupt_with_the_recovery_steps_and_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let file = tmp.path().join("backup.jsonl");
    export_file(&file, 3000);
    let o = controller(&state, &["state", "import", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let db = state.join("db").join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&db, bytes).unwrap();
    for args in [&["state", "check"][..], &["--listen", "127.0.0.1:0"][..]] {
        let o = controller(&state, args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {t}");
        assert!(
            t.contains("is corrupt and cannot be opened"),
            "{args:?}: {t}"
        );
        assert!(t.contains("geomx-controller state import"), "{args:?}: {t}");
        assert!(
            t.contains(&format!("mv {0} {0}.corrupt", state.display())),
            "{t}"
        );
    }
    // and systemd does not restart on it
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../systemd/geomx-controller.service"),
    )
    .unwrap();
    assert!(
        unit.lines()
            .any(|l| l.trim() == "RestartPreventExitStatus=2 3"),
        "{unit}"
    );
}
