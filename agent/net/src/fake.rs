//! An in-memory host for tests: routes, iptables chains, sysctls, a Docker daemon that
//! applies daemon.json's bip to docker0 when restarted, and files. Every mutation is
//! appended to [`FakeHost::log`], so a test can assert that nothing was changed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use ipnet::Ipv4Net;

use crate::ROUTE_PROTOCOL;
use crate::error::{NetError, Result};
use crate::kernel::{
    DaemonConfig, DockerDaemon, DockerVersion, Firewall, Kernel, KernelRoute, PeerRoute, RouteKind,
    Routes, RuleSpec, StateStore, Sysctl, WgDevice, WgImplementation, WgPeerConfig, Wireguard,
};

/// The state of a fake host. Tests read and change it directly.
#[derive(Clone, Debug)]
pub struct FakeHost {
    /// Main-table routes.
    pub routes: Vec<KernelRoute>,
    /// Directly connected networks (for route lookups) and the device they are on.
    pub connected: Vec<(Ipv4Net, String)>,
    /// Addresses of this host.
    pub local: Vec<Ipv4Addr>,
    /// Links and their addresses.
    pub links: BTreeMap<String, Vec<Ipv4Net>>,
    /// iptables: table -> chain -> rules. Built-in chains exist from the start.
    pub tables: BTreeMap<String, BTreeMap<String, Vec<RuleSpec>>>,
    /// Whether `--random-fully` is accepted.
    pub random_fully: bool,
    /// Sysctls.
    pub sysctls: BTreeMap<String, String>,
    /// The Docker engine; `None` when the API does not answer.
    pub docker: Option<DockerVersion>,
    /// Whether the restart command fails.
    pub restart_fails: bool,
    /// Whether Docker ignores bip when restarted (docker0 keeps its address).
    pub docker_ignores_bip: bool,
    /// How often Docker was restarted.
    pub restarts: u32,
    /// daemon.json (`None`: absent).
    pub daemon_json: Option<String>,
    /// The state file (`None`: absent).
    pub state: Option<String>,
    /// WireGuard interfaces by name.
    pub wireguard: BTreeMap<String, WgDevice>,
    /// WireGuard private keys by file (the fake's "public key" is `pub-` + the private one).
    pub wg_keys: BTreeMap<PathBuf, String>,
    /// How many key pairs were made.
    pub wg_keys_made: u32,
    /// Every mutation, in order.
    pub log: Vec<String>,
}

impl Default for FakeHost {
    /// A host like lab host a before geomx: eth0 10.1.1.34/24, default route via
    /// 10.1.1.1, Docker 20.10 with docker0 at 172.17.0.1/16, empty daemon.json,
    /// ip_forward 0, Docker's usual chains.
    fn default() -> FakeHost {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("fake network");
        let rule = |s: &str| RuleSpec::parse(s);
        let mut tables: BTreeMap<String, BTreeMap<String, Vec<RuleSpec>>> = BTreeMap::new();
        let nat = tables.entry("nat".into()).or_default();
        nat.insert("PREROUTING".into(), vec![]);
        nat.insert("OUTPUT".into(), vec![]);
        nat.insert(
            "POSTROUTING".into(),
            vec![rule("-s 172.17.0.0/16 ! -o docker0 -j MASQUERADE")],
        );
        let filter = tables.entry("filter".into()).or_default();
        filter.insert("INPUT".into(), vec![]);
        filter.insert("OUTPUT".into(), vec![]);
        filter.insert(
            "FORWARD".into(),
            vec![rule("-j DOCKER-USER"), rule("-o docker0 -j DOCKER")],
        );
        filter.insert("DOCKER-USER".into(), vec![rule("-j RETURN")]);
        filter.insert("DOCKER".into(), vec![]);
        FakeHost {
            routes: vec![
                KernelRoute {
                    destination: net("0.0.0.0/0"),
                    gateway: Some("10.1.1.1".parse().expect("ip")),
                    device: Some("eth0".into()),
                    protocol: 3,
                    metric: 0,
                    kind: RouteKind::Unicast,
                },
                KernelRoute {
                    destination: net("10.1.1.0/24"),
                    gateway: None,
                    device: Some("eth0".into()),
                    protocol: 2,
                    metric: 0,
                    kind: RouteKind::Unicast,
                },
            ],
            connected: vec![(net("10.1.1.0/24"), "eth0".into())],
            local: vec!["10.1.1.34".parse().expect("ip")],
            links: [
                ("eth0".to_string(), vec![net("10.1.1.34/24")]),
                ("docker0".to_string(), vec![net("172.17.0.1/16")]),
            ]
            .into_iter()
            .collect(),
            tables,
            random_fully: true,
            sysctls: [("net.ipv4.ip_forward".to_string(), "0".to_string())]
                .into_iter()
                .collect(),
            docker: Some(DockerVersion {
                version: "20.10.24+dfsg1".into(),
                api_version: "1.41".into(),
            }),
            restart_fails: false,
            docker_ignores_bip: false,
            restarts: 0,
            daemon_json: Some("{}\n".into()),
            state: None,
            wireguard: BTreeMap::new(),
            wg_keys: BTreeMap::new(),
            wg_keys_made: 0,
            log: Vec::new(),
        }
    }
}

