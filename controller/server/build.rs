//! Copies the dashboard's npm dependencies (uPlot, pinned in web/package-lock.json) into
//! OUT_DIR for `include_str!` (src/dashboard/assets.rs). They are installed by `npm ci` in
//! web/ (scripts/install-deps.sh runs it); when they are missing this runs `npm ci` itself,
//! and fails naming what to do if that fails too.

use std::path::{Path, PathBuf};
use std::process::Command;

const FILES: &[&str] = &["uPlot.iife.min.js", "uPlot.min.css"];

fn main() {
    let web =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("web");
    let dist = web.join("node_modules/uplot/dist");
    println!("cargo:rerun-if-changed=web/package-lock.json");
    println!("cargo:rerun-if-changed=web/node_modules/uplot/dist");
    if !FILES.iter().all(|f| dist.join(f).exists()) {
        npm_ci(&web);
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for f in FILES {
        let from = dist.join(f);
        if let Err(e) = std::fs::copy(&from, out.join(f)) {
            panic!("copying {}: {e}", from.display());
        }
    }
}

fn npm_ci(web: &Path) {
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(web)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "`npm ci` in {} failed ({s}): the dashboard needs its npm packages (run scripts/install-deps.sh, or `npm ci` there with access to the npm registry)",
            web.display()
        ),
        Err(e) => panic!(
            "running `npm ci` in {}: {e}: the dashboard needs Node.js's npm at build time (scripts/install-deps.sh installs it)",
            web.display()
        ),
    }
}
