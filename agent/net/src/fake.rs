//! An in-memory host for tests: routes, iptables chains (changed only through an
//! iptables-restore that is all-or-nothing per payload and stores rules in `iptables -S`
//! form), sysctls, a Docker daemon that applies daemon.json's bip to docker0 when
//! restarted, WireGuard and VXLAN devices, and files. Every mutation is appended to
//! [`FakeHost::log`], so a test can assert that nothing was changed; any chosen mutation
//! can be made to fail ([`FakeHost::fail_on`]) to test partial failures.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use ipnet::Ipv4Net;

use crate::ROUTE_PROTOCOL;
use crate::error::{NetError, Result};
use crate::kernel::{
    DaemonConfig, DockerDaemon, DockerVersion, FdbEntry, Firewall, Kernel, KernelRoute, NeighEntry,
    PeerRoute, RouteKind, Routes, RuleSpec, StateStore, Sysctl, Vxlan, VxlanDevice, VxlanSpec,
    WgDevice, WgImplementation, WgPeerConfig, Wireguard,
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
    /// VXLAN interfaces by name.
    pub vxlan: BTreeMap<String, VxlanDevice>,
    /// Operations that fail: a mutation whose log line starts with one of these fails
    /// with the message beside it, and changes nothing (youki's test syscall does this).
    pub fail: Vec<(String, String)>,
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
            vxlan: BTreeMap::new(),
            fail: Vec::new(),
            log: Vec::new(),
        }
    }
}

impl FakeHost {
    /// Makes every later mutation whose log line starts with `op` fail with `message`.
    pub fn fail_on(&mut self, op: &str, message: &str) {
        self.fail.push((op.to_string(), message.to_string()));
    }