impl FakeHost {
    /// The rules of a chain (empty when it does not exist).
    pub fn rules(&self, table: &str, chain: &str) -> Vec<String> {
        self.tables
            .get(table)
            .and_then(|t| t.get(chain))
            .map(|c| c.iter().map(|r| r.to_string()).collect())
            .unwrap_or_default()
    }

    /// The geomx routes, as `destination via gateway`.
    pub fn geomx_routes(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter(|r| r.protocol == ROUTE_PROTOCOL)
            .map(|r| match (&r.gateway, &r.device) {
                (Some(g), _) => format!("{} via {g}", r.destination),
                (None, Some(d)) => format!("{} dev {d}", r.destination),
                (None, None) => format!("{} via -", r.destination),
            })
            .collect()
    }

    fn chain(&self, table: &str, chain: &str) -> Result<&Vec<RuleSpec>> {
        self.tables
            .get(table)
            .and_then(|t| t.get(chain))
            .ok_or_else(|| NetError::iptables(format!("{table} {chain}"), "no such chain"))
    }

    fn chain_mut(&mut self, table: &str, chain: &str) -> Result<&mut Vec<RuleSpec>> {
        self.tables
            .get_mut(table)
            .and_then(|t| t.get_mut(chain))
            .ok_or_else(|| NetError::iptables(format!("{table} {chain}"), "no such chain"))
    }

    fn check_rule(&self, rule: &RuleSpec) -> Result<()> {
        if !self.random_fully && rule.words().iter().any(|w| w == "--random-fully") {
            return Err(NetError::iptables(
                "append",
                "unknown option \"--random-fully\"",
            ));
        }
        if let Some(t) = rule.target() {
            let builtin = ["ACCEPT", "DROP", "RETURN", "MASQUERADE", "TCPMSS"];
            if !builtin.contains(&t) && !self.tables.values().any(|c| c.contains_key(t)) {
                return Err(NetError::iptables("append", format!("no chain {t}")));
            }
        }
        Ok(())
    }
}

/// A fake host shared by the handles a [`Kernel`] holds.
#[derive(Clone, Debug, Default)]
pub struct FakeKernel {
    host: Arc<Mutex<FakeHost>>,
}

impl FakeKernel {
    /// A fake of [`FakeHost::default`].
    pub fn new() -> FakeKernel {
        FakeKernel::default()
    }

    /// A fake of `host`.
    pub fn with(host: FakeHost) -> FakeKernel {
        FakeKernel {
            host: Arc::new(Mutex::new(host)),
        }
    }

    /// The fake host's state, to read or change.
    pub fn host(&self) -> MutexGuard<'_, FakeHost> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A [`Kernel`] acting on this fake.
    pub fn kernel(&self) -> Kernel {
        Kernel {
            routes: Arc::new(self.clone()),
            firewall: Arc::new(self.clone()),
            sysctl: Arc::new(self.clone()),
            docker: Arc::new(self.clone()),
            daemon_config: Arc::new(FakeFile {
                kernel: self.clone(),
                state: false,
                path: PathBuf::from("/etc/docker/daemon.json"),
            }),
            state: Arc::new(FakeFile {
                kernel: self.clone(),
                state: true,
                path: PathBuf::from("/var/lib/geomx-agent/daemon-json-before-geomx.json"),
            }),
            wireguard: Arc::new(self.clone()),
        }
    }
}

