//! What geomx owns on a host right now, for `geomx-agent network show`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::Value;

use crate::ROUTE_PROTOCOL;
use crate::backend::VXLAN_INTERFACE;
use crate::daemon_json::{self, MANAGED_KEYS, Remembered};
use crate::kernel::{Kernel, KernelRoute, VxlanDevice};
use crate::reconcile::IP_FORWARD;
use crate::rules::{FILTER_CHAIN, NAT_CHAIN};

/// daemon.json's managed keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DaemonJsonStatus {
    /// The file.
    pub path: PathBuf,
    /// Whether it exists.
    pub exists: bool,
    /// The managed keys present and their values.
    pub values: BTreeMap<String, Value>,
}

/// One geomx chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainStatus {
    /// `nat` or `filter`.
    pub table: String,
    /// The chain.
    pub chain: String,
    /// The built-in chain that should jump to it.
    pub hook: String,
    /// Whether the chain exists.
    pub exists: bool,
    /// Its rules, as `iptables -S` prints them (without `-A CHAIN`).
    pub rules: Vec<String>,
    /// 1-based positions of the jumps to it in `hook`.
    pub jump_positions: Vec<usize>,
    /// Where geomx wants its one jump: 1, or right below `DOCKER-USER` in `FORWARD`.
    pub jump_wanted: usize,
}

/// Everything geomx owns on the host, as it is now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkStatus {
    /// The host's name.
    pub host: String,
    /// `net.ipv4.ip_forward`.
    pub ip_forward: Option<String>,
    /// docker0's IPv4 addresses (`None`: no docker0).
    pub docker0: Option<Vec<Ipv4Net>>,
    /// daemon.json's managed keys.
    pub daemon_json: DaemonJsonStatus,
    /// What daemon.json held before geomx (`None`: geomx has not changed it).
    pub before_geomx: Option<Remembered>,
    /// Routes with protocol 247 in the main table.
    pub routes: Vec<KernelRoute>,
    /// geomx's chains.
    pub chains: Vec<ChainStatus>,
    /// The VXLAN interface (`None`: none), with its FDB and neighbour entries.
    pub vxlan: Option<VxlanDevice>,
    /// What could not be read.
    pub errors: Vec<String>,
}

