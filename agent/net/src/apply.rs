//! The executor: carries out a [`NetPlan`]'s steps in order, each one's [`Change`] recorded
//! (and logged) as soon as it is done. It decides nothing a plan did not say, except the
//! two answers only the host can give: whether `--random-fully` is accepted, and whether
//! docker0 took the bip after a restart.

use std::net::SocketAddrV4;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::backend::{VXLAN_INTERFACE, WG_INTERFACE, WG_KEEPALIVE, WG_MTU};
use crate::change::Change;
use crate::config::NetConfig;
use crate::error::{NetError, Result};
use crate::kernel::{DockerVersion, Kernel};
use crate::observe::blocking;
use crate::plan::{NetPlan, PlanMemory, Step, describe_via};
use crate::reconcile::DOCKER0;
use crate::rules;

/// How long docker0 gets to show the new bip once Docker answers again (at most the
/// configured Docker ready timeout).
const DOCKER0_PATIENCE: Duration = Duration::from_secs(10);

/// What carrying out a plan did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The changes made, in order.
    pub changes: Vec<Change>,
    /// Docker was restarted: the pass stopped there and must be planned again.
    pub restarted: bool,
}

fn record(changes: &mut Vec<Change>, change: Change) {
    info!("{change}");
    changes.push(change);
}