/// The fake's WireGuard interface `name`, or wg's answer when there is none.
fn wg_device<'a>(h: &'a mut FakeHost, name: &str) -> Result<&'a mut WgDevice> {
    h.wireguard
        .get_mut(name)
        .ok_or_else(|| NetError::Wireguard {
            op: format!("wg set {name}"),
            message: "Unable to modify interface: No such device".into(),
        })
}

impl Wireguard for FakeKernel {
    fn ensure_key(&self, key_file: &Path) -> Result<String> {
        let existing = self.host().wg_keys.get(key_file).cloned();
        match existing {
            Some(k) => Ok(format!("pub-{k}")),
            None => self.rotate_key(key_file),
        }
    }

    fn rotate_key(&self, key_file: &Path) -> Result<String> {
        let mut h = self.host();
        h.wg_keys_made += 1;
        let k = format!("key{}", h.wg_keys_made);
        h.wg_keys.insert(key_file.to_path_buf(), k.clone());
        h.log.push(format!("wg genkey {}", key_file.display()));
        Ok(format!("pub-{k}"))
    }

    fn show(&self, name: &str) -> Result<Option<WgDevice>> {
        Ok(self.host().wireguard.get(name).cloned())
    }

    fn create(&self, name: &str, _mtu: u32) -> Result<WgImplementation> {
        let mut h = self.host();
        h.log.push(format!("wg create {name}"));
        h.wireguard.insert(
            name.to_string(),
            WgDevice {
                public_key: "(none)".into(),
                listen_port: 0,
                peers: Vec::new(),
                handshakes: Vec::new(),
            },
        );
        Ok(WgImplementation::Userspace)
    }

    fn configure(&self, name: &str, key_file: &Path, port: u16) -> Result<()> {
        let mut h = self.host();
        h.log
            .push(format!("wg set {name} private-key listen-port {port}"));
        let key = h
            .wg_keys
            .get(key_file)
            .cloned()
            .ok_or_else(|| NetError::io(key_file, std::io::ErrorKind::NotFound.into()))?;
        let dev = wg_device(&mut h, name)?;
        dev.public_key = format!("pub-{key}");
        dev.listen_port = port;
        Ok(())
    }

    fn set_peer(&self, name: &str, peer: &WgPeerConfig, _keepalive: u16) -> Result<()> {
        let mut h = self.host();
        h.log
            .push(format!("wg set {name} peer {}", peer.public_key));
        let dev = wg_device(&mut h, name)?;
        dev.peers.retain(|p| p.public_key != peer.public_key);
        dev.peers.push(peer.clone());
        dev.peers.sort();
        Ok(())
    }

    fn remove_peer(&self, name: &str, public_key: &str) -> Result<()> {
        let mut h = self.host();
        h.log
            .push(format!("wg set {name} peer {public_key} remove"));
        if let Some(dev) = h.wireguard.get_mut(name) {
            dev.peers.retain(|p| p.public_key != public_key);
        }
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let mut h = self.host();
        if h.wireguard.remove(name).is_some() {
            h.log.push(format!("wg delete {name}"));
            h.routes.retain(|r| r.device.as_deref() != Some(name));
        }
        Ok(())
    }
}

