//! geomx-psnode: a stand-in for a ps-lite node, the entrypoint of geomx's test image.
//!
//! It reads the DMLC_* environment as GeoMX does and behaves, as far as geomx can see,
//! like a ps-lite node: schedulers bind exactly `DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT` (or the
//! global pair) and wait for exactly the configured registrations; servers and workers
//! advertise `DMLC_NODE_HOST` or the address of `DMLC_INTERFACE`, register, receive the
//! roster over a connection from the scheduler, and workers connect to every server and
//! print GeoMX's progress lines. The image runs it also as `python`/`python3` (symlinks),
//! so GeoMX's commands (`python -c "import mxnet"`, `python examples/cnn.py
//! --data-slice-idx 0 --cpu`) run unchanged.
//!
//! Switches: `PSNODE_INTERVAL` (200ms), `PSNODE_ITERATIONS` (20),
//! `PSNODE_ITERS_PER_EPOCH` (10), `PSNODE_CRASH_AFTER=n` (exit 3 after n
//! iterations), `PSNODE_HANG_AFTER=n` (stop printing after n iterations),
//! `PSNODE_EXIT_CODE` (0), `PSNODE_HTTP_HEARTBEAT=1` (also POST progress to
//! `GEOMX_AGENT_URL/v1/heartbeat`, with `GEOMX_HEARTBEAT_TOKEN` as its bearer token),
//! `PSNODE_FINALIZE_EXIT` (0: the exit code of schedulers
//! and servers once their workers finished, as ps-lite's `Finalize`; 139 imitates GeoMX's
//! crash there). SIGTERM and SIGINT end it at once with exit code 0.

mod config;
mod node;
mod train;

use std::collections::BTreeMap;

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::config::{Config, Role};

extern "C" fn on_terminate(_: nix::libc::c_int) {
    // async-signal-safe; stdout is line-buffered, so every printed line is out already
    unsafe { nix::libc::_exit(0) }
}

fn install_signal_handlers() {
    let action = SigAction::new(
        SigHandler::Handler(on_terminate),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only calls _exit, which is async-signal-safe. As PID 1 of a
        // container the process would otherwise ignore SIGTERM.
        if let Err(e) = unsafe { sigaction(sig, &action) } {
            eprintln!("psnode: cannot handle {sig}: {e}");
        }
    }
}

const USAGE: &str = "usage: geomx-psnode [python arguments ...]
A stand-in for a ps-lite node; configured by DMLC_* and PSNODE_* environment variables.";

fn run(env: &BTreeMap<String, String>, args: &[String]) -> anyhow::Result<i32> {
    let cfg = Config::from_env(env, args)?;
    match cfg.role {
        Role::Idle => Ok(0),
        Role::GlobalScheduler | Role::Scheduler => {
            let sched = cfg
                .serves
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("a scheduler without an address"))?;
            node::run_scheduler(cfg.role, sched, cfg.finalize_exit)?;
            Ok(0)
        }
        _ => node::run_node(&cfg),
    }
}

fn main() {
    install_signal_handlers();
    let argv: Vec<String> = std::env::args().collect();
    let args = argv.get(1..).unwrap_or_default();
    if matches!(args, [a] if a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let env: BTreeMap<String, String> = std::env::vars().collect();
    if env.keys().any(|k| k.starts_with("DMLC_ROLE")) {
        let prog = argv.first().map(String::as_str).unwrap_or("geomx-psnode");
        println!("psnode: started as {prog} {}", args.join(" "));
    }
    match run(&env, args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("psnode: {e:#}");
            std::process::exit(1);
        }
    }
}
