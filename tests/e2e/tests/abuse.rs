//! The attacks of the security review (issue 13), run again against a live 3-host lab: each
//! must now fail harmlessly. One cluster for the whole binary; the scenarios run one after
//! the other in a single test, each leaving the cluster as the next expects it (every host
//! ready, no job of its own left running). The credential scenario runs last: it revokes
//! and restores credentials.
//!
//! Needs the binaries: `cargo build --workspace --bins` before `cargo test`.

use geomx_e2e::{lab_tests_enabled, seed_cluster};

#[path = "abuse/connections.rs"]
mod connections;
#[path = "abuse/credentials.rs"]
mod credentials;
#[path = "abuse/heartbeats.rs"]
mod heartbeats;

#[test]
fn the_review_attacks_fail_harmlessly() -> anyhow::Result<()> {
    if !lab_tests_enabled() {
        return Ok(());
    }
    let c = seed_cluster()?;
    heartbeats::run(&c)?;
    connections::run(&c)?;
    credentials::run(&c)?;
    c.down()?;
    Ok(())
}