impl Routes for FakeKernel {
    fn main_table(&self) -> BoxFuture<'_, Result<Vec<KernelRoute>>> {
        let routes = self.host().routes.clone();
        Box::pin(async move { Ok(routes) })
    }

    fn replace(&self, route: PeerRoute) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        h.log.push(format!(
            "route replace {} {}",
            route.destination,
            route.via()
        ));
        // like the kernel: a gateway must be on a connected network, a device must exist
        let device = match (&route.gateway, &route.device) {
            (Some(gw), _) => h
                .connected
                .iter()
                .find(|(n, _)| n.contains(gw))
                .map(|(_, d)| d.clone())
                .ok_or("Nexthop has invalid gateway"),
            (None, Some(dev)) if h.links.contains_key(dev) || h.wireguard.contains_key(dev) => {
                Ok(dev.clone())
            }
            (None, _) => Err("Cannot find device"),
        };
        let result = match device {
            Err(why) => Err(NetError::netlink("replace", why)),
            Ok(dev) => {
                h.routes
                    .retain(|r| !(r.destination == route.destination && r.metric == 0));
                h.routes.push(KernelRoute {
                    destination: route.destination,
                    gateway: route.gateway,
                    device: Some(dev),
                    protocol: ROUTE_PROTOCOL,
                    metric: 0,
                    kind: RouteKind::Unicast,
                });
                Ok(())
            }
        };
        Box::pin(async move { result })
    }

    fn delete(&self, route: KernelRoute) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        h.log.push(format!("route delete {route}"));
        let before = h.routes.len();
        if let Some(i) = h.routes.iter().position(|r| {
            r.destination == route.destination
                && r.protocol == route.protocol
                && r.gateway == route.gateway
                && r.metric == route.metric
        }) {
            h.routes.remove(i);
        }
        let result = if h.routes.len() == before {
            Err(NetError::netlink("delete", "No such process"))
        } else {
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn lookup(&self, ip: Ipv4Addr) -> BoxFuture<'_, Result<Option<KernelRoute>>> {
        let h = self.host();
        let host = |net: &str| net.parse::<Ipv4Net>().ok();
        let found = if h.local.contains(&ip) {
            host(&format!("{ip}/32")).map(|d| KernelRoute {
                destination: d,
                gateway: None,
                device: Some("lo".into()),
                protocol: 2,
                metric: 0,
                kind: RouteKind::Local,
            })
        } else if let Some((_, dev)) = h.connected.iter().find(|(n, _)| n.contains(&ip)) {
            host(&format!("{ip}/32")).map(|d| KernelRoute {
                destination: d,
                gateway: None,
                device: Some(dev.clone()),
                protocol: 2,
                metric: 0,
                kind: RouteKind::Unicast,
            })
        } else {
            h.routes
                .iter()
                .filter(|r| r.destination.contains(&ip))
                .max_by_key(|r| r.destination.prefix_len())
                .cloned()
        };
        Box::pin(async move { Ok(found) })
    }

    fn link_addresses(&self, name: String) -> BoxFuture<'_, Result<Option<Vec<Ipv4Net>>>> {
        let addrs = self.host().links.get(&name).cloned();
        Box::pin(async move { Ok(addrs) })
    }
}

impl Firewall for FakeKernel {
    fn chain_exists(&self, table: &str, chain: &str) -> Result<bool> {
        Ok(self.host().chain(table, chain).is_ok())
    }

    fn list_rules(&self, table: &str, chain: &str) -> Result<Vec<RuleSpec>> {
        self.host().chain(table, chain).cloned()
    }

    fn new_chain(&self, table: &str, chain: &str) -> Result<()> {
        let mut h = self.host();
        h.log.push(format!("iptables -t {table} -N {chain}"));
        let t = h.tables.entry(table.into()).or_default();
        if t.contains_key(chain) {
            return Err(NetError::iptables("new chain", "Chain already exists"));
        }
        t.insert(chain.into(), Vec::new());
        Ok(())
    }

    fn flush_chain(&self, table: &str, chain: &str) -> Result<()> {
        let mut h = self.host();
        h.log.push(format!("iptables -t {table} -F {chain}"));
        h.chain_mut(table, chain)?.clear();
        Ok(())
    }

    fn delete_chain(&self, table: &str, chain: &str) -> Result<()> {
        let mut h = self.host();
        h.log.push(format!("iptables -t {table} -X {chain}"));
        if !h.chain(table, chain)?.is_empty() {
            return Err(NetError::iptables("delete chain", "Directory not empty"));
        }
        let referenced = h
            .tables
            .get(table)
            .is_some_and(|t| t.values().flatten().any(|r| r.target() == Some(chain)));
        if referenced {
            return Err(NetError::iptables("delete chain", "Too many links"));
        }
        if let Some(t) = h.tables.get_mut(table) {
            t.remove(chain);
        }
        Ok(())
    }