/// Carries out `plan` on `kernel`. On an error the changes made before it stay in
/// `applied` (and in the log); the next pass plans from what is then there.
pub async fn apply(
    kernel: &Kernel,
    config: &NetConfig,
    plan: &NetPlan,
    memory: &mut PlanMemory,
    applied: &mut Applied,
) -> Result<()> {
    let out = &mut applied.changes;
    for step in &plan.steps {
        match step {
            Step::Remember(r) => {
                kernel.state.write(&r.to_json())?;
                record(
                    out,
                    Change::Remembered {
                        path: kernel.state.path().to_path_buf(),
                    },
                );
            }
            Step::WriteDaemonJson { text, keys } => {
                kernel.daemon_config.write(text)?;
                record(
                    out,
                    Change::DaemonJsonUpdated {
                        path: kernel.daemon_config.path().to_path_buf(),
                        keys: keys.clone(),
                    },
                );
            }
            Step::RestartDocker {
                reason,
                bip,
                for_docker0,
            } => {
                if *for_docker0 {
                    memory.restarted_for = Some(*bip);
                }
                let v = restart_docker(kernel, config).await?;
                memory.last_docker = Some(v);
                record(
                    out,
                    Change::DockerRestarted {
                        reason: reason.clone(),
                    },
                );
                let patience = DOCKER0_PATIENCE.min(config.docker_ready_timeout);
                if let Err(found) = docker0_carries(kernel, *bip, patience).await? {
                    return Err(NetError::Docker0Mismatch {
                        expected: *bip,
                        found,
                        path: kernel.daemon_config.path().to_path_buf(),
                    });
                }
                applied.restarted = true;
                return Ok(());
            }
            Step::EnableIpForward { was } => {
                kernel.sysctl.write(crate::reconcile::IP_FORWARD, "1")?;
                record(out, Change::IpForwardEnabled { was: was.clone() });
            }
            Step::Firewall(fix) => {
                let fw = kernel.firewall.clone();
                let payload = fix.payload.clone();
                let result = blocking(move || fw.restore(&payload)).await;
                match result {
                    Ok(()) => {}
                    Err(e) if fix.payload.contains("--random-fully") => {
                        warn!(error = %e, "MASQUERADE --random-fully is not supported here; using plain MASQUERADE");
                        memory.random_fully = false;
                        let fw = kernel.firewall.clone();
                        let payload = rules::without_random_fully_text(&fix.payload);
                        blocking(move || fw.restore(&payload)).await?;
                    }
                    Err(e) => return Err(e),
                }
                for c in &fix.changes {
                    let mut c = c.clone();
                    if !memory.random_fully
                        && let Change::ChainCreated { rules: r, .. } = &mut c
                    {
                        for line in r.iter_mut() {
                            *line = rules::without_random_fully_text(line);
                        }
                    }
                    record(out, c);
                }
            }
            Step::WgCreate => {
                let wg = kernel.wireguard.clone();
                let implementation = blocking(move || wg.create(WG_INTERFACE, WG_MTU)).await?;
                record(
                    out,
                    Change::WireguardCreated {
                        interface: WG_INTERFACE.into(),
                        implementation,
                    },
                );
            }
            Step::WgConfigure { port } => {
                let wg = kernel.wireguard.clone();
                let key_file = config.wireguard_key_file();
                let port = *port;
                blocking(move || {
                    wg.ensure_key(&key_file)?;
                    wg.configure(WG_INTERFACE, &key_file, port)
                })
                .await?;
                record(
                    out,
                    Change::WireguardConfigured {
                        interface: WG_INTERFACE.into(),
                        port,
                    },
                );
            }
            Step::WgSetPeer { peer, config: want } => {
                let wg = kernel.wireguard.clone();
                let w = want.clone();
                blocking(move || wg.set_peer(WG_INTERFACE, &w, WG_KEEPALIVE)).await?;
                record(
                    out,
                    Change::WireguardPeerSet {
                        peer: peer.clone(),
                        endpoint: want
                            .endpoint
                            .map_or_else(|| "-".to_string(), |e: SocketAddrV4| e.to_string()),
                    },
                );
            }
            Step::WgRemovePeer { public_key } => {
                let wg = kernel.wireguard.clone();
                let key = public_key.clone();
                blocking(move || wg.remove_peer(WG_INTERFACE, &key)).await?;
                record(
                    out,
                    Change::WireguardPeerRemoved {
                        public_key: public_key.clone(),
                    },
                );
            }
            Step::WgDelete => {
                let wg = kernel.wireguard.clone();
                blocking(move || wg.delete(WG_INTERFACE)).await?;
                record(
                    out,
                    Change::WireguardDeleted {
                        interface: WG_INTERFACE.into(),
                    },
                );
            }
            Step::VxlanCreate(spec) => {
                kernel.vxlan.create(VXLAN_INTERFACE, spec).await?;
                record(
                    out,
                    Change::VxlanCreated {
                        interface: VXLAN_INTERFACE.into(),
                        vni: spec.vni,
                        port: spec.port,
                    },
                );
            }
            Step::VxlanDelete => {
                kernel.vxlan.delete(VXLAN_INTERFACE).await?;
                record(
                    out,
                    Change::VxlanDeleted {
                        interface: VXLAN_INTERFACE.into(),
                    },
                );
            }
            Step::FdbSet { peer, entry } => {
                kernel.vxlan.fdb_set(VXLAN_INTERFACE, *entry).await?;
                record(
                    out,
                    Change::FdbSet {
                        peer: peer.clone(),
                        mac: entry.mac.to_string(),
                        dst: entry.dst,
                    },
                );
            }
            Step::FdbDelete(entry) => {
                kernel.vxlan.fdb_delete(VXLAN_INTERFACE, *entry).await?;
                record(
                    out,
                    Change::FdbDeleted {
                        mac: entry.mac.to_string(),
                        dst: entry.dst,
                    },
                );
            }
            Step::NeighSet { peer, entry } => {
                kernel.vxlan.neigh_set(VXLAN_INTERFACE, *entry).await?;
                record(
                    out,
                    Change::NeighbourSet {
                        peer: peer.clone(),
                        ip: entry.ip,
                        mac: entry.mac.to_string(),
                    },
                );
            }
            Step::NeighDelete(entry) => {
                kernel.vxlan.neigh_delete(VXLAN_INTERFACE, *entry).await?;
                record(
                    out,
                    Change::NeighbourDeleted {
                        ip: entry.ip,
                        mac: entry.mac.to_string(),
                    },
                );
            }
            Step::RouteReplace { route, was } => {
                kernel.routes.replace(route.clone()).await?;
                let change = match was {
                    Some(was) => Change::RouteReplaced {
                        destination: route.destination,
                        via: route.via(),
                        was: was.clone(),
                    },
                    None => Change::RouteAdded {
                        destination: route.destination,
                        via: route.via(),
                    },
                };
                record(out, change);
            }
            Step::RouteDelete(r) => {
                let destination = r.destination;
                let via = describe_via(r);
                kernel.routes.delete(r.clone()).await?;
                record(out, Change::RouteDeleted { destination, via });
            }
        }
    }
    Ok(())
}

/// Ok(Ok) when docker0 carries `bip` (waiting up to `patience`), Ok(Err(what it carries))
/// when not.
pub(crate) async fn docker0_carries(
    kernel: &Kernel,
    bip: ipnet::Ipv4Net,
    patience: Duration,
) -> Result<std::result::Result<(), String>> {
    let deadline = Instant::now() + patience;
    loop {
        let addrs = kernel.routes.link_addresses(DOCKER0.into()).await?;
        if addrs.as_ref().is_some_and(|a| a.contains(&bip)) {
            return Ok(Ok(()));
        }
        if Instant::now() >= deadline {
            return Ok(Err(crate::plan::describe_docker0(&addrs)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the restart command and waits until the API answers again.
pub(crate) async fn restart_docker(kernel: &Kernel, config: &NetConfig) -> Result<DockerVersion> {
    let docker = &kernel.docker;
    docker.restart().await?;
    let timeout = config.docker_ready_timeout;
    let deadline = Instant::now() + timeout;
    loop {
        match docker.version().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(NetError::DockerNotReady {
                    host: docker.host().to_string(),
                    command: docker.restart_command().to_string(),
                    seconds: timeout.as_secs_f64(),
                    reason: e.to_string(),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