    /// Logs the mutation `op`, or fails it when a test asked for that.
    fn act(&mut self, op: String) -> Result<()> {
        if let Some((_, msg)) = self.fail.iter().find(|(p, _)| op.starts_with(p.as_str())) {
            let err = NetError::Internal(format!("{op}: {msg} (injected)"));
            self.log.push(format!("FAILED {op}"));
            return Err(err);
        }
        self.log.push(op);
        Ok(())
    }

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
            vxlan: Arc::new(self.clone()),
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
        h.act(format!("wg genkey {}", key_file.display()))?;
        Ok(format!("pub-{k}"))
    }

    fn show(&self, name: &str) -> Result<Option<WgDevice>> {
        Ok(self.host().wireguard.get(name).cloned())
    }

    fn create(&self, name: &str, _mtu: u32) -> Result<WgImplementation> {
        let mut h = self.host();
        h.act(format!("wg create {name}"))?;
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
        h.act(format!("wg set {name} private-key listen-port {port}"))?;
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
        h.act(format!("wg set {name} peer {}", peer.public_key))?;
        let dev = wg_device(&mut h, name)?;
        dev.peers.retain(|p| p.public_key != peer.public_key);
        dev.peers.push(peer.clone());
        dev.peers.sort();
        Ok(())
    }

    fn remove_peer(&self, name: &str, public_key: &str) -> Result<()> {
        let mut h = self.host();
        h.act(format!("wg set {name} peer {public_key} remove"))?;
        if let Some(dev) = h.wireguard.get_mut(name) {
            dev.peers.retain(|p| p.public_key != public_key);
        }
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let mut h = self.host();
        if h.wireguard.remove(name).is_some() {
            h.act(format!("wg delete {name}"))?;
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
        if let Err(e) = h.act(format!(
            "route replace {} {}",
            route.destination,
            route.via()
        )) {
            return Box::pin(async move { Err(e) });
        }
        // like the kernel: a gateway must be on a connected network, a device must exist
        let device = match (&route.gateway, &route.device) {
            (Some(_), Some(dev)) if route.onlink => {
                if h.vxlan.contains_key(dev) || h.links.contains_key(dev) {
                    Ok(dev.clone())
                } else {
                    Err("Cannot find device")
                }
            }
            (Some(gw), _) => h
                .connected
                .iter()
                .find(|(n, _)| n.contains(gw))
                .map(|(_, d)| d.clone())
                .ok_or("Nexthop has invalid gateway"),
            (None, Some(dev))
                if h.links.contains_key(dev)
                    || h.wireguard.contains_key(dev)
                    || h.vxlan.contains_key(dev) =>
            {
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
        if let Err(e) = h.act(format!("route delete {route}")) {
            return Box::pin(async move { Err(e) });
        }
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

/// `-s`/`-d` addresses as iptables prints them (`10.1.1.29` becomes `10.1.1.29/32`).
fn canonical(rule: &RuleSpec) -> RuleSpec {
    let mut words = rule.words().to_vec();
    for i in 1..words.len() {
        if matches!(words[i - 1].as_str(), "-s" | "-d") && !words[i].contains('/') {
            words[i] = format!("{}/32", words[i]);
        }
    }
    RuleSpec(words)
}

impl FakeHost {
    /// One iptables-restore command line applied to `tables` (a copy: the caller commits).
    fn restore_line(
        &self,
        tables: &mut BTreeMap<String, BTreeMap<String, Vec<RuleSpec>>>,
        table: &str,
        line: &str,
    ) -> std::result::Result<(), String> {
        let words = RuleSpec::parse(line).0;
        let t = tables.entry(table.to_string()).or_default();
        let chain_of = |t: &mut BTreeMap<String, Vec<RuleSpec>>, c: &str| {
            if t.contains_key(c) {
                Ok(())
            } else {
                Err(format!("chain {c} does not exist"))
            }
        };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            t.insert(name.to_string(), Vec::new());
            return Ok(());
        }
        let (cmd, chain) = match words.as_slice() {
            [cmd, chain, ..] => (cmd.as_str(), chain.clone()),
            _ => return Err(format!("bad line {line:?}")),
        };
        let rest = &words[2..];
        let check = |r: &RuleSpec, t: &BTreeMap<String, Vec<RuleSpec>>| {
            if !self.random_fully && r.words().iter().any(|w| w == "--random-fully") {
                return Err("unknown option \"--random-fully\"".to_string());
            }
            match r.target() {
                Some(x)
                    if !["ACCEPT", "DROP", "RETURN", "MASQUERADE", "TCPMSS"].contains(&x)
                        && !t.contains_key(x) =>
                {
                    Err("No chain/target/match by that name.".to_string())
                }
                _ => Ok(()),
            }
        };
        match cmd {
            "-A" => {
                let r = canonical(&RuleSpec(rest.to_vec()));
                check(&r, t)?;
                chain_of(t, &chain)?;
                t.entry(chain).or_default().push(r);
            }
            "-I" => {
                let (pos, r) = match rest.first().and_then(|p| p.parse::<usize>().ok()) {
                    Some(p) => (p, RuleSpec(rest[1..].to_vec())),
                    None => (1, RuleSpec(rest.to_vec())),
                };
                let r = canonical(&r);
                check(&r, t)?;
                chain_of(t, &chain)?;
                let c = t.entry(chain).or_default();
                if pos == 0 || pos > c.len() + 1 {
                    return Err("Index of insertion too big.".into());
                }
                c.insert(pos - 1, r);
            }
            "-D" => {
                let r = canonical(&RuleSpec(rest.to_vec()));
                chain_of(t, &chain)?;
                let c = t.entry(chain).or_default();
                let i = c
                    .iter()
                    .position(|x| *x == r)
                    .ok_or("Bad rule (does a matching rule exist in that chain?).")?;
                c.remove(i);
            }
            "-F" => {
                chain_of(t, &chain)?;
                t.entry(chain).or_default().clear();
            }
            "-X" => {
                chain_of(t, &chain)?;
                if t.get(&chain).is_some_and(|c| !c.is_empty()) {
                    return Err("Directory not empty".into());
                }
                if t.values()
                    .flatten()
                    .any(|r| r.target() == Some(chain.as_str()))
                {
                    return Err("Too many links".into());
                }
                t.remove(&chain);
            }
            other => return Err(format!("unknown command {other}")),
        }
        Ok(())
    }
}

impl Firewall for FakeKernel {
    fn chain_exists(&self, table: &str, chain: &str) -> Result<bool> {
        Ok(self.host().chain(table, chain).is_ok())
    }

    fn list_rules(&self, table: &str, chain: &str) -> Result<Vec<RuleSpec>> {
        self.host().chain(table, chain).cloned()
    }

    /// Like iptables-restore --noflush: all of a table's lines or none of them, rules
    /// stored in `iptables -S` form.
    fn restore(&self, payload: &str) -> Result<()> {
        let mut h = self.host();
        let mut tables = h.tables.clone();
        let mut table: Option<String> = None;
        let mut summary = Vec::new();
        for (n, line) in payload.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(t) = line.strip_prefix('*') {
                table = Some(t.to_string());
                continue;
            }
            if line == "COMMIT" {
                table = None;
                continue;
            }
            let t = table.clone().ok_or_else(|| {
                NetError::iptables("iptables-restore", format!("line {}: no table", n + 1))
            })?;
            summary.push(format!("{t} {line}"));
            h.restore_line(&mut tables, &t, line).map_err(|e| {
                NetError::iptables(
                    "iptables-restore --noflush",
                    format!("line {} failed: {e} (the line: {line})", n + 1),
                )
            })?;
        }
        h.act(format!("iptables-restore {}", summary.join("; ")))?;
        h.tables = tables;
        Ok(())
    }

    fn supports_random_fully(&self) -> bool {
        true
    }
}

impl Vxlan for FakeKernel {
    fn show(&self, name: &str) -> BoxFuture<'_, Result<Option<VxlanDevice>>> {
        let d = self.host().vxlan.get(name).cloned();
        Box::pin(async move { Ok(d) })
    }

    fn create(&self, name: &str, spec: &VxlanSpec) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        let r = h
            .act(format!("vxlan create {name} vni {}", spec.vni))
            .and_then(|()| {
                if h.vxlan.contains_key(name) || h.links.contains_key(name) {
                    return Err(NetError::netlink("create", "File exists"));
                }
                h.vxlan.insert(
                    name.to_string(),
                    VxlanDevice {
                        spec: spec.clone(),
                        up: true,
                        fdb: Vec::new(),
                        neighbours: Vec::new(),
                    },
                );
                Ok(())
            });
        Box::pin(async move { r })
    }

    fn delete(&self, name: &str) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        let r = if h.vxlan.contains_key(name) {
            h.act(format!("vxlan delete {name}")).map(|()| {
                h.vxlan.remove(name);
                h.routes.retain(|r| r.device.as_deref() != Some(name));
            })
        } else {
            Ok(())
        };
        Box::pin(async move { r })
    }

    fn fdb_set(&self, name: &str, entry: FdbEntry) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        let r = h
            .act(format!(
                "bridge fdb replace {} dev {name} dst {}",
                entry.mac, entry.dst
            ))
            .and_then(|()| {
                let d = h
                    .vxlan
                    .get_mut(name)
                    .ok_or_else(|| NetError::netlink("fdb", "No such device"))?;
                d.fdb.retain(|f| f.mac != entry.mac);
                d.fdb.push(entry);
                d.fdb.sort();
                Ok(())
            });
        Box::pin(async move { r })
    }

    fn fdb_delete(&self, name: &str, entry: FdbEntry) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        let r = h
            .act(format!(
                "bridge fdb del {} dev {name} dst {}",
                entry.mac, entry.dst
            ))
            .map(|()| {
                if let Some(d) = h.vxlan.get_mut(name) {
                    d.fdb.retain(|f| *f != entry);
                }
            });
        Box::pin(async move { r })
    }

    fn neigh_set(&self, name: &str, entry: NeighEntry) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        let r = h
            .act(format!(
                "ip neigh replace {} lladdr {} dev {name}",
                entry.ip, entry.mac
            ))
            .and_then(|()| {
                let d = h
                    .vxlan
                    .get_mut(name)
                    .ok_or_else(|| NetError::netlink("neigh", "No such device"))?;
                d.neighbours.retain(|n| n.ip != entry.ip);
                d.neighbours.push(entry);
                d.neighbours.sort();
                Ok(())
            });
        Box::pin(async move { r })
    }

    fn neigh_delete(&self, name: &str, entry: NeighEntry) -> BoxFuture<'_, Result<()>> {
        let mut h = self.host();
        let r = h
            .act(format!("ip neigh del {} dev {name}", entry.ip))
            .map(|()| {
                if let Some(d) = h.vxlan.get_mut(name) {
                    d.neighbours.retain(|n| *n != entry);
                }
            });
        Box::pin(async move { r })
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
        h.act(format!("sysctl {key}={value}"))?;
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
        if let Err(e) = h.act("docker restart".into()) {
            return Box::pin(async move { Err(e) });
        }
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
        h.act(format!("write {}", self.path.display()))?;
        *self.slot(&mut h) = Some(text.to_string());
        Ok(())
    }

    fn remove(&self) -> Result<()> {
        let mut h = self.kernel.host();
        h.act(format!("remove {}", self.path.display()))?;
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