    fn append(&self, table: &str, chain: &str, rule: &RuleSpec) -> Result<()> {
        let mut h = self.host();
        h.log.push(format!("iptables -t {table} -A {chain} {rule}"));
        h.check_rule(rule)?;
        h.chain_mut(table, chain)?.push(rule.clone());
        Ok(())
    }

    fn insert(&self, table: &str, chain: &str, rule: &RuleSpec, position: u32) -> Result<()> {
        let mut h = self.host();
        h.log
            .push(format!("iptables -t {table} -I {chain} {position} {rule}"));
        h.check_rule(rule)?;
        let c = h.chain_mut(table, chain)?;
        let at = (position.max(1) as usize - 1).min(c.len());
        c.insert(at, rule.clone());
        Ok(())
    }

    fn delete(&self, table: &str, chain: &str, rule: &RuleSpec) -> Result<()> {
        let mut h = self.host();
        h.log.push(format!("iptables -t {table} -D {chain} {rule}"));
        let c = h.chain_mut(table, chain)?;
        match c.iter().position(|r| r == rule) {
            Some(i) => {
                c.remove(i);
                Ok(())
            }
            None => Err(NetError::iptables("delete", "Bad rule")),
        }
    }

    fn supports_random_fully(&self) -> bool {
        true
    }
}

impl Sysctl for FakeKernel {
    fn read(&self, key: &str) -> Result<String> {
        self.host()
            .sysctls
            .get(key)
            .cloned()
            .ok_or_else(|| NetError::Sysctl {
                key: key.into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
    }

    fn write(&self, key: &str, value: &str) -> Result<()> {
        let mut h = self.host();
        h.log.push(format!("sysctl {key}={value}"));
        h.sysctls.insert(key.into(), value.into());
        Ok(())
    }
}

impl DockerDaemon for FakeKernel {
    fn host(&self) -> &str {
        "unix:///fake/docker.sock"
    }

    fn version(&self) -> BoxFuture<'_, Result<DockerVersion>> {
        let v = self
            .host()
            .docker
            .clone()
            .ok_or(NetError::DockerUnavailable {
                host: "unix:///fake/docker.sock".into(),
                reason: "the socket /fake/docker.sock does not exist".into(),
            });
        Box::pin(async move { v })
    }

    fn restart(&self) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        h.log.push("docker restart".into());
        let result = if h.restart_fails {
            Err(NetError::DockerRestartFailed {
                command: "fake restart".into(),
                status: "exit status: 1".into(),
                stderr: "fake failure".into(),
            })
        } else {
            h.restarts += 1;
            let bip = h
                .daemon_json
                .as_deref()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .and_then(|v| v.get("bip").and_then(|b| b.as_str()).map(str::to_string))
                .and_then(|b| b.parse::<Ipv4Net>().ok());
            if let Some(bip) = bip
                && !h.docker_ignores_bip
            {
                h.links.insert("docker0".into(), vec![bip]);
            }
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn restart_command(&self) -> &str {
        "fake restart"
    }
}

struct FakeFile {
    kernel: FakeKernel,
    state: bool,
    path: PathBuf,
}

impl FakeFile {
    fn slot<'a>(&self, h: &'a mut FakeHost) -> &'a mut Option<String> {
        if self.state {
            &mut h.state
        } else {
            &mut h.daemon_json
        }
    }
}

impl DaemonConfig for FakeFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Option<String>> {
        let mut h = self.kernel.host();
        Ok(self.slot(&mut h).clone())
    }

    fn write(&self, text: &str) -> Result<()> {
        let mut h = self.kernel.host();
        h.log.push(format!("write {}", self.path.display()));
        *self.slot(&mut h) = Some(text.to_string());
        Ok(())
    }

    fn remove(&self) -> Result<()> {
        let mut h = self.kernel.host();
        h.log.push(format!("remove {}", self.path.display()));
        *self.slot(&mut h) = None;
        Ok(())
    }
}

impl StateStore for FakeFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Option<String>> {
        DaemonConfig::read(self)
    }

    fn write(&self, text: &str) -> Result<()> {
        DaemonConfig::write(self, text)
    }

    fn remove(&self) -> Result<()> {
        DaemonConfig::remove(self)
    }
}
