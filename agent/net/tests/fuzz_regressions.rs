//! Replays, on stable, the inputs kept for the `daemon_json` fuzz target
//! (`tests/fuzz/regressions/daemon_json/`: seeds, and every input that once failed,
//! minimized) with the very checks the target runs (`tests/fuzz/src/daemon_json_checks.rs`,
//! included below). See `tests/fuzz/README.md`.

use std::path::Path;

use geomx_net::daemon_json::{self, Remembered};

#[path = "../../../tests/fuzz/src/daemon_json_checks.rs"]
mod daemon_json_checks;
#[path = "../../../tests/fuzz/src/regressions.rs"]
mod regressions;

#[test]
fn daemon_json_regressions_pass_the_fuzz_checks() {
    for path in regressions::inputs("daemon_json") {
        let data = std::fs::read(&path).expect("read");
        eprintln!("daemon_json: {}", path.display());
        daemon_json_checks::check_daemon_json(&data);
    }
}

/// Found by `daemon_json` (crash-float-roundtrip.json): serde_json's default float parsing
/// is not correctly rounded, so a number such as 1844674407373372036854775808 read back
/// from the file geomx wrote differed in its last bit from the one read from the original:
/// a key geomx does not own changed, and cleanup wrote a re-rendered file instead of the
/// original bytes. geomx-net now enables serde_json's `float_roundtrip`.
#[test]
fn numbers_in_other_keys_survive_a_rewrite() {
    let path = Path::new("/etc/docker/daemon.json");
    let text = r#"{"u":1844674407373372036854775808,"f":0.30000000000000004441,"e":2.2250738585072011e-308}"#;
    let doc = daemon_json::parse(path, Some(text)).expect("parses");
    let written = daemon_json::render(&doc);
    let back = daemon_json::parse(path, Some(&written)).expect("reads back");
    assert_eq!(back, doc, "{written}");
    let remembered = Remembered::capture(Some(text), &doc, vec![]);
    assert_eq!(remembered.restore(&back).text.as_deref(), Some(text));
}
