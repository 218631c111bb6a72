//! Every job file under `tests/invalid/` is refused with exactly the messages in its sidecar
//! `.expect` file: one error per line, each saying what is wrong and where
//! (`FILE:LINE:COL: ...`, or `FILE: FIELD: ...` for a key that is missing).
//!
//! `GEOMX_BLESS=1 cargo test -p geomx-job --test invalid` rewrites the `.expect` files from
//! the current messages (review the diff before committing).

use std::path::{Path, PathBuf};

fn invalid_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid")
}

fn cases() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(invalid_dir())
        .expect("tests/invalid")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn at_least_25_invalid_files() {
    assert!(cases().len() >= 25, "only {} invalid files", cases().len());
}

#[test]
fn every_invalid_file_is_refused_with_its_expected_messages() {
    let bless = std::env::var_os("GEOMX_BLESS").is_some();
    let mut failures = Vec::new();
    for path in cases() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_string();
        let src = std::fs::read_to_string(&path).expect("read");
        let errors = match geomx_job::parse(&name, &src) {
            Ok(_) => {
                failures.push(format!("{name}: accepted, but it is invalid"));
                continue;
            }
            Err(errors) => errors,
        };
        for e in errors.errors() {
            // What and where: a position, or at least the field.
            assert!(
                (e.line.is_some() && e.col.is_some()) || e.field.is_some(),
                "{name}: error without a place: {e}"
            );
            assert!(!e.message.is_empty(), "{name}: empty message");
        }
        let actual: Vec<String> = errors.errors().iter().map(ToString::to_string).collect();
        let expect_path = path.with_extension("expect");
        if bless {
            std::fs::write(&expect_path, actual.join("\n") + "\n").expect("write .expect");
            continue;
        }
        let expected = match std::fs::read_to_string(&expect_path) {
            Ok(text) => text,
            Err(e) => {
                failures.push(format!("{}: {e}", expect_path.display()));
                continue;
            }
        };
        let expected: Vec<&str> = expected.lines().filter(|l| !l.is_empty()).collect();
        if actual != expected {
            failures.push(format!(
                "{name}:\n  expected:\n    {}\n  actual:\n    {}",
                expected.join("\n    "),
                actual.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_expect_file_has_its_job_file() {
    for entry in std::fs::read_dir(invalid_dir()).expect("tests/invalid") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "expect") {
            assert!(
                path.with_extension("toml").exists(),
                "{} has no .toml",
                path.display()
            );
        }
    }
}
