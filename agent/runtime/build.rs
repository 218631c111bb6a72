//! Builds the pause binary of network sandboxes (`pause/pause.c`) with the system C
//! compiler as a static, stripped executable in `OUT_DIR`, for `src/pause.rs` to embed.
//!
//! The compiler is `$CC_<target>`, `$TARGET_CC` or `$CC`, else `cc`. When it is missing or
//! cannot link statically (no static libc: Debian ships it in libc6-dev), the crate is built
//! without the binary (a `cargo:warning` says so) and the runtime falls back to a shell
//! loop in the job's own image for sandboxes.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(geomx_pause)");
    println!("cargo::rerun-if-changed=pause/pause.c");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    let target_cc = format!("CC_{}", target.replace('-', "_"));
    for var in [target_cc.as_str(), "TARGET_CC", "CC"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let configured = [target_cc.as_str(), "TARGET_CC", "CC"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()));
    if configured.is_none() && target != host {
        println!(
            "cargo::warning=geomx-runtime: cross-compiling to {target} without CC_{target}/TARGET_CC/CC: \
             building without the pause binary (sandboxes use a shell loop)"
        );
        return;
    }
    let cc = configured.unwrap_or_else(|| "cc".to_string());
    let Some(out_dir) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        println!(
            "cargo::warning=geomx-runtime: OUT_DIR is not set; building without the pause binary"
        );
        return;
    };
    let out = out_dir.join("pause");
    // CC may carry flags ("gcc -m32"): the first word is the program
    let mut words = cc.split_whitespace();
    let program = words.next().unwrap_or("cc");
    let result = Command::new(program)
        .args(words)
        .args(["-static", "-Os", "-s", "-Wall", "-o"])
        .arg(&out)
        .arg("pause/pause.c")
        .output();
    match result {
        Ok(o) if o.status.success() && out.exists() => {
            println!("cargo::rustc-cfg=geomx_pause");
        }
        Ok(o) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let first = stderr.lines().next().unwrap_or("").trim().to_string();
            println!(
                "cargo::warning=geomx-runtime: `{cc} -static -Os -s pause/pause.c` failed ({}): {first}; \
                 building without the pause binary (sandboxes use a shell loop; install a C compiler \
                 and a static libc, e.g. Debian's gcc and libc6-dev)",
                o.status
            );
        }
        Err(e) => {
            println!(
                "cargo::warning=geomx-runtime: cannot run the C compiler `{cc}` ({e}); building without \
                 the pause binary (sandboxes use a shell loop; install gcc and libc6-dev)"
            );
        }
    }
}
