//! What the host has, for the reports: its images (tags, digests, sizes) and its memory and
//! CPUs as Docker sees them.
//!
//! Listing them asks Docker, which can take seconds on a loaded host; the reporter must never
//! wait for it (a report held behind a slow `docker images` is a heartbeat the controller does
//! not get, and the host is declared lost). So [`run`] refreshes them in its own task, every
//! [`REFRESH`] and at once when a pull starts or ends or the runtime (re)appears, and tells
//! the reporter through [`Ctx::inventory`] when they changed.

use std::sync::Arc;
use std::time::Duration;

use geomx_runtime::{CancellationToken, Engine};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::Ctx;

/// How long the list of images may be old in a report.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Longest one Docker call of a refresh may take before the last list stays in force.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps `ctx.images` and `ctx.capacity` fresh until `shutdown`.
pub async fn run<E: Engine>(ctx: Arc<Ctx<E>>, shutdown: CancellationToken) {
    let mut runtime_rx = ctx.runtime.subscribe();
    let mut pulls: Option<watch::Receiver<u64>> = None;
    // the pulls' states at the last refresh: progress alone does not list the images again
    let mut pull_states = String::new();
    let mut due = Instant::now();
    loop {
        let runtime = runtime_rx.borrow_and_update().clone();
        if pulls.is_none() {
            pulls = runtime.as_ref().map(|r| r.subscribe_pulls());
        }
        if let Some(rt) = &runtime
            && Instant::now() >= due
        {
            pull_states = states(rt);
            refresh(&ctx, rt).await;
            due = Instant::now() + REFRESH;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(due) => {}
            r = runtime_rx.changed() => {
                if r.is_err() {
                    return;
                }
                pulls = None;
                due = Instant::now();
            }
            ok = pull_changed(&mut pulls) => {
                if !ok {
                    pulls = None;
                } else if runtime.as_ref().is_some_and(|rt| states(rt) != pull_states) {
                    due = Instant::now();
                }
            }
        }
    }
}

/// The pulls' images and states (not their progress).
fn states<E: Engine>(rt: &geomx_runtime::Runtime<E>) -> String {
    rt.pulls()
        .iter()
        .map(|p| format!("{} {}\n", p.image, p.state.as_str()))
        .collect()
}

/// Waits until a pull changed (started, progressed, ended); false when the runtime is gone;
/// never completes without one.
async fn pull_changed(rx: &mut Option<watch::Receiver<u64>>) -> bool {
    match rx {
        None => std::future::pending().await,
        Some(r) => r.changed().await.is_ok(),
    }
}

/// One refresh: what changed is stored and announced; a Docker call that fails or times
/// out keeps the last answer.
async fn refresh<E: Engine>(ctx: &Ctx<E>, rt: &geomx_runtime::Runtime<E>) {
    let mut changed = false;
    match tokio::time::timeout(CALL_TIMEOUT, rt.image_details()).await {
        Ok(Ok(images)) => {
            let mut held = ctx.images.lock().unwrap_or_else(|p| p.into_inner());
            if held.as_ref() != Some(&images) {
                *held = Some(images);
                changed = true;
            }
        }
        Ok(Err(e)) => debug!(error = %e, "listing images failed; reporting the last list"),
        Err(_) => debug!("listing images timed out; reporting the last list"),
    }
    if let Ok(Ok(capacity)) = tokio::time::timeout(CALL_TIMEOUT, rt.capacity()).await {
        let mut held = ctx.capacity.lock().unwrap_or_else(|p| p.into_inner());
        if *held != capacity {
            *held = capacity;
            changed = true;
        }
    }
    if changed {
        ctx.inventory.send_modify(|n| *n += 1);
    }
}
