//! Reads everything a pass decides on ([`Observed`]); changes nothing.

use std::collections::BTreeMap;

use crate::backend::{VXLAN_INTERFACE, WG_INTERFACE};
use crate::config::NetConfig;
use crate::daemon_json::{self, Remembered};
use crate::desired::DesiredNetwork;
use crate::error::{NetError, Result};
use crate::kernel::Kernel;
use crate::plan::{DockerState, Observed};
use crate::reconcile::{DOCKER0, IP_FORWARD};
use crate::rules::{ChainObserved, FILTER_CHAIN, NAT_CHAIN};

/// What the state file remembers of daemon.json, if anything.
pub(crate) fn read_state(k: &Kernel) -> Result<Option<Remembered>> {
    match k.state.read()? {
        Some(text) => Ok(Some(Remembered::from_json(k.state.path(), &text)?)),
        None => Ok(None),
    }
}

/// Runs blocking work (iptables, wg) off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetError::Internal(format!("blocking task: {e}")))?
}

/// A chain and its hook as iptables has them.
pub(crate) fn chain(
    fw: &dyn crate::kernel::Firewall,
    table: &str,
    hook: &str,
    chain: &str,
) -> Result<ChainObserved> {
    let hook = fw.list_rules(table, hook)?;
    let chain = if fw.chain_exists(table, chain)? {
        Some(fw.list_rules(table, chain)?)
    } else {
        None
    };
    Ok(ChainObserved { hook, chain })
}

/// The host as a pass needs to see it. Docker not answering is an observation
/// ([`DockerState::Down`]), not an error.
pub async fn observe(k: &Kernel, config: &NetConfig, desired: &DesiredNetwork) -> Result<Observed> {
    let daemon_text = k.daemon_config.read()?;
    let doc = daemon_json::parse(k.daemon_config.path(), daemon_text.as_deref())?;
    let remembered = read_state(k)?;
    let docker = match k.docker.version().await {
        Ok(v) => DockerState::Up(v),
        Err(NetError::DockerUnavailable { reason, .. }) => DockerState::Down { reason },
        Err(e) => DockerState::Down {
            reason: e.to_string(),
        },
    };
    let docker0 = k.routes.link_addresses(DOCKER0.into()).await?;
    let ip_forward = k.sysctl.read(IP_FORWARD)?;
    let routes = k.routes.main_table().await?;
    let mut paths = BTreeMap::new();
    for p in &desired.peers {
        paths.insert(p.underlay_ip, k.routes.lookup(p.underlay_ip).await?);
    }
    let vxlan = k.vxlan.show(VXLAN_INTERFACE).await?;
    let wg = k.wireguard.clone();
    let fw = k.firewall.clone();
    let key_file = config.wireguard_key_file();
    let (wireguard, wg_public_key, nat, filter) = blocking(move || {
        let device = wg.show(WG_INTERFACE)?;
        // the agent makes its key pair when it starts (it registers the public key);
        // a device means a key exists
        let key = match &device {
            Some(_) => Some(wg.ensure_key(&key_file)?),
            None => None,
        };
        let nat = chain(&*fw, "nat", "POSTROUTING", NAT_CHAIN)?;
        let filter = chain(&*fw, "filter", "FORWARD", FILTER_CHAIN)?;
        Ok((device, key, nat, filter))
    })
    .await?;
    Ok(Observed {
        docker,
        daemon_text,
        doc,
        remembered,
        docker0,
        ip_forward,
        routes,
        paths,
        wg_public_key,
        wireguard,
        vxlan,
        nat,
        filter,
    })
}