impl NetworkStatus {
    /// Reads the status through `kernel`; what cannot be read is listed in `errors`.
    pub async fn read(host: &str, kernel: &Kernel) -> NetworkStatus {
        let mut errors = Vec::new();
        let mut note = |e: crate::NetError| errors.push(e.to_string());
        let ip_forward = kernel.sysctl.read(IP_FORWARD).map_err(&mut note).ok();
        let docker0 = kernel
            .routes
            .link_addresses("docker0".into())
            .await
            .map_err(&mut note)
            .ok()
            .flatten();
        let path = kernel.daemon_config.path().to_path_buf();
        let text = kernel
            .daemon_config
            .read()
            .map_err(&mut note)
            .ok()
            .flatten();
        let values = daemon_json::parse(&path, text.as_deref())
            .map_err(&mut note)
            .map(|doc| {
                MANAGED_KEYS
                    .iter()
                    .filter_map(|k| doc.get(*k).map(|v| (k.to_string(), v.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let before_geomx = match kernel.state.read() {
            Ok(Some(t)) => Remembered::from_json(kernel.state.path(), &t)
                .map_err(&mut note)
                .ok(),
            Ok(None) => None,
            Err(e) => {
                note(e);
                None
            }
        };
        let routes = kernel
            .routes
            .main_table()
            .await
            .map_err(&mut note)
            .map(|t| {
                t.into_iter()
                    .filter(|r| r.protocol == ROUTE_PROTOCOL)
                    .collect()
            })
            .unwrap_or_default();
        let vxlan = kernel
            .vxlan
            .show(VXLAN_INTERFACE)
            .await
            .map_err(&mut note)
            .ok()
            .flatten();
        let fw = kernel.firewall.clone();
        let chains = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut errs = Vec::new();
            for (table, hook, chain) in [
                ("nat", "POSTROUTING", NAT_CHAIN),
                ("filter", "FORWARD", FILTER_CHAIN),
            ] {
                let exists = fw.chain_exists(table, chain).unwrap_or_else(|e| {
                    errs.push(e.to_string());
                    false
                });
                let rules = if exists {
                    fw.list_rules(table, chain)
                        .map_err(|e| errs.push(e.to_string()))
                        .unwrap_or_default()
                        .iter()
                        .map(|r| r.to_string())
                        .collect()
                } else {
                    Vec::new()
                };
                let hook_rules = fw
                    .list_rules(table, hook)
                    .map_err(|e| errs.push(e.to_string()))
                    .unwrap_or_default();
                let jump_wanted = crate::rules::wanted_position(
                    &hook_rules,
                    chain,
                    crate::rules::hook_of(chain).and_then(|(_, _, after)| after),
                );
                let jump_positions = hook_rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.target() == Some(chain))
                    .map(|(i, _)| i + 1)
                    .collect();
                out.push(ChainStatus {
                    table: table.into(),
                    chain: chain.into(),
                    hook: hook.into(),
                    exists,
                    rules,
                    jump_positions,
                    jump_wanted,
                });
            }
            (out, errs)
        })
        .await;
        let chains = match chains {
            Ok((c, errs)) => {
                errors.extend(errs);
                c
            }
            Err(e) => {
                errors.push(format!("firewall task: {e}"));
                Vec::new()
            }
        };
        NetworkStatus {
            host: host.to_string(),
            ip_forward,
            docker0,
            daemon_json: DaemonJsonStatus {
                path: path.clone(),
                exists: text.is_some(),
                values,
            },
            before_geomx,
            routes,
            chains,
            vxlan,
            errors,
        }
    }
}

fn key_values(values: &BTreeMap<String, Value>) -> String {
    MANAGED_KEYS
        .iter()
        .map(|k| {
            format!(
                "{k}={}",
                values
                    .get(*k)
                    .map_or("(absent)".to_string(), Value::to_string)
            )
        })
        .collect::<Vec<_>>()
        .join("  ")
}

impl fmt::Display for NetworkStatus {
    /// A table for people.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[Ipv4Net]| {
            if v.is_empty() {
                "(no IPv4 address)".to_string()
            } else {
                v.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        writeln!(f, "host          {}", self.host)?;
        writeln!(
            f,
            "ip_forward    {}",
            self.ip_forward.as_deref().unwrap_or("(unknown)")
        )?;
        writeln!(
            f,
            "docker0       {}",
            self.docker0
                .as_deref()
                .map_or("(no such link)".to_string(), list)
        )?;
        let dj = &self.daemon_json;
        if dj.exists {
            writeln!(f, "daemon.json   {}", dj.path.display())?;
            writeln!(f, "              {}", key_values(&dj.values))?;
        } else {
            writeln!(f, "daemon.json   {} (absent)", dj.path.display())?;
        }
        match &self.before_geomx {
            Some(r) => {
                writeln!(f, "before geomx  {}", key_values(&r.before))?;
                writeln!(
                    f,
                    "              docker0 {} (restored by `geomx-agent cleanup`)",
                    list(&r.docker0)
                )?;
            }
            None => writeln!(f, "before geomx  (geomx has not changed daemon.json)")?,
        }
        writeln!(f)?;
        writeln!(f, "ROUTES (proto {ROUTE_PROTOCOL}, table main)")?;
        if self.routes.is_empty() {
            writeln!(f, "  (none)")?;
        } else {
            writeln!(
                f,
                "  {:<20} {:<16} {:<10} METRIC",
                "DESTINATION", "VIA", "DEV"
            )?;
            for r in &self.routes {
                writeln!(
                    f,
                    "  {:<20} {:<16} {:<10} {}",
                    r.destination.to_string(),
                    r.gateway.map_or("-".to_string(), |g| g.to_string()),
                    r.device.as_deref().unwrap_or("-"),
                    r.metric
                )?;
            }
        }
        for c in &self.chains {
            writeln!(f)?;
            let jump = match c.jump_positions.as_slice() {
                [] => format!("no jump from {}", c.hook),
                [p] if *p == c.jump_wanted => format!("jump from {} at position {p}", c.hook),
                other => format!(
                    "jump from {} at position {} (geomx wants exactly one, at {})",
                    c.hook,
                    other
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.jump_wanted
                ),
            };
            if c.exists {
                writeln!(f, "{} {} ({jump})", c.table.to_uppercase(), c.chain)?;
                if c.rules.is_empty() {
                    writeln!(f, "  (empty)")?;
                }
                for (i, r) in c.rules.iter().enumerate() {
                    writeln!(f, "  {:>2}  {r}", i + 1)?;
                }
            } else {
                writeln!(f, "{} {} (absent; {jump})", c.table.to_uppercase(), c.chain)?;
            }
        }
        if let Some(v) = &self.vxlan {
            writeln!(f)?;
            writeln!(
                f,
                "VXLAN {VXLAN_INTERFACE} (vni {}, port {}, mac {}, mtu {}{})",
                v.spec.vni,
                v.spec.port,
                v.spec.mac,
                v.spec.mtu,
                if v.up { "" } else { ", DOWN" }
            )?;
            for e in &v.fdb {
                writeln!(f, "  fdb    {} dst {}", e.mac, e.dst)?;
            }
            for n in &v.neighbours {
                writeln!(f, "  neigh  {} lladdr {}", n.ip, n.mac)?;
            }
        }
        for e in &self.errors {
            writeln!(f)?;
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}
